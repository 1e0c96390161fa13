"""``manifest.json``, typed: the one schema the writer fills and the reader checks.

The writer (``llmq.quant``) builds a :class:`Manifest` and writes :meth:`Manifest.to_json`; the
reader turns the file back into one with :meth:`Manifest.from_json`, which refuses anything the
schema does not allow and names the file and the problem. Provenance (``llmq_version``,
``source``, ``quantization``, ``calibration``, ``accounting``) is not needed to run an artifact;
a field that is ``None`` is left out of the file, and an absent or null one reads as ``None``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from llmq.errors import ArtifactError
from llmq.runtime.format import dtypes
from llmq.runtime.format import layout as L

FORMAT_NAME = "llmq"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARD_PATTERN = "shard-{:05d}.safetensors"
MAX_DENSE_ELEMENTS = 1 << 36  # 64 G elements: more than any real tensor, less than a hostile header claims
_DENSE_DTYPES = {info.name: info for info in dtypes.FLOATS}  # what a dense tensor may be stored as
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class FileRecord:
    """Size and SHA-256 of one file of the artifact (or of the source model)."""

    sha256: str
    bytes: int

    def to_json(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "bytes": self.bytes}


@dataclass(frozen=True)
class SourceRecord:
    """The model an artifact was quantized from: as asked for, as resolved, and its files' hashes."""

    spec: str
    kind: str  # demo, folder or hub
    label: str
    revision: str | None
    files: dict[str, FileRecord]

    def to_json(self) -> dict[str, Any]:
        files = {name: record.to_json() for name, record in self.files.items()}
        return {"spec": self.spec, "kind": self.kind, "label": self.label, "revision": self.revision, "files": files}


@dataclass(frozen=True)
class LinearEntry:
    shard: str
    layout: L.LinearLayout
    bias: str | None  # dense tensor name of the bias, if the Linear has one

    def to_json(self) -> dict[str, Any]:
        return {"shard": self.shard, "layout": self.layout.to_json(), "bias": self.bias}


@dataclass(frozen=True)
class DenseEntry:
    shard: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"shard": self.shard, "dtype": dtypes.name(self.dtype), "shape": list(self.shape)}


@dataclass(frozen=True)
class Manifest:
    """Everything ``manifest.json`` holds. ``path`` is the artifact directory it was read from."""

    linears: dict[str, LinearEntry]
    dense: dict[str, DenseEntry]
    files: dict[str, FileRecord]  # shards and copied HF files
    llmq_version: str | None = None
    source: SourceRecord | None = None
    quantization: dict[str, Any] | None = None  # the QuantConfig, as llmq.quant writes it
    calibration: dict[str, Any] | None = None  # the calibration's provenance, if the run had one
    accounting_record: dict[str, Any] | None = None  # "accounting": bits per weight as written
    path: Path | None = field(default=None, compare=False)

    @property
    def shards(self) -> list[str]:
        return sorted(name for name in self.files if name.endswith(".safetensors"))

    def accounting(self):
        """The bits-per-weight accounting its layouts and dense shapes give (``format.accounting``)."""
        from llmq.runtime.format.accounting import account

        return account(
            {name: entry.layout for name, entry in self.linears.items()},
            {name: (entry.dtype, entry.shape) for name, entry in self.dense.items()},
        )

    def to_json(self) -> dict[str, Any]:
        """The file's content, keys in a fixed order (the golden-bytes test pins it)."""
        info = {
            "llmq_version": self.llmq_version,
            "source": self.source.to_json() if self.source else None,
            "quantization": self.quantization,
            "calibration": self.calibration,
        }
        document: dict[str, Any] = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION}
        document |= {key: value for key, value in info.items() if value is not None}
        document["linears"] = {name: entry.to_json() for name, entry in self.linears.items()}
        document["dense"] = {name: entry.to_json() for name, entry in self.dense.items()}
        if self.accounting_record is not None:
            document["accounting"] = self.accounting_record
        document["files"] = {name: record.to_json() for name, record in self.files.items()}
        return document

    def to_text(self) -> str:
        """The exact bytes of ``manifest.json`` (as text): :meth:`to_json`, indented, in insertion
        order (module order, deterministic). Every writer of the file uses this one form."""
        return json.dumps(self.to_json(), indent=2) + "\n"

    @classmethod
    def from_json(cls, raw: Any, file: Path) -> Manifest:
        """Check ``raw`` (parsed JSON of ``file``) against the schema, version 1; any problem raises
        :class:`ArtifactError` naming ``file``. Unknown keys are refused, not half-read."""
        _expect(isinstance(raw, dict), file, "the top level must be an object")
        _keys(raw, _REQUIRED, _REQUIRED | _INFO.keys(), file, "the manifest")
        for key, kind in _INFO.items():
            _expect(
                raw.get(key) is None or isinstance(raw[key], kind), file, f"'{key}' must be a {kind.__name__} or null"
            )
        _expect(raw.get("format") == FORMAT_NAME, file, f"'format' must be {FORMAT_NAME!r}")
        version = raw.get("format_version")
        if version != FORMAT_VERSION:
            raise ArtifactError(f"{file}: unknown format_version {version!r}; this llmq reads version {FORMAT_VERSION}")
        files = _files(raw.get("files"), file, "files")
        linears = {name: _linear(name, entry, files, file) for name, entry in _obj(raw, "linears", file).items()}
        dense = {name: _dense(name, entry, files, file) for name, entry in _obj(raw, "dense", file).items()}
        for name, entry in linears.items():
            _expect(
                entry.bias is None or entry.bias in dense, file, f"linear {name}: bias {entry.bias!r} is not listed"
            )
        source = _source(raw["source"], file) if raw.get("source") is not None else None
        return cls(
            linears, dense, files, raw.get("llmq_version"), source, raw.get("quantization"), raw.get("calibration"),
            raw.get("accounting"), file.parent,
        )  # fmt: skip


# Keys of the file, version 1: these and no others.
_REQUIRED = frozenset({"format", "format_version", "linears", "dense", "files"})
_INFO = {"llmq_version": str, "source": dict, "quantization": dict, "calibration": dict, "accounting": dict}


def _expect(condition: bool, file: Path, message: str) -> None:
    if not condition:
        raise ArtifactError(f"{file}: {message}")


def _keys(entry: dict, required: frozenset | set, allowed: frozenset | set, file: Path, what: str) -> None:
    unknown = sorted(map(str, set(entry) - set(allowed)))
    missing = sorted(set(required) - set(entry))
    _expect(not unknown, file, f"{what} has unknown key(s) {unknown}; this llmq reads format {FORMAT_VERSION}")
    _expect(not missing, file, f"{what} lacks key(s) {missing}")


def _obj(raw: dict, key: str, file: Path) -> dict:
    value = raw.get(key)
    _expect(isinstance(value, dict), file, f"'{key}' must be an object")
    return value


def _int(value: Any, file: Path, what: str, lo: int = 0, hi: int = 1 << 40) -> int:
    _expect(
        isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi,
        file,
        f"{what} must be an integer in [{lo}, {hi}]",
    )
    return value


def _files(value: Any, file: Path, what: str, inside: bool = True) -> dict[str, FileRecord]:
    """A ``{name: {"sha256", "bytes"}}`` table; ``inside``: names must be plain names in the artifact."""
    _expect(isinstance(value, dict) and (value or not inside), file, f"'{what}' must be a non-empty object")
    record_keys = frozenset(f.name for f in fields(FileRecord))
    records = {}
    for name, info in value.items():
        if inside:
            safe = isinstance(name, str) and name == Path(name).name and not name.startswith(".") and name != MANIFEST
            _expect(safe, file, f"file name {name!r} must be a plain name inside the artifact")
        _expect(isinstance(info, dict), file, f"{what}[{name!r}] must be an object")
        _keys(info, record_keys, record_keys, file, f"{what}[{name!r}]")
        sha = info["sha256"]
        _expect(
            isinstance(sha, str) and bool(_SHA256.fullmatch(sha)),
            file,
            f"{what}[{name!r}].sha256 must be 64 hex digits",
        )
        records[name] = FileRecord(sha, _int(info.get("bytes"), file, f"{what}[{name!r}].bytes"))
    return records


def _source(value: dict, file: Path) -> SourceRecord:
    keys = frozenset(f.name for f in fields(SourceRecord))
    _keys(value, keys, keys, file, "'source'")
    for key in ("spec", "kind", "label"):
        _expect(isinstance(value[key], str), file, f"source.{key} must be a string")
    _expect(
        value["revision"] is None or isinstance(value["revision"], str),
        file,
        "source.revision must be a string or null",
    )
    files = _files(value["files"], file, "source.files", inside=False)
    return SourceRecord(value["spec"], value["kind"], value["label"], value["revision"], files)


def _shard(entry: dict, files: dict, file: Path, what: str) -> str:
    shard = entry.get("shard")
    known = isinstance(shard, str) and shard in files and shard.endswith(".safetensors")
    _expect(known, file, f"{what}: unknown shard {shard!r}")
    return shard


def _linear(name: str, entry: Any, files: dict, file: Path) -> LinearEntry:
    _expect(isinstance(entry, dict), file, f"linear {name}: must be an object")
    _keys(entry, frozenset({"shard", "layout"}), frozenset({"shard", "layout", "bias"}), file, f"linear {name}")
    shard = _shard(entry, files, file, f"linear {name}")
    spec = entry.get("layout")
    _expect(
        isinstance(spec, dict) and set(spec) == {f.name for f in fields(L.LinearLayout)},
        file,
        f"linear {name}: bad layout keys",
    )
    values = {k: _int(v, file, f"linear {name}: layout.{k}") for k, v in spec.items()}
    layout = L.LinearLayout(**values)
    problems = layout.check()
    _expect(not problems, file, f"linear {name}: {'; '.join(problems)}")
    bias = entry.get("bias")
    _expect(bias is None or isinstance(bias, str), file, f"linear {name}: bias must be a tensor name or null")
    return LinearEntry(shard, layout, bias)


def _dense(name: str, entry: Any, files: dict, file: Path) -> DenseEntry:
    _expect(isinstance(entry, dict), file, f"dense {name}: must be an object")
    dense_keys = frozenset({"shard", "dtype", "shape"})
    _keys(entry, dense_keys, dense_keys, file, f"dense {name}")
    shard = _shard(entry, files, file, f"dense {name}")
    dtype, shape = entry.get("dtype"), entry.get("shape")
    _expect(
        isinstance(dtype, str) and dtype in _DENSE_DTYPES,
        file,
        f"dense {name}: dtype {dtype!r} is not one of {sorted(_DENSE_DTYPES)}",
    )
    _expect(isinstance(shape, list) and len(shape) <= 4, file, f"dense {name}: shape must be a list of at most 4 ints")
    dims = tuple(_int(d, file, f"dense {name}: shape", 0, 1 << 32) for d in shape)
    _expect(math.prod(dims) <= MAX_DENSE_ELEMENTS, file, f"dense {name}: shape {list(dims)} is implausibly large")
    return DenseEntry(shard, _DENSE_DTYPES[dtype].torch(), dims)

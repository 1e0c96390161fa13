"""The ``.llmq`` artifact: names, manifest schema, reading and strict validation.

An artifact is a directory (see ``docs/format.md``)::

    manifest.json              format, version, provenance, config, layouts, checksums, accounting
    shard-00000.safetensors    tensors, one shard per decoder layer plus one for the rest
    config.json, tokenizer...  the source model's HF config and tokenizer files, copied in

Nothing here executes anything from the file: JSON and safetensors only. Every shape, dtype,
offset and code range is checked before a tensor reaches a decoder or kernel; a problem raises
:class:`ArtifactError` naming the file and what is wrong. The writer lives in ``llmq.quant``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
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
# Source files an artifact may carry along: data only, never code or pickles.
HF_FILE_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken")
HF_FILE_EXCLUDE = ("model.safetensors.index.json", MANIFEST)

# The manifest's schema, version 1: these keys and no others (an unknown key means a file
# this reader does not understand, which is refused rather than half-read).
REQUIRED_KEYS = frozenset({"format", "format_version", "linears", "dense", "files"})
ALLOWED_KEYS = REQUIRED_KEYS | {"llmq_version", "source", "quantization", "calibration", "accounting"}
INFO_KEYS = ("llmq_version", "source", "quantization", "calibration", "accounting")  # provenance, not used to run
_SHA256 = re.compile(r"[0-9a-f]{64}")

_DENSE_DTYPES = {info.name: info for info in dtypes.FLOATS}  # what a dense tensor may be stored as
_MAX_JSON_BYTES = 64 << 20
MAX_DENSE_ELEMENTS = 1 << 36  # 64 G elements: more than any real tensor, less than a hostile header claims


@dataclass(frozen=True)
class LinearEntry:
    shard: str
    layout: L.LinearLayout
    bias: str | None  # dense tensor name of the bias, if the Linear has one


@dataclass(frozen=True)
class DenseEntry:
    shard: str
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Manifest:
    path: Path
    raw: dict[str, Any]
    linears: dict[str, LinearEntry]
    dense: dict[str, DenseEntry]
    files: dict[str, dict[str, Any]]  # file name -> {"sha256", "bytes"} for shards and HF files

    @property
    def shards(self) -> list[str]:
        return sorted(name for name in self.files if name.endswith(".safetensors"))

    def accounting(self):
        """The bits-per-weight accounting its layouts and dense shapes give (``runtime.accounting``)."""
        from llmq.runtime.format.accounting import account

        return account(
            {name: entry.layout for name, entry in self.linears.items()},
            {name: (entry.dtype, entry.shape) for name, entry in self.dense.items()},
        )


def is_artifact(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST).is_file()


def update_digest(digest, path: Path) -> None:
    """Feed a file's bytes to a ``hashlib`` digest, 4 MiB at a time."""
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    update_digest(digest, path)
    return digest.hexdigest()


def read_manifest(path: Path) -> Manifest:
    """Parse and check ``manifest.json``'s structure (not yet the files it points to)."""
    file = path / MANIFEST
    if not path.is_dir():
        raise ArtifactError(f"{path}: not an artifact directory")
    if not file.is_file():
        raise ArtifactError(f"{path}: {MANIFEST} is missing")
    if file.stat().st_size > _MAX_JSON_BYTES:
        raise ArtifactError(f"{file}: larger than {_MAX_JSON_BYTES >> 20} MiB, refusing to parse")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ArtifactError(f"{file}: not valid JSON ({err})") from err
    _expect(isinstance(raw, dict), file, "the top level must be an object")
    _keys(raw, REQUIRED_KEYS, ALLOWED_KEYS, file, "the manifest")
    for key in INFO_KEYS:
        kind = str if key == "llmq_version" else dict
        _expect(raw.get(key) is None or isinstance(raw[key], kind), file, f"'{key}' must be a {kind.__name__} or null")
    _expect(raw.get("format") == FORMAT_NAME, file, f"'format' must be {FORMAT_NAME!r}")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(f"{file}: unknown format_version {version!r}; this llmq reads version {FORMAT_VERSION}")
    files = _files(raw.get("files"), file)
    linears = {name: _linear(name, entry, files, file) for name, entry in _obj(raw, "linears", file).items()}
    dense = {name: _dense(name, entry, files, file) for name, entry in _obj(raw, "dense", file).items()}
    for name, entry in linears.items():
        _expect(entry.bias is None or entry.bias in dense, file, f"linear {name}: bias {entry.bias!r} is not listed")
    return Manifest(path, raw, linears, dense, files)


def _expect(condition: bool, file: Path, message: str) -> None:
    if not condition:
        raise ArtifactError(f"{file}: {message}")


def _keys(entry: dict, required: frozenset, allowed: frozenset, file: Path, what: str) -> None:
    unknown = sorted(map(str, set(entry) - allowed))
    missing = sorted(required - set(entry))
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


def _files(value: Any, file: Path) -> dict[str, dict[str, Any]]:
    _expect(isinstance(value, dict) and value, file, "'files' must be a non-empty object")
    for name, info in value.items():
        safe = isinstance(name, str) and name == Path(name).name and not name.startswith(".") and name != MANIFEST
        _expect(safe, file, f"file name {name!r} must be a plain name inside the artifact")
        _expect(isinstance(info, dict), file, f"files[{name!r}] must be an object")
        _keys(info, frozenset({"sha256", "bytes"}), frozenset({"sha256", "bytes"}), file, f"files[{name!r}]")
        sha = info["sha256"]
        _expect(
            isinstance(sha, str) and bool(_SHA256.fullmatch(sha)), file, f"files[{name!r}].sha256 must be 64 hex digits"
        )
        _int(info.get("bytes"), file, f"files[{name!r}].bytes")
    return value


def _linear(name: str, entry: Any, files: dict, file: Path) -> LinearEntry:
    _expect(isinstance(entry, dict), file, f"linear {name}: must be an object")
    _keys(entry, frozenset({"shard", "layout"}), frozenset({"shard", "layout", "bias"}), file, f"linear {name}")
    shard = entry.get("shard")
    known = isinstance(shard, str) and shard in files and shard.endswith(".safetensors")
    _expect(known, file, f"linear {name}: unknown shard {shard!r}")
    spec = entry.get("layout")
    _expect(
        isinstance(spec, dict) and set(spec) == set(L.LinearLayout.__dataclass_fields__),
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
    shard, dtype, shape = entry.get("shard"), entry.get("dtype"), entry.get("shape")
    known = isinstance(shard, str) and shard in files and shard.endswith(".safetensors")
    _expect(known, file, f"dense {name}: unknown shard {shard!r}")
    _expect(
        isinstance(dtype, str) and dtype in _DENSE_DTYPES,
        file,
        f"dense {name}: dtype {dtype!r} is not one of {sorted(_DENSE_DTYPES)}",
    )
    _expect(isinstance(shape, list) and len(shape) <= 4, file, f"dense {name}: shape must be a list of at most 4 ints")
    dims = tuple(_int(d, file, f"dense {name}: shape", 0, 1 << 32) for d in shape)
    _expect(math.prod(dims) <= MAX_DENSE_ELEMENTS, file, f"dense {name}: shape {list(dims)} is implausibly large")
    return DenseEntry(shard, _DENSE_DTYPES[dtype].torch(), dims)


def file_problem(path: Path, info: dict[str, Any]) -> str | None:
    """What is wrong with ``path`` against its record ``{"bytes", "sha256"}``, or None."""
    if not path.is_file():
        return "listed in the manifest but missing"
    size = path.stat().st_size
    if size != info["bytes"]:
        return f"{size} bytes, the manifest says {info['bytes']} (truncated or replaced)"
    if sha256_file(path) != info["sha256"]:
        return "checksum mismatch (the file is corrupt or was modified)"
    return None


def verify_files(manifest: Manifest) -> None:
    """Every listed file exists, has the recorded size and SHA-256; no symlink leaves the artifact."""
    root = manifest.path.resolve()
    for name, info in manifest.files.items():
        path = manifest.path / name
        if path.is_file() and path.resolve().parent != root:
            raise ArtifactError(f"{path}: points outside the artifact")
        problem = file_problem(path, info)
        if problem:
            raise ArtifactError(f"{path}: {problem}")
    check_headers(manifest)


def check_headers(manifest: Manifest) -> None:
    """Every shard's safetensors header (read without its data) names the manifest's tensors with
    its dtypes and shapes; safetensors itself checks the offsets against the file size."""
    from safetensors import SafetensorError, safe_open

    expected = expected_tensors(manifest)
    for shard in manifest.shards:
        path = manifest.path / shard
        try:
            with safe_open(str(path), framework="pt") as f:
                slices = {k: f.get_slice(k) for k in f.keys()}
                declared = {k: (s.get_dtype(), tuple(s.get_shape())) for k, s in slices.items()}
        except (SafetensorError, OSError, RuntimeError) as err:
            raise ArtifactError(f"{path}: unreadable safetensors header ({err})") from err
        for name, (dtype, shape) in declared.items():
            info = dtypes.BY_SAFETENSORS.get(dtype)
            _check_declared(path, shard, name, info.torch() if info else None, dtype, shape, expected)


def _check_declared(path: Path, shard: str, name: str, dtype, label, shape: tuple, expected: dict) -> None:
    """Tensor ``name`` of ``shard`` (its torch ``dtype``, shown as ``label``) is in the manifest for
    this shard, with the manifest's dtype and shape. Shared by the header check and the loader."""
    want = expected.get(name)
    if want is None or want[0] != shard:
        raise ArtifactError(f"{path}: tensor {name!r} is not in the manifest for this shard")
    if dtype != want[1] or tuple(shape) != want[2]:
        raise ArtifactError(
            f"{path}: tensor {name!r} is {label} {list(shape)}, the manifest says {want[1]} {list(want[2])}"
        )


def load_tensors(manifest: Manifest, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of all shards, after checking each one's name, dtype, shape and values against the manifest."""
    tensors: dict[str, torch.Tensor] = {}
    for _, loaded in iter_shards(manifest, device):
        tensors.update(loaded)
    return tensors


def iter_shards(manifest: Manifest, device: str | torch.device = "cpu"):
    """Yield ``(shard name, its tensors)`` one shard at a time, each checked like :func:`load_tensors`.

    Only one shard is in memory at once; the check that every expected tensor exists runs after
    the last shard.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    expected = expected_tensors(manifest)
    seen: set[str] = set()
    for shard in manifest.shards:
        path = manifest.path / shard
        try:
            loaded = load_file(path, device=str(device))
        except (SafetensorError, OSError, RuntimeError) as err:
            raise ArtifactError(f"{path}: unreadable safetensors file ({err})") from err
        for name, tensor in loaded.items():
            _check_declared(path, shard, name, tensor.dtype, tensor.dtype, tensor.shape, expected)
        for name, entry in manifest.linears.items():
            if entry.shard == shard:
                suffixes = entry.layout.tensor_specs()
                if all(f"{name}.{k}" in loaded for k in suffixes):
                    check_linear_values(name, entry.layout, {k: loaded[f"{name}.{k}"] for k in suffixes}, manifest.path)
        seen.update(loaded)
        yield shard, loaded
    missing = sorted(set(expected) - seen)
    if missing:
        raise ArtifactError(f"{manifest.path}: {len(missing)} tensor(s) missing, first {missing[0]!r}")


def expected_tensors(manifest: Manifest) -> dict[str, tuple[str, torch.dtype, tuple[int, ...]]]:
    """Tensor name -> (shard, dtype, shape), from the manifest and the layout table."""
    expected = {name: (e.shard, e.dtype, e.shape) for name, e in manifest.dense.items()}
    for name, entry in manifest.linears.items():
        for suffix, (dtype, shape) in entry.layout.tensor_specs().items():
            expected[f"{name}.{suffix}"] = (entry.shard, dtype, shape)
    return expected


def check_linear_values(name: str, layout: L.LinearLayout, t: dict[str, torch.Tensor], where: Path) -> None:
    """Value-level checks the shapes cannot catch: permutation, code ranges, CSR structure, finite scales."""

    def fail(message: str) -> None:
        raise ArtifactError(f"{where}: linear {name}: {message}")

    perm = t["perm"].long()
    if not torch.equal(torch.sort(perm).values, torch.arange(layout.in_features, device=perm.device)):
        fail("perm is not a permutation of the input channels")
    if layout.k2 > 0:
        _, scale_code = L.unpack_meta2(t["meta2"])
        if int(scale_code.max()) >= 1 << layout.scale_bits:
            fail(f"a scale code exceeds scale_bits={layout.scale_bits}")
        if int(t["szero2"].max()) > L.SZERO_MAX:
            fail("a second-order zero exceeds INT4")
        if not torch.isfinite(t["scale2"]).all():
            fail("scale2 holds NaN/Inf")
    if layout.k4 > 0:
        if int(t["zero4"].max()) > L.INT4_MAX:
            fail("a 4-bit zero exceeds INT4")
        if not torch.isfinite(t["scale4"]).all():
            fail("scale4 holds NaN/Inf")
    if layout.n_outliers > 0:
        _check_csr(t, layout, fail)


def _check_csr(t: dict[str, torch.Tensor], layout: L.LinearLayout, fail) -> None:
    rowptr, cols = t["outlier_rowptr"].long(), t["outlier_col"].long()
    if int(rowptr[0]) != 0 or int(rowptr[-1]) != layout.n_outliers or bool((rowptr.diff() < 0).any()):
        fail("outlier_rowptr is not a valid CSR row pointer")
    if bool(((cols < 0) | (cols >= layout.k2)).any()):
        fail("an outlier column is outside the 2-bit part")
    rows = torch.repeat_interleave(torch.arange(layout.out_features, device=cols.device), rowptr.diff())
    key = rows * layout.k2 + cols
    if bool((key.diff() <= 0).any()):
        fail("outlier columns are not strictly increasing within each row")
    if not torch.isfinite(t["outlier_val"]).all():
        fail("outlier_val holds NaN/Inf")


def open_artifact(path: Path, verify: bool = True) -> Manifest:
    """Read the manifest and, unless told not to, check every file's size and checksum."""
    manifest = read_manifest(path)
    if verify:
        verify_files(manifest)
    return manifest

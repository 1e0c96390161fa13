"""The calibration stats file: safetensors holding per-Linear input statistics, with a small manifest.

Tensors: ``<linear>.hessian`` (float32 ``[K, K]``, ``E[x xᵀ]``) and ``<linear>.sq_mean`` (float32
``[K]``, ``E[x²]``) for each *canonical* Linear; Linears reading the same input point to it
through ``aliases``. ``<linear>.fisher`` (float32 ``[N]``, every Linear: outputs are not shared)
is the diagonal of its output Fisher (:mod:`llmq.quant.sensitivity`); files written before it
existed lack it and still load. The manifest, in the safetensors metadata under ``llmq_calib``, records the
model fingerprint, text source, samples, sequence length, seed and token count, so one file can
serve many ``quantize`` runs (like llama.cpp's imatrix) and is refused for any other model.

Statistics are never all in memory: a Llama-2-7B's Hessians are about 22 GB. Calibration writes
each decoder layer's to a file of its own as the layer finishes (:class:`~llmq.quant.calibrate.Calibration`),
a stats file is assembled from those one tensor at a time (:mod:`llmq.runtime.format.streamed`),
and :class:`StatsTensors` reads a tensor from its file only when it is asked for.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
import uuid
import weakref
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from llmq.errors import StatsFileError
from llmq.quant.calibrate import Calibration
from llmq.quant.writer import writing
from llmq.runtime.format import dtypes
from llmq.runtime.format.streamed import write_streamed
from llmq.runtime.sources.models import ModelSource

STATS_FORMAT = "llmq-calib"
STATS_VERSION = 1
_META_KEY = "llmq_calib"


INLINE = "inline"  # how the manifest names statistics collected in the quantize run itself

Header = tuple[torch.dtype, tuple[int, ...]]


class StatsTensors(MutableMapping):
    """Statistics tensors by name. Those in files are read when asked for, one at a time, and
    checked on every read (finite; a Fisher also non-negative); those set here stay in memory.

    files   name -> the safetensors file holding it
    held    name -> tensor kept in memory
    folder  a folder of files these statistics own (calibration's per-layer files): removed with them
    """

    def __init__(self, files: dict[str, Path] | None = None, held: dict[str, torch.Tensor] | None = None,
                 folder: Path | None = None):  # fmt: skip
        self._files = dict(files or {})
        self._held = dict(held or {})
        self._headers = _file_headers(self._files)
        self._cleanup = None if folder is None else weakref.finalize(self, shutil.rmtree, folder, True)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self._held:
            return self._held[name]
        path = self._files[name]
        tensor = _read_tensor(path, name)
        _check_values(path, name, tensor)
        return tensor

    def verify(self, name: str) -> None:
        """Read tensor ``name`` now, so a damaged value is an error here rather than at its use."""
        self[name]  # noqa: B018 -- the read checks it

    def __setitem__(self, name: str, tensor: torch.Tensor) -> None:
        self._files.pop(name, None)
        self._headers.pop(name, None)
        self._held[name] = tensor

    def __delitem__(self, name: str) -> None:
        if name in self._held:
            del self._held[name]
        else:
            del self._files[name]
            del self._headers[name]

    def __contains__(self, name: object) -> bool:  # without reading the tensor, as Mapping's would
        return name in self._held or name in self._files

    def __iter__(self) -> Iterator[str]:
        return iter([*self._files, *self._held])

    def __len__(self) -> int:
        return len(self._files) + len(self._held)

    def header(self, name: str) -> Header:
        """(dtype, shape) of tensor ``name`` without reading it."""
        held = self._held.get(name)
        return (held.dtype, tuple(held.shape)) if held is not None else self._headers[name]

    def close(self) -> None:
        """Remove the folder these statistics own now, rather than when they are garbage-collected;
        its tensors cannot be read afterwards."""
        if self._cleanup is not None:
            self._cleanup()


def _file_headers(files: dict[str, Path]) -> dict[str, Header]:
    """(dtype, shape) of each named tensor, from its file's header (each file opened once)."""
    from safetensors import SafetensorError, safe_open

    by_file: dict[Path, list[str]] = {}
    for name, path in files.items():
        by_file.setdefault(path, []).append(name)
    headers = {}
    for path, names in by_file.items():
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in names:
                    piece = f.get_slice(name)
                    headers[name] = (piece.get_dtype(), tuple(piece.get_shape()))
        except (SafetensorError, OSError) as err:
            raise StatsFileError(f"{path}: not a readable safetensors stats file ({err})") from err
    for name, (code, shape) in headers.items():
        info = dtypes.BY_SAFETENSORS.get(code)
        if info not in dtypes.FLOATS:
            raise StatsFileError(f"{files[name]}: {name} is stored as {code}; statistics are float32")
        headers[name] = (info.torch(), shape)
    return headers


def _read_tensor(path: Path, name: str) -> torch.Tensor:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(name)
    except (SafetensorError, OSError) as err:
        raise StatsFileError(f"{path}: {name} cannot be read ({err})") from err


def _check_values(path: Path, name: str, tensor: torch.Tensor) -> None:
    if not torch.isfinite(tensor).all():
        kind = "Hessian" if name.endswith(".hessian") else "output Fisher" if name.endswith(".fisher") else "statistic"
        raise StatsFileError(f"{path}: the {kind} {name} is missing or corrupt (it holds NaN or Inf)")
    if name.endswith(".fisher") and (tensor < 0).any():
        raise StatsFileError(f"{path}: the output Fisher {name} is corrupt (want finite, non-negative, 1-D)")


@dataclass(frozen=True)
class CalibStats:
    """Per-Linear input statistics: ``tensors`` by name (``<linear>.hessian`` float32 ``[K, K]`` and
    ``<linear>.sq_mean`` float32 ``[K]``; a :class:`StatsTensors`, or any mapping), ``meta`` the
    stats manifest (with its ``aliases``)."""

    meta: dict
    tensors: MutableMapping[str, torch.Tensor]
    path: Path | None = None  # the stats file they were read from or written to; None: only in memory
    model: ModelSource | None = None  # the model they were collected from, when that was in this process
    # the calibration windows [samples, seq_len] (token ids), when collected in this process (a file keeps
    # only its text's label)
    windows: torch.Tensor | None = None

    @property
    def linears(self) -> int:
        """How many Linears the statistics cover."""
        return len(self.meta["aliases"])

    @property
    def provenance(self) -> dict:
        """The manifest without the alias table: what an artifact records of its calibration."""
        return {key: value for key, value in self.meta.items() if key != "aliases"}

    @property
    def inputs(self) -> int:
        """How many distinct inputs they hold statistics of (Linears reading one tensor share them)."""
        return len(set(self.meta["aliases"].values()))

    @property
    def file_label(self) -> str:
        return INLINE if self.path is None else self.path.name

    def hessian(self, linear: str) -> torch.Tensor | None:
        canonical = self.meta["aliases"].get(linear)
        return None if canonical is None else self.tensors[f"{canonical}.hessian"]

    def drop_hessians(self, linears: list[str]) -> None:
        """Forget the Hessians of these Linears' inputs (their aliases' too): quantize calls it on
        statistics it owns once no later layer reads them, so none held in memory stays resident
        through the rest of the run (about 400 MB of fp32 on the demo model)."""
        for linear in linears:
            canonical = self.meta["aliases"].get(linear)
            if canonical is not None:
                self.tensors.pop(f"{canonical}.hessian", None)

    def fisher(self, linear: str) -> torch.Tensor | None:
        """``linear``'s output Fisher diagonal float32 ``[N]``; None in stats written without it."""
        return self.tensors.get(f"{linear}.fisher")

    @functools.cached_property
    def has_fisher(self) -> bool:
        """Whether they carry the output Fisher (stats files written before it existed do not)."""
        return any(name.endswith(".fisher") for name in self.tensors)

    def close(self) -> None:
        """Remove the calibration files they own now (statistics collected in this process)."""
        if isinstance(self.tensors, StatsTensors):
            self.tensors.close()


def spill_folder(near: Path | None) -> Path:
    """A fresh name for calibration's per-layer files, not yet created (the caller makes it inside
    its cleanup, so a stop at any moment leaves nothing): hidden next to ``near`` (an output), named
    like the output's staging folders so a later run removes it if this process dies; else in the
    system's temporary folder."""
    tag = f"{os.getpid()}-calib-{uuid.uuid4().hex[:8]}"
    if near is None:
        return Path(tempfile.gettempdir()) / f"llmq-{tag}"
    return near.parent / f".{near.name}.partial-{tag}"


def collected(
    calibration: Calibration, meta: dict, model: ModelSource | None = None, windows: torch.Tensor | None = None,
    folder: Path | None = None,
) -> CalibStats:  # fmt: skip
    """Stats collected in this process, in the same shape as a file holds them: those calibration
    wrote to its per-layer files are read from there (``folder``, removed with the stats)."""
    held = {}
    for name, stats in calibration.stats.items():
        held[f"{name}.hessian"] = stats.hessian().contiguous()
        held[f"{name}.sq_mean"] = stats.sq_mean().contiguous()
    for name, fisher in calibration.fisher.items():
        held[f"{name}.fisher"] = fisher.contiguous()
    tensors = StatsTensors(calibration.files, held, folder)
    return CalibStats({**meta, "aliases": calibration.aliases}, tensors, model=model, windows=windows)


def write_stats(path: Path, stats: CalibStats) -> CalibStats:
    """Write atomically (a temporary file in the same folder, then rename), one tensor in memory
    at a time; returns the stats read from ``path`` (the caller's own may then be closed)."""
    record = {"format": STATS_FORMAT, "version": STATS_VERSION, **stats.meta}
    tensors = stats.tensors
    headers = {name: _header_of(tensors, name) for name in tensors}
    tmp = path.parent / f".{path.name}.partial-{os.getpid()}"
    try:
        with writing(path, "the statistics"):
            write_streamed(tmp, headers, tensors.__getitem__, {_META_KEY: json.dumps(record)})
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    files = dict.fromkeys(headers, path)
    return replace(stats, tensors=StatsTensors(files), path=path)


def _header_of(tensors, name: str) -> Header:
    if isinstance(tensors, StatsTensors):
        return tensors.header(name)
    tensor = tensors[name]
    return tensor.dtype, tuple(tensor.shape)


def read_stats(path: Path, fingerprint: str) -> CalibStats:
    """Open and validate a stats file for the model with this fingerprint: its manifest, the alias
    table, every tensor's dtype and shape, and the Fisher values (small) now; each Hessian's values
    when it is read (:class:`StatsTensors`), so a file larger than memory is never read whole."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise StatsFileError(f"calibration stats file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(_META_KEY)
            names = list(f.keys())
    except (SafetensorError, OSError) as err:
        raise StatsFileError(f"{path}: not a readable safetensors stats file ({err})") from err
    try:
        meta = json.loads(raw) if raw else None
    except json.JSONDecodeError as err:
        raise StatsFileError(f"{path}: its manifest is not valid JSON") from err
    if not isinstance(meta, dict) or meta.get("format") != STATS_FORMAT or meta.get("version") != STATS_VERSION:
        raise StatsFileError(f"{path}: not an llmq calibration stats file (version {STATS_VERSION})")
    check_fingerprint(meta, fingerprint, str(path))
    aliases = meta.get("aliases")
    if not isinstance(aliases, dict):
        raise StatsFileError(f"{path}: manifest has no alias table")
    tensors = StatsTensors(dict.fromkeys(names, path))
    for linear, canonical in aliases.items():
        name = f"{canonical}.hessian"
        shape = tensors.header(name)[1] if name in tensors else None
        if shape is None or len(shape) != 2 or shape[0] != shape[1]:
            raise StatsFileError(f"{path}: the Hessian for {linear} is missing or corrupt")
    for name in [n for n in names if n.endswith(".fisher")]:  # small: read, and so checked, now
        if len(tensors.header(name)[1]) != 1:
            raise StatsFileError(f"{path}: the output Fisher {name} is corrupt (want finite, non-negative, 1-D)")
        tensors.verify(name)
    return CalibStats(meta, tensors, path)


def check_fingerprint(meta: dict, fingerprint: str, where: str) -> None:
    """Refuse statistics (their manifest ``meta``) collected from another model than ``fingerprint``'s."""
    if meta.get("model_fingerprint") != fingerprint:
        raise StatsFileError(
            f"{where} was made for another model ({meta.get('model', '?')}); run `llmq calibrate` for this one"
        )

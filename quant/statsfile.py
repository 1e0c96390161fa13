"""The calibration stats file: safetensors holding per-Linear input statistics, with a small manifest.

Tensors: ``<linear>.hessian`` (float32 ``[K, K]``, ``E[x xᵀ]``) and ``<linear>.sq_mean`` (float32
``[K]``, ``E[x²]``) for each *canonical* Linear; Linears reading the same input point to it
through ``aliases``. ``<linear>.fisher`` (float32 ``[N]``, every Linear: outputs are not shared)
is the diagonal of its output Fisher (:mod:`llmq.quant.sensitivity`); files written before it
existed lack it and still load. The manifest, in the safetensors metadata under ``llmq_calib``, records the
model fingerprint, text source, samples, sequence length, seed and token count, so one file can
serve many ``quantize`` runs (like llama.cpp's imatrix) and is refused for any other model.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from llmq.errors import StatsFileError
from llmq.quant.calibrate import Calibration
from llmq.quant.writer import writing
from llmq.runtime.sources.models import ModelSource

STATS_FORMAT = "llmq-calib"
STATS_VERSION = 1
_META_KEY = "llmq_calib"


INLINE = "inline"  # how the manifest names statistics collected in the quantize run itself


@dataclass(frozen=True)
class CalibStats:
    """Per-Linear input statistics: ``tensors`` by name (``<linear>.hessian`` float32 ``[K, K]`` and
    ``<linear>.sq_mean`` float32 ``[K]``), ``meta`` the stats manifest (with its ``aliases``)."""

    meta: dict
    tensors: dict[str, torch.Tensor]
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
        """Free the Hessians of these Linears' inputs (their aliases' too): quantize calls it on
        statistics it owns once no later layer reads them, so they do not stay resident through
        the rest of the run (about 400 MB of fp32 on the demo model)."""
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


def in_memory(
    calibration: Calibration, meta: dict, model: ModelSource | None = None, windows: torch.Tensor | None = None
) -> CalibStats:
    """Stats collected in this process, in the same shape as a file holds them."""
    tensors = {}
    for name, stats in calibration.stats.items():
        tensors[f"{name}.hessian"] = stats.hessian().contiguous()
        tensors[f"{name}.sq_mean"] = stats.sq_mean().contiguous()
    for name, fisher in calibration.fisher.items():
        tensors[f"{name}.fisher"] = fisher.contiguous()
    return CalibStats({**meta, "aliases": calibration.aliases}, tensors, model=model, windows=windows)


def write_stats(path: Path, stats: CalibStats) -> CalibStats:
    """Write atomically (a temporary file in the same folder, then rename); returns the stats with
    their ``path`` set."""
    from safetensors.torch import save_file

    record = {"format": STATS_FORMAT, "version": STATS_VERSION, **stats.meta}
    tmp = path.parent / f".{path.name}.partial-{os.getpid()}"
    try:
        with writing(path, "the statistics"):
            save_file(stats.tensors, str(tmp), metadata={_META_KEY: json.dumps(record)})
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return replace(stats, path=path)


def read_stats(path: Path, fingerprint: str) -> CalibStats:
    """Load and validate a stats file for the model with this fingerprint."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise StatsFileError(f"calibration stats file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(_META_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
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
    for linear, canonical in aliases.items():
        h = tensors.get(f"{canonical}.hessian")
        if h is None or h.dim() != 2 or h.shape[0] != h.shape[1] or not torch.isfinite(h).all():
            raise StatsFileError(f"{path}: the Hessian for {linear} is missing or corrupt")
    for name, tensor in tensors.items():
        if name.endswith(".fisher") and (tensor.dim() != 1 or not torch.isfinite(tensor).all() or (tensor < 0).any()):
            raise StatsFileError(f"{path}: the output Fisher {name} is corrupt (want finite, non-negative, 1-D)")
    return CalibStats(meta, tensors, path)


def check_fingerprint(meta: dict, fingerprint: str, where: str) -> None:
    """Refuse statistics (their manifest ``meta``) collected from another model than ``fingerprint``'s."""
    if meta.get("model_fingerprint") != fingerprint:
        raise StatsFileError(
            f"{where} was made for another model ({meta.get('model', '?')}); run `llmq calibrate` for this one"
        )

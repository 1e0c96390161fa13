"""``quantize``: stream a HF model from its safetensors, one decoder layer at a time, into an artifact.

Only one work unit (a decoder layer, or the remaining tensors) is in memory at once: tensors are
read from the memory-mapped source files by name, quantized or cast, written as one shard and
dropped. The module tree comes from a meta-device skeleton built from the config, so no weights
are allocated to discover which Linears exist.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from llmq import __version__
from llmq.errors import InterruptedRun, ModelSourceError, NonFiniteWeightError, ResumeError, StatsFileError
from llmq.quant.budget import allocate
from llmq.quant.config import QuantConfig, Selection
from llmq.quant.linear import hessian_score, plan_layout, quantize_weight
from llmq.quant.statsfile import CalibStats
from llmq.quant.writer import ArtifactWriter, check_output, find_checkpoints, remove_stale_staging
from llmq.runtime.format import artifact as A
from llmq.runtime.format import dtypes
from llmq.runtime.format.accounting import Accounting, account
from llmq.runtime.format.layout import LinearLayout
from llmq.runtime.format.manifest import SHARD_PATTERN, DenseEntry, FileRecord, LinearEntry, Manifest, SourceRecord
from llmq.runtime.sources.checkpoint import expected_params, model_files, read_tensor, source_keys
from llmq.runtime.sources.models import ModelSource

_LAYER = re.compile(r"\.layers\.(\d+)\.")
REST = "rest"


@dataclass(frozen=True)
class Plan:
    """What a quantize run will write: layouts of the selected Linears and the dense tensors."""

    linears: dict[str, LinearLayout]
    biases: dict[str, str]  # linear name -> bias tensor name
    dense: dict[str, tuple[torch.dtype, tuple[int, ...]]]
    key_files: dict[str, Path]  # tensor name -> source safetensors file
    units: list[str]  # "0", "1", ... then "rest"
    scores: dict[str, torch.Tensor] | None = None  # channel scores the budget used; reused to pick stripes

    def accounting(self) -> Accounting:
        return account(self.linears, self.dense)


def make_plan(
    source: ModelSource,
    model_config,
    config: QuantConfig,
    dense_dtype: torch.dtype | None,
    stats: CalibStats | None = None,
) -> Plan:
    """The layouts to write. With ``config.target_bits`` the stripes are spread over the Linears by
    :mod:`llmq.quant.budget`, scored with the Hessians in ``stats`` if given (one extra read of
    every weight); otherwise every Linear gets the config's stripe fraction."""
    skeleton = _skeleton(model_config)
    key_files = source_keys(source.path)
    params = expected_params(skeleton, key_files)
    linears, biases = {}, {}
    for name, module in skeleton.named_modules():
        if isinstance(module, torch.nn.Linear) and config.selects(name) and f"{name}.weight" in params:
            linears[name] = plan_layout(module.out_features, module.in_features, config)
            if module.bias is not None:
                biases[name] = f"{name}.bias"
    if not linears:
        raise ModelSourceError(
            f"{source.spec} has no quantizable Linear layers matching {list(config.include)}"
            f"{' minus ' + str(list(config.exclude)) if config.exclude else ''}; check --include/--exclude"
        )
    quantized = {f"{n}.weight" for n in linears}
    dense = {}
    for key, shape_dtype in params.items():
        if key not in quantized:
            dtype, shape = shape_dtype
            dense[key] = (dense_dtype or _default_dense_dtype(dtype), shape)
    units = sorted({unit_of(k) for k in params} - {REST}, key=int) + [REST]
    scores = None
    if config.target_bits is not None:
        scores = _channel_scores(linears, key_files, config, stats)
        factories = {
            name: (lambda k4, n=lay.out_features, k=lay.in_features: plan_layout(n, k, config, k4))
            for name, lay in linears.items()
        }
        linears = allocate(factories, scores, config.target_bits)
    return Plan(linears, biases, dense, {k: key_files[k] for k in params}, units, scores)


def _channel_scores(linears, key_files, config: QuantConfig, stats) -> dict[str, torch.Tensor]:
    """One read of every selected weight: each channel's 2-bit-over-4-bit error (Hessian-weighted if known)."""
    scores = {}
    for name, layout in linears.items():
        weight = read_tensor(key_files, f"{name}.weight").float()
        scores[name] = hessian_score(weight, _hessian(stats, name, layout.in_features), config)
    return scores


def _default_dense_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16


def unit_of(key: str) -> str:
    """The work unit (shard) a tensor belongs to: its decoder layer index, or "rest"."""
    match = _LAYER.search(key)
    return match.group(1) if match else REST


def _skeleton(model_config):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_config)


def quantize_model(
    source: ModelSource,
    out: Path,
    config: QuantConfig,
    plan: Plan,
    force: bool = False,
    on_unit: Callable[[int, int, str], None] | None = None,
    stats: CalibStats | None = None,
    device: torch.device | None = None,
    resume: bool = False,
    log: Callable[[str], None] = lambda message: None,
    stop: Callable[[], None] = lambda: None,
) -> Manifest:
    """Run the plan and write the artifact atomically; returns its manifest. GPTQ runs on ``device``.

    With ``stats`` every Linear is quantized with its Hessian (ranked stripes + GPTQ); a Linear
    the stats do not cover is an error, never a silent fall back to round-to-nearest. With
    ``resume`` an interrupted run of the same fingerprint continues from its last finished unit;
    the result is the same bytes as an uninterrupted run. ``stop()`` is called before each source
    tensor is read and raises ``KeyboardInterrupt`` when the run should end there.
    """
    check_output(out, force)
    fingerprint = run_fingerprint(source, config, plan, stats)
    writer = _open_writer(out, force, fingerprint, resume, log)
    for path in remove_stale_staging(out):
        log(f"removed {path.name}, left by an earlier run that did not finish")
    try:
        _write_units(plan, config, writer, on_unit, stats, device, fingerprint, stop)
        for file in hf_files(source.path):
            writer.copy_file(file)
        return writer.commit(_manifest(source, config, plan, stats, device))
    except KeyboardInterrupt:
        if not writer.units_done:
            writer.abort()
            raise
        kept = writer.stop()
        raise InterruptedRun(
            f"interrupted after {len(writer.units_done)} of {len(plan.units)} units; they are kept in "
            f"{kept.name} next to {out.name}. Run the same command with --resume to continue, "
            "or without it to start over (which removes them)"
        ) from None
    except BaseException:
        writer.abort()
        raise


def run_fingerprint(source: ModelSource, config: QuantConfig, plan: Plan, stats: CalibStats | None) -> str:
    """What makes two runs produce the same artifact: source files, settings, layouts, calibration."""
    files = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in model_files(source.path)}
    calibration = None
    if stats is not None:
        where = stats.file_label if stats.path is None else [stats.path.stat().st_size, stats.path.stat().st_mtime_ns]
        calibration = {"meta": stats.provenance, "file": where}
    document = {
        "llmq": __version__,
        "source": files,
        "config": config.to_json(),
        "linears": {name: layout.to_json() for name, layout in plan.linears.items()},
        "dense": {key: [dtypes.name(dtype), list(shape)] for key, (dtype, shape) in plan.dense.items()},
        "calibration": calibration,
    }
    return hashlib.sha256(json.dumps(document, sort_keys=True, default=str).encode()).hexdigest()


def _open_writer(out: Path, force: bool, fingerprint: str, resume: bool, log) -> ArtifactWriter:
    checkpoints = find_checkpoints(out)
    if not resume:
        for c in checkpoints:
            log(f"an interrupted run's {len(c.units_done)} finished unit(s) in {c.staging.name} are discarded "
                "(--resume would continue from them)")  # fmt: skip
        return ArtifactWriter(out, force)
    if not checkpoints:
        log("--resume: no interrupted run of this output to continue; starting from the first unit")
        return ArtifactWriter(out, force)
    match = next((c for c in checkpoints if c.fingerprint == fingerprint), None)
    if match is None:
        raise ResumeError(
            f"--resume: the interrupted run in {checkpoints[0].staging.name} used a different model, settings or "
            "calibration; run without --resume to start over"
        )
    log(f"resuming from {match.staging.name}: {len(match.units_done)} unit(s) already done")
    return ArtifactWriter(out, force, resume_from=match)


def _hessian(stats: CalibStats | None, linear: str, in_features: int) -> torch.Tensor | None:
    if stats is None:
        return None
    hessian = stats.hessian(linear)
    if hessian is None or hessian.shape != (in_features, in_features):
        raise StatsFileError(f"{stats.file_label} has no Hessian of size {in_features} for {linear}; recalibrate")
    return hessian


def _write_units(
    plan: Plan, config: QuantConfig, writer: ArtifactWriter, on_unit, stats, device, fingerprint: str, stop
) -> None:
    """Each unit's tensors, quantized or cast, as shard ``SHARD_PATTERN.format(unit index)``."""
    by_unit: dict[str, list[str]] = {u: [] for u in plan.units}
    for key in plan.key_files:
        by_unit[unit_of(key)].append(key)
    for index, unit in enumerate(plan.units):
        if unit in writer.units_done:
            if on_unit is not None:
                on_unit(index + 1, len(plan.units), unit)
            continue
        tensors: dict[str, torch.Tensor] = {}
        for key in sorted(by_unit[unit]):
            stop()
            value = read_tensor(plan.key_files, key)
            linear = key.removesuffix(".weight")
            if key.endswith(".weight") and linear in plan.linears:
                hessian = _hessian(stats, linear, plan.linears[linear].in_features)
                # The budget's scores pick the channels too, unless range selection was asked for.
                by_budget = plan.scores and config.selection != Selection.range
                scores = plan.scores.get(linear) if by_budget else None
                layout, packed = quantize_weight(key, value, config, hessian, plan.linears[linear], scores, device)
                assert layout == plan.linears[linear]
                tensors.update({f"{linear}.{suffix}": t for suffix, t in packed.items()})
            else:
                if not torch.isfinite(value.float()).all():
                    raise NonFiniteWeightError(f"tensor {key} holds NaN/Inf; fix the checkpoint before quantizing")
                tensors[key] = value.to(plan.dense[key][0])
                if not torch.isfinite(tensors[key].float()).all():
                    raise NonFiniteWeightError(
                        f"tensor {key} overflows {plan.dense[key][0]}; pass --dense-dtype bf16 or fp32"
                    )
        writer.write_shard(index, tensors)
        writer.checkpoint(fingerprint, unit)
        if on_unit is not None:
            on_unit(index + 1, len(plan.units), unit)


def hf_files(folder: Path) -> list[Path]:
    files = []
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix in A.HF_FILE_SUFFIXES and path.name not in A.HF_FILE_EXCLUDE:
            if path.suffix == ".json":
                try:
                    json.loads(path.read_text(encoding="utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as err:
                    raise ModelSourceError(f"{path} is not valid JSON ({err})") from err
            files.append(path)
    if not any(p.name == "config.json" for p in files):
        raise ModelSourceError(f"{folder} has no config.json to copy into the artifact")
    return files


def _source_files(folder: Path) -> dict[str, FileRecord]:
    return {p.name: FileRecord(A.sha256_file(p), p.stat().st_size) for p in model_files(folder)}


def _manifest(source: ModelSource, config: QuantConfig, plan: Plan, stats: CalibStats | None, device) -> Manifest:
    def shard(key: str) -> str:
        return SHARD_PATTERN.format(plan.units.index(unit_of(key)))

    calibration = None
    if stats is not None:
        calibration = stats.provenance | {"file": stats.file_label, "gptq_device": str(device or torch.device("cpu"))}
    return Manifest(
        linears={
            name: LinearEntry(shard(f"{name}.weight"), layout, plan.biases.get(name))
            for name, layout in plan.linears.items()
        },
        dense={key: DenseEntry(shard(key), dtype, shape) for key, (dtype, shape) in plan.dense.items()},
        files={},  # the writer fills these in as it writes them
        llmq_version=__version__,
        source=SourceRecord(source.spec, source.kind.value, source.label, source.revision, _source_files(source.path)),
        quantization=config.to_json(),
        calibration=calibration,
        accounting_record=plan.accounting().to_json(),
    )

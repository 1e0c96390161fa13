"""``quantize``: stream a HF model from its safetensors, one decoder layer at a time, into an artifact.

Only one work unit (a decoder layer, or the remaining tensors) is in memory at once: tensors are
read from the memory-mapped source files by name, quantized or cast, written as one shard and
dropped. What is written is decided beforehand by :mod:`llmq.quant.plan`.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from llmq import __version__
from llmq.errors import InterruptedRun, ModelSourceError, NonFiniteWeightError, ResumeError, UsageError
from llmq.quant import reconstruct
from llmq.quant.config import QuantConfig, Refine, RefineCodes, Selection
from llmq.quant.linear import quantize_weight
from llmq.quant.plan import Plan
from llmq.quant.plan import hessian as plan_hessian
from llmq.quant.statsfile import CalibStats
from llmq.quant.stream import LayerStream
from llmq.quant.writer import ArtifactWriter, check_output, find_checkpoints, remove_stale_staging
from llmq.runtime.format import artifact as A
from llmq.runtime.format import card, dtypes, hub
from llmq.runtime.format.manifest import SHARD_PATTERN, DenseEntry, FileRecord, LinearEntry, Manifest, SourceRecord
from llmq.runtime.sources.checkpoint import model_files
from llmq.runtime.sources.feedback import LOGGED, ProgressUpdate
from llmq.runtime.sources.models import ModelSource


def quantize_model(
    source: ModelSource,
    out: Path,
    config: QuantConfig,
    plan: Plan,
    force: bool = False,
    progress: Callable[[str], AbstractContextManager[ProgressUpdate]] = LOGGED.progress,
    stats: CalibStats | None = None,
    device: torch.device | None = None,
    resume: bool = False,
    log: Callable[[str], None] = lambda message: None,
    stop: Callable[[], None] = lambda: None,
    refinement: Refinement | None = None,
    stage: Callable[[str, float], None] = lambda name, seconds: None,
    own_stats: bool = False,
) -> Manifest:
    """Run the plan and write the artifact atomically; returns its manifest. GPTQ runs on ``device``.

    With ``stats`` every Linear is quantized with its Hessian (ranked stripes + GPTQ); a Linear
    the stats do not cover is an error, never a silent fall back to round-to-nearest. With
    ``config.refine`` block, the decoder blocks are then tuned on ``refinement``'s windows
    (:mod:`llmq.quant.reconstruct`). With ``resume`` an interrupted run of the same fingerprint
    continues from its last finished unit or block; the result is the same bytes as an
    uninterrupted run. ``stop()`` is called before each source tensor is read and each refinement
    step, and raises ``KeyboardInterrupt`` when the run should end there. ``stage(name, seconds)``
    reports the wall time of the quantize and refine stages. With ``own_stats`` the caller hands
    ``stats`` over: each layer's Hessians are freed once the last layer that reads them is written.
    """
    check_output(out, force)
    refining = config.refine is not None and config.refine.tunes  # None: not resolved by for_run, nothing to tune
    if refining and refinement is None:
        raise UsageError(
            f"--refine {config.refine.value} needs the calibration windows to tune on; add --calib-data or --calib"
        )
    fingerprint = run_fingerprint(source, config, plan, stats)
    writer = _open_writer(out, force, fingerprint, resume, log)
    for path in remove_stale_staging(out):
        log(f"removed {path.name}, left by an earlier run that did not finish")
    try:
        start = time.perf_counter()
        with progress("quantizing layers") as update:
            _write_units(plan, config, writer, update, stats, device, fingerprint, stop, release=own_stats)
        stage("quantize", time.perf_counter() - start)
        if refining and TUNED_E2E not in writer.units_done:
            start = time.perf_counter()
            with progress("refining blocks") as update:
                stream, stack = _refine_units(source, plan, config, writer, refinement, device, fingerprint,
                                              update, log, stop)  # fmt: skip
            stage("refine", time.perf_counter() - start)
            if stack is not None:
                start = time.perf_counter()
                with progress("tuning end to end") as update:
                    _tune_end_to_end(stream, stack, config, writer, update, log, stop)
                writer.checkpoint(fingerprint, TUNED_E2E)
                stage("e2e", time.perf_counter() - start)
        if E2E_FILE in writer.files:
            _apply_end_to_end(plan, writer, fingerprint)
        manifest = _manifest(source, config, plan, stats, device)
        _write_hf_files(writer, source.path, manifest)
        return writer.commit(manifest)
    except KeyboardInterrupt:
        if not writer.units_done:
            writer.abort()
            raise
        kept = writer.stop()
        refined = sum(u.startswith(REFINED) for u in writer.units_done)
        done = f"{sum(u in plan.units for u in writer.units_done)} of {len(plan.units)} units"
        if refining:
            done += f" and refining {refined} of {len(plan.units) - 1} blocks"
        raise InterruptedRun(
            f"interrupted after {done}; they are kept in "
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


def _write_units(
    plan: Plan, config: QuantConfig, writer: ArtifactWriter, update, stats, device, fingerprint: str, stop,
    release: bool = False,
) -> None:  # fmt: skip
    """Each unit's tensors, quantized or cast, as shard ``SHARD_PATTERN.format(unit index)``; with
    ``release``, the Hessians no later unit reads are freed after each unit."""
    sources = {plan.matrices[name].param if plan.matrices[name].expert is None else name: name for name in plan.linears}
    by_unit: dict[str, list[str]] = {u: [] for u in plan.units}
    for key in [*plan.dense, *sources]:
        by_unit[plan.unit(key)].append(key)
    linears = [[sources[key] for key in by_unit[unit] if key in sources] for unit in plan.units]
    finished = _last_readers(linears, stats.meta["aliases"]) if release and stats is not None else None
    for index, unit in enumerate(plan.units):
        if unit not in writer.units_done:
            tensors: dict[str, torch.Tensor] = {}
            for key in sorted(by_unit[unit]):
                stop()
                if key in sources:
                    tensors.update(_quantized(plan, sources[key], config, stats, device, stop))
                else:
                    tensors[key] = _dense(plan, key)
            writer.write_shard(index, tensors)
            writer.checkpoint(fingerprint, unit)
        if finished is not None:
            stats.drop_hessians(finished[index])
        update(index + 1, len(plan.units))


def _last_readers(linears: list[list[str]], aliases: dict[str, str]) -> list[list[str]]:
    """For each unit (its Linears in ``linears``), the Linears whose input Hessian no later unit reads."""
    last = {aliases.get(name, name): index for index, names in enumerate(linears) for name in names}
    return [[name for name in names if last[aliases.get(name, name)] == index] for index, names in enumerate(linears)]


REFINED = "refined:"  # the checkpoint's name of a refined block: this prefix and its unit
# The end-to-end stage tunes every layer at once, so its result is first saved whole in a side file
# (checkpoint TUNED_E2E), then merged into the shards (each checkpointed) and the side file discarded
# (APPLIED_E2E): a run stopped in between resumes by merging the side file again, never by tuning
# again from half-rewritten shards.
TUNED_E2E, APPLIED_E2E, E2E_FILE = "tuned:e2e", "applied:e2e", "e2e-tuned.safetensors"


@dataclass(frozen=True)
class Refinement:
    """What block-wise refinement tunes on: the calibration ``windows`` ([S, L] token ids) of the
    model whose transformers config is ``model_config``."""

    windows: torch.Tensor
    model_config: object


def _read_shard(writer: ArtifactWriter, index: int) -> dict[str, torch.Tensor]:
    return load_file(str(writer.staging / SHARD_PATTERN.format(index)))


def _shards(writer: ArtifactWriter, fingerprint: str) -> reconstruct.Shards:
    return reconstruct.Shards(
        read=lambda index: _read_shard(writer, index),
        write=writer.write_shard,
        done=lambda unit: REFINED + unit in writer.units_done,
        finish=lambda unit: writer.checkpoint(fingerprint, REFINED + unit),
    )


def _refine_units(source, plan: Plan, config: QuantConfig, writer: ArtifactWriter, refinement: Refinement, device,
                  fingerprint: str, update, log, stop) -> tuple[LayerStream, reconstruct.Stack | None]:  # fmt: skip
    """Block-wise reconstruction of every decoder layer's shard, in place, each checkpointed. Returns
    the stream and, for ``--refine e2e``, the refined layers for the end-to-end stage."""
    shards = _shards(writer, fingerprint)

    def on_block(report: reconstruct.BlockReport, total: int) -> None:
        update(report.index + 1, total)
        r = report.result
        if r is not None and not r.kept:
            log(f"refine: block {report.index} kept GPTQ's numbers (held-aside error {r.after:.4g} is not "
                f"below GPTQ's {r.before:.4g})")  # fmt: skip

    stream = LayerStream(source, refinement.model_config, refinement.windows, device or torch.device("cpu"))
    keep = config.refine == Refine.e2e
    reports, stack = reconstruct.refine_blocks(stream, plan, shards, config.refine_settings, on_block, stop, keep)
    results = [r.result for r in reports if r.result is not None]  # None: refined by an interrupted run
    if results:
        before = sum(r.before for r in results) / len(results)
        after = sum(r.after if r.kept else r.before for r in results) / len(results)
        lean = ""
        if config.refine_settings.codes == RefineCodes.lean:
            lean = f" ({sum(r.lean for r in results)} with codes from the leaning start)"
        log(f"refine: {sum(r.kept for r in results)} of {len(results)} blocks kept their tuned numbers{lean}; "
            f"held-aside error {before:.4g} -> {after:.4g} (mean over blocks)")  # fmt: skip
    return stream, stack


def _tune_end_to_end(stream: LayerStream, stack: reconstruct.Stack, config: QuantConfig, writer: ArtifactWriter,
                     update, log, stop) -> None:  # fmt: skip
    """The end-to-end stage (:mod:`llmq.quant.e2e`); its result, if kept, saved as the side file."""
    from llmq.quant.e2e import tune_end_to_end

    result = tune_end_to_end(stream, stack, config.refine_settings, stop, update)
    verdict = "kept" if result.kept else "not kept (the blocks' numbers stay)"
    log(f"e2e: held-aside KL to the fp32 model's top tokens {result.before:.4g} -> {result.after:.4g}, {verdict}")
    if result.kept:
        tuned = {}
        for trainables, norms in zip(stack.trainables, stack.norms, strict=True):
            tuned.update(reconstruct.stored_tensors(trainables, norms))
        writer.write_side(E2E_FILE, tuned)


def _apply_end_to_end(plan: Plan, writer: ArtifactWriter, fingerprint: str) -> None:
    """Merge the end-to-end stage's side file into the layers' shards (each checkpointed), then discard it."""
    tuned = load_file(str(writer.staging / E2E_FILE))
    by_shard: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in tuned.items():
        by_shard.setdefault(plan.units.index(plan.unit(key)), {})[key] = tensor
    for shard, tensors in sorted(by_shard.items()):
        writer.write_shard(shard, _read_shard(writer, shard) | tensors)
        writer.checkpoint(fingerprint, f"{APPLIED_E2E}:{plan.units[shard]}")
    writer.discard(E2E_FILE, fingerprint, APPLIED_E2E)


def _quantized(plan: Plan, linear: str, config: QuantConfig, stats, device, stop) -> dict[str, torch.Tensor]:
    layout = plan.linears[linear]
    # The budget's scores pick the channels too, unless range selection was asked for.
    by_budget = plan.scores and config.selection != Selection.range
    scores = plan.scores.get(linear) if by_budget else None
    hessian = plan_hessian(stats, linear, layout.in_features)
    label = plan.matrices[linear].label
    packed_layout, packed = quantize_weight(label, plan.weight(linear), config, hessian, layout, scores, device, stop)
    assert packed_layout == layout
    return {f"{linear}.{suffix}": t for suffix, t in packed.items()}


def _dense(plan: Plan, key: str) -> torch.Tensor:
    # isfinite on the 16-bit tensors themselves: a float32 copy of a 152k-token embedding is 0.5 GB
    value = plan.checkpoint.read(key)
    if not torch.isfinite(value).all():
        raise NonFiniteWeightError(f"tensor {key} holds NaN/Inf; fix the checkpoint before quantizing")
    stored = value.to(plan.dense[key][0])
    del value
    if not torch.isfinite(stored).all():
        raise NonFiniteWeightError(f"tensor {key} overflows {plan.dense[key][0]}; pass --dense-dtype bf16 or fp32")
    return stored


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


def _write_hf_files(writer: ArtifactWriter, folder: Path, manifest: Manifest) -> None:
    """The source's config and tokenizer files (``config.json`` with llmq's ``quantization_config``),
    then llmq's own HF files: the shards' index and the model card. All before the manifest, whose
    checksums cover them (docs/format.md)."""
    for file in hf_files(folder):
        if file.name == "config.json":
            writer.write_text(file.name, hub.config_with_quantization(file.read_text(encoding="utf-8"), str(file)))
        else:
            writer.copy_file(file)
    writer.write_text(A.WEIGHTS_INDEX, hub.weights_index(manifest))
    writer.write_text(A.CARD, card.render_card(manifest))


def _source_files(folder: Path) -> dict[str, FileRecord]:
    return {p.name: FileRecord(A.sha256_file(p), p.stat().st_size) for p in model_files(folder)}


def _manifest(source: ModelSource, config: QuantConfig, plan: Plan, stats: CalibStats | None, device) -> Manifest:
    def shard(key: str) -> str:
        return SHARD_PATTERN.format(plan.units.index(plan.unit(key)))

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

"""The quantizer's public API: calibrate a model, estimate a quantize run, and quantize into an artifact.

``llmq calibrate`` and ``llmq quantize`` are option parsing around these; every rule on which
options go together lives here, so a script gets the same errors as the shell. ``import llmq``
re-exports them (``llmq.quantize``, ``llmq.calibrate``, ``llmq.estimate``).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

from llmq.errors import ArtifactWriteError, OutputError, OutputExistsError, ResourceError, UsageError
from llmq.quant import forecast, pipeline, resources, statsfile, writer
from llmq.quant.calibrate import calibrate_model, calibration_windows, check_windows, window_length
from llmq.quant.config import DEFAULT_SAMPLES, Allocation, QuantConfig, Refine, RefineCodes
from llmq.quant.plan import Plan, check_target_bits, make_plan
from llmq.quant.statsfile import CalibStats
from llmq.runtime.format import dtypes
from llmq.runtime.format.accounting import Accounting
from llmq.runtime.format.manifest import Manifest
from llmq.runtime.sources import text as T
from llmq.runtime.sources.checkpoint import model_fingerprint
from llmq.runtime.sources.device import resolve_device
from llmq.runtime.sources.feedback import LOGGED, Feedback
from llmq.runtime.sources.models import ModelSource, ModelSpec, SourceKind, check_model_spec, open_model

DENSE_DTYPES = ("auto", *(d.short for d in dtypes.FLOATS))


@dataclass(frozen=True)
class CalibData:
    """Calibrate within the quantize run (``--calib-data``) instead of reading a stats file."""

    text: T.TextSpec = T.Dataset.mix  # calibration split: the built-in mix, Pride and Prejudice for austen, ...
    samples: int = DEFAULT_SAMPLES  # windows, at random offsets
    seq_len: int | None = None  # tokens per window; None: DEFAULT_SEQ_LEN, or the model's context if shorter
    seed: int = 0  # of the window offsets


# quantize()'s calibration when the caller names none: the built-in mix, unless ``calib`` is given.
DEFAULT_CALIBRATION = CalibData()


def calibrate(
    model: ModelSpec,
    text: T.TextSpec | None = None,
    *,
    out: str | os.PathLike | None = None,
    force: bool = False,
    samples: int = DEFAULT_SAMPLES,
    seq_len: int | None = None,
    seed: int = 0,
    config: QuantConfig | None = None,
    device: str = "auto",
    revision: str | None = None,
    trust_remote_code: bool = False,
    feedback: Feedback = LOGGED,
) -> CalibStats:
    """Each Linear's input statistics (Hessian ``E[x xᵀ]`` float32 ``[K, K]``, and ``E[x²]``) over
    ``samples`` windows of ``seq_len`` tokens of ``text``'s calibration split (default: the built-in mix);
    ``seq_len`` longer than the model's context is refused, and None is 512 or the context if shorter.

    The model is streamed one decoder layer at a time on ``device``. ``config.include`` and
    ``exclude`` choose the Linears. With ``out`` the statistics are also written there (a stats
    file ``quantize(calib=...)`` reads, refused for any other model); an existing file needs ``force``.
    """
    check_windows(samples, seq_len)
    out = None if out is None else Path(out)
    if out is not None and out.exists() and not force:
        raise OutputExistsError(f"{out} already exists; pass --force to replace it")
    if out is not None and not out.parent.is_dir():
        raise OutputError(f"the output's folder {out.parent} does not exist")
    if out is not None:
        for path in writer.remove_stale_staging(out):
            feedback.info(f"removed {path.name}, left by an earlier run that did not finish")
    stats = _collect(model, text, samples, seq_len, seed, config or QuantConfig(), device, revision,
                     trust_remote_code, feedback, near=out)  # fmt: skip
    if out is None:
        return stats
    try:
        return statsfile.write_stats(out, stats)
    finally:
        stats.close()


def _collect(model, text, samples, seq_len, seed, config, device, revision, trust_remote_code, feedback,
             source: ModelSource | None = None, model_config=None, near: Path | None = None) -> CalibStats:  # fmt: skip
    """Calibration on ``model`` (already resolved when ``source`` is given). Its per-layer files go
    to a hidden folder next to ``near`` (the output), or to the system's temporary folder; the
    returned statistics own that folder (:meth:`CalibStats.close` removes it)."""
    torch_device = resolve_device(device)
    early = None
    if source is None:
        check_model_spec(model, revision)
        early = T.load_local_first(text, T.Split.calib, T.Dataset.mix)
        source, model_config = open_model(model, revision, trust_remote_code, feedback)
    seq_len = window_length(seq_len, model_config, feedback.info)
    loaded = early or T.load(text, T.Split.calib, T.Dataset.mix)
    feedback.info(f"calibration: {loaded.source}, {samples} samples x {seq_len} tokens, seed {seed}, on {torch_device}")
    folder = statsfile.spill_folder(near)
    try:
        folder.mkdir()
        with feedback.steps("calibrating layers (forward, then back)") as step, feedback.stoppable() as check:
            calibration, meta, windows = calibrate_model(
                source, model_config, config, loaded.source, loaded.text, samples, seq_len, seed,
                on_layer=step, device=torch_device, log=feedback.info, stop=check, spill=folder, stage=feedback.stage,
            )  # fmt: skip
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return statsfile.collected(calibration, meta, source, windows, folder)


@dataclass(frozen=True)
class QuantizeEstimate:
    """What a quantize run would write and need (``quantize --dry-run``); nothing is written."""

    source: ModelSource
    config: QuantConfig  # as the run would use it
    accounting: Accounting  # bits per weight, per layer and in total
    resources: resources.Estimate  # disk and peak memory
    calibration: dict | None  # the stats file's provenance, when one was given

    def to_json(self) -> dict:
        document = {"model": self.source.to_json(), "dry_run": True, "config": self.config.to_json()}
        document["accounting"] = self.accounting.to_json()
        if self.calibration:
            document["calibration"] = self.calibration
        document["estimate"] = self.resources.to_json()
        return document


@dataclass(frozen=True)
class _Prepared:
    source: ModelSource
    model_config: object  # the transformers config
    config: QuantConfig
    plan: Plan
    stats: CalibStats | None
    needs: resources.Estimate


def _prepare(model, out: Path, config, calib, calib_data, dense_dtype, device, force, revision, trust_remote_code,
             feedback: Feedback, dry_run: bool, memory_check: bool = True) -> _Prepared:  # fmt: skip
    """Every check that needs no weights, then the model resolved, the run's disk and memory
    checked, calibration, and the plan."""
    config = config or QuantConfig()
    config.check()
    resolve_device(device)
    if dense_dtype not in DENSE_DTYPES:
        raise UsageError(f"--dense-dtype {dense_dtype!r} must be one of {', '.join(DENSE_DTYPES)}")
    if calib is not None and calib_data is DEFAULT_CALIBRATION:
        calib_data = None
    if calib is not None and calib_data is not None:
        raise UsageError("give --calib (a stats file) or --calib-data (calibrate now), not both")
    if calib_data is not None:
        check_windows(calib_data.samples, calib_data.seq_len)
    run_config = config.for_run(calibrated=calib is not None or calib_data is not None)
    if not dry_run:
        writer.check_output(out, force)
    check_model_spec(model, revision)
    source, model_config = open_model(model, revision, trust_remote_code, feedback)
    if source.kind == SourceKind.artifact:
        raise UsageError(f"{model} is already a quantized llmq artifact; quantize the original model instead")
    if calib_data is not None:
        calib_data = replace(calib_data, seq_len=window_length(calib_data.seq_len, model_config, feedback.info))
    stats = _stats(calib, source)
    dense = None if dense_dtype == "auto" else dtypes.BY_SHORT[dense_dtype].torch()
    settings = _run_settings(run_config, calib_data, stats)
    if not dry_run:  # before calibration: the uniform plan has every matrix's shape, read from no weight
        uniform = make_plan(source, model_config, replace(run_config, target_bits=None, allocation=Allocation.uniform),
                            dense)  # fmt: skip
        check_target_bits(uniform, run_config)
        _check_resources(resources.estimate_plan(uniform, source.path, out, forecast.Shape.of(uniform, model_config),
                                                 settings), out, memory_check, feedback.warn)  # fmt: skip
    if calib_data is not None and not dry_run:
        d = calib_data
        stats = _collect(model, d.text, d.samples, d.seq_len, d.seed, run_config, device, revision,
                         trust_remote_code, feedback, source, model_config, near=out)  # fmt: skip
    if stats is None and not dry_run:
        feedback.info(
            "no calibration (--no-calib): rounding to nearest, which loses far more accuracy at 2-3 bits than GPTQ "
            "(docs/benchmarks.md)"
        )
    spreads = run_config.target_bits is not None or 0 < run_config.stripe_fraction < 1
    provisional = dry_run and calib_data is not None and spreads and run_config.allocation != Allocation.uniform
    if provisional:
        feedback.info(
            "dry run: stripes placed without calibration data; the real run spreads the same bits by predicted KL"
        )
    start = time.perf_counter()
    plan = make_plan(source, model_config, run_config, dense, stats)
    if not dry_run:
        feedback.stage("plan", time.perf_counter() - start)
    # as the manifest records it; a dry run that cannot calibrate still reports the bits the real run aims at
    target = plan.linear_bits_per_weight() if provisional and plan.target_bits is None else plan.target_bits
    run_config = replace(run_config, target_bits=target, allocation=None)
    for note in plan.notes():
        feedback.warn(note)
    settings = replace(settings, spreads=plan.scores is not None or provisional)
    speed = forecast.measure_speed(resolve_device(device)) if dry_run else None
    needs = resources.estimate_plan(plan, source.path, out, forecast.Shape.of(plan, model_config), settings, speed)
    return _Prepared(source, model_config, run_config, plan, stats, needs)


def _run_settings(config: QuantConfig, calib_data: CalibData | None, stats: CalibStats | None) -> forecast.Settings:
    """What the run's cost depends on: calibration's windows, GPTQ, refinement's steps."""
    samples, seq_len = (calib_data.samples, calib_data.seq_len) if calib_data is not None else (0, 0)
    if stats is not None:
        samples, seq_len = stats.meta["samples"], stats.meta["seq_len"]
    r = config.refine_settings
    tunes = config.refine is not None and config.refine.tunes
    return forecast.Settings(
        samples=samples, seq_len=seq_len, refine_steps=r.steps if tunes else 0, refine_batch=r.batch,
        lean=r.codes == RefineCodes.lean, e2e_steps=r.e2e_steps if config.refine == Refine.e2e else 0,
        e2e_batch=r.e2e_batch, calibrates=calib_data is not None, spreads=True,
        gptq=calib_data is not None or stats is not None,
    )  # fmt: skip


def _check_resources(needs: resources.Estimate, out: Path, memory_check: bool, warn) -> None:
    """Refuse a run that cannot fit on the disk, or in memory unless ``memory_check`` is off."""
    problem = resources.disk_problem(needs, out)
    if problem:
        raise ArtifactWriteError(problem)
    if memory_check and needs.available_memory_bytes is None:
        warn(f"this platform does not say how much memory is free, so the run's need of about "
             f"{needs.peak_rss_bytes / 1e9:.1f} GB is not checked against it")  # fmt: skip
    problem = needs.memory_problem()
    if problem and memory_check:
        raise ResourceError(problem)


def _stats(calib: CalibStats | str | os.PathLike | None, source: ModelSource) -> CalibStats | None:
    """``calib`` as statistics for ``source``, refused if they were collected from another model."""
    if calib is None:
        return None
    if not isinstance(calib, CalibStats):
        return statsfile.read_stats(Path(calib), model_fingerprint(source.path))
    if calib.model is None or calib.model.path != source.path:  # a folder's path is cheaper than hashing it
        statsfile.check_fingerprint(calib.meta, model_fingerprint(source.path), calib.file_label)
    return calib


def estimate(
    model: ModelSpec,
    out: str | os.PathLike,
    config: QuantConfig | None = None,
    *,
    calib: CalibStats | str | os.PathLike | None = None,
    calib_data: CalibData | None = DEFAULT_CALIBRATION,
    dense_dtype: str = "auto",
    device: str = "auto",
    revision: str | None = None,
    trust_remote_code: bool = False,
    feedback: Feedback = LOGGED,
) -> QuantizeEstimate:
    """Per-layer bits per weight, artifact size, disk, and each phase's peak memory and wall time of
    :func:`quantize` with the same arguments (times from ``device``'s rates, measured in about three
    seconds, and :mod:`llmq.quant.forecast`'s counts). Writes nothing; reads weights only to rank
    stripes by sensitivity and to check a stats file's model fingerprint. ``calib_data`` is not
    collected: the per-layer stripes are placed without it (by weight error with ``target_bits``,
    uniformly otherwise) and are provisional; ``config.target_bits`` is what the real run aims at."""
    p = _prepare(model, Path(out), config, calib, calib_data, dense_dtype, device, False, revision,
                 trust_remote_code, feedback, dry_run=True)  # fmt: skip
    calibration = p.stats.provenance if p.stats is not None else None
    return QuantizeEstimate(p.source, p.config, p.plan.accounting(), p.needs, calibration)


def quantize(
    model: ModelSpec,
    out: str | os.PathLike,
    config: QuantConfig | None = None,
    *,
    calib: CalibStats | str | os.PathLike | None = None,
    calib_data: CalibData | None = DEFAULT_CALIBRATION,
    dense_dtype: str = "auto",
    device: str = "auto",
    force: bool = False,
    resume: bool = False,
    revision: str | None = None,
    trust_remote_code: bool = False,
    memory_check: bool = True,
    feedback: Feedback = LOGGED,
) -> Manifest:
    """Quantize ``model`` to range-aware mixed 2/4-bit weights and write the artifact ``out``.

    config       group sizes, stripes, rounding, GPTQ settings, Linears to quantize, ``target_bits``,
                 ``allocation`` (default: the ``mixed`` preset, :data:`llmq.quant.config.PRESETS`; when
                 calibrated, its bits are spread over the Linears by predicted KL)
    calib        statistics (from :func:`calibrate`, or a stats file's path): Hessian-ranked stripes + GPTQ
    calib_data   calibrate now on this text (default: 64 x 512 tokens of the built-in mix, unless ``calib``
                 is given); None: round to nearest without calibration (fast, much less accurate)
    dense_dtype  unquantized tensors: ``auto`` (16-bit, the source's if 16-bit), ``fp16``, ``bf16``, ``fp32``
    device       where calibration, the scale search, rounding and GPTQ run
    force        replace an existing artifact; ``resume`` continues an interrupted run of the same call
    memory_check refuse (:class:`~llmq.errors.ResourceError`), before calibrating, a run whose
                 estimated peak exceeds the memory available (:func:`estimate` shows the estimate)

    The model is streamed one decoder layer at a time; the artifact appears atomically, complete
    and checksummed. Returns its manifest (``manifest.path`` is ``out``).
    """
    out = Path(out)
    p = _prepare(model, out, config, calib, calib_data, dense_dtype, device, force, revision, trust_remote_code,
                 feedback, dry_run=False, memory_check=memory_check)  # fmt: skip
    problem = resources.disk_problem(p.needs, out)  # with the plan's exact bits this time
    if problem:
        raise ArtifactWriteError(problem)
    refinement = None
    if p.config.refine.tunes:
        meta = p.stats.meta
        windows = p.stats.windows
        if windows is None:  # a stats file records only its text's label: tokenized and sampled again
            text = T.from_source(meta["dataset"]).text
            windows = calibration_windows(p.source, text, meta["samples"], meta["seq_len"], meta["seed"])
        refinement = pipeline.Refinement(windows, p.model_config)
        where = f"{len(windows)} windows of {meta['dataset']}"
        feedback.info(f"refinement: {p.config.refine.value}, {where}, {_settings(p.config)}")
    own_stats = p.stats is not None and not isinstance(calib, CalibStats)  # collected or read here
    try:
        with feedback.stoppable() as stop:
            return pipeline.quantize_model(
                p.source, out, p.config, p.plan, force, feedback.progress, p.stats, resolve_device(device),
                resume=resume, log=feedback.info, stop=stop, refinement=refinement, stage=feedback.stage,
                own_stats=own_stats,
            )  # fmt: skip
    finally:
        if own_stats:
            p.stats.close()  # calibration's files next to the output


def _settings(config: QuantConfig) -> str:
    r = config.refine_settings
    text = (f"{r.steps} steps of {r.batch} windows, codes from {r.codes.value}, lr {r.code_lr:g}, "
            f"scale lr {r.scale_lr:g}, {r.inputs.value} inputs")  # fmt: skip
    if config.refine == Refine.e2e:
        text += f"; then end to end: {r.e2e_steps} steps of {r.e2e_batch} windows, lr {r.e2e_lr:g}"
    return text

"""``llmq eval tasks``: lm-evaluation-harness tasks on a model or an artifact that llmq loads.

llmq loads the model (an artifact's quantized Linears with the chosen backend, the demo, a HF
folder or hub id) and hands the instance to lm-eval's ``HFLM``, so the harness scores exactly the
model that ``llmq generate`` runs. Everything about a task (prompts, few-shot examples, metrics
and their standard errors) is lm-eval's own; llmq checks the request, loads the model and
reports. lm-eval is an optional extra, imported on first use: ``pip install 'llmq[tasks]'``.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import numbers
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from llmq import __version__
from llmq.errors import TaskError, UsageError
from llmq.runtime.format import dtypes
from llmq.runtime.loader import OpenedModel, open_for_run
from llmq.runtime.options import LoadOptions
from llmq.runtime.sources.families import checked_per_layer
from llmq.runtime.sources.feedback import LOGGED, Feedback
from llmq.runtime.sources.models import ModelSpec, check_model_spec

INSTALL_HINT = "pip install 'llmq[tasks]'"
# lm-eval's own default seeds, passed explicitly so the report states them and the numbers
# compare with a plain `lm-eval run` of the same tasks.
SEEDS = {"random_seed": 0, "numpy_random_seed": 1234, "torch_random_seed": 1234, "fewshot_random_seed": 1234}
DEFAULTS = LoadOptions()
# Keys of an lm-eval result row that are not metrics.
_NOT_METRICS = {"alias", "name", "sample_len", "samples"}


@dataclass(frozen=True)
class TaskMetric:
    """One metric of one task, as lm-eval aggregates it.

    name              lm-eval's metric name (``acc``, ``acc_norm``, ``exact_match``, ...)
    filter            lm-eval's filter the metric was taken after (``none`` for most tasks)
    value             the aggregate over the task's documents (a mean for accuracies, in [0, 1])
    stderr            lm-eval's standard error of ``value`` (None where it reports none)
    higher_is_better  as the task declares it (None if it does not)
    """

    name: str
    filter: str
    value: float
    stderr: float | None
    higher_is_better: bool | None

    def to_json(self) -> dict:
        return {
            "metric": self.name,
            "filter": self.filter,
            "value": self.value,
            "stderr": self.stderr,
            "higher_is_better": self.higher_is_better,
        }


@dataclass(frozen=True)
class TaskResult:
    """One row of lm-eval's results: a task, or a group aggregating its tasks.

    samples        documents scored (after ``limit``); None for a group
    samples_total  documents the task has; None for a group
    num_fewshot    few-shot examples per prompt (the task's default); None for a group
    """

    name: str
    alias: str
    kind: str  # "task" or "group"
    version: str | None
    num_fewshot: int | None
    samples: int | None
    samples_total: int | None
    metrics: list[TaskMetric]

    def metric(self, name: str, filter: str = "none") -> TaskMetric:
        """The metric ``name`` (after ``filter``); ``KeyError`` naming the ones there are."""
        for metric in self.metrics:
            if (metric.name, metric.filter) == (name, filter):
                return metric
        have = ", ".join(f"{m.name},{m.filter}" for m in self.metrics) or "none"
        raise KeyError(f"task {self.name} has no metric {name},{filter} (it has: {have})")

    def to_json(self) -> dict:
        return {
            "task": self.name,
            "alias": self.alias,
            "kind": self.kind,
            "version": self.version,
            "num_fewshot": self.num_fewshot,
            "samples": self.samples,
            "samples_total": self.samples_total,
            "metrics": [m.to_json() for m in self.metrics],
        }


@dataclass(frozen=True)
class TasksReport:
    """``llmq eval tasks``: each task's metrics with their standard errors, the protocol, timing."""

    run: OpenedModel
    protocol: dict  # tasks, limit, batch_size, include_path, lm-eval version, seeds, max_length
    results: list[TaskResult]
    load_seconds: float
    eval_seconds: float
    wall_seconds: float

    def task(self, name: str) -> TaskResult:
        """The result row of task (or group) ``name``; ``KeyError`` naming the ones there are."""
        for result in self.results:
            if result.name == name:
                return result
        raise KeyError(f"no result for {name!r} (there are: {', '.join(r.name for r in self.results)})")

    def to_json(self) -> dict:
        return {
            "command": "eval tasks",
            "llmq_version": __version__,
            "model": self.run.source.to_json(),
            "device": str(self.run.device),
            "dtype": dtypes.short(self.run.dtype),
            "backend": self.run.backend.value if self.run.backend else None,
            "protocol": self.protocol,
            "results": [r.to_json() for r in self.results],
            "timing": {
                "load_seconds": round(self.load_seconds, 3),
                "eval_seconds": round(self.eval_seconds, 3),
                "wall_seconds": round(self.wall_seconds, 3),
            },
        }


def evaluate_tasks(
    model: ModelSpec,
    tasks: str | Sequence[str],
    *,
    limit: int | None = None,
    batch_size: int = 1,
    include_path: str | os.PathLike | None = None,
    options: LoadOptions = DEFAULTS,
    feedback: Feedback = LOGGED,
) -> TasksReport:
    """Run lm-evaluation-harness ``tasks`` on ``model`` and return each task's metrics.

    model         ``"demo"``, a HF folder, a hub id or a ``.llmq`` artifact, loaded as ``llmq.load`` does
    tasks         lm-eval task, group or tag names (a list, or one comma-separated string), or
                  paths of task YAML files
    limit         score only the first ``limit`` documents of each task (None: all of them)
    batch_size    requests per forward pass
    include_path  a folder of extra task YAMLs (lm-eval's ``--include_path``); a YAML's
                  ``!function`` entries import Python files from it, so give only folders you trust

    The checks run in the order that fails fastest: the request, lm-eval's presence, MODEL, the
    task names, each task's data (a hub dataset needs network or the ``datasets`` cache), and only
    then the model's weights.
    """
    wall_start = time.perf_counter()
    names = parse_task_names(tasks)
    _check_counts(limit, batch_size)
    include = _check_include_path(include_path)
    lm_eval = _import_lm_eval()
    check_model_spec(model, options.revision)
    placement = options.placement()
    torch.manual_seed(options.seed)
    with _library_output(feedback):
        from lm_eval.tasks import TaskManager

        manager = TaskManager(include_path=str(include) if include else None)
        _check_names(names, manager)
        _check_task_data(names, manager)
        run = open_for_run(model, options, feedback, placement=placement)
        tokenizer = run.tokenizer()
        load_start = time.perf_counter()
        lm = run.load()
        harness = _harness_model(lm, tokenizer, batch_size)
        load_seconds = time.perf_counter() - load_start
        feedback.info(
            f"tasks: {', '.join(names)}" + (f" (first {limit} documents each)" if limit else "")
            + f"; running {dtypes.short(run.dtype)} on {run.device}, batch size {batch_size}"
        )  # fmt: skip
        eval_start = time.perf_counter()
        with feedback.stoppable() as check:  # a stop lands before the next decoder layer of a batch
            checked_per_layer(lm, run.config, check)
            output = lm_eval.simple_evaluate(
                model=harness, tasks=names, limit=limit, task_manager=manager, log_samples=False, **SEEDS
            )
        eval_seconds = time.perf_counter() - eval_start
    protocol = {
        "tasks": names,
        "limit": limit,
        "batch_size": batch_size,
        "include_path": str(include) if include else None,
        "harness": "lm-evaluation-harness simple_evaluate, HFLM wrapping the model llmq loaded",
        "lm_eval_version": output.get("lm_eval_version"),
        "max_length": output.get("max_length"),
        "apply_chat_template": False,
        "seeds": {name.removesuffix("_seed"): seed for name, seed in SEEDS.items()},
    }
    wall = time.perf_counter() - wall_start
    return TasksReport(run, protocol, read_results(output), load_seconds, eval_seconds, wall)


def parse_task_names(tasks: str | Sequence[str]) -> list[str]:
    """``"a,b"`` or ``["a", "b"]`` -> ``["a", "b"]``; empty or repeated names are a usage error."""
    items = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names = [str(item).strip() for item in items]
    if not names or any(not name for name in names):
        shown = tasks if isinstance(tasks, str) else ",".join(map(str, tasks))
        raise UsageError(f"--tasks {shown!r} has an empty name; give comma-separated task names, e.g. arc_easy,piqa")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise UsageError(f"--tasks names {', '.join(repeated)} more than once; give each task once")
    return names


def _check_counts(limit: int | None, batch_size: int) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UsageError(f"--limit {limit!r} must be a whole number of documents, at least 1 (or none for all)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"--batch-size {batch_size!r} must be a whole number, at least 1")


def _check_include_path(include_path: str | os.PathLike | None) -> Path | None:
    if include_path is None:
        return None
    path = Path(include_path).expanduser()
    if not path.is_dir():
        what = "is a file" if path.exists() else "does not exist"
        raise UsageError(f"--include-path {path} {what}; give the folder that holds the task YAML files")
    return path.resolve()


def _import_lm_eval():
    """lm-eval's top-level module, or a TaskError saying how to install it."""
    try:
        import lm_eval
        import lm_eval.models.huggingface  # noqa: F401  (HFLM needs torch, transformers, accelerate)
        import lm_eval.tasks  # noqa: F401
    except ImportError as err:
        if err.name == "lm_eval":
            raise TaskError(f"llmq eval tasks needs lm-evaluation-harness, an optional extra: {INSTALL_HINT}") from err
        raise TaskError(f"lm-evaluation-harness is installed but cannot be imported ({err}); {INSTALL_HINT}") from err
    return lm_eval


def _check_names(names: list[str], manager) -> None:
    """Every name is a task, group or tag lm-eval knows, or a task YAML file."""
    known = set(manager.all_tasks)
    for name in names:
        if name in known or (name.endswith((".yaml", ".yml")) and Path(name).is_file()):
            continue
        close = difflib.get_close_matches(name, manager.all_tasks, n=3, cutoff=0.75)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UsageError(
            f"unknown task {name!r}: not among the {len(known)} tasks, groups and tags lm-eval knows{hint} "
            "(`lm-eval ls tasks` lists them; --include-path adds a folder of task YAMLs)"
        )


def _check_task_data(names: list[str], manager) -> None:
    """Build each task once before the model loads, so missing data fails in seconds; lm-eval
    builds them again in ``simple_evaluate`` from the ``datasets`` cache."""
    for name in names:
        try:
            loaded = manager.load([name])
        except (ConnectionError, FileNotFoundError) as err:
            raise TaskError(
                f"the data of task {name!r} cannot be loaded: {err}. A task on the Hugging Face hub needs network "
                "or its `datasets` cache; a local task's data_files are read relative to the current directory"
            ) from err
        unsafe = [task for task, obj in loaded["tasks"].items() if getattr(obj, "UNSAFE_CODE", False)]
        if unsafe:
            raise TaskError(
                f"task {', '.join(unsafe)} runs code the model writes (lm-eval marks it unsafe); llmq does not run it"
            )


@contextlib.contextmanager
def _library_output(feedback: Feedback):
    """For the run: lm-eval's warnings become log lines of ``feedback`` (so ``-q`` drops them),
    and lm-eval and ``datasets`` draw their bars only where ``feedback`` allows bars."""
    logger = logging.getLogger("lm_eval")
    handler = _ForwardHandler(feedback)
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        with contextlib.ExitStack() as stack:
            if not feedback.show_progress:
                stack.enter_context(_no_bars())
            yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


class _ForwardHandler(logging.Handler):
    def __init__(self, feedback: Feedback):
        super().__init__(logging.WARNING)
        self.feedback = feedback

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        # lm-eval warns whenever it is given a loaded model instead of a name; that is the design here.
        if "`pretrained`" not in message:
            self.feedback.info(f"lm-eval: {message}")


# lm-eval's modules whose bars llmq turns off: each draws them through its module-level `tqdm`,
# some with an explicit ``disable=False``, so neither ``TQDM_DISABLE`` (read when tqdm is
# imported) nor an argument reaches them all.
_BAR_MODULES = ("lm_eval.api.task", "lm_eval.api.model", "lm_eval.models.huggingface")


@contextlib.contextmanager
def _no_bars():
    import importlib

    import datasets
    from tqdm import tqdm

    def hidden(*args, **kwargs):
        return tqdm(*args, **{**kwargs, "disable": True})

    modules = [m for m in map(importlib.import_module, _BAR_MODULES) if hasattr(m, "tqdm")]
    saved = [m.tqdm for m in modules]
    datasets_bars = datasets.is_progress_bar_enabled()
    for module in modules:
        module.tqdm = hidden
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        for module, original in zip(modules, saved, strict=True):
            module.tqdm = original
        if datasets_bars:
            datasets.enable_progress_bars()


def _harness_model(model, tokenizer, batch_size: int):
    """lm-eval's ``HFLM`` around the model llmq loaded, with its tokenizer."""
    from lm_eval.models.huggingface import HFLM

    # HFLM parses a config's quantization_config dict (an artifact's {"quant_method": "llmq"})
    # through transformers' registry even though only a model it loads itself would use it; the
    # model here is loaded already, so the entry is set aside while HFLM is built.
    config = model.config
    quantization = getattr(config, "quantization_config", None)
    if isinstance(quantization, dict):
        delattr(config, "quantization_config")
    try:
        return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    finally:
        if isinstance(quantization, dict):
            config.quantization_config = quantization


def read_results(output: dict) -> list[TaskResult]:
    """lm-eval's ``simple_evaluate`` output -> one :class:`TaskResult` per task and group row.

    A row's metrics are its ``"<metric>,<filter>"`` keys with a numeric value; each one's
    ``"<metric>_stderr,<filter>"`` is its standard error ("N/A" there becomes None).
    """
    rows = dict(output["results"])
    for name, row in output.get("groups", {}).items():
        rows.setdefault(name, row)
    subtasks = output.get("group_subtasks", {})
    samples, shots = output.get("n-samples", {}), output.get("n-shot", {})
    versions, higher = output.get("versions", {}), output.get("higher_is_better", {})
    results = []
    for name, row in rows.items():
        metrics = []
        for key, value in row.items():
            metric, comma, filter_name = key.partition(",")
            if not comma or key in _NOT_METRICS or metric.endswith("_stderr") or not _is_number(value):
                continue
            stderr = row.get(f"{metric}_stderr,{filter_name}")
            better = higher.get(name, {}).get(metric)
            metrics.append(
                TaskMetric(metric, filter_name, float(value), float(stderr) if _is_number(stderr) else None,
                           None if better is None else bool(better))
            )  # fmt: skip
        counts = samples.get(name, {})
        version = versions.get(name)
        results.append(
            TaskResult(
                name=name,
                alias=str(row.get("alias", name)).strip(" -"),
                kind="group" if subtasks.get(name) else "task",
                version=None if version is None else str(version),
                num_fewshot=shots.get(name) if name in samples else None,
                samples=counts.get("effective"),
                samples_total=counts.get("original"),
                metrics=metrics,
            )
        )
    return results


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)

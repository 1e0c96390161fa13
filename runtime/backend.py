"""Which backend an artifact's quantized Linears compute with: the CuPy kernels or the torch reference.

``auto`` takes the exact torch path until the CUDA kernels have been verified on a GPU
(:data:`KERNELS_VERIFIED`): a default rests only on what has run where it would be used.
``cuda`` asked for explicitly is the opt-in, and where it cannot run it is an error, never a switch.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

from llmq.errors import DeviceError, UsageError

if TYPE_CHECKING:
    import torch

    from llmq.runtime.sources.models import ModelSource

# Flipped by the first GPU run that passes `pytest -m gpu` and the demo's cuda/torch token check
# (scripts/gpu_check.sh); until then `auto` never picks kernels no GPU has run.
KERNELS_VERIFIED = False


class Backend(str, enum.Enum):
    """How quantized Linears compute: CuPy kernels, or the exact torch reference."""

    auto = "auto"
    cuda = "cuda"
    torch = "torch"


def resolve_backend(requested: Backend, device: torch.device, dtype: torch.dtype) -> tuple[Backend, str | None]:
    """The backend to use and, when ``auto`` did not pick ``cuda``, a one-line notice saying why."""
    if requested == Backend.torch:
        return Backend.torch, None
    from llmq.runtime.cuda_backend import cuda_unavailable_reason

    reason = cuda_unavailable_reason(device, dtype)
    if requested == Backend.cuda:
        if reason is not None:
            raise DeviceError(f"--backend cuda cannot run here: {reason}; use --backend torch")
        return Backend.cuda, None
    if reason is None and not KERNELS_VERIFIED:
        reason = "the CUDA kernels have not been verified on a GPU yet (--backend cuda runs them)"
    if reason is not None:
        return Backend.torch, f"backend: torch (exact reference decoder), because {reason}"
    return Backend.cuda, None


def backend_for(
    source: ModelSource, requested: Backend, device: torch.device, dtype: torch.dtype
) -> tuple[Backend | None, str | None]:
    """(backend for ``source``'s quantized Linears, notice): None for a plain HF model, which has none."""
    from llmq.runtime.sources.models import SourceKind

    if source.kind != SourceKind.artifact:
        if requested == Backend.cuda:
            raise UsageError(
                f"--backend cuda applies to llmq artifacts, and {source.spec} is a {source.kind.value} model"
            )
        return None, None
    return resolve_backend(requested, device, dtype)

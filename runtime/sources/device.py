"""Turn the user's ``--device`` and ``--dtype`` strings into torch objects, or say why not.

Nothing here falls back: asking for ``cuda`` on a machine without a GPU is an error, not a
quiet switch to the CPU.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

from llmq.errors import DeviceError, UsageError
from llmq.runtime.format import dtypes

# --dtype: auto, then the float rows of the dtype table (fp32, fp16, bf16)
DType = enum.Enum("DType", {"auto": "auto"} | {d.short: d.short for d in dtypes.FLOATS}, type=str)
DType.__doc__ = "Weights and activations dtype of a run: auto or one of the dtype table's floats."


if TYPE_CHECKING:
    import torch


def resolve_device(spec: str) -> torch.device:
    """``auto`` -> ``cuda`` if available, else ``cpu``; ``cpu``, ``cuda``, ``cuda:N``, ``mps`` as given."""
    import torch

    spec = spec.strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UsageError(f"--device {spec!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {spec} was asked for but no CUDA GPU is visible; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError("--device mps was asked for but MPS is not available; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {spec!r} is not supported; use auto, cpu, cuda, cuda:N or mps")
    return device


def resolve_dtype(dtype: DType, device: torch.device) -> torch.dtype:
    """``auto`` is fp32 on the CPU (fp16 matmuls there are slow and less exact) and fp16 elsewhere."""
    if dtype == DType.auto:
        dtype = DType.fp32 if device.type == "cpu" else DType.fp16
    return dtypes.BY_SHORT[dtype.value].torch()

"""Turn the user's ``--device`` and ``--dtype`` strings into torch objects, or say why not.

Nothing here falls back: asking for ``cuda`` on a machine without a GPU is an error, not a
quiet switch to the CPU.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

from llmq.errors import DeviceError, UsageError


class Backend(str, enum.Enum):
    """How quantized Linears compute: CuPy kernels, or the exact torch reference."""

    auto = "auto"
    cuda = "cuda"
    torch = "torch"


class DecodeMode(str, enum.Enum):
    """How decode steps run: transformers' growing KV cache, a preallocated one, or that step as a CUDA graph."""

    dynamic = "dynamic"
    static = "static"
    graph = "graph"


def check_decode_device(mode: DecodeMode, device: torch.device) -> None:
    """``graph`` records CUDA graphs, so it needs a CUDA device; the others run anywhere."""
    if mode == DecodeMode.graph and device.type != "cuda":
        raise UsageError(f"--decode graph captures CUDA graphs and the device is {device}; use static or dynamic")


class DType(str, enum.Enum):
    auto = "auto"
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


if TYPE_CHECKING:
    import torch


def _torch_dtypes() -> dict[DType, torch.dtype]:
    import torch

    return {DType.fp32: torch.float32, DType.fp16: torch.float16, DType.bf16: torch.bfloat16}


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
    dtypes = _torch_dtypes()
    if dtype == DType.auto:
        return dtypes[DType.fp32] if device.type == "cpu" else dtypes[DType.fp16]
    return dtypes[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k.value for k, v in _torch_dtypes().items()}[dtype]


def resolve_backend(requested: Backend, device: torch.device, dtype: torch.dtype) -> tuple[Backend, str | None]:
    """The backend to use and, when ``auto`` could not pick ``cuda``, a one-line notice saying why.

    ``cuda`` asked for explicitly on a machine where it cannot run is an error, never a switch.
    """
    if requested == Backend.torch:
        return Backend.torch, None
    from llmq.runtime.cuda_backend import cuda_unavailable_reason

    reason = cuda_unavailable_reason(device, dtype)
    if requested == Backend.cuda:
        if reason is not None:
            raise DeviceError(f"--backend cuda cannot run here: {reason}; use --backend torch")
        return Backend.cuda, None
    if reason is not None:
        return Backend.torch, f"backend: torch (exact reference decoder), because {reason}"
    return Backend.cuda, None

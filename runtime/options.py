"""The options every command that loads a model shares. Importing this module imports no torch,
so the CLI can declare them without slowing ``llmq --help``."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llmq.errors import UsageError
from llmq.runtime.backend import Backend
from llmq.runtime.sources.device import DType, resolve_device, resolve_dtype

if TYPE_CHECKING:
    import torch


class Weights(str, enum.Enum):
    """How the torch backend holds an artifact's quantized weights."""

    auto = "auto"  # dense, unless the dense weights would not fit in the free memory: then packed, with a notice
    dense = "dense"  # decoded once at load: the speed of the unquantized model, and its memory
    packed = "packed"  # kept packed, each Linear decoded as it runs: about the artifact's size, slower


@dataclass(frozen=True)
class LoadOptions:
    """How a model is loaded to run; every command that loads one takes these.

    device             ``auto`` (CUDA if present, else CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``
    device_map         ``"auto"``: spread the model over the GPUs and the CPU (accelerate); replaces ``device``
    max_memory         per-device limits for ``device_map``, e.g. ``"0=20GiB,cpu=60GiB"``
    dtype              weights and activations; ``auto`` is fp32 on a CPU and fp16 elsewhere
    backend            an artifact's quantized matmuls: ``torch`` (exact reference), ``cuda`` (the kernels),
                       ``auto`` (torch until the kernels are verified on a GPU; see ``runtime/backend.py``)
    weights            how the torch backend holds them: ``dense`` (decoded once), ``packed`` (decoded per
                       call, about the artifact's size in memory), ``auto`` (dense where it fits)
    seed               seeds torch before the run (sampling, random prompts)
    revision           hub revision of a hub id
    trust_remote_code  allow a model folder's own Python code to run
    """

    device: str = "auto"
    device_map: str | None = None
    max_memory: str | None = None
    dtype: DType = DType.auto
    backend: Backend = Backend.auto
    weights: Weights = Weights.auto
    seed: int = 0
    revision: str | None = None
    trust_remote_code: bool = False

    def __post_init__(self) -> None:  # strings are accepted for the enums, as on the command line
        for name, kind in (("dtype", DType), ("backend", Backend), ("weights", Weights)):
            value = getattr(self, name)
            try:
                object.__setattr__(self, name, kind(value))
            except ValueError:
                choices = ", ".join(k.value for k in kind)
                raise UsageError(f"--{name} {value!r} must be one of {choices}") from None

    def placement(self) -> Placement:
        """Where and in what dtype the model runs, checked without loading anything. With
        ``device_map`` the inputs start on the first GPU, or the CPU without one."""
        import torch

        from llmq.runtime.placement import parse_max_memory

        if self.device_map is None:
            if self.max_memory is not None:
                raise UsageError("--max-memory limits --device-map; add --device-map auto")
            device = resolve_device(self.device)
            return Placement(device, resolve_dtype(self.dtype, device), None)
        if self.device_map != "auto":
            raise UsageError(f"--device-map {self.device_map!r}: the one value is auto")
        if self.device != "auto":
            raise UsageError("give --device or --device-map, not both")
        limits = parse_max_memory(self.max_memory) if self.max_memory else free_memory()
        device = torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
        return Placement(device, resolve_dtype(self.dtype, device), limits)


@dataclass(frozen=True)
class Placement:
    device: torch.device  # where the inputs go
    dtype: torch.dtype
    max_memory: dict | None  # accelerate's per-device limits with --device-map, else None


def free_memory() -> dict:
    """What each GPU and the CPU can hold now (accelerate's measure), for ``--device-map`` without limits."""
    from accelerate.utils import get_max_memory

    return get_max_memory()

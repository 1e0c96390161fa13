"""The one dtype table: how each dtype llmq stores or computes in is spelled in every place.

``name`` is the spelling of the manifest and of torch (``float16``), ``short`` the one users type
and JSON results report (``fp16``), ``safetensors`` the code in a safetensors header (``F16``).
torch is imported only when a torch dtype is asked for, so option parsing stays light.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class DTypeInfo:
    name: str  # manifest spelling, also the torch attribute
    short: str | None  # what users type (--dtype, --dense-dtype); None for integer storage types
    safetensors: str  # safetensors header code

    def torch(self) -> torch.dtype:
        import torch

        return getattr(torch, self.name)


TABLE: tuple[DTypeInfo, ...] = (
    DTypeInfo("float32", "fp32", "F32"),
    DTypeInfo("float16", "fp16", "F16"),
    DTypeInfo("bfloat16", "bf16", "BF16"),
    DTypeInfo("int32", None, "I32"),
    DTypeInfo("uint8", None, "U8"),
)
FLOATS = tuple(info for info in TABLE if info.short is not None)  # what dense weights and activations may be
BY_NAME = {info.name: info for info in TABLE}
BY_SHORT = {info.short: info for info in FLOATS}
BY_SAFETENSORS = {info.safetensors: info for info in TABLE}


def info_of(dtype: torch.dtype) -> DTypeInfo:
    """The table row of a torch dtype; a dtype llmq does not use is an internal error."""
    name = str(dtype).removeprefix("torch.")
    assert name in BY_NAME, f"llmq has no use for {dtype}"
    return BY_NAME[name]


def name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"`` (the manifest's spelling)."""
    return info_of(dtype).name


def short(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"fp16"`` (the spelling of options and JSON results)."""
    short_name = info_of(dtype).short
    assert short_name is not None, f"{dtype} is a storage dtype, not one a user chooses"
    return short_name

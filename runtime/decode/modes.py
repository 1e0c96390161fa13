"""The decode modes a user can ask for; kept free of torch so the CLI's option parsing stays light."""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

from llmq.errors import UsageError

if TYPE_CHECKING:
    import torch


class DecodeMode(str, enum.Enum):
    """How decode steps run: transformers' growing KV cache, a preallocated one, or that step as a CUDA graph."""

    dynamic = "dynamic"
    static = "static"
    graph = "graph"


def check_decode_device(mode: DecodeMode, device: torch.device) -> None:
    """``graph`` records CUDA graphs, so it needs a CUDA device; the others run anywhere."""
    if mode == DecodeMode.graph and device.type != "cuda":
        raise UsageError(f"--decode graph captures CUDA graphs and the device is {device}; use static or dynamic")

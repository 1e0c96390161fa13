"""Write a safetensors file one tensor at a time, so a file larger than memory can be assembled.

``safetensors.torch.save_file`` wants every tensor in memory at once. The format itself does not:
an 8-byte little-endian header length, a JSON header giving each tensor's dtype, shape and byte
range, then the tensors' bytes back to back. Knowing every shape in advance, the header is
written first and each tensor fetched, written and dropped in turn. The result is an ordinary
safetensors file (``safe_open`` and ``load_file`` read it).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from pathlib import Path

import torch

from llmq.runtime.format import dtypes

_ALIGN = 8  # the header is padded with spaces so the data starts 8-byte aligned, as safetensors writes it


def write_streamed(
    path: Path,
    headers: dict[str, tuple[torch.dtype, tuple[int, ...]]],
    fetch: Callable[[str], torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write the tensors named in ``headers`` (name -> (dtype, shape)) to ``path``, in name order;
    ``fetch(name)`` gives each one when its turn comes and must match its header."""
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in sorted(headers):
        dtype, shape = headers[name]
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": dtypes.info_of(dtype).safetensors, "shape": list(shape),
                        "data_offsets": [offset, offset + size]}  # fmt: skip
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % _ALIGN)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name in sorted(headers):
            tensor = fetch(name)
            dtype, shape = headers[name]
            assert tensor.dtype == dtype and tuple(tensor.shape) == tuple(shape), f"{name} does not match its header"
            f.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())

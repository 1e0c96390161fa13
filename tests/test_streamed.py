"""runtime/format/streamed.py: a safetensors file written one tensor at a time reads back exactly."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from llmq.runtime.format.streamed import write_streamed


def test_streamed_file_reads_back_with_safetensors(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "b.hessian": torch.randn(5, 5, generator=g),
        "a.half": torch.randn(3, generator=g).half(),
        "c.bf16": torch.randn(2, 3, 4, generator=g).bfloat16(),
        "d.scalar": torch.tensor(2.5),
        "e.empty": torch.zeros(0, 4),
    }
    asked = []

    def fetch(name):
        asked.append(name)
        return tensors[name]

    path = tmp_path / "x.safetensors"
    write_streamed(path, {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()}, fetch, {"k": "v"})
    assert asked == sorted(tensors)  # one at a time, in name order
    read = load_file(path)
    assert read.keys() == tensors.keys() and all(torch.equal(read[n], t) for n, t in tensors.items())
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"k": "v"}
    assert (8 + int.from_bytes(path.read_bytes()[:8], "little")) % 8 == 0  # the data starts 8-byte aligned


def test_a_tensor_unlike_its_header_is_an_internal_error(tmp_path):
    with pytest.raises(AssertionError, match="does not match its header"):
        write_streamed(tmp_path / "x", {"a": (torch.float32, (2,))}, lambda name: torch.zeros(3))

"""``QuantLinear``: a Linear whose weight lives in the packed layout.

The packed tensors stay resident as buffers. Two backends compute with them:

* ``torch`` decodes them once, exactly (:func:`llmq.runtime.format.layout.dequantize`), into a dense
  weight in the activation dtype, so evaluation runs at the speed of the unquantized model while
  computing with precisely the quantized values; or, with packed weights (``--weights packed``, or
  where the dense ones would not fit), decodes the weight each time the Linear runs and drops it
  after, so the model takes about the artifact's size plus one Linear's dense weight;
* ``cuda`` keeps only the packed tensors on the GPU and multiplies with the CuPy kernels
  (:class:`llmq.runtime.cuda_backend.CudaLinear`), so the weights take about the artifact's size.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from llmq.errors import ArtifactError
from llmq.runtime.format.layout import LinearLayout, dequantize
from llmq.runtime.sources.experts import RoutedExperts
from llmq.runtime.sources.families import Family, expert_modules


class QuantLinear(nn.Module):
    def __init__(self, layout: LinearLayout, packed: dict[str, torch.Tensor], bias: torch.Tensor | None):
        super().__init__()
        self.layout = layout
        self.in_features, self.out_features = layout.in_features, layout.out_features
        for suffix, tensor in packed.items():
            self.register_buffer(f"packed_{suffix}", tensor, persistent=False)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.register_buffer("weight", torch.empty(0), persistent=False)
        self.kernels = None  # a CudaLinear once use_cuda() ran
        self.decode_dtype: torch.dtype | None = None  # set by keep_packed(): decode at each call, in this dtype

    @property
    def backend(self) -> str:
        return "cuda" if self.kernels is not None else "torch"

    def packed(self) -> dict[str, torch.Tensor]:
        return {suffix: getattr(self, f"packed_{suffix}") for suffix in self.layout.tensor_specs()}

    def materialize(self, dtype: torch.dtype) -> None:
        """Decode the packed weight once into ``self.weight`` ([N, K], ``dtype``) for the torch backend."""
        self.weight = dequantize(self.packed(), self.layout).to(dtype)
        self.kernels = self.decode_dtype = None

    def keep_packed(self, dtype: torch.dtype) -> None:
        """Compute with the torch backend from the packed tensors alone: each forward decodes the weight
        ([N, K], ``dtype``), exactly as :meth:`materialize` would, and frees it after."""
        self.weight = torch.empty(0, device=self.weight.device)
        self.kernels, self.decode_dtype = None, dtype

    def use_cuda(self) -> None:
        """Compute with the CUDA kernels from the packed tensors (already on a GPU); no dense weight."""
        from llmq.runtime.cuda_backend import CudaLinear

        self.kernels = CudaLinear(self.layout, self.packed())
        self.weight = torch.empty(0, device=self.weight.device)
        self.decode_dtype = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels is not None:
            return self.kernels(x, self.bias)
        if self.decode_dtype is not None:
            return nn.functional.linear(x, dequantize(self.packed(), self.layout).to(self.decode_dtype), self.bias)
        return nn.functional.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        lay = self.layout
        return (
            f"in={lay.in_features}, out={lay.out_features}, k4={lay.k4}, bpw={lay.bits_per_weight():.3f}, "
            f"backend={self.backend}{', packed' if self.decode_dtype is not None else ''}"
        )


def unfuse_quantized_experts(model, family: Family, quantized: Iterable[str]) -> None:
    """Replace each fused experts module whose matrices are in ``quantized`` (``<module>.<param>.<e>``)
    by :class:`RoutedExperts` with meta placeholders, which the loader then fills with QuantLinears."""
    names = set(quantized)
    for name, module in expert_modules(model, family).items():
        if f"{name}.{family.experts.gate_up}.0" in names:
            parent, child = parent_module(model, name)
            setattr(parent, child, RoutedExperts.from_fused(module, family.experts))


def parent_module(model, dotted: str):
    parent_name, _, child = dotted.rpartition(".")
    try:
        return model.get_submodule(parent_name), child
    except AttributeError as err:
        raise ArtifactError(f"{dotted} does not exist in the model built from the artifact's config") from err

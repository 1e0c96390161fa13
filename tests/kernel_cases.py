"""Random packed layers for the kernel tests: real quantizer output on odd shapes and settings."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmq.quant.config import QuantConfig
from llmq.quant.linear import quantize_weight
from llmq.runtime.format import layout as L


@dataclass(frozen=True)
class Case:
    out_features: int
    in_features: int
    g1: int = 32
    g2: int = 16
    g4: int = 64
    stripes: float = 0.25
    outliers: float = 0.0

    def __str__(self) -> str:
        return f"{self.out_features}x{self.in_features}-g{self.g1}.{self.g2}.{self.g4}-s{self.stripes}-o{self.outliers}"


# Shapes that are not multiples of any tile (64 features, 64 columns, 16 rows, 32 lanes x 4
# words), groups that do and do not fill a 16-byte chunk, both parts alone, and outliers.
CASES = [
    Case(70, 200, g1=32, g4=16),
    Case(129, 576),  # the demo model's width: 4-bit rows of 18 words, so 1-word loads there
    Case(5, 48, g1=16, g2=3, g4=8),
    Case(64, 256, stripes=0.0),
    Case(33, 96, g4=32, stripes=1.0),
    Case(100, 320, g1=48, g2=5, g4=32, outliers=0.02),
    Case(96, 1024, g1=64, g4=64),
]


def packed_layer(case: Case, seed: int = 0) -> tuple[L.LinearLayout, dict[str, torch.Tensor], torch.Tensor]:
    """(layout, packed tensors, fp32 reference weight [N, K]) of a random weight quantized by llmq."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(case.out_features, case.in_features, generator=gen) * 0.05
    config = QuantConfig(
        g1=case.g1, g2=case.g2, g4=case.g4, stripe_fraction=case.stripes, outlier_fraction=case.outliers
    )
    layout, tensors = quantize_weight("layer", weight, config)
    return layout, tensors, L.dequantize(tensors, layout)

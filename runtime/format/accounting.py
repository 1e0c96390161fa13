"""Bits-per-weight accounting, from layouts alone (so a dry run and ``inspect`` agree exactly)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from llmq.runtime.format.layout import LinearLayout


@dataclass(frozen=True)
class LayerBits:
    name: str
    shape: tuple[int, int]
    k4: int
    bits_per_weight: float
    stored_bytes: int


@dataclass(frozen=True)
class Accounting:
    layers: list[LayerBits]
    quantized_weights: int
    quantized_bits: int
    dense_params: int
    dense_bits: int

    @property
    def bits_per_weight(self) -> float:
        """Over the quantized Linears: every code, scale, zero, padding bit, permutation index and outlier."""
        return self.quantized_bits / self.quantized_weights if self.quantized_weights else 0.0

    @property
    def model_bits_per_param(self) -> float:
        """Over the whole model, the 16-bit embeddings, norms and head included."""
        total = self.quantized_weights + self.dense_params
        return (self.quantized_bits + self.dense_bits) / total if total else 0.0

    @property
    def tensor_bytes(self) -> int:
        return (self.quantized_bits + self.dense_bits) // 8

    def to_json(self) -> dict:
        return {
            "bits_per_weight": round(self.bits_per_weight, 4),
            "model_bits_per_param": round(self.model_bits_per_param, 4),
            "quantized_weights": self.quantized_weights,
            "quantized_bytes": self.quantized_bits // 8,
            "dense_params": self.dense_params,
            "dense_bytes": self.dense_bits // 8,
            "tensor_bytes": self.tensor_bytes,
            "layers": [
                {
                    "name": layer.name,
                    "shape": list(layer.shape),
                    "k4": layer.k4,
                    "bits_per_weight": round(layer.bits_per_weight, 4),
                    "stored_bytes": layer.stored_bytes,
                }
                for layer in self.layers
            ],
        }


def account(linears: dict[str, LinearLayout], dense: dict[str, tuple[torch.dtype, tuple[int, ...]]]) -> Accounting:
    layers = [
        LayerBits(name, (lay.out_features, lay.in_features), lay.k4, lay.bits_per_weight(), lay.stored_bits() // 8)
        for name, lay in linears.items()
    ]
    dense_params = sum(math.prod(shape) for _, shape in dense.values())
    dense_bits = sum(math.prod(shape) * dtype.itemsize * 8 for dtype, shape in dense.values())
    return Accounting(
        layers=layers,
        quantized_weights=sum(lay.out_features * lay.in_features for lay in linears.values()),
        quantized_bits=sum(lay.stored_bits() for lay in linears.values()),
        dense_params=dense_params,
        dense_bits=dense_bits,
    )

"""A model-wide bit budget: spread 4-bit stripes over the Linears where they buy the most.

Every Linear starts as pure 2-bit. Each step promotes ``g4`` more channels of one Linear to a
4-bit stripe; its price is the exact change in stored bits (from the layout table) and its gain
the error those channels stop causing (their scores, in the scorer's units: output error with a
Hessian, weight error without). Steps are taken greedily by gain per bit until the next one
would pass the target. One step moves the total by a few thousandths of a bit per weight on
real models, so the result lands just under the target.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

import torch

from llmq.errors import BudgetError
from llmq.runtime.format.layout import LinearLayout

TOLERANCE = 0.02


# Linear name -> (k4 -> its full layout, outliers and padding included)
LayoutFactory = Callable[[int], LinearLayout]


def _max_k4(make: LayoutFactory) -> int:
    lay = make(0)
    return lay.in_features // lay.g4 * lay.g4


def achievable_range(factories: dict[str, LayoutFactory]) -> tuple[float, float]:
    """Bits per weight with no stripes and with every whole g4 group in 4-bit."""
    weights = sum(make(0).out_features * make(0).in_features for make in factories.values())
    low = sum(make(0).stored_bits() for make in factories.values())
    high = sum(make(_max_k4(make)).stored_bits() for make in factories.values())
    return low / weights, high / weights


def check_target(factories: dict[str, LayoutFactory], target: float) -> None:
    """Refuse a ``target`` these layouts cannot reach (shapes only: no weight or statistic is read)."""
    low, high = achievable_range(factories)
    if not low <= target <= high:
        raise BudgetError(
            f"--target-bits {target} is outside what this model can reach with these group sizes: "
            f"{low:.3f} (pure 2-bit) to {high:.3f} (all 4-bit)"
        )


def allocate(
    factories: dict[str, LayoutFactory], scores: dict[str, torch.Tensor], target: float
) -> dict[str, LinearLayout]:
    """Layouts with ``k4`` chosen per Linear so the total bits per weight is at most ``target``."""
    check_target(factories, target)
    current = {name: make(0) for name, make in factories.items()}
    weights = sum(lay.out_features * lay.in_features for lay in current.values())
    ranked = {name: torch.sort(scores[name].clamp(min=0), descending=True).values for name in factories}
    budget = target * weights - sum(lay.stored_bits() for lay in current.values())
    heap = [item for name in factories if (item := _next_step(name, current[name], factories[name], ranked[name]))]
    heapq.heapify(heap)
    while heap:
        _, name, bits, layout = heapq.heappop(heap)
        if bits > budget:
            continue  # this Linear's next step no longer fits; smaller steps elsewhere still may
        budget -= bits
        current[name] = layout
        step = _next_step(name, layout, factories[name], ranked[name])
        if step is not None:
            heapq.heappush(heap, step)
    return current


def _next_step(name: str, layout: LinearLayout, make: LayoutFactory, ranked: torch.Tensor):
    k4 = layout.k4 + layout.g4
    if k4 > layout.in_features:
        return None
    bigger = make(k4)
    bits = bigger.stored_bits() - layout.stored_bits()
    gain = float(ranked[layout.k4 : k4].sum())
    return (-gain / max(bits, 1), name, bits, bigger)

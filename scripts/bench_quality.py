#!/usr/bin/env python3
"""Perplexity against bits per weight on the demo model: the numbers behind docs/benchmarks.md.

    python scripts/bench_quality.py --out docs/data/quality.json     # ~10 min on 2 CPU cores
    python scripts/plot_quality.py docs/data/quality.json docs/img/ppl_vs_bits.png

Every aligned point is the real path: `llmq quantize demo` writes an artifact, `llmq eval ppl`
scores it, and bits per weight are the artifact's own accounting (every code, scale, zero,
padding bit and permutation index). The "unaligned" points are a reference that no kernel
could load efficiently: each output row picks its own 4-bit channels (same count per row as the
aligned stripe, so the same budget, per-row index cost not counted) and the result is
simulated in fp32. The gap between the two is what alignment costs in accuracy.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

from benchlib import artifact_point, baseline_point, merge, record, simulated_ppl

ALIGNED = {
    name: ["--stripe-fraction", str(fraction), "--g1", str(g1), "--g2", str(g2), "--g4", str(g4)]
    for name, fraction, g1, g2, g4 in [
        ("2bit g32 g2=8", 0.0, 32, 8, 64),
        ("2bit g16 g2=8", 0.0, 16, 8, 64),
        ("2bit g16 g2=16", 0.0, 16, 16, 64),
        ("mixed 12.5% g32 g2=8", 0.125, 32, 8, 64),
        ("mixed 25% g32 g2=8", 0.25, 32, 8, 64),
        ("mixed 37.5% g32 g2=8", 0.375, 32, 8, 64),
        ("mixed 25% g64 g2=8", 0.25, 64, 8, 64),
        ("mixed 12.5% g16 g2=8", 0.125, 16, 8, 64),
        ("mixed 12.5% g16 g2=16", 0.125, 16, 16, 64),
        ("mixed 25% g16 g2=8", 0.25, 16, 8, 64),
        ("mixed 25% g16 g2=16", 0.25, 16, 16, 64),
        ("4bit g64", 1.0, 16, 16, 64),
        ("4bit g128", 1.0, 16, 16, 128),
    ]
}
ALIGNED["mixed 12.5% g16 g2=16 minmax"] = [*ALIGNED["mixed 12.5% g16 g2=16"], "--rounding", "minmax"]
UNALIGNED = {"unaligned 12.5% g16 g2=16": 0.125, "unaligned 25% g16 g2=16": 0.25}


def unaligned_point(name: str, fraction: float, max_tokens: int) -> dict:
    """Per-row free choice of the 4-bit channels, simulated on the fp32 model."""
    from llmq.quant.config import QuantConfig
    from llmq.quant.linear import plan_layout

    config = QuantConfig(stripe_fraction=fraction)
    totals = {"bits": 0, "index_bits": 0, "weights": 0}

    def transform(_name, w):
        layout = plan_layout(*w.shape, config)
        totals["bits"] += layout.stored_bits() - 32 * layout.in_features  # no shared permutation
        # Each row must say which of its channels are 4-bit: ceil(log2 K) bits per 4-bit weight at least.
        totals["index_bits"] += layout.out_features * layout.k4 * math.ceil(math.log2(layout.in_features))
        totals["weights"] += layout.out_features * layout.in_features
        return _simulate_unaligned(w, layout, config)

    ppl, stderr = simulated_ppl(transform, max_tokens)
    return {
        "name": name,
        "kind": "unaligned",
        "command": f"scripts/bench_quality.py simulation, stripe fraction {fraction}",
        "bits_per_weight": totals["bits"] / totals["weights"],
        "bits_per_weight_with_row_indices": (totals["bits"] + totals["index_bits"]) / totals["weights"],
        "ppl": ppl,
        "ppl_stderr": stderr,
    }


def _simulate_unaligned(w, layout, config):
    import torch

    from llmq.quant.groups import quantize_2bit, quantize_4bit
    from llmq.quant.select import range_spread

    n, k = w.shape
    if layout.k4 == 0:
        return w
    order = range_spread(w, config.g1).argsort(dim=1, descending=True)
    chosen = order[:, : layout.k4].sort(dim=1).values
    rest = order[:, layout.k4 :].sort(dim=1).values
    w2, w4 = torch.gather(w, 1, rest), torch.gather(w, 1, chosen)
    pad = layout.k2_padded - layout.k2
    mask = torch.ones(n, layout.k2_padded)
    mask[:, layout.k2 :] = 0
    w2p = torch.cat([w2, w2[:, -1:].expand(n, pad)], 1) if pad else w2
    two = quantize_2bit(w2p, mask, layout.g1, layout.g2, layout.scale_bits, config.rounding)
    deq2 = two.decode(layout.g1, layout.g2)[:, : layout.k2]
    deq4 = quantize_4bit(w4, layout.g4, config.rounding).decode(layout.g4)
    out = torch.empty_like(w)
    out.scatter_(1, rest, deq2)
    out.scatter_(1, chosen, deq4)
    return out


def run_point(name: str, max_tokens: int, tmp: Path) -> dict:
    if name in ALIGNED:
        return artifact_point(name, "aligned", ALIGNED[name], max_tokens, tmp)
    return unaligned_point(name, UNALIGNED[name], max_tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--only", action="append", help="run just these points and merge them into --out")
    args = parser.parse_args()
    names = args.only or [*ALIGNED, *UNALIGNED]
    points = [] if args.only else [baseline_point(args.max_tokens)]
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            points.append(run_point(name, args.max_tokens, Path(tmp)))
            print(json.dumps(points[-1]), file=sys.stderr)
    if args.only:
        merge(args.out, points)
    else:
        args.out.write_text(json.dumps(record(points, args.max_tokens), indent=2) + "\n")


if __name__ == "__main__":
    main()

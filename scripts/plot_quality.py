#!/usr/bin/env python3
"""Plot perplexity against bits per weight from a benchmark record, and print its markdown table.

    python scripts/plot_quality.py docs/data/quality.json docs/img/ppl_vs_bits.png
    python scripts/plot_quality.py docs/data/calibrated.json docs/img/ppl_vs_bits_calibrated.png

Records come from scripts/bench_quality.py (round-to-nearest), bench_calibrated.py and
bench_peers.py. The table marks the Pareto front: points that no other measured point beats on
both bits per weight and perplexity (the fp32 baseline and the unaligned reference excluded).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# kind -> (marker, colour, legend label)
STYLES = {
    "aligned": ("o", "tab:blue", "llmq, round-to-nearest (aligned 4-bit stripes)"),
    "unaligned": ("x", "tab:red", "4-bit chosen freely per row (reference)"),
    "gptq": ("o", "tab:blue", "llmq + GPTQ (Hessian-ranked stripes)"),
    "gptq-act-order": ("P", "tab:cyan", "llmq + GPTQ, --act-order"),
    "gptq-range": ("^", "tab:orange", "llmq + GPTQ, range-ranked stripes"),
    "gptq-budget": ("D", "tab:green", "llmq + GPTQ, --target-bits budget (output error)"),
    "budget-kl": ("d", "darkgreen", "llmq + GPTQ, act-order, --target-bits (predicted KL)"),
    "gptq-outliers": ("v", "tab:purple", "llmq + GPTQ + outliers"),
    "refined": ("*", "tab:red", "llmq + GPTQ, act-order, --refine block"),
    "refined-budget": ("*", "tab:pink", "llmq, --refine block, --target-bits (predicted KL)"),
    "refined-longer": ("*", "darkred", "llmq, as above, --refine-steps 200"),
    "refined-lean": ("P", "navy", "llmq, --refine block --target-bits, --refine-codes lean"),
    "rtn": ("s", "tab:gray", "llmq, round-to-nearest"),
    "hqq": ("x", "tab:brown", "HQQ 0.2.8 (no calibration)"),
    "plain-gptq": ("+", "black", "plain GPTQ, uniform bits (no stripes)"),
    "autoround": ("1", "tab:olive", "AutoRound 0.16.1 (200 iterations)"),
}


def pareto(points: list[dict]) -> set[str]:
    """Names of the points not beaten on both bits and perplexity by another point.

    Bits are compared at the table's 0.001: llmq records its accounting to four decimals, and a
    peer at the same format point (3.1608 against 3.16080729) must count as equal, not as more."""

    def bits(point: dict) -> float:
        return round(point["bits_per_weight"], 3)

    front = set()
    for p in points:
        beaten = any(
            q is not p and bits(q) <= bits(p) and q["ppl"] <= p["ppl"] and (bits(q), q["ppl"]) != (bits(p), p["ppl"])
            for q in points
        )
        if not beaten:
            front.add(p["name"])
    return front


def _draw(ax, numbered: list[dict], base: dict) -> None:
    for kind, (marker, color, label) in STYLES.items():
        chosen = [p for p in numbered if p["kind"] == kind]
        if chosen:
            ax.errorbar(
                [p["bits_per_weight"] for p in chosen],
                [p["ppl"] for p in chosen],
                yerr=[p["ppl_stderr"] for p in chosen],
                fmt=marker,
                color=color,
                label=label,
                capsize=3,
            )
    # Points crowd at 2.6-3.1 bits, so they carry numbers and the names go in a key below.
    for number, p in enumerate(numbered, start=1):
        ax.annotate(
            str(number), (p["bits_per_weight"], p["ppl"]), fontsize=6, xytext=(3, 2), textcoords="offset points"
        )
    ax.axhline(base["ppl"], color="gray", linestyle="--", label=f"fp32 baseline ({base['ppl']:.1f})")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (quantized Linears, everything counted)")
    ax.set_ylabel("perplexity (log scale)")
    ax.grid(True, which="both", alpha=0.3)


def main(data_path: Path, image_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    record = json.loads(data_path.read_text())
    points = record["points"]
    base = next(p for p in points if p["kind"] == "baseline")
    numbered = sorted((p for p in points if p["kind"] in STYLES), key=lambda q: q["bits_per_weight"])
    fig = plt.figure(figsize=(14, 10), dpi=110)
    grid = fig.add_gridspec(2, 2, height_ratios=[3, 1.6], hspace=0.25)
    full, zoom = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])
    _draw(full, numbered, base)
    _draw(zoom, numbered, base)
    full.set_title("all points", fontsize=9)
    # The zoom: everything within 4x of the baseline below 3.5 bits, where the choices are made.
    close = [p for p in numbered if p["ppl"] < 4 * base["ppl"] and p["bits_per_weight"] < 3.5]
    if close:
        zoom.set_xlim(min(p["bits_per_weight"] for p in close) - 0.05, max(p["bits_per_weight"] for p in close) + 0.05)
        zoom.set_ylim(0.9 * base["ppl"], 4 * base["ppl"])
    zoom.set_title("zoom: within 4x of fp32, below 3.5 bits", fontsize=9)
    full.legend(fontsize=7, loc="upper right")
    fig.suptitle(f"{record['model'].split(':')[0]} model, {record['text']}, measured {record['date']}", fontsize=10)
    names = [f"{n:>2} {p['name']}" for n, p in enumerate(numbered, start=1)]
    columns = 4
    per_column = -(-len(names) // columns)
    for c in range(columns):
        chunk = "\n".join(names[c * per_column : (c + 1) * per_column])
        fig.text(0.06 + c * 0.23, 0.33, chunk, fontsize=6.5, family="monospace", va="top")
    image_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(image_path, bbox_inches="tight")


def markdown_table(data_path: Path) -> str:
    points = sorted(
        json.loads(data_path.read_text())["points"], key=lambda p: (p["kind"] != "baseline", p["bits_per_weight"])
    )
    # The unaligned reference leaves out its per-row index bits, so it does not compete for the front.
    front = pareto([p for p in points if p["kind"] not in ("baseline", "unaligned")])
    rows = ["| config | kind | bits/weight | ppl ± stderr | × fp32 | Pareto |", "|---|---|---|---|---|---|"]
    for p in points:
        bits = f"{p['bits_per_weight']:.3f}"
        if "bits_per_weight_with_row_indices" in p:
            bits += f" ({p['bits_per_weight_with_row_indices']:.2f} with row indices)"
        mark = "✓" if p["name"] in front else ""
        rows.append(
            f"| {p['name']} | {p['kind']} | {bits} | {p['ppl']:.1f} ± {p['ppl_stderr']:.1f} | "
            f"{p['ppl_ratio']:.2f} | {mark} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]))
    print(markdown_table(Path(sys.argv[1])))

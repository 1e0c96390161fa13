#!/usr/bin/env python3
"""Plot perplexity against bits per weight from scripts/bench_quality.py's JSON.

python scripts/plot_quality.py docs/data/quality.json docs/img/ppl_vs_bits.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(data_path: Path, image_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    record = json.loads(data_path.read_text())
    points = record["points"]
    base = next(p for p in points if p["kind"] == "baseline")
    fig, ax = plt.subplots(figsize=(10, 5), dpi=120)
    styles = {
        "aligned": ("o", "tab:blue", "llmq (aligned 4-bit stripes)"),
        "unaligned": ("x", "tab:red", "4-bit chosen freely per row (reference)"),
    }
    numbered = sorted((p for p in points if p["kind"] in styles), key=lambda q: q["bits_per_weight"])
    for kind, (marker, color, label) in styles.items():
        chosen = [p for p in numbered if p["kind"] == kind]
        ax.errorbar(
            [p["bits_per_weight"] for p in chosen],
            [p["ppl"] for p in chosen],
            yerr=[p["ppl_stderr"] for p in chosen],
            fmt=marker,
            color=color,
            label=label,
            capsize=3,
        )
    # Points crowd at 2.6-3.1 bits, so they carry numbers and the names go in a key beside the plot.
    for number, p in enumerate(numbered, start=1):
        ax.annotate(
            str(number), (p["bits_per_weight"], p["ppl"]), fontsize=7, xytext=(4, 3), textcoords="offset points"
        )
    key = "\n".join(f"{n:>2}  {p['name']}" for n, p in enumerate(numbered, start=1))
    fig.text(0.74, 0.5, key, fontsize=7, family="monospace", va="center")
    fig.subplots_adjust(right=0.72)
    ax.axhline(base["ppl"], color="gray", linestyle="--", label=f"fp32 baseline ({base['ppl']:.1f})")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (quantized Linears, everything counted)")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title(
        f"{record['model'].split(':')[0]} model, {record['text']}\n{record['date']}, round-to-nearest (no calibration)",
        fontsize=9,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    image_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(image_path)


def markdown_table(data_path: Path) -> str:
    points = sorted(
        json.loads(data_path.read_text())["points"], key=lambda p: (p["kind"] != "baseline", p["bits_per_weight"])
    )
    rows = ["| config | kind | bits/weight | ppl ± stderr | × fp32 |", "|---|---|---|---|---|"]
    for p in points:
        bits = f"{p['bits_per_weight']:.3f}"
        if "bits_per_weight_with_row_indices" in p:
            bits += f" ({p['bits_per_weight_with_row_indices']:.2f} with row indices)"
        rows.append(
            f"| {p['name']} | {p['kind']} | {bits} | {p['ppl']:.1f} ± {p['ppl_stderr']:.1f} | {p['ppl_ratio']:.2f} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]))
    print(markdown_table(Path(sys.argv[1])))

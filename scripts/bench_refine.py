#!/usr/bin/env python3
"""What block-wise refinement and the built-in calibration mix buy, and what they cost.

    python scripts/bench_refine.py --out docs/data/refine.json     # ~40 min on 2 cores

On the demo model, default preset, each combination of calibration text (``austen``: *Pride and
Prejudice*; ``mix``: the built-in set) and refinement (``none``, ``block``, and ``block`` with
fp32 inputs) is quantized through the real CLI and scored on two texts: *Persuasion* (first
16,384 tokens, 2048-token windows) and the legal text unlike any calibration source,
``docs/data/eval-licenses.txt`` (same protocol).
Every stage's wall time is given as a ratio to one plain fp32 forward pass over the same
calibration tokens, measured in this run, with each quantize process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

from benchlib import MODEL_LABEL, llmq

ROOT = Path(__file__).resolve().parent.parent
TEXTS = {
    "persuasion": ["--dataset", "austen"],
    "licenses": ["--text-file", str(ROOT / "docs" / "data" / "eval-licenses.txt")],
}
PROTOCOL = ["--seq-len", "2048", "--max-tokens", "16384"]
SAMPLES, SEQ_LEN, SEED = 64, 512, 0


def forward_seconds(calib: str) -> float:
    """One plain fp32 forward pass of the demo model over the calibration windows of ``calib``."""
    import torch

    from llmq.quant.calibrate import calibration_windows
    from llmq.runtime.loader import load_model
    from llmq.runtime.sources import models, text

    source = models.resolve_model("demo", progress=False)
    model = load_model(source, models.load_config(source), torch.device("cpu"), torch.float32)
    windows = calibration_windows(source, text.load(calib, text.Split.calib, None).text, SAMPLES, SEQ_LEN, SEED)
    start = time.perf_counter()
    with torch.inference_mode():
        for window in windows:
            model(window[None])
    return time.perf_counter() - start


def scores(model: str) -> dict:
    return {name: llmq("eval", "ppl", model, *args, *PROTOCOL)["result"] for name, args in TEXTS.items()}


# name -> (calibration text, refinement options)
VARIANTS = {
    "austen, none": ("austen", ["--refine", "none"]),
    "austen, block": ("austen", ["--refine", "block"]),
    "austen, block, fp32 inputs": ("austen", ["--refine", "block", "--refine-inputs", "fp"]),
    "mix, none": ("mix", ["--refine", "none"]),
    "mix, block": ("mix", ["--refine", "block"]),
}


def point(name: str, forward: dict, tmp: Path) -> dict:
    calib, refine = VARIANTS[name]
    out = tmp / "a.llmq"
    options = ["--calib-data", calib, *refine]
    quant = llmq("quantize", "demo", "-o", str(out), "--force", *options)
    return {
        "name": name,
        "command": f"llmq quantize demo -o OUT {' '.join(options)}",
        "calibration": calib,
        "bits_per_weight": quant["accounting"]["bits_per_weight"],
        "stages_seconds": quant["stages"],
        "stages_over_forward": {k: round(v / forward[calib], 2) for k, v in quant["stages"].items()},
        "total_over_forward": round(quant["seconds"] / forward[calib], 2),
        "peak_rss_mb": round(quant["peak_rss_bytes"] / 2**20, 1),
        "ppl": {name: {"ppl": r["ppl"], "stderr": r["ppl_stderr"]} for name, r in scores(str(out)).items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", nargs="+", choices=list(VARIANTS), help="these variants (default: all)")
    args = parser.parse_args()
    names = args.only or list(VARIANTS)
    forward = {calib: forward_seconds(calib) for calib in sorted({VARIANTS[n][0] for n in names})}
    record = {
        "model": MODEL_LABEL,
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, python {platform.python_version()}",
        "protocol": f"first 16384 tokens, 2048-token windows; calibration {SAMPLES} x {SEQ_LEN} tokens, seed {SEED}",
        "fp32_forward_seconds": {k: round(v, 1) for k, v in forward.items()},
        "fp32": {name: {"ppl": r["ppl"], "stderr": r["ppl_stderr"]} for name, r in scores("demo").items()},
        "points": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            record["points"].append(point(name, forward, Path(tmp)))
            print(json.dumps(record["points"][-1]), flush=True)
            args.out.write_text(json.dumps(record, indent=2) + "\n")  # after each point: an interrupted run keeps them


if __name__ == "__main__":
    main()

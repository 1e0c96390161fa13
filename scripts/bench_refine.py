#!/usr/bin/env python3
"""What block-wise refinement and the built-in calibration mix buy, and what they cost.

    python scripts/bench_refine.py --out docs/data/refine.json     # ~40 min on 2 cores

On the demo model, default preset, calibration texts (``austen``: *Pride and Prejudice*; ``first
mix``: the built-in set until 2026-12-01, a third prose, passed as a file of its exact text, so
the windows and weights are the same; ``mix``: the built-in set now, only with ``--only``) and
refinement (``none``, ``block``, and ``block`` with fp32 inputs; with ``--only``, ``e2e``, the
first mix with twice the windows, and the default preset's bits spread by ``--target-bits``,
which is what a calibrated run now does by default, and that with the codes tuned from the fp32
weights' unrounded positions, ``--refine-codes lean``; the other variants keep every Linear's
stripe fraction with ``--allocation uniform``) are quantized through the real CLI and scored on
two texts: *Persuasion* (first 16,384 tokens, 2048-token windows) and the legal text unlike any
calibration source, ``docs/data/eval-licenses.txt`` (same protocol).
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


FIRST_MIX = "first mix"


def calibration_text(calib: str) -> str:
    from llmq.runtime.sources import text

    if calib == FIRST_MIX:  # stats files that name it still load it, so its label does
        return text.from_source("mix:prose+technical+code").text
    return text.load(calib, text.Split.calib, None).text


def calib_data(calib: str, tmp: Path) -> str:
    """What ``--calib-data`` gets for ``calib``: its name, or for the first mix a file of its text
    (the same text gives the same tokens, windows and weights; the manifest names the file)."""
    if calib != FIRST_MIX:
        return calib
    path = tmp / "first-mix.txt"
    path.write_text(calibration_text(calib), encoding="utf-8")
    return str(path)


def forward_seconds(calib: str, samples: int) -> float:
    """One plain fp32 forward pass of the demo model over ``samples`` calibration windows of ``calib``."""
    import torch

    from llmq.quant.calibrate import calibration_windows
    from llmq.runtime.loader import load_model
    from llmq.runtime.sources import models

    source = models.resolve_model("demo", progress=False)
    model = load_model(source, models.load_config(source), torch.device("cpu"), torch.float32)
    windows = calibration_windows(source, calibration_text(calib), samples, SEQ_LEN, SEED)
    start = time.perf_counter()
    with torch.inference_mode():
        for window in windows:
            model(window[None])
    return time.perf_counter() - start


def scores(model: str) -> dict:
    return {name: llmq("eval", "ppl", model, *args, *PROTOCOL)["result"] for name, args in TEXTS.items()}


# The stripes as they were before the budget became the default: the same fraction in every Linear.
UNIFORM = ["--allocation", "uniform"]
# Block refinement from GPTQ's codes, as --refine block did before the leaning start became the
# default; the rows measured then keep meaning what they meant (their recorded commands got the flag).
BLOCK = ["--refine", "block", "--refine-codes", "gptq"]
LEAN = ["--refine", "block", "--refine-codes", "lean"]
BUDGET = ["--target-bits", "2.825"]
# name -> (calibration text, calibration windows, refinement options)
VARIANTS = {
    "austen, none": ("austen", SAMPLES, [*UNIFORM, "--refine", "none"]),
    "austen, block": ("austen", SAMPLES, [*UNIFORM, *BLOCK]),
    "austen, block, fp32 inputs": ("austen", SAMPLES, [*UNIFORM, *BLOCK, "--refine-inputs", "fp"]),
    "first mix, none": (FIRST_MIX, SAMPLES, [*UNIFORM, "--refine", "none"]),
    "first mix, block": (FIRST_MIX, SAMPLES, [*UNIFORM, *BLOCK]),
    "austen, e2e": ("austen", SAMPLES, [*UNIFORM, "--refine", "e2e", "--refine-codes", "gptq"]),
    "first mix x2 windows, block": (FIRST_MIX, 2 * SAMPLES, [*UNIFORM, *BLOCK]),
    "austen, block, target-bits 2.825": ("austen", SAMPLES, [*BLOCK, *BUDGET]),
    "first mix, block, target-bits 2.825": (FIRST_MIX, SAMPLES, [*BLOCK, *BUDGET]),
    "austen, block lean, target-bits 2.825": ("austen", SAMPLES, [*LEAN, *BUDGET]),
    "first mix, block lean, target-bits 2.825": (FIRST_MIX, SAMPLES, [*LEAN, *BUDGET]),
    "mix, block lean, target-bits 2.825": ("mix", SAMPLES, [*LEAN, *BUDGET]),
}
DEFAULT_VARIANTS = list(VARIANTS)[:5]  # the others are measured with --only


def point(name: str, forward: dict, tmp: Path) -> dict:
    calib, samples, refine = VARIANTS[name]
    out = tmp / "a.llmq"
    options = [*(["--samples", str(samples)] if samples != SAMPLES else []), *refine]
    forward_s = forward[f"{calib} x {samples}"]
    quant = llmq("quantize", "demo", "-o", str(out), "--force", "--calib-data", calib_data(calib, tmp), *options)
    shown = "FIRST_MIX_FILE" if calib == FIRST_MIX else calib
    return {
        "name": name,
        "command": f"llmq quantize demo -o OUT --calib-data {shown} {' '.join(options)}",
        "calibration": calib,
        "windows": samples,
        "bits_per_weight": quant["accounting"]["bits_per_weight"],
        "stages_seconds": quant["stages"],
        "fp32_forward_seconds": round(forward_s, 1),  # this run's, which the ratios divide by
        "stages_over_forward": {k: round(v / forward_s, 2) for k, v in quant["stages"].items()},
        "total_over_forward": round(quant["seconds"] / forward_s, 2),
        "peak_rss_mb": round(quant["peak_rss_bytes"] / 2**20, 1),
        "ppl": {name: {"ppl": r["ppl"], "stderr": r["ppl_stderr"]} for name, r in scores(str(out)).items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", nargs="+", choices=list(VARIANTS), help="run these and merge them into --out")
    args = parser.parse_args()
    names = args.only or DEFAULT_VARIANTS
    forward = {f"{c} x {s}": forward_seconds(c, s) for c, s in sorted({VARIANTS[n][:2] for n in names})}
    record = {
        "model": MODEL_LABEL,
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, python {platform.python_version()}",
        "protocol": f"first 16384 tokens, 2048-token windows; calibration windows of {SEQ_LEN} tokens, seed {SEED}",
        "fp32_forward_seconds": {k: round(v, 1) for k, v in forward.items()},
        "fp32": {name: {"ppl": r["ppl"], "stderr": r["ppl_stderr"]} for name, r in scores("demo").items()},
        "points": [],
    }
    if args.only and args.out.is_file():  # merge: keep the other variants' points and forward times
        earlier = json.loads(args.out.read_text())
        record["points"] = [p for p in earlier["points"] if p["name"] not in names]
        record["fp32_forward_seconds"] = earlier["fp32_forward_seconds"] | record["fp32_forward_seconds"]  # new wins
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            record["points"].append(point(name, forward, Path(tmp)))
            print(json.dumps(record["points"][-1]), flush=True)
            args.out.write_text(json.dumps(record, indent=2) + "\n")  # after each point: an interrupted run keeps them


if __name__ == "__main__":
    main()

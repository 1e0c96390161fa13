#!/usr/bin/env python3
"""Quantize-with-calibration wall time against one plain fp32 forward pass over the same tokens.

    python scripts/bench_calibration.py --out docs/data/calibration.json      # ~4 min on 2 cores

Both are measured in this run, on the demo model: the forward pass over the 64 x 512 calibration
windows `llmq quantize --calib-data austen --refine none` samples (same seed), and that quantize command
itself (inline calibration, Hessian-ranked stripes, GPTQ; refinement, which has its own 20x
target, is timed by scripts/bench_refine.py). The brief's target is at most 3x.
The resulting artifact's perplexity is measured too.
"""

from __future__ import annotations

import argparse
import datetime
import json
import tempfile
import time
from pathlib import Path

from benchlib import EVAL, llmq


def forward_seconds(samples: int, seq_len: int, seed: int) -> float:
    import torch

    from llmq.quant.calibrate import sample_windows
    from llmq.runtime.loader import load_model
    from llmq.runtime.sources import models, text, tokenize

    source = models.resolve_model("demo", progress=False)
    model = load_model(source, models.load_config(source), torch.device("cpu"), torch.float32)
    ids = tokenize.tokenize_stream(
        models.load_tokenizer(source), text.load_text(text.Dataset.austen, None, text.Split.calib).text
    )
    windows = sample_windows(ids, samples, seq_len, seed)
    start = time.perf_counter()
    with torch.inference_mode():
        for window in windows:
            model(window[None])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    samples, seq_len, seed = 64, 512, 0
    forward = forward_seconds(samples, seq_len, seed)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "demo-gptq.llmq"
        start = time.perf_counter()
        quant = llmq("quantize", "demo", "-o", str(out), "--calib-data", "austen", "--refine", "none")
        quantize = time.perf_counter() - start
        ppl = llmq("eval", "ppl", str(out), *EVAL, "--max-tokens", "16384")["result"]
    record = {
        "date": datetime.date.today().isoformat(),
        "command": "llmq quantize demo -o OUT --calib-data austen --refine none   (64 x 512 tokens, seed 0)",
        "fp32_forward_seconds": round(forward, 1),
        "quantize_seconds": round(quantize, 1),
        "ratio": round(quantize / forward, 2),
        "bits_per_weight": quant["accounting"]["bits_per_weight"],
        "ppl": ppl["ppl"],
        "ppl_stderr": ppl["ppl_stderr"],
    }
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()

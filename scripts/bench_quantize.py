#!/usr/bin/env python3
"""Wall time and peak RSS of `llmq quantize`, on the demo model and on a 1.1B-parameter random Llama.

    python scripts/bench_quantize.py --out docs/data/quantize.json            # demo + 1.1B (~6 min, 2.2 GB disk)
    python scripts/bench_quantize.py --out docs/data/quantize.json --skip-1b

The 1.1B model has TinyLlama's shapes (hidden 2048, 22 layers, vocab 32000), random fp16
weights written straight to safetensors shards (about 2.2 GB), so it never exists in memory as
a whole. Peak RSS is the child process's ru_maxrss, which counts everything it touched,
memory-mapped file pages included. The same run also times `eval ppl` on the quantized demo
artifact against the fp32 demo model.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import sys
import tempfile
from pathlib import Path

from benchlib import run_measured, write_random_llama


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--skip-1b", action="store_true")
    args = parser.parse_args()
    llmq = [sys.executable, "-m", "llmq.cli"]
    results = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores"}
    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        demo = run_measured([*llmq, "quantize", "demo", "-o", str(tmpdir / "demo.llmq"), "--no-calib", "--json", "-q"])
        results["demo"] = {
            "command": "llmq quantize demo -o demo.llmq --no-calib",
            **{k: v for k, v in demo.items() if k not in ("stdout", "stderr")},
        }
        results["demo"]["bits_per_weight"] = json.loads(demo["stdout"])["accounting"]["bits_per_weight"]
        eval_run = run_measured(
            [
                *llmq,
                "eval",
                "ppl",
                str(tmpdir / "demo.llmq"),
                "--dataset",
                "austen",
                "--max-tokens",
                "16384",
                "--json",
                "-q",
            ]
        )
        base_run = run_measured(
            [*llmq, "eval", "ppl", "demo", "--dataset", "austen", "--max-tokens", "16384", "--json", "-q"]
        )
        results["eval_speed"] = {
            "command": "llmq eval ppl {demo|demo.llmq} --dataset austen --max-tokens 16384",
            "quantized_tokens_per_s": json.loads(eval_run["stdout"])["timing"]["tokens_per_s"],
            "fp32_tokens_per_s": json.loads(base_run["stdout"])["timing"]["tokens_per_s"],
        }
        if not args.skip_1b:
            folder = tmpdir / "random-llama-1.1b"
            folder.mkdir()
            params = write_random_llama(folder, 2048, 5632, 22, 32, 4, 32000)  # TinyLlama's shapes
            disk = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
            (folder / "tokenizer_config.json").write_text("{}")
            big_run = [*llmq, "quantize", str(folder), "-o", str(tmpdir / "big.llmq"), "--no-calib", "--json", "-q"]
            big = run_measured(big_run)
            results["random_1b"] = {
                "command": "llmq quantize random-llama-1.1b -o big.llmq --no-calib",
                "params": params,
                "safetensors_bytes": disk,
                **{k: v for k, v in big.items() if k not in ("stdout", "stderr")},
                "bits_per_weight": json.loads(big["stdout"])["accounting"]["bits_per_weight"],
            }
    results["peak_rss_of_this_driver_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

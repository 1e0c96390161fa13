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
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_measured(cmd: list[str]) -> dict:
    """Run ``cmd`` in a fresh process; its wall time and peak RSS (via wait4)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    stdout, stderr = proc.stdout.read(), proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{stderr}")
    return {"seconds": round(seconds, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "stdout": stdout}


def make_random_llama(folder: Path) -> int:
    """Write a TinyLlama-shaped model with random fp16 weights, one shard per decoder layer."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
        num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False,
    )  # fmt: skip
    config.save_pretrained(folder)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    shards: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, param in skeleton.named_parameters():
        unit = name.split(".")[2] if ".layers." in name else "rest"
        shards.setdefault(unit, {})[name] = tuple(param.shape)
    index, total = {}, 0
    gen = torch.Generator().manual_seed(0)
    for i, params in enumerate(shards.values()):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape in params.items():
            tensors[name] = (
                (torch.randn(shape, generator=gen) * 0.02).half()
                if len(shape) > 1
                else torch.ones(shape, dtype=torch.float16)
            )
            total += tensors[name].numel()
            index[name] = file
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    return total


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
            **{k: v for k, v in demo.items() if k != "stdout"},
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
            params = make_random_llama(folder)
            disk = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
            (folder / "tokenizer_config.json").write_text("{}")
            big_run = [*llmq, "quantize", str(folder), "-o", str(tmpdir / "big.llmq"), "--no-calib", "--json", "-q"]
            big = run_measured(big_run)
            results["random_1b"] = {
                "command": "llmq quantize random-llama-1.1b -o big.llmq --no-calib",
                "params": params,
                "safetensors_bytes": disk,
                **{k: v for k, v in big.items() if k != "stdout"},
                "bits_per_weight": json.loads(big["stdout"])["accounting"]["bits_per_weight"],
            }
    results["peak_rss_of_this_driver_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

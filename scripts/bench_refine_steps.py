#!/usr/bin/env python3
"""Refinement steps against quality: does the default path keep its quality with fewer steps?

    python scripts/bench_refine_steps.py --out docs/data/refine_steps.json      # ~2.5 h alone on 2 cores
    python scripts/bench_refine_steps.py --out X --model DIR --samples 8 --calib-seq-len 64 \\
        --steps 4,2 --seeds 0,1 --max-tokens 256 --seq-len 64                    # the test's miniature

For each calibration seed, ``llmq calibrate MODEL -o S.stats --seed SEED`` (the default windows unless
``--samples``/``--calib-seq-len``), then for each step count ``llmq quantize MODEL --calib S.stats
--refine-steps N``, each in a fresh process and timed (run nothing beside it). Every artifact and
the unquantized model are scored by ``llmq eval ppl`` on the dev and the test texts of
docs/data/texts.json (scripts/build_eval_texts.py). Per step count and seed the record keeps the
stage times, peak RSS, bits and each text's perplexity and ratio to the unquantized model's; per
step count, each text's mean ratio over the seeds with its spread (sample standard deviation, min,
max) and the whole path's time (calibrate + quantize) likewise.

Choose on the dev texts only: a step count keeps the default's quality when its mean dev ratios lie
within the seed-to-seed spread of the default's. The test texts are reported, never used to choose.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from benchlib import command_line, llmq, measured_llmq, provenance

ROOT = Path(__file__).resolve().parent.parent


def texts() -> dict[str, dict[str, list[str]]]:
    """{"dev"|"test": {name: eval options}} from docs/data/texts.json, paths made absolute."""
    split = json.loads((ROOT / "docs" / "data" / "texts.json").read_text())
    options = {}
    for role in ("dev", "test"):
        options[role] = {}
        for name, entry in split[role].items():
            words = entry["option"].split()
            options[role][name] = [str(ROOT / w) if w.startswith("docs/") else w for w in words]
    return options


def score(model: str, eval_options: list[str], all_texts: dict) -> dict[str, float]:
    return {name: llmq("eval", "ppl", model, *options, *eval_options)["result"]["ppl"]
            for role in all_texts.values() for name, options in role.items()}  # fmt: skip


def spread(values: list[float]) -> dict[str, float]:
    std = statistics.stdev(values) if len(values) > 1 else None
    return {"mean": statistics.fmean(values), "std": std, "min": min(values), "max": max(values), "n": len(values)}


def summarize(points: list[dict], steps: list[int], all_texts: dict) -> dict:
    summary = {}
    for n in steps:
        mine = [p for p in points if p["refine_steps"] == n]
        if not mine:
            continue
        summary[str(n)] = {
            "path_seconds": spread([p["calibrate"]["seconds"] + p["quantize"]["seconds"] for p in mine]),
            "quantize_seconds": spread([p["quantize"]["seconds"] for p in mine]),
            "ratio": {name: spread([p["ratio"][name] for p in mine])
                      for role in all_texts.values() for name in role},
        }  # fmt: skip
    return summary


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--steps", default="50,25", help="refinement step counts, the default's first")
    parser.add_argument("--seeds", default="0,1,2", help="calibration seeds")
    parser.add_argument("--samples", type=int, help="calibration windows (default: llmq's)")
    parser.add_argument("--calib-seq-len", type=int, help="calibration window length (default: llmq's)")
    parser.add_argument("--seq-len", type=int, default=1024, help="eval window length")
    parser.add_argument("--max-tokens", type=int, default=8192, help="eval tokens per text")
    args = parser.parse_args(argv)
    args.steps = [int(s) for s in args.steps.split(",")]
    args.seeds = [int(s) for s in args.seeds.split(",")]
    return args


def main() -> None:
    args = parse_args()
    all_texts = texts()
    eval_options = ["--seq-len", str(args.seq_len), "--max-tokens", str(args.max_tokens)]
    windows = [*(["--samples", str(args.samples)] if args.samples else []),
               *(["--seq-len", str(args.calib_seq_len)] if args.calib_seq_len else [])]  # fmt: skip
    record = {**provenance(command_line()), "model": args.model,
              "texts": {role: list(names) for role, names in all_texts.items()},
              "eval": " ".join(eval_options), "points": []}  # fmt: skip
    record["unquantized"] = score(args.model, eval_options, all_texts)
    with tempfile.TemporaryDirectory(dir=args.out.resolve().parent) as tmp:
        for seed in args.seeds:
            stats = str(Path(tmp) / f"seed{seed}.stats")
            _, calibrated = measured_llmq("calibrate", args.model, "-o", stats, "--seed", str(seed), *windows)
            for n in args.steps:
                out = str(Path(tmp) / f"s{seed}-n{n}.llmq")
                document, quantized = measured_llmq("quantize", args.model, "-o", out, "--calib", stats,
                                                    "--refine-steps", str(n))  # fmt: skip
                ppl = score(out, eval_options, all_texts)
                record["points"].append({
                    "seed": seed, "refine_steps": n, "calibrate": calibrated,
                    "quantize": {**quantized, "stages_seconds": document["stages"]},
                    "bits_per_weight": document["accounting"]["bits_per_weight"], "ppl": ppl,
                    "ratio": {name: ppl[name] / record["unquantized"][name] for name in ppl},
                })  # fmt: skip
                record["summary"] = summarize(record["points"], args.steps, all_texts)
                args.out.write_text(json.dumps(record, indent=2) + "\n")  # after each point
    print(json.dumps(record["summary"], indent=2))


if __name__ == "__main__":
    main()

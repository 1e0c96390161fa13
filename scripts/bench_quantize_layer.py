#!/usr/bin/env python3
"""Quantize time and memory of real-size decoder layers: Llama-2-7B's and a 70B's, on any device.

    python scripts/bench_quantize_layer.py --work DIR --out layers.json --device cuda     # gpu_check.sh
    python scripts/bench_quantize_layer.py --work DIR --out layers.json --device cpu --shapes 70b --layers 2 \
        --samples 4 --seq-len 256 --refine-steps 2                                        # a CPU slice
    python scripts/bench_quantize_layer.py --work DIR --out refine.json --device cpu --shapes 70b --layers 1 \
        --samples 4 --seq-len 256 --refine-steps 2 --rtn                                  # refinement alone

For each shape a Llama-architecture folder with ``--layers`` decoder layers of random fp16 weights
(N(0, 0.02²)) and a byte-level BPE tokenizer trained here on the built-in calibration mix is
written to DIR, then quantized by the default path (calibration on the mix, output Fisher,
budget, GPTQ, block refinement) with the given windows and steps, in a process of its own, after
``llmq quantize --dry-run`` of the same run (a process of its own too) recorded its forecast. The
record gives each stage's wall time and the most the process held during it (sampled every half
second), the process's peak RSS and, on a GPU, torch's peak allocated memory; the forecast beside
them; and, clearly labelled an estimate, the whole model's stage times at its depth
(32 layers for 7B, 80 for 70B) as per-layer time times layers, which leaves out what does not
grow with the depth. The fp16 folders are deleted at the end. The GPU image needs no download:
the tokenizer is trained from the text llmq ships.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

from benchlib import command_line, peak_between, provenance

SHAPES = {  # hidden, MLP, heads, KV heads, vocabulary, layers of the whole model
    "7b": (4096, 11008, 32, 32, 32000, 32),
    "70b": (8192, 28672, 64, 8, 32000, 80),
    "tiny": (64, 128, 4, 2, 400, 2),  # the CPU test of this script
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="scratch folder for the fp16 folders and artifacts")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--shapes", default="7b,70b")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--refine-steps", type=int, default=10)
    parser.add_argument("--rtn", action="store_true",
                        help="round to nearest (no calibration, no GPTQ), then refine on random token windows: "
                             "the refinement stage of a large layer in minutes; its cost does not depend on how "
                             "the numbers it starts from were chosen")  # fmt: skip
    parser.add_argument("--one", help=argparse.SUPPRESS)  # run one shape in this process (the parent's child)
    return parser.parse_args(argv)


def write_model(folder: Path, shape: str, layers: int) -> int:
    """The fp16 folder and its tokenizer; returns the parameter count."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from benchlib import train_tokenizer, write_random_llama

    from llmq.runtime.sources.text import Dataset, Split, load_text

    hidden, mlp, heads, kv_heads, vocab, _ = SHAPES[shape]
    folder.mkdir(parents=True)
    params = write_random_llama(folder, hidden, mlp, layers, heads, kv_heads, vocab)
    train_tokenizer(load_text(Dataset.mix, None, Split.calib).text, vocab).save_pretrained(folder)
    return params


def dry_run(args, folder: Path) -> dict:
    """``llmq quantize --dry-run`` of the run :func:`run_one` makes: each phase's forecast peak and time."""
    options = ["--samples", str(args.samples), "--calib-seq-len", str(args.seq_len), "--refine-steps",
               str(args.refine_steps), "--device", args.device]  # fmt: skip
    command = [sys.executable, "-m", "llmq.cli", "quantize", str(folder), "-o", str(args.work / "dry.llmq"), *options]
    done = subprocess.run([*command, "--dry-run", "--json", "-q"], capture_output=True, text=True, check=True)
    estimate = json.loads(done.stdout)["estimate"]
    return {"command": "llmq quantize MODEL -o OUT --dry-run " + " ".join(options), "seconds": estimate["seconds"],
            "peak_rss_bytes": estimate["peak_rss_bytes"], "phases": estimate["phases"]}  # fmt: skip


def run_one(args) -> dict:
    """One shape, quantized in this process; what it cost."""
    import threading

    import torch
    from benchlib import sample_rss

    import llmq
    from llmq.runtime.sources.feedback import Feedback

    folder = args.work / f"random-{args.one}"
    started = time.perf_counter()
    params = write_model(folder, args.one, args.layers)
    written = time.perf_counter() - started
    forecast = dry_run(args, folder)
    samples: list[tuple[float, float]] = []
    threading.Thread(target=sample_rss, args=(os.getpid(), started, samples), daemon=True).start()
    ended: dict[str, float] = {}
    config = llmq.QuantConfig()
    config = replace(config, refine_settings=replace(config.refine_settings, steps=args.refine_steps))
    stages: dict[str, float] = {}
    cuda = torch.cuda.is_available() and args.device != "cpu"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    quantize_started = time.perf_counter()
    feedback = Feedback(stage=partial(_stage_ended, stages, ended, started))
    out = args.work / f"{args.one}.llmq"
    if args.rtn:
        manifest = _rtn_then_refine(folder, out, args, feedback)
    else:
        manifest = llmq.quantize(folder, out, config, device=args.device, force=True, feedback=feedback,
                                 calib_data=llmq.CalibData(samples=args.samples, seq_len=args.seq_len))  # fmt: skip
    seconds = time.perf_counter() - quantize_started
    hidden, mlp, heads, kv_heads, vocab, depth = SHAPES[args.one]
    per_layer = {name: value / args.layers for name, value in stages.items()}
    return {
        "shape": args.one, "hidden": hidden, "mlp": mlp, "heads": heads, "kv_heads": kv_heads, "vocab": vocab,
        "layers": args.layers, "params": params, "device": args.device,
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "samples": args.samples, "seq_len": args.seq_len, "refine_steps": args.refine_steps, "rtn": args.rtn,
        "write_seconds": round(written, 1), "quantize_seconds": round(seconds, 1), "stages_seconds": stages,
        "bits_per_weight": manifest.accounting().bits_per_weight,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_gpu_allocated_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "stages_peak_rss_mb": _stage_peaks(stages, ended, samples), "forecast": forecast,
        "estimate_whole_model": {
            "what": f"an estimate: per-layer stage seconds x {depth} layers; fixed costs (embedding, head) left out",
            "layers": depth, "stages_seconds": {n: round(v * depth, 1) for n, v in per_layer.items()},
        },
    }  # fmt: skip


def _rtn_then_refine(folder: Path, out: Path, args, feedback):
    """The default path's refinement stage (lean codes, ``--refine-steps``) on random token windows,
    started from round-to-nearest numbers (minmax groups, range-ranked stripes) instead of GPTQ's:
    :func:`llmq.quant.pipeline.quantize_model` as ``llmq.quantize`` calls it, without calibration."""
    import torch

    from llmq.quant import pipeline
    from llmq.quant.config import QuantConfig, Refine, RefineSettings, Rounding
    from llmq.quant.plan import make_plan
    from llmq.runtime.sources.device import resolve_device
    from llmq.runtime.sources.models import open_model

    source, model_config = open_model(str(folder), None, False, feedback)
    config = QuantConfig(rounding=Rounding.minmax).for_run(calibrated=False)
    started = time.perf_counter()
    plan = make_plan(source, model_config, config, None)
    feedback.stage("plan", time.perf_counter() - started)
    refine = RefineSettings(steps=args.refine_steps)
    config = replace(config, refine=Refine.block, refine_settings=replace(refine, lr=refine.code_lr))
    gen = torch.Generator().manual_seed(0)
    windows = torch.randint(SHAPES[args.one][4], (args.samples, args.seq_len), generator=gen)
    refinement = pipeline.Refinement(windows, model_config)
    return pipeline.quantize_model(source, out, config, plan, force=True, device=resolve_device(args.device),
                                   refinement=refinement, stage=feedback.stage)  # fmt: skip


def _stage_ended(stages: dict, ended: dict, started: float, name: str, seconds: float) -> None:
    stages[name], ended[name] = seconds, time.perf_counter() - started
    print(f"{name}: {seconds:.1f} s", file=sys.stderr, flush=True)  # the parent keeps the last lines of a killed child


def _stage_peaks(stages: dict, ended: dict, samples: list[tuple[float, float]]) -> dict:
    """The most resident MB sampled during each stage (None where no sample fell inside it)."""
    return {name: peak_between(samples, ended[name] - stages[name], ended[name]) for name in stages}


def main() -> None:
    args = parse_args()
    if args.one:
        print(json.dumps(run_one(args)))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    record = {**provenance(command_line()), "points": []}
    try:
        for shape in args.shapes.split(","):
            if shape not in SHAPES:
                raise SystemExit(f"--shapes: {shape!r} is not one of {', '.join(SHAPES)}")
            child = [sys.executable, __file__, *sys.argv[1:], "--one", shape]
            done = subprocess.run(child, capture_output=True, text=True)
            if done.returncode != 0:
                record["points"].append({"shape": shape, "returncode": done.returncode,
                                         "error": done.stderr.strip().splitlines()[-5:]})  # fmt: skip
            else:
                record["points"].append(json.loads(done.stdout.strip().splitlines()[-1]))
            args.out.write_text(json.dumps(record, indent=2) + "\n")  # each shape as it finishes
            shutil.rmtree(args.work / f"random-{shape}", ignore_errors=True)
    finally:
        shutil.rmtree(args.work, ignore_errors=True)
    print(json.dumps(record, indent=2))
    if any("error" in point for point in record["points"]):
        sys.exit(1)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""`quantize --dry-run`'s forecast against the run it forecasts: each phase's wall time and peak RSS.

    python scripts/bench_forecast.py --out docs/data/forecast.json                 # every point
    python scripts/bench_forecast.py --out docs/data/forecast.json --only demo-s16  # one point
    python scripts/bench_forecast.py --out docs/data/forecast.json --fit h512-l4,h1024-l2  # suggest factors
    python scripts/bench_forecast.py --out docs/data/forecast.json --rescore  # forecasts at today's factors
    python scripts/bench_forecast.py --out docs/data/forecast.json --forecast-only  # new dry runs, same runs

Each point is a dry run (its forecast, and the device rates it measured) followed by the same
command for real in a fresh process, its resident set sampled every half second and its stages
read from the log (benchlib.run_measured). Random-weight points are Llama-architecture models
with the demo model's tokenizer (vocabulary 49,152). ``--fit`` prints, per phase, the factor
that would make the counted seconds (the forecast without ``EFFICIENCY``) match the named
points' measured seconds: the geometric mean of their ratios. The factors in
llmq/quant/forecast.py come from it; the points not named are the check. ``--rescore`` recomputes
every point's forecast seconds as its dry run's counted seconds times the factors llmq has now
(the dry run's counts and rates do not depend on them), and the errors against the measured run.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

from benchlib import command_line, provenance, run_measured, write_random_llama

# name -> (model: "demo" or (hidden, mlp, layers, heads, kv_heads), quantize options)
POINTS = {
    "h512-l4": ((512, 2048, 4, 8, 4), ["--samples", "8", "--calib-seq-len", "256", "--refine-steps", "5"]),
    "h1024-l2": ((1024, 4096, 2, 16, 4), ["--samples", "8", "--calib-seq-len", "256", "--refine-steps", "5"]),
    "h768-l3": ((768, 3072, 3, 12, 4), ["--samples", "16", "--calib-seq-len", "256", "--refine-steps", "10"]),
    "h1536-l1": ((1536, 6144, 1, 16, 4), ["--samples", "8", "--calib-seq-len", "512", "--refine-steps", "5"]),
    "demo-s16": ("demo", ["--samples", "16", "--calib-seq-len", "512", "--refine-steps", "10"]),
    "demo-default": ("demo", []),
}
DEMO_VOCAB = 49152
MODEL_FIELDS = ("hidden", "mlp", "layers", "heads", "kv_heads")


def model_folder(tmp: Path, spec) -> str:
    if spec == "demo":
        return "demo"
    from llmq.runtime.sources import models

    hidden, mlp, layers, heads, kv_heads = spec
    folder = tmp / "model"
    folder.mkdir()
    write_random_llama(folder, hidden, mlp, layers, heads, kv_heads, DEMO_VOCAB)
    demo = models.resolve_model("demo", progress=False).path
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(demo / name, folder / name)
    return str(folder)


def point(tmp: Path, name: str, old: dict | None = None) -> dict:
    """Dry run and real run of point ``name``; with ``old`` (its record), the dry run alone, the
    measured run kept from ``old``."""
    spec, options = POINTS[name]
    model = model_folder(tmp, spec)
    base = [sys.executable, "-m", "llmq.cli", "quantize", model, "-o", str(tmp / "q.llmq"), "--force", *options]
    dry = json.loads(run_measured([*base, "--dry-run", "--json"])["stdout"])["estimate"]
    if old is None:
        run = run_measured([*base, "--json"])
        stages, rss = json.loads(run["stdout"])["stages"], run["rss_by_stage"]
        measured = {"measured_seconds": run["seconds"], "measured_peak_rss_mb": run["peak_rss_mb"]}
        # how many blocks tuned twice (lean codes lost, then GPTQ's codes), which the forecast takes as half
        measured["refine_log"] = [line for line in run["stderr"].splitlines() if "blocks kept their tuned" in line]
    else:
        stages = {phase: v["measured_seconds"] for phase, v in old["phases"].items()}
        rss = {phase: {"peak_rss_mb": v["measured_peak_rss_mb"]} for phase, v in old["phases"].items()}
        measured = {k: old[k] for k in ("measured_seconds", "measured_peak_rss_mb")}
        measured["measured_commit"] = old.get("measured_commit", old["commit"])  # the run's, not this dry run's
    return {
        "name": name,
        "model": spec if spec == "demo" else dict(zip(MODEL_FIELDS, spec, strict=True)),
        "command": f"llmq quantize {'demo' if spec == 'demo' else 'RANDOM'} -o OUT {' '.join(options)}",
        "speed": dry["speed"],
        "forecast_peak_rss_mb": round(dry["peak_rss_bytes"] / 2**20, 1),
        "forecast_base_rss_mb": round(dry["base_rss_bytes"] / 2**20, 1),
        "phases": {phase: _phase(forecast, phase, stages, rss) for phase, forecast in dry["phases"].items()},
    } | measured  # fmt: skip


def _phase(forecast: dict, phase: str, stages: dict, rss: dict) -> dict:
    from llmq.quant.forecast import EFFICIENCY

    return {
        "counted_seconds": round(forecast["seconds"] / EFFICIENCY[phase], 2),
        "measured_seconds": stages.get(phase),
        "forecast_peak_rss_mb": round(forecast["peak_rss_bytes"] / 2**20, 1),
        "measured_peak_rss_mb": rss.get(phase, {}).get("peak_rss_mb"),
    }


def rescore(record: dict) -> None:
    """Each point's forecast seconds at the factors llmq has now, and its errors against the run."""
    from llmq.quant.forecast import EFFICIENCY

    for p in record["points"]:
        for phase, v in p["phases"].items():
            v["forecast_seconds"] = round(v["counted_seconds"] * EFFICIENCY[phase], 1)
            if v["measured_seconds"]:
                v["seconds_error"] = round(v["forecast_seconds"] / v["measured_seconds"] - 1, 3)
        p["efficiency_used"] = {phase: EFFICIENCY[phase] for phase in p["phases"]}
        p["forecast_seconds"] = round(sum(v["forecast_seconds"] for v in p["phases"].values()), 1)
        p["seconds_error"] = round(p["forecast_seconds"] / p["measured_seconds"] - 1, 3)
        p["peak_rss_error"] = round(p["forecast_peak_rss_mb"] / p["measured_peak_rss_mb"] - 1, 3)


def fit(record: dict, names: list[str]) -> dict[str, float]:
    """Per phase, the factor making counted seconds match the named points' measured ones."""
    ratios: dict[str, list[float]] = {}
    for p in record["points"]:
        if p["name"] in names:
            for phase, v in p["phases"].items():
                if v["measured_seconds"]:
                    ratios.setdefault(phase, []).append(v["measured_seconds"] / v["counted_seconds"])
    return {phase: round(math.exp(sum(map(math.log, r)) / len(r)), 3) for phase, r in ratios.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON record; points are merged in by name")
    parser.add_argument("--only", default=",".join(POINTS), help="comma-separated point names")
    parser.add_argument("--fit", help="comma-separated point names: print the factors they give; run nothing")
    parser.add_argument("--rescore", action="store_true", help="forecasts at today's factors; run nothing")
    parser.add_argument("--forecast-only", action="store_true",
                        help="make the points' dry runs again, keeping their measured runs")  # fmt: skip
    args = parser.parse_args()
    record = json.loads(args.out.read_text()) if args.out.exists() else {"points": []}
    if args.fit:
        print(json.dumps(fit(record, args.fit.split(","))))
        return
    if args.rescore:
        rescore(record)
        args.out.write_text(json.dumps(record, indent=2) + "\n")
        return
    record["what"] = "quantize --dry-run's forecast of each phase against the measured run (bench_forecast.py)"
    script = command_line()
    for name in args.only.split(","):
        old = next((p for p in record["points"] if p["name"] == name), None) if args.forecast_only else None
        if args.forecast_only and old is None:
            raise SystemExit(f"--forecast-only: {args.out} has no point {name} to keep the measured run of")
        with tempfile.TemporaryDirectory(dir=args.out.resolve().parent) as tmp:
            new = point(Path(tmp), name, old) | provenance(script)
        new.setdefault("measured_commit", new["commit"])
        record["points"] = [p for p in record["points"] if p["name"] != name] + [new]
        rescore(record)
        args.out.write_text(json.dumps(record, indent=2) + "\n")
        print(json.dumps(new), flush=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Calibrated perplexity against bits per weight on the demo model (llmq's own configurations).

    python scripts/bench_calibrated.py --out docs/data/calibrated.json             # ~40 min on 2 cores
    python scripts/bench_calibrated.py --out docs/data/calibrated.json --only NAME  # re-run one point, merge
    python scripts/bench_calibrated.py --out docs/data/calibrated.json --resume     # finish an interrupted sweep
    python scripts/bench_peers.py --out docs/data/calibrated.json                  # HQQ and plain GPTQ, merged
    python scripts/plot_quality.py docs/data/calibrated.json docs/img/ppl_vs_bits_calibrated.png

One stats file (`llmq calibrate demo -o STATS --dataset austen`: 64 x 512 tokens of *Pride and
Prejudice*, seed 0) serves every calibrated point, so the points differ only in their options.
Each point is the real path: `llmq quantize demo -o OUT --calib STATS <options>`, then `llmq
eval ppl OUT` on the first 16,384 tokens of *Persuasion*. Families:

- gptq: Hessian-ranked stripes + GPTQ, uniform stripe fraction per Linear, no act-order;
- rtn: the same options without calibration (round-to-nearest, range-ranked stripes);
- gptq-range: GPTQ (no act-order), but the stripes ranked by the data-free range score;
- gptq-budget: GPTQ (no act-order) with `--target-bits`, stripes spread over Linears by sensitivity
  (measured when the budget compared Linears by output error; stats files now carry the output
  Fisher, so the same command now ranks by predicted KL);
- budget-kl: act-order GPTQ with `--target-bits`, ranked by predicted KL (the output Fisher);
- gptq-act-order: GPTQ with `--act-order` (columns in descending E[x²] within each part; the
  default since it was measured);
- gptq-outliers: the default preset (act-order on) plus `--outliers`;
- refined: act-order GPTQ then block-wise refinement (`--refine block`, its default settings);
- refined-budget: the same with `--target-bits` (predicted KL) at the uniform refined points' bits;
- refined-longer: a refined-budget point with four times the default refinement steps (200, as
  many as AutoRound's iterations), to see what steps buy where AutoRound leads;
- refined-lean: refined-budget with `--refine-codes lean` (codes tuned from the fp32 weights'
  unrounded positions, each block kept only where they beat GPTQ's).

Calibration and refinement became defaults after most families were measured: the rtn family
passes `--no-calib` and every other family but refined passes `--refine none`, so each command
still means what it meant when measured. Likewise the refined families measured before
`--refine-codes lean` became the default pass `--refine-codes gptq`, which is what `--refine
block` did then (their recorded commands were given the flag when the default changed).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from benchlib import CALIBRATE, artifact_point, baseline_point, calibrate_demo, merge, record


def _groups(fraction: float, g1: int, g4: int = 64, g2: int = 16) -> list[str]:
    return ["--stripe-fraction", str(fraction), "--g1", str(g1), "--g2", str(g2), "--g4", str(g4)]


# name -> options (--g2 16, the default, unless the name says otherwise)
CONFIGS = {
    "2bit g64": _groups(0.0, 64),
    "2bit g32": _groups(0.0, 32),
    "mixed 12.5% g64": _groups(0.125, 64),
    "mixed 12.5% g32": _groups(0.125, 32),
    "2bit g16": _groups(0.0, 16),
    "mixed 25% g64": _groups(0.25, 64),
    "mixed 25% g32": _groups(0.25, 32),
    "mixed 12.5% g16": _groups(0.125, 16),
    "mixed 25% g32 g2=8": _groups(0.25, 32, g2=8),
    "mixed 30% g64": _groups(0.3, 64),
    "mixed 25% g32 g4=32": _groups(0.25, 32, g4=32),
    "mixed 25% g16": _groups(0.25, 16),
    "mixed 37.5% g32": _groups(0.375, 32),
    "mixed 37.5% g16": _groups(0.375, 16),
    "mixed 50% g32": _groups(0.5, 32),
    "mixed 75% g16": _groups(0.75, 16),
    "4bit g128": _groups(1.0, 16, 128),
    "4bit g64": _groups(1.0, 16),
}
RTN = ["2bit g32", "mixed 12.5% g32", "mixed 12.5% g16", "mixed 25% g16", "mixed 37.5% g32",
       "mixed 75% g16", "4bit g64"]  # fmt: skip
RANGE = ["mixed 12.5% g32", "mixed 12.5% g16", "mixed 25% g16", "mixed 37.5% g32"]
BUDGET = {
    "budget 2.58 g32": ["--g1", "32", "--target-bits", "2.58"],
    "budget 2.85 g16": ["--target-bits", "2.85"],
    "budget 3.06 g16": ["--target-bits", "3.06"],
    "budget 3.07 g32": ["--g1", "32", "--target-bits", "3.07"],
}
# At the bits of the uniform refined points (12.5% g32, 25% g32 = the default preset, 30% g64) and of a peer.
# 2.5625: AutoRound's 2-bit g32 as its auto_gptq export stores it.
# 3.1608 and 2.2812: AutoRound's 3-bit g128 and 2-bit g64 (g64 2-bit groups: pure 2-bit g32 is 2.37).
BUDGET_KL = {"budget 2.582": ["--target-bits", "2.582"], "budget 2.825": ["--target-bits", "2.825"],
             "budget 2.936": ["--target-bits", "2.936"], "budget 2.5625": ["--target-bits", "2.5625"],
             "budget 3.1608": ["--target-bits", "3.1608"],
             "budget 2.2812 g64": ["--g1", "64", "--target-bits", "2.2812"]}  # fmt: skip
LONGER = {"budget 3.1608, 200 steps": ["--target-bits", "3.1608", "--refine-steps", "200"]}
OUTLIERS = {
    "default + 0.25% outliers": ["--outliers", "0.0025"],
    "default + 0.5% outliers": ["--outliers", "0.005"],
    "default + 1% outliers": ["--outliers", "0.01"],
}
ACT_ORDER = ["mixed 12.5% g32", "mixed 25% g32", "mixed 25% g32 g2=8", "mixed 12.5% g16", "mixed 30% g64",
             "mixed 25% g16", "mixed 37.5% g16", "mixed 25% g32 g4=32"]  # fmt: skip
REFINED = ["2bit g32", "mixed 12.5% g32", "mixed 25% g32", "mixed 30% g64", "mixed 25% g16", "mixed 37.5% g16"]
# The gptq, range and budget families were measured before activation ordering became the
# default; they keep it off so that each family differs from the others in one option only.
NO_ACT_ORDER = "--no-act-order"
# Every family but the budgets keeps the same stripe fraction in each Linear, as before the budget
# became the default of a calibrated run.
UNIFORM = ["--allocation", "uniform"]


def plan(stats: Path) -> dict[str, tuple[str, list[str]]]:
    """Every point: name -> (family, llmq quantize options)."""
    budget = ["--calib", str(stats), "--refine", "none"]
    calib = [*budget, *UNIFORM]
    off = [*calib, NO_ACT_ORDER]
    points = {f"gptq {name}": ("gptq", [*off, *options]) for name, options in CONFIGS.items()}
    points.update({f"rtn {name}": ("rtn", ["--no-calib", *CONFIGS[name]]) for name in RTN})
    points.update({f"range {n}": ("gptq-range", [*off, *CONFIGS[n], "--selection", "range"]) for n in RANGE})
    points.update(
        {f"gptq {name}": ("gptq-budget", [*budget, NO_ACT_ORDER, *options]) for name, options in BUDGET.items()}
    )
    points.update({f"act-order {n}": ("gptq-act-order", [*calib, *CONFIGS[n], "--act-order"]) for n in ACT_ORDER})
    points.update({f"gptq {name}": ("gptq-outliers", [*calib, *options]) for name, options in OUTLIERS.items()})
    block = ["--calib", str(stats), "--refine", "block"]
    refined = [*block, "--refine-codes", "gptq"]
    points.update({f"refined {n}": ("refined", [*refined, *UNIFORM, *CONFIGS[n]]) for n in REFINED})
    points.update({f"act-order {n}": ("budget-kl", [*budget, *options]) for n, options in BUDGET_KL.items()})
    points.update({f"refined {n}": ("refined-budget", [*refined, *options]) for n, options in BUDGET_KL.items()})
    points.update({f"refined {n}": ("refined-longer", [*refined, *options]) for n, options in LONGER.items()})
    lean = [*block, "--refine-codes", "lean"]
    points.update({f"refined lean {n}": ("refined-lean", [*lean, *options]) for n, options in BUDGET_KL.items()})
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--stats", type=Path, help="reuse this stats file instead of calibrating")
    parser.add_argument("--only", action="append", help="run just these points and merge them into --out")
    parser.add_argument("--resume", action="store_true", help="run only the points --out does not hold yet")
    args = parser.parse_args()
    done = {p["name"] for p in json.loads(args.out.read_text())["points"]} if args.resume else set()
    incremental = bool(args.only) or args.resume
    with tempfile.TemporaryDirectory() as tmp:
        stats = args.stats or Path(tmp) / "demo.stats"
        if args.stats is None:
            calibrate_demo(stats)
        points_plan = plan(stats)
        unknown = set(args.only or []) - set(points_plan)
        if unknown:
            raise SystemExit(f"unknown point(s) {sorted(unknown)}; choose from {sorted(points_plan)}")
        points = [] if incremental else [baseline_point(args.max_tokens)]
        for name in args.only or [n for n in points_plan if n not in done]:
            family, options = points_plan[name]
            point = artifact_point(name, family, options, args.max_tokens, Path(tmp))
            point["command"] = point["command"].replace(str(stats), "STATS")
            print(json.dumps(point), file=sys.stderr)
            if incremental:
                merge(args.out, [point])
            else:  # rewritten after every point, so an interrupted sweep keeps what it measured
                points.append(point)
                calibration = "llmq " + " ".join(CALIBRATE) + " -o STATS"
                document = record(points, args.max_tokens, calibration=calibration)
                args.out.write_text(json.dumps(document, indent=2) + "\n")


if __name__ == "__main__":
    main()

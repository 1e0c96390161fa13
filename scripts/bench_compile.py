#!/usr/bin/env python3
"""NVRTC compile time of every kernel file, per architecture, on this machine (no GPU needed).

    python scripts/bench_compile.py --out docs/data/nvrtc_compile.json

A process compiles each ``.cu`` file once per device, on first use (:mod:`llmq.cuda.loader`), so
the first GPU test or benchmark of a fresh process pays for it. This sizes the time limits of
``scripts/gpu_check.sh``'s steps: it is measured here, with the same NVRTC (the pip wheel) and
options, on the CPU, where the GPU machine compiles too. ``--repeats`` compiles each file that
many times and keeps every time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchlib import command_line, provenance


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--archs", default="sm_80,sm_90")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--files", help="comma-separated kernel files (default: all)")
    args = parser.parse_args()
    from llmq.cuda import loader

    files = args.files.split(",") if args.files else list(loader.KERNEL_FILES)
    unknown = sorted(set(files) - set(loader.KERNEL_FILES))
    if unknown:
        raise SystemExit(f"--files: {', '.join(unknown)} not among {', '.join(loader.KERNEL_FILES)}")
    points = []
    for arch in args.archs.split(","):
        for name in files:
            seconds = []
            for _ in range(args.repeats):
                started = time.perf_counter()
                build = loader.compile_offline(name, arch)
                seconds.append(round(time.perf_counter() - started, 2))
            points.append({"arch": arch, "file": name, "instances": len(build.lowered), "seconds": seconds})
            print(f"{arch} {name}: {len(build.lowered)} instances, {seconds} s", file=sys.stderr)
    record = {**provenance(command_line()), "points": points}
    per_arch = {a: round(sum(min(p["seconds"]) for p in points if p["arch"] == a), 1) for a in args.archs.split(",")}
    record["seconds_per_arch"] = per_arch  # every file once: what a fresh process pays on a card of that arch
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()

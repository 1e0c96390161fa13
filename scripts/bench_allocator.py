#!/usr/bin/env python3
"""What the ``llmq`` process's allocator settings cost and buy: the same quantize with and without
torch's huge pages (``THP_MEM_ALLOC_ENABLE``, which ``llmq`` sets unless the user did).

    python scripts/bench_allocator.py --out docs/data/allocator.json off on

Each label is one fresh ``llmq quantize demo`` (options below): ``off`` runs it with
``THP_MEM_ALLOC_ENABLE=0``, ``on`` with the command line's own setting. Recorded per run: wall
time, peak RSS (``ru_maxrss``), each stage's seconds, and the sha256 of the shards, which must be
the same: an allocator setting may change time and memory, never a byte of the artifact.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

from benchlib import command_line, provenance, run_measured

OPTIONS = ["--samples", "16", "--calib-seq-len", "512", "--refine-steps", "10"]
SETTINGS = {"off": {"THP_MEM_ALLOC_ENABLE": "0"}, "on": {}}


def shards_sha256(artifact: Path) -> str:
    digest = hashlib.sha256()
    for shard in sorted(artifact.glob("shard-*.safetensors")):
        digest.update(shard.read_bytes())
    return digest.hexdigest()


def run(label: str, folder: Path) -> dict:
    out = folder / f"{label}.llmq"
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"} | SETTINGS[label]
    measured = run_measured([sys.executable, "-m", "llmq.cli", "quantize", "demo", "-o", str(out), *OPTIONS,
                             "--json", "--force"], env=env)  # fmt: skip
    document = json.loads(measured["stdout"])
    return {"thp": label, "seconds": measured["seconds"], "peak_rss_mb": measured["peak_rss_mb"],
            "stages": document["stages"], "shards_sha256": shards_sha256(out)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("labels", nargs="+", choices=sorted(SETTINGS))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    command = f"llmq quantize demo -o OUT {' '.join(OPTIONS)}"
    record = {**provenance(command_line()), "command": command,
              "runs": []}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for label in args.labels:
            record["runs"].append(run(label, Path(tmp)))
            print(json.dumps(record["runs"][-1]), flush=True)
            args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()

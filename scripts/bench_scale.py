#!/usr/bin/env python3
"""How quantizing scales with the model: peak RSS and wall time of the default path by depth and width.

    python scripts/bench_scale.py --out docs/data/scale.json --hidden 1024 --mlp 4096 --layers 2,8
    PYTHONPATH=DIR python scripts/bench_scale.py ... --label "OLD: "   # DIR/llmq: another checkout

Each point is a Llama-architecture model with random fp16 weights (one safetensors shard per
decoder layer, so it never exists in memory whole) and the demo model's tokenizer (vocabulary
49,152), quantized in a fresh process by the plain default command with fewer windows and
refinement steps than the defaults (the options are recorded; one layer's peak does not depend
on them). Peak RSS is the child's ru_maxrss (it counts memory-mapped file pages it touched).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from benchlib import command_line, provenance, run_measured, write_random_llama

DEMO_VOCAB = 49152


def point(tmp: Path, hidden: int, mlp: int, layers: int, heads: int, kv_heads: int, options: list[str],
          label: str) -> dict:  # fmt: skip
    from llmq.runtime.sources import models

    folder = tmp / f"random-h{hidden}-m{mlp}-l{layers}"
    folder.mkdir()
    params = write_random_llama(folder, hidden, mlp, layers, heads, kv_heads, DEMO_VOCAB)
    demo = models.resolve_model("demo", progress=False).path
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(demo / name, folder / name)
    out = tmp / "q.llmq"
    cmd = [sys.executable, "-m", "llmq.cli", "quantize", str(folder), "-o", str(out), "--force", *options, "--json"]
    run = run_measured(cmd)
    document = json.loads(run["stdout"])
    shutil.rmtree(folder)
    return {
        "name": f"{label}hidden {hidden}, mlp {mlp}, {layers} layers",
        "command": f"llmq quantize RANDOM -o OUT {' '.join(options)}",
        "hidden": hidden, "mlp": mlp, "layers": layers, "heads": heads, "kv_heads": kv_heads, "vocab": DEMO_VOCAB,
        "params": params,
        "fp16_bytes": 2 * params,
        "seconds": run["seconds"],
        "peak_rss_mb": run["peak_rss_mb"],
        "stages_seconds": document.get("stages"),
        "rss_by_stage": run["rss_by_stage"],
        "bits_per_weight": document["accounting"]["bits_per_weight"],
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON record; points are merged in by name")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--mlp", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--layers", default="2,8", help="comma-separated depths")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--refine-steps", type=int, default=10)
    parser.add_argument("--label", default="", help="prefix of the points' names (e.g. another commit's)")
    args = parser.parse_args()
    options = ["--samples", str(args.samples), "--calib-seq-len", str(args.seq_len),
               "--refine-steps", str(args.refine_steps)]  # fmt: skip
    record = json.loads(args.out.read_text()) if args.out.exists() else {"points": []}
    script = command_line()
    with tempfile.TemporaryDirectory(dir=args.out.resolve().parent) as tmp:
        for layers in [int(n) for n in args.layers.split(",")]:
            new = point(Path(tmp), args.hidden, args.mlp, layers, args.heads, args.kv_heads, options, args.label)
            new.update(provenance(script))
            record["points"] = [p for p in record["points"] if p["name"] != new["name"]] + [new]
            args.out.write_text(json.dumps(record, indent=2) + "\n")
            print(json.dumps(new), flush=True)


if __name__ == "__main__":
    main()

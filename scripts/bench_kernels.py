"""Kernel benchmark on a GPU: every llmq path against torch.matmul in fp16, with validation.

    python scripts/bench_kernels.py --out kernels.json [--shapes 4096x4096,11008x4096,4096x11008]
                                    [--batches 1,4,16,64] [--iters 50]

For each weight shape ``N x K`` (out x in) at the default preset (g1 32, g2 16, g4 64, 25%
stripes) and each batch: random packed weights, fresh fp16 activations, and then

* validation: every path against the fp32 reference of the dequantized weight (relative error);
* timing: ``iters`` calls captured in one CUDA graph and replayed, so the time is GPU time and
  not Python launch overhead; the weights rotate through enough copies to exceed the L2 cache
  (as llm.c and Marlin benchmark), so every call reads its weights from DRAM;
* GB/s: packed bytes (or fp16 bytes for torch.matmul) per call over the call's time, against the
  measured device-to-device copy bandwidth (2 * bytes / time).

The paths: ``gemv`` (batch <= 8), ``gemm``, ``dequant`` (+ cuBLAS), ``auto`` (the dispatcher).
Prints a markdown table and writes JSON, including the fastest path per shape and batch (the
measured crossovers).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

L2_FLUSH_BYTES = 256 << 20  # well above the 50 MB L2 of an H100


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shapes", default="4096x4096,11008x4096,4096x11008", help="N x K (out x in), comma-separated")
    parser.add_argument("--batches", default="1,4,16,64")
    parser.add_argument("--iters", type=int, default=50, help="calls per CUDA graph replay")
    parser.add_argument("--reps", type=int, default=5, help="replays; the median is reported")
    return parser.parse_args()


def time_calls(calls: list, iters: int, reps: int) -> tuple[float, str]:
    """Median seconds per call; ``calls`` rotate through weight copies. (seconds, method)."""
    for call in calls[:2]:
        call()  # compile and warm up outside the capture
    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for call in calls[:2]:
                call()
            torch.cuda.synchronize()
            with torch.cuda.graph(graph, stream=stream):
                for i in range(iters):
                    calls[i % len(calls)]()
        run, method = graph.replay, "cuda graph"
    except Exception as err:  # noqa: BLE001 - recorded in the output, then timed eagerly
        method = f"eager (graph capture failed: {type(err).__name__}: {err})"

        def run():
            for i in range(iters):
                calls[i % len(calls)]()

    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / iters)
    return sorted(times)[len(times) // 2], method


def copy_bandwidth_gbps() -> float:
    from llmq.runtime.decode.profile import copy_bandwidth_gbps as measure

    return measure(torch.device("cuda"), 1 << 30)


def bench_shape(n: int, k: int, batches: list[int], iters: int, reps: int) -> list[dict]:
    from llmq.quant.config import QuantConfig
    from llmq.quant.linear import plan_layout
    from llmq.runtime.cuda_backend import CudaLinear
    from llmq.runtime.cuda_backend import Path as KPath
    from llmq.runtime.format import layout as L

    layout = plan_layout(n, k, QuantConfig())
    packed_bytes = layout.stored_bits() // 8
    copies = max(2, min(64, math.ceil(L2_FLUSH_BYTES / packed_bytes)))
    linears = [
        CudaLinear(layout, {s: t.cuda() for s, t in L.random_packed(layout, seed=i).items()}) for i in range(copies)
    ]
    reference = L.dequantize({s: t for s, t in linears[0].t.items()}, layout)  # fp32 [N, K] on the GPU
    dense_copies = max(2, min(16, math.ceil(L2_FLUSH_BYTES / (n * k * 2))))
    dense = [reference.half()] + [torch.randn(n, k, device="cuda").half() for _ in range(dense_copies - 1)]
    rows = []
    for batch in batches:
        x = torch.randn(batch, k, device="cuda").half()
        want = x.float() @ reference.T
        row = {"n": n, "k": k, "batch": batch, "bits_per_weight": layout.bits_per_weight(), "paths": {}}
        fp16_s, fp16_method = time_calls([lambda w=w, x=x: torch.matmul(x, w.T) for w in dense], iters, reps)
        row["torch_fp16"] = {
            "seconds": fp16_s,
            "gbps": n * k * 2 / fp16_s / 1e9,
            "method": fp16_method,
            "rel_error": float((torch.matmul(x, dense[0].T).float() - want).norm() / want.norm()),
        }
        for path in ("gemv", "gemm", "dequant", "auto"):
            if path == "gemv" and batch > 8:
                continue
            kpath = None if path == "auto" else KPath(path)
            got = linears[0](x, path=kpath)
            torch.cuda.synchronize()
            error = float((got.float() - want).norm() / want.norm())
            seconds, method = time_calls(
                [lambda lin=lin, x=x, kpath=kpath: lin(x, path=kpath) for lin in linears], iters, reps
            )
            row["paths"][path] = {
                "seconds": seconds, "gbps": packed_bytes / seconds / 1e9, "speedup_vs_fp16": fp16_s / seconds,
                "rel_error": error, "finite": bool(torch.isfinite(got).all()), "method": method,
            }  # fmt: skip
        fixed = {p: v for p, v in row["paths"].items() if p != "auto"}
        row["fastest_path"] = min(fixed, key=lambda p: fixed[p]["seconds"])
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("n", "k", "batch", "fastest_path")}), flush=True)
    return rows


def _micros(row: dict, path: str) -> str:
    return f"{row['paths'][path]['seconds'] * 1e6:.1f}" if path in row["paths"] else "—"


def markdown(rows: list[dict], copy_gbps: float) -> str:
    out = [
        "| N x K | batch | fp16 µs | llmq auto µs | speedup | auto GB/s (% copy) "
        "| gemv µs | gemm µs | dequant µs | max rel err |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        auto = r["paths"]["auto"]
        err = max(v["rel_error"] for v in r["paths"].values())
        out.append(
            f"| {r['n']}x{r['k']} | {r['batch']} | {r['torch_fp16']['seconds'] * 1e6:.1f} | "
            f"{auto['seconds'] * 1e6:.1f} | "
            f"{auto['speedup_vs_fp16']:.2f}x | {auto['gbps']:.0f} ({auto['gbps'] / copy_gbps:.0%}) | "
            f"{_micros(r, 'gemv')} | {_micros(r, 'gemm')} | {_micros(r, 'dequant')} | {err:.1e} |"
        )
    return "\n".join(out)


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels.py needs a CUDA GPU")
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    copy_gbps = copy_bandwidth_gbps()
    rows = []
    for n, k in shapes:
        rows += bench_shape(n, k, batches, args.iters, args.reps)
    table = markdown(rows, copy_gbps)
    document = {
        "command": "python scripts/bench_kernels.py --out " + str(args.out),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "device": torch.cuda.get_device_name(),
        "machine": platform.node(),
        "torch": torch.__version__,
        "copy_bandwidth_gbps": copy_gbps,
        "rows": rows,
        "markdown": table,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=1) + "\n")
    print(f"copy bandwidth {copy_gbps:.0f} GB/s on {document['device']}\n{table}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""What quantizing an 8B, 32B and 70B model by the default path would take: llmq's forecast.

    python scripts/forecast_sizes.py --out docs/data/forecast_sizes.json

The same counts and fitted factors as `quantize --dry-run` (llmq/quant/forecast.py), on shapes
written out here from the models' published configs (no download), with this machine's rates
measured now. Each phase's peak memory counts one layer and the process before the run (taken as
0.4 GB, torch and transformers). A second column uses an H100's datasheet rates instead of
measured ones, so it is an estimate of an estimate, and labelled so: no GPU has run it.
Every figure here is a forecast, not a measurement; docs/data/forecast.json says how far the
forecast has been from measured runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from benchlib import command_line, provenance

# name: (hidden, mlp, layers, heads, kv_heads, vocab), from each model's config.json
MODELS = {
    "SmolLM2-135M (the demo)": (576, 1536, 30, 9, 3, 49152),
    "Llama-3.1-8B": (4096, 14336, 32, 32, 8, 128256),
    "Qwen2.5-32B": (5120, 27648, 64, 40, 8, 152064),
    "Llama-3.1-70B": (8192, 28672, 80, 64, 8, 128256),
}
BASE_RSS = 400 << 20
# NVIDIA H100 SXM datasheet: 67 TFLOPS fp32 and fp64 (tensor cores), 3.35 TB/s (an elementwise pass
# reads and writes 4-byte values), and about 5 us a kernel launch with its Python call.
H100_DATASHEET = {"flops": 67e12, "flops64": 67e12, "elements": ((1 << 16, 3.35e12 / 8),), "op_seconds": 5e-6}


def shape(hidden: int, mlp: int, layers: int, heads: int, kv: int, vocab: int):
    from llmq.quant.forecast import Shape

    head_dim = hidden // heads
    layer = [(heads * head_dim, hidden), (kv * head_dim, hidden), (kv * head_dim, hidden),
             (hidden, heads * head_dim), (mlp, hidden), (mlp, hidden), (hidden, mlp)]  # fmt: skip
    return Shape(layers=[layer] * layers, inputs=[[hidden, hidden, mlp]] * layers, outliers=False, hidden=hidden,
                 heads=heads, attention=heads * head_dim, vocab=vocab)  # fmt: skip


def unit_peak(s, hidden: int, vocab: int) -> int:
    """The largest unit's bytes while quantized, as llmq.quant.resources counts them: a layer's
    largest matrix under GPTQ with its inverse Hessian, or the embeddings' conversion."""
    from llmq.quant.resources import DENSE_WORK, matrix_work

    layer = max(matrix_work(n, k, gptq=True) for n, k in s.layers[0])
    return max(layer, DENSE_WORK * vocab * hidden + 2 * 2 * vocab * hidden)


def measured_factors(path: Path) -> dict:
    """Per phase, measured over forecast on the 70B slice of ``path`` (bench_quantize_layer.py's record):
    its time and its peak RSS. The time factors carry to other sizes only as far as each phase's
    mix of work does (the slice runs few windows and steps)."""
    record = json.loads(path.read_text())
    (point,) = [p for p in record["points"] if p.get("shape") == "70b" and "forecast" in p]
    phases = point["forecast"]["phases"]
    seconds = {p: round(point["stages_seconds"][p] / phases[p]["seconds"], 3)
               for p in point["stages_seconds"] if phases.get(p, {}).get("seconds")}  # fmt: skip
    peak = {p: round(point["stages_peak_rss_mb"][p] * 2**20 / phases[p]["peak_rss_bytes"], 3)
            for p in point["stages_peak_rss_mb"] if point["stages_peak_rss_mb"][p] and p in phases}  # fmt: skip
    return {"record": str(path), "commit": record.get("commit"), "seconds": seconds, "peak_rss": peak,
            "settings": {k: point[k] for k in ("layers", "samples", "seq_len", "refine_steps")}}  # fmt: skip


def main() -> None:
    from llmq.quant import forecast as F
    from llmq.quant.config import DEFAULT_SAMPLES, DEFAULT_SEQ_LEN, RefineSettings
    from llmq.quant.resources import COMPUTE_OVERHEAD

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--measured", type=Path, help="a bench_quantize_layer.py record of the 70B slice on this "
                        "CPU: each phase's measured/forecast time there scales the CPU column")  # fmt: skip
    args = parser.parse_args()
    factors = measured_factors(args.measured) if args.measured else None
    refine = RefineSettings()
    settings = F.Settings(samples=DEFAULT_SAMPLES, seq_len=DEFAULT_SEQ_LEN, refine_steps=refine.steps,
                          refine_batch=refine.batch)  # fmt: skip
    cpu = F.measure_speed(torch.device("cpu"))
    h100 = F.Speed("H100 datasheet (not measured)", **H100_DATASHEET)
    rows = []
    for name, dims in MODELS.items():
        s = shape(*dims)
        held = F.phase_bytes(s, settings, unit_peak(s, dims[0], dims[5]))
        rows.append({
            "model": name, "hidden": dims[0], "mlp": dims[1], "layers": dims[2], "vocab": dims[5],
            "params_in_layers": sum(s.params(i) for i in range(len(s.layers))),
            "peak_rss_gb": {p: round((BASE_RSS + COMPUTE_OVERHEAD + b) / 1e9, 2) for p, b in held.items()},
            "cpu_hours": {p: round(v / 3600, 2) for p, v in F.phase_seconds(s, settings, cpu).items()},
            "h100_hours_estimate": {p: round(v / 3600, 3) for p, v in F.phase_seconds(s, settings, h100).items()},
        })  # fmt: skip
        if factors:
            rows[-1]["cpu_hours_scaled_by_slice"] = {p: round(h * factors["seconds"].get(p, 1.0), 2)
                                                     for p, h in rows[-1]["cpu_hours"].items()}  # fmt: skip
    record = {
        "what": "forecast (not measured) of the default quantize path by model size, llmq/quant/forecast.py",
        "settings": {"samples": settings.samples, "seq_len": settings.seq_len, "refine_steps": settings.refine_steps},
        "efficiency": dict(F.EFFICIENCY),
        "cpu_speed": cpu.to_json(),
        "h100_speed": h100.to_json(),
        "models": rows,
        "slice": factors,
    } | provenance(command_line())
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()

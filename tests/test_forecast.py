"""quant/forecast.py: each phase's memory and time, known before a quantize run starts."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from llmq.quant import forecast as F
from llmq.quant.config import QuantConfig
from llmq.quant.plan import make_plan
from llmq.runtime.sources import models

DEFAULT = F.Settings(samples=64, seq_len=512, refine_steps=50, refine_batch=4)


def llama(layers: int, hidden: int = 512, mlp: int = 2048, heads: int = 8, kv: int = 4) -> F.Shape:
    head_dim = hidden // heads
    layer = [(hidden, hidden), (kv * head_dim, hidden), (kv * head_dim, hidden), (hidden, hidden),
             (mlp, hidden), (mlp, hidden), (hidden, mlp)]  # fmt: skip
    return F.Shape(layers=[layer] * layers, inputs=[[hidden, hidden, mlp]] * layers, outliers=True, hidden=hidden,
                   heads=heads, attention=hidden, vocab=32000)  # fmt: skip


def test_the_shape_comes_from_the_plan(tiny_model):
    source = models.resolve_model(str(tiny_model), progress=False)
    config = models.load_config(source)
    plan = make_plan(source, config, QuantConfig(), None)
    shape = F.Shape.of(plan, config)
    assert len(shape.layers) == config.num_hidden_layers
    assert sum(len(layer) for layer in shape.layers) == len(plan.linears)
    # counted as one Hessian per module and width: q/k/v/o, gate/up, down
    assert sorted(shape.inputs[0]) == sorted([config.hidden_size, config.hidden_size, config.intermediate_size])
    assert shape.vocab == config.vocab_size and shape.hidden == config.hidden_size


def test_memory_does_not_grow_with_depth():
    shallow = F.phase_bytes(llama(4), DEFAULT, unit_bytes=1 << 20)
    deep = F.phase_bytes(llama(64), DEFAULT, unit_bytes=1 << 20)
    assert shallow.keys() == {"calibrate", "fisher", "plan", "quantize", "refine"}
    # the output Fisher (4 bytes per output row) is the one thing held for every layer
    assert all(deep[p] == shallow[p] for p in ("calibrate", "fisher", "plan", "refine"))
    assert deep["quantize"] - shallow["quantize"] == 4 * 60 * sum(n for n, _ in llama(1).layers[0])


def test_memory_follows_the_windows_the_run_holds():
    small = F.phase_bytes(llama(2), replace(DEFAULT, samples=8), unit_bytes=0)
    large = F.phase_bytes(llama(2), DEFAULT, unit_bytes=0)
    activations = 4 * 512 * 512  # one window's hidden states, fp32
    assert large["refine"] - small["refine"] == 4 * 56 * activations  # four sets: inputs, targets, two copies
    assert large["calibrate"] > small["calibrate"]


SPEED = F.Speed("cpu", flops=20e9, flops64=5e9, elements=((1 << 16, 2e9), (1 << 24, 0.3e9)), op_seconds=10e-6)


def test_time_scales_with_layers_windows_and_steps():
    one = F.phase_seconds(llama(2), DEFAULT, SPEED)
    deeper = F.phase_seconds(llama(4), DEFAULT, SPEED)
    for phase in ("calibrate", "plan", "quantize", "refine"):
        assert deeper[phase] == pytest.approx(2 * one[phase], rel=1e-9)
    more = F.phase_seconds(llama(2), replace(DEFAULT, samples=128), SPEED)
    assert more["calibrate"] == pytest.approx(2 * one["calibrate"], rel=0.01)
    assert more["quantize"] == one["quantize"]  # GPTQ does not see the windows
    steps = F.phase_seconds(llama(2), replace(DEFAULT, refine_steps=100), SPEED)
    assert 1.5 * one["refine"] < steps["refine"] < 2 * one["refine"]


def test_phases_follow_the_settings():
    rtn = F.Settings(samples=0, seq_len=0, calibrates=False, spreads=False, gptq=False)
    assert F.phase_seconds(llama(2), rtn, SPEED).keys() == {"quantize"}
    e2e = replace(DEFAULT, e2e_steps=32)
    assert F.phase_seconds(llama(2), e2e, SPEED).keys() == {"calibrate", "fisher", "plan", "quantize", "refine", "e2e"}
    gptq = F.phase_seconds(llama(2), replace(rtn, gptq=True), SPEED)["quantize"]
    assert gptq > F.phase_seconds(llama(2), rtn, SPEED)["quantize"]


def test_the_device_rates_are_measured():
    speed = F.measure_speed(torch.device("cpu"))
    for rate in (speed.flops, speed.flops64, *(r for _, r in speed.elements)):
        assert math.isfinite(rate) and rate > 1e6
    assert [size for size, _ in speed.elements] == list(F.ELEMENT_SIZES)
    assert 0 < speed.op_seconds < 0.01
    assert set(speed.to_json()) == {"device", "gflops", "gflops64", "gelements", "op_us"}


def test_elementwise_rate_falls_between_the_measured_sizes():
    assert SPEED.element_rate(1000) == 2e9 and SPEED.element_rate(1 << 30) == 0.3e9
    middle = SPEED.element_rate(1 << 20)  # halfway in log size: the geometric mean of the rates
    assert middle == pytest.approx((2e9 * 0.3e9) ** 0.5)


def test_dry_run_forecasts_each_phase(cli, tiny_model, tmp_path):
    result = cli("quantize", str(tiny_model), "-o", str(tmp_path / "x"), "--samples", "4", "--calib-seq-len", "32",
                 "--dry-run", "--json")  # fmt: skip
    estimate = json.loads(result.stdout)["estimate"]
    assert estimate["phases"].keys() == {"calibrate", "fisher", "plan", "quantize", "refine"}
    for phase in estimate["phases"].values():
        assert phase["seconds"] >= 0 and phase["peak_rss_bytes"] > estimate["base_rss_bytes"]
    assert estimate["seconds"] == pytest.approx(sum(p["seconds"] for p in estimate["phases"].values()), abs=0.5)
    assert estimate["peak_rss_bytes"] == estimate["phases"][estimate["peak_phase"]]["peak_rss_bytes"]
    text = cli("quantize", str(tiny_model), "-o", str(tmp_path / "x"), "--samples", "4", "--calib-seq-len", "32",
               "--dry-run").stdout  # fmt: skip
    assert "estimated time on cpu" in text and "refine" in text


def test_a_run_that_cannot_fit_in_memory_is_refused_before_calibrating(cli, tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr("llmq.quant.resources.available_memory_bytes", lambda: 1 << 20)
    out = tmp_path / "x.llmq"
    result = cli("quantize", str(tiny_model), "-o", str(out), "--samples", "4", "--calib-seq-len", "32")
    assert result.code == 1 and "needs about" in result.stderr and "--no-memory-check" in result.stderr
    assert "calibration:" not in result.stderr and list(tmp_path.iterdir()) == []
    dry = cli("quantize", str(tiny_model), "-o", str(out), "--samples", "4", "--calib-seq-len", "32", "--dry-run")
    assert dry.code == 0 and "the run would be refused" in dry.stdout
    forced = cli("quantize", str(tiny_model), "-o", str(out), "--no-calib", "--g4", "16", "--no-memory-check")
    assert forced.code == 0 and out.is_dir()


SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def test_bench_forecast_fits_and_rescores_a_record(tmp_path):
    """``--fit`` gives each phase the geometric mean of measured over counted on the named points;
    ``--rescore`` writes forecasts and errors from the counts; neither runs a model."""
    phase = {"counted_seconds": 10.0, "forecast_peak_rss_mb": 100.0, "measured_peak_rss_mb": 90.0}
    points = [{"name": name, "measured_seconds": 30.0, "forecast_peak_rss_mb": 100.0, "measured_peak_rss_mb": 80.0,
               "phases": {"quantize": phase | {"measured_seconds": measured}}}
              for name, measured in (("a", 5.0), ("b", 20.0), ("c", 40.0))]  # fmt: skip
    record = tmp_path / "forecast.json"
    record.write_text(json.dumps({"points": points}))
    script = [sys.executable, str(SCRIPTS / "bench_forecast.py"), "--out", str(record)]
    fitted = subprocess.run([*script, "--fit", "a,b"], capture_output=True, text=True, check=True)
    assert json.loads(fitted.stdout) == {"quantize": 1.0}  # sqrt(0.5 x 2.0)
    subprocess.run([*script, "--rescore"], capture_output=True, text=True, check=True)
    rescored = {p["name"]: p for p in json.loads(record.read_text())["points"]}
    factor = F.EFFICIENCY["quantize"]
    assert rescored["c"]["phases"]["quantize"]["forecast_seconds"] == round(10.0 * factor, 1)
    assert rescored["c"]["seconds_error"] == round(round(10.0 * factor, 1) / 30.0 - 1, 3)
    assert rescored["a"]["peak_rss_error"] == 0.25


def test_forecast_sizes_tables_the_large_models(tmp_path):
    out, slice_record = tmp_path / "sizes.json", tmp_path / "layers.json"
    phases = {"calibrate": 10.0, "quantize": 100.0}
    slice_record.write_text(json.dumps({"commit": "abc", "points": [{
        "shape": "70b", "layers": 2, "samples": 4, "seq_len": 256, "refine_steps": 2,
        "stages_seconds": {"calibrate": 20.0, "quantize": 50.0}, "stages_peak_rss_mb": {"calibrate": 1024.0,
                                                                                      "quantize": None},
        "forecast": {"phases": {p: {"seconds": v, "peak_rss_bytes": 2**31} for p, v in phases.items()}},
    }]}))  # fmt: skip
    subprocess.run([sys.executable, str(SCRIPTS / "forecast_sizes.py"), "--out", str(out), "--measured",
                    str(slice_record)], capture_output=True, text=True, check=True)  # fmt: skip
    record = json.loads(out.read_text())
    assert record["slice"]["seconds"] == {"calibrate": 2.0, "quantize": 0.5}
    assert record["slice"]["peak_rss"] == {"calibrate": 0.5}
    rows = {row["model"]: row for row in record["models"]}
    for row in rows.values():
        scaled, raw = row["cpu_hours_scaled_by_slice"], row["cpu_hours"]
        assert scaled["fisher"] == raw["fisher"] and abs(scaled["quantize"] - 0.5 * raw["quantize"]) <= 0.01
    assert {"Llama-3.1-8B", "Qwen2.5-32B", "Llama-3.1-70B"} <= set(rows)
    small, large = rows["Llama-3.1-8B"], rows["Llama-3.1-70B"]
    assert sum(large["cpu_hours"].values()) > 5 * sum(small["cpu_hours"].values())
    # one layer's memory, not the model's: 70B's peak is a few times 8B's, not nine
    assert max(large["peak_rss_gb"].values()) < 5 * max(small["peak_rss_gb"].values())

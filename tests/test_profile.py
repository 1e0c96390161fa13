"""``llmq profile``: the protocol's numbers, the breakdown, the baseline, and bad options."""

from __future__ import annotations

import json

import pytest
import torch

from llmq.runtime.decode import profile as P

FAST = ("--prompt-len", "8", "--gen-len", "3", "--reps", "2", "--warmup", "1", "--breakdown-steps", "2")


def test_json_has_both_runs_every_batch_and_a_breakdown(cli, tiny_artifact):
    result = cli("profile", str(tiny_artifact), "--batch", "1,2", *FAST, "--baseline", "--json")
    assert result.code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["command"] == "profile" and doc["device"] == "cpu" and doc["copy_bandwidth_gbps"] > 0
    assert [r["label"] for r in doc["runs"]] == ["llmq", "dense baseline"]
    assert [r["backend"] for r in doc["runs"]] == ["torch", "torch"]
    for run in doc["runs"]:
        assert [b["batch"] for b in run["batches"]] == [1, 2]
        for b in run["batches"]:
            assert b["prefill_seconds"]["n"] == 2 and b["prefill_seconds"]["mean"] > 0
            assert b["decode_tokens_per_s"] == pytest.approx(b["batch"] / b["decode_step_seconds"]["mean"])
            brk = b["breakdown_seconds_per_step"]
            assert brk["method"] == "cpu time by module" and brk["quantized_matmul"] > 0
            assert brk["total"] >= brk["quantized_matmul"] + brk["dense_matmul"]
            assert b["linear_bytes_per_step"] > b["quantized_bytes_per_step"] > 0
    assert [s["batch"] for s in doc["speedup"]] == [1, 2] and all(s["decode"] > 0 for s in doc["speedup"])


def test_markdown_table_goes_to_stdout(cli, tiny_artifact):
    result = cli("profile", str(tiny_artifact), *FAST, "-q")
    assert result.code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("| run | batch | prefill ms") for line in lines)
    assert sum(line.startswith("| llmq (torch) | 1 |") for line in lines) == 1
    assert result.stderr == ""


@pytest.mark.parametrize(
    "args,message",
    [
        (("--batch", "0"), "between 1 and"),
        (("--batch", "1,x"), "not an integer"),
        (("--prompt-len", "120", "--gen-len", "20"), "exceeds the model's context"),
    ],
)
def test_bad_options_are_usage_errors(cli, tiny_artifact, args, message):
    result = cli("profile", str(tiny_artifact), *args)
    assert result.code == 2 and message in result.stderr


def test_baseline_needs_an_artifact(cli, tiny_model):
    result = cli("profile", str(tiny_model), "--baseline")
    assert result.code == 2 and "--baseline compares an llmq artifact" in result.stderr


def test_a_plain_model_profiles_without_a_backend(cli, tiny_model):
    result = cli("profile", str(tiny_model), *FAST, "--json")
    doc = json.loads(result.stdout)
    assert doc["runs"][0]["backend"] is None and doc["speedup"] is None
    assert doc["runs"][0]["batches"][0]["quantized_bytes_per_step"] == 0


def test_stat_and_bytes_helpers(tiny_artifact):
    assert P.Stat.of([1.0, 3.0]) == P.Stat(2.0, pytest.approx(2**0.5), 2)
    assert P.Stat.of([5.0]).sd == 0.0
    from llmq.runtime.loader import load_model
    from llmq.runtime.sources import models

    source = models.resolve_model(str(tiny_artifact), progress=False)
    lm = load_model(source, models.load_config(source), torch.device("cpu"), torch.float32)
    quantized, linear = P.weight_bytes_per_step(lm)
    from llmq.runtime.qlinear import QuantLinear

    dense = sum(m.weight.numel() * 4 for m in lm.modules() if isinstance(m, QuantLinear))
    assert quantized == dense  # the torch backend reads the dense fp32 weight
    assert linear == quantized + lm.lm_head.weight.numel() * 4


def test_gpu_breakdown_counts_each_kernel_once_by_name():
    """Kernel events only: the CPU op that launched a kernel and the llmq.* ranges carry the same time again."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    def event(key, device, micros):
        return SimpleNamespace(key=key, device_type=device, self_device_time_total=micros)

    events = [
        event("void llmq::gemv_mixed<1, 2, 4, 4>(...)", DeviceType.CUDA, 300.0),
        event("llmq::gather_permuted(...)", DeviceType.CUDA, 20.0),
        event("sm90_xmma_gemm_f16f16_f32", DeviceType.CUDA, 100.0),
        event("void rms_norm_kernel<...>", DeviceType.CUDA, 80.0),
        event("aten::mm", DeviceType.CPU, 100.0),  # repeats the xmma kernel's time
        event("llmq.quantized_linear", DeviceType.CUDA, 400.0),  # the annotation range
    ]
    prof = SimpleNamespace(key_averages=lambda: events)
    b = P._by_kernel(prof, steps=2)
    assert (b.quantized_matmul, b.dense_matmul, b.other) == pytest.approx((160e-6, 50e-6, 40e-6))
    assert b.total == pytest.approx(250e-6) and b.method.startswith("gpu kernel time")


def test_static_decode_profiles_on_the_cpu_and_graph_needs_a_gpu(cli, tiny_artifact):
    result = cli("profile", str(tiny_artifact), "--batch", "1,2", *FAST, "--decode", "static", "--json")
    assert result.code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["protocol"]["decode_mode"] == "static"
    assert all(b["decode_step_seconds"]["mean"] > 0 for b in doc["runs"][0]["batches"])
    refused = cli("profile", str(tiny_artifact), "--decode", "graph")
    assert refused.code == 2 and "--decode graph captures CUDA graphs" in refused.stderr
    assert cli("profile", str(tiny_artifact), "--decode", "fast").code == 2

"""The CUDA kernels on a GPU, against the fp32 reference of the dequantized weights (``pytest -m gpu``).

Every output buffer is poisoned with NaN before a kernel runs, so a kernel that skips a row or
column fails; every path runs twice and must give bit-identical results (a difference means a
race). Shapes come from ``kernel_cases`` and are not multiples of the tiles.
"""

from __future__ import annotations

import zlib

import pytest
import torch
from kernel_cases import CASES, packed_layer

pytestmark = pytest.mark.gpu
REL_ERROR = 1e-3  # fp16 activations and outputs, fp32 accumulation
# Per element: the fp16 weight the kernels decode (a product of fp16 numbers: a few roundings of 2^-11
# each, bounded by 2^-9 of each term), fp32 accumulation over K terms, and the fp16 output's own rounding
WEIGHT_ROUNDING, OUTPUT_ROUNDING = 2.0**-9, 2.0**-10
# Greedy decoding of the demo model in fp16: the two backends' logits may differ by summation order; at
# most this much at any position (an estimate, not yet measured on a GPU)
LOGIT_TOLERANCE = 0.5


def _on_gpu(case, seed=0):
    from llmq.runtime.cuda_backend import CudaLinear

    layout, tensors, weight = packed_layer(case, seed)
    return CudaLinear(layout, {k: v.cuda() for k, v in tensors.items()}), tensors, weight.cuda()


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want).norm() / want.norm())


def _seed(*parts) -> int:
    """A seed fixed by the case (``hash`` of a string changes with PYTHONHASHSEED; a failure must reproduce)."""
    return zlib.crc32("/".join(map(str, parts)).encode())


def _assert_each_element_close(got: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, want: torch.Tensor, what):
    """Every output element within the fp16 rounding its own terms allow: a few wrong elements fail
    here even where the aggregate relative error stays small."""
    k = weight.shape[1]
    bound = (WEIGHT_ROUNDING + k * 2.0**-24) * (x.float().abs() @ weight.abs().T) + OUTPUT_ROUNDING * want.abs()
    excess = (got.float() - want).abs() - bound - 2.0**-24  # the last term: fp16 subnormals near zero
    assert excess.max() <= 0, f"{what}: {int((excess > 0).sum())} elements out of bounds, worst at {excess.argmax()}"


@pytest.mark.parametrize("case", CASES, ids=str)
def test_dequant_and_gather_are_exact(case):
    linear, tensors, weight = _on_gpu(case)
    torch.cuda.synchronize()
    assert torch.equal(linear.dequantize(), weight.half())
    wp = linear.dequant_packed(out=torch.full((case.out_features, linear.kx), float("nan"), device="cuda").half())
    assert torch.isfinite(wp).all()
    x = torch.randn(5, case.in_features, device="cuda").half()
    xp = linear.gather(x, out=torch.full((5, linear.kx), float("nan"), device="cuda").half())
    assert torch.equal(xp[:, linear.columns], x[:, tensors["perm"].long().cuda()])
    assert not xp[:, linear.layout.k2 : linear.k2p].any()


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize(
    "path,batches", [("gemv", [1, 2, 3, 5, 8]), ("gemm", [1, 9, 16, 33, 64, 100]), ("dequant", [4, 70])]
)
@pytest.mark.parametrize("with_bias", [False, True])
def test_every_path_matches_the_reference(case, path, batches, with_bias):
    from llmq.runtime.cuda_backend import Path

    linear, _, weight = _on_gpu(case)
    gen = torch.Generator(device="cuda").manual_seed(_seed(case, path, with_bias))
    bias = torch.randn(case.out_features, device="cuda", generator=gen).half() if with_bias else None
    for batch in batches:
        x = torch.randn(batch, case.in_features, device="cuda", generator=gen).half()
        want = x.float() @ weight.T + (bias.float() if bias is not None else 0)
        runs = []
        for _ in range(2):
            y = torch.full((batch, case.out_features), float("nan"), device="cuda").half()
            linear(x, bias, path=Path(path), out=y)
            torch.cuda.synchronize()
            runs.append(y.clone())
        assert torch.isfinite(runs[0]).all(), f"{path} batch {batch}: NaN or Inf in the output"
        assert _relative_error(runs[0], want) < REL_ERROR, f"{path} batch {batch}"
        _assert_each_element_close(runs[0], x, weight, want, f"{path} batch {batch}")
        assert torch.equal(runs[0], runs[1]), f"{path} batch {batch}: two runs differ"


def test_the_dispatcher_serves_any_leading_shape_and_noncontiguous_input():
    linear, _, weight = _on_gpu(CASES[1])
    x = torch.randn(3, 7, 2 * CASES[1].in_features, device="cuda").half()[..., ::2]
    y = linear(x)
    assert y.shape == (3, 7, CASES[1].out_features)
    assert _relative_error(y.reshape(-1, y.shape[-1]), x.reshape(-1, x.shape[-1]).float() @ weight.T) < REL_ERROR


def test_kernels_run_on_torchs_current_stream():
    linear, _, weight = _on_gpu(CASES[6])
    x = torch.randn(2, CASES[6].in_features, device="cuda").half()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # keep the side stream busy: work on it must wait
        y = linear(x)
    side.synchronize()
    assert _relative_error(y, x.float() @ weight.T) < REL_ERROR


def test_packed_weights_take_about_the_artifact_size_on_the_gpu():
    linear, tensors, _ = _on_gpu(CASES[6])
    stored = sum(t.numel() * t.element_size() for t in linear.t.values())
    assert stored == linear.layout.stored_bits() // 8
    assert stored < 0.3 * CASES[6].out_features * CASES[6].in_features * 2  # well under fp16


def test_demo_artifact_decodes_greedily_alike_on_both_backends(demo_artifact_path):
    """The torch backend's greedy continuation, read back by both backends: their logits agree within
    LOGIT_TOLERANCE, and where the CUDA backend would pick another token, the torch backend's own
    choice led by less than the two backends differ there (a near tie that summation order may
    flip), never by more. Exact tokens are not required: a correct kernel may sum in another order."""
    from llmq.runtime.backend import Backend
    from llmq.runtime.loader import load_model
    from llmq.runtime.sources import models

    source = models.resolve_model(str(demo_artifact_path), progress=False)
    config = models.load_config(source)
    tokenizer = models.load_tokenizer(source)
    ids = tokenizer("The first thing Anne Elliot noticed was", return_tensors="pt").input_ids.cuda()
    logits = {}
    for backend in (Backend.torch, Backend.cuda):
        lm = load_model(source, config, torch.device("cuda"), torch.float16, backend=backend)
        with torch.no_grad():
            if backend == Backend.torch:
                sequence = lm.generate(ids, max_new_tokens=32, do_sample=False, pad_token_id=tokenizer.eos_token_id)
            logits[backend] = lm(sequence).logits[0, ids.shape[1] - 1 : -1].float()
        del lm
    chosen = sequence[0, ids.shape[1] :]
    ours, theirs = logits[Backend.torch], logits[Backend.cuda]
    assert torch.equal(ours.argmax(-1), chosen)  # the read-back is the decode's own logits
    differ = (theirs - ours).abs().amax(-1)
    assert differ.max() < LOGIT_TOLERANCE, f"the backends' logits differ by up to {differ.max():.3f}"
    picks = theirs.argmax(-1)
    lead = ours.gather(1, chosen[:, None])[:, 0] - ours.gather(1, picks[:, None])[:, 0]
    flipped = picks != chosen
    assert (lead[flipped] <= 2 * differ[flipped]).all(), f"positions {flipped.nonzero()[:, 0].tolist()}"


def test_a_call_can_be_captured_in_a_cuda_graph_and_replayed():
    """The kernels launch on the capturing torch stream, so a graph replays them (issue 7 builds on this)."""
    from llmq.runtime.cuda_backend import Path

    linear, _, weight = _on_gpu(CASES[6])
    x = torch.randn(1, CASES[6].in_features, device="cuda").half()
    for path in (Path.gemv, Path.gemm):
        linear(x, path=path)  # compile outside the capture
        graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
            y = linear(x, path=path)
        x.copy_(torch.randn_like(x))  # new input in place, then replay
        graph.replay()
        torch.cuda.synchronize()
        assert _relative_error(y, x.float() @ weight.T) < REL_ERROR, path


def test_profile_on_the_gpu_attributes_time_to_the_llmq_kernels(cli, tiny_model, tmp_path):
    import json

    artifact = tmp_path / "tiny.llmq"
    assert cli("quantize", str(tiny_model), "-o", str(artifact), "--no-calib", "--g4", "16", "-q").code == 0
    result = cli("profile", str(artifact), "--batch", "1,9", "--prompt-len", "8", "--gen-len", "3", "--reps", "2",
                 "--backend", "cuda", "--baseline", "--json")  # fmt: skip
    assert result.code == 0, result.stderr
    doc = json.loads(result.stdout)
    ours, dense = doc["runs"]
    assert ours["backend"] == "cuda" and dense["backend"] == "torch"
    assert ours["model_memory_bytes"] < dense["model_memory_bytes"]
    for b in ours["batches"]:
        assert b["breakdown_seconds_per_step"]["method"].startswith("gpu kernel time")
        assert b["breakdown_seconds_per_step"]["quantized_matmul"] > 0
    for b in dense["batches"]:
        assert b["breakdown_seconds_per_step"]["quantized_matmul"] == 0
        assert b["breakdown_seconds_per_step"]["dense_matmul"] > 0

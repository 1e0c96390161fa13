"""The numpy emulation of every kernel's index math decodes packed layers like the torch reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from kernel_cases import CASES, packed_layer

from llmq.cuda import emulate as E
from llmq.errors import DeviceError
from llmq.runtime import cuda_backend as B


def _inputs(layout, batch: int, seed: int) -> np.ndarray:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, layout.in_features, generator=gen).half().double().numpy()


def _relative_error(got: np.ndarray, want: np.ndarray) -> float:
    assert not np.isnan(got).any(), "an output was never written"
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_gather_and_dequant_match_the_reference_exactly(case):
    layout, tensors, weight = packed_layer(case)
    p = E.Packed.from_torch(layout, tensors)
    wp = E.dequant_packed(p)
    assert not np.isnan(wp).any()
    cols = B.packed_columns(layout)
    want = weight[:, tensors["perm"].long()].half().numpy()
    np.testing.assert_array_equal(wp[:, cols], want)  # bit-exact after the one fp16 rounding
    assert not wp[:, layout.k2 : p.k2p].any()  # the 2-bit padding is zero
    x = _inputs(layout, 3, seed=1)
    xp = E.gather(x, p)
    np.testing.assert_array_equal(xp[:, cols], x[:, tensors["perm"].long().numpy()])
    assert not xp[:, layout.k2 : p.k2p].any()


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("batch", [1, 3])
def test_gemv_emulation_matches_the_reference(case, batch):
    layout, tensors, weight = packed_layer(case)
    p = E.Packed.from_torch(layout, tensors)
    x = _inputs(layout, batch, seed=2)
    want = x @ weight.double().numpy().T
    vec2, vec4 = B.gemv_vectors(layout)
    got = E.gemv_mixed(E.gather(x, p), p, vec2, vec4)
    assert _relative_error(got, want) < 1e-9
    if (vec2, vec4) != (1, 1):  # the one-word path must agree too wherever 16-byte loads are used
        assert _relative_error(E.gemv_mixed(E.gather(x, p), p, 1, 1), want) < 1e-9


@pytest.mark.parametrize("case", CASES[:4] + CASES[5:6], ids=str)
@pytest.mark.parametrize("batch,tiles", [(9, 1), (37, 2), (70, 4)])
def test_gemm_emulation_matches_the_reference(case, batch, tiles):
    layout, tensors, weight = packed_layer(case)
    p = E.Packed.from_torch(layout, tensors)
    x = _inputs(layout, batch, seed=3)
    xp = E.gather(x, p)
    got = E.gemm_mixed(xp, p, tiles)
    if layout.n_outliers:
        got = E.outliers_add(xp, got, p)
    want = x @ weight.double().numpy().T
    assert _relative_error(got, want) < 2e-3  # the tiles hold fp16 weights, as on the GPU


def test_mma_fragment_tables_cover_each_tile_once():
    for coords, shape, per_lane in (
        (E.mma_a_coords, (16, 16), 8),
        (E.mma_b_coords, (16, 8), 4),
        (E.mma_c_coords, (16, 8), 4),
    ):
        seen = [c for lane in range(32) for c in coords(lane // 4, lane % 4)]
        assert len(seen) == 32 * per_lane and len(set(seen)) == shape[0] * shape[1]
        assert all(0 <= r < shape[0] and 0 <= c < shape[1] for r, c in seen)


def test_a_wrong_fragment_mapping_is_caught():
    """The emulation can fail: swap two A registers and the GEMM no longer matches."""
    layout, tensors, weight = packed_layer(CASES[3])
    p = E.Packed.from_torch(layout, tensors)
    x = _inputs(layout, 16, seed=4)
    original = E.mma_a_coords
    try:
        E.mma_a_coords = lambda g, t: [original(g, t)[i] for i in (2, 3, 0, 1, 4, 5, 6, 7)]
        got = E.gemm_mixed(E.gather(x, p), p, 1)
    finally:
        E.mma_a_coords = original
    assert _relative_error(got, x @ weight.double().numpy().T) > 0.1


@pytest.mark.parametrize("case", CASES, ids=str)
def test_every_launch_binds_its_arguments_to_the_kernel_signature(case, monkeypatch):
    """Each CudaLinear path, on shape-only (meta) tensors, names exactly the kernel's parameters."""
    from llmq.cuda import loader

    layout, tensors, _ = packed_layer(case)
    launched = []

    def fake_launch(device_index, file, instance, grid, block, **arguments):
        bound = loader.bind_arguments(loader.kernel_parameters(file, instance), arguments)
        assert instance in loader.instances(file) and all(g >= 1 for g in grid)
        launched.append((file, instance, len(bound)))

    monkeypatch.setattr(B, "launch", fake_launch)
    linear = B.CudaLinear(layout, {k: v.to("meta") for k, v in tensors.items()})
    for batch, path in ((1, B.Path.gemv), (8, B.Path.gemv), (9, B.Path.gemm), (100, B.Path.gemm), (3, B.Path.dequant)):
        linear(torch.empty(batch, layout.in_features, dtype=torch.float16, device="meta"), path=path)
    files = [f for f, _, _ in launched]
    assert {"gather.cu", "gemv.cu", "gemm.cu", "dequant.cu"} <= set(files)
    assert ("outliers_add" in " ".join(i for _, i, _ in launched)) == (layout.n_outliers > 0)


def test_a_meta_linear_refuses_to_launch():
    layout, tensors, _ = packed_layer(CASES[1])
    linear = B.CudaLinear(layout, {k: v.to("meta") for k, v in tensors.items()})
    with pytest.raises(DeviceError, match="cannot launch"):
        linear(torch.empty(1, layout.in_features, dtype=torch.float16, device="meta"))


def test_a_prefill_of_more_than_65535_rows_gathers_within_the_grid_limit(monkeypatch):
    """CUDA caps gridDim.y at 65535: the gather tiles its rows instead of launching one block row each."""
    from llmq.cuda import loader

    layout, tensors, _ = packed_layer(CASES[2])  # narrow: 70k rows of it stay small
    rows = loader.CUDA_MAX_GRID_Y + 4465  # e.g. profile --batch 64 --prompt-len 1094
    grids = []
    monkeypatch.setattr(B, "launch", lambda dev, file, instance, grid, block, **kw: grids.append(grid))
    linear = B.CudaLinear(layout, {k: v.to("meta") for k, v in tensors.items()})
    linear.gather(torch.empty(rows, layout.in_features, dtype=torch.float16, device="meta"))
    assert grids and grids[0][1] <= loader.CUDA_MAX_GRID_Y
    x = np.random.default_rng(0).standard_normal((rows, layout.in_features)).astype(np.float16).astype(np.float64)
    p = E.Packed.from_torch(layout, tensors)
    xp = E.gather(x, p)  # the emulation walks the same tiled grid
    cols = B.packed_columns(layout)
    np.testing.assert_array_equal(xp[:, cols], x[:, tensors["perm"].long().numpy()])
    assert not xp[:, layout.k2 : p.k2p].any()


def test_a_launch_outside_the_grid_limits_is_refused_before_the_gpu():
    with pytest.raises(ValueError, match="outside CUDA's limits"):
        B.launch(-1, "gather.cu", "llmq::gather_permuted", (1, 70_000), (256,),
                 x=None, ldx=1, perm=None, xp=None, M=70_000, k2=0, k2p=0, k4=8)  # fmt: skip


@pytest.mark.parametrize("path", ["gemv", "gemm"])
def test_the_matmul_entry_points_refuse_a_misaligned_xp(path):
    layout, tensors, _ = packed_layer(CASES[1])
    linear = B.CudaLinear(layout, {k: v.to("meta") for k, v in tensors.items()})
    storage = torch.zeros(2 * linear.kx + 8, dtype=torch.float16)
    misaligned = storage[1 : 1 + 2 * linear.kx].view(2, linear.kx)  # 2 bytes past a 16-byte boundary
    assert misaligned.is_contiguous() and misaligned.data_ptr() % 16
    with pytest.raises(ValueError, match="not 16-byte aligned"):
        getattr(linear, path)(misaligned, None)
    with pytest.raises(ValueError, match="contiguous fp16 tensor"):
        getattr(linear, path)(storage[: 2 * linear.kx].view(linear.kx, 2).T, None)


def test_the_launch_constants_are_the_kernels_own():
    from llmq.cuda import loader

    g = loader.geometry()
    assert loader.constants("gemm.cu")["GEMM_LDS"] == g.gemm_bk + 8 == g.gemm_lds
    assert g.gemm_tiles == (1, 2, 4) and g.gemv_vecs == (1, 4)
    assert len(loader.instances("gemv.cu")) == g.gemv_max_batch * 4
    with pytest.raises(Exception, match="only integers"):
        loader._integer(__import__("ast").parse("__import__('os')", mode="eval").body, {})

"""numpy emulation of the kernels' grid, block, warp and lane index math.

Each function here mirrors one kernel in ``cuda/*.cu``: the same launch grid, the same mapping
of threads to words, chunks, tiles and mma fragments, the same metadata addresses and the same
bit tricks, vectorized over threads with numpy. Run on a packed layer, it must reproduce the
exact torch reference (:func:`llmq.runtime.format.layout.dequantize`); the tests check that on random
shapes, including partial tiles and tails, so an index bug shows up on a CPU before a kernel
ever runs. Arithmetic is float64 except where a kernel rounds to fp16 (the tiles of
``gemm_mixed``, the output of ``dequant_packed``), which is emulated.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llmq.cuda.loader import geometry
from llmq.runtime.format.layout import LinearLayout


@dataclass(frozen=True)
class Packed:
    """A layer's packed tensors as numpy arrays (names as in the layout), plus its sizes."""

    layout: LinearLayout
    arrays: dict[str, np.ndarray]

    @classmethod
    def from_torch(cls, layout: LinearLayout, tensors) -> Packed:
        return cls(layout, {k: v.cpu().numpy() for k, v in tensors.items()})

    def words(self, name: str) -> np.ndarray:
        return self.arrays[name].view(np.uint32)

    @property
    def k2p(self) -> int:
        return self.layout.k2_padded


def biased_pair(word: np.ndarray, m: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """common.cuh::biased_pair: the half2 (1024 + code 2m, 1024 + code 2m+1), as two float arrays."""
    mask = 0x00030003 if bits == 2 else 0x000F000F
    pair = ((word.astype(np.uint64) >> (m * bits)) & mask) | 0x64006400
    low, high = (pair & 0xFFFF).astype(np.uint16), (pair >> 16).astype(np.uint16)
    return low.view(np.float16).astype(np.float64), high.view(np.float16).astype(np.float64)


def decode_word(word: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int) -> np.ndarray:
    """The 32 / bits weights of each word, scale * (q - zero), in the kernels' pair order -> [..., 32 / bits]."""
    out = []
    for m in range(16 // bits):
        low, high = biased_pair(word, m, bits)
        out += [scale * (low - (1024 + zero)), scale * (high - (1024 + zero))]
    return np.stack(out, axis=-1)


def scale2_meta(p: Packed, row: np.ndarray, word: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """q2.cuh::Part2::load_meta + Scale2::decode: (scale as fp32, zero) of 2-bit ``word`` of ``row``."""
    lay = p.layout
    groups = p.k2p // lay.g1
    blocks = (groups + lay.g2 - 1) // lay.g2
    group = word * 16 // lay.g1
    block = group // lay.g2
    meta = p.arrays["meta2"].reshape(-1)[row * groups + group].astype(np.int64)
    szero = p.arrays["szero2"].reshape(-1)[row * blocks + block].astype(np.int64)
    scale2 = p.arrays["scale2"].reshape(-1)[row * blocks + block].astype(np.float32)
    return (scale2 * ((meta >> 2) + szero).astype(np.float32)).astype(np.float64), meta & 3


def scale4_meta(p: Packed, row: np.ndarray, word: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """q4.cuh::Part4::load_meta + Scale4::decode."""
    groups = p.layout.k4 // p.layout.g4
    group = word * 8 // p.layout.g4
    index = row * groups + group
    return p.arrays["scale4"].reshape(-1)[index].astype(np.float64), p.arrays["zero4"].reshape(-1)[index].astype(
        np.int64
    )


def gather(x: np.ndarray, p: Packed) -> np.ndarray:
    """gather.cu::gather_permuted. x [M, K] -> xp [M, k2p + k4]; block row y writes rows y, y + gridDim.y, ..."""
    lay, k2p, g = p.layout, p.k2p, geometry()
    kx, m_rows = k2p + lay.k4, x.shape[0]
    perm = p.arrays["perm"]
    xp = np.full((m_rows, kx), np.nan)  # anything not written stays NaN and fails the comparison
    grid_x, grid_y = g.gather_grid(kx, m_rows)
    rows = _strided_rows(m_rows, grid_y)
    assert np.array_equal(np.bincount(rows, minlength=m_rows), np.ones(m_rows)), "each row written exactly once"
    for block_x in range(grid_x):
        c = block_x * g.gather_threads + np.arange(g.gather_threads)
        c = c[c < kx]
        source = np.full(c.size, -1)
        two, four = c < lay.k2, c >= k2p
        source[two], source[four] = perm[c[two]], perm[lay.k2 + c[four] - k2p]
        xp[np.ix_(rows, c)] = np.where(source >= 0, x[np.ix_(rows, np.maximum(source, 0))], 0.0)
    return xp


def _strided_rows(m_rows: int, grid_y: int) -> np.ndarray:
    """Every row the kernel's loop ``for (m = blockIdx.y; m < M; m += gridDim.y)`` visits, over all block rows."""
    first = np.arange(grid_y)
    visits = -(-(m_rows - first) // grid_y)  # rows block row y writes
    offsets = np.arange(visits.sum()) - np.repeat(np.cumsum(visits) - visits, visits)
    return np.repeat(first, visits) + offsets * grid_y


def _gemv_part(p: Packed, bits: int, vec: int, rows: np.ndarray, xp: np.ndarray, xoff: int, acc: np.ndarray) -> None:
    """gemv.cu::part_dot for every warp at once: rows [W, ROWS], acc [W, ROWS, 32 lanes, BATCH]."""
    cols_per_word = 32 // bits
    words = p.layout.words2 if bits == 2 else p.layout.words4
    q = p.words("qweight2" if bits == 2 else "qweight4").reshape(-1)
    chunks = words // vec
    lanes = np.arange(32)
    for start in range(0, chunks, 32):
        chunk = start + lanes  # [32]
        live = chunk < chunks
        for v in range(vec):
            word = np.where(live, chunk * vec + v, 0)  # [32]
            r_idx, w_idx = np.broadcast_arrays(rows[:, :, None], word[None, None, :])  # [W, ROWS, 32]
            bits_word = q[r_idx * words + w_idx]
            scale, zero = (scale2_meta if bits == 2 else scale4_meta)(p, r_idx, w_idx)
            q_minus_z = decode_word(bits_word, 1.0, zero, bits)  # [W, ROWS, 32, cols]
            col = xoff + w_idx * cols_per_word  # first activation of the word
            x = xp[:, col[..., None] + np.arange(cols_per_word)]  # [B, W, ROWS, 32, cols]
            dot = np.einsum("wrlc,bwrlc->wrlb", q_minus_z, x)
            acc += np.where(live[None, None, :, None], scale[..., None] * dot, 0.0)


def gemv_mixed(xp: np.ndarray, p: Packed, vec2: int, vec4: int) -> np.ndarray:
    """gemv.cu::gemv_mixed<BATCH, GEMV_ROWS, vec2, vec4> (bias left out). xp [B, kx] -> y [B, N]."""
    lay, k2p, g = p.layout, p.k2p, geometry()
    n, batch = lay.out_features, xp.shape[0]
    (grid,) = g.gemv_grid(n)
    warp_ids = np.arange(grid * g.gemv_warps)  # blockIdx.x * GEMV_WARPS + threadIdx.x / 32
    first = warp_ids * g.gemv_rows
    first = first[first < n]  # warps past N return at once
    rows = np.minimum(first[:, None] + np.arange(g.gemv_rows), n - 1)  # [W, ROWS]
    acc = np.zeros((first.size, g.gemv_rows, 32, batch))
    if lay.k2 > 0:
        _gemv_part(p, 2, vec2, rows, xp, 0, acc)
    if lay.k4 > 0:
        _gemv_part(p, 4, vec4, rows, xp, k2p, acc)
    if lay.n_outliers > 0:
        _gemv_outliers(p, rows, xp, acc)
    y = np.full((batch, n), np.nan)
    sums = acc.sum(axis=2)  # warp_sum over lanes: [W, ROWS, B]
    for r in range(g.gemv_rows):
        keep = first + r < n
        y[:, (first + r)[keep]] = sums[keep, r, :].T
    return y


def _gemv_outliers(p: Packed, rows: np.ndarray, xp: np.ndarray, acc: np.ndarray) -> None:
    rowptr, col, val = p.arrays["outlier_rowptr"], p.arrays["outlier_col"], p.arrays["outlier_val"]
    for w in range(rows.shape[0]):
        for r in range(rows.shape[1]):
            row = rows[w, r]
            for i in range(rowptr[row], rowptr[row + 1]):  # lane = (i - rowptr[row]) % 32
                lane = (i - rowptr[row]) % 32
                acc[w, r, lane] += float(val[i]) * xp[:, col[i]]


def dequant_packed(p: Packed) -> np.ndarray:
    """dequant.cu::dequant_packed: wp [N, k2p + k4] fp16 in packed column order, padding zeroed."""
    lay, k2p, g = p.layout, p.k2p, geometry()
    n, words2, words4 = lay.out_features, lay.words2, lay.words4
    words = words2 + words4
    wp = np.full((n, k2p + lay.k4), np.nan, dtype=np.float32)
    (grid,) = g.dequant_grid(n, words)
    ids = np.arange(grid * g.dequant_threads)
    ids = ids[ids < n * words]
    row, word = ids // words, ids % words
    two = word < words2
    if two.any():
        r, w = row[two], word[two]
        scale, zero = scale2_meta(p, r, w)
        vals = decode_word(p.words("qweight2").reshape(-1)[r * words2 + w], scale, zero, 2)
        vals = vals.astype(np.float32)
        if lay.n_outliers > 0:
            _dequant_outliers(p, r, w, vals)
        cols = w[:, None] * 16 + np.arange(16)
        vals[cols >= lay.k2] = 0.0
        wp[r[:, None], cols] = vals
    if (~two).any():
        r, w4 = row[~two], word[~two] - words2
        scale, zero = scale4_meta(p, r, w4)
        vals = decode_word(p.words("qweight4").reshape(-1)[r * words4 + w4], scale, zero, 4).astype(np.float32)
        wp[r[:, None], k2p + w4[:, None] * 8 + np.arange(8)] = vals
    return wp.astype(np.float16)


def _dequant_outliers(p: Packed, rows: np.ndarray, words: np.ndarray, vals: np.ndarray) -> None:
    rowptr, col, val = p.arrays["outlier_rowptr"], p.arrays["outlier_col"], p.arrays["outlier_val"]
    for t, (row, word) in enumerate(zip(rows, words, strict=True)):
        for i in range(rowptr[row], rowptr[row + 1]):
            c = col[i] - word * 16
            if 0 <= c < 16:
                vals[t, c] += np.float32(val[i])


def outliers_add(xp: np.ndarray, y: np.ndarray, p: Packed) -> np.ndarray:
    """dequant.cu::outliers_add: y [M, N] plus the CSR outliers times xp, one warp per row."""
    rowptr, col, val = p.arrays["outlier_rowptr"], p.arrays["outlier_col"], p.arrays["outlier_val"]
    y = y.copy()
    n, g = p.layout.out_features, geometry()
    (grid,) = g.outliers_grid(n)
    for block in range(grid):
        for warp in range(g.outlier_warps):
            row = block * g.outlier_warps + warp
            if row >= n or rowptr[row] == rowptr[row + 1]:
                continue
            lanes = np.zeros((32, y.shape[0]))
            for i in range(rowptr[row], rowptr[row + 1]):
                lanes[(i - rowptr[row]) % 32] += float(val[i]) * xp[:, col[i]]
            y[:, row] += lanes.sum(axis=0)
    return y


# mma.sync.m16n8k16 fragment layouts, as the PTX ISA defines them (lane = 4 * g + t). Element
# e of a thread's fragment sits at (row, col) of the A (16x16), B (16x8, k by n) or C (16x8)
# tile; registers hold two consecutive elements, the lower index in the lower 16 bits.
def mma_a_coords(g: int, t: int) -> list[tuple[int, int]]:
    return [(g + 8 * ((e // 2) % 2), 2 * t + e % 2 + 8 * (e // 4)) for e in range(8)]


def mma_b_coords(g: int, t: int) -> list[tuple[int, int]]:
    return [(2 * t + e % 2 + 8 * (e // 2), g) for e in range(4)]


def mma_c_coords(g: int, t: int) -> list[tuple[int, int]]:
    return [(g + 8 * (e // 2), 2 * t + e % 2) for e in range(4)]


def _gemm_decode_step(p: Packed, step: int, steps2: int, n0: int, ws: np.ndarray) -> None:
    """gemm.cu::load_step_raw + decode_step for all GEMM_THREADS threads into ws [GEMM_BN, GEMM_LDS] (fp16)."""
    lay, n = p.layout, p.layout.out_features
    tid = np.arange(geometry().gemm_threads)
    row, side = n0 + tid // 2, tid % 2
    two = step < steps2
    per, bits = (2, 2) if two else (4, 4)
    words = lay.words2 if two else lay.words4
    cols = 32 // bits
    q = p.words("qweight2" if two else "qweight4").reshape(-1)
    for i in range(per):
        word = (step * 4 if two else (step - steps2) * 8) + side * per + i
        valid = (row < n) & (word < words)
        r, w = np.where(valid, row, 0), np.where(valid, word, 0)
        scale, zero = (scale2_meta if two else scale4_meta)(p, r, w)
        vals = decode_word(q[r * words + w], scale, zero, bits).astype(np.float16)
        vals[~valid] = 0
        ws[(tid // 2)[:, None], (side * per + i)[:, None] * cols + np.arange(cols)] = vals


def _gemm_load_x(p: Packed, xp: np.ndarray, step: int, steps2: int, m0: int, tiles: int, xs: np.ndarray) -> None:
    """gemm.cu::load_x_async: 16-byte chunks, zero-filled past M and past the part's width."""
    two, geo = step < steps2, geometry()
    width, offset = (p.k2p, 0) if two else (p.layout.k4, p.k2p)
    col0 = (step if two else step - steps2) * geo.gemm_bk
    for i in range(tiles):
        chunk = np.arange(geo.gemm_threads) + geo.gemm_threads * i
        r, c = chunk // 8, (chunk % 8) * 8
        valid = (m0 + r < xp.shape[0]) & (col0 + c < width)
        for j in range(8):
            src = xp[np.where(valid, m0 + r, 0), np.where(valid, offset + col0 + c + j, 0)]
            xs[r, c + j] = np.where(valid, src, 0).astype(np.float16)


def _gemm_mma_step(xs: np.ndarray, ws: np.ndarray, tiles: int, acc: np.ndarray) -> None:
    """gemm.cu::mma_step: each lane's fragment loads, then the mma as the hardware reads them.

    acc [4 warps, 32 lanes, tiles, 2, 4] holds every thread's accumulator registers.
    """
    for warp in range(geometry().gemm_threads // 32):
        for kk in range(geometry().gemm_bk // 16):
            a_tile = np.zeros((tiles, 16, 16))
            b_tile = np.zeros((2, 16, 8))
            for lane in range(32):
                g, t = lane // 4, lane % 4
                col = kk * 16 + 2 * t
                for mt in range(tiles):  # registers a0..a3, two halves each (kernel index math)
                    regs = [
                        xs[mt * 16 + g, col : col + 2],
                        xs[mt * 16 + g + 8, col : col + 2],
                        xs[mt * 16 + g, col + 8 : col + 10],
                        xs[mt * 16 + g + 8, col + 8 : col + 10],
                    ]
                    for e, (ar, ac) in enumerate(mma_a_coords(g, t)):
                        a_tile[mt, ar, ac] = regs[e // 2][e % 2]
                for nt in range(2):
                    wrow = ws[warp * 16 + nt * 8 + g]
                    regs = [wrow[col : col + 2], wrow[col + 8 : col + 10]]
                    for e, (br, bc) in enumerate(mma_b_coords(g, t)):
                        b_tile[nt, br, bc] = regs[e // 2][e % 2]
            for lane in range(32):
                g, t = lane // 4, lane % 4
                for mt in range(tiles):
                    for nt in range(2):
                        c = a_tile[mt] @ b_tile[nt]
                        for e, (cr, cc) in enumerate(mma_c_coords(g, t)):
                            acc[warp, lane, mt, nt, e] += c[cr, cc]


def gemm_mixed(xp: np.ndarray, p: Packed, tiles: int) -> np.ndarray:
    """gemm.cu::gemm_mixed<tiles> (bias left out, no outliers). xp [M, kx] -> y [M, N]."""
    lay, k2p, geo = p.layout, p.k2p, geometry()
    m_rows, n, warps = xp.shape[0], lay.out_features, geo.gemm_threads // 32
    steps2 = -(-k2p // geo.gemm_bk)
    steps = steps2 + -(-lay.k4 // geo.gemm_bk)
    y = np.full((m_rows, n), np.nan)
    grid_x, grid_y = geo.gemm_grid(n, m_rows, tiles)
    for bx in range(grid_x):
        for by in range(grid_y):
            n0, m0 = bx * geo.gemm_bn, by * geo.gemm_tile_m * tiles
            acc = np.zeros((warps, 32, tiles, 2, 4))
            for step in range(steps):
                xs = np.full((geo.gemm_tile_m * tiles, geo.gemm_lds), np.nan, dtype=np.float16)  # padding never read
                ws = np.full((geo.gemm_bn, geo.gemm_lds), np.nan, dtype=np.float16)
                _gemm_load_x(p, xp, step, steps2, m0, tiles, xs)
                _gemm_decode_step(p, step, steps2, n0, ws)
                _gemm_mma_step(xs.astype(np.float64), ws.astype(np.float64), tiles, acc)
            for warp in range(warps):
                for lane in range(32):
                    g, t = lane // 4, lane % 4
                    for mt in range(tiles):
                        for nt in range(2):
                            for i in range(4):
                                m = m0 + mt * 16 + g + (8 if i >= 2 else 0)
                                col = n0 + warp * 16 + nt * 8 + 2 * t + (i & 1)
                                if m < m_rows and col < n:
                                    y[m, col] = acc[warp, lane, mt, nt, i]
    return y

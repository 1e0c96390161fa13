// llmq kernel: mixed 2/4-bit GEMV for decode, y[b, :] = W x[b, :] for a batch of 1 to 8.
//
// Layout read: llmq/runtime/format/layout.py (2-bit part with two-level scales, 4-bit stripes, CSR
// outliers); activations come permuted and padded by gather.cu, so packed column c of the
// 2-bit part multiplies xp[b, c] and column c of the stripes multiplies xp[b, k2p + c].
// Mirrors: llmq.runtime.format.layout.dequantize followed by a matmul. Emulated by
// llmq/cuda/emulate.py::gemv_mixed (same block, warp and lane index math).
//
// Work split: a warp owns ROWS consecutive output rows and walks along K; lane l takes the
// VEC-word chunks l, l + 32, ... so that a warp's 32 lanes read 32 * 16 contiguous bytes of a
// row per step (one 16-byte load per lane when VEC = 4). The ROWS rows share each activation
// load, which halves the L1 traffic for x at ROWS = 2.
//
// Asynchronous dequantization (arXiv 2311.16442): each step issues the loads of the lane's next
// chunk (weights and metadata) into a second register buffer, then does the multiply-adds of
// the current chunk, then the second-order scale decode of the next chunk. The scale decode
// needs only the metadata, so it runs while the next weights are still in flight.
#include "q2.cuh"
#include "q4.cuh"

namespace llmq {

constexpr int GEMV_WARPS = 4;       // warps per block
constexpr int GEMV_ROWS = 2;        // rows per warp of the instances the host launches (template ROWS)
constexpr int GEMV_MAX_BATCH = 8;   // largest BATCH instantiated: acc[ROWS][BATCH] stays in registers
constexpr int GEMV_VEC_WIDE = 4;    // words per lane in one 16-byte load (template VEC2 / VEC4)

template <int VEC>
__device__ __forceinline__ void load_words(u32 (&dst)[VEC], const u32* __restrict__ src) {
    if constexpr (VEC == 4) {
        uint4 v = *reinterpret_cast<const uint4*>(src);  // one 16-byte load
        dst[0] = v.x; dst[1] = v.y; dst[2] = v.z; dst[3] = v.w;
    } else {
#pragma unroll
        for (int v = 0; v < VEC; ++v) dst[v] = src[v];
    }
}

// Activations of one word: 32 / BITS halves starting at a 16-byte aligned address.
template <int BITS>
__device__ __forceinline__ void load_x(half2 (&dst)[16 / BITS], const half* __restrict__ src) {
#pragma unroll
    for (int i = 0; i < 16 / BITS / 4; ++i) {
        uint4 v = reinterpret_cast<const uint4*>(src)[i];
        const half2* pairs = reinterpret_cast<const half2*>(&v);
#pragma unroll
        for (int j = 0; j < 4; ++j) dst[4 * i + j] = pairs[j];
    }
}

// One part (2- or 4-bit) of ROWS rows, accumulated into acc[row][batch].
template <int BITS, int BATCH, int ROWS, int VEC, class Part, class Raw, class Scale>
__device__ __forceinline__ void part_dot(const Part& part, const int (&rows)[ROWS], const half* __restrict__ xp,
                                         int kx, int xoff, int lane, float (&acc)[ROWS][BATCH]) {
    constexpr int COLS = 32 / BITS;  // columns per word
    const int chunks = part.words / VEC;
    u32 cur[ROWS][VEC], nxt[ROWS][VEC];
    Scale scale[ROWS][VEC];
    Raw raw[ROWS][VEC];
    int chunk = lane;
    if (chunk < chunks) {
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            load_words<VEC>(cur[r], part.q + (long long)rows[r] * part.words + chunk * VEC);
#pragma unroll
            for (int v = 0; v < VEC; ++v) scale[r][v] = Scale::decode(part.load_meta(rows[r], chunk * VEC + v));
        }
    }
    for (; chunk < chunks; chunk += 32) {
        const int next = chunk + 32;
        const bool more = next < chunks;
        if (more) {  // issue the next chunk's loads first; nothing below waits on them until the decode
#pragma unroll
            for (int r = 0; r < ROWS; ++r) {
                load_words<VEC>(nxt[r], part.q + (long long)rows[r] * part.words + next * VEC);
#pragma unroll
                for (int v = 0; v < VEC; ++v) raw[r][v] = part.load_meta(rows[r], next * VEC + v);
            }
        }
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
            const int col = xoff + (chunk * VEC + v) * COLS;
#pragma unroll
            for (int b = 0; b < BATCH; ++b) {
                half2 x[16 / BITS];
                load_x<BITS>(x, xp + (long long)b * kx + col);
#pragma unroll
                for (int r = 0; r < ROWS; ++r)
                    acc[r][b] = fmaf(scale[r][v].scale, word_dot<BITS>(cur[r][v], scale[r][v].zero, x), acc[r][b]);
            }
        }
        if (more) {
#pragma unroll
            for (int r = 0; r < ROWS; ++r) {
#pragma unroll
                for (int v = 0; v < VEC; ++v) {
                    scale[r][v] = Scale::decode(raw[r][v]);
                    cur[r][v] = nxt[r][v];
                }
            }
        }
    }
}

// Grid: ceil(N / (GEMV_WARPS * ROWS)) blocks of 32 * GEMV_WARPS threads.
//
// xp     half [BATCH, kx]   permuted, padded activations (gather.cu), kx = k2p + k4, 16-byte aligned
// y      half [BATCH, N]    output, row stride N
// bias   half [N] or null
// q2     u32  [N, k2p/16]   2-bit codes; meta2 u8 [N, k2p/g1]; scale2 half, szero2 u8 [N, blocks]
// q4     u32  [N, k4/8]     4-bit codes; scale4 half, zero4 u8 [N, k4/g4]
// orow   int  [N+1], ocol int [nnz], oval half [nnz]: CSR outliers of the 2-bit part, or null
// VEC2 / VEC4 words per lane load in the 2- / 4-bit part: 4 (one 16-byte load) when the part's
// words per row are a multiple of 4 and its rows 16-byte aligned, else 1; the host checks.
template <int BATCH, int ROWS, int VEC2, int VEC4>
__global__ void __launch_bounds__(32 * GEMV_WARPS)
gemv_mixed(const half* __restrict__ xp, half* __restrict__ y, const half* __restrict__ bias, int N, int kx,
           const u32* __restrict__ q2, const u8* __restrict__ meta2, const half* __restrict__ scale2,
           const u8* __restrict__ szero2, int k2p, int g1, int g2,
           const u32* __restrict__ q4, const half* __restrict__ scale4, const u8* __restrict__ zero4, int k4, int g4,
           const int* __restrict__ orow, const int* __restrict__ ocol, const half* __restrict__ oval) {
    const int lane = threadIdx.x % 32;
    const int first = (blockIdx.x * GEMV_WARPS + threadIdx.x / 32) * ROWS;
    if (first >= N) return;
    int rows[ROWS];  // rows past N repeat the last row: loads stay in bounds, stores are skipped
#pragma unroll
    for (int r = 0; r < ROWS; ++r) rows[r] = min(first + r, N - 1);

    float acc[ROWS][BATCH];
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
        for (int b = 0; b < BATCH; ++b) acc[r][b] = 0.f;

    if (k2p > 0) {
        const int groups = k2p / g1;
        const Part2 part{q2, meta2, scale2, szero2, k2p / 16, groups, (groups + g2 - 1) / g2, g1, g2};
        part_dot<2, BATCH, ROWS, VEC2, Part2, Meta2Raw, Scale2>(part, rows, xp, kx, 0, lane, acc);
    }
    if (k4 > 0) {
        const Part4 part{q4, scale4, zero4, k4 / 8, k4 / g4, g4};
        part_dot<4, BATCH, ROWS, VEC4, Part4, Meta4Raw, Scale4>(part, rows, xp, kx, k2p, lane, acc);
    }
    if (orow != nullptr) {  // sparse fp16 outliers, added to the 2-bit weights they sit on
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            for (int i = orow[rows[r]] + lane; i < orow[rows[r] + 1]; i += 32) {
                const float val = __half2float(oval[i]);
                const int col = ocol[i];
#pragma unroll
                for (int b = 0; b < BATCH; ++b) acc[r][b] = fmaf(val, __half2float(xp[(long long)b * kx + col]), acc[r][b]);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
#pragma unroll
        for (int b = 0; b < BATCH; ++b) {
            const float sum = warp_sum(acc[r][b]);
            if (lane == 0 && first + r < N) {
                const float add = bias != nullptr ? __half2float(bias[first + r]) : 0.f;
                y[(long long)b * N + first + r] = __float2half_rn(sum + add);
            }
        }
    }
}

}  // namespace llmq

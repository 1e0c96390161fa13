// llmq kernels: dequantize a packed layer to fp16, and add the sparse outliers to a product.
//
// Layout read: llmq/runtime/format/layout.py. Mirrors llmq.runtime.format.layout.dequantize, but writes the
// weight in *packed* column order with the 2-bit padding columns zeroed: wp [N, k2p + k4], so
// that y = xp @ wp^T with the gathered activations of gather.cu. (The caller scatters columns
// back with `perm` when it wants the original order.) Emulated by llmq/cuda/emulate.py::dequant.
//
// The 2-bit values are decoded in fp32 with the same two-level formula as q2.cuh and rounded
// to fp16 once; outliers are added in fp32 before that rounding, as the reference does.
#include "q2.cuh"
#include "q4.cuh"

namespace llmq {

constexpr int DEQUANT_THREADS = 256;  // threads per block of dequant_packed, one 32-bit word each
constexpr int OUTLIER_WARPS = 4;      // warps per block of outliers_add, one output row each

// Grid: ceil(N * (k2p/16 + k4/8) / DEQUANT_THREADS) blocks; one thread per 32-bit word.
//
// wp   half [N, k2p + k4] output, packed column order
// the packed tensors as in gemv.cu; orow/ocol/oval may be null
__global__ void __launch_bounds__(DEQUANT_THREADS)
dequant_packed(half* __restrict__ wp, int N, int k2,
               const u32* __restrict__ q2, const u8* __restrict__ meta2, const half* __restrict__ scale2,
               const u8* __restrict__ szero2, int k2p, int g1, int g2,
               const u32* __restrict__ q4, const half* __restrict__ scale4, const u8* __restrict__ zero4, int k4, int g4,
               const int* __restrict__ orow, const int* __restrict__ ocol, const half* __restrict__ oval) {
    const int words2 = k2p / 16, words4 = k4 / 8, words = words2 + words4;
    const long long id = (long long)blockIdx.x * DEQUANT_THREADS + threadIdx.x;
    if (id >= (long long)N * words) return;
    const int row = (int)(id / words), word = (int)(id % words);
    const int kx = k2p + k4;
    half* out = wp + (long long)row * kx;
    if (word < words2) {
        const int groups = k2p / g1;
        const Part2 part{q2, meta2, scale2, szero2, words2, groups, (groups + g2 - 1) / g2, g1, g2};
        const Scale2 s = Scale2::decode(part.load_meta(row, word));
        const u32 bits = part.q[(long long)row * words2 + word];
        float w[16];
#pragma unroll
        for (int m = 0; m < 8; ++m) {
            const float2 q = __half22float2(__hsub2(biased_pair<2>(bits, m), s.zero));
            w[2 * m] = s.scale * q.x;
            w[2 * m + 1] = s.scale * q.y;
        }
        const int first = word * 16;
        if (orow != nullptr) {  // few per row: a scan of the row's CSR entries is cheap here
            for (int i = orow[row]; i < orow[row + 1]; ++i) {
                const int c = ocol[i] - first;
                const float v = __half2float(oval[i]);
#pragma unroll
                for (int j = 0; j < 16; ++j)  // constant indices keep w[] in registers
                    if (c == j) w[j] += v;
            }
        }
#pragma unroll
        for (int j = 0; j < 16; ++j) out[first + j] = __float2half_rn(first + j < k2 ? w[j] : 0.f);  // padding: 0
    } else {
        const int w4 = word - words2;
        const Part4 part{q4, scale4, zero4, words4, k4 / g4, g4};
        const Scale4 s = Scale4::decode(part.load_meta(row, w4));
        const u32 bits = part.q[(long long)row * words4 + w4];
        const int first = k2p + w4 * 8;
#pragma unroll
        for (int m = 0; m < 4; ++m) {
            const float2 q = __half22float2(__hsub2(biased_pair<4>(bits, m), s.zero));
            out[first + 2 * m] = __float2half_rn(s.scale * q.x);
            out[first + 2 * m + 1] = __float2half_rn(s.scale * q.y);
        }
    }
}

// y[m, r] += sum over row r's outliers of val * xp[m, col], for the batched path (the GEMM
// kernel leaves outliers out). Grid: ceil(N / OUTLIER_WARPS) blocks, one warp per row r;
// the lanes stride the row's entries and a shuffle reduction keeps the sum deterministic.
// xp half [M, kx], y half [M, N] (row stride N).
__global__ void __launch_bounds__(32 * OUTLIER_WARPS)
outliers_add(const half* __restrict__ xp, int kx, half* __restrict__ y, int M, int N,
             const int* __restrict__ orow, const int* __restrict__ ocol, const half* __restrict__ oval) {
    const int row = blockIdx.x * OUTLIER_WARPS + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= N) return;
    const int begin = orow[row], end = orow[row + 1];
    if (begin == end) return;
    for (long long m = 0; m < M; ++m) {
        float acc = 0.f;
        for (int i = begin + lane; i < end; i += 32)
            acc = fmaf(__half2float(oval[i]), __half2float(xp[m * kx + ocol[i]]), acc);
        acc = warp_sum(acc);
        if (lane == 0) y[m * N + row] = __float2half_rn(__half2float(y[m * N + row]) + acc);
    }
}

}  // namespace llmq

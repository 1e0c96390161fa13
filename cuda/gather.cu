// llmq kernel: permute and pad the activations for the quantized matmuls.
//
// Layout read: llmq/runtime/format/layout.py, `perm` (packed column c holds input channel perm[c];
// the first k2 packed columns are the 2-bit part, the last k4 the stripes).
// Mirrors: x[:, perm] with zero columns inserted after the 2-bit part up to k2p, so that the
// padding weights of the 2-bit part always meet a zero. Emulated by llmq/cuda/emulate.py::gather.
//
// xp[m, c] = x[m, perm[c]]            for c < k2
//          = 0                        for k2 <= c < k2p
//          = x[m, perm[k2 + c - k2p]] for k2p <= c < k2p + k4
#include "common.cuh"

namespace llmq {

constexpr int GATHER_THREADS = 256;  // threads per block, one packed column each

// Grid: (ceil(kx / GATHER_THREADS), min(M, 65535)) blocks; thread c of block row y writes xp[m, c]
// for m = y, y + gridDim.y, ...: CUDA caps gridDim.y at 65535, and a prefill can have more rows.
// x half [M, K] (row stride ldx), perm int [K], xp half [M, kx] with kx = k2p + k4.
__global__ void __launch_bounds__(GATHER_THREADS)
gather_permuted(const half* __restrict__ x, int ldx, const int* __restrict__ perm, half* __restrict__ xp,
                int M, int k2, int k2p, int k4) {
    const int kx = k2p + k4;
    const int c = blockIdx.x * GATHER_THREADS + threadIdx.x;
    if (c >= kx) return;
    const int source = c < k2 ? perm[c] : (c >= k2p ? perm[k2 + c - k2p] : -1);  // -1: 2-bit padding
    for (long long m = blockIdx.y; m < M; m += gridDim.y)
        xp[m * kx + c] = source < 0 ? __float2half_rn(0.f) : x[m * ldx + source];
}

}  // namespace llmq

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

// Grid: (ceil(kx / 256), M) blocks of 256 threads; thread c of row m writes xp[m, c].
// x half [M, K] (row stride ldx), perm int [K], xp half [M, kx] with kx = k2p + k4.
__global__ void __launch_bounds__(256)
gather_permuted(const half* __restrict__ x, int ldx, const int* __restrict__ perm, half* __restrict__ xp,
                int k2, int k2p, int k4) {
    const int kx = k2p + k4;
    const int c = blockIdx.x * 256 + threadIdx.x;
    const long long m = blockIdx.y;
    if (c >= kx) return;
    half value = __float2half_rn(0.f);
    if (c < k2) value = x[m * ldx + perm[c]];
    else if (c >= k2p) value = x[m * ldx + perm[k2 + c - k2p]];
    xp[m * kx + c] = value;
}

}  // namespace llmq

// llmq kernels: shared types and the code-to-half2 trick.
//
// Layout: llmq/runtime/format/layout.py (the one source of truth; docs/format.md in prose).
// Mirrored in numpy by llmq/cuda/emulate.py.
//
// NVRTC has no C standard headers, so the fixed-width types are spelled out here.
#pragma once
#include <cuda_fp16.h>

namespace llmq {

typedef unsigned int u32;
typedef unsigned char u8;

// Codes sit half-interleaved in a 32-bit word (layout.lane_shifts): code 2m at bit m*BITS,
// code 2m+1 at bit 16 + m*BITS. One shift, one AND and one OR with the fp16 bits of 1024
// (0x6400, whose ulp is 1) give the half2 (1024 + c[2m], 1024 + c[2m+1]) exactly: the
// unpack costs about one LOP3 per two codes instead of a shift and mask per code.
template <int BITS>
__device__ __forceinline__ half2 biased_pair(u32 word, int m) {
    constexpr u32 mask = BITS == 2 ? 0x00030003u : 0x000F000Fu;
    u32 bits = ((word >> (m * BITS)) & mask) | 0x64006400u;
    return *reinterpret_cast<half2*>(&bits);
}

// half2 (1024 + zero, 1024 + zero): subtracting it from biased_pair gives (q - zero) exactly,
// since both are integers below 2048.
__device__ __forceinline__ half2 biased_zero(int zero) {
    return __half2half2(__int2half_rn(1024 + zero));
}

// Sum of (q - zero) * x over the 32 / BITS codes of one word, in fp32. `x` points at the
// word's first activation, as half2 pairs (16 / BITS of them).
template <int BITS>
__device__ __forceinline__ float word_dot(u32 word, half2 zero, const half2* __restrict__ x) {
    float acc = 0.f;
#pragma unroll
    for (int m = 0; m < 16 / BITS; ++m) {
        float2 q = __half22float2(__hsub2(biased_pair<BITS>(word, m), zero));
        float2 v = __half22float2(x[m]);
        acc = fmaf(q.x, v.x, acc);
        acc = fmaf(q.y, v.y, acc);
    }
    return acc;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

}  // namespace llmq

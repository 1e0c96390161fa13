// llmq kernels: the 2-bit part and its two-level scales.
//
// Layout: llmq/runtime/format/layout.py, "The 2-bit part". Row r, packed column c, group j = c / g1,
// block b = j / g2:
//     scale = scale2[r, b] * (qs[r, j] + szero2[r, b])     (second-order decode, fp32)
//     w     = scale * (q2[r, c] - z2[r, j])
// meta2[r, j] holds z2 in bits 0-1 and qs above. A word holds 16 codes and never straddles a
// group, because g1 is a multiple of 16.
#pragma once
#include "common.cuh"

namespace llmq {

// The raw metadata of one 2-bit word, loaded ahead of the word itself.
struct Meta2Raw {
    u8 meta;
    u8 szero;
    half scale2;
};

// Pointers and sizes of one layer's 2-bit part.
struct Part2 {
    const u32* __restrict__ q;       // [N, k2p / 16]
    const u8* __restrict__ meta;     // [N, k2p / g1]
    const half* __restrict__ scale2; // [N, blocks]
    const u8* __restrict__ szero2;   // [N, blocks]
    int words;                       // k2p / 16 words per row
    int groups;                      // k2p / g1
    int blocks;                      // ceil(groups / g2)
    int g1;
    int g2;

    __device__ __forceinline__ Meta2Raw load_meta(int row, int word) const {
        int group = word * 16 / g1;
        int block = group / g2;
        Meta2Raw raw;
        raw.meta = meta[(long long)row * groups + group];
        raw.szero = szero2[(long long)row * blocks + block];
        raw.scale2 = scale2[(long long)row * blocks + block];
        return raw;
    }
};

// The second-order decode: it needs only the metadata, never the weights, so kernels run it
// while the weight loads of the same word are still in flight.
struct Scale2 {
    float scale;
    half2 zero;  // biased_zero(z2)

    __device__ __forceinline__ static Scale2 decode(Meta2Raw raw) {
        Scale2 s;
        s.scale = __half2float(raw.scale2) * (float)((raw.meta >> 2) + raw.szero);
        s.zero = biased_zero(raw.meta & 3);
        return s;
    }
};

}  // namespace llmq

// llmq kernels: the 4-bit stripes.
//
// Layout: llmq/runtime/format/layout.py, "The 4-bit part". Row r, column c of the stripes, group
// j = c / g4:  w = scale4[r, j] * (q4[r, c] - zero4[r, j]). A word holds 8 codes and never
// straddles a group, because g4 is a multiple of 8.
#pragma once
#include "common.cuh"

namespace llmq {

struct Meta4Raw {
    u8 zero;
    half scale;
};

struct Part4 {
    const u32* __restrict__ q;      // [N, k4 / 8]
    const half* __restrict__ scale; // [N, k4 / g4]
    const u8* __restrict__ zero;    // [N, k4 / g4]
    int words;                      // k4 / 8 words per row
    int groups;                     // k4 / g4
    int g4;

    __device__ __forceinline__ Meta4Raw load_meta(int row, int word) const {
        int group = word * 8 / g4;
        Meta4Raw raw;
        raw.zero = zero[(long long)row * groups + group];
        raw.scale = scale[(long long)row * groups + group];
        return raw;
    }
};

struct Scale4 {
    float scale;
    half2 zero;

    __device__ __forceinline__ static Scale4 decode(Meta4Raw raw) {
        Scale4 s;
        s.scale = __half2float(raw.scale);
        s.zero = biased_zero(raw.zero);
        return s;
    }
};

}  // namespace llmq

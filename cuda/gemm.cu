// llmq kernel: mixed 2/4-bit GEMM on tensor cores for prefill and batches above the GEMV's,
// Y[M, N] = Xp[M, kx] · Wp[N, kx]^T with Wp dequantized tile by tile into shared memory.
//
// Layout read: llmq/runtime/format/layout.py (2-bit part with two-level scales, 4-bit stripes);
// activations come permuted and padded by gather.cu. Outliers are not handled here: the
// dispatcher adds them with dequant.cu::outliers_add. Mirrors llmq.runtime.format.layout.dequantize
// followed by a matmul; emulated by llmq/cuda/emulate.py::gemm_mixed (tiles, thread-to-word
// mapping and the mma.m16n8k16 fragment layout).
//
// Tiles: a block of 4 warps owns BN = 64 output features and BM = 16 * MT rows of X, and steps
// along K in BK = 64 columns, first through the 2-bit part, then through the stripes (a step
// never mixes the two, so a thread decodes words of one bit width per step). Warp w computes
// features [16w, 16w + 16) of the tile as two n8 tiles for all MT m16 tiles.
//
// Pipeline, per step s (two shared-memory buffers):
//   1. the raw words and metadata of step s+1 are loaded into registers and X of step s+1 is
//      copied with cp.async into the other buffer; both are in flight during 2;
//   2. mma.sync on step s's buffers;
//   3. step s+1's words are decoded (second-order scales first) into the other buffer.
// Shared rows are padded to 72 halves (144 bytes): the fragment loads of lanes (g, t) hit words
// 36g + t + const, which fall in 32 different banks, so the mma operand loads are conflict-free.
#include "q2.cuh"
#include "q4.cuh"

namespace llmq {

constexpr int GEMM_BN = 64;            // output features per block
constexpr int GEMM_BK = 64;            // K columns per pipeline step
constexpr int GEMM_LDS = GEMM_BK + 8;  // padded row length in halves
constexpr int GEMM_THREADS = 128;      // 4 warps
constexpr int GEMM_TILE_M = 16;        // rows of X per m16 tile; a block holds MT of them
constexpr int GEMM_MAX_TILES = 4;      // largest MT instantiated (1, 2, 4)

// What one thread carries from the load of a step to its decode: up to 4 words of one W row.
struct StepRaw {
    u32 words[4];
    u8 meta[4];    // 2-bit: meta2 byte; 4-bit: zero4
    u8 szero[4];   // 2-bit only
    half scale[4]; // 2-bit: scale2; 4-bit: scale4
    unsigned valid;  // bit i: word i exists (row < N and word inside the part)
};

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
    const unsigned dst = (unsigned)__cvta_generic_to_shared(smem);
    const int bytes = valid ? 16 : 0;  // 0 bytes read: the 16-byte destination is zero-filled
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::); }

__device__ __forceinline__ void mma_16816(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Everything the steps need, gathered so device helpers take one argument.
struct GemmArgs {
    const half* __restrict__ xp;
    int M, N, kx, k2p, k4, steps2;
    Part2 two;
    Part4 four;
};

// Thread tid owns W tile row tid / 2; in a 2-bit step words 2 * (tid % 2) + {0, 1} of the
// step's 4, in a 4-bit step words 4 * (tid % 2) + {0..3} of its 8.
__device__ __forceinline__ void load_step_raw(const GemmArgs& a, int step, int n0, StepRaw& raw) {
    const int row = n0 + threadIdx.x / 2, side = threadIdx.x % 2;
    raw.valid = 0;
    if (step < a.steps2) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int word = step * 4 + side * 2 + i;
            if (row < a.N && word < a.two.words) {
                raw.valid |= 1u << i;
                raw.words[i] = a.two.q[(long long)row * a.two.words + word];
                const Meta2Raw m = a.two.load_meta(row, word);
                raw.meta[i] = m.meta; raw.szero[i] = m.szero; raw.scale[i] = m.scale2;
            }
        }
    } else {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int word = (step - a.steps2) * 8 + side * 4 + i;
            if (row < a.N && word < a.four.words) {
                raw.valid |= 1u << i;
                raw.words[i] = a.four.q[(long long)row * a.four.words + word];
                const Meta4Raw m = a.four.load_meta(row, word);
                raw.meta[i] = m.zero; raw.scale[i] = m.scale;
            }
        }
    }
}

// Decode a word into `cols` halves at `dst` (16-byte aligned); zeros for a missing word.
template <int BITS>
__device__ __forceinline__ void store_word(half* dst, bool valid, u32 bits, float scale, half2 zero) {
    constexpr int PAIRS = 16 / BITS;
    half2 out[PAIRS];
#pragma unroll
    for (int m = 0; m < PAIRS; ++m) {
        const float2 q = __half22float2(__hsub2(biased_pair<BITS>(bits, m), zero));
        out[m] = valid ? __floats2half2_rn(scale * q.x, scale * q.y) : __float2half2_rn(0.f);
    }
#pragma unroll
    for (int i = 0; i < PAIRS / 4; ++i) reinterpret_cast<uint4*>(dst)[i] = reinterpret_cast<const uint4*>(out)[i];
}

__device__ __forceinline__ void decode_step(const GemmArgs& a, int step, const StepRaw& raw,
                                            half (*ws)[GEMM_LDS]) {
    half* row = ws[threadIdx.x / 2];
    const int side = threadIdx.x % 2;
    if (step < a.steps2) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const bool valid = raw.valid >> i & 1u;
            Meta2Raw m;
            m.meta = valid ? raw.meta[i] : 0; m.szero = valid ? raw.szero[i] : 0;
            m.scale2 = valid ? raw.scale[i] : __float2half_rn(0.f);
            const Scale2 s = Scale2::decode(m);
            store_word<2>(row + (side * 2 + i) * 16, valid, valid ? raw.words[i] : 0u, s.scale, s.zero);
        }
    } else {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const bool valid = raw.valid >> i & 1u;
            Meta4Raw m;
            m.zero = valid ? raw.meta[i] : 0; m.scale = valid ? raw.scale[i] : __float2half_rn(0.f);
            const Scale4 s = Scale4::decode(m);
            store_word<4>(row + (side * 4 + i) * 8, valid, valid ? raw.words[i] : 0u, s.scale, s.zero);
        }
    }
}

// X tile of a step: BM rows x 64 columns as 8 16-byte chunks per row, MT chunks per thread.
// Columns past the part's width (the tail of the last step) and rows past M are zero-filled.
template <int MT>
__device__ __forceinline__ void load_x_async(const GemmArgs& a, int step, int m0, half (*xs)[GEMM_LDS]) {
    const bool two = step < a.steps2;
    const int width = two ? a.k2p : a.k4;
    const int offset = two ? 0 : a.k2p;
    const int col0 = (two ? step : step - a.steps2) * GEMM_BK;
#pragma unroll
    for (int i = 0; i < MT; ++i) {
        const int chunk = threadIdx.x + GEMM_THREADS * i;
        const int r = chunk / 8, c = (chunk % 8) * 8;
        const bool valid = m0 + r < a.M && col0 + c < width;
        const half* src = valid ? a.xp + (long long)(m0 + r) * a.kx + offset + col0 + c : a.xp;
        cp_async16(&xs[r][c], src, valid);
    }
}

template <int MT>
__device__ __forceinline__ void mma_step(const half (*xs)[GEMM_LDS], const half (*ws)[GEMM_LDS], float (&acc)[MT][2][4]) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
#pragma unroll
    for (int kk = 0; kk < GEMM_BK / 16; ++kk) {
        const int col = kk * 16 + 2 * t;
        u32 af[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            af[mt][0] = *reinterpret_cast<const u32*>(&xs[mt * 16 + g][col]);
            af[mt][1] = *reinterpret_cast<const u32*>(&xs[mt * 16 + g + 8][col]);
            af[mt][2] = *reinterpret_cast<const u32*>(&xs[mt * 16 + g][col + 8]);
            af[mt][3] = *reinterpret_cast<const u32*>(&xs[mt * 16 + g + 8][col + 8]);
        }
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
            const half* wrow = ws[warp * 16 + nt * 8 + g];
            const u32 b0 = *reinterpret_cast<const u32*>(wrow + col);
            const u32 b1 = *reinterpret_cast<const u32*>(wrow + col + 8);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) mma_16816(acc[mt][nt], af[mt], b0, b1);
        }
    }
}

// Grid: (ceil(N / GEMM_BN), ceil(M / (GEMM_TILE_M * MT))) blocks of GEMM_THREADS threads.
//
// xp   half [M, kx]  permuted, padded activations (gather.cu), kx = k2p + k4, 16-byte aligned rows
// y    half [M, N]   output, row stride N
// bias half [N] or null; the packed tensors as in gemv.cu (no outliers)
template <int MT>
__global__ void __launch_bounds__(GEMM_THREADS)
gemm_mixed(const half* __restrict__ xp, half* __restrict__ y, const half* __restrict__ bias, int M, int N, int kx,
           const u32* __restrict__ q2, const u8* __restrict__ meta2, const half* __restrict__ scale2,
           const u8* __restrict__ szero2, int k2p, int g1, int g2,
           const u32* __restrict__ q4, const half* __restrict__ scale4, const u8* __restrict__ zero4, int k4, int g4) {
    __shared__ __align__(16) half xs[2][GEMM_TILE_M * MT][GEMM_LDS];
    __shared__ __align__(16) half ws[2][GEMM_BN][GEMM_LDS];
    const int groups2 = g1 > 0 ? k2p / g1 : 0;
    const GemmArgs a{xp, M, N, kx, k2p, k4, (k2p + GEMM_BK - 1) / GEMM_BK,
                     Part2{q2, meta2, scale2, szero2, k2p / 16, groups2, g2 > 0 ? (groups2 + g2 - 1) / g2 : 0, g1, g2},
                     Part4{q4, scale4, zero4, k4 / 8, g4 > 0 ? k4 / g4 : 0, g4}};
    const int steps = a.steps2 + (k4 + GEMM_BK - 1) / GEMM_BK;
    const int n0 = blockIdx.x * GEMM_BN, m0 = blockIdx.y * GEMM_TILE_M * MT;

    float acc[MT][2][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < 2; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[mt][nt][i] = 0.f;

    StepRaw raw;
    load_step_raw(a, 0, n0, raw);
    load_x_async<MT>(a, 0, m0, xs[0]);
    cp_async_commit();
    decode_step(a, 0, raw, ws[0]);
    cp_async_wait_all();
    __syncthreads();
    for (int step = 0; step < steps; ++step) {
        const int buf = step & 1;
        const bool more = step + 1 < steps;
        if (more) {
            load_step_raw(a, step + 1, n0, raw);
            load_x_async<MT>(a, step + 1, m0, xs[buf ^ 1]);
            cp_async_commit();
        }
        mma_step<MT>(xs[buf], ws[buf], acc);
        if (more) decode_step(a, step + 1, raw, ws[buf ^ 1]);
        cp_async_wait_all();
        __syncthreads();
    }

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int m = m0 + mt * 16 + g + (i >= 2 ? 8 : 0);
                const int n = n0 + warp * 16 + nt * 8 + 2 * t + (i & 1);
                if (m < M && n < N) {
                    const float add = bias != nullptr ? __half2float(bias[n]) : 0.f;
                    y[(long long)m * N + n] = __float2half_rn(acc[mt][nt][i] + add);
                }
            }
        }
    }
}

}  // namespace llmq

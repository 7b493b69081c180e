// Causal flash attention on tensor cores (sm_80+): forward and backward, bf16 and fp16.
//
// Per (batch b, query head h), K and V being those of K/V head h / group (grouped-query attention:
// nh query heads share nkv = nh / group K/V heads; group 1 is multi-head attention), with
// S = scale * Q K^T masked above the diagonal:
//   forward   O = softmax(S) V,  lse = logsumexp of each row of S (fp32, saved for the backward)
//   backward  delta = rowsum(dO * O);  P = exp(S - lse);  dV = sum over the group of P^T dO;
//             dP = dO V^T;  dS = P * (dP - delta);  dQ = scale * dS K;
//             dK = scale * sum over the group of dS^T Q
//
// Algorithm: FlashAttention-2. The T x T matrix is never formed.
//  - attention_fwd_kernel: one CTA per (64-row query block, b*h); 4 warps each own 16 query
//    rows. K/V tiles of 64 keys stream through a cp.async double buffer; S, the online-softmax
//    state (row max m and row sum l, in log2 units: exp2f with scale * log2(e) folded in) and
//    the O accumulator stay in registers. Key blocks past the diagonal are skipped; only the
//    diagonal block is masked.
//  - attention_bwd_delta_kernel: delta = rowsum(dO * O), one warp per row, into an fp32 buffer.
//  - attention_bwd_dkdv_kernel: one CTA per (64-key block, b * K/V head), loading its K, V tile
//    into shared memory once; warp w owns keys 16w..16w+15 and loops over the group's query
//    heads in order and, for each, over the query blocks from the diagonal to T (one pipelined
//    sequence of (head, block) steps), recomputing S^T = K Q^T and P^T = exp2(S^T - lse) and
//    accumulating dV += P^T dO and dK += dS^T Q in registers: the group's sum in a fixed
//    order, no atomics. The forward and dQ CTAs of query head h read K/V head h / group (the
//    group's CTAs of one query block are neighbours in the grid: their K/V come from L2).
//  - attention_bwd_dq_kernel: one CTA per 64-row query block, looping over key blocks up to the
//    diagonal: dQ += dS K. Each output element has exactly one writer, so the backward uses no
//    atomics and is bit-for-bit deterministic (FA2's atomicAdd dQ is not).
//
// Dropout of P (DROPOUT, csrc/dropout.h): the forward multiplies each P fragment element by its
// factor after the softmax's sums (O = Pd V, l over the undropped P); the dK/dV kernel forms
// dS^T = P^T * (dP^T * factor - delta) and then Pd^T = P^T * factor for dV += Pd^T dO; the dQ
// kernel dS = P * (dP * factor - delta). Factors are regenerated from (seed, offset, element
// ((b * nh + h) * T + query) * T + key) by each thread for its own fragment elements, one
// Philox call per element (its 4 words serve one element: fragment pairs are not 4-aligned).
// DROPOUT = false instantiations are the kernels without dropout.
//
// Tensor cores: mma.sync m16n8k16 (bf16/fp16 inputs, fp32 accumulators) through inline PTX.
// Fragments come from shared memory with ldmatrix.x4; .trans where the B operand is stored
// k-major (V in P V; dO, Q, K in P^T dO, dS^T Q, dS K). Shared-memory tiles are (rows, hs)
// with a XOR swizzle of 16-byte chunks (chunk ^= row % 8), so the 8 row addresses of each
// ldmatrix phase and of each cp.async wave hit 8 different bank groups: conflict-free without
// padding.
//
// Layouts accepted: q, o, dO, dq are (B, T, nh, hs) and k, v, dk, dv (B, T, nkv, hs), with unit
// stride on hs and any batch / sequence / head strides (multiples of 8 elements, 16-byte aligned
// base): the views q, k, v = qkv.view(B, T, nh + 2 * nkv, hs).split(...) of the fused projection
// are read in place, and dq, dk, dv may be the matching views of one dqkv buffer. lse and delta are (B, nh, T) fp32.
// Head dims 64 and 128; any T (partial blocks zero-filled on load, masked, guarded on store);
// B * nh < 2^31, T < 65536 * 64.
//
// Cost (causal, D = hs): forward FLOPs 4 * B * nh * T^2 * D / 2 (two matmuls over the lower
// triangle); backward 2.5x that (five matmuls; S is recomputed in both backward kernels, so the
// executed count is 3x the forward). Bytes: forward reads Q once and K, V once per query block
// (from L2 after the first), writes O and lse: about 2 * B*T*nh*D * 4 + 4 * B*nh*T bytes from
// HBM at 2-byte types. Backward reads Q, K, V, O, dO, lse, delta and writes dQ, dK, dV: about
// 2 * B*T*nh*D * 8 bytes. At T >= 512 it is compute-bound.
#include <array>
#include <cmath>
#include <cstdint>
#include <string>

#include "attention.h"
#include "cuda_common.h"
#include "dropout.h"

namespace nanolm {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr float kLn2 = 0.6931471805599453f;

// Tile sizes per head dim. The backward kernels hold two fp32 (16, hs) accumulators per warp;
// at hs = 128 that is 128 registers, so their inner tile shrinks to 32 to stay under 255.
template <int HS>
struct Tiles {
    static constexpr int kFwdQ = 64, kFwdK = 64;                  // forward: query rows, keys
    static constexpr int kKvK = 64, kKvQ = HS == 128 ? 32 : 64;   // dK/dV kernel
    static constexpr int kDqQ = 64, kDqK = HS == 128 ? 32 : 64;   // dQ kernel
};

// One (B, T, nh, hs) operand: element (b, t, h, d) is ptr[b * sb + t * st + h * sh + d].
template <typename T>
struct View {
    T* ptr;
    int64_t sb, st, sh;
    __device__ T* head(int b, int h) const { return ptr + b * sb + h * sh; }
};

template <typename T>
struct FwdParams {
    View<const T> q, k, v;
    View<T> o;
    float* lse;  // (B, nh, T)
    int nh, group, seq_len;  // group: query heads per K/V head; seq_len = T
    float scale_log2;  // softmax scale * log2(e)
    DropoutParams dropout;  // of P, read by the DROPOUT instantiation
};

template <typename T>
struct BwdParams {
    View<const T> q, k, v, o, dout;
    View<T> dq, dk, dv;
    const float* lse;  // (B, nh, T)
    float* delta;      // (B, nh, T), written by the delta kernel
    int nh, group, seq_len;  // group: query heads per K/V head; seq_len = T
    float scale, scale_log2;
    DropoutParams dropout;  // the forward's, read by the DROPOUT instantiations
};

// The dropout factor of P[bh, query, key] (element ((bh * T + query) * T + key)).
__device__ __forceinline__ float p_factor(const DropoutParams& d, int bh, int seq_len, int query, int key) {
    const int64_t index = (static_cast<int64_t>(bh) * seq_len + query) * seq_len + key;
    return dropout_factor(d, static_cast<uint64_t>(index));
}

// ----------------------------------------------------------------------------- PTX helpers
// Each helper has a host twin in csrc/sim/ (the NANOLM_CUDA_SIM build) that follows the same
// PTX ISA semantics on an emulated warp: cp.async lands at its wait_group, ldmatrix and mma
// trade fragments between the 32 lanes exactly as the layouts below say.

#ifndef NANOLM_CUDA_SIM
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
#endif

// 16-byte global -> shared copy; src_bytes = 0 zero-fills (rows past T).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
#ifdef NANOLM_CUDA_SIM
    sim::cp_async(dst, src, 16, valid);
#else
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                 ::"r"(smem_u32(dst)), "l"(src), "r"(valid ? 16 : 0));
#endif
}

__device__ __forceinline__ void cp_async4(void* dst, const void* src, bool valid) {
#ifdef NANOLM_CUDA_SIM
    sim::cp_async(dst, src, 4, valid);
#else
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n"
                 ::"r"(smem_u32(dst)), "l"(src), "r"(valid ? 4 : 0));
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#ifdef NANOLM_CUDA_SIM
    sim::cp_async_commit();
#else
    asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Wait until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#ifdef NANOLM_CUDA_SIM
    sim::cp_async_wait(N);
#else
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
#ifdef NANOLM_CUDA_SIM
    sim::ldmatrix_x4(r, p, /*trans=*/false);
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_u32(p)));
#endif
}

__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const void* p) {
#ifdef NANOLM_CUDA_SIM
    sim::ldmatrix_x4(r, p, /*trans=*/true);
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_u32(p)));
#endif
}

// c (16x8, fp32) += a (16x16, row-major) * b (16x8, col-major). Fragments, with g = lane / 4,
// q = lane % 4: a = {(g, 2q..), (g+8, 2q..), (g, 2q+8..), (g+8, 2q+8..)} as element pairs;
// b = {(k = 2q.., n = g), (k = 2q+8.., n = g)}; c = {(g, 2q), (g, 2q+1), (g+8, 2q), (g+8, 2q+1)}.
template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4],
                                                        uint32_t b0, uint32_t b1) {
#ifdef NANOLM_CUDA_SIM
    sim::mma_m16n8k16(c, a, b0, b1, /*bf16=*/true);
#else
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

template <>
__device__ __forceinline__ void mma16816<__half>(float (&c)[4], const uint32_t (&a)[4],
                                                 uint32_t b0, uint32_t b1) {
#ifdef NANOLM_CUDA_SIM
    sim::mma_m16n8k16(c, a, b0, b1, /*bf16=*/false);
#else
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// Two floats -> one register of two 16-bit values, the first in the low half.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);

template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}

template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}

__device__ __forceinline__ float2 to_float2(const __nv_bfloat16* p) {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p));
}

__device__ __forceinline__ float2 to_float2(const __half* p) {
    return __half22float2(*reinterpret_cast<const __half2*>(p));
}

// ----------------------------------------------------------------------------- tiles

// Offset of element (row, col) in a swizzled (rows, HS) shared tile; col is a multiple of 8
// wherever a 16-byte chunk is addressed.
template <int HS>
__device__ __forceinline__ int swz(int row, int col) {
    return row * HS + ((((col >> 3) ^ (row & 7))) << 3) + (col & 7);
}

// cp.async the rows [row0, row0 + ROWS) of one head into a swizzled tile; rows >= T are zeros.
template <int ROWS, int HS, typename T>
__device__ __forceinline__ void load_tile(T* tile, const T* head, int64_t row_stride, int row0, int T_len) {
    constexpr int kChunks = HS / 8;
    for (int i = threadIdx.x; i < ROWS * kChunks; i += kThreads) {
        const int r = i / kChunks, col = (i % kChunks) * 8;
        const bool valid = row0 + r < T_len;
        const T* src = head + (valid ? (row0 + r) * row_stride : 0) + col;
        cp_async16(tile + swz<HS>(r, col), src, valid);
    }
}

// A fragment (16 rows starting at row0, k columns k0..k0+15) of a row-major tile.
template <int HS, typename T>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const T* tile, int row0, int k0) {
    const int lane = threadIdx.x % 32;
    ldsm_x4(a, tile + swz<HS>(row0 + lane % 16, k0 + (lane / 16) * 8));
}

// B fragments of two n-tiles (rows n0..n0+15 of the tile are n, columns k0..k0+15 are k):
// b[0..1] for n0..n0+7, b[2..3] for n0+8..n0+15. Used for K in Q K^T, V in dO V^T, Q in K Q^T.
template <int HS, typename T>
__device__ __forceinline__ void load_b_nk(uint32_t (&b)[4], const T* tile, int n0, int k0) {
    const int lane = threadIdx.x % 32;
    ldsm_x4(b, tile + swz<HS>(n0 + lane % 8 + (lane / 16) * 8, k0 + ((lane / 8) % 2) * 8));
}

// B fragments of two n-tiles from a k-major tile (rows k0..k0+15 are k, columns n0..n0+15 are
// n), transposed by ldmatrix: b[0..1] for n0..n0+7, b[2..3] for n0+8..n0+15. Used for V in
// P V, dO / Q in P^T dO / dS^T Q, K in dS K.
template <int HS, typename T>
__device__ __forceinline__ void load_b_kn(uint32_t (&b)[4], const T* tile, int k0, int n0) {
    const int lane = threadIdx.x % 32;
    ldsm_x4_trans(b, tile + swz<HS>(k0 + lane % 8 + ((lane / 8) % 2) * 8, n0 + (lane / 16) * 8));
}

// acc (16 x N) += A (16 rows of a_tile from a_row0) * B^T where B is N rows of b_tile: the
// product of two row-major tiles along hs (Q K^T, dO V^T, K Q^T, V dO^T).
template <int HS, int N, typename T>
__device__ __forceinline__ void mma_rows_by_rows(float (&acc)[N / 8][4], const T* a_tile, int a_row0,
                                                 const T* b_tile) {
#pragma unroll
    for (int k0 = 0; k0 < HS; k0 += 16) {
        uint32_t a[4];
        load_a<HS>(a, a_tile, a_row0, k0);
#pragma unroll
        for (int n = 0; n < N / 8; n += 2) {
            uint32_t b[4];
            load_b_nk<HS>(b, b_tile, n * 8, k0);
            mma16816<T>(acc[n], a, b[0], b[1]);
            mma16816<T>(acc[n + 1], a, b[2], b[3]);
        }
    }
}

// acc (16 x HS) += X (16 x K, fp32 C fragments, rounded to T here) * tile (K rows x HS):
// P V, P^T dO, dS^T Q, dS K. A C fragment pair (n-tiles 2j, 2j+1) is exactly the A fragment of
// k-step j, so X never leaves registers.
template <int HS, int K, typename T>
__device__ __forceinline__ void mma_frags_by_tile(float (&acc)[HS / 8][4], const float (&x)[K / 8][4],
                                                  const T* tile) {
#pragma unroll
    for (int j = 0; j < K / 16; ++j) {
        const uint32_t a[4] = {pack2<T>(x[2 * j][0], x[2 * j][1]), pack2<T>(x[2 * j][2], x[2 * j][3]),
                               pack2<T>(x[2 * j + 1][0], x[2 * j + 1][1]),
                               pack2<T>(x[2 * j + 1][2], x[2 * j + 1][3])};
#pragma unroll
        for (int n = 0; n < HS / 8; n += 2) {
            uint32_t b[4];
            load_b_kn<HS>(b, tile, j * 16, n * 8);
            mma16816<T>(acc[n], a, b[0], b[1]);
            mma16816<T>(acc[n + 1], a, b[2], b[3]);
        }
    }
}

// Store a warp's (16, HS) fp32 accumulator, times `scale`, to rows row0.. of a strided head.
template <int HS, typename T>
__device__ __forceinline__ void store_rows(T* head, int64_t row_stride, int row0, int T_len,
                                           const float (&acc)[HS / 8][4], const float (&scale)[2]) {
    const int lane = threadIdx.x % 32, g = lane / 4, q = lane % 4;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = row0 + g + 8 * r;
        if (row >= T_len) continue;
        T* dst = head + row * row_stride + 2 * q;
#pragma unroll
        for (int n = 0; n < HS / 8; ++n)
            *reinterpret_cast<uint32_t*>(dst + 8 * n) =
                pack2<T>(acc[n][2 * r] * scale[r], acc[n][2 * r + 1] * scale[r]);
    }
}

// The four lanes of a quad hold one accumulator row (mma fragment layout): reduce among them.
__device__ __forceinline__ float quad_max(float x) { return warp_reduce<4>(x, Max{}); }
__device__ __forceinline__ float quad_sum(float x) { return warp_reduce<4>(x, Sum{}); }

// ----------------------------------------------------------------------------- forward

// Online softmax of one S tile (16 x BN per warp, already scaled to log2 units and masked):
// updates m, l, rescales O and turns s into P in place.
template <int HS, int BN>
__device__ __forceinline__ void online_softmax(float (&s)[BN / 8][4], float (&m)[2], float (&l)[2],
                                               float (&o)[HS / 8][4]) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float mx = -INFINITY;
#pragma unroll
        for (int n = 0; n < BN / 8; ++n) mx = fmaxf(mx, fmaxf(s[n][2 * r], s[n][2 * r + 1]));
        // Finite: every processed key block holds key k0 <= the warp's first query.
        const float m_new = fmaxf(m[r], quad_max(mx));
        const float alpha = exp2f(m[r] - m_new);  // 0 on the first block (m = -inf)
        m[r] = m_new;
        float sum = 0.f;
#pragma unroll
        for (int n = 0; n < BN / 8; ++n) {
            s[n][2 * r] = exp2f(s[n][2 * r] - m_new);
            s[n][2 * r + 1] = exp2f(s[n][2 * r + 1] - m_new);
            sum += s[n][2 * r] + s[n][2 * r + 1];
        }
        l[r] = l[r] * alpha + sum;  // per-thread partial sum; the quad is summed at the end
#pragma unroll
        for (int n = 0; n < HS / 8; ++n) {
            o[n][2 * r] *= alpha;
            o[n][2 * r + 1] *= alpha;
        }
    }
}

template <typename T, int HS, bool DROPOUT>
__global__ void __launch_bounds__(kThreads) attention_fwd_kernel(const FwdParams<T> p) {
    constexpr int BM = Tiles<HS>::kFwdQ, BN = Tiles<HS>::kFwdK;
    static_assert(BM == kWarps * 16 && BM == BN, "one 16-row slab per warp; diagonal = one key block");
    NANOLM_DYNAMIC_SMEM(smem);
    T* sQ = reinterpret_cast<T*>(smem);  // (BM, HS)
    T* sK = sQ + BM * HS;                 // 2 x (BN, HS)
    T* sV = sK + 2 * BN * HS;             // 2 x (BN, HS)

    const int bh = blockIdx.x, b = bh / p.nh, h = bh % p.nh;
    const int qb = gridDim.y - 1 - blockIdx.y;  // longest rows (most key blocks) start first
    const int q0 = qb * BM, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const T* q = p.q.head(b, h);
    const T* k = p.k.head(b, h / p.group);
    const T* v = p.v.head(b, h / p.group);

    load_tile<BM, HS>(sQ, q, p.q.st, q0, p.seq_len);
    load_tile<BN, HS>(sK, k, p.k.st, 0, p.seq_len);
    load_tile<BN, HS>(sV, v, p.v.st, 0, p.seq_len);
    cp_async_commit();

    float o[HS / 8][4] = {};
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
    const int row0 = q0 + warp * 16 + lane / 4;  // this thread's rows: row0 and row0 + 8
    const int n_kblocks = qb + 1;
    for (int kb = 0; kb < n_kblocks; ++kb) {
        const int buf = kb & 1;
        if (kb + 1 < n_kblocks) {  // prefetch the next K/V tile into the buffer freed last iteration
            load_tile<BN, HS>(sK + (buf ^ 1) * BN * HS, k, p.k.st, (kb + 1) * BN, p.seq_len);
            load_tile<BN, HS>(sV + (buf ^ 1) * BN * HS, v, p.v.st, (kb + 1) * BN, p.seq_len);
        }
        cp_async_commit();  // possibly empty, so that wait<1> always means "tile kb has landed"
        cp_async_wait<1>();
        __syncthreads();

        // 1. S = Q K^T, to log2 units; mask keys > query on the diagonal block (also covers keys >= T)
        float s[BN / 8][4] = {};
        mma_rows_by_rows<HS, BN>(s, sQ, warp * 16, sK + buf * BN * HS);
        const bool diagonal = kb == qb;
#pragma unroll
        for (int n = 0; n < BN / 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = kb * BN + n * 8 + 2 * (lane % 4) + (e & 1);
                const bool future = diagonal && key > row0 + 8 * (e >> 1);
                s[n][e] = future ? -INFINITY : s[n][e] * p.scale_log2;
            }
        // 2. online softmax; 3. O += P V
        online_softmax<HS, BN>(s, m, l, o);
        if constexpr (DROPOUT) {  // after the sums went into l: P -> Pd
#pragma unroll
            for (int n = 0; n < BN / 8; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    s[n][e] *= p_factor(p.dropout, bh, p.seq_len, row0 + 8 * (e >> 1),
                                        kb * BN + n * 8 + 2 * (lane % 4) + (e & 1));
        }
        mma_frags_by_tile<HS, BN>(o, s, sV + buf * BN * HS);
        __syncthreads();  // every warp is done with `buf` before it is refilled
    }

    float inv_l[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        l[r] = quad_sum(l[r]);
        inv_l[r] = 1.f / l[r];  // l >= 1: the row max contributes exp2(0)
        const int row = row0 + 8 * r;
        if (lane % 4 == 0 && row < p.seq_len)
            p.lse[static_cast<int64_t>(bh) * p.seq_len + row] = (m[r] + log2f(l[r])) * kLn2;
    }
    store_rows<HS>(p.o.head(b, h), p.o.st, q0 + warp * 16, p.seq_len, o, inv_l);
}

// ----------------------------------------------------------------------------- backward

// delta[b, h, t] = sum_d dO[b, t, h, d] * O[b, t, h, d]; one warp per row (b, h, t).
template <typename T, int HS>
__global__ void __launch_bounds__(kThreads) attention_bwd_delta_kernel(const BwdParams<T> p, int64_t n_rows) {
    const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
    if (row >= n_rows) return;
    const int t = static_cast<int>(row % p.seq_len);
    const int bh = static_cast<int>(row / p.seq_len), b = bh / p.nh, h = bh % p.nh;
    const T* o = p.o.head(b, h) + t * p.o.st;
    const T* dout = p.dout.head(b, h) + t * p.dout.st;
    float acc = 0.f;
    for (int d = 2 * (threadIdx.x % 32); d < HS; d += 64) {
        const float2 x = to_float2(o + d), y = to_float2(dout + d);
        acc += x.x * y.x + x.y * y.y;
    }
#pragma unroll
    for (int off = 16; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (threadIdx.x % 32 == 0) p.delta[row] = acc;  // row = bh * T + t: the (B, nh, T) layout
}

// lse and delta of query rows [q0, q0 + BQ) into shared memory; rows >= T read as 0.
template <int BQ>
__device__ __forceinline__ void load_row_stats(float* s_lse, float* s_delta, const float* lse,
                                               const float* delta, int q0, int T_len) {
    static_assert(2 * BQ <= kThreads, "one thread per value");
    const int i = threadIdx.x % BQ, t = q0 + i;
    const bool valid = t < T_len;
    if (threadIdx.x < BQ) cp_async4(s_lse + i, lse + (valid ? t : 0), valid);
    else if (threadIdx.x < 2 * BQ) cp_async4(s_delta + i, delta + (valid ? t : 0), valid);
}

// One CTA per (key block, b * K/V head): dK, dV of keys [k0, k0 + BKV), summed over the group's
// query heads; warp w owns keys k0 + 16w .. + 15.
template <typename T, int HS, bool DROPOUT>
__global__ void __launch_bounds__(kThreads) attention_bwd_dkdv_kernel(const BwdParams<T> p) {
    constexpr int BKV = Tiles<HS>::kKvK, BQ = Tiles<HS>::kKvQ;
    static_assert(BKV == kWarps * 16 && BKV % BQ == 0, "one 16-key slab per warp");
    NANOLM_DYNAMIC_SMEM(smem);
    T* sK = reinterpret_cast<T*>(smem);  // (BKV, HS)
    T* sV = sK + BKV * HS;                // (BKV, HS)
    T* sQ = sV + BKV * HS;                // 2 x (BQ, HS)
    T* sdO = sQ + 2 * BQ * HS;            // 2 x (BQ, HS)
    float* sLse = reinterpret_cast<float*>(sdO + 2 * BQ * HS);  // 2 x BQ
    float* sDelta = sLse + 2 * BQ;                               // 2 x BQ

    const int nkv = p.nh / p.group, b = blockIdx.x / nkv, hk = blockIdx.x % nkv;
    const int k0 = blockIdx.y * BKV, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    load_tile<BKV, HS>(sK, p.k.head(b, hk), p.k.st, k0, p.seq_len);
    load_tile<BKV, HS>(sV, p.v.head(b, hk), p.v.st, k0, p.seq_len);

    // Steps: (query head hk * group + i / per_head, query block qb_first + i % per_head), i < n_steps
    const int qb_first = k0 / BQ, per_head = (p.seq_len + BQ - 1) / BQ - qb_first;  // from the diagonal down
    const int n_steps = p.group * per_head;
    auto load_step = [&](int i, int to) {  // step i's Q, dO tiles and row statistics into buffer `to`
        const int h = hk * p.group + i / per_head, q0 = (qb_first + i % per_head) * BQ;
        const int64_t rows = (static_cast<int64_t>(b) * p.nh + h) * p.seq_len;
        load_tile<BQ, HS>(sQ + to * BQ * HS, p.q.head(b, h), p.q.st, q0, p.seq_len);
        load_tile<BQ, HS>(sdO + to * BQ * HS, p.dout.head(b, h), p.dout.st, q0, p.seq_len);
        load_row_stats<BQ>(sLse + to * BQ, sDelta + to * BQ, p.lse + rows, p.delta + rows, q0, p.seq_len);
    };
    load_step(0, 0);
    cp_async_commit();

    float dk[HS / 8][4] = {}, dv[HS / 8][4] = {};
    const int key0 = k0 + warp * 16 + lane / 4;  // this thread's keys: key0 and key0 + 8
    for (int it = 0; it < n_steps; ++it) {
        const int buf = it & 1, nxt = buf ^ 1, q0 = (qb_first + it % per_head) * BQ;
        if (it + 1 < n_steps) load_step(it + 1, nxt);
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        const T* tQ = sQ + buf * BQ * HS;
        const T* tdO = sdO + buf * BQ * HS;
        const float* tLse = sLse + buf * BQ;
        const float* tDelta = sDelta + buf * BQ;

        // 1. S^T = K Q^T;  2. P^T = exp2(S^T * scale * log2e - lse * log2e), masking
        //    keys > query (diagonal blocks) and queries >= T (the last block)
        float pt[BQ / 8][4] = {};
        mma_rows_by_rows<HS, BQ>(pt, sK, warp * 16, tQ);
        const bool masked = k0 + BKV - 1 > q0 || q0 + BQ > p.seq_len;
#pragma unroll
        for (int n = 0; n < BQ / 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int col = n * 8 + 2 * (lane % 4) + (e & 1), query = q0 + col;
                const bool drop = masked && (key0 + 8 * (e >> 1) > query || query >= p.seq_len);
                pt[n][e] = drop ? 0.f : exp2f(pt[n][e] * p.scale_log2 - tLse[col] * kLog2e);
            }
        if constexpr (DROPOUT) {
            // 3. dP^T = V dO^T;  4. dS^T = P^T * (dP^T * factor - delta), then P^T -> Pd^T
            const int bh = b * p.nh + hk * p.group + it / per_head;  // the step's query head, as (b, h)
            float dst[BQ / 8][4] = {};
            mma_rows_by_rows<HS, BQ>(dst, sV, warp * 16, tdO);
#pragma unroll
            for (int n = 0; n < BQ / 8; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int col = n * 8 + 2 * (lane % 4) + (e & 1);
                    const float f = p_factor(p.dropout, bh, p.seq_len, q0 + col, key0 + 8 * (e >> 1));
                    dst[n][e] = pt[n][e] * (dst[n][e] * f - tDelta[col]);
                    pt[n][e] *= f;
                }
            // 5. dV += Pd^T dO;  6. dK += dS^T Q (scaled at the end)
            mma_frags_by_tile<HS, BQ>(dv, pt, tdO);
            mma_frags_by_tile<HS, BQ>(dk, dst, tQ);
        } else {
            // 3. dV += P^T dO
            mma_frags_by_tile<HS, BQ>(dv, pt, tdO);
            // 4. dP^T = V dO^T;  5. dS^T = P^T * (dP^T - delta)
            float dst[BQ / 8][4] = {};
            mma_rows_by_rows<HS, BQ>(dst, sV, warp * 16, tdO);
#pragma unroll
            for (int n = 0; n < BQ / 8; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    dst[n][e] = pt[n][e] * (dst[n][e] - tDelta[n * 8 + 2 * (lane % 4) + (e & 1)]);
            // 6. dK += dS^T Q (scaled at the end)
            mma_frags_by_tile<HS, BQ>(dk, dst, tQ);
        }
        __syncthreads();  // every warp is done with `buf` before it is refilled
    }

    const float one[2] = {1.f, 1.f}, scale[2] = {p.scale, p.scale};
    store_rows<HS>(p.dk.head(b, hk), p.dk.st, k0 + warp * 16, p.seq_len, dk, scale);
    store_rows<HS>(p.dv.head(b, hk), p.dv.st, k0 + warp * 16, p.seq_len, dv, one);
}

// One CTA per query block: dQ of rows [q0, q0 + BQ); warp w owns rows q0 + 16w .. + 15.
template <typename T, int HS, bool DROPOUT>
__global__ void __launch_bounds__(kThreads) attention_bwd_dq_kernel(const BwdParams<T> p) {
    constexpr int BQ = Tiles<HS>::kDqQ, BK = Tiles<HS>::kDqK;
    static_assert(BQ == kWarps * 16 && BQ % BK == 0, "one 16-row slab per warp");
    NANOLM_DYNAMIC_SMEM(smem);
    T* sQ = reinterpret_cast<T*>(smem);  // (BQ, HS)
    T* sdO = sQ + BQ * HS;                // (BQ, HS)
    T* sK = sdO + BQ * HS;                // 2 x (BK, HS)
    T* sV = sK + 2 * BK * HS;             // 2 x (BK, HS)

    const int bh = blockIdx.x, b = bh / p.nh, h = bh % p.nh;
    const int qb = gridDim.y - 1 - blockIdx.y;  // longest rows first
    const int q0 = qb * BQ, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const T* k = p.k.head(b, h / p.group);
    const T* v = p.v.head(b, h / p.group);

    load_tile<BQ, HS>(sQ, p.q.head(b, h), p.q.st, q0, p.seq_len);
    load_tile<BQ, HS>(sdO, p.dout.head(b, h), p.dout.st, q0, p.seq_len);
    load_tile<BK, HS>(sK, k, p.k.st, 0, p.seq_len);
    load_tile<BK, HS>(sV, v, p.v.st, 0, p.seq_len);
    cp_async_commit();

    const int row0 = q0 + warp * 16 + lane / 4;  // this thread's rows: row0 and row0 + 8
    float lse2[2], delta[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = row0 + 8 * r;
        const int64_t i = static_cast<int64_t>(bh) * p.seq_len + row;
        lse2[r] = row < p.seq_len ? p.lse[i] * kLog2e : 0.f;
        delta[r] = row < p.seq_len ? p.delta[i] : 0.f;
    }

    float dq[HS / 8][4] = {};
    const int n_kblocks = (min(q0 + BQ, p.seq_len) + BK - 1) / BK;
    for (int kb = 0; kb < n_kblocks; ++kb) {
        const int buf = kb & 1, k0 = kb * BK;
        if (kb + 1 < n_kblocks) {
            load_tile<BK, HS>(sK + (buf ^ 1) * BK * HS, k, p.k.st, k0 + BK, p.seq_len);
            load_tile<BK, HS>(sV + (buf ^ 1) * BK * HS, v, p.v.st, k0 + BK, p.seq_len);
        }
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        const T* tK = sK + buf * BK * HS;

        // 1. S = Q K^T;  2. P = exp2(S * scale * log2e - lse * log2e), keys > query masked
        //    (blocks reaching past q0; keys >= T are always in such a block)
        float pr[BK / 8][4] = {};
        mma_rows_by_rows<HS, BK>(pr, sQ, warp * 16, tK);
        const bool masked = k0 + BK - 1 > q0;
#pragma unroll
        for (int n = 0; n < BK / 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = k0 + n * 8 + 2 * (lane % 4) + (e & 1);
                const bool drop = masked && key > row0 + 8 * (e >> 1);
                pr[n][e] = drop ? 0.f : exp2f(pr[n][e] * p.scale_log2 - lse2[e >> 1]);
            }
        // 3. dP = dO V^T (times the forward's factors with DROPOUT);  4. dS = P * (dP - delta)
        float ds[BK / 8][4] = {};
        mma_rows_by_rows<HS, BK>(ds, sdO, warp * 16, sV + buf * BK * HS);
        if constexpr (DROPOUT) {
#pragma unroll
            for (int n = 0; n < BK / 8; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    ds[n][e] *= p_factor(p.dropout, bh, p.seq_len, row0 + 8 * (e >> 1),
                                         k0 + n * 8 + 2 * (lane % 4) + (e & 1));
        }
#pragma unroll
        for (int n = 0; n < BK / 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) ds[n][e] = pr[n][e] * (ds[n][e] - delta[e >> 1]);
        // 5. dQ += dS K (scaled at the end)
        mma_frags_by_tile<HS, BK>(dq, ds, tK);
        __syncthreads();  // every warp is done with `buf` before it is refilled
    }

    const float scale[2] = {p.scale, p.scale};
    store_rows<HS>(p.dq.head(b, h), p.dq.st, q0 + warp * 16, p.seq_len, dq, scale);
}

// ----------------------------------------------------------------------------- launchers

constexpr int kMaxGridY = 65535;

template <typename KernelT>
void set_smem(KernelT kernel, size_t bytes) {
    if (bytes > 48 * 1024)  // above 48 KB a kernel must opt in to dynamic shared memory
        NANOLM_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               static_cast<int>(bytes)));
}

int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

template <typename T>
View<T> make_view(std::uintptr_t address, const std::array<int64_t, 3>& strides) {
    return View<T>{ptr<T>(address), strides[0], strides[1], strides[2]};
}

template <typename T, int HS, bool DROPOUT>
void launch_fwd(const FwdParams<T>& p, int bnh, cudaStream_t stream) {
    using Tl = Tiles<HS>;
    const size_t smem = (Tl::kFwdQ + 4 * Tl::kFwdK) * HS * sizeof(T);
    set_smem(attention_fwd_kernel<T, HS, DROPOUT>, smem);
    NANOLM_LAUNCH(dim3(bnh, ceil_div(p.seq_len, Tl::kFwdQ)), kThreads, smem, stream,
                  attention_fwd_kernel<T, HS, DROPOUT>)(p);
    NANOLM_CHECK_LAUNCH("attention_fwd_kernel");
}

template <typename T, int HS, bool DROPOUT>
void launch_bwd(const BwdParams<T>& p, int bnh, cudaStream_t stream) {  // bnh = B * nh
    using Tl = Tiles<HS>;
    const int64_t n_rows = static_cast<int64_t>(bnh) * p.seq_len;
    NANOLM_LAUNCH(ceil_div(n_rows, kWarps), kThreads, 0, stream, attention_bwd_delta_kernel<T, HS>)(p, n_rows);
    NANOLM_CHECK_LAUNCH("attention_bwd_delta_kernel");

    const size_t kv_smem = (2 * Tl::kKvK + 4 * Tl::kKvQ) * HS * sizeof(T) + 4 * Tl::kKvQ * sizeof(float);
    set_smem(attention_bwd_dkdv_kernel<T, HS, DROPOUT>, kv_smem);
    NANOLM_LAUNCH(dim3(bnh / p.group, ceil_div(p.seq_len, Tl::kKvK)), kThreads, kv_smem, stream,
                  attention_bwd_dkdv_kernel<T, HS, DROPOUT>)(p);
    NANOLM_CHECK_LAUNCH("attention_bwd_dkdv_kernel");

    const size_t dq_smem = (2 * Tl::kDqQ + 4 * Tl::kDqK) * HS * sizeof(T);
    set_smem(attention_bwd_dq_kernel<T, HS, DROPOUT>, dq_smem);
    NANOLM_LAUNCH(dim3(bnh, ceil_div(p.seq_len, Tl::kDqQ)), kThreads, dq_smem, stream,
                  attention_bwd_dq_kernel<T, HS, DROPOUT>)(p);
    NANOLM_CHECK_LAUNCH("attention_bwd_dq_kernel");
}

// Checks shared by both launchers; returns B * nh.
int check_sizes(const char* op, int64_t B, int64_t T, int64_t nh, int64_t nkv, int64_t hs) {
    require(hs == 64 || hs == 128, std::string(op) + ": head size " + std::to_string(hs) +
                                       " is not supported (64 or 128)");
    require(nkv > 0 && nh % nkv == 0, std::string(op) + ": nkv must be positive and divide nh, got nh=" +
                                          std::to_string(nh) + " nkv=" + std::to_string(nkv));
    require(B >= 0 && nh >= 0 && T >= 0 && B * nh < (int64_t{1} << 31),
            std::string(op) + ": B * nh must be below 2^31");
    require(ceil_div(T, 64) <= kMaxGridY, std::string(op) + ": T = " + std::to_string(T) +
                                              " exceeds the grid limit of 65535 * 64");
    return static_cast<int>(B * nh);
}

template <typename T>
void fwd_typed(const FwdParams<T>& p, int bnh, int64_t hs, cudaStream_t stream) {
    const bool drop = p.dropout.enabled;
    if (hs == 64) (drop ? launch_fwd<T, 64, true> : launch_fwd<T, 64, false>)(p, bnh, stream);
    else (drop ? launch_fwd<T, 128, true> : launch_fwd<T, 128, false>)(p, bnh, stream);
}

template <typename T>
void bwd_typed(const BwdParams<T>& p, int bnh, int64_t hs, cudaStream_t stream) {
    const bool drop = p.dropout.enabled;
    if (hs == 64) (drop ? launch_bwd<T, 64, true> : launch_bwd<T, 64, false>)(p, bnh, stream);
    else (drop ? launch_bwd<T, 128, true> : launch_bwd<T, 128, false>)(p, bnh, stream);
}

template <typename T>
void fwd_dispatch(const AttentionCudaFwdArgs& a, int bnh, float scale_log2, cudaStream_t stream) {
    const FwdParams<T> p{make_view<const T>(a.q, a.q_strides), make_view<const T>(a.k, a.k_strides),
                         make_view<const T>(a.v, a.v_strides), make_view<T>(a.o, a.o_strides),
                         ptr<float>(a.lse), static_cast<int>(a.nh), static_cast<int>(a.nh / a.nkv),
                         static_cast<int>(a.T), scale_log2,
                         a.dropout};
    fwd_typed<T>(p, bnh, a.hs, stream);
}

template <typename T>
void bwd_dispatch(const AttentionCudaBwdArgs& a, int bnh, cudaStream_t stream) {
    const BwdParams<T> p{make_view<const T>(a.q, a.q_strides),   make_view<const T>(a.k, a.k_strides),
                         make_view<const T>(a.v, a.v_strides),   make_view<const T>(a.o, a.o_strides),
                         make_view<const T>(a.dout, a.dout_strides), make_view<T>(a.dq, a.dq_strides),
                         make_view<T>(a.dk, a.dk_strides),       make_view<T>(a.dv, a.dv_strides),
                         ptr<const float>(a.lse),                ptr<float>(a.delta),
                         static_cast<int>(a.nh),                 static_cast<int>(a.nh / a.nkv),
                         static_cast<int>(a.T),
                         static_cast<float>(a.scale),            static_cast<float>(a.scale * M_LOG2E),
                         a.dropout};
    bwd_typed<T>(p, bnh, a.hs, stream);
}

}  // namespace

void attention_fwd_cuda(const AttentionCudaFwdArgs& a, std::uintptr_t stream) {
    const int bnh = check_sizes("attention_fwd_cuda", a.B, a.T, a.nh, a.nkv, a.hs);
    if (bnh == 0 || a.T == 0) return;
    const float scale_log2 = static_cast<float>(a.scale * M_LOG2E);
    auto s = reinterpret_cast<cudaStream_t>(stream);
    if (a.dtype == DType::bfloat16) fwd_dispatch<__nv_bfloat16>(a, bnh, scale_log2, s);
    else if (a.dtype == DType::float16) fwd_dispatch<__half>(a, bnh, scale_log2, s);
    else unsupported_dtype("attention_fwd_cuda", a.dtype);
}

void attention_bwd_cuda(const AttentionCudaBwdArgs& a, std::uintptr_t stream) {
    const int bnh = check_sizes("attention_bwd_cuda", a.B, a.T, a.nh, a.nkv, a.hs);
    if (bnh == 0 || a.T == 0) return;
    auto s = reinterpret_cast<cudaStream_t>(stream);
    if (a.dtype == DType::bfloat16) bwd_dispatch<__nv_bfloat16>(a, bnh, s);
    else if (a.dtype == DType::float16) bwd_dispatch<__half>(a, bnh, s);
    else unsupported_dtype("attention_bwd_cuda", a.dtype);
}

}  // namespace nanolm

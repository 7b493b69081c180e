// Cross-entropy forward with its gradient, one thread block per row of logits (N, Vp).
//
// Per row with target t (columns >= V are padding, excluded from the softmax):
//   lse  = m + log(s),  m = max_j x_j,  s = sum_j exp(x_j - m)      (j < V)
//   loss = lse - x_t + z_loss * lse^2                  (0 if t == ignore_index)
//   dx_j = grad_scale * (exp(x_j - lse) * (1 + 2 z_loss lse) - [j == t])  (0 for j >= V and
//          for ignored rows)
// Algorithm: sweep 1 reads the row with 16-byte loads (scalar head up to the first 16-byte
// boundary: rows of Vp = 50257 start misaligned; scalar tail) and keeps a per-thread online
// (max, sum) in fp32, merged by warp shuffles and then across warps through shared memory;
// sweep 2 reads the row again (mostly from L2: a bf16 row is 100 KB) and writes dx once, with
// streaming (evict-first) loads and stores so they do not push other rows out of L2.
// Ignored rows skip sweep 1 and only write zeros.
// Memory traffic: reads N*Vp logits twice + N targets, writes N*Vp gradients + N losses; the
// bench counts 3 * N * Vp * elt + 12 * N bytes. ~2 exp per logit; memory-bound.
//
// The vocab-parallel pair, on one vocabulary shard (ids [vocab_start, vocab_start + Vp), the
// first V real, V = 0 allowed; specification in nanolm/ops/cross_entropy.py), from the same sweeps:
//   cross_entropy_stats_kernel  sweep 1 only: (m, s, x_t or 0) -> stats (N, 3) fp32; reads
//                               N*Vp, writes 3N floats.
//   cross_entropy_grad_kernel   sweep 2 only, in place, with the global lse given: GradOp with
//                               m = lse, log s = 0; reads and writes N*Vp.
#include <cuda_bf16.h>

#include <cfloat>
#include <cmath>
#include <cstring>

#include "cross_entropy.h"
#include "cuda_common.h"

namespace nanolm {
namespace {

constexpr int kThreads = 512;
constexpr int kUnroll = 4;             // 16-byte loads in flight per thread
constexpr float kMaxInit = -FLT_MAX;   // finite: exp(kMaxInit - kMaxInit) = 1, never NaN

template <typename T>
__device__ inline Pack16<T> load_pack(const Pack16<T>* p, bool last_use) {
    int4 raw = last_use ? __ldcs(reinterpret_cast<const int4*>(p)) : *reinterpret_cast<const int4*>(p);
    Pack16<T> out;
    memcpy(&out, &raw, sizeof(out));
    return out;
}

template <typename T>
__device__ inline void store_pack(Pack16<T>* p, const Pack16<T>& v) {
    int4 raw;
    memcpy(&raw, &v, sizeof(raw));
    __stcs(reinterpret_cast<int4*>(p), raw);
}

// A row of n elements of T starting at x: [0, head) scalar, then packs, then [tail, n) scalar.
struct RowSplit {
    std::int64_t head, packs, tail;
};

template <typename T>
__device__ inline RowSplit split_row(const T* x, std::int64_t n) {
    std::int64_t head = ((16 - (reinterpret_cast<std::uintptr_t>(x) & 15)) & 15) / sizeof(T);
    head = head < n ? head : n;
    std::int64_t packs = (n - head) / Pack16<T>::kSize;
    return {head, packs, head + packs * Pack16<T>::kSize};
}

// (max, sum of exp(x - max)); exp(d) is computed as exp2f(d * log2e) on the exact difference
// d = x - max (scaling x by log2e first would round it by 1e-3 at |x| = 1e4).
struct MaxSum {
    float m, s;
};

__device__ inline MaxSum merge(MaxSum a, MaxSum b) {
    float m = fmaxf(a.m, b.m);
    return {m, a.s * exp2f((a.m - m) * kLog2e) + b.s * exp2f((b.m - m) * kLog2e)};
}

__device__ inline MaxSum shfl_xor(MaxSum v, int offset) {  // for warp_reduce / block_reduce
    return {nanolm::shfl_xor(v.m, offset), nanolm::shfl_xor(v.s, offset)};
}

// Sweep 1: this thread's online (max, sum) over x[0, V).
template <typename T>
__device__ MaxSum row_max_sum(const T* x, std::int64_t V) {
    MaxSum acc{kMaxInit, 0.f};
    auto add = [&](float v) { acc = merge(acc, {v, 1.f}); };
    const RowSplit sp = split_row(x, V);
    for (std::int64_t j = threadIdx.x; j < sp.head; j += kThreads) add(to_float(x[j]));
    const Pack16<T>* packs = reinterpret_cast<const Pack16<T>*>(x + sp.head);
    for (std::int64_t p0 = threadIdx.x; p0 < sp.packs; p0 += kThreads * kUnroll) {
        Pack16<T> pk[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
            if (p0 + u * kThreads < sp.packs) pk[u] = load_pack(packs + p0 + u * kThreads, false);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            if (p0 + u * kThreads >= sp.packs) break;
            float pm = kMaxInit;
#pragma unroll
            for (int k = 0; k < Pack16<T>::kSize; ++k) pm = fmaxf(pm, to_float(pk[u].v[k]));
            const float m = fmaxf(acc.m, pm);
            float s = acc.s * exp2f((acc.m - m) * kLog2e);
#pragma unroll
            for (int k = 0; k < Pack16<T>::kSize; ++k) s += exp2f((to_float(pk[u].v[k]) - m) * kLog2e);
            acc = {m, s};
        }
    }
    for (std::int64_t j = sp.tail + threadIdx.x; j < V; j += kThreads) add(to_float(x[j]));
    return acc;
}

// Sweep 2: dx_j = coef * exp((x_j - m) - log s) - [j == t] * row_scale for j < V, 0 beyond.
// Not exp(x_j - lse): lse ~ 1e4 for logits of 1e4 rounds by 1e-3 in fp32.
template <typename T>
struct GradOp {
    std::int64_t V, t;
    float m, log2_s, coef, row_scale;
    __device__ inline float operator()(float x, std::int64_t j) const {
        if (j >= V) return 0.f;
        return exp2f(fmaf(x - m, kLog2e, -log2_s)) * coef - (j == t ? row_scale : 0.f);
    }
};

template <typename T>
__device__ void write_grad(const T* x, T* dx, std::int64_t Vp, GradOp<T> g, bool vec_store) {
    const RowSplit sp = split_row(x, Vp);
    for (std::int64_t j = threadIdx.x; j < sp.head; j += kThreads) dx[j] = from_float<T>(g(to_float(x[j]), j));
    const Pack16<T>* packs = reinterpret_cast<const Pack16<T>*>(x + sp.head);
    // All kUnroll loads are issued before any store: in place, the compiler could not hoist a
    // load above a store that may alias it. Each element is read and written by one thread only.
    for (std::int64_t p0 = threadIdx.x; p0 < sp.packs; p0 += kThreads * kUnroll) {
        Pack16<T> pk[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
            if (p0 + u * kThreads < sp.packs) pk[u] = load_pack(packs + p0 + u * kThreads, true);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            if (p0 + u * kThreads >= sp.packs) break;
            const std::int64_t j0 = sp.head + (p0 + u * kThreads) * Pack16<T>::kSize;
#pragma unroll
            for (int k = 0; k < Pack16<T>::kSize; ++k) pk[u].v[k] = from_float<T>(g(to_float(pk[u].v[k]), j0 + k));
            if (vec_store) {
                store_pack(reinterpret_cast<Pack16<T>*>(dx + j0), pk[u]);
            } else {
#pragma unroll
                for (int k = 0; k < Pack16<T>::kSize; ++k) dx[j0 + k] = pk[u].v[k];
            }
        }
    }
    for (std::int64_t j = sp.tail + threadIdx.x; j < Vp; j += kThreads) dx[j] = from_float<T>(g(to_float(x[j]), j));
}

template <typename T>
__global__ void __launch_bounds__(kThreads) cross_entropy_fwd_kernel(
    const T* logits,               // (N, Vp)
    const std::int64_t* targets,   // (N,)
    float* losses,                 // (N,)
    T* dlogits,                    // (N, Vp), may alias logits
    std::int64_t N, std::int64_t Vp, std::int64_t V, std::int64_t ignore_index,
    float z_loss, float grad_scale,
    bool vec_store) {              // dlogits rows share logits' 16-byte alignment
    const std::int64_t row = blockIdx.x;
    if (row >= N) return;
    const T* x = logits + row * Vp;  // int64: N * Vp exceeds 2^31 past 42k rows of 50304
    T* dx = dlogits + row * Vp;
    const std::int64_t t = targets[row];
    const bool valid = t != ignore_index;
    if (!valid) {  // block-uniform: no softmax needed, the row's gradient is zero
        if (threadIdx.x == 0) losses[row] = 0.f;
        write_grad(x, dx, Vp, GradOp<T>{0, -1, 0.f, 0.f, 0.f, 0.f}, vec_store);
        return;
    }
    const std::int64_t t_safe = t < 0 ? 0 : (t >= V ? V - 1 : t);  // never address outside the row
    const float x_t = to_float(x[t_safe]);  // read before sweep 2 may overwrite it (the reduce syncs)
    const MaxSum total = block_reduce<kThreads>(row_max_sum(x, V), [](MaxSum a, MaxSum b) { return merge(a, b); },
                                                 MaxSum{kMaxInit, 0.f});
    const float log2_s = log2f(total.s);
    const float log_s = log2_s / kLog2e, lse = total.m + log_s;
    if (threadIdx.x == 0) losses[row] = (total.m - x_t) + log_s + z_loss * lse * lse;
    write_grad(x, dx, Vp,
               GradOp<T>{V, t_safe, total.m, log2_s, grad_scale * (1.f + 2.f * z_loss * lse), grad_scale},
               vec_store);
}

template <typename T>
void launch(std::uintptr_t logits, std::uintptr_t targets, std::uintptr_t losses, std::uintptr_t dlogits,
            std::int64_t N, std::int64_t Vp, std::int64_t V, std::int64_t ignore_index, double z_loss,
            double grad_scale, cudaStream_t stream) {
    const bool vec_store = (logits - dlogits) % 16 == 0;
    NANOLM_LAUNCH(static_cast<unsigned>(N), kThreads, 0, stream, cross_entropy_fwd_kernel<T>)(
        ptr<const T>(logits), ptr<const std::int64_t>(targets), ptr<float>(losses), ptr<T>(dlogits), N, Vp,
        V, ignore_index, static_cast<float>(z_loss), static_cast<float>(grad_scale), vec_store);
    NANOLM_CHECK_LAUNCH("cross_entropy_fwd_kernel");
}

template <typename T>
__global__ void __launch_bounds__(kThreads) cross_entropy_stats_kernel(
    const T* logits,               // (N, Vp): one vocabulary shard
    const std::int64_t* targets,   // (N,) global ids
    float* stats,                  // (N, 3): max, sum exp(x - max), target logit or 0
    std::int64_t N, std::int64_t Vp, std::int64_t V, std::int64_t vocab_start) {
    const std::int64_t row = blockIdx.x;
    if (row >= N) return;
    const T* x = logits + row * Vp;
    const MaxSum total = block_reduce<kThreads>(row_max_sum(x, V), [](MaxSum a, MaxSum b) { return merge(a, b); },
                                                 MaxSum{kMaxInit, 0.f});  // V = 0: (kMaxInit, 0)
    if (threadIdx.x == 0) {
        const std::int64_t local = targets[row] - vocab_start;
        stats[3 * row] = V > 0 ? total.m : -INFINITY;
        stats[3 * row + 1] = total.s;
        stats[3 * row + 2] = (local >= 0 && local < V) ? to_float(x[local]) : 0.f;
    }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) cross_entropy_grad_kernel(
    T* logits,                     // (N, Vp): one vocabulary shard, overwritten by its gradient
    const std::int64_t* targets,   // (N,)
    const float* lse,              // (N,) over the whole vocabulary
    std::int64_t N, std::int64_t Vp, std::int64_t V, std::int64_t vocab_start, std::int64_t ignore_index,
    float z_loss, float grad_scale) {
    const std::int64_t row = blockIdx.x;
    if (row >= N) return;
    T* x = logits + row * Vp;
    const std::int64_t t = targets[row];
    if (t == ignore_index) {
        write_grad(x, x, Vp, GradOp<T>{0, -1, 0.f, 0.f, 0.f, 0.f}, true);
        return;
    }
    const std::int64_t local = t - vocab_start;
    const std::int64_t t_local = (local >= 0 && local < V) ? local : -1;  // -1: another shard's
    const float l = lse[row];
    write_grad(x, x, Vp, GradOp<T>{V, t_local, l, 0.f, grad_scale * (1.f + 2.f * z_loss * l), grad_scale}, true);
}

template <typename T>
void launch_stats(std::uintptr_t logits, std::uintptr_t targets, std::uintptr_t stats, std::int64_t N,
                  std::int64_t Vp, std::int64_t V, std::int64_t vocab_start, cudaStream_t stream) {
    NANOLM_LAUNCH(static_cast<unsigned>(N), kThreads, 0, stream, cross_entropy_stats_kernel<T>)(
        ptr<const T>(logits), ptr<const std::int64_t>(targets), ptr<float>(stats), N, Vp, V, vocab_start);
    NANOLM_CHECK_LAUNCH("cross_entropy_stats_kernel");
}

template <typename T>
void launch_grad(std::uintptr_t logits, std::uintptr_t targets, std::uintptr_t lse, std::int64_t N,
                 std::int64_t Vp, std::int64_t V, std::int64_t vocab_start, std::int64_t ignore_index,
                 double z_loss, double grad_scale, cudaStream_t stream) {
    NANOLM_LAUNCH(static_cast<unsigned>(N), kThreads, 0, stream, cross_entropy_grad_kernel<T>)(
        ptr<T>(logits), ptr<const std::int64_t>(targets), ptr<const float>(lse), N, Vp, V, vocab_start,
        ignore_index, static_cast<float>(z_loss), static_cast<float>(grad_scale));
    NANOLM_CHECK_LAUNCH("cross_entropy_grad_kernel");
}

}  // namespace

namespace {

// Checks the row count and vocabulary shape shared by the three entry points, then calls
// f(float{}) or f(__nv_bfloat16{}) for the logits' dtype on the caller's stream.
template <typename F>
void checked_dispatch(const char* op, std::int64_t N, std::int64_t Vp, std::int64_t V, std::int64_t min_V,
                      DType dtype, F&& f) {
    require(N >= 0 && N < (std::int64_t{1} << 31), std::string(op) + ": N out of range");
    require(V >= min_V && V <= Vp, std::string(op) + ": need " + std::to_string(min_V) + " <= V <= Vp");
    if (N == 0) return;
    if (dtype == DType::float32)
        f(float{});
    else if (dtype == DType::bfloat16)
        f(__nv_bfloat16{});
    else
        unsupported_dtype(op, dtype);
}

}  // namespace

void cross_entropy_stats_cuda(std::uintptr_t logits, std::uintptr_t targets, std::uintptr_t stats,
                              std::int64_t N, std::int64_t Vp, std::int64_t V, std::int64_t vocab_start,
                              DType dtype, std::uintptr_t stream) {
    checked_dispatch("cross_entropy_stats_cuda", N, Vp, V, 0, dtype, [&](auto tag) {
        launch_stats<decltype(tag)>(logits, targets, stats, N, Vp, V, vocab_start,
                                    reinterpret_cast<cudaStream_t>(stream));
    });
}

void cross_entropy_grad_cuda(std::uintptr_t logits, std::uintptr_t targets, std::uintptr_t lse,
                             std::int64_t N, std::int64_t Vp, std::int64_t V, std::int64_t vocab_start,
                             std::int64_t ignore_index, double z_loss, double grad_scale,
                             DType dtype, std::uintptr_t stream) {
    checked_dispatch("cross_entropy_grad_cuda", N, Vp, V, 0, dtype, [&](auto tag) {
        launch_grad<decltype(tag)>(logits, targets, lse, N, Vp, V, vocab_start, ignore_index, z_loss, grad_scale,
                                   reinterpret_cast<cudaStream_t>(stream));
    });
}

void cross_entropy_fwd_cuda(std::uintptr_t logits, std::uintptr_t targets, std::uintptr_t losses,
                            std::uintptr_t dlogits, std::int64_t N, std::int64_t Vp, std::int64_t V,
                            std::int64_t ignore_index, double z_loss, double grad_scale,
                            DType dtype, std::uintptr_t stream) {
    checked_dispatch("cross_entropy_fwd_cuda", N, Vp, V, 1, dtype, [&](auto tag) {
        launch<decltype(tag)>(logits, targets, losses, dlogits, N, Vp, V, ignore_index, z_loss, grad_scale,
                              reinterpret_cast<cudaStream_t>(stream));
    });
}

}  // namespace nanolm

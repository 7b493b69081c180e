// Cross-entropy forward with its gradient on the CPU, float32, bf16 or fp16 logits, OpenMP over rows.
//
// Per row with target t (columns >= V are padding, excluded from the softmax):
//   lse  = m + log(s),  m = max_j x_j,  s = sum_j exp(x_j - m)      (j < V)
//   loss = lse - x_t + z_loss * lse^2                  (0 if t == ignore_index)
//   dx_j = grad_scale * (exp(x_j - lse) * (1 + 2 z_loss lse) - [j == t])  (0 for j >= V and
//          for ignored rows)
// Algorithm, per row (a 200 KB row stays in L2): max; then e_j = exp(x_j - m) written to dx
// while summing s; then dx_j *= coef / s. One exp per logit. The exp is a polynomial that
// gcc vectorizes (libm's expf would not be, under -O3 without -ffast-math).
// 16-bit logits are widened as they are read; max, sum, lse, loss and exp values stay fp32 (the
// exp values go to a per-thread fp32 row, as a 16-bit dx would round them twice), and only the
// final dx is rounded to the logits' type.
// Memory traffic, s-byte logits (4 fp32, 2 bf16/fp16): reads N*Vp logits (three passes, two from
// cache) + N targets, writes N*Vp gradients (read back once from cache) + N fp32 losses.
//
// The vocab-parallel pair (logits: one vocabulary shard, ids [vocab_start, vocab_start + Vp),
// the first V real, V = 0 allowed; see nanolm/ops/cross_entropy.py), in the same three dtypes
// with fp32 statistics:
//   cross_entropy_stats_cpu  per row (m, s, x_t or 0) -> stats (N, 3); reads N*Vp, writes 3N.
//   cross_entropy_grad_cpu   dx_j = grad_scale * (exp(x_j - lse) (1 + 2 z_loss lse) - [j == t - vocab_start])
//                            with the global lse (N,); reads and writes N*Vp, in place.
#include <algorithm>
#include <cmath>
#include <climits>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "common.h"
#include "cpu_bf16.h"
#include "cpu_math.h"
#include "cross_entropy.h"

namespace nanolm {
namespace {

// A float's bits as an int32 with the same order (a negative float's magnitude bits flipped):
// the row max becomes an integer max, which gcc vectorizes; a float max it does not without
// -ffast-math (NaN semantics). The map is its own inverse.
inline std::int32_t order_key(float x) {
    const std::int32_t b = __builtin_bit_cast(std::int32_t, x);
    return b ^ ((b >> 31) & 0x7fffffff);
}

inline std::int32_t order_key_inverse(std::int32_t k) { return k ^ ((k >> 31) & 0x7fffffff); }

constexpr std::int64_t kBlock = 512;

struct RowStats {
    float m, log_s;  // lse = m + log_s, kept apart: lse ~ 1e4 rounds by 1e-3 in fp32
};

// Writes e[0, V) = exp(x - m) and returns the row's m and log(sum e).
template <typename T>
RowStats softmax_row(const T* x, float* e, std::int64_t V) {
    std::int32_t m_key = INT32_MIN;
#pragma omp simd reduction(max : m_key)
    for (std::int64_t j = 0; j < V; ++j) m_key = std::max(m_key, order_key(to_float(x[j])));
    const float m = __builtin_bit_cast(float, order_key_inverse(m_key));
    // fp32 lanes summing a whole row (~V/8 terms each) lose 1e-4 relative at V = 50257: sum
    // blocks of kBlock in fp32 (vectorized), the blocks in double.
    double s = 0.0;
    for (std::int64_t j0 = 0; j0 < V; j0 += kBlock) {
        const std::int64_t j1 = std::min(j0 + kBlock, V);
        float block_sum = 0.f;
#pragma omp simd reduction(+ : block_sum)
        for (std::int64_t j = j0; j < j1; ++j) {
            const float ej = exp_nonpositive(to_float(x[j]) - m);
            e[j] = ej;
            block_sum += ej;
        }
        s += block_sum;
    }
    return {m, static_cast<float>(std::log(s))};
}

// One row: dx[0, V) from e = exp(x - m) (e may alias dx when T is float), the loss returned.
template <typename T>
float row_loss_and_grad(const T* x, T* dx, float* e, std::int64_t V, std::int64_t t, float z, float scale) {
    const float x_t = to_float(x[t]);  // read before dx (maybe x itself) is written
    const RowStats st = softmax_row(x, e, V);
    const float lse = st.m + st.log_s;
    // dx_j = scale (1 + 2 z lse) exp(x_j - lse) = c e_j, with exp(x_j - lse) = e_j / exp(log_s)
    const float c = scale * (1.f + 2.f * z * lse) * std::exp(-st.log_s);
    const float dx_t = e[t] * c - scale;
#pragma omp simd
    for (std::int64_t j = 0; j < V; ++j) dx[j] = from_float<T>(e[j] * c);
    dx[t] = from_float<T>(dx_t);
    return (st.m - x_t) + st.log_s + z * lse * lse;
}

template <typename T>
void cross_entropy_rows(const T* x_all, const std::int64_t* t_all, float* loss_all, T* dx_all, std::int64_t N,
                        std::int64_t Vp, std::int64_t V, std::int64_t ignore_index, float z, float scale) {
#pragma omp parallel
    {
        std::vector<float> e_row(std::is_same_v<T, float> ? 0 : V);
#pragma omp for schedule(static)
        for (std::int64_t row = 0; row < N; ++row) {
            const T* x = x_all + row * Vp;  // int64: N * Vp exceeds 2^31 past 42k rows of 50304
            T* dx = dx_all + row * Vp;
            const std::int64_t t = t_all[row];
            std::fill(dx + V, dx + Vp, from_float<T>(0.f));
            if (t == ignore_index) {
                std::fill(dx, dx + V, from_float<T>(0.f));
                loss_all[row] = 0.f;
                continue;
            }
            const std::int64_t t_safe = std::clamp<std::int64_t>(t, 0, V - 1);  // never outside the row
            float* e = std::is_same_v<T, float> ? reinterpret_cast<float*>(dx) : e_row.data();
            loss_all[row] = row_loss_and_grad(x, dx, e, V, t_safe, z, scale);
        }
    }
}

// max over x[0, V) (V >= 1), as an integer max of order keys (see order_key)
template <typename T>
float row_max(const T* x, std::int64_t V) {
    std::int32_t m_key = INT32_MIN;
#pragma omp simd reduction(max : m_key)
    for (std::int64_t j = 0; j < V; ++j) m_key = std::max(m_key, order_key(to_float(x[j])));
    return __builtin_bit_cast(float, order_key_inverse(m_key));
}

template <typename T>
void shard_stats_rows(const T* x_all, const std::int64_t* t_all, float* out, std::int64_t N, std::int64_t Vp,
                      std::int64_t V, std::int64_t vocab_start) {
#pragma omp parallel for schedule(static)
    for (std::int64_t row = 0; row < N; ++row) {
        const T* x = x_all + row * Vp;
        float* st = out + 3 * row;
        const std::int64_t local = t_all[row] - vocab_start;
        st[2] = (local >= 0 && local < V) ? to_float(x[local]) : 0.f;
        if (V == 0) {  // a shard of padding only: contributes exp(-inf) = 0 to every sum
            st[0] = -INFINITY;
            st[1] = 0.f;
            continue;
        }
        const float m = row_max(x, V);
        double s = 0.0;  // blocks summed in fp32 lanes, the blocks in double (as softmax_row)
        for (std::int64_t j0 = 0; j0 < V; j0 += kBlock) {
            const std::int64_t j1 = std::min(j0 + kBlock, V);
            float block_sum = 0.f;
#pragma omp simd reduction(+ : block_sum)
            for (std::int64_t j = j0; j < j1; ++j) block_sum += exp_nonpositive(to_float(x[j]) - m);
            s += block_sum;
        }
        st[0] = m;
        st[1] = static_cast<float>(s);
    }
}

template <typename T>
void shard_grad_rows(T* x_all, const std::int64_t* t_all, const float* lse_all, std::int64_t N, std::int64_t Vp,
                     std::int64_t V, std::int64_t vocab_start, std::int64_t ignore_index, float z, float scale) {
#pragma omp parallel for schedule(static)
    for (std::int64_t row = 0; row < N; ++row) {
        T* x = x_all + row * Vp;  // dx overwrites x
        const std::int64_t t = t_all[row];
        std::fill(x + V, x + Vp, from_float<T>(0.f));
        if (t == ignore_index) {
            std::fill(x, x + V, from_float<T>(0.f));
            continue;
        }
        const float l = lse_all[row];  // >= every x_j: x_j - l <= 0 up to rounding
        const float c = scale * (1.f + 2.f * z * l);
        const std::int64_t local = t - vocab_start;
        const bool mine = local >= 0 && local < V;
        const float x_t = mine ? to_float(x[local]) : 0.f;  // read before the row is overwritten
#pragma omp simd
        for (std::int64_t j = 0; j < V; ++j) x[j] = from_float<T>(exp_nonpositive(to_float(x[j]) - l) * c);
        // the target's -1 is subtracted in fp32, before the one rounding to T
        if (mine) x[local] = from_float<T>(exp_nonpositive(x_t - l) * c - scale);
    }
}

// The entry points' shared checks and dtype dispatch (as checked_dispatch in cross_entropy.cu):
// min_V is 1 for the forward over the whole vocabulary, 0 for a shard (padding only is allowed).
template <typename F>
void checked_dispatch(const char* op, std::int64_t N, std::int64_t Vp, std::int64_t V, std::int64_t min_V,
                      DType dtype, F&& f) {
    require(N >= 0, std::string(op) + ": N must be >= 0");
    require(V >= min_V && V <= Vp, std::string(op) + ": need " + std::to_string(min_V) + " <= V <= Vp");
    dispatch_cpu_dtype(dtype, op, std::forward<F>(f));
}

}  // namespace

void cross_entropy_stats_cpu(std::uintptr_t logits, std::uintptr_t targets, std::uintptr_t stats,
                             std::int64_t N, std::int64_t Vp, std::int64_t V, std::int64_t vocab_start,
                             DType dtype) {
    checked_dispatch("cross_entropy_stats_cpu", N, Vp, V, 0, dtype, [&](auto tag) {
        using T = decltype(tag);
        shard_stats_rows(ptr<const T>(logits), ptr<const std::int64_t>(targets), ptr<float>(stats), N, Vp, V,
                         vocab_start);
    });
}

void cross_entropy_grad_cpu(std::uintptr_t logits, std::uintptr_t targets, std::uintptr_t lse,
                            std::int64_t N, std::int64_t Vp, std::int64_t V, std::int64_t vocab_start,
                            std::int64_t ignore_index, double z_loss, double grad_scale, DType dtype) {
    checked_dispatch("cross_entropy_grad_cpu", N, Vp, V, 0, dtype, [&](auto tag) {
        using T = decltype(tag);
        shard_grad_rows(ptr<T>(logits), ptr<const std::int64_t>(targets), ptr<const float>(lse), N, Vp, V,
                        vocab_start, ignore_index, static_cast<float>(z_loss), static_cast<float>(grad_scale));
    });
}

void cross_entropy_fwd_cpu(std::uintptr_t logits, std::uintptr_t targets, std::uintptr_t losses,
                           std::uintptr_t dlogits, std::int64_t N, std::int64_t Vp, std::int64_t V,
                           std::int64_t ignore_index, double z_loss, double grad_scale, DType dtype) {
    checked_dispatch("cross_entropy_fwd_cpu", N, Vp, V, 1, dtype, [&](auto tag) {
        using T = decltype(tag);
        cross_entropy_rows(ptr<const T>(logits), ptr<const std::int64_t>(targets), ptr<float>(losses),
                           ptr<T>(dlogits), N, Vp, V, ignore_index, static_cast<float>(z_loss),
                           static_cast<float>(grad_scale));
    });
}

}  // namespace nanolm

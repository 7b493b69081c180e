// Cross-entropy forward with its gradient on the CPU, float32, OpenMP over rows.
//
// Per row with target t (columns >= V are padding, excluded from the softmax):
//   lse  = m + log(s),  m = max_j x_j,  s = sum_j exp(x_j - m)      (j < V)
//   loss = lse - x_t + z_loss * lse^2                  (0 if t == ignore_index)
//   dx_j = grad_scale * (exp(x_j - lse) * (1 + 2 z_loss lse) - [j == t])  (0 for j >= V and
//          for ignored rows)
// Algorithm, per row (a 200 KB row stays in L2): max; then e_j = exp(x_j - m) written to dx
// while summing s; then dx_j *= coef / s. One exp per logit. The exp is a polynomial that
// gcc vectorizes (libm's expf would not be, under -O3 without -ffast-math).
// Memory traffic: reads N*Vp logits (three passes, two from cache) + N targets, writes N*Vp
// gradients (read back once from cache) + N losses.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "common.h"
#include "cross_entropy.h"

namespace nanolm {
namespace {

// exp(x) for x <= 0 (callers subtract the row max), relative error ~2e-7: 2^n * p(r) with
// x = n ln2 + r, |r| <= ln2 / 2, p a degree-6 Taylor polynomial. x is clamped at -87 so 2^n
// stays a normal float (exp(-87) ~ 2e-38, and exp(-inf) gives that, not NaN).
inline float exp_nonpositive(float x) {
    x = std::max(x, -87.f);
    const float n = std::nearbyint(x * 1.44269504088896341f);
    const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;  // ln2 split hi/lo
    float p = 1.f / 720;
    p = p * r + 1.f / 120;
    p = p * r + 1.f / 24;
    p = p * r + 1.f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.f;
    p = p * r + 1.f;
    std::int32_t bits = (static_cast<std::int32_t>(n) + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof(scale));
    return p * scale;
}

struct RowStats {
    float m, log_s;  // lse = m + log_s, kept apart: lse ~ 1e4 rounds by 1e-3 in fp32
};

// Writes dx[0, V) = exp(x - lse) * coef (x may equal dx); coef is a function of lse.
template <typename CoefFn>
RowStats softmax_row(const float* x, float* dx, std::int64_t V, CoefFn coef_of_lse) {
    float m = -INFINITY;
#pragma omp simd reduction(max : m)
    for (std::int64_t j = 0; j < V; ++j) m = std::max(m, x[j]);
    double s = 0.0;  // fp32 lanes would each sum ~V/8 terms: 1e-4 relative error at V = 50257
#pragma omp simd reduction(+ : s)
    for (std::int64_t j = 0; j < V; ++j) {
        const float e = exp_nonpositive(x[j] - m);
        dx[j] = e;
        s += e;
    }
    const float log_s = static_cast<float>(std::log(s));
    const float c = static_cast<float>(coef_of_lse(m + log_s) / s);
#pragma omp simd
    for (std::int64_t j = 0; j < V; ++j) dx[j] *= c;
    return {m, log_s};
}

}  // namespace

void cross_entropy_fwd_cpu(std::uintptr_t logits, std::uintptr_t targets, std::uintptr_t losses,
                           std::uintptr_t dlogits, std::int64_t N, std::int64_t Vp, std::int64_t V,
                           std::int64_t ignore_index, double z_loss, double grad_scale) {
    require(N >= 0, "cross_entropy_fwd_cpu: N must be >= 0");
    require(V >= 1 && V <= Vp, "cross_entropy_fwd_cpu: need 1 <= V <= Vp");
    const float* x_all = ptr<const float>(logits);
    const std::int64_t* t_all = ptr<const std::int64_t>(targets);
    float* loss_all = ptr<float>(losses);
    float* dx_all = ptr<float>(dlogits);
    const float z = static_cast<float>(z_loss), scale = static_cast<float>(grad_scale);
#pragma omp parallel for schedule(static)
    for (std::int64_t row = 0; row < N; ++row) {
        const float* x = x_all + row * Vp;  // int64: N * Vp exceeds 2^31 past 42k rows of 50304
        float* dx = dx_all + row * Vp;
        const std::int64_t t = t_all[row];
        std::fill(dx + V, dx + Vp, 0.f);
        if (t == ignore_index) {
            std::fill(dx, dx + V, 0.f);
            loss_all[row] = 0.f;
            continue;
        }
        const std::int64_t t_safe = std::clamp<std::int64_t>(t, 0, V - 1);  // never outside the row
        const float x_t = x[t_safe];  // read before dx (maybe x itself) is written
        const RowStats st = softmax_row(x, dx, V, [&](float lse) { return scale * (1.f + 2.f * z * lse); });
        dx[t_safe] -= scale;
        const float lse = st.m + st.log_s;
        loss_all[row] = (st.m - x_t) + st.log_s + z * lse * lse;
    }
}

}  // namespace nanolm

// AdamW update and sum of squares on the CPU (OpenMP threads x SIMD lanes).
//
// Update, per element i of flat float32 buffers (the math of adamw_step in nanolm/ops/adamw.py):
//   g = grad[i] * grad_scale
//   p = param[i] * decay_factor          (decay_factor = 1 - lr*wd for i < decay_numel, else 1)
//   m = m + (1 - beta1) (g - m)          (torch's lerp for weights < 0.5)
//   v = beta2 v + (1 - beta2) g^2
//   p = p - step_size * m / (sqrt(v) / bc2_sqrt + eps)
// Memory traffic: reads p, g, m, v and writes p, m, v: 28 bytes per parameter, one pass.
//
// Sum of squares: fixed 4096-element chunks, each summed in double by 8 independent lane
// accumulators (so the vectorizer never reassociates), then the per-chunk partials are summed
// in chunk order. The partition depends on numel only, so the result has the same bits for any
// thread count, schedule or buffer alignment. Reads 4 bytes per element.
#include <algorithm>
#include <cmath>
#include <vector>

#include "adamw.h"
#include "common.h"

namespace nanolm {
namespace {

constexpr int64_t kChunk = 4096;
constexpr int kLanes = 8;

// Vectorizes only because setup.py passes -fno-math-errno (else sqrtf keeps an errno branch).
void adamw_block(float* __restrict p, const float* __restrict g, float* __restrict m,
                 float* __restrict v, int64_t n, float decay_factor, const AdamWScalars& s) {
    const float gs = s.grad_scale, w1 = s.one_minus_beta1, b2 = s.beta2, w2 = s.one_minus_beta2;
    const float eps = s.eps, step_size = s.step_size, bc2_sqrt = s.bc2_sqrt;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
        const float gi = g[i] * gs;
        const float mi = m[i] + w1 * (gi - m[i]);
        const float vi = v[i] * b2 + w2 * (gi * gi);
        const float denom = __builtin_sqrtf(vi) / bc2_sqrt + eps;
        p[i] = p[i] * decay_factor - step_size * (mi / denom);
        m[i] = mi;
        v[i] = vi;
    }
}

void adamw_range(float* p, const float* g, float* m, float* v, int64_t begin, int64_t end,
                 float decay_factor, const AdamWScalars& s) {
    const int64_t blocks = (end - begin + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
        const int64_t i = begin + b * kChunk;
        adamw_block(p + i, g + i, m + i, v + i, std::min(kChunk, end - i), decay_factor, s);
    }
}

double chunk_sum_of_squares(const float* x, int64_t n) {
    double lane[kLanes] = {};
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes)
        for (int j = 0; j < kLanes; ++j) lane[j] += double(x[i + j]) * double(x[i + j]);
    for (; i < n; ++i) lane[0] += double(x[i]) * double(x[i]);
    double total = 0.0;
    for (int j = 0; j < kLanes; ++j) total += lane[j];
    return total;
}

}  // namespace

void adamw_step_cpu(std::uintptr_t param, std::uintptr_t grad, std::uintptr_t exp_avg,
                    std::uintptr_t exp_avg_sq, int64_t numel, int64_t decay_numel,
                    const AdamWScalars& s, DType dtype) {
    require_dtype("adamw_step_cpu", dtype, DType::float32);
    require(numel >= 0 && decay_numel >= 0 && decay_numel <= numel,
            "adamw_step_cpu: need 0 <= decay_numel <= numel");
    float* p = ptr<float>(param);
    const float* g = ptr<const float>(grad);
    float* m = ptr<float>(exp_avg);
    float* v = ptr<float>(exp_avg_sq);
    adamw_range(p, g, m, v, 0, decay_numel, s.decay_factor, s);
    adamw_range(p, g, m, v, decay_numel, numel, 1.0f, s);
}

double sum_of_squares_cpu(std::uintptr_t x, int64_t numel, DType dtype) {
    require_dtype("sum_of_squares_cpu", dtype, DType::float32);
    require(numel >= 0, "sum_of_squares_cpu: numel must be >= 0");
    const float* data = ptr<const float>(x);
    const int64_t chunks = (numel + kChunk - 1) / kChunk;
    std::vector<double> partial(chunks);
#pragma omp parallel for schedule(static)
    for (int64_t c = 0; c < chunks; ++c) {
        const int64_t begin = c * kChunk;
        partial[c] = chunk_sum_of_squares(data + begin, std::min(kChunk, numel - begin));
    }
    double total = 0.0;
    for (double value : partial) total += value;
    return total;
}

}  // namespace nanolm

// LayerNorm forward and backward on the CPU, float32, with the residual add fused (see
// layernorm.cu for the math). OpenMP splits rows over threads; each row's loops are written so
// the compiler vectorizes them (`omp simd` reductions; no aliasing between the arrays).
// Dropout of the branch (dropout.h), when enabled: h = x * factor (+ residual), the factors
// (1/(1-p) or 0) of a row generated into a per-thread buffer; the backward regenerates them
// and writes dbranch = dx * factor in the same pass. Disabled, the kDropout = false
// instantiation is the code without dropout.
//
// Memory traffic, 4-byte values: forward reads N*C (+ N*C residual) + 2C, writes N*C
// (+ N*C residual_out) + 2N; backward reads 2*N*C (+ N*C dresidual) + C + 2N, writes N*C + 2C,
// plus the per-chunk dw/db partial sums (kChunks * C * 2 values, in cache).
//
// dw/db are deterministic whatever the thread count: rows are cut into at most kChunks fixed
// ranges (depending on N only); each range's column sums go to its own row of a partial
// buffer, and the ranges are then added in range order.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common.h"
#include "dropout.h"
#include "layernorm.h"

namespace nanolm {
namespace {

constexpr std::int64_t kChunks = 64;

// h = x (+ residual, written to residual_out); with kDropout h = x * factor (+ residual), always
// written to residual_out. Returns h's row and sets its mean and rstd.
template <bool kDropout>
const float* row_stats(const float* x, const float* residual, float* residual_out, const float* factor,
                       std::int64_t C, float eps, float& mean_out, float& rstd_out) {
    const float* h = x;
    if constexpr (kDropout) {
        if (residual != nullptr) {
#pragma omp simd
            for (std::int64_t c = 0; c < C; ++c) residual_out[c] = x[c] * factor[c] + residual[c];
        } else {
#pragma omp simd
            for (std::int64_t c = 0; c < C; ++c) residual_out[c] = x[c] * factor[c];
        }
        h = residual_out;
    } else if (residual != nullptr) {
#pragma omp simd
        for (std::int64_t c = 0; c < C; ++c) residual_out[c] = x[c] + residual[c];
        h = residual_out;
    }
    // one pass of shifted moments: shifting by a sample of the row (h[0]) keeps
    // E[(h-K)^2] - E[h-K]^2 free of the cancellation a large mean would cause
    const float K = h[0];
    float s1 = 0.f, s2 = 0.f;
#pragma omp simd reduction(+ : s1, s2)
    for (std::int64_t c = 0; c < C; ++c) {
        const float d = h[c] - K;
        s1 += d;
        s2 += d * d;
    }
    const float shifted_mean = s1 / C;
    const float mu = K + shifted_mean;
    const float var = std::max(s2 / C - shifted_mean * shifted_mean, 0.f);
    mean_out = mu;
    rstd_out = 1.f / std::sqrt(var + eps);
    return h;
}

// dx for one row (and dbranch = dx * factor with kDropout); adds the row's dy*xhat and dy into dw, db.
template <bool kDropout>
void backward_row(const float* dy, const float* x, const float* w, float mu, float rs,
                  const float* dresidual, float* dx, float* dw, float* db, const float* factor,
                  float* dbranch, std::int64_t C) {
    float s1 = 0.f, s2 = 0.f;
#pragma omp simd reduction(+ : s1, s2)
    for (std::int64_t c = 0; c < C; ++c) {
        const float xhat = (x[c] - mu) * rs, wdy = w[c] * dy[c];
        s1 += xhat * wdy;
        s2 += wdy;
    }
    const float c1 = s1 / C, c2 = s2 / C;
#pragma omp simd
    for (std::int64_t c = 0; c < C; ++c) {
        const float xhat = (x[c] - mu) * rs;
        float g = (w[c] * dy[c] - (xhat * c1 + c2)) * rs;
        if (dresidual != nullptr) g += dresidual[c];
        dx[c] = g;
        if constexpr (kDropout) dbranch[c] = g * factor[c];
        dw[c] += dy[c] * xhat;
        db[c] += dy[c];
    }
}

template <bool kDropout>
void forward_rows(std::uintptr_t x, std::uintptr_t residual, std::uintptr_t residual_out,
                  std::uintptr_t weight, std::uintptr_t bias, std::uintptr_t y, std::uintptr_t mean,
                  std::uintptr_t rstd, std::int64_t N, std::int64_t C, double eps,
                  const DropoutParams& dropout) {
    const float* w = ptr<const float>(weight);
    const float* b = ptr<const float>(bias);
#pragma omp parallel for schedule(static)
    for (std::int64_t row = 0; row < N; ++row) {
        const std::int64_t off = row * C;
        float mu, rs;
        static thread_local std::vector<float> factor;  // the row's dropout factors
        if constexpr (kDropout) {
            factor.resize(C);
            dropout_factors(dropout, static_cast<std::uint64_t>(off), C, factor.data());
        }
        const float* h = row_stats<kDropout>(ptr<const float>(x) + off,
                                             residual ? ptr<const float>(residual) + off : nullptr,
                                             residual_out ? ptr<float>(residual_out) + off : nullptr,
                                             factor.data(), C, static_cast<float>(eps), mu, rs);
        float* out = ptr<float>(y) + off;
        if (b != nullptr) {
#pragma omp simd
            for (std::int64_t c = 0; c < C; ++c) out[c] = (h[c] - mu) * rs * w[c] + b[c];
        } else {
#pragma omp simd
            for (std::int64_t c = 0; c < C; ++c) out[c] = (h[c] - mu) * rs * w[c];
        }
        ptr<float>(mean)[row] = mu;
        ptr<float>(rstd)[row] = rs;
    }
}

// dx (and dbranch) of the rows of each chunk; the chunk's dw, db column sums into part.
template <bool kDropout>
void backward_chunks(std::uintptr_t dy, std::uintptr_t x, std::uintptr_t weight, std::uintptr_t mean,
                     std::uintptr_t rstd, std::uintptr_t dresidual, std::uintptr_t dx, std::uintptr_t dbranch,
                     float* part, std::int64_t chunks, std::int64_t rows_per_chunk, std::int64_t N,
                     std::int64_t C, const DropoutParams& dropout) {
    const float* w = ptr<const float>(weight);
    const float* m = ptr<const float>(mean);
    const float* r = ptr<const float>(rstd);
#pragma omp parallel for schedule(static)
    for (std::int64_t chunk = 0; chunk < chunks; ++chunk) {
        float* dw = part + 2 * chunk * C;
        float* db = dw + C;
        std::fill(dw, db + C, 0.f);
        static thread_local std::vector<float> factor;  // the row's dropout factors, regenerated
        if constexpr (kDropout) factor.resize(C);
        const std::int64_t end = std::min(N, (chunk + 1) * rows_per_chunk);
        for (std::int64_t row = chunk * rows_per_chunk; row < end; ++row) {
            const std::int64_t off = row * C;
            if constexpr (kDropout) dropout_factors(dropout, static_cast<std::uint64_t>(off), C, factor.data());
            backward_row<kDropout>(ptr<const float>(dy) + off, ptr<const float>(x) + off, w, m[row], r[row],
                                   dresidual ? ptr<const float>(dresidual) + off : nullptr, ptr<float>(dx) + off,
                                   dw, db, factor.data(), kDropout ? ptr<float>(dbranch) + off : nullptr, C);
        }
    }
}

}  // namespace

void layernorm_fwd_cpu(std::uintptr_t x, std::uintptr_t residual, std::uintptr_t residual_out,
                       std::uintptr_t weight, std::uintptr_t bias, std::uintptr_t y,
                       std::uintptr_t mean, std::uintptr_t rstd, std::int64_t N, std::int64_t C,
                       double eps, const DropoutParams& dropout) {
    require(N >= 0 && C >= 1, "layernorm_fwd_cpu: need N >= 0 and C >= 1, got N=" + std::to_string(N) +
                                  " C=" + std::to_string(C));
    if (dropout.enabled) {
        require(residual_out != 0, "layernorm_fwd_cpu: dropout needs residual_out");
        forward_rows<true>(x, residual, residual_out, weight, bias, y, mean, rstd, N, C, eps, dropout);
    } else {
        require((residual == 0) == (residual_out == 0),
                "layernorm_fwd_cpu: residual and residual_out must be given together");
        forward_rows<false>(x, residual, residual_out, weight, bias, y, mean, rstd, N, C, eps, dropout);
    }
}

void layernorm_bwd_cpu(std::uintptr_t dy, std::uintptr_t x, std::uintptr_t weight,
                       std::uintptr_t mean, std::uintptr_t rstd, std::uintptr_t dresidual,
                       std::uintptr_t dx, std::uintptr_t dweight, std::uintptr_t dbias,
                       std::int64_t N, std::int64_t C, std::uintptr_t dbranch, const DropoutParams& dropout) {
    require(N >= 0 && C >= 1, "layernorm_bwd_cpu: need N >= 0 and C >= 1, got N=" + std::to_string(N) +
                                  " C=" + std::to_string(C));
    require(!dropout.enabled || dbranch != 0, "layernorm_bwd_cpu: dropout needs dbranch");
    const std::int64_t chunks = std::min(N, kChunks);
    const std::int64_t rows_per_chunk = chunks > 0 ? (N + chunks - 1) / chunks : 0;
    // Reused across calls (per calling thread): a fresh buffer of this size would be mmap'ed and
    // page-faulted on every call, a visible share of a 2 ms backward.
    static thread_local std::vector<float> partial;
    partial.resize(std::max(partial.size(), static_cast<std::size_t>(2 * chunks * C)));
    float* part = partial.data();
    if (dropout.enabled)
        backward_chunks<true>(dy, x, weight, mean, rstd, dresidual, dx, dbranch, part, chunks, rows_per_chunk,
                              N, C, dropout);
    else
        backward_chunks<false>(dy, x, weight, mean, rstd, dresidual, dx, dbranch, part, chunks, rows_per_chunk,
                               N, C, dropout);
    // chunk partials added in chunk order for every column; columns split over threads
    float* dw_out = ptr<float>(dweight);
    float* db_out = ptr<float>(dbias);
    constexpr std::int64_t kCols = 256;
#pragma omp parallel for schedule(static)
    for (std::int64_t c0 = 0; c0 < C; c0 += kCols) {
        const std::int64_t c1 = std::min(C, c0 + kCols);
        std::fill(dw_out + c0, dw_out + c1, 0.f);
        std::fill(db_out + c0, db_out + c1, 0.f);
        for (std::int64_t chunk = 0; chunk < chunks; ++chunk) {
            const float* dw = part + 2 * chunk * C;
            const float* db = dw + C;
#pragma omp simd
            for (std::int64_t c = c0; c < c1; ++c) {
                dw_out[c] += dw[c];
                db_out[c] += db[c];
            }
        }
    }
}

}  // namespace nanolm

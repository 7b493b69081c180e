// LayerNorm and RMSNorm forward and backward on the CPU, float32, bf16 or fp16 values, with the
// residual add fused (see layernorm.cu for the math). RMSNorm is the kRms = true instantiation of
// the same code: no mean (xhat = h * rstd, rstd = 1/sqrt(mean(h^2) + eps)), no bias, the weight
// optional (null: y = xhat), and in the backward no c2 term and no dbias. OpenMP splits rows over threads; each row's loops are written so
// the compiler vectorizes them (`omp simd` reductions; no aliasing between the arrays).
// 16-bit rows are widened into a per-thread fp32 row first; statistics, dw and db stay fp32
// (mean, rstd, dweight, dbias are fp32 whatever the input dtype), and x + residual is rounded to
// the storage type before it is normalized, so forward and backward see the same residual_out.
// Dropout of the branch (dropout.h), when enabled: h = x * factor (+ residual), the factors
// (1/(1-p) or 0) of a row generated into a per-thread buffer and applied in fp32 to the widened
// x; h is rounded to the storage type and stored to residual_out. The backward regenerates them
// and writes dbranch = dx * factor in the same pass. Disabled, the kDropout = false
// instantiation is the code without dropout.
//
// Memory traffic, s-byte values (4 fp32, 2 bf16/fp16): forward reads N*C (+ N*C residual) + 2C,
// writes N*C (+ N*C residual_out) values + 2N fp32; backward reads 2*N*C (+ N*C dresidual) + C
// values + 2N fp32, writes N*C (+ N*C dbranch with dropout) values + 2C fp32, plus the per-chunk dw/db partial sums
// (kChunks * C * 2 fp32, in cache). RMSNorm: N fp32 statistics instead of 2N, C weights and C
// fp32 dweight instead of 2C (none without a weight).
//
// dw/db are deterministic whatever the thread count: rows are cut into at most kChunks fixed
// ranges (depending on N only); each range's column sums go to its own row of a partial
// buffer, and the ranges are then added in range order.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "common.h"
#include "cpu_bf16.h"
#include "dropout.h"
#include "layernorm.h"

namespace nanolm {
namespace {

constexpr std::int64_t kChunks = 64;

// h = x (+ residual), or with kDropout h = x * factor (+ residual), as fp32. Stored to
// residual_out when there is a residual or kDropout (rounded to T first, as it is stored, and
// for 16-bit T widened back into buf); for fp32 x without either, x itself; else widened into buf.
// buf holds 2 * C floats: for 16-bit T the residual is widened into its second half, so that
// every loop here is a plain fp32 loop (or widen/narrow) that vectorizes.
template <typename T, bool kDropout>
const float* load_row(const T* x, const T* residual, T* residual_out, const float* factor, float* buf,
                      std::int64_t C) {
    if constexpr (std::is_same_v<T, float>) {
        if constexpr (kDropout) {
            if (residual != nullptr) {
#pragma omp simd
                for (std::int64_t c = 0; c < C; ++c) residual_out[c] = x[c] * factor[c] + residual[c];
            } else {
#pragma omp simd
                for (std::int64_t c = 0; c < C; ++c) residual_out[c] = x[c] * factor[c];
            }
            return residual_out;
        }
        if (residual == nullptr) return x;
#pragma omp simd
        for (std::int64_t c = 0; c < C; ++c) residual_out[c] = x[c] + residual[c];
        return residual_out;
    } else {
        widen(x, buf, C);
        if (residual == nullptr && !kDropout) return buf;
        if constexpr (kDropout) {
#pragma omp simd
            for (std::int64_t c = 0; c < C; ++c) buf[c] *= factor[c];
        }
        if (residual != nullptr) {
            float* r = buf + C;
            widen(residual, r, C);
#pragma omp simd
            for (std::int64_t c = 0; c < C; ++c) buf[c] += r[c];
        }
        narrow(buf, residual_out, C);
        widen(residual_out, buf, C);
        return buf;
    }
}

// The mean and rstd of a row h.
void row_stats(const float* h, std::int64_t C, float eps, float& mean_out, float& rstd_out) {
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
}

// The rstd of a row h for RMSNorm: no mean, so no cancellation to guard against.
float row_rstd(const float* h, std::int64_t C, float eps) {
    float s2 = 0.f;
#pragma omp simd reduction(+ : s2)
    for (std::int64_t c = 0; c < C; ++c) s2 += h[c] * h[c];
    return 1.f / std::sqrt(s2 / C + eps);
}

// A (C,) vector as fp32: the vector itself, or widened into buf (empty for a null vector).
template <typename T>
const float* as_float(const T* v, std::vector<float>& buf, std::int64_t C) {
    if constexpr (std::is_same_v<T, float>) {
        return v;
    } else {
        if (v == nullptr) return nullptr;
        buf.resize(C);
        widen(v, buf.data(), C);
        return buf.data();
    }
}

// RMSNorm's dx for one row without a weight: dx = rstd * (dy - xhat * c1), no dw.
template <bool kDropout>
void backward_row_rms_no_weight(const float* dy, const float* x, float rs, const float* dresidual, float* dx,
                                const float* factor, float* dbranch, std::int64_t C) {
    float s1 = 0.f;
#pragma omp simd reduction(+ : s1)
    for (std::int64_t c = 0; c < C; ++c) s1 += x[c] * rs * dy[c];
    const float c1 = s1 / C;
#pragma omp simd
    for (std::int64_t c = 0; c < C; ++c) {
        float g = (dy[c] - x[c] * rs * c1) * rs;
        if (dresidual != nullptr) g += dresidual[c];
        dx[c] = g;
        if constexpr (kDropout) dbranch[c] = g * factor[c];
    }
}

// dx for one row (and dbranch = dx * factor with kDropout); adds the row's dy*xhat and dy into dw, db.
// kRms: mu is 0, c2 and db are left out, and a null w (no weight) reads as ones with no dw.
template <bool kDropout, bool kRms>
void backward_row(const float* dy, const float* x, const float* w, float mu, float rs,
                  const float* dresidual, float* dx, float* dw, float* db, const float* factor,
                  float* dbranch, std::int64_t C) {
    if constexpr (kRms) {
        if (w == nullptr) return backward_row_rms_no_weight<kDropout>(dy, x, rs, dresidual, dx, factor, dbranch, C);
    }
    float s1 = 0.f, s2 = 0.f;
#pragma omp simd reduction(+ : s1, s2)
    for (std::int64_t c = 0; c < C; ++c) {
        const float xhat = (x[c] - mu) * rs, wdy = w[c] * dy[c];
        s1 += xhat * wdy;
        s2 += wdy;
    }
    const float c1 = s1 / C, c2 = kRms ? 0.f : s2 / C;
#pragma omp simd
    for (std::int64_t c = 0; c < C; ++c) {
        const float xhat = (x[c] - mu) * rs;
        float g = (w[c] * dy[c] - (xhat * c1 + c2)) * rs;
        if (dresidual != nullptr) g += dresidual[c];
        dx[c] = g;
        if constexpr (kDropout) dbranch[c] = g * factor[c];
        dw[c] += dy[c] * xhat;
        if constexpr (!kRms) db[c] += dy[c];
    }
}

// Each chunk of rows: dx (and dbranch with kDropout), and the chunk's dw/db column sums into
// its row of `part`. kRms: mean is null (read as 0), weight may be null.
template <typename T, bool kDropout, bool kRms>
void backward_chunks(const T* dy, const T* x, const T* weight, const float* mean, const float* rstd,
                     const T* dresidual, T* dx, T* dbranch, float* part, std::int64_t N, std::int64_t C,
                     std::int64_t chunks, std::int64_t rows_per_chunk, const DropoutParams& dropout) {
    constexpr bool kFloat = std::is_same_v<T, float>;
    std::vector<float> w_buf;
    const float* w = as_float(weight, w_buf, C);
#pragma omp parallel
    {
        std::vector<float> rows(kFloat ? 0 : 5 * C);  // dy, x, dresidual, dx, dbranch of one row, as fp32
        std::vector<float> factor(kDropout ? C : 0);  // the row's dropout factors, regenerated
#pragma omp for schedule(static)
        for (std::int64_t chunk = 0; chunk < chunks; ++chunk) {
            float* dw = part + 2 * chunk * C;
            float* db = dw + C;
            std::fill(dw, db + C, 0.f);
            const std::int64_t end = std::min(N, (chunk + 1) * rows_per_chunk);
            for (std::int64_t row = chunk * rows_per_chunk; row < end; ++row) {
                const std::int64_t off = row * C;
                if constexpr (kDropout) dropout_factors(dropout, static_cast<std::uint64_t>(off), C, factor.data());
                const float mu = kRms ? 0.f : mean[row];
                if constexpr (kFloat) {
                    backward_row<kDropout, kRms>(dy + off, x + off, w, mu, rstd[row],
                                           dresidual ? dresidual + off : nullptr, dx + off, dw, db,
                                           factor.data(), kDropout ? dbranch + off : nullptr, C);
                } else {
                    float *dy_f = rows.data(), *x_f = dy_f + C, *dres_f = x_f + C, *dx_f = dres_f + C;
                    float* dbranch_f = dx_f + C;
                    widen(dy + off, dy_f, C);
                    widen(x + off, x_f, C);
                    if (dresidual) widen(dresidual + off, dres_f, C);
                    backward_row<kDropout, kRms>(dy_f, x_f, w, mu, rstd[row], dresidual ? dres_f : nullptr,
                                           dx_f, dw, db, factor.data(), dbranch_f, C);
                    narrow(dx_f, dx + off, C);
                    if constexpr (kDropout) narrow(dbranch_f, dbranch + off, C);
                }
            }
        }
    }
}

// kRms: mean and bias are null (nothing stored, no shift), weight may be null (y = xhat).
template <typename T, bool kDropout, bool kRms>
void forward_rows(const T* x, const T* residual, T* residual_out, const T* weight, const T* bias, T* y,
                  float* mean, float* rstd, std::int64_t N, std::int64_t C, float eps,
                  const DropoutParams& dropout) {
    std::vector<float> w_buf, b_buf;
    const float* w = as_float(weight, w_buf, C);
    const float* b = as_float(bias, b_buf, C);
#pragma omp parallel
    {
        std::vector<float> row(std::is_same_v<T, float> ? 0 : 2 * C);  // h; the widened residual, then y
        std::vector<float> factor(kDropout ? C : 0);                    // the row's dropout factors
#pragma omp for schedule(static)
        for (std::int64_t r = 0; r < N; ++r) {
            const std::int64_t off = r * C;
            if constexpr (kDropout) dropout_factors(dropout, static_cast<std::uint64_t>(off), C, factor.data());
            const float* h = load_row<T, kDropout>(x + off, residual ? residual + off : nullptr,
                                                   residual_out ? residual_out + off : nullptr, factor.data(),
                                                   row.data(), C);
            float mu = 0.f, rs;
            if constexpr (kRms)
                rs = row_rstd(h, C, eps);
            else
                row_stats(h, C, eps, mu, rs);
            float* out = std::is_same_v<T, float> ? reinterpret_cast<float*>(y + off) : row.data() + C;
            if (kRms && w == nullptr) {
#pragma omp simd
                for (std::int64_t c = 0; c < C; ++c) out[c] = h[c] * rs;
            } else if (b != nullptr) {
#pragma omp simd
                for (std::int64_t c = 0; c < C; ++c) out[c] = (h[c] - mu) * rs * w[c] + b[c];
            } else {
#pragma omp simd
                for (std::int64_t c = 0; c < C; ++c) out[c] = (h[c] - mu) * rs * w[c];
            }
            if constexpr (!std::is_same_v<T, float>) narrow(out, y + off, C);
            if constexpr (!kRms) mean[r] = mu;
            rstd[r] = rs;
        }
    }
}

// Calls fn(std::true_type) with dropout enabled, fn(std::false_type) without.
template <typename Fn>
void with_dropout(const DropoutParams& dropout, Fn&& fn) {
    if (dropout.enabled)
        fn(std::true_type{});
    else
        fn(std::false_type{});
}

}  // namespace

namespace {

// The LayerNorm (kRms = false) and RMSNorm launchers' shared body: checks, then the instantiation.
template <bool kRms>
void forward(const char* op, std::uintptr_t x, std::uintptr_t residual, std::uintptr_t residual_out,
             std::uintptr_t weight, std::uintptr_t bias, std::uintptr_t y, std::uintptr_t mean, std::uintptr_t rstd,
             std::int64_t N, std::int64_t C, double eps, DType dtype, const DropoutParams& dropout) {
    require(N >= 0 && C >= 1, std::string(op) + ": need N >= 0 and C >= 1, got N=" + std::to_string(N) +
                                  " C=" + std::to_string(C));
    if (dropout.enabled)
        require(residual_out != 0, std::string(op) + ": dropout needs residual_out");
    else
        require((residual == 0) == (residual_out == 0),
                std::string(op) + ": residual and residual_out must be given together");
    dispatch_cpu_dtype(dtype, op, [&](auto t) {
        using T = decltype(t);
        with_dropout(dropout, [&](auto drop) {
            forward_rows<T, decltype(drop)::value, kRms>(
                ptr<const T>(x), ptr<const T>(residual), ptr<T>(residual_out), ptr<const T>(weight),
                ptr<const T>(bias), ptr<T>(y), ptr<float>(mean), ptr<float>(rstd), N, C, static_cast<float>(eps),
                dropout);
        });
    });
}

// dbias == 0 (RMSNorm) leaves the bias sums out; dweight == 0 (RMSNorm without a weight) the
// weight sums too.
template <bool kRms>
void backward(const char* op, std::uintptr_t dy, std::uintptr_t x, std::uintptr_t weight, std::uintptr_t mean,
              std::uintptr_t rstd, std::uintptr_t dresidual, std::uintptr_t dx, std::uintptr_t dweight,
              std::uintptr_t dbias, std::int64_t N, std::int64_t C, DType dtype, std::uintptr_t dbranch,
              const DropoutParams& dropout) {
    require(N >= 0 && C >= 1, std::string(op) + ": need N >= 0 and C >= 1, got N=" + std::to_string(N) +
                                  " C=" + std::to_string(C));
    require(!dropout.enabled || dbranch != 0, std::string(op) + ": dropout needs dbranch");
    const std::int64_t chunks = std::min(N, kChunks);
    const std::int64_t rows_per_chunk = chunks > 0 ? (N + chunks - 1) / chunks : 0;
    // Reused across calls (per calling thread): a fresh buffer of this size would be mmap'ed and
    // page-faulted on every call, a visible share of a 2 ms backward.
    static thread_local std::vector<float> partial;
    partial.resize(std::max(partial.size(), static_cast<std::size_t>(2 * chunks * C)));
    float* part = partial.data();
    dispatch_cpu_dtype(dtype, op, [&](auto t) {
        using T = decltype(t);
        with_dropout(dropout, [&](auto drop) {
            backward_chunks<T, decltype(drop)::value, kRms>(
                ptr<const T>(dy), ptr<const T>(x), ptr<const T>(weight), ptr<const float>(mean),
                ptr<const float>(rstd), ptr<const T>(dresidual), ptr<T>(dx), ptr<T>(dbranch), part, N, C, chunks,
                rows_per_chunk, dropout);
        });
    });
    // chunk partials added in chunk order for every column; columns split over threads
    float* dw_out = ptr<float>(dweight);
    float* db_out = ptr<float>(dbias);
    if (dw_out == nullptr) return;
    constexpr std::int64_t kCols = 256;
#pragma omp parallel for schedule(static)
    for (std::int64_t c0 = 0; c0 < C; c0 += kCols) {
        const std::int64_t c1 = std::min(C, c0 + kCols);
        std::fill(dw_out + c0, dw_out + c1, 0.f);
        if (!kRms) std::fill(db_out + c0, db_out + c1, 0.f);
        for (std::int64_t chunk = 0; chunk < chunks; ++chunk) {
            const float* dw = part + 2 * chunk * C;
            const float* db = dw + C;
#pragma omp simd
            for (std::int64_t c = c0; c < c1; ++c) {
                dw_out[c] += dw[c];
                if constexpr (!kRms) db_out[c] += db[c];
            }
        }
    }
}

}  // namespace

void layernorm_fwd_cpu(std::uintptr_t x, std::uintptr_t residual, std::uintptr_t residual_out,
                       std::uintptr_t weight, std::uintptr_t bias, std::uintptr_t y,
                       std::uintptr_t mean, std::uintptr_t rstd, std::int64_t N, std::int64_t C,
                       double eps, DType dtype, const DropoutParams& dropout) {
    forward<false>("layernorm_fwd_cpu", x, residual, residual_out, weight, bias, y, mean, rstd, N, C, eps, dtype,
                   dropout);
}

void layernorm_bwd_cpu(std::uintptr_t dy, std::uintptr_t x, std::uintptr_t weight,
                       std::uintptr_t mean, std::uintptr_t rstd, std::uintptr_t dresidual,
                       std::uintptr_t dx, std::uintptr_t dweight, std::uintptr_t dbias,
                       std::int64_t N, std::int64_t C, DType dtype,
                       std::uintptr_t dbranch, const DropoutParams& dropout) {
    backward<false>("layernorm_bwd_cpu", dy, x, weight, mean, rstd, dresidual, dx, dweight, dbias, N, C, dtype,
                    dbranch, dropout);
}

void rmsnorm_fwd_cpu(std::uintptr_t x, std::uintptr_t residual, std::uintptr_t residual_out,
                     std::uintptr_t weight, std::uintptr_t y, std::uintptr_t rstd, std::int64_t N,
                     std::int64_t C, double eps, DType dtype, const DropoutParams& dropout) {
    forward<true>("rmsnorm_fwd_cpu", x, residual, residual_out, weight, 0, y, 0, rstd, N, C, eps, dtype, dropout);
}

void rmsnorm_bwd_cpu(std::uintptr_t dy, std::uintptr_t x, std::uintptr_t weight, std::uintptr_t rstd,
                     std::uintptr_t dresidual, std::uintptr_t dx, std::uintptr_t dweight, std::int64_t N,
                     std::int64_t C, DType dtype, std::uintptr_t dbranch, const DropoutParams& dropout) {
    require((weight == 0) == (dweight == 0), "rmsnorm_bwd_cpu: weight and dweight must be given together");
    backward<true>("rmsnorm_bwd_cpu", dy, x, weight, 0, rstd, dresidual, dx, dweight, 0, N, C, dtype, dbranch,
                   dropout);
}

}  // namespace nanolm

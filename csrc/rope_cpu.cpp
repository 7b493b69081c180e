// QK-norm + rotary position embedding (RoPE) on the CPU, float32, bf16 or fp16 values (the math
// is nanolm/ops/rope.py's). For each token (b, t) and each of its H + Hkv q and k heads x (D
// values), with half = D/2 and the angle table c_j = cos(t * f_j), s_j = sin(t * f_j):
//   n = x * rstd,  rstd = 1/sqrt(mean(x^2) + eps)   (qk_norm; else rstd = 1)
//   y_j = n_j c_j - n_{j+half} s_j,   y_{j+half} = n_{j+half} c_j + n_j s_j      (j < half)
// the v heads copied. Backward, dy the output gradient:
//   dn_j = dy_j c_j + dy_{j+half} s_j,   dn_{j+half} = dy_{j+half} c_j - dy_j s_j
//   dx = rstd * (dn - n * mean(dn * n))            (qk_norm; else dx = dn)
// Each head is widened into an fp32 buffer, computed in fp32 and rounded once. OpenMP splits the
// B*T tokens over threads. The angle tables come from the caller (computed in float64 and
// rounded once, so every backend rotates by the same angles).
//
// Memory traffic per token, s-byte values, W = (H + 2*Hkv) * D: forward reads W, writes W values
// and H + Hkv fp32 rstd; backward reads 2W values and the rstd, writes W. The (T, D/2) tables
// stay in cache. Memory-bound.
#include <cmath>
#include <string>
#include <vector>

#include "common.h"
#include "cpu_bf16.h"
#include "rope.h"

namespace nanolm {
namespace {

void check_sizes(const char* op, std::int64_t B, std::int64_t T, std::int64_t H, std::int64_t Hkv, std::int64_t D) {
    require(B >= 0 && T >= 1 && H >= 1 && Hkv >= 1 && H % Hkv == 0 && D >= 2 && D % 2 == 0,
            std::string(op) + ": need B >= 0, T >= 1, n_kv_head dividing n_head and an even head size, got B=" +
                std::to_string(B) + " T=" + std::to_string(T) + " H=" + std::to_string(H) +
                " Hkv=" + std::to_string(Hkv) + " D=" + std::to_string(D));
}

// One head: n = x * r (r written to *rstd), then rotated in place into y (fp32 buffers of D).
void norm_rotate(float* __restrict x, float* __restrict y, float* rstd, const float* __restrict c,
                 const float* __restrict s, std::int64_t D, bool qk_norm, float eps) {
    float r = 1.0f;
    if (qk_norm) {
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (std::int64_t j = 0; j < D; ++j) sum += x[j] * x[j];
        r = 1.0f / std::sqrt(sum / static_cast<float>(D) + eps);
    }
    *rstd = r;
    const std::int64_t half = D / 2;
#pragma omp simd
    for (std::int64_t j = 0; j < half; ++j) {
        const float lo = x[j] * r, hi = x[j + half] * r;
        y[j] = lo * c[j] - hi * s[j];
        y[j + half] = hi * c[j] + lo * s[j];
    }
}

template <typename T>
void forward_tokens(const T* qkv, T* out, float* rstd, const float* cos, const float* sin, std::int64_t B,
                    std::int64_t T_, std::int64_t H, std::int64_t Hkv, std::int64_t D, bool qk_norm, float eps) {
    const std::int64_t heads = H + 2 * Hkv, rotated = H + Hkv, W = heads * D;
#pragma omp parallel
    {
        std::vector<float> x(D), y(D);
#pragma omp for schedule(static)
        for (std::int64_t token = 0; token < B * T_; ++token) {
            const std::int64_t t = token % T_;
            const T* in = qkv + token * W;  // int64 offsets: B*T*W passes 2^31 at 1M tokens of 2k values
            T* o = out + token * W;
            for (std::int64_t h = 0; h < rotated; ++h) {
                widen(in + h * D, x.data(), D);
                norm_rotate(x.data(), y.data(), rstd + token * rotated + h, cos + t * (D / 2), sin + t * (D / 2), D,
                            qk_norm, eps);
                narrow(y.data(), o + h * D, D);
            }
            for (std::int64_t i = rotated * D; i < W; ++i) o[i] = in[i];  // v heads
        }
    }
}

template <typename T>
void backward_tokens(const T* dout, const T* qkv, const float* rstd, const float* cos, const float* sin, T* dqkv,
                     std::int64_t B, std::int64_t T_, std::int64_t H, std::int64_t Hkv, std::int64_t D,
                     bool qk_norm) {
    const std::int64_t heads = H + 2 * Hkv, rotated = H + Hkv, W = heads * D, half = D / 2;
#pragma omp parallel
    {
        std::vector<float> dy(D), dn(D), n(D);
#pragma omp for schedule(static)
        for (std::int64_t token = 0; token < B * T_; ++token) {
            const std::int64_t t = token % T_;
            const float* c = cos + t * half;
            const float* s = sin + t * half;
            const T* g = dout + token * W;
            T* dx = dqkv + token * W;
            for (std::int64_t h = 0; h < rotated; ++h) {
                widen(g + h * D, dy.data(), D);
                float* dnp = dn.data();
                const float* dyp = dy.data();
#pragma omp simd
                for (std::int64_t j = 0; j < half; ++j) {
                    dnp[j] = dyp[j] * c[j] + dyp[j + half] * s[j];
                    dnp[j + half] = dyp[j + half] * c[j] - dyp[j] * s[j];
                }
                if (qk_norm) {
                    const float r = rstd[token * rotated + h];
                    widen(qkv + token * W + h * D, n.data(), D);
                    float* np = n.data();
                    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                    for (std::int64_t j = 0; j < D; ++j) {
                        np[j] *= r;
                        dot += dnp[j] * np[j];
                    }
                    dot /= static_cast<float>(D);
#pragma omp simd
                    for (std::int64_t j = 0; j < D; ++j) dnp[j] = r * (dnp[j] - np[j] * dot);
                }
                narrow(dnp, dx + h * D, D);
            }
            for (std::int64_t i = rotated * D; i < W; ++i) dx[i] = g[i];  // v heads: the identity
        }
    }
}

}  // namespace

void qk_norm_rope_fwd_cpu(std::uintptr_t qkv, std::uintptr_t out, std::uintptr_t rstd, std::uintptr_t cos,
                          std::uintptr_t sin, std::int64_t B, std::int64_t T, std::int64_t H, std::int64_t Hkv,
                          std::int64_t D, bool qk_norm, double eps, DType dtype) {
    check_sizes("qk_norm_rope_fwd_cpu", B, T, H, Hkv, D);
    dispatch_cpu_dtype(dtype, "qk_norm_rope_fwd_cpu", [&](auto tag) {
        using V = decltype(tag);
        forward_tokens<V>(ptr<const V>(qkv), ptr<V>(out), ptr<float>(rstd), ptr<const float>(cos),
                          ptr<const float>(sin), B, T, H, Hkv, D, qk_norm, static_cast<float>(eps));
    });
}

void qk_norm_rope_bwd_cpu(std::uintptr_t dout, std::uintptr_t qkv, std::uintptr_t rstd, std::uintptr_t cos,
                          std::uintptr_t sin, std::uintptr_t dqkv, std::int64_t B, std::int64_t T, std::int64_t H,
                          std::int64_t Hkv, std::int64_t D, bool qk_norm, DType dtype) {
    check_sizes("qk_norm_rope_bwd_cpu", B, T, H, Hkv, D);
    dispatch_cpu_dtype(dtype, "qk_norm_rope_bwd_cpu", [&](auto tag) {
        using V = decltype(tag);
        backward_tokens<V>(ptr<const V>(dout), ptr<const V>(qkv), ptr<const float>(rstd), ptr<const float>(cos),
                           ptr<const float>(sin), ptr<V>(dqkv), B, T, H, Hkv, D, qk_norm);
    });
}

}  // namespace nanolm

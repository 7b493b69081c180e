// SwiGLU and ReLU^2 forward and backward on the CPU, float32, bf16 or fp16 values (the math is
// nanolm/ops/mlp_activation.py's):
//   swiglu  a = silu(g) * u = g * sigmoid(g) * u                 for gate_up = [g | u] (N, 2F)
//           dg = da * u * sigmoid(g) * (1 + g * (1 - sigmoid(g))),  du = da * silu(g)
//   relu2   a = relu(x)^2,  dx = 2 * relu(x) * da
// Every value is widened to fp32, computed in fp32 and rounded once to the storage type. The
// sigmoid and relu are cpu_math.h's, which gcc vectorizes (libm's expf and std::fmax it does not).
// OpenMP splits rows over threads; each row is one `omp simd` loop over F.
//
// Memory traffic, s-byte values: swiglu forward reads 2NF, writes NF; backward reads 3NF,
// writes 2NF. relu2 forward reads NF, writes NF; backward reads 2NF, writes NF. A handful of
// FLOPs and one exp per value: memory-bound.
#include <cmath>
#include <string>

#include "common.h"
#include "cpu_bf16.h"
#include "cpu_math.h"
#include "mlp_activation.h"

namespace nanolm {
namespace {

void check_sizes(const char* op, std::int64_t N, std::int64_t F) {
    require(N >= 0 && F >= 1, std::string(op) + ": need N >= 0 and F >= 1, got N=" + std::to_string(N) +
                                  " F=" + std::to_string(F));
}

template <typename T>
void swiglu_fwd_rows(const T* gate_up, T* out, std::int64_t N, std::int64_t F) {
#pragma omp parallel for schedule(static)
    for (std::int64_t n = 0; n < N; ++n) {
        const T* g = gate_up + n * 2 * F;  // int64 offsets: N * 2F passes 2^31 at 32k rows of 2 * 32k
        const T* u = g + F;
        T* a = out + n * F;
#pragma omp simd
        for (std::int64_t f = 0; f < F; ++f) {
            const float gf = to_float(g[f]);
            a[f] = from_float<T>(gf * sigmoid(gf) * to_float(u[f]));
        }
    }
}

template <typename T>
void swiglu_bwd_rows(const T* da, const T* gate_up, T* dgate_up, std::int64_t N, std::int64_t F) {
#pragma omp parallel for schedule(static)
    for (std::int64_t n = 0; n < N; ++n) {
        const T* g = gate_up + n * 2 * F;
        const T* u = g + F;
        const T* d = da + n * F;
        T* dg = dgate_up + n * 2 * F;
        T* du = dg + F;
#pragma omp simd
        for (std::int64_t f = 0; f < F; ++f) {
            const float gf = to_float(g[f]), df = to_float(d[f]);
            const float sig = sigmoid(gf);
            dg[f] = from_float<T>(df * to_float(u[f]) * sig * (1.0f + gf * (1.0f - sig)));
            du[f] = from_float<T>(df * gf * sig);
        }
    }
}

template <typename T>
void relu2_fwd_rows(const T* x, T* out, std::int64_t N, std::int64_t F) {
#pragma omp parallel for schedule(static)
    for (std::int64_t n = 0; n < N; ++n) {
#pragma omp simd
        for (std::int64_t f = n * F; f < (n + 1) * F; ++f) {
            const float r = relu(to_float(x[f]));
            out[f] = from_float<T>(r * r);
        }
    }
}

template <typename T>
void relu2_bwd_rows(const T* da, const T* x, T* dx, std::int64_t N, std::int64_t F) {
#pragma omp parallel for schedule(static)
    for (std::int64_t n = 0; n < N; ++n) {
#pragma omp simd
        for (std::int64_t f = n * F; f < (n + 1) * F; ++f)
            dx[f] = from_float<T>(2.0f * relu(to_float(x[f])) * to_float(da[f]));
    }
}

}  // namespace

void swiglu_fwd_cpu(std::uintptr_t gate_up, std::uintptr_t out, std::int64_t N, std::int64_t F, DType dtype) {
    check_sizes("swiglu_fwd_cpu", N, F);
    dispatch_cpu_dtype(dtype, "swiglu_fwd_cpu", [&](auto t) {
        using T = decltype(t);
        swiglu_fwd_rows<T>(ptr<const T>(gate_up), ptr<T>(out), N, F);
    });
}

void swiglu_bwd_cpu(std::uintptr_t da, std::uintptr_t gate_up, std::uintptr_t dgate_up, std::int64_t N,
                    std::int64_t F, DType dtype) {
    check_sizes("swiglu_bwd_cpu", N, F);
    dispatch_cpu_dtype(dtype, "swiglu_bwd_cpu", [&](auto t) {
        using T = decltype(t);
        swiglu_bwd_rows<T>(ptr<const T>(da), ptr<const T>(gate_up), ptr<T>(dgate_up), N, F);
    });
}

void relu2_fwd_cpu(std::uintptr_t x, std::uintptr_t out, std::int64_t N, std::int64_t F, DType dtype) {
    check_sizes("relu2_fwd_cpu", N, F);
    dispatch_cpu_dtype(dtype, "relu2_fwd_cpu", [&](auto t) {
        using T = decltype(t);
        relu2_fwd_rows<T>(ptr<const T>(x), ptr<T>(out), N, F);
    });
}

void relu2_bwd_cpu(std::uintptr_t da, std::uintptr_t x, std::uintptr_t dx, std::int64_t N, std::int64_t F,
                   DType dtype) {
    check_sizes("relu2_bwd_cpu", N, F);
    dispatch_cpu_dtype(dtype, "relu2_bwd_cpu", [&](auto t) {
        using T = decltype(t);
        relu2_bwd_rows<T>(ptr<const T>(da), ptr<const T>(x), ptr<T>(dx), N, F);
    });
}

}  // namespace nanolm

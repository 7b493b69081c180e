// Runs every CUDA kernel of csrc/*.cu once, at small shapes, through the SIMT emulation, on
// heap buffers of exactly the tensors' sizes: built with -fsanitize=address or =thread (and
// NANOLM_SIM_THREADS for thread) it is the sanitizer job of tests/test_cuda_sim_sanitizers.py.
// Exit status 0 when every launch succeeded and every output is finite; the sanitizers add
// their own reports (and exit status) on top.
//   usage: sanitize_driver [layernorm|cross_entropy|adamw|attention]...   (default: all)
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "../adamw.h"
#include "../attention.h"
#include "../common.h"
#include "../cross_entropy.h"
#include "../layernorm.h"

namespace {

using nanolm::DType;
using nanolm::require;
std::mt19937 rng(1234);

std::uintptr_t addr(const void* p) { return reinterpret_cast<std::uintptr_t>(p); }

template <typename T>
std::vector<T> random_vector(std::size_t n, float scale = 1.f, float shift = 0.f) {
    std::normal_distribution<float> normal(0.f, 1.f);
    std::vector<T> v(n);
    for (auto& x : v) x = T(normal(rng) * scale + shift);
    return v;
}

template <typename T>
std::vector<T> nan_vector(std::size_t n) {
    std::vector<T> v(n);
    std::memset(v.data(), 0xff, n * sizeof(T));  // NaN in fp32, bf16 and fp16
    return v;
}

template <typename T>
void require_finite(const char* what, const std::vector<T>& v) {
    for (std::size_t i = 0; i < v.size(); ++i)
        require(std::isfinite(float(v[i])), std::string(what) + ": element " + std::to_string(i) + " is not finite");
}

// Dropout on (enabled) or off: every kernel runs both instantiations.
nanolm::DropoutParams dropout_of(bool on) {
    return on ? nanolm::DropoutParams{1234, 56, 858993459u, 1.25f, true} : nanolm::DropoutParams{};  // p = 0.2
}

template <typename T>
void layernorm(DType dtype, std::int64_t N, std::int64_t C, bool drop = false) {
    auto x = random_vector<T>(N * C), res = random_vector<T>(N * C), w = random_vector<T>(C, 0.2f, 1.f),
         b = random_vector<T>(C), dy = random_vector<T>(N * C), dres = random_vector<T>(N * C);
    auto y = nan_vector<T>(N * C), res_out = nan_vector<T>(N * C), dx = nan_vector<T>(N * C);
    auto mean = nan_vector<float>(N), rstd = nan_vector<float>(N), dw = nan_vector<float>(C), db = nan_vector<float>(C);
    nanolm::layernorm_fwd_cuda(addr(x.data()), addr(res.data()), addr(res_out.data()), addr(w.data()),
                               addr(b.data()), addr(y.data()), addr(mean.data()), addr(rstd.data()), N, C, 1e-5,
                               dtype, dropout_of(drop), 0);
    auto workspace = nan_vector<float>(2 * nanolm::layernorm_bwd_workspace_rows_cuda(N, C) * C);
    auto dbranch = nan_vector<T>(N * C);
    nanolm::layernorm_bwd_cuda(addr(dy.data()), addr(res_out.data()), addr(w.data()), addr(mean.data()),
                               addr(rstd.data()), addr(dres.data()), addr(dx.data()), addr(dw.data()),
                               addr(db.data()), addr(workspace.data()), N, C, dtype,
                               drop ? addr(dbranch.data()) : 0, dropout_of(drop), 0);
    if (drop) require_finite("layernorm dbranch", dbranch);
    for (auto* v : {&y, &res_out, &dx}) require_finite("layernorm", *v);
    for (auto* v : {&mean, &rstd, &dw, &db}) require_finite("layernorm stats", *v);
}

// RMSNorm on the same kernels: the RMS instantiations, with a weight and parameter-free.
template <typename T>
void rmsnorm(DType dtype, std::int64_t N, std::int64_t C, bool drop, bool with_weight) {
    auto x = random_vector<T>(N * C), res = random_vector<T>(N * C), w = random_vector<T>(C, 0.2f, 1.f),
         dy = random_vector<T>(N * C), dres = random_vector<T>(N * C);
    auto y = nan_vector<T>(N * C), res_out = nan_vector<T>(N * C), dx = nan_vector<T>(N * C);
    auto rstd = nan_vector<float>(N), dw = nan_vector<float>(with_weight ? C : 0);
    const std::uintptr_t weight = with_weight ? addr(w.data()) : 0;
    nanolm::rmsnorm_fwd_cuda(addr(x.data()), addr(res.data()), addr(res_out.data()), weight, addr(y.data()),
                             addr(rstd.data()), N, C, 1e-5, dtype, dropout_of(drop), 0);
    auto workspace = nan_vector<float>(with_weight ? nanolm::layernorm_bwd_workspace_rows_cuda(N, C) * C : 0);
    auto dbranch = nan_vector<T>(N * C);
    nanolm::rmsnorm_bwd_cuda(addr(dy.data()), addr(res_out.data()), weight, addr(rstd.data()), addr(dres.data()),
                             addr(dx.data()), with_weight ? addr(dw.data()) : 0,
                             with_weight ? addr(workspace.data()) : 0, N, C, dtype,
                             drop ? addr(dbranch.data()) : 0, dropout_of(drop), 0);
    if (drop) require_finite("rmsnorm dbranch", dbranch);
    for (auto* v : {&y, &res_out, &dx}) require_finite("rmsnorm", *v);
    for (auto* v : {&rstd, &dw}) require_finite("rmsnorm stats", *v);
}

template <typename T>
void cross_entropy(DType dtype, std::int64_t N, std::int64_t V, std::int64_t Vp) {
    auto logits = random_vector<T>(N * Vp, 3.f);
    std::vector<std::int64_t> targets(N);
    for (std::int64_t i = 0; i < N; ++i) targets[i] = i == 1 ? -100 : (i * 7919) % V;
    auto losses = nan_vector<float>(N);
    auto dlogits = nan_vector<T>(N * Vp);
    nanolm::cross_entropy_fwd_cuda(addr(logits.data()), addr(targets.data()), addr(losses.data()),
                                   addr(dlogits.data()), N, Vp, V, -100, 1e-3, 0.5, dtype, 0);
    require_finite("cross_entropy losses", losses);
    require_finite("cross_entropy dlogits", dlogits);
    // the vocabulary-parallel pair on the same rows as one shard starting at id 100
    auto stats = nan_vector<float>(3 * N);
    nanolm::cross_entropy_stats_cuda(addr(logits.data()), addr(targets.data()), addr(stats.data()), N, Vp, V, 100,
                                     dtype, 0);
    require_finite("cross_entropy_stats", stats);
    std::vector<float> lse(N, 9.f);
    nanolm::cross_entropy_grad_cuda(addr(logits.data()), addr(targets.data()), addr(lse.data()), N, Vp, V, 100, -100,
                                    1e-3, 0.5, dtype, 0);
    require_finite("cross_entropy_grad", logits);
}

void adamw(std::int64_t n, std::int64_t offset) {
    auto p = random_vector<float>(n + offset), g = random_vector<float>(n + offset),
         m = random_vector<float>(n + offset), v = random_vector<float>(n + offset, 0.f, 1.f);
    const nanolm::AdamWScalars s{0.1f, 0.95f, 0.05f, 1e-8f, 0.9999f, 1e-3f, 0.5f, 0.7f};
    nanolm::adamw_step_cuda(addr(p.data() + offset), addr(g.data() + offset), addr(m.data() + offset),
                            addr(v.data() + offset), n, n / 2, s, nanolm::DType::float32, 0);
    for (auto* x : {&p, &m, &v}) require_finite("adamw", *x);
    auto partials = nan_vector<float>(nanolm::sum_of_squares_partials_cuda());
    float out = NAN;
    nanolm::sum_of_squares_cuda(addr(g.data() + offset), n, addr(partials.data()), addr(&out),
                                nanolm::DType::float32, 0);
    require(std::isfinite(out), "sum_of_squares: not finite");
}

template <typename T>
// q, k, v views of one packed (B, T, nh + 2 * nkv, hs) buffer, as the model passes them.
void attention(DType dtype, std::int64_t B, std::int64_t T_len, std::int64_t nh, std::int64_t hs, bool drop = false,
               std::int64_t nkv = 0) {
    nkv = nkv ? nkv : nh;
    const std::int64_t width = (nh + 2 * nkv) * hs, n = B * T_len * nh * hs, n_qkv = B * T_len * width;
    const std::array<std::int64_t, 3> qkv_strides{T_len * width, width, hs}, strides{T_len * nh * hs, nh * hs, hs};
    auto qkv = random_vector<T>(n_qkv), dout = random_vector<T>(n);
    auto o = nan_vector<T>(n), dqkv = nan_vector<T>(n_qkv);
    auto lse = nan_vector<float>(B * nh * T_len), delta = nan_vector<float>(B * nh * T_len);
    const std::uintptr_t q = addr(qkv.data()), k = q + nh * hs * sizeof(T), v = k + nkv * hs * sizeof(T);
    const std::uintptr_t dq = addr(dqkv.data()), dk = dq + nh * hs * sizeof(T), dv = dk + nkv * hs * sizeof(T);
    const double scale = 1.0 / std::sqrt(double(hs));
    nanolm::attention_fwd_cuda({q, k, v, addr(o.data()), addr(lse.data()), qkv_strides, qkv_strides, qkv_strides,
                                strides, B, T_len, nh, nkv, hs, scale, dtype, dropout_of(drop)}, 0);
    nanolm::attention_bwd_cuda({addr(dout.data()), q, k, v, addr(o.data()), addr(lse.data()), addr(delta.data()), dq,
                                dk, dv, strides, qkv_strides, qkv_strides, qkv_strides, strides, qkv_strides,
                                qkv_strides, qkv_strides, B, T_len, nh, nkv, hs, scale, dtype, dropout_of(drop)}, 0);
    require_finite("attention o", o);
    require_finite("attention lse", lse);
    require_finite("attention dq, dk, dv", dqkv);
}

const std::map<std::string, std::function<void()>> kOps = {
    {"layernorm", [] {
         layernorm<float>(DType::float32, 5, 64);              // a warp per row, float4 loads
         layernorm<__nv_bfloat16>(DType::bfloat16, 3, 777);     // 64 threads per row, scalar loads
         layernorm<float>(DType::float32, 5, 64, true);        // the dropout instantiations
         layernorm<__nv_bfloat16>(DType::bfloat16, 3, 777, true);
         rmsnorm<float>(DType::float32, 5, 64, false, true);   // RMSNorm: warp rows, float4, a weight
         rmsnorm<__nv_bfloat16>(DType::bfloat16, 3, 777, true, false);  // parameter-free, dropout, scalar
     }},
    {"cross_entropy", [] {
         cross_entropy<float>(DType::float32, 3, 777, 800);
         cross_entropy<__nv_bfloat16>(DType::bfloat16, 2, 1001, 1003);  // rows start misaligned
     }},
    {"adamw", [] {
         adamw(1003, 1);  // scalar head, float4 body, scalar tail; unaligned sum of squares
         adamw(260, 0);   // aligned: float4 sum of squares
     }},
    {"attention", [] {
         attention<__nv_bfloat16>(DType::bfloat16, 1, 80, 1, 64);  // a partial second block
         attention<__half>(DType::float16, 1, 40, 1, 128);
         attention<__nv_bfloat16>(DType::bfloat16, 1, 80, 1, 64, true);  // dropout on P
         attention<__nv_bfloat16>(DType::bfloat16, 1, 80, 3, 64, true, 1);  // a group of 3 query heads (MQA)
     }},
};

}  // namespace

int main(int argc, char** argv) {
    std::vector<std::string> ops(argv + 1, argv + argc);
    if (ops.empty())
        for (const auto& op : kOps) ops.push_back(op.first);
    for (const std::string& op : ops) {
        const auto it = kOps.find(op);
        if (it == kOps.end()) {
            std::fprintf(stderr, "unknown op %s\n", op.c_str());
            return 2;
        }
        try {
            it->second();
        } catch (const std::exception& e) {
            std::fprintf(stderr, "%s: %s\n", op.c_str(), e.what());
            return 1;
        }
        std::printf("%s: ok\n", op.c_str());
    }
    return 0;
}

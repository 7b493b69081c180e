// Causal flash attention launchers: forward (o, lse) and backward (dq, dk, dv).
// See nanolm/backends/torch_ref.py for the math and kernels/attention.py for the algorithm.
// q, k, v, dq, dk, dv are (B, T, nh, hs) with unit stride over hs and any other strides
// (views into a fused (B, T, 3, nh, hs) buffer); strides are given in elements, (b, t, h).
// o, do are contiguous (B, T, nh, hs); lse is (B, nh, T) float32.
#pragma once
#include <cstdint>

namespace nanolm {

// CPU
void attention_fwd_cpu(std::uintptr_t q, std::uintptr_t k, std::uintptr_t v,  // float32
                       std::uintptr_t o, std::uintptr_t lse,
                       int64_t B, int64_t T, int64_t nh, int64_t hs,
                       int64_t sqb, int64_t sqt, int64_t sqh,
                       int64_t skb, int64_t skt, int64_t skh,
                       int64_t svb, int64_t svt, int64_t svh,
                       double scale);

void attention_bwd_cpu(std::uintptr_t dout, std::uintptr_t q, std::uintptr_t k, std::uintptr_t v,
                       std::uintptr_t o, std::uintptr_t lse,
                       std::uintptr_t dq, std::uintptr_t dk, std::uintptr_t dv,
                       int64_t B, int64_t T, int64_t nh, int64_t hs,
                       int64_t sqb, int64_t sqt, int64_t sqh,
                       int64_t skb, int64_t skt, int64_t skh,
                       int64_t svb, int64_t svt, int64_t svh,
                       int64_t sdqb, int64_t sdqt, int64_t sdqh,
                       int64_t sdkb, int64_t sdkt, int64_t sdkh,
                       int64_t sdvb, int64_t sdvt, int64_t sdvh,
                       double scale);

}  // namespace nanolm

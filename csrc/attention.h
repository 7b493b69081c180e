// Causal flash attention launchers: forward (o, lse) and backward (dq, dk, dv).
// See nanolm/ops/attention.py for the math and kernels/attention.py for the algorithm.
// q, k, v, dq, dk, dv are (B, T, nh, hs) with unit stride over hs and any other strides
// (views into a fused (B, T, 3, nh, hs) buffer); strides are given in elements, (b, t, h).
// o, do are contiguous (B, T, nh, hs); lse is (B, nh, T) float32.
#pragma once
#include <array>
#include <cstdint>

#include "common.h"
#include "dropout.h"

namespace nanolm {

// ----------------------------------------------------------------------------- CPU (fp32, bf16, fp16)
// Whether the bf16 forward uses AVX512-BF16 dot products (compiled in, and this CPU has them).
bool attention_cpu_bf16_dot();

// Strides in elements: s{q,k,v,dq,dk,dv}{b,t,h} are the (batch, seq, head) strides. dtype is
// that of q, k, v, o, do, dq, dk, dv: float32, bfloat16 or float16; lse is float32.
// q, o, do, dq have nh heads; k, v, dk, dv have nkv (dividing nh): query head h reads K/V head
// h / (nh / nkv) (grouped-query attention; nkv == nh is multi-head attention).
// With dropout enabled, P is dropped (O = dropout(P) V) and the backward regenerates its mask.
void attention_fwd_cpu(std::uintptr_t q, std::uintptr_t k, std::uintptr_t v,
                       std::uintptr_t o, std::uintptr_t lse,
                       int64_t B, int64_t T, int64_t nh, int64_t nkv, int64_t hs,
                       int64_t sqb, int64_t sqt, int64_t sqh,
                       int64_t skb, int64_t skt, int64_t skh,
                       int64_t svb, int64_t svt, int64_t svh,
                       double scale, DType dtype, const DropoutParams& dropout);

void attention_bwd_cpu(std::uintptr_t dout, std::uintptr_t q, std::uintptr_t k, std::uintptr_t v,
                       std::uintptr_t o, std::uintptr_t lse,
                       std::uintptr_t dq, std::uintptr_t dk, std::uintptr_t dv,
                       int64_t B, int64_t T, int64_t nh, int64_t nkv, int64_t hs,
                       int64_t sqb, int64_t sqt, int64_t sqh,
                       int64_t skb, int64_t skt, int64_t skh,
                       int64_t svb, int64_t svt, int64_t svh,
                       int64_t sdqb, int64_t sdqt, int64_t sdqh,
                       int64_t sdkb, int64_t sdkt, int64_t sdkh,
                       int64_t sdvb, int64_t sdvt, int64_t sdvh,
                       double scale, DType dtype, const DropoutParams& dropout);

#ifdef NANOLM_WITH_CUDA
// ----------------------------------------------------------------------------- CUDA (bf16, fp16)
// Pointers are device addresses (tensor.data_ptr()); strides are (batch, seq, head) strides in
// elements of a (B, T, heads, hs) tensor whose hs stride is 1: q, o, dout, dq have nh heads, k, v,
// dk, dv nkv (dividing nh; query head h reads K/V head h / (nh / nkv)). lse and delta are (B, nh, T) fp32.
// dtype is bfloat16 or float16. Throws std::invalid_argument for another dtype or an unsupported
// head size (64 and 128 are supported) and std::runtime_error for a CUDA error.
struct AttentionCudaFwdArgs {
    std::uintptr_t q, k, v, o, lse;
    std::array<std::int64_t, 3> q_strides, k_strides, v_strides, o_strides;
    std::int64_t B, T, nh, nkv, hs;
    double scale;
    DType dtype;
    DropoutParams dropout;  // of P (disabled: no dropout); the backward's must be the forward's
};

struct AttentionCudaBwdArgs {
    std::uintptr_t dout, q, k, v, o, lse, delta, dq, dk, dv;
    std::array<std::int64_t, 3> dout_strides, q_strides, k_strides, v_strides, o_strides;
    std::array<std::int64_t, 3> dq_strides, dk_strides, dv_strides;
    std::int64_t B, T, nh, nkv, hs;
    double scale;
    DType dtype;
    DropoutParams dropout;  // of P (disabled: no dropout); the backward's must be the forward's
};

void attention_fwd_cuda(const AttentionCudaFwdArgs& args, std::uintptr_t stream);
// delta is an fp32 (B, nh, T) scratch buffer; dq, dk, dv are overwritten.
void attention_bwd_cuda(const AttentionCudaBwdArgs& args, std::uintptr_t stream);
#endif  // NANOLM_WITH_CUDA

}  // namespace nanolm

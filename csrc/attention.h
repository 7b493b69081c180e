// Causal flash attention launchers (see csrc/attention.cu for the CUDA kernels).
#pragma once
#include <array>
#include <cstdint>

namespace nanolm {

// CUDA
// Pointers are device addresses (tensor.data_ptr()); strides are (batch, seq, head) strides in
// elements of a (B, T, nh, hs) tensor whose hs stride is 1. lse and delta are (B, nh, T) fp32.
// bf16 selects __nv_bfloat16, otherwise __half. Throws std::invalid_argument for an unsupported
// head size (64 and 128 are supported) and std::runtime_error for a CUDA error.
struct AttentionCudaFwdArgs {
    std::uintptr_t q, k, v, o, lse;
    std::array<std::int64_t, 3> q_strides, k_strides, v_strides, o_strides;
    std::int64_t B, T, nh, hs;
    double scale;
    bool bf16;
};

struct AttentionCudaBwdArgs {
    std::uintptr_t dout, q, k, v, o, lse, delta, dq, dk, dv;
    std::array<std::int64_t, 3> dout_strides, q_strides, k_strides, v_strides, o_strides;
    std::array<std::int64_t, 3> dq_strides, dk_strides, dv_strides;
    std::int64_t B, T, nh, hs;
    double scale;
    bool bf16;
};

void attention_fwd_cuda(const AttentionCudaFwdArgs& args, std::uintptr_t stream);
// delta is an fp32 (B, nh, T) scratch buffer; dq, dk, dv are overwritten.
void attention_bwd_cuda(const AttentionCudaBwdArgs& args, std::uintptr_t stream);
// end CUDA

}  // namespace nanolm

// MLP activation launchers (SwiGLU, ReLU^2), forward and backward. Pointers are tensor.data_ptr()
// values of contiguous tensors; the CPU kernels take float32, bfloat16 or float16 (dtype).
#pragma once
#include <cstdint>

#include "common.h"

namespace nanolm {

// out (N, F) = silu(gate) * up, gate_up (N, 2F) = [gate | up] per row.
void swiglu_fwd_cpu(std::uintptr_t gate_up, std::uintptr_t out, std::int64_t N, std::int64_t F, DType dtype);
// dgate_up (N, 2F) = [da * up * silu'(gate) | da * silu(gate)].
void swiglu_bwd_cpu(std::uintptr_t da, std::uintptr_t gate_up, std::uintptr_t dgate_up, std::int64_t N,
                    std::int64_t F, DType dtype);
// out (N, F) = relu(x)^2.
void relu2_fwd_cpu(std::uintptr_t x, std::uintptr_t out, std::int64_t N, std::int64_t F, DType dtype);
// dx (N, F) = 2 relu(x) da.
void relu2_bwd_cpu(std::uintptr_t da, std::uintptr_t x, std::uintptr_t dx, std::int64_t N, std::int64_t F,
                   DType dtype);

}  // namespace nanolm

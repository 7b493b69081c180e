// AdamW update and deterministic sum of squares over flat float32 buffers (see adamw.cu,
// adamw_cpu.cpp); each launcher takes the buffers' dtype and refuses all but float32. The host computes the per-step scalars once:
//   decay_factor = 1 - lr * weight_decay   (applied to elements [0, decay_numel) only)
//   step_size    = lr / (1 - beta1^step)
//   bc2_sqrt     = sqrt(1 - beta2^step)
#pragma once
#include <cstdint>

#include "common.h"

namespace nanolm {

struct AdamWScalars {
    float one_minus_beta1, beta2, one_minus_beta2, eps;
    float decay_factor, step_size, bc2_sqrt;
    float grad_scale;  // the clip coefficient, folded into the gradient read
};

void adamw_step_cpu(std::uintptr_t param, std::uintptr_t grad, std::uintptr_t exp_avg,
                    std::uintptr_t exp_avg_sq, int64_t numel, int64_t decay_numel,
                    const AdamWScalars& s, DType dtype);
// Returns sum(x^2) accumulated in double over fixed 4096-element chunks, reduced in order.
double sum_of_squares_cpu(std::uintptr_t x, int64_t numel, DType dtype);

#ifdef NANOLM_WITH_CUDA
void adamw_step_cuda(std::uintptr_t param, std::uintptr_t grad, std::uintptr_t exp_avg,
                     std::uintptr_t exp_avg_sq, int64_t numel, int64_t decay_numel,
                     const AdamWScalars& s, DType dtype, std::uintptr_t stream);
// Writes sum(x^2) to out (one float); partials needs sum_of_squares_partials_cuda() floats.
void sum_of_squares_cuda(std::uintptr_t x, int64_t numel, std::uintptr_t partials,
                         std::uintptr_t out, DType dtype, std::uintptr_t stream);
int64_t sum_of_squares_partials_cuda();
#endif

}  // namespace nanolm

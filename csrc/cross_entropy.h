// Cross-entropy forward with its gradient (see cross_entropy.cu / cross_entropy_cpu.cpp).
#pragma once
#include <cstdint>

#include "common.h"

namespace nanolm {

// logits, dlogits (N, Vp) row-contiguous (dlogits may equal logits: in place); targets (N,)
// int64; losses (N,) float32. dtype: float32 or bfloat16.
void cross_entropy_fwd_cuda(std::uintptr_t logits, std::uintptr_t targets, std::uintptr_t losses,
                            std::uintptr_t dlogits, std::int64_t N, std::int64_t Vp,
                            std::int64_t V, std::int64_t ignore_index, double z_loss,
                            double grad_scale, DType dtype, std::uintptr_t stream);

// float32 only.
void cross_entropy_fwd_cpu(std::uintptr_t logits, std::uintptr_t targets, std::uintptr_t losses,
                           std::uintptr_t dlogits, std::int64_t N, std::int64_t Vp,
                           std::int64_t V, std::int64_t ignore_index, double z_loss,
                           double grad_scale);

}  // namespace nanolm

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

// The vocab-parallel pair on one vocabulary shard (see cross_entropy.cu), fp32 or bf16 logits:
// stats (N, 3) float32; grad in place over logits given lse (N,) float32.
void cross_entropy_stats_cuda(std::uintptr_t logits, std::uintptr_t targets, std::uintptr_t stats,
                              std::int64_t N, std::int64_t Vp, std::int64_t V, std::int64_t vocab_start,
                              DType dtype, std::uintptr_t stream);
void cross_entropy_grad_cuda(std::uintptr_t logits, std::uintptr_t targets, std::uintptr_t lse,
                             std::int64_t N, std::int64_t Vp, std::int64_t V, std::int64_t vocab_start,
                             std::int64_t ignore_index, double z_loss, double grad_scale,
                             DType dtype, std::uintptr_t stream);

// dtype: float32, bfloat16 or float16; losses are float32 either way.
void cross_entropy_fwd_cpu(std::uintptr_t logits, std::uintptr_t targets, std::uintptr_t losses,
                           std::uintptr_t dlogits, std::int64_t N, std::int64_t Vp,
                           std::int64_t V, std::int64_t ignore_index, double z_loss,
                           double grad_scale, DType dtype);

// Vocab-parallel cross-entropy (see cross_entropy_cpu.cpp): logits (N, Vp) are one vocabulary
// shard starting at id vocab_start, the first V (0 <= V <= Vp) real; dtype float32, bfloat16 or
// float16 (statistics in fp32 either way).
// stats (N, 3) float32 = per row (max, sum exp(x - max), target logit or 0).
void cross_entropy_stats_cpu(std::uintptr_t logits, std::uintptr_t targets, std::uintptr_t stats,
                             std::int64_t N, std::int64_t Vp, std::int64_t V, std::int64_t vocab_start,
                             DType dtype);
// In place: logits become dlogits, given the global lse (N,) float32.
void cross_entropy_grad_cpu(std::uintptr_t logits, std::uintptr_t targets, std::uintptr_t lse,
                            std::int64_t N, std::int64_t Vp, std::int64_t V, std::int64_t vocab_start,
                            std::int64_t ignore_index, double z_loss, double grad_scale, DType dtype);

}  // namespace nanolm

// QK-norm + RoPE launchers over the packed qkv projection (B, T, (H + 2*Hkv) * D), laid out
// [q heads | k heads | v heads]. Pointers are tensor.data_ptr() values of contiguous tensors;
// the CPU kernels take float32, bfloat16 or float16 (dtype). cos, sin: (T, D/2) float32 tables
// of the positions' angles (computed by the caller); rstd: (B, T, H + Hkv) float32.
#pragma once
#include <cstdint>

#include "common.h"

namespace nanolm {

// out = rotate(normalise(q, k)), v copied; writes rstd (all 1 without qk_norm).
void qk_norm_rope_fwd_cpu(std::uintptr_t qkv, std::uintptr_t out, std::uintptr_t rstd, std::uintptr_t cos,
                          std::uintptr_t sin, std::int64_t B, std::int64_t T, std::int64_t H, std::int64_t Hkv,
                          std::int64_t D, bool qk_norm, double eps, DType dtype);
// dqkv from dout, the forward's input qkv and its rstd.
void qk_norm_rope_bwd_cpu(std::uintptr_t dout, std::uintptr_t qkv, std::uintptr_t rstd, std::uintptr_t cos,
                          std::uintptr_t sin, std::uintptr_t dqkv, std::int64_t B, std::int64_t T, std::int64_t H,
                          std::int64_t Hkv, std::int64_t D, bool qk_norm, DType dtype);

}  // namespace nanolm

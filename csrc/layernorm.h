// LayerNorm launchers (forward with optional fused residual add, backward with optional
// residual gradient). Pointers are tensor.data_ptr() values; 0 means "absent" for the optional
// ones (residual, residual_out, bias, dresidual). The CPU kernels take float32, bfloat16 or
// float16; the CUDA ones float32 or bfloat16 (dtype). mean, rstd, dweight, dbias are always float32.
#pragma once
#include <cstdint>

#include "common.h"
#include "dropout.h"

namespace nanolm {

// y = (h - mean) * rstd * weight + bias with h = x (+ residual, stored to residual_out);
// with dropout enabled h = dropout(x) (+ residual, which may then be absent), stored to residual_out.
void layernorm_fwd_cpu(std::uintptr_t x, std::uintptr_t residual, std::uintptr_t residual_out,
                       std::uintptr_t weight, std::uintptr_t bias, std::uintptr_t y,
                       std::uintptr_t mean, std::uintptr_t rstd, std::int64_t N, std::int64_t C,
                       double eps, DType dtype, const DropoutParams& dropout);

// dx = rstd * (w*dy - (xhat * c1 + c2)) (+ dresidual); dweight = sum_rows dy*xhat; dbias = sum_rows dy.
// With dropout enabled also dbranch = dropout(dx), the same mask as the forward's.
void layernorm_bwd_cpu(std::uintptr_t dy, std::uintptr_t x, std::uintptr_t weight,
                       std::uintptr_t mean, std::uintptr_t rstd, std::uintptr_t dresidual,
                       std::uintptr_t dx, std::uintptr_t dweight, std::uintptr_t dbias,
                       std::int64_t N, std::int64_t C, DType dtype,
                       std::uintptr_t dbranch, const DropoutParams& dropout);

// RMSNorm, on the same kernels: y = h * rstd * weight, rstd = 1/sqrt(mean(h^2) + eps), h as in
// layernorm_fwd_cpu; weight may be 0 (parameter-free: y = h * rstd). No mean, no bias.
void rmsnorm_fwd_cpu(std::uintptr_t x, std::uintptr_t residual, std::uintptr_t residual_out,
                     std::uintptr_t weight, std::uintptr_t y, std::uintptr_t rstd, std::int64_t N,
                     std::int64_t C, double eps, DType dtype, const DropoutParams& dropout);

// dx = rstd * (w*dy - xhat * c1) (+ dresidual), xhat = x * rstd, c1 = mean(xhat * w*dy);
// dweight = sum_rows dy*xhat. weight and dweight are both 0 without a weight (w*dy reads dy).
void rmsnorm_bwd_cpu(std::uintptr_t dy, std::uintptr_t x, std::uintptr_t weight, std::uintptr_t rstd,
                     std::uintptr_t dresidual, std::uintptr_t dx, std::uintptr_t dweight, std::int64_t N,
                     std::int64_t C, DType dtype, std::uintptr_t dbranch, const DropoutParams& dropout);

#ifdef NANOLM_WITH_CUDA
// Largest row length the CUDA kernels take (each thread caches at most 16 values of a row).
constexpr std::int64_t kLayerNormCudaMaxC = 16384;

void layernorm_fwd_cuda(std::uintptr_t x, std::uintptr_t residual, std::uintptr_t residual_out,
                        std::uintptr_t weight, std::uintptr_t bias, std::uintptr_t y,
                        std::uintptr_t mean, std::uintptr_t rstd, std::int64_t N, std::int64_t C,
                        double eps, DType dtype, const DropoutParams& dropout,
                        std::uintptr_t stream);

// workspace: 2 * layernorm_bwd_workspace_rows_cuda(N, C) * C float32 values (partial dw, db).
std::int64_t layernorm_bwd_workspace_rows_cuda(std::int64_t N, std::int64_t C);
void layernorm_bwd_cuda(std::uintptr_t dy, std::uintptr_t x, std::uintptr_t weight,
                        std::uintptr_t mean, std::uintptr_t rstd, std::uintptr_t dresidual,
                        std::uintptr_t dx, std::uintptr_t dweight, std::uintptr_t dbias,
                        std::uintptr_t workspace, std::int64_t N, std::int64_t C, DType dtype,
                        std::uintptr_t dbranch, const DropoutParams& dropout, std::uintptr_t stream);

// RMSNorm on the same kernels (as rmsnorm_fwd_cpu / rmsnorm_bwd_cpu). workspace: P * C float32
// values, P = layernorm_bwd_workspace_rows_cuda(N, C), with a weight; weight, dweight and
// workspace are all 0 without one.
void rmsnorm_fwd_cuda(std::uintptr_t x, std::uintptr_t residual, std::uintptr_t residual_out,
                      std::uintptr_t weight, std::uintptr_t y, std::uintptr_t rstd, std::int64_t N,
                      std::int64_t C, double eps, DType dtype, const DropoutParams& dropout,
                      std::uintptr_t stream);
void rmsnorm_bwd_cuda(std::uintptr_t dy, std::uintptr_t x, std::uintptr_t weight, std::uintptr_t rstd,
                      std::uintptr_t dresidual, std::uintptr_t dx, std::uintptr_t dweight,
                      std::uintptr_t workspace, std::int64_t N, std::int64_t C, DType dtype,
                      std::uintptr_t dbranch, const DropoutParams& dropout, std::uintptr_t stream);
#endif

}  // namespace nanolm

// LayerNorm forward and backward on CUDA, fp32 or bf16 storage, fp32 math; the residual add
// ("residual_out = x + residual; y = layer_norm(residual_out)") fused into the forward and its
// gradient ("dx += dresidual") into the backward, as llm.c does, so a transformer block reads
// the residual stream once.
//
//   forward   h = x (+ residual);  mean = sum(h)/C;  rstd = 1/sqrt(sum((h-mean)^2)/C + eps)
//             y = (h - mean) * rstd * w + b
//   backward  xhat = (x - mean) * rstd;  wdy = w * dy
//             c1 = sum(xhat * wdy)/C;  c2 = sum(wdy)/C
//             dx = (wdy - (xhat * c1 + c2)) * rstd (+ dresidual)
//             dw = sum_rows(dy * xhat);  db = sum_rows(dy)
//
// RMSNorm is the RMS = true instantiation of the same kernels (as flash-attention's
// ops/triton/layer_norm.py does it): mean = 0, not reduced or stored, so rstd = 1/sqrt(sum(h^2)/C
// + eps); no bias; c2 = 0 and no db in the backward; a null weight (parameter-free) reads as ones
// and its dw is not written. The RMS = false instantiations are the LayerNorm kernels as they were.
//
// Dropout of the branch (DROPOUT, csrc/dropout.h): h = x * factor (+ residual, which may then be
// absent: the embedding sum), always stored to residual_out; the backward regenerates the
// factors and also writes dbranch = dx * factor (N*C*s more bytes). One Philox call per 4
// elements on the vectorized path (a thread's pieces start on multiples of 4), per element
// on the scalar one. DROPOUT = false instantiations are the kernels without dropout.
//
// Memory traffic (s = bytes per x element, 4 for fp32, 2 for bf16; weights are read once per
// row group and stay in L1/L2, counted once):
//   forward   reads N*C*s (+ N*C*s residual) + 2*C*s, writes N*C*s (+ N*C*s residual_out) + 8N
//   backward  reads 2*N*C*s (dy, x) (+ N*C*s dresidual) + C*s + 8N, writes N*C*s (dx) + 8C,
//             plus 2*P*C*4 written and read again for the partial dw/db (P = rows of the
//             workspace, 1-8 per SM by C; at N = 16k, C = 768 bf16 about 17% extra bytes).
// RMSNorm: 4N instead of 8N statistics bytes, no bias, no db (and no dw without a weight).
// Memory-bound: a handful of FLOPs per byte.
//
// Layout: a row is owned by TPR threads, TPR = the smallest power of two in [32, 1024] with
// TPR * ELEMS >= C, ELEMS being how many values of a row each thread keeps in registers
// (32 forward, 16 backward, where it also holds dy and its dw/db partial sums). TPR == 32 is
// one warp per row and 4 rows per block (blockDim (32, 4)); larger TPR is one block per row.
// Thread t of a row handles the VEC-wide pieces starting at (it * TPR + t) * VEC: coalesced,
// and with VEC = 16 bytes / sizeof(T) one 16-byte load each. The launcher takes VEC = 1
// (scalar loads, still coalesced) when C is not a multiple of the vector width or a pointer is
// not 16-byte aligned, because then rows do not start on 16-byte boundaries.
//
// dw/db are deterministic: each backward block walks a fixed set of rows (blockIdx.x + k *
// gridDim.x), keeps per-column sums in registers, combines its warps in a fixed order and
// writes one row of a (P, C) fp32 workspace; a second kernel sums the P rows per column in a
// fixed order. P depends only on N, C and the GPU's SM count, so runs are bit-identical.
#include <cuda_bf16.h>

#include <algorithm>
#include <type_traits>

#include "cuda_common.h"
#include "dropout.h"
#include "layernorm.h"

namespace nanolm {
namespace {

constexpr int kFwdElems = 32;
constexpr int kBwdElems = 16;
constexpr int kRowsPerWarpBlock = 4;  // rows per block when a warp owns a row
constexpr int kReduceRows = 8;        // blockDim.y of the workspace reduction

__host__ __device__ constexpr int rows_per_block(int tpr) { return tpr == 32 ? kRowsPerWarpBlock : 1; }

template <typename T, int VEC>
__device__ __forceinline__ void load(const T* p, float (&out)[VEC]) {
    const Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
    for (int k = 0; k < VEC; ++k) out[k] = to_float(pk.v[k]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store(T* p, const float (&in)[VEC]) {
    Pack<T, VEC> pk;
#pragma unroll
    for (int k = 0; k < VEC; ++k) pk.v[k] = from_float<T>(in[k]);
    *reinterpret_cast<Pack<T, VEC>*>(p) = pk;
}

// Sum over the TPR threads owning a row. For TPR > 32 the block is the row, so the
// block-wide barriers inside block_reduce are reached by every thread of the block.
template <int TPR>
__device__ __forceinline__ float row_sum(float v) {
    if constexpr (TPR > 32) return block_reduce<TPR>(v, Sum{}, 0.f);
    else return warp_sum(v);
}

template <typename T, int VEC, int TPR, bool DROPOUT, bool RMS>
__global__ void __launch_bounds__(TPR * rows_per_block(TPR))
layernorm_fwd_kernel(const T* __restrict__ x,          // (N, C)
                     const T* __restrict__ residual,   // (N, C) or nullptr
                     T* __restrict__ residual_out,     // (N, C), written when residual is given or DROPOUT
                     const T* __restrict__ weight,     // (C,); nullptr (ones) allowed when RMS
                     const T* __restrict__ bias,       // (C,) or nullptr; nullptr when RMS
                     T* __restrict__ y,                // (N, C)
                     float* __restrict__ mean,         // (N,), written unless RMS
                     float* __restrict__ rstd,         // (N,)
                     std::int64_t N, int C, float eps,
                     DropoutParams dropout) {          // of x, read when DROPOUT
    constexpr int ITERS = kFwdElems / VEC;
    const std::int64_t row = static_cast<std::int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
    if (row >= N) return;  // uniform over the threads of a row; only warp rows share a block
    const std::int64_t offset = row * C;  // int64: N*C passes 2^31 at 131k rows of 16k

    // 1. load h = x (+ residual) into registers; sum for the mean
    float h[ITERS][VEC];
    float sum = 0.f;
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
        const int c = (it * TPR + threadIdx.x) * VEC;
#pragma unroll
        for (int k = 0; k < VEC; ++k) h[it][k] = 0.f;
        if (c >= C) continue;
        load<T, VEC>(x + offset + c, h[it]);
        if constexpr (DROPOUT) {
            float f[VEC];
            dropout_factors_pack<VEC>(dropout, static_cast<std::uint64_t>(offset + c), f);
#pragma unroll
            for (int k = 0; k < VEC; ++k) h[it][k] *= f[k];
        }
        if (residual != nullptr) {
            float r[VEC];
            load<T, VEC>(residual + offset + c, r);
            // normalize the stream as stored (rounded to T), which the backward re-reads
#pragma unroll
            for (int k = 0; k < VEC; ++k) h[it][k] = to_float(from_float<T>(h[it][k] + r[k]));
            store<T, VEC>(residual_out + offset + c, h[it]);
        } else if constexpr (DROPOUT) {
#pragma unroll
            for (int k = 0; k < VEC; ++k) h[it][k] = to_float(from_float<T>(h[it][k]));
            store<T, VEC>(residual_out + offset + c, h[it]);
        }
#pragma unroll
        for (int k = 0; k < VEC; ++k) sum += h[it][k];
    }
    float mu = 0.f;  // RMS: no centering
    if constexpr (!RMS) mu = row_sum<TPR>(sum) / C;

    // 2. variance from the cached row (two passes over registers: no cancellation)
    float sq = 0.f;
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
        if ((it * TPR + threadIdx.x) * VEC >= C) continue;
#pragma unroll
        for (int k = 0; k < VEC; ++k) sq += (h[it][k] - mu) * (h[it][k] - mu);
    }
    const float rs = rsqrtf(row_sum<TPR>(sq) / C + eps);

    // 3. normalize, scale, shift
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
        const int c = (it * TPR + threadIdx.x) * VEC;
        if (c >= C) continue;
        float w[VEC], b[VEC] = {}, out[VEC];
        if (!RMS || weight != nullptr) {
            load<T, VEC>(weight + c, w);
        } else {
#pragma unroll
            for (int k = 0; k < VEC; ++k) w[k] = 1.f;
        }
        if (bias != nullptr) load<T, VEC>(bias + c, b);
#pragma unroll
        for (int k = 0; k < VEC; ++k) out[k] = (h[it][k] - mu) * rs * w[k] + b[k];
        store<T, VEC>(y + offset + c, out);
    }
    if (threadIdx.x == 0) {
        if constexpr (!RMS) mean[row] = mu;
        rstd[row] = rs;
    }
}

// The warps of a block own the same columns: add their sums in warp order, then store them.
template <int VEC, int TPR, int ROWS>
__device__ __forceinline__ void write_partial_row(float (&acc)[kBwdElems / VEC][VEC], float* out_row, int C,
                                                  float* combine) {
    constexpr int ITERS = kBwdElems / VEC;
    if constexpr (ROWS > 1) {
        __syncthreads();  // an earlier call has finished reading `combine`
#pragma unroll
        for (int it = 0; it < ITERS; ++it)
#pragma unroll
            for (int k = 0; k < VEC; ++k)
                combine[(threadIdx.y * kBwdElems + it * VEC + k) * 32 + threadIdx.x] = acc[it][k];
        __syncthreads();
        if (threadIdx.y != 0) return;
#pragma unroll
        for (int it = 0; it < ITERS; ++it)
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
                float s = 0.f;
#pragma unroll
                for (int r = 0; r < ROWS; ++r) s += combine[(r * kBwdElems + it * VEC + k) * 32 + threadIdx.x];
                acc[it][k] = s;
            }
    }
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
        const int c = (it * TPR + threadIdx.x) * VEC;
        if (c >= C) continue;
#pragma unroll
        for (int k = 0; k < VEC; ++k) out_row[c + k] = acc[it][k];
    }
}

template <typename T, int VEC, int TPR, bool DROPOUT, bool RMS>
__global__ void __launch_bounds__(TPR * rows_per_block(TPR))
layernorm_bwd_kernel(const T* __restrict__ dy,           // (N, C)
                     const T* __restrict__ x,            // (N, C)
                     const T* __restrict__ weight,       // (C,); nullptr (ones) allowed when RMS
                     const float* __restrict__ mean,     // (N,), read unless RMS
                     const float* __restrict__ rstd,     // (N,)
                     const T* __restrict__ dresidual,    // (N, C) or nullptr
                     T* __restrict__ dx,                 // (N, C)
                     T* __restrict__ dbranch,            // (N, C) dropout(dx), written when DROPOUT
                     float* __restrict__ dw_partial,     // (gridDim.x, C); nullptr without a weight
                     float* __restrict__ db_partial,     // (gridDim.x, C), written unless RMS
                     std::int64_t N, int C,
                     DropoutParams dropout) {            // the forward's, read when DROPOUT
    constexpr int ITERS = kBwdElems / VEC;
    constexpr int ROWS = rows_per_block(TPR);
    __shared__ float combine[ROWS > 1 ? ROWS * kBwdElems * 32 : 1];
    float w[ITERS][VEC], dw[ITERS][VEC] = {}, db[ITERS][VEC] = {};
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
        const int c = (it * TPR + threadIdx.x) * VEC;
        if (c >= C) continue;
        if (!RMS || weight != nullptr) {
            load<T, VEC>(weight + c, w[it]);
        } else {
#pragma unroll
            for (int k = 0; k < VEC; ++k) w[it][k] = 1.f;
        }
    }

    // the row loop's bounds are uniform over a block when TPR > 32 (one row per block)
    const std::int64_t row_step = static_cast<std::int64_t>(gridDim.x) * ROWS;
    for (std::int64_t row = static_cast<std::int64_t>(blockIdx.x) * ROWS + threadIdx.y; row < N;
         row += row_step) {
        const std::int64_t offset = row * C;
        const float mu = RMS ? 0.f : mean[row], rs = rstd[row];
        // 1. xhat and dy in registers; the two row sums c1, c2
        float xh[ITERS][VEC], g[ITERS][VEC];
        float s1 = 0.f, s2 = 0.f;
#pragma unroll
        for (int it = 0; it < ITERS; ++it) {
            const int c = (it * TPR + threadIdx.x) * VEC;
            if (c >= C) continue;
            load<T, VEC>(x + offset + c, xh[it]);
            load<T, VEC>(dy + offset + c, g[it]);
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
                xh[it][k] = (xh[it][k] - mu) * rs;
                // __fmul_rn: w*dy rounded the same here and in step 2 (nvcc would fuse one of
                // them into an fma): at C = 1, wdy - c2 must be exactly 0
                const float wdy = __fmul_rn(w[it][k], g[it][k]);
                s1 += xh[it][k] * wdy;
                s2 += wdy;
            }
        }
        const float c1 = row_sum<TPR>(s1) / C;
        float c2 = 0.f;  // RMS: no mean, no c2 term
        if constexpr (!RMS) c2 = row_sum<TPR>(s2) / C;
        // 2. dx, and this row's share of dw, db
#pragma unroll
        for (int it = 0; it < ITERS; ++it) {
            const int c = (it * TPR + threadIdx.x) * VEC;
            if (c >= C) continue;
            float out[VEC], dres[VEC] = {};
            if (dresidual != nullptr) load<T, VEC>(dresidual + offset + c, dres);
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
                out[k] = (__fmul_rn(w[it][k], g[it][k]) - (xh[it][k] * c1 + c2)) * rs + dres[k];
                dw[it][k] += g[it][k] * xh[it][k];
                db[it][k] += g[it][k];
            }
            store<T, VEC>(dx + offset + c, out);
            if constexpr (DROPOUT) {
                float f[VEC];
                dropout_factors_pack<VEC>(dropout, static_cast<std::uint64_t>(offset + c), f);
#pragma unroll
                for (int k = 0; k < VEC; ++k) out[k] *= f[k];
                store<T, VEC>(dbranch + offset + c, out);
            }
        }
    }

    // 3. one partial row per block (RMS without a weight: dw_partial == nullptr, for the whole grid)
    if (!RMS || dw_partial != nullptr)
        write_partial_row<VEC, TPR, ROWS>(dw, dw_partial + static_cast<std::int64_t>(blockIdx.x) * C, C, combine);
    if constexpr (!RMS)
        write_partial_row<VEC, TPR, ROWS>(db, db_partial + static_cast<std::int64_t>(blockIdx.x) * C, C, combine);
}

// dw[c] = sum over p of dw_partial[p, c] (same for db), in a fixed order: thread row y adds
// partial rows y, y + 8, ...; then the 8 sums are added in order. RMS: dw only.
template <bool RMS>
__global__ void __launch_bounds__(32 * kReduceRows)
layernorm_bwd_reduce_kernel(const float* __restrict__ dw_partial,  // (P, C)
                            const float* __restrict__ db_partial,  // (P, C), read unless RMS
                            float* __restrict__ dw,                // (C,)
                            float* __restrict__ db,                // (C,), written unless RMS
                            int P, int C) {
    __shared__ float sw[kReduceRows][32], sb[kReduceRows][32];
    const int c = blockIdx.x * 32 + threadIdx.x;
    float a = 0.f, b = 0.f;
    if (c < C) {
        for (int p = threadIdx.y; p < P; p += kReduceRows) {
            a += dw_partial[static_cast<std::int64_t>(p) * C + c];
            if constexpr (!RMS) b += db_partial[static_cast<std::int64_t>(p) * C + c];
        }
    }
    sw[threadIdx.y][threadIdx.x] = a;
    sb[threadIdx.y][threadIdx.x] = b;
    __syncthreads();
    if (threadIdx.y != 0 || c >= C) return;
    for (int r = 1; r < kReduceRows; ++r) {
        a += sw[r][threadIdx.x];
        b += sb[r][threadIdx.x];
    }
    dw[c] = a;
    if constexpr (!RMS) db[c] = b;
}

// ----------------------------------------------------------------------------- launchers

template <typename T> struct TypeTag { using type = T; };
template <int V> using Int = std::integral_constant<int, V>;

// Calls f(std::true_type) with dropout enabled, f(std::false_type) without.
template <typename F>
void with_dropout(const DropoutParams& dropout, F&& f) {
    if (dropout.enabled)
        f(std::true_type{});
    else
        f(std::false_type{});
}

int threads_per_row(std::int64_t C, int elems) {
    int tpr = 32;
    while (static_cast<std::int64_t>(tpr) * elems < C) tpr *= 2;
    return tpr;
}

bool aligned16(std::uintptr_t p) { return p % 16 == 0; }

// Calls f(TypeTag<T>, Int<VEC>, Int<TPR>) for the runtime dtype, vector choice and TPR.
template <typename F>
void dispatch(DType dtype, bool vectorized, int tpr, F&& f) {
    auto with_tpr = [&](auto type, auto vec) {
        switch (tpr) {
            case 32: return f(type, vec, Int<32>{});
            case 64: return f(type, vec, Int<64>{});
            case 128: return f(type, vec, Int<128>{});
            case 256: return f(type, vec, Int<256>{});
            case 512: return f(type, vec, Int<512>{});
            case 1024: return f(type, vec, Int<1024>{});
            default: throw std::invalid_argument("layernorm: unsupported threads per row " + std::to_string(tpr));
        }
    };
    if (dtype == DType::float32) {
        vectorized ? with_tpr(TypeTag<float>{}, Int<4>{}) : with_tpr(TypeTag<float>{}, Int<1>{});
    } else if (dtype == DType::bfloat16) {
        vectorized ? with_tpr(TypeTag<__nv_bfloat16>{}, Int<8>{}) : with_tpr(TypeTag<__nv_bfloat16>{}, Int<1>{});
    } else {
        unsupported_dtype("layernorm", dtype);
    }
}

void check_sizes(const char* op, std::int64_t N, std::int64_t C) {
    require(N >= 0, std::string(op) + ": N must be >= 0, got " + std::to_string(N));
    require(C >= 1 && C <= kLayerNormCudaMaxC, std::string(op) + ": C must be in [1, " +
            std::to_string(kLayerNormCudaMaxC) + "], got " + std::to_string(C));
}

// Backward blocks: enough for ~16 resident warps per SM, fewer partial rows than that would
// starve the memory system, more would make the workspace traffic a visible share.
std::int64_t bwd_blocks(std::int64_t N, std::int64_t C) {
    const int tpr = threads_per_row(C, kBwdElems), rows = rows_per_block(tpr);
    const std::int64_t per_sm = std::max(1, 512 / (tpr * rows));
    return std::min((N + rows - 1) / rows, per_sm * sm_count());
}

// The LayerNorm (RMS = false) and RMSNorm launchers' shared body.
template <bool RMS>
void forward(const char* op, std::uintptr_t x, std::uintptr_t residual, std::uintptr_t residual_out,
             std::uintptr_t weight, std::uintptr_t bias, std::uintptr_t y, std::uintptr_t mean, std::uintptr_t rstd,
             std::int64_t N, std::int64_t C, double eps, DType dtype, const DropoutParams& dropout,
             std::uintptr_t stream) {
    check_sizes(op, N, C);
    if (dropout.enabled)
        require(residual_out != 0, std::string(op) + ": dropout needs residual_out");
    else
        require((residual == 0) == (residual_out == 0),
                std::string(op) + ": residual and residual_out must be given together");
    if (N == 0) return;
    const int vec = dtype == DType::float32 ? 4 : 8;
    const bool vectorized = C % vec == 0 && aligned16(x) && aligned16(residual) &&
                            aligned16(residual_out) && aligned16(weight) && aligned16(bias) && aligned16(y);
    const int tpr = threads_per_row(C, kFwdElems);
    dispatch(dtype, vectorized, tpr, [&](auto type, auto vec_c, auto tpr_c) {
        using T = typename decltype(type)::type;
        constexpr int VEC = decltype(vec_c)::value, TPR = decltype(tpr_c)::value;
        constexpr int ROWS = rows_per_block(TPR);
        const dim3 block(TPR, ROWS);
        const dim3 grid(static_cast<unsigned>((N + ROWS - 1) / ROWS));
        with_dropout(dropout, [&](auto drop) {
            NANOLM_LAUNCH(grid, block, 0, reinterpret_cast<cudaStream_t>(stream),
                          layernorm_fwd_kernel<T, VEC, TPR, decltype(drop)::value, RMS>)(
                    ptr<const T>(x), ptr<const T>(residual), ptr<T>(residual_out), ptr<const T>(weight),
                    ptr<const T>(bias), ptr<T>(y), ptr<float>(mean), ptr<float>(rstd), N, static_cast<int>(C),
                    static_cast<float>(eps), dropout);
            NANOLM_CHECK_LAUNCH("layernorm_fwd_kernel");
        });
    });
}

// workspace: (2, P, C) for LayerNorm, (P, C) for RMSNorm with a weight, none (0) without one.
template <bool RMS>
void backward(const char* op, std::uintptr_t dy, std::uintptr_t x, std::uintptr_t weight, std::uintptr_t mean,
              std::uintptr_t rstd, std::uintptr_t dresidual, std::uintptr_t dx, std::uintptr_t dweight,
              std::uintptr_t dbias, std::uintptr_t workspace, std::int64_t N, std::int64_t C, DType dtype,
              std::uintptr_t dbranch, const DropoutParams& dropout, std::uintptr_t stream) {
    check_sizes(op, N, C);
    require(!dropout.enabled || dbranch != 0, std::string(op) + ": dropout needs dbranch");
    const std::int64_t P = bwd_blocks(N, C);
    float* dw_partial = ptr<float>(workspace);
    float* db_partial = RMS ? nullptr : dw_partial + P * C;
    auto s = reinterpret_cast<cudaStream_t>(stream);
    const int vec = dtype == DType::float32 ? 4 : 8;
    const bool vectorized = C % vec == 0 && aligned16(dy) && aligned16(x) && aligned16(weight) &&
                            aligned16(dresidual) && aligned16(dx) && aligned16(dbranch);
    const int tpr = threads_per_row(C, kBwdElems);
    if (N > 0) {
        dispatch(dtype, vectorized, tpr, [&](auto type, auto vec_c, auto tpr_c) {
            using T = typename decltype(type)::type;
            constexpr int VEC = decltype(vec_c)::value, TPR = decltype(tpr_c)::value;
            const dim3 block(TPR, rows_per_block(TPR));
            with_dropout(dropout, [&](auto drop) {
                NANOLM_LAUNCH(static_cast<unsigned>(P), block, 0, s,
                              layernorm_bwd_kernel<T, VEC, TPR, decltype(drop)::value, RMS>)(
                    ptr<const T>(dy), ptr<const T>(x), ptr<const T>(weight), ptr<const float>(mean),
                    ptr<const float>(rstd), ptr<const T>(dresidual), ptr<T>(dx), ptr<T>(dbranch), dw_partial,
                    db_partial, N, static_cast<int>(C), dropout);
                NANOLM_CHECK_LAUNCH("layernorm_bwd_kernel");
            });
        });
    }
    if (dweight == 0) return;  // RMSNorm without a weight: no dw
    const dim3 block(32, kReduceRows);
    const dim3 grid(static_cast<unsigned>((C + 31) / 32));
    NANOLM_LAUNCH(grid, block, 0, s, layernorm_bwd_reduce_kernel<RMS>)(dw_partial, db_partial, ptr<float>(dweight),
                                                            ptr<float>(dbias), static_cast<int>(P),
                                                            static_cast<int>(C));
    NANOLM_CHECK_LAUNCH("layernorm_bwd_reduce_kernel");
}

}  // namespace

void layernorm_fwd_cuda(std::uintptr_t x, std::uintptr_t residual, std::uintptr_t residual_out,
                        std::uintptr_t weight, std::uintptr_t bias, std::uintptr_t y,
                        std::uintptr_t mean, std::uintptr_t rstd, std::int64_t N, std::int64_t C,
                        double eps, DType dtype, const DropoutParams& dropout,
                        std::uintptr_t stream) {
    forward<false>("layernorm_fwd_cuda", x, residual, residual_out, weight, bias, y, mean, rstd, N, C, eps, dtype,
                   dropout, stream);
}

std::int64_t layernorm_bwd_workspace_rows_cuda(std::int64_t N, std::int64_t C) {
    check_sizes("layernorm_bwd_workspace_rows_cuda", N, C);
    return bwd_blocks(N, C);
}

void layernorm_bwd_cuda(std::uintptr_t dy, std::uintptr_t x, std::uintptr_t weight,
                        std::uintptr_t mean, std::uintptr_t rstd, std::uintptr_t dresidual,
                        std::uintptr_t dx, std::uintptr_t dweight, std::uintptr_t dbias,
                        std::uintptr_t workspace, std::int64_t N, std::int64_t C, DType dtype,
                        std::uintptr_t dbranch, const DropoutParams& dropout, std::uintptr_t stream) {
    backward<false>("layernorm_bwd_cuda", dy, x, weight, mean, rstd, dresidual, dx, dweight, dbias, workspace, N, C,
                    dtype, dbranch, dropout, stream);
}

void rmsnorm_fwd_cuda(std::uintptr_t x, std::uintptr_t residual, std::uintptr_t residual_out,
                      std::uintptr_t weight, std::uintptr_t y, std::uintptr_t rstd, std::int64_t N,
                      std::int64_t C, double eps, DType dtype, const DropoutParams& dropout,
                      std::uintptr_t stream) {
    forward<true>("rmsnorm_fwd_cuda", x, residual, residual_out, weight, 0, y, 0, rstd, N, C, eps, dtype, dropout,
                  stream);
}

void rmsnorm_bwd_cuda(std::uintptr_t dy, std::uintptr_t x, std::uintptr_t weight, std::uintptr_t rstd,
                      std::uintptr_t dresidual, std::uintptr_t dx, std::uintptr_t dweight,
                      std::uintptr_t workspace, std::int64_t N, std::int64_t C, DType dtype,
                      std::uintptr_t dbranch, const DropoutParams& dropout, std::uintptr_t stream) {
    require((weight == 0) == (dweight == 0), "rmsnorm_bwd_cuda: weight and dweight must be given together");
    // (an empty workspace, N == 0, may have address 0)
    require(weight == 0 || N == 0 || workspace != 0, "rmsnorm_bwd_cuda: a weight needs the workspace");
    backward<true>("rmsnorm_bwd_cuda", dy, x, weight, 0, rstd, dresidual, dx, dweight, 0, workspace, N, C, dtype,
                   dbranch, dropout, stream);
}

}  // namespace nanolm

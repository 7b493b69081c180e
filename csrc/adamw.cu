// AdamW update and deterministic sum of squares on CUDA, over flat float32 buffers.
//
// Update, per element i (the math of adamw_step in nanolm/ops/adamw.py):
//   g = grad[i] * grad_scale                      (the clip coefficient: no separate pass)
//   p = param[i] * decay_factor                   (1 - lr*wd for i < decay_numel, else 1)
//   m = m + (1 - beta1) (g - m);   v = beta2 v + (1 - beta2) g^2
//   p = p - step_size * m / (sqrt(v) / bc2_sqrt + eps)
// Memory traffic: reads p, g, m, v, writes p, m, v: 28 bytes per parameter, no FLOP limit.
// Each thread moves 16-byte float4 vectors in a grid-stride loop. Buffers that are slices
// (ZeRO shards) may start at any float offset: when the four pointers share their offset
// modulo 16 bytes a scalar head reaches alignment, otherwise the whole range runs scalar.
//
// Sum of squares (4 bytes read per element): a fixed partition that depends on numel only —
// kPartials blocks (fewer for small inputs), each a fixed grid-stride set of elements, summed
// per thread then by a fixed tree — writes one partial per block; one block then reduces the
// partials in a fixed tree. Same bits every run, on every GPU.
#include <algorithm>

#include "adamw.h"
#include "cuda_common.h"

namespace nanolm {
namespace {

constexpr int kThreads = 256;
constexpr int kPartials = 1024;  // also the thread count of the final reduction block

__device__ __forceinline__ float adamw_one(float p, float g, float& m, float& v, float decay,
                                           const AdamWScalars& s) {
    g *= s.grad_scale;
    m = m + s.one_minus_beta1 * (g - m);
    v = v * s.beta2 + s.one_minus_beta2 * (g * g);
    const float denom = sqrtf(v) / s.bc2_sqrt + s.eps;
    return p * decay - s.step_size * (m / denom);
}

__device__ __forceinline__ float decay_of(int64_t i, int64_t decay_numel, float decay_factor) {
    return i < decay_numel ? decay_factor : 1.0f;
}

// Elements [0, n) one by one (the head before alignment, the tail, or misaligned buffers).
__global__ void adamw_scalar_kernel(float* __restrict__ p, const float* __restrict__ g,
                                    float* __restrict__ m, float* __restrict__ v, int64_t n,
                                    int64_t decay_numel, AdamWScalars s) {
    const int64_t stride = int64_t(gridDim.x) * blockDim.x;
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
        float mi = m[i], vi = v[i];
        p[i] = adamw_one(p[i], g[i], mi, vi, decay_of(i, decay_numel, s.decay_factor), s);
        m[i] = mi;
        v[i] = vi;
    }
}

// n4 float4 vectors of 16-byte aligned buffers; decay_numel counts floats from p's start.
__global__ void adamw_vec4_kernel(float4* __restrict__ p, const float4* __restrict__ g,
                                  float4* __restrict__ m, float4* __restrict__ v, int64_t n4,
                                  int64_t decay_numel, AdamWScalars s) {
    const int64_t stride = int64_t(gridDim.x) * blockDim.x;
    for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < n4; j += stride) {
        float4 pj = p[j], mj = m[j], vj = v[j];
        const float4 gj = __ldcs(g + j);  // read once: keep it out of the way in L2
        const int64_t i = 4 * j;
        pj.x = adamw_one(pj.x, gj.x, mj.x, vj.x, decay_of(i + 0, decay_numel, s.decay_factor), s);
        pj.y = adamw_one(pj.y, gj.y, mj.y, vj.y, decay_of(i + 1, decay_numel, s.decay_factor), s);
        pj.z = adamw_one(pj.z, gj.z, mj.z, vj.z, decay_of(i + 2, decay_numel, s.decay_factor), s);
        pj.w = adamw_one(pj.w, gj.w, mj.w, vj.w, decay_of(i + 3, decay_numel, s.decay_factor), s);
        p[j] = pj;
        m[j] = mj;
        v[j] = vj;
    }
}

__global__ void sum_of_squares_partials_kernel(const float* __restrict__ x, int64_t n,
                                               float* __restrict__ partials, bool aligned) {
    const int64_t stride = int64_t(gridDim.x) * blockDim.x;
    const int64_t first = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    float acc = 0.0f;
    int64_t tail = 0;
    if (aligned) {
        const float4* x4 = reinterpret_cast<const float4*>(x);
        for (int64_t j = first; j < n / 4; j += stride) {
            const float4 a = x4[j];
            acc += a.x * a.x + a.y * a.y + a.z * a.z + a.w * a.w;
        }
        tail = n / 4 * 4;
    }
    for (int64_t i = tail + first; i < n; i += stride) acc += x[i] * x[i];
    acc = block_reduce<kThreads>(acc, Sum{}, 0.0f);  // a fixed tree: reproducible
    if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

__global__ void sum_of_squares_final_kernel(const float* __restrict__ partials, int count,
                                            float* __restrict__ out) {
    const float x = threadIdx.x < count ? partials[threadIdx.x] : 0.0f;
    const float total = block_reduce<kPartials>(x, Sum{}, 0.0f);
    if (threadIdx.x == 0) *out = total;
}

int grid_for(int64_t work) {
    static int sms = sm_count();
    const int64_t blocks = (work + kThreads - 1) / kThreads;
    return int(std::max<int64_t>(1, std::min<int64_t>(blocks, int64_t(sms) * 16)));
}

}  // namespace

void adamw_step_cuda(std::uintptr_t param, std::uintptr_t grad, std::uintptr_t exp_avg,
                     std::uintptr_t exp_avg_sq, int64_t numel, int64_t decay_numel,
                     const AdamWScalars& s, DType dtype, std::uintptr_t stream) {
    require_dtype("adamw_step_cuda", dtype, DType::float32);
    require(numel >= 0 && decay_numel >= 0 && decay_numel <= numel,
            "adamw_step_cuda: need 0 <= decay_numel <= numel");
    if (numel == 0) return;
    auto st = reinterpret_cast<cudaStream_t>(stream);
    const std::uintptr_t offset = param % 16;
    const bool same_offset = grad % 16 == offset && exp_avg % 16 == offset && exp_avg_sq % 16 == offset;
    const int64_t head = same_offset ? std::min<int64_t>(numel, (16 - offset) % 16 / 4) : numel;
    if (head > 0) {
        NANOLM_LAUNCH(grid_for(head), kThreads, 0, st, adamw_scalar_kernel)(
            ptr<float>(param), ptr<const float>(grad), ptr<float>(exp_avg), ptr<float>(exp_avg_sq),
            head, decay_numel, s);
        NANOLM_CHECK_LAUNCH("adamw_scalar_kernel (head)");
    }
    const int64_t n4 = (numel - head) / 4, tail = head + 4 * n4;
    if (n4 > 0) {
        const int64_t shifted = decay_numel - head;  // may be negative: then nothing decays
        NANOLM_LAUNCH(grid_for(n4), kThreads, 0, st, adamw_vec4_kernel)(
            ptr<float4>(param + 4 * head), ptr<const float4>(grad + 4 * head), ptr<float4>(exp_avg + 4 * head),
            ptr<float4>(exp_avg_sq + 4 * head), n4, shifted, s);
        NANOLM_CHECK_LAUNCH("adamw_vec4_kernel");
    }
    if (tail < numel) {
        NANOLM_LAUNCH(grid_for(numel - tail), kThreads, 0, st, adamw_scalar_kernel)(
            ptr<float>(param) + tail, ptr<const float>(grad) + tail, ptr<float>(exp_avg) + tail,
            ptr<float>(exp_avg_sq) + tail, numel - tail, decay_numel - tail, s);
        NANOLM_CHECK_LAUNCH("adamw_scalar_kernel (tail)");
    }
}

int64_t sum_of_squares_partials_cuda() { return kPartials; }

void sum_of_squares_cuda(std::uintptr_t x, int64_t numel, std::uintptr_t partials,
                         std::uintptr_t out, DType dtype, std::uintptr_t stream) {
    require_dtype("sum_of_squares_cuda", dtype, DType::float32);
    require(numel >= 0, "sum_of_squares_cuda: numel must be >= 0");
    auto st = reinterpret_cast<cudaStream_t>(stream);
    // Block count from numel alone (never from the device), so the partition is fixed.
    const int blocks = int(std::max<int64_t>(1, std::min<int64_t>(kPartials, (numel + 4095) / 4096)));
    NANOLM_LAUNCH(blocks, kThreads, 0, st, sum_of_squares_partials_kernel)(
        ptr<const float>(x), numel, ptr<float>(partials), x % 16 == 0);
    NANOLM_CHECK_LAUNCH("sum_of_squares_partials_kernel");
    NANOLM_LAUNCH(1, kPartials, 0, st, sum_of_squares_final_kernel)(ptr<const float>(partials), blocks,
                                                         ptr<float>(out));
    NANOLM_CHECK_LAUNCH("sum_of_squares_final_kernel");
}

}  // namespace nanolm

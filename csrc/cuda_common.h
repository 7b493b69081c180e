// Device helpers shared by nanolm's CUDA kernels: fp32 <-> storage-type conversions, 16-byte
// packed vectors, warp and block reductions, and the SM count for grid sizing.
//
// Reductions are butterflies over __shfl_xor_sync, then (for a block) one partial per warp in
// shared memory reduced again by a butterfly. The order of additions is fixed by the lane and
// warp indices alone, so every result is bit-identical from run to run (no atomics).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include "common.h"  // cuda_runtime.h, or the emulation's csrc/sim/cuda_sim.h

namespace nanolm {

// exp(x) = exp2(x * log2(e)): the kernels work in base 2, where the hardware has exp2/log2.
constexpr float kLog2e = 1.4426950408889634f;

// ----------------------------------------------------------------------------- conversions
// Storage may be fp32, bf16 or fp16; all arithmetic is fp32 (round to nearest even on store).

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

// ----------------------------------------------------------------------------- packed vectors
// VEC elements of T moved as one aligned load/store (16 bytes: one LDG.128 per thread).

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
    static constexpr int kSize = VEC;
    T v[VEC];
};

// The 16-byte pack of T: 4 fp32 or 8 bf16/fp16 values.
template <typename T>
using Pack16 = Pack<T, 16 / sizeof(T)>;

// ----------------------------------------------------------------------------- reductions

struct Sum {
    __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};
struct Max {
    __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

__device__ __forceinline__ float shfl_xor(float v, int offset) {
    return __shfl_xor_sync(0xffffffffu, v, offset);
}

// Butterfly over groups of LANES consecutive lanes (a power of two up to 32): every lane of a
// group ends with the same bits. A struct type reduces when a shfl_xor overload for it is
// visible (found by argument-dependent lookup, next to the struct).
template <int LANES = 32, typename V, typename Op>
__device__ __forceinline__ V warp_reduce(V v, Op op) {
#pragma unroll
    for (int offset = LANES / 2; offset > 0; offset >>= 1) v = op(v, shfl_xor(v, offset));
    return v;
}

__device__ __forceinline__ float warp_sum(float v) { return warp_reduce(v, Sum{}); }

// Reduction over a block of THREADS threads (a multiple of 32, at most 1024); every thread
// returns the total. `identity` fills the lanes past the last warp. Safe to call repeatedly:
// the leading barrier waits for readers of the previous call's partials.
template <int THREADS, typename V, typename Op>
__device__ __forceinline__ V block_reduce(V v, Op op, V identity) {
    static_assert(THREADS % 32 == 0 && THREADS <= 1024, "block_reduce: THREADS must be 32k <= 1024");
    __shared__ V partial[THREADS / 32];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    v = warp_reduce(v, op);
    __syncthreads();
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    return warp_reduce(lane < THREADS / 32 ? partial[lane] : identity, op);
}

// ----------------------------------------------------------------------------- device facts

// Streaming multiprocessors of the current device (grid sizing for persistent-style kernels).
inline int sm_count() {
    int device = 0, sms = 0;
    NANOLM_CUDA_CHECK(cudaGetDevice(&device));
    NANOLM_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    return sms;
}

}  // namespace nanolm

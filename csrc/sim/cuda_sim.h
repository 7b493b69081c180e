// SIMT emulation of the CUDA subset nanolm's kernels use, so that csrc/*.cu compile with the
// host C++ compiler (-DNANOLM_CUDA_SIM, the CUDA toolkit's include directory on the path for
// cuda_bf16.h / cuda_fp16.h) and run on host memory. See csrc/sim/README.md.
//
// Model: a launch runs its blocks one after another; each block runs one fiber (ucontext,
// the default: fast, debuggable) or one OS thread (NANOLM_SIM_THREADS: what ThreadSanitizer
// needs to see the threads' accesses as concurrent) per CUDA thread. Threads meet at
// __syncthreads and, for the warp collectives (__shfl_xor_sync, ldmatrix, mma.sync), at a
// barrier of their warp, where they trade values through a per-warp exchange buffer.
// __shared__ variables are function-local statics (one block at a time, so one copy is the
// block's); dynamic shared memory is a heap buffer of exactly the launch's size, filled with
// NaN bytes, so AddressSanitizer sees overruns and unwritten reads show up as NaN.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_types.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

// The CUDA headers define these as attributes g++ ignores with a warning; here they are plain.
#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#define __global__
#define __device__
#define __host__
#define __shared__ static
#define __launch_bounds__(...)

namespace nanolm {
namespace sim {

struct Thread;            // one emulated CUDA thread (its index, warp, cp.async queue)
Thread& current_thread();
const dim3& thread_idx();
extern dim3 block_idx, block_dim, grid_dim;

// ----------------------------------------------------------------------------- launches

using Body = void (*)(void* launch);
// Runs every block of the grid; returns an error message, empty on success.
std::string run_grid(const char* kernel, dim3 grid, dim3 block, std::size_t dynamic_smem,
                     const void* kernel_id, Body body, void* launch);
void record_launch_error(const std::string& message);
unsigned char* dynamic_smem();

// kernel_name(args...) as a launch: converts the arguments to the kernel's parameter types
// once (as CUDA copies them into the launch), then every thread calls the kernel with them.
template <typename... Params>
struct Launch {
    const char* name;
    dim3 grid, block;
    std::size_t smem;
    void (*kernel)(Params...);

    template <typename... Args>
    void operator()(Args&&... args) const {
        struct Bound {
            void (*kernel)(Params...);
            std::tuple<std::decay_t<Params>...> params;
        } bound{kernel, std::tuple<std::decay_t<Params>...>(std::forward<Args>(args)...)};
        const std::string error = run_grid(
            name, grid, block, smem, reinterpret_cast<const void*>(kernel),
            [](void* p) {
                auto* b = static_cast<Bound*>(p);
                std::apply(b->kernel, b->params);
            },
            &bound);
        if (!error.empty()) record_launch_error(error);
    }
};

template <typename... Params>
Launch<Params...> make_launch(const char* name, dim3 grid, dim3 block, std::size_t smem,
                              cudaStream_t /*host memory: one stream*/, void (*kernel)(Params...)) {
    return {name, grid, block, smem, kernel};
}

// ----------------------------------------------------------------------------- sync, warps

void syncthreads();
// Every lane of the calling warp publishes `bytes` bytes (at most 32) and, once the whole warp
// has, gets the 32 lanes' values: lane l's at result + l * 32. Valid until the next exchange.
const unsigned char* warp_exchange(const void* mine, std::size_t bytes);
int lane_id();
void require_full_mask(unsigned mask, const char* what);

// __shfl_xor_sync: lane l receives the value of lane l ^ lane_mask.
template <typename T>
T shfl_xor(unsigned mask, T value, int lane_mask) {
    static_assert(sizeof(T) <= 32, "shuffle values up to 32 bytes");
    require_full_mask(mask, "__shfl_xor_sync");
    const unsigned char* all = warp_exchange(&value, sizeof(T));
    T out;
    std::memcpy(&out, all + 32 * (lane_id() ^ lane_mask), sizeof(T));
    return out;
}

// ----------------------------------------------------------------------------- PTX twins

// cp.async of `bytes` (4 or 16) from global src to shared dst, zero-filling when !valid. The
// copy happens at the cp_async_wait that retires its group; until then dst holds NaN bytes.
void cp_async(void* dst, const void* src, int bytes, bool valid);
void cp_async_commit();
void cp_async_wait(int pending_groups);
// ldmatrix.sync.aligned.m8n8.x4(.trans).shared.b16: lane l gives the address of row l % 8 of
// matrix l / 8; it receives r[i] = elements (l / 4, 2 (l % 4) .. + 1) of matrix i, or of its
// transpose with .trans.
void ldmatrix_x4(std::uint32_t (&r)[4], const void* row_address, bool trans);
// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}: c += a b with the fragment layouts of the
// PTX ISA (see mma16816 in csrc/attention.cu); products and sums in fp32.
void mma_m16n8k16(float (&c)[4], const std::uint32_t (&a)[4], std::uint32_t b0, std::uint32_t b1, bool bf16);

}  // namespace sim
}  // namespace nanolm

#define threadIdx (::nanolm::sim::thread_idx())
#define blockIdx (static_cast<const dim3&>(::nanolm::sim::block_idx))
#define blockDim (static_cast<const dim3&>(::nanolm::sim::block_dim))
#define gridDim (static_cast<const dim3&>(::nanolm::sim::grid_dim))

inline void __syncthreads() { ::nanolm::sim::syncthreads(); }
// The one shuffle the kernels use (others would follow the same exchange).
template <typename T> T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int = 32) {
    return ::nanolm::sim::shfl_xor(mask, v, lane_mask);
}

// Device math and cache-hinted memory access: the host equivalents.
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
// A product rounded on its own, never contracted into an fma (volatile keeps g++ from it).
inline float __fmul_rn(float a, float b) {
    volatile float product = a * b;
    return product;
}
template <typename T> inline T __ldcs(const T* p) { return *p; }
template <typename T> inline void __stcs(T* p, T v) { *p = v; }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

// ----------------------------------------------------------------------------- runtime API
// cuda_runtime_api.h (pulled in by cuda_fp16.h) declares cudaGetLastError, cudaGetErrorString,
// cudaGetDevice, cudaDeviceGetAttribute and cudaFuncSetAttribute; cuda_sim.cpp defines them.
// The kernel-pointer form of cudaFuncSetAttribute, as cuda_runtime.h has it:
template <typename Kernel>
cudaError_t cudaFuncSetAttribute(Kernel* kernel, cudaFuncAttribute attr, int value) {
    return ::cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), attr, value);
}

// The launch and dynamic shared memory forms the .cu sources use (see csrc/common.h).
#define NANOLM_LAUNCH(grid, block, smem, stream, ...) \
    ::nanolm::sim::make_launch(#__VA_ARGS__, grid, block, smem, stream, __VA_ARGS__)
#define NANOLM_DYNAMIC_SMEM(name) unsigned char* const name = ::nanolm::sim::dynamic_smem()

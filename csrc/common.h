// Shared helpers for nanolm's C++ and CUDA sources.
//
// Kernels receive raw pointers from the Python layer (nanolm/ops/), which has already
// checked dtype, device, shape and contiguity. The C++ side still guards every index it
// computes and reports failures by throwing: pybind11 turns std::exception into a Python
// exception, so nothing here ever calls exit() or abort().
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>

namespace nanolm {

// The element type of a kernel's tensors, handed from Python as nanolm._C.DType (bound in
// bindings.cpp; nanolm/ops/launch.py maps torch dtypes onto it). Every launcher that
// takes more than one storage type takes a DType; which ones each accepts is declared in
// its backend's support row (nanolm/ops/<op>.py).
enum class DType : int { float32 = 0, bfloat16 = 1, float16 = 2 };

inline const char* dtype_name(DType dtype) {
    switch (dtype) {
        case DType::float32: return "float32";
        case DType::bfloat16: return "bfloat16";
        case DType::float16: return "float16";
    }
    return "unknown";
}

// The error a launcher throws for a dtype it has no kernel for.
[[noreturn]] inline void unsupported_dtype(const char* op, DType dtype) {
    throw std::invalid_argument(std::string(op) + ": unsupported dtype " + dtype_name(dtype));
}

// For a launcher built for one element type: every pointer-taking launcher takes the dtype of
// its tensors, so a buffer of another type is refused here rather than read as this one.
inline void require_dtype(const char* op, DType dtype, DType built_for) {
    if (dtype != built_for) unsupported_dtype(op, dtype);
}

// Pointers cross the Python boundary as integers (tensor.data_ptr()).
template <typename T>
inline T* ptr(std::uintptr_t address) { return reinterpret_cast<T*>(address); }

inline void require(bool ok, const std::string& message) {
    if (!ok) throw std::invalid_argument(message);
}

}  // namespace nanolm

#if defined(__CUDACC__)
#include <cuda_runtime.h>
// Launches and dynamic shared memory are written through these two macros so that the SIMT
// emulation (csrc/sim/, built with NANOLM_CUDA_SIM) compiles the same sources with the host
// C++ compiler: NANOLM_LAUNCH(grid, block, smem, stream, kernel<...>)(args...).
#define NANOLM_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#define NANOLM_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#elif defined(NANOLM_CUDA_SIM)
#include "sim/cuda_sim.h"
#endif

#if defined(__CUDACC__) || defined(NANOLM_CUDA_SIM)

// Throw on a failed CUDA API call, naming the call and the source line.
#define NANOLM_CUDA_CHECK(call)                                                          \
    do {                                                                                 \
        cudaError_t err_ = (call);                                                       \
        if (err_ != cudaSuccess)                                                         \
            throw std::runtime_error(std::string("CUDA error in ") + #call + " at " +    \
                                     __FILE__ + ":" + std::to_string(__LINE__) + ": " +  \
                                     cudaGetErrorString(err_));                          \
    } while (0)

// Call after every kernel launch: a bad launch configuration is reported here, not later.
#define NANOLM_CHECK_LAUNCH(kernel_name)                                                 \
    do {                                                                                 \
        cudaError_t err_ = cudaGetLastError();                                           \
        if (err_ != cudaSuccess)                                                         \
            throw std::runtime_error(std::string("CUDA launch of ") + kernel_name +      \
                                     " failed: " + cudaGetErrorString(err_));            \
    } while (0)
#endif

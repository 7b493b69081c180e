// Shared helpers for nanolm's C++ and CUDA sources.
//
// Kernels receive raw pointers from the Python layer (nanolm/backends/), which has already
// checked dtype, device, shape and contiguity. The C++ side still guards every index it
// computes and reports failures by throwing: pybind11 turns std::exception into a Python
// exception, so nothing here ever calls exit() or abort().
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>

namespace nanolm {

// Pointers cross the Python boundary as integers (tensor.data_ptr()).
template <typename T>
inline T* ptr(std::uintptr_t address) { return reinterpret_cast<T*>(address); }

inline void require(bool ok, const std::string& message) {
    if (!ok) throw std::invalid_argument(message);
}

}  // namespace nanolm

#ifdef __CUDACC__
#include <cuda_runtime.h>

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

// nanolm._C: the Python bindings of every C++ and CUDA kernel launcher.
//
// Each op declares its launchers in its own header (csrc/<op>.h); this file only converts
// Python integers (tensor.data_ptr(), stream handles) to pointers. CUDA launchers exist only
// when the extension was built with nvcc (NANOLM_WITH_CUDA); nanolm/backends/cuda.py checks
// build_info()["cuda"] before using them.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "common.h"
#ifdef NANOLM_WITH_CUDA
#include "attention.h"
#endif

namespace py = pybind11;

static py::dict build_info() {
    py::dict info;
#ifdef NANOLM_WITH_CUDA
    info["cuda"] = true;
    info["cuda_archs"] = NANOLM_CUDA_ARCHS;
    info["nvcc"] = NANOLM_NVCC_VERSION;
#else
    info["cuda"] = false;
    info["cuda_archs"] = "";
    info["nvcc"] = "";
#endif
    info["cxx"] = NANOLM_CXX_VERSION;
    info["march"] = NANOLM_MARCH;
#ifdef _OPENMP
    info["openmp"] = _OPENMP;
#else
    info["openmp"] = 0;
#endif
    return info;
}

PYBIND11_MODULE(_C, m) {
    m.doc() = "nanolm's C++ (CPU) and CUDA kernels; see csrc/ and nanolm/backends/";
    m.def("build_info", &build_info, "How this extension was built");
#ifdef NANOLM_WITH_CUDA
    using Strides = std::array<std::int64_t, 3>;
    m.def(
        "attention_fwd_cuda",
        [](std::uintptr_t q, Strides q_strides, std::uintptr_t k, Strides k_strides, std::uintptr_t v,
           Strides v_strides, std::uintptr_t o, Strides o_strides, std::uintptr_t lse, std::int64_t B,
           std::int64_t T, std::int64_t nh, std::int64_t hs, double scale, bool bf16, std::uintptr_t stream) {
            nanolm::attention_fwd_cuda({q, k, v, o, lse, q_strides, k_strides, v_strides, o_strides,
                                        B, T, nh, hs, scale, bf16}, stream);
        },
        py::arg("q"), py::arg("q_strides"), py::arg("k"), py::arg("k_strides"), py::arg("v"),
        py::arg("v_strides"), py::arg("o"), py::arg("o_strides"), py::arg("lse"), py::arg("B"),
        py::arg("T"), py::arg("nh"), py::arg("hs"), py::arg("scale"), py::arg("bf16"), py::arg("stream"),
        "Causal flash attention forward: o, lse from (B, T, nh, hs) views q, k, v");
    m.def(
        "attention_bwd_cuda",
        [](std::uintptr_t dout, Strides dout_strides, std::uintptr_t q, Strides q_strides, std::uintptr_t k,
           Strides k_strides, std::uintptr_t v, Strides v_strides, std::uintptr_t o, Strides o_strides,
           std::uintptr_t lse, std::uintptr_t delta, std::uintptr_t dq, Strides dq_strides, std::uintptr_t dk,
           Strides dk_strides, std::uintptr_t dv, Strides dv_strides, std::int64_t B, std::int64_t T,
           std::int64_t nh, std::int64_t hs, double scale, bool bf16, std::uintptr_t stream) {
            nanolm::attention_bwd_cuda({dout, q, k, v, o, lse, delta, dq, dk, dv, dout_strides, q_strides,
                                        k_strides, v_strides, o_strides, dq_strides, dk_strides, dv_strides,
                                        B, T, nh, hs, scale, bf16}, stream);
        },
        py::arg("dout"), py::arg("dout_strides"), py::arg("q"), py::arg("q_strides"), py::arg("k"),
        py::arg("k_strides"), py::arg("v"), py::arg("v_strides"), py::arg("o"), py::arg("o_strides"),
        py::arg("lse"), py::arg("delta"), py::arg("dq"), py::arg("dq_strides"), py::arg("dk"),
        py::arg("dk_strides"), py::arg("dv"), py::arg("dv_strides"), py::arg("B"), py::arg("T"),
        py::arg("nh"), py::arg("hs"), py::arg("scale"), py::arg("bf16"), py::arg("stream"),
        "Causal flash attention backward: writes dq, dk, dv (delta: fp32 (B, nh, T) scratch)");
#endif
}

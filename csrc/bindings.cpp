// nanolm._C: the Python bindings of every C++ and CUDA kernel launcher.
//
// Each op declares its launchers in its own header (csrc/<op>.h); this file only converts
// Python integers (tensor.data_ptr(), stream handles) to pointers. CUDA launchers exist only
// when the extension was built with nvcc (NANOLM_WITH_CUDA); nanolm/backends/cuda.py checks
// build_info()["cuda"] before using them.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "attention.h"
#include "common.h"

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
    m.def("attention_fwd_cpu", &nanolm::attention_fwd_cpu, "Causal flash attention forward (fp32, CPU)");
    m.def("attention_bwd_cpu", &nanolm::attention_bwd_cpu, "Causal flash attention backward (fp32, CPU)");
}

// nanolm._C: the Python bindings of every C++ and CUDA kernel launcher; built with
// NANOLM_CUDA_SIM, nanolm._C_sim: the CUDA launchers alone, over the SIMT emulation (csrc/sim/).
//
// Each op declares its launchers in its own header (csrc/<op>.h); this file only converts
// Python integers (tensor.data_ptr(), stream handles) to pointers. CUDA launchers exist only
// when the extension was built with nvcc (NANOLM_WITH_CUDA); nanolm/ops/backends.py checks
// build_info()["cuda"] before using them.
//
// One calling convention for every launcher (nanolm/ops/launch.py calls them all alike):
//   <op>_<step>_<cpu|cuda>(buffers and sizes..., scalars..., dtype[, dropout][, stream])
// pointers as integers, a (b, t, h) stride triple after each strided pointer, the DType of the
// buffers always, one DropoutParams where the kernel drops (disabled: no dropout), the stream
// last on CUDA.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "adamw.h"
#include "attention.h"
#include "common.h"
#include "dropout.h"
#include "layernorm.h"
#include "mlp_activation.h"
#include "rope.h"
#include "cross_entropy.h"

namespace py = pybind11;
using Strides = std::array<std::int64_t, 3>;  // (batch, seq, head) strides in elements

static py::dict build_info() {
    py::dict info;
#if defined(NANOLM_CUDA_SIM)
    info["cuda"] = true;
    info["cuda_archs"] = "emulated (csrc/sim)";
    info["nvcc"] = "";
#elif defined(NANOLM_WITH_CUDA)
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
#ifndef NANOLM_CUDA_SIM
    info["cpu_bf16_dot"] = nanolm::attention_cpu_bf16_dot();  // AVX512-BF16 in the cpu attention
#endif
#ifdef _OPENMP
    info["openmp"] = _OPENMP;
#else
    info["openmp"] = 0;
#endif
    return info;
}

// module_local: nanolm._C and nanolm._C_sim each bind these types, and both load in one process.
static void bind_common(py::module_& m) {
    m.def("build_info", &build_info, "How this extension was built");
    py::enum_<nanolm::DType>(m, "DType", py::module_local(), "Element type handed to a launcher (csrc/common.h)")
        .value("float32", nanolm::DType::float32)
        .value("bfloat16", nanolm::DType::bfloat16)
        .value("float16", nanolm::DType::float16);
    py::class_<nanolm::AdamWScalars>(m, "AdamWScalars", py::module_local())
        .def(py::init<float, float, float, float, float, float, float, float>(),
             py::arg("one_minus_beta1"), py::arg("beta2"), py::arg("one_minus_beta2"), py::arg("eps"),
             py::arg("decay_factor"), py::arg("step_size"), py::arg("bc2_sqrt"), py::arg("grad_scale"));
    py::class_<nanolm::DropoutParams>(m, "DropoutParams", py::module_local(), "A kernel's dropout arguments (csrc/dropout.h)")
        .def(py::init<>(), "Dropout disabled")
        .def(py::init([](std::uint64_t seed, std::uint64_t offset, std::uint32_t threshold, float scale) {
                 return nanolm::DropoutParams{seed, offset, threshold, scale, true};
             }),
             py::arg("seed"), py::arg("offset"), py::arg("threshold"), py::arg("scale"))
        .def_readonly("enabled", &nanolm::DropoutParams::enabled);
    m.def("dropout_factor", [](const nanolm::DropoutParams& d, std::uint64_t index) {
        return nanolm::dropout_factor(d, index);
    }, "The factor (scale or 0) of one element, as the kernels compute it");
}

#ifndef NANOLM_CUDA_SIM
// The CPU kernels (csrc/*_cpu.cpp).
static void bind_cpu(py::module_& m) {
    m.def("layernorm_fwd_cpu", &nanolm::layernorm_fwd_cpu, "LayerNorm forward (+ fused residual add), float32, bf16 or fp16");
    m.def("layernorm_bwd_cpu", &nanolm::layernorm_bwd_cpu, "LayerNorm backward (+ residual grad), float32, bf16 or fp16");
    m.def("rmsnorm_fwd_cpu", &nanolm::rmsnorm_fwd_cpu, "RMSNorm forward (+ fused residual add), weight optional, float32, bf16 or fp16");
    m.def("rmsnorm_bwd_cpu", &nanolm::rmsnorm_bwd_cpu, "RMSNorm backward (+ residual grad), weight optional, float32, bf16 or fp16");
    m.def("qk_norm_rope_fwd_cpu", &nanolm::qk_norm_rope_fwd_cpu, "QK-norm + RoPE of the packed qkv, float32, bf16 or fp16");
    m.def("qk_norm_rope_bwd_cpu", &nanolm::qk_norm_rope_bwd_cpu, "QK-norm + RoPE backward, float32, bf16 or fp16");
    m.def("swiglu_fwd_cpu", &nanolm::swiglu_fwd_cpu, "silu(gate) * up of [gate | up] rows, float32, bf16 or fp16");
    m.def("swiglu_bwd_cpu", &nanolm::swiglu_bwd_cpu, "SwiGLU backward into [dgate | dup] rows, float32, bf16 or fp16");
    m.def("relu2_fwd_cpu", &nanolm::relu2_fwd_cpu, "relu(x)^2, float32, bf16 or fp16");
    m.def("relu2_bwd_cpu", &nanolm::relu2_bwd_cpu, "ReLU^2 backward, float32, bf16 or fp16");
    m.def("cross_entropy_fwd_cpu", &nanolm::cross_entropy_fwd_cpu,
          "Cross-entropy losses and gradient over float32, bf16 or fp16 logits (N, Vp), OpenMP over rows");
    m.def("cross_entropy_stats_cpu", &nanolm::cross_entropy_stats_cpu,
          "Partial softmax statistics (max, sum exp, target logit) of a vocabulary shard, float32, bf16 or fp16");
    m.def("cross_entropy_grad_cpu", &nanolm::cross_entropy_grad_cpu,
          "dlogits of a vocabulary shard in place, given the global logsumexp, float32, bf16 or fp16");
    m.def("adamw_step_cpu", &nanolm::adamw_step_cpu);
    m.def("sum_of_squares_cpu", &nanolm::sum_of_squares_cpu);
    // Strides as the CUDA launchers take them: a (b, t, h) triple after each strided pointer.
    m.def(
        "attention_fwd_cpu",
        [](std::uintptr_t q, Strides q_strides, std::uintptr_t k, Strides k_strides, std::uintptr_t v,
           Strides v_strides, std::uintptr_t o, std::uintptr_t lse, std::int64_t B, std::int64_t T,
           std::int64_t nh, std::int64_t nkv, std::int64_t hs, double scale, nanolm::DType dtype,
           const nanolm::DropoutParams& dropout) {
            nanolm::attention_fwd_cpu(q, k, v, o, lse, B, T, nh, nkv, hs, q_strides[0], q_strides[1], q_strides[2],
                                      k_strides[0], k_strides[1], k_strides[2], v_strides[0], v_strides[1],
                                      v_strides[2], scale, dtype, dropout);
        },
        py::arg("q"), py::arg("q_strides"), py::arg("k"), py::arg("k_strides"), py::arg("v"),
        py::arg("v_strides"), py::arg("o"), py::arg("lse"), py::arg("B"), py::arg("T"), py::arg("nh"),
        py::arg("nkv"), py::arg("hs"), py::arg("scale"), py::arg("dtype"), py::arg("dropout"),
        "Causal flash attention forward (fp32, bf16 or fp16, CPU): o (contiguous), lse from views q, k, v");
    m.def(
        "attention_bwd_cpu",
        [](std::uintptr_t dout, std::uintptr_t q, Strides q_strides, std::uintptr_t k, Strides k_strides,
           std::uintptr_t v, Strides v_strides, std::uintptr_t o, std::uintptr_t lse, std::uintptr_t dq,
           Strides dq_strides, std::uintptr_t dk, Strides dk_strides, std::uintptr_t dv, Strides dv_strides,
           std::int64_t B, std::int64_t T, std::int64_t nh, std::int64_t nkv, std::int64_t hs, double scale,
           nanolm::DType dtype, const nanolm::DropoutParams& dropout) {
            nanolm::attention_bwd_cpu(dout, q, k, v, o, lse, dq, dk, dv, B, T, nh, nkv, hs,
                                      q_strides[0], q_strides[1], q_strides[2], k_strides[0], k_strides[1],
                                      k_strides[2], v_strides[0], v_strides[1], v_strides[2],
                                      dq_strides[0], dq_strides[1], dq_strides[2], dk_strides[0], dk_strides[1],
                                      dk_strides[2], dv_strides[0], dv_strides[1], dv_strides[2],
                                      scale, dtype, dropout);
        },
        py::arg("dout"), py::arg("q"), py::arg("q_strides"), py::arg("k"), py::arg("k_strides"), py::arg("v"),
        py::arg("v_strides"), py::arg("o"), py::arg("lse"), py::arg("dq"), py::arg("dq_strides"), py::arg("dk"),
        py::arg("dk_strides"), py::arg("dv"), py::arg("dv_strides"), py::arg("B"), py::arg("T"), py::arg("nh"),
        py::arg("nkv"), py::arg("hs"), py::arg("scale"), py::arg("dtype"), py::arg("dropout"),
        "Causal flash attention backward (fp32, bf16 or fp16, CPU): writes dq, dk, dv (views)");
}
#endif

#ifdef NANOLM_WITH_CUDA
// The CUDA launchers (csrc/*.cu): on a GPU, or in the SIMT emulation (csrc/sim/).
static void bind_cuda(py::module_& m) {
    m.def("layernorm_fwd_cuda", &nanolm::layernorm_fwd_cuda, "LayerNorm forward (+ fused residual add)");
    m.def("layernorm_bwd_workspace_rows_cuda", &nanolm::layernorm_bwd_workspace_rows_cuda,
          "Rows P of the (2, P, C) float32 workspace layernorm_bwd_cuda needs");
    m.def("layernorm_bwd_cuda", &nanolm::layernorm_bwd_cuda, "LayerNorm backward (+ residual grad)");
    m.def("rmsnorm_fwd_cuda", &nanolm::rmsnorm_fwd_cuda, "RMSNorm forward (+ fused residual add), weight optional");
    m.def("rmsnorm_bwd_cuda", &nanolm::rmsnorm_bwd_cuda, "RMSNorm backward (+ residual grad), weight optional");
    m.attr("layernorm_cuda_max_c") = nanolm::kLayerNormCudaMaxC;
    m.def("cross_entropy_fwd_cuda", &nanolm::cross_entropy_fwd_cuda,
          "Cross-entropy losses and gradient over fp32/bf16 logits (N, Vp), one block per row");
    m.def("cross_entropy_stats_cuda", &nanolm::cross_entropy_stats_cuda,
          "Partial softmax statistics (max, sum exp, target logit) of a vocabulary shard, fp32/bf16");
    m.def("cross_entropy_grad_cuda", &nanolm::cross_entropy_grad_cuda,
          "dlogits of a vocabulary shard in place, given the global logsumexp, fp32/bf16");
    m.def("adamw_step_cuda", &nanolm::adamw_step_cuda);
    m.def("sum_of_squares_cuda", &nanolm::sum_of_squares_cuda);
    m.def("sum_of_squares_partials_cuda", &nanolm::sum_of_squares_partials_cuda);
    m.def(
        "attention_fwd_cuda",
        [](std::uintptr_t q, Strides q_strides, std::uintptr_t k, Strides k_strides, std::uintptr_t v,
           Strides v_strides, std::uintptr_t o, Strides o_strides, std::uintptr_t lse, std::int64_t B,
           std::int64_t T, std::int64_t nh, std::int64_t nkv, std::int64_t hs, double scale, nanolm::DType dtype,
           const nanolm::DropoutParams& dropout, std::uintptr_t stream) {
            nanolm::attention_fwd_cuda({q, k, v, o, lse, q_strides, k_strides, v_strides, o_strides,
                                        B, T, nh, nkv, hs, scale, dtype, dropout}, stream);
        },
        py::arg("q"), py::arg("q_strides"), py::arg("k"), py::arg("k_strides"), py::arg("v"),
        py::arg("v_strides"), py::arg("o"), py::arg("o_strides"), py::arg("lse"), py::arg("B"),
        py::arg("T"), py::arg("nh"), py::arg("nkv"), py::arg("hs"), py::arg("scale"), py::arg("dtype"),
        py::arg("dropout"), py::arg("stream"),
        "Causal flash attention forward: o, lse from (B, T, nh, hs) views q, k, v");
    m.def(
        "attention_bwd_cuda",
        [](std::uintptr_t dout, Strides dout_strides, std::uintptr_t q, Strides q_strides, std::uintptr_t k,
           Strides k_strides, std::uintptr_t v, Strides v_strides, std::uintptr_t o, Strides o_strides,
           std::uintptr_t lse, std::uintptr_t delta, std::uintptr_t dq, Strides dq_strides, std::uintptr_t dk,
           Strides dk_strides, std::uintptr_t dv, Strides dv_strides, std::int64_t B, std::int64_t T,
           std::int64_t nh, std::int64_t nkv, std::int64_t hs, double scale, nanolm::DType dtype,
           const nanolm::DropoutParams& dropout, std::uintptr_t stream) {
            nanolm::attention_bwd_cuda({dout, q, k, v, o, lse, delta, dq, dk, dv, dout_strides, q_strides,
                                        k_strides, v_strides, o_strides, dq_strides, dk_strides, dv_strides,
                                        B, T, nh, nkv, hs, scale, dtype, dropout}, stream);
        },
        py::arg("dout"), py::arg("dout_strides"), py::arg("q"), py::arg("q_strides"), py::arg("k"),
        py::arg("k_strides"), py::arg("v"), py::arg("v_strides"), py::arg("o"), py::arg("o_strides"),
        py::arg("lse"), py::arg("delta"), py::arg("dq"), py::arg("dq_strides"), py::arg("dk"),
        py::arg("dk_strides"), py::arg("dv"), py::arg("dv_strides"), py::arg("B"), py::arg("T"),
        py::arg("nh"), py::arg("nkv"), py::arg("hs"), py::arg("scale"), py::arg("dtype"), py::arg("dropout"),
        py::arg("stream"),
        "Causal flash attention backward: writes dq, dk, dv (delta: fp32 (B, nh, T) scratch)");
}
#endif

#ifdef NANOLM_CUDA_SIM
// nanolm._C_sim: the same CUDA launchers compiled by the host compiler against csrc/sim/, on
// host memory (the cuda_sim backend). No CPU kernels: those live in nanolm._C.
PYBIND11_MODULE(_C_sim, m) {
    m.doc() = "nanolm's CUDA kernels run by the SIMT emulation in csrc/sim/ (CPU tensors)";
    bind_common(m);
    bind_cuda(m);
}
#else
PYBIND11_MODULE(_C, m) {
    m.doc() = "nanolm's C++ (CPU) and CUDA kernels; see csrc/ and nanolm/ops/";
    bind_common(m);
    bind_cpu(m);
#ifdef NANOLM_WITH_CUDA
    bind_cuda(m);
#endif
}
#endif

"""The `cuda_sim` backend: the CUDA kernels of csrc/*.cu run on CPU tensors by the SIMT
emulation in csrc/sim/ (nanolm._C_sim: the same sources compiled by the host C++ compiler).

It is the cuda backend with another target: cuda.py's checks and launches, executed by a
second instance of that module whose TARGET is nanolm._C_sim on the CPU. Every CUDA thread
is a fiber, so it is slow (a 64x64 attention tile takes milliseconds): it exists to test the
CUDA code paths without a GPU and to study them (a breakpoint in attention.cu stops one
emulated CUDA thread). `auto` never picks it.
"""
import contextlib
import importlib.util


from nanolm.backends import cuda

OPS = cuda.OPS


def _cuda_backend_on(target):
    spec = importlib.util.find_spec("nanolm.backends.cuda")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.TARGET = target
    return module


_sim = _cuda_backend_on(cuda.Target("nanolm._C_sim", "cpu", lambda device: contextlib.nullcontext(),
                                    lambda: 0))

layer_norm_fwd = _sim.layer_norm_fwd
add_layer_norm_fwd = _sim.add_layer_norm_fwd
layer_norm_bwd = _sim.layer_norm_bwd
cross_entropy_fwd = _sim.cross_entropy_fwd
adamw_step = _sim.adamw_step
sum_of_squares = _sim.sum_of_squares
attention_fwd = _sim.attention_fwd
attention_bwd = _sim.attention_bwd


def unavailable_reason(device):
    if device.type != "cpu":
        return "the cuda_sim backend runs on CPU tensors"
    try:
        importlib.import_module("nanolm._C_sim")
    except ModuleNotFoundError:
        return ("nanolm._C_sim is not built: the install found no CUDA headers (cuda_bf16.h; set "
                "CUDA_HOME and reinstall) or had NANOLM_CUDA_SIM=off")
    except ImportError as e:
        return f"nanolm._C_sim does not load ({e})"
    return None

"""The `triton` backend: the Triton kernels of kernels/ (imported as nanolm.kernels).

Runs on CUDA devices, and on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1,
set before triton is imported), which is how CI tests these kernels.
"""
import os

import torch

from nanolm.kernels.layernorm import add_layer_norm_fwd, layer_norm_bwd, layer_norm_fwd  # noqa: F401

OPS = ("layernorm",)


def unavailable_reason(device):
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "CUDA is not available"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return "Triton runs on CUDA devices, or on CPU only under TRITON_INTERPRET=1"

"""The records every op file builds, the correctness check, and the op table.

A Case is one shape of one op; its Impls are the nanolm backends the op layer reports as
available on the device plus the PyTorch baselines. `impl.make(inputs)` does the per-input
setup (building an autograd graph, cloning optimizer state) and returns `run()`, the timed call,
whose outputs are compared with `case.reference(inputs)` once before any timing.
"""
import importlib
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch

from nanolm.ops import backends


@dataclass
class Impl:
    name: str
    kind: str  # "nanolm" or "baseline"
    make: Callable


@dataclass
class Case:
    op: str
    name: str
    dtype: torch.dtype  # what the timed work runs in: the matmul ceiling a TFLOP/s row is held to
    series: str  # one plot per series; x is the size axis
    x: int  # the plot's size axis, in units of x_label
    metric: str  # "GB/s" or "TFLOP/s"
    work: float  # bytes or FLOPs of one call (bench/formulas.py)
    make_inputs: Callable
    reference: Callable
    impls: list
    tol: float
    working_set: int = 0
    view: Callable = staticmethod(lambda out: out)  # impl outputs -> what reference returns
    skipped: dict = field(default_factory=dict)  # impl name -> why it is not run here
    budget_ms: int = None
    x_label: str = "size"
    per_call: dict = field(default_factory=dict)  # extra figures derived from time (tokens/s)
    peak_tflops: float = None  # datasheet peak, when known: TFLOP/s rows also get an MFU against it


def tol_for(dtype):
    return {torch.float32: 1e-4, torch.float64: 1e-10}.get(dtype, 2e-2)


def check_outputs(out, ref, tol):
    """Max |out - ref| relative to max |ref|, per output; raises AssertionError if above tol."""
    out, ref = tuple(out), tuple(ref)
    if len(out) != len(ref):
        raise AssertionError(f"{len(out)} outputs, expected {len(ref)}")
    for i, (a, b) in enumerate(zip(out, ref)):
        a, b = a.detach().double(), b.detach().double()
        if a.shape != b.shape:
            raise AssertionError(f"output {i}: shape {tuple(a.shape)}, expected {tuple(b.shape)}")
        if not torch.isfinite(a).all():
            raise AssertionError(f"output {i}: non-finite values")
        err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
        if err > tol:
            raise AssertionError(f"output {i}: max error {err:.2e} relative to max |ref| > tol {tol:.0e}")


# Backends whose impls are of kind "emulated": set up and run only when named (--impls cuda_sim,
# or nanolm[cuda_sim] for train_step), then held to the same correctness check as the rest; their
# time is the emulation's (one fiber per CUDA thread), which says nothing about a GPU.
EMULATED = {"cuda_sim": "the CUDA kernels emulated on the CPU (csrc/sim), run only when named "
                        "(--impls cuda_sim): its check is the real kernels', its time the emulation's"}


def backend_unavailable(name, op, device, dtype=None):
    """Why the bench does not run backend `name` for `op` on `device` (in `dtype`, when given),
    or None. On top of the op layer's answer: triton on CPU runs only in Triton's interpreter,
    whose times say nothing about the kernel (its correctness is covered by tests/, not here)."""
    reason = backends.unavailable_reason(name, op, device, dtype)
    if reason is None and name == "triton" and device.type == "cpu":
        return "CPU tensors only run in Triton's interpreter (TRITON_INTERPRET=1), whose timings are meaningless"
    return reason


def emulated_reason(impl_name):
    """EMULATED's reason if impl_name ("cuda_sim", "nanolm[cuda_sim]") runs an emulated backend."""
    return EMULATED.get(impl_name.removeprefix("nanolm[").removesuffix("]"))


def nanolm_backends(op, device, dtype=None):
    """({name: module} of backends the bench runs for op on device (in dtype), {name: why not})."""
    available, skipped = {}, {}
    for name in backends.BACKENDS:
        reason = backend_unavailable(name, op, device, dtype)
        if reason is None:
            available[name] = backends.load(name)
        else:
            skipped[name] = reason
    return available, skipped


def compile_baselines(device, quick):
    """torch.compile of the eager ops: always on GPU; on CPU only outside --quick, since
    Inductor's C++ compile of every shape takes tens of seconds on a 2-core machine."""
    return device.type == "cuda" or not quick


COMPILE_SKIPPED = {"torch.compile": "not run on CPU with --quick: Inductor's C++ compile of each shape "
                                    "takes tens of seconds on a small CPU (run without --quick)"}


def compile_skipped(device, quick):
    """The skipped-entry for torch.compile when compile_baselines says no, else {}."""
    return {} if compile_baselines(device, quick) else dict(COMPILE_SKIPPED)


def shape_key(size, device):
    """The SHAPES entry a run uses: "tiny", or "full_cuda" / "full_cpu" / "quick_cuda" / "quick_cpu".
    The CPU sets are sized for a small machine (2 cores, 24 GB): the GPU shapes would need more
    memory than it has (fp32 logits of 32k rows x 50k vocab are 6.6 GB) and hours of compute."""
    return size if size == "tiny" else f"{size}_{device.type}"


class OpSetup(NamedTuple):
    key: str          # see shape_key
    dtype: torch.dtype  # one of op_dtypes(device)
    dname: str
    available: dict   # nanolm backends to run, see nanolm_backends
    skipped: dict     # {name: why not}, torch.compile included
    compiled: bool    # whether to run torch.compile baselines


def op_dtypes(device):
    """The activation dtypes the op cases run in: bf16 on GPU; fp32 on CPU, and bf16 too where
    the CPU computes bf16 natively (there it is what training uses)."""
    from nanolm.precision import native_bf16_cpu
    if device.type == "cuda":
        return (torch.bfloat16,)
    return (torch.float32, torch.bfloat16) if native_bf16_cpu() else (torch.float32,)


def op_setup(op, device, size, dtype):
    """What the cases() of an op over activations in `dtype` starts from."""
    quick = size != "full"
    available, skipped = nanolm_backends(op, device, dtype)
    return OpSetup(shape_key(size, device), dtype, str(dtype).replace("torch.", ""), available,
                   {**skipped, **compile_skipped(device, quick)}, compile_baselines(device, quick))


# The op table: name -> module whose cases(device, size) returns a list of Case.
# size is "quick", "full" or "tiny" (tests). Adding an op is one entry here.
OPS = {
    "layernorm": "bench.op_layernorm",
    "attention": "bench.op_attention",
    "cross_entropy": "bench.op_cross_entropy",
    "linear_cross_entropy": "bench.op_linear_cross_entropy",
    "adamw": "bench.op_adamw",
    "rope": "bench.op_rope",
    "mlp_activation": "bench.op_mlp_activation",
    "train_step": "bench.op_train_step",
    "recompute": "bench.op_recompute",
}


def build_cases(op, device, size):
    cases = importlib.import_module(OPS[op]).cases(device, size)
    for case in cases:
        for impl in case.impls:
            if emulated_reason(impl.name):
                impl.kind = "emulated"
    return cases

"""Backend selection: which implementation runs each hot op (`--kernels`).

A backend is a name every op module lists in its BACKENDS table: torch (the specification),
triton (kernels/), cpu and cuda (csrc/, through nanolm._C), cuda_sim (the CUDA kernels on the
CPU emulation, nanolm._C_sim). Selection strings, as given to `--kernels`:
  "auto"                          the best available backend per op on the device
  "triton"                        one backend for every op it implements (an error if it cannot
                                  run one here); an op it has no kernels for takes "auto"
  "auto,attention=triton,layernorm=cuda"   a default followed by per-op overrides
Asking for a backend that is not built or not usable on the device is an error, never a
silent fallback. The result, {op: backend name}, is what the model and optimizer hold (`impls`)
and what the registered ops take in their schema.
"""
import json
import os
from importlib import resources
from types import SimpleNamespace

import torch

from nanolm.ops import OPS, functions
from nanolm.ops.launch import C_SIM_ERROR, _C
from nanolm.ops.support import dtype_name

BACKENDS = ("torch", "triton", "cuda", "cpu", "cuda_sim")


def _triton_unavailable(device):
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "CUDA is not available"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return "Triton runs on CUDA devices, or on CPU only under TRITON_INTERPRET=1"


def _cuda_unavailable(device):
    if _C is None:
        return "nanolm._C is not built"
    if not _C.build_info()["cuda"]:
        return "nanolm._C was built without CUDA (no nvcc at build time, or NANOLM_CUDA=off)"
    return None if torch.cuda.is_available() else "CUDA is not available"


def _cuda_sim_unavailable(device):
    if isinstance(C_SIM_ERROR, ModuleNotFoundError):
        return ("nanolm._C_sim is not built: the install found no CUDA headers (cuda_bf16.h; set "
                "CUDA_HOME and reinstall) or had NANOLM_CUDA_SIM=off")
    if C_SIM_ERROR is not None:
        return f"nanolm._C_sim does not load ({C_SIM_ERROR})"
    return None


# backend -> device -> why it cannot run there at all (not built, not installed, no device), or None
RUNS = {
    "torch": lambda device: None,
    "triton": _triton_unavailable,
    "cuda": _cuda_unavailable,
    "cpu": lambda device: None if _C is not None else "nanolm._C is not built",
    "cuda_sim": _cuda_sim_unavailable,
}

# How each GPU kernel has been verified (nanolm/verification.json; README's tables are made from it).
VERIFICATION = json.loads(resources.files("nanolm").joinpath("verification.json").read_text())


def verified_on_gpu(backend, op):
    """Whether every kernel of backend's op has passed its gpu-marked tests on a GPU (False for
    an op the backend has no kernels for)."""
    return op in VERIFICATION[backend] and all(record["gpu_run"] for record in VERIFICATION[backend][op].values())


# What `auto` tries, best first, per device type; torch is always last and always works.
# On CUDA, triton first: its kernels are checked in CI by the interpreter (fp32) and compiled
# for sm_80/sm_90a. cuda joins an op's order only once all of its kernels passed on a GPU
# (emulation in CI is not enough); until then it is chosen only by name.
# cuda_sim (the CUDA kernels emulated on the CPU, for tests and study) is never automatic.
AUTO_ORDER = {
    "cuda": {op: ("triton", "cuda", "torch") if verified_on_gpu("cuda", op) else ("triton", "torch") for op in OPS},
    "cpu": {op: ("cpu", "torch") for op in OPS},
}


def implementation(name, op):
    """Backend `name`'s implementation of op (its support row and functions), or None."""
    return OPS[op].BACKENDS.get(name)


def support_reason(name, op, device, dtype=None, gqa=False):
    """Why backend `name`'s support row excludes `op` on `device` (for `dtype`, when given; with
    K/V heads shared by groups of query heads, when gqa), or None if the row lists it."""
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; valid: {', '.join(BACKENDS)}, auto")
    impl = implementation(name, op)
    if impl is None:
        return f"does not implement {op}"
    support = impl.support
    dtypes = support.dtypes.get(device.type)
    if dtypes is None:
        return f"runs {op} on {' or '.join(support.devices())} only"
    if dtype is not None and dtype not in dtypes:
        names = ", ".join(map(dtype_name, dtypes))
        note = support.notes.get(device.type)
        return f"{op} on {device.type} takes {names}" + (f" ({note})" if note else "")
    if gqa and op == "attention" and not support.gqa:
        return "has no grouped-query attention (n_kv_head < n_head; its support row says gqa=False)"
    return None


def unavailable_reason(name, op, device, dtype=None, gqa=False):
    """Why backend `name` cannot run `op` on `device` (for `dtype`, when given; grouped-query
    attention, when gqa), or None if it can: its support row lists it, and the backend runs there
    (built, installed, device present)."""
    return support_reason(name, op, device, dtype, gqa) or RUNS[name](device)


def resolve(spec, device, gqa=False):
    """Parse a --kernels string into {op: backend name} for `device` (a torch.device); gqa: the
    model shares K/V heads between query heads (n_kv_head < n_head), which `auto` then picks
    only a backend supporting, and a named backend without it is refused."""
    default, overrides = "auto", {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        if "=" in part:
            op, name = (s.strip() for s in part.split("=", 1))
            if op not in OPS:
                raise ValueError(f"unknown op {op!r} in --kernels; valid ops: {', '.join(OPS)}")
            overrides[op] = name
        else:
            default = part
    choice = {}
    for op in OPS:
        name = overrides.get(op, default)
        if op not in overrides and name in BACKENDS and implementation(name, op) is None:
            name = "auto"  # a default names the backend of the ops it has; the newer ops (rope) run their best
        if name == "auto":
            order = AUTO_ORDER[device.type][op]
            name = next(n for n in order if unavailable_reason(n, op, device, gqa=gqa) is None)
        reason = unavailable_reason(name, op, device, gqa=gqa)
        if reason is not None:
            raise ValueError(f"kernel backend {name!r} cannot run {op} on {device}: {reason}")
        choice[op] = name
    return choice


def load(name):
    """Everything backend `name` implements, as one namespace (for tests, the bench and
    nanolm.info): SUPPORT {op: support row}, unavailable_reason(device), and every function of
    every op it implements, by the specification's names."""
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; valid: {', '.join(BACKENDS)}, auto")
    impls = {op: impl for op in OPS if (impl := implementation(name, op)) is not None}
    return SimpleNamespace(name=name, SUPPORT={op: impl.support for op, impl in impls.items()},
                           unavailable_reason=RUNS[name],
                           **{fn: getattr(impl, fn) for op, impl in impls.items() for fn in functions(op)})

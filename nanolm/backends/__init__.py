"""Backend selection: which implementation runs each hot op.

A backend is a module of plain functions with the signatures listed in torch_ref.py, plus
`OPS` (the ops it implements) and `unavailable_reason(device)` (None when usable there).
Selection strings, as given to `--kernels`:
  "auto"                          the best available backend per op on the device
  "triton"                        one backend for every op (an error if it lacks one)
  "auto,attention=triton,layernorm=cuda"   a default followed by per-op overrides
Asking for a backend that is not built or not usable on the device is an error, never a
silent fallback.
"""
import importlib

from nanolm.backends import cuda

OPS = ("layernorm", "attention", "cross_entropy", "adamw")
BACKENDS = {"torch": "torch_ref", "triton": "triton", "cuda": "cuda", "cpu": "cpu", "cuda_sim": "cuda_sim"}

# What `auto` tries, best first, per device type; torch is always last and always works.
# On CUDA, triton first: its attention passed the GPU tests on an H100 and beat SDPA's flash
# backend there. cuda joins an op's order only once all of its kernels passed on a GPU
# (cuda.GPU_RUNS; emulation in CI is not enough); until then it is chosen only by name.
# cuda_sim (the CUDA kernels emulated on the CPU, for tests and study) is never automatic.
AUTO_ORDER = {
    "cuda": {op: ("triton", "cuda", "torch") if cuda.verified_on_gpu(op) else ("triton", "torch") for op in OPS},
    "cpu": {op: ("cpu", "torch") for op in OPS},
}


def load(name):
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; valid: {', '.join(BACKENDS)}, auto")
    return importlib.import_module(f"nanolm.backends.{BACKENDS[name]}")


def unavailable_reason(name, op, device):
    """Why backend `name` cannot run `op` on `device`, or None if it can."""
    try:
        module = load(name)
    except ImportError as e:
        return f"could not be imported ({e})"
    if op not in module.OPS:
        return f"does not implement {op}"
    return module.unavailable_reason(device)


def resolve(spec, device):
    """Parse a --kernels string into {op: backend name} for `device` (a torch.device)."""
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
        if name == "auto":
            order = AUTO_ORDER[device.type][op]
            name = next(n for n in order if unavailable_reason(n, op, device) is None)
        reason = unavailable_reason(name, op, device)
        if reason is not None:
            raise ValueError(f"kernel backend {name!r} cannot run {op} on {device}: {reason}")
        choice[op] = name
    return choice


def modules(choice):
    """{op: backend name} -> {op: backend module}, what the model and optimizer hold."""
    return {op: load(name) for op, name in choice.items()}

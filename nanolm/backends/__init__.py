"""Backend selection: which implementation runs each hot op.

A backend is a module of plain functions with the signatures of the contract in torch_ref.py,
plus two names: `SUPPORT`, its table {op: common.Support} of what it accepts (devices, dtypes
per device, head sizes, max row length, alignment), and `unavailable_reason(device)` (None when
it can run there at all: built, installed, device present). Selection strings, as given to
`--kernels`:
  "auto"                          the best available backend per op on the device
  "triton"                        one backend for every op (an error if it lacks one)
  "auto,attention=triton,layernorm=cuda"   a default followed by per-op overrides
Asking for a backend that is not built or not usable on the device is an error, never a
silent fallback. The result, {op: backend module}, is what the model and optimizer hold; it is
called `impls` everywhere.

To add a dtype, head size or device to a backend: edit its SUPPORT entry, and make the kernel
handle it (tests/test_contract.py then checks it is accepted and everything else rejected).
To add a backend: a module with SUPPORT, unavailable_reason and the functions below, a line in
BACKENDS (and in AUTO_ORDER if `auto` should pick it). To add an op: a line in OPS, its functions
in torch_ref.py (the specification) and an entry in the SUPPORT of each backend implementing it.
"""
import importlib

from nanolm.backends.common import dtype_name

# The contract: each op and the functions a backend implements for it (signatures in torch_ref.py).
OPS = {
    "layernorm": ("layer_norm_fwd", "add_layer_norm_fwd", "layer_norm_bwd"),
    "attention": ("attention_fwd", "attention_bwd"),
    "cross_entropy": ("cross_entropy_fwd", "cross_entropy_stats", "cross_entropy_grad"),
    "adamw": ("adamw_step", "sum_of_squares"),
}
BACKENDS = {"torch": "torch_ref", "triton": "triton", "cuda": "cuda", "cpu": "cpu", "cuda_sim": "cuda_sim"}

from nanolm.backends import cuda  # noqa: E402  (after OPS: cuda's imports read this module)

# What `auto` tries, best first, per device type; torch is always last and always works.
# On CUDA, triton first: its kernels are checked in CI by the interpreter (fp32) and compiled
# for sm_80/sm_90a (triton.KERNELS; no GPU run is recorded in the repo). cuda joins an op's
# order only once all of its kernels passed on a GPU (cuda.GPU_RUNS; emulation in CI is not
# enough); until then it is chosen only by name.
# cuda_sim (the CUDA kernels emulated on the CPU, for tests and study) is never automatic.
AUTO_ORDER = {
    "cuda": {op: ("triton", "cuda", "torch") if cuda.verified_on_gpu(op) else ("triton", "torch") for op in OPS},
    "cpu": {op: ("cpu", "torch") for op in OPS},
}


def load(name):
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; valid: {', '.join(BACKENDS)}, auto")
    return importlib.import_module(f"nanolm.backends.{BACKENDS[name]}")


def support_reason(name, op, device, dtype=None):
    """Why backend `name`'s SUPPORT table excludes `op` on `device` (for `dtype`, when given),
    or None if the table lists it."""
    try:
        module = load(name)
    except ImportError as e:
        return f"could not be imported ({e})"
    support = module.SUPPORT.get(op)
    if support is None:
        return f"does not implement {op}"
    dtypes = support.dtypes.get(device.type)
    if dtypes is None:
        return f"runs {op} on {' or '.join(support.devices())} only"
    if dtype is not None and dtype not in dtypes:
        names = ", ".join(map(dtype_name, dtypes))
        note = support.notes.get(device.type)
        return f"{op} on {device.type} takes {names}" + (f" ({note})" if note else "")
    return None


def unavailable_reason(name, op, device, dtype=None):
    """Why backend `name` cannot run `op` on `device` (for `dtype`, when given), or None if it
    can: its SUPPORT table lists it, and the backend runs there (built, installed, device present)."""
    return support_reason(name, op, device, dtype) or load(name).unavailable_reason(device)


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


def impls(choice):
    """{op: backend name} -> {op: backend module}: the `impls` the model and optimizer hold."""
    return {op: load(name) for op, name in choice.items()}

"""SwiGLU and ReLU² cases (nanolm/ops/mlp_activation.py), forward and backward.
Shapes: B·T rows by the hidden width F of a GPT-2-small-sized MLP (4C = 3072; SwiGLU's 8C/3 = 2048)."""
import torch
import torch.nn.functional as F

from bench import formulas
from bench.cases import Case, Impl, op_dtypes, op_setup, tol_for
from nanolm.ops import mlp_activation

SHAPES = {  # (N rows, F)
    "full_cuda": [(n, f) for f in (2048, 3072) for n in (8192, 32768)],
    "full_cpu": [(8192, 2048), (8192, 3072)],
    "quick_cuda": [(16384, 2048)],
    "quick_cpu": [(2048, 2048)],
    "tiny": [(7, 48)],
}


def _inputs(N, F_, dtype, device):
    def make():
        def rand(width):
            return torch.randn(N, width, dtype=dtype, device=device)
        return {"gate_up": rand(2 * F_), "x": rand(F_), "da": rand(F_)}
    return make


EAGER = {"swiglu": lambda gu: F.silu(gu.chunk(2, -1)[0]) * gu.chunk(2, -1)[1], "relu2": lambda x: F.relu(x).square()}
INPUT = {"swiglu": "gate_up", "relu2": "x"}


def _eager_bwd(kind):
    def make(t):
        x = t[INPUT[kind]].detach().requires_grad_()
        y = EAGER[kind](x)
        return lambda: torch.autograd.grad(y, (x,), t["da"], retain_graph=True)
    return make


def cases(device, size):
    return [case for dtype in op_dtypes(device) for case in _cases(device, size, dtype)]


def _cases(device, size, dtype):
    key, dtype, dname, available, skipped, _ = op_setup("mlp_activation", device, size, dtype)
    s, out = dtype.itemsize, []
    for N, F_ in SHAPES[key]:
        common = dict(op="mlp_activation", dtype=dtype, x=N * F_, x_label="elements N·F", metric="GB/s",
                      make_inputs=_inputs(N, F_, dtype, device), tol=tol_for(dtype), working_set=5 * N * F_ * s,
                      skipped=skipped)
        for kind in ("swiglu", "relu2"):
            fwd, bwd = getattr(mlp_activation, f"{kind}_fwd"), getattr(mlp_activation, f"{kind}_bwd")
            out.append(Case(
                name=f"{kind} fwd N={N} F={F_} {dname}", series=f"{kind} fwd {dname}",
                work=formulas.mlp_activation_bytes(N, F_, s, kind),
                reference=lambda t, k=kind, f=fwd: (f(t[INPUT[k]]),),
                impls=[Impl(name, "nanolm", lambda t, be=be, k=kind: lambda: (getattr(be, f"{k}_fwd")(t[INPUT[k]]),))
                       for name, be in available.items()]
                + [Impl("eager", "baseline", lambda t, k=kind: lambda: (EAGER[k](t[INPUT[k]]),))], **common))
            out.append(Case(
                name=f"{kind} bwd N={N} F={F_} {dname}", series=f"{kind} bwd {dname}",
                work=formulas.mlp_activation_bytes(N, F_, s, kind, backward=True),
                reference=lambda t, k=kind, f=bwd: (f(t["da"], t[INPUT[k]]),),
                impls=[Impl(name, "nanolm", lambda t, be=be, k=kind: lambda: (getattr(be, f"{k}_bwd")(t["da"],
                                                                                                     t[INPUT[k]]),))
                       for name, be in available.items()] + [Impl("eager", "baseline", _eager_bwd(kind))], **common))
    return out

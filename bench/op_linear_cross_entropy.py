"""Cross-entropy fused with the lm_head (nanolm.ops.cross_entropy.linear_cross_entropy, chunked so the
(N, V) logits never exist) against F.linear + F.cross_entropy + backward. Forward and
backward together; the point is peak memory as much as time. One implementation per backend
that provides the cross_entropy op (the chunk kernel)."""
import torch
import torch.nn.functional as F

from bench.cases import Case, Impl, op_dtypes, op_setup, tol_for
from nanolm import flops
from nanolm.ops import cross_entropy

SHAPES = {  # (N, C, Vp, vocab)
    "full_cuda": [(n, c, 50304, 50257) for c in (768, 1600) for n in (8192, 16384, 32768)],
    "full_cpu": [(1024, 768, 50304, 50257), (2048, 768, 50304, 50257)],  # ~2.4 s per call at 0.1 TFLOP/s
    "quick_cuda": [(8192, 768, 50304, 50257)],
    "quick_cpu": [(512, 256, 8192, 8000)],
    "tiny": [(32, 24, 80, 77)],
}


def _inputs(N, C, Vp, V, dtype, device):
    def make():
        return {"h": torch.randn(N, C, dtype=dtype, device=device),
                "w": 0.05 * torch.randn(Vp, C, dtype=dtype, device=device),
                "targets": torch.randint(0, V, (N,), device=device)}
    return make


def _graph(fn, dtype=None):
    def make(t):
        def run():
            h, w = (t[n].detach().to(dtype or t[n].dtype).requires_grad_() for n in ("h", "w"))
            loss = fn(h, w, t["targets"])
            return (loss.detach(), *torch.autograd.grad(loss, (h, w)))
        return run
    return make


def cases(device, size):
    return [case for dtype in op_dtypes(device) for case in _cases(device, size, dtype)]


def _cases(device, size, dtype):
    key, dtype, dname, available, skipped, compiled = op_setup("cross_entropy", device, size, dtype)
    out = []
    for N, C, Vp, V in SHAPES[key]:
        def eager(h, w, targets, V=V):
            return F.cross_entropy(F.linear(h, w)[:, :V].float(), targets)

        fns = {"eager": eager}
        if compiled:
            fns["torch.compile"] = torch.compile(eager)
        impls = [Impl(n, "nanolm", _graph(lambda h, w, tg, n=n, V=V: cross_entropy.linear_cross_entropy(
            h, w, tg, n, vocab_size=V))) for n in available]
        impls += [Impl(n, "baseline", _graph(fn)) for n, fn in fns.items()]
        out.append(Case(op="linear_cross_entropy", dtype=dtype, name=f"N={N} C={C} Vp={Vp} {dname}",
                        series=f"C={C} {dname}", x=N, x_label="rows N", metric="TFLOP/s",
                        work=flops.linear_cross_entropy_flops(N, C, Vp),
                        make_inputs=_inputs(N, C, Vp, V, dtype, device),
                        reference=_graph(eager, torch.float32 if dtype != torch.float64 else None),
                        impls=impls, tol=tol_for(dtype), skipped=skipped))
        out[-1].reference = (lambda g: lambda t: g(t)())(out[-1].reference)
    return out

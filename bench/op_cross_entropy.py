"""Cross-entropy over materialised logits: loss and dlogits in one call (the nanolm kernel)
against F.cross_entropy forward + backward as a user writes it under autocast (logits cast to
float32). Shapes: rows B·T 8k-32k (2k-4k on CPU), vocab 50257 padded to 50304 (nanolm's layout) or unpadded."""
import torch
import torch.nn.functional as F

from bench import formulas
from bench.cases import Case, Impl, op_dtypes, op_setup, tol_for
from nanolm.ops import cross_entropy

SHAPES = {  # (N, Vp, vocab)
    "full_cuda": [(n, vp, 50257) for vp in (50304, 50257) for n in (8192, 16384, 32768)],
    "full_cpu": [(2048, 50304, 50257), (4096, 50304, 50257), (2048, 50257, 50257)],  # 8k rows: 17.6 GB resident of 24
    "quick_cuda": [(8192, 50304, 50257), (16384, 50304, 50257)],
    "quick_cpu": [(512, 8192, 8000), (2048, 8192, 8000)],
    "tiny": [(16, 80, 77)],
}


def _inputs(N, Vp, V, dtype, device):
    def make():
        return {"logits": 2 * torch.randn(N, Vp, dtype=dtype, device=device),
                "targets": torch.randint(0, V, (N,), device=device)}
    return make


def _reference(V):
    def ref(t):
        losses, dlogits = cross_entropy.cross_entropy_fwd(t["logits"], t["targets"], V, -100, 0.0,
                                                      1 / len(t["targets"]), False)
        return losses.mean(), dlogits
    return ref


def _baseline(fn):
    def make(t):
        def run():
            x = t["logits"].detach().requires_grad_()
            loss = fn(x, t["targets"])
            return loss.detach(), torch.autograd.grad(loss, x)[0]
        return run
    return make


def cases(device, size):
    return [case for dtype in op_dtypes(device) for case in _cases(device, size, dtype)]


def _cases(device, size, dtype):
    key, dtype, dname, available, skipped, compiled = op_setup("cross_entropy", device, size, dtype)
    out = []
    for N, Vp, V in SHAPES[key]:
        def eager(x, targets, V=V):
            return F.cross_entropy(x[:, :V].float(), targets)

        fns = {"eager": eager}
        if compiled:
            fns["torch.compile"] = torch.compile(eager)
        impls = [Impl(n, "nanolm", lambda t, be=be, V=V: lambda: (lambda r: (r[0].sum() / len(t["targets"]), r[1]))(
            be.cross_entropy_fwd(t["logits"], t["targets"], V, -100, 0.0, 1 / len(t["targets"]), False)))
            for n, be in available.items()]
        impls += [Impl(n, "baseline", _baseline(fn)) for n, fn in fns.items()]
        out.append(Case(op="cross_entropy", dtype=dtype, name=f"N={N} Vp={Vp} V={V} {dname}",
                        series=f"Vp={Vp} {dname}", x=N * Vp, x_label="logits N·Vp", metric="GB/s",
                        work=formulas.cross_entropy_bytes(N, Vp, dtype.itemsize),
                        make_inputs=_inputs(N, Vp, V, dtype, device), reference=_reference(V),
                        impls=impls, tol=tol_for(dtype), working_set=2 * N * Vp * dtype.itemsize,
                        skipped=skipped))
    return out

"""LayerNorm cases: forward, forward with the residual add (add_layer_norm), backward; and the
same three for RMSNorm (rms_norm, add_rms_norm, the LayerNorm kernels' rms instantiations),
against torch.nn.functional.rms_norm eager and compiled.
Shapes: GPT-2 widths 768-1600, rows B·T 8k-64k (bf16 on GPU; fp32 and fewer shapes on CPU)."""
import torch
import torch.nn.functional as F

from bench import formulas
from bench.cases import Case, Impl, op_dtypes, op_setup, tol_for
from nanolm.ops import layernorm

EPS = 1e-5
SHAPES = {  # (N rows, C)
    "full_cuda": [(n, c) for c in (768, 1024, 1280, 1600) for n in (8192, 16384, 32768, 65536)],
    "full_cpu": [(n, c) for c in (768, 1600) for n in (8192, 32768)],
    "quick_cuda": [(16384, 768), (16384, 1600)],
    "quick_cpu": [(1024, 768), (4096, 768)],
    "tiny": [(64, 96)],
}


def _inputs(N, C, dtype, device):
    def make():
        x = torch.randn(N, C, dtype=dtype, device=device)
        t = {"x": x, "residual": torch.randn_like(x), "dy": torch.randn_like(x),
             "w": 1 + 0.1 * torch.randn(C, dtype=dtype, device=device),
             "b": 0.1 * torch.randn(C, dtype=dtype, device=device)}
        _, t["mean"], t["rstd"] = layernorm.layer_norm_fwd(x, t["w"], t["b"], EPS)
        _, t["rms_rstd"] = layernorm.rms_norm_fwd(x, t["w"], EPS)
        return t
    return make


def _fwd_impls(available, residual, compiled):
    impls = []
    for name, be in available.items():
        if residual:
            impls.append(Impl(name, "nanolm", lambda t, be=be: lambda: be.add_layer_norm_fwd(
                t["x"], t["residual"], t["w"], t["b"], EPS, None)[:2]))
        else:
            impls.append(Impl(name, "nanolm", lambda t, be=be: lambda: be.layer_norm_fwd(
                t["x"], t["w"], t["b"], EPS)[:1]))

    def eager(x, r, w, b):
        if r is None:
            return (F.layer_norm(x, (x.shape[1],), w, b, EPS),)
        s = x + r
        return F.layer_norm(s, (x.shape[1],), w, b, EPS), s

    fns = {"eager": eager}
    if compiled:
        fns["torch.compile"] = torch.compile(eager)
    for name, fn in fns.items():
        impls.append(Impl(name, "baseline", lambda t, fn=fn: lambda: fn(
            t["x"], t["residual"] if residual else None, t["w"], t["b"])))
    return impls


def _bwd_impls(available, compiled):
    impls = [Impl(name, "nanolm", lambda t, be=be: lambda: be.layer_norm_bwd(
        t["dy"], t["x"], t["w"], t["mean"], t["rstd"], None, None, None)) for name, be in available.items()]

    def eager_graph(t):
        x, w, b = (t[k].detach().requires_grad_() for k in ("x", "w", "b"))
        y = F.layer_norm(x, (x.shape[1],), w, b, EPS)
        return lambda: torch.autograd.grad(y, (x, w, b), t["dy"], retain_graph=True)

    impls.append(Impl("eager", "baseline", eager_graph))
    if compiled:
        bwd = torch.compile(layernorm.layer_norm_bwd)
        impls.append(Impl("torch.compile", "baseline", lambda t: lambda: bwd(
            t["dy"], t["x"], t["w"], t["mean"], t["rstd"], None)))
    return impls


def _rms_fwd_impls(available, residual, compiled):
    impls = []
    for name, be in available.items():
        if residual:
            impls.append(Impl(name, "nanolm", lambda t, be=be: lambda: be.add_rms_norm_fwd(
                t["x"], t["residual"], t["w"], EPS, None)[:2]))
        else:
            impls.append(Impl(name, "nanolm", lambda t, be=be: lambda: be.rms_norm_fwd(t["x"], t["w"], EPS)[:1]))

    def eager(x, r, w):
        if r is None:
            return (F.rms_norm(x, (x.shape[1],), w, EPS),)
        s = x + r
        return F.rms_norm(s, (x.shape[1],), w, EPS), s

    fns = {"eager": eager}
    if compiled:
        fns["torch.compile"] = torch.compile(eager)
    for name, fn in fns.items():
        impls.append(Impl(name, "baseline", lambda t, fn=fn: lambda: fn(
            t["x"], t["residual"] if residual else None, t["w"])))
    return impls


def _rms_bwd_impls(available, compiled):
    impls = [Impl(name, "nanolm", lambda t, be=be: lambda: be.rms_norm_bwd(
        t["dy"], t["x"], t["w"], t["rms_rstd"], None, None, None)) for name, be in available.items()]

    def eager_graph(t):
        x, w = (t[k].detach().requires_grad_() for k in ("x", "w"))
        y = F.rms_norm(x, (x.shape[1],), w, EPS)
        return lambda: torch.autograd.grad(y, (x, w), t["dy"], retain_graph=True)

    impls.append(Impl("eager", "baseline", eager_graph))
    if compiled:
        bwd = torch.compile(layernorm.rms_norm_bwd)
        impls.append(Impl("torch.compile", "baseline", lambda t: lambda: bwd(
            t["dy"], t["x"], t["w"], t["rms_rstd"], None, None, None)))
    return impls


def cases(device, size):
    return [case for dtype in op_dtypes(device) for case in _cases(device, size, dtype)]


def _cases(device, size, dtype):
    key, dtype, dname, available, skipped, compiled = op_setup("layernorm", device, size, dtype)
    s = dtype.itemsize
    out = []
    for N, C in SHAPES[key]:
        make, tol, ws = _inputs(N, C, dtype, device), tol_for(dtype), 4 * N * C * s
        common = dict(op="layernorm", dtype=dtype, x=N * C, x_label="elements N·C", metric="GB/s",
                      make_inputs=make, tol=tol, working_set=ws, skipped=skipped)
        out.append(Case(name=f"fwd N={N} C={C} {dname}", series=f"fwd {dname}",
                        work=formulas.layernorm_fwd_bytes(N, C, s),
                        reference=lambda t: layernorm.layer_norm_fwd(t["x"], t["w"], t["b"], EPS)[:1],
                        impls=_fwd_impls(available, False, compiled), **common))
        out.append(Case(name=f"fwd+residual N={N} C={C} {dname}", series=f"fwd+residual {dname}",
                        work=formulas.layernorm_fwd_bytes(N, C, s, residual=True),
                        reference=lambda t: layernorm.add_layer_norm_fwd(
                            t["x"], t["residual"], t["w"], t["b"], EPS, None)[:2],
                        impls=_fwd_impls(available, True, compiled), **common))
        out.append(Case(name=f"bwd N={N} C={C} {dname}", series=f"bwd {dname}",
                        work=formulas.layernorm_bwd_bytes(N, C, s),
                        reference=lambda t: layernorm.layer_norm_bwd(
                            t["dy"], t["x"], t["w"], t["mean"], t["rstd"], None, None, None),
                        impls=_bwd_impls(available, compiled), **common))
        out.append(Case(name=f"rms fwd N={N} C={C} {dname}", series=f"rms fwd {dname}",
                        work=formulas.rmsnorm_fwd_bytes(N, C, s),
                        reference=lambda t: layernorm.rms_norm_fwd(t["x"], t["w"], EPS)[:1],
                        impls=_rms_fwd_impls(available, False, compiled), **common))
        out.append(Case(name=f"rms fwd+residual N={N} C={C} {dname}", series=f"rms fwd+residual {dname}",
                        work=formulas.rmsnorm_fwd_bytes(N, C, s, residual=True),
                        reference=lambda t: layernorm.add_rms_norm_fwd(t["x"], t["residual"], t["w"], EPS, None)[:2],
                        impls=_rms_fwd_impls(available, True, compiled), **common))
        out.append(Case(name=f"rms bwd N={N} C={C} {dname}", series=f"rms bwd {dname}",
                        work=formulas.rmsnorm_bwd_bytes(N, C, s),
                        reference=lambda t: layernorm.rms_norm_bwd(
                            t["dy"], t["x"], t["w"], t["rms_rstd"], None, None, None),
                        impls=_rms_bwd_impls(available, compiled), **common))
    return out

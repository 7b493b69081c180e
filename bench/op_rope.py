"""QK-norm + RoPE cases (nanolm/ops/rope.py): forward and backward over the packed qkv.
Shapes: B·T rows of a GPT-2-small-like block (12 heads of 64; MHA and GQA with 4 KV heads)."""
import torch

from bench import formulas
from bench.cases import Case, Impl, op_dtypes, op_setup, tol_for
from nanolm.ops import rope

THETA = 10000.0
SHAPES = {  # (B, T, H, Hkv, hs)
    "full_cuda": [(8, 1024, 12, 12, 64), (8, 1024, 12, 4, 64), (4, 2048, 16, 4, 128)],
    "full_cpu": [(4, 512, 12, 12, 64), (4, 512, 12, 4, 64)],
    "quick_cuda": [(8, 1024, 12, 4, 64)],
    "quick_cpu": [(2, 256, 12, 4, 64)],
    "tiny": [(1, 7, 4, 2, 16)],
}


def _inputs(B, T, H, Hkv, hs, dtype, device):
    def make():
        qkv = torch.randn(B, T, (H + 2 * Hkv) * hs, dtype=dtype, device=device)
        _, rstd = rope.qk_norm_rope_fwd(qkv, H, Hkv, 0, THETA, True)
        return {"qkv": qkv, "dout": torch.randn_like(qkv), "rstd": rstd}
    return make


def _eager_graph(t, H, Hkv):
    """PyTorch's way, as nanochat writes it: split, F.rms_norm per head, rotate, concatenate."""
    qkv = t["qkv"].detach().requires_grad_()
    B, T, W = qkv.shape
    heads = qkv.view(B, T, H + 2 * Hkv, W // (H + 2 * Hkv))
    qk, v = heads[:, :, : H + Hkv], heads[:, :, H + Hkv:]
    n = torch.nn.functional.rms_norm(qk, (qk.shape[-1],), eps=rope.QK_NORM_EPS)
    cos, sin = rope.rope_angles(T, qk.shape[-1], 0, THETA, torch.float32, qkv.device)
    half = qk.shape[-1] // 2
    rotated = n * cos[:, None].to(n.dtype) + torch.cat((-n[..., half:], n[..., :half]), -1) * sin[:, None].to(n.dtype)
    return qkv, torch.cat((rotated, v), dim=2).view(B, T, W)


def cases(device, size):
    return [case for dtype in op_dtypes(device) for case in _cases(device, size, dtype)]


def _cases(device, size, dtype):
    key, dtype, dname, available, skipped, _ = op_setup("rope", device, size, dtype)
    return [case for shape in SHAPES[key] for case in _shape_cases(*shape, dtype, dname, available, skipped, device)]


def _shape_cases(B, T, H, Hkv, hs, dtype, dname, available, skipped, device):
    s, N, W = dtype.itemsize, B * T, (H + 2 * Hkv) * hs
    common = dict(op="rope", dtype=dtype, x=N * W, x_label="elements B·T·W", metric="GB/s",
                  make_inputs=_inputs(B, T, H, Hkv, hs, dtype, device), tol=tol_for(dtype),
                  working_set=3 * N * W * s, skipped=skipped)

    def reference_fwd(t):
        return rope.qk_norm_rope_fwd(t["qkv"], H, Hkv, 0, THETA, True)[:1]

    def reference_bwd(t):
        return (rope.qk_norm_rope_bwd(t["dout"], t["qkv"], t["rstd"], H, Hkv, 0, THETA, True),)

    def eager_bwd(t):
        qkv, y = _eager_graph(t, H, Hkv)
        return lambda: torch.autograd.grad(y, (qkv,), t["dout"], retain_graph=True)

    fwd = [Impl(name, "nanolm", lambda t, be=be: lambda: be.qk_norm_rope_fwd(t["qkv"], H, Hkv, 0, THETA, True)[:1])
           for name, be in available.items()]
    fwd.append(Impl("eager", "baseline", lambda t: lambda: (_eager_graph(t, H, Hkv)[1],)))
    bwd = [Impl(name, "nanolm", lambda t, be=be: lambda: (be.qk_norm_rope_bwd(
        t["dout"], t["qkv"], t["rstd"], H, Hkv, 0, THETA, True),)) for name, be in available.items()]
    bwd.append(Impl("eager", "baseline", eager_bwd))
    shape = f"B={B} T={T} H={H} Hkv={Hkv} hs={hs} {dname}"
    return [Case(name=f"fwd {shape}", series=f"fwd {dname}", work=formulas.rope_bytes(N, W, H + Hkv, s),
                 reference=reference_fwd, impls=fwd, **common),
            Case(name=f"bwd {shape}", series=f"bwd {dname}", work=formulas.rope_bytes(N, W, H + Hkv, s, backward=True),
                 reference=reference_bwd, impls=bwd, **common)]

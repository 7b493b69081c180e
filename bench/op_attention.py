"""Causal attention cases: forward, backward, forward+backward over the fused qkv layout.
Shapes: B·T = 16k tokens, T 1k-8k, head dim 64 and 128, nh·hs = 2048 (as FlashAttention's
benchmark); bf16 on GPU, small fp32 on CPU. The reference runs on batch element 0 only, so
checking the T=8k cases does not need the (B, nh, T, T) fp32 score matrix of the whole batch."""
import math

import torch
import torch.nn.functional as F
from torch._functorch import config as functorch_config
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.cases import Case, Impl, op_dtypes, op_setup, tol_for
from nanolm import flops
from nanolm.ops import attention

SHAPES = {  # (B, T, nh, hs)
    "full_cuda": [(16384 // T, T, 2048 // hs, hs) for hs in (64, 128) for T in (1024, 2048, 4096, 8192)],
    "full_cpu": [(4096 // T, T, 12, 64) for T in (256, 512, 1024)],  # GPT-2 small heads, 4k tokens
    "quick_cuda": [(16, 1024, 32, 64), (4, 4096, 16, 128)],
    "quick_cpu": [(2, 128, 4, 64), (1, 256, 4, 64)],
    "tiny": [(1, 32, 2, 64)],  # head size 64: the one the cuda kernels (and cuda_sim) have
}
MODES = {"full": ("fwd", "bwd", "fwd+bwd"), "quick": ("fwd", "bwd"), "tiny": ("fwd", "bwd")}
NO_DONATED_BUFFERS = functorch_config.patch(donated_buffer=False)
SDPA = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION}


def _inputs(B, T, nh, hs, dtype, device):
    def make():
        qkv = torch.randn(B, T, 3, nh, hs, dtype=dtype, device=device)
        q, k, v = qkv.unbind(2)
        t = {"qkv": qkv, "q": q, "k": k, "v": v, "scale": 1 / math.sqrt(hs),
             "do": torch.randn(B, T, nh, hs, dtype=dtype, device=device)}
        outs = [attention.attention_fwd(q[b:b + 1], k[b:b + 1], v[b:b + 1], t["scale"], None) for b in range(B)]
        t["o"] = torch.cat([o for o, _ in outs]).contiguous()
        t["lse"] = torch.cat([lse for _, lse in outs]).contiguous()
        return t
    return make


def _reference(mode):
    def ref(t):
        q, k, v, do, o, lse = (t[n][:1] for n in ("q", "k", "v", "do", "o", "lse"))
        grads = [torch.empty_like(q, dtype=o.dtype) for _ in range(3)]
        attention.attention_bwd(do, q, k, v, o, lse, t["scale"], *grads, None)
        return {"fwd": (o,), "bwd": tuple(grads), "fwd+bwd": (o, *grads)}[mode]
    return ref


def softmax_attention(q, k, v, scale):
    """Attention written the ordinary way; q, k, v (B, T, nh, hs) -> (B, T, nh, hs)."""
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # (B, nh, T, hs)
    T = q.shape[2]
    att = (q @ k.transpose(-2, -1)) * scale
    att = att.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return (torch.softmax(att, dim=-1) @ v).transpose(1, 2)


def _sdpa(backend):
    def attn(q, k, v, scale):
        with sdpa_kernel(backend):
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=True, scale=scale)
        return o.transpose(1, 2)
    return attn


def _nanolm_impl(be, mode):
    def make(t):
        dqkv = torch.empty_like(t["qkv"])
        dq, dk, dv = dqkv.unbind(2)

        def run():
            o, lse = (t["o"], t["lse"]) if mode == "bwd" else be.attention_fwd(t["q"], t["k"], t["v"], t["scale"], None)
            if mode == "fwd":
                return (o,)
            be.attention_bwd(t["do"], t["q"], t["k"], t["v"], o, lse, t["scale"], dq, dk, dv, None)
            return (dq, dk, dv) if mode == "bwd" else (o, dq, dk, dv)
        return run
    return make


def _baseline_impl(fn, mode):
    def make(t):
        if mode == "fwd":
            return lambda: (fn(t["q"], t["k"], t["v"], t["scale"]),)
        qkv = t["qkv"].detach().requires_grad_()

        # Timing the backward alone replays one graph (retain_graph), which torch.compile forbids
        # when its backward reuses ("donates") the saved buffers. Dynamo shares compiled graphs
        # across modes and shapes and may compile a backward lazily, at its first call: so no
        # forward or backward here, compiled or not, donates.
        @NO_DONATED_BUFFERS
        def forward():
            q, k, v = qkv.unbind(2)
            return fn(q, k, v, t["scale"])

        @NO_DONATED_BUFFERS
        def grads(o, retain):
            return torch.autograd.grad(o, qkv, t["do"], retain_graph=retain)[0].unbind(2)

        if mode == "bwd":
            o = forward()
            return lambda: grads(o, True)

        def run():
            o = forward()
            return (o.detach(), *grads(o, False))
        return run
    return make


def _baselines(device, compiled, probe):
    fns = {"eager": softmax_attention}
    if compiled:
        fns["torch.compile"] = torch.compile(softmax_attention)
    skipped = {}
    for name, backend in SDPA.items():
        try:  # an SDPA backend that cannot run this device/dtype raises here
            _sdpa(backend)(*probe)
            fns[f"sdpa[{name}]"] = _sdpa(backend)
        except RuntimeError as e:
            skipped[f"sdpa[{name}]"] = str(e).splitlines()[0][:120]
    return fns, skipped


def _with_head_size(available, hs):
    """({name: backend} of those with a kernel for head size hs, {name: why not} of the others)."""
    sizes = {n: be.SUPPORT["attention"].head_sizes for n, be in available.items()}
    return ({n: be for n, be in available.items() if not sizes[n] or hs in sizes[n]},
            {n: f"no kernel for head size {hs} (has {', '.join(map(str, s))})"
             for n, s in sizes.items() if s and hs not in s})


def cases(device, size):
    return [case for dtype in op_dtypes(device) for case in _cases(device, size, dtype)]


def _cases(device, size, dtype):
    key, dtype, dname, available, skipped, compiled = op_setup("attention", device, size, dtype)
    out = []
    for B, T, nh, hs in SHAPES[key]:
        probe = [torch.randn(1, 16, nh, hs, dtype=dtype, device=device) for _ in range(3)] + [hs ** -0.5]
        fns, sdpa_skipped = _baselines(device, compiled, probe)
        here, no_kernel = _with_head_size(available, hs)
        for mode in MODES[size]:
            impls = [Impl(n, "nanolm", _nanolm_impl(be, mode)) for n, be in here.items()]
            impls += [Impl(n, "baseline", _baseline_impl(fn, mode)) for n, fn in fns.items()]
            out.append(Case(
                op="attention", dtype=dtype, name=f"{mode} B={B} T={T} nh={nh} hs={hs} {dname}",
                series=f"{mode} hs={hs} {dname}", x=T, x_label="sequence length T", metric="TFLOP/s",
                work=flops.attention_flops(B, nh, T, hs, mode),
                make_inputs=_inputs(B, T, nh, hs, dtype, device), reference=_reference(mode),
                impls=impls, tol=tol_for(dtype), working_set=5 * B * T * nh * hs * dtype.itemsize,
                view=lambda out: tuple(x[:1] for x in out), skipped={**skipped, **sdpa_skipped, **no_kernel}))
    return out

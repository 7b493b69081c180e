"""Causal attention cases: forward, backward, forward+backward over the fused qkv layout.
Shapes: B·T = 16k tokens, T 1k-8k, head dim 64 and 128, nh·hs = 2048 (as FlashAttention's
benchmark); bf16 on GPU, small fp32 on CPU. Grouped-query attention (nkv < nh K/V heads, each
shared by nh / nkv query heads) at Llama's 32/8 and SmolLM2's 9/3, against the eager
repeat-K/V-heads form (Llama's repeat_kv), its torch.compile, and SDPA with enable_gqa. The
reference runs on batch element 0 only, so checking the T=8k cases does not need the
(B, nh, T, T) fp32 score matrix of the whole batch."""
import math

import torch
import torch.nn.functional as F
from torch._functorch import config as functorch_config
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.cases import Case, Impl, op_dtypes, op_setup, tol_for
from nanolm import flops
from nanolm.ops import attention

SHAPES = {  # (B, T, nh, nkv, hs)
    "full_cuda": [(16384 // T, T, 2048 // hs, 2048 // hs, hs) for hs in (64, 128) for T in (1024, 2048, 4096, 8192)]
    + [(16384 // T, T, 32, 8, 64) for T in (1024, 4096)],
    "full_cpu": [(4096 // T, T, 12, 12, 64) for T in (256, 512, 1024)]  # GPT-2 small heads, 4k tokens
    + [(4096 // T, T, 9, 3, 64) for T in (256, 1024)],  # SmolLM2-135M's heads
    "quick_cuda": [(16, 1024, 32, 32, 64), (4, 4096, 16, 16, 128), (4, 4096, 32, 8, 64)],
    "quick_cpu": [(2, 128, 4, 4, 64), (1, 256, 4, 4, 64), (2, 128, 9, 3, 64)],
    "tiny": [(1, 32, 2, 2, 64), (1, 32, 6, 2, 64)],  # head size 64: the one the cuda kernels (and cuda_sim) have
}
MODES = {"full": ("fwd", "bwd", "fwd+bwd"), "quick": ("fwd", "bwd"), "tiny": ("fwd", "bwd")}
NO_DONATED_BUFFERS = functorch_config.patch(donated_buffer=False)
SDPA = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION}


def _split(qkv, nh):
    """q, k, v views into the packed (B, T, nh + 2*nkv, hs) [q heads | k heads | v heads]."""
    nkv = (qkv.shape[2] - nh) // 2
    return qkv.split((nh, nkv, nkv), dim=2)


def _inputs(B, T, nh, nkv, hs, dtype, device):
    def make():
        qkv = torch.randn(B, T, nh + 2 * nkv, hs, dtype=dtype, device=device)
        q, k, v = _split(qkv, nh)
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
        grads = [torch.empty_like(x, dtype=o.dtype) for x in (q, k, v)]
        attention.attention_bwd(do, q, k, v, o, lse, t["scale"], *grads, None)
        return {"fwd": (o,), "bwd": tuple(grads), "fwd+bwd": (o, *grads)}[mode]
    return ref


def softmax_attention(q, k, v, scale):
    """Attention written the ordinary way; q (B, T, nh, hs), k, v (B, T, nkv, hs) -> (B, T, nh, hs);
    with nkv < nh the K/V heads are repeated for their groups first (Llama's repeat_kv)."""
    group = q.shape[2] // k.shape[2]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # (B, nh, T, hs)
    T = q.shape[2]
    att = (q @ k.transpose(-2, -1)) * scale
    att = att.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return (torch.softmax(att, dim=-1) @ v).transpose(1, 2)


def _sdpa(backend):
    def attn(q, k, v, scale):
        with sdpa_kernel(backend):
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=True, scale=scale, enable_gqa=k.shape[2] != q.shape[2])
        return o.transpose(1, 2)
    return attn


def _nanolm_impl(be, mode):
    def make(t):
        dqkv = torch.empty_like(t["qkv"])
        dq, dk, dv = _split(dqkv, t["q"].shape[2])

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
        qkv, nh = t["qkv"].detach().requires_grad_(), t["q"].shape[2]

        # Timing the backward alone replays one graph (retain_graph), which torch.compile forbids
        # when its backward reuses ("donates") the saved buffers. Dynamo shares compiled graphs
        # across modes and shapes and may compile a backward lazily, at its first call: so no
        # forward or backward here, compiled or not, donates.
        @NO_DONATED_BUFFERS
        def forward():
            q, k, v = _split(qkv, nh)
            return fn(q, k, v, t["scale"])

        @NO_DONATED_BUFFERS
        def grads(o, retain):
            return _split(torch.autograd.grad(o, qkv, t["do"], retain_graph=retain)[0], nh)

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
    for B, T, nh, nkv, hs in SHAPES[key]:
        probe = [torch.randn(1, 16, n, hs, dtype=dtype, device=device) for n in (nh, nkv, nkv)] + [hs ** -0.5]
        fns, sdpa_skipped = _baselines(device, compiled, probe)
        here, no_kernel = _with_head_size(available, hs)
        gqa = f" nkv={nkv}" if nkv != nh else ""  # multi-head cases keep their names
        for mode in MODES[size]:
            impls = [Impl(n, "nanolm", _nanolm_impl(be, mode)) for n, be in here.items()]
            impls += [Impl(n, "baseline", _baseline_impl(fn, mode)) for n, fn in fns.items()]
            out.append(Case(
                op="attention", dtype=dtype, name=f"{mode} B={B} T={T} nh={nh}{gqa} hs={hs} {dname}",
                series=f"{mode} hs={hs}{gqa and f' nh/nkv={nh}/{nkv}'} {dname}", x=T, x_label="sequence length T",
                metric="TFLOP/s", work=flops.attention_flops(B, nh, T, hs, mode),
                make_inputs=_inputs(B, T, nh, nkv, hs, dtype, device), reference=_reference(mode),
                impls=impls, tol=tol_for(dtype), working_set=(3 * nh + 2 * nkv) * B * T * hs * dtype.itemsize,
                view=lambda out: tuple(x[:1] for x in out), skipped={**skipped, **sdpa_skipped, **no_kernel}))
    return out

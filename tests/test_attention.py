"""Causal attention backends (cpu, triton) against the float64 torch reference.

Inputs are fresh random values, laid out as the model lays them out (q, k, v strided views of
one (B, T, nh + 2*nkv, hs) tensor, dq, dk, dv views of one gradient buffer) and as plain
contiguous tensors; nkv < nh is grouped-query attention (GQA; nkv = 1 is MQA). Gradient
buffers are filled with NaN first so unwritten elements show. The backward reference is given
the backend's own o (delta = rowsum(dO * O) is a function of it), so in bf16/fp16 both sides
see the same rounded o.
"""
import math
import os
import subprocess
import sys

import pytest
import torch

from nanolm.ops import attention, backends
from nanolm.ops.backends import load

cpu, triton_backend = load("cpu"), load("triton")

# Errors are relative to max |ref| floored at 1: inputs are unit normal, and at T = 1 dq and dk
# are differences of nearly equal O(1) terms (dP - delta), so their reference is ~0.
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}
NAMES = ("o", "lse", "dq", "dk", "dv")


def make_qkv(B, T, nh, hs, dtype, device, fused=True, nkv=None):
    """q (B, T, nh, hs), k, v (B, T, nkv, hs) (nkv = nh by default)."""
    nkv = nkv or nh
    if fused:
        return torch.randn(B, T, nh + 2 * nkv, hs, dtype=dtype, device=device).split((nh, nkv, nkv), dim=2)
    return tuple(torch.randn(B, T, n, hs, dtype=dtype, device=device) for n in (nh, nkv, nkv))


def run(backend, q, k, v, do, scale):
    """Forward, then backward into NaN-poisoned views of one (B, T, nh + 2*nkv, hs) buffer (o
    and lse are NaN from the start too under the `poison` fixture)."""
    o, lse = backend.attention_fwd(q, k, v, scale, None)
    nh, nkv = q.shape[2], k.shape[2]
    grads = torch.full((*q.shape[:2], nh + 2 * nkv, q.shape[3]), float("nan"), dtype=q.dtype, device=q.device)
    dq, dk, dv = grads.split((nh, nkv, nkv), dim=2)
    backend.attention_bwd(do, q, k, v, o, lse, scale, dq, dk, dv, None)
    return o, lse, dq, dk, dv


def reference(q, k, v, do, o, scale):
    f64 = [t.double() for t in (q, k, v, do)]
    ro, rlse = attention.attention_fwd(*f64[:3], scale, None)
    grads = [torch.empty_like(t) for t in f64[:3]]
    attention.attention_bwd(f64[3], *f64[:3], o.double(), rlse, scale, *grads, None)
    return (ro, rlse, *grads)


def check_backend(backend, B, T, nh, hs, dtype, device, fused=True, nkv=None):
    q, k, v = make_qkv(B, T, nh, hs, dtype, device, fused, nkv)
    do = torch.randn(B, T, nh, hs, dtype=dtype, device=device)
    scale = 1 / math.sqrt(hs)
    out = run(backend, q, k, v, do, scale)
    ref = reference(q, k, v, do, out[0], scale)
    for name, a, r in zip(NAMES, out, ref):
        assert a.shape == r.shape, name
        err = (a.double() - r).abs().max().item()
        bound = TOL[dtype] * max(r.abs().max().item(), 1.0)
        assert err <= bound, (f"{name}: max error {err:.3g} > {bound:.3g} (B={B} T={T} nh={nh} nkv={nkv} hs={hs} "
                              f"{dtype})")


# ----------------------------------------------------------------------------- the specification's GQA

def _sdpa_reference(q, k, v, do):
    """o and dq, dk, dv of torch's own GQA (scaled_dot_product_attention with enable_gqa), float64."""
    leaves = [t.detach().double().transpose(1, 2).requires_grad_() for t in (q, k, v)]
    o = torch.nn.functional.scaled_dot_product_attention(*leaves, is_causal=True, enable_gqa=True)
    o.backward(do.double().transpose(1, 2))
    return o.transpose(1, 2), *(t.grad.transpose(1, 2) for t in leaves)


@pytest.mark.parametrize("nkv", [6, 2, 1])  # groups of 1 (MHA), 3, and 6 (MQA)
def test_spec_gqa_matches_sdpa_and_repeated_heads(nkv):
    """The float64 specification with K/V heads shared by groups equals SDPA's enable_gqa, and
    equals multi-head attention over K/V heads repeated (repeat_interleave) with dK, dV summed
    over each group."""
    B, T, nh, hs = 2, 37, 6, 16
    q, k, v = make_qkv(B, T, nh, hs, torch.float64, "cpu", nkv=nkv)
    do = torch.randn(B, T, nh, hs, dtype=torch.float64)
    out = run(attention.BACKENDS["torch"], q, k, v, do, hs ** -0.5)
    o, dq, dk, dv = out[0], *out[2:]
    for name, a, r in zip(("o", "dq", "dk", "dv"), (o, dq, dk, dv), _sdpa_reference(q, k, v, do)):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-10, msg=name)
    group = nh // nkv
    kr, vr = (t.repeat_interleave(group, dim=2) for t in (k, v))
    mha = run(attention.BACKENDS["torch"], q, kr, vr, do, hs ** -0.5)
    summed = [g.view(B, T, nkv, group, hs).sum(3) for g in mha[3:]]
    for name, a, r in zip(NAMES, out, (*mha[:3], *summed)):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12, msg=name)


def test_gqa_through_op_layer_autograd():
    """causal_attention over the packed [q heads | k heads | v heads] layout, gradchecked."""
    B, T, nh, nkv, hs = 1, 5, 4, 2, 4
    qkv = torch.randn(B, T, (nh + 2 * nkv) * hs, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: attention.causal_attention(t, nh, nkv, "torch", None), (qkv,))


@pytest.mark.parametrize("n_kv_head", [0, 4, 5])
def test_bad_n_kv_head(n_kv_head):
    with pytest.raises(ValueError, match=f"n_kv_head={n_kv_head} must be positive and divide n_head=6"):
        attention.causal_attention(torch.randn(1, 4, 14 * 4), 6, n_kv_head, "torch", None)


# ----------------------------------------------------------------------------- cpu backend

@pytest.mark.parametrize("B,T,nh,hs", [(1, 1, 2, 64), (2, 17, 3, 64), (1, 70, 2, 32), (2, 130, 2, 16),
                                       (1, 77, 2, 48), (1, 65, 1, 80), (1, 1000, 2, 64), (1, 1000, 1, 128)])
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_matches_reference(B, T, nh, hs, fused, dtype, poison):
    check_backend(cpu, B, T, nh, hs, dtype, "cpu", fused)


# Grouped-query attention: (B, T, nh, nkv, hs), groups of 3 (nh = 3 with nkv = 1 is MQA), of 4
# (MQA), of 2; T of one row, awkward, and 1000.
GQA_SHAPES = [(2, 77, 6, 2, 64), (1, 1, 6, 2, 64), (1, 1000, 6, 2, 64), (1, 1000, 3, 1, 128), (2, 130, 4, 1, 64),
              (1, 65, 6, 3, 128)]


@pytest.mark.parametrize("B,T,nh,nkv,hs", GQA_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_gqa_matches_reference(B, T, nh, nkv, hs, dtype, poison):
    check_backend(cpu, B, T, nh, hs, dtype, "cpu", nkv=nkv)


def test_cpu_gqa_contiguous_inputs(poison):
    check_backend(cpu, 2, 77, 6, 64, torch.float32, "cpu", fused=False, nkv=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("nkv", [3, 1])
def test_cpu_backward_deterministic(dtype, nkv):
    q, k, v = make_qkv(2, 200, 3, 64, dtype, "cpu", nkv=nkv)
    do = torch.randn(2, 200, 3, 64, dtype=dtype)
    first, second = run(cpu, q, k, v, do, 0.125), run(cpu, q, k, v, do, 0.125)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), name


def _amd_cpu():
    with open("/proc/cpuinfo") as f:
        return "AuthenticAMD" in f.read()


def test_cpu_bf16_forward_takes_dot_products_on_amd_only():
    """With -march=native and NANOLM_CPU_BF16_DOT unset, the bf16 forward takes the
    AVX512-BF16 dot-product path on AMD CPUs only (cpu_has_bf16_dot in csrc/attention_cpu.cpp)."""
    from nanolm import _C
    if _C.build_info()["march"] == "native" and not os.environ.get("NANOLM_CPU_BF16_DOT"):
        assert _C.build_info()["cpu_bf16_dot"] == (torch.cpu._is_avx512_bf16_supported() and _amd_cpu())


@pytest.mark.skipif(not torch.cpu._is_avx512_bf16_supported(), reason="the CPU has no AVX512-BF16")
@pytest.mark.parametrize("force", ["1", "0"])
def test_cpu_bf16_forward_both_paths_match_reference(force):
    """Whichever path this CPU takes by default, NANOLM_CPU_BF16_DOT (read once per process)
    forces the other: both are checked against float64 in a fresh process, at awkward shapes."""
    code = ("import torch, test_attention as t; from nanolm import _C\n"
            f"assert _C.build_info()['cpu_bf16_dot'] == {force == '1'}\n"
            "for shape in [(1, 1, 2, 64), (2, 130, 2, 16), (1, 77, 2, 48), (1, 1000, 1, 128)]:\n"
            "    t.check_backend(t.cpu, *shape, torch.bfloat16, 'cpu')\n")
    env = {**os.environ, "NANOLM_CPU_BF16_DOT": force, "TRITON_INTERPRET": "1"}
    subprocess.run([sys.executable, "-c", code], env=env, cwd=os.path.dirname(__file__), check=True)


def test_cpu_rejects_float64():
    with pytest.raises(ValueError, match="float64"):
        cpu.attention_fwd(*make_qkv(1, 8, 2, 64, torch.float64, "cpu"), 0.125, None)


@pytest.mark.parametrize("nkv", [3, 1])
def test_cpu_through_op_layer_autograd(nkv):
    B, T, nh, hs = 2, 77, 3, 32
    qkv = torch.randn(B, T, (nh + 2 * nkv) * hs, requires_grad=True)
    g = torch.randn(B, T, nh * hs)
    (attention.causal_attention(qkv, nh, nkv, "cpu", None) * g).sum().backward()

    qkv64 = qkv.detach().double().requires_grad_()
    q, k, v = (t.transpose(1, 2) for t in qkv64.view(B, T, nh + 2 * nkv, hs).split((nh, nkv, nkv), dim=2))
    y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    (y.transpose(1, 2).reshape(B, T, nh * hs) * g.double()).sum().backward()
    err = (qkv.grad.double() - qkv64.grad).abs().max().item()
    assert err <= TOL[torch.float32] * qkv64.grad.abs().max().item()


# ----------------------------------------------------------------------------- triton backend
# Under the interpreter (no GPU) the kernels run on fp32 CPU tensors: small shapes only.

def _triton_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("T", [1, 17, 70])
def test_triton_matches_reference(T, poison):
    if torch.cuda.is_available():
        pytest.skip("fp32 is the interpreter's dtype; the GPU tests below cover bf16/fp16")
    check_backend(triton_backend, 1, T, 2, 64, torch.float32, "cpu")


@pytest.mark.parametrize("T,nh,nkv,hs", [(17, 6, 2, 64), (40, 3, 1, 128), (1, 4, 1, 64), (33, 6, 3, 64)])
def test_triton_gqa_matches_reference(T, nh, nkv, hs, poison):
    """Groups of 3, 3 (MQA), 4 (MQA) and 2 under the interpreter."""
    if torch.cuda.is_available():
        pytest.skip("fp32 is the interpreter's dtype; the GPU tests below cover bf16/fp16")
    check_backend(triton_backend, 2, T, nh, hs, torch.float32, "cpu", nkv=nkv)


def test_triton_contiguous_inputs(poison):
    if torch.cuda.is_available():
        pytest.skip("fp32 is the interpreter's dtype; the GPU tests below cover bf16/fp16")
    check_backend(triton_backend, 1, 17, 2, 64, torch.float32, "cpu", fused=False)


@pytest.mark.parametrize("nkv", [2, 1])
def test_triton_backward_deterministic(nkv):
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    T = 300 if torch.cuda.is_available() else 40
    q, k, v = make_qkv(1, T, 2, 64, dtype, _triton_device(), nkv=nkv)
    do = torch.randn_like(q)
    first, second = run(triton_backend, q, k, v, do, 0.125), run(triton_backend, q, k, v, do, 0.125)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), name


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hs", [64, 128])
@pytest.mark.parametrize("T", [1, 17, 1000, 1024, 2048])
@pytest.mark.parametrize("nkv", [3, 1])  # MHA, MQA
def test_triton_gpu(T, hs, dtype, nkv):
    check_backend(triton_backend, 2, T, 3, hs, dtype, "cuda", nkv=nkv)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hs", [64, 128])
@pytest.mark.parametrize("T", [1, 1000, 777])
def test_triton_gpu_gqa(T, hs, dtype):
    check_backend(triton_backend, 2, T, 6, hs, dtype, "cuda", nkv=2)


@pytest.mark.gpu
def test_triton_gpu_through_op_layer():
    B, T, nh, hs = 2, 257, 12, 64
    qkv = torch.randn(B, T, 3 * nh * hs, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(B, T, nh * hs, device="cuda", dtype=torch.bfloat16)
    (attention.causal_attention(qkv, nh, nh, "triton", None) * g).sum().backward()
    qkv64 = qkv.detach().double().requires_grad_()
    q, k, v = qkv64.view(B, T, 3, nh, hs).permute(2, 0, 3, 1, 4)
    y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    (y.transpose(1, 2).reshape(B, T, nh * hs) * g.double()).sum().backward()
    err = (qkv.grad.double() - qkv64.grad).abs().max().item()
    assert err <= TOL[torch.bfloat16] * qkv64.grad.abs().max().item()


# ----------------------------------------------------------------------------- bad input

def _backends():
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return [pytest.param(cpu, torch.float32, "cpu", id="cpu"),
            pytest.param(triton_backend, dtype, _triton_device(), id="triton")]


@pytest.mark.parametrize("backend,dtype,device", _backends())
def test_bad_inputs_forward(backend, dtype, device):
    q, k, v = make_qkv(1, 8, 2, 64, dtype, device)
    with pytest.raises(ValueError, match="head size"):
        backend.attention_fwd(*make_qkv(1, 8, 2, 24, dtype, device), 0.2, None)
    with pytest.raises(ValueError, match="shape"):
        backend.attention_fwd(q, k[:, :7], v, 0.125, None)
    with pytest.raises(ValueError, match="n_kv_head=3 must be positive and divide n_head=4"):
        backend.attention_fwd(*make_qkv(1, 8, 4, 64, dtype, device, nkv=3), 0.125, None)
    with pytest.raises(ValueError, match=r"k has shape \(1, 8, 2, 32\), expected \(1, 8, nkv, 64\)"):
        backend.attention_fwd(q, *make_qkv(1, 8, 2, 32, dtype, device)[1:], 0.125, None)
    with pytest.raises(ValueError, match="dtype"):
        backend.attention_fwd(q.double(), k.double(), v.double(), 0.125, None)
    with pytest.raises(ValueError, match="dtype"):
        backend.attention_fwd(q, k.double(), v, 0.125, None)
    q_t = torch.randn(1, 8, 64, 2, dtype=dtype, device=device).transpose(-1, -2)
    with pytest.raises(ValueError, match="stride"):
        backend.attention_fwd(q_t, k, v, 0.125, None)
    with pytest.raises(TypeError):
        backend.attention_fwd(q.tolist(), k, v, 0.125, None)


@pytest.mark.parametrize("backend,dtype,device", _backends())
def test_bad_inputs_backward(backend, dtype, device):
    q, k, v = make_qkv(1, 8, 2, 64, dtype, device)
    o, do = torch.randn_like(q), torch.randn_like(q)
    lse = torch.zeros(1, 2, 8, device=device)
    dq, dk, dv = torch.empty(1, 8, 3, 2, 64, dtype=dtype, device=device).unbind(2)
    with pytest.raises(ValueError, match="lse"):
        backend.attention_bwd(do, q, k, v, o, lse[:, :, :7], 0.125, dq, dk, dv, None)
    with pytest.raises(ValueError, match="lse"):
        backend.attention_bwd(do, q, k, v, o, lse.double(), 0.125, dq, dk, dv, None)
    with pytest.raises(ValueError, match="do"):
        backend.attention_bwd(do[:, :7], q, k, v, o, lse, 0.125, dq, dk, dv, None)
    with pytest.raises(ValueError, match="dk"):
        backend.attention_bwd(do, q, k, v, o, lse, 0.125, dq, dk.transpose(1, 2), dv, None)
    with pytest.raises(ValueError, match="o"):
        backend.attention_bwd(do, q, k, v, o.transpose(1, 2).contiguous().transpose(1, 2), lse,
                              0.125, dq, dk, dv, None)


# ----------------------------------------------------------------------------- which backends claim GQA

def _without_gqa():
    """The backends that run attention here but do not claim GQA."""
    return [n for n in backends.BACKENDS if backends.unavailable_reason(n, "attention", torch.device("cpu")) is None
            and not backends.implementation(n, "attention").support.gqa]


def test_resolve_picks_only_gqa_backends_and_names_the_others():
    """With gqa, `auto` skips backends whose row lacks it, and naming one is one clear line."""
    cpu_device = torch.device("cpu")
    auto = backends.resolve("auto", cpu_device, gqa=True)["attention"]
    assert backends.implementation(auto, "attention").support.gqa
    for name in _without_gqa():
        with pytest.raises(ValueError, match=f"kernel backend '{name}' cannot run attention on cpu: .*"
                                             "has no grouped-query attention") as e:
            backends.resolve(f"auto,attention={name}", cpu_device, gqa=True)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", _without_gqa())
def test_backend_without_gqa_refuses_it_in_one_line(name):
    with pytest.raises(ValueError, match=f"attention: backend {name} has no grouped-query attention") as e:
        attention.causal_attention(torch.randn(1, 4, 8 * 16), 4, 2, name, None)
    assert "\n" not in str(e.value)

"""Causal attention backends (cpu, triton) against the float64 torch reference.

Inputs are fresh random values, laid out as the model lays them out (q, k, v strided views of
one (B, T, 3, nh, hs) tensor, dq, dk, dv views of one gradient buffer) and as plain contiguous
tensors. Gradient buffers are filled with NaN first so unwritten elements show. The backward
reference is given the backend's own o (delta = rowsum(dO * O) is a function of it), so in
bf16/fp16 both sides see the same rounded o.
"""
import math
import os
import subprocess
import sys

import pytest
import torch

from nanolm.ops import attention
from nanolm.ops.backends import load

cpu, triton_backend = load("cpu"), load("triton")

# Errors are relative to max |ref| floored at 1: inputs are unit normal, and at T = 1 dq and dk
# are differences of nearly equal O(1) terms (dP - delta), so their reference is ~0.
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}
NAMES = ("o", "lse", "dq", "dk", "dv")


def make_qkv(B, T, nh, hs, dtype, device, fused=True):
    if fused:
        return torch.randn(B, T, 3, nh, hs, dtype=dtype, device=device).unbind(2)
    return tuple(torch.randn(B, T, nh, hs, dtype=dtype, device=device) for _ in range(3))


def run(backend, q, k, v, do, scale):
    """Forward, then backward into NaN-poisoned views of one (B, T, 3, nh, hs) buffer (o and
    lse are NaN from the start too under the `poison` fixture)."""
    o, lse = backend.attention_fwd(q, k, v, scale, None)
    grads = torch.full((*q.shape[:2], 3, *q.shape[2:]), float("nan"), dtype=q.dtype, device=q.device)
    dq, dk, dv = grads.unbind(2)
    backend.attention_bwd(do, q, k, v, o, lse, scale, dq, dk, dv, None)
    return o, lse, dq, dk, dv


def reference(q, k, v, do, o, scale):
    f64 = [t.double() for t in (q, k, v, do)]
    ro, rlse = attention.attention_fwd(*f64[:3], scale, None)
    grads = [torch.empty_like(t) for t in f64[:3]]
    attention.attention_bwd(f64[3], *f64[:3], o.double(), rlse, scale, *grads, None)
    return (ro, rlse, *grads)


def check_backend(backend, B, T, nh, hs, dtype, device, fused=True):
    q, k, v = make_qkv(B, T, nh, hs, dtype, device, fused)
    do = torch.randn(B, T, nh, hs, dtype=dtype, device=device)
    scale = 1 / math.sqrt(hs)
    out = run(backend, q, k, v, do, scale)
    ref = reference(q, k, v, do, out[0], scale)
    for name, a, r in zip(NAMES, out, ref):
        assert a.shape == r.shape, name
        err = (a.double() - r).abs().max().item()
        bound = TOL[dtype] * max(r.abs().max().item(), 1.0)
        assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g} (B={B} T={T} nh={nh} hs={hs} {dtype})"


# ----------------------------------------------------------------------------- cpu backend

@pytest.mark.parametrize("B,T,nh,hs", [(1, 1, 2, 64), (2, 17, 3, 64), (1, 70, 2, 32), (2, 130, 2, 16),
                                       (1, 77, 2, 48), (1, 65, 1, 80), (1, 1000, 2, 64), (1, 1000, 1, 128)])
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_matches_reference(B, T, nh, hs, fused, dtype, poison):
    check_backend(cpu, B, T, nh, hs, dtype, "cpu", fused)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_backward_deterministic(dtype):
    q, k, v = make_qkv(2, 200, 3, 64, dtype, "cpu")
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


def test_cpu_through_op_layer_autograd():
    B, T, nh, hs = 2, 77, 3, 32
    qkv = torch.randn(B, T, 3 * nh * hs, requires_grad=True)
    g = torch.randn(B, T, nh * hs)
    (attention.causal_attention(qkv, nh, "cpu", None) * g).sum().backward()

    qkv64 = qkv.detach().double().requires_grad_()
    q, k, v = qkv64.view(B, T, 3, nh, hs).permute(2, 0, 3, 1, 4)  # each (B, nh, T, hs)
    y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
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


def test_triton_contiguous_inputs(poison):
    if torch.cuda.is_available():
        pytest.skip("fp32 is the interpreter's dtype; the GPU tests below cover bf16/fp16")
    check_backend(triton_backend, 1, 17, 2, 64, torch.float32, "cpu", fused=False)


def test_triton_backward_deterministic():
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    T = 300 if torch.cuda.is_available() else 40
    q, k, v = make_qkv(1, T, 2, 64, dtype, _triton_device())
    do = torch.randn_like(q)
    first, second = run(triton_backend, q, k, v, do, 0.125), run(triton_backend, q, k, v, do, 0.125)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), name


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hs", [64, 128])
@pytest.mark.parametrize("T", [1, 17, 1000, 1024, 2048])
def test_triton_gpu(T, hs, dtype):
    check_backend(triton_backend, 2, T, 3, hs, dtype, "cuda")


@pytest.mark.gpu
def test_triton_gpu_through_op_layer():
    B, T, nh, hs = 2, 257, 12, 64
    qkv = torch.randn(B, T, 3 * nh * hs, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(B, T, nh * hs, device="cuda", dtype=torch.bfloat16)
    (attention.causal_attention(qkv, nh, "triton", None) * g).sum().backward()
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

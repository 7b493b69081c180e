"""The CUDA causal flash attention (csrc/attention.cu) against the float64 torch reference:
on a GPU (cuda), and on the CPU through the SIMT emulation (cuda_sim, scaled-down shapes: every
block shape, partial and multiple key blocks, each layout, both dtypes and head sizes).

Every check prints the tensor, shape, dtype and layout it failed on, so one GPU run tells what
is wrong. Errors are relative norms ||x - ref|| / ||ref|| (with a small absolute floor for
gradients that are exactly zero in the reference, e.g. dq and dk at T = 1).
"""
import math

import pytest
import torch

from nanolm.ops import attention
from nanolm.ops.backends import load

# bf16 keeps 8 mantissa bits (P and dS are rounded to it before their matmuls): ~4e-3 typical.
TOL = {torch.bfloat16: 1e-2, torch.float16: 3e-3}
LSE_TOL = 1e-4  # lse is fp32 end to end
ABS_FLOOR = 1e-4  # per element, for references that are (near) zero
cuda_backend, cuda_sim = load("cuda"), load("cuda_sim")

SIZES = [(1, 1), (2, 3)]  # (B, nh)
SEQ_LENS = [1, 17, 64, 1000, 1024, 2048]
LAYOUTS = ["qkv", "contiguous", "heads_first"]


def _make_qkv(B, T, nh, hs, dtype, layout, fill=None, device="cuda", nkv=None):
    """q (B, T, nh, hs), k, v (B, T, nkv, hs) (nkv = nh by default) in the given memory layout:
    views of one fused (B, T, nh + 2*nkv, hs) buffer (the model's), contiguous tensors, or
    (B, heads, T, hs) tensors transposed."""
    nkv = nkv or nh

    def new(shape):
        if fill is None:
            return torch.randn(shape, device=device, dtype=dtype)
        return torch.full(shape, fill, device=device, dtype=dtype)
    if layout == "qkv":
        return new((B, T, nh + 2 * nkv, hs)).split((nh, nkv, nkv), dim=2)
    if layout == "contiguous":
        return tuple(new((B, T, n, hs)) for n in (nh, nkv, nkv))
    return tuple(new((B, n, T, hs)).transpose(1, 2) for n in (nh, nkv, nkv))


def _error(x, ref):
    x, ref = x.double(), ref.double()
    floor = ABS_FLOOR * math.sqrt(max(ref.numel(), 1))
    return (x - ref).norm().item() / max(ref.norm().item(), floor)


def _check(failures, name, x, ref, tol):
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).nonzero()
        failures.append(f"{name}: {bad.shape[0]} non-finite elements, first at {bad[0].tolist()}")
        return
    err = _error(x, ref)
    if not err <= tol:
        failures.append(f"{name}: relative error {err:.3e} > {tol:.0e}")


def _reference(q, k, v, do, scale):
    q64, k64, v64, do64 = (t.double() for t in (q, k, v, do))
    o, lse = attention.attention_fwd(q64, k64, v64, scale, None)
    grads = [torch.empty_like(t) for t in (q64, k64, v64)]
    attention.attention_bwd(do64, q64, k64, v64, o, lse, scale, *grads, None)
    return o, lse, grads


def _run(q, k, v, do, scale, layout, backend=cuda_backend):
    """Forward (o, lse NaN-filled first under the `poison` fixture), then backward into NaN-filled gradients."""
    B, T, nh, hs = q.shape
    o, lse = backend.attention_fwd(q, k, v, scale, None)
    grads = _make_qkv(B, T, nh, hs, q.dtype, layout, fill=float("nan"), device=q.device, nkv=k.shape[2])
    backend.attention_bwd(do, q, k, v, o, lse, scale, *grads, None)
    return o, lse, grads


def _check_against_reference(backend, device, dtype, hs, B, nh, T, layout, scale, nkv=None):
    q, k, v = _make_qkv(B, T, nh, hs, dtype, layout, device=device, nkv=nkv)
    do = torch.randn(B, T, nh, hs, device=device, dtype=dtype)
    o, lse, grads = _run(q, k, v, do, scale, layout, backend)
    o_ref, lse_ref, grads_ref = _reference(q, k, v, do, scale)
    failures = []
    _check(failures, "o", o, o_ref, TOL[dtype])
    _check(failures, "lse", lse, lse_ref, LSE_TOL)
    for name, x, ref in zip(("dq", "dk", "dv"), grads, grads_ref):
        _check(failures, name, x, ref, TOL[dtype])
    case = f"dtype={dtype}, (B, T, nh, nkv, hs)=({B}, {T}, {nh}, {nkv or nh}, {hs}), layout={layout}, scale={scale}"
    assert not failures, f"{case}:\n  " + "\n  ".join(failures)


def _check_deterministic(backend, device, dtype, hs, B, T, nh, nkv=None):
    q, k, v = _make_qkv(B, T, nh, hs, dtype, "qkv", device=device, nkv=nkv)
    do = torch.randn(B, T, nh, hs, device=device, dtype=dtype)
    scale = 1.0 / math.sqrt(hs)
    first = _run(q, k, v, do, scale, "qkv", backend)
    second = _run(q, k, v, do, scale, "qkv", backend)
    for name, a, b in zip(("o", "lse", "dq", "dk", "dv"), (first[0], first[1], *first[2]),
                          (second[0], second[1], *second[2])):
        assert torch.equal(a, b), f"{name} differs between two identical runs (dtype={dtype}, hs={hs})"


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("T", SEQ_LENS)
@pytest.mark.parametrize("B,nh", SIZES)
@pytest.mark.parametrize("hs", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_float64_reference(dtype, hs, B, nh, T, layout, poison):
    _check_against_reference(cuda_backend, "cuda", dtype, hs, B, nh, T, layout, 1.0 / math.sqrt(hs))


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 777, 1000])
@pytest.mark.parametrize("nh,nkv", [(6, 2), (6, 1), (3, 1)])  # groups of 3, 6 (MQA), 3 (MQA)
@pytest.mark.parametrize("hs", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gqa_matches_float64_reference(dtype, hs, nh, nkv, T, poison):
    _check_against_reference(cuda_backend, "cuda", dtype, hs, 2, nh, T, "qkv", 1.0 / math.sqrt(hs), nkv)


@pytest.mark.gpu
@pytest.mark.parametrize("hs", [64, 128])
def test_softmax_scale_argument(hs, poison):
    _check_against_reference(cuda_backend, "cuda", torch.bfloat16, hs, 2, 3, 333, "qkv", 0.37)


@pytest.mark.gpu
@pytest.mark.parametrize("hs", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_deterministic(dtype, hs, poison):
    _check_deterministic(cuda_backend, "cuda", dtype, hs, 2, 1000, 3)


# ----------------------------------------------------------------------------- CPU: cuda_sim
# The same kernels on emulated warps (slow: shapes scaled down). T = 1, 17: one partial block;
# 64: exactly one; 80: a partial second block; 130 (with hs 128: BQ = 32 in the backward, so
# five query blocks per key block); 200: a prefetch into a buffer freed the iteration before.
SIM_CASES = [(1, 1, 1, "qkv"), (1, 1, 17, "contiguous"), (1, 2, 64, "heads_first"), (2, 1, 80, "qkv"),
             (1, 2, 130, "contiguous"), (1, 1, 200, "qkv")]  # (B, nh, T, layout)


@pytest.mark.cuda_sim
@pytest.mark.parametrize("B,nh,T,layout", SIM_CASES)
@pytest.mark.parametrize("hs", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_sim_matches_float64_reference(dtype, hs, B, nh, T, layout, poison):
    _check_against_reference(cuda_sim, "cpu", dtype, hs, B, nh, T, layout, 1.0 / math.sqrt(hs))


# Grouped-query attention: groups of 3 (MQA), 3, 2; one partial block, a partial second block,
# five query blocks per key block at hs 128, a prefetch across the group's query heads.
SIM_GQA_CASES = [(1, 3, 1, 80, "qkv"), (2, 6, 2, 17, "contiguous"), (1, 3, 1, 130, "heads_first"),
                 (1, 4, 2, 200, "qkv")]  # (B, nh, nkv, T, layout)


@pytest.mark.cuda_sim
@pytest.mark.parametrize("B,nh,nkv,T,layout", SIM_GQA_CASES)
@pytest.mark.parametrize("hs", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_sim_gqa_matches_float64_reference(dtype, hs, B, nh, nkv, T, layout, poison):
    _check_against_reference(cuda_sim, "cpu", dtype, hs, B, nh, T, layout, 1.0 / math.sqrt(hs), nkv)


@pytest.mark.cuda_sim
def test_cuda_sim_softmax_scale_argument(poison):
    _check_against_reference(cuda_sim, "cpu", torch.bfloat16, 64, 1, 2, 33, "qkv", 0.37)


@pytest.mark.cuda_sim
def test_cuda_sim_through_op_layer():
    """The model's autograd path on the emulated kernels: fused qkv (B, T, 3C) in, dqkv out."""
    B, T, nh, hs = 1, 80, 2, 64
    qkv = torch.randn(B, T, 3 * nh * hs, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(B, T, nh * hs, dtype=torch.bfloat16)
    attention.causal_attention(qkv, nh, nh, "cuda_sim", None).backward(dy)
    qkv64 = qkv.detach().double().requires_grad_()
    y_ref = attention.causal_attention(qkv64, nh, nh, "torch", None)
    y_ref.backward(dy.double())
    failures = []
    _check(failures, "dqkv", qkv.grad, qkv64.grad, TOL[torch.bfloat16])
    assert not failures, "\n".join(failures)


@pytest.mark.cuda_sim
@pytest.mark.parametrize("hs", [64, 128])
@pytest.mark.parametrize("nkv", [2, 1])
def test_cuda_sim_deterministic(hs, nkv, poison):
    _check_deterministic(cuda_sim, "cpu", torch.bfloat16, hs, 1, 130, 2, nkv)


@pytest.mark.gpu
def test_gpt2_shape_through_op_layer():
    """The autograd path the model uses: fused qkv (B, T, 3C) in, dqkv out."""
    B, T, nh, hs = 4, 1024, 12, 64
    qkv = torch.randn(B, T, 3 * nh * hs, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(B, T, nh * hs, device="cuda", dtype=torch.bfloat16)
    y = attention.causal_attention(qkv, nh, nh, "cuda", None)
    y.backward(dy)
    qkv64 = qkv.detach().double().requires_grad_()
    y_ref = attention.causal_attention(qkv64, nh, nh, "torch", None)
    y_ref.backward(dy.double())
    failures = []
    _check(failures, "y", y, y_ref, TOL[torch.bfloat16])
    _check(failures, "dqkv", qkv.grad, qkv64.grad, TOL[torch.bfloat16])
    assert not failures, "\n".join(failures)


# ----------------------------------------------------------------------------- bad input

def _inputs(B=1, T=17, nh=2, hs=64, dtype=torch.bfloat16, device="cuda"):
    return [torch.randn(B, T, nh, hs, device=device, dtype=dtype) for _ in range(3)]


@pytest.mark.gpu
def test_rejects_unsupported_head_size():
    with pytest.raises(ValueError, match="head size 96"):
        cuda_backend.attention_fwd(*_inputs(hs=96), 0.1, None)


@pytest.mark.gpu
def test_rejects_float32():
    with pytest.raises(ValueError, match="dtype float32"):
        cuda_backend.attention_fwd(*_inputs(dtype=torch.float32), 0.1, None)


@pytest.mark.gpu
def test_rejects_mismatched_shapes():
    q, k, v = _inputs()
    with pytest.raises(ValueError, match="k has shape"):
        cuda_backend.attention_fwd(q, k[:, :16], v, 0.1, None)
    with pytest.raises(ValueError, match="dtypes differ"):
        cuda_backend.attention_fwd(q, k, v.half(), 0.1, None)


@pytest.mark.gpu
def test_rejects_bad_strides():
    q, k, v = _inputs()
    padded = torch.randn(1, 17, 2, 68, device="cuda", dtype=torch.bfloat16)[..., :64]
    with pytest.raises(ValueError, match="multiples of 8"):
        cuda_backend.attention_fwd(padded, k, v, 0.1, None)
    with pytest.raises(ValueError, match="unit stride"):
        cuda_backend.attention_fwd(q, k, torch.randn(1, 17, 64, 2, device="cuda").bfloat16().transpose(2, 3), 0.1, None)


@pytest.mark.gpu
def test_backward_rejects_bad_lse_and_outputs():
    q, k, v = _inputs()
    o, lse = cuda_backend.attention_fwd(q, k, v, 0.1, None)
    do = torch.randn_like(o)
    grads = [torch.empty_like(q) for _ in range(3)]
    with pytest.raises(ValueError, match="lse has shape"):
        cuda_backend.attention_bwd(do, q, k, v, o, lse[:, :1], 0.1, *grads, None)
    with pytest.raises(ValueError, match="dv has shape"):
        cuda_backend.attention_bwd(do, q, k, v, o, lse, 0.1, grads[0], grads[1], grads[2][:, :3], None)
    with pytest.raises(ValueError, match="do must be contiguous"):
        cuda_backend.attention_bwd(do.transpose(1, 2).contiguous().transpose(1, 2), q, k, v, o, lse, 0.1, *grads, None)


def test_rejects_cpu_tensors():
    with pytest.raises(ValueError, match="expected a cuda device"):
        cuda_backend.attention_fwd(*_inputs(device="cpu"), 0.1, None)


def test_launcher_rejects_unsupported_head_size():
    """The C++ launcher checks too (std::invalid_argument -> ValueError) before touching the GPU."""
    _C = pytest.importorskip("nanolm._C")
    if not _C.build_info()["cuda"]:
        pytest.skip("nanolm._C was built without CUDA")
    s = (17 * 2 * 96, 2 * 96, 96)
    with pytest.raises(ValueError, match="head size 96"):
        _C.attention_fwd_cuda(0, s, 0, s, 0, s, 0, s, 0, 1, 17, 2, 96, 0.1, _C.DType.bfloat16, _C.DropoutParams(), 0)

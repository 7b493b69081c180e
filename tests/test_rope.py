"""QK-norm + RoPE (nanolm/ops/rope.py): the specification checked against an independent
float64 formulation (HF Llama's rotate-half on the complex plane, autograd for the gradients),
then every backend that claims the op against the float64 specification at awkward shapes
(T 1000, one token, head sizes 64 and 128, GQA group sizes 1, 3 and H, odd KV-cache offsets),
forward and gradient, in every dtype its row claims."""
import pytest
import torch

from nanolm.ops import rope
from nanolm.ops.backends import load, support_reason

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
       torch.float16: dict(atol=3e-3, rtol=3e-3)}
# (B, T, H, Hkv, hs, start): GQA groups of 1, 3 and H; one token at an odd cache offset
SHAPES = [(2, 7, 4, 4, 16, 0), (1, 1000, 3, 1, 64, 0), (3, 5, 6, 2, 128, 33), (1, 1, 9, 3, 64, 777),
          (2, 13, 2, 2, 64, 5)]
CPU = torch.device("cpu")


def _independent(qkv, H, Hkv, start, theta, qk_norm):
    """The same map written another way, in float64: each pair (j, j + D/2) as the complex number
    x_j + i x_{j+D/2}, multiplied by e^{i t f_j} (RoFormer's rotation); rms_norm from torch."""
    B, T, W = qkv.shape
    D = W // (H + 2 * Hkv)
    heads = qkv.view(B, T, H + 2 * Hkv, D)
    qk, v = heads[:, :, : H + Hkv], heads[:, :, H + Hkv:]
    if qk_norm:
        qk = torch.nn.functional.rms_norm(qk, (D,), eps=rope.QK_NORM_EPS)
    j = torch.arange(D // 2, dtype=torch.float64)
    t = torch.arange(start, start + T, dtype=torch.float64)
    rotation = torch.polar(torch.ones(T, D // 2, dtype=torch.float64), t[:, None] * theta ** (-2 * j / D))
    z = torch.complex(qk[..., : D // 2], qk[..., D // 2:]) * rotation[:, None]
    return torch.cat((torch.cat((z.real, z.imag), dim=-1), v), dim=2).view(B, T, W)


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("B,T,H,Hkv,hs,start", SHAPES)
def test_specification_is_the_rotation(B, T, H, Hkv, hs, start, qk_norm):
    qkv = torch.randn(B, T, (H + 2 * Hkv) * hs, dtype=torch.float64, requires_grad=True)
    dout = torch.randn_like(qkv)
    out, rstd = rope.qk_norm_rope_fwd(qkv.detach(), H, Hkv, start, 500.0, qk_norm)
    want = _independent(qkv, H, Hkv, start, 500.0, qk_norm)
    torch.testing.assert_close(out, want.detach(), atol=1e-12, rtol=1e-12)
    dqkv = rope.qk_norm_rope_bwd(dout, qkv.detach(), rstd, H, Hkv, start, 500.0, qk_norm)
    torch.testing.assert_close(dqkv, torch.autograd.grad(want, qkv, dout)[0], atol=1e-12, rtol=1e-12)


def test_rotation_keeps_the_norm_and_relative_positions():
    """RoPE's two properties: each head keeps its length, and q_t . k_s depends on t - s only."""
    qkv = torch.randn(1, 1, 3 * 64, dtype=torch.float64).expand(1, 40, -1).contiguous()
    out, _ = rope.qk_norm_rope_fwd(qkv, 1, 1, 0, 10000.0, False)
    q, k, _ = out.view(40, 3, 64).unbind(1)
    torch.testing.assert_close(q.norm(dim=-1), qkv.view(40, 3, 64)[:, 0].norm(dim=-1))
    torch.testing.assert_close(q[10] @ k[3], q[37] @ k[30])


def _backends():
    """(backend, dtype) for every backend whose row claims the op on CPU, and each of its dtypes."""
    return [pytest.param(name, dtype, id=f"{name}-{str(dtype)[6:]}") for name in ("torch", "cpu")
            for dtype in (torch.float32, torch.bfloat16, torch.float16)
            if support_reason(name, "rope", CPU, dtype) is None and load(name).unavailable_reason(CPU) is None]


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("B,T,H,Hkv,hs,start", SHAPES)
@pytest.mark.parametrize("name,dtype", _backends())
def test_backend_matches_float64_specification(name, dtype, B, T, H, Hkv, hs, start, qk_norm):
    backend = load(name)
    qkv = torch.randn(B, T, (H + 2 * Hkv) * hs, dtype=dtype) * 3
    dout = torch.randn_like(qkv)
    out, rstd = backend.qk_norm_rope_fwd(qkv, H, Hkv, start, 10000.0, qk_norm)
    want, rstd_want = rope.qk_norm_rope_fwd(qkv.double(), H, Hkv, start, 10000.0, qk_norm)
    assert out.dtype == dtype and not out.isnan().any()
    torch.testing.assert_close(out.double(), want, **TOL[dtype])
    torch.testing.assert_close(rstd.double(), rstd_want, **TOL[torch.float32])
    v = slice((H + Hkv) * hs, None)
    assert torch.equal(out[..., v], qkv[..., v])  # v passes through untouched
    dqkv = backend.qk_norm_rope_bwd(dout, qkv, rstd, H, Hkv, start, 10000.0, qk_norm)
    dqkv_want = rope.qk_norm_rope_bwd(dout.double(), qkv.double(), rstd_want, H, Hkv, start, 10000.0, qk_norm)
    assert dqkv.dtype == dtype and not dqkv.isnan().any()
    torch.testing.assert_close(dqkv.double(), dqkv_want, **TOL[dtype])


def test_entry_point_gradients_and_errors():
    """qk_norm_rope under autograd gives the specification's backward; a bad layout is one
    ValueError naming the op and the problem."""
    qkv = torch.randn(2, 5, 6 * 16, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x: rope.qk_norm_rope(x, 4, 1, 3, 100.0, True, "torch"), (qkv,))
    with pytest.raises(ValueError, match="qk_norm_rope: n_kv_head=3 must divide n_head=4"):
        rope.qk_norm_rope(torch.randn(1, 2, 10 * 16), 4, 3, 0, 1e4, False, "torch")
    with pytest.raises(ValueError, match="qk_norm_rope: qkv's last dim 90 is not .* 6 heads of an even head size"):
        rope.qk_norm_rope(torch.randn(1, 2, 90), 4, 1, 0, 1e4, False, "torch")
    with pytest.raises(ValueError, match=r"qk_norm_rope: qkv must be a \(B, T"):
        rope.qk_norm_rope(torch.randn(2, 96), 4, 1, 0, 1e4, False, "torch")
    with pytest.raises(ValueError, match="positions_start must be >= 0"):
        rope.qk_norm_rope(torch.randn(1, 2, 96), 4, 1, -1, 1e4, False, "torch")

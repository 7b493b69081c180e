"""SwiGLU and ReLU² (nanolm/ops/mlp_activation.py): the specification's backward against
float64 autograd of the textbook formulas, then every backend that claims the op against the
float64 specification at awkward shapes (one row, 777 and 1000 wide, GPT-2's 3072), forward
and gradient, in every dtype its row claims."""
import pytest
import torch
import torch.nn.functional as F

from nanolm.ops import mlp_activation
from nanolm.ops.backends import load, support_reason

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
       torch.float16: dict(atol=3e-3, rtol=3e-3)}
SHAPES = [(1, 777), (5, 1000), (17, 64), (3, 3072)]  # (N, F)
CPU = torch.device("cpu")


@pytest.mark.parametrize("N,F_", SHAPES)
def test_specification_backward_is_autograds(N, F_):
    gate_up = torch.randn(N, 2 * F_, dtype=torch.float64, requires_grad=True) * 3
    x = torch.randn(N, F_, dtype=torch.float64, requires_grad=True)
    da = torch.randn(N, F_, dtype=torch.float64)
    g, u = gate_up.chunk(2, dim=-1)
    swiglu = F.silu(g) * u
    torch.testing.assert_close(mlp_activation.swiglu_fwd(gate_up.detach()), swiglu.detach())
    torch.testing.assert_close(mlp_activation.swiglu_bwd(da, gate_up.detach()),
                               torch.autograd.grad(swiglu, gate_up, da)[0])
    relu2 = F.relu(x) ** 2
    torch.testing.assert_close(mlp_activation.relu2_fwd(x.detach()), relu2.detach())
    torch.testing.assert_close(mlp_activation.relu2_bwd(da, x.detach()), torch.autograd.grad(relu2, x, da)[0])


def _backends():
    return [pytest.param(name, dtype, id=f"{name}-{str(dtype)[6:]}") for name in ("torch", "cpu")
            for dtype in (torch.float32, torch.bfloat16, torch.float16)
            if support_reason(name, "mlp_activation", CPU, dtype) is None
            and load(name).unavailable_reason(CPU) is None]


@pytest.mark.parametrize("N,F_", SHAPES)
@pytest.mark.parametrize("name,dtype", _backends())
def test_backend_matches_float64_specification(name, dtype, N, F_):
    backend = load(name)
    gate_up, x = torch.randn(N, 2 * F_, dtype=dtype) * 3, torch.randn(N, F_, dtype=dtype) * 3
    da = torch.randn(N, F_, dtype=dtype)
    cases = [("swiglu_fwd", (gate_up,)), ("swiglu_bwd", (da, gate_up)), ("relu2_fwd", (x,)), ("relu2_bwd", (da, x))]
    for fn, args in cases:
        got = getattr(backend, fn)(*args)
        want = getattr(mlp_activation, fn)(*(a.double() for a in args))
        assert got.dtype == dtype and got.shape == want.shape and not got.isnan().any(), fn
        torch.testing.assert_close(got.double(), want, **TOL[dtype], msg=lambda m, fn=fn: f"{fn}: {m}")


@pytest.mark.parametrize("name,dtype", _backends())
def test_backend_at_the_activations_extremes(name, dtype):
    """Gates far into sigmoid's tails (the cpu kernel computes it from exp(-|g|), clamped at
    exp(-87)), signed and exact zeros, times a huge up-projection, against the float64
    specification."""
    backend = load(name)
    ends = torch.tensor([-1e4, -200.0, -88.0, -87.0, -30.0, -1e-30, -0.0, 0.0, 1e-30, 30.0, 87.0, 88.0, 200.0])
    ends = ends[ends.abs() <= torch.finfo(dtype).max].to(dtype)
    # an up-projection as large as the dtype allows magnifies sigmoid's tail into the tolerance
    up = torch.full_like(ends, 1e25 if dtype != torch.float16 else 1e3)
    gate_up, da = torch.cat([ends, up])[None], torch.ones(1, ends.numel(), dtype=dtype)
    for fn, args in [("swiglu_fwd", (gate_up,)), ("swiglu_bwd", (da, gate_up)), ("relu2_fwd", (ends[None],)),
                     ("relu2_bwd", (da, ends[None]))]:
        want = getattr(mlp_activation, fn)(*(a.double() for a in args))
        torch.testing.assert_close(getattr(backend, fn)(*args).double(), want.to(dtype).double(), **TOL[dtype],
                                   msg=lambda m, fn=fn: f"{fn}: {m}")


def test_entry_points_gradients_and_errors():
    gate_up = torch.randn(2, 3, 10, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda t: mlp_activation.swiglu(t, "torch"), (gate_up,))
    assert mlp_activation.swiglu(gate_up, "torch").shape == (2, 3, 5)
    x = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda t: mlp_activation.relu2(t, "torch"), (x,))
    with pytest.raises(ValueError, match="swiglu: gate_up must hold .* an odd width 9"):
        mlp_activation.swiglu(torch.randn(3, 9), "torch")

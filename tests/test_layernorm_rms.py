"""RMSNorm (the LayerNorm kernels with their rms flag) against the float64 torch reference: every
backend that claims layernorm, forward and backward, fused residual and dropout, weight present
and absent (parameter-free).

CPU part: the cpu backend (fp32, bf16, fp16), the Triton kernels under the interpreter (fp32,
small shapes) and the CUDA kernels under the SIMT emulation (cuda_sim: fp32 and bf16).
GPU part (@pytest.mark.gpu): cuda and triton at fp32/bf16 up to GPT-2-sized and larger rows.
"""
import pytest
import torch

from nanolm.ops import dropout as dropout_spec
from nanolm.ops import layernorm
from nanolm.ops.backends import load
from test_layernorm import CPU_BACKENDS, GPU_SHAPES, GRAD_SUM_TOL, SIM_SHAPES, TOL

EPS = 1e-5
CPU_SHAPES = [(1, 777), (5, 768), (3, 1600), (17, 64), (70, 33), (4, 1)]
DROP = dropout_spec.dropout(0.3, seed=1234 | 7 << 32, offset=5 << 32 | 11)  # both words of seed and offset nonzero


def _inputs(N, C, dtype, device, with_weight):
    # drawn in float32, then rounded: randn * 2 + 0.5 computed in bf16 is exactly 0 now and then,
    # which reads as a dropped element in the mask checks
    g = dict(device=device)
    t = dict(x=torch.randn(N, C, **g) * 2 + 0.5, residual=torch.randn(N, C, **g),
             weight=torch.rand(C, **g) + 0.5 if with_weight else None, dy=torch.randn(N, C, **g),
             dresidual=torch.randn(N, C, **g))
    return {k: None if v is None else v.to(dtype) for k, v in t.items()}


def _f64(t):
    return None if t is None else t.double()


def _close(name, got, want, tol):
    assert not torch.isnan(got).any(), f"{name}: NaN (unwritten element?)"
    torch.testing.assert_close(got.double(), want.double(), msg=lambda m: f"{name}: {m}", **tol)


def _check_backend(backend, N, C, dtype, device, fused, with_weight):
    t = _inputs(N, C, dtype, device, with_weight)
    w = t["weight"]
    dres = t["dresidual"] if fused else None
    if fused:
        y, h, rstd = backend.add_rms_norm_fwd(t["x"], t["residual"], w, EPS, None)
        h_ref = t["x"] + t["residual"]  # rounded to dtype, as the kernels normalize it
        _close("residual_out", h, h_ref, dict(atol=0, rtol=0))
    else:
        y, rstd = backend.rms_norm_fwd(t["x"], w, EPS)
        h = h_ref = t["x"]
    y_ref, rstd_ref = layernorm.rms_norm_fwd(h_ref.double(), _f64(w), EPS)
    _close("y", y, y_ref, TOL[dtype])
    _close("rstd", rstd, rstd_ref, TOL[torch.float32])
    assert rstd.dtype == torch.float32
    dx, dw = backend.rms_norm_bwd(t["dy"], h, w, rstd, dres, None, None)
    dx_ref, dw_ref = layernorm.rms_norm_bwd(t["dy"].double(), h_ref.double(), _f64(w), rstd_ref, _f64(dres), None,
                                            None)
    assert dx.dtype == dtype
    _close("dx", dx, dx_ref, TOL[dtype])
    if with_weight:
        assert dw.dtype == torch.float32
        _close("dweight", dw, dw_ref, GRAD_SUM_TOL[dtype])
    else:
        assert dw is None and dw_ref is None


def _check_dropout(backend, N, C, dtype, device, with_residual, with_weight, tol):
    """The mask bit for bit (forward and backward), values against the float64 reference on the
    stored (rounded) residual_out."""
    t = _inputs(N, C, dtype, device, with_weight)
    residual = t["residual"] if with_residual else None
    keep = dropout_spec.dropout_keep(torch.arange(N * C, device=device).view(N, C), DROP)
    y, h, rstd = backend.add_rms_norm_fwd(t["x"], residual, t["weight"], EPS, DROP)
    if not with_residual:
        assert torch.equal(h != 0, keep), "forward mask differs from the reference's"
    _, h_ref, _ = layernorm.add_rms_norm_fwd(t["x"].double(), _f64(residual), _f64(t["weight"]), EPS, DROP)
    _close("residual_out", h, h_ref, tol)
    y_ref, rstd_ref = layernorm.rms_norm_fwd(h.double(), _f64(t["weight"]), EPS)
    _close("y", y, y_ref, tol)
    dbranch = torch.empty_like(h)
    dx, _ = backend.rms_norm_bwd(t["dy"], h, t["weight"], rstd, t["dresidual"], dbranch, DROP)
    dbranch_ref = torch.empty_like(h, dtype=torch.float64)
    dx_ref, _ = layernorm.rms_norm_bwd(t["dy"].double(), h.double(), _f64(t["weight"]), rstd_ref,
                                       t["dresidual"].double(), dbranch_ref, DROP)
    assert torch.equal(dbranch != 0, keep), "backward mask differs from the reference's"
    _close("dx", dx, dx_ref, tol)
    _close("dbranch", dbranch, dbranch_ref, tol)


# ----------------------------------------------------------------------------- CPU: cpu, triton (interpreter)

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("N,C", CPU_SHAPES)
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("with_weight", [True, False])
def test_matches_reference_cpu(backend, N, C, fused, with_weight, poison):
    _check_backend(load(backend), N, C, torch.float32, "cpu", fused, with_weight)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,C", CPU_SHAPES + [(300, 2048)])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("with_weight", [True, False])
def test_cpu_16bit_matches_reference(dtype, N, C, fused, with_weight, poison):
    _check_backend(load("cpu"), N, C, dtype, "cpu", fused, with_weight)


@pytest.mark.parametrize("backend", ["torch"] + CPU_BACKENDS)
@pytest.mark.parametrize("N,C", [(1, 777), (17, 64), (70, 33)])
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("with_weight", [True, False])
def test_dropout_matches_reference_cpu(backend, N, C, with_residual, with_weight, poison):
    _check_dropout(load(backend), N, C, torch.float32, "cpu", with_residual, with_weight, TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_residual", [True, False])
def test_cpu_dropout_16bit(dtype, with_residual, poison):
    _check_dropout(load("cpu"), 5, 777, dtype, "cpu", with_residual, True, TOL[dtype])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("with_weight", [True, False])
def test_deterministic_cpu(backend, with_weight):
    b, t = load(backend), _inputs(150, 96, torch.float32, "cpu", with_weight)
    _, rstd = b.rms_norm_fwd(t["x"], t["weight"], EPS)
    first = b.rms_norm_bwd(t["dy"], t["x"], t["weight"], rstd, t["dresidual"], None, None)
    second = b.rms_norm_bwd(t["dy"], t["x"], t["weight"], rstd, t["dresidual"], None, None)
    for name, a, b_ in zip(("dx", "dweight"), first, second):
        assert (a is None and b_ is None) or torch.equal(a, b_), f"{name} differs between two identical runs"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_rows(backend):
    b = load(backend)
    x, w = torch.randn(0, 40), torch.randn(40)
    y, rstd = b.rms_norm_fwd(x, w, EPS)
    assert y.shape == (0, 40) and rstd.shape == (0,)
    dx, dw = b.rms_norm_bwd(x, x, w, rstd, None, None, None)
    assert dx.shape == (0, 40) and torch.equal(dw, torch.zeros(40))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bad_inputs(backend):
    b, x, w = load(backend), torch.randn(4, 16), torch.randn(16)
    for kw, words in [(dict(x=x.double(), weight=None), "dtype"), (dict(x=x, weight=torch.randn(15)), "shape"),
                      (dict(x=x, weight=w.half()), "dtype"), (dict(x=x[0], weight=w), "2-D"),
                      (dict(x=torch.randn(16, 4).t(), weight=None), "contiguous")]:
        with pytest.raises(ValueError, match=words):
            b.rms_norm_fwd(kw["x"], kw["weight"], EPS)
    with pytest.raises(ValueError, match="residual may be None only with dropout"):
        b.add_rms_norm_fwd(x, None, w, EPS, None)
    _, rstd = b.rms_norm_fwd(x, w, EPS)
    with pytest.raises(ValueError, match="rstd"):
        b.rms_norm_bwd(x, x, w, rstd.double(), None, None, None)
    with pytest.raises(ValueError, match="dresidual"):
        b.rms_norm_bwd(x, x, w, rstd, x[:2], None, None)
    with pytest.raises(ValueError, match="dbranch"):
        b.rms_norm_bwd(x, x, w, rstd, None, None, DROP)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("with_weight", [True, False])
@pytest.mark.parametrize("shape", [(2, 7, 777), (3, 1, 64)])
def test_entry_points_autograd_cpu(backend, with_weight, shape):
    """rms_norm and add_rms_norm (what the model calls) against torch.nn.functional.rms_norm in
    float64: outputs and every gradient through the registered autograd."""
    C = shape[-1]
    leaves = [torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)]
    if with_weight:
        leaves.append(torch.rand(C, dtype=torch.float64) + 0.5)
    ours = [t.float().requires_grad_() for t in leaves]
    ref = [t.clone().requires_grad_() for t in leaves]

    def chain(x, r, w, rms_norm, add_rms_norm):
        y1 = rms_norm(x, w)
        return add_rms_norm(y1, r, w)

    w = ours[2] if with_weight else None
    y2, h = chain(ours[0], ours[1], w, lambda x, w: layernorm.rms_norm(x, w, EPS, backend),
                  lambda x, r, w: layernorm.add_rms_norm(x, r, w, EPS, backend, None))
    g_y, g_h = torch.randn_like(y2), torch.randn_like(h)
    (y2 * g_y + h * g_h).sum().backward()
    wr = ref[2] if with_weight else None
    y2r, hr = chain(ref[0], ref[1], wr, lambda x, w: torch.nn.functional.rms_norm(x, (C,), w, EPS),
                    lambda x, r, w: (torch.nn.functional.rms_norm(x + r, (C,), w, EPS), x + r))
    (y2r * g_y.double() + hr * g_h.double()).sum().backward()
    _close("y", y2, y2r, TOL[torch.float32])
    _close("residual_out", h, hr, TOL[torch.float32])
    for name, a, b in zip(("dx", "dresidual", "dweight"), ours, ref):
        _close(name, a.grad, b.grad, GRAD_SUM_TOL[torch.float32])


@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("with_weight", [True, False])
def test_add_rms_norm_gradcheck(with_residual, with_weight):
    """float64 finite differences of the masked function (fixed seed and offset: a fixed mask)."""
    t = _inputs(3, 10, torch.float64, "cpu", with_weight)
    x, r = t["x"].requires_grad_(), t["residual"].requires_grad_()
    w = None if t["weight"] is None else t["weight"].requires_grad_()
    args = [x] + ([r] if with_residual else []) + ([w] if with_weight else [])

    def f(*leaves):
        it = iter(leaves)
        x_, r_ = next(it), next(it) if with_residual else None
        return layernorm.add_rms_norm(x_, r_, next(it) if with_weight else None, EPS, "torch", DROP)
    assert torch.autograd.gradcheck(f, args)


# ----------------------------------------------------------------------------- CPU: the CUDA kernels (cuda_sim)

@pytest.mark.cuda_sim
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,C", SIM_SHAPES)
@pytest.mark.parametrize("fused", [False, True])
def test_cuda_sim_matches_reference(dtype, N, C, fused, poison):
    _check_backend(load("cuda_sim"), N, C, dtype, "cpu", fused, with_weight=(N % 2 == 1))


@pytest.mark.cuda_sim
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [True, False])
def test_cuda_sim_dropout(dtype, with_residual, poison):
    _check_dropout(load("cuda_sim"), 5, 776, dtype, "cpu", with_residual, with_residual, TOL[dtype])


@pytest.mark.cuda_sim
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_sim_misaligned_pointers(dtype, poison):
    _check_misaligned(load("cuda_sim"), dtype, "cpu")


def _check_misaligned(b, dtype, device):
    """Views starting one element in: the CUDA launcher must drop to scalar loads."""
    N, C = 33, 768
    t = _inputs(N, C, dtype, device, True)
    shifted = {}
    for k, v in t.items():
        shifted[k] = torch.empty(v.numel() + 1, dtype=dtype, device=device)[1:].view(v.shape)
        shifted[k].copy_(v)
    y, h, rstd = b.add_rms_norm_fwd(shifted["x"], shifted["residual"], shifted["weight"], EPS, None)
    y_ref, h_ref, rstd_ref = layernorm.add_rms_norm_fwd(t["x"].double(), t["residual"].double(),
                                                        t["weight"].double(), EPS, None)
    _close("y", y, y_ref, TOL[dtype])
    dx, dw = b.rms_norm_bwd(shifted["dy"], h, shifted["weight"], rstd, shifted["dresidual"], None, None)
    dx_ref, dw_ref = layernorm.rms_norm_bwd(t["dy"].double(), h.double(), t["weight"].double(), rstd_ref,
                                            t["dresidual"].double(), None, None)
    _close("dx", dx, dx_ref, TOL[dtype])
    _close("dweight", dw, dw_ref, GRAD_SUM_TOL[dtype])


# ----------------------------------------------------------------------------- GPU: cuda, triton

GPU_BACKENDS = ["cuda", "triton"]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,C", GPU_SHAPES)
@pytest.mark.parametrize("fused", [False, True])
def test_matches_reference_gpu(backend, dtype, N, C, fused, poison):
    _check_backend(load(backend), N, C, dtype, "cuda", fused, with_weight=(N % 2 == 1))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [True, False])
def test_dropout_gpu(backend, dtype, with_residual, poison):
    _check_dropout(load(backend), 1000, 777, dtype, "cuda", with_residual, with_residual, TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_misaligned_pointers_gpu(backend, dtype, poison):
    _check_misaligned(load(backend), dtype, "cuda")

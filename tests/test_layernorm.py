"""LayerNorm backends (cpu, triton, cuda) against the float64 torch reference.

CPU part: the cpu backend (fp32, bf16, fp16), the Triton kernels under the interpreter (fp32,
small shapes) and the CUDA kernels under the SIMT emulation (cuda_sim: fp32 and bf16, every
threads-per-row layout, vector and scalar loads).
GPU part (@pytest.mark.gpu): cuda and triton at fp32/bf16 up to GPT-2-sized and larger rows.
"""
import pytest
import torch

from nanolm.ops import layernorm
from nanolm.ops.backends import BACKENDS, load, support_reason

EPS = 1e-5
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
       torch.float16: dict(atol=3e-3, rtol=3e-3)}
# dw/db sum N rows: their absolute error grows with sqrt(N) times the per-element error
GRAD_SUM_TOL = {torch.float32: dict(atol=1e-4, rtol=1e-5), torch.bfloat16: dict(atol=1e-1, rtol=2e-2),
                torch.float16: dict(atol=1e-2, rtol=3e-3)}
CPU_SHAPES = [(1, 777), (5, 768), (3, 1600), (17, 64), (70, 33)]
GPU_SHAPES = [(1, 777), (17, 768), (1000, 777), (4096, 1600), (16384, 768), (2048, 8192), (333, 8192),
              (64, 16384), (5, 1)]


def _inputs(N, C, dtype, device, with_bias=True):
    g = dict(dtype=dtype, device=device)
    x = torch.randn(N, C, **g) * 2 + 0.5  # a nonzero mean exercises the centering
    return dict(x=x, residual=torch.randn(N, C, **g), weight=torch.rand(C, **g) + 0.5,
                bias=torch.randn(C, **g) if with_bias else None, dy=torch.randn(N, C, **g),
                dresidual=torch.randn(N, C, **g))


def _f64(t):
    return None if t is None else t.double()


def _close(name, got, want, tol):
    assert not torch.isnan(got).any(), f"{name}: NaN (unwritten element?)"
    torch.testing.assert_close(got.double(), want.double(), msg=lambda m: f"{name}: {m}", **tol)


def _check_backend(backend, N, C, dtype, device, fused, with_bias):
    t = _inputs(N, C, dtype, device, with_bias)
    w, b = t["weight"], t["bias"]
    dres = t["dresidual"] if fused else None
    if fused:
        y, h, mean, rstd = backend.add_layer_norm_fwd(t["x"], t["residual"], w, b, EPS, None)
        h_ref = t["x"] + t["residual"]  # rounded to dtype, as the kernels normalize it
        _close("residual_out", h, h_ref, dict(atol=0, rtol=0))
    else:
        y, mean, rstd = backend.layer_norm_fwd(t["x"], w, b, EPS)
        h = h_ref = t["x"]
    y_ref, mean_ref, rstd_ref = layernorm.layer_norm_fwd(h_ref.double(), w.double(), _f64(b), EPS)
    _close("y", y, y_ref, TOL[dtype])
    _close("mean", mean, mean_ref, TOL[torch.float32])
    _close("rstd", rstd, rstd_ref, TOL[torch.float32])
    dx, dw, db = backend.layer_norm_bwd(t["dy"], h, w, mean, rstd, dres, None, None)
    dx_ref, dw_ref, db_ref = layernorm.layer_norm_bwd(t["dy"].double(), h_ref.double(), w.double(),
                                                      mean_ref, rstd_ref, _f64(dres), None, None)
    assert dx.dtype == dtype and dw.dtype == torch.float32 and db.dtype == torch.float32
    _close("dx", dx, dx_ref, TOL[dtype])
    _close("dweight", dw, dw_ref, GRAD_SUM_TOL[dtype])
    _close("dbias", db, db_ref, GRAD_SUM_TOL[dtype])


def _check_deterministic(backend, N, C, dtype, device):
    t = _inputs(N, C, dtype, device)
    _, mean, rstd = backend.layer_norm_fwd(t["x"], t["weight"], t["bias"], EPS)
    first = backend.layer_norm_bwd(t["dy"], t["x"], t["weight"], mean, rstd, t["dresidual"], None, None)
    second = backend.layer_norm_bwd(t["dy"], t["x"], t["weight"], mean, rstd, t["dresidual"], None, None)
    for name, a, b in zip(("dx", "dweight", "dbias"), first, second):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


# ----------------------------------------------------------------------------- CPU: cpu, triton (interpreter)

# Every backend whose SUPPORT table lists layernorm float32 on CPU (the specification aside);
# cuda_sim is skipped where nanolm._C_sim is not built.
CPU_BACKENDS = [pytest.param(n, marks=pytest.mark.cuda_sim) if n == "cuda_sim" else n for n in BACKENDS
                if n != "torch" and support_reason(n, "layernorm", torch.device("cpu"), torch.float32) is None]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("N,C", CPU_SHAPES)
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("with_bias", [True, False])
def test_matches_reference_cpu(backend, N, C, fused, with_bias, poison):
    _check_backend(load(backend), N, C, torch.float32, "cpu", fused, with_bias)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,C", CPU_SHAPES + [(300, 2048)])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("with_bias", [True, False])
def test_cpu_16bit_matches_reference(dtype, N, C, fused, with_bias, poison):
    _check_backend(load("cpu"), N, C, dtype, "cpu", fused, with_bias)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_deterministic_cpu(backend):
    _check_deterministic(load(backend), 150, 96, torch.float32, "cpu")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_deterministic_cpu_16bit(dtype):
    _check_deterministic(load("cpu"), 150, 777, dtype, "cpu")


def test_cpu_gradients_do_not_depend_on_thread_count():
    backend = load("cpu")
    t = _inputs(300, 200, torch.float32, "cpu")
    _, mean, rstd = backend.layer_norm_fwd(t["x"], t["weight"], None, EPS)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = backend.layer_norm_bwd(t["dy"], t["x"], t["weight"], mean, rstd, None, None, None)
    finally:
        torch.set_num_threads(before)
    many = backend.layer_norm_bwd(t["dy"], t["x"], t["weight"], mean, rstd, None, None, None)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_rows(backend):
    b = load(backend)
    x = torch.randn(0, 40)
    w = torch.randn(40)
    y, mean, rstd = b.layer_norm_fwd(x, w, None, EPS)
    assert y.shape == (0, 40) and mean.shape == (0,)
    dx, dw, db = b.layer_norm_bwd(x, x, w, mean, rstd, None, None, None)
    assert dx.shape == (0, 40) and torch.equal(dw, torch.zeros(40)) and torch.equal(db, torch.zeros(40))


def _bad_inputs(device):
    x = torch.randn(4, 16, device=device)
    w = torch.randn(16, device=device)
    return [
        ("dtype", dict(x=x.double(), weight=w.double()), "dtype"),
        ("weight length", dict(x=x, weight=torch.randn(15, device=device)), "shape"),
        ("non-contiguous", dict(x=torch.randn(16, 4, device=device).t(), weight=w), "contiguous"),
        ("mixed dtypes", dict(x=x, weight=w.half()), "dtype"),
        ("1-D x", dict(x=x[0], weight=w), "2-D"),
        ("bias length", dict(x=x, weight=w, bias=torch.randn(3, device=device)), "shape"),
    ]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", range(6))
def test_bad_inputs(backend, case):
    _, kw, words = _bad_inputs("cpu")[case]
    kw.setdefault("bias", None)
    with pytest.raises(ValueError, match=words):
        load(backend).layer_norm_fwd(kw["x"], kw["weight"], kw["bias"], EPS)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bad_backward_inputs(backend):
    b = load(backend)
    t = _inputs(4, 16, torch.float32, "cpu")
    _, mean, rstd = b.layer_norm_fwd(t["x"], t["weight"], None, EPS)
    with pytest.raises(ValueError, match="dresidual"):
        b.layer_norm_bwd(t["dy"], t["x"], t["weight"], mean, rstd, t["dresidual"][:2], None, None)
    with pytest.raises(ValueError, match="rstd"):
        b.layer_norm_bwd(t["dy"], t["x"], t["weight"], mean, rstd.double(), None, None, None)
    with pytest.raises(ValueError, match="dy"):
        b.layer_norm_bwd(t["dy"].t().contiguous().t(), t["x"], t["weight"], mean, rstd, None, None, None)


def test_cpu_backend_rejects_float64():
    t = _inputs(2, 8, torch.float64, "cpu")
    with pytest.raises(ValueError, match="float64"):
        load("cpu").layer_norm_fwd(t["x"], t["weight"], t["bias"], EPS)


@pytest.mark.parametrize("shape", [(2, 7, 777), (3, 1, 64)])
def test_op_layer_autograd_cpu(shape):
    backend = "cpu"
    C = shape[-1]
    leaves = [torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64),
              torch.rand(C, dtype=torch.float64) + 0.5, torch.randn(C, dtype=torch.float64)]
    ours = [t.float().requires_grad_() for t in leaves]
    ref = [t.clone().requires_grad_() for t in leaves]
    x, r, w, b = ours
    y1 = layernorm.layer_norm(x, w, b, EPS, backend)
    y2, h = layernorm.add_layer_norm(y1, r, w, b, EPS, backend, None)
    g_y, g_h = torch.randn_like(y2), torch.randn_like(h)
    (y2 * g_y + h * g_h).sum().backward()
    xr, rr, wr, br = ref
    y1r = torch.nn.functional.layer_norm(xr, (C,), wr, br, EPS)
    hr = y1r + rr
    y2r = torch.nn.functional.layer_norm(hr, (C,), wr, br, EPS)
    (y2r * g_y.double() + hr * g_h.double()).sum().backward()
    _close("y", y2, y2r, TOL[torch.float32])
    _close("residual_out", h, hr, TOL[torch.float32])
    for name, a, b_ in zip(("dx", "dresidual", "dweight", "dbias"), ours, ref):
        _close(name, a.grad, b_.grad, GRAD_SUM_TOL[torch.float32])


# ----------------------------------------------------------------------------- CPU: the CUDA kernels (cuda_sim)
# Rows of 1 to 16384: one warp per row (C <= 512 backward, 1024 forward) up to 1024 threads per
# row; C % 8 != 0 takes the scalar loads.
SIM_SHAPES = [(1, 777), (17, 768), (9, 1600), (3, 5000), (2, 16384), (5, 1), (70, 33)]


@pytest.mark.cuda_sim
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,C", SIM_SHAPES)
@pytest.mark.parametrize("fused", [False, True])
def test_cuda_sim_matches_reference(dtype, N, C, fused, poison):
    _check_backend(load("cuda_sim"), N, C, dtype, "cpu", fused, with_bias=(N % 2 == 1))


@pytest.mark.cuda_sim
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_sim_misaligned_pointers(dtype, poison):
    _check_misaligned(load("cuda_sim"), dtype, "cpu")


@pytest.mark.cuda_sim
@pytest.mark.parametrize("C", [768, 777])
def test_cuda_sim_deterministic(C):
    _check_deterministic(load("cuda_sim"), 300, C, torch.bfloat16, "cpu")


# ----------------------------------------------------------------------------- GPU: cuda, triton

GPU_BACKENDS = ["cuda", "triton"]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,C", GPU_SHAPES)
@pytest.mark.parametrize("fused", [False, True])
def test_matches_reference_gpu(backend, dtype, N, C, fused, poison):
    _check_backend(load(backend), N, C, dtype, "cuda", fused, with_bias=(N % 2 == 1))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_misaligned_pointers_gpu(backend, dtype, poison):
    _check_misaligned(load(backend), dtype, "cuda")


def _check_misaligned(b, dtype, device):
    """Views starting one element in: the CUDA launcher must drop to scalar loads."""
    N, C = 33, 768
    t = _inputs(N, C, dtype, device)
    storage = {k: torch.empty(v.numel() + 1, dtype=dtype, device=device) for k, v in t.items() if v is not None}
    shifted = {}
    for k, v in storage.items():
        view = v[1:].view(t[k].shape)
        view.copy_(t[k])
        shifted[k] = view
    y, h, mean, rstd = b.add_layer_norm_fwd(shifted["x"], shifted["residual"], shifted["weight"], shifted["bias"], EPS,
                                            None)
    y_ref, h_ref, mean_ref, rstd_ref = layernorm.add_layer_norm_fwd(
        t["x"].double(), t["residual"].double(), t["weight"].double(), t["bias"].double(), EPS, None)
    _close("y", y, y_ref, TOL[dtype])
    dx, dw, db = b.layer_norm_bwd(shifted["dy"], h, shifted["weight"], mean, rstd, shifted["dresidual"], None, None)
    dx_ref, dw_ref, db_ref = layernorm.layer_norm_bwd(t["dy"].double(), h.double(), t["weight"].double(),
                                                      mean_ref, rstd_ref, t["dresidual"].double(), None, None)
    _close("dx", dx, dx_ref, TOL[dtype])
    _close("dweight", dw, dw_ref, GRAD_SUM_TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("C", [768, 777, 8192])
def test_deterministic_gpu(backend, C):
    _check_deterministic(load(backend), 16384 if C < 8192 else 2048, C, torch.bfloat16, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_device_mismatch_gpu(backend):
    x = torch.randn(4, 16, device="cuda")
    with pytest.raises(ValueError, match="cpu"):
        load(backend).layer_norm_fwd(x, torch.randn(16), None, EPS)


@pytest.mark.gpu
def test_cuda_backend_rejects_cpu_tensors():
    with pytest.raises(ValueError, match="cuda"):
        load("cuda").layer_norm_fwd(torch.randn(4, 16), torch.randn(16), None, EPS)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_op_layer_autograd_gpu_bf16(backend):
    B, T, C = 4, 256, 768
    x = torch.randn(B, T, C, device="cuda", requires_grad=True)
    r = torch.randn(B, T, C, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(C, device="cuda", requires_grad=True)
    b = torch.zeros(C, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y, h = layernorm.add_layer_norm(x.bfloat16(), r, w.bfloat16(), b.bfloat16(), EPS, backend, None)
    (y.float().square().sum() + h.float().sum()).backward()
    for t in (x, r, w, b):
        assert t.grad is not None and torch.isfinite(t.grad).all()

"""AdamW update and deterministic sum of squares: every backend against torch.optim.AdamW."""
import pytest
import torch

from nanolm.ops.backends import load

cpu, cuda, cuda_sim, torch_ref, triton = (load(n) for n in ("cpu", "cuda", "cuda_sim", "torch", "triton"))

HP = dict(lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-8)
CPU_SHAPES = [(50257, 8), (777,), (1,), (13, 7)]
GPU_SHAPES = [(50257, 768), (768, 3072), (777,), (1,), (2304,)]
TRITON_INTERP_SHAPES = [(300, 7), (777,), (1,)]


SIM = pytest.param("cpu", cuda_sim, id="cuda_sim", marks=pytest.mark.cuda_sim)


def backends_on(device):
    if device == "cpu":
        return [pytest.param(torch_ref, id="torch"), pytest.param(cpu, id="cpu"),
                pytest.param(triton, id="triton"), pytest.param(cuda_sim, id="cuda_sim", marks=pytest.mark.cuda_sim)]
    return [pytest.param(cuda, id="cuda", marks=pytest.mark.gpu),
            pytest.param(triton, id="triton", marks=pytest.mark.gpu)]


def make_params(shapes, device):
    """Decayed (2-D) tensors first, then the rest: the flat-buffer order of nanolm/optim.py."""
    params = [torch.randn(s, device=device) for s in shapes]
    return sorted(params, key=lambda p: p.dim() < 2), sum(p.numel() for p in params if p.dim() >= 2)


def run_both(backend, shapes, device, weight_decay, grad_scale, steps=20):
    params, decay_numel = make_params(shapes, device)
    ref = [p.clone().requires_grad_() for p in params]
    groups = [{"params": [p for p in ref if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in ref if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=HP["lr"], betas=(HP["beta1"], HP["beta2"]), eps=HP["eps"],
                            foreach=False)
    flat = torch.cat([p.flatten() for p in params])
    m, v = torch.zeros_like(flat), torch.zeros_like(flat)
    for step in range(1, steps + 1):
        grads = [torch.randn_like(p) * (0.1 * step) for p in params]
        for p, g in zip(ref, grads):
            p.grad = g * grad_scale
        opt.step()
        flat_grad = torch.cat([g.flatten() for g in grads])
        backend.adamw_step(flat, flat_grad, m, v, HP["lr"], HP["beta1"], HP["beta2"], HP["eps"],
                           weight_decay, step, decay_numel, grad_scale)
    def ref_flat(key):
        return torch.cat([(p if key is None else opt.state[p][key]).detach().flatten() for p in ref])
    return flat, m, v, ref_flat(None), ref_flat("exp_avg"), ref_flat("exp_avg_sq")


def assert_matches(flat, m, v, rp, rm, rv):
    torch.testing.assert_close(m, rm, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(v, rv, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(flat, rp, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", backends_on("cpu"))
@pytest.mark.parametrize("weight_decay,grad_scale", [(0.1, 1.0), (0.0, 1.0), (0.1, 0.37)])
def test_matches_torch_adamw_cpu(backend, weight_decay, grad_scale):
    shapes = TRITON_INTERP_SHAPES if backend is triton else CPU_SHAPES
    assert_matches(*run_both(backend, shapes, "cpu", weight_decay, grad_scale))


@pytest.mark.parametrize("backend", backends_on("cuda"))
@pytest.mark.parametrize("weight_decay,grad_scale", [(0.1, 1.0), (0.0, 1.0), (0.1, 0.37)])
def test_matches_torch_adamw_gpu(backend, weight_decay, grad_scale):
    assert_matches(*run_both(backend, GPU_SHAPES, "cuda", weight_decay, grad_scale))


def flat_state(n, device, offset=0):
    """Random p, g, m, v (v > 0) of n elements; offset > 0 makes them slices at that offset."""
    p, g, m = (torch.randn(n + offset, device=device)[offset:] for _ in range(3))
    v = torch.rand(n + offset, device=device)[offset:]
    return p, g, m, v


@pytest.mark.parametrize("device,backend", [("cpu", cpu), ("cpu", triton), SIM,
                                            pytest.param("cuda", cuda, marks=pytest.mark.gpu),
                                            pytest.param("cuda", triton, marks=pytest.mark.gpu)])
@pytest.mark.parametrize("n,offset,decay_numel", [(1, 0, 1), (1003, 1, 517), (1003, 3, 0),
                                                  (4099, 0, 4099), (4099, 2, 6)])
def test_every_element_updated(device, backend, n, offset, decay_numel):
    """Misaligned slices (ZeRO shards) and any decay boundary: every element as the reference."""
    if device == "cuda":
        n *= 1000  # past several grid-strides
    state = flat_state(n, device, offset)
    before = [t.clone() for t in state]
    expected = [t.clone() for t in state]
    args = (3e-3, 0.9, 0.95, 1e-8, 0.1, 7, decay_numel, 0.5)
    torch_ref.adamw_step(*expected, *args)
    backend.adamw_step(*state, *args)
    for got, want in zip(state, expected):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    for i in (0, 2, 3):  # p, m, v: written everywhere, grad untouched
        assert (state[i] != before[i]).all()
    assert torch.equal(state[1], before[1])


@pytest.mark.parametrize("device,backend", [("cpu", cpu), ("cpu", torch_ref), ("cpu", triton), SIM,
                                            pytest.param("cuda", cuda, marks=pytest.mark.gpu),
                                            pytest.param("cuda", triton, marks=pytest.mark.gpu)])
@pytest.mark.parametrize("n", [1, 777, 4097, 300_001])
def test_sum_of_squares(device, backend, n, poison):
    if device == "cuda":
        n = n * 400 + 3  # up to 120M: a 124M-parameter gradient
    elif backend is triton:
        n = min(n, 20_000)
    x = torch.randn(n, device=device)
    got = backend.sum_of_squares(x)
    assert got.dtype == torch.float32 and got.dim() == 0
    torch.testing.assert_close(got.double().cpu(), x.double().square().sum().cpu(), rtol=2e-6, atol=0)
    assert torch.equal(backend.sum_of_squares(x.clone()), got)  # same bits, fresh buffer


@pytest.mark.parametrize("backend", [cpu, triton, pytest.param(cuda_sim, marks=pytest.mark.cuda_sim),
                                     pytest.param(cuda, marks=pytest.mark.gpu)])
def test_bad_inputs(backend):
    device = "cuda" if backend is cuda else "cpu"
    p, g, m, v = flat_state(64, device)
    ok = (1e-3, 0.9, 0.95, 1e-8, 0.1, 1, 32, 1.0)
    bad_buffers = [(p, g[:63], m, v), (p, g.double(), m, v), (p, g, m.half(), v),
                   (p.view(8, 8), g, m, v), (p, g, m, torch.rand(128, device=device)[::2])]
    for buffers in bad_buffers:
        with pytest.raises(ValueError):
            backend.adamw_step(*buffers, *ok)
    for decay_numel in (-1, 65):
        with pytest.raises(ValueError, match="decay_numel"):
            backend.adamw_step(p, g, m, v, *ok[:6], decay_numel, 1.0)
    with pytest.raises(ValueError, match="step"):
        backend.adamw_step(p, g, m, v, *ok[:5], 0, 32, 1.0)
    with pytest.raises(ValueError):
        backend.sum_of_squares(p.double())
    with pytest.raises(ValueError):
        backend.sum_of_squares(torch.rand(64, 2, device=device)[:, 0])


def test_cuda_backend_rejects_cpu_tensors():
    """Checked before any pointer reaches a kernel (runs without a GPU)."""
    p, g, m, v = flat_state(64, "cpu")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        cuda.adamw_step(p, g, m, v, 1e-3, 0.9, 0.95, 1e-8, 0.1, 1, 32, 1.0)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        cuda.sum_of_squares(g)

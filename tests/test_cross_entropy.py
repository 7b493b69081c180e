"""Cross-entropy backends and the fused linear cross-entropy against a float64 reference.

CPU runs the cpu backend, the triton backend under the interpreter (fp32, small shapes) and the
CUDA kernel under the SIMT emulation (cuda_sim: fp32 here and bf16 below); the gpu-marked tests
run the cuda and triton backends at bf16 and GPT-2 sizes.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from nanolm.ops import cross_entropy
from nanolm.ops.backends import BACKENDS, load, unavailable_reason

cpu = load("cpu")

IGNORE = -100
TOL = {torch.float32: dict(rtol=1e-5, atol=2e-6), torch.bfloat16: dict(rtol=1e-2, atol=1e-5),
       torch.float16: dict(rtol=2e-3, atol=1e-6)}


def cpu_backends():
    """Backends that run on CPU tensors here: cpu (if built), triton (interpreter), cuda_sim
    (skipped where nanolm._C_sim is not built)."""
    built = [n for n in BACKENDS if n not in ("torch", "cuda_sim")
             and unavailable_reason(n, "cross_entropy", torch.device("cpu")) is None]
    return built + [pytest.param("cuda_sim", marks=pytest.mark.cuda_sim)]


def gpu_backends():
    return ["cuda", "triton"]


def make_inputs(N, V, Vp, dtype=torch.float32, device="cpu", n_ignored=1, extreme=False):
    logits = (torch.randn(N, Vp, device=device) * 4).to(dtype)
    logits[:, V:] = float("nan")  # padding must be neither read into the softmax nor left unwritten
    targets = torch.randint(0, V, (N,), device=device)
    targets[torch.randperm(N, device=device)[:n_ignored]] = IGNORE
    if extreme:
        logits[0, :4] = torch.tensor([1e4, -1e4, 1e4, -1e4], dtype=dtype)
        logits[-1, V - 1] = -1e4
        targets[0], targets[-1] = 1, V - 1  # a target at -1e4 gives a loss of ~2e4
    return logits, targets


def check_against_reference(backend, logits, targets, V, z_loss, grad_scale, inplace):
    expected_losses, expected_d = cross_entropy.cross_entropy_fwd(logits.double(), targets, V, IGNORE, z_loss,
                                                              grad_scale, False)
    original = logits.clone()
    losses, dlogits = backend.cross_entropy_fwd(logits, targets, V, IGNORE, z_loss, grad_scale, inplace)
    assert losses.dtype == torch.float32 and losses.shape == targets.shape
    assert dlogits.dtype == original.dtype and dlogits.shape == original.shape
    if inplace:
        assert dlogits.data_ptr() == logits.data_ptr()
    else:
        assert torch.equal(logits[:, :V], original[:, :V])  # input untouched
    assert not dlogits.isnan().any(), "unwritten (NaN-poisoned) or NaN gradient elements"
    tol = TOL[original.dtype]
    torch.testing.assert_close(losses.double(), expected_losses, **tol)
    torch.testing.assert_close(dlogits.double(), expected_d.to(original.dtype).double(), **tol)
    ignored = targets == IGNORE
    assert (losses[ignored] == 0).all() and (dlogits[ignored] == 0).all()
    assert (dlogits[:, V:] == 0).all()


# ----------------------------------------------------------------------------- the kernel

@pytest.mark.parametrize("name", cpu_backends())
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("N,V,Vp,z_loss", [(5, 777, 777, 0.0), (4, 777, 800, 1e-3), (1, 777, 784, 0.0),
                                           (2, 50257, 50304, 1e-4)])
def test_matches_reference(name, inplace, N, V, Vp, z_loss):
    logits, targets = make_inputs(N, V, Vp, n_ignored=1 if N > 1 else 0)
    check_against_reference(load(name), logits, targets, V, z_loss, 0.25, inplace)


@pytest.mark.parametrize("name", cpu_backends())
def test_extreme_logits_do_not_overflow(name):
    logits, targets = make_inputs(3, 777, 800, extreme=True, n_ignored=0)
    check_against_reference(load(name), logits, targets, 777, 1e-4, 1.0, False)


def test_cpu_thousand_rows():
    logits, targets = make_inputs(1000, 777, 777, n_ignored=37, extreme=True)
    check_against_reference(cpu, logits, targets, 777, 1e-3, 1 / 963, True)


@pytest.mark.parametrize("name", cpu_backends())
def test_all_ignored(name):
    logits, _ = make_inputs(3, 777, 800)
    targets = torch.full((3,), IGNORE)
    losses, dlogits = load(name).cross_entropy_fwd(logits, targets, 777, IGNORE, 1e-3, 1.0, True)
    assert (losses == 0).all() and (dlogits == 0).all()
    loss = cross_entropy.cross_entropy(torch.randn(3, 777, requires_grad=True), targets, name)
    assert loss.item() == 0.0


@pytest.mark.parametrize("name", cpu_backends())
def test_out_of_range_targets_stay_in_bounds(name):
    """The op layer rejects these; called directly, the kernel clamps and stays in the row."""
    logits, _ = make_inputs(3, 777, 800, n_ignored=0)
    targets = torch.tensor([777, -7, 10**12])
    losses, dlogits = load(name).cross_entropy_fwd(logits, targets, 777, IGNORE, 0.0, 1.0, False)
    assert losses.isfinite().all() and not dlogits.isnan().any()
    assert (dlogits[:, 777:] == 0).all()


@pytest.mark.parametrize("name", cpu_backends())
def test_deterministic(name):
    logits, targets = make_inputs(6, 777, 800)
    first = load(name).cross_entropy_fwd(logits, targets, 777, IGNORE, 1e-3, 0.5, False)
    second = load(name).cross_entropy_fwd(logits, targets, 777, IGNORE, 1e-3, 0.5, False)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.parametrize("name", cpu_backends())
def test_bad_input(name):
    backend = load(name)
    logits, targets = make_inputs(4, 777, 800)
    call = lambda lg, tg, v=777: backend.cross_entropy_fwd(lg, tg, v, IGNORE, 0.0, 1.0, False)  # noqa: E731
    with pytest.raises(ValueError, match="targets has dtype int32"):
        call(logits, targets.int())
    with pytest.raises(ValueError, match="targets has shape"):
        call(logits, targets[:3])
    with pytest.raises(ValueError, match="contiguous"):
        call(torch.randn(800, 4).t(), targets)
    with pytest.raises(ValueError, match="logits must be 2-D"):
        call(logits.reshape(2, 2, 800), targets)
    with pytest.raises(ValueError, match="vocab_size=801"):
        call(logits, targets, 801)
    with pytest.raises(ValueError, match="logits has dtype float64"):
        call(logits.double(), targets)
    with pytest.raises(TypeError):
        call(logits.numpy(), targets)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("N,V,Vp,z_loss,extreme", [(5, 777, 777, 0.0, False), (4, 777, 800, 1e-3, True),
                                                   (1, 777, 784, 0.0, False), (2, 50257, 50304, 1e-4, False),
                                                   (300, 1000, 1024, 0.0, True)])
def test_cpu_16bit_matches_reference(dtype, inplace, N, V, Vp, z_loss, extreme):
    """16-bit logits in, fp32 losses and 16-bit gradients out, against float64 on the same values."""
    logits, targets = make_inputs(N, V, Vp, dtype=dtype, n_ignored=1 if N > 1 else 0, extreme=extreme)
    check_against_reference(cpu, logits, targets, V, z_loss, 0.25, inplace)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_16bit_deterministic(dtype):
    logits, targets = make_inputs(64, 777, 800, dtype=dtype)
    first = cpu.cross_entropy_fwd(logits, targets, 777, IGNORE, 1e-3, 0.5, False)
    second = cpu.cross_entropy_fwd(logits, targets, 777, IGNORE, 1e-3, 0.5, False)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_cpu_rejects_float64():
    logits, targets = make_inputs(2, 777, 800)
    with pytest.raises(ValueError, match="logits has dtype float64; supported: float32, bfloat16, float16"):
        cpu.cross_entropy_fwd(logits.double(), targets, 777, IGNORE, 0.0, 1.0, False)


@pytest.mark.parametrize("name", cpu_backends())
def test_op_layer_mean_and_errors(name):
    logits, targets = make_inputs(8, 777, 800, n_ignored=3)
    x = logits.clone().requires_grad_()
    loss = cross_entropy.cross_entropy(x, targets, name, vocab_size=777)
    (loss * 3).backward()
    x64 = logits[:, :777].double().requires_grad_()
    expected = F.cross_entropy(x64, targets, ignore_index=IGNORE)
    (expected * 3).backward()
    torch.testing.assert_close(loss.double(), expected, **TOL[torch.float32])
    torch.testing.assert_close(x.grad[:, :777].double(), x64.grad, **TOL[torch.float32])
    with pytest.raises(ValueError, match="outside \\[0, 777\\)"):
        cross_entropy.cross_entropy(logits, torch.full((8,), 777), name, vocab_size=777)


# ----------------------------------------------------------------------------- linear cross-entropy

def linear_reference(h, weight, targets, V, z_loss):
    """float64 autograd of mean over valid rows of lse - x_t + z_loss lse^2; returns loss, dh, dW."""
    h64, w64 = h.double().requires_grad_(), weight.double().requires_grad_()
    logits = (h64 @ w64.t())[:, :V]
    valid = targets != IGNORE
    lse = torch.logsumexp(logits, dim=1)
    x_t = logits.gather(1, torch.where(valid, targets, 0)[:, None]).squeeze(1)
    loss = torch.where(valid, lse - x_t + z_loss * lse.square(), 0).sum() / max(int(valid.sum()), 1)
    loss.backward()
    return loss.detach(), h64.grad, w64.grad


@pytest.mark.parametrize("name", ["torch"] + cpu_backends())
@pytest.mark.parametrize("N,chunk_rows,z_loss", [(37, 8, 1e-3), (37, None, 0.0), (5, 64, 0.0)])
def test_linear_cross_entropy(name, N, chunk_rows, z_loss):
    C, V, Vp = 16, 777, 800
    h = torch.randn(N, C, requires_grad=True)
    weight = (torch.randn(Vp, C) * 0.5).requires_grad_()
    targets = torch.randint(0, V, (N,))
    targets[::7] = IGNORE
    loss = cross_entropy.linear_cross_entropy(h, weight, targets, name, vocab_size=V, z_loss=z_loss,
                                    chunk_rows=chunk_rows)
    (loss * 2).backward()
    ref_loss, ref_dh, ref_dw = linear_reference(h.detach(), weight.detach(), targets, V, z_loss)
    tol = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.double(), ref_loss, **tol)
    torch.testing.assert_close(h.grad.double(), 2 * ref_dh, **tol)
    torch.testing.assert_close(weight.grad.double(), 2 * ref_dw, **tol)
    assert (weight.grad[V:] == 0).all()


@pytest.mark.parametrize("name", ["torch"] + cpu_backends()[:1])
def test_linear_cross_entropy_bf16_chunks_accumulate_in_fp32(name):
    """bf16 chunks (the autocast path): each chunk's dW goes through a bf16 temporary into the
    fp32 accumulator, the first one overwriting it."""
    N, C, V, Vp = 37, 16, 777, 800
    h = torch.randn(N, C).bfloat16().requires_grad_()
    weight = (torch.randn(Vp, C) * 0.5).bfloat16().requires_grad_()
    targets = torch.randint(0, V, (N,))
    targets[::7] = IGNORE
    loss = cross_entropy.linear_cross_entropy(h, weight, targets, name, vocab_size=V, chunk_rows=8)
    loss.backward()
    ref_loss, ref_dh, ref_dw = linear_reference(h.detach(), weight.detach(), targets, V, 0.0)
    tol = dict(rtol=3e-2, atol=1e-3)  # as test_gpu_linear_cross_entropy's bf16 case
    torch.testing.assert_close(loss.double(), ref_loss, **tol)
    torch.testing.assert_close(h.grad.double(), ref_dh, rtol=tol["rtol"], atol=tol["atol"] * ref_dh.abs().max().item())
    torch.testing.assert_close(weight.grad.double(), ref_dw, rtol=tol["rtol"],
                               atol=tol["atol"] * ref_dw.abs().max().item())


@pytest.mark.parametrize("name", ["torch"] + cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_cross_entropy_poisoned_buffers(name, dtype, monkeypatch):
    """Every torch.empty in the op returns NaNs: the first chunk must overwrite the dW
    accumulator (and the kernels their outputs) rather than add to whatever was there, so the
    results equal, bit for bit, those of a run on fresh memory; the fp32 run also matches the
    float64 reference."""
    if name == "triton" and dtype == torch.bfloat16:
        pytest.skip("bf16 in the Triton interpreter is not trusted (see NOTES.md); verified on GPUs")
    N, C, V, Vp = 40, 16, 777, 800
    h = torch.randn(N, C).to(dtype)
    weight = (torch.randn(Vp, C) * 0.5).to(dtype)
    targets = torch.randint(0, V, (N,))

    def run():
        hg, wg = h.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = cross_entropy.linear_cross_entropy(hg, wg, targets, name, vocab_size=V, chunk_rows=16)
        loss.backward()
        return loss.detach(), hg.grad, wg.grad

    clean = run()
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: (lambda t: t.fill_(float("nan"))
                        if t.is_floating_point() else t)(real_empty(*a, **k)))
    poisoned = run()
    monkeypatch.undo()
    for a, b in zip(clean, poisoned):
        assert torch.equal(a, b)
    if dtype == torch.float32:
        ref = linear_reference(h, weight, targets, V, 0.0)
        for got, want in zip(poisoned, ref):
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6 * want.abs().max().item())


@pytest.mark.parametrize("name", ["torch"] + cpu_backends())
def test_linear_cross_entropy_no_rows(name):
    """N = 0: no chunk runs, so nothing writes dW; it must still come back zero, not garbage."""
    h = torch.randn(0, 16, requires_grad=True)
    weight = torch.randn(777, 16, requires_grad=True)
    loss = cross_entropy.linear_cross_entropy(h, weight, torch.zeros(0, dtype=torch.int64), name)
    loss.backward()
    assert loss.item() == 0.0 and h.grad.shape == (0, 16)
    assert torch.equal(weight.grad, torch.zeros_like(weight))


def test_linear_cross_entropy_memory_is_one_chunk(monkeypatch):
    """The torch backend's cross_entropy_fwd, wrapped to record every logits chunk it is given."""
    N, C, V = 100, 8, 777
    chunks, torch_backend = [], cross_entropy.BACKENDS["torch"]

    def recording(logits, *args):
        chunks.append((tuple(logits.shape), logits.untyped_storage().data_ptr()))
        return torch_backend.cross_entropy_fwd(logits, *args)
    monkeypatch.setitem(cross_entropy.BACKENDS, "torch", torch_backend._replace(cross_entropy_fwd=recording))
    h, weight = torch.randn(N, C, requires_grad=True), torch.randn(V, C, requires_grad=True)
    cross_entropy.linear_cross_entropy(h, weight, torch.randint(0, V, (N,)), "torch", chunk_rows=24).backward()
    assert [shape for shape, _ in chunks] == [(24, V)] * 4 + [(4, V)]
    assert len({storage for _, storage in chunks}) == 1, "every chunk reuses one logits buffer"


def test_default_chunk_rows():
    assert cross_entropy.default_chunk_rows(8192, 768, 50304) == 1024  # 8x the hidden states, not N*V
    assert cross_entropy.default_chunk_rows(65536, 768, 50304) * 50304 <= 65536 * 768 * 16
    # small batches: one chunk
    assert cross_entropy.default_chunk_rows(1, 16, 777) == cross_entropy.MIN_CHUNK_ROWS == 512


def test_linear_cross_entropy_no_grad_matches():
    h, weight = torch.randn(20, 16), torch.randn(777, 16)
    targets = torch.randint(0, 777, (20,))
    with torch.no_grad():
        loss = cross_entropy.linear_cross_entropy(h, weight, targets, "cpu", chunk_rows=8)
    torch.testing.assert_close(loss.double(), linear_reference(h, weight, targets, 777, 0.0)[0],
                               rtol=1e-5, atol=1e-6)


def test_linear_cross_entropy_bad_input():
    h, weight = torch.randn(4, 8), torch.randn(777, 8)
    with pytest.raises(ValueError, match="outside"):
        cross_entropy.linear_cross_entropy(h, weight, torch.tensor([0, 1, 777, 2]), "cpu")
    with pytest.raises(ValueError, match="chunk_rows must be >= 1, got 0"):
        cross_entropy.linear_cross_entropy(h, weight, torch.tensor([0, 1, 2, 3]), "cpu", chunk_rows=0)
    with pytest.raises(ValueError, match="must be \\(N, C\\) and \\(V, C\\)"):
        cross_entropy.linear_cross_entropy(h, torch.randn(777, 9), torch.tensor([0, 1, 2, 3]), "cpu")
    with pytest.raises(ValueError, match="targets must be int64"):
        cross_entropy.linear_cross_entropy(h, weight, torch.tensor([0, 1, 2, 3], dtype=torch.int32), "cpu")


# ----------------------------------------------------------------------------- CPU: the CUDA kernel (cuda_sim)

@pytest.mark.cuda_sim
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("N,V,Vp", [(1, 50257, 50304), (17, 777, 777), (9, 5001, 5003)])
@pytest.mark.parametrize("inplace", [False, True])
def test_cuda_sim_matches_reference(dtype, N, V, Vp, inplace):
    logits, targets = make_inputs(N, V, Vp, dtype=dtype, n_ignored=N // 4, extreme=N > 1)
    check_against_reference(load("cuda_sim"), logits, targets, V, 1e-4, 1 / N, inplace)


@pytest.mark.cuda_sim
def test_cuda_sim_misaligned_output():
    N, V = 3, 5001
    logits, targets = make_inputs(N, V, V, dtype=torch.bfloat16)
    shifted = torch.empty(N * V + 1, dtype=torch.bfloat16)[1:].view(N, V)
    shifted.copy_(logits)
    check_against_reference(load("cuda_sim"), shifted, targets, V, 0.0, 1.0, False)
    check_against_reference(load("cuda_sim"), shifted, targets, V, 0.0, 1.0, True)


# ----------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.parametrize("name", gpu_backends())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("N,V,Vp", [(1, 50257, 50304), (1000, 50257, 50304), (8192, 50257, 50304),
                                     (33, 50257, 50257), (17, 777, 777)])
@pytest.mark.parametrize("inplace", [False, True])
def test_gpu_matches_reference(name, dtype, N, V, Vp, inplace):
    logits, targets = make_inputs(N, V, Vp, dtype=dtype, device="cuda", n_ignored=N // 10, extreme=N > 1)
    check_against_reference(load(name), logits, targets, V, 1e-4, 1 / max(N, 1), inplace)


@pytest.mark.gpu
@pytest.mark.parametrize("name", gpu_backends())
def test_gpu_misaligned_output(name):
    """dlogits whose rows do not share logits' 16-byte alignment (a view at an odd offset)."""
    N, V = 7, 50257
    logits, targets = make_inputs(N, V, V, dtype=torch.bfloat16, device="cuda")
    shifted = torch.empty(N * V + 1, dtype=torch.bfloat16, device="cuda")[1:].view(N, V)
    shifted.copy_(logits)
    check_against_reference(load(name), shifted, targets, V, 0.0, 1.0, False)
    check_against_reference(load(name), shifted, targets, V, 0.0, 1.0, True)


@pytest.mark.gpu
@pytest.mark.parametrize("name", gpu_backends())
def test_gpu_deterministic(name):
    logits, targets = make_inputs(512, 50257, 50304, dtype=torch.bfloat16, device="cuda")
    first = load(name).cross_entropy_fwd(logits, targets, 50257, IGNORE, 1e-4, 0.01, False)
    second = load(name).cross_entropy_fwd(logits, targets, 50257, IGNORE, 1e-4, 0.01, False)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.gpu
@pytest.mark.parametrize("name", gpu_backends())
@pytest.mark.parametrize("dtype,tol", [(torch.float32, dict(rtol=1e-4, atol=1e-5)),
                                       (torch.bfloat16, dict(rtol=3e-2, atol=1e-3))])
def test_gpu_linear_cross_entropy(name, dtype, tol):
    N, C, V, Vp = 3000, 768, 50257, 50304
    h = (torch.randn(N, C, device="cuda") * 0.5).to(dtype).requires_grad_()
    weight = (torch.randn(Vp, C, device="cuda") * 0.05).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (N,), device="cuda")
    targets[::13] = IGNORE
    loss = cross_entropy.linear_cross_entropy(h, weight, targets, name, vocab_size=V, z_loss=1e-4, chunk_rows=700)
    loss.backward()
    ref_loss, ref_dh, ref_dw = linear_reference(h.detach(), weight.detach(), targets, V, 1e-4)
    torch.testing.assert_close(loss.double(), ref_loss, **tol)
    torch.testing.assert_close(h.grad.double(), ref_dh, rtol=tol["rtol"], atol=tol["atol"] * ref_dh.abs().max().item())
    torch.testing.assert_close(weight.grad.double(), ref_dw, rtol=tol["rtol"],
                               atol=tol["atol"] * ref_dw.abs().max().item())
    assert math.isfinite(loss.item())


@pytest.mark.parametrize("name", ["torch"] + cpu_backends()[:1])
def test_linear_cross_entropy_follows_cpu_autocast(name):
    """Under torch.autocast("cpu", bfloat16) fp32 h and weight are multiplied in bf16, as on
    CUDA: the loss equals, bit for bit, that of the same call on bf16 copies and differs from
    the fp32 one; gradients come back in the inputs' fp32, equal to the bf16 call's to bf16
    accuracy (torch's bf16 matmuls round differently under autocast)."""
    N, C, V = 40, 16, 777
    h, weight = torch.randn(N, C), torch.randn(V, C) * 0.5
    targets = torch.randint(0, V, (N,))

    def run(h_in, w_in, autocast):
        hg, wg = h_in.clone().requires_grad_(), w_in.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = cross_entropy.linear_cross_entropy(hg, wg, targets, name, chunk_rows=16)
        loss.backward()
        return loss.detach(), hg.grad, wg.grad

    under_autocast = run(h, weight, True)
    explicit = run(h.bfloat16(), weight.bfloat16(), False)
    assert torch.equal(under_autocast[0], explicit[0])
    assert not torch.equal(under_autocast[0], run(h, weight, False)[0])
    for got, want in zip(under_autocast[1:], explicit[1:]):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want.float(), rtol=1e-2, atol=1e-2 * want.abs().max().item())

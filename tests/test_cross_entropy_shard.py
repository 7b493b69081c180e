"""The vocab-parallel pair of the cross-entropy contract, cross_entropy_stats and
cross_entropy_grad, in every backend against the float64 reference (torch_ref), on one
vocabulary shard: ids [vocab_start, vocab_start + Vp) of which the first V are real.
Targets fall inside the shard, outside it (another rank's) and on ignore_index.
"""
import pytest
import torch

from nanolm.ops import cross_entropy
from nanolm.ops.backends import load
from test_cross_entropy import IGNORE, TOL, cpu_backends, gpu_backends

VOCAB_START, TOTAL_VOCAB = 1000, 5000


def make_shard(N, V, Vp, dtype=torch.float32, device="cpu", extreme=False):
    logits = (torch.randn(N, Vp, device=device) * 4).to(dtype)
    logits[:, V:] = float("nan")  # padding: never read into the statistics, written 0 by the gradient
    targets = torch.randint(0, TOTAL_VOCAB, (N,), device=device)  # mostly another shard's ids
    targets[::3] = VOCAB_START + torch.randint(0, max(V, 1), targets[::3].shape, device=device)
    targets[1::4] = IGNORE
    if extreme and V >= 4:
        logits[0, :4] = torch.tensor([1e4, -1e4, 1e4, -1e4], dtype=dtype)
        targets[0] = VOCAB_START + 1  # the target at -1e4
    return logits, targets


def global_lse(logits, V):
    """A logsumexp over this shard and a made-up rest of the vocabulary (other ranks' logits)."""
    rest = torch.randn(logits.shape[0], device=logits.device, dtype=torch.float64) * 3 + 5
    if V == 0:
        return rest
    return torch.logaddexp(torch.logsumexp(logits[:, :V].double(), dim=1), rest)


SHAPES = [(5, 777, 777), (4, 777, 800), (1, 0, 784), (3, 37, 64), (6, 1, 16)]


def claimed_dtypes():
    """(backend, dtype) for every dtype each CPU-runnable backend's table claims for cross_entropy
    on CPU: the pair is tested in each, not only in float32."""
    cases = []
    for param in cpu_backends():
        name = param if isinstance(param, str) else param.values[0]
        marks = () if isinstance(param, str) else param.marks
        for dtype in load(name).SUPPORT["cross_entropy"].dtypes["cpu"]:
            cases.append(pytest.param(name, dtype, marks=marks, id=f"{name}-{str(dtype).removeprefix('torch.')}"))
    return cases


@pytest.mark.parametrize("name,dtype", claimed_dtypes())
@pytest.mark.parametrize("N,V,Vp", SHAPES)
def test_stats_match_reference(name, dtype, N, V, Vp, poison):
    """16-bit logits are read exactly and their statistics kept in fp32: fp32 tolerances hold."""
    logits, targets = make_shard(N, V, Vp, dtype=dtype, extreme=True)
    want = cross_entropy.cross_entropy_stats(logits.double(), targets, VOCAB_START, V)
    got = load(name).cross_entropy_stats(logits, targets, VOCAB_START, V)
    assert got.dtype == torch.float32 and got.shape == (N, 3)
    assert not got.isnan().any(), "unwritten (NaN-poisoned) statistics"
    torch.testing.assert_close(got[:, 0].double(), want[:, 0], rtol=0, atol=0)  # the max is exact
    torch.testing.assert_close(got[:, 1].double(), want[:, 1], **TOL[torch.float32])
    torch.testing.assert_close(got[:, 2].double(), want[:, 2], rtol=0, atol=0)  # a copied logit, or 0
    if V == 0:
        assert (got[:, 0] == float("-inf")).all() and (got[:, 1:] == 0).all()


@pytest.mark.parametrize("name,dtype", claimed_dtypes())
@pytest.mark.parametrize("N,V,Vp", SHAPES)
@pytest.mark.parametrize("z_loss", [0.0, 1e-3])
def test_grad_matches_reference(name, dtype, N, V, Vp, z_loss):
    logits, targets = make_shard(N, V, Vp, dtype=dtype, extreme=True)
    lse = global_lse(logits, V).float()  # the contract's lse is fp32: both get the same rounded value
    want = cross_entropy.cross_entropy_grad(logits.double(), targets, lse.double(), VOCAB_START, V, IGNORE, z_loss,
                                            0.25)
    got = load(name).cross_entropy_grad(logits, targets, lse, VOCAB_START, V, IGNORE, z_loss, 0.25)
    assert got.data_ptr() == logits.data_ptr() and got.dtype == dtype  # in place
    assert not got.isnan().any(), "padding or rows left unwritten"
    torch.testing.assert_close(got.double(), want.to(dtype).double(), **TOL[dtype])
    assert (got[:, V:] == 0).all() and (got[targets == IGNORE] == 0).all()


def test_reference_pair_is_the_cross_entropy_on_one_shard():
    """With the whole vocabulary on one shard, stats give the lse and target logit of
    cross_entropy_fwd, and grad with that lse its gradient."""
    logits, targets = make_shard(7, 300, 320)
    targets = torch.where(targets == IGNORE, IGNORE, targets % 300)
    logits = logits.double()
    losses, dlogits = cross_entropy.cross_entropy_fwd(logits, targets, 300, IGNORE, 1e-3, 0.5, False)
    m, s, x_t = cross_entropy.cross_entropy_stats(logits, targets, 0, 300).unbind(1)
    lse = m + s.log()
    valid = targets != IGNORE
    torch.testing.assert_close((lse - x_t + 1e-3 * lse.square())[valid], losses[valid], rtol=1e-12, atol=1e-12)
    grad = cross_entropy.cross_entropy_grad(logits.clone(), targets, lse, 0, 300, IGNORE, 1e-3, 0.5)
    torch.testing.assert_close(grad, dlogits, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", cpu_backends())
def test_bad_input(name):
    backend = load(name)
    logits, targets = make_shard(3, 10, 16)
    with pytest.raises(ValueError, match=r"vocab_size=17 outside \[0, 16\]"):
        backend.cross_entropy_stats(logits, targets, 0, 17)
    with pytest.raises(ValueError, match="lse has shape"):
        backend.cross_entropy_grad(logits, targets, torch.zeros(4), 0, 10, IGNORE, 0.0, 1.0)
    with pytest.raises(ValueError, match="targets has dtype int32"):
        backend.cross_entropy_stats(logits, targets.int(), 0, 10)


@pytest.mark.gpu
@pytest.mark.parametrize("name", gpu_backends())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("N,V,Vp", [(1000, 6283, 6288), (3, 50257 // 8, 6288), (17, 0, 6288), (64, 777, 777)])
def test_gpu_pair_matches_reference(name, dtype, N, V, Vp):
    logits, targets = make_shard(N, V, Vp, dtype=dtype, device="cuda", extreme=True)
    backend = load(name)
    want = cross_entropy.cross_entropy_stats(logits.double(), targets, VOCAB_START, V)
    got = backend.cross_entropy_stats(logits, targets, VOCAB_START, V)
    torch.testing.assert_close(got[:, 0].double(), want[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(got[:, 1].double(), want[:, 1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[:, 2].double(), want[:, 2], rtol=0, atol=0)
    lse = global_lse(logits, V).float()
    want_grad = cross_entropy.cross_entropy_grad(logits.double(), targets, lse.double(), VOCAB_START, V, IGNORE, 1e-4,
                                             0.01)
    got_grad = backend.cross_entropy_grad(logits, targets, lse, VOCAB_START, V, IGNORE, 1e-4, 0.01)
    torch.testing.assert_close(got_grad.double(), want_grad.to(dtype).double(), **TOL[dtype])

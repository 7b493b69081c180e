"""The specification (the torch backend) and the registered ops vs float64 PyTorch autograd of the plain math."""
import math

import pytest
import torch
import torch.nn.functional as F

from nanolm.ops import adamw, attention, backends, cross_entropy, layernorm

ref = backends.load("torch")  # the specification's functions

D = torch.float64


def rand(*shape, dtype=D):
    return torch.randn(*shape, dtype=dtype)


def leaf(t):
    return t.clone().requires_grad_(True)


# ----------------------------------------------------------------------------- layernorm

@pytest.mark.parametrize("N,C", [(1, 777), (37, 64), (5, 4096)])
@pytest.mark.parametrize("bias", [True, False])
def test_layer_norm_fwd_bwd(N, C, bias):
    x, w, dy = rand(N, C), rand(C), rand(N, C)
    b = rand(C) if bias else None
    y, mean, rstd = ref.layer_norm_fwd(x, w, b, 1e-5)
    xl, wl, bl = leaf(x), leaf(w), leaf(b) if bias else None
    y_ref = F.layer_norm(xl, (C,), wl, bl, 1e-5)
    y_ref.backward(dy)
    torch.testing.assert_close(y, y_ref.detach())
    dx, dw, db = ref.layer_norm_bwd(dy, x, w, mean, rstd, None, None, None)
    torch.testing.assert_close(dx, xl.grad)
    torch.testing.assert_close(dw, wl.grad)
    if bias:
        torch.testing.assert_close(db, bl.grad)


def test_add_layer_norm_fwd_bwd():
    N, C = 17, 777
    x, r, w, b, dy, dres = rand(N, C), rand(N, C), rand(C), rand(C), rand(N, C), rand(N, C)
    y, res_out, mean, rstd = ref.add_layer_norm_fwd(x, r, w, b, 1e-5, None)
    xl, rl = leaf(x), leaf(r)
    s = xl + rl
    y_ref = F.layer_norm(s, (C,), w, b, 1e-5)
    (y_ref * dy + s * dres).sum().backward()
    torch.testing.assert_close(y, y_ref.detach())
    torch.testing.assert_close(res_out, s.detach())
    dx, _, _ = ref.layer_norm_bwd(dy, res_out, w, mean, rstd, dres, None, None)
    torch.testing.assert_close(dx, xl.grad)
    torch.testing.assert_close(dx, rl.grad)


def test_ops_layer_norm_autograd():
    x, w, b = leaf(rand(3, 10, 33)), leaf(rand(33)), leaf(rand(33))
    torch.autograd.gradcheck(lambda x, w, b: layernorm.layer_norm(x, w, b, 1e-5, "torch"), (x, w, b))


def test_ops_add_layer_norm_autograd():
    x, r, w, b = leaf(rand(2, 5, 24)), leaf(rand(2, 5, 24)), leaf(rand(24)), leaf(rand(24))

    def f(x, r, w, b):
        y, s = layernorm.add_layer_norm(x, r, w, b, 1e-5, "torch", None)
        return y, s
    torch.autograd.gradcheck(f, (x, r, w, b))


# ----------------------------------------------------------------------------- attention

def attention_math(q, k, v, scale):
    """(B, T, nh, hs) plain softmax attention, differentiated by autograd."""
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    T = q.shape[1]
    s = (qh @ kh.transpose(-1, -2)) * scale
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return (torch.softmax(s, dim=-1) @ vh).transpose(1, 2)


@pytest.mark.parametrize("B,T,nh,hs", [(1, 1, 1, 8), (2, 17, 3, 16), (1, 100, 2, 24)])
def test_attention_fwd_bwd(B, T, nh, hs):
    qkv = rand(B, T, 3, nh, hs)
    q, k, v = qkv.unbind(2)  # strided views, as the op layer passes them
    scale = 1 / math.sqrt(hs)
    do = rand(B, T, nh, hs)
    o, lse = ref.attention_fwd(q, k, v, scale, None)
    ql, kl, vl = leaf(q), leaf(k), leaf(v)
    o_ref = attention_math(ql, kl, vl, scale)
    o_ref.backward(do)
    torch.testing.assert_close(o, o_ref.detach())
    dq, dk, dv = (torch.full_like(q, float("nan")) for _ in range(3))
    ref.attention_bwd(do, q, k, v, o, lse, scale, dq, dk, dv, None)
    torch.testing.assert_close(dq, ql.grad)
    torch.testing.assert_close(dk, kl.grad)
    torch.testing.assert_close(dv, vl.grad)


def test_ops_causal_attention_autograd():
    qkv = leaf(rand(2, 7, 3 * 2 * 4))
    torch.autograd.gradcheck(lambda t: attention.causal_attention(t, 2, 2, "torch", None), (qkv,))


def test_ops_causal_attention_bad_shape():
    with pytest.raises(ValueError, match="n_head"):
        attention.causal_attention(rand(2, 7, 30), 4, 4, "torch", None)


# ----------------------------------------------------------------------------- cross-entropy

def ce_math(logits, targets, vocab_size, ignore_index, z_loss):
    """Mean over valid rows of F.cross_entropy + z_loss * lse^2, padding columns dropped."""
    x = logits[:, :vocab_size]
    valid = targets != ignore_index
    ce = F.cross_entropy(x, targets, ignore_index=ignore_index, reduction="none")
    lse = torch.logsumexp(x, dim=1)
    per_row = torch.where(valid, ce + z_loss * lse.square(), 0.0)
    return per_row.sum() / valid.sum().clamp(min=1)


def make_targets(N, V, ignore_index=-100, n_ignored=3):
    t = torch.randint(0, V, (N,))
    t[torch.randperm(N)[:n_ignored]] = ignore_index
    return t


@pytest.mark.parametrize("N,Vp,V", [(1, 64, 50), (33, 777, 777), (20, 1024, 1000)])
@pytest.mark.parametrize("z_loss", [0.0, 1e-4])
def test_cross_entropy_fwd(N, Vp, V, z_loss):
    logits, targets = rand(N, Vp), make_targets(N, V, n_ignored=min(3, N - 1))
    n_valid = int((targets != -100).sum())
    losses, dlogits = ref.cross_entropy_fwd(logits.clone(), targets, V, -100, z_loss, 1 / n_valid, False)
    ll = leaf(logits)
    loss_ref = ce_math(ll, targets, V, -100, z_loss)
    loss_ref.backward()
    torch.testing.assert_close(losses.sum() / n_valid, loss_ref.detach())
    torch.testing.assert_close(dlogits, ll.grad)
    assert (dlogits[:, V:] == 0).all()


def test_cross_entropy_inplace_writes_logits():
    logits, targets = rand(9, 128), make_targets(9, 100)
    buf = logits.clone()
    _, dlogits = ref.cross_entropy_fwd(buf, targets, 100, -100, 0.0, 1.0, True)
    assert dlogits.data_ptr() == buf.data_ptr()


@pytest.mark.parametrize("ignore_index", [-100, 5])
def test_ops_cross_entropy(ignore_index):
    logits, targets = leaf(rand(13, 70)), make_targets(13, 60, ignore_index)
    loss = cross_entropy.cross_entropy(logits, targets, "torch", vocab_size=60, ignore_index=ignore_index, z_loss=1e-3)
    (2.5 * loss).backward()
    l2 = leaf(logits.detach())
    ref_loss = ce_math(l2, targets, 60, ignore_index, 1e-3)
    (2.5 * ref_loss).backward()
    torch.testing.assert_close(loss.detach(), ref_loss.detach())
    torch.testing.assert_close(logits.grad, l2.grad)


@pytest.mark.parametrize("chunk_rows", [None, 4, 64])
def test_ops_linear_cross_entropy(chunk_rows):
    N, C, Vp, V = 23, 16, 96, 90
    h, w, targets = leaf(rand(N, C)), leaf(rand(Vp, C)), make_targets(N, V)
    loss = cross_entropy.linear_cross_entropy(h, w, targets, "torch", vocab_size=V, z_loss=1e-4, chunk_rows=chunk_rows)
    (0.7 * loss).backward()
    h2, w2 = leaf(h.detach()), leaf(w.detach())
    ref_loss = ce_math(h2 @ w2.t(), targets, V, -100, 1e-4)
    (0.7 * ref_loss).backward()
    torch.testing.assert_close(loss.detach(), ref_loss.detach())
    torch.testing.assert_close(h.grad, h2.grad)
    torch.testing.assert_close(w.grad, w2.grad)


def test_ops_linear_cross_entropy_no_grad_matches():
    h, w, targets = rand(10, 8), rand(64, 8), make_targets(10, 60)
    with torch.no_grad():
        loss = cross_entropy.linear_cross_entropy(h, w, targets, "torch", vocab_size=60, chunk_rows=3)
    torch.testing.assert_close(loss, ce_math(h @ w.t(), targets, 60, -100, 0.0))


def test_all_ignored_gives_zero_loss_and_grad():
    h, w = leaf(rand(6, 8)), leaf(rand(64, 8))
    targets = torch.full((6,), -100)
    loss = cross_entropy.linear_cross_entropy(h, w, targets, "torch", chunk_rows=4)
    loss.backward()
    assert loss.item() == 0
    assert (h.grad == 0).all() and (w.grad == 0).all()
    logits = leaf(rand(6, 64))
    loss = cross_entropy.cross_entropy(logits, targets, "torch")
    loss.backward()
    assert loss.item() == 0 and (logits.grad == 0).all()


def test_cross_entropy_bad_targets():
    with pytest.raises(ValueError, match="outside"):
        cross_entropy.cross_entropy(rand(4, 64), torch.tensor([0, 1, 60, 2]), "torch", vocab_size=50)
    with pytest.raises(ValueError, match="int64"):
        cross_entropy.cross_entropy(rand(4, 64), torch.zeros(4, dtype=torch.int32), "torch")


# ----------------------------------------------------------------------------- adamw

@pytest.mark.parametrize("grad_scale", [1.0, 0.3])
def test_adamw_step_vs_torch(grad_scale):
    n, decay_numel = 1000, 777
    p0 = torch.randn(n)
    param, exp_avg, exp_avg_sq = p0.clone(), torch.zeros(n), torch.zeros(n)
    pd, pn = p0[:decay_numel].clone().requires_grad_(), p0[decay_numel:].clone().requires_grad_()
    opt = torch.optim.AdamW([{"params": [pd], "weight_decay": 0.1}, {"params": [pn], "weight_decay": 0.0}],
                            lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    for step in range(1, 11):
        grad = torch.randn(n)
        ref.adamw_step(param, grad, exp_avg, exp_avg_sq, 1e-2, 0.9, 0.95, 1e-8, 0.1, step, decay_numel, grad_scale)
        pd.grad, pn.grad = (grad * grad_scale)[:decay_numel].clone(), (grad * grad_scale)[decay_numel:].clone()
        opt.step()
    torch.testing.assert_close(param, torch.cat([pd.detach(), pn.detach()]))


def test_sum_of_squares_and_grad_norm():
    x = torch.randn(12345)
    torch.testing.assert_close(ref.sum_of_squares(x), x.double().square().sum().float())
    torch.testing.assert_close(adamw.grad_norm(x, "torch"), torch.linalg.vector_norm(x))

"""Dropout: the Philox mask specification (nanolm/ops/dropout.py), every backend against it bit for bit,
keep rate and scaling, gradients by finite differences of the same masked function, and the
model/trainer wiring (eval without dropout, p=0 unchanged, bit-exact resume)."""
import math
import os
import subprocess
import sys

import pytest
import torch

from nanolm import checkpoint
from nanolm.ops import attention, layernorm
from nanolm.ops import dropout as dropout_spec
from nanolm.ops.backends import load
from nanolm.ops.support import Support
from nanolm.config import ModelConfig, parse_args
from nanolm.model import GPT
from nanolm.train import config_from_args, train

EPS = 1e-5
TOL = dict(atol=1e-5, rtol=1e-5)  # float32 against the float64 reference
DROP = dropout_spec.dropout(0.3, seed=1234 | 7 << 32, offset=5 << 32 | 11)  # both words of seed and offset nonzero


def _backends_with(op):
    names = ["torch", "cpu", "triton"]
    return [n for n in names if load(n).SUPPORT[op].dropout]


# ----------------------------------------------------------------------------- the generator

@pytest.mark.parametrize("counter,seed,expected", [
    # Random123's known-answer tests for philox4x32_10 (kat_vectors)
    ((0, 0, 0, 0), 0, (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, 0xFFFFFFFFFFFFFFFF, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), 0x299F31D0 << 32 | 0xA4093822,
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_philox_known_answers(counter, seed, expected):
    out = dropout_spec.philox4x32_10(*(torch.tensor([c]) for c in counter), seed)
    assert tuple(w.item() for w in out) == expected


def test_keep_rate_and_independence():
    n = 1 << 17
    index = torch.arange(n)
    for p in (0.1, 0.5, 0.9):
        keep = dropout_spec.dropout_keep(index, dropout_spec.dropout(p, 3, 0))
        sigma = math.sqrt(p * (1 - p) / n)
        assert abs(keep.float().mean().item() - (1 - p)) < 5 * sigma, p
    a = dropout_spec.dropout_keep(index, dropout_spec.dropout(0.5, 3, 0))
    b = dropout_spec.dropout_keep(index, dropout_spec.dropout(0.5, 3, 1))  # the next offset: an unrelated mask
    c = dropout_spec.dropout_keep(index, dropout_spec.dropout(0.5, 4, 0))  # another seed
    for other in (b, c):
        assert abs((a == other).float().mean().item() - 0.5) < 5 * math.sqrt(0.25 / n)
    # neighbours within one Philox call (words 0-3) and across calls are uncorrelated
    assert abs((a[:-1] == a[1:]).float().mean().item() - 0.5) < 5 * math.sqrt(0.25 / n)


def test_cpp_generator_at_large_indices():
    """csrc/dropout.h at indices whose group number needs the counter's high word (the kernel
    tests only reach small indices)."""
    _C = pytest.importorskip("nanolm._C")
    index = torch.tensor([0, 3, 4, 2 ** 32 - 1, 2 ** 32, 2 ** 34 + 3, 2 ** 40 + 5, 2 ** 62 + 2, 2 ** 63 - 1])
    index = torch.cat([index, torch.randint(0, 2 ** 62, (200,))])
    params = _C.DropoutParams(*dropout_spec.kernel_args(DROP))
    got = [_C.dropout_factor(params, i) for i in index.tolist()]
    keep = dropout_spec.dropout_keep(index, DROP)
    assert [f != 0 for f in got] == keep.tolist()
    assert {f for f in got if f} == {torch.tensor(1 / (1 - DROP.p), dtype=torch.float32).item()}


def test_dropout_arguments():
    assert dropout_spec.dropout(0.0, 1, 2) is None  # p = 0: the path without dropout
    for bad in (dict(p=1.0, seed=0, offset=0), dict(p=-0.1, seed=0, offset=0),
                dict(p=0.1, seed=-1, offset=0), dict(p=0.1, seed=0, offset=2 ** 63)):
        with pytest.raises(ValueError, match="dropout"):
            dropout_spec.dropout(**bad)


# ----------------------------------------------------------------------------- add + layernorm

def _ln_inputs(N, C, dtype=torch.float32):
    g = dict(dtype=dtype)
    return dict(x=torch.randn(N, C, **g) * 2 + 0.5, residual=torch.randn(N, C, **g),
                weight=torch.rand(C, **g) + 0.5, bias=torch.randn(C, **g), dy=torch.randn(N, C, **g),
                dresidual=torch.randn(N, C, **g))


# cuda_sim: the CUDA kernels under the SIMT emulation (its attention takes bf16/fp16 and hs 64/128
# only, so the fp32 attention tests below leave it out)
@pytest.mark.parametrize("name", _backends_with("layernorm") + ["cuda_sim"])
@pytest.mark.parametrize("N,C", [(1, 777), (5, 768), (17, 64), (70, 33)])
@pytest.mark.parametrize("with_residual", [True, False])
def test_add_layer_norm_matches_reference(name, N, C, with_residual, poison):
    backend, t = load(name), _ln_inputs(N, C)
    residual = t["residual"] if with_residual else None
    keep = dropout_spec.dropout_keep(torch.arange(N * C).view(N, C), DROP)
    y, h, mean, rstd = backend.add_layer_norm_fwd(t["x"], residual, t["weight"], t["bias"], EPS, DROP)
    # the mask, bit for bit: without a residual, residual_out is the dropped branch itself
    if not with_residual:
        assert torch.equal(h != 0, keep), "forward mask differs from the reference's"
    h_ref = torch.where(keep, t["x"].double() / (1 - DROP.p), 0.0)
    if with_residual:
        h_ref = h_ref + t["residual"].double()
    torch.testing.assert_close(h.double(), h_ref, **TOL)
    y_ref, mean_ref, rstd_ref = layernorm.layer_norm_fwd(h_ref, t["weight"].double(), t["bias"].double(), EPS)
    torch.testing.assert_close(y.double(), y_ref, **TOL)
    dbranch = torch.empty_like(h)
    dx, dw, db = backend.layer_norm_bwd(t["dy"], h, t["weight"], mean, rstd, t["dresidual"], dbranch, DROP)
    dx_ref, _, _ = layernorm.layer_norm_bwd(t["dy"].double(), h_ref, t["weight"].double(), mean_ref,
                                            rstd_ref, t["dresidual"].double(), None, None)
    assert torch.equal(dbranch != 0, keep), "backward mask differs from the reference's"
    torch.testing.assert_close(dx.double(), dx_ref, **TOL)
    torch.testing.assert_close(dbranch.double(), torch.where(keep, dx_ref / (1 - DROP.p), 0.0), **TOL)


def test_add_layer_norm_gradcheck():
    """float64 finite differences of the masked function (fixed seed and offset: a fixed mask)."""
    t = _ln_inputs(3, 10, torch.float64)
    args = [t[k].requires_grad_() for k in ("x", "residual", "weight", "bias")]
    for residual in (args[1], None):
        def f(x, r, w, b, residual=residual):
            return layernorm.add_layer_norm(x, r if residual is not None else None, w, b, EPS, "torch", DROP)
        assert torch.autograd.gradcheck(f, args)


# ----------------------------------------------------------------------------- attention

def _attention_mask(B, T, nh, dropout):
    index = torch.arange(B * nh * T * T).view(B, nh, T, T)
    return dropout_spec.dropout_keep(index, dropout) & torch.ones(T, T, dtype=torch.bool).tril()


@pytest.mark.parametrize("name", _backends_with("attention"))
@pytest.mark.parametrize("B,T,nh,hs", [(1, 1, 1, 16), (2, 67, 3, 32), (1, 130, 2, 64)])
def test_attention_matches_reference(name, B, T, nh, hs, poison):
    backend = load(name)
    q, k, v, do = (torch.randn(B, T, nh, hs) for _ in range(4))
    o, lse = backend.attention_fwd(q, k, v, 1 / math.sqrt(hs), DROP)
    o_ref, lse_ref = attention.attention_fwd(q.double(), k.double(), v.double(), 1 / math.sqrt(hs), DROP)
    torch.testing.assert_close(o.double(), o_ref, **TOL)
    torch.testing.assert_close(lse.double(), lse_ref, **TOL)
    grads = [torch.empty(B, T, nh, hs) for _ in range(3)]
    backend.attention_bwd(do, q, k, v, o, lse, 1 / math.sqrt(hs), *grads, DROP)
    refs = [torch.empty(B, T, nh, hs, dtype=torch.float64) for _ in range(3)]
    attention.attention_bwd(do.double(), q.double(), k.double(), v.double(), o_ref, lse_ref,
                            1 / math.sqrt(hs), *refs, DROP)
    for gname, got, want in zip(("dq", "dk", "dv"), grads, refs):
        torch.testing.assert_close(got.double(), want, msg=lambda m, gname=gname: f"{gname}: {m}", **TOL)


@pytest.mark.parametrize("name", _backends_with("attention"))
def test_attention_mask_bit_for_bit(name):
    """With V = the identity (hs = T), row t_q of O is row t_q of the dropped probabilities:
    its zeros are the mask. The backward's mask shows in dV = Pd^T dO with dO = the identity."""
    B, T, nh, hs = 2, 64, 2, 64
    backend = load(name)
    q, k = torch.randn(B, T, nh, hs), torch.randn(B, T, nh, hs)
    eye = torch.eye(T).view(1, T, 1, T).expand(B, T, nh, T).contiguous()
    o, lse = backend.attention_fwd(q, k, eye, 1 / math.sqrt(hs), DROP)
    keep = _attention_mask(B, T, nh, DROP)
    assert torch.equal(o.transpose(1, 2) != 0, keep), "forward mask differs from the reference's"
    dq, dk, dv = (torch.empty(B, T, nh, hs) for _ in range(3))
    backend.attention_bwd(eye, q, k, eye, o, lse, 1 / math.sqrt(hs), dq, dk, dv, DROP)
    assert torch.equal(dv.transpose(1, 2).transpose(-1, -2) != 0, keep), "backward mask differs"


@pytest.mark.parametrize("name", [n for n in _backends_with("attention") if attention.BACKENDS[n].support.gqa])
@pytest.mark.parametrize("B,T,nh,nkv,hs", [(2, 67, 6, 2, 32), (1, 130, 3, 1, 64)])
def test_attention_gqa_matches_reference(name, B, T, nh, nkv, hs, poison):
    """Dropout with K/V heads shared by groups: each query head keeps its own mask (element
    ((b * nh + h) * T + i) * T + j), and dK, dV sum the dropped group."""
    backend, scale = load(name), 1 / math.sqrt(hs)
    q, do = torch.randn(B, T, nh, hs), torch.randn(B, T, nh, hs)
    k, v = torch.randn(B, T, nkv, hs), torch.randn(B, T, nkv, hs)
    o, lse = backend.attention_fwd(q, k, v, scale, DROP)
    o_ref, lse_ref = attention.attention_fwd(q.double(), k.double(), v.double(), scale, DROP)
    torch.testing.assert_close(o.double(), o_ref, **TOL)
    torch.testing.assert_close(lse.double(), lse_ref, **TOL)
    grads = [torch.empty_like(t) for t in (q, k, v)]
    backend.attention_bwd(do, q, k, v, o, lse, scale, *grads, DROP)
    refs = [torch.empty_like(t, dtype=torch.float64) for t in (q, k, v)]
    attention.attention_bwd(do.double(), q.double(), k.double(), v.double(), o_ref, lse_ref, scale, *refs, DROP)
    for gname, got, want in zip(("dq", "dk", "dv"), grads, refs):
        torch.testing.assert_close(got.double(), want, msg=lambda m, gname=gname: f"{gname}: {m}", **TOL)


@pytest.mark.parametrize("nkv", [2, 1])
def test_attention_gradcheck(nkv):
    B, T, nh, hs = 1, 6, 2, 4
    qkv = torch.randn(B, T, (nh + 2 * nkv) * hs, dtype=torch.float64, requires_grad=True)
    dropout = dropout_spec.dropout(0.4, 9, 2)
    assert torch.autograd.gradcheck(lambda t: attention.causal_attention(t, nh, nkv, "torch", dropout), (qkv,))


# ----------------------------------------------------------------------------- 16-bit cpu kernels

LN_TOL16 = {torch.bfloat16: dict(atol=2e-2, rtol=2e-2), torch.float16: dict(atol=3e-3, rtol=3e-3)}
ATTENTION_TOL16 = {torch.bfloat16: 2e-2, torch.float16: 4e-3}  # times max(|ref|, 1), as tests/test_attention.py


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_residual", [True, False])
def test_cpu_add_layer_norm_16bit(dtype, with_residual, poison):
    """The cpu kernels on bf16/fp16 rows: the same mask bit for bit, applied in fp32 to the widened
    x; y and the gradients are checked against the float64 reference on the stored (rounded) h."""
    backend, N, C = load("cpu"), 5, 777
    t = {name: value.to(dtype) for name, value in _ln_inputs(N, C).items()}
    residual = t["residual"] if with_residual else None
    keep = dropout_spec.dropout_keep(torch.arange(N * C).view(N, C), DROP)
    y, h, mean, rstd = backend.add_layer_norm_fwd(t["x"], residual, t["weight"], t["bias"], EPS, DROP)
    assert h.dtype == y.dtype == dtype
    if not with_residual:
        assert torch.equal(h != 0, keep), "forward mask differs from the reference's"
    h_ref = torch.where(keep, t["x"].double() / (1 - DROP.p), 0.0)
    if with_residual:
        h_ref = h_ref + t["residual"].double()
    torch.testing.assert_close(h.double(), h_ref, **LN_TOL16[dtype])
    y_ref, mean_ref, rstd_ref = layernorm.layer_norm_fwd(h.double(), t["weight"].double(), t["bias"].double(), EPS)
    torch.testing.assert_close(y.double(), y_ref, **LN_TOL16[dtype])
    dbranch = torch.empty_like(h)
    dx, _, _ = backend.layer_norm_bwd(t["dy"], h, t["weight"], mean, rstd, t["dresidual"], dbranch, DROP)
    dx_ref, _, _ = layernorm.layer_norm_bwd(t["dy"].double(), h.double(), t["weight"].double(), mean_ref,
                                            rstd_ref, t["dresidual"].double(), None, None)
    assert torch.equal(dbranch != 0, keep), "backward mask differs from the reference's"
    torch.testing.assert_close(dx.double(), dx_ref, **LN_TOL16[dtype])
    torch.testing.assert_close(dbranch.double(), torch.where(keep, dx_ref / (1 - DROP.p), 0.0), **LN_TOL16[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_attention_16bit(dtype, poison):
    """The cpu attention on bf16 (its AVX512-BF16 dot-product forward where the CPU has it) and
    fp16: values against the float64 reference, and the mask bit for bit (V = the identity)."""
    backend, (B, T, nh, hs) = load("cpu"), (2, 67, 3, 64)
    scale = 1 / math.sqrt(hs)
    q, k, v, do = (torch.randn(B, T, nh, hs, dtype=dtype) for _ in range(4))
    o, lse = backend.attention_fwd(q, k, v, scale, DROP)
    grads = [torch.empty(B, T, nh, hs, dtype=dtype) for _ in range(3)]
    backend.attention_bwd(do, q, k, v, o, lse, scale, *grads, DROP)
    o_ref, lse_ref = attention.attention_fwd(q.double(), k.double(), v.double(), scale, DROP)
    refs = [torch.empty(B, T, nh, hs, dtype=torch.float64) for _ in range(3)]
    attention.attention_bwd(do.double(), q.double(), k.double(), v.double(), o.double(), lse_ref, scale, *refs,
                            DROP)
    for name, got, want in zip(("o", "lse", "dq", "dk", "dv"), (o, lse, *grads), (o_ref, lse_ref, *refs)):
        err = (got.double() - want).abs().max().item()
        bound = ATTENTION_TOL16[dtype] * max(want.abs().max().item(), 1.0)
        assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g} ({dtype})"
    T = hs
    q, k = torch.randn(B, T, nh, hs, dtype=dtype), torch.randn(B, T, nh, hs, dtype=dtype)
    eye = torch.eye(T, dtype=dtype).view(1, T, 1, T).expand(B, T, nh, T).contiguous()
    o, lse = backend.attention_fwd(q, k, eye, scale, DROP)
    keep = _attention_mask(B, T, nh, DROP)
    assert torch.equal(o.transpose(1, 2) != 0, keep), "forward mask differs from the reference's"
    dq, dk, dv = (torch.empty(B, T, nh, hs, dtype=dtype) for _ in range(3))
    backend.attention_bwd(eye, q, k, eye, o, lse, scale, dq, dk, dv, DROP)
    assert torch.equal(dv.transpose(1, 2).transpose(-1, -2) != 0, keep), "backward mask differs"


def test_backend_without_dropout_says_so(monkeypatch):
    no_dropout = Support(dtypes={"cpu": (torch.float32,)})
    for module in (attention, layernorm):
        monkeypatch.setitem(module.BACKENDS, "torch", module.BACKENDS["torch"]._replace(support=no_dropout))
    with pytest.raises(ValueError, match="torch has no dropout for attention"):
        attention.causal_attention(torch.randn(1, 4, 6), 1, 1, "torch", DROP)
    with pytest.raises(ValueError, match="torch has no dropout for layernorm"):
        layernorm.add_layer_norm(torch.randn(2, 4), torch.randn(2, 4), torch.ones(4), None, EPS, "torch", DROP)


# ----------------------------------------------------------------------------- model and trainer

def _model(dropout, name="torch"):
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50, vocab_multiple=16,
                      dropout=dropout)
    return GPT(cfg, {op: name for op in ("layernorm", "attention", "cross_entropy", "adamw")})


def test_model_p0_and_eval_run_without_dropout():
    plain, dropped = _model(0.0), _model(0.2)
    assert not hasattr(plain, "dropout") and "dropout._extra_state" not in plain.state_dict()
    idx, y = torch.randint(0, 50, (2, 16)), torch.randint(0, 50, (2, 16))
    dropped.eval()
    assert torch.equal(plain(idx, y), dropped(idx, y))  # same weights: eval is the plain model
    assert dropped.dropout.forwards == 0
    dropped.train()
    a, b = dropped(idx, y), dropped(idx, y)
    assert dropped.dropout.forwards == 2 and not torch.equal(a, b)  # each forward a fresh mask
    dropped.dropout.forwards = 0
    assert torch.equal(dropped(idx, y), a)  # the same (seed, offset): the same masks


def test_hf_export_skips_the_dropout_counter():
    from nanolm.hf import to_hf
    state = _model(0.2).state_dict()
    assert "dropout._extra_state" in state
    assert set(to_hf(state, 50)) == set(to_hf(_model(0.0).state_dict(), 50))


@pytest.mark.parametrize("name", ["cpu", "triton"])
def test_model_backend_matches_reference(name):
    if name not in _backends_with("layernorm") or name not in _backends_with("attention"):
        pytest.skip(f"{name} has no dropout")
    ref, other = _model(0.2), _model(0.2, name)
    idx, y = torch.randint(0, 50, (2, 16)), torch.randint(0, 50, (2, 16))
    loss_ref, loss = ref(idx, y), other(idx, y)
    loss_ref.backward(), loss.backward()
    torch.testing.assert_close(loss, loss_ref, **TOL)
    for (n, p), p_ref in zip(other.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, atol=1e-5, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")


TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--grad_accum=2",
        "--eval_iters=2", "--log_interval=2", "--sample_tokens=8", "--max_steps=4", "--eval_interval=2",
        "--warmup=2", "--ckpt_interval=2", "--keep_ckpts=5", "--dropout=0.2", "--kernels=torch"]


def test_resume_with_dropout_is_bit_exact(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(parse_args(TINY + [f"--out_dir={straight}"]))
    train(config_from_args([f"--resume={straight / 'ckpt_00000002.pt'}", f"--out_dir={resumed}"]))
    a, b = checkpoint.load(straight), checkpoint.load(resumed)
    assert a["step"] == b["step"] == 4
    # 4 steps of 2 micro-batches; evaluation draws no masks
    assert a["model"]["dropout._extra_state"] == b["model"]["dropout._extra_state"] == {"forwards": 8}
    for k, v in a["model"].items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, b["model"][k]), k
    for k in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(a["optimizer"][k], b["optimizer"][k]), k


# ----------------------------------------------------------------------------- GPU (cuda, triton)

GPU_TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,C", [(1, 777), (1000, 768), (333, 1600)])
def test_add_layer_norm_gpu(name, dtype, N, C, poison):
    backend, g = load(name), dict(device="cuda", dtype=dtype)
    x, residual = torch.randn(N, C, **g) * 2 + 0.5, torch.randn(N, C, **g)
    weight, bias, dy = torch.rand(C, **g) + 0.5, torch.randn(C, **g), torch.randn(N, C, **g)
    keep = dropout_spec.dropout_keep(torch.arange(N * C, device="cuda").view(N, C), DROP)
    _, h, mean, rstd = backend.add_layer_norm_fwd(x, None, weight, bias, EPS, DROP)
    assert torch.equal(h != 0, keep), "forward mask differs from the reference's"
    y, h, mean, rstd = backend.add_layer_norm_fwd(x, residual, weight, bias, EPS, DROP)
    y_ref, h_ref, _, _ = layernorm.add_layer_norm_fwd(x.double(), residual.double(), weight.double(),
                                                      bias.double(), EPS, DROP)
    torch.testing.assert_close(h.double(), h_ref, **GPU_TOL[dtype])
    torch.testing.assert_close(y.double(), y_ref, **GPU_TOL[dtype])
    dbranch = torch.empty_like(x)
    dx, _, _ = backend.layer_norm_bwd(dy, h, weight, mean, rstd, None, dbranch, DROP)
    assert torch.equal(dbranch != 0, keep), "backward mask differs from the reference's"
    torch.testing.assert_close(dbranch.double(), torch.where(keep, dx.double() / (1 - DROP.p), 0.0),
                               **GPU_TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["cuda", "triton"])
@pytest.mark.parametrize("B,T,nh,hs", [(2, 64, 2, 64), (1, 1000, 3, 64), (2, 257, 2, 128)])
def test_attention_gpu(name, B, T, nh, hs, poison):
    backend, g = load(name), dict(device="cuda", dtype=torch.bfloat16)
    q, k, v, do = (torch.randn(B, T, nh, hs, **g) for _ in range(4))
    scale = 1 / math.sqrt(hs)
    o, lse = backend.attention_fwd(q, k, v, scale, DROP)
    o_ref, lse_ref = attention.attention_fwd(q.double(), k.double(), v.double(), scale, DROP)
    torch.testing.assert_close(o.double(), o_ref, **GPU_TOL[torch.bfloat16])
    grads = [torch.empty(B, T, nh, hs, **g) for _ in range(3)]
    backend.attention_bwd(do, q, k, v, o, lse, scale, *grads, DROP)
    refs = [torch.empty(B, T, nh, hs, device="cuda", dtype=torch.float64) for _ in range(3)]
    attention.attention_bwd(do.double(), q.double(), k.double(), v.double(), o_ref, lse_ref, scale, *refs, DROP)
    for gname, got, want in zip(("dq", "dk", "dv"), grads, refs):
        torch.testing.assert_close(got.double(), want, atol=5e-2, rtol=5e-2, msg=lambda m, gname=gname: f"{gname}: {m}")
    if T == hs:  # V = the identity: O's zeros are the mask (see test_attention_mask_bit_for_bit)
        eye = torch.eye(T, **g).view(1, T, 1, T).expand(B, T, nh, T).contiguous()
        o, _ = backend.attention_fwd(q, k, eye, scale, DROP)
        assert torch.equal(o.transpose(1, 2) != 0, _attention_mask(B, T, nh, DROP).cuda())


# Compiles (does not run) the Triton dropout paths for an sm_90 GPU: the interpreter accepts code
# the compiler rejects (it read a plain module-level global, which the compiler refuses).
_COMPILE_SCRIPT = """
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from nanolm.kernels import attention, layernorm
f32, i32, i64, c = "*fp32", "i32", "i64", "constexpr"
drop = dict(seed=i32, offset=i64, threshold=i64, keep_scale="fp32")
ln = dict(X=f32, R=f32, RO=f32, W=f32, B=f32, Y=f32, Mean=f32, Rstd=f32, N=i32, C=i32, eps="fp32", **drop,
          HAS_RESIDUAL=c, HAS_BIAS=c, DROPOUT=c, BLOCK_C=c, ROWS=c)
strides = {f"stride_{t}{d}": i64 for t in "qkvo" for d in "bth"}
attn = dict(Q=f32, K=f32, V=f32, O=f32, LSE=f32, **strides, nh=i32, group=i32, T=i32, T_BUCKET=i32, qk_scale="fp32",
            **drop, HS=c, DROPOUT=c, BLOCK_M=c, BLOCK_N=c)
for kernel, signature, constants in [
        (layernorm.layernorm_fwd_kernel, ln, dict(HAS_RESIDUAL=True, HAS_BIAS=True, DROPOUT=True, BLOCK_C=256, ROWS=1)),
        (attention.attention_fwd_kernel, attn, dict(HS=16, DROPOUT=True, BLOCK_M=32, BLOCK_N=32))]:
    ptx = triton.compile(ASTSource(kernel, signature, constants), target=GPUTarget("cuda", 90, 32)).asm["ptx"]
    assert "mul.hi.u32" in ptx, kernel  # Philox's umulhi made it into the code
print("compiled")
"""


def test_triton_dropout_compiles_for_gpu():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]

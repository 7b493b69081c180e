"""Muon: the Newton-Schulz specification against its float64 iteration and the exact polar
factor; FlatMuon's update against a plain-PyTorch Muon + AdamW written here; its state, bad
input, and `python -m nanolm.train --optim=muon` (training, resume, the saved --optim)."""
import json

import pytest
import torch

from nanolm import checkpoint
from nanolm.config import ModelConfig, parse_args
from nanolm.model import GPT
from nanolm.ops import backends
from nanolm.optim import NS_SCHEDULES, FlatAdamW, FlatMuon, hidden_matrices, newton_schulz
from nanolm.train import config_from_args, main, train

TORCH = backends.resolve("torch", torch.device("cpu"))
TINY_MODEL = ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=40, vocab_multiple=64)

# ----------------------------------------------------------------------------- Newton-Schulz

# tall, wide, square, a single row, and a batched same-shape group (GPT-2's 768x3072 takes
# ~8 s in float64 on 2 cores: too slow for CI, so a group of 96x384, the same 1:4 aspect)
SHAPES = [(50, 20), (20, 50), (33, 33), (1, 77), (3, 96, 384)]
# (dtype, max relative Frobenius error against the float64 iteration): bf16 keeps 8 bits of
# mantissa, and five iterations of products leave a few percent (measured <= 6e-2)
PRECISIONS = [(torch.float32, 1e-4), (torch.bfloat16, 8e-2)]
# where five iterations leave singular values spread over [0.1, 1] (measured: polar_express
# 0.86-1.14, classic 0.68-1.14; a single row: 0.90 and 0.70)
SINGULAR_BAND = {"polar_express": (0.85, 1.15), "classic": (0.65, 1.15)}


@pytest.mark.parametrize("schedule", list(NS_SCHEDULES))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype,tolerance", PRECISIONS, ids=str)
def test_newton_schulz_matches_its_float64_iteration(shape, dtype, tolerance, schedule):
    G = torch.randn(shape)
    want = newton_schulz(G.double(), schedule, torch.float64)
    got = newton_schulz(G.clone(), schedule, dtype)
    assert got.shape == G.shape and got.dtype == G.dtype
    error = torch.linalg.matrix_norm(got.double() - want) / torch.linalg.matrix_norm(want)
    assert (error < tolerance).all(), error


@pytest.mark.parametrize("schedule", list(NS_SCHEDULES))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_newton_schulz_float64_approaches_the_polar_factor(shape, schedule):
    """G = U S V^T with S spread over [0.1, 1] (a Gaussian square matrix has singular values
    near 0 that five iterations cannot lift, nor need to) -> U f(S) V^T, every f(s) in the
    schedule's band: the singular vectors of G kept, the values moved towards 1."""
    *batch, m, n = shape
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(*batch, m, k, dtype=torch.float64))[0]
    Vh = torch.linalg.qr(torch.randn(*batch, n, k, dtype=torch.float64))[0].mT
    S = torch.linspace(0.1, 1, k, dtype=torch.float64)[torch.randperm(k)]
    X = newton_schulz(U @ torch.diag_embed(S.expand(*batch, k)) @ Vh, schedule, torch.float64)
    f = torch.diagonal(U.mT @ X @ Vh.mT, dim1=-2, dim2=-1)  # f(s), if X = U f(S) V^T
    torch.testing.assert_close(X, U @ torch.diag_embed(f) @ Vh, rtol=0, atol=1e-10)
    lo, hi = SINGULAR_BAND[schedule]
    assert ((f > lo) & (f < hi)).all(), f


# ----------------------------------------------------------------------------- the update rule

HP = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
MUON = dict(muon_lr=0.02, momentum=0.95)


def reference_polar(G, schedule):
    """Muon's orthogonalization as a plain loop over one matrix, in float32: X X^T or, for a
    tall matrix, X^T X as the Gram matrix (the same iteration, unbatched, written anew)."""
    coefficients, inflate = NS_SCHEDULES[schedule]
    X = G / (G.norm() * inflate + 1e-7)
    for a, b, c in coefficients:
        if G.shape[0] > G.shape[1]:
            A = X.T @ X
            X = a * X + X @ (b * A + c * A @ A)
        else:
            A = X @ X.T
            X = a * X + (b * A + c * A @ A) @ X
    return X


class ReferenceMuon:
    """Muon (Nesterov momentum, orthogonalized, shape-scaled lr, decoupled decay) for the
    hidden matrices and torch.optim.AdamW for the rest, over a second copy of the model."""

    def __init__(self, model, schedule):
        named = dict(model.named_parameters())
        self.matrices = [named[n] for n in hidden_matrices(model)]
        others = [p for p in model.parameters() if all(p is not m for m in self.matrices)]
        self.adamw = torch.optim.AdamW([{"params": [p for p in others if p.dim() >= 2], "weight_decay": 0.1},
                                        {"params": [p for p in others if p.dim() < 2], "weight_decay": 0.0}],
                                       lr=HP["lr"], betas=HP["betas"], eps=HP["eps"])
        self.buffers = [torch.zeros_like(p) for p in self.matrices]
        self.schedule = schedule

    @torch.no_grad()
    def step(self, lr):
        for group in self.adamw.param_groups:
            group["lr"] = lr
        self.adamw.step()
        muon_lr = MUON["muon_lr"] * lr / HP["lr"]
        for p, buf in zip(self.matrices, self.buffers):
            buf.mul_(MUON["momentum"]).add_(p.grad, alpha=1 - MUON["momentum"])
            update = (1 - MUON["momentum"]) * p.grad + MUON["momentum"] * buf
            rows, cols = p.shape
            p.mul_(1 - muon_lr * HP["weight_decay"])
            p.sub_(muon_lr * max(1, rows / cols) ** 0.5 * reference_polar(update, self.schedule))


def tiny_pair():
    torch.manual_seed(0)
    a, b = GPT(TINY_MODEL, TORCH), GPT(TINY_MODEL, TORCH)
    b.load_state_dict(a.state_dict())
    return a, b


def flat_muon(model, schedule="polar_express", ns_dtype=torch.float32, clip=0.5, **kw):
    return FlatMuon(model.named_parameters(), hidden_matrices(model), grad_clip=clip, backend=TORCH["adamw"],
                    schedule=schedule, ns_dtype=ns_dtype, **HP, **MUON, **kw)


def batch(i):
    return torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(i))


@pytest.mark.parametrize("schedule", list(NS_SCHEDULES))
def test_flat_muon_matches_a_plain_pytorch_muon(schedule):
    """Six steps with clipping and a changing lr (the schedule scales Muon's lr alike)."""
    a, b = tiny_pair()
    flat, ref = flat_muon(a, schedule), ReferenceMuon(b, schedule)
    assert len(ref.matrices) == 4 * TINY_MODEL.n_layer  # c_attn, attn c_proj, c_fc, mlp c_proj
    for i in range(6):
        lr = HP["lr"] * (i + 1) / 6
        x = batch(i)
        flat.zero_grad()
        a(x, x).backward()
        norm = flat.step(lr)
        b.zero_grad()
        b(x, x).backward()
        assert norm == pytest.approx(torch.nn.utils.clip_grad_norm_(b.parameters(), 0.5).item(), rel=1e-5)
        ref.step(lr)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


def test_hidden_matrices_are_the_blocks_linear_weights():
    a, _ = tiny_pair()
    names = hidden_matrices(a)
    assert all(n.startswith("transformer.h.") and n.endswith(".weight") for n in names)
    assert not any("wte" in n or "wpe" in n or "ln_" in n for n in names)
    flat = flat_muon(a)
    assert [n for n, _, _ in flat.layout[:len(names)]] == names  # Muon's range comes first
    assert flat.muon_numel == sum(dict(a.named_parameters())[n].numel() for n in names)
    assert flat.exp_avg.numel() == flat.flat_param.numel() - flat.muon_numel  # no AdamW moments for it


def test_state_round_trip_continues_bit_for_bit():
    """Three steps, the state into a fresh optimizer over a copy of the weights, three more:
    the same weights as six straight (bf16 Newton-Schulz, as trained)."""
    a, b = tiny_pair()
    straight = flat_muon(a, ns_dtype=torch.bfloat16)
    for i in range(3):
        straight.zero_grad()
        a(batch(i), batch(i)).backward()
        straight.step()
    b.load_state_dict(a.state_dict())
    resumed = flat_muon(b, ns_dtype=torch.bfloat16)
    resumed.load_state_dict(straight.state_dict())
    for i in range(3, 6):
        for model, opt in ((a, straight), (b, resumed)):
            opt.zero_grad()
            model(batch(i), batch(i)).backward()
            opt.step()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


def test_a_one_dimensional_parameter_routed_to_muon_is_refused():
    a, _ = tiny_pair()
    with pytest.raises(ValueError, match=r"transformer.h.0.ln_1.weight has shape \(16,\); Muon orthogonalizes"):
        FlatMuon(a.named_parameters(), ["transformer.h.0.ln_1.weight"], backend=TORCH["adamw"], **HP)
    with pytest.raises(ValueError, match="unknown Newton-Schulz schedule 'cubic'"):
        flat_muon(a, schedule="cubic")


def test_non_finite_momentum_is_an_error_naming_the_matrix():
    a, _ = tiny_pair()
    flat = flat_muon(a)
    state = flat.state_dict()
    state["momentum"][5] = float("nan")  # in the first matrix
    flat.load_state_dict(state)
    a(batch(0), batch(0)).backward()
    with pytest.raises(ValueError, match="momentum of transformer.h.0.attn.c_attn.weight is not finite"):
        flat.step()


def test_each_optimizer_refuses_the_others_state():
    a, _ = tiny_pair()
    muon = flat_muon(a)
    adamw = FlatAdamW(a.named_parameters(), backend=TORCH["adamw"], **HP)
    with pytest.raises(ValueError, match="optimizer state is adamw's and this run uses --optim=muon"):
        muon.load_state_dict(adamw.state_dict())
    with pytest.raises(ValueError, match="optimizer state is muon's and this run uses --optim=adamw"):
        adamw.load_state_dict(muon.state_dict())


# ----------------------------------------------------------------------------- the trainer

TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--eval_iters=2",
        "--log_interval=5", "--sample_tokens=8", "--kernels=torch", "--optim=muon"]


@pytest.fixture(autouse=True)
def in_tmp_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def test_train_with_muon_reduces_loss_and_saves_optim(tmp_path):
    history = train(parse_args(TINY + ["--max_steps=30", "--eval_interval=30", "--warmup=5",
                                       f"--out_dir={tmp_path}"]))
    assert history["val"] < history["first_val"] - 0.5
    assert json.loads((tmp_path / "config.json").read_text())["optim"] == "muon"


@pytest.fixture(scope="module")
def straight_muon_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight_muon")
    train(parse_args(TINY + ["--max_steps=8", "--eval_interval=4", "--warmup=2", "--ckpt_interval=4",
                             f"--out_dir={out}"]))
    return out


def test_resume_keeps_muon_and_continues_bit_for_bit(straight_muon_run, tmp_path):
    cfg = config_from_args([f"--resume={straight_muon_run / 'ckpt_00000004.pt'}", f"--out_dir={tmp_path}"])
    assert cfg.optim == "muon"
    train(cfg)
    a, b = checkpoint.load(straight_muon_run), checkpoint.load(tmp_path)
    assert a["step"] == b["step"] == 8
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in ("exp_avg", "exp_avg_sq", "momentum"):
        assert torch.equal(a["optimizer"][k], b["optimizer"][k]), k


def test_resume_with_the_other_optimizer_is_one_error(straight_muon_run, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        main([f"--resume={straight_muon_run / 'ckpt_00000004.pt'}", f"--out_dir={tmp_path}", "--optim=adamw"])
    assert str(exit_.value).startswith("error: the checkpoint's optimizer state is muon's and this run uses "
                                       "--optim=adamw: resume with --optim=muon")


@pytest.mark.parametrize("args,match", [(["--optim=sgd"], "optim must be adamw or muon"),
                                        (["--muon_ns=cubic"], "muon_ns must be polar_express or classic"),
                                        (["--muon_momentum=1"], r"muon_momentum must be in \[0, 1\)")])
def test_muon_config_errors(args, match):
    with pytest.raises(ValueError, match=match):
        parse_args(args)

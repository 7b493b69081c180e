"""--recompute=mlp|block: bit-identical training, fewer saved activations."""
import dataclasses

import pytest
import torch

from nanolm.config import ConfigError, ModelConfig, parse_args
from nanolm.model import GPT, RECOMPUTE
from nanolm.optim import FlatAdamW
from nanolm.ops import backends

CFG = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=24, vocab_size=100, vocab_multiple=64)
# the modern block: GQA, RoPE + QK-norm, RMSNorm, SwiGLU, untied
MODERN = dict(n_head=2, n_kv_head=1, pos="rope", qk_norm=True, norm="rmsnorm", mlp="swiglu", tie_embeddings=False,
              bias=False)
BATCH = 3


def build(recompute, kernel_set, dropout=0.0, **block):
    torch.manual_seed(7)  # the same initial weights for every mode
    impls = backends.resolve(kernel_set, torch.device("cpu"))
    model = GPT(dataclasses.replace(CFG, dropout=dropout, **block), impls, recompute)
    return model, FlatAdamW(model.named_parameters(), 1e-2, (0.9, 0.95), 1e-8, 0.1, 1.0, impls["adamw"])


def batches(n):
    g = torch.Generator().manual_seed(3)
    return [(torch.randint(0, CFG.vocab_size, (BATCH, CFG.block_size), generator=g),
             torch.randint(0, CFG.vocab_size, (BATCH, CFG.block_size), generator=g)) for _ in range(n)]


def train_steps(recompute, kernel_set, dropout, n=3, **block):
    """Losses, first-step gradient and final weights of n optimizer steps."""
    model, opt = build(recompute, kernel_set, dropout, **block)
    losses, first_grad = [], None
    for x, y in batches(n):
        opt.zero_grad()
        loss = model(x, y)
        loss.backward()
        first_grad = opt.flat_grad.clone() if first_grad is None else first_grad
        opt.step(1e-2)
        losses.append(loss.detach())
    return torch.stack(losses), first_grad, {k: p.detach().clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("block", ["gpt2", "modern"])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("kernel_set", ["torch", "cpu"])
@pytest.mark.parametrize("recompute", ["mlp", "block"])
def test_training_is_bit_identical(recompute, kernel_set, dropout, block):
    """With dropout the rerun block regenerates its masks from the same (seed, offset)."""
    choices = MODERN if block == "modern" else {}
    ref_losses, ref_grad, ref_weights = train_steps("none", kernel_set, dropout, **choices)
    losses, grad, weights = train_steps(recompute, kernel_set, dropout, **choices)
    assert torch.equal(losses, ref_losses)
    assert torch.equal(grad, ref_grad)
    assert all(torch.equal(weights[k], ref_weights[k]) for k in ref_weights)


def saved_bytes(recompute):
    """Bytes of distinct storages the forward keeps for the backward, seen through the
    saved-tensor hooks (a recomputed region keeps only its inputs)."""
    model, _ = build(recompute, "torch")
    x, y = batches(1)[0]
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x, y)
    loss.backward()  # the recomputation runs and the graph is consumed
    return sum(storages.values())


def test_recomputation_keeps_fewer_activations():
    none, mlp, block = (saved_bytes(r) for r in RECOMPUTE)
    mlp_activations = 2 * CFG.n_layer * BATCH * CFG.block_size * 4 * CFG.n_embd * 4  # GELU in + out, fp32
    assert none - mlp == mlp_activations
    assert block < mlp


def test_recompute_config():
    assert parse_args(["--recompute=block"]).recompute == "block"
    with pytest.raises(ConfigError, match="recompute must be none, mlp or block, got 'all'"):
        parse_args(["--recompute=all"])
    with pytest.raises(ValueError, match="recompute must be one of"):
        GPT(CFG, backends.resolve("torch", torch.device("cpu")), "some")


def test_train_cli_with_recompute_and_dropout_ends_where_plain_training_does(tmp_path):
    from nanolm import checkpoint
    from nanolm.train import train
    tiny = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=2",
            "--eval_iters=1", "--max_steps=2", "--warmup=1", "--sample_tokens=2", "--dropout=0.2"]
    for mode in ("none", "block"):
        train(parse_args(tiny + [f"--recompute={mode}", f"--out_dir={tmp_path / mode}"]))
    plain, recomputed = checkpoint.load(tmp_path / "none"), checkpoint.load(tmp_path / "block")
    assert plain["model"].keys() == recomputed["model"].keys()
    assert all(torch.equal(recomputed["model"][k], v) for k, v in plain["model"].items() if isinstance(v, torch.Tensor))

import pytest
import torch
import torch.nn.functional as F

from nanolm.config import ModelConfig, PRESETS
from nanolm.model import GPT
from nanolm.sample import generate
from nanolm.ops import backends

TORCH = backends.resolve("torch", torch.device("cpu"))


def tiny(**kw):
    return ModelConfig(**dict(dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50,
                                   vocab_multiple=64), **kw))


def test_gpt2_param_count_and_names():
    with torch.device("meta"):
        model = GPT(ModelConfig(**PRESETS["gpt2"], vocab_size=50257), TORCH)
    assert model.cfg.padded_vocab == 50304
    assert 124e6 < model.num_params(non_embedding=False) < 125e6
    names = dict(model.named_parameters())
    assert "transformer.h.0.attn.c_attn.weight" in names and "transformer.h.11.mlp.c_proj.bias" in names
    assert "lm_head.weight" not in names  # tied: registered once, under wte


def test_tied_and_init():
    model = GPT(tiny(n_layer=4), TORCH)
    assert model.lm_head.weight is model.transformer.wte.weight
    std = model.transformer.h[0].mlp.c_proj.weight.std().item()
    assert abs(std - 0.02 / (2 * 4) ** 0.5) < 0.002


def test_loss_matches_plain_math():
    """The model's fused loss equals F.cross_entropy over logits of the real vocab."""
    torch.manual_seed(0)
    model = GPT(tiny(), TORCH)
    idx, targets = torch.randint(0, 50, (3, 16)), torch.randint(0, 50, (3, 16))
    loss = model(idx, targets)
    h = model.hidden(idx)
    logits = h @ model.lm_head.weight[:50].t()
    torch.testing.assert_close(loss, F.cross_entropy(logits.reshape(-1, 50), targets.reshape(-1)))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_forward_shapes_and_padding_never_predicted():
    model = GPT(tiny(), TORCH)
    with torch.no_grad():
        model.transformer.wte.weight[50:] = 100.0  # padding rows would dominate if used
    idx = torch.randint(0, 50, (2, 5))
    logits = model(idx)
    assert logits.shape == (2, 50)
    out = generate(model, idx, 20, top_k=None, seed=0)
    assert out.shape == (2, 25) and out.max() < 50


def test_causal():
    """Changing a later token does not change earlier hidden states."""
    model = GPT(tiny(), TORCH)
    idx = torch.randint(0, 50, (1, 10))
    idx2 = idx.clone()
    idx2[0, 7] = (idx[0, 7] + 1) % 50
    with torch.no_grad():
        torch.testing.assert_close(model.hidden(idx)[:, :7], model.hidden(idx2)[:, :7])


def test_too_long_sequence():
    with pytest.raises(ValueError, match="block_size"):
        GPT(tiny(), TORCH)(torch.zeros(1, 17, dtype=torch.long))


def _loss_and_grads(model, idx, targets):
    model.zero_grad()
    loss = model(idx, targets)
    loss.backward()
    return loss.detach().double(), [p.grad.double() for p in model.parameters()]


@pytest.mark.skipif(backends.unavailable_reason("cpu", "attention", torch.device("cpu")) is not None,
                    reason="nanolm._C not built")
def test_cpu_kernels_under_cpu_bf16_autocast():
    """Under torch.autocast("cpu", bfloat16) the op layer passes bf16 activations to the cpu
    kernels (attention, the lm_head logits) and the backward runs as the forward did: loss and
    every gradient agree with the float64 model to bf16 accuracy."""
    torch.manual_seed(0)
    cfg = tiny(n_embd=64, n_head=2, block_size=32, vocab_size=300)
    cpu_impls = backends.resolve("cpu", torch.device("cpu"))
    model = GPT(cfg, cpu_impls)
    ref = GPT(cfg, TORCH).double()
    ref.load_state_dict(model.state_dict())
    idx, targets = torch.randint(0, 300, (3, 32)), torch.randint(0, 300, (3, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = _loss_and_grads(model, idx, targets)
    ref_loss, ref_grads = _loss_and_grads(ref, idx, targets)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-2, atol=0)
    for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads):
        err = (g - r).norm() / r.norm()
        assert err < 3e-2, f"{name}: relative error {err:.3g}"


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("n_layer,n_embd,block_size,vocab", [(1, 8, 4, 11), (3, 48, 32, 300)])
def test_parameter_count_is_the_models(n_layer, n_embd, block_size, vocab, bias):
    """The trainer's memory check counts parameters from the shapes: it must be the model's count."""
    from nanolm.model import parameter_count
    cfg = ModelConfig(n_layer=n_layer, n_head=2, n_embd=n_embd, block_size=block_size, vocab_size=vocab,
                      vocab_multiple=64, bias=bias)
    assert parameter_count(cfg) == GPT(cfg, TORCH).num_params(non_embedding=False)

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
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("block", ["gpt2", "modern"])
def test_cpu_kernels_under_cpu_bf16_autocast(block, dtype):
    """Under torch.autocast("cpu", bfloat16 or float16) the op layer passes 16-bit activations to
    the cpu kernels (attention, the lm_head logits; with the modern block RoPE + QK-norm and
    SwiGLU) and the backward runs as the forward did: loss and every gradient agree with the
    float64 model to 16-bit accuracy."""
    torch.manual_seed(0)
    choices = dict(n_head=4, n_kv_head=2, pos="rope", qk_norm=True, norm="rmsnorm", mlp="swiglu",
                   tie_embeddings=False, bias=False) if block == "modern" else dict(n_head=2)
    cfg = tiny(n_embd=64, block_size=32, vocab_size=300, **choices)
    cpu_impls = backends.resolve("cpu", torch.device("cpu"))
    model = GPT(cfg, cpu_impls)
    ref = GPT(cfg, TORCH).double()
    ref.load_state_dict(model.state_dict())
    idx, targets = torch.randint(0, 300, (3, 32)), torch.randint(0, 300, (3, 32))
    with torch.autocast("cpu", dtype=dtype):
        loss, grads = _loss_and_grads(model, idx, targets)
    ref_loss, ref_grads = _loss_and_grads(ref, idx, targets)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-2, atol=0)
    for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads):
        err = (g - r).norm() / r.norm()
        assert err < 3e-2, f"{name}: relative error {err:.3g}"


# the block's choices (config.ModelConfig), each against GPT-2's defaults
MODERN = dict(norm="rmsnorm", norm_weight=False, pos="rope", n_head=4, n_kv_head=2, qk_norm=True, mlp="swiglu",
              tie_embeddings=False, logit_softcap=10.0)
LLAMA = dict(norm="rmsnorm", pos="rope", rope_theta=1e5, n_head=4, n_kv_head=2, mlp="swiglu")  # SmolLM2's kind
CHOICES = [dict(), dict(pos="rope"), dict(n_head=4, n_kv_head=1), dict(n_head=4, n_kv_head=2), dict(mlp="swiglu"),
           dict(mlp="relu2", mlp_hidden=40), dict(mlp="swiglu", mlp_hidden=24), dict(tie_embeddings=False),
           dict(norm="rmsnorm"), dict(norm="rmsnorm", norm_weight=False), MODERN, LLAMA]


@pytest.mark.parametrize("choice", CHOICES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "gpt2")
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("n_layer,n_embd,block_size,vocab", [(1, 8, 4, 11), (3, 48, 32, 300)])
def test_parameter_count_is_the_models(n_layer, n_embd, block_size, vocab, bias, choice):
    """The trainer's memory check counts parameters from the shapes: it must be the model's count."""
    from nanolm.model import parameter_count
    cfg = ModelConfig(**{**dict(n_layer=n_layer, n_head=2, n_embd=n_embd, block_size=block_size, vocab_size=vocab,
                                vocab_multiple=64, bias=bias), **choice})
    with torch.device("meta"):
        assert parameter_count(cfg) == GPT(cfg, TORCH).num_params(non_embedding=False)


def test_modern_parameter_names_and_shapes():
    """The layout the Hugging Face import maps onto: packed [q | k | v] rows, [gate | up] rows, no
    wpe with RoPE, an lm_head of its own when untied, no biases."""
    cfg = tiny(n_embd=48, n_head=6, n_kv_head=2, pos="rope", norm="rmsnorm", mlp="swiglu", bias=False,
               tie_embeddings=False)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in GPT(cfg, TORCH).state_dict().items()}
    hs, hidden = 8, 128  # 8*48/3 = 128, a multiple of 64 already
    assert shapes["transformer.h.0.attn.c_attn.weight"] == ((6 + 2 * 2) * hs, 48)
    assert shapes["transformer.h.0.attn.c_proj.weight"] == (48, 6 * hs)
    assert shapes["transformer.h.0.mlp.c_fc.weight"] == (2 * hidden, 48)
    assert shapes["transformer.h.0.mlp.c_proj.weight"] == (48, hidden)
    assert shapes["lm_head.weight"] == (64, 48) and shapes["transformer.ln_f.weight"] == (48,)
    assert not any(k.endswith(".bias") or "wpe" in k for k in shapes), shapes


@pytest.mark.parametrize("n_embd,hidden", [(48, 128), (576, 1536), (768, 2048), (24, 64), (30, 128)])
def test_swiglu_default_width(n_embd, hidden):
    """8C/3 rounded up to a multiple of 64 (SmolLM2-135M: 576 -> 1536, as its intermediate_size)."""
    assert ModelConfig(n_embd=n_embd, n_head=6, mlp="swiglu").hidden == hidden


@pytest.mark.parametrize("bad,message", [
    (dict(n_head=4, n_kv_head=3), "n_kv_head=3 must divide n_head=4"),
    (dict(n_head=4, n_embd=12, pos="rope"), "head size n_embd/n_head = 3 must be even"),
    (dict(norm="batchnorm"), "norm must be one of layernorm, rmsnorm, got 'batchnorm'"),
    (dict(pos="alibi"), "pos must be one of learned, rope"),
    (dict(mlp="geglu"), "mlp must be one of gelu, swiglu, relu2"),
    (dict(logit_softcap=-1.0), "logit_softcap must be >= 0"),
    (dict(rope_theta=0.0), "rope_theta must be a positive number"),
    (dict(norm_eps=float("nan")), "norm_eps must be a positive number"),
    (dict(qk_norm=True), "qk_norm=True needs pos=rope"),
    (dict(norm_weight=False), "norm_weight=False is for norm=rmsnorm"),
    (dict(mlp_hidden=-4), "mlp_hidden must be >= 0"),
])
def test_model_config_rejects_with_one_clear_error(bad, message):
    from nanolm.config import ConfigError
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tiny(**bad)


def test_a_config_saved_before_the_block_choices_loads_as_gpt2():
    """An old checkpoint's config.model has none of the new keys: the defaults are GPT-2's."""
    old = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50, vocab_multiple=64, bias=True,
               dropout=0.0)
    cfg = ModelConfig(**old)
    assert (cfg.norm, cfg.pos, cfg.kv_heads, cfg.mlp, cfg.hidden, cfg.tie_embeddings, cfg.logit_softcap) == \
        ("layernorm", "learned", 2, "gelu", 128, True, 0.0)
    with torch.device("meta"):
        model = GPT(cfg, TORCH)
    assert {"transformer.wpe.weight", "transformer.h.1.ln_2.bias", "transformer.h.0.mlp.c_fc.bias"} <= \
        set(model.state_dict())
    assert model.lm_head.weight is model.transformer.wte.weight


def test_softcap_caps_the_sampled_logits_and_the_loss():
    """logit_softcap bounds the logits by cap, in sampling and in the loss (which then takes
    the capped logits: loss equals cross_entropy of cap * tanh(h W^T / cap))."""
    torch.manual_seed(0)
    cfg = tiny(logit_softcap=0.5, tie_embeddings=False)
    model = GPT(cfg, TORCH)
    torch.nn.init.normal_(model.lm_head.weight, std=1.0)  # logits well beyond the cap
    idx = torch.randint(0, 50, (2, 16))
    logits = model(idx)
    assert logits.abs().max() <= 0.5 and logits.abs().max() > 0.45
    h = model.hidden(idx)
    capped = 0.5 * torch.tanh(h @ model.lm_head.weight.t() / 0.5)
    want = F.cross_entropy(capped[..., :50].reshape(-1, 50), idx.reshape(-1))
    torch.testing.assert_close(model(idx, idx), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("block", [MODERN, LLAMA], ids=["nanochat-like", "llama-like"])
@pytest.mark.parametrize("kernels", ["torch", "auto"])
def test_modern_block_learns_and_matches_float64(kernels, block):
    """The modern blocks (nanochat's: parameter-free RMSNorm, RoPE + QK-norm, GQA, SwiGLU, untied,
    softcap; Llama's: RMSNorm with weight, RoPE, GQA, SwiGLU, tied), no bias, on the chosen
    backends: loss and every gradient as the float64 torch model's, and a few AdamW steps lower
    the loss."""
    torch.manual_seed(0)
    cfg = tiny(n_embd=64, **block, bias=False)
    model = GPT(cfg, backends.resolve(kernels, torch.device("cpu")))
    ref = GPT(cfg, TORCH).double()
    ref.load_state_dict(model.state_dict())
    idx, targets = torch.randint(0, 50, (3, 16)), torch.randint(0, 50, (3, 16))
    loss, grads = _loss_and_grads(model, idx, targets)
    ref_loss, ref_grads = _loss_and_grads(ref, idx, targets)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = loss.item()
    for _ in range(10):
        opt.zero_grad()
        loss = model(idx, targets)
        loss.backward()
        opt.step()
    assert loss.item() < first - 0.5


def test_presets_of_the_modern_block():
    """smollm2-135m is SmolLM2-135M's shape (134,515,008 parameters at its 49152-token vocab,
    tied); the modern presets are nanochat's block at the quickstart's size and at d12/d20."""
    from nanolm.model import parameter_count
    smollm2 = ModelConfig(**PRESETS["smollm2-135m"], vocab_size=49152)
    assert parameter_count(smollm2) == 134_515_008 and smollm2.hidden == 1536 and smollm2.kv_heads == 3
    for name in ("modern-cpu", "modern-d12", "modern-d20"):
        cfg = ModelConfig(**PRESETS[name], vocab_size=256)
        assert (cfg.norm, cfg.norm_weight, cfg.pos, cfg.qk_norm, cfg.mlp, cfg.bias, cfg.tie_embeddings) == \
            ("rmsnorm", False, "rope", True, "relu2", False, False), name
    quick, modern = (ModelConfig(**PRESETS[n], vocab_size=256) for n in ("quickstart", "modern-cpu"))
    assert 0.9 < parameter_count(modern) / parameter_count(quick) < 1.0  # the same budget class

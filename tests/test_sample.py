import dataclasses

import pytest
import torch

from nanolm import checkpoint, sample
from nanolm.config import ModelConfig
from nanolm.kvcache import KVCache
from nanolm.model import GPT
from nanolm.ops import backends

VOCAB = 256  # byte tokenizer; the model pads its rows to 320


# a modern block for the cache: GQA (3 query heads per K/V head), RoPE + QK-norm, RMSNorm,
# SwiGLU, untied, softcapped
MODERN = dict(n_head=6, n_kv_head=2, n_embd=96, pos="rope", qk_norm=True, norm="rmsnorm", mlp="swiglu",
              tie_embeddings=False, logit_softcap=5.0, bias=False)


def make_model(kernels="torch", device="cpu", **block):
    torch.manual_seed(0)
    cfg = ModelConfig(**{**dict(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=VOCAB,
                                vocab_multiple=64), **block})
    kernels = backends.resolve(kernels, torch.device(device))
    return GPT(cfg, kernels).to(device).eval()


@pytest.fixture(params=[("torch", "gpt2"), ("cpu", "gpt2"), ("torch", "modern"), ("cpu", "modern")],
                ids=lambda p: "-".join(p))
def model(request):
    kernels, block = request.param
    return make_model(kernels, **(MODERN if block == "modern" else {}))


def all_logits(model, idx):
    """Logits at every position over the real vocabulary: (B, T, vocab_size)."""
    h = model.hidden(idx)
    return model.softcap(h @ model.lm_head.weight[:model.cfg.vocab_size].t())


def test_the_cache_holds_only_the_kv_heads():
    model = make_model(**MODERN)
    cache = KVCache.for_model(model, 3)
    assert cache.k.shape == cache.v.shape == (2, 3, 2, 32, 16)  # (n_layer, B, n_kv_head, block_size, hs)


def _prompt(B=2, t=5):
    return torch.randint(0, 256, (B, t))


@torch.no_grad()
def test_cached_logits_match_full_forward(model):
    idx = torch.randint(0, 256, (2, 20))
    full = all_logits(model, idx)
    cache = KVCache.for_model(model, 2)
    got = [model(idx[:, :7], cache=cache)]  # prefill, then one token at a time
    got += [model(idx[:, t:t + 1], cache=cache) for t in range(7, 20)]
    torch.testing.assert_close(torch.stack(got, 1), full[:, 6:], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_chunked_prefill_matches(model):
    idx = torch.randint(0, 256, (1, 12))
    cache = KVCache.for_model(model, 1)
    model(idx[:, :5], cache=cache)
    last = model(idx[:, 5:], cache=cache)  # t > 1 after cached positions: masked
    torch.testing.assert_close(last, model(idx), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_greedy_matches_uncached_loop(model):
    idx = _prompt()
    out = sample.generate(model, idx, 20, temperature=0)
    ref = idx
    for _ in range(20):
        ref = torch.cat([ref, model(ref).argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, ref)


def test_sampling_deterministic_with_seed(model):
    idx = _prompt()
    a = sample.generate(model, idx, 40, temperature=1.0, top_k=50, seed=7)
    b = sample.generate(model, idx, 40, temperature=1.0, top_k=50, seed=7)
    c = sample.generate(model, idx, 40, temperature=1.0, top_k=50, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (2, 45) and torch.equal(a[:, :5], idx)


def test_top_k_and_padding_are_respected(model):
    logits = torch.randn(3, 320)
    g = torch.Generator().manual_seed(0)
    allowed = torch.topk(logits[:, :256], 5).indices
    for _ in range(50):
        tok = sample.pick(logits, 1.5, 5, g, vocab_size=256)
        assert torch.all((tok == allowed).any(-1))


def test_stream_and_sliding_window(model):
    streamed = []
    out = sample.generate(model, _prompt(1, 30), 50, temperature=0.8, seed=1,
                          stream=lambda t: streamed.append(t.item()))
    assert out.shape == (1, 80) and out[0, 30:].tolist() == streamed  # past block_size 32


def test_sample_cli_streams_from_checkpoint(tmp_path, model, capsys):
    config = {"model": dataclasses.asdict(model.cfg), "tokenizer": "byte"}
    checkpoint.save(tmp_path, 1, model.state_dict(), {}, config, {})
    args = ["--ckpt", str(tmp_path), "--prompt", "def ", "--max_new_tokens", "30",
            "--seed", "3", "--device", "cpu"]
    sample.main(args)
    first = capsys.readouterr().out
    sample.main(args)
    assert first.startswith("def ") and capsys.readouterr().out == first


@pytest.mark.gpu
@pytest.mark.parametrize("kernels", ["triton", "cuda"])
def test_cuda_sampling_deterministic_and_cached_matches_full(kernels):
    model = make_model(kernels, "cuda")
    idx = _prompt().cuda()
    a = sample.generate(model, idx, 40, temperature=1.0, top_k=50, seed=7)
    assert torch.equal(a, sample.generate(model, idx, 40, temperature=1.0, top_k=50, seed=7))
    with torch.no_grad():
        cache = KVCache.for_model(model, 2)
        model(idx, cache=cache)
        step = model(a[:, 5:6], cache=cache)
        torch.testing.assert_close(step, model(a[:, :6]), rtol=1e-4, atol=1e-4)

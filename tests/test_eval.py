import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nanolm import eval as nanolm_eval, hf
from nanolm.config import ModelConfig
from nanolm.data import get_tokenizer
from nanolm.model import GPT
from nanolm.ops import backends
from tests.shared_paths import shared

TEXT = "".join(f"line {i}: café, naïve, 日本語 — {i * i}\n" for i in range(400))  # multi-byte UTF-8


# the modern block with a softcap: the evaluation must take the capped logits, as the loss does
MODERN = dict(n_head=2, n_kv_head=1, pos="rope", qk_norm=True, norm="rmsnorm", mlp="relu2", tie_embeddings=False,
              bias=False, logit_softcap=2.0)


def tiny_model(block_size=16, **block):
    cfg = ModelConfig(**{**dict(n_layer=1, n_head=2, n_embd=32, block_size=block_size, vocab_size=256,
                                vocab_multiple=64), **block})
    model = GPT(cfg, backends.resolve("torch", torch.device("cpu"))).eval()
    if not cfg.tie_embeddings:  # logits beyond the cap, so an uncapped evaluation would differ
        torch.nn.init.normal_(model.lm_head.weight, std=0.5)
    return model


@torch.no_grad()
def summed_nats(model, tokens, n_targets):
    """One window at a time, cut here by index, logits materialised, loss summed in float64."""
    T, V = model.cfg.block_size, model.cfg.vocab_size
    total = 0.0
    for start in range(0, n_targets, T):
        end = min(start + T, n_targets)
        x = torch.tensor(tokens[start:end], dtype=torch.long)[None]
        y = torch.tensor(tokens[start + 1:end + 1], dtype=torch.long)
        logits = model.softcap(model.hidden(x)[0].double() @ model.lm_head.weight[:V].double().t())
        total += F.cross_entropy(logits, y, reduction="sum").item()
    return total


@pytest.mark.parametrize("block", ["gpt2", "modern"])
@pytest.mark.parametrize("n_targets,batch_size", [(16 * 5, 3), (16 * 5 + 9, 2), (5, 4), (0, 8)])
def test_matches_window_by_window_float64(n_targets, batch_size, block):
    """Full windows batched, the shorter last window alone, the sum and the byte count: against
    an independent window-by-window loop (tokens=0 means the whole array)."""
    model, tok = tiny_model(**(MODERN if block == "modern" else {})), get_tokenizer("byte")
    tokens = np.random.default_rng(0).integers(1, 256, 16 * 6 + 3).astype(np.uint16)
    n = n_targets or len(tokens) - 1
    r = nanolm_eval.evaluate(model, tok, tokens, n_targets, batch_size)
    expected = summed_nats(model, tokens, n)
    assert r["tokens"] == n and r["bytes"] == n  # byte tokenizer: one byte per token, no EOT here
    assert r["loss"] == pytest.approx(expected / n, rel=1e-5)
    assert r["perplexity"] == pytest.approx(math.exp(expected / n), rel=1e-5)
    assert r["bits_per_byte"] == pytest.approx(expected / n / math.log(2), rel=1e-5)


def test_token_budget_errors():
    model, tok = tiny_model(), get_tokenizer("byte")
    tokens = np.arange(1, 50, dtype=np.uint16)
    with pytest.raises(ValueError, match="the split has 48 target tokens"):
        nanolm_eval.evaluate(model, tok, tokens, 49)


def test_bytes_count_decoded_utf8_and_skip_end_of_text(monkeypatch):
    byte = get_tokenizer("byte")
    ids = [byte.eot] + byte.encode(TEXT[:200])
    assert nanolm_eval.utf8_bytes(byte, ids) == len(TEXT[:200].encode("utf-8"))
    tiktoken_dir = shared("tiktoken")
    if tiktoken_dir is None:
        pytest.skip("no shared tiktoken cache")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tiktoken_dir))
    gpt2 = get_tokenizer("gpt2")
    ids = gpt2.encode(TEXT[:200]) + [gpt2.eot] + gpt2.encode("日本")
    assert len(ids) < len(TEXT[:200].encode("utf-8"))  # BPE tokens span several bytes
    assert nanolm_eval.utf8_bytes(gpt2, ids) == len((TEXT[:200] + "日本").encode("utf-8"))


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def test_cli_on_imported_hf_checkpoint(tmp_path, text_file, capsys):
    """A model exported to HF safetensors and imported back evaluates to exactly the numbers of
    the model it came from; an imported checkpoint names no dataset, so --data is required."""
    pytest.importorskip("safetensors")
    model, tok = tiny_model(), get_tokenizer("byte")
    hf.export(model.state_dict(), tmp_path / "hf", n_head=2, vocab_size=256, tokenizer="byte", vocab_multiple=64)
    hf.main(["import", str(tmp_path / "hf"), str(tmp_path / "imported"), "--tokenizer=byte",
             "--vocab_multiple=64"])
    val = np.array(tok.encode(TEXT[int(len(TEXT) * 0.9):]), dtype=np.uint16)
    expected = nanolm_eval.evaluate(model, tok, val, 300, batch_size=4)
    args = [f"--ckpt={tmp_path / 'imported'}", "--tokens=300", "--batch_size=4", "--device=cpu",
            "--kernels=torch"]
    got = nanolm_eval.main(args + [f"--data={text_file}"])
    assert got == expected
    out = capsys.readouterr().out
    assert "300 tokens" in out and f"perplexity {expected['perplexity']:.3f}" in out
    assert nanolm_eval.main(args + [f"--data={text_file}"]) == got  # deterministic
    with pytest.raises(SystemExit, match="pass --data"):
        nanolm_eval.main(args)
    with pytest.raises(SystemExit, match="no checkpoint"):
        nanolm_eval.main([f"--ckpt={tmp_path / 'missing.pt'}"])


def test_imported_hf_model_evaluates_as_transformers_does(tmp_path, text_file):
    """Independent of nanolm's own exporter: a GPT2LMHeadModel written by transformers, imported,
    gives the loss transformers computes over the same windows (skipped without transformers)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=16, vocab_size=256,
                                     initializer_range=0.2)  # wide weights: far from uniform output
    reference = transformers.GPT2LMHeadModel(config).eval()
    reference.save_pretrained(tmp_path / "hf", safe_serialization=True)
    hf.main(["import", str(tmp_path / "hf"), str(tmp_path / "imported"), "--tokenizer=byte",
             "--vocab_multiple=64"])
    got = nanolm_eval.main([f"--ckpt={tmp_path / 'imported'}", f"--data={text_file}", "--tokens=100",
                            "--device=cpu", "--kernels=torch"])
    val = get_tokenizer("byte").encode(TEXT[int(len(TEXT) * 0.9):])
    total = 0.0
    with torch.no_grad():
        for start in range(0, 100, 16):
            end = min(start + 16, 100)
            logits = reference(torch.tensor(val[start:end])[None]).logits[0]
            total += F.cross_entropy(logits.double(), torch.tensor(val[start + 1:end + 1]), reduction="sum").item()
    assert abs(total / 100 - math.log(256)) > 0.1  # the check is not between two uniform models
    assert got["loss"] == pytest.approx(total / 100, rel=1e-5)

import json

import pytest
import torch

from nanolm import hf
from nanolm.config import ModelConfig
from nanolm.model import GPT
from nanolm.ops import backends

pytest.importorskip("safetensors")

VOCAB = 300  # true vocabulary; the model pads it to 320


def tiny_model():
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=VOCAB,
                      vocab_multiple=64)
    return GPT(cfg, backends.resolve("torch", torch.device("cpu")))


def test_export_import_round_trip(tmp_path):
    model = tiny_model()
    sd = model.state_dict()
    hf.export(sd, tmp_path, n_head=2, vocab_size=VOCAB, tokenizer="byte", vocab_multiple=64)
    back = hf.load(tmp_path, padded_vocab_size=320)
    assert back.keys() == sd.keys()
    for k, v in sd.items():
        if k in ("transformer.wte.weight", "lm_head.weight"):
            assert torch.equal(back[k][:VOCAB], v[:VOCAB])
            assert torch.all(back[k][VOCAB:] == 0)  # padding rows re-created as zeros
        else:
            assert torch.equal(back[k], v), k
    assert back["lm_head.weight"] is back["transformer.wte.weight"]
    model.load_state_dict(back)


def test_export_uses_hf_names_and_conv1d_layout(tmp_path):
    from safetensors.torch import load_file
    sd = tiny_model().state_dict()
    hf.export(sd, tmp_path, n_head=2, vocab_size=VOCAB, tokenizer="byte", vocab_multiple=64)
    tensors = load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in tensors
    assert tensors["transformer.wte.weight"].shape == (VOCAB, 32)
    assert tensors["transformer.h.1.attn.c_attn.weight"].shape == (32, 96)  # (in, out)
    assert tensors["transformer.h.0.mlp.c_fc.weight"].shape == (32, 128)
    assert tensors["transformer.h.0.mlp.c_proj.weight"].shape == (128, 32)
    assert torch.equal(tensors["transformer.h.0.attn.c_proj.weight"],
                       sd["transformer.h.0.attn.c_proj.weight"].t())
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert (cfg["n_layer"], cfg["n_head"], cfg["n_embd"], cfg["n_positions"],
            cfg["vocab_size"]) == (2, 2, 32, 32, VOCAB)


def test_import_hub_layout_without_prefix_and_with_mask_buffers():
    sd = tiny_model().state_dict()
    tensors = {k.removeprefix("transformer."): v for k, v in hf.to_hf(sd, VOCAB).items()}
    tensors["h.0.attn.bias"] = torch.ones(1, 1, 32, 32)
    back = hf.from_hf(tensors, 320)
    assert back.keys() == sd.keys()
    assert torch.equal(back["transformer.h.0.attn.c_attn.weight"],
                       sd["transformer.h.0.attn.c_attn.weight"])


def test_untied_head_is_rejected():
    sd = dict(tiny_model().state_dict())
    sd["lm_head.weight"] = torch.randn_like(sd["lm_head.weight"])
    with pytest.raises(ValueError, match="untied"):
        hf.to_hf(sd, VOCAB)


def test_trained_checkpoint_exports_imports_and_initialises_a_run(tmp_path, monkeypatch, capsys):
    """train -> export -> import -> --init_from: the weights arrive unchanged (a run with lr=0
    ends where it started), and the imported checkpoint samples through the CLI."""
    from nanolm import checkpoint, sample
    from nanolm.config import parse_args
    from nanolm.train import train

    monkeypatch.chdir(tmp_path)
    tiny = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4",
            "--eval_iters=1", "--sample_tokens=4", "--max_steps=3", "--warmup=1"]
    train(parse_args(tiny + ["--out_dir=trained"]))
    hf.main(["export", "trained", "exported"])
    hf.main(["import", "exported", "imported", "--tokenizer=byte", "--vocab_multiple=64"])
    trained = checkpoint.load("trained")["model"]
    imported = checkpoint.load("imported")["model"]
    assert all(torch.equal(imported[k], v) for k, v in trained.items())

    train(parse_args(tiny + ["--out_dir=finetune", "--init_from=imported", "--lr=0", "--min_lr=0",
                             "--max_steps=1"]))
    finetuned = checkpoint.load("finetune")["model"]
    assert all(torch.equal(finetuned[k], v) for k, v in trained.items())

    capsys.readouterr()
    sample.main(["--ckpt", "imported", "--prompt", "ab", "--max_new_tokens", "5", "--device", "cpu"])
    assert capsys.readouterr().out.startswith("ab")

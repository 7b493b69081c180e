import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from nanolm import checkpoint
from nanolm.data import Loader


def _model():
    return torch.nn.Sequential(torch.nn.Embedding(64, 16), torch.nn.Linear(16, 64))


def _save(run_dir, step, model=None, config=None, keep=3):
    model = model or _model()
    opt = torch.optim.AdamW(model.parameters())
    config = config or {"model": {"n_layer": 2, "n_embd": 16}, "lr": 1e-3}
    return checkpoint.save(run_dir, step, model.state_dict(), opt.state_dict(), config,
                           {"epoch": 0, "step": step}, keep=keep)


def test_save_load_round_trip(tmp_path):
    model = _model()
    path = _save(tmp_path, 5, model)
    ckpt = checkpoint.load(path, map_location="cpu")
    assert ckpt["step"] == 5 and ckpt["loader"] == {"epoch": 0, "step": 5}
    for k, v in model.state_dict().items():
        assert torch.equal(ckpt["model"][k], v)
    assert checkpoint.load(tmp_path)["step"] == 5  # a run dir means its latest


def test_latest_and_keep_last_k(tmp_path):
    assert checkpoint.latest(tmp_path) is None
    for step in (10, 20, 30, 40, 50):
        _save(tmp_path, step, keep=2)
    names = [p.name for p in checkpoint.checkpoints(tmp_path)]
    assert names == ["ckpt_00000040.pt", "ckpt_00000050.pt"]
    assert checkpoint.latest(tmp_path).name == "ckpt_00000050.pt"


def test_crash_before_rename_keeps_previous(tmp_path, monkeypatch):
    _save(tmp_path, 1)

    def crash(src, dst):
        raise KeyboardInterrupt("killed between write and rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 2)
    monkeypatch.undo()
    assert checkpoint.latest(tmp_path).name == "ckpt_00000001.pt"
    assert checkpoint.load(tmp_path)["step"] == 1


KILL_DURING_SAVE = """
import os, signal, sys, torch
from nanolm import checkpoint
def die(src, dst):
    assert os.path.getsize(src) > 0  # the temp file is fully written and fsynced
    os.kill(os.getpid(), signal.SIGKILL)
os.replace = die
checkpoint.save(sys.argv[1], 2, {"w": torch.ones(3)}, {}, {}, {})
"""


def test_process_killed_between_write_and_rename(tmp_path):
    checkpoint.save(tmp_path, 1, {"w": torch.zeros(3)}, {}, {}, {})
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, str(tmp_path)])
    assert proc.returncode == -9
    assert any(p.name.startswith(".ckpt_") for p in tmp_path.iterdir())  # the orphan temp
    ckpt = checkpoint.load(tmp_path)
    assert ckpt["step"] == 1 and torch.equal(ckpt["model"]["w"], torch.zeros(3))
    checkpoint.save(tmp_path, 3, {"w": torch.ones(3)}, {}, {}, {})  # cleans the orphan up
    assert not any(p.name.startswith(".ckpt_") for p in tmp_path.iterdir())


def test_config_mismatch_lists_fields(tmp_path):
    path = _save(tmp_path, 1, config={"model": {"n_layer": 2, "n_embd": 16, "n_head": 4},
                                      "lr": 1e-3})
    ok = checkpoint.load(path, model_config={"model": {"n_layer": 2, "n_embd": 16}})
    assert ok["step"] == 1
    with pytest.raises(ValueError) as e:
        checkpoint.load(path, model_config={"model": {"n_layer": 4, "n_embd": 16, "n_head": 8,
                                                      "bias": True}})
    msg = str(e.value)
    assert "model.n_layer: checkpoint 2, current 4" in msg
    assert "model.n_head: checkpoint 4, current 8" in msg
    assert "model.bias: checkpoint '<missing>', current True" in msg
    assert "n_embd" not in msg


def test_a_checkpoint_from_before_the_block_choices_is_the_gpt2_model(tmp_path):
    """Its config.model lacks norm, pos, ...: they count as GPT-2's defaults, and any other
    value is a difference."""
    path = _save(tmp_path, 1, config={"model": {"n_layer": 2, "n_embd": 16, "bias": True}})
    assert checkpoint.load(path, model_config={"model": {"n_layer": 2, "norm": "layernorm", "pos": "learned",
                                                         "n_kv_head": 0, "tie_embeddings": True}})["step"] == 1
    with pytest.raises(ValueError, match="model.pos: checkpoint 'learned', current 'rope'"):
        checkpoint.load(path, model_config={"model": {"n_layer": 2, "pos": "rope"}})


def test_rng_state_round_trip():
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    state = checkpoint.rng_state()
    first = (torch.rand(3), np.random.rand(3), random.random())
    torch.rand(5), np.random.rand(5), random.random()
    checkpoint.set_rng_state(state)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert first[2] == again[2]


def _train(model, opt, loader, steps):
    for _ in range(steps):
        x, y = loader.next_batch()
        h = torch.nn.functional.dropout(model[0](x), 0.1)  # uses the torch RNG
        loss = torch.nn.functional.cross_entropy(model[1](h).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_resume_is_bit_exact(tmp_path):
    """2N steps in one go == N steps, save, fresh objects, load, N steps (stand-in model; the
    real train.py runs the same sequence)."""
    tokens = np.random.default_rng(0).integers(0, 64, 5000).astype(np.uint16)

    def fresh():
        torch.manual_seed(0)
        model = _model()
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2), Loader(tokens, 4, 8, 1)

    model, opt, loader = fresh()
    _train(model, opt, loader, 20)
    straight = model.state_dict()

    model, opt, loader = fresh()
    _train(model, opt, loader, 10)
    checkpoint.save(tmp_path, 10, model.state_dict(), opt.state_dict(), {}, loader.state_dict())
    torch.manual_seed(123)  # disturb every RNG the checkpoint must restore
    model, opt, loader = fresh()
    torch.manual_seed(999)
    ckpt = checkpoint.load(tmp_path)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    loader.load_state_dict(ckpt["loader"])
    checkpoint.set_rng_state(ckpt["rng"])
    _train(model, opt, loader, 10)
    for k, v in straight.items():
        assert torch.equal(model.state_dict()[k], v), k

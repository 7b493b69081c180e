"""--early_stop and ckpt_best.pt: which step is kept, that retention leaves it, that the run
stops after N evals without improvement (also across a resume), and that --resume,
nanolm.sample and nanolm.eval take the file."""
import os
import signal

import pytest
import torch

from nanolm import checkpoint, eval as nanolm_eval, sample
from nanolm import train as train_module
from nanolm.config import ConfigError, parse_args
from nanolm.metrics import read_metrics
from nanolm.train import config_from_args, train

TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4",
        "--eval_iters=1", "--log_interval=2", "--eval_interval=2", "--sample_tokens=4",
        "--warmup=2", "--kernels=torch"]
VAL_AT_STEP = {0: 5.0, 2: 3.0, 4: 2.0, 6: 2.5, 8: 2.0, 10: 2.6, 12: 1.0}  # best at 4; 8 only ties


@pytest.fixture
def scripted_val(monkeypatch):
    """evaluate() returns VAL_AT_STEP at the optimizer's step instead of measuring."""
    monkeypatch.setattr(train_module, "evaluate", lambda cfg, run: VAL_AT_STEP[run.opt.step_count])


def weights_and_moments(ckpt):
    return ckpt["model"], {k: ckpt["optimizer"][k] for k in ("exp_avg", "exp_avg_sq")}


def assert_same(a, b):
    for x, y in zip(weights_and_moments(a), weights_and_moments(b)):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_stops_after_n_evals_without_improvement_and_keeps_the_best(tmp_path, scripted_val):
    history = train(parse_args(TINY + ["--max_steps=12", "--early_stop=3", "--ckpt_interval=2",
                                       "--keep_ckpts=1", f"--out_dir={tmp_path}"]))
    assert history["early_stopped"] == 10 and history["stopped"] is None and "sample" in history
    # retention kept the newest ckpt_<step>.pt and never looked at ckpt_best.pt
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["ckpt_00000010.pt", checkpoint.BEST]
    best = checkpoint.load(tmp_path / checkpoint.BEST)
    assert best["step"] == 4 and best["best"] == {"val_loss": 2.0, "step": 4, "evals_since": 0}
    assert checkpoint.load(tmp_path)["best"] == {"val_loss": 2.0, "step": 4, "evals_since": 3}


@pytest.fixture
def kept_run(tmp_path_factory, monkeypatch):
    """8 steps keeping every checkpoint, val losses scripted (best at step 4)."""
    monkeypatch.setattr(train_module, "evaluate", lambda cfg, run: VAL_AT_STEP[run.opt.step_count])
    out = tmp_path_factory.mktemp("kept")
    train(parse_args(TINY + ["--max_steps=8", "--ckpt_interval=2", "--keep_ckpts=10", f"--out_dir={out}"]))
    monkeypatch.undo()
    return out


def test_best_checkpoint_resumes_samples_and_evaluates(kept_run, tmp_path, capsys):
    best = checkpoint.load(kept_run / checkpoint.BEST)
    assert best["step"] == 4
    assert_same(best, checkpoint.load(kept_run / "ckpt_00000004.pt"))
    assert checkpoint.latest(kept_run).name == "ckpt_00000008.pt"  # --resume=RUN never picks it
    # resumed from ckpt_best.pt (step 4), the run ends exactly where the straight one did
    train(config_from_args([f"--resume={kept_run / checkpoint.BEST}", f"--out_dir={tmp_path}"]))
    assert_same(checkpoint.load(tmp_path), checkpoint.load(kept_run / "ckpt_00000008.pt"))
    capsys.readouterr()
    sample.main(["--ckpt", str(kept_run / checkpoint.BEST), "--prompt", "ab", "--max_new_tokens", "3",
                 "--device", "cpu"])
    assert capsys.readouterr().out.startswith("ab")
    result = nanolm_eval.main([f"--ckpt={kept_run / checkpoint.BEST}", "--tokens=100", "--device=cpu"])
    assert result["tokens"] == 100 and result["loss"] > 0


def test_flat_val_loss_stops_and_resume_keeps_the_count(tmp_path, monkeypatch):
    """lr=0 keeps the val loss flat: the first eval (step 2) is the best and the run stops two
    evals later, at 6. Interrupted at step 3 and resumed, it stops at 6 too: the count of evals
    without improvement comes back from the checkpoint (starting it afresh would stop at 8)."""
    flat = TINY + ["--lr=0", "--min_lr=0", "--max_steps=20", "--early_stop=2"]
    assert train(parse_args(flat + [f"--out_dir={tmp_path / 'straight'}"]))["early_stopped"] == 6

    real_train_step, steps = train_module.train_step, []

    def step_then_interrupt(cfg, run, lr):
        result = real_train_step(cfg, run, lr)
        steps.append(1)
        if len(steps) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(train_module, "train_step", step_then_interrupt)
    assert train(parse_args(flat + [f"--out_dir={tmp_path / 'cut'}"]))["stopped"] == 3
    monkeypatch.undo()
    history = train(config_from_args(["--resume", f"--out_dir={tmp_path / 'cut'}"]))
    assert history["early_stopped"] == 6
    assert checkpoint.load(tmp_path / "cut" / checkpoint.BEST)["step"] == 2


def test_early_stop_must_not_be_negative():
    with pytest.raises(ConfigError, match="early_stop must be >= 0"):
        parse_args(["--early_stop=-1"])


def test_target_loss_ends_the_run_at_the_first_eval_that_reaches_it(tmp_path, scripted_val, capsys):
    """--target_loss (a time-to-loss run): the first eval at or under it ends the run, saving;
    the eval records carry the training seconds the speedrun bench plots."""
    history = train(parse_args(TINY + ["--max_steps=12", "--target_loss=2.0", f"--out_dir={tmp_path}"]))
    assert history["early_stopped"] == 4 and history["checkpoint"].name == "ckpt_00000004.pt"
    assert "target reached: val loss 2.0000 <= 2 at step 4" in capsys.readouterr().out
    evals = [r for r in read_metrics(tmp_path) if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 2, 4]
    assert 0 < evals[1]["train_s"] <= evals[2]["train_s"]


@pytest.mark.parametrize("bad,message", [("-1", "target_loss must be >= 0"),
                                         ("nan", "target_loss must be a finite number")])
def test_target_loss_must_be_finite_and_not_negative(bad, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(TINY + [f"--target_loss={bad}"])

import dataclasses
import json
import math
import os
import signal

import pytest
import torch

from nanolm import checkpoint, precision
from nanolm import train as train_module
from nanolm.config import ConfigError, parse_args
from nanolm.data import Loader, get_tokenizer
from nanolm.metrics import read_metrics
from nanolm.optim import FlatAdamW
from nanolm.train import config_from_args, get_lr, main, train
from nanolm.ops import OPS, backends

@pytest.fixture(autouse=True)
def in_tmp_dir(tmp_path, monkeypatch):
    """Runs without --out_dir write to ./runs: keep them out of the source tree."""
    monkeypatch.chdir(tmp_path)


TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4",
        "--eval_iters=2", "--log_interval=5", "--sample_tokens=8"]


def test_few_steps_reduce_loss(capsys):
    cfg = parse_args(TINY + ["--max_steps=30", "--eval_interval=30", "--lr=3e-3", "--warmup=5",
                             "--min_lr=3e-4", "--kernels=torch"])
    history = train(cfg)
    assert history["val"] < history["first_val"] - 0.5
    out = capsys.readouterr().out
    assert "kernels: layernorm=torch" in out and "tok/s" in out and "sample:" in out
    assert f"val loss {history['val']:.4f} | val ppl {math.exp(history['val']):.2f}" in out


def test_lr_schedule():
    cfg = parse_args(["--lr=1.0", "--min_lr=0.1", "--warmup=10", "--max_steps=110"])
    assert get_lr(cfg, 0) == pytest.approx(0.1)
    assert get_lr(cfg, 9) == pytest.approx(1.0)
    assert get_lr(cfg, 60) == pytest.approx(0.55)
    assert get_lr(cfg, 110) == pytest.approx(0.1)


@pytest.mark.parametrize("args,match", [
    (["--lrr=1"], "unknown config key 'lrr'; valid keys: preset, data"),
    (["--lr=-1"], "lr must be >= 0"),
    (["--lr=abc"], "expected float"),
    (["--n_embd=100", "--n_head=3"], "not divisible"),
    (["--preset=gpt5"], "valid: gpt2"),
    (["--batch_size=0"], "batch_size must be positive"),
    (["--dropout=1"], r"dropout must be in \[0, 1\)"),
    (["lr=1"], "--key=value"),
])
def test_config_errors(args, match):
    with pytest.raises(ConfigError, match=match):
        parse_args(args)


def test_block_size_larger_than_data_is_a_config_error():
    with pytest.raises(ConfigError, match="larger than the train data"):
        train(parse_args(TINY + ["--block_size=100000000", "--n_layer=1"]))


def test_main_exits_with_message(capsys):
    with pytest.raises(SystemExit, match="unknown config key"):
        main(["--nope=1"])


def test_kernels_errors():
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="valid: torch, triton, cuda, cpu"):
        backends.resolve("fast", cpu)
    with pytest.raises(ValueError, match="valid ops"):
        backends.resolve("torch,softmax=torch", cpu)
    with pytest.raises(ValueError, match="cannot run"):
        backends.resolve("cuda", cpu)
    # auto on a CPU: the cpu kernels for every op they implement where nanolm._C is built, else the
    # specification; a bare backend name covers the ops it implements, the others take auto
    built = backends.RUNS["cpu"](cpu) is None
    expected = {op: "cpu" if built and backends.implementation("cpu", op) else "torch" for op in OPS}
    assert backends.resolve("auto", cpu) == expected
    if built:
        assert backends.resolve("cpu", cpu) == expected
    with pytest.raises(ValueError, match="does not implement rope"):
        backends.resolve("auto,rope=triton", cpu)


def test_loader_deterministic_and_resumable():
    tokens = torch.arange(1000).numpy()
    a, b = Loader(tokens, 3, 8, seed=1), Loader(tokens, 3, 8, seed=1)
    xa, ya = a.next_batch("cpu")
    assert xa.shape == (3, 8) and xa.dtype == torch.int64 and torch.equal(ya, xa + 1)
    state = a.state_dict()
    xa2, _ = a.next_batch("cpu")
    b.load_state_dict(state)
    assert torch.equal(b.next_batch("cpu")[0], xa2)


def test_byte_tokenizer_round_trip():
    tok = get_tokenizer("byte")
    assert tok.decode(tok.encode("def f(x): return 'é'")) == "def f(x): return 'é'"
    with pytest.raises(ValueError, match="valid: byte"):
        get_tokenizer("gpt3")


# ----------------------------------------------------------------------------- checkpoints, resume

RESUMABLE = TINY + ["--max_steps=8", "--eval_interval=4", "--log_interval=2", "--warmup=2",
                    "--ckpt_interval=4", "--keep_ckpts=5"]


def final_state(run_dir):
    ckpt = checkpoint.load(run_dir)
    return ckpt["step"], ckpt["model"], ckpt["optimizer"]


def assert_same_state(a, b):
    assert a[0] == b[0]
    for k in a[1]:
        assert torch.equal(a[1][k], b[1][k]), k
    for k in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(a[2][k], b[2][k]), k
    assert a[2]["step"] == b[2]["step"]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """8 steps without interruption, checkpoints at 4 and 8."""
    out = tmp_path_factory.mktemp("straight")
    train(parse_args(RESUMABLE + [f"--out_dir={out}"]))
    return out


def test_resume_continues_bit_for_bit(straight_run, tmp_path):
    """4 steps + resume + 4 steps ends with the same weights and moments as 8 steps. Only the
    checkpoint and the output dir are given: the rest of the config comes from the checkpoint."""
    history = train(config_from_args([f"--resume={straight_run / 'ckpt_00000004.pt'}",
                                      f"--out_dir={tmp_path}"]))
    assert "first_val" not in history
    assert_same_state(final_state(straight_run), final_state(tmp_path))


def test_ctrl_c_saves_a_checkpoint_that_resumes_exactly(straight_run, tmp_path, monkeypatch):
    steps = []

    def step_then_interrupt(cfg, run, lr):
        result = real_train_step(cfg, run, lr)
        steps.append(1)
        if len(steps) == 3:  # a real SIGINT, delivered mid-run like a Ctrl-C
            os.kill(os.getpid(), signal.SIGINT)
        return result

    real_train_step = train_module.train_step
    monkeypatch.setattr(train_module, "train_step", step_then_interrupt)
    history = train(parse_args(RESUMABLE + [f"--out_dir={tmp_path}"]))
    monkeypatch.undo()
    assert history["stopped"] == 3 and checkpoint.latest(tmp_path).name == "ckpt_00000003.pt"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    train(config_from_args(["--resume", f"--out_dir={tmp_path}"]))
    assert_same_state(final_state(straight_run), final_state(tmp_path))
    records = read_metrics(tmp_path)  # the resumed run re-logs nothing twice
    for kind in ("train", "eval"):
        steps_logged = [r["step"] for r in records if r["kind"] == kind]
        assert steps_logged == sorted(set(steps_logged))
    assert [r["step"] for r in records if r["kind"] == "eval"] == [0, 4, 8]


def test_fresh_run_refuses_a_dir_with_checkpoints(straight_run):
    with pytest.raises(ConfigError, match="already holds checkpoints.*--resume"):
        train(parse_args(RESUMABLE + [f"--out_dir={straight_run}"]))


def test_resume_with_another_model_shape_lists_the_fields(straight_run, tmp_path):
    cfg = config_from_args([f"--resume={straight_run}", "--n_embd=64", "--n_layer=2",
                            f"--out_dir={tmp_path}", "--max_steps=20"])
    with pytest.raises(ConfigError, match=r"(?s)model.n_layer: checkpoint 1, current 2.*"
                                          r"model.n_embd: checkpoint 32, current 64"):
        train(cfg)


def test_resume_errors(straight_run, tmp_path):
    with pytest.raises(ConfigError, match="nothing left to train"):
        train(config_from_args([f"--resume={straight_run}", f"--out_dir={tmp_path}"]))
    with pytest.raises(ConfigError, match="no checkpoint"):
        config_from_args([f"--resume={tmp_path}"])


def test_run_dir_records(straight_run):
    config = json.loads((straight_run / "config.json").read_text())
    assert config["model"]["n_embd"] == 32 and config["max_steps"] == 8
    records = read_metrics(straight_run)
    train_records = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_records] == [2, 4, 6, 8]
    assert train_records[-1]["tokens"] == 8 * 4 * 32
    assert all(r["tokens_per_s"] > 0 and math.isfinite(r["loss"]) for r in train_records)
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 4, 8]
    assert all(r["val_ppl"] == pytest.approx(math.exp(r["val_loss"])) for r in evals)


# ----------------------------------------------------------------------------- dtype, fp16 loss scaling

def test_auto_dtype_is_saved_so_a_resume_keeps_it_and_says_so(tmp_path, monkeypatch, capsys):
    """The dtype auto picked and its reason go into the saved config: a resume reads no CPU
    (it may run on another machine, or this one reading differently) and continues in the same
    precision, saying where it came from rather than "(--dtype)"."""
    cpuinfo = tmp_path / "cpuinfo"
    monkeypatch.setattr(precision, "CPUINFO", str(cpuinfo))
    cpuinfo.write_text("vendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\nflags\t\t: avx2 avx512f avx512_bf16\n")
    run = tmp_path / "run"
    train(parse_args(TINY + ["--max_steps=2", "--eval_interval=2", "--ckpt_interval=2", f"--out_dir={run}"]))
    assert "dtype: bfloat16 (auto: AMD EPYC with avx512_bf16)" in capsys.readouterr().out
    cpuinfo.write_text("vendor_id\t: GenuineIntel\nmodel name\t: Intel Xeon\nflags\t\t: avx2 avx512f\n")
    cfg = config_from_args([f"--resume={run}", "--max_steps=3"])
    assert cfg.dtype == "bfloat16"
    train(cfg)
    assert "dtype: bfloat16 (auto, saved with the run: AMD EPYC with avx512_bf16)" in capsys.readouterr().out


def test_help_lists_every_option_with_its_default_and_comment(capsys):
    from nanolm.config import TrainConfig
    train_module.main(["--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(TrainConfig):
        assert f"--{f.name}=" in out, f.name
    assert "--max_steps=450" in out and "optimizer steps" in out
    assert "--dtype=auto" in out and "loss-scaled" in out  # a comment on the lines above the field


def test_dtype_is_printed(capsys):
    train(parse_args(TINY + ["--max_steps=1", "--eval_interval=1", "--dtype=bfloat16", "--kernels=cpu"]))
    assert "dtype: bfloat16 (--dtype)" in capsys.readouterr().out


FP16 = RESUMABLE + ["--dtype=float16", "--loss_scale_window=3"]


@pytest.fixture(scope="module")
def fp16_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fp16")
    train(parse_args(FP16 + [f"--out_dir={out}"]))
    return out


def test_fp16_loss_scale_is_logged_saved_and_resumes_bit_for_bit(fp16_run, tmp_path):
    """The loss scale is logged every log line and saved in each checkpoint, so resuming from
    checkpoint 4 ends exactly where the straight run did, with the same scale. (This tiny model
    overflows fp16 at the initial 2^16 on its first step: that step is skipped, as it should.)"""
    train_records = [r for r in read_metrics(fp16_run) if r["kind"] == "train"]
    assert len(train_records) == 4 and all(r["loss_scale"] >= 1 for r in train_records)
    train(config_from_args([f"--resume={fp16_run / 'ckpt_00000004.pt'}", f"--out_dir={tmp_path}"]))
    assert_same_state(final_state(fp16_run), final_state(tmp_path))
    saved = [checkpoint.load(d)["optimizer"]["loss_scale"] for d in (fp16_run, tmp_path)]
    assert saved[0] == saved[1] and saved[0]["scale"] == train_records[-1]["loss_scale"]


def test_fp16_injected_overflow_skips_the_step_and_halves_the_scale(tmp_path, monkeypatch):
    """An inf written into the gradients before the 3rd and 4th optimizer steps (as an fp16
    overflow leaves them): each is skipped with the weights untouched, each halves the scale,
    and training goes on to a finite loss."""
    real_step, calls, injected = FlatAdamW.step, [], []

    def step_with_overflow(self, lr=None):
        calls.append(1)
        if len(calls) not in (3, 4):
            return real_step(self, lr)
        self.flat_grad[7] = float("inf")
        weights, scale, skipped = self.flat_param.clone(), self.loss_scale.scale, self.skipped
        norm = real_step(self, lr)
        injected.append(torch.equal(self.flat_param, weights) and self.loss_scale.scale == scale / 2
                        and self.skipped == skipped + 1)
        return norm

    monkeypatch.setattr(FlatAdamW, "step", step_with_overflow)
    history = train(parse_args(FP16 + ["--loss_scale_window=100", f"--out_dir={tmp_path}"]))
    assert injected == [True, True]
    assert checkpoint.load(tmp_path)["optimizer"]["skipped"] >= 2
    assert math.isfinite(history["val"]) and history["val"] < history["first_val"]


def test_dtype_a_kernel_lacks_fails_before_the_run_dir(tmp_path):
    """Triton on CPU runs in the interpreter with fp32 attention only: bf16 there is refused
    before anything is written."""
    out = tmp_path / "run"
    with pytest.raises(ConfigError,
                       match="kernel backend 'triton' cannot run attention in it: attention on cpu takes float32"):
        train(parse_args(TINY + ["--max_steps=1", "--dtype=bfloat16", "--kernels=triton", f"--out_dir={out}"]))
    assert not out.exists()

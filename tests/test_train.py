import pytest
import torch

from nanolm import backends
from nanolm.config import ConfigError, parse_args
from nanolm.data import Loader, get_tokenizer
from nanolm.train import get_lr, main, train

TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4",
        "--eval_iters=2", "--log_interval=5", "--sample_tokens=8"]


def test_few_steps_reduce_loss(capsys):
    cfg = parse_args(TINY + ["--max_steps=30", "--eval_interval=30", "--lr=3e-3", "--warmup=5",
                             "--min_lr=3e-4", "--kernels=torch"])
    history = train(cfg)
    assert history["val"] < history["first_val"] - 0.5
    out = capsys.readouterr().out
    assert "kernels: layernorm=torch" in out and "tok/s" in out and "sample:" in out


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
    (["--dropout=0.1"], "dropout must be 0"),
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
    assert backends.resolve("auto", cpu) == {op: backends.resolve("auto", cpu)[op] for op in backends.OPS}


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

"""Issue 17: a run loses no work and produces nothing silently wrong (divergence, SIGTERM,
checkpoint retention, metrics, run-dir locks, data/tokenizer checks, one-line errors)."""
import math

import pytest
import torch

from nanolm import checkpoint
from nanolm.config import ConfigError, parse_args
from nanolm.train import Diverged, main, train

TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4",
        "--eval_iters=2", "--log_interval=1", "--sample_tokens=8", "--kernels=torch"]


@pytest.fixture(autouse=True)
def in_tmp_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def all_finite(ckpt):
    tensors = list(ckpt["model"].values()) + [ckpt["optimizer"][k] for k in ("exp_avg", "exp_avg_sq")]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


# ----------------------------------------------------------------------------- 1. divergence

@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_float_flags_are_config_errors(value):
    with pytest.raises(ConfigError, match=f"lr must be a finite number, got {value}"):
        parse_args([f"--lr={value}"])


def test_diverged_run_stops_and_keeps_its_finite_checkpoints(tmp_path, capsys):
    """lr=1e4 blows the loss up within a few steps; every step after that is non-finite."""
    out = tmp_path / "run"
    args = TINY + ["--lr=1e4", "--min_lr=0", "--warmup=0", "--grad_clip=0", "--max_steps=20",
                   "--ckpt_interval=2", "--keep_ckpts=2", "--max_skipped_steps=3", f"--out_dir={out}"]
    with pytest.raises(Diverged, match=r"3 consecutive steps .* non-finite.*ckpt_\d+\.pt"):
        train(parse_args(args))
    kept = checkpoint.checkpoints(out)
    assert kept, "the checkpoints from before the divergence are gone"
    for path in kept:
        assert all_finite(torch.load(path, weights_only=True)), path
    skipped = [r for r in read_jsonl(out / "metrics.jsonl") if not math.isfinite(r.get("grad_norm", 0))]
    assert len(skipped) == 3
    last_good = max(r["step"] for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"
                    and math.isfinite(r["grad_norm"]))
    assert checkpoint.latest(out).name <= f"ckpt_{last_good:08d}.pt"
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([a.replace("--out_dir=" + str(out), f"--out_dir={tmp_path / 'again'}") for a in args])
    assert str(e.value).startswith("error: training diverged")


def test_a_run_ending_on_skipped_steps_saves_and_samples_nothing_non_finite(tmp_path, capsys):
    out = tmp_path / "run"
    history = train(parse_args(TINY + ["--lr=1e4", "--min_lr=0", "--warmup=0", "--grad_clip=0",
                                       "--max_steps=12", "--ckpt_interval=2", "--max_skipped_steps=100",
                                       f"--out_dir={out}"]))
    assert "sample" not in history and "no sample: the last step was skipped" in capsys.readouterr().out
    assert all(all_finite(checkpoint.load(p)) for p in checkpoint.checkpoints(out))


def read_jsonl(path):
    import json
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_checkpoint_refuses_non_finite_weights_or_moments(tmp_path):
    weights = {"w": torch.ones(3)}
    bad_weights = {"w": torch.tensor([1.0, float("nan"), 2.0])}
    moments = {"exp_avg": torch.zeros(3), "exp_avg_sq": torch.tensor([0.0, float("inf"), 0.0])}
    with pytest.raises(ValueError, match=r"w.*non-finite"):
        checkpoint.save(tmp_path, 1, bad_weights, {}, {}, {})
    with pytest.raises(ValueError, match=r"exp_avg_sq.*non-finite"):
        checkpoint.save(tmp_path, 1, weights, moments, {}, {})
    assert checkpoint.checkpoints(tmp_path) == [] and list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- 2. SIGTERM

def start_cli(args, cwd, module="nanolm.train", torchrun=None):
    import os
    import subprocess
    import sys
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={torchrun}",
                f"--master_port={free_port()}"] if torchrun else [sys.executable]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHELASTIC")}
    return subprocess.Popen(launcher + ["-m", module, *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(env, OMP_NUM_THREADS="1"))


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_pids(pid):
    """The pids of a process's children (torchrun's ranks), read from /proc."""
    import os
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):  # not a process, or one that just ended
            continue
        if parent == pid:
            found.append(int(entry))
    return found


def terminate_after_first_step(proc, ranks_only=False):
    """Wait for the first logged step, then SIGTERM the process (or, ranks_only, each of
    torchrun's ranks and not torchrun); returns (stdout, stderr)."""
    import os
    import signal
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "| loss" in line:
            for pid in child_pids(proc.pid) if ranks_only else [proc.pid]:
                os.kill(pid, signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=60)
    return "".join(lines) + out, err


@pytest.mark.parametrize("ranks,ranks_only", [(None, False), (2, False), (2, True)])
def test_sigterm_finishes_the_step_and_saves(tmp_path, ranks, ranks_only):
    """SLURM/Kubernetes/torchrun stop a job with SIGTERM: like a first Ctrl-C, the run stops
    after the step in flight and saves it (under torchrun the agent forwards it to every rank).
    The exit code is 0, except that torchrun itself, when it is the one signalled, exits 1 after
    its ranks have saved and exited 0: its elastic agent re-raises the signal (SignalException,
    with a traceback), which nothing inside the ranks can change. SIGTERM sent to the ranks
    alone ends with torchrun's exit 0. The README says so."""
    args = TINY + ["--max_steps=100000", "--ckpt_interval=0", f"--out_dir={tmp_path / 'run'}"]
    if ranks:
        args = [a for a in args if a != "--batch_size=4"] + ["--batch_size=2"]
    proc = start_cli(args, tmp_path, torchrun=ranks)
    out, err = terminate_after_first_step(proc, ranks_only)
    if ranks and not ranks_only:
        assert proc.returncode == 1 and "SignalException" in err, err
    else:
        assert proc.returncode == 0, err
    assert "stopped at step" in out, out + err
    stopped = int(out.split("stopped at step")[1].split(";")[0])
    assert checkpoint.latest(tmp_path / "run").name == f"ckpt_{stopped:08d}.pt"
    assert all_finite(checkpoint.load(tmp_path / "run"))


# ----------------------------------------------------------------------------- 3. retention

def names(run_dir):
    return [p.name for p in checkpoint.checkpoints(run_dir)]


def test_retention_never_deletes_a_checkpoint_newer_than_the_one_just_saved(tmp_path):
    state = {"w": torch.ones(2)}
    for step in (5, 10):
        checkpoint.save(tmp_path, step, state, {}, {}, {}, keep=None)
    (tmp_path / "ckpt_best.pt").write_bytes(b"kept by its own rules")  # never a candidate
    checkpoint.save(tmp_path, 9, state, {}, {}, {}, keep=1)
    assert names(tmp_path) == ["ckpt_00000009.pt", "ckpt_00000010.pt"]
    assert (tmp_path / "ckpt_best.pt").exists()


def test_resume_from_an_older_checkpoint_sets_the_abandoned_future_aside(tmp_path):
    """The issue's case: resume A from step 5 although A holds step 10. The branch's checkpoints
    are kept by retention, the abandoned step-10 checkpoint and its metrics are moved aside
    (not lost), and `--resume` then continues the branch, not the abandoned future."""
    from nanolm.metrics import read_metrics
    from nanolm.train import config_from_args
    a = tmp_path / "A"
    train(parse_args(TINY + ["--max_steps=10", "--ckpt_interval=5", "--keep_ckpts=2", f"--out_dir={a}"]))
    assert names(a) == ["ckpt_00000005.pt", "ckpt_00000010.pt"]
    train(config_from_args([f"--resume={a / 'ckpt_00000005.pt'}", "--max_steps=9",
                            "--ckpt_interval=1", "--keep_ckpts=1"]))
    assert names(a) == ["ckpt_00000009.pt"]
    [aside] = [d for d in a.iterdir() if d.is_dir()]
    assert names(aside) == ["ckpt_00000010.pt"]
    assert max(r["step"] for r in read_metrics(aside)) == 10
    assert max(r["step"] for r in read_metrics(a)) == 9
    assert config_from_args(["--resume", f"--out_dir={a}", "--max_steps=12"]).max_steps == 12
    assert checkpoint.latest(a).name == "ckpt_00000009.pt"


def test_resume_into_another_run_dir_is_refused(tmp_path):
    from nanolm.train import config_from_args
    a, b = tmp_path / "A", tmp_path / "B"
    for d in (a, b):
        train(parse_args(TINY + ["--max_steps=2", f"--out_dir={d}", "--seed=" + str(len(d.name))]))
    before = {f: (a / f).read_bytes() for f in ("metrics.jsonl", "config.json")}
    with pytest.raises(ConfigError, match=f"--out_dir={a} already holds a run"):
        train(config_from_args([f"--resume={b}", f"--out_dir={a}", "--max_steps=4"]))
    assert before == {f: (a / f).read_bytes() for f in ("metrics.jsonl", "config.json")}


# ----------------------------------------------------------------------------- 4. metrics.jsonl

def write_records(path, steps, torn=""):
    import json
    path.write_text("".join(json.dumps({"kind": "train", "step": s, "time": float(s), "loss": 1.0})
                            + "\n" for s in steps) + torn)


def test_a_torn_last_metrics_line_is_dropped(tmp_path):
    from nanolm.metrics import MetricsWriter, read_metrics
    write_records(tmp_path / "metrics.jsonl", range(1, 6), torn='{"kind": "train", "st')
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]
    with MetricsWriter(tmp_path, {}, resume_step=4) as w:
        w.log("train", 5, loss=0.5)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"st\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not JSON"):
        read_metrics(tmp_path)


def test_metrics_rewrite_on_resume_is_atomic(tmp_path):
    """The resume rewrite dies half-way (a file-size limit, as a full disk would): the old
    metrics.jsonl must still be whole."""
    import subprocess
    import sys
    path = tmp_path / "metrics.jsonl"
    write_records(path, range(1, 101))
    before = path.read_text()
    script = ("import resource, sys; from nanolm.metrics import MetricsWriter; "
              f"resource.setrlimit(resource.RLIMIT_FSIZE, ({len(before) // 2}, {len(before) // 2})); "
              f"MetricsWriter(sys.argv[1], {{}}, resume_step=90)")
    p = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True)
    assert p.returncode != 0  # killed by SIGXFSZ
    assert path.read_text() == before


# ----------------------------------------------------------------------------- 5. run-dir lock

def test_a_run_dir_in_use_is_refused_naming_the_holder(tmp_path):
    """A second trainer on a run dir another process holds is refused; once the holder is
    killed, its lock file blocks nothing."""
    import os
    import subprocess
    import sys
    run = tmp_path / "run"
    train(parse_args(TINY + ["--max_steps=2", f"--out_dir={run}"]))
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from nanolm.rundir import RunDirLock; "
                               "lock = RunDirLock(sys.argv[1]); print('locked', flush=True); time.sleep(60)", str(run)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        before = (run / "metrics.jsonl").read_bytes()
        with pytest.raises(ConfigError, match=f"{run} is in use by pid {holder.pid} on "):
            train(parse_args(TINY + ["--max_steps=4", "--resume", f"--out_dir={run}"]))
        assert (run / "metrics.jsonl").read_bytes() == before
    finally:
        holder.kill()
        holder.wait()
    assert os.path.exists(run / ".lock")  # left by the killed holder: stale, it blocks nothing
    train(parse_args(TINY + ["--max_steps=4", "--resume", f"--out_dir={run}"]))
    assert checkpoint.latest(run).name == "ckpt_00000004.pt"


# ----------------------------------------------------------------------------- 6, 7. shards

def test_token_ids_beyond_the_vocab_are_refused_at_open_naming_the_shard(tmp_path):
    import numpy as np
    from nanolm import data
    data.write_shard(tmp_path / "x_train_000000.bin", np.arange(200) % 256)
    data.write_shard(tmp_path / "x_train_000001.bin", np.array([5] * 100 + [300] + [7] * 100))
    data.write_shard(tmp_path / "x_val_000000.bin", np.arange(100))
    with pytest.raises(ValueError, match=r"x_train_000001.bin holds token id 300, .* vocab of 256"):
        data.load_dataset(str(tmp_path), data.get_tokenizer("byte"))


def test_shards_record_their_tokenizer_and_refuse_another(tmp_path):
    from nanolm import data
    src = tmp_path / "tiny.txt"
    src.write_text("to be or not to be\n" * 100)
    out = tmp_path / "out"
    data.prepare(str(src), str(out), "byte", shard_tokens=700)
    bins = sorted(p.name for p in out.glob("*.bin"))
    for name in bins:  # the llm.c format itself is unchanged: other tools still read it
        assert len(data.read_shard(out / name)) > 0
    fake_gpt2 = type("Tok", (), {"name": "gpt2", "vocab_size": 50257})()
    with pytest.raises(ValueError, match=r"made with tokenizer 'byte'.* --tokenizer=gpt2"):
        data.load_dataset(str(out), fake_gpt2)
    data.load_dataset(str(out), data.get_tokenizer("byte"))


def test_prepare_refuses_a_non_empty_dir_unless_told_to_overwrite(tmp_path):
    from nanolm import data
    src = tmp_path / "tiny.txt"
    src.write_text("to be or not to be\n" * 100)
    out = tmp_path / "out"
    data.prepare(str(src), str(out), "byte", shard_tokens=700)
    src.write_text("short\n" * 100)
    with pytest.raises(ValueError, match=f"{out} is not empty.*--overwrite"):
        data.prepare(str(src), str(out), "byte")
    data.prepare(str(src), str(out), "byte", overwrite=True)
    assert sorted(p.name for p in out.glob("*.bin")) == ["tiny_train_000000.bin", "tiny_val_000000.bin"]


# ----------------------------------------------------------------------------- 8. HF import

@pytest.fixture
def hf_export(tmp_path):
    """A tiny model (vocab 300, 2 layers, 2 heads, n_embd 32) exported in HF's layout."""
    pytest.importorskip("safetensors")
    from nanolm import hf
    from nanolm.ops import backends
    from nanolm.config import ModelConfig
    from nanolm.model import GPT
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=300, vocab_multiple=64)
    model = GPT(cfg, backends.resolve("torch", torch.device("cpu")))
    hf.export(model.state_dict(), tmp_path / "hf", n_head=2, vocab_size=300, tokenizer="byte", vocab_multiple=64)
    return tmp_path / "hf"


@pytest.mark.parametrize("key,value,match", [
    ("n_head", 3, "n_embd=32 is not divisible by n_head=3"),
    ("n_layer", 3, r"transformer.h.2.* missing from the weights"),
    ("n_embd", 64, r"transformer.h.0.ln_1.weight: weights \(32,\), config \(64,\)"),
    ("n_positions", 64, r"transformer.wpe.weight: weights \(32, 32\), config \(64, 32\)"),
    ("vocab_size", 280, r"transformer.wte.weight: weights \(300, 32\), config \(280, 32\)"),
])
def test_hf_import_checks_config_against_weights(hf_export, tmp_path, key, value, match):
    import json
    from nanolm import hf
    config = json.loads((hf_export / "config.json").read_text())
    (hf_export / "config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(ValueError, match=match):
        hf.import_checkpoint(str(hf_export), tmp_path / "out", tokenizer="byte", vocab_multiple=64)
    assert not (tmp_path / "out").exists()


def test_hf_import_refuses_a_tokenizer_larger_than_the_embedding(hf_export, tmp_path):
    from nanolm import hf
    with pytest.raises(ValueError, match=r"tokenizer 'gpt2' has 50257 tokens.* 300.*--tokenizer byte"):
        hf.import_checkpoint(str(hf_export), tmp_path / "out", tokenizer="gpt2", vocab_multiple=64)
    hf.import_checkpoint(str(hf_export), tmp_path / "out", tokenizer="byte", vocab_multiple=64)


# ----------------------------------------------------------------------------- 10. grad norm

@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the triton interpreter's fp32 sum
@pytest.mark.parametrize("name", ["torch", "cpu", "triton"])
def test_grad_norm_of_finite_gradients_above_fp32_range_is_finite(name):
    """A norm above ~1.8e19 has a sum of squares beyond fp32's 3.4e38."""
    from nanolm.ops import adamw
    g = torch.randn(1000, dtype=torch.float64) * 1e18
    norm = adamw.grad_norm(g.float(), name)
    torch.testing.assert_close(norm.double(), g.norm(), rtol=1e-5, atol=0)
    assert torch.equal(norm, adamw.grad_norm(g.float(), name))  # deterministic
    for bad in (float("inf"), float("nan")):
        g[7] = bad
        assert not torch.isfinite(adamw.grad_norm(g.float(), name))


class OneRankComm:
    """Collectives over one rank: what FlatAdamW's sharded (ZeRO-1) path calls."""

    def all_reduce(self, tensor, average=True):
        return None

    def all_gather(self, output, input):
        return None

    def wait(self, handle):
        pass


@pytest.mark.parametrize("sharded", [False, True])
def test_optimizer_steps_on_huge_finite_gradients(sharded):
    from nanolm.optim import FlatAdamW
    w = torch.nn.Parameter(torch.zeros(64, 8))
    opt = FlatAdamW([("w", w)], 1e-3, grad_clip=1.0, backend="torch")
    if sharded:
        opt.shard(OneRankComm(), [((0, 200), (0, 200)), ((200, 512), (200, 512))])
    opt.flat_grad.copy_(torch.randn(512) * 1e19)
    norm = opt.step()
    assert math.isfinite(norm) and norm > 1e20 and opt.skipped == 0
    assert bool(torch.isfinite(w).all()) and bool((w != 0).any())


# ----------------------------------------------------------------------------- 11. sampler

def tiny_gpt(block_size=8):
    from nanolm.ops import backends
    from nanolm.config import ModelConfig
    from nanolm.model import GPT
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=block_size, vocab_size=40, vocab_multiple=64)
    return GPT(cfg, backends.resolve("torch", torch.device("cpu"))).eval()


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=-1.0), "temperature must be a finite number >= 0, got -1.0"),
    (dict(temperature=float("nan")), "temperature must be a finite number >= 0, got nan"),
    (dict(top_k=0), "top_k must be >= 1, got 0"),
    (dict(top_k=-3), "top_k must be >= 1, got -3"),
])
def test_sampler_arguments_are_checked(kwargs, match):
    from nanolm.sample import generate
    with pytest.raises(ValueError, match=match):
        generate(tiny_gpt(), torch.zeros(1, 1, dtype=torch.long), 4, **kwargs)


def test_a_block_size_1_model_samples():
    from nanolm.sample import generate
    out = generate(tiny_gpt(block_size=1), torch.zeros(1, 1, dtype=torch.long), 5, top_k=10)
    assert out.shape == (1, 6) and int(out.max()) < 40


def test_a_block_size_1_run_trains_and_samples(tmp_path):
    history = train(parse_args(TINY + ["--block_size=1", "--max_steps=2", f"--out_dir={tmp_path / 'r'}"]))
    assert len(history["sample"]) > 0


# ----------------------------------------------------------------------------- 12. one-line errors

def cli_error(main_fn, argv):
    """The message a CLI exits with (exit code 1: sys.exit with a string)."""
    with pytest.raises(SystemExit) as e:
        main_fn(argv)
    assert isinstance(e.value.code, str), "expected sys.exit('error: ...')"
    return e.value.code


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    out = tmp_path_factory.mktemp("two")
    train(parse_args(TINY + ["--max_steps=2", "--ckpt_interval=1", f"--out_dir={out}"]))
    return out


def corrupt(path, how):
    raw = bytearray(path.read_bytes())
    if how == "truncated":
        raw = raw[:len(raw) // 2]
    else:  # one flipped bit in the middle, inside tensor data: torch.load alone accepts it
        raw[len(raw) // 2] ^= 0x10
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("how", ["truncated", "bit-flipped"])
def test_a_corrupt_checkpoint_is_named_and_the_previous_suggested(two_checkpoints, tmp_path, how):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run)
    corrupt(run / "ckpt_00000002.pt", how)
    msg = cli_error(main, ["--resume", f"--out_dir={run}", "--max_steps=4"])
    assert msg.startswith("error: ") and "ckpt_00000002.pt" in msg and "ckpt_00000001.pt" in msg, msg
    main([f"--resume={run / 'ckpt_00000001.pt'}", "--max_steps=3"])  # the suggestion works


def shakespeare_offline(monkeypatch, tmp_path):
    from nanolm import data

    def offline(url, path):
        raise OSError("network unreachable")
    monkeypatch.setenv("NANOLM_CACHE", str(tmp_path))
    monkeypatch.setattr(data, "download", offline)


def bad_checksum(monkeypatch, tmp_path):
    monkeypatch.setenv("NANOLM_CACHE", str(tmp_path))
    (tmp_path / "tinyshakespeare.txt").write_text("not shakespeare")


@pytest.mark.parametrize("args,setup,expected", [
    (["--data=missing.txt"], None, "missing.txt: no such file"),
    (["--init_from=nowhere/ckpt.pt"], None, "nowhere/ckpt.pt"),
    (["--data=nomatch_*.bin"], None, "no token shards match 'nomatch_*.bin'"),
    (["--data=shakespeare"], shakespeare_offline, "not cached"),
    (["--data=shakespeare"], bad_checksum, "sha256"),
    (["--data=latin1.txt"], "latin1", "latin1.txt: not UTF-8"),
    (["--device=tpu"], None, "device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    (["--dtype=bfloat16", "--kernels=triton"], None, "--dtype=bfloat16"),
    (["--resume", "--init_from=x"], None, "--resume and --init_from"),
    (["--zero=1"], None, "--zero=1 needs several processes"),
    (["--out_dir=a_file/run"], "a_file", "a_file"),
])
def test_user_errors_are_one_line_before_the_run_dir(args, setup, expected, tmp_path, monkeypatch):
    if setup == "latin1":
        (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1") * 100)
    elif setup == "a_file":
        (tmp_path / "a_file").write_text("not a directory")
    elif setup:
        setup(monkeypatch, tmp_path)
    argv = [a for a in TINY if a != "--kernels=torch"] + ["--max_steps=2"] + args
    if not any(a.startswith("--out_dir") for a in args):
        argv.append("--out_dir=out")
    msg = cli_error(main, argv)
    assert msg.startswith("error: ") and expected in msg, msg
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()


def test_sample_prepare_and_import_errors_are_one_line(tmp_path):
    from nanolm import data, hf, sample
    msg = cli_error(sample.main, ["--ckpt", "no_such_run", "--device", "cpu"])
    assert msg.startswith("error: ") and "no_such_run" in msg
    (tmp_path / "empty.txt").write_text("")
    msg = cli_error(data.main, ["prepare", "empty.txt", "--out", "shards", "--tokenizer", "byte"])
    assert msg.startswith("error: ") and "empty.txt is empty" in msg
    msg = cli_error(hf.main, ["import", "no_hf_dir", "out"])
    assert msg.startswith("error: ") and "no_hf_dir" in msg


def test_the_cli_prints_one_line_and_the_traceback_only_when_debugging(tmp_path):
    import os
    import subprocess
    import sys
    cmd = [sys.executable, "-m", "nanolm.train", "--data=missing.txt", "--out_dir=out"]
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert (p.returncode, p.stderr) == (1, "error: missing.txt: no such file\n")
    p = subprocess.run(cmd + ["--debug"], cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode == 1 and "Traceback" in p.stderr
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=dict(os.environ, NANOLM_DEBUG="1"))
    assert p.returncode == 1 and "Traceback" in p.stderr


def test_a_full_disk_is_one_line(tmp_path):
    """A file-size limit stands in for a full disk: the first checkpoint write fails."""
    import resource
    import signal
    import subprocess
    import sys

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
    p = subprocess.run([sys.executable, "-m", "nanolm.train", *TINY, "--max_steps=2", "--out_dir=out"],
                       cwd=tmp_path, capture_output=True, text=True, preexec_fn=small_files)
    assert p.returncode == 1 and p.stderr.startswith("error: ") and p.stderr.count("\n") == 1, p.stderr
    assert "ckpt_best.pt" in p.stderr  # the first write: the eval at step 2 is the best so far


# ----------------------------------------------------------------------------- 13. smaller

def test_a_relative_data_path_is_stored_resolved(tmp_path, monkeypatch):
    """Started in one directory, resumed from another."""
    import json
    from nanolm.train import config_from_args
    (tmp_path / "start").mkdir()
    (tmp_path / "start" / "corpus.txt").write_text("to be or not to be, that is the question\n" * 200)
    monkeypatch.chdir(tmp_path / "start")
    train(parse_args(TINY + ["--data=corpus.txt", "--max_steps=2", "--out_dir=../run"]))
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data"] == str(tmp_path / "start" / "corpus.txt")
    monkeypatch.chdir(tmp_path)
    train(config_from_args(["--resume=run", "--max_steps=3"]))
    assert checkpoint.latest(tmp_path / "run").name == "ckpt_00000003.pt"


def test_a_shard_dir_whose_name_holds_brackets_is_not_a_glob(tmp_path):
    import numpy as np
    from nanolm import data
    folder = tmp_path / "run[1]"
    folder.mkdir()
    data.write_shard(folder / "d_train_000000.bin", np.arange(300) % 256)
    data.write_shard(folder / "d_val_000000.bin", np.arange(100))
    tr, va = data.load_dataset(str(folder), data.get_tokenizer("byte"))
    assert (len(tr), len(va)) == (300, 100)
    tr, va = data.load_dataset(str(folder / "d_train_000000.bin").replace("train", "*"), data.get_tokenizer("byte"))
    assert (len(tr), len(va)) == (300, 100)


def test_bench_refuses_an_unknown_implementation(tmp_path):
    from bench import cli as bench_cli
    with pytest.raises(SystemExit) as e:
        bench_cli.main(["layernorm", "--tiny", "--device", "cpu", "--impls", "torch,nosuch", "--out", str(tmp_path)])
    assert str(e.value.code).startswith("error: --impls: no layernorm implementation named 'nosuch'")
    assert "torch" in str(e.value.code) and not list(tmp_path.iterdir())


def test_bench_runs_from_any_directory(tmp_path):
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "-m", "bench", "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode == 0 and "usage: python -m bench" in p.stdout, p.stderr


def test_a_timed_out_collective_names_what_the_ranks_waited_for(tmp_path):
    """A rank that times out while rank 0 writes a checkpoint says so, not just 'all_reduce'."""
    import subprocess
    import sys
    script = """
import datetime, torch
from nanolm import dist
env = dist.DistEnv()
ctx = dist.Context(env, torch.device("cpu"))
ctx.comm = dist.GlooComm(env, dist.rendezvous_store(env, 10), timeout_s=10)
ctx.waiting_for("rank 0 to write the step-5 checkpoint")

class TimedOut:
    def wait(self, timeout):
        raise RuntimeError("Timed out waiting 10000ms")

ctx.comm.wait(dist.GlooWork("all_reduce", TimedOut()))
"""
    env = dict(__import__("os").environ, MASTER_PORT=str(free_port()))
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 1
    assert "all_reduce failed" in p.stderr and "waiting for rank 0 to write the step-5 checkpoint" in p.stderr, p.stderr

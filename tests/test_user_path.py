"""Issue 27, sections 2-4: one `error:` line where a traceback came, no silent or misleading
result, and the README's path for a new user (HF round trip of the quickstart model, progress,
help text that names no internals)."""
import json
import os
import stat
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from nanolm import checkpoint, data, eval as nanolm_eval, hf, plot, sample
from nanolm.config import parse_args
from nanolm.train import config_from_args, main, train

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4",
        "--eval_iters=2", "--log_interval=1", "--sample_tokens=8", "--kernels=torch"]


@pytest.fixture(autouse=True)
def in_tmp_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def cli_error(main_fn, argv):
    """The one line a CLI exits with (exit code 1: sys.exit with a string)."""
    with pytest.raises(SystemExit) as e:
        main_fn(argv)
    assert isinstance(e.value.code, str), "expected sys.exit('error: ...')"
    assert e.value.code.startswith("error: "), e.value.code
    return e.value.code


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished tiny run: ckpt_00000002.pt, ckpt_best.pt, metrics.jsonl."""
    out = tmp_path_factory.mktemp("trained") / "run"
    train(parse_args(TINY + ["--max_steps=2", "--eval_interval=1", f"--out_dir={out}"]))
    return out


def rewrite(path, change):
    """Load a checkpoint file, change(ckpt), save it back with a fresh CRC (a well-formed file
    that lacks something, not a damaged one)."""
    ckpt = torch.load(path, weights_only=True)
    change(ckpt)
    ckpt["crc32"] = checkpoint.tensors_crc32({k: v for k, v in ckpt.items() if k != "crc32"})
    torch.save(ckpt, path)


# ----------------------------------------------------------------------------- 2. tracebacks

def test_eval_errors_are_one_line(run_dir, tmp_path):
    import shutil
    damaged = tmp_path / "damaged.pt"
    raw = bytearray((run_dir / "ckpt_00000002.pt").read_bytes())
    damaged.write_bytes(bytes(raw[:len(raw) // 2]))
    assert "damaged.pt is damaged" in cli_error(nanolm_eval.main, ["--ckpt", str(damaged)])
    msg = cli_error(nanolm_eval.main, ["--ckpt", str(run_dir), "--kernels=nosuch"])
    assert "unknown kernel backend 'nosuch'" in msg
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "x_train.bin").write_bytes(b"short")
    (shards / "x_val.bin").write_bytes(b"short")
    msg = cli_error(nanolm_eval.main, ["--ckpt", str(run_dir), f"--data={shards}"])
    assert "x_train.bin: not a token shard" in msg
    shutil.rmtree(shards)


def test_eval_shows_progress_on_stderr(run_dir, capsys):
    nanolm_eval.main(["--ckpt", str(run_dir / checkpoint.BEST), "--tokens=2000", "--device=cpu"])
    out, err = capsys.readouterr()
    assert "loss" in out and "evaluating [" in err and "2.0/2.0 k tokens" in err


def test_plot_errors_are_one_line(run_dir, tmp_path):
    pytest.importorskip("matplotlib")
    (tmp_path / "empty").mkdir()
    assert "no metrics.jsonl in" in cli_error(plot.main, [str(run_dir), str(tmp_path / "empty")])
    assert not (run_dir / "metrics.png").exists()  # no half-drawn plot of the good run
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "metrics.jsonl").write_text("{oops\n{}\n")
    assert "metrics.jsonl:1: not JSON" in cli_error(plot.main, [str(tmp_path / "broken")])


@pytest.mark.parametrize("lacks,expected", [
    ("model.transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_attn.weight: in the config's model, "
                                                 "missing from the weights"),
    ("config.model", "holds no 'config.model'"),
    ("rng", "holds no 'rng', which a resume needs"),
    ("optimizer", "holds no 'optimizer', which a resume needs"),
    ("loader", "holds no 'loader.train', which a resume needs"),
])
def test_a_checkpoint_missing_a_part_is_one_line(run_dir, tmp_path, lacks, expected):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    path = run / "ckpt_00000002.pt"

    def drop(ckpt):
        *parents, last = lacks.split(".", 1 if lacks.startswith("model.") else -1)
        node = ckpt
        for key in parents:
            node = node[key]
        del node[last]
    rewrite(path, drop)
    msg = cli_error(main, [f"--resume={path}", "--max_steps=4"])
    assert str(path) in msg and expected in msg, msg
    if lacks in ("rng", "optimizer", "loader"):  # weights-only readers do not need these
        main(TINY + ["--max_steps=1", f"--init_from={path}", f"--out_dir={tmp_path / 'init'}"])
        return
    assert str(path) in cli_error(main, TINY + ["--max_steps=1", f"--init_from={path}",
                                                f"--out_dir={tmp_path / 'init'}"])
    assert str(path) in cli_error(sample.main, ["--ckpt", str(path), "--device=cpu"])


@pytest.mark.parametrize("content,expected", [
    ('{"vocab_size": 256}', "shards.json names no tokenizer"),
    ('{"tokenizer": ', "shards.json: not valid JSON"),
    ('["byte"]', "shards.json: expected a JSON object"),
])
def test_a_bad_shards_json_is_named(tmp_path, content, expected):
    data.main(["prepare", "pystdlib", "--out", "shards", "--tokenizer", "byte"])
    (tmp_path / "shards" / "shards.json").write_text(content)
    msg = cli_error(main, TINY + ["--max_steps=1", "--data=shards", "--out_dir=out"])
    assert expected in msg and str(tmp_path / "shards" / "shards.json") in msg, msg


def test_a_model_too_large_for_memory_is_refused_before_allocating():
    msg = cli_error(main, ["--n_embd=1000000", "--max_steps=1", "--out_dir=out", "--kernels=torch"])
    assert "GiB for its weights, gradients and AdamW moments" in msg and "GiB free on cpu" in msg, msg
    assert not Path("out").exists()


@pytest.fixture
def exported(run_dir, tmp_path):
    pytest.importorskip("safetensors")
    hf.main(["export", str(run_dir), str(tmp_path / "hf")])
    return tmp_path / "hf"


def test_hf_import_errors_are_one_line(exported):
    import safetensors.torch
    config = json.loads((exported / "config.json").read_text())
    msg = cli_error(hf.main, ["import", str(exported), "imported", "--vocab_multiple=0"])
    assert "vocab_multiple must be a whole number >= 1, got 0" in msg
    (exported / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "n_head"}))
    assert "config.json has no n_head" in cli_error(hf.main, ["import", str(exported), "imported"])
    (exported / "config.json").write_text(json.dumps(config))
    tensors = safetensors.torch.load_file(exported / "model.safetensors")
    del tensors["transformer.wte.weight"]
    safetensors.torch.save_file(tensors, exported / "model.safetensors")
    assert "hold no transformer.wte.weight" in cli_error(hf.main, ["import", str(exported), "imported"])
    assert not Path("imported").exists()


def test_an_exploding_but_finite_val_loss_is_logged_not_raised(tmp_path, capsys):
    from nanolm.metrics import MetricsWriter, read_metrics
    from nanolm.train import log_eval
    cfg = parse_args(TINY)
    run = types.SimpleNamespace(model=types.SimpleNamespace(cfg=types.SimpleNamespace(block_size=32)),
                                dist=types.SimpleNamespace(dp=1), metrics=MetricsWriter(tmp_path, {}))
    log_eval(cfg, run, 3, 800.0)  # exp(800) overflows a float
    run.metrics.close()
    assert "val loss 800.0000 | val ppl inf" in capsys.readouterr().out
    assert read_metrics(tmp_path)[-1]["val_ppl"] == float("inf")


# ----------------------------------------------------------------------------- 3. silent results

def test_resume_from_an_older_checkpoint_sets_a_later_best_aside(tmp_path):
    """The abandoned branch's ckpt_best.pt (a later step) moves aside with that branch, so the
    new branch's first best does not overwrite what may be the run's best weights."""
    a = tmp_path / "A"
    train(parse_args(TINY + ["--max_steps=10", "--ckpt_interval=5", "--eval_interval=5", f"--out_dir={a}"]))
    best_before = torch.load(a / checkpoint.BEST, weights_only=True)
    assert best_before["step"] == 10
    train(config_from_args([f"--resume={a / 'ckpt_00000005.pt'}", "--max_steps=7", "--eval_interval=1"]))
    [aside] = [d for d in a.iterdir() if d.is_dir()]
    kept = torch.load(aside / checkpoint.BEST, weights_only=True)
    assert kept["step"] == 10 and kept["crc32"] == best_before["crc32"]
    assert torch.load(a / checkpoint.BEST, weights_only=True)["step"] <= 7


def test_a_best_from_before_the_resume_point_stays(tmp_path):
    a = tmp_path / "A"
    train(parse_args(TINY + ["--max_steps=10", "--ckpt_interval=5", "--eval_interval=5",
                             "--lr=1e-9", "--min_lr=0", f"--out_dir={a}"]))
    rewrite(a / checkpoint.BEST, lambda ckpt: ckpt.update(step=5))  # as if step 10 had been worse
    train(config_from_args([f"--resume={a / 'ckpt_00000005.pt'}", "--max_steps=6", "--eval_interval=100"]))
    [aside] = [d for d in a.iterdir() if d.is_dir()]
    assert not (aside / checkpoint.BEST).exists() and (a / checkpoint.BEST).exists()


@pytest.mark.parametrize("shard_tokens", ["-5", "0"])
def test_prepare_refuses_a_shard_size_below_one_and_leaves_nothing(tmp_path, shard_tokens):
    msg = cli_error(data.main, ["prepare", "pystdlib", "--out", "shards", "--tokenizer", "byte",
                                f"--shard_tokens={shard_tokens}"])
    assert f"--shard_tokens must be >= 1, got {shard_tokens}" in msg
    assert not (tmp_path / "shards").exists()


def test_sample_refuses_a_negative_length(run_dir):
    msg = cli_error(sample.main, ["--ckpt", str(run_dir), "--max_new_tokens=-5", "--device=cpu"])
    assert "--max_new_tokens must be >= 1, got -5" in msg


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("cli", [sample.main, nanolm_eval.main])
def test_device_cuda_without_cuda_does_not_call_a_good_checkpoint_damaged(run_dir, cli):
    msg = cli_error(cli, ["--ckpt", str(run_dir), "--device=cuda"])
    assert "CUDA is not available" in msg and "damaged" not in msg, msg


def test_hf_export_refuses_a_non_empty_folder_and_writes_readable_files(run_dir, tmp_path):
    pytest.importorskip("safetensors")
    config_before = (run_dir / "config.json").read_text()
    msg = cli_error(hf.main, ["export", str(run_dir), str(run_dir)])
    assert "is not empty" in msg and "--overwrite" in msg
    assert (run_dir / "config.json").read_text() == config_before
    hf.main(["export", str(run_dir), "hf"])
    hf.main(["export", str(run_dir), "hf", "--overwrite"])
    umask = os.umask(0)
    os.umask(umask)
    for name in ("model.safetensors", "config.json"):
        assert stat.S_IMODE((tmp_path / "hf" / name).stat().st_mode) == 0o666 & ~umask, name


def test_a_missing_data_dir_is_not_found():
    msg = cli_error(main, TINY + ["--max_steps=1", "--data=/missing/dir", "--out_dir=out"])
    assert "/missing/dir: not found" in msg


# ----------------------------------------------------------------------------- 4. the new user's path

def test_hf_round_trip_of_a_quickstart_model_needs_no_flags(tmp_path):
    """The README's quickstart (byte tokens, vocab padded to 64), shortened: export -> import ->
    --init_from with no extra flags, the weights unchanged; bos/eos are the byte tokenizer's."""
    pytest.importorskip("safetensors")
    short = ["--max_steps=2", "--eval_iters=1", "--sample_tokens=4", "--batch_size=2"]
    train(parse_args(short + ["--out_dir=quick"]))
    hf.main(["export", "quick", "hf_out"])
    config = json.loads((tmp_path / "hf_out" / "config.json").read_text())
    assert config["bos_token_id"] == config["eos_token_id"] == 0 and config["vocab_size"] == 256
    hf.main(["import", "hf_out", "imported"])
    main(short + ["--init_from=imported", "--lr=0", "--min_lr=0", "--max_steps=1", "--out_dir=tuned"])
    trained = checkpoint.load("quick")["model"]
    tuned = checkpoint.load("tuned")["model"]
    assert all(torch.equal(tuned[k], v) for k, v in trained.items())


def test_bench_static_shows_progress_and_keeps_what_it_compiled_when_stopped(tmp_path):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) after the second compile:
    the finished rows are written, marked incomplete, exit 130."""
    import signal
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # it compiles for a GPU
    env["NANOLM_STATIC_CACHE"] = str(tmp_path / "cache")  # empty: every configuration compiles
    proc = subprocess.Popen([sys.executable, "-m", "bench", "static", "--kernels", "layernorm_fwd", "--no-cuda",
                             "--arch", "sm_90a", "--jobs", "1", "--out", str(tmp_path / "out")], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    seen = b""
    while b"compiled 2/" not in seen:
        char = proc.stderr.read(1)
        assert char, seen.decode()
        seen += char
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (seen + err).decode()
    assert b"stopped after" in err and b"a rerun goes on from there" in err
    written = json.loads((tmp_path / "out" / "static.json").read_text())
    assert written["env"]["complete"] is False and len(written["rows"]) >= 2


@pytest.mark.cuda_sim
def test_the_readmes_cuda_sim_command_trains(tmp_path):
    """The README's `--kernels=cuda_sim` command, cut to one step (it is slow: every CUDA thread
    is emulated), runs where the quickstart's head size 32 is refused."""
    import shlex
    readme = (ROOT / "README.md").read_text()
    [command] = [block for block in readme.split("```") if "--kernels=cuda_sim" in block
                 and block.strip().startswith("python -m nanolm.train")]
    argv = shlex.split(command.replace("\\\n", " "))[3:]
    history = train(parse_args(argv + ["--max_steps=1", "--eval_iters=1", "--sample_tokens=2",
                                       f"--out_dir={tmp_path / 'sim'}"]))
    assert "sample" in history and history["checkpoint"].exists()


def test_help_lists_presets_and_backends_and_names_no_internals():
    out = subprocess.run([sys.executable, "-m", "nanolm.train", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for internal in ("pick_dtype", "PRESETS", "backends/__init__.py"):
        assert internal not in out, internal
    assert "gpt2-medium" in out and "quickstart" in out and "cuda_sim" in out


def test_committed_logs_name_no_temporary_paths():
    found = [str(p.relative_to(ROOT)) for p in (ROOT / "bench" / "results").rglob("*")
             if p.is_file() and p.suffix in (".log", ".md", ".json", ".txt", ".jsonl")
             and ("/tmp/" in p.read_text(errors="replace") or "/work/" in p.read_text(errors="replace"))]
    assert not found, found


def test_readme_examples_output_is_ignored_by_git():
    assert "hf_out/" in (ROOT / ".gitignore").read_text().splitlines()

"""`python -m bench speedrun` on a toy model: every run reaches a target it must reach at its
first eval, a target out of reach is reported as not reached (never as a time), and the table,
the results and the plot are written."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import speedrun

ROOT = Path(__file__).resolve().parent.parent
TOY = ["--n_layer=1", "--n_embd=32", "--n_head=2", "--block_size=16", "--batch_size=2", "--eval_iters=1",
       "--eval_interval=2", "--warmup=1"]


def run(tmp_path, *argv):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "bench", "speedrun", f"--out={out}", *TOY, *argv],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    return proc, out


def test_every_run_reaches_a_target_above_the_first_loss(tmp_path):
    """Val loss starts near ln(256) = 5.5 on bytes: a target of 50 is met at the first eval."""
    proc, out = run(tmp_path, "--target=50", "--max_steps=4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((out / "speedrun.json").read_text())
    assert [r["run"] for r in results["results"]] == list(speedrun.RUNS)
    for r in results["results"]:
        assert r["returncode"] == 0 and r["reached"][0] == 2, r  # the first eval, step 2
        assert r["reached"][1] > 0  # seconds in training steps
    assert results["machine"]["cpu"] and "--target_loss=50.0" in results["settings"]
    table = (out / "speedrun.md").read_text()
    assert all(f"| {name} | 2 |" in table for name in speedrun.RUNS)
    assert (out / "speedrun.png").stat().st_size > 0


def test_a_target_out_of_reach_is_reported_not_timed(tmp_path):
    proc, out = run(tmp_path, "--target=0.01", "--max_steps=2", "--runs=pytorch-eager,nanolm")
    assert proc.returncode == 0, proc.stderr[-2000:]
    for r in json.loads((out / "speedrun.json").read_text())["results"]:
        assert r["reached"] is None and [c[0] for c in r["curve"]] == [0, 2]
    assert (out / "speedrun.md").read_text().count("not reached in 2 steps") == 2


@pytest.mark.parametrize("argv,message", [(["--runs=nanolm,nope"], "unknown run 'nope'"),
                                          (["--target=0"], "--target must be > 0")])
def test_bad_arguments_are_one_error(argv, message, capsys):
    with pytest.raises(SystemExit):
        speedrun.parse_args(argv)
    assert message in capsys.readouterr().err

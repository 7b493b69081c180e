"""The bench suite on CPU: argument parsing, byte/FLOP formulas, result writing, the README
table generator, and a smoke run of `python -m bench layernorm` (torch backend, toy shapes)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import cli, collect, formulas, readme_table, report, runner
from bench.cases import Case, Impl, build_cases, check_outputs

ROOT = Path(__file__).parent.parent


def test_parse_args_defaults_and_ops():
    args = cli.parse_args(["layernorm", "adamw", "--quick", "--out", "x", "--device", "cpu", "--impls", "torch,eager"])
    assert args.ops == ["layernorm", "adamw"] and args.size == "quick" and args.out == "x"
    assert args.device == "cpu" and args.impls == ["torch", "eager"]
    everything = cli.parse_args([])
    assert everything.ops == list(cli.OPS) and everything.size == "full" and everything.impls == []
    assert cli.parse_args(["--tiny"]).size == "tiny"


@pytest.mark.parametrize("argv", [["nope"], ["--device", "tpu"]])
def test_parse_args_rejects_bad_input(argv):
    with pytest.raises(SystemExit):
        cli.parse_args(argv)


def test_byte_formulas():
    N, C = 1024, 768
    assert formulas.layernorm_fwd_bytes(N, C, 2) == 2 * N * C * 2 + 2 * C * 2 + 8 * N
    assert formulas.layernorm_fwd_bytes(N, C, 2, residual=True) == 4 * N * C * 2 + 2 * C * 2 + 8 * N
    assert formulas.layernorm_bwd_bytes(N, C, 4) == 3 * N * C * 4 + C * 4 + 8 * N + 8 * C
    assert formulas.cross_entropy_bytes(8, 50304, 2) == 2 * 8 * 50304 * 2 + 12 * 8
    assert formulas.adamw_bytes(124_000_000) == 28 * 124_000_000


def test_flop_formulas():
    fwd = formulas.attention_flops(2, 12, 1024, 64)
    assert fwd == 4 * 2 * 12 * 1024 ** 2 * 64 / 2
    assert formulas.attention_flops(2, 12, 1024, 64, causal=False) == 2 * fwd
    assert formulas.attention_flops(2, 12, 1024, 64, "bwd") == 2.5 * fwd
    assert formulas.attention_flops(2, 12, 1024, 64, "fwd+bwd") == 3.5 * fwd
    assert formulas.linear_cross_entropy_flops(8, 16, 32) == 6 * 8 * 16 * 32
    assert formulas.train_flops_per_token(100, 2, 8, 16) == 600 + 12 * 2 * 8 * 16


def test_check_outputs_catches_wrong_results():
    ref = (torch.randn(10, 7),)
    check_outputs((ref[0] * (1 + 1e-6),), ref, 1e-4)
    with pytest.raises(AssertionError, match="max error"):
        check_outputs((ref[0] + 0.1,), ref, 1e-4)
    with pytest.raises(AssertionError, match="non-finite"):
        check_outputs((torch.full_like(ref[0], float("nan")),), ref, 1e-4)


def _toy_case(impls):
    x = torch.randn(32, 8)
    return Case(op="toy", name="n=32", series="s", x=32, metric="GB/s", work=1e6,
                make_inputs=lambda: {"x": x}, reference=lambda t: (t["x"] * 2,), impls=impls, tol=1e-5)


def _results():
    good = Impl("fast", "nanolm", lambda t: lambda: (t["x"] * 2,))
    wrong = Impl("wrong", "nanolm", lambda t: lambda: (t["x"] * 3,))
    base = Impl("eager", "baseline", lambda t: lambda: (t["x"] + t["x"],))
    rows, skipped = runner.run_case(_toy_case([good, wrong, base]), torch.device("cpu"), log=lambda m: None)
    ceilings = {"copy_GBps": 10.0, "copy_bytes": 1, "matmul_TFLOPs": 1.0, "matmul_shape": "n"}
    return {"env": cli.environment(torch.device("cpu")), "ceilings": ceilings, "size": "tiny",
            "results": runner.add_derived(rows, ceilings),
            "skipped": skipped + [{"op": "toy", "case": "n=32", "impl": "cuda", "status": "skipped", "reason": "no GPU"}]}


def test_runner_fails_wrong_impl_and_derives_figures():
    rows = {r["impl"]: r for r in _results()["results"]}
    assert rows["wrong"]["status"] == "FAILED" and "max error" in rows["wrong"]["error"]
    assert "time_ms" not in rows["wrong"]
    fast = rows["fast"]
    assert fast["value"] == pytest.approx(1e6 / fast["time_ms"] / 1e6)
    assert fast["pct_ceiling"] == pytest.approx(10 * fast["value"])
    assert fast["speedup"]["eager"] == pytest.approx(rows["eager"]["time_ms"] / fast["time_ms"])


def test_write_results(tmp_path):
    results = _results()
    text, _ = report.write(results, tmp_path)
    assert json.loads((tmp_path / "results.json").read_text())["results"][0]["impl"] == "fast"
    md = (tmp_path / "results.md").read_text()
    assert md.strip() == text.strip()
    assert "| n=32 | wrong | FAILED |" in md and "vs eager" in md and "not run: cuda (no GPU)" in md


def test_readme_table_and_collect(tmp_path):
    out = tmp_path / "out"
    report.write(_results(), out)
    dest = collect.collect(out, root=tmp_path / "results")
    assert (dest / "results.json").exists() and dest.name.startswith(_results()["env"]["date"][:10])
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- perf:start -->\nstale\n<!-- perf:end -->\noutro\n")
    readme_table.update(readme, tmp_path / "results")
    text = readme.read_text()
    assert "stale" not in text and text.startswith("intro\n") and text.endswith("outro\n")
    assert "| toy | n=32 | GB/s | fast:" in text
    readme_table.update(readme, tmp_path / "results")
    assert readme.read_text() == text  # regenerating is idempotent


def test_every_op_builds_tiny_cases_on_cpu():
    for op in cli.OPS:
        assert build_cases(op, torch.device("cpu"), "tiny")


def test_smoke_cli_layernorm(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench", "layernorm", "--quick", "--tiny", "--device", "cpu",
                           "--impls", "torch,eager", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "### layernorm" in proc.stdout and "| torch |" in proc.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    assert {r["impl"] for r in results["results"]} == {"torch", "eager"}
    assert all(r["status"] == "ok" for r in results["results"])


def test_gpu_check_usage():
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "usage" in proc.stderr
    assert subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu_check.sh")]).returncode == 0

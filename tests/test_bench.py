"""The bench suite on CPU: argument parsing, byte/FLOP formulas, result writing, the README
table generator, the correctness gate on real cases (a deliberately wrong kernel gets no time),
the training step of every CPU kernel set, gpu_check.sh against stub tools, and a smoke run of
`python -m bench layernorm` (toy shapes)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import cli, collect, formulas, op_train_step, readme_table, report, runner, timing
from bench.cases import Case, Impl, backend_unavailable, build_cases, check_outputs
from nanolm import flops
from nanolm.ops import layernorm

ROOT = Path(__file__).parent.parent


def test_parse_args_defaults_and_ops():
    args = cli.parse_args(["layernorm", "adamw", "--quick", "--out", "x", "--device", "cpu", "--impls", "torch,eager"])
    assert args.ops == ["layernorm", "adamw"] and args.size == "quick" and args.out == "x"
    assert args.device == "cpu" and args.impls == ["torch", "eager"]
    everything = cli.parse_args([])
    assert everything.ops == list(cli.OPS) and everything.size == "full" and everything.impls == []
    assert cli.parse_args(["--tiny"]).size == "tiny"


@pytest.mark.parametrize("size", ["full", "quick"])
@pytest.mark.parametrize("op", list(cli.OPS))
def test_every_op_has_cpu_shape_sets(op, size):
    """`python -m bench` on a CPU-only machine uses the *_cpu sets: each op must have one."""
    assert build_cases(op, torch.device("cpu"), size)


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
    fwd = flops.attention_flops(2, 12, 1024, 64)
    assert fwd == 4 * 2 * 12 * 1024 ** 2 * 64 / 2
    assert flops.attention_flops(2, 12, 1024, 64, causal=False) == 2 * fwd
    assert flops.attention_flops(2, 12, 1024, 64, "bwd") == 2.5 * fwd
    assert flops.attention_flops(2, 12, 1024, 64, "fwd+bwd") == 3.5 * fwd
    assert flops.linear_cross_entropy_flops(8, 16, 32) == 6 * 8 * 16 * 32
    assert flops.train_flops_per_token(100, 2, 8, 16) == 600 + 6 * 2 * 8 * 16


def test_train_flops_match_what_train_py_logs():
    from nanolm.train import flops_per_token
    cfg = op_train_step.CONFIGS["tiny"]["tiny"]
    model = op_train_step._nanolm_model(cfg, op_train_step.TORCH_IMPLS)
    n_layer, _, n_embd, block_size = cfg[:4]
    assert flops.train_flops_per_token(model.num_params(), n_layer, n_embd, block_size) == flops_per_token(model)


def test_check_outputs_catches_wrong_results():
    ref = (torch.randn(10, 7),)
    check_outputs((ref[0] * (1 + 1e-6),), ref, 1e-4)
    with pytest.raises(AssertionError, match="max error"):
        check_outputs((ref[0] + 0.1,), ref, 1e-4)
    with pytest.raises(AssertionError, match="non-finite"):
        check_outputs((torch.full_like(ref[0], float("nan")),), ref, 1e-4)


def _toy_case(impls):
    x = torch.randn(32, 8)
    return Case(op="toy", name="n=32", dtype=torch.float32, series="s", x=32, metric="GB/s", work=1e6,
                make_inputs=lambda: {"x": x}, reference=lambda t: (t["x"] * 2,), impls=impls, tol=1e-5,
                budget_ms=10)


def _results():
    good = Impl("fast", "nanolm", lambda t: lambda: (t["x"] * 2,))
    wrong = Impl("wrong", "nanolm", lambda t: lambda: (t["x"] * 3,))
    base = Impl("eager", "baseline", lambda t: lambda: (t["x"] + t["x"],))
    rows, skipped = runner.run_case(_toy_case([good, wrong, base]), torch.device("cpu"), log=lambda m: None)
    ceilings = {"memory_GBps": 10.0, "memory_bytes": 1, "matmul_TFLOPs": 1.0,
                "matmul_TFLOPs_by_dtype": {"float32": 1.0}, "matmul_shape": "n"}
    return {"env": cli.environment(torch.device("cpu")), "ceilings": ceilings, "size": "tiny",
            "results": runner.add_derived(rows, ceilings),
            "skipped": skipped + [{"op": "toy", "case": "n=32", "impl": "cuda", "status": "skipped",
                                   "reason": "no GPU"}]}


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


def test_a_baseline_off_the_reference_is_reported_and_fails_nothing(tmp_path, monkeypatch):
    """PyTorch's eager bf16 layernorm backward misses the 2e-2 gate on some CPUs: a finding about
    the baseline (a table row and a note, no plot point), exit 0. A nanolm implementation
    missing it still fails the run."""
    off = Impl("eager", "baseline", lambda t: lambda: (t["x"] * 2.5,))
    good = Impl("fast", "nanolm", lambda t: lambda: (t["x"] * 2,))
    monkeypatch.setattr(cli, "build_cases", lambda op, device, size: [_toy_case([good, off])])
    assert cli.main(["layernorm", "--tiny", "--device", "cpu", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "results.md").read_text()
    assert "| n=32 | eager | misses reference | AssertionError: output 0: max error" in md
    assert "PyTorch's own result misses the float64 reference (eager at n=32)" in md and "FAILED" not in md
    if (tmp_path / "toy_s.png").exists():
        assert [r["impl"] for r in json.loads((tmp_path / "results.json").read_text())["results"]
                if r["status"] == "ok"] == ["fast"]
    wrong = Impl("wrong", "nanolm", lambda t: lambda: (t["x"] * 3,))
    monkeypatch.setattr(cli, "build_cases", lambda op, device, size: [_toy_case([wrong, off])])
    assert cli.main(["layernorm", "--tiny", "--device", "cpu", "--out", str(tmp_path)]) == 1


def test_tflops_rows_are_held_to_the_matmul_ceiling_of_their_dtype():
    ceilings = timing.measure_ceilings(torch.device("cpu"), toy=True, dtypes=(torch.bfloat16,))
    assert set(ceilings["matmul_TFLOPs_by_dtype"]) == {"float32", "bfloat16"}
    rows = [{"op": "attention", "case": f"c {d}", "impl": "cpu", "kind": "nanolm", "metric": "TFLOP/s",
             "dtype": d, "status": "ok", "value": 2.0, "time_ms": 1.0} for d in ("float32", "bfloat16", "float16")]
    runner.add_derived(rows, {"memory_GBps": 10.0, "matmul_TFLOPs_by_dtype": {"float32": 1.0, "bfloat16": 8.0}})
    assert [r["pct_ceiling"] for r in rows] == [200.0, 25.0, None]  # fp16: no ceiling measured
    table = report.op_table("attention", rows, [])
    assert "| c bfloat16 | cpu | 1.000 | 2 | 25% |" in table and "| c float16 | cpu | 1.000 | 2 | - |" in table


def test_write_results_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    text, plots = report.write(_results(), tmp_path)
    assert isinstance(plots, str) and "matplotlib is not installed" in plots
    assert (tmp_path / "results.json").exists() and not list(tmp_path.glob("*.png"))


def test_cpu_peak_memory_counts_the_call_allocations():
    n = 1 << 20  # 4 MiB of float32, twice: the input's copy and the result
    peak = timing.peak_memory_bytes(lambda: torch.ones(n) * 2, torch.device("cpu"))
    assert 8 * n <= peak < 16 * n


def test_triton_on_cpu_is_not_timed(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "meaningless" in backend_unavailable("triton", "layernorm", torch.device("cpu"))
    assert backend_unavailable("torch", "layernorm", torch.device("cpu")) is None


# linear_cross_entropy is left out: the same cross-entropy kernels, at 0.5 s a call emulated
@pytest.mark.cuda_sim
@pytest.mark.parametrize("op", ["layernorm", "attention", "cross_entropy", "adamw"])
def test_cuda_sim_runs_through_the_correctness_gate_when_named(op, one_thread):
    """The emulated CUDA kernels pass the bench's float64 check in every tiny case of an op that
    cuda_sim has a kernel for, and their rows say "emulated"."""
    ran = 0
    for case in build_cases(op, torch.device("cpu"), "tiny"):
        case.budget_ms = 1  # the check is the point here, not the emulation's time
        rows, skipped = runner.run_case(case, torch.device("cpu"), ["cuda_sim"], log=lambda m: None)
        assert all(r["status"] == "ok" and r["kind"] == "emulated" and "time_ms" in r for r in rows), rows
        assert len(rows) + len(skipped) == 1
        ran += len(rows)
    assert ran >= 1


@pytest.mark.cuda_sim
def test_cuda_sim_is_left_out_unless_named(one_thread):
    (case,) = build_cases("adamw", torch.device("cpu"), "tiny")
    case.budget_ms = 1
    rows, skipped = runner.run_case(case, torch.device("cpu"), log=lambda m: None)
    assert "cuda_sim" in {i.name for i in case.impls} and "cuda_sim" not in {r["impl"] for r in rows}
    assert any(s["impl"] == "cuda_sim" and "only when named" in s["reason"] for s in skipped)
    assert all(r["kind"] != "emulated" for r in rows)


@pytest.mark.cuda_sim
def test_cuda_sim_wrong_output_fails_the_gate(one_thread):
    case = build_cases("layernorm", torch.device("cpu"), "tiny")[0]  # fwd
    sim = next(i for i in case.impls if i.name == "cuda_sim")
    case.impls = [Impl("cuda_sim", "emulated", lambda t: (lambda run: lambda: tuple(y * 1.001 for y in run()))(
        sim.make(t)))]
    (row,), _ = runner.run_case(case, torch.device("cpu"), ["cuda_sim"], log=lambda m: None)
    assert row["status"] == "FAILED" and "max error" in row["error"] and "time_ms" not in row


@pytest.fixture
def one_thread():
    """Toy shapes gain nothing from threads, and on a shared machine OpenMP barriers dominate."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_wrong_op_kernel_fails_and_gets_no_time(one_thread):
    case = build_cases("layernorm", torch.device("cpu"), "tiny")[0]  # fwd
    case.impls = [Impl("torch", "nanolm", case.impls[0].make), Impl("wrong", "nanolm", lambda t: lambda: (
        layernorm.layer_norm_fwd(t["x"], t["w"], t["b"], 1e-5)[0] * 1.001,))]
    rows = {r["impl"]: r for r in runner.run_case(case, torch.device("cpu"), log=lambda m: None)[0]}
    assert rows["torch"]["status"] == "ok"
    assert rows["wrong"]["status"] == "FAILED" and "time_ms" not in rows["wrong"]


def test_train_step_wrong_backward_kernel_fails(one_thread, monkeypatch):
    """A layernorm backward off by 10% (the torch backend's, patched) leaves the loss exact but
    moves the gradient norm."""
    def bad_bwd(*args):
        dx, dw, db = layernorm.layer_norm_bwd(*args)
        return dx * 0.9, dw, db
    monkeypatch.setitem(layernorm.BACKENDS, "torch", layernorm.BACKENDS["torch"]._replace(layer_norm_bwd=bad_bwd))
    impls = op_train_step.TORCH_IMPLS
    case = build_cases("train_step", torch.device("cpu"), "tiny")[0]
    cfg = op_train_step.CONFIGS["tiny"]["tiny"]
    case.impls = [Impl("wrong", "nanolm", op_train_step.nanolm_impl(cfg, torch.device("cpu"), impls))]
    (row,), _ = runner.run_case(case, torch.device("cpu"), log=lambda m: None)
    assert row["status"] == "FAILED" and "output 1" in row["error"] and "time_ms" not in row


def test_smoke_cli_every_op_every_cpu_backend(tmp_path):
    """`python -m bench` end to end at toy sizes: every op, every backend the bench runs on CPU,
    every baseline, all past their correctness check; tables, JSON and plots written."""
    env = dict(os.environ, OMP_NUM_THREADS="1")  # toy shapes: threads only add contention
    proc = subprocess.run([sys.executable, "-m", "bench", "--tiny", "--device", "cpu", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    rows, skipped = results["results"], results["skipped"]
    assert all(r["status"] == "ok" for r in rows), [r for r in rows if r["status"] != "ok"]
    cpu_built = backend_unavailable("cpu", "layernorm", torch.device("cpu")) is None
    for op in cli.OPS:
        impls = {r["impl"] for r in rows if r["op"] == op}
        if op == "recompute":  # the auto kernel set, one row per mode
            assert impls == {"recompute=none", "recompute=mlp", "recompute=block"}
        else:
            name = "nanolm[{}]" if op == "train_step" else "{}"
            assert name.format("torch") in impls and (name.format("cpu") in impls or not cpu_built), (op, impls)
        assert any(r["kind"] == "baseline" for r in rows if r["op"] == op), op
        assert f"### {op}" in proc.stdout
    step = [r for r in rows if r["op"] == "train_step"]
    assert all(r["tokens_per_s"] > 0 and r["peak_mem_bytes"] > 0 for r in step)
    reasons = {(s["op"], s["impl"]): s["reason"] for s in skipped}
    assert ("train_step", "torch.compile") in reasons and ("layernorm", "torch.compile") in reasons
    assert ("train_step", "nanolm[cuda]") in reasons
    if "matplotlib is not installed" not in proc.stderr:
        assert len(list(tmp_path.glob("*.png"))) == len({(r["op"], r["series"]) for r in rows})


def test_gpu_check_usage():
    for argv in ([], ["a", "b"], ["a", "tests", "c"]):
        proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), *argv], capture_output=True,
                              text=True, timeout=30)
        assert proc.returncode == 2 and "usage" in proc.stderr
    assert subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu_check.sh")]).returncode == 0


# Stands in for python3, nvidia-smi, nvcc and compute-sanitizer: logs each call (with the
# environment the check promises: NANOLM_CUDA_ARCHS, NANOLM_GIT_COMMIT, PYTHONPATH), fails the
# step named in STUB_FAIL, and writes results.json for `-m bench`. pytest "collects" tests only
# for a -k selection (the sanitizer steps), as with no GPU-marked tests otherwise.
STUB_PYTHON = r"""#!/usr/bin/env bash
echo "python $* | archs=$NANOLM_CUDA_ARCHS commit=$NANOLM_GIT_COMMIT pythonpath=${PYTHONPATH:-}" >> "$STUB_LOG"
case "$*" in
  *"pip install"*) [ "$STUB_FAIL" = pip ] && exit 1; exit 0 ;;
  *"build_ext"*) exit 0 ;;
  "-c "*) echo "torch: stub"; exit 0 ;;
  *"-m pytest"*" -k "*) exit 0 ;;
  *"-m pytest"*) [ "$STUB_FAIL" = pytest ] && exit 1; exit 5 ;;
  *"-m bench"*) [ "$STUB_FAIL" = bench ] && sleep 30
    args="$*"; out=${args##*--out }; echo '{"results": []}' > "$out/results.json"; exit 0 ;;
  *) exit 0 ;;
esac
"""


STUB_SANITIZER = r"""#!/usr/bin/env bash
echo "compute-sanitizer $*" >> "$STUB_LOG"
while [[ $1 == --* ]]; do shift 2; done
exec "$@"
"""


def _gpu_check(tmp_path, fail="", budget="450", mode=()):
    repo = tmp_path / "repo"
    for d in ("bench", "nanolm", "kernels", "stubs"):
        (repo / d).mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "bench" / "gpu_check.sh", repo / "bench")
    stubs = repo / "stubs"
    (stubs / "python").write_text(STUB_PYTHON)
    (stubs / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA H100 80GB HBM3, 580.00, 81559 MiB'\n")
    (stubs / "nvcc").write_text("#!/bin/sh\necho 'Build cuda_13.0'\n")
    (stubs / "compute-sanitizer").write_text(STUB_SANITIZER)
    for f in stubs.iterdir():
        f.chmod(0o755)
    env = dict(os.environ, PATH=f"{stubs}:{os.environ['PATH']}", PYTHON=str(stubs / "python"),
               STUB_LOG=str(tmp_path / "calls.log"), STUB_FAIL=fail, NANOLM_GIT_COMMIT="abc1234",
               NANOLM_CHECK_BUDGET_S=budget)
    env.pop("NANOLM_CUDA_ARCHS", None)
    env.pop("PYTHONPATH", None)
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(repo / "bench" / "gpu_check.sh"), str(out), *mode], capture_output=True,
                          text=True, timeout=60, env=env)
    return proc, out, (tmp_path / "calls.log").read_text(), repo


def test_gpu_check_runs_every_step_and_writes_results(tmp_path):
    proc, out, calls, _ = _gpu_check(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "pip install --no-build-isolation --no-deps -e . | archs=90a commit=abc1234" in calls
    assert "-m pytest -m gpu -q tests" in calls and f"-m bench --quick --out {out}" in calls
    env = (out / "env.txt").read_text()
    assert "git_commit: abc1234" in env and "gpu: NVIDIA H100 80GB HBM3, 580.00" in env
    assert json.loads((out / "results.json").read_text()) == {"results": []}
    steps = (out / "steps.log").read_text()
    for name in ("env", "nvidia-smi", "build", "info", "pytest-gpu", "memcheck", "racecheck", "bench"):
        assert (out / f"{name}.log").exists() and f"== {name} " in steps
    assert "compute-sanitizer --tool memcheck --error-exitcode 1" in calls
    assert "compute-sanitizer --tool racecheck" in calls


@pytest.mark.parametrize("mode,runs,skips", [("tests", "pytest-gpu", "bench"), ("bench", "bench", "pytest-gpu")])
def test_gpu_check_modes(tmp_path, mode, runs, skips):
    """`tests` and `bench` split the check into two commands that each fit a 10-minute limit."""
    proc, out, calls, _ = _gpu_check(tmp_path, mode=(mode,))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = (out / "steps.log").read_text()
    assert f"== {runs} " in steps and f"== {skips} " not in steps and "== build " in steps


def test_gpu_check_falls_back_to_an_inplace_build(tmp_path):
    proc, out, calls, repo = _gpu_check(tmp_path, fail="pip")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "falling back" in (out / "build.log").read_text() and "setup.py build_ext --inplace" in calls
    assert f"-m bench --quick --out {out} | archs=90a commit=abc1234 pythonpath={repo}" in calls
    assert not (repo / "nanolm" / "kernels").exists()  # the temporary link is removed


def test_gpu_check_reports_failures_and_enforces_its_time_budget(tmp_path):
    proc, out, _, _ = _gpu_check(tmp_path, fail="pytest")
    assert proc.returncode == 1 and "FAILED steps: pytest-gpu" in proc.stdout
    assert (out / "results.json").exists()  # later steps still ran
    proc, out, _, _ = _gpu_check(tmp_path / "slow", fail="bench", budget="3")
    assert proc.returncode == 1 and "FAILED steps: bench" in proc.stdout
    assert "killed at its time limit" in (out / "steps.log").read_text()

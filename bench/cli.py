"""`python -m bench [op ...] [--quick] [--out DIR] [--device cuda|cpu] [--impls a,b] [--cases s,t]`;
`python -m bench comm ...` for collective bandwidth and multi-GPU projections (bench/comm.py);
`python -m bench static ...` for the compiled kernels' registers, spills, shared memory and SASS
(bench/static.py); `python -m bench speedrun ...` for the time to a target val loss (bench/speedrun.py)."""
import argparse
import datetime
import os
import platform
import subprocess
import sys

import torch

from bench import report, runner, timing
from bench.cases import OPS, build_cases, op_dtypes


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("ops", nargs="*", choices=[[]] + list(OPS), metavar="op",
                   help=f"ops to run (default: all): {', '.join(OPS)}")
    p.add_argument("--quick", action="store_true", help="the small shape set (< 5 min)")
    p.add_argument("--out", default="bench_out", help="folder for results.json, results.md, plots")
    p.add_argument("--device", choices=("cuda", "cpu"),
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--impls", default="", help="comma-separated implementation names to run (default: all)")
    p.add_argument("--cases", default="", help="comma-separated substrings: run only the cases whose name "
                                              "holds one of them (e.g. 'bf16')")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # tests: toy shapes
    args = p.parse_args(argv)
    args.ops = args.ops or list(OPS)
    args.size = "tiny" if args.tiny else ("quick" if args.quick else "full")
    args.impls = [s for s in args.impls.split(",") if s]
    args.cases = [s for s in args.cases.split(",") if s]
    return args


def _git_commit():
    """NANOLM_GIT_COMMIT if set (a checkout copied without .git, as on the GPU machine), else git's."""
    if os.environ.get("NANOLM_GIT_COMMIT"):
        return os.environ["NANOLM_GIT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _nvidia_driver():
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, check=True, timeout=30).stdout
        return out.splitlines()[0].strip()
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown"


def environment(device):
    env = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "git_commit": _git_commit(), "torch": torch.__version__, "python": platform.python_version(),
           "device": device.type}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        env["driver"] = _nvidia_driver()
    else:
        env["device_name"] = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
        # other jobs on the cores stall torch's OpenMP barriers: CPU times are only as good as this
        env["load_avg_1min"], env["cpu_count"] = round(os.getloadavg()[0], 2), os.cpu_count()
    return env


def check_impls(impls, cases):
    """Every --impls name must be an implementation (run or skipped here) of some chosen op."""
    known = {op: sorted({i.name for c in op_cases for i in c.impls} | {n for c in op_cases for n in c.skipped})
             for op, op_cases in cases.items()}
    unknown = [name for name in impls if not any(name in names for names in known.values())]
    if unknown:
        sys.exit(f"error: --impls: no {', '.join(cases)} implementation named {unknown[0]!r}; known: "
                 + "; ".join(f"{op}: {', '.join(names)}" for op, names in known.items()))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["comm"]:  # its own arguments and process model (torchrun): see bench/comm.py
        from bench import comm
        return comm.main(argv[1:])
    if argv[:1] == ["static"]:  # compiles for sm_80/sm_90a, runs nothing: see bench/static.py
        from bench import static
        return static.main(argv[1:])
    if argv[:1] == ["speedrun"]:  # whole training runs, one process each: see bench/speedrun.py
        from bench import speedrun
        return speedrun.main(argv[1:])
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: CUDA is not available")
    torch.manual_seed(0)
    cases = {op: build_cases(op, device, args.size) for op in args.ops}
    check_impls(args.impls, cases)
    rows, skipped, env = [], [], environment(device)
    if device.type == "cpu":
        env["malloc_reuses_freed_memory"] = timing.reuse_freed_cpu_memory()
    ceilings = timing.measure_ceilings(device, toy=args.size == "tiny", dtypes=op_dtypes(device))
    matmul = ", ".join(f"{d} {v:.2f}" for d, v in ceilings["matmul_TFLOPs_by_dtype"].items())
    print(f"ceilings: memory {ceilings['memory_GBps']:.0f} GB/s, matmul TFLOP/s {matmul}", file=sys.stderr)
    for op in args.ops:
        for case in cases[op]:
            if args.cases and not any(c in case.name for c in args.cases):
                continue
            if args.size == "tiny":
                case.budget_ms = 10  # the tests' toy shapes: what matters is that every case runs
            r, s = runner.run_case(case, device, args.impls, log=lambda m: print(m, file=sys.stderr, flush=True))
            rows += r
            skipped += s
        # after every op, so a run killed by a time limit still leaves what it measured
        results = {"env": env, "ceilings": ceilings, "size": args.size,
                   "results": runner.add_derived(rows, ceilings), "skipped": skipped}
        report.write(results, args.out, plots=False)
    text, plots = report.write(results, args.out)
    print(text)
    print(plots if isinstance(plots, str) else f"wrote {len(plots)} plots to {args.out}", file=sys.stderr)
    off = [r for r in rows if r["status"] == runner.OFF_REFERENCE]
    if off:
        print(f"{len(off)} PyTorch baseline row(s) miss the float64 reference (listed under their tables, "
              "not timed): PyTorch's numerics, not a nanolm failure", file=sys.stderr)
    return 1 if runner.failed_nanolm(rows) else 0

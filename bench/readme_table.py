"""`python -m bench.readme_table [README]`: regenerate the performance table between
<!-- perf:start --> and <!-- perf:end --> in README.md from bench/results/*/results.json,
never typed by hand. Per results folder and case: the fastest nanolm backend against the
fastest PyTorch baseline."""
import json
import sys
from pathlib import Path

from bench.report import matmul_ceilings

ROOT = Path(__file__).parent.parent
START, END = "<!-- perf:start -->", "<!-- perf:end -->"


def _best(rows, kind):
    ok = [r for r in rows if r["kind"] == kind and r["status"] == "ok"]
    return min(ok, key=lambda r: r["time_ms"]) if ok else None


def _cell(r):
    if r is None:
        return "-"
    pct = "-" if r.get("pct_ceiling") is None else f"{r['pct_ceiling']:.0f}%"
    return f"{r['impl']}: {r['value']:.4g} ({pct})"


def table(results, source):
    env, c = results["env"], results["ceilings"]
    driver = f", driver {env['driver']}, CUDA {env['cuda']}" if env.get("driver") else ""
    lines = [f"**{env['device_name']}**{driver}, {env['date']}, commit {env['git_commit']}, torch {env['torch']}, "
             f"triton {env['triton']}, {results['size']} shape set ([{source}]({source})). "
             f"Ceilings: memory {c['memory_GBps']:.0f} GB/s, matmul TFLOP/s {matmul_ceilings(c)}.", "",
             "| op | case | unit | best nanolm (% ceiling) | best PyTorch (% ceiling) | speedup |",
             "|---|---|---|---|---|---|"]
    rows = results["results"]
    for op, case in dict.fromkeys((r["op"], r["case"]) for r in rows):
        group = [r for r in rows if r["op"] == op and r["case"] == case]
        ours, theirs = _best(group, "nanolm"), _best(group, "baseline")
        speed = f"{theirs['time_ms'] / ours['time_ms']:.2f}x" if ours and theirs else "-"
        lines.append(f"| {op} | {case} | {group[0]['metric']} | {_cell(ours)} | {_cell(theirs)} | {speed} |")
    return "\n".join(lines)


def render(results_root):
    files = sorted(Path(results_root).glob("*/results.json"))
    if not files:
        return "No committed results yet: run bench/gpu_check.sh, then `python -m bench.collect OUT_DIR`."
    parts = []
    for f in files:
        parts.append(table(json.loads(f.read_text()), f.parent.relative_to(ROOT).as_posix()
                           if f.is_relative_to(ROOT) else f.parent.as_posix()))
    return "\n\n".join(parts)


def update(readme, results_root):
    text = Path(readme).read_text() if Path(readme).exists() else ""
    if START not in text or END not in text:
        raise SystemExit(f"{readme}: markers {START} ... {END} not found")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    Path(readme).write_text(f"{head}{START}\n{render(results_root)}\n{END}{tail}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    readme = argv[0] if argv else ROOT / "README.md"
    update(readme, ROOT / "bench" / "results")
    print(f"updated {readme}")


if __name__ == "__main__":
    main()

"""Writes results: a markdown table per op (stdout and results.md), results.json, and one PNG
per (op, series) of GB/s or TFLOP/s against size with a line per implementation. A PyTorch
baseline that missed the reference (runner.OFF_REFERENCE) has a table row and a note, no point
in a plot."""
import json
from pathlib import Path

from bench.runner import OFF_REFERENCE


def _mem(b):
    return "-" if b is None else f"{b / 2**20:.0f} MiB"


def _mfu(r):
    if "mfu_pct" in r:
        return f", MFU {r['mfu_pct']:.1f}% of the {r['peak_tflops']:.0f} TFLOP/s datasheet peak"
    return ", MFU - (no datasheet peak known for this device; % ceiling is of the measured matmul)"


def _pct(row):
    return "-" if row.get("pct_ceiling") is None else f"{row['pct_ceiling']:.0f}%"


def matmul_ceilings(c):
    """'0.19 (float32), 0.87 (bfloat16)' from a results file's ceilings (older files: fp32 only)."""
    by_dtype = c.get("matmul_TFLOPs_by_dtype") or {c["matmul_shape"].split()[-1]: c["matmul_TFLOPs"]}
    return ", ".join(f"{v:.2f} ({d})" for d, v in by_dtype.items())


def _label(row):
    """The implementation's name; an emulated one (bench/cases.py EMULATED) says so."""
    return f"{row['impl']} (emulated)" if row["kind"] == "emulated" else row["impl"]


def op_table(op, rows, skipped):
    baselines = list(dict.fromkeys(r["impl"] for r in rows if r["kind"] == "baseline" and r["status"] == "ok"))
    metric = rows[0]["metric"] if rows else ""
    head = ["case", "impl", "median ms", metric, "% ceiling", "peak mem"] + [f"vs {b}" for b in baselines]
    lines = [f"### {op}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r["status"] != "ok":
            cells = [r["case"], r["impl"], r["status"], r["error"].replace("|", "/")] + [""] * (len(head) - 4)
        else:
            cells = [r["case"], _label(r), f"{r['time_ms']:.3f}", f"{r['value']:.4g}", _pct(r),
                     _mem(r.get("peak_mem_bytes"))]
            cells += [f"{r['speedup'][b]:.2f}x" if b in r["speedup"] else "" for b in baselines]
        lines.append("| " + " | ".join(cells) + " |")
    extra = [f"{r['impl']}: {r['tokens_per_s']:,.0f} tokens/s{_mfu(r)} ({r['case']})" for r in rows
             if r["status"] == "ok" and "tokens_per_s" in r]
    reasons = {(s["impl"], s["reason"]) for s in skipped}
    off = [f"{r['impl']} at {r['case']}" for r in rows if r["status"] == OFF_REFERENCE]
    notes = [f"- {n}" for n in extra] + [f"- not run: {impl} ({why})" for impl, why in sorted(reasons)]
    if off:
        notes.append(f"- PyTorch's own result misses the float64 reference ({'; '.join(off)}): a finding "
                     "about the baseline, listed here but not timed or plotted; it fails nothing")
    return "\n".join(lines + ([""] + notes if notes else []))


def markdown(results):
    env, c = results["env"], results["ceilings"]
    lines = [f"## nanolm bench: {env['device_name']} ({env['date']}, commit {env['git_commit']})", "",
             f"Ceilings measured here: memory {c['memory_GBps']:.0f} GB/s (read + write), "
             f"matmul TFLOP/s {matmul_ceilings(c)} at {c['matmul_shape'].split()[0]}. % ceiling is of these, "
             "a TFLOP/s row against the matmul rate of its own dtype "
             "(for train_step: model FLOPs against the measured matmul rate; MFU against the datasheet "
             "peak is listed under its table).", ""]
    if "load_avg_1min" in env:
        lines[-1:-1] = ["", f"Load average at start: {env['load_avg_1min']} on {env['cpu_count']} cores "
                        "(other jobs on the cores make CPU times noisy)."]
    if env.get("malloc_reuses_freed_memory"):
        lines[-1:-1] = ["", "glibc malloc keeps freed blocks for reuse (bench/timing.py, "
                        "reuse_freed_cpu_memory), so no implementation pays page faults for fresh outputs."]
    for op in dict.fromkeys(r["op"] for r in results["results"] + results["skipped"]):
        rows = [r for r in results["results"] if r["op"] == op]
        lines += [op_table(op, rows, [s for s in results["skipped"] if s["op"] == op]), ""]
    return "\n".join(lines)


def plot(results, out_dir):
    """One PNG per (op, series); returns the paths, or a note when matplotlib is absent."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plots skipped: matplotlib is not installed (pip install matplotlib)"
    paths = []
    ok = [r for r in results["results"] if r["status"] == "ok"]
    for op, series in dict.fromkeys((r["op"], r["series"]) for r in ok):
        rows = [r for r in ok if r["op"] == op and r["series"] == series]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for impl in dict.fromkeys(_label(r) for r in rows):
            pts = sorted((r["x"], r["value"]) for r in rows if _label(r) == impl)
            ax.plot(*zip(*pts), marker="o", label=impl)
        ax.set(xscale="log", xlabel=rows[0].get("x_label", "size"), ylabel=rows[0]["metric"], title=f"{op} {series}")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        path = Path(out_dir) / f"{op}_{series}.png".replace(" ", "_").replace("/", "_").replace("=", "")
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        paths.append(str(path))
    return paths


def write(results, out_dir, plots=True):
    """Writes results.md and results.json (and the plots); returns (markdown, plot paths or a
    note why there are none)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = markdown(results)
    (out_dir / "results.md").write_text(text + "\n")
    (out_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    return text, plot(results, out_dir) if plots else []

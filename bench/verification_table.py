"""`python -m bench.verification_table [--static DIR] [README]`: regenerate the per-kernel
verification tables between <!-- verification:start --> and <!-- verification:end --> in
README.md from nanolm/verification.json (which `python -m nanolm.info` and `auto` read too),
never typed by hand. Record a GPU run in the JSON, then run this; after a full `python -m bench
static`, `--static bench/results/<date>-static` first writes each Triton kernel's compile
summary from its static.json into the JSON."""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
START, END = "<!-- verification:start -->", "<!-- verification:end -->"


def static_summary(rows, kernel):
    """'sm_80: 24 configs (8 production), spilling: 0 production, 2 other (up to 104 B); sm_90a: ...'
    for kernel, from a static.json's rows."""
    parts = []
    for arch in sorted({r["arch"] for r in rows if r["kernel"] == kernel}):
        mine = [r for r in rows if r["kernel"] == kernel and r["arch"] == arch]
        failed = sum(r["status"] != "ok" for r in mine)
        spills = [r for r in mine if r["status"] == "ok" and r["spill_stores"]]
        production = sum(r["production"] for r in spills)
        plural = "s" if len(mine) != 1 else ""
        text = (f"{arch}: {len(mine)} config{plural} ({sum(r['production'] for r in mine)} production), spilling: "
                f"{production} production, {len(spills) - production} other")
        if spills:
            text += f" (up to {max(r['spill_stores'] for r in spills)} B)"
        parts.append(text + (f", {failed} fail to compile" if failed else ""))
    return "; ".join(parts) or "not in the report"


def with_static_report(data, report_dir):
    """data with each Triton kernel's `compiled` summary read from report_dir/static.json."""
    rows = [r for r in json.loads((Path(report_dir) / "static.json").read_text())["rows"] if r["kind"] == "triton"]
    for kernels in data["triton"].values():
        for kernel, record in kernels.items():
            record["compiled"] = static_summary(rows, kernel)
    data["static_report"] = str(Path(report_dir).relative_to(ROOT))
    return data


def render(data):
    lines = ["For triton, per kernel:", "",
             "| kernel (kernels/) | interpreted in CI (fp32, CPU) "
             f"| compiled (`python -m bench static`, {data['static_report']}) | run on a GPU |",
             "|---|---|---|---|"]
    for kernels in data["triton"].values():
        for kernel, record in kernels.items():
            lines.append(f"| {kernel} | {', '.join(record['tests'])} | {record['compiled']} | "
                         f"{record['gpu_run'] or 'never'} |")
    lines += ["", "For cuda, per kernel:", "",
              "| kernel (csrc/) | emulated in CI (cuda_sim) | compiled | run on a GPU |", "|---|---|---|---|"]
    for kernels in data["cuda"].values():
        for kernel, record in kernels.items():
            lines.append(f"| {kernel} | {record['emulated']} | sm_80, sm_90a | {record['gpu_run'] or 'never'} |")
    return "\n".join(lines)


def update(readme, data):
    text = Path(readme).read_text()
    if START not in text or END not in text:
        sys.exit(f"error: {readme} has no {START} ... {END} section")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    Path(readme).write_text(f"{head}{START}\n{render(data)}\n{END}{tail}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    source = ROOT / "nanolm" / "verification.json"
    data = json.loads(source.read_text())
    if argv[:1] == ["--static"]:
        data = with_static_report(data, (Path.cwd() / argv[1]).resolve())
        source.write_text(json.dumps(data, indent=2) + "\n")
        argv = argv[2:]
    update(Path(argv[0]) if argv else ROOT / "README.md", data)


if __name__ == "__main__":
    main()

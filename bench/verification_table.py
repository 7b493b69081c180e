"""`python -m bench.verification_table [README]`: regenerate the per-kernel verification tables
between <!-- verification:start --> and <!-- verification:end --> in README.md from
nanolm/verification.json (which `python -m nanolm.info` and `auto` read too), never typed by
hand. Record a GPU run in the JSON, then run this."""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
START, END = "<!-- verification:start -->", "<!-- verification:end -->"


def render(data):
    compiled = f"sm_90a gate in CI; sm_80 + sm_90a report ({data['static_report']})"
    lines = ["For triton, per kernel:", "",
             "| kernel (kernels/) | interpreted in CI (fp32, CPU) | compiled (`python -m bench static`) "
             "| run on a GPU |",
             "|---|---|---|---|"]
    for kernels in data["triton"].values():
        for kernel, record in kernels.items():
            lines.append(f"| {kernel} | {', '.join(record['tests'])} | {compiled} | {record['gpu_run'] or 'never'} |")
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
    argv = sys.argv[1:] if argv is None else argv
    readme = Path(argv[0]) if argv else ROOT / "README.md"
    update(readme, json.loads((ROOT / "nanolm" / "verification.json").read_text()))


if __name__ == "__main__":
    main()

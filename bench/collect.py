"""`python -m bench.collect OUT_DIR`: copy a results folder (from gpu_check.sh or `python -m
bench --out`) into bench/results/<date>-<device>/ for committing, then regenerate the README
performance table from everything under bench/results/."""
import json
import re
import shutil
import sys
from pathlib import Path

from bench import readme_table

RESULTS = Path(__file__).parent / "results"
KEEP = ("*.json", "*.md", "*.png", "*.log", "env.txt")


def destination(results, root=RESULTS):
    env = results["env"]
    device = re.sub(r"[^a-z0-9]+", "-", env["device_name"].lower()).strip("-")
    return root / f"{env['date'][:10]}-{device}"


def collect(out_dir, root=RESULTS):
    out_dir = Path(out_dir)
    results = json.loads((out_dir / "results.json").read_text())
    dest = destination(results, root)
    dest.mkdir(parents=True, exist_ok=True)
    for pattern in KEEP:
        for f in out_dir.glob(pattern):
            shutil.copy2(f, dest / f.name)
    return dest


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        sys.exit("usage: python -m bench.collect OUT_DIR")
    dest = collect(argv[0])
    print(f"copied to {dest}")
    readme_table.main([])


if __name__ == "__main__":
    main()

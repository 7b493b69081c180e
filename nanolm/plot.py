"""Plot one or more runs' metrics.jsonl: loss vs step, loss vs tokens, tokens/s vs step.

    python -m nanolm.plot RUN_DIR [RUN_DIR ...] [--out PNG]

Each run gets one colour: training loss as a line, validation loss as dots joined by a dashed
line. Needs the optional extra: pip install 'nanolm[plot]'.
"""
import argparse
import os
import sys

from nanolm.config import cli
from nanolm.metrics import read_metrics


def _series(records, kind, x, y):
    pts = [(r[x], r[y]) for r in records if r.get("kind") == kind and x in r and y in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_runs(run_dirs, out):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import EngFormatter
    except ImportError:
        raise ImportError("python -m nanolm.plot needs matplotlib: pip install 'nanolm[plot]'") from None
    runs = [read_metrics(run) for run in run_dirs]  # every run read before any drawing
    fig, (ax_step, ax_tok, ax_speed) = plt.subplots(1, 3, figsize=(16, 4.5))
    for i, (run, records) in enumerate(zip(run_dirs, runs)):
        color = f"C{i % 10}"
        name = os.path.basename(os.path.normpath(run))
        for ax, x in ((ax_step, "step"), (ax_tok, "tokens")):
            ax.plot(*_series(records, "train", x, "loss"), color=color, lw=1,
                    label=f"{name} train")
            ax.plot(*_series(records, "eval", x, "val_loss"), color=color, ls="--", marker="o",
                    ms=3, label=f"{name} val")
        ax_speed.plot(*_series(records, "train", "step", "tokens_per_s"), color=color,
                      label=name)
    for ax, xlabel, ylabel in ((ax_step, "step", "loss"), (ax_tok, "tokens", "loss"),
                               (ax_speed, "step", "tokens/s")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax_tok.xaxis.set_major_formatter(EngFormatter())  # 800k, not 800000 colliding labels
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv=None):
    cli(run_cli, sys.argv[1:] if argv is None else argv, (ImportError,))


def run_cli(argv):
    p = argparse.ArgumentParser(prog="python -m nanolm.plot")
    p.add_argument("runs", nargs="+", help="run directories holding metrics.jsonl")
    p.add_argument("--out", help="PNG path (default: RUN_DIR/metrics.png of the first run)")
    args = p.parse_args(argv)
    out = args.out or os.path.join(args.runs[0], "metrics.png")
    print(plot_runs(args.runs, out))


if __name__ == "__main__":
    main()

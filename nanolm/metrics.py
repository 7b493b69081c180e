"""A run's record: `config.json` (the resolved config) and `metrics.jsonl` in the run dir.

metrics.jsonl holds one JSON object per line, appended and flushed as the run goes:
    {"kind": "train", "step": 100, "tokens": 819200, "loss": 3.21, "lr": 6e-4,
     "tokens_per_s": 51234.0, "time": 12.3}          # one per log interval
    {"kind": "eval", "step": 250, "tokens": 2048000, "val_loss": 3.05, "val_ppl": 21.1,
     "time": 30.1}                                     # val_ppl = exp(val_loss)
"kind", "step" and "time" (seconds since the writer opened, plus any resumed offset) are
written by the writer; the rest is whatever the caller logs. `nanolm.plot` reads "loss",
"val_loss", "tokens" and "tokens_per_s".

A process killed (or a disk filling up) mid-append leaves a torn last line: readers drop it.
The resume rewrite goes to a temp file renamed over the old one, so it never tears the file.
"""
import json
import math
import os
import time
from pathlib import Path


def perplexity(loss):
    """exp(loss), inf where that exceeds a float (a finite loss above ~709.78 nats, as a
    diverging run's reaches): math.exp would raise OverflowError and end the run unsaved."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def replace_text(path, text):
    """Write `text` to a temp file beside `path` and rename it over `path`: a reader, or a
    crash, sees the old file or the new one, never half of it."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_config(run_dir, config):
    replace_text(Path(run_dir) / "config.json",
                 json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")


def read_metrics(run_dir):
    """The records of run_dir/metrics.jsonl; a torn last line is dropped, any other line that
    is not JSON raises ValueError naming it."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}")
    lines = path.read_text().splitlines()
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if n < len(lines):  # the last line may be an append cut short
                raise ValueError(f"{path}:{n}: not JSON ({e})") from None
    return records


class MetricsWriter:
    """Appends records to run_dir/metrics.jsonl. On resume from step S, records after S (from
    the interrupted run, to be re-done) are dropped first, so each step appears once."""

    def __init__(self, run_dir, config, resume_step=None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_config(self.run_dir, config)
        path = self.run_dir / "metrics.jsonl"
        self.time_offset = 0.0
        if resume_step is not None and path.exists():
            kept = [r for r in read_metrics(self.run_dir) if r["step"] <= resume_step]
            self.time_offset = max((r.get("time", 0.0) for r in kept), default=0.0)
            replace_text(path, "".join(json.dumps(r) + "\n" for r in kept))
        self.file = open(path, "a" if resume_step is not None else "w")
        self.start = time.time()

    def log(self, kind, step, **values):
        record = {"kind": kind, "step": step,
                  "time": round(self.time_offset + time.time() - self.start, 3), **values}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        return record

    def close(self):
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

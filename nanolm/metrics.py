"""A run's record: `config.json` (the resolved config) and `metrics.jsonl` in the run dir.

metrics.jsonl holds one JSON object per line, appended and flushed as the run goes:
    {"kind": "train", "step": 100, "tokens": 819200, "loss": 3.21, "lr": 6e-4,
     "tokens_per_s": 51234.0, "time": 12.3}          # one per log interval
    {"kind": "eval", "step": 250, "tokens": 2048000, "val_loss": 3.05, "val_ppl": 21.1,
     "time": 30.1}                                     # val_ppl = exp(val_loss)
"kind", "step" and "time" (seconds since the writer opened, plus any resumed offset) are
written by the writer; the rest is whatever the caller logs. `nanolm.plot` reads "loss",
"val_loss", "tokens" and "tokens_per_s".
"""
import json
import os
import time
from pathlib import Path


def write_config(run_dir, config):
    """config.json, written to a temp file and renamed so a reader never sees half of it."""
    path = Path(run_dir) / "config.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def read_metrics(run_dir):
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


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
            path.write_text("".join(json.dumps(r) + "\n" for r in kept))
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

"""`python -m bench speedrun`: time to a target validation loss, the figure trainers are compared by.

Each run trains the same model shape on the same data with the same schedule until its val loss
first reaches the target, and reports the seconds it spent in training steps to get there (evals,
saves and start-up excluded, as modded-nanogpt's record timer excludes validation), the steps it
took, and the wall-clock seconds from launch (start-up, compilation and evals included). Runs:

  pytorch-eager    a plain PyTorch nanoGPT-style model and loop (bench/reference_gpt.py: nn.Linear,
                   nn.LayerNorm, SDPA, F.cross_entropy; torch.optim.AdamW with fused=True)
  pytorch-compile  the same, under torch.compile
  nanolm           `python -m nanolm.train --target_loss=...` itself, with its kernels (--kernels=auto)
  nanolm-muon      the same with --optim=muon: Muon for the blocks' matrices (its own lr, --muon_lr's
                   default, on the same schedule), the same AdamW for the rest (nanolm/optim.py)
  nanolm-modern    the `nanolm` run with the modern block of the preset's size (--preset=modern-cpu:
                   RMSNorm, RoPE + QK-norm, GQA, ReLU^2, no biases, untied; README "Model") instead of
                   GPT-2's: the model differs, the data, batch, schedule and optimizer do not

Every run is its own process, one after the other, each with the same batches (nanolm.data.Loader,
the same seeds), the same learning-rate schedule (nanolm.train.get_lr: warmup, then cosine to
min_lr at --max_steps, the horizon, whether or not the target is reached first), the same AdamW
hyperparameters and the same eval (the same --eval_iters validation batches every --eval_interval
steps). The trainers differ in their code only; their initial weights differ too (each initialises
its own way), so the steps to the target differ a little from run to run of the same speed.

Times are only as good as the machine is quiet: on a shared 2-core CPU run nothing beside it.
Writes speedrun.json, speedrun.md and speedrun.png (val loss against training seconds) to --out
(not results.json: bench/results/*/results.json are op results, read into the README table).
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RUNS = ("pytorch-eager", "pytorch-compile", "nanolm", "nanolm-muon", "nanolm-modern")
# the nanolm.train flags of a run beyond those every run shares
NANOLM_RUNS = {"nanolm": [], "nanolm-muon": ["--optim=muon"], "nanolm-modern": ["--preset=modern-cpu"]}

# The CPU setting: the quickstart model (4 layers, 128 wide, byte tokens, block 128) on the
# embedded corpus (no download), trained long enough that the target takes minutes.
DEFAULTS = dict(preset="quickstart", data="pystdlib", batch_size=16, max_steps=3000, lr=2e-3, min_lr=2e-4,
                warmup=50, weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=1.0, eval_interval=100,
                eval_iters=10, seed=1337)
# Val loss in nats per byte. Chosen from one nanolm fp32 run of these defaults (AMD EPYC,
# 2026-12-07): 1.79 at step 1000, 1.549 at step 2000, 1.466 at the end (3000), so the target
# comes two thirds of the way in, 0.08 above where the schedule ends: minutes of training on a
# 2-core CPU, with room for a trainer that learns a little slower per step.
TARGET = 1.55


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench speedrun", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of: {', '.join(RUNS)}")
    p.add_argument("--target", type=float, default=TARGET, help="val loss to reach (default %(default)s)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="autocast of every run (default %(default)s: the same math on every CPU)")
    p.add_argument("--out", default="speedrun_out", help="folder for speedrun.json, speedrun.md, speedrun.png")
    for key, value in DEFAULTS.items():
        p.add_argument(f"--{key}", type=type(value), default=value, help=f"(default {value})")
    p.add_argument("--n_layer", type=int, default=0, help="overrides the preset (0: the preset's)")
    p.add_argument("--n_embd", type=int, default=0)
    p.add_argument("--n_head", type=int, default=0)
    p.add_argument("--block_size", type=int, default=0)
    p.add_argument("--timeout_s", type=float, default=3600, help="per run; a run past it is reported as such")
    p.add_argument("--worker", choices=("pytorch-eager", "pytorch-compile"), help=argparse.SUPPRESS)
    p.add_argument("--run_dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.runs = [r for r in args.runs.split(",") if r]
    unknown = [r for r in args.runs if r not in RUNS]
    if unknown:
        p.error(f"--runs: unknown run {unknown[0]!r}; known: {', '.join(RUNS)}")
    if not args.target > 0:
        p.error(f"--target must be > 0, got {args.target}")
    return args


def train_flags(args):
    """The nanolm.train flags every run shares (the PyTorch worker reads the same config)."""
    shape = {k: getattr(args, k) for k in ("n_layer", "n_embd", "n_head", "block_size") if getattr(args, k)}
    values = {**{k: getattr(args, k) for k in DEFAULTS}, **shape, "dtype": args.dtype,
              "target_loss": args.target, "log_interval": args.eval_interval, "ckpt_interval": 0,
              "sample_tokens": 1}
    return [f"--{k}={v}" for k, v in values.items()]


# ----------------------------------------------------------------------------- the PyTorch run

def pytorch_worker(args):
    """The plain-PyTorch trainer: nanolm's config, data and schedule, PyTorch's model, loss and
    optimizer. Writes run_dir/metrics.jsonl with the trainer's eval records."""
    import torch

    from bench.reference_gpt import ReferenceGPT
    from nanolm.data import Loader, get_tokenizer, load_dataset
    from nanolm.metrics import MetricsWriter
    from nanolm.config import model_config
    from nanolm.train import config_from_args, get_lr

    cfg = config_from_args(train_flags(args))
    torch.manual_seed(cfg.seed)
    tokenizer = get_tokenizer(cfg.tokenizer)
    train_tokens, val_tokens = load_dataset(cfg.data, tokenizer)
    m = model_config(cfg, tokenizer.vocab_size)
    model = ReferenceGPT(m.n_layer, m.n_head, m.n_embd, m.block_size, m.vocab_size, m.padded_vocab, m.bias)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=True)
    step_fn = torch.compile(model) if args.worker == "pytorch-compile" else model
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")
    train = Loader(train_tokens, cfg.batch_size, m.block_size, cfg.seed)
    val = Loader(val_tokens, cfg.batch_size, m.block_size, cfg.seed + 1)
    val_start = val.state_dict()
    metrics = MetricsWriter(args.run_dir, {"run": args.worker, **vars(cfg)})

    def evaluate(step, train_s):
        val.load_state_dict(val_start)
        with torch.no_grad(), autocast:
            val_loss = sum(step_fn(*val.next_batch()).item() for _ in range(cfg.eval_iters)) / cfg.eval_iters
        metrics.log("eval", step, val_loss=val_loss, train_s=round(train_s, 3))
        print(f"step {step:5d} | val loss {val_loss:.4f} | {train_s:.1f} s", flush=True)
        return val_loss

    evaluate(0, 0.0)  # the untrained loss, as nanolm.train logs it
    train_s = 0.0
    for step in range(1, cfg.max_steps + 1):
        start = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = get_lr(cfg, step - 1)
        x, y = train.next_batch()
        with autocast:
            loss = step_fn(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        loss.item()
        train_s += time.perf_counter() - start
        if (step % cfg.eval_interval == 0 or step == cfg.max_steps) and evaluate(step, train_s) <= cfg.target_loss:
            break
    metrics.close()


# ----------------------------------------------------------------------------- the driver

def worker_argv(args):
    """The argv a worker gets: this run's settings, spelled out."""
    keys = [*DEFAULTS, "n_layer", "n_embd", "n_head", "block_size", "target", "dtype"]
    return [f"--{k}={getattr(args, k)}" for k in keys]


def run_one(run, args, out):
    """Launch one run and read its eval records: {'run', 'curve': [(step, train_s, val_loss)],
    'reached' (the first eval at the target, or None), 'wall_s', 'returncode'}."""
    run_dir = out / run
    cmd = ([sys.executable, "-m", "nanolm.train", *train_flags(args), *NANOLM_RUNS[run], f"--out_dir={run_dir}"]
           if run in NANOLM_RUNS else
           [sys.executable, "-m", "bench.speedrun", f"--worker={run}", f"--run_dir={run_dir}", *worker_argv(args)])
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(run_dir / "log.txt", "w") as log:
        try:
            code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout_s).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    wall = time.perf_counter() - start
    from nanolm.metrics import read_metrics
    evals = [r for r in read_metrics(run_dir) if r["kind"] == "eval"] if (run_dir / "metrics.jsonl").exists() else []
    curve = [(r["step"], r.get("train_s", 0.0), r["val_loss"]) for r in evals]
    reached = next((c for c in curve if c[0] > 0 and c[2] <= args.target), None)  # after training, not at step 0
    return {"run": run, "curve": curve, "reached": reached, "wall_s": round(wall, 1), "returncode": code}


def machine():
    """The CPU model and the flags that decide its kernels' paths."""
    model, flags = platform.processor() or platform.machine(), []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", platform.machine(), platform.processor()):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = [f for f in line.split(":", 1)[1].split() if f.startswith(("avx512_bf16", "amx", "avx2"))]
                break
    except OSError:
        pass
    import torch
    return {"cpu": model, "flags": sorted(set(flags)), "threads": torch.get_num_threads(),
            "load_avg_1min": round(os.getloadavg()[0], 2), "torch": torch.__version__}


def table(results, args):
    rows = ["| run | steps to target | training s to target | wall s (start-up, evals incl.) | best val loss |",
            "|---|---|---|---|---|"]
    for r in results:
        best = min((c[2] for c in r["curve"]), default=float("nan"))
        if r["reached"]:
            step, train_s, _ = r["reached"]
            rows.append(f"| {r['run']} | {step} | {train_s:.1f} | {r['wall_s']:.1f} | {best:.4f} |")
        else:
            why = f"exit {r['returncode']}" if r["returncode"] not in (0,) else f"not reached in {args.max_steps} steps"
            rows.append(f"| {r['run']} | - ({why}) | - | {r['wall_s']:.1f} | {best:.4f} |")
    return "\n".join(rows)


def plot(results, args, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        if r["curve"]:
            ax.plot([c[1] for c in r["curve"]], [c[2] for c in r["curve"]], marker=".", label=r["run"])
    ax.axhline(args.target, color="gray", linestyle="--", linewidth=1, label=f"target {args.target}")
    ax.set_xlabel("seconds in training steps")
    ax.set_ylabel("val loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker:
        return pytorch_worker(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for run in args.runs:
        print(f"speedrun: {run} ...", file=sys.stderr, flush=True)
        results.append(run_one(run, args, out))
        r = results[-1]
        status = f"target at step {r['reached'][0]}, {r['reached'][1]:.1f} s" if r["reached"] else "target not reached"
        print(f"speedrun: {run}: {status} ({r['wall_s']:.0f} s wall)", file=sys.stderr, flush=True)
    summary = {"machine": machine(), "target": args.target, "dtype": args.dtype, "settings": train_flags(args),
               "results": results}
    (out / "speedrun.json").write_text(json.dumps(summary, indent=1) + "\n")
    text = table(results, args)
    (out / "speedrun.md").write_text(f"Time to val loss {args.target} ({args.dtype}), "
                                    f"{summary['machine']['cpu']}\n\n{text}\n")
    plot(results, args, out / "speedrun.png")
    print(text)
    return 0 if all(r["returncode"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

"""`python -m nanolm.train [--key=value ...] [--resume]`: train a GPT-2 model (see nanolm/config.py).

train(cfg) is the whole run: setup() builds everything (and restore() reloads a checkpoint when
resuming), then each step accumulates gradients over grad_accum micro-batches and takes one
optimizer step, with evaluate(), log() and checkpoints on their intervals, and a sample printed
at the end. Everything a run writes goes to its run dir: ckpt_<step>.pt (nanolm/checkpoint.py),
ckpt_best.pt (the lowest val loss so far), metrics.jsonl and config.json (nanolm/metrics.py).
With --early_stop=N the run ends, saving as at its last step, after N evals in a row without a
new lowest val loss.

Ctrl-C stops the run after the step in flight and saves a checkpoint, so a resumed run
continues bit-for-bit; a second Ctrl-C aborts at once.
"""
import contextlib
import dataclasses
import math
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from nanolm import backends, checkpoint, dist, flops
from nanolm.config import ConfigError, as_dict, model_config, parse_args, parse_overrides
from nanolm.data import Loader, get_tokenizer, load_dataset
from nanolm.metrics import MetricsWriter
from nanolm.model import GPT, DropoutStream
from nanolm.optim import FlatAdamW
from nanolm.sample import generate

RUNS = Path("runs")  # where fresh runs without --out_dir go



def pick_device(cfg, local_rank=0):
    name = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name} requested but CUDA is not available")
    device = torch.device(f"cuda:{local_rank}" if name == "cuda" else name)  # one GPU per rank
    if device.type == "cuda":
        torch.cuda.set_device(device)  # kernels launch on the current device, not the tensors'
    return device


def autocast_ctx(cfg, device):
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def peak_flops(cfg, device):
    if cfg.peak_tflops > 0:
        return cfg.peak_tflops * 1e12
    if device.type != "cuda":
        return None
    peak = flops.peak_tflops(torch.cuda.get_device_name(device))
    return None if peak is None else peak * 1e12


def get_lr(cfg, step):
    """Linear warmup to lr, then cosine decay to min_lr at max_steps."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.max_steps - cfg.warmup)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))) * (cfg.lr - cfg.min_lr)


def flops_per_token(model):
    """Model FLOPs per trained token (nanolm/flops.py)."""
    c = model.cfg
    return flops.train_flops_per_token(model.num_params(), c.n_layer, c.n_embd, c.block_size)


def no_best_yet():
    """The record of the lowest val loss (early stopping, ckpt_best.pt) before any eval after a
    training step; saved in every checkpoint so a resumed run stops where the straight one does."""
    return {"val_loss": math.inf, "step": 0, "evals_since": 0}


@dataclasses.dataclass
class Run:
    """What a training run holds: built by setup(), the run dir and metrics added by start()."""
    device: torch.device
    tokenizer: object
    model: GPT
    opt: FlatAdamW
    train: Loader  # this rank's share of every global batch
    val: Loader
    val_start: dict  # the val loader's state, rewound to before every evaluation
    autocast: contextlib.AbstractContextManager  # bf16 autocast, or nothing in fp32
    dist: dist.Context
    config: dict  # the run's config with the model's, saved with every checkpoint
    dir: Path | None = None
    metrics: MetricsWriter | contextlib.AbstractContextManager | None = None  # a no-op off rank 0
    best: dict = dataclasses.field(default_factory=no_best_yet)  # lowest val loss: track_best


def setup(cfg):
    """Everything a run needs, checked before any training work."""
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    env = dist.env_from_torchrun()
    device = pick_device(cfg, env.local_rank)
    tokenizer = get_tokenizer(cfg.tokenizer)
    train_tokens, val_tokens = load_dataset(cfg.data, tokenizer)
    mcfg = model_config(cfg, tokenizer.vocab_size)
    for split, tokens in (("train", train_tokens), ("val", val_tokens)):
        if len(tokens) <= mcfg.block_size + 1:
            raise ValueError(f"block_size={mcfg.block_size} is larger than the {split} data "
                             f"({len(tokens)} tokens)")
    choice = backends.resolve(cfg.kernels, device)  # --kernels: {op: backend name}
    if env.is_main:
        print("kernels: " + ", ".join(f"{op}={name}" for op, name in choice.items()))
    impls = backends.impls(choice)
    if mcfg.dropout > 0:
        for op in ("layernorm", "attention"):
            if not impls[op].SUPPORT[op].dropout:
                raise ValueError(f"dropout={mcfg.dropout}: the {choice[op]} backend has no dropout for {op}; "
                                 f"choose another with --kernels (e.g. {op}=torch)")
    model = GPT(mcfg, impls, cfg.recompute).to(device)
    if mcfg.dropout > 0:
        model.dropout.seed = DropoutStream.dropout_seed(cfg.seed, env.rank)
    opt = FlatAdamW(model.named_parameters(), cfg.lr, (cfg.beta1, cfg.beta2), 1e-8,
                    cfg.weight_decay, cfg.grad_clip, impls["adamw"], pad_to=env.world_size)
    ctx = dist.Context(env, device, cfg.dist_timeout_s)
    ctx.attach(opt, cfg.bucket_mb, cfg.zero)
    # each rank reads its own batch_size windows of every global step: see Loader
    train = Loader(train_tokens, cfg.batch_size, mcfg.block_size, cfg.seed, env.rank, env.world_size)
    val = Loader(val_tokens, cfg.batch_size, mcfg.block_size, cfg.seed + 1)
    return Run(device=device, tokenizer=tokenizer, model=model, opt=opt, train=train, val=val,
               val_start=val.state_dict(), autocast=autocast_ctx(cfg, device), dist=ctx,
               config={**as_dict(cfg), "model": dataclasses.asdict(mcfg)})


# ----------------------------------------------------------------------------- run dir, resume

def newest_run(runs):
    """The run dir under `runs` whose newest checkpoint was written last."""
    run_dirs = [d for d in runs.iterdir() if d.is_dir()] if runs.is_dir() else []
    found = [c for c in map(checkpoint.latest, run_dirs) if c is not None]
    if not found:
        raise ConfigError(f"--resume: no run with a checkpoint under {runs}/; "
                          f"pass --resume=RUN_DIR or --resume=CHECKPOINT_FILE")
    return max(found, key=lambda c: c.stat().st_mtime).parent


def fresh_run_dir(cfg):
    if cfg.out_dir:
        out = Path(cfg.out_dir)
    else:
        out = stem = RUNS / f"{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
        n = 1
        while out.exists():  # two runs started within the same second
            out, n = Path(f"{stem}-{n}"), n + 1
    found = checkpoint.latest(out)
    if found:
        raise ConfigError(f"{out} already holds checkpoints (newest {found.name}): pass --resume "
                          f"to continue that run, or another --out_dir for a new one")
    return out


def locate(cfg):
    """(checkpoint to resume from or None, run dir). The run dir is --out_dir when given,
    else the resumed checkpoint's dir, else a fresh runs/<preset>-<time>."""
    if not cfg.resume:
        return None, fresh_run_dir(cfg)
    out = Path(cfg.out_dir) if cfg.out_dir else None
    source = (out or newest_run(RUNS)) if cfg.resume == "latest" else Path(cfg.resume)
    ckpt = checkpoint.latest(source) if source.is_dir() else source
    if ckpt is None or not ckpt.is_file():
        raise ConfigError(f"--resume: no checkpoint (ckpt_*.pt) at {source}")
    return ckpt, out or ckpt.parent


def config_from_args(argv):
    """The run's config. When resuming, the checkpoint's saved config replaces the defaults, so
    `--resume` alone continues a run as it was started; values given on the command line still
    win (a changed model shape is then reported by restore()). On another number of ranks the
    per-rank batch_size is rescaled so the global batch, and with it the data order, is kept."""
    cfg = parse_args(argv)
    if not cfg.resume:
        return cfg
    saved, loader = checkpoint.saved_run(locate(cfg)[0])
    keep = {k: v for k, v in saved.items() if k not in ("resume", "out_dir", "model")}
    if "batch_size" not in parse_overrides(argv):
        keep["batch_size"] = per_rank_batch(loader, dist.env_from_torchrun().world_size)
    return parse_args(argv, defaults=keep)


def per_rank_batch(loader_state, world_size):
    """The batch_size per rank that keeps a checkpoint's global batch on world_size ranks."""
    B, W = loader_state["batch_size"], loader_state["world_size"]
    if B * W % world_size:
        raise ConfigError(f"the checkpoint's global batch of {B * W} sequences ({B} on each of {W} ranks) "
                          f"does not split evenly over {world_size} ranks: resume on a world size that divides it")
    return B * W // world_size


def restore(cfg, run, path):
    """Load model, optimizer, data position and RNG states from a checkpoint; returns its step."""
    ckpt = checkpoint.load(path, model_config={"model": run.config["model"]})
    if ckpt["step"] >= cfg.max_steps:
        raise ConfigError(f"{path} is at step {ckpt['step']} and max_steps={cfg.max_steps}: "
                          f"nothing left to train (raise --max_steps to continue)")
    run.model.load_state_dict(ckpt["model"])
    run.opt.load_state_dict(ckpt["optimizer"])
    run.train.load_state_dict(ckpt["loader"]["train"])
    run.best = ckpt.get("best", no_best_yet())  # checkpoints older than early stopping lack it
    checkpoint.set_rng_state(ckpt["rng"])  # last: nothing above may draw random numbers after it
    return ckpt["step"]


def load_weights(run, path):
    """Model weights only (e.g. GPT-2 imported with `python -m nanolm.hf import`)."""
    ckpt = checkpoint.load(path, model_config={"model": run.config["model"]})
    run.model.load_state_dict(ckpt["model"])
    print(f"weights from {path}")


def save(cfg, run, step, as_best=False):
    """Rank 0 writes; every rank calls it, as the ZeRO-1 optimizer state is gathered first.
    as_best: to ckpt_best.pt instead of ckpt_<step>.pt."""
    opt_state = run.opt.state_dict()
    if not run.dist.is_main:
        return None
    path = checkpoint.save(run.dir, step, run.model.state_dict(), opt_state,
                           run.config, {"train": run.train.state_dict()}, cfg.keep_ckpts,
                           best=run.best, as_best=as_best)
    print(f"step {step:5d} | saved {path}", flush=True)
    return path


def track_best(cfg, run, step, val_loss):
    """After an eval, on every rank (val_loss is rank 0's, None elsewhere): saves ckpt_best.pt
    if the val loss is the lowest yet; returns True when --early_stop says the run ends here."""
    best = run.best
    if run.dist.any(val_loss is not None and val_loss < best["val_loss"]):
        best.update(val_loss=val_loss, step=step, evals_since=0)
        save(cfg, run, step, as_best=True)
    else:
        best["evals_since"] += 1
    if cfg.early_stop and best["evals_since"] >= cfg.early_stop:
        if run.dist.is_main:
            print(f"early stop: no lower val loss in {best['evals_since']} evals (best "
                  f"{best['val_loss']:.4f} at step {best['step']}, in {run.dir / checkpoint.BEST})")
        return True
    return False


class StopOnInterrupt:
    """Turns the first Ctrl-C into a request the training loop honours between steps (so the
    checkpoint it saves holds a whole step); a second Ctrl-C raises KeyboardInterrupt at once."""

    def __init__(self):
        self.requested, self.previous = False, None

    def _handle(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, self.previous)
        print("\ninterrupted: finishing this step and saving a checkpoint "
              "(Ctrl-C again to abort)", flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


@torch.no_grad()
def evaluate(cfg, run):
    """Mean loss over the same eval_iters validation batches every time (the loader is rewound)."""
    run.model.eval()
    run.val.load_state_dict(run.val_start)
    total = 0.0
    for _ in range(cfg.eval_iters):
        x, y = run.val.next_batch(run.device)
        with run.autocast:
            total += run.model(x, y).item()
    run.model.train()
    return total / cfg.eval_iters


def train_step(cfg, run, lr):
    """grad_accum micro-batches, each loss scaled by 1/grad_accum, then one optimizer step.
    With several ranks, gradients are averaged during the last micro-batch's backward."""
    model, opt = run.model, run.opt
    opt.zero_grad()
    losses = []  # kept on the device: reading each one would stall the GPU once per micro-batch
    for i in range(cfg.grad_accum):
        x, y = run.train.next_batch(run.device)
        with run.autocast:
            loss = model(x, y) / cfg.grad_accum
        if i == cfg.grad_accum - 1:
            run.dist.arm()
        loss.backward()
        losses.append(loss.detach())
    run.dist.finish()
    norm = opt.step(lr)
    return torch.stack(losses).sum().item(), norm


def tokens_per_step(cfg, run):
    """Over all ranks."""
    return cfg.batch_size * cfg.grad_accum * run.model.cfg.block_size * run.dist.env.world_size


def log(cfg, run, step, loss, lr, norm, dt):
    tokens = tokens_per_step(cfg, run)
    peak = peak_flops(cfg, run.device)
    mfu = (f"{100 * flops_per_token(run.model) * tokens / dt / (peak * run.dist.env.world_size):.1f}%"
           if peak else "-")
    skipped = f" skipped {run.opt.skipped}" if run.opt.skipped else ""
    print(f"step {step:5d} | loss {loss:.4f} | lr {lr:.2e} | norm {norm:.3f} | "
          f"{1000 * dt:.0f} ms/step | {tokens / dt:.0f} tok/s | mfu {mfu}{skipped}", flush=True)
    run.metrics.log("train", step, tokens=step * tokens, loss=loss, lr=lr, grad_norm=norm,
                       tokens_per_s=tokens / dt)


def log_eval(cfg, run, step, val_loss):
    val_ppl = math.exp(val_loss)
    print(f"step {step:5d} | val loss {val_loss:.4f} | val ppl {val_ppl:.2f}", flush=True)
    run.metrics.log("eval", step, tokens=step * tokens_per_step(cfg, run), val_loss=val_loss,
                    val_ppl=val_ppl)


def sample(cfg, run):
    tok = run.tokenizer
    ids = tok.encode(cfg.sample_prompt) or [tok.eot]
    prompt = torch.tensor([ids], dtype=torch.long, device=run.device)
    run.model.eval()
    with run.autocast:
        out = generate(run.model, prompt, cfg.sample_tokens, top_k=50, seed=cfg.seed)
    return tok.decode(out[0].tolist())


def start(cfg):
    """setup(), then restore() when resuming; returns (run, first step to take)."""
    resume_from, run_dir = locate(cfg)
    try:
        run = setup(cfg)
        if cfg.init_from and not resume_from:
            load_weights(run, cfg.init_from)
        done = restore(cfg, run, resume_from) if resume_from else 0
    except ValueError as e:  # bad data/kernels/shape/checkpoint choices, before any work
        raise ConfigError(str(e)) from e
    run.dir = run_dir
    if not run.dist.is_main:  # only rank 0 writes the run dir and prints
        run.metrics = contextlib.nullcontext()
        return run, done + 1
    run.metrics = MetricsWriter(run_dir, run.config, resume_step=done if resume_from else None)
    print(f"run dir: {run_dir}" + (f" (resumed from {resume_from}, step {done})" if resume_from else ""))
    print(f"model: {run.model.num_params() / 1e6:.2f}M non-embedding params on {run.device}")
    return run, done + 1


def train(cfg):
    """Runs the whole training; returns {'first_val' (fresh runs), 'val', 'sample', 'stopped'
    (the step a Ctrl-C stopped at, or None), 'early_stopped' (the step --early_stop ended the
    run at, or None), 'checkpoint' (the last one saved)}. Under torchrun only rank 0 evaluates,
    logs, samples and writes; the other ranks return just 'stopped' and 'early_stopped'."""
    run, first = start(cfg)
    history, is_main = {"stopped": None, "early_stopped": None}, run.dist.is_main
    with contextlib.closing(run.dist), run.metrics, StopOnInterrupt() as interrupt:
        if first == 1 and is_main:
            history["first_val"] = evaluate(cfg, run)
            log_eval(cfg, run, 0, history["first_val"])
        t0, timed = time.perf_counter(), 0  # timed steps since t0: evals and saves excluded
        for step in range(first, cfg.max_steps + 1):
            lr = get_lr(cfg, step - 1)
            loss, norm = train_step(cfg, run, lr)
            timed += 1
            stop = run.dist.any(interrupt.requested)  # every rank stops after the same step
            if step % cfg.log_interval == 0:
                loss = run.dist.mean(loss)
                if is_main:
                    log(cfg, run, step, loss, lr, norm, (time.perf_counter() - t0) / timed)
            evaluated = step % cfg.eval_interval == 0 or step == cfg.max_steps
            if is_main and evaluated:
                history["val"] = evaluate(cfg, run)
                log_eval(cfg, run, step, history["val"])
            if evaluated and track_best(cfg, run, step, history.get("val")):
                history["early_stopped"] = step
            periodic = cfg.ckpt_interval and step % cfg.ckpt_interval == 0
            if periodic or step == cfg.max_steps or stop or history["early_stopped"]:
                history["checkpoint"] = save(cfg, run, step)
            if history["early_stopped"]:
                break
            if stop:
                if is_main:
                    print(f"stopped at step {step}; continue with --resume={run.dir}")
                history["stopped"] = step
                return history
            if step % cfg.log_interval == 0 or step % cfg.eval_interval == 0 or periodic:
                t0, timed = time.perf_counter(), 0
    if is_main:
        history["sample"] = sample(cfg, run)
        print("sample:\n" + history["sample"])
    return history


def main(argv=None):
    try:
        train(config_from_args(sys.argv[1:] if argv is None else argv))
    except ConfigError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()

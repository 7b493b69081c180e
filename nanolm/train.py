"""`python -m nanolm.train [--key=value ...] [--resume]`: train a GPT-2 model (see nanolm/config.py).

train(cfg) is the whole run: setup() builds everything (and restore() reloads a checkpoint when
resuming), then each step accumulates gradients over grad_accum micro-batches and takes one
optimizer step, with evaluate(), log() and checkpoints on their intervals, and a sample printed
at the end. Everything a run writes goes to its run dir: ckpt_<step>.pt (nanolm/checkpoint.py),
ckpt_best.pt (the lowest val loss so far), metrics.jsonl and config.json (nanolm/metrics.py).
With --early_stop=N the run ends, saving as at its last step, after N evals in a row without a
new lowest val loss.

Ctrl-C or SIGTERM stops the run after the step in flight and saves a checkpoint, so a resumed
run continues bit-for-bit; a second one aborts at once.

A step whose gradient norm is not finite is skipped (one bad batch). No checkpoint is written
after a skipped step, and max_skipped_steps skipped in a row stop the run as diverged
(Diverged), so the checkpoints from before the divergence are the newest ones left.
"""
import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from nanolm import checkpoint, dist, flops, tensor_parallel
from nanolm.config import ConfigError, as_dict, cli, config_help, model_config, parse_args, parse_overrides
from nanolm.data import Loader, get_tokenizer, load_dataset, resolve_data
from nanolm.metrics import MetricsWriter, perplexity, read_metrics
from nanolm.model import GPT, DropoutStream, compiled, parameter_count
from nanolm.ops import backends
from nanolm.ops.support import check_dropout
from nanolm.optim import DynamicLossScale, FlatAdamW, FlatMuon, hidden_matrices
from nanolm.precision import pick_dtype
from nanolm.rundir import RunDirLock
from nanolm.sample import generate

RUNS = Path("runs")  # where fresh runs without --out_dir go



class Diverged(Exception):
    """Too many consecutive non-finite steps: the weights or the loss have blown up."""


def pick_device(cfg, local_rank=0):
    name = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name} requested but CUDA is not available")
    device = torch.device(f"cuda:{local_rank}" if name == "cuda" else name)  # one GPU per rank
    if device.type == "cuda":
        torch.cuda.set_device(device)  # kernels launch on the current device, not the tensors'
    return device


def check_kernels_take(dtype, choice, device):
    """Under autocast, attention and the lm_head's cross-entropy receive `dtype` activations
    (layernorm and AdamW stay fp32): a chosen backend whose support row lacks it is an error here,
    before the run dir exists, not at the first evaluation."""
    for op in ("attention", "cross_entropy"):
        reason = backends.unavailable_reason(choice[op], op, device, getattr(torch, dtype))
        if reason is not None:
            raise ValueError(f"--dtype={dtype}: kernel backend {choice[op]!r} cannot run {op} in it: {reason}")


def autocast_ctx(dtype, device):
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, dtype))


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


def flops_per_token(model, n_params=None):
    """Model FLOPs per trained token (nanolm/flops.py). n_params: the whole model's, when
    `model` is a tensor-parallel slice of it."""
    c = model.cfg
    n = model.num_params() if n_params is None else n_params
    return flops.train_flops_per_token(n, c.n_layer, c.n_embd, c.block_size)


def no_best_yet():
    """The record of the lowest val loss (early stopping, ckpt_best.pt) before any eval after a
    training step; saved in every checkpoint so a resumed run stops where the straight one does."""
    return {"val_loss": math.inf, "step": 0, "evals_since": 0}


@dataclasses.dataclass
class Run:
    """What a training run holds: built by setup(), the run dir, its lock and metrics added by
    start()."""
    device: torch.device
    tokenizer: object
    model: GPT
    opt: FlatAdamW  # or FlatMuon, by --optim
    train: Loader  # this rank's share of every global batch
    val: Loader
    val_start: dict  # the val loader's state, rewound to before every evaluation
    autocast: contextlib.AbstractContextManager  # bf16/fp16 autocast, or nothing in fp32
    dist: dist.Context
    config: dict  # the run's config with the model's, saved with every checkpoint
    n_params: int  # non-embedding parameters of the whole model (with --tp, not only this rank's slice)
    dir: Path | None = None
    metrics: MetricsWriter | contextlib.AbstractContextManager | None = None  # a no-op off rank 0
    lock: "RunDirLock | contextlib.AbstractContextManager | None" = None  # the run dir's, on rank 0
    best: dict = dataclasses.field(default_factory=no_best_yet)  # lowest val loss: track_best
    # what train_step and evaluate call: the model, or with --compile its torch.compile (sampling,
    # whose KV cache changes shape every token, and checkpoints use the model itself)
    forward: object = None

    def __post_init__(self):
        if self.forward is None:
            self.forward = self.model


def setup(cfg, resume_from=None):
    """Everything a run needs, checked before any training work. resume_from: the checkpoint
    being resumed, whose saved precision is kept."""
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    env = dist.env_from_torchrun()
    if cfg.zero and env.world_size // cfg.tp <= 1:
        raise ConfigError("--zero=1 needs several processes, as data-parallel replicas (torchrun "
                          "--nproc_per_node=N, N > tp): ZeRO-1 shards the optimizer state over them")
    device = pick_device(cfg, env.local_rank)
    tokenizer = get_tokenizer(cfg.tokenizer)
    train_tokens, val_tokens = load_dataset(cfg.data, tokenizer)
    mcfg = model_config(cfg, tokenizer.vocab_size)
    for split, tokens in (("train", train_tokens), ("val", val_tokens)):
        if len(tokens) <= mcfg.block_size + 1:
            raise ValueError(f"block_size={mcfg.block_size} is larger than the {split} data "
                             f"({len(tokens)} tokens)")
    choice = backends.resolve(cfg.kernels, device)  # --kernels: {op: backend name}
    if env.world_size % cfg.tp:
        raise ValueError(f"tp={cfg.tp} does not divide the {env.world_size} ranks")
    ctx = dist.Context(env, device, cfg.dist_timeout_s, cfg.tp)
    saved_config = checkpoint.saved_run(resume_from)[0] if resume_from else None
    dtype, why = pick_dtype(cfg, device, ctx.comm, saved_config)
    check_kernels_take(dtype, choice, device)
    if env.is_main:
        print("kernels: " + ", ".join(f"{op}={name}" for op, name in choice.items()))
        print(f"dtype: {dtype} ({why})")
    check_fits_memory(mcfg, device, cfg.tp)
    if mcfg.dropout > 0:
        for op in ("layernorm", "attention"):
            check_dropout(op, backends.implementation(choice[op], op).support, choice[op], mcfg.dropout)
    model = GPT(mcfg, choice, cfg.recompute).to(device)
    if mcfg.dropout > 0:
        model.dropout.seed = DropoutStream.dropout_seed(cfg.seed, env.rank)
    n_params = model.num_params()
    if ctx.tp_comm is not None:  # this rank's slice of the model just initialised
        tensor_parallel.parallelize(model, ctx.tp_comm)
    loss_scale = DynamicLossScale(cfg.loss_scale_window) if dtype == "float16" else None
    opt = make_optimizer(cfg, model, choice["adamw"], ctx.dp, loss_scale)
    ctx.attach(opt, cfg.bucket_mb, cfg.zero)
    try_kernels(cfg, model, opt, autocast_ctx(dtype, device), device)
    # each data-parallel replica (all ranks of one tp group alike) reads its own batch_size
    # windows of every global step: see Loader
    train = Loader(train_tokens, cfg.batch_size, mcfg.block_size, cfg.seed, ctx.dp_rank, ctx.dp)
    # and of the validation batches, so their mean over the ranks is the same global estimate
    # (the same windows) on any number of ranks
    val = Loader(val_tokens, cfg.batch_size, mcfg.block_size, cfg.seed + 1, ctx.dp_rank, ctx.dp)
    return Run(device=device, tokenizer=tokenizer, model=model, opt=opt, train=train, val=val,
               val_start=val.state_dict(), autocast=autocast_ctx(dtype, device), dist=ctx,
               config={**as_dict(cfg), "dtype": dtype, "dtype_reason": why, "data": resolve_data(cfg.data),
                       "tokenizer": tokenizer.name,  # hf:DIR made absolute, as the data path
                       "model": dataclasses.asdict(mcfg)},
               n_params=n_params, forward=compiled(model) if cfg.compile else model)


def make_optimizer(cfg, model, backend, pad_to, loss_scale):
    """--optim: FlatAdamW over every parameter, or FlatMuon (Muon for the blocks' matrices,
    the same AdamW for the rest)."""
    adamw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, weight_decay=cfg.weight_decay,
                 grad_clip=cfg.grad_clip, backend=backend, pad_to=pad_to, loss_scale=loss_scale)
    if cfg.optim == "adamw":
        return FlatAdamW(model.named_parameters(), **adamw)
    return FlatMuon(model.named_parameters(), hidden_matrices(model), **adamw, muon_lr=cfg.muon_lr,
                    momentum=cfg.muon_momentum, schedule=cfg.muon_ns)


def try_kernels(cfg, model, opt, autocast, device):
    """One forward and backward on a single sequence of zeros, so that a kernel that cannot run
    this dtype or shape (e.g. --dtype=bfloat16 on the fp32 CPU kernels) is a config error before
    the run dir exists, not a crash at the first evaluation. Draws no random numbers; the
    gradients it leaves are zeroed by the first step."""
    x = torch.zeros((1, model.cfg.block_size), dtype=torch.long, device=device)
    try:
        with autocast:
            loss = model(x, x)
        loss.backward()
    except ValueError as e:
        raise ConfigError(f"--kernels={cfg.kernels} --dtype={cfg.dtype} on {device}: {e}") from e
    opt.zero_grad()
    if model.cfg.dropout > 0:  # it drew dropout masks too: the run's first forward starts the stream
        model.dropout.forwards = 0


TRAINING_BYTES_PER_PARAM = 16  # fp32 weight, gradient and the two AdamW moments


def available_memory(device):
    """Bytes free for this process on `device`: the GPU's free memory, or the system's
    MemAvailable (what can be allocated without swapping)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) * 1024


def check_fits_memory(mcfg, device, tp=1):
    """ConfigError, before anything is allocated, when the model's weights, gradients and AdamW
    moments alone (this rank's 1/tp share) exceed the device's free memory, where the allocator's
    own error would be a traceback. Activations come on top, so passing this does not promise
    the run fits."""
    # counted from the shapes: a GPT built on the meta device here made a non-main rank of
    # torchrun abort at exit, 2-3 runs in 10 ('terminate called without an active exception')
    n_params = parameter_count(mcfg)
    needed = TRAINING_BYTES_PER_PARAM * n_params // tp
    try:
        free = available_memory(device)
    except (OSError, KeyError):  # no /proc/meminfo (not Linux): the allocator will tell
        return
    if needed > free:
        raise ConfigError(f"the model ({n_params:.3g} parameters) needs {needed / 2**30:.1f} GiB "
                          f"for its weights, gradients and AdamW moments ({TRAINING_BYTES_PER_PARAM} bytes per "
                          f"parameter{f', over tp={tp} ranks' if tp > 1 else ''}), more than the "
                          f"{free / 2**30:.1f} GiB free on {device}: choose a smaller n_layer / n_embd")


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
    if out and out.resolve() != ckpt.parent.resolve() and holds_run(out):
        raise ConfigError(f"--out_dir={out} already holds a run, and {ckpt} is not one of its "
                          f"checkpoints: leave out --out_dir to continue in {ckpt.parent}, or pass "
                          f"an empty one")
    return ckpt, out or ckpt.parent


def holds_run(run_dir):
    return checkpoint.latest(run_dir) is not None or (run_dir / "metrics.jsonl").exists()


def best_step(path):
    """The step a ckpt_best.pt holds, read without its tensors; inf if it cannot be read (it is
    then no branch's known best)."""
    try:
        return checkpoint.read(path, mmap=True)["step"]
    except ValueError:
        return math.inf


def set_aside_future(run_dir, step):
    """Resuming from step S in a run dir that holds later checkpoints (e.g. the newest was
    corrupt): those and the metrics after S belong to an abandoned future. They are moved to
    run_dir/abandoned-after-<S>-<time>/, so this branch's retention and a later --resume see only
    its own lineage, and nothing is lost. So is a ckpt_best.pt of a step after S (or one that
    cannot be read): the new branch's first best would overwrite it, and it may be the best
    weights of the whole run. The new branch writes its own ckpt_best.pt once an eval beats the
    best val loss recorded at S. Returns that dir, or None."""
    later = [p for p in checkpoint.checkpoints(run_dir) if checkpoint.step_of(p) > step]
    best = run_dir / checkpoint.BEST
    if best.exists() and best_step(best) > step:
        later.append(best)
    if not later:
        return None
    aside = run_dir / f"abandoned-after-{step}-{time.strftime('%Y%m%d-%H%M%S')}"
    aside.mkdir()
    for path in later:
        os.replace(path, aside / path.name)
    if (run_dir / "metrics.jsonl").exists():
        future = [r for r in read_metrics(run_dir) if r["step"] > step]
        (aside / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in future))
    print(f"set aside the checkpoints after step {step} (another branch) in {aside}")
    return aside


def config_from_args(argv):
    """The run's config. When resuming, the checkpoint's saved config replaces the defaults, so
    `--resume` alone continues a run as it was started; values given on the command line still
    win (a changed model shape is then reported by restore()). The saved tp is kept only if it
    divides the number of ranks (else tp=1, or --tp). On another number of data-parallel
    replicas the per-replica batch_size is rescaled so the global batch, and with it the data
    order, is kept; on one replica ZeRO-1 is off."""
    cfg = parse_args(argv)
    if not cfg.resume:
        return cfg
    saved, loader = checkpoint.saved_run(locate(cfg)[0])
    world, overrides = dist.env_from_torchrun().world_size, parse_overrides(argv)
    keep = {k: v for k, v in saved.items() if k not in ("resume", "out_dir", "model")}
    if world % keep.get("tp", 1):
        keep.pop("tp")
    tp = overrides.get("tp", keep.get("tp", 1))
    if world % tp:
        raise ConfigError(f"tp={tp} does not divide the {world} ranks")
    if "batch_size" not in overrides:
        keep["batch_size"] = per_rank_batch(loader, world // tp)
    if world == tp:  # a ZeRO-1 run resumed on one data-parallel replica: there is nothing to shard
        keep["zero"] = 0
    return parse_args(argv, defaults=keep)


def per_rank_batch(loader_state, world_size):
    """The batch_size per rank that keeps a checkpoint's global batch on world_size ranks
    (data-parallel replicas: a tp group reads one batch)."""
    B, W = loader_state["batch_size"], loader_state["world_size"]
    if B * W % world_size:
        raise ConfigError(f"the checkpoint's global batch of {B * W} sequences ({B} on each of {W} ranks) "
                          f"does not split evenly over {world_size} ranks: resume on a world size that divides it")
    return B * W // world_size


def restore(cfg, run, path):
    """Load model, optimizer, data position and RNG states from a checkpoint; returns its step."""
    ckpt = checkpoint.load_gpt(path, model_config={"model": run.config["model"]})
    if ckpt["step"] >= cfg.max_steps:
        raise ConfigError(f"{path} is at step {ckpt['step']} and max_steps={cfg.max_steps}: "
                          f"nothing left to train (raise --max_steps to continue)")
    tensor_parallel.load_full_state_dict(run.model, ckpt["model"])
    run.opt.load_state_dict(tensor_parallel.shard_optimizer_state(run.opt, ckpt["optimizer"], run.model))
    run.train.load_state_dict(ckpt["loader"]["train"])
    run.best = ckpt.get("best", no_best_yet())  # checkpoints older than early stopping lack it
    checkpoint.set_rng_state(ckpt["rng"])  # last: nothing above may draw random numbers after it
    return ckpt["step"]


def load_weights(run, path):
    """Model weights only (e.g. GPT-2 imported with `python -m nanolm.hf import`)."""
    ckpt = checkpoint.load_gpt(path, model_config={"model": run.config["model"]})
    tensor_parallel.load_full_state_dict(run.model, ckpt["model"])
    if run.dist.is_main:
        print(f"weights from {path}")


def save(cfg, run, step, as_best=False):
    """Rank 0 writes; every rank calls it, as the ZeRO-1 optimizer state and the
    tensor-parallel slices are gathered first: the file holds the 1-process model and state,
    and loads on any layout. as_best: to ckpt_best.pt instead of ckpt_<step>.pt."""
    model_state = tensor_parallel.gather_state_dict(run.model)
    opt_state = tensor_parallel.gather_optimizer_state(run.opt, run.opt.state_dict(), run.model)
    if not run.dist.is_main:
        return None
    path = checkpoint.save(run.dir, step, model_state, opt_state,
                           run.config, {"train": run.train.state_dict()}, cfg.keep_ckpts,
                           best=run.best, as_best=as_best)
    print(f"step {step:5d} | saved {path}", flush=True)
    return path


def track_best(cfg, run, step, val_loss):
    """After an eval, on every rank (each holds the same val loss): saves ckpt_best.pt if the
    val loss is the lowest yet; returns True when --early_stop says the run ends here."""
    best = run.best
    if val_loss < best["val_loss"]:
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


def reached_target(cfg, run, step, val_loss, train_s):
    """True when --target_loss is set and this eval's val loss (the same on every rank) is at
    most it: the run then ends, saving, as with --early_stop."""
    if not cfg.target_loss or val_loss > cfg.target_loss:
        return False
    if run.dist.is_main:
        print(f"target reached: val loss {val_loss:.4f} <= {cfg.target_loss:g} at step {step}, "
              f"after {train_s:.1f} s of training steps")
    return True


class StopOnInterrupt:
    """Turns the first Ctrl-C (SIGINT) or SIGTERM (what SLURM, Kubernetes and torchrun send to
    stop a job; torchrun forwards it to every rank) into a request the training loop honours
    between steps, so the checkpoint it saves holds a whole step. A second signal acts at once:
    KeyboardInterrupt for Ctrl-C, termination for SIGTERM."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested, self.previous = False, {}

    def _handle(self, signum, frame):
        self.requested = True
        self._restore()
        print(f"\n{signal.Signals(signum).name}: finishing this step and saving a checkpoint "
              "(send it again to abort)", flush=True)

    def _restore(self):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        self._restore()


@torch.no_grad()
def evaluate(cfg, run):
    """Mean loss over the same eval_iters global validation batches every time (the loader is
    rewound); every rank evaluates its share of them. Returns the same value on every rank."""
    run.model.eval()
    run.val.load_state_dict(run.val_start)
    total = 0.0
    for _ in range(cfg.eval_iters):
        x, y = run.val.next_batch(run.device)
        with run.autocast:
            total += run.forward(x, y).item()
    run.model.train()
    return run.dist.mean(total / cfg.eval_iters)


def train_step(cfg, run, lr):
    """grad_accum micro-batches, each loss scaled by 1/grad_accum (and by the loss scale in
    fp16), then one optimizer step. With several ranks, gradients are averaged during the last
    micro-batch's backward."""
    opt = run.opt
    loss_scale = opt.loss_scale.scale if opt.loss_scale else 1.0
    opt.zero_grad()
    losses = []  # kept on the device: reading each one would stall the GPU once per micro-batch
    for i in range(cfg.grad_accum):
        x, y = run.train.next_batch(run.device)
        with run.autocast:
            loss = run.forward(x, y) / cfg.grad_accum
        if i == cfg.grad_accum - 1:
            run.dist.arm()
        (loss * loss_scale if opt.loss_scale else loss).backward()
        losses.append(loss.detach())
    run.dist.finish()
    norm = opt.step(lr)
    return torch.stack(losses).sum().item(), norm


def count_skipped(cfg, run, streak, step, norm):
    """The number of non-finite (skipped) steps in a row ending at `step`; raises Diverged when
    it reaches cfg.max_skipped_steps. The norm is global, so every rank agrees."""
    if math.isfinite(norm):
        return 0
    streak += 1
    if streak >= cfg.max_skipped_steps:
        last = checkpoint.latest(run.dir) if run.dist.is_main else None
        kept = f"the last checkpoint is {last}" if last else "no checkpoint was saved"
        raise Diverged(f"training diverged: {streak} consecutive steps (to step {step}) had a "
                       f"non-finite loss or gradient; {kept}. Lower --lr or raise --warmup, then "
                       f"resume from a checkpoint before the divergence or start again")
    return streak


def tokens_per_step(cfg, run):
    """Over all data-parallel replicas."""
    return cfg.batch_size * cfg.grad_accum * run.model.cfg.block_size * run.dist.dp


def log(cfg, run, step, loss, lr, norm, dt):
    tokens = tokens_per_step(cfg, run)
    peak = peak_flops(cfg, run.device)
    model_flops = flops_per_token(run.model, run.n_params) * tokens / dt
    mfu = f"{100 * model_flops / (peak * run.dist.env.world_size):.1f}%" if peak else "-"
    skipped = f" skipped {run.opt.skipped}" if run.opt.skipped else ""
    scaler = run.opt.loss_scale
    scale = {"loss_scale": scaler.scale} if scaler else {}
    print(f"step {step:5d} | loss {loss:.4f} | lr {lr:.2e} | norm {norm:.3f} | "
          f"{1000 * dt:.0f} ms/step | {tokens / dt:.0f} tok/s | mfu {mfu}{skipped}"
          + (f" | loss scale {scaler.scale:g}" if scaler else ""), flush=True)
    run.metrics.log("train", step, tokens=step * tokens, loss=loss, lr=lr, grad_norm=norm,
                    tokens_per_s=tokens / dt, **scale)


def log_eval(cfg, run, step, val_loss, train_s=0.0):
    """train_s: seconds spent in training steps since the process started (evals, saves and
    start-up excluded): the time axis of a time-to-loss comparison (python -m bench speedrun)."""
    val_ppl = perplexity(val_loss)
    print(f"step {step:5d} | val loss {val_loss:.4f} | val ppl {val_ppl:.2f}", flush=True)
    run.metrics.log("eval", step, tokens=step * tokens_per_step(cfg, run), val_loss=val_loss,
                    val_ppl=val_ppl, train_s=round(train_s, 3))


def sampling_model(run):
    """The model rank 0 samples from: the training model, or with tensor parallelism a
    1-process copy of it on rank 0 (every rank calls this: the slices are gathered)."""
    model = run.model
    if model.tp is None:
        return model
    state = tensor_parallel.gather_state_dict(model)
    if not run.dist.is_main:
        return None
    full = GPT(model.cfg, model.impls).to(run.device)
    full.load_state_dict(state)
    return full


def sample(cfg, run, model):
    tok = run.tokenizer
    ids = tok.encode(cfg.sample_prompt) or [tok.eot]
    prompt = torch.tensor([ids], dtype=torch.long, device=run.device)
    model.eval()
    with run.autocast:
        out = generate(model, prompt, cfg.sample_tokens, top_k=50, seed=cfg.seed)
    return tok.decode(out[0].tolist())


def start(cfg):
    """setup(), then restore() when resuming; returns (run, first step to take)."""
    resume_from, run_dir = locate(cfg)
    try:
        run = setup(cfg, resume_from)
        if cfg.init_from and not resume_from:
            load_weights(run, cfg.init_from)
        done = restore(cfg, run, resume_from) if resume_from else 0
    except ValueError as e:  # bad data/kernels/shape/checkpoint choices, before any work
        raise ConfigError(str(e)) from e
    run.dir = run_dir
    if not run.dist.is_main:  # only rank 0 writes the run dir and prints
        run.lock, run.metrics = contextlib.nullcontext(), contextlib.nullcontext()
        return run, done + 1
    run.lock = RunDirLock(run_dir)
    try:
        if resume_from:
            set_aside_future(run_dir, done)
        run.metrics = MetricsWriter(run_dir, run.config, resume_step=done if resume_from else None)
    except BaseException:
        run.lock.close()
        raise
    print(f"run dir: {run_dir}" + (f" (resumed from {resume_from}, step {done})" if resume_from else ""))
    layout = f" (tp={run.dist.tp} x dp={run.dist.dp})" if run.dist.tp > 1 else ""
    print(f"model: {run.n_params / 1e6:.2f}M non-embedding params on {run.device}{layout}")
    return run, done + 1


def train(cfg):
    """Runs the whole training; returns {'first_val' (fresh runs), 'val', 'sample', 'stopped'
    (the step a Ctrl-C stopped at, or None), 'early_stopped' (the step --early_stop or
    --target_loss ended the run at, or None), 'checkpoint' (the last one saved)}. Under torchrun every rank evaluates
    its share of the validation batches (a tp group shares one); only rank 0 logs, samples and
    writes, and the other ranks return no 'sample' or 'checkpoint'."""
    run, first = start(cfg)
    history, is_main = {"stopped": None, "early_stopped": None}, run.dist.is_main
    with contextlib.closing(run.dist), run.lock, run.metrics, StopOnInterrupt() as interrupt:
        if first == 1:
            history["first_val"] = evaluate(cfg, run)
            if is_main:
                log_eval(cfg, run, 0, history["first_val"])
        t0, timed = time.perf_counter(), 0  # timed steps since t0: evals and saves excluded
        train_s = 0.0  # seconds in train_step since this process started
        skipped = 0  # non-finite steps in a row
        for step in range(first, cfg.max_steps + 1):
            lr = get_lr(cfg, step - 1)
            step_start = time.perf_counter()
            loss, norm = train_step(cfg, run, lr)  # returns host floats: the step has finished
            train_s += time.perf_counter() - step_start
            run.dist.waiting_for("")
            timed += 1
            stop = run.dist.any(interrupt.requested)  # every rank stops after the same step
            if step % cfg.log_interval == 0:
                loss = run.dist.mean(loss)
                if is_main:
                    log(cfg, run, step, loss, lr, norm, (time.perf_counter() - t0) / timed)
            evaluated = step % cfg.eval_interval == 0 or step == cfg.max_steps
            if evaluated:
                history["val"] = evaluate(cfg, run)
                if is_main:
                    log_eval(cfg, run, step, history["val"], train_s)
            skipped = count_skipped(cfg, run, skipped, step, norm)
            if evaluated and not skipped and (track_best(cfg, run, step, history["val"])
                                              or reached_target(cfg, run, step, history["val"], train_s)):
                history["early_stopped"] = step
            periodic = cfg.ckpt_interval and step % cfg.ckpt_interval == 0
            ends = periodic or step == cfg.max_steps or stop or history["early_stopped"]
            if ends and skipped:
                if is_main:
                    print(f"step {step:5d} | not saving a checkpoint: this step was skipped "
                          f"(non-finite gradient)", flush=True)
            elif ends:
                history["checkpoint"] = save(cfg, run, step)
                run.dist.waiting_for(f"rank 0 to write the step-{step} checkpoint (raise "
                                        f"--dist_timeout_s={cfg.dist_timeout_s:g} if saves take longer)")
            if history["early_stopped"]:
                break
            if stop:
                if is_main:
                    print(f"stopped at step {step}; continue with --resume={run.dir}")
                history["stopped"] = step
                return history
            if step % cfg.log_interval == 0 or step % cfg.eval_interval == 0 or periodic:
                t0, timed = time.perf_counter(), 0
        sampler = sampling_model(run)
    if is_main and skipped:
        print("no sample: the last step was skipped (non-finite gradient)")
    elif is_main:
        history["sample"] = sample(cfg, run, sampler)
        print("sample:\n" + history["sample"])
    return history


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(__doc__.split("\n\n")[0] + "\n\noptions (--key=default):\n" + config_help())
        return
    cli(lambda args: train(config_from_args(args)), argv, (Diverged,))
    if dist.env_from_torchrun().world_size > 1:
        # A torchrun rank whose run is over (checkpoints written, files closed, process groups
        # destroyed) ends here, without the interpreter's finalisation: a non-main gloo rank
        # exiting while rank 0 still samples aborted now and then in that teardown ('terminate
        # called without an active exception', CI), a cause not found in PyTorch's exit path.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()

"""`python -m nanolm.train [--key=value ...]`: train a GPT-2 model (see nanolm/config.py).

train(cfg) is the whole run: setup() builds everything, then each step accumulates gradients
over grad_accum micro-batches and takes one optimizer step, with evaluate() and log() on their
intervals, and a sample printed at the end.
"""
import contextlib
import math
import sys
import time

import numpy as np
import torch

from nanolm import backends, dist
from nanolm.config import ConfigError, model_config, parse_args
from nanolm.data import Loader, get_tokenizer, load_dataset
from nanolm.model import GPT
from nanolm.optim import FlatAdamW

# Dense bf16 tensor-core peak, TFLOP/s, matched by substring of the device name.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0,
               "RTX 4090": 165.0, "RTX 3090": 71.0}


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
    name = torch.cuda.get_device_name(device)
    return next((v * 1e12 for k, v in PEAK_TFLOPS.items() if k in name), None)


def get_lr(cfg, step):
    """Linear warmup to lr, then cosine decay to min_lr at max_steps."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.max_steps - cfg.warmup)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))) * (cfg.lr - cfg.min_lr)


def flops_per_token(model):
    """6N for the matmuls plus attention's 6*L*T*C (forward + backward), as in the PaLM paper."""
    c = model.cfg
    return 6 * model.num_params() + 6 * c.n_layer * c.block_size * c.n_embd


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
    choice = backends.resolve(cfg.kernels, device)
    if env.is_main:
        print("kernels: " + ", ".join(f"{op}={name}" for op, name in choice.items()))
    kernels = backends.modules(choice)
    model = GPT(mcfg, kernels).to(device)
    opt = FlatAdamW(model.named_parameters(), cfg.lr, (cfg.beta1, cfg.beta2), 1e-8,
                    cfg.weight_decay, cfg.grad_clip, kernels["adamw"], pad_to=env.world_size)
    ctx = dist.Context(env, device, cfg.dist_timeout_s)
    ctx.attach(opt, cfg.bucket_mb, cfg.zero)
    # each rank reads its own batch_size windows of every global step: see Loader
    train = Loader(train_tokens, cfg.batch_size, mcfg.block_size, cfg.seed, env.rank, env.world_size)
    val = Loader(val_tokens, cfg.batch_size, mcfg.block_size, cfg.seed + 1)
    return dict(device=device, tokenizer=tokenizer, model=model, opt=opt, train=train, val=val,
                val_start=val.state_dict(), autocast=autocast_ctx(cfg, device), dist=ctx)


@torch.no_grad()
def evaluate(cfg, run):
    """Mean loss over the same eval_iters validation batches every time (the loader is rewound)."""
    run["model"].eval()
    run["val"].load_state_dict(run["val_start"])
    total = 0.0
    for _ in range(cfg.eval_iters):
        x, y = run["val"].next_batch(run["device"])
        with run["autocast"]:
            total += run["model"](x, y).item()
    run["model"].train()
    return total / cfg.eval_iters


def train_step(cfg, run, lr):
    """grad_accum micro-batches, each loss scaled by 1/grad_accum, then one optimizer step.
    With several ranks, gradients are averaged during the last micro-batch's backward."""
    model, opt = run["model"], run["opt"]
    opt.zero_grad()
    total = 0.0
    for i in range(cfg.grad_accum):
        x, y = run["train"].next_batch(run["device"])
        with run["autocast"]:
            loss = model(x, y) / cfg.grad_accum
        if i == cfg.grad_accum - 1:
            run["dist"].arm()
        loss.backward()
        total += loss.item()
    run["dist"].finish()
    norm = opt.step(lr)
    return total, norm


def log(cfg, run, step, loss, lr, norm, dt):
    world = run["dist"].env.world_size
    tokens = cfg.batch_size * cfg.grad_accum * run["model"].cfg.block_size * world
    peak = peak_flops(cfg, run["device"])
    mfu = f"{100 * flops_per_token(run['model']) * tokens / dt / (peak * world):.1f}%" if peak else "-"
    skipped = f" skipped {run['opt'].skipped}" if run["opt"].skipped else ""
    print(f"step {step:5d} | loss {loss:.4f} | lr {lr:.2e} | norm {norm:.3f} | "
          f"{1000 * dt:.0f} ms/step | {tokens / dt:.0f} tok/s | mfu {mfu}{skipped}", flush=True)


def sample(cfg, run):
    tok, model = run["tokenizer"], run["model"]
    prompt = torch.tensor([tok.encode("def ")], dtype=torch.long, device=run["device"])
    gen = torch.Generator(device=run["device"]).manual_seed(cfg.seed)
    model.eval()
    with run["autocast"]:
        out = model.generate(prompt, cfg.sample_tokens, top_k=50, generator=gen)
    return tok.decode(out[0].tolist())


def train(cfg):
    """Runs the whole training; returns {'first_val', 'val', 'sample'} (on rank 0; other
    ranks of a multi-process run only train, and return {})."""
    try:
        run = setup(cfg)
    except ValueError as e:  # bad data/kernels/shape choices: a config error, before any work
        raise ConfigError(str(e)) from e
    is_main, history = run["dist"].is_main, {}
    if is_main:
        print(f"model: {run['model'].num_params() / 1e6:.2f}M non-embedding params on {run['device']}")
        history["first_val"] = evaluate(cfg, run)
        print(f"step     0 | val loss {history['first_val']:.4f}", flush=True)
    t0 = time.perf_counter()
    for step in range(1, cfg.max_steps + 1):
        lr = get_lr(cfg, step - 1)
        loss, norm = train_step(cfg, run, lr)
        if step % cfg.log_interval == 0:
            loss = run["dist"].mean(loss)  # every rank takes part
            dt = (time.perf_counter() - t0) / cfg.log_interval
            if is_main:
                log(cfg, run, step, loss, lr, norm, dt)
            t0 = time.perf_counter()
        if is_main and (step % cfg.eval_interval == 0 or step == cfg.max_steps):
            history["val"] = evaluate(cfg, run)
            print(f"step {step:5d} | val loss {history['val']:.4f}", flush=True)
            t0 = time.perf_counter()
    if is_main:
        history["sample"] = sample(cfg, run)
        print("sample:\n" + history["sample"])
    run["dist"].close()
    return history


def main(argv=None):
    try:
        train(parse_args(sys.argv[1:] if argv is None else argv))
    except ConfigError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()

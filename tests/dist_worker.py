"""One rank of the multi-process tests in test_dist.py, and the single-process reference.

Run as `python tests/dist_worker.py SPEC_JSON` with RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT set (no torchrun agent: rank 0 hosts the store). SPEC:
  {"out": dir, "timeout_s": s, "tp": n, "runs": [{"name", "zero", "bucket_mb", "steps", "more_steps", "optim"}],
   "die_at": step, "hang_at": step}   # die/hang: rank 1 exits / sleeps at that step
With tp > 1 the ranks form tp x (world/tp) (nanolm.dist.layout_groups) and the model is
tensor parallel; what is saved is gathered (the 1-process tensors), on every rank.
Each run trains a fresh tiny GPT through nanolm.train.train_step; every rank writes
out/rank<r>.pt with, per run, the weights after `steps` steps, the gathered optimizer and
loader states at that point, and the weights after `more_steps` further steps.
"""
import contextlib
import json
import os
import sys
import time
import types

import numpy as np
import torch

from nanolm import dist, tensor_parallel
from nanolm.config import ModelConfig
from nanolm.data import Loader
from nanolm.model import GPT
from nanolm.optim import FlatAdamW, FlatMuon, hidden_matrices
from nanolm.train import Run, train_step
from nanolm.ops import backends

TORCH = backends.resolve("torch", torch.device("cpu"))
MODEL = ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=40, vocab_multiple=64)
BATCH, GRAD_ACCUM, LR = 2, 2, 3e-3  # per-rank batch; grad_accum micro-steps per step
TOKENS = np.random.default_rng(0).integers(0, MODEL.vocab_size, 4000)


def make_run(ctx, batch, zero=0, bucket_mb=25.0, impls=TORCH, optim="adamw"):
    """A fresh model, optimizer and loader on this rank. Each rank initialises differently
    (seed + rank): only the broadcasts from rank 0 (of the tp group, then of the dp group)
    make them agree. optim="muon": FlatMuon with fp32 Newton-Schulz, so that the ranks'
    differently ordered gradient sums stay within fp32 tolerance of one process (bf16 would
    round some of them apart)."""
    torch.manual_seed(1 + ctx.env.rank)
    model = GPT(MODEL, impls)
    if ctx.tp_comm is not None:
        tensor_parallel.parallelize(model, ctx.tp_comm)
    adamw = dict(lr=LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, grad_clip=0.05, backend=impls["adamw"],
                 pad_to=ctx.dp)
    opt = (FlatAdamW(model.named_parameters(), **adamw) if optim == "adamw" else
           FlatMuon(model.named_parameters(), hidden_matrices(model), **adamw, ns_dtype=torch.float32))
    ctx.attach(opt, bucket_mb, zero)
    loader = Loader(TOKENS, batch, MODEL.block_size, seed=5, rank=ctx.dp_rank, world_size=ctx.dp)
    return Run(device=torch.device("cpu"), tokenizer=None, model=model, opt=opt, train=loader, val=None,
               val_start=None, autocast=contextlib.nullcontext(), dist=ctx, config={}, n_params=0)


def train(run, steps, on_step=None):
    cfg = types.SimpleNamespace(grad_accum=GRAD_ACCUM)
    for step in range(1, steps + 1):
        if on_step:
            on_step(step)
        train_step(cfg, run, LR)


def weights(run):
    """The 1-process parameters (gathered over the tp group: a collective then)."""
    full = tensor_parallel.gather_state_dict(run.model)
    return {n: full[n].detach().clone() for n, _ in run.model.named_parameters()}


def optimizer_state(run):
    """The 1-process optimizer state (gathered over the dp and tp groups: collectives)."""
    return tensor_parallel.gather_optimizer_state(run.opt, run.opt.state_dict(), run.model)


def fault(spec, rank):
    """What rank 1 does at spec's die_at / hang_at step, to test the others' failure path."""
    def on_step(step):
        if rank == 1 and step == spec.get("die_at"):
            os._exit(1)
        if rank == 1 and step == spec.get("hang_at"):
            time.sleep(600)
    return on_step


def main():
    spec = json.loads(sys.argv[1])
    ctx = dist.Context(dist.env_from_torchrun(), torch.device("cpu"), spec.get("timeout_s", 30.0),
                       tp=spec.get("tp", 1))
    results = {}
    for r in spec["runs"]:
        run = make_run(ctx, BATCH, r["zero"], r["bucket_mb"], optim=r.get("optim", "adamw"))
        train(run, r["steps"], fault(spec, ctx.env.rank))
        results[r["name"]] = dict(
            weights=weights(run), opt=optimizer_state(run), loader=run.train.state_dict(),
            buckets=[(b.start, b.end) for b in ctx.reducer.buckets] if ctx.reducer else [],
            moments_numel=run.opt.exp_avg.numel(), flat_numel=run.opt.flat_param.numel(),
            muon_momentum_numel=sum(m.numel() for m in getattr(run.opt, "momentum_buffers", {}).values()),
            local=[(n, p.detach().clone()) for n, p in run.model.named_parameters()])
        train(run, r.get("more_steps", 0))
        results[r["name"]]["more_weights"] = weights(run)
    torch.save(results, os.path.join(spec["out"], f"rank{ctx.env.rank}.pt"))
    ctx.close()


if __name__ == "__main__":
    main()

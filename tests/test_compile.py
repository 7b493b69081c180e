"""`--compile`: torch.compile(model, fullgraph=True) over the registered ops (nanolm/ops/) trains
as eager does, with the cpu kernels, dropout, --recompute=block, gradient accumulation, fp32 and
bf16 autocast, and under tensor parallelism; the traced model has no graph break. Models are tiny:
a compile takes tens of seconds on 2 cores, so one compiled model serves every dtype."""
import copy
import os
import subprocess
import sys

import pytest
import torch

from nanolm.config import ModelConfig
from nanolm.model import GPT, compiled
from nanolm.ops import backends
from nanolm.optim import FlatAdamW

# No biases: the attention's key bias has a gradient of exactly 0 in exact arithmetic (softmax
# ignores a constant per row), so in float it is rounding noise, which AdamW normalises into steps
# of up to the lr: compiled and eager would differ there by rounding, scaled up to the lr.
CFG = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, vocab_multiple=64, dropout=0.1,
                  bias=False)
# the modern block: GQA, RoPE + QK-norm, parameter-free RMSNorm, SwiGLU, untied, softcapped loss
MODERN = ModelConfig(n_layer=2, n_head=2, n_kv_head=1, n_embd=32, block_size=16, vocab_size=64, vocab_multiple=64,
                     dropout=0.1, bias=False, pos="rope", qk_norm=True, norm="rmsnorm", norm_weight=False,
                     mlp="swiglu", tie_embeddings=False, logit_softcap=15.0)
STEPS, GRAD_ACCUM = 20, 2
# 20 AdamW steps of compiled vs eager: the registered ops are the same kernels, the rest (GELU,
# matmuls, bias adds) Inductor's fused code, rounded differently: fp32 rounding, and in bf16 the
# rounding of the bf16 activations it keeps in fp32 between fused ops
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=3e-2, atol=3e-3)}


def _model(cfg=CFG):
    torch.manual_seed(0)
    model = GPT(cfg, backends.resolve("cpu", torch.device("cpu")), recompute="block")
    model.dropout.seed = 7
    return model


def _train(model, forward, dtype):
    """STEPS AdamW steps of GRAD_ACCUM micro-batches under `dtype` autocast: the losses and the
    final parameters."""
    opt = FlatAdamW(model.named_parameters(), 3e-3, (0.9, 0.95), 1e-8, 0.1, 1.0, "cpu")
    data = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(STEPS):
        for _ in range(GRAD_ACCUM):
            x = torch.randint(0, CFG.vocab_size, (4, CFG.block_size), generator=data)
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                loss = forward(x, x.roll(-1, 1)) / GRAD_ACCUM
            loss.backward()
            losses.append(loss.detach())
        opt.step(3e-3)
        opt.zero_grad()
    return torch.stack(losses), {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.slow
@pytest.mark.parametrize("cfg", [CFG, MODERN], ids=["gpt2", "modern"])
def test_compiled_training_equals_eager(cfg):
    model = _model(cfg)
    start = copy.deepcopy(model.state_dict())
    forward = compiled(model)
    for dtype in TOL:
        model.load_state_dict(start)  # the dropout stream's count of forwards too
        got_losses, got = _train(model, forward, dtype)
        eager = _model(cfg)
        want_losses, want = _train(eager, eager, dtype)
        torch.testing.assert_close(got_losses, want_losses, **TOL[dtype])
        for name in want:
            torch.testing.assert_close(got[name], want[name], **TOL[dtype], msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("cfg", [CFG, MODERN], ids=["gpt2", "modern"])
def test_no_graph_breaks(cfg):
    """The training forward (dropout, block recompute) traces as one graph."""
    model = _model(cfg)
    x = torch.randint(0, CFG.vocab_size, (2, CFG.block_size))
    explanation = torch._dynamo.explain(model)(x, x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.slow
def test_tensor_parallel_compiled_run_matches_eager(tmp_path):
    """`torchrun --nproc_per_node=2 -m nanolm.train --tp=2 --compile` (cpu kernels, gloo, grad
    accumulation) ends at the weights of the same run in eager."""
    from test_dist import assert_weights_close, free_port
    args = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=2", "--eval_iters=1",
            "--eval_interval=100", "--log_interval=1", "--max_steps=3", "--sample_tokens=4", "--kernels=cpu",
            "--grad_accum=2", "--dtype=float32", "--lr=3e-3", "--warmup=1", "--tp=2"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHELASTIC")}
    for run, more in (("eager", []), ("compiled", ["--compile"])):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               "-m", "nanolm.train", *args, *more, f"--out_dir={tmp_path / run}"]
        p = subprocess.run(cmd, cwd=tmp_path, env=dict(env, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                           timeout=540)
        assert p.returncode == 0, p.stderr
    eager, compiled_run = (torch.load(tmp_path / d / "ckpt_00000003.pt", weights_only=True)
                           for d in ("eager", "compiled"))
    assert compiled_run["config"]["compile"] and not eager["config"]["compile"]
    assert_weights_close(compiled_run["model"], eager["model"])

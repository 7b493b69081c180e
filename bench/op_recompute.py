"""Activation recomputation (train.py's --recompute): one training step of nanolm with the
kernels train.py picks on the device (`auto`), for each mode, none | mlp | block, as in
op_train_step. The point is the peak memory column (activations and gradients allocated during
the step) against the time the recomputation costs. TFLOP/s counts the model FLOPs of a step
without recomputation (nanolm/flops.py), so the recomputed forward shows as a
lower rate, not as extra work.

Correctness: each mode's first step must return exactly the (loss, pre-clip gradient norm) of
mode none (tolerance 0): recomputation is bit-identical, not merely close."""
import torch

from bench.cases import Case, Impl, shape_key
from bench.op_train_step import TORCH_IMPLS, _nanolm_model, datasheet_peak_tflops, nanolm_impl
from nanolm import flops
from nanolm.model import RECOMPUTE
from nanolm.ops import backends

CONFIGS = {  # (n_layer, n_head, n_embd, block_size, vocab_size, batch), as op_train_step
    "full_cuda": {"gpt2-124M": (12, 12, 768, 1024, 50257, 16)},
    "quick_cuda": {"gpt2-124M": (12, 12, 768, 1024, 50257, 8)},
    # one sequence of 1024: a step takes ~10 s on 2 cores, so the 3 modes fit in minutes
    "full_cpu": {"gpt2-124M": (12, 12, 768, 1024, 50257, 1)},
    "quick_cpu": {"gpt2-124M": (12, 12, 768, 256, 50257, 1)},
    "tiny": {"tiny": (2, 2, 32, 16, 64, 2)},
}


def _case(name, cfg, device):
    n_layer, n_head, n_embd, block_size, vocab, batch = cfg
    with torch.device("meta"):
        n_params = _nanolm_model(cfg, TORCH_IMPLS).num_params()
    choice = backends.resolve("auto", device)
    precision = torch.bfloat16 if device.type == "cuda" else torch.float32  # as the label says
    # mode none is the baseline: the other modes' speedup over it is their slowdown
    impls = [Impl(f"recompute={mode}", "baseline" if mode == "none" else "nanolm",
                  nanolm_impl(cfg, device, choice, mode, precision)) for mode in RECOMPUTE]
    reference = nanolm_impl(cfg, device, choice, "none", precision)

    def make_inputs():
        return {"idx": torch.randint(0, vocab, (batch, block_size), device=device),
                "targets": torch.randint(0, vocab, (batch, block_size), device=device)}
    label = "fp32" if precision == torch.float32 else "bf16 autocast"
    kernel_names = ",".join(sorted(set(choice.values())))
    tokens = batch * block_size
    return Case(op="recompute", dtype=precision, name=f"{name} B={batch} T={block_size} {label} kernels={kernel_names}",
                series=label, x=n_params, x_label="parameters (non-embedding)", metric="TFLOP/s",
                work=tokens * flops.train_flops_per_token(n_params, n_layer, n_embd, block_size),
                make_inputs=make_inputs, reference=lambda t: reference(t)(), impls=impls, tol=0.0,
                budget_ms=2000 if device.type == "cuda" else 1000, per_call={"tokens": tokens},
                peak_tflops=datasheet_peak_tflops(device))


def cases(device, size):
    return [_case(name, cfg, device) for name, cfg in CONFIGS[shape_key(size, device)].items()]

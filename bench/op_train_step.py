"""End to end: one training step (forward, backward, AdamW step) of nanolm's GPT for each
kernel set (auto, torch, and every backend that implements all ops) against the plain-PyTorch
GPT-2 of reference_gpt.py (eager and torch.compile), same model, batch and precision (bf16
autocast on GPU, fp32 on CPU). Reported as TFLOP/s of the model FLOPs, whose % of the measured
matmul ceiling is the MFU, plus tokens/s."""
import math
from contextlib import nullcontext

import torch

from bench import formulas
from bench.cases import Case, Impl, compile_baselines
from bench.reference_gpt import ReferenceGPT
from nanolm import backends

CONFIGS = {  # (n_layer, n_head, n_embd, block_size, vocab_size, batch)
    "full": {"gpt2-124M": (12, 12, 768, 1024, 50304, 16), "gpt2-355M": (24, 16, 1024, 1024, 50304, 8)},
    "quick_cuda": {"gpt2-124M": (12, 12, 768, 1024, 50304, 8)},
    "quick_cpu": {"small": (2, 4, 256, 128, 8192, 4)},
    "tiny": {"tiny": (1, 2, 32, 16, 64, 2)},
}
LR, WD = 6e-4, 0.1


def _autocast(device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def _step_fn(model, opt, idx, targets, device):
    def run():
        with _autocast(device):
            loss = model(idx, targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return (loss.detach(),)
    return run


def _reference_impl(cfg, device, compiled):
    def make(t):
        n_layer, n_head, n_embd, block_size, vocab, _ = cfg
        model = ReferenceGPT(n_layer, n_head, n_embd, block_size, vocab).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD,
                                **({"fused": True} if device.type == "cuda" else {"foreach": True}))
        return _step_fn(torch.compile(model) if compiled else model, opt, t["idx"], t["targets"], device)
    return make


def _nanolm_impl(cfg, device, spec):
    def make(t):
        from nanolm.config import ModelConfig
        from nanolm.model import GPT
        from nanolm.optim import AdamW
        n_layer, n_head, n_embd, block_size, vocab, _ = cfg
        config = ModelConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size,
                             vocab_size=vocab, bias=True, dropout=0.0)
        kernels = backends.modules(backends.resolve(spec, device))
        model = GPT(config, kernels).to(device)
        opt = AdamW(model.parameters(), lr=LR, weight_decay=WD, kernels=kernels)
        return _step_fn(model, opt, t["idx"], t["targets"], device)
    return make


def _nanolm_impls(cfg, device):
    """Kernel sets: auto, then every backend that implements all ops; or why none can run."""
    try:
        import nanolm.config  # noqa: F401
        import nanolm.model  # noqa: F401
        import nanolm.optim  # noqa: F401
    except ImportError as e:
        return [], {"nanolm": f"model/optimizer not importable in this checkout ({e})"}
    sets = ["auto"] + [n for n in backends.BACKENDS
                       if all(backends.unavailable_reason(n, op, device) is None for op in backends.OPS)]
    return [Impl(f"nanolm[{s}]", "nanolm", _nanolm_impl(cfg, device, s)) for s in sets], {}


def _sanity(vocab):
    """Different models, different init: a correct step gives a finite loss near ln(V) at init."""
    def ref(t):
        return (torch.tensor(math.log(vocab)),)
    return ref


def cases(device, size):
    quick = size != "full"
    key = size if size in ("full", "tiny") else f"quick_{device.type}"
    out = []
    for name, cfg in CONFIGS[key].items():
        n_layer, n_head, n_embd, block_size, vocab, batch = cfg
        n_params = sum(p.numel() for p in ReferenceGPT(*cfg[:5]).parameters()) - block_size * n_embd
        tokens = batch * block_size
        impls, skipped = _nanolm_impls(cfg, device)
        impls.append(Impl("eager", "baseline", _reference_impl(cfg, device, False)))
        if compile_baselines(device, quick):
            impls.append(Impl("torch.compile", "baseline", _reference_impl(cfg, device, True)))

        def make_inputs(batch=batch, block_size=block_size, vocab=vocab):
            return {"idx": torch.randint(0, vocab, (batch, block_size), device=device),
                    "targets": torch.randint(0, vocab, (batch, block_size), device=device)}
        precision = "bf16 autocast" if device.type == "cuda" else "fp32"
        out.append(Case(op="train_step", name=f"{name} B={batch} T={block_size} {precision}",
                        series=precision, x=n_params, x_label="parameters", metric="TFLOP/s",
                        work=tokens * formulas.train_flops_per_token(n_params, n_layer, n_embd, block_size),
                        make_inputs=make_inputs, reference=_sanity(vocab), impls=impls, tol=0.05,
                        skipped=skipped, budget_ms=2000 if device.type == "cuda" else 1000,
                        per_call={"tokens": tokens}))
    return out

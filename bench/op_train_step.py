"""End to end: one training step of nanolm, as nanolm/train.py's train_step takes it (zero the
flat gradient, forward under autocast, backward, FlatAdamW step with global-norm clipping), for
each kernel set the device can run, against the plain-PyTorch GPT-2 of reference_gpt.py (eager,
and torch.compile of it with SDPA attention) with torch.optim.AdamW and clip_grad_norm_; and
nanolm with --compile (torch.compile(model, fullgraph=True) over the auto kernel set) beside them.
Same model shape, the same initial weights (copied), batch and precision: bf16 autocast on GPU;
on CPU fp32, and also bf16 autocast (torch.autocast("cpu")) where the CPU computes bf16 natively,
at the CPU_BF16 shapes. On CPU the implementations of a case are timed interleaved, as every
CPU case is (bench/runner.py).
Reported as TFLOP/s of the model FLOPs (flops.train_flops_per_token in nanolm/flops.py, the count
train.py logs MFU with), tokens/s, and MFU against the datasheet peak where one is known.

Correctness: every implementation's first step returns (loss, pre-clip gradient norm), checked
against ReferenceGPT in float64 with the same weights and batch, so a wrong forward or backward
kernel in any kernel set fails before it is timed."""
import torch

from bench.cases import EMULATED, Case, Impl, backend_unavailable, shape_key, tol_for
from bench.reference_gpt import ReferenceGPT
from nanolm import flops
from nanolm.config import ModelConfig
from nanolm.model import GPT, compiled
from nanolm.optim import FlatAdamW
from nanolm.ops import OPS, backends
from nanolm.precision import native_bf16_cpu

CONFIGS = {  # (n_layer, n_head, n_embd, block_size, vocab_size, batch); vocab padded to 128s
    "full_cuda": {"gpt2-124M": (12, 12, 768, 1024, 50257, 16), "gpt2-355M": (24, 16, 1024, 1024, 50257, 8)},
    "full_cpu": {"small": (2, 4, 256, 128, 8192, 4), "6L-384": (6, 6, 384, 256, 50257, 4),
                 "quickstart": (4, 4, 128, 128, 256, 16), "6L-384-byte": (6, 6, 384, 256, 256, 8)},
    "quick_cuda": {"gpt2-124M": (12, 12, 768, 1024, 50257, 8)},
    "quick_cpu": {"small": (2, 4, 256, 128, 8192, 4)},
    "tiny": {"tiny": (1, 2, 32, 16, 64, 2)},
}
LR, BETAS, EPS, WD, GRAD_CLIP = 6e-4, (0.9, 0.95), 1e-8, 0.1, 1.0  # train.py's defaults; GPT-2 124M's lr
SEED = 1234
TORCH_IMPLS = {op: "torch" for op in OPS}
# also timed in bf16 on a CPU with native bf16 (issue 18's shapes, and 6L-384 for --compile)
CPU_BF16 = ("quickstart", "6L-384", "6L-384-byte")
TINY_COMPILE_SKIPPED = {name: "not run at the test suite's toy size (compiling takes ~30 s on CPU)"
                        for name in ("torch.compile", "nanolm[auto] --compile")}


def _config(cfg):
    n_layer, n_head, n_embd, block_size, vocab, _ = cfg
    return ModelConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size,
                       vocab_size=vocab, bias=True, dropout=0.0)


def _nanolm_model(cfg, impls, recompute="none"):
    """nanolm's GPT with the bench's fixed initial weights (built on CPU, as train.py does)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return GPT(_config(cfg), impls, recompute)


def _copy_weights(src, dst):
    """nanolm GPT -> ReferenceGPT: same tensors, different module names."""
    tr = src.transformer
    pairs = [(dst.wte, tr.wte), (dst.wpe, tr.wpe), (dst.ln_f, tr.ln_f)]
    for a, b in zip(dst.h, tr.h):
        pairs += [(a.ln_1, b.ln_1), (a.c_attn, b.attn.c_attn), (a.c_proj, b.attn.c_proj),
                  (a.ln_2, b.ln_2), (a.c_fc, b.mlp.c_fc), (a.mlp_proj, b.mlp.c_proj)]
    with torch.no_grad():
        for a, b in pairs:
            a.weight.copy_(b.weight)
            if getattr(a, "bias", None) is not None:
                a.bias.copy_(b.bias)
    return dst


def reference_model(cfg, device, dtype=torch.float32):
    """ReferenceGPT holding the same initial weights as every nanolm kernel set."""
    config = _config(cfg)
    ref = ReferenceGPT(config.n_layer, config.n_head, config.n_embd, config.block_size,
                       config.vocab_size, config.padded_vocab)
    src = _nanolm_model(cfg, TORCH_IMPLS)
    return _copy_weights(src, ref).to(device=device, dtype=dtype)


def _autocast(device, precision):
    return torch.autocast(device.type, dtype=precision, enabled=precision != torch.float32)


def nanolm_impl(cfg, device, impls, recompute="none", precision=torch.float32, compile=False):
    """nanolm's train step with `impls` ({op: backend name}, as train.py's setup builds), the
    model compiled as --compile does when `compile`."""
    def make(t):
        model = _nanolm_model(cfg, impls, recompute).to(device)
        forward = compiled(model) if compile else model
        opt = FlatAdamW(model.named_parameters(), LR, BETAS, EPS, WD, GRAD_CLIP, impls["adamw"])

        def run():
            opt.zero_grad()
            with _autocast(device, precision):
                loss = forward(t["idx"], t["targets"])
            loss.backward()
            norm = opt.step(LR)
            return loss.detach(), torch.tensor(norm, device=device)
        return run
    return make


def _reference_impl(cfg, device, compiled, precision):
    def make(t):
        model = reference_model(cfg, device)
        params = list(model.parameters())
        opt = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, fused=True)
        forward = torch.compile(model) if compiled else model

        def run():
            opt.zero_grad(set_to_none=True)
            with _autocast(device, precision):
                loss = forward(t["idx"], t["targets"])
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
            opt.step()
            return loss.detach(), norm.detach()
        return run
    return make


def _float64_reference(cfg):
    def ref(t):
        model = reference_model(cfg, t["idx"].device, torch.float64)
        loss = model(t["idx"], t["targets"])
        loss.backward()
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
        return loss.detach(), norm
    return ref


def backend_choices(device):
    """({label: {op: backend}} of backend choices to time, {label: why not}): one per backend that
    can run every op here, plus `auto` when it mixes backends (else it equals one of them)."""
    sets, skipped = {}, {}
    for name in backends.BACKENDS:
        if name in EMULATED:
            skipped[f"nanolm[{name}]"] = "emulated: run in the op cases only (--impls cuda_sim)"
            continue
        reasons = {op: backend_unavailable(name, op, device) for op in OPS}
        missing = {op: r for op, r in reasons.items() if r is not None}
        if missing:
            op, why = next(iter(missing.items()))
            skipped[f"nanolm[{name}]"] = f"{op}: {why}"
        else:
            sets[f"nanolm[{name}]"] = {op: name for op in OPS}
    auto = backends.resolve("auto", device)
    same = [label for label, choice in sets.items() if choice == auto]
    if same:
        skipped["nanolm[auto]"] = f"picks the kernels of {same[0]} on this device"
    else:
        sets["nanolm[auto]"] = auto
    return sets, skipped


def datasheet_peak_tflops(device):
    """Dense bf16 peak of the GPU from nanolm/flops.py (the trainer's MFU denominator), or None."""
    return flops.peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def _case(name, cfg, device, compiled, precision):
    n_layer, n_head, n_embd, block_size, vocab, batch = cfg
    with torch.device("meta"):  # only the parameter count: no memory, no init work
        n_params = _nanolm_model(cfg, TORCH_IMPLS).num_params()
    tokens = batch * block_size
    sets, skipped = backend_choices(device)
    impls = [Impl(label, "nanolm", nanolm_impl(cfg, device, choice, precision=precision))
             for label, choice in sets.items()]
    impls.append(Impl("eager", "baseline", _reference_impl(cfg, device, False, precision)))
    if compiled:
        impls.append(Impl("torch.compile", "baseline", _reference_impl(cfg, device, True, precision)))
        impls.append(Impl("nanolm[auto] --compile", "nanolm",
                          nanolm_impl(cfg, device, backends.resolve("auto", device), precision=precision,
                                      compile=True)))

    def make_inputs():
        return {"idx": torch.randint(0, vocab, (batch, block_size), device=device),
                "targets": torch.randint(0, vocab, (batch, block_size), device=device)}
    label = "fp32" if precision == torch.float32 else "bf16 autocast"
    return Case(op="train_step", dtype=precision, name=f"{name} B={batch} T={block_size} {label}", series=label,
                x=n_params, x_label="parameters (non-embedding)", metric="TFLOP/s",
                work=tokens * flops.train_flops_per_token(n_params, n_layer, n_embd, block_size),
                make_inputs=make_inputs, reference=_float64_reference(cfg), impls=impls,
                tol=tol_for(precision), skipped=skipped if compiled else {**skipped, **TINY_COMPILE_SKIPPED},
                budget_ms=2000 if device.type == "cuda" else 1000, per_call={"tokens": tokens},
                peak_tflops=datasheet_peak_tflops(device))


def cases(device, size):
    """torch.compile of the reference model runs in --quick on CPU too (unlike the op cases):
    one small model compiles in about 30 s on 2 cores, and this is the comparison a CPU-only
    user needs. Only the test suite's toy size leaves it out."""
    key = shape_key(size, device)
    compiled = device.type == "cuda" or size != "tiny"
    if device.type == "cuda":
        return [_case(name, cfg, device, compiled, torch.bfloat16) for name, cfg in CONFIGS[key].items()]
    bf16 = native_bf16_cpu() is not None
    return [_case(name, cfg, device, compiled, precision) for name, cfg in CONFIGS[key].items()
            for precision in (torch.float32, torch.bfloat16) if precision == torch.float32 or
            (bf16 and (name in CPU_BF16 or size == "tiny"))]

"""AdamW step over fp32 parameters, gradients and state: nanolm's flat-buffer kernels against
torch.optim.AdamW(fused=True) and (foreach=True) over the model's parameter tensors (views into
the same flat buffers, so all see identical data). Sets: GPT-2 124M and 355M (124M on CPU)."""
import torch

from bench import formulas
from bench.cases import Case, Impl, nanolm_backends, shape_key
from nanolm.ops import adamw

HP = dict(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
MODELS = {  # name -> (n_layer, C, vocab, block_size)
    "full_cuda": {"124M": (12, 768, 50304, 1024), "355M": (24, 1024, 50304, 1024)},
    "full_cpu": {"124M": (12, 768, 50304, 1024)},
    "quick_cuda": {"124M": (12, 768, 50304, 1024)},
    "quick_cpu": {"5M": (4, 256, 8192, 256)},
    "tiny": {"tiny": (1, 16, 64, 16)},
}


def gpt2_shapes(n_layer, C, vocab, block_size):
    """Parameter shapes of GPT-2 (tied embeddings), in model order."""
    layer = [(C,), (C,), (3 * C, C), (3 * C,), (C, C), (C,), (C,), (C,), (4 * C, C), (4 * C,), (C, 4 * C), (C,)]
    return [(vocab, C), (block_size, C)] + layer * n_layer + [(C,), (C,)]


def _inputs(shapes, device):
    n = sum(torch.Size(s).numel() for s in shapes)

    def make():
        return {"p": 0.02 * torch.randn(n, device=device), "g": 1e-3 * torch.randn(n, device=device),
                "m": 1e-3 * torch.randn(n, device=device), "v": 1e-6 * torch.rand(n, device=device),
                "shapes": shapes}
    return make


def _reference(t):
    p, m, v = (t[k].clone() for k in "pmv")
    adamw.adamw_step(p, t["g"], m, v, HP["lr"], HP["beta1"], HP["beta2"], HP["eps"],
                         HP["weight_decay"], 1, p.numel(), 1.0)
    return p, m, v


def _nanolm(be):
    def make(t):
        p, g, m, v = (t[k].clone() for k in "pgmv")

        def run():
            be.adamw_step(p, g, m, v, HP["lr"], HP["beta1"], HP["beta2"], HP["eps"],
                          HP["weight_decay"], 1, p.numel(), 1.0)
            return p, m, v
        return run
    return make


def _views(flat, shapes):
    return [t.view(s) for t, s in zip(flat.split([torch.Size(s).numel() for s in shapes]), shapes)]


def _torch_optim(flag):
    def make(t):
        p, g, m, v = (t[k].clone() for k in "pgmv")
        params = [torch.nn.Parameter(x) for x in _views(p, t["shapes"])]
        opt = torch.optim.AdamW(params, lr=HP["lr"], betas=(HP["beta1"], HP["beta2"]), eps=HP["eps"],
                                weight_decay=HP["weight_decay"], **{flag: True})
        step_device = p.device if flag == "fused" else "cpu"
        for param, gv, mv, vv in zip(params, *(_views(x, t["shapes"]) for x in (g, m, v))):
            param.grad = gv
            opt.state[param] = {"step": torch.zeros((), device=step_device), "exp_avg": mv, "exp_avg_sq": vv}

        def run():
            opt.step()
            return p, m, v
        return run
    return make


def cases(device, size):
    key = shape_key(size, device)
    available, skipped = nanolm_backends("adamw", device)
    out = []
    for name, dims in MODELS[key].items():
        shapes = gpt2_shapes(*dims)
        n = sum(torch.Size(s).numel() for s in shapes)
        impls = [Impl(b, "nanolm", _nanolm(be)) for b, be in available.items()]
        impls += [Impl(f"torch.optim.AdamW({flag}=True)", "baseline", _torch_optim(flag))
                  for flag in ("fused", "foreach")]
        out.append(Case(op="adamw", dtype=torch.float32, name=f"{name} ({n / 1e6:.1f}M params) fp32",
                        series="fp32", x=n,
                        x_label="parameters", metric="GB/s", work=formulas.adamw_bytes(n),
                        make_inputs=_inputs(shapes, device), reference=_reference, impls=impls, tol=1e-5,
                        working_set=16 * n, skipped=skipped))
    return out

import math

import pytest
import torch

from nanolm.config import ModelConfig
from nanolm.model import GPT
from nanolm.optim import DynamicLossScale, FlatAdamW
from nanolm.ops import backends

TORCH = backends.resolve("torch", torch.device("cpu"))
HP = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
# The optimizer's AdamW step and gradient norm: the torch reference, and the CUDA kernels on the
# CPU (cuda_sim: clipping through grad_scale, the non-finite skip through sum_of_squares; the
# unclipped step is tests/test_adamw.py's).
ADAMW_BACKENDS = ["torch", pytest.param("cuda_sim", marks=pytest.mark.cuda_sim)]


def model_pair(seed=0):
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=40, vocab_multiple=64)
    torch.manual_seed(seed)
    a = GPT(cfg, TORCH)
    b = GPT(cfg, TORCH)
    b.load_state_dict(a.state_dict())
    return a, b


def torch_adamw(model, opt_flat, wd):
    """torch.optim.AdamW over the same params, in the flat optimizer's order."""
    named = dict(model.named_parameters())
    params = [named[n] for n in opt_flat.names]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": wd},
                              {"params": no_decay, "weight_decay": 0.0}], **HP)


def run_steps(flat_model, flat, ref_model, ref, steps, clip, loss_scale=1.0):
    for i in range(steps):
        idx = torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(i))
        flat.zero_grad()
        (loss_scale * flat_model(idx, idx)).backward()
        norm = flat.step()
        ref.zero_grad()
        (loss_scale * ref_model(idx, idx)).backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref_model.parameters(), clip if clip else math.inf)
        ref.step()
        assert norm == pytest.approx(ref_norm.item(), rel=1e-5)


@pytest.mark.parametrize("backend,clip,loss_scale", [
    ("torch", 0.0, 1.0), ("torch", 0.5, 1.0), ("torch", 1.0, 0.01),
    *(pytest.param("cuda_sim", clip, scale, marks=pytest.mark.cuda_sim) for clip, scale in ((0.5, 1.0), (1.0, 0.01)))])
def test_matches_torch_adamw(backend, clip, loss_scale):
    a, b = model_pair()
    flat = FlatAdamW(a.named_parameters(), weight_decay=0.1, grad_clip=clip, backend=backend, **HP)
    ref = torch_adamw(b, flat, 0.1)
    run_steps(a, flat, b, ref, 30, clip, loss_scale)
    assert_params_close(a, b)


def assert_params_close(a, b):
    """The key bias (c_attn.bias[C:2C]) has an analytically zero gradient (softmax ignores a
    per-row constant), so its gradient is float rounding noise that Adam normalises into
    lr-sized steps: it is compared loosely, everything else to float precision."""
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        if n.endswith("c_attn.bias"):
            C = p.numel() // 3
            torch.testing.assert_close(p[C:2 * C], q[C:2 * C], rtol=0, atol=1e-4, msg=n)
            p, q = torch.cat([p[:C], p[2 * C:]]), torch.cat([q[:C], q[2 * C:]])
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)


def test_flat_layout():
    a, _ = model_pair()
    flat = FlatAdamW(a.named_parameters(), weight_decay=0.1, backend=TORCH["adamw"], **HP)
    assert flat.decay_numel == sum(p.numel() for p in a.parameters() if p.dim() >= 2)
    assert flat.flat_param.numel() == sum(p.numel() for p in a.parameters())  # tied once
    offset = 0
    for (_name, off, n), p in zip(flat.layout, flat.params):
        assert off == offset and p.numel() == n
        assert p.data_ptr() == flat.flat_param[off:].data_ptr()
        assert p.grad.data_ptr() == flat.flat_grad[off:].data_ptr()
        offset += n
    assert all(p.dim() >= 2 for p in flat.params[:sum(1 for p in flat.params if p.dim() >= 2)])


@pytest.mark.parametrize("backend", ADAMW_BACKENDS)
def test_non_finite_grad_skips(backend):
    a, _ = model_pair()
    flat = FlatAdamW(a.named_parameters(), weight_decay=0.1, grad_clip=1.0, backend=backend, **HP)
    before = flat.flat_param.clone()
    flat.flat_grad.normal_()
    flat.flat_grad[3] = float("nan")
    norm = flat.step()
    assert not math.isfinite(norm) and flat.skipped == 1 and flat.step_count == 0
    assert torch.equal(flat.flat_param, before) and (flat.exp_avg == 0).all()


def test_state_dict_round_trip():
    a, b = model_pair()
    fa = FlatAdamW(a.named_parameters(), weight_decay=0.1, grad_clip=1.0, backend=TORCH["adamw"], **HP)
    fb = FlatAdamW(b.named_parameters(), weight_decay=0.1, grad_clip=1.0, backend=TORCH["adamw"], **HP)
    for _ in range(3):
        fa.flat_grad.normal_()
        fa.step()
    fb.load_state_dict(fa.state_dict())
    fb.flat_param.copy_(fa.flat_param)
    g = torch.randn_like(fa.flat_grad)
    fa.flat_grad.copy_(g)
    fb.flat_grad.copy_(g)
    fa.step()
    fb.step()
    assert torch.equal(fa.flat_param, fb.flat_param) and fb.step_count == 4


def test_load_torch_adamw_state():
    a, b = model_pair()
    flat = FlatAdamW(a.named_parameters(), weight_decay=0.1, backend=TORCH["adamw"], **HP)
    ref = torch_adamw(b, flat, 0.1)
    idx = torch.randint(0, 40, (2, 8))
    for _ in range(3):
        ref.zero_grad()
        b(idx, idx).backward()
        ref.step()
    flat.load_state_dict(ref.state_dict())
    flat.flat_param.copy_(torch.cat([p.detach().reshape(-1) for p in ref.param_groups[0]["params"]
                                     + ref.param_groups[1]["params"]]))
    flat.zero_grad()
    a(idx, idx).backward()
    flat.step()
    ref.zero_grad()
    b(idx, idx).backward()
    ref.step()
    assert flat.step_count == 4
    assert_params_close(a, b)


# ----------------------------------------------------------------------------- fp16 loss scale

def test_dynamic_loss_scale_halves_on_overflow_and_doubles_after_clean_steps():
    s = DynamicLossScale(growth_interval=3, init_scale=1024.0)
    s.update(False)
    assert s.scale == 512
    for _ in range(2):
        s.update(True)
    s.update(False)  # the overflow resets the clean-step count
    assert s.scale == 256
    for _ in range(3):
        s.update(True)
    assert s.scale == 512 and s.state_dict() == {"scale": 512, "clean_steps": 0}


@pytest.mark.parametrize("name", ["torch", "cpu"])
@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_loss_scaled_step_equals_unscaled(name, clip):
    """Gradients of a loss scaled by 2^k, unscaled inside the AdamW step (with the clip
    coefficient, one grad_scale): the same update, bit for bit, and the same (unscaled) norm."""
    impls = backends.resolve(name, torch.device("cpu"))
    a, b = model_pair()
    scaled = FlatAdamW(a.named_parameters(), weight_decay=0.1, grad_clip=clip, backend=impls["adamw"],
                       loss_scale=DynamicLossScale(init_scale=2.0 ** 12), **HP)
    plain = FlatAdamW(b.named_parameters(), weight_decay=0.1, grad_clip=clip, backend=impls["adamw"], **HP)
    for _ in range(3):
        g = torch.randn_like(plain.flat_grad)
        scaled.flat_grad.copy_(g * 2.0 ** 12)
        plain.flat_grad.copy_(g)
        assert scaled.step() == plain.step()
    assert torch.equal(scaled.flat_param, plain.flat_param)
    assert torch.equal(scaled.exp_avg_sq, plain.exp_avg_sq)


def test_loss_scaled_overflow_skips_and_halves_and_is_saved():
    a, b = model_pair()
    flat = FlatAdamW(a.named_parameters(), weight_decay=0.1, grad_clip=1.0, backend=TORCH["adamw"],
                     loss_scale=DynamicLossScale(init_scale=2.0 ** 16), **HP)
    before = flat.flat_param.clone()
    flat.flat_grad.normal_()
    flat.flat_grad[5] = float("inf")
    assert not math.isfinite(flat.step())
    assert flat.skipped == 1 and flat.step_count == 0 and torch.equal(flat.flat_param, before)
    assert flat.loss_scale.scale == 2.0 ** 15
    other = FlatAdamW(b.named_parameters(), weight_decay=0.1, grad_clip=1.0, backend=TORCH["adamw"],
                      loss_scale=DynamicLossScale(), **HP)
    other.load_state_dict(flat.state_dict())
    assert other.loss_scale.state_dict() == flat.loss_scale.state_dict()

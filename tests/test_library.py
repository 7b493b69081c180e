"""The torch.library registration of every op (nanolm/ops/library.py): torch.library.opcheck
(schema, fake tensors, autograd registration, AOT dispatch) for every registered op, on every
backend that runs on CPU here (torch, cpu, cuda_sim; triton under the interpreter), at every
dtype its support row claims, at awkward shapes; and the eager path that skips the dispatcher
computes what the registered op computes."""
import pytest
import torch

from nanolm import tensor_parallel
from nanolm.dist import DistEnv
from nanolm.ops import adamw, attention, backends, cross_entropy, groups, layernorm, mlp_activation, rope
from nanolm.ops.support import dtype_name

CPU = torch.device("cpu")


def _cases(op):
    """(backend, dtype) for each backend that runs op on CPU here and each dtype it claims there."""
    return [pytest.param(name, dtype, id=f"{name}-{dtype_name(dtype)}",
                         marks=[pytest.mark.cuda_sim] if name == "cuda_sim" else [])
            for name in backends.BACKENDS if backends.implementation(name, op) is not None
            for dtype in backends.implementation(name, op).support.dtypes.get("cpu", ())
            if backends.unavailable_reason(name, op, CPU) is None or name == "cuda_sim"]


def _opcheck(op, args, dtype):
    """Schema, autograd registration and fake tensors at every dtype; tracing the op and its
    backward with AOTAutograd (dynamic shapes), the slow part, at float32 only."""
    utils = ["test_schema", "test_autograd_registration", "test_faketensor"]
    if dtype == torch.float32:
        utils.append("test_aot_dispatch_dynamic")
    torch.library.opcheck(op.registered, args, test_utils=utils)


DROPOUT = (0.25, 1234 | 7 << 32, 5 << 32 | 11)  # p, seed, offset as the schema takes them


@pytest.mark.parametrize("name,dtype", _cases("layernorm"))
def test_layernorm_ops(name, dtype):
    N, C = 5, 33
    x, r, dy = (torch.randn(N, C, dtype=dtype, requires_grad=True) for _ in range(3))
    w, b = torch.rand(C, dtype=dtype, requires_grad=True) + 0.5, torch.randn(C, dtype=dtype, requires_grad=True)
    _opcheck(layernorm.layer_norm_fwd_op, (x, w, b, 1e-5, name), dtype)
    _opcheck(layernorm.add_layer_norm_fwd_op, (x, r, w, None, 1e-5, 0.0, 0, 0, name), dtype)
    _opcheck(layernorm.add_layer_norm_fwd_op, (x, None, w, b, 1e-5, *DROPOUT, name), dtype)
    _, mean, rstd = layernorm.BACKENDS[name].layer_norm_fwd(x.detach(), w.detach(), b.detach(), 1e-5)
    args = (dy.detach(), x.detach(), w.detach(), mean, rstd, r.detach())
    _opcheck(layernorm.layer_norm_bwd_op, (*args, name), dtype)
    _opcheck(layernorm.dropout_add_layer_norm_bwd_op, (*args, *DROPOUT, name), dtype)


@pytest.mark.parametrize("name,dtype", _cases("layernorm"))
def test_rms_norm_ops(name, dtype):
    N, C = 5, 33
    x, r, dy = (torch.randn(N, C, dtype=dtype, requires_grad=True) for _ in range(3))
    w = torch.rand(C, dtype=dtype, requires_grad=True) + 0.5
    for weight in (w, None):  # with a weight, and parameter-free
        _opcheck(layernorm.rms_norm_fwd_op, (x, weight, 1e-5, name), dtype)
        _opcheck(layernorm.add_rms_norm_fwd_op, (x, r, weight, 1e-5, 0.0, 0, 0, name), dtype)
        _opcheck(layernorm.add_rms_norm_fwd_op, (x, None, weight, 1e-5, *DROPOUT, name), dtype)
        plain = None if weight is None else weight.detach()
        _, rstd = layernorm.BACKENDS[name].rms_norm_fwd(x.detach(), plain, 1e-5)
        args = (dy.detach(), x.detach(), plain, rstd, r.detach())
        _opcheck(layernorm.rms_norm_bwd_op, (*args, name), dtype)
        _opcheck(layernorm.dropout_add_rms_norm_bwd_op, (*args, *DROPOUT, name), dtype)


@pytest.mark.parametrize("name,dtype", _cases("attention"))
def test_attention_ops(name, dtype):
    B, T, nh = 2, 7, 2
    hs = (backends.implementation(name, "attention").support.head_sizes or (16,))[0]
    qkv = torch.randn(B, T, 3 * nh * hs, dtype=dtype, requires_grad=True)
    for dropout in ((0.0, 0, 0), DROPOUT):
        _opcheck(attention.attention_fwd_op, (qkv, nh, nh, *dropout, name), dtype)
        o, lse = attention.attention_fwd_op(qkv.detach(), nh, nh, *dropout, name)
        _opcheck(attention.attention_bwd_op, (torch.randn_like(o), qkv.detach(), o, lse, nh, nh, *dropout, name), dtype)


@pytest.mark.parametrize("name,dtype", _cases("cross_entropy"))
def test_cross_entropy_ops(name, dtype):
    N, C, V, Vp = 7, 8, 37, 40
    logits = torch.randn(N, Vp, dtype=dtype, requires_grad=True)
    targets = torch.tensor([3, -100, 0, 36, 5, 11, -100])
    _opcheck(cross_entropy.cross_entropy_op, (logits, targets, V, -100, 1e-3, name), dtype)
    h, w = torch.randn(N, C, requires_grad=True), torch.randn(Vp, C, requires_grad=True)
    _opcheck(cross_entropy.linear_cross_entropy_op, (h, w, targets, V, -100, 1e-3, 3, True, dtype, name), dtype)
    # need_grad=False is what the entry point passes under torch.no_grad: only the loss
    _opcheck(cross_entropy.linear_cross_entropy_op, (h.detach(), w.detach(), targets, V, -100, 1e-3, 3, False, dtype,
                                                     name), dtype)


@pytest.mark.parametrize("name,dtype", _cases("rope"))
def test_rope_ops(name, dtype):
    qkv = torch.randn(2, 7, (3 + 2 * 1) * 16, dtype=dtype, requires_grad=True)
    for qk_norm in (False, True):
        _opcheck(rope.qk_norm_rope_fwd_op, (qkv, 3, 1, 11, 1e4, qk_norm, name), dtype)
        out, rstd = rope.qk_norm_rope_fwd_op(qkv.detach(), 3, 1, 11, 1e4, qk_norm, name)
        _opcheck(rope.qk_norm_rope_bwd_op, (torch.randn_like(out), qkv.detach(), rstd, 3, 1, 11, 1e4, qk_norm, name),
                 dtype)


@pytest.mark.parametrize("name,dtype", _cases("mlp_activation"))
def test_mlp_activation_ops(name, dtype):
    gate_up = torch.randn(5, 66, dtype=dtype, requires_grad=True)
    x = torch.randn(5, 33, dtype=dtype, requires_grad=True)
    _opcheck(mlp_activation.swiglu_fwd_op, (gate_up, name), dtype)
    _opcheck(mlp_activation.relu2_fwd_op, (x, name), dtype)
    da = torch.randn(5, 33, dtype=dtype)
    _opcheck(mlp_activation.swiglu_bwd_op, (da, gate_up.detach(), name), dtype)
    _opcheck(mlp_activation.relu2_bwd_op, (da, x.detach(), name), dtype)


class OneRank:
    """A communicator of one rank: the collectives leave their tensors as they are."""
    env = DistEnv(0, 1, 0, "test one rank")

    def all_gather(self, output, input):
        output.copy_(input)

    def all_reduce(self, tensor, average=True):
        pass

    def wait(self, handle):
        pass


@pytest.mark.parametrize("name,dtype", _cases("cross_entropy"))
def test_vocab_parallel_ops(name, dtype):
    group = groups.register(OneRank())
    N, C, V, Vp = 7, 8, 37, 40
    h, w = torch.randn(N, C, requires_grad=True), torch.randn(Vp, C, requires_grad=True)
    targets = torch.tensor([3, -100, 0, 36, 5, 11, -100])
    _opcheck(cross_entropy.vocab_parallel_op, (h, w, targets, group, 0, V, V, -100, 1e-3, 3, True, dtype, name),
             dtype)
    _opcheck(tensor_parallel.reduce_from_group, (h, group), dtype)


@pytest.mark.parametrize("name,dtype", _cases("adamw"))
def test_adamw_ops(name, dtype):
    param, grad, exp_avg = (torch.randn(777, dtype=dtype) for _ in range(3))
    exp_avg_sq = torch.rand(777, dtype=dtype)
    _opcheck(adamw.adamw_step_op, (param, grad, exp_avg, exp_avg_sq, 1e-2, 0.9, 0.95, 1e-8, 0.1, 3, 500, 0.5, name),
             dtype)
    _opcheck(adamw.sum_of_squares_op, (grad, name), dtype)


def test_eager_path_equals_the_registered_op():
    """The eager bypass (an autograd.Function over the same implementation, setup and backward)
    and the dispatcher's path give the same outputs and gradients, dropout and autocast included."""
    torch.manual_seed(0)
    qkv = torch.randn(2, 9, 3 * 2 * 16, requires_grad=True)
    results = []
    for call in (attention.attention_fwd_op, attention.attention_fwd_op.registered):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            o, _ = call(qkv, 2, 2, *DROPOUT, "torch")
        (grad,) = torch.autograd.grad(o.float().square().sum(), qkv)
        results.append((o, grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)

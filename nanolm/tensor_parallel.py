"""Tensor parallelism (Megatron-LM style): each block's matmuls and the tied embedding/lm_head
split over the n ranks of a tensor-parallel group, on the communicators of nanolm/dist.py.

A block on rank r of n (X the (B*T, C) LayerNorm output, identical on every rank):
  attention  c_attn is column-parallel: W ((nh + 2*nkv)*hs, C) keeps the rows of r's nh/n query
             heads and of the nkv/n K/V heads they read (GQA groups stay on one rank), so
             X W_r^T is already the packed [q | k | v] layout that rope and attention read;
             c_proj is row-parallel: W (C, nh*hs) keeps the input columns of those heads, each
             rank's Y_r W_r^T is a partial sum, one all-reduce adds them.
  MLP        c_fc column-parallel (hidden/n units; for SwiGLU the gate and the up rows of the
             same units), c_proj row-parallel + all-reduce.
The conjugate pair of collectives (Megatron's f and g):
  copy_to_group    identity forward, all-reduce of the gradient backward: at every
                   column-parallel input, since each rank's slice contributes a part of dX.
  reduce_from_group  all-reduce forward, identity backward: after every row-parallel matmul.
Per block: 2 all-reduces of (B*T, C) forward, in the matmuls' dtype (bf16 under autocast), and
2 backward, in the residual stream's fp32: 2*(2 + 4)*B*T*C bytes per block under bf16 autocast,
whatever n is (bench/comm.py --tp times them).

Replicated parameters (LayerNorms, row-parallel biases, wpe) stay identical BY CONSTRUCTION,
with no gradient all-reduce of their own: every activation they touch comes out of an
all-reduce (bitwise identical on every rank), so their gradients are bitwise identical too, and
the optimizer, whose clipping norm is computed once for the whole model (optim.py), takes the
same step on every rank. tests/test_tensor_parallel.py checks they end bitwise equal.

Vocab parallel: wte (Vp, C) and the tied lm_head are split by rows, rank r holding vocab ids
[r*R, (r+1)*R), R = ceil(Vp/n). The embedding looks up the ids it holds (zeros elsewhere) and
all-reduces; the loss is cross_entropy.vocab_parallel_linear_cross_entropy (nanolm/ops/), which never
gathers the logits.

Parameters carry `tp_split = (dim, groups, full size)`: the dim they are cut along, the groups it
holds (a count of equal ones: 2 for SwiGLU's [gate | up]; or their lengths: c_attn's q, k, v
rows, unequal with GQA; the cut takes rank r's part of each), and
its 1-process length (the vocabulary rows are padded to a multiple of n when n does not divide
them, so any n that divides n_head works).
Checkpoints are gathered to the 1-process tensors (gather_state_dict), so one file loads on any
layout. parallelize() slices an initialised 1-process model, so a run with --tp=n starts from
the very weights a 1-process run with the same seed starts from (at the cost of one whole
fp32 model per rank during setup).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from nanolm.ops import cross_entropy, groups, library


# ----------------------------------------------------------------------------- collectives
# A registered op (torch.compile traces it as one node), reaching the communicator by its name
# (nanolm/ops/groups.py). Out of place: a registered op's output may not alias its input, so the
# sum costs one copy of x.

@library.op("all_reduce", fake=lambda x, group: torch.empty_like(x),
            setup_context=lambda ctx, inputs, output: None, backward=lambda ctx, grad: (grad, None))
def reduce_from_group(x: torch.Tensor, group: str) -> torch.Tensor:
    """The sum of x over the ranks of `group`; identity backward (the gradient is the same on
    every rank)."""
    comm = groups.communicator(group)
    total = x.contiguous().clone()
    comm.wait(comm.all_reduce(total, average=False))
    return total


class CopyToGroup(torch.autograd.Function):
    """Identity forward; all-reduce (sum) of the gradient backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return reduce_from_group(grad, ctx.group), None


def copy_to_group(x, group):
    return CopyToGroup.apply(x, group)


# ----------------------------------------------------------------------------- slicing

def _group_sizes(groups, size):
    """The lengths of the groups along the split dim: `groups` equal ones (an int), or as given (a
    tuple: c_attn's [q | k | v] with GQA holds H*hs, Hkv*hs, Hkv*hs rows)."""
    return (size // groups,) * groups if isinstance(groups, int) else tuple(groups)


def shard(full, split, rank, n):
    """Rank's slice of a full tensor: dim `split[0]` holds groups (split[1]), each cut in n. An
    ungrouped dim that n does not divide (the vocabulary rows) is first padded with zero rows
    to a multiple of n: the last ranks hold the padding, which no id looks up or predicts."""
    dim, groups, size = split
    if groups == 1 and size % n:
        pad = list(full.shape)
        pad[dim] = -size % n
        full, size = torch.cat([full, full.new_zeros(pad)], dim), size + pad[dim]
    sizes = _group_sizes(groups, size)
    if sum(sizes) != size or any(g % n for g in sizes):
        raise ValueError(f"tensor parallel: dim {dim} of size {size} does not split into groups {sizes} "
                         f"of {n} equal parts each")
    return torch.cat([part.narrow(dim, rank * (g // n), g // n) for part, g in zip(full.split(sizes, dim), sizes)],
                     dim)


def gather(local, split, comm):
    """The full tensor from every rank's slice (a collective: every rank of the group calls it)."""
    dim, groups, size = split
    n = comm.env.world_size
    out = torch.empty((n, *local.shape), dtype=local.dtype, device=local.device)
    comm.wait(comm.all_gather(out.view(-1), local.detach().contiguous().view(-1)))
    # per group: (n, ..., m, ...) -> (..., n, m, ...) -> (..., n*m, ...); the groups in order, less any padding
    parts = out.split([g // n for g in _group_sizes(groups, -(-size // n) * n)], dim + 1)
    return torch.cat([part.movedim(0, dim).flatten(dim, dim + 1) for part in parts], dim).narrow(dim, 0, size)


def _sharded_parameter(full, dim, groups, comm):
    split = (dim, groups, full.shape[dim])
    p = nn.Parameter(shard(full.detach(), split, comm.env.rank, comm.env.world_size).clone())
    p.tp_split = split
    return p


# ----------------------------------------------------------------------------- layers

class ColumnParallelLinear(nn.Module):
    """y_r = x W_r^T + b_r: this rank's `out/n` output features (of each of `groups` groups)."""

    def __init__(self, full, comm, n_groups=1):
        super().__init__()
        self.group = groups.register(comm)
        self.weight = _sharded_parameter(full.weight, 0, n_groups, comm)
        self.bias = None if full.bias is None else _sharded_parameter(full.bias, 0, n_groups, comm)

    def forward(self, x):
        return F.linear(copy_to_group(x, self.group), self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = sum_r x_r W_r^T + b: x_r is this rank's slice of the input features; the bias is
    replicated and added once, after the all-reduce."""

    def __init__(self, full, comm):
        super().__init__()
        self.group = groups.register(comm)
        self.weight = _sharded_parameter(full.weight, 1, 1, comm)
        self.bias = None if full.bias is None else nn.Parameter(full.bias.detach().clone())

    def forward(self, x):
        y = reduce_from_group(F.linear(x, self.weight), self.group)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Rows [vocab_start, vocab_start + ceil(Vp/n)) of the token embedding (zero rows past Vp on
    the last ranks); ids elsewhere look up zeros here and their own rank's row arrives through
    the all-reduce."""

    def __init__(self, full, comm):
        super().__init__()
        self.group = groups.register(comm)
        self.weight = _sharded_parameter(full.weight, 0, 1, comm)
        self.vocab_start = comm.env.rank * self.weight.shape[0]

    def forward(self, idx):
        local = idx - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        x = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside[..., None], 0.0)
        return reduce_from_group(x, self.group)


class VocabParallelHead(nn.Module):
    """The lm_head over the vocab rows of a VocabParallelEmbedding: tied to its weight, or (an
    untied full lm_head given) its own slice of the same rows. The loss over this rank's vocab
    rows, with the softmax statistics combined across the group
    (cross_entropy.vocab_parallel_linear_cross_entropy)."""

    def __init__(self, wte, vocab_size, backend, untied=None, comm=None):
        super().__init__()
        self.weight = wte.weight if untied is None else _sharded_parameter(untied.weight, 0, 1, comm)
        self.group, self.backend, self.vocab_size = wte.group, backend, vocab_size
        self.vocab_start = wte.vocab_start
        self.local_vocab = min(max(vocab_size - self.vocab_start, 0), self.weight.shape[0])

    def forward(self, h, targets):
        if targets is None:
            raise ValueError("a tensor-parallel GPT computes losses only; sample from the gathered "
                             "model (tensor_parallel.gather_state_dict into a 1-process GPT)")
        C = h.shape[-1]
        return cross_entropy.vocab_parallel_linear_cross_entropy(
            copy_to_group(h.reshape(-1, C), self.group), self.weight, targets.reshape(-1), self.group,
            self.backend, self.vocab_start, self.local_vocab, self.vocab_size)


# ----------------------------------------------------------------------------- the model

def parallelize(model, comm):
    """Turn an initialised 1-process GPT into rank comm.env.rank's tensor-parallel slice of it,
    in place. Rank 0's weights are broadcast first, so the slices come from one model."""
    n, cfg = comm.env.world_size, model.cfg
    if cfg.n_head % n:
        raise ValueError(f"tensor parallel: n_head={cfg.n_head} is not divisible by tp={n}")
    if cfg.logit_softcap:
        raise ValueError("tensor parallel: the vocab-parallel loss has no logit softcap; train "
                         "logit_softcap > 0 with --tp=1")
    if cfg.kv_heads % n:
        raise ValueError(f"tensor parallel: n_kv_head={cfg.kv_heads} is not divisible by tp={n} (replicating "
                         "fewer K/V heads than ranks is not implemented)")
    for p in model.parameters():
        comm.wait(comm.broadcast(p.data, root=0))
    qkv_rows = tuple(heads * cfg.head_size for heads in (cfg.n_head, cfg.kv_heads, cfg.kv_heads))
    for block in model.transformer.h:
        attn, mlp = block.attn, block.mlp
        # [q | k | v]: rank r keeps its n_head/n query heads and the n_kv_head/n K/V heads they read
        attn.c_attn = ColumnParallelLinear(attn.c_attn, comm, n_groups=qkv_rows)
        attn.c_proj = RowParallelLinear(attn.c_proj, comm)
        attn.n_head, attn.n_kv_head = cfg.n_head // n, cfg.kv_heads // n
        # SwiGLU's [gate | up] rows: rank r keeps the gate and the up rows of the same hidden units
        mlp.c_fc = ColumnParallelLinear(mlp.c_fc, comm, n_groups=2 if cfg.mlp == "swiglu" else 1)
        mlp.c_proj = RowParallelLinear(mlp.c_proj, comm)
    model.transformer.wte = VocabParallelEmbedding(model.transformer.wte, comm)
    untied = None if cfg.tie_embeddings else model.lm_head
    model.lm_head = VocabParallelHead(model.transformer.wte, cfg.vocab_size, model.impls["cross_entropy"], untied,
                                      comm)
    model.tp = comm
    return model


def gather_state_dict(model):
    """The 1-process state dict (every rank calls it: a collective per sliced tensor)."""
    if model.tp is None:
        return model.state_dict()
    params = dict(model.named_parameters(remove_duplicate=False))
    return {name: gather(t, params[name].tp_split, model.tp) if hasattr(params.get(name), "tp_split")
            else t for name, t in model.state_dict().items()}


def load_full_state_dict(model, state):
    """Load a 1-process state dict into a (possibly) tensor-parallel model: each sliced
    parameter takes its rank's slice."""
    if model.tp is None:
        return model.load_state_dict(state)
    params = dict(model.named_parameters(remove_duplicate=False))
    rank, n = model.tp.env.rank, model.tp.env.world_size
    local = {name: shard(t, params[name].tp_split, rank, n) if hasattr(params.get(name), "tp_split") else t
             for name, t in state.items()}
    return model.load_state_dict(local)


def gather_optimizer_state(opt, state, model):
    """opt.state_dict() of this rank's slices -> the state the 1-process optimizer over the full
    model would hold (its layout: the full parameters in its buffer order, see _full_shapes)."""
    if model.tp is None:
        return state
    full_shapes, params = _full_shapes(model, opt.leading), dict(zip(opt.names, opt.params))
    tensors = {key: {name: gather(t, params[name].tp_split, model.tp) if hasattr(params[name], "tp_split") else t
                     for name, t in by_name.items()}
               for key, by_name in _per_parameter(state, opt.layout, [p.shape for p in opt.params],
                                                  opt.leading).items()}
    layout, offset = [], 0
    for name, shape in full_shapes:
        layout.append((name, offset, shape.numel()))
        offset += shape.numel()
    return {**{k: v for k, v in state.items() if k not in tensors}, "layout": layout,
            **{key: torch.cat([by_name[name].reshape(-1) for name, _ in full_shapes if name in by_name])
               for key, by_name in tensors.items()}}


def shard_optimizer_state(opt, state, model):
    """The inverse of gather_optimizer_state: a 1-process optimizer state -> this rank's."""
    if model.tp is None:
        return state
    params = dict(zip(opt.names, opt.params))
    rank, size = model.tp.env.rank, model.tp.env.world_size
    full_shapes = [_full_shape(params[name]) for name, _, _ in state["layout"]]
    tensors = _per_parameter(state, state["layout"], full_shapes, opt.leading)
    out = {**{k: v for k, v in state.items() if k not in tensors}, "layout": list(opt.layout)}
    for key, by_name in tensors.items():
        parts = [(shard(by_name[name], params[name].tp_split, rank, size) if hasattr(params[name], "tp_split")
                  else by_name[name]).reshape(-1) for name in opt.names if name in by_name]
        out[key] = torch.cat(parts)
    return out


def _per_parameter(state, layout, shapes, leading):
    """{key: {name: the parameter's part of state[key], in its shape}} for each per-element
    tensor of an optimizer state: AdamW's moments cover the buffer after the leading (Muon's)
    range, Muon's momentum that range. shapes: the parameters', in layout order."""
    lead = sum(n for name, _, n in layout if name in leading)
    ranges = {"exp_avg": lead, "exp_avg_sq": lead, "momentum": 0}
    out = {}
    for key, start in ranges.items():
        if key not in state:
            continue
        end = start + state[key].numel()
        out[key] = {name: state[key][off - start:off - start + n].view(shape)
                    for (name, off, n), shape in zip(layout, shapes) if start <= off < end}
    return out


def _full_shape(p):
    if not hasattr(p, "tp_split"):
        return p.shape
    dim, _, size = p.tp_split
    shape = list(p.shape)
    shape[dim] = size
    return torch.Size(shape)


def _full_shapes(model, leading=()):
    """(name, full shape) of each parameter in a 1-process optimizer's buffer order: the
    leading names (FlatMuon's matrices) first, then 2-D, then 1-D, each in model order."""
    seen, named = set(), []
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            named.append((name, _full_shape(p), (name not in leading, p.dim() < 2)))
    return [(name, shape) for name, shape, position in sorted(named, key=lambda x: x[2])]

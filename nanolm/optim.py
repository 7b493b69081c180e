"""The optimizers: two update rules, AdamW and Muon, over one flat-buffer machinery.

FlatOptimizer (the machinery, no update rule of its own):
All parameters live in one contiguous float32 buffer (`flat_param`) and their gradients in
another (`flat_grad`); each nn.Parameter becomes a view into them. Weight-decayed (2-D) params
come first, so decay applies to flat[:decay_numel]. `layout` lists (name, offset, numel) in
buffer order, for a distributed runner to slice buckets or shards from. With pad_to=W the
buffers are zero-padded to a multiple of W elements so they split into W equal pieces; the
padding sits after every parameter, outside the decayed prefix, and its gradient is always
zero, so no rule ever moves it. step() computes the global gradient norm, skips a non-finite
step, folds clipping and loss-scale unscaling into one multiplier (`grad_scale`), hands that to
the rule (`_update`) and, under ZeRO-1, all-gathers what the rule updated.

ZeRO-1 (`shard`): the optimizer then updates only this rank's pieces of the buffers and keeps
optimizer state for those alone (optimizer memory / W); the gradient norm is the all-reduced sum
of every rank's piece sums of squares, so every rank clips, and skips a non-finite step, alike;
the updated pieces are all-gathered so every rank again holds all the weights.

fp16 training (`loss_scale`, a DynamicLossScale): the loss is multiplied by the scale before
backward so small fp16 gradients do not flush to zero; the step divides the gradient norm by it
and folds 1/scale into grad_scale with the clip coefficient, so unscaling costs no extra pass
over the gradients (as llm.c's grad_scale). A non-finite norm (an fp16 overflow) skips the step
and halves the scale; `growth_interval` clean steps double it.

Tensor parallel (`tensor_parallel`, nanolm/tensor_parallel.py): parameters with a `tp_split`
attribute are this rank's slices; the others are replicated, identical on every rank of the
group. The buffer then holds 2-D slices, 2-D replicated, 1-D replicated, 1-D slices, so the
replicated ones form one range and the decayed 2-D ones still a prefix; the global norm adds
every rank's slices once and the replicated parameters once (_sum_over_ranks):
    norm^2 = sum over the group of (sumsq(buffer) - (1 - 1/n) * sumsq(replicated range)).

FlatAdamW: AdamW over [adamw_start, end) of the buffers, through the adamw op (the fused
kernels, nanolm/ops/adamw.py) and its grad_norm; adamw_start is 0, every parameter, unless a
subclass takes a leading range for another rule.

FlatMuon: Muon (Jordan et al. 2024, modded-nanogpt; nanochat's muon.py) for the 2-D hidden
matrices (attention and MLP weights), which it puts first in the buffer, [0, muon_numel); the
FlatAdamW rule for the rest (embeddings, the lm_head tied to wte, LayerNorm gains, biases). Per
matrix W with gradient G (unscaled and clipped like AdamW's):
    M <- mu M + (1 - mu) G                      momentum (mu = 0.95)
    U <- (1 - mu) G + mu M                      Nesterov: the gradient looked ahead along M
    O <- newton_schulz(U)                       ~ the orthogonal polar factor of U, in bf16
    W <- (1 - lr wd) W - lr sqrt(max(1, rows/cols)) O
Muon with data parallel and ZeRO-1: a flat piece is a byte range and cuts through matrices,
but Newton-Schulz needs a whole matrix and its whole averaged gradient. So the gradients of the
Muon range are all-reduced even under ZeRO-1 (the buckets are cut at muon_numel; the AdamW
range is still reduce-scattered), each matrix has one owner among the W data-parallel ranks
(round-robin within each shape group, as modded-nanogpt and nanochat assign them), only the
owner keeps its momentum (Muon's state / W, on every data-parallel run) and orthogonalizes
it (the Newton-Schulz work / W), and the updated matrix is broadcast from its owner to the
others. Every rank then holds bit-identical weights; the AdamW range goes through ZeRO-1's
pieces as in FlatAdamW (the cut at muon_numel is rounded down to a multiple of W, so the few
AdamW elements of the bucket across it are all-reduced too). The price: the Muon range moves as
an all-reduce plus one broadcast per matrix, where nanochat's DistMuon and modded-nanogpt
reduce-scatter each owner's whole matrices onto it and all-gather the results, one all-reduce's
worth (here the buffer would have to group the matrices by owner, padded to W per shape).
With tensor parallel (--tp > 1) every hidden matrix is a slice:
momentum and the Nesterov step are elementwise, so each rank keeps its slice's; the update U is
all-gathered over the tp group into the whole matrix (Newton-Schulz of a slice is not the slice
of Newton-Schulz: the iteration mixes all rows and columns), every rank of the group
orthogonalizes the same whole matrix (the same result on each, so no broadcast; tp times the
iteration's work, where an owner per matrix within the group would trade it for a scatter),
and keeps its slice of O; the shape scaling uses the whole matrix's shape.
"""
import math

import torch

from nanolm.ops import adamw
from nanolm.tensor_parallel import gather, shard


class DynamicLossScale:
    """The loss scale of fp16 training: halved on an overflow, doubled after growth_interval
    steps in a row without one. 2^16 to start, as torch's GradScaler."""

    def __init__(self, growth_interval=2000, init_scale=2.0 ** 16):
        if growth_interval < 1:
            raise ValueError(f"DynamicLossScale: growth_interval must be >= 1, got {growth_interval}")
        self.scale, self.growth_interval, self.clean_steps = init_scale, growth_interval, 0

    def update(self, finite):
        if not finite:
            self.scale, self.clean_steps = self.scale / 2, 0
            return
        self.clean_steps += 1
        if self.clean_steps == self.growth_interval:
            self.scale, self.clean_steps = self.scale * 2, 0

    def state_dict(self):
        return {"scale": self.scale, "clean_steps": self.clean_steps}

    def load_state_dict(self, state):
        self.scale, self.clean_steps = float(state["scale"]), int(state["clean_steps"])


class FlatOptimizer:
    """The flat buffers, ZeRO-1 pieces, gradient norm, clipping and loss scale (see the module
    docstring); a subclass supplies the update rule (_update) and its state."""

    name = ""  # --optim's value, saved with the state so another optimizer refuses it

    def __init__(self, named_params, grad_clip=0.0, backend=None, pad_to=1, loss_scale=None, leading=()):
        self.loss_scale = loss_scale  # a DynamicLossScale (fp16), or None
        self.grad_clip, self.backend = grad_clip, backend
        self.params, names, seen = [], [], set()
        for name, p in named_params:
            if p.requires_grad and id(p) not in seen:  # tied weights appear once
                seen.add(id(p))
                self.params.append(p)
                names.append(name)
        leading = set(leading)  # names put first, in model order: a rule's own range
        order = sorted(range(len(self.params)),
                       key=lambda i: (names[i] not in leading, *self._buffer_position(self.params[i])))
        self.params = [self.params[i] for i in order]
        self.names = [names[i] for i in order]
        self.leading = [n for n in self.names if n in leading]
        self.leading_numel = sum(p.numel() for n, p in zip(self.names, self.params) if n in leading)
        self.decay_numel = sum(p.numel() for p in self.params if p.dim() >= 2)
        self.numel = sum(p.numel() for p in self.params)
        self._flatten(-(-self.numel // pad_to) * pad_to)
        # Ranges [start, end) of the flat buffers this optimizer updates: the whole buffer,
        # until shard() keeps this rank's pieces.
        self.pieces, self.buckets, self.comm = [(0, self.flat_param.numel())], [], None
        replicated = [(off, off + n) for (_, off, n), p in zip(self.layout, self.params)
                      if not hasattr(p, "tp_split")]
        self.replicated = (replicated[0][0], replicated[-1][1]) if replicated else (0, 0)  # one range
        self.tp_comm = self.dp_comm = None
        self.step_count, self.skipped = 0, 0

    @staticmethod
    def _buffer_position(p):
        """2-D before 1-D (decay prefix); tensor-parallel slices at the two ends (see above)."""
        one_d = p.dim() < 2
        return one_d, hasattr(p, "tp_split") == one_d

    def tensor_parallel(self, comm):
        """Sum the gradient norm over the tensor-parallel group of comm, counting the
        replicated parameters once."""
        self.tp_comm = comm

    def data_parallel(self, comm):
        """The group of data-parallel replicas, whose gradients arrive averaged; a rule may
        split its work over them (FlatMuon). Called before shard(), if that is called."""
        self.dp_comm = comm

    def _flatten(self, padded):
        device = self.params[0].device
        self.flat_param = torch.zeros(padded, dtype=torch.float32, device=device)
        self.flat_grad = torch.zeros(padded, dtype=torch.float32, device=device)
        self.layout, offset = [], 0
        for name, p in zip(self.names, self.params):
            n = p.numel()
            self.flat_param[offset:offset + n].copy_(p.data.reshape(-1))
            p.data = self.flat_param[offset:offset + n].view_as(p)
            p.grad = self.flat_grad[offset:offset + n].view_as(p)
            self.layout.append((name, offset, n))
            offset += n

    def shard(self, comm, owned):
        """ZeRO-1: from now on update only this rank's pieces. `owned` lists (bucket, piece)
        pairs of [start, end) ranges, piece r of each gradient bucket, so the reduce-scatter
        of a bucket lands exactly on the piece this rank updates and an in-place all-gather
        of the bucket spreads it back. The rule's state held so far is kept for the owned pieces."""
        state = self._sharded_state()
        self.comm = comm
        self.buckets, self.pieces = [b for b, _ in owned], [p for _, p in owned]
        self._set_sharded_state(state)

    def zero_grad(self):
        self.flat_grad.zero_()

    def step(self, lr=None):
        """Clip by global norm and update; returns the pre-clip grad norm (a float, of the
        unscaled gradients). A non-finite norm skips the update (nothing is written), counts it
        in `skipped` and, with a loss scale, halves the scale."""
        loss_scale = self.loss_scale.scale if self.loss_scale else 1.0
        norm = self._grad_norm() / loss_scale
        if self.loss_scale:
            self.loss_scale.update(math.isfinite(norm))
        if not math.isfinite(norm):
            self.skipped += 1
            return norm
        clip = min(1.0, self.grad_clip / (norm + 1e-6)) if self.grad_clip > 0 else 1.0
        self.step_count += 1
        self._update(self.lr if lr is None else lr, clip / loss_scale)  # one multiply: unscale and clip
        if self.comm is not None:
            self._all_gather(self.flat_param, self.leading_numel)
        return norm

    def _grad_norm(self):
        if self.comm is None and self.tp_comm is None:
            return adamw.grad_norm(self.flat_grad, self.backend).item()
        sumsq = self._sum_over_ranks(lambda s, e: adamw.sum_of_squares_op(self.flat_grad[s:e], self.backend))
        if not torch.isinf(sumsq):  # the same on every rank, so every rank takes the same branch
            return sumsq.sqrt().item()
        # fp32 overflow with finite gradients, as in adamw.grad_norm; the scale is the sum of the
        # ranks' max |g|, which every rank then knows and which bounds every |g|
        scale = self._sum_over_ranks(lambda s, e: self.flat_grad[s:e].abs().max(), replicated_once=False)
        return adamw.scaled_norm(scale, lambda scale: self._sum_over_ranks(
            lambda s, e: adamw.sum_of_squares_op(self.flat_grad[s:e] / scale, self.backend))).item()

    def _sum_over_ranks(self, of_piece, replicated_once=True):
        """The sum over every rank's pieces of of_piece(start, end), a 0-d tensor: over the dp
        group (ZeRO-1) and the tp group, where the replicated range, alike on all n ranks of it,
        counts once (1/n on each) when replicated_once."""
        total = torch.stack([of_piece(s, e) for s, e in self.pieces]).sum()
        if self.tp_comm is not None and replicated_once:
            lo, hi = self.replicated
            overlaps = [(max(s, lo), min(e, hi)) for s, e in self.pieces if max(s, lo) < min(e, hi)]
            if overlaps:
                replicated = torch.stack([of_piece(s, e) for s, e in overlaps]).sum()
                total = total - (1 - 1 / self.tp_comm.env.world_size) * replicated
        total = total.reshape(1)
        for comm in (self.comm, self.tp_comm):
            if comm is not None:
                comm.wait(comm.all_reduce(total, average=False))
        return total[0]

    def _all_gather(self, buffer, start=0):
        """ZeRO-1: every rank's pieces of buffer to every rank, in the buckets reaching past start."""
        handles = [self.comm.all_gather(buffer[bs:be], buffer[ps:pe])
                   for (bs, be), (ps, pe) in zip(self.buckets, self.pieces) if be > start]
        for h in handles:
            self.comm.wait(h)

    def _pieces_from(self, start):
        """This rank's pieces clipped to [start, end of buffer)."""
        return [(max(s, start), e) for s, e in self.pieces if e > start]

    def _full(self, local, start=0):
        """A full-length (padded) buffer from local, this rank's state for its pieces from start
        on (zeros before start); gathered from every rank when sharded, so a collective then."""
        full = torch.zeros_like(self.flat_param)
        offset = 0
        for s, e in self._pieces_from(start):
            full[s:e].copy_(local[offset:offset + e - s])
            offset += e - s
        if self.comm is not None:
            self._all_gather(full, start)
        return full

    def _mine(self, full, start=0):
        return torch.cat([full[s:e] for s, e in self._pieces_from(start)])

    def _check_state(self, state):
        """A state saved by this optimizer over this model's layout, or a clear error."""
        saved = state.get("optim", "adamw")  # states saved before --optim existed are AdamW's
        if saved != self.name:
            raise ValueError(f"the checkpoint's optimizer state is {saved}'s and this run uses --optim={self.name}: "
                             f"resume with --optim={saved}, or start a new run from its weights (--init_from)")
        if [tuple(x) for x in state["layout"]] != self.layout:
            raise ValueError(f"{type(self).__name__}.load_state_dict: parameter layout differs from this model's")

    def _machinery_state(self):
        state = {"optim": self.name, "step": self.step_count, "skipped": self.skipped, "layout": list(self.layout)}
        if self.loss_scale:
            state["loss_scale"] = self.loss_scale.state_dict()
        return state

    def _load_machinery_state(self, state):
        self.step_count, self.skipped = state["step"], state["skipped"]
        if self.loss_scale and "loss_scale" in state:  # absent: a run that was not fp16 before
            self.loss_scale.load_state_dict(state["loss_scale"])


class FlatAdamW(FlatOptimizer):
    """AdamW (decoupled weight decay on the 2-D parameters) over the flat buffers from
    adamw_start on, through the fused adamw op."""

    name = "adamw"

    def __init__(self, named_params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 grad_clip=0.0, backend=None, pad_to=1, loss_scale=None, leading=()):
        super().__init__(named_params, grad_clip, backend, pad_to, loss_scale, leading)
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.adamw_start = self.leading_numel  # the leading range is another rule's
        # the moments of this rank's pieces from adamw_start on, concatenated
        self.exp_avg = self._mine(torch.zeros_like(self.flat_param), self.adamw_start)
        self.exp_avg_sq = torch.zeros_like(self.exp_avg)

    def _update(self, lr, grad_scale):
        self._adamw_update(lr, grad_scale)

    def _adamw_update(self, lr, grad_scale):
        offset = 0
        for start, end in self._pieces_from(self.adamw_start):
            n = end - start
            # decay covers flat[:decay_numel]; a piece may lie before, after or across it
            decay = min(max(self.decay_numel - start, 0), n)
            adamw.adamw(self.flat_param[start:end], self.flat_grad[start:end],
                        self.exp_avg[offset:offset + n], self.exp_avg_sq[offset:offset + n],
                        lr=lr, beta1=self.betas[0], beta2=self.betas[1], eps=self.eps,
                        weight_decay=self.weight_decay, step=self.step_count, decay_numel=decay,
                        grad_scale=grad_scale, backend=self.backend)
            offset += n

    def _sharded_state(self):
        return self._full(self.exp_avg, self.adamw_start), self._full(self.exp_avg_sq, self.adamw_start)

    def _set_sharded_state(self, state):
        self.exp_avg, self.exp_avg_sq = (self._mine(full, self.adamw_start) for full in state)

    def state_dict(self):
        """Whole, unpadded moments, so a checkpoint loads on any world size. When sharded this
        gathers them: every rank must call it."""
        lo, hi = self.adamw_start, self.numel
        return {**self._machinery_state(),
                "exp_avg": self._full(self.exp_avg, lo)[lo:hi].clone(),
                "exp_avg_sq": self._full(self.exp_avg_sq, lo)[lo:hi].clone()}

    def load_state_dict(self, state):
        """Accepts this class's state_dict (saved on any world size), or a torch.optim.AdamW one
        whose params were given in this optimizer's buffer order (see `self.params`)."""
        if "exp_avg" not in state and "optim" not in state:
            return self._load_torch(state)
        self._check_state(state)
        self._load_machinery_state(state)
        self._set_moments(state["exp_avg"], state["exp_avg_sq"])

    def _set_moments(self, exp_avg, exp_avg_sq):
        """Whole unpadded moments (from adamw_start) -> this rank's pieces."""
        for local, whole in ((self.exp_avg, exp_avg), (self.exp_avg_sq, exp_avg_sq)):
            full = torch.zeros_like(self.flat_param)
            full[self.adamw_start:self.numel].copy_(whole.reshape(-1))
            local.copy_(self._mine(full, self.adamw_start))

    def _load_torch(self, state):
        per_param = state["state"]
        if len(per_param) != len(self.params):
            raise ValueError(f"FlatAdamW.load_state_dict: torch state has {len(per_param)} params, "
                             f"expected {len(self.params)}")
        keys = [k for g in state["param_groups"] for k in g["params"]]
        exp_avg = torch.cat([per_param[k]["exp_avg"].reshape(-1) for k in keys])
        exp_avg_sq = torch.cat([per_param[k]["exp_avg_sq"].reshape(-1) for k in keys])
        self._set_moments(exp_avg, exp_avg_sq)
        self.step_count = int(per_param[keys[0]]["step"])


# ----------------------------------------------------------------------------- Muon

# Quintic Newton-Schulz schedules: per iteration (a, b, c) of X <- a X + (b A + c A^2) X,
# A = X X^T, and the factor the Frobenius norm is inflated by before the first iteration.
NS_SCHEDULES = {
    # Polar Express (Amsel et al. 2025, arXiv:2505.16932), as modded-nanogpt and nanochat ship it:
    # one minimax-optimal polynomial per iteration, computed for 5 iterations with a 2e-2 safety
    # factor (hence the 1.02). The default: with the same 5 iterations (the same cost) it leaves
    # the singular values nearer 1, measured in float64 on matrices whose singular values spread
    # over [0.1, 1]: 0.86-1.14, where the classic schedule leaves 0.68-1.14 (tests/test_muon.py).
    "polar_express": ([(8.156554524902461, -22.48329292557795, 15.878769915207462),
                       (4.042929935166739, -2.808917465908714, 0.5000178451051316),
                       (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
                       (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
                       (2.3465413258596377, -1.7097828382687081, 0.42323551169305323)], 1.02),
    # Keller Jordan's original Muon (modded-nanogpt 2024, nanochat's muon.py): one polynomial,
    # tuned for slope 3.4445 at 0, five times; the reference the public records were set with.
    "classic": ([(3.4445, -4.7750, 2.0315)] * 5, 1.0),
}


def newton_schulz(G, schedule="polar_express", dtype=torch.bfloat16):
    """The specification of Muon's orthogonalization: each matrix of G (..., m, n), a batch of
    same-shape matrices, mapped to about its orthogonal polar factor U V^T (G = U S V^T),
    every singular value moved towards 1, by the quintic iteration of NS_SCHEDULES[schedule]
    computed in `dtype` (bf16 as modded-nanogpt; float64 for a reference of the same iteration).
    A tall matrix is iterated transposed, so A = X X^T is the smaller (min(m, n))^2 Gram matrix.
    Returns G's shape and dtype."""
    coefficients, inflate = NS_SCHEDULES[schedule]
    X = G.to(dtype)
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT
    # the Frobenius norm bounds the spectral norm, so every singular value starts in [0, 1]
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * inflate + 1e-7)
    for a, b, c in coefficients:
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return (X.mT if tall else X).to(G.dtype)


def hidden_matrices(model):
    """The names of the parameters Muon takes: the 2-D weights inside the transformer blocks
    (attention's c_attn and c_proj, the MLP's c_fc and c_proj). Embeddings and the lm_head tied
    to wte stay with AdamW, as in modded-nanogpt and nanochat: a row of an embedding is looked
    up, not multiplied, so orthogonalizing the matrix has no meaning for it."""
    return [name for name, p in model.named_parameters() if name.startswith("transformer.h.") and p.dim() == 2]


class FlatMuon(FlatAdamW):
    """Muon for the named 2-D hidden matrices (muon_names), the FlatAdamW rule for the rest;
    see the module docstring for the update and its data-parallel split."""

    name = "muon"

    def __init__(self, named_params, muon_names, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 grad_clip=0.0, backend=None, pad_to=1, loss_scale=None,
                 muon_lr=0.02, momentum=0.95, schedule="polar_express", ns_dtype=torch.bfloat16):
        named_params = list(named_params)
        shapes = dict(named_params)
        for name in muon_names:
            if name not in shapes:
                raise ValueError(f"FlatMuon: {name!r} is not a parameter of the model")
            if shapes[name].dim() != 2:
                raise ValueError(f"FlatMuon: {name} has shape {tuple(shapes[name].shape)}; Muon orthogonalizes "
                                 f"2-D matrices: route 1-D parameters (gains, biases) to AdamW")
        if schedule not in NS_SCHEDULES:
            raise ValueError(f"FlatMuon: unknown Newton-Schulz schedule {schedule!r}; valid: {', '.join(NS_SCHEDULES)}")
        super().__init__(named_params, lr, betas, eps, weight_decay, grad_clip, backend, pad_to, loss_scale,
                         leading=muon_names)
        self.muon_lr, self.momentum, self.schedule, self.ns_dtype = muon_lr, momentum, schedule, ns_dtype
        self.matrices = [(name, off, p) for (name, off, _), p in zip(self.layout, self.params)
                         if off < self.leading_numel]
        self._assign_owners()

    @property
    def muon_numel(self):
        return self.leading_numel

    def data_parallel(self, comm):
        momentum = self._full_momentum()
        super().data_parallel(comm)
        self._assign_owners(momentum)

    def _assign_owners(self, momentum=None):
        """Round-robin within each shape group over the data-parallel ranks; this rank keeps
        the momentum of the matrices it owns, one (k, rows, cols) stack per shape group."""
        rank, world = (self.dp_comm.env.rank, self.dp_comm.env.world_size) if self.dp_comm else (0, 1)
        shapes = {}
        for name, off, p in self.matrices:  # a tensor-parallel split is part of the shape
            shapes.setdefault((tuple(p.shape), getattr(p, "tp_split", None)), []).append((name, off, p))
        self.owner = {name: i % world for group in shapes.values() for i, (name, _, _) in enumerate(group)}
        self.groups = {shape: [m for m in group if self.owner[m[0]] == rank] for shape, group in shapes.items()}
        self.groups = {shape: group for shape, group in self.groups.items() if group}
        self.momentum_buffers = {
            shape: torch.stack([(momentum[off:off + p.numel()].view_as(p) if momentum is not None
                                 else torch.zeros_like(p)) for _, off, p in group])
            for shape, group in self.groups.items()}

    def _update(self, lr, grad_scale):
        self._adamw_update(lr, grad_scale)
        # --lr's schedule (warmup, cosine) scales Muon's lr alike
        muon_lr = self.muon_lr * (lr / self.lr if self.lr else 0.0)
        for shape, group in self.groups.items():
            self._muon_update(group, self.momentum_buffers[shape], muon_lr, grad_scale)
        self._from_owners(self.flat_param)

    def _muon_update(self, group, momentum, lr, grad_scale):
        """One shape group of matrices this rank owns: stacked, so Newton-Schulz runs batched."""
        if not torch.isfinite(momentum).all():
            bad = [name for (name, _, _), m in zip(group, momentum) if not torch.isfinite(m).all()]
            raise ValueError(f"FlatMuon: the momentum of {', '.join(bad)} is not finite (a corrupt "
                             f"optimizer state?); Muon would turn it into NaN weights")
        grads = torch.stack([p.grad for _, _, p in group]) * grad_scale
        momentum.lerp_(grads, 1 - self.momentum)
        update = grads.lerp_(momentum, self.momentum)  # Nesterov
        params = [p for _, _, p in group]
        sliced = hasattr(params[0], "tp_split")  # a shape group shares its split (see _assign_owners)
        if sliced:  # the whole matrices from the tp group's slices
            update = torch.stack([gather(u, p.tp_split, self.tp_comm) for u, p in zip(update, params)])
        orthogonal = newton_schulz(update, self.schedule, self.ns_dtype)
        if sliced:
            rank, n = self.tp_comm.env.rank, self.tp_comm.env.world_size
            orthogonal = [shard(o, p.tp_split, rank, n) for o, p in zip(orthogonal, params)]
        rows, cols = update.shape[-2:]
        # sqrt(max(1, rows/cols)): Keller Jordan's scaling (modded-nanogpt, nanochat, torch.optim.Muon's
        # "original"): an orthogonal rows x cols update has RMS 1/sqrt(max(rows, cols)); this makes
        # it 1/sqrt(cols) for a tall matrix as for a wide or square one
        step = lr * max(1.0, rows / cols) ** 0.5
        for p, o in zip(params, orthogonal):
            p.data.mul_(1 - lr * self.weight_decay).add_(o, alpha=-step)

    def _from_owners(self, buffer):
        """Each matrix's range of buffer, from its owner to every data-parallel rank."""
        if self.dp_comm is None:
            return
        handles = [self.dp_comm.broadcast(buffer[off:off + p.numel()], root=self.owner[name])
                   for name, off, p in self.matrices]
        for h in handles:
            self.dp_comm.wait(h)

    def _full_momentum(self):
        """The momentum of every matrix over [0, muon_numel), gathered from the owners."""
        full = torch.zeros_like(self.flat_param)
        for shape, group in self.groups.items():
            for (_, off, p), m in zip(group, self.momentum_buffers[shape]):
                full[off:off + p.numel()].copy_(m.reshape(-1))
        self._from_owners(full)
        return full[:self.muon_numel]

    def state_dict(self):
        """FlatAdamW's state of the AdamW range, and Muon's whole momentum (gathered: every
        rank must call it)."""
        return {**super().state_dict(), "momentum": self._full_momentum().clone()}

    def load_state_dict(self, state):
        self._check_state(state)
        super().load_state_dict(state)
        self._assign_owners(state["momentum"].reshape(-1))

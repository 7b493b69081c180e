"""AdamW over flat buffers, through the adamw op (nanolm/ops/adamw.py): adamw and grad_norm.

All parameters live in one contiguous float32 buffer (`flat_param`) and their gradients in
another (`flat_grad`); each nn.Parameter becomes a view into them. Weight-decayed (2-D) params
come first, so decay applies to flat[:decay_numel]. `layout` lists (name, offset, numel) in
buffer order, for a distributed runner to slice buckets or shards from. With pad_to=W the
buffers are zero-padded to a multiple of W elements so they split into W equal pieces; the
padding sits after every parameter, outside the decayed prefix, and its gradient is always
zero, so AdamW never moves it.

ZeRO-1 (`shard`): the optimizer then updates only this rank's pieces of the buffers and keeps
AdamW moments for those alone (optimizer memory / W); the gradient norm is the all-reduced sum
of every rank's piece sums of squares, so every rank clips, and skips a non-finite step, alike;
the updated pieces are all-gathered so every rank again holds all the weights.

fp16 training (`loss_scale`, a DynamicLossScale): the loss is multiplied by the scale before
backward so small fp16 gradients do not flush to zero; the step divides the gradient norm by it
and folds 1/scale into the AdamW kernel's grad_scale with the clip coefficient, so unscaling
costs no extra pass over the gradients (as llm.c's grad_scale). A non-finite norm (an fp16
overflow) skips the step and halves the scale; `growth_interval` clean steps double it.

Tensor parallel (`tensor_parallel`, nanolm/tensor_parallel.py): parameters with a `tp_split`
attribute are this rank's slices; the others are replicated, identical on every rank of the
group. The buffer then holds 2-D slices, 2-D replicated, 1-D replicated, 1-D slices, so the
replicated ones form one range and the decayed 2-D ones still a prefix; the global norm adds
every rank's slices once and the replicated parameters once (_sum_over_ranks):
    norm^2 = sum over the group of (sumsq(buffer) - (1 - 1/n) * sumsq(replicated range)).
"""
import math

import torch

from nanolm.ops import adamw


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


class FlatAdamW:
    def __init__(self, named_params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 grad_clip=0.0, backend=None, pad_to=1, loss_scale=None):
        self.lr, self.betas, self.eps = lr, betas, eps
        self.loss_scale = loss_scale  # a DynamicLossScale (fp16), or None
        self.weight_decay, self.grad_clip, self.backend = weight_decay, grad_clip, backend
        self.params, names, seen = [], [], set()
        for name, p in named_params:
            if p.requires_grad and id(p) not in seen:  # tied weights appear once
                seen.add(id(p))
                self.params.append(p)
                names.append(name)
        order = sorted(range(len(self.params)), key=lambda i: self._buffer_position(self.params[i]))
        self.params = [self.params[i] for i in order]
        self.names = [names[i] for i in order]
        self.decay_numel = sum(p.numel() for p in self.params if p.dim() >= 2)
        self.numel = sum(p.numel() for p in self.params)
        self._flatten(-(-self.numel // pad_to) * pad_to)
        # Ranges [start, end) of the flat buffers this optimizer updates, its moment buffers
        # being their concatenation: the whole buffer, until shard() keeps this rank's pieces.
        self.pieces, self.buckets, self.comm = [(0, self.flat_param.numel())], [], None
        replicated = [(off, off + n) for (_, off, n), p in zip(self.layout, self.params)
                      if not hasattr(p, "tp_split")]
        self.replicated = (replicated[0][0], replicated[-1][1]) if replicated else (0, 0)  # one range
        self.tp_comm = None
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

    def _flatten(self, padded):
        device = self.params[0].device
        self.flat_param = torch.zeros(padded, dtype=torch.float32, device=device)
        self.flat_grad = torch.zeros(padded, dtype=torch.float32, device=device)
        self.exp_avg = torch.zeros_like(self.flat_param)
        self.exp_avg_sq = torch.zeros_like(self.flat_param)
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
        of the bucket spreads it back. Moments held so far are kept for the owned pieces."""
        full_m, full_v = self._full(self.exp_avg), self._full(self.exp_avg_sq)
        self.comm = comm
        self.buckets, self.pieces = [b for b, _ in owned], [p for _, p in owned]
        self.exp_avg, self.exp_avg_sq = self._mine(full_m), self._mine(full_v)

    def zero_grad(self):
        self.flat_grad.zero_()

    def step(self, lr=None):
        """Clip by global norm and update; returns the pre-clip grad norm (a float, of the
        unscaled gradients). A non-finite norm skips the update (nothing is written), counts it
        in `skipped` and, with a loss scale, halves the scale."""
        lr = self.lr if lr is None else lr
        loss_scale = self.loss_scale.scale if self.loss_scale else 1.0
        norm = self._grad_norm() / loss_scale
        if self.loss_scale:
            self.loss_scale.update(math.isfinite(norm))
        if not math.isfinite(norm):
            self.skipped += 1
            return norm
        clip = min(1.0, self.grad_clip / (norm + 1e-6)) if self.grad_clip > 0 else 1.0
        scale = clip / loss_scale  # one multiply per gradient in the kernel: unscale and clip
        self.step_count += 1
        offset = 0
        for start, end in self.pieces:
            n = end - start
            # decay covers flat[:decay_numel]; a piece may lie before, after or across it
            decay = min(max(self.decay_numel - start, 0), n)
            adamw.adamw(self.flat_param[start:end], self.flat_grad[start:end],
                        self.exp_avg[offset:offset + n], self.exp_avg_sq[offset:offset + n],
                        lr=lr, beta1=self.betas[0], beta2=self.betas[1], eps=self.eps,
                        weight_decay=self.weight_decay, step=self.step_count, decay_numel=decay,
                        grad_scale=scale, backend=self.backend)
            offset += n
        if self.comm is not None:
            self._all_gather(self.flat_param)
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

    def _all_gather(self, buffer):
        handles = [self.comm.all_gather(buffer[bs:be], buffer[ps:pe])
                   for (bs, be), (ps, pe) in zip(self.buckets, self.pieces)]
        for h in handles:
            self.comm.wait(h)

    def _full(self, local):
        """A full-length (padded) buffer from this rank's moment pieces; gathered from every
        rank when sharded, so a collective then."""
        full = torch.zeros_like(self.flat_param)
        offset = 0
        for start, end in self.pieces:
            full[start:end].copy_(local[offset:offset + end - start])
            offset += end - start
        if self.comm is not None:
            self._all_gather(full)
        return full

    def _mine(self, full):
        return torch.cat([full[start:end] for start, end in self.pieces])

    def state_dict(self):
        """Whole, unpadded moments, so a checkpoint loads on any world size. When sharded this
        gathers them: every rank must call it."""
        state = {"step": self.step_count, "skipped": self.skipped,
                 "exp_avg": self._full(self.exp_avg)[:self.numel].clone(),
                 "exp_avg_sq": self._full(self.exp_avg_sq)[:self.numel].clone(),
                 "layout": list(self.layout)}
        if self.loss_scale:
            state["loss_scale"] = self.loss_scale.state_dict()
        return state

    def load_state_dict(self, state):
        """Accepts this class's state_dict (saved on any world size), or a torch.optim.AdamW one
        whose params were given in this optimizer's buffer order (see `self.params`)."""
        if "exp_avg" not in state:
            return self._load_torch(state)
        if [tuple(x) for x in state["layout"]] != self.layout:
            raise ValueError("FlatAdamW.load_state_dict: parameter layout differs from this model's")
        self.step_count, self.skipped = state["step"], state["skipped"]
        self._set_moments(state["exp_avg"], state["exp_avg_sq"])
        if self.loss_scale and "loss_scale" in state:  # absent: a run that was not fp16 before
            self.loss_scale.load_state_dict(state["loss_scale"])

    def _set_moments(self, exp_avg, exp_avg_sq):
        """Whole unpadded moments -> this rank's pieces."""
        for local, whole in ((self.exp_avg, exp_avg), (self.exp_avg_sq, exp_avg_sq)):
            full = torch.zeros_like(self.flat_param)
            full[:self.numel].copy_(whole.reshape(-1))
            local.copy_(self._mine(full))

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

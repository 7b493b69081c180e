"""AdamW over flat buffers, through ops.adamw_step and ops.grad_norm.

All parameters live in one contiguous float32 buffer (`flat_param`) and their gradients in
another (`flat_grad`); each nn.Parameter becomes a view into them. Weight-decayed (2-D) params
come first, so decay applies to flat[:decay_numel]. `layout` lists (name, offset, numel) in
buffer order, for a distributed runner to slice buckets or shards from.
"""
import math

import torch

from nanolm import ops


class FlatAdamW:
    def __init__(self, named_params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 grad_clip=0.0, backend=None):
        self.lr, self.betas, self.eps = lr, betas, eps
        self.weight_decay, self.grad_clip, self.backend = weight_decay, grad_clip, backend
        self.params, names, seen = [], [], set()
        for name, p in named_params:
            if p.requires_grad and id(p) not in seen:  # tied weights appear once
                seen.add(id(p))
                self.params.append(p)
                names.append(name)
        order = sorted(range(len(self.params)), key=lambda i: self.params[i].dim() < 2)
        self.params = [self.params[i] for i in order]
        self.names = [names[i] for i in order]
        self.decay_numel = sum(p.numel() for p in self.params if p.dim() >= 2)
        self._flatten()
        self.step_count, self.skipped = 0, 0

    def _flatten(self):
        numel = sum(p.numel() for p in self.params)
        device = self.params[0].device
        self.flat_param = torch.empty(numel, dtype=torch.float32, device=device)
        self.flat_grad = torch.zeros(numel, dtype=torch.float32, device=device)
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

    def zero_grad(self):
        self.flat_grad.zero_()

    def step(self, lr=None):
        """Clip by global norm and update; returns the pre-clip grad norm (a float).
        A non-finite norm skips the update (nothing is written) and counts it in `skipped`."""
        lr = self.lr if lr is None else lr
        norm = ops.grad_norm(self.flat_grad, self.backend).item()
        if not math.isfinite(norm):
            self.skipped += 1
            return norm
        scale = min(1.0, self.grad_clip / (norm + 1e-6)) if self.grad_clip > 0 else 1.0
        self.step_count += 1
        ops.adamw_step(self.flat_param, self.flat_grad, self.exp_avg, self.exp_avg_sq, lr=lr,
                       beta1=self.betas[0], beta2=self.betas[1], eps=self.eps,
                       weight_decay=self.weight_decay, step=self.step_count,
                       decay_numel=self.decay_numel, grad_scale=scale, backend=self.backend)
        return norm

    def state_dict(self):
        return {"step": self.step_count, "skipped": self.skipped, "exp_avg": self.exp_avg.clone(),
                "exp_avg_sq": self.exp_avg_sq.clone(), "layout": list(self.layout)}

    def load_state_dict(self, state):
        """Accepts this class's state_dict, or a torch.optim.AdamW one whose params were given
        in this optimizer's buffer order (see `self.params`)."""
        if "exp_avg" not in state:
            return self._load_torch(state)
        if [tuple(x) for x in state["layout"]] != self.layout:
            raise ValueError("FlatAdamW.load_state_dict: parameter layout differs from this model's")
        self.step_count, self.skipped = state["step"], state["skipped"]
        self.exp_avg.copy_(state["exp_avg"])
        self.exp_avg_sq.copy_(state["exp_avg_sq"])

    def _load_torch(self, state):
        per_param = state["state"]
        if len(per_param) != len(self.params):
            raise ValueError(f"FlatAdamW.load_state_dict: torch state has {len(per_param)} params, "
                             f"expected {len(self.params)}")
        keys = [k for g in state["param_groups"] for k in g["params"]]
        for (_, offset, n), key in zip(self.layout, keys):
            s = per_param[key]
            self.exp_avg[offset:offset + n].copy_(s["exp_avg"].reshape(-1))
            self.exp_avg_sq[offset:offset + n].copy_(s["exp_avg_sq"].reshape(-1))
        self.step_count = int(per_param[keys[0]]["step"])

"""GPT-2 (nanoGPT-style), with every hot op going through nanolm/ops.py.

The residual stream is read once per sub-block: each residual add is fused with the LayerNorm
that follows it (ops.add_layer_norm), so a block receives (normalised input, residual stream)
and hands the next LayerNorm's weights the MLP output to fuse. No dropout: the fused kernels
have none, and nanolm trains with dropout=0.

Activation recomputation (GPT(..., recompute=)), as llm.c's -r, trades compute for memory:
"mlp" keeps only each MLP's input and recomputes its two 4*C-wide activations (the GELU's input
and output: half of a block's saved activations) in the backward; "block" keeps only each
block's inputs (h, x) and reruns the whole block. torch.utils.checkpoint (non-reentrant) reruns
the same code on the same inputs, the op layer's autograd Functions included, so the
gradients are bit-identical to training without it.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from nanolm import ops

LN_EPS = 1e-5


class LayerNorm(nn.Module):
    def __init__(self, n, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.bias = nn.Parameter(torch.zeros(n)) if bias else None


class Attention(nn.Module):
    def __init__(self, cfg, kernels):
        super().__init__()
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.n_head, self.kernels = cfg.n_head, kernels

    def forward(self, h):
        y = ops.causal_attention(self.c_attn(h), self.n_head, self.kernels["attention"])
        return self.c_proj(y)


RECOMPUTE = ("none", "mlp", "block")


def recomputed(fn, *args):
    """fn(*args), whose saved activations the backward recomputes instead of keeping. No global
    RNG state is stashed (preserve_rng_state=False): nothing in a block draws from it (dropout
    masks are a function of explicit (seed, offset) arguments, which the rerun gets again)."""
    if not torch.is_grad_enabled():
        return fn(*args)
    return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.recompute = False  # set by GPT for recompute="mlp"

    def forward(self, h):
        return recomputed(self._forward, h) if self.recompute else self._forward(h)

    def _forward(self, h):
        return self.c_proj(F.gelu(self.c_fc(h), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg, kernels):
        super().__init__()
        self.ln_1 = LayerNorm(cfg.n_embd, cfg.bias)
        self.attn = Attention(cfg, kernels)
        self.ln_2 = LayerNorm(cfg.n_embd, cfg.bias)
        self.mlp = MLP(cfg)
        self.ln_backend = kernels["layernorm"]

    def forward(self, h, x, next_ln):
        """h = ln_1(x) already computed; returns (next_ln(x_out), x_out)."""
        h, x = ops.add_layer_norm(self.attn(h), x, self.ln_2.weight, self.ln_2.bias, LN_EPS, self.ln_backend)
        return ops.add_layer_norm(self.mlp(h), x, next_ln.weight, next_ln.bias, LN_EPS, self.ln_backend)


class GPT(nn.Module):
    def __init__(self, cfg, kernels, recompute="none"):
        super().__init__()
        if cfg.dropout != 0:
            raise ValueError("GPT: dropout must be 0 (the fused kernels have no dropout)")
        if recompute not in RECOMPUTE:
            raise ValueError(f"GPT: recompute must be one of {', '.join(RECOMPUTE)}, got {recompute!r}")
        self.cfg, self.kernels, self.recompute = cfg, kernels, recompute
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.padded_vocab, cfg.n_embd),
            wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
            h=nn.ModuleList(Block(cfg, kernels) for _ in range(cfg.n_layer)),
            ln_f=LayerNorm(cfg.n_embd, cfg.bias),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.padded_vocab, bias=False)
        self.lm_head.weight = self.transformer.wte.weight
        for block in self.transformer.h:
            block.mlp.recompute = recompute == "mlp"
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding=True):
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def hidden(self, idx):
        """Final-LayerNorm hidden states (B, T, C)."""
        B, T = idx.shape
        if T > self.cfg.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.cfg.block_size}")
        tr, ln = self.transformer, self.kernels["layernorm"]
        x = tr.wte(idx) + tr.wpe(torch.arange(T, device=idx.device))
        blocks = list(tr.h)
        first_ln = blocks[0].ln_1 if blocks else tr.ln_f
        h = ops.layer_norm(x, first_ln.weight, first_ln.bias, LN_EPS, ln)
        for i, block in enumerate(blocks):
            next_ln = blocks[i + 1].ln_1 if i + 1 < len(blocks) else tr.ln_f
            if self.recompute == "block":
                h, x = recomputed(block, h, x, next_ln)
            else:
                h, x = block(h, x, next_ln)
        return h

    def forward(self, idx, targets=None):
        """With targets: mean loss over all positions. Without: last-position logits over the
        real vocabulary (B, vocab_size)."""
        h = self.hidden(idx)
        if targets is None:
            return h[:, -1] @ self.lm_head.weight[: self.cfg.vocab_size].to(h.dtype).t()
        C = h.shape[-1]
        return ops.linear_cross_entropy(h.reshape(-1, C), self.lm_head.weight, targets.reshape(-1),
                                        self.kernels["cross_entropy"], vocab_size=self.cfg.vocab_size)

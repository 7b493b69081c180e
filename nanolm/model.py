"""GPT-2 (nanoGPT-style), with every hot op going through nanolm/ops.py.

The residual stream is read once per sub-block: each residual add is fused with the LayerNorm
that follows it (ops.add_layer_norm), so a block receives (normalised input, residual stream)
and hands the next LayerNorm's weights the MLP output to fuse. No dropout: the fused kernels
have none, and nanolm trains with dropout=0.

One forward serves training and sampling: given a KVCache (nanolm/kvcache.py), GPT.forward
runs only the new positions and attention reads the earlier keys and values from the cache.
`impls` is the {op: backend module} mapping from nanolm.backends.impls().
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanolm import ops

LN_EPS = 1e-5


class LayerNorm(nn.Module):
    def __init__(self, n, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.bias = nn.Parameter(torch.zeros(n)) if bias else None


class Attention(nn.Module):
    def __init__(self, cfg, impls, layer):
        super().__init__()
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.n_head, self.layer, self.backend = cfg.n_head, layer, impls["attention"]

    def forward(self, h, cache=None):
        qkv = self.c_attn(h)  # (B, T, 3C)
        if cache is None:
            y = ops.causal_attention(qkv, self.n_head, self.backend)
        else:  # the new positions attend over the cached ones too
            y = cache.attend(self.layer, qkv, self.n_head)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, h):
        return self.c_proj(F.gelu(self.c_fc(h), approximate="tanh"))


class Block(nn.Module):
    """The pre-LN GPT-2 block, unfused:
        x = x + attn(ln_1(x))
        x = x + mlp(ln_2(x))
    Here each residual add is fused with the LayerNorm after it (ops.add_layer_norm), so the
    block takes h = ln_1(x) from the previous one and returns (next_ln(x_out), x_out)."""

    def __init__(self, cfg, impls, layer):
        super().__init__()
        self.ln_1 = LayerNorm(cfg.n_embd, cfg.bias)
        self.attn = Attention(cfg, impls, layer)
        self.ln_2 = LayerNorm(cfg.n_embd, cfg.bias)
        self.mlp = MLP(cfg)
        self.ln_backend = impls["layernorm"]

    def forward(self, h, x, next_ln, cache=None):
        h, x = ops.add_layer_norm(self.attn(h, cache), x, self.ln_2.weight, self.ln_2.bias, LN_EPS,
                                  self.ln_backend)
        return ops.add_layer_norm(self.mlp(h), x, next_ln.weight, next_ln.bias, LN_EPS, self.ln_backend)


class GPT(nn.Module):
    def __init__(self, cfg, impls):
        super().__init__()
        if cfg.dropout != 0:
            raise ValueError("GPT: dropout must be 0 (the fused kernels have no dropout)")
        self.cfg, self.impls = cfg, impls
        self.tp = None  # the tensor-parallel group's communicator, set by tensor_parallel.parallelize
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.padded_vocab, cfg.n_embd),
            wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
            h=nn.ModuleList(Block(cfg, impls, i) for i in range(cfg.n_layer)),
            ln_f=LayerNorm(cfg.n_embd, cfg.bias),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.padded_vocab, bias=False)
        self.lm_head.weight = self.transformer.wte.weight
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

    def hidden(self, idx, cache=None):
        """Final-LayerNorm hidden states (B, T, C) of idx, the tokens at positions
        [start, start + T): start is 0, or cache.pos with a cache (which this advances)."""
        B, T = idx.shape
        start = 0 if cache is None else cache.pos
        if start + T > self.cfg.block_size:
            length = f"sequence length {T}" if cache is None else f"{start} cached + {T} new tokens"
            raise ValueError(f"{length} exceeds block_size {self.cfg.block_size}")
        tr, ln = self.transformer, self.impls["layernorm"]
        x = tr.wte(idx) + tr.wpe(torch.arange(start, start + T, device=idx.device))
        blocks = list(tr.h)
        first_ln = blocks[0].ln_1 if blocks else tr.ln_f
        h = ops.layer_norm(x, first_ln.weight, first_ln.bias, LN_EPS, ln)
        for i, block in enumerate(blocks):
            next_ln = blocks[i + 1].ln_1 if i + 1 < len(blocks) else tr.ln_f
            h, x = block(h, x, next_ln, cache)
        if cache is not None:
            cache.pos += T
        return h

    def forward(self, idx, targets=None, cache=None):
        """With targets: mean loss over all positions. Without: last-position logits over the
        real vocabulary (B, vocab_size). With a KVCache (sampling): idx holds only the new
        tokens, the cache the keys and values of the earlier ones."""
        h = self.hidden(idx, cache)
        if self.tp is not None:  # vocab-parallel lm_head (nanolm/tensor_parallel.py)
            return self.lm_head(h, targets)
        if targets is None:
            return h[:, -1] @ self.lm_head.weight[: self.cfg.vocab_size].to(h.dtype).t()
        C = h.shape[-1]
        return ops.linear_cross_entropy(h.reshape(-1, C), self.lm_head.weight, targets.reshape(-1),
                                        self.impls["cross_entropy"], vocab_size=self.cfg.vocab_size)

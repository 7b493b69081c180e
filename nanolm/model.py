"""GPT-2 (nanoGPT-style), with every hot op going through nanolm/ops/ (torch.library ops).

The residual stream is read once per sub-block: each residual add is fused with the LayerNorm
that follows it (layernorm.add_layer_norm), so a block receives (normalised input, residual stream)
and hands the next LayerNorm's weights the MLP output to fuse.

Dropout (cfg.dropout > 0, training mode only) sits where nanoGPT puts it, inside the fused
kernels: on the embedding sum (fused with the first LayerNorm), on each residual branch before
its add (fused with the add+LayerNorm) and on the attention probabilities (inside the flash
attention). Masks are Philox streams keyed by (seed, offset), see DropoutStream.

Activation recomputation (GPT(..., recompute=)), as llm.c's -r, trades compute for memory:
"mlp" keeps only each MLP's input and recomputes its two 4*C-wide activations (the GELU's input
and output: half of a block's saved activations) in the backward; "block" keeps only each
block's inputs (h, x) and reruns the whole block. torch.utils.checkpoint (non-reentrant) reruns
the same code on the same inputs, the registered ops included, and the rerun
block gets the same Dropout arguments (seed, offset) as the first run, so the gradients are
bit-identical to training without it, dropout included.

One forward serves training and sampling: given a KVCache (nanolm/kvcache.py), GPT.forward
runs only the new positions and attention reads the earlier keys and values from the cache.
`impls` is the {op: backend name} mapping from nanolm.ops.backends.resolve().
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from nanolm.ops import attention, cross_entropy, layernorm
from nanolm.ops.dropout import dropout

LN_EPS = 1e-5


class LayerNorm(nn.Module):
    def __init__(self, n, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.bias = nn.Parameter(torch.zeros(n)) if bias else None


class DropoutStream(nn.Module):
    """Where each dropout mask comes from: one Philox key per rank (seed), and a fresh offset for
    every call site of every training forward, so no two masks share a counter and a
    recomputation that reuses a forward's Dropout arguments regenerates its masks exactly.
    The count of training forwards is in the state dict (extra state), so a resumed run draws
    the masks the uninterrupted run would have drawn."""

    SITES_PER_LAYER = 3  # attention probabilities, attention branch, MLP branch

    def __init__(self, p, n_layer):
        super().__init__()
        self.p, self.n_layer = p, n_layer
        self.seed = 0  # set by the trainer: see dropout_seed()
        self.forwards = 0

    @staticmethod
    def dropout_seed(seed, rank):
        """Philox key of a rank: the run's seed in the low word, the rank in the high word, so
        ranks draw independent masks and a run's masks depend on nothing else."""
        if not 0 <= seed < 2 ** 32:
            raise ValueError(f"dropout: seed must be in [0, 2^32), got {seed}")
        return seed | rank << 32

    def next_forward(self):
        """The Dropout arguments of one training forward: (embedding sum, [(attention
        probabilities, attention branch, MLP branch) per layer]). Site s of forward n has offset
        n * sites + s."""
        sites = 1 + self.SITES_PER_LAYER * self.n_layer
        base, self.forwards = self.forwards * sites, self.forwards + 1

        def site(s):
            return dropout(self.p, self.seed, base + s)

        per_layer = self.SITES_PER_LAYER
        return site(0), [tuple(site(1 + per_layer * i + j) for j in range(per_layer))
                         for i in range(self.n_layer)]

    def get_extra_state(self):
        return {"forwards": self.forwards}

    def set_extra_state(self, state):
        self.forwards = state["forwards"]


class Attention(nn.Module):
    def __init__(self, cfg, impls, layer):
        super().__init__()
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.n_head, self.layer, self.backend = cfg.n_head, layer, impls["attention"]

    def forward(self, h, cache=None, dropout=None):
        qkv = self.c_attn(h)  # (B, T, 3C)
        if cache is None:
            y = attention.causal_attention(qkv, self.n_head, self.n_head, self.backend, dropout)
        else:  # the new positions attend over the cached ones too
            y = cache.attend(self.layer, qkv, self.n_head)
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
    """The pre-LN GPT-2 block, unfused:
        x = x + attn(ln_1(x))
        x = x + mlp(ln_2(x))
    Here each residual add is fused with the LayerNorm after it (layernorm.add_layer_norm), so the
    block takes h = ln_1(x) from the previous one and returns (next_ln(x_out), x_out)."""

    def __init__(self, cfg, impls, layer):
        super().__init__()
        self.ln_1 = LayerNorm(cfg.n_embd, cfg.bias)
        self.attn = Attention(cfg, impls, layer)
        self.ln_2 = LayerNorm(cfg.n_embd, cfg.bias)
        self.mlp = MLP(cfg)
        self.ln_backend = impls["layernorm"]

    def forward(self, h, x, next_ln, cache=None, dropout=(None, None, None)):
        """dropout: the Dropout arguments (or None) of the attention probabilities, the attention
        branch and the MLP branch (training only: never with a cache)."""
        attn_probs, attn_branch, mlp_branch = dropout
        h, x = layernorm.add_layer_norm(self.attn(h, cache, attn_probs), x, self.ln_2.weight, self.ln_2.bias,
                                        LN_EPS, self.ln_backend, attn_branch)
        return layernorm.add_layer_norm(self.mlp(h), x, next_ln.weight, next_ln.bias, LN_EPS, self.ln_backend,
                                        mlp_branch)


def compiled(model):
    """torch.compile(model, fullgraph=True): one graph, no breaks (the hot ops are torch.library
    ops). DropoutStream counts forwards in an int attribute that changes every training step;
    traced as a symbolic int (allow_unspec_int_on_nn_module) it is one more graph input, where
    as a constant it would recompile the model at every step."""
    torch._dynamo.config.allow_unspec_int_on_nn_module = True
    return torch.compile(model, fullgraph=True)


def parameter_count(cfg):
    """GPT(cfg).num_params(non_embedding=False), from the shapes alone, without building the model
    (the trainer checks it fits in memory before allocating anything). Per block: two LayerNorms
    (C weights, + C biases), c_attn (C x 3C), attention's c_proj (C x C), c_fc (C x 4C), the MLP's
    c_proj (4C x C), each Linear with its bias; then the embeddings (the lm_head is tied to wte)
    and ln_f."""
    C, b = cfg.n_embd, int(cfg.bias)
    per_block = (2 * (C + b * C) + (3 * C * C + b * 3 * C) + (C * C + b * C) + (4 * C * C + b * 4 * C)
                 + (4 * C * C + b * C))
    return cfg.n_layer * per_block + (cfg.padded_vocab + cfg.block_size) * C + C + b * C


class GPT(nn.Module):
    def __init__(self, cfg, impls, recompute="none"):
        super().__init__()
        if not 0 <= cfg.dropout < 1:
            raise ValueError(f"GPT: dropout must be in [0, 1), got {cfg.dropout}")
        if recompute not in RECOMPUTE:
            raise ValueError(f"GPT: recompute must be one of {', '.join(RECOMPUTE)}, got {recompute!r}")
        self.cfg, self.impls, self.recompute = cfg, impls, recompute
        self.tp = None  # the tensor-parallel group's communicator, set by tensor_parallel.parallelize
        if cfg.dropout > 0:  # absent at 0: the state dict is then exactly as without dropout
            self.dropout = DropoutStream(cfg.dropout, cfg.n_layer)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.padded_vocab, cfg.n_embd),
            wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
            h=nn.ModuleList(Block(cfg, impls, i) for i in range(cfg.n_layer)),
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
        if self.training and self.cfg.dropout > 0 and cache is None:
            embedding, per_layer = self.dropout.next_forward()
            h, x = layernorm.add_layer_norm(x, None, first_ln.weight, first_ln.bias, LN_EPS, ln, embedding)
        else:
            per_layer = [(None, None, None)] * len(blocks)
            h = layernorm.layer_norm(x, first_ln.weight, first_ln.bias, LN_EPS, ln)
        for i, block in enumerate(blocks):
            next_ln = blocks[i + 1].ln_1 if i + 1 < len(blocks) else tr.ln_f
            if self.recompute == "block":
                h, x = recomputed(block, h, x, next_ln, cache, per_layer[i])
            else:
                h, x = block(h, x, next_ln, cache, per_layer[i])
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
        return cross_entropy.linear_cross_entropy(h.reshape(-1, C), self.lm_head.weight, targets.reshape(-1),
                                                  self.impls["cross_entropy"], vocab_size=self.cfg.vocab_size)

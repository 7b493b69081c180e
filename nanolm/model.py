"""GPT-2 (nanoGPT-style), and the modern block built from the same code by ModelConfig's
choices (RMSNorm, RoPE + QK-norm, GQA, SwiGLU/ReLU^2, no bias, untied lm_head, logit softcap:
README "Model"), with every hot op going through nanolm/ops/ (torch.library ops).

The residual stream is read once per sub-block: each residual add is fused with the norm that
follows it (layernorm.add_layer_norm / add_rms_norm), so a block receives (normalised input,
residual stream) and hands the next norm's weights the MLP output to fuse.

Dropout (cfg.dropout > 0, training mode only) sits where nanoGPT puts it, inside the fused
kernels: on the embedding sum (fused with the first LayerNorm), on each residual branch before
its add (fused with the add+LayerNorm) and on the attention probabilities (inside the flash
attention). Masks are Philox streams keyed by (seed, offset), see DropoutStream.

Activation recomputation (GPT(..., recompute=)), as llm.c's -r, trades compute for memory:
"mlp" keeps only each MLP's input and recomputes its two hidden-wide activations (the
activation's input and output: about half of a block's saved activations) in the backward; "block" keeps only each
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

from nanolm.ops import attention, cross_entropy, layernorm, mlp_activation, rope
from nanolm.ops.dropout import dropout

class Norm(nn.Module):
    """LayerNorm (GPT-2) or RMSNorm (Llama; nanochat's without a weight), with the residual add
    before it fused: weight (C,) or None (norm_weight=False), bias (C,) only for a LayerNorm
    with cfg.bias. Both run in the layernorm op module's kernels."""

    def __init__(self, cfg):
        super().__init__()
        n = cfg.n_embd
        self.rms, self.eps = cfg.norm == "rmsnorm", cfg.norm_eps
        self.weight = nn.Parameter(torch.ones(n)) if cfg.norm_weight else None
        self.bias = nn.Parameter(torch.zeros(n)) if cfg.bias and not self.rms else None

    def norm(self, x, backend):
        if self.rms:
            return layernorm.rms_norm(x, self.weight, self.eps, backend)
        return layernorm.layer_norm(x, self.weight, self.bias, self.eps, backend)

    def add_norm(self, x, residual, backend, dropout):
        """(norm(dropout(x) + residual), dropout(x) + residual)."""
        if self.rms:
            return layernorm.add_rms_norm(x, residual, self.weight, self.eps, backend, dropout)
        return layernorm.add_layer_norm(x, residual, self.weight, self.bias, self.eps, backend, dropout)


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
    """Causal self-attention on the packed projection qkv (B, T, (H + 2*Hkv) * hs), laid out
    [q heads | k heads | v heads]: Hkv = n_kv_head key/value heads, each serving H/Hkv query heads
    (GQA; Hkv = H is GPT-2's MHA). With RoPE, q and k are normalised (qk_norm) and rotated in one
    op before the attention kernels read them (nanolm/ops/rope.py)."""

    def __init__(self, cfg, impls, layer):
        super().__init__()
        hs = cfg.head_size
        self.c_attn = nn.Linear(cfg.n_embd, (cfg.n_head + 2 * cfg.kv_heads) * hs, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_head * hs, cfg.n_embd, bias=cfg.bias)
        # per rank: nanolm/tensor_parallel.py sets this rank's head counts
        self.n_head, self.n_kv_head, self.layer = cfg.n_head, cfg.kv_heads, layer
        self.rope = (cfg.rope_theta, cfg.qk_norm, impls["rope"]) if cfg.pos == "rope" else None
        self.backend = impls["attention"]

    def forward(self, h, cache=None, dropout=None):
        qkv = self.c_attn(h)  # (B, T, (H + 2*Hkv) * hs)
        if self.rope is not None:
            start = 0 if cache is None else cache.pos
            qkv = rope.qk_norm_rope(qkv, self.n_head, self.n_kv_head, start, *self.rope)
        if cache is None:
            y = attention.causal_attention(qkv, self.n_head, self.n_kv_head, self.backend, dropout)
        else:  # the new positions attend over the cached ones too
            y = cache.attend(self.layer, qkv, self.n_head, self.n_kv_head)
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
    """c_proj(act(c_fc(h))): act is GELU (tanh approximation, GPT-2), ReLU² (relu2) or SwiGLU,
    whose c_fc computes [gate | up] (2 * hidden rows) in one matmul."""

    def __init__(self, cfg, impls):
        super().__init__()
        self.kind = cfg.mlp
        self.backend = impls["mlp_activation"] if cfg.mlp != "gelu" else None
        width = 2 * cfg.hidden if cfg.mlp == "swiglu" else cfg.hidden
        self.c_fc = nn.Linear(cfg.n_embd, width, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.hidden, cfg.n_embd, bias=cfg.bias)
        self.recompute = False  # set by GPT for recompute="mlp"

    def forward(self, h):
        return recomputed(self._forward, h) if self.recompute else self._forward(h)

    def _forward(self, h):
        u = self.c_fc(h)
        if self.kind == "swiglu":
            a = mlp_activation.swiglu(u, self.backend)
        elif self.kind == "relu2":
            a = mlp_activation.relu2(u, self.backend)
        else:
            a = F.gelu(u, approximate="tanh")
        return self.c_proj(a)


class Block(nn.Module):
    """The pre-norm block (GPT-2's, and Llama's with RMSNorm), unfused:
        x = x + attn(ln_1(x))
        x = x + mlp(ln_2(x))
    Here each residual add is fused with the norm after it (Norm.add_norm), so the block takes
    h = ln_1(x) from the previous one and returns (next_ln(x_out), x_out)."""

    def __init__(self, cfg, impls, layer):
        super().__init__()
        self.ln_1 = Norm(cfg)
        self.attn = Attention(cfg, impls, layer)
        self.ln_2 = Norm(cfg)
        self.mlp = MLP(cfg, impls)
        self.ln_backend = impls["layernorm"]

    def forward(self, h, x, next_ln, cache=None, dropout=(None, None, None)):
        """dropout: the Dropout arguments (or None) of the attention probabilities, the attention
        branch and the MLP branch (training only: never with a cache)."""
        attn_probs, attn_branch, mlp_branch = dropout
        h, x = self.ln_2.add_norm(self.attn(h, cache, attn_probs), x, self.ln_backend, attn_branch)
        return next_ln.add_norm(self.mlp(h), x, self.ln_backend, mlp_branch)


def compiled(model):
    """torch.compile(model, fullgraph=True): one graph, no breaks (the hot ops are torch.library
    ops). DropoutStream counts forwards in an int attribute that changes every training step;
    traced as a symbolic int (allow_unspec_int_on_nn_module) it is one more graph input, where
    as a constant it would recompile the model at every step."""
    torch._dynamo.config.allow_unspec_int_on_nn_module = True
    return torch.compile(model, fullgraph=True)


def parameter_count(cfg):
    """GPT(cfg).num_params(non_embedding=False), from the shapes alone, without building the model
    (the trainer checks it fits in memory before allocating anything). Per block: two norms
    (C weights unless parameter-free, + C biases for a LayerNorm with bias), c_attn
    (C x (H + 2*Hkv)*hs), attention's c_proj (H*hs x C), c_fc (C x hidden, twice for SwiGLU's
    [gate | up]), the MLP's c_proj (hidden x C), each Linear with its bias; then the embeddings
    (wpe with learned positions; an lm_head of its own unless tied) and ln_f."""
    C, b, hs, F_ = cfg.n_embd, int(cfg.bias), cfg.head_size, cfg.hidden
    norm = C * int(cfg.norm_weight) + C * b * int(cfg.norm == "layernorm")
    qkv, fc = (cfg.n_head + 2 * cfg.kv_heads) * hs, F_ * (2 if cfg.mlp == "swiglu" else 1)
    per_block = 2 * norm + (C * qkv + b * qkv) + (cfg.n_head * hs * C + b * C) + (C * fc + b * fc) + (F_ * C + b * C)
    embeddings = cfg.padded_vocab * C * (1 if cfg.tie_embeddings else 2)
    embeddings += cfg.block_size * C if cfg.pos == "learned" else 0
    return cfg.n_layer * per_block + embeddings + norm


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
        modules = dict(wte=nn.Embedding(cfg.padded_vocab, cfg.n_embd))
        if cfg.pos == "learned":  # with RoPE, positions enter through the rotation of q and k
            modules["wpe"] = nn.Embedding(cfg.block_size, cfg.n_embd)
        modules.update(h=nn.ModuleList(Block(cfg, impls, i) for i in range(cfg.n_layer)), ln_f=Norm(cfg))
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.padded_vocab, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        for block in self.transformer.h:
            block.mlp.recompute = recompute == "mlp"
        self._init_weights()

    def _init_weights(self):
        """GPT-2's (nanoGPT's): every matrix N(0, 0.02), as Llama's initializer_range; the
        residual projections (c_proj) scaled by 1/sqrt(2 * n_layer); biases zero, norm weights
        one. An untied lm_head starts at N(0, 0.001), as nanochat's, so the first logits are
        nearly uniform (tied, it is wte)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * self.cfg.n_layer))
        if not self.cfg.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=0.001)

    def num_params(self, non_embedding=True):
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    def hidden(self, idx, cache=None):
        """Final-norm hidden states (B, T, C) of idx, the tokens at positions
        [start, start + T): start is 0, or cache.pos with a cache (which this advances)."""
        B, T = idx.shape
        start = 0 if cache is None else cache.pos
        if start + T > self.cfg.block_size:
            length = f"sequence length {T}" if cache is None else f"{start} cached + {T} new tokens"
            raise ValueError(f"{length} exceeds block_size {self.cfg.block_size}")
        tr, ln = self.transformer, self.impls["layernorm"]
        x = tr.wte(idx)
        if "wpe" in tr:
            x = x + tr.wpe(torch.arange(start, start + T, device=idx.device))
        blocks = list(tr.h)
        first_ln = blocks[0].ln_1 if blocks else tr.ln_f
        if self.training and self.cfg.dropout > 0 and cache is None:
            embedding, per_layer = self.dropout.next_forward()
            h, x = first_ln.add_norm(x, None, ln, embedding)
        else:
            per_layer = [(None, None, None)] * len(blocks)
            h = first_ln.norm(x, ln)
        for i, block in enumerate(blocks):
            next_ln = blocks[i + 1].ln_1 if i + 1 < len(blocks) else tr.ln_f
            if self.recompute == "block":
                h, x = recomputed(block, h, x, next_ln, cache, per_layer[i])
            else:
                h, x = block(h, x, next_ln, cache, per_layer[i])
        if cache is not None:
            cache.pos += T
        return h

    def softcap(self, logits):
        """cap * tanh(logits / cap) with logit_softcap > 0 (Gemma 2, nanochat): logits stay in
        (-cap, cap); the identity when it is 0."""
        cap = self.cfg.logit_softcap
        return logits if cap == 0 else cap * torch.tanh(logits / cap)

    def forward(self, idx, targets=None, cache=None):
        """With targets: mean loss over all positions. Without: last-position logits over the
        real vocabulary (B, vocab_size). With a KVCache (sampling): idx holds only the new
        tokens, the cache the keys and values of the earlier ones."""
        h = self.hidden(idx, cache)
        if self.tp is not None:  # vocab-parallel lm_head (nanolm/tensor_parallel.py)
            return self.lm_head(h, targets)
        if targets is None:
            return self.softcap(h[:, -1] @ self.lm_head.weight[: self.cfg.vocab_size].to(h.dtype).t())
        C = h.shape[-1]
        h, targets = h.reshape(-1, C), targets.reshape(-1)
        if self.cfg.logit_softcap:
            # the fused linear cross-entropy kernels have no cap between the matmul and the
            # softmax: the logits (B*T, Vp) are materialised, capped, then reduced
            logits = self.softcap(h @ self.lm_head.weight.to(h.dtype).t())
            return cross_entropy.cross_entropy(logits, targets, self.impls["cross_entropy"],
                                               vocab_size=self.cfg.vocab_size)
        return cross_entropy.linear_cross_entropy(h, self.lm_head.weight, targets, self.impls["cross_entropy"],
                                                  vocab_size=self.cfg.vocab_size)

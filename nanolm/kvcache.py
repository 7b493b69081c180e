"""Incremental decoding with a key/value cache, driven from the model's own modules.

Sampling one token with a full forward re-reads the whole context: T tokens cost O(T^2)
forwards' worth of work. Here every layer keeps the keys and values it has already computed,
so each new token runs the network on one position and attends over the cache: the cost of
generating T tokens is linear in T (times the attention over the cache).

It walks the nanoGPT / HF GPT-2 module layout, which nanolm's parameter names already fix:
model.transformer.{wte, wpe, h[i].{ln_1, attn.c_attn, attn.c_proj, ln_2, mlp}, ln_f},
model.lm_head, and model.cfg.{n_head, block_size, vocab_size}. Only attention is recomputed here
(it needs the cache); layer norms go through ops.layer_norm with the model's layernorm backend,
and the projections and MLP are the model's modules, so the cached path runs the same weights
and kernels as training. The residual adds are plain here: with one new position per step
there is no traffic worth fusing.
"""
import torch
import torch.nn.functional as F

from nanolm import ops
from nanolm.model import LN_EPS


class KVCache:
    """Keys and values of every layer for positions [0, pos): (n_layer, B, nh, max_len, hs)."""

    def __init__(self, n_layer, batch, n_head, max_len, head_dim, device, dtype):
        shape = (n_layer, batch, n_head, max_len, head_dim)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.pos = 0

    @classmethod
    def for_model(cls, model, batch):
        cfg = model.cfg
        wte = model.transformer.wte.weight
        n_embd = wte.shape[1]
        return cls(len(model.transformer.h), batch, cfg.n_head, cfg.block_size,
                   n_embd // cfg.n_head, wte.device, wte.dtype)


def _attend(attn, x, cache, layer, n_head):
    B, t, C = x.shape
    q, k, v = attn.c_attn(x).split(C, dim=2)
    q, k, v = (z.view(B, t, n_head, C // n_head).transpose(1, 2) for z in (q, k, v))  # (B, nh, t, hs)
    end = cache.pos + t
    cache.k[layer, :, :, cache.pos:end] = k
    cache.v[layer, :, :, cache.pos:end] = v
    keys, values = cache.k[layer, :, :, :end], cache.v[layer, :, :, :end]
    mask = None
    if t > 1:  # query i sits at position pos+i and sees keys 0..pos+i
        mask = (torch.arange(end, device=x.device)[None, :]
                <= torch.arange(cache.pos, end, device=x.device)[:, None])
    y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
    return attn.c_proj(y.transpose(1, 2).reshape(B, t, C))


def _layer_norm(model, ln, x):
    return ops.layer_norm(x, ln.weight, ln.bias, LN_EPS, model.kernels["layernorm"])


def forward_cached(model, idx, cache):
    """Run idx (B, t), the tokens at positions [cache.pos, cache.pos + t), through the model,
    filling the cache; returns the logits of the last position over the real vocabulary,
    (B, vocab_size), as model(idx) does."""
    t = idx.shape[1]
    if cache.pos + t > cache.max_len:
        raise ValueError(f"forward_cached: {cache.pos} cached + {t} new tokens exceed the "
                         f"cache length {cache.max_len}")
    tr = model.transformer
    pos = torch.arange(cache.pos, cache.pos + t, device=idx.device)
    x = tr.wte(idx) + tr.wpe(pos)
    for i, block in enumerate(tr.h):
        x = x + _attend(block.attn, _layer_norm(model, block.ln_1, x), cache, i, model.cfg.n_head)
        x = x + block.mlp(_layer_norm(model, block.ln_2, x))
    cache.pos += t
    h = _layer_norm(model, tr.ln_f, x[:, -1:])[:, 0]
    return h @ model.lm_head.weight[:model.cfg.vocab_size].to(h.dtype).t()

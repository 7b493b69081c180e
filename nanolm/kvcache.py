"""The key/value cache of incremental decoding: GPT.forward(idx, cache=cache) runs only the new
positions, and each layer's attention reads the earlier keys and values from here.

Sampling one token with a full forward re-reads the whole context: T tokens cost O(T^2)
forwards' worth of work. With the cache every layer keeps the keys and values it has already
computed, so each new token runs the network on one position and attends over the cache: the
cost of generating T tokens is linear in T (times the attention over the cache).

The attention over the cache is torch's scaled_dot_product_attention, not a backend kernel:
the kernels compute causal attention of a sequence with itself, and a decoding step's queries
(one position, or a chunk after a window slide) attend over a longer key range.
"""
import torch
import torch.nn.functional as F


class KVCache:
    """Keys and values of every layer for positions [0, pos): (n_layer, B, Hkv, max_len, hs),
    only the key/value heads (with GQA, H/Hkv times fewer than the query heads).
    GPT.forward advances pos by the number of tokens it ran; with RoPE the new keys are rotated
    for their positions [pos, pos + t) before they are stored."""

    def __init__(self, n_layer, batch, n_kv_head, max_len, head_dim, device, dtype):
        shape = (n_layer, batch, n_kv_head, max_len, head_dim)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.pos = 0

    @classmethod
    def for_model(cls, model, batch):
        cfg = model.cfg
        wte = model.transformer.wte.weight
        return cls(len(model.transformer.h), batch, cfg.kv_heads, cfg.block_size, cfg.head_size, wte.device,
                   wte.dtype)

    def attend(self, layer, qkv, n_head, n_kv_head):
        """Causal attention of the new positions [pos, pos + t) of qkv (B, t, (H + 2*Hkv) * hs)
        over the cached ones and themselves, storing their keys and values; returns (B, t, H*hs)."""
        B, t, width = qkv.shape
        hs = width // (n_head + 2 * n_kv_head)
        end = self.pos + t
        if end > self.max_len:
            raise ValueError(f"KVCache: {self.pos} cached + {t} new tokens exceed the cache length {self.max_len}")
        q, k, v = (z.transpose(1, 2) for z in  # (B, heads, t, hs)
                   qkv.view(B, t, n_head + 2 * n_kv_head, hs).split((n_head, n_kv_head, n_kv_head), dim=2))
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        keys, values = self.k[layer, :, :, :end], self.v[layer, :, :, :end]
        mask = None
        if t > 1:  # query i sits at position pos+i and sees keys 0..pos+i
            mask = (torch.arange(end, device=qkv.device)[None, :]
                    <= torch.arange(self.pos, end, device=qkv.device)[:, None])
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=n_head != n_kv_head)
        return y.transpose(1, 2).reshape(B, t, n_head * hs)

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
    """Keys and values of every layer for positions [0, pos): (n_layer, B, nh, max_len, hs).
    GPT.forward advances pos by the number of tokens it ran."""

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

    def attend(self, layer, qkv, n_head):
        """Causal attention of the new positions [pos, pos + t) of qkv (B, t, 3C) over the
        cached ones and themselves, storing their keys and values; returns (B, t, C)."""
        B, t, C3 = qkv.shape
        C = C3 // 3
        end = self.pos + t
        if end > self.max_len:
            raise ValueError(f"KVCache: {self.pos} cached + {t} new tokens exceed the cache length {self.max_len}")
        q, k, v = (z.view(B, t, n_head, C // n_head).transpose(1, 2) for z in qkv.split(C, dim=2))  # (B, nh, t, hs)
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        keys, values = self.k[layer, :, :, :end], self.v[layer, :, :, :end]
        mask = None
        if t > 1:  # query i sits at position pos+i and sees keys 0..pos+i
            mask = (torch.arange(end, device=qkv.device)[None, :]
                    <= torch.arange(self.pos, end, device=qkv.device)[:, None])
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        return y.transpose(1, 2).reshape(B, t, C)

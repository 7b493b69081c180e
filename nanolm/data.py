"""Minimal data: byte tokenizer, the Python stdlib's own sources as a corpus, a random-window loader.

pystdlib split (fixed): the top-level *.py files of the running Python's stdlib, sorted by path;
every 10th file (index % 10 == 9) is validation, the rest training; files are read until
MAX_BYTES in total so loading stays fast.
"""
import sysconfig
from pathlib import Path

import numpy as np
import torch

MAX_BYTES = 4_000_000


class ByteTokenizer:
    vocab_size = 256
    eot = 0  # NUL never appears in source text

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def get_tokenizer(name):
    if name != "byte":
        raise ValueError(f"unknown tokenizer {name!r}; valid: byte")
    return ByteTokenizer()


def load_dataset(name, tokenizer):
    """-> (train_tokens, val_tokens) int arrays, documents joined by tokenizer.eot."""
    if name != "pystdlib":
        raise ValueError(f"unknown dataset {name!r}; valid: pystdlib")
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    if not files:
        raise ValueError("pystdlib: no .py files found in the standard library directory")
    splits, total = ([], []), 0
    for i, path in enumerate(files):
        text = path.read_text(encoding="utf-8", errors="replace")
        total += len(text)
        if total > MAX_BYTES:
            break
        splits[i % 10 == 9].append(tokenizer.encode(text) + [tokenizer.eot])
    return tuple(np.array([t for doc in s for t in doc], dtype=np.int64) for s in splits)


class Loader:
    """Random (B, T) windows; x is the window, y the window shifted by one token.
    Each rank draws from its own generator seeded by (seed, rank)."""

    def __init__(self, tokens, batch_size, block_size, seed, rank=0, world_size=1):
        if len(tokens) <= block_size + 1:
            raise ValueError(f"block_size={block_size} needs more than {block_size + 1} tokens, "
                             f"the data has {len(tokens)}")
        self.tokens = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
        self.batch_size, self.block_size = batch_size, block_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.generator = torch.Generator().manual_seed(seed * 1000 + rank)

    def next_batch(self, device):
        high = len(self.tokens) - self.block_size - 1
        starts = torch.randint(0, high + 1, (self.batch_size,), generator=self.generator)
        idx = starts[:, None] + torch.arange(self.block_size + 1)
        window = self.tokens[idx]
        x, y = window[:, :-1].contiguous(), window[:, 1:].contiguous()
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])

"""Loss, perplexity and bits per byte of a checkpoint on a dataset split.

    python -m nanolm.eval --ckpt=RUN|FILE [--data=NAME] [--split=val|train] [--tokens=N]
                          [--batch_size=8] [--device=cpu|cuda] [--kernels=auto]

The first N target tokens of the split (default: all of them) are cut into consecutive,
non-overlapping windows of block_size tokens, the last one shorter when N is not a multiple:
window k reads tokens[kT : kT+T] and predicts tokens[kT+1 : kT+T+1]. Each window starts with no
earlier context (as nanoGPT's evaluation; a sliding window would give a lower loss at T times
the cost). Same checkpoint, data and N -> the same numbers, in float32 with dropout off.

    loss          mean cross-entropy over the N targets, in nats
    perplexity    exp(loss)
    bits per byte total nats / ln 2 / the number of UTF-8 bytes the N targets decode to, which
                  compares models across tokenizers. End-of-text tokens count no bytes: they
                  separate documents and are not text.

--data defaults to the dataset the checkpoint was trained on; a checkpoint imported from Hugging
Face (`python -m nanolm.hf import`) names none, so pass it. A progress line on stderr counts the
tokens done (a whole val split takes minutes on a CPU).
"""
import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch

from nanolm import checkpoint
from nanolm.config import ModelConfig, cli
from nanolm.data import Progress, get_tokenizer, load_dataset
from nanolm.metrics import perplexity
from nanolm.model import GPT
from nanolm.ops import backends


def load(path, device, kernels="auto"):
    """(model in eval mode, tokenizer, checkpoint dict without its tensors) from a checkpoint
    file or a run dir (its newest checkpoint)."""
    ckpt = checkpoint.load_gpt(path, map_location=device)
    impls = backends.resolve(kernels, torch.device(device))
    model = GPT(ModelConfig(**ckpt["config"]["model"]), impls)
    model.load_state_dict(ckpt.pop("model"))
    return model.to(device).eval(), get_tokenizer(ckpt["config"]["tokenizer"]), ckpt


def windows(tokens, n_targets, block_size, batch_size):
    """(x, y) int64 batches covering targets tokens[1 : n_targets + 1]: full windows of
    block_size, batch_size at a time, then the shorter last window alone."""
    n_full, rest = divmod(n_targets, block_size)
    for first in range(0, n_full, batch_size):
        count = min(batch_size, n_full - first)
        span = np.asarray(tokens[first * block_size: (first + count) * block_size + 1]).astype(np.int64)
        x = torch.from_numpy(span[:-1]).view(count, block_size)
        y = torch.from_numpy(span[1:]).view(count, block_size)
        yield x, y
    if rest:
        span = np.asarray(tokens[n_full * block_size: n_targets + 1]).astype(np.int64)
        yield torch.from_numpy(span[:-1]).view(1, rest), torch.from_numpy(span[1:]).view(1, rest)


def utf8_bytes(tokenizer, ids):
    """Bytes of text the tokens decode to, end-of-text tokens left out."""
    ids = np.asarray(ids)
    return len(tokenizer.decode_bytes(ids[ids != tokenizer.eot].tolist()))


@torch.no_grad()
def evaluate(model, tokenizer, tokens, n_targets=0, batch_size=8, progress=False):
    """{'loss', 'perplexity', 'bits_per_byte', 'tokens', 'bytes'} over the first n_targets
    targets of `tokens` (0: all of them); see the module docstring. progress: a progress line
    on stderr."""
    available = len(tokens) - 1
    n_targets = n_targets or available
    if not 0 < n_targets <= available:
        raise ValueError(f"tokens={n_targets}: the split has {available} target tokens")
    device = next(model.parameters()).device
    total_nats = 0.0  # a Python float (float64): the sum of up to millions of losses
    bar = Progress(n_targets, "evaluating", unit="k tokens", scale=1e-3) if progress else None
    for x, y in windows(tokens, n_targets, model.cfg.block_size, batch_size):
        mean = model(x.to(device), y.to(device))
        total_nats += mean.item() * y.numel()
        if bar:
            bar.update(y.numel())
    if bar:
        bar.close()
    n_bytes = utf8_bytes(tokenizer, tokens[1:n_targets + 1])
    loss = total_nats / n_targets
    return {"loss": loss, "perplexity": perplexity(loss),
            "bits_per_byte": total_nats / math.log(2) / n_bytes if n_bytes else float("nan"),
            "tokens": n_targets, "bytes": n_bytes}


def main(argv=None):
    return cli(run_cli, sys.argv[1:] if argv is None else argv)


def run_cli(argv):
    p = argparse.ArgumentParser(prog="python -m nanolm.eval",
                                description="loss, perplexity and bits per byte of a checkpoint")
    p.add_argument("--ckpt", required=True, help="checkpoint file (e.g. RUN/ckpt_best.pt), or a run dir (its newest)")
    p.add_argument("--data", default="", help="dataset, as nanolm.train's --data (default: the checkpoint's)")
    p.add_argument("--split", default="val", choices=("val", "train"))
    p.add_argument("--tokens", type=int, default=0, help="target tokens to evaluate (default 0: the whole split)")
    p.add_argument("--batch_size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--kernels", default="auto", help="kernel backends, as in nanolm.train")
    args = p.parse_args(argv)
    if args.tokens < 0 or args.batch_size < 1:
        raise ValueError(f"--tokens must be >= 0 and --batch_size >= 1, got {args.tokens}, {args.batch_size}")
    path = checkpoint.latest(args.ckpt) if Path(args.ckpt).is_dir() else Path(args.ckpt)
    if path is None or not path.is_file():
        raise ValueError(f"no checkpoint at {args.ckpt}")
    model, tokenizer, ckpt = load(path, args.device, args.kernels)
    data = args.data or ckpt["config"].get("data")
    if not data:
        raise ValueError(f"{path} does not name its dataset (an imported checkpoint?): pass --data")
    train_tokens, val_tokens = load_dataset(data, tokenizer)
    tokens = val_tokens if args.split == "val" else train_tokens
    r = evaluate(model, tokenizer, tokens, args.tokens, args.batch_size, progress=True)
    print(f"{path} (step {ckpt['step']}) on {data} {args.split}: {r['tokens']:,} tokens "
          f"({r['bytes']:,} bytes) in windows of {model.cfg.block_size}")
    print(f"loss {r['loss']:.4f} | perplexity {r['perplexity']:.3f} | bits/byte {r['bits_per_byte']:.4f}")
    return r


if __name__ == "__main__":
    main()

"""Generate text from a checkpoint, streaming it as it is produced.

    python -m nanolm.sample --ckpt runs/x [--prompt "def "] [--temperature 0.8] [--top_k 200]
                            [--max_new_tokens 500] [--seed 1337]

Decoding runs the model's forward with a KV cache (nanolm/kvcache.py), so cost is linear in the number of tokens.
When the context reaches block_size the window slides by half a block (the newest block_size/2
tokens, at least one, are re-read into a fresh cache): the model then sees between T/2 and T
tokens of context, and the re-reads stay linear overall.
"""
import argparse
import math
import sys

import torch

from nanolm import checkpoint
from nanolm.config import ModelConfig, cli
from nanolm.data import StreamDecoder, get_tokenizer
from nanolm.kvcache import KVCache
from nanolm.model import GPT
from nanolm.ops import backends


def pick(logits, temperature, top_k, generator, vocab_size):
    """Next token (B, 1) from last-position logits (B, Vp). Padding columns beyond vocab_size
    are never sampled; temperature 0 is greedy."""
    logits = logits[:, :vocab_size].float()
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k < vocab_size:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


def check_sampling(temperature, top_k):
    """Raise ValueError for a temperature that is negative or nan (a negative one would sample
    the least likely tokens) or a top_k below 1."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, seed=0, stream=None,
             vocab_size=None):
    """Extend idx (B, t) by max_new_tokens sampled tokens; stream(ids) gets each step's (B, 1)
    tokens as soon as they exist. Same seed, model and prompt -> same tokens."""
    check_sampling(temperature, top_k)
    block = model.cfg.block_size
    vocab_size = vocab_size or model.cfg.vocab_size
    generator = torch.Generator(device=idx.device).manual_seed(seed)
    cache = KVCache.for_model(model, idx.shape[0])
    logits = model(idx[:, -block:], cache=cache)
    out = [idx]
    for i in range(max_new_tokens):
        nxt = pick(logits, temperature, top_k, generator, vocab_size)
        out.append(nxt)
        if stream is not None:
            stream(nxt)
        if i == max_new_tokens - 1:
            break
        if cache.pos == block:
            cache.pos = 0
            logits = model(torch.cat(out, dim=1)[:, -max(1, block // 2):], cache=cache)
        else:
            logits = model(nxt, cache=cache)
    return torch.cat(out, dim=1)


def load_model(ckpt_path, device, kernels="auto"):
    """Model and tokenizer from a checkpoint whose config holds 'model' (ModelConfig's fields)
    and 'tokenizer' (its name), as nanolm.train writes it."""
    ckpt = checkpoint.load_gpt(ckpt_path, map_location=device)
    device = torch.device(device)
    model = GPT(ModelConfig(**ckpt["config"]["model"]),
                backends.resolve(kernels, device))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), get_tokenizer(ckpt["config"]["tokenizer"])


def main(argv=None):
    cli(run_cli, sys.argv[1:] if argv is None else argv)


def run_cli(argv):
    p = argparse.ArgumentParser(prog="python -m nanolm.sample")
    p.add_argument("--ckpt", required=True, help="checkpoint file, or a run dir (its latest)")
    p.add_argument("--prompt", default="")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top_k", type=int, default=200)
    p.add_argument("--max_new_tokens", type=int, default=500)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--kernels", default="auto", help="the backend per op (model impls), as --kernels of nanolm.train")
    args = p.parse_args(argv)
    check_sampling(args.temperature, args.top_k)
    if args.max_new_tokens < 1:
        raise ValueError(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
    model, tok = load_model(args.ckpt, args.device, args.kernels)
    ids = tok.encode(args.prompt) or [tok.eot]  # an empty prompt starts a fresh document
    decode = StreamDecoder(tok)
    sys.stdout.write(args.prompt)

    def stream(nxt):
        sys.stdout.write(decode(nxt[0].tolist()))
        sys.stdout.flush()

    idx = torch.tensor([ids], dtype=torch.long, device=args.device)
    generate(model, idx, args.max_new_tokens, args.temperature, args.top_k, args.seed, stream,
             tok.vocab_size)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()

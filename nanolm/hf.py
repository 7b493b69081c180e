"""Move weights between nanolm and Hugging Face GPT-2 (safetensors).

nanolm's parameter names are Hugging Face's (`transformer.h.0.attn.c_attn.weight`, ...) with
two differences this module undoes:
  * HF's Conv1D stores a weight as (in, out); nanolm's nn.Linear stores (out, in). The four
    projections c_attn, attn.c_proj, c_fc, mlp.c_proj are transposed both ways.
  * nanolm pads the vocabulary (50257 -> 50304, a multiple of 64, for fast matmuls); export
    drops the padding rows of wte, import appends zero rows.
lm_head is tied to wte: export writes no lm_head (HF re-ties it), import returns
`lm_head.weight` as the same tensor as `transformer.wte.weight`.
Needs the optional extra: pip install 'nanolm[hf]'.

    python -m nanolm.hf export RUN_DIR_OR_CKPT OUT_DIR    # -> OUT_DIR/model.safetensors, config.json
    python -m nanolm.hf import HF_DIR RUN_DIR             # -> RUN_DIR/ckpt_00000000.pt (weights only)
An imported checkpoint samples with `python -m nanolm.sample --ckpt RUN_DIR` and starts a
training run with `python -m nanolm.train --init_from=RUN_DIR ...` (e.g. fine-tuning GPT-2).
"""
import argparse
import dataclasses
import json
import os
import re
import sys

import torch

from nanolm import checkpoint
from nanolm.config import ModelConfig, cli
from nanolm.data import ByteTokenizer, GPT2Tokenizer
from nanolm.model import GPT
from nanolm.ops import backends

TRANSPOSED = re.compile(r"\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")
# buffers older HF GPT-2 files carry (the causal mask); nanolm has no such state
HF_BUFFERS = re.compile(r"\.attn\.(masked_)?bias$")
WTE = "transformer.wte.weight"


def _safetensors():
    try:
        import safetensors.torch
    except ImportError as e:
        raise ImportError("HF export/import needs safetensors: pip install 'nanolm[hf]'") from e
    return safetensors.torch


def to_hf(state_dict, vocab_size):
    """nanolm state dict -> HF GPT-2 tensors (contiguous, padding rows dropped)."""
    lm_head = state_dict.get("lm_head.weight")
    if lm_head is not None and not torch.equal(lm_head, state_dict[WTE]):
        raise ValueError("lm_head.weight differs from transformer.wte.weight: GPT-2 ties them, "
                         "so an untied model cannot be exported")
    out = {}
    for name, t in state_dict.items():
        if name == "lm_head.weight" or not isinstance(t, torch.Tensor):  # extra state: the dropout counter
            continue
        t = t.detach()
        if TRANSPOSED.search(name):
            t = t.t()
        if name == WTE:
            t = t[:vocab_size]
        out[name] = t.contiguous().clone()
    return out


def from_hf(tensors, padded_vocab_size, vocab_size=None):
    """HF GPT-2 tensors (with or without the 'transformer.' prefix, as on the Hub) ->
    nanolm state dict with wte padded with zero rows and lm_head tied. With vocab_size, wte
    must have exactly that many rows."""
    out = {}
    for name, t in tensors.items():
        if HF_BUFFERS.search(name) or name == "lm_head.weight":
            continue
        if not name.startswith("transformer."):
            name = "transformer." + name
        if TRANSPOSED.search(name):
            t = t.t()
        out[name] = t.contiguous()
    wte = out[WTE]
    if vocab_size is not None and wte.shape[0] != vocab_size:
        raise ValueError(f"{WTE}: weights {tuple(wte.shape)}, config {(vocab_size, wte.shape[1])}")
    if wte.shape[0] > padded_vocab_size:
        raise ValueError(f"{WTE} has {wte.shape[0]} rows, more than padded_vocab_size "
                         f"{padded_vocab_size}")
    pad = wte.new_zeros(padded_vocab_size - wte.shape[0], wte.shape[1])
    out[WTE] = torch.cat([wte, pad])
    out["lm_head.weight"] = out[WTE]
    return out


def hf_config(state_dict, n_head, vocab_size):
    """A GPT2Config dict so `GPT2LMHeadModel.from_pretrained(dir)` can load the export."""
    n_layer = 1 + max(int(k.split(".")[2]) for k in state_dict if k.startswith("transformer.h."))
    n_positions, n_embd = state_dict["transformer.wpe.weight"].shape
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": vocab_size, "n_positions": n_positions, "n_ctx": n_positions,
            "n_embd": n_embd, "n_layer": n_layer, "n_head": n_head,
            "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new",
            "tie_word_embeddings": True, "bos_token_id": 50256, "eos_token_id": 50256}


def export(state_dict, out_dir, n_head, vocab_size=50257):
    """Write out_dir/model.safetensors and out_dir/config.json."""
    st = _safetensors()
    os.makedirs(out_dir, exist_ok=True)
    st.save_file(to_hf(state_dict, vocab_size), os.path.join(out_dir, "model.safetensors"),
                 metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config(state_dict, n_head, vocab_size), f, indent=2)


def load(path, padded_vocab_size, vocab_size=None):
    """A nanolm state dict from a model.safetensors file or a directory holding one."""
    if os.path.isdir(path):
        path = os.path.join(path, "model.safetensors")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    return from_hf(_safetensors().load_file(path), padded_vocab_size, vocab_size)


def check_shapes(state, mcfg):
    """Every tensor of an imported state dict against the model its config.json describes (built
    on the meta device: shapes only, no memory). Raises ValueError listing each difference."""
    if mcfg.n_embd % mcfg.n_head:
        raise ValueError(f"config.json: n_embd={mcfg.n_embd} is not divisible by n_head={mcfg.n_head}")
    with torch.device("meta"):
        model = GPT(mcfg, backends.resolve("torch", torch.device("cpu")))
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    diff = [f"{k}: in the config's model, missing from the weights" for k in want if k not in got]
    diff += [f"{k}: in the weights, not in the config's model" for k in got if k not in want]
    diff += [f"{k}: weights {got[k]}, config {want[k]}" for k in want if k in got and got[k] != want[k]]
    if diff:
        raise ValueError("config.json does not describe these weights:\n  " + "\n  ".join(diff))


TOKENIZER_VOCAB = {"byte": ByteTokenizer.vocab_size, "gpt2": GPT2Tokenizer.vocab_size}


def import_checkpoint(src, run_dir, tokenizer="gpt2", vocab_multiple=128):
    """An HF GPT-2 export (model.safetensors + config.json) as a nanolm checkpoint at step 0.
    vocab_multiple must be the padding the training config uses (presets: 128; quickstart: 64)."""
    if not os.path.exists(src):
        raise ValueError(f"{src}: no such file or directory")
    src_dir = src if os.path.isdir(src) else os.path.dirname(src)
    config_path = os.path.join(src_dir, "config.json")
    if not os.path.exists(config_path):
        raise ValueError(f"{config_path} not found: the HF config gives n_head, which the "
                                f"weights alone do not")
    with open(config_path) as f:
        hc = json.load(f)
    mcfg = ModelConfig(n_layer=hc["n_layer"], n_head=hc["n_head"], n_embd=hc["n_embd"],
                       block_size=hc["n_positions"], vocab_size=hc["vocab_size"],
                       vocab_multiple=vocab_multiple)
    if TOKENIZER_VOCAB[tokenizer] > mcfg.vocab_size:
        raise ValueError(f"tokenizer {tokenizer!r} has {TOKENIZER_VOCAB[tokenizer]} tokens but the model's "
                         f"embedding only {mcfg.vocab_size} rows: pass the tokenizer it was trained "
                         f"with (--tokenizer byte for a byte-level model)")
    state = load(src, mcfg.padded_vocab, mcfg.vocab_size)
    check_shapes(state, mcfg)
    config = {"model": dataclasses.asdict(mcfg), "tokenizer": tokenizer}
    return checkpoint.save(run_dir, 0, state, {}, config, {}, keep=None)


def export_checkpoint(ckpt_path, out_dir):
    ckpt = checkpoint.load(ckpt_path)
    model = ckpt["config"]["model"]
    export(ckpt["model"], out_dir, model["n_head"], model["vocab_size"])


def main(argv=None):
    cli(run_cli, sys.argv[1:] if argv is None else argv)


def run_cli(argv):
    p = argparse.ArgumentParser(prog="python -m nanolm.hf")
    sub = p.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export", help="a nanolm checkpoint -> HF model.safetensors + config.json")
    ex.add_argument("ckpt", help="checkpoint file, or a run dir (its latest)")
    ex.add_argument("out", help="output directory")
    im = sub.add_parser("import", help="HF GPT-2 safetensors -> a nanolm checkpoint (weights only)")
    im.add_argument("src", help="directory with model.safetensors and config.json")
    im.add_argument("out", help="run dir to write ckpt_00000000.pt into")
    im.add_argument("--tokenizer", default="gpt2", choices=("gpt2", "byte"))
    im.add_argument("--vocab_multiple", type=int, default=128,
                    help="vocab padding of the config that will load it (presets 128, quickstart 64)")
    args = p.parse_args(argv)
    if args.cmd == "export":
        export_checkpoint(args.ckpt, args.out)
        print(f"wrote {os.path.join(args.out, 'model.safetensors')} and config.json")
    else:
        path = import_checkpoint(args.src, args.out, args.tokenizer, args.vocab_multiple)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()

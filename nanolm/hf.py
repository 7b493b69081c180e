"""Move weights between nanolm and Hugging Face GPT-2 (safetensors).

nanolm's parameter names are Hugging Face's (`transformer.h.0.attn.c_attn.weight`, ...) with
two differences this module undoes:
  * HF's Conv1D stores a weight as (in, out); nanolm's nn.Linear stores (out, in). The four
    projections c_attn, attn.c_proj, c_fc, mlp.c_proj are transposed both ways.
  * nanolm pads the vocabulary (50257 -> 50304, a multiple of 64, for fast matmuls); export
    drops the padding rows of wte, import appends zero rows.
lm_head is tied to wte: export writes no lm_head (HF re-ties it), import returns
`lm_head.weight` as the same tensor as `transformer.wte.weight`.
What HF's GPT-2 config has no field for, export records under the key "nanolm" of config.json
(HF keeps unknown keys): the tokenizer and the vocab padding, which import then takes, so a
nanolm model comes back as it went out with no flags. A file from elsewhere (GPT-2 from the
Hub) lacks the key: import assumes the gpt2 tokenizer and the presets' padding of 128.
bos/eos in config.json are the tokenizer's end-of-text token (byte: 0; gpt2: 50256).
Needs the optional extra: pip install 'nanolm[hf]'.

    python -m nanolm.hf export RUN_DIR_OR_CKPT OUT_DIR [--overwrite]  # -> OUT_DIR/model.safetensors, config.json
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
from nanolm.data import ByteTokenizer, GPT2Tokenizer, read_json

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
    if WTE not in out:
        raise ValueError(f"the weights hold no {WTE} (nor wte.weight): not a GPT-2 model")
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


TOKENIZERS = {"byte": ByteTokenizer, "gpt2": GPT2Tokenizer}
HUB_DEFAULTS = {"tokenizer": "gpt2", "vocab_multiple": 128}  # GPT-2 as published, the presets' padding


def hf_config(state_dict, n_head, vocab_size, tokenizer, vocab_multiple):
    """A GPT2Config dict so `GPT2LMHeadModel.from_pretrained(dir)` can load the export, with
    what nanolm's import needs besides ("nanolm": tokenizer and vocab padding)."""
    eot = TOKENIZERS[tokenizer].eot
    n_layer = 1 + max(int(k.split(".")[2]) for k in state_dict if k.startswith("transformer.h."))
    n_positions, n_embd = state_dict["transformer.wpe.weight"].shape
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": vocab_size, "n_positions": n_positions, "n_ctx": n_positions,
            "n_embd": n_embd, "n_layer": n_layer, "n_head": n_head,
            "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new",
            "tie_word_embeddings": True, "bos_token_id": eot, "eos_token_id": eot,
            "nanolm": {"tokenizer": tokenizer, "vocab_multiple": vocab_multiple}}


def export(state_dict, out_dir, n_head, vocab_size, tokenizer, vocab_multiple, overwrite=False):
    """Write out_dir/model.safetensors and out_dir/config.json, readable by everyone (0644 under
    the usual umask, as any file a user writes). A non-empty out_dir is refused unless overwrite:
    `export RUN RUN` would otherwise replace the run's own config.json."""
    st = _safetensors()
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise ValueError(f"{out_dir} is not empty: export writes model.safetensors and config.json "
                         f"there, replacing any files of those names; pass --overwrite to do so, or "
                         f"choose another folder")
    os.makedirs(out_dir, exist_ok=True)
    weights = os.path.join(out_dir, "model.safetensors")
    st.save_file(to_hf(state_dict, vocab_size), weights, metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(weights, 0o666 & ~umask)  # safetensors creates its file 0600
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config(state_dict, n_head, vocab_size, tokenizer, vocab_multiple), f, indent=2)


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
    diff = checkpoint.weight_diff(state, mcfg)
    if diff:
        raise ValueError("config.json does not describe these weights:\n  " + "\n  ".join(diff))


TOKENIZER_VOCAB = {"byte": ByteTokenizer.vocab_size, "gpt2": GPT2Tokenizer.vocab_size}


def import_checkpoint(src, run_dir, tokenizer=None, vocab_multiple=None):
    """An HF GPT-2 export (model.safetensors + config.json) as a nanolm checkpoint at step 0.
    tokenizer and vocab_multiple (the padding the training config uses: presets 128, quickstart
    64) default to what a nanolm export recorded in config.json, else to HUB_DEFAULTS."""
    if not os.path.exists(src):
        raise ValueError(f"{src}: no such file or directory")
    src_dir = src if os.path.isdir(src) else os.path.dirname(src)
    config_path = os.path.join(src_dir, "config.json")
    if not os.path.exists(config_path):
        raise ValueError(f"{config_path} not found: the HF config gives n_head, which the "
                                f"weights alone do not")
    hc = read_json(config_path)
    missing = [k for k in ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size") if k not in hc]
    if missing:
        raise ValueError(f"{config_path} has no {', '.join(missing)}: not a GPT-2 config")
    recorded = {**HUB_DEFAULTS, **hc.get("nanolm", {})}
    tokenizer = tokenizer or recorded["tokenizer"]
    vocab_multiple = vocab_multiple if vocab_multiple is not None else recorded["vocab_multiple"]
    if tokenizer not in TOKENIZER_VOCAB:
        raise ValueError(f"unknown tokenizer {tokenizer!r}; valid: {', '.join(TOKENIZER_VOCAB)}")
    if not isinstance(vocab_multiple, int) or vocab_multiple < 1:
        raise ValueError(f"vocab_multiple must be a whole number >= 1, got {vocab_multiple!r}")
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


def export_checkpoint(ckpt_path, out_dir, overwrite=False):
    ckpt = checkpoint.load_gpt(ckpt_path)
    model = ckpt["config"]["model"]
    export(ckpt["model"], out_dir, model["n_head"], model["vocab_size"], ckpt["config"]["tokenizer"],
           model["vocab_multiple"], overwrite)


def main(argv=None):
    cli(run_cli, sys.argv[1:] if argv is None else argv)


def run_cli(argv):
    p = argparse.ArgumentParser(prog="python -m nanolm.hf")
    sub = p.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export", help="a nanolm checkpoint -> HF model.safetensors + config.json")
    ex.add_argument("ckpt", help="checkpoint file, or a run dir (its latest)")
    ex.add_argument("out", help="output directory")
    ex.add_argument("--overwrite", action="store_true",
                    help="replace model.safetensors and config.json in a non-empty output directory")
    im = sub.add_parser("import", help="HF GPT-2 safetensors -> a nanolm checkpoint (weights only)")
    im.add_argument("src", help="directory with model.safetensors and config.json")
    im.add_argument("out", help="run dir to write ckpt_00000000.pt into")
    im.add_argument("--tokenizer", choices=("gpt2", "byte"),
                    help="default: what a nanolm export recorded in config.json, else gpt2")
    im.add_argument("--vocab_multiple", type=int,
                    help="vocab padding of the config that will load it (presets 128, quickstart 64); "
                         "default: what a nanolm export recorded, else 128")
    args = p.parse_args(argv)
    if args.cmd == "export":
        export_checkpoint(args.ckpt, args.out, args.overwrite)
        print(f"wrote {os.path.join(args.out, 'model.safetensors')} and config.json")
    else:
        path = import_checkpoint(args.src, args.out, args.tokenizer, args.vocab_multiple)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""Move weights between nanolm and Hugging Face GPT-2 or Llama (safetensors + config.json).

One section per architecture below; config.json's model_type picks it on import, the model's
config (ModelConfig's block choices) on export.

GPT-2 (GPT2LMHeadModel):

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
Llama (LlamaForCausalLM: Llama 2/3, SmolLM2 and the like): see the Llama section.
Needs the optional extra: pip install 'nanolm[hf]'.

    python -m nanolm.hf export RUN_DIR_OR_CKPT OUT_DIR [--overwrite]  # -> OUT_DIR/model.safetensors, config.json
    python -m nanolm.hf import HF_DIR RUN_DIR             # -> RUN_DIR/ckpt_00000000.pt (weights only)
        [--tokenizer byte|gpt2|hf:DIR] [--vocab_multiple N] [--block_size N (Llama)]
An imported checkpoint samples with `python -m nanolm.sample --ckpt RUN_DIR` and starts a
training run with `python -m nanolm.train --init_from=RUN_DIR ...` (e.g. fine-tuning GPT-2).
"""
import argparse
import dataclasses
import json
import os
import re
import shutil
import sys

import torch

from nanolm import checkpoint
from nanolm.config import ModelConfig, cli
from nanolm.data import ByteTokenizer, GPT2Tokenizer, get_tokenizer, read_json

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


# ----------------------------------------------------------------------------- GPT-2

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


HUB_DEFAULTS = {"tokenizer": "gpt2", "vocab_multiple": 128}  # GPT-2 as published, the presets' padding


def hf_config(state_dict, n_head, vocab_size, tokenizer, vocab_multiple):
    """A GPT2Config dict so `GPT2LMHeadModel.from_pretrained(dir)` can load the export, with
    what nanolm's import needs besides ("nanolm": tokenizer and vocab padding)."""
    eot = tokenizer_info(tokenizer)[2]
    n_layer = 1 + max(int(k.split(".")[2]) for k in state_dict if k.startswith("transformer.h."))
    n_positions, n_embd = state_dict["transformer.wpe.weight"].shape
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": vocab_size, "n_positions": n_positions, "n_ctx": n_positions,
            "n_embd": n_embd, "n_layer": n_layer, "n_head": n_head,
            "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new",
            "tie_word_embeddings": True, "bos_token_id": eot, "eos_token_id": eot,
            "nanolm": {"tokenizer": tokenizer, "vocab_multiple": vocab_multiple}}


def gpt2_model_config(hc, config_path, vocab_multiple):
    missing = [k for k in ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size") if k not in hc]
    if missing:
        raise ValueError(f"{config_path} has no {', '.join(missing)}: not a GPT-2 config")
    return ModelConfig(n_layer=hc["n_layer"], n_head=hc["n_head"], n_embd=hc["n_embd"],  # validated: ConfigError
                       block_size=hc["n_positions"], vocab_size=hc["vocab_size"], vocab_multiple=vocab_multiple)


# ----------------------------------------------------------------------------- Llama
# LlamaForCausalLM onto nanolm's modern block (rmsnorm, rope, swiglu, no biases, n_kv_head):
#   model.embed_tokens                  -> transformer.wte (vocab padded with zero rows, as GPT-2)
#   layers.i.self_attn.{q,k,v}_proj     -> h.i.attn.c_attn, rows [q heads | k heads | v heads]
#   layers.i.self_attn.o_proj           -> h.i.attn.c_proj
#   layers.i.mlp.{gate,up}_proj         -> h.i.mlp.c_fc, rows [gate | up] (silu(gate) * up)
#   layers.i.mlp.down_proj              -> h.i.mlp.c_proj
#   layers.i.{input,post_attention}_layernorm -> h.i.ln_1, h.i.ln_2;  model.norm -> transformer.ln_f
#   lm_head                             -> lm_head (absent from the file when tied: HF re-ties it)
# Both store nn.Linear's (out, in): nothing is transposed. And no q/k permutation: HF's Llama
# checkpoints are stored for the rotate-half RoPE its modeling code applies (pairs (i, i + D/2);
# the interleaved-pair permutation lives in HF's conversion from Meta's files), which is the
# convention nanolm's RoPE uses, so q_proj/k_proj rows are taken as they are.
LLAMA_LAYER = {
    "attn.c_attn.weight": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attn.c_proj.weight": ("self_attn.o_proj",),
    "mlp.c_fc.weight": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.c_proj.weight": ("mlp.down_proj",),
    "ln_1.weight": ("input_layernorm",),
    "ln_2.weight": ("post_attention_layernorm",),
}
LLAMA_TOP = {WTE: "model.embed_tokens.weight", "transformer.ln_f.weight": "model.norm.weight",
             "lm_head.weight": "lm_head.weight"}
# the rotary inverse frequencies older HF Llama files carry; nanolm computes them from rope_theta
LLAMA_BUFFERS = re.compile(r"\.rotary_emb\.inv_freq$")
LLAMA_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "vocab_size", "max_position_embeddings")
# the block choices that make a nanolm model a Llama (ModelConfig fields)
LLAMA_BLOCK = dict(norm="rmsnorm", norm_weight=True, pos="rope", mlp="swiglu", bias=False, qk_norm=False,
                   logit_softcap=0.0)
GPT2_BLOCK = dict(norm="layernorm", norm_weight=True, pos="learned", mlp="gelu", bias=True, qk_norm=False,
                  tie_embeddings=True, logit_softcap=0.0)


def llama_model_config(hc, config_path, vocab_multiple):
    """The ModelConfig of a LlamaConfig dict (transformers 4's top-level rope_theta or 5's
    rope_parameters); what nanolm's block cannot compute is refused, all of it in one error."""
    missing = [k for k in LLAMA_REQUIRED if k not in hc]
    if missing:
        raise ValueError(f"{config_path} has no {', '.join(missing)}: not a Llama config")
    C, H = hc["hidden_size"], hc["num_attention_heads"]
    n_kv_head = hc.get("num_key_value_heads") or H  # absent in Llama 1/2-7B configs: multi-head
    rope = hc.get("rope_parameters") or {}
    # transformers 5 names a scaling in rope_parameters, 4 (most Hub files) in rope_scaling
    scaled = {d.get("rope_type", d.get("type")) for d in (rope, hc.get("rope_scaling") or {})} - {None, "default"}
    problems = []
    if C % H:
        problems.append(f"hidden_size={C} is not divisible by num_attention_heads={H}")
    elif hc.get("head_dim", C // H) != C // H:
        problems.append(f"head_dim={hc['head_dim']} differs from hidden_size/num_attention_heads={C // H}")
    if H % n_kv_head:
        problems.append(f"num_key_value_heads={n_kv_head} does not divide num_attention_heads={H}")
    if hc.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hc['hidden_act']!r}: nanolm's SwiGLU is silu(gate) * up")
    if hc.get("attention_bias") or hc.get("mlp_bias"):
        problems.append("attention_bias/mlp_bias: nanolm's Llama block has no biases")
    if scaled:
        problems.append(f"rope scaling {', '.join(map(repr, sorted(scaled)))}: nanolm's RoPE is unscaled")
    if problems:
        raise ValueError(f"{config_path}: " + "; ".join(problems))
    return ModelConfig(n_layer=hc["num_hidden_layers"], n_head=H, n_embd=C,
                       block_size=hc["max_position_embeddings"], vocab_size=hc["vocab_size"],
                       vocab_multiple=vocab_multiple, n_kv_head=n_kv_head,
                       rope_theta=float(rope.get("rope_theta", hc.get("rope_theta", 10000.0))),
                       norm_eps=hc.get("rms_norm_eps", 1e-6), mlp_hidden=hc["intermediate_size"],
                       tie_embeddings=hc.get("tie_word_embeddings", True), **LLAMA_BLOCK)


def llama_shapes(mcfg):
    """{HF tensor name: shape} of the LlamaForCausalLM that mcfg describes (vocab unpadded)."""
    C, D, F = mcfg.n_embd, mcfg.head_size, mcfg.hidden
    layer = {"self_attn.q_proj": (mcfg.n_head * D, C), "self_attn.k_proj": (mcfg.kv_heads * D, C),
             "self_attn.v_proj": (mcfg.kv_heads * D, C), "self_attn.o_proj": (C, mcfg.n_head * D),
             "mlp.gate_proj": (F, C), "mlp.up_proj": (F, C), "mlp.down_proj": (C, F),
             "input_layernorm": (C,), "post_attention_layernorm": (C,)}
    shapes = {f"model.layers.{i}.{name}.weight": shape for i in range(mcfg.n_layer) for name, shape in layer.items()}
    shapes.update({"model.embed_tokens.weight": (mcfg.vocab_size, C), "model.norm.weight": (C,)})
    if not mcfg.tie_embeddings:
        shapes["lm_head.weight"] = (mcfg.vocab_size, C)
    return shapes


def from_llama(tensors, mcfg):
    """HF LlamaForCausalLM tensors -> nanolm state dict (see the map above), after checking
    every tensor's name and shape against mcfg: ValueError listing each difference."""
    tensors = {k: v for k, v in tensors.items() if not LLAMA_BUFFERS.search(k)}
    if mcfg.tie_embeddings:  # some files carry the tied head too; HF ignores it, as here
        tensors.pop("lm_head.weight", None)
    want = llama_shapes(mcfg)
    diff = [f"{k}: in config.json's model, missing from the weights" for k in want if k not in tensors]
    diff += [f"{k}: in the weights, not in config.json's model" for k in tensors if k not in want]
    diff += [f"{k}: weights {tuple(tensors[k].shape)}, config {want[k]}" for k in want
             if k in tensors and tuple(tensors[k].shape) != want[k]]
    if diff:
        raise ValueError("config.json does not describe these weights:\n  " + "\n  ".join(diff))
    out = {}
    for i in range(mcfg.n_layer):
        for name, parts in LLAMA_LAYER.items():
            out[f"transformer.h.{i}.{name}"] = torch.cat([tensors[f"model.layers.{i}.{p}.weight"] for p in parts])
    for name, hf_name in LLAMA_TOP.items():
        if hf_name in tensors:
            out[name] = tensors[hf_name]
    for name in (WTE, "lm_head.weight"):  # vocab padding: zero rows, never predicted
        if name in out:
            t = out[name]
            out[name] = torch.cat([t, t.new_zeros(mcfg.padded_vocab - t.shape[0], t.shape[1])])
    # fp32, as nanolm's parameters (Hub files are often bf16: SmolLM2's are); autocast runs bf16 math
    out = {k: v.float().contiguous() for k, v in out.items()}
    if mcfg.tie_embeddings:
        out["lm_head.weight"] = out[WTE]
    return out


def to_llama(state_dict, mcfg):
    """nanolm state dict -> HF LlamaForCausalLM tensors (padding rows dropped; no lm_head when tied)."""
    D = mcfg.head_size
    rows = {"attn.c_attn.weight": (mcfg.n_head * D, mcfg.kv_heads * D, mcfg.kv_heads * D),
            "mlp.c_fc.weight": (mcfg.hidden, mcfg.hidden)}
    lm_head = state_dict["lm_head.weight"]
    if mcfg.tie_embeddings and not torch.equal(lm_head, state_dict[WTE]):
        raise ValueError("lm_head.weight differs from transformer.wte.weight in a model whose config "
                         "ties them (tie_embeddings=True)")
    out = {}
    for i in range(mcfg.n_layer):
        for name, parts in LLAMA_LAYER.items():
            t = state_dict[f"transformer.h.{i}.{name}"].detach()
            for part, piece in zip(parts, t.split(rows.get(name, (t.shape[0],)))):
                out[f"model.layers.{i}.{part}.weight"] = piece
    for name, hf_name in LLAMA_TOP.items():
        if name != "lm_head.weight" or not mcfg.tie_embeddings:
            t = state_dict[name].detach()
            out[hf_name] = t[:mcfg.vocab_size] if name != "transformer.ln_f.weight" else t
    return {k: v.contiguous().clone() for k, v in out.items()}


def llama_hf_config(mcfg, tokenizer):
    """A LlamaConfig dict that `LlamaForCausalLM.from_pretrained(dir)` loads (rope_theta at the
    top level, which transformers 4 reads and 5 converts), with nanolm's tokenizer and padding."""
    eot = tokenizer_info(tokenizer)[2]
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": mcfg.vocab_size, "hidden_size": mcfg.n_embd, "intermediate_size": mcfg.hidden,
            "num_hidden_layers": mcfg.n_layer, "num_attention_heads": mcfg.n_head,
            "num_key_value_heads": mcfg.kv_heads, "head_dim": mcfg.head_size,
            "hidden_act": "silu", "max_position_embeddings": mcfg.block_size, "rms_norm_eps": mcfg.norm_eps,
            "rope_theta": mcfg.rope_theta, "rope_scaling": None, "attention_bias": False, "mlp_bias": False,
            "tie_word_embeddings": mcfg.tie_embeddings, "bos_token_id": eot, "eos_token_id": eot,
            "torch_dtype": "float32",
            "nanolm": {"tokenizer": tokenizer, "vocab_multiple": mcfg.vocab_multiple}}


def architecture(mcfg):
    """'llama' or 'gpt2': which HF architecture a nanolm model is; ValueError naming the
    fields that make it neither (a nanochat-style block: QK-norm, ReLU², softcap, ...)."""
    diffs = {}
    for name, block in (("llama", LLAMA_BLOCK), ("gpt2", GPT2_BLOCK)):
        diffs[name] = [f"{k}={getattr(mcfg, k)!r}" for k, v in block.items() if getattr(mcfg, k) != v]
        if name == "gpt2" and mcfg.kv_heads != mcfg.n_head:
            diffs[name].append(f"n_kv_head={mcfg.n_kv_head}")
        if not diffs[name]:
            return name
    raise ValueError(f"this model is neither a Llama ({', '.join(diffs['llama'])} differ) nor a GPT-2 "
                     f"({', '.join(diffs['gpt2'])} differ): HF export writes only those two")


# ----------------------------------------------------------------------------- both

def tokenizer_info(name):
    """(name, vocab size, end-of-text id) of a tokenizer; byte and gpt2 without loading
    anything (gpt2's BPE file may be absent where weights are converted), hf:DIR read, its
    name made absolute."""
    if name in ("byte", "gpt2"):
        cls = ByteTokenizer if name == "byte" else GPT2Tokenizer
        return name, cls.vocab_size, cls.eot
    tok = get_tokenizer(name)  # hf:DIR, or one clear error naming the valid ones
    return tok.name, tok.vocab_size, tok.eot


def write_export(out_dir, tensors, config, overwrite, tokenizer):
    """Write out_dir/model.safetensors and out_dir/config.json, readable by everyone (0644 under
    the usual umask, as any file a user writes), and for an hf:DIR tokenizer a copy of its
    files, so the folder is a whole HF model. A non-empty out_dir is refused unless overwrite:
    `export RUN RUN` would otherwise replace the run's own config.json."""
    st = _safetensors()
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise ValueError(f"{out_dir} is not empty: export writes model.safetensors and config.json "
                         f"there, replacing any files of those names; pass --overwrite to do so, or "
                         f"choose another folder")
    os.makedirs(out_dir, exist_ok=True)
    weights = os.path.join(out_dir, "model.safetensors")
    st.save_file(tensors, weights, metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(weights, 0o666 & ~umask)  # safetensors creates its file 0600
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    if tokenizer.startswith("hf:"):
        for name in ("tokenizer.json", "tokenizer_config.json"):
            src = os.path.join(tokenizer[3:], name)
            if os.path.isfile(src) and not os.path.samefile(os.path.dirname(src), out_dir):
                shutil.copyfile(src, os.path.join(out_dir, name))


def export(state_dict, out_dir, n_head, vocab_size, tokenizer, vocab_multiple, overwrite=False):
    """A GPT-2 model as HF's GPT2LMHeadModel in out_dir (see write_export)."""
    write_export(out_dir, to_hf(state_dict, vocab_size),
                 hf_config(state_dict, n_head, vocab_size, tokenizer, vocab_multiple), overwrite, tokenizer)


def export_llama(state_dict, out_dir, mcfg, tokenizer, overwrite=False):
    """A Llama-block model as HF's LlamaForCausalLM in out_dir (see write_export)."""
    write_export(out_dir, to_llama(state_dict, mcfg), llama_hf_config(mcfg, tokenizer), overwrite, tokenizer)


def read_tensors(path):
    """The tensors of a model.safetensors file or of a directory holding one, or holding the
    shards that model.safetensors.index.json lists (save_pretrained splits large models so)."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isdir(path) and os.path.isfile(index):
        shards = sorted(set(read_json(index).get("weight_map", {}).values()))
        if not shards:
            raise ValueError(f"{index} has no weight_map: not a safetensors index")
        return {k: v for shard in shards for k, v in read_tensors(os.path.join(path, shard)).items()}
    if os.path.isdir(path):
        path = os.path.join(path, "model.safetensors")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    return _safetensors().load_file(path)


def load(path, padded_vocab_size, vocab_size=None):
    """A nanolm state dict from a GPT-2 model.safetensors file or a directory holding one."""
    return from_hf(read_tensors(path), padded_vocab_size, vocab_size)


def check_shapes(state, mcfg):
    """Every tensor of an imported state dict against the model its config.json describes (built
    on the meta device: shapes only, no memory). Raises ValueError listing each difference."""
    diff = checkpoint.weight_diff(state, mcfg)
    if diff:
        raise ValueError("config.json does not describe these weights:\n  " + "\n  ".join(diff))


def default_tokenizer(model_type, src_dir, recorded):
    """The tokenizer an import assumes without --tokenizer: for Llama the tokenizer.json beside
    the weights (a Hub folder has one; a nanolm export copies its hf:DIR there), then what a
    nanolm export recorded; for GPT-2 what was recorded, else gpt2."""
    if model_type == "llama" and os.path.isfile(os.path.join(src_dir, "tokenizer.json")):
        return "hf:" + src_dir
    if model_type == "llama" and "tokenizer" not in recorded:
        raise ValueError(f"{src_dir} holds no tokenizer.json and its config.json records no tokenizer: "
                         f"pass --tokenizer (byte, gpt2 or hf:DIR)")
    return {**HUB_DEFAULTS, **recorded}["tokenizer"]


def import_checkpoint(src, run_dir, tokenizer=None, vocab_multiple=None, block_size=None):
    """An HF GPT-2 or Llama export (model.safetensors + config.json) as a nanolm checkpoint at
    step 0. tokenizer (see default_tokenizer) and vocab_multiple (the padding the training config
    uses: presets 128, quickstart 64) default to what a nanolm export recorded in config.json,
    else to HUB_DEFAULTS. block_size (Llama only) replaces max_position_embeddings as the context
    the checkpoint's config names, so that a preset's shorter one loads it: RoPE has no table of
    positions, so the weights are the same for any length."""
    if not os.path.exists(src):
        raise ValueError(f"{src}: no such file or directory")
    src_dir = src if os.path.isdir(src) else os.path.dirname(src)
    config_path = os.path.join(src_dir, "config.json")
    if not os.path.exists(config_path):
        raise ValueError(f"{config_path} not found: the HF config gives n_head, which the "
                                f"weights alone do not")
    hc = read_json(config_path)
    model_type = hc.get("model_type", "gpt2")
    if model_type not in ("gpt2", "llama"):
        raise ValueError(f"{config_path}: model_type {model_type!r}; nanolm.hf imports gpt2 and llama")
    recorded = hc.get("nanolm", {})
    tokenizer, tokenizer_vocab, _ = tokenizer_info(tokenizer or default_tokenizer(model_type, src_dir, recorded))
    vocab_multiple = vocab_multiple if vocab_multiple is not None else {**HUB_DEFAULTS, **recorded}["vocab_multiple"]
    if not isinstance(vocab_multiple, int) or vocab_multiple < 1:
        raise ValueError(f"vocab_multiple must be a whole number >= 1, got {vocab_multiple!r}")
    model_config = llama_model_config if model_type == "llama" else gpt2_model_config
    mcfg = model_config(hc, config_path, vocab_multiple)
    if block_size is not None:
        if model_type != "llama":
            raise ValueError("--block_size is for Llama models: GPT-2's learned position table fixes its "
                             "block_size (n_positions)")
        mcfg = dataclasses.replace(mcfg, block_size=block_size)  # validated: ConfigError if < 1
    if tokenizer_vocab > mcfg.vocab_size:
        raise ValueError(f"tokenizer {tokenizer!r} has {tokenizer_vocab} tokens but the model's "
                         f"embedding only {mcfg.vocab_size} rows: pass the tokenizer it was trained "
                         f"with (--tokenizer byte for a byte-level model)")
    if model_type == "llama":
        state = from_llama(read_tensors(src), mcfg)
    else:
        state = load(src, mcfg.padded_vocab, mcfg.vocab_size)
    check_shapes(state, mcfg)
    config = {"model": dataclasses.asdict(mcfg), "tokenizer": tokenizer}
    return checkpoint.save(run_dir, 0, state, {}, config, {}, keep=None)


def export_checkpoint(ckpt_path, out_dir, overwrite=False):
    ckpt = checkpoint.load_gpt(ckpt_path)
    mcfg, tokenizer = ModelConfig(**ckpt["config"]["model"]), ckpt["config"]["tokenizer"]
    if architecture(mcfg) == "llama":
        export_llama(ckpt["model"], out_dir, mcfg, tokenizer, overwrite)
    else:
        export(ckpt["model"], out_dir, mcfg.n_head, mcfg.vocab_size, tokenizer, mcfg.vocab_multiple, overwrite)


def main(argv=None):
    cli(run_cli, sys.argv[1:] if argv is None else argv)


def run_cli(argv):
    p = argparse.ArgumentParser(prog="python -m nanolm.hf")
    sub = p.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export", help="a nanolm checkpoint -> HF model.safetensors + config.json "
                                       "(GPT-2 or Llama, as the model's config says)")
    ex.add_argument("ckpt", help="checkpoint file, or a run dir (its latest)")
    ex.add_argument("out", help="output directory")
    ex.add_argument("--overwrite", action="store_true",
                    help="replace model.safetensors and config.json in a non-empty output directory")
    im = sub.add_parser("import", help="HF GPT-2 or Llama safetensors -> a nanolm checkpoint (weights only)")
    im.add_argument("src", help="directory with model.safetensors and config.json")
    im.add_argument("out", help="run dir to write ckpt_00000000.pt into")
    im.add_argument("--tokenizer", help="byte, gpt2 or hf:DIR; default: for Llama the tokenizer.json "
                                        "beside the weights, then what a nanolm export recorded in "
                                        "config.json, else gpt2")
    im.add_argument("--vocab_multiple", type=int,
                    help="vocab padding of the config that will load it (presets 128, quickstart 64); "
                         "default: what a nanolm export recorded, else 128")
    im.add_argument("--block_size", type=int,
                    help="Llama only: the context the checkpoint's config names (that of the preset that "
                         "will load it, e.g. 2048 for smollm2-135m); default: max_position_embeddings")
    args = p.parse_args(argv)
    if args.cmd == "export":
        export_checkpoint(args.ckpt, args.out, args.overwrite)
        print(f"wrote {os.path.join(args.out, 'model.safetensors')} and config.json")
    else:
        path = import_checkpoint(args.src, args.out, args.tokenizer, args.vocab_multiple, args.block_size)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""Hugging Face LlamaForCausalLM in and out of nanolm (nanolm/hf.py's Llama section), checked
against transformers itself on random small models built here: nothing is downloaded."""
import json
import os
import sys

import pytest
import torch

from nanolm import checkpoint, hf
from nanolm.config import ModelConfig
from nanolm.model import GPT
from nanolm.ops import backends

pytest.importorskip("safetensors")
pytest.importorskip("transformers")


def import_llama():
    """transformers 5 imports the PyPI package `kernels` (one of its requirements) with its Llama;
    `python -m pytest` puts the repository root on sys.path, where the Triton folder kernels/
    would be found first (why nanolm installs it as nanolm.kernels: setup.py). So the import runs
    with the root off sys.path; nothing in nanolm imports a top-level `kernels`."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
    try:
        import transformers
        from transformers import LlamaConfig, LlamaForCausalLM  # noqa: F401  (the lazy import, here)
    finally:
        sys.path[:] = saved
    transformers.utils.logging.disable_progress_bar()  # save_pretrained's, in every test's output
    return transformers


transformers = import_llama()

VOCAB = 300  # not a multiple of 128: nanolm pads it to 384 rows
SHAPE = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)
TIES = pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])


def hf_llama(tie):
    """A random LlamaForCausalLM (GQA: 4 heads, 2 KV heads; θ 1e5), fp32, eval mode. Its norms
    start at ones: they are drawn at random too, so a mis-mapped norm weight shows. q and k are
    scaled up: at the init's scale (std 0.02) attention is near uniform, so positions, and with
    them a wrong RoPE, would hardly change the logits."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, rope_theta=1e5, tie_word_embeddings=tie, **SHAPE)
    model = transformers.LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(10)
    return model


def nanolm_llama(tie):
    """A random nanolm model of the same shape, built from nanolm's side (norms random, q and k
    scaled up, as hf_llama)."""
    torch.manual_seed(1)
    mcfg = ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=VOCAB, bias=False,
                       norm="rmsnorm", norm_eps=1e-5, pos="rope", rope_theta=1e5, n_kv_head=2, mlp="swiglu",
                       mlp_hidden=160, tie_embeddings=tie)
    model = GPT(mcfg, backends.resolve("torch", torch.device("cpu"))).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.uniform_(0.5, 1.5)
            if name.endswith("c_attn.weight"):
                p[:(mcfg.n_head + mcfg.kv_heads) * mcfg.head_size].mul_(10)  # the q and k rows
    return model


def all_logits(model, idx):
    """nanolm's logits at every position over the real vocabulary (its forward returns the last)."""
    return model.hidden(idx) @ model.lm_head.weight[:model.cfg.vocab_size].t()


def save_run(model, run_dir, tokenizer="byte"):
    """A nanolm checkpoint of model, as a training run or `nanolm.hf import` writes one."""
    config = {"model": {**vars(model.cfg)}, "tokenizer": tokenizer}
    return checkpoint.save(run_dir, 0, model.state_dict(), {}, config, {}, keep=None)


def load_run(run_dir, kernels="torch"):
    ckpt = checkpoint.load(run_dir)
    model = GPT(ModelConfig(**ckpt["config"]["model"]), backends.resolve(kernels, torch.device("cpu")))
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt


def tokens(T=40):
    return torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(2))


@TIES
@pytest.mark.parametrize("kernels", ["torch", "auto"])  # the specification, and the fused CPU kernels
def test_import_gives_transformers_logits_and_loss(tmp_path, tie, kernels):
    theirs = hf_llama(tie)
    theirs.save_pretrained(tmp_path / "hf")
    hf.main(["import", str(tmp_path / "hf"), str(tmp_path / "run"), "--tokenizer=byte"])
    ours, ckpt = load_run(tmp_path / "run", kernels)
    assert ckpt["config"]["model"]["vocab_size"] == VOCAB
    assert ours.transformer.wte.weight.shape[0] == 384 and ours.cfg.tie_embeddings == tie
    idx = tokens()
    with torch.no_grad():
        want = theirs(idx).logits
        assert (all_logits(ours, idx) - want).abs().max() <= 1e-4
        hf_loss = theirs(idx, labels=idx).loss  # HF shifts the labels itself
        assert torch.allclose(ours(idx[:, :-1], idx[:, 1:]), hf_loss, atol=1e-5, rtol=0)


def test_a_model_saved_in_shards_imports_whole(tmp_path):
    """Large models come as model-0000k-of-0000n.safetensors listed by an index."""
    hf_llama(False).save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) > 1
    hf.main(["import", str(tmp_path / "hf"), str(tmp_path / "run"), "--tokenizer=byte"])
    hf_llama(False).save_pretrained(tmp_path / "one")
    hf.main(["import", str(tmp_path / "one"), str(tmp_path / "run1"), "--tokenizer=byte"])
    sharded, whole = checkpoint.load(tmp_path / "run")["model"], checkpoint.load(tmp_path / "run1")["model"]
    assert sharded.keys() == whole.keys() and all(torch.equal(sharded[k], whole[k]) for k in whole)


def test_bf16_weights_import_as_fp32(tmp_path):
    theirs = hf_llama(True).to(torch.bfloat16)
    theirs.save_pretrained(tmp_path / "hf")
    hf.main(["import", str(tmp_path / "hf"), str(tmp_path / "run"), "--tokenizer=byte"])
    state = checkpoint.load(tmp_path / "run")["model"]
    assert all(t.dtype == torch.float32 for t in state.values() if isinstance(t, torch.Tensor))
    assert torch.equal(state["transformer.h.1.mlp.c_proj.weight"], theirs.model.layers[1].mlp.down_proj.weight.float())


def test_greedy_sampling_with_the_kv_cache_continues_as_transformers(tmp_path):
    """nanolm's KV cache (RoPE at each new position, GQA heads cached) against transformers'
    model, greedy, on an imported model. Its forward on the whole sequence, not its generate():
    that suppresses the config's EOS (id 2) under min_new_tokens, which nanolm has no notion of."""
    from nanolm.sample import generate
    theirs = hf_llama(False)
    theirs.save_pretrained(tmp_path / "hf")
    hf.main(["import", str(tmp_path / "hf"), str(tmp_path / "run"), "--tokenizer=byte"])
    ours, _ = load_run(tmp_path / "run")
    prompt = tokens(7)[:1]
    with torch.no_grad():
        got = generate(ours, prompt, 24, temperature=0)
        want = prompt
        for _ in range(24):
            want = torch.cat([want, theirs(want).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(got, want)


@TIES
def test_export_loads_in_transformers_and_agrees(tmp_path, tie):
    ours = nanolm_llama(tie)
    save_run(ours, tmp_path / "run")
    hf.main(["export", str(tmp_path / "run"), str(tmp_path / "hf")])
    theirs, info = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    theirs = theirs.float().eval()
    assert theirs.config.tie_word_embeddings == tie and theirs.config.num_key_value_heads == 2
    idx = tokens()
    with torch.no_grad():
        assert (theirs(idx).logits - all_logits(ours, idx)).abs().max() <= 1e-4


@TIES
def test_nanolm_to_hf_to_nanolm_is_exact(tmp_path, tie):
    ours = nanolm_llama(tie)
    save_run(ours, tmp_path / "run")
    hf.main(["export", str(tmp_path / "run"), str(tmp_path / "hf")])
    hf.main(["import", str(tmp_path / "hf"), str(tmp_path / "back")])  # byte, 128: recorded by export
    back, ckpt = load_run(tmp_path / "back")
    assert ckpt["config"]["model"] == vars(ours.cfg) and ckpt["config"]["tokenizer"] == "byte"
    for name, t in ours.state_dict().items():
        if name in (hf.WTE, "lm_head.weight"):  # the vocab padding comes back as zero rows
            assert torch.equal(back.state_dict()[name][:VOCAB], t[:VOCAB]), name
            assert torch.all(back.state_dict()[name][VOCAB:] == 0), name
        elif isinstance(t, torch.Tensor):
            assert torch.equal(back.state_dict()[name], t), name
    assert (back.lm_head.weight is back.transformer.wte.weight) == tie


def test_smollm2_shaped_config_round_trips(tmp_path):
    """The smollm2-135m preset (2 of its 30 layers, to stay quick) exports to the config.json of
    HuggingFaceTB/SmolLM2-135M, whose LlamaForCausalLM has exactly the exported tensors' names and
    shapes; a file with a longer max_position_embeddings (8192) imports with --block_size=2048 to
    the very config a run with the preset builds, so --init_from takes it."""
    from nanolm.config import model_config, parse_args
    preset = model_config(parse_args(["--preset=smollm2-135m", "--n_layer=2"]), 49152)
    with torch.device("meta"):
        shapes_only = GPT(preset, backends.resolve("torch", torch.device("cpu")))
    state = {k: torch.zeros(v.shape) for k, v in shapes_only.state_dict().items() if isinstance(v, torch.Tensor)}
    state["lm_head.weight"] = state[hf.WTE]
    checkpoint.save(tmp_path / "run", 0, state, {}, {"model": vars(preset), "tokenizer": "byte"}, {}, keep=None)
    hf.main(["export", str(tmp_path / "run"), str(tmp_path / "hf")])
    hc = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert {k: hc[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                               "rope_theta", "rms_norm_eps", "tie_word_embeddings", "vocab_size", "hidden_act")} == {
        "hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3,
        "rope_theta": 1e5, "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "vocab_size": 49152,
        "hidden_act": "silu"}
    with torch.device("meta"):
        theirs = transformers.LlamaForCausalLM(transformers.LlamaConfig.from_pretrained(tmp_path / "hf"))
    from safetensors import safe_open
    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as f:
        exported = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert exported == {k: tuple(v.shape) for k, v in theirs.state_dict().items() if k != "lm_head.weight"}
    edit_config(tmp_path / "hf", max_position_embeddings=8192, nanolm=DROP)  # from elsewhere
    hf.main(["import", str(tmp_path / "hf"), str(tmp_path / "back"), "--tokenizer=byte", "--block_size=2048"])
    assert checkpoint.load(tmp_path / "back")["config"]["model"] == vars(preset)


def test_block_size_is_refused_for_gpt2(tmp_path):
    from test_hf import tiny_model
    hf.export(tiny_model().state_dict(), tmp_path / "hf", n_head=2, vocab_size=300, tokenizer="byte",
              vocab_multiple=64)
    with pytest.raises(ValueError, match="learned position table fixes its block_size"):
        hf.import_checkpoint(str(tmp_path / "hf"), str(tmp_path / "run"), block_size=16)


def test_the_tokenizer_json_beside_the_weights_is_the_default_and_travels(tmp_path):
    from test_hf_tokenizer import SHAKESPEARE, train_bpe
    if SHAKESPEARE is None:
        pytest.skip("no shared tinyshakespeare.txt")
    hf_llama(True).save_pretrained(tmp_path / "hf")
    train_bpe(tmp_path / "hf")  # a 300-token tokenizer.json, as a Hub model folder holds
    hf.main(["import", str(tmp_path / "hf"), str(tmp_path / "run")])
    assert checkpoint.load(tmp_path / "run")["config"]["tokenizer"] == f"hf:{(tmp_path / 'hf').resolve()}"
    hf.main(["export", str(tmp_path / "run"), str(tmp_path / "out")])
    assert (tmp_path / "out" / "tokenizer.json").read_text() == (tmp_path / "hf" / "tokenizer.json").read_text()
    assert json.loads((tmp_path / "out" / "config.json").read_text())["eos_token_id"] == 0


DROP = object()  # a config.json key to delete


def test_an_imported_llama_fine_tunes_and_samples_with_its_tokenizer(tmp_path, monkeypatch):
    """The user path: a Hub-style folder (weights, config.json, tokenizer.json) -> import -> a
    run --init_from it with --tokenizer=hf:DIR and the block's flags: the weights arrive unchanged
    (lr=0) and the end-of-run sample is decoded by that tokenizer."""
    from nanolm.config import parse_args
    from nanolm.train import train
    from test_hf_tokenizer import SHAKESPEARE, train_bpe
    if SHAKESPEARE is None:
        pytest.skip("no shared tinyshakespeare.txt")
    monkeypatch.chdir(tmp_path)
    hf_llama(True).save_pretrained(tmp_path / "hub")
    train_bpe(tmp_path / "hub")
    hf.main(["import", "hub", "imported", "--vocab_multiple=64"])  # the quickstart preset's padding
    (tmp_path / "text.txt").write_text("\n".join(SHAKESPEARE.read_text().splitlines()[:400]))
    block = ["--preset=quickstart", "--n_layer=2", "--n_head=4", "--n_embd=64", "--block_size=64", "--bias=false",
             "--norm=rmsnorm", "--norm_eps=1e-5", "--pos=rope", "--rope_theta=1e5", "--n_kv_head=2", "--mlp=swiglu",
             "--mlp_hidden=160"]
    out = train(parse_args(block + ["--tokenizer=hf:hub", "--data=text.txt", "--init_from=imported", "--lr=0",
                                    "--min_lr=0", "--warmup=0", "--max_steps=1", "--batch_size=2", "--eval_iters=1",
                                    "--sample_tokens=4", "--sample_prompt=First", "--out_dir=run"]))
    imported = checkpoint.load("imported")["model"]
    assert all(torch.equal(t, imported[k]) for k, t in checkpoint.load("run")["model"].items())
    assert out["sample"].startswith("First")


def edit_config(folder, **changes):
    path = folder / "config.json"
    hc = {**json.loads(path.read_text()), **changes}
    path.write_text(json.dumps({k: v for k, v in hc.items() if v is not DROP}))


@pytest.mark.parametrize("changes, message", [
    ({"num_key_value_heads": 4}, r"k_proj.weight: weights \(32, 64\), config \(64, 64\)"),
    ({"intermediate_size": 128}, r"mlp.gate_proj.weight: weights \(160, 64\), config \(128, 64\)"),
    ({"num_hidden_layers": 3}, "model.layers.2.input_layernorm.weight: in config.json's model, missing"),
    ({"tie_word_embeddings": False}, "lm_head.weight: in config.json's model, missing from the weights"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope scaling 'llama3'"),  # transformers 4
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e5}}, "rope scaling 'yarn'"),  # transformers 5
    ({"attention_bias": True}, "no biases"),
    ({"head_dim": 32}, "head_dim=32 differs"),
    ({"num_key_value_heads": 3}, "num_key_value_heads=3 does not divide"),
    ({"hidden_size": DROP}, "has no hidden_size: not a Llama config"),
    ({"model_type": "qwen2"}, "model_type 'qwen2'; nanolm.hf imports gpt2 and llama"),
])
def test_config_and_weights_that_disagree_are_one_clear_error(tmp_path, changes, message):
    hf_llama(True).save_pretrained(tmp_path / "hf")
    edit_config(tmp_path / "hf", **changes)
    with pytest.raises(ValueError, match=message):
        hf.import_checkpoint(str(tmp_path / "hf"), str(tmp_path / "run"), "byte")
    assert not (tmp_path / "run").exists()


def test_import_without_a_tokenizer_asks_for_one(tmp_path):
    hf_llama(True).save_pretrained(tmp_path / "hf")
    with pytest.raises(ValueError, match="holds no tokenizer.json .* pass --tokenizer"):
        hf.import_checkpoint(str(tmp_path / "hf"), str(tmp_path / "run"))


def test_a_model_neither_llama_nor_gpt2_is_not_exported(tmp_path):
    model = nanolm_llama(True)
    config = {"model": {**vars(model.cfg), "qk_norm": True}, "tokenizer": "byte"}
    checkpoint.save(tmp_path / "run", 0, model.state_dict(), {}, config, {}, keep=None)
    with pytest.raises(ValueError, match=r"neither a Llama \(qk_norm=True differ\)"):
        hf.export_checkpoint(str(tmp_path / "run"), str(tmp_path / "hf"))


def test_a_gpt2_without_biases_is_not_exported(tmp_path):
    """HF's GPT-2 always has biases: from_pretrained would fill the missing ones at random."""
    from test_hf import tiny_model
    model = tiny_model()
    config = {"model": {**vars(model.cfg), "bias": False}, "tokenizer": "byte"}
    state = {k: v for k, v in model.state_dict().items() if not k.endswith(".bias")}
    checkpoint.save(tmp_path / "run", 0, state, {}, config, {}, keep=None)
    with pytest.raises(ValueError, match=r"nor a GPT-2 \(bias=False differ\)"):
        hf.export_checkpoint(str(tmp_path / "run"), str(tmp_path / "hf"))

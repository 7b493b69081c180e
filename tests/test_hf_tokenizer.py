"""--tokenizer=hf:DIR: a Hugging Face tokenizer.json behind nanolm's tokenizer interface. The
tokenizers are trained here, on a few lines of tiny Shakespeare: nothing is downloaded."""
import json

import pytest

from nanolm import data
from shared_paths import shared

tokenizers = pytest.importorskip("tokenizers")
SHAKESPEARE = shared("data", "tinyshakespeare.txt")
pytestmark = pytest.mark.skipif(SHAKESPEARE is None, reason="no shared tinyshakespeare.txt")
EOS = "<|endoftext|>"


def train_bpe(folder, byte_level=True, vocab=300, eos_config=None):
    """A BPE tokenizer.json in folder: byte-level as GPT-2/SmolLM2, or SentencePiece-style
    (Metaspace, as Llama 2) characters; EOS named by tokenizer_config.json unless eos_config is given."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    if byte_level:
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
        alphabet = []
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[EOS], initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(SHAKESPEARE.read_text().splitlines()[:300], trainer)
    folder.mkdir(exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    if eos_config is None:
        (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOS}))
    else:
        (folder / "config.json").write_text(json.dumps(eos_config))
    return folder


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return train_bpe(tmp_path_factory.mktemp("tok"))


def test_encode_decode_and_the_interface(tok_dir):
    tok = data.get_tokenizer(f"hf:{tok_dir}")
    assert tok.name == f"hf:{tok_dir.resolve()}"
    assert tok.vocab_size == 300 and tok.eot == 0  # the special token is trained first
    text = "First Citizen:\nBefore we proceed, é 日本"
    ids = tok.encode(text)
    assert max(ids) < tok.vocab_size and tok.decode(ids) == text
    assert tok.decode_bytes(ids) == text.encode("utf-8")


def test_a_literal_end_of_text_in_the_data_is_text(tok_dir):
    tok = data.get_tokenizer(f"hf:{tok_dir}")
    ids = tok.encode(f"a{EOS}b")
    assert tok.eot not in ids and tok.decode(ids) == f"a{EOS}b"
    assert tok.decode([tok.eot]) == EOS and tok.decode_bytes([tok.eot]) == EOS.encode()


def test_stream_decoder_joins_a_character_split_across_tokens(tok_dir):
    tok = data.get_tokenizer(f"hf:{tok_dir}")
    ids = tok.encode("日本")  # byte-level BPE: rare characters are several byte tokens
    assert len(ids) > 2
    stream = data.StreamDecoder(tok)
    assert "".join(stream([i]) for i in ids) == "日本"


def test_a_non_byte_level_tokenizer_decodes_bytes_from_its_text(tmp_path):
    tok = data.get_tokenizer(f"hf:{train_bpe(tmp_path / 'words', byte_level=False)}")
    ids = tok.encode("Before we proceed any further")
    assert tok.decode_bytes(ids) == tok.decode(ids).encode("utf-8") == b"Before we proceed any further"


@pytest.mark.parametrize("eos", [{"eos_token_id": 0}, {"eos_token_id": [0, 5]}])
def test_eos_from_config_json_when_tokenizer_config_names_none(tmp_path, eos):
    assert data.get_tokenizer(f"hf:{train_bpe(tmp_path / 't', eos_config=eos)}").eot == 0


def test_eos_given_as_a_dict_in_tokenizer_config(tok_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_text((tok_dir / "tokenizer.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": EOS}}))
    assert data.get_tokenizer(f"hf:{tmp_path}").eot == 0


@pytest.mark.parametrize("setup, message", [
    ("nothing", "tokenizer.json not found"),
    ("garbage", "is not a valid tokenizer.json"),
    ("no eos", "no end-of-text token"),
    ("unknown eos", "eos_token '</s>' is not in"),
])
def test_bad_folder_is_one_clear_error(tok_dir, tmp_path, setup, message):
    if setup == "garbage":
        (tmp_path / "tokenizer.json").write_text('{"model": 3}')
    elif setup != "nothing":
        (tmp_path / "tokenizer.json").write_text((tok_dir / "tokenizer.json").read_text())
    if setup == "unknown eos":
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    with pytest.raises(ValueError, match=message):
        data.get_tokenizer(f"hf:{tmp_path}")


def test_prepare_train_sample_and_eval_with_it(tok_dir, tmp_path, monkeypatch):
    """Shards made with hf:DIR, a run on them, its end-of-run sample decoded by it, and
    nanolm.eval's bytes (for bits per byte) those of the text; the shards are refused with
    another tokenizer."""
    from nanolm import eval as nanolm_eval
    from nanolm.config import parse_args
    from nanolm.train import train
    monkeypatch.chdir(tmp_path)
    text = tmp_path / "shakespeare.txt"
    text.write_text("\n".join(SHAKESPEARE.read_text().splitlines()[:400]))
    data.main(["prepare", str(text), "--out", "shards", "--tokenizer", f"hf:{tok_dir}"])
    assert json.loads((tmp_path / "shards" / "shards.json").read_text()) == {
        "tokenizer": f"hf:{tok_dir.resolve()}", "vocab_size": 300}
    with pytest.raises(ValueError, match="made with tokenizer 'hf:"):
        data.load_dataset("shards", data.get_tokenizer("byte"))
    out = train(parse_args([f"--tokenizer=hf:{tok_dir}", "--data=shards", "--n_layer=1", "--n_head=2",
                            "--n_embd=32", "--block_size=32", "--batch_size=4", "--eval_iters=1",
                            "--max_steps=2", "--warmup=1", "--sample_tokens=8", "--sample_prompt=First",
                            "--out_dir=run"]))
    assert out["sample"].startswith("First")
    assert json.loads((tmp_path / "run" / "config.json").read_text())["tokenizer"] == f"hf:{tok_dir.resolve()}"
    val_text = data.split_text(text.read_text())[1]
    tok = data.get_tokenizer(f"hf:{tok_dir}")
    first = tok.decode_bytes(tok.encode(val_text)[:1])  # the split's first token is no target
    result = nanolm_eval.main(["--ckpt", "run", "--device", "cpu"])
    assert result["bytes"] == len(val_text.encode("utf-8")) - len(first)


def test_a_vocab_beyond_uint16_keeps_its_ids(tok_dir, tmp_path):
    """Llama 3's 128256 tokens: text datasets hold int32 ids then (the shards stay uint16)."""
    from tokenizers import Tokenizer
    big = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    big.add_tokens([f"<extra_{i}>" for i in range(1 << 16)])
    big.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOS}))
    tok = data.get_tokenizer(f"hf:{tmp_path}")
    ids = data.encode_text("a<extra_65535>b", tok)
    assert tok.vocab_size == 300 + (1 << 16) and 300 + 65535 in ids.tolist()
    assert tok.decode(ids.tolist()) == "a<extra_65535>b"
    with pytest.raises(ValueError, match="must fit uint16"):
        data.write_shard(tmp_path / "x.bin", ids)

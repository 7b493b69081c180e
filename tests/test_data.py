import hashlib
import os

import numpy as np
import pytest
import torch

from nanolm import data
from shared_paths import shared

SHAKESPEARE = shared("data", "tinyshakespeare.txt")
TIKTOKEN = shared("tiktoken")

TEXT = "Hello, world!\n\nÜnïcödé ✓ 🚀 <|endoftext|>\n\tdef f(x):\n    return x ** 2\n"


@pytest.fixture
def gpt2(monkeypatch):
    if TIKTOKEN is None:
        pytest.skip("no shared tiktoken cache (../shared/tiktoken)")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(TIKTOKEN))
    return data.get_tokenizer("gpt2")


@pytest.fixture
def shakespeare_cache(monkeypatch):
    if SHAKESPEARE is None:
        pytest.skip("no shared tiny Shakespeare (../shared/data/tinyshakespeare.txt)")
    monkeypatch.setenv("NANOLM_CACHE", str(SHAKESPEARE.parent))
    # the test must never reach the network
    monkeypatch.setattr(data, "download", lambda *a: pytest.fail("tried to download"))


# ----------------------------------------------------------------------------- tokenizers

def test_byte_round_trip():
    tok = data.get_tokenizer("byte")
    ids = tok.encode(TEXT)
    assert tok.vocab_size == 256 and max(ids) < 256
    assert tok.decode(ids) == TEXT


def test_gpt2_round_trip(gpt2):
    ids = gpt2.encode(TEXT)
    assert (gpt2.vocab_size, gpt2.eot) == (50257, 50256)
    assert gpt2.decode(ids) == TEXT
    assert gpt2.eot not in ids  # the literal "<|endoftext|>" in the text stays text
    assert gpt2.encode("Hello world") == [15496, 995]  # GPT-2's well-known ids


def test_gpt2_offline_error_names_cache_dir(monkeypatch):
    import tiktoken

    def offline(name):
        raise ConnectionError("no network")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(OSError, match="TIKTOKEN_CACHE_DIR"):
        data.get_tokenizer("gpt2")


def test_unknown_tokenizer():
    with pytest.raises(ValueError, match="unknown tokenizer 'bpe'"):
        data.get_tokenizer("bpe")


def test_chunked_encoding_equals_whole(gpt2):
    text = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\n  All:\n"
            "Speak, speak.\n\n\nx = 1\n    y\n") * 50
    pieces = list(data.text_chunks(text, size=37))
    assert len(pieces) > 10 and "".join(pieces) == text
    chunked = [i for p in pieces for i in gpt2.encode(p)]
    assert chunked == gpt2.encode(text)


def test_stream_decoder_holds_split_characters():
    tok = data.get_tokenizer("byte")
    dec = data.StreamDecoder(tok)
    ids = tok.encode("é✓")
    assert "".join(dec([i]) for i in ids) == "é✓"
    assert dec([ids[0]]) == ""  # half a character is held back


# ----------------------------------------------------------------------------- datasets

def test_pystdlib_split_is_fixed():
    train, val = data.pystdlib_documents()
    assert len(train) > 8 * len(val) > 0
    assert sum(map(len, train + val)) <= data.PYSTDLIB_MAX_BYTES
    tok = data.get_tokenizer("byte")
    tr, va = data.load_dataset("pystdlib", tok)
    assert tr.dtype == np.uint16 and tr[0] == tok.eot
    assert len(tr) == len(train) + sum(len(t.encode()) for t in train)
    tr2, va2 = data.load_dataset("pystdlib", tok)
    assert np.array_equal(tr, tr2) and np.array_equal(va, va2)


def test_shakespeare_from_cache(shakespeare_cache):
    path = data.shakespeare_path()
    raw = path.read_bytes()
    assert len(raw) == data.SHAKESPEARE_BYTES
    assert hashlib.sha256(raw).hexdigest() == data.SHAKESPEARE_SHA256
    tr, va = data.load_dataset("shakespeare", data.get_tokenizer("byte"))
    assert (len(tr), len(va)) == (1_003_854, 111_540)  # int(0.9 * 1,115,394) chars train
    assert bytes(tr[:14].tolist()) == b"First Citizen:"


def test_shakespeare_offline_error(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOLM_CACHE", str(tmp_path))

    def offline(url, path):
        raise OSError("network unreachable")

    monkeypatch.setattr(data, "download", offline)
    with pytest.raises(OSError, match="NANOLM_CACHE"):
        data.load_dataset("shakespeare", data.get_tokenizer("byte"))


def test_shakespeare_bad_checksum(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOLM_CACHE", str(tmp_path))
    (tmp_path / "tinyshakespeare.txt").write_text("not shakespeare")
    with pytest.raises(ValueError, match="sha256"):
        data.shakespeare_path()


def test_txt_file_split(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("abcdefghij" * 10)
    tr, va = data.load_dataset(str(path), data.get_tokenizer("byte"))
    assert (len(tr), len(va)) == (90, 10)


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset"):
        data.load_dataset("nope", data.get_tokenizer("byte"))


# ----------------------------------------------------------------------------- shards

def test_shard_round_trip(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 50257, size=1001).astype(np.uint16)
    path = tmp_path / "x_train_000000.bin"
    data.write_shard(path, tokens)
    assert os.path.getsize(path) == 1024 + 2 * 1001
    back = data.read_shard(path)
    assert isinstance(back, np.memmap) and np.array_equal(back, tokens)


def test_shard_rejects_tokens_over_uint16(tmp_path):
    with pytest.raises(ValueError, match="uint16"):
        data.write_shard(tmp_path / "s.bin", np.array([1, 70000]))


def _bad_shard(tmp_path, magic=20240520, version=1, ntok=10, actual=10, header_ints=256):
    header = np.zeros(header_ints, np.int32)
    header[:3] = (magic, version, ntok)[:header_ints]
    path = tmp_path / "bad_val_000000.bin"
    path.write_bytes(header.tobytes() + np.arange(actual, dtype=np.uint16).tobytes())
    return path


@pytest.mark.parametrize("kwargs, message", [
    (dict(magic=12345), "bad magic 12345"),
    (dict(version=7), "unsupported version 7"),
    (dict(ntok=10, actual=9), "header says 10 tokens"),
    (dict(ntok=10, actual=11), "but the file has 1046 bytes"),
    (dict(header_ints=3, actual=0), "shorter than the 1024-byte header"),
])
def test_shard_rejections(tmp_path, kwargs, message):
    path = _bad_shard(tmp_path, **kwargs)
    with pytest.raises(ValueError, match=message) as e:
        data.read_shard(path)
    assert str(path) in str(e.value)


def test_shard_dir_and_glob(tmp_path):
    rng = np.random.default_rng(1)
    parts = [rng.integers(0, 256, n).astype(np.uint16) for n in (300, 5, 700)]
    for k, p in enumerate(parts):
        data.write_shard(tmp_path / f"d_train_{k:06d}.bin", p)
    data.write_shard(tmp_path / "d_val_000000.bin", parts[1])
    tok = data.get_tokenizer("byte")
    for spec in (str(tmp_path), str(tmp_path / "d_*.bin")):
        tr, va = data.load_dataset(spec, tok)
        whole = np.concatenate(parts)
        assert len(tr) == len(whole) and np.array_equal(va, parts[1])
        for a, b in ((0, 1005), (290, 310), (299, 306), (1000, 1005), (5, 5)):
            assert np.array_equal(tr[a:b], whole[a:b]), (a, b)


def test_shard_spec_needs_both_splits(tmp_path):
    data.write_shard(tmp_path / "only_train_000000.bin", np.arange(10))
    with pytest.raises(ValueError, match="needs both train and val"):
        data.load_dataset(str(tmp_path), data.get_tokenizer("byte"))
    with pytest.raises(FileNotFoundError):
        data.load_dataset(str(tmp_path / "none_*.bin"), data.get_tokenizer("byte"))


def test_prepare_cli(tmp_path):
    src = tmp_path / "tiny.txt"
    src.write_text("to be or not to be\n" * 100)
    data.main(["prepare", str(src), "--out", str(tmp_path / "out"), "--tokenizer", "byte",
               "--shard_tokens", "700"])
    names = sorted(os.listdir(tmp_path / "out"))
    assert names == ["shards.json", "tiny_train_000000.bin", "tiny_train_000001.bin", "tiny_train_000002.bin",
                     "tiny_val_000000.bin"]
    tr, va = data.load_dataset(str(tmp_path / "out"), data.get_tokenizer("byte"))
    want_tr, want_va = data.load_dataset(str(src), data.get_tokenizer("byte"))
    assert np.array_equal(tr[0:len(tr)], want_tr) and np.array_equal(va, want_va)


def test_progress_bar_for_long_input(capsys):
    data.encode_text("ab\ncd\n" * 200, data.get_tokenizer("byte"), min_progress=100)
    assert "100.0%" in capsys.readouterr().err


# ----------------------------------------------------------------------------- loader

def _tokens(n=1000):
    return np.arange(n, dtype=np.uint16)


def test_loader_windows_are_contiguous():
    x, y = data.Loader(_tokens(), 4, 16, seed=0).next_batch()
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.all(x[:, 0] % 16 == 0) and torch.all(y - x == 1)


def test_loader_deterministic_and_seeded():
    def run(seed):
        loader = data.Loader(_tokens(), 4, 16, seed=seed)
        return torch.cat([loader.next_batch()[0] for _ in range(30)])

    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


def test_loader_sequential_covers_epoch_in_order():
    loader = data.Loader(_tokens(), 2, 10, seed=0, shuffle=False)
    starts = [loader.next_batch()[0][:, 0].tolist() for _ in range(3)]
    assert starts == [[0, 10], [20, 30], [40, 50]]


def test_loader_epoch_visits_every_window_once():
    loader = data.Loader(_tokens(161), 2, 16, seed=5)  # 10 windows -> 5 steps per epoch
    firsts = sorted(loader.next_batch()[0][:, 0].tolist() for _ in range(5))
    assert sorted(sum(firsts, [])) == list(range(0, 160, 16))
    assert loader.state_dict()["epoch"] == 1


def test_loader_state_round_trip():
    a = data.Loader(_tokens(), 3, 8, seed=7)
    for _ in range(50):  # crosses epoch boundaries (41 steps per epoch)
        a.next_batch()
    b = data.Loader(_tokens(), 3, 8, seed=7)
    b.load_state_dict(a.state_dict())
    for _ in range(60):
        xa, ya = a.next_batch()
        xb, yb = b.next_batch()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_loader_state_mismatch():
    state = data.Loader(_tokens(), 3, 8, seed=7).state_dict()
    with pytest.raises(ValueError, match="block_size: saved 8, now 16"):
        data.Loader(_tokens(), 3, 16, seed=7).load_state_dict(state)


@pytest.mark.parametrize("shuffle", [True, False])
def test_loader_ranks_are_disjoint(shuffle):
    world = 3
    loaders = [data.Loader(_tokens(2000), 4, 10, seed=1, rank=r, world_size=world,
                           shuffle=shuffle) for r in range(world)]
    seen = [set() for _ in range(world)]
    for _ in range(loaders[0].steps_per_epoch):
        for r, loader in enumerate(loaders):
            seen[r].update(loader.next_batch()[0][:, 0].tolist())
    assert all(len(s) == loaders[0].steps_per_epoch * 4 for s in seen)
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])


def test_loader_too_small():
    with pytest.raises(ValueError, match="fewer than batch_size"):
        data.Loader(_tokens(50), 4, 16, seed=0)


def test_loader_reads_memmapped_shards(tmp_path):
    data.write_shard(tmp_path / "m_train_000000.bin", _tokens(300))
    data.write_shard(tmp_path / "m_train_000001.bin", _tokens(300) + 300)
    data.write_shard(tmp_path / "m_val_000000.bin", _tokens(100))
    vocab_1k = type("Tok", (), {"name": "test", "vocab_size": 1024})()
    tr, _ = data.load_dataset(str(tmp_path), vocab_1k)
    loader = data.Loader(tr, 2, 50, seed=0, shuffle=False)
    for _ in range(5):
        x, y = loader.next_batch()
        assert torch.all(y - x == 1)  # windows crossing the shard boundary stay contiguous


@pytest.mark.gpu
def test_loader_cuda_batches():
    x, y = data.Loader(_tokens(), 4, 16, seed=0).next_batch("cuda")
    assert x.is_cuda and y.is_cuda and torch.equal(x[:, 1:], y[:, :-1])


def test_shakespeare_gpt2_matches_nanogpt(shakespeare_cache, gpt2):
    tr, va = data.load_dataset("shakespeare", gpt2)
    assert (len(tr), len(va)) == (301_966, 36_059)  # nanoGPT's prepare.py counts

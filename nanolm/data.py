"""Tokenizers, datasets, token shards and the batch loader.

Datasets by name or path (`load_dataset`):
  pystdlib     the Python standard library's own top-level *.py files, found at run time
               (offline default). Files sorted by path; every 10th file (index % 10 == 9) is
               validation; files are taken in order until PYSTDLIB_MAX_BYTES is reached.
               Each file is one document, preceded by the tokenizer's end-of-text token.
  shakespeare  tiny Shakespeare, downloaded once into $NANOLM_CACHE (default ~/.cache/nanolm)
               and sha256-checked; first 90% of characters train, last 10% val (as nanoGPT).
  FILE.txt     any local text file, split 90/10 the same way.
  DIR or GLOB  token shards (the llm.c / modded-nanogpt format below); files whose name
               contains "val" are validation, the others training.

Shard format: a header of 256 int32 (magic 20240520, version 1, token count, rest zero), then
the tokens as uint16. Write them with
    python -m nanolm.data prepare <dataset> --out DIR --tokenizer gpt2|byte|hf:TOKDIR [--overwrite]
which also writes DIR/shards.json, {"tokenizer": name, "vocab_size": n}: the .bin files stay
exactly llm.c's format for other tools, and a run with another tokenizer is refused. Shards
without it (e.g. llm.c's own) are accepted; every shard's largest token id is checked against
the vocab when it is opened.
"""
import argparse
import codecs
import glob
import hashlib
import json
import os
import re
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
SHARD_TOKENS = 100_000_000  # llm.c's shard size: 200 MB of uint16 per file
SHARDS_INFO = "shards.json"  # beside the shards: the tokenizer that made them

PYSTDLIB_MAX_BYTES = 2 * 1024 * 1024  # ~half the stdlib: gpt2-tokenizes in a few seconds

SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt")
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
SHAKESPEARE_BYTES = 1_115_394

CHUNK_CHARS = 1 << 20  # text is tokenized in ~1 MB pieces so a progress bar can advance


# ----------------------------------------------------------------------------- tokenizers

class ByteTokenizer:
    """UTF-8 bytes as tokens. All 256 values are text, so the end-of-text token is byte 0
    (NUL), which never occurs in text files."""
    name = "byte"
    vocab_size = 256
    eot = 0

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode_bytes(self, ids):
        return bytes(ids)

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


class GPT2Tokenizer:
    """GPT-2 BPE via tiktoken's r50k_base (the same merges as 'gpt2'), EOT = 50256."""
    name = "gpt2"
    vocab_size = 50257
    eot = 50256

    def __init__(self):
        import tiktoken
        try:
            self.enc = tiktoken.get_encoding("r50k_base")
        except Exception as e:  # tiktoken surfaces network failures as many exception types
            raise OSError(
                "could not load the GPT-2 BPE file (tiktoken 'r50k_base'). Offline, point "
                "TIKTOKEN_CACHE_DIR at a folder holding the cached file "
                "(here: ../shared/tiktoken relative to the repo root), e.g. "
                f"`export TIKTOKEN_CACHE_DIR=/path/to/tiktoken`. Cause: {e!r}") from e

    def encode(self, text):
        # encode_ordinary: a literal "<|endoftext|>" in the data is text, not a special token
        return self.enc.encode_ordinary(text)

    def decode_bytes(self, ids):
        return self.enc.decode_bytes(ids)

    def decode(self, ids):
        return self.enc.decode(ids, errors="replace")


def byte_level_table():
    """GPT-2's byte -> printable character map, inverted: byte-level BPE vocabularies (GPT-2,
    SmolLM2, Llama 3) spell each byte as one of these characters, so a token's bytes are read
    back exactly, also when a multi-byte character is split across tokens."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]
    chars = printable + [256 + i for i in range(len(rest))]
    return {chr(c): b for c, b in zip(chars, printable + rest)}


class HFTokenizer:
    """A Hugging Face tokenizer: DIR/tokenizer.json read with the `tokenizers` library. The
    end-of-text token is the EOS token that DIR/tokenizer_config.json (eos_token) or, failing
    that, DIR/config.json (eos_token_id) names. Its name, hf:<absolute DIR>, is what checkpoints
    and shards.json record, so a run resumed from another directory finds the same files."""

    def __init__(self, folder):
        path = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(path):
            raise ValueError(f"--tokenizer=hf:{folder}: {path} not found (hf:DIR needs the folder "
                             f"holding a Hugging Face tokenizer.json)")
        try:
            from tokenizers import Tokenizer
        except ImportError as e:
            raise ImportError("--tokenizer=hf:DIR needs the tokenizers library: pip install 'nanolm[hf]'") from e
        try:
            self.tok = Tokenizer.from_file(path)
        except Exception as e:  # the Rust side reports a malformed file as a bare Exception
            raise ValueError(f"{path} is not a valid tokenizer.json ({e})") from None
        # a literal "<|endoftext|>" in the data is text, not the special token (as encode_ordinary)
        self.tok.encode_special_tokens = True
        self.name = "hf:" + os.path.abspath(folder)
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.eot = self._eos_id(folder)
        self.added = {i: t.content.encode("utf-8") for i, t in self.tok.get_added_tokens_decoder().items()}
        self.byte_level = "ByteLevel" in json.dumps(read_json(path).get("decoder"))
        self.table = byte_level_table() if self.byte_level else None

    def _eos_id(self, folder):
        tc, mc = (os.path.join(folder, f) for f in ("tokenizer_config.json", "config.json"))
        eos = read_json(tc).get("eos_token") if os.path.isfile(tc) else None
        if isinstance(eos, dict):  # older files: {"content": "</s>", ...}
            eos = eos.get("content")
        if isinstance(eos, str):
            if self.tok.token_to_id(eos) is None:
                raise ValueError(f"{tc}: eos_token {eos!r} is not in {folder}/tokenizer.json")
            return self.tok.token_to_id(eos)
        eos = read_json(mc).get("eos_token_id") if os.path.isfile(mc) else None
        eos = eos[0] if isinstance(eos, list) and eos else eos
        if not isinstance(eos, int) or not 0 <= eos < self.vocab_size:
            raise ValueError(f"{folder}: no end-of-text token: tokenizer_config.json names no eos_token "
                             f"and config.json no eos_token_id within the vocab of {self.vocab_size}")
        return eos

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode_bytes(self, ids):
        """Exact bytes for a byte-level vocabulary; otherwise the UTF-8 of the decoded text (a
        character split across tokens then decodes as U+FFFD)."""
        if not self.byte_level:
            return self.decode(ids).encode("utf-8")
        return b"".join(self.added[i] if i in self.added else
                        bytes(self.table[c] for c in self.tok.id_to_token(i)) for i in ids)

    def decode(self, ids):
        return self.tok.decode(ids, skip_special_tokens=False)


def get_tokenizer(name):
    if name == "byte":
        return ByteTokenizer()
    if name == "gpt2":
        return GPT2Tokenizer()
    if name.startswith("hf:"):
        return HFTokenizer(name[3:])
    raise ValueError(f"unknown tokenizer {name!r}; valid: byte, gpt2, hf:DIR (a folder with a "
                     f"Hugging Face tokenizer.json)")


class StreamDecoder:
    """Turns token ids into text as they arrive; a multi-byte character split across tokens
    is held back until complete instead of printing a replacement character."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def __call__(self, ids):
        return self.utf8.decode(self.tokenizer.decode_bytes(ids))


# ----------------------------------------------------------------------------- progress

class Progress:
    """A one-line progress bar on stderr, redrawn at most twice a second."""

    def __init__(self, total, desc, unit="MB", scale=1e-6):
        self.total, self.desc, self.unit, self.scale = total, desc, unit, scale
        self.done, self.last, self.start = 0, 0.0, time.time()

    def update(self, n):
        self.done += n
        now = time.time()
        if now - self.last >= 0.5 or self.done >= self.total:
            self.last = now
            frac = self.done / max(self.total, 1)
            bar = "#" * int(30 * frac)
            sys.stderr.write(f"\r{self.desc} [{bar:<30}] {100 * frac:5.1f}% "
                             f"{self.done * self.scale:.1f}/{self.total * self.scale:.1f} "
                             f"{self.unit} {now - self.start:.0f}s")
            sys.stderr.flush()

    def close(self):
        sys.stderr.write("\n")


# ----------------------------------------------------------------------------- text sources

# A cut just after "\n" and before a non-space character is always a boundary of GPT-2's
# pre-tokenizer, so tokenizing the pieces separately gives exactly the tokens of the whole.
_SAFE_CUT = re.compile(r"\n(?=\S)")


def text_chunks(text, size=CHUNK_CHARS):
    start = 0
    while start < len(text):
        m = _SAFE_CUT.search(text, start + size)
        end = m.end() if m else len(text)
        yield text[start:end]
        start = end


def encode_text(text, tokenizer, desc="tokenizing", min_progress=4 * CHUNK_CHARS):
    """Tokenize a long text in pieces (same tokens as in one go), with a progress bar for
    inputs of more than a few MB."""
    bar = Progress(len(text), desc) if len(text) >= min_progress else None
    ids = []
    for piece in text_chunks(text):
        ids.extend(tokenizer.encode(piece))
        if bar:
            bar.update(len(piece))
    if bar:
        bar.close()
    return token_array(ids, tokenizer)


def encode_documents(docs, tokenizer):
    """Each document preceded by EOT, as llm.c's FineWeb shards delimit documents."""
    ids = []
    for doc in docs:
        ids.append(tokenizer.eot)
        ids.extend(tokenizer.encode(doc))
    return token_array(ids, tokenizer)


def token_array(ids, tokenizer):
    """uint16 (the shards' type, half the memory) when the vocab fits, else int32 (an hf:DIR
    tokenizer such as Llama 3's 128256 tokens, which therefore cannot be written to shards)."""
    return np.array(ids, dtype=np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.int32)


def pystdlib_documents():
    """(train, val) lists of source texts; see the module docstring for the split."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    if not files:
        raise RuntimeError("pystdlib: no *.py files in " + sysconfig.get_paths()["stdlib"])
    train, val, total = [], [], 0
    for i, path in enumerate(files):
        text = path.read_text(encoding="utf-8", errors="replace")
        if total + len(text) > PYSTDLIB_MAX_BYTES:
            break
        total += len(text)
        (val if i % 10 == 9 else train).append(text)
    return train, val


def cache_dir():
    return Path(os.environ.get("NANOLM_CACHE", Path.home() / ".cache" / "nanolm"))


def shakespeare_path():
    """The cached tiny Shakespeare, downloaded on first use and sha256-checked every time."""
    path = cache_dir() / "tinyshakespeare.txt"
    if not path.exists():
        try:
            download(SHAKESPEARE_URL, path)
        except OSError as e:
            raise OSError(
                f"tiny Shakespeare is not cached at {path} and could not be downloaded from "
                f"{SHAKESPEARE_URL} ({e}). Offline, copy the file there by hand, or set "
                "NANOLM_CACHE to a folder holding tinyshakespeare.txt.") from e
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SHAKESPEARE_SHA256:
        raise ValueError(f"{path}: sha256 {digest} is not tiny Shakespeare's "
                           f"{SHAKESPEARE_SHA256}; delete it to download again")
    return path


def download(url, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part")
    with urllib.request.urlopen(url, timeout=30) as r, open(tmp, "wb") as f:
        f.write(r.read())
    os.replace(tmp, path)


def split_text(text, val_fraction=0.1):
    n = int(len(text) * (1 - val_fraction))
    return text[:n], text[n:]


def text_dataset(name):
    """(train_text, val_text) for 'shakespeare' or a .txt path."""
    path = shakespeare_path() if name == "shakespeare" else Path(name)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start} is 0x{e.object[e.start]:02x})") from None
    if not text:
        raise ValueError(f"{path} is empty: nothing to tokenize")
    return split_text(text)


def encode_dataset(name, tokenizer):
    """(train, val) token arrays (see token_array) for a text dataset (pystdlib, shakespeare, .txt)."""
    if name == "pystdlib":
        train, val = pystdlib_documents()
        return encode_documents(train, tokenizer), encode_documents(val, tokenizer)
    train, val = text_dataset(name)
    return (encode_text(train, tokenizer, "tokenizing train"),
            encode_text(val, tokenizer, "tokenizing val"))


# ----------------------------------------------------------------------------- shards

def write_shard(path, tokens):
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 1 << 16):
        raise ValueError(f"{path}: token ids must fit uint16, got range "
                         f"[{tokens.min()}, {tokens.max()}]")
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:3] = SHARD_MAGIC, SHARD_VERSION, tokens.size
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype(np.uint16).tobytes())


def read_shard(path):
    """The shard's tokens as a read-only uint16 memmap, after checking its header."""
    size = os.path.getsize(path)
    if size < HEADER_BYTES:
        raise ValueError(f"{path}: not a token shard: {size} bytes, shorter than the "
                         f"{HEADER_BYTES}-byte header")
    header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    if header[0] != SHARD_MAGIC:
        raise ValueError(f"{path}: bad magic {header[0]}, expected {SHARD_MAGIC}")
    if header[1] != SHARD_VERSION:
        raise ValueError(f"{path}: unsupported version {header[1]}, expected {SHARD_VERSION}")
    ntok = int(header[2])
    if size != HEADER_BYTES + 2 * ntok:
        raise ValueError(f"{path}: header says {ntok} tokens ({HEADER_BYTES + 2 * ntok} bytes) "
                         f"but the file has {size} bytes")
    return np.memmap(path, dtype=np.uint16, mode="r", offset=HEADER_BYTES, shape=(ntok,))


class ConcatTokens:
    """Several shards read as one sequence; slicing copies only the requested tokens."""

    def __init__(self, parts):
        self.parts = parts
        self.starts = np.cumsum([0] + [len(p) for p in parts])

    def __len__(self):
        return int(self.starts[-1])

    def __getitem__(self, s):
        start, stop, _ = s.indices(len(self))
        pieces = []
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        while start < stop:
            lo = start - self.starts[i]
            hi = min(stop - self.starts[i], len(self.parts[i]))
            pieces.append(self.parts[i][lo:hi])
            start += hi - lo
            i += 1
        return np.concatenate(pieces) if pieces else np.empty(0, np.uint16)


def shard_files(spec):
    """(train, val) shard paths of a directory or a glob. A directory's own name is never a
    pattern (run[1]/ is a name), nor is that of the directory a glob's file pattern sits in."""
    if os.path.isdir(spec):
        paths = glob.glob(os.path.join(glob.escape(spec), "*.bin"))
    else:
        folder, pattern = os.path.split(spec)
        paths = glob.glob(spec) or glob.glob(os.path.join(glob.escape(folder), pattern))
    paths = sorted(paths)
    if not paths:
        raise FileNotFoundError(f"no token shards match {spec!r}")
    val = [p for p in paths if "val" in os.path.basename(p)]
    train = [p for p in paths if p not in val]
    if not train or not val:
        raise ValueError(f"{spec!r} needs both train and val shards (val = file name contains "
                         f"'val'): found {len(train)} train, {len(val)} val")
    return train, val


def read_json(path):
    """The object (dict) a JSON file holds; a file that is not one raises ValueError naming it."""
    try:
        with open(path) as f:
            value = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object ({{...}}), got {type(value).__name__}")
    return value


def check_shards_tokenizer(paths, tokenizer):
    """Refuse shards whose shards.json names another tokenizer than the run's, or none."""
    for folder in sorted({os.path.dirname(os.path.abspath(p)) for p in paths}):
        info = os.path.join(folder, SHARDS_INFO)
        if os.path.exists(info):
            made_with = read_json(info).get("tokenizer")
            if not isinstance(made_with, str):
                raise ValueError(f"{info} names no tokenizer (expected {{\"tokenizer\": \"gpt2\" or "
                                 f"\"byte\", ...}}); write the one the shards were made with, or "
                                 f"delete the file to skip the check")
            if made_with != tokenizer.name:
                raise ValueError(f"{info}: these shards were made with tokenizer {made_with!r}, "
                                 f"but the run has --tokenizer={tokenizer.name}")


def open_shards(paths, tokenizer):
    """The shards as one token sequence, every token id checked against the vocab: a max over
    each memory-mapped shard, one read of the data at start, instead of an IndexError (or a
    device-side assert) whenever the bad batch comes up."""
    check_shards_tokenizer(paths, tokenizer)
    parts = [read_shard(p) for p in paths]
    for path, part in zip(paths, parts):
        top = int(part.max()) if len(part) else 0
        if top >= tokenizer.vocab_size:
            raise ValueError(f"{path} holds token id {top}, outside the {tokenizer.name} tokenizer's "
                             f"vocab of {tokenizer.vocab_size}: it was written with another tokenizer")
    return parts[0] if len(parts) == 1 else ConcatTokens(parts)


def is_shard_spec(name):
    return os.path.isdir(name) or (not os.path.isfile(name) and any(c in name for c in "*?["))


def resolve_data(name):
    """A dataset path made absolute (names stay names), so that a run resumed from another
    directory finds its data."""
    return name if name in ("pystdlib", "shakespeare") else os.path.abspath(name)


def load_dataset(name, tokenizer):
    """(train_tokens, val_tokens) for a dataset name or path (see the module docstring).
    Shards hold token ids only: they must have been written with the same tokenizer."""
    if is_shard_spec(name):
        train, val = shard_files(name)
        return open_shards(train, tokenizer), open_shards(val, tokenizer)
    if name in ("pystdlib", "shakespeare") or name.endswith(".txt"):
        return encode_dataset(name, tokenizer)
    if os.sep in name and not os.path.exists(name):  # a path, not a dataset name
        raise ValueError(f"{name}: not found (no such file or directory)")
    raise ValueError(f"unknown dataset {name!r}: expected pystdlib, shakespeare, a .txt file, "
                     "or a directory / glob of token shards")


def clear_for_shards(out, overwrite):
    """An empty (or new) out dir; with overwrite, an old dataset's shards and shards.json are
    deleted first, so none of them are mixed into the new one."""
    if not os.path.isdir(out) or not os.listdir(out):
        return
    if not overwrite:
        raise ValueError(f"{out} is not empty: shards already there would be mixed into the new "
                         f"dataset; pass --overwrite to replace them, or choose another --out")
    for old in glob.glob(os.path.join(glob.escape(out), "*.bin")) + [os.path.join(out, SHARDS_INFO)]:
        if os.path.exists(old):
            os.remove(old)


def prepare(name, out, tokenizer_name, shard_tokens=SHARD_TOKENS, overwrite=False):
    """Tokenize a text dataset into <out>/<stem>_{val,train}_NNNNNN.bin shards and
    <out>/shards.json."""
    if shard_tokens < 1:  # checked first: a failed run must leave no shards.json to refuse the retry
        raise ValueError(f"--shard_tokens must be >= 1, got {shard_tokens}")
    clear_for_shards(out, overwrite)
    tokenizer = get_tokenizer(tokenizer_name)
    train, val = encode_dataset(name, tokenizer)
    stem = Path(name).stem
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, SHARDS_INFO), "w") as f:
        json.dump({"tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size}, f)
    written = []
    for split, tokens in (("val", val), ("train", train)):
        for k, start in enumerate(range(0, len(tokens), shard_tokens)):
            path = os.path.join(out, f"{stem}_{split}_{k:06d}.bin")
            write_shard(path, tokens[start:start + shard_tokens])
            written.append(path)
    return written


# ----------------------------------------------------------------------------- loader

class Loader:
    """Batches of contiguous windows: x = tokens[s : s+T], y = tokens[s+1 : s+T+1].

    The tokens are cut into W = (N-1) // T windows starting at multiples of T. Each epoch
    orders the windows (a permutation seeded by (seed, epoch), or in sequence); step s of the
    epoch gives rank r the B windows order[(s*world_size + r)*B : ... + B], so the ranks read
    disjoint windows and, in sequential order, each rank's batch is one contiguous span (as in
    llm.c). Windows left over after the last full step of an epoch are skipped for that epoch.
    The position is (epoch, step), identical on every rank.
    """

    def __init__(self, tokens, batch_size, block_size, seed, rank=0, world_size=1,
                 shuffle=True):
        if not 0 <= rank < world_size:
            raise ValueError(f"Loader: rank {rank} not in [0, {world_size})")
        self.tokens, self.B, self.T = tokens, batch_size, block_size
        self.seed, self.rank, self.world_size, self.shuffle = seed, rank, world_size, shuffle
        self.n_windows = (len(tokens) - 1) // block_size
        self.steps_per_epoch = self.n_windows // (batch_size * world_size)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"Loader: {len(tokens)} tokens give {self.n_windows} windows of {block_size}, "
                f"fewer than batch_size * world_size = {batch_size * world_size}")
        self.epoch, self.step = 0, 0
        self._order = self._epoch_order()

    def _epoch_order(self):
        if not self.shuffle:
            return np.arange(self.n_windows)
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n_windows)

    def next_windows(self):
        """Start offsets of this rank's next B windows; advances the position."""
        first = (self.step * self.world_size + self.rank) * self.B
        starts = self._order[first:first + self.B] * self.T
        self.step += 1
        if self.step == self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
            self._order = self._epoch_order()
        return starts

    def next_batch(self, device="cpu"):
        starts = self.next_windows()
        buf = np.stack([np.asarray(self.tokens[s:s + self.T + 1]) for s in starts])
        buf = torch.from_numpy(buf.astype(np.int64))
        x, y = buf[:, :-1].contiguous(), buf[:, 1:].contiguous()
        if torch.device(device).type == "cuda":
            # a fresh pinned buffer per batch: reusing one could be overwritten while the
            # previous non-blocking copy is still in flight
            return (x.pin_memory().to(device, non_blocking=True),
                    y.pin_memory().to(device, non_blocking=True))
        return x.to(device), y.to(device)

    def state_dict(self):
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed,
                "shuffle": self.shuffle, "n_windows": self.n_windows, "batch_size": self.B,
                "block_size": self.T, "world_size": self.world_size}

    def load_state_dict(self, state):
        """The position is in global steps, so a state saved by W ranks of batch B loads into
        W' ranks of batch B' whenever B*W == B'*W' (the same windows per global step)."""
        mine = self.state_dict()
        fixed = ("seed", "shuffle", "n_windows", "block_size")
        diff = [f"{k}: saved {state[k]}, now {mine[k]}" for k in fixed if state[k] != mine[k]]
        saved_global, global_batch = state["batch_size"] * state["world_size"], self.B * self.world_size
        if saved_global != global_batch:
            diff.append(f"global batch (batch_size*world_size): saved {state['batch_size']}*"
                        f"{state['world_size']}, now {self.B}*{self.world_size}")
        if diff:
            raise ValueError("Loader state does not fit this data/loader: " + "; ".join(diff))
        self.epoch, self.step = state["epoch"], state["step"]
        self._order = self._epoch_order()


# ----------------------------------------------------------------------------- CLI

def main(argv=None):
    from nanolm.config import cli
    cli(run_cli, sys.argv[1:] if argv is None else argv)


def run_cli(argv):
    p = argparse.ArgumentParser(prog="python -m nanolm.data")
    sub = p.add_subparsers(dest="cmd", required=True)
    prep = sub.add_parser("prepare", help="tokenize a text dataset into train/val shards")
    prep.add_argument("dataset", help="pystdlib, shakespeare, or a .txt file")
    prep.add_argument("--out", required=True, help="output directory")
    prep.add_argument("--tokenizer", default="gpt2",
                      help="gpt2, byte, or hf:DIR (DIR/tokenizer.json, a Hugging Face tokenizer)")
    prep.add_argument("--shard_tokens", type=int, default=SHARD_TOKENS)
    prep.add_argument("--overwrite", action="store_true",
                      help="replace the shards (and shards.json) already in --out")
    args = p.parse_args(argv)
    for path in prepare(args.dataset, args.out, args.tokenizer, args.shard_tokens, args.overwrite):
        print(f"{path}: {len(read_shard(path)):,} tokens")


if __name__ == "__main__":
    main()

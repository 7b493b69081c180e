"""Configs: dataclasses with presets and `--key=value` overrides, validated before any work;
and cli(), which every entry point runs under so a user's error is one `error:` line."""
import dataclasses
import math
import os
import re
import sys
import traceback
import typing
from dataclasses import dataclass, fields


class ConfigError(ValueError):
    """A bad config or CLI value, reported before any training work."""


def describe(error):
    """One line for an error: an OSError as 'path: reason' (its [Errno N] prefix dropped)."""
    if isinstance(error, OSError) and error.strerror:
        where = error.filename if error.filename is not None else ""
        return f"{where}: {error.strerror}" if where else error.strerror
    return str(error)


def cli(main, argv, errors=()):
    """Run main(argv) as a command: a user's error (ValueError, which ConfigError is, OSError,
    or one of `errors`) exits with code 1 and one `error: ...` line, no traceback. `--debug` in
    argv, or NANOLM_DEBUG=1, shows the traceback as well."""
    debug = "--debug" in argv or os.environ.get("NANOLM_DEBUG", "") not in ("", "0")
    try:
        return main([a for a in argv if a != "--debug"])
    except (ValueError, OSError, *errors) as e:
        if debug:
            traceback.print_exc()
        sys.exit(f"error: {describe(e)}")


NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "rope")
MLPS = ("gelu", "swiglu", "relu2")


@dataclass
class ModelConfig:
    """The model's shape and its block's choices. Every choice defaults to GPT-2's, so a
    checkpoint saved before a field existed loads as the GPT-2 it is (README's "Model" section
    names where each option comes from)."""
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024
    vocab_size: int = 50257
    vocab_multiple: int = 128  # padded vocab rows; padding is never predicted (loss/sampling mask it)
    bias: bool = True  # GPT-2 has biases in Linear and LayerNorm
    dropout: float = 0.0  # embedding sum, residual branches, attention probabilities; 0 = none
    norm: str = "layernorm"  # layernorm (GPT-2) or rmsnorm (Llama, nanochat: no mean, no bias)
    norm_weight: bool = True  # a learned gain in every norm; False = parameter-free (nanochat)
    norm_eps: float = 1e-5  # GPT-2's LayerNorm eps; Llama's configs say rms_norm_eps
    pos: str = "learned"  # learned position embeddings (GPT-2) or rope (rotary, Llama)
    rope_theta: float = 10000.0  # RoPE base (RoFormer, Llama 2); SmolLM2 uses 1e5
    n_kv_head: int = 0  # key/value heads (GQA); 0 = n_head (MHA), 1 = MQA; must divide n_head
    qk_norm: bool = False  # parameter-free RMSNorm of each q and k head before RoPE (nanochat)
    mlp: str = "gelu"  # gelu (GPT-2), swiglu (Llama) or relu2 (ReLU squared: modded-nanogpt, nanochat)
    mlp_hidden: int = 0  # MLP width; 0 = 4*n_embd, or for swiglu 8*n_embd/3 rounded up to 64 (same params)
    tie_embeddings: bool = True  # lm_head shares wte's weight (GPT-2); False = its own (nanochat, Llama 3)
    logit_softcap: float = 0.0  # logits = cap * tanh(logits / cap) (Gemma 2, nanochat); 0 = off

    def __post_init__(self):
        self.validate()

    def validate(self):
        """One ConfigError naming the first field out of range (a checkpoint's config or the
        command line's: both build a ModelConfig)."""
        for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "vocab_multiple"):
            if getattr(self, k) < (0 if k == "n_layer" else 1):
                raise ConfigError(f"{k} must be positive, got {getattr(self, k)}")
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        for k, valid in (("norm", NORMS), ("pos", POSITIONS), ("mlp", MLPS)):
            if getattr(self, k) not in valid:
                raise ConfigError(f"{k} must be one of {', '.join(valid)}, got {getattr(self, k)!r}")
        if self.n_kv_head < 0 or self.n_head % self.kv_heads:
            raise ConfigError(f"n_kv_head={self.n_kv_head} must divide n_head={self.n_head} (0 = n_head)")
        if self.pos == "rope" and self.head_size % 2:
            raise ConfigError(f"pos=rope rotates pairs of dimensions: head size n_embd/n_head = "
                              f"{self.head_size} must be even")
        for k in ("norm_eps", "rope_theta"):
            if not math.isfinite(getattr(self, k)) or getattr(self, k) <= 0:
                raise ConfigError(f"{k} must be a positive number, got {getattr(self, k)}")
        if not math.isfinite(self.logit_softcap) or self.logit_softcap < 0:
            raise ConfigError(f"logit_softcap must be >= 0 (0 = off), got {self.logit_softcap}")
        if self.mlp_hidden < 0:
            raise ConfigError(f"mlp_hidden must be >= 0 (0 = the default width), got {self.mlp_hidden}")
        if self.qk_norm and self.pos != "rope":
            raise ConfigError("qk_norm=True needs pos=rope: q and k are normalised in the RoPE op, before "
                              "the rotation (as nanochat)")
        if self.norm == "layernorm" and not self.norm_weight:
            raise ConfigError("norm_weight=False is for norm=rmsnorm (nanochat's parameter-free RMSNorm); "
                              "the LayerNorm kernels take a weight")

    @property
    def padded_vocab(self):
        m = self.vocab_multiple
        return (self.vocab_size + m - 1) // m * m

    @property
    def kv_heads(self):
        return self.n_kv_head or self.n_head

    @property
    def head_size(self):
        return self.n_embd // self.n_head

    @property
    def hidden(self):
        """The MLP's hidden width: swiglu's default 8C/3 keeps the parameters of a 4C GELU MLP
        (three matrices instead of two), rounded up to a multiple of 64 as Llama does."""
        if self.mlp_hidden:
            return self.mlp_hidden
        if self.mlp == "swiglu":
            return (-(-8 * self.n_embd // 3) + 63) // 64 * 64
        return 4 * self.n_embd


@dataclass
class TrainConfig:
    preset: str = "quickstart"  # model shape
    data: str = "pystdlib"  # embedded corpus: needs no download
    tokenizer: str = "byte"  # vocab 256, no files needed
    batch_size: int = 16  # sequences per micro-batch per data-parallel replica; global = batch_size*grad_accum*W/tp
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 450  # optimizer steps; quickstart ~1 min on 2 idle CPU cores
    lr: float = 2e-3  # small models tolerate a high peak lr
    min_lr: float = 2e-4  # cosine floor, lr/10 as in nanoGPT
    warmup: int = 50  # linear warmup steps
    weight_decay: float = 0.1  # GPT-3 value, 2-D weights only
    beta1: float = 0.9
    beta2: float = 0.95  # GPT-3 value, steadier than 0.999 at large batch
    grad_clip: float = 1.0  # global norm; 0 disables
    # adamw, or muon: Muon for the blocks' 2-D weights, AdamW (the settings above) for the rest
    optim: str = "adamw"
    muon_lr: float = 0.02  # Muon's peak lr (modded-nanogpt's and nanochat's); follows --lr's warmup and decay
    muon_momentum: float = 0.95  # Nesterov momentum (modded-nanogpt, nanochat, torch.optim.Muon)
    # Newton-Schulz coefficients: polar_express (modded-nanogpt's and nanochat's current) or classic
    muon_ns: str = "polar_express"
    max_skipped_steps: int = 10  # consecutive non-finite steps (each skipped) before the run stops as diverged
    eval_interval: int = 100  # steps between val-loss estimates
    eval_iters: int = 10  # global batches (batch_size on each rank) per val-loss estimate
    log_interval: int = 25  # steps between log lines
    early_stop: int = 0  # stop after this many evals in a row without a new lowest val loss; 0 = never
    target_loss: float = 0.0  # stop (saving) at the first eval whose val loss is at most this; 0 = never
    seed: int = 1337
    device: str = "auto"  # cuda if available, else cpu
    # autocast: auto = bf16 on cuda, and on CPUs with AMX or AMD CPUs with AVX512-BF16 (read from
    # /proc/cpuinfo, the same on an idle and a loaded machine), else fp32; or float32, bfloat16,
    # float16 (loss-scaled)
    dtype: str = "auto"
    loss_scale_window: int = 2000  # float16: clean steps before the loss scale doubles (torch GradScaler's)
    # the backend of each op: "auto", one backend name, or per-op overrides such
    # as "auto,attention=triton"
    kernels: str = "auto"
    peak_tflops: float = 0.0  # overrides the device peak table for MFU; 0 = look up
    out_dir: str = ""  # run dir (checkpoints, metrics.jsonl, config.json); "" = runs/<preset>-<time>
    ckpt_interval: int = 500  # steps between checkpoints (one is also written at the end); 0 = end only
    keep_ckpts: int = 3  # newest checkpoints kept in the run dir
    resume: str = ""  # "latest" (bare --resume), a run dir or a checkpoint file
    init_from: str = ""  # start a fresh run from these weights: a run dir or checkpoint file
    sample_tokens: int = 200  # length of the sample printed at the end
    sample_prompt: str = "\n"  # text the end-of-run sample continues
    n_layer: int = 0  # 0 = take from preset
    n_head: int = 0
    n_embd: int = 0
    block_size: int = 0
    dropout: float = 0.0
    # the block's choices (ModelConfig's fields, README "Model"); unset = the preset's. This one:
    norm: str | None = None  # layernorm or rmsnorm
    norm_weight: bool | None = None  # false: parameter-free RMSNorm
    norm_eps: float | None = None
    pos: str | None = None  # learned or rope
    rope_theta: float | None = None
    n_kv_head: int | None = None  # GQA key/value heads, dividing n_head; 0 = n_head
    qk_norm: bool | None = None  # RMSNorm of each q and k head before RoPE
    mlp: str | None = None  # gelu, swiglu or relu2
    mlp_hidden: int | None = None  # 0 = 4*n_embd (swiglu: 8*n_embd/3 rounded up to 64)
    bias: bool | None = None
    tie_embeddings: bool | None = None
    logit_softcap: float | None = None  # cap*tanh(logits/cap); 0 = off
    recompute: str = "none"  # activations the backward recomputes: none, mlp (the activation's in/out) or block (all)
    # torch.compile the model's training and eval forward (fullgraph: every hot op is a torch.library
    # op, so the graph has no breaks); the first steps pay the compile: tens of seconds on a CPU
    compile: bool = False
    zero: int = 0  # 1 = ZeRO-1: each of W ranks keeps 1/W of the AdamW state (multi-process only)
    tp: int = 1  # tensor-parallel ranks per model (consecutive ranks: keep within a node); dp = W/tp
    bucket_mb: float = 25.0  # gradient bucket size; ~25 MB hides all-reduce latency (as DDP)
    dist_timeout_s: float = 300.0  # a collective waiting longer aborts the run; must exceed rank 0's checkpoint save


PRESETS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
    # ~0.8M params: learns byte-level Python structure in a few CPU minutes
    "quickstart": dict(n_layer=4, n_head=4, n_embd=128, block_size=128, vocab_multiple=64),
    # nanochat's block (parameter-free RMSNorm, RoPE + QK-norm, ReLU^2, no bias, untied) at the
    # quickstart's shape and cost, with GQA (2 query heads per K/V head) exercised too
    "modern-cpu": dict(n_layer=4, n_head=4, n_kv_head=2, n_embd=128, block_size=128, vocab_multiple=64,
                       norm="rmsnorm", norm_weight=False, pos="rope", qk_norm=True, mlp="relu2", bias=False,
                       tie_embeddings=False),
    # nanochat's d12 and d20 (width 64 * depth, head size 128, MHA, context 2048), for GPUs
    "modern-d12": dict(n_layer=12, n_head=6, n_embd=768, block_size=2048, norm="rmsnorm", norm_weight=False,
                       pos="rope", qk_norm=True, mlp="relu2", bias=False, tie_embeddings=False),
    "modern-d20": dict(n_layer=20, n_head=10, n_embd=1280, block_size=2048, norm="rmsnorm", norm_weight=False,
                       pos="rope", qk_norm=True, mlp="relu2", bias=False, tie_embeddings=False),
    # HuggingFaceTB/SmolLM2-135M's shape (its config.json); its 49152-token vocabulary comes from
    # the tokenizer (--tokenizer=hf:DIR), as every preset's does
    "smollm2-135m": dict(n_layer=30, n_head=9, n_kv_head=3, n_embd=576, block_size=2048, norm="rmsnorm",
                         norm_eps=1e-5, pos="rope", rope_theta=1e5, mlp="swiglu", mlp_hidden=1536, bias=False),
}


# TrainConfig fields that override the preset's ModelConfig field of the same name when given
BLOCK_CHOICES = ("norm", "norm_weight", "norm_eps", "pos", "rope_theta", "n_kv_head", "qk_norm", "mlp",
                 "mlp_hidden", "bias", "tie_embeddings", "logit_softcap")


def _parse_value(key, text, typ):
    try:
        if typ is bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ConfigError
            return text.lower() in ("true", "1")
        return typ(text)
    except ValueError:
        raise ConfigError(f"--{key}={text}: expected {typ.__name__}") from None


def _value_type(field):
    """The type a field's --key=value text is parsed to: `bool | None` (unset = the preset's) is bool."""
    typ = field.type if not isinstance(field.type, str) else eval(field.type)
    return next(t for t in typing.get_args(typ) if t is not type(None)) if typing.get_args(typ) else typ


# bare flags and the value they stand for
FLAGS = {"--resume": "--resume=latest", "--compile": "--compile=true"}


def parse_overrides(argv):
    """['--key=value', ...] -> {key: typed value}; unknown keys list the valid ones."""
    types = {f.name: _value_type(f) for f in fields(TrainConfig)}
    values = {}
    for arg in argv:
        arg = FLAGS.get(arg, arg)
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"argument {arg!r} is not of the form --key=value")
        key, text = arg[2:].split("=", 1)
        key = key.replace("-", "_")
        if key not in types:
            raise ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(types)}")
        values[key] = _parse_value(key, text, types[key])
    return values


def config_help():
    """`--key=default  comment` for every TrainConfig field, the comments read from this file's
    source (the one place they are written)."""
    import inspect
    comments, above = {}, []
    for line in inspect.getsource(TrainConfig).splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped[1:].strip())
            continue
        if m := re.match(r"(\w+): [^=]+=[^#]*(?:#\s*(.*))?$", stripped):
            comments[m.group(1)] = " ".join(above + [m.group(2) or ""]).strip()
        above = []
    comments["preset"] += ": " + ", ".join(
        f"{name} ({shape['n_layer']} layers x {shape['n_embd']} wide)" for name, shape in PRESETS.items())
    from nanolm.ops import backends  # only here: the config itself needs no kernels
    comments["kernels"] += (f"; backends: {', '.join(backends.BACKENDS)}; ops: {', '.join(backends.OPS)} "
                            "(python -m nanolm.info shows which runs where)")

    def shown(value):  # a default such as "\\n" as the escape one would type
        if value is None:
            return "preset"
        return value if not isinstance(value, str) or value.isprintable() else repr(value)
    rows = [(f"--{f.name}={shown(f.default)}", comments.get(f.name, "")) for f in fields(TrainConfig)]
    width = max(len(key) for key, _ in rows)
    return "\n".join(f"  {key:<{width}}  {text}".rstrip() for key, text in rows)


def parse_args(argv, defaults=None):
    """['--key=value', ...] -> a validated TrainConfig. `defaults` (a dict of TrainConfig
    fields, e.g. a resumed run's saved config) replaces the built-in defaults."""
    names = {f.name for f in fields(TrainConfig)}
    base = {k: v for k, v in (defaults or {}).items() if k in names}
    cfg = TrainConfig(**{**base, **parse_overrides(argv)})
    validate(cfg)
    return cfg


def model_config(cfg, vocab_size):
    """The model shape: preset, then any non-zero n_layer/n_head/n_embd/block_size override and
    any block choice given (norm, pos, ...: not None)."""
    if cfg.preset not in PRESETS:
        raise ConfigError(f"unknown preset {cfg.preset!r}; valid: {', '.join(PRESETS)}")
    kw = dict(PRESETS[cfg.preset], vocab_size=vocab_size, dropout=cfg.dropout)
    for k in ("n_layer", "n_head", "n_embd", "block_size"):
        if getattr(cfg, k):
            kw[k] = getattr(cfg, k)
    for k in BLOCK_CHOICES:
        if getattr(cfg, k) is not None:
            kw[k] = getattr(cfg, k)
    return ModelConfig(**kw)


def validate(cfg):
    for f in fields(TrainConfig):  # nan passes every comparison below, so it is caught first
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{f.name} must be a finite number, got {value}")
    positive = ("batch_size", "grad_accum", "max_steps", "eval_iters", "log_interval", "eval_interval",
                "keep_ckpts", "max_skipped_steps")
    for k in positive:
        if getattr(cfg, k) <= 0:
            raise ConfigError(f"{k} must be positive, got {getattr(cfg, k)}")
    for k in ("lr", "min_lr", "weight_decay", "grad_clip", "warmup", "peak_tflops", "sample_tokens",
              "n_layer", "n_head", "n_embd", "block_size", "ckpt_interval", "early_stop",
              "target_loss"):
        if getattr(cfg, k) < 0:
            raise ConfigError(f"{k} must be >= 0, got {getattr(cfg, k)}")
    if cfg.min_lr > cfg.lr:
        raise ConfigError(f"min_lr={cfg.min_lr} exceeds lr={cfg.lr}")
    for k in ("beta1", "beta2"):
        if not 0 <= getattr(cfg, k) < 1:
            raise ConfigError(f"{k} must be in [0, 1), got {getattr(cfg, k)}")
    if not 0 <= cfg.dropout < 1:
        raise ConfigError(f"dropout must be in [0, 1), got {cfg.dropout}")
    if cfg.tp < 1:
        raise ConfigError(f"tp must be >= 1, got {cfg.tp}")
    if cfg.zero not in (0, 1):
        raise ConfigError(f"zero must be 0 or 1, got {cfg.zero}")
    for k in ("bucket_mb", "dist_timeout_s"):
        if getattr(cfg, k) <= 0:
            raise ConfigError(f"{k} must be positive, got {getattr(cfg, k)}")
    if cfg.recompute not in ("none", "mlp", "block"):
        raise ConfigError(f"recompute must be none, mlp or block, got {cfg.recompute!r}")
    if cfg.device not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", cfg.device):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    if cfg.resume and cfg.init_from:
        raise ConfigError("--resume and --init_from exclude each other: --resume continues a run "
                          "(its weights, optimizer and data position), --init_from starts a new one "
                          "from weights")
    if cfg.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ConfigError(f"dtype must be auto, float32, bfloat16 or float16, got {cfg.dtype!r}")
    if cfg.optim not in ("adamw", "muon"):
        raise ConfigError(f"optim must be adamw or muon, got {cfg.optim!r}")
    if cfg.muon_ns not in ("polar_express", "classic"):
        raise ConfigError(f"muon_ns must be polar_express or classic, got {cfg.muon_ns!r}")
    if not 0 <= cfg.muon_momentum < 1:
        raise ConfigError(f"muon_momentum must be in [0, 1), got {cfg.muon_momentum}")
    if cfg.muon_lr < 0:
        raise ConfigError(f"muon_lr must be >= 0, got {cfg.muon_lr}")
    if cfg.loss_scale_window < 1:
        raise ConfigError(f"loss_scale_window must be >= 1, got {cfg.loss_scale_window}")
    mc = model_config(cfg, 256)
    if mc.n_head % cfg.tp:
        raise ConfigError(f"n_head={mc.n_head} is not divisible by tp={cfg.tp}")
    if mc.kv_heads % cfg.tp:  # each rank holds n_kv_head/tp K/V heads
        raise ConfigError(f"n_kv_head={mc.kv_heads} is not divisible by tp={cfg.tp} (the K/V heads are split "
                          "across the tensor-parallel ranks; replicating fewer is not implemented)")
    if mc.hidden % cfg.tp:
        raise ConfigError(f"the MLP's hidden width {mc.hidden} is not divisible by tp={cfg.tp} (set --mlp_hidden)")
    if mc.logit_softcap and cfg.tp > 1:
        raise ConfigError("logit_softcap > 0 with tp > 1: the vocab-parallel loss has no softcap")


def as_dict(cfg):
    return dataclasses.asdict(cfg)

"""Checkpoints: everything needed to continue a run bit-for-bit, saved atomically.

A checkpoint is one torch file `ckpt_<step>.pt` in the run dir holding
    {"model", "optimizer", "step", "config", "loader", "rng"}.
Saving writes a temp file in the same directory, flushes and fsyncs it, renames it over the
final name (os.replace is atomic on POSIX) and fsyncs the directory so the rename itself is
durable. A crash at any point leaves either the old set of checkpoints or the new one, never a
truncated file under a checkpoint's name. Retention keeps the newest `keep` checkpoints up to
the one just saved and never deletes a newer one; only files named ckpt_<digits>.pt are ever
deleted (a ckpt_best.pt or any other name is left alone).
A checkpoint whose weights or optimizer moments hold a NaN or inf is never written: it could
only replace a good one.

`ckpt_best.pt` (BEST) is a checkpoint of the same kind holding the step with the lowest val loss
so far, written the same way. Its name is outside the ckpt_<step>.pt pattern on purpose:
retention, `latest` and `--resume=RUN_DIR` never see it; pass its path to use it.

Everything saved is tensors and plain Python values, so loading uses weights_only=True.
A CRC-32 of every tensor's bytes is saved beside them ("crc32") and checked on load: torch.load
itself accepts a flipped bit inside tensor data. A checkpoint that cannot be read, or fails
the check, raises ValueError naming it and the previous checkpoint in its run dir. A model's
readers (training, sampling, evaluation, export) go through load_gpt, which also refuses, naming
it, a checkpoint that lacks a part they need (a weight of the model its config describes, the
config's model or tokenizer); a resume also needs the optimizer, loader and RNG states
(saved_run). One loaded onto a CUDA device on a machine without CUDA says so instead of calling
the file damaged.
"""
import dataclasses
import os
import random
import re
import zlib
from pathlib import Path

import numpy as np
import torch

_NAME = re.compile(r"^ckpt_(\d+)\.pt$")
BEST = "ckpt_best.pt"


def rng_state():
    """Torch CPU and current-CUDA-device, numpy and Python RNG states, as plain values. Only the
    current device: each process drives one GPU, and a checkpoint must load on a machine with
    fewer GPUs than the one that saved it."""
    name, key, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None,
            "numpy": [name, torch.from_numpy(key.astype(np.int64)), pos, has_gauss, gauss],
            "python": random.getstate()}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if isinstance(state["cuda"], torch.Tensor) and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    name, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def step_of(path):
    """The step in a ckpt_<step>.pt name, or None for any other name."""
    m = _NAME.match(Path(path).name)
    return int(m.group(1)) if m else None


def checkpoints(run_dir):
    """Paths of the complete checkpoints in run_dir, oldest step first."""
    found = sorted((step_of(p), p) for p in Path(run_dir).glob("ckpt_*.pt") if step_of(p) is not None)
    return [p for _, p in found]


def latest(run_dir):
    """The newest checkpoint in run_dir, or None."""
    found = checkpoints(run_dir) if Path(run_dir).is_dir() else []
    return found[-1] if found else None


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tensors_crc32(tree, crc=0):
    """CRC-32 over the bytes of every tensor in a nested dict/list, in order."""
    items = tree.values() if isinstance(tree, dict) else tree
    for value in items:
        if isinstance(value, (dict, list, tuple)):
            crc = tensors_crc32(value, crc)
        elif isinstance(value, torch.Tensor):
            data = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            crc = zlib.crc32(data, crc)
    return crc


def non_finite(state, prefix=""):
    """Name of the first floating-point tensor in a (nested) state dict holding a NaN or inf,
    or None."""
    items = state.items() if isinstance(state, dict) else enumerate(state)
    for key, value in items:
        name = f"{prefix}{key}"
        if isinstance(value, (dict, list, tuple)):
            found = non_finite(value, name + ".")
            if found:
                return found
        elif isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(value.isfinite().all()):
            return name
    return None


def save(run_dir, step, model_state, optimizer_state, config, loader_state, keep=3, best=None,
         as_best=False):
    """Write ckpt_<step>.pt atomically (RNG states captured here) and keep the newest `keep`
    (keep=None keeps all). Returns the path. Raises ValueError, writing nothing, if a weight or
    optimizer tensor is not finite. `best` (the training loop's record of the lowest val loss,
    for early stopping) is saved with it; as_best=True writes ckpt_best.pt instead and deletes
    nothing."""
    bad = non_finite(model_state) or non_finite(optimizer_state, "optimizer.")
    if bad:
        raise ValueError(f"not saving checkpoint at step {step}: {bad} holds non-finite values")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / (BEST if as_best else f"ckpt_{step:08d}.pt")
    tmp = run_dir / f".{final.name}.tmp{os.getpid()}"
    payload = {"model": model_state, "optimizer": optimizer_state, "step": step,
               "config": config, "loader": loader_state, "rng": rng_state()}
    if best is not None:
        payload["best"] = best
    payload["crc32"] = tensors_crc32(payload)
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except RuntimeError as e:  # torch.save turns a failed write (a full disk) into RuntimeError
        if isinstance(e.__context__, OSError):
            raise OSError(e.__context__.errno, f"{e.__context__.strerror} (writing a checkpoint)",
                          str(final)) from e
        raise
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(run_dir)
    if keep is not None and not as_best:
        prune(run_dir, keep, step)
    return final


def prune(run_dir, keep, newest):
    """Of the checkpoints up to step `newest` (the one just saved), delete all but the newest
    `keep`; later ones (another branch's, see nanolm.train.set_aside_future) are never touched.
    Also deletes temp files left by crashed saves."""
    candidates = [p for p in checkpoints(run_dir) if step_of(p) <= newest]
    for old in candidates[:-keep] if keep > 0 else []:
        old.unlink()
    for stale in Path(run_dir).glob(".ckpt_*.pt.tmp*"):
        stale.unlink(missing_ok=True)


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(saved, expected):
    """Lines 'field: checkpoint X, current Y' for every field of `expected` (nested dicts
    compared by dotted path) that the saved config lacks or holds with another value."""
    saved, expected = _flatten(saved), _flatten(expected)
    missing = object()
    return [f"{k}: checkpoint {saved.get(k, '<missing>')!r}, current {v!r}"
            for k, v in expected.items() if saved.get(k, missing) != v]


def _missing(ckpt, keys):
    """The first dotted key of `keys` ('config.model', ...) absent from a checkpoint, or None."""
    for key in keys:
        node = ckpt
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return key
            node = node[part]
    return None


# what every reader of a checkpoint needs, and what a resume needs on top
REQUIRED = ("model", "step", "config.model", "config.tokenizer")
RESUME_REQUIRED = ("optimizer", "loader.train", "rng")


def read(path, map_location="cpu", mmap=False):
    """torch.load of a checkpoint file; an unreadable or corrupt one (checked against its
    CRC-32 unless mmap, which reads no tensor data) raises ValueError naming it and the
    previous checkpoint in its run dir."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such checkpoint file")
    device = torch.device(map_location)
    if device.type == "cuda" and not torch.cuda.is_available():  # torch.load's error reads like damage
        raise ValueError(f"cannot load {path} onto {device}: CUDA is not available here "
                         f"(the file itself was not read; use the cpu device)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        damaged = not mmap and "crc32" in ckpt and ckpt["crc32"] != tensors_crc32(
            {k: v for k, v in ckpt.items() if k != "crc32"})
        reason = "its tensors fail their CRC-32 check" if damaged else None
    except Exception as e:  # torch reports a damaged zip or pickle under many exception types
        reason = f"{type(e).__name__}: {str(e).splitlines()[0]}"
    if reason:
        step = step_of(path)
        older = [p for p in checkpoints(path.parent) if step is not None and step_of(p) < step]
        hint = f"; resume from the previous one: --resume={older[-1]}" if older else ""
        raise ValueError(f"{path} is damaged and cannot be loaded ({reason}){hint}")
    return ckpt


def saved_run(path):
    """(config, train loader state) stored in a checkpoint file, read without loading its
    tensors (mmap). Only a resume reads it: a checkpoint without the RESUME_REQUIRED state (a
    weights-only one, such as `nanolm.hf import` writes) raises ValueError."""
    ckpt = read(path, mmap=True)
    missing = _missing(ckpt, REQUIRED + RESUME_REQUIRED)
    if missing:
        raise ValueError(f"{path} holds no {missing!r}, which a resume needs (a weights-only "
                         f"checkpoint?): start a new run from its weights with --init_from={path}")
    return ckpt["config"], ckpt["loader"]["train"]


def weight_diff(state, model_config):
    """Lines naming every tensor of a state dict that the GPT of `model_config` (a ModelConfig)
    lacks, has in addition, or has in another shape; the model is built on the meta device
    (shapes only, no memory)."""
    from nanolm.model import GPT
    from nanolm.ops import backends
    with torch.device("meta"):
        model = GPT(model_config, backends.resolve("torch", torch.device("cpu")))
    want = {k: getattr(v, "shape", None) for k, v in model.state_dict().items()}
    got = {k: getattr(v, "shape", None) for k, v in state.items()}
    diff = [f"{k}: in the config's model, missing from the weights" for k in want if k not in got]
    diff += [f"{k}: in the weights, not in the config's model" for k in got if k not in want]
    diff += [f"{k}: weights {tuple(got[k])}, config {tuple(want[k])}" for k in want
             if k in got and want[k] is not None and got[k] != want[k]]
    return diff


def check_weights(path, ckpt):
    """ValueError naming the checkpoint and each difference if its weights are not those of
    the model its own config describes (a missing or reshaped tensor, or a config that builds
    no model)."""
    from nanolm.config import ModelConfig
    try:
        model_config = ModelConfig(**ckpt["config"]["model"])
        diff = weight_diff(ckpt["model"], model_config)
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise ValueError(f"{path}: its config.model does not describe a model ({e})") from None
    if diff:
        raise ValueError(f"{path}: its weights do not match the model its config describes:\n  "
                         + "\n  ".join(diff))


def load(path, map_location="cpu", model_config=None):
    """Load a checkpoint file (or the latest one in a run dir). With model_config (a dict laid
    out like the saved config, holding only the fields that shape the model), a mismatch
    raises ValueError listing every differing field."""
    path = Path(path)
    if path.is_dir():
        found = latest(path)
        if found is None:
            raise ValueError(f"no checkpoint (ckpt_*.pt) in {path}")
        path = found
    ckpt = read(path, map_location)
    if model_config is not None:
        refuse_other_model(path, ckpt, model_config)
    return ckpt


def refuse_other_model(path, ckpt, model_config):
    """ValueError listing every field of model_config the checkpoint's config holds otherwise. A
    block choice the checkpoint predates (norm, pos, ...; not bias, saved from the start) counts
    as its default: GPT-2's."""
    saved = ckpt["config"]
    if isinstance(saved.get("model"), dict):
        from nanolm.config import BLOCK_CHOICES, ModelConfig
        defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.name in BLOCK_CHOICES}
        defaults.pop("bias")
        saved = {**saved, "model": {**defaults, **saved["model"]}}
    diff = config_diff(saved, model_config)
    if diff:
        raise ValueError(f"{path} was saved with a different model config:\n  " + "\n  ".join(diff))


def load_gpt(path, map_location="cpu", model_config=None):
    """load() of a nanolm model's checkpoint, for the code that builds the model from it: one
    without the REQUIRED parts, or whose weights are not those of the model its config
    describes, raises ValueError naming it and what is missing."""
    ckpt = load(path, map_location)
    path = latest(path) if Path(path).is_dir() else path
    missing = _missing(ckpt, REQUIRED)
    if missing:
        raise ValueError(f"{path} holds no {missing!r}: not a nanolm model checkpoint")
    if model_config is not None:
        refuse_other_model(path, ckpt, model_config)
    check_weights(path, ckpt)
    return ckpt

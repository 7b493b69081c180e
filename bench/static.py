"""`python -m bench static`: the compiled form of every kernel, for sm_80 and sm_90a, no GPU needed.

Triton: each kernel's launches are captured from the backend's own launchers (the kernel object
is swapped for a recorder while the launcher runs on small CPU tensors), so the arguments,
constexprs, warps and stages are exactly what training would launch; an autotuned kernel
expands to every config its prune hook keeps for that launch on that arch (the attention
configs differ on sm_8x). Each launch is specialised as Triton's JIT does
(`native_specialize_impl`: 16-byte aligned pointers, integers divisible by 16, integers equal to
1) and compiled with `triton.compile(ASTSource(...), target=GPUTarget("cuda", 80|90, 32))`.
CUDA: csrc/*.cu through `nvcc -cubin -Xptxas -v`, with setup.py's flags.

Per kernel, configuration and arch: registers and spill bytes (the ptxas log), shared memory
(Triton: the compiled metadata; CUDA: static __shared__ only, dynamic is set at launch), static
occupancy (below) and which SASS instructions appear (the `cuobjdump` bundled with Triton):
HMMA (mma.sync), HGMMA (wgmma), LDSM (ldmatrix), LDGSTS (cp.async), LDG128 (128-bit global
loads), UTMALDG (TMA loads).

Static occupancy, as the CUDA occupancy calculator counts it (sm_80 and sm_90 alike: 64K
registers, 64 warps, 32 blocks per SM, registers allocated per warp in units of 256, 1 KB of
shared memory reserved per block): blocks/SM = min(64 / warps, (65536 / regs_per_warp) / warps,
smem_per_SM / (smem + 1 KB), 32). CUDA kernels pick their block size at launch, so their
occupancy is not reported.

Production configurations (`--production`, and the CI gate `--check`): what a GPT-2 preset trains
with on a GPU: bf16, widths 768..1600, head size 64 (GPT-2) and 128, vocabulary 50304, with
and without dropout, and the vocabulary-parallel cross-entropy of --tp=2 (shards of 25152). The gate
fails on a production configuration that does not compile, needs more shared memory than a
block may have, or spills on sm_90a. Results are cached under ~/.cache/nanolm/static (keyed by
Triton version, kernel source, specialisation and options), so a rerun compiles only what
changed.
"""
import argparse
import contextlib
import hashlib
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("NANOLM_STATIC_CACHE", Path.home() / ".cache" / "nanolm" / "static"))

# Per-SM limits (CUDA C Programming Guide, compute capability table; identical on 8.0 and 9.0
# except shared memory).
REGS_PER_SM, MAX_WARPS_PER_SM, MAX_BLOCKS_PER_SM = 65536, 64, 32
REG_UNIT, RESERVED_SMEM_PER_BLOCK = 256, 1024
ARCHS = {  # name: (capability, shared memory per SM, the most one block may have)
    "sm_80": (80, 164 * 1024, 163 * 1024),
    "sm_90a": (90, 228 * 1024, 227 * 1024),
}
SASS_FEATURES = {
    "HMMA": r"\bHMMA\.", "HGMMA": r"\bHGMMA\.", "LDSM": r"\bLDSM\.", "LDGSTS": r"\bLDGSTS\.",
    "LDG128": r"\bLDG\.E(\.[A-Z0-9_]+)*\.128\b", "UTMALDG": r"\bUTMALDG\b",
}


def occupancy(regs, smem, num_warps, arch):
    """(blocks per SM, resident warps per SM) for a block of num_warps warps."""
    _, smem_per_sm, _ = ARCHS[arch]
    regs_per_warp = math.ceil(max(regs, 1) * 32 / REG_UNIT) * REG_UNIT
    blocks = min(MAX_WARPS_PER_SM // num_warps, (REGS_PER_SM // regs_per_warp) // num_warps,
                 smem_per_sm // (smem + RESERVED_SMEM_PER_BLOCK), MAX_BLOCKS_PER_SM)
    return blocks, blocks * num_warps


def parse_ptxas_log(log):
    """{function name: {regs, spill_stores, spill_loads, stack, smem}} from `ptxas -v` output."""
    out, name = {}, None
    for line in log.splitlines():
        m = re.search(r"(?:Compiling entry function|Function properties for) '?([\w$.]+)'?", line)
        if m:
            name = m.group(1)
            out.setdefault(name, {"regs": 0, "spill_stores": 0, "spill_loads": 0, "stack": 0, "smem": 0})
            continue
        if name is None:
            continue
        r = out[name]
        if m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line):
            r["stack"], r["spill_stores"], r["spill_loads"] = map(int, m.groups())
        if m := re.search(r"Used (\d+) registers", line):
            r["regs"] = int(m.group(1))
            if s := re.search(r"(\d+) bytes smem", line):
                r["smem"] = int(s.group(1))
    return out


def sass_features(cubin_path):
    import triton
    sass = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "--dump-sass", str(cubin_path)],
                          capture_output=True, text=True, check=True).stdout
    return sorted(k for k, pattern in SASS_FEATURES.items() if re.search(pattern, sass))


# ----------------------------------------------------------------------------- Triton launches

@dataclass
class Launch:
    """One compile: a kernel specialised as the JIT would for one captured launch and config."""
    module: str            # nanolm.kernels.<op>, where the kernel is found again in a worker
    kernel: str            # the @triton.jit function's name
    case: str              # the shape and dtype the launch was captured at
    config: str            # the launcher's or autotuner's block sizes, warps, stages
    production: bool
    signature: dict        # argument name -> Triton type ("*bf16", "i32", "constexpr", ...)
    constexprs: dict       # argument name -> value
    attrs: dict            # (argument index,) -> [["tt.divisibility", 16]]
    num_warps: int
    num_stages: int
    source_key: str = ""   # the kernel's source hash (JITFunction.cache_key)


class _Recorder:
    """Stands in for a kernel (or an autotuner) inside a launcher: records each launch."""

    def __init__(self, kernel):
        from triton.runtime.jit import JITFunction
        self.kernel = kernel
        self.fn = kernel if isinstance(kernel, JITFunction) else kernel.fn  # an Autotuner wraps it as .fn
        self.calls = []  # (args, kwargs, the autotune configs left for them, or [None])

    def __getitem__(self, grid):
        return self._record

    def _record(self, *args, **kwargs):
        configs = getattr(self.kernel, "configs", None) or [None]
        prune = getattr(self.kernel, "early_config_prune", None)
        if prune is not None:  # as the autotuner would for these arguments
            configs = prune(configs, dict(zip(self.fn.arg_names, args)), **kwargs)
        self.calls.append((args, kwargs, configs))


def _specialise(fn, values):
    """(signature, constexprs, attrs) as Triton's JIT derives them from the argument values."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        value = values[p.name]
        if p.is_constexpr:
            signature[p.name], constexprs[p.name] = "constexpr", value
            continue
        ty, key = native_specialize_impl(BaseBackend, value, False, not p.do_not_specialize,
                                         not p.do_not_specialize_on_alignment)
        if ty == "constexpr":  # an integer equal to 1
            signature[p.name], constexprs[p.name] = "constexpr", key
            continue
        signature[p.name] = ty
        if isinstance(key, str) and "D" in key:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def _capture(module, names, case, production, run):
    """Runs run() (which calls module's launchers) with module.<names> swapped for recorders;
    returns one Launch per recorded launch and autotune config."""
    saved = {n: getattr(module, n) for n in names}
    recorders = [_Recorder(k) for k in saved.values()]
    try:
        for n, r in zip(names, recorders):
            setattr(module, n, r)
        run()
    finally:
        for n, k in saved.items():
            setattr(module, n, k)
    out = []
    for r in recorders:
        for args, kwargs, configs in r.calls:
            for cfg in configs:
                meta = dict(kwargs)
                if cfg is not None:
                    meta.update(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
                num_warps, num_stages = meta.pop("num_warps", 4), meta.pop("num_stages", 3)
                sig, consts, attrs = _specialise(r.fn, {**dict(zip(r.fn.arg_names, args)), **meta})
                label = " ".join([f"+{k.removeprefix('HAS_').lower()}" for k, v in meta.items()
                                  if (k.startswith("HAS_") or k in ("DROPOUT", "RMS")) and v]
                                 + [f"{k}={v}" for k, v in meta.items() if k.startswith("BLOCK") or k == "ROWS"])
                out.append(Launch(module.__name__, r.fn.__name__, case, f"{label} w{num_warps} s{num_stages}",
                                  production, sig, consts, attrs, num_warps, num_stages, r.fn.cache_key))
    return out


def _dropout_args():
    """The kernels' dropout arguments as training passes them at p = 0.1: the seed of a rank > 0
    (rank in the high word: an i64, the wider of the JIT's two specialisations; rank 0's fits i32)."""
    from nanolm.model import DropoutStream
    from nanolm.ops.dropout import dropout, kernel_args
    return kernel_args(dropout(0.1, DropoutStream.dropout_seed(1337, 1), 1000))


def _layernorm_launches(dtype, C, production):
    import torch

    from nanolm.kernels import layernorm
    N = 4096
    x, r = torch.randn(N, C, dtype=dtype), torch.randn(N, C, dtype=dtype)
    w, b = torch.ones(C, dtype=dtype), torch.zeros(C, dtype=dtype)
    mean, rstd = torch.zeros(N), torch.ones(N)
    drop = _dropout_args()

    def run():
        layernorm.layernorm_fwd(x, None, w, b, 1e-5, None)
        layernorm.layernorm_fwd(x, r, w, b, 1e-5, None)
        layernorm.layernorm_fwd(x, r, w, b, 1e-5, drop)  # add + layernorm, the branch dropped
        layernorm.layernorm_bwd(x, x, w, mean, rstd, None, None, None)
        layernorm.layernorm_bwd(x, x, w, mean, rstd, r, None, None)
        layernorm.layernorm_bwd(x, x, w, mean, rstd, r, torch.empty_like(x), drop)
        # RMSNorm, the RMS instantiations: add + RMSNorm with a weight, and parameter-free
        layernorm.layernorm_fwd(x, r, w, None, 1e-5, drop, rms=True)
        layernorm.layernorm_fwd(x, None, None, None, 1e-5, None, rms=True)
        layernorm.layernorm_bwd(x, x, w, None, rstd, r, torch.empty_like(x), drop, rms=True)
        layernorm.layernorm_bwd(x, x, None, None, rstd, None, None, None, rms=True)
    names = ["layernorm_fwd_kernel", "layernorm_bwd_kernel", "layernorm_bwd_reduce_kernel"]
    return _capture(layernorm, names, f"{_name(dtype)} N={N} C={C}", production, run)


def _cross_entropy_launches(dtype, Vp, V, production):
    import torch

    from nanolm.kernels import cross_entropy
    logits, targets = torch.randn(16, Vp, dtype=dtype), torch.randint(0, V, (16,))
    return _capture(cross_entropy, ["cross_entropy_fwd_kernel"], f"{_name(dtype)} Vp={Vp} V={V}", production,
                    lambda: cross_entropy.cross_entropy_fwd(logits, targets, V, -100, 1e-4, 1.0, True))


def _cross_entropy_shard_launches(dtype, Vp, vocab_start, V, production):
    """The vocabulary-parallel pair on one rank's shard: columns [vocab_start, vocab_start + Vp),
    the first V real."""
    import torch

    from nanolm.kernels import cross_entropy
    logits, targets = torch.randn(16, Vp, dtype=dtype), torch.randint(0, vocab_start + V, (16,))
    lse = torch.zeros(16)

    def run():
        cross_entropy.cross_entropy_stats(logits, targets, vocab_start, V)
        cross_entropy.cross_entropy_grad(logits, targets, lse, vocab_start, V, -100, 1e-4, 1.0)
    return _capture(cross_entropy, ["cross_entropy_stats_kernel", "cross_entropy_grad_kernel"],
                    f"{_name(dtype)} shard Vp={Vp} start={vocab_start} V={V}", production, run)


def _attention_launches(dtype, hs, production):
    import torch

    from nanolm.kernels import attention
    B, T, nh = 2, 1024, 1024 // hs
    qkv = torch.randn(B, T, 3, nh, hs, dtype=dtype)  # q, k, v: the model's views into it
    q, k, v = qkv.unbind(2)
    o, lse = torch.randn(B, T, nh, hs, dtype=dtype), torch.zeros(B, nh, T)
    dq, dk, dv = torch.empty_like(qkv).unbind(2)
    drop = _dropout_args()

    def run():
        for dropout_args in (None, drop):
            attention.attention_fwd(q, k, v, hs ** -0.5, dropout_args)
            attention.attention_bwd(o, q, k, v, o, lse, hs ** -0.5, dq, dk, dv, dropout_args)
    names = ["_fwd_kernel", "attention_bwd_delta_kernel", "_dkdv_kernel", "_dq_kernel"]
    return _capture(attention, names, f"{_name(dtype)} T={T} hs={hs}", production, run)


def _adamw_launches(offset, production):
    import torch

    from nanolm.ops.adamw import adamw_scalars
    from nanolm.kernels import adamw
    n = 1 << 20
    p, g, m, v = (t[offset:offset + n] for t in torch.zeros(4, n + 1))

    def run():
        adamw.adamw_step(p, g, m, v, n // 2, adamw_scalars(1e-3, 0.9, 0.95, 1e-8, 0.1, 10, 1.0))
        adamw.sum_of_squares(g)
    case = "fp32 flat buffer" + (" (ZeRO shard at an unaligned offset)" if offset % 4 else "")
    names = ["adamw_step_kernel", "sum_of_squares_partials_kernel", "sum_of_squares_final_kernel"]
    return _capture(adamw, names, case, production, run)


def _name(dtype):
    return str(dtype).replace("torch.", "").replace("float", "fp").replace("bfp", "bf")


@contextlib.contextmanager
def _as_arch(arch):
    """The attention autotuners' prune hooks see a device of arch's compute capability (their
    configs differ on sm_8x, kernels/attention.py)."""
    from nanolm.kernels import attention
    saved = attention.device_capability
    attention.device_capability = lambda device: divmod(ARCHS[arch][0], 10)
    try:
        yield
    finally:
        attention.device_capability = saved


def triton_launches(production_only=False, arch="sm_90a"):
    """Every launch the triton backend makes on a GPU. Production: what the GPT-2 presets train
    with (bf16, C 768..1600, head size 64; 128 as well; with and without dropout; the
    vocabulary-parallel cross-entropy of --tp=2); the rest: the other dtypes, head sizes and
    widths the backend accepts. Autotuned kernels expand to the configs their prune hooks keep
    on arch."""
    with _as_arch(arch):
        out = _all_launches(production_only)
    unique = {}
    for launch in out:  # e.g. the layernorm reduce kernel is the same compile at every width
        unique.setdefault(_cache_key(launch, ""), launch)
    return list(unique.values())


def _all_launches(production_only):
    import torch
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    out = (_layernorm_launches(bf16, 768, True) + _layernorm_launches(bf16, 1600, True)
           + _cross_entropy_launches(bf16, 50304, 50257, True)
           # --tp=2: the two shards of 50304 columns, the second with the 47 padding columns
           + _cross_entropy_shard_launches(bf16, 25152, 0, 25152, True)
           + _cross_entropy_shard_launches(bf16, 25152, 25152, 25105, True)
           + _attention_launches(bf16, 64, True) + _attention_launches(bf16, 128, True)
           + _adamw_launches(0, True))
    if not production_only:
        for dtype in (fp16, fp32):
            out += [launch for C in (128, 777, 16384) for launch in _layernorm_launches(dtype, C, False)]
            out += _cross_entropy_launches(dtype, 50257, 50257, False)
            out += _cross_entropy_shard_launches(dtype, 12565, 37695, 12562, False)  # last of --tp=4, V 50257
        for dtype, hs in ((bf16, 16), (bf16, 32), (fp16, 64), (fp16, 128)):
            out += _attention_launches(dtype, hs, False)
        out += _adamw_launches(1, False)
    return out


def _cache_key(launch, arch):
    import triton
    text = repr((triton.__version__, launch.source_key, launch.kernel, sorted(launch.signature.items()),
                 sorted(launch.constexprs.items()), sorted(launch.attrs.items()), launch.num_warps,
                 launch.num_stages, arch))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def compile_triton(launch, arch):
    """Compiles one launch for arch; returns its report row."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    fn = getattr(importlib.import_module(launch.module), launch.kernel)
    row = {"kind": "triton", "kernel": launch.kernel, "case": launch.case, "config": launch.config,
           "arch": arch, "production": launch.production, "num_warps": launch.num_warps}
    triton.knobs.nvidia.dump_ptxas_log = True   # printed to stdout: captured below
    triton.knobs.compilation.always_compile = True  # a Triton cache hit would skip ptxas and its log
    log = io.StringIO()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            src = ASTSource(fn, launch.signature, launch.constexprs, launch.attrs)
            kernel = triton.compile(src, target=GPUTarget("cuda", ARCHS[arch][0], 32),
                                    options={"num_warps": launch.num_warps, "num_stages": launch.num_stages,
                                             "enable_fp_fusion": True})  # the JIT's default
    except Exception as e:  # reported, and the gate fails on it
        return {**row, "status": f"compile error: {type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}"}
    row["compile_s"] = round(time.perf_counter() - t0, 2)
    stats = parse_ptxas_log(log.getvalue()).get(kernel.name, {})
    row.update(regs=stats.get("regs"), spill_stores=stats.get("spill_stores"),
               spill_loads=stats.get("spill_loads"), smem=kernel.metadata.shared)
    row["blocks_per_sm"], row["warps_per_sm"] = occupancy(row["regs"] or 0, row["smem"], launch.num_warps, arch)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(kernel.asm["cubin"])
        row["sass"] = sass_features(path)
    row["status"] = "ok" if row["regs"] is not None else "no ptxas log"
    return row


def _compile_cached(job):
    launch, arch = job
    path = CACHE / f"{_cache_key(launch, arch)}.json"
    if path.exists():  # the compile is the same; the labels are this launch's
        return {**json.loads(path.read_text()), "case": launch.case, "config": launch.config,
                "production": launch.production}
    row = compile_triton(launch, arch)
    if row["status"] == "ok":
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(row))
        os.replace(tmp, path)
    return row


# ----------------------------------------------------------------------------- CUDA kernels

def find_nvcc():
    """nvcc from $CUDA_HOME, the PATH, or /usr/local/cuda (as setup.py looks for it), or None."""
    for candidate in (os.environ.get("CUDA_HOME") and Path(os.environ["CUDA_HOME"]) / "bin" / "nvcc",
                      shutil.which("nvcc"), Path("/usr/local/cuda/bin/nvcc")):
        if candidate and Path(candidate).exists():
            return Path(candidate)
    return None


def cuda_rows(archs):
    """csrc/*.cu through nvcc -Xptxas -v, one cubin per file and arch; a row per kernel."""
    nvcc = find_nvcc()
    if nvcc is None:
        return [{"kind": "cuda", "kernel": "*", "status": "skipped: no nvcc found"}]
    return [row for src in sorted((ROOT / "csrc").glob("*.cu")) for arch in archs
            for row in _cuda_file_rows(nvcc, src, arch)]


def _cuda_file_rows(nvcc, src, arch):
    num = arch.replace("sm_", "")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cmd = [str(nvcc), "-O3", "-std=c++17", "-lineinfo", "--expt-relaxed-constexpr", "-DNANOLM_WITH_CUDA=1",
               f"-I{ROOT / 'csrc'}", f"-gencode=arch=compute_{num},code=sm_{num}", "-cubin", "-Xptxas", "-v",
               str(src), "-o", str(cubin)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            return [{"kind": "cuda", "kernel": src.name, "arch": arch, "production": True,
                     "status": f"compile error: {result.stderr.strip().splitlines()[-1][:300]}"}]
        stats = parse_ptxas_log(result.stdout + result.stderr)
        import triton
        sass = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "--dump-sass", str(cubin)],
                              capture_output=True, text=True, check=True).stdout
    per_function = dict(re.findall(r"Function : (\S+)\n(.*?)(?=\n\s*Function : |\Z)", sass, re.S))
    names = _demangle(list(stats))
    rows = []
    for mangled, s in stats.items():
        if not s["regs"] and mangled not in per_function:
            continue  # a device function's properties, not a kernel
        body = per_function.get(mangled, "")
        m = re.search(r"(\w+)(<[^()]*>)?\(", names[mangled])  # name<template args>(
        kernel, template = (m.group(1), m.group(2) or "") if m else (mangled, "")
        rows.append({"kind": "cuda", "kernel": kernel, "case": src.name, "config": template, "arch": arch,
                     "production": True,
                     "regs": s["regs"], "spill_stores": s["spill_stores"], "spill_loads": s["spill_loads"],
                     "smem": s["smem"], "blocks_per_sm": None, "warps_per_sm": None,
                     "sass": sorted(k for k, p in SASS_FEATURES.items() if re.search(p, body)), "status": "ok"})
    return rows


def _demangle(names):
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True,
                             check=True).stdout.splitlines()
        return dict(zip(names, out))
    except (OSError, subprocess.CalledProcessError):
        return {n: n for n in names}


# ----------------------------------------------------------------------------- report and gate

def gate_failures(rows):
    """Production Triton rows that fail CI: no compile, shared memory over a block's limit, or
    spills on sm_90a. CUDA rows are reported, not gated (csrc/ has its own checks)."""
    bad = []
    for r in rows:
        if r["kind"] != "triton" or not r["production"]:
            continue
        what = f"{r['kernel']} [{r.get('case', '')}; {r.get('config', '')}] on {r.get('arch')}"
        if r["status"] != "ok":
            bad.append(f"{what}: {r['status']}")
        elif r["smem"] > ARCHS[r["arch"]][2]:
            bad.append(f"{what}: {r['smem']} B of shared memory, over the {ARCHS[r['arch']][2]} B a block may have")
        elif r["arch"] == "sm_90a" and r["spill_stores"]:
            bad.append(f"{what}: spills {r['spill_stores']} B ({r['regs']} registers)")
    return bad


def format_table(rows):
    head = ("kernel", "case", "config", "arch", "regs", "spill st/ld B", "smem B", "blocks/SM (warps)", "SASS")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['kernel']} | {r.get('case', '')} | {r.get('config', '')} | {r.get('arch', '')} | "
                         f"{r['status']} |||||")
            continue
        occ = "-" if r["blocks_per_sm"] is None else f"{r['blocks_per_sm']} ({r['warps_per_sm']}/64)"
        lines.append(f"| {r['kernel']} | {r['case']} | {r['config']} | {r['arch']} | {r['regs']} | "
                     f"{r['spill_stores']}/{r['spill_loads']} | {r['smem']} | {occ} | {' '.join(r['sass'])} |")
    return "\n".join(lines)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench static", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="sm_80,sm_90a", help="comma-separated, of: " + ", ".join(ARCHS))
    p.add_argument("--production", action="store_true", help="only the production configurations")
    p.add_argument("--kernels", default="", help="only kernels whose name contains one of these (comma-separated)")
    p.add_argument("--no-cuda", action="store_true", help="skip the CUDA kernels (nvcc)")
    p.add_argument("--jobs", type=int, default=os.cpu_count(), help="parallel compiles (default: CPUs)")
    p.add_argument("--out", default="bench_out", help="folder for static.json and static.md")
    p.add_argument("--check", action="store_true",
                   help="exit 1 if a production configuration fails to compile, exceeds shared memory, "
                        "or spills on sm_90a")
    args = p.parse_args(argv)
    args.arch = [a for a in args.arch.split(",") if a]
    unknown = [a for a in args.arch if a not in ARCHS]
    if unknown:
        p.error(f"unknown arch {unknown}; valid: {', '.join(ARCHS)}")
    args.kernels = [k for k in args.kernels.split(",") if k]
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("bench static compiles for a GPU: unset TRITON_INTERPRET")
    import triton
    t0 = time.perf_counter()
    jobs = [(launch, arch) for arch in args.arch for launch in triton_launches(args.production, arch)
            if not args.kernels or any(k in launch.kernel for k in args.kernels)]
    print(f"compiling {len(jobs)} Triton kernel configurations with {args.jobs} processes "
          f"(triton {triton.__version__})", file=sys.stderr, flush=True)
    rows, stopped = [], False
    with ProcessPoolExecutor(args.jobs) if args.jobs > 1 else contextlib.nullcontext() as pool:
        try:  # a progress line as compiles finish; Ctrl-C keeps (and writes) what is done
            for row in (pool.map if pool else map)(_compile_cached, jobs):
                rows.append(row)
                print(f"\r  compiled {len(rows)}/{len(jobs)} ({time.perf_counter() - t0:.0f} s)", end="",
                      file=sys.stderr, flush=True)
        except KeyboardInterrupt:
            stopped = True
            if pool:
                pool.shutdown(cancel_futures=True)
        print(file=sys.stderr)
    if not args.no_cuda and not stopped:
        rows += [r for r in cuda_rows(args.arch) if not args.kernels or any(k in r["kernel"] for k in args.kernels)]
    table = format_table(rows)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    env = {"triton": triton.__version__, "ptxas": triton.knobs.nvidia.ptxas.version,
           "seconds": round(time.perf_counter() - t0, 1), "complete": not stopped}
    Path(args.out, "static.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    Path(args.out, "static.md").write_text(table + "\n")
    if stopped:
        print(f"stopped after {len(rows)} of {len(jobs)} Triton compiles: wrote them to {args.out}/static.json "
              f"and static.md (marked incomplete); finished compiles are cached, so a rerun goes on from "
              f"there", file=sys.stderr)
        return 130
    bad = gate_failures(rows)
    for b in bad:
        print("GATE FAILED: " + b, file=sys.stderr)
    print(f"{len(rows)} rows in {env['seconds']} s; wrote {args.out}/static.json and static.md", file=sys.stderr)
    return 1 if args.check and bad else 0

"""The precision a run trains in: what `--dtype` resolves to, and the CPU facts `auto` reads.

On a GPU `auto` is bf16 autocast. On a CPU it is decided once per machine from the instruction
set /proc/cpuinfo lists, never from a timing: a 0.1 s bf16-vs-fp32 matmul probe gave 1.9x, 2.2x,
6.5x, 7.9x, 10.1x and 23.2x on one AMX Xeon within an hour (other jobs on its 2 cores), so a run's
precision depended on the load in its first tenth of a second. The rule follows what torch's CPU
matmuls (oneDNN) measured on this project's machines, bf16 against fp32:

    CPU (/proc/cpuinfo)                                bf16 matmuls     auto
    amx_bf16 + amx_tile, and Linux grants AMX tiles    several times    bfloat16
    AMD with avx512_bf16 (AMD EPYC)                    4.5-5x           bfloat16
    avx512_bf16 without AMX, not AMD (Intel Xeon)      0.53x            float32
    no avx512_bf16 or AMX (bf16 only emulated)         slower           float32

`--dtype=float32|bfloat16|float16` forces one. The choice and its reason are saved in the run's
config, so a resume keeps the precision it started with (on any machine) and says so.
"""
import ctypes
import dataclasses
import platform
import sys

import torch

CPUINFO = "/proc/cpuinfo"
AMX_FLAGS = ("amx_bf16", "amx_tile")  # the bf16 tile multiply and the tile registers it needs
SAVED = "saved with the run"


@dataclasses.dataclass(frozen=True)
class CpuInfo:
    vendor: str  # vendor_id: GenuineIntel, AuthenticAMD; "" where not listed (e.g. ARM)
    model: str  # model name, e.g. "AMD EPYC"
    flags: frozenset  # instruction-set flags, e.g. avx512_bf16, amx_tile


def parse_cpuinfo(text):
    """The first processor of a /proc/cpuinfo text ("key<tabs>: value" lines; every processor of
    a machine lists the same instruction sets)."""
    fields = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return CpuInfo(fields.get("vendor_id", ""), fields.get("model name", "") or "this CPU",
                   frozenset(fields.get("flags", "").split()))


def this_cpu():
    """This machine's CpuInfo. Where there is no /proc/cpuinfo (not Linux) it lists no flags, so
    auto takes fp32: macOS runs on ARM or on Intel CPUs without AMX, fp32 under the rule anyway."""
    try:
        with open(CPUINFO) as f:
            return parse_cpuinfo(f.read())
    except OSError:
        return CpuInfo("", f"this CPU (no {CPUINFO})", frozenset())


ARCH_GET_XCOMP_PERM, ARCH_REQ_XCOMP_PERM = 0x1022, 0x1023  # arch_prctl codes, Linux >= 5.16
XFEATURE_XTILEDATA = 18  # the AMX tile registers' state component (XSAVE bit 18)
SYS_ARCH_PRCTL = 158  # x86_64 syscall number


def amx_tiles_permitted():
    """Whether Linux lets this process use the AMX tile registers. The CPU flags are not enough:
    since Linux 5.16 a process must ask for the tile state (arch_prctl ARCH_REQ_XCOMP_PERM), and
    a kernel without AMX support, or one that refuses, leaves oneDNN on its AVX512-BF16 kernels
    (0.53x fp32 on an Intel Xeon). Asks exactly as oneDNN does before its first AMX kernel (so it
    grants nothing oneDNN would not take anyway): already permitted, else request, then check."""
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return False
    libc = ctypes.CDLL(None)  # the running process, libc included
    permitted = ctypes.c_ulong(0)

    def tiles_permitted():
        return (libc.syscall(SYS_ARCH_PRCTL, ARCH_GET_XCOMP_PERM, ctypes.byref(permitted)) == 0
                and bool(permitted.value >> XFEATURE_XTILEDATA & 1))

    if tiles_permitted():
        return True
    return libc.syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 and tiles_permitted()


def cpu_dtype(cpu, amx_permitted):
    """(dtype name, why) that auto takes on `cpu`, by the rule in this module's docstring.
    amx_permitted() (amx_tiles_permitted, for this machine) is asked only where the flags list
    AMX."""
    refused = ""
    if all(flag in cpu.flags for flag in AMX_FLAGS):
        if amx_permitted():
            return "bfloat16", f"auto: {cpu.model} with {', '.join(AMX_FLAGS)}"
        refused = (f" (it lists {', '.join(AMX_FLAGS)}, but Linux refused this process the AMX tile "
                   f"state: arch_prctl ARCH_REQ_XCOMP_PERM)")
    if "avx512_bf16" not in cpu.flags:
        return "float32", f"auto: {cpu.model} has no bf16 instructions (avx512_bf16 or AMX){refused}"
    if cpu.vendor == "AuthenticAMD":
        return "bfloat16", f"auto: {cpu.model} with avx512_bf16"
    return "float32", (f"auto: {cpu.model} with avx512_bf16 and no AMX{refused}: bf16 matmuls ran "
                       f"at 0.53x fp32's on such a CPU (an Intel Xeon); --dtype=bfloat16 to force")


def native_bf16_cpu(cpu=None):
    """The bf16 instruction sets `cpu` (default this one) lists ("avx512_bf16, amx_bf16"), or
    None where it has none and bf16 would only be emulated."""
    cpu = cpu or this_cpu()
    return ", ".join(flag for flag in ("avx512_bf16", "amx_bf16") if flag in cpu.flags) or None


def as_saved(why):
    """The reason of a dtype taken from a resumed run's config: "auto: X" -> "auto, saved with
    the run: X"; "--dtype" -> "--dtype, saved with the run". Configs saved before the reason was
    kept have none."""
    if why is None:
        return SAVED
    if SAVED in why:  # resumed before: saved with this wording already
        return why
    source, sep, detail = why.partition(": ")
    return f"{source}, {SAVED}{sep}{detail}"


def pick_dtype(cfg, device, comm=None, saved_config=None):
    """(autocast dtype name, why) for the run. saved_config: the config of the run being resumed;
    its dtype (which config_from_args put in cfg unless --dtype overrode it) is kept, with the
    reason it was first chosen. Else --dtype, or auto: bf16 on CUDA, cpu_dtype on a CPU. With
    several ranks (comm) rank 0's choice is every rank's: ranks on different machines could read
    different CPUs, and all must train in one precision."""
    if saved_config is not None and cfg.dtype == saved_config.get("dtype"):
        return cfg.dtype, as_saved(saved_config.get("dtype_reason"))
    if cfg.dtype != "auto":
        return cfg.dtype, "--dtype"
    if device.type == "cuda":
        return "bfloat16", "auto: CUDA"
    dtype, why = cpu_dtype(this_cpu(), amx_tiles_permitted)
    if comm is not None:
        bf16 = torch.tensor([float(dtype == "bfloat16")], dtype=torch.float64)
        comm.wait(comm.broadcast(bf16, root=0))
        rank0 = "bfloat16" if bf16.item() else "float32"
        if rank0 != dtype:
            dtype, why = rank0, f"auto: rank 0's choice (this rank read: {why})"
    return dtype, why

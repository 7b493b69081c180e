"""--dtype=auto (nanolm/precision.py): one decision per machine, read from /proc/cpuinfo.

Each CPU kind this project runs on is faked by writing its /proc/cpuinfo text to a file, so every
branch of the rule runs on any machine; tests marked as reading the real CPU check the parsing
and the AMX permission call against this machine."""
import time

import pytest
import torch

from nanolm import precision
from nanolm.config import parse_args

FLAGS = ("fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 "
         "ht syscall nx pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology cpuid pni pclmulqdq ssse3 fma "
         "cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx f16c rdrand hypervisor lahf_lm abm "
         "fsgsbase bmi1 avx2 smep bmi2 erms invpcid avx512f avx512dq adx smap avx512ifma clflushopt clwb "
         "avx512cd sha_ni avx512bw avx512vl xsaveopt xsavec xgetbv1 xsaves avx_vnni")


def cpuinfo(vendor, model, flags, processors=2):
    """/proc/cpuinfo text as Linux writes it on x86: one block per processor."""
    block = (f"processor\t: {{n}}\nvendor_id\t: {vendor}\ncpu family\t: 6\nmodel\t\t: 143\n"
             f"model name\t: {model}\nstepping\t: 8\ncpu MHz\t\t: 2000.000\nflags\t\t: {flags}\n"
             f"bugs\t\t: spectre_v1 spectre_v2\nbogomips\t: 4000.00\n")
    return "\n".join(block.format(n=n) for n in range(processors))


CPUS = {  # the kinds of machine this project has run on, and one older CPU
    "AMX Xeon": cpuinfo("GenuineIntel", "Intel Xeon Processor (SapphireRapids)",
                        FLAGS + " avx512_bf16 avx512_vnni avx512_fp16 amx_bf16 amx_tile amx_int8"),
    "Xeon without AMX": cpuinfo("GenuineIntel", "Intel Xeon Processor (SapphireRapids)",
                                FLAGS + " avx512_bf16 avx512_vnni avx512_fp16"),
    "AMD EPYC": cpuinfo("AuthenticAMD", "AMD EPYC", FLAGS + " avx512_bf16 avx512_vnni clzero"),
    "old Xeon": cpuinfo("GenuineIntel", "Intel(R) Xeon(R) CPU E5-2686 v4 @ 2.30GHz", FLAGS),
    "ARM": "processor\t: 0\nBogoMIPS\t: 243.75\nFeatures\t: fp asimd evtstrm aes sha2 bf16\n"
           "CPU implementer\t: 0x41\nCPU part\t: 0xd40\n",
}
AUTO = {  # kind: (dtype auto takes, the log line's reason)
    "AMX Xeon": ("bfloat16", "auto: Intel Xeon Processor (SapphireRapids) with amx_bf16, amx_tile"),
    "Xeon without AMX": ("float32", "auto: Intel Xeon Processor (SapphireRapids) with avx512_bf16 and no "
                                    "AMX: bf16 matmuls ran at 0.53x fp32's on such a CPU (an Intel Xeon); "
                                    "--dtype=bfloat16 to force"),
    "AMD EPYC": ("bfloat16", "auto: AMD EPYC with avx512_bf16"),
    "old Xeon": ("float32", "auto: Intel(R) Xeon(R) CPU E5-2686 v4 @ 2.30GHz has no bf16 instructions "
                            "(avx512_bf16 or AMX)"),
    "ARM": ("float32", "auto: this CPU has no bf16 instructions (avx512_bf16 or AMX)"),
}
CPU = torch.device("cpu")


@pytest.fixture
def fake_cpu(tmp_path, monkeypatch):
    """fake_cpu(kind, amx_permitted=True): this process reads CPUS[kind] as its /proc/cpuinfo,
    and Linux grants (or refuses) it the AMX tile state."""
    def fake(kind, amx_permitted=True):
        path = tmp_path / "cpuinfo"
        path.write_text(CPUS[kind])
        monkeypatch.setattr(precision, "CPUINFO", str(path))
        monkeypatch.setattr(precision, "amx_tiles_permitted", lambda: amx_permitted)
    return fake


def auto(comm=None):
    return precision.pick_dtype(parse_args([]), CPU, comm)


@pytest.mark.parametrize("kind", CPUS)
def test_auto_decides_from_the_cpu_kind(kind, fake_cpu):
    fake_cpu(kind)
    assert auto() == AUTO[kind]


def test_amx_flags_without_the_os_permission_are_not_amx(fake_cpu):
    """A kernel that refuses the tile state (before Linux 5.16, or a sandbox) leaves oneDNN on its
    AVX512-BF16 kernels, the Xeon-without-AMX case: fp32, saying why."""
    fake_cpu("AMX Xeon", amx_permitted=False)
    dtype, why = auto()
    assert dtype == "float32"
    assert "lists amx_bf16, amx_tile, but Linux refused this process the AMX tile state" in why


@pytest.mark.parametrize("kind", ["Xeon without AMX", "AMD EPYC", "old Xeon", "ARM"])
def test_the_amx_permission_is_asked_only_where_the_flags_list_amx(kind, fake_cpu, monkeypatch):
    fake_cpu(kind)
    def asked():
        raise AssertionError("asked for AMX tiles on a CPU without AMX")
    monkeypatch.setattr(precision, "amx_tiles_permitted", asked)
    assert auto() == AUTO[kind]


def test_no_proc_cpuinfo_means_fp32(tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "CPUINFO", str(tmp_path / "missing"))
    assert auto() == ("float32", f"auto: this CPU (no {tmp_path / 'missing'}) has no bf16 instructions "
                                 f"(avx512_bf16 or AMX)")


@pytest.mark.parametrize("kind", CPUS)
def test_a_loaded_machine_cannot_change_auto(kind, fake_cpu, monkeypatch):
    """auto times nothing and multiplies nothing: with every clock jumping by minutes between
    readings (a machine under heavy load) and torch's matmuls raising, each CPU kind gets the
    decision it gets idle."""
    fake_cpu(kind)
    ticks = iter(range(0, 10**9, 300))
    for clock in ("perf_counter", "monotonic", "time", "process_time"):
        monkeypatch.setattr(time, clock, lambda: next(ticks))
    def no_matmul(*args, **kwargs):
        raise AssertionError("auto ran a matmul")
    for name in ("matmul", "mm", "bmm", "addmm"):
        monkeypatch.setattr(torch, name, no_matmul)
    monkeypatch.setattr(torch.Tensor, "__matmul__", no_matmul)
    assert auto() == AUTO[kind]


@pytest.mark.parametrize("kind", CPUS)
def test_dtype_flag_forces_any_precision(kind, fake_cpu):
    fake_cpu(kind)
    for dtype in ("float32", "bfloat16", "float16"):
        assert precision.pick_dtype(parse_args([f"--dtype={dtype}"]), CPU) == (dtype, "--dtype")


def test_auto_on_cuda_is_bf16(fake_cpu):
    fake_cpu("old Xeon")
    assert precision.pick_dtype(parse_args([]), torch.device("cuda")) == ("bfloat16", "auto: CUDA")


@pytest.mark.parametrize("kind,found", [("AMX Xeon", "avx512_bf16, amx_bf16"), ("Xeon without AMX", "avx512_bf16"),
                                        ("AMD EPYC", "avx512_bf16"), ("old Xeon", None), ("ARM", None)])
def test_native_bf16_names_the_bf16_instruction_sets(kind, found, fake_cpu):
    """What the bench asks before it adds bf16 cases on a CPU."""
    fake_cpu(kind)
    assert precision.native_bf16_cpu() == found


class Rank0Says:
    """A communicator whose broadcast from rank 0 writes `value` into the tensor."""

    def __init__(self, value):
        self.value = value

    def broadcast(self, tensor, root):
        assert root == 0
        tensor.fill_(self.value)
        return "handle"

    def wait(self, handle):
        assert handle == "handle"


@pytest.mark.parametrize("kind,rank0,dtype", [("old Xeon", 1.0, "bfloat16"), ("AMD EPYC", 0.0, "float32"),
                                              ("AMD EPYC", 1.0, "bfloat16")])
def test_every_rank_takes_rank_0s_choice(kind, rank0, dtype, fake_cpu):
    """Ranks on different machines may read different CPUs: each takes rank 0's choice
    (broadcast), so all train in one precision."""
    fake_cpu(kind)
    picked, why = auto(Rank0Says(rank0))
    assert picked == dtype
    own = AUTO[kind][1]
    assert why == (own if dtype == AUTO[kind][0] else f"auto: rank 0's choice (this rank read: {own})")


@pytest.mark.parametrize("argv,saved,why", [
    ([], {"dtype": "bfloat16", "dtype_reason": "auto: AMD EPYC with avx512_bf16"},
     "auto, saved with the run: AMD EPYC with avx512_bf16"),
    (["--dtype=float16"], {"dtype": "float16", "dtype_reason": "--dtype"}, "--dtype, saved with the run"),
    (["--dtype=float32"], {"dtype": "float32"}, "saved with the run"),  # saved before reasons were kept
    ([], {"dtype": "bfloat16", "dtype_reason": "auto, saved with the run: AMD EPYC with avx512_bf16"},
     "auto, saved with the run: AMD EPYC with avx512_bf16"),  # resumed a second time
])
def test_a_resumed_runs_dtype_says_where_it_came_from(argv, saved, why, fake_cpu):
    """config_from_args puts the saved dtype in the config; the reason is the saved one, and no
    CPU is read again (here an old Xeon, where auto would take fp32)."""
    fake_cpu("old Xeon")
    cfg = parse_args(argv, defaults={"dtype": saved["dtype"]})
    assert precision.pick_dtype(cfg, CPU, saved_config=saved) == (saved["dtype"], why)


def test_a_dtype_passed_on_resume_overrides_the_saved_one(fake_cpu):
    fake_cpu("old Xeon")
    saved = {"dtype": "bfloat16", "dtype_reason": "auto: AMD EPYC with avx512_bf16"}
    assert precision.pick_dtype(parse_args(["--dtype=float16"]), CPU, saved_config=saved) == ("float16", "--dtype")
    assert precision.pick_dtype(parse_args(["--dtype=auto"]), CPU, saved_config=saved) == AUTO["old Xeon"]


def test_info_names_the_cpu_and_what_auto_takes(fake_cpu):
    from nanolm import info
    fake_cpu("Xeon without AMX")
    assert info.cpu_precision() == (f"Intel Xeon Processor (SapphireRapids) (GenuineIntel); --dtype=auto trains in "
                                    f"float32 ({AUTO['Xeon without AMX'][1]})")


# ----------------------------------------------------------------------------- the real CPU

def test_this_cpu_reads_the_flags_torch_detects():
    """/proc/cpuinfo parsed here agrees with torch's own CPUID reading on this machine."""
    cpu = precision.this_cpu()
    assert cpu.vendor and cpu.model != "this CPU" and "sse2" in cpu.flags
    assert ("avx512_bf16" in cpu.flags) == torch.cpu._is_avx512_bf16_supported()
    assert ("amx_tile" in cpu.flags) == torch.cpu._is_amx_tile_supported()


@pytest.mark.skipif("amx_tile" in precision.this_cpu().flags, reason="this CPU has AMX tiles")
def test_linux_refuses_amx_tiles_to_a_cpu_without_them():
    """The arch_prctl request runs for real: on a CPU without AMX the kernel refuses it. (On an
    AMX CPU under Linux >= 5.16 it is granted: only the faked tests above cover that path.)"""
    assert precision.amx_tiles_permitted() is False

"""AddressSanitizer and ThreadSanitizer over every CUDA kernel, through the SIMT emulation.

csrc/sim/sanitize_driver.cpp runs each launcher of csrc/*.cu once at small shapes on heap
buffers of exactly the tensors' sizes. It is built here from the real sources twice:
  - ASan: an out-of-bounds read of a global buffer is a heap-buffer-overflow at its line;
  - TSan, with one OS thread per CUDA thread (NANOLM_SIM_THREADS; fibers would hide the
    concurrency): a missing __syncthreads is a data race between the lines involved.
Both must report nothing on the shipped kernels. Each job is also shown to fail on a kernel
broken on purpose, built from the real source with one textual patch (not a copy): an
off-by-one bound, a removed __syncthreads, a cp.async wait that lets one group too many stay
in flight (the emulation lands a cp.async only at its wait_group and NaN-fills the destination
until then, so the driver sees non-finite outputs).

The builds take minutes on 2 cores, so these run as their own CI step (.ci/run) and only when
NANOLM_SANITIZERS=1.
"""
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
KERNELS = sorted(CSRC.glob("*.cu"))
RUNTIME = [CSRC / "sim" / "cuda_sim.cpp", CSRC / "sim" / "sanitize_driver.cpp"]
SANITIZERS = {
    "address": dict(defines=[], env={"ASAN_OPTIONS": "detect_leaks=0"}, report="ERROR: AddressSanitizer"),
    "thread": dict(defines=["-DNANOLM_SIM_THREADS"], env={"TSAN_OPTIONS": "halt_on_error=0"},
                   report="WARNING: ThreadSanitizer"),
}

pytestmark = pytest.mark.skipif(os.environ.get("NANOLM_SANITIZERS") != "1",
                                reason="sanitizer builds take minutes: set NANOLM_SANITIZERS=1 (CI does)")


def cuda_include():
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "include" / "cuda_bf16.h").exists():
            return Path(root) / "include"
    pytest.fail("no CUDA headers (include/cuda_bf16.h): set CUDA_HOME")


class Builder:
    """Compiles the driver per sanitizer; objects of unpatched sources are built once."""

    def __init__(self, out):
        self.out, self.objects, self.variants = out, {}, 0
        self.include = cuda_include()

    def flags(self, sanitizer):
        return ["-std=c++17", "-O1", "-g1", "-fno-strict-aliasing", "-march=native", f"-fsanitize={sanitizer}",
                "-DNANOLM_CUDA_SIM", "-DNANOLM_WITH_CUDA", *SANITIZERS[sanitizer]["defines"],
                f"-I{CSRC}", f"-I{self.include}"]

    def compile(self, sanitizer, src, obj):
        language = ["-x", "c++"] if src.suffix == ".cu" else []
        cmd = [os.environ.get("CXX", "c++"), *self.flags(sanitizer), *language, "-c", str(src), "-o", str(obj)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stderr[-3000:]}"
        return obj

    def driver(self, sanitizer, patch=None):
        """Links the driver; patch = (kernel file name, text, replacement) applied once."""
        self.variants += 1
        name = sanitizer if patch is None else f"{sanitizer}-{patch[0]}-{self.variants}"
        folder = self.out / name
        folder.mkdir()
        jobs = []
        for src in KERNELS + RUNTIME:
            if patch is not None and src.name == patch[0]:
                text = src.read_text()
                assert text.count(patch[1]) >= 1, f"{patch[1]!r} no longer in {src.name}: update the patch"
                patched = folder / src.name  # same file name: reports name the kernel's file
                patched.write_text(text.replace(patch[1], patch[2], 1))
                jobs.append((patched, folder / (src.stem + ".o"), None))
            elif (sanitizer, src) not in self.objects:
                jobs.append((src, self.out / f"{sanitizer}-{src.stem}.o", (sanitizer, src)))
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            built = list(pool.map(lambda job: self.compile(sanitizer, job[0], job[1]), jobs))
        patched_objects = []
        for (_, _, key), obj in zip(jobs, built):
            if key is None:
                patched_objects.append(obj)
            else:
                self.objects[key] = obj
        objects = patched_objects + [self.objects[(sanitizer, src)] for src in KERNELS + RUNTIME
                                     if patch is None or src.name != patch[0]]
        exe = folder / "sanitize_driver"
        cmd = [os.environ.get("CXX", "c++"), f"-fsanitize={sanitizer}", *map(str, objects), "-o", str(exe)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]
        return exe


@pytest.fixture(scope="module")
def builder(tmp_path_factory):
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.fail("no C++ compiler")
    return Builder(tmp_path_factory.mktemp("sanitizers"))


def run(exe, sanitizer, *ops):
    env = {**os.environ, **SANITIZERS[sanitizer]["env"]}
    result = subprocess.run([str(exe), *ops], capture_output=True, text=True, env=env, timeout=600)
    return result.returncode, result.stdout + result.stderr


@pytest.mark.parametrize("sanitizer", SANITIZERS)
def test_every_kernel_is_clean(builder, sanitizer):
    code, output = run(builder.driver(sanitizer), sanitizer)
    assert SANITIZERS[sanitizer]["report"] not in output, output[-6000:]
    assert code == 0, output[-6000:]
    for op in ("layernorm", "cross_entropy", "adamw", "attention"):
        assert f"{op}: ok" in output


def test_address_sanitizer_catches_an_out_of_bounds_read(builder):
    # layernorm forward, step 1: the load guard lets column C through (one past the row)
    exe = builder.driver("address", ("layernorm.cu", "        if (c >= C) continue;\n",
                                     "        if (c > C) continue;\n"))
    code, output = run(exe, "address", "layernorm")
    assert code != 0
    assert "heap-buffer-overflow" in output and "READ of size" in output, output[-4000:]
    assert "layernorm.cu" in output


def test_thread_sanitizer_catches_a_missing_syncthreads(builder):
    # layernorm backward, write_partial_row: the dbias partials overwrite `combine` while warp
    # 0 may still be reading the dweight partials from it
    exe = builder.driver("thread", ("layernorm.cu", "        __syncthreads();  // an earlier call has finished "
                                    "reading `combine`\n", ""))
    code, output = run(exe, "thread", "layernorm")
    assert code != 0
    assert "WARNING: ThreadSanitizer: data race" in output, output[-4000:]
    assert "write_partial_row" in output and "layernorm.cu" in output


def test_wrong_cp_async_wait_count_is_caught(builder):
    # attention forward: wait_group 2 lets the tile about to be read stay in flight
    exe = builder.driver("address", ("attention.cu", "        cp_async_wait<1>();\n",
                                     "        cp_async_wait<2>();\n"))
    code, output = run(exe, "address", "attention")
    assert code != 0
    assert "attention o: element" in output and "is not finite" in output, output[-4000:]


@pytest.mark.parametrize("patch,op,error", [
    # attention forward at hs 128 takes 80 KB of dynamic shared memory: without the opt-in the
    # launch fails on a GPU, and here
    (("attention.cu", "    set_smem(attention_fwd_kernel<T, HS, DROPOUT>, smem);\n", ""), "attention",
     "bytes of dynamic shared memory need cudaFuncSetAttribute"),
    # a (32, 64) block is 2048 threads, past CUDA's 1024
    (("layernorm.cu", "constexpr int kReduceRows = 8;", "constexpr int kReduceRows = 64;"), "layernorm",
     "invalid block size (32, 64, 1)"),
])
def test_launch_limits_are_checked(builder, patch, op, error):
    code, output = run(builder.driver("address", patch), "address", op)
    assert code != 0 and error in output, output[-4000:]

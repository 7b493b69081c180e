"""Builds nanolm._C, the pybind11 extension holding the CPU C++ and CUDA kernels.

Packaging: the repository keeps Triton kernels in a top-level `kernels/` folder (the layout is
fixed), but a top-level import name `kernels` would collide with the unrelated PyPI package of
that name. So pyproject.toml maps the folder to the sub-package `nanolm.kernels`
(`package-dir`): a wheel installs it at nanolm/kernels/, and an editable install registers the
same mapping in its import finder. Code always writes `from nanolm.kernels import ...`.

The extension includes no torch C++ headers: kernels take raw pointers, sizes and a CUDA stream
handle, and the Python layer (nanolm/ops/) checks dtype, device, shape and contiguity
before passing `tensor.data_ptr()`. That keeps the build independent of the installed torch's
C++ ABI, fast, and readable as plain C++/CUDA.

Environment knobs:
  NANOLM_CUDA        auto (default: build CUDA sources when nvcc is found) | on | off
  NANOLM_CUDA_ARCHS  ';'-separated SM targets, default "80;90a" (Ampere and Hopper SASS; the
                     kernels use mma.sync, which both run)
  NANOLM_MARCH       -march for the CPU kernels, default "native" (set e.g. x86-64-v3 for a
                     wheel that must run on other machines)
  NANOLM_JOBS        parallel compile jobs, default: number of CPUs
  NANOLM_CUDA_SIM    auto (default: build nanolm._C_sim when the CUDA headers are found) | on |
                     off | debug (-O0 -g, for stepping through the kernels in gdb)

nanolm._C_sim is the same csrc/*.cu compiled by the host C++ compiler against the SIMT
emulation in csrc/sim/ (the cuda_sim backend: CUDA kernels on CPU tensors). It needs only the
toolkit's headers (cuda_bf16.h, cuda_fp16.h), not nvcc or a GPU.
"""
import hashlib
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pybind11.setup_helpers import Pybind11Extension
from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
CSRC = ROOT / "csrc"


def find_cuda_home():
    """The CUDA toolkit root holding bin/nvcc and lib64/libcudart_static.a, or None."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    on_path = shutil.which("nvcc")
    if on_path:  # nvcc on PATH may be a wrapper script: trust it only inside a full toolkit
        candidates.append(str(Path(on_path).resolve().parent.parent))
    for home in filter(None, candidates):
        home = Path(home)
        if (home / "bin" / "nvcc").exists() and (home / "lib64" / "libcudart_static.a").exists():
            return home
    return None


def find_cuda_include():
    """A directory holding the CUDA toolkit's cuda_bf16.h (and cuda_fp16.h), or None."""
    home = find_cuda_home()
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda",
                  home and str(home)]
    for root in filter(None, candidates):
        include = Path(root) / "include"
        if (include / "cuda_bf16.h").exists() and (include / "cuda_fp16.h").exists():
            return include
    return None


def cuda_sim_mode():
    """(include dir, extra compile flags) for nanolm._C_sim, or None to skip it."""
    mode = os.environ.get("NANOLM_CUDA_SIM", "auto").lower()
    if mode not in ("auto", "on", "off", "debug"):
        sys.exit(f"NANOLM_CUDA_SIM must be auto, on, off or debug, got {mode!r}")
    include = find_cuda_include() if mode != "off" else None
    if mode in ("on", "debug") and include is None:
        sys.exit(f"NANOLM_CUDA_SIM={mode} but no CUDA headers (include/cuda_bf16.h) were found; set CUDA_HOME")
    if include is None:
        return None
    # -fno-strict-aliasing: the kernels type-pun registers (uint32_t <-> bf16x2) as CUDA allows.
    # -march: FMA instructions, so that a * b + c contracts to one rounding as nvcc makes it.
    flags = ["-O0", "-g"] if mode == "debug" else ["-O2"]
    return include, flags + ["-fno-strict-aliasing", f"-march={os.environ.get('NANOLM_MARCH', 'native')}"]


def cuda_mode():
    mode = os.environ.get("NANOLM_CUDA", "auto").lower()
    if mode not in ("auto", "on", "off"):
        sys.exit(f"NANOLM_CUDA must be auto, on or off, got {mode!r}")
    cuda_home = find_cuda_home() if mode != "off" else None
    if mode == "on" and cuda_home is None:
        sys.exit("NANOLM_CUDA=on but no CUDA toolkit (bin/nvcc, lib64/libcudart_static.a) was found; "
                 "set CUDA_HOME")
    return cuda_home


def gencode_flags(archs):
    """'80;90a' -> SASS for each arch, plus PTX of the lowest so newer GPUs can JIT it."""
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    lowest = min(archs, key=lambda a: int(re.sub(r"\D", "", a)))
    return flags + [f"-gencode=arch=compute_{lowest},code=compute_{lowest}"]


def tool_version(cmd, line):
    """One line of `cmd`'s output (compilers print their version first or last)."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.strip().splitlines()[line]


def macros(build_info):
    """{'NAME': 'text'} -> string-literal -D macros."""
    return [(k, '"' + v.replace('"', "'") + '"') for k, v in build_info.items()]


class BuildExt(build_ext):
    """Compiles csrc/*.cu with nvcc (incrementally, in parallel), then lets setuptools build
    the C++ sources and link everything into nanolm._C."""

    def build_extension(self, ext):
        if ext.name == "nanolm._C_sim":
            return self.build_cuda_sim(ext)
        cuda_home = cuda_mode()
        headers = sorted(str(p) for p in CSRC.glob("*.h"))
        cu_sources = sorted(str(p) for p in CSRC.glob("*.cu"))
        ext.depends = headers + cu_sources
        archs = os.environ.get("NANOLM_CUDA_ARCHS", "80;90a").split(";")
        build_info = {
            "NANOLM_CXX_VERSION": tool_version([os.environ.get("CXX", "c++"), "--version"], 0),
            "NANOLM_MARCH": os.environ.get("NANOLM_MARCH", "native"),
        }
        if cuda_home is not None:
            nvcc = cuda_home / "bin" / "nvcc"
            ext.extra_objects = self.compile_cuda(nvcc, cu_sources, headers, archs)
            ext.library_dirs = [str(cuda_home / "lib64")]
            ext.libraries = ["cudart_static", "dl", "rt", "pthread"]
            ext.define_macros += [("NANOLM_WITH_CUDA", "1")]
            build_info["NANOLM_CUDA_ARCHS"] = ";".join(archs)
            build_info["NANOLM_NVCC_VERSION"] = tool_version([str(nvcc), "--version"], -1)
        ext.define_macros += macros(build_info)
        super().build_extension(ext)

    def build_cuda_sim(self, ext):
        include, flags = cuda_sim_mode()
        headers = sorted(str(p) for p in CSRC.glob("*.h")) + sorted(str(p) for p in (CSRC / "sim").glob("*.h"))
        cu_sources = sorted(str(p) for p in CSRC.glob("*.cu"))
        ext.depends = headers + cu_sources
        defines = ["-DNANOLM_CUDA_SIM=1", "-DNANOLM_WITH_CUDA=1"]
        cxx = os.environ.get("CXX", "c++")
        compile_flags = [*flags, "-std=c++17", "-fPIC", *defines, f"-I{CSRC}", f"-I{include}", "-x", "c++"]
        ext.extra_objects = self.compile_objects([cxx, *compile_flags], cu_sources, headers, "cuda_sim")
        ext.include_dirs += [str(include)]
        ext.extra_compile_args = flags
        ext.define_macros += [("NANOLM_CUDA_SIM", "1"), ("NANOLM_WITH_CUDA", "1")] + macros({
            "NANOLM_CXX_VERSION": tool_version([cxx, "--version"], 0),
            "NANOLM_MARCH": os.environ.get("NANOLM_MARCH", "native"),
        })
        super().build_extension(ext)

    def compile_cuda(self, nvcc, sources, headers, archs):
        flags = ["-O3", "-std=c++17", "-lineinfo", "--expt-relaxed-constexpr",
                 "-Xcompiler", "-fPIC", "-DNANOLM_WITH_CUDA=1", f"-I{CSRC}"] + gencode_flags(archs)
        return self.compile_objects([str(nvcc), *flags], sources, headers, "cuda")

    def compile_objects(self, command, sources, headers, folder):
        """Compiles each source with `command` into build_temp/folder-<hash of command>
        (incremental: a source is rebuilt when it or a header is newer than its object)."""
        out_dir = Path(self.build_temp) / f"{folder}-{hashlib.sha1(' '.join(command).encode()).hexdigest()[:8]}"
        out_dir.mkdir(parents=True, exist_ok=True)
        newest_header = max((os.path.getmtime(h) for h in headers), default=0)

        def compile_one(src):
            obj = out_dir / (Path(src).stem + ".o")
            stale = not obj.exists() or obj.stat().st_mtime < max(os.path.getmtime(src), newest_header)
            if stale:
                cmd = [*command, "-c", src, "-o", str(obj)]
                print(" ".join(cmd), flush=True)
                result = subprocess.run(cmd, capture_output=True, text=True)
                if result.returncode != 0:
                    raise RuntimeError(f"{command[0]} failed on {src}:\n{result.stdout}{result.stderr}")
            return str(obj)

        jobs = int(os.environ.get("NANOLM_JOBS", os.cpu_count() or 1))
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            return list(pool.map(compile_one, sources))


extension = Pybind11Extension(
    "nanolm._C",
    sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.cpp")),
    include_dirs=[str(CSRC)],
    cxx_std=17,
    # -fno-math-errno: lets sqrtf vectorize (the AdamW loop); nothing here reads errno.
    extra_compile_args=["-O3", f"-march={os.environ.get('NANOLM_MARCH', 'native')}", "-fopenmp",
                        "-fno-math-errno"],
    extra_link_args=["-fopenmp"],
)

# The cuda_sim backend's module: bindings.cpp and the emulation runtime here, csrc/*.cu added by
# BuildExt.build_cuda_sim (compiled as C++).
cuda_sim_extension = Pybind11Extension(
    "nanolm._C_sim",
    ["csrc/bindings.cpp", "csrc/sim/cuda_sim.cpp"],
    include_dirs=[str(CSRC)],
    cxx_std=17,
)

extensions = [extension] + ([cuda_sim_extension] if cuda_sim_mode() is not None else [])
setup(ext_modules=extensions, cmdclass={"build_ext": BuildExt})

"""Timers, the machine's measured ceilings, and peak memory.

GPU: triton.testing.do_bench (median; it also clears L2 before each run), or CUDA events
when triton is absent. CPU: time.perf_counter around each call, median of many calls.
Both warm up first (which also triggers compilation and autotuning).
"""
import contextlib
import ctypes
import functools
import os
import statistics
import sys
import time

import torch


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cuda_events_median(fn, warmup, reps):
    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends):
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def time_gpu(fn, budget_ms=100):
    """Median milliseconds of fn() on the current CUDA device."""
    try:
        from triton.testing import do_bench
    except ImportError:
        return _cuda_events_median(fn, warmup=5, reps=max(10, int(budget_ms)))
    fn()  # first call outside do_bench: compile/autotune must not shape its run-count estimate
    torch.cuda.synchronize()
    return do_bench(fn, warmup=max(25, budget_ms // 4), rep=budget_ms, return_mode="median")


def time_cpu(fn, budget_ms=200, min_reps=5, max_reps=200):
    """Median milliseconds of fn() on CPU: two warm-up calls, then as many calls as fit."""
    fn()
    start = time.perf_counter()
    fn()
    estimate = max(time.perf_counter() - start, 1e-6) * 1e3
    reps = max(min_reps, min(max_reps, int(budget_ms / estimate)))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def time_interleaved(fns, device, budget_ms=None, min_reps=5, max_reps=200):
    """Median milliseconds of each fn, timed in rounds of one call of each (A, B, C, A, B, C,
    ...): on a machine shared with other jobs the load then falls on every fn alike. Two
    warm-up rounds; budget_ms is per fn, as time_ms's."""
    if not fns:
        return []
    for fn in fns:
        fn()
    start = time.perf_counter()
    for fn in fns:
        fn()
    synchronize(device)
    per_fn = max(time.perf_counter() - start, 1e-6) * 1e3 / len(fns)
    reps = max(min_reps, min(max_reps, int((budget_ms or 200) / per_fn)))
    times = [[] for _ in fns]
    for _ in range(reps):
        for fn, t in zip(fns, times):
            start = time.perf_counter()
            fn()
            synchronize(device)
            t.append((time.perf_counter() - start) * 1e3)
    return [statistics.median(t) for t in times]


def time_ms(fn, device, budget_ms=None):
    if device.type == "cuda":
        return time_gpu(fn, budget_ms or 100)
    return time_cpu(fn, budget_ms or 200)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from malloc.h


@functools.cache
def _glibc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return None


def reuse_freed_cpu_memory():
    """glibc hands every large block (above 32 MiB at most) straight back to the OS when it is
    freed, so the next call's output of the same size faults in and zero-fills fresh pages: at
    the CPU shapes that is most of a memory-bound op's time (residual add + layernorm,
    8192 x 1600 fp32: 38 ms, of which 26k page faults; 12 ms without them). Raising glibc's
    mmap and trim thresholds keeps freed blocks for reuse, which is what PyTorch's CPU tuning
    advice gets from jemalloc or tcmalloc; it applies to every implementation alike. What is
    kept must be handed back between implementations (release_cpu_memory), or it piles up
    across cases until the 24 GB machine runs out. Returns whether glibc accepted it."""
    libc = _glibc()
    return bool(libc and libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))


def release_cpu_memory():
    """Return the free memory glibc kept to the OS (malloc_trim), between implementations."""
    libc = _glibc()
    if libc:
        libc.malloc_trim(0)


def cache_bytes(device):
    """Last-level cache size: inputs smaller than ~2x this are rotated between runs."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).L2_cache_size
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            text = f.read().strip()
        return int(text.rstrip("KMG")) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
    except (OSError, ValueError):
        return 32 << 20


def rotation_count(working_set_bytes, device, limit=8):
    """How many input sets to rotate so the same bytes are not re-read from cache."""
    if working_set_bytes <= 0:
        return 1
    return max(1, min(limit, -(-2 * cache_bytes(device) // working_set_bytes)))


def memory_gbps(nbytes, device):
    """The better of a copy and an in-place add over nbytes (see measure_ceilings)."""
    a = torch.randn(nbytes // 4, device=device)
    b = torch.randn_like(a)
    copy_GBps = 2 * nbytes / time_ms(lambda: b.copy_(a), device) / 1e6
    add_GBps = 3 * nbytes / time_ms(lambda: a.add_(b), device) / 1e6
    return max(copy_GBps, add_GBps)


def matmul_tflops(n, dtype, device, budget_ms):
    """The rate of an n^3 matmul in dtype, from its median time."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n ** 3 / time_ms(lambda: a @ b, device, budget_ms) / 1e9


def measure_ceilings(device, toy=False, dtypes=None):
    """{'memory_GBps', 'matmul_TFLOPs', 'matmul_TFLOPs_by_dtype', ...}: streaming bandwidth
    (bytes read + written) and a large matmul (bf16 8192^3 on GPU, fp32 2048^3 on CPU, about 1 s
    in all there), the first also in each further dtype of `dtypes` (a CPU with native bf16
    multiplies several times faster in bf16 than in fp32, so each row is held to its own).
    Bandwidth is the better of a copy (dst = src) and an in-place add (a += b). On a GPU the two
    agree; on a CPU the copy's stores first read each destination line into cache (write-allocate),
    traffic the read + write count leaves out, so the copy alone understates what an in-place
    kernel such as AdamW can reach by about a third.
    toy: a small buffer and matmul, for the test suite's smoke runs (not a ceiling)."""
    gpu = device.type == "cuda"
    if toy:
        nbytes, n, dtype = 16 << 20, 512, torch.float32
    elif gpu:
        nbytes, n, dtype = 1 << 30, 8192, torch.bfloat16
    else:
        nbytes, n, dtype = 256 << 20, 2048, torch.float32
    memory = memory_gbps(nbytes, device)
    by_dtype = {str(d).removeprefix("torch."): matmul_tflops(n, d, device, 300 if gpu else 600)
                for d in dict.fromkeys([dtype, *(dtypes or ())])}
    return {
        "memory_GBps": memory,
        "memory_bytes": nbytes,
        "matmul_TFLOPs": by_dtype[str(dtype).removeprefix("torch.")],
        "matmul_TFLOPs_by_dtype": by_dtype,
        "matmul_shape": f"{n}x{n}x{n}",
    }


def peak_memory_bytes(fn, device):
    """High-water mark of allocations during one fn() above what was allocated before it
    (the call's temporaries and outputs). GPU: the caching allocator's statistics. CPU: torch's
    CPU allocator keeps none, so one call runs under the profiler with profile_memory and its
    allocation/free events are summed in time order; None if this torch's profiler lacks them."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize()
        del result
        return torch.cuda.max_memory_allocated(device) - before
    return _cpu_peak_bytes(fn)


@contextlib.contextmanager
def _quiet_fd2():
    """Kineto's C++ logger writes two lines to fd 2 per profiler use (no setting turns them off),
    which would interleave with the bench's progress lines: fd 2 goes to /dev/null meanwhile."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _cpu_peak_bytes(fn):
    from torch.profiler import ProfilerActivity, profile
    with _quiet_fd2(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    del result
    try:
        events = prof.profiler.kineto_results.events()
        changes = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    except AttributeError:
        return None
    live = peak = 0
    for _, nbytes in changes:
        live += nbytes
        peak = max(peak, live)
    return peak

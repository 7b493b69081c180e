"""Re-check of the one bf16 op row where the bench had nanolm's cpu kernel behind PyTorch eager
(layernorm fwd N=32768 C=1600): cpu and eager timed interleaved (A, B, A, B, ...), median of 15,
with freed memory reused as the bench does. Run from the repo root: python <this file>."""
import statistics
import time

import torch
import torch.nn.functional as F

from bench import timing
from nanolm.backends import cpu

timing.reuse_freed_cpu_memory()
for N, C in [(32768, 1600), (32768, 768), (8192, 1600)]:
    for dt in (torch.bfloat16, torch.float32):
        x, w, b = torch.randn(N, C, dtype=dt), torch.randn(C, dtype=dt), torch.randn(C, dtype=dt)
        fns = {"cpu": lambda x=x, w=w, b=b: cpu.layer_norm_fwd(x, w, b, 1e-5),
               "eager": lambda x=x, w=w, b=b, C=C: F.layer_norm(x, (C,), w, b)}
        times = {k: [] for k in fns}
        for f in fns.values():
            f(), f()
        for _ in range(15):
            for k, f in fns.items():
                t = time.perf_counter()
                f()
                times[k].append((time.perf_counter() - t) * 1e3)
        print(f"N={N} C={C} {dt}: " + ", ".join(f"{k} {statistics.median(v):.2f} ms" for k, v in times.items()))

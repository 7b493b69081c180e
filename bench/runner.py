"""Runs cases: for each implementation, setup, one correctness check against the reference
(a wrong or crashing implementation is reported FAILED and gets no time), peak memory, then
the median time over rotating input sets."""
import gc
import itertools

import torch

from bench import timing
from bench.cases import check_outputs


def _free(device, always=False):
    """Drops what the last implementation left (reference cycles, cached GPU blocks, freed CPU
    memory glibc kept) so the next one's peak memory and time start clean. A full gc costs
    ~0.1 s with torch loaded: on CPU it runs once per case, not per implementation."""
    if device.type == "cuda" or always:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    else:
        timing.release_cpu_memory()


def _rotating(runs):
    cycle = itertools.cycle(runs)
    return lambda: next(cycle)()


def run_impl(case, impl, input_sets, ref, device):
    row = {"op": case.op, "case": case.name, "series": case.series, "x": case.x, "x_label": case.x_label,
           "impl": impl.name, "kind": impl.kind, "metric": case.metric, "status": "ok"}
    try:
        runs = [impl.make(t) for t in input_sets]
        check_outputs(case.view(runs[0]()), ref, case.tol)
        row["peak_mem_bytes"] = timing.peak_memory_bytes(runs[0], device)
        row["time_ms"] = timing.time_ms(_rotating(runs), device, case.budget_ms)
    except Exception as e:  # any failure is reported, and the next implementation still runs
        message = str(e).splitlines()[0][:300] if str(e) else ""
        return {**row, "status": "FAILED", "error": f"{type(e).__name__}: {message}"}
    row["value"] = case.work / row["time_ms"] / (1e6 if case.metric == "GB/s" else 1e9)
    for key, amount in case.per_call.items():
        row[f"{key}_per_s"] = amount / row["time_ms"] * 1e3
    if case.peak_tflops:
        row["peak_tflops"] = case.peak_tflops
        row["mfu_pct"] = 100 * row["value"] / case.peak_tflops
    return row


def add_derived(rows, ceilings):
    """% of the measured ceiling and speedup over each baseline of the same case."""
    ceiling = {"GB/s": ceilings["memory_GBps"], "TFLOP/s": ceilings["matmul_TFLOPs"]}
    for row in rows:
        if row["status"] != "ok":
            continue
        row["pct_ceiling"] = 100 * row["value"] / ceiling[row["metric"]]
        row["speedup"] = {b["impl"]: b["time_ms"] / row["time_ms"] for b in rows
                          if b["case"] == row["case"] and b["op"] == row["op"]
                          and b["kind"] == "baseline" and b["status"] == "ok"}
    return rows


def run_case(case, device, impl_filter=None, log=print):
    input_sets = [case.make_inputs()]
    ref = case.reference(input_sets[0])
    input_sets += [case.make_inputs() for _ in range(timing.rotation_count(case.working_set, device) - 1)]
    rows = []
    for impl in case.impls:
        if impl_filter and impl.name not in impl_filter:
            continue
        rows.append(run_impl(case, impl, input_sets, ref, device))
        r = rows[-1]
        log(f"  {case.op:>20} {case.name:<40} {impl.name:<32} "
            + (f"{r['time_ms']:9.3f} ms" if r["status"] == "ok" else f"FAILED {r['error']}"))
        _free(device)
    skipped = [{"op": case.op, "case": case.name, "impl": n, "status": "skipped", "reason": why}
               for n, why in case.skipped.items() if not impl_filter or n in impl_filter]
    del input_sets, ref
    _free(device, always=True)
    return rows, skipped

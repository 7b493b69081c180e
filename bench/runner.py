"""Runs cases: for each implementation, setup, one correctness check against the reference
(a wrong or crashing implementation is reported FAILED and gets no time; a PyTorch baseline
that misses the reference is reported as such, a finding about PyTorch, and fails nothing),
peak memory, then
the median time over rotating input sets. On CPU every implementation is set up first, then
they are timed in turn, one call each per round, so that load from other jobs on a shared
machine, and the machine's slower spells, fall on all of them alike (timed one after the
other on the 2-core VM, a bf16 layernorm measured 22.7 ms against PyTorch's 17.4; interleaved,
15.4 against 18.7). Emulated backends (cases.EMULATED) run only when named in the filter."""
import gc
import itertools

import torch

from bench import timing
from bench.cases import check_outputs, emulated_reason


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


OFF_REFERENCE = "misses reference"  # the status of a baseline whose output fails the check


def _failed(row, e):
    """The row of an implementation that crashed or failed its check: FAILED, or for a PyTorch
    baseline whose output is off the reference (e.g. eager bf16 layernorm backward, which
    accumulates in bf16), OFF_REFERENCE: what it computes is reported, not a nanolm failure."""
    message = str(e).splitlines()[0][:300] if str(e) else ""
    off = row["kind"] == "baseline" and isinstance(e, AssertionError)
    return {**row, "status": OFF_REFERENCE if off else "FAILED", "error": f"{type(e).__name__}: {message}"}


def failed_nanolm(rows):
    """The FAILED rows that fail a run: nanolm's (or emulated) implementations, not PyTorch's."""
    return [r for r in rows if r["status"] == "FAILED" and r["kind"] != "baseline"]


def _prepare(case, impl, input_sets, ref, device):
    """(row, the rotating timed call, or None if the implementation failed)."""
    row = {"op": case.op, "case": case.name, "series": case.series, "x": case.x, "x_label": case.x_label,
           "impl": impl.name, "kind": impl.kind, "metric": case.metric,
           "dtype": str(case.dtype).removeprefix("torch."), "status": "ok"}
    try:
        runs = [impl.make(t) for t in input_sets]
        check_outputs(case.view(runs[0]()), ref, case.tol)
        row["peak_mem_bytes"] = timing.peak_memory_bytes(runs[0], device)
    except Exception as e:  # any failure is reported, and the next implementation still runs
        return _failed(row, e), None
    return row, _rotating(runs)


def run_impl(case, impl, input_sets, ref, device):
    row, call = _prepare(case, impl, input_sets, ref, device)
    if call is None:
        return row
    try:
        return _with_time(case, row, timing.time_ms(call, device, case.budget_ms))
    except Exception as e:
        return _failed(row, e)


def _with_time(case, row, time_ms):
    row["time_ms"] = time_ms
    row["value"] = case.work / row["time_ms"] / (1e6 if case.metric == "GB/s" else 1e9)
    for key, amount in case.per_call.items():
        row[f"{key}_per_s"] = amount / row["time_ms"] * 1e3
    if case.peak_tflops:
        row["peak_tflops"] = case.peak_tflops
        row["mfu_pct"] = 100 * row["value"] / case.peak_tflops
    return row


def ceiling_of(row, ceilings):
    """The measured ceiling a row is held to: memory bandwidth for GB/s, for TFLOP/s the matmul
    rate in the row's dtype (a bf16 row against the fp32 rate read 163-267% on a bf16 CPU); None
    where that dtype's rate was not measured."""
    if row["metric"] == "GB/s":
        return ceilings["memory_GBps"]
    return ceilings["matmul_TFLOPs_by_dtype"].get(row["dtype"])


def add_derived(rows, ceilings):
    """% of the measured ceiling and speedup over each baseline of the same case."""
    for row in rows:
        if row["status"] != "ok":
            continue
        ceiling = ceiling_of(row, ceilings)
        row["pct_ceiling"] = None if ceiling is None else 100 * row["value"] / ceiling
        row["speedup"] = {b["impl"]: b["time_ms"] / row["time_ms"] for b in rows
                          if b["case"] == row["case"] and b["op"] == row["op"]
                          and b["kind"] == "baseline" and b["status"] == "ok"}
    return rows


def _run_interleaved(case, impls, input_sets, ref, device):
    prepared = [_prepare(case, impl, input_sets, ref, device) for impl in impls]
    timed = [(row, call) for row, call in prepared if call is not None]
    try:
        times = timing.time_interleaved([call for _, call in timed], device, case.budget_ms)
    except Exception as e:  # which one failed is unknown: every timed row reports the error
        return [_failed(row, e) if call is not None else row for row, call in prepared]
    for (row, _), t in zip(timed, times):
        _with_time(case, row, t)
    return [row for row, _ in prepared]


def run_case(case, device, impl_filter=None, log=print):
    input_sets = [case.make_inputs()]
    ref = case.reference(input_sets[0])
    input_sets += [case.make_inputs() for _ in range(timing.rotation_count(case.working_set, device) - 1)]
    if impl_filter:
        impls = [impl for impl in case.impls if impl.name in impl_filter]
    else:  # emulated backends run only when named
        impls = [impl for impl in case.impls if impl.kind != "emulated"]
    interleave = device.type == "cpu"
    rows = _run_interleaved(case, impls, input_sets, ref, device) if interleave else []
    for impl in impls:
        if not interleave:
            rows.append(run_impl(case, impl, input_sets, ref, device))
            _free(device)
        r = next(r for r in rows if r["impl"] == impl.name)
        emulated = " (emulated)" if impl.kind == "emulated" else ""
        log(f"  {case.op:>20} {case.name:<40} {impl.name:<32} "
            + (f"{r['time_ms']:9.3f} ms{emulated}" if r["status"] == "ok" else f"{r['status']} {r['error']}"))
    not_run = {**case.skipped, **{i.name: emulated_reason(i.name) for i in case.impls if i not in impls}}
    skipped = [{"op": case.op, "case": case.name, "impl": n, "status": "skipped", "reason": why}
               for n, why in not_run.items() if why and (not impl_filter or n in impl_filter)]
    del input_sets, ref
    _free(device, always=True)
    return rows, skipped

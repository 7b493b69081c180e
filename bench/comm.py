"""Collective bandwidth, and what it means for a data-parallel training step on N GPUs.

Run with one process per GPU:  torchrun --nproc_per_node=N -m bench comm [--out DIR]
(on CPU the same runs over gloo). For each collective and message size it reports, as
nccl-tests does, with S the message size in bytes (the full buffer), t the median time, n ranks:
  algbw = S / t
  busbw = algbw · 2(n-1)/n  for all-reduce       (each byte crosses the slowest link 2(n-1)/n times)
          algbw · (n-1)/n   for reduce-scatter and all-gather
busbw is comparable to the link's hardware bandwidth whatever n is; with n = 1 it is 0.

The projection answers "how would this step run on N GPUs" on paper: data parallel moves the
gradients through one all-reduce per step, t_comm = 2(n-1)/n · 4P / busbw. Without overlap
the step takes t_compute + t_comm; with bucketed overlap only the part of t_comm that does not
fit under the backward (about 2/3 of t_compute) plus the last bucket's all-reduce remains.
"""
import math

import torch

SIZES = [1 << p for p in range(10, 31, 2)]  # 1 KB .. 1 GB
BUS_FACTOR = {"all_reduce": lambda n: 2 * (n - 1) / n,
              "reduce_scatter": lambda n: (n - 1) / n,
              "all_gather": lambda n: (n - 1) / n}


def bus_bandwidth(collective, size_bytes, seconds, n_ranks):
    """(algbw, busbw) in GB/s for one collective of size_bytes taking seconds."""
    algbw = size_bytes / seconds / 1e9
    return algbw, algbw * BUS_FACTOR[collective](n_ranks)


def _run_once(comm, collective, buffer, shard):
    if collective == "all_reduce":
        return comm.all_reduce(buffer)
    if collective == "reduce_scatter":
        return comm.reduce_scatter(shard, buffer)
    return comm.all_gather(buffer, shard)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(comm, sizes=SIZES, iters=20, warmup=5):
    """Median time per collective and size; every rank must call it. Rows of dicts."""
    import time
    n, device = comm.env.world_size, comm.device
    rows = []
    for size in sizes:
        numel = max(n, size // 4 // n * n)
        buffer = torch.randn(numel, device=device)
        shard = buffer[comm.env.rank * (numel // n):(comm.env.rank + 1) * (numel // n)].clone()
        for collective in BUS_FACTOR:
            times = []
            for i in range(warmup + iters):
                _sync(device)
                t0 = time.perf_counter()
                done = _run_once(comm, collective, buffer, shard)
                if done is not None:
                    done.synchronize()
                times.append(time.perf_counter() - t0)
            median = sorted(times[warmup:])[iters // 2]
            algbw, busbw = bus_bandwidth(collective, numel * 4, median, n)
            rows.append(dict(collective=collective, bytes=numel * 4, time_us=median * 1e6,
                             algbw_gbs=algbw, busbw_gbs=busbw))
    return rows


def project(step_seconds, n_params, busbw_gbs, gpus, bucket_bytes=25 << 20):
    """Projected data-parallel step time and scaling efficiency on `gpus` GPUs, from a measured
    single-GPU step and the all-reduce bus bandwidth (GB/s) of the slowest link involved."""
    grad_bytes = 4 * n_params
    if gpus == 1:
        return dict(gpus=1, comm_ms=0.0, step_ms_no_overlap=step_seconds * 1e3,
                    step_ms_overlap=step_seconds * 1e3, efficiency_no_overlap=1.0, efficiency_overlap=1.0)
    factor = BUS_FACTOR["all_reduce"](gpus)
    comm = factor * grad_bytes / (busbw_gbs * 1e9)
    last_bucket = factor * min(bucket_bytes, grad_bytes) / (busbw_gbs * 1e9)
    hidden = min(comm - last_bucket, step_seconds * 2 / 3)  # backward is ~2/3 of the step
    no_overlap, overlap = step_seconds + comm, step_seconds + comm - max(0.0, hidden)
    return dict(gpus=gpus, comm_ms=comm * 1e3, step_ms_no_overlap=no_overlap * 1e3,
                step_ms_overlap=overlap * 1e3, efficiency_no_overlap=step_seconds / no_overlap,
                efficiency_overlap=step_seconds / overlap)


def projection_table(step_seconds, n_params, intra_busbw_gbs, inter_busbw_gbs, gpus_per_node=8,
                     gpu_counts=(1, 2, 4, 8, 16, 32, 64)):
    """Rows of `project` for each GPU count: within a node the intra-node bus bandwidth
    (NVLink), across nodes the inter-node one (the ring is limited by its slowest link)."""
    rows = []
    for g in gpu_counts:
        busbw = intra_busbw_gbs if g <= gpus_per_node else inter_busbw_gbs
        rows.append(dict(project(step_seconds, n_params, busbw, g), nodes=math.ceil(g / gpus_per_node),
                         busbw_gbs=busbw))
    return rows

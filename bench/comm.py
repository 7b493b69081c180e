"""`python -m bench comm`: collective bandwidth, and what it means for a data-parallel step on N GPUs.

Measure, one process per GPU (on CPU the same runs over gloo, with smaller sizes):
    torchrun --nproc_per_node=N -m bench comm [--max_bytes B] [--out DIR]
For each collective and message size S (bytes of the full buffer), with t the median time of
one call and n ranks, as nccl-tests reports them:
    algbw = S / t
    busbw = algbw · 2(n-1)/n   all-reduce       (each byte crosses the slowest link 2(n-1)/n times)
            algbw · (n-1)/n    reduce-scatter, all-gather
busbw is comparable with the link's hardware bandwidth whatever n is (with n = 1 it is 0).

Project, from a measured single-GPU step (e.g. `train_step` in `python -m bench`, or the
ms/step of a 1-GPU `nanolm.train` run) and busbw figures (measured here, or given):
    python -m bench comm --step_ms 300 --params 124e6 --intra_busbw 360 --inter_busbw 45
Data parallel all-reduces 4P bytes of fp32 gradients per step:
    t_comm = 2(n-1)/n · 4P / busbw
    no overlap:  t_step + t_comm
    overlap:     t_step + max(t_last_bucket, t_comm - t_backward)
with t_backward ≈ 2/3 of t_step (backward FLOPs are twice the forward's) and t_last_bucket the
all-reduce of one bucket, which can only start once the backward is over. Within a node the
ring runs at the intra-node busbw (NVLink); beyond one node at the inter-node one (the ring is
as fast as its slowest link). Efficiency = t_step / projected step (weak scaling: same batch
per GPU). ZeRO-1 moves the same bytes (reduce-scatter + all-gather), but its all-gather waits
for the optimizer, so it adds about t_comm/2 un-hidden to the overlap figure.

Tensor parallel (--tp N, with --n_layer, --n_embd, --tokens: the micro-batch B*T of one step):
one training step of a tp group issues (nanolm/tensor_parallel.py)
    forward   2 all-reduces of (B*T, C) per block (attention and MLP c_proj outputs, in the
              autocast dtype: --act_bytes, 2 for bf16) + 1 at the embedding (fp32)
    backward  2 all-reduces of (B*T, C) per block (gradients at c_attn and c_fc inputs) + 1 at
              the lm_head input, in the fp32 residual stream's dtype
    loss      1 all-gather of 3 fp32 per row and rank (the softmax statistics) per chunk
Under torchrun with --tp it times each of them at its size (run with N = tp processes, one
node). The projection takes the per-layer all-reduce volume
    t_layer = 2(n-1)/n * B*T*C * (2 act_bytes + 2*4) / busbw
against the per-layer compute of the 1-GPU step split n ways, t_step / (n L). nanolm issues each
all-reduce on the critical path (its result feeds the next op), so nothing hides it: the
projected step is t_step / n + L t_layer (+ the two fp32 all-reduces at the embedding and the
lm_head), at the intra-node (NVLink) and inter-node busbw. The statistics all-gather (12n bytes
a row) is left out: latency-bound, well under one layer's all-reduce.
"""
import argparse
import json
import math
import os
import sys
import time

import torch

SIZES = [1 << p for p in range(10, 31, 2)]  # 1 KB .. 1 GB, ×4
BUS_FACTOR = {"all_reduce": lambda n: 2 * (n - 1) / n,
              "reduce_scatter": lambda n: (n - 1) / n,
              "all_gather": lambda n: (n - 1) / n}
BACKWARD_FRACTION = 2 / 3


def bus_bandwidth(collective, size_bytes, seconds, n_ranks):
    """(algbw, busbw) in GB/s for one collective of size_bytes taking seconds."""
    algbw = size_bytes / seconds / 1e9
    return algbw, algbw * BUS_FACTOR[collective](n_ranks)


def _run_once(comm, collective, buffer, piece):
    if collective == "all_reduce":
        return comm.all_reduce(buffer)
    if collective == "reduce_scatter":
        return comm.reduce_scatter(piece, buffer)
    return comm.all_gather(buffer, piece)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(comm, sizes=SIZES, iters=20, warmup=5):
    """Median time of each collective at each size; every rank must call it. Rows of dicts.
    In-place forms, as the training step uses them (piece = this rank's slice of buffer)."""
    n, rank, device = comm.env.world_size, comm.env.rank, comm.device
    rows = []
    for size in sizes:
        numel = max(n, size // 4 // n * n)
        buffer = torch.randn(numel, device=device)
        piece = buffer[rank * (numel // n):(rank + 1) * (numel // n)]
        for collective in BUS_FACTOR:
            times = []
            for _ in range(warmup + iters):
                _sync(device)
                t0 = time.perf_counter()
                comm.wait(_run_once(comm, collective, buffer, piece))
                _sync(device)
                times.append(time.perf_counter() - t0)
            median = sorted(times[warmup:])[iters // 2]
            algbw, busbw = bus_bandwidth(collective, numel * 4, median, n)
            rows.append(dict(collective=collective, bytes=numel * 4, ranks=n, time_us=median * 1e6,
                             algbw_gbs=algbw, busbw_gbs=busbw))
    return rows


def busbw_at(rows, size_bytes, collective="all_reduce"):
    """busbw of the measured size nearest (in log scale) to size_bytes."""
    rows = [r for r in rows if r["collective"] == collective]
    return min(rows, key=lambda r: abs(math.log(r["bytes"] / size_bytes)))["busbw_gbs"]


def project(step_seconds, n_params, busbw_gbs, gpus, bucket_bytes=25 << 20):
    """Projected data-parallel step time and scaling efficiency on `gpus` GPUs, from a measured
    single-GPU step and the all-reduce bus bandwidth (GB/s) of the slowest link involved."""
    if gpus == 1:
        ms = step_seconds * 1e3
        return dict(gpus=1, comm_ms=0.0, step_ms_no_overlap=ms, step_ms_overlap=ms,
                    efficiency_no_overlap=1.0, efficiency_overlap=1.0)
    grad_bytes = 4 * n_params
    factor = BUS_FACTOR["all_reduce"](gpus)
    comm = factor * grad_bytes / (busbw_gbs * 1e9)
    last_bucket = factor * min(bucket_bytes, grad_bytes) / (busbw_gbs * 1e9)
    no_overlap = step_seconds + comm
    overlap = step_seconds + max(last_bucket, comm - BACKWARD_FRACTION * step_seconds)
    return dict(gpus=gpus, comm_ms=comm * 1e3, step_ms_no_overlap=no_overlap * 1e3,
                step_ms_overlap=overlap * 1e3, efficiency_no_overlap=step_seconds / no_overlap,
                efficiency_overlap=step_seconds / overlap)


def projection_table(step_seconds, n_params, intra_busbw_gbs, inter_busbw_gbs, gpus_per_node=8,
                     gpu_counts=(1, 2, 4, 8, 16, 32, 64), bucket_bytes=25 << 20):
    """Rows of `project` for each GPU count: within a node at the intra-node bus bandwidth,
    across nodes at the inter-node one (counts beyond one node are skipped without it)."""
    rows = []
    for g in gpu_counts:
        busbw = intra_busbw_gbs if g <= gpus_per_node else inter_busbw_gbs
        if busbw is None:
            continue
        rows.append(dict(project(step_seconds, n_params, busbw, g, bucket_bytes),
                         nodes=math.ceil(g / gpus_per_node), busbw_gbs=busbw))
    return rows


def tp_collectives(n_layer, n_embd, tokens, tp, act_bytes=2):
    """The tensor-parallel collectives of one training step of a tp group: rows of
    (collective, where, bytes of one call, calls per step)."""
    rows_x_c = tokens * n_embd
    return [dict(collective="all_reduce", where="c_proj outputs (fwd)", bytes=rows_x_c * act_bytes,
                 count=2 * n_layer),
            dict(collective="all_reduce", where="c_attn, c_fc inputs (bwd)", bytes=rows_x_c * 4, count=2 * n_layer),
            dict(collective="all_reduce", where="embedding (fwd), lm_head input (bwd)", bytes=rows_x_c * 4, count=2),
            dict(collective="all_gather", where="cross-entropy statistics", bytes=tokens * 3 * 4 * tp, count=1)]


def measure_tp(comm, collectives, iters=20, warmup=5):
    """Median time of each TP collective at its own size on comm (every rank calls it)."""
    n, device = comm.env.world_size, comm.device
    rows = []
    for c in collectives:
        numel = max(n, c["bytes"] // 4 // n * n)  # fp32 elements (bf16 rows: same bytes)
        buffer = torch.randn(numel, device=device)
        piece = buffer[comm.env.rank * (numel // n):(comm.env.rank + 1) * (numel // n)]
        times = []
        for _ in range(warmup + iters):
            _sync(device)
            t0 = time.perf_counter()
            comm.wait(_run_once(comm, c["collective"], buffer, piece))
            _sync(device)
            times.append(time.perf_counter() - t0)
        median = sorted(times[warmup:])[iters // 2]
        rows.append(dict(c, time_us=median * 1e6, step_ms=median * c["count"] * 1e3,
                         busbw_gbs=bus_bandwidth(c["collective"], numel * 4, median, n)[1]))
    return rows


def project_tp(step_seconds, n_layer, n_embd, tokens, tp, busbw_gbs, act_bytes=2):
    """Projected step of a tp group from the 1-GPU step: compute split tp ways plus the TP
    all-reduces, which sit on the critical path. Also the per-layer comparison."""
    factor = BUS_FACTOR["all_reduce"](tp)
    layer_bytes = tokens * n_embd * (2 * act_bytes + 2 * 4)
    layer_comm = factor * layer_bytes / (busbw_gbs * 1e9)
    layer_compute = step_seconds / tp / n_layer
    ends = factor * tokens * n_embd * 4 * 2 / (busbw_gbs * 1e9)  # embedding, lm_head input: fp32
    step = step_seconds / tp + n_layer * layer_comm + ends
    return dict(tp=tp, busbw_gbs=busbw_gbs, layer_mb=layer_bytes / 2**20, layer_comm_ms=layer_comm * 1e3,
                layer_compute_ms=layer_compute * 1e3, step_ms=step * 1e3,
                efficiency=step_seconds / tp / step)


def _markdown(header, cells):
    """A markdown table: header names ending in ":" are right-aligned columns."""
    rule = "|" + "|".join("---:" if h.endswith(":") else "---" for h in header) + "|"
    rows = ["| " + " | ".join(row) + " |" for row in [[h.rstrip(":") for h in header], *cells]]
    return "\n".join([rows[0], rule, *rows[1:]])


def format_tp(rows):
    return _markdown(["collective", "where", "size:", "calls/step:", "time (us):", "per step (ms):", "busbw (GB/s):"],
                     [[r["collective"], r["where"], _size(r["bytes"]), str(r["count"]), f"{r['time_us']:.1f}",
                       f"{r['step_ms']:.2f}", f"{r['busbw_gbs']:.3g}"] for r in rows])


def format_tp_projection(rows):
    return _markdown(["tp:", "link", "busbw (GB/s):", "all-reduce bytes/layer:", "comm/layer (ms):",
                      "compute/layer (ms):", "step (ms):", "eff.:"],
                     [[str(r["tp"]), r["link"], f"{r['busbw_gbs']:.3g}", f"{r['layer_mb']:.1f} MB",
                       f"{r['layer_comm_ms']:.2f}", f"{r['layer_compute_ms']:.2f}", f"{r['step_ms']:.1f}",
                       f"{100 * r['efficiency']:.0f}%"] for r in rows])


def format_bandwidth(rows):
    return _markdown(["collective", "size:", "ranks:", "time (us):", "algbw (GB/s):", "busbw (GB/s):"],
                     [[r["collective"], _size(r["bytes"]), str(r["ranks"]), f"{r['time_us']:.1f}",
                       f"{r['algbw_gbs']:.3g}", f"{r['busbw_gbs']:.3g}"] for r in rows])


def format_projection(rows):
    return _markdown(["GPUs:", "nodes:", "busbw (GB/s):", "all-reduce (ms):", "step, no overlap (ms):", "eff.:",
                      "step, overlap (ms):", "eff.:"],
                     [[str(r["gpus"]), str(r["nodes"]), f"{r['busbw_gbs']:.3g}", f"{r['comm_ms']:.1f}",
                       f"{r['step_ms_no_overlap']:.1f}", f"{100 * r['efficiency_no_overlap']:.0f}%",
                       f"{r['step_ms_overlap']:.1f}", f"{100 * r['efficiency_overlap']:.0f}%"] for r in rows])


def _size(b):
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if b >= scale:
            return f"{b / scale:g} {unit}"
    return f"{b} B"


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench comm", description=__doc__.split("\n")[0])
    p.add_argument("--max_bytes", type=float, default=0, help="largest message (default 1 GB on "
                   "GPU, 16 MB on CPU)")
    p.add_argument("--iters", type=int, default=0, help="timed calls per point (default 20 GPU, 5 CPU)")
    p.add_argument("--out", default="", help="folder for comm.json (default: none)")
    p.add_argument("--step_ms", type=float, default=0, help="measured 1-GPU step time: enables the projection")
    p.add_argument("--params", type=float, default=124e6, help="parameters (gradient size /4 bytes)")
    p.add_argument("--bucket_mb", type=float, default=25.0)
    p.add_argument("--intra_busbw", type=float, default=0, help="all-reduce busbw within a node, GB/s "
                   "(default: measured here at the bucket size)")
    p.add_argument("--inter_busbw", type=float, default=0, help="all-reduce busbw across nodes, GB/s")
    p.add_argument("--gpus_per_node", type=int, default=8)
    p.add_argument("--tp", type=int, default=0, help="tensor-parallel size: time (under torchrun) and "
                   "project the TP collectives of one step")
    p.add_argument("--n_layer", type=int, default=12, help="model shape for --tp (default GPT-2 124M)")
    p.add_argument("--n_embd", type=int, default=768)
    p.add_argument("--tokens", type=int, default=8 * 1024, help="micro-batch tokens B*T per tp group")
    p.add_argument("--act_bytes", type=int, default=2, help="bytes per activation in the forward "
                   "all-reduces (2: bf16 autocast, 4: fp32)")
    p.add_argument("--timeout_s", type=float, default=300.0)
    return p.parse_args(argv)


def _measure_here(args):
    """Bandwidth rows measured by this torchrun group (rank 0 gets them; others get [])."""
    from nanolm import dist
    env = dist.env_from_torchrun()
    device = torch.device("cuda", env.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    comm = dist.init(env, device, args.timeout_s)
    max_bytes = args.max_bytes or (1 << 30 if device.type == "cuda" else 16 << 20)
    iters = args.iters or (20 if device.type == "cuda" else 5)
    rows = measure(comm, [s for s in SIZES if s <= max_bytes], iters, warmup=max(1, iters // 4))
    tp_rows = []
    if args.tp:
        if args.tp != env.world_size:
            sys.exit(f"python -m bench comm: --tp={args.tp} times the TP collectives on one tp group: "
                     f"run it with {args.tp} processes, not {env.world_size}")
        tp_rows = measure_tp(comm, tp_collectives(args.n_layer, args.n_embd, args.tokens, args.tp, args.act_bytes),
                             iters, warmup=max(1, iters // 4))
    comm.close()
    return (rows, tp_rows) if env.is_main else ([], [])


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    world = int(os.environ.get("WORLD_SIZE", 1))
    rows, tp_rows = _measure_here(args) if world > 1 else ([], [])
    if world > 1 and not rows:
        return 0  # not rank 0: rank 0 reports
    if rows:
        print(format_bandwidth(rows))
    elif not args.step_ms:
        sys.exit("python -m bench comm: run under torchrun with >= 2 processes to measure, "
                 "or give --step_ms (and --intra_busbw) for a projection")
    result = {"bandwidth": rows}
    if tp_rows:
        print(f"\ntensor-parallel collectives of one step: tp={args.tp}, L={args.n_layer}, C={args.n_embd}, "
              f"B*T={args.tokens}")
        print(format_tp(tp_rows))
        result["tp_collectives"] = tp_rows
    if args.step_ms:
        bucket = int(args.bucket_mb * 2**20)
        intra = args.intra_busbw or (busbw_at(rows, bucket) if rows else None)
        if intra is None:
            sys.exit("python -m bench comm: --step_ms needs --intra_busbw (or a measurement under torchrun)")
        result["projection"] = projection_table(args.step_ms / 1e3, args.params, intra,
                                                args.inter_busbw or None, args.gpus_per_node,
                                                bucket_bytes=bucket)
        print(f"\nprojection: {args.params / 1e6:g}M params, 1-GPU step {args.step_ms:g} ms, "
              f"{args.bucket_mb:g} MB buckets")
        print(format_projection(result["projection"]))
        if args.tp:
            links = [("intra-node", intra), ("inter-node", args.inter_busbw or None)]
            result["tp_projection"] = [dict(project_tp(args.step_ms / 1e3, args.n_layer, args.n_embd, args.tokens,
                                                       args.tp, bw, args.act_bytes), link=link)
                                       for link, bw in links if bw]
            print(f"\ntensor parallel tp={args.tp}: L={args.n_layer}, C={args.n_embd}, B*T={args.tokens} tokens; "
                  "each all-reduce is on the critical path (exposed)")
            print(format_tp_projection(result["tp_projection"]))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "comm.json"), "w") as f:
            json.dump(result, f, indent=1)
    return 0

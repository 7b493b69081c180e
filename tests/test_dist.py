"""Distributed runner: real multi-process data parallel and ZeRO-1 on CPU (gloo), checked
against one process on the global batch; failure handling; the NCCL binding on a GPU.

Every multi-process run is a set of subprocesses with a hard timeout, so a hang fails the test
instead of blocking CI.
"""
import functools
import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

import dist_worker as W
from nanolm import dist
from nanolm.metrics import read_metrics
from nanolm.optim import FlatAdamW

WORKER = os.path.join(os.path.dirname(__file__), "dist_worker.py")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_MB = 3000 / 2**20  # 3000-byte buckets: 750 elements, several per model, not dividing it
STEPS, MORE = 3, 2


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world, spec, out_dir, timeout=120, wait_for=None):
    """Start `world` worker processes and wait for those in wait_for (default: all; the others
    are then killed); returns [(returncode, stderr, seconds until exit)] of those waited for."""
    port, start = free_port(), time.monotonic()
    procs = []
    for rank in range(world):
        env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHELASTIC")}
        env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, WORKER, json.dumps(dict(spec, out=str(out_dir)))],
                                      env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    results = []
    try:
        for p in procs[:wait_for]:
            _, err = p.communicate(timeout=max(1.0, timeout - (time.monotonic() - start)))
            results.append((p.returncode, err, time.monotonic() - start))
    except subprocess.TimeoutExpired:
        pytest.fail(f"{world}-rank run did not finish in {timeout} s (hang)")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


def run_ranks(world, runs, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"w{world}")
    results = launch(world, {"runs": runs}, out)
    for rank, (code, err, _) in enumerate(results):
        assert code == 0, f"rank {rank} failed:\n{err}"
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(world)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return run_ranks(2, [
        dict(name="dp", zero=0, bucket_mb=25.0, steps=STEPS),
        dict(name="dp_small", zero=0, bucket_mb=SMALL_MB, steps=STEPS),
        dict(name="zero_small", zero=1, bucket_mb=SMALL_MB, steps=STEPS, more_steps=MORE)],
        tmp_path_factory)


@pytest.fixture(scope="module")
def three_ranks(tmp_path_factory):
    return run_ranks(3, [
        dict(name="dp_small", zero=0, bucket_mb=SMALL_MB, steps=STEPS),
        dict(name="zero", zero=1, bucket_mb=25.0, steps=STEPS),
        dict(name="zero_small", zero=1, bucket_mb=SMALL_MB, steps=STEPS)],
        tmp_path_factory)


@functools.cache
def reference(world, steps=STEPS, more=0):
    """One process, batch BATCH*world: the global batch of `world` ranks."""
    run = W.make_run(dist.Context(dist.DistEnv(), torch.device("cpu")), W.BATCH * world)
    W.train(run, steps)
    first = W.weights(run)
    W.train(run, more)
    return first, W.weights(run)


def assert_weights_close(got, want):
    """fp32 tolerance. The key bias (c_attn.bias[C:2C]) has an analytically zero gradient, so
    its gradient is rounding noise that Adam turns into lr-sized steps: compared loosely (as in
    test_optim)."""
    assert got.keys() == want.keys()
    for name in want:
        p, q = got[name], want[name]
        if name.endswith("c_attn.bias"):
            C = p.numel() // 3
            torch.testing.assert_close(p[C:2 * C], q[C:2 * C], rtol=0, atol=1e-4, msg=name)
            p, q = torch.cat([p[:C], p[2 * C:]]), torch.cat([q[:C], q[2 * C:]])
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("world,name", [(2, "dp"), (2, "dp_small"), (2, "zero_small"),
                                        (3, "dp_small"), (3, "zero"), (3, "zero_small")])
def test_matches_one_process_on_global_batch(world, name, two_ranks, three_ranks):
    ranks = two_ranks if world == 2 else three_ranks
    want, _ = reference(world)
    assert_weights_close(ranks[0][name]["weights"], want)
    for other in ranks[1:]:  # every rank ends with the very same weights
        for key, w in ranks[0][name]["weights"].items():
            assert torch.equal(other[name]["weights"][key], w), key


@pytest.mark.parametrize("world", [2, 3])
def test_zero_shards_optimizer_state(world, two_ranks, three_ranks):
    ranks = two_ranks if world == 2 else three_ranks
    r = ranks[0]["zero_small"]
    assert r["flat_numel"] % world == 0 and r["moments_numel"] == r["flat_numel"] // world
    assert len(r["buckets"]) > 3  # several buckets, so pieces are scattered over the buffer
    decay = FlatAdamW(W.make_run(dist.Context(dist.DistEnv(), torch.device("cpu")), 1).model
                      .named_parameters(), 1e-3).decay_numel
    pieces = [dist.piece(dist.Bucket(s, e, 0), rank, world) for s, e in r["buckets"] for rank in range(world)]
    cut = decay // world * world  # the 1-D parameters after it get buckets of their own
    assert all(e <= cut or s >= cut for s, e in r["buckets"])
    # so a piece straddles the weight-decay boundary only when it is not a multiple of world
    # (that update path: test_sharded_update_straddling_decay_matches_whole_buffer)
    assert any(s < decay < e for s, e in pieces) == (decay % world != 0)
    # the gathered state is whole and identical on every rank
    for other in ranks[1:]:
        assert torch.equal(other["zero_small"]["opt"]["exp_avg_sq"], r["opt"]["exp_avg_sq"])


def test_resume_two_rank_checkpoint_on_one_rank(two_ranks):
    """The ZeRO-1 state saved by 2 ranks (gathered) continues on 1 rank with batch 2*BATCH,
    and lands where the 2 ranks themselves went on to."""
    saved = two_ranks[0]["zero_small"]
    run = W.make_run(dist.Context(dist.DistEnv(), torch.device("cpu")), 2 * W.BATCH)
    for name, p in run.model.named_parameters():
        p.data.copy_(saved["weights"][name])
    run.opt.load_state_dict(saved["opt"])
    run.train.load_state_dict(saved["loader"])
    W.train(run, MORE)
    assert_weights_close(W.weights(run), saved["more_weights"])
    _, want = reference(2, STEPS, MORE)
    assert_weights_close(W.weights(run), want)


def test_make_buckets_cover_from_the_end():
    views = [(0, 10), (10, 7), (17, 40), (57, 3)]  # 60 elements, padded to 63 for W=3
    buckets = dist.make_buckets(views, 63, 13, 3)
    assert [(b.start, b.end) for b in buckets] == [(51, 63), (39, 51), (27, 39), (15, 27), (3, 15), (0, 3)]
    assert [b.params for b in buckets] == [2, 1, 1, 2, 2, 1]
    assert dist.piece(buckets[0], 2, 3) == (59, 63)
    assert [(b.start, b.end) for b in dist.make_buckets(views, 63, 1000, 3)] == [(0, 63)]
    assert [(b.start, b.end) for b in dist.make_buckets(views, 63, 1, 3)][-1] == (0, 3)
    with pytest.raises(ValueError, match="not padded to a multiple of 3"):
        dist.make_buckets(views, 62, 13, 3)
    # a cut at 58 (rounded down to 57): no bucket crosses it, the rest as before on each side
    cut = dist.make_buckets(views, 63, 13, 3, cuts=[58])
    assert [(b.start, b.end) for b in cut] == [(57, 63), (45, 57), (33, 45), (21, 33), (9, 21), (0, 9)]
    assert [b.params for b in cut] == [1, 1, 1, 1, 3, 1]


class LaunchRecorder:
    """A 1-rank comm that records, for each bucket it is asked to reduce, the names of the
    parameters whose final gradient existed by then."""
    env = dist.DistEnv()

    def __init__(self, done):
        self.done, self.launches = done, []

    def all_reduce(self, tensor, average=True):
        self.launches.append((tensor.data_ptr(), set(self.done)))
        return len(self.launches)  # the handle: anything but None, which means "not launched"

    def wait(self, handle):
        pass


def test_last_layer_bucket_launches_before_the_backward_reaches_layer_0():
    """The 1-D parameters include layer 0's LayerNorms, whose gradients come only at the end of
    the backward; the last layer's weights, ready first, must not share their bucket and wait."""
    torch.manual_seed(0)
    model = W.GPT(W.MODEL, W.TORCH)
    opt = FlatAdamW(model.named_parameters(), 1e-3, weight_decay=0.1, backend=W.TORCH["adamw"])
    done = []
    for name, p in zip(opt.names, opt.params):  # registered before the reducer's hooks, so they run first
        p.register_post_accumulate_grad_hook(lambda _, name=name: done.append(name))
    comm = LaunchRecorder(done)
    bucket_bytes = 4 * (opt.numel - opt.decay_numel + 1024)  # the 1-D tail + 1024 elements of 2-D weights
    reducer = dist.GradReducer(comm, opt, bucket_bytes, zero=0)
    reducer.arm()
    idx = torch.randint(0, W.MODEL.vocab_size, (2, W.MODEL.block_size))
    model(idx, idx).backward()
    reducer.finish()
    assert len(comm.launches) == len(reducer.buckets)
    last_proj = f"transformer.h.{W.MODEL.n_layer - 1}.mlp.c_proj.weight"
    offset = next(off for name, off, _ in opt.layout if name == last_proj)
    bucket = next(b for b in reducer.buckets if b.start <= offset < b.end)
    done_at_launch = dict(comm.launches)[opt.flat_grad[bucket.start:].data_ptr()]
    assert last_proj in done_at_launch
    assert not any(name.startswith("transformer.h.0.") for name in done_at_launch), \
        "the last layer's bucket waited for layer 0's gradients"


class OneRankComm:
    """Every collective of a 1-rank group is the identity."""
    env = dist.DistEnv()

    def all_reduce(self, tensor, average=True):
        return None

    def all_gather(self, output, input):
        return None

    def wait(self, handle):
        pass


def test_sharded_update_straddling_decay_matches_whole_buffer():
    """Updating the buffer piece by piece (decay_numel translated per piece, one piece across
    the decay boundary) is the same AdamW as one call over the whole buffer."""
    ctx = dist.Context(dist.DistEnv(), torch.device("cpu"))
    whole, pieces = W.make_run(ctx, 1).opt, W.make_run(ctx, 1).opt
    d, n = whole.decay_numel, whole.flat_param.numel()
    cuts = [0, d // 2, d + 5, n - 1, n]  # the piece [d//2, d+5) straddles the boundary
    pieces.shard(OneRankComm(), [((a, b), (a, b)) for a, b in zip(cuts, cuts[1:])])
    for _ in range(3):
        g = torch.randn(n)
        whole.flat_grad.copy_(g)
        pieces.flat_grad.copy_(g)
        torch.testing.assert_close(pieces.step(), whole.step(), rtol=1e-6, atol=0)
    torch.testing.assert_close(pieces.flat_param, whole.flat_param, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(pieces.state_dict()["exp_avg_sq"], whole.state_dict()["exp_avg_sq"])


def test_padding_is_never_updated():
    opt = FlatAdamW(W.make_run(dist.Context(dist.DistEnv(), torch.device("cpu")), 1).model
                    .named_parameters(), 1e-2, weight_decay=0.1, backend=W.TORCH["adamw"], pad_to=7)
    assert opt.flat_param.numel() % 7 == 0 and opt.flat_param.numel() - opt.numel < 7
    opt.flat_grad[:opt.numel].normal_()
    opt.step()
    assert (opt.flat_param[opt.numel:] == 0).all() and opt.state_dict()["exp_avg"].numel() == opt.numel


@pytest.mark.parametrize("arg,match", [("--zero=2", "zero must be 0 or 1"),
                                       ("--bucket_mb=0", "bucket_mb must be positive"),
                                       ("--dist_timeout_s=-1", "dist_timeout_s must be positive")])
def test_config_errors(arg, match):
    from nanolm.config import ConfigError, parse_args
    with pytest.raises(ConfigError, match=match):
        parse_args([arg])


@pytest.mark.parametrize("fault,timeout_s", [("die_at", 30.0), ("hang_at", 3.0)])
def test_failed_rank_stops_the_others(fault, timeout_s, tmp_path):
    """Rank 1 dies (os._exit) or hangs at step 2: rank 0 must exit non-zero, naming itself and
    the collective, soon after (a dead peer: at once; a hung one: after the timeout)."""
    spec = {"runs": [dict(name="dp", zero=0, bucket_mb=SMALL_MB, steps=6)], fault: 2, "timeout_s": timeout_s}
    [(code, err, seconds)] = launch(2, spec, tmp_path, timeout=60, wait_for=1)
    assert code == 1, err
    assert "nanolm.dist: rank 0/2:" in err and any(c in err for c in ("all_reduce", "reduce_scatter"))
    assert seconds < 20, f"rank 0 took {seconds:.1f} s to notice"


def test_torchrun_train_zero1_resumes_on_one_rank(tmp_path, monkeypatch):
    """`torchrun -m nanolm.train` end to end with ZeRO-1: only rank 0 prints and writes; its
    step-4 checkpoint (gathered optimizer state) resumes on 1 process, which takes the global
    batch as its own (batch_size 2 x 2 ranks -> 4) and reaches the 2 ranks' own step 6 weights."""
    from nanolm.train import config_from_args, train
    args = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--eval_iters=1",
            "--log_interval=2", "--max_steps=6", "--eval_interval=100", "--sample_tokens=4",
            "--kernels=torch", "--grad_accum=2", "--ckpt_interval=4", "--warmup=2", "--lr=3e-3",
            "--dtype=float32"]  # compared at fp32 tolerance across batch splits: no bf16 autocast
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "nanolm.train", *args, "--batch_size=2", "--zero=1", f"--bucket_mb={SMALL_MB}",
           f"--out_dir={tmp_path / 'two'}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHELASTIC")}
    p = subprocess.run(cmd, cwd=tmp_path, env=dict(env, OMP_NUM_THREADS="1"), capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("sample:") == 1 and p.stdout.count("step     6 | loss") == 1, p.stdout
    monkeypatch.chdir(tmp_path)
    resumed = config_from_args([f"--resume={tmp_path / 'two' / 'ckpt_00000004.pt'}", f"--out_dir={tmp_path / 'one'}"])
    assert resumed.batch_size == 4
    train(resumed)
    two = torch.load(tmp_path / "two" / "ckpt_00000006.pt", weights_only=True)
    one = torch.load(tmp_path / "one" / "ckpt_00000006.pt", weights_only=True)
    assert two["optimizer"]["exp_avg"].numel() == one["optimizer"]["exp_avg"].numel()
    assert_weights_close(one["model"], two["model"])
    # the val loss is a global estimate: the same windows on 2 ranks of 2 as on 1 rank of 4
    val = {d: [r["val_loss"] for r in read_metrics(tmp_path / d) if r["kind"] == "eval" and r["step"] == 6]
           for d in ("one", "two")}
    assert val["one"][0] == pytest.approx(val["two"][0], rel=1e-4)


def test_per_rank_batch_keeps_the_global_batch():
    from nanolm.config import ConfigError
    from nanolm.train import per_rank_batch
    saved = {"batch_size": 6, "world_size": 2}
    assert [per_rank_batch(saved, w) for w in (1, 2, 3, 4, 6)] == [12, 6, 4, 3, 2]
    with pytest.raises(ConfigError, match="global batch of 12 sequences .* does not split evenly over 5 ranks"):
        per_rank_batch(saved, 5)


# ----------------------------------------------------------------------------- NCCL (GPU)

def nccl_comm(timeout_s=30.0):
    env = dist.DistEnv()
    store = torch.distributed.TCPStore("127.0.0.1", free_port(), 1, is_master=True)
    return dist.NcclComm(env, torch.distributed.PrefixStore("t", store), timeout_s)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nccl_one_rank_collectives(dtype):
    """On one rank every collective is a copy or the identity, but each one goes through the
    ctypes signatures, the dtype table, the comm stream and its event ordering."""
    comm = nccl_comm()
    n = 1000003
    x = torch.randn(n, device="cuda").to(dtype)
    y = x.clone()
    y.mul_(3)  # queued on the compute stream just before: the comm stream must wait for it
    comm.wait(comm.all_reduce(y, average=True))
    torch.testing.assert_close(y, x * 3, rtol=0, atol=0)
    comm.wait(comm.all_reduce(y, average=False))
    torch.testing.assert_close(y, x * 3, rtol=0, atol=0)
    out = torch.full_like(x, float("nan"))
    comm.wait(comm.reduce_scatter(out, x))
    torch.testing.assert_close(out, x, rtol=0, atol=0)
    out.fill_(float("nan"))
    comm.wait(comm.all_gather(out, x))
    torch.testing.assert_close(out, x, rtol=0, atol=0)
    comm.wait(comm.broadcast(y, root=0))
    torch.testing.assert_close(y, x * 3, rtol=0, atol=0)
    with pytest.raises(ValueError, match="ncclAllReduce: needs contiguous tensors"):
        comm.all_reduce(torch.zeros(4, 4, device="cuda").t())
    assert comm.version >= 21400
    comm.close()


@pytest.mark.gpu
def test_nccl_one_rank_zero1_step_matches_single_process():
    """GradReducer hooks on the CUDA autograd thread, reduce-scatter into the pieces, sharded
    AdamW and the all-gather, on a real (1-rank) communicator."""
    comm = nccl_comm()
    torch.manual_seed(0)
    model = W.GPT(W.MODEL, W.TORCH).cuda()
    ref = W.GPT(W.MODEL, W.TORCH).cuda()
    ref.load_state_dict(model.state_dict())
    opts = [FlatAdamW(m.named_parameters(), 3e-3, weight_decay=0.1, grad_clip=0.05, backend=W.TORCH["adamw"])
            for m in (model, ref)]
    reducer = dist.data_parallel(comm, opts[0], SMALL_MB, zero=1)
    for step in range(3):
        idx = torch.randint(0, 40, (2, 8), device="cuda", generator=torch.Generator("cuda").manual_seed(step))
        for m, opt in zip((model, ref), opts):
            opt.zero_grad()
            if m is model:
                reducer.arm()
            m(idx, idx).backward()
            if m is model:
                reducer.finish()
            opt.step()
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    comm.close()


ABORT_SCRIPT = """
import time, torch
from test_dist import nccl_comm
comm = nccl_comm(timeout_s=1.0)
x = torch.ones(1 << 20, device="cuda")
torch.cuda._sleep(1 << 36)   # ~40 s of GPU clock cycles: far longer than the timeout
comm.all_reduce(x)           # so the collective, ordered after it, cannot finish in time
time.sleep(60)
"""


def gloo_threads():
    tasks = f"/proc/{os.getpid()}/task"
    return sorted(n for n in (open(f"{tasks}/{t}/comm").read().strip() for t in os.listdir(tasks)) if "gloo" in n)


def test_gloo_close_stops_every_groups_threads_while_the_model_holds_them():
    """Context.close() joins the gloo threads of the world and of every sub-group, although the
    model and optimizer still hold the sub-groups' GlooComm: left to interpreter exit, that
    teardown raced Python's finalisation and aborted torchrun ranks now and then."""
    env = dist.DistEnv(0, 1)
    store = torch.distributed.TCPStore("127.0.0.1", free_port(), 1, is_master=True, wait_for_workers=False)
    ctx = dist.Context(env, torch.device("cpu"))
    ctx.comm = dist.GlooComm(env, store, timeout_s=30)
    try:
        held_by_the_model = ctx.tp_comm = ctx.comm.split([[0]], "tp")
        x = torch.ones(3)
        held_by_the_model.wait(held_by_the_model.all_reduce(x))
        assert x.tolist() == [1.0, 1.0, 1.0] and gloo_threads()
    finally:
        ctx.close()
    assert gloo_threads() == []


@pytest.mark.gpu
def test_nccl_watchdog_aborts_and_exits():
    start = time.monotonic()
    p = subprocess.run([sys.executable, "-c", ABORT_SCRIPT], cwd=os.path.dirname(__file__),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1, p.stderr
    assert "rank 0/1: ncclAllReduce timed out after 1 s; aborting the communicator" in p.stderr
    assert "rank 0/1: ncclAllReduce timed out after 1 s; exiting" in p.stderr
    assert time.monotonic() - start < 30


# ----------------------------------------------------------------------------- comm bench

def test_comm_bench_formulas_and_projection():
    from bench import comm
    assert comm.bus_bandwidth("all_reduce", 8e9, 1.0, 4) == pytest.approx((8.0, 12.0))
    assert comm.bus_bandwidth("all_gather", 8e9, 1.0, 4) == pytest.approx((8.0, 6.0))
    # 100M params, 8 GPUs at 100 GB/s: t_comm = 2*7/8 * 400 MB / 100 GB/s = 7 ms
    r = comm.project(0.3, 100e6, 100.0, 8, bucket_bytes=40e6)
    assert r["comm_ms"] == pytest.approx(7.0)
    assert r["step_ms_no_overlap"] == pytest.approx(307.0)
    assert r["step_ms_overlap"] == pytest.approx(300.7)  # only the last 40 MB bucket shows
    slow = comm.project(0.03, 100e6, 1.0, 8, bucket_bytes=40e6)  # comm outlasts the backward
    assert slow["step_ms_overlap"] == pytest.approx(30 + 700 - 20)
    rows = comm.projection_table(0.3, 100e6, 100.0, 10.0, gpus_per_node=4, gpu_counts=(1, 4, 8))
    assert [(r["gpus"], r["nodes"], r["busbw_gbs"]) for r in rows] == [(1, 1, 100.0), (4, 1, 100.0), (8, 2, 10.0)]
    assert rows[0]["efficiency_overlap"] == 1.0 and rows[2]["efficiency_no_overlap"] < rows[1]["efficiency_no_overlap"]
    table = [dict(collective="all_reduce", bytes=b, busbw_gbs=b / 1e6) for b in (1 << 20, 1 << 24, 1 << 28)]
    assert comm.busbw_at(table, 25 << 20) == (1 << 24) / 1e6


def test_comm_bench_tensor_parallel_projection():
    from bench import comm
    # GPT-2 124M, B*T = 8192, bf16 forward: 8192*768*(2*2 + 2*4) bytes = 72 MiB per layer;
    # at tp=8 and 360 GB/s: 2*7/8 * 75.5 MB / 360 GB/s = 0.367 ms per layer
    r = comm.project_tp(0.3, 12, 768, 8192, 8, 360.0)
    assert r["layer_mb"] == pytest.approx(72.0)
    assert r["layer_comm_ms"] == pytest.approx(2 * 7 / 8 * 8192 * 768 * 12 / 360e9 * 1e3)
    assert r["layer_compute_ms"] == pytest.approx(300 / 8 / 12)
    ends = 2 * 7 / 8 * 8192 * 768 * 8 / 360e9 * 1e3
    assert r["step_ms"] == pytest.approx(300 / 8 + 12 * r["layer_comm_ms"] + ends)
    assert comm.project_tp(0.3, 12, 768, 8192, 8, 45.0)["efficiency"] < r["efficiency"] < 1
    calls = comm.tp_collectives(12, 768, 8192, 8)
    assert sum(c["count"] for c in calls if c["collective"] == "all_reduce") == 4 * 12 + 2


def test_comm_bench_cli_projection(capsys, tmp_path):
    from bench.cli import main
    assert main(["comm", "--step_ms=300", "--params=124e6", "--intra_busbw=360", "--inter_busbw=45",
                 f"--out={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "| 64 | 8 | 45 |" in out and "step, overlap (ms)" in out
    assert len(json.loads((tmp_path / "comm.json").read_text())["projection"]) == 7
    with pytest.raises(SystemExit, match="run under torchrun"):
        main(["comm"])


def test_comm_bench_measures_under_torchrun(tmp_path):
    """Two gloo processes through the bench CLI: bandwidth rows for every collective and size."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHELASTIC")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "bench", "comm", "--max_bytes=4096", "--iters=2", "--step_ms=100", f"--out={tmp_path}",
           "--tp=2", "--n_layer=2", "--n_embd=16", "--tokens=64"]
    p = subprocess.run(cmd, cwd=ROOT, env=dict(env, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    rows = json.loads((tmp_path / "comm.json").read_text())["bandwidth"]
    assert [(r["collective"], r["bytes"]) for r in rows[:3]] == [
        ("all_reduce", 1024), ("reduce_scatter", 1024), ("all_gather", 1024)]
    assert len(rows) == 6 and all(r["busbw_gbs"] > 0 and r["ranks"] == 2 for r in rows)
    assert p.stdout.count("| all_gather | 4 KB | 2 |") == 1  # rank 0 alone reports
    tp = json.loads((tmp_path / "comm.json").read_text())["tp_collectives"]  # --tp: one step's TP collectives
    assert [(r["collective"], r["bytes"], r["count"]) for r in tp] == [
        ("all_reduce", 64 * 16 * 2, 4), ("all_reduce", 64 * 16 * 4, 4), ("all_reduce", 64 * 16 * 4, 2),
        ("all_gather", 64 * 3 * 4 * 2, 1)]
    assert all(r["time_us"] > 0 for r in tp) and "| c_proj outputs (fwd) |" in p.stdout

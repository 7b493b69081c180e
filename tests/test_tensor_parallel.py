"""Tensor parallelism: the vocab-parallel cross-entropy and the model's slicing in one process
(the ranks of a group as threads, on a thread-barrier communicator), then real multi-process
TP and TP x DP training on gloo against one process on the same global batch, a killed rank,
and the gathered checkpoint resuming on one process.
"""
import os
import subprocess
import sys
import threading

import pytest
import torch

import dist_worker as W
from nanolm import dist, tensor_parallel
from nanolm.ops import cross_entropy, groups
from nanolm.config import ModelConfig
from nanolm.model import GPT
from nanolm.optim import FlatAdamW
from test_cross_entropy import cpu_backends
from test_dist import SMALL_MB, assert_weights_close, free_port, launch, reference

STEPS, MORE = 3, 2


# ----------------------------------------------------------------------------- in one process

class ThreadGroup:
    """n ranks as n threads: each collective is two barriers around a shared slot per rank."""

    def __init__(self, n):
        self.n, self.barrier, self.slots = n, threading.Barrier(n, timeout=60), [None] * n

    def exchange(self, rank, tensor):
        self.slots[rank] = tensor.detach().clone()
        self.barrier.wait()
        every = list(self.slots)
        self.barrier.wait()
        return every

    def run(self, fn):
        """fn(comm) on every rank at once; returns the results in rank order."""
        results, errors = [None] * self.n, []

        def body(rank):
            try:
                results[rank] = fn(ThreadComm(self, rank))
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)
                self.barrier.abort()

        threads = [threading.Thread(target=body, args=(r,)) for r in range(self.n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results


class ThreadComm:
    def __init__(self, group, rank):
        self.group, self.env = group, dist.DistEnv(rank, group.n)

    def all_reduce(self, tensor, average=True):
        total = torch.stack(self.group.exchange(self.env.rank, tensor)).sum(dim=0)
        tensor.copy_(total / self.group.n if average else total)

    def all_gather(self, output, input):
        output.copy_(torch.cat(self.group.exchange(self.env.rank, input)))

    def broadcast(self, tensor, root=0):
        tensor.copy_(self.group.exchange(self.env.rank, tensor)[root])

    def wait(self, handle):
        pass


INTERPRETER_LOCK = threading.Lock()


def one_at_a_time(impl):
    """impl (a backend's cross-entropy) with its functions run one thread at a time: Triton's
    interpreter is not thread-safe. (Its calls sit between the collectives, so this cannot deadlock.)"""
    def locked(fn):
        def call(*args, **kwargs):
            with INTERPRETER_LOCK:
                return fn(*args, **kwargs)
        return call
    return impl._replace(**{name: locked(getattr(impl, name)) for name in impl._fields[1:]})


def split_rows(n_rows, n):
    """Uneven shards, the first ones one row longer (as np.array_split)."""
    sizes = [n_rows // n + (r < n_rows % n) for r in range(n)]
    return [sum(sizes[:r]) for r in range(n + 1)]


# (vocab, padded rows, ranks): odd vocabularies, shards that do not divide it evenly, a rank
# whose rows are all padding (37 of 64 over 4: rank 3 holds ids 48..63), a 1-row shard
@pytest.mark.parametrize("V,Vp,n", [(37, 37, 2), (37, 40, 4), (37, 64, 4), (50, 64, 3), (5, 5, 5)])
@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
def test_vocab_parallel_cross_entropy_matches_one_process(V, Vp, n, z_loss):
    torch.manual_seed(V + Vp + n)
    N, C = 29, 24
    h = torch.randn(N, C, dtype=torch.float64)
    w = torch.randn(Vp, C, dtype=torch.float64)
    targets = torch.randint(0, V, (N,))
    targets[::5] = -100  # ignore_index rows
    targets[1] = V - 1  # the last real id: on the last rank with any real rows
    bounds = split_rows(Vp, n)

    def rank(comm):
        r = comm.env.rank
        h_r, w_r = h.clone().requires_grad_(), w[bounds[r]:bounds[r + 1]].clone().requires_grad_()
        local_vocab = min(max(V - bounds[r], 0), bounds[r + 1] - bounds[r])
        loss = cross_entropy.vocab_parallel_linear_cross_entropy(h_r, w_r, targets, groups.register(comm), "torch",
                                                                 bounds[r], local_vocab, V, z_loss=z_loss,
                                                                 chunk_rows=8)
        loss.backward()
        return loss.detach(), h_r.grad, w_r.grad

    results = ThreadGroup(n).run(rank)
    hr, wr = h.clone().requires_grad_(), w.clone().requires_grad_()
    logits = (hr @ wr.t())[:, :V]
    lse = torch.logsumexp(logits, dim=1)
    valid = targets != -100
    want = ((torch.nn.functional.cross_entropy(logits, targets, reduction="none") + z_loss * lse.square())
            [valid]).mean()
    want.backward()
    for loss, _, _ in results:  # the same loss on every rank
        torch.testing.assert_close(loss, want.detach(), rtol=1e-12, atol=1e-12)
    # dh: each rank's part, summed by copy_to_group's backward in the model
    torch.testing.assert_close(sum(r[1] for r in results), hr.grad, rtol=1e-10, atol=1e-12)
    dw = torch.cat([r[2] for r in results])
    torch.testing.assert_close(dw, wr.grad, rtol=1e-10, atol=1e-12)
    assert (dw[V:] == 0).all()  # padding rows never predicted


# Under autocast the chunk logits, and so the stats/grad pair's inputs, are in the autocast dtype.
AUTOCAST_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=2e-2, atol=2e-3),
                torch.float16: dict(rtol=2e-3, atol=2e-4)}


@pytest.mark.parametrize("dtype", list(AUTOCAST_TOL), ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("name", ["torch"] + cpu_backends())
def test_vocab_parallel_cross_entropy_equals_single_process_op(name, dtype, monkeypatch):
    """Each backend's stats/grad pair against cross_entropy.linear_cross_entropy itself (one
    process, the same backend, the same autocast: the README's --tp=2 command on a bf16 CPU), all
    rows ignored included."""
    monkeypatch.setitem(cross_entropy.BACKENDS, name, one_at_a_time(cross_entropy.BACKENDS[name]))
    if dtype not in cross_entropy.BACKENDS[name].support.dtypes["cpu"]:
        pytest.skip(f"{name} has no {dtype} cross-entropy on CPU")
    torch.manual_seed(0)
    N, C, V, Vp, n = 40, 16, 77, 128, 2
    h, w = torch.randn(N, C), torch.randn(Vp, C) * 0.5

    def autocast():  # thread-local state: entered in each rank's thread
        return torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)

    for targets in (torch.randint(0, V, (N,)), torch.full((N,), -100)):
        def rank(comm, targets=targets):
            r, rows = comm.env.rank, Vp // n
            w_r = w[r * rows:(r + 1) * rows].clone().requires_grad_()
            h_r = h.clone().requires_grad_()
            with autocast():
                loss = cross_entropy.vocab_parallel_linear_cross_entropy(
                    h_r, w_r, targets, groups.register(comm), name, r * rows, min(max(V - r * rows, 0), rows), V)
            loss.backward()
            return loss.detach(), h_r.grad, w_r.grad

        results = ThreadGroup(n).run(rank)
        hr, wr = h.clone().requires_grad_(), w.clone().requires_grad_()
        with autocast():
            want = cross_entropy.linear_cross_entropy(hr, wr, targets, name, vocab_size=V)
        want.backward()
        tol = AUTOCAST_TOL[dtype]
        torch.testing.assert_close(results[0][0], want.detach(), **tol)
        torch.testing.assert_close(results[0][1] + results[1][1], hr.grad, **tol)
        torch.testing.assert_close(torch.cat([r[2] for r in results]), wr.grad, **tol)


def test_parallelize_slices_and_gathers_back():
    """Slicing a model over 2 ranks and gathering it back gives the 1-process tensors (c_attn's
    q, k, v interleaving included); the gathered optimizer state shards back to each rank's own."""
    torch.manual_seed(3)
    full = GPT(W.MODEL, W.TORCH)
    want = {k: v.clone() for k, v in full.state_dict().items()}

    def rank(comm):
        model = GPT(W.MODEL, W.TORCH)
        model.load_state_dict(want if comm.env.rank == 0 else {k: torch.randn_like(v) for k, v in want.items()})
        tensor_parallel.parallelize(model, comm)  # rank 1's random weights are replaced by rank 0's
        opt = FlatAdamW(model.named_parameters(), 1e-3, backend=W.TORCH["adamw"])
        opt.exp_avg.copy_(opt.flat_param)  # moments as the weights: gathered, the 1-process weights
        state = opt.state_dict()
        gathered = tensor_parallel.gather_optimizer_state(opt, state, model)
        back = tensor_parallel.shard_optimizer_state(opt, gathered, model)
        return tensor_parallel.gather_state_dict(model), model, state, gathered, back

    results = ThreadGroup(2).run(rank)
    C, nh = W.MODEL.n_embd, W.MODEL.n_head
    q_head0 = results[0][1].transformer.h[0].attn.c_attn.weight[:C // nh]
    torch.testing.assert_close(q_head0, want["transformer.h.0.attn.c_attn.weight"][:C // nh], rtol=0, atol=0)
    k_rank1 = results[1][1].transformer.h[0].attn.c_attn.weight[C // 2:C]  # rank 1's k rows = head 1's
    torch.testing.assert_close(k_rank1, want["transformer.h.0.attn.c_attn.weight"][C + C // 2:2 * C], rtol=0, atol=0)
    for gathered, *_ in results:
        assert gathered.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(gathered[k], want[k], rtol=0, atol=0, msg=k)
    one_process = FlatAdamW(full.named_parameters(), 1e-3)
    assert results[0][3]["layout"] == one_process.layout
    for _, _, _, gathered, _ in results:
        torch.testing.assert_close(gathered["exp_avg"], one_process.flat_param[:one_process.numel], rtol=0, atol=0)
    for _, _, state, _, back in results:
        torch.testing.assert_close(back["exp_avg"], state["exp_avg"], rtol=0, atol=0)
        assert back["layout"] == state["layout"]


# the modern block on 3 ranks: 2 query heads and 1 K/V head each (GQA), SwiGLU's gate and up rows
# split alike, RoPE + QK-norm, parameter-free RMSNorm, an untied lm_head sliced like wte
MODERN = dict(n_head=6, n_kv_head=3, n_embd=96, mlp="swiglu", mlp_hidden=192, pos="rope", qk_norm=True,
              norm="rmsnorm", norm_weight=False, bias=False, tie_embeddings=False)


@pytest.mark.parametrize("block", ["gpt2", "modern"])
@pytest.mark.parametrize("name", ["torch", "cpu"])
def test_tensor_parallel_model_loss_and_gradients_match_one_process(name, block):
    """tp=3 over 3 heads with a vocabulary of 37 rows (so the last rank also holds 2 rows of
    padding): the same loss on every rank, and gradients that gather to the 1-process ones."""
    kernels = dict(W.TORCH, **({} if name == "torch" else {op: "cpu" for op in ("layernorm", "attention",
                                                                                 "cross_entropy", "adamw")}))
    shape = dict(n_head=3, n_embd=48) if block == "gpt2" else MODERN
    cfg = ModelConfig(n_layer=2, block_size=8, vocab_size=37, vocab_multiple=1, **shape)
    torch.manual_seed(5)
    idx = torch.randint(0, 37, (3, 8))
    targets = idx.roll(-1, 1)
    targets[0, :3] = -100
    full = GPT(cfg, kernels)
    full(idx, targets).backward()
    want = {n: p.grad for n, p in full.named_parameters()}

    def rank(comm):
        model = GPT(cfg, kernels)
        model.load_state_dict(full.state_dict())
        tensor_parallel.parallelize(model, comm)
        loss = model(idx, targets)
        loss.backward()
        return loss.detach(), {n: tensor_parallel.gather(p.grad, p.tp_split, comm) if hasattr(p, "tp_split")
                               else p.grad for n, p in model.named_parameters()}

    results = ThreadGroup(3).run(rank)
    for loss, grads in results:
        torch.testing.assert_close(loss, full(idx, targets).detach(), rtol=1e-6, atol=1e-6)
        assert grads.keys() == want.keys()
        for n in want:
            torch.testing.assert_close(grads[n], want[n], rtol=1e-5, atol=1e-6, msg=n)


def test_optimizer_keeps_replicated_parameters_in_one_range():
    torch.manual_seed(0)

    def rank(comm):
        model = tensor_parallel.parallelize(GPT(W.MODEL, W.TORCH), comm)
        opt = FlatAdamW(model.named_parameters(), 1e-3)
        return [(name, hasattr(p, "tp_split"), p.dim(), off, n)
                for (name, off, n), p in zip(opt.layout, opt.params)], opt.replicated, opt.decay_numel

    layout, (lo, hi), decay = ThreadGroup(2).run(rank)[0]
    replicated = [(off, off + n) for _, sliced, _, off, n in layout if not sliced]
    assert replicated[0][0] == lo and replicated[-1][1] == hi
    assert sum(e - s for s, e in replicated) == hi - lo  # contiguous
    assert all(dim >= 2 for _, _, dim, off, _ in layout if off < decay)


# ----------------------------------------------------------------------------- multi-process (gloo)

def run_ranks(world, spec, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"tp_w{world}")
    results = launch(world, spec, out, timeout=240)
    for rank, (code, err, _) in enumerate(results):
        assert code == 0, f"rank {rank} failed:\n{err}"
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(world)]


@pytest.fixture(scope="module")
def tp2(tmp_path_factory):
    """TP=2 (one data-parallel replica)."""
    return run_ranks(2, {"tp": 2, "runs": [dict(name="tp", zero=0, bucket_mb=25.0, steps=STEPS)]},
                     tmp_path_factory)


@pytest.fixture(scope="module")
def tp2_dp2(tmp_path_factory):
    """TP=2 x DP=2, ZeRO-1 over the dp groups, small buckets; then MORE steps."""
    return run_ranks(4, {"tp": 2, "runs": [dict(name="zero", zero=1, bucket_mb=SMALL_MB, steps=STEPS,
                                                 more_steps=MORE)]}, tmp_path_factory)


SLICED = ("attn.c_attn.", "mlp.c_fc.", "c_proj.weight", "wte.weight")


@pytest.mark.parametrize("layout", ["tp2", "tp2_dp2"])
def test_tensor_parallel_training_matches_one_process(layout, request):
    """grad_accum=2 micro-steps, clipping at 0.05 (active every step), AdamW: equal to one
    process on the same global batch; replicated parameters bitwise equal on every rank."""
    ranks, name, dp = (request.getfixturevalue("tp2"), "tp", 1) if layout == "tp2" else \
        (request.getfixturevalue("tp2_dp2"), "zero", 2)
    want, _ = reference(dp, STEPS)
    for r in ranks:
        assert_weights_close(r[name]["weights"], want)
    for tp_group in ([0, 1], [2, 3])[:len(ranks) // 2]:
        a, b = (dict(ranks[r][name]["local"]) for r in tp_group)
        replicated = [k for k in a if not any(s in k for s in SLICED)]
        assert replicated and all(torch.equal(a[k], b[k]) for k in replicated)
        assert not torch.equal(a["transformer.wte.weight"], b["transformer.wte.weight"])
    if dp == 2:  # ZeRO-1 over dp: each rank holds half its slice's moments
        assert ranks[0][name]["moments_numel"] * 2 == ranks[0][name]["flat_numel"]


def test_gathered_tp_dp_checkpoint_resumes_on_one_process(tp2_dp2):
    saved = tp2_dp2[0]["zero"]
    run = W.make_run(dist.Context(dist.DistEnv(), torch.device("cpu")), 2 * W.BATCH)
    for name, p in run.model.named_parameters():
        p.data.copy_(saved["weights"][name])
    run.opt.load_state_dict(saved["opt"])
    run.train.load_state_dict(saved["loader"])
    W.train(run, MORE)
    assert_weights_close(W.weights(run), saved["more_weights"])


def test_killed_tensor_parallel_rank_stops_the_others(tmp_path):
    spec = {"tp": 2, "runs": [dict(name="tp", zero=0, bucket_mb=25.0, steps=6)], "die_at": 2, "timeout_s": 30.0}
    [(code, err, seconds)] = launch(2, spec, tmp_path, timeout=90, wait_for=1)
    assert code == 1, err
    assert "nanolm.dist: rank 0/2:" in err and "failed" in err
    assert seconds < 45, f"rank 0 took {seconds:.1f} s to notice"


@pytest.mark.parametrize("model", [["--n_head=2", "--n_embd=32"],
                                   ["--preset=modern-cpu", "--n_head=4", "--n_kv_head=2", "--n_embd=64"]],
                         ids=["gpt2", "modern"])
def test_torchrun_tp2_dp2_matches_one_process_and_resumes_across_layouts(tmp_path, monkeypatch, model):
    """`torchrun --nproc_per_node=4 -m nanolm.train --tp=2` (C++ cpu kernels) ends where one process with the
    global batch (2 per replica x 2 replicas -> 4) does; its step-4 checkpoint (gathered) resumes
    on 1 process, which takes that global batch itself and reaches the 4 ranks' step-6 weights;
    and the 1-process step-4 checkpoint resumes on 2 ranks with --tp=2 (sliced on load). The modern
    preset (GQA: 2 query heads and 1 K/V head per rank) as GPT-2's."""
    from nanolm.train import config_from_args, train
    args = [*model, "--n_layer=1", "--block_size=32", "--eval_iters=1",
            "--log_interval=2", "--max_steps=6", "--eval_interval=100", "--sample_tokens=4",
            "--kernels=cpu", "--grad_accum=2", "--ckpt_interval=4", "--warmup=2", "--lr=3e-3",
            "--dtype=float32"]  # compared at fp32 tolerance across layouts: no bf16 autocast
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHELASTIC")}

    def torchrun(ranks, *more):
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
               f"--master_port={free_port()}", "-m", "nanolm.train", *more]
        p = subprocess.run(cmd, cwd=tmp_path, env=dict(env, OMP_NUM_THREADS="1"), capture_output=True,
                           text=True, timeout=240)
        assert p.returncode == 0, p.stderr
        assert p.stdout.count("sample:") == 1, p.stdout
        return p.stdout

    out = torchrun(4, *args, "--batch_size=2", "--tp=2", "--zero=1", f"--bucket_mb={SMALL_MB}",
                   f"--out_dir={tmp_path / 'four'}")
    assert "(tp=2 x dp=2)" in out
    monkeypatch.chdir(tmp_path)
    train(config_from_args([*args, "--batch_size=4", f"--out_dir={tmp_path / 'fresh'}"]))
    resumed = config_from_args([f"--resume={tmp_path / 'four' / 'ckpt_00000004.pt'}", f"--out_dir={tmp_path / 'one'}"])
    assert resumed.batch_size == 4 and resumed.tp == 1
    train(resumed)
    torchrun(2, f"--resume={tmp_path / 'fresh' / 'ckpt_00000004.pt'}", "--tp=2", f"--out_dir={tmp_path / 'two'}")
    four, one, fresh, two = (torch.load(tmp_path / d / "ckpt_00000006.pt", weights_only=True)
                             for d in ("four", "one", "fresh", "two"))
    assert four["optimizer"]["layout"] == one["optimizer"]["layout"] == fresh["optimizer"]["layout"]
    assert two["loader"]["train"]["batch_size"] == 4 and two["config"]["tp"] == 2
    assert_weights_close(four["model"], fresh["model"])
    assert_weights_close(one["model"], four["model"])
    assert_weights_close(two["model"], fresh["model"])


# ----------------------------------------------------------------------------- NCCL (GPU)

@pytest.mark.gpu
def test_nccl_one_rank_tensor_parallel_matches_single_process():
    """tp=1 through the NCCL path: a 1-rank sub-communicator from split(), the model sliced over
    it (every collective a 1-rank NCCL call on its stream), loss and gradients as the plain model."""
    from test_dist import nccl_comm
    world = nccl_comm()
    tp = world.split([[0]], "tp")
    torch.manual_seed(0)
    plain = GPT(W.MODEL, W.TORCH).cuda()
    model = GPT(W.MODEL, W.TORCH).cuda()
    model.load_state_dict(plain.state_dict())
    tensor_parallel.parallelize(model, tp)
    idx = torch.randint(0, W.MODEL.vocab_size, (2, W.MODEL.block_size), device="cuda")
    for m in (plain, model):
        m(idx, idx).backward()
    grads = dict(model.named_parameters())
    for name, p in plain.named_parameters():
        torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)
    tp.close()
    world.close()

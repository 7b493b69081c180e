"""Muon over data parallel, ZeRO-1 and tensor parallel, real multi-process runs on CPU (gloo)
as in test_dist.py: the same weights as one process on the global batch, bit-identical on every
rank (of a tp group: its slices gathered), each data-parallel rank holding the momentum of its
1/W of the matrices only, and the gathered state the one process's."""
import functools

import pytest
import torch

import dist_worker as W
from nanolm import dist, tensor_parallel
from nanolm.model import GPT
from nanolm.optim import FlatMuon, hidden_matrices
from test_dist import MORE, SMALL_MB, STEPS, assert_weights_close, launch, run_ranks
from test_tensor_parallel import ThreadGroup

# world -> (tp, runs)
RUNS = {2: [dict(name="dp_small", zero=0, bucket_mb=SMALL_MB, steps=STEPS, optim="muon"),
            dict(name="zero_small", zero=1, bucket_mb=SMALL_MB, steps=STEPS, more_steps=MORE, optim="muon")],
        3: [dict(name="zero_small", zero=1, bucket_mb=SMALL_MB, steps=STEPS, more_steps=MORE, optim="muon")]}
TP_RUN = dict(name="tp", zero=0, bucket_mb=25.0, steps=STEPS, optim="muon")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return {world: run_ranks(world, runs, tmp_path_factory) for world, runs in RUNS.items()}


def tp_ranks(world, run, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"muon_tp_w{world}")
    results = launch(world, {"tp": 2, "runs": [run]}, out, timeout=240)
    for rank, (code, err, _) in enumerate(results):
        assert code == 0, f"rank {rank} failed:\n{err}"
    return [torch.load(out / f"rank{r}.pt", weights_only=True)[run["name"]] for r in range(world)]


@pytest.fixture(scope="module")
def tp2(tmp_path_factory):
    """TP=2, one data-parallel replica: every hidden matrix is split over the two ranks."""
    return tp_ranks(2, TP_RUN, tmp_path_factory)


@pytest.fixture(scope="module")
def tp2_dp2(tmp_path_factory):
    """TP=2 x DP=2 with ZeRO-1 and small buckets: the matrices' owners among the dp ranks, each
    gathering its matrices' slices over its tp group."""
    return tp_ranks(4, dict(TP_RUN, name="tp_zero", zero=1, bucket_mb=SMALL_MB), tmp_path_factory)


@functools.cache
def reference(world):
    """One process, batch BATCH*world: weights after STEPS and STEPS+MORE, and the state."""
    run = W.make_run(dist.Context(dist.DistEnv(), torch.device("cpu")), W.BATCH * world, optim="muon")
    W.train(run, STEPS)
    first, state = W.weights(run), W.optimizer_state(run)
    W.train(run, MORE)
    return first, state, W.weights(run), run.opt


CASES = [(world, r["name"]) for world, runs in RUNS.items() for r in runs]


@pytest.mark.parametrize("world,name", CASES)
def test_muon_matches_one_process_on_global_batch(world, name, ranks):
    got = ranks[world]
    want, want_state, want_more, _ = reference(world)
    assert_weights_close(got[0][name]["weights"], want)
    if name == "zero_small":  # trained on after gathering the state: the sharded state was left intact
        assert_weights_close(got[0][name]["more_weights"], want_more)
    for key in ("exp_avg", "exp_avg_sq", "momentum"):
        torch.testing.assert_close(got[0][name]["opt"][key], want_state[key], rtol=1e-4, atol=1e-6, msg=key)
    for other in got[1:]:  # every rank ends with the very same weights
        for key, w in got[0][name]["weights"].items():
            assert torch.equal(other[name]["weights"][key], w), key


@pytest.mark.parametrize("world,name", CASES)
def test_each_rank_keeps_the_momentum_of_its_share_of_the_matrices(world, name, ranks):
    opt = reference(world)[3]
    held = [r[name]["muon_momentum_numel"] for r in ranks[world]]
    assert sum(held) == opt.muon_numel  # each matrix's momentum on exactly one rank
    assert max(held) < opt.muon_numel * 0.75  # shared out, not kept whole anywhere
    if name.startswith("zero"):  # and ZeRO-1 shards the AdamW moments of the rest
        r = ranks[world][0][name]
        # 1/W of the AdamW range, give or take the bucket cut below muon_numel (rounded to W)
        assert r["moments_numel"] <= (r["flat_numel"] - opt.muon_numel) / world + world


@pytest.mark.parametrize("layout,dp", [("tp2", 1), ("tp2_dp2", 2)])
def test_tensor_parallel_muon_matches_one_process(layout, dp, request):
    """Each rank orthogonalizes the whole matrix gathered from the slices and keeps its slice:
    the same weights and the same (gathered) state as one process on the same global batch."""
    ranks = request.getfixturevalue(layout)
    want, want_state, _, _ = reference(dp)
    for r in ranks:
        assert_weights_close(r["weights"], want)
        for key in ("exp_avg", "exp_avg_sq", "momentum"):
            torch.testing.assert_close(r["opt"][key], want_state[key], rtol=1e-4, atol=1e-6, msg=key)
    a, b = (dict(r["local"]) for r in ranks[:2])
    assert a["transformer.h.0.mlp.c_fc.weight"].shape[0] * 2 == want["transformer.h.0.mlp.c_fc.weight"].shape[0]
    assert not torch.equal(a["transformer.h.0.mlp.c_fc.weight"], b["transformer.h.0.mlp.c_fc.weight"])


def test_gathered_tensor_parallel_muon_state_resumes_on_one_process(tp2):
    """The TP=2 checkpoint state (gathered) loads into a 1-process FlatMuon, sharded back equal."""
    run = W.make_run(dist.Context(dist.DistEnv(), torch.device("cpu")), W.BATCH, optim="muon")
    run.opt.load_state_dict(tp2[0]["opt"])
    state = run.opt.state_dict()
    for key in ("exp_avg", "exp_avg_sq", "momentum"):
        assert torch.equal(state[key], tp2[0]["opt"][key]), key


def test_muon_state_gathers_to_one_process_and_shards_back():
    """Momentum and moments set to the weights: gathered over TP=2 they are the 1-process
    FlatMuon's buffer (Muon's range first, then AdamW's), and shard back to each rank's own."""
    torch.manual_seed(3)
    full = GPT(W.MODEL, W.TORCH)
    want = {k: v.clone() for k, v in full.state_dict().items()}

    def rank(comm):
        model = GPT(W.MODEL, W.TORCH)
        model.load_state_dict(want)
        tensor_parallel.parallelize(model, comm)
        opt = FlatMuon(model.named_parameters(), hidden_matrices(model), 1e-3, backend=W.TORCH["adamw"])
        for shape, group in opt.groups.items():
            opt.momentum_buffers[shape].copy_(torch.stack([p for _, _, p in group]))
        opt.exp_avg.copy_(opt.flat_param[opt.adamw_start:])
        state = opt.state_dict()
        gathered = tensor_parallel.gather_optimizer_state(opt, state, model)
        return state, gathered, tensor_parallel.shard_optimizer_state(opt, gathered, model)

    one_process = FlatMuon(full.named_parameters(), hidden_matrices(full), 1e-3)
    for state, gathered, back in ThreadGroup(2).run(rank):
        assert gathered["layout"] == one_process.layout and gathered["optim"] == "muon"
        split = one_process.muon_numel
        torch.testing.assert_close(gathered["momentum"], one_process.flat_param[:split], rtol=0, atol=0)
        torch.testing.assert_close(gathered["exp_avg"], one_process.flat_param[split:one_process.numel],
                                   rtol=0, atol=0)
        for key in ("momentum", "exp_avg", "exp_avg_sq"):
            assert torch.equal(back[key], state[key]), key
        assert back["layout"] == state["layout"]

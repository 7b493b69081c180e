"""Muon over data parallel and ZeRO-1, real multi-process runs on CPU (gloo) as in test_dist.py:
the same weights as one process on the global batch, bit-identical on every rank, each rank
holding the momentum of its 1/W of the matrices only, and the gathered state the one process's."""
import functools

import pytest
import torch

import dist_worker as W
from nanolm import dist
from test_dist import MORE, SMALL_MB, STEPS, assert_weights_close, run_ranks

RUNS = {2: [dict(name="dp_small", zero=0, bucket_mb=SMALL_MB, steps=STEPS, optim="muon"),
            dict(name="zero_small", zero=1, bucket_mb=SMALL_MB, steps=STEPS, more_steps=MORE, optim="muon")],
        3: [dict(name="zero_small", zero=1, bucket_mb=SMALL_MB, steps=STEPS, more_steps=MORE, optim="muon")]}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return {world: run_ranks(world, runs, tmp_path_factory) for world, runs in RUNS.items()}


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

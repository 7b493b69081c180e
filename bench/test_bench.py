"""The bench's quick cases as pytest-benchmark tests: `pytest bench --benchmark-only`.
Each (case, implementation) is checked against the reference first (a wrong nanolm result fails
the test, not just its timing; a PyTorch baseline that misses the reference is an xfail with the
error); implementations the bench does not run on this device are not listed.
Timing is pytest-benchmark's wall clock around a synchronised call, so GPU numbers include
launch overhead; `python -m bench` is the precise tool (CUDA events, ceilings)."""
import pytest
import torch

from bench import timing
from bench.cases import OPS, build_cases, check_outputs

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PARAMS = [pytest.param(case, impl, id=f"{op}-{case.name}-{impl.name}".replace(" ", "_"))
          for op in OPS for case in build_cases(op, DEVICE, "quick") for impl in case.impls
          if impl.kind != "emulated"]  # run by `python -m bench --impls cuda_sim` only


@pytest.mark.parametrize("case,impl", PARAMS)
def test_bench(benchmark, case, impl):
    inputs = case.make_inputs()
    run = impl.make(inputs)
    try:
        check_outputs(case.view(run()), case.reference(inputs), case.tol)
    except AssertionError as e:
        if impl.kind == "baseline":  # PyTorch's own numerics (e.g. eager bf16 layernorm backward
            # accumulates dweight in bf16): reported, as the CLI's FAILED row, not a nanolm failure
            pytest.xfail(f"the PyTorch baseline misses the float64 reference: {e}")
        raise

    def call():
        run()
        timing.synchronize(DEVICE)

    benchmark.extra_info.update(op=case.op, case=case.name, impl=impl.name, metric=case.metric, work=case.work)
    benchmark(call)

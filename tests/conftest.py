import os

import pytest
import torch

# Without a GPU, Triton kernels run in its interpreter on CPU tensors. It must be chosen before
# triton is first imported, hence here, before any test module is collected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    from nanolm.ops.backends import unavailable_reason
    skips = {}
    if not torch.cuda.is_available():
        skips["gpu"] = pytest.mark.skip(reason="needs a CUDA device")
    sim_missing = unavailable_reason("cuda_sim", "layernorm", torch.device("cpu"))
    if sim_missing is not None:
        skips["cuda_sim"] = pytest.mark.skip(reason=f"cuda_sim: {sim_missing}")
    for item in items:
        for keyword, skip in skips.items():
            if keyword in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def poison(monkeypatch):
    """Backends allocate their outputs (and workspaces) with torch.empty/empty_like: make
    those NaN-filled so any element a kernel fails to write shows up."""
    for name in ("empty", "empty_like"):
        real = getattr(torch, name)

        def make(*args, _real=real, **kwargs):
            t = _real(*args, **kwargs)
            return t.fill_(float("nan")) if t.is_floating_point() else t

        monkeypatch.setattr(torch, name, make)

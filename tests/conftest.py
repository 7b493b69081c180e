import os

import pytest
import torch

# Without a GPU, Triton kernels run in its interpreter on CPU tensors. It must be chosen before
# triton is first imported, hence here, before any test module is collected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


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

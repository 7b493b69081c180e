"""The backend contract, read from the backends' SUPPORT tables: every backend implements the
functions of the ops its table lists; on each device it runs, it accepts exactly the dtypes,
head sizes and row lengths its table lists and rejects the others with a ValueError naming the
problem; `python -m nanolm.info` prints the matrix. Numerical agreement with the specification
is tested per op (test_layernorm.py, test_attention.py, ...); here the inputs are tiny."""
import ast
from pathlib import Path

import pytest
import torch

from nanolm import backends, info
from nanolm.backends.common import _C, dtype_name

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
CPU = torch.device("cpu")


def _tables():
    """(name, module) of every backend that imports here."""
    found = []
    for name in backends.BACKENDS:
        try:
            found.append((name, backends.load(name)))
        except ImportError:
            pass
    return found


def _call(module, op, dtype, *, C=16, hs=None):
    """Run the op's first function on tiny fresh random CPU inputs of `dtype`."""
    if op == "layernorm":
        return module.layer_norm_fwd(torch.randn(4, C, dtype=dtype), torch.randn(C, dtype=dtype), None, 1e-5)
    if op == "attention":
        hs = hs or (module.SUPPORT[op].head_sizes or (16,))[0]
        q, k, v = torch.randn(1, 8, 3, 2, hs, dtype=dtype).unbind(2)
        return module.attention_fwd(q, k, v, hs ** -0.5)
    if op == "cross_entropy":
        return module.cross_entropy_fwd(torch.randn(4, 10, dtype=dtype), torch.randint(0, 9, (4,)), 9, -100,
                                        0.0, 1.0, False)
    return module.sum_of_squares(torch.randn(64, dtype=dtype))


def _cpu_cases():
    """(backend, op, dtype, accepted) for each backend that runs here, over the ops its table
    lists on CPU; the torch specification takes anything and checks nothing, so it is left out."""
    cases = []
    for name, module in _tables():
        if name == "torch" or module.unavailable_reason(CPU) is not None:
            continue
        for op, support in module.SUPPORT.items():
            for dtype in DTYPES if "cpu" in support.dtypes else ():
                cases.append(pytest.param(name, op, dtype, dtype in support.dtypes["cpu"],
                                          id=f"{name}-{op}-{dtype_name(dtype)}"))
    return cases


@pytest.mark.parametrize("name,module", _tables(), ids=[n for n, _ in _tables()])
def test_backend_implements_its_table(name, module):
    assert set(module.SUPPORT) <= set(backends.OPS), f"{name}: unknown ops in SUPPORT"
    for op, support in module.SUPPORT.items():
        assert set(support.dtypes) <= {"cpu", "cuda"} and set(support.notes) <= set(support.dtypes)
        for fn in backends.OPS[op]:
            assert callable(getattr(module, fn, None)), f"{name} lists {op} but has no {fn}"


@pytest.mark.parametrize("name,op,dtype,accepted", _cpu_cases())
def test_cpu_dtypes_follow_the_table(name, op, dtype, accepted):
    module = backends.load(name)
    if accepted:
        _call(module, op, dtype)
        assert backends.unavailable_reason(name, op, CPU, dtype) is None
    else:
        with pytest.raises(ValueError, match=f"dtype {dtype_name(dtype)}; supported: "):
            _call(module, op, dtype)
        assert "takes" in backends.unavailable_reason(name, op, CPU, dtype)


@pytest.mark.parametrize("name", [n for n, m in _tables() if n != "torch" and m.unavailable_reason(CPU) is None
                                  and "cpu" in m.SUPPORT["attention"].dtypes])
def test_cpu_head_sizes_follow_the_table(name):
    support = backends.load(name).SUPPORT["attention"]
    unlisted = next(hs for hs in range(8, 512, 8) if hs not in support.head_sizes)
    with pytest.raises(ValueError, match=f"head size {unlisted}"):
        _call(backends.load(name), "attention", support.dtypes["cpu"][0], hs=unlisted)


@pytest.mark.parametrize("name", [n for n, m in _tables() if n != "torch" and m.unavailable_reason(CPU) is None
                                  and m.SUPPORT["layernorm"].max_row is not None])
def test_cpu_max_row_follows_the_table(name):
    support = backends.load(name).SUPPORT["layernorm"]
    with pytest.raises(ValueError, match=f"row length C={support.max_row + 1}"):
        _call(backends.load(name), "layernorm", torch.float32, C=support.max_row + 1)


@pytest.mark.parametrize("name", [n for n, m in _tables() if "cpu" not in m.SUPPORT["layernorm"].dtypes])
def test_wrong_device_is_named(name):
    with pytest.raises(ValueError, match="is on cpu, expected a cuda device"):
        _call(backends.load(name), "layernorm", torch.float32)


def test_cuda_table_matches_the_extension():
    """The cuda table's limits are the ones csrc/ enforces (it checks them too)."""
    if _C is None or not _C.build_info()["cuda"]:
        pytest.skip("nanolm._C was built without CUDA")
    assert backends.load("cuda").SUPPORT["layernorm"].max_row == _C.layernorm_cuda_max_c


def test_dtype_enum_is_shared():
    """One enum for every launcher (csrc/common.h), named like torch's dtypes."""
    if _C is None:
        pytest.skip("nanolm._C is not built")
    assert {n: int(v) for n, v in _C.DType.__members__.items()} == {"float32": 0, "bfloat16": 1, "float16": 2}
    assert all(isinstance(getattr(torch, n), torch.dtype) for n in _C.DType.__members__)


def test_info_prints_the_matrix(capsys):
    info.main()
    out = capsys.readouterr().out
    for op in backends.OPS:
        for name in backends.BACKENDS:
            assert any(line.split()[:2] == [op, name] for line in out.splitlines()), (op, name)
    cpu_rows = {(op, name): cells for op, name, cells, _ in info.support_rows(CPU)}
    assert cpu_rows[("attention", "torch")] == ["yes", "yes", "yes"]
    assert cpu_rows[("layernorm", "cuda")] == ["no", "no", "no"]


def test_kernels_and_csrc_import_nothing_from_nanolm():
    """The ground floor: Triton kernels and C++/CUDA sources depend on nothing above them."""
    root = Path(__file__).resolve().parent.parent
    for path in (root / "kernels").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] == "nanolm" for n in names), f"{path.name} imports {names}"
    for path in (root / "csrc").rglob("*.*"):  # quoted includes name csrc's own headers only
        for line in path.read_text().splitlines():
            if line.startswith('#include "'):
                header = line.split('"')[1]
                assert (path.parent / header).is_file() or (root / "csrc" / header).is_file(), f"{path.name}: {line}"

"""The backend contract, read from the backends' SUPPORT tables: every backend implements the
functions of the ops its table lists; on each device it runs, it accepts exactly the dtypes,
head sizes and row lengths its table lists and rejects the others with a ValueError naming the
problem; `python -m nanolm.info` prints the matrix. Numerical agreement with the specification
is tested per op (test_layernorm.py, test_attention.py, ...); here the inputs are tiny."""
import ast
from pathlib import Path

import pytest
import torch

from nanolm import info
from nanolm.ops import OPS, backends, functions
from nanolm.ops.launch import _C
from nanolm.ops.support import dtype_name

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
CPU = torch.device("cpu")


def _tables():
    """(name, everything it implements) of every backend."""
    return [(name, backends.load(name)) for name in backends.BACKENDS]


torch_ref = backends.load("torch")


def _call(module, op, dtype, *, C=16, hs=None):
    """Run the op's first function on tiny fresh random CPU inputs of `dtype`."""
    fn = functions(op)[0]
    args, _ = _arguments(fn, dtype, C=C, hs=hs or _head_size(module))
    return getattr(module, fn)(*args)


def _head_size(module):
    return (module.SUPPORT["attention"].head_sizes or (16,))[0] if "attention" in module.SUPPORT else 16


def _arguments(fn, dtype, *, C=16, hs=16, gqa=False):
    """Fresh random CPU arguments of one contract function, its data tensors of `dtype`, and the
    positions of the arguments it writes in place (checked beside what it returns). gqa:
    attention's two query heads share one K/V head."""
    def rand(*shape):
        return torch.randn(*shape, dtype=dtype)

    if fn == "layer_norm_fwd":
        return [rand(5, C), rand(C), rand(C), 1e-5], ()
    if fn == "add_layer_norm_fwd":
        return [rand(5, C), rand(5, C), rand(C), rand(C), 1e-5, None], ()
    if fn == "layer_norm_bwd":
        x = rand(5, C)
        mean, var = x.float().mean(1), x.float().var(1, unbiased=False)
        return [rand(5, C), x, rand(C), mean, (var + 1e-5).rsqrt(), rand(5, C), None, None], ()
    # RMSNorm: with a weight in the forward and backward, parameter-free in the fused forward
    if fn == "rms_norm_fwd":
        return [rand(5, C), rand(C), 1e-5], ()
    if fn == "add_rms_norm_fwd":
        return [rand(5, C), rand(5, C), None, 1e-5, None], ()
    if fn == "rms_norm_bwd":
        x = rand(5, C)
        return [rand(5, C), x, rand(C), (x.float().square().mean(1) + 1e-5).rsqrt(), rand(5, C), None, None], ()
    if fn in ("attention_fwd", "attention_bwd"):
        heads = (2, 1, 1) if gqa else (2, 2, 2)  # q, k, v heads, packed as the model passes them
        q, k, v = rand(1, 8, sum(heads), hs).split(heads, dim=2)
        if fn == "attention_fwd":
            return [q, k, v, hs ** -0.5, None], ()
        o, lse = torch_ref.attention_fwd(q, k, v, hs ** -0.5, None)
        grads = torch.full((1, 8, sum(heads), hs), float("nan"), dtype=dtype).split(heads, dim=2)  # poisoned
        return [rand(1, 8, 2, hs), q, k, v, o, lse, hs ** -0.5, *grads, None], (7, 8, 9)
    if fn in ("qk_norm_rope_fwd", "qk_norm_rope_bwd"):  # 2 query heads, 1 KV head, at positions 5..12
        qkv = rand(2, 8, 4 * hs)
        if fn == "qk_norm_rope_fwd":
            return [qkv, 2, 1, 5, 1e4, True], ()
        _, rstd = torch_ref.qk_norm_rope_fwd(qkv, 2, 1, 5, 1e4, True)
        return [rand(2, 8, 4 * hs), qkv, rstd, 2, 1, 5, 1e4, True], ()
    if fn in ("swiglu_fwd", "swiglu_bwd", "relu2_fwd", "relu2_bwd"):
        width = 2 * C if fn.startswith("swiglu") else C
        return ([rand(5, width)] if fn.endswith("fwd") else [rand(5, C), rand(5, width)]), ()
    targets = torch.tensor([3, -100, 7, 15])  # in the shard [5, 14), ignored, and another rank's
    if fn == "cross_entropy_fwd":
        return [rand(4, 10), torch.tensor([3, -100, 0, 8]), 9, -100, 1e-3, 0.5, False], ()
    if fn == "cross_entropy_stats":
        return [rand(4, 10), targets, 5, 9], ()
    if fn == "cross_entropy_grad":
        return [rand(4, 10), targets, torch.rand(4) + 4, 5, 9, -100, 1e-3, 0.5], (0,)
    if fn == "adamw_step":
        return [rand(64), rand(64), rand(64), rand(64).abs(), 1e-2, 0.9, 0.95, 1e-8, 0.1, 3, 32, 0.5], (0, 2, 3)
    assert fn == "sum_of_squares", fn
    return [rand(64)], ()


# Agreement with the specification at the claimed dtype, loose enough for any correct kernel on
# these tiny inputs (the op tests hold each backend to its own tighter tolerances).
CLAIM_TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
             torch.float16: dict(rtol=5e-3, atol=5e-3)}


def _outputs(result, args, written):
    returned = result if isinstance(result, tuple) else (result,)
    return [t for t in (*returned, *(args[i] for i in written)) if isinstance(t, torch.Tensor)]


def _check_against_specification(module, fn, dtype, hs, gqa=False):
    args, written = _arguments(fn, dtype, hs=hs, gqa=gqa)
    widened = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    got = _outputs(getattr(module, fn)(*args), args, written)
    want = _outputs(getattr(torch_ref, fn)(*widened), widened, written)
    assert len(got) == len(want), f"{fn}: {len(got)} outputs, the specification has {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape, f"{fn} output {i}: shape {tuple(g.shape)}, expected {tuple(w.shape)}"
        torch.testing.assert_close(g.double(), w.to(g.dtype).double(), **CLAIM_TOL[dtype],
                                   msg=lambda m, i=i: f"{fn} output {i} at {dtype_name(dtype)}: {m}")


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
    assert set(module.SUPPORT) <= set(OPS), f"{name}: unknown ops in SUPPORT"
    for op, support in module.SUPPORT.items():
        assert set(support.dtypes) <= {"cpu", "cuda"} and set(support.notes) <= set(support.dtypes)
        for fn in functions(op):
            assert callable(getattr(module, fn, None)), f"{name} lists {op} but has no {fn}"


@pytest.mark.parametrize("name,op,dtype,accepted", _cpu_cases())
def test_cpu_dtypes_follow_the_table(name, op, dtype, accepted):
    """Every function of the op, not only its first: a dtype the table claims is computed as the
    specification computes it, any other is refused by name."""
    module = backends.load(name)
    for fn in functions(op):
        if accepted:
            _check_against_specification(module, fn, dtype, _head_size(module))
        else:
            args, _ = _arguments(fn, dtype, hs=_head_size(module))
            with pytest.raises(ValueError, match=f"dtype {dtype_name(dtype)}; supported: "):
                getattr(module, fn)(*args)
    if accepted:
        assert backends.unavailable_reason(name, op, CPU, dtype) is None
    else:
        assert "takes" in backends.unavailable_reason(name, op, CPU, dtype)


def _gqa_cases():
    """(backend, dtype, claims gqa) for each backend running attention here, at its CPU dtypes."""
    return [pytest.param(name, dtype, m.SUPPORT["attention"].gqa, id=f"{name}-{dtype_name(dtype)}")
            for name, m in _tables() if m.unavailable_reason(CPU) is None and "cpu" in m.SUPPORT["attention"].dtypes
            for dtype in m.SUPPORT["attention"].dtypes["cpu"]]


@pytest.mark.parametrize("name,dtype,claims", _gqa_cases())
def test_cpu_gqa_follows_the_table(name, dtype, claims):
    """K/V heads shared by query heads: computed as the specification computes them where the
    row claims gqa, refused by name where it does not."""
    module = backends.load(name)
    for fn in functions("attention"):
        if claims:
            _check_against_specification(module, fn, dtype, _head_size(module), gqa=True)
        else:
            args, _ = _arguments(fn, dtype, hs=_head_size(module), gqa=True)
            with pytest.raises(ValueError, match="has no grouped-query attention"):
                getattr(module, fn)(*args)


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
    for op in OPS:
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


def _extensions():
    """The built extension modules: nanolm._C and, where built, nanolm._C_sim."""
    found = [] if _C is None else [_C]
    try:
        from nanolm import _C_sim
        found.append(_C_sim)
    except ImportError:
        pass
    return found


# Launchers that take no tensor: sizes of a workspace the caller allocates.
NO_BUFFERS = {"layernorm_bwd_workspace_rows_cuda", "sum_of_squares_partials_cuda"}


@pytest.mark.parametrize("ext", _extensions(), ids=lambda m: m.__name__)
def test_every_launcher_takes_the_dtype_of_its_buffers(ext):
    """Raw pointers carry no type: a launcher that takes them also takes the buffers' DType and
    refuses, in C++, one it has no kernel for (an fp32-only launcher handed bf16 buffers once read
    them as fp32, out of bounds). A new launcher without a DType argument fails here."""
    launchers = [n for n in dir(ext) if n.endswith(("_cpu", "_cuda")) and n not in NO_BUFFERS]
    assert launchers
    for name in launchers:
        signature = getattr(ext, name).__doc__.splitlines()[0]
        assert "DType" in signature, f"{ext.__name__}.{name} takes buffers but no DType: {signature}"


def test_fp32_only_launchers_refuse_16_bit_buffers_in_cpp():
    """The C++ side checks the dtype itself, whatever the Python layer did."""
    if _C is None:
        pytest.skip("nanolm._C is not built")
    x = torch.zeros(64)
    scalars = _C.AdamWScalars(0.1, 0.95, 0.05, 1e-8, 1.0, 1e-3, 1.0, 1.0)
    with pytest.raises(ValueError, match="adamw_step_cpu: unsupported dtype bfloat16"):
        _C.adamw_step_cpu(*(x.data_ptr(),) * 4, 64, 0, scalars, _C.DType.bfloat16)
    with pytest.raises(ValueError, match="sum_of_squares_cpu: unsupported dtype float16"):
        _C.sum_of_squares_cpu(x.data_ptr(), 64, _C.DType.float16)


@pytest.mark.cuda_sim
def test_cuda_launchers_refuse_unbuilt_dtypes_in_cpp():
    """The CUDA launchers, run through the emulation: each refuses a dtype it has no kernel for."""
    from nanolm import _C_sim
    x, t, out = torch.zeros(4, 64), torch.zeros(4, dtype=torch.int64), torch.zeros(4, 64)
    with pytest.raises(ValueError, match="unsupported dtype float16"):
        _C_sim.cross_entropy_stats_cuda(x.data_ptr(), t.data_ptr(), out.data_ptr(), 4, 64, 64, 0,
                                        _C_sim.DType.float16, 0)
    scalars = _C_sim.AdamWScalars(0.1, 0.95, 0.05, 1e-8, 1.0, 1e-3, 1.0, 1.0)
    with pytest.raises(ValueError, match="adamw_step_cuda: unsupported dtype bfloat16"):
        _C_sim.adamw_step_cuda(*(x.data_ptr(),) * 4, 64, 0, scalars, _C_sim.DType.bfloat16, 0)
    with pytest.raises(ValueError, match="sum_of_squares_cuda: unsupported dtype bfloat16"):
        _C_sim.sum_of_squares_cuda(x.data_ptr(), 64, out.data_ptr(), out.data_ptr(), _C_sim.DType.bfloat16, 0)

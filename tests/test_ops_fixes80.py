"""flash_llm.spmm, its fused siblings, the raw ops and the formats at the edges session 80's bug hunt found
(hunt80_ops): forward-mode AD through a function compiled outside a dual level, torch.sparse and nested tensors
where a dense one is expected, the density of a coded DeltaRows weight whose nnz is unknown, and raw ops handed
non-contiguous ``data`` / ``offsets``.  CPU (the CUDA implementations are called with the launch faked)."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import flash_llm
from flash_llm import BitmapTiles, DeltaRows, FormatError, SparseLinear, TiledCSL, kernels, ops
from flash_llm.reference import FORMAT_IDS, as_format
from conftest import FORMATS, random_values, sparse_weight

# torch.compile goes through torch.jit internals that warn about their own deprecation; torch warns that sparse CSR
# and nested tensors are beta / prototype
pytestmark = [pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta state:UserWarning"),
              pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype:UserWarning")]

M, K = 32, 64


def _weight(cls=BitmapTiles, dtype=torch.float16, m=M, k=K, seed=0):
    return cls.from_dense(sparse_weight(m, k, 0.3, dtype, seed=seed))


# ---------------------------------------------------------------------------------------------------
# 1. forward-mode AD through a compiled function first compiled outside a dual level (the tangent was dropped)
# ---------------------------------------------------------------------------------------------------
def _fused_calls(w):
    nw = random_values(1, K, torch.float16, seed=3)[0].abs() + 0.5
    nb = random_values(1, K, torch.float16, seed=4)[0]
    bias = random_values(1, M, torch.float16, seed=5)[0]
    return {"spmm": lambda x: flash_llm.spmm(x, w, bias) * 2,
            "spmm_silu_mul": lambda x: ops.spmm_silu_mul(x, w),
            "spmm_rms_norm": lambda x: ops.spmm_rms_norm(x, nw, 1e-6, w, act="silu_mul"),
            "spmm_layer_norm": lambda x: ops.spmm_layer_norm(x, nw, nb, 1e-5, w, bias, act="relu"),
            "spmm_add_": lambda x: ops.spmm_add_(torch.ones(x.shape[0], M, dtype=x.dtype), x, w, bias)}


@pytest.mark.parametrize("name", ["spmm", "spmm_silu_mul", "spmm_rms_norm", "spmm_layer_norm", "spmm_add_"])
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_outside_a_dual_level_then_called_inside_one_keeps_the_tangent(name, backend):
    """A function compiled on a plain ``x`` and then called inside ``fwAD.dual_level()``: the dual level is guarded,
    so it is compiled again (the call falls back to eager, where the tangent is right); before, the first graph ran
    the op without its forward-mode rule and the tangent was None."""
    torch._dynamo.reset()
    fn = _fused_calls(_weight())[name]
    x, xt = random_values(3, K, torch.float16, seed=1), random_values(3, K, torch.float16, seed=2)
    compiled = torch.compile(fn, backend=backend)
    assert torch.equal(compiled(x), fn(x))  # compiled outside forward AD
    with fwAD.dual_level():
        want = fwAD.unpack_dual(fn(fwAD.make_dual(x, xt)))
        got = fwAD.unpack_dual(compiled(fwAD.make_dual(x, xt)))
    assert want.tangent is not None
    assert got.tangent is not None, f"{name}: the tangent was dropped"
    assert torch.equal(got.primal, want.primal) and torch.equal(got.tangent, want.tangent)
    assert torch.equal(compiled(x), fn(x))  # and outside the dual level again
    torch._dynamo.reset()


@pytest.mark.parametrize("name", ["spmm", "spmm_silu_mul", "spmm_rms_norm"])
def test_compiled_fullgraph_outside_a_dual_level_refuses_forward_ad_inside_one(name):
    """With ``fullgraph=True`` the recompile inside the dual level raises the documented NotImplementedError naming
    the function (a fused op decomposes into spmm, which names itself) instead of returning no tangent."""
    torch._dynamo.reset()
    fn = _fused_calls(_weight())[name]
    x, xt = random_values(3, K, torch.float16, seed=1), random_values(3, K, torch.float16, seed=2)
    compiled = torch.compile(fn, backend="eager", fullgraph=True)
    compiled(x)
    with fwAD.dual_level():
        with pytest.raises(Exception, match=r"flash_llm\.spmm\w*: forward-mode AD"):
            compiled(fwAD.make_dual(x, xt))
    torch._dynamo.reset()


def test_compiled_outside_jvp_then_called_under_it_keeps_the_tangent():
    torch._dynamo.reset()
    w = _weight()
    x, xt = random_values(3, K, torch.float16, seed=1), random_values(3, K, torch.float16, seed=2)
    compiled = torch.compile(lambda t: flash_llm.spmm(t, w), backend="eager")
    compiled(x)
    _, tangent = torch.func.jvp(compiled, (x,), (xt,))
    assert torch.equal(tangent, flash_llm.spmm(xt, w))
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------------
# 2. torch.sparse and nested tensors where a dense one is expected: an error that names the argument
# ---------------------------------------------------------------------------------------------------
LAYOUTS = ["sparse_coo", "sparse_csr", "nested", "jagged"]


def _as_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "sparse_coo":
        return t.to_sparse()
    if layout == "sparse_csr":
        if t.dim() != 2:
            pytest.skip("CSR is 2-D")
        return t.to_sparse_csr()
    if layout == "nested":
        return torch.nested.nested_tensor([t, t])
    if t.dim() != 2:
        pytest.skip("a jagged nested tensor of 1-D pieces has no dense dimension to stay")
    return torch.nested.nested_tensor([t, t[:1]], layout=torch.jagged)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("cls", FORMATS, ids=lambda c: c.__name__)
def test_from_dense_refuses_a_non_strided_weight_by_name(cls, layout):
    w = sparse_weight(M, K, 0.3, torch.float16)
    with pytest.raises(TypeError, match=r"^w must be a dense \(strided\) tensor"):
        cls.from_dense(_as_layout(w, layout))
    with pytest.raises(TypeError, match=r"^w must be a dense \(strided\) tensor"):
        cls.from_dense(_as_layout(w.float(), layout), dtype=torch.float16)


@pytest.mark.parametrize("layout", ["sparse_coo", "nested"])
@pytest.mark.parametrize("array", ["data", "offsets"])
@pytest.mark.parametrize("cls", FORMATS, ids=lambda c: c.__name__)
def test_from_state_refuses_non_strided_arrays_with_a_format_error(cls, array, layout):
    tensors, meta = _weight(cls).state("layer.")
    tensors["layer." + array] = _as_layout(tensors["layer." + array], layout)
    with pytest.raises(FormatError, match=rf"tensor 'layer\.{array}' must be a dense \(strided\) tensor"):
        cls.from_state(tensors, meta, "layer.", source="f.safetensors")


def test_sparse_linear_load_state_dict_names_a_sparse_array():
    layer = SparseLinear(_weight(TiledCSL))
    sd = layer.state_dict()
    sd["weight_data"] = sd["weight_data"].to_sparse()
    with pytest.raises(RuntimeError, match=r"tensor 'weight_data' must be a dense \(strided\) tensor"):
        layer.load_state_dict(sd)


def _call(case: str, layout: str):
    """``(function, expected error, argument name)`` for ``case``: one argument of an op made non-strided."""
    w = _weight()
    x = random_values(3, K, torch.float16, seed=1)
    bias = random_values(1, M, torch.float16, seed=2)[0]
    nw = random_values(1, K, torch.float16, seed=3)[0]
    acc = torch.zeros(3, M, dtype=torch.float16)
    bad = lambda t: _as_layout(t, layout)  # noqa: E731
    return {
        "spmm x": (lambda: flash_llm.spmm(bad(x), w), TypeError, "x"),
        "spmm bias": (lambda: flash_llm.spmm(x, w, bad(bias)), TypeError, "bias"),
        "silu_mul x": (lambda: ops.spmm_silu_mul(bad(x), w), TypeError, "x"),
        "rms_norm x": (lambda: ops.spmm_rms_norm(bad(x), nw, 1e-6, w), TypeError, "x"),
        "rms_norm norm_weight": (lambda: ops.spmm_rms_norm(x, bad(nw), 1e-6, w), ValueError, "norm_weight"),
        "layer_norm norm_weight": (lambda: ops.spmm_layer_norm(x, bad(nw), None, 1e-5, w), ValueError,
                                   "norm_weight"),
        "layer_norm norm_bias": (lambda: ops.spmm_layer_norm(x, nw, bad(nw), 1e-5, w), ValueError, "norm_bias"),
        "layer_norm bias": (lambda: ops.spmm_layer_norm(x, nw, None, 1e-5, w, bad(bias)), TypeError, "bias"),
        "add_ acc": (lambda: ops.spmm_add_(bad(acc), x, w), ValueError, "acc"),
        "add_ x": (lambda: ops.spmm_add_(acc, bad(x), w), TypeError, "x"),
        "add_ bias": (lambda: ops.spmm_add_(acc, x, w, bad(bias)), TypeError, "bias"),
    }[case]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", ["spmm x", "spmm bias", "silu_mul x", "rms_norm x", "rms_norm norm_weight",
                                  "layer_norm norm_weight", "layer_norm norm_bias", "layer_norm bias", "add_ acc",
                                  "add_ x", "add_ bias"])
def test_ops_refuse_a_non_strided_argument_by_name(case, layout):
    fn, error, name = _call(case, layout)
    with pytest.raises(error, match=rf"^{name} must be a dense \(strided\) tensor"):
        fn()


# ---------------------------------------------------------------------------------------------------
# 3. a coded DeltaRows weight whose nnz is unknown (as reference.as_format wraps the ops' arrays)
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [{"splits": 3}, {"parts": 4}, {"splits": 2, "pair_halves": True}],
                         ids=["split", "parts", "paired"])
def test_coded_weight_without_its_count_reports_its_density(kw):
    g = torch.Generator().manual_seed(7)
    w = (torch.rand(64, 104, generator=g) + 0.5).bfloat16()
    w[torch.rand(64, 104, generator=g) < 0.7] = 0
    plain = DeltaRows.from_dense(w, **kw)
    coded = plain.code_values()
    assert coded is not None and coded.coded
    raw = as_format(FORMAT_IDS[DeltaRows], coded.data, coded.offsets, 64, 104, torch.bfloat16)
    assert raw.nnz == -1 and raw.coded
    nnz = int(torch.count_nonzero(w))
    assert raw.density == nnz / (64 * 104) and raw.nnz == nnz
    raw = as_format(FORMAT_IDS[DeltaRows], coded.data, coded.offsets, 64, 104, torch.bfloat16)
    assert "density=" + f"{nnz / (64 * 104):.4f}" in repr(raw)
    layer = SparseLinear(as_format(FORMAT_IDS[DeltaRows], coded.data, coded.offsets, 64, 104, torch.bfloat16))
    assert layer.density == nnz / (64 * 104)
    x = random_values(2, 104, torch.bfloat16, seed=8)
    assert torch.equal(layer(x), flash_llm.spmm(x, plain))


def test_coded_arrays_are_still_checked_and_a_file_holds_plain_values():
    g = torch.Generator().manual_seed(9)
    w = (torch.rand(64, 104, generator=g) + 0.5).bfloat16()
    w[torch.rand(64, 104, generator=g) < 0.7] = 0
    plain = DeltaRows.from_dense(w, splits=3)
    coded = plain.code_values()
    tail = coded.data.clone()
    tail[-1] = 0
    with pytest.raises(FormatError, match="trailer"):
        as_format(FORMAT_IDS[DeltaRows], tail, coded.offsets, 64, 104, torch.bfloat16).density
    grown = torch.cat([coded.data[:-17], torch.zeros(160, dtype=torch.int32), coded.data[-17:]])
    with pytest.raises(FormatError, match="of coded values"):
        as_format(FORMAT_IDS[DeltaRows], grown, coded.offsets, 64, 104, torch.bfloat16).density
    _, meta = plain.state()
    with pytest.raises(FormatError, match="tensor 'data'"):  # (state() writes plain values; a file holds no others)
        DeltaRows.from_state({"data": coded.data, "offsets": coded.offsets}, meta)


# ---------------------------------------------------------------------------------------------------
# 4. raw ops handed non-contiguous data / offsets (the CUDA kernels read them as flat arrays)
# ---------------------------------------------------------------------------------------------------
def _strided(t: torch.Tensor) -> torch.Tensor:
    s = torch.zeros(2 * t.numel(), dtype=t.dtype)[::2]
    s.copy_(t)
    return s


def _raw_calls(w, data, offsets, impl: str):
    """Each raw op's call with ``data`` / ``offsets``: ``impl`` "op" (the dispatcher: the CPU kernel), "fake" (under
    FakeTensorMode) or "cuda" (the CUDA implementation, its launch faked)."""
    x = random_values(3, K, torch.float16, seed=1)
    nw = random_values(1, K, torch.float16, seed=3)[0]
    acc = torch.zeros(3, M, dtype=torch.float16)
    grad = random_values(3, M, torch.float16, seed=4)
    fid = ops._format_id(w)
    o = torch.ops.flash_llm
    calls = {
        "spmm": (o.spmm, ops._spmm_cuda, (x, data, offsets, fid, M, K, None)),
        "spmm_silu_mul": (o.spmm_silu_mul, ops._spmm_silu_mul_cuda, (x, data, offsets, fid, M, K)),
        "spmm_rms_norm": (o.spmm_rms_norm, ops._spmm_rms_norm_cuda, (x, nw, 1e-6, data, offsets, fid, M, K, False)),
        "spmm_layer_norm": (o.spmm_layer_norm, ops._spmm_layer_norm_cuda,
                            (x, nw, None, 1e-5, data, offsets, fid, M, K, None, False)),
        "spmm_add_": (o.spmm_add_, ops._spmm_add_cuda, (acc, x, data, offsets, fid, M, K)),
        "spmm_t": (o.spmm_t, None, (grad, data, offsets, fid, M, K)),
    }
    return {n: (lambda op=op, cuda=cuda, args=args: (cuda if impl == "cuda" else op)(*args))
            for n, (op, cuda, args) in calls.items() if impl != "cuda" or cuda is not None}


@pytest.mark.parametrize("impl", ["op", "fake", "cuda"])
@pytest.mark.parametrize("array", ["data", "offsets"])
@pytest.mark.parametrize("cls", FORMATS, ids=lambda c: c.__name__)
def test_raw_ops_refuse_non_contiguous_arrays_by_name(cls, array, impl, monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode

    w = _weight(cls)
    data, offsets = (_strided(w.data), w.offsets) if array == "data" else (w.data, _strided(w.offsets))
    launched = []
    monkeypatch.setattr(ops, "_no_kernels", lambda device: False)
    monkeypatch.setattr(kernels, "spmm_cuda", lambda *a, **kw: launched.append(a))
    for name, call in _raw_calls(w, data, offsets, impl).items():
        with pytest.raises(ValueError, match=rf"^{array} must be contiguous, got strides \(2,\)$"):
            if impl == "fake":
                with FakeTensorMode(allow_non_fake_inputs=True):
                    call()
            else:
                call()
        assert not launched, name
    # the same arrays made contiguous run (and on the CUDA path reach the launch)
    for name, call in _raw_calls(w, w.data, w.offsets, impl).items():
        call()
    assert len(launched) == (5 if impl == "cuda" else 0)

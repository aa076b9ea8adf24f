"""SparseLinear, flash_llm.spmm and the format objects as PyTorch objects (session 73's bug hunt, hunt73_torch):
forward-mode AD and the torch.func transforms, state dicts loaded under inference mode / with ``assign=True`` /
into or from the meta device, and ``SparseFormat.to``.  CPU.

Numbers are compared with ``torch.nn.functional.linear`` on the dense weight, within twice PyTorch's own error in the
same dtype (vs fp64) plus one ulp, as tests/test_nn.py does."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn

import flash_llm
from flash_llm import BitmapTiles, DeltaRows, SparseLinear, TiledCSL
from conftest import max_abs_err, random_values, sparse_weight, ulp

# torch.compile goes through torch.jit internals that warn about their own deprecation; vmap of the op warns that it
# has no batching rule (it loops)
pytestmark = [pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")]

M, K = 48, 100  # not multiples of 16/64
FMT_NAMES = {BitmapTiles: "bitmap", TiledCSL: "tiled-csl", DeltaRows: "delta-rows"}


def _layer(fmt, dtype, bias=True, seed=0):
    """The dense weight, bias (or None) and the SparseLinear built from them."""
    w = sparse_weight(M, K, 0.3, dtype, seed=seed)
    b = random_values(1, M, dtype, seed=seed + 7)[0] if bias else None
    return w, b, SparseLinear.from_dense(w, b, fmt=FMT_NAMES[fmt])


def _assert_like_linear(y, x, w, b=None):
    """``y`` is ``F.linear(x, w, b)`` within twice PyTorch's own error in the dtype (vs fp64) plus one ulp."""
    ref64 = F.linear(x.double(), w.double(), None if b is None else b.double())
    y_torch = F.linear(x, w, b)
    assert y.shape == ref64.shape and y.dtype == y_torch.dtype
    err, err_torch = max_abs_err(y, ref64), max_abs_err(y_torch, ref64)
    tol = 2 * err_torch + ulp(y.dtype, float(ref64.abs().max()))
    assert err <= tol, f"max |y - fp64| = {err:.3g} > {tol:.3g} (torch's own error {err_torch:.3g})"


# ---------------------------------------------------------------------------------------------------
# 1. forward-mode AD and the torch.func transforms (the tangent was dropped: jacfwd gave zeros)
# ---------------------------------------------------------------------------------------------------
def test_jacfwd_is_the_dense_weight(fmt, dtype):
    w, _, sl = _layer(fmt, dtype)
    x = random_values(1, K, dtype, seed=1)[0]
    jac = torch.func.jacfwd(sl)(x)
    assert torch.equal(jac, w)  # each entry is one product w * 1: exact, as for nn.Linear
    assert torch.equal(jac, torch.func.jacfwd(lambda t: F.linear(t, w))(x))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_jvp_tangent_matches_linear(fmt, dtype, bias):
    w, b, sl = _layer(fmt, dtype, bias)
    x = random_values(2 * 3, K, dtype, seed=2).view(2, 3, K)
    v = random_values(2 * 3, K, dtype, seed=3).view(2, 3, K)
    y, t = torch.func.jvp(sl, (x,), (v,))
    assert torch.equal(y, sl(x))
    assert t.abs().max() > 0
    _assert_like_linear(t, v, w)  # the bias is a buffer: no tangent


def test_forward_ad_dual_tensors(fmt, dtype):
    w, b, sl = _layer(fmt, dtype)
    x, v = random_values(3, K, dtype, seed=4), random_values(3, K, dtype, seed=5)
    b_t = random_values(1, M, dtype, seed=6)[0]
    with fwAD.dual_level():
        y = sl(fwAD.make_dual(x, v))
        primal, tangent = fwAD.unpack_dual(y)
        assert torch.equal(primal, sl(x))
        assert tangent is not None
        _assert_like_linear(tangent, v, w)
        # through flash_llm.spmm, a bias with a tangent adds it (alone, or with x's)
        t_bias = fwAD.unpack_dual(flash_llm.spmm(x, sl.weight, fwAD.make_dual(b, b_t))).tangent
        assert torch.equal(t_bias, b_t.expand(3, M))
        both = fwAD.unpack_dual(flash_llm.spmm(fwAD.make_dual(x, v), sl.weight, fwAD.make_dual(b, b_t))).tangent
        _assert_like_linear(both, v, w, b_t)


def test_reverse_mode_torch_func_transforms(fmt):
    w, _, sl = _layer(fmt, torch.float16)
    x = random_values(3, K, torch.float16, seed=7)
    assert torch.equal(torch.func.jacrev(sl)(x[0]), w)
    r = random_values(3, M, torch.float16, seed=8)
    g = torch.func.grad(lambda t: (sl(t).float() * r.float()).sum())(x)
    x64 = x.double().requires_grad_()
    (F.linear(x64, w.double()) * r.double()).sum().backward()
    tol = float(x64.grad.abs().max()) * 2.0**-10 + 1e-6  # rounded to fp16 once, as test_spmm_reference's
    assert g.dtype == torch.float16 and (g.double() - x64.grad).abs().max() <= tol
    y = torch.func.vmap(sl, in_dims=1, out_dims=1)(x[:, None].expand(3, 2, K))
    assert torch.equal(y, sl(x)[:, None].expand(3, 2, M))


def test_compile_and_export_still_trace_the_op_and_refuse_forward_ad_there():
    torch._dynamo.reset()
    w, b, sl = _layer(BitmapTiles, torch.float16)
    x, v = random_values(3, K, torch.float16, seed=9), random_values(3, K, torch.float16, seed=10)
    compiled = torch.compile(sl, fullgraph=True)
    xg = x.clone().requires_grad_()
    y = compiled(xg)
    assert torch.equal(y, sl(x))
    y.float().sum().backward()
    assert torch.equal(xg.grad, torch.func.grad(lambda t: sl(t).float().sum())(x))
    ep = torch.export.export(sl, (x,))
    assert torch.ops.flash_llm.spmm.default in [n.target for n in ep.graph.nodes]
    assert torch.equal(ep.module()(x), sl(x))
    # forward mode in a traced graph would lose the tangent: refused naming flash_llm; without fullgraph the call
    # falls back to eager, where it is right
    with pytest.raises(Exception, match="flash_llm.spmm: forward-mode AD"):
        torch.compile(lambda t, u: torch.func.jvp(sl, (t,), (u,))[1], fullgraph=True)(x, v)
    _assert_like_linear(torch.compile(lambda t, u: torch.func.jvp(sl, (t,), (u,))[1])(x, v), v, w)
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------------
# 2. load_state_dict under torch.inference_mode() (the layer was left with inference tensors)
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("src_dtype", [torch.float16, torch.bfloat16], ids=["same-dtype", "bf16-checkpoint"])
def test_load_under_inference_mode_leaves_normal_tensors(fmt, src_dtype):
    w, b, src = _layer(fmt, src_dtype)
    sd = src.state_dict()
    sl = SparseLinear.zeros(K, M, fmt=FMT_NAMES[fmt])
    lin = nn.Linear(K, M, dtype=src_dtype)
    with torch.inference_mode():
        sl.load_state_dict(sd)
        lin.load_state_dict({"weight": w, "bias": b})
    assert not lin.weight.is_inference()  # the reference
    assert not any(t.is_inference() for t in sl.buffers())
    x = random_values(3, K, src_dtype, seed=11).requires_grad_()
    y = sl(x)  # (raised "Inference tensors cannot be saved for backward")
    _assert_like_linear(y.detach(), x.detach(), w, b)
    y.float().sum().backward()
    lin(x.detach().requires_grad_()).float().sum().backward()
    ref = w.double().sum(0).expand(3, K)
    tol = float(ref.abs().max()) * (2.0**-7 if src_dtype == torch.bfloat16 else 2.0**-10) + 1e-6
    assert (x.grad.double() - ref).abs().max() <= tol


# ---------------------------------------------------------------------------------------------------
# 3. assign=True with a checkpoint bias of another dtype (the layer then refused every forward)
# ---------------------------------------------------------------------------------------------------
def test_assign_casts_the_bias_to_the_weight_dtype(fmt, dtype):
    w, _, src = _layer(fmt, dtype, bias=False)
    b32 = torch.randn(M, generator=torch.Generator().manual_seed(12))
    sd = dict(src.state_dict(), bias=b32)
    x = random_values(3, K, dtype, seed=13)
    for shell in (SparseLinear.zeros(K, M, dtype=dtype, device="meta"), SparseLinear.zeros(K, M, dtype=dtype)):
        shell.load_state_dict(sd, assign=True)
        assert shell.bias.dtype == shell.weight_dtype == dtype
        _assert_like_linear(shell(x), x, w, b32.to(dtype))


# ---------------------------------------------------------------------------------------------------
# 4. values into a meta shell without assign=True (nothing loaded, no warning)
# ---------------------------------------------------------------------------------------------------
def test_meta_shell_without_assign_warns_as_nn_linear(fmt):
    w, _, src = _layer(fmt, torch.float16, bias=False)
    shell = SparseLinear.zeros(K, M, bias=False, fmt=FMT_NAMES[fmt], device="meta")
    lin = nn.Linear(K, M, bias=False, dtype=torch.float16, device="meta")
    with pytest.warns(UserWarning, match="assign=True"):
        lin.load_state_dict({"weight": w})  # the reference
    with pytest.warns(UserWarning, match=r"weight_data, weight_offsets: copying from non-meta arrays.*assign=True"):
        shell.load_state_dict(src.state_dict())
    assert shell.weight_data.is_meta and lin.weight.is_meta
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SparseLinear.zeros(K, M, bias=False, fmt=FMT_NAMES[fmt], device="meta").load_state_dict(src.state_dict(),
                                                                                               assign=True)


# ---------------------------------------------------------------------------------------------------
# 5. a checkpoint whose arrays are on the meta device (a bare "Tensor.item() cannot be called on meta tensors")
# ---------------------------------------------------------------------------------------------------
def test_meta_checkpoint_into_a_real_layer_is_a_named_error(fmt):
    w, b, sl = _layer(fmt, torch.float16)
    before = {k: v.clone() for k, v in sl.state_dict().items() if isinstance(v, torch.Tensor)}
    meta_sd = _layer(fmt, torch.float16, seed=3)[2].to("meta").state_dict()
    with pytest.raises(RuntimeError, match=r"weight_data, weight_offsets: on the meta device in the checkpoint"):
        sl.load_state_dict(meta_sd)
    for k, v in before.items():
        assert torch.equal(sl.state_dict()[k], v), k
    x = random_values(3, K, torch.float16, seed=14)
    _assert_like_linear(sl(x), x, w, b)


def test_meta_checkpoint_loads_shapes_where_nn_linear_takes_meta(fmt):
    src = _layer(fmt, torch.float16, seed=3)[2]
    meta_sd = src.to("meta").state_dict()
    shell = SparseLinear.zeros(K, M, fmt="bitmap", device="meta")  # meta into meta: the checkpoint's format, sizes
    shell.load_state_dict(meta_sd)
    assert (shell.weight_format, shell.nnz, shell.weight_data.shape) == (fmt, src.nnz, src.weight_data.shape)
    real = SparseLinear.zeros(K, M)  # assign=True takes the meta arrays, as nn.Linear takes a meta parameter
    real.load_state_dict(meta_sd, assign=True)
    assert real.weight_data.is_meta and real.weight_format is fmt and real.nnz == src.nnz
    lin = nn.Linear(K, M, dtype=torch.float16)
    lin.load_state_dict({"weight": torch.empty(M, K, dtype=torch.float16, device="meta"),
                         "bias": torch.empty(M, dtype=torch.float16, device="meta")}, assign=True)
    assert lin.weight.is_meta
    bad = dict(meta_sd, weight_offsets=meta_sd["weight_offsets"][:-1])  # lengths are still checked
    with pytest.raises(RuntimeError, match="on the meta device.*is no 48x100"):
        SparseLinear.zeros(K, M, device="meta").load_state_dict(bad)


# ---------------------------------------------------------------------------------------------------
# 6. SparseFormat.to(dtype) and non_blocking
# ---------------------------------------------------------------------------------------------------
class _RecordingTensor(torch.Tensor):
    """Records the keyword arguments of its ``Tensor.to`` calls."""

    calls: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.Tensor.to:
            cls.calls.append(dict(kwargs or {}))
        return super().__torch_function__(func, types, args, kwargs)


def test_format_to_refuses_a_dtype_and_forwards_non_blocking(fmt):
    w = fmt.from_dense(sparse_weight(M, K, 0.3, torch.float16))
    for call in (lambda: w.to(torch.bfloat16), lambda: w.to(dtype=torch.bfloat16),
                 lambda: w.to("cpu", torch.float32)):
        with pytest.raises(TypeError, match=r"dtype=torch\.(bfloat16|float32).*fixed at compression.*"
                                            rf"{fmt.__name__}\.from_dense\(w\.to_dense\(\), dtype="):
            call()
    assert w.to(torch.float16) is w and w.to("cpu", non_blocking=True) is w and w.to() is w
    rec = fmt._from_parts({n: t.as_subclass(_RecordingTensor) for n, t in w.tensors().items()}, w.shape, w.dtype,
                          w.nnz)
    _RecordingTensor.calls = []
    moved = rec.to("meta", non_blocking=True)
    assert moved.device.type == "meta" and moved.shape == w.shape and moved.nnz == w.nnz
    assert len(_RecordingTensor.calls) == len(w.tensors())
    assert all(c.get("non_blocking") is True for c in _RecordingTensor.calls)


def test_compiled_helper_takes_weights_of_several_shapes():
    """One compiled function called with weights of several shapes (q/k/v, o, up...): Dynamo makes their sizes
    symbolic from the second shape on, and the fake kernels refused a ``torch.SymInt`` m ("m must be an int >= 1,
    got s97"; session 74's dispatch hunt). Each call equals eager."""
    import flash_llm

    torch._dynamo.reset()
    helper = torch.compile(lambda x, w: flash_llm.spmm(x, w))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 192, generator=g).half()
    for m in (128, 256, 64):
        wd = torch.randn(m, 192, generator=g).half()
        wd[wd.abs() < 1] = 0
        w = flash_llm.TiledCSL.from_dense(wd)
        assert torch.equal(helper(x, w), flash_llm.spmm(x, w)), m
    torch._dynamo.reset()


def test_raw_ops_refuse_strided_bias_and_acc_by_name():
    """The raw ops (reachable from exported graphs) refuse a strided ``bias`` / ``acc``: the CUDA kernels read them by
    index, so a strided bias was read in storage order there while the CPU reference was right (session 74's dispatch
    hunt); a strided acc was refused on CUDA only, naming the kernels' ``add_to``."""
    from flash_llm import ops

    g = torch.Generator().manual_seed(3)
    wd = torch.randn(32, 64, generator=g).half()
    wd[wd.abs() < 1] = 0
    w = flash_llm.TiledCSL.from_dense(wd)
    x = torch.randn(2, 64, generator=g).half()
    fid = ops._format_id(w)
    strided = torch.randn(32, 2, generator=g).half()[:, 0]
    with pytest.raises(ValueError, match=r"bias must be contiguous"):
        torch.ops.flash_llm.spmm(x, w.data, w.offsets, fid, 32, 64, strided)
    acc = torch.zeros(32, 2).half().t()
    with pytest.raises(ValueError, match=r"^acc must be contiguous"):
        torch.ops.flash_llm.spmm_add_(acc, x, w.data, w.offsets, fid, 32, 64)
    y = torch.ops.flash_llm.spmm(x, w.data, w.offsets, fid, 32, 64, strided.contiguous())
    assert torch.equal(y, flash_llm.spmm(x, w, strided))


def test_spmm_add_with_acc_the_same_tensor_as_x_reads_x_first(monkeypatch):
    """``spmm_add_(h, h, w)`` (a square projection added onto its own input): the CUDA kernels write acc's rows while
    other blocks still read x's, so the CUDA path hands them a copy of x when the two share bytes (launch faked: no
    GPU); the reference path computes the product before it adds."""
    from flash_llm import kernels, ops

    g = torch.Generator().manual_seed(4)
    wd = torch.randn(64, 64, generator=g).half()
    wd[wd.abs() < 1] = 0
    w = flash_llm.TiledCSL.from_dense(wd)
    h = torch.randn(3, 64, generator=g).half()
    want = h + flash_llm.spmm(h, w)
    got = h.clone()
    ops.spmm_add_(got, got, w)
    assert torch.equal(got, want)
    seen = []
    monkeypatch.setattr(ops, "_no_kernels", lambda device: False)
    monkeypatch.setattr(kernels, "spmm_cuda", lambda x, *a, add_to=None: seen.append(ops._overlaps(x, add_to)))
    ops._spmm_add_cuda(h, h, w.data, w.offsets, ops._format_id(w), 64, 64)
    ops._spmm_add_cuda(h, h.clone(), w.data, w.offsets, ops._format_id(w), 64, 64)
    assert seen == [False, False]
    base = torch.zeros(4, 64).half()
    assert ops._overlaps(base[:2], base[1:3]) and not ops._overlaps(base[:2], base[2:])
    assert ops._overlaps(base, base.t()) and not ops._overlaps(base[:, :32], torch.zeros(4, 32).half())


def test_spmm_add_hands_cuda_a_bias_apart_from_acc(monkeypatch):
    """``spmm_add_(acc, x, w, bias=acc[0])``: the bias is read while acc's rows are written, so the CUDA path hands the
    kernels a copy of a bias that shares acc's bytes, as it does for x (launch faked: no GPU); the reference path reads
    the bias before it adds."""
    from flash_llm import kernels, ops

    g = torch.Generator().manual_seed(5)
    wd = torch.randn(64, 64, generator=g).half()
    wd[wd.abs() < 1] = 0
    w = flash_llm.TiledCSL.from_dense(wd)
    x = torch.randn(3, 64, generator=g).half()
    acc = torch.randn(3, 64, generator=g).half()
    want = acc + flash_llm.spmm(x, w, acc[1].clone())
    got = acc.clone()
    ops.spmm_add_(got, x, w, got[1])
    assert torch.equal(got, want)
    seen = []
    monkeypatch.setattr(ops, "_no_kernels", lambda device: False)
    monkeypatch.setattr(kernels, "spmm_cuda",
                        lambda x, d, o, f, m, k, bias, add_to=None: seen.append(ops._overlaps(bias, add_to)))
    ops._spmm_add_cuda(acc, x, w.data, w.offsets, ops._format_id(w), 64, 64, acc[1])
    ops._spmm_add_cuda(acc, x, w.data, w.offsets, ops._format_id(w), 64, 64, acc[1].clone())
    assert seen == [False, False]

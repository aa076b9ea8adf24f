"""Session 84's fixes in flash_llm.ops: ``torch.vmap`` (and ``jacrev`` / ``jacfwd``, which vmap) over a dimension of
size 0 through spmm and its siblings (each op has a vmap rule: per sample, as torch's fallback ran it, and the empty
result over no samples); ``spmm_add_`` under vmap."""
import warnings

import pytest
import torch

from flash_llm import SparseLinear, TiledCSL, ops
from flash_llm.reference import FORMAT_IDS, layer_norm, rms_norm, silu_mul_halves


def _weight(m, k, dtype=torch.float16, density=0.3):
    return TiledCSL.from_dense((torch.randn(m, k) * (torch.rand(m, k) < density)).to(dtype))


def _dense(t, w, b=None):
    """``t @ W^T (+ b)`` on the dense weight, in fp32, rounded once (the products the ops compute)."""
    y = t.float() @ w.to_dense().float().t()
    return (y if b is None else y + b.float()).to(t.dtype)


def _cases(m, k):
    """(name, the op, its dense reference) for spmm, SparseLinear and the fused ops."""
    w = _weight(m, k)
    b, nw, nb = torch.randn(m).half(), torch.randn(k).half(), torch.randn(k).half()
    layer = SparseLinear(w, b)
    return [("spmm", lambda t: ops.spmm(t, w, b), lambda t: _dense(t, w, b)),
            ("SparseLinear", layer, lambda t: _dense(t, w, b)),
            ("spmm_silu_mul", lambda t: ops.spmm_silu_mul(t, w), lambda t: silu_mul_halves(_dense(t, w))),
            ("spmm_rms_norm", lambda t: ops.spmm_rms_norm(t, nw, 1e-6, w), lambda t: _dense(rms_norm(t, nw, 1e-6), w)),
            ("spmm_layer_norm", lambda t: ops.spmm_layer_norm(t, nw, nb, 1e-5, w, b, act="relu"),
             lambda t: torch.relu(_dense(layer_norm(t, nw, nb, 1e-5), w, b)))]


# ---- 1. torch.vmap over a dimension of size 0 ---------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(0, 64), (0, 2, 64), (2, 0, 64)], ids=["B0", "B0xN2", "B2xN0"])
def test_vmap_and_jacobians_over_an_empty_dimension_give_the_empty_result(shape):
    """``torch.vmap`` over 0 samples failed in the wrappers' ``x.reshape(-1, K)`` ("cannot reshape tensor of 0
    elements ... ambiguous"), and the ops themselves had no vmap rule: torch's fallback refuses a dimension of size 0
    ("Batching rule not implemented for flash_llm::spmm_t. The fallback path does not support vmap over dims of size
    0"), so ``jacrev`` / ``jacfwd`` with an empty input or output failed as well.  Now each gives the empty result
    of the shape the dense reference's gives."""
    torch.manual_seed(0)
    x = torch.randn(*shape).half()
    for name, op, dense in _cases(48, 64):
        for transform in (torch.func.vmap, torch.func.jacrev, torch.func.jacfwd,
                          lambda f: torch.func.vmap(torch.func.jacrev(f))):
            got, want = transform(op)(x), transform(dense)(x)
            assert got.shape == want.shape and got.numel() == 0 and got.dtype == want.dtype, name


def test_vmap_over_samples_is_unchanged():
    """Over samples the vmap rule runs the op once per sample, as torch's fallback did: the same bits as a loop (not
    as one call on all rows: the fp32 reductions' bits may depend on the row count), the dense reference's numbers
    (to fp16 rounding), also nested, over another dimension and with a batched bias."""
    torch.manual_seed(1)
    x = torch.randn(4, 3, 64).half()
    for name, op, dense in _cases(48, 64):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # (torch's fallback warned of "a performance drop")
            y = torch.func.vmap(op)(x)
        assert torch.equal(y, torch.stack([op(t) for t in x])), name
        want = dense(x)
        assert (y.float() - want.float()).abs().max() <= 2e-3 * want.float().abs().max() + 1e-3, name
        assert torch.equal(torch.func.vmap(torch.func.vmap(op))(x), torch.stack([torch.stack(list(map(op, t)))
                                                                                 for t in x])), name
        assert torch.equal(torch.func.vmap(op, in_dims=1, out_dims=1)(x), torch.stack([op(t) for t in x.unbind(1)], 1))
    w = _weight(48, 64)
    bias = torch.randn(4, 48).half()
    assert torch.equal(torch.func.vmap(lambda t, b: ops.spmm(t, w, b))(x, bias),
                       torch.stack([ops.spmm(t, w, b) for t, b in zip(x, bias)]))


def test_spmm_add_under_vmap():
    """``spmm_add_`` under ``torch.vmap`` failed at every batch size ("Batching rule not implemented for
    flash_llm::spmm_add_; the fallback path doesn't work on out= or view ops"): now it adds sample by sample into a
    batched ``acc`` (none over 0 samples), and an unbatched ``acc`` with a batched ``x`` is a ValueError naming acc."""
    torch.manual_seed(2)
    w, b = _weight(48, 64), torch.randn(48).half()
    x, acc = torch.randn(4, 3, 64).half(), torch.randn(4, 3, 48).half()
    want = torch.stack([a + ops.spmm(t, w, b) for a, t in zip(acc, x)])  # (one product of all 12 rows may round
    # differently: the fp32 matmul's blocking depends on the row count)
    torch.func.vmap(lambda a, t: ops.spmm_add_(a, t, w, b))(acc, x)
    assert torch.equal(acc, want)
    empty = torch.zeros(0, 3, 48).half()
    torch.func.vmap(lambda a, t: ops.spmm_add_(a, t, w, b))(empty, x[:0])
    with pytest.raises(ValueError, match=r"flash_llm.spmm_add_: under torch.vmap acc must be batched too"):
        torch.func.vmap(lambda t: ops.spmm_add_(torch.zeros(3, 48).half(), t, w, b))(x)


def test_raw_op_over_zero_samples_still_checks_its_arguments():
    """Over 0 samples nothing is computed, but the op's checks run on one sample's shapes: a wrong argument is still
    the ValueError naming it."""
    w = _weight(48, 64)
    fmt = FORMAT_IDS[TiledCSL]
    with pytest.raises(ValueError, match=r"x must be 2-D \[N, 65\]"):
        torch.func.vmap(lambda t: torch.ops.flash_llm.spmm(t, w.data, w.offsets, fmt, 48, 65, None))(
            torch.randn(0, 2, 64).half())
    with pytest.raises(ValueError, match="x must be float16 or bfloat16"):
        torch.func.vmap(lambda t: torch.ops.flash_llm.spmm(t, w.data, w.offsets, fmt, 48, 64, None))(
            torch.randn(0, 2, 64))


def test_export_with_a_dynamic_batch_keeps_it_symbolic():
    """Review of session 84: the explicit row count was ``lead.numel()``, which pins symbolic sizes outside Dynamo:
    a (non-strict) ``torch.export`` with a dynamic batch failed with "Constraints violated"."""
    w = _weight(48, 64)
    model = torch.nn.Sequential(SparseLinear(w), torch.nn.ReLU()).eval()
    ep = torch.export.export(model, (torch.randn(3, 5, 64).half(),),
                             dynamic_shapes=({0: torch.export.Dim("b", min=2)},), strict=False)
    x = torch.randn(7, 5, 64).half()
    torch.testing.assert_close(ep.module()(x), model(x), rtol=0, atol=0)

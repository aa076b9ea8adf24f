"""fp16 RMSNorm weights above 1 inside the kernels (session 79; session 78 ran them as separate operations).

The kernels multiply X's columns by the norm's weight, rounded to the dtype, and the token's factor
``rsqrt(mean(x^2) + eps)`` multiplies the sums last; in fp16 ``|x g|`` past 65504 overflowed.  Now a weight whose
largest magnitude lies in ``(2^(e-1), 2^e]`` is taken as the copy ``g 2^-e`` and the kernels multiply the factor by
``2^e`` (``kernels.rms_kernel_weight``; the ``rscale`` argument of every kernel that applies the factor).  The CPU
tests check the copy, its cache and the arithmetic the kernels do; the GPU tests (skipped without one) the kernels.
"""

from __future__ import annotations

import pytest
import torch

from flash_llm import kernels, ops
from flash_llm.formats import DeltaRows, TiledCSL
from flash_llm.reference import rms_norm, silu_mul_halves

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("top, scale", [(0.3, 1.0), (1.0, 1.0), (1.0009765625, 2.0), (2.0, 2.0), (2.01, 4.0),
                                        (-3.0, 4.0), (60000.0, 65536.0)])
def test_the_scaled_copy_lies_within_one_and_restores_the_weight(top, scale):
    torch.manual_seed(0)
    w = (torch.rand(96) * 0.9 * min(abs(top), 1.0)).to(torch.float16)
    w[40] = top
    g, s = kernels.rms_kernel_weight(w, torch.float16)
    assert s == scale
    assert (g is w) == (scale == 1.0)
    assert g.dtype == torch.float16 and g.is_contiguous() and g.abs().max() <= 1
    normal = w.double().abs() / s >= 2.0**-14  # a power of two: exact, but for entries it makes subnormal
    assert torch.equal((g.double() * s)[normal], w.double()[normal])
    assert ((g.double() * s - w.double()).abs() <= s * 2.0**-25).all()  # (half a subnormal step)


def test_the_copy_is_cached_per_version_and_keeps_no_weight_alive():
    import gc
    import weakref

    w = torch.full((16,), 3.0, dtype=torch.float16)
    g1, _ = kernels.rms_kernel_weight(w, torch.float16)
    g2, _ = kernels.rms_kernel_weight(w, torch.float16)
    assert g1 is g2  # no second copy (and no second read of the weight) while the weight is unchanged
    w.mul_(0.5)
    g3, s3 = kernels.rms_kernel_weight(w, torch.float16)
    assert g3 is not g1 and s3 == 2.0 and torch.equal(g3 * 2, w)
    small = torch.full((16,), 0.5, dtype=torch.float16)
    assert kernels.rms_kernel_weight(small, torch.float16)[0] is small
    refs = [weakref.ref(w), weakref.ref(small)]
    del w, small, g1, g2, g3
    gc.collect()
    assert all(r() is None for r in refs)  # the cache holds its keys weakly and never the weight as a value


def test_the_kernels_arithmetic_with_the_copy_stays_finite_and_matches_the_reference():
    """The kernels' steps emulated: X times the copy rounded to fp16, the product summed exactly, times the token's
    factor and the scale.  With the weight itself (no scale) the staged product overflows to inf."""
    torch.manual_seed(1)
    k, m, eps = 512, 64, 1e-6
    w = (torch.randn(m, k) * (torch.rand(m, k) < 0.3)).to(torch.float16)
    g = (1 + 0.5 * torch.randn(k)).clamp(-1.9, 1.9).to(torch.float16)
    g[0] = 1.9
    x = torch.randn(2, k)
    x[:, ::37] = 6.0e4
    x = x.to(torch.float16)
    factor = torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + eps)

    def fused(weight, scale):
        staged = (x.float() * weight.float()).to(torch.float16)
        return staged.double() @ w.double().t() * factor * scale

    kw, scale = kernels.rms_kernel_weight(g, torch.float16)
    assert scale == 2.0
    assert not torch.isfinite(fused(g, 1.0)).all()
    got = fused(kw, scale)
    want = rms_norm(x, g, eps).double() @ w.double().t()
    assert torch.isfinite(got).all()
    assert (got - want).abs().max() <= 2e-3 * want.abs().max()


def test_kernel_args_of_each_norm():
    g = torch.full((8,), 2.5, dtype=torch.float16)
    t, eps, s = kernels._norm_kernel_args((g, 1e-5), torch.float16)
    assert s == 4.0 and eps == 1e-5 and torch.equal(t * 4, g)
    b = torch.zeros(8, dtype=torch.float16)
    assert kernels._norm_kernel_args((g, b, 1e-3), torch.float16) == (g, 1e-3, 1.0)  # LayerNorm: as it is
    assert kernels._norm_kernel_args(None, torch.float16) == (None, 0.0, 1.0)
    assert kernels._norm_kernel_args((g, 1e-5), torch.bfloat16)[0] is g  # (bf16: fp32's range)
    with pytest.raises(RuntimeError, match="cannot take"):
        kernels._norm_kernel_args((torch.full((8,), float("nan"), dtype=torch.float16), 1e-5), torch.float16)


# ---- the kernels (GPU) -----------------------------------------------------------------------------------------------
@cuda
@pytest.mark.parametrize("fmt, n, parts, one_launch, act", [
    ("TiledCSL", 1, None, True, None), ("TiledCSL", 1, None, False, None), ("TiledCSL", 1, None, True, "silu_mul"),
    ("TiledCSL", 1, None, False, "silu_mul"), ("DeltaRows", 1, 1, None, None), ("DeltaRows", 1, 1, None, "silu_mul"),
    ("DeltaRows", 1, 4, None, None), ("DeltaRows", 1, 4, None, "silu_mul"), ("DeltaRows", 2, 4, None, None),
])
def test_fp16_norms_above_one_run_inside_every_kernel_that_takes_them(fmt, n, parts, one_launch, act, monkeypatch):
    """Each kernel family that applies the RMSNorm factor (Tiled-CSL n1rs, n1s + reduce_rms[_silu], DeltaRows n1,
    parts, parts nt2) with a weight up to 1.9 and X entries of 6e4: the norm runs inside (no separate operation),
    the output is finite, poisoned outputs are overwritten, and the error is within twice PyTorch's own (the same
    normalized X through cuBLAS in fp16) plus 1e-3 of the largest value."""
    from test_kernels_gpu import record_launches

    def no_unfused(*a):
        raise AssertionError("the norm ran as a separate operation")

    monkeypatch.setattr(kernels, "_unfused", no_unfused)
    if one_launch is not None:
        monkeypatch.setattr(kernels, "N1_FUSED", one_launch)
    torch.manual_seed(3)
    dev, dtype, k, m = torch.device("cuda"), torch.float16, 1024, 512
    w_dense = (torch.randn(m, k) * (torch.rand(m, k) < 0.3) * 0.1).to(dtype)
    if fmt == "TiledCSL":
        w = TiledCSL.from_dense(w_dense.to(dev))
    else:
        w = DeltaRows.from_dense(w_dense.to(dev), parts=parts, pair_halves=act is not None)
    g = (1 + 0.4 * torch.randn(k)).clamp(-1.9, 1.9).to(dtype)
    g[5] = 1.9
    x = torch.randn(n, k)
    x[:, ::97] = 6.0e4 * torch.sign(torch.randn(n, len(range(0, k, 97))))
    x = x.to(dtype)
    launched = record_launches(kernels, monkeypatch)
    for _ in range(2):  # the second call takes the cached copy
        out = torch.full((n, m // 2 if act else m), float("nan"), dtype=dtype, device=dev)
        out.copy_(ops.spmm_rms_norm(x.to(dev), g.to(dev), 1e-6, w, act=act))
        assert torch.isfinite(out).all()
        xn = rms_norm(x, g, 1e-6)
        want = xn.double() @ w_dense.double().t()
        theirs = torch.nn.functional.linear(xn.to(dev), w_dense.to(dev)).double().cpu()
        if act:
            half = m // 2
            want = torch.nn.functional.silu(want[:, :half]) * want[:, half:]
            theirs = silu_mul_halves(theirs.to(dtype)).double()
        tol = 2 * (theirs - want).abs().amax() + 1e-3 * want.abs().amax()
        assert (out.double().cpu() - want).abs().amax() <= tol
    assert launched, "no kernel launched"

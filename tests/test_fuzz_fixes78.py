"""Fixes from session 78's fuzzer run on an H100 (benchmarks/fuzz_spmm.py, ``--max-elems 1048576``, seed 78002):

- fp16 RMSNorm inside the kernels multiplied X by the norm's weight before the token's factor, rounded to fp16:
  ``|x g| > 65504`` overflowed to inf where the reference's normalized product is finite (Tiled-CSL ``_n1rs``, seed
  83594243893919: inf for -15.29).  Now (session 79) an fp16 weight above 1 is taken as a copy scaled by a power of
  two into [-1, 1], the token's factor multiplied back (``kernels.rms_kernel_weight``; session 78 ran such norms
  separately); a weight with NaN / inf runs separately.
- LayerNorm inside DeltaRows' N = 1 kernel: bf16 deviations beyond ~1.8e19 overflowed its fp32 sums to a NaN
  variance, which ``fmaxf`` turned into 0, scaling the deviations by ``rsqrt(eps)`` (seed 170972838936607: 1.35e32
  where the reference gives the bias).  Now the variance is infinite there, as in PyTorch's fp32 LayerNorm.

The CPU tests check the dispatch; the GPU tests (skipped without one) the kernels' results."""

from __future__ import annotations

import warnings

import pytest
import torch

from flash_llm import kernels, ops
from flash_llm.formats import DeltaRows, TiledCSL
from flash_llm.reference import layer_norm, rms_norm

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# ---- which fp16 RMSNorm weights the kernels take inside (CPU) ------------------------------------------------------
@pytest.mark.parametrize("top, dtype, fused", [
    (1.0, torch.float16, True), (-1.0, torch.float16, True), (1.001, torch.float16, True),
    (-3.0, torch.float16, True), (float("inf"), torch.float16, False), (float("nan"), torch.float16, False),
    (50.0, torch.bfloat16, True),
])
def test_rms_fusable_by_the_weights_largest_magnitude(top, dtype, fused):
    w = torch.rand(64).to(dtype)
    w[17] = top
    assert kernels.rms_fusable(w, dtype) is fused


def test_rms_kernel_weight_checks_again_after_an_in_place_change():
    w = torch.full((32,), 0.5, dtype=torch.float16)
    assert kernels.rms_kernel_weight(w, torch.float16) == (w, 1.0)
    w[3] = 2.0  # a new version of the same tensor: a scaled copy
    g, scale = kernels.rms_kernel_weight(w, torch.float16)
    assert g is not w and scale == 2.0 and torch.equal(g * 2, w)
    w[3] = float("inf")
    assert kernels.rms_kernel_weight(w, torch.float16) is None
    w.fill_(0.25)
    assert kernels.rms_kernel_weight(w, torch.float16) == (w, 1.0)
    assert kernels.rms_fusable(torch.empty(0, dtype=torch.float16), torch.float16)


@pytest.mark.parametrize("dtype, top, norm_len, path", [
    (torch.float16, 1.5, 2, "kernel"),  # (through a scaled copy since session 79)
    (torch.float16, float("nan"), 2, "unfused"),
    (torch.float16, 0.75, 2, "kernel"),
    (torch.bfloat16, 1.5, 2, "kernel"),
    (torch.float16, 1.5, 3, "kernel"),  # LayerNorm normalizes before the weight: no overflow to avoid
])
def test_spmm_cuda_runs_a_non_finite_fp16_rms_norm_separately(monkeypatch, dtype, top, norm_len, path):
    monkeypatch.setattr(kernels, "_unfused", lambda *a: "unfused")
    monkeypatch.setattr(kernels, "_delta_rows_cuda", lambda *a: "kernel")
    k, m = 16, 8
    g = torch.full((k,), top, dtype=dtype)
    norm = (g, 1e-5) if norm_len == 2 else (g, None, 1e-5)
    x = torch.randn(1, k).to(dtype)
    assert kernels.spmm_cuda(x, None, None, kernels.DELTA_ROWS, m, k, None, norm=norm) == path


# ---- the kernels (GPU) -----------------------------------------------------------------------------------------------
def _want(x, w_dense, bias=None):
    y = x.double() @ w_dense.double().t()
    return y if bias is None else y + bias.double()


@cuda
@pytest.mark.parametrize("fmt, n, parts", [("TiledCSL", 1, None), ("DeltaRows", 1, None), ("DeltaRows", 1, 1),
                                           ("DeltaRows", 2, None)])
def test_fp16_rms_norm_with_large_weights_stays_finite(fmt, n, parts):
    torch.manual_seed(0)
    dev, dtype, k, m = torch.device("cuda"), torch.float16, 1024, 256
    w_dense = (torch.randn(m, k) * (torch.rand(m, k) < 0.3)).to(dtype)
    w = TiledCSL.from_dense(w_dense.to(dev)) if fmt == "TiledCSL" else \
        DeltaRows.from_dense(w_dense.to(dev), **({} if parts is None else {"parts": parts}))
    g = (1 + 0.5 * torch.randn(k)).to(dtype)
    g[0] = 1.9  # the case's largest weight: 6e4 x 1.9 is past fp16's 65504
    x = torch.randn(n, k)
    x[:, ::97] = 6.0e4 * torch.sign(torch.randn(n, len(range(0, k, 97))))
    x = x.to(dtype)
    for _ in range(2):  # the second call takes the cached check
        out = torch.full((n, m), float("nan"), dtype=dtype, device=dev)
        out.copy_(ops.spmm_rms_norm(x.to(dev), g.to(dev), 1e-6, w))
        assert torch.isfinite(out).all()
        xn = rms_norm(x, g, 1e-6)  # the reference's rounding steps, then the exact product
        want = _want(xn, w_dense)
        theirs = torch.nn.functional.linear(xn.to(dev), w_dense.to(dev)).double().cpu()
        tol = 2 * (theirs - want).abs().amax() + 1e-3 * want.abs().amax()
        assert (out.double().cpu() - want).abs().amax() <= tol


@cuda
def test_bf16_layer_norm_of_overflowing_deviations_as_pytorch():
    torch.manual_seed(1)
    dev, dtype, k, m = torch.device("cuda"), torch.bfloat16, 123, 512
    w_dense = (torch.randn(m, k) * (torch.rand(m, k) < 0.5)).to(dtype)
    w = DeltaRows.from_dense(w_dense.to(dev))
    g = (1 + 0.5 * torch.randn(k)).to(dtype)
    bias = torch.randn(m).to(dtype)
    x = torch.randn(1, k)
    x[0, 5], x[0, 77] = 1e30, -1e30
    x = x.to(dtype)
    out = ops.spmm_layer_norm(x.to(dev), g.to(dev), None, 1e-3, w, bias.to(dev)).cpu()
    xn = layer_norm(x, g, None, 1e-3)  # PyTorch's fp32 LayerNorm: infinite variance, zeros
    assert torch.equal(xn, torch.zeros_like(xn))
    assert torch.equal(out, bias.view(1, m))  # 0 @ W^T + bias


def test_the_llama_layer_keeps_non_finite_fp16_norms_out_of_the_kernels():
    """The decode engine's one-token Llama layer (norms inside the projections) runs only where the kernels take both
    norms' weights (fp16 weights above 1 too, since session 79, through scaled copies); an fp16 weight with NaN / inf
    sends the layer to forward_deferred (compiled norms), not to spmm_cuda's eager separate norm."""
    from types import SimpleNamespace

    from flash_llm.models import llama

    small, large = torch.full((8,), 0.5, dtype=torch.float16), torch.full((8,), 1.25, dtype=torch.float16)
    bad = torch.full((8,), float("inf"), dtype=torch.float16)
    on_gpu = SimpleNamespace(is_cuda=True, dtype=torch.float16)  # (what _norms_fuse reads of x)
    assert llama._norms_fuse((small, small), on_gpu)
    assert llama._norms_fuse((small, large), on_gpu)
    assert not llama._norms_fuse((small, bad), on_gpu)
    assert llama._norms_fuse((large.bfloat16(), large.bfloat16()), SimpleNamespace(is_cuda=True, dtype=torch.bfloat16))
    assert llama._norms_fuse((large, large), torch.zeros(1, 1, 8, dtype=torch.float16))  # the CPU: the reference


@cuda
@pytest.mark.parametrize("top", [0.75, 1.5])
def test_fp16_engine_takes_norms_inside_also_above_one(top, monkeypatch):
    """An fp16 Tiled-CSL Llama at batch 1, fused and merged: with norm weights within [-1, 1], and since session 79
    above 1 too (scaled copies, kernels.rms_kernel_weight), the norms run inside the projections (the n1rs kernels
    launched); its logits within the bound of the deferred path's (FLASH_LLM_FUSE_NORMS off) error against the fp32
    model with the same zeros."""
    pytest.importorskip("transformers")
    from test_engine_gpu import _hf, _ours, _prompts, assert_within_deferred_bound
    from test_kernels_gpu import record_launches

    import flash_llm
    from flash_llm.engine import Engine
    from flash_llm.models import llama
    from flash_llm.prune import magnitude_prune_

    hm = _hf("llama").cuda()
    with torch.no_grad():
        for name, p in hm.named_parameters():
            if name.endswith("layernorm.weight"):
                p.uniform_(0.5, top)  # (top itself within a few ulps: the largest weight about top)

    def sparse_model():
        m = _ours(hm, torch.float16)
        magnitude_prune_(m, 0.8, filter_fn=lambda mod, fqn: fqn != "lm_head")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # (lm_head kept dense)
            flash_llm.sparsify_(m, flash_llm.SparsifyConfig(format="tiled-csl"))
        return m

    prompts = _prompts(1, 3)
    launched = record_launches(kernels, monkeypatch)
    got = Engine(sparse_model(), max_batch=1, max_seq=96, fuse=True, merge=True, formats="keep").generate(
        prompts, 8, output_logits=True)
    assert any(n.endswith(("_n1s", "_n1rs")) for n in launched), sorted(set(launched))
    monkeypatch.setattr(llama, "FUSE_NORMS", False)
    deferred = Engine(sparse_model(), max_batch=1, max_seq=96, fuse=True, merge=True, formats="keep").generate(
        prompts, 8, output_logits=True)
    assert_within_deferred_bound(got, deferred, sparse_model(), prompts, 8, torch.float16, min_agree=3)

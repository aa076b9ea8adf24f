"""DeltaRows on a CUDA GPU: its N = 1 kernel (shared-memory and global X paths, bias, the residual add, every split
count), the expansion above one token, its decode kernel, CUDA graphs with the programmatic launch, and the engine.
Fresh random inputs, outputs poisoned with NaN, tolerance from PyTorch's own error (test_kernels_gpu.check).
Skipped cleanly where there is no CUDA GPU."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import flash_llm
from flash_llm import DeltaRows
from flash_llm.formats import delta_rows as D
from flash_llm.reference import FORMAT_IDS
from test_kernels_gpu import (DTYPES, SHAPES, ULP, assert_scratch_zeroed, check, record_launches, run_kernel,
                              sparse_weight)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
pytestmark = [pytest.mark.gpu, cuda]


def _same_again(again, got, n, tol):
    """A second launch's output: the same bits at one token, or with DeltaRows' multi-token atomics on
    (kernels.DR_NT_ATOMIC; their order of the splits' sums varies) within ``tol`` of the first."""
    if n == 1 or not _kernels().DR_NT_ATOMIC:  # (conservative: the weight's split count may keep the reduction)
        assert torch.equal(again, got), n
    else:
        err = (again.double() - got.double()).abs().max().item()
        assert err <= tol, (n, err, tol)


def _epilogue_kwargs(case, acc, n, m, dtype):
    """``spmm_cuda``'s keywords for an epilogue ``case``: its ``add_to`` a fresh copy of ``acc``, else a poisoned
    ``out`` (``M / 2`` columns with ``act``)."""
    kw = dict(case)
    if "add_to" in kw:
        kw["add_to"] = acc.clone()
    else:
        kw["out"] = torch.full((n, m // 2 if "act" in kw else m), float("nan"), dtype=dtype, device="cuda")
    return kw


def _epilogue_cases(m, k_in, n, dtype, gen):
    """``(w_dense, x, acc, cases)``: a random ``[m, k_in]`` weight at density 0.2, X ``[n, k_in]``, an accumulator
    ``[n, m]``, and the epilogues as ``(keywords, bias, pair_halves)``: plain, the bias, the residual add with the bias,
    SiLU x up of paired halves."""
    w_dense = sparse_weight(m, k_in, 0.2, dtype, gen)
    bias = torch.randn(m, generator=gen, device="cuda").to(dtype)
    x = (0.25 * torch.randn(n, k_in, generator=gen, device="cuda")).to(dtype)
    acc = torch.randn(n, m, generator=gen, device="cuda").to(dtype)
    return w_dense, x, acc, (({}, None, False), ({}, bias, False), ({"add_to": acc}, bias, False),
                             ({"act": "silu_mul"}, None, True))


def _kernels():
    from flash_llm import kernels

    return kernels


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES + [(4096, 4096), (300, 14336)], ids=str)
def test_delta_rows_shapes_densities_and_n(dtype, shape):
    gen = torch.Generator(device="cuda").manual_seed(hash((str(dtype), shape)) % 2**31)
    m, k = shape
    for density in (0.0, 0.01, 0.2, 0.5, 0.95, 1.0):
        w_dense = sparse_weight(m, k, density, dtype, gen)
        w = DeltaRows.from_dense(w_dense)
        for n in (1, 2, 3, 8, 17):  # 2-8: the multi-token kernels (nt2, nt4, nt8); 17: the expansion
            x = torch.randn(n, k, generator=gen, device="cuda").to(dtype)
            bias = torch.randn(m, generator=gen, device="cuda").to(dtype) if density != 0.5 else None
            check(run_kernel(x, w, bias), x, w_dense, bias)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 5])
def test_delta_rows_every_split_count(dtype, n):
    gen = torch.Generator(device="cuda").manual_seed(11)
    w_dense = sparse_weight(200, 2048, 0.2, dtype, gen)
    x = torch.randn(n, 2048, generator=gen, device="cuda").to(dtype)
    for s in (1, 2, 3, 16, 64, 200):
        check(run_kernel(x, DeltaRows.from_dense(w_dense, splits=s), None), x, w_dense, None)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("unaligned", [False, True], ids=["aligned", "x-offset"])
@pytest.mark.parametrize("n", [1, 4])
def test_delta_rows_wide_windows_and_unaligned_x_read_x_from_global_memory(dtype, unaligned, n):
    """Rows of a slice at opposite ends of K (a window wider than the shared-memory X), and X not 16-byte aligned:
    both take the kernel's global-memory path."""
    k = 8192
    gen = torch.Generator(device="cuda").manual_seed(12)
    w_dense = torch.zeros(32, k, dtype=dtype, device="cuda")  # one slice: its rows share every split
    for r in range(32):
        cols = torch.randperm(1024, generator=gen, device="cuda")[:200] + (0 if r < 16 else k - 1024)
        w_dense[r, cols] = torch.randn(200, generator=gen, device="cuda").to(dtype)
    w = DeltaRows.from_dense(w_dense, parts=1)
    assert int(w._offset_arrays()[1][..., 1].max()) > D.WINDOW_MAX
    buf = torch.randn(n * k + 1, generator=gen, device="cuda").to(dtype)
    x = (buf[1:] if unaligned else buf[:n * k]).view(n, k)
    bias = torch.randn(32, generator=gen, device="cuda").to(dtype)
    check(run_kernel(x, w, bias), x, w_dense, bias)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_delta_rows_multi_token_window_comes_from_the_weight(dtype, monkeypatch):
    """The split layout's multi-token kernels stage the weight's widest block window (``kernels.split_nt_window``, read
    once from the offsets and remembered), up to ``DR_NT_WINDOW_BYTES``, wider blocks reading X from global memory;
    a remembered value too small (a freed weight's address reused) sends more blocks there: the same bits.  Windows of
    1537-3072 columns (OPT-30B's) are staged at 2, 4 and 8 tokens; under a cap of 1536 columns some blocks are not."""
    k = _kernels()
    monkeypatch.setattr(k, "DR_NT_ATOMIC", False)  # (bit-for-bit checks: the reduction's fixed order of the splits)
    gen = torch.Generator(device="cuda").manual_seed(13)
    m, kk = 1000, 6144
    w_dense = sparse_weight(m, kk, 0.2, dtype, gen)
    w = DeltaRows.from_dense(w_dense, splits=3)  # windows of some 2400 columns
    lay = D.layout(m, w.offsets.numel(), w.data.numel())
    widest = D.block_window_max(w._offset_arrays()[1])
    assert 1536 < widest <= 3072
    for cap in (48 * 1024, 24 * 1024):  # every block staged; at 8 tokens some read X from global memory
        monkeypatch.setattr(k, "DR_NT_WINDOW_BYTES", cap)
        getattr(w.offsets, k._WINDOW_ATTR, {}).clear()
        assert k.split_nt_window(w.offsets, lay.slices, lay.splits, 8) == (widest if cap > 24 * 1024 else 1536)
        for n in (2, 3, 4, 5, 8):
            x = torch.randn(n, kk, generator=gen, device="cuda").to(dtype)
            got = run_kernel(x, w, None).clone()
            check(got, x, w_dense, None)
            memo = getattr(w.offsets, k._WINDOW_ATTR)
            key = (lay.slices, lay.splits)
            memo[key] = 8  # as if the window were wrong: every block unstaged
            try:
                assert torch.equal(run_kernel(x, w, None), got), (cap, n)
            finally:
                memo.pop(key)
    small = DeltaRows.from_dense(w_dense[:, :1024])  # every window staged at 8 tokens
    widest = D.block_window_max(small._offset_arrays()[1])
    lay = D.layout(m, small.offsets.numel(), small.data.numel())
    assert k.split_nt_window(small.offsets, lay.slices, lay.splits, 8) == -(-widest // 8) * 8 <= 1024
    x = torch.randn(6, 1024, generator=gen, device="cuda").to(dtype)
    check(run_kernel(x, small, None), x, w_dense[:, :1024], None)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("parts", [1, 4])
def test_delta_rows_two_token_staging_gives_the_column_loops_bits(dtype, parts, monkeypatch):
    """At 2 tokens the multi-token kernels stage X by 16-byte loads where X's rows lie on 16 bytes and K % 8 == 0
    (spmm.cu ``dr_nt_stage_vec``), else a column a thread (X one element off 16 bytes): the same window, so the same
    bits, on the split and the parts layout, plain and coded (bf16; 5 tokens of a coded parts weight run as 4 and 1,
    the 1 in a 2-token kernel), with the residual add and with SiLU x up; and they match the reference.  Outputs
    poisoned."""
    k = _kernels()
    monkeypatch.setattr(k, "DR_NT_ATOMIC", False)  # (bit-for-bit: the reduction's fixed order of the splits)
    gen = torch.Generator(device="cuda").manual_seed(parts + 400)
    fid = FORMAT_IDS[DeltaRows]
    launched = record_launches(k, monkeypatch)
    # (M a multiple of 64 for the paired halves; the parts layout needs K % 8 == 0)
    shapes = ((256, 4096), (192, 2056)) + (((128, 1000),) if parts == 1 else ())
    for m, kk in shapes:
        w_dense = _magnitude_pruned(m, kk, 0.2, gen).to(dtype)
        bias = torch.randn(m, generator=gen, device="cuda").to(dtype)
        for pair in (False, True):
            w = DeltaRows.from_dense(w_dense, pair_halves=pair, **({"parts": parts} if parts > 1 else {"splits": 3}))
            for wt in [w] + ([w.code_values()] if dtype == torch.bfloat16 else []):
                for n in (2, 5) if wt.coded and parts > 1 else (2,):
                    x = (0.25 * torch.randn(n, kk, generator=gen, device="cuda")).to(dtype)
                    buf = torch.empty(n * kk + 8, dtype=dtype, device="cuda")
                    x_off = buf[1:1 + n * kk].view(n, kk)  # the same values one element off 16 bytes
                    x_off.copy_(x)
                    assert x.data_ptr() % 16 == 0 and x_off.data_ptr() % 16 != 0
                    acc = torch.randn(n, m, generator=gen, device="cuda").to(dtype)
                    outs = []
                    for xin in (x, x_off):
                        kw = {"out": torch.full((n, m // 2), float("nan"), dtype=dtype, device="cuda"),
                              "act": "silu_mul"} if pair else {"add_to": acc.clone()}
                        launched.clear()
                        outs.append(k.spmm_cuda(xin, wt.data, wt.offsets, fid, m, kk, None if pair else bias,
                                                **kw).clone())
                        assert any("_nt2" in name for name in launched), launched
                    assert not torch.isnan(outs[0]).any(), (m, kk, pair, n)
                    assert torch.equal(outs[0], outs[1]), (m, kk, pair, n, wt.coded)
                    x = x.double()
                    if pair:
                        h = x @ w_dense.double().t()
                        ref = torch.nn.functional.silu(h[:, :m // 2]) * h[:, m // 2:]
                    else:
                        ref = x @ w_dense.double().t() + bias.double() + acc.double()
                    err = (outs[0].double() - ref).abs().max().item()
                    assert err <= 4 * ULP[dtype] * (1 + ref.abs().max().item()), (m, kk, pair, n, err)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("parts", [2, 4, 8, 16])
@pytest.mark.parametrize("stage", [1, 2], ids=["x-fp32", "x-16bit"])
def test_delta_rows_parts_layout_every_lane_count(dtype, parts, stage, monkeypatch):
    """The parts layout (P lanes a row, one split): every density from empty to full, N = 1 (its own kernel, X staged
    as fp32 or as 16-bit) and N = 2-8 (the multi-token kernels summing a row's lanes), bias or none, X at an offset
    not on 16 bytes (copied by the launcher), rows of one slice far apart in K; outputs poisoned."""
    k = _kernels()
    monkeypatch.setattr(k, "PARTS_STAGE", stage)
    gen = torch.Generator(device="cuda").manual_seed(parts + 100 * (dtype == torch.bfloat16))
    # (96, 8192): X from global memory at 5-8 tokens (all of K fits 4 tokens, not 8); (64, 24584): at 2-8
    for m, kk in ((64, 64), (333, 1024), (96, 8192), (3000, 4096), (64, 24584)):
        for density in (0.0, 0.01, 0.2, 1.0):
            w_dense = sparse_weight(m, kk, density, dtype, gen)
            if m == 96:  # half the rows in the first 1024 columns, half in the last
                w_dense[::2, 1024:] = 0
                w_dense[1::2, :-1024] = 0
            w = DeltaRows.from_dense(w_dense, parts=parts)
            assert w.parts == parts
            for n in (1, 2, 5, 8):
                buf = torch.randn(n * kk + 1, generator=gen, device="cuda").to(dtype)
                x = (buf[1:] if n == 1 else buf[: n * kk]).view(n, kk)
                bias = torch.randn(m, generator=gen, device="cuda").to(dtype) if density != 0.2 else None
                check(run_kernel(x, w, bias), x, w_dense, bias)


@pytest.mark.parametrize("stage", (1, 2))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_delta_rows_parts_epilogues_match_the_split_layout(dtype, stage, monkeypatch):
    """Every N = 1 epilogue (RMSNorm, SiLU x up on paired halves, LayerNorm with and without its bias, ReLU, the bias,
    the residual add) on the parts layout gives the split layout's result within 2 ulp of the output's scale (the same
    rounding steps; only the summation order differs), and the same bits twice."""
    k = _kernels()
    monkeypatch.setattr(k, "PARTS_STAGE", stage)
    fid = FORMAT_IDS[DeltaRows]
    gen = torch.Generator(device="cuda").manual_seed(21)
    m, kk = 512, 4096
    w_dense = sparse_weight(m, kk, 0.2, dtype, gen)
    g = (torch.rand(kk, generator=gen, device="cuda") * 0.5 + 0.5).to(dtype)  # <= 1: fused in fp16 too
    b = torch.randn(kk, generator=gen, device="cuda").to(dtype)
    bias = torch.randn(m, generator=gen, device="cuda").to(dtype)
    xn = (3 * torch.randn(1, kk, generator=gen, device="cuda") + 5).to(dtype)  # (normed: the shifted statistics)
    xp = (0.25 * torch.randn(1, kk, generator=gen, device="cuda")).to(dtype)  # (not normed: no overflow)
    acc = torch.randn(1, m, generator=gen, device="cuda").to(dtype)
    cases = [dict(norm=(g, 1e-5)), dict(norm=(g, 1e-5), act="silu_mul", pair=True), dict(act="silu_mul", pair=True),
             dict(norm=(g, b, 1e-5), act="relu", bias=bias), dict(norm=(g, None, 1e-5)), dict(bias=bias),
             dict(add_to=acc, bias=bias), dict(act="relu")]
    for parts in (2, 16):
        for case in cases:
            case = dict(case)
            x = xn if "norm" in case else xp
            pair = case.pop("pair", False)
            cb = case.pop("bias", None)
            outs = []
            for p in (1, parts):
                w = DeltaRows.from_dense(w_dense, parts=p, pair_halves=pair)
                kw = dict(case)
                if "add_to" in kw:
                    kw["add_to"] = kw["add_to"].clone()
                else:
                    kw["out"] = torch.full((1, m // 2 if pair else m), float("nan"), dtype=dtype, device="cuda")
                got = k.spmm_cuda(x, w.data, w.offsets, fid, m, kk, cb, **kw).clone()
                assert bool(torch.isfinite(got).all()), (parts, case)
                if p > 1:
                    kw2 = dict(kw)
                    if "add_to" in kw2:
                        kw2["add_to"] = acc.clone()
                    else:
                        kw2.pop("out")
                    assert torch.equal(k.spmm_cuda(x, w.data, w.offsets, fid, m, kk, cb, **kw2), got)
                outs.append(got)
            tol = 2 * ULP[dtype] * (1 + outs[0].float().abs().max().item())
            assert (outs[1].float() - outs[0].float()).abs().max().item() <= tol, (parts, case)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 3])
def test_delta_rows_residual_add(dtype, n):
    gen = torch.Generator(device="cuda").manual_seed(13)
    w_dense = sparse_weight(500, 1024, 0.2, dtype, gen)
    w = DeltaRows.from_dense(w_dense)
    x = torch.randn(n, 1024, generator=gen, device="cuda").to(dtype)
    bias = torch.randn(500, generator=gen, device="cuda").to(dtype)
    acc = torch.randn(n, 500, generator=gen, device="cuda").to(dtype)
    want = acc.float() + torch.nn.functional.linear(x, w_dense, bias).float()
    got = _kernels().spmm_cuda(x, w.data, w.offsets, FORMAT_IDS[DeltaRows], 500, 1024, bias, add_to=acc.clone())
    err = (got.float() - want).abs().max().item()
    assert err <= 4 * {torch.float16: 2**-10, torch.bfloat16: 2**-7}[dtype] * (1 + want.abs().max().item()), err


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k_in", [2048, 2056])  # 2056: K % 8 != 0, X read from global memory
@pytest.mark.parametrize("splits", [None, 1], ids=["default", "one-split"])  # one split of 2048: X staged as 16-bit
def test_delta_rows_layer_norm_bias_and_relu_inside_the_kernel(dtype, k_in, splits):
    """norm=(g, b, eps) (LayerNorm), the bias, act="relu" and the residual add at N = 1 inside the kernel: within 4
    ulp of the output's scale of the reference composition (LayerNorm in fp32 rounded once, the product in float64,
    + bias rounded, ReLU); X with a mean far from 0 (the shifted statistics); outputs poisoned; a second call the
    same (the same bits at one token: _same_again).  N = 3 runs the LayerNorm and ReLU as separate operations, also
    checked."""
    from flash_llm.reference import layer_norm

    k = _kernels()
    gen = torch.Generator(device="cuda").manual_seed(k_in + 7)
    m = 256
    w_dense = sparse_weight(m, k_in, 0.2, dtype, gen)
    w = DeltaRows.from_dense(w_dense, splits=splits)
    g = (torch.rand(k_in, generator=gen, device="cuda") + 0.5).to(dtype)
    b = torch.randn(k_in, generator=gen, device="cuda").to(dtype)
    bias = torch.randn(m, generator=gen, device="cuda").to(dtype)
    fid = FORMAT_IDS[DeltaRows]
    assert k.epilogue_fusable(fid, w.data, m, k_in, 1, dtype, w.data.device, act="relu", norm=True, layer_norm=True,
                              offsets=w.offsets)
    for n in (1, 3):
        x = (3 * torch.randn(n, k_in, generator=gen, device="cuda") + 20).to(dtype)
        for ln_bias in (b, None):
            h = layer_norm(x, g, ln_bias, 1e-5)
            ref = h.double() @ w_dense.double().t() + bias.double()
            tol = 4 * ULP[dtype] * (1 + ref.abs().max().item())
            for act in (None, "relu"):
                want = ref.clamp(min=0) if act else ref
                out = torch.full((n, m), float("nan"), dtype=dtype, device="cuda")
                got = k.spmm_cuda(x, w.data, w.offsets, fid, m, k_in, bias, out=out, norm=(g, ln_bias, 1e-5), act=act)
                assert not torch.isnan(got).any()
                err = (got.double() - want).abs().max().item()
                assert err <= tol, (n, act, err, tol)
                if act:
                    assert (got >= 0).all()
                _same_again(k.spmm_cuda(x, w.data, w.offsets, fid, m, k_in, bias, norm=(g, ln_bias, 1e-5), act=act),
                            got, n, tol)
        acc = torch.randn(n, m, generator=gen, device="cuda").to(dtype)
        want = acc.double() + x.double() @ w_dense.double().t() + bias.double()
        got = k.spmm_cuda(x, w.data, w.offsets, fid, m, k_in, bias, add_to=acc.clone())
        assert (got.double() - want).abs().max().item() <= 4 * ULP[dtype] * (1 + want.abs().max().item())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k_in", [2048, 2056])  # 2056: K % 8 != 0, X read from global memory
@pytest.mark.parametrize("splits", [None, 1], ids=["default", "one-split"])  # one split of 2048: X staged as 16-bit
def test_delta_rows_norm_and_silu_inside_the_kernel(dtype, k_in, splits):
    """norm=(g, eps), act="silu_mul" (a weight with paired halves) and both, at N = 1 inside the kernel: within 4-8
    ulp of the output's scale of the reference composition (RMSNorm in PyTorch, the product in float64, silu x up of
    the rounded halves); outputs poisoned; a second call the same (tickets reset; _same_again).  An unpaired weight's
    act and N = 2 run as separate operations, also checked.  With one split the windows take 1536-3072 columns: the
    kernel stages X as 16-bit."""
    from flash_llm.reference import rms_norm, silu_mul_halves

    k = _kernels()
    gen = torch.Generator(device="cuda").manual_seed(k_in + 1)
    m = 256
    w_dense = sparse_weight(m, k_in, 0.2, dtype, gen)
    paired = DeltaRows.from_dense(w_dense, pair_halves=True, splits=splits)
    plain = DeltaRows.from_dense(w_dense, splits=splits)
    assert paired.paired and not plain.paired
    if splits == 1 and k_in == 2048:
        assert D.WINDOW_MAX >= D.block_window_max(plain._offset_arrays()[1]) > 1536
    g = (torch.rand(k_in, generator=gen, device="cuda") * 0.5 + 0.5).to(dtype)  # <= 1: fused in fp16 too
    fid = FORMAT_IDS[DeltaRows]
    for n in (1, 2):
        x = (3 * torch.randn(n, k_in, generator=gen, device="cuda")).to(dtype)
        h = rms_norm(x, g, 1e-5)
        ref = h.double() @ w_dense.double().t()
        for w in (paired, plain):
            out = torch.full((n, m), float("nan"), dtype=dtype, device="cuda")
            got = k.spmm_cuda(x, w.data, w.offsets, fid, m, k_in, None, out=out, norm=(g, 1e-5))
            assert not torch.isnan(got).any()
            err = (got.double() - ref).abs().max().item()
            assert err <= 4 * ULP[dtype] * (1 + ref.abs().max().item()), (n, err)
            _same_again(k.spmm_cuda(x, w.data, w.offsets, fid, m, k_in, None, norm=(g, 1e-5)), got, n,
                        4 * ULP[dtype] * (1 + ref.abs().max().item()))
            want = silu_mul_halves(ref.to(dtype))
            for norm in ((g, 1e-5), None):
                out = torch.full((n, m // 2), float("nan"), dtype=dtype, device="cuda")
                act = k.spmm_cuda(x, w.data, w.offsets, fid, m, k_in, None, out=out, norm=norm, act="silu_mul")
                expect = want if norm else silu_mul_halves((x.double() @ w_dense.double().t()).to(dtype))
                assert not torch.isnan(act).any()
                torch.testing.assert_close(act.float(), expect.float(), rtol=0,
                                           atol=8 * ULP[dtype] * (1 + expect.float().abs().max().item()))
                again = k.spmm_cuda(x, w.data, w.offsets, fid, m, k_in, None, norm=norm, act="silu_mul")
                _same_again(again, act, n, 8 * ULP[dtype] * (1 + expect.float().abs().max().item()))
    assert k.epilogue_fusable(fid, paired.data, m, k_in, 1, dtype, paired.data.device, act="silu_mul", norm=True,
                              offsets=paired.offsets)
    assert not k.epilogue_fusable(fid, plain.data, m, k_in, 1, dtype, plain.data.device, act="silu_mul",
                                  offsets=plain.offsets)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("parts", [2, 4, 16])
def test_delta_rows_two_token_rms_norm_inside_the_parts_kernel(dtype, parts, monkeypatch):
    """With ``kernels.DR_NT_NORM`` the parts layout's 2-token kernel takes norm=(g, eps) inside (each token's sum of
    squares and X times g while staging; ``delta_rows_parts_<dtype>_nt2``): one launch, no separate norm, within 4-8
    ulp of the output's scale of the reference composition (RMSNorm in PyTorch, the product in float64), alone and
    with SiLU x up of paired halves, plain and coded (bf16) values, X on 16 bytes or not (the launcher copies it), one
    token of a coded 5-token call; a second call the same bits.  Outputs poisoned.  Without the switch, the separate
    norm: the same within rounding."""
    from flash_llm.reference import rms_norm, silu_mul_halves

    k = _kernels()
    monkeypatch.setattr(k, "DR_NT_NORM", True)
    gen = torch.Generator(device="cuda").manual_seed(parts + 500)
    fid = FORMAT_IDS[DeltaRows]
    launched = record_launches(k, monkeypatch)
    for m, kk in ((256, 4096), (128, 1032)):
        w_dense = _magnitude_pruned(m, kk, 0.2, gen).to(dtype)
        g = (torch.rand(kk, generator=gen, device="cuda") * 0.5 + 0.5).to(dtype)  # <= 1: fused in fp16 too
        for pair in (False, True):
            w = DeltaRows.from_dense(w_dense, parts=parts, pair_halves=pair)
            for wt in [w] + ([w.code_values()] if dtype == torch.bfloat16 else []):
                for off in (0, 1):
                    buf = torch.empty(2 * kk + 8, dtype=dtype, device="cuda")
                    x = buf[off:off + 2 * kk].view(2, kk)
                    x.copy_((3 * torch.randn(2, kk, generator=gen, device="cuda")).to(dtype))
                    ref = rms_norm(x, g, 1e-5).double() @ w_dense.double().t()
                    want = silu_mul_halves(ref.to(dtype)).double() if pair else ref
                    kw = {"act": "silu_mul"} if pair else {}
                    out = torch.full((2, m // 2 if pair else m), float("nan"), dtype=dtype, device="cuda")
                    launched.clear()
                    got = k.spmm_cuda(x, wt.data, wt.offsets, fid, m, kk, None, out=out, norm=(g, 1e-5), **kw).clone()
                    assert launched == [f"delta_rows_parts_{'bf16' if dtype == torch.bfloat16 else 'f16'}_nt2"
                                        f"{'c' if wt.coded else ''}"], launched
                    assert not torch.isnan(got).any()
                    tol = (8 if pair else 4) * ULP[dtype] * (1 + want.abs().max().item())
                    err = (got.double() - want).abs().max().item()
                    assert err <= tol, (m, kk, pair, wt.coded, off, err, tol)
                    again = k.spmm_cuda(x, wt.data, wt.offsets, fid, m, kk, None, norm=(g, 1e-5), **kw)
                    assert torch.equal(again, got)
                    monkeypatch.setattr(k, "DR_NT_NORM", False)
                    sep = k.spmm_cuda(x, wt.data, wt.offsets, fid, m, kk, None, norm=(g, 1e-5), **kw)
                    monkeypatch.setattr(k, "DR_NT_NORM", True)
                    assert (sep.double() - got.double()).abs().max().item() <= 2 * tol
            if dtype == torch.bfloat16:  # 5 tokens of a coded parts weight: 4, then 1 in the 2-token kernel (no norm
                # inside: the separate norm first)
                c = w.code_values()
                x5 = (3 * torch.randn(5, kk, generator=gen, device="cuda")).to(dtype)
                ref = rms_norm(x5, g, 1e-5).double() @ w_dense.double().t()
                want = silu_mul_halves(ref.to(dtype)).double() if pair else ref
                got = k.spmm_cuda(x5, c.data, c.offsets, fid, m, kk, None, norm=(g, 1e-5),
                                  **({"act": "silu_mul"} if pair else {}))
                err = (got.double() - want).abs().max().item()
                assert err <= 8 * ULP[dtype] * (1 + want.abs().max().item()), (m, kk, pair, err)


@pytest.mark.parametrize("mode", ["zeroed", "nofill", "tiled", "tiled_pf", "rows", "rows_b64", "split_rows",
                                  "split_rows_b64", "rows_a4", "split_rows_b64_a4", "split_rows_k", "split_rows_b64_k",
                                  "split_rows_b64_k_a4", "rows_w", "split_rows_w", "split_rows_b64_w"])
def test_delta_rows_decode_kernel_is_exact(mode, monkeypatch):
    """The expansion (whole 16-element chunks between a lane's nonzeros, the rest one by one) gives the weight's bits
    at every density, lanes a row and split count, K not a multiple of 16 (chunks across rows), -0.0 dropped, into a
    poisoned ``out``, plain and (bf16) coded values; ``nofill`` (``delta_rows_to_dense_nf``, session 61) and
    ``tiled`` (``delta_rows_to_dense_nft``, session 63) and ``tiled_pf`` (``_nftp``, its groups asked for a group
    ahead, session 64): the kernel writes every element itself, so an element it misses keeps the poison (the output
    is not zeroed first); ``rows`` (``delta_rows_to_dense_pr``, session 68): the parts layout a slice a block through
    its rows in shared memory, the split layout still ``_nf``; ``split_rows`` (with ``delta_rows_to_dense_sr``, session
    69, for the split layout where ``K % 8 == 0``: a (slice, split) a block through a band of its window, one split's
    window of 4104 columns in five passes) and ``split_rows_b64`` (its bands 64 columns: many passes); ``rows_b64``:
    ``_pr``'s blocks 64 columns of their rows (``DR_DENSE_ROWS_BAND``, session 69), so K = 4104 at 4 lanes a row fits
    too; ``_a4`` (session 70, ``DR_PLACE_AHEAD``): ``_pr4`` (every tile, whatever its size) / ``_sr4``, 4 chunks of
    groups in flight; ``_k`` (session 70, ``DR_PLACE_SKIP``): ``_srk``, each pass skipping the groups outside its
    band (``_k_a4``: ``_srk4``, both); ``_w`` (session 70, ``DR_PLACE_RANGES``): ``_prw`` / ``_srw``, ranges of groups
    a warp."""
    gen = torch.Generator(device="cuda").manual_seed(14)
    k = _kernels()
    nofill = mode != "zeroed"
    split_rows = mode.startswith("split_rows")
    monkeypatch.setattr(k, "DR_DENSE_NOFILL", nofill)
    monkeypatch.setattr(k, "DR_DENSE_TILED", mode.startswith("tiled"))
    monkeypatch.setattr(k, "DR_DENSE_T_PF", mode == "tiled_pf")
    monkeypatch.setattr(k, "DR_DENSE_ROWS", mode.startswith("rows") or split_rows)
    monkeypatch.setattr(k, "DR_DENSE_SPLIT_ROWS", split_rows)
    monkeypatch.setattr(k, "DR_DENSE_ROWS_BAND", 64 if mode == "rows_b64" else 0)
    if mode.startswith("split_rows_b64"):
        monkeypatch.setattr(k, "DR_DENSE_SR_BAND", 64)
    ahead = int(mode.rpartition("_a")[2]) if "_a" in mode else 1
    monkeypatch.setattr(k, "DR_PLACE_AHEAD", ahead)
    monkeypatch.setattr(k, "DR_PLACE_AHEAD_PR_MIN_TILE", 0)
    monkeypatch.setattr(k, "DR_PLACE_SKIP", "_k" in mode)
    monkeypatch.setattr(k, "DR_PLACE_RANGES", mode.endswith("_w"))
    launched = record_launches(k, monkeypatch)
    for dtype in DTYPES:
        for (m, kk) in ((333, 520), (70, 517), (64, 4104)):
            for density in (0.0, 0.02, 0.3, 0.8, 1.0):
                w_dense = sparse_weight(m, kk, density, dtype, gen)
                w_dense[0, : kk // 3] = -0.0  # (a zero of the dense weight: not stored)
                want = DeltaRows.from_dense(w_dense).to_dense().view(torch.int16)
                layouts = [dict(splits=s) for s in (1, 7, 64)]
                layouts += [dict(parts=p) for p in (4, 16)] if kk % 8 == 0 else []
                layouts += ([dict(parts=16, pair_halves=True), dict(splits=3, pair_halves=True)]
                            if kk % 8 == 0 and m % 64 == 0 else [])
                for lay in layouts:
                    w = DeltaRows.from_dense(w_dense, **lay)
                    for ww in [w] + ([w.code_values()] if dtype == torch.bfloat16 and w.code_values() else []):
                        out = torch.full((m, kk), -1, dtype=torch.int16, device="cuda").view(dtype)  # poisoned
                        launched.clear()
                        got = k.decode_dense(FORMAT_IDS[DeltaRows], ww.data, ww.offsets, m, kk, dtype, out=out)
                        assert launched == [_expansion_kernel(k, mode, lay, kk)], (launched, mode, lay)
                        assert torch.equal(got.view(torch.int16), want), (mode, dtype, m, kk, density, lay, ww.coded)


def _expansion_kernel(k, mode: str, lay: dict, kk: int) -> str:
    """The kernel that ``kernels.decode_dense`` launches for a DeltaRows weight of layout ``lay`` and K ``kk`` in the
    test mode ``mode`` of :func:`test_delta_rows_decode_kernel_is_exact`."""
    ahead = mode.rpartition("_a")[2] if "_a" in mode else ""
    if (mode.startswith("rows") or mode.startswith("split_rows")) and "parts" in lay:
        band = 64 if mode == "rows_b64" else kk
        if (32 // lay["parts"]) * band * 2 <= k.DR_DENSE_ROWS_SMEM:  # (a tile within its shared-memory bound)
            return "delta_rows_to_dense_pr" + ("w" if mode.endswith("_w") else "4" if ahead else "")
    if mode.startswith("split_rows") and "parts" not in lay and kk % 8 == 0:
        return "delta_rows_to_dense_sr" + ("w" if mode.endswith("_w") else ("k" if "_k" in mode else "") + ahead)
    return {"zeroed": "delta_rows_to_dense", "tiled": "delta_rows_to_dense_nft",
            "tiled_pf": "delta_rows_to_dense_nftp"}.get(mode, "delta_rows_to_dense_nf")


@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("parts", [1, 16])
def test_delta_rows_graph_under_static_weights_equals_eager(n, parts, monkeypatch):
    """Captured with the programmatic launch (static_weights), replayed twice: the eager result's bits (with the
    reduction's fixed order of the splits, kernels.DR_NT_ATOMIC off), and with the atomics' split-K the reference's
    result within tolerance."""
    gen = torch.Generator(device="cuda").manual_seed(15)
    w_dense = sparse_weight(1024, 4096, 0.2, torch.float16, gen)
    w = DeltaRows.from_dense(w_dense, parts=parts)
    x = torch.randn(n, 4096, generator=gen, device="cuda").half()
    kernels = _kernels()
    if n > 1 and parts == 1:
        monkeypatch.setattr(kernels, "DR_NT_ATOMIC", True)
        monkeypatch.setattr(kernels, "DR_NT_ATOMIC_MIN_SPLITS", 2)
        g = torch.cuda.CUDAGraph()
        flash_llm.spmm(x, w)  # (warm)
        with kernels.static_weights(), torch.cuda.graph(g):
            out = flash_llm.spmm(x, w)
        for _ in range(3):
            out.fill_(float("nan"))
            g.replay()
            check(out, x, w_dense, None)
        monkeypatch.setattr(kernels, "DR_NT_ATOMIC", False)
    eager = flash_llm.spmm(x, w)
    check(eager, x, w_dense, None)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), kernels.static_weights():
        flash_llm.spmm(x, w)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with kernels.static_weights(), torch.cuda.graph(g):
        out = flash_llm.spmm(x, w)
    for _ in range(2):
        out.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager)


transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_delta_rows_engine_graph_equals_eager_and_dense_with_zeros(family, monkeypatch):
    """Llama: RMSNorm, SiLU x up and the residual adds inside the kernels at one token; OPT: LayerNorm, ReLU, the
    biases and the residual adds.  (kernels.DR_NT_ATOMIC off: graph and eager bit for bit at batch 4.)"""
    from test_engine_gpu import ULP, _graph_vs_eager, _hf, _ours, _prompts

    monkeypatch.setattr(_kernels(), "DR_NT_ATOMIC", False)

    from flash_llm.engine import Engine
    from flash_llm.prune import magnitude_prune_

    dense = _ours(_hf(family).cuda(), torch.float16)
    magnitude_prune_(dense, 0.8, filter_fn=lambda m, fqn: fqn != "lm_head")
    sparse = copy.deepcopy(dense)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        report = flash_llm.sparsify_(sparse, flash_llm.SparsifyConfig(format="delta-rows"))
    assert report.converted and all(isinstance(sparse.get_submodule(c.fqn).weight, DeltaRows)
                                    for c in report.converted)
    # "keep": DeltaRows at every batch (delta_layout="auto" re-encodes as Tiled-CSL from max_batch 4 since session 33,
    # in place: so the copy is taken before _graph_vs_eager's engines)
    merged = Engine(copy.deepcopy(sparse), max_batch=4, max_seq=64, merge=True, delta_layout="keep")
    _graph_vs_eager(sparse, [1, 4, 1])
    if family == "llama":
        layer = merged.model.model.layers[0]
        assert layer.mlp.gate_up_proj.layer.weight.paired  # so the one-token layers run inside the kernels
    else:
        layer = merged.model.model.decoder.layers[0]
    x = torch.zeros(1, 1, dense.config.hidden_size, dtype=torch.float16, device="cuda")
    with torch.no_grad():
        assert layer.sparse_projections(x) is not None
    ref = copy.deepcopy(dense).float()
    prompts = _prompts(4, 5)
    outs = [Engine(m, max_batch=4, max_seq=64).generate(prompts, 3, output_logits=True).logits for m in
            (ref, dense, sparse)]
    outs.append(merged.generate(prompts, 3, output_logits=True).logits)  # merged: the fused one-token layers
    one = [Engine(m, max_batch=1, max_seq=64, merge=True).generate(prompts[:1], 3, output_logits=True).logits
           for m in (copy.deepcopy(dense), copy.deepcopy(sparse))]
    assert (one[1][:, 0] - one[0][:, 0]).abs().max().item() <= 16 * ULP[torch.float16] * (
        1 + one[0][:, 0].abs().max().item())
    err_dense = (outs[1][:, 0] - outs[0][:, 0]).abs().max().item()
    err_sparse = (outs[2][:, 0] - outs[0][:, 0]).abs().max().item()
    assert err_sparse <= 2 * err_dense + ULP[torch.float16] * outs[0][:, 0].abs().max().item()
    err_merged = (outs[3][:, 0] - outs[0][:, 0]).abs().max().item()
    assert err_merged <= 2 * err_dense + ULP[torch.float16] * outs[0][:, 0].abs().max().item()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_delta_rows_parts_multi_token_epilogues_match_the_split_layout(dtype):
    """At 2-8 tokens the parts layout's kernel applies the bias, the residual add and SiLU x up (paired halves) itself:
    the split layout's results (partials and the reduction) within 2 ulp of the output's scale, every row written;
    also where all of K fits only 4 tokens (K = 8192: at 5 and 8 tokens X comes from global memory)."""
    k = _kernels()
    fid = FORMAT_IDS[DeltaRows]
    gen = torch.Generator(device="cuda").manual_seed(22)
    m = 512
    for kk, n in ((2048, 2), (2048, 5), (2048, 8), (8192, 5), (8192, 8)):
        w_dense, x, acc, cases = _epilogue_cases(m, kk, n, dtype, gen)
        for case, cb, pair in cases:
            outs = []
            for p in (1, 4):
                w = DeltaRows.from_dense(w_dense, parts=p, pair_halves=pair)
                kw = _epilogue_kwargs(case, acc, n, m, dtype)
                got = k.spmm_cuda(x, w.data, w.offsets, fid, m, kk, cb, **kw).clone()
                assert bool(torch.isfinite(got).all()), (n, p, case)
                outs.append(got)
            tol = 2 * ULP[dtype] * (1 + outs[0].float().abs().max().item())
            assert (outs[1].float() - outs[0].float()).abs().max().item() <= tol, (n, case)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_delta_rows_multi_token_atomics_match_the_reduction(dtype, monkeypatch):
    """kernels.DR_NT_ATOMIC: at 2-8 tokens the split layout's kernel sums its splits by atomics and its last warp of a
    slice writes y (``delta_rows_spmm_<dtype>_nt<NT>a``, no ``delta_rows_reduce``): the reduction's results within
    2 ulp of the output's scale (another order of the fp32 sums), plain, with the bias, the residual add and SiLU x up
    (paired halves), into poisoned outputs, twice (so the sums and tickets are zeroed again)."""
    k = _kernels()
    monkeypatch.setattr(k, "DR_NT_ATOMIC_MIN_SPLITS", 2)  # (the weights below have 3-7 splits)
    fid = FORMAT_IDS[DeltaRows]
    gen = torch.Generator(device="cuda").manual_seed(23)
    launched = record_launches(k, monkeypatch)
    m = 512
    for kk, n, splits in ((2048, 2, 5), (2048, 3, 3), (4096, 8, 7), (2056, 5, 4)):
        w_dense, x, acc, cases = _epilogue_cases(m, kk, n, dtype, gen)
        for case, cb, pair in cases:
            w = DeltaRows.from_dense(w_dense, splits=splits, pair_halves=pair)
            outs = []
            for atomic in (False, True, True):
                monkeypatch.setattr(k, "DR_NT_ATOMIC", atomic)
                launched.clear()
                kw = _epilogue_kwargs(case, acc, n, m, dtype)
                got = k.spmm_cuda(x, w.data, w.offsets, fid, m, kk, cb, **kw).clone()
                assert bool(torch.isfinite(got).all()), (n, atomic, case)
                assert any(s.endswith("a") and "_nt" in s for s in launched) == atomic, launched
                assert any("delta_rows_reduce" in s for s in launched) != atomic, launched
                outs.append(got)
            tol = 2 * ULP[dtype] * (1 + outs[0].float().abs().max().item())
            for o in outs[1:]:
                assert (o.float() - outs[0].float()).abs().max().item() <= tol, (n, case)
    assert_scratch_zeroed(k, x.device)


def _magnitude_pruned(m, k, density, gen):
    """bf16 normal values pruned by magnitude (``DeltaRows.code_values`` needs each row's kept values within 7
    binades, as in a pruned model; a random mask keeps tiny values)"""
    w = torch.randn(m, k, generator=gen, device="cuda")
    if density >= 1.0:  # (all kept: values of magnitude 0.5 to 8)
        return (w.sign() * (0.5 + 7.5 * torch.rand(m, k, generator=gen, device="cuda"))).to(torch.bfloat16)
    t = float(torch.special.ndtri(torch.tensor(1.0 - density / 2, dtype=torch.float64)))
    return w.masked_fill_(w.abs() < t, 0.0).to(torch.bfloat16)


@pytest.mark.parametrize("parts", [1, 2, 4, 8, 16])
def test_delta_rows_coded_values_give_the_plain_weights_bits(parts, monkeypatch):
    """Coded values (``DeltaRows.code_values``): the N = 1 kernels (``delta_rows_spmm_bf16_n1c``,
    ``delta_rows_parts_bf16_p<P>_s2c``) and at 2-8 tokens the multi-token ones (``delta_rows_spmm_bf16_nt<NT>c``
    with the plain reduction, ``delta_rows_parts_bf16_nt<NT>c``) give the plain weight's kernels' bits for every
    epilogue (the same values in the same order); above 8 tokens the expansion (``delta_rows_to_dense`` decoding
    the codes) matches the reference, and gives the dense weight's bits.  Outputs poisoned, densities from empty to
    full."""
    k = _kernels()
    monkeypatch.setattr(k, "PARTS_STAGE", 2)
    fid = FORMAT_IDS[DeltaRows]
    gen = torch.Generator(device="cuda").manual_seed(parts + 300)
    launched = record_launches(k, monkeypatch)
    for m, kk, density in ((128, 4096, 0.2), (64, 64, 1.0), (192, 1024, 0.0), (256, 2048, 0.5), (64, 8192, 0.01)):
        w_dense = _magnitude_pruned(m, kk, density, gen)
        g = (torch.rand(kk, generator=gen, device="cuda") + 0.5).to(torch.bfloat16)
        bias = torch.randn(m, generator=gen, device="cuda").to(torch.bfloat16)
        for n, case in ((n, case) for n in (1, 2, 5) for case in (
                dict(), dict(bias=bias), dict(norm=(g, 1e-5)), dict(add_to=True, bias=bias),
                dict(act="silu_mul", pair=True), dict(norm=(g, 1e-5), act="silu_mul", pair=True),
                dict(act="relu", bias=bias))):
            acc = torch.randn(n, m, generator=gen, device="cuda").to(torch.bfloat16)
            x = (0.25 * torch.randn(n, kk, generator=gen, device="cuda")).to(torch.bfloat16)
            case = dict(case)
            pair = case.pop("pair", False)
            cb = case.pop("bias", None)
            plain = DeltaRows.from_dense(w_dense, pair_halves=pair,
                                         **({"parts": parts} if parts > 1 else {"splits": 3}))
            coded = plain.code_values()
            assert coded is not None and coded.coded and coded.parts == parts
            outs = []
            for w in (plain, coded):
                kw = dict(case)
                if "add_to" in kw:
                    kw["add_to"] = acc.clone()
                else:
                    kw["out"] = torch.full((n, m // 2 if pair else m), float("nan"), dtype=torch.bfloat16,
                                           device="cuda")
                launched.clear()
                outs.append(k.spmm_cuda(x, w.data, w.offsets, fid, m, kk, cb, **kw).clone())
                if w is coded:
                    nt = 2 if n == 2 else 8 if parts == 1 else 4  # (the parts layout: 5 tokens as 4 and 1)
                    want = ("delta_rows_spmm_bf16_n1c" if parts == 1 else f"delta_rows_parts_bf16_p{parts}_s2c") \
                        if n == 1 else f"delta_rows_{'spmm' if parts == 1 else 'parts'}_bf16_nt{nt}c"
                    assert want in launched, (n, launched)
            assert not torch.isnan(outs[1]).any(), (m, kk, n, case)
            assert torch.equal(outs[1], outs[0]), (m, kk, parts, n, case)
        coded = DeltaRows.from_dense(w_dense, **({"parts": parts} if parts > 1 else {"splits": 3})).code_values()
        assert torch.equal(k.decode_dense(fid, coded.data, coded.offsets, m, kk, torch.bfloat16).view(torch.int16),
                           w_dense.view(torch.int16))
        for n in (2, 5, 17):
            xn = torch.randn(n, kk, generator=gen, device="cuda").to(torch.bfloat16)
            check(run_kernel(xn, coded, bias), xn, w_dense, bias)
        if parts == 1 and density == 0.2:  # 20 splits: the multi-token kernels' atomics (_nt<NT>ac), in their order
            many = DeltaRows.from_dense(w_dense, splits=20).code_values()
            for n in (2, 5):
                xn = torch.randn(n, kk, generator=gen, device="cuda").to(torch.bfloat16)
                launched.clear()
                check(run_kernel(xn, many, bias), xn, w_dense, bias)
                assert k.dr_nt_atomic_ok(20) == (f"delta_rows_spmm_bf16_nt{2 if n == 2 else 8}ac" in launched), launched
    with pytest.raises(ValueError, match="x: "):
        k.spmm_cuda(x.half(), coded.data, coded.offsets, fid, m, kk, None)


def test_engine_codes_the_values_at_batch_1(monkeypatch):
    """``FLASH_LLM_DELTA_CODED=1`` at ``max_batch`` 1: a bf16 Llama-shaped DeltaRows model's layers coded, and greedy
    decode in CUDA graphs gives the plain engine's tokens and every token's logits, bit for bit, after prompts of 1,
    5 and 12 tokens (the N = 1, multi-token and expansion paths of the prefill)."""
    from flash_llm import engine as E
    from flash_llm.models import preset
    from flash_llm.models.synthetic import build_synthetic

    cfg = preset("llama-3-8b").replace(num_layers=2, hidden_size=1024, intermediate_size=3584, num_heads=8,
                                       num_kv_heads=2, vocab_size=4096, name="small-llama")
    # the plain engine would take the 32-slot attention chunks at batch 1 (engine._small_chunks_from) and the coded
    # one the 64-slot ones: other rounding orders; both attend in 64-slot chunks here (session 59 found it failing)
    monkeypatch.setattr(_kernels(), "DECODE_ATTN_C32", False)
    outs = []
    for on in (False, True):
        monkeypatch.setattr(E, "DELTA_CODED", on)
        model, _ = build_synthetic(cfg, 0.8, dtype=torch.bfloat16, device="cuda", seed=3, fmt="delta-rows",
                                   progress=False)
        eng = E.Engine(model, max_batch=1, max_seq=64, cuda_graphs=True)
        layers = [n for n, mod in model.named_modules()
                  if isinstance(mod, flash_llm.SparseLinear) and mod.weight_format is DeltaRows]
        assert len(layers) >= 8 and eng.coded == (layers if on else [])  # (four or more projections a layer)
        got = []
        for ids in ([[7]], [[3, 1, 4, 1, 5]], [[1, 5, 9, 2, 7, 3, 8, 4, 6, 10, 11, 12]]):
            r = eng.generate(torch.tensor(ids, device="cuda"), max_new_tokens=8, output_logits=True, eos_token_id=None)
            got.append((r.sequences(), r.logits))
        outs.append(got)
    for (s0, l0), (s1, l1) in zip(*outs):
        assert s0 == s1 and len(s0[0]) == 8
        assert l0 is not None and torch.equal(l0, l1)


@pytest.mark.parametrize("tile", [False, True], ids=["ring", "tile"])
@pytest.mark.parametrize("coded", [False, True], ids=["plain", "coded"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_delta_rows_tensor_core_kernel(dtype, coded, tile, monkeypatch):
    """The tensor-core kernel (``delta_rows_spmm_<dtype>_mma<8|16|32>[c]``, session 60) against the reference: every
    density from empty to full, K odd and not a multiple of 16 (the ring's last block past K), 1-32 tokens (forced down
    to 1 through ``DR_MMA_MIN``), split counts 1 / 7 / the default, X staged through its ring (``_mma<NT>x``) or read
    from global memory (K % 8 != 0, 32 tokens, X off its 4-byte alignment: 2-byte loads), the
    bias, the residual add and SiLU x up of paired halves, poisoned outputs; a second launch gives the same bits.
    (Session 60's one GPU run failed on fp16, bf16 and bf16 coded; the fault found since -- a drain pass wider than the
    ring -- is fixed, and this test has not run on a GPU after it: the kernel is off by default, ``DR_MMA_MIN``.)
    ``tile``: session 69's ``_tmma<NT>[c]`` (``DR_MMA_TILE``) where K % 8 == 0 and X lies on 16 bytes, its window in
    passes of 256 columns (the shapes' windows take one to many)."""
    if coded and dtype != torch.bfloat16:
        pytest.skip("coded values are bf16 only")
    k = _kernels()
    monkeypatch.setattr(k, "DR_MMA_MIN", 1)
    monkeypatch.setattr(k, "DR_MMA_TILE", tile)
    monkeypatch.setattr(k, "DR_MMA_TILE_BAND", 256)
    launched = record_launches(k, monkeypatch)
    gen = torch.Generator(device="cuda").manual_seed(600 + int(coded) + (dtype == torch.bfloat16))
    for (m, kk), density in (((64, 64), 1.0), ((96, 4096), 0.2), ((70, 517), 0.5), ((128, 2056), 0.01),
                             ((32, 1000), 0.0), ((300, 14336), 0.2), ((64, 4104), 0.95)):
        w_dense = _magnitude_pruned(m, kk, density, gen).to(dtype) if coded else sparse_weight(m, kk, density, dtype,
                                                                                                 gen)
        for splits in (None, 1, 7):
            w = DeltaRows.from_dense(w_dense, **({} if splits is None else {"splits": splits}))
            if w.parts != 1:
                w = DeltaRows.from_dense(w_dense, splits=3)
            if coded:
                w = w.code_values()
                assert w is not None and w.coded
            for n in (1, 3, 8, 9, 16, 17, 32):
                for unaligned in (False, True):
                    xb = torch.randn(n * kk + 1, generator=gen, device="cuda").to(dtype)
                    x = (xb[1:] if unaligned else xb[:-1]).view(n, kk)
                    bias = torch.randn(m, generator=gen, device="cuda").to(dtype) if n % 2 else None
                    launched.clear()
                    y = run_kernel(x, w, bias)
                    nt = 8 if n <= 8 else 16 if n <= 16 else 32
                    xring = k.DR_MMA_XRING and nt <= 16 and kk % 8 == 0 and not unaligned  # (X's ring: _mma<NT>x)
                    dt = "bf16" if dtype == torch.bfloat16 else "f16"
                    want = (f"delta_rows_spmm_{dt}_tmma{nt}{'c' if coded else ''}"
                            if tile and kk % 8 == 0 and not unaligned
                            else f"delta_rows_spmm_{dt}_mma{nt}{'c' if coded else ''}{'x' if xring else ''}")
                    assert want in launched, launched
                    check(y, x, w_dense, bias)
                    assert torch.equal(run_kernel(x, w, bias), y)
    # the epilogues: the residual add, SiLU x up of paired halves (into poisoned outputs)
    m, kk, n = 128, 2048, 12
    w_dense, x, acc, cases = _epilogue_cases(m, kk, n, dtype, gen)
    if coded:
        w_dense = _magnitude_pruned(m, kk, 0.2, gen).to(dtype)
    fid = FORMAT_IDS[DeltaRows]
    for case, bias, pair in cases:
        w = DeltaRows.from_dense(w_dense, splits=5, pair_halves=pair)
        w = w.code_values() if coded else w
        kw = _epilogue_kwargs(case, acc, n, m, dtype)
        launched.clear()
        got = k.spmm_cuda(x, w.data, w.offsets, fid, m, kk, bias, **kw)
        assert any(("_tmma16" if tile else "_mma16") in name for name in launched), launched
        monkeypatch.setattr(k, "DR_MMA_MIN", 33)  # the same through the expansion and cuBLAS
        kw2 = _epilogue_kwargs(case, acc, n, m, dtype)
        want = k.spmm_cuda(x, w.data, w.offsets, fid, m, kk, bias, **kw2)
        monkeypatch.setattr(k, "DR_MMA_MIN", 1)
        assert not torch.isnan(got).any(), case
        tol = 4 * ULP[dtype] * (1 + want.double().abs().max().item())
        assert (got.double() - want.double()).abs().max().item() <= tol, case


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_delta_rows_token_chunks(dtype, monkeypatch):
    """``DELTA_CHUNK_MAX`` (off by default; session 60): 9-64 tokens on a DeltaRows weight as chunks of 2-8 through the
    multi-token kernels, never the expansion; plain, the bias, the residual add, SiLU x up of paired halves and an
    RMSNorm before, into poisoned outputs; coded values too (bf16), split and parts layouts."""
    k = _kernels()
    monkeypatch.setattr(k, "DELTA_CHUNK_MAX", 64)
    launched = record_launches(k, monkeypatch)
    gen = torch.Generator(device="cuda").manual_seed(660 + (dtype == torch.bfloat16))
    fid = FORMAT_IDS[DeltaRows]
    for m, kk, density in ((128, 2048, 0.2), (96, 517, 0.5), (64, 4096, 0.01)):
        w_dense = sparse_weight(m, kk, density, dtype, gen)
        layouts = [dict(splits=5)] + ([dict(parts=4)] if kk % 8 == 0 else [])
        for lay in layouts:
            w = DeltaRows.from_dense(w_dense, **lay)
            for n in (9, 16, 17, 33, 64):
                x = torch.randn(n, kk, generator=gen, device="cuda").to(dtype)
                bias = torch.randn(m, generator=gen, device="cuda").to(dtype)
                launched.clear()
                check(run_kernel(x, w, bias), x, w_dense, bias)
                assert "delta_rows_to_dense" not in launched and any("_nt" in name for name in launched), launched
    m, kk, n = 128, 2048, 20
    w_dense, x, acc, cases = _epilogue_cases(m, kk, n, dtype, gen)
    g = (torch.rand(kk, generator=gen, device="cuda") + 0.5).to(dtype)
    for case, bias, pair in cases + (({"norm": (g, 1e-5)}, None, False),):
        w = DeltaRows.from_dense(w_dense, splits=5, pair_halves=pair)
        got = k.spmm_cuda(x, w.data, w.offsets, fid, m, kk, bias, **_epilogue_kwargs(case, acc, n, m, dtype))
        monkeypatch.setattr(k, "DELTA_CHUNK_MAX", 8)  # the same through the expansion and cuBLAS
        want = k.spmm_cuda(x, w.data, w.offsets, fid, m, kk, bias, **_epilogue_kwargs(case, acc, n, m, dtype))
        monkeypatch.setattr(k, "DELTA_CHUNK_MAX", 64)
        assert not torch.isnan(got).any(), case
        tol = 4 * ULP[dtype] * (1 + want.double().abs().max().item())
        assert (got.double() - want.double()).abs().max().item() <= tol, case
    if dtype == torch.bfloat16:  # coded values: the same bits as the plain weight, chunk by chunk
        wd = _magnitude_pruned(128, 2048, 0.2, gen)
        plain = DeltaRows.from_dense(wd, splits=5)
        coded = plain.code_values()
        xb = torch.randn(17, 2048, generator=gen, device="cuda").to(dtype)
        monkeypatch.setattr(k, "DR_NT_ATOMIC", False)  # (bit for bit: the reduction's fixed order of the splits)
        assert torch.equal(run_kernel(xb, coded, None), run_kernel(xb, plain, None))

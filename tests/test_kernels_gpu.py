"""GPU kernels against the in-package reference.  Skipped cleanly where there is no CUDA GPU.

Fresh random inputs per case, outputs poisoned with NaN before the kernel runs, tolerance from
PyTorch's own error in the same dtype (STYLE.md lesson 4).
"""

import pytest
import torch

import flash_llm
from flash_llm.reference import FORMAT_IDS

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
pytestmark = [pytest.mark.gpu, cuda]

FORMATS = [flash_llm.BitmapTiles, flash_llm.TiledCSL]
DTYPES = [torch.float16, torch.bfloat16]
ULP = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def _kernels():
    from flash_llm import kernels

    return kernels


def sparse_weight(m, k, density, dtype, gen, pattern="random"):
    w = torch.randn(m, k, generator=gen, device="cuda", dtype=torch.float32)
    if pattern == "random":
        keep = torch.rand(m, k, generator=gen, device="cuda") < density
    elif pattern == "tiles":  # fully dense 64x64 tiles beside empty ones, plus empty rows/cols
        keep = torch.zeros(m, k, dtype=torch.bool, device="cuda")
        keep[::128, :] = True
        for r in range(0, m, 64):
            for c in range(0, k, 64):
                if (r // 64 + c // 64) % 2 == 0:
                    keep[r:r + 64, c:c + 64] = True
        keep[:, 3::7] = False
    else:
        raise ValueError(pattern)
    return torch.where(keep, w, 0.0).to(dtype)  # (w * keep would make -0.0, which decodes as +0.0)


def check(y, x, w_dense, bias):
    """max|y - ref| <= 2 * max|torch - ref| + ulp * (1 + max|ref|), ref in float64."""
    ref = x.double() @ w_dense.double().t()
    if bias is not None:
        ref += bias.double()
    torch_out = torch.nn.functional.linear(x, w_dense, bias)
    assert not torch.isnan(y).any(), "unwritten (NaN-poisoned) or NaN outputs"
    err = (y.double() - ref).abs().max().item() if y.numel() else 0.0
    err_torch = (torch_out.double() - ref).abs().max().item() if y.numel() else 0.0
    tol = 2 * err_torch + ULP[x.dtype] * (1 + (ref.abs().max().item() if y.numel() else 0.0))
    assert err <= tol, f"error {err:.3g} > tolerance {tol:.3g} (torch's own error {err_torch:.3g})"


def run_kernel(x, w, bias, **kw):
    m, k = w.shape
    out = torch.full((x.shape[0], m), float("nan"), dtype=x.dtype, device="cuda")
    return _kernels().spmm_cuda(x, w.data, w.offsets, FORMAT_IDS[type(w)], m, k, bias, out=out, **kw)


def record_launches(k, monkeypatch) -> list:
    """The names of the kernels ``k.launch`` (``flash_llm.kernels``) starts from now until the test ends, in order."""
    launched = []
    real_launch = k.launch
    monkeypatch.setattr(k, "launch", lambda name, *a, **kw: launched.append(name) or real_launch(name, *a, **kw))
    return launched


def assert_scratch_zeroed(k, device):
    """The split-K sums and tickets of the current stream, zeroed again by the kernels that used them."""
    stream = torch.cuda.current_stream().cuda_stream
    torch.cuda.synchronize()
    assert not k._scratch.get(device, stream, 1, torch.float32).any(), "sums not zeroed again"
    assert not k._scratch.get_tickets(device, stream, 1).any(), "tickets not reset"


SHAPES = [(1, 1), (7, 13), (64, 64), (100, 300), (257, 1000), (1024, 4096), (4097, 4095)]
NS = [1, 2, 3, 8, 17, 64, 100, 256, 1000]


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kernel_shapes_and_n(fmt, dtype, shape):
    gen = torch.Generator(device="cuda").manual_seed(hash((fmt.__name__, str(dtype), shape)) % 2**31)
    m, k = shape
    for density in (0.0, 0.01, 0.5, 0.95, 1.0):
        w_dense = sparse_weight(m, k, density, dtype, gen)
        w = fmt.from_dense(w_dense)
        for n in NS if m * k <= 1 << 20 else (1, 17, 64, 256):
            x = torch.randn(n, k, generator=gen, device="cuda").to(dtype)
            bias = torch.randn(m, generator=gen, device="cuda").to(dtype) if n % 2 else None
            check(run_kernel(x, w, bias, force_sparse=True), x, w_dense, bias)
            check(run_kernel(x, w, bias), x, w_dense, bias)  # dispatched path (dense for large N)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_adversarial_tiles(fmt, dtype):
    gen = torch.Generator(device="cuda").manual_seed(7)
    w_dense = sparse_weight(640, 1152, 0, dtype, gen, pattern="tiles")
    w = fmt.from_dense(w_dense)
    for n in (1, 3, 17, 64):
        x = torch.randn(n, 1152, generator=gen, device="cuda").to(dtype)
        check(run_kernel(x, w, None, force_sparse=True), x, w_dense, None)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda c: c.__name__)
def test_split_k_does_not_change_result(fmt):
    gen = torch.Generator(device="cuda").manual_seed(3)
    w_dense = sparse_weight(512, 8192, 0.3, torch.float16, gen)
    w = fmt.from_dense(w_dense)
    x = torch.randn(17, 8192, generator=gen, device="cuda").half()
    outs = [run_kernel(x, w, None, splits=s, force_sparse=True) for s in (1, 2, 5, 16, 128)]
    for o in outs:
        check(o, x, w_dense, None)
        torch.testing.assert_close(o.float(), outs[0].float(), rtol=2e-3, atol=2e-3)
    # deterministic: the same split twice gives identical bits
    assert torch.equal(run_kernel(x, w, None, splits=16, force_sparse=True), outs[3])


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [256, 192])  # 192: not a multiple of 128, so the activation runs after the product
def test_silu_mul_in_the_reduction(fmt, dtype, m):
    """spmm_cuda(act="silu_mul") on a merged gate / up weight equals silu(gate) * up of the plain product with the same
    split count (the same partial sums; the fused reduction rounds gate and up as the product does), at every N and
    split, with a poisoned output; and ops.spmm_silu_mul on CUDA gives the same."""
    from flash_llm.reference import silu_mul_halves

    gen = torch.Generator(device="cuda").manual_seed(11 + m)
    w_dense = sparse_weight(m, 2048, 0.2, dtype, gen)
    w = fmt.from_dense(w_dense)
    k = _kernels()
    for n in (1, 8, 17, 40, 100):
        x = torch.randn(n, 2048, generator=gen, device="cuda").to(dtype)
        for splits in (1, 3, None):
            for ways in ((None, 1, 4) if fmt is flash_llm.TiledCSL and splits == 3 else (None,)):
                want = silu_mul_halves(run_kernel(x, w, None, splits=splits, force_sparse=True, ways=ways))
                out = torch.full((n, m // 2), float("nan"), dtype=dtype, device="cuda")
                got = k.spmm_cuda(x, w.data, w.offsets, FORMAT_IDS[type(w)], m, 2048, None, splits=splits,
                                  force_sparse=True, out=out, ways=ways, act="silu_mul")
                assert got.data_ptr() == out.data_ptr() and not torch.isnan(got).any()
                torch.testing.assert_close(got.float(), want.float(), rtol=ULP[dtype], atol=ULP[dtype])
        ref = silu_mul_halves((x.double() @ w_dense.double().t()).to(dtype))
        torch.testing.assert_close(flash_llm.ops.spmm_silu_mul(x, w).float(), ref.float(), rtol=4 * ULP[dtype],
                                   atol=4 * ULP[dtype] * (1 + ref.float().abs().max().item()))
    with pytest.raises(ValueError, match="act"):
        k.spmm_cuda(x, w.data, w.offsets, FORMAT_IDS[type(w)], m, 2048, None, act="gelu")
    with pytest.raises(ValueError, match="no bias"):
        k.spmm_cuda(x, w.data, w.offsets, FORMAT_IDS[type(w)], m, 2048, torch.zeros(m, dtype=dtype, device="cuda"),
                    act="silu_mul")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k_in", [2048, 2056])  # 2056: a last tile of 8 columns
@pytest.mark.parametrize("one_launch", [True, False], ids=["n1r", "n1+reduce"])
def test_norm_and_residual_around_the_n1_kernel(dtype, k_in, one_launch, monkeypatch):
    """spmm_cuda(norm=...), (norm, act="silu_mul") and (add_to=...) at N = 1 with split-K (the n1s kernel and the
    rms / rms_silu / resid reductions, or with ``one_launch`` the n1rs / n1r kernels that sum their splits
    themselves), and unfused (one split, N = 2): the norm within 4 ulp of the output's scale of the reference
    composition (RMSNorm in PyTorch, then the product in float64; the fused norm rounds at other steps), the residual
    add bit for bit what adding the plain product gives; outputs poisoned, results deterministic (so the one-launch
    kernels' tickets are reset), the launches the ones named."""
    from flash_llm.reference import rms_norm, silu_mul_halves

    k = _kernels()
    monkeypatch.setattr(k, "N1_FUSED", one_launch)
    monkeypatch.setattr(k, "NT_ATOMIC", 0)  # (bit-for-bit at N = 2: the reduction's fixed order of the splits)
    norm_kernel, silu_kernel, resid_kernel = (("_n1rs", "_n1rs", "_n1r") if one_launch else
                                              ("_n1s", "reduce_rms_silu_", "reduce_resid_"))
    gen = torch.Generator(device="cuda").manual_seed(k_in)
    m = 256
    w_dense = sparse_weight(m, k_in, 0.2, dtype, gen)
    w = flash_llm.TiledCSL.from_dense(w_dense)
    g = (torch.rand(k_in, generator=gen, device="cuda") * 0.5 + 0.5).to(dtype)  # <= 1: fused in fp16 too
    launched = record_launches(k, monkeypatch)
    for n in (1, 2):
        x = (3 * torch.randn(n, k_in, generator=gen, device="cuda")).to(dtype)
        h = rms_norm(x, g, 1e-5)
        ref = h.double() @ w_dense.double().t()
        for splits in (1, 3, 32, None):
            launched.clear()
            out = torch.full((n, m), float("nan"), dtype=dtype, device="cuda")
            got = k.spmm_cuda(x, w.data, w.offsets, FORMAT_IDS[flash_llm.TiledCSL], m, k_in, None, splits=splits,
                              force_sparse=True, out=out, norm=(g, 1e-5))
            fused = n == 1 and splits != 1
            assert any(s.endswith(norm_kernel) for s in launched) == fused, launched
            assert not (one_launch and fused and any("splitk_reduce" in s for s in launched)), launched
            assert got.data_ptr() == out.data_ptr() and not torch.isnan(got).any()
            err = (got.double() - ref).abs().max().item()
            assert err <= 4 * ULP[dtype] * (1 + ref.abs().max().item()), (n, splits, err)
            if not fused:
                assert torch.equal(got, run_kernel(h, w, None, splits=splits, force_sparse=True))
            again = k.spmm_cuda(x, w.data, w.offsets, FORMAT_IDS[flash_llm.TiledCSL], m, k_in, None,
                                splits=splits, force_sparse=True, norm=(g, 1e-5))
            assert torch.equal(again, got)
            launched.clear()
            act = k.spmm_cuda(x, w.data, w.offsets, FORMAT_IDS[flash_llm.TiledCSL], m, k_in, None,
                              splits=splits, force_sparse=True, norm=(g, 1e-5), act="silu_mul")
            assert any(silu_kernel in s for s in launched) == fused, launched
            want = silu_mul_halves(ref.to(dtype))
            torch.testing.assert_close(act.float(), want.float(), rtol=0,
                                       atol=8 * ULP[dtype] * (1 + want.float().abs().max().item()))
            launched.clear()
            acc = torch.randn(n, m, generator=gen, device="cuda").to(dtype)
            plain = acc + run_kernel(x, w, None, splits=splits, force_sparse=True)
            assert k.spmm_cuda(x, w.data, w.offsets, FORMAT_IDS[flash_llm.TiledCSL], m, k_in, None, splits=splits,
                               force_sparse=True, add_to=acc) is acc
            assert any(s.endswith(resid_kernel) if one_launch else resid_kernel in s for s in launched) == fused, \
                launched
            assert torch.equal(acc, plain)
    y = flash_llm.ops.spmm_rms_norm(x[:1], g, 1e-5, w)
    assert (y.double() - ref[:1]).abs().max().item() <= 4 * ULP[dtype] * (1 + ref.abs().max().item())
    with pytest.raises(ValueError, match="add_to goes with none"):
        k.spmm_cuda(x, w.data, w.offsets, 1, m, k_in, None, add_to=acc, norm=(g, 1e-5))
    with pytest.raises(ValueError, match=r"norm's weight must be \[%d\]" % k_in):
        k.spmm_cuda(x, w.data, w.offsets, 1, m, k_in, None, norm=(g[:8], 1e-5))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nt_atomic_split_k(dtype, monkeypatch):
    """kernels.NT_ATOMIC = 2: the one-warp kernels of 2-16 tokens sum their split-K by atomics (``_nt1a`` /
    ``_nt2a``) and give the reduction's result within rounding (another order of the fp32 sums), plain with a bias
    (rows and columns past a 64-row block or 8 tokens cut off) and with SiLU x up, into poisoned outputs, launched
    twice (so the sums and tickets are zeroed again), with no reduction launched."""
    from flash_llm.reference import silu_mul_halves

    k = _kernels()
    fmt = FORMAT_IDS[flash_llm.TiledCSL]
    gen = torch.Generator(device="cuda").manual_seed(47)
    launched = record_launches(k, monkeypatch)
    for m, k_in, density in ((200, 1000, 0.2), (256, 4096, 0.05), (1024, 2048, 0.12)):
        w_dense = sparse_weight(m, k_in, density, dtype, gen)
        w = flash_llm.TiledCSL.from_dense(w_dense)
        bias = torch.randn(m, generator=gen, device="cuda").to(dtype)
        for n in (2, 3, 8, 9, 16):
            x = torch.randn(n, k_in, generator=gen, device="cuda").to(dtype)
            for splits in (3, 7):
                monkeypatch.setattr(k, "NT_ATOMIC", 0)
                want = run_kernel(x, w, bias, splits=splits, force_sparse=True)
                want_silu = (silu_mul_halves(run_kernel(x, w, None, splits=splits, force_sparse=True))
                             if m % 128 == 0 else None)
                monkeypatch.setattr(k, "NT_ATOMIC", 2)
                monkeypatch.setattr(k, "NT_ATOMIC_MIN_SPLITS", 2)
                for _ in range(2):
                    launched.clear()
                    got = run_kernel(x, w, bias, splits=splits, force_sparse=True)
                    assert launched == [f"tiled_csl_spmm_{k._dtype_suffix(dtype)}_nt{1 if n <= 8 else 2}a"]
                    check(got, x, w_dense, bias)
                    tol = 2 * ULP[dtype] * (1 + want.float().abs().max().item())
                    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=tol)
                    if want_silu is None:
                        continue
                    out = torch.full((n, m // 2), float("nan"), dtype=dtype, device="cuda")
                    got = k.spmm_cuda(x, w.data, w.offsets, fmt, m, k_in, None, splits=splits, force_sparse=True,
                                      out=out, act="silu_mul")
                    assert got.data_ptr() == out.data_ptr() and not torch.isnan(got).any()
                    tol = 4 * ULP[dtype] * (1 + want_silu.float().abs().max().item())
                    torch.testing.assert_close(got.float(), want_silu.float(), rtol=0, atol=tol)
    assert_scratch_zeroed(k, x.device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_n1_even_splits(dtype, monkeypatch):
    """kernels.N1_EVEN (the fused N = 1 kernels share K's tiles evenly among the splits: 64 tiles in 7 splits of 9-10,
    not six of 10 and one of 4) gives the default launch's result within rounding (other split boundaries, another
    order of the fp32 sums), into a poisoned output too."""
    k = _kernels()
    fmt = FORMAT_IDS[flash_llm.TiledCSL]
    gen = torch.Generator(device="cuda").manual_seed(43)
    m, k_in = 1024, 4096
    w = flash_llm.TiledCSL.from_dense(sparse_weight(m, k_in, 0.2, dtype, gen))
    g = (torch.rand(k_in, generator=gen, device="cuda") * 0.5 + 0.5).to(dtype)  # <= 1: fused in fp16 too
    x = torch.randn(1, k_in, generator=gen, device="cuda").to(dtype)

    def run():
        return (k.spmm_cuda(x, w.data, w.offsets, fmt, m, k_in, None, splits=7, force_sparse=True),
                k.spmm_cuda(x, w.data, w.offsets, fmt, m, k_in, None, splits=7, force_sparse=True, norm=(g, 1e-5),
                            act="silu_mul"))

    monkeypatch.setattr(k, "N1_EVEN", False)
    base = run()
    monkeypatch.setattr(k, "N1_EVEN", True)
    for out in (k.spmm_cuda(x, w.data, w.offsets, fmt, m, k_in, None, splits=7, force_sparse=True, out=torch.full(
            (1, m), float("nan"), dtype=dtype, device="cuda")), *run()):
        ref = base[0] if out.shape[1] == m else base[1]
        assert not torch.isnan(out).any()
        tol = 4 * ULP[dtype] * (1 + ref.float().abs().max().item())
        torch.testing.assert_close(out.float(), ref.float(), rtol=0, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_n1_one_launch_agrees_with_two(dtype, monkeypatch):
    """At N = 1 with up to 64 splits (the ``_n1r`` / ``_n1rs`` kernels sum them themselves, 16 loads per round, ticket
    per row group), plain with a bias, with the norm, norm + SiLU x up, and the residual add: the one-launch result is
    within rounding of the two-launch one (the fp32 sums are added in another order), and a captured chain of all four
    under static_weights replays on fresh inputs to the eager bits (the tickets are reset by the kernels)."""
    k = _kernels()
    fmt = FORMAT_IDS[flash_llm.TiledCSL]
    gen = torch.Generator(device="cuda").manual_seed(41)
    m, k_in = 1024, 8192  # 128 tiles along K: the plan's 64 splits, and splits=24 (not a multiple of 16)
    w = flash_llm.TiledCSL.from_dense(sparse_weight(m, k_in, 0.2, dtype, gen))
    w2 = flash_llm.TiledCSL.from_dense(sparse_weight(k_in, m // 2, 0.2, dtype, gen))  # back to k_in: the residual
    bias = torch.randn(m, generator=gen, device="cuda").to(dtype)
    g = (torch.rand(k_in, generator=gen, device="cuda") * 0.5 + 0.5).to(dtype)  # <= 1: fused in fp16 too
    src = torch.randn(1, k_in, generator=gen, device="cuda").to(dtype)

    def chain(splits):
        x = src * 2
        plain = k.spmm_cuda(x, w.data, w.offsets, fmt, m, k_in, bias, splits=splits, force_sparse=True)
        normed = k.spmm_cuda(x, w.data, w.offsets, fmt, m, k_in, None, splits=splits, force_sparse=True,
                             norm=(g, 1e-5))
        act = k.spmm_cuda(x, w.data, w.offsets, fmt, m, k_in, None, splits=splits, force_sparse=True,
                          norm=(g, 1e-5), act="silu_mul")
        resid = x.clone()
        k.spmm_cuda(act, w2.data, w2.offsets, fmt, k_in, m // 2, None, force_sparse=True, add_to=resid)
        return plain, normed, act, resid

    for splits in (None, 24):
        monkeypatch.setattr(k, "N1_FUSED", False)
        two = chain(splits)
        monkeypatch.setattr(k, "N1_FUSED", True)
        one = chain(splits)
        for a, b in zip(one, two):
            assert not torch.isnan(a).any()
            tol = 4 * ULP[dtype] * (1 + b.float().abs().max().item())
            torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=tol)
        gr = torch.cuda.CUDAGraph()
        with torch.cuda.graph(gr), k.static_weights():
            out = chain(splits)
        for _ in range(3):
            src.copy_(torch.randn(1, k_in, generator=gen, device="cuda").to(dtype))
            for t in out:
                t.fill_(float("nan"))
            gr.replay()
            eager = chain(splits)
            for a, b in zip(out, eager):
                assert torch.equal(a, b)


def test_kernels_on_two_streams_at_once():
    """Split-K launches whose blocks count on tickets (the bitmap kernels' and the one-launch N = 1 kernels' last
    blocks), and the large-N expansion, issued on two streams at once, many times over: every ticket kernel's result
    has the bits of the same call run alone (each stream has its own tickets), every expansion's is within the
    reference tolerance (its buffer is the caching allocator's, not shared)."""
    gen = torch.Generator(device="cuda").manual_seed(47)
    cases = []  # (weight, its dense copy, N, splits, two inputs)
    for fmt, n, splits in ((flash_llm.BitmapTiles, 3, 8), (flash_llm.TiledCSL, 1, 8), (flash_llm.TiledCSL, 2048, None)):
        w_dense = sparse_weight(1024, 4096, 0.2, torch.float16, gen)
        xs = [torch.randn(n, 4096, generator=gen, device="cuda").half() for _ in range(2)]
        cases.append((fmt.from_dense(w_dense), w_dense, n, splits, xs))
    alone = [[run_kernel(x, w, None, splits=splits) for x in xs] for w, _, _, splits, xs in cases]
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for s in streams:
        s.wait_stream(torch.cuda.current_stream())
    outs = [[[] for _ in cases] for _ in streams]
    for _ in range(10):
        for i, s in enumerate(streams):
            with torch.cuda.stream(s):
                for c, (w, _, _, splits, xs) in enumerate(cases):
                    outs[i][c].append(run_kernel(xs[i], w, None, splits=splits))
    torch.cuda.synchronize()
    for i in range(2):
        for c, (w, w_dense, n, splits, xs) in enumerate(cases):
            for o in outs[i][c]:
                if n == 2048:  # the expansion and cuBLAS
                    check(o, xs[i], w_dense, None)
                else:
                    assert torch.equal(o, alone[c][i]), (i, c)


@pytest.mark.parametrize("n", [1, 9, 17, 32])
def test_tiled_csl_reduce_ways_agree(n):
    """The Tiled-CSL split-K reduction with 1 and with 4 warps per group set: both right, each deterministic."""
    gen = torch.Generator(device="cuda").manual_seed(5 + n)
    w_dense = sparse_weight(200, 4096, 0.2, torch.bfloat16, gen)
    w = flash_llm.TiledCSL.from_dense(w_dense)
    bias = torch.randn(200, generator=gen, device="cuda").bfloat16()
    x = torch.randn(n, 4096, generator=gen, device="cuda").bfloat16()
    for splits in (3, 9):
        outs = [run_kernel(x, w, bias, splits=splits, force_sparse=True, ways=ways) for ways in (1, 4)]
        for ways, o in zip((1, 4), outs):
            check(o, x, w_dense, bias)
            assert torch.equal(run_kernel(x, w, bias, splits=splits, force_sparse=True, ways=ways), o)
        torch.testing.assert_close(outs[0].float(), outs[1].float(), rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match="ways"):
        run_kernel(x, w, bias, ways=2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("wgmma", ["1", "0"])
@pytest.mark.parametrize("density", [0.2, 0.3, 0.4])
def test_tiled_csl_kernels_above_32_tokens(dtype, wgmma, density, monkeypatch):
    """N > 16 at density 0.2, 0.3 and 0.4: on sm_90 (FLASH_LLM_WGMMA=1) the warpgroup-MMA kernels (32, 64 or 128 tokens and
    128 rows per block; N = 33-64 with three stages at 0.2, ``_wg64x2s2``'s two above; N = 17-32 two, three or four
    prefetched rounds); else the one-warp kernel (N <= 32), two warps sharing each tile's decode (N <= 64) or four warps (FLASH_LLM_WGMMA=0, and x that forbids 16-byte copies).
    Chunk counts that leave warps idle (N = 72), several blocks along N (N = 300), split-K on and off, 300 rows (the
    last warpgroup block has one idle warpgroup), a ragged K (the X copy zero-fills past K)."""
    from flash_llm import kernels

    monkeypatch.setenv("FLASH_LLM_WGMMA", wgmma)
    gen = torch.Generator(device="cuda").manual_seed(23)
    for m, k in ((300, 1000), (1024, 4096)):
        w_dense = sparse_weight(m, k, density, dtype, gen)
        w = flash_llm.TiledCSL.from_dense(w_dense)
        bias = torch.randn(m, generator=gen, device="cuda").to(dtype)
        for n in (17, 32, 33, 64, 65, 72, 129, 200, 300):
            x = torch.randn(n, k, generator=gen, device="cuda").to(dtype)
            for splits in (1, 5):
                check(run_kernel(x, w, bias, splits=splits, force_sparse=True), x, w_dense, bias)
        x = torch.randn(100, k + 1, generator=gen, device="cuda").to(dtype)[:, 1:]  # rows not 16-byte aligned
        check(run_kernel(x, w, bias, force_sparse=True), x, w_dense, bias)
    assert kernels.wgmma_ok(0) == (wgmma == "1" and torch.cuda.get_device_capability(0) == (9, 0))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("density", [0.2, 0.3, 0.4])
def test_wg_spread_agrees_with_the_reduction(dtype, density, monkeypatch):
    """Above 16 tokens on sm_90 (the warpgroup kernels) with split-K: summed in the spmm's own launch, every block of a
    row group a share once the group is stored (``_wg<NB>x<R>r``, kernels.WG_SPREAD), with the bits of the
    ``splitk_reduce`` launch with one way (the same sums in the same order): plain with a bias and SiLU x up, N = 17-300
    (all four warpgroup kernels), split counts that leave a short last split; a poisoned output; repeated eager calls
    and a graph captured under static_weights (programmatic launch) replay to the same bits on fresh inputs (the kernels
    reset their counters).  Density 0.2, 0.3 and 0.4: N = 33-64 runs ``_wg64x2`` at the first, ``_wg64x2s2`` at
    the others; N = 17-32 ``_wg32x2``, ``_wg32x2p3`` and ``_wg32x2p4``."""
    k = _kernels()
    if not k.wgmma_ok(0):
        pytest.skip("needs sm_90 (warpgroup MMA)")
    fmt = FORMAT_IDS[flash_llm.TiledCSL]
    gen = torch.Generator(device="cuda").manual_seed(53)
    m, k_in = 1024, 4096  # SiLU: m / 2 = 512, a multiple of every block's rows (128, 256)
    w = flash_llm.TiledCSL.from_dense(sparse_weight(m, k_in, density, dtype, gen))
    bias = torch.randn(m, generator=gen, device="cuda").to(dtype)
    launched = record_launches(k, monkeypatch)

    def both(x, splits, ways):
        plain = k.spmm_cuda(x, w.data, w.offsets, fmt, m, k_in, bias, splits=splits, force_sparse=True, ways=ways,
                            out=torch.full((x.shape[0], m), float("nan"), dtype=dtype, device="cuda"))
        act = k.spmm_cuda(x, w.data, w.offsets, fmt, m, k_in, None, splits=splits, force_sparse=True, ways=ways,
                          act="silu_mul", out=torch.full((x.shape[0], m // 2), float("nan"), dtype=dtype, device="cuda"))
        return plain, act

    for n in (9, 17, 40, 64, 100, 300):
        if n <= 32 and not k.tcsl_wg32_runs(n, density, m * k_in):  # (N = 9: from density 0.25 on this size)
            continue
        x = torch.randn(n, k_in, generator=gen, device="cuda").to(dtype)
        for splits in (3, 7, None):
            launched.clear()
            spread = both(x, splits, None)
            assert any(name.endswith("r") and "_wg" in name for name in launched), launched
            if n in (40, 64):
                assert any(name.endswith("_wg64x2s2r" if density > 0.25 else "_wg64x2r") for name in launched), launched
            if n in (9, 17):
                want = "_wg32x2p4r" if density > 0.375 else "_wg32x2p3r" if density > 0.25 else "_wg32x2r"
                assert any(name.endswith(want) for name in launched), launched
            assert not any("splitk_reduce" in name for name in launched), launched
            reduced = both(x, splits, 1)
            assert any("splitk_reduce" in name for name in launched), launched
            for a, b in zip(spread, reduced):
                assert not torch.isnan(a).any()
                assert torch.equal(a, b), (n, splits)
            assert all(torch.equal(a, b) for a, b in zip(both(x, splits, None), spread))
        check(spread[0], x, w.to_dense(), bias)
    src = torch.randn(64, k_in, generator=gen, device="cuda").to(dtype)
    gr = torch.cuda.CUDAGraph()
    with torch.cuda.graph(gr), k.static_weights():
        out = both(src * 2, 7, None)
    for _ in range(3):
        src.copy_(torch.randn(64, k_in, generator=gen, device="cuda").to(dtype))
        for t in out:
            t.fill_(float("nan"))
        gr.replay()
        for a, b in zip(out, both(src * 2, 7, 1)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("wgmma,min_n", [("1", 17), ("1", 1), ("0", 17)])
def test_bitmap_kernels_above_32_tokens(dtype, wgmma, min_n, monkeypatch):
    """On sm_90 the bitmap warpgroup kernel (A from the decoded registers, X in fragment column order; 8 to 128
    tokens per block) from ``min_n`` tokens up, else the NT kernels; 300 rows, K = 1000 and 61 (X' padded), N past
    one block, split-K."""
    monkeypatch.setenv("FLASH_LLM_WGMMA", wgmma)
    monkeypatch.setattr(_kernels(), "BITMAP_WG_MIN_N", min_n)
    gen = torch.Generator(device="cuda").manual_seed(29)
    for m, k in ((300, 1000), (1024, 4096), (64, 61)):
        w_dense = sparse_weight(m, k, 0.3, dtype, gen)
        w = flash_llm.BitmapTiles.from_dense(w_dense)
        bias = torch.randn(m, generator=gen, device="cuda").to(dtype)
        for n in (1, 3, 8, 9, 16, 17, 33, 64, 65, 129, 300):
            x = torch.randn(n, k, generator=gen, device="cuda").to(dtype)
            for splits in (1, 5):
                check(run_kernel(x, w, bias, splits=splits, force_sparse=True), x, w_dense, bias)


def test_tiled_csl_reduce_with_and_without_programmatic_launch(monkeypatch):
    """The split-K reduction launched to overlap the spmm (PDL) gives the same bits as a plain launch (kernels.NT_ATOMIC
    off: the atomics' sums have no fixed order), also when captured in a CUDA graph and replayed on fresh inputs; so
    does the atomics' split-K (``_nt1a``), whose sums and tickets the replays find zeroed again."""
    from flash_llm.kernels import _build

    k = _kernels()
    monkeypatch.setattr(k, "NT_ATOMIC", 0)
    gen = torch.Generator(device="cuda").manual_seed(21)
    w_dense = sparse_weight(4096, 4096, 0.2, torch.float16, gen)
    w = flash_llm.TiledCSL.from_dense(w_dense)
    x = torch.randn(3, 4096, generator=gen, device="cuda").half()
    outs = {}
    for pdl in (False, True):
        monkeypatch.setattr(_build, "PDL", pdl)
        outs[pdl] = run_kernel(x, w, None, splits=8, force_sparse=True)
        check(outs[pdl], x, w_dense, None)
    assert torch.equal(outs[True], outs[False])
    out = torch.empty_like(outs[True])
    fmt = FORMAT_IDS[flash_llm.TiledCSL]
    monkeypatch.setattr(k, "NT_ATOMIC_MIN_SPLITS", 2)
    for atomic in (0, 1):
        monkeypatch.setattr(k, "NT_ATOMIC", atomic)
        k.spmm_cuda(x, w.data, w.offsets, fmt, 4096, 4096, None, splits=8, force_sparse=True, out=out)  # warm
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            k.spmm_cuda(x, w.data, w.offsets, fmt, 4096, 4096, None, splits=8, force_sparse=True, out=out)
        for _ in range(3):
            x.copy_(torch.randn(3, 4096, generator=gen, device="cuda").half())
            out.fill_(float("nan"))
            g.replay()
            check(out, x, w_dense, None)


@pytest.mark.parametrize("n", [1, 16, 40])
def test_tiled_csl_spmm_under_static_weights(n):
    """Under kernels.static_weights the spmm is launched programmatically right behind the kernel that writes x:
    replays of a captured chain (x = 2 * src, spmm, split-K on and off, then a second spmm on its output) on fresh
    inputs give the reference result and the same bits as plain launches."""
    k = _kernels()
    fmt = FORMAT_IDS[flash_llm.TiledCSL]
    gen = torch.Generator(device="cuda").manual_seed(31)
    w1_dense = sparse_weight(1024, 4096, 0.2, torch.float16, gen)
    w2_dense = sparse_weight(512, 1024, 0.2, torch.float16, gen)
    w1, w2 = flash_llm.TiledCSL.from_dense(w1_dense), flash_llm.TiledCSL.from_dense(w2_dense)
    src = torch.randn(n, 4096, generator=gen, device="cuda").half()
    for splits in (1, 8):
        def chain():
            x = src * 2
            h = k.spmm_cuda(x, w1.data, w1.offsets, fmt, 1024, 4096, None, splits=splits, force_sparse=True)
            return x, h, k.spmm_cuda(h, w2.data, w2.offsets, fmt, 512, 1024, None, force_sparse=True)

        chain()  # warm-up (kernel loading) outside the capture
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g), k.static_weights():
            x, h, y = chain()
        for _ in range(3):
            src.copy_(torch.randn(n, 4096, generator=gen, device="cuda").half())
            h.fill_(float("nan"))
            y.fill_(float("nan"))
            g.replay()
            check(h, x, w1_dense, None)
            check(y, h, w2_dense, None)
        src.copy_(x / 2)
        plain = chain()
        assert torch.equal(plain[1], h) and torch.equal(plain[2], y)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda c: c.__name__)
def test_decode_dense_kernel(fmt):
    gen = torch.Generator(device="cuda").manual_seed(11)
    for shape in [(1, 1), (77, 130), (4097, 4095)]:
        for dtype in DTYPES:
            w_dense = sparse_weight(*shape, 0.4, dtype, gen)
            w = fmt.from_dense(w_dense)
            out = _kernels().decode_dense(FORMAT_IDS[fmt], w.data, w.offsets, *shape, dtype)
            assert torch.equal(out.view(torch.int16), w_dense.view(torch.int16))


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda c: c.__name__)
def test_decode_dense_of_a_row_range(fmt):
    """decode_dense(rows=(r0, r1)): the rows r0:r1 of the weight (r0 a multiple of 64), others refused."""
    kern = _kernels()
    gen = torch.Generator(device="cuda").manual_seed(13)
    m, k = 1000, 700
    w_dense = sparse_weight(m, k, 0.3, torch.float16, gen)
    w = fmt.from_dense(w_dense)
    part = kern.decode_dense(FORMAT_IDS[fmt], w.data, w.offsets, m, k, torch.float16, rows=(128, 389))
    assert torch.equal(part.view(torch.int16), w_dense[128:389].view(torch.int16))
    with pytest.raises(ValueError, match="multiple of 64"):
        kern.decode_dense(FORMAT_IDS[fmt], w.data, w.offsets, m, k, torch.float16, rows=(10, 20))


def test_public_spmm_noncontiguous_graph_and_compile():
    gen = torch.Generator(device="cuda").manual_seed(5)
    w_dense = sparse_weight(300, 512, 0.2, torch.bfloat16, gen)
    w = flash_llm.BitmapTiles.from_dense(w_dense)
    xt = torch.randn(512, 9, generator=gen, device="cuda").to(torch.bfloat16)
    x = xt.t()  # non-contiguous [9, 512]
    check(flash_llm.spmm(x, w), x, w_dense, None)
    # CUDA graph capture and replay equals eager
    static_x = torch.randn(4, 512, generator=gen, device="cuda").to(torch.bfloat16)
    eager = flash_llm.spmm(static_x, w)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        flash_llm.spmm(static_x, w)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_y = flash_llm.spmm(static_x, w)
    g.replay()
    assert torch.equal(static_y, eager)
    static_x.copy_(torch.randn(4, 512, generator=gen, device="cuda").to(torch.bfloat16))
    g.replay()
    check(static_y, static_x, w_dense, None)

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = w

        def forward(self, x):
            return flash_llm.spmm(x, self.w) + 1

    mod = M()
    compiled = torch.compile(mod, fullgraph=True)
    torch.testing.assert_close(compiled(static_x), mod(static_x))


def test_unsupported_gpu_falls_back_to_the_reference(monkeypatch):
    """A GPU below compute capability 8.0 gets the PyTorch reference with a warning, never a crash."""
    import flash_llm.ops as ops

    gen = torch.Generator(device="cuda").manual_seed(13)
    w_dense = sparse_weight(96, 200, 0.3, torch.float16, gen)
    w = flash_llm.BitmapTiles.from_dense(w_dense)
    x = torch.randn(5, 200, generator=gen, device="cuda").half()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (7, 5))
    monkeypatch.setattr(ops, "_warned", set())
    with pytest.warns(RuntimeWarning, match="compute capability 7.5"):
        y = flash_llm.spmm(x, w)
    check(y, x, w_dense, None)

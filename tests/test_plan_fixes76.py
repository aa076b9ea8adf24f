"""Session 76's hunt on the planning side (``/tmp/hunt_plan``): ``epilogue_fusable`` and ``dispatches_sparse`` answer
what ``spmm_cuda`` runs (X's alignment, no tokens, DeltaRows' parts layout), ``plan`` refuses nothing to plan, the
fused norms name a bad ``eps``, ``dr_token_chunks`` keeps its promise at every ``DELTA_MULTI_MAX`` and
``decode_attention_ok`` turns away zero query heads.  CPU only: the GPU's answers (wgmma, SM counts, occupancy) are
monkeypatched, and ``spmm_cuda``'s host side runs with its launches recorded instead of made."""

from __future__ import annotations

import math
import types

import pytest
import torch

from flash_llm import DeltaRows, TiledCSL, kernels, ops
from flash_llm.formats.delta_rows import layout
from flash_llm.kernels import BITMAP, DELTA_ROWS, TILED_CSL
from test_kernel_args import _attention_case as _attention  # (CPU tensors, q saying it is on CUDA)


def _sm90(monkeypatch, wgmma=True, blocks=2):
    """A pretend sm_90 GPU of 132 SMs (planning only)."""
    monkeypatch.setattr(kernels, "wgmma_ok", lambda device_index: wgmma)
    monkeypatch.setattr(kernels, "sm_count", lambda device_index: 132)
    monkeypatch.setattr(kernels, "blocks_per_sm", lambda name, device_index, threads, shared=0: blocks)


class _Ran:
    """``spmm_cuda``'s host side on the CPU: its kernel launches recorded (name, X's first row), the expansion and a
    separate SiLU x up noted, nothing computed."""

    def __init__(self, monkeypatch):
        self.launches, self.expanded, self.separate_silu, self.x_base, self.row_bytes = [], 0, 0, 0, 1
        monkeypatch.setattr(kernels, "launch", self._launch)
        monkeypatch.setattr(kernels, "_expand_and_gemm", self._expand)
        monkeypatch.setattr(kernels, "silu_mul_halves", self._silu)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(cuda_stream=0))
        monkeypatch.setattr(kernels, "_scratch", kernels._Scratch())  # (the CPU's tickets kept out of the module's)

    def _launch(self, name, grid, block, args, *a, **kw):
        self.launches.append((name, (args[2][0] - self.x_base) // self.row_bytes if len(args) > 2 else None))

    def _expand(self, x, data, offsets, fmt, m, k, bias, out):
        self.expanded += 1
        y = torch.zeros(x.shape[0], m, dtype=x.dtype)
        return y if out is None else out.copy_(y)

    def _silu(self, y):
        self.separate_silu += 1
        return y[:, : y.shape[1] // 2].clone()

    def run(self, x, w, **kw):
        fmt = {TiledCSL: TILED_CSL, DeltaRows: DELTA_ROWS}[type(w)]
        return self.raw(x, w.data, w.offsets, fmt, *w.shape, **kw)

    def raw(self, x, data, offsets, fmt, m, k, **kw):
        self.launches, self.expanded, self.separate_silu = [], 0, 0
        self.x_base, self.row_bytes = x.data_ptr(), x.stride(0) * x.element_size()
        kernels.spmm_cuda(x, data, offsets, fmt, m, k, None, **kw)
        return self


def _sparse(m, k, dtype=torch.float16, seed=0):
    w = torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(dtype)
    w[w.abs() < 1] = 0
    return w


# 1. epilogue_fusable decides "sparse kernel or expansion" as spmm_cuda does (dispatches_sparse, vec included) ------

def test_epilogue_fusable_answers_what_spmm_cuda_runs_for_x_of_either_alignment(monkeypatch):
    """Tiled-CSL at N = 129-256 on a large weight at 80 %: the warpgroup kernel only where X's rows lie on 16 bytes;
    with ``vec=False`` spmm_cuda expands the weight and runs SiLU x up separately, so nothing is fused."""
    _sm90(monkeypatch)
    m, k = 4096, 8192  # 2^25 elements
    data = torch.empty(int(0.2 * m * k), dtype=torch.int32, device="meta")
    dev = torch.device("cuda", 0)
    assert kernels.epilogue_fusable(TILED_CSL, data, m, k, 200, torch.float16, dev, act="silu_mul")  # (unchanged)
    assert not kernels.epilogue_fusable(TILED_CSL, data, m, k, 200, torch.float16, dev, vec=False, act="silu_mul")
    for n in (1, 8, 64, 128, 129, 200, 256, 257):
        for vec in (False, True):
            if not kernels.dispatches_sparse(n, TILED_CSL, data, m, k, 0, vec):
                assert not kernels.epilogue_fusable(TILED_CSL, data, m, k, n, torch.float16, dev, vec=vec,
                                                    act="silu_mul"), (n, vec)


def test_epilogue_fusable_matches_spmm_cudas_launch(monkeypatch):
    """The same question put to spmm_cuda itself (its launches recorded on the CPU): fused exactly where it runs the
    sparse kernel and no separate SiLU x up."""
    _sm90(monkeypatch)
    ran = _Ran(monkeypatch)
    m, k = 4096, 8192
    data = torch.empty(int(0.2 * m * k), dtype=torch.int32)
    offsets = torch.zeros(1, dtype=torch.int32)
    buf = torch.zeros(256 * k + 8, dtype=torch.float16)
    for n in (1, 64, 200, 256):
        for vec in (True, False):
            x = buf[: n * k].view(n, k) if vec else buf[1: 1 + n * k].view(n, k)  # (2 bytes off 16: no vec)
            assert (x.data_ptr() % 16 == 0) == vec
            ran.raw(x, data, offsets, TILED_CSL, m, k, act="silu_mul")
            fused = not ran.expanded and not ran.separate_silu
            said = kernels.epilogue_fusable(TILED_CSL, data, m, k, n, torch.float16, torch.device("cuda", 0),
                                            vec=vec, act="silu_mul")
            assert said == fused, (n, vec, said, ran.launches, ran.expanded)


def test_epilogue_fusable_decides_through_dispatches_sparse(monkeypatch):
    """One function decides sparse kernel or expansion for spmm_cuda and epilogue_fusable: told "the expansion", no
    format fuses anything (DeltaRows too: FLASH_LLM_DELTA_MULTI_MAX=1 expands 2 tokens)."""
    _sm90(monkeypatch)
    asked = []
    monkeypatch.setattr(kernels, "dispatches_sparse", lambda *a, **kw: asked.append((a, kw)) and False)
    dev = torch.device("cuda", 0)
    data = torch.empty(4096 * 4096 // 5, dtype=torch.int32, device="meta")
    assert not kernels.epilogue_fusable(TILED_CSL, data, 4096, 4096, 1, torch.float16, dev, norm=True)
    assert not kernels.epilogue_fusable(BITMAP, data, 4096, 4096, 1, torch.float16, dev, add=True)
    assert [a[0][:5] for a in asked] == [(1, TILED_CSL, data, 4096, 4096), (1, BITMAP, data, 4096, 4096)]
    assert all(a[0][5:] + tuple(a[1].values()) == (0, True) for a in asked)  # (device 0, vec as given)
    monkeypatch.undo()
    monkeypatch.setattr(kernels, "DELTA_MULTI_MAX", 1)
    c = DeltaRows.from_dense(_sparse(128, 256), parts=4)
    assert not kernels.epilogue_fusable(DELTA_ROWS, c.data, 128, 256, 2, torch.float16, torch.device("cpu"),
                                        offsets=c.offsets, add=True)
    assert kernels.epilogue_fusable(DELTA_ROWS, c.data, 128, 256, 1, torch.float16, torch.device("cpu"),
                                    offsets=c.offsets, add=True)


def test_delta_rows_epilogue_fusable_with_the_tensor_core_kernel(monkeypatch):
    """Where DeltaRows' tensor-core kernel takes the tokens (DR_MMA_MIN set low), a norm runs separately: not
    fusable; the residual add is done in its reduction."""
    monkeypatch.setattr(kernels, "DR_MMA_MIN", 1)
    ran = _Ran(monkeypatch)
    c = DeltaRows.from_dense(_sparse(128, 256), splits=2)
    calls = []
    real_unfused = kernels._unfused
    monkeypatch.setattr(kernels, "_unfused", lambda *a: calls.append(1) or real_unfused(*a))
    x = torch.randn(1, 256).half()
    cpu = torch.device("cpu")
    for kw, want in (({"norm": (torch.ones(256).half(), 1e-5)}, {"norm": True}),
                     ({"add_to": torch.zeros(1, 128).half()}, {"add": True})):
        calls.clear()
        ran.run(x, c, **kw)
        said = kernels.epilogue_fusable(DELTA_ROWS, c.data, 128, 256, 1, torch.float16, cpu, offsets=c.offsets,
                                        **want)
        assert said == (not calls), (want, said, calls)
    assert not kernels.epilogue_fusable(DELTA_ROWS, c.data, 128, 256, 1, torch.float16, cpu, offsets=c.offsets,
                                        norm=True)


# 2. n = 0: nothing to plan, nothing fused ---------------------------------------------------------------------------

def test_no_tokens_plan_nothing_and_fuse_nothing(monkeypatch):
    for fmt in (BITMAP, TILED_CSL):
        with pytest.raises(ValueError, match=r"\bn must be"):
            kernels.plan(64, 128, 0, 0.5, 132, 8, None, fmt)
        with pytest.raises(ValueError, match=r"\bn must be"):
            kernels.plan(64, 128, 0, 0.5, 132, 8, 2, fmt)
    for bad, what in (((0, 128, 1, 0.5, 132, 8), "m"), ((64, 0, 1, 0.5, 132, 8), "k"),
                      ((64, 128, 1, 0.5, 0, 8), "sms"), ((64, 128, 1, 0.5, 132, 0), "blocks_per_sm")):
        with pytest.raises(ValueError, match=rf"\b{what} must be"):
            kernels.plan(*bad)
    for fmt in (BITMAP, TILED_CSL, DELTA_ROWS):
        for wg in (False, True):
            assert not kernels.use_sparse_kernel(0, 0.5, fmt, wg, 1 << 30)
            assert not kernels.use_sparse_kernel(-1, 0.5, fmt, wg, 1 << 30)
    _sm90(monkeypatch, blocks=8)
    data = torch.empty(4096, dtype=torch.int32)
    dev = torch.device("cuda", 0)
    for fmt in (BITMAP, TILED_CSL):
        for force in (False, True):
            for kw in ({"act": "silu_mul"}, {"norm": True}, {"add": True}, {}):
                assert kernels.epilogue_fusable(fmt, data, 64, 128, 0, torch.float16, dev, force_sparse=force,
                                                **kw) is False
    c = DeltaRows.from_dense(_sparse(128, 256), parts=4)
    assert not kernels.epilogue_fusable(DELTA_ROWS, c.data, 128, 256, 0, torch.float16, dev, offsets=c.offsets)
    # ... as spmm_cuda, which launches nothing for no tokens (forced or not) and returns an empty result
    ran = _Ran(monkeypatch)
    w = TiledCSL.from_dense(_sparse(128, 256))
    for force in (False, True):
        y = kernels.spmm_cuda(torch.empty(0, 256).half(), w.data, w.offsets, TILED_CSL, 128, 256, None,
                              force_sparse=force, act="silu_mul")
        assert y.shape == (0, 64) and not ran.launches and not ran.expanded


# 3. eps of the fused norms ------------------------------------------------------------------------------------------

def _norm_calls(eps):
    w = TiledCSL.from_dense(_sparse(64, 64))
    x = torch.randn(2, 64).half()
    nw = torch.ones(64).half()
    return (("spmm_rms_norm", lambda: ops.spmm_rms_norm(x, nw, eps, w)),
            ("spmm_layer_norm", lambda: ops.spmm_layer_norm(x, nw, None, eps, w)))


@pytest.mark.parametrize("eps", [None, "abc", "1e-5", [1e-5], True, False, math.nan, math.inf, -math.inf, -1e-5,
                                 1 + 2j, torch.tensor(True), torch.tensor(math.nan), torch.tensor([1e-5, 1e-5]),
                                 torch.tensor(-1.0)], ids=repr)
def test_a_bad_eps_is_named(eps):
    for name, call in _norm_calls(eps):
        with pytest.raises(ValueError, match=r"^eps must be a finite number >= 0"):
            call()
            pytest.fail(f"{name} took eps={eps!r}")


def test_a_bad_eps_is_named_under_forward_ad_too():
    w = TiledCSL.from_dense(_sparse(64, 64))
    x, nw = torch.randn(2, 64).half(), torch.ones(64).half()
    with pytest.raises(ValueError, match=r"^eps must be"):
        torch.func.jvp(lambda t: ops.spmm_rms_norm(t, nw, math.nan, w), (x,), (x,))
    with pytest.raises(ValueError, match=r"^eps must be"):
        torch.func.jvp(lambda t: ops.spmm_layer_norm(t, nw, None, -1.0, w), (x,), (x,))


def test_good_eps_values_are_taken_as_torch_takes_them():
    """0 (torch's rms_norm / layer_norm take it), ints, NumPy and Python floats, a one-element tensor."""
    import numpy as np

    from flash_llm.reference import layer_norm, rms_norm

    w = TiledCSL.from_dense(_sparse(64, 64))
    x, nw = torch.randn(2, 64).half(), torch.ones(64).half()
    torch.nn.functional.rms_norm(x.float(), (64,), eps=0.0)  # (torch accepts 0)
    torch.nn.functional.layer_norm(x.float(), (64,), eps=0.0)
    for eps in (0, 0.0, 1e-6, np.float32(1e-5), np.float64(1e-5), torch.tensor(1e-5)):
        assert torch.equal(ops.spmm_rms_norm(x, nw, eps, w), ops.spmm(rms_norm(x, nw, float(eps)), w))
        assert torch.equal(ops.spmm_layer_norm(x, nw, None, eps, w),
                           ops.spmm(layer_norm(x, nw, None, float(eps)), w))


# 4. DeltaRows' parts layout in dispatches_sparse / use_sparse_kernel -----------------------------------------------

@pytest.mark.parametrize("mma_min", [17, 9, 33])
def test_delta_rows_dispatch_answers_what_runs_for_either_layout(monkeypatch, mma_min):
    """With the tensor-core kernel on (DR_MMA_MIN) a parts-layout weight past the chunks still expands: the split
    layout's tensor-core range is not the parts layout's."""
    monkeypatch.setattr(kernels, "DR_MMA_MIN", mma_min)
    monkeypatch.setattr(kernels, "wgmma_ok", lambda device_index: False)
    ran = _Ran(monkeypatch)
    w = _sparse(128, 256)
    for c in (DeltaRows.from_dense(w, parts=4), DeltaRows.from_dense(w, splits=2)):
        parts = layout(128, c.offsets.numel(), c.data.numel()).parts
        x = torch.randn(40, 256).half()
        for n in range(0, 41):
            sparse = not ran.run(x[:n], c).expanded and bool(n)
            assert kernels.dispatches_sparse(n, DELTA_ROWS, c.data, 128, 256, 0) == sparse, (parts, n)
            assert kernels.use_sparse_kernel(n, 0.2, DELTA_ROWS, parts=parts) == sparse, (parts, n)
            assert sparse == (1 <= n <= 16 or (parts == 1 and mma_min <= n <= 32))


# 5. dr_token_chunks at every DELTA_MULTI_MAX --------------------------------------------------------------------------

@pytest.mark.parametrize("c", range(1, 9))
def test_token_chunks_keep_their_promise_at_every_multi_max(monkeypatch, c):
    """ceil(n / c) chunks of at most c tokens, in order, covering each token once; from c = 3 every chunk of n >= 2
    tokens holds 2 or more (a multi-token kernel); at c = 2 an odd n's lone token is the last chunk; at c = 1 (no
    multi-token kernels: the caller expands instead of chunking) one token a chunk."""
    monkeypatch.setattr(kernels, "DELTA_MULTI_MAX", c)
    assert kernels.dr_token_chunks(0) == []
    for n in range(1, 120):
        chunks = kernels.dr_token_chunks(n)
        sizes = [j - i for i, j in chunks]
        assert len(chunks) == -(-n // c) and chunks[0][0] == 0 and chunks[-1][1] == n, (n, chunks)
        assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:])) and all(1 <= s <= c for s in sizes)
        if c == 1:
            assert sizes == [1] * n
        elif c == 2 and n % 2:
            assert sizes == [2] * (n // 2) + [1], (n, chunks)
        elif n >= 2:
            assert min(sizes) >= 2 and max(sizes) - min(sizes) <= 1, (n, chunks)  # (as even as possible)
    if c == 8:
        assert kernels.dr_token_chunks(17) == [(0, 5), (5, 11), (11, 17)]  # (the default: unchanged)


@pytest.mark.parametrize("n", [3, 4, 5, 9])
def test_multi_max_2_runs_pairs_and_the_last_odd_token_alone(monkeypatch, n):
    """What _delta_rows_cuda launches with FLASH_LLM_DELTA_MULTI_MAX=2: the 2-token kernel for each pair, in order,
    and for an odd n the N = 1 kernel for the last token (as dr_token_chunks says)."""
    monkeypatch.setattr(kernels, "DELTA_MULTI_MAX", 2)
    ran = _Ran(monkeypatch)
    c = DeltaRows.from_dense(_sparse(128, 256), splits=2)
    ran.run(torch.randn(n, 256).half(), c)
    spmm = [(name, row) for name, row in ran.launches if "_reduce" not in name]
    want = [("delta_rows_spmm_f16_nt2", r) for r in range(0, n - 1, 2)] + (
        [("delta_rows_spmm_f16_n1", n - 1)] if n % 2 else [])
    assert spmm == want and not ran.expanded


# 6. decode_attention_ok and zero-sized heads --------------------------------------------------------------------------

def test_decode_attention_ok_refuses_zero_heads(monkeypatch):
    monkeypatch.setattr(kernels, "supported", lambda device: (True, ""))
    assert kernels.decode_attention_ok(*_attention(), 16)
    assert not kernels.decode_attention_ok(*_attention(h=0), 16)  # (a grid of 0 head groups: an invalid launch)
    assert not kernels.decode_attention_ok(*_attention(h=0, hkv=0), 16)
    assert not kernels.decode_attention_ok(*_attention(hkv=0), 16)
    assert not kernels.decode_attention_ok(*_attention(b=0), 16)
    assert not kernels.decode_attention_ok(*_attention(d=0), 16)
    assert not kernels.decode_attention_ok(*_attention(slots=0), 0)

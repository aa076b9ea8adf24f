"""Edge cases of the formats' CPU code found by the session 73 hunt (/tmp/hunt73_fmt/REPORT.md): subnormals under
``torch.set_flush_denormal(True)``, a weight at an odd storage offset, non-contiguous arrays in ``from_state`` and a
coded DeltaRows weight's state on the meta device."""

from __future__ import annotations

import contextlib

import pytest
import torch

import flash_llm
from flash_llm import BitmapTiles, DeltaRows, SparseLinear, TiledCSL
from flash_llm.formats import _base

FORMATS = (BitmapTiles, TiledCSL, DeltaRows)


@contextlib.contextmanager
def flush_denormal():
    """``torch.set_flush_denormal(True)`` inside, restored after (skips where the CPU cannot flush)."""
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals (no SSE3)")
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def _subnormal_weight(m: int = 64, k: int = 128, dtype=torch.bfloat16) -> torch.Tensor:
    """Random 16-bit patterns, about half of them subnormals (+ and -), with +-0.0 and normal values among them."""
    g = torch.Generator().manual_seed(73)
    bits = torch.randint(1, 0x80, (m, k), generator=g, dtype=torch.int16)  # subnormals (exponent 0)
    bits |= torch.randint(0, 2, (m, k), generator=g, dtype=torch.int16) << 15  # either sign
    pick = torch.randint(0, 4, (m, k), generator=g)
    bits[pick == 0] = 0x3F80 if dtype == torch.bfloat16 else 0x3C00  # 1.0
    bits[pick == 1] = torch.tensor([0, -32768], dtype=torch.int16)[torch.randint(0, 2, (int((pick == 1).sum()),),
                                                                                  generator=g)]
    bits[5] = 0  # an empty row
    bits[7, ::3] = 0x0001  # the least subnormal, spread along a row (gaps past one step: escapes)
    return bits.view(dtype)


def _nonzero_bits(w: torch.Tensor) -> torch.Tensor:
    """``w``'s bits with -0.0 as +0.0 (what a round trip gives back)."""
    bits = w.view(torch.int16).clone()
    bits[(bits & 0x7FFF) == 0] = 0
    return bits


@pytest.mark.parametrize("parts", [1, 4])
@pytest.mark.parametrize("pair", [False, True])
def test_delta_rows_keeps_bf16_subnormals_under_flush_denormal(parts, pair):
    w = _subnormal_weight()
    want = _nonzero_bits(w)
    nnz = int(((w.view(torch.int16) & 0x7FFF) != 0).sum())
    ref = DeltaRows.from_dense(w, parts=parts, pair_halves=pair)  # (flush-denormal off)
    assert torch.equal(ref.to_dense().view(torch.int16), want) and ref.nnz == nnz
    with flush_denormal():
        c = DeltaRows.from_dense(w, parts=parts, pair_halves=pair)
        assert c.nnz == nnz
        assert torch.equal(c.data, ref.data) and torch.equal(c.offsets, ref.offsets)  # the same arrays, bit for bit
        assert torch.equal(c.to_dense().view(torch.int16), want)
        assert torch.equal(ref.to_dense().view(torch.int16), want)  # encoded without, decoded with flush-denormal
    assert torch.equal(c.to_dense().view(torch.int16), want)


def test_coded_delta_rows_keeps_bf16_subnormals_under_flush_denormal():
    g = torch.Generator().manual_seed(5)
    bits = torch.randint(1, 0x0600, (64, 96), generator=g, dtype=torch.int16)  # subnormals and tiny normals
    bits[torch.rand(64, 96, generator=g) < 0.6] = 0
    bits[::2] |= -32768  # (negative zeros among them)
    w = bits.view(torch.bfloat16)
    want = _nonzero_bits(w)
    plain = DeltaRows.from_dense(w)
    with flush_denormal():
        coded = DeltaRows.from_dense(w).code_values()
        assert coded is not None and coded.coded
        assert torch.equal(coded.to_dense().view(torch.int16), want)
        assert torch.equal(coded.state()[0]["data"], plain.data)


@pytest.mark.parametrize("cls", FORMATS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_format_round_trips_subnormals_under_flush_denormal(cls, dtype):
    w = _subnormal_weight(48, 100, dtype)
    with flush_denormal():
        c = cls.from_dense(w)
        assert c.nnz == int(((w.view(torch.int16) & 0x7FFF) != 0).sum())
        assert torch.equal(c.to_dense().view(torch.int16), _nonzero_bits(w))


def test_count_nonzero_counts_subnormals_under_flush_denormal():
    w = _subnormal_weight()
    want = int(((w.view(torch.int16) & 0x7FFF) != 0).sum())
    assert _base.count_nonzero(w) == want  # (flush-denormal off: what torch counts)
    assert _base.count_nonzero(w) == int(torch.count_nonzero(w))
    f32 = torch.tensor([0.0, -0.0, 1e-45, -1e-40, 1.0, float("nan")])  # fp32 subnormals
    f64 = torch.tensor([0.0, -0.0, 5e-324, 2.0], dtype=torch.float64)
    with flush_denormal():
        assert _base.count_nonzero(w) == want
        assert _base.count_nonzero(w.t()) == want  # (not contiguous)
        assert _base.count_nonzero(f32) == 4 and _base.count_nonzero(f64) == 2
        assert _base.count_nonzero(torch.tensor([0, 3, -1])) == 2  # (integers as they are)
        assert _base.count_nonzero(torch.tensor([True, False])) == 1


def test_count_nonzero_in_chunks_under_flush_denormal(monkeypatch):
    w = _subnormal_weight()
    want = int(((w.view(torch.int16) & 0x7FFF) != 0).sum())
    monkeypatch.setattr(_base, "COUNT_CHUNK", 1000)
    with flush_denormal():
        assert _base.count_nonzero(w) == want


def test_default_parts_counts_subnormals_under_flush_denormal(monkeypatch):
    """``from_dense`` without ``parts`` counts the nonzeros (``default_parts``) with :func:`count_nonzero`."""
    from flash_llm.formats import delta_rows

    seen = []
    real = delta_rows.auto_parts

    def auto_parts(m, k, nnz, device=None):
        seen.append(nnz)
        return real(m, k, nnz, device)

    monkeypatch.setattr(delta_rows, "PARTS_ENV", "auto")
    monkeypatch.setattr(delta_rows, "auto_parts", auto_parts)
    w = _subnormal_weight()
    with flush_denormal():
        DeltaRows.from_dense(w)
    assert seen == [int(((w.view(torch.int16) & 0x7FFF) != 0).sum())]


def test_cpu_spmm_of_a_weight_encoded_under_flush_denormal():
    """The CPU product decodes with ``to_dense``: a subnormal kept by the encoder counts once flush-denormal is off."""
    w = torch.zeros(32, 64, dtype=torch.int16)
    w[3, 10] = 0x0001  # 2^-133
    w[4, 11] = 0x3F80
    w = w.view(torch.bfloat16)
    x = torch.zeros(2, 64, dtype=torch.bfloat16)
    x[:, 10] = 2.0 ** 127
    x[:, 11] = 1.0
    with flush_denormal():
        c = DeltaRows.from_dense(w)
    want = (x.float() @ w.float().t()).to(torch.bfloat16)
    assert want[0, 3] == 2.0 ** -6
    for fmt in (c, BitmapTiles.from_dense(w)):
        assert torch.equal(flash_llm.spmm(x, fmt), want)


@pytest.mark.parametrize("cls", FORMATS)
@pytest.mark.parametrize("shape", [(16, 64), (64, 128), (20, 70)])
def test_from_dense_of_a_weight_at_an_odd_storage_offset(cls, shape):
    m, k = shape
    g = torch.Generator().manual_seed(2)
    flat = torch.randn(m * k + 1, generator=g).half()
    flat[torch.rand(m * k + 1, generator=g) < 0.6] = 0
    w = flat[1:].view(m, k)  # contiguous, storage offset 1
    assert w.is_contiguous() and w.storage_offset() == 1
    c = cls.from_dense(w)
    ref = cls.from_dense(w.clone())
    assert torch.equal(c.to_dense(), w)
    assert torch.equal(c.data, ref.data) and torch.equal(c.offsets, ref.offsets)
    assert flat.storage_offset() == 0 and torch.equal(flat[1:].view(m, k), w)  # (the input is left as it was)


def test_bitmap_from_dense_in_bands_at_an_odd_storage_offset(monkeypatch):
    monkeypatch.setattr(_base, "BAND_ELEMENTS", 1)  # a band a strip row
    flat = torch.arange(64 * 64 + 1, dtype=torch.int16).view(torch.bfloat16)
    w = flat[1:].view(64, 64)
    assert torch.equal(BitmapTiles.from_dense(w).to_dense().view(torch.int16), _nonzero_bits(w))


def _strided(t: torch.Tensor) -> torch.Tensor:
    """The same values as a 1-D view of stride 2."""
    return torch.stack([t, t], 1)[:, 0]


@pytest.mark.parametrize("cls", FORMATS)
def test_from_state_takes_non_contiguous_arrays(cls):
    g = torch.Generator().manual_seed(4)
    w = torch.randn(40, 130, generator=g).half()
    w[torch.rand(40, 130, generator=g) < 0.7] = 0
    c = cls.from_dense(w)
    tensors, meta = c.state()
    strided = {n: _strided(t) for n, t in tensors.items()}
    assert not any(t.is_contiguous() for t in strided.values())
    back = cls.from_state(strided, meta)
    assert torch.equal(back.to_dense(), w) and back.nnz == c.nnz
    assert all(t.is_contiguous() for t in back.tensors().values())


def test_sparse_linear_load_state_dict_takes_non_contiguous_arrays():
    w = torch.zeros(16, 64, dtype=torch.float16)
    w[0, 0], w[15, 63] = 1.0, -2.0
    sd = SparseLinear(BitmapTiles.from_dense(w)).state_dict()
    sd = {n: (_strided(t) if n.startswith("weight_") else t) for n, t in sd.items()}
    layer = SparseLinear(BitmapTiles.from_dense(torch.zeros(16, 64, dtype=torch.float16)))
    layer.load_state_dict(sd)
    assert torch.equal(layer.to_dense(), w)


def _coded() -> DeltaRows:
    w = torch.zeros(32, 16, dtype=torch.bfloat16)
    w[0, 0], w[31, 15] = 1.0, -3.0
    coded = DeltaRows.from_dense(w).code_values()
    assert coded is not None and coded.coded
    return coded


def test_coded_delta_rows_state_on_meta_refuses_clearly():
    meta = _coded().to("meta")
    with pytest.raises(ValueError, match="meta device"):
        meta.state()
    with pytest.raises(ValueError, match="meta device"):
        SparseLinear(_coded()).to("meta").state_dict()


def test_plain_and_coded_states_still_work():
    coded = _coded()
    tensors, meta = coded.state()  # (values: the plain arrays)
    back = DeltaRows.from_state(tensors, meta)
    assert not back.coded and torch.equal(back.to_dense(), coded.to_dense())
    plain = DeltaRows.from_dense(coded.to_dense()).to("meta")
    t, m = plain.state()  # a plain weight on meta: its shape-only state, read back as a meta weight
    assert DeltaRows.from_state(t, m).device.type == "meta"

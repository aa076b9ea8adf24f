"""BitmapTiles and TiledCSL: exact round trips, byte counts, layout, and input checks (CPU)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import flash_llm
from flash_llm import BitmapTiles, DeltaRows, TiledCSL
from flash_llm.formats import _layout
from conftest import (DTYPES, FORMATS, STRIP_K, STRIP_M, TILE_M, assert_bit_equal, bits, expected_nbytes,
                      bitmap_word_bit, fragment_lane_bit, fragment_row_col, nonzero_mask, random_values, record_nnz, sparse_weight)

# ---------------------------------------------------------------------------------------------------
# Round trip over shapes and densities
# ---------------------------------------------------------------------------------------------------
SMALL_SHAPES = [(1, 1), (7, 13), (64, 64)]
DENSITIES = [0.0, 0.01, 0.5, 0.9, 0.99, 1.0]
# Large shapes (a real LLM layer and an odd one just past 4096) at two densities each, to stay fast.
LARGE_CASES = [((4097, 4095), 0.01), ((4097, 4095), 1.0), ((11008, 4096), 0.5), ((11008, 4096), 0.9)]
ROUND_TRIP_CASES = [(s, d) for s in SMALL_SHAPES for d in DENSITIES] + LARGE_CASES


def check_round_trip(fmt_cls, w: torch.Tensor):
    """Compress, check every derived attribute, decompress bit for bit.  Returns the compressed weight."""
    c = fmt_cls.from_dense(w)
    mask = nonzero_mask(w)
    nnz = int(mask.sum())
    assert isinstance(c, fmt_cls)
    assert c.shape == tuple(w.shape)
    assert c.dtype == w.dtype
    assert c.nnz == nnz
    assert c.density == pytest.approx(nnz / w.numel())
    assert c.device == torch.device("cpu")
    # -0.0 is a zero: it comes back as +0.0, everything else bit for bit
    expected = torch.where(mask, w, torch.zeros((), dtype=w.dtype))
    dense = c.to_dense()
    assert_bit_equal(dense, expected)
    return c


@pytest.mark.parametrize("shape,density", ROUND_TRIP_CASES, ids=[f"{m}x{k}-d{d}" for (m, k), d in ROUND_TRIP_CASES])
def test_round_trip_bit_exact(fmt, dtype, shape, density):
    w = sparse_weight(*shape, density, dtype, seed=shape[0] * 31 + shape[1])
    c = check_round_trip(fmt, w)
    assert c.nbytes == expected_nbytes(fmt, nonzero_mask(w), getattr(c, "splits", None), getattr(c, "parts", 1))


def test_round_trip_non_contiguous_input(fmt, dtype):
    """A transposed view and an offset slice are compressed as the matrix they show."""
    base = sparse_weight(150, 90, 0.4, dtype, seed=5)
    check_round_trip(fmt, base.t())
    check_round_trip(fmt, base[3:140:2, 7:85])


def test_round_trip_parameter_requiring_grad(fmt):
    """``nn.Linear.weight`` (a Parameter with requires_grad) is the most common input."""
    lin = torch.nn.Linear(130, 70, dtype=torch.float16)
    with torch.no_grad():
        lin.weight[torch.rand(70, 130, generator=torch.Generator().manual_seed(3)) < 0.5] = 0
    c = fmt.from_dense(lin.weight)
    w = lin.weight.detach()
    assert c.nnz == int(nonzero_mask(w).sum())
    assert_bit_equal(c.to_dense(), torch.where(nonzero_mask(w), w, torch.zeros((), dtype=w.dtype)))


# ---------------------------------------------------------------------------------------------------
# Adversarial masks
# ---------------------------------------------------------------------------------------------------
def _block_pattern(m: int, k: int, bm: int, bk: int, dtype) -> torch.Tensor:
    """Fully dense ``bm x bk`` blocks beside empty ones (a block checkerboard)."""
    r = torch.arange(m)[:, None] // bm
    c = torch.arange(k)[None, :] // bk
    mask = (r + c) % 2 == 0
    return torch.where(mask, random_values(m, k, dtype, seed=bm + bk), torch.zeros((), dtype=dtype))


def _empty_rows_cols(dtype) -> torch.Tensor:
    w = sparse_weight(70, 130, 0.7, dtype, seed=11)
    w[[0, 15, 16, 63, 64, 69], :] = 0
    w[:, [0, 1, 63, 64, 127, 128, 129]] = 0
    return w


def _single_last(m: int, k: int, dtype) -> torch.Tensor:
    w = torch.zeros(m, k, dtype=dtype)
    w[-1, -1] = -3.5
    return w


def _checkerboard(m: int, k: int, dtype, invert: bool = False) -> torch.Tensor:
    mask = (torch.arange(m)[:, None] + torch.arange(k)[None, :]) % 2 == int(invert)
    return torch.where(mask, random_values(m, k, dtype, seed=7), torch.zeros((), dtype=dtype))


def _one_dense_row(dtype) -> torch.Tensor:
    w = torch.zeros(80, 200, dtype=dtype)
    w[37] = random_values(1, 200, dtype, seed=2)[0]
    return w


def _one_dense_col(dtype) -> torch.Tensor:
    w = torch.zeros(200, 80, dtype=dtype)
    w[:, 41] = random_values(200, 1, dtype, seed=2)[:, 0]
    return w


ADVERSARIAL = {
    "dense-16x64-strips-beside-empty": lambda dt: _block_pattern(64, 256, 16, 64, dt),
    "dense-64x64-tiles-beside-empty": lambda dt: _block_pattern(192, 256, 64, 64, dt),
    "dense-strips-odd-shape": lambda dt: _block_pattern(100, 300, 16, 64, dt),
    "empty-rows-and-cols": _empty_rows_cols,
    "single-last-17x65": lambda dt: _single_last(17, 65, dt),
    "single-last-65x129": lambda dt: _single_last(65, 129, dt),
    "single-last-1x70": lambda dt: _single_last(1, 70, dt),
    "single-last-100x1": lambda dt: _single_last(100, 1, dt),
    "single-last-4095x63": lambda dt: _single_last(4095, 63, dt),
    "checkerboard-64x64": lambda dt: _checkerboard(64, 64, dt),
    "checkerboard-inverted-33x77": lambda dt: _checkerboard(33, 77, dt, invert=True),
    "block-checkerboard-8x8": lambda dt: _block_pattern(48, 96, 8, 8, dt),
    "block-checkerboard-8x16": lambda dt: _block_pattern(48, 96, 8, 16, dt),
    "one-dense-row": _one_dense_row,
    "one-dense-col": _one_dense_col,
}


@pytest.mark.parametrize("case", list(ADVERSARIAL))
def test_adversarial_masks(fmt, dtype, case):
    w = ADVERSARIAL[case](dtype)
    c = check_round_trip(fmt, w)
    assert c.nbytes == expected_nbytes(fmt, nonzero_mask(w), getattr(c, "splits", None), getattr(c, "parts", 1))
    # what from_dense produces must pass the loader's own validation
    tensors, meta = c.state()
    again = fmt.from_state(tensors, meta)
    assert again.nnz == c.nnz
    assert_bit_equal(again.to_dense(), c.to_dense())


# ---------------------------------------------------------------------------------------------------
# Special values
# ---------------------------------------------------------------------------------------------------
SPECIAL_BITS = {
    torch.float16: {
        "nan-payload": 0x7E5A, "snan-payload": 0x7C01, "neg-nan-payload": 0xFD33,
        "+inf": 0x7C00, "-inf": 0xFC00,
        "min-subnormal": 0x0001, "-min-subnormal": 0x8001, "max-subnormal": 0x03FF,
        "max-finite": 0x7BFF, "-max-finite": 0xFBFF, "min-normal": 0x0400,
    },
    torch.bfloat16: {
        "nan-payload": 0x7FC5, "snan-payload": 0x7F81, "neg-nan-payload": 0xFFA3,
        "+inf": 0x7F80, "-inf": 0xFF80,
        "min-subnormal": 0x0001, "-min-subnormal": 0x8001, "max-subnormal": 0x007F,
        "max-finite": 0x7F7F, "-max-finite": 0xFF7F, "min-normal": 0x0080,
    },
}


def _from_bits(patterns, dtype) -> torch.Tensor:
    return torch.tensor([p - 0x10000 if p >= 0x8000 else p for p in patterns], dtype=torch.int16).view(dtype)


def test_special_values_bit_exact(fmt, dtype):
    specials = SPECIAL_BITS[dtype]
    m, k = 33, 97
    w = torch.zeros(m, k, dtype=dtype)
    g = torch.Generator().manual_seed(17)
    slots = torch.randperm(m * k - 1, generator=g)  # the last element is set separately below
    n = len(specials)
    # every special value at several places, including the last element of the matrix
    special_idx = torch.cat([slots[: 4 * n], torch.tensor([m * k - 1])])
    values = _from_bits(list(specials.values()) * 4 + [specials["nan-payload"]], dtype)
    w.view(-1)[special_idx] = values
    neg_zero_idx = slots[4 * n: 4 * n + 40]
    w.view(-1)[neg_zero_idx] = _from_bits([0x8000], dtype)
    assert int((bits(w) == -0x8000).sum()) == 40

    c = fmt.from_dense(w)
    assert c.nnz == special_idx.numel()  # -0.0 is not counted
    dense = c.to_dense()
    assert torch.equal(bits(dense).view(-1)[special_idx], bits(values))
    # -0.0 comes back as +0.0, and there is no -0.0 anywhere in the output
    assert torch.equal(bits(dense).view(-1)[neg_zero_idx], torch.zeros(40, dtype=torch.int16))
    assert not bool((bits(dense) == -0x8000).any())
    # everything else is +0.0
    rest = torch.ones(m * k, dtype=torch.bool)
    rest[special_idx] = False
    assert not bool(bits(dense).view(-1)[rest].any())


def test_all_negative_zero_is_empty(fmt, dtype):
    w = torch.full((40, 70), -0.0, dtype=dtype)
    c = fmt.from_dense(w)
    assert c.nnz == 0
    assert c.density == 0.0
    assert_bit_equal(c.to_dense(), torch.zeros(40, 70, dtype=dtype))
    assert c.nbytes == expected_nbytes(fmt, torch.zeros(40, 70, dtype=torch.bool), getattr(c, "splits", None), getattr(c, "parts", 1))


# ---------------------------------------------------------------------------------------------------
# Property test
# ---------------------------------------------------------------------------------------------------
@given(m=st.integers(1, 200), k=st.integers(1, 200), density=st.floats(0.0, 1.0),
       dtype=st.sampled_from(DTYPES), fmt_cls=st.sampled_from(FORMATS), seed=st.integers(0, 2**31 - 1),
       neg_zeros=st.booleans())
def test_round_trip_property(m, k, density, dtype, fmt_cls, seed, neg_zeros):
    w = sparse_weight(m, k, density, dtype, seed=seed)
    if neg_zeros:  # turn some zeros into -0.0: still zeros
        w = torch.where((w == 0) & (torch.rand(m, k, generator=torch.Generator().manual_seed(seed)) < 0.5),
                        torch.full((), -0.0, dtype=dtype), w)
    c = fmt_cls.from_dense(w)
    assert c.nnz == int((w != 0).sum())
    assert c.nbytes == expected_nbytes(fmt_cls, w != 0, getattr(c, "splits", None), getattr(c, "parts", 1))
    assert_bit_equal(c.to_dense(), torch.where(w != 0, w, torch.zeros((), dtype=dtype)))


# ---------------------------------------------------------------------------------------------------
# Attributes and byte counts
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,density", [((1, 1), 1.0), ((7, 13), 0.5), ((70, 130), 0.3), ((129, 257), 0.05),
                                           ((256, 512), 0.0)])
def test_attributes_and_nbytes(fmt, dtype, shape, density):
    w = sparse_weight(*shape, density, dtype, seed=1)
    mask = w != 0
    c = fmt.from_dense(w)
    assert c.shape == shape and isinstance(c.shape[0], int) and isinstance(c.shape[1], int)
    assert c.dtype is dtype
    assert c.nnz == int(mask.sum())
    assert c.density == int(mask.sum()) / (shape[0] * shape[1])
    arrays = c.tensors()
    assert set(arrays) == {"data", "offsets"}
    assert all(t.dtype == torch.int32 and t.ndim == 1 for t in arrays.values())
    assert c.nbytes == sum(t.numel() * t.element_size() for t in arrays.values())
    assert c.nbytes == expected_nbytes(fmt, mask, getattr(c, "splits", None), getattr(c, "parts", 1))
    if fmt is DeltaRows:  # the slices' group offsets, the split windows and starts, the row order
        slices = -(-shape[0] // 32)
        assert c.offsets.numel() == slices + 1 + 18 * slices * c.splits + 32 * slices
    else:
        record = (STRIP_M, STRIP_K) if fmt is BitmapTiles else (TILE_M, STRIP_K)
        n_records = record_nnz(mask, *record).numel()
        assert c.offsets.numel() == n_records + 1
    assert str(shape[0]) in repr(c) and fmt.__name__ in repr(c)


@pytest.fixture(scope="module")
def weight_8k():
    """8192 x 8192 fp16 at 80 % sparsity, random (unstructured) mask."""
    return sparse_weight(8192, 8192, 0.2, torch.float16, seed=8192)


@pytest.mark.parametrize("fmt_cls,limit,kw", [(BitmapTiles, 0.54, {}), (TiledCSL, 0.81, {}),
                                               (DeltaRows, 0.535, {}), (DeltaRows, 0.56, {"parts": 16})],
                         ids=["BitmapTiles", "TiledCSL", "DeltaRows", "DeltaRows-parts16"])
def test_compression_ratio_8k_80pct_sparse(weight_8k, fmt_cls, limit, kw):
    """(DeltaRows' parts layout, 16 lanes a row: each part padded to whole groups, 4-5 % more.)"""
    c = fmt_cls.from_dense(weight_8k, **kw)
    if fmt_cls is DeltaRows:  # (the closed form's Python loop over 8192 rows is checked on smaller weights above)
        assert c.nbytes == sum(t.numel() * 4 for t in c.tensors().values())
    else:
        assert c.nbytes == expected_nbytes(fmt_cls, weight_8k != 0)
    ratio = c.nbytes / weight_8k.numel()  # bytes per element; dense fp16 is 2.0
    assert ratio <= limit, f"{fmt_cls.__name__}: {ratio:.4f} bytes/element > {limit}"


# ---------------------------------------------------------------------------------------------------
# Fragment-order layout, checked against an independent re-implementation
# ---------------------------------------------------------------------------------------------------
def _strip_index_map():
    """``(r, c) -> lane * 32 + bit`` for a 16 x 64 strip, from the formula (int64 [16, 64])."""
    r = torch.arange(STRIP_M)[:, None].expand(STRIP_M, STRIP_K)
    c = torch.arange(STRIP_K)[None, :].expand(STRIP_M, STRIP_K)
    lane, bit = fragment_lane_bit(r, c)
    return lane * 32 + bit


def test_fragment_index_map_is_a_permutation():
    idx = _strip_index_map()
    assert torch.equal(idx.reshape(-1).sort().values, torch.arange(1024))
    # the (r, c) -> (lane, bit) formula inverts the PTX-table direction (lane, bit) -> (r, c)
    lane, bit = torch.arange(1024) // 32, torch.arange(1024) % 32
    r, c = fragment_row_col(lane, bit)
    lane2, bit2 = fragment_lane_bit(r, c)
    assert torch.equal(lane2, lane) and torch.equal(bit2, bit)
    # each lane's 32 elements: rows g and g + 8, the 16 contiguous columns 16t .. 16t + 15
    rows, cols = r.view(32, 32), c.view(32, 32)
    for ln in range(32):
        assert set(rows[ln].tolist()) == {ln // 4, ln // 4 + 8}
        assert set(cols[ln].tolist()) == set(range(16 * (ln % 4), 16 * (ln % 4) + 16))


@pytest.mark.parametrize("elem_dtype", [torch.int16, torch.float16, torch.bfloat16, torch.int32, torch.bool])
@pytest.mark.parametrize("shape", [(16, 64), (40, 150), (1, 1), (64, 128)])
def test_to_fragment_order_matches_formula(elem_dtype, shape):
    m, k = shape
    if elem_dtype is torch.bool:
        w = (torch.arange(m * k).reshape(m, k) % 3) == 1
    elif elem_dtype in (torch.float16, torch.bfloat16):
        # distinct bit patterns, none of them zero
        w = (torch.arange(m * k, dtype=torch.int32).reshape(m, k) % 30000 + 1).to(torch.int16).view(elem_dtype)
    else:
        w = (torch.arange(m * k).reshape(m, k) + 1).to(elem_dtype)
    frag = _layout.to_fragment_order(w)
    mt, kt = -(-m // STRIP_M), -(-k // STRIP_K)
    assert frag.shape == (mt, kt, 1024) and frag.dtype == w.dtype
    padded = torch.zeros(mt * STRIP_M, kt * STRIP_K, dtype=w.dtype)
    padded[:m, :k] = w
    idx = _strip_index_map()
    expected = torch.zeros(mt, kt, 1024, dtype=w.dtype)
    for i in range(mt):
        for j in range(kt):
            block = padded[i * STRIP_M:(i + 1) * STRIP_M, j * STRIP_K:(j + 1) * STRIP_K]
            expected[i, j, idx.reshape(-1)] = block.reshape(-1)
    cmp = (lambda t: t.view(torch.int16)) if w.element_size() == 2 and w.is_floating_point() else (lambda t: t)
    assert torch.equal(cmp(frag), cmp(expected))
    back = _layout.from_fragment_order(frag, m, k)
    assert torch.equal(cmp(back), cmp(w))


@pytest.mark.parametrize("shape,density", [((16, 64), 0.5), ((70, 130), 0.3), ((33, 200), 0.9), ((5, 3), 1.0)])
def test_bitmap_words_and_values_follow_fragment_order(dtype, shape, density):
    """Data word ``4 * offsets[i] + lane`` holds fragment bit ``b = 8 s + j`` at word bit
    ``bitmap_word_bit(b)``, set exactly for the nonzeros of strip ``i``; the values follow the 32 words in
    step order (k-step ``s = b // 8``, then lane, then ``j = b % 8``)."""
    m, k = shape
    w = sparse_weight(m, k, density, dtype, seed=m + k)
    c = BitmapTiles.from_dense(w)
    mt, kt = -(-m // STRIP_M), -(-k // STRIP_K)
    padded = torch.zeros(mt * STRIP_M, kt * STRIP_K, dtype=dtype)
    padded[:m, :k] = w
    idx = _strip_index_map().reshape(-1)
    offsets = c.offsets.tolist()
    data16 = c.data.view(torch.int16)
    for i in range(mt * kt):
        strip = padded[(i // kt) * STRIP_M:(i // kt + 1) * STRIP_M, (i % kt) * STRIP_K:(i % kt + 1) * STRIP_K]
        frag = torch.zeros(1024, dtype=torch.int16)  # index lane * 32 + bit
        frag[idx] = bits(strip).reshape(-1)
        want = frag != 0
        words = c.data[4 * offsets[i]: 4 * offsets[i] + 32].to(torch.int64) & 0xFFFFFFFF
        word_bit = bitmap_word_bit(torch.arange(32))  # where fragment bit b sits in the word
        got = ((words[:, None] >> word_bit) & 1).bool().reshape(-1)  # [lane * 32 + bit]
        assert torch.equal(got, want), f"strip {i}: bitmap bits differ"
        n = int(want.sum())
        assert offsets[i + 1] - offsets[i] == 8 + -(-n // 8), f"strip {i}: record length"
        lane, bit = torch.arange(1024) // 32, torch.arange(1024) % 32
        step_order = torch.argsort((bit // 8) * 256 + lane * 8 + bit % 8)  # fragment indices, as stored
        first = 8 * offsets[i] + 64  # in 16-bit halves: 16-byte units * 8, then 32 words * 2
        stored = frag[step_order][want[step_order]]
        assert torch.equal(data16[first:first + n], stored), f"strip {i}: values not in step order"
        pad = data16[first + n: 8 * offsets[i + 1]]
        assert not bool(pad.any()), f"strip {i}: record padding is not zero"


def _bank_order_slots(pos: list[int], units: int) -> list[int]:
    """Reference for the entry order (versions 2 and 3), written out loop by loop: where each sequence element goes.
    Banks (version 3): the kernels' tile holds position p at byte 2 p, word = p // 2, bank = word % 32.  Entries are
    ranked within their bank and taken layer by layer (layer k = the k-th entry of each bank, banks ascending);
    instruction (r, q) of the kernel's scatter covers slots 128 r + 4 l + q for its lanes l < min(32, units - 32 r)
    and takes the next run of the sequence."""
    by_bank: dict[int, list[int]] = {}
    for p in pos:
        by_bank.setdefault((p // 2) % 32, []).append(p)
    seq = [by_bank[b][k] for k in range(max(map(len, by_bank.values()), default=0)) for b in sorted(by_bank)
           if k < len(by_bank[b])]
    slots = []
    for r in range(-(-units // 32)):
        lanes = min(32, units - 32 * r)
        for q in range(4):
            slots += [128 * r + 4 * lane + q for lane in range(lanes)]
    return list(zip(seq, slots))


@pytest.mark.parametrize("shape,density", [((64, 64), 0.5), ((70, 130), 0.3), ((130, 65), 1.0), ((64, 320), 0.8)])
def test_tiled_csl_entries_follow_the_swizzled_layout(dtype, shape, density):
    """Entry = value bits (low half) | position << 16, position = 64 r + 8 ((c // 8) ^ (r % 8)) + c % 8 (version 3),
    in bank order (``_bank_order_slots``) per tile, padded to a multiple of 4 with 0xFFFF0000 (the last slots of the
    sequence)."""
    m, k = shape
    w = sparse_weight(m, k, density, dtype, seed=m * k)
    c = TiledCSL.from_dense(w)
    mt, kt = -(-m // TILE_M), -(-k // STRIP_K)
    offsets = c.offsets.tolist()
    r_all, c_all = torch.nonzero(w != 0, as_tuple=True)
    for i in range(mt * kt):
        ti, tj = divmod(i, kt)
        sel = (r_all // TILE_M == ti) & (c_all // STRIP_K == tj)
        r, col = r_all[sel] % TILE_M, c_all[sel] % STRIP_K
        pos = 64 * r + 8 * ((col // 8) ^ (r % 8)) + col % 8
        vals = bits(w)[r_all[sel], c_all[sel]].to(torch.int64) & 0xFFFF
        value_at = dict(zip(pos.tolist(), vals.tolist()))
        n = pos.numel()
        n4 = -(-n // 4) * 4
        assert offsets[i + 1] - offsets[i] == n4, f"tile {i}: entry count"
        entries = (c.data[offsets[i]:offsets[i + 1]].to(torch.int64) & 0xFFFFFFFF).tolist()
        want = [0xFFFF0000] * n4
        for p, slot in _bank_order_slots(sorted(pos.tolist()), n4 // 4)[:n]:
            want[slot] = (p << 16) | value_at[p]
        assert entries == want, f"tile {i}: entries differ"


def test_tiled_csl_bank_order_depends_only_on_the_entries():
    """bank_order gives the same arrays whatever the order of the entries inside each tile and however the tiles
    are cut into chunks (one tile, a few hundred entries, the default)."""
    from flash_llm.formats.tiled_csl import bank_order
    w = sparse_weight(200, 1000, 0.3, torch.float16, seed=9)
    c = TiledCSL.from_dense(w)
    gen = torch.Generator().manual_seed(0)
    shuffled = c.data.clone()
    off = c.offsets.tolist()
    for t in range(len(off) - 1):
        shuffled[off[t]:off[t + 1]] = c.data[off[t]:off[t + 1]][torch.randperm(off[t + 1] - off[t], generator=gen)]
    assert not torch.equal(shuffled, c.data)
    for chunk in (1, 700, 1 << 22):
        assert torch.equal(bank_order(shuffled, c.offsets, chunk=chunk), c.data), chunk


def test_tiled_csl_bank_order_spreads_the_scatter_stores():
    """The point of the bank order: the kernels' warp stores (r, q) write mostly distinct banks.  Counted here as
    shared-memory wavefronts per store (the most distinct 32-bit words in one bank), against the same entries in
    position order."""
    from flash_llm.formats.tiled_csl import PAD_POSITION, shared_bank
    w = sparse_weight(256, 512, 0.2, torch.float16, seed=5)
    c = TiledCSL.from_dense(w)
    off = c.offsets.tolist()

    def wavefronts(e: torch.Tensor) -> float:
        total, stores = 0, 0
        units = e.numel() // 4
        for r in range(-(-units // 32)):
            lanes = min(32, units - 32 * r)
            for q in range(4):
                p = (e[[128 * r + 4 * lane + q for lane in range(lanes)]].to(torch.int64) >> 16) & 0xFFFF
                p = p[p != PAD_POSITION]
                if p.numel() == 0:
                    continue
                word = p >> 1
                bank = shared_bank(p)
                total += max(len(set(word[bank == b].tolist())) for b in set(bank.tolist()))
                stores += 1
        return total / stores

    ours = [wavefronts(c.data[off[t]:off[t + 1]]) for t in range(len(off) - 1)]
    by_pos = [wavefronts(c.data[off[t]:off[t + 1]][torch.argsort((c.data[off[t]:off[t + 1]] >> 16) & 0xFFFF)])
              for t in range(len(off) - 1)]
    assert sum(ours) / len(ours) < 1.7 and sum(by_pos) / len(by_pos) > 2.5, (ours, by_pos)


# ---------------------------------------------------------------------------------------------------
# Devices, casting, input errors
# ---------------------------------------------------------------------------------------------------
def test_to_cpu_returns_working_object(fmt, dtype):
    w = sparse_weight(70, 130, 0.4, dtype, seed=4)
    c = fmt.from_dense(w).to("cpu")
    assert isinstance(c, fmt) and c.device == torch.device("cpu")
    assert_bit_equal(c.to_dense(), w)
    c2 = c.to(torch.device("cpu"))
    assert c2.nnz == c.nnz and c2.shape == c.shape
    x = random_values(3, 130, dtype, seed=9)
    assert torch.equal(flash_llm.spmm(x, c2), flash_llm.spmm(x, c))


@pytest.mark.parametrize("src_dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_from_dense_dtype_casts(fmt, dtype, src_dtype):
    w32 = sparse_weight(70, 130, 0.4, torch.float32, seed=6)
    w = w32.to(src_dtype)
    c = fmt.from_dense(w, dtype=dtype)
    assert c.dtype is dtype
    expected = w.to(dtype)
    assert c.nnz == int((expected != 0).sum())
    assert_bit_equal(c.to_dense(), torch.where(expected != 0, expected, torch.zeros((), dtype=dtype)))


def test_from_dense_dtype_cast_underflow_is_zero(fmt):
    """fp32 values that round to (-)0 in fp16 are zeros of the compressed weight."""
    w = torch.tensor([[1e-30, -1e-30, 1.0, 0.0]], dtype=torch.float32)
    c = fmt.from_dense(w, dtype=torch.float16)
    assert c.nnz == 1
    assert_bit_equal(c.to_dense(), torch.tensor([[0.0, 0.0, 1.0, 0.0]], dtype=torch.float16))


BAD_INPUTS = [
    ("fp32-without-dtype", lambda: torch.ones(4, 8), {}, TypeError,
     r"w has dtype torch\.float32; expected torch\.float16 or torch\.bfloat16 \(pass dtype="),
    ("int-tensor", lambda: torch.ones(4, 8, dtype=torch.int32), {}, TypeError,
     r"w has dtype torch\.int32; expected torch\.float16 or torch\.bfloat16"),
    ("int-tensor-with-dtype", lambda: torch.ones(4, 8, dtype=torch.int64), {"dtype": torch.float16}, TypeError,
     r"w has dtype torch\.int64; expected a floating-point tensor to cast to torch\.float16"),
    ("bool-tensor", lambda: torch.ones(4, 8, dtype=torch.bool), {}, TypeError,
     r"w has dtype torch\.bool; expected torch\.float16 or torch\.bfloat16"),
    ("1-D", lambda: torch.ones(8, dtype=torch.float16), {}, ValueError,
     r"w must be 2-D \[M, K\]; got 1-D with shape \(8,\)"),
    ("3-D", lambda: torch.ones(2, 4, 8, dtype=torch.float16), {}, ValueError,
     r"w must be 2-D \[M, K\]; got 3-D with shape \(2, 4, 8\)"),
    ("0xK", lambda: torch.ones(0, 8, dtype=torch.float16), {}, ValueError,
     r"w must have M >= 1 and K >= 1; got shape \(0, 8\)"),
    ("Mx0", lambda: torch.ones(4, 0, dtype=torch.bfloat16), {}, ValueError,
     r"w must have M >= 1 and K >= 1; got shape \(4, 0\)"),
    ("list", lambda: [[1.0, 2.0]], {}, TypeError, r"w must be a torch\.Tensor, got list"),
    ("numpy", lambda: torch.ones(4, 8).numpy(), {}, TypeError, r"w must be a torch\.Tensor, got ndarray"),
    ("dtype-float32", lambda: torch.ones(4, 8), {"dtype": torch.float32}, TypeError,
     r"dtype must be torch\.float16 or torch\.bfloat16, got torch\.float32"),
    ("dtype-int8", lambda: torch.ones(4, 8), {"dtype": torch.int8}, TypeError,
     r"dtype must be torch\.float16 or torch\.bfloat16, got torch\.int8"),
]


@pytest.mark.parametrize("make,kwargs,exc,match", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_from_dense_rejects_bad_input(fmt, make, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fmt.from_dense(make(), **kwargs)


@pytest.mark.parametrize("fmt", [BitmapTiles, TiledCSL], ids=lambda c: c.__name__)
@pytest.mark.parametrize("shape", [(1, 1), (70, 130), (64, 64), (257, 1000)], ids=str)
def test_zeros_equals_from_dense_of_zeros(fmt, shape):
    for dtype in (torch.float16, torch.bfloat16):
        z = fmt.zeros(*shape, dtype)
        ref = fmt.from_dense(torch.zeros(shape, dtype=dtype))
        assert z.shape == ref.shape and z.dtype == dtype and z.nnz == 0
        for name, t in ref.tensors().items():
            assert torch.equal(z.tensors()[name], t), name


@pytest.mark.parametrize("fmt", [BitmapTiles, TiledCSL, DeltaRows], ids=lambda c: c.__name__)
def test_zeros_refuses_bad_shapes_and_dtypes(fmt):
    """``zeros`` names a bad ``m``, ``k`` or ``dtype`` (session 71: a float32 or 0-row weight was built, and failed
    later, or gave a wrong shape back)."""
    for m, k in ((0, 5), (-1, 5), (4, 0), (4.0, 8), (True, 8)):
        with pytest.raises(ValueError, match="m must be|k must be"):
            fmt.zeros(m, k)
    for dtype in (torch.float32, torch.int32):
        with pytest.raises(TypeError, match="dtype must be"):
            fmt.zeros(4, 8, dtype)


def test_slice_and_save_name_bad_arguments(tmp_path):
    """``slice`` takes None or a pair of ints (numpy / 0-d tensor ints too); ``flash_llm.save`` a non-empty dict of
    names to compressed weights; anything else is refused naming the argument, and no file is written."""
    import numpy as np

    w = BitmapTiles.from_dense(torch.randn(32, 64).half())
    assert w.slice(rows=(np.int64(1), torch.tensor(3))).shape == (2, 64)
    for bad in ((1.7, 3.2), (0, 1, 2), ("0", "2"), (False, True), 3):
        with pytest.raises(TypeError, match="rows must be None or a pair of ints"):
            w.slice(rows=bad)
    with pytest.raises(TypeError, match="cols must be"):
        w.slice(cols=(0.5, 2))
    path = tmp_path / "w.safetensors"
    for bad, match in ((w, r"one weight: weight.save\(path\)"), ({}, r"\(empty\)"),
                       ({"a": torch.zeros(3)}, "'a' maps to Tensor"), ({1: w}, "1 maps to BitmapTiles")):
        with pytest.raises(TypeError, match=match):
            flash_llm.save(bad, path)
    assert not path.exists()


# ---------------------------------------------------------------------------------------------------
# slice: records cut directly on record boundaries, re-encoded otherwise; the same arrays either way
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", [BitmapTiles, TiledCSL], ids=lambda c: c.__name__)
@pytest.mark.parametrize("shape, density", [((130, 200), 0.3), ((256, 320), 0.05), ((64, 64), 1.0),
                                            ((17, 70), 0.0), ((200, 129), 0.5)])
def test_slice_equals_encoding_the_dense_slice(fmt, shape, density, dtype):
    m, k = shape
    tr = fmt.TILE_ROWS
    w = sparse_weight(m, k, density, dtype, seed=m + k)
    c = fmt.from_dense(w)
    ranges = {  # aligned starts, ends at a boundary or at the edge; and unaligned ones
        "rows aligned": ((tr, m), None), "cols aligned": (None, (64, k)), "both": ((0, min(m, tr)), (0, min(k, 64))),
        "inner": ((tr // 2, m - 1), (3, k - 5)), "whole": (None, None), "last row": ((m - 1, m), None),
    }
    for what, (rows, cols) in ranges.items():
        r0, r1 = rows or (0, m)
        c0, c1 = cols or (0, k)
        if not (0 <= r0 < r1 <= m and 0 <= c0 < c1 <= k):
            continue
        got, want = c.slice(rows, cols), fmt.from_dense(w[r0:r1, c0:c1].contiguous())
        assert got.shape == (r1 - r0, c1 - c0) and got.nnz == want.nnz and got.dtype == w.dtype, what
        assert torch.equal(got.data, want.data) and torch.equal(got.offsets, want.offsets), what
        assert torch.equal(got.to_dense(), w[r0:r1, c0:c1]), what
    with pytest.raises(ValueError, match=r"slice rows 5:5, cols 0:\d+ is empty or outside the"):
        c.slice((5, 5))
    with pytest.raises(ValueError, match=r"outside the"):
        c.slice(None, (0, k + 1))


def test_slice_cuts_records_without_decoding(monkeypatch):
    """On record boundaries no expansion happens (the tensor-parallel loader relies on it for big layers)."""
    c = BitmapTiles.from_dense(sparse_weight(64, 256, 0.2, torch.float16, seed=9))
    monkeypatch.setattr(BitmapTiles, "to_dense", lambda self: (_ for _ in ()).throw(AssertionError("decoded")))
    part = c.slice((16, 48), (64, 192))
    assert part.shape == (32, 128) and part.nnz > 0


@pytest.mark.parametrize("shape", [(64 * 5 + 3, 200), (64 * 4, 128), (70, 4100)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt_cls", [TiledCSL, BitmapTiles])
def test_in_bands_of_record_rows_gives_the_same_arrays(shape, dtype, fmt_cls, monkeypatch):
    from flash_llm.formats import _base

    g = torch.Generator().manual_seed(shape[0])
    w = torch.randn(shape, generator=g)
    w = torch.where(torch.rand(shape, generator=g) < 0.3, w, 0.0).to(dtype)
    w[3] = 1.0  # a full row
    whole = fmt_cls.from_dense(w)
    assert len(fmt_cls._record_bands(*shape)) == 1
    for band_elements in (1, 4096 * 3):  # one record row a band, or a few
        monkeypatch.setattr(_base, "BAND_ELEMENTS", band_elements)
        assert len(fmt_cls._record_bands(*shape)) > 1
        part = fmt_cls.from_dense(w)
        assert torch.equal(part.data, whole.data) and torch.equal(part.offsets, whole.offsets)
        assert part.nnz == whole.nnz == int(torch.count_nonzero(w))
        assert_bit_equal(part.to_dense(), w)
        assert_bit_equal(whole.to_dense(), w)


def test_bands_are_larger_on_a_gpu_with_free_memory(monkeypatch):
    """``_base.band_elements``: BAND_ELEMENTS on the CPU and where FLASH_LLM_BAND_FIXED; on a GPU an eighth of its
    free memory at 6 bytes an element, within [BAND_ELEMENTS, 2^28]; the record bands follow it."""
    from flash_llm.formats import _base

    free = {"v": 12 * 10**9}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free["v"], 80 * 10**9))
    cuda = torch.device("cuda", 0)
    assert _base.band_elements("cpu") == _base.band_elements(None) == _base.BAND_ELEMENTS
    assert _base.band_elements(cuda) == 25 * 10**7  # (1.5 GB at 6 bytes an element)
    assert len(TiledCSL._record_bands(9216, 36864, cuda)) == 2 < len(TiledCSL._record_bands(9216, 36864)) == 11
    free["v"] = 80 * 10**9
    assert _base.band_elements(cuda) == 1 << 28
    free["v"] = 10**6
    assert _base.band_elements(cuda) == _base.BAND_ELEMENTS
    free["v"] = 12 * 10**9
    monkeypatch.setattr(_base, "BAND_FIXED", True)
    assert _base.band_elements(cuda) == _base.BAND_ELEMENTS


def test_count_nonzero_in_chunks_counts_what_torch_does(monkeypatch):
    from flash_llm.formats import _base

    g = torch.Generator().manual_seed(3)
    t = torch.randn(300, 70, generator=g)
    t[t.abs() < 0.7] = 0.0
    t[1, :5] = -0.0  # a zero too
    want = int(torch.count_nonzero(t))
    for chunk in (1, 7, 1000, 1 << 24):
        monkeypatch.setattr(_base, "COUNT_CHUNK", chunk)
        assert _base.count_nonzero(t) == want
        assert _base.count_nonzero(t.t()) == want  # (not contiguous)
        assert _base.count_nonzero(t.to(torch.bfloat16)) == int(torch.count_nonzero(t.to(torch.bfloat16)))
    assert _base.count_nonzero(torch.zeros(0, 5)) == 0

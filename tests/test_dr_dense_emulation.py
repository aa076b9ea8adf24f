"""The CPU emulation of ``delta_rows_to_dense_nf``, ``_nft``, ``_pr`` and ``_sr``
(``benchmarks/diag/dr_dense_emulate.py``, sessions 61, 63, 68, 69): DeltaRows' expansion into an output that is not
zeroed first writes every element exactly once, with the weight's bits, for the split layout (one split, several, more splits than a slice has groups), the parts
layout (rows whose middle parts are empty), coded values and paired halves, at densities from empty to full; and the
emulator fails the wrong rules it knows."""

import os

import pytest
import torch
from conftest import load_script

from flash_llm import DeltaRows

emu = load_script("benchmarks/diag/dr_dense_emulate.py", "dr_dense_emulate")


def test_every_element_written_once():
    seen = set()
    for label, w, want in emu.cases():
        m, k = label[0], label[1]
        if (m, k) not in ((70, 517), (40, 96), (333, 520)):  # (a reduced set: the script runs them all)
            continue
        parts = label[3].get("parts", 1) > 1
        seen.add(parts)
        assert emu.check(w, want) is None, label
        assert emu.check(w, want, "tiled") is None, label  # (delta_rows_to_dense_nft, session 63)
        if parts:
            assert emu.check(w, want, "rows") is None, label  # (delta_rows_to_dense_pr, session 68)
            assert emu.check(w, want, "rows_b64") is None, label  # (its blocks a band of 64 columns, session 69)
            assert emu.check(w, want, "rows_w") is None, label  # (_prw: ranges of groups a warp, session 70)
        elif k % 8 == 0:  # (delta_rows_to_dense_sr, session 69: a pass, and passes of 64 columns)
            assert emu.check(w, want, "split_rows") is None, label
            assert m != 333 or emu.check(w, want, "split_rows_b64") is None, label
            assert m != 333 or emu.check(w, want, "split_rows_b64_skip") is None, label
            assert emu.check(w, want, "split_rows_w") is None, label  # (_srw, session 70)
            assert m != 333 or emu.check(w, want, "split_rows_b64_w") is None, label
    assert seen == {False, True}


def test_rows_band_dispatch(monkeypatch):
    """``kernels.DR_DENSE_ROWS_BAND`` cuts ``delta_rows_to_dense_pr``'s blocks into bands of that many columns of
    their rows: grid ``(slices, K / band rounded up)``, the band its last argument, ``32 / P`` rows of it in shared
    memory; a K whose whole rows do not fit the shared memory then fits (launches faked: no GPU)."""
    from flash_llm import kernels as k
    from flash_llm.reference import FORMAT_IDS

    calls = []
    monkeypatch.setattr(k, "DR_DENSE_ROWS", True)
    monkeypatch.setattr(k, "launch", lambda name, grid, block, args, *a, **kw: calls.append((name, grid, args, a)))
    monkeypatch.setattr(k.torch.cuda, "current_stream", lambda dev=None: type("S", (), {"cuda_stream": 0})())
    w = torch.zeros(64, 4104, dtype=torch.float16)
    w[3, 7], w[60, 4100] = 1.0, 2.0
    dr = DeltaRows.from_dense(w, parts=2)  # (16 rows of 4104: 131 KiB whole, over the 64 KiB bound)
    for band, name, grid in ((0, "delta_rows_to_dense_nf", (-(-dr.layout.slices // k.DR_DENSE_NF_WARPS), 1, 1)),
                             (1000, "delta_rows_to_dense_pr", (dr.layout.slices, 5, 1))):
        monkeypatch.setattr(k, "DR_DENSE_ROWS_BAND", band)
        calls.clear()
        k.decode_dense(FORMAT_IDS[DeltaRows], dr.data, dr.offsets, 64, 4104, torch.float16)
        (got, g, args, rest), = calls
        assert (got, g) == (name, grid)
        if band:
            assert args[-1][0] == 1000 and rest[-1] == 16 * 1000 * 2


def test_split_rows_band_is_bounded(monkeypatch):
    """``delta_rows_to_dense_sr``'s band is a multiple of 8, at most K rounded up to 8, and never more than
    ``DR_DENSE_SR_BAND_MAX`` columns (its tile within every supported GPU's shared memory), whatever the setting."""
    from flash_llm import kernels as k

    for setting, kk, want in ((1024, 7168, 1024), (1020, 7168, 1016), (100000, 28672, k.DR_DENSE_SR_BAND_MAX),
                              (1024, 100, 104), (3, 7168, 8)):
        monkeypatch.setattr(k, "DR_DENSE_SR_BAND", setting)
        assert k.dr_dense_sr_band(kk) == want, (setting, kk)
    assert 32 * k.DR_DENSE_SR_BAND_MAX * 2 + 2432 <= 99 * 1024


def test_split_rows_emulator_sees_whole_chunks():
    """``emulate_split_rows`` writing whole 8-column chunks at the ends of a lane's owned columns (not only its own
    elements) writes elements twice where two splits meet inside a chunk, and passes of 64 columns give the one pass's
    result."""
    gen = torch.Generator().manual_seed(69)
    w = torch.where(torch.rand(96, 512, generator=gen) < 0.3, torch.randn(96, 512, generator=gen), 0.0)
    dr = DeltaRows.from_dense(w.to(torch.bfloat16), splits=5)
    want = dr.to_dense().view(torch.int16)
    assert emu.check(dr, want, "split_rows") is None
    assert emu.check(dr, want, "split_rows_b64") is None
    assert "more than once" in emu.check(dr, want, "split_rows_whole")


@pytest.mark.parametrize("variant", ["first_draft", "empty_parts_own"])
def test_emulator_sees_a_wrong_rule(variant):
    """The two rules the kernel does not use (emulated as ``variant``) each lose or double elements somewhere: a
    slice with fewer groups than splits whose first entry is at column 0, a row whose middle parts are empty."""
    w = torch.zeros(64, 256, dtype=torch.float16)
    w[3, 0], w[3, 200], w[3, 201] = 1.0, 2.0, 3.0
    w[10, 5::9] = 4.0
    lay = dict(splits=7) if variant == "first_draft" else dict(parts=4)
    dr = DeltaRows.from_dense(w, **lay)
    want = dr.to_dense().view(torch.int16)
    assert emu.check(dr, want) is None
    assert emu.check(dr, want, variant) is not None


@pytest.mark.parametrize("nofill, tiled, rows, split", [
    (False, False, False, False), (True, False, False, False), (True, True, False, False), (False, True, False, False),
    (True, False, True, False), (False, False, True, False), (True, False, True, True), (False, True, False, True)])
def test_expansion_dispatch(nofill, tiled, rows, split, monkeypatch):
    """``kernels.DR_DENSE_NOFILL`` picks ``delta_rows_to_dense_nf`` (one more argument: the lanes a row) and leaves
    ``out`` as it is, one warp a block (the default since session 63), or with ``DR_DENSE_TILED``
    ``delta_rows_to_dense_nft`` (the same arguments, ``DR_DENSE_T_WARPS`` warps a block); off,
    ``delta_rows_to_dense`` into a zeroed ``out``, whatever ``DR_DENSE_TILED`` says.  ``DR_DENSE_ROWS`` (the default
    since session 69) takes the parts layout to ``delta_rows_to_dense_pr`` first, a block a slice with its rows' tile
    in dynamic shared memory, whatever the others say; the split layout keeps the others' choice, or with
    ``DR_DENSE_SPLIT_ROWS`` too goes to ``delta_rows_to_dense_sr``, a block a (slice, split) with a band of
    ``DR_DENSE_SR_BAND`` window columns in dynamic shared memory (K here: 256) (launches faked: no GPU)."""
    from flash_llm import kernels as k
    from flash_llm.reference import FORMAT_IDS

    assert k.DR_DENSE_NOFILL or os.environ.get("FLASH_LLM_DR_DENSE_NOFILL", "1") != "1"
    assert k.DR_DENSE_ROWS or os.environ.get("FLASH_LLM_DR_DENSE_ROWS", "1") != "1"
    calls = []
    monkeypatch.setattr(k, "DR_DENSE_NOFILL", nofill)
    monkeypatch.setattr(k, "DR_DENSE_TILED", tiled)
    monkeypatch.setattr(k, "DR_DENSE_ROWS", rows)
    monkeypatch.setattr(k, "DR_DENSE_SPLIT_ROWS", split)
    monkeypatch.setattr(k, "DR_PLACE_SKIP", False)  # (_srk, _sr4 / _pr4: test_place_ahead_dispatch)
    monkeypatch.setattr(k, "DR_PLACE_AHEAD", 1)
    monkeypatch.setattr(k, "DR_DENSE_SR_BAND", 1024)
    monkeypatch.setattr(k, "launch", lambda name, grid, block, args, *a, **kw: calls.append((name, grid, args, a)))
    monkeypatch.setattr(k.torch.cuda, "current_stream", lambda dev=None: type("S", (), {"cuda_stream": 0})())
    w = torch.zeros(64, 256, dtype=torch.float16)
    w[3, 7] = 1.0
    for lay, parts in ((dict(splits=3), 1), (dict(parts=4), 4)):
        dr = DeltaRows.from_dense(w, **lay)
        out = torch.full((64, 256), 7.0, dtype=torch.float16)
        calls.clear()
        got = k.decode_dense(FORMAT_IDS[DeltaRows], dr.data, dr.offsets, 64, 256, torch.float16, out=out)
        (name, grid, args, rest), = calls
        if rows and split and parts == 1:
            assert name == "delta_rows_to_dense_sr" and grid == (dr.layout.slices, 3, 1) and len(args) == 8
            assert args[2][0] == out.data_ptr() and [a[0] for a in args[3:]] == [256, 3, 0, dr.layout.slices, 256]
            assert rest[-1] == 32 * 256 * 2 and bool((got == 7.0).all())
            continue
        if rows and parts > 1:
            assert name == "delta_rows_to_dense_pr" and grid == (dr.layout.slices, 1, 1)
            assert args[2][0] == out.data_ptr() and args[6][0] == parts and rest[-1] == (32 // parts) * 256 * 2
            assert bool((got == 7.0).all())  # (not zeroed: the block writes its rows whole)
            continue
        assert name == ("delta_rows_to_dense_nft" if nofill and tiled else "delta_rows_to_dense_nf" if nofill
                        else "delta_rows_to_dense")
        warps = k.DR_DENSE_T_WARPS if nofill and tiled else k.DR_DENSE_NF_WARPS if nofill else k.DR_DENSE_WARPS
        assert grid == (-(-dr.layout.slices // warps), dr.layout.splits, 1)
        assert len(args) == (8 if nofill else 7) and args[2][0] == out.data_ptr()
        if nofill:
            assert args[7][0] == parts and bool((got == 7.0).all())  # (not zeroed: the kernel writes every element)
        else:
            assert not got.any()


@pytest.mark.parametrize("ahead, skip, ranges", [(1, False, False), (2, False, False), (4, False, False),
                                                 (1, True, False), (4, True, False), (1, True, True), (4, False, True)])
def test_place_ahead_dispatch(ahead, skip, ranges, monkeypatch):
    """``kernels.DR_PLACE_AHEAD`` (session 70) picks ``delta_rows_to_dense_sr`` / ``_sr4`` for the split layout (any
    setting above 1: ``_sr4``), and for the parts layout ``_pr4`` only where the tile exceeds
    ``DR_PLACE_AHEAD_PR_MIN_TILE`` bytes (``_pr`` otherwise, and always at 1); ``DR_PLACE_SKIP`` takes the split layout
    to ``_srk`` (``_srk4`` with a lookahead); ``DR_PLACE_RANGES`` to ``_srw`` / ``_prw`` whatever the others say; all
    with the same grid and arguments (launches faked: no GPU)."""
    from flash_llm import kernels as k
    from flash_llm.reference import FORMAT_IDS

    calls = []
    monkeypatch.setattr(k, "DR_DENSE_ROWS", True)
    monkeypatch.setattr(k, "DR_DENSE_SPLIT_ROWS", True)
    monkeypatch.setattr(k, "DR_DENSE_ROWS_BAND", 0)
    monkeypatch.setattr(k, "DR_PLACE_AHEAD", ahead)
    monkeypatch.setattr(k, "DR_PLACE_SKIP", skip)
    monkeypatch.setattr(k, "DR_PLACE_RANGES", ranges)
    monkeypatch.setattr(k, "launch", lambda name, grid, block, args, *a, **kw: calls.append((name, grid, args, a)))
    monkeypatch.setattr(k.torch.cuda, "current_stream", lambda dev=None: type("S", (), {"cuda_stream": 0})())
    w = torch.zeros(64, 256, dtype=torch.float16)
    w[3, 7] = 1.0
    suffix = "w" if ranges else ("k" if skip else "") + ("" if ahead == 1 else "4")
    big = "w" if ranges else "4" if ahead > 1 else ""
    for lay, min_tile, want in ((dict(splits=3), 0, "delta_rows_to_dense_sr" + suffix),
                                (dict(parts=4), 4096, "delta_rows_to_dense_pr" + big),
                                (dict(parts=4), 4096 * 2,  # (the tile: 8 x 256 x 2 bytes)
                                 "delta_rows_to_dense_pr" + ("w" if ranges else ""))):
        monkeypatch.setattr(k, "DR_PLACE_AHEAD_PR_MIN_TILE", min_tile - 1)
        dr = DeltaRows.from_dense(w, **lay)
        calls.clear()
        k.decode_dense(FORMAT_IDS[DeltaRows], dr.data, dr.offsets, 64, 256, torch.float16,
                       out=torch.empty(64, 256, dtype=torch.float16))
        (name, grid, args, rest), = calls
        assert name == want, (lay, min_tile, name)
        assert grid == ((dr.layout.slices, 3, 1) if "splits" in lay else (dr.layout.slices, 1, 1))
        assert len(args) == 8 and rest[-1] == (32 if "splits" in lay else 8) * 256 * 2


def test_rows_emulator_sees_a_wrong_prefix():
    """``emulate_rows`` with each warp's own step sum counted in its entries' start (an inclusive scan over the chunk's
    warps: one way to get the kernel's prefix wrong) fails on a weight whose lanes hold several groups."""
    w = torch.zeros(64, 512, dtype=torch.bfloat16)
    w[:, ::3] = 1.5
    w[:, 1::7] = -2.0
    dr = DeltaRows.from_dense(w, parts=4)
    want = dr.to_dense().view(torch.int16)
    assert emu.check(dr, want, "rows") is None
    with pytest.raises(AssertionError):  # (entries pushed past the row's end: the tile's bounds)
        emu.check(dr, want, "rows_inclusive")

"""CPU emulation of ``delta_rows_to_dense_nf`` (spmm.cu, session 61; ``_nft``, session 63: ``emulate_tiled``; ``_pr``,
session 68: ``emulate_rows``; ``_sr``, session 69: ``emulate_split_rows``):
DeltaRows' expansion into an output that is not zeroed first, so every element must be written by exactly one lane
and split. The emulator runs the kernel's ownership rule (each lane's columns from the starts of its split and the
next, or of its row's later parts), its walk and its chunk writes (whole 16-element chunks inside the lane's columns,
element by element at their ends, zeros between) over the encoded arrays, counting the writes of every element:

    python3 benchmarks/diag/dr_dense_emulate.py          # every layout of a set of shapes and densities

It fails on an element written twice, one never written, or a wrong value.  Keep it in step with ``dr_dense_body``.
"""
from __future__ import annotations

import sys

import numpy as np
import torch

from flash_llm import DeltaRows
from flash_llm.formats.delta_rows import _split_offsets, layout, uncode_values

INF = 0x7FFFFFFF


#: rules the kernel does not use, each wrong somewhere (the tests check that the emulator sees it): ``first_draft``,
#: split 0 from column 0 and every later split from its start + 1 (a slice of fewer groups than splits puts its first
#: entries in a later split); ``empty_parts_own``, a part without entries taken as starting at column 0
VARIANTS = ("first_draft", "empty_parts_own")


def _spans(col0, rows, starts, slice_, s, S, g0, g1, parts, K, variant=None) -> list[tuple[int, int]]:
    """Each lane's owned elements (e0, e1) of out (e1 < e0: none), by the kernels' rule: its columns lo .. hi (the
    shuffles of the parts layout done over the list)."""
    spans = []
    for ln in range(32):
        col = col0[ln]
        if parts > 1:
            p = ln % parts
            mine = [c if (q == 0 or c > 0 or variant == "empty_parts_own") else INF
                    for q, c in ((ln2 % parts, col0[ln2]) for ln2 in range(32))]
            later = [mine[ln + j] for j in range(1, parts - p)]
            nxt = min(later) if later else INF
            lo = 0 if p == 0 else col
            hi = -1 if mine[ln] == INF else (K - 1 if nxt == INF else nxt - 1)
        else:
            nxt = int(starts[slice_, s + 1, ln]) if s + 1 < S else K - 1
            if variant == "first_draft":
                lo, hi = (0 if s == 0 else col + 1), nxt
            else:
                lo, hi = (0 if g0 == 0 else col + 1), (-1 if g1 == 0 and s + 1 < S else nxt)
        rowbase = max(rows[ln], 0) * K
        spans.append((rowbase + lo, rowbase + hi) if rows[ln] >= 0 and lo <= hi else (0, -1))
    return spans


def _arrays(w: DeltaRows):
    """``(lay, data, goffs, starts, perm)`` of ``w`` on the CPU as numpy arrays, its values plain (uncoded)."""
    m = w.shape[0]
    data = w.data.cpu()
    lay = layout(m, w.offsets.numel(), data.numel())
    if lay.coded:
        data = uncode_values(data, w.offsets.cpu(), m)
    goffs, _, starts, perm = (t.numpy() for t in _split_offsets(w.offsets.cpu(), lay.slices, lay.mp, lay.splits))
    return lay, data.numpy().astype(np.int32), goffs, starts, perm


def _group(data: np.ndarray, g: int, ln: int) -> tuple[np.ndarray, int]:
    """Lane ``ln``'s part of (plain) group ``g``: its 8 values' bits (int16, the first in the low half of a word) and
    its steps word."""
    grp = data[g * 160: (g + 1) * 160]
    return grp[4 * ln: 4 * ln + 4].view(np.int16), int(grp[128 + ln]) & 0xFFFFFFFF


def _warps(w: DeltaRows, variant: str | None = None):
    """Yields, for every warp (slice and split) of ``w``'s expansion, ``(walk, rows, spans)``: ``walk(ln)`` the
    lane's entries in walk order as ``(column, value bits)`` (pads and escapes included), ``rows`` the lanes' rows,
    ``spans`` their owned elements (:func:`_spans`)."""
    K = w.shape[1]
    lay, data, goffs, starts, perm = _arrays(w)
    slices, S, parts = lay.slices, lay.splits, lay.parts
    for slice_ in range(slices):
        for s in range(S):
            goff = int(goffs[slice_])
            G = int(goffs[slice_ + 1]) - goff
            g0, g1 = (s * G) // S, ((s + 1) * G) // S
            col0 = [int(c) for c in starts[slice_, s]]
            rows = [int(perm[slice_ * 32 + ln]) for ln in range(32)]

            def walk(ln, goff=goff, g0=g0, g1=g1, col=col0):
                c = col[ln]
                for g in range(g0, g1):
                    vals, d = _group(data, goff + g, ln)
                    for k in range(8):
                        c += (d >> (4 * k)) & 15
                        yield c, int(vals[k])

            yield walk, rows, _spans(col0, rows, starts, slice_, s, S, g0, g1, parts, K, variant)


def emulate(w: DeltaRows, variant: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(the int16 bits of out [M, K], the number of writes of every element) as ``delta_rows_to_dense_nf`` leaves an
    output that held ``-1`` everywhere (``variant``: one of :data:`VARIANTS` instead of the kernel's rule)."""
    m, K = w.shape
    out = np.full(m * K, -1, dtype=np.int16)
    count = np.zeros(m * K, dtype=np.int64)

    def write(e, v):
        out[e] = v
        count[e] += 1

    def flush_owned(q, b, e0, e1):
        if q * 16 >= e0 and q * 16 + 15 <= e1:  # whole: every element of the chunk (they are all in out)
            for t in range(16):
                write(q * 16 + t, b[t])
        else:
            for t in range(16):
                e = q * 16 + t
                if e0 <= e <= e1:
                    write(e, b[t])

    for walk, rows, spans in _warps(w, variant):
        for ln in range(32):
            row, (e0, e1) = rows[ln], spans[ln]
            rowbase = max(row, 0) * K
            cur = -1
            b = [0] * 16
            for col, h in walk(ln):
                if row >= 0 and (h & 0x7FFF):
                    e = rowbase + col
                    q = e >> 4
                    if q != cur:
                        if cur >= 0:
                            flush_owned(cur, b, e0, e1)
                        for z in range(cur + 1 if cur >= 0 else e0 >> 4, q):
                            flush_owned(z, [0] * 16, e0, e1)
                        b = [0] * 16
                        cur = q
                    b[e & 15] = h
            if cur >= 0:
                flush_owned(cur, b, e0, e1)
            if e0 <= e1:
                for z in range(cur + 1 if cur >= 0 else e0 >> 4, (e1 >> 4) + 1):
                    flush_owned(z, [0] * 16, e0, e1)
    return out.reshape(m, K), count.reshape(m, K)


#: ``delta_rows_to_dense_nft``'s tile: elements a lane's tile
TILE = 64


def emulate_tiled(w: DeltaRows) -> tuple[np.ndarray, np.ndarray]:
    """The same for ``delta_rows_to_dense_nft`` (session 63): each lane's owned elements in tiles of :data:`TILE` from
    its first owned element rounded down to 8, the warp's tiles in lockstep (a tile zeroed, the lane's entries below
    its end stored, then 4 lanes' tiles written a round, 16 bytes (8 elements) a lane, whole where the source lane owns
    them, else element by element)."""
    m, K = w.shape
    out = np.full(m * K, -1, dtype=np.int16)
    count = np.zeros(m * K, dtype=np.int64)
    for walk, rows, spans in _warps(w):
        owns = [rows[ln] >= 0 and spans[ln][0] <= spans[ln][1] for ln in range(32)]
        b0 = [spans[ln][0] & ~7 for ln in range(32)]
        walks = [list(walk(ln)) if owns[ln] else [] for ln in range(32)]  # (column, value), as the kernel takes them
        pos = [0] * 32
        t0 = 0
        while any(owns[ln] and b0[ln] + t0 <= spans[ln][1] for ln in range(32)):
            tile = np.zeros((32, TILE), dtype=np.int16)
            for ln in range(32):
                tb = b0[ln] + t0
                rowbase = max(rows[ln], 0) * K
                while pos[ln] < len(walks[ln]) and walks[ln][pos[ln]][0] < tb + TILE - rowbase:
                    col, h = walks[ln][pos[ln]]
                    pos[ln] += 1
                    if h & 0x7FFF:
                        off = rowbase + col - tb
                        assert 0 <= off < TILE, (ln, col, tb)  # (the kernel's shared-memory bounds)
                        tile[ln, off] = h
            for j in range(8):  # lanes 8 i + c write lane 4 j + i's tile, 8 elements each
                for lane in range(32):
                    src, c = 4 * j + lane // 8, (lane % 8) * 8
                    e = b0[src] + t0 + c
                    a, z = spans[src]
                    if e > z or e + 7 < a:
                        continue
                    for i in range(8):
                        if a <= e + i <= z:
                            out[e + i] = tile[src, c + i]
                            count[e + i] += 1
            t0 += TILE
    return out.reshape(m, K), count.reshape(m, K)


ROWS_WARPS = 8  # DRP_WARPS


def _step_sum(d: int) -> int:
    """``dr_step_sum``: a steps word's 8 nibbles summed in bytes, then in the top byte (32-bit arithmetic)."""
    t = (d & 0x0F0F0F0F) + ((d >> 4) & 0x0F0F0F0F)
    return ((t * 0x01010101) & 0xFFFFFFFF) >> 24


def _walk(vals: np.ndarray, d: int, col: int) -> tuple[list[tuple[int, int]], int]:
    """``dr_put_group``: a group's entries from column ``col`` on, ``(column, bits)`` of its nonzeros (pads, escapes
    and -0.0 left out), and the group's last column."""
    out = []
    for k in range(8):
        col += (d >> (4 * k)) & 15
        h = int(vals[k])
        if h & 0x7FFF:
            out.append((col, h))
    return out, col


def _place(data: np.ndarray, goff: int, G: int, run, rows: list[int], inclusive: bool = False,
           skip: tuple[int, int] | None = None):
    """``dr_place`` (spmm.cu: the block-parallel placement of ``delta_rows_to_dense_pr`` / ``_sr`` and the ``_tmma``
    kernels): the ``G`` groups from group ``goff`` of a slice's 32 lanes, :data:`ROWS_WARPS` at a time, warp ``w``
    taking group ``8 c + w`` of every lane; each group's 8 steps summed in bytes as the kernel does, and its entries
    started at the lane's running column (``run``, the lanes' starts) plus the sums of the warps before it
    (``inclusive``: and its own, a wrong rule the tests check the emulator sees).  Yields ``(lane, column, bits)`` of
    every nonzero of a real row (padding lanes, pads, escapes and -0.0 left out).  ``skip = (base, nb)`` (the kernel's
    SKIP, session 70): a group whose columns ``col + 1 .. col + own`` (its start, its steps' sum) miss ``base .. base
    + nb - 1`` yields nothing."""
    run = [int(c) for c in run]
    for c in range(-(-G // ROWS_WARPS)):
        sums, groups = np.zeros((ROWS_WARPS, 32), dtype=np.int64), {}
        for wp in range(ROWS_WARPS):
            g = c * ROWS_WARPS + wp
            for ln in range(32):
                vals, d = _group(data, goff + g, ln) if g < G else (np.zeros(8, dtype=np.int16), 0)
                sums[wp, ln] = _step_sum(d)
                groups[wp, ln] = vals, d
        for wp in range(ROWS_WARPS):
            for ln in range(32):
                vals, d = groups[wp, ln]
                col = run[ln] + int(sums[:wp + inclusive, ln].sum())
                if rows[ln] < 0 or (skip is not None and (col + int(sums[wp, ln]) < skip[0]
                                                          or col >= skip[0] + skip[1])):
                    continue
                for c, h in _walk(vals, d, col)[0]:
                    yield ln, c, h
        for ln in range(32):
            run[ln] += int(sums[:, ln].sum())


def _place_ranges(data: np.ndarray, goff: int, G: int, run, rows: list[int], skip: tuple[int, int] | None = None):
    """``dr_place_ranges`` (session 70): warp ``w`` takes groups ``G w // 8 .. G (w + 1) // 8 - 1`` of every lane; a
    pre-pass sums each (warp, lane)'s range of steps (:func:`_step_sum`), and each range starts at the lane's running
    column (``run``) plus the sums of the warps before it; then the range is walked group by group.  ``skip = (base,
    nb)``: a range, then a group, whose columns miss the band yields nothing.  Yields what :func:`_place` yields."""
    ranges = [((wp * G) // ROWS_WARPS, ((wp + 1) * G) // ROWS_WARPS) for wp in range(ROWS_WARPS)]
    sums = np.zeros((ROWS_WARPS, 32), dtype=np.int64)
    for wp, (r0, r1) in enumerate(ranges):
        for ln in range(32):
            sums[wp, ln] = sum(_step_sum(_group(data, goff + g, ln)[1]) for g in range(r0, r1))
    for wp, (r0, r1) in enumerate(ranges):
        for ln in range(32):
            col = int(run[ln]) + int(sums[:wp, ln].sum())
            own = int(sums[wp, ln])
            if rows[ln] < 0 or (skip is not None and (col + own < skip[0] or col >= skip[0] + skip[1])):
                continue
            for g in range(r0, r1):
                vals, d = _group(data, goff + g, ln)
                total = _step_sum(d)
                if skip is not None and (col + total < skip[0] or col >= skip[0] + skip[1]):
                    col += total
                    continue
                entries, col = _walk(vals, d, col)
                for c, h in entries:
                    yield ln, c, h


def split_blocks(w: DeltaRows, lay, goffs: np.ndarray, perm: np.ndarray):
    """The blocks of a split-layout weight's ``_sr`` / ``_tmma`` kernels, a (slice, split) each: yields ``(slice_, s,
    goff, g0, g1, rows, a0, wd)``, the slice's first group, the split's groups ``g0 .. g1 - 1`` of it, the lanes' rows
    and the split's window ``a0 .. a0 + wd - 1`` (the encoder's ``win``)."""
    S = lay.splits
    win = _split_offsets(w.offsets.cpu(), lay.slices, lay.mp, S)[1].numpy()
    for slice_ in range(lay.slices):
        goff, G = int(goffs[slice_]), int(goffs[slice_ + 1]) - int(goffs[slice_])
        rows = [int(perm[slice_ * 32 + ln]) for ln in range(32)]
        for s in range(S):
            yield (slice_, s, goff, (s * G) // S, ((s + 1) * G) // S, rows, int(win[slice_, s, 0]),
                   int(win[slice_, s, 1]))


def emulate_rows(w: DeltaRows, inclusive: bool = False, band: int = 0, ranges: bool = False
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The same for ``delta_rows_to_dense_pr`` (session 68; the parts layout only): a block a slice (and, with
    ``band``, a block a band of ``band`` columns of its rows: session 69), its tile of the slice's ``32 / P`` rows
    zeroed; the nonzeros placed by :func:`_place` (``inclusive`` passed on) go into the tile where they fall in the
    block's band (the row's bounds asserted); then the tile's rows of real rows are written."""
    m, K = w.shape
    out = np.full(m * K, -1, dtype=np.int16)
    count = np.zeros(m * K, dtype=np.int64)
    lay, data, goffs, starts, perm = _arrays(w)
    assert lay.parts > 1 and lay.splits == 1, "delta_rows_to_dense_pr takes the parts layout"
    P = lay.parts
    band = K if band <= 0 else max(8, min(band // 8 * 8, K))
    for slice_ in range(lay.slices):
        goff, G = int(goffs[slice_]), int(goffs[slice_ + 1]) - int(goffs[slice_])
        rows = [int(perm[slice_ * 32 + ln]) for ln in range(32)]
        for b0 in range(0, K, band):
            nb = min(band, K - b0)
            tile = np.zeros((32 // P, nb), dtype=np.int16)
            placed = (_place_ranges(data, goff, G, starts[slice_, 0], rows) if ranges
                      else _place(data, goff, G, starts[slice_, 0], rows, inclusive))
            for ln, col, h in placed:
                assert 0 <= col < K, (slice_, ln, col)  # (the row's bounds)
                if 0 <= col - b0 < nb:
                    tile[ln // P, col - b0] = h
            for r in range(32 // P):
                row = rows[r * P]
                if row >= 0:
                    out[row * K + b0: row * K + b0 + nb] = tile[r]
                    count[row * K + b0: row * K + b0 + nb] += 1
    return out.reshape(m, K), count.reshape(m, K)


def emulate_split_rows(w: DeltaRows, band: int = 1024, owned_only: bool = True, skip: bool = False,
                       ranges: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The same for ``delta_rows_to_dense_sr`` (session 69; the split layout, ``K % 8 == 0``): a block a (slice, split),
    its window ``a0 .. a0 + w - 1`` in passes of ``band`` columns.  Each pass zeroes a tile of 32 rows of the band,
    places the split's nonzeros whose columns fall in the band (:func:`_place`; every nonzero asserted inside the
    window), and writes each lane's owned columns
    (:func:`_spans`) of the band by 8-column chunks; the last split then writes its rows' zeros past the window.
    ``owned_only=False`` writes whole chunks whatever the owner (a wrong rule the tests check the emulator sees).
    ``skip``: ``_srk`` (session 70), each pass's placement skipping the groups outside its band; ``ranges``:
    ``_srw``'s placement (:func:`_place_ranges`)."""
    m, K = w.shape
    out = np.full(m * K, -1, dtype=np.int16)
    count = np.zeros(m * K, dtype=np.int64)
    lay, data, goffs, starts, perm = _arrays(w)
    assert lay.parts == 1 and K % 8 == 0, "delta_rows_to_dense_sr takes the split layout, K % 8 == 0"
    S = lay.splits

    def put(row, c0, vals, lo, hi):  # drs_put: chunk c0 .. c0 + 7 of a row, its owned columns
        for t in range(8):
            if owned_only and not lo <= c0 + t <= hi:
                continue
            out[row * K + c0 + t] = vals[t]
            count[row * K + c0 + t] += 1

    for slice_, s, goff, g0, g1, rows, a0, wd in split_blocks(w, lay, goffs, perm):
        assert a0 % 8 == 0 and wd % 8 == 0 and wd > 0 and a0 + wd <= K, (slice_, s, a0, wd)
        col0 = [int(c) for c in starts[slice_, s]]
        own = [(e0 - max(r, 0) * K, e1 - max(r, 0) * K) for (e0, e1), r in
               zip(_spans(col0, rows, starts, slice_, s, S, g0, g1, 1, K), rows)]
        for b0 in range(0, wd, band):
            nb, c0 = min(band, wd - b0), a0 + b0
            tile = np.zeros((32, nb), dtype=np.int16)
            placed = (_place_ranges(data, goff + g0, g1 - g0, col0, rows, skip=(c0, nb) if skip else None)
                      if ranges else _place(data, goff + g0, g1 - g0, col0, rows, skip=(c0, nb) if skip else None))
            for ln, col, h in placed:
                assert a0 <= col < a0 + wd, (slice_, s, ln, col, a0, wd)  # (inside the window)
                if 0 <= col - c0 < nb:
                    tile[ln, col - c0] = h
            for ln in range(32):
                if rows[ln] >= 0:
                    for q in range(nb // 8):
                        put(rows[ln], c0 + 8 * q, tile[ln, 8 * q: 8 * q + 8], *own[ln])
        if s + 1 == S:
            for ln in range(32):
                if rows[ln] >= 0:
                    for c in range(a0 + wd, K, 8):
                        put(rows[ln], c, np.zeros(8, dtype=np.int16), *own[ln])
    return out.reshape(m, K), count.reshape(m, K)


def check(w: DeltaRows, want: torch.Tensor, variant: str | None = None) -> str | None:
    """None, or what is wrong with the emulated expansion of ``w`` against ``want`` (int16 bits [M, K]);
    ``variant`` "tiled": ``delta_rows_to_dense_nft``'s; "rows": ``delta_rows_to_dense_pr``'s (the parts layout;
    "rows_b64": its blocks 64 columns of their rows);
    "split_rows" (bands of 1024 columns) and "split_rows_b64" (of 64: many passes): ``delta_rows_to_dense_sr``'s (the
    split layout); "split_rows_b64_skip": ``_srk``'s at bands of 64 (session 70); "rows_w", "split_rows_w",
    "split_rows_b64_w": ``_prw`` / ``_srw``'s placement by ranges of groups a warp (session 70)."""
    out, count = (emulate_tiled(w) if variant == "tiled"
                  else emulate_rows(w, variant == "rows_inclusive") if variant in ("rows", "rows_inclusive")
                  else emulate_rows(w, band=64) if variant == "rows_b64"
                  else emulate_rows(w, ranges=True) if variant == "rows_w"
                  else emulate_split_rows(w, *SPLIT_ROWS_VARIANTS[variant]) if variant in SPLIT_ROWS_VARIANTS
                  else emulate(w, variant))
    if (count != 1).any():
        twice, never = int((count > 1).sum()), int((count == 0).sum())
        return f"{twice} elements written more than once, {never} never"
    bad = int((out != want.numpy()).sum())
    return f"{bad} elements wrong" if bad else None


#: :func:`emulate_split_rows`'s settings by variant name: (band, owned_only); "split_rows_whole" is wrong somewhere
SPLIT_ROWS_VARIANTS = {"split_rows": (1024, True), "split_rows_b64": (64, True), "split_rows_whole": (1024, False),
                       "split_rows_b64_skip": (64, True, True), "split_rows_w": (1024, True, True, True),
                       "split_rows_b64_w": (64, True, True, True)}


def cases():
    gen = torch.Generator().manual_seed(61)
    for m, k in ((333, 520), (70, 517), (64, 4104), (40, 96), (96, 1000)):
        for density in (0.0, 0.003, 0.02, 0.3, 0.8, 1.0):
            w = torch.randn(m, k, generator=gen)
            w = torch.where(torch.rand(m, k, generator=gen) < density, w, 0.0).to(torch.bfloat16)
            w[0, : k // 3] = -0.0  # (a zero: not stored, written as +0)
            w[min(5, m - 1)] = 0.0  # an empty row
            if m > 9:  # a row of one far nonzero (escapes) and one of two, far apart
                w[7] = 0.0
                w[7, k - 1] = 1.0
                w[9] = 0.0
                w[9, 0] = 2.0
                w[9, k - 2] = 3.0
            if m > 11 and k > 210:  # a row whose middle parts are empty: 3 nonzeros, the last two after a long gap
                w[11] = 0.0
                w[11, 0], w[11, 200], w[11, 201] = 1.0, 2.0, 3.0
            want = DeltaRows.from_dense(w).to_dense().view(torch.int16)
            lays = [dict(splits=s) for s in (1, 2, 7, 64)] + ([dict(parts=p) for p in (2, 4, 8, 16)] if k % 8 == 0
                                                             else [])
            for lay in lays:
                dr = DeltaRows.from_dense(w, **lay)
                yield (m, k, density, lay), dr, want
                if lay.get("splits") == 7 or lay.get("parts") == 4:
                    coded = dr.code_values()
                    if coded is not None and coded.coded:
                        yield (m, k, density, lay, "coded"), coded, want
            if m % 64 == 0 and k % 8 == 0:  # paired halves (gate / up)
                for lay in (dict(splits=3), dict(parts=4)):
                    yield (m, k, density, lay, "paired"), DeltaRows.from_dense(w, pair_halves=True, **lay), want


def main() -> int:
    bad = total = 0
    for label, w, want in cases():
        total += 1
        err = check(w, want) or check(w, want, "tiled")
        if not err and label[3].get("parts", 1) > 1:
            err = check(w, want, "rows") or check(w, want, "rows_b64")
        elif not err and w.shape[1] % 8 == 0:
            err = check(w, want, "split_rows") or check(w, want, "split_rows_b64")
        if err:
            bad += 1
            print(f"FAIL {label}: {err}", flush=True)
    print(f"{total - bad} of {total} weights expanded exactly, every element written once; {bad} wrong")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

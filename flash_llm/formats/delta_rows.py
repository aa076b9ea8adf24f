"""DeltaRows: each nonzero as a 16-bit value and a 4-bit column step, one row per lane (the N = 1 format).

Layout (version 1; ``docs/formats.md``):

* Rows are ranked by their entry count (descending, stable); ``perm[rank]`` is the row, ``-1`` for the padding ranks
  that fill the last *slice* (32 ranks: one warp, lane ``l`` owns rank ``32 slice + l``).
* A row is a stream of *entries*: a value and a step (0..15); the kernel adds the step to its running column, then
  multiplies the value by X's element there.  A gap of more than 15 columns takes *escape* entries (value 0, step 15)
  first; a row's first step counts from column 0.  The 32 streams of a slice are padded (value 0, step 0) to the same
  whole number of *groups* of 8 entries.
* ``data`` (int32): the groups, slice after slice.  A group is 160 words: 32 lanes x 4 words of values (two 16-bit
  values a word, the first in the low half), then 32 lanes x 1 word of steps (entry ``i`` in bits ``4i .. 4i + 3``).
* ``offsets`` (int32), four sections: ``goff[slices + 1]`` (each slice's first group); ``win[slices][S][2]`` (the
  column window ``(a0, w)`` of split ``s`` of the slice: multiples of 8, every column its lanes visit lies in
  ``a0 .. a0 + w - 1``); ``starts[slices][S][32]`` (16-bit: each lane's column before the split, two a word);
  ``perm[32 slices]``.  ``S`` (the split count, fixed at encoding) follows from the sizes.
* Split ``s`` of a slice with ``G`` groups holds groups ``s G / S .. (s + 1) G / S - 1`` (integer division).

Version 2 (session 30) adds the *parts* layout, ``P`` lanes a row (``P`` = 2, 4, 8 or 16; version 1 is ``P = 1``):

* A slice holds ``32 / P`` rows; a row's entries are cut into ``P`` runs of equal stream length (escapes counted),
  each a contiguous range of its columns, walked by ``P`` adjacent lanes (lane ``l`` walks part ``l % P``), each lane
  from its own start column (its first step 0).  ``perm`` holds each lane's row (``P`` equal neighbours); paired
  halves: lanes 16-31 of a slice hold the up rows of lanes 0-15's gate rows.
* One split (``S = 1``), its window all of K: the N = 1 kernel (``delta_rows_parts_*``) stages all of X in every block
  and sums a row's parts by shuffles, so no launch waits on another block (no split-K partials, no ticket).
* ``data`` ends with ``P`` words holding ``P``: ``len(data) % 160`` gives ``P`` from the sizes alone (0: ``P = 1``).

Bytes: ``2.5`` per entry (nonzeros, escapes and pads) plus ``4 (slices + 1) + 72 slices S + 4 Mp``.  At 80 % random
sparsity about 0.53 bytes per element (BitmapTiles 0.525, TiledCSL 0.80); the parts layout pads each part to whole
groups (about 4-7 % more at ``P`` = 8-16 on Llama-3-8B's layers).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

from ._base import FormatError, SparseFormat, check_dense_weight, check_shape_args, count_nonzero, gpu_run_size
from ._layout import ceil_div
from .._env import env_int

LANES = 32  # ranks per slice
BLOCK_SLICES = 4  # slices per block of the N = 1 kernel, which stages the union of their windows (kernels.DR_WARPS)
GROUP = 8  # entries per lane per group
GROUP_WORDS = LANES * GROUP // 2 + LANES  # 160
MAX_STEP = 15
MAX_K = 1 << 16  # columns are 16-bit
#: split counts aim at about this many warps (slices x splits; 24-32 per SM on a 132-SM H100 / H200 were fastest,
#: session 26) when encoding off the GPU.  The kernel's blocks of 4 warps fit 8 to an SM there, so this must stay under
#: one wave (1056 blocks on 132 SMs): 4224 or 2800 ran batch 1 11 % slower (session 27).  ``FLASH_LLM_DELTA_BLOCKS``
#: overrides it for tuning runs; encoding on a CUDA device, :func:`target_warps` takes that device's wave
#: (``BLOCKS_OVERRIDE``: the override, 0 where it is not set or not valid, as the shared switch helpers read it)
BLOCKS_OVERRIDE = env_int("FLASH_LLM_DELTA_BLOCKS", 0, 1)
TARGET_BLOCKS = BLOCKS_OVERRIDE or 3600
#: on a CUDA device the split counts aim at this share of one wave of the N = 1 kernel (3600 warps of 4224 on an H200)
WAVE_SHARE = 0.85
#: the N = 1 kernel stages a split's X window in shared memory up to this many columns (as fp32 up to 1536, as 16-bit
#: above); wider windows read X from global memory (slower, same result), and the encoder raises the split count to
#: avoid them (``DR_WMAX16`` in spmm.cu).  Until session 28 1536: OPT-30B's q/k/v, fc1 and fc2 (K = 7168 / 28672) then
#: took 2.3-2.4x the splits of one wave.  (The multi-token kernels stage the weight's widest window too, up to 3072
#: columns at 8 tokens, since session 34; 1536 before.)
WINDOW_MAX = 3072
#: paired halves (gate / up): gate rows ranked by their entries, then each run of this many by their up rows'
PAIR_BUCKET = 1024
#: lanes a row the parts layout may take (version 2); 1 is the split layout
PARTS = (1, 2, 4, 8, 16)
#: :func:`auto_parts` takes the parts layout only up to this K (16-byte rows, ``K % 8 == 0``): every block of its
#: N = 1 kernel stages all of X (and with a norm reads its weight, LayerNorm also its bias, and normalizes in place).
#: Session 30 (H200, ``benchmarks/dr_layouts.py``, 80 %): Llama-3-8B's q/k/v, o, gate / up (K = 4096) 1.06-1.18x the
#: split layout's speed, down (K = 14336) 1.02-1.03x; OPT-30B (K = 7168, LayerNorms) 0.79-0.90x at the default P
#: (its o alone 1.13x at P = 8), fc2 (K = 28672) 0.90x.  ``FLASH_LLM_DELTA_PARTS_MAX_K`` overrides it (for measuring).
PARTS_MAX_K = env_int("FLASH_LLM_DELTA_PARTS_MAX_K", 4096, 0)
#: ... and up to this K for a layer whose input comes from no norm (``auto_parts(normed=False)``: o, down, fc2), whose
#: kernel stages X as it is.  Session 33 (H200, call G, one round): Llama-3-8B's down (K = 14336) in the parts layout,
#: batch 1 at 80 % 2.027 -> 2.005 ms per token; session 30 had OPT-30B's LayerNorm layers (K = 7168) losing there.
#: Session 34 (calls B-C, o / down / fc2 up to this K): Llama-3-8B 2.024 -> 2.003 ms, OPT-30B (its out_proj, K = 7168;
#: fc2, K = 28672, above) 6.090 -> 6.013 ms.  ``FLASH_LLM_DELTA_PARTS_MAX_K_PLAIN`` overrides it
PARTS_MAX_K_PLAIN = env_int("FLASH_LLM_DELTA_PARTS_MAX_K_PLAIN", 16384, 0)
#: ... with the fewest lanes a row that give at least this share of :func:`target_warps` warps (slices; session 30's
#: sweep: q/k/v best at 3072 warps, gate / up at 3584, down at 1792-3584, o at 512-2048 within 4 %)
PARTS_SHARE = 0.8
#: ... and at least this many entries a part (fewer: each part's padding to whole groups costs too many bytes)
PARTS_MIN_ENTRIES = 48
#: ``FLASH_LLM_DELTA_PARTS``: the encoder's default lanes a row: ``1`` (the split layout, default), ``auto``
#: (:func:`auto_parts`) or 2 / 4 / 8 / 16.  The parts layout is not the default: end to end on Llama-3-8B at batch 1 it
#: gained 0.1-1 % (session 30, calls D and F), and its multi-token kernels read X from global memory (batch 4: 2.9x
#: slower, call F)
PARTS_ENV = os.environ.get("FLASH_LLM_DELTA_PARTS", "1").strip().lower() or "1"  # (as the other switches: " 4", Auto)


class Layout(NamedTuple):
    """A DeltaRows weight's layout, from its sizes alone (no device sync): lanes a row, slices, ``Mp`` (lanes:
    ``32 slices``), split count (0 when the sizes fit nothing), whether the halves are paired and whether the values
    are coded (:func:`code_values`)."""
    parts: int
    slices: int
    mp: int
    splits: int
    paired: bool
    coded: bool = False


#: coded values (:func:`code_values`): a lane's 8 entries in 16 bytes (a group 128 words, not 160), and ``data`` ends
#: with ``parts + CODED_TRAILER`` words holding that number, its length that many past a multiple of 160
CODED_GROUP_WORDS = LANES * 4
CODED_TRAILER = 16


def layout(m: int, n_off: int, n_data: int) -> Layout:
    """The :class:`Layout` of an ``m``-row weight whose ``offsets`` has ``n_off`` words and ``data`` ``n_data``."""
    p = n_data % GROUP_WORDS or 1
    coded = p - CODED_TRAILER in PARTS
    if coded:
        p -= CODED_TRAILER
    if p not in PARTS:
        return Layout(p, 0, 0, 0, False)
    slices = ceil_div(m, LANES // p)
    mp = slices * LANES
    rest = n_off - (slices + 1) - mp
    paired = rest > 0 and rest % (18 * slices) == 1  # a paired weight's last word, m / 2
    rest -= paired
    s = rest // (18 * slices) if rest > 0 and rest % (18 * slices) == 0 else 0
    return Layout(p, slices, mp, s if p == 1 or s == 1 else 0, paired, coded)


def code_values(data: torch.Tensor, offsets: torch.Tensor, m: int) -> torch.Tensor | None:
    """``data`` of a bf16 DeltaRows weight with its values coded: 2 bytes an entry instead of 2.5, or None where a
    lane holds nonzero values whose 8-bit exponents span more than 7 (then the weight stays as it is).

    A lane's group becomes 16 bytes: the 8 values' low bytes as they are (``e0``, 7 mantissa bits), a word of their
    3-bit codes (entry ``i`` in bits ``4 i .. 4 i + 2``) and signs (bit ``8 i + 7`` for entries 0-3, ``8 (i - 4) + 3``
    for 4-7), and the steps word.  A value's high byte is its sign and the 7 exponent bits ``e7..e1`` looked up by its
    code in its row's table (two words a row rank, ``32 slices / parts`` of them, after the groups): byte 0 is 0
    (code 0: the value 0, pads and escapes), byte ``c`` is ``base + c - 1``, ``base`` the row's least ``e7..e1``.
    The kernels look up four high bytes with one ``PRMT`` (spmm.cu, ``dr_decode_coded``).  Exact: every value's bits
    come back (:func:`uncode_values`).  So a row's nonzero values must lie within 7 steps of ``e7..e1`` (14 binades).
    Pruned weights keep few: on the bundled model at 50-90 % magnitude pruning, each row's span at most 2."""
    lay = layout(m, offsets.numel(), data.numel())
    if lay.coded or not lay.splits:
        raise ValueError("code_values: 'data' must be a plain DeltaRows weight's")
    dev = data.device
    goff = offsets[: lay.slices + 1].to(torch.int64)
    ng = int(goff[-1])
    grp = data[: ng * GROUP_WORDS].view(ng, GROUP_WORDS)
    nr = lay.mp // lay.parts  # one table a row: its parts' lanes (adjacent) share it
    sh8 = 8 * torch.arange(4, device=dev)

    def chunk(g0: int, g1: int):
        """groups g0 .. g1 - 1: values [n, 32, 8] (int64, the bits), e7..e1, nonzero, each entry's row rank"""
        vals = grp[g0:g1, : LANES * GROUP // 2].contiguous().view(torch.int16).view(-1, LANES, GROUP)
        vals = vals.to(torch.int64) & 0xFFFF
        sl = torch.searchsorted(goff, torch.arange(g0, g1, device=dev), right=True) - 1
        row = ((sl[:, None] * LANES + torch.arange(LANES, device=dev)) // lay.parts)[:, :, None].expand_as(vals)
        return vals, (vals >> 8) & 0x7F, (vals & 0x7FFF) != 0, row

    # (in chunks of CODE_CHUNK_GROUPS groups: the int64 temporaries of a whole large layer would take GBs)
    bounds = [(g, min(ng, g + CODE_CHUNK_GROUPS)) for g in range(0, ng, CODE_CHUNK_GROUPS)]
    emin = torch.full((nr,), 127, dtype=torch.int64, device=dev)
    emax = torch.full((nr,), -1, dtype=torch.int64, device=dev)
    for g0, g1 in bounds:
        _, e, nz, row = chunk(g0, g1)
        emin.scatter_reduce_(0, row[nz], e[nz], "amin")
        emax.scatter_reduce_(0, row[nz], e[nz], "amax")
    if bool(((emax - emin) > 6).any()):
        return None
    base = emin.clamp(max=121)  # (empty rows: 121, unused)
    head = ng * CODED_GROUP_WORDS + 2 * nr
    tail = lay.parts + CODED_TRAILER
    pad = _coded_words(ng, lay) - head - tail
    out = torch.empty(head + pad + tail, dtype=torch.int32, device=dev)
    for g0, g1 in bounds:
        vals, e, nz, row = chunk(g0, g1)
        code = torch.where(nz, e - base[row] + 1, 0)
        lo = torch.where(nz, vals & 0xFF, 0)
        sign = torch.where(nz, vals >> 15, 0)
        w0 = (lo[:, :, :4] << sh8).sum(-1)
        w1 = (lo[:, :, 4:] << sh8).sum(-1)
        w2 = (code << (4 * torch.arange(GROUP, device=dev))).sum(-1) + (sign[:, :, :4] << (sh8 + 7)).sum(-1) \
            + (sign[:, :, 4:] << (sh8 + 3)).sum(-1)
        w3 = grp[g0:g1, LANES * GROUP // 2:].to(torch.int64) & 0xFFFFFFFF
        out[g0 * CODED_GROUP_WORDS: g1 * CODED_GROUP_WORDS] = _low32(torch.stack([w0, w1, w2, w3], -1).reshape(-1))
    lut = torch.cat([torch.zeros_like(base)[:, None], base[:, None] + torch.arange(7, device=dev)], 1)  # [nr, 8]
    out[ng * CODED_GROUP_WORDS: head] = _low32((lut.view(nr, 2, 4) << sh8).sum(-1).reshape(-1))
    out[head: head + pad] = 0
    out[head + pad:] = tail
    return out


#: groups :func:`code_values` codes (and :func:`uncode_values` decodes) at a time: some 60 bytes of int64 temporaries an
#: entry, about 250 MB at this many (1 << 16 until session 66: 1 GB above its input on a 28672 x 4096 weight, CPU)
CODE_CHUNK_GROUPS = 1 << 14


def _coded_words(ng: int, lay: Layout) -> int:
    """The length of coded ``data`` (:func:`code_values`) of ``ng`` groups in layout ``lay``: the groups, the row
    tables (two words a row rank), zeros up to a multiple of 160 words and the trailer of ``parts + 16`` words."""
    head = ng * CODED_GROUP_WORDS + 2 * (lay.mp // lay.parts)
    return head + (-head % GROUP_WORDS) + lay.parts + CODED_TRAILER


def _low32(words: torch.Tensor) -> torch.Tensor:
    """int64 words in 0 .. 2^32 - 1 as int32 (two's complement: their low 32 bits)"""
    return (words - ((words >> 31) << 32)).to(torch.int32)


def uncode_values(data: torch.Tensor, offsets: torch.Tensor, m: int) -> torch.Tensor:
    """The plain ``data`` of a weight whose values :func:`code_values` coded (the same bits), decoded
    :data:`CODE_CHUNK_GROUPS` groups at a time (:func:`_plain_groups`)."""
    lay = layout(m, offsets.numel(), data.numel())
    if not lay.coded:
        return data
    goff = offsets[: lay.slices + 1].to(torch.int64)
    ng = int(goff[-1])
    out = torch.empty(ng * GROUP_WORDS + _trailer(lay.parts), dtype=torch.int32, device=data.device)
    for g0 in range(0, ng, CODE_CHUNK_GROUPS):
        g1 = min(ng, g0 + CODE_CHUNK_GROUPS)
        out[g0 * GROUP_WORDS: g1 * GROUP_WORDS] = _plain_groups(data, goff, lay, g0, g1).reshape(-1)
    out[ng * GROUP_WORDS:] = lay.parts
    return out


def _plain_groups(data: torch.Tensor, goff: torch.Tensor, lay: Layout, g0: int, g1: int) -> torch.Tensor:
    """Groups ``g0 .. g1 - 1`` of a weight's ``data`` as plain groups, int32 ``[g1 - g0, GROUP_WORDS]`` (coded
    values decoded; ``goff``: the slices' first groups, int64; ``lay``: the weight's :class:`Layout`).  The int64
    temporaries grow with ``g1 - g0`` only (about 60 bytes an entry)."""
    if not lay.coded:
        return data[g0 * GROUP_WORDS: g1 * GROUP_WORDS].view(g1 - g0, GROUP_WORDS)
    dev = data.device
    ng, n = int(goff[-1]), g1 - g0
    q = data[g0 * CODED_GROUP_WORDS: g1 * CODED_GROUP_WORDS].to(torch.int64).view(n, LANES, 4) & 0xFFFFFFFF
    nr = lay.mp // lay.parts
    lutw = data[ng * CODED_GROUP_WORDS: ng * CODED_GROUP_WORDS + 2 * nr].to(torch.int64).view(nr, 2) & 0xFFFFFFFF
    lut = ((lutw[:, :, None] >> (8 * torch.arange(4, device=dev))) & 0xFF).reshape(nr, 8)
    sl = torch.searchsorted(goff, torch.arange(g0, g1, device=dev), right=True) - 1
    rank = (sl[:, None] * LANES + torch.arange(LANES, device=dev))[:, :, None].expand(n, LANES, GROUP)
    sh8 = 8 * torch.arange(4, device=dev)
    lo = torch.cat([(q[:, :, 0:1] >> sh8) & 0xFF, (q[:, :, 1:2] >> sh8) & 0xFF], -1)  # [n, 32, 8]
    code = (q[:, :, 2:3] >> (4 * torch.arange(GROUP, device=dev))) & 7
    sign = torch.cat([(q[:, :, 2:3] >> (sh8 + 7)) & 1, (q[:, :, 2:3] >> (sh8 + 3)) & 1], -1)
    vals = (sign << 15) | (lut[rank // lay.parts, code] << 8) | lo
    words = (vals[:, :, 0::2] | (vals[:, :, 1::2] << 16)).reshape(n, LANES * GROUP // 2)
    return _low32(torch.cat([words, q[:, :, 3]], 1))


def _trailer(p: int) -> int:
    """The words ``data`` ends with past its groups for ``p`` lanes a row (``p`` words holding ``p``; none for 1)."""
    return p if p > 1 else 0


def paired_halves(m: int, n_off: int, n_data: int) -> bool:
    """Whether a DeltaRows weight of ``m`` rows whose ``offsets`` has ``n_off`` words (``data`` ``n_data``) pairs its
    halves: rank ``r`` of the second half holds row ``perm[r] + m / 2`` (the up row of a merged gate / up weight
    beside its gate row; parts layout: lane ``l + 16`` of each slice beside lane ``l``), so its offsets end with one
    more word, ``m / 2``.  From sizes alone (no device sync)."""
    return layout(m, n_off, n_data).paired


#: the encoder lays out a run of slices at a time (:func:`_slice_runs`): at most about this many entries (its int64
#: temporaries take some 100 bytes an entry) and this many dense elements of the rows gathered for it.  Until session
#: 66 it laid out a whole weight at once, peaking near 10x the weight's dense bytes (a Llama-3-8B gate / up at 80 %:
#: 2.1 GB more for a 235 MB weight, on the CPU; the Engine's re-encoding of that model peaked 4.5 GiB above its weights)
#: (``FLASH_LLM_ENCODE_CHUNK_ENTRIES`` / ``FLASH_LLM_ENCODE_CHUNK_ELEMENTS`` override them, for measuring the build's
#: time against its memory: ``benchmarks/diag/build_time.py``)
_ENTRIES_SET = env_int("FLASH_LLM_ENCODE_CHUNK_ENTRIES", None, 1, means=1 << 22)  # (None: unset, blank or refused)
_ELEMENTS_SET = env_int("FLASH_LLM_ENCODE_CHUNK_ELEMENTS", None, 1, means=1 << 26)
ENCODE_CHUNK_ENTRIES = 1 << 22 if _ENTRIES_SET is None else _ENTRIES_SET
ENCODE_CHUNK_ELEMENTS = 1 << 26 if _ELEMENTS_SET is None else _ELEMENTS_SET
#: ... on a GPU, larger runs where its free memory allows (each run costs the encoder some 130 operations, each a
#: launch there; session 67, H100, OPT-30B at 80 %: its 288 encodes 7.0 -> 5.4 s, the build's peak +1.6 GiB,
#: ``benchmarks/diag/build_time.py``): as :func:`~flash_llm.formats._base.gpu_run_size` allows at about
#: ``ENCODE_ENTRY_BYTES`` an entry and ``ENCODE_ELEMENT_BYTES`` a gathered dense element, at most ``2^25`` entries and
#: ``2^29`` elements a run, never less than the constants above; not where either is set by its environment variable
ENCODE_ENTRY_BYTES = 100
ENCODE_ELEMENT_BYTES = 4
_ENCODE_FIXED = _ENTRIES_SET is not None or _ELEMENTS_SET is not None  # (a blank or refused value: as unset)


def _encode_budget(device: torch.device) -> tuple[int, int]:
    """``(entries, elements)``: the most of each a run of slices holds when encoding on ``device``
    (:data:`ENCODE_CHUNK_ENTRIES`, :data:`ENCODE_CHUNK_ELEMENTS`; on a GPU more where its free memory allows)."""
    return (gpu_run_size(device, ENCODE_CHUNK_ENTRIES, 1 << 25, ENCODE_ENTRY_BYTES, _ENCODE_FIXED),
            gpu_run_size(device, ENCODE_CHUNK_ELEMENTS, 1 << 29, ENCODE_ELEMENT_BYTES, _ENCODE_FIXED))


def _row_entries(w: torch.Tensor, escapes: bool = True) -> torch.Tensor:
    """Each row's entries, int64 ``[M]``: its nonzeros, plus (``escapes``) the escapes of its gaps (a row's first
    step counts from column 0); a run of rows at a time."""
    m, k = w.shape
    ent = torch.zeros(m, dtype=torch.int64, device=w.device)
    bits = w.view(torch.int16)
    # (a row count casts its mask to int64 on the CPU; on a GPU each run's nonzero() is a synchronization)
    step = max(1, (_encode_budget(w.device)[1] >> 2) // max(k, 1))
    for r0 in range(0, m, step):
        nz = _nonzero_mask(bits[r0: r0 + step])
        if not escapes:
            ent[r0: r0 + step] = nz.sum(1)
            continue
        rows, cols = nz.nonzero(as_tuple=True)
        del nz
        ent[r0: r0 + step].index_add_(0, rows, _escapes(_row_gaps(rows, cols)[1]) + 1)
    return ent


def _nonzero_mask(bits: torch.Tensor) -> torch.Tensor:
    """Which of the 16-bit value patterns ``bits`` (int16) are nonzeros: all but ``+0.0`` and ``-0.0``.  By bits, as
    the other formats decide: a float ``!= 0`` drops bf16 subnormals under ``torch.set_flush_denormal(True)``."""
    return (bits & 0x7FFF) != 0


def _row_gaps(rows: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(first, gap)`` of nonzeros in row-major order: whether each is its row's first, and the columns it steps from
    the one before it in its row (a row's first from column 0, so it may be 0)."""
    first = torch.ones(rows.numel(), dtype=torch.bool, device=rows.device)
    first[1:] = rows[1:] != rows[:-1]
    prev = torch.zeros_like(cols)
    prev[1:] = cols[:-1]
    prev[first] = 0
    return first, cols - prev


def _slice_runs(cost: torch.Tensor, rows_per_slice: int, k: int) -> list[tuple[int, int]]:
    """Runs of whole slices ``(s0, s1)`` covering ``cost.numel()`` slices, each of at most
    :data:`ENCODE_CHUNK_ENTRIES` entries (``cost``: each slice's) and :data:`ENCODE_CHUNK_ELEMENTS` dense elements
    (``rows_per_slice x k`` a slice; on a GPU up to :func:`_encode_budget`'s); a slice over either is a run of its
    own."""
    entries, elements = _encode_budget(cost.device)
    return _runs(cost.tolist(), entries, max(1, elements // max(1, rows_per_slice * k)))


def _runs(cost: list[int], budget: int, most: int | None = None) -> list[tuple[int, int]]:
    """Consecutive runs ``(s0, s1)`` covering ``len(cost)`` items, greedily as long as their costs sum to at most
    ``budget`` and (``most``) they hold at most that many items; an item over the budget is a run of its own."""
    out, s0, acc = [], 0, 0
    for j, c in enumerate(cost):
        if j > s0 and (acc + c > budget or (most is not None and j - s0 >= most)):
            out.append((s0, j))
            s0, acc = j, 0
        acc += c
    if cost:
        out.append((s0, len(cost)))
    return out


def _gather_rows(w: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``w``'s rows ``rows`` (``-1``: a row of zeros), ``[len(rows), K]``."""
    out = w[rows.clamp(min=0)]
    out[rows < 0] = 0
    return out


def _streams(w: torch.Tensor, pair: bool = False):
    """The split layout's streams, a run of slices at a time: ``(perm, runs)``, ``perm`` int64 ``[Mp]`` (each rank's
    row, ``-1`` for padding) and ``runs`` yielding ``(s0, s1, streams)`` for each run of slices (:func:`_slice_runs`),
    ``streams`` its ranks' values int16 and steps uint8 ``[32 (s1 - s0), L]`` (``L`` = 8 x the most groups of a slice of
    the run), groups per slice int64, entries per rank and its nonzeros. Rows are ranked by their entries (descending,
    stable). ``pair``: rows ``r`` and ``r + M / 2`` ranked together (by their summed entries), the second half's ranks
    ``M / 2`` after the first's."""
    m, k = w.shape
    dev = w.device
    ent = _row_entries(w)
    if pair:  # gate rows by entries, then each run of PAIR_BUCKET of them by their up rows' entries: both halves'
        h = m // 2  # slices then hold rows of nearly one length (random 80 %: 0.9 % padding, against 5 % by the sum)
        by_gate = torch.sort(ent[:h], descending=True, stable=True).indices
        up = ent[h:][by_gate]
        key = (torch.arange(h, device=dev) // PAIR_BUCKET * (int(up.max()) + 1 if h else 1)
               + (up.max() - up if h else up))
        half = by_gate[torch.sort(key, stable=True).indices]
        perm = torch.cat([half, half + h])
    else:
        perm = torch.sort(ent, descending=True, stable=True).indices
    slices = ceil_div(m, LANES)
    mp = slices * LANES
    perm_full = torch.full((mp,), -1, dtype=torch.int64, device=dev)
    perm_full[:m] = perm
    cost = torch.zeros(mp, dtype=torch.int64, device=dev)
    cost[:m] = ent[perm]
    runs = _slice_runs(cost.view(slices, LANES).sum(1), LANES, k)

    def lay(s0: int, s1: int):
        # (its rows in rank order, as 16-bit patterns: a row's lane is its index)
        wc = _gather_rows(w.view(torch.int16), perm_full[s0 * LANES: s1 * LANES])
        rows, cols = _nonzero_mask(wc).nonzero(as_tuple=True)
        vals = wc[rows, cols]
        del wc
        first, gap = _row_gaps(rows, cols)
        del cols
        return (*_lay_streams(rows, first, vals, gap, _escapes(gap), (s1 - s0) * LANES), rows.numel())

    return perm_full, ((s0, s1, lay(s0, s1)) for s0, s1 in runs)


def _parts_streams(w: torch.Tensor, parts: int, pair: bool = False):
    """The parts layout's streams (``parts`` lanes a row), a run of slices at a time: ``(perm, runs)``, ``perm`` int64
    ``[Mp]`` (each lane's row) and ``runs`` yielding, for each run of slices, as :func:`_streams`' and each lane's start
    column int64 ``[32 (s1 - s0)]`` after them. Rows are ranked by their nonzeros (descending, stable; paired: gate rows
    by gate + up nonzeros, each slice's lanes 16-31 their up rows); each row's nonzeros are cut into ``parts`` runs of
    equal stream length (escapes counted), each walked from its first column."""
    m, k = w.shape
    dev = w.device
    r_slice = LANES // parts  # rows a slice
    cnt = _row_entries(w, escapes=False)
    if pair:
        h, hs = m // 2, r_slice // 2
        order = torch.sort(cnt[:h] + cnt[h:], descending=True, stable=True).indices
        slices = ceil_div(h, hs)
        gate = torch.full((slices * hs,), -1, dtype=torch.int64, device=dev)
        gate[:h] = order
        gate = gate.view(slices, hs)
        rows = torch.cat([gate, torch.where(gate >= 0, gate + h, gate)], 1).reshape(-1)
    else:
        slices = ceil_div(m, r_slice)
        rows = torch.full((slices * r_slice,), -1, dtype=torch.int64, device=dev)
        rows[:m] = torch.sort(cnt, descending=True, stable=True).indices
    cost = torch.where(rows >= 0, cnt[rows.clamp(min=0)], 0).view(slices, r_slice).sum(1) if m else \
        torch.zeros(slices, dtype=torch.int64, device=dev)
    runs = _slice_runs(cost, r_slice, k)

    def lay(s0: int, s1: int):
        wc = _gather_rows(w.view(torch.int16), rows[s0 * r_slice: s1 * r_slice])  # (a row's slot is its index)
        r, c = _nonzero_mask(wc).nonzero(as_tuple=True)  # row-major: each row's columns rise
        vals = wc[r, c]
        del wc
        nnz = r.numel()
        # each nonzero's part: where the row's stream before it (escapes from the row's own gaps) falls among P shares
        rfirst = torch.ones(nnz, dtype=torch.bool, device=dev)
        rfirst[1:] = r[1:] != r[:-1]
        rgap = c.clone()
        rgap[1:] -= c[:-1]
        rgap[rfirst] = 0
        rspan = 1 + _escapes(rgap)
        before = torch.cumsum(rspan, 0) - rspan
        nr = (s1 - s0) * r_slice
        rbase = torch.zeros(nr, dtype=torch.int64, device=dev)
        rbase[r[rfirst]] = before[rfirst]
        rtotal = torch.zeros(nr, dtype=torch.int64, device=dev).index_add_(0, r, rspan)
        before -= rbase[r]
        del rgap, rspan, rbase, rfirst
        lane_of = r * parts + before * parts // rtotal[r].clamp(min=1)
        del before, r
        order = torch.sort(lane_of, stable=True).indices  # (a lane's entries keep their rising columns)
        lg, cc, vv = lane_of[order], c[order], vals[order]
        del lane_of, c, vals, order
        nl = (s1 - s0) * LANES
        first = torch.ones(nnz, dtype=torch.bool, device=dev)
        first[1:] = lg[1:] != lg[:-1]
        prev = torch.empty_like(cc)
        prev[1:] = cc[:-1]
        prev[first] = cc[first]  # a lane's first step is 0, from its start column
        starts = torch.zeros(nl, dtype=torch.int64, device=dev)
        starts[lg[first]] = cc[first]
        gap = cc - prev
        del prev
        return (*_lay_streams(lg, first, vv, gap, _escapes(gap), nl), nnz, starts)

    return rows.repeat_interleave(parts), ((s0, s1, lay(s0, s1)) for s0, s1 in runs)


def default_parts(m: int, k: int, nnz: int, device: torch.device | str | None = None) -> int:
    """The lanes a row the encoder gives an ``[m, k]`` weight of ``nnz`` nonzeros when ``parts`` is not given:
    :data:`PARTS_ENV` (``FLASH_LLM_DELTA_PARTS``; 1 unless set, 1 where ``K % 8 != 0``), or :func:`auto_parts`."""
    if PARTS_ENV == "auto":
        return auto_parts(m, k, nnz, device)
    p = int(PARTS_ENV) if PARTS_ENV.isdigit() else 0
    if p not in PARTS:
        raise ValueError(f"FLASH_LLM_DELTA_PARTS must be auto or one of {PARTS}, got {PARTS_ENV!r}")
    return p if p == 1 or k % 8 == 0 else 1


def auto_parts(m: int, k: int, nnz: int, device: torch.device | str | None = None, normed: bool = True) -> int:
    """The lanes a row for an ``[m, k]`` weight of ``nnz`` nonzeros by session 30's measurements: 1 (the split
    layout) above :data:`PARTS_MAX_K` columns (:data:`PARTS_MAX_K_PLAIN` where the layer's input comes from no norm:
    ``normed=False``) or with ``K % 8 != 0``; else the fewest of 2, 4, 8, 16 whose slices reach :data:`PARTS_SHARE` of
    :func:`target_warps` (16 at most), fewer while a part would hold under :data:`PARTS_MIN_ENTRIES` entries (1 when
    even 2 parts would)."""
    if k % 8 or k > (PARTS_MAX_K if normed else max(PARTS_MAX_K, PARTS_MAX_K_PLAIN)) or m == 0:
        return 1
    want = PARTS_SHARE * target_warps(device)
    p = next((p for p in PARTS[1:] if ceil_div(m * p, LANES) >= want), PARTS[-1])
    per_row = nnz / m
    while p > 1 and per_row / p < PARTS_MIN_ENTRIES:
        p //= 2
    return p


def _escapes(gap: torch.Tensor) -> torch.Tensor:
    """The escape entries (value 0, step :data:`MAX_STEP`) a step of ``gap`` columns needs before its entry."""
    return torch.where(gap > MAX_STEP, torch.div(gap - 1, MAX_STEP, rounding_mode="floor"), torch.zeros_like(gap))


def _lay_streams(lane: torch.Tensor, first: torch.Tensor, vals: torch.Tensor, gap: torch.Tensor, esc: torch.Tensor,
                 lanes: int):
    """The streams of ``lanes`` lanes (:data:`LANES` a slice) from their nonzeros, each lane's together and in column
    order: ``lane`` int64, ``first`` (a lane's first nonzero), value bits ``vals`` int16, ``gap`` (the columns stepped
    to it) and ``esc`` (its escapes, ``gap > MAX_STEP``).  Returns values int16 and steps uint8 ``[lanes, L]`` (each
    nonzero after its escapes of step 15; pads of step 0 to the slice's whole groups), groups per slice and entries
    per lane (int64)."""
    dev = lane.device
    span = esc + 1
    ent = torch.zeros(lanes, dtype=torch.int64, device=dev).index_add_(0, lane, span)
    groups = (ent.view(-1, LANES).amax(1) + GROUP - 1) // GROUP
    length = int(groups.max()) * GROUP if groups.numel() else 0
    csum = torch.cumsum(span, 0) - span
    base = torch.zeros(lanes, dtype=torch.int64, device=dev)
    base[lane[first]] = csum[first]
    pos = csum - base[lane] + esc  # the entry's place in its lane's stream, after its escapes
    vals2 = torch.zeros(lanes, length, dtype=torch.int16, device=dev)
    steps2 = torch.zeros(lanes, length, dtype=torch.uint8, device=dev)
    vals2[lane, pos] = vals
    steps2[lane, pos] = (gap - MAX_STEP * esc).to(torch.uint8)
    n_esc = int(esc.sum())
    if n_esc:
        owner = torch.repeat_interleave(torch.arange(lane.numel(), device=dev), esc, output_size=n_esc)
        j = torch.arange(n_esc, device=dev) - torch.repeat_interleave(torch.cumsum(esc, 0) - esc, esc,
                                                                      output_size=n_esc)
        steps2[lane[owner], pos[owner] - esc[owner] + j] = MAX_STEP
    return vals2, steps2, groups, ent


def _groups(vals: torch.Tensor, steps: torch.Tensor, groups: torch.Tensor):
    """The streams ``[slices x 32, L]`` packed as groups (``data`` int32, slice after slice, each slice's first
    ``groups`` of them) and each slice's first group ``goff`` int64 ``[slices + 1]``."""
    slices = groups.numel()
    dev = vals.device
    gmax = vals.shape[1] // GROUP
    v = vals.view(slices, LANES, gmax, GROUP).permute(0, 2, 1, 3).reshape(slices, gmax, LANES * GROUP)
    v = v.contiguous().view(torch.int32)  # [slices, G, 128]
    sh = 4 * torch.arange(GROUP, device=dev, dtype=torch.int64)
    d = (steps.view(slices, LANES, gmax, GROUP).to(torch.int64) << sh).sum(3)  # [slices, 32, G]
    d = torch.where(d >= 1 << 31, d - (1 << 32), d).to(torch.int32).permute(0, 2, 1)  # [slices, G, 32]
    keep = torch.arange(gmax, device=dev)[None, :] < groups[:, None]
    data = torch.cat([v, d], 2)[keep].reshape(-1).contiguous()
    goff = torch.zeros(slices + 1, dtype=torch.int64, device=dev)
    goff[1:] = torch.cumsum(groups, 0)
    return data, goff


def _windows(gend: torch.Tensor, groups: torch.Tensor, splits: int, ent: torch.Tensor):
    """Per (slice, split): each lane's start column ``[slices, S, 32]`` and the window ``(a0, w)`` ``[slices, S, 2]``,
    from ``gend`` ``[32 slices, G]``, each lane's column after each of its groups (splits start at whole groups).
    Lanes without entries (empty rows, padding ranks) take the window's first column, so they do not widen it."""
    slices = groups.numel()
    dev = groups.device
    length = gend.shape[1]
    cp = gend.view(slices, LANES, length)
    s_idx = torch.arange(splits + 1, device=dev)
    bounds = (s_idx[None, :] * groups[:, None]) // splits * GROUP  # [slices, S + 1]: first entry of each split
    t0, t1 = bounds[:, :-1], bounds[:, 1:]

    def col_before(t):  # the column after entry t - 1 (0 before the first), [slices, S, 32]; t: whole groups
        idx = (t // GROUP - 1).clamp(min=0)[:, None, :].expand(slices, LANES, splits)
        c = torch.gather(cp, 2, idx).permute(0, 2, 1) if length else torch.zeros(
            slices, splits, LANES, dtype=gend.dtype, device=dev)
        return torch.where((t > 0)[:, :, None], c, torch.zeros_like(c))

    start = col_before(t0)
    last = col_before(t1)  # the column of each lane's last entry of the split (its start when the split is empty)
    live = (ent.view(slices, LANES) > 0)[:, None, :]  # [slices, 1, 32]
    big = torch.iinfo(start.dtype).max
    lo = torch.where(live, start, torch.full_like(start, big)).amin(2)
    lo = torch.where(lo == big, torch.zeros_like(lo), lo)  # a slice without entries: column 0
    hi = torch.where(live, last, torch.zeros_like(last)).amax(2)
    start = torch.where(live, start, lo[:, :, None])
    a0 = lo // 8 * 8
    w = (torch.maximum(hi, lo) + 1 - a0 + 7) // 8 * 8
    return start, torch.stack([a0, w], 2)


def block_window_max(win: torch.Tensor, block: int = BLOCK_SLICES) -> int:
    """The widest X window the N = 1 kernel stages: the union of the windows of ``block`` consecutive slices (a
    block's warps) for one split, over ``win [slices, S, 2]`` (``(a0, w)`` per slice and split)."""
    slices, s, _ = win.shape
    if slices == 0:
        return 0
    pad = -slices % block  # (the kernel's warps past the last slice repeat it)
    lo = torch.cat([win[..., 0], win[-1:, :, 0].expand(pad, s)]).view(-1, block, s).amin(1)
    hi = (win[..., 0] + win[..., 1])
    hi = torch.cat([hi, hi[-1:].expand(pad, s)]).view(-1, block, s).amax(1)
    return int((hi - lo).max())


def target_warps(device: torch.device | str | None = None) -> int:
    """The warps (slices x splits) the encoder's split counts aim at: ``FLASH_LLM_DELTA_BLOCKS`` when set; on a CUDA
    device, :data:`WAVE_SHARE` of one wave of the N = 1 kernel there (its resident blocks per SM x SMs x 4 warps: 3590
    on a 132-SM H200, so a GPU with fewer SMs or less shared memory per SM does not get a second wave); else (encoding
    on the CPU, or the kernels unavailable) :data:`TARGET_BLOCKS`."""
    if BLOCKS_OVERRIDE:  # (a bad or blank setting warned at import and is no override)
        return BLOCKS_OVERRIDE
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        try:
            from .. import kernels

            index = device.index if device.index is not None else torch.cuda.current_device()
            per_sm = kernels.blocks_per_sm("delta_rows_spmm_f16_n1", index, 32 * kernels.DR_WARPS)
            return max(1, int(WAVE_SHARE * per_sm * kernels.sm_count(index) * kernels.DR_WARPS))
        except Exception:  # (no driver / NVRTC, an unsupported GPU: the default below)
            pass
    return TARGET_BLOCKS


#: the most K-splits a DeltaRows weight may have: every kernel launches the splits as its grid's y dimension (CUDA's
#: limit; the encoder's own choice stays near the groups a slice, at most some 8192)
MAX_SPLITS = 65535


def default_splits(m: int, max_groups: int, device: torch.device | str | None = None) -> int:
    """The split count the encoder starts from: about :func:`target_warps` warps for ``device`` (where the weight is
    encoded), at least 2 groups a split where the slices allow it."""
    slices = ceil_div(m, LANES)
    return int(max(1, min(round(target_warps(device) / slices), max(1, max_groups // 2), 4096)))


class DeltaRows(SparseFormat):
    """An ``[M, K]`` fp16/bf16 weight as rows of (16-bit value, 4-bit column step) entries, 32 rows a warp.

    Built for the N = 1 product (decode at batch 1): a lane walks one row (or one of its ``parts``) and keeps its sum
    in a register.  ``K`` must be below 65536.  The split count (``splits``) and the lanes a row (``parts``) are fixed
    when encoding; :meth:`resplit` re-encodes.
    """

    FORMAT_NAME = "flash_llm.delta_rows"
    FORMAT_VERSION = 2
    READ_VERSIONS = (1, 2)
    TILE_ROWS = LANES
    _UNIT_WORDS = GROUP_WORDS

    @classmethod
    def from_dense(cls, w: torch.Tensor, *, dtype: torch.dtype | None = None, splits: int | None = None,
                   pair_halves: bool = False, parts: int | None = None) -> "DeltaRows":
        """Compress a dense ``[M, K]`` weight (zeros, including -0.0, are dropped), on ``w``'s device.

        ``parts``: the lanes a row (1, 2, 4, 8 or 16; more than 1: the parts layout, one split, ``K % 8 == 0``).
        Default: 1 when ``splits`` is given, else :func:`default_parts`.  ``splits`` (the split layout): the K-splits
        of the N = 1 kernel (default: :func:`default_splits` for ``w``'s device, raised until every block's X window
        fits :data:`WINDOW_MAX` columns where possible: :func:`block_window_max`).  ``pair_halves``: a merged gate / up
        weight (``M / 2`` a multiple of 32), its rows ``r`` and ``r + M / 2`` kept in matching lanes, so the kernel can
        apply ``silu(gate) * up`` (:func:`paired_halves`)."""
        w = check_dense_weight(w, dtype)
        m, k = w.shape
        if k >= MAX_K:
            raise ValueError(f"w has K = {k} columns; DeltaRows stores 16-bit columns (K < {MAX_K})")
        if splits is not None and (not isinstance(splits, int) or isinstance(splits, bool) or splits < 1
                                   or splits > MAX_SPLITS):
            raise ValueError(f"splits must be an int in [1, {MAX_SPLITS}] (the kernels' grid y), got {splits!r}")
        if parts is not None and (not isinstance(parts, int) or isinstance(parts, bool) or parts not in PARTS):
            raise ValueError(f"parts must be one of {PARTS}, got {parts!r}")
        if parts is not None and parts > 1 and (k % 8 or (splits or 1) != 1):
            raise ValueError(f"parts={parts} (the parts layout) needs K % 8 == 0 and one split; got K = {k}, "
                             f"splits={splits}")
        if pair_halves and (m % (2 * LANES)):
            raise ValueError(f"pair_halves needs M a multiple of {2 * LANES} (two halves of whole slices), got {m}")
        if parts is None:
            parts = 1 if splits is not None else default_parts(m, k, count_nonzero(w), w.device)
        dev = w.device
        if parts > 1:
            perm, runs = _parts_streams(w, parts, pair_halves)
            data, groups, start, nnz = [], [], [], 0
            for _, _, (vals, steps, g, _, n, st) in runs:
                data.append(_groups(vals, steps, g)[0])
                groups.append(g)
                start.append(st)
                nnz += n
                del vals, steps
            groups = torch.cat(groups) if groups else torch.zeros(0, dtype=torch.int64, device=dev)
            start = (torch.cat(start) if start else torch.zeros(0, dtype=torch.int64, device=dev)).view(-1, 1, LANES)
            win = torch.zeros(groups.numel(), 1, 2, dtype=torch.int64, device=dev)
            win[..., 1] = ceil_div(max(k, 1), 8) * 8
            return cls._pack(data, groups, perm, start, win, (m, k), w.dtype, nnz, pair_halves, parts)
        perm, runs = _streams(w, pair_halves)
        # per run: its packed groups, and what the windows need (each lane's column after each group, its entries)
        data, groups, ends, nnz = [], [], [], 0
        for _, _, (vals, steps, g, ent, n) in runs:
            data.append(_groups(vals, steps, g)[0])
            groups.append(g)
            ends.append((torch.cumsum(steps.to(torch.int32), 1)[:, GROUP - 1::GROUP].contiguous(), ent))
            nnz += n
            del vals, steps
        groups = torch.cat(groups) if groups else torch.zeros(0, dtype=torch.int64, device=dev)
        gmax = int(groups.max()) if groups.numel() else 0
        # the runs' group-end columns joined (0.5 bytes an entry; each row padded to the longest row's groups, which
        # _windows never reads: at most a quarter of the dense weight's bytes), so each split count tried is one
        # _windows over the weight, not one a run (on a GPU each of its some 50 operations is a launch: 18 runs of
        # OPT-66B's fc1 and three tries took 2900 of them)
        gend = torch.zeros(groups.numel() * LANES, gmax, dtype=torch.int32, device=dev)
        ent, r0 = torch.zeros(groups.numel() * LANES, dtype=torch.int64, device=dev), 0
        for e, n in ends:
            gend[r0:r0 + e.shape[0], :e.shape[1]] = e
            ent[r0:r0 + e.shape[0]] = n
            r0 += e.shape[0]
        del ends

        def windows(splits: int):
            return _windows(gend, groups, splits, ent)

        s = splits or default_splits(m, gmax, w.device)
        start, win = windows(s)
        while splits is None and s < max(1, gmax) and block_window_max(win) > WINDOW_MAX:
            s = min(max(1, gmax), ceil_div(s * 3, 2))
            start, win = windows(s)
        return cls._pack(data, groups, perm, start, win, (m, k), w.dtype, nnz, pair_halves)

    @classmethod
    def _pack(cls, data, groups, perm, start, win, shape, dtype, nnz, pair=False, parts=1) -> "DeltaRows":
        """The weight from its runs' packed groups (``data``: a list of int32 arrays, :func:`_groups`), the groups
        per slice, ``perm``, the starts and windows."""
        dev = perm.device
        data = torch.cat(data) if data else torch.zeros(0, dtype=torch.int32, device=dev)
        goff = torch.zeros(groups.numel() + 1, dtype=torch.int64, device=dev)
        goff[1:] = torch.cumsum(groups, 0)
        if parts > 1:  # the trailer that gives P from the sizes
            data = torch.cat([data, torch.full((_trailer(parts),), parts, dtype=torch.int32, device=dev)])
        st = start.to(torch.int32).to(torch.int16).reshape(-1).view(torch.int32)
        tail = [torch.tensor([shape[0] // 2], dtype=torch.int32, device=dev)] if pair else []
        offsets = torch.cat([goff.to(torch.int32), win.to(torch.int32).reshape(-1), st, perm.to(torch.int32)] + tail)
        return cls._from_parts({"data": data, "offsets": offsets.contiguous()}, shape, dtype, nnz)

    @classmethod
    def zeros(cls, m: int, k: int, dtype: torch.dtype = torch.float16, device="cpu") -> "DeltaRows":
        """The all-zero ``[m, k]`` weight (one split, no groups), built without a dense matrix (``device="meta"``
        allocates nothing)."""
        check_shape_args(m, k, dtype)
        if k >= MAX_K:
            raise ValueError(f"K = {k} does not fit DeltaRows' 16-bit columns (K < {MAX_K})")
        slices = ceil_div(m, LANES)
        mp = slices * LANES
        win = torch.zeros(slices, 2, dtype=torch.int32, device=device)
        win[:, 1] = 8
        perm = torch.full((mp,), -1, dtype=torch.int32, device=device)
        perm[:m] = torch.arange(m, dtype=torch.int32, device=device)
        offsets = torch.cat([torch.zeros(slices + 1, dtype=torch.int32, device=device), win.reshape(-1),
                             torch.zeros(16 * slices, dtype=torch.int32, device=device), perm])
        return cls._from_parts({"data": torch.zeros(0, dtype=torch.int32, device=device), "offsets": offsets},
                               (m, k), dtype, 0)

    # ---- structure ----------------------------------------------------------------------------------------
    @property
    def layout(self) -> Layout:
        return layout(self.shape[0], self.offsets.numel(), self.data.numel())

    @property
    def splits(self) -> int:
        return self.layout.splits

    @property
    def parts(self) -> int:
        """Lanes a row: 1 (the split layout) or 2, 4, 8, 16 (the parts layout)."""
        return self.layout.parts

    @property
    def paired(self) -> bool:
        """Whether the halves are paired (:func:`paired_halves`)."""
        return self.layout.paired

    @property
    def coded(self) -> bool:
        """Whether the values are coded (:meth:`code_values`)."""
        return self.layout.coded

    def code_values(self) -> "DeltaRows | None":
        """This weight with its values coded (:func:`code_values`: 2 bytes an entry instead of 2.5, the same bits;
        the N = 1 kernels read it, other token counts expand it), or None where that is not possible: not bf16, or a
        lane whose nonzero exponents span more than 7.  In memory only: :meth:`state` writes the plain values.  On the
        meta device: ValueError (no values to code)."""
        if self.dtype != torch.bfloat16 or self.coded:
            return self if self.coded else None
        self._needs_values("code_values")
        data = code_values(self.data, self.offsets, self.shape[0])
        if data is None:
            return None
        return type(self)._from_parts({"data": data, "offsets": self.offsets}, self.shape, self.dtype, self.nnz)

    def state(self, prefix: str = ""):
        if not self.coded:
            return super().state(prefix)
        # (the plain length is not in the coded sizes: the coded groups are padded to whole plain ones)
        self._needs_values("state", "the coded weight")
        plain = type(self)._from_parts({"data": uncode_values(self.data, self.offsets, self.shape[0]),
                                        "offsets": self.offsets}, self.shape, self.dtype, self.nnz)
        return plain.state(prefix)

    def resplit(self, splits: int, parts: int = 1) -> "DeltaRows":
        """The same weight encoded for ``splits`` K-splits (``parts`` > 1: the parts layout, ``splits`` 1).  On the
        meta device: ValueError (no values to encode)."""
        self._needs_values("resplit")
        return type(self).from_dense(self.to_dense(), splits=splits, pair_halves=self.paired, parts=parts)

    def l2_streams(self):
        """``offsets`` and a coded weight's row tables are the head; each (slice, split)'s groups are a walk (its
        warp reads them in order).  Reads ``offsets``' slice starts to the host (on the meta device: ValueError)."""
        self._needs_values("l2_streams")
        lay = self.layout
        gw = CODED_GROUP_WORDS if lay.coded else GROUP_WORDS
        head = [(self.offsets, 0, self.offsets.numel() * 4)]
        if not lay.slices:
            return head, [(self.data, 0, self.data.numel() * 4)]
        goff = self.offsets[: lay.slices + 1].to(torch.int64).cpu().tolist()
        if self.data.numel() * 4 > goff[-1] * gw * 4:  # the coded row tables and the trailer
            head.append((self.data, goff[-1] * gw * 4, self.data.numel() * 4))
        s = max(lay.splits, 1)
        walks = []
        for i in range(lay.slices):
            g0, n = goff[i], goff[i + 1] - goff[i]
            for j in range(s):
                a, b = g0 + j * n // s, g0 + (j + 1) * n // s
                if b > a:
                    walks.append((self.data, a * gw * 4, b * gw * 4))
        return head, walks

    def _offset_arrays(self):
        """(goff int64, win [slices, S, 2], starts [slices, S, 32] int64, perm int64: each lane's row)."""
        lay = self.layout
        return _split_offsets(self.offsets, lay.slices, lay.mp, lay.splits)

    def entries(self):
        """Every stored entry: ``(rank, value bits int16, column int64)`` in storage order (pads and escapes
        included), each column from its split's start.  On the meta device: ValueError (no values to read)."""
        self._needs_values("entries")
        return _entries(self.data, self.offsets, self.shape[0])[:3]

    def to_dense(self) -> torch.Tensor:
        """The dense ``[M, K]`` weight, decoded a run of slices at a time (:data:`ENTRY_CHUNK_GROUPS` groups: the
        peak is the output and about 200 MB, whatever the weight's size; on a GPU :func:`_entry_groups`)."""
        if (meta := self._meta_dense()) is not None:
            return meta
        m, k = self.shape
        goff, _, _, perm = self._offset_arrays()
        out = torch.zeros(m * k, dtype=torch.int16, device=self.data.device)
        for s0, s1 in _slice_chunks(goff, _entry_groups(self.data.device)):
            rank, vals, cols, _ = _entries(self.data, self.offsets, m, s0, s1)
            row = perm[rank]
            keep = _nonzero_mask(vals) & (row >= 0)
            out[row[keep] * k + cols[keep]] = vals[keep]
            del rank, vals, cols, row, keep
        return out.view(m, k).view(self.dtype)

    # ---- merging and slicing: through the dense weight (row order and splits are per weight) ------------------
    def slice(self, rows=None, cols=None) -> "DeltaRows":
        m, k = self.shape
        r0, r1, c0, c1 = self._slice_bounds(rows, cols)
        if (r0, r1, c0, c1) == (0, m, 0, k):
            return self
        return type(self).from_dense(self.to_dense()[r0:r1, c0:c1].contiguous())

    @classmethod
    def concat(cls, parts, pair_halves: bool = False) -> "DeltaRows":
        """The parts stacked along M (through the dense weight).  ``pair_halves`` (two parts of equal rows, a
        multiple of 32 each): encoded with paired halves, for ``silu(gate) * up`` inside the kernel."""
        parts = cls._check_parts(parts)
        first = parts[0]
        pair = pair_halves and len(parts) == 2 and parts[0].shape[0] == parts[1].shape[0] \
            and parts[0].shape[0] % LANES == 0
        if len(parts) == 1 and not pair:
            return first
        # (each part decoded into its rows of the stack: the peak is the stack, not the stack and every part)
        w = torch.empty(sum(p.shape[0] for p in parts), first.shape[1], dtype=first.dtype, device=first.data.device)
        r = 0
        for p in parts:
            w[r: r + p.shape[0]] = p.to_dense()
            r += p.shape[0]
        return cls.from_dense(w, pair_halves=pair)

    # ---- validation --------------------------------------------------------------------------------------
    @classmethod
    def arrays_fit(cls, m: int, k: int, n_offsets: int, n_data: int, *, version: int | None = None) -> str | None:
        """:meth:`SparseFormat.arrays_fit`; for a file's arrays (``version`` given) also what :meth:`_validate`
        refuses from the lengths alone: coded values' lengths (a file holds plain values) and, in a version-1 file,
        the parts layout (version 2's)."""
        if k >= MAX_K:
            return f"K = {k} does not fit DeltaRows' 16-bit columns"
        lay = layout(m, n_offsets, n_data)
        if lay.parts not in PARTS or lay.splits < 1:
            return (f"offsets of {n_offsets} and data of {n_data} words are no layout of {m} rows (lanes a row, "
                    f"slices and splits)")
        if lay.splits > MAX_SPLITS:
            return f"offsets of {n_offsets} words hold {lay.splits} splits; the kernels take at most {MAX_SPLITS}"
        if lay.parts > 1 and k % 8:
            return f"the parts layout ({lay.parts} lanes a row) needs K % 8 == 0, got K = {k}"
        if version is not None and lay.coded:
            return (f"data of {n_data} words has the length of coded values ({lay.parts + CODED_TRAILER} words past "
                    f"whole groups of {GROUP_WORDS}), which a file never holds (it stores plain values)")
        if version == 1 and lay.parts > 1:
            return (f"data of {n_data} words is in the parts layout ({lay.parts} lanes a row), which format version 2 "
                    f"added: a format version 1 file holds the split layout only (1 lane a row)")
        return None

    @classmethod
    def _nnz_range(cls, m: int, k: int, records: int, n_data: int) -> tuple[int, int]:
        """:meth:`SparseFormat._nnz_range`: a group of :data:`GROUP_WORDS` words holds ``LANES x GROUP`` entries, a
        nonzero at most one of them (and an entry may be a column step's escape or a lane's padding: no lower bound
        but 0) (session 88)."""
        return 0, min(m * k, n_data // GROUP_WORDS * LANES * GROUP)

    @classmethod
    def _validate(cls, arrays, shape, prefix, where, version=None) -> int:
        m, k = shape
        data, offsets = arrays["data"], arrays["offsets"]
        label = prefix[:-1] if prefix.endswith(".") else (prefix or "weight")
        if k >= MAX_K:
            raise FormatError(f"{where}'{label}': K = {k} does not fit DeltaRows' 16-bit columns")
        lay = layout(m, offsets.numel(), data.numel())
        p, slices, mp, s = lay.parts, lay.slices, lay.mp, lay.splits
        ok_p = p in PARTS and (version != 1 or p == 1)
        if not ok_p or s < 1:
            # data's length names another layout than the offsets' length fits: data was cut or grown
            fits = [q for q in (PARTS if version != 1 else (1,)) if layout(m, offsets.numel(), _trailer(q)).splits]
            if len(fits) == 1 and fits[0] != p:
                q = fits[0]
                sl = layout(m, offsets.numel(), _trailer(q)).slices
                want = int(offsets[sl]) * GROUP_WORDS + _trailer(q)
                raise FormatError(f"{where}tensor '{prefix}data' has {data.numel()} words; the offsets describe "
                                  f"{want} (truncated or inconsistent): "
                                  + (f"{want - q} in groups of {GROUP_WORDS} and the parts trailer of {q} words "
                                     f"({q} lanes a row)" if q > 1 else f"groups of {GROUP_WORDS}"))
        if not ok_p:
            raise FormatError(f"{where}tensor '{prefix}data' has {data.numel()} words, {data.numel() % GROUP_WORDS} "
                              f"past whole groups of {GROUP_WORDS}: not a lane count a row of "
                              f"{PARTS if version != 1 else (1,)} (format version {version or cls.FORMAT_VERSION})")
        if p > 1 and k % 8:
            raise FormatError(f"{where}'{label}': the parts layout ({p} lanes a row) needs K % 8 == 0, got K = {k}")
        if s < 1:
            raise FormatError(f"{where}tensor '{prefix}offsets' has {offsets.numel()} entries, which is not "
                              f"{slices + 1} + 18 x {slices} x S + {mp} for any split count S >= 1 (a {m}x{k} "
                              f"matrix has {slices} slices of {LANES // p} rows{'' if p == 1 else ', one split'})")
        if s > MAX_SPLITS:
            raise FormatError(f"{where}tensor '{prefix}offsets' has {offsets.numel()} entries: {s} splits, more than "
                              f"the {MAX_SPLITS} the kernels take")
        goff, win, starts, perm = _split_offsets(offsets, slices, mp, s)
        if int(goff[0]) != 0 or bool((goff[1:] < goff[:-1]).any()):
            raise FormatError(f"{where}tensor '{prefix}offsets': the slices' group offsets do not start at 0 and "
                              "rise")
        # a weight's arrays in memory (no file version) may hold coded values: read as they are (the reads below
        # decode through _plain_groups); a file's are plain (state() writes them so)
        coded = lay.coded and version is None
        ng = int(goff[-1])
        if coded and _coded_words(ng, lay) != data.numel():
            raise FormatError(f"{where}tensor '{prefix}data' has {data.numel()} words; the offsets describe "
                              f"{_coded_words(ng, lay)} of coded values (truncated or inconsistent), {ng} groups of "
                              f"{CODED_GROUP_WORDS}, the row tables and the trailer of {p + CODED_TRAILER} words")
        if not coded and ng * GROUP_WORDS != data.numel() - _trailer(p):
            raise FormatError(f"{where}tensor '{prefix}data' has {data.numel()} words; the offsets describe "
                              f"{ng * GROUP_WORDS} (truncated or inconsistent), {ng} groups "
                              f"of {GROUP_WORDS}" + (f" and the {p} words of the parts trailer" if p > 1 else ""))
        tail = p + CODED_TRAILER if coded else _trailer(p)
        if tail and bool((data[data.numel() - tail:] != tail).any()):
            what = "coded values'" if coded else "parts"
            raise FormatError(f"{where}tensor '{prefix}data': the {what} trailer does not hold {tail}")
        lanes = perm.view(-1, p)  # each row's P lanes
        valid = lanes[:, 0][lanes[:, 0] >= 0]
        if bool((perm < -1).any()) or bool((perm >= m).any()) or valid.numel() != m or \
                bool((lanes != lanes[:, :1]).any()) or bool((torch.bincount(valid, minlength=m) != 1).any()):
            raise FormatError(f"{where}'{label}': the row order is not a permutation of the {m} rows"
                              + (f", each on {p} adjacent lanes" if p > 1 else ""))
        if lay.paired:
            h = m // 2
            if m % (2 * LANES) or int(offsets[-1]) != h:  # not a paired weight's last word: a length that fits nothing
                raise FormatError(f"{where}tensor '{prefix}offsets' has {offsets.numel()} entries, which is not "
                                  f"{slices + 1} + 18 x {slices} x S + {mp} for any split count S >= 1, nor one more "
                                  f"holding M / 2 of a weight with paired halves")
            # split layout: rank r of the second half beside rank r of the first; parts: lane l + 16 beside lane l
            a, b = ((perm[: mp // 2], perm[mp // 2:]) if p == 1
                    else (perm.view(-1, 2, 16)[:, 0], perm.view(-1, 2, 16)[:, 1]))
            if not torch.equal(b, torch.where(a >= 0, a + h, a)) or bool(((a >= h)).any()):
                raise FormatError(f"{where}tensor '{prefix}offsets': the paired halves' row order does not pair row "
                                  f"r with row r + {h}")
        a0, w = win[..., 0], win[..., 1]
        if bool(((a0 % 8) != 0).any()) or bool(((w % 8) != 0).any()) or bool((a0 < 0).any()) or \
                bool((w < 8).any()) or bool((a0 + w > ceil_div(k, 8) * 8).any()):
            raise FormatError(f"{where}'{label}': a split's column window is not 8-aligned inside the {k} columns")
        nnz = 0  # (a run of slices at a time: every check below is within a slice)
        for s0, s1 in _slice_chunks(goff, _entry_groups(data.device)):
            rank, vals, cols, where_split = _entries(data, offsets, m, s0, s1)
            lo, width = a0.reshape(-1)[where_split], w.reshape(-1)[where_split]
            if bool(((cols < lo) | (cols >= lo + width) | (cols >= k)).any()):
                raise FormatError(f"{where}tensor '{prefix}data': an entry's column leaves its split's window or lies "
                                  f"outside the logical {m}x{k} matrix")
            nz = (vals != 0) & (vals != -32768)  # any bit pattern but +-0.0 (fp16 and bf16 alike)
            if bool((nz & (perm[rank] < 0)).any()):
                raise FormatError(f"{where}'{label}': a padding rank holds a nonzero value")
            # nonzeros of a rank: strictly rising columns in stream order; of a row (its parts too): no element twice
            rr, order = torch.sort(rank[nz], stable=True)  # a rank's entries are stored in its stream's order
            cc = cols[nz][order]
            if rr.numel() > 1 and bool(((rr[1:] == rr[:-1]) & (cc[1:] <= cc[:-1])).any()):
                raise FormatError(f"{where}'{label}': a row holds one column twice or out of order")
            if p > 1 and rr.numel() > 1:
                key = torch.sort(perm[rr] * k + cc).values
                if bool((key[1:] == key[:-1]).any()):
                    raise FormatError(f"{where}'{label}': a row holds one column twice (in two of its parts)")
            nnz += int(nz.sum())
        return nnz


def _split_offsets(offsets: torch.Tensor, slices: int, mp: int, s: int):
    o = offsets.to(torch.int64)
    goff = o[: slices + 1]
    win = o[slices + 1: slices + 1 + 2 * slices * s].view(slices, s, 2)
    st32 = offsets[slices + 1 + 2 * slices * s: slices + 1 + 18 * slices * s].contiguous()
    starts = st32.view(torch.int16).to(torch.int64).view(slices, s, LANES) & 0xFFFF
    perm = o[slices + 1 + 18 * slices * s: slices + 1 + 18 * slices * s + mp]
    return goff, win, starts, perm


#: groups :func:`_entries` reads at a time (:func:`_slice_chunks`; its int64 temporaries take about 100 bytes an
#: entry, so about 200 MB at this many): ``to_dense``, validation and re-encoding a large layer peak at that much, not
#: at some 2 GB per 100 M elements of weight
ENTRY_CHUNK_GROUPS = 1 << 13


def _entry_groups(device: torch.device) -> int:
    """The most groups :func:`_entries` reads at a time on ``device``: :data:`ENTRY_CHUNK_GROUPS`, on a GPU more
    where its free memory allows (at :data:`ENCODE_ENTRY_BYTES` an entry, 256 entries a group, up to 2^17 groups; not
    where ``FLASH_LLM_ENCODE_CHUNK_*`` is set): fewer runs, each some 130 launches there (a 9216 x 36864 weight's
    ``to_dense`` took 4554 operations in runs of 2^13 groups)."""
    return gpu_run_size(device, ENTRY_CHUNK_GROUPS, 1 << 17, LANES * GROUP * ENCODE_ENTRY_BYTES, _ENCODE_FIXED)


def _slice_chunks(goff: torch.Tensor, max_groups: int) -> list[tuple[int, int]]:
    """Runs of whole slices ``(s0, s1)`` that cover every slice, each of at most ``max_groups`` groups (a slice of
    more is a run of its own); ``goff``: the slices' first groups (``[slices + 1]``, rising from 0)."""
    return _runs(torch.diff(goff).tolist(), max_groups)


def _entries(data: torch.Tensor, offsets: torch.Tensor, m: int, s0: int = 0, s1: int | None = None):
    """(rank, value bits, column, slice x S + split) of every stored entry of slices ``s0 .. s1 - 1`` (default: all)
    in storage order, columns from each split's start.  Temporaries grow with those slices' groups
    (:func:`_slice_chunks` gives runs of a bounded size)."""
    lay = layout(m, offsets.numel(), data.numel())
    slices, s = lay.slices, lay.splits
    goff, win, starts, perm = _split_offsets(offsets, slices, lay.mp, s)
    s1 = slices if s1 is None else s1
    dev = data.device
    gb, ge = (int(goff[s0]), int(goff[s1])) if slices else (0, 0)
    ng = ge - gb
    grp = _plain_groups(data, goff, lay, gb, ge)
    vals = grp[:, : LANES * GROUP // 2].contiguous().view(torch.int16).view(ng, LANES, GROUP)
    sw = grp[:, LANES * GROUP // 2:].to(torch.int64) & 0xFFFFFFFF  # [ng, 32]
    steps = (sw[:, :, None] >> (4 * torch.arange(GROUP, device=dev))) & 15  # [ng, 32, 8]
    g = torch.arange(gb, ge, device=dev)
    sl = torch.searchsorted(goff, g, right=True) - 1  # each group's slice
    gs = goff[sl + 1] - goff[sl]
    gi = g - goff[sl]
    split = ((gi + 1) * s - 1) // gs.clamp(min=1)
    g0 = (split * gs) // s  # the split's first group
    lane = torch.arange(LANES, device=dev)
    k8 = torch.arange(GROUP, device=dev)
    # a segmented cumsum over (slice, lane, group, entry): keys give each entry its place in that order
    first = ((goff[sl] - gb) * LANES * GROUP)[:, None, None] + (lane[None, :] * gs[:, None] * GROUP)[:, :, None]
    key = first + (gi * GROUP)[:, None, None] + k8[None, None, :]
    seg = first + (g0 * GROUP)[:, None, None] + torch.zeros_like(k8)[None, None, :]
    del first
    total = ng * LANES * GROUP
    seq = torch.zeros(total, dtype=torch.int64, device=dev)
    seq[key.reshape(-1)] = steps.reshape(-1)
    del steps
    cs = torch.cumsum(seq, 0)
    seg = seg.reshape(-1)
    before = cs[seg] - seq[seg]  # the sum up to the split's first entry of the lane
    del seq, seg
    st = starts[sl[:, None].expand(ng, LANES), split[:, None].expand(ng, LANES), lane[None, :].expand(ng, LANES)]
    cols = st[:, :, None].expand(ng, LANES, GROUP).reshape(-1) + cs[key.reshape(-1)] - before
    del cs, key, before
    rank = (sl[:, None] * LANES + lane[None, :])[:, :, None].expand(ng, LANES, GROUP).reshape(-1)
    where_split = (sl * s + split).repeat_interleave(LANES * GROUP)
    return rank, vals.reshape(-1), cols, where_split

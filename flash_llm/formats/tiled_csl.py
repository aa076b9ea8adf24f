"""TiledCSL: Flash-LLM's format, without its density cap.

* The padded weight ``[Mp, Kp]`` (``Mp`` a multiple of 64, ``Kp`` of 64) is cut into 64x64 tiles,
  numbered row-major: tile ``(mt, kt)`` is number ``mt * (Kp / 64) + kt``.
* Each nonzero is one int32 *entry* in ``data``: the value's 16-bit pattern in the low half and its
  position inside the tile in the high half.  **Version 3:** the position of tile element ``(r, c)`` is
  ``64 r + 8 ((c // 8) ^ (r % 8)) + c % 8``: its index in the tile as every spmm kernel holds it in shared memory
  (row-major, the 16-byte chunks of each 128-byte row swizzled by the row, the layout ``wgmma`` reads), so a
  kernel's scatter address is ``2 * position``, one shift (`docs/formats.md`).  Versions 1 and 2 stored the
  element's fragment-order index (``1024 * (r // 16) + f``, ``_layout.py``) and are converted on load.
* A tile's entries (distinct positions) are padded to a multiple of 4 entries (16 bytes) with the pad
  entry ``0xFFFF0000`` (position 65535, value 0).  Any number of nonzeros up to 4096 per tile.
* **Entry order (versions 2 and 3).**  The kernel's lane ``l`` scatters 16-byte units ``32 r + l``, so warp store
  ``(r, q)`` writes entry ``q`` of 32 consecutive units.  ``bank_order`` arranges each tile's entries so that
  those 32 entries fall in different shared-memory banks of the kernel's tile wherever the counts allow
  (`docs/formats.md`); version 1 sorted them by position, and version-1 files are reordered on load.
* ``offsets`` (int32, ``T + 1``) holds each tile's first entry.

Bytes: ``4 * sum_i ceil4(nnz_i) + 4 (T + 1)``.
"""

from __future__ import annotations

import math

import torch

from . import _layout as L
from ._base import FormatError, SparseFormat, check_dense_weight, check_shape_args

TILE_M = 64
TILE_ELEMS = TILE_M * L.STRIP_K
PAD_POSITION = 0xFFFF
PAD_ENTRY = -(1 << 16)  # 0xFFFF0000 as int32


def swizzled_position(r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """The version-3 position of tile element ``(r, c)`` (both 0..63): ``64 r + 8 ((c >> 3) ^ (r & 7)) + (c & 7)``.
    For a fixed row it permutes the 8-element chunks, and applied to a position's own ``(r, c)`` it gives the
    element's ``(r, c)`` back (an involution)."""
    return 64 * r + 8 * ((c >> 3) ^ (r & 7)) + (c & 7)


def _swizzle_chunks(device) -> tuple[torch.Tensor, torch.Tensor]:
    """Index tensors ``(r [64, 1], q [64, 8])`` such that ``t[..., r, q, :]`` of a tile viewed as ``[..., 64, 8, 8]``
    (row, 16-byte chunk, element) moves every chunk ``q`` of row ``r`` to ``q ^ (r % 8)``: row-major -> position order
    and, the swizzle being an involution, back.  Indexing whole chunks keeps the gather 8x coarser than per element."""
    r = torch.arange(TILE_M, device=device)[:, None]
    return r, torch.arange(8, device=device)[None, :] ^ (r & 7)


def _tiles(w: torch.Tensor, mt64: int, kt: int) -> torch.Tensor:
    """Padded ``[64 mt64, 64 kt]`` -> tiles ``[T, 4096]``, each in position order (swizzled row-major)."""
    r, q = _swizzle_chunks(w.device)
    tiles = w.view(mt64, TILE_M, kt, 8, 8).permute(0, 2, 1, 3, 4)[:, :, r, q]  # [mt64, kt, 64, 8, 8], one copy
    return tiles.reshape(-1, TILE_ELEMS)


def _untile(tiles: torch.Tensor, mt64: int, kt: int) -> torch.Tensor:
    """Tiles ``[T, 4096]`` in position order -> the padded ``[64 mt64, 64 kt]``."""
    r, q = _swizzle_chunks(tiles.device)
    rm = tiles.view(mt64, kt, TILE_M, 8, 8)[:, :, r, q]
    return rm.permute(0, 2, 1, 3, 4).reshape(mt64 * TILE_M, kt * L.STRIP_K)


def fragment_to_swizzled(pos: torch.Tensor) -> torch.Tensor:
    """A version-1/2 position (``1024 * (r // 16) +`` the fragment-order index inside the strip) -> the version-3
    position of the same element."""
    strip, lane, bit = pos >> 10, (pos >> 5) & 31, pos & 31
    g, t, s, j = lane >> 2, lane & 3, bit >> 3, bit & 7
    r = 16 * strip + g + 8 * ((j >> 1) & 1)
    c = 16 * t + 4 * s + 2 * (j >> 2) + (j & 1)
    return swizzled_position(r, c)


def shared_bank(pos: torch.Tensor) -> torch.Tensor:
    """The shared-memory bank (0..31) that the spmm kernels' scatter of position ``pos`` (0..4095) writes: the tile is
    stored at byte ``2 * pos`` (``csl_tile_byte`` in ``spmm.cu``)."""
    return (pos >> 1) & 31


def bank_order(data: torch.Tensor, offsets: torch.Tensor, chunk: int = 1 << 22) -> torch.Tensor:
    """``data`` with each tile's entries rearranged so that the kernel's warp stores hit different banks.

    The kernel's lane ``l`` takes units ``32 r + l`` (4 entries each) and stores entry ``q`` of its unit in
    instruction ``(r, q)``; in a last, partial round of ``L`` units the instruction covers lanes ``0 .. L - 1``.
    Entries are ranked within their bank (``k``-th entry of bank ``b``) and laid out in ``(k, b)`` order, one
    instruction after another: each instruction takes the next run of that sequence, so its entries come from one
    or two consecutive layers of distinct banks.  Pads go last.  Works on CPU and CUDA tensors, whole tiles at a
    time (about ``chunk`` entries and at most 15 000 tiles, so the sort keys fit int32) to bound the temporaries.
    """
    out = torch.empty_like(data)  # every entry belongs to one chunk below
    off = offsets.to(torch.int64)
    t, t0 = off.numel() - 1, 0
    while t0 < t:
        start = int(off[t0])
        t1 = max(t0 + 1, int(torch.searchsorted(off, start + chunk, right=True)) - 1)
        t1 = min(t1, t, t0 + 15000)
        end = int(off[t1])
        if end > start:
            out[start:end] = _bank_order_tiles(data[start:end], off[t0:t1 + 1] - start)
        t0 = t1
    return out


def _bank_order_tiles(data: torch.Tensor, off: torch.Tensor) -> torch.Tensor:
    # int32 throughout: at most 15 000 tiles, so (tile, bank, position) < 2^31 and (tile, rank, bank) < 2^31
    n, dev, i32 = data.numel(), data.device, torch.int32
    sizes = (off[1:] - off[:-1]).to(i32)
    tile_of = torch.repeat_interleave(torch.arange(sizes.numel(), device=dev, dtype=i32), sizes, output_size=n)
    pos = (data >> 16) & 0xFFFF
    pad = pos == PAD_POSITION
    pos = torch.where(pad, TILE_ELEMS - 1, pos)
    bank = torch.where(pad, 32, shared_bank(pos))
    # rank of each entry within its (tile, bank) group, by position (so the result depends only on the entries)
    group = tile_of * 33 + bank
    key_sorted, order = torch.sort((group << 12) | pos, stable=True)
    group_sorted = key_sorted >> 12
    rank_sorted = (torch.arange(n, device=dev, dtype=i32)
                   - torch.searchsorted(group_sorted, group_sorted, out_int32=True))
    del group, group_sorted, key_sorted
    rank = torch.empty_like(rank_sorted)
    rank[order] = rank_sorted
    del order, rank_sorted
    rank = torch.where(pad, TILE_ELEMS, rank)  # pads last
    seq = torch.sort((tile_of * (TILE_ELEMS + 1) + rank) * 33 + bank, stable=True).indices  # tile, then (k, b)
    del rank, bank, pos, pad
    # sequence index j inside its tile -> slot: round r = j // 128 of min(32, units - 32 r) lanes, 4 instructions
    start = off[:-1].to(i32)[tile_of]
    j = torch.arange(n, device=dev, dtype=i32) - start
    r = j >> 7
    lanes = torch.clamp(sizes[tile_of] // 4 - 32 * r, max=32)
    rel = j - 128 * r
    out = torch.empty_like(data)
    out[(start + 128 * r + 4 * (rel % lanes) + rel // lanes).long()] = data[seq]
    return out


class TiledCSL(SparseFormat):
    """A sparse fp16/bf16 weight ``W[M, K]`` as 64x64 tiles of (value, position) pairs.

    Arrays: ``data`` (int32 ``[offsets[-1]]``, one entry per nonzero plus padding) and ``offsets``
    (int32 ``[T + 1]``).  Exact round trip, ``-0.0`` stored as a zero (comes back as ``+0.0``).
    """

    FORMAT_NAME = "flash_llm.tiled_csl"
    FORMAT_VERSION = 3
    READ_VERSIONS = (1, 2, 3)
    TILE_ROWS = TILE_M
    _UNIT_WORDS = 1  # offsets count entries

    @classmethod
    def from_dense(cls, w: torch.Tensor, *, dtype: torch.dtype | None = None) -> "TiledCSL":
        """Compress ``w [M, K]`` (fp16 or bf16, CPU or CUDA; ``dtype=`` casts other float dtypes)."""
        w = check_dense_weight(w, dtype)
        m, k = w.shape
        mt64, kt = cls.grid_of(m, k)
        banded = cls._from_dense_in_bands(w)
        if banded is not None:
            return banded
        tiles = _tiles(L.pad(w.view(torch.int16), TILE_M), mt64, kt)
        t = tiles.shape[0]
        mask = (tiles & 0x7FFF) != 0
        counts = L.popcount32(L.pack_bits(mask.view(t, -1, 32))).view(t, -1).sum(1)
        flat_idx = torch.nonzero(mask.view(-1)).view(-1)
        nnz = flat_idx.numel()
        entries = ((flat_idx & (TILE_ELEMS - 1)).to(torch.int32) << 16) | (
            tiles.view(-1)[flat_idx].to(torch.int32) & 0xFFFF)
        offsets = torch.zeros(t + 1, dtype=torch.int64, device=w.device)
        torch.cumsum((counts + 3) // 4 * 4, 0, out=offsets[1:])
        if int(offsets[-1]) >= 2**31:
            raise ValueError(f"w {tuple(w.shape)} is too large for one TiledCSL matrix; split it")
        data = torch.full((int(offsets[-1]),), PAD_ENTRY, dtype=torch.int32, device=w.device)
        before = torch.cumsum(counts, 0) - counts
        dest = torch.repeat_interleave(offsets[:-1] - before, counts, output_size=nnz) + torch.arange(
            nnz, device=w.device)
        data[dest] = entries
        offsets = offsets.to(torch.int32)
        return cls._from_parts({"data": bank_order(data, offsets), "offsets": offsets}, (m, k), w.dtype, nnz)

    @classmethod
    def arrays_fit(cls, m: int, k: int, n_offsets: int, n_data: int, *, version: int | None = None) -> str | None:
        """:meth:`SparseFormat.arrays_fit`; also ``data``'s length: a multiple of 4 entries (each tile padded to
        one) and at most what every element nonzero gives (each tile its ``cells`` of the logical matrix, padded to
        a multiple of 4), within what int32 ``offsets`` address.  Every such length is some weight's (0: all zero);
        versions 1 to 3 have the same lengths.  Until session 87 only ``offsets`` was checked: a meta load and the
        raw ops took ``data`` of any length."""
        why = super().arrays_fit(m, k, n_offsets, n_data, version=version)
        if why is not None:
            return why
        if n_data % 4:
            return f"data has {n_data} entries, not a multiple of 4 (every tile's entries are padded to one)"
        mt, kt = cls.grid_of(m, k)
        edge = (m - TILE_M * (mt - 1)) * (k - L.STRIP_K * (kt - 1))  # cells of the last tile (others: 4 | cells)
        most = m * k - edge + 4 * (-(-edge // 4))
        if n_data > most:
            return f"data has {n_data} entries; a {m}x{k} weight has at most {most} (every element nonzero)"
        if n_data > 2**31 - 1:
            return f"data has {n_data} entries, more than int32 offsets address"
        return None

    #: (messages: a Tiled-CSL ``data`` element is an entry)
    _DATA_UNIT = "entries"

    @classmethod
    def _nnz_range(cls, m: int, k: int, records: int, n_data: int) -> tuple[int, int]:
        """:meth:`SparseFormat._nnz_range`: ``E`` entries hold at most ``E`` nonzeros and, a tile of ``e >= 4`` of
        them at least ``e - 3``, at least ``E - 3 min(T, E / 4)`` (session 87)."""
        return n_data - 3 * min(records, n_data // 4), min(m * k, n_data)

    @classmethod
    def zeros(cls, m: int, k: int, dtype: torch.dtype = torch.float16, device="cpu") -> "TiledCSL":
        """The all-zero ``[m, k]`` weight (what ``from_dense(torch.zeros(m, k))`` returns), built
        without the dense matrix: no entries."""
        check_shape_args(m, k, dtype)
        t = math.prod(cls.grid_of(m, k))
        arrays = {"data": torch.zeros(0, dtype=torch.int32, device=device),
                  "offsets": torch.zeros(t + 1, dtype=torch.int32, device=device)}
        return cls._from_parts(arrays, (m, k), dtype, 0)

    def to_dense(self) -> torch.Tensor:
        """The dense ``[M, K]`` weight, on this weight's device (decoded a band of whole tile rows at a time,
        ``_record_bands``: the peak is the output and a band's temporaries)."""
        if (meta := self._meta_dense()) is not None:
            return meta
        m, k = self.shape
        kt = self.grid[1]
        off = self.offsets.to(torch.int64)
        out = torch.empty(m, k, dtype=torch.int16, device=self.device)
        for b0, b1 in self._record_bands(m, k, self.device):
            e0, e1 = int(off[b0 * kt]), int(off[b1 * kt])
            data = self.data[e0:e1]
            sizes = off[b0 * kt + 1: b1 * kt + 1] - off[b0 * kt: b1 * kt]
            tile_of = torch.repeat_interleave(torch.arange((b1 - b0) * kt, device=self.device), sizes,
                                              output_size=e1 - e0)
            pos = (data >> 16) & 0xFFFF
            real = pos != PAD_POSITION
            tiles = torch.zeros((b1 - b0) * kt * TILE_ELEMS, dtype=torch.int16, device=self.device)
            tiles[(tile_of * TILE_ELEMS + pos)[real]] = data[real].to(torch.int16)
            del tile_of, pos, real
            r0, r1 = b0 * TILE_M, min(m, b1 * TILE_M)
            out[r0:r1] = _untile(tiles.view(-1, TILE_ELEMS), b1 - b0, kt)[: r1 - r0, :k]
        return out.view(self.dtype)

    @classmethod
    def _upgrade(cls, arrays: dict[str, torch.Tensor], version: int) -> dict[str, torch.Tensor]:
        """Versions 1 and 2 -> 3: each position converted (``fragment_to_swizzled``), then the entries in bank order
        for the new positions' banks (``bank_order``)."""
        if version in (1, 2):
            data = arrays["data"]
            pos = (data >> 16) & 0xFFFF
            pad = pos == PAD_POSITION
            new = fragment_to_swizzled(torch.where(pad, 0, pos).to(torch.int64)).to(torch.int32)
            data = torch.where(pad, data, (new << 16) | (data & 0xFFFF))
            arrays = dict(arrays, data=bank_order(data, arrays["offsets"]))
        return arrays

    @classmethod
    def _validate(cls, arrays, shape, prefix, where, version=None) -> int:
        data, offsets = arrays["data"], arrays["offsets"]
        m, k = shape
        mp, kp = L.padded_shape(m, k, m_multiple=TILE_M)
        t = (mp // TILE_M) * (kp // L.STRIP_K)
        name = lambda n: f"{where}tensor '{prefix}{n}'"  # noqa: E731
        if offsets.numel() != t + 1:
            raise FormatError(f"{name('offsets')} has {offsets.numel()} entries; a {m}x{k} matrix has {t} "
                              f"tiles, so {t + 1} are expected")
        off = offsets.to(torch.int64)
        sizes = off[1:] - off[:-1]
        if int(off[0]) != 0 or bool((sizes < 0).any()) or bool((sizes % 4 != 0).any()):
            raise FormatError(f"{name('offsets')} must start at 0 and grow in steps that are multiples of 4")
        if data.numel() != int(off[-1]):
            raise FormatError(f"{name('data')} has {data.numel()} entries; the offsets describe "
                              f"{int(off[-1])} (truncated or inconsistent)")
        nnz = 0
        kt = kp // L.STRIP_K
        # (a band of whole tile rows at a time: every check is within a tile)
        for b0, b1 in cls._record_bands(m, k, data.device):
            t0, t1 = b0 * kt, b1 * kt
            e0, e1 = int(off[t0]), int(off[t1])
            nnz += cls._validate_tiles(data[e0:e1], sizes[t0:t1], e0, t0, (b0, b1), (m, k), (mp, kp), name, version)
        return nnz

    @classmethod
    def _validate_tiles(cls, data, sizes, e0, t0, band, shape, padded, name, version) -> int:
        """:meth:`_validate`'s checks of the entries ``data`` of tiles ``t0 ..`` (their sizes ``sizes``; the first
        entry is number ``e0`` of the weight's), the tile rows ``band`` of an ``[m, k]`` weight padded to ``padded``;
        returns their nonzeros."""
        m, k = shape
        mp, kp = padded
        pos = (data.to(torch.int64) >> 16) & 0xFFFF
        pad = pos == PAD_POSITION
        if bool((pad & (data != PAD_ENTRY)).any()):
            raise FormatError(f"{name('data')}: a pad entry (position 65535) carries a nonzero value")
        if bool(((pos >= TILE_ELEMS) & ~pad).any()):
            i = int(torch.nonzero((pos >= TILE_ELEMS) & ~pad)[0])
            raise FormatError(f"{name('data')}: entry {e0 + i} has position {int(pos[i])}, outside the "
                              f"{TILE_ELEMS}-element tile")
        if bool(((data & 0x7FFF) == 0)[~pad].any()):
            raise FormatError(f"{name('data')}: an entry stores a zero value (entries hold nonzeros only)")
        dev = data.device
        t = sizes.numel()
        counts = torch.zeros(t, dtype=torch.int64, device=dev)
        tile_of = torch.repeat_interleave(torch.arange(t, device=dev), sizes, output_size=data.numel())
        counts.index_add_(0, tile_of, (~pad).to(torch.int64))
        if bool(((counts + 3) // 4 * 4 != sizes).any()):
            i = int(torch.nonzero((counts + 3) // 4 * 4 != sizes)[0])
            raise FormatError(f"{name('data')}: tile {t0 + i} has {int(counts[i])} nonzeros in {int(sizes[i])} "
                              "entries; expected padding to the next multiple of 4 only")
        if (version or cls.FORMAT_VERSION) == 1:
            # version 1: strictly increasing positions inside each tile (pads, position 65535, only at the end)
            same_tile = tile_of[1:] == tile_of[:-1]
            ok = (pos[1:] > pos[:-1]) | (pad[1:] & pad[:-1])
            if bool((same_tile & ~ok).any()):
                i = int(tile_of[1:][same_tile & ~ok][0])
                raise FormatError(f"{name('data')}: tile {t0 + i} has positions out of order or repeated")
        else:  # versions 2 and 3: any order, but no position twice in a tile
            flat = torch.sort((tile_of * TILE_ELEMS + pos)[~pad]).values  # real positions are < 4096 (checked above)
            if bool((flat[1:] == flat[:-1]).any()):
                i = int(flat[1:][flat[1:] == flat[:-1]][0]) // TILE_ELEMS
                raise FormatError(f"{name('data')}: tile {t0 + i} holds a position twice")
        if (mp, kp) != (m, k):
            r0, r1 = band[0] * TILE_M, min(m, band[1] * TILE_M)  # (the band's rows of the logical matrix)
            ones = torch.ones(r1 - r0, k, dtype=torch.bool, device=dev)
            if (version or cls.FORMAT_VERSION) >= 3:
                inside = _tiles(L.pad(ones, TILE_M), band[1] - band[0], kp // L.STRIP_K)
            else:
                frag = L.to_fragment_order(ones, m_multiple=TILE_M)
                mt16, kt16, _ = frag.shape
                inside = frag.view(mt16 // 4, 4, kt16, L.STRIP_ELEMS).permute(0, 2, 1, 3).reshape(-1, TILE_ELEMS)
            flat = (tile_of * TILE_ELEMS + pos.clamp(max=TILE_ELEMS - 1))[~pad]
            if not bool(inside.view(-1)[flat].all()):
                raise FormatError(f"{name('data')}: an entry lies outside the logical {m}x{k} matrix")
        return int(counts.sum())

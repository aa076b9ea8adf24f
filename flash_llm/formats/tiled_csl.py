"""TiledCSL: Flash-LLM's format, without its density cap.

* The padded weight ``[Mp, Kp]`` (``Mp`` a multiple of 64, ``Kp`` of 64) is cut into 64x64 tiles,
  numbered row-major: tile ``(mt, kt)`` is number ``mt * (Kp / 64) + kt``.
* Each nonzero is one int32 *entry* in ``data``: the value's 16-bit pattern in the low half and its
  position inside the tile in the high half.  The position is ``1024 * (r // 16) + f`` where ``r`` is
  the tile row and ``f`` the element's fragment-order index inside its 16x64 strip (``_layout.py``),
  so the kernel can scatter straight into the layout its tensor-core loads read.
* A tile's entries are sorted by position and padded to a multiple of 4 entries (16 bytes) with the
  pad entry ``0xFFFF0000`` (position 65535, value 0).  Any number of nonzeros up to 4096 per tile.
* ``offsets`` (int32, ``T + 1``) holds each tile's first entry.

Bytes: ``4 * sum_i ceil4(nnz_i) + 4 (T + 1)``.
"""

from __future__ import annotations

import math

import torch

from . import _layout as L
from ._base import FormatError, SparseFormat, check_dense_weight

TILE_M = 64
TILE_ELEMS = TILE_M * L.STRIP_K
PAD_POSITION = 0xFFFF
PAD_ENTRY = -(1 << 16)  # 0xFFFF0000 as int32


def _tiles(frag: torch.Tensor) -> torch.Tensor:
    """Fragment-ordered strips ``[Mt16, Kt, 1024]`` (Mt16 a multiple of 4) -> tiles ``[T, 4096]``."""
    mt16, kt, _ = frag.shape
    return frag.view(mt16 // 4, 4, kt, L.STRIP_ELEMS).permute(0, 2, 1, 3).reshape(-1, TILE_ELEMS)


def _strips(tiles: torch.Tensor, mt64: int, kt: int) -> torch.Tensor:
    return tiles.view(mt64, kt, 4, L.STRIP_ELEMS).permute(0, 2, 1, 3).reshape(mt64 * 4, kt, L.STRIP_ELEMS)


class TiledCSL(SparseFormat):
    """A sparse fp16/bf16 weight ``W[M, K]`` as 64x64 tiles of (value, position) pairs.

    Arrays: ``data`` (int32 ``[offsets[-1]]``, one entry per nonzero plus padding) and ``offsets``
    (int32 ``[T + 1]``).  Exact round trip, ``-0.0`` stored as a zero (comes back as ``+0.0``).
    """

    FORMAT_NAME = "flash_llm.tiled_csl"
    FORMAT_VERSION = 1
    READ_VERSIONS = (1,)
    TILE_ROWS = TILE_M
    _UNIT_WORDS = 1  # offsets count entries

    @classmethod
    def from_dense(cls, w: torch.Tensor, *, dtype: torch.dtype | None = None) -> "TiledCSL":
        """Compress ``w [M, K]`` (fp16 or bf16, CPU or CUDA; ``dtype=`` casts other float dtypes)."""
        w = check_dense_weight(w, dtype)
        m, k = w.shape
        tiles = _tiles(L.to_fragment_order(w.view(torch.int16), m_multiple=TILE_M))
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
        return cls._from_parts({"data": data, "offsets": offsets.to(torch.int32)}, (m, k), w.dtype, nnz)

    @classmethod
    def zeros(cls, m: int, k: int, dtype: torch.dtype = torch.float16, device="cpu") -> "TiledCSL":
        """The all-zero ``[m, k]`` weight (what ``from_dense(torch.zeros(m, k))`` returns), built
        without the dense matrix: no entries."""
        t = math.prod(cls.grid_of(m, k))
        arrays = {"data": torch.zeros(0, dtype=torch.int32, device=device),
                  "offsets": torch.zeros(t + 1, dtype=torch.int32, device=device)}
        return cls._from_parts(arrays, (m, k), dtype, 0)

    def to_dense(self) -> torch.Tensor:
        """The dense ``[M, K]`` weight, on this weight's device."""
        m, k = self.shape
        mt64, kt = self.grid
        off = self.offsets.to(torch.int64)
        sizes = off[1:] - off[:-1]
        tile_of = torch.repeat_interleave(torch.arange(mt64 * kt, device=self.device), sizes,
                                          output_size=self.data.numel())
        pos = (self.data >> 16) & 0xFFFF
        real = pos != PAD_POSITION
        tiles = torch.zeros(mt64 * kt * TILE_ELEMS, dtype=torch.int16, device=self.device)
        tiles[(tile_of * TILE_ELEMS + pos)[real]] = self.data[real].to(torch.int16)
        frag = _strips(tiles.view(-1, TILE_ELEMS), mt64, kt)
        return L.from_fragment_order(frag, m, k).view(self.dtype)

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
        pos = (data.to(torch.int64) >> 16) & 0xFFFF
        pad = pos == PAD_POSITION
        if bool((pad & (data != PAD_ENTRY)).any()):
            raise FormatError(f"{name('data')}: a pad entry (position 65535) carries a nonzero value")
        if bool(((pos >= TILE_ELEMS) & ~pad).any()):
            i = int(torch.nonzero((pos >= TILE_ELEMS) & ~pad)[0])
            raise FormatError(f"{name('data')}: entry {i} has position {int(pos[i])}, outside the "
                              f"{TILE_ELEMS}-element tile")
        if bool(((data & 0x7FFF) == 0)[~pad].any()):
            raise FormatError(f"{name('data')}: an entry stores a zero value (entries hold nonzeros only)")
        dev = data.device
        counts = torch.zeros(t, dtype=torch.int64, device=dev)
        tile_of = torch.repeat_interleave(torch.arange(t, device=dev), sizes, output_size=data.numel())
        counts.index_add_(0, tile_of, (~pad).to(torch.int64))
        if bool(((counts + 3) // 4 * 4 != sizes).any()):
            i = int(torch.nonzero((counts + 3) // 4 * 4 != sizes)[0])
            raise FormatError(f"{name('data')}: tile {i} has {int(counts[i])} nonzeros in {int(sizes[i])} "
                              "entries; expected padding to the next multiple of 4 only")
        # strictly increasing positions inside each tile (pads, position 65535, only at the end)
        same_tile = tile_of[1:] == tile_of[:-1]
        ok = (pos[1:] > pos[:-1]) | (pad[1:] & pad[:-1])
        if bool((same_tile & ~ok).any()):
            i = int(tile_of[1:][same_tile & ~ok][0])
            raise FormatError(f"{name('data')}: tile {i} has positions out of order or repeated")
        if (mp, kp) != (m, k):
            inside = _tiles(L.to_fragment_order(torch.ones(m, k, dtype=torch.bool, device=dev), m_multiple=TILE_M))
            flat = (tile_of * TILE_ELEMS + pos.clamp(max=TILE_ELEMS - 1))[~pad]
            if not bool(inside.view(-1)[flat].all()):
                raise FormatError(f"{name('data')}: an entry lies outside the logical {m}x{k} matrix")
        return int(counts.sum())

"""BitmapTiles: one bit per element plus the nonzero values, one record per 16x64 strip.

Layout (``docs/formats.md`` has a worked example):

* The padded weight ``[Mp, Kp]`` (``Mp`` a multiple of 16, ``Kp`` of 64) is cut into strips of
  16 x 64, numbered row-major: strip ``(mt, kt)`` is number ``mt * (Kp / 64) + kt``.
* Strip ``i`` is one *record* in ``data`` (int32 words), starting at word ``4 * offsets[i]``:

  - 32 bitmap words (128 bytes): word ``lane`` holds exactly the A-operand elements lane ``lane`` of a
    warp holds for the strip's four ``mma.m16n8k16`` steps (fragment order, ``_layout.py``): element
    ``lane * 32 + 8 s + j`` (k-step ``s``, fragment half ``j``) is bit ``8 (j // 2) + 4 (j % 2) + s``
    (``_layout.bitmap_bit``; version 1 used bit ``8 s + j``, and version-1 files are converted on load);
  - the nonzero values as 16-bit patterns, two per int32 word, low half first, in *step order*:
    k-step ``s`` major, then lane, then fragment half ``j``.  So in each of the
    four mma k-steps the warp's lanes read neighbouring values (few shared-memory bank conflicts),
    and a lane's values for one k-step are contiguous;
  - zero padding up to a multiple of 16 bytes.

* ``offsets`` (int32, ``T + 1`` entries) holds record starts in units of 16 bytes, so a record is found
  with one lookup and copied with 16-byte aligned loads; its length is ``8 + ceil(nnz_i / 8)`` units.

Bytes: ``128 T + 16 * sum_i ceil(nnz_i / 8) + 4 (T + 1)`` for ``T`` strips.
"""

from __future__ import annotations

import math

import torch

from . import _layout as L
from ._base import FormatError, SparseFormat, check_dense_weight, check_shape_args

RECORD_HEADER_UNITS = 8  # 32 bitmap words = 128 bytes = 8 units of 16 bytes


def _value_starts(offsets: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Index (in 16-bit elements of ``data``) of every nonzero value, in storage order."""
    nnz = int(counts.sum())
    first = offsets[:-1].to(torch.int64) * 8 + 2 * 32  # first value of each record, in halves
    before = torch.cumsum(counts, 0) - counts  # values before each record
    return torch.repeat_interleave(first - before, counts, output_size=nnz) + torch.arange(
        nnz, device=counts.device)


def _bitmaps(data: torch.Tensor, off: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The records' 32 bitmap words int32 ``[T, 32]`` and their set bits int64 ``[T]``; ``off``: the records' starts in
    16-byte units into ``data`` (int64, ``T + 1``)."""
    words = data[off[:-1, None] * 4 + torch.arange(32, device=off.device)]
    return words, L.popcount32(words).sum(1)


class BitmapTiles(SparseFormat):
    """A sparse fp16/bf16 weight ``W[M, K]`` as 16x64 bitmap strips (flash-llm's main format).

    Arrays: ``data`` (int32 ``[4 * offsets[-1]]``: per strip 32 bitmap words then the packed values)
    and ``offsets`` (int32 ``[T + 1]``, record starts in 16-byte units).  ``to_dense(from_dense(w))``
    equals ``w`` bit for bit, except that ``-0.0`` is a zero and comes back as ``+0.0``.
    """

    FORMAT_NAME = "flash_llm.bitmap_tiles"
    FORMAT_VERSION = 2
    READ_VERSIONS = (1, 2)
    TILE_ROWS = L.STRIP_M
    _UNIT_WORDS = 4  # offsets count 16-byte units

    @classmethod
    def from_dense(cls, w: torch.Tensor, *, dtype: torch.dtype | None = None) -> "BitmapTiles":
        """Compress ``w [M, K]`` (fp16 or bf16, CPU or CUDA; ``dtype=`` casts other float dtypes).

        Zeros are elements whose value compares equal to 0 (``+0.0`` and ``-0.0``); NaN and Inf are kept.
        Runs as a handful of vectorized PyTorch ops on ``w``'s device.
        """
        w = check_dense_weight(w, dtype)
        m, k = w.shape
        banded = cls._from_dense_in_bands(w)
        if banded is not None:
            return banded
        frag = L.to_fragment_order(w.view(torch.int16))  # [Mt, Kt, 1024]
        t = frag.shape[0] * frag.shape[1]
        frag = frag.view(t, L.STRIP_ELEMS)
        mask = (frag & 0x7FFF) != 0  # -0.0 (0x8000) counts as zero
        words = L.pack_bits(mask.view(t, 32, 32)[..., L.FRAGMENT_BIT])  # [T, 32], version-2 bit order
        counts = L.popcount32(words).sum(1)
        step_major = mask.view(t, 32, 4, 8).transpose(1, 2).reshape(-1)  # order: strip, step, lane, bit
        values = frag.view(t, 32, 4, 8).transpose(1, 2).reshape(-1)[torch.nonzero(step_major).view(-1)]
        offsets = torch.zeros(t + 1, dtype=torch.int64, device=w.device)
        torch.cumsum(RECORD_HEADER_UNITS + (counts + 7) // 8, 0, out=offsets[1:])
        total_units = int(offsets[-1])
        if total_units >= 2**31:
            raise ValueError(f"w {tuple(w.shape)} is too large for one BitmapTiles matrix (record offsets "
                             "overflow int32); split it")
        data = torch.zeros(total_units * 4, dtype=torch.int32, device=w.device)
        word_idx = offsets[:-1, None] * 4 + torch.arange(32, device=w.device)
        data[word_idx.view(-1)] = words.view(-1)
        data.view(torch.int16)[_value_starts(offsets, counts)] = values
        return cls._from_parts({"data": data, "offsets": offsets.to(torch.int32)}, (m, k), w.dtype,
                               values.numel())

    @classmethod
    def arrays_fit(cls, m: int, k: int, n_offsets: int, n_data: int, *, version: int | None = None) -> str | None:
        """:meth:`SparseFormat.arrays_fit`; also ``data``'s length: whole 16-byte units (4 words), at least the
        32 bitmap words of each of the ``T`` strips (all zero) and at most what every element nonzero gives (each
        strip ``8 + ceil(cells / 8)`` units for the ``cells`` of the logical matrix it covers), within what int32
        ``offsets`` address.  Every length in between is some weight's; versions 1 and 2 have the same lengths.
        Until session 87 only ``offsets`` was checked: a meta load and the raw ops took ``data`` of any length."""
        why = super().arrays_fit(m, k, n_offsets, n_data, version=version)
        if why is not None:
            return why
        t = n_offsets - 1
        if n_data % 4:
            return f"data has {n_data} words, not whole 16-byte units (4 words each) as every strip's record is"
        if n_data < 32 * t:
            return (f"data has {n_data} words; the {t} strips of a {m}x{k} weight hold {32 * t} bitmap words at "
                    f"least ({RECORD_HEADER_UNITS} units each)")
        mt, kt = cls.grid_of(m, k)
        edge = (m - L.STRIP_M * (mt - 1)) * (k - L.STRIP_K * (kt - 1))  # cells of the last strip (others: 8 | cells)
        most = 32 * t + (m * k - edge) // 2 + 4 * (-(-edge // 8))  # (2 values a word, a unit holding 8)
        if n_data > most:
            return f"data has {n_data} words; a {m}x{k} weight has at most {most} (every element nonzero)"
        if n_data > 4 * (2**31 - 1):
            return f"data has {n_data} words, more than int32 offsets (in 16-byte units) address"
        return None

    @classmethod
    def _nnz_range(cls, m: int, k: int, records: int, n_data: int) -> tuple[int, int]:
        """:meth:`SparseFormat._nnz_range`: ``U`` value units past the bitmaps hold at most ``8 U`` nonzeros and, a
        record of ``u >= 1`` of them at least ``8 u - 7``, at least ``8 U - 7 min(T, U)`` (session 87)."""
        units = n_data // 4 - RECORD_HEADER_UNITS * records
        return 8 * units - 7 * min(records, units), min(m * k, 8 * units)

    @classmethod
    def zeros(cls, m: int, k: int, dtype: torch.dtype = torch.float16, device="cpu") -> "BitmapTiles":
        """The all-zero ``[m, k]`` weight (what ``from_dense(torch.zeros(m, k))`` returns), built
        without the dense matrix: every record is its 8-unit bitmap, all bits clear."""
        check_shape_args(m, k, dtype)
        t = math.prod(cls.grid_of(m, k))
        arrays = {"data": torch.zeros(t * 32, dtype=torch.int32, device=device),
                  "offsets": torch.arange(0, RECORD_HEADER_UNITS * (t + 1), RECORD_HEADER_UNITS,
                                          dtype=torch.int32, device=device)}
        return cls._from_parts(arrays, (m, k), dtype, 0)

    def to_dense(self) -> torch.Tensor:
        """The dense ``[M, K]`` weight, on this weight's device (decoded a band of whole strip rows at a time,
        ``_record_bands``: the peak is the output and a band's temporaries)."""
        if (meta := self._meta_dense()) is not None:
            return meta
        m, k = self.shape
        kt = self.grid[1]
        off = self.offsets.to(torch.int64)
        out = torch.empty(m, k, dtype=torch.int16, device=self.device)
        for b0, b1 in self._record_bands(m, k, self.device):
            t = (b1 - b0) * kt
            ob = off[b0 * kt: b1 * kt + 1]
            words, counts = _bitmaps(self.data, ob)
            mask = L.unpack_bits(words)[..., L.BITMAP_BIT].view(t, 32, 4, 8).transpose(1, 2)  # step order, as stored
            frag = torch.zeros(t, 4, 32, 8, dtype=torch.int16, device=self.device)
            frag[mask] = self.data.view(torch.int16)[_value_starts(ob, counts)]
            del words, mask
            r0, r1 = b0 * self.TILE_ROWS, min(m, b1 * self.TILE_ROWS)
            out[r0:r1] = L.from_fragment_order(frag.transpose(1, 2).reshape(b1 - b0, kt, -1), r1 - r0, k)
        return out.view(self.dtype)

    @classmethod
    def _upgrade(cls, arrays: dict[str, torch.Tensor], version: int) -> dict[str, torch.Tensor]:
        """Version 1 -> 2: the same records with each bitmap word's bits moved to the version-2 order
        (values, offsets and lengths are unchanged).  Run after validation; returns new arrays."""
        if version == 1:
            off = arrays["offsets"].to(torch.int64)
            word_idx = (off[:-1, None] * 4 + torch.arange(32, device=off.device)).view(-1)
            data = arrays["data"].clone()
            data[word_idx] = L.pack_bits(L.unpack_bits(data[word_idx])[..., L.FRAGMENT_BIT])
            arrays = {**arrays, "data": data}
        return arrays

    @classmethod
    def _validate(cls, arrays, shape, prefix, where, version=None) -> int:
        data, offsets = arrays["data"], arrays["offsets"]
        m, k = shape
        mp, kp = L.padded_shape(m, k)
        t = (mp // L.STRIP_M) * (kp // L.STRIP_K)
        name = lambda n: f"{where}tensor '{prefix}{n}'"  # noqa: E731
        if offsets.numel() != t + 1:
            raise FormatError(f"{name('offsets')} has {offsets.numel()} entries; a {m}x{k} matrix has {t} "
                              f"strips, so {t + 1} are expected")
        off = offsets.to(torch.int64)
        if int(off[0]) != 0:
            raise FormatError(f"{name('offsets')} starts at {int(off[0])}; expected 0")
        sizes = off[1:] - off[:-1]
        if bool((sizes < RECORD_HEADER_UNITS).any()):
            i = int(torch.nonzero(sizes < RECORD_HEADER_UNITS)[0])
            raise FormatError(f"{name('offsets')}: record {i} is {int(sizes[i])} units long; every record "
                              f"holds at least its {RECORD_HEADER_UNITS}-unit bitmap")
        if data.numel() != 4 * int(off[-1]):
            raise FormatError(f"{name('data')} has {data.numel()} words; the offsets describe "
                              f"{4 * int(off[-1])} (truncated or inconsistent)")
        nnz = 0
        kt = kp // L.STRIP_K
        # (a band of whole strip rows at a time: every check is within a record)
        for b0, b1 in cls._record_bands(m, k, data.device):
            nnz += cls._validate_records(data, off, b0 * kt, b1 * kt, (b0, b1), (m, k), name, version)
        return nnz

    @classmethod
    def _validate_records(cls, data, off, t0, t1, band, shape, name, version) -> int:
        """:meth:`_validate`'s checks of records ``t0 .. t1 - 1`` (the strip rows ``band`` of an ``[m, k]`` weight),
        whose offsets ``off`` (int64, the whole weight's) are known to be consistent; returns their nonzeros."""
        m, k = shape
        mp, kp = L.padded_shape(m, k)
        base = int(off[t0])
        part = data[4 * base:4 * int(off[t1])]  # (the band's records, one contiguous run)
        rel = off[t0:t1 + 1] - base
        sizes = rel[1:] - rel[:-1]
        words, counts = _bitmaps(part, rel)
        expected = RECORD_HEADER_UNITS + (counts + 7) // 8
        bad = torch.nonzero(expected != sizes)
        if bad.numel():
            i = int(bad[0])
            raise FormatError(f"{name('data')}: record {t0 + i} has {int(counts[i])} nonzero bits, so it should be "
                              f"{int(expected[i])} units long, but the offsets give {int(sizes[i])}")
        # Values hold nonzeros only and the padding after them is zero (+0.0 or -0.0).  Each is checked on its own:
        # a count of the nonzero halves outside the bitmaps against ``nnz`` (the check until session 71) let a zero
        # value and a nonzero pad in the same band cancel out.  One pass marks the halves that are values.
        nnz = int(counts.sum())
        nz = (part.view(torch.int16) & 0x7FFF) != 0
        first = rel[:-1] * 8 + RECORD_HEADER_UNITS * 8  # each record's first value, in halves
        mark = torch.zeros(nz.numel() + 1, dtype=torch.int8, device=nz.device)
        mark.index_add_(0, first, torch.ones_like(first, dtype=torch.int8))
        mark.index_add_(0, first + counts, torch.full_like(first, -1, dtype=torch.int8))
        is_value = torch.cumsum(mark[:-1], 0, dtype=torch.int8).bool()
        zero = is_value & ~nz
        if bool(zero.any()):
            at = int(torch.nonzero(zero)[0])
            i = int(torch.searchsorted(first, torch.tensor(at, device=first.device), right=True)) - 1
            raise FormatError(f"{name('data')}: record {t0 + i} stores a zero value under a set bit "
                              "(values hold nonzeros only)")
        header_nonzero = int(((words.view(torch.int16) & 0x7FFF) != 0).sum())
        pad_nonzero = int((nz & ~is_value).sum()) - header_nonzero
        if pad_nonzero:
            raise FormatError(f"{name('data')}: {pad_nonzero} nonzero 16-bit words lie in the padding after the "
                              "records' values (padding must be zero)")
        if (mp, kp) != (m, k):  # bits of the padding must be clear
            r0, r1 = band[0] * L.STRIP_M, min(m, band[1] * L.STRIP_M)  # (the band's rows of the logical matrix)
            pad = L.to_fragment_order(torch.ones(r1 - r0, k, dtype=torch.bool, device=off.device)).logical_not_()
            mask = L.unpack_bits(words)
            if (version or cls.FORMAT_VERSION) >= 2:
                mask = mask[..., L.BITMAP_BIT]  # to fragment order (version 1 words are in it already)
            mask = mask.view(pad.shape)
            if bool((mask & pad).any()):
                i = int(torch.nonzero((mask & pad).view(-1, L.STRIP_ELEMS).any(1))[0])
                raise FormatError(f"{name('data')}: record {t0 + i} has nonzero bits outside the logical "
                                  f"{m}x{k} matrix")
        return nnz

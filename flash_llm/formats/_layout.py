"""The tensor-core fragment order shared by every flash-llm weight format.

A weight ``W[M, K]`` is cut into *strips* of 16 rows x 64 columns (``STRIP_M x STRIP_K``).  One strip
is what one warp multiplies in four ``mma.m16n8k16`` steps.  Inside a strip the 1024 elements are
numbered in *fragment order*::

    index = lane * 32 + bit          lane = 0..31 (the thread of the warp that holds the element)
                                     bit  = 8 * s + j, s = 0..3 (k-step), j = 0..7

where ``j`` is the position of the element among the eight A-operand halves lane ``lane`` passes to
``mma.m16n8k16.row`` (PTX ISA, "Matrix Fragments for mma.m16n8k16"): with ``g = lane // 4`` and
``t = lane % 4``, element ``j`` sits in row ``g + 8 * ((j >> 1) & 1)`` and, inside the k-step, at
k-index ``2 * t + (j & 1) + 8 * (j >> 2)``.

Which of the strip's 64 columns is k-index ``kappa`` of k-step ``s``?  A dot product does not care
how its k axis is ordered, as long as W and X agree; we choose the order that lets every lane fetch
its whole B operand (X) for the strip with two contiguous 16-byte loads: lane ``t`` needs, for all four
k-steps, the 16 columns ``16 t .. 16 t + 15``.  So k-index ``kappa = 2 t + e + 8 q`` (``e, q`` in
{0, 1}) of k-step ``s`` is strip column ``c = 16 t + 4 s + 2 q + e``.

So the 32 elements one lane needs for a whole strip are 32 consecutive indices: one 32-bit bitmap
word per lane (how each format orders the nonzero values is its own choice).  The inverse, for an element at strip row
``r`` and strip column ``c``::

    lane = 4 * (r % 8) + c // 16
    bit  = 8 * ((c // 4) % 4) + 4 * ((c // 2) % 2) + 2 * (r // 8) + c % 2

Both directions are one ``permute`` of a reshaped tensor: row ``r = 8h + g``, column
``c = 16t + 4s + 2q + e`` and fragment order ``(g, t, s, q, h, e)``.
"""

from __future__ import annotations

import torch

STRIP_M = 16
STRIP_K = 64
STRIP_ELEMS = STRIP_M * STRIP_K

# [Mt, h, g, Kt, t, s, q, e]  ->  [Mt, Kt, g, t, s, q, h, e]
_TO_FRAG = (0, 3, 2, 4, 5, 6, 1, 7)
# inverse permutation
_FROM_FRAG = tuple(_TO_FRAG.index(i) for i in range(8))


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def padded_shape(m: int, k: int, m_multiple: int = STRIP_M) -> tuple[int, int]:
    """Rows padded to ``m_multiple`` (a multiple of 16), columns to 64."""
    return ceil_div(m, m_multiple) * m_multiple, ceil_div(k, STRIP_K) * STRIP_K


def pad(w: torch.Tensor, m_multiple: int = STRIP_M) -> torch.Tensor:
    """``w [M, K]`` zero padded to :func:`padded_shape` (``w`` itself when it is already that shape)."""
    m, k = w.shape
    mp, kp = padded_shape(m, k, m_multiple)
    if (mp, kp) == (m, k):
        return w
    padded = w.new_zeros((mp, kp))
    padded[:m, :k] = w
    return padded


def to_fragment_order(w: torch.Tensor, m_multiple: int = STRIP_M) -> torch.Tensor:
    """``w [M, K]`` (any dtype) -> ``[Mp/16, Kp/64, 1024]`` in fragment order, zero padded."""
    w = pad(w, m_multiple)
    mp, kp = w.shape
    mt, kt = mp // STRIP_M, kp // STRIP_K
    if w.element_size() == 2:
        if w.storage_offset() % 2:  # (an unpadded view at an odd offset: its pairs are no aligned 32-bit words)
            w = w.clone()
        # (e) stays innermost in both orders: move pairs of 16-bit elements as one 32-bit word.
        v = w.view(torch.int32).reshape(mt, 2, 8, kt, 4, 4, 2).permute(_TO_FRAG[:-1])
        return v.reshape(mt, kt, STRIP_ELEMS // 2).view(w.dtype)
    v = w.reshape(mt, 2, 8, kt, 4, 4, 2, 2).permute(_TO_FRAG)
    return v.reshape(mt, kt, STRIP_ELEMS)


def from_fragment_order(frag: torch.Tensor, m: int, k: int) -> torch.Tensor:
    """Inverse of :func:`to_fragment_order`: ``[Mt, Kt, 1024]`` -> ``w [M, K]`` (a copy)."""
    mt, kt, _ = frag.shape
    if frag.element_size() == 2:
        v = frag.contiguous().view(torch.int32).reshape(mt, kt, 8, 4, 4, 2, 2).permute(_FROM_FRAG[:-1])
        return v.reshape(mt * STRIP_M, kt * STRIP_K // 2).view(frag.dtype)[:m, :k].contiguous()
    v = frag.reshape(mt, kt, 8, 4, 4, 2, 2, 2).permute(_FROM_FRAG)
    return v.reshape(mt * STRIP_M, kt * STRIP_K)[:m, :k].contiguous()


def popcount32(words: torch.Tensor) -> torch.Tensor:
    """Number of set bits of each 32-bit word (any integer dtype holding 32-bit patterns), as int64."""
    x = words.to(torch.int64) & 0xFFFFFFFF
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return ((x * 0x01010101) & 0xFFFFFFFF) >> 24


def bitmap_bit(s: int, j: int) -> int:
    """Bit of a BitmapTiles (version 2) lane word that holds A-fragment half ``j`` (0..7) of k-step ``s``:
    ``8 * (j // 2) + 4 * (j % 2) + s``.  Byte ``i`` of the word is A register ``i`` of every k-step (its
    low halves in bits 0..3, its high halves in bits 4..7), the order the bitmap kernel decodes fastest."""
    return 8 * (j // 2) + 4 * (j % 2) + s


#: ``BITMAP_BIT[b]``: the version-2 word bit of fragment-order bit ``b = 8 s + j``.
BITMAP_BIT = tuple(bitmap_bit(b // 8, b % 8) for b in range(32))
#: ``FRAGMENT_BIT[p]``: the fragment-order bit held by version-2 word bit ``p`` (inverse of BITMAP_BIT).
FRAGMENT_BIT = tuple(BITMAP_BIT.index(p) for p in range(32))


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """``bool [..., 32]`` -> ``int32 [...]``, element i of the last dim in bit i (LSB first)."""
    shape = mask.shape[:-1]
    b = mask.reshape(-1, 4, 8).view(torch.uint8)
    byte = b[..., 0].clone()
    for i in range(1, 8):
        byte |= b[..., i] << i
    return byte.view(torch.int32).reshape(shape)


def unpack_bits(words: torch.Tensor) -> torch.Tensor:
    """``int32 [...]`` -> ``bool [..., 32]`` (inverse of :func:`pack_bits`)."""
    shifts = torch.arange(32, device=words.device, dtype=torch.int32)
    return ((words.unsqueeze(-1) >> shifts) & 1).bool()

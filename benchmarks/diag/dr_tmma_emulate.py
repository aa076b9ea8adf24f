"""CPU emulation of ``delta_rows_spmm_<dtype>_tmma<NT>`` (spmm.cu, session 69; ``kernels.DR_MMA_TILE``): a block a
(slice, split) of a split-layout DeltaRows weight, its window (the 16-column steps from ``a0 & ~15`` to ``a0 + w``) in
passes of ``band`` columns; each pass zeroes the tile (32 rows of the band), stages X's band (tokens past N and
columns past K as zeros), places the split's nonzeros of the band (``dr_place``, the placement the expansions
``_pr`` / ``_sr`` share: ``dr_dense_emulate._place``), and multiplies the band's
16-column steps; the warps' sums meet in the block's fixed order, its partials go to ``ws[s][t][row]`` through the
fragment layout's (rank, token) map, and the splits' partials are summed in split order:

    python3 benchmarks/diag/dr_tmma_emulate.py          # a set of shapes, densities, split counts and bands

It fails on a nonzero placed in no pass or in two, a nonzero outside its window, a (rank, token) map that is not a
one-to-one cover of the block's 32 x NT outputs, or a product off the reference (float64 sums).
"""
from __future__ import annotations

import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dr_dense_emulate import _arrays, _place, split_blocks  # noqa: E402

from flash_llm import DeltaRows  # noqa: E402


def rank_token_map(nt: int) -> list[tuple[int, int]]:
    """The kernel's map of its reduction's output ``o`` (``idx = o / 32``, lane ``o % 32``) to (row rank, token):
    ``acc[h][j][e]`` at ``idx = (h NT / 8 + j) 4 + e`` is rank ``16 h + lane / 4 (+ 8 for e >= 2)``, token ``8 j + 2
    (lane % 4) (+ 1 for odd e)`` (the ``mma.m16n8k16`` C fragment)."""
    out = []
    for o in range(2 * (nt // 8) * 4 * 32):
        idx, ln = o >> 5, o & 31
        h, j, e = idx // ((nt // 8) * 4), (idx >> 2) % (nt // 8), idx & 3
        out.append((16 * h + (ln >> 2) + 8 * (e >> 1), 8 * j + 2 * (ln & 3) + (e & 1)))
    return out


def emulate_tmma(w: DeltaRows, x: torch.Tensor, band: int) -> np.ndarray:
    """``y [N, M]`` (float64) as the ``_tmma`` kernel computes it for ``x [N, K]`` (N <= 32), its band ``band``."""
    m, K = w.shape
    n = x.shape[0]
    nt = 8 if n <= 8 else 16 if n <= 16 else 32
    assert K % 8 == 0 and band % 16 == 0 and 1 <= n <= 32
    lay, data, goffs, starts, perm = _arrays(w)
    assert lay.parts == 1, "the _tmma kernels take the split layout"
    S = lay.splits
    xv = np.zeros((nt, K + band + 16), dtype=np.float64)
    xv[:n, :K] = x.double().cpu().numpy()
    vals = w.to_dense().view(torch.int16).cpu().numpy()  # (the weight's bits, to tell values' dtype apart)
    dtype = w.dtype
    ws = np.zeros((S, n, m), dtype=np.float64)
    cover = rank_token_map(nt)
    assert sorted(cover) == [(r, t) for r in range(32) for t in range(nt)], "the map must cover 32 x NT once"
    placed = np.zeros(m * K, dtype=np.int64)
    for slice_, s, goff, g0, g1, rows, a0, wd in split_blocks(w, lay, goffs, perm):
        c_lo, c_hi = a0 & ~15, a0 + wd
        acc = np.zeros((32, nt), dtype=np.float64)
        entries = list(_place(data, goff + g0, g1 - g0, starts[slice_, s], rows))  # (the same every pass)
        for ln, col, _ in entries:
            assert a0 <= col < c_hi, (slice_, s, ln, col, a0, wd)  # (inside the window)
        for b0 in range(c_lo, c_hi, band):
            nb = min(band, (c_hi - b0 + 15) & ~15)
            tile = np.zeros((32, nb), dtype=np.float64)
            for ln, col, bits in entries:
                if 0 <= col - b0 < nb:
                    h = torch.tensor([bits], dtype=torch.int16).view(dtype).double().item()
                    tile[ln, col - b0] = h
                    placed[rows[ln] * K + col] += 1
            xs = xv[:, b0: b0 + nb]  # (columns past K: zeros)
            acc += tile @ xs.T
        for rank, t in cover:
            if rows[rank] >= 0 and t < n:
                ws[s, t, rows[rank]] = acc[rank, t]
    nz = (vals.reshape(-1) & 0x7FFF) != 0
    assert (placed[nz] == 1).all() and (placed[~nz] == 0).all(), "every nonzero placed in exactly one pass"
    return ws.sum(0)


def check(w: DeltaRows, x: torch.Tensor, band: int) -> float:
    """The largest relative error of :func:`emulate_tmma` against ``x @ W^T`` in float64 (0 up to the order of the
    sums)."""
    want = (x.double() @ w.to_dense().double().t()).numpy()
    got = emulate_tmma(w, x, band)
    return float(np.abs(got - want).max() / (np.abs(want).max() + 1e-30))


def cases():
    gen = torch.Generator().manual_seed(69)
    for m, k in ((96, 4096), (64, 2056), (40, 1000), (300, 1536)):
        for density in (0.0, 0.02, 0.2, 0.95):
            w = torch.where(torch.rand(m, k, generator=gen) < density, torch.randn(m, k, generator=gen), 0.0)
            w[min(5, m - 1)] = 0.0
            if m > 9:
                w[7] = 0.0
                w[7, k - 1] = 1.0
            for dtype in (torch.float16, torch.bfloat16):
                for splits in (1, 3, 7):
                    dr = DeltaRows.from_dense(w.to(dtype), splits=splits)
                    for n in (1, 9, 32):
                        x = torch.randn(n, k, generator=gen).to(dtype)
                        for band in (256, 1024):
                            yield (m, k, density, dtype, splits, n, band), dr, x, band


def main() -> int:
    bad = total = 0
    for label, w, x, band in cases():
        total += 1
        err = check(w, x, band)
        if err > 1e-12:
            bad += 1
            print(f"FAIL {label}: relative error {err:.3g}", flush=True)
    print(f"{total - bad} of {total} products exact to float64 rounding; {bad} wrong")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

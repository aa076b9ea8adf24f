"""Shared-memory wavefronts of the DeltaRows multi-token walk's X reads, counted on the CPU (session 62).

``delta_rows_spmm_<dtype>_nt8`` stages X's window as 8 tokens a column (16 bytes) and reads, for every entry (pads
included), its column's 16 bytes with one ``LDS.128``.  The 32 lanes of a warp walk 32 rows in lockstep, so each load
lands at 32 columns that the weight decides.  This script replays those loads from the encoded bytes: per load, four
phases of 8 lanes, each phase as many wavefronts as the most distinct 16-byte chunks that share one bank quad (the same
chunk is one broadcast).  A conflict-free load takes 4.

    python3 benchmarks/diag/dr_nt_bank_conflicts.py            # fc1-, fc2-, down- and gate-shaped weights at 80 %

Session 60 measured ``_nt8`` on OPT-30B's fc2 2.8x slower than on fc1 (the same bytes and warps); the counts here are
the same on both (about 10 wavefronts a load), so bank conflicts do not explain it (``benchmarks/ab/README.md``, item
31).  Rows are fewer than the real layers' (the lanes' columns depend on K, the splits and the row ranking, not on M).
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from flash_llm import DeltaRows
from flash_llm.formats.delta_rows import _split_offsets, layout

SHAPES = {"fc1": (2048, 7168, 4), "fc2": (1024, 28672, 16), "down": (1024, 14336, 28), "gate": (2048, 4096, 4)}


def wavefronts(byte_offsets: np.ndarray) -> int:
    """Wavefronts of one ``LDS.128`` by 32 lanes at these byte offsets (16-byte aligned): four phases of 8 lanes,
    each the largest number of distinct 16-byte chunks in one bank quad (128-byte line, 8 quads)."""
    off = np.asarray(byte_offsets, dtype=np.int64)
    assert off.shape == (32,) and not (off % 16).any()
    total = 0
    for ph in range(4):
        chunks = np.unique(off[8 * ph: 8 * ph + 8] // 16)
        total += int(np.bincount(chunks % 8, minlength=8).max())
    return total


def pruned(m: int, k: int, sparsity: float, seed: int = 0) -> torch.Tensor:
    """A bf16 ``[m, k]`` weight of normal values pruned by magnitude to ``sparsity``."""
    v = torch.randn(m, k, generator=torch.Generator().manual_seed(seed))
    thr = float(torch.special.ndtri(torch.tensor(0.5 + sparsity / 2, dtype=torch.float64)))
    return v.masked_fill_(v.abs() < thr, 0.0).to(torch.bfloat16)


def walk_wavefronts(w: DeltaRows, blocks: int = 8, splits: int = 4, token_bytes: int = 16,
                    seed: int = 1) -> tuple[float, int]:
    """(mean wavefronts a load, loads counted) of the walk of ``w`` (split layout, plain values) over ``blocks``
    sampled blocks of 4 slices and ``splits`` sampled splits each; ``token_bytes`` the bytes a staged column (2 NT)."""
    m, _ = w.shape
    lay = layout(m, w.offsets.numel(), w.data.numel())
    if lay.coded or lay.parts != 1:
        raise ValueError("walk_wavefronts: a split-layout weight with plain values")
    data = w.data.cpu().numpy().astype(np.int32)
    slices, S = lay.slices, lay.splits
    goffs, wins, starts, _ = (t.numpy() for t in _split_offsets(w.offsets.cpu(), slices, lay.mp, S))
    rng = np.random.default_rng(seed)
    nb = (slices + 3) // 4
    total = loads = 0
    for b in rng.choice(nb, size=min(blocks, nb), replace=False):
        for s in rng.choice(S, size=min(splits, S), replace=False):
            block = [min(4 * int(b) + i, slices - 1) for i in range(4)]
            a0 = min(int(wins[x, s, 0]) for x in block)  # the block's window: the union of its slices'
            for x in block:
                goff = int(goffs[x])
                G = int(goffs[x + 1]) - goff
                col = starts[x, s].astype(np.int64)
                for g in range((s * G) // S, ((s + 1) * G) // S):
                    d = data[(goff + g) * 160 + 128: (goff + g + 1) * 160].astype(np.int64) & 0xFFFFFFFF
                    for e in range(8):
                        col = col + ((d >> (4 * e)) & 15)
                        total += wavefronts((col - a0) * token_bytes)
                        loads += 1
    return total / max(loads, 1), loads


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"of {', '.join(SHAPES)}")
    ap.add_argument("--sparsity", type=float, default=0.8)
    ap.add_argument("--blocks", type=int, default=8, help="blocks sampled a weight (4 splits each)")
    a = ap.parse_args(argv)
    for name in a.shapes.split(","):
        m, k, S = SHAPES[name]
        w = DeltaRows.from_dense(pruned(m, k, a.sparsity), splits=S, parts=1)
        mean, loads = walk_wavefronts(w, blocks=a.blocks)
        print(f"{name}-shaped {m} x {k}, {w.splits} splits: {mean:.2f} wavefronts a load ({loads} loads)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

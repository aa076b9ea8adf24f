"""Which weight does a kernel really multiply?  A diagnostic for a new or broken spmm kernel (one GPU).

    python benchmarks/kernel_probe.py [--fmt tiled-csl] [--n 64] [--m 128] [--k 128] [--splits 1]

W gets distinct values (+-1 .. +-2048, exact in fp16) at every position; X is the identity
(``N = K`` tokens, zero-padded up to ``--n``), so ``Y[n, m] = W[m, n]`` and ``Y^T`` is the weight that the
kernel used.  The script prints whether it matches and, if not, where each of W's values landed
(``(row, col) -> (row', col')`` for the first mismatches, plus a summary of the row and column offsets), which
tells a wrong shared-memory layout or accumulator mapping from a wrong index at a glance.
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch

import flash_llm
from flash_llm.reference import FORMAT_IDS

FMTS = {"tiled-csl": flash_llm.TiledCSL, "bitmap": flash_llm.BitmapTiles}


def probe(fmt: type, m: int, k: int, n: int, splits: int | None, dtype: torch.dtype) -> bool:
    from flash_llm import kernels

    vals = torch.arange(1, m * k + 1, dtype=torch.float32, device="cuda")
    vals = torch.where(vals > 2048, -(vals - 2048), vals) if m * k <= 4096 else vals % 2047 + 1
    w_dense = vals.reshape(m, k).to(dtype)
    w = fmt.from_dense(w_dense)
    x = torch.zeros(max(n, k), k, dtype=dtype, device="cuda")
    x[:k, :k] = torch.eye(k, dtype=dtype, device="cuda")
    x = x[:n] if n < k else x
    out = torch.full((x.shape[0], m), float("nan"), dtype=dtype, device="cuda")
    y = kernels.spmm_cuda(x, w.data, w.offsets, FORMAT_IDS[fmt], m, k, None, splits=splits, force_sparse=True,
                          out=out)
    torch.cuda.synchronize()
    cols = min(n, k)
    used = y[:cols].t().float().cpu()  # [m, cols]: the weight the kernel multiplied
    want = w_dense[:, :cols].float().cpu()
    nan = torch.isnan(y.float()).sum().item()
    extra = y[cols:].float().abs().max().item() if y.shape[0] > cols else 0.0
    ok = torch.equal(used, want) and nan == 0 and extra == 0
    print(f"{fmt.__name__} {dtype} m={m} k={k} n={x.shape[0]} splits={splits}: "
          f"{'OK' if ok else 'MISMATCH'} (NaN outputs {nan}, max |y| past the identity {extra:g})")
    if ok:
        return True
    bad = (used != want).nonzero().tolist()
    print(f"  {len(bad)} of {used.numel()} entries differ; used zero at {(used == 0).sum().item()}")
    where = {}
    if m * k <= 4096:
        for r in range(m):
            for c in range(cols):
                where[want[r, c].item()] = (r, c)
    moves = Counter()
    for r, c in bad[:4096]:
        src = where.get(used[r, c].item())
        if src is not None:
            moves[(r - src[0], c - src[1])] += 1
    for r, c in bad[:12]:
        print(f"  at (row {r}, col {c}): want {want[r, c].item():g}, got {used[r, c].item():g}"
              f" (= W{where.get(used[r, c].item(), '?')})")
    if moves:
        print("  most common (row, col) shifts from where a value belongs to where it landed:",
              moves.most_common(8))
    return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fmt", choices=FMTS, default="tiled-csl")
    ap.add_argument("--n", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--m", type=int, default=64)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--splits", type=int, nargs="+", default=[1])
    ap.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16")
    a = ap.parse_args()
    dtype = torch.float16 if a.dtype == "fp16" else torch.bfloat16
    ok = [probe(FMTS[a.fmt], a.m, a.k, n, s, dtype) for n in a.n for s in a.splits]
    raise SystemExit(0 if all(ok) else 1)


if __name__ == "__main__":
    main()

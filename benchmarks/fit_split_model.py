"""Refit the split model of the Tiled-CSL warpgroup kernels (``kernels.wg_split_model``: a lone block's share of a
full SM's round and the partial sums' weight) on recorded split sweeps, on the CPU (no GPU needed).

    python benchmarks/fit_split_model.py SWEEP [SWEEP ...] [--blocks wg32x2=4,wg64x2=3,wg64x2s2=4,wg128x2=2]
                                         [--shares 0.5:1.0:0.05] [--weights 0,0.05,0.1,0.15,0.25,0.4,0.5,0.75,1]
                                         [--density 0.2004] [--top 8]

A SWEEP is a JSON file in ``tests/data``'s form (``benchmarks/splits_sweep.py --json`` writes it): rows
``[m, k, n, kernel, {splits: us}]``, as one list or grouped (``{"sp0.7": [...], ...}``); ``FILE:GROUP`` takes one
group.  A group named ``sp<sparsity>[...]`` is at the density a Tiled-CSL weight of that sparsity reports (``1 - s +
0.0004``: the pads), every other row at ``--density`` (80 % sparsity's by default).  ``--blocks`` gives each kernel's
blocks per SM on the card that ran the sweep (the occupancy API's count; the H200's by default).

For the model as it is and for every (share, weight) on the grid (the pair at every density: both ends of
``wg_split_model``), ``plan`` picks a split count per row; the table lists the time at that count over the fastest
time: mean, worst, and on how many rows it is the fastest, the grid's best pairs first.  Session 37 fitted the
two-stage ``_wg64x2s2`` this way (``tests/data/splits_h200_s37_pdl_wg64.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import re

from flash_llm import kernels as K

DEFAULT_BLOCKS = "wg32x2=4,wg32x2p3=4,wg32x2p4=4,wg64x2=3,wg64x2s2=4,wg128x2=2,wg128x4=1"
_CONSTANTS = ("WG_LATENCY_SHARE", "WG_LATENCY_SHARE_DENSE", "WG_WS_WEIGHT", "WG_WS_WEIGHT_DENSE")


def load_rows(spec: str, density: float) -> list[tuple[float, int, int, int, str, dict[int, float]]]:
    """Rows ``(density, m, k, n, kernel, {splits: us})`` of sweep ``spec`` (``FILE`` or ``FILE:GROUP``)."""
    path, _, group = spec.partition(":") if not pathlib.Path(spec).exists() else (spec, "", "")
    rows = json.loads(pathlib.Path(path).read_text())["rows"]
    groups = {"": rows} if isinstance(rows, list) else rows
    if group and group not in groups:
        raise SystemExit(f"{path} has no group {group!r} (it has {', '.join(groups) or 'no groups'})")
    out = []
    for name, grp in groups.items():
        if group and name != group:
            continue
        sp = re.match(r"sp(\d*\.?\d+)", name)
        d = 1 - float(sp.group(1)) + 0.0004 if sp else density
        out += [(d, m, k, n, kernel, {int(s): t for s, t in times.items()}) for m, k, n, kernel, times in grp]
    return out


@contextlib.contextmanager
def model(share: float | None = None, weight: float | None = None):
    """``plan`` with one (share, weight) at every density (``None``: the model as it is)."""
    saved = [getattr(K, c) for c in _CONSTANTS]
    if share is not None:
        K.WG_LATENCY_SHARE = K.WG_LATENCY_SHARE_DENSE = share
        K.WG_WS_WEIGHT = K.WG_WS_WEIGHT_DENSE = weight
    K._plan.cache_clear()
    try:
        yield
    finally:
        for c, v in zip(_CONSTANTS, saved):
            setattr(K, c, v)
        K._plan.cache_clear()


def ratios(rows, blocks: dict[str, int], sms: int = 132) -> list[float]:
    """Per row, the time at ``plan``'s split count over the fastest time (``inf`` where the sweep lacks that count)."""
    out = []
    for d, m, k, n, kernel, times in rows:
        s = K.plan(m, k, n, d, sms, blocks[kernel], None, K.TILED_CSL, True).splits
        out.append(times.get(s, float("inf")) / min(times.values()))
    return out


def _grid(text: str) -> list[float]:
    if ":" in text:
        lo, hi, step = (float(v) for v in text.split(":"))
        return [round(lo + i * step, 6) for i in range(int(round((hi - lo) / step)) + 1)]
    return [float(v) for v in text.split(",")]


def main(argv=None) -> list[tuple[float, float, float, float, list[float]]]:
    """Print the table; return the grid's ``(mean, worst, share, weight, ratios)``, best first."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sweeps", nargs="+", help="tests/data sweep files, FILE or FILE:GROUP")
    p.add_argument("--blocks", default=DEFAULT_BLOCKS, help="blocks per SM by kernel, k=v,...")
    p.add_argument("--shares", default="0.5:1.0:0.05", help="lone-block shares: lo:hi:step or a,b,...")
    p.add_argument("--weights", default="0,0.05,0.1,0.15,0.25,0.4,0.5,0.75,1", help="partial-sum weights")
    p.add_argument("--density", type=float, default=0.2004, help="density of rows not grouped by sparsity")
    p.add_argument("--top", type=int, default=8, help="grid pairs to print")
    a = p.parse_args(argv)
    blocks = {k: int(v) for k, v in (e.split("=") for e in a.blocks.split(","))}
    rows = [r for spec in a.sweeps for r in load_rows(spec, a.density)]
    others = sorted({r[4] for r in rows if r[4] not in blocks})
    rows = [r for r in rows if r[4] in blocks]  # the one-warp kernels' rows (nt4, ...) have their own model
    if others:
        print(f"left out: the rows of {', '.join(others)} (not in --blocks)")
    if not rows:
        raise SystemExit("no rows")

    def line(label, rs):
        print(f"| {label} | {sum(rs) / len(rs):.4f} | {max(rs):.4f} | {sum(r == 1.0 for r in rs)} / {len(rs)} |")

    print(f"{len(rows)} rows; time at the plan's split count over the fastest")
    print("| model | mean | worst | fastest |\n|---|---|---|---|")
    with model():
        line("as it is", ratios(rows, blocks))
    results = []
    for share in _grid(a.shares):
        for weight in _grid(a.weights):
            with model(share, weight):
                rs = ratios(rows, blocks)
            results.append((sum(rs) / len(rs), max(rs), share, weight, rs))
    results.sort(key=lambda r: r[:4])
    for _, _, share, weight, rs in results[:a.top]:
        line(f"share {share:g}, weight {weight:g}", rs)
    return results


if __name__ == "__main__":
    main()

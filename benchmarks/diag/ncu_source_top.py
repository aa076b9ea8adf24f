"""The SASS instructions that gather most of Nsight Compute's warp-stall samples, from its source page (session 70).

    ncu ... --section SourceCounters --page source --print-source sass --csv <program> > src.csv
    python benchmarks/diag/ncu_source_top.py src.csv [--top 25] [--context 0]

Prints each instruction's share of all samples, its address and SASS, how often it ran, and its two largest stall
reasons (the CSV's ``stall_*`` columns), with ``--context`` instructions before it (a stall is charged to the
instruction that waits, so the one it waits for is usually a few lines up: session 70 found ``dr_place``'s wasted
prefetch that way, an ``IMAD.MOV`` right after a 16-byte load).  Reads the first table whose header starts with
``Address`` (ncu prints its messages and the program's output before it).
"""

from __future__ import annotations

import argparse
import csv
import sys


def _num(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def read(path: str) -> tuple[list[str], list[list[str]]]:
    """The header and rows of the source table in ``path``."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    starts = [i for i, r in enumerate(rows) if r and r[0] == "Address"]
    if not starts:
        sys.exit(f"{path}: no source table (a header starting with 'Address'); was ncu run with --page source --csv?")
    head = rows[starts[0]]
    return head, [r for r in rows[starts[0] + 1:] if len(r) == len(head)]


def top(head: list[str], rows: list[list[str]], n: int, context: int = 0) -> list[str]:
    """Report lines for the ``n`` instructions with the most stall samples."""
    col = {name: i for i, name in enumerate(head)}
    samples = col.get("Warp Stall Sampling (All Samples)")
    if samples is None:
        sys.exit("no 'Warp Stall Sampling (All Samples)' column: add --section SourceCounters")
    total = sum(_num(r[samples]) for r in rows) or 1.0
    reasons = [c for c in head if c.startswith("stall_") and "Not Issued" not in c]
    executed = col.get("Instructions Executed")
    order = sorted(range(len(rows)), key=lambda i: -_num(rows[i][samples]))[:n]
    out = [f"{len(rows)} instructions, {int(total)} samples"]
    for i in order:
        r = rows[i]
        why = sorted(((_num(r[col[c]]), c[6:]) for c in reasons), reverse=True)[:2]
        ran = f" ran {r[executed]}" if executed is not None else ""
        out.append(f"{100 * _num(r[samples]) / total:5.1f}%  {r[0][-6:]}  {r[1].strip()[:64]:64s}{ran}  "
                   + ", ".join(f"{name} {int(v)}" for v, name in why if v))
        for j in range(max(0, i - context), i):
            out.append(f"          {rows[j][0][-6:]}  {rows[j][1].strip()[:64]}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--context", type=int, default=0)
    a = ap.parse_args()
    head, rows = read(a.csv)
    print("\n".join(top(head, rows, a.top, a.context)))


if __name__ == "__main__":
    main()

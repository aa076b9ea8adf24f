"""The large-N path in column chunks: expand a K-slice of the weight, multiply it into fp32 sums while it sits in L2.

    python benchmarks/expand_chunks.py [--budgets 0,8,16,32] [--ns 128,256,512,2048] [--sparsities 50,80]
                                       [--formats bitmap,tiled-csl] [--shapes 9216x36864,...]

Why (issue 3: ``flash_llm.spmm`` must never run more than 1.25x slower than dense at any N up to 2048; at N = 128-512
it ran 0.35-0.57x, `benchmarks/RESULTS.md`): the expansion path writes the whole dense weight to device memory and
cuBLAS reads it back, 4 bytes an element beside dense's 2.  Expanding a few MB of columns at a time, each multiplied
right away (``torch.addmm`` with fp32 sums), keeps the dense chunk in L2.  For every (shape, format, sparsity, N):
median device time of ``F.linear`` on the dense weight, of ``flash_llm.spmm`` as dispatched, and of
``kernels._expand_and_gemm`` with each chunk budget in MB (0: the whole weight); all checked against ``F.linear``
first (within 2x its own error against fp64, plus an ulp).  CUDA graphs over copies rotated beyond 3x L2, events,
median.  Prints a table of speedups over dense (``--json`` writes the rows).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import _timing as T  # noqa: E402

import flash_llm  # noqa: E402
from flash_llm import kernels  # noqa: E402
from flash_llm.reference import FORMAT_IDS  # noqa: E402

FORMATS = {"bitmap": flash_llm.BitmapTiles, "tiled-csl": flash_llm.TiledCSL}


def _ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", default="0,8,16,32", help="chunk budgets in MB (0: the whole weight)")
    ap.add_argument("--ns", default="128,256,512,2048")
    ap.add_argument("--sparsities", default="50,80")
    ap.add_argument("--formats", default="bitmap,tiled-csl")
    ap.add_argument("--shapes", default="9216x36864,36864x9216,4096x14336,28672x8192", help="MxK,...")
    ap.add_argument("--replays", type=int, default=10)
    ap.add_argument("--json", help="write the rows here")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("expand_chunks.py needs a CUDA device")
        return 1
    budgets = [int(float(b) * 2**20) for b in a.budgets.split(",")]
    dtype = torch.float16
    gen = torch.Generator(device="cuda").manual_seed(3)
    rows = []
    print(f"{torch.cuda.get_device_name()}, L2 {T.l2_bytes() / 2**20:.0f} MB; speedup over F.linear (dense time in us)")
    head = ["shape", "fmt", "sp", "N", "dense us", "spmm"] + [f"{b >> 20} MB" if b else "whole" for b in budgets]
    print(" | ".join(head))
    for shape in a.shapes.split(","):
        m, k = map(int, shape.split("x"))
        for sp in _ints(a.sparsities):
            w = torch.randn(m, k, device="cuda", dtype=dtype, generator=gen)
            w.mul_(torch.rand(m, k, device="cuda", generator=gen) >= sp / 100)
            dense_copies = [w] + [w.clone() for _ in range(T.copies_needed(w.numel() * 2) - 1)]
            for fname in a.formats.split(","):
                cls = FORMATS[fname]
                comp = T.weight_copies(cls.from_dense(w))
                fid = FORMAT_IDS[cls]
                for n in _ints(a.ns):
                    x = torch.randn(n, k, device="cuda", dtype=dtype, generator=gen)
                    ref = torch.nn.functional.linear(x, w)
                    exact = (x.double() @ w.double().t())
                    tol = 2 * float((ref.double() - exact).abs().max()) + float(exact.abs().max()) * 2**-10
                    got = {"spmm": lambda c: flash_llm.spmm(x, c)}
                    for b in budgets:
                        got[b] = (lambda c, b=b: kernels._expand_and_gemm(x, c.data, c.offsets, fid, m, k, None,
                                                                          None, budget=b))
                    row = {"shape": shape, "format": fname, "sparsity": sp, "n": n}
                    for key, f in got.items():
                        err = float((f(comp[0]).double() - exact).abs().max())
                        if not err <= tol:
                            raise SystemExit(f"{shape} {fname} {sp} % N={n} {key}: error {err:.3g} > {tol:.3g}")
                    t_dense = T.time_calls([lambda d=d: torch.nn.functional.linear(x, d) for d in dense_copies],
                                           a.replays)
                    row["dense_us"] = 1e6 * t_dense
                    cells = []
                    for key, f in got.items():
                        t = T.time_calls([lambda c=c, f=f: f(c) for c in comp], a.replays)
                        name = key if key == "spmm" else f"chunk_{key >> 20}mb"
                        row[name + "_us"] = 1e6 * t
                        cells.append(f"{t_dense / t:.2f}")
                    rows.append(row)
                    print(" | ".join([shape, fname, str(sp), str(n), f"{1e6 * t_dense:.0f}"] + cells), flush=True)
                del comp
            del w, dense_copies
            torch.cuda.empty_cache()
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

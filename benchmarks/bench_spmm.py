"""Sparse matmul against dense cuBLAS on real LLM layer shapes.

    python benchmarks/bench_spmm.py [--quick] [--dtypes fp16,bf16] [--formats bitmap,tiled-csl]
                                    [--ns 1,8,...] [--sparsities 50,70,80,90] [--out DIR] [--overwrite]

For every (layer, sparsity, dtype, format, N): median device time of ``F.linear`` on the dense
weight, of the sparse kernel alone (where dispatched, and up to N = 128 where not) and of ``flash_llm.spmm``
as dispatched (``path``: "sparse", or "expand" for the expansion and cuBLAS); effective GB/s of the format's
bytes and its share of the measured copy bandwidth; speedups over dense in the same run.  Timing: CUDA graphs
of calls over copies rotated beyond 3x L2, CUDA events, median.
Writes ``results.json``, ``results.csv`` and ``speedup.png`` under ``--out`` (one that holds any of them is refused
without ``--overwrite``), prints a summary.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing as T  # noqa: E402

import flash_llm  # noqa: E402
from flash_llm import kernels  # noqa: E402
from flash_llm.reference import FORMAT_IDS  # noqa: E402

LAYERS = {  # model: {layer: (M, K)}
    "OPT-30B": {"qkv": (21504, 7168), "o": (7168, 7168), "up": (28672, 7168), "down": (7168, 28672)},
    "OPT-66B": {"qkv": (27648, 9216), "o": (9216, 9216), "up": (36864, 9216), "down": (9216, 36864)},
    "OPT-175B": {"qkv": (36864, 12288), "o": (12288, 12288), "up": (49152, 12288), "down": (12288, 49152)},
    "Llama-3-8B": {"qkv": (6144, 4096), "o": (4096, 4096), "up": (28672, 4096), "down": (4096, 14336)},
    "Llama-3-70B": {"qkv": (10240, 8192), "o": (8192, 8192), "up": (57344, 8192), "down": (8192, 28672)},
}
NS = [1, 8, 16, 32, 64, 128, 256, 512, 2048]
FORMATS = {"bitmap": flash_llm.BitmapTiles, "tiled-csl": flash_llm.TiledCSL, "delta-rows": flash_llm.DeltaRows}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
SPARSE_KERNEL_MAX_N = 128  # the sparse kernel is also timed up to here where dense is dispatched
OUTPUTS = ("results.json", "results.csv", "speedup.png")


def random_sparse(m, k, sparsity, dtype, gen):
    w = torch.randn(m, k, device="cuda", dtype=dtype, generator=gen)
    keep = torch.rand(m, k, device="cuda", generator=gen) >= sparsity
    return w.mul_(keep)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer shapes and N (a smoke run)")
    ap.add_argument("--dtypes", default="fp16,bf16")
    ap.add_argument("--formats", default="bitmap,tiled-csl")
    ap.add_argument("--ns", default=",".join(map(str, NS)))
    ap.add_argument("--sparsities", default="50,70,80,90")
    ap.add_argument("--models", default=",".join(LAYERS))
    ap.add_argument("--out", default="benchmarks/out/spmm")
    ap.add_argument("--overwrite", action="store_true", help="replace existing result files in --out")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():  # (it times the CUDA kernels against cuBLAS: nothing to run on a CPU)
        print("error: no CUDA device: bench_spmm.py times the CUDA kernels against cuBLAS", file=sys.stderr)
        return 2
    existing = [f for f in OUTPUTS if os.path.exists(os.path.join(args.out, f))]  # as bench_e2e.py
    if existing and not args.overwrite:
        print(f"error: {args.out} already holds {', '.join(existing)}; pass --overwrite or another --out",
              file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    ns = [int(v) for v in args.ns.split(",")]
    sparsities = [int(v) / 100 for v in args.sparsities.split(",")]
    models = args.models.split(",")
    if args.quick:
        models = ["Llama-3-8B", "OPT-66B"]
    env = T.environment()
    env["copy_bw_GBs"] = T.copy_bandwidth() / 1e9
    env["command"] = "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:]))
    print(json.dumps(env), flush=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for model in models:
        for layer, (m, k) in LAYERS[model].items():
            for dname in args.dtypes.split(","):
                dtype = DTYPES[dname]
                dense_w = torch.randn(m, k, device="cuda", dtype=dtype, generator=gen)
                dense_copies = [dense_w] + [dense_w.clone() for _ in range(T.copies_needed(dense_w.nbytes) - 1)]
                xs = {n: torch.randn(n, k, device="cuda", dtype=dtype, generator=gen) for n in ns}
                t_dense = {n: T.time_calls([lambda w=w, x=xs[n]: torch.nn.functional.linear(x, w)
                                            for w in dense_copies]) for n in ns}
                del dense_copies, dense_w
                for sp in sparsities:
                    wd = random_sparse(m, k, sp, dtype, gen)
                    for fname in args.formats.split(","):
                        w = FORMATS[fname].from_dense(wd)
                        copies = T.weight_copies(w)
                        fid = FORMAT_IDS[type(w)]
                        for n in ns:
                            x = xs[n]
                            t_spmm = T.time_calls([lambda c=c: flash_llm.spmm(x, c) for c in copies])
                            t_kernel = None
                            sparse = kernels.use_sparse_kernel(n, w.density, fid, kernels.wgmma_ok(0), m * k)
                            if sparse:
                                t_kernel = t_spmm  # the dispatcher runs the sparse kernel itself
                            elif n <= SPARSE_KERNEL_MAX_N and fname != "delta-rows":  # (no kernel above N = 8)
                                t_kernel = T.time_calls([
                                    lambda c=c: kernels.spmm_cuda(x, c.data, c.offsets, fid, m, k, None,
                                                                  force_sparse=True) for c in copies])
                            row = dict(model=model, layer=layer, M=m, K=k, sparsity=sp, dtype=dname, format=fname,
                                       N=n, path="sparse" if sparse else "expand", bytes=w.nbytes,
                                       t_dense_us=t_dense[n] * 1e6,
                                       t_kernel_us=t_kernel * 1e6 if t_kernel else None, t_spmm_us=t_spmm * 1e6,
                                       speedup_kernel=t_dense[n] / t_kernel if t_kernel else None,
                                       speedup_spmm=t_dense[n] / t_spmm)
                            tk = t_kernel or t_spmm
                            row["GBs"] = w.nbytes / tk / 1e9
                            row["pct_copy_bw"] = 100 * row["GBs"] / env["copy_bw_GBs"]
                            rows.append(row)
                            # "-": the sparse kernel alone is not timed at this N (spmm expands and calls cuBLAS)
                            kern = (f"{row['t_kernel_us']:8.1f}us x{row['speedup_kernel']:5.2f}" if t_kernel
                                    else f"{'-':>8s}   x{'-':>5s}")
                            print(f"{model:11s} {layer:4s} {m:6d}x{k:<6d} {dname} {fname:9s} sp={sp:.2f} N={n:5d} "
                                  f"dense {row['t_dense_us']:8.1f}us kernel {kern} spmm {row['t_spmm_us']:8.1f}us "
                                  f"spmm x{row['speedup_spmm']:5.2f} {row['GBs']:7.0f} GB/s ({row['pct_copy_bw']:.0f}%)",
                                  flush=True)
                        del copies, w
                    del wd
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"env": env, "rows": rows}, f, indent=1)
    with open(os.path.join(args.out, "results.csv"), "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    summary = summarize(rows)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(summary)
    plot(rows, os.path.join(args.out, "speedup.png"))
    print(summary)


def summarize(rows) -> str:
    """Median speedups over shapes, per format/dtype/sparsity, for N <= 32 and per N."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r["format"], r["dtype"], r["sparsity"], r["N"])].append(r)
    keys = sorted({(f, d, s) for f, d, s, _ in groups})
    ns = sorted({n for *_, n in groups})
    lines = ["| format | dtype | sparsity | kernel x (median, N<=32) | " +
             " | ".join(f"N={n}" for n in ns) + " | worst spmm x | % copy BW (large, N<=32) |",
             "|" + "---|" * (5 + len(ns) + 1)]
    for f, d, s in keys:
        small = [r["speedup_kernel"] for n in ns if n <= 32 for r in groups[(f, d, s, n)] if r["speedup_kernel"]]
        per_n = []
        for n in ns:
            vals = [r["speedup_kernel"] or r["speedup_spmm"] for r in groups[(f, d, s, n)]]
            per_n.append(f"{statistics.median(vals):.2f}" if vals else "-")
        worst = min(r["speedup_spmm"] for n in ns for r in groups[(f, d, s, n)])
        large = [r["pct_copy_bw"] for n in ns if n <= 32 for r in groups[(f, d, s, n)] if r["M"] * r["K"] >= 2.5e8]
        lines.append(f"| {f} | {d} | {int(s * 100)}% | {statistics.median(small):.2f} | " + " | ".join(per_n) +
                     f" | {worst:.2f} | {statistics.median(large) if large else float('nan'):.0f} |")
    if any(f == "delta-rows" for f, _, _ in keys):
        lines.append("\ndelta-rows runs its sparse kernels at N = 1-8 only (its kernel median is theirs; above, the "
                     "spmm expands to dense).")
    return "\n".join(lines) + "\n"


def plot(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fmts = [f for f in ("bitmap", "tiled-csl") if any(r["format"] == f for r in rows)] or ["bitmap"]
    fig, axes = plt.subplots(1, len(fmts), figsize=(6 * len(fmts), 4.5), sharey=True, squeeze=False)
    axes = axes[0]
    for ax, fmt in zip(axes, fmts):  # one panel per format benchmarked
        for sp in sorted({r["sparsity"] for r in rows}):
            pts = defaultdict(list)
            for r in rows:
                if r["format"] == fmt and r["sparsity"] == sp and r["dtype"] == rows[0]["dtype"]:
                    pts[r["N"]].append(r["speedup_spmm"])
            if pts:
                xs = sorted(pts)
                ax.plot(xs, [statistics.median(pts[n]) for n in xs], marker="o", label=f"{int(sp * 100)}%")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{fmt}: spmm speedup over cuBLAS (median of shapes)")
        ax.set_xlabel("N (tokens)")
        ax.legend()
    axes[0].set_ylabel("speedup")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()

"""Sparse matmul against dense cuBLAS on real LLM layer shapes.

    python benchmarks/bench_spmm.py [--quick] [--models Llama-3-8B,...] [--dtypes fp16,bf16]
                                    [--formats bitmap,tiled-csl] [--ns 1,8,...] [--sparsities 50,70,80,90]
                                    [--out DIR] [--overwrite]

For every (layer, sparsity, dtype, format, N): median device time of ``F.linear`` on the dense
weight, of the sparse kernel alone (where dispatched, and up to N = 128 where not) and of ``flash_llm.spmm``
as dispatched (``path``: "sparse", or "expand" for the expansion and cuBLAS); effective GB/s of the format's
bytes and its share of the measured copy bandwidth, from the kernel's time where it was timed, else from the spmm's
(``gbps_from``: "kernel" or "spmm"); speedups over dense in the same run, dense timed before and after each layer's
sparse variants (``t_dense_before_us``, ``t_dense_after_us``) and the faster of the two taken, so a drifting baseline
can only understate the speedups (``dense_drift``: after / before; ``dense_drift_flag``: more than 5 % from 1).
Timing: CUDA graphs of calls over copies rotated beyond 3x L2 (``rotated_bytes`` and ``dense_rotated_bytes``;
``below_3x_l2`` where the copy cap left them short of it), CUDA events, median.  On a CUDA machine where
``flash_llm.spmm`` would run its PyTorch reference instead of the kernels (``kernels.supported``), it refuses to run.
Writes ``results.json``, ``results.csv`` and ``speedup.png`` under ``--out`` (one that holds any of them is refused
without ``--overwrite``), prints a summary (also ``summary.md``) ending in PASS / FAIL / PARTIAL / n/a lines for
issue 3's targets (``target_checks``).  ``--quick`` runs the shapes of ``QUICK_MODELS`` only (every N of ``--ns``);
an explicit ``--models`` wins over it.  Unknown names in ``--models`` / ``--formats`` / ``--dtypes``, sparsities
outside [0, 100) and ``--ns`` other than positive integers are refused before anything runs; a refusal exits with
status 2.  A value repeated in a list is run once (the first in order).
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
QUICK_MODELS = ("Llama-3-8B", "OPT-66B")  # --quick (without --models): 8 of the 20 shapes, every N
FORMATS = {"bitmap": flash_llm.BitmapTiles, "tiled-csl": flash_llm.TiledCSL, "delta-rows": flash_llm.DeltaRows}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
DRIFT_FLAG = 0.05  # dense after / before further than this from 1: the row's dense_drift_flag
SPARSE_KERNEL_MAX_N = 128  # the sparse kernel is also timed up to here where dense is dispatched
OUTPUTS = ("results.json", "results.csv", "speedup.png")
LARGE_MK = 2.5e8  # "large shapes" (M * K at least this) for the copy-bandwidth column and target
# issue 3's targets (H100, same-run ratios against cuBLAS dense)
SMALL_NS = (1, 8, 16, 32)  # "N <= 32": the kernel's median speedup over the shapes at these N
BITMAP_TARGETS = {50: 1.6, 70: 2.4, 80: 3.2, 90: 5.0}  # sparsity %: bitmap kernel speedup, N <= 32
N64_SHARE = 0.8  # at N = 64, at least this share of the N <= 32 targets (bitmap)
TILED_TARGETS = {80: 1.8, 90: 3.5}  # sparsity %: Tiled-CSL kernel speedup, N <= 32
SPMM_FLOOR = 0.8  # spmm as dispatched never more than 1.25x slower than dense ...
SPMM_FLOOR_MAX_N = 2048  # ... at any N up to here, at any of these sparsities:
SPMM_FLOOR_SPARSITIES = (50, 70, 80, 90)
COPY_BW_TARGET = 85  # % of the measured copy bandwidth the kernel reads its bytes at, large shapes, N <= 32


def time_dense(copies: list[torch.Tensor], xs: dict[int, torch.Tensor]) -> dict[int, float]:
    """``{N: seconds}``: ``F.linear`` of each ``xs[N]`` on the dense weight, rotated over ``copies``."""
    return {n: T.time_calls([lambda w=w, x=x: torch.nn.functional.linear(x, w) for w in copies])
            for n, x in xs.items()}


def bracket_dense(rows: list[dict], before: dict, after: dict) -> None:
    """Give ``rows`` (one layer and dtype's rows, their ``N``, ``t_kernel_us`` and ``t_spmm_us`` set) the dense
    baseline timed ``before`` and ``after`` their sparse variants (``{N: seconds}``): both times
    (``t_dense_before_us``, ``t_dense_after_us``) and the faster one (``t_dense_us``), so a baseline that drifts over
    the variants (session 76: N = 1 up to 17 % slower after them) can only understate the speedups; the drift
    (``dense_drift``: after / before; ``dense_drift_flag``: further than ``DRIFT_FLAG`` from 1); the speedups over
    the faster time."""
    for row in rows:
        n = row["N"]
        row["t_dense_before_us"], row["t_dense_after_us"] = before[n] * 1e6, after[n] * 1e6
        row["t_dense_us"] = min(before[n], after[n]) * 1e6
        row["dense_drift"] = after[n] / before[n]
        row["dense_drift_flag"] = abs(row["dense_drift"] - 1) > DRIFT_FLAG
        row["speedup_kernel"] = row["t_dense_us"] / row["t_kernel_us"] if row["t_kernel_us"] else None
        row["speedup_spmm"] = row["t_dense_us"] / row["t_spmm_us"]


def print_row(row: dict) -> None:
    # "-": the sparse kernel alone is not timed at this N (spmm expands and calls cuBLAS)
    kern = (f"{row['t_kernel_us']:8.1f}us x{row['speedup_kernel']:5.2f}" if row["t_kernel_us"]
            else f"{'-':>8s}   x{'-':>5s}")
    drift = f"x{row['dense_drift']:.3f}" + (f" > {100 * DRIFT_FLAG:.0f} %" if row["dense_drift_flag"] else "")
    print(f"{row['model']:11s} {row['layer']:4s} {row['M']:6d}x{row['K']:<6d} {row['dtype']} {row['format']:9s} "
          f"sp={row['sparsity']:.2f} N={row['N']:5d} dense {row['t_dense_us']:8.1f}us (drift {drift}) "
          f"kernel {kern} spmm {row['t_spmm_us']:8.1f}us "
          f"spmm x{row['speedup_spmm']:5.2f} {row['GBs']:7.0f} GB/s ({row['pct_copy_bw']:.0f}%) of {row['gbps_from']}"
          + (" (rotation below 3x L2)" if row.get("below_3x_l2") else ""), flush=True)


def sparsity_pct(sparsity: float) -> int:
    """``sparsity`` (a fraction, as the rows hold it) in whole percent, as ``--sparsities`` gave it: rounded, not
    truncated (``int(0.57 * 100)`` is 56)."""
    return round(100 * sparsity)


def _items(ap, flag: str, value: str, known=None) -> list[str]:
    """The comma-separated names of ``value`` (blanks dropped, duplicates dropped in order: each point is timed and
    counted once, as bench_e2e.py's lists); ``ap.error`` naming ``flag`` for an empty list or a name not in ``known``
    (where given)."""
    items = list(dict.fromkeys(v.strip() for v in value.split(",") if v.strip()))
    if not items:
        ap.error(f"{flag} is empty; give comma-separated values")
    bad = [v for v in items if known is not None and v not in known]
    if bad:
        ap.error(f"{flag}: unknown {', '.join(map(repr, bad))}; choose from {', '.join(known)} (case matters)")
    return items


def ns_arg(text: str) -> list[int]:
    """``--ns``: comma-separated positive integers (blanks dropped, :func:`_timing.positive_ints`; duplicates
    dropped in order: until session 88 ``--ns 1,8,1`` timed N = 1 twice and counted it twice in the medians),
    checked when the arguments are parsed."""
    try:
        return list(dict.fromkeys(T.positive_ints(text)))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers (N: the rows of X), "
                                         f"got {text!r}") from None


def random_sparse(m, k, sparsity, dtype, gen):
    w = torch.randn(m, k, device="cuda", dtype=dtype, generator=gen)
    keep = torch.rand(m, k, device="cuda", generator=gen) >= sparsity
    return w.mul_(keep)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help=f"fewer shapes: the models {', '.join(QUICK_MODELS)} only (8 of the 20 shapes), every N of "
                         "--ns; an explicit --models wins")
    ap.add_argument("--dtypes", default="fp16,bf16", help=f"comma-separated, from {', '.join(DTYPES)}")
    ap.add_argument("--formats", default="bitmap,tiled-csl", help=f"comma-separated, from {', '.join(FORMATS)}")
    ap.add_argument("--ns", type=ns_arg, default=",".join(map(str, NS)),
                    help="comma-separated N, positive integers (tokens: the rows of X)")
    ap.add_argument("--sparsities", default="50,70,80,90", help="percent, integers in [0, 100)")
    ap.add_argument("--models", help=f"comma-separated, from {', '.join(LAYERS)} (default all; --quick: "
                                     f"{', '.join(QUICK_MODELS)})")
    ap.add_argument("--out", default="benchmarks/out/spmm")
    ap.add_argument("--overwrite", action="store_true", help="replace existing result files in --out")
    args = ap.parse_args(argv)
    # (every list checked before any timing: a bad name mid-sweep lost the layers timed before it)
    models = _items(ap, "--models", args.models or ",".join(QUICK_MODELS if args.quick else LAYERS), LAYERS)
    dtypes = _items(ap, "--dtypes", args.dtypes, DTYPES)
    formats = _items(ap, "--formats", args.formats, FORMATS)
    try:
        pcts = list(dict.fromkeys(int(v) for v in _items(ap, "--sparsities", args.sparsities)))  # (80 and 080)
    except ValueError as e:
        ap.error(f"--sparsities takes comma-separated integers: {e}")
    if any(not 0 <= s < 100 for s in pcts):
        ap.error(f"--sparsities are percentages in [0, 100) (80, not 0.8), got {pcts}")
    sparsities = [s / 100 for s in pcts]
    if not torch.cuda.is_available():  # (it times the CUDA kernels against cuBLAS: nothing to run on a CPU)
        print("error: no CUDA device: bench_spmm.py times the CUDA kernels against cuBLAS", file=sys.stderr)
        return 2
    existing = [f for f in OUTPUTS if os.path.exists(os.path.join(args.out, f))]  # as bench_e2e.py
    if existing and not args.overwrite:
        print(f"error: {args.out} already holds {', '.join(existing)}; pass --overwrite or another --out",
              file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    ns = args.ns
    # without them (no cuda-bindings, say) flash_llm.spmm runs its PyTorch reference: the rows would time that
    why = T.kernels_missing()
    if why:
        print(f"error: {why}", file=sys.stderr)
        return 2
    env = T.environment()
    env["copy_bw_GBs"] = T.copy_bandwidth() / 1e9
    env["command"] = T.command(__file__, argv)
    print(json.dumps(env), flush=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for model in models:
        for layer, (m, k) in LAYERS[model].items():
            for dname in dtypes:
                dtype = DTYPES[dname]
                dense_w = torch.randn(m, k, device="cuda", dtype=dtype, generator=gen)
                dense_copies = [dense_w] + [dense_w.clone() for _ in range(T.copies_needed(dense_w.nbytes) - 1)]
                dense_rotated = len(dense_copies) * dense_w.nbytes
                dense_short = T.rotation_shortfall(dense_w.nbytes, len(dense_copies))
                xs = {n: torch.randn(n, k, device="cuda", dtype=dtype, generator=gen) for n in ns}
                dense_before, layer_rows = time_dense(dense_copies, xs), []
                for sp in sparsities:
                    wd = random_sparse(m, k, sp, dtype, gen)
                    for fname in formats:
                        w = FORMATS[fname].from_dense(wd)
                        copies = T.weight_copies(w)
                        fid = FORMAT_IDS[type(w)]
                        for n in ns:
                            x = xs[n]
                            t_spmm = T.time_calls([lambda c=c: flash_llm.spmm(x, c) for c in copies])
                            t_kernel = None
                            # (what spmm decides: its density estimate from the array's size, X on 16 bytes)
                            sparse = kernels.dispatches_sparse(n, fid, w.data, m, k, 0,
                                                               k % 8 == 0 and x.data_ptr() % 16 == 0)
                            if sparse:
                                t_kernel = t_spmm  # the dispatcher runs the sparse kernel itself
                            elif n <= SPARSE_KERNEL_MAX_N and fname != "delta-rows":  # (DeltaRows: no forcing)
                                t_kernel = T.time_calls([
                                    lambda c=c: kernels.spmm_cuda(x, c.data, c.offsets, fid, m, k, None,
                                                                  force_sparse=True) for c in copies])
                            row = dict(model=model, layer=layer, M=m, K=k, sparsity=sp, dtype=dname, format=fname,
                                       N=n, path="sparse" if sparse else "expand", bytes=w.nbytes,
                                       t_kernel_us=t_kernel * 1e6 if t_kernel else None, t_spmm_us=t_spmm * 1e6,
                                       rotated_bytes=len(copies) * w.nbytes, dense_rotated_bytes=dense_rotated,
                                       below_3x_l2=bool(dense_short or T.rotation_shortfall(w.nbytes, len(copies))))
                            tk = t_kernel or t_spmm
                            row["GBs"] = w.nbytes / tk / 1e9
                            row["pct_copy_bw"] = 100 * row["GBs"] / env["copy_bw_GBs"]
                            row["gbps_from"] = "kernel" if t_kernel else "spmm"  # the time GBs / pct_copy_bw use
                            layer_rows.append(row)
                        del copies, w
                    del wd
                # dense again after the variants: the baseline is the faster of both (bracket_dense)
                bracket_dense(layer_rows, dense_before, time_dense(dense_copies, xs))
                for row in layer_rows:
                    print_row(row)
                rows.extend(layer_rows)
                del dense_copies, dense_w
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
    return 0


def _med(vals):
    return statistics.median(vals) if vals else float("nan")


def summarize(rows) -> str:
    """Median speedups over shapes, per format/dtype/sparsity, for N <= 32 and per N; then issue 3's verdicts."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r["format"], r["dtype"], r["sparsity"], r["N"])].append(r)
    keys = sorted({(f, d, s) for f, d, s, _ in groups})
    ns = sorted({n for *_, n in groups})
    lines = ["| format | dtype | sparsity | kernel x (median, N<=32) | " +
             " | ".join(f"N={n} kernel / spmm x" for n in ns) +
             f" | worst spmm x (target >= {SPMM_FLOOR}) | % copy BW of the kernel (large, N<=32) |",
             "|" + "---|" * (5 + len(ns) + 1)]
    fewer = False
    for f, d, s in keys:
        small = [r["speedup_kernel"] for n in ns if n <= 32 for r in groups[(f, d, s, n)] if r["speedup_kernel"]]
        per_n = []
        for n in ns:
            kern = [r["speedup_kernel"] for r in groups[(f, d, s, n)] if r["speedup_kernel"]]
            spmm = [r["speedup_spmm"] for r in groups[(f, d, s, n)]]
            mark = "*" if kern and len(kern) < len(spmm) else ""
            fewer |= bool(mark)
            per_n.append((f"{_med(kern):.2f}{mark}" if kern else "-") + " / " + (f"{_med(spmm):.2f}" if spmm else "-"))
        worst = min(r["speedup_spmm"] for n in ns for r in groups[(f, d, s, n)])
        large = [r["pct_copy_bw"] for n in ns if n <= 32 for r in groups[(f, d, s, n)]
                 if r["M"] * r["K"] >= LARGE_MK and r.get("gbps_from", "kernel") == "kernel"]
        lines.append(f"| {f} | {d} | {sparsity_pct(s)}% | {_med(small):.2f} | " + " | ".join(per_n) +
                     f" | {worst:.2f} | {_med(large):.0f} |")
    lines.append("\nPer N, *kernel* is the sparse kernel alone (forced where spmm expands to dense; '-' where not "
                 "timed) and *spmm* is `flash_llm.spmm` as dispatched (what callers get; the plot shows it)."
                 + (" *: the kernel median covers only the shapes it was timed on." if fewer else "")
                 + f" Large shapes: M * K >= {LARGE_MK:.1e}.")
    drifts = {(r["model"], r["layer"], r["dtype"], r["N"]): r["dense_drift"] for r in rows if "dense_drift" in r}
    if drifts:
        over = {(r["model"], r["layer"], r["dtype"], r["N"]): r["dense_drift"] for r in rows
                if r.get("dense_drift_flag")}
        lines.append(f"\nDense baseline drift (after / before the layer's sparse variants; the speedups use the faster "
                     f"time): max |drift - 1| {100 * max(abs(v - 1) for v in drifts.values()):.1f} %; "
                     f"{sum(bool(r.get('dense_drift_flag')) for r in rows)} of {len(rows)} rows over "
                     f"{100 * DRIFT_FLAG:.0f} %"
                     + (": " + ", ".join(f"{m} {lay} {d} N = {n} (x{v:.3f})" for (m, lay, d, n), v in over.items())
                        if over else "") + ".")
    short = sum(bool(r.get("below_3x_l2")) for r in rows)
    if short:
        lines.append(f"\n{short} rows rotated less than 3x L2 ({T.COPIES_CAP} copies at most, `below_3x_l2`): their "
                     "times may come from L2.")
    if any(f == "delta-rows" for f, _, _ in keys):
        dr = sorted({r["N"] for r in rows if r["format"] == "delta-rows" and r["path"] == "sparse"})
        lines.append("\ndelta-rows runs its sparse kernels at " + (f"N = {', '.join(map(str, dr))}" if dr else "no N")
                     + " in this run (its kernel median is theirs; elsewhere spmm expands to dense, and DeltaRows "
                     "takes no forced kernel).")
    lines.append("\nIssue 3's targets (H100; speedups over cuBLAS dense in the same run):\n")
    lines += [f"- {c}" for c in target_checks(rows)]
    return "\n".join(lines) + "\n"


def _verdict(ok, missing):
    """FAIL stays FAIL; a target met on some of its points only is PARTIAL."""
    return "FAIL" if not ok else "PARTIAL" if missing else "PASS"


def _not_run(covered: set, large: bool = False) -> str:
    """The shapes of ``LAYERS`` (those of M * K >= ``LARGE_MK`` where ``large``) missing from ``covered`` (``{(model,
    layer)}``), as text: a model none of whose shapes ran by its name, else its missing layers; "" where none is."""
    out = []
    for model, layers in LAYERS.items():
        want = [lay for lay, (m, k) in layers.items() if not large or m * k >= LARGE_MK]
        gone = [lay for lay in want if (model, lay) not in covered]
        if gone:
            out.append(model if len(gone) == len(want) else f"{model} {'/'.join(gone)}")
    return ", ".join(out)


def target_checks(rows) -> list[str]:
    """Issue 3's targets, each PASS / FAIL / PARTIAL (points missing: an N, a sparsity, or a shape of ``LAYERS``,
    as in a ``--quick`` or ``--models`` run) / n/a (none) with the numbers behind it.

    The kernel targets use ``speedup_kernel`` (the sparse kernel alone): the median over the shapes at N <= 32
    pooled over those N decides, and the median over the shapes at each N is printed beside it, naming the N whose
    median falls below the target.  The floor uses ``speedup_spmm`` (spmm as dispatched); the copy-bandwidth target
    uses ``pct_copy_bw`` of the rows timed on the kernel only."""
    pct = lambda r: sparsity_pct(r["sparsity"])  # noqa: E731
    out = []
    dtypes = list(DTYPES) + sorted({r["dtype"] for r in rows} - set(DTYPES))  # (one not run: n/a)

    def kernel_target(fmt, d, sp, target, want_ns, label):
        sel = [r for r in rows if r["format"] == fmt and r["dtype"] == d and pct(r) == sp and r["N"] in want_ns
               and r["speedup_kernel"]]
        n_txt = ", ".join(map(str, want_ns))
        if not sel:
            return f"n/a {fmt} {d} {sp} % N = {n_txt}: not run, or no kernel timing ({label})"
        shapes = {(r["model"], r["layer"]) for r in sel}
        per_n = {n: statistics.median(v) for n in want_ns if (v := [r["speedup_kernel"] for r in sel if r["N"] == n])}
        missing = [n for n in want_ns if n not in per_n]
        below = [n for n, v in per_n.items() if v < target]
        not_run = _not_run(shapes)
        med = statistics.median(r["speedup_kernel"] for r in sel)
        return (f"{_verdict(med >= target, missing or not_run)} {fmt} {d} {sp} % N = {n_txt}: kernel speedup "
                f"{med:.2f}x pooled (median of {len(sel)} points, {len(shapes)} shapes); per N "
                + "/".join(f"{per_n[n]:.2f}" if n in per_n else "-" for n in want_ns) + ": "
                + (f"below {target:g}x at N = {', '.join(map(str, below))}" if below else f"none below {target:g}x")
                + f" ({label})" + (f"; not run on {not_run}" if not_run else "")
                + (f"; no kernel timing at N = {', '.join(map(str, missing))}" if missing else ""))

    for d in dtypes:
        for sp, target in BITMAP_TARGETS.items():
            out.append(kernel_target("bitmap", d, sp, target, SMALL_NS, f"target >= {target}x"))
            out.append(kernel_target("bitmap", d, sp, N64_SHARE * target, (64,),
                                     f"target >= {N64_SHARE * target:.2f}x, {N64_SHARE * 100:.0f} % of {target}x"))
        for sp, target in TILED_TARGETS.items():
            out.append(kernel_target("tiled-csl", d, sp, target, SMALL_NS, f"target >= {target}x"))
    formats = list(dict.fromkeys(r["format"] for r in rows))
    for fmt in formats:
        for d in dtypes:
            sel = [r for r in rows if r["format"] == fmt and r["dtype"] == d and r["N"] <= SPMM_FLOOR_MAX_N
                   and pct(r) in SPMM_FLOOR_SPARSITIES]
            label = f"target >= {SPMM_FLOOR}x, N <= {SPMM_FLOOR_MAX_N}"
            if not sel:
                out.append(f"n/a {fmt} {d}: no spmm timing ({label})")
                continue
            w = min(sel, key=lambda r: r["speedup_spmm"])
            miss_sp = [s for s in SPMM_FLOOR_SPARSITIES if not any(pct(r) == s for r in sel)]
            miss_n = [n for n in NS if n <= SPMM_FLOOR_MAX_N and not any(r["N"] == n for r in sel)]
            not_run = _not_run({(r["model"], r["layer"]) for r in sel})
            out.append(f"{_verdict(w['speedup_spmm'] >= SPMM_FLOOR, miss_sp or miss_n or not_run)} {fmt} {d}: spmm "
                       f"(as dispatched) worst {w['speedup_spmm']:.2f}x dense at {w['model']} {w['layer']} "
                       f"{w['M']}x{w['K']} {pct(w)} % N = {w['N']} ({w['path']}) over {len(sel)} points ({label})"
                       + (f"; not run on {not_run}" if not_run else "")
                       + (f"; not run at {', '.join(f'{s} %' for s in miss_sp)}" if miss_sp else "")
                       + (f"; not run at N = {', '.join(map(str, miss_n))}" if miss_n else ""))
        for d in dtypes:
            sel = [r for r in rows if r["format"] == fmt and r["dtype"] == d and r["N"] <= 32
                   and r["M"] * r["K"] >= LARGE_MK and r.get("gbps_from") == "kernel"]
            label = f"target >= {COPY_BW_TARGET} %"
            if not sel:
                out.append(f"n/a {fmt} {d}: no kernel timing on a large shape (M * K >= {LARGE_MK:.1e}) at N <= 32 "
                           f"({label})")
                continue
            by_sp = defaultdict(list)
            for r in sel:
                by_sp[pct(r)].append(r["pct_copy_bw"])
            meds = {s: statistics.median(v) for s, v in sorted(by_sp.items())}
            miss_sp = [s for s in SPMM_FLOOR_SPARSITIES if s not in meds]
            shapes = ", ".join(dict.fromkeys(f"{r['model']} {r['layer']}" for r in sel))
            not_run = _not_run({(r["model"], r["layer"]) for r in sel}, large=True)
            out.append(f"{_verdict(min(meds.values()) >= COPY_BW_TARGET, miss_sp or not_run)} {fmt} {d}: kernel reads "
                       "its bytes at " + ", ".join(f"{v:.0f} % (at {s} % sparsity)" for s, v in meds.items())
                       + f" of the copy bandwidth (median per sparsity over N <= 32 on the large shapes, "
                       f"M * K >= {LARGE_MK:.1e}: {shapes}) ({label})"
                       + (f"; not run on {not_run}" if not_run else "")
                       + (f"; not run at {', '.join(f'{s} %' for s in miss_sp)}" if miss_sp else ""))
    return out


def plot_panels(rows) -> tuple[list[str], list[str]]:
    """The plot's grid: the formats (columns) and dtypes (rows of panels) benchmarked, in the order they ran."""
    fmts = list(dict.fromkeys(r["format"] for r in rows)) or ["bitmap"]
    return fmts, list(dict.fromkeys(r["dtype"] for r in rows)) or ["fp16"]


def plot(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fmts, dnames = plot_panels(rows)
    fig, axes = plt.subplots(len(dnames), len(fmts), figsize=(6 * len(fmts), 4.5 * len(dnames)), sharey=True,
                             squeeze=False)
    for row_axes, dname in zip(axes, dnames):  # one panel per format and dtype benchmarked
        for ax, fmt in zip(row_axes, fmts):
            for sp in sorted({r["sparsity"] for r in rows}):
                pts = defaultdict(list)
                for r in rows:
                    if r["format"] == fmt and r["sparsity"] == sp and r["dtype"] == dname:
                        pts[r["N"]].append(r["speedup_spmm"])
                if pts:
                    xs = sorted(pts)
                    ax.plot(xs, [statistics.median(pts[n]) for n in xs], marker="o", label=f"{sparsity_pct(sp)}%")
            ax.axhline(1.0, color="gray", lw=0.8)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{fmt} {dname}: spmm speedup over cuBLAS (median of shapes)")
            ax.set_xlabel("N (tokens)")
            ax.legend()
        row_axes[0].set_ylabel("speedup")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())

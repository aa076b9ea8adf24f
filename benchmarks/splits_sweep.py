"""Is the split-K heuristic (``flash_llm.kernels.plan``) right on a given layer?  Times the sparse kernel at every
split count from 1 up (those ``plan`` can produce: ``ceil(kt / ceil(kt / s)) == s``), against the heuristic's choice
and cuBLAS, all in one process (CUDA-graph replays, weights rotated beyond L2; ``_timing.time_calls``).  With
``--wg32 both`` the Tiled-CSL N = 9-32 points (``TCSL_WG32_DENSE_MIN_N`` .. 32) are timed with and without the warpgroup
kernel ``_wg32x2`` (``_wg32x2p3`` / ``_wg32x2p4`` by density), whatever ``kernels.tcsl_wg32_runs`` picks.

    python benchmarks/splits_sweep.py [--fmt tiled-csl] [--shapes 6144x4096,4096x4096,28672x4096,4096x14336]
                                      [--ns 16,32,64] [--sparsity 0.8[,0.7,...]] [--max-splits 16] [--wg32 both]
                                      [--pdl] [--json PATH]

Default shapes: Llama-3-8B's merged q/k/v, o, merged gate/up and down, the layers of the end-to-end decode.  Prints
one markdown row per (shape, N, kernel): the heuristic's splits and time, the best splits and time, cuBLAS, and the
time at every split count (microseconds; absolute times hold for the card it ran on).  ``--pdl`` times the sparse
kernels under ``kernels.static_weights()``, launched programmatically as the decode engine runs them (each spmm's blocks
load their first weight entries while the one before finishes).  Session 20 found the engine disagreeing with the plain
sweep: split counts the plain sweep timed as fast or faster ran Llama-3-8B's decode 5-8 % slower at batch 32 / 64.
``--sparsity`` takes several values (one table each); ``--json PATH`` also writes the rows in ``tests/data``'s form
(``{"source": ..., "rows": {"sp<sparsity>": [[m, k, n, kernel, {splits: us}], ...]}}``, what ``tests/test_plan.py``
reads).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

import torch
from _timing import copies_needed, time_calls

import flash_llm
from flash_llm import kernels as K
from flash_llm.reference import FORMAT_IDS


def sweep(a, cls, fmt, dev, sparsity, default_density, default_min_n) -> list:
    """One table: every shape and N of ``a`` at ``sparsity``; returns its rows ``[m, k, n, kernel, {splits: us}]``."""
    print(f"{torch.cuda.get_device_name()}: {a.fmt} at {sparsity:.0%}, fp16" +
          (", programmatic launches (static_weights)" if a.pdl else ""))
    print("| shape | N | kernel | heuristic splits: us | best splits: us | cuBLAS us | us by splits |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for shape in a.shapes.split(","):
        m, k = (int(v) for v in shape.split("x"))
        w = torch.randn(m, k, device="cuda", dtype=torch.float16)
        w.mul_(torch.rand(m, k, device="cuda") >= sparsity)
        fs = [cls.from_dense(w)]
        fs += [cls.from_dense(w) for _ in range(copies_needed(fs[0].nbytes) - 1)]
        ws = [w] + [w.clone() for _ in range(copies_needed(w.numel() * 2) - 1)]
        kt = -(-k // 64)
        cands = [s for s in range(1, min(a.max_splits, kt) + 1) if -(-kt // -(-kt // s)) == s]
        for n in (int(v) for v in a.ns.split(",")):
            x = torch.randn(n, k, device="cuda", dtype=torch.float16)
            ref = torch.nn.functional.linear(x, w).float()
            dense_us = time_calls([lambda c=c: torch.nn.functional.linear(x, c) for c in ws]) * 1e6
            variants = [{}]  # module settings a variant runs with: none, the library's own choice
            if (a.fmt == "tiled-csl" and a.wg32 == "both" and K.TCSL_WG32_DENSE_MIN_N <= n <= 32
                    and 1 - sparsity >= default_density):  # (not K's: the last variant left it at 2)
                # the warpgroup kernel from this N on, and no density reaching 2: the one-warp kernel
                variants = [{"TCSL_WG32_MIN_N": min(n, default_min_n)}, {"TCSL_WG32_MIN_DENSITY": 2.0}]
            for settings in variants:
                K.TCSL_WG32_MIN_DENSITY, K.TCSL_WG32_MIN_N = default_density, default_min_n
                for key, value in settings.items():
                    setattr(K, key, value)
                K._plan.cache_clear()
                density = K._density(fmt, fs[0].data, m, k)
                name, wg, shared = K.kernel_config(fmt, x.dtype, n, True, dev, density, m * k)
                threads = K.block_threads(name)
                chosen = K.plan(m, k, n, density, K.sm_count(dev), K.blocks_per_sm(name, dev, threads, shared),
                                None, fmt, wg).splits

                def run(c, s):
                    return K.spmm_cuda(x, c.data, c.offsets, fmt, m, k, None, splits=s, force_sparse=True)

                err = float((run(fs[0], None).float() - ref).abs().max())
                if err > 0.05 * float(ref.abs().max()) + 0.1:
                    raise SystemExit(f"{shape} N={n} {name}: max error {err} against F.linear")
                with K.static_weights() if a.pdl else contextlib.nullcontext():
                    times = {s: time_calls([lambda c=c, s=s: run(c, s) for c in fs]) * 1e6 for s in cands}
                    if chosen not in times:
                        times[chosen] = time_calls([lambda c=c: run(c, chosen) for c in fs]) * 1e6
                best = min(times, key=times.get)
                by = " ".join(f"{s}:{times[s]:.1f}" for s in sorted(times))
                kernel = name.split("_spmm_")[1].split("_", 1)[1]  # wg64x2, nt4, ...
                rows.append([m, k, n, kernel, {str(s): round(times[s], 1) for s in sorted(times)}])
                print(f"| {shape} | {n} | {name.split('_spmm_')[1]} | {chosen}: {times[chosen]:.1f} | "
                      f"{best}: {times[best]:.1f} | {dense_us:.1f} | {by} |", flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fmt", choices=["bitmap", "tiled-csl"], default="tiled-csl")
    ap.add_argument("--shapes", default="6144x4096,4096x4096,28672x4096,4096x14336")
    ap.add_argument("--ns", default="16,32,64")
    ap.add_argument("--sparsity", default="0.8", help="one or more sparsities, comma-separated")
    ap.add_argument("--max-splits", type=int, default=16)
    ap.add_argument("--wg32", choices=["on", "both"], default="both",
                    help="both: Tiled-CSL N = 9-32 with the warpgroup kernel and without it (TCSL_WG32_MIN_DENSITY = 2)")
    ap.add_argument("--pdl", action="store_true",
                    help="time the sparse kernels under kernels.static_weights() (programmatic launches, as the engine)")
    ap.add_argument("--json", metavar="PATH", help="also write the rows as tests/data's split sweeps")
    a = ap.parse_args(argv)
    try:
        sparsities = [float(v) for v in a.sparsity.split(",")]
        if not all(0.0 <= v < 1.0 for v in sparsities):
            raise ValueError
    except ValueError:
        raise SystemExit(f"--sparsity {a.sparsity!r}: comma-separated values in [0, 1)") from None
    if not torch.cuda.is_available():
        raise SystemExit("splits_sweep.py needs a CUDA GPU")
    cls = flash_llm.BitmapTiles if a.fmt == "bitmap" else flash_llm.TiledCSL
    fmt = FORMAT_IDS[cls]
    dev = torch.cuda.current_device()
    default_density, default_min_n = K.TCSL_WG32_MIN_DENSITY, K.TCSL_WG32_MIN_N
    out = {}
    try:
        for sparsity in sparsities:
            out[f"sp{sparsity:g}"] = sweep(a, cls, fmt, dev, sparsity, default_density, default_min_n)
    finally:
        K.TCSL_WG32_MIN_DENSITY, K.TCSL_WG32_MIN_N = default_density, default_min_n
        K._plan.cache_clear()
    if a.json:
        src = (f"benchmarks/splits_sweep.py {' '.join(sys.argv[1:] if argv is None else argv)} on one "
               f"{torch.cuda.get_device_name()} (flash_llm {flash_llm.__version__}), {a.fmt}, fp16, us by split count")
        with open(a.json, "w") as f:
            json.dump({"source": src, "rows": out}, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

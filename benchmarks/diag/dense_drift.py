"""Why ``bench_spmm.py``'s dense N = 1 baseline runs slower after a layer's sparse variants than before them
(session 76 / 78 quick runs: 13-18 % on OPT-66B's layers that rotate one copy).

One layer, timed as ``bench_spmm.py`` times it (``_timing.time_calls``: CUDA-graph replays, copies rotated past 3x L2),
in phases: before; after a burst of the sparse variants (``flash_llm.spmm`` at N = 1-32 on rotated compressed copies,
as the benchmark runs them); after an idle pause; after ``torch.cuda.empty_cache()``; after the burst again with
the compressed copies freed first.  Each phase prints the median of its repeats and the SM clock, temperature and
power from ``nvidia-smi``, so a drift that follows the clocks (power / heat) reads differently from one that follows
the allocator (the freed copies) or time alone.

    python benchmarks/diag/dense_drift.py [--layer OPT-66B:up] [--dtype bf16] [--n 1] [--burst-s 8] [--pause-s 8]
        [--burst-formats tiled-csl,bitmap] [--burst-ns 1,8,16,32,256,2048]

Session 79 (H100): with the default burst (Tiled-CSL, N = 1-32) dense N = 1 stayed within 0.4 %; the benchmark also
runs BitmapTiles and the large-N expansion between its two dense timings (``--burst-formats`` / ``--burst-ns``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import _timing as T  # noqa: E402
from bench_spmm import DTYPES, FORMATS, LAYERS, random_sparse, time_dense  # noqa: E402

import flash_llm  # noqa: E402


def smi() -> str:
    """SM clock, temperature and power as nvidia-smi reports them now ('' where it is missing)."""
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,clocks.mem,temperature.gpu,power.draw",
                               "--format=csv,noheader"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layer", default="OPT-66B:up", help="MODEL:LAYER of bench_spmm.LAYERS")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--n", type=int, default=1, help="the dense baseline's N")
    ap.add_argument("--repeats", type=int, default=5, help="dense timings a phase")
    ap.add_argument("--burst-s", type=float, default=8.0, help="seconds of sparse variants a burst")
    ap.add_argument("--pause-s", type=float, default=8.0, help="idle seconds of the pause phase")
    ap.add_argument("--burst-formats", default="tiled-csl", help=f"formats of the bursts ({', '.join(FORMATS)})")
    ap.add_argument("--burst-ns", default="1,8,16,32", help="N of the bursts' products (large N: the expansion)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: no CUDA device", file=sys.stderr)
        return 2
    why = T.kernels_missing()  # (as bench_spmm.py: its bursts would run the PyTorch reference, not the kernels)
    if why:
        print(f"error: {why}", file=sys.stderr)
        return 2
    model, layer = args.layer.split(":")
    m, k = LAYERS[model][layer]
    dtype = DTYPES[args.dtype]
    gen = torch.Generator(device="cuda").manual_seed(0)
    dense_w = torch.randn(m, k, device="cuda", dtype=dtype, generator=gen)
    copies = [dense_w] + [dense_w.clone() for _ in range(T.copies_needed(dense_w.nbytes) - 1)]
    xs = {args.n: torch.randn(args.n, k, device="cuda", dtype=dtype, generator=gen)}
    small = {n: torch.randn(n, k, device="cuda", dtype=dtype, generator=gen)
             for n in (int(v) for v in args.burst_ns.split(","))}
    formats = [FORMATS[f] for f in args.burst_formats.split(",")]
    print(f"{model} {layer} {m} x {k} {args.dtype}, dense N = {args.n}, {len(copies)} dense copies; "
          f"{torch.cuda.get_device_name()}", flush=True)
    table = []

    def phase(name):
        ts = [time_dense(copies, xs)[args.n] * 1e6 for _ in range(args.repeats)]
        table.append((name, statistics.median(ts), min(ts), max(ts), smi()))
        print(f"{name:28s} median {table[-1][1]:8.1f} us (min {min(ts):.1f}, max {max(ts):.1f})  [{table[-1][4]}]",
              flush=True)

    def burst(sparse_copies):  # each format's copies in turn, every N
        t_end = time.perf_counter() + args.burst_s
        while time.perf_counter() < t_end:
            for copies_of_format in sparse_copies:
                for x in small.values():
                    T.time_calls([lambda c=c, x=x: flash_llm.spmm(x, c) for c in copies_of_format], replays=3)

    def sparse_weights():
        wd = random_sparse(m, k, 0.8, dtype, gen)
        return [T.weight_copies(f.from_dense(wd)) for f in formats]

    phase("before")
    sparse_copies = sparse_weights()
    burst(sparse_copies)
    phase("after burst (copies held)")
    time.sleep(args.pause_s)
    phase(f"after {args.pause_s:g} s idle")
    del sparse_copies
    torch.cuda.synchronize()
    phase("copies freed")
    torch.cuda.empty_cache()
    phase("after empty_cache")
    sparse_copies = sparse_weights()
    burst(sparse_copies)
    del sparse_copies
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    phase("after burst, freed + emptied")
    base = table[0][1]
    print("\n| phase | median us | / before | nvidia-smi (sm clock, mem clock, temp, power) |\n|---|---|---|---|")
    for name, med, _, _, s in table:
        print(f"| {name} | {med:.1f} | {med / base:.3f} | {s} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A sparse kernel against cuBLAS on one weight, across N: CUDA-event medians of 20 replays of a CUDA graph of at
least 10 calls (a multiple of the rotating copies, so every copy is read: ``_timing.graph_calls``), after warming up
for 0.3 s (the SM clock ramps up under load: the sparse kernels are instruction-bound, so a
cold clock slows them while the memory-bound cuBLAS call does not notice).  Until session 6 each call was timed
alone, which let host delays into the time: small layers (4096 x 4096) read 80-200 us.

    python benchmarks/time_across_n.py [--fmt bitmap|tiled-csl] [--m 9216] [--k 36864] [--sparsity 0.8]
                                       [--ns 1,8,16,32,64] [--dtype fp16] [--force-sparse] [--pdl] [--l2-resident]

The weights rotate through enough copies to exceed 3x L2, each called as often in the graph (one copy at the default
shape, 680 MB dense; a 4096 x 14336 Tiled-CSL weight at 80 % is 47 MB and needs 4, its dense one 2).  Prints a markdown
table (same-run ratios; absolute times hold for the card it ran on).  Refused where ``flash_llm.spmm`` would run its
PyTorch reference instead of the kernels (``kernels.supported``: ``_timing.kernels_missing``).

What-ifs for the decode engine: ``--pdl`` times the sparse calls under ``kernels.static_weights()`` (launched
programmatically, as the engine launches them); ``--l2-resident`` times one copy of each weight, no rotation, so a
weight that fits in L2 is read from it (how fast a small layer could run if its weight were in L2 beforehand, e.g. asked
for during the kernels before it).
"""

import argparse
import contextlib
import sys
import time

import torch
from _timing import copies_needed, graph_calls, kernels_missing, positive_ints

import flash_llm
from flash_llm import kernels
from flash_llm.cli import sparsity_arg

REPS = 10  # calls per CUDA-graph replay at least (more: a multiple of the rotating copies, graph_calls)


def parse_args(argv=None) -> argparse.Namespace:
    """The options; a bad ``--sparsity`` or ``--ns`` is refused here (``ap.error``, exit status 2), before any CUDA
    work."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fmt", choices=["bitmap", "tiled-csl"], default="bitmap")
    ap.add_argument("--m", type=int, default=9216)
    ap.add_argument("--k", type=int, default=36864)
    ap.add_argument("--sparsity", type=sparsity_arg, default=0.8,
                    help="a fraction or a percentage (0.8, 80 and 80%% alike)")
    ap.add_argument("--ns", type=positive_ints, default=[1, 8, 16, 32, 64],
                    help="comma-separated token counts (checked here, before any CUDA work)")
    ap.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16")
    ap.add_argument("--force-sparse", action="store_true",
                    help="time the sparse kernel at every N (no expansion + cuBLAS for large N)")
    ap.add_argument("--pdl", action="store_true",
                    help="the sparse calls under kernels.static_weights() (as the engine)")
    ap.add_argument("--l2-resident", action="store_true", help="one copy of each weight, no rotation (L2 hits)")
    return ap.parse_args(argv)


def rotating(fn, copies):
    """A zero-argument call that applies ``fn`` to the next of ``copies`` each time."""
    it = [0]

    def call():
        it[0] += 1
        return fn(copies[it[0] % len(copies)])

    return call


def median_us(fn, calls: int = REPS) -> float:
    """Median time of one call: 20 replays of a CUDA graph of ``calls`` calls, after warming up for 0.3 s.  The graph
    takes the host (Python, launch) out of the time, so a slow or busy host cannot stretch it."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 0.3:
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(20)]
    for start, end in ev:
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    return sorted(s.elapsed_time(e) for s, e in ev)[10] * 1e3 / calls


def main(argv=None) -> int:
    a = parse_args(argv)
    why = kernels_missing()  # (as bench_spmm.py: refuse to time the PyTorch reference as the sparse kernel)
    if why:
        sys.exit(f"error: {why}")
    dtype = torch.float16 if a.dtype == "fp16" else torch.bfloat16
    w = torch.randn(a.m, a.k, device="cuda").to(dtype)
    w.mul_(torch.rand(a.m, a.k, device="cuda") >= a.sparsity)
    cls = flash_llm.BitmapTiles if a.fmt == "bitmap" else flash_llm.TiledCSL
    fs = [cls.from_dense(w)]
    if not a.l2_resident:
        fs += [cls.from_dense(w) for _ in range(copies_needed(fs[0].nbytes) - 1)]
    ws = [w] + ([] if a.l2_resident else [w.clone() for _ in range(copies_needed(w.numel() * w.element_size()) - 1)])
    f = fs[0]

    if a.force_sparse:
        from flash_llm.kernels import spmm_cuda
        from flash_llm.reference import FORMAT_IDS

        def sparse(x, c):
            return spmm_cuda(x, c.data, c.offsets, FORMAT_IDS[type(c)], c.shape[0], c.shape[1], None,
                             force_sparse=True)
    else:
        sparse = flash_llm.spmm

    print(f"{torch.cuda.get_device_name()}: {a.fmt} {a.m} x {a.k} {a.dtype} at {a.sparsity:.0%} "
          f"({len(fs)} / {len(ws)} rotating copies{', sparse calls under static_weights' if a.pdl else ''})")
    print(f"| N | {a.fmt} us | cuBLAS dense us | speedup | max err / cuBLAS's |")
    print("|---|---|---|---|---|")
    for n in a.ns:
        x = torch.randn(n, a.k, device="cuda").to(dtype)
        y, ref = flash_llm.spmm(x, f), x.double() @ w.double().t()  # the dispatched path's error
        err = float((y.double() - ref).abs().max()) / max(float((torch.nn.functional.linear(x, w).double() - ref)
                                                                 .abs().max()), 1e-30)
        with kernels.static_weights() if a.pdl else contextlib.nullcontext():
            ts = median_us(rotating(lambda c: sparse(x, c), fs), graph_calls(REPS, len(fs)))
        td = median_us(rotating(lambda c: torch.nn.functional.linear(x, c), ws), graph_calls(REPS, len(ws)))
        print(f"| {n} | {ts:.1f} | {td:.1f} | {td / ts:.2f}x | {err:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

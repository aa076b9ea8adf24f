"""Where a decode-attention launch's time goes: phase stamps of every block, from a kernel built with a tracing patch.

    git apply benchmarks/results/2026-11-30-s16/callC/attn_trace.patch   # adds a trace pointer to decode_attn_*
    python benchmarks/attn_trace.py [--batch 1] [--slots 256] [--layers 32]

The patch makes thread 0 of every block write ``%globaltimer`` (ns) and ``%clock64`` (SM cycles) at eight points:
0 entry, 1 after the programmatic wait, 2 after the barrier that publishes the rotated queries and key, 3 scores
done, 4 softmax statistics done, 5 values summed, 6 partials written and the ticket taken (or the output written),
7 the combine done (the last block only); and its SM.  The script captures the ``--layers`` launches (one cache per
layer, as ``bench_decode_attention.py``) in one CUDA graph, replays it, and prints for the last replay: the graph's
time per launch, each launch's span (first block's entry to the last stamp), the gap to the next launch's first
entry, the spread of the blocks' entries, and the median block's phases in SM cycles.  Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _timing import time_calls  # noqa: E402
from bench_decode_attention import decode_case  # noqa: E402

from flash_llm import kernels  # noqa: E402

PHASES = ["wait", "q/k rotated", "scores", "softmax", "values", "partials+ticket", "combine"]


def summarize(t: torch.Tensor) -> dict:
    """The numbers of the report from the stamps ``t`` [launches, blocks, 32] (int64: ``2 k`` the ns and ``2 k + 1``
    the cycles of stamp ``k``, 31 the SM): launch spans, gaps to the next launch and the spread of the blocks' entries
    (ns lists), the SM clock (cycles per ns, from the longest block), the SMs used, and per phase the median block's
    cycles and the median over launches of the cycles of each launch's last block to finish (the combine: only the
    blocks that ran it)."""
    layers, blocks = t.shape[0], t.shape[1]
    ns, cyc, sm = t[:, :, 0:16:2], t[:, :, 1:16:2], t[:, :, 31]
    last = torch.where(ns[:, :, 7] > 0, ns[:, :, 7], ns[:, :, 6])
    start, end = ns[:, :, 0].min(1).values, last.max(1).values
    i0, j0 = divmod(int((last - ns[:, :, 0]).argmax()), blocks)
    ghz = float(cyc[i0, j0, 6] - cyc[i0, j0, 0]) / max(1.0, float(ns[i0, j0, 6] - ns[i0, j0, 0]))
    dc = (cyc[:, :, 1:] - cyc[:, :, :-1]).double()
    slow = last.argmax(1)
    phases = {}
    for p, name in enumerate(PHASES):
        ran = cyc[:, :, 7] > 0 if name == "combine" else torch.ones_like(cyc[:, :, 0], dtype=torch.bool)
        col = dc[:, :, p][ran]
        sl = [float(dc[i, slow[i], p]) for i in range(layers) if ran[i, slow[i]]]
        phases[name] = (float(col.median()) if col.numel() else float("nan"),
                        statistics.median(sl) if sl else float("nan"))
    return {"spans": (end - start).tolist(), "gaps": (start[1:] - end[:-1]).tolist() or [0],
            "spread": (ns[:, :, 0].max(1).values - start).tolist(), "ghz": ghz,
            "sms": len(set(sm.flatten().tolist())), "phases": phases}


def report(t: torch.Tensor, per: float) -> None:
    """Print :func:`summarize` of the stamps ``t`` and the graph's seconds per launch ``per``."""
    r = summarize(t)
    spans, gaps, ghz = r["spans"], r["gaps"], r["ghz"]
    print(f"{r['sms']} SMs used; SM clock about {ghz:.2f} GHz")
    print(f"graph replay: {per * 1e6:.2f} us per launch")
    print(f"launch span (first entry to last stamp): median {statistics.median(spans) / 1e3:.2f} us "
          f"(min {min(spans) / 1e3:.2f}, max {max(spans) / 1e3:.2f})")
    print(f"gap to the next launch's first entry: median {statistics.median(gaps) / 1e3:.2f} us "
          f"(min {min(gaps) / 1e3:.2f}, max {max(gaps) / 1e3:.2f})")
    print(f"blocks' entry spread within a launch: median {statistics.median(r['spread']) / 1e3:.2f} us")
    print("| phase | median block, cycles | median block, us | slowest block (last of its launch), us |")
    print("|---|---|---|---|")
    for name, (med, slowest) in r["phases"].items():
        print(f"| {name} | {med:.0f} | {med / ghz / 1e3:.2f} | {slowest / ghz / 1e3:.2f} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--slots", type=int, default=256)
    ap.add_argument("--layers", type=int, default=32)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("attn_trace.py needs a CUDA GPU")
    if not hasattr(kernels, "_trace"):
        sys.exit("apply the tracing patch first (see the docstring)")
    dev, dt, b, slots = torch.device("cuda"), torch.float16, a.batch, a.slots
    h, hkv, d = 32, 8, 128
    gen = torch.Generator(device=dev).manual_seed(0)
    cache, mask, slot, q, k, v, cos, sin = decode_case(a.layers, b, h, hkv, d, slots, dt, gen, True)
    outs = [torch.empty(b, 1, h * d, dtype=dt, device=dev) for _ in range(a.layers)]
    splits = -(-slots // kernels.DECODE_ATTN_CHUNK)
    blocks = b * hkv * splits * -(-(h // hkv) // kernels.DECODE_ATTN_HEADS)
    tr = torch.zeros(a.layers, blocks, 32, dtype=torch.int64, device=dev)

    def call(i):
        def f():
            kernels._trace = tr[i]
            kernels.decode_attention_cuda(q, k, v, cache.k[i], cache.v[i], slot, mask, slots, d ** -0.5, out=outs[i],
                                          cos=cos, sin=sin)
            kernels._trace = None
        return f

    per = time_calls([call(i) for i in range(a.layers)], replays=20)
    print(f"{torch.cuda.get_device_name()}, batch {b}, {slots} slots ({splits} chunks), {blocks} blocks per launch, "
          f"{a.layers} launches per graph")
    report(tr.cpu(), per)
    return 0


if __name__ == "__main__":
    sys.exit(main())

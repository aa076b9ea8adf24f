"""Where a decode-attention launch's time goes: phase stamps of every block, from a kernel built with a tracing patch.

On a GPU machine (the device call's tree is a copy, so the patch may go on it; elsewhere patch a copy, as
``benchmarks/ab_kernel.sh``'s ``copy_tree`` does), from the repository root:

    git apply benchmarks/diag/attn_trace.patch     # decode_attn_*'s trace pointer, kernels.ATTN_TRACE
    export FLASH_LLM_CACHE=$PWD/benchmarks/out/flc_at
    python3 benchmarks/attn_trace.py --step --model llama-3-8b --format delta-rows --sparsity 0.8 --dtype bf16 \
        --fuse --merge                            # inside the engine's decode step (graph replay, PDL)
    python3 benchmarks/attn_trace.py --batch 1 --slots 256 --layers 32   # the kernel alone, 32 launches a graph

The cubins can be built without a GPU and carried (``benchmarks/out`` is ignored by git, so name it in the device
call's ``carry``): in a copy of the working tree with the patch applied,
``FLASH_LLM_CACHE=<checkout>/benchmarks/out/flc_at PYTHONPATH=$PWD python -m flash_llm.cli build --arch sm_90``.
Without that cache the patched kernels compile at first use (about a minute).

The patch makes thread 0 of every block write ``%globaltimer`` (ns) and ``%clock64`` (SM cycles) at nine points:
0 entry, 1 after the programmatic wait, 2 after the barrier that publishes the rotated queries and key, 3
scores done (the value rows asked for), 4 softmax statistics done, 5 values summed, 6 partials written (the global
combine: the ticket taken; one chunk: the output written), 7 the combine done (cluster: every block, after the last
cluster barrier; global: the last block only), 8 after the cluster's first barrier (cluster path only); and its SM
(word 31), blockIdx (28-30), the splits (24) and the cluster flag (25).  Each decode-attention launch recorded in a
CUDA graph while ``kernels.ATTN_TRACE`` is set writes its own slice of it, so a replay overwrites the same slices.

* The kernel alone: ``--layers`` launches (one cache per layer, as ``bench_decode_attention.py``) captured in one
  graph; for the last replay the graph's time per launch, each launch's span (first block's entry to the last stamp),
  the gap to the next launch's first entry, the spread of the blocks' entries, and the median block's phases.
* ``--step``: a synthetic model (``flash_llm.models.synthetic.build_synthetic``) in an ``Engine`` as
  ``profile_decode.py`` builds them; after a ``generate`` (compiles, captures) the decode graph is captured again with
  the trace on, replayed, and for its last replay printed per layer (attention launch): its span, the attention's
  critical part (the first block's release from its wait to the last stamp), the gap from the previous layer's last
  stamp to the first entry and to the first release, the spread of the blocks' entries and of their after-wait
  stamps, and the release skew (the last after-wait stamp of the blocks that were resident before the first release,
  after that release); then per phase the median over blocks and layers (globaltimer ns; SM cycles).  Needs a CUDA GPU.
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
from profile_decode import restart  # noqa: E402

from flash_llm import kernels  # noqa: E402
from flash_llm.cli import sparsity_arg  # noqa: E402

#: the stamps (word 2 k: globaltimer ns, 2 k + 1: clock64) and the other words of a block's 32
STAMPS = ["entry", "after wait", "q/k published", "scores", "softmax", "values", "partials", "combine",
          "cluster barrier"]
W_SPLITS, W_CLUSTER, W_SM = 24, 25, 31
#: the kernel-alone summary's phases: stamp p to p + 1 (the combine: only the blocks that ran it)
PHASES = ["wait", "q/k rotated", "scores", "softmax", "values", "partials+ticket", "combine"]
#: the step summary's phases: (name, from stamp, to stamp, only where this stamp is absent)
STEP_PHASES = [("wait", 0, 1, None), ("q/k published", 1, 2, None), ("scores", 2, 3, None),
               ("softmax", 3, 4, None), ("values", 4, 5, None), ("partials / output", 5, 6, None),
               ("cluster barrier", 6, 8, None), ("cluster combine", 8, 7, None), ("global combine", 6, 7, 8)]


def _blocks(t: torch.Tensor, i: int) -> torch.Tensor:
    """The rows of launch ``i``'s blocks that ran (some stamp word set): ``[blocks, 32]`` int64."""
    return t[i][(t[i, :, :2 * len(STAMPS)] != 0).any(1)]


def _ns_cycles(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The stamps' ns and cycles ``[blocks, len(STAMPS)]`` of ``rows`` (0 where a block did not write one)."""
    n = len(STAMPS)
    return rows[:, 0:2 * n:2], rows[:, 1:2 * n:2]


def _ghz(t: torch.Tensor) -> float:
    """The SM clock (cycles per ns) from the block that ran longest (entry to its last stamp), 0 without any."""
    best, ghz = -1, 0.0
    for i in range(t.shape[0]):
        ns, cyc = _ns_cycles(_blocks(t, i))
        if not len(ns):
            continue
        last = ns.argmax(1)
        dur = ns.gather(1, last[:, None])[:, 0] - ns[:, 0]
        j = int(dur.argmax())
        if int(dur[j]) > best:
            best = int(dur[j])
            ghz = float(cyc[j, last[j]] - cyc[j, 0]) / max(1.0, float(dur[j]))
    return ghz


def summarize(t: torch.Tensor) -> dict:
    """The kernel-alone report from the stamps ``t`` [launches, blocks, 32] (int64: ``2 k`` the ns and ``2 k + 1``
    the cycles of stamp ``k`` (:data:`STAMPS`), 31 the SM; a block without any stamp did not run): launch spans,
    gaps to the next launch and the spread of the blocks' entries (ns lists), the SM clock (cycles per ns, from the
    longest block), the SMs used, and per phase (:data:`PHASES`) the median block's cycles and the median over
    launches of the cycles of each launch's last block to finish (the combine: only the blocks that ran it)."""
    starts, ends, spread, sms, cols, slow = [], [], [], set(), {p: [] for p in PHASES}, {p: [] for p in PHASES}
    for i in range(t.shape[0]):
        rows = _blocks(t, i)
        ns, cyc = _ns_cycles(rows)
        last = ns.max(1).values
        starts.append(int(ns[:, 0].min()))
        ends.append(int(last.max()))
        spread.append(int(ns[:, 0].max()) - starts[-1])
        sms.update(rows[:, W_SM].tolist())
        s = int(last.argmax())
        for p, name in enumerate(PHASES):
            ran = cyc[:, p + 1] > 0
            dc = (cyc[:, p + 1] - cyc[:, p]).double()
            cols[name] += dc[ran].tolist()
            if ran[s]:
                slow[name].append(float(dc[s]))
    phases = {name: (statistics.median(cols[name]) if cols[name] else float("nan"),
                     statistics.median(slow[name]) if slow[name] else float("nan")) for name in PHASES}
    return {"spans": [e - s for s, e in zip(starts, ends)], "gaps": [s - e for s, e in zip(starts[1:], ends)] or [0],
            "spread": spread, "ghz": _ghz(t), "sms": len(sms), "phases": phases}


def summarize_step(t: torch.Tensor) -> dict:
    """The step report from the stamps ``t`` [launches, blocks, 32] of one replay (as :func:`summarize`; launch i is
    the i-th captured, so layer i).  ``layers``: per launch a dict of ns: ``span`` (first entry to last stamp),
    ``crit`` (first after-wait stamp, the release, to last stamp), ``gap`` and ``to_release`` (the previous launch's
    last stamp to this one's first entry / first release; None for the first), ``entry_spread`` and ``wait_spread``
    (last minus first entry / after-wait stamp), ``skew`` (the last after-wait stamp of the blocks that entered at or
    before the release, minus the release) and ``resident`` (how many blocks those are), ``blocks``, ``cluster``,
    ``sms``.  ``phases``: per :data:`STEP_PHASES` name that some block ran, ``(blocks, median ns, median cycles)`` over
    the blocks of every launch.  ``ghz``: the SM clock (:func:`_ghz`)."""
    layers, prev_end = [], None
    cols = {name: ([], []) for name, *_ in STEP_PHASES}
    for i in range(t.shape[0]):
        rows = _blocks(t, i)
        if not len(rows):
            continue
        ns, cyc = _ns_cycles(rows)
        entry, wait = ns[:, 0], ns[:, 1]
        first, end, release = int(entry.min()), int(ns.max()), int(wait.min())
        resident = entry <= release
        layers.append({"span": end - first, "crit": end - release,
                       "gap": None if prev_end is None else first - prev_end,
                       "to_release": None if prev_end is None else release - prev_end,
                       "entry_spread": int(entry.max()) - first, "wait_spread": int(wait.max()) - release,
                       "skew": int(wait[resident].max()) - release, "resident": int(resident.sum()),
                       "blocks": len(rows), "cluster": bool(rows[:, W_CLUSTER].any()),
                       "sms": len(set(rows[:, W_SM].tolist()))})
        prev_end = end
        for name, a, b, absent in STEP_PHASES:
            ran = (ns[:, a] > 0) & (ns[:, b] > 0)
            if absent is not None:
                ran &= ns[:, absent] == 0
            cols[name][0].extend((ns[ran, b] - ns[ran, a]).tolist())
            cols[name][1].extend((cyc[ran, b] - cyc[ran, a]).tolist())
    phases = {name: (len(d), statistics.median(d), statistics.median(c)) for name, (d, c) in cols.items() if d}
    return {"layers": layers, "phases": phases, "ghz": _ghz(t)}


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


def report_step(t: torch.Tensor) -> None:
    """Print :func:`summarize_step` of the stamps ``t``: a row per layer, its medians, and the phases."""
    r = summarize_step(t)
    ls, ghz = r["layers"], r["ghz"]

    def us(v):
        return "" if v is None else f"{v / 1e3:.2f}"

    keys = ["span", "crit", "gap", "to_release", "entry_spread", "wait_spread", "skew"]
    print(f"{len(ls)} attention launches, {ls[0]['blocks']} blocks each on {ls[0]['sms']} SMs, "
          f"{'cluster' if ls[0]['cluster'] else 'global'} combine; SM clock about {ghz:.2f} GHz")
    print("us; crit: the first release (after-wait stamp) to the last stamp; gap / to release: the previous layer's "
          "last stamp\nto the first entry / release; skew: the last release of the (n) blocks resident at the first")
    print("| layer | span | crit | gap | to release | entry spread | after-wait spread | skew (n) |")
    print("|---|---|---|---|---|---|---|---|")
    for i, x in enumerate(ls):
        print(f"| {i} | " + " | ".join(us(x[k]) for k in keys[:-1]) + f" | {us(x['skew'])} ({x['resident']}) |")
    med = {k: statistics.median([x[k] for x in ls if x[k] is not None] or [0]) for k in keys}
    print("| median | " + " | ".join(us(med[k]) for k in keys) + " |")
    print("\n| phase | blocks | median ns (globaltimer) | median cycles | cycles as ns |\n|---|---|---|---|---|")
    for name, (n, d, c) in r["phases"].items():
        print(f"| {name} | {n} | {d:.0f} | {c:.0f} | {c / ghz if ghz else float('nan'):.0f} |")


def _trace_off(why: str) -> None:
    sys.exit(f"attn_trace.py: {why}; apply benchmarks/diag/attn_trace.patch to this tree and run with it on "
             "PYTHONPATH (see the docstring)")


def alone(a) -> int:
    """The kernel alone: ``--layers`` launches in one graph (see the docstring)."""
    dev, dt, b, slots = torch.device("cuda"), torch.float16, a.batch, a.slots
    h, hkv, d = 32, 8, 128
    gen = torch.Generator(device=dev).manual_seed(0)
    cache, mask, slot, q, k, v, cos, sin = decode_case(a.layers, b, h, hkv, d, slots, dt, gen, True)
    outs = [torch.empty(b, 1, h * d, dtype=dt, device=dev) for _ in range(a.layers)]
    splits = -(-slots // kernels.DECODE_ATTN_CHUNK)
    blocks = b * hkv * -(-slots // 32) * -(-(h // hkv) // kernels.DECODE_ATTN_HEADS)  # (32-slot chunks at most)
    tr = torch.zeros(a.layers, blocks, 32, dtype=torch.int64, device=dev)

    def call(i):
        return lambda: kernels.decode_attention_cuda(q, k, v, cache.k[i], cache.v[i], slot, mask, slots, d ** -0.5,
                                                     out=outs[i], cos=cos, sin=sin)

    kernels.ATTN_TRACE, kernels.ATTN_TRACE_NEXT = tr, 0
    try:
        per = time_calls([call(i) for i in range(a.layers)], replays=20)
    finally:
        kernels.ATTN_TRACE = None
    t = tr.cpu()
    if not bool((t[:, :, 0] > 0).any()):
        _trace_off("the trace stayed all zeros (a kernel built without the patch?)")
    print(f"{torch.cuda.get_device_name()}, batch {b}, {slots} slots ({splits} chunks of 64), "
          f"{int((t[0, :, 0] > 0).sum())} blocks per launch, {a.layers} launches per graph")
    report(t, per)
    return 0


def step(a) -> int:
    """The decode step: a synthetic model in an Engine, its decode graph captured with the trace on (docstring)."""
    from flash_llm.engine import Engine
    from flash_llm.models import preset
    from flash_llm.models.synthetic import build_synthetic

    cfg = preset(a.model)
    if a.num_layers:
        cfg = cfg.replace(num_layers=a.num_layers)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[a.dtype]
    model, _ = build_synthetic(cfg, a.sparsity or None, dtype=dtype, fmt=a.format, progress=False)
    eng = Engine(model, max_batch=a.batch, max_seq=a.max_seq, fuse=a.fuse, merge=a.merge, formats="keep")
    prompts = torch.randint(3, cfg.vocab_size, (a.batch, 64)).tolist()
    eng.generate(prompts, 4, eos_token_id=None)  # compiles, captures the graph of this batch size (untraced)
    key = max(k for k in eng._graphs if k[0] == a.batch)
    groups = -(-(cfg.num_heads // cfg.num_kv_heads) // kernels.DECODE_ATTN_HEADS)
    blocks = a.batch * cfg.num_kv_heads * -(-a.max_seq // 32) * groups  # (32-slot chunks at most)
    tr = torch.zeros(2 * cfg.num_layers, blocks, 32, dtype=torch.int64, device="cuda")
    kernels.ATTN_TRACE, kernels.ATTN_TRACE_NEXT = tr, 0
    try:
        graph = eng._capture(*key)  # the same step again, each attention launch recorded with its own trace slice
    finally:
        kernels.ATTN_TRACE = None
    n = kernels.ATTN_TRACE_NEXT
    if n == 0:
        sys.exit("attn_trace.py: the captured decode step launched no flash-llm decode attention (--fuse?)")
    restart(eng)  # every replay advances the slot: restart inside the cache
    for _ in range(a.replays):
        graph.replay()
    torch.cuda.synchronize()
    tr.zero_()
    graph.replay()  # the one reported
    torch.cuda.synchronize()
    t = tr[:n].cpu()
    if not bool((t[:, :, 0] > 0).any()):
        _trace_off("the trace stayed all zeros (a kernel built without the patch?)")
    print(f"{torch.cuda.get_device_name()}: {a.model} ({cfg.num_layers} layers) {a.format} {100 * a.sparsity:g} % "
          f"{a.dtype} fuse={a.fuse} merge={a.merge}, batch {a.batch}, decode graph of {key[1]} slots, replay "
          f"{a.replays + 1}")
    report_step(t)
    return 0


def parse_args(argv=None) -> argparse.Namespace:
    """The options; a bad ``--sparsity`` is refused here (``ap.error``, exit status 2), before any CUDA work."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--slots", type=int, default=256, help="the kernel alone: slots attended")
    ap.add_argument("--layers", type=int, default=32, help="the kernel alone: launches (caches) per graph")
    ap.add_argument("--step", action="store_true", help="trace the attention inside the engine's decode step")
    ap.add_argument("--model", default="llama-3-8b")
    ap.add_argument("--format", default="delta-rows", choices=("bitmap", "tiled-csl", "delta-rows"))
    ap.add_argument("--sparsity", type=sparsity_arg, default=0.8,
                    help="a fraction or a percentage (0.8, 80 and 80%% alike; 0: the dense model)")
    ap.add_argument("--dtype", choices=("fp16", "bf16"), default="bf16")
    ap.add_argument("--num-layers", type=int, default=None, help="--step: build only this many decoder layers")
    ap.add_argument("--fuse", action="store_true")
    ap.add_argument("--merge", action="store_true")
    ap.add_argument("--max-seq", type=int, default=256)
    ap.add_argument("--replays", type=int, default=5, help="--step: replays before the one reported")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("attn_trace.py needs a CUDA GPU")
    if not hasattr(kernels, "ATTN_TRACE"):
        _trace_off("flash_llm.kernels has no ATTN_TRACE")
    return step(a) if a.step else alone(a)


if __name__ == "__main__":
    sys.exit(main())

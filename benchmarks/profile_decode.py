"""Where one decode step's time goes: every kernel of a captured decode step, grouped by kind.

Builds a synthetic model (random weights at real shapes, ``flash_llm.models.build_synthetic``), captures the
engine's decode step in a CUDA graph as ``Engine.generate`` does, then

* times graph replays with CUDA events (median; this is the time per output token, without sampling), and
* profiles a few replays with ``torch.profiler`` (CUPTI records the kernels a graph launches) and groups the
  kernels of one replay by kind: count, summed device time, and the replay's span (first kernel start to last
  kernel end).  ``span - busy`` is the time no kernel of the step ran: launch gaps between dependent nodes.
* Programmatically launched kernels start while the kernel before them runs and wait, resident, for it; their
  device times then overlap and their sum passes the span.  So each group also gets its **critical** time
  (:func:`critical_times`): every instant of the replay goes to the earliest-started kernel still running (the one
  the later ones wait for), and instants when none runs are the idle time.  Critical times and idle add up to the
  span.

Prints a table (largest groups first) and writes ``--out`` (JSON) with every kernel name.

    python benchmarks/profile_decode.py --model llama-3-8b --format tiled-csl --sparsity 0.8 --batch 1 \\
        --fuse --merge --out decode_profile.json
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys

import torch

from flash_llm.cli import sparsity_arg
from flash_llm.engine import Engine
from flash_llm.models import preset
from flash_llm.models.synthetic import build_synthetic

# kernel name -> group (first match wins); names are demangled CUDA symbols
GROUPS = [
    ("sparse matmul", r"bitmap_spmm|tiled_csl_spmm|delta_rows_spmm|delta_rows_parts"),
    ("split-K reduce", r"splitk_reduce|delta_rows_reduce"),
    # (before cuBLAS: PyTorch's memory-efficient and flash attention kernels carry "cutlass" in their names)
    ("attention", r"fmha|attention|flash|(?i:softmax)|efficient|decode_attn"),
    ("dense matmul (cuBLAS)", r"gemm|gemv|sm90_xmma|cutlass|cublas|nvjet"),
    ("compiled elementwise (Triton)", r"^triton_"),
    ("KV cache write", r"index_copy|indexCopy|index_put|scatter"),
    ("copy / cast", r"copy|Copy|cast"),
    ("other elementwise", r"elementwise|vectorized|reduce|unrolled"),
]


def group_of(name: str) -> str:
    for g, pat in GROUPS:
        if re.search(pat, name):
            return g
    return "other"


def replay_kernels(prof, replays: int) -> list[list[dict]]:
    """The kernels of each replay, in start order (:func:`split_replays`)."""
    ks = sorted(({"name": e.name, "start": e.time_range.start, "end": e.time_range.end}
                 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                key=lambda k: k["start"])
    return split_replays([k for k in ks if not k["name"].startswith(("Memcpy", "Memset"))], replays)


#: the smallest gap (us) taken for the host's synchronize and relaunch between two profiled replays
REPLAY_GAP_MIN_US = 50.0


def split_replays(ks: list[dict], replays: int) -> list[list[dict]]:
    """Kernels ``ks`` (sorted by start) of ``replays`` graph replays run one after another with a host synchronize
    between them -> the last ``replays`` runs of kernels separated by such a gap: gaps (start after every kernel
    before it ended) of at least half the ``replays - 1``-th largest and at least :data:`REPLAY_GAP_MIN_US`.  Kernels
    before the first replay (a fill before the loop) form a run of their own and are dropped.  (Until session 22 the
    kernels were cut into equal counts: one kernel off, each "replay" began with the last kernel of the one before
    and the host's gap, 300-600 us counted as idle.)"""
    if not ks:
        return []
    gaps, frontier = [], ks[0]["end"]
    for i in range(1, len(ks)):
        gaps.append((ks[i]["start"] - frontier, i))
        frontier = max(frontier, ks[i]["end"])
    sizes = sorted((g for g, _ in gaps), reverse=True)
    cut = max(REPLAY_GAP_MIN_US, 0.5 * sizes[replays - 2]) if 2 <= replays <= len(sizes) + 1 else REPLAY_GAP_MIN_US
    bounds = [0] + [i for g, i in gaps if g >= cut] + [len(ks)]
    runs = [ks[a:b] for a, b in zip(bounds, bounds[1:])]
    return runs[-replays:]


def critical_times(ks: list[dict]) -> tuple[list[float], float]:
    """For kernels ``ks`` (dicts with ``start``, ``end``, sorted by start) of one replay: each kernel's critical time
    (the instants when it is the earliest-started kernel still running) and the idle time (no kernel running).  In a
    chain where each kernel waits for the one before it, that is the time each kernel holds up the step."""
    out, idle = [], 0.0
    frontier = ks[0]["start"] if ks else 0.0  # the instant up to which time has been handed out
    for k in ks:
        if k["start"] > frontier:
            idle += k["start"] - frontier
            frontier = k["start"]
        out.append(max(0.0, k["end"] - frontier))
        frontier = max(frontier, k["end"])
    return out, idle


def layer_timeline(ks: list[dict]) -> list[tuple[str, float, float]]:
    """The decoder layer's timeline from kernels ``ks`` (dicts with ``name``, ``start``, ``end``, sorted by start) of
    one replay: the kernels between one attention launch and the next (the attention, o, the MLP, the next layer's
    q/k/v), each with its median start and end over the layers, in us from its segment's attention start.  Only the
    segments of the most common kernel count are used (the first and last layers differ); ``[]`` without two
    attention kernels."""
    at = [i for i, k in enumerate(ks) if group_of(k["name"]) == "attention"]
    segs = [ks[a:b] for a, b in zip(at, at[1:])]
    if not segs:
        return []
    n = statistics.mode(len(s) for s in segs)
    segs = [s for s in segs if len(s) == n]
    out = []
    for j in range(n):
        starts = [s[j]["start"] - s[0]["start"] for s in segs]
        ends = [s[j]["end"] - s[0]["start"] for s in segs]
        out.append((segs[0][j]["name"], statistics.median(starts), statistics.median(ends)))
    return out


_SDPA = None


def restart(eng: Engine, slot: int = 64) -> None:
    """Put every row of ``eng``'s captured decode back at cache slot and position ``slot``: each graph replay advances
    both, and a position past the cache would index the RoPE tables (``max_seq`` rows) out of bounds."""
    eng._slot.fill_(slot)
    eng._pos.fill_(slot)


def parse_args(argv=None) -> argparse.Namespace:
    """The options, checked before any CUDA work (a bad one: ``ap.error``, exit status 2)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-3-8b")
    ap.add_argument("--format", default="tiled-csl", choices=("bitmap", "tiled-csl", "delta-rows"))
    ap.add_argument("--sparsity", type=sparsity_arg, default=0.8,
                    help="a fraction or a percentage (0.8, 80 and 80%% alike); 0 for the dense model")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", choices=("fp16", "bf16"), default="fp16",
                    help="the model's dtype (bf16 DeltaRows weights get coded values, as in bench_e2e.py)")
    ap.add_argument("--layers", type=int, default=None, help="build only this many decoder layers")
    ap.add_argument("--fuse", action="store_true")
    ap.add_argument("--merge", action="store_true")
    ap.add_argument("--replays", type=int, default=5)
    ap.add_argument("--sdpa", default="default", choices=("default", "efficient", "math", "cudnn", "flash"),
                    help="restrict scaled_dot_product_attention to one backend (torch.nn.attention.sdpa_kernel); "
                         "turns flash-llm's decode-attention kernel off, so the step uses it")
    ap.add_argument("--out", default=None)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_decode.py needs a CUDA device", file=sys.stderr)
        return 2
    cfg = preset(a.model)
    if a.layers:
        cfg = cfg.replace(num_layers=a.layers)
    if a.sdpa != "default":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = {"efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH,
                   "cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[a.sdpa]
        from flash_llm.models import _common

        if _common.DECODE_ATTENTION != "0":  # (else the step attends in flash-llm's kernel and --sdpa changes nothing)
            print("--sdpa: flash-llm's decode-attention kernel off (FLASH_LLM_DECODE_ATTENTION=0), so the step attends "
                  "through scaled_dot_product_attention", file=sys.stderr)
            _common.DECODE_ATTENTION = "0"
        global _SDPA  # kept referenced: a collected context manager restores the backends (session 7's bug)
        _SDPA = sdpa_kernel(backend)
        _SDPA.__enter__()  # for the whole process: capture and replays
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[a.dtype]
    model, _ = build_synthetic(cfg, a.sparsity or None, dtype=dtype, fmt=a.format, progress=False)
    eng = Engine(model, max_batch=a.batch, max_seq=256, fuse=a.fuse, merge=a.merge, formats="keep")
    prompts = torch.randint(3, cfg.vocab_size, (a.batch, 64)).tolist()
    eng.generate(prompts, 4, eos_token_id=None)  # compiles, captures the graph of this batch size
    graph = eng._decode_graph(a.batch)

    restart(eng)  # warm-up replays; every timed batch restarts at slot 64, inside the cache
    for _ in range(20):
        graph.replay()
    times = []
    for _ in range(30):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        restart(eng)
        e0.record()
        for _ in range(10):
            graph.replay()
        e1.record()
        torch.cuda.synchronize()
        times.append(e0.elapsed_time(e1) / 10 * 1e3)
    step_us = statistics.median(times)

    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        restart(eng)
        torch.cuda.synchronize()
        for _ in range(a.replays):
            graph.replay()
            torch.cuda.synchronize()  # a gap between replays
    reps = replay_kernels(prof, a.replays)
    rows = []
    for ks in reps:
        if not ks:
            continue
        busy = sum(k["end"] - k["start"] for k in ks)
        span = ks[-1]["end"] - ks[0]["start"]
        rows.append((len(ks), busy, span))
    ks = reps[len(reps) // 2] if reps else []
    crit, idle = critical_times(ks)
    groups: dict[str, list[float]] = {}
    for k, c in zip(ks, crit):
        g = groups.setdefault(group_of(k["name"]), [0, 0.0, 0.0])
        g[0] += 1
        g[1] += k["end"] - k["start"]
        g[2] += c
    names: dict[str, list[float]] = {}
    for k in ks:
        n = names.setdefault(k["name"][:90], [0, 0.0])
        n[0] += 1
        n[1] += k["end"] - k["start"]
    head = (f"{a.model} layers={cfg.num_layers} {a.format if a.sparsity else 'dense'} sparsity={a.sparsity} "
            f"batch={a.batch} fuse={a.fuse} merge={a.merge} sdpa={a.sdpa} on {torch.cuda.get_device_name()}")
    print(head)
    print(f"graph replay (events, median of 30 x 10): {step_us:.0f} us per step")
    for n, busy, span in rows:  # (busy sums each kernel's own span: programmatic launches overlap, so it can exceed it)
        gap = (f"idle {span - busy:.0f} us" if busy <= span else
               f"kernels overlapping by {busy - span:.0f} us (programmatic launches waiting resident)")
        print(f"profiled replay: {n} kernels, busy {busy:.0f} us, span {span:.0f} us, {gap}")
    print(f"critical path of the middle replay: {sum(crit):.0f} us in kernels, {idle:.0f} us idle")
    print("\n| group | kernels | device us | us per kernel | critical us |\n|---|---|---|---|---|")
    for g, (c, t, cr) in sorted(groups.items(), key=lambda kv: -kv[1][2]):
        print(f"| {g} | {c} | {t:.0f} | {t / c:.1f} | {cr:.0f} |")
    print(f"| (idle) | | | | {idle:.0f} |")
    print("\ntop kernels by time:")
    for nm, (c, t) in sorted(names.items(), key=lambda kv: -kv[1][1])[:25]:
        print(f"  {t:8.0f} us {c:5d}x  {nm}")
    tl = layer_timeline(ks)
    if tl:
        print("\nlayer timeline (us from the attention's start, medians over the layers):")
        for nm, t0, t1 in tl:
            print(f"  {t0:7.1f} .. {t1:7.1f}  {nm[:60]}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"setup": head, "step_us": step_us, "replays": rows, "groups": groups, "idle_us": idle,
                       "kernels": [(k["name"], k["end"] - k["start"], c, k["start"] - ks[0]["start"])
                                   for k, c in zip(ks, crit)]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

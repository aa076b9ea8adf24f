"""Where a batch-1 projection's time goes inside a captured decode step: phase stamps of every ``_n1r`` block.

    git apply benchmarks/results/2026-12-01-s24/n1_trace.patch    # adds a trace pointer to tiled_csl_spmm_<dtype>_n1r / _n1rs
    python benchmarks/n1_trace.py [--model llama-3-8b] [--sparsity 0.8] [--out n1_trace.json]

The patch makes lane 0 of every block of the N = 1 fused kernels write ``%globaltimer`` (ns) at: 0 entry, 1 after the
programmatic wait (X and the previous kernel's writes visible), 2 after the walk over its tiles, 3 its row sums
stored (before the ticket), 4 ticket taken, 5 the last block of a row group: its sums and epilogue stored; word 15
is the SM.  This script builds the synthetic model, captures the engine's batch-1 decode step as ``Engine.generate``
does, replays it, and prints per projection (the median over the layers, us): how long after the previous traced
kernel's last store the first block is released from its wait (``dep``; for o it includes the attention), the
first-to-last entry of its blocks, the release-to-walk-end of the median and the slowest block, the last ticket,
and the last store.  Timing-only: the stamps cost a few instructions per block.  Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

from flash_llm import kernels
from flash_llm.cli import sparsity_arg
from flash_llm.engine import Engine
from flash_llm.models import preset
from flash_llm.models.synthetic import build_synthetic
from profile_decode import restart  # (this folder is the script's first import path)


def launch_phases(r: torch.Tensor) -> dict:
    """Stamps ``r`` [blocks, 16] (int64 ns; 0 where not written) of one launch -> its phase times (ns, absolute), and
    per SM its blocks and when its last walk ended (from the first release: balanced work ends together)."""
    ent, wait, walk, post, end = r[:, 0], r[:, 1], r[:, 2], r[:, 4], r[:, 5]
    act = wait > 0
    last = end[end > 0]
    w0 = int(wait[act].min())
    sm_ids, sm_of = torch.unique(r[act, 15], return_inverse=True)
    counts = torch.bincount(sm_of).double()
    ends = torch.zeros(len(sm_ids), dtype=torch.float64).scatter_reduce(0, sm_of, (walk[act] - w0).double(), "amax")
    corr = torch.corrcoef(torch.stack([counts, ends]))[0, 1].nan_to_num(0.0)  # (0 when either is constant)
    return {"sm_blocks_min": int(counts.min()), "sm_blocks_max": int(counts.max()), "sm_end_min": float(ends.min()),
            "sm_end_med": float(ends.sort().values[len(ends) // 2]), "sm_end_max": float(ends.max()),
            "sm_end_corr": float(corr), "entry0": int(ent.min()), "entry1": int(ent.max()), "wait0": w0,
            "wait1": int(wait[act].max()), "walk_med": int(walk[act].median()), "walk_max": int(walk[act].max()),
            "ticket_max": int(post[act].max()), "end": int(last.max()) if last.numel() else int(post[act].max()),
            "sms": len(set(r[:, 15].tolist())), "blocks": r.shape[0]}


def kind_of(name: str, m: int, k: int, cfg) -> str:
    if "n1rs" in name:
        return "qkv" if m < 2 * cfg.intermediate_size else "gate/up"
    return "down" if k == cfg.intermediate_size else "o"


def parse_args(argv=None) -> argparse.Namespace:
    """The options, checked before any CUDA work (a bad one: ``ap.error``, exit status 2)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-3-8b")
    ap.add_argument("--sparsity", type=sparsity_arg, default=0.8,
                    help="a fraction or a percentage (0.8, 80 and 80%% alike)")
    ap.add_argument("--replays", type=int, default=20)
    ap.add_argument("--out", default=None)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    if not torch.cuda.is_available():
        print("n1_trace.py needs a CUDA device", file=sys.stderr)
        return 2
    if not hasattr(kernels, "_trace"):
        print("n1_trace.py needs benchmarks/results/2026-12-01-s24/n1_trace.patch applied", file=sys.stderr)
        return 2
    cfg = preset(a.model)
    model, _ = build_synthetic(cfg, a.sparsity, fmt="tiled-csl", progress=False)
    buf = torch.zeros(1 << 26, dtype=torch.int64, device="cuda")
    kernels._trace = {"buf": buf, "next": 0, "log": []}
    eng = Engine(model, max_batch=1, max_seq=256, fuse=True, merge=True, formats="keep")
    prompts = torch.randint(3, cfg.vocab_size, (1, 64)).tolist()
    eng.generate(prompts, 4, eos_token_id=None)  # compiles, captures the batch-1 graph
    graph = eng._decode_graph(1)
    log = list(kernels._trace["log"])
    kernels._trace = None
    times = []
    for _ in range(a.replays):
        restart(eng)
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        graph.replay()
        e1.record()
        torch.cuda.synchronize()
        times.append(e0.elapsed_time(e1) * 1e3)
    buf.zero_()
    restart(eng)
    graph.replay()  # the traced replay: only the graph's launches write their records now
    torch.cuda.synchronize()
    host = buf.cpu()
    launches = []
    for name, m, k, blocks, splits, off in log:
        r = host[off:off + 16 * blocks * splits].view(-1, 16)
        if int(r[:, 0].max()) == 0:
            continue  # an eager launch before the capture
        launches.append({"kind": kind_of(name, m, k, cfg), "name": name, "m": m, "k": k, "splits": splits,
                         **launch_phases(r)})
    if not launches:
        print("no traced launch in the graph", file=sys.stderr)
        return 1
    for prev, cur in zip(launches, launches[1:]):
        cur["dep"] = cur["wait0"] - prev["end"]
    launches[0]["dep"] = float("nan")
    us = 1e-3
    print(f"{a.model} tiled-csl {a.sparsity} batch 1 on {torch.cuda.get_device_name()}: graph replay "
          f"{statistics.median(times):.0f} us (median of {a.replays}); {len(launches)} traced launches; "
          f"first entry to last store {(launches[-1]['end'] - launches[0]['entry0']) * us:.0f} us")
    cols = [("dep", lambda L: L["dep"]), ("entries", lambda L: L["entry1"] - L["entry0"]),
            ("entry->release", lambda L: L["wait0"] - L["entry0"]), ("release spread", lambda L: L["wait1"] - L["wait0"]),
            ("walk med", lambda L: L["walk_med"] - L["wait0"]), ("walk max", lambda L: L["walk_max"] - L["wait0"]),
            ("-> last ticket", lambda L: L["ticket_max"] - L["walk_max"]), ("-> last store", lambda L: L["end"] - L["ticket_max"]),
            ("release->store", lambda L: L["end"] - L["wait0"])]
    print("\nus, median over the layers (dep: from the previous traced kernel's last store to this one's first release;"
          " o's includes the attention)")
    print("| projection | splits | blocks | SMs | " + " | ".join(c for c, _ in cols) + " |")
    print("|---|---|---|---|" + "---|" * len(cols))
    for kind in ("qkv", "o", "gate/up", "down"):
        Ls = [L for L in launches if L["kind"] == kind]
        if not Ls:
            continue
        vals = []
        for _, f in cols:
            xs = [f(L) for L in Ls if f(L) == f(L)]
            vals.append(f"{statistics.median(xs) * us:.2f}" if xs else "-")
        print(f"| {kind} | {Ls[0]['splits']} | {Ls[0]['blocks']} | {Ls[0]['sms']} | " + " | ".join(vals) + " |")
    print("\nper SM (median over the layers): blocks on an SM, and when its last walk ended (us from the release); corr:"
          " the correlation of an SM's blocks with its end")
    print("| projection | blocks / SM min | max | SM end min | median | max | corr |\n|---|---|---|---|---|---|---|")
    for kind in ("qkv", "o", "gate/up", "down"):
        Ls = [L for L in launches if L["kind"] == kind]
        if Ls:
            med = {c: statistics.median(L[c] for L in Ls) for c in ("sm_blocks_min", "sm_blocks_max", "sm_end_min",
                                                                      "sm_end_med", "sm_end_max", "sm_end_corr")}
            print(f"| {kind} | {med['sm_blocks_min']:.0f} | {med['sm_blocks_max']:.0f} | {med['sm_end_min'] * us:.2f} | "
                  f"{med['sm_end_med'] * us:.2f} | {med['sm_end_max'] * us:.2f} | {med['sm_end_corr']:.2f} |")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"replay_us": times, "launches": launches}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""DeltaRows' parts layout against its split layout at 1-8 tokens, per projection shape (the op alone, in CUDA graphs,
weights rotated beyond L2, cuBLAS on the dense weight in the same run).

    python benchmarks/dr_parts_tokens.py [--model llama-3-8b|opt-30b] [--sparsity 0.8] [--ns 1,2,3,4,5,8]
                                         [--l2-resident] [--atomics] [--pdl]

Why: the parts layout's multi-token kernels (``delta_rows_parts_<dtype>_nt<NT>``) stage all of K for NT tokens in
every block (``kernels.parts_nt_window``), where the split layout's stage their block's window; where all of K does not
fit ``kernels.DR_NT_STAGE_MAX`` (Llama-3-8B's down, K = 14336, from 3 tokens) they read X from global memory.  The
parts layout is the batch-1 layout (``Engine(delta_layout="auto")`` at ``max_batch`` 1; ``"dual"``'s DeltaRows set
serves 1-2 tokens); this shows what it costs at a few tokens.  Session 35 (H200, 80 %): Llama-3-8B's down 41.9 us in
the parts layout at 2 tokens against 21.7 split, q/k/v and o faster in parts (11.5 / 10.0 against 14.3 / 13.0);
OPT-30B's every kind slower in parts from 2 tokens.  fp16; prints us a call and the speedup over cuBLAS.

``--atomics`` times the split layout twice at 2-8 tokens, its splits summed by ``delta_rows_reduce`` ("split red",
``kernels.DR_NT_ATOMIC`` off) and by the kernel's fp32 atomics ("split atomic", at any split count), and prints
each kind's split count: where the atomics gain, by the split count (``kernels.DR_NT_ATOMIC_MIN_SPLITS``).
``--pdl`` times the sparse calls under ``kernels.static_weights()``, launched programmatically as the engine launches
them: there the reduction's launch overlaps the kernel before it, which plain launches do not show (session 49: the
atomics ran even alone on OPT-30B's 4-16-split layers, yet its decode step at batch 2 was 2 % slower with them).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from unittest import mock

import torch

from flash_llm import DeltaRows, kernels, spmm
from flash_llm.cli import _positive, sparsity_arg
from flash_llm.formats.delta_rows import auto_parts

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _timing import kernels_missing, positive_ints, time_calls, weight_copies  # noqa: E402

#: projection shapes [M, K] (merged as the engine runs them)
MODELS = {
    "llama-3-8b": {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)},
    "opt-30b": {"qkv": (21504, 7168), "o": (7168, 7168), "fc1": (28672, 7168), "fc2": (7168, 28672)},
}


def parse_args(argv=None) -> argparse.Namespace:
    """The options, checked before any CUDA work (a bad one: ``ap.error``, exit status 2)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3-8b", choices=sorted(MODELS))
    ap.add_argument("--sparsity", type=sparsity_arg, default=0.8,
                    help="a fraction or a percentage (0.8, 80 and 80%% alike)")
    ap.add_argument("--ns", type=positive_ints, default="1,2,3,4,5,8")
    ap.add_argument("--replays", type=_positive, default=20)
    ap.add_argument("--l2-resident", action="store_true",
                    help="also time each layout on one copy of its weight, no rotation (read from L2 where it fits)")
    ap.add_argument("--atomics", action="store_true",
                    help="the split layout's splits summed by the reduction and by atomics, both timed (2-8 tokens)")
    ap.add_argument("--pdl", action="store_true", help="the sparse calls under kernels.static_weights() (as the engine)")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("dr_parts_tokens.py times CUDA kernels: no GPU here")
    why = kernels_missing()  # (as bench_spmm.py: refuse to time the PyTorch reference as the sparse kernel)
    if why:
        sys.exit(f"error: {why}")
    ns = args.ns
    gen = torch.Generator(device="cuda").manual_seed(0)
    dev, dt = torch.device("cuda"), torch.float16
    rows = []
    for kind, (m, k) in MODELS[args.model].items():
        dense = torch.randn(m, k, generator=gen, device=dev).to(dt)
        dense *= torch.rand(m, k, generator=gen, device=dev) >= args.sparsity
        ws = {"split": DeltaRows.from_dense(dense, parts=1)}
        print(f"{kind} [{m}, {k}]: {ws['split'].splits} splits in the split layout", flush=True)
        p = auto_parts(m, k, int((dense != 0).sum()), dev, normed=False)
        if p > 1:
            ws[f"parts {p}"] = DeltaRows.from_dense(dense, parts=p)
        copies = {name: weight_copies(w) for name, w in ws.items()}
        dcopies = [dense] + [dense.clone() for _ in range(len(copies["split"]) - 1)]
        for n in ns:
            x = torch.randn(n, k, generator=gen, device=dev).to(dt)
            want = x.float() @ dense.float().t()
            row = {"kind": kind, "n": n}
            row["cublas"] = 1e6 * time_calls([lambda d=d: torch.nn.functional.linear(x, d) for d in dcopies],
                                             replays=args.replays)
            runs = [(name, cs, None) for name, cs in copies.items()]
            if args.atomics and n > 1:
                runs[0:1] = [("split red", copies["split"], False), ("split atomic", copies["split"], True)]
            for name, cs, atomic in runs:
                # (the atomics on or off at every split count, kernels.DR_NT_ATOMIC_MIN_SPLITS included)
                switch = (contextlib.nullcontext() if atomic is None
                          else mock.patch.multiple(kernels, DR_NT_ATOMIC=atomic, DR_NT_ATOMIC_MIN_SPLITS=2))
                with switch:
                    got = spmm(x, cs[0]).float()
                    err = (got - want).abs().max().item()
                    if err > 4 * 2**-10 * (1 + want.abs().max().item()):
                        sys.exit(f"{kind} {name} n={n}: max error {err} against the fp32 product")
                    with kernels.static_weights() if args.pdl else contextlib.nullcontext():
                        row[name] = 1e6 * time_calls([lambda w=w: spmm(x, w) for w in cs], replays=args.replays)
                        if args.l2_resident:
                            row[name + " L2"] = 1e6 * time_calls([lambda: spmm(x, cs[0])] * len(cs),
                                                                 replays=args.replays)
            rows.append(row)
            print("  ".join(f"{key} {v:.1f}" if isinstance(v, float) else f"{key} {v}" for key, v in row.items()),
                  flush=True)
        del copies, dcopies
        torch.cuda.empty_cache()
    print(f"\n{args.model} at {args.sparsity:.0%}, us a call (speedup over cuBLAS)"
          + (", sparse calls under static_weights" if args.pdl else ""))
    for r in rows:
        cells = [f"{key} {v:.1f} ({r['cublas'] / v:.2f}x)" for key, v in r.items()
                 if key not in ("kind", "n", "cublas")]
        print(f"{r['kind']:8s} N={r['n']}  cublas {r['cublas']:.1f}  " + "  ".join(cells))


if __name__ == "__main__":
    main()

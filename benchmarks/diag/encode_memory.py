"""The encoders' and decoders' peak device memory on real layer shapes (session 66), and the GPU encoding checked
against the CPU's, array for array.

For each shape: a bf16 weight pruned to ``--sparsity`` on the device, then each step alone with the allocator's peak
reset before it; printed is the peak above what was allocated before the step, in MiB and as a multiple of the dense
weight's bytes (the output included).

    python3 benchmarks/diag/encode_memory.py [--shapes 28672x4096,49152x12288] [--sparsity 80] [--device cuda]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from flash_llm import DeltaRows, TiledCSL  # noqa: E402

MiB = 2 ** 20


def _pruned(m: int, k: int, sparsity: float, device: str) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(m * 7 + k)
    w = torch.empty(m, k, dtype=torch.bfloat16, device=device)
    rows = max(1, (1 << 26) // k)
    t = float(torch.special.ndtri(torch.tensor(1.0 - (1.0 - sparsity) / 2, dtype=torch.float64)))
    for r in range(0, m, rows):
        v = torch.randn(min(rows, m - r), k, generator=g, device=device)
        w[r:r + rows] = v.masked_fill_(v.abs() < t, 0.0)
    return w


def measure(label: str, fn, dense_bytes: int, device: str):
    """(result, line): ``fn()``'s peak above the memory allocated before it."""
    if device != "cuda":
        t = time.perf_counter()
        out = fn()
        return out, f"  {label:34s} {time.perf_counter() - t:7.2f} s"
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated() - before
    return out, f"  {label:34s} {dt:7.2f} s  peak +{peak / MiB:9.1f} MiB  ({peak / dense_bytes:5.2f}x the dense weight)"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="28672x4096,49152x12288")
    ap.add_argument("--sparsity", type=float, default=80)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--check", default="28672x4096", help="shapes whose GPU encoding is compared with the CPU's")
    a = ap.parse_args()
    dev = a.device
    check = set(filter(None, a.check.split(",")))
    bad = 0
    for shape in a.shapes.split(","):
        m, k = map(int, shape.split("x"))
        w = _pruned(m, k, a.sparsity / 100, dev)
        dense = w.numel() * w.element_size()
        print(f"{shape} bf16 at {a.sparsity:g} %: dense {dense / MiB:.0f} MiB", flush=True)
        lines = []
        d, line = measure("DeltaRows.from_dense (paired)", lambda: DeltaRows.from_dense(w, pair_halves=m % 64 == 0),
                          dense, dev)
        lines.append(line)
        _, line = measure("DeltaRows.from_dense (parts 2)", lambda: DeltaRows.from_dense(w, parts=2), dense, dev)
        lines.append(line)
        back, line = measure("DeltaRows.to_dense", d.to_dense, dense, dev)
        lines.append(line)
        ok = torch.equal(back.view(torch.int16), w.view(torch.int16))
        del back
        c, line = measure("DeltaRows.code_values", d.code_values, dense, dev)
        lines.append(line)
        if c is not None:
            back, line = measure("DeltaRows.to_dense (coded)", c.to_dense, dense, dev)
            lines.append(line)
            ok &= torch.equal(back.view(torch.int16), w.view(torch.int16))
            del back, c
        _, line = measure("DeltaRows validation", lambda: DeltaRows._validate(d.tensors(), d.shape, "", ""), dense,
                          dev)
        lines.append(line)
        t, line = measure("TiledCSL.from_dense", lambda: TiledCSL.from_dense(w), dense, dev)
        lines.append(line)
        _, line = measure("TiledCSL.to_dense", t.to_dense, dense, dev)
        lines.append(line)
        del t
        print("\n".join(lines), flush=True)
        if shape in check and dev != "cpu":
            cpu = DeltaRows.from_dense(w.cpu(), pair_halves=m % 64 == 0, splits=d.splits)
            same = torch.equal(cpu.data, d.data.cpu()) and torch.equal(cpu.offsets, d.offsets.cpu())
            print(f"  the device's DeltaRows arrays equal the CPU's: {same}", flush=True)
            ok &= same
        print(f"  round trips exact: {ok}", flush=True)
        bad += not ok
        del w, d
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()

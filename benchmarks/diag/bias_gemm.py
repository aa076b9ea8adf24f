"""The expansion path's bias (session 81): cuBLAS through ``F.linear(x, w, bias)`` (a contiguous bias goes to
cuBLASLt's bias epilogue, which under split-K rounds the product before adding the bias) against the bias as the
GEMM's C matrix (``y.copy_(bias).addmm_(x, w.t())``, one rounding), with fp32 reductions as ``_expand_and_gemm`` runs.

Accuracy: every token row the same, the bias the negated product plus a little, so every output cancels; the error
of each method in ulps of the float64 reference's rounded result.  Time: median CUDA-event times of each method on
prefill shapes (the weights rotated beyond L2), and ``flash_llm.spmm`` on a BitmapTiles weight with the bias.

    python benchmarks/diag/bias_gemm.py
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from flash_llm import kernels  # noqa: E402


def c_matrix(x, w, bias):
    return torch.empty(x.shape[0], w.shape[0], dtype=x.dtype, device=x.device).copy_(
        bias.expand(x.shape[0], w.shape[0])).addmm_(x, w.t())


METHODS = {"F.linear": lambda x, w, b: F.linear(x, w, b), "C matrix": c_matrix,
           "no bias": lambda x, w, b: F.linear(x, w)}


def ulps(got, want64, dtype):
    r = want64.to(dtype).double()
    fi = torch.finfo(dtype)
    step = torch.where(r == 0, torch.full_like(r, fi.smallest_normal * fi.eps),
                       torch.exp2(torch.floor(torch.log2(r.abs().clamp_min(fi.smallest_normal)))) * fi.eps)
    return ((got.double() - want64).abs() / step)


def accuracy(dtype, m, k, n, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x0 = torch.randn(1, k, device="cuda", generator=g).to(dtype)
    x = x0.expand(n, k).contiguous()
    w = torch.randn(m, k, device="cuda", generator=g).to(dtype)
    p = x0.double() @ w.double().t()
    bias = (-p[0] + 0.03 * torch.randn(m, device="cuda", generator=g, dtype=torch.float64)).to(dtype)
    want = x.double() @ w.double().t() + bias.double()
    row = []
    for name in ("F.linear", "C matrix"):
        with kernels._fp32_reductions():
            y = METHODS[name](x, w, bias)
        u = ulps(y, want, dtype)
        row.append(f"{u.max().item():8.1f} {int((u > 1).sum()):7d}")
    return row


def timed(fn, reps=20):
    for _ in range(3):
        fn(0)
    torch.cuda.synchronize()
    ts = []
    for i in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn(i)
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1000)
    return sorted(ts)[len(ts) // 2]


def main():
    print(torch.cuda.get_device_name(), torch.__version__)
    print("\naccuracy (every output cancels): max ulps, elements > 1 ulp")
    print(f"{'dtype':9} {'m':>5} {'k':>5} {'n':>5} | {'F.linear':>16} | {'C matrix':>16}")
    for dtype in (torch.bfloat16, torch.float16):
        for m, k, n in ((2, 513, 1000), (8, 4096, 512), (64, 4096, 256), (256, 8192, 2048), (4096, 4096, 512)):
            r = accuracy(dtype, m, k, n, seed=m + k + n)
            print(f"{str(dtype)[6:]:9} {m:5} {k:5} {n:5} | {r[0]:>16} | {r[1]:>16}")
    print("\ntime, us (median of 20; weights rotated): F.linear with bias / C matrix / F.linear without bias")
    for dtype in (torch.bfloat16, torch.float16):
        for m, k, n in ((28672, 7168, 2048), (7168, 28672, 2048), (21504, 7168, 512), (7168, 7168, 256),
                        (9216, 36864, 2048)):
            ws = [torch.randn(m, k, device="cuda", dtype=dtype) for _ in range(max(2, (200 << 20) // (m * k * 2)))]
            x = torch.randn(n, k, device="cuda", dtype=dtype)
            b = torch.randn(m, device="cuda", dtype=dtype)
            cells = []
            with kernels._fp32_reductions():
                for name, f in METHODS.items():
                    cells.append(timed(lambda i: f(x, ws[i % len(ws)], b)))
            print(f"{str(dtype)[6:]:9} {m:5}x{k:5} n={n:5}: " + " / ".join(f"{t:8.1f}" for t in cells)
                  + f"   C/F.linear {cells[1] / cells[0]:.3f}")
            ws = None  # (freed before the next shape)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

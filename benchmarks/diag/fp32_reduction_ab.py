"""The expansion path's cuBLAS product with PyTorch's reduced-precision reductions on (PyTorch's default) and off
(``kernels._fp32_reductions``, session 77): F.linear at bench_spmm's large-N token counts over rotated weights, the
two settings interleaved twice, the time ratio off / on per shape (above 1: the fp32 reductions cost time).

    python benchmarks/diag/fp32_reduction_ab.py
"""

from __future__ import annotations

import contextlib
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import _timing as T  # noqa: E402

from flash_llm import kernels  # noqa: E402

SHAPES = ((4096, 4096), (6144, 4096), (28672, 4096), (4096, 14336), (9216, 36864), (36864, 9216), (14, 65535))
TOKENS = (128, 256, 512, 2048)


def time_linear(x, ws, fp32: bool) -> float:
    # (cuBLAS picks its algorithm at capture: the setting must hold there)
    with kernels._fp32_reductions() if fp32 else contextlib.nullcontext():
        return T.time_calls([lambda w=w: F.linear(x, w) for w in ws])


def main() -> None:
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| dtype | M x K | N | reduced on, us | fp32, us | fp32 / on |")
    print("|---|---|---|---|---|---|")
    worst = 0.0
    for dtype in (torch.float16, torch.bfloat16):
        for m, k in SHAPES:
            w = torch.randn(m, k, dtype=dtype, device="cuda")
            ws = [w] + [w.clone() for _ in range(T.copies_needed(w.nbytes) - 1)]
            for n in TOKENS:
                x = torch.randn(n, k, dtype=dtype, device="cuda")
                on, off = [], []
                for _ in range(2):
                    on.append(time_linear(x, ws, False))
                    off.append(time_linear(x, ws, True))
                r = min(off) / min(on)
                worst = max(worst, r)
                print(f"| {str(dtype)[6:]} | {m} x {k} | {n} | {1e6 * min(on):.1f} | {1e6 * min(off):.1f} | {r:.3f} |",
                      flush=True)
            del ws, w
    print(f"largest fp32 / on: {worst:.3f}")


if __name__ == "__main__":
    main()

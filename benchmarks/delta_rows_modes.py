"""What the DeltaRows kernel's N = 1 modes cost, kernel alone (one GPU): Llama-3-8B gate / up (28672 x 4096) and
qkv (6144 x 4096) at 80 %, plain / RMSNorm / RMSNorm + SiLU x up, unpaired and paired, and the split counts around the
encoder's.  CUDA-graph replays over copies rotated beyond 3x L2, events, median.

    python benchmarks/delta_rows_modes.py
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing as T  # noqa: E402

from flash_llm import DeltaRows, kernels  # noqa: E402
from flash_llm.reference import FORMAT_IDS  # noqa: E402

FID = FORMAT_IDS[DeltaRows]


def main():
    print(T.environment(), flush=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name, m, k in (("gate_up", 28672, 4096), ("qkv", 6144, 4096)):
        wd = torch.randn(m, k, device="cuda", generator=gen)
        wd = torch.where(torch.rand(m, k, device="cuda", generator=gen) < 0.2, wd, 0.0).half()
        x = torch.randn(1, k, device="cuda", generator=gen).half()
        g = (torch.rand(k, device="cuda", generator=gen) + 0.5).half()
        base = DeltaRows.from_dense(wd)
        for splits in sorted({max(1, base.splits // 2), base.splits, 2 * base.splits}):
            for paired in (False, True):
                w = DeltaRows.from_dense(wd, splits=splits, pair_halves=paired)
                ws = T.weight_copies(w)
                for mode in ("plain", "rms", "rms+silu"):
                    if mode == "rms+silu" and not paired:
                        continue
                    kw = {"norm": (g, 1e-5)} if mode != "plain" else {}
                    if mode == "rms+silu":
                        kw["act"] = "silu_mul"
                    t = T.time_calls([lambda c=c: kernels.spmm_cuda(x, c.data, c.offsets, FID, m, k, None, **kw)
                                      for c in ws])
                    print(f"{name:8s} S={splits:3d} paired={int(paired)} {mode:9s} {w.nbytes / m / k:.4f} B/elem "
                          f"{t * 1e6:7.1f} us", flush=True)


if __name__ == "__main__":
    main()

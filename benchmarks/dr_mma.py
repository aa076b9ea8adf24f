"""DeltaRows at 8-32 tokens: the tensor-core kernel (``delta_rows_spmm_<dtype>_mma<NT>``, session 60) against the
CUDA-core multi-token kernel (N <= 8), or above 8 tokens the expansion and cuBLAS (DeltaRows' path without it) and the
multi-token kernels in chunks of 8 tokens at most (``kernels.DELTA_CHUNK_MAX``), Tiled-CSL's kernels and cuBLAS on the
dense weight, all in one run, on Llama-3-8B's and OPT-30B's layer shapes in the split layout (DeltaRows' layout for
batches above 2; bf16 values coded where ``--dtype bf16``).

    python benchmarks/dr_mma.py [--sparsity 0.8] [--ns 8,16,32] [--dtype bf16] [--shapes llama]

Each path is first checked against float64 (error at most twice cuBLAS's own plus an ulp); a wrong one is not timed.
Prints us a call (CUDA-graph replays, weights rotated beyond L2), each path's speedup over cuBLAS, and the GB/s of
DeltaRows' bytes for the tensor-core kernel.  ``--tile-bands``: session 69's ``_tmma`` kernel (``kernels.DR_MMA_TILE``)
at those bands too.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing as T  # noqa: E402

from flash_llm import kernels as K  # noqa: E402
from flash_llm.cli import sparsity_arg  # noqa: E402
from flash_llm.formats import DeltaRows, TiledCSL  # noqa: E402
from flash_llm.reference import FORMAT_IDS  # noqa: E402

SHAPES = {"llama": [("llama-3-8b qkv", 6144, 4096), ("llama-3-8b o", 4096, 4096),
                    ("llama-3-8b gate/up", 28672, 4096), ("llama-3-8b down", 4096, 14336)],
          "opt": [("opt-30b qkv", 21504, 7168), ("opt-30b o", 7168, 7168), ("opt-30b fc1", 28672, 7168),
                  ("opt-30b fc2", 7168, 28672)]}


def call(w, x, mma: bool, xring: bool = True, chunks: bool = False, tile: int = 0):
    """spmm on ``w`` with DeltaRows' tensor-core kernel on (``mma``; X through its ring where ``xring``; with ``tile``
    session 69's ``_tmma`` kernel, passes of that many window columns) or off (N <= 8: the multi-token kernel; above,
    the expansion, or with ``chunks`` the multi-token kernels 8 tokens at most a launch,
    ``kernels.DELTA_CHUNK_MAX``)."""
    K.DR_MMA_MIN = 1 if mma else 33
    K.DR_MMA_XRING = xring
    K.DR_MMA_TILE = bool(tile)
    K.DR_MMA_TILE_BAND = tile or K.DR_MMA_TILE_BAND
    K.DELTA_CHUNK_MAX = 4096 if chunks else 8
    m, k = w.shape
    return K.spmm_cuda(x, w.data, w.offsets, FORMAT_IDS[type(w)], m, k, None)


def parse_args(argv=None) -> argparse.Namespace:
    """The options, checked before any CUDA work (a bad one: ``ap.error``, exit status 2)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sparsity", type=sparsity_arg, default=0.8,
                    help="a fraction or a percentage (0.8, 80 and 80%% alike)")
    ap.add_argument("--ns", type=T.positive_ints, default="8,16,32")
    ap.add_argument("--dtype", choices=["fp16", "bf16"], default="bf16")
    ap.add_argument("--shapes", default="llama,opt")
    ap.add_argument("--tile-bands", type=lambda v: T.positive_ints(v, empty=True), default="256,512,1024",
                    help="bands of session 69's _tmma kernel to time (tmma<band> columns; '' for none)")
    ap.add_argument("--tile-splits", type=lambda v: T.positive_ints(v, empty=True), default="",
                    help="split counts to time _tmma at too (tmma<band>s<S>, the weight encoded again with S splits): "
                         "its partials, S x N x M floats, are written and read again, which costs the small layers")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    a = parse_args(argv)
    tile_splits, bands = a.tile_splits, a.tile_bands
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float16
    ns = a.ns
    saved = K.DR_MMA_MIN, K.DR_MMA_XRING, K.DELTA_CHUNK_MAX, K.DR_MMA_TILE, K.DR_MMA_TILE_BAND
    print(T.environment())
    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for label, m, k in [s for key in a.shapes.split(",") for s in SHAPES[key]]:
        v = torch.randn(m, k, generator=g, device="cuda")
        thr = float(torch.special.ndtri(torch.tensor(0.5 + a.sparsity / 2, dtype=torch.float64)))
        dense = v.masked_fill_(v.abs() < thr, 0.0).to(dtype)  # (pruned by magnitude, so bf16 values code)
        del v
        w = DeltaRows.from_dense(dense, splits=None, parts=1)
        if dtype == torch.bfloat16:
            w = w.code_values() or w
        tc = TiledCSL.from_dense(dense)
        ws, tcs = T.weight_copies(w), T.weight_copies(tc)
        by_splits = {}
        for sp in tile_splits:
            ww = DeltaRows.from_dense(dense, splits=sp, parts=1)
            by_splits[sp] = T.weight_copies((ww.code_values() or ww) if dtype == torch.bfloat16 else ww)
        dws = [dense] + [dense.clone() for _ in range(T.copies_needed(dense.numel() * 2) - 1)]
        for n in ns:
            x = torch.randn(n, k, device="cuda", dtype=dtype)
            ref = x.double() @ dense.double().t()
            err_t = (torch.nn.functional.linear(x, dense).double() - ref).abs().max().item()
            tol = 2 * err_t + 2 ** -8 * (1 + ref.abs().max().item())
            t = {}
            paths = {"mma": lambda ww: call(ww, x, True, False), "mma-x": lambda ww: call(ww, x, True),
                     "tiled-csl": lambda ww: call(ww, x, False)}
            for b in bands:
                paths[f"tmma{b}"] = lambda ww, b=b: call(ww, x, True, tile=b)
                for sp in tile_splits:
                    paths[f"tmma{b}s{sp}"] = lambda ww, b=b: call(ww, x, True, tile=b)
            if n <= 8:
                paths["nt8"] = lambda ww: call(ww, x, False)
            else:  # DeltaRows' path there today: the expansion and cuBLAS; or chunks of 8 tokens at most
                paths["expand"] = lambda ww: call(ww, x, False)
                paths["chunks"] = lambda ww: call(ww, x, False, chunks=True)
            for name, f in paths.items():
                src = (tcs if name == "tiled-csl" else by_splits[int(name.rpartition("s")[2])]
                       if name.startswith("tmma") and "s" in name[4:] else ws)
                err = (f(src[0]).double() - ref).abs().max().item()
                if not err <= tol:
                    print(f"WRONG: {name} on {label} at N = {n}: error {err:.3g} > {tol:.3g} (not timed)")
                    t[name] = float("nan")
                    continue
                t[name] = T.time_calls([lambda ww=ww, f=f: f(ww) for ww in src])
            t["cuBLAS"] = T.time_calls([lambda d=d: torch.nn.functional.linear(x, d) for d in dws])
            rows.append((label, n, w.splits, w.coded, w.nbytes / 1e6, t))
            print(label, n, {c: round(v * 1e6, 1) for c, v in t.items()}, flush=True)
        del dense, ws, tcs, dws, by_splits
        torch.cuda.empty_cache()
    K.DR_MMA_MIN, K.DR_MMA_XRING, K.DELTA_CHUNK_MAX, K.DR_MMA_TILE, K.DR_MMA_TILE_BAND = saved
    print(f"\nus a call, {a.dtype}, sparsity {a.sparsity}; speedup over cuBLAS in brackets; mma's GB/s of its bytes")
    cols = (["mma", "mma-x"] + [f"tmma{b}" for b in bands] + [f"tmma{b}s{sp}" for b in bands for sp in tile_splits]
            + ["nt8", "chunks", "expand", "tiled-csl", "cuBLAS"])
    print("| shape | N | splits | coded | MB | " + " | ".join(cols) + " | mma GB/s |")
    print("|---" * (6 + len(cols)) + "|")
    for label, n, s, coded, mb, t in rows:
        cells = [f"{t[c] * 1e6:.1f} ({t['cuBLAS'] / t[c]:.2f}x)" if c in t else "-" for c in cols]
        print(f"| {label} | {n} | {s} | {int(coded)} | {mb:.0f} | " + " | ".join(cells)
              + f" | {mb / 1e3 / min(t['mma'], t['mma-x']):.0f} |")


if __name__ == "__main__":
    main()

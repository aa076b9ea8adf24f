"""What the large-N path costs a DeltaRows weight: ``kernels.decode_dense`` (the expansion into a zeroed dense
buffer, ``delta_rows_to_dense``) against the zero fill alone and cuBLAS at ``--n`` tokens, on OPT-30B's and
Llama-3-8B's layer shapes as the batch-1 engine lays them out (split layout above K = 4096, else the parts layout;
bf16 values coded where ``--dtype bf16``).  A prompt's prefill runs this path on every projection.

    python benchmarks/dr_expand.py [--sparsity 0.8] [--n 128] [--dtype bf16] [--kernels NAME,...]

``--kernels``: the expansion kernels to time, ``name:warps`` (``delta_rows_to_dense`` and any variant spmm.cu defines
with the same arguments, at that many warps a block; a name ending in ``_nf`` takes the lanes a row as one more
argument and writes every element itself, so its output is not zeroed, and is checked in an output of -1s); each is
checked bit for bit against the CPU reference (``DeltaRows.to_dense``) before it is timed.  ``delta_rows_to_dense_pr``
(session 68) takes its own arguments and shared memory; where its tile does not fit (the split layout, or K too
large for the lanes a row) it runs ``_nf``, as the engine would (``delta_rows_to_dense_pr:band``: blocks of ``band``
columns of the rows, session 69); ``delta_rows_to_dense_sr[:band]`` (session 69)
runs ``_pr`` on the parts layout and ``_sr`` on the split layout (``K % 8 == 0``), its passes ``band`` window columns
(``kernels.DR_DENSE_SR_BAND`` by default).
Prints us a call (CUDA-graph replays, weights rotated beyond L2) and the GB/s of the dense bytes written.
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
from flash_llm.formats import DeltaRows  # noqa: E402
from flash_llm.formats.delta_rows import auto_parts, layout  # noqa: E402

SHAPES = [("opt-30b qkv", 21504, 7168), ("opt-30b o", 7168, 7168), ("opt-30b fc1", 28672, 7168),
          ("opt-30b fc2", 7168, 28672), ("llama-3-8b qkv", 6144, 4096), ("llama-3-8b gate/up", 28672, 4096),
          ("llama-3-8b down", 4096, 14336)]


def expand(name: str, w: DeltaRows, poison: bool = False) -> torch.Tensor:
    """``name``: ``kernel`` or ``kernel:warps`` (warps a block; 1 by default).  A ``_nf`` kernel gets an output it
    does not find zeroed: uninitialised, or -1s where ``poison``."""
    kernel, _, warps = name.partition(":")
    warps = int(warps or 1)
    m, k = w.shape
    lay = layout(m, w.offsets.numel(), w.data.numel())
    dev = w.data.device
    # (_sr4 / _pr4: kernels.DR_PLACE_AHEAD; _srk: DR_PLACE_SKIP; _srw / _prw: DR_PLACE_RANGES; session 70)
    base = kernel.rstrip("0123456789kw")
    rows = base in ("delta_rows_to_dense_pr", "delta_rows_to_dense_sr")
    nofill = "_nf" in kernel or rows  # (_nf, _nft, _pr, _sr write every element)
    if nofill:
        out = (torch.full((m, k), -1, dtype=torch.int16, device=dev).view(w.dtype) if poison
               else torch.empty(m, k, dtype=w.dtype, device=dev))
    else:
        out = torch.zeros(m, k, dtype=w.dtype, device=dev)
    if rows:  # (_pr[:band]: the parts layout, its tile of rows (of `band` columns a block: kernels.DR_DENSE_ROWS_BAND)
        # in dynamic shared memory; _sr[:band]: also the split layout, passes of `band` columns of a split's window,
        # kernels.DR_DENSE_SR_BAND by default)
        saved = (K.DR_DENSE_SPLIT_ROWS, K.DR_DENSE_SR_BAND, K.DR_DENSE_ROWS_BAND, K.DR_PLACE_AHEAD,
                 K.DR_PLACE_AHEAD_PR_MIN_TILE, K.DR_PLACE_SKIP, K.DR_PLACE_RANGES)
        try:
            K.DR_DENSE_SPLIT_ROWS = base == "delta_rows_to_dense_sr"
            K.DR_PLACE_SKIP = "k" in kernel[len(base):]
            K.DR_PLACE_RANGES = "w" in kernel[len(base):]
            K.DR_PLACE_AHEAD = int(kernel[len(base):].strip("kw") or 1)
            K.DR_PLACE_AHEAD_PR_MIN_TILE = 0  # (_pr4 named: every tile)
            band = name.partition(":")[2]
            if band and K.DR_DENSE_SPLIT_ROWS:
                K.DR_DENSE_SR_BAND = int(band)
            elif band:
                K.DR_DENSE_ROWS_BAND = int(band)
            if not K.dr_dense_rows_ok(lay, k, out):
                return expand("delta_rows_to_dense_nf", w, poison)
            K.launch_dr_dense_rows(w.data, w.offsets, out, k, lay, torch.cuda.current_stream().cuda_stream,
                                   dev.index)
        finally:
            (K.DR_DENSE_SPLIT_ROWS, K.DR_DENSE_SR_BAND, K.DR_DENSE_ROWS_BAND, K.DR_PLACE_AHEAD,
             K.DR_PLACE_AHEAD_PR_MIN_TILE, K.DR_PLACE_SKIP, K.DR_PLACE_RANGES) = saved
        return out
    K.launch(kernel, (-(-lay.slices // warps), lay.splits, 1), 32 * warps,
             [(w.data.data_ptr(), K.P), (w.offsets.data_ptr(), K.P), (out.data_ptr(), K.P), (k, K.I),
              (lay.splits, K.I), (lay.parts if lay.coded else 0, K.I), (lay.slices, K.I)]
             + ([(lay.parts, K.I)] if nofill else []),
             torch.cuda.current_stream().cuda_stream, dev.index)
    return out


def parse_args(argv=None) -> argparse.Namespace:
    """The options, checked before any CUDA work (a bad one: ``ap.error``, exit status 2)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sparsity", type=sparsity_arg, default=0.8,
                    help="a fraction or a percentage (0.8, 80 and 80%% alike)")
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--dtype", choices=["fp16", "bf16"], default="bf16")
    ap.add_argument("--kernels", default="delta_rows_to_dense_nf:1,delta_rows_to_dense_pr,delta_rows_to_dense_pr:2048,"
                    "delta_rows_to_dense_pr:1024,delta_rows_to_dense_sr,delta_rows_to_dense_sr:512")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    a = parse_args(argv)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float16
    names = a.kernels.split(",")
    print(T.environment())
    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for label, m, k in SHAPES:
        mag = 0.25 * torch.pow(16.0, torch.rand(m, k, generator=g, device="cuda"))
        keep = torch.rand(m, k, generator=g, device="cuda") >= a.sparsity
        dense = torch.where(keep, mag, 0.0).to(dtype)
        del mag, keep
        nnz = int((dense != 0).sum())
        w = DeltaRows.from_dense(dense, parts=auto_parts(m, k, nnz, dense.device))
        if dtype == torch.bfloat16:
            w = w.code_values() or w
        ok = []
        for name in names:
            got = expand(name, w, poison=True)
            if torch.equal(got.view(torch.int16), dense.view(torch.int16)):
                ok.append(name)
            else:
                bad = int((got.view(torch.int16) != dense.view(torch.int16)).sum())
                print(f"WRONG: {name} on {label}: {bad} elements differ from the dense weight (not timed)")
        ws = T.weight_copies(w)
        x = torch.randn(a.n, k, device="cuda", dtype=dtype)
        dws = [dense] + [dense.clone() for _ in range(T.copies_needed(dense.numel() * 2) - 1)]
        t = {name: T.time_calls([lambda v=v, name=name: expand(name, v) for v in ws]) if name in ok else float("nan")
             for name in names}
        t["zeros"] = T.time_calls([lambda: torch.zeros(m, k, dtype=dtype, device="cuda")])
        t["cuBLAS"] = T.time_calls([lambda d=d: torch.nn.functional.linear(x, d) for d in dws])
        del dws
        mb = m * k * 2 / 1e6
        rows.append((label, w.parts, w.coded, w.nbytes / 1e6, mb, t))
        del dense, ws
        torch.cuda.empty_cache()
    cols = names + ["zeros", "cuBLAS"]
    print(f"\nus a call (N = {a.n} for cuBLAS), {a.dtype}, sparsity {a.sparsity}; GB/s of the dense bytes in brackets")
    print("| shape | parts | coded | MB stored / dense | " + " | ".join(cols) + " |")
    print("|---" * (4 + len(cols)) + "|")
    for label, p, coded, mbs, mb, t in rows:
        cells = [f"{t[c] * 1e6:.1f} ({mb / 1e3 / t[c]:.0f})" for c in cols]
        print(f"| {label} | {p} | {int(coded)} | {mbs:.0f} / {mb:.0f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

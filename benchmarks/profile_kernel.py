"""Run one sparse kernel configuration a few times (for ncu / compute-sanitizer / SASS inspection).

    python benchmarks/profile_kernel.py --fmt bitmap --m 9216 --k 36864 --n 16 --sparsity 0.9
"""

import argparse

import torch

import flash_llm
import flash_llm.reference
from flash_llm import kernels
from flash_llm.cli import sparsity_arg
from flash_llm.reference import FORMAT_IDS


def parse_args(argv=None) -> argparse.Namespace:
    """The options, checked before any CUDA work (a bad one: ``ap.error``, exit status 2)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--fmt", default="bitmap", choices=["bitmap", "tiled-csl", "delta-rows"])
    ap.add_argument("--m", type=int, default=9216)
    ap.add_argument("--k", type=int, default=36864)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--sparsity", type=sparsity_arg, default=0.9,
                    help="a fraction or a percentage (0.9, 90 and 90%% alike)")
    ap.add_argument("--splits", type=int, default=None, help="split-K (DeltaRows: the split count it is encoded with)")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16")
    ap.add_argument("--coded", action="store_true", help="DeltaRows, bf16: code the values (DeltaRows.code_values)")
    ap.add_argument("--parts", type=int, default=None,
                    help="DeltaRows: lanes a row (1: the split layout, 2-16: the parts layout; default: the "
                         "encoder's choice)")
    ap.add_argument("--decode", action="store_true", help="run the decoder to dense (the large-N path) instead")
    ap.add_argument("--epilogue", default="none", choices=["none", "norm", "norm_silu", "silu", "resid"],
                    help="what runs around the product (kernels.spmm_cuda's norm / act / add_to; fused at N = 1, "
                         "Tiled-CSL)")
    a = ap.parse_args(argv)
    if a.coded and (a.fmt != "delta-rows" or a.dtype != "bf16"):
        ap.error("--coded needs --fmt delta-rows --dtype bf16")
    return a


def main(argv=None) -> None:
    a = parse_args(argv)
    cls = {"bitmap": flash_llm.BitmapTiles, "tiled-csl": flash_llm.TiledCSL, "delta-rows": flash_llm.DeltaRows}[a.fmt]
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float16
    w = torch.randn(a.m, a.k, device="cuda")
    if a.coded:  # pruned by magnitude, as benchmarks/dr_mma.py, so that each row's bf16 values code
        thr = float(torch.special.ndtri(torch.tensor(0.5 + a.sparsity / 2, dtype=torch.float64)))
        w.masked_fill_(w.abs() < thr, 0.0)
    else:
        w.mul_(torch.rand(a.m, a.k, device="cuda") >= a.sparsity)
    w = w.to(dtype)
    if cls is flash_llm.DeltaRows:  # split count fixed when encoding; gate / up paired for SiLU x up inside the kernel
        f = cls.from_dense(w, splits=a.splits, pair_halves=a.epilogue.endswith("silu"), parts=a.parts)
        if a.coded:
            f = f.code_values() or f  # (itself where a row's values do not code: the report's "coded False")
        a.splits = None
    else:
        f = cls.from_dense(w)
    x = torch.randn(a.n, a.k, device="cuda").to(dtype)
    if a.decode:
        for _ in range(a.iters):
            d = kernels.decode_dense(FORMAT_IDS[cls], f.data, f.offsets, a.m, a.k, w.dtype)
        torch.cuda.synchronize()
        print("decode", a.fmt, "max err", (d.float() - w.float()).abs().max().item())
        return
    g = (torch.rand(a.k, device="cuda") + 0.5).to(dtype)
    extra = {"none": {}, "norm": {"norm": (g, 1e-5)}, "norm_silu": {"norm": (g, 1e-5), "act": "silu_mul"},
             "silu": {"act": "silu_mul"}, "resid": {}}[a.epilogue]
    acc = torch.randn(a.n, a.m, device="cuda").to(dtype)
    acc0 = acc.clone()
    launched = []  # the kernels spmm_cuda launches (the one-launch split-K kernels included), named in the report
    real_launch = kernels.launch
    kernels.launch = lambda name, *args, **kw: launched.append(name) or real_launch(name, *args, **kw)
    for _ in range(a.iters):
        if a.epilogue == "resid":
            acc.copy_(acc0)
            extra = {"add_to": acc}
        y = kernels.spmm_cuda(x, f.data, f.offsets, FORMAT_IDS[cls], a.m, a.k, None, splits=a.splits, force_sparse=True,
                              **extra)
    kernels.launch = real_launch
    torch.cuda.synchronize()
    xin = flash_llm.reference.rms_norm(x, g, 1e-5) if a.epilogue.startswith("norm") else x
    want = xin.float() @ w.float().t()
    if a.epilogue.endswith("silu"):
        want = torch.nn.functional.silu(want[:, :a.m // 2]) * want[:, a.m // 2:]
    elif a.epilogue == "resid":
        want += acc0.float()
    err = (y.float() - want).abs().max().item()
    if cls is flash_llm.DeltaRows:
        print("kernel delta_rows launches", "+".join(dict.fromkeys(launched)), "splits", f.splits, "coded", f.coded,
              "max err", err)
    else:
        name, wg, shared = kernels.kernel_config(FORMAT_IDS[cls], x.dtype, a.n, a.k % 8 == 0, 0, f.density,
                                                 a.m * a.k)  # as spmm_cuda
        print("kernel", name, "launches", "+".join(dict.fromkeys(launched)),
              "plan", kernels.plan(a.m, a.k, a.n, f.density, kernels.sm_count(0),
                                   kernels.blocks_per_sm(name, 0, kernels.block_threads(name), shared),
                                   a.splits, FORMAT_IDS[cls], wg), "max err", err)

    # Host-side cost of one eager call (Python checks, op dispatch, launch), against F.linear: wall clock
    # of many back-to-back calls on a small layer, where the GPU finishes each call before the next launch.
    if a.iters > 5:
        import time

        xs = torch.randn(1, a.k, device="cuda").to(dtype)
        for name, fn in [("flash_llm.spmm", lambda: flash_llm.spmm(xs, f)),
                         ("F.linear", lambda: torch.nn.functional.linear(xs, w))]:
            for _ in range(50):
                fn()
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(a.iters):
                fn()
            torch.cuda.synchronize()
            print(f"eager {name}: {(time.perf_counter() - t) / a.iters * 1e6:.1f} us per call (wall clock)")


if __name__ == "__main__":
    main()

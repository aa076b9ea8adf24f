"""Triage of fuzz_spmm.py failures on a GPU: each case replayed with the kernels it launches, and its worst element
by our op, by PyTorch (F.linear of the dense weight, cuBLAS's defaults and with reduced-precision reductions off) and
by the float64 reference.

    python benchmarks/diag/fuzz_triage.py --max-elems 67108864 SEED [SEED ...]
"""

from __future__ import annotations

import argparse
import os
import sys
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import fuzz_spmm as fz  # noqa: E402


def kernels_of(fn) -> list[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sorted({e.name[:60] for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA})


def triage(seed: int, max_elems: int) -> None:
    dev = torch.device("cuda")
    c = fz.draw_case(seed, max_elems)
    print(f"== {fz.describe(c)}")
    cpu, a = fz.make_inputs(c, dev)
    a.w = fz.build_weight(c, cpu.dense, dev, a.g)
    dense = cpu.dense.to(dev)
    acc0 = a.acc.clone() if c["op"] == "add_" else None

    def ours():
        if acc0 is not None:
            a.acc.copy_(acc0)
        with fz.switched(c):
            return fz.OPS[c["op"]](a).clone()

    def theirs():
        b = SimpleNamespace(x=a.x, bias=a.bias, norm_weight=a.norm_weight, ln_bias=a.ln_bias,
                            acc=acc0.clone() if acc0 is not None else None)
        return fz.torch_version(c, b, dense)

    # the expansion (the large-N path) into a NaN-poisoned block: every element written?
    from flash_llm import kernels, ops
    fmt_id, data, offsets = ops._format_id(a.w), a.w.data, a.w.offsets
    for _ in range(2):
        torch.full((c["m"] * c["k"],), float("nan"), dtype=dense.dtype, device=dev)
        d = kernels.decode_dense(fmt_id, data, offsets, c["m"], c["k"], dense.dtype)
        torch.cuda.synchronize()
        want_bits = torch.where((dense.view(torch.int16) & 0x7FFF) == 0, 0, dense.view(torch.int16))
        bad = int((d.view(torch.int16) != want_bits).sum())
        print(f"  decode_dense into a NaN block: {bad} elements differ ({int(d.isnan().sum())} NaN)")
        del d
    mm = torch.backends.cuda.matmul
    rows = {}
    for reduced in (True, False):
        mm.allow_fp16_reduced_precision_reduction = reduced
        mm.allow_bf16_reduced_precision_reduction = reduced
        rows[f"ours, reduced={reduced}"] = ours()
        rows[f"torch, reduced={reduced}"] = theirs()
    mm.allow_fp16_reduced_precision_reduction = mm.allow_bf16_reduced_precision_reduction = True
    print("  kernels:", ", ".join(kernels_of(ours)))
    want, scale, slack = fz.reference(c, cpu)
    dtype = fz.DTYPES[c["dtype"]]
    cols = want.shape[1]
    for name, t in rows.items():
        why = fz.compare(t, want, scale, slack, rows["torch, reduced=True"], dtype, fz.ULPS[c["op"]])
        print(f"  {name:22s}: {'ok' if why is None else why[:300]}")
    o = rows["ours, reduced=True"].detach().double().cpu().reshape(-1, cols)
    bad = ~(o == want.to(dtype).double()) & ~(o.isnan() & want.isnan())
    err = torch.where(bad, (o - want).abs().nan_to_num(float("inf")), torch.zeros((), dtype=torch.float64))
    r, col = divmod(int(err.argmax()), cols)
    print(f"  worst [{r}, {col}]: want {want[r, col].item():.8g} (row scale {scale[r].item():.4g})")
    for name, t in rows.items():
        print(f"    {name:22s} {t.detach().double().cpu().reshape(-1, cols)[r, col].item():.8g}")
    xs = cpu.x.reshape(-1, c["k"]).double()
    wrow = cpu.dense.double()[col % c["m"]] if c["op"] not in ("silu_mul",) else None
    if wrow is not None and c["op"] in ("spmm", "linear", "add_"):
        terms = xs[r] * wrow
        print(f"    terms: nonzero {int((terms != 0).sum())}, sum|t| {terms.abs().sum().item():.4g}, "
              f"max|t| {terms.abs().max().item():.4g}, fp32-subnormal terms "
              f"{int(((terms.abs() < 1.1754944e-38) & (terms != 0)).sum())}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("seeds", type=int, nargs="+")
    p.add_argument("--max-elems", type=int, default=1 << 26)
    args = p.parse_args()
    for s in args.seeds:
        try:
            triage(s, args.max_elems)
        except Exception as e:  # noqa: BLE001  (report and go on to the next seed)
            print(f"  triage failed: {type(e).__name__}: {e}")


if __name__ == "__main__":
    main()

"""Small runs of every DeltaRows kernel path (N = 1, and 2-8 tokens; both layouts), checked against the reference: for
compute-sanitizer (memcheck, racecheck), which makes the GPU test suite too slow.  Prints one line per case and
"fails N" last.

    compute-sanitizer --tool memcheck python benchmarks/delta_rows_check.py
"""

from __future__ import annotations

import torch

from flash_llm import DeltaRows, kernels
from flash_llm.reference import FORMAT_IDS, layer_norm, rms_norm, silu_mul_halves

FID = FORMAT_IDS[DeltaRows]


def weight(m, k, density, gen, far=False):
    if far:  # one slice whose rows sit at opposite ends of K: a window wider than the shared-memory X
        w = torch.zeros(m, k, device="cuda")
        for r in range(m):
            cols = torch.randperm(256, generator=gen, device="cuda")[:60] + (0 if r < m // 2 else k - 256)
            w[r, cols] = torch.randn(60, generator=gen, device="cuda")
        return w.half()
    w = torch.randn(m, k, generator=gen, device="cuda")
    return torch.where(torch.rand(m, k, generator=gen, device="cuda") < density, w, 0.0).half()


def main() -> int:
    gen = torch.Generator(device="cuda").manual_seed(0)
    fails = 0
    # (m, k, density, splits, far, parts): 7168 columns in 3 splits take windows of up to 2800 columns
    # (the multi-token kernels' dynamic window, session 34); parts > 1 the parts layout's kernels
    cases = [(64, 1024, 0.2, None, False, 1), (96, 1016, 0.5, 3, False, 1), (33, 512, 0.05, 2, False, 1),
             (32, 4096, 0.0, None, True, 1), (128, 2048, 1.0, 5, False, 1), (256, 7168, 0.2, 3, False, 1),
             (192, 2048, 0.2, None, False, 4), (64, 1024, 0.5, None, False, 16)]
    for m, k, density, splits, far, parts in cases:
        wd = weight(m, k, density, gen, far)
        g = (torch.rand(k, generator=gen, device="cuda") + 0.5).half()
        x = torch.randn(1, k, generator=gen, device="cuda").half()
        bias = torch.randn(m, generator=gen, device="cuda").half()
        for paired in (False, True):
            if paired and m % 64:
                continue
            lay = dict(parts=parts) if parts > 1 else dict(splits=splits)
            w = DeltaRows.from_dense(wd, pair_halves=paired, **lay)
            ref = x.double() @ wd.double().t()
            h = rms_norm(x, g, 1e-5).double() @ wd.double().t()
            scale = 1 + max(ref.abs().max().item(), h.abs().max().item())
            runs = {"bias": (dict(), ref + bias.double()), "norm": (dict(norm=(g, 1e-5)), h)}
            if paired:
                runs["norm+silu"] = (dict(norm=(g, 1e-5), act="silu_mul"), silu_mul_halves(h.half()).double())
            for name, (kw, want) in runs.items():
                b = bias if name == "bias" else None
                got = kernels.spmm_cuda(x, w.data, w.offsets, FID, m, k, b, **kw)
                err = (got.double() - want).abs().max().item()
                # (8 fp16 ulp of the larger of the inputs' and the output's scale: silu(g) x up grows as g x up)
                ok = bool(torch.isfinite(got).all()) and err <= 8 * 2**-10 * max(scale, 1 + want.abs().max().item())
                fails += not ok
                print(f"{m}x{k} density {density} splits {w.splits} parts {w.parts} paired {int(paired)} {name}: "
                      f"err {err:.2e} {'ok' if ok else 'WRONG'}", flush=True)
            acc = torch.randn(1, m, generator=gen, device="cuda").half()
            want = acc.double() + ref
            got = kernels.spmm_cuda(x, w.data, w.offsets, FID, m, k, None, add_to=acc)
            err = (got.double() - want).abs().max().item()
            ok = err <= 8 * 2**-10 * (scale + want.abs().max().item())
            fails += not ok
            print(f"{m}x{k} resid: err {err:.2e} {'ok' if ok else 'WRONG'}", flush=True)
            gb = torch.randn(k, generator=gen, device="cuda").half()  # LayerNorm (OPT) with ReLU, in the N = 1 kernel
            xl = (x.float() + 3).half()
            want_l = (layer_norm(xl, g, gb, 1e-5).double() @ wd.double().t() + bias.double()).clamp(min=0)
            got_l = kernels.spmm_cuda(xl, w.data, w.offsets, FID, m, k, bias, norm=(g, gb, 1e-5), act="relu")
            err = (got_l.double() - want_l).abs().max().item()
            ok = bool(torch.isfinite(got_l).all()) and err <= 8 * 2**-10 * (1 + want_l.abs().max().item())
            fails += not ok
            print(f"{m}x{k} layer_norm+relu: err {err:.2e} {'ok' if ok else 'WRONG'}", flush=True)
            for n in (2, 5, 8):  # the multi-token kernels (nt2, nt8) and their reduction
                xn = torch.randn(n, k, generator=gen, device="cuda").half()
                refn = xn.double() @ wd.double().t()
                sn = 1 + refn.abs().max().item()
                tol = 8 * 2**-10 * sn
                got = kernels.spmm_cuda(xn, w.data, w.offsets, FID, m, k, bias)
                accn = torch.randn(n, m, generator=gen, device="cuda").half()
                got_r = kernels.spmm_cuda(xn, w.data, w.offsets, FID, m, k, None, add_to=accn.clone())
                errs = {"bias": (got.double() - refn - bias.double()).abs().max().item(),
                        "resid": (got_r.double() - refn - accn.double()).abs().max().item()}
                if paired:
                    got_s = kernels.spmm_cuda(xn, w.data, w.offsets, FID, m, k, None, act="silu_mul")
                    want_s = silu_mul_halves(refn.half()).double()
                    errs["silu"] = (got_s.double() - want_s).abs().max().item()
                    tol = 8 * 2**-10 * max(sn, 1 + want_s.abs().max().item())
                for name, err in errs.items():
                    ok = err <= tol  # (a NaN fails too)
                    fails += not ok
                    print(f"{m}x{k} N={n} paired {int(paired)} {name}: err {err:.2e} {'ok' if ok else 'WRONG'}",
                          flush=True)
            dense = kernels.decode_dense(FID, w.data, w.offsets, m, k, torch.float16)
            ok = torch.equal(dense, wd)
            fails += not ok
            print(f"{m}x{k} decode: {'ok' if ok else 'WRONG'}", flush=True)
    torch.cuda.synchronize()
    print(f"fails {fails}")
    return 1 if fails else 0


if __name__ == "__main__":
    raise SystemExit(main())

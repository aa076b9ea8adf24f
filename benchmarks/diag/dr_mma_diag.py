"""Session 60 diagnostic: which DeltaRows tensor-core cases go wrong (variant, shape, density, splits, N, X alignment),
and where (rows, tokens)."""
import torch
from flash_llm import kernels as K, DeltaRows
from flash_llm.reference import FORMAT_IDS

K.DR_MMA_MIN = 1
g = torch.Generator(device="cuda").manual_seed(1)
fails = 0
for dtype in (torch.float16, torch.bfloat16):
    for (m, kk), density in (((64, 64), 1.0), ((96, 4096), 0.2), ((70, 517), 0.5), ((128, 2056), 0.01),
                             ((32, 1000), 0.0), ((300, 14336), 0.2), ((64, 4104), 0.95)):
        w = torch.randn(m, kk, generator=g, device="cuda")
        w = torch.where(torch.rand(m, kk, generator=g, device="cuda") < density, w, 0.0).to(dtype)
        for splits in (None, 1, 7):
            dr = DeltaRows.from_dense(w, **({} if splits is None else {"splits": splits}))
            if dr.parts != 1:
                dr = DeltaRows.from_dense(w, splits=3)
            for xring in (False, True):
                K.DR_MMA_XRING = xring
                for n in (1, 3, 8, 9, 16, 17, 32):
                    for un in (False, True):
                        xb = torch.randn(n * kk + 1, generator=g, device="cuda").to(dtype)
                        x = (xb[1:] if un else xb[:-1]).view(n, kk)
                        y = K.spmm_cuda(x, dr.data, dr.offsets, FORMAT_IDS[DeltaRows], m, kk, None)
                        ref = x.double() @ w.double().t()
                        err = (y.double() - ref).abs()
                        tol = 0.02 * (1 + ref.abs().max().item())
                        if not err.max().item() <= tol:
                            fails += 1
                            bad = (err > tol).nonzero()
                            if fails <= 40:
                                print(f"FAIL {dtype} m={m} k={kk} d={density} splits={dr.splits} xring={xring} n={n} "
                                      f"unaligned={un}: {bad.shape[0]} bad, tokens {sorted(set(bad[:, 0].tolist()))[:8]} "
                                      f"rows {sorted(set(bad[:, 1].tolist()))[:8]} max err {err.max().item():.3g}")
print("fails", fails)

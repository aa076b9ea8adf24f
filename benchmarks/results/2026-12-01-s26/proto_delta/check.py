"""Small correctness runs of the delta-rows kernel (run under compute-sanitizer when a launch fails):
    python benchmarks/proto_delta/check.py"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import delta_rows as D  # noqa: E402

torch.manual_seed(0)
fails = 0
for (m, k, dens, s) in [(32, 64, 0.5, 1), (64, 256, 0.2, 2), (100, 512, 0.2, 3), (4096, 4096, 0.2, 16),
                        (33, 4096, 0.01, 5), (64, 64, 1.0, 4), (8, 64, 0.0, 2)]:
    for dt in (torch.float16, torch.bfloat16):
        for pf, minb in ((2, 24), (4, 24), (8, 24), (2, 32), (4, 32)):
            w = (torch.randn(m, k, device="cuda") * (torch.rand(m, k, device="cuda") < dens)).to(dt)
            x = torch.randn(k, device="cuda").to(dt)
            enc = D.encode(w, s)
            sc = D.Scratch(enc, "cuda")
            out = torch.full((m,), float("nan"), device="cuda", dtype=dt)
            D.launch(enc, x, sc, out, pf=pf, minb=minb, pdl=pf == 4)
            torch.cuda.synchronize()
            ref = D.matvec_reference(enc, x)
            err = (out.float() - ref).abs().max().item()
            ok = bool(torch.isfinite(out).all()) and err <= 1e-2 * (1 + ref.abs().max().item())
            fails += not ok
            print(m, k, dens, s, dt, pf, minb, "err", err, "ok" if ok else "WRONG", flush=True)
print("fails", fails)

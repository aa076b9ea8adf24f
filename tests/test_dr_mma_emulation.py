"""The CPU emulation of DeltaRows' tensor-core kernel (``benchmarks/diag/dr_mma_emulate.py``, session 61): it finds the
fault session 60's GPU run found (a drain pass wider than the ring), and the kernel as it is now is exact to fp32 sums
on every variant (plain, coded, X's ring or global X, 4-byte or 2-byte X loads), every token tile, densities 0-100 %,
odd K and many splits.  The emulator mirrors ``delta_rows_mma_body`` statement by statement, with ``ldmatrix`` and
``mma.m16n8k16`` fragments as the PTX ISA lays them out."""


import numpy as np
import pytest
import torch
from conftest import load_script

from flash_llm import DeltaRows

emu = load_script("benchmarks/diag/dr_mma_emulate.py", "dr_mma_emulate")


def _weight(m, k, density, dtype, seed, coded=False):
    gen = torch.Generator().manual_seed(seed)
    return emu.weight(m, k, density, dtype, gen, by_magnitude=coded), gen


def _err(w_dense, w, x, **kw):
    ref = (x.double() @ w_dense.double().t()).numpy()
    y = emu.emulate(w, x, **kw)
    scale = 1 + (np.abs(ref).max() if ref.size else 0.0)
    return (np.abs(y - ref).max() if ref.size else 0.0) / scale


def test_emulator_finds_session_60_fault():
    """Session 60's first version (no cap on a drain pass) double-counts on a weight of many narrow splits, whose
    window outruns the ring once every lane is done; the version with the cap is exact on the same weight."""
    wd, gen = _weight(32, 14336, 0.2, torch.float16, 1)
    w = DeltaRows.from_dense(wd, splits=192)
    x = torch.randn(1, 14336, generator=gen).to(torch.float16)
    assert _err(wd, w, x, xr=False, vec=True, cap=False) > 1e-3
    assert _err(wd, w, x, xr=False, vec=True) < 1e-6


@pytest.mark.parametrize("kind", ["f16", "bf16", "bf16c"])
def test_kernel_exact_in_emulation(kind):
    dtype = torch.float16 if kind == "f16" else torch.bfloat16
    seed = 10
    for (m, k), density, splits in (((64, 64), 1.0, None), ((40, 517), 0.5, 3), ((32, 1000), 0.0, 2),
                                    ((70, 2056), 0.03, 7), ((32, 4104), 0.9, 1)):
        seed += 1
        wd, gen = _weight(m, k, density, dtype, seed, coded=kind == "bf16c")
        w = DeltaRows.from_dense(wd, **({} if splits is None else {"splits": splits}))
        if kind == "bf16c":
            w = w.code_values()
            assert w is not None and w.coded
        for n in (1, 9, 17):
            x = torch.randn(n, k, generator=gen).to(dtype)
            for xr in (False, True) if (k % 8 == 0 and n <= 16) else (False,):
                for vec in (True, False) if k % 2 == 0 and not xr else (xr,):
                    err = _err(wd, w, x, xr=xr, vec=vec)
                    assert err < 1e-6, (kind, m, k, density, w.splits, n, xr, vec, err)


def test_emulator_counts():
    """--stats: every lane's groups are counted once, and the rounds of a warp are at least its longest lane's
    groups."""
    wd, gen = _weight(64, 1024, 0.3, torch.float16, 5)
    w = DeltaRows.from_dense(wd, splits=2)
    st = {}
    emu.emulate(w, torch.randn(16, 1024, generator=gen).to(torch.float16), xr=True, vec=True, stats=st)
    goff = w.offsets[: w.layout.slices + 1]
    assert st["lane_groups"] == 32 * int(goff[-1])
    assert st["warps"] == w.layout.slices * 2
    assert st["rounds"] >= int((goff[1:] - goff[:-1]).max()) // 2
    assert st["blocks"] >= st["passes"] > 0
    assert "rounds a warp" in emu._report(st)

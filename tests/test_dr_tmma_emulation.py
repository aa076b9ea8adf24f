"""The CPU emulation of session 69's ``delta_rows_spmm_<dtype>_tmma<NT>`` (``benchmarks/diag/dr_tmma_emulate.py``):
the split layout's product through a tile of each (slice, split)'s window, in passes of a band of columns, equals the
reference, every nonzero placed in exactly one pass; and the reduction's (rank, token) map covers the block's
``32 x NT`` outputs once."""

import pytest
import torch
from conftest import load_script

from flash_llm import DeltaRows

emu = load_script("benchmarks/diag/dr_tmma_emulate.py", "dr_tmma_emulate")  # (it puts diag/ on sys.path itself)


@pytest.mark.parametrize("nt", [8, 16, 32])
def test_rank_token_map_covers_the_outputs_once(nt):
    got = emu.rank_token_map(nt)
    assert len(got) == 32 * nt and sorted(got) == [(r, t) for r in range(32) for t in range(nt)]


@pytest.mark.parametrize("m, k, density, splits, n, band", [
    (96, 4096, 0.2, 1, 9, 256),     # one split: its window all of K, 16 passes
    (64, 2056, 0.95, 3, 32, 256),   # K not a multiple of 16: the last step past K (X's zeros)
    (40, 1000, 0.02, 7, 1, 1024),   # one pass, nearly empty rows
    (300, 1536, 0.0, 3, 16, 256),   # empty
])
def test_tile_product_is_exact(m, k, density, splits, n, band):
    gen = torch.Generator().manual_seed(m + k)
    w = torch.where(torch.rand(m, k, generator=gen) < density, torch.randn(m, k, generator=gen), 0.0)
    w[min(7, m - 1)] = 0.0
    w[min(7, m - 1), k - 1] = 1.0  # (a row of one far nonzero: escapes)
    dr = DeltaRows.from_dense(w.to(torch.bfloat16), splits=splits)
    x = torch.randn(n, k, generator=gen).to(torch.bfloat16)
    assert emu.check(dr, x, band) <= 1e-12


def test_band_must_be_whole_steps():
    dr = DeltaRows.from_dense(torch.eye(32, 64, dtype=torch.float16))
    with pytest.raises(AssertionError):
        emu.emulate_tmma(dr, torch.ones(2, 64, dtype=torch.float16), 100)


@pytest.mark.parametrize("aligned", [True, False])
def test_tile_dispatch(aligned, monkeypatch):
    """With ``DR_MMA_TILE`` (and the tensor-core kernel on, ``DR_MMA_MIN``) 9-16 tokens on a split-layout weight launch
    ``delta_rows_spmm_<dtype>_tmma16[c]``, a block a (slice, split) of ``DRTM_WARPS`` warps, ``(32 + 16) (2 band +
    16)`` bytes of dynamic shared memory, the band last; then the splits' reduction.  X off 16 bytes keeps ``_mma16``
    (launches faked: no GPU)."""
    from flash_llm import kernels as k
    from flash_llm.reference import FORMAT_IDS

    calls = []
    monkeypatch.setattr(k, "DR_MMA_MIN", 1)
    monkeypatch.setattr(k, "DR_MMA_TILE", True)
    monkeypatch.setattr(k, "DR_MMA_TILE_BAND", 500)  # (cut to 496: whole 16-column steps)
    monkeypatch.setattr(k, "launch",
                        lambda name, grid, block, args, *a, **kw: calls.append((name, grid, block, args, a)))
    monkeypatch.setattr(k.torch.cuda, "current_stream", lambda dev=None: type("S", (), {"cuda_stream": 0})())
    gen = torch.Generator().manual_seed(5)
    w = torch.where(torch.rand(96, 1024, generator=gen) < 0.2, torch.randn(96, 1024, generator=gen), 0.0)
    dr = DeltaRows.from_dense(w.to(torch.bfloat16), splits=3)
    xb = torch.randn(12 * 1024 + 8, generator=gen).to(torch.bfloat16)
    x = (xb[:-8] if aligned else xb[1:-7]).view(12, 1024)
    k.spmm_cuda(x, dr.data, dr.offsets, FORMAT_IDS[DeltaRows], 96, 1024, None)
    (name, grid, block, args, rest), (red, *_) = calls
    assert red == "delta_rows_reduce_bf16"
    if not aligned:
        assert name.startswith("delta_rows_spmm_bf16_mma16"), name
        return
    assert name == "delta_rows_spmm_bf16_tmma16" and grid == (dr.layout.slices, 3, 1) and block == 32 * k.DRTM_WARPS
    assert args[-1][0] == 496 and rest[-1] == 48 * (2 * 496 + 16)

"""The owner layout of a Llama MLP's down (flash_llm.formats.delta_mlp) on the CPU: exact round trips for several
block counts, lanes a row and dtypes, every intermediate column owned once, balanced warp runs, and clear errors."""

from __future__ import annotations

import pytest
import torch

from flash_llm import DeltaRows
from flash_llm.formats.delta_mlp import owned_down, owned_to_dense, owner_columns


def _sparse(m, k, density, dtype, gen):
    w = torch.randn(m, k, generator=gen).to(dtype)
    w[torch.rand(m, k, generator=gen) >= density] = 0
    return w


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("parts,blocks,density", [(4, 2, 0.2), (2, 3, 0.5), (8, 5, 0.05), (16, 1, 0.2),
                                                  (4, 7, 0.0), (4, 4, 1.0)])
def test_owned_down_round_trip(dtype, parts, blocks, density):
    gen = torch.Generator().manual_seed(parts * 31 + blocks)
    h, inter, k = 96, 256, 64
    gu = DeltaRows.from_dense(_sparse(2 * inter, k, 0.3, dtype, gen), pair_halves=True, parts=parts)
    down = _sparse(h, inter, density, dtype, gen)
    down[5] = 0  # an empty row
    down[:, 17] = 0  # an empty column
    if -(-gu.layout.slices // blocks) > 32:
        blocks = -(-gu.layout.slices // 32)
    od = owned_down(gu, down, blocks)
    cols = od.columns[od.columns >= 0]
    assert torch.equal(cols.sort().values, torch.arange(inter)), "each intermediate column owned exactly once"
    assert od.cols == od.warps * 16 // parts
    assert torch.equal(owned_to_dense(od, inter, dtype).view(torch.int16), down.view(torch.int16))
    # the warps' runs of down slices: ns // W or one more each, every run's groups one range
    ns = h // 32
    assert od.goff.numel() == blocks * ns + 1 and od.perm.numel() == blocks * h
    per_block = od.perm.view(blocks, h).to(torch.int64)
    assert all(torch.equal(r.sort().values, torch.arange(h)) for r in per_block), "each row once a block"
    runs = od.runs.to(torch.int64)
    assert runs.shape == (blocks, od.warps + 1) and (runs[:, 0] == 0).all() and (runs[:, -1] == ns).all()
    assert (runs[:, 1:] >= runs[:, :-1]).all()


def test_owner_columns_follow_the_slices():
    gen = torch.Generator().manual_seed(0)
    gu = DeltaRows.from_dense(_sparse(512, 64, 0.3, torch.float16, gen), pair_halves=True, parts=4)
    cols, warps = owner_columns(gu, 3)
    perm = gu._offset_arrays()[3]
    sg = gu.layout.slices
    assert warps == -(-sg // 3)
    for b in range(3):
        for w in range(warps):
            s = b + 3 * w
            want = [int(perm[32 * s + 4 * j]) for j in range(4)] if s < sg else [-1] * 4
            assert cols[b, 4 * w: 4 * w + 4].tolist() == want


def test_owned_down_refuses_bad_input():
    gen = torch.Generator().manual_seed(2)
    gu = DeltaRows.from_dense(_sparse(512, 64, 0.3, torch.float16, gen), pair_halves=True, parts=4)
    down = _sparse(64, 256, 0.2, torch.float16, gen)
    with pytest.raises(ValueError, match="at most 32"):
        owned_down(gu, down, 1)
    with pytest.raises(ValueError, match="blocks must be"):
        owned_down(gu, down, 0)
    with pytest.raises(ValueError, match="multiple of 32"):
        owned_down(gu, down[:40], 2)
    with pytest.raises(ValueError, match="columns"):
        owned_down(gu, down[:, :200], 2)
    split = DeltaRows.from_dense(_sparse(512, 64, 0.3, torch.float16, gen), pair_halves=True, splits=2)
    with pytest.raises(ValueError, match="parts layout"):
        owned_down(split, down, 2)

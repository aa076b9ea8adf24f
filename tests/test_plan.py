"""The launch planner (``flash_llm.kernels.plan``): pure Python, so CI checks it without a GPU."""

import pytest

from flash_llm.kernels import (BITMAP, THREADS, TILED_CSL, _MAX_NT, block_threads, kernel_name, plan, reduce_ways,
                               tcsl_block)

SHAPES = [(1, 1), (257, 1000), (4096, 4096), (9216, 36864), (28672, 8192)]


@pytest.mark.parametrize("fmt", [BITMAP, TILED_CSL], ids=["bitmap", "tiled-csl"])
@pytest.mark.parametrize("density", [0.0, 0.01, 0.2, 1.0])
@pytest.mark.parametrize("m,k", SHAPES)
def test_plan_covers_the_problem(fmt, density, m, k):
    kt = -(-k // 64)
    for n in (1, 8, 17, 33, 64, 65, 128, 1000):
        for wgmma in (False, True):
            p = plan(m, k, n, density, 132, 6, None, fmt, wgmma)
            assert p.nt <= _MAX_NT[fmt]
            assert p.n_chunks * p.block_tokens >= n > (p.n_chunks - 1) * p.block_tokens
            assert p.row_blocks * p.block_rows >= m > (p.row_blocks - 1) * p.block_rows
            # every split has strips, and the splits cover K
            assert p.splits * p.kt_per_split >= kt > (p.splits - 1) * p.kt_per_split
            assert 1 <= p.splits <= 64 and (p.splits == 1 or p.kt_per_split >= 4)
            name = kernel_name(fmt, None, n, wgmma)
            if fmt == BITMAP or n <= 32:
                assert name.endswith(f"_nt{p.nt}") and p.block_tokens == 8 * p.nt and p.block_rows == 64
                assert block_threads(name) == (THREADS if fmt == BITMAP else 32)
            else:  # 32 tokens per warp (or per warpgroup's 64 rows): the split-K partials are those of NT = 4
                suffix, tokens, rows = tcsl_block(n, wgmma)
                assert name.endswith("_" + suffix) and (p.block_tokens, p.block_rows) == (tokens, rows)
                assert p.nt == 4 and tokens % 32 == 0
                assert block_threads(name) == (128 * rows // 64 if suffix.startswith("wg") else tokens)


@pytest.mark.parametrize("fmt", [BITMAP, TILED_CSL], ids=["bitmap", "tiled-csl"])
def test_plan_split_override(fmt):
    for s in (1, 2, 5, 16, 128, 10_000):
        p = plan(512, 8192, 17, 0.3, 132, 6, s, fmt)
        assert p.splits == min(s, 128) or p.splits * p.kt_per_split >= 128 > (p.splits - 1) * p.kt_per_split


def test_plan_splits_large_layers_at_small_n():
    """N = 1 on OPT-66B's down projection: 144 row blocks cannot fill 132 SMs x 6 blocks, so K is split."""
    assert plan(9216, 36864, 1, 0.2, 132, 6, None, BITMAP).splits > 1
    assert plan(9216, 36864, 1, 0.2, 132, 24, None, TILED_CSL).splits > 1


def test_reduce_ways_widens_only_small_launches():
    """Llama-3-8B's 4096-row layers (64 row blocks) at N = 1 get 4 warps per group set; OPT-66B's 9216 rows at
    N = 32 (144 row blocks x 4 token tiles) fill the GPU with one thread per group."""
    assert reduce_ways(64, 1, 132) == 4
    assert reduce_ways(64, 4, 132) == 4
    assert reduce_ways(144, 4, 132) == 1
    assert reduce_ways(144, 1, 132) == 4
    assert reduce_ways(264, 1, 132) == 1


def test_tcsl_kernel_choice():
    """Tiled-CSL above 32 tokens: two warps (N <= 64), then warpgroup MMA (128 tokens, 256 threads, 128 rows per
    block) where it runs, else four warps."""
    assert tcsl_block(32) == ("nt4", 32, 64) and tcsl_block(8, True) == ("nt1", 8, 64)
    for wgmma in (False, True):
        assert tcsl_block(33, wgmma) == tcsl_block(64, wgmma) == ("w2", 64, 64)
        assert block_threads(kernel_name(TILED_CSL, None, 50, wgmma)) == 64
    assert tcsl_block(65) == tcsl_block(1000) == ("w4", 128, 64)
    assert tcsl_block(65, True) == tcsl_block(1000, True) == ("wg128x2", 128, 128)
    assert block_threads(kernel_name(TILED_CSL, None, 100, True)) == 256
    assert block_threads(kernel_name(TILED_CSL, None, 100, False)) == 128
    assert kernel_name(BITMAP, None, 100, True).endswith("_nt8")
    p = plan(9216, 36864, 300, 0.2, 132, 2, None, TILED_CSL, True)
    assert (p.n_chunks, p.row_blocks, p.block_tokens, p.block_rows) == (3, 72, 128, 128)

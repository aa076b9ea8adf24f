"""The launch planner (``flash_llm.kernels.plan``): pure Python, so CI checks it without a GPU."""

import pytest

from flash_llm.kernels import BITMAP, TILED_CSL, _MAX_NT, kernel_name, plan, reduce_ways

SHAPES = [(1, 1), (257, 1000), (4096, 4096), (9216, 36864), (28672, 8192)]


@pytest.mark.parametrize("fmt", [BITMAP, TILED_CSL], ids=["bitmap", "tiled-csl"])
@pytest.mark.parametrize("density", [0.0, 0.01, 0.2, 1.0])
@pytest.mark.parametrize("m,k", SHAPES)
def test_plan_covers_the_problem(fmt, density, m, k):
    kt = -(-k // 64)
    for n in (1, 8, 17, 33, 64, 1000):
        p = plan(m, k, n, density, 132, 6, None, fmt)
        assert p.nt <= _MAX_NT[fmt] and p.n_chunks * 8 * p.nt >= n > (p.n_chunks - 1) * 8 * p.nt
        assert p.row_blocks * 64 >= m > (p.row_blocks - 1) * 64
        # every split has strips, and the splits cover K
        assert p.splits * p.kt_per_split >= kt > (p.splits - 1) * p.kt_per_split
        assert 1 <= p.splits <= 64 and (p.splits == 1 or p.kt_per_split >= 4)
        assert kernel_name(fmt, None, n).endswith(f"_nt{p.nt}")


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

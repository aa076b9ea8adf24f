"""Session 84 fixes to flash_llm/models/synthetic.py: the tiled-csl / delta-rows formulas at high sparsity, seed
validation, ``initializer_range``, and the ``memory_limit`` / ``fmt`` argument checks."""

import math

import pytest
import torch

from flash_llm.formats import BitmapTiles, DeltaRows, TiledCSL
from flash_llm.formats.delta_rows import GROUP, LANES, default_parts, default_splits
from flash_llm.models.config import preset
from flash_llm.models.synthetic import (
    _draw, bitmap_formula_bytes, build_synthetic, delta_rows_formula_bytes, tiled_csl_formula_bytes,
)

TINY = preset("llama-3-8b").replace(hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
                                    intermediate_size=128, vocab_size=100)
SPARSITIES = (0.5, 0.9, 0.99, 0.995)
FORMATS = {"bitmap": (BitmapTiles, bitmap_formula_bytes), "tiled-csl": (TiledCSL, tiled_csl_formula_bytes),
           "delta-rows": (DeltaRows, delta_rows_formula_bytes)}


def _old_tiled_csl(m, k, nnz):
    """tiled_csl_formula_bytes before session 84 (no per-tile padding)."""
    return 4 * nnz + 4 * (math.ceil(m / 64) * math.ceil(k / 64) + 1)


def _old_delta_rows(m, k, nnz):
    """delta_rows_formula_bytes before session 84 (plain values, default parts), trailing-gap escapes counted."""
    q = min(max(1.0 - nnz / (m * k), 0.0), 1.0 - 1e-12)
    entries = nnz * (1.0 + q ** 15 / (1.0 - q ** 15))
    p = default_parts(m, k, int(nnz))
    slices = math.ceil(m * p / LANES)
    splits = 1 if p > 1 else default_splits(m, math.ceil(entries / m / GROUP))
    values = 2.5 * (entries + 3.5 * m * p) + (4 * p if p > 1 else 0)
    return values + 4 * (slices + 1) + 72 * slices * splits + 4 * slices * LANES


@pytest.fixture(scope="module")
def weights():
    gen = torch.Generator().manual_seed(0)
    return {s: _draw(1024, 1024, 1.0 - s, torch.float16, "cpu", gen) for s in SPARSITIES}


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_formula_within_3_percent(weights, fmt, sparsity):
    cls, formula = FORMATS[fmt]
    w = weights[sparsity]
    nnz = int(w.count_nonzero())
    stored = cls.from_dense(w).nbytes
    ratio = stored / formula(*w.shape, nnz)
    assert abs(ratio - 1) < 0.03, f"{fmt} at {sparsity}: stored / formula = {ratio:.4f}"


@pytest.mark.parametrize("shape", [(1024, 1024), (4096, 1024), (256, 4096), (1000, 1000)])
@pytest.mark.parametrize("sparsity", (0.5, 0.8, 0.9))
def test_formula_unchanged_at_moderate_sparsity(shape, sparsity):
    m, k = shape
    nnz = (1 - sparsity) * m * k
    for new, old in ((tiled_csl_formula_bytes(m, k, nnz), _old_tiled_csl(m, k, nnz)),
                     (delta_rows_formula_bytes(m, k, nnz), _old_delta_rows(m, k, nnz))):
        assert abs(new / old - 1) < 0.005


def test_formula_edge_densities():
    # dense or empty: no expected padding, no escapes
    assert tiled_csl_formula_bytes(128, 128, 128 * 128) == 4 * 128 * 128 + 4 * 5
    assert tiled_csl_formula_bytes(128, 128, 0) == 4 * 5
    assert math.isfinite(delta_rows_formula_bytes(128, 128, 0))
    assert math.isfinite(delta_rows_formula_bytes(128, 128, 128 * 128))


@pytest.mark.parametrize("seed,exc", [(2 ** 32, ValueError), (-1, ValueError), (7 - 2 ** 32, ValueError),
                                      (2 ** 64, ValueError), (True, TypeError), (1.0, TypeError), ("1", TypeError),
                                      (None, TypeError)])
def test_seed_refused(seed, exc):
    with pytest.raises(exc, match="seed"):
        build_synthetic(TINY, 0.5, device="cpu", progress=False, seed=seed)


def test_seed_range_accepted():
    import numpy as np

    a, _ = build_synthetic(TINY, 0.5, device="cpu", progress=False, seed=2 ** 32 - 1)
    b, _ = build_synthetic(TINY, 0.5, device="cpu", progress=False, seed=np.int64(2 ** 32 - 1))
    c, _ = build_synthetic(TINY, 0.5, device="cpu", progress=False, seed=0)
    qa, qb, qc = (x.model.layers[0].self_attn.q_proj.weight.to_dense() for x in (a, b, c))
    assert torch.equal(qa, qb) and not torch.equal(qa, qc)


@pytest.mark.parametrize("sparsity", [None, 0.5])
def test_initializer_range(sparsity):
    cfg = TINY.replace(hidden_size=256, intermediate_size=512, vocab_size=1000, initializer_range=0.002)
    model, _ = build_synthetic(cfg, sparsity, device="cpu", progress=False, dtype=torch.float16)
    emb = model.model.embed_tokens.weight.float()
    assert emb.std().item() == pytest.approx(0.002, rel=0.05)
    gate = model.model.layers[0].mlp.gate_proj
    w = (gate.weight if sparsity is None else gate.weight.to_dense()).float()
    if sparsity is None:
        assert w.std().item() == pytest.approx(0.002, rel=0.05)
    else:  # magnitude-pruned normal(0, 0.002): kept values are those over 0.002 * 0.674
        kept = w[w != 0].abs()
        assert kept.min().item() == pytest.approx(0.002 * 0.6745, rel=0.02)
        assert (w == 0).float().mean().item() == pytest.approx(0.5, abs=0.02)


@pytest.mark.parametrize("limit,exc", [(float("nan"), ValueError), (-1, ValueError), ("1e9", TypeError),
                                       (True, TypeError), (False, TypeError), ([1], TypeError)])
def test_memory_limit_refused(limit, exc):
    with pytest.raises(exc, match="memory_limit"):
        build_synthetic(TINY, 0.5, device="cpu", progress=False, memory_limit=limit)


def test_memory_limit_accepted():
    from flash_llm.models.synthetic import DoesNotFit

    with pytest.raises(DoesNotFit):
        build_synthetic(TINY, 0.5, device="cpu", progress=False, memory_limit=0)
    build_synthetic(TINY, 0.5, device="cpu", progress=False, memory_limit=float("inf"))
    build_synthetic(TINY, 0.5, device="cpu", progress=False, memory_limit=torch.tensor(1e12))


@pytest.mark.parametrize("fmt", [["bitmap"], None, 1, b"bitmap"])
def test_fmt_type_refused(fmt):
    with pytest.raises(TypeError, match="fmt"):
        build_synthetic(TINY, 0.5, device="cpu", progress=False, fmt=fmt)

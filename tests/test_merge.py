"""Stacked formats (SparseFormat.concat) and merged projections (flash_llm.models.merge_projections): the same
arrays as compressing the stacked dense weight, the same logits and tokens as the separate layers, and an exact
way back."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import flash_llm
from flash_llm.engine import Engine
from flash_llm.models import MergedLinear, merge_projections, unmerge_projections
from flash_llm.prune import magnitude_prune_
from conftest import tiny_hf_model

FORMATS = [flash_llm.BitmapTiles, flash_llm.TiledCSL]
PROMPTS = [[5, 6, 7, 8, 9], [1, 2, 3], [10, 11, 12, 13, 14, 15, 16]]


def _sparse(m, k, density, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, k, generator=g).to(dtype)
    return w * (torch.rand(m, k, generator=g) < density)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows", [(64, 128, 64), (16, 48, 7), (100, 3, 64), (64,)], ids=str)
def test_concat_equals_compressing_the_stack(fmt, dtype, rows):
    """Record-aligned row counts join records directly, others re-encode: both give from_dense's arrays."""
    ws = [_sparse(r, 150, d, dtype, i) for i, (r, d) in enumerate(zip(rows, (0.2, 1.0, 0.0, 0.5)))]
    got = fmt.concat([fmt.from_dense(w) for w in ws])
    want = fmt.from_dense(torch.cat(ws))
    assert got.shape == want.shape and got.dtype == dtype and got.nnz == want.nnz
    assert torch.equal(got.offsets, want.offsets) and torch.equal(got.data, want.data)
    assert torch.equal(got.to_dense(), torch.cat(ws))


def test_concat_refuses_what_does_not_stack():
    a = flash_llm.BitmapTiles.from_dense(_sparse(16, 64, 0.3, torch.float16, 0))
    with pytest.raises(ValueError, match="parts is empty"):
        flash_llm.BitmapTiles.concat([])
    with pytest.raises(ValueError, match=r"parts\[1\] is 16x128"):
        flash_llm.BitmapTiles.concat([a, flash_llm.BitmapTiles.from_dense(_sparse(16, 128, 0.3, torch.float16, 1))])
    with pytest.raises(ValueError, match=r"parts\[1\].*bfloat16"):
        flash_llm.BitmapTiles.concat([a, flash_llm.BitmapTiles.from_dense(_sparse(16, 64, 0.3, torch.bfloat16, 1))])
    with pytest.raises(TypeError, match=r"parts\[1\] is a TiledCSL"):
        flash_llm.BitmapTiles.concat([a, flash_llm.TiledCSL.from_dense(_sparse(16, 64, 0.3, torch.float16, 1))])
    assert flash_llm.BitmapTiles.concat([a]) is a


def _ours(hm, dtype):
    m = flash_llm.models.from_config(hm.config, dtype=dtype, device="meta")
    m.load_state_dict({k: v.to(dtype) for k, v in hm.state_dict().items()}, assign=True)
    return m.eval()


def _model(family, kind):
    """A tiny model: fp32 dense, or fp16 pruned to 70 % and sparsified (bitmap or Tiled-CSL)."""
    hm = tiny_hf_model(family, seed=5)
    if kind == "dense":
        return _ours(hm, torch.float32)
    m = _ours(hm, torch.float16)
    magnitude_prune_(m, 0.7, filter_fn=lambda mod, fqn: fqn != "lm_head")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        flash_llm.sparsify_(m, flash_llm.SparsifyConfig(format=kind))
    return m


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("kind", ["dense", "bitmap", "tiled-csl"])
def test_merged_model_generates_what_the_separate_one_does(family, kind):
    sep = _model(family, kind)
    merged = copy.deepcopy(sep)
    before = {k: v.clone() if torch.is_tensor(v) else v for k, v in sep.state_dict().items()}
    report = merge_projections(merged)
    groups = [k for k in report if k.endswith(("qkv_proj", "gate_up_proj"))]
    assert groups and all(report[g] == "merged" for g in groups), report
    assert len(groups) == (4 if family == "llama" else 2)  # 2 layers x (qkv [+ gate_up])
    attn = merged.model.layers[0].self_attn if family == "llama" else merged.model.decoder.layers[0].self_attn
    assert isinstance(attn.qkv_proj, MergedLinear) and not hasattr(attn, "q_proj")
    want_kind = torch.nn.Linear if kind == "dense" else flash_llm.SparseLinear
    assert type(attn.qkv_proj.layer) is want_kind
    assert merge_projections(merged) == {}  # already merged: nothing to do

    a = Engine(sep, max_batch=3, max_seq=32).generate(PROMPTS, 6, output_logits=True, eos_token_id=None)
    b = Engine(merged, max_batch=3, max_seq=32).generate(PROMPTS, 6, output_logits=True, eos_token_id=None)
    # each output feature is the same dot product; only the matmul's blocking may differ (a few ulp)
    tol = 1e-5 if kind == "dense" else 2e-3
    torch.testing.assert_close(b.logits, a.logits, rtol=tol, atol=tol)
    assert torch.equal(a.tokens, b.tokens)

    assert len(unmerge_projections(merged)) == len(groups)
    after = merged.state_dict()
    assert list(after) == list(before)  # the same keys in the same order
    for k, v in before.items():
        assert torch.equal(after[k], v) if torch.is_tensor(v) else after[k] == v, k
    c = Engine(merged, max_batch=3, max_seq=32).generate(PROMPTS, 6, output_logits=True, eos_token_id=None)
    assert torch.equal(c.logits, a.logits)


def test_engine_merge_option_and_groups_left_alone():
    """Engine(merge=True) merges in place and reports; a group mixing a dense and a sparse layer stays separate."""
    m = _model("llama", "bitmap")
    layer = m.model.layers[1]
    layer.self_attn.k_proj = layer.self_attn.k_proj.to_linear()  # now one dense layer among sparse ones
    eng = Engine(m, max_batch=1, max_seq=16, merge=True)
    assert eng.merged["model.layers.0.self_attn.qkv_proj"] == "merged"
    assert "not all nn.Linear or all SparseLinear" in eng.merged["model.layers.1.self_attn.qkv_proj"]
    assert eng.merged["model.layers.1.mlp.gate_up_proj"] == "merged"
    assert layer.self_attn.qkv_proj is None and isinstance(layer.mlp.gate_up_proj, MergedLinear)
    assert Engine(_model("llama", "bitmap"), max_batch=1, max_seq=16).merged == {}
    out = eng.generate([PROMPTS[0]], 3, eos_token_id=None)
    assert out.tokens.shape == (1, 3)


def test_saving_a_merged_model_is_refused_until_unmerged(tmp_path):
    m = _model("llama", "bitmap")
    merge_projections(m)
    with pytest.raises(ValueError, match=r"model has 4 merged projections \(model.layers.0.self_attn.qkv_proj, "
                                         r".*unmerge_projections\(model\) before saving"):
        flash_llm.save_pretrained(m, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()
    unmerge_projections(m)
    flash_llm.save_pretrained(m, tmp_path / "ckpt", progress=False)
    back = flash_llm.from_pretrained(tmp_path / "ckpt")
    assert torch.equal(back.model.layers[0].self_attn.k_proj.to_dense(), m.model.layers[0].self_attn.k_proj.to_dense())

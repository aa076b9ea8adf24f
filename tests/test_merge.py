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


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_spmm_silu_mul_is_silu_of_gate_times_up(fmt, dtype):
    """ops.spmm_silu_mul on the CPU: the merged product rounded to the dtype, then silu(gate) * up in fp32, rounded
    once; it refuses what spmm refuses, and an odd row count."""
    w = fmt.from_dense(_sparse(2 * 72, 96, 0.3, dtype, 1))
    x = torch.randn(3, 5, 96).to(dtype)
    y = flash_llm.spmm(x, w).float()
    want = (torch.nn.functional.silu(y[..., :72]) * y[..., 72:]).to(dtype)
    got = flash_llm.ops.spmm_silu_mul(x, w)
    assert got.shape == (3, 5, 72) and got.dtype == dtype
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="even"):
        flash_llm.ops.spmm_silu_mul(x, fmt.from_dense(_sparse(71, 96, 0.3, dtype, 2)))
    with pytest.raises(TypeError, match="dtype"):
        flash_llm.ops.spmm_silu_mul(x.float(), w)
    with pytest.raises(ValueError, match="last dimension"):
        flash_llm.ops.spmm_silu_mul(x[..., :95], w)
    with pytest.raises(TypeError, match="compressed weight"):
        flash_llm.ops.spmm_silu_mul(x, torch.zeros(144, 96, dtype=dtype))


@pytest.mark.parametrize("kind", ["bitmap", "tiled-csl"])
def test_fused_llama_mlp_takes_silu_mul_from_the_sparse_projection(kind, monkeypatch):
    """A fused Llama MLP whose merged gate / up is one SparseLinear calls spmm_silu_mul (not the separate silu_mul
    kernel) and gives what the separate projections and silu_mul give."""
    from flash_llm.models import llama, set_fused

    m = _model("llama", kind)
    merge_projections(m)
    mlp = m.model.layers[0].mlp
    calls = []
    real = llama.spmm_silu_mul
    monkeypatch.setattr(llama, "spmm_silu_mul", lambda x, w: calls.append(x.shape) or real(x, w))
    x = torch.randn(2, 3, m.config.hidden_size).to(torch.float16)
    gate, up = mlp.gate_up_proj(x)
    want = mlp.down_proj((torch.nn.functional.silu(gate.float()) * up.float()).to(torch.float16))
    set_fused(m, True)
    with torch.no_grad():  # (inference only: the op has no autograd formula, so with grad the MLP takes two steps)
        got = mlp(x)
    assert calls == [(2, 3, m.config.hidden_size)]
    assert torch.equal(got, want)
    mlp(x)  # with grad enabled: not through spmm_silu_mul
    assert len(calls) == 1
    set_fused(m, False)
    assert torch.equal(mlp(x), mlp.down_proj(torch.nn.functional.silu(gate) * up)) and len(calls) == 1


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_spmm_rms_norm_and_spmm_add_on_the_cpu(fmt, dtype):
    """ops.spmm_rms_norm is spmm of the reference RMSNorm (and then SiLU x up with act), ops.spmm_add_ adds the
    rounded product in place; both refuse bad arguments by name."""
    from flash_llm.reference import rms_norm

    w = fmt.from_dense(_sparse(2 * 72, 96, 0.3, dtype, 1))
    x = (4 * torch.randn(3, 5, 96)).to(dtype)
    g = (torch.rand(96) + 0.5).to(dtype)
    got = flash_llm.ops.spmm_rms_norm(x, g, 1e-5, w)
    assert got.shape == (3, 5, 144) and got.dtype == dtype
    assert torch.equal(got, flash_llm.spmm(rms_norm(x, g, 1e-5), w))
    assert torch.equal(flash_llm.ops.spmm_rms_norm(x, g, 1e-5, w, act="silu_mul"),
                       flash_llm.ops.spmm_silu_mul(rms_norm(x, g, 1e-5), w))
    acc = torch.randn(3, 5, 144).to(dtype)
    want = acc + flash_llm.spmm(x, w)
    assert flash_llm.ops.spmm_add_(acc, x, w) is acc and torch.equal(acc, want)
    with pytest.raises(ValueError, match=r"norm_weight must be a \[96\]"):
        flash_llm.ops.spmm_rms_norm(x, g[:95], 1e-5, w)
    with pytest.raises(ValueError, match="norm_weight must be"):
        flash_llm.ops.spmm_rms_norm(x, g.float(), 1e-5, w)
    with pytest.raises(ValueError, match="act must be"):
        flash_llm.ops.spmm_rms_norm(x, g, 1e-5, w, act="gelu")
    with pytest.raises(ValueError, match="even"):
        flash_llm.ops.spmm_rms_norm(x, g, 1e-5, fmt.from_dense(_sparse(71, 96, 0.3, dtype, 2)), act="silu_mul")
    with pytest.raises(ValueError, match=r"acc must be a .* of shape \(3, 5, 144\)"):
        flash_llm.ops.spmm_add_(acc[..., :72], x, w)
    with pytest.raises(ValueError, match="acc must be contiguous"):
        flash_llm.ops.spmm_add_(torch.zeros(5, 3, 144, dtype=dtype).transpose(0, 1), x, w)
    assert torch.equal(acc, want)  # nothing written by the refused calls


@pytest.mark.parametrize("fmt", FORMATS + [flash_llm.DeltaRows], ids=lambda c: c.__name__)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_spmm_layer_norm_and_spmm_add_with_bias_on_the_cpu(fmt, dtype):
    """ops.spmm_layer_norm is spmm of the reference LayerNorm (fp32, rounded once) with the bias, then ReLU with
    act; ops.spmm_add_ adds the rounded product + bias in place; bad arguments are refused by name, nothing written."""
    from flash_llm.reference import layer_norm

    w = fmt.from_dense(_sparse(144, 96, 0.3, dtype, 3))
    x = (4 * torch.randn(3, 5, 96) + 1).to(dtype)
    g, b = (torch.rand(96) + 0.5).to(dtype), torch.randn(96).to(dtype)
    bias = torch.randn(144).to(dtype)
    h = layer_norm(x, g, b, 1e-5)
    assert torch.equal(h, torch.nn.functional.layer_norm(x.float(), (96,), g.float(), b.float(), 1e-5).to(dtype))
    got = flash_llm.ops.spmm_layer_norm(x, g, b, 1e-5, w, bias)
    assert got.shape == (3, 5, 144) and got.dtype == dtype
    assert torch.equal(got, flash_llm.spmm(h, w, bias))
    assert torch.equal(flash_llm.ops.spmm_layer_norm(x, g, b, 1e-5, w, bias, act="relu"), torch.relu(got))
    assert (flash_llm.ops.spmm_layer_norm(x, g, b, 1e-5, w, bias, act="relu") >= 0).all()
    assert torch.equal(flash_llm.ops.spmm_layer_norm(x, g, None, 1e-5, w),
                       flash_llm.spmm(layer_norm(x, g, None, 1e-5), w))
    acc = torch.randn(3, 5, 144).to(dtype)
    want = acc + flash_llm.spmm(x, w, bias)
    assert flash_llm.ops.spmm_add_(acc, x, w, bias) is acc and torch.equal(acc, want)
    with pytest.raises(ValueError, match=r"norm_bias must be a \[96\]"):
        flash_llm.ops.spmm_layer_norm(x, g, b[:95], 1e-5, w)
    with pytest.raises(ValueError, match="norm_weight must be"):
        flash_llm.ops.spmm_layer_norm(x, g.float(), b, 1e-5, w)
    with pytest.raises(ValueError, match="act must be None or 'relu'"):
        flash_llm.ops.spmm_layer_norm(x, g, b, 1e-5, w, act="silu_mul")
    with pytest.raises(ValueError, match="bias"):
        flash_llm.ops.spmm_add_(acc, x, w, bias[:10])
    assert torch.equal(acc, want)  # nothing written by the refused calls


def _assert_rounding_order_close(got, want):
    """``got`` and ``want``: fp16 logits of the same model whose norms and adds rounded in another order (inside the
    projections or apart): within 4 fp16 ulps of the largest logit.  (2e-3 held with torch 2.13's CPU kernels but not
    2.11's: 0.0037 at logits up to 2.7, 2 ulps, session 58.)"""
    tol = 4 * torch.finfo(torch.float16).eps * want.float().abs().max().item()
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=tol)


@pytest.fixture
def dynamo_reset_after():
    """Clear torch.compile's caches after the test: its compiles of the fused functions at new shapes would otherwise
    count towards dynamo's per-function recompile limit in later tests (which then fall back to eager and no longer
    test the compiled path)."""
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("family, kind", [("llama", "bitmap"), ("llama", "tiled-csl"), ("opt", "tiled-csl"),
                                          ("opt", "delta-rows")])
def test_fused_model_runs_one_token_through_the_sparse_projections(family, kind, monkeypatch, dynamo_reset_after):
    """Fused and merged, a sparse Llama or pre-LN OPT decodes one sequence through forward_one_token (once per layer
    and decode step; the prefill and FLASH_LLM_FUSE_NORMS=0 keep forward_deferred): Llama with each layer's norms and
    residual adds inside its projections, OPT with its LayerNorms inside the projections after them, ReLU inside fc1's
    and the residual adds inside out_proj's and fc2's; and it generates what forward_deferred does."""
    from flash_llm.models import llama, opt

    layer_cls = llama.LlamaDecoderLayer if family == "llama" else opt.OPTDecoderLayer
    calls = []
    real = layer_cls.forward_one_token
    monkeypatch.setattr(layer_cls, "forward_one_token",
                        lambda self, *a: calls.append(self.self_attn.layer_idx) or real(self, *a))
    got = Engine(_model(family, kind), max_batch=1, max_seq=32, fuse=True, merge=True).generate(
        [PROMPTS[2]], 6, output_logits=True, eos_token_id=None)
    assert calls == [0, 1] * 5  # 5 decode steps after the prefill's token
    monkeypatch.setattr(llama, "FUSE_NORMS", False)
    want = Engine(_model(family, kind), max_batch=1, max_seq=32, fuse=True, merge=True).generate(
        [PROMPTS[2]], 6, output_logits=True, eos_token_id=None)
    assert len(calls) == 10
    _assert_rounding_order_close(got.logits, want.logits)
    assert torch.equal(got.tokens, want.tokens)


def test_two_sequences_take_the_one_token_layers_with_dr_nt_norm(monkeypatch, dynamo_reset_after):
    """With ``kernels.DR_NT_NORM`` (the default) a fused, merged Llama decodes steps of 2 sequences through
    forward_one_token too (the norms and residual adds inside the projections; on the CPU the reference), 3 sequences
    and the switch off keep forward_deferred; both generate the same tokens, the logits within rounding."""
    from flash_llm import kernels
    from flash_llm.models import llama

    calls = []
    real = llama.LlamaDecoderLayer.forward_one_token
    monkeypatch.setattr(llama.LlamaDecoderLayer, "forward_one_token",
                        lambda self, x, *a: calls.append((self.self_attn.layer_idx, x.shape[0])) or real(self, x, *a))
    prompts = [PROMPTS[0], PROMPTS[2]]

    def run():
        return Engine(_model("llama", "delta-rows"), max_batch=2, max_seq=32, fuse=True, merge=True).generate(
            prompts, 6, output_logits=True, eos_token_id=None)

    monkeypatch.setattr(kernels, "DR_NT_NORM", False)
    want = run()
    assert calls == []  # (the switch off: 2 sequences take forward_deferred)
    monkeypatch.setattr(kernels, "DR_NT_NORM", True)
    got = run()
    assert calls == [(0, 2), (1, 2)] * 5  # 5 decode steps of both sequences after the prefill's token
    _assert_rounding_order_close(got.logits, want.logits)
    assert torch.equal(got.tokens, want.tokens)
    m = _model("llama", "delta-rows")
    merge_projections(m)
    h = m.config.hidden_size
    with torch.no_grad():
        layer = m.model.layers[0]
        assert layer.sparse_projections(torch.randn(2, 1, h).to(torch.float16)) is not None
        assert layer.sparse_projections(torch.randn(3, 1, h).to(torch.float16)) is None
        assert layer.sparse_projections(torch.randn(1, 2, h).to(torch.float16)) is None  # (a 2-token prefill)


def test_delta_rows_two_token_fusable_needs_the_parts_layout_and_the_switch(monkeypatch):
    """``kernels.epilogue_fusable`` for a DeltaRows weight at 2 tokens (shapes only, so on the CPU too): with
    ``DR_NT_NORM`` the bias, the residual add and SiLU x up of paired halves on either layout, an RMSNorm only on the
    parts layout with K % 8 == 0, never a LayerNorm or ReLU; without it nothing above one token."""
    from flash_llm import DeltaRows, kernels
    from flash_llm.reference import FORMAT_IDS

    fid, dev = FORMAT_IDS[DeltaRows], torch.device("cpu")
    w = _sparse(128, 256, 0.2, torch.float16, 3)
    parts, split = DeltaRows.from_dense(w, parts=4), DeltaRows.from_dense(w, splits=2)
    paired = DeltaRows.from_dense(w, parts=4, pair_halves=True)

    def fusable(dw, n=2, **kw):
        return kernels.epilogue_fusable(fid, dw.data, 128, 256, n, torch.float16, dev, offsets=dw.offsets, **kw)

    for on in (False, True):
        monkeypatch.setattr(kernels, "DR_NT_NORM", on)
        assert fusable(parts, n=1, norm=True) and fusable(split, n=1, add=True)  # (one token: always)
        assert fusable(parts, norm=True) == on and fusable(parts, add=True) == on and fusable(split, add=True) == on
        assert fusable(paired, norm=True, act="silu_mul") == on
        assert not fusable(split, norm=True) and not fusable(parts, act="silu_mul")  # (not paired)
        assert not fusable(parts, act="relu") and not fusable(parts, norm=True, layer_norm=True)
        assert not fusable(parts, n=3, add=True)
        assert kernels.dr_nt_norm_ok(2, 256, 4) == on and not kernels.dr_nt_norm_ok(2, 252, 4)
        assert not kernels.dr_nt_norm_ok(2, 256, 1) and not kernels.dr_nt_norm_ok(2, 256, 4, (None, 0.0, 1e-5))


def test_opt_sparse_projections_says_when_one_token_layers_apply(monkeypatch):
    """OPTDecoderLayer.sparse_projections: the four sparse layers (with their biases) for one contiguous token
    without autograd, q / k / v merged; None for two tokens, autograd, a LayerNorm in another dtype, a dense
    projection, or FLASH_LLM_FUSE_NORMS=0."""
    from flash_llm.models import llama

    m = _model("opt", "delta-rows")
    layer = m.model.decoder.layers[0]
    h = m.config.hidden_size
    x = torch.randn(1, 1, h).to(torch.float16)
    with torch.no_grad():
        assert layer.sparse_projections(x) is None  # q / k / v not merged yet
        merge_projections(m)
        got = layer.sparse_projections(x)
        assert got is not None and got[0] is layer.self_attn.qkv_proj.layer and got[3] is layer.fc2
        assert got[0].bias is not None  # (OPT's projections keep their biases)
        assert layer.sparse_projections(torch.randn(2, 1, h).to(torch.float16)) is None
        layer.final_layer_norm.bias.data = layer.final_layer_norm.bias.data.float()
        assert layer.sparse_projections(x) is None
        layer.final_layer_norm.bias.data = layer.final_layer_norm.bias.data.half()
        monkeypatch.setattr(llama, "FUSE_NORMS", False)
        assert layer.sparse_projections(x) is None
        monkeypatch.setattr(llama, "FUSE_NORMS", True)
        layer.fc1 = layer.fc1.to_linear()
        assert layer.sparse_projections(x) is None
    assert m.model.decoder.layers[1].sparse_projections(x) is None  # autograd on


def test_sparse_projections_says_when_one_token_layers_apply(monkeypatch):
    """LlamaDecoderLayer.sparse_projections: the four sparse layers for one contiguous token without autograd; None
    (forward_deferred) for three tokens (two without ``kernels.DR_NT_NORM``), autograd, a non-contiguous x, norms in
    another dtype, unmerged projections, a dense projection, or FLASH_LLM_FUSE_NORMS=0."""
    from flash_llm import kernels
    from flash_llm.models import llama

    m = _model("llama", "tiled-csl")
    layer = m.model.layers[0]
    h = m.config.hidden_size
    x = torch.randn(1, 1, h).to(torch.float16)
    with torch.no_grad():
        assert layer.sparse_projections(x) is None  # q / k / v not merged yet
        merge_projections(m)
        got = layer.sparse_projections(x)
        assert got is not None and all(isinstance(p, flash_llm.SparseLinear) for p in got)
        assert got[0] is layer.self_attn.qkv_proj.layer and got[3] is layer.mlp.down_proj
        assert layer.sparse_projections(torch.randn(3, 1, h).to(torch.float16)) is None
        monkeypatch.setattr(kernels, "DR_NT_NORM", False)
        assert layer.sparse_projections(torch.randn(2, 1, h).to(torch.float16)) is None
        monkeypatch.setattr(kernels, "DR_NT_NORM", True)  # (2 sequences; on CUDA _kernels_fuse decides per format)
        assert layer.sparse_projections(torch.randn(2, 1, h).to(torch.float16)) is not None
        assert layer.sparse_projections(torch.randn(1, 1, 2 * h).to(torch.float16)[..., ::2]) is None
        layer.post_attention_layernorm.weight.data = layer.post_attention_layernorm.weight.data.float()
        assert layer.sparse_projections(x) is None
        layer.post_attention_layernorm.weight.data = layer.post_attention_layernorm.weight.data.half()
        assert layer.sparse_projections(x) is not None
        monkeypatch.setattr(llama, "FUSE_NORMS", False)
        assert layer.sparse_projections(x) is None
        monkeypatch.setattr(llama, "FUSE_NORMS", True)
        layer.mlp.down_proj = layer.mlp.down_proj.to_linear()
        assert layer.sparse_projections(x) is None
    assert m.model.layers[1].sparse_projections(x) is None  # autograd on


def test_one_token_layers_need_the_kernels_to_fuse_on_cuda(monkeypatch):
    """On CUDA a layer takes forward_one_token only where kernels.epilogue_fusable says the reductions do the norms,
    SiLU x up and residual adds for all four projections (else the separate operations would be slower than
    forward_deferred); asked once per weights, device, dtype and token count.  On the CPU the reference runs either
    way."""
    from types import SimpleNamespace

    from flash_llm import kernels
    from flash_llm.models import llama

    m = _model("llama", "tiled-csl")
    merge_projections(m)
    layer = m.model.layers[0]
    with torch.no_grad():
        layers = layer.sparse_projections(torch.randn(1, 1, m.config.hidden_size).to(torch.float16))
    assert layers is not None
    asked = []
    answer = {"ok": True}
    monkeypatch.setattr(kernels, "supported", lambda dev: (True, ""))
    monkeypatch.setattr(kernels, "epilogue_fusable",
                        lambda fmt, data, m_, k_, n, dtype, dev, offsets=None, **kw:
                        asked.append((m_, k_, n, kw, offsets)) or answer["ok"])
    monkeypatch.setattr(llama, "_FUSES", {})
    x = SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0), dtype=torch.float16, shape=(1, 1, 64))
    assert llama._kernels_fuse(layers, x) is True
    assert [a[3] for a in asked] == [{"norm": True}, {"add": True}, {"norm": True, "act": "silu_mul"}, {"add": True}]
    assert all(a[2] == 1 for a in asked) and asked[0][:2] == tuple(layers[0].weight.shape)
    assert all(a[4] is p.weight.offsets for a, p in zip(asked, layers))  # (DeltaRows' pairing is read from it)
    assert llama._kernels_fuse(layers, x) is True and len(asked) == 4  # cached
    monkeypatch.setattr(llama, "_FUSES", {})
    answer["ok"] = False
    assert llama._kernels_fuse(layers, x) is False
    assert llama._kernels_fuse(layers, torch.zeros(1)) is True  # the CPU
    answer["ok"] = True
    two = SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0), dtype=torch.float16, shape=(2, 1, 64))
    assert llama._kernels_fuse(layers, two) is True and [a[2] for a in asked[-4:]] == [2] * 4  # (asked per count)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_merging_frees_each_groups_layers_before_the_next_group(family, monkeypatch):
    """The peak grows by one group: when a group is stacked, the layers of the groups merged before it are gone
    (a list of every module held them all to the end: Llama-3-8B's engine build 3.4 GiB above its weights)."""
    import gc
    import weakref

    from flash_llm.models import _merge

    m = _model(family, "bitmap")
    originals = [weakref.ref(mod) for _, mod in m.named_modules() if isinstance(mod, flash_llm.SparseLinear)]
    stack, alive = _merge._stack, []

    def stack_and_count(layers, pair_halves=False):
        gc.collect()
        alive.append(sum(r() is not None for r in originals))
        return stack(layers, pair_halves)

    monkeypatch.setattr(_merge, "_stack", stack_and_count)
    report = merge_projections(m)
    groups = sum(v == "merged" for v in report.values())
    assert groups >= 2 and len(alive) == groups
    # every group frees its layers before the next is stacked: the count of live originals falls group by group
    assert all(b < a for a, b in zip(alive, alive[1:])), alive
    back = unmerge_projections(m)
    assert len(back) == groups

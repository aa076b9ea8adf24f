"""Session 83's model fixes: the fused forwards run the hooks of the modules they would skip; unmerge_projections
refuses hooks of a merged layer; merging under torch.inference_mode() leaves normal tensors; merging refuses unfilled
SparseLinear shells."""
import warnings

import pytest
import torch
from torch import nn

from flash_llm import SparseLinear, SparsifyConfig, sparsify_
from flash_llm.models import (MergedLinear, ModelConfig, _fused, from_config, merge_projections, set_fused,
                              unmerge_projections)


@pytest.fixture(autouse=True)
def eager_fused_ops(monkeypatch):
    # the fused paths as they are (modules skipped, weights read), with the eager functions: no compile time
    monkeypatch.setattr(_fused, "op", lambda name, fused: _fused._EAGER[name])


def _model(family, dtype=torch.float32, sparse=False):
    cfg = ModelConfig(family=family, vocab_size=61, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=96,
                      activation="silu" if family == "llama" else "relu")  # (OPT's one-token path: ReLU)
    m = from_config(cfg, dtype=dtype, seed=int(torch.randint(1 << 30, ())))
    if sparse:
        with torch.no_grad():
            for n, mod in m.named_modules():
                if isinstance(mod, nn.Linear) and n != "lm_head":
                    mod.weight[torch.rand(mod.weight.shape) < 0.6] = 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sparsify_(m, SparsifyConfig(min_sparsity=0.0))
    return m.eval()


def _hook(m, kind, calls):
    """A hook of ``kind`` on ``m`` that changes its output (or input) and counts its calls."""
    scale = 1.5 + torch.rand(()).item()

    def out(o):
        return tuple(t * scale for t in o) if isinstance(o, tuple) else o * scale

    if kind == "forward":
        return m.register_forward_hook(lambda mod, i, o: calls.append(1) or out(o))
    if kind == "pre":
        return m.register_forward_pre_hook(lambda mod, i: calls.append(1) or (i[0] * scale, *i[1:]))
    forward = m.forward  # an instance forward (as accelerate's hooks install)
    m.forward = lambda *a, **k: calls.append(1) or out(forward(*a, **k))


def _fused_vs_eager(m, ids):
    """The logits of ``m`` (hooked) for ``ids``: unfused, then fused."""
    with torch.no_grad():
        set_fused(m, False)
        want = m(ids).float()
        set_fused(m, True)
        got = m(ids).float()
    return want, got


LLAMA_DENSE = ["model.layers.0.input_layernorm", "model.layers.1.post_attention_layernorm", "model.norm",
               "model.layers.0", "model.layers.1"]
OPT_DENSE = ["model.decoder.layers.1.self_attn_layer_norm", "model.decoder.layers.0.final_layer_norm",
             "model.decoder.final_layer_norm", "model.decoder.layers.0"]


# ---- 1. the fused forwards ran past hooks of the modules they skip -------------------------------------------------
@pytest.mark.parametrize("kind", ["forward", "pre", "instance"])
@pytest.mark.parametrize("family,path", [("llama", p) for p in LLAMA_DENSE] + [("opt", p) for p in OPT_DENSE])
def test_fused_forward_runs_the_hooks_of_norms_and_layers(family, path, kind):
    m = _model(family)
    calls = []
    _hook(m.get_submodule(path), kind, calls)
    ids = torch.randint(61, (2, 5))
    want, got = _fused_vs_eager(m, ids)
    assert len(calls) == 2  # once unfused, once fused
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


LLAMA_SPARSE = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.o_proj", "model.layers.0.mlp.gate_up_proj",
                "model.layers.1.mlp.gate_up_proj.layer", "model.layers.0.self_attn.qkv_proj",
                "model.layers.0.self_attn.qkv_proj.layer", "model.layers.1.mlp", "model.layers.0.self_attn",
                "model.layers.1.input_layernorm", "model.layers.1"]
OPT_SPARSE = ["model.decoder.layers.0.fc1", "model.decoder.layers.1.fc2", "model.decoder.layers.0.self_attn.out_proj",
              "model.decoder.layers.1.self_attn.qkv_proj", "model.decoder.layers.0.self_attn.qkv_proj.layer",
              "model.decoder.layers.1.self_attn", "model.decoder.layers.0.final_layer_norm"]


@pytest.mark.parametrize("family,path,tokens", [("llama", p, 1) for p in LLAMA_SPARSE] + [
    ("opt", p, 1) for p in OPT_SPARSE] + [  # one token: forward_one_token; three: SiLU x up inside gate / up's spmm
    ("llama", "model.layers.0.mlp.gate_up_proj", 3), ("llama", "model.layers.1.mlp.gate_up_proj.layer", 3)])
def test_fused_sparse_forward_runs_the_hooks_of_projections(family, path, tokens):
    m = _model(family, torch.float16, sparse=True)
    merge_projections(m)
    calls = []
    _hook(m.get_submodule(path), "forward", calls)
    ids = torch.randint(61, (1, tokens))
    want, got = _fused_vs_eager(m, ids)
    assert len(calls) == 2
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("family,path", [("llama", "model.layers.0"), ("llama", "model.embed_tokens"),
                                         ("opt", "model.decoder.layers.0")])
def test_fused_one_token_leaves_the_tensors_a_hook_kept(family, path):
    """forward_one_token updates the residual stream in place: not the output a hook of the layer before it kept."""
    m = _model(family, torch.float16, sparse=True)
    merge_projections(m)
    kept = []
    m.get_submodule(path).register_forward_hook(lambda mod, i, o: kept.append(o))
    want, got = _fused_vs_eager(m, torch.randint(61, (1, 1)))
    assert len(kept) == 2
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(kept[1], kept[0], rtol=2e-2, atol=2e-3)


def test_fused_forward_runs_global_module_hooks():
    m = _model("llama", torch.float16, sparse=True)
    merge_projections(m)
    calls = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda mod, i, o: calls.append(mod))
    try:
        with torch.no_grad():
            set_fused(m, False)
            m(torch.randint(61, (1, 1)))
            eager = [id(x) for x in calls]
            calls.clear()
            set_fused(m, True)
            m(torch.randint(61, (1, 1)))
    finally:
        handle.remove()
    assert sorted(id(x) for x in calls) == sorted(eager)


# ---- 2. unmerge_projections dropped hooks of a merged layer --------------------------------------------------------
@pytest.mark.parametrize("on_layer", [False, True])
@pytest.mark.parametrize("kind", ["forward", "pre", "instance"])
def test_unmerge_refuses_a_merged_layer_with_hooks_before_splitting_any(on_layer, kind):
    m = _model("llama")
    merge_projections(m)
    target = m.model.layers[1].mlp.gate_up_proj  # (the last group: the others come first)
    _hook(target.layer if on_layer else target, kind, [])
    name = "model.layers.1.mlp.gate_up_proj" + (".layer" if on_layer else "")
    keys = list(m.state_dict())
    with pytest.raises(ValueError, match=rf"{name.replace('.', '[.]')} has .* that unmerging would drop"):
        unmerge_projections(m)
    assert list(m.state_dict()) == keys  # nothing unmerged
    assert all(isinstance(la.self_attn.qkv_proj, MergedLinear) for la in m.model.layers)


# ---- 3. merging / unmerging under torch.inference_mode() left inference tensors ------------------------------------
@pytest.mark.parametrize("sparse", [False, True])
def test_merge_and_unmerge_under_inference_mode_leave_tensors_autograd_can_use(sparse):
    m = _model("llama", torch.float16 if sparse else torch.float32, sparse=sparse)
    with torch.inference_mode():
        merge_projections(m)
    assert not any(t.is_inference() for t in [*m.parameters(), *m.buffers()])
    attn = m.model.layers[0].self_attn
    x = torch.randn(2, 64, dtype=attn.qkv_proj.layer.weight_dtype if sparse else torch.float32, requires_grad=True)
    sum(o.float().sum() for o in attn.qkv_proj(x)).backward()  # (raised: inference tensors saved for backward)
    assert x.grad is not None and x.grad.abs().sum() > 0
    with torch.inference_mode():
        unmerge_projections(m)
    assert not any(t.is_inference() for t in [*m.parameters(), *m.buffers()])
    x.grad = None
    attn.q_proj(x).float().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    if not sparse:
        m.train()
        m(torch.randint(61, (1, 4))).sum().backward()
        assert attn.q_proj.weight.grad is not None


# ---- 4. merge_projections merged unfilled SparseLinear shells ------------------------------------------------------
def test_merge_refuses_unfilled_sparse_shells():
    cfg = ModelConfig(family="llama", vocab_size=61, hidden_size=64, num_layers=1, num_heads=2, intermediate_size=64)
    m = from_config(cfg, dtype=torch.float16, device="meta")
    for mod in [m.model.layers[0].self_attn, m.model.layers[0].mlp]:
        for n, c in list(mod.named_children()):
            setattr(mod, n, SparseLinear.zeros(c.in_features, c.out_features, bias=False, device="meta"))
    m.to_empty(device="cpu")
    report = merge_projections(m)
    assert set(report) == {"model.layers.0.self_attn.qkv_proj", "model.layers.0.mlp.gate_up_proj"}
    assert all("uninitialized" in why for why in report.values())
    attn = m.model.layers[0].self_attn
    assert attn.qkv_proj is None and isinstance(attn.q_proj, SparseLinear)
    with pytest.raises(RuntimeError, match="load_state_dict its weights first"):
        attn.q_proj(torch.zeros(1, 64, dtype=torch.float16))


# ---- 5. (review) unmerge_projections split an unfilled stacked SparseLinear into layers that computed -------------
def test_unmerge_refuses_an_unfilled_stacked_layer_before_splitting_any():
    m = _model("llama", torch.float16, sparse=True)
    merge_projections(m)
    filled = m.state_dict()  # (the layer's own tensors: moving it to meta gives it new ones)
    x = torch.randn(3, 64, dtype=torch.float16)
    want = m.model.layers[1].mlp.gate_up_proj(x)
    target = m.model.layers[1].mlp.gate_up_proj.layer  # (the last group: the others come first)
    target.to("meta").to_empty(device="cpu")  # a shell, as a skeleton gets its memory before loading
    assert target._unfilled
    keys = list(m.state_dict())
    with pytest.raises(ValueError, match=r"model[.]layers[.]1[.]mlp[.]gate_up_proj[.]layer's arrays are "
                                         r"uninitialized memory .* load its weights first \(nothing was unmerged\)"):
        unmerge_projections(m)
    assert list(m.state_dict()) == keys  # nothing unmerged
    assert all(isinstance(la.self_attn.qkv_proj, MergedLinear) for la in m.model.layers)
    m.load_state_dict(filled)  # filled: unmerged as before
    assert len(unmerge_projections(m)) == 4
    mlp = m.model.layers[1].mlp
    torch.testing.assert_close((mlp.gate_proj(x), mlp.up_proj(x)), want, rtol=2e-2, atol=2e-3)


# ---- 6. (review) Llama's fused one-token path overwrote the x a rotary_emb hook kept ------------------------------
@pytest.mark.parametrize("kind", ["forward", "pre"])
def test_fused_one_token_leaves_the_x_a_rotary_emb_hook_kept(kind):
    """rotary_emb is called with the residual stream x, which forward_one_token then updates in place."""
    m = _model("llama", torch.float16, sparse=True)
    merge_projections(m)
    kept = []
    if kind == "forward":
        m.model.rotary_emb.register_forward_hook(lambda mod, i, o: kept.append((i[0], i[0].clone())))
    else:
        m.model.rotary_emb.register_forward_pre_hook(lambda mod, i: kept.append((i[0], i[0].clone())) and None)
    want, got = _fused_vs_eager(m, torch.randint(61, (1, 1)))
    assert len(kept) == 2
    assert all(torch.equal(t, snapshot) for t, snapshot in kept)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-3)

"""Session 86: a projection whose class overrides ``forward``, or that holds members of its own, keeps its module.

1. A subclass of :class:`flash_llm.SparseLinear` (or ``nn.Linear``, a norm, a decoder layer...) whose ``forward`` adds
   to the output (a LoRA term, a scale) was treated as the plain class: the engine's module-swapping paths
   (``formats="dense"``, ``prefill_dense=True``, the dense layouts of ``delta_layout="auto"`` / ``"dual"``) put a plain
   ``nn.Linear`` in its place, and the fused forwards (``forward_one_token``, the SiLU x up inside the merged gate / up
   projection, the norms inside ``forward_deferred``) read its weights past its ``forward``: either way that
   ``forward`` never ran, the logits and tokens silently differed.  Such a module now counts as a hooked one
   (``flash_llm.models._common.overridden_forward``, used by ``hooked()`` and ``_merge._dropped``): the engine leaves
   it in place and names it (``Engine.hooked``: "a forward overridden by its class ..."), the fused forwards call it.
   flash-llm's own classes (``MergedLinear``, the tensor-parallel layers, the quantizer's shells) are their own base.
2. ``merge_projections`` stacked plain layers holding submodules or parameters / buffers of their own (a LoRA pair
   registered on the layer, a scale buffer), dropping them and their state-dict keys; it now leaves such a group alone
   with the reason (``flash_llm.nn._extra_members``, as ``sparsify_`` keeps such layers dense), ``unmerge_projections``
   refuses such a stacked layer, and the engine's module-swapping paths keep such a layer as they keep hooked ones.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import flash_llm
import flash_llm.engine as E
from flash_llm.engine import Engine
from flash_llm.models import MergedLinear, _fused, merge_projections, unmerge_projections
from flash_llm.models._common import hooked
from flash_llm.models._merge import _dropped
from test_engine_hooks85 import HOOKED, LONG, _engine, _hook_warnings, _model, _sparse_paths, gpu_layout  # noqa: F401
from test_models_fixes83 import LLAMA_DENSE, LLAMA_SPARSE, OPT_DENSE, OPT_SPARSE, _fused_vs_eager
from test_models_fixes83 import _model as _small

REASON = "a forward overridden by its class _Scaled"


class _Scaled(flash_llm.SparseLinear):
    """A SparseLinear whose forward changes the output (x 30, as an adapter might), counting its calls."""

    def __init__(self, weight, bias=None):
        super().__init__(weight, bias)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return super().forward(x) * 30.0


def _scaled(model, path: str = HOOKED) -> _Scaled:
    """``path``'s SparseLinear replaced by a :class:`_Scaled` of the same weight and bias."""
    old = model.get_submodule(path)
    new = _Scaled(old.weight, old.bias)
    E._set_module(model, path, new)
    return new


def _reference(sparsity: float, prompts, n: int):
    """The generation of an engine that changes no module over the model with the subclass: tokens and its calls."""
    model = _model(sparsity)
    layer = _scaled(model)
    got = Engine(model, max_batch=len(prompts), max_seq=48, formats="keep", delta_layout="keep",
                 progress=False).generate(prompts, n, eos_token_id=None)
    return got.tokens, layer.calls


@pytest.fixture
def eager_fused_ops(monkeypatch):
    """The fused paths as they are (modules skipped, weights read), with the eager functions: no compile time."""
    monkeypatch.setattr(_fused, "op", lambda name, fused: _fused._EAGER[name])


# ---- 1. the engine's module-swapping paths ------------------------------------------------------------------------
def test_formats_dense_leaves_a_subclass_layer_compressed_and_its_forward_runs():
    want, want_calls = _reference(0.7, LONG, 6)
    model = _model()
    layer = _scaled(model)
    eng, texts = _engine(model, formats="dense")
    assert model.get_submodule(HOOKED) is layer
    assert set(eng.expanded) == _sparse_paths() - {HOOKED}
    assert eng.hooked == {HOOKED: REASON}
    hooked_texts = _hook_warnings(texts)
    assert len(hooked_texts) == 1 and f"{HOOKED} ({REASON})" in hooked_texts[0], texts
    got = eng.generate(LONG, 6, eos_token_id=None)
    assert layer.calls == want_calls == 6 and torch.equal(got.tokens, want)


def test_prefill_dense_makes_no_copy_of_a_subclass_layer():
    want, want_calls = _reference(0.7, LONG, 4)
    model = _model()
    layer = _scaled(model)
    eng, texts = _engine(model, prefill_dense=True)
    assert {eng._dense.paths[m] for m in eng._dense.copies} == _sparse_paths() - {HOOKED}
    assert eng.hooked == {HOOKED: REASON} and len(_hook_warnings(texts)) == 1
    got = eng.generate(LONG, 4, eos_token_id=None)
    assert layer.calls == want_calls == 4 and torch.equal(got.tokens, want)
    eng.use_layout(len(LONG[0]), prefill=True)
    assert model.get_submodule(HOOKED) is layer


def test_auto_layout_leaves_a_subclass_layer_where_it_would_become_dense(gpu_layout):  # noqa: F811
    big = E.DELTA_TCSL_MIN_BATCH
    prompts = [LONG[0][:7 + i] for i in range(big)]
    want, want_calls = _reference(0.5, prompts, 4)
    model = _model(0.5)
    layer = _scaled(model)
    eng, texts = _engine(model, max_batch=big)
    assert eng.relayout == {p: E.DENSE for p in _sparse_paths(0.5) - {HOOKED}}
    assert model.get_submodule(HOOKED) is layer and layer.weight_format is flash_llm.DeltaRows
    assert eng.hooked == {HOOKED: REASON} and len(_hook_warnings(texts)) == 1
    got = eng.generate(prompts, 4, eos_token_id=None)
    assert layer.calls == want_calls == 4 and torch.equal(got.tokens, want)


def test_dual_layout_makes_no_dense_copy_of_a_subclass_layer(gpu_layout):  # noqa: F811
    big = E.DUAL_TCSL_MIN_BATCH
    prompts = [LONG[0][:7 + i] for i in range(big)]
    want = _reference(0.5, prompts, 4)
    model = _model(0.5)
    layer = _scaled(model)
    eng, texts = _engine(model, max_batch=big, delta_layout="dual")
    assert {eng._two.paths[m] for m in eng._two.large} == _sparse_paths(0.5) - {HOOKED}
    assert eng.hooked == {HOOKED: REASON} and len(_hook_warnings(texts)) == 1
    got = eng.generate(prompts, 4, eos_token_id=None)
    assert layer.calls == want[1] == 4 and torch.equal(got.tokens, want[0])


def test_in_place_relayout_keeps_a_subclass_layer_without_a_warning(gpu_layout):  # noqa: F811
    """At 70 % the batched layout is Tiled-CSL, re-encoded in place: the subclass is laid out too and stays."""
    model = _model(0.7)
    layer = _scaled(model)
    eng, texts = _engine(model, max_batch=E.DELTA_TCSL_MIN_BATCH)
    assert eng.relayout.get(HOOKED) == E.TILED_CSL and model.get_submodule(HOOKED) is layer
    assert layer.weight_format is flash_llm.TiledCSL and eng.hooked == {} and _hook_warnings(texts) == []


def test_auto_layout_keeps_a_dense_subclass_an_earlier_engine_made(gpu_layout):  # noqa: F811
    """An ``nn.Linear`` subclass in the place of a dense layer an earlier engine made from DeltaRows: a batch-1 engine
    would put a SparseLinear there; it stays (the others become DeltaRows again)."""
    model = _model(0.5)
    Engine(model, max_batch=E.DELTA_TCSL_MIN_BATCH, max_seq=48, progress=False)
    dense = model.get_submodule(HOOKED)

    class Doubled(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2.0

    dense.__class__ = Doubled
    assert E._dense_from_delta_rows(dense)
    eng, texts = _engine(model, max_batch=1)
    assert model.get_submodule(HOOKED) is dense and set(eng.relayout) == _sparse_paths(0.5) - {HOOKED}
    assert eng.hooked == {HOOKED: "a forward overridden by its class Doubled"} and len(_hook_warnings(texts)) == 1


def test_engine_keeps_a_layer_with_members_of_its_own():
    """A plain SparseLinear holding a submodule and a buffer of its own: expanded, both (and their state-dict keys)
    were gone; the layer now stays compressed, named."""
    model = _model()
    layer = model.get_submodule(HOOKED)
    layer.adapter = nn.Linear(4, 4, bias=False, dtype=torch.float16)
    layer.register_buffer("scale", torch.ones(3))
    keys = [k for k in model.state_dict() if k.startswith(HOOKED + ".")]
    eng, texts = _engine(model, formats="dense")
    assert model.get_submodule(HOOKED) is layer
    assert [k for k in model.state_dict() if k.startswith(HOOKED + ".")] == keys
    assert list(eng.hooked) == [HOOKED] and "submodule(s) 'adapter'" in eng.hooked[HOOKED]
    assert "'scale'" in eng.hooked[HOOKED] and len(_hook_warnings(texts)) == 1


def test_what_counts_as_an_overridden_forward():
    """Only a class outside flash-llm and torch overriding the forward of the first of theirs it derives from; the
    package's own subclasses (the quantizer's shell, MergedLinear, the tensor-parallel layers, the models' modules)
    and torch's are their own base."""
    from flash_llm.checkpoint.hf_quantizer import _Shell
    from flash_llm.models._common import overridden_forward
    from flash_llm.models.llama import LlamaRMSNorm
    from flash_llm.parallel.layers import ColumnParallelLinear

    plain = flash_llm.SparseLinear.from_dense(torch.eye(8, dtype=torch.float16))
    shell = _Shell.zeros(8, 8, bias=False)

    class Same(flash_llm.SparseLinear):  # (a subclass that keeps the forward)
        pass

    class Norm(LlamaRMSNorm):
        def forward(self, x):
            return super().forward(x) + 1

    same = copy.copy(plain)
    same.__class__ = Same
    for m in (plain, shell, same, nn.Linear(2, 2), nn.modules.linear.NonDynamicallyQuantizableLinear(2, 2),
              MergedLinear(plain, [8], ["a"]), LlamaRMSNorm(8, 1e-6), nn.LayerNorm(8)):
        assert overridden_forward(m) is None and not hooked(m) and _dropped(m) == [], type(m)
    column = ColumnParallelLinear(nn.Linear(8, 4), 8, 8, 0, 4, tp=None)  # (a forward of its own, its own base)
    assert overridden_forward(column) is None and not hooked(column) and overridden_forward(column.linear) is None
    norm = Norm(8, 1e-6)
    assert overridden_forward(norm) == "Norm" and hooked(norm)
    scaled = _Scaled(plain.weight)
    assert overridden_forward(scaled) == "_Scaled" and _dropped(scaled) == [REASON]


# ---- 1b. the fused forwards read a subclass's weights past its forward --------------------------------------------
def _subclass(module: nn.Module, calls: list) -> None:
    """Make ``module`` an instance of a subclass of its class whose forward scales the output, counting its calls."""
    base = type(module)

    def forward(self, *args, **kw):
        calls.append(1)
        out = base.forward(self, *args, **kw)
        return tuple(t * 1.75 for t in out) if isinstance(out, tuple) else out * 1.75

    module.__class__ = type(f"Scaled{base.__name__}", (base,), {"forward": forward})


@pytest.mark.parametrize("family,path", [("llama", p) for p in LLAMA_DENSE] + [("opt", p) for p in OPT_DENSE])
def test_fused_forward_runs_the_forward_of_subclassed_norms_and_layers(family, path, eager_fused_ops):
    m = _small(family)
    calls = []
    _subclass(m.get_submodule(path), calls)
    want, got = _fused_vs_eager(m, torch.randint(61, (2, 5)))
    assert len(calls) == 2  # once unfused, once fused
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family,path,tokens", [("llama", p, 1) for p in LLAMA_SPARSE] + [
    ("opt", p, 1) for p in OPT_SPARSE] + [  # one token: forward_one_token; three: SiLU x up inside gate / up's spmm
    ("llama", "model.layers.0.mlp.gate_up_proj", 3), ("llama", "model.layers.1.mlp.gate_up_proj.layer", 3)])
def test_fused_sparse_forward_runs_the_forward_of_subclassed_projections(family, path, tokens, eager_fused_ops):
    m = _small(family, torch.float16, sparse=True)
    merge_projections(m)
    calls = []
    _subclass(m.get_submodule(path), calls)
    want, got = _fused_vs_eager(m, torch.randint(61, (1, tokens)))
    assert len(calls) == 2
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-3)


def test_fused_engine_decodes_through_a_subclassed_projection(eager_fused_ops):
    """A fused, merged engine at batch 1 (forward_one_token on the CPU's reference): the subclass runs every step."""
    want, want_calls = _reference(0.7, LONG, 5)
    model = _model()
    layer = _scaled(model)
    got = Engine(model, max_seq=48, fuse=True, merge=True, formats="keep", delta_layout="keep",
                 progress=False).generate(LONG, 5, eos_token_id=None)
    assert layer.calls == want_calls == 5 and torch.equal(got.tokens, want)


# ---- 2. merge_projections dropped a layer's members of its own ----------------------------------------------------
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("member", ["module", "parameter", "buffer"])
def test_merge_leaves_a_group_alone_whose_layer_holds_members_of_its_own(sparse, member):
    m = _small("llama", torch.float16, sparse=sparse)
    attn = m.model.layers[1].self_attn
    cls = flash_llm.SparseLinear if sparse else nn.Linear
    assert all(type(getattr(attn, n)) is cls for n in ("q_proj", "k_proj", "v_proj"))
    k = attn.k_proj
    if member == "module":
        k.lora_A = nn.Linear(64, 4, bias=False, dtype=torch.float16)
        name = "submodule(s) 'lora_A'"
    elif member == "parameter":
        k.lora_scale = nn.Parameter(torch.ones(1))
        name = "parameter(s) / buffer(s) 'lora_scale'"
    else:
        k.register_buffer("scale", torch.ones(1))
        name = "parameter(s) / buffer(s) 'scale'"
    keys = [key for key in m.state_dict() if ".layers.1.self_attn." in key]
    report = merge_projections(m)
    why = report["model.layers.1.self_attn.qkv_proj"]
    assert why.startswith(f"k_proj has {name}"), why
    assert attn.qkv_proj is None and attn.k_proj is k
    assert [key for key in m.state_dict() if ".layers.1.self_attn." in key] == keys
    others = ["model.layers.0.self_attn.qkv_proj", "model.layers.0.mlp.gate_up_proj", "model.layers.1.mlp.gate_up_proj"]
    assert all(report[g] == "merged" for g in others)


def test_unmerge_refuses_a_stacked_layer_with_members_of_its_own_before_splitting_any():
    m = _small("llama", torch.float16, sparse=True)
    merge_projections(m)
    target = m.model.layers[1].mlp.gate_up_proj.layer  # (the last group: the others come first)
    target.lora_B = nn.Linear(4, 192, bias=False)
    keys = list(m.state_dict())
    with pytest.raises(ValueError, match=r"^model[.]layers[.]1[.]mlp[.]gate_up_proj[.]layer has submodule\(s\) "
                                         r"'lora_B'.* \(nothing was unmerged\)$"):
        unmerge_projections(m)
    assert list(m.state_dict()) == keys
    assert all(isinstance(la.self_attn.qkv_proj, MergedLinear) for la in m.model.layers)


def test_unmerge_refuses_a_stacked_layer_whose_class_overrides_forward():
    m = _small("llama", torch.float16, sparse=True)
    merge_projections(m)
    _subclass(m.model.layers[0].self_attn.qkv_proj.layer, [])
    with pytest.raises(ValueError, match=r"qkv_proj[.]layer has a forward overridden by its class "
                                         r"ScaledSparseLinear that unmerging would drop"):
        unmerge_projections(m)


def test_engine_merge_reports_the_group_left_alone():
    model = _model()
    q = model.get_submodule("model.layers.0.self_attn.q_proj")
    q.lora_A = nn.Linear(64, 4, bias=False, dtype=torch.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        eng = Engine(model, max_seq=48, merge=True, progress=False)
    assert "q_proj has submodule(s) 'lora_A'" in eng.merged["model.layers.0.self_attn.qkv_proj"]
    assert eng.merged["model.layers.1.self_attn.qkv_proj"] == "merged"
    assert model.get_submodule("model.layers.0.self_attn.q_proj") is q

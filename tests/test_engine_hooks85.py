"""Session 85: the engine's module-swapping paths leave a layer with hooks as it is.

``Engine(formats="dense")`` (``expand_sparse_``, what ``flash-llm generate`` asks for on a CPU), ``prefill_dense=True``
(``_DenseCopies``), and on a GPU ``delta_layout="auto"``'s dense layout (``relayout_delta_rows``: a ``SparseLinear``
made a dense ``nn.Linear``, or such an ``nn.Linear`` made sparse again) and ``delta_layout="dual"``'s dense copies
(``_TwoLayouts``) put a new module at a sparse layer's path.  Forward hooks, pre-hooks and a ``forward`` replaced on
the instance stayed on the old module, which no longer ran: the output changed with the engine's options, silently
(formats="dense" and the relayout for good, prefill_dense in every prefill of 17 tokens or more, dual while its copies
were in).  As ``merge_projections`` and ``sparsify_`` leave such layers alone, these paths now do
(``flash_llm.models._merge._dropped``), the engine warns once naming them (``Engine.hooked``), and re-encodings in place
(``_replace_weight``: Tiled-CSL, the DeltaRows layouts) go on as before.  The GPU paths run on the CPU here as
``tests/test_engine.py`` runs them (``RELAYOUT_DEVICES``, ``_free_memory``)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import flash_llm
import flash_llm.engine as E
from flash_llm.engine import Engine
from flash_llm.models import ModelConfig, from_config

CFG = ModelConfig(family="llama", vocab_size=64, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  intermediate_size=128, max_position_embeddings=64)
HOOKED = "model.layers.0.self_attn.o_proj"
LONG = [list(range(1, 21))]  # (20 tokens: a prefill of PREFILL_DENSE_MIN_TOKENS or more)
_CACHE: dict[tuple[float, int], torch.nn.Module] = {}


def _model(sparsity: float = 0.7, seed: int = 85) -> torch.nn.Module:
    """A small fp16 Llama whose projections are DeltaRows ``SparseLinear`` layers at ``sparsity``, weights of ``seed``
    (a fresh copy)."""
    key = (sparsity, seed)
    if key not in _CACHE:
        model = from_config(CFG, dtype=torch.float16, seed=seed)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, m in model.named_modules():
                if isinstance(m, torch.nn.Linear) and n != "lm_head":
                    m.weight.mul_(torch.rand(m.weight.shape, generator=gen) >= sparsity)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            flash_llm.sparsify_(model, flash_llm.SparsifyConfig(format="delta-rows"))
        _CACHE[key] = model
    return copy.deepcopy(_CACHE[key])


def _sparse_paths(sparsity: float = 0.7) -> set[str]:
    """The paths of :func:`_model`'s sparse layers (sparsify_ keeps a layer too dense for its format dense)."""
    return {p for p, m in _model(sparsity).named_modules() if isinstance(m, flash_llm.SparseLinear)}


def _hook(model, calls: list, path: str = HOOKED, pre: bool = False):
    """A hook on ``path`` that changes the output (x 30, as an adapter or steering hook might), counting its calls."""
    layer = model.get_submodule(path)
    if pre:
        return layer.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape) or (args[0] * 30.0,))
    return layer.register_forward_hook(lambda m, args, out: calls.append(out.shape) or out * 30.0)


def _reference(sparsity: float, prompts, n: int, pre: bool = False):
    """The generation of an engine that changes no module, with the same hook: its tokens and hook calls."""
    model, calls = _model(sparsity), []
    _hook(model, calls, pre=pre)
    got = Engine(model, max_batch=len(prompts), max_seq=48, formats="keep", delta_layout="keep",
                 progress=False).generate(prompts, n, eos_token_id=None)
    return got.tokens, len(calls)


def _engine(model, **kw):
    """``Engine(model, **kw)`` and the texts of the UserWarnings it gave."""
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        eng = Engine(model, max_seq=48, progress=False, **kw)
    return eng, [str(x.message) for x in w if issubclass(x.category, UserWarning)]


def _hook_warnings(texts: list[str]) -> list[str]:
    return [t for t in texts if "would drop" in t]


@pytest.fixture
def gpu_layout(monkeypatch):
    """delta_layout's GPU paths on the CPU, with memory to spare (as tests/test_engine.py runs them)."""
    monkeypatch.setattr(E, "RELAYOUT_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(E, "_free_memory", lambda device: 1 << 40)


@pytest.mark.parametrize("pre", [False, True])
def test_formats_dense_leaves_a_hooked_layer_compressed_and_its_hook_runs(pre):
    want, want_calls = _reference(0.7, LONG, 6, pre)
    model, calls = _model(), []
    _hook(model, calls, pre=pre)
    layer = model.get_submodule(HOOKED)
    eng, texts = _engine(model, formats="dense")
    assert model.get_submodule(HOOKED) is layer and isinstance(layer, flash_llm.SparseLinear)
    assert set(eng.expanded) == _sparse_paths() - {HOOKED}  # (the other projections: dense)
    assert all(type(model.get_submodule(p)) is torch.nn.Linear for p in eng.expanded)
    assert eng.hooked == {HOOKED: "1 forward hook(s)"}
    hooked = _hook_warnings(texts)
    assert len(hooked) == 1 and HOOKED in hooked[0] and "formats='dense'" in hooked[0], texts
    got = eng.generate(LONG, 6, eos_token_id=None)
    assert len(calls) == want_calls == 6 and torch.equal(got.tokens, want)  # (prefill + 5 decode steps)


def test_expand_sparse_leaves_a_layer_with_a_forward_replaced_on_the_instance():
    model = _model()
    layer = model.get_submodule(HOOKED)
    layer.forward = lambda x: flash_llm.SparseLinear.forward(layer, x) * 30.0  # (as accelerate's hooks do)
    hooked = {}
    done, left = E.expand_sparse_(model, hooked=hooked)
    assert model.get_submodule(HOOKED) is layer and HOOKED not in done and left == []
    assert list(hooked) == [HOOKED] and "forward replaced on the instance" in hooked[HOOKED]
    assert E.expand_sparse_(model) == ([], [])  # (again: nothing left to expand, the layer still kept)
    assert model.get_submodule(HOOKED) is layer


def test_prefill_dense_makes_no_copy_of_a_hooked_layer():
    want, want_calls = _reference(0.7, LONG, 4)
    model, calls = _model(), []
    _hook(model, calls)
    layer = model.get_submodule(HOOKED)
    eng, texts = _engine(model, prefill_dense=True)
    assert {eng._dense.paths[m] for m in eng._dense.copies} == _sparse_paths() - {HOOKED}
    assert eng.hooked == {HOOKED: "1 forward hook(s)"}
    hooked = _hook_warnings(texts)
    assert len(hooked) == 1 and HOOKED in hooked[0] and "prefill_dense=True" in hooked[0], texts
    got = eng.generate(LONG, 4, eos_token_id=None)
    assert len(calls) == want_calls == 4 and torch.equal(got.tokens, want)
    eng.use_layout(len(LONG[0]), prefill=True)  # (the prefill's set: the copies in, the hooked layer itself)
    assert model.get_submodule(HOOKED) is layer
    assert type(model.get_submodule("model.layers.0.self_attn.q_proj")) is torch.nn.Linear


def test_formats_dense_and_prefill_dense_warn_once():
    model = _model()
    _hook(model, [])
    eng, texts = _engine(model, formats="dense", prefill_dense=True)
    hooked = _hook_warnings(texts)
    assert len(hooked) == 1 and "formats='dense'" in hooked[0] and "prefill_dense=True" in hooked[0], texts
    assert list(eng.hooked) == [HOOKED]


def test_no_hooks_no_warning_and_every_layer_swapped():
    model = _model()
    eng, texts = _engine(model, formats="dense", prefill_dense=True)
    assert eng.hooked == {} and _hook_warnings(texts) == []
    assert set(eng.expanded) == _sparse_paths()


def test_auto_layout_leaves_a_hooked_layer_where_it_would_become_dense(gpu_layout):
    """At 50 % the batched layout is dense nn.Linear layers (relayout_delta_rows' DENSE): not for the hooked one."""
    big = E.DELTA_TCSL_MIN_BATCH
    prompts = [LONG[0][:7 + i] for i in range(big)]
    want, want_calls = _reference(0.5, prompts, 4)
    model, calls = _model(0.5), []
    _hook(model, calls)
    layer = model.get_submodule(HOOKED)
    eng, texts = _engine(model, max_batch=big)
    assert eng.relayout == {p: E.DENSE for p in _sparse_paths(0.5) - {HOOKED}}
    assert model.get_submodule(HOOKED) is layer and layer.weight_format is flash_llm.DeltaRows
    assert eng.hooked == {HOOKED: "1 forward hook(s)"}
    hooked = _hook_warnings(texts)
    assert len(hooked) == 1 and HOOKED in hooked[0] and "delta_layout='auto'" in hooked[0], texts
    got = eng.generate(prompts, 4, eos_token_id=None)
    assert len(calls) == want_calls == 4 and torch.equal(got.tokens, want)


def test_auto_layout_leaves_a_hooked_dense_layer_an_earlier_engine_made(gpu_layout):
    """A dense nn.Linear an earlier engine made from DeltaRows, hooked since: a batch-1 engine would put a new
    SparseLinear in its place; it stays (the others become DeltaRows again)."""
    model = _model(0.5)
    Engine(model, max_batch=E.DELTA_TCSL_MIN_BATCH, max_seq=48, progress=False)
    dense = model.get_submodule(HOOKED)
    assert E._dense_from_delta_rows(dense)
    calls = []
    _hook(model, calls)
    eng, texts = _engine(model, max_batch=1)
    assert model.get_submodule(HOOKED) is dense and set(eng.relayout) == _sparse_paths(0.5) - {HOOKED}
    assert all(isinstance(model.get_submodule(p), flash_llm.SparseLinear) for p in eng.relayout)
    assert list(eng.hooked) == [HOOKED] and len(_hook_warnings(texts)) == 1
    eng.generate(LONG, 3, eos_token_id=None)
    assert len(calls) == 3


def test_in_place_relayout_keeps_the_hooked_layer_without_a_warning(gpu_layout):
    """At 70 % the batched layout is Tiled-CSL, re-encoded in place (_replace_weight): the hooked layer is laid out
    too, keeps its module and hook, and nothing is warned."""
    big = E.DELTA_TCSL_MIN_BATCH
    model, calls = _model(0.7), []
    _hook(model, calls)
    layer = model.get_submodule(HOOKED)
    eng, texts = _engine(model, max_batch=big)
    assert eng.relayout.get(HOOKED) == E.TILED_CSL and model.get_submodule(HOOKED) is layer
    assert layer.weight_format is flash_llm.TiledCSL and eng.hooked == {} and _hook_warnings(texts) == []
    eng.generate(LONG, 3, eos_token_id=None)
    assert len(calls) == 3


def test_dual_layout_makes_no_dense_copy_of_a_hooked_layer(gpu_layout):
    big = E.DUAL_TCSL_MIN_BATCH
    prompts = [LONG[0][:7 + i] for i in range(big)]
    want = {b: _reference(0.5, prompts[:b], 4) for b in (1, big)}
    model, calls = _model(0.5), []
    _hook(model, calls)
    layer = model.get_submodule(HOOKED)
    eng, texts = _engine(model, max_batch=big, delta_layout="dual")
    assert eng._two is not None and {eng._two.paths[m] for m in eng._two.large} == _sparse_paths(0.5) - {HOOKED}
    assert all(isinstance(w, torch.nn.Linear) for w in eng._two.large.values())
    assert eng.hooked == {HOOKED: "1 forward hook(s)"}
    hooked = _hook_warnings(texts)
    assert len(hooked) == 1 and "delta_layout='dual'" in hooked[0], texts
    for b in (big, 1, big):
        calls.clear()
        got = eng.generate(prompts[:b], 4, eos_token_id=None)
        assert len(calls) == want[b][1] == 4 and torch.equal(got.tokens, want[b][0]), b
        assert model.get_submodule(HOOKED) is layer and layer.weight_format is flash_llm.DeltaRows
    eng.use_layout(big)
    assert type(model.get_submodule("model.layers.0.self_attn.q_proj")) is torch.nn.Linear
    assert model.get_submodule(HOOKED) is layer

"""Session 87: ``Engine(delta_layout="dual")`` after a new bias.

A layer with a bias whose Tiled-CSL copy stood in it (a step of ``DUAL_TCSL_MIN_BATCH`` tokens or more ran last) and
whose bias was then replaced (``model.load_state_dict(biases, strict=False, assign=True)``, or ``layer.bias = ...``)
was read as a layer loaded in another format: the engine dropped its copies with a warning and the layer kept the
Tiled-CSL arrays for good, at every batch size, also after ``use_layout(1)`` (a model saved then was no longer
DeltaRows).  Both sets use the layer's own bias, so a new bias changes neither: the copies stay (the graphs are
captured again over the new bias), and the next steps use it.  The delta_layout paths run on the CPU as on a GPU
(``gpu_layout``, as ``tests/test_engine_hooks85.py`` runs them)."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

import flash_llm
import flash_llm.engine as E
from flash_llm.engine import Engine
from flash_llm.models import from_config
from test_engine_hooks85 import CFG, LONG, gpu_layout  # noqa: F401

BIASED = dataclasses.replace(CFG, attention_bias=True, mlp_bias=True)


def _biased_model(seed: int = 87) -> torch.nn.Module:
    """A small fp16 Llama with biases whose projections are DeltaRows ``SparseLinear`` layers at 70 % sparsity."""
    model = from_config(BIASED, dtype=torch.float16, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and n != "lm_head":
                m.weight.mul_(torch.rand(m.weight.shape, generator=gen) >= 0.7)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        flash_llm.sparsify_(model, flash_llm.SparsifyConfig(format="delta-rows"))
    return model.eval()


def _engine(model, **kw) -> Engine:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return Engine(model, max_seq=48, progress=False, **kw)


@pytest.mark.parametrize("how", ["assign", "attribute"])
def test_dual_layout_keeps_its_copies_after_a_new_bias(gpu_layout, how):
    big = E.DUAL_TCSL_MIN_BATCH
    prompts = [LONG[0][: 5 + i] for i in range(big)]
    served = _biased_model()
    eng = _engine(served, max_batch=big, delta_layout="dual")
    tcsl = [m for m, w in eng._two.large.items() if not isinstance(w, torch.nn.Linear)]
    assert tcsl, "the test needs layers with Tiled-CSL copies"
    eng.generate(prompts, 3, eos_token_id=None)  # (the Tiled-CSL set stands in the layers now)
    assert all(m.weight_format is flash_llm.TiledCSL for m in tcsl)
    gen = torch.Generator().manual_seed(1)
    biases = {f"{p}.bias": torch.randn(m.bias.shape, generator=gen).to(m.bias.dtype)
              for p, m in served.named_modules() if m in tcsl}
    if how == "assign":
        served.load_state_dict(biases, strict=False, assign=True)
    else:
        for key, b in biases.items():
            served.get_submodule(key.rsplit(".", 1)[0]).bias = torch.nn.Parameter(b, requires_grad=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (nothing dropped: no warning)
        for b in (1, big, 1):
            got = eng.generate(prompts[:b], 4, eos_token_id=None, output_logits=True)
            ref = _engine(_copy_of(served, eng), max_batch=big, delta_layout="dual")
            want = ref.generate(prompts[:b], 4, eos_token_id=None, output_logits=True)
            assert torch.equal(got.tokens, want.tokens) and torch.equal(got.logits, want.logits), b
    assert set(tcsl) <= set(eng._two.large)  # (the copies kept)
    eng.use_layout(1)
    assert all(m.weight_format is flash_llm.DeltaRows for m in tcsl)  # (the layers' own weights back)
    assert all(torch.equal(served.state_dict()[k], b) for k, b in biases.items())  # (the new biases kept)


def _copy_of(model, eng) -> torch.nn.Module:
    """A deep copy of ``model`` as a new engine would find it: its DeltaRows set in (``use_layout(1)``)."""
    import copy

    eng.use_layout(1)
    return copy.deepcopy(model)


def test_dual_layout_a_bias_replaced_on_a_dense_copy_is_kept(gpu_layout):
    """A dense copy standing at a layer's path (sparsity 50 %: ``nn.Linear`` copies) whose bias is replaced by the
    user: the copy is the model's module there, so the new bias is kept (the layer leaves the dual layout, with the
    warning, as after an in-place write into the copy); until session 87 the next small step swapped the layer back in
    with its old bias (the new one lost, silently)."""
    big = E.DUAL_TCSL_MIN_BATCH
    prompts = [LONG[0][: 5 + i] for i in range(big)]
    served = _biased_model(seed=5)
    for m in served.modules():  # (denser: dense copies)
        if isinstance(m, flash_llm.SparseLinear):
            w = m.to_dense()
            w[w == 0] = 0.01
            w.view(-1)[::2] = 0
            m._replace_weight(flash_llm.DeltaRows.from_dense(w))
    eng = _engine(served, max_batch=big, delta_layout="dual")
    dense = {p: m for m, p in eng._two.paths.items() if isinstance(eng._two.large[m], torch.nn.Linear)}
    assert dense, "the test needs layers with dense copies"
    eng.generate(prompts, 3, eos_token_id=None)  # (the dense copies stand at the paths now)
    path = sorted(dense)[0]
    new = torch.randn(served.get_submodule(path).bias.shape).half()
    served.get_submodule(path).bias = torch.nn.Parameter(new, requires_grad=False)
    with pytest.warns(RuntimeWarning, match="delta_layout='dual': the copies of 1 layer"):
        eng.generate(prompts[:1], 3, eos_token_id=None)
    assert torch.equal(served.get_submodule(path).bias, new)
    eng.use_layout(1)
    assert torch.equal(served.get_submodule(path).bias, new)


def _dense_copies_model() -> torch.nn.Module:
    """:func:`_biased_model` at about 50 % sparsity: ``delta_layout="dual"`` makes ``nn.Linear`` copies."""
    served = _biased_model(seed=5)
    for m in served.modules():
        if isinstance(m, flash_llm.SparseLinear):
            w = m.to_dense()
            w[w == 0] = 0.01
            w.view(-1)[::2] = 0
            m._replace_weight(flash_llm.DeltaRows.from_dense(w))
    return served


@pytest.mark.parametrize("where", ["layer", "copy"])
def test_dual_layout_a_hook_registered_after_the_engine_runs_at_every_batch(gpu_layout, where):
    """A forward hook registered after the engine was built, on a layer with a dense copy (``"layer"``: while the layer
    stands at its path) or on the copy (``"copy"``: after a large step, the copy is the model's module there): until
    session 87 it ran only while its module stood at the path (small steps, or large ones), so the output depended on
    the batch size.  The layer now leaves the dual layout (with the warning) and its hook runs at every step."""
    big = E.DUAL_TCSL_MIN_BATCH
    prompts = [LONG[0][: 5 + i] for i in range(big)]
    served = _dense_copies_model()
    eng = _engine(served, max_batch=big, delta_layout="dual")
    dense = sorted(p for m, p in eng._two.paths.items() if isinstance(eng._two.large[m], torch.nn.Linear))
    assert dense, "the test needs layers with dense copies"
    eng.generate(prompts if where == "copy" else prompts[:1], 3, eos_token_id=None)
    calls = []
    module = served.get_submodule(dense[0])
    assert isinstance(module, torch.nn.Linear if where == "copy" else flash_llm.SparseLinear)
    module.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]) or out * 3.0)
    with pytest.warns(RuntimeWarning, match=rf"delta_layout='dual': the copies of 1 layer\(s\) \({dense[0]}\)"):
        eng.generate(prompts[:1], 3, eos_token_id=None)  # (that layer's alone)
    for b in (big, 1):
        calls.clear()
        eng.generate(prompts[:b], 3, eos_token_id=None)
        assert calls and calls[0] == b and served.get_submodule(dense[0]) is module, b


def test_prefill_dense_a_hook_registered_after_the_engine_runs_in_the_prefill():
    """``prefill_dense=True``: a hook registered on a layer after the engine was built did not run in prefills of 17
    tokens or more (the dense copy stood in the layer's place); the layer's copy is dropped now (with the warning)."""
    served = _biased_model()
    eng = _engine(served, max_batch=1, prefill_dense=True)
    path = sorted(eng._dense.paths.values())[0]
    calls = []
    served.get_submodule(path).register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[1]) or out)
    with pytest.warns(RuntimeWarning, match="prefill_dense=True: the copies of 1 layer"):
        eng.generate(LONG, 2, eos_token_id=None)
    assert calls and calls[0] == len(LONG[0])  # (the prefill's forward ran through the hooked layer)


@pytest.mark.parametrize("how", ["load", "copy_"])
@pytest.mark.parametrize("option", ["dual", "prefill_dense"])
def test_a_bias_written_in_place_reaches_the_dense_copies(gpu_layout, option, how):
    """A bias written in place (``load_state_dict`` of biases without ``assign``, ``bias.copy_``): the dense copies
    (``"dual"``'s ``nn.Linear`` copies at 50 %, ``prefill_dense``'s) hold a clone of the bias, and until session 87
    only a replaced bias was seen, so the larger steps / long prefills ran the old one.  Now the copies are made
    again: the tokens and logits are a new engine's."""
    big = E.DUAL_TCSL_MIN_BATCH if option == "dual" else 1
    prompts = [LONG[0][: 18 + i] for i in range(big)]  # (17 tokens or more: prefill_dense's copies run)
    served = _dense_copies_model()
    kw = dict(delta_layout="dual") if option == "dual" else dict(prefill_dense=True)
    eng = _engine(served, max_batch=big, **kw)
    eng.generate(prompts, 2, eos_token_id=None)
    if option == "dual":
        eng.use_layout(1)  # (the layers themselves at their paths: the load goes into their biases)
    gen = torch.Generator().manual_seed(3)
    biases = {f"{p}.bias": torch.randn(m.bias.shape, generator=gen).half()
              for p, m in served.named_modules() if isinstance(m, flash_llm.SparseLinear)}
    assert len(biases) == 14
    if how == "load":
        served.load_state_dict(biases, strict=False)
    else:
        with torch.no_grad():
            for key, b in biases.items():
                served.get_submodule(key.rsplit(".", 1)[0]).bias.copy_(b)  # (in place: the same tensor)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = eng.generate(prompts, 3, eos_token_id=None, output_logits=True)
    eng.use_layout(1) if option == "dual" else None
    want = _engine(_copy_of(served, eng) if option == "dual" else __import__("copy").deepcopy(served),
                   max_batch=big, **kw).generate(prompts, 3, eos_token_id=None, output_logits=True)
    assert torch.equal(got.tokens, want.tokens) and torch.equal(got.logits, want.logits)

"""Session 86: an engine's own copies of the weights follow the model when it changes; one engine, two threads.

1. ``Engine(delta_layout="dual")`` keeps the layers' DeltaRows weights and Tiled-CSL (or dense) copies and swaps them
   into the layers at each step.  After ``model.load_state_dict(new)`` the next step put the OLD DeltaRows arrays back
   into the user's model, and the larger steps ran the old copies: silently wrong tokens, the model reverted.
2. ``Engine(prefill_dense=True)`` prefilled prompts of 17 tokens or more on dense copies of the old weights after such
   a load, and decoded on the new ones.
   Both now check, where the graphs are checked, that each layer still holds what its copy was made from
   (``Engine._follow_weights``): the copy is made again from the layer as it is (what a new engine makes), or dropped
   with one warning where the layer is gone or no longer fits the option; ``install`` never writes into such a layer.
3. ``_swap_module`` raised a bare ``AttributeError`` once another engine (``merge=True``) or ``merge_projections``
   had merged the model's projections, at every later ``generate``; the path gone, nothing is touched now, and the
   copies of the merged layers are dropped (a warning).
4. One engine used from two threads: the older generation raised "overtaken" as documented, but its step in flight
   went on writing the positions, slot and cache under the newer generation, which decoded wrong tokens silently.
   Each step now runs under the engine's lock (``Engine._run``), checked for "overtaken" after the lock is taken.
The delta_layout paths run on the CPU as on a GPU (``gpu_layout``, as ``tests/test_engine_hooks85.py`` runs them)."""

from __future__ import annotations

import copy
import threading
import warnings

import pytest
import torch

import flash_llm
import flash_llm.engine as E
from flash_llm.engine import Engine
from flash_llm.models import merge_projections
from test_engine_hooks85 import LONG, _model, gpu_layout  # noqa: F401

def _sparse(seed: int, sparsity: float = 0.7) -> torch.nn.Module:
    """A small fp16 Llama (``CFG``) whose projections are DeltaRows ``SparseLinear`` layers, weights of ``seed``."""
    return _model(sparsity, seed).eval()


def _new_weights(model) -> dict[str, torch.Tensor]:
    """A state dict for ``model`` with other weights in every sparse layer (its rows in reverse order: the same format
    and nonzeros), as a newer checkpoint of the same model would bring."""
    other = copy.deepcopy(model)
    for m in other.modules():
        if isinstance(m, flash_llm.SparseLinear):
            m._replace_weight(flash_llm.DeltaRows.from_dense(m.to_dense().flip(0)))
    return other.state_dict()


def _engine(model, **kw) -> Engine:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return Engine(model, max_seq=48, progress=False, **kw)


def _dense_weights(model) -> dict[str, torch.Tensor]:
    return {p: m.to_dense().clone() for p, m in model.named_modules() if isinstance(m, flash_llm.SparseLinear)}


def _same(got, want) -> bool:
    return torch.equal(got.tokens, want.tokens) and torch.equal(got.logits, want.logits)


@pytest.mark.parametrize("sparsity", [0.7, 0.5])  # (Tiled-CSL copies; dense nn.Linear copies)
@pytest.mark.parametrize("assign", [False, True])
def test_dual_layout_follows_a_loaded_state_dict(gpu_layout, sparsity, assign):
    big = E.DUAL_TCSL_MIN_BATCH
    prompts = [LONG[0][: 5 + i] for i in range(big)]
    served = _sparse(0, sparsity)
    eng = _engine(served, max_batch=big, delta_layout="dual")
    assert eng._two is not None and eng._two.large
    for b in (big, 1):
        eng.generate(prompts[:b], 3, eos_token_id=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        served.load_state_dict(_new_weights(served), assign=assign)  # hot-swap the weights
    loaded = _dense_weights(served)
    eng.use_layout(big)  # (a layer that changed under the engine: nothing old is written into it or put at its path)
    at_big = {p: (m.to_dense() if isinstance(m, flash_llm.SparseLinear) else m.weight)
              for p, m in served.named_modules() if p in loaded}
    assert at_big.keys() == loaded.keys() and all(torch.equal(w, loaded[p]) for p, w in at_big.items())
    eng.use_layout(1)
    assert all(torch.equal(m.to_dense(), loaded[p]) for p, m in served.named_modules() if p in loaded)
    ref = _engine(copy.deepcopy(served), max_batch=big, delta_layout="dual")  # what a new engine gives
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (every layer still DeltaRows: the copies are made again, no warning)
        for b in (1, big, 1):
            got = eng.generate(prompts[:b], 4, eos_token_id=None, output_logits=True)
            assert _same(got, ref.generate(prompts[:b], 4, eos_token_id=None, output_logits=True)), b
    eng.use_layout(1)
    assert _dense_weights(served).keys() == loaded.keys()
    assert all(torch.equal(w, loaded[p]) for p, w in _dense_weights(served).items())  # the model kept the load
    assert eng._two is not None and len(eng._two.large) == len(ref._two.large) and eng.copies_bytes == ref.copies_bytes


@pytest.mark.parametrize("assign", [False, True])
def test_prefill_dense_follows_a_loaded_state_dict(assign):
    served = _sparse(0)
    eng = _engine(served, max_batch=1, prefill_dense=True)
    n = len(eng._dense.copies)
    eng.generate(LONG, 3, eos_token_id=None)
    served.load_state_dict(_new_weights(served), assign=assign)
    ref = _engine(copy.deepcopy(served), max_batch=1, prefill_dense=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            got = eng.generate(LONG, 5, eos_token_id=None, output_logits=True)
            assert _same(got, ref.generate(LONG, 5, eos_token_id=None, output_logits=True))
    assert len(eng._dense.copies) == n and eng.prefill_dense_bytes == ref.prefill_dense_bytes


def test_prefill_dense_engine_goes_on_after_another_engine_merged_the_model():
    model = _sparse(0)
    a = _engine(model, max_batch=1, prefill_dense=True)
    n = len(a._dense.copies)
    a.generate(LONG, 3, eos_token_id=None)
    b = _engine(model, max_batch=1, merge=True)  # merges the projections a holds copies of
    want = b.generate(LONG, 4, eos_token_id=None, output_logits=True)
    said = r"prefill_dense=True: the copies of 10 layer\(s\) \(model\.layers\.0\.mlp\.gate_proj"
    with pytest.warns(RuntimeWarning, match=said):
        got = a.generate(LONG, 4, eos_token_id=None, output_logits=True)
    assert torch.equal(got.tokens, want.tokens)
    torch.testing.assert_close(got.logits, want.logits, atol=2e-2, rtol=0)  # (the unmerged layers' copies: rounding)
    left = {a._dense.paths[m] for m in a._dense.copies}
    assert left and len(left) < n and all(p.endswith(("o_proj", "down_proj")) for p in left)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (said once)
        assert torch.equal(a.generate(LONG, 4, eos_token_id=None).tokens, want.tokens)


def test_dual_layout_engine_goes_on_after_merge_projections(gpu_layout):
    big = E.DUAL_TCSL_MIN_BATCH
    prompts = [LONG[0][: 5 + i] for i in range(big)]
    model = _sparse(0, 0.5)  # (dense copies: put at the layers' paths)
    eng = _engine(model, max_batch=big, delta_layout="dual")
    eng.generate(prompts, 3, eos_token_id=None)
    eng.generate(prompts[:1], 3, eos_token_id=None)
    merge_projections(model)
    ref = _engine(copy.deepcopy(model), max_batch=big, delta_layout="keep")
    with pytest.warns(RuntimeWarning, match="delta_layout='dual': the copies of"):
        got = eng.generate(prompts, 4, eos_token_id=None)
    assert torch.equal(got.tokens, ref.generate(prompts, 4, eos_token_id=None).tokens)
    left = set(eng._two.paths.values())  # (the merged gate / up layers' copies dropped, the others kept)
    assert left and not any(p.endswith(("gate_proj", "up_proj")) for p in left)


def test_one_engine_two_threads_the_newer_generation_is_right():
    """Thread 1 is held inside a decode step while thread 2 starts a generation on the same engine: thread 2 waits
    for that step (the lock), takes the engine over and decodes what an engine of its own gives; thread 1 raises
    "overtaken" at its next step.  Deterministic: events, and a lock that says when thread 2 waits for it."""
    model = _sparse(0)
    p1, p2, n = [LONG[0][:8]], [LONG[0][3:9]], 10
    want = _engine(copy.deepcopy(model), max_batch=2).generate(p2, n, eos_token_id=None, output_logits=True)
    eng = _engine(model, max_batch=2)
    in_step, go, took_over = threading.Event(), threading.Event(), threading.Event()

    class Spy:  # the engine's lock, telling when thread 2 is about to wait for it
        def __init__(self, lock):
            self.lock, self.waiting = lock, threading.Event()

        def __enter__(self):
            if threading.current_thread().name == "t2":
                self.waiting.set()
            return self.lock.__enter__()

        def __exit__(self, *exc):
            return self.lock.__exit__(*exc)

    eng._lock = spy = Spy(eng._lock)
    forwards = []

    def pause(mod, args):  # thread 1's third forward (a decode step): held there, the lock taken
        if threading.current_thread().name == "t1":
            forwards.append(1)
            if len(forwards) == 3:
                in_step.set()
                go.wait(30)

    def t1_token(step, tok):  # between thread 1's steps (the lock free): until thread 2 has taken over
        if go.is_set():
            took_over.wait(30)

    model.model.layers[1].self_attn.register_forward_pre_hook(pause)
    out: dict[str, object] = {}

    def t1():
        try:
            out["t1"] = eng.generate(p1, n, eos_token_id=None, on_token=t1_token)
        except RuntimeError as e:
            out["t1"] = e

    def t2():
        out["t2"] = eng.generate(p2, n, eos_token_id=None, output_logits=True,
                                 on_token=lambda step, tok: took_over.set())

    a = threading.Thread(target=t1, name="t1")
    a.start()
    assert in_step.wait(30)
    b = threading.Thread(target=t2, name="t2")
    b.start()
    assert spy.waiting.wait(30)  # thread 2 at the lock, thread 1's step still in flight
    go.set()
    a.join(60)
    b.join(60)
    assert isinstance(out["t1"], RuntimeError) and "overtaken" in str(out["t1"]), out["t1"]
    assert _same(out["t2"], want)
    again = eng.generate(p2, n, eos_token_id=None, output_logits=True)  # (the engine is sound after)
    assert _same(again, want)


def test_clear_graphs_and_use_layout_wait_for_a_step_in_flight():
    """The engine's lock covers clear_graphs and use_layout too (the second review): they wait while another
    thread's step holds it, and run once it is released."""
    eng = _engine(_sparse(0, 0.7), max_batch=2)
    held, release = threading.Event(), threading.Event()

    def step_in_flight():
        with eng._lock:
            held.set()
            release.wait(30)

    t = threading.Thread(target=step_in_flight)
    t.start()
    assert held.wait(30)
    done = []
    calls = [threading.Thread(target=lambda: (eng.clear_graphs(), done.append("clear"))),
             threading.Thread(target=lambda: (eng.use_layout(1), done.append("layout")))]
    for c in calls:
        c.start()
    for c in calls:
        c.join(0.5)
    assert done == []  # (both wait for the lock)
    release.set()
    for c in [t, *calls]:
        c.join(30)
    assert sorted(done) == ["clear", "layout"]


def test_both_options_do_not_read_the_prefill_copies_as_a_change(gpu_layout):
    """With delta_layout="dual" and prefill_dense=True, a check of the weights while the prefill's dense copies stand
    at the layers' paths (a decode capture right after a prefill, use_layout after a prefill layout) read every dual
    layer as gone and dropped its copies (with a warning): the prefill's copies go out of the paths first."""
    big = E.DUAL_TCSL_MIN_BATCH
    eng = _engine(_sparse(0, 0.7), max_batch=big, delta_layout="dual", prefill_dense=True)
    assert eng._two is not None and eng._two.large and eng._dense is not None and eng._dense.copies
    n_two, n_dense = len(eng._two.large), len(eng._dense.copies)
    eng.use_layout(E.PREFILL_DENSE_MIN_TOKENS, prefill=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        eng._follow_weights()  # (as _capture's _check_graphs after a prefill)
        eng.use_layout(big)
    assert len(eng._two.large) == n_two and len(eng._dense.copies) == n_dense

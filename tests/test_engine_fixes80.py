"""Session 80's fixes from the engine bug hunt: warmup's later decode-graph captures run their warm-up steps from a
valid state (a prompt length of max_seq - 1 put the slot past the cache and OPT's position past its table); a refused
Engine(fuse=True) leaves an earlier engine's fusing on; generate() / stream() check on_token and output_logits at the
call; the public sample_tokens checks top_k / top_p as the engine does; Engine.last before a stream, numpy ints,
attention_mask values, prompt ids past int64 and the cache size the docstring states.  On the CPU: the engine's own
``_capture`` / ``warmup`` run with CPU stand-ins for the few ``torch.cuda`` calls they make (:func:`fake_cuda`)."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch

import flash_llm.engine as E
from flash_llm.engine import Engine, sample_tokens
from flash_llm.models import from_config
from conftest import TINY_VOCAB
from test_engine_edge import PROMPTS, _model


# ---- CPU stand-ins for the CUDA graph calls of Engine._capture ----------------------------------------------------
class _FakeStream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream):
        pass

    def synchronize(self):
        pass


class _FakeGraph:
    """A 'captured' decode step: :meth:`replay` runs the step (set by :func:`fake_cuda`'s capture)."""

    def __init__(self):
        self.fn, self.replays = None, 0

    def replay(self):
        self.replays += 1
        self.fn()


@pytest.fixture
def fake_cuda(monkeypatch):
    """``install(engine)``: the engine decodes from 'CUDA graphs' captured by its real ``_capture`` (warm-up steps,
    then the step inside ``torch.cuda.graph``: run on the CPU and its slot / position / mask changes undone, as a
    recorded step leaves them); a replay runs the step.  Every ``_step`` checks its precondition: the slot among the
    ``kv`` slots attended, the positions inside the position tables (an IndexError on the CPU, a device-side assert on
    a GPU, where a position or the slot is past its table; none on the CPU where only the slot is past ``kv``).
    Returns the (batch, kv) of each capture."""
    monkeypatch.setattr(torch.cuda, "Stream", _FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a, **k: _FakeStream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeGraph)

    def install(eng):
        @contextlib.contextmanager
        def graph(g, pool=None):  # (recorded, not run: the state as it was after)
            saved = (eng._slot.clone(), eng._pos.clone(), eng._mask.clone())
            yield
            eng._slot.copy_(saved[0])
            eng._pos.copy_(saved[1])
            eng._mask.copy_(saved[2])

        monkeypatch.setattr(torch.cuda, "graph", graph)
        step = eng._step

        def checked_step(b, kv=None):
            kv = eng._slots if kv is None else kv
            slot, top = int(eng._slot), int(eng._pos[:b].max())
            assert 0 <= slot < kv and 0 <= int(eng._pos[:b].min()) and top < eng.max_seq, (b, kv, slot, top)
            step(b, kv)
        monkeypatch.setattr(eng, "_step", checked_step)
        captured = []

        def capture(b, kv):
            before = (eng._slot.clone(), eng._pos.clone(), eng._mask.clone())
            g = Engine._capture(eng, b, kv)
            after = (eng._slot, eng._pos, eng._mask)
            assert all(torch.equal(x, y) for x, y in zip(before, after)), (b, kv)  # (the state left as it was)
            g.fn = lambda: (eng.use_layout(b), eng._step(b, kv))
            captured.append((b, kv))
            return g
        monkeypatch.setattr(eng, "_capture", capture)
        eng.cuda_graphs = True  # (the prefill stays eager: eng._prefills is None on the CPU)
        return captured
    return install


def _opt(max_positions: int):
    """The tests' tiny OPT with ``max_positions`` learned positions."""
    import transformers

    torch.manual_seed(0)
    hc = transformers.OPTConfig(vocab_size=TINY_VOCAB, hidden_size=64, ffn_dim=96, num_hidden_layers=2,
                                num_attention_heads=4, max_position_embeddings=max_positions, init_std=0.1,
                                dropout=0.0, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    hm = transformers.OPTForCausalLM(hc).eval()
    m = from_config(hm.config, dtype=torch.float32, device="meta")
    m.load_state_dict(dict(hm.state_dict()), assign=True)
    return m.eval()


# ---- 1. warmup's later captures run their warm-up steps from a valid state ---------------------------------------
@pytest.mark.parametrize("family, max_seq, kv_min", [
    ("llama", 64, 256),  # (max_seq a multiple of 64: the slot at the cache's end)
    ("opt", 64, 256),  # (max_seq == max_position_embeddings: the position past OPT's table too)
    ("opt100", None, 256),  # (100 positions, 128 slots: the slot inside the cache, the position past the table)
    ("llama", 64, 8),  # (several attended lengths)
])
def test_warmup_captures_from_a_valid_state_at_the_longest_prompt(fake_cuda, monkeypatch, family, max_seq, kv_min):
    """warmup(prompt_lengths=(max_seq - 1,)) with batch sizes that need more decode graphs after its generations
    (the powers of two a batch shrinks to, the longer attended lengths): every capture's warm-up steps run with the
    slot among the slots they attend and the positions inside the tables (they ran from where the last generation
    ended: an IndexError here, a device-side assert on a GPU); the state is left as it was, and a generation after
    the warm-up replays the graphs and decodes what an engine never warmed decodes."""
    monkeypatch.setattr(E, "DECODE_KV_MIN", kv_min)
    monkeypatch.setattr(E, "COMPACT_ROWS", True)
    model = _opt(100) if family == "opt100" else _model(family)
    eng = Engine(model, max_batch=4, max_seq=max_seq)
    captured = fake_cuda(eng)
    longest = eng.max_seq - 1
    assert eng.warmup(batches=(4,), prompt_lengths=(longest,)) == [(4, longest)]
    kvs = eng._kv_lengths(longest + 1)
    assert sorted(captured) == sorted({(4, kvs[0])} | {(b, kv) for b in (1, 2) for kv in kvs})
    n = 12
    prompts = [list(range(1, 41)), [7, 8, 9], list(range(20, 50)), [4] * 10]
    limits = [n, 3, 5, 1]  # (rows stop: the decode shrinks to batches 2 and 1, from the graphs warmup captured)
    before = len(captured)
    got = eng.generate(prompts, limits, output_logits=False, eos_token_id=None)
    assert len(captured) == before and sum(g.replays for g in eng._graphs.values()) > 0
    want = Engine(model, max_batch=4, max_seq=max_seq).generate(prompts, limits, eos_token_id=None)
    assert torch.equal(got.tokens, want.tokens) and torch.equal(got.lengths, want.lengths)
    long = [[t % 90 + 1 for t in range(longest)]]  # (to the end of max_seq, on the graphs of batch 1)
    got = eng.generate(long, 2, eos_token_id=None)
    assert torch.equal(got.tokens, Engine(model, max_batch=4, max_seq=max_seq).generate(long, 2,
                                                                                      eos_token_id=None).tokens)


def test_warmup_captures_shorter_lengths_from_a_slot_they_attend(fake_cuda, monkeypatch):
    """Prompts of 5 and 40 tokens: the graphs of kv 16 and 32 are captured after the last generation ended at slot
    41, and their warm-up steps wrote slot 41 while attending 16 or 32 slots (outside them: the step's precondition
    broken, though the CPU raises nothing); now from a slot among them.  Later generations decode as without."""
    monkeypatch.setattr(E, "DECODE_KV_MIN", 8)
    m = _model()
    eng = Engine(m, max_batch=4, max_seq=64)
    captured = fake_cuda(eng)
    eng.warmup(batches=(1, 2, 4), prompt_lengths=(5, 40))
    assert set(captured) == {(b, kv) for b in (1, 2, 4) for kv in (8, 16, 32, 64)}
    got = eng.generate(PROMPTS, [50, 20, 7, 3], eos_token_id=None)
    assert len(captured) == 12
    want = Engine(m, max_batch=4, max_seq=64).generate(PROMPTS, [50, 20, 7, 3], eos_token_id=None)
    assert torch.equal(got.tokens, want.tokens)


def test_a_capture_during_a_generation_keeps_the_graphs_tokens(fake_cuda, monkeypatch):
    """Graphs captured midway through generations (no warmup), at every attended length up to the cache's end: the
    same tokens and logits as the eager decode."""
    monkeypatch.setattr(E, "DECODE_KV_MIN", 8)
    m = _model("opt")
    eng = Engine(m, max_batch=4, max_seq=64)
    captured = fake_cuda(eng)
    got = eng.generate(PROMPTS, 60, output_logits=True, eos_token_id=None)
    assert sorted(captured) == [(4, kv) for kv in (8, 16, 32, 64)]
    want = Engine(m, max_batch=4, max_seq=64).generate(PROMPTS, 60, output_logits=True, eos_token_id=None)
    assert torch.equal(got.tokens, want.tokens)
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=0)


# ---- 2. a refused Engine(fuse=True) leaves the model's fusing as it was ------------------------------------------
def test_a_refused_fusing_engine_leaves_an_earlier_engines_fusing_on():
    """An engine fuses the model; a second, refused for its cache, used to switch fusing off under the first."""
    m = _model()
    switches = lambda: [mod.fused for mod in m.modules() if hasattr(mod, "fused")]  # noqa: E731
    assert switches() and not any(switches())
    first = Engine(m, max_batch=1, max_seq=16, fuse=True)
    assert all(switches())
    with pytest.raises(ValueError, match="KV cache of max_batch=100000000"):
        Engine(m, max_batch=10**8, max_seq=32, fuse=True)
    assert all(switches())
    assert first.generate([PROMPTS[0]], 2, eos_token_id=None).tokens.shape == (1, 2)
    fresh = _model()  # (a model that was not fused stays unfused)
    with pytest.raises(ValueError, match="KV cache"):
        Engine(fresh, max_batch=10**8, max_seq=32, fuse=True)
    assert not any(mod.fused for mod in fresh.modules() if hasattr(mod, "fused"))


# ---- 3. generate() / stream() check on_token and output_logits at the call ----------------------------------------
@pytest.mark.parametrize("bad, error, word", [
    (dict(on_token=5), TypeError, "on_token must be None or a callable"),
    (dict(on_token="print"), TypeError, "on_token must be None or a callable"),
    (dict(output_logits="no"), ValueError, "output_logits must be True or False"),
    (dict(output_logits=1), ValueError, "output_logits must be True or False"),
    (dict(output_logits=None), ValueError, "output_logits must be True or False"),
])
def test_generate_checks_on_token_and_output_logits_before_any_work(bad, error, word):
    m = _model()
    forwards = []
    m.register_forward_pre_hook(lambda mod, args: forwards.append(1))
    eng = Engine(m, max_batch=1, max_seq=16)
    with pytest.raises(error, match=word):
        eng.generate([PROMPTS[0]], 3, **bad)
    if "output_logits" in bad:
        with pytest.raises(error, match=word):
            eng.stream([PROMPTS[0]], 3, **bad)
    assert forwards == []  # (nothing prefilled)
    seen = []
    out = eng.generate([PROMPTS[0]], 3, eos_token_id=None, on_token=lambda i, t: seen.append(int(t[0])),
                       output_logits=True)
    assert out.tokens[0].tolist() == seen and out.logits.shape == (1, 3, TINY_VOCAB)


# ---- 4. sample_tokens checks top_k / top_p as the engine does -----------------------------------------------------
@pytest.mark.parametrize("bad", [dict(top_k=0), dict(top_k=-2), dict(top_k=2.5), dict(top_k=True), dict(top_p=-0.5),
                                 dict(top_p=0.0), dict(top_p=math.nan), dict(top_p=2.0), dict(top_p="0.9")])
def test_sample_tokens_checks_top_k_and_top_p_as_generate_does(bad):
    """Bad values crashed inside torch (top_k) or were ignored or changed the draw (top_p); now the engine's error."""
    logits = torch.tensor([[1.0, 5.0, 2.0, 0.5], [3.0, -1.0, 2.5, 0.0]])
    with pytest.raises(ValueError) as direct:
        sample_tokens(logits, 1.0, **bad)
    eng = Engine(_model(), max_batch=1, max_seq=16)
    with pytest.raises(ValueError) as engine:
        eng.generate([PROMPTS[0]], 2, temperature=1.0, **bad)
    assert str(direct.value) == str(engine.value) and next(iter(bad)) in str(direct.value)


def test_sample_tokens_takes_numpy_top_k_and_top_p():
    logits = torch.tensor([[1.0, 5.0, 2.0, 0.5], [3.0, -1.0, 2.5, 0.0]])
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    assert torch.equal(sample_tokens(logits, 1.0, np.int64(2), np.float32(0.5), generator=g()),
                       sample_tokens(logits, 1.0, 2, 0.5, generator=g()))
    assert sample_tokens(logits, 1.0, top_k=1).tolist() == [1, 0]


# ---- 5. smaller inconsistencies -------------------------------------------------------------------------------------
def test_last_is_none_before_the_first_stream():
    eng = Engine(_model(), max_batch=1, max_seq=16)
    assert eng.last is None
    list(eng.stream([PROMPTS[0]], 2, eos_token_id=None))
    assert eng.last is not None and eng.last.tokens.shape == (1, 2)


# (numpy ints where Python ints are taken: they were refused)
@pytest.mark.parametrize("kwargs", [dict(max_batch=np.int64(4)), dict(max_seq=np.int32(48)),
                                    dict(prefill_graphs=np.int64(2))])
def test_numpy_ints_as_engine_sizes(kwargs):
    eng = Engine(_model(), **{"max_batch": 4, "max_seq": 48, **kwargs})
    assert (eng.max_batch, eng.max_seq) == (4, 48)
    assert all(type(v) is int for v in (eng.max_batch, eng.max_seq, eng.prefill_graphs_max))
    if "prefill_graphs" in kwargs:
        assert eng.prefill_graphs_max == 2
    assert eng.generate(PROMPTS, 3, eos_token_id=None).tokens.shape == (4, 3)


def test_numpy_ints_as_eos_token_ids():
    eng = Engine(_model(), max_batch=4, max_seq=48)
    free = eng.generate(PROMPTS, 8, eos_token_id=None)
    eos = int(free.tokens[0, 2])
    want = eng.generate(PROMPTS, 8, eos_token_id=eos)
    for e in (np.int64(eos), [np.int32(eos)], (np.uint8(eos), 96)):
        got = eng.generate(PROMPTS, 8, eos_token_id=e)
        assert torch.equal(got.tokens, want.tokens) and torch.equal(got.lengths, want.lengths)
    for bad in (np.int64(TINY_VOCAB), torch.tensor(3), [np.float32(3)]):  # (a tensor stays no token id: session 72)
        with pytest.raises(ValueError, match="eos_token_id must be"):
            eng.generate(PROMPTS, 2, eos_token_id=bad)


def test_numpy_ints_as_prompt_token_ids():
    eng = Engine(_model(), max_batch=4, max_seq=48)
    free = eng.generate(PROMPTS, 8, eos_token_id=None)
    np_prompts = [[np.int64(t) for t in p] for p in PROMPTS]
    assert torch.equal(eng.generate(np_prompts, 8, eos_token_id=None).tokens, free.tokens)
    assert torch.equal(eng.generate([list(np.array(p)) for p in PROMPTS], 8, eos_token_id=None).tokens, free.tokens)
    with pytest.raises(TypeError, match="prompts must hold int token ids"):
        eng.generate([[1, np.float32(2)]], 2)
    with pytest.raises(ValueError, match=f"token id {TINY_VOCAB} is out of range"):
        eng.generate([[1, np.int64(TINY_VOCAB)]], 2)


def test_numpy_ints_as_warmup_shapes_and_use_layout_batch():
    eng = Engine(_model(), max_batch=4, max_seq=48)
    shapes = eng.warmup(batches=(np.int64(1), np.int32(2)), prompt_lengths=(np.int64(3),))
    assert shapes == [(1, 3), (2, 3)] and all(type(v) is int for s in shapes for v in s)
    eng.use_layout(np.int64(2))
    for bad in (dict(batches=(np.float32(1),)), dict(prompt_lengths=(np.int64(48),))):
        with pytest.raises(ValueError, match=next(iter(bad))):
            eng.warmup(**bad)


@pytest.mark.parametrize("mask, ok", [
    (torch.tensor([[0, 1, 1], [1, 1, 1]]), True),
    (torch.tensor([[0.0, 1.0, 1.0], [1.0, 1.0, 1.0]]), True),
    (torch.tensor([[False, True, True], [True, True, True]]), True),
    (torch.tensor([[0, 2, 1], [1, 1, 1]]), False),
    (torch.tensor([[0, 1, 1], [-1, 1, 1]]), False),
    (torch.tensor([[0.0, 0.5, 1.0], [1.0, 1.0, 1.0]]), False),
    (torch.tensor([[0.0, math.nan, 1.0], [1.0, 1.0, 1.0]]), False),
    (torch.tensor([[0.0, 1.0, 1.0], [-math.inf, 0.0, 0.0]]), False),  # (an additive mask)
])
def test_attention_mask_values_other_than_0_and_1_are_refused(mask, ok):
    eng = Engine(_model(), max_batch=2, max_seq=16)
    ids = torch.tensor([[0, 5, 6], [1, 2, 3]])
    if ok:
        got = eng.generate(ids, 3, attention_mask=mask, eos_token_id=None).tokens
        assert torch.equal(got, eng.generate([[5, 6], [1, 2, 3]], 3, eos_token_id=None).tokens)
    else:
        with pytest.raises(ValueError, match="attention_mask must hold 0 / 1"):
            eng.generate(ids, 3, attention_mask=mask, eos_token_id=None)


@pytest.mark.parametrize("bad", [2**63, 2**64 + 5, -(2**63) - 1, TINY_VOCAB])
def test_prompt_ids_past_int64_get_the_engines_range_error(bad):
    eng = Engine(_model(), max_batch=1, max_seq=16)
    with pytest.raises(ValueError, match=f"token id {bad} is out of range for a vocabulary of {TINY_VOCAB}"):
        eng.generate([[1, bad]], 2)


@pytest.mark.parametrize("max_seq", [8, 33, 64])
def test_the_docstrings_cache_size_rounds_max_seq_up_to_64(max_seq):
    m = _model()
    eng = Engine(m, max_batch=2, max_seq=max_seq)
    cfg = m.config
    slots = -(-max_seq // 64) * 64
    assert eng.cache_bytes == 2 * cfg.num_layers * 2 * cfg.num_kv_heads * slots * cfg.head_dim * 4
    doc = " ".join(Engine.__doc__.split())
    assert "x slots x head_dim" in doc and "max_seq`` rounded up to a multiple of 64" in doc

"""The engine's generation API at its edges (session 72's bug hunt): one generation at a time, a configured pad id
outside the vocabulary, a refused constructor leaving the model alone, tiny temperatures, and arguments of the wrong
type refused with their names; session 73: temperatures and top_p that are 0 in float32, stream()'s checks at the
call.  On the CPU (eager decode)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from flash_llm.engine import Engine, sample_tokens
from flash_llm.models import from_config
from conftest import tiny_hf_model

PROMPTS = [[5, 6, 7], [1, 2], [3, 3, 3], [8, 9]]


def _model(family: str = "llama"):
    hm = tiny_hf_model(family)
    m = from_config(hm.config, dtype=torch.float32, device="meta")
    m.load_state_dict(dict(hm.state_dict()), assign=True)
    return m.eval()


def _solo(model, prompt, n):
    return Engine(model, max_batch=1, max_seq=64).generate([prompt], n, eos_token_id=None).tokens[0].tolist()


def test_a_later_generation_overtakes_an_open_stream():
    """Two streams on one engine: the second takes the engine over and decodes what it decodes alone; the first
    raises at its next step instead of decoding from the other's cache and inputs."""
    m = _model()
    eng = Engine(m, max_batch=1, max_seq=64)
    a = eng.stream([PROMPTS[0]], 6, eos_token_id=None)
    first = next(a)
    b = list(eng.stream([PROMPTS[1]], 6, eos_token_id=None))
    assert [int(t[0]) for t in b] == _solo(m, PROMPTS[1], 6)
    assert int(first[0]) == _solo(m, PROMPTS[0], 6)[0]
    with pytest.raises(RuntimeError, match="overtaken"):
        next(a)
    # the engine serves the next generation as it would have
    assert eng.generate([PROMPTS[0]], 6, eos_token_id=None).tokens[0].tolist() == _solo(m, PROMPTS[0], 6)


def test_a_generation_inside_on_token_overtakes_the_outer_one():
    m = _model("opt")
    eng = Engine(m, max_batch=1, max_seq=64)
    inner = []

    def on_token(step, tok):
        if step == 2:
            inner.append(eng.generate([PROMPTS[3]], 3, eos_token_id=None).tokens[0].tolist())

    with pytest.raises(RuntimeError, match="overtaken"):
        eng.generate([PROMPTS[2]], 8, eos_token_id=None, on_token=on_token)
    assert inner == [_solo(m, PROMPTS[3], 3)]


@pytest.mark.parametrize("pad", [-1, 97, 1000])
@pytest.mark.parametrize("output_logits", [False, True])
def test_stopped_rows_are_fed_a_token_of_the_vocabulary(pad, output_logits):
    """A config's pad id of -1 or past the vocabulary (older conversions ship -1) shows in the stopped rows'
    output, but the rows are fed a real token: the other rows decode as they do alone."""
    m = _model()
    free = Engine(m, max_batch=4, max_seq=64).generate(PROMPTS, 10, eos_token_id=None).tokens
    eos = int(free[0, 0])  # row 0 stops at its first token
    assert all(eos not in free[r].tolist() for r in (1, 2, 3))
    m.config = dataclasses.replace(m.config, pad_token_id=pad)
    out = Engine(m, max_batch=4, max_seq=64).generate(PROMPTS, 10, eos_token_id=eos, output_logits=output_logits)
    assert out.tokens[0].tolist() == [eos] + [pad] * 9
    assert torch.equal(out.tokens[1:], free[1:])


@pytest.mark.parametrize("kwargs", [dict(max_seq=100), dict(max_batch=0), dict(cuda_graphs=True),
                                    dict(fuse="yes"), dict(progress=None)])
def test_a_refused_engine_leaves_the_model_as_it_was(kwargs):
    """Every argument is checked before ``merge`` / ``fuse`` change the model."""
    m = _model()
    keys = list(m.state_dict())
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        Engine(m, merge=True, **kwargs)
    assert list(m.state_dict()) == keys


@pytest.mark.parametrize("name", ["merge", "prefill_dense", "progress", "fuse", "cuda_graphs"])
def test_switches_must_be_bools(name):
    with pytest.raises(ValueError, match=f"{name} must be True or False"):
        Engine(_model(), **{name: "no"})


def test_a_tiny_temperature_tends_to_greedy():
    """``logits / temperature`` overflowed to inf for temperatures below about 1e-37 (NaN probabilities: token 0);
    with the largest logit at 0 first, the limit is the argmax."""
    logits = torch.tensor([[1.0, 5.0, 2.0], [3.0, -1.0, 2.5]])
    for t in (1e-40, 1e-30, 1e-6):
        assert sample_tokens(logits, t).tolist() == [1, 0]
    m = _model()
    eng = Engine(m, max_batch=1, max_seq=64)
    greedy = eng.generate([PROMPTS[0]], 4, eos_token_id=None).tokens
    assert torch.equal(eng.generate([PROMPTS[0]], 4, eos_token_id=None, temperature=1e-40).tokens, greedy)


def test_temperatures_and_top_p_that_are_zero_in_float32():
    """Session 73: a temperature or top_p below float32's range (1e-46) became 0 there: 0 / 0 made every
    probability NaN, and top_p 0 dropped every token, so token 0 came out; now the argmax (the limit of both)."""
    logits = torch.tensor([[1.0, 5.0, 2.0], [3.0, -1.0, 2.5], [0.5, 0.1, 0.9]])
    for t in (1e-46, 1e-300, 5e-324):
        assert sample_tokens(logits, t).tolist() == [1, 0, 2]
    for p in (1e-46, 1e-300):
        assert sample_tokens(logits, 1.0, top_p=p).tolist() == [1, 0, 2]
    for t in (-1e-3, float("nan"), float("inf")):  # (inf: session 80, as Engine.generate refuses it)
        with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
            sample_tokens(logits, t)
    eng = Engine(_model(), max_batch=1, max_seq=64)
    greedy = eng.generate([PROMPTS[0]], 4, eos_token_id=None).tokens
    assert torch.equal(eng.generate([PROMPTS[0]], 4, eos_token_id=None, temperature=1e-50).tokens, greedy)
    assert torch.equal(eng.generate([PROMPTS[0]], 4, eos_token_id=None, temperature=1.0, top_p=1e-50).tokens, greedy)


@pytest.mark.parametrize("bad, error", [({"temprature": 0.7}, TypeError), ({"temperature": -1.0}, ValueError),
                                        ({"top_k": 0}, ValueError), ({"eos_token_id": True}, ValueError)])
def test_stream_checks_its_arguments_at_the_call(bad, error):
    """Session 73: stream() was a generator function, so its checks ran at the first next(); a typo only failed
    when the first token was asked for, and ``last`` was not reset until then."""
    eng = Engine(_model(), max_batch=1, max_seq=16)
    first = list(eng.stream([PROMPTS[0]], 2))
    last = eng.last
    with pytest.raises(error):
        eng.stream([PROMPTS[0]], 2, **bad)
    with pytest.raises(ValueError, match="max_new_tokens|max_seq|cache"):
        eng.stream([PROMPTS[0]], 999)
    assert eng.last is last  # (a refused call changes nothing)
    assert [t.tolist() for t in eng.stream([PROMPTS[0]], 2)] == [t.tolist() for t in first]
    assert eng.last is not last and torch.equal(eng.last.tokens, last.tokens)


@pytest.mark.parametrize("eos", [True, torch.tensor(3), 3.0, object()])
def test_eos_token_id_of_the_wrong_type_is_named(eos):
    eng = Engine(_model(), max_batch=1, max_seq=64)
    with pytest.raises(ValueError, match="eos_token_id must be"):
        eng.generate([PROMPTS[0]], 2, eos_token_id=eos)


def test_attention_mask_must_be_a_tensor():
    eng = Engine(_model(), max_batch=2, max_seq=64)
    with pytest.raises(TypeError, match="attention_mask must be"):
        eng.generate(torch.tensor([[1, 2], [3, 4]]), 2, attention_mask=[[1, 1], [1, 1]])


def test_a_cache_that_cannot_fit_is_refused_before_the_model_changes():
    """max_batch x max_seq past the device's memory: refused naming them, before merge / fuse change the model (the
    allocation used to fail after, leaving the model merged and no engine)."""
    m = _model()
    keys = list(m.state_dict())
    with pytest.raises(ValueError, match=r"KV cache of max_batch=100000000 x max_seq=32"):
        Engine(m, max_batch=10**8, max_seq=32, merge=True)
    assert list(m.state_dict()) == keys


def test_a_cache_past_the_free_memory_is_refused_before_it_is_allocated(monkeypatch):
    """The cache is checked against the device's free memory before it is allocated: a host that overcommits lets an
    allocation past its memory succeed and kills the process when the cache is filled (the test above was killed on
    a GPU machine's 125 GiB host, session 74)."""
    import flash_llm.engine as engine_mod

    m = _model()
    keys = list(m.state_dict())
    monkeypatch.setattr(engine_mod, "_cache_room", lambda device: 1024)  # (a small cache that would allocate)
    with pytest.raises(ValueError, match=r"KV cache of max_batch=2 x max_seq=32 .*\(0\.00 GiB free\)"):
        Engine(m, max_batch=2, max_seq=32, merge=True)
    assert list(m.state_dict()) == keys
    monkeypatch.setattr(engine_mod, "_cache_room", lambda device: 0)  # (unknown: the allocation decides)
    assert Engine(m, max_batch=2, max_seq=32).cache is not None


def test_use_layout_names_a_bad_batch():
    eng = Engine(_model(), max_batch=2, max_seq=64)
    for bad in (0, -1, "x", True):
        with pytest.raises(ValueError, match="batch must be an int >= 1"):
            eng.use_layout(bad)


def test_host_memory_is_capped_by_the_cgroup_limit(tmp_path, monkeypatch):
    """``host_available_memory`` (the CPU's free memory the engine's cache check and the synthetic builds plan with)
    takes no more than the room under the process' cgroup limit: inside a capped container ``MemAvailable`` counts
    the whole host's, and the check passed where the kernel then killed the process (session 74's GPU-machine audit)."""
    from flash_llm.models import synthetic

    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.max").write_text("1073741824\n")
    (v2 / "memory.current").write_text("268435456\n")
    assert synthetic._cgroup_room(str(v2)) == 768 << 20
    (v2 / "memory.max").write_text("max\n")
    assert synthetic._cgroup_room(str(v2)) is None
    v1 = tmp_path / "v1"
    (v1 / "memory").mkdir(parents=True)
    (v1 / "memory" / "memory.limit_in_bytes").write_text(str(512 << 20))
    (v1 / "memory" / "memory.usage_in_bytes").write_text(str(600 << 20))
    assert synthetic._cgroup_room(str(v1)) == 0
    (v1 / "memory" / "memory.limit_in_bytes").write_text(str(9223372036854771712))  # (v1's "no limit")
    assert synthetic._cgroup_room(str(v1)) is None
    assert synthetic._cgroup_room(str(tmp_path / "none")) is None
    monkeypatch.setattr(synthetic, "_cgroup_room", lambda: 5 << 20)
    assert synthetic.host_available_memory() == 5 << 20
    monkeypatch.setattr(synthetic, "_cgroup_room", lambda: 0)
    assert synthetic.host_available_memory() == 1  # (full: known, not 0 = unknown)

"""Session 76's fixes from the engine bug hunt: a seed gives the same tokens through generate(), on_token and stream()
where the rows still going decode as a smaller batch; stream() and on_token leave the caller's grad mode alone; a
config's eos id outside the vocabulary is never fed to a stopped row; numpy and 0-d tensor scalars as sampling
arguments and limits; the demo refuses more tokens than its engine holds, up front.  On the CPU (eager decode)."""

from __future__ import annotations

import dataclasses
import gc
import json
import re
import shutil

import numpy as np
import pytest
import torch

import flash_llm.engine as E
from flash_llm import bundled
from flash_llm.cli import main
from flash_llm.engine import Engine
from conftest import TINY_VOCAB
from test_engine_edge import PROMPTS, _model


# ---- a seed gives the same tokens through generate(), on_token and stream() ----------------------------------
def _three_ways(eng, monkeypatch, n, **kw):
    """``(generate, generate(on_token=...), stream)``'s tokens ``[B, n']`` with one seed, and the decode's batch sizes
    of each."""
    sizes = []
    decode = eng._decode
    monkeypatch.setattr(eng, "_decode", lambda b, kv: sizes[-1].append(b) or decode(b, kv))
    seed = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    sizes.append([])
    plain = eng.generate(PROMPTS, n, generator=seed(), **kw).tokens
    sizes.append([])
    seen = []
    called = eng.generate(PROMPTS, n, generator=seed(), on_token=lambda i, t: seen.append(t), **kw).tokens
    assert torch.equal(torch.stack(seen, 1), called)
    sizes.append([])
    streamed = torch.stack(list(eng.stream(PROMPTS, n, generator=seed(), **kw)), 1)
    assert torch.equal(streamed, eng.last.tokens)
    monkeypatch.setattr(eng, "_decode", decode)
    return (plain, called, streamed), sizes


@pytest.mark.parametrize("how", ["plain", "lagged", "no-host-copies"])
def test_a_seed_samples_the_same_tokens_generated_called_back_and_streamed(monkeypatch, how):
    """Rows 0 and 3 stop at their EOS (step 26 with this seed) and the other two decode on as a batch of 2: the three
    ways of generating shrink the batch at the same step (EOS_LAG steps after the stop, whether the host has the
    flags at once, a step late when streaming, or EOS_LAG steps late as on a GPU), so the sampler's draws, which
    follow the batch's size, and the tokens agree; the same tokens in every mode."""
    monkeypatch.setattr(E, "COMPACT_ROWS", True)
    eng = Engine(_model(), max_batch=4, max_seq=64)
    kw = dict(temperature=1.0, eos_token_id=3)
    want, _ = _three_ways(eng, monkeypatch, 40, **kw)
    if how == "lagged":
        monkeypatch.setattr(E, "_lagged_stop", lambda device: True)
    elif how == "no-host-copies":
        monkeypatch.setattr(E, "HOST_COPIES", False)
    outs, sizes = _three_ways(eng, monkeypatch, 40, **kw)
    for s in sizes:
        assert sorted(set(s), reverse=True) == [4, 2], sizes  # (each shrank to the 2 rows going)
    m = min(map(len, sizes))  # (streaming launches one step past the last stop, then drops it)
    assert sizes[0][:m] == sizes[1][:m] == sizes[2][:m], sizes
    firsts = [(row == 3).nonzero()[0].item() if (row == 3).any() else None for row in outs[0]]
    assert firsts[0] == firsts[3] == 26 and all(f is None or f > 26 for f in firsts[1:3]), firsts
    plain, called, streamed = outs
    n = streamed.shape[1]
    assert torch.equal(called, plain) and torch.equal(streamed, plain[:, :n]), (plain[:, 26:], streamed[:, 26:])
    assert torch.equal(plain[:, :n], want[0][:, :n])  # (and the mode does not change the text)


# ---- stream() and on_token leave the caller's grad mode alone ------------------------------------------------
def test_streaming_leaves_the_callers_grad_mode_alone():
    """Inside a stream's loop, after leaving it early, when an abandoned stream is collected and inside on_token the
    grad mode is the caller's own; the engine's forwards still run without grad."""
    m = _model()
    modes = []
    m.register_forward_pre_hook(lambda mod, args: modes.append(torch.is_grad_enabled()))
    eng = Engine(m, max_batch=1, max_seq=64)
    w = torch.ones(3, requires_grad=True)
    assert torch.is_grad_enabled()
    s = eng.stream([PROMPTS[0]], 10, eos_token_id=None)
    for i, _ in enumerate(s):
        assert torch.is_grad_enabled()
        assert (w * 2).sum().requires_grad
        if i == 2:
            break
    assert torch.is_grad_enabled()
    (w * 2).sum().backward()  # (the user's autograd works with the stream still referenced)
    assert w.grad.tolist() == [2.0, 2.0, 2.0]
    try:
        torch.set_grad_enabled(False)
        del s
        gc.collect()  # (the abandoned stream closes: the mode stays the caller's)
        assert not torch.is_grad_enabled()
        seen = []
        eng.generate([PROMPTS[0]], 3, eos_token_id=None, on_token=lambda i, t: seen.append(torch.is_grad_enabled()))
        assert seen == [False] * 3
    finally:
        torch.set_grad_enabled(True)
    seen = []
    eng.generate([PROMPTS[0]], 3, eos_token_id=None, on_token=lambda i, t: seen.append(torch.is_grad_enabled()))
    assert seen == [True] * 3
    assert list(eng.stream([PROMPTS[1]], 4, eos_token_id=None)) and torch.is_grad_enabled()
    assert modes and not any(modes)  # (every prefill and decode step of the engine without grad)


def test_an_error_in_on_token_leaves_the_callers_grad_mode_alone():
    eng = Engine(_model(), max_batch=1, max_seq=64)

    def on_token(step, tok):
        raise KeyError("stop")

    with pytest.raises(KeyError) as info:
        eng.generate([PROMPTS[0]], 5, eos_token_id=None, on_token=on_token)
    assert torch.is_grad_enabled()
    del info
    gc.collect()
    assert torch.is_grad_enabled()


# ---- a config's eos id outside the vocabulary ------------------------------------------------------------------
@pytest.mark.parametrize("bad", [-1, TINY_VOCAB, [TINY_VOCAB, -1]])
@pytest.mark.parametrize("stream", [False, True])
def test_a_config_eos_outside_the_vocabulary_is_not_fed(bad, stream):
    """No pad id and an eos id of -1 or the vocabulary's size (never emitted): a row that stops at its limit shows the
    eos id as its padding, but is fed a token of the vocabulary, so the other rows decode as they do alone."""
    m = _model()
    free = Engine(m, max_batch=4, max_seq=64).generate(PROMPTS, 6, eos_token_id=None).tokens
    m.config = dataclasses.replace(m.config, eos_token_id=bad, pad_token_id=None)
    eng = Engine(m, max_batch=4, max_seq=64)
    limits = [1, 6, 6, 6]
    if stream:
        tokens = torch.stack(list(eng.stream(PROMPTS, limits)), 1)
        out = eng.last
        assert torch.equal(tokens, out.tokens)
    else:
        out = eng.generate(PROMPTS, limits)
    pad = bad if isinstance(bad, int) else bad[0]
    assert out.lengths.tolist() == limits
    assert out.tokens[0].tolist() == [int(free[0, 0])] + [pad] * 5
    assert torch.equal(out.tokens[1:], free[1:])


def test_a_stopped_row_is_fed_the_first_stop_token_of_the_vocabulary(monkeypatch):
    """eos ids [vocab, 4] and no pad id: the padding shows the first, the row is fed 4 (a token of the vocabulary)."""
    m = _model()
    m.config = dataclasses.replace(m.config, eos_token_id=[TINY_VOCAB, 4], pad_token_id=None)
    eng = Engine(m, max_batch=4, max_seq=64)
    fed = []
    decode = eng._decode
    monkeypatch.setattr(eng, "_decode", lambda b, kv: fed.append(eng._tok[:b, 0].tolist()) or decode(b, kv))
    monkeypatch.setattr(E, "COMPACT_ROWS", False)  # (the stopped row stays in the decode)
    out = eng.generate(PROMPTS, [1, 3, 3, 3])
    assert out.tokens[0, 1:].tolist() == [TINY_VOCAB] * 2
    assert len(fed) == 2 and fed[1][0] == 4


# ---- numpy and 0-d tensor scalars ---------------------------------------------------------------------------
def test_numpy_and_tensor_scalars_are_taken_as_their_values():
    """Sampling arguments and limits given as numpy scalars or 0-d tensors (a config's, a sweep's) sample what the
    Python numbers sample, through generate() and stream()."""
    eng = Engine(_model(), max_batch=4, max_seq=64)

    def run(n, **kw):
        return eng.generate(PROMPTS, n, generator=torch.Generator().manual_seed(1), eos_token_id=None, **kw).tokens

    want = run(6, temperature=0.75, top_k=5, top_p=0.875)
    for n, t, k, p in [(np.int64(6), np.float32(0.75), np.int64(5), np.float32(0.875)),
                       (torch.tensor(6), torch.tensor(0.75), torch.tensor(5), torch.tensor(0.875)),
                       (np.int32(6), torch.tensor(0.75, dtype=torch.float64), np.uint8(5), np.float16(0.875))]:
        assert torch.equal(run(n, temperature=t, top_k=k, top_p=p), want), (n, t, k, p)
    streamed = eng.stream(PROMPTS, np.int64(6), temperature=np.float32(0.75), top_k=np.int64(5),
                          top_p=torch.tensor(0.875), generator=torch.Generator().manual_seed(1), eos_token_id=None)
    assert torch.equal(torch.stack(list(streamed), 1), want)
    limits = eng.generate(PROMPTS, [np.int64(2), torch.tensor(6), 3, np.int16(1)], eos_token_id=None)
    assert limits.lengths.tolist() == [2, 6, 3, 1] and limits.tokens.shape == (4, 6)
    assert torch.equal(eng.generate(PROMPTS, np.int64(5), temperature=np.float64(0), eos_token_id=None).tokens,
                       eng.generate(PROMPTS, 5, eos_token_id=None).tokens)


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=np.True_), "temperature must be a finite number >= 0"),
    (dict(temperature=torch.tensor(True)), "temperature must be a finite number >= 0"),
    (dict(temperature=np.float32("nan")), "temperature must be a finite number >= 0"),
    (dict(temperature=torch.tensor(float("inf"))), "temperature must be a finite number >= 0"),
    (dict(temperature=np.float32(-0.5)), "temperature must be a finite number >= 0"),
    (dict(temperature=torch.tensor([0.5])), "temperature must be a finite number >= 0"),
    (dict(temperature=10 ** 400), "temperature must be a finite number >= 0"),
    (dict(temperature=0.5, top_k=np.int64(0)), "top_k must be None or an int >= 1"),
    (dict(temperature=0.5, top_k=np.True_), "top_k must be None or an int >= 1"),
    (dict(temperature=0.5, top_k=torch.tensor(True)), "top_k must be None or an int >= 1"),
    (dict(temperature=0.5, top_k=torch.tensor(5.0)), "top_k must be None or an int >= 1"),
    (dict(temperature=0.5, top_k=torch.tensor([5])), "top_k must be None or an int >= 1"),
    (dict(temperature=0.5, top_k=np.float64(5.0)), "top_k must be None or an int >= 1"),
    (dict(temperature=0.5, top_p=np.float32(1.5)), r"top_p must be None or a number in \(0, 1\]"),
    (dict(temperature=0.5, top_p=np.float32("nan")), r"top_p must be None or a number in \(0, 1\]"),
    (dict(temperature=0.5, top_p=torch.tensor(0.0)), r"top_p must be None or a number in \(0, 1\]"),
    (dict(temperature=0.5, top_p=np.True_), r"top_p must be None or a number in \(0, 1\]"),
    (dict(temperature=0.5, top_p=10 ** 400), r"top_p must be None or a number in \(0, 1\]"),
    (dict(temperature=np.float32(0), top_k=np.int64(3)), "top_k / top_p apply to sampling"),
    (dict(max_new_tokens=np.int64(0)), "max_new_tokens must be an int >= 1"),
    (dict(max_new_tokens=torch.tensor(True)), "max_new_tokens must be an int >= 1"),
    (dict(max_new_tokens=np.True_), "max_new_tokens must be an int >= 1"),
    (dict(max_new_tokens=np.float32(4)), "max_new_tokens must be an int >= 1"),
    (dict(max_new_tokens=[np.int64(2), np.True_, 1, 1]), "max_new_tokens as a list must hold one int >= 1"),
    (dict(max_new_tokens=[np.int64(2), torch.tensor(0), 1, 1]), "max_new_tokens as a list must hold one int >= 1"),
])
def test_bad_scalars_are_refused_with_the_existing_messages(kwargs, match):
    eng = Engine(_model(), max_batch=4, max_seq=64)
    n = kwargs.pop("max_new_tokens", 4)
    with pytest.raises(ValueError, match=match):
        eng.generate(PROMPTS, n, **kwargs)
    with pytest.raises(ValueError, match=match):
        eng.stream(PROMPTS, n, **kwargs)


# ---- the demo: no more tokens than its engine holds -----------------------------------------------------------
@pytest.fixture
def long_context_model(tmp_path):
    """The bundled byte-level model with a context of 4096 (the demo's engine holds 2048 tokens of it)."""
    d = tmp_path / "ctx4096"
    shutil.copytree(bundled.path("tiny-shakespeare"), d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["max_position_embeddings"] = 4096
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("argv, match", [
    (["--gen-tokens", "2100"], r"--prompt \(6 tokens\) \+ --gen-tokens \(2100\) exceed the 2048 tokens"),
    (["--gen-tokens", "2044"], r"--gen-tokens \(2044\) exceed .*; pass --gen-tokens 2043 or less"),
    (["--prompt", "x" * 2100, "--gen-tokens", "1"], r"--prompt \(2100 tokens\) \+ --gen-tokens \(1\) exceed"),
])
def test_demo_refuses_more_tokens_than_its_engine_holds(capsys, long_context_model, argv, match):
    """A model whose context (4096) is longer than the demo's engine holds (2048): too many tokens are refused before
    the evaluation and pruning, naming the arguments, with the exit status of the other bad arguments."""
    rc = main(["demo", "--model", str(long_context_model), "--method", "magnitude", "--eval-tokens", "50",
               "--seq-len", "16", "--prompt", "ROMEO:", "--device", "cpu", *argv])
    out, err = capsys.readouterr()
    assert rc == 2, (out, err)
    assert re.search(match, err), err
    assert "Traceback" not in err and "val loss" not in out

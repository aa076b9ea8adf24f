"""Session 82's engine fixes: steps launched past the end and dropped give their random draws back, so a generator
(or the default one) shared by consecutive requests samples the same tokens through generate(), on_token and stream(),
and with the stop flags read late as on a GPU; ``eos_token_id=[]`` means no stop token, as a config's ``[]``.  CPU."""

from __future__ import annotations

import pytest
import torch

import flash_llm.engine as E
from flash_llm.engine import Engine
from test_engine_edge import _model

PROMPTS2 = [[5, 6, 7], [1, 2]]


def _two_requests(eng, how, *, seeded=True, n=6, eos=None):
    """The tokens of two consecutive sampling requests sharing one random stream (a generator, or torch's default
    one seeded once)."""
    g = torch.Generator(eng.device).manual_seed(0) if seeded else None
    if not seeded:
        torch.manual_seed(0)
    outs = []
    for _ in range(2):
        kw = dict(eos_token_id=eos, temperature=1.0, generator=g)
        if how == "generate":
            outs.append(eng.generate(PROMPTS2, n, **kw).sequences())
        elif how == "stream":
            list(eng.stream(PROMPTS2, n, **kw))
            outs.append(eng.last.sequences())
        else:
            outs.append(eng.generate(PROMPTS2, n, on_token=lambda step, tokens: None, **kw).sequences())
    return outs


def _eos_for(eng, n=6):
    """A stop list under which both rows stop before ``n`` tokens with the first request's seed (so that
    streaming launches a step past the end): the tokens generate() samples at steps 0 and 1."""
    g = torch.Generator(eng.device).manual_seed(0)
    first = eng.generate(PROMPTS2, n, eos_token_id=None, temperature=1.0, generator=g).tokens
    return sorted({int(first[0, 0]), int(first[1, 1])})


@pytest.mark.parametrize("seeded", [True, False])
@pytest.mark.parametrize("lagged", [False, True])
def test_a_shared_random_stream_samples_the_same_tokens_on_every_path(monkeypatch, seeded, lagged):
    eng = Engine(_model(), max_batch=4, max_seq=48)
    eos = _eos_for(eng)
    want = _two_requests(eng, "generate", seeded=seeded, eos=eos)  # (a CPU's generate(): no step past the end)
    assert all(len(row) < 6 for row in want[0]), want  # (every row stopped early: the case that drops steps)
    if lagged:  # (generate() as on a GPU: the stop flags read EOS_LAG steps late, steps sampled past the end)
        monkeypatch.setattr(E, "_lagged_stop", lambda device: True)
    for how in ("generate", "stream", "on_token"):
        assert _two_requests(eng, how, seeded=seeded, eos=eos) == want, how


def test_lagged_generate_running_to_max_new_tokens_gives_back_the_draws_past_the_end(monkeypatch):
    """Every row stopped, but too late for the lagged flags to end the loop: the steps after the last stop ran to
    max_new_tokens; the stream is left where a CPU's generate() leaves it."""
    eng = Engine(_model(), max_batch=4, max_seq=48)
    g = torch.Generator().manual_seed(0)
    first = eng.generate(PROMPTS2, 4, eos_token_id=None, temperature=1.0, generator=g).tokens
    eos = sorted({int(first[0, 1]), int(first[1, 1])})  # (both rows stop at step 1 of 4 at the latest)
    want = _two_requests(eng, "generate", n=4, eos=eos)
    monkeypatch.setattr(E, "_lagged_stop", lambda device: True)
    assert _two_requests(eng, "generate", n=4, eos=eos) == want


@pytest.mark.parametrize("empty", [[], ()])
def test_an_empty_stop_list_never_stops(empty):
    eng = Engine(_model(), max_batch=4, max_seq=48)
    got = eng.generate(PROMPTS2, 5, eos_token_id=empty)
    assert torch.equal(got.tokens, eng.generate(PROMPTS2, 5, eos_token_id=None).tokens)
    assert got.lengths.tolist() == [5, 5]


@pytest.mark.parametrize("bad", ["", b"", torch.tensor([], dtype=torch.long)])
def test_an_empty_string_or_tensor_is_still_refused(bad):
    eng = Engine(_model(), max_batch=4, max_seq=48)
    with pytest.raises(ValueError, match="eos_token_id"):
        eng.generate(PROMPTS2, 3, eos_token_id=bad)


def test_a_zero_exponential_draw_never_picks_a_token_outside_top_k(monkeypatch):
    """Some torch versions' exponential_ could return 0 (pytorch issues 22557, 48841): a filtered token's 0 / 0 was NaN,
    which argmax takes as the largest, so a token outside top_k was sampled."""
    from flash_llm.engine import sample_tokens

    real = torch.Tensor.exponential_

    def zero_at_last(self, *args, **kwargs):
        real(self, *args, **kwargs)
        self[..., -1] = 0.0
        return self

    monkeypatch.setattr(torch.Tensor, "exponential_", zero_at_last)
    logits = torch.arange(10, dtype=torch.float32).flip(0).repeat(3, 1)  # (the last token is the least likely)
    for _ in range(20):
        tok = sample_tokens(logits, temperature=1.0, top_k=3)
        assert ((0 <= tok) & (tok < 3)).all(), tok


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("seeded", [True, False])
def test_cuda_shared_random_stream_samples_the_same_tokens_on_every_path(seeded):
    """On a GPU generate() reads the stop flags EOS_LAG steps late (steps sampled past the end), streaming a step
    late; the draws given back leave a CUDA generator (or the device's default one) where the next request expects
    it."""
    eng = Engine(_model().cuda(), max_batch=4, max_seq=48)
    eos = _eos_for(eng)
    want = _two_requests(eng, "generate", seeded=seeded, eos=eos)
    assert all(len(row) < 6 for row in want[0]), want
    for how in ("stream", "on_token"):
        assert _two_requests(eng, how, seeded=seeded, eos=eos) == want, how

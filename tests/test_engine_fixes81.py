"""Session 81's engine fixes (sampling), each test failing without its fix."""

from __future__ import annotations

import pytest
import torch

from flash_llm.engine import sample_tokens


@pytest.mark.parametrize("kw", [{}, {"top_k": 2}, {"top_p": 0.9}, {"top_k": 3, "top_p": 0.5}])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_a_row_with_inf_or_nan_samples_greedys_token(kw, temperature):
    """A ``+inf`` logit (an fp16 head that overflowed) made every probability NaN, and the sampled token was 0 whatever
    the logits; greedy took the ``+inf``.  Now such a row takes greedy's token (a NaN row too); other rows sample."""
    g = torch.Generator().manual_seed(0)
    inf, nan = float("inf"), float("nan")
    logits = torch.tensor([[0.0, inf, 1.0, 2.0], [3.0, 0.0, nan, 1.0], [0.0, 1.0, 1.0, inf]])
    for dtype in (torch.float32, torch.float16):
        for _ in range(50):
            got = sample_tokens(logits.to(dtype), temperature, generator=g, **kw)
            assert got.tolist() == [1, 2, 3]
    finite = torch.tensor([[0.0, 0.0, 9.0, 0.0]]).expand(200, 4)
    assert bool((sample_tokens(finite, temperature, generator=g, **kw) == 2).float().mean() > 0.5)


@pytest.mark.parametrize("shape", [(5,), (2, 3, 5)])
def test_top_k_on_logits_of_other_ranks(shape):
    """``top_k`` indexed dimension 1 for the k-th value: 1-D logits raised IndexError and 3-D ones a broadcast error
    (the other options took any rank).  One token per row of the last dimension, from the top k only."""
    g = torch.Generator().manual_seed(1)
    logits = torch.arange(5.0).expand(*shape).contiguous()
    for _ in range(100):
        got = sample_tokens(logits, 1.0, top_k=2, generator=g)
        assert got.shape == shape[:-1]
        assert bool(((got == 3) | (got == 4)).all())


def test_a_generator_with_greedy_decoding_is_refused():
    """``generate(..., generator=g)`` with temperature 0 was accepted and ignored (greedy draws nothing), while
    ``top_k`` / ``top_p`` were refused and the CLI refuses ``--seed`` without ``--temperature``."""
    from flash_llm import bundled
    from flash_llm.engine import Engine

    eng = Engine(bundled.load(dtype=torch.float32), max_batch=1, max_seq=16)
    with pytest.raises(ValueError, match=r"generator applies to sampling; set temperature > 0"):
        eng.generate([[1, 2]], 2, generator=torch.Generator())
    out = eng.generate([[1, 2]], 2, temperature=0.5, generator=torch.Generator().manual_seed(0))
    assert out.tokens.shape == (1, 2)

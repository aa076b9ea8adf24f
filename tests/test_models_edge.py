"""The compact models used directly (session 72's bug hunt): torch.compile(fullgraph) with an attention mask and
with the fused ops never run before, a cache attended without a mask refused, and a tied OPT's padding row.  CPU."""

from __future__ import annotations

import warnings

import pytest
import torch

from flash_llm.models import Attend, KVCache, ModelConfig, from_config, set_fused


def _model(family: str, **kw):
    cfg = ModelConfig(family=family, vocab_size=128, hidden_size=64, num_layers=1, num_heads=4,
                      intermediate_size=128, **kw)
    return from_config(cfg, dtype=torch.float32, seed=0).eval()


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_compile_fullgraph_with_an_attention_mask(family):
    """``bool(mask.all())`` was a data-dependent branch fullgraph refused, for every mask (all ones too)."""
    torch._dynamo.reset()
    m = _model(family)
    c = torch.compile(m, fullgraph=True, backend="eager")
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :2] = 0
    with torch.no_grad():
        for mk in (mask, torch.ones_like(mask)):
            got, want = c(ids, attention_mask=mk), m(ids, attention_mask=mk)
            real = mk.bool()
            torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_compile_fullgraph_of_a_fused_model_before_any_eager_forward(family):
    """The fused ops' first call built their compiled copy inside the outer trace (``code.replace``, which dynamo
    cannot trace): under an outer compile they are the eager functions."""
    torch._dynamo.reset()
    m = _model(family)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (no C compiler here: the fused ops fall back, with a warning)
        set_fused(m)
        c = torch.compile(m, fullgraph=True, backend="eager")
        ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            torch.testing.assert_close(c(ids), m(ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family,kv", [("llama", 4), ("llama", 2), ("opt", None)])
def test_a_chunk_attending_a_cache_without_a_mask_is_refused(family, kv):
    """Queries after a cached prefix with ``mask=None``: SDPA's is_causal aligns them with the first keys (wrong
    logits with one kv head a query head, a shape error with groups); now an error that asks for the mask."""
    m = _model(family, **({} if kv is None else {"num_kv_heads": kv}))
    c = m.config
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(2))
    cache = KVCache(c.num_layers, 2, c.num_kv_heads, 16, c.head_dim, torch.float32, "cpu")
    with torch.no_grad():
        full = m(ids)
        m(ids[:, :5], attend=Attend(positions=torch.arange(5).expand(2, 5), cache=cache, slots=torch.arange(5),
                                    kv_len=5))
        with pytest.raises(ValueError, match="pass the mask"):
            m(ids[:, 5:], attend=Attend(positions=torch.arange(5, 8).expand(2, 3), cache=cache,
                                        slots=torch.arange(5, 8), kv_len=8))
        mk = torch.ones(3, 8, dtype=torch.bool).tril(5)[None, None].expand(2, 1, 3, 8)
        q = m(ids[:, 5:], attend=Attend(positions=torch.arange(5, 8).expand(2, 3), mask=mk, cache=cache,
                                        slots=torch.arange(5, 8), kv_len=8))
    torch.testing.assert_close(q, full[:, 5:], rtol=1e-4, atol=1e-4)


def test_a_tied_opts_padding_row_is_zero():
    """The tied head (the embedding's own matrix) was drawn after the embedding's padding row was zeroed."""
    for tie in (True, False):
        m = from_config(ModelConfig(family="opt", vocab_size=128, hidden_size=64, num_layers=1, num_heads=4,
                                    intermediate_size=128, pad_token_id=1, tie_word_embeddings=tie),
                        dtype=torch.float32, seed=0)
        emb = m.input_embeddings()
        assert emb.padding_idx == 1
        assert torch.count_nonzero(emb.weight[1]) == 0
        assert torch.count_nonzero(emb.weight[0]) > 0

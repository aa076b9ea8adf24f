"""flash_llm.evaluate on CPU: the loss equals an independent fp64 cross-entropy over the documented windows,
for fp32 and fp16 models, tensor / .logits / tuple outputs, and a sparsified model; argument errors."""

from __future__ import annotations

import copy
import math
import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import flash_llm
from flash_llm.evaluate import evaluate
from flash_llm.models import from_config
from flash_llm.prune import magnitude_prune_

V = 256


class ToyLM(nn.Module):
    """Embedding + causal running mean + linear head; logits depend on the context, so windows matter."""

    def __init__(self, d=32, wrap=None, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = nn.Embedding(V, d)
        self.head = nn.Linear(d, V)
        with torch.no_grad():
            self.embed.weight.copy_(torch.randn(V, d, generator=g))
            self.head.weight.copy_(torch.randn(V, d, generator=g) * 0.5)
        self.wrap = wrap

    def forward(self, x):
        h = self.embed(x).cumsum(1) / torch.arange(1, x.shape[1] + 1, device=x.device)[:, None]
        logits = self.head(h)
        if self.wrap == "hf":
            return SimpleNamespace(logits=logits)
        if self.wrap == "tuple":
            return (logits, None)
        return logits


def reference_loss(model, tokens, seq_len):
    """Mean fp64 cross-entropy of each window run alone: inputs tokens[s:s+T], targets tokens[s+1:s+T+1]."""
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, tokens.numel() - 1, seq_len):
            x = tokens[s:s + seq_len + 1].long()
            out = model(x[None, :-1])
            logits = out if isinstance(out, torch.Tensor) else (out.logits if hasattr(out, "logits") else out[0])
            logp = torch.log_softmax(logits[0].double(), -1)
            total -= float(logp.gather(1, x[1:, None]).sum())
            count += x.numel() - 1
    return total / count, count


@pytest.mark.parametrize("wrap", [None, "hf", "tuple"])
@pytest.mark.parametrize("n, seq_len, batch_size", [(200, 16, 3), (129, 32, 4), (40, 64, 2), (2, 8, 1)])
def test_matches_fp64_reference(wrap, n, seq_len, batch_size):
    tokens = torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(n), dtype=torch.int64).to(torch.uint8)
    model = ToyLM(wrap=wrap)
    r = evaluate(model, tokens, seq_len=seq_len, batch_size=batch_size, progress=False)
    ref, count = reference_loss(model, tokens, seq_len)
    assert r.tokens == count == n - 1
    assert r.seq_len == seq_len
    assert r.loss == pytest.approx(ref, rel=1e-6)
    assert r.perplexity == pytest.approx(math.exp(ref), rel=1e-6)


def test_max_tokens_and_training_flag():
    tokens = torch.randint(0, V, (500,), generator=torch.Generator().manual_seed(1))
    model = ToyLM().train()
    r = evaluate(model, tokens, seq_len=20, batch_size=8, max_tokens=99, progress=False)
    assert model.training  # restored
    ref, count = reference_loss(model, tokens[:100], 20)
    assert r.tokens == count == 99
    assert r.loss == pytest.approx(ref, rel=1e-6)


def test_fp16_model_accumulates_in_fp32():
    tokens = torch.randint(0, V, (300,), generator=torch.Generator().manual_seed(2))
    model = ToyLM().half()
    r = evaluate(model, tokens, seq_len=50, batch_size=4, progress=False)
    ref, _ = reference_loss(model, tokens, 50)  # fp64 cross-entropy of the same fp16 logits
    assert r.loss == pytest.approx(ref, rel=1e-6)


def _tiny_llama(dtype):
    cfg = {"model_type": "llama", "vocab_size": V, "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 64}
    return from_config(cfg, dtype=dtype, seed=0)


def test_same_code_for_a_sparse_model():
    """A pruned fp16 Llama before and after sparsify_: equal losses up to fp16 rounding of the activations."""
    tokens = torch.randint(0, V, (400,), generator=torch.Generator().manual_seed(3))
    model32 = _tiny_llama(torch.float32)
    magnitude_prune_(model32, 0.6, filter_fn=lambda m, fqn: fqn != "lm_head")
    model16 = copy.deepcopy(model32).half()
    loss32 = evaluate(model32, tokens, seq_len=64, progress=False).loss
    loss16 = evaluate(model16, tokens, seq_len=64, progress=False).loss
    sparse = copy.deepcopy(model16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # lm_head kept dense
        report = flash_llm.sparsify_(sparse)
    assert len(report.converted) == 14
    assert any(isinstance(m, flash_llm.SparseLinear) for m in sparse.modules())
    loss_sparse = evaluate(sparse, tokens, seq_len=64, progress=False).loss
    ref, _ = reference_loss(sparse, tokens, 64)
    assert loss_sparse == pytest.approx(ref, rel=1e-6)
    assert abs(loss_sparse - loss16) <= 2 * abs(loss16 - loss32) + 1e-4


def test_errors():
    tokens = torch.arange(50) % V
    with pytest.raises(TypeError, match="model must be an nn.Module, got function"):
        evaluate(lambda x: x, tokens)
    with pytest.raises(ValueError, match="seq_len must be a positive int, got 0"):
        evaluate(ToyLM(), tokens, seq_len=0)
    with pytest.raises(ValueError, match="batch_size must be a positive int, got -1"):
        evaluate(ToyLM(), tokens, batch_size=-1)
    with pytest.raises(ValueError, match="max_tokens must be a positive int or None, got 0"):
        evaluate(ToyLM(), tokens, max_tokens=0)
    with pytest.raises(ValueError, match="has 1 token"):
        evaluate(ToyLM(), tokens[:1], progress=False)

    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return torch.zeros(x.shape[0], V)

    with pytest.raises(ValueError, match=r"logits of shape \(1, 256\) for input \(1, 49\)"):
        evaluate(Flat(), tokens, seq_len=64, progress=False)

    class Nan(ToyLM):
        def forward(self, x):
            return super().forward(x) * float("nan")

    with pytest.raises(FloatingPointError, match="the loss is nan"):
        evaluate(Nan(), tokens, progress=False)

    class Words(ToyLM):
        def forward(self, x):
            return "logits"

    with pytest.raises(TypeError, match="the model returned str; expected logits"):
        evaluate(Words(), tokens, progress=False)


def test_windows_longer_than_the_context_and_ids_outside_the_vocabulary_are_refused():
    """A model with a config (flash_llm's or transformers') names its context and vocabulary: a longer ``seq_len``
    or an id out of range is refused up front (session 71: an IndexError from the position table, or a Llama
    silently scored past its context)."""
    from conftest import TINY_VOCAB, tiny_hf_model

    hm = tiny_hf_model("opt")
    model = from_config(hm.config, device="meta")
    model.load_state_dict(hm.state_dict(), assign=True)
    tokens = torch.arange(200) % TINY_VOCAB
    ctx = model.config.max_position_embeddings
    for m in (model, hm):
        with pytest.raises(ValueError, match=f"seq_len={ctx + 1} is longer than the model's context "
                                             rf"\(max_position_embeddings={ctx}\)"):
            evaluate(m, tokens, seq_len=ctx + 1, progress=False)
        for bad, shown in ((TINY_VOCAB, TINY_VOCAB), (-1, -1)):
            t = tokens.clone()
            t[7] = bad
            with pytest.raises(ValueError, match=f"token id {shown} is out of range for the model's vocabulary "
                                                 f"of {TINY_VOCAB}"):
                evaluate(m, t, seq_len=16, progress=False)
    assert evaluate(model, tokens, seq_len=ctx, progress=False).tokens == 199

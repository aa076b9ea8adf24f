"""Regression tests of the evaluate/prune bug hunt of session 81: token streams and calibration batches of every
integer dtype (uint16/uint32/uint64 had no min/max for the vocabulary check; uint8 batches crashed in the
embedding), a perplexity that overflows a float, numpy and 0-d tensor integers for the pruners' integer
arguments, and sparsegpt_prune_'s progress bar."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from flash_llm.evaluate import evaluate
from flash_llm.prune import gradual_prune_, magnitude_prune_, owl_sparsities, sparsegpt_prune_, wanda_prune_

V = 50  # vocabulary of the tiny model
INT_DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.uint16, torch.uint32, torch.uint64]


class TinyLM(nn.Module):
    """Token ids ``[B, T]`` -> logits ``[B, T, V]``, with a transformers-like ``config``."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.config = SimpleNamespace(vocab_size=V, max_position_embeddings=64)
        self.emb = nn.Embedding(V, 16)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, V)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(self.emb(x))))


def _stream(n=301, seed=3):
    return torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(seed))


def _calib(seed=4):
    return torch.randint(0, V, (4, 12), generator=torch.Generator().manual_seed(seed))


def _lm_loss(out, batch):
    return nn.functional.cross_entropy(out[:, :-1].reshape(-1, V), batch[:, 1:].reshape(-1))


def _weights(model):
    return [m.weight.detach().clone() for m in (model.fc1, model.fc2)]


# ---- 1. every integer dtype of a token stream -------------------------------------------------------------

@pytest.mark.parametrize("dtype", INT_DTYPES, ids=str)
def test_evaluate_takes_a_stream_of_any_integer_dtype(dtype):
    tokens = _stream()
    ref = evaluate(TinyLM(), tokens, seq_len=16, progress=False)
    got = evaluate(TinyLM(), tokens.to(dtype), seq_len=16, progress=False)
    assert got == ref


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64], ids=str)
def test_out_of_vocabulary_ids_of_wide_unsigned_dtypes_are_named(dtype):
    tokens = _stream()
    tokens[7] = 1000
    with pytest.raises(ValueError, match="token id 1000 is out of range for the model's vocabulary of 50"):
        evaluate(TinyLM(), tokens.to(dtype), seq_len=16, progress=False)
    with pytest.raises(ValueError, match=r"calib: token id 1000 is out of range"):
        wanda_prune_(TinyLM(), tokens[:240].reshape(4, 60).to(dtype), 0.5)


def test_uint64_ids_of_2_to_the_63_and_above_are_named_as_they_are():
    big = 2**63 + 5  # (negative when read as int64)
    tokens = torch.tensor([1, 2, 3, 4], dtype=torch.int64)
    tokens[2] = -(2**64 - big)
    tokens = tokens.view(torch.uint64)
    with pytest.raises(ValueError, match=f"token id {big} is out of range"):
        evaluate(TinyLM(), tokens, seq_len=2, progress=False)
    only_big = torch.full((3,), -(2**64 - big), dtype=torch.int64).view(torch.uint64)
    with pytest.raises(ValueError, match=f"token id {big} is out of range"):
        evaluate(TinyLM(), only_big, seq_len=2, progress=False)


# ---- 5. integer calibration batches of any dtype reach the model as int64 ------------------------------------

def _one_shot(name, model, calib):
    if name == "wanda":
        return wanda_prune_(model, calib, 0.5)
    if name == "sparsegpt":
        return sparsegpt_prune_(model, calib, 0.5, blocksize=8)
    if name == "magnitude":
        return magnitude_prune_(model, 0.5, calib=calib)
    return owl_sparsities(model, calib, 0.5)


@pytest.mark.parametrize("name", ["wanda", "sparsegpt", "magnitude", "owl"])
@pytest.mark.parametrize("dtype", INT_DTYPES, ids=str)
def test_one_shot_pruners_take_calibration_ids_of_any_integer_dtype(name, dtype):
    calib = _calib()
    ref_model, model = TinyLM(), TinyLM()
    ref = _one_shot(name, ref_model, calib)
    got = _one_shot(name, model, [calib[:2].to(dtype), calib[2:].to(dtype)])
    if name == "owl":
        assert got == ref
    else:
        assert [(p.fqn, p.sparsity) for p in got] == [(p.fqn, p.sparsity) for p in ref]
        assert all(torch.equal(a, b) for a, b in zip(_weights(model), _weights(ref_model)))


def test_float_calibration_batches_are_passed_as_they_are():
    seen = []
    model = nn.Sequential(nn.Linear(8, 8))
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    wanda_prune_(model, [torch.randn(4, 8), torch.randn(2, 3, 8)], 0.5)
    assert seen and set(seen) == {torch.float32}


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32, torch.uint16], ids=str)
def test_gradual_prune_takes_token_batches_of_any_integer_dtype(dtype):
    batches = [_calib(seed=s) for s in range(3)]
    seen = []

    def loss_fn(out, batch):
        seen.append(batch.dtype)
        return _lm_loss(out, batch)

    ref_model, model = TinyLM(), TinyLM()
    ref = gradual_prune_(ref_model, batches, 0.5, steps=4, frequency=1, loss_fn=_lm_loss, progress=False)
    got = gradual_prune_(model, [b.to(dtype) for b in batches], 0.5, steps=4, frequency=1, loss_fn=loss_fn,
                         progress=False)
    assert set(seen) == {torch.int64}
    assert got.losses == ref.losses
    assert all(torch.equal(a, b) for a, b in zip(_weights(model), _weights(ref_model)))


# ---- 2. a loss whose exp overflows a float ------------------------------------------------------------------

class _Confident(nn.Module):
    """Predicts the input token again with a margin of ``margin`` nats (so every target but a repeat costs it)."""

    def __init__(self, margin):
        super().__init__()
        self.emb = nn.Embedding(8, 8)
        with torch.no_grad():
            self.emb.weight.copy_(torch.eye(8) * margin)

    def forward(self, x):
        return self.emb(x)


def test_perplexity_is_inf_when_exp_of_the_loss_overflows():
    tokens = torch.tensor([1, 2, 3, 4, 5, 6])
    result = evaluate(_Confident(1000.0), tokens, seq_len=4, progress=False)
    assert math.isfinite(result.loss) and result.loss == pytest.approx(1000.0)
    assert result.perplexity == math.inf
    assert "perplexity inf" in str(result)
    below = evaluate(_Confident(700.0), tokens, seq_len=4, progress=False)
    assert below.perplexity == pytest.approx(math.exp(below.loss)) and math.isfinite(below.perplexity)


# ---- 4. numpy and 0-d tensor integers for the pruners' integer arguments ----------------------------------

INTS = [np.int64, np.int32, np.uint8, lambda v: torch.tensor(v), lambda v: torch.tensor(v, dtype=torch.int32)]


@pytest.mark.parametrize("wrap", INTS, ids=["np.int64", "np.int32", "np.uint8", "tensor", "tensor-int32"])
def test_gradual_prune_takes_numpy_and_0d_tensor_integers(wrap):
    batches = [_calib(seed=s) for s in range(2)]
    args = dict(steps=6, begin=1, end=5, frequency=2)
    ref = gradual_prune_(TinyLM(), batches, 0.5, loss_fn=_lm_loss, progress=False, **args)
    for key in args:
        got = gradual_prune_(TinyLM(), batches, 0.5, loss_fn=_lm_loss, progress=False,
                             **{**args, key: wrap(args[key])})
        assert got.schedule == ref.schedule and got.losses == ref.losses
        assert all(type(t) is int for t, _ in got.schedule)
    # end's default is computed from the converted steps and begin
    got = gradual_prune_(TinyLM(), batches, 0.5, loss_fn=_lm_loss, progress=False, steps=wrap(8), begin=wrap(0))
    assert [t for t, _ in got.schedule] == [0, 6] and all(type(t) is int for t, _ in got.schedule)


@pytest.mark.parametrize("wrap", INTS, ids=["np.int64", "np.int32", "np.uint8", "tensor", "tensor-int32"])
def test_sparsegpt_takes_a_numpy_or_0d_tensor_blocksize(wrap):
    calib = _calib()
    ref_model, model = TinyLM(), TinyLM()
    sparsegpt_prune_(ref_model, calib, 0.5, blocksize=8)
    sparsegpt_prune_(model, calib, 0.5, blocksize=wrap(8))
    assert all(torch.equal(a, b) for a, b in zip(_weights(model), _weights(ref_model)))


@pytest.mark.parametrize("bad", [True, np.True_, torch.tensor(True), 2.0, np.float64(2.0), torch.tensor([2]), "2",
                                 0, np.int64(0), torch.tensor(-1)], ids=repr)
def test_bools_and_non_integers_are_still_refused(bad):
    batches = [_calib()]
    for key in ("steps", "frequency"):
        with pytest.raises(ValueError, match=f"{key} must be an int >= 1"):
            gradual_prune_(TinyLM(), batches, 0.5, loss_fn=_lm_loss, progress=False, **{"steps": 4, key: bad})
    with pytest.raises(ValueError, match="blocksize must be a positive int"):
        sparsegpt_prune_(TinyLM(), _calib(), 0.5, blocksize=bad)
    if not (isinstance(bad, (int, np.integer)) and not isinstance(bad, (bool, np.bool_)) and bad == 0):
        for key in ("begin", "end"):
            with pytest.raises(ValueError, match=f"{key} must be an int >= 0"):
                gradual_prune_(TinyLM(), batches, 0.5, loss_fn=_lm_loss, progress=False, **{"steps": 4, key: bad})


# ---- 7. sparsegpt_prune_'s progress bar ----------------------------------------------------------------------

def test_sparsegpt_progress_false_writes_nothing_to_stderr(capsys):
    sparsegpt_prune_(TinyLM(), _calib(), 0.5, blocksize=8, progress=False)
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""
    sparsegpt_prune_(TinyLM(), _calib(), 0.5, blocksize=8)  # progress=True is the default
    captured = capsys.readouterr()
    assert "sparsegpt" in captured.err and captured.out == ""


def test_progress_is_keyword_only():
    with pytest.raises(TypeError):
        sparsegpt_prune_(TinyLM(), _calib(), 0.5, 8, 0.01, None, False)

"""Regression tests of the pruning fixes of session 85 (a read-only bug hunt, then this fixer):

1. `flash-llm prune --method gradual` skipped the token-id check of the one-shot methods: demo._NextToken wrapped the
   model without its ``config``, so calibration ids >= vocab_size ended in a bare IndexError traceback from the
   embedding instead of exit status 2 with "token id ... is out of range for the model's vocabulary of V".
2. gradual_prune_ revived a layer's existing zeros (its first mask update, at initial_sparsity 0, kept every weight,
   and training made the old zeros nonzero), so continuing to prune an already pruned model discarded its mask; now
   the weights zero at the start stay zero and the schedule's sparsity is a floor on top of them.
3. sparsegpt_prune_ checked only the first of its two Cholesky factorizations: a failure of the second (of H^-1) was a
   bare torch.linalg.LinAlgError without the layer's name or the "raise percdamp" advice.
4. The `--method gradual --verbose` report named the layers with the wrapper's ``model.`` prefix
   (``model.model.layers.0...``), names the model itself cannot resolve.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import flash_llm.prune as P
from flash_llm import demo
import test_demo
from test_demo import run

calib_file = test_demo.calib_file  # (a fixture)


def _mse_to(target):
    return lambda out, b: (out - target[:out.shape[0]]).square().mean()


# ---- 1. gradual: out-of-vocabulary calibration ids refused like the one-shot methods ------------------------------
class _TinyLM(nn.Module):
    """A token-id model with a ``config.vocab_size`` (as flash-llm's and transformers' models have)."""

    def __init__(self, vocab=32):
        super().__init__()
        torch.manual_seed(0)
        self.config = SimpleNamespace(vocab_size=vocab)
        self.embed = nn.Embedding(vocab, 16)
        self.proj = nn.Linear(16, 16)
        self.lm_head = nn.Linear(16, vocab)

    def forward(self, x):
        return self.lm_head(torch.relu(self.proj(self.embed(x))))


def _next_token_loss(logits, batch):
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def test_next_token_wrapper_lets_gradual_prune_check_the_token_ids():
    model = _TinyLM(vocab=32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [torch.randint(0, 32, (2, 9)) for _ in range(3)]
    batches[1][0, 4] = 40  # beyond the vocabulary: the embedding would raise a bare IndexError
    with pytest.raises(ValueError, match=r"^batches\[1\]: token id 40 is out of range for the model's vocabulary of "
                                         r"32"):
        P.gradual_prune_(demo._NextToken(model), batches, 0.5, steps=2, loss_fn=_next_token_loss, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # refused before any change


def test_gradual_helper_refuses_out_of_vocabulary_calibration_tokens():
    model = _TinyLM(vocab=32)
    tokens = torch.randint(0, 32, (400,))
    tokens[123] = 32
    with pytest.raises(ValueError, match=r"^calib: token id 32 is out of range for the model's vocabulary of 32; "
                                         r"calib must hold token ids of the model's tokenizer"):
        demo._gradual(model, tokens, 0.5, steps=2, batch_size=2, seq_len=8, lr=1e-3, seed=0)


@pytest.fixture
def small_vocab(monkeypatch):
    """`flash-llm prune` loads the bundled model with ``config.vocab_size`` 100: the text's letters (bytes 100 and up)
    are then out of its vocabulary, as a tokenizer that emits ids beyond a checkpoint's vocab_size gives."""
    real = demo.load_model

    def load(*args, **kwargs):
        lm = real(*args, **kwargs)
        lm.model.config.vocab_size = 100
        return lm

    monkeypatch.setattr(demo, "load_model", load)


@pytest.mark.parametrize("method, extra", [("gradual", ["--steps", "1"]), ("wanda", ["--calib-seqs", "2"])])
def test_prune_cli_refuses_out_of_vocabulary_calibration_with_status_2(capsys, tmp_path, calib_file, small_vocab,
                                                                      method, extra):
    out = tmp_path / "out"
    rc, _, err = run(capsys, "prune", "tiny-shakespeare", "--method", method, "--sparsity", "0.5", "--calib",
                     str(calib_file), "--out", str(out), "--seq-len", "16", "--batch-size", "2", "--device", "cpu",
                     *extra)
    assert rc == 2, err
    assert ("is out of range for the model's vocabulary of 100; calib must hold token ids of the model's "
            "tokenizer") in err
    assert "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == ["calib.txt"]  # nothing written


# ---- 2. gradual: the zeros a layer had stay zero -------------------------------------------------------------------
def _half_pruned(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 8))
    P.magnitude_prune_(m, 0.5, filter_fn=lambda mod, fqn: fqn == "0")  # layer 0 at 50 % zeros: the "checkpoint"
    return m


@pytest.mark.parametrize("begin, initial", [(0, 0.0), (5, 0.0), (0, 0.3)])
def test_gradual_keeps_the_zeros_a_layer_had_at_every_step(begin, initial):
    m = _half_pruned()
    z0 = (m[0].weight == 0).clone()
    X, Y = torch.randn(64, 32), torch.randn(64, 8)
    batches = [X[i:i + 8] for i in range(0, 64, 8)]
    revived = []

    def loss_fn(out, b):
        revived.append(int((z0 & (m[0].weight != 0)).sum()))  # seen by every step's forward
        return (out - Y[:out.shape[0]]).square().mean()

    P.gradual_prune_(m, batches, 0.6, steps=40, begin=begin, initial_sparsity=initial, loss_fn=loss_fn, lr=1e-2,
                     frequency=10, filter_fn=lambda mod, fqn: fqn == "0", progress=False)
    w = m[0].weight.detach()
    assert revived and max(revived) == 0
    assert not bool((z0 & (w != 0)).any())
    assert int((w == 0).sum()) == round(0.6 * w.numel())  # the schedule's count, on top of the old zeros


def test_gradual_below_the_existing_sparsity_keeps_exactly_the_old_zeros():
    m = _half_pruned()
    z0 = (m[0].weight == 0).clone()
    X = torch.randn(16, 32)
    report = P.gradual_prune_(m, [X[:8], X[8:]], 0.25, steps=6, loss_fn=_mse_to(torch.randn(16, 8)), lr=1e-2,
                              frequency=2, filter_fn=lambda mod, fqn: fqn == "0", progress=False)
    w = m[0].weight.detach()
    assert torch.equal(w == 0, z0)  # max(count, zeros it had) = the zeros it had, the same ones
    assert report.layers[0].sparsity == pytest.approx(0.5)


def test_gradual_on_a_dense_layer_still_prunes_to_the_schedule():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 8))
    X = torch.randn(16, 32)
    P.gradual_prune_(m, [X[:8], X[8:]], 0.5, steps=8, loss_fn=_mse_to(torch.randn(16, 8)), lr=1e-2, frequency=2,
                     progress=False)
    for lin in (m[0], m[2]):
        assert int((lin.weight == 0).sum()) == round(0.5 * lin.weight.numel())


# ---- 3. SparseGPT: the second Cholesky factorization is checked too ----------------------------------------------
def test_sparsegpt_failing_inverse_factorization_is_a_valueerror_naming_the_layer():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 16))
    # 3 tokens: rank-3 Hessians of 64 inputs; percdamp 1e-15 passes the first factorization.  (3 sequences of one
    # token: H = 2/3 X^T X, bit for bit the Hessian this test was written for before session 88 counted sequences)
    x = torch.randn(3, 1, 64)
    before = [p.detach().clone() for p in model.parameters()]
    # (which layer's inverse fails first is rounding: 0 here, 1 under the GPU image's torch 2.11; the model is restored
    # either way)
    with pytest.raises(ValueError, match=r"^[01]\.weight: the inverse of the dampened Hessian is not positive "
                                         r"definite \(Cholesky failed at column \d+\); raise percdamp \(now 1e-15\)"):
        P.sparsegpt_prune_(model, x, 0.5, percdamp=1e-15, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_sparsegpt_second_factorization_failing_on_a_later_layer_restores_the_model(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    before = [p.detach().clone() for p in model.parameters()]
    real, calls = torch.cholesky_inverse, []

    def inverse(L, *args, **kwargs):  # the second layer's H^-1 comes out indefinite (as rounding can make it)
        calls.append(1)
        out = real(L, *args, **kwargs)
        return -out if len(calls) == 2 else out

    monkeypatch.setattr(torch, "cholesky_inverse", inverse)
    with pytest.raises(ValueError, match=r"^2\.weight: the inverse of the dampened Hessian is not positive definite "
                                         r"\(Cholesky failed at column 1\); raise percdamp \(now 0\.01\) .*\(the model "
                                         r"is unchanged: the 1 layer\(s\) already pruned got their original weights"):
        P.sparsegpt_prune_(model, torch.randn(4, 8, 16), 0.5, blocksize=8, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


# ---- 4. gradual: the report names the model's own layers ----------------------------------------------------------
def test_gradual_helper_report_names_resolve_in_the_model():
    model = _TinyLM(vocab=32)
    report = demo._gradual(model, torch.randint(0, 32, (400,)), 0.5, steps=2, batch_size=2, seq_len=8, lr=1e-3,
                           seed=0)
    assert [p.fqn for p in report] == ["proj"]
    assert model.get_submodule(report.layers[0].fqn) is model.proj


def test_prune_cli_gradual_verbose_prints_the_models_layer_names(capsys, tmp_path, calib_file):
    rc, out, err = run(capsys, "prune", "tiny-shakespeare", "--method", "gradual", "--sparsity", "0.5", "--calib",
                       str(calib_file), "--out", str(tmp_path / "out"), "--steps", "1", "--seq-len", "16",
                       "--batch-size", "1", "--device", "cpu", "--verbose")
    assert rc == 0, err
    assert "model.layers.0.self_attn.q_proj" in out
    assert "model.model." not in out

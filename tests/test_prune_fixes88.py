"""Regression tests of the pruning items of session 88 (fixer):

1. SparseGPT normalised each layer's Hessian per calibration token (``H = 2/N_tokens X^T X``); the reference code
   (IST-DASLab/sparsegpt, ``sparsegpt.py`` ``add_batch``) normalises per sequence (``2/nsamples``, ``nsamples``
   counting the dims before ``T`` of each ``[B, T, K]`` input; a 2-D ``[T, K]`` input is unsqueezed to one sequence).
   Without dead inputs the scale cancels, but an input that is zero on every calibration token gets ``H_jj = 1``
   before the damping ``percdamp * mean(diag H)`` is taken, so the per-token scale (``T`` times smaller live
   diagonal) damped the live columns more than the reference: other weights on the live columns (up to 0.016 in the
   hunt's repro) and, with small activations, another mask.  Session 87's test (tests/test_prune_fixes87.py) built
   its "reference" with the same per-token scale, so it could not see this.  Now ``H = 2/S X^T X`` over the ``S``
   calibration sequences: the live columns are a float64 port of the reference's ``add_batch`` + ``fasterprune``,
   for one ``[S, T]`` batch, several batches, 2-D ``[T, K]`` inputs and more leading dims alike; without dead inputs
   the masks and weights are those of the per-token normalisation to rounding.
2. The one-shot pruners (``wanda_prune_``, ``sparsegpt_prune_``, ``magnitude_prune_(calib=)``, ``owl_sparsities``)
   given a dict / ``BatchEncoding`` as ``calib`` refused it, as documented, but with ``calib[0] must be a tensor, got
   str`` (the dict's first key, from ``list(calib)``).  Now a TypeError names ``calib`` and the type and suggests
   ``calib['input_ids']``, as ``gradual_prune_`` names its dict ``batches`` since session 87.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import flash_llm.prune as P


# ---- 1. SparseGPT: H normalised per calibration sequence, as the reference -----------------------------------------
def _reference(w: torch.Tensor, seqs: list[torch.Tensor], n: int, percdamp: float = 0.01) -> torch.Tensor:
    """The reference code in float64: ``add_batch`` called once per sequence (``opt.py`` / ``llama.py`` feed
    ``inps[j].unsqueeze(0)``), its running average of ``H`` verbatim, then ``fasterprune`` on one block with exactly
    ``n`` zeros chosen by ``w^2 / [H^-1]_jj^2`` (stable ties)."""
    k = w.shape[1]
    h = torch.zeros(k, k, dtype=torch.float64)
    nsamples = 0
    for s in seqs:
        inp = s.double()
        if inp.dim() == 2:
            inp = inp.unsqueeze(0)
        tmp = inp.shape[0]
        inp = inp.reshape(-1, k).t()
        h *= nsamples / (nsamples + tmp)
        nsamples += tmp
        inp = math.sqrt(2 / nsamples) * inp
        h += inp @ inp.t()
    w = w.clone().double()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += percdamp * torch.mean(torch.diag(h)) * torch.eye(k, dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    score = w.square() / torch.diag(hinv).square()[None]
    mask = torch.zeros(w.numel(), dtype=torch.bool)
    mask[torch.sort(score.flatten(), stable=True).indices[:n]] = True
    mask = mask.view_as(w)
    q = torch.zeros_like(w)
    for i in range(k):
        qi = w[:, i].masked_fill(mask[:, i], 0.0)
        q[:, i] = qi
        err = (w[:, i] - qi) / hinv[i, i]
        w[:, i:] -= err[:, None] @ hinv[i, i:][None]
    return q


def _case(seed: int = 0, n_seqs: int = 8, t: int = 64, scale: float = 0.02, dead=(1, 5, 9, 14)):
    g = torch.Generator().manual_seed(seed)
    m, k = 8, 16
    w = torch.randn(m, k, generator=g, dtype=torch.float64)
    x = torch.randn(n_seqs, t, k, generator=g, dtype=torch.float64) * scale  # small, post-ReLU-like activations
    x[..., list(dead)] = 0
    live = [j for j in range(k) if j not in dead]
    return w, x, list(dead), live


def _ours(w: torch.Tensor, calib, n: int, dtype=torch.float64) -> tuple[torch.Tensor, P.PruneReport]:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
    report = P.sparsegpt_prune_(lin, calib, n / w.numel(), blocksize=128, percdamp=0.01, progress=False)
    return lin.weight.detach(), report


_CALIBS = {
    "one [8, T] batch": lambda x: x,
    "four [2, T] batches": lambda x: list(x.split(2)),
    "eight 2-D [T, K] inputs": lambda x: list(x.unbind(0)),
    "one [2, 4, T] batch": lambda x: x.reshape(2, 4, *x.shape[1:]),
}


@pytest.mark.parametrize("form", list(_CALIBS))
def test_sparsegpt_dead_inputs_give_the_reference_add_batch_weights(form):
    w, x, dead, live = _case()
    n = len(dead) * w.shape[0] + 30  # every dead weight, then 30 live ones
    ours, _ = _ours(w, _CALIBS[form](x), n)
    ref = _reference(w, list(x.unbind(0)), n)
    assert int((ours == 0).sum()) == int((ref == 0).sum()) == n
    assert bool((ours[:, dead] == 0).all())
    assert torch.equal(ours == 0, ref == 0)
    # (per token, the live columns were up to 0.016 off here: their damping T = 64 times too large a share)
    torch.testing.assert_close(ours[:, live], ref[:, live], rtol=1e-9, atol=1e-12)


def test_sparsegpt_dead_inputs_scale_matters_and_is_per_sequence():
    """The same tokens cut into more, shorter sequences give another ``S`` and so (with dead inputs) other live
    weights, in ours as in the reference: the count is of sequences, not of tokens or of batches."""
    w, x, dead, live = _case(seed=1)
    n = len(dead) * w.shape[0] + 30
    short = x.reshape(32, 16, x.shape[-1])  # the same 512 tokens as 32 sequences of 16
    ours_long, _ = _ours(w, x, n)
    ours_short, _ = _ours(w, short, n)
    torch.testing.assert_close(ours_short[:, live], _reference(w, list(short.unbind(0)), n)[:, live],
                               rtol=1e-9, atol=1e-12)
    assert float((ours_long[:, live] - ours_short[:, live]).abs().max()) > 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparsegpt_without_dead_inputs_is_unchanged(dtype):
    """No dead input: the per-sequence scale cancels, so the masks are those of the per-token normalisation of
    sessions up to 87 (``_sparsegpt_layer`` given ``2/N_tokens X^T X``) and the weights equal to rounding; the
    reported error (a ratio) is the relative reconstruction error on the calibration tokens."""
    w, x, _, _ = _case(seed=2, n_seqs=4, t=32, scale=1.0, dead=())
    n = 60
    ours, report = _ours(w.to(dtype), list(x.to(dtype).split(2)), n, dtype)
    X = x.to(dtype).reshape(-1, x.shape[-1]).double()
    per_token, err = P._sparsegpt_layer(w.to(dtype), 2.0 / X.shape[0] * X.t() @ X, n / w.numel(), 128, 0.01, "w")
    assert torch.equal(ours == 0, per_token == 0) and int((ours == 0).sum()) == n
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(ours, per_token, rtol=tol, atol=tol)
    w0 = w.to(dtype).double()
    direct = float((X @ (w0 - ours.double()).t()).square().sum() / (X @ w0.t()).square().sum())
    assert report.layers[0].error == pytest.approx(err, rel=1e-9)
    assert report.layers[0].error == pytest.approx(direct, rel=1e-6)


def test_sequences_count():
    """Sequences of a calibration batch: features ``[..., T, K]`` (floating point) and token ids ``[..., T]``."""
    assert P._sequences(torch.zeros(3, 5, 4)) == 3
    assert P._sequences(torch.zeros(2, 3, 5, 4)) == 6
    assert P._sequences(torch.zeros(5, 4)) == 1  # (the reference's unsqueeze(0))
    assert P._sequences(torch.zeros(4)) == 1
    assert P._sequences(torch.zeros(3, 5, dtype=torch.long)) == 3  # (token ids [B, T])
    assert P._sequences(torch.zeros(2, 3, 5, dtype=torch.long)) == 6
    assert P._sequences(torch.zeros(5, dtype=torch.int32)) == 1


class _Flattening(nn.Module):
    """A layer fed ``x.reshape(-1, K)``: as transformers' OPT feeds ``fc1`` / ``fc2`` ``[B T, K]``."""

    def __init__(self, w):
        super().__init__()
        self.lin = nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype)
        with torch.no_grad():
            self.lin.weight.copy_(w)

    def forward(self, x):
        return self.lin(x.reshape(-1, x.shape[-1]))


def test_sparsegpt_counts_the_batches_sequences_not_the_layers_input_rows():
    """A layer whose input the model flattens to ``[B T, K]`` (the session's review: counted from that input, one
    ``[4, T]`` batch was 1 sequence and four ``[1, T]`` batches 4, so ``fc2``'s weights depended on the batching)
    gets ``S = B`` as every other layer: the same weights for any batching, the reference's (one sequence a call)."""
    w, x, dead, live = _case(seed=3, n_seqs=4)
    n = len(dead) * w.shape[0] + 30
    out = []
    for calib in (x, list(x.split(1)), list(x.split(2))):
        model = _Flattening(w)
        P.sparsegpt_prune_(model, calib, n / w.numel(), blocksize=128, percdamp=0.01, progress=False)
        out.append(model.lin.weight.detach())
    ref = _reference(w, list(x.unbind(0)), n)
    for got in out:
        assert torch.equal(got == 0, ref == 0)
        torch.testing.assert_close(got[:, live], ref[:, live], rtol=1e-9, atol=1e-12)


# ---- 2. a dict / BatchEncoding as calib: a clear TypeError ----------------------------------------------------------
def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))


_ENTRY_POINTS = {
    "wanda_prune_": lambda m, c: P.wanda_prune_(m, c, 0.5),
    "sparsegpt_prune_": lambda m, c: P.sparsegpt_prune_(m, c, 0.5, progress=False),
    "magnitude_prune_(calib=)": lambda m, c: P.magnitude_prune_(m, 0.5, calib=c),
    "owl_sparsities": lambda m, c: P.owl_sparsities(m, c, 0.5),
}


@pytest.mark.parametrize("entry", list(_ENTRY_POINTS))
def test_dict_calib_refused_with_a_clear_error(entry):
    model = _mlp()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(TypeError) as e:
        _ENTRY_POINTS[entry](model, {"input_ids": torch.randn(4, 8), "attention_mask": torch.ones(4, 8)})
    msg = str(e.value)
    assert msg.startswith("calib must be a tensor or a sequence of tensors") and "got a dict" in msg
    assert "calib['input_ids']" in msg and "calib[0]" not in msg  # (was "calib[0] must be a tensor, got str")
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


@pytest.mark.parametrize("entry", list(_ENTRY_POINTS))
def test_batch_encoding_calib_refused_with_a_clear_error(entry):
    transformers = pytest.importorskip("transformers")
    enc = transformers.BatchEncoding({"input_ids": torch.randn(4, 8)})
    with pytest.raises(TypeError, match=r"got a BatchEncoding: .*calib\['input_ids'\]"):
        _ENTRY_POINTS[entry](_mlp(), enc)


def test_list_of_dicts_calib_names_the_batch():
    with pytest.raises(TypeError, match=r"calib\[1\] must be a tensor, got dict: .*calib\[1\]\['input_ids'\]"):
        P.wanda_prune_(_mlp(), [torch.randn(4, 8), {"input_ids": torch.randn(4, 8)}], 0.5)

"""Regression tests of the pruning items of session 87 (fixer):

1. SparseGPT's handling of dead inputs (zero on every calibration token) was suspected of over-damping.  Checked, not
   a bug: ``_sparsegpt_layer`` does what the reference code (Frantar & Alistarh 2023, ``fasterprune``) does -- dead
   inputs get ``H_jj = 1`` and the damping is ``percdamp * mean(diag H)`` taken after that, so the dead inputs' 1s
   are in the mean -- and gives the reference's weights on the live columns.  The dead inputs do change the live
   columns' damping (and with small activations the mask), but so does the reference: these tests pin both facts.
   (Session 88: that held only for ``_sparsegpt_layer`` given the same ``H``.  ``sparsegpt_prune_`` normalised ``H``
   per calibration token, the reference per sequence (``add_batch``: ``2/nsamples``, ``nsamples`` counting the
   sequences), so with dead inputs its live columns were damped more than the reference's; this test's
   ``_reference`` shared the per-token scale and could not see it.  Now both normalise per sequence and ``_ours``
   runs ``sparsegpt_prune_`` itself: tests/test_prune_fixes88.py.)
   (Where ours differs on purpose: a dead weight beyond the block's share of zeros is kept rather than zeroed; it
   has no effect on the calibration outputs.)
2. gradual_prune_'s progress bar showed the schedule's target as ``sparsity`` ("0" before the first update), not the
   sparsity the masks hold: an already pruned model's zeros, the per-layer rounding and the one-weight cap were
   invisible (a model 33 % sparse at the start showed 0, then 0.263 where it held 0.417).  Now ``sparsity`` is the
   zeros the masks hold over the pruned layers' weights (counted as the masks are made, no pass over the weights),
   and ``target`` the schedule's value.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import flash_llm.prune as P


# ---- 1. SparseGPT with dead inputs: the reference algorithm, bit for bit on the live columns ---------------------
def _reference(w: torch.Tensor, x: torch.Tensor, n: int, percdamp: float) -> torch.Tensor:
    """The reference ``fasterprune`` in float64, one block, exactly ``n`` zeros chosen by ``w^2 / [H^-1]_jj^2``
    (stable ties): dead inputs get ``H_jj = 1`` and ``W[:, j] = 0``, then ``percdamp * mean(diag H)`` is added.
    ``H`` is the reference's ``add_batch`` one: ``2/nsamples * sum x x^T`` with ``nsamples`` counting sequences, so
    the 2-D ``x [T, K]`` here (unsqueezed to ``[1, T, K]`` by the reference) is one sequence: ``H = 2 X^T X``
    (session 88; the port is ``test_prune_fixes88._reference``)."""
    from test_prune_fixes88 import _reference as reference

    return reference(w, [x], n, percdamp)


def _dead_case(scale: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    m, k = 8, 16
    w = torch.randn(m, k, generator=g, dtype=torch.float64)
    x = torch.randn(64, k, generator=g, dtype=torch.float64) * scale
    dead = [1, 5, 9, 14]
    x[:, dead] = 0
    live = [j for j in range(k) if j not in dead]
    return w, x, dead, live


def _ours(w, x, n):
    """``sparsegpt_prune_`` itself on a float64 layer of weight ``w`` calibrated on ``x`` (its own H, session 88)."""
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(w)
    P.sparsegpt_prune_(lin, x, n / w.numel(), blocksize=128, percdamp=0.01, progress=False)
    return lin.weight.detach()


@pytest.mark.parametrize("scale", [1.0, 0.01])
def test_sparsegpt_dead_inputs_match_the_reference(scale):
    w, x, dead, live = _dead_case(scale)
    n = len(dead) * w.shape[0] + 30  # every dead weight, then 30 live ones
    ours, ref = _ours(w, x, n), _reference(w, x, n, 0.01)
    assert int((ours == 0).sum()) == int((ref == 0).sum()) == n
    assert bool((ours[:, dead] == 0).all())
    torch.testing.assert_close(ours[:, live], ref[:, live], rtol=1e-9, atol=1e-12)


def test_sparsegpt_dead_inputs_raise_the_live_damping_as_the_reference_does():
    """Dropping the dead columns changes the live result (their 1s leave the mean of diag H) in ours and in the
    reference alike: the sensitivity is the published algorithm's, not a difference of ours."""
    w, x, dead, live = _dead_case(0.01)
    n_live = 30
    with_dead = _ours(w, x, len(dead) * w.shape[0] + n_live)[:, live]
    without = _ours(w[:, live].contiguous(), x[:, live].contiguous(), n_live)
    ref_without = _reference(w[:, live], x[:, live], n_live, 0.01)
    torch.testing.assert_close(without, ref_without, rtol=1e-9, atol=1e-12)
    assert (with_dead - without).abs().max() > 1e-3  # (0.011 here: H's live diagonal ~1e-2 against the dead 1s)


# ---- 2. gradual_prune_'s bar: the sparsity the masks hold, and the schedule's target --------------------------
class _Bar:
    """A stand-in for tqdm that records every ``set_postfix``."""

    posts: list[dict] = []

    def __init__(self, it, **kw):
        self.it = it

    def __iter__(self):
        return iter(self.it)

    def set_postfix(self, **kw):
        _Bar.posts.append(kw)

    def close(self):
        pass


def _zeros(model):
    return sum(int((m.weight == 0).sum()) for m in model if isinstance(m, nn.Linear))


def test_gradual_progress_shows_the_sparsity_reached(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))  # 64 + 32 weights
    with torch.no_grad():
        model[0].weight[:, :4] = 0  # already pruned: 32 of layer 0's 64
    reached = []
    loss = lambda out, b: (reached.append(_zeros(model) / 96), out.square().mean())[1]  # noqa: E731
    monkeypatch.setattr(P, "tqdm", _Bar)
    _Bar.posts = []
    report = P.gradual_prune_(model, [torch.randn(16, 8)], 0.3, steps=6, begin=2, end=4, frequency=1, loss_fn=loss)
    assert [s for _, s in report.schedule] == pytest.approx([0.0, 0.2625, 0.3])
    # the masks' zeros: 32 from the start (a floor on top of the schedule), then 32 + round(0.2625 * 32) = 40, then
    # 32 + round(0.3 * 32) = 42 (layer 0's max(round(s * 64), 32) stays 32)
    assert [p["sparsity"] for p in _Bar.posts] == [f"{z / 96:.3f}" for z in (32, 32, 32, 40, 42, 42)]
    assert [p["sparsity"] for p in _Bar.posts] == [f"{r:.3f}" for r in reached]  # what the model held at each step
    assert [p["target"] for p in _Bar.posts] == ["0", "0", "0.000", "0.263", "0.300", "0.300"]
    assert report.layers[0].sparsity == 0.5 and report.layers[1].sparsity == 10 / 32


def test_gradual_progress_counts_rounding_and_the_one_weight_cap(monkeypatch):
    """Tiny layers: round(0.9 * 2) = 2 is capped at 1 (a layer keeps one weight), round(0.9 * 3) = 3 at 2."""
    model = nn.Sequential(nn.Linear(2, 1, bias=False), nn.Linear(1, 3, bias=False))
    monkeypatch.setattr(P, "tqdm", _Bar)
    _Bar.posts = []
    P.gradual_prune_(model, [torch.randn(4, 2)], 0.9, steps=2, begin=0, end=0,
                     loss_fn=lambda out, b: out.square().mean())
    assert _zeros(model) == 3
    assert [p["sparsity"] for p in _Bar.posts] == [f"{3 / 5:.3f}"] * 2  # (was the target, "0.900")
    assert [p["target"] for p in _Bar.posts] == ["0.900"] * 2


"""Regression tests of the prune bug hunt of session 83: a weight that cannot be written in place (an inference tensor,
an expanded weight) was found only at the write, leaving the earlier layers pruned, and SparseGPT's restore began with
the layer whose write had failed (so it failed again and restored nothing); float64 weights were ranked and updated
in fp32 (ties of distinct magnitudes, extra zeros, every weight rounded by SparseGPT at sparsity 0); evaluate summed
each batch's cross-entropy in fp32, so the loss depended on batch_size."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from flash_llm.evaluate import evaluate
from flash_llm.prune import gradual_prune_, magnitude_prune_, owl_sparsities, sparsegpt_prune_, wanda_prune_

PRUNERS = {
    "magnitude": lambda model, x: magnitude_prune_(model, 0.5),
    "wanda": lambda model, x: wanda_prune_(model, x, 0.5),
    "sparsegpt": lambda model, x: sparsegpt_prune_(model, x, 0.5, progress=False),
}


def _mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))


# ---- 1. weights that cannot be written in place are refused up front; SparseGPT restores every written layer ------
@pytest.mark.parametrize("method", sorted(PRUNERS))
def test_an_inference_tensor_weight_is_refused_before_any_layer_is_modified(method):
    model = _mlp(1)
    with torch.inference_mode():  # e.g. a layer replaced inside an inference_mode block
        model[2] = nn.Linear(16, 16)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"^2\.weight is an inference tensor .*torch\.inference_mode\(\)"):
        PRUNERS[method](model, torch.randn(4, 16))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    # inside inference mode the weight can be written: pruned as usual; owl_sparsities only reads it (not refused)
    assert set(owl_sparsities(model, torch.randn(4, 16), 0.5)) == {"0", "2", "4"}
    with torch.inference_mode():
        report = PRUNERS[method](model, torch.randn(4, 16))
    assert [layer.sparsity for layer in report] == [0.5, 0.5, 0.5]


@pytest.mark.parametrize("method", sorted(PRUNERS))
def test_an_expanded_weight_is_refused_before_any_layer_is_modified(method):
    model = _mlp(2)
    model[2].weight = nn.Parameter(torch.randn(1, 16).expand(16, 16))  # one row's memory shared by all 16
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"^2\.weight has elements sharing memory \(an expanded tensor"):
        PRUNERS[method](model, torch.randn(4, 16))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    model[2].weight = nn.Parameter(model[2].weight.detach().clone())  # the advice: a clone is pruned exactly
    PRUNERS[method](model, torch.randn(4, 16))
    assert int((model[2].weight == 0).sum()) == 128


class _Unwritable(torch.Tensor):
    """A weight whose in-place copy fails (a failure the up-front checks cannot foresee)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.Tensor.copy_:
            raise RuntimeError("this weight cannot be written")
        return super().__torch_function__(func, types, args, kwargs or {})


def test_sparsegpt_restores_the_earlier_layers_when_a_write_fails():
    model = _mlp(3)
    model[4].weight = nn.Parameter(torch.randn(8, 16).as_subclass(_Unwritable))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="this weight cannot be written"):
        sparsegpt_prune_(model, torch.randn(32, 16), 0.5, progress=False)
    # layers 0 and 2 were pruned and written before layer 4 failed; they have their original weights back
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


# ---- 2. float64 weights are ranked and updated in fp64 ----------------------------------------------------------
def _linear64(rows):
    w = torch.tensor(rows, dtype=torch.float64)
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False).double()
    with torch.no_grad():
        lin.weight.copy_(w)
    return lin


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_magnitude_ranks_float64_weights_in_fp64(scope):
    g = torch.Generator().manual_seed(4)
    scale = 10.0 ** -float(torch.randint(46, 300, (), generator=g))  # nonzero in fp64, 0 in fp32
    lin = _linear64([[scale, 0.0, 1.0, 2.0]])
    r = magnitude_prune_(lin, 0.25, scope=scope)  # n = 1: the zero it had is enough
    assert lin.weight.tolist() == [[scale, 0.0, 1.0, 2.0]] and r[0].sparsity == 0.25
    eps = float(torch.rand((), generator=g, dtype=torch.float64)) * 1e-10 + 1e-13  # below fp32's precision
    lin = _linear64([[1.0 + eps, 1.0, 3.0, -(1.0 + eps / 2)]])
    magnitude_prune_(lin, 0.5, scope=scope)
    assert lin.weight.tolist() == [[1.0 + eps, 0.0, 3.0, 0.0]]  # the two smallest |w|, not the lowest indices


def test_gradual_prune_ranks_float64_weights_in_fp64():
    eps = float(torch.rand((), dtype=torch.float64)) * 1e-10 + 1e-13
    net = nn.Sequential(_linear64([[1.0 + eps, 1.0]]))
    gradual_prune_(net, [torch.zeros(1, 2, dtype=torch.float64)], 0.5, steps=1, begin=1, end=1,
                   loss_fn=lambda out, batch: out.sum() * 0, progress=False)  # no training effect, one mask update
    assert net[0].weight.tolist() == [[1.0 + eps, 0.0]]


def test_wanda_ranks_float64_weights_in_fp64():
    eps = float(torch.rand((), dtype=torch.float64)) * 1e-10 + 1e-13
    lin = _linear64([[1.0 + eps, 1.0, 5.0], [2.0, 2.0 + eps, 5.0]])
    wanda_prune_(lin, torch.ones(3, 3, dtype=torch.float64), 1 / 3)  # equal input norms: the smaller |w| of each row
    assert lin.weight.tolist() == [[1.0 + eps, 0.0, 5.0], [0.0, 2.0 + eps, 5.0]]


def test_sparsegpt_updates_float64_weights_in_fp64():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 8)).double()
    with torch.no_grad():  # weights that fp32 cannot hold exactly
        for m in (model[0], model[2]):
            m.weight.copy_(torch.randn(m.weight.shape, dtype=torch.float64) / 4)
    assert not torch.equal(model[0].weight, model[0].weight.float().double())
    x = torch.randn(64, 24, dtype=torch.float64)
    before = [m.weight.detach().clone() for m in (model[0], model[2])]
    r = sparsegpt_prune_(model, x, {"0": 0.0, "2": 0.5}, progress=False)  # layer 0: nothing to prune or update
    assert torch.equal(model[0].weight, before[0]) and r[0].error == 0.0
    assert int((model[2].weight == 0).sum()) == 64 and model[2].weight.dtype == torch.float64
    # the update is the fp64 one: layer 2's weights are not all fp32-representable
    assert not torch.equal(model[2].weight, model[2].weight.float().double())


# ---- 3. evaluate sums the per-token losses in fp64: the loss does not depend on batch_size -----------------------
class _Bigram(nn.Module):
    def __init__(self, vocab):
        super().__init__()
        self.table = nn.Embedding(vocab, vocab)

    def forward(self, x):
        return self.table(x) * 3  # each token's logits independent of the batch's shape


def test_evaluate_sums_the_token_losses_in_fp64():
    torch.manual_seed(6)
    vocab = 128
    model = _Bigram(vocab)
    tokens = torch.randint(0, vocab, (6000,))
    with torch.no_grad():
        nll = nn.functional.cross_entropy(model(tokens[:-1]).float(), tokens[1:], reduction="none")
    ref = float(nll.double().sum()) / (tokens.numel() - 1)
    losses = [evaluate(model, tokens, seq_len=64, batch_size=b, progress=False).loss for b in (1, 7, 100)]
    assert all(abs(v - ref) <= 1e-13 * ref for v in losses), [v - ref for v in losses]


# ---- 3. (review) a weight whose elements overlap through non-zero strides is refused too ------------------------
@pytest.mark.parametrize("method", sorted(PRUNERS))
def test_a_weight_of_overlapping_strides_is_refused_before_any_layer_is_modified(method):
    """``as_strided`` rows that overlap (row stride below the row's 16 elements; torch's own in-place check cannot
    tell): a zero written into one weight was written into others, so the layer got more zeros than requested and
    the earlier layers were pruned.  A non-overlapping strided weight (every other column of a wider tensor) is
    pruned as usual."""
    seed = int.from_bytes(os.urandom(4), "little")
    g = torch.Generator().manual_seed(seed)
    model = _mlp(seed % 2**31)
    a = int(torch.randint(1, 16, (), generator=g))  # (16 rows of 16 over 15 * a + 16 floats)
    model[2].weight = nn.Parameter(torch.randn(15 * a + 16, generator=g).as_strided((16, 16), (a, 1)))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"^2\.weight has elements sharing memory \(overlapping strides, stride "
                                         rf"\({a}, 1\)\)"):
        PRUNERS[method](model, torch.randn(4, 16, generator=g))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before)), seed
    model[2].weight = nn.Parameter(torch.randn(16, 32, generator=g)[:, ::2])  # (strides (32, 2): no overlap)
    PRUNERS[method](model, torch.randn(4, 16, generator=g))
    assert int((model[2].weight == 0).sum()) == 128, seed

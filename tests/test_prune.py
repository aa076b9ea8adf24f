"""flash_llm.prune on CPU: exact sparsity of every pruner, masks, errors against an independent
computation, quality orderings (SparseGPT and Wanda beat magnitude where they should), argument
errors, filter_fn, and a pruned model through sparsify_."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import flash_llm
from flash_llm.prune import PruneReport, magnitude_prune_, sparsegpt_prune_, wanda_prune_
from conftest import max_abs_err, ulp

D, VOCAB = 64, 97


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d, bias=False)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


class ToyLM(nn.Module):
    """Embedding, two attention-free MLP blocks, LM head: five nn.Linear layers."""

    def __init__(self, d=D, vocab=VOCAB, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([Block(d), Block(d)])
        self.lm_head = nn.Linear(d, vocab)
        with torch.no_grad():  # layers of different scales: global magnitude then prunes them unequally
            self.blocks[1].fc1.weight.mul_(3.0)
            self.lm_head.weight.mul_(0.5)

    def forward(self, tokens):
        x = self.embed(tokens)
        for b in self.blocks:
            x = b(x)
        return self.lm_head(x)


LINEARS = ["blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2", "lm_head"]


def _calib(n=3, b=4, t=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (b, t), generator=g) for _ in range(n)]


def _linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def _zeros(w):
    return int((w == 0).sum())


PRUNERS = {
    "magnitude": lambda m, c, s, **kw: magnitude_prune_(m, s, calib=c, **kw),
    "magnitude-global": lambda m, c, s, **kw: magnitude_prune_(m, s, scope="global", calib=c, **kw),
    "wanda": lambda m, c, s, **kw: wanda_prune_(m, c, s, **kw),
    "sparsegpt": lambda m, c, s, **kw: sparsegpt_prune_(m, c, s, blocksize=24, **kw),
}


def _expected_zeros(method, w, s):
    m, k = w.shape
    return m * round(s * k) if method == "wanda" else round(s * m * k)


# ---------------------------------------------------------------------------------------------------
# exact sparsity and masks
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sparsity", [0.0, 0.01, 0.5, 0.73, 0.95])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_exact_sparsity_per_layer(method, sparsity):
    model, calib = ToyLM(), _calib()
    before = {n: m.weight.detach().clone() for n, m in _linears(model).items()}
    report = PRUNERS[method](model, calib, sparsity)
    assert isinstance(report, PruneReport) and sorted(p.fqn for p in report) == sorted(LINEARS)
    for p in report:
        w = _linears(model)[p.fqn].weight.detach()
        assert _zeros(w) == _expected_zeros(method, w, sparsity), p.fqn
        assert p.shape == tuple(w.shape) and p.sparsity == _zeros(w) / w.numel()
        assert p.error is not None and 0.0 <= p.error < 1.5
        if method == "wanda":  # every row the same count
            assert ((w == 0).sum(1) == round(sparsity * w.shape[1])).all()
        if method != "sparsegpt":  # no update: kept weights unchanged, pruned ones exact zeros
            kept = w != 0
            assert torch.equal(w[kept], before[p.fqn][kept])
        if sparsity == 0.0:
            assert p.error == 0.0 and (method == "sparsegpt" or torch.equal(w, before[p.fqn]))


def test_magnitude_prunes_the_smallest():
    model = ToyLM()
    before = {n: m.weight.detach().abs().clone() for n, m in _linears(model).items()}
    report = magnitude_prune_(model, 0.6)
    assert all(p.error is None for p in report)  # no calib, no error
    for n, m in _linears(model).items():
        pruned = m.weight.detach() == 0
        assert before[n][pruned].max() <= before[n][~pruned].min()


def test_magnitude_global_one_threshold():
    model = ToyLM()
    before = {n: m.weight.detach().abs().clone() for n, m in _linears(model).items()}
    total = sum(w.numel() for w in before.values())
    report = magnitude_prune_(model, 0.5, scope="global")
    ws = {n: m.weight.detach() for n, m in _linears(model).items()}
    assert sum(_zeros(w) for w in ws.values()) == round(0.5 * total)
    assert report.sparsity == pytest.approx(round(0.5 * total) / total)
    pruned_max = max(float(before[n][ws[n] == 0].max()) for n in ws)
    kept_min = min(float(before[n][ws[n] != 0].min()) for n in ws)
    assert pruned_max <= kept_min
    per_layer = {p.fqn: p.sparsity for p in report}
    assert per_layer["blocks.1.fc1"] < 0.2 < 0.5 < per_layer["lm_head"]  # scaled 3x / 0.5x


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_magnitude_ties_are_deterministic(scope):
    model = nn.Sequential(nn.Linear(8, 4, bias=False), nn.Linear(4, 3, bias=False))
    with torch.no_grad():
        for m in model:
            m.weight.fill_(1.0)
    magnitude_prune_(model, 0.75, scope=scope)
    w0, w1 = model[0].weight.detach().reshape(-1), model[1].weight.detach().reshape(-1)
    if scope == "layer":  # the lower flat indices go first
        assert torch.equal(w0 == 0, torch.arange(32) < 24) and torch.equal(w1 == 0, torch.arange(12) < 9)
    else:  # 33 of 44: the first layer entirely, then the first one of the second
        assert bool((w0 == 0).all()) and torch.equal(w1 == 0, torch.arange(12) < 1)


def test_existing_zeros_are_pruned_first():
    lin = nn.Linear(10, 10, bias=False)
    with torch.no_grad():
        lin.weight[:, :7] = 0
    magnitude_prune_(lin, 0.5)
    assert _zeros(lin.weight) == 70  # more zeros than asked stay zeros
    assert magnitude_prune_(lin, 0.5)[0].sparsity == 0.7


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", ["magnitude", "magnitude-global", "wanda", "sparsegpt"])
def test_half_precision_weights(method, dtype):
    model, calib = ToyLM().to(dtype), _calib()
    before = {n: m.weight.detach().clone() for n, m in _linears(model).items()}
    total = sum(w.numel() for w in before.values())
    report = PRUNERS[method](model, calib, 0.6)
    ws = {n: m.weight.detach() for n, m in _linears(model).items()}
    assert all(w.dtype == dtype for w in ws.values())
    if method == "magnitude-global":
        assert sum(_zeros(w) for w in ws.values()) == round(0.6 * total)
    else:
        for n, w in ws.items():
            assert _zeros(w) == _expected_zeros(method, w, 0.6), n
    assert all(math.isfinite(p.error) for p in report)


def test_sparsegpt_keeps_tiny_kept_weights_nonzero_in_fp16():
    """Kept weights that the update shrinks below fp16's range must not add zeros."""
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(64, 16, bias=False).half()
    with torch.no_grad():
        lin.weight.copy_((torch.randn(16, 64, generator=g) * 1e-6).half())
    x = torch.randn(256, 64, generator=g)
    sparsegpt_prune_(lin, x.half(), 0.5)
    assert _zeros(lin.weight) == 16 * 32


def test_sparsegpt_dead_inputs_and_partial_blocks():
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(50, 7)
    x = torch.randn(200, 50, generator=g)
    x[:, [3, 17, 49]] = 0  # inputs never active
    report = sparsegpt_prune_(lin, x, 0.37, blocksize=16)
    assert _zeros(lin.weight) == round(0.37 * 350)
    assert torch.isfinite(lin.weight).all() and math.isfinite(report[0].error)


# ---------------------------------------------------------------------------------------------------
# reconstruction error: reported values and quality orderings
# ---------------------------------------------------------------------------------------------------
def _rel_err(w0, w, x):
    x = x.double()
    return float((x @ (w0.double() - w.double()).t()).square().sum() / (x @ w0.double().t()).square().sum())


def _single_linear(seed=0):
    torch.manual_seed(seed)
    return nn.Linear(64, 32)


def _correlated_inputs(n=512, k=64, rank=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, rank, generator=g) @ torch.randn(rank, k, generator=g) + 0.05 * torch.randn(n, k, generator=g)


def _channel_scaled_inputs(n=512, k=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    scales = 10.0 ** (4 * torch.rand(k, generator=g) - 2)  # 0.01 .. 100 per input channel
    return torch.randn(n, k, generator=g) * scales


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_reported_error_matches_an_independent_computation(method):
    lin, x = _single_linear(), _correlated_inputs()
    w0 = lin.weight.detach().clone()
    report = PRUNERS[method](lin, [x[:200], x[200:]], 0.5)
    assert report[0].fqn == "" and report[0].error == pytest.approx(_rel_err(w0, lin.weight.detach(), x), rel=1e-4)


def test_sparsegpt_beats_magnitude_on_correlated_inputs():
    x = _correlated_inputs()
    mag, sgpt = _single_linear(), _single_linear()
    e_mag = magnitude_prune_(mag, 0.5, calib=x)[0].error
    e_sgpt = sparsegpt_prune_(sgpt, x, 0.5)[0].error
    assert e_sgpt < 0.2 * e_mag, (e_sgpt, e_mag)


def test_wanda_beats_magnitude_when_input_scales_vary():
    x = _channel_scaled_inputs()
    mag, wanda = _single_linear(), _single_linear()
    e_mag = magnitude_prune_(mag, 0.5, calib=x)[0].error
    e_wanda = wanda_prune_(wanda, x, 0.5)[0].error
    assert e_wanda < 0.5 * e_mag, (e_wanda, e_mag)


def test_sparsegpt_prunes_in_forward_order_on_pruned_activations():
    """Each layer's error is on the inputs of the already pruned layers before it: pruning only the
    last layer gives the same error as measured in the full run only for the first layer."""
    model, calib = ToyLM(), _calib()
    full = {p.fqn: p.error for p in sparsegpt_prune_(copy.deepcopy(model), calib, 0.5)}
    assert list(full) == LINEARS
    alone = sparsegpt_prune_(copy.deepcopy(model), calib, 0.5, filter_fn=lambda m, n: n == "blocks.0.fc1")
    assert alone[0].error == pytest.approx(full["blocks.0.fc1"], rel=1e-6)
    alone = sparsegpt_prune_(copy.deepcopy(model), calib, 0.5, filter_fn=lambda m, n: n == "lm_head")
    assert alone[0].error != pytest.approx(full["lm_head"], rel=1e-3)


def test_calib_as_one_tensor_or_a_list_gives_the_same_wanda_masks():
    model_a, model_b = ToyLM(), ToyLM()
    calib = _calib()
    wanda_prune_(model_a, torch.cat(calib), 0.5)
    wanda_prune_(model_b, calib, 0.5)
    for (n, a), b in zip(_linears(model_a).items(), _linears(model_b).values()):
        assert torch.equal(a.weight == 0, b.weight == 0), n


def test_training_flag_restored():
    model = ToyLM().train()
    wanda_prune_(model, _calib(), 0.5)
    assert model.training
    model.eval()
    sparsegpt_prune_(model, _calib(), 0.5)
    assert not model.training


# ---------------------------------------------------------------------------------------------------
# arguments
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, float("nan"), True, "0.5", None])
@pytest.mark.parametrize("method", list(PRUNERS))
def test_bad_sparsity(method, sparsity):
    model = ToyLM()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"sparsity must be a number in \[0, 1\)"):
        PRUNERS[method](model, _calib(), sparsity)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("calib", [[], (), torch.zeros(0, 16, dtype=torch.long), [torch.zeros(0, 8, dtype=torch.long)]],
                         ids=["list", "tuple", "empty-tensor", "list-of-empty"])
@pytest.mark.parametrize("method", list(PRUNERS))
def test_empty_calib(method, calib):
    with pytest.raises(ValueError, match="calib is empty"):
        PRUNERS[method](ToyLM(), calib, 0.5)


def test_calib_of_the_wrong_type():
    with pytest.raises(TypeError, match=r"calib\[1\] must be a tensor"):
        wanda_prune_(ToyLM(), [torch.zeros(1, 4, dtype=torch.long), "tokens"], 0.5)


@pytest.mark.parametrize("method", list(PRUNERS))
def test_no_linear(method):
    model = nn.Sequential(nn.Embedding(10, 8), nn.ReLU())
    with pytest.raises(ValueError, match="model has no nn.Linear layer to prune$"):
        PRUNERS[method](model, _calib(), 0.5)
    with pytest.raises(ValueError, match="model has no nn.Linear layer to prune that filter_fn accepts"):
        PRUNERS[method](ToyLM(), _calib(), 0.5, filter_fn=lambda m, n: False)


def test_bad_options():
    with pytest.raises(ValueError, match="scope must be 'layer' or 'global', got 'row'"):
        magnitude_prune_(ToyLM(), 0.5, scope="row")
    with pytest.raises(ValueError, match="blocksize must be a positive int, got 0"):
        sparsegpt_prune_(ToyLM(), _calib(), 0.5, blocksize=0)
    with pytest.raises(ValueError, match="percdamp must be a positive number, got -0.1"):
        sparsegpt_prune_(ToyLM(), _calib(), 0.5, percdamp=-0.1)


def test_sparsegpt_without_dampening_on_rank_deficient_inputs():
    lin = _single_linear()
    with pytest.raises(ValueError, match="raise percdamp"):
        sparsegpt_prune_(lin, _correlated_inputs(n=8), 0.5, percdamp=1e-30)


@pytest.mark.parametrize("method", list(PRUNERS))
def test_tied_weight_refused(method):
    model = ToyLM(vocab=D)
    model.lm_head.weight = model.embed.weight
    with pytest.raises(ValueError, match=r"lm_head.weight shares memory with embed.weight \(tied weights\)"):
        PRUNERS[method](model, _calib(), 0.5)
    PRUNERS[method](model, [torch.randint(0, D, (2, 8))], 0.5, filter_fn=lambda m, n: n != "lm_head")


def test_layer_not_called_by_the_model():
    model = ToyLM()
    model.unused = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="'unused' received no input"):
        wanda_prune_(model, _calib(), 0.5)


# ---------------------------------------------------------------------------------------------------
# filter_fn and sparsify_
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", list(PRUNERS))
def test_filter_fn_honoured(method):
    model, calib = ToyLM(), _calib()
    head = model.lm_head.weight.detach().clone()
    seen = []

    def keep(module, fqn):
        seen.append((fqn, type(module)))
        return fqn != "lm_head"

    report = PRUNERS[method](model, calib, 0.5, filter_fn=keep)
    assert sorted(seen) == sorted((n, nn.Linear) for n in LINEARS)
    assert [p.fqn for p in report] == LINEARS[:-1]
    assert torch.equal(model.lm_head.weight, head)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", list(PRUNERS))
def test_pruned_model_through_sparsify(method, dtype):
    model, calib = ToyLM().to(dtype), _calib()
    PRUNERS[method](model, calib, 0.5)
    dense = copy.deepcopy(model)
    ref64 = copy.deepcopy(model).double()
    report = flash_llm.sparsify_(model, flash_llm.SparsifyConfig(min_sparsity=0.0, skip_names=()))
    assert sorted(c.fqn for c in report.converted) == sorted(LINEARS)
    x = _calib(n=1, seed=9)[0]
    with torch.no_grad():
        y, y_dense, y64 = model(x), dense(x), ref64(x)
    err, err_torch = max_abs_err(y, y64), max_abs_err(y_dense, y64)
    assert err <= 2 * err_torch + ulp(dtype, float(y64.abs().max())), (err, err_torch)

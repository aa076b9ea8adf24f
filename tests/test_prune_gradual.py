"""flash_llm.prune on CPU: OWL layerwise sparsities, per-layer (dict) targets for Wanda and SparseGPT,
and gradual magnitude pruning with fine-tuning (cubic schedule, fixed masks, distillation, errors)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from flash_llm.prune import (GradualPruneReport, gradual_prune_, magnitude_prune_, owl_sparsities,
                             sparsegpt_prune_, wanda_prune_)

VOCAB, D = 32, 64


# ---- OWL and dict targets ------------------------------------------------------------------------------

class Stack(nn.Module):
    """Embedding and three nn.Linear layers of different sizes."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(VOCAB, D)
        self.a = nn.Linear(D, 2 * D)
        self.b = nn.Linear(2 * D, D)
        self.c = nn.Linear(D, VOCAB)

    def forward(self, tokens):
        return self.c(torch.relu(self.b(torch.relu(self.a(self.embed(tokens))))))


def _calib(n=2, b=4, t=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (b, t), generator=g) for _ in range(n)]


def _weighted_mean(model, sp):
    sizes = {n: m.weight.numel() for n, m in model.named_modules() if n in sp}
    return sum(sp[n] * sizes[n] for n in sp) / sum(sizes.values())


def _plant_outliers(layer, frac=0.03, scale=40.0, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sel = torch.rand(layer.weight.shape, generator=g) < frac
        layer.weight[sel] *= scale


@pytest.mark.parametrize("target", [0.0, 0.5, 0.8, 0.95])
def test_owl_weighted_mean_and_outlier_layer_gets_fewer_zeros(target):
    model = Stack()
    _plant_outliers(model.b)
    sp = owl_sparsities(model, _calib(), target)
    assert list(sp) == ["a", "b", "c"]
    assert _weighted_mean(model, sp) == pytest.approx(target, abs=1e-12)
    assert all(0.0 <= v < 1.0 for v in sp.values())
    if target == 0.0:  # a weighted mean of 0 within [0, 1) leaves only all zeros
        assert sp == {"a": 0.0, "b": 0.0, "c": 0.0}
        return
    assert sp["b"] < sp["a"] and sp["b"] < sp["c"]
    if target == 0.5:  # unclipped: exactly lam apart between the extreme layers
        assert max(sp.values()) - min(sp.values()) == pytest.approx(2 * 0.08, abs=1e-12)


def test_owl_clips_and_keeps_the_mean():
    model = Stack()
    _plant_outliers(model.b)
    sp = owl_sparsities(model, _calib(), 0.1, lam=0.5)
    assert sp["b"] == 0.0  # clipped at 0, the others shifted down to keep the mean
    assert _weighted_mean(model, sp) == pytest.approx(0.1, abs=1e-12)


def test_owl_equal_layers_get_the_target_and_model_is_unchanged():
    model = Stack()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sp = owl_sparsities(model, _calib(), 0.6, lam=0.0, filter_fn=lambda m, n: n != "c")
    assert sp == {"a": pytest.approx(0.6), "b": pytest.approx(0.6)}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_owl_errors():
    model = Stack()
    with pytest.raises(ValueError, match=r"sparsity must be a number in \[0, 1\)"):
        owl_sparsities(model, _calib(), 1.0)
    with pytest.raises(ValueError, match="M .* must be a positive number, got 0"):
        owl_sparsities(model, _calib(), 0.5, M=0)
    with pytest.raises(ValueError, match=r"lam must be a number in \[0, 1\], got -0.1"):
        owl_sparsities(model, _calib(), 0.5, lam=-0.1)
    with pytest.raises(ValueError, match="calib is empty"):
        owl_sparsities(model, [], 0.5)


def test_wanda_and_sparsegpt_hit_each_layers_own_target():
    base = Stack()
    _plant_outliers(base.b)
    targets = owl_sparsities(base, _calib(), 0.6, lam=0.2)
    for name in ("wanda", "sparsegpt"):
        model = copy.deepcopy(base)
        if name == "wanda":
            report = wanda_prune_(model, _calib(), targets)
        else:
            report = sparsegpt_prune_(model, _calib(), targets, blocksize=24)
        assert report.target == pytest.approx(0.6)
        for fqn, s in targets.items():
            w = dict(model.named_modules())[fqn].weight
            m, k = w.shape
            if name == "wanda":
                assert ((w == 0).sum(1) == round(s * k)).all(), fqn
            else:
                assert int((w == 0).sum()) == round(s * m * k), fqn


def test_dict_equal_to_a_float_gives_the_same_result():
    for prune in (wanda_prune_, lambda m, c, s: sparsegpt_prune_(m, c, s, blocksize=24)):
        m1, m2 = Stack(), Stack()
        prune(m1, _calib(), 0.5)
        prune(m2, _calib(), {"a": 0.5, "b": 0.5, "c": 0.5})
        assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))


@pytest.mark.parametrize("prune", [wanda_prune_, sparsegpt_prune_])
def test_dict_target_errors(prune):
    with pytest.raises(ValueError, match=r"key\(s\) \['z'\] that are not selected"):
        prune(Stack(), _calib(), {"a": 0.5, "b": 0.5, "c": 0.5, "z": 0.5})
    with pytest.raises(ValueError, match=r"no target for layer\(s\) \['c'\]"):
        prune(Stack(), _calib(), {"a": 0.5, "b": 0.5})
    with pytest.raises(ValueError, match=r"sparsity\['b'\]: sparsity must be a number in \[0, 1\)"):
        prune(Stack(), _calib(), {"a": 0.5, "b": 1.5, "c": 0.5})
    prune(Stack(), _calib(), {"a": 0.5, "b": 0.5}, filter_fn=lambda m, n: n != "c")  # filtered: fine


# ---- gradual pruning -------------------------------------------------------------------------------------

class TinyLM(nn.Module):
    """Byte-level toy: embedding 64, two nn.Linear layers, vocab 32."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(VOCAB, D)
        self.fc = nn.Linear(D, D)
        self.head = nn.Linear(D, VOCAB)

    def forward(self, tokens):
        return self.head(torch.relu(self.fc(self.embed(tokens))))


def _data(n=8, b=16, t=12, seed=3):
    """Sequences where next token = (token + 1) % 32."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, VOCAB, (n, b, 1), generator=g)
    return list((starts + torch.arange(t)) % VOCAB)


def lm_loss(logits, batch):
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), batch[:, 1:].reshape(-1))


def _eval_loss(model, data):
    with torch.no_grad():
        return sum(float(lm_loss(model(b), b)) for b in data) / len(data)


def _trained(steps=40):
    model = TinyLM()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    data = _data()
    for i in range(steps):
        b = data[i % len(data)]
        opt.zero_grad()
        lm_loss(model(b), b).backward()
        opt.step()
    return model


def test_gradual_exact_final_sparsity_fixed_zeros_monotone_schedule_and_loss_decreases():
    model = TinyLM()
    zero_sets: list[dict[str, torch.Tensor]] = []

    def snapshot(module, args):  # before every forward: the zeros the training step starts from
        zero_sets.append({n: (m.weight == 0).clone() for n, m in module.named_modules() if isinstance(m, nn.Linear)})

    handle = model.register_forward_pre_hook(snapshot)
    report = gradual_prune_(model, _data(), 0.8, steps=120, loss_fn=lm_loss, lr=1e-2, begin=10, end=70,
                            frequency=7, progress=False)
    handle.remove()
    assert isinstance(report, GradualPruneReport) and report.method == "gradual"
    for layer in report:
        assert layer.sparsity == round(0.8 * layer.shape[0] * layer.shape[1]) / (layer.shape[0] * layer.shape[1])
    for fqn in ("fc", "head"):
        w = dict(model.named_modules())[fqn].weight
        assert int((w == 0).sum()) == round(0.8 * w.numel())
    steps_, sps = zip(*report.schedule)
    assert steps_ == (10, 17, 24, 31, 38, 45, 52, 59, 66, 70)
    assert sps[0] == 0.0 and sps[-1] == 0.8 and all(a < b for a, b in zip(sps, sps[1:]))
    assert sps[3] == pytest.approx(0.8 - 0.8 * (1 - 21 / 60) ** 3)
    # zeros never revive: each step's zero set contains the previous one, and between mask updates it
    # is exactly the mask of the last update
    assert len(zero_sets) == 120
    for prev, cur in zip(zero_sets, zero_sets[1:]):
        for n in prev:
            assert bool((cur[n] | ~prev[n]).all()), n
    upd = dict(report.schedule)
    for t, zs in enumerate(zero_sets):
        last = max([s for s in upd if s <= t], default=None)
        for n, z in zs.items():
            expected = 0 if last is None else round(upd[last] * z.numel())
            assert int(z.sum()) == expected, (t, n)
    first, final = sum(report.losses[:10]) / 10, sum(report.losses[-10:]) / 10
    assert math.isfinite(final) and final < 0.5 * first


def test_gradual_beats_one_shot_magnitude_at_80_percent():
    dense = _trained()
    data = _data()
    one_shot = copy.deepcopy(dense)
    magnitude_prune_(one_shot, 0.8)
    gradual = copy.deepcopy(dense)
    torch.manual_seed(0)
    gradual_prune_(gradual, data, 0.8, steps=100, loss_fn=lm_loss, lr=3e-3, frequency=5, progress=False)
    for m in (one_shot, gradual):
        assert all(int((m.get_submodule(n).weight == 0).sum()) == round(0.8 * m.get_submodule(n).weight.numel())
                   for n in ("fc", "head"))
    l_one, l_grad, l_dense = _eval_loss(one_shot, data), _eval_loss(gradual, data), _eval_loss(dense, data)
    assert l_grad < l_one, (l_grad, l_one, l_dense)


def test_gradual_with_distillation_and_end_at_steps():
    dense = _trained(20)
    teacher = copy.deepcopy(dense)
    teacher.train()
    model = copy.deepcopy(dense)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    report = gradual_prune_(model, _data(n=3), 0.5, steps=30, loss_fn=lm_loss, optimizer=opt, end=30,
                            frequency=10, initial_sparsity=0.2, teacher=teacher, distill_weight=0.5,
                            filter_fn=lambda m, n: n == "fc", progress=False)
    assert all(math.isfinite(v) for v in report.losses) and len(report.losses) == 30
    assert [t for t, _ in report.schedule] == [0, 10, 20, 30] and report.schedule[0][1] == pytest.approx(0.2)
    assert [p.fqn for p in report] == ["fc"] and report[0].sparsity == round(0.5 * D * D) / (D * D)
    assert int((model.head.weight == 0).sum()) == 0
    assert teacher.training and model.training  # flags restored
    assert all(torch.equal(p, q) for p, q in zip(teacher.parameters(), dense.parameters()))  # teacher untouched


def test_gradual_accepts_one_tensor_and_default_end():
    model = TinyLM()
    report = gradual_prune_(model, _data(n=1)[0], 0.5, steps=8, loss_fn=lm_loss, frequency=2, progress=False)
    assert [t for t, _ in report.schedule] == [0, 2, 4, 6]  # default end = 3 * 8 // 4 = 6
    assert report.sparsity == pytest.approx(0.5, abs=1e-3)


def _gp(model=None, **kw):
    args = dict(steps=4, loss_fn=lm_loss, progress=False)
    args.update(kw)
    return gradual_prune_(model if model is not None else TinyLM(), args.pop("batches", _data(n=2)),
                          args.pop("final", 0.5), **args)


def test_gradual_errors():
    with pytest.raises(ValueError, match=r"sparsity must be a number in \[0, 1\)"):
        _gp(final=1.0)
    with pytest.raises(ValueError, match=r"initial_sparsity \(0.6\) must not exceed final_sparsity \(0.5\)"):
        _gp(initial_sparsity=0.6)
    with pytest.raises(ValueError, match="steps must be an int >= 1, got 0"):
        _gp(steps=0)
    with pytest.raises(ValueError, match="frequency must be an int >= 1, got 0"):
        _gp(frequency=0)
    with pytest.raises(ValueError, match="need 0 <= begin <= end <= steps, got begin=0, end=5, steps=4"):
        _gp(end=5)
    with pytest.raises(ValueError, match="begin=3, end=2"):
        _gp(begin=3, end=2)
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        _gp(loss_fn=None)
    with pytest.raises(ValueError, match="distill_weight is 0.5 but no teacher is given"):
        _gp(distill_weight=0.5)
    with pytest.raises(ValueError, match="teacher is given but distill_weight is 0"):
        _gp(teacher=TinyLM())
    model = TinyLM()
    with pytest.raises(ValueError, match="teacher is model itself"):
        _gp(model, teacher=model, distill_weight=1.0)
    with pytest.raises(TypeError, match=r"model has torch.float16 parameters \(e.g. 'embed.weight'\).*model.float\(\)"):
        _gp(TinyLM().half())
    with pytest.raises(ValueError, match="lr must be a positive number, got -1"):
        _gp(lr=-1)
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        _gp(optimizer="adam")
    with pytest.raises(TypeError, match=r"loss_fn must return a scalar tensor, got \(16, 11, 32\)"):
        _gp(loss_fn=lambda out, b: out[:, :-1])
    with pytest.raises(ValueError, match="batches is empty"):
        _gp(batches=[])
    with pytest.raises(TypeError, match=r"batches is a one-shot iterator \(list_iterator\).*pass a re-iterable"):
        _gp(batches=iter(_data(n=2)))

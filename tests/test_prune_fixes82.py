"""Regression tests of the prune bug hunt of session 82: SparseGPT wrote Inf into fp16 weights that its update pushed
past 65504; gradual_prune_ with a teacher whose logits hold NaN/Inf pruned the model before refusing the loss (and
blamed the learning rate); disjoint views of one storage (q, k, v split from a fused weight) were refused as tied
weights, by the pruners and by gradual_prune_'s teacher check; a model whose weights are buffers (no parameters)
crashed every calibrated pruner with a bare StopIteration."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from flash_llm.prune import gradual_prune_, magnitude_prune_, owl_sparsities, sparsegpt_prune_, wanda_prune_


# ---- 1. sparsegpt_prune_ refuses an update that overflows fp16 (no Inf written; earlier layers restored) -----------
def _correlated(n=2000, k=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g) @ torch.randn(4, k, generator=g) + 0.01 * torch.randn(n, k, generator=g)


def _big_fp16_linear(k=64, m=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, m, bias=False).half()
    with torch.no_grad():
        lin.weight.copy_((torch.randn(m, k, generator=g) * 8000).half())  # finite, max |w| ~ 3e4 < 65504
    return lin


def test_sparsegpt_refuses_an_fp16_overflow_and_keeps_the_weight():
    lin = _big_fp16_linear()
    x = _correlated().half()
    before = lin.weight.detach().clone()
    assert bool(torch.isfinite(before).all())
    with pytest.raises(ValueError, match=r"^weight: the updated weights overflow torch\.float16 .*maximum 65504.*"
                                         r"raise percdamp \(now 0\.01\)"):
        sparsegpt_prune_(lin, x, 0.9, progress=False)
    assert torch.equal(lin.weight, before)  # nothing written, no Inf
    # the advice works: more dampening keeps the update in range, and fp32 has the room anyway
    r = sparsegpt_prune_(lin, x, 0.9, percdamp=1.0, progress=False)
    assert bool(torch.isfinite(lin.weight).all()) and r[0].error == r[0].error  # (not NaN)
    assert int((lin.weight == 0).sum()) == round(0.9 * 64 * 32)
    lin32 = _big_fp16_linear().float()
    sparsegpt_prune_(lin32, x.float(), 0.9, progress=False)
    assert bool(torch.isfinite(lin32.weight).all())


def test_sparsegpt_overflow_in_a_later_layer_restores_the_earlier_ones():
    model = nn.Sequential(nn.Linear(64, 64, bias=False).half(), _big_fp16_linear())
    before = [layer.weight.detach().clone() for layer in model]
    with pytest.raises(ValueError, match=r"^1\.weight: the updated weights overflow torch\.float16 .*"
                                         r"the model is unchanged"):
        sparsegpt_prune_(model, _correlated().half(), 0.9, progress=False)
    assert all(torch.equal(layer.weight, w) for layer, w in zip(model, before))


# ---- 2. gradual_prune_: a teacher's NaN/Inf logits are refused before the first mask update, naming the teacher ---
V = 16


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(V, 8)
        self.fc = nn.Linear(8, V)

    def forward(self, x):
        return self.fc(self.emb(x))


def _ce(out, b):
    return nn.functional.cross_entropy(out.reshape(-1, V), b.reshape(-1))


def _batches():
    return [torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(1))]


@pytest.mark.parametrize("begin", [0, 2])
def test_gradual_names_a_teacher_with_nonfinite_logits(begin):
    model = _Tiny()
    teacher = copy.deepcopy(model)
    with torch.no_grad():
        teacher.fc.bias[3] = float("inf")  # its logits overflow (e.g. an fp16 copy of the dense model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = "checked on the first batch before any weight is modified" if begin == 0 else "at step 0"
    with pytest.raises(FloatingPointError, match=rf"training loss is nan \({state}.*\) because teacher\(batch\) "
                                                 r"returned logits holding NaN or Inf: check the teacher"):
        gradual_prune_(model, _batches(), 0.5, steps=4, begin=begin, initial_sparsity=0.5, loss_fn=_ce,
                       teacher=teacher, distill_weight=1.0, progress=False)
    # refused before the first mask update (begin 0) or before step 0's backward (begin 2): the model is unchanged
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_gradual_with_a_finite_teacher_still_checks_the_whole_first_loss():
    model = _Tiny()
    r = gradual_prune_(model, _batches(), 0.5, steps=2, begin=0, loss_fn=_ce, teacher=copy.deepcopy(model),
                       distill_weight=1.0, progress=False)
    assert len(r.losses) == 2 and int((model.fc.weight == 0).sum()) == 64


# ---- 3. disjoint views of one storage are not tied (pruners and the teacher check); overlapping ones still are ---
class _Attn(nn.Module):
    """q, k and v ``[8, 8]`` as views of one fused ``[24, 8]`` weight (``rows``: the row ranges they take)."""

    def __init__(self, rows=((0, 8), (8, 16), (16, 24))):
        super().__init__()
        self.qkv = torch.randn(24, 8, generator=torch.Generator().manual_seed(0))
        self.q, self.k, self.v = (nn.Linear(8, 8, bias=False) for _ in range(3))
        for lin, (a, b) in zip((self.q, self.k, self.v), rows):
            lin.weight = nn.Parameter(self.qkv[a:b])

    def forward(self, x):
        return self.q(x) + self.k(x) + self.v(x)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_disjoint_views_of_one_storage_are_pruned(method):
    m = _Attn()
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(2))
    run = {"magnitude": lambda: magnitude_prune_(m, 0.5), "wanda": lambda: wanda_prune_(m, x, 0.5),
           "sparsegpt": lambda: sparsegpt_prune_(m, x, 0.5, progress=False)}[method]
    report = run()
    assert [p.fqn for p in report] == ["q", "k", "v"]
    for lin in (m.q, m.k, m.v):
        assert int((lin.weight == 0).sum()) == 32
    # still views of the fused weight: each block of it holds its layer's zeros
    assert int((m.qkv == 0).sum()) == 96
    assert m.q.weight.untyped_storage().data_ptr() == m.k.weight.untyped_storage().data_ptr()


def test_overlapping_views_of_one_storage_are_still_tied():
    m = _Attn(rows=((0, 8), (4, 12), (16, 24)))  # q and k share rows 4..7
    with pytest.raises(ValueError, match=r"^q\.weight shares memory with k\.weight \(tied weights\)"):
        magnitude_prune_(m, 0.5)
    m = _Attn()
    m.v.weight = nn.Parameter(m.qkv.view(-1)[8 * 8 * 2 - 1:].view(-1)[:64].view(8, 8))  # v starts on k's last entry
    with pytest.raises(ValueError, match=r"^k\.weight shares memory with v\.weight \(tied weights\)"):
        magnitude_prune_(m, 0.5, filter_fn=lambda mod, n: n != "q")


def _split_pair():
    """A model and a teacher whose ``fc.weight`` are the two disjoint halves of one ``[2V, 8]`` tensor."""
    model = _Tiny()
    teacher = copy.deepcopy(model)
    fused = torch.cat([model.fc.weight.detach(), teacher.fc.weight.detach()])
    model.fc.weight = nn.Parameter(fused[:V])
    teacher.fc.weight = nn.Parameter(fused[V:])
    return model, teacher, fused


def test_gradual_accepts_a_teacher_on_a_disjoint_view_of_the_models_storage():
    model, teacher, fused = _split_pair()
    t_before = teacher.fc.weight.detach().clone()
    r = gradual_prune_(model, _batches(), 0.5, steps=2, loss_fn=_ce, teacher=teacher, distill_weight=1.0,
                       progress=False)
    assert len(r.losses) == 2 and int((model.fc.weight == 0).sum()) == 64
    assert torch.equal(teacher.fc.weight, t_before)  # the teacher's half was neither pruned nor trained
    assert model.fc.weight.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()


def test_gradual_still_refuses_a_teacher_overlapping_the_model():
    model, teacher, fused = _split_pair()
    teacher.fc.weight = nn.Parameter(fused[V - 1:2 * V - 1])  # one row in common with the model's
    with pytest.raises(ValueError, match=r"teacher shares memory with model \('fc\.weight' of teacher is 'fc\.weight'"):
        gradual_prune_(model, _batches(), 0.5, steps=2, loss_fn=_ce, teacher=teacher, distill_weight=1.0,
                       progress=False)


# ---- 4. a model whose weights are buffers (no parameters) takes calibration data --------------------------------
def _buffer_linear(k=8, m=4):
    lin = nn.Linear(k, m, bias=False)
    w = lin.weight.detach().clone()
    del lin.weight
    lin.register_buffer("weight", w)  # a frozen weight kept as a buffer
    return lin


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_calibrated_pruners_on_a_model_without_parameters(method):
    lin = _buffer_linear()
    assert not list(lin.parameters())
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(3))
    run = {"magnitude": lambda: magnitude_prune_(lin, 0.5, calib=x), "wanda": lambda: wanda_prune_(lin, x, 0.5),
           "sparsegpt": lambda: sparsegpt_prune_(lin, x, 0.5, progress=False)}[method]
    report = run()
    assert report[0].error is not None and report[0].sparsity == 0.5
    assert int((lin.weight == 0).sum()) == 16


def test_owl_on_a_model_without_parameters():
    model = nn.Sequential(_buffer_linear(8, 8), _buffer_linear(8, 4))
    out = owl_sparsities(model, torch.randn(16, 8, generator=torch.Generator().manual_seed(4)), 0.5)
    assert list(out) == ["0", "1"] and abs((out["0"] * 64 + out["1"] * 32) / 96 - 0.5) < 1e-9


def test_gradual_on_a_model_whose_trained_weight_is_a_buffer():
    lin = _buffer_linear()
    lin.weight.requires_grad_(True)  # trained through a given optimizer
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(5))
    r = gradual_prune_(lin, [x], 0.5, steps=2, loss_fn=lambda out, b: out.square().mean(),
                       optimizer=torch.optim.SGD([lin.weight], lr=0.1), progress=False)
    assert len(r.losses) == 2 and int((lin.weight == 0).sum()) == 16

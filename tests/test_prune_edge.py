"""flash_llm.prune on CPU, edge cases: reparametrized weights refused, NaN/Inf calibration inputs refused
before anything is pruned, every submodule's training flag restored, layers reached only by later
calibration batches, gradual_prune_ refusing bad input before pruning, empty layers, rounding that
would empty a layer or a row, and the messages and error semantics of the report; SparseGPT keeping the zeros a
layer had, and one module registered under several names."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, spectral_norm, weight_norm
from torch.nn.utils import prune as torch_prune

from flash_llm.prune import gradual_prune_, magnitude_prune_, owl_sparsities, sparsegpt_prune_, wanda_prune_

VOCAB, D = 16, 16


class Net(nn.Module):
    """Embedding and three nn.Linear layers; ``mid`` (identity by default) sits between fc1 and fc2."""

    def __init__(self, seed=0, vocab=VOCAB):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(VOCAB, D)
        self.fc1 = nn.Linear(D, 2 * D)
        self.mid = nn.Identity()
        self.fc2 = nn.Linear(2 * D, D)
        self.head = nn.Linear(D, vocab)

    def forward(self, tokens):
        return self.head(self.fc2(self.mid(torch.relu(self.fc1(self.embed(tokens))))))


def _calib(n=2, b=3, t=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (b, t), generator=g) for _ in range(n)]


def lm_loss(logits, batch):
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.reshape(-1))


def _gradual(model, calib, s, **kw):
    args = dict(steps=2, loss_fn=lm_loss, progress=False)
    args.update(kw)
    return gradual_prune_(model, calib, s, **args)


PRUNERS = {
    "magnitude": lambda m, c, s, **kw: magnitude_prune_(m, s, calib=c, **kw),
    "magnitude-global": lambda m, c, s, **kw: magnitude_prune_(m, s, scope="global", calib=c, **kw),
    "wanda": lambda m, c, s, **kw: wanda_prune_(m, c, s, **kw),
    "sparsegpt": lambda m, c, s, **kw: sparsegpt_prune_(m, c, s, blocksize=8, **kw),
    "gradual": _gradual,
}
CALIB_PASSES = {  # everything that runs the model on calibration data
    "magnitude": PRUNERS["magnitude"],
    "wanda": PRUNERS["wanda"],
    "sparsegpt": PRUNERS["sparsegpt"],
    "owl": lambda m, c, s, **kw: owl_sparsities(m, c, s, **kw),
}


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(model, before):
    now = model.state_dict()
    return now.keys() == before.keys() and all(torch.equal(now[k], v) for k, v in before.items())


# ---- 1. weights recomputed from other tensors at every forward -------------------------------------------

REPARAMS = {
    "torch.nn.utils.prune": lambda lin: torch_prune.identity(lin, "weight"),
    "weight_norm hook": lambda lin: weight_norm(lin),
    "spectral_norm hook": lambda lin: spectral_norm(lin),
    "parametrize": lambda lin: parametrizations.weight_norm(lin),
}


@pytest.mark.parametrize("reparam", list(REPARAMS))
@pytest.mark.parametrize("method", [*PRUNERS, "owl"])
def test_recomputed_weight_refused_before_any_layer_is_modified(method, reparam):
    model = Net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the old weight_norm is deprecated
        REPARAMS[reparam](model.fc2)
    before = _state(model)
    run = PRUNERS.get(method) or CALIB_PASSES[method]
    with pytest.raises(ValueError, match=r"^fc2\.weight is recomputed from other tensors at every forward"):
        run(model, _calib(), 0.5)
    assert _same_state(model, before)  # fc1 (before fc2 in module order) untouched too
    run(model, _calib(), 0.5, filter_fn=lambda m, n: n != "fc2")  # excluded: fine


def test_recomputed_weight_of_the_model_itself_and_a_plain_hook_is_fine():
    lin = parametrizations.weight_norm(nn.Linear(8, 4))
    with pytest.raises(ValueError, match=r"^weight is recomputed .*remove_parametrizations"):
        magnitude_prune_(lin, 0.5)
    lin = nn.Linear(8, 4)
    lin.register_forward_hook(lambda m, i, o: None)  # a hook that leaves the weight alone is no reason
    assert wanda_prune_(lin, torch.randn(3, 8), 0.5)[0].sparsity == 0.5


# ---- 2. NaN / Inf calibration inputs -----------------------------------------------------------------------

class Blow(nn.Module):
    def forward(self, x):
        return x * float("inf")  # inf, and nan where x == 0


@pytest.mark.parametrize("method", list(CALIB_PASSES))
def test_nonfinite_calibration_inputs_refused_before_anything_is_pruned(method):
    model = Net()
    model.mid = Blow()  # fc2 and head see NaN/Inf; the first one in call order is named
    before = _state(model)
    with pytest.raises(ValueError, match=r"^calibration inputs to fc2 contain NaN or Inf"):
        CALIB_PASSES[method](model, _calib(), 0.5)
    assert _same_state(model, before)


def test_nonfinite_calibration_tokens_of_the_model_itself():
    x = torch.randn(4, 8)
    x[1, 2] = float("nan")
    for prune in (wanda_prune_, sparsegpt_prune_):
        lin = nn.Linear(8, 4)
        before = lin.weight.detach().clone()
        with pytest.raises(ValueError, match=r"calibration inputs to <model> contain NaN or Inf"):
            prune(lin, x, 0.5)
        assert torch.equal(lin.weight, before)


# ---- 3. every submodule's training flag restored -------------------------------------------------------

def _flags(model):
    return {n: m.training for n, m in model.named_modules()}


@pytest.mark.parametrize("method", list(CALIB_PASSES))
@pytest.mark.parametrize("root_training", [True, False])
def test_submodule_training_flags_restored(method, root_training):
    model = Net().train(root_training)
    model.fc1.train(not root_training)  # e.g. a frozen sub-block kept in eval mode while training
    model.mid.train(not root_training)
    before = _flags(model)
    CALIB_PASSES[method](model, _calib(), 0.5)
    assert _flags(model) == before


def test_gradual_restores_submodule_training_flags_of_model_and_teacher():
    model, teacher = Net().eval(), Net(seed=1).train()
    model.fc2.train()
    teacher.fc1.eval()
    before_m, before_t = _flags(model), _flags(teacher)
    _gradual(model, _calib(), 0.5, teacher=teacher, distill_weight=0.5)
    assert _flags(model) == before_m and _flags(teacher) == before_t
    with pytest.raises(TypeError):  # restored after a failure too
        _gradual(model, _calib(), 0.5, loss_fn=lambda out, b: out, begin=1)
    assert _flags(model) == before_m


# ---- 4. layers reached only by later calibration batches ------------------------------------------------

class Routed(nn.Module):
    """The whole batch goes through e1 when its first token is odd, else through e0 (an MoE router)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, D)
        self.e0 = nn.Linear(D, D)
        self.e1 = nn.Linear(D, D)
        self.head = nn.Linear(D, VOCAB)

    def forward(self, tokens):
        x = self.embed(tokens)
        return self.head(self.e1(x) if int(tokens[0, 0]) % 2 else self.e0(x))


def test_sparsegpt_prunes_a_layer_only_later_batches_reach():
    calib = [torch.tensor([[2, 5, 7, 9]]), torch.tensor([[3, 5, 7, 9]])]  # batch 0 -> e0, batch 1 -> e1
    model = Routed()
    report = sparsegpt_prune_(model, calib, 0.5, blocksize=8)
    assert [p.fqn for p in report] == ["e0", "head", "e1"]  # order of first call over all batches
    assert int((model.e1.weight == 0).sum()) == D * D // 2


# ---- 5. gradual_prune_ refuses bad input before pruning ----------------------------------------------------

@pytest.mark.parametrize("bad", ["empty batches", "loss not scalar", "teacher shape"])
def test_gradual_refuses_bad_input_before_the_first_mask_update(bad):
    model = Net()
    before = _state(model)
    kw = dict(initial_sparsity=0.5, begin=0)  # the first update (to 50 %) comes before step 0
    if bad == "empty batches":
        with pytest.raises(ValueError, match="batches is empty"):
            _gradual(model, [], 0.8, **kw)
    elif bad == "loss not scalar":
        with pytest.raises(TypeError, match=r"loss_fn must return a scalar tensor, got \(3, 8, 16\)"):
            _gradual(model, _calib(), 0.8, loss_fn=lambda out, b: out, **kw)
    else:
        with pytest.raises(ValueError, match="distillation needs model.* logits of one shape"):
            _gradual(model, _calib(), 0.8, teacher=Net(vocab=VOCAB + 1), distill_weight=1.0, **kw)
    assert _same_state(model, before)


def test_gradual_check_pass_leaves_training_unchanged():
    """The extra check pass (eval mode, no_grad) changes neither the result nor the losses."""
    a, b = Net(), Net()
    torch.manual_seed(5)
    ra = _gradual(a, _calib(), 0.5, steps=3, begin=0, initial_sparsity=0.25)
    torch.manual_seed(5)
    rb = _gradual(b, _calib(), 0.5, steps=3, begin=0, initial_sparsity=0.25)
    assert ra.losses == rb.losses and len(ra.losses) == 3
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


# ---- 6. empty nn.Linear layers ----------------------------------------------------------------------------

class WithEmpty(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 0)  # empty output
        self.c = nn.Linear(0, 8)  # empty input: returns its bias

    def forward(self, x):
        y = self.a(x)
        return y + self.c(self.b(y))


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("method", list(PRUNERS))
def test_empty_layers_are_left_out(method):
    model = WithEmpty()
    calib = [torch.randn(5, 8), torch.randn(3, 8)]
    kw = {"loss_fn": lambda out, b: out.square().mean()} if method == "gradual" else {}
    report = PRUNERS[method](model, calib, 0.5, **kw)
    assert [p.fqn for p in report] == ["a"]
    assert report[0].sparsity == 0.5 and int((model.a.weight == 0).sum()) == 32


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_empty_layers_with_dict_targets_owl_and_nothing_else():
    calib = torch.randn(5, 8)
    assert list(owl_sparsities(WithEmpty(), calib, 0.5)) == ["a"]
    targets = {"a": 0.5, "b": 0.5, "c": 0.25}  # keys of the empty layers are accepted and ignored
    for prune in (wanda_prune_, sparsegpt_prune_):
        assert [p.fqn for p in prune(WithEmpty(), calib, targets)] == ["a"]
    model = WithEmpty()
    with pytest.raises(ValueError, match=r"no nn.Linear layer to prune that filter_fn accepts \(only empty ones: "
                                         r"\['b', 'c'\]\)"):
        magnitude_prune_(model, 0.5, filter_fn=lambda m, n: n != "a")


# ---- 7. rounding never empties a layer or a row ---------------------------------------------------------------

def test_rounding_keeps_one_weight_per_row_and_per_layer():
    lin = nn.Linear(256, 4, bias=False)
    r = wanda_prune_(lin, torch.randn(3, 256), 0.999)  # round(0.999 * 256) = 256
    assert ((lin.weight != 0).sum(1) == 1).all() and r[0].sparsity == 255 / 256
    lin = nn.Linear(64, 8, bias=False)
    r = magnitude_prune_(lin, 0.9995)  # round(0.9995 * 512) = 512
    assert int((lin.weight != 0).sum()) == 1 and r[0].sparsity == 511 / 512
    lin = nn.Linear(64, 4, bias=False)
    r = sparsegpt_prune_(lin, torch.randn(100, 64), 0.9999, blocksize=16)
    assert int((lin.weight != 0).sum()) == 1 and r[0].sparsity == 255 / 256
    model = nn.Sequential(nn.Linear(16, 4, bias=False), nn.Linear(4, 4, bias=False))
    magnitude_prune_(model, 0.999, scope="global")  # the count is over all 80 weights together
    assert sum(int((m.weight != 0).sum()) for m in model) == 1
    model = nn.Sequential(nn.Linear(16, 4, bias=False), nn.Linear(4, 4, bias=False))
    _gradual(model, [torch.randn(3, 16)], 0.999, loss_fn=lambda out, b: out.square().mean(), steps=2, end=2)
    assert [int((m.weight != 0).sum()) for m in model] == [1, 1]


def test_owl_caps_each_layer_below_emptying_its_rows():
    sp = owl_sparsities(nn.Linear(4, 8), torch.randn(5, 4), 0.9)  # one layer: d = 0, s = 0.9 -> capped
    assert sp == {"": 0.75}
    model = Net()
    with torch.no_grad():  # outliers in fc2: spread the layers as far as lam allows
        g = torch.Generator().manual_seed(2)
        model.fc2.weight[torch.rand(model.fc2.weight.shape, generator=g) < 0.03] *= 40.0
    sp = owl_sparsities(model, _calib(), 0.9, M=2.0, lam=1.0)
    layers = dict(model.named_modules())
    caps = {n: (layers[n].in_features - 1) / layers[n].in_features for n in sp}
    assert max(sp[n] - caps[n] for n in sp) <= 0 and any(sp[n] == caps[n] for n in sp)  # some layer capped
    sizes = {n: layers[n].weight.numel() for n in sp}
    assert sum(sp[n] * sizes[n] for n in sp) / sum(sizes.values()) == pytest.approx(0.9, abs=1e-12)
    wanda_prune_(model, _calib(), sp)
    assert all(((layers[n].weight != 0).sum(1) >= 1).all() for n in sp)


# ---- 8. messages and the error of a zero output ---------------------------------------------------------------

def test_gradual_sparsity_messages_name_the_argument():
    with pytest.raises(ValueError, match=r"^final_sparsity must be a number in \[0, 1\).*got 1.5"):
        _gradual(Net(), _calib(), 1.5)
    with pytest.raises(ValueError, match=r"^initial_sparsity must be a number in \[0, 1\).*got -0.1"):
        _gradual(Net(), _calib(), 0.5, initial_sparsity=-0.1)


def test_error_when_the_dense_output_is_zero():
    """As PrunedLayer documents: 0.0 when W X and W_p X are both zero, nan when only W X is."""
    lin = nn.Linear(8, 4, bias=False)
    assert wanda_prune_(lin, torch.zeros(3, 8), 0.5)[0].error == 0.0
    lin = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -1.0]]))
    err = magnitude_prune_(lin, 0.5, calib=torch.ones(3, 2))[0].error  # W X = 0, W_p X = -1
    assert err != err


# ---- session 73: SparseGPT and zeros already there; one module under two names ----------------------------------

class _OneLayer(nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.fc = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(weight)

    def forward(self, x):
        return self.fc(x)


@pytest.mark.parametrize("sparsity, blocksize", [(0.5, 128), (0.5, 16), (0.8, 128), (0.8, 32), (0.3, 64)])
def test_sparsegpt_keeps_the_zeros_a_layer_had(sparsity, blocksize):
    """Zeros unevenly spread over the blocks (30 % in the first 128 columns, 90 % in the rest): none comes back and
    the layer ends with max(round(s * n), zeros it had) zeros (were: revived by earlier blocks' updates)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 256, generator=g)
    w[:, :128] *= torch.rand(16, 128, generator=g) > 0.3
    w[:, 128:] *= torch.rand(16, 128, generator=g) > 0.9
    had = w == 0
    model = _OneLayer(w)
    x = torch.randn(64, 256, generator=g)
    report = sparsegpt_prune_(model, [x], sparsity, blocksize=blocksize)
    out = model.fc.weight.detach()
    assert not bool((out[had] != 0).any())
    assert int((out == 0).sum()) == max(round(sparsity * w.numel()), int(had.sum()))
    assert report[0].sparsity == pytest.approx(float((out == 0).float().mean()))


def test_sparsegpt_on_a_magnitude_pruned_layer_changes_nothing():
    g = torch.Generator().manual_seed(1)
    model = _OneLayer(torch.randn(32, 96, generator=g))
    magnitude_prune_(model, 0.5)
    before = model.fc.weight.detach().clone()
    report = sparsegpt_prune_(model, [torch.randn(40, 96, generator=g)], 0.5, blocksize=32)
    assert torch.equal(model.fc.weight.detach(), before) and report[0].error == 0.0


class _Looped(nn.Module):
    """One nn.Linear registered under three names (a block applied twice): not a tie with another tensor."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(D, D)
        self.layers = nn.ModuleList([self.fc, self.fc])

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_a_module_under_several_names_is_pruned_once(method):
    model = _Looped()
    calib = [torch.randn(6, D)]
    run = {"magnitude": lambda: magnitude_prune_(model, 0.5), "wanda": lambda: wanda_prune_(model, calib, 0.5),
           "sparsegpt": lambda: sparsegpt_prune_(model, calib, 0.5)}[method]
    report = run()
    assert [p.fqn for p in report] == ["fc"]
    assert int((model.fc.weight == 0).sum()) == D * D // 2


def test_a_weight_tied_to_another_module_is_still_refused():
    model = _Looped()
    model.other = nn.Linear(D, D)
    model.other.weight = model.fc.weight
    with pytest.raises(ValueError, match="tied weights"):
        magnitude_prune_(model, 0.5)

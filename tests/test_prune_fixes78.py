"""Regression tests of the pruning bug hunt of session 78: gradual_prune_ and `flash-llm prune` refusing a
non-finite training (nothing written), NaN/Inf weights refused by every pruner, Wanda filling each row's quota
with the zeros it had first, gradual_prune_ refusing a one-shot iterator and a loss without a graph before any
weight changes, weights whose shape disagrees with the layer, out-of-vocabulary calibration ids, `flash-llm
prune`'s --lr/--seed checked while parsing (and --lr/--steps refused for the one-shot methods), and sparsities
given as numpy scalars or 0-d tensors."""

from __future__ import annotations

import math
import os
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from flash_llm import demo
from flash_llm.evaluate import evaluate
from flash_llm.prune import gradual_prune_, magnitude_prune_, owl_sparsities, sparsegpt_prune_, wanda_prune_
import test_demo
from test_demo import run

calib_file = test_demo.calib_file  # (a fixture)


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32, bias=False), nn.ReLU(), nn.Linear(32, 16, bias=False))


def _batches(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 16, generator=g) for _ in range(n)]


def _mse(out, batch):
    return (out - batch).square().mean()


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _unchanged(model, before):
    """Bit for bit (a NaN weight equals itself)."""
    return all(torch.equal(v.reshape(-1).view(torch.uint8), before[k].reshape(-1).view(torch.uint8))
               for k, v in model.state_dict().items())


PRUNERS = {
    "magnitude": lambda m, c, s, **kw: magnitude_prune_(m, s, **kw),
    "wanda": lambda m, c, s, **kw: wanda_prune_(m, c, s, **kw),
    "sparsegpt": lambda m, c, s, **kw: sparsegpt_prune_(m, c, s, blocksize=8, **kw),
    "owl": lambda m, c, s, **kw: owl_sparsities(m, c, s, **kw),
    "gradual": lambda m, c, s, **kw: gradual_prune_(m, [c], s, steps=2, loss_fn=_mse, progress=False, **kw),
}


# ---- 1. non-finite training: gradual_prune_ raises, `flash-llm prune` writes nothing ------------------------------
def test_gradual_refuses_a_nonfinite_loss_naming_the_step():
    batches = _batches()
    batches[2][0, 0] = float("nan")  # one bad activation in the third batch
    with pytest.raises(FloatingPointError, match=r"training loss is nan \(at step 2; .*lower the learning rate"):
        gradual_prune_(_mlp(), batches, 0.5, steps=8, loss_fn=_mse, progress=False)


def test_gradual_refuses_a_nonfinite_first_batch_before_any_weight_changes():
    model = _mlp()
    before = _state(model)
    batches = _batches()
    batches[0][1, 3] = float("inf")
    with pytest.raises(FloatingPointError, match="checked on the first batch before any weight is modified"):
        gradual_prune_(model, batches, 0.5, steps=4, initial_sparsity=0.25, loss_fn=_mse, progress=False)
    assert _unchanged(model, before)


def test_gradual_refuses_weights_that_diverge_in_the_last_step():
    model = _mlp()  # the last step's update is followed by no loss: the weights themselves are checked
    opt = torch.optim.SGD(model.parameters(), lr=1e38)
    with pytest.raises(FloatingPointError, match=r"parameter '0.weight' holds NaN or Inf after the last step"):
        gradual_prune_(model, _batches(), 0.5, steps=1, optimizer=opt, loss_fn=lambda o, b: 1e3 * o.square().sum(),
                       progress=False)


def test_prune_cli_refuses_to_write_weights_that_overflow_dtype(capsys, tmp_path, calib_file):
    out = tmp_path / "out"  # one fp32 step of lr 1e6 leaves weights near 1e6: Inf in float16
    rc, _, err = run(capsys, "prune", "tiny-shakespeare", "--method", "gradual", "--sparsity", "0.5", "--calib",
                     str(calib_file), "--out", str(out), "--steps", "1", "--lr", "1e6", "--seq-len", "16",
                     "--batch-size", "1", "--device", "cpu")
    assert rc == 1, err
    assert "NaN/Inf value(s) after gradual pruning and the cast to --dtype float16" in err
    assert "model.embed_tokens.weight" in err and "lower --lr (now 1e+06)" in err and "nothing written" in err
    assert sorted(os.listdir(tmp_path)) == ["calib.txt"]  # no output, no temporary directory


def test_prune_cli_turns_a_diverging_loss_into_exit_status_1(capsys, tmp_path, calib_file, monkeypatch):
    def diverging(*args, **kwargs):
        raise FloatingPointError("gradual_prune_: the training loss is nan (at step 3; ...)")

    monkeypatch.setattr(demo, "_gradual", diverging)
    out = tmp_path / "out"
    rc, _, err = run(capsys, "prune", "tiny-shakespeare", "--method", "gradual", "--sparsity", "0.5", "--calib",
                     str(calib_file), "--out", str(out), "--lr", "0.5", "--seq-len", "16", "--device", "cpu")
    assert rc == 1
    assert "training loss is nan (at step 3" in err and "try a lower --lr" in err and "nothing written" in err
    assert sorted(os.listdir(tmp_path)) == ["calib.txt"]


# ---- 2. NaN/Inf in a selected weight: refused by every pruner before anything is modified ----------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("method", list(PRUNERS))
def test_pruners_refuse_nonfinite_weights(method, bad):
    model = _mlp()
    with torch.no_grad():
        model[2].weight[0, 0] = bad
    before = _state(model)
    with pytest.raises(ValueError, match=r"^2\.weight contains NaN or Inf"):
        PRUNERS[method](model, torch.randn(4, 8, 16), 0.5)
    assert _unchanged(model, before)


def test_nonfinite_weight_of_an_early_layer_is_not_blamed_on_calib():
    model = _mlp()
    with torch.no_grad():
        model[0].weight[3, 3] = float("nan")
    with pytest.raises(ValueError, match=r"^0\.weight contains NaN or Inf"):
        wanda_prune_(model, torch.randn(4, 8, 16), 0.5)


# ---- 3. Wanda: the zeros a row had fill its quota first ------------------------------------------------------------
def test_wanda_existing_zeros_fill_the_row_quota_before_dead_inputs():
    lin = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[5.0, 0.0, 3.0, 4.0]]))
    x = torch.randn(6, 4)
    x[:, 0] = 0  # input 0 is dead: its weight scores 0, as the zero weight does
    report = wanda_prune_(lin, x, 0.25)
    assert lin.weight.tolist() == [[5.0, 0.0, 3.0, 4.0]] and report[0].sparsity == 0.25


def test_wanda_row_ends_with_max_of_n_and_its_zeros():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32, bias=False))
    with torch.no_grad():
        mlp[0].bias[:16] = -100.0  # 16 hidden units never fire
    only_down = dict(filter_fn=lambda m, n: n == "2")
    magnitude_prune_(mlp, 0.5, **only_down)  # per layer: rows hold 32 zeros or more or fewer
    before = (mlp[2].weight == 0).sum(1)
    wanda_prune_(mlp, torch.randn(64, 32), 0.5, **only_down)
    assert torch.equal((mlp[2].weight == 0).sum(1), before.clamp(min=32))


# ---- 4. gradual_prune_: a one-shot iterator and a loss without a graph, refused before any weight changes -------
def test_gradual_refuses_a_one_shot_iterator_up_front():
    model = _mlp()
    before = _state(model)
    with pytest.raises(TypeError, match=r"batches is a one-shot iterator \(generator\).*re-iterable"):
        gradual_prune_(model, (b for b in _batches()), 0.5, steps=10, frequency=2, loss_fn=_mse, progress=False)
    assert _unchanged(model, before)


def test_gradual_still_refuses_a_re_iterable_whose_second_pass_is_empty():
    class Once:  # not an iterator itself, but only its first pass yields
        def __init__(self, batches):
            self.left = list(batches)

        def __iter__(self):
            batches, self.left = self.left, []
            return iter(batches)

    with pytest.raises(ValueError, match="batches is empty on its second pass"):
        gradual_prune_(_mlp(), Once(_batches()), 0.5, steps=10, loss_fn=_mse, progress=False)


@pytest.mark.parametrize("begin", [0, 2])
def test_gradual_refuses_a_loss_without_grad_before_any_weight_changes(begin):
    model = _mlp()
    before = _state(model)
    with pytest.raises(TypeError, match="loss_fn's result does not require grad"):
        gradual_prune_(model, _batches(), 0.5, steps=10, begin=begin, initial_sparsity=0.25,
                       loss_fn=lambda out, b: _mse(out, b).detach(), progress=False)
    assert _unchanged(model, before)


# ---- 5. a weight whose shape is not the layer's (out_features, in_features) ------------------------------------------
@pytest.mark.parametrize("method", list(PRUNERS))
def test_pruners_refuse_a_weight_whose_shape_disagrees_with_the_layer(method):
    model = _mlp()
    model[0].weight = nn.Parameter(torch.randn(48, 16))  # produces 48 features
    model[2].weight = nn.Parameter(torch.randn(16, 48))  # reads 48: the model runs, in_features still says 32
    assert model(torch.randn(2, 16)).shape == (2, 16)
    before = _state(model)
    with pytest.raises(ValueError, match=r"^0\.weight has shape \(48, 16\) but the layer declares \(out_features, "
                                         r"in_features\) = \(32, 16\)"):
        PRUNERS[method](model, torch.randn(4, 8, 16), 0.5)
    assert _unchanged(model, before)


# ---- 6. out-of-vocabulary calibration ids -------------------------------------------------------------------------
class _LM(nn.Module):
    def __init__(self, vocab=32):
        super().__init__()
        torch.manual_seed(0)
        self.config = SimpleNamespace(vocab_size=vocab)
        self.embed = nn.Embedding(vocab, 16)
        self.fc = nn.Linear(16, 16)
        self.head = nn.Linear(16, vocab)

    def forward(self, tokens):
        return self.head(torch.relu(self.fc(self.embed(tokens))))


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "owl"])
def test_out_of_vocabulary_calibration_ids_are_refused_naming_calib(method):
    model = _LM()
    good, bad = torch.randint(0, 32, (2, 6)), torch.tensor([[1, 2, 40, 3]])
    before = _state(model)
    call = {"magnitude": lambda c: magnitude_prune_(model, 0.5, calib=c),
            "wanda": lambda c: wanda_prune_(model, c, 0.5), "sparsegpt": lambda c: sparsegpt_prune_(model, c, 0.5),
            "owl": lambda c: owl_sparsities(model, c, 0.5)}[method]
    with pytest.raises(ValueError) as e:  # evaluate's message, behind the argument's name
        evaluate(model, bad[0], seq_len=3, progress=False)
    with pytest.raises(ValueError, match=r"^calib\[1\]: " + re.escape(e.value.args[0]) + "; calib must hold token ids"):
        call([good, bad])
    with pytest.raises(ValueError, match=r"^calib: token id -1 is out of range for the model's vocabulary of 32"):
        call(torch.tensor([[0, -1]]))
    assert _unchanged(model, before)


# ---- 7. flash-llm prune: --lr and --seed checked while parsing; --lr/--steps refused for one-shot methods -----
def _no_load(*args, **kwargs):
    raise AssertionError("the model was loaded although the arguments are wrong")


@pytest.mark.parametrize("option,value", [("--lr", "-1"), ("--lr", "0"), ("--lr", "nan"), ("--lr", "inf"),
                                          ("--lr", "fast"), ("--seed", str(2**64)), ("--seed", str(-2**63 - 1)),
                                          ("--seed", "1.5")])
def test_prune_checks_lr_and_seed_while_parsing(capsys, tmp_path, calib_file, monkeypatch, option, value):
    monkeypatch.setattr(demo, "load_model", _no_load)
    rc, _, err = run(capsys, "prune", "tiny-shakespeare", "--method", "gradual", "--sparsity", "0.5", "--calib",
                     str(calib_file), "--out", str(tmp_path / "out"), option, value)
    assert rc == 2
    assert f"argument {option}: expected" in err and repr(value) in err
    assert not (tmp_path / "out").exists()


def test_prune_seed_range_and_lr_reach_the_run():
    from flash_llm.cli import build_parser

    base = ["prune", "m", "--method", "gradual", "--sparsity", "0.5", "--out", "o"]
    assert build_parser().parse_args(base + ["--seed", str(2**64 - 1), "--lr", "1e-3"]).seed == 2**64 - 1
    args = build_parser().parse_args(base + ["--seed", str(-2**63), "--lr", "1e-3"])
    assert args.seed == -2**63 and args.lr == 1e-3


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_prune_refuses_gradual_options_with_a_one_shot_method(capsys, tmp_path, calib_file, monkeypatch, method):
    monkeypatch.setattr(demo, "load_model", _no_load)
    rc, _, err = run(capsys, "prune", "tiny-shakespeare", "--method", method, "--sparsity", "0.5", "--calib",
                     str(calib_file), "--out", str(tmp_path / "out"), "--lr", "1e-3", "--steps", "7")
    assert rc == 2
    assert f"--steps, --lr: option(s) of --method gradual (fine-tuning), which {method} does not run" in err
    assert not (tmp_path / "out").exists()


# ---- 8. sparsities as numpy scalars and 0-d tensors ---------------------------------------------------------------
@pytest.mark.parametrize("value", [np.float32(0.5), np.float16(0.5), torch.tensor(0.5), torch.tensor(0.5).double(),
                                   np.int64(0), torch.tensor(0)])
def test_sparsity_accepts_real_numpy_scalars_and_0d_tensors(value):
    ref, model = _mlp(), _mlp()
    r_ref = magnitude_prune_(ref, float(value))
    report = magnitude_prune_(model, value)
    assert report.target == float(value) and type(report.target) is float
    assert [p.sparsity for p in report] == [p.sparsity for p in r_ref]
    calib = torch.randn(4, 8, 16)
    assert wanda_prune_(_mlp(), calib, {"0": value, "2": np.float32(0.25)}).target == pytest.approx(
        (512 * float(value) + 512 * 0.25) / 1024)
    assert gradual_prune_(_mlp(), _batches(), value, steps=1, loss_fn=_mse, progress=False).target == float(value)
    sp = owl_sparsities(_mlp(), calib, value, M=np.float32(5), lam=torch.tensor(0.08))
    assert all(type(v) is float for v in sp.values())


@pytest.mark.parametrize("value", [True, np.bool_(True), torch.tensor(True), float("nan"), np.float32("nan"), 1.0,
                                   np.float32(1.0), torch.tensor(-0.1), torch.tensor([0.5]), "0.5", None,
                                   torch.tensor(0.5 + 0j)])
def test_sparsity_still_refuses_bools_nan_out_of_range_and_non_numbers(value):
    model = _mlp()
    with pytest.raises(ValueError, match=r"^sparsity must be a number in \[0, 1\) \(the fraction of weights set to "
                                         r"zero\), got "):
        magnitude_prune_(model, value)
    with pytest.raises(ValueError, match=r"^final_sparsity must be a number in \[0, 1\)"):
        gradual_prune_(model, _batches(), value, steps=1, loss_fn=_mse, progress=False)


def test_other_real_arguments_accept_numpy_and_keep_refusing_bad_values():
    calib = torch.randn(4, 8, 16)
    sparsegpt_prune_(_mlp(), calib, 0.5, percdamp=np.float32(0.01))
    gradual_prune_(_mlp(), _batches(), 0.5, steps=1, loss_fn=_mse, lr=np.float32(1e-3), progress=False)
    with pytest.raises(ValueError, match="percdamp must be a positive number, got True"):
        sparsegpt_prune_(_mlp(), calib, 0.5, percdamp=True)
    with pytest.raises(ValueError, match="lr must be a positive number"):
        gradual_prune_(_mlp(), _batches(), 0.5, steps=1, loss_fn=_mse, lr=torch.tensor(math.inf), progress=False)
    with pytest.raises(ValueError, match="lam must be a number in"):
        owl_sparsities(_mlp(), calib, 0.5, lam=np.float64(1.5))
    with pytest.raises(ValueError, match="M .* must be a positive number"):
        owl_sparsities(_mlp(), calib, 0.5, M=np.bool_(True))
    with pytest.raises(ValueError, match="distill_weight must be a number >= 0"):
        gradual_prune_(_mlp(), _batches(), 0.5, steps=1, loss_fn=_mse, distill_weight=np.float32(-1),
                       progress=False)


def test_demo_checks_its_seed_while_parsing(capsys):
    """``flash-llm demo --seed`` takes the prune command's seed type: out of torch's range is a usage error naming
    the option, before any model loads (was an OverflowError from torch.Generator)."""
    from flash_llm.cli import main

    assert main(["demo", "--seed", str(2**64), "--device", "cpu"]) == 2
    assert "argument --seed: expected an integer in [-2**63, 2**64)" in capsys.readouterr().err

"""Regression tests of session 84's prune fixes: a model with a vocabulary (an int ``config.vocab_size``) takes integer
token ids, and every pruner refused nothing else up front: a floating-point or bool calibration batch reached the
model as it was, so a model that casts its input (``emb(x.long())``) pruned on ids silently truncated from 2.5 to 2,
and a flash-llm model failed deep in its embedding with torch's message, naming no argument.  ``gradual_prune_``
checked no token batch at all (an out-of-vocabulary id failed in the embedding, mid-training for a later batch).
Now each such batch is a ValueError naming it, before any weight is modified.  A model without a vocabulary (an
MLP) still takes float batches; ``evaluate`` and the data helpers refused float / bool streams already."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from flash_llm.data import calibration_batches, split, windows
from flash_llm.evaluate import evaluate
from flash_llm.models import ModelConfig, from_config
from flash_llm.prune import gradual_prune_, magnitude_prune_, owl_sparsities, sparsegpt_prune_, wanda_prune_

V = 40


class CastingLM(nn.Module):
    """A token model whose forward casts its input to ids (as a wrapper that calls ``.long()`` might): a float batch
    ran, its 2.5 read as the id 2."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.config = SimpleNamespace(vocab_size=V)
        self.emb = nn.Embedding(V, 16)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, V)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(self.emb(x.long()))))


def _lm_loss(out, batch):
    return nn.functional.cross_entropy(out[:, :-1].reshape(-1, V), batch[:, 1:].long().reshape(-1))


CALLS = {
    "magnitude": lambda model, c: magnitude_prune_(model, 0.5, calib=c),
    "wanda": lambda model, c: wanda_prune_(model, c, 0.5),
    "sparsegpt": lambda model, c: sparsegpt_prune_(model, c, 0.5, progress=False),
    "owl": lambda model, c: owl_sparsities(model, c, 0.5),
    "gradual": lambda model, c: gradual_prune_(model, c, 0.5, steps=2, begin=0, end=1, frequency=1,
                                               loss_fn=_lm_loss, progress=False),
}


def _state(model):
    return [t.detach().clone() for t in model.state_dict().values()]


def _unchanged(model, before):
    return all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), before))


def _ids(seed, shape=(3, 8)):
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", sorted(CALLS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64,
                                   torch.bool], ids=str)
def test_a_non_integer_batch_of_a_token_model_is_refused_naming_it(method, dtype):
    model = CastingLM()
    good = _ids(1)
    bad = torch.tensor([[1.0, 2.5, 3.0, 4.0]]).to(dtype)  # (bool: [[True, True, True, True]])
    before = _state(model)
    msg = r"has dtype {}, but the model \(config\.vocab_size=40\) takes integer token ids".format(dtype)
    with pytest.raises(ValueError, match=r"^(calib|batches)\[1\] " + msg):
        CALLS[method](model, [good, bad])
    with pytest.raises(ValueError, match=r"^(calib|batches) " + msg):
        CALLS[method](model, bad)
    assert _unchanged(model, before)  # (refused before any weight is modified; gradual: before step 0)


@pytest.mark.parametrize("method", sorted(CALLS))
def test_whole_float_ids_are_refused_too_and_the_integer_batch_runs(method):
    """Even float values that are all whole numbers are refused (no cast): the same ids as an integer tensor run."""
    ids = _ids(2)
    with pytest.raises(ValueError, match=r"has dtype torch\.float32, but the model"):
        CALLS[method](CastingLM(), ids.float())
    CALLS[method](CastingLM(), ids.to(torch.int16))  # (any integer dtype, as before)


def test_a_flash_llm_model_names_the_float_batch_instead_of_failing_in_its_embedding():
    cfg = ModelConfig(family="llama", vocab_size=97, hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
                      intermediate_size=96, max_position_embeddings=64)
    model = from_config(cfg, dtype=torch.float32, seed=0)
    with pytest.raises(ValueError, match=r"^calib has dtype torch\.float32, but the model \(config\.vocab_size=97\)"):
        wanda_prune_(model, torch.tensor([[1.0, 2.5, 3.0]]), 0.5)  # (torch's "Expected tensor for argument #1
    #                                                                   'indices'" RuntimeError before)


def test_gradual_prune_checks_every_listed_batch_before_the_first_step():
    """A later batch out of the vocabulary (or float) is refused before step 0, not when it comes up mid-training."""
    model = CastingLM()
    before = _state(model)
    bad = _ids(3)
    bad[1, 4] = V + 7
    with pytest.raises(ValueError, match=r"^batches\[2\]: token id 47 is out of range for the model's vocabulary of "
                                         r"40; batches must hold token ids"):
        CALLS["gradual"](model, [_ids(4), _ids(5), bad])
    assert _unchanged(model, before)
    with pytest.raises(ValueError, match=r"^batches\[2\] has dtype torch\.float32"):
        CALLS["gradual"](model, (_ids(4), _ids(5), _ids(6).float()))
    assert _unchanged(model, before)


def test_gradual_prune_checks_the_batches_of_another_iterable_as_they_come():
    """An iterable that is not a list, tuple or tensor (a DataLoader) is checked batch by batch as it is drawn."""

    class Loader:  # (re-iterable, not a Sequence)
        def __init__(self, batches):
            self.batches = batches

        def __iter__(self):
            return iter(self.batches)

    model = CastingLM()
    with pytest.raises(ValueError, match=r"^batches\[1\] has dtype torch\.float64, but the model"):
        gradual_prune_(model, Loader([_ids(7), _ids(8).double()]), 0.5, steps=3, begin=1, end=2, loss_fn=_lm_loss,
                       progress=False)
    gradual_prune_(model, Loader([_ids(7), _ids(8).to(torch.uint8)]), 0.5, steps=3, begin=1, end=2,
                   loss_fn=_lm_loss, progress=False)
    assert int((model.fc1.weight == 0).sum()) == 256


@pytest.mark.parametrize("method", sorted(CALLS))
def test_a_model_without_a_vocabulary_still_takes_float_batches(method):
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(8, 16)
    call = CALLS[method] if method != "gradual" else (
        lambda m, c: gradual_prune_(m, c, 0.5, steps=1, begin=0, end=1, progress=False,
                                    loss_fn=lambda out, batch: out.square().mean()))
    call(model, x)
    call(model, [x, x[:3]])


def test_evaluate_and_the_data_helpers_refuse_float_and_bool_streams():
    """(Already so: shown here, every entry point of a token stream names it.)"""
    model = CastingLM()
    for bad in (torch.tensor([1.0, 2.5, 3.0]), torch.tensor([1.0, 2.0, 3.0]), torch.tensor([True, False, True])):
        with pytest.raises(ValueError, match=r"^tokens must be a 1-D integer tensor of token ids"):
            evaluate(model, bad, seq_len=2, progress=False)
        with pytest.raises(ValueError, match=r"^tokens must be a 1-D integer tensor of token ids"):
            windows(bad, 2)
        with pytest.raises(ValueError, match=r"^tokens must be a 1-D integer tensor of token ids"):
            calibration_batches(bad, 1, 2)
        with pytest.raises(ValueError, match=r"^tokens must be a 1-D integer tensor of token ids"):
            split(bad.repeat(4))


# ---- a finite lr whose Adam step overflows float32 (hunt of session 84) -------------------------------------------
def _mlp_and_batches():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16)), [torch.randn(4, 16) for _ in range(2)]


def test_gradual_prune_refuses_an_lr_whose_first_adam_step_overflows_float32():
    """lr = 1e38 is finite and positive, but the default Adam's first step is 10 x lr: it was torch's bare RuntimeError
    ("cannot be converted to type float without overflow") in the middle of the first step, and the CLI's traceback."""
    model, batches = _mlp_and_batches()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"^lr must be at most 3\.403e\+37 .*got 1e\+38$"):
        gradual_prune_(model, batches, 0.5, steps=2, loss_fn=lambda out, b: out.pow(2).mean(), lr=1e38,
                       progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # nothing modified
    gradual_prune_(model, batches, 0.5, steps=2, loss_fn=lambda out, b: out.pow(2).mean(), lr=1e-3, progress=False)


def test_a_callers_optimizer_whose_step_overflows_is_a_floating_point_error():
    model, batches = _mlp_and_batches()
    opt = torch.optim.Adam(model.parameters(), lr=1e38)
    with pytest.raises(FloatingPointError, match=r"optimizer's step 0 overflowed .*lower the learning rate"):
        gradual_prune_(model, batches, 0.5, steps=2, loss_fn=lambda out, b: out.pow(2).mean(), optimizer=opt,
                       progress=False)


def test_the_cli_says_error_for_a_huge_lr(tmp_path, capsys):
    from flash_llm import cli

    calib = tmp_path / "calib.txt"
    calib.write_text("ROMEO: what light through yonder window breaks?\n" * 200)
    out = tmp_path / "out"
    rc = cli.main(["prune", "tiny-shakespeare", "--method", "gradual", "--sparsity", "0.5", "--calib", str(calib),
                   "--out", str(out), "--steps", "2", "--seq-len", "32", "--batch-size", "2", "--lr", "1e38",
                   "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc in (1, 2) and "lr must be at most" in err, (rc, err)
    assert not out.exists()


# ---- review: a model with a vocabulary that does not read token ids --------------------------------------------
class _AudioCTC(nn.Module):
    """A CTC speech model's shape: a ``config.vocab_size`` (its alphabet) and float audio as input."""

    main_input_name = "input_values"

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.config = SimpleNamespace(vocab_size=V)
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, V)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.mark.parametrize("method", ["wanda", "magnitude"])
def test_a_speech_model_with_a_vocabulary_still_takes_float_audio(method):
    model, audio = _AudioCTC(), torch.randn(2, 5, 16)
    if method == "wanda":
        wanda_prune_(model, audio, 0.5)
    else:
        magnitude_prune_(model, 0.5, calib=audio)
    assert (model.fc1.weight == 0).float().mean() == 0.5

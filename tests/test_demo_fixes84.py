"""Session 84 hunt fixes (demo): an out-of-memory error while the demo evaluated the dense or the sparse model was a
raw traceback (pruning's gave the one-line message naming the options); ``--speed-tokens 1`` (or a prompt leaving room
for one token) printed ``nan tokens/s``: one token has no decode step to time."""

from __future__ import annotations

import pytest
import torch

import flash_llm.evaluate as E
from flash_llm import cli


@pytest.mark.parametrize("what", ["dense", "sparse"])
def test_demo_says_an_out_of_memory_evaluation_in_one_line(monkeypatch, capsys, what):
    import flash_llm

    real_logits, real_sparsify, sparsified = E.logits_of, flash_llm.sparsify_, []

    def logits_of(out):  # (the evaluation of `what` runs out of memory: the sparse one comes after sparsify_)
        if (what == "sparse") == bool(sparsified):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 31.31 GiB")
        return real_logits(out)

    monkeypatch.setattr(E, "logits_of", logits_of)
    monkeypatch.setattr(flash_llm, "sparsify_", lambda *a, **k: sparsified.append(1) or real_sparsify(*a, **k))
    rc = cli.main(["demo", "--eval-tokens", "300", "--gen-tokens", "1", "--method", "magnitude"])
    err = capsys.readouterr().err
    assert rc == 1 and bool(sparsified) == (what == "sparse"), err
    assert (f"out of memory with evaluating the {what} model, --batch-size" in err and "; lower them" in err
            and "Traceback" not in err), err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the decode speed is measured on a CUDA GPU only")
def test_demo_does_not_time_a_single_token(capsys):
    rc = cli.main(["demo", "--eval-tokens", "300", "--gen-tokens", "1", "--method", "magnitude", "--speed-tokens",
                   "1"])
    out = capsys.readouterr().out
    assert rc == 0 and "decode speed: not measured (it times decode steps: at least 2 tokens, got 1" in out, out
    assert "nan" not in out

"""Session 79: ``flash-llm prune --method gradual`` refuses ``--calib-seqs`` (the one-shot methods' calibration
sequences; gradual fine-tunes on --steps batches of --batch-size instead), which it used to ignore silently."""

from __future__ import annotations

import pytest

from flash_llm import demo
import test_demo
from test_demo import run

calib_file = test_demo.calib_file  # (a fixture)


def _no_load(*args, **kwargs):
    raise AssertionError("the model was loaded although the arguments are wrong")


def test_gradual_refuses_calib_seqs(capsys, tmp_path, calib_file, monkeypatch):
    monkeypatch.setattr(demo, "load_model", _no_load)
    rc, _, err = run(capsys, "prune", "tiny-shakespeare", "--method", "gradual", "--sparsity", "0.5", "--calib",
                     str(calib_file), "--out", str(tmp_path / "out"), "--calib-seqs", "8")
    assert rc == 2
    assert "--calib-seqs: the calibration sequences of the one-shot methods" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "magnitude"])
def test_one_shot_methods_still_take_calib_seqs(method):
    from flash_llm.cli import build_parser

    args = build_parser().parse_args(["prune", "m", "--method", method, "--sparsity", "0.5", "--out", "o",
                                      "--calib-seqs", "8"])
    assert args.calib_seqs == 8 and not demo._given(args, demo._GRADUAL_ONLY)
    assert demo._given(args, demo._ONE_SHOT_ONLY) == ["--calib-seqs"]

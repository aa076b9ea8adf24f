"""Session 81's command-line fixes:

1. ``demo --method magnitude --calib-seqs N`` is refused before the model is loaded (magnitude pruning reads no
   calibration data), as ``prune --method magnitude`` refuses it without ``--verbose``;
2. ``prune --method magnitude --batch-size N`` is refused where no calibration pass runs (without ``--verbose`` and
   ``--calib``): the batch size is the calibration pass's alone; ``demo`` keeps it (its evaluation uses it);
3. the tensor-parallel loader (``load_tensor_parallel``, ``generate --tp``) refuses a ``--dtype`` cast that overflows
   to inf, naming the tensor (:func:`flash_llm.checkpoint.pretrained.cast_checked`), as ``from_pretrained`` does.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import flash_llm
from flash_llm import demo
from flash_llm.checkpoint import convert
from flash_llm.nn import LossyCastError
from flash_llm.parallel import load_tensor_parallel
import test_demo
from test_demo import run

calib_file = test_demo.calib_file  # (a fixture)


def _no_load(*args, **kwargs):
    raise AssertionError("the model was loaded although the arguments are wrong")


# ---- 1. demo --method magnitude --calib-seqs -----------------------------------------------------------------------
@pytest.mark.parametrize("value", ["4", "128"])  # (128: the GPU default, refused all the same when given)
def test_demo_magnitude_refuses_calib_seqs_before_loading(capsys, monkeypatch, value):
    monkeypatch.setattr(demo, "load_model", _no_load)
    rc, out, err = run(capsys, "demo", "--method", "magnitude", "--calib-seqs", value, "--device", "cpu")
    assert rc == 2, err
    assert "error: --calib-seqs: the calibration sequences of sparsegpt and wanda; magnitude pruning reads no " \
           "data" in err, err
    assert out == "" and "Traceback" not in err


def test_demo_one_shot_methods_still_take_calib_seqs():
    parser = flash_llm.cli.build_parser()
    for method in ("sparsegpt", "wanda"):
        args = parser.parse_args(["demo", "--method", method, "--calib-seqs", "4"])
        assert args.calib_seqs == 4 and demo._given(args, demo._ONE_SHOT_ONLY) == ["--calib-seqs"]
    args = parser.parse_args(["demo", "--method", "magnitude"])  # (not given: nothing to refuse)
    assert demo._given(args, demo._ONE_SHOT_ONLY) == []


# ---- 2. prune --method magnitude --batch-size ----------------------------------------------------------------------
@pytest.mark.parametrize("flag, what", [("--batch-size", "the sequences per forward pass"),
                                        ("--seq-len", "the tokens per sequence")])
@pytest.mark.parametrize("verbose, with_calib", [(False, False), (True, False), (False, True)])
def test_prune_magnitude_refuses_batch_size_without_a_calibration_pass(capsys, tmp_path, calib_file, monkeypatch,
                                                                       verbose, with_calib, flag, what):
    """(``--seq-len`` too: the length of the calibration pass's sequences, unused without it.)"""
    monkeypatch.setattr(demo, "load_model", _no_load)
    extra = ["--verbose"] * verbose + ["--calib", str(calib_file)] * with_calib
    out = tmp_path / "out"
    rc, stdout, err = run(capsys, "prune", "tiny-shakespeare", "--method", "magnitude", "--sparsity", "0.5", "--out",
                          str(out), flag, "16", "--device", "cpu", *extra)
    assert rc == 2, err
    assert f"error: {flag}: {what} of the calibration pass, which magnitude runs only with --verbose and --calib" \
           in err, err
    assert stdout == "" and not out.exists()


def test_prune_magnitude_verbose_with_calib_still_takes_batch_size(capsys, tmp_path, calib_file, monkeypatch):
    """With --verbose and --calib magnitude runs its calibration pass (the errors --verbose prints): --batch-size
    is used and accepted (stopped here before the model is loaded: the arguments were accepted)."""
    monkeypatch.setattr(demo, "load_model", _no_load)
    with pytest.raises(AssertionError, match="the model was loaded"):
        run(capsys, "prune", "tiny-shakespeare", "--method", "magnitude", "--sparsity", "0.5", "--out",
            str(tmp_path / "out"), "--batch-size", "2", "--device", "cpu", "--verbose", "--calib", str(calib_file))


def test_demo_magnitude_keeps_batch_size_for_its_evaluation(capsys, monkeypatch):
    """demo evaluates both models in windows of --batch-size, also with magnitude: the option is not refused."""
    monkeypatch.setattr(demo, "load_model", _no_load)
    with pytest.raises(AssertionError, match="the model was loaded"):
        run(capsys, "demo", "--method", "magnitude", "--batch-size", "2", "--device", "cpu")


# ---- 3. tensor-parallel loading: casts that overflow ---------------------------------------------------------------
UP = "model.layers.0.mlp.up_proj.weight"  # column-parallel, compressed by convert (60 % zeros)
DOWN = "model.layers.1.mlp.down_proj.weight"  # row-parallel
NORM = "model.norm.weight"  # replicated
FC1_BIAS = "model.decoder.layers.0.fc1.bias"  # OPT: a column-parallel bias


def _checkpoint(folder: Path, family: str, dtype, big: dict[str, float], vocab: int = 97) -> Path:
    """A tiny transformers checkpoint in ``dtype`` whose tensors ``big`` hold one value each at index 0."""
    pytest.importorskip("transformers")
    from _ckpt import hf_model, save_hf

    model = hf_model(family, dtype=dtype, seed=11, vocab=vocab)
    with torch.no_grad():
        for name, value in big.items():
            model.get_parameter(name).view(-1)[0] = value
    return save_hf(model, folder)


@pytest.mark.parametrize("family, name", [("llama", UP), ("llama", DOWN), ("llama", NORM), ("opt", FC1_BIAS)])
def test_tp_dense_checkpoint_refuses_a_cast_that_overflows(world1, tmp_path, family, name):
    path = _checkpoint(tmp_path / "ck", family, torch.float32, {name: 1e6})
    shard = rf"{re.escape(str(path))}/model-\d+-of-\d+\.safetensors"  # (the file that holds it, then the tensor)
    with pytest.raises(LossyCastError, match=rf"^{shard}: tensor '{name}' cannot be cast to torch\.float16: 1 finite "
                                             r"value\(s\) overflow to inf .*\(largest magnitude 1e\+06\)"):
        load_tensor_parallel(path, world1, dtype=torch.float16, progress=False)
    model, _ = load_tensor_parallel(path, world1, dtype=torch.bfloat16, progress=False)  # (float32's range: fine)
    assert all(torch.isfinite(p).all() for p in model.parameters() if p.is_floating_point())


def test_tp_normal_float32_checkpoint_still_loads_in_float16(world1, tmp_path):
    """No overflow: loads; a value below fp16's smallest subnormal flushes to zero (rounding, as from_pretrained)."""
    path = _checkpoint(tmp_path / "ck", "opt", torch.float32, {FC1_BIAS: 1e-9})
    model, _ = load_tensor_parallel(path, world1, dtype=torch.float16, progress=False)
    assert {p.dtype for p in model.parameters() if p.is_floating_point()} == {torch.float16}
    assert all(torch.isfinite(p).all() for p in model.parameters() if p.is_floating_point())


@pytest.mark.parametrize("fmt", ["flash-llm", "sparse-bitmask"])
@pytest.mark.parametrize("name", [UP, NORM])
def test_tp_compressed_checkpoint_refuses_a_cast_that_overflows(world1, tmp_path, fmt, name):
    """A bf16 checkpoint (a compressed layer, or the dense final norm, holding 1e6) converted to flash-llm or
    sparse-bitmask form, loaded in float16 (re-encoded: a SparsifyConfig) is refused naming the tensor."""
    src = _checkpoint(tmp_path / "src", "llama", torch.bfloat16, {name: 1e6})
    out = tmp_path / "out"
    report = convert(src, out, progress=False, **({"format": "sparse-bitmask"} if fmt == "sparse-bitmask" else {}))
    if fmt == "flash-llm":
        assert UP[: -len(".weight")] in {c.fqn for c in report.converted}
    with pytest.raises(LossyCastError, match=rf"'{name}' cannot be cast to torch\.float16: 1 finite value\(s\) "
                                             "overflow to inf"):
        load_tensor_parallel(out, world1, dtype=torch.float16, sparsify=flash_llm.SparsifyConfig(), progress=False)
    with pytest.raises(LossyCastError, match=rf"'{name}' cannot be cast to torch\.float16"):  # (from_pretrained: same)
        flash_llm.from_pretrained(out, dtype=torch.float16, sparsify=flash_llm.SparsifyConfig(), progress=False)
    load_tensor_parallel(out, world1, dtype=torch.bfloat16, progress=False)  # (its own dtype: fine)


def _generate(path, *extra) -> list[str]:
    return ["generate", str(path), "--prompt", "Hello", "--max-new-tokens", "3", "--ignore-eos", "--device", "cpu",
            "--tokenizer", "bytes", *extra]


def test_generate_tp_refuses_a_dtype_that_overflows(capsys, tmp_path):
    big = _checkpoint(tmp_path / "big", "llama", torch.float32, {DOWN: 1e6}, vocab=256)
    for argv in (_generate(big, "--dtype", "float16"), _generate(big, "--dtype", "float16", "--tp")):
        rc, stdout, err = run(capsys, *argv)
        assert rc == 2 and stdout == "", (argv, err)
        assert f"tensor '{DOWN}' cannot be cast to torch.float16: 1 finite value(s) overflow to inf" in err, err
        assert "--dtype bfloat16" in err and "Traceback" not in err
        assert not torch.distributed.is_initialized()
    rc, stdout, err = run(capsys, *_generate(big, "--dtype", "bfloat16", "--tp"))
    assert rc == 0, err
    ok = _checkpoint(tmp_path / "ok", "llama", torch.float32, {}, vocab=256)
    rc, stdout, err = run(capsys, *_generate(ok, "--dtype", "float16", "--tp"))
    assert rc == 0 and stdout.startswith("Hello"), err
    assert not torch.distributed.is_initialized()

"""Session 88's fixes from the bug hunt of the command line, the demo and flash_llm.bundled:

1. ``flash_llm.bundled.save_model_dir`` wrote a tensor-parallel model (``tensor_parallel_`` /
   ``load_tensor_parallel``): this rank's slices under ``...q_proj.linear.weight`` names, a checkpoint no reader
   loads (``load_dir`` then blamed the checkpoint: "tensor ... has no place in the LlamaForCausalLM").  It now refuses
   it up front, as ``save_pretrained`` and ``write_sparse_bitmask`` do, with nothing written;
2. ``demo --model`` and ``prune`` (any method that reads ``--calib``) took a model as byte-level only when
   ``config.json`` declared ``"flash_llm": {"tokenizer": "bytes"}`` exactly, while ``generate`` (and
   docs/checkpoints.md) also took a declared tokenizer starting with ``"bytes"`` (``"bytes (UTF-8)"``) or a
   vocabulary of 256: the same directory generated text but was refused by demo / prune ("has no tokenizer files").
   ``flash_llm.bundled.is_byte_level(config, directory)`` is now the one rule of all three (the directory's own
   tokenizer files win over it, as they did in ``generate``);
3. ``inspect .`` / ``generate .`` / ``convert .`` in a directory that is no checkpoint said
   ``config.json: config.json is missing`` (``Path(".") / "config.json"`` prints as ``config.json``), naming no
   directory; the checkpoint readers' messages now name a path without a directory part absolutely
   (``flash_llm.checkpoint._files.named``).
"""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

import flash_llm
from flash_llm import bundled, data
from flash_llm.checkpoint import _files
from flash_llm.formats import FormatError
from flash_llm.models import ModelConfig
from test_demo import run


def _cfg(vocab_size: int = data.VOCAB_SIZE, tokenizer: str | None = None) -> dict:
    """A 1-layer Llama's config.json; ``tokenizer``: the ``"flash_llm"`` section's declared tokenizer (none: no
    section)."""
    cfg = ModelConfig(family="llama", vocab_size=vocab_size, hidden_size=64, num_layers=1, num_heads=2,
                      intermediate_size=128, max_position_embeddings=64).to_hf()
    return dict(cfg, flash_llm={"tokenizer": tokenizer}) if tokenizer is not None else cfg


def _model_dir(path, cfg: dict):
    return bundled.save_model_dir(bundled.build_model(cfg, seed=0), cfg, path)


# ---- 1. save_model_dir refuses a tensor-parallel model ---------------------------------------------------------------
def test_save_model_dir_refuses_a_tensor_parallel_model(tmp_path, world1):
    from flash_llm.parallel import tensor_parallel_

    cfg = _cfg(tokenizer=bundled.BYTE_TOKENIZER)
    model = bundled.build_model(cfg, seed=0)
    tensor_parallel_(model, world1)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="model is tensor-parallel"):
        bundled.save_model_dir(model, cfg, out)
    assert os.listdir(tmp_path) == []  # (nothing written: no out, no temporary directory beside it)
    out.mkdir()  # an existing out, with overwrite: refused all the same, and left as it was
    (out / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="model is tensor-parallel"):
        bundled.save_model_dir(model, cfg, out, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(out) == ["keep.txt"]


def test_save_model_dir_refuses_a_model_from_load_tensor_parallel(tmp_path, world1):
    from flash_llm.parallel import load_tensor_parallel

    cfg = _cfg(tokenizer=bundled.BYTE_TOKENIZER)
    src = _model_dir(tmp_path / "src", cfg)
    model, _ = load_tensor_parallel(src, world1, dtype=torch.float16, progress=False)
    with pytest.raises(ValueError, match="model is tensor-parallel"):
        bundled.save_model_dir(model, cfg, tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["src"]


# ---- 2. one byte-level rule: generate, demo --model and prune --------------------------------------------------------
def test_is_byte_level_rule(tmp_path):
    assert bundled.is_byte_level({"flash_llm": {"tokenizer": "bytes"}, "vocab_size": 300})
    assert bundled.is_byte_level({"flash_llm": {"tokenizer": "bytes (UTF-8)"}, "vocab_size": 300})
    assert bundled.is_byte_level({"vocab_size": 256})
    assert not bundled.is_byte_level({"vocab_size": 320})
    assert not bundled.is_byte_level({"flash_llm": {"tokenizer": "gpt2"}, "vocab_size": 320})
    assert not bundled.is_byte_level({"flash_llm": {"tokenizer": ["bytes"]}, "vocab_size": 320})
    assert not bundled.is_byte_level({"flash_llm": "bytes", "vocab_size": 320})
    cfg = {"flash_llm": {"tokenizer": "bytes"}, "vocab_size": 256}
    assert bundled.is_byte_level(cfg, tmp_path)  # (no tokenizer files there)
    (tmp_path / "tokenizer.json").write_text("{}")
    assert not bundled.is_byte_level(cfg, tmp_path)  # the directory's own tokenizer wins
    assert not bundled.is_byte_level(cfg, str(tmp_path))


def _argv(command: str, d, tmp_path) -> list[str]:
    calib = tmp_path / "calib.txt"
    calib.write_text("First Citizen: Before we proceed any further, hear me speak.\n" * 4)
    return {"generate": ["generate", str(d), "--prompt", "ROMEO:", "--max-new-tokens", "2"],
            "demo": ["demo", "--model", str(d), "--method", "magnitude", "--gen-tokens", "0", "--eval-tokens", "40"],
            "prune": ["prune", str(d), "--method", "wanda", "--sparsity", "0.5", "--calib", str(calib),
                      "--calib-seqs", "2", "--seq-len", "16", "--out", str(tmp_path / "p")]}[command]


BYTE_LEVEL = {"declared 'bytes (UTF-8)'": dict(vocab_size=260, tokenizer="bytes (UTF-8)"),
              "vocab 256, no section": dict(vocab_size=256)}


@pytest.fixture(scope="module", params=list(BYTE_LEVEL))
def byte_dir(request, tmp_path_factory):
    return _model_dir(tmp_path_factory.mktemp("b") / "m", _cfg(**BYTE_LEVEL[request.param]))


@pytest.mark.parametrize("command", ["generate", "demo", "prune"])
def test_the_same_byte_level_directory_works_in_every_command(tmp_path, capsys, byte_dir, command):
    rc, out, err = run(capsys, *_argv(command, byte_dir, tmp_path))
    assert rc == 0, err
    if command != "generate":
        assert "tokenizer bytes" in out, out
    else:
        assert out.startswith("ROMEO:"), out
    if command == "prune":
        flash_llm.from_pretrained(tmp_path / "p", progress=False)  # (loads)


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory):
    """A 320-token vocabulary, no declared tokenizer, no tokenizer files: byte-level by no rule."""
    return _model_dir(tmp_path_factory.mktemp("o") / "m", _cfg(vocab_size=320))


@pytest.mark.parametrize("command", ["generate", "demo", "prune"])
def test_a_directory_that_is_not_byte_level_is_refused_by_every_command(tmp_path, capsys, other_dir, command):
    rc, _, err = run(capsys, *_argv(command, other_dir, tmp_path))
    assert rc == 2 and f"{other_dir} has no tokenizer files" in err, err
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("command", ["generate", "demo", "prune"])
def test_tokenizer_files_win_over_a_declared_byte_tokenizer_in_every_command(tmp_path, capsys, command):
    """A byte-level config.json beside tokenizer files: every command reads the files (here broken: refused the same
    way by all three; demo and prune used to take the bytes and ignore them)."""
    pytest.importorskip("transformers")
    d = _model_dir(tmp_path / "m", _cfg(tokenizer=bundled.BYTE_TOKENIZER))
    (d / "tokenizer_config.json").write_text("[]")  # (transformers: AttributeError)
    rc, _, err = run(capsys, *_argv(command, d, tmp_path))
    assert rc == 2 and f"error: {d}: no tokenizer could be loaded from it" in err, err
    assert not (tmp_path / "p").exists()


# ---- 3. the working directory is named ------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [["inspect", "."], ["generate", ".", "--prompt", "x"], ["convert", ".", "OUT"],
                                  ["prune", ".", "--method", "magnitude", "--sparsity", "0.5", "--out", "OUT"]])
def test_a_current_directory_that_is_no_checkpoint_is_named(tmp_path, capsys, monkeypatch, argv):
    monkeypatch.chdir(tmp_path)
    rc, _, err = run(capsys, *argv)
    assert rc == 2, err
    assert f"error: {tmp_path / 'config.json'}: config.json is missing" in err, err
    assert os.listdir(tmp_path) == []


def _starts(text: str) -> str:
    return "^" + re.escape(text)


def test_checkpoint_readers_name_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FormatError, match=_starts(f"{tmp_path / 'config.json'}: config.json is missing")):
        flash_llm.from_pretrained(".", progress=False)
    (tmp_path / "config.json").write_text(json.dumps(_cfg()))
    with pytest.raises(FormatError, match=_starts(f"{tmp_path}: no model.safetensors or")):
        _files.open_checkpoint(".")
    (tmp_path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(FormatError, match=_starts(f"{tmp_path / 'model.safetensors'}: not a readable safetensors")):
        _files.open_checkpoint(".")
    (tmp_path / "config.json").write_text("[]")
    with pytest.raises(FormatError, match=_starts(f"{tmp_path / 'config.json'}: config.json must hold a JSON")):
        _files.open_checkpoint(".")
    # a path with a directory part is named as given
    (tmp_path / "sub").mkdir()
    with pytest.raises(FormatError, match=_starts("sub/config.json: config.json is missing")):
        _files.open_checkpoint("sub")
    assert _files.named("sub/config.json") == "sub/config.json"
    assert _files.named("config.json") == str(tmp_path / "config.json")
    assert _files.named(".") == str(tmp_path)
    assert _files.named(tmp_path) == str(tmp_path)

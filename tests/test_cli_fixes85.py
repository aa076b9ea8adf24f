"""Session 85's command-line fixes (checkpoint paths, tokenizers):

1. an output path with a name that is not valid UTF-8 (``out\\xff``: a Latin-1 name; Python holds its bytes as lone
   surrogates) was written by ``convert``, ``prune``, ``flash_llm.save`` and ``SparseFormat.save`` but could never be
   read back (safetensors opens UTF-8 paths only), and every reader then called the intact file "truncated or
   corrupt"; ``convert``'s final print could even end in a UnicodeEncodeError traceback.  Such outputs are now refused
   before any work (``NonUTF8PathError``, a ValueError: exit status 2), and the readers name the UTF-8 problem;
2. a tokenizer that transformers failed to load with anything but OSError / ValueError (a tokenizer.json of a newer
   tokenizers library: a bare Exception; a tokenizer_config.json holding ``[]``: AttributeError; a tokenizer.json
   missing a key: KeyError) escaped ``generate``, ``demo --model`` and ``prune`` as a traceback (exit 1); now it is
   the one-line "no tokenizer could be loaded from it" (exit 2), as is a tokenizer with an empty vocabulary (a lone
   tokenizer_config.json), which ``generate`` blamed on the prompt ("encodes to no tokens");
3. ``prune --method magnitude`` reads no text, yet it demanded the model's tokenizer files (and transformers): the
   tokenizer is now loaded only when calibration text is read.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest
import torch

import flash_llm
from flash_llm import bundled, data
from flash_llm.checkpoint import _files
from flash_llm.formats import FormatError
from flash_llm.models import ModelConfig
from test_demo import run

BAD = "out\udcff"  # the name b"out\xff" as Python holds it (surrogateescape)


def _tiny_cfg(byte_level: bool = True) -> dict:
    """A 1-layer Llama with the bundled model's 256-token vocabulary; ``byte_level=False``: an ordinary Hugging Face
    config.json (no flash-llm section) of 320 tokens, whose tokenizer is the directory's own (256 tokens alone say
    byte-level, to every command since session 88)."""
    cfg = ModelConfig(family="llama", vocab_size=data.VOCAB_SIZE if byte_level else 320, hidden_size=64, num_layers=1,
                      num_heads=2, intermediate_size=128, max_position_embeddings=64).to_hf()
    return dict(cfg, flash_llm={"tokenizer": bundled.BYTE_TOKENIZER}) if byte_level else cfg


@pytest.fixture(scope="module")
def byte_model(tmp_path_factory):
    cfg = _tiny_cfg()
    return bundled.save_model_dir(bundled.build_model(cfg, seed=0), cfg, tmp_path_factory.mktemp("b") / "m")


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """Weights and config.json only: no tokenizer files."""
    cfg = _tiny_cfg(byte_level=False)
    return bundled.save_model_dir(bundled.build_model(cfg, seed=0), cfg, tmp_path_factory.mktemp("h") / "m")


def _with_tokenizer(hf_model, tmp_path, files: dict[str, str]):
    d = tmp_path / "m"
    shutil.copytree(hf_model, d)
    for name, text in files.items():
        (d / name).write_text(text)
    return d


def _newer_tokenizer_json() -> str:
    """A valid tokenizer.json but for a pre-tokenizer type this tokenizers does not know (as one written by a newer
    tokenizers: "data did not match any variant of untagged enum ...", a bare Exception)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    t = Tokenizer(models.WordLevel({"[UNK]": 0, **{chr(i): i for i in range(97, 123)}}, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    tj = json.loads(t.to_str())
    tj["pre_tokenizer"] = {"type": "SomeNewerPreTokenizer"}
    return json.dumps(tj)


def _entries(directory) -> list[bytes]:
    return sorted(os.listdir(os.fsencode(directory)))


# ---- 1. output paths that are not UTF-8 ------------------------------------------------------------------------------
def test_convert_refuses_an_out_name_that_is_not_utf8(tmp_path, capsys, byte_model):
    before = _entries(tmp_path)
    rc, out, err = run(capsys, "convert", str(byte_model), str(tmp_path / BAD))
    assert rc == 2, err
    assert f"OUT {tmp_path}/out\\xff: its name is not valid UTF-8" in err and "safetensors" in err, err
    err.encode("utf-8")  # printable on a strict UTF-8 stream: the bad byte shown as \xff
    assert _entries(tmp_path) == before  # nothing written, no temporary directory left


def test_convert_refuses_a_directory_on_the_way_that_is_not_utf8(tmp_path, capsys, byte_model):
    rc, _, err = run(capsys, "convert", str(byte_model), str(tmp_path / BAD / "sub"))
    assert rc == 2 and "the directory name 'out\\xff' in it is not valid UTF-8" in err, err
    assert _entries(tmp_path) == []


def test_prune_refuses_an_out_name_that_is_not_utf8(tmp_path, capsys, byte_model):
    rc, _, err = run(capsys, "prune", str(byte_model), "--method", "magnitude", "--sparsity", "0.5",
                     "--out", str(tmp_path / BAD))
    assert rc == 2 and "--out" in err and "is not valid UTF-8" in err, err
    assert _entries(tmp_path) == []


def test_save_refuses_a_path_that_is_not_utf8(tmp_path):
    w = torch.randn(64, 64, dtype=torch.float16)
    w[w.abs() < 1] = 0
    fmt = flash_llm.BitmapTiles.from_dense(w)
    path = tmp_path / "w\udcff.safetensors"
    with pytest.raises(_files.NonUTF8PathError, match=r"path .*w\\xff\.safetensors: its name is not valid UTF-8"):
        fmt.save(path)
    with pytest.raises(ValueError, match="is not valid UTF-8"):
        flash_llm.save({"a": fmt}, path)
    assert _entries(tmp_path) == []
    fmt.save(tmp_path / "w.safetensors")  # (a UTF-8 name, non-ASCII too, is fine)
    fmt.save(tmp_path / "wé.safetensors")
    assert torch.equal(flash_llm.load(tmp_path / "wé.safetensors").to_dense(), w)


def test_save_pretrained_refuses_a_path_that_is_not_utf8(tmp_path):
    cfg = _tiny_cfg()
    with pytest.raises(ValueError, match="is not valid UTF-8"):
        bundled.save_model_dir(bundled.build_model(cfg, seed=0), cfg, tmp_path / BAD)
    assert _entries(tmp_path) == []


def test_readers_name_the_utf8_problem_not_corruption(tmp_path, capsys, byte_model):
    d = tmp_path / BAD  # (made under a UTF-8 name, then renamed: as another tool could have written it)
    shutil.copytree(byte_model, tmp_path / "ok")
    os.rename(tmp_path / "ok", d)
    for argv in (["inspect", str(d)], ["generate", str(d), "--prompt", "hi", "--max-new-tokens", "1"]):
        rc, _, err = run(capsys, *argv)
        assert rc == 2, err
        assert "the name 'out\\xff' in this path is not valid UTF-8, which safetensors cannot open" in err, err
        assert "corrupt" not in err, err
    with pytest.raises(FormatError, match="is not valid UTF-8"):
        _files.open_checkpoint(d)
    w = torch.randn(64, 64, dtype=torch.float16)
    w[w.abs() < 1] = 0
    flash_llm.DeltaRows.from_dense(w).save(tmp_path / "w.safetensors")
    os.rename(tmp_path / "w.safetensors", tmp_path / "w\udcff.safetensors")
    with pytest.raises(FormatError, match=r"w\\xff\.safetensors: the name .* is not valid UTF-8") as e:
        flash_llm.load(tmp_path / "w\udcff.safetensors")
    assert "not a readable safetensors file" not in str(e.value)


# ---- 2. tokenizers that cannot be loaded ----------------------------------------------------------------------------
TOKENIZER_CASES = {
    "newer tokenizer.json": ({"tokenizer.json": "NEWER"}, "Exception: data did not match any variant"),
    # (transformers 5.25: AttributeError; 5.17, the GPU image's: TypeError)
    "tokenizer_config.json = []": ({"tokenizer_config.json": "[]"}, ("AttributeError", "TypeError")),
    "tokenizer.json missing a key": ({"tokenizer.json": '{"version": "1.0", "model": {"type": "BPE"}}'},
                                     "KeyError"),
}


@pytest.mark.parametrize("case", list(TOKENIZER_CASES))
@pytest.mark.parametrize("command", ["generate", "demo", "prune"])
def test_a_tokenizer_that_fails_to_load_is_a_one_line_error(tmp_path, capsys, hf_model, case, command):
    pytest.importorskip("transformers")
    files, why = TOKENIZER_CASES[case]
    files = {k: _newer_tokenizer_json() if v == "NEWER" else v for k, v in files.items()}
    d = _with_tokenizer(hf_model, tmp_path, files)
    calib = tmp_path / "calib.txt"
    calib.write_text("to be or not to be " * 50)
    argv = {"generate": ["generate", str(d), "--prompt", "hi", "--max-new-tokens", "1"],
            "demo": ["demo", "--model", str(d), "--method", "magnitude", "--gen-tokens", "0", "--eval-tokens", "10"],
            "prune": ["prune", str(d), "--method", "wanda", "--sparsity", "0.5", "--calib", str(calib),
                      "--out", str(tmp_path / "p")]}[command]
    rc, _, err = run(capsys, *argv)
    assert rc == 2, err
    assert any(f"error: {d}: no tokenizer could be loaded from it ({w}" in err
               for w in (why if isinstance(why, tuple) else (why,))), err
    assert not (tmp_path / "p").exists()


def test_an_empty_tokenizer_is_named_not_the_prompt(tmp_path, capsys, hf_model):
    pytest.importorskip("transformers")
    d = _with_tokenizer(hf_model, tmp_path, {"tokenizer_config.json": '{"tokenizer_class": "GPT2Tokenizer"}'})
    rc, _, err = run(capsys, "generate", str(d), "--prompt", "ROMEO:", "--max-new-tokens", "1")
    assert rc == 2, err
    assert "no tokenizer could be loaded from it" in err and "empty vocabulary" in err, err
    assert "prompt" not in err
    rc, _, err = run(capsys, "generate", str(d), "--prompt", "ROMEO:", "--max-new-tokens", "1", "--tokenizer", str(d))
    assert rc == 2 and f"--tokenizer {d}: no tokenizer could be loaded" in err and "empty vocabulary" in err, err


# ---- 3. prune --method magnitude without a tokenizer ----------------------------------------------------------------
def test_magnitude_prune_needs_no_tokenizer(tmp_path, capsys, hf_model):
    rc, out, err = run(capsys, "prune", str(hf_model), "--method", "magnitude", "--sparsity", "0.5",
                       "--out", str(tmp_path / "p"))
    assert rc == 0, err
    assert "pruned" in out and "tokenizer" not in out, out
    pruning = json.loads((tmp_path / "p" / "config.json").read_text())["flash_llm"]["pruning"]
    assert pruning["method"] == "magnitude" and pruning["calib"] is None and pruning["reached"] == 0.5, pruning
    flash_llm.from_pretrained(tmp_path / "p", progress=False)  # (loads)


def test_magnitude_prune_needs_no_transformers(tmp_path, capsys, hf_model, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # (`import transformers` raises ImportError)
    rc, _, err = run(capsys, "prune", str(hf_model), "--method", "magnitude", "--sparsity", "0.5",
                     "--out", str(tmp_path / "p"))
    assert rc == 0, err
    assert (tmp_path / "p" / "model.safetensors").is_file()


def test_magnitude_prune_still_needs_the_tokenizer_to_read_calib(tmp_path, capsys, hf_model):
    calib = tmp_path / "calib.txt"
    calib.write_text("to be or not to be " * 50)
    rc, _, err = run(capsys, "prune", str(hf_model), "--method", "magnitude", "--sparsity", "0.5", "--verbose",
                     "--calib", str(calib), "--out", str(tmp_path / "p"))
    assert rc == 2 and "has no tokenizer files" in err, err
    assert not (tmp_path / "p").exists()

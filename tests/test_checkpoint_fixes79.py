"""Session 79 fixes of the checkpoint code: a path that appears during a save is never replaced without overwrite,
torch.compile'd (and DataParallel) models saved under their own names, a save over the model's own source directory
refused as convert refuses it, a load->save round trip keeping config.json's unmodelled keys and generation_config.json,
load_tensor_parallel refusing what from_pretrained refuses, transformers' loader naming a malformed shard-header entry,
transformers' save leaving the permissions of files it did not write, write_sparse_bitmask's str targets / ignore,
convert not copying other formats' weight indexes, and early errors (convert onto a file, device="meta", a config.json
with an integer dtype)."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path
from unittest import mock

import pytest
import torch

import flash_llm
from flash_llm import FormatError, SparseLinear
from flash_llm.checkpoint import _files, convert, load_checkpoint, write_sparse_bitmask
from flash_llm.checkpoint import pretrained as pretrained_module
from flash_llm.cli import main

from _ckpt import edit_json, hf_model, read_shard, rewrite_shard, save_hf

transformers = pytest.importorskip("transformers")

UP = "model.layers.0.mlp.up_proj"  # 60 % zeros: compressed by convert
NORM = "model.norm.weight"
TOKENIZER_FILES = {"tokenizer.json": "{}", "tokenizer_config.json": "{}", "README.md": "# my model\n"}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A pruned Llama (untied): transformers' sharded dense checkpoint and its flash-llm conversion (one file)."""
    base = tmp_path_factory.mktemp("fixes79")
    dense = save_hf(hf_model("llama", seed=5), base / "dense")
    flash = base / "flash"
    convert(dense, flash, progress=False)
    assert (flash / "model.safetensors").exists()
    return dense, flash


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def _assert_same_state(a, b) -> None:
    sa, sb_ = _state(a), _state(b)
    assert sorted(sa) == sorted(sb_)
    for k in sa:
        assert sa[k].dtype == sb_[k].dtype and torch.equal(sa[k].cpu(), sb_[k].cpu()), k


# ---- 1. a path that appears at the output during a save ---------------------------------------------------------

def _appear(out: Path, what: str) -> None:
    if what == "directory":
        out.mkdir()
        (out / "precious.txt").write_text("another save's data")
    elif what == "empty directory":
        out.mkdir()
    else:
        out.write_text("a file")


def _intact(out: Path, what: str) -> bool:
    if what == "directory":
        return os.listdir(out) == ["precious.txt"] and (out / "precious.txt").read_text() == "another save's data"
    if what == "empty directory":
        return out.is_dir() and not os.listdir(out)
    return out.is_file() and out.read_text() == "a file"


@pytest.mark.parametrize("what", ["directory", "empty directory", "file"])
def test_atomic_directory_never_replaces_a_path_that_appeared_without_overwrite(tmp_path, what):
    out = tmp_path / "out"
    with pytest.raises(FileExistsError, match=rf"^{out} appeared while the new checkpoint was being written"):
        with _files.atomic_directory(out, overwrite=False) as tmp:
            (tmp / "config.json").write_text("{}")
            _appear(out, what)
    assert _intact(out, what)
    assert _leftovers(tmp_path) == []  # (the new directory's temporary is removed)


def test_atomic_directory_with_overwrite_never_replaces_a_file_that_appeared(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(FileExistsError, match=rf"^{out} exists and is not a directory"):
        with _files.atomic_directory(out, overwrite=True) as tmp:
            (tmp / "config.json").write_text("{}")
            _appear(out, "file")
    assert _intact(out, "file") and _leftovers(tmp_path) == []


def test_save_pretrained_keeps_a_directory_made_at_its_output_while_it_writes(sources, tmp_path):
    _, flash = sources
    model = flash_llm.from_pretrained(flash, progress=False)
    out = tmp_path / "out"
    real_close = _files.ShardWriter.close

    def close(self, *a, **k):
        _appear(out, "directory")
        return real_close(self, *a, **k)

    with mock.patch.object(_files.ShardWriter, "close", close):
        with pytest.raises(FileExistsError, match=rf"^{out} appeared while"):
            flash_llm.save_pretrained(model, out, overwrite=False, progress=False)
    assert _intact(out, "directory") and _leftovers(tmp_path) == []


# ---- 2. torch.compile'd / DataParallel models -------------------------------------------------------------------

@pytest.mark.parametrize("wrap", ["compile", "DataParallel"])
def test_a_wrapped_model_is_saved_under_its_own_names(sources, tmp_path, wrap):
    _, flash = sources
    model = flash_llm.from_pretrained(flash, progress=False)
    # (on a machine with one GPU DataParallel moves the model to cuda:0; the saves must work from there too)
    wrapped = torch.compile(model) if wrap == "compile" else torch.nn.DataParallel(model)
    flash_llm.save_pretrained(wrapped, tmp_path / "flash", progress=False)
    keys = list(read_shard(tmp_path / "flash" / "model.safetensors")[0])
    assert "lm_head.weight" in keys and not any(k.startswith(("_orig_mod.", "module.")) for k in keys)
    sparse = json.loads((tmp_path / "flash" / "config.json").read_text())["quantization_config"]["sparse_modules"]
    assert UP in sparse
    _assert_same_state(flash_llm.from_pretrained(tmp_path / "flash", progress=False), model)

    write_sparse_bitmask(wrapped, tmp_path / "bitmask", progress=False)
    keys = list(read_shard(tmp_path / "bitmask" / "model.safetensors")[0])
    assert "lm_head.weight" in keys and "lm_head.bitmask" not in keys  # (ignore=("lm_head",) matched it)
    assert f"{UP}.bitmask" in keys and not any(k.startswith(("_orig_mod.", "module.")) for k in keys)
    again = flash_llm.from_pretrained(tmp_path / "bitmask", sparsify=False, progress=False)
    dense = flash_llm.from_pretrained(flash, sparsify=False, progress=False)
    _assert_same_state(again, dense)


# ---- 3. saving over the model's own source directory -------------------------------------------------------------

def test_saving_over_the_models_source_directory_is_refused_as_convert_refuses_it(sources, tmp_path):
    _, flash = sources
    parent = tmp_path / "parent"
    parent.mkdir()
    d = _copy(flash, parent / "model")
    for name, text in TOKENIZER_FILES.items():
        (d / name).write_text(text)
    before = sorted(os.listdir(d))
    model = flash_llm.from_pretrained(d, progress=False)
    for save in (flash_llm.save_pretrained, write_sparse_bitmask):
        with pytest.raises(ValueError, match=rf"the model's source directory {d} and path {d} are the same directory.*"
                                             rf"the model was loaded from {d}, whose tokenizer files.*nothing was "
                                             "written"):
            save(model, d, overwrite=True, progress=False)
        with pytest.raises(ValueError, match=rf"source directory {d} lies inside path {parent}"):
            save(model, parent, overwrite=True, progress=False)
    assert sorted(os.listdir(d)) == before and _leftovers(parent) == [] and _leftovers(tmp_path) == []
    with pytest.raises(ValueError, match="are the same directory"):  # (convert's own refusal, in the same words)
        convert(d, d, overwrite=True, progress=False)
    flash_llm.save_pretrained(model, tmp_path / "elsewhere", progress=False)  # anywhere else: fine
    _assert_same_state(flash_llm.from_pretrained(tmp_path / "elsewhere", progress=False), model)


# ---- 4. config.json's unmodelled keys and generation_config.json -------------------------------------------------

@pytest.fixture(scope="module")
def byte_source(tmp_path_factory):
    """A vocab-300 Llama declaring flash-llm's byte tokenizer, with sampling defaults in its generation config."""
    m = hf_model("llama", vocab=300, seed=6)
    m.generation_config.do_sample, m.generation_config.temperature, m.generation_config.top_p = True, 0.6, 0.9
    m.generation_config.eos_token_id = [2, 7]
    d = save_hf(m, tmp_path_factory.mktemp("bytes") / "src")
    edit_json(d / "config.json", lambda c: c.update(flash_llm={"tokenizer": "bytes"}, my_custom_key=[1, 2]))
    return d


def test_round_trip_keeps_config_keys_and_generation_config(byte_source, tmp_path, capsys):
    src = json.loads((byte_source / "config.json").read_text())
    generation = json.loads((byte_source / "generation_config.json").read_text())
    model = flash_llm.from_pretrained(byte_source, progress=False)
    assert model.config.eos_token_id == [2, 7]  # (generation_config.json's)
    out = tmp_path / "out"
    flash_llm.save_pretrained(model, out, progress=False)
    saved = json.loads((out / "config.json").read_text())
    assert saved["flash_llm"] == {"tokenizer": "bytes"} and saved["my_custom_key"] == [1, 2]
    for key in ("use_cache", "transformers_version", "eos_token_id"):
        assert saved.get(key) == src.get(key), key
    assert json.loads((out / "generation_config.json").read_text()) == generation
    g = transformers.AutoModelForCausalLM.from_pretrained(out).generation_config
    assert (g.do_sample, g.temperature, g.top_p, g.eos_token_id) == (True, 0.6, 0.9, [2, 7])
    again = flash_llm.from_pretrained(out, progress=False)
    assert again.config == model.config
    _assert_same_state(again, model)
    rc = main(["generate", str(out), "--prompt", "hi", "--max-new-tokens", "2", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 0, err

    model.config.eos_token_id = 9  # changed after the load: both files say so, and a reload gets it
    flash_llm.save_pretrained(model, tmp_path / "eos", progress=False)
    assert json.loads((tmp_path / "eos" / "config.json").read_text())["eos_token_id"] == 9
    assert json.loads((tmp_path / "eos" / "generation_config.json").read_text())["eos_token_id"] == 9
    assert flash_llm.from_pretrained(tmp_path / "eos", progress=False).config.eos_token_id == 9


def test_round_trip_of_a_transformers_model_keeps_generation_config(byte_source, tmp_path):
    model = flash_llm.from_pretrained(byte_source, backend="hf", progress=False)
    assert model.generation_config.do_sample is True
    flash_llm.save_pretrained(model, tmp_path / "out", progress=False)
    saved = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert (saved["do_sample"], saved["temperature"], saved["top_p"], saved["eos_token_id"]) == (True, 0.6, 0.9, [2, 7])
    assert json.loads((tmp_path / "out" / "config.json").read_text())["flash_llm"] == {"tokenizer": "bytes"}


def test_bundled_model_round_trip_keeps_its_flash_llm_section(tmp_path, capsys):
    from flash_llm import bundled

    src = json.loads((bundled.path() / "config.json").read_text())
    model = flash_llm.from_pretrained(bundled.path(), progress=False)
    flash_llm.save_pretrained(model, tmp_path / "ts", progress=False)
    saved = json.loads((tmp_path / "ts" / "config.json").read_text())
    assert saved["flash_llm"] == src["flash_llm"] and saved["torch_dtype"] == saved["dtype"] == "float16"
    assert not (tmp_path / "ts" / "generation_config.json").exists()  # (the source has none)
    rc = main(["generate", str(tmp_path / "ts"), "--prompt", "ROMEO:", "--max-new-tokens", "4", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert rc == 0 and out.startswith("ROMEO:"), err


# ---- 5. load_tensor_parallel refuses what from_pretrained refuses ----------------------------------------------

def _int16(path: Path, name: str) -> None:
    index = path / "model.safetensors.index.json"
    file = path / (json.loads(index.read_text())["weight_map"][name] if index.exists() else "model.safetensors")
    tensors, meta = read_shard(file)
    tensors[name] = (tensors[name].float() * 100).to(torch.int16)
    rewrite_shard(file, tensors, meta)


@pytest.mark.parametrize("which", ["dense", "flash"])
def test_tensor_parallel_load_refuses_an_integer_tensor_where_a_weight_belongs(sources, world1, tmp_path, which):
    from flash_llm.parallel import load_tensor_parallel

    d = _copy(sources[0] if which == "dense" else sources[1], tmp_path / which)
    _int16(d, NORM)
    with pytest.raises(FormatError) as one:
        flash_llm.from_pretrained(d, progress=False)
    with pytest.raises(FormatError) as tp:
        load_tensor_parallel(d, world1, progress=False)
    assert str(tp.value) == str(one.value)
    assert str(tp.value).endswith(f".safetensors: tensor '{NORM}' has dtype torch.int16; the model expects "
                                  "torch.float16") and str(tp.value).startswith(str(d))


@pytest.mark.parametrize("which", ["dense", "flash"])
def test_tensor_parallel_load_refuses_a_tensor_stored_twice(world1, tmp_path, which):
    """An OPT tensor stored as 'model.X' and as 'X': from_pretrained refuses it, naming both; so does the TP loader."""
    from flash_llm.parallel import load_tensor_parallel

    norm = "model.decoder.final_layer_norm.weight"
    d = save_hf(hf_model("opt", seed=2), tmp_path / "dense", shard="50MB")
    if which == "flash":
        convert(d, tmp_path / "flash", progress=False)
        d = tmp_path / "flash"
    tensors, meta = read_shard(d / "model.safetensors")
    tensors[norm.removeprefix("model.")] = torch.full_like(tensors[norm], 7.0)
    rewrite_shard(d / "model.safetensors", tensors, meta)
    with pytest.raises(FormatError, match="stored a second time") as one:
        flash_llm.from_pretrained(d, progress=False)
    with pytest.raises(FormatError, match="stored a second time") as tp:
        load_tensor_parallel(d, world1, progress=False)
    assert str(tp.value) == str(one.value)
    assert str(tp.value).startswith(f"{d / 'model.safetensors'}: tensor ")


# ---- 6. transformers' loader: a malformed shard-header entry ----------------------------------------------------

@pytest.mark.parametrize("bad, why", [("{not json", "is not valid JSON"), ("[1, 2]", "must be a JSON object"),
                                      ("null", "must be a JSON object")])
def test_transformers_loader_names_file_and_entry_of_a_malformed_header(sources, tmp_path, bad, why):
    d = _copy(sources[1], tmp_path / "flash")
    key = f"{UP}.weight_flash_llm"
    tensors, meta = read_shard(d / "model.safetensors")
    meta[key] = bad
    rewrite_shard(d / "model.safetensors", tensors, meta)
    with pytest.raises(FormatError, match=rf"^{d / 'model.safetensors'}: metadata '{key}' {why}"):
        transformers.AutoModelForCausalLM.from_pretrained(d)


# ---- 7. transformers' save: permissions of the files it wrote only ---------------------------------------------

def test_transformers_save_changes_the_mode_of_the_files_it_wrote_only(sources, tmp_path):
    from safetensors.torch import save_file

    model = transformers.AutoModelForCausalLM.from_pretrained(sources[1])
    assert any(isinstance(m, SparseLinear) for m in model.modules())
    out = tmp_path / "out"
    out.mkdir()
    private = out / "private_adapter.safetensors"
    save_file({"x": torch.zeros(2)}, str(private))
    os.chmod(private, 0o600)
    old = os.umask(0o027)
    try:
        model.save_pretrained(out)
    finally:
        os.umask(old)
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE((out / "model.safetensors").stat().st_mode) == 0o666 & ~0o027


# ---- 8. write_sparse_bitmask: a str targets / ignore ------------------------------------------------------------

def test_write_sparse_bitmask_takes_a_str_as_one_pattern(sources, tmp_path):
    model = flash_llm.from_pretrained(sources[1], progress=False)
    for kw in ({"targets": "Linear"}, {"ignore": "lm_head"}, {"targets": "Linear", "ignore": "lm_head"}):
        out = tmp_path / "_".join(kw)
        report = write_sparse_bitmask(model, out, progress=False, **kw)
        sparsity = json.loads((out / "config.json").read_text())["quantization_config"]["sparsity_config"]
        assert sparsity["targets"] == ["Linear"] and sparsity["ignore"] == ["lm_head"], kw
        names = {c.fqn for c in report.converted}
        assert UP in names and "lm_head" not in names, kw


@pytest.mark.parametrize("kw, error, match", [
    ({"targets": 5}, TypeError, r"^targets must be a str or a list of str"),
    ({"ignore": ["lm_head", 3]}, TypeError, r"^ignore must be a str or a list of str"),
    ({"ignore": "re:(unclosed"}, ValueError, r"^ignore has an invalid regular expression 're:\(unclosed'"),
])
def test_write_sparse_bitmask_refuses_bad_patterns_before_writing(sources, tmp_path, kw, error, match):
    model = flash_llm.from_pretrained(sources[1], progress=False)
    with pytest.raises(error, match=match):
        write_sparse_bitmask(model, tmp_path / "out", progress=False, **kw)
    assert sorted(os.listdir(tmp_path)) == []


# ---- 9. convert: no weight index of another format --------------------------------------------------------------

def test_convert_copies_no_weight_index_of_any_format(sources, tmp_path):
    src = _copy(sources[0], tmp_path / "src")
    for index in ("pytorch_model.bin.index.json", "tf_model.h5.index.json", "flax_model.msgpack.index.json"):
        (src / index).write_text(json.dumps({"metadata": {}, "weight_map": {"lm_head.weight": "x-00001.bin"}}))
    (src / "pytorch_model-00001-of-00001.bin").write_bytes(b"\0" * 16)
    (src / "tokenizer.json").write_text("{}")
    convert(src, tmp_path / "out", progress=False)
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "generation_config.json", "model.safetensors",
                                                    "tokenizer.json"]


# ---- 10. errors that came late or blamed the wrong thing -------------------------------------------------------

def test_convert_onto_an_existing_file_fails_before_loading(sources, tmp_path, capsys):
    target = tmp_path / "a-file"
    target.write_text("not a checkpoint")
    with mock.patch.object(pretrained_module._model, "build_skeleton", side_effect=AssertionError("model loaded")):
        with pytest.raises(FileExistsError, match=rf"^{target} exists and is not a directory; remove it first$"):
            convert(sources[0], target, overwrite=True, progress=False)
        rc = main(["convert", str(sources[0]), str(target), "--overwrite"])
    err = capsys.readouterr().err
    assert rc == 2 and f"{target} exists and is not a directory" in err and "model loaded" not in err
    assert target.read_text() == "not a checkpoint"


def test_from_pretrained_refuses_the_meta_device_naming_it(sources):
    with pytest.raises(ValueError, match=r"^device='meta': loading onto the meta device is not supported"):
        flash_llm.from_pretrained(sources[1], device="meta", progress=False)


def test_load_checkpoint_refuses_the_meta_device_before_touching_the_module(sources):
    """``load_checkpoint`` called directly checks its device as ``from_pretrained`` does (it went on to fail
    blaming the checkpoint, after some of the module's tensors were already assigned)."""
    model = flash_llm.from_pretrained(sources[0], sparsify=False, progress=False)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"^device='meta': loading onto the meta device is not supported"):
        load_checkpoint(model, sources[1], device="meta", progress=False)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)


def test_convert_to_sparse_bitmask_names_config_json_for_an_integer_dtype(sources, tmp_path):
    src = _copy(sources[0], tmp_path / "src")
    edit_json(src / "config.json", lambda c: c.update(dtype="int8"))
    with pytest.raises(ValueError, match=rf"^{src / 'config.json'} declares dtype 'int8', which is not a "
                                         "floating-point dtype"):
        convert(src, tmp_path / "out", format="sparse-bitmask", progress=False)
    assert not (tmp_path / "out").exists()
    convert(src, tmp_path / "out", format="sparse-bitmask", dtype=torch.float16, progress=False)  # (as it says)

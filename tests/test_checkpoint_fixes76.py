"""Session 76 fixes of the checkpoint code: saves refusing what no reader loads (sparse layers of several dtypes),
tensors stored twice or listed sparse but stored dense refused on load, untied tensors sharing memory written under
both names, an unreadable config.json as an input error of the CLI, write_sparse_bitmask keeping generation_config.json,
long output names, and the CLI's byte tokenizer with ids above 255."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

import flash_llm
from flash_llm import FormatError, SparseLinear
from flash_llm.checkpoint import _files, convert, write_sparse_bitmask
from flash_llm.cli import main

from _ckpt import hf_model, read_shard, rewrite_shard, save_hf

transformers = pytest.importorskip("transformers")

UP = "model.layers.0.mlp.up_proj"  # 60 % zeros: compressed by convert


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A pruned Llama (untied): transformers' sharded dense checkpoint, its flash-llm conversion (one file) and its
    sparse-bitmask conversion (one file)."""
    base = tmp_path_factory.mktemp("fixes76")
    dense = save_hf(hf_model("llama", seed=3), base / "dense")
    flash, bitmask = base / "flash", base / "bitmask"
    convert(dense, flash, progress=False)
    convert(dense, bitmask, format="sparse-bitmask", progress=False)
    assert (flash / "model.safetensors").exists() and (bitmask / "model.safetensors").exists()
    return dense, flash, bitmask


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _leftovers(parent) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def _split_with_extra(path, extra: dict[str, torch.Tensor]) -> None:
    """Make the one-file checkpoint ``path`` two shards plus an index: its own tensors, then ``extra``."""
    tensors, meta = read_shard(path / "model.safetensors")
    os.remove(path / "model.safetensors")
    first, second = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    rewrite_shard(path / first, tensors, meta)
    rewrite_shard(path / second, extra, {"format": "pt"})
    weight_map = {**{k: first for k in tensors}, **{k: second for k in extra}}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


# ---- 1. sparse layers of several dtypes ---------------------------------------------------------------------------

def _recompress_bf16(model, fqn: str = UP) -> None:
    layer = model.get_submodule(fqn)
    parent, _, attr = fqn.rpartition(".")
    setattr(model.get_submodule(parent), attr,
            SparseLinear.from_dense(layer.to_dense(), layer.bias, dtype=torch.bfloat16))


def test_save_refuses_sparse_layers_of_several_dtypes_before_writing(sources, tmp_path):
    """config.json holds one dtype, the one both readers build the model in (and such a model cannot run a forward
    pass): a model whose sparse layers hold fp16 and bf16 is refused, naming layers and dtypes, and nothing is
    written."""
    _, flash, _ = sources
    model = flash_llm.from_pretrained(flash, backend="flash", progress=False)
    _recompress_bf16(model)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=rf"sparse layers hold several dtypes: bfloat16 \(1 layer: '{UP}'\), "
                                         r"float16 \(\d+ layers: '"):
        flash_llm.save_pretrained(model, out, progress=False)
    assert not out.exists() and not _leftovers(tmp_path)
    # the existing checkpoint of an overwrite stays as it was
    flash_llm.save_pretrained(flash_llm.from_pretrained(flash, progress=False), out, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ValueError, match="several dtypes"):
        flash_llm.save_pretrained(model, out, overwrite=True, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and not _leftovers(tmp_path)


def test_transformers_save_refuses_sparse_layers_of_several_dtypes(sources, tmp_path):
    _, flash, _ = sources
    model = transformers.AutoModelForCausalLM.from_pretrained(flash)
    _recompress_bf16(model)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=rf"several dtypes: bfloat16 \(1 layer: '{UP}'\)"):
        model.save_pretrained(out)
    assert not out.exists()


# ---- 2. a weight stored twice ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["one file", "sharded"])
def test_flash_weight_stored_dense_and_compressed_is_refused(sources, tmp_path, layout, capsys):
    _, flash, _ = sources
    path = shutil.copytree(flash, tmp_path / "ckpt")
    stray = {f"{UP}.weight": torch.full((96, 64), 0.5, dtype=torch.float16)}
    if layout == "one file":
        tensors, meta = read_shard(path / "model.safetensors")
        rewrite_shard(path / "model.safetensors", {**tensors, **stray}, meta)
        where = f"{path / 'model.safetensors'}: tensor '{UP}.weight' is stored twice"
    else:
        _split_with_extra(path, stray)
        where = (f"{path / 'model-00002-of-00002.safetensors'}: tensor '{UP}.weight' is stored twice: dense here, "
                 f"and compressed \\('{UP}.weight_data', '{UP}.weight_offsets'\\) in "
                 "model-00001-of-00002.safetensors")
    for sparsify in (None, False):
        with pytest.raises(FormatError, match=where):
            flash_llm.from_pretrained(path, sparsify=sparsify, progress=False)
    rc, _, err = run(capsys, "inspect", path)
    assert rc == 2 and f"tensor '{UP}.weight' is stored twice" in err
    if layout == "one file":  # transformers' loader (flash-llm's quantizer) refuses it too
        with pytest.raises(FormatError, match=rf"{path}: tensor '{UP}.weight' is stored twice: dense, and compressed"):
            transformers.AutoModelForCausalLM.from_pretrained(path)


def test_bitmask_weight_stored_dense_and_compressed_is_refused(sources, tmp_path):
    _, _, bitmask = sources
    path = shutil.copytree(bitmask, tmp_path / "ckpt")
    _split_with_extra(path, {f"{UP}.weight": torch.full((96, 64), 0.5, dtype=torch.float16)})
    with pytest.raises(FormatError, match=rf"{path / 'model-00002-of-00002.safetensors'}: tensor '{UP}.weight' is "
                                          rf"stored twice: dense here, and in sparse-bitmask form \('{UP}."
                                          r"shape', .*\) in model-00001-of-00002.safetensors"):
        flash_llm.from_pretrained(path, sparsify=False, progress=False)


# ---- 3. a layer listed as sparse but stored dense -------------------------------------------------------------------

def test_layer_listed_sparse_but_stored_dense_is_refused_like_transformers(sources, tmp_path):
    dense, flash, _ = sources
    path = shutil.copytree(dense, tmp_path / "ckpt")
    shutil.copy(flash / "config.json", path / "config.json")  # lists the sparse layers; the shards hold them dense
    first = next(iter(json.loads((path / "config.json").read_text())["quantization_config"]["sparse_modules"]))
    message = rf"{path}: tensor '{first}\.weight_data' of sparse layer '{first}' is missing \(no shard holds it"
    with pytest.raises(FormatError, match=message):
        flash_llm.from_pretrained(path, progress=False)
    with pytest.raises(FormatError, match=message):
        transformers.AutoModelForCausalLM.from_pretrained(path)
    with pytest.raises(FormatError, match=rf"{message}; '{first}\.weight' is stored dense"):
        flash_llm.from_pretrained(path, sparsify=False, progress=False)


# ---- 4. untied parameters that share memory -------------------------------------------------------------------------

def test_untied_parameters_sharing_memory_are_saved_under_both_names(sources, tmp_path):
    dense, _, _ = sources
    model = flash_llm.from_pretrained(dense, backend="flash", progress=False)
    embed = model.get_parameter("model.embed_tokens.weight")
    model.load_state_dict({"lm_head.weight": embed.detach()}, strict=False, assign=True)  # same memory, not tied
    assert model.lm_head.weight is not embed and model.lm_head.weight.data_ptr() == embed.data_ptr()
    assert not model.config.tie_word_embeddings
    out = tmp_path / "out"
    flash_llm.save_pretrained(model, out, progress=False)
    back = flash_llm.from_pretrained(out, progress=False)
    assert torch.equal(back.lm_head.weight, embed) and torch.equal(back.get_parameter("model.embed_tokens.weight"),
                                                                   embed)
    assert back.lm_head.weight is not back.get_parameter("model.embed_tokens.weight")
    # real ties (one Parameter under two names) are still stored once
    tied = hf_model("opt")
    assert tied.lm_head.weight is tied.get_input_embeddings().weight
    flash_llm.save_pretrained(tied, tmp_path / "tied", progress=False)
    tensors, _ = read_shard(tmp_path / "tied" / "model.safetensors")
    assert "lm_head.weight" not in tensors and "model.decoder.embed_tokens.weight" in tensors


# ---- 5. an unreadable config.json -----------------------------------------------------------------------------------

def test_unreadable_config_json_is_an_input_error(sources, tmp_path, capsys):
    dense, _, _ = sources
    bad = shutil.copytree(dense, tmp_path / "bad")
    os.remove(bad / "config.json")
    (bad / "config.json").mkdir()  # (root reads a mode-000 file: a directory cannot be read by anyone)
    message = f"error: {bad / 'config.json'}: cannot read config.json (Is a directory)"
    rc, _, err = run(capsys, "inspect", bad)
    assert rc == 2 and message in err and "Traceback" not in err
    out = tmp_path / "out"
    rc, _, err = run(capsys, "convert", bad, out)
    assert rc == 2 and message in err and "writing OUT" not in err
    assert not out.exists() and _leftovers(tmp_path) == []
    with pytest.raises(FormatError, match="cannot read config.json"):
        flash_llm.from_pretrained(bad, progress=False)


# ---- 6. write_sparse_bitmask and generation_config.json ---------------------------------------------------------

def test_write_sparse_bitmask_writes_generation_config(tmp_path):
    model = hf_model("llama")
    model.generation_config.eos_token_id = [2, 5]  # (Llama-3-Instruct: config.json says 2)
    model.generation_config.temperature, model.generation_config.do_sample = 0.6, True
    out = tmp_path / "bm"
    write_sparse_bitmask(model, out, progress=False)
    written = json.loads((out / "generation_config.json").read_text())
    assert written["eos_token_id"] == [2, 5] and written["temperature"] == 0.6
    assert flash_llm.from_pretrained(out, backend="flash", progress=False).config.eos_token_id == [2, 5]


# ---- 7. long output names -------------------------------------------------------------------------------------------

def test_output_names_up_to_the_limit_are_written(sources, tmp_path, capsys):
    dense, flash, _ = sources
    out = tmp_path / ("m" * 250)
    rc, _, err = run(capsys, "convert", dense, out)
    assert rc == 0, err
    flash_llm.from_pretrained(out, progress=False)
    flash_llm.save_pretrained(flash_llm.from_pretrained(flash, progress=False), out, overwrite=True, progress=False)
    assert _leftovers(tmp_path) == []
    assert len(_files._temp_prefix(out, "probe").encode()) + 8 <= 255  # (mkdtemp adds 8 characters)


def test_a_too_long_output_name_says_so(sources, tmp_path, capsys):
    dense, flash, _ = sources
    out = tmp_path / ("m" * 256)
    rc, _, err = run(capsys, "convert", dense, out)
    assert rc == 2 and "name is 256 bytes long; the file system allows at most 255" in err
    assert "cannot create a directory" not in err
    with pytest.raises(OSError, match="name is 256 bytes long") as info:
        flash_llm.save_pretrained(flash_llm.from_pretrained(flash, progress=False), out, progress=False)
    assert not isinstance(info.value, PermissionError)
    deep = tmp_path / ("d" * 300) / "out"  # a directory to be created on the way
    with pytest.raises(OSError, match=r"directory .dddd.*\.\.\.. on the way is 300 bytes long; the file system"):
        _files.check_writable(deep, "destination")
    assert _leftovers(tmp_path) == [] and sorted(p.name for p in tmp_path.iterdir()) == []


# ---- engine finding 3: the CLI's byte tokenizer -----------------------------------------------------------------

def test_byte_tokenizer_skips_ids_that_are_no_bytes():
    from flash_llm.checkpoint.cli import _Bytes

    tok = _Bytes()
    assert tok.decode([104, 256, 105, 299, -1]) == "hi"
    assert tok.decode(list("é".encode()) + [300]) == "é" and tok.decode([256]) == ""


@pytest.fixture(scope="module")
def vocab300(tmp_path_factory):
    """A Llama of vocabulary 300 declaring the byte tokenizer, whose greedy token is always 257 or 258 (the sign of
    the first hidden unit picks: lm_head holds only those rows)."""
    model = hf_model("llama", vocab=300)
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.weight[257, 0], model.lm_head.weight[258, 0] = 100.0, -100.0
    path = save_hf(model, tmp_path_factory.mktemp("vocab300") / "ckpt")
    config = json.loads((path / "config.json").read_text())
    config["flash_llm"] = {"tokenizer": "bytes (token id = byte value; 256 and up: special tokens)"}
    config["eos_token_id"] = 256
    (path / "config.json").write_text(json.dumps(config))
    generation = json.loads((path / "generation_config.json").read_text())
    generation["eos_token_id"] = 256
    (path / "generation_config.json").write_text(json.dumps(generation))
    return path


def test_generate_with_the_byte_tokenizer_prints_no_ids_above_255(vocab300, capsys):
    rc, out, err = run(capsys, "generate", vocab300, "--prompt", "hello", "--max-new-tokens", 5, "--device", "cpu")
    assert rc == 0, err
    assert out == "hello\n" and "5 new tokens" in err and "error" not in err


def test_generate_with_the_byte_tokenizer_stops_at_an_eos_above_255(vocab300, tmp_path, capsys):
    path = shutil.copytree(vocab300, tmp_path / "ckpt")
    config = json.loads((path / "config.json").read_text())
    config["eos_token_id"] = [257, 258]
    (path / "config.json").write_text(json.dumps(config))
    generation = json.loads((path / "generation_config.json").read_text())  # (its eos replaces config.json's)
    generation["eos_token_id"] = [257, 258]
    (path / "generation_config.json").write_text(json.dumps(generation))
    rc, out, err = run(capsys, "generate", path, "--prompt", "hello", "--max-new-tokens", 5, "--device", "cpu")
    assert rc == 0, err
    assert out == "hello\n" and "1 new token;" in err

"""Bad checkpoints and interrupted writes: every case is an error naming the file and the tensor (never a silently
wrong model); outputs are written atomically and never overwritten by accident."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import flash_llm
from flash_llm import FormatError
from flash_llm.checkpoint import _files, convert

from _ckpt import edit_json, edit_tensor, hf_model, read_shard, rewrite_shard, save_hf, shard_of

transformers = pytest.importorskip("transformers")

UP = "model.layers.1.mlp.up_proj"


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A pruned Llama: transformers' dense checkpoint and its flash-llm conversion, both sharded."""
    base = tmp_path_factory.mktemp("errors")
    dense = save_hf(hf_model("llama", seed=7), base / "dense")
    flash = base / "flash"
    convert(dense, flash, max_shard_size="16KB", progress=False)
    assert (flash / "model.safetensors.index.json").exists()
    return dense, flash


@pytest.fixture
def dense(sources, tmp_path):
    return shutil.copytree(sources[0], tmp_path / "dense")


@pytest.fixture
def flash(sources, tmp_path):
    return shutil.copytree(sources[1], tmp_path / "flash")


@pytest.mark.parametrize("which", ["dense", "flash"])
def test_truncated_shard(request, which):
    path = request.getfixturevalue(which)
    file = shard_of(path, f"{UP}.weight" if which == "dense" else f"{UP}.weight_data")
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 100])
    with pytest.raises(FormatError, match=rf"{file}: not a readable safetensors file, truncated or corrupt"):
        flash_llm.from_pretrained(path)


def test_missing_tensor(dense):
    edit_tensor(dense, f"{UP}.weight", lambda t: None)
    with pytest.raises(FormatError, match=rf"{dense}: tensor '{UP}.weight' is missing \(no shard holds it\)"):
        flash_llm.from_pretrained(dense)


def test_missing_sparse_array(flash):
    edit_tensor(flash, f"{UP}.weight_offsets", lambda t: None)
    with pytest.raises(FormatError, match=rf"tensor '{UP}.weight_offsets' is missing \(no shard holds it; "
                                          rf"'{UP}.weight_data' is in model-\d+-of-\d+.safetensors\)"):
        flash_llm.from_pretrained(flash)
    with pytest.raises(FormatError, match=rf"{flash}: tensor '{UP}.weight_offsets' of sparse layer '{UP}' is missing"):
        transformers.AutoModelForCausalLM.from_pretrained(flash)


def test_index_and_shards_disagree(dense):
    index = dense / "model.safetensors.index.json"
    shard = shard_of(dense, f"{UP}.weight")
    edit_json(index, lambda d: d["weight_map"].update({"model.layers.9.mlp.up_proj.weight": shard.name}))
    with pytest.raises(FormatError, match=rf"{shard}: tensor 'model.layers.9.mlp.up_proj.weight' is missing \(the "
                                          "index lists it in this shard\\)"):
        flash_llm.from_pretrained(dense)
    edit_json(index, lambda d: d["weight_map"].pop("model.layers.9.mlp.up_proj.weight"))
    weight_map = json.loads(index.read_text())["weight_map"]
    name = next(k for k, f in weight_map.items() if list(weight_map.values()).count(f) > 1)  # a shared shard
    edit_json(index, lambda d: d["weight_map"].pop(name))
    with pytest.raises(FormatError, match=rf"{dense / weight_map[name]}: holds tensor '{name}' that "
                                          "model.safetensors.index.json does not list"):
        flash_llm.from_pretrained(dense)
    edit_json(index, lambda d: d["weight_map"].update({name: weight_map[name],
                                                       "x.weight": "model-00099-of-00099.safetensors"}))
    with pytest.raises(FormatError, match=r"model-00099-of-00099.safetensors: shard file is missing"):
        flash_llm.from_pretrained(dense)


def test_shape_mismatch(dense):
    file = edit_tensor(dense, "model.embed_tokens.weight", lambda t: t[:, :32].contiguous())
    with pytest.raises(FormatError, match=rf"{file}: tensor 'model.embed_tokens.weight' has shape \(97, 32\); the "
                                          r"model built from config.json expects \(97, 64\)"):
        flash_llm.from_pretrained(dense)


def test_unexpected_tensor(dense):
    file = shard_of(dense, f"{UP}.weight")
    tensors, meta = read_shard(file)
    tensors["model.layers.1.mlp.extra.weight"] = torch.zeros(3, dtype=torch.float16)
    rewrite_shard(file, tensors, meta)
    edit_json(dense / "model.safetensors.index.json",
              lambda d: d["weight_map"].update({"model.layers.1.mlp.extra.weight": file.name}))
    with pytest.raises(FormatError, match=rf"{file}: tensor 'model.layers.1.mlp.extra.weight' has no place in the "
                                          r"LlamaForCausalLM built from .*config.json"):
        flash_llm.from_pretrained(dense)


@pytest.mark.parametrize("edit, error, match", [
    (lambda d: d.update(intermediate_size=128), FormatError,
     r"tensor 'model.layers.0.mlp.(down|gate|up)_proj.weight' has shape \((96, 64|64, 96)\); the model built from "
     r"config.json expects"),
    (lambda d: d.update(num_hidden_layers=3), FormatError,
     r"tensor 'model.layers.2.[a-z_.]+' is missing \(no shard holds it\)"),
    (lambda d: d.update(num_hidden_layers=1), FormatError, r"tensor 'model.layers.1.[a-z_.]+' has no place"),
    (lambda d: d.update(model_type="no-such-model"), ValueError, r"no-such-model"),
    (lambda d: d.update(quantization_config={"quant_method": "gptq", "bits": 4}), FormatError,
     r"config.json: quantization_config has quant_method 'gptq'"),
])
def test_wrong_config_json(dense, edit, error, match):
    edit_json(dense / "config.json", edit)
    with pytest.raises(error, match=match):
        flash_llm.from_pretrained(dense)


def test_unreadable_config_json(dense):
    (dense / "config.json").write_text("{not json")
    with pytest.raises(FormatError, match=rf"{dense / 'config.json'}: config.json is not valid JSON"):
        flash_llm.from_pretrained(dense)
    (dense / "config.json").unlink()
    with pytest.raises(FormatError, match=rf"{dense / 'config.json'}: config.json is missing"):
        flash_llm.from_pretrained(dense)


def test_not_a_checkpoint(tmp_path, dense):
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
        flash_llm.from_pretrained(tmp_path / "nothing")
    with pytest.raises(FormatError, match="expected a checkpoint directory"):
        flash_llm.from_pretrained(dense / "config.json")
    for f in dense.glob("model*"):
        f.unlink()
    (dense / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FormatError, match=r"no model.safetensors or model.safetensors.index.json \(found "
                                          r"pytorch_model.bin: flash-llm reads safetensors checkpoints only\)"):
        flash_llm.from_pretrained(dense)


def test_unknown_format_version(flash):
    edit_json(flash / "config.json", lambda d: d["quantization_config"].update(format_version=2))
    with pytest.raises(FormatError, match=r"config.json: quantization_config.format_version is 2; this flash-llm "
                                          r"\(0.1.0\) reads flash-llm checkpoint format version 1"):
        flash_llm.from_pretrained(flash)
    with pytest.raises(ValueError, match=r"format_version is 2"):
        transformers.AutoModelForCausalLM.from_pretrained(flash)
    edit_json(flash / "config.json", lambda d: d["quantization_config"].update(format_version=1))
    edit_json(flash / "config.json", lambda d: d["quantization_config"]["sparse_modules"][UP].update(version=9))
    with pytest.raises(FormatError, match=rf"layer '{UP}' has flash_llm.bitmap_tiles format version 9; this "
                                          r"flash-llm reads versions 1 and 2"):
        flash_llm.from_pretrained(flash)


def test_bitmap_version_1_layer_is_converted_on_load(flash):
    """A checkpoint written before BitmapTiles version 2 (one layer's bitmap words in the version-1 bit
    order, declared as version 1) loads as the same model."""
    from flash_llm.formats import _layout as L

    expected = flash_llm.from_pretrained(flash).get_submodule(UP).to_dense()
    file = shard_of(flash, f"{UP}.weight_data")
    tensors, meta = read_shard(file)
    off = tensors[f"{UP}.weight_offsets"].to(torch.int64)
    words = (off[:-1, None] * 4 + torch.arange(32)).view(-1)
    data = tensors[f"{UP}.weight_data"]
    data[words] = L.pack_bits(L.unpack_bits(data[words])[..., L.BITMAP_BIT])  # back to version 1
    key = f"{UP}.weight_flash_llm"
    rewrite_shard(file, tensors, {**meta, key: json.dumps({**json.loads(meta[key]), "version": 1})})
    edit_json(flash / "config.json", lambda d: d["quantization_config"]["sparse_modules"][UP].update(version=1))
    layer = flash_llm.from_pretrained(flash).get_submodule(UP)
    assert torch.equal(layer.to_dense(), expected)
    assert layer.weight.metadata()["version"] == 2


def test_shard_header_disagrees_with_config(flash):
    file = shard_of(flash, f"{UP}.weight_data")
    tensors, meta = read_shard(file)
    key = f"{UP}.weight_flash_llm"
    stored = json.loads(meta[key])
    rewrite_shard(file, tensors, {**meta, key: json.dumps({**stored, "version": 5})})
    with pytest.raises(FormatError, match=rf"{file}: '{UP}' has version 5 in the shard header but "
                                          rf"{flash_llm.BitmapTiles.FORMAT_VERSION} in config.json"):
        flash_llm.from_pretrained(flash)
    rewrite_shard(file, tensors, {k: v for k, v in meta.items() if k != key})
    with pytest.raises(FormatError, match=rf"{file}: no format metadata '{key}' in the header"):
        flash_llm.from_pretrained(flash)
    rewrite_shard(file, tensors, {**meta, key: json.dumps({**stored, "nnz": stored["nnz"] + 1})})
    with pytest.raises(FormatError, match=rf"metadata says nnz={stored['nnz'] + 1} but the arrays hold "
                                          rf"{stored['nnz']} nonzeros"):
        flash_llm.from_pretrained(flash)


def test_corrupt_sparse_arrays(flash):
    file = edit_tensor(flash, f"{UP}.weight_data", lambda t: t[:-4].contiguous())
    with pytest.raises(FormatError, match=rf"{file}: tensor '{UP}.weight_data' has \d+ words; the offsets describe "
                                          r"\d+ \(truncated or inconsistent\)"):
        flash_llm.from_pretrained(flash)
    with pytest.raises(FormatError, match=rf"tensor '{UP}.weight_data' has \d+ words"):
        transformers.AutoModelForCausalLM.from_pretrained(flash)


def test_sparse_layer_unknown_to_config(flash):
    edit_json(flash / "config.json", lambda d: d["quantization_config"]["sparse_modules"].pop(UP))
    with pytest.raises(FormatError, match=rf"tensor '{UP}.weight_data' belongs to a sparse layer '{UP}' that "
                                          r"config.json's quantization_config.sparse_modules does not list"):
        flash_llm.from_pretrained(flash)
    # transformers' loader too (session 71: it left the layer as initialized, with a warning only)
    with pytest.raises(FormatError, match=rf"'{UP}' is stored compressed \(its weight_data is in the shards\) but "
                                          r"config.json's quantization_config.sparse_modules does not list it"):
        transformers.AutoModelForCausalLM.from_pretrained(flash)


def test_sparse_layer_shape_disagrees_with_model(flash):
    edit_json(flash / "config.json", lambda d: d["quantization_config"]["sparse_modules"][UP].update(shape=[96, 32]))
    with pytest.raises(FormatError, match=rf"'{UP}' has shape \[96, 64\] in the shard header but \[96, 32\]"):
        flash_llm.from_pretrained(flash)
    with pytest.raises(FormatError, match=rf"sparse layer '{UP}' is 96x32 in config.json's sparse_modules but the "
                                          r"model built from config.json has 96x64"):
        transformers.AutoModelForCausalLM.from_pretrained(flash)


# ---- writing -----------------------------------------------------------------------------------------------

def _snapshot(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def _leftovers(parent):
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_existing_output_is_not_overwritten(sources, tmp_path):
    dense, _ = sources
    out = tmp_path / "out"
    convert(dense, out, progress=False)
    before = _snapshot(out)
    with pytest.raises(FileExistsError, match=rf"{out} already exists; pass overwrite=True \(--overwrite\)"):
        convert(dense, out, format="tiled-csl", progress=False)
    assert _snapshot(out) == before
    convert(dense, out, format="tiled-csl", overwrite=True, progress=False)
    assert _snapshot(out) != before and not _leftovers(tmp_path)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["sparse_modules"][UP]["format"] == \
        "flash_llm.tiled_csl"


def test_output_has_the_usual_permissions(sources, tmp_path):
    """The output directory is written as a private temporary directory and renamed; it must end up with
    the permissions any other directory the user creates gets (0777 minus the umask), not 0700."""
    import os
    import stat

    umask = os.umask(0o022)
    try:
        out = tmp_path / "out"
        convert(sources[0], out, progress=False)
        assert stat.S_IMODE(out.stat().st_mode) == 0o755
        assert all(stat.S_IMODE(f.stat().st_mode) == 0o644 for f in out.iterdir())
    finally:
        os.umask(umask)


@pytest.mark.parametrize("existing", [False, True])
def test_interrupted_conversion_leaves_nothing(sources, tmp_path, monkeypatch, existing):
    dense, _ = sources
    out = tmp_path / "out"
    if existing:
        convert(dense, out, progress=False)
    before = _snapshot(out) if existing else None
    calls = []
    add = _files.ShardWriter.add

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return add(self, *args, **kwargs)

    monkeypatch.setattr(_files.ShardWriter, "add", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(dense, out, max_shard_size="8KB", overwrite=True, progress=False)
    assert len(calls) == 5
    assert (_snapshot(out) == before) if existing else not out.exists()
    assert not _leftovers(tmp_path)


def test_save_pretrained_refuses_meta_tensors(tmp_path):
    from flash_llm.models import from_config

    model = from_config(hf_model("opt").config, device="meta")
    with pytest.raises(ValueError, match=r"tensor 'model.decoder.embed_tokens.weight' is on the meta device"):
        flash_llm.save_pretrained(model, tmp_path / "x")
    assert not (tmp_path / "x").exists() and not _leftovers(tmp_path)


@pytest.mark.parametrize("fail", [1, 2], ids=["moving-out-aside", "moving-new-in"])
def test_a_failed_swap_keeps_the_existing_output(tmp_path, monkeypatch, fail):
    """atomic_directory replacing an existing output: if either rename of the swap fails, the old output keeps its
    name and bytes and no temporary or holder directory is left (the second failure used to leave the old output
    only in a hidden .old- directory)."""
    import os

    out = tmp_path / "out"
    out.mkdir()
    (out / "a.txt").write_text("old")
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append((src, dst))
        if len(calls) == fail:
            raise OSError(18, "Invalid cross-device link")
        return real(src, dst)

    monkeypatch.setattr(_files.os, "replace", replace)
    with pytest.raises(OSError, match="cross-device"):
        with _files.atomic_directory(out, overwrite=True) as tmp:
            (tmp / "a.txt").write_text("new")
    assert _snapshot(out) == {"a.txt": b"old"} and not _leftovers(tmp_path)

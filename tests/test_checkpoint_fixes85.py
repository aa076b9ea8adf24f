"""Session 85 fixes of the checkpoint code (convert, the compressed-tensors reader, the no-weights error):

1. ``convert(..., format="sparse-bitmask")`` (``flash-llm convert --format sparse-bitmask`` without ``--dtype``) of a
   checkpoint whose ``config.json`` names no dtype (no ``dtype`` / ``torch_dtype``, or ``"auto"``) loaded the weights
   in float32: a bf16 / fp16 model was written upcast, twice its size, with ``"dtype": "float32"``.  It now takes
   the weights' own dtype, as ``from_pretrained(sparsify=False)`` and the conversion to the flash-llm formats do
   (``pretrained._resolve_dtype``); weights of several floating dtypes need ``dtype``.
2. A compressed-tensors ``transform_config`` (compressed-tensors >= 0.10: QuIP / SpinQuant rotations) whose transforms
   rotate the activations at run time (any location but ``weight_input`` / ``weight_output``) was ignored: the
   rotated weights loaded as a plain model, with wrong logits and no word.  ``sparse_bitmask.parse_config`` refuses
   it (a FormatError naming config.json), with or without a sparsity config; weight-only transforms, fused into the
   stored weights when they were saved, still load.
3. A directory without ``model.safetensors`` / ``model.safetensors.index.json`` that holds safetensors files under
   other names (a transformers ``variant`` save, a lone shard, shards without their index) was refused with "flash-llm
   reads safetensors checkpoints only", pointing the wrong way; the hint now names the names that are read.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open

import flash_llm
from flash_llm import FormatError
from flash_llm.checkpoint import convert, write_sparse_bitmask
from flash_llm.checkpoint.sparse_bitmask import parse_config
from flash_llm.cli import main

from _ckpt import edit_json, hf_model, read_shard, rewrite_shard

transformers = pytest.importorskip("transformers")

QUIP = {"config_groups": {
    "v": {"type": "hadamard", "randomize": True,
          "apply": [{"targets": ["Linear"], "location": "input", "ignore": "lm_head"},
                    {"targets": ["Linear"], "location": "weight_input", "inverse": True, "ignore": "lm_head"}]},
    "u": {"type": "hadamard", "randomize": True,
          "apply": [{"targets": ["Linear"], "location": "weight_output", "ignore": "lm_head"},
                    {"targets": ["Linear"], "location": "output", "inverse": True, "ignore": "lm_head"}]}}}
# SpinQuant R1 + R2: every transform fused into the weights
SPINQUANT_R1R2 = {"config_groups": {
    "R1": {"type": "hadamard", "apply": [
        {"targets": ["re:.*embed_tokens$", "re:.*o_proj$", "re:.*down_proj$"], "location": "weight_output"},
        {"targets": ["re:.*q_proj$", "re:.*k_proj$", "re:.*v_proj$", "re:.*up_proj$", "re:.*gate_proj$",
                     "lm_head"], "location": "weight_input", "inverse": True}]},
    "R2": {"type": "hadamard", "head_dim": 16, "apply": [
        {"targets": ["re:.*v_proj$"], "location": "weight_output"},
        {"targets": ["re:.*o_proj$"], "location": "weight_input", "inverse": True}]}}}


def _dtypes(path) -> dict[str, torch.dtype]:
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k: f.get_slice(k).get_dtype() for k in f.keys()}


# ---- 1. convert --format sparse-bitmask keeps the weights' dtype when config.json names none -----------------------

@pytest.fixture(scope="module")
def bf16_dense(tmp_path_factory):
    path = tmp_path_factory.mktemp("bf16") / "dense"
    hf_model("llama", dtype=torch.bfloat16).save_pretrained(path)
    return path


@pytest.mark.parametrize("declared", [None, "auto"])
def test_convert_sparse_bitmask_undeclared_dtype_keeps_weights_dtype(bf16_dense, tmp_path, declared):
    src = tmp_path / "src"
    shutil.copytree(bf16_dense, src)

    def undeclare(cfg):
        cfg.pop("dtype", None)
        cfg.pop("torch_dtype", None)
        if declared is not None:
            cfg["dtype"] = declared
    edit_json(src / "config.json", undeclare)
    report = convert(src, tmp_path / "out", format="sparse-bitmask", progress=False)
    assert report.converted  # (layers were compressed)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16"
    stored = _dtypes(tmp_path / "out")
    assert stored["model.embed_tokens.weight"] == "BF16"
    assert stored["model.layers.0.mlp.up_proj.compressed"] == "BF16"
    assert (tmp_path / "out" / "model.safetensors").stat().st_size < (src / "model.safetensors").stat().st_size
    # the same through the command line, without --dtype
    assert main(["convert", str(src), str(tmp_path / "cli"), "--format", "sparse-bitmask"]) == 0
    assert json.loads((tmp_path / "cli" / "config.json").read_text())["dtype"] == "bfloat16"
    # and the output reads back in bf16, the source's values
    model = flash_llm.from_pretrained(tmp_path / "out", sparsify=False, progress=False)
    ref = flash_llm.from_pretrained(src, sparsify=False, progress=False)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    for (name, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), name


def test_convert_sparse_bitmask_dtype_choices(bf16_dense, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(bf16_dense, src)
    edit_json(src / "config.json", lambda c: (c.pop("dtype", None), c.pop("torch_dtype", None)))
    # an explicit dtype still wins, float32 included (a dense output)
    convert(src, tmp_path / "fp32", format="sparse-bitmask", dtype=torch.float32, progress=False)
    assert json.loads((tmp_path / "fp32" / "config.json").read_text())["dtype"] == "float32"
    assert _dtypes(tmp_path / "fp32")["model.embed_tokens.weight"] == "F32"
    with pytest.raises(TypeError, match="dtype must be torch.float16, .* or torch.float64, got 'bfloat16'"):
        convert(src, tmp_path / "bad", format="sparse-bitmask", dtype="bfloat16", progress=False)
    # weights of several floating dtypes: no guess, a clear error naming the remedy
    file = src / "model.safetensors"
    tensors, meta = read_shard(file)
    tensors["model.norm.weight"] = tensors["model.norm.weight"].float()
    rewrite_shard(file, tensors, meta)
    with pytest.raises(ValueError, match=r"declares no dtype and the weights are \['BF16', 'F32'\]; pass "
                                         r"dtype=torch.float16, torch.bfloat16 or torch.float32"):
        convert(src, tmp_path / "mixed", format="sparse-bitmask", progress=False)
    assert not (tmp_path / "mixed").exists()


def test_fp32_rotary_buffers_do_not_count_as_a_second_dtype(bf16_dense, tmp_path):
    # (review: Llama-2-era files store each layer's rotary_emb.inv_freq in fp32 beside bf16 weights; every reader
    # skips those buffers, so the weights' dtype is the one guessed, not "several dtypes")
    src = tmp_path / "src"
    shutil.copytree(bf16_dense, src)
    edit_json(src / "config.json", lambda c: (c.pop("dtype", None), c.pop("torch_dtype", None)))
    file = src / "model.safetensors"
    tensors, meta = read_shard(file)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.rand(4, dtype=torch.float32)
    rewrite_shard(file, tensors, meta)
    convert(src, tmp_path / "out", format="sparse-bitmask", progress=False)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"


# ---- 2. a transform_config that rotates activations at run time is refused -----------------------------------------

def _ct(tmp_path, model=None):
    path = tmp_path / "ct"
    write_sparse_bitmask(model or hf_model("llama"), path, progress=False)
    return path


def test_online_transform_config_refused(tmp_path):
    path = _ct(tmp_path)
    edit_json(path / "config.json", lambda c: c["quantization_config"].update(transform_config=QUIP))
    cfg = json.loads((path / "config.json").read_text())
    with pytest.raises(FormatError, match=r"config.json: quantization_config.transform_config applies scheme 'v' "
                                          r"location 'input', scheme 'u' location 'output' \(rotations computed at "
                                          r"run time"):
        parse_config(cfg)
    with pytest.raises(FormatError, match=rf"{path / 'config.json'}: quantization_config.transform_config"):
        flash_llm.from_pretrained(path, progress=False)
    # without a sparsity config (a dense compressed-tensors checkpoint) too: not read as plain weights
    edit_json(path / "config.json", lambda c: c["quantization_config"].pop("sparsity_config"))
    with pytest.raises(FormatError, match="transform_config applies scheme 'v' location 'input'"):
        parse_config(json.loads((path / "config.json").read_text()))
    # and a section that cannot be read is refused rather than ignored
    for bad in ([1], {"config_groups": [1]}, {"config_groups": {"x": {"apply": "input"}}},
                {"config_groups": {"x": {"apply": [{"location": "q_attn"}]}}}):
        cfg["quantization_config"]["transform_config"] = bad
        with pytest.raises(FormatError, match="transform_config applies"):
            parse_config(cfg)


def test_weight_only_transform_config_loads(tmp_path):
    model = hf_model("llama")
    path = _ct(tmp_path, model)
    ref = flash_llm.from_pretrained(path, progress=False)
    for value in (SPINQUANT_R1R2, {}, {"config_groups": {}}, None):
        edit_json(path / "config.json", lambda c: c["quantization_config"].update(transform_config=value))
        loaded = flash_llm.from_pretrained(path, progress=False)
        ids = torch.tensor([[1, 5, 9, 3]])
        with torch.no_grad():
            assert torch.equal(loaded(ids), ref(ids))


# ---- 3. the no-weights error names the names that are read ---------------------------------------------------------

@pytest.fixture(scope="module")
def llama():
    return hf_model("llama")


def test_variant_single_file_hint(llama, tmp_path):
    llama.save_pretrained(tmp_path / "v", variant="fp16")
    with pytest.raises(FormatError, match=r"no model.safetensors or model.safetensors.index.json \(found "
                                          r"model.fp16.safetensors: flash-llm reads a single-file checkpoint only "
                                          r"as model.safetensors, not a transformers variant's.*rename the file to "
                                          r"model.safetensors or save without variant=\)"):
        flash_llm.from_pretrained(tmp_path / "v", progress=False)
    (tmp_path / "v" / "model.fp16.safetensors").rename(tmp_path / "v" / "model.safetensors")
    flash_llm.from_pretrained(tmp_path / "v", progress=False)  # (the advice works)


def test_variant_sharded_hint(llama, tmp_path):
    llama.save_pretrained(tmp_path / "v", variant="fp16", max_shard_size="50KB")
    with pytest.raises(FormatError, match=r"\(found model.safetensors.index.fp16.json: flash-llm reads a sharded "
                                          r"checkpoint's index only as model.safetensors.index.json.*rename the "
                                          r"index to model.safetensors.index.json \(its shards keep their names\)"):
        flash_llm.from_pretrained(tmp_path / "v", progress=False)
    (tmp_path / "v" / "model.safetensors.index.fp16.json").rename(tmp_path / "v" / "model.safetensors.index.json")
    flash_llm.from_pretrained(tmp_path / "v", progress=False)


def test_shards_without_index_hint(llama, tmp_path):
    llama.save_pretrained(tmp_path / "s", max_shard_size="30KB")
    (tmp_path / "s" / "model.safetensors.index.json").unlink()
    n = len(list((tmp_path / "s").glob("*.safetensors")))
    assert n > 3
    with pytest.raises(FormatError, match=rf"\(found model-00001-of-0000{n}.safetensors, .* and {n - 3} more: "
                                          r"several safetensors files are read through "
                                          r"model.safetensors.index.json, which maps each tensor to its file; it is "
                                          r"missing\)"):
        flash_llm.from_pretrained(tmp_path / "s", progress=False)
    lone = tmp_path / "lone"
    llama.save_pretrained(lone)
    (lone / "model.safetensors").rename(lone / "model-00001-of-00001.safetensors")
    with pytest.raises(FormatError, match=r"\(found model-00001-of-00001.safetensors: a shard is read through "
                                          r"model.safetensors.index.json.*add the index, or rename a lone shard to "
                                          r"model.safetensors\)"):
        flash_llm.from_pretrained(lone, progress=False)


def test_other_formats_hint_unchanged(llama, tmp_path):
    llama.save_pretrained(tmp_path / "b")
    (tmp_path / "b" / "model.safetensors").unlink()
    (tmp_path / "b" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FormatError, match=r"\(found pytorch_model.bin: flash-llm reads safetensors checkpoints "
                                          r"only\)"):
        flash_llm.from_pretrained(tmp_path / "b", progress=False)

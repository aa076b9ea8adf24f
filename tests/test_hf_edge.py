"""Edges of the transformers integration (session 73 hunt): pickling a sparse transformers model, base models and
causal LMs reading each other's flash-llm checkpoints, the names transformers 5 converts between memory and file,
saving a nested transformers model, mixed dtypes on transformers' save, and array dtypes in transformers' loader."""

from __future__ import annotations

import io
import json
import pickle
import shutil
import warnings

import pytest
import torch

import flash_llm
from flash_llm import FormatError, SparseLinear, SparsifyConfig
from flash_llm.prune import magnitude_prune_

from _ckpt import VOCAB, edit_json, edit_tensor, gpt_neox_model, hf_model, logits, read_shard, rewrite_shard

transformers = pytest.importorskip("transformers")

UP = "model.layers.0.mlp.up_proj"


def _ids(seed=0, batch=2, length=9) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _sparsify(model, config=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # (the layers kept dense)
        flash_llm.sparsify_(model, config)
    return model


def _sparse_names(model) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, SparseLinear)}


def _assert_same_model(a, b) -> None:
    """The same tensors (SparseLinear's arrays included) and outputs equal to rounding (a model transformers loads
    may pick another attention implementation than the one it was built with)."""
    sa, sb = a.state_dict(), b.state_dict()
    tensors = {n: t for n, t in sa.items() if isinstance(t, torch.Tensor)}
    assert tensors and set(tensors) == {n for n, t in sb.items() if isinstance(t, torch.Tensor)}
    assert all(torch.equal(t, sb[n]) for n, t in tensors.items())
    ids = _ids()
    with torch.no_grad():
        out = [m(ids) for m in (a, b)]
    out = [o.logits if hasattr(o, "logits") else o.last_hidden_state for o in out]
    torch.testing.assert_close(out[0], out[1], atol=5e-3, rtol=5e-3)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A pruned Llama made sparse by sparsify_, and its flash-llm checkpoint."""
    model = _sparsify(hf_model("llama"))
    path = tmp_path_factory.mktemp("hf_edge") / "flash"
    flash_llm.save_pretrained(model, path, progress=False)
    return model, path


# ---- 1. pickling ---------------------------------------------------------------------------------------------

def test_sparse_transformers_model_pickles(llama):
    # the quantization config and quantizer classes are found by name (they were local classes: session 73)
    model, path = llama
    config = pickle.loads(pickle.dumps(model.config))
    assert config.quantization_config.sparse_modules == model.config.quantization_config.sparse_modules
    ids = _ids()
    for lm in (model, transformers.AutoModelForCausalLM.from_pretrained(path)):
        buf = io.BytesIO()
        torch.save(lm, buf)
        buf.seek(0)
        back = torch.load(buf, weights_only=False)
        assert type(back) is type(lm) and type(back.hf_quantizer).__qualname__ == "FlashLLMHfQuantizer"
        with torch.no_grad():
            assert torch.equal(logits(back, ids), logits(lm, ids))  # (the same modules: bit for bit)


# ---- 2. base model <-> causal LM ------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", ["AutoModel", "LlamaModel"])
def test_base_model_loads_a_causal_lm_checkpoint(llama, cls):
    model, path = llama
    base = getattr(transformers, cls).from_pretrained(path)
    assert type(base) is transformers.LlamaModel
    assert _sparse_names(base) == {n.removeprefix("model.") for n in _sparse_names(model)}
    _assert_same_model(base, model.model)
    # its section names its own layers (lm_head, dense here, would be dropped like a dense checkpoint's)
    assert set(base.config.quantization_config.sparse_modules) == _sparse_names(base)


def test_causal_lm_loads_a_base_model_checkpoint(llama, tmp_path):
    model, _ = llama
    flash_llm.save_pretrained(model.model, tmp_path / "base", config=model.config, progress=False)
    lm = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    assert _sparse_names(lm) == _sparse_names(model)
    _assert_same_model(lm.model, model.model)


@pytest.mark.parametrize("cls", ["AutoModel", "AutoModelForSequenceClassification"])
def test_a_model_without_lm_head_drops_a_sparse_one(cls, tmp_path):
    # lm_head compressed too: the model has no such layer, and transformers drops its tensors (as a dense one's)
    model = hf_model("llama", tie=False)
    magnitude_prune_(model, 0.6, filter_fn=lambda m, n: n == "lm_head")
    _sparsify(model, SparsifyConfig(skip_names=()))
    assert "lm_head" in _sparse_names(model)
    flash_llm.save_pretrained(model, tmp_path / "c", progress=False)
    other = getattr(transformers, cls).from_pretrained(tmp_path / "c")
    _assert_same_model(getattr(other, "model", other), model.model)


def test_a_layer_the_model_lacks_is_named_without_blaming_config(llama, tmp_path):
    _, path = llama
    path = shutil.copytree(path, tmp_path / "c")
    meta = json.loads((path / "config.json").read_text())["quantization_config"]["sparse_modules"][UP]
    edit_json(path / "config.json", lambda d: d["quantization_config"]["sparse_modules"].update(
        {"model.layers.0.mlp.nope": meta}))
    with pytest.raises(FormatError, match=r"lists sparse layer 'model\.layers\.0\.mlp\.nope' but LlamaForCausalLM "
                                          r"has no such module$"):
        transformers.AutoModelForCausalLM.from_pretrained(path)


# ---- 3. names transformers converts ---------------------------------------------------------------------------

def test_gpt_neox_sparse_lm_head_round_trips_through_transformers_save(tmp_path):
    # transformers stores lm_head as embed_out: the quantization section and headers follow it, both loaders map back
    model = _sparsify(gpt_neox_model(), SparsifyConfig(skip_names=()))
    assert "lm_head" in _sparse_names(model)
    model.save_pretrained(tmp_path / "c")
    qc = json.loads((tmp_path / "c" / "config.json").read_text())["quantization_config"]
    assert "embed_out" in qc["sparse_modules"] and "lm_head" not in qc["sparse_modules"]
    for loaded in (transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "c"),
                   flash_llm.from_pretrained(tmp_path / "c", progress=False)):
        assert _sparse_names(loaded) == _sparse_names(model)
        _assert_same_model(loaded, model)


def test_flash_llm_reads_a_checkpoint_transformers_renames(tmp_path):
    # Pythia / GPT-NeoX files store lm_head as embed_out (transformers 5 renames it on load, and on save back)
    model = gpt_neox_model()
    model.save_pretrained(tmp_path / "dense")
    ours = flash_llm.from_pretrained(tmp_path / "dense", progress=False)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(logits(ours, ids), logits(model, ids), atol=5e-3, rtol=5e-3)


def test_a_tensor_stored_under_both_names_is_refused(tmp_path):
    model = gpt_neox_model()
    model.save_pretrained(tmp_path / "dense")
    tensors, meta = read_shard(tmp_path / "dense" / "model.safetensors")
    tensors["lm_head.weight"] = tensors["embed_out.weight"].clone()
    rewrite_shard(tmp_path / "dense" / "model.safetensors", tensors, meta)
    # (transformers reads embed_out.weight as lm_head.weight, and so does flash-llm: one of them is one too many)
    with pytest.raises(FormatError, match=r"tensor 'lm_head\.weight' is stored a second time \(also as "
                                          r"'embed_out\.weight'\)"):
        flash_llm.from_pretrained(tmp_path / "dense", progress=False)


def test_names_transformers_merges_are_refused_saying_so(tmp_path):
    # Mixtral's per-expert w1/w2/w3 files are merged into fused experts by transformers' converters
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=64)
    transformers.MixtralForCausalLM(cfg).half().save_pretrained(tmp_path / "dense")
    with pytest.raises(FormatError, match=r"tensor 'model\.layers\.0\.block_sparse_moe\.experts\.\d\.w\d\.weight' has "
                                          r"no place .*a checkpoint name transformers converts, to "
                                          r"'model\.layers\.0\.mlp\.experts\.[a-z_]+proj'"):
        flash_llm.from_pretrained(tmp_path / "dense", progress=False)


@pytest.mark.parametrize("rules, match", [
    # loads file ".up_proj." as ".nothing.": a layer saved under its own name would not come back
    ([(r"\.mlp\.up_proj\.", ".mlp.nothing.")], r"would store sparse layer 'model\.layers\.0\.mlp\.up_proj' as "
                                                r"'model\.layers\.0\.mlp\.up_proj', which its loader reads as "
                                                r"'model\.layers\.0\.mlp\.nothing'"),
    # two layers saved under one name
    ([(r"\.mlp\.up\.", ".mlp.up_proj."), (r"\.mlp\.up_proj\.", ".mlp.gate_proj.")],
     r"would not store the tensors of sparse layer 'model\.layers\.0\.mlp\.(up|gate)_proj' under names of their own"),
])
def test_save_refuses_a_layer_transformers_would_not_read_back(rules, match, tmp_path, monkeypatch):
    from transformers import conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    conversion_mapping.get_checkpoint_conversion_mapping("llama")  # (builds the registry)
    monkeypatch.setitem(conversion_mapping._checkpoint_conversion_mapping_cache, "LlamaForCausalLM",
                        [WeightRenaming(a, b) for a, b in rules])
    model = _sparsify(hf_model("llama"))
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=match + r".*flash_llm\.save_pretrained"):
        model.save_pretrained(out)
    assert not out.exists() or not list(out.iterdir())  # nothing written (transformers made the directory)


# ---- 4. nested transformers models ----------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["sparsify_", "transformers"])
def test_base_model_of_a_sparse_causal_lm_saves_through_transformers(llama, how, tmp_path):
    model, path = llama
    lm = model if how == "sparsify_" else transformers.AutoModelForCausalLM.from_pretrained(path)
    assert lm.model.hf_quantizer is not None and lm.model.hf_quantizer is not lm.hf_quantizer
    lm.model.save_pretrained(tmp_path / "base")
    qc = json.loads((tmp_path / "base" / "config.json").read_text())["quantization_config"]
    assert set(qc["sparse_modules"]) == _sparse_names(lm.model)
    _assert_same_model(transformers.AutoModel.from_pretrained(tmp_path / "base"), lm.model)


# ---- 5. mixed dtypes ------------------------------------------------------------------------------------------

def test_transformers_save_of_mixed_dtypes_warns_and_loads_in_the_sparse_dtype(tmp_path):
    model = _sparsify(hf_model("llama", dtype=torch.float32), SparsifyConfig(dtype=torch.float16))
    with pytest.warns(UserWarning, match=r"tensor\(s\) are not torch.float16 \(e.g. '.*' is torch.float32\).*"
                                         r"quantization_config.dtype says float16"):
        model.save_pretrained(tmp_path / "c")
    qc = json.loads((tmp_path / "c" / "config.json").read_text())["quantization_config"]
    assert qc["dtype"] == "float16"
    want = {n: t.to(torch.float16) for n, t in model.named_parameters()}  # (the dense tensors, cast as loading does)
    for kw in ({}, {"dtype": "auto"}, {"dtype": torch.float16}):
        loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "c", **kw)
        assert loaded.dtype == torch.float16 and _sparse_names(loaded) == _sparse_names(model)
        assert want and all(torch.equal(t, want[n]) for n, t in loaded.named_parameters())
    assert flash_llm.from_pretrained(tmp_path / "c", progress=False).lm_head.weight.dtype == torch.float16
    with pytest.raises(ValueError, match=r"sparse layers are torch.float16 .*; load it with dtype=torch.float16, not "
                                         r"torch.bfloat16 \(the dtype passed to from_pretrained, or config.json's "
                                         r"where none is\)$") as e:
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "c", dtype=torch.bfloat16)
    assert "'auto'" not in str(e.value)
    # without quantization_config.dtype (config.json's float32 alone, as before session 73): refused, rightly advised
    edit_json(tmp_path / "c" / "config.json", lambda d: d["quantization_config"].pop("dtype"))
    for kw in ({}, {"dtype": "auto"}):
        with pytest.raises(ValueError, match=r"load it with dtype=torch.float16, not torch.float32 \(the dtype passed "
                                             r"to from_pretrained, or config.json's where none is\)$"):
            transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "c", **kw)


def test_transformers_save_of_one_dtype_adds_nothing(llama, tmp_path):
    model, _ = llama
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model.save_pretrained(tmp_path / "c")
    assert "dtype" not in json.loads((tmp_path / "c" / "config.json").read_text())["quantization_config"]


# ---- 6. array dtypes in transformers' loader ------------------------------------------------------------------

@pytest.mark.parametrize("array, fn, stored", [("weight_offsets", torch.Tensor.half, "F16"),
                                               ("weight_data", torch.Tensor.float, "F32"),
                                               ("weight_data", torch.Tensor.long, "I64")])
def test_transformers_loader_refuses_arrays_not_int32(llama, array, fn, stored, tmp_path):
    _, path = llama
    path = shutil.copytree(path, tmp_path / "c")
    edit_tensor(path, f"{UP}.{array}", fn)
    with pytest.raises(FormatError, match=rf"model.safetensors: tensor '{UP}\.{array}' of sparse layer '{UP}' has "
                                          rf"dtype {stored} and shape \(\d+,\); expected a 1-D int32 tensor"):
        transformers.AutoModelForCausalLM.from_pretrained(path)


def test_transformers_loader_names_the_layer_of_a_bad_bias(tmp_path):
    model = _sparsify(hf_model("opt"))
    layer = "model.decoder.layers.0.fc1"
    assert layer in _sparse_names(model)
    flash_llm.save_pretrained(model, tmp_path / "c", progress=False)
    edit_tensor(tmp_path / "c", f"{layer}.bias", torch.Tensor.int)
    with pytest.raises(FormatError, match=rf"tensor '{layer}\.bias' of sparse layer '{layer}' has dtype I32; "
                                          "expected a floating-point tensor"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "c")

"""Session 83's fixes of the transformers integration (``flash_llm/checkpoint/hf_quantizer.py``): transformers'
``save_pretrained(save_original_format=False)`` names the sparse layers as it stores their arrays; ``AutoModel`` drops a
sparse ``lm_head`` that is a causal-LM checkpoint's only sparse layer; ``from_pretrained``'s ``key_mapping`` renames the
sparse layers too; a config override that builds fewer blocks drops their sparse layers, as transformers drops their
dense tensors; and a model transformers loaded from a flash-llm checkpoint records its source directory as an absolute
path, so that a save after ``os.chdir`` still refuses to replace it."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch

import flash_llm
from flash_llm import FormatError, SparseLinear, SparsifyConfig
from flash_llm.prune import magnitude_prune_

from _ckpt import VOCAB, gpt_neox_model, hf_model, logits, read_shard, rewrite_shard, shards

transformers = pytest.importorskip("transformers")


def _ids(seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(seed))


def _sparse_names(model) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, SparseLinear)}


def _sparsify(model, config=None, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # (the layers kept dense)
        flash_llm.sparsify_(model, config, **kwargs)
    return model


def _same_tensors(a, b) -> None:
    sa, sb = ({n: t for n, t in m.state_dict().items() if isinstance(t, torch.Tensor)} for m in (a, b))
    assert sa and set(sa) == set(sb)
    assert all(torch.equal(t, sb[n]) for n, t in sa.items())


def _section(path) -> dict:
    return json.loads((path / "config.json").read_text())["quantization_config"]["sparse_modules"]


# ---- 1. save_pretrained(save_original_format=False) -----------------------------------------------------------

def test_save_original_format_false_names_the_sparse_layers_as_stored(tmp_path):
    # GPT-NeoX stores lm_head as embed_out, unless told to keep the model's names: the section and headers follow
    model = _sparsify(gpt_neox_model(), SparsifyConfig(skip_names=()))
    assert "lm_head" in _sparse_names(model)
    model.save_pretrained(tmp_path / "c", save_original_format=False)
    assert "lm_head" in _section(tmp_path / "c") and "embed_out" not in _section(tmp_path / "c")
    tensors, header = read_shard(tmp_path / "c" / "model.safetensors")
    assert "lm_head.weight_data" in tensors and "lm_head.weight_flash_llm" in header
    ids = _ids(831)
    for loaded in (transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "c"),
                   flash_llm.from_pretrained(tmp_path / "c", progress=False)):
        assert _sparse_names(loaded) == _sparse_names(model)
        _same_tensors(loaded, model)
        with torch.no_grad():
            torch.testing.assert_close(logits(loaded, ids), logits(model, ids), atol=5e-3, rtol=5e-3)
    # positionally too, and the next save reverts again (the default)
    model.save_pretrained(tmp_path / "p", True, None, False, "50GB", None, None, True, False)
    assert "lm_head" in _section(tmp_path / "p")
    model.save_pretrained(tmp_path / "d")
    assert "embed_out" in _section(tmp_path / "d") and "lm_head" not in _section(tmp_path / "d")


# ---- 2. AutoModel of a checkpoint whose only sparse layer is lm_head ---------------------------------------------

@pytest.mark.parametrize("cls", ["AutoModel", "AutoModelForSequenceClassification"])
def test_a_model_without_lm_head_drops_it_when_it_is_the_only_sparse_layer(cls, tmp_path):
    model = hf_model("llama", seed=832, tie=False)
    magnitude_prune_(model, 0.6, filter_fn=lambda m, n: n == "lm_head")
    _sparsify(model, SparsifyConfig(skip_names=()), filter_fn=lambda m, n: n == "lm_head")
    assert _sparse_names(model) == {"lm_head"}
    flash_llm.save_pretrained(model, tmp_path / "c", progress=False)
    other = getattr(transformers, cls).from_pretrained(tmp_path / "c")
    base = getattr(other, "model", other)
    assert not _sparse_names(other)
    _same_tensors(base, model.model)
    # a base model's own stray layer is still refused (its checkpoint has nothing under 'model.')
    flash_llm.save_pretrained(_sparsify(hf_model("llama", seed=833).model), tmp_path / "b", progress=False)
    shutil.copytree(tmp_path / "b", tmp_path / "s")
    path = tmp_path / "s" / "config.json"
    cfg = json.loads(path.read_text())
    section = cfg["quantization_config"]["sparse_modules"]
    section["nope"] = section["layers.0.mlp.up_proj"]
    path.write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match=r"lists sparse layer 'nope' but LlamaModel has no such module"):
        transformers.AutoModel.from_pretrained(tmp_path / "s")


# ---- 3. key_mapping --------------------------------------------------------------------------------------------

def _renamed(src, dst, ren):
    """A copy of checkpoint ``src`` with every tensor and sparse-layer name ``ren(name)``."""
    shutil.copytree(src, dst)
    for f in shards(dst):
        tensors, header = read_shard(f)
        rewrite_shard(f, {ren(k): v for k, v in tensors.items()}, {ren(k): v for k, v in header.items()})
    cfg = json.loads((dst / "config.json").read_text())
    qc = cfg["quantization_config"]
    qc["sparse_modules"] = {ren(k): v for k, v in qc["sparse_modules"].items()}
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_key_mapping_renames_the_sparse_layers_on_load_and_save(tmp_path):
    model = _sparsify(hf_model("llama", seed=834))
    flash_llm.save_pretrained(model, tmp_path / "c", progress=False)
    src = _renamed(tmp_path / "c", tmp_path / "r",
                   lambda k: "transformer." + k[len("model."):] if k.startswith("model.") else k)
    assert all(n.startswith(("transformer.", "lm_head")) for n in _section(src))
    km = {r"^transformer\.": "model."}
    loaded = transformers.AutoModelForCausalLM.from_pretrained(src, key_mapping=km)
    assert _sparse_names(loaded) == _sparse_names(model)
    _same_tensors(loaded, model)
    ids = _ids(835)
    with torch.no_grad():
        ref = logits(model, ids)
        torch.testing.assert_close(logits(loaded, ids), ref, atol=5e-3, rtol=5e-3)
    # transformers' save reverts the mapping (as for the dense tensors): the same mapping reads it back
    loaded.save_pretrained(tmp_path / "s")
    assert set(_section(tmp_path / "s")) == set(_section(src))
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "s", key_mapping=km)
    _same_tensors(again, model)
    # without reverting it, the model's own names
    loaded.save_pretrained(tmp_path / "o", save_original_format=False)
    assert set(_section(tmp_path / "o")) == _sparse_names(model)
    _same_tensors(flash_llm.from_pretrained(tmp_path / "o", progress=False), model)


# ---- 4. a config override that builds fewer blocks ---------------------------------------------------------------

def test_a_config_override_with_fewer_blocks_drops_their_sparse_layers(tmp_path):
    dense = hf_model("llama", seed=836)
    dense.save_pretrained(tmp_path / "dense")
    model = _sparsify(hf_model("llama", seed=836))
    flash_llm.save_pretrained(model, tmp_path / "c", progress=False)
    assert any(n.startswith("model.layers.1.") for n in _section(tmp_path / "c"))
    one = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "c", num_hidden_layers=1)
    assert len(one.model.layers) == 1
    assert _sparse_names(one) == {n for n in _sparse_names(model) if not n.startswith("model.layers.1.")}
    for n in _sparse_names(one):
        assert torch.equal(one.get_submodule(n).weight_data, model.get_submodule(n).weight_data)
    assert set(one.config.quantization_config.sparse_modules) == _sparse_names(one)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense", num_hidden_layers=1)
    ids = _ids(837)
    with torch.no_grad():
        torch.testing.assert_close(logits(one, ids), logits(ref, ids), atol=5e-3, rtol=5e-3)


def test_a_stray_layer_in_a_block_the_model_has_is_still_refused_under_an_override(tmp_path):
    # the drop is for blocks the model lacks only: a stray name in a block it has is still refused
    model = _sparsify(hf_model("llama", seed=838))
    flash_llm.save_pretrained(model, tmp_path / "c", progress=False)
    path = tmp_path / "c" / "config.json"
    cfg = json.loads(path.read_text())
    section = cfg["quantization_config"]["sparse_modules"]
    section["model.layers.0.nope.down_proj"] = section["model.layers.0.mlp.down_proj"]
    path.write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match=r"lists sparse layer 'model\.layers\.0\.nope\.down_proj' but "
                                          r"LlamaForCausalLM has no such module"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "c", num_hidden_layers=1)


# ---- 5. the source directory of a model transformers loaded -------------------------------------------------------

def _loaded_by_relative_name(tmp_path, monkeypatch, seed):
    """A sparse model saved in ``tmp_path/src`` (with a tokenizer file), loaded by transformers as ``"src"`` (a
    relative name: config._name_or_path), then the working directory moved to ``tmp_path/elsewhere``, where ``src``
    is another (empty) directory: (model, src, its file names, the loaded model)."""
    model = _sparsify(hf_model("llama", seed=seed))
    src = tmp_path / "src"
    flash_llm.save_pretrained(model, src, progress=False)
    (src / "tokenizer.json").write_text("{}")
    before = sorted(p.name for p in src.iterdir())
    monkeypatch.chdir(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained("src")
    (tmp_path / "elsewhere" / "src").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "elsewhere")
    return model, src, before, loaded


def test_a_transformers_loaded_model_keeps_its_source_across_chdir(tmp_path, monkeypatch):
    model, src, before, loaded = _loaded_by_relative_name(tmp_path, monkeypatch, 839)
    with pytest.raises(ValueError, match=rf"source directory {src} and path {src} are the same directory.*"
                                         r"nothing was written"):
        flash_llm.save_pretrained(loaded, src, overwrite=True, progress=False)
    with pytest.raises(ValueError, match=rf"lies inside path {tmp_path}\b.*nothing was written"):
        flash_llm.save_pretrained(loaded, tmp_path, overwrite=True, progress=False)
    assert sorted(p.name for p in src.iterdir()) == before
    flash_llm.save_pretrained(loaded, "copy", progress=False)  # elsewhere: fine
    _same_tensors(flash_llm.from_pretrained(tmp_path / "elsewhere" / "copy", progress=False), model)


def test_a_load_that_never_names_its_conversions_to_the_quantizer_is_refused(tmp_path, monkeypatch):
    # the sparse layers go in when transformers hands the quantizer the load's conversions: a transformers that read
    # the tensors without doing so would leave the linear layers as initialized, so the load is refused
    import transformers.modeling_utils as mu

    flash_llm.save_pretrained(_sparsify(hf_model("llama", seed=840)), tmp_path / "c", progress=False)
    original = mu.get_model_conversion_mapping

    def without_quantizer(model, key_mapping=None, hf_quantizer=None, **kwargs):
        return original(model, key_mapping, None, **kwargs)

    monkeypatch.setattr(mu, "get_model_conversion_mapping", without_quantizer)
    with pytest.raises(FormatError, match=r"read the tensors without calling the quantizer's "
                                          r"update_weight_conversions.*flash_llm\.from_pretrained"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "c")


# ---- review of the fixes above (rev1): base model's source, prefix under an override, key_mapping with own names -

def test_the_base_model_of_a_transformers_loaded_model_keeps_its_source_across_chdir(tmp_path, monkeypatch):
    # loaded.model, the base model, shares the relative config._name_or_path: it records the absolute source too
    model, src, before, loaded = _loaded_by_relative_name(tmp_path, monkeypatch, 8391)
    with pytest.raises(ValueError, match=rf"source directory {src} and path {src} are the same directory.*"
                                         r"nothing was written"):
        flash_llm.save_pretrained(loaded.model, src, overwrite=True, progress=False)
    assert sorted(p.name for p in src.iterdir()) == before
    flash_llm.save_pretrained(loaded.model, "base", progress=False)  # elsewhere: fine
    _same_tensors(transformers.AutoModel.from_pretrained(tmp_path / "elsewhere" / "base"), model.model)


def _hidden(model, ids) -> torch.Tensor:  # (the base model's: a base model's checkpoint has no lm_head)
    return model.base_model(ids).last_hidden_state


@pytest.mark.parametrize("cls,base_ckpt", [("AutoModel", False), ("AutoModelForCausalLM", True)])
def test_a_config_override_with_fewer_blocks_drops_them_across_the_base_model_prefix(cls, base_ckpt, tmp_path):
    # a causal LM's checkpoint (model.layers.1...) into its base model, and a base model's (layers.1...) into a
    # causal LM: the names of the dropped blocks differ from the model's by the prefix; transformers drops the
    # dense tensors of them the same way
    seed = 8361 + base_ckpt
    dense, model = hf_model("llama", seed=seed), _sparsify(hf_model("llama", seed=seed))
    save = (lambda m, p: flash_llm.save_pretrained(m.model, p, progress=False)) if base_ckpt else \
        (lambda m, p: flash_llm.save_pretrained(m, p, progress=False))
    save(model, tmp_path / "c")
    (dense.model if base_ckpt else dense).save_pretrained(tmp_path / "dense")
    auto = getattr(transformers, cls)
    one = auto.from_pretrained(tmp_path / "c", num_hidden_layers=1)
    blocks = one.layers if cls == "AutoModel" else one.model.layers
    assert len(blocks) == 1
    own = "" if cls == "AutoModelForCausalLM" else "model."  # (the prefix one lacks against `model`)
    kept = {n for n in _sparse_names(model) if not n.startswith("model.layers.1.") and n != "lm_head"}
    assert _sparse_names(one) == {n.removeprefix(own) for n in kept} and len(kept) > 1
    for n in _sparse_names(one):
        assert torch.equal(one.get_submodule(n).weight_data, model.get_submodule(own + n).weight_data)
    assert set(one.config.quantization_config.sparse_modules) == _sparse_names(one)
    ref = auto.from_pretrained(tmp_path / "dense", num_hidden_layers=1)
    ids = _ids(seed)
    with torch.no_grad():
        torch.testing.assert_close(_hidden(one, ids), _hidden(ref, ids), atol=5e-3, rtol=5e-3)


def test_save_original_format_false_ignores_a_key_mapping_that_matches_the_own_names(tmp_path):
    # a checkpoint whose attention modules are called `attn` (as GPT-2's), read with key_mapping {"attn": "self_attn"}:
    # the mapping also matches the model's own `self_attn`, which save_original_format=False stores, and a plain
    # from_pretrained (no key_mapping) reads back
    model = _sparsify(hf_model("llama", seed=8341))
    flash_llm.save_pretrained(model, tmp_path / "c", progress=False)
    src = _renamed(tmp_path / "c", tmp_path / "r", lambda k: k.replace(".self_attn.", ".attn."))
    assert any(".attn." in n for n in _section(src))
    km = {"attn": "self_attn"}
    loaded = transformers.AutoModelForCausalLM.from_pretrained(src, key_mapping=km)
    _same_tensors(loaded, model)
    loaded.save_pretrained(tmp_path / "o", save_original_format=False)
    assert set(_section(tmp_path / "o")) == _sparse_names(model)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "o")
    assert _sparse_names(back) == _sparse_names(model)
    _same_tensors(back, model)
    # the default still reverts the mapping: the checkpoint's names, which the same mapping reads back
    loaded.save_pretrained(tmp_path / "s")
    assert set(_section(tmp_path / "s")) == set(_section(src))
    _same_tensors(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "s", key_mapping=km), model)

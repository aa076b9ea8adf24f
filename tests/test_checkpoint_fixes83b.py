"""Session 83 fixes (second batch) from the bug hunt of flash_llm/checkpoint:

1. ``from_pretrained`` then ``save_pretrained`` keeps the source's ``dropout`` / ``attention_dropout`` / ``layerdrop``
   (``ModelConfig`` does not model them, and ``to_hf`` writes 0.0): a fine-tune of the re-saved checkpoint keeps them.
2. ``from_pretrained`` / ``load_checkpoint`` check a ``SparsifyConfig``'s fields again (as ``sparsify_`` does: a field
   may be set after construction): a str ``skip_names`` is refused rather than read letter by letter, a
   ``min_sparsity`` outside [0, 1] is refused, a bad format's error names ``SparsifyConfig.format``.
3. The source directory a save may not replace is recorded as an absolute path: after ``os.chdir``, a
   ``from_pretrained("ckpt")`` model may be saved over an unrelated ``./ckpt``, and not over its own source.
4. ``write_sparse_bitmask`` warns, as ``save_pretrained`` does, when tensors are not all of config.json's dtype
   (loading casts them).
"""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
import transformers

import flash_llm
from flash_llm import SparseLinear, SparsifyConfig
from flash_llm.checkpoint import load_checkpoint, write_sparse_bitmask
from flash_llm.models import from_config

from _ckpt import hf_model, save_hf

TRAINING_KEYS = ("dropout", "attention_dropout", "layerdrop")


def _random_fraction(gen: torch.Generator) -> float:
    return round(float(torch.rand((), generator=gen)) * 0.5 + 0.01, 3)  # (0.01..0.51: never the 0.0 to_hf writes)


# ---- 1. dropout settings kept on a re-save -----------------------------------------------------------------------

@pytest.mark.parametrize("family", ["opt", "llama"])
def test_resave_keeps_the_sources_dropout_settings(family, tmp_path):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    model = hf_model(family)
    keys = TRAINING_KEYS if family == "opt" else ("attention_dropout",)  # (LlamaConfig has no dropout / layerdrop)
    for k in keys:
        setattr(model.config, k, _random_fraction(gen))
    src = save_hf(model, tmp_path / "src")
    source = json.loads((src / "config.json").read_text())
    loaded = flash_llm.from_pretrained(src, progress=False)
    flash_llm.save_pretrained(loaded, tmp_path / "out", progress=False)
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert {k: saved[k] for k in keys} == {k: source[k] for k in keys}
    back = transformers.AutoConfig.from_pretrained(tmp_path / "out")
    assert all(getattr(back, k) == source[k] for k in keys)
    # a model built from a config alone (no source) still says 0.0, as before
    fresh = from_config(loaded.config.replace(), dtype=torch.float16)
    flash_llm.save_pretrained(fresh, tmp_path / "fresh", progress=False)
    assert all(json.loads((tmp_path / "fresh" / "config.json").read_text())[k] == 0.0 for k in keys)


# ---- 2. SparsifyConfig fields set after construction -------------------------------------------------------------

@pytest.fixture(scope="module")
def pruned_head(tmp_path_factory):
    """A Llama checkpoint whose lm_head has ~70 % zeros (so only skip_names keeps it dense)."""
    m = hf_model("llama")
    with torch.no_grad():
        m.lm_head.weight[torch.rand(m.lm_head.weight.shape) < 0.7] = 0
    return save_hf(m, tmp_path_factory.mktemp("head") / "src")


def _load_with(path, cfg):
    return flash_llm.from_pretrained(path, sparsify=cfg, progress=False)


def _fill_with(path, cfg):
    model = hf_model("llama")
    load_checkpoint(model, path, sparsify=cfg, progress=False)
    return model


@pytest.mark.parametrize("load", [_load_with, _fill_with], ids=["from_pretrained", "load_checkpoint"])
@pytest.mark.parametrize("field, value, error, match", [
    ("skip_names", "lm_head", TypeError, r"SparsifyConfig.skip_names must be a sequence of names, got the string"),
    ("skip_names", ["lm_head", 3], TypeError, r"SparsifyConfig.skip_names must hold names \(str\), got 3"),
    ("skip_names", [""], ValueError, r"SparsifyConfig.skip_names holds an empty name"),
    ("min_sparsity", 1.5, ValueError, r"SparsifyConfig.min_sparsity must be a number in \[0, 1\], got 1.5"),
    ("min_sparsity", -0.25, ValueError, r"SparsifyConfig.min_sparsity must be a number in \[0, 1\], got -0.25"),
    ("format", "bogus", ValueError, r"SparsifyConfig.format must be one of"),
])
def test_sparsify_config_fields_set_later_are_checked_again(pruned_head, load, field, value, error, match):
    cfg = SparsifyConfig()
    setattr(cfg, field, value)
    with pytest.raises(error, match=match):
        flash_llm.sparsify_(hf_model("llama"), cfg)  # (the reference: sparsify_ refuses it in these words)
    with pytest.raises(error, match=match):
        load(pruned_head, cfg)


@pytest.mark.parametrize("load", [_load_with, _fill_with], ids=["from_pretrained", "load_checkpoint"])
def test_skip_names_set_later_as_an_iterator_or_list_are_all_honoured(pruned_head, load):
    for names in (iter(["q_proj", "lm_head"]), ["q_proj", "lm_head"]):
        cfg = SparsifyConfig(min_sparsity=0.3)
        cfg.skip_names = names
        model = load(pruned_head, cfg)
        assert not isinstance(model.lm_head, SparseLinear)  # (every name is read for every layer, not once)
        assert not isinstance(model.model.layers[1].self_attn.q_proj, SparseLinear)
        assert isinstance(model.model.layers[1].mlp.up_proj, SparseLinear)
        assert cfg.skip_names is names  # (the caller's config is left as it is)


# ---- 3. the source directory, whatever the working directory -----------------------------------------------------

def test_source_directory_protection_does_not_depend_on_the_working_directory(tmp_path, monkeypatch):
    a, b = tmp_path / "A", tmp_path / "B"
    a.mkdir()
    b.mkdir()
    save_hf(hf_model("llama", seed=int(torch.randint(0, 2**31, ()))), a / "ckpt")
    (a / "ckpt" / "tokenizer.json").write_text("{}")
    save_hf(hf_model("llama", seed=1), b / "ckpt")  # an unrelated checkpoint of the same name
    monkeypatch.chdir(a)
    model = flash_llm.from_pretrained("ckpt", progress=False)
    filled = hf_model("llama")
    load_checkpoint(filled, "ckpt", progress=False)
    monkeypatch.chdir(b)
    before = sorted(os.listdir(a / "ckpt"))
    for m in (model, filled):
        for save in (flash_llm.save_pretrained, write_sparse_bitmask):
            for target in (a / "ckpt", a):  # the real source, given by absolute path, and a directory holding it
                with pytest.raises(ValueError, match=rf"source directory {a / 'ckpt'} .*the model was loaded from "
                                                     rf"{a / 'ckpt'}, whose tokenizer files"):
                    save(m, target, overwrite=True, progress=False)
            save(m, "ckpt", overwrite=True, progress=False)  # ./ckpt is B/ckpt now: not the source
            assert (b / "ckpt" / "config.json").exists()
    assert sorted(os.listdir(a / "ckpt")) == before


# ---- 4. write_sparse_bitmask and tensors of another dtype ---------------------------------------------------------

def test_write_sparse_bitmask_warns_where_loading_casts_tensors(tmp_path):
    model = hf_model("llama", seed=int(torch.randint(0, 2**31, ())))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a model of one dtype: no warning
        write_sparse_bitmask(model, tmp_path / "uniform", progress=False)
    model.lm_head.float()
    with torch.no_grad():
        model.lm_head.weight.add_(torch.rand(model.lm_head.weight.shape) * 1e-3)  # (values fp16 does not hold)
    with pytest.warns(UserWarning, match=r"write_sparse_bitmask: 1 tensor\(s\) are not torch.float16 \(e.g. "
                                         r"'lm_head.weight' is torch.float32\).*config.json says float16, so loading "
                                         r"casts them"):
        write_sparse_bitmask(model, tmp_path / "mixed", progress=False)
    back = flash_llm.from_pretrained(tmp_path / "mixed", progress=False).lm_head.weight
    assert back.dtype == torch.float16  # (what the warning says: cast)
    assert not torch.equal(back.float(), model.lm_head.weight.detach())


def test_write_sparse_bitmask_warns_for_a_sparse_layer_of_another_dtype(tmp_path):
    model = hf_model("llama", seed=int(torch.randint(0, 2**31, ())))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (sparsify_'s list of the layers it kept dense)
        flash_llm.sparsify_(model)
    up = model.model.layers[0].mlp.up_proj
    model.model.layers[0].mlp.up_proj = SparseLinear.from_dense(up.to_dense(), up.bias, dtype=torch.bfloat16)
    name = "model.layers.0.mlp.up_proj.weight"
    with pytest.warns(UserWarning, match=rf"write_sparse_bitmask: 1 tensor\(s\) are not torch.float16 \(e.g. "
                                         rf"'{name}' is torch.bfloat16\)"):
        write_sparse_bitmask(model, tmp_path / "out", progress=False)

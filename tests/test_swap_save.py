"""transformers' save_pretrained of a model whose SparseLinear layers were swapped in by hand (not by sparsify_), and
the names flash-llm gives its sparse layers when transformers' revert of its conversion mapping cannot be traced."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import flash_llm
from flash_llm import SparseLinear, SparsifyConfig

from _ckpt import VOCAB, gpt_neox_model, hf_model, logits

transformers = pytest.importorskip("transformers")


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))


def _swap(model, name: str) -> SparseLinear:
    """Replace linear layer ``name`` of ``model`` by hand, as a user would without sparsify_."""
    parent, _, attr = name.rpartition(".")
    layer = SparseLinear.from_linear(model.get_submodule(name))
    setattr(model.get_submodule(parent) if parent else model, attr, layer)
    return layer


def _sparse_names(model) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, SparseLinear)}


def _assert_loads_back(path, model) -> None:
    """Both loaders (transformers' and flash-llm's) give the model back: the same sparse layers, bit for bit, and the
    same logits to rounding (a loaded model may use another attention implementation; bf16 rounds to 1/128)."""
    ids = _ids()
    tol = 3e-2 if next(model.parameters()).dtype == torch.bfloat16 else 5e-3
    with torch.no_grad():
        want = logits(model, ids)
        for loaded in (transformers.AutoModelForCausalLM.from_pretrained(path),
                       flash_llm.from_pretrained(path, progress=False)):
            assert _sparse_names(loaded) == _sparse_names(model)
            for name in _sparse_names(model):
                a, b = model.get_submodule(name).state_dict(), loaded.get_submodule(name).state_dict()
                assert set(a) == set(b) and all(torch.equal(t, b[k]) for k, t in a.items() if torch.is_tensor(t))
            torch.testing.assert_close(logits(loaded, ids), want, atol=tol, rtol=tol)


# ---- 1. layers swapped in by hand ------------------------------------------------------------------------------

@pytest.mark.parametrize("family, dtype, name", [("llama", torch.bfloat16, "model.layers.0.mlp.up_proj"),
                                                 ("opt", torch.float16, "model.decoder.layers.1.fc1")])
def test_hand_swapped_layer_saves_through_transformers(family, dtype, name, tmp_path):
    # (it failed half-way: config.json written, then AttributeError: 'dict' object has no attribute 'device')
    model = hf_model(family, dtype=dtype)
    _swap(model, name)
    assert getattr(model, "hf_quantizer", None) is None
    model.save_pretrained(tmp_path / "c")
    qc = json.loads((tmp_path / "c" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "flash_llm" and set(qc["sparse_modules"]) == {name}
    _assert_loads_back(tmp_path / "c", model)


def test_hand_swapped_lm_head_is_saved_under_transformers_file_name(tmp_path):
    # GPT-NeoX stores lm_head as embed_out: the quantization section follows, both loaders map it back
    model = gpt_neox_model()
    _swap(model, "lm_head")
    model.save_pretrained(tmp_path / "c")
    qc = json.loads((tmp_path / "c" / "config.json").read_text())["quantization_config"]
    assert set(qc["sparse_modules"]) == {"embed_out"}
    _assert_loads_back(tmp_path / "c", model)


def test_causal_lm_whose_base_model_was_sparsified_saves(tmp_path):
    # sparsify_(lm.model) gives the base model the quantizer; the causal LM around it had none and failed half-way
    model = hf_model("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        flash_llm.sparsify_(model.model)
    assert getattr(model, "hf_quantizer", None) is None and model.model.hf_quantizer is not None
    model.save_pretrained(tmp_path / "c")
    _assert_loads_back(tmp_path / "c", model)


def test_layer_swapped_into_a_model_of_another_quantization_method_is_refused_before_writing(tmp_path):
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    class OtherConfig(QuantizationConfigMixin):
        def __init__(self):
            self.quant_method = "other"

    class Other(HfQuantizer):
        def _process_model_before_weight_loading(self, model, **kwargs):
            return model

        def _process_model_after_weight_loading(self, model, **kwargs):
            return model

        def is_serializable(self, *args, **kwargs):
            return True

        @property
        def is_trainable(self):
            return False

    model = hf_model("llama")
    _swap(model, "model.layers.0.mlp.up_proj")
    model.hf_quantizer = Other(OtherConfig(), pre_quantized=True)
    out = tmp_path / "c"
    with pytest.raises(ValueError, match=r"\('model\.layers\.0\.mlp\.up_proj'\) but is quantized with 'other'.*"
                                         r"nothing was written"):
        model.save_pretrained(out)
    assert not out.exists()


# ---- 2. names transformers' revert gives back ------------------------------------------------------------------

def _sparse_lm_head_neox():
    model = gpt_neox_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        flash_llm.sparsify_(model, SparsifyConfig(skip_names=()))
    assert "lm_head" in _sparse_names(model)
    return model


def _sparse_llama():
    model = hf_model("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        flash_llm.sparsify_(model)
    return model


def _refused(model, out, match: str) -> None:
    with pytest.raises(ValueError, match=match + r".*flash_llm\.save_pretrained\(model, path\)"):
        model.save_pretrained(out)
    assert not out.exists() or not list(out.iterdir())  # nothing written (transformers made the directory)


def test_transformers_without_revert_refuses_a_model_with_a_conversion_mapping(tmp_path, monkeypatch):
    # the section listed 'lm_head' while transformers' save wrote embed_out's arrays: a checkpoint neither loader read
    from transformers import core_model_loading

    neox, model = _sparse_lm_head_neox(), _sparse_llama()
    monkeypatch.delattr(core_model_loading, "revert_weight_conversion")  # (modeling_utils keeps its own reference)
    _refused(neox, tmp_path / "neox", r"no core_model_loading\.revert_weight_conversion: flash-llm cannot tell under "
             r"which names save_pretrained of GPTNeoXForCausalLM \(which has a conversion mapping\) stores")
    # a model transformers knows no conversion mapping for keeps its names: it saves as before
    model.save_pretrained(tmp_path / "llama")
    _assert_loads_back(tmp_path / "llama", model)


def test_revert_that_raises_on_every_layer_refuses_the_save(tmp_path, monkeypatch):
    from transformers import core_model_loading

    def revert(model, state_dict):
        raise RuntimeError("cannot convert")

    neox = _sparse_lm_head_neox()
    monkeypatch.setattr(core_model_loading, "revert_weight_conversion", revert)
    _refused(neox, tmp_path / "neox", r"save_pretrained of GPTNeoXForCausalLM would not store the tensors of sparse "
             r"layer 'gpt_neox\.layers\.0\.attention\.query_key_value' under names of their own")


def test_revert_that_copies_tensors_keeps_unchanged_names_and_refuses_renamed_ones(tmp_path, monkeypatch):
    from transformers import core_model_loading

    neox, model = _sparse_lm_head_neox(), _sparse_llama()
    real = core_model_loading.revert_weight_conversion
    monkeypatch.setattr(core_model_loading, "revert_weight_conversion",
                        lambda model, state: {k: t.clone() for k, t in real(model, state).items()})
    _refused(neox, tmp_path / "neox", r"save_pretrained of GPTNeoXForCausalLM would not store the tensors of sparse "
             r"layer 'lm_head' under names of their own .*names flash-llm cannot trace")
    model.save_pretrained(tmp_path / "llama")  # (names unchanged, the copies' shapes those of their probes)
    _assert_loads_back(tmp_path / "llama", model)


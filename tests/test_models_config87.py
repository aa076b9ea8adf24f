"""Session 87's ModelConfig fixes (flash_llm/models/config.py), from a hunt of flash_llm/models against transformers:

1. ``ModelConfig.from_hf`` refused a bad config.json value with a message that named ModelConfig's internal field
   (``activation``, ``norm_eps``, ``num_layers``, ``intermediate_size``...) but not the config.json key the user has
   to edit (``hidden_act`` / ``activation_function``, ``rms_norm_eps``, ``num_hidden_layers``, ``ffn_dim``,
   ``enable_bias``...), and given a path it left out the file.  Now the message starts with the file (``config``
   for a dict or a transformers config) and ends with the key(s) it was read from; the exception type is kept
   (``UnsupportedConfigError`` drives from_pretrained's transformers fallback).  ``ModelConfig(...)`` built directly
   still names the fields.
2. ``ModelConfig(family="opt", ...)`` built directly took Llama's defaults (SiLU, no biases, an untied head, no pad
   token): not an OPT, and its one-token decode never took OPT's fused path (ReLU only).  ``tie_word_embeddings``,
   ``activation``, ``attention_bias``, ``mlp_bias`` and ``pad_token_id`` now default to the family's values
   (OPT: True, relu, True, True, 1, as transformers' OPTConfig and from_hf of a config.json without them).
"""
from __future__ import annotations

import json
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flash_llm.models import ModelConfig, from_config, merge_projections, preset, set_fused
from flash_llm.models import config as config_module
from flash_llm.models.config import UnsupportedConfigError

LLAMA = {"model_type": "llama", "vocab_size": 97, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}
OPT = {"model_type": "opt", "vocab_size": 97, "hidden_size": 64, "ffn_dim": 96, "num_hidden_layers": 2,
       "num_attention_heads": 4}
SIZES = dict(vocab_size=97, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=96)


# ---- 1. from_hf's refusals name the config.json key and the file -----------------------------------------------------
# (base, key, value, what the message said before, the keys it names now, exception type)
CASES = [
    (LLAMA, "hidden_act", "gelu_new", "ModelConfig.activation must be one of", ["hidden_act"], UnsupportedConfigError),
    (LLAMA, "rms_norm_eps", 0, "ModelConfig.norm_eps must be a number > 0, got 0", ["rms_norm_eps"], ValueError),
    (LLAMA, "num_hidden_layers", 0, "ModelConfig.num_layers must be an int >= 1, got 0", ["num_hidden_layers"],
     ValueError),
    (LLAMA, "num_key_value_heads", 3, "ModelConfig.num_heads (4) must be a multiple of num_kv_heads (3)",
     ["num_attention_heads", "num_key_value_heads"], ValueError),
    (LLAMA, "num_attention_heads", 6, "hidden_size (64) is not a multiple of num_heads (6)",
     ["num_attention_heads"], ValueError),
    (OPT, "activation_function", "gelu_new", "ModelConfig.activation must be one of", ["activation_function"],
     UnsupportedConfigError),
    (OPT, "ffn_dim", 0, "ModelConfig.intermediate_size must be an int >= 1, got 0", ["ffn_dim"], ValueError),
    (OPT, "enable_bias", "true", "ModelConfig.attention_bias must be a bool, got 'true'", ["enable_bias"], ValueError),
    (OPT, "_remove_final_layer_norm", None, "ModelConfig.remove_final_layer_norm must be a bool, got None",
     ["_remove_final_layer_norm"], ValueError),
    (OPT, "init_std", -1, "ModelConfig.initializer_range must be a number >= 0, got -1", ["init_std"], ValueError),
    (OPT, "num_attention_heads", 0, "ModelConfig.num_heads must be an int >= 1, got 0", ["num_attention_heads"],
     ValueError),
]


def _suffix(keys):
    return f" (read from config.json key{'s' if len(keys) > 1 else ''} {', '.join(map(repr, keys))})"


@pytest.mark.parametrize("base,key,value,said,keys,exc", CASES, ids=[f"{c[0]['model_type']}-{c[1]}" for c in CASES])
def test_from_hf_refusal_names_the_file_and_the_config_json_key(tmp_path, base, key, value, said, keys, exc):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**base, key: value}))
    for source in (tmp_path, path, str(path)):  # (a folder, a path, a str)
        with pytest.raises(ValueError) as e:
            ModelConfig.from_hf(source)
        assert type(e.value) is exc  # (UnsupportedConfigError kept: from_pretrained(backend="auto") falls back on it)
        msg = str(e.value)
        assert msg.startswith(f"{path}: {said}"), msg  # the file, then the message as it was
        assert msg.endswith(_suffix(keys)), msg
    # a dict (or a transformers config: its to_dict()) is "config", as from_hf's other errors name it
    with pytest.raises(exc, match="^" + re.escape(f"config: {said}") + ".*" + re.escape(_suffix(keys)) + "$"):
        ModelConfig.from_hf({**base, key: value})


def test_a_rope_theta_read_from_the_rope_dict_is_named_by_its_place():
    for rope_key in ("rope_parameters", "rope_scaling"):
        rope = {"rope_type": "llama3" if rope_key == "rope_scaling" else "default", "rope_theta": float("nan"),
                "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
        with pytest.raises(ValueError, match=r"^config: ModelConfig\.rope_theta must be a number > 0, got nan "
                                             rf"\(read from config\.json key '{rope_key}\.rope_theta'\)$"):
            ModelConfig.from_hf({**LLAMA, rope_key: rope})
    # a top-level rope_theta: the key is the field's name, nothing to add
    with pytest.raises(ValueError, match=r"^config: ModelConfig\.rope_theta must be a number > 0, got -1\.0$"):
        ModelConfig.from_hf({**LLAMA, "rope_theta": -1.0})


def test_keys_of_the_same_name_get_the_file_only(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**LLAMA, "hidden_size": -64}))
    with pytest.raises(ValueError, match="^" + re.escape(f"{path}: ModelConfig.hidden_size must be an int >= 1, "
                                                         "got -64") + "$"):
        ModelConfig.from_hf(path)
    with pytest.raises(ValueError, match=r"^config: RoPE needs an even head_dim \(it rotates pairs of features\), "
                                         r"got 7$"):
        ModelConfig.from_hf({**LLAMA, "head_dim": 7})


def test_from_pretrained_source_replaces_config_and_keeps_the_key():
    """checkpoint's _flash_config drops the ``config: `` of a dict's error for the config.json path it read."""
    from flash_llm.checkpoint._model import _flash_config

    with pytest.raises(ValueError, match=r"^/x/config\.json: ModelConfig\.num_layers must be an int >= 1, got 0 "
                                         r"\(read from config\.json key 'num_hidden_layers'\)$") as e:
        _flash_config({**LLAMA, "num_hidden_layers": 0}, "auto", "/x/config.json")
    assert not isinstance(e.value, UnsupportedConfigError)
    with pytest.raises(UnsupportedConfigError):  # (what _flash_config's fallback catches)
        ModelConfig.from_hf({**OPT, "activation_function": "tanh"})


def test_direct_construction_still_names_the_fields():
    for kw, said in ((dict(num_layers=0), "ModelConfig.num_layers must be an int >= 1, got 0"),
                     (dict(activation="gelu_new"), "ModelConfig.activation must be one of"),
                     (dict(norm_eps=0), "ModelConfig.norm_eps must be a number > 0, got 0")):
        with pytest.raises(ValueError) as e:
            ModelConfig(family="llama", **{**SIZES, **kw})
        assert str(e.value).startswith(said) and "config.json" not in str(e.value), str(e.value)


# ---- 2. ModelConfig(family="opt", ...) is an OPT ------------------------------------------------------------------
def test_a_direct_opt_config_takes_opts_defaults():
    direct = ModelConfig(family="opt", **SIZES)
    assert (direct.activation, direct.attention_bias, direct.mlp_bias, direct.tie_word_embeddings,
            direct.pad_token_id) == ("relu", True, True, True, 1)
    # the config from_hf reads from an OPT config.json of the same sizes (transformers' OPTConfig defaults)
    assert direct == ModelConfig.from_hf(OPT)
    assert ModelConfig.from_hf(direct.to_hf()) == direct
    m = from_config(direct, dtype=torch.float32, seed=0)
    layer = m.model.decoder.layers[0]
    assert layer.act is F.relu and layer.fc1.bias is not None and layer.self_attn.q_proj.bias is not None
    assert m.lm_head.weight is m.model.decoder.embed_tokens.weight
    assert m.model.decoder.embed_tokens.padding_idx == 1


def test_llama_defaults_are_unchanged():
    c = ModelConfig(family="llama", **SIZES)
    assert (c.activation, c.attention_bias, c.mlp_bias, c.tie_word_embeddings, c.pad_token_id) == \
        ("silu", False, False, False, None)
    assert config_module.FAMILY_DEFAULTS["llama"] == {"tie_word_embeddings": False, "activation": "silu",
                                                      "attention_bias": False, "mlp_bias": False, "pad_token_id": None}


def test_given_values_win_over_the_family_defaults():
    c = ModelConfig(family="opt", **SIZES, activation="gelu", tie_word_embeddings=False, pad_token_id=None)
    assert (c.activation, c.tie_word_embeddings, c.pad_token_id, c.attention_bias) == ("gelu", False, None, True)
    # OPT's one bias flag (enable_bias): the one given alone sets the other
    for kw in (dict(attention_bias=False), dict(mlp_bias=False)):
        c = ModelConfig(family="opt", **SIZES, **kw)
        assert (c.attention_bias, c.mlp_bias) == (False, False)
    with pytest.raises(ValueError, match="OPT has one bias flag"):
        ModelConfig(family="opt", **SIZES, attention_bias=True, mlp_bias=False)
    # replace() keeps the values of the config it copies
    c = ModelConfig(family="opt", **SIZES, activation="gelu")
    assert c.replace(num_layers=1).activation == "gelu" and c.replace(num_layers=1).pad_token_id == 1
    assert preset("opt-13b").replace(num_layers=1, hidden_size=64, num_heads=4, intermediate_size=96) == \
        ModelConfig(family="opt", **{**SIZES, "num_layers": 1, "vocab_size": 50272}, bos_token_id=2, eos_token_id=2)
    # a Llama's values stay a Llama's
    assert ModelConfig(family="llama", **SIZES, pad_token_id=0).pad_token_id == 0


def test_a_direct_sparse_opt_takes_the_one_token_fused_path():
    """What a synthetic OPT benchmark measures: OPT's fused one-token decode (ReLU only), not the deferred path."""
    cfg = ModelConfig(family="opt", vocab_size=61, hidden_size=64, num_layers=1, num_heads=4, intermediate_size=96)
    m = from_config(cfg, dtype=torch.float16, seed=0).eval()
    from flash_llm import SparsifyConfig, sparsify_

    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, mod in m.named_modules():
            if isinstance(mod, nn.Linear) and n != "lm_head":
                mod.weight[torch.rand(mod.weight.shape, generator=g) < 0.6] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (no C compiler here: the fused ops fall back, with a warning)
        sparsify_(m, SparsifyConfig(min_sparsity=0.0))
        merge_projections(m)
        set_fused(m, True)
    with torch.no_grad():
        assert m.model.decoder.layers[0].sparse_projections(torch.randn(1, 1, 64, dtype=torch.float16)) is not None

"""Session 82's model-config fixes: replace() on an explicit head_dim, from_hf on a non-string model_type."""
import pytest

from flash_llm.models import ModelConfig
from flash_llm.models.config import UnsupportedConfigError


def test_replace_keeps_an_explicit_head_dim_where_hidden_is_not_a_multiple_of_heads():
    # 44 // 5 == 8, but 44 is not a multiple of 5: head_dim = 8 can only have been given, so replace() keeps it
    c = ModelConfig(family="llama", vocab_size=64, hidden_size=44, num_layers=2, num_heads=5, num_kv_heads=1,
                    head_dim=8, intermediate_size=64)
    c2 = c.replace(num_layers=1)
    assert (c2.num_layers, c2.head_dim, c2.hidden_size) == (1, 8, 44)


def test_replace_still_derives_a_derived_head_dim():
    c = ModelConfig(family="llama", vocab_size=64, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=64)
    assert c.head_dim == 16
    assert c.replace(hidden_size=128).head_dim == 32


@pytest.mark.parametrize("model_type", [["llama"], {"t": "opt"}, 3])
def test_from_hf_names_a_model_type_that_is_not_a_string(model_type):
    d = {"model_type": model_type, "vocab_size": 64, "hidden_size": 64, "num_hidden_layers": 1,
         "num_attention_heads": 4, "intermediate_size": 64}
    with pytest.raises(UnsupportedConfigError, match="model_type"):
        ModelConfig.from_hf(d)

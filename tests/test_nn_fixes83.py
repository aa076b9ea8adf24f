"""Session 83 hunt fixes (nn): load_state_dict pre-hooks on a SparseLinear, non-tensor inputs, zeros(device=0),
from_linear's eval() flag, sparsify_ names after tensor-parallel sharding."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from flash_llm import SparseLinear, SparsifyConfig, sparsify_


def _weight(m=64, k=128, density=0.3, seed=None):
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())) if seed is None else seed)
    w = torch.randn(m, k, generator=g)
    w[torch.rand(m, k, generator=g) >= density] = 0
    return w, torch.randn(m, generator=g)


# ---- 1. load_state_dict pre-hooks run before the layer reads its arrays and _extra_state ------------------------
def test_load_pre_hook_supplies_extra_state():
    """A hook that fills in a legacy checkpoint's missing metadata is seen: bf16 arrays load as bf16 (they were read
    as the fp16 shell's, silently, under strict=True), and the hook runs once per load, not again in nn.Module's."""
    w, b = _weight()
    src = SparseLinear.from_dense(w.bfloat16(), b.bfloat16())
    legacy = src.state_dict()
    meta = legacy.pop("_extra_state")  # written without the metadata
    dst = SparseLinear.zeros(128, 64)  # an fp16 shell
    calls = []

    def upgrade(module, state_dict, prefix, *args):
        calls.append(prefix)
        state_dict.setdefault(prefix + "_extra_state", meta)

    dst.register_load_state_dict_pre_hook(upgrade)
    result = dst.load_state_dict(dict(legacy), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert calls == [""]
    assert dst.weight_dtype == torch.bfloat16 and dst.nnz == src.nnz
    assert torch.equal(dst.to_dense(), src.to_dense()) and torch.equal(dst.bias, src.bias)
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    assert torch.equal(dst(x), src(x))
    dst.load_state_dict(dict(legacy))  # the hook stays registered (hidden from nn.Module's loader only during it)
    assert calls == ["", ""]


def test_load_pre_hook_renames_legacy_keys():
    """A hook that renames old array keys hands them to the layer's own loader (validated, another nnz allowed),
    not to nn.Module's size-checked buffer copy (a size mismatch error before)."""
    w, b = _weight()
    src = SparseLinear.from_dense(w.half(), b.half(), fmt="tiled-csl")
    legacy = {k.replace("weight_", "packed_"): v for k, v in src.state_dict().items()}

    def rename(state_dict, prefix, *args):
        for n in ("data", "offsets"):
            if prefix + "packed_" + n in state_dict:
                state_dict[prefix + "weight_" + n] = state_dict.pop(prefix + "packed_" + n)

    model = nn.Sequential(SparseLinear.zeros(128, 64))
    model[0]._register_load_state_dict_pre_hook(rename)
    model.load_state_dict({"0." + k: v for k, v in legacy.items()}, strict=True)
    layer = model[0]
    assert layer.weight_format is type(src.weight) and layer.nnz == src.nnz
    assert torch.equal(layer.to_dense(), src.to_dense())


# ---- 3. a non-tensor input is a TypeError naming x ---------------------------------------------------------------
@pytest.mark.parametrize("bad", [[0.0] * 128, None, 1.5, np.zeros((2, 128), dtype=np.float16)],
                         ids=["list", "None", "float", "numpy"])
def test_forward_non_tensor_names_x(bad):
    layer = SparseLinear.from_dense(_weight()[0].half())
    with pytest.raises(TypeError, match=r"^x must be a torch\.Tensor, got (list|NoneType|float|ndarray)$"):
        layer(bad)


# ---- 4. zeros(device=0) is cuda:0, as torch reads it -------------------------------------------------------------
def test_zeros_device_index_zero_not_cpu():
    try:
        expected = torch.zeros(1, device=0).device
    except (RuntimeError, AssertionError) as e:  # no CUDA here: torch refuses device 0, and so does the layer
        with pytest.raises(type(e)):
            SparseLinear.zeros(128, 64, device=0)
    else:
        layer = SparseLinear.zeros(128, 64, device=0)
        assert layer.weight_data.device == expected and layer.bias.device == expected
    assert SparseLinear.zeros(128, 64).weight_data.device == torch.device("cpu")  # (None: the CPU, as before)
    assert SparseLinear.zeros(128, 64, device="meta").weight_data.is_meta


# ---- 5. from_linear keeps the linear's train() / eval() flag -----------------------------------------------------
@pytest.mark.parametrize("training", [False, True])
def test_from_linear_keeps_training_flag(training):
    w, b = _weight()
    lin = nn.Linear(128, 64, dtype=torch.float16)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    lin.train(training)
    layer = SparseLinear.from_linear(lin)
    assert layer.training is training
    assert layer.to_linear().training is training  # (the round trip no longer flips an eval() layer)
    x = torch.randn(2, 128, dtype=torch.float16)
    torch.testing.assert_close(layer(x), lin(x), rtol=1e-2, atol=1e-2)


# ---- parallel 3. sparsify_ after tensor-parallel sharding: skip_names / filter_fn see the projection's name ------
def test_sparsify_after_sharding_uses_projection_names(world1):
    from flash_llm.models import ModelConfig, from_config
    from flash_llm.parallel import tensor_parallel_
    from flash_llm.prune import magnitude_prune_

    cfg = ModelConfig(family="llama", vocab_size=101, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=128, max_position_embeddings=64)
    model = from_config(cfg, dtype=torch.float16, seed=int(torch.randint(0, 2**31, ())))
    magnitude_prune_(model, 0.7, filter_fn=lambda mod, fqn: fqn != "lm_head")
    tensor_parallel_(model, world1)
    names = []

    def keep(module, fqn):
        names.append(fqn)
        return "v_proj" not in fqn

    # (the local layer's own name, as named_modules() and the report give it, skips it too: o_proj of layer 1)
    config = SparsifyConfig(skip_names=("lm_head", "q_proj", "model.layers.0.mlp.down_proj",
                                        "model.layers.1.self_attn.o_proj.linear"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = sparsify_(model, config, filter_fn=keep)
    assert "model.layers.0.self_attn.q_proj" in names and not any(n.endswith(".linear") for n in names)
    layers = model.model.layers
    for i in range(2):
        assert type(layers[i].self_attn.q_proj.linear) is nn.Linear  # skip_names "q_proj"
        assert type(layers[i].self_attn.v_proj.linear) is nn.Linear  # filter_fn
        assert isinstance(layers[i].self_attn.k_proj.linear, SparseLinear)
    assert type(layers[0].mlp.down_proj.linear) is nn.Linear
    assert type(layers[1].self_attn.o_proj.linear) is nn.Linear and isinstance(layers[0].self_attn.o_proj.linear,
                                                                                SparseLinear)
    assert isinstance(layers[1].mlp.down_proj.linear, SparseLinear)
    skipped = {s.fqn: s.reason for s in report.skipped}
    assert skipped["model.layers.0.self_attn.q_proj.linear"].startswith("name in skip_names")
    assert skipped["model.layers.1.self_attn.v_proj.linear"] == "excluded by filter_fn"

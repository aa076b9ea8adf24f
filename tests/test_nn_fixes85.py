"""Session 85 hunt fixes (nn).

1. ``sparsify_`` on an ``nn.Linear`` holding child modules swapped the parent in first, then looked the child up
   through the new SparseLinear: AttributeError with the model half converted (the docstring promises it unchanged);
   a child that stayed dense silently vanished with its state-dict keys.  Such a layer (and one with parameters or
   buffers beyond weight and bias) now stays dense with a reason (``_replacement_drops``, so ``tensor_parallel_``
   refuses it too), and every swap target is looked up before anything is swapped.
2. ``copy.copy(layer)`` shared nn.Module's ``_buffers`` dict while format / dtype / nnz are per-instance attributes:
   a load into the copy made the original decode the new arrays under its old dtype (silently wrong outputs).
   SparseLinear has a ``__copy__`` giving the copy its own dicts, and a load that takes new arrays puts the bias in a
   new tensor too (else the original kept its weight with the copy's new bias).
3. A ``torch.nn.utils.parametrize`` parametrization on a SparseLinear's bias escaped the layer's dtype pinning:
   ``.float()`` cast it (every forward then raised), a load of the other dtype wrote a stray ``bias`` buffer.  Now
   forward, casts / moves and loads refuse a parametrized layer with a clear error, changing nothing.
4. ``torch.jit.script`` failed with TorchScript's "Unknown type annotation: 'torch.Tensor'"; it now raises a
   TypeError naming SparseLinear and the alternatives (trace / compile / export).
"""

import copy
import re
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from flash_llm import SparseLinear, SparsifyConfig, sparsify_
from flash_llm.nn import _replacement_drops

pytestmark = [pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:`torch.jit.trace:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")]


def _pruned(k=64, m=64, seed=0, dtype=torch.float16, keep=0.3):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, m)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(m, k, generator=g))
        lin.weight[torch.rand(m, k, generator=g) > keep] = 0
        lin.bias.copy_(torch.randn(m, generator=g))
    return lin.to(dtype).eval()


def _sparsify(model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return sparsify_(model, **kw)


def _state(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


# ---- 1. a Linear with children / extra tensors stays dense ----------------------------------------------------------
def test_sparsify_keeps_a_linear_with_a_convertible_child_dense_and_converts_the_rest():
    """Before: AttributeError 'SparseLinear has no attribute extra', the model half converted."""
    outer = _pruned()
    outer.extra = _pruned(seed=1)
    model = nn.Sequential(outer, nn.ReLU(), _pruned(seed=2))
    keys = set(model.state_dict())
    report = _sparsify(model)
    assert type(model[0]) is nn.Linear and model[0] is outer
    assert isinstance(model[0].extra, SparseLinear) and isinstance(model[2], SparseLinear)
    assert sorted(c.fqn for c in report.converted) == ["0.extra", "2"]
    reason = dict(report.skipped)["0"]
    assert "submodule(s) 'extra'" in reason and "would drop" in reason
    assert {"0.weight", "0.bias"} <= keys and {k for k in keys if not k.startswith(("0.extra.", "2."))} <= set(
        model.state_dict())


def test_sparsify_keeps_a_linear_with_a_dense_child_and_its_state_dict_keys():
    """Before: the parent was replaced and its dense child vanished with 0.gate.weight / 0.gate.bias."""
    outer = _pruned()
    outer.gate = nn.Linear(64, 64, dtype=torch.float16)  # dense: stays dense
    model = nn.Sequential(outer)
    x = torch.randn(3, 64, dtype=torch.float16)
    want, state = model(x), _state(model)
    report = _sparsify(model)
    assert not report.converted and model[0] is outer and model[0].gate is not None
    assert "submodule(s) 'gate'" in dict(report.skipped)["0"]
    assert model.state_dict().keys() == state.keys()
    assert torch.equal(model(x), want)


@pytest.mark.parametrize("kind", ["buffer", "parameter", "none-buffer"])
def test_sparsify_keeps_a_linear_with_extra_tensors_dense(kind):
    lin = _pruned()
    if kind == "buffer":
        lin.register_buffer("scale", torch.ones(64, dtype=torch.float16))
    elif kind == "parameter":
        lin.scale = nn.Parameter(torch.ones(64, dtype=torch.float16))
    else:
        lin.register_buffer("scale", None)
    model = nn.Sequential(lin, _pruned(seed=1))
    report = _sparsify(model)
    assert model[0] is lin and isinstance(model[1], SparseLinear)
    assert "parameter(s) / buffer(s) 'scale'" in dict(report.skipped)["0"]


@pytest.mark.parametrize("fmt", ["bitmap", "tiled-csl", "delta-rows"])
def test_replacement_drops_sparse_linear_extras_but_not_its_own_arrays(fmt):
    """tensor_parallel_ rebuilds a SparseLinear from its weight and bias: its own arrays are not extras, anything else
    is."""
    layer = SparseLinear.from_linear(_pruned(), fmt=fmt)
    assert _replacement_drops(layer) is None
    assert _replacement_drops(SparseLinear.from_linear(_pruned(), fmt=fmt).to_linear()) is None
    layer.register_buffer("scale", torch.ones(3))
    assert "'scale'" in _replacement_drops(layer)
    other = SparseLinear.from_linear(_pruned(), fmt=fmt)
    other.adapter = nn.Linear(64, 64)
    assert "submodule(s) 'adapter'" in _replacement_drops(other)


UP = "model.layers.0.mlp.up_proj"


def _llama(dtype):
    from flash_llm.models import ModelConfig, from_config
    from flash_llm.prune import magnitude_prune_

    cfg = ModelConfig(family="llama", vocab_size=64, hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
                      intermediate_size=128, max_position_embeddings=32)
    torch.manual_seed(0)
    m = from_config(cfg, dtype=torch.float32, device="cpu")
    magnitude_prune_(m, 0.7, filter_fn=lambda mod, fqn: fqn != "lm_head")
    return m.to(dtype).eval()


@pytest.mark.parametrize("sparse", [False, True])
def test_tensor_parallel_refuses_a_projection_with_a_child(world1, sparse):
    from flash_llm.parallel import tensor_parallel_

    m = _llama(torch.float16)
    if sparse:
        _sparsify(m, config=SparsifyConfig())
        assert isinstance(m.get_submodule(UP), SparseLinear)
    m.get_submodule(UP).adapter = nn.Linear(4, 4)
    modules = dict(m.named_modules())
    with pytest.raises(ValueError, match=rf"^{re.escape(UP)}: has submodule\(s\) 'adapter'.*tensor_parallel_ "
                                         "rebuilds each projection"):
        tensor_parallel_(m, world1)
    assert dict(m.named_modules()).keys() == modules.keys()
    assert all(mod is modules[n] for n, mod in m.named_modules())


# ---- 2. copy.copy of a SparseLinear ---------------------------------------------------------------------------------
def _layer(dtype=torch.float16, fmt="bitmap", seed=0, bias=True):
    lin = _pruned(seed=seed, dtype=dtype)
    return SparseLinear.from_dense(lin.weight, lin.bias if bias else None, fmt=fmt)


@pytest.mark.parametrize("source", ["bf16", "tiled-csl", "other-nnz-and-bias"])
def test_load_into_a_shallow_copy_leaves_the_original_as_it_was(source):
    """Before: the original read the copy's new arrays under its own format / dtype / nnz (bf16: silently wrong
    output; other format: an error about a load it never had; other bias: its old weight with the new bias)."""
    orig = _layer()
    x = torch.randn(4, 64, dtype=torch.float16)
    want, dense, bias = orig(x), orig.to_dense(), orig.bias.clone()
    alias = copy.copy(orig)
    assert alias.weight_data is orig.weight_data and alias.bias is orig.bias  # tensors shared, as shallow copies do
    src = {"bf16": lambda: _layer(torch.bfloat16), "tiled-csl": lambda: _layer(fmt="tiled-csl"),
           "other-nnz-and-bias": lambda: _layer(seed=5)}[source]()
    alias.load_state_dict(src.state_dict())
    xs = x.to(src.weight_dtype)
    assert torch.equal(alias(xs), src(xs)) and alias.weight_format is src.weight_format
    assert torch.equal(orig(x), want) and torch.equal(orig.to_dense(), dense) and torch.equal(orig.bias, bias)
    assert orig.weight_dtype == torch.float16 and orig.weight_format.__name__ == "BitmapTiles"
    # the original still saves a checkpoint that loads (before, with another nnz: its stale nnz made it unloadable)
    fresh = SparseLinear.zeros(64, 64)
    fresh.load_state_dict(orig.state_dict())
    assert torch.equal(fresh(x), want)


def test_shallow_copy_keeps_its_attributes_and_modules_apart():
    orig = _layer()
    alias = copy.copy(orig)
    assert type(alias) is SparseLinear and alias._buffers is not orig._buffers
    assert alias._modules is not orig._modules and alias._parameters is not orig._parameters
    alias._replace_weight(SparseLinear.from_dense(orig.to_dense(), fmt="tiled-csl").weight)
    assert orig.weight_format.__name__ == "BitmapTiles" and torch.equal(orig.to_dense(), alias.to_dense())
    x = torch.randn(2, 64, dtype=torch.float16)
    assert torch.equal(orig(x), copy.deepcopy(orig)(x))  # deepcopy unaffected


def test_load_keeps_the_bias_requires_grad_flag():
    layer = _layer()
    layer.bias.requires_grad_(True)
    layer.load_state_dict(_layer(seed=3).state_dict())
    assert layer.bias.requires_grad and layer.bias.is_leaf


# ---- 3. parametrizations are refused --------------------------------------------------------------------------------
class _Double(nn.Module):
    def forward(self, b):
        return b * 2


def test_parametrized_sparse_linear_is_refused_with_nothing_changed():
    """Before: .float() cast parametrizations.bias.original to fp32 (every forward then raised about the bias dtype);
    a load of a bf16 checkpoint wrote a stray plain 'bias' buffer beside the parametrized one."""
    layer = _layer()
    parametrize.register_parametrization(layer, "bias", _Double())
    x = torch.randn(3, 64, dtype=torch.float16)
    msg = r"does not support torch.nn.utils.parametrize \(parametrized 'bias'.*remove_parametrizations\(layer, 'bias'\)"
    with pytest.raises(TypeError, match=msg):
        layer(x)
    for cast in (layer.float, layer.double, lambda: layer.to("cpu")):
        with pytest.raises(TypeError, match=msg):
            cast()
    assert layer.parametrizations.bias.original.dtype == torch.float16
    keys = list(layer.state_dict())
    model = nn.Sequential(layer)
    with pytest.raises(RuntimeError, match=r"loading into '0': SparseLinear does not support .*nothing was loaded"):
        model.load_state_dict(nn.Sequential(_layer(torch.bfloat16)).state_dict(), strict=False)
    assert list(layer.state_dict()) == keys and "bias" not in layer._buffers and layer.weight_dtype == torch.float16
    # removing the parametrization gives a working layer back
    parametrize.remove_parametrizations(layer, "bias")
    assert type(layer) is SparseLinear and layer(x).shape == (3, 64)
    layer.load_state_dict(_layer(torch.bfloat16).state_dict())
    assert layer.weight_dtype == layer.bias.dtype == torch.bfloat16


# ---- 4. torch.jit.script --------------------------------------------------------------------------------------------
def test_jit_script_says_it_is_unsupported_and_trace_works():
    model = nn.Sequential(nn.Linear(64, 64, dtype=torch.float16), _layer())
    with pytest.raises(TypeError, match=r"torch.jit.script does not support flash_llm.SparseLinear.*torch.jit.trace"):
        torch.jit.script(model)
    x = torch.randn(2, 64, dtype=torch.float16)
    assert torch.equal(torch.jit.trace(model, (x,))(x), model(x))

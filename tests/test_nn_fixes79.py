"""Session 79 hunt (79c) fixes: sparsify_ / merge_projections skip reasons, fused fallback, to_empty, flags."""

import functools
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import flash_llm
from flash_llm import SparseLinear, SparsifyConfig, sparsify_
from flash_llm.models import _fused
from flash_llm.models._merge import MergedLinear, merge_projections, unmerge_projections


def _pruned(k=64, m=64, dtype=torch.float16, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, m, dtype=torch.float32)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(m, k, generator=g))
        lin.weight[torch.rand(m, k, generator=g) < 0.7] = 0
        lin.bias.copy_(torch.randn(m, generator=g))
    return lin.to(dtype)


def _sparsify(model, config=None):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = sparsify_(model, config)
    return report, [str(w.message) for w in caught]


# ---- 1. a forward replaced on the instance (accelerate's add_hook_to_module) keeps the layer dense ----------------
def test_sparsify_skips_instance_forward_override():
    lin = _pruned()

    def new_forward(mod, *a, **k):
        return mod._old_forward(*a, **k) + 1

    lin._old_forward = lin.forward
    lin.forward = functools.update_wrapper(functools.partial(new_forward, lin), lin._old_forward)
    model = nn.Sequential(lin, _pruned(seed=1)).eval()
    x = torch.randn(4, 64, dtype=torch.float16)
    ref = model(x)
    report, msgs = _sparsify(model)
    assert [c.fqn for c in report.converted] == ["1"]
    assert [s.fqn for s in report.skipped] == ["0"] and "forward replaced on the instance" in report.skipped[0].reason
    assert any("forward replaced on the instance" in m for m in msgs)
    assert type(model[0]) is nn.Linear
    torch.testing.assert_close(model(x), ref)


# ---- 2. merge_projections leaves a group whose layers carry hooks --------------------------------------------------
class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(16, n) for n in (16, 8, 8))
        self._merge_groups = {"qkv_proj": ("q_proj", "k_proj", "v_proj")}
        self.qkv_proj = None


@pytest.mark.parametrize("how", ["forward", "pre", "instance"])
def test_merge_projections_keeps_group_with_hooks(how):
    torch.manual_seed(0)
    block = _Block().eval()
    if how == "forward":
        block.k_proj.register_forward_hook(lambda mod, i, o: o * 0.5)
    elif how == "pre":
        block.k_proj.register_forward_pre_hook(lambda mod, i: (i[0] * 2,))
    else:
        old = block.k_proj.forward
        block.k_proj.forward = lambda x: old(x) + 1
    report = merge_projections(block)
    assert report["qkv_proj"] != "merged" and "merging would drop" in report["qkv_proj"]
    assert not isinstance(block.qkv_proj, MergedLinear) and isinstance(block.k_proj, nn.Linear)


# ---- 3. an fp8 weight (no isfinite in torch): a named error in from_dense, a skip in sparsify_ ----------------------
def test_float8_weight_refused_by_name():
    w = torch.randn(16, 64).to(torch.float8_e4m3fn)
    with pytest.raises(TypeError, match=r"weight has dtype torch.float8_e4m3fn"):
        SparseLinear.from_dense(w, dtype=torch.float16)
    ok, f8 = _pruned(dtype=torch.float32), _pruned(dtype=torch.float32, seed=1)
    f8.weight = nn.Parameter(f8.weight.detach().to(torch.float8_e4m3fn), requires_grad=False)
    model = nn.Sequential(ok, f8)
    report, msgs = _sparsify(model, SparsifyConfig(dtype=torch.float16))
    assert [c.fqn for c in report.converted] == ["0"] and isinstance(model[0], SparseLinear)
    assert [s.fqn for s in report.skipped] == ["1"] and "float8_e4m3fn" in report.skipped[0].reason
    assert type(model[1]) is nn.Linear


# ---- 4. a sparse-layout or non-2-D weight is skipped with a reason; the other layers convert ----------------------
def test_sparse_layout_weight_skipped():
    a, b = _pruned(dtype=torch.float32), _pruned(dtype=torch.float32, seed=1)
    b.weight = nn.Parameter(b.weight.detach().to_sparse_csr(), requires_grad=False)
    model = nn.Sequential(a, b)
    report, _ = _sparsify(model, SparsifyConfig(dtype=torch.float16))
    assert [c.fqn for c in report.converted] == ["0"]
    assert [s.fqn for s in report.skipped] == ["1"] and "weight is a sparse tensor" in report.skipped[0].reason


def test_non_2d_weight_skipped():
    a, b = _pruned(), _pruned(seed=1)
    b.weight = nn.Parameter(torch.randn(64).half())
    model = nn.Sequential(a, b)
    report, _ = _sparsify(model)
    assert [c.fqn for c in report.converted] == ["0"]
    assert [s.fqn for s in report.skipped] == ["1"] and "weight is not 2-D" in report.skipped[0].reason


# ---- 5. a caller's error in a compiled fused function does not switch it to eager ----------------------------------
def test_fused_caller_error_does_not_switch_to_eager(monkeypatch):
    monkeypatch.setattr(_fused, "_COMPILED", {})
    key = ("rms_norm", "cpu", torch.float32)

    def broken(*args):
        raise RuntimeError("shape mismatch of the caller's")

    monkeypatch.setitem(_fused._COMPILED, key, _fused._with_fallback(key, broken))
    f = _fused.op("rms_norm", True)
    x = torch.randn(2, 3, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "compiling ... failed" warning
        with pytest.raises(RuntimeError):
            f(x, torch.ones(8), 1e-5)  # the eager version fails too: the caller's error
    assert _fused._COMPILED[key] is not _fused._EAGER["rms_norm"]
    with pytest.warns(RuntimeWarning, match="compiling the fused rms_norm failed"):
        f(x, torch.ones(16), 1e-5)  # eager works: compiling failed, so it switches
    assert _fused._COMPILED[key] is _fused._EAGER["rms_norm"]


# ---- 6. after to_empty() off meta, forward / to_dense refuse the uninitialized arrays -------------------------------
def test_to_empty_layer_refuses_until_loaded():
    s = SparseLinear.zeros(72, 40, device="meta").to_empty(device="cpu")
    with pytest.raises(RuntimeError, match="to_empty"):
        s(torch.randn(3, 72).half())
    with pytest.raises(RuntimeError, match="uninitialized"):
        s.to_dense()
    src = SparseLinear.from_linear(_pruned(72, 40))
    s.load_state_dict(src.state_dict())
    x = torch.randn(3, 72).half()
    torch.testing.assert_close(s(x), src(x))


# ---- 7. skip reasons name what is wrong --------------------------------------------------------------------------
class _MyT(torch.Tensor):
    pass


def test_skip_reasons_name_the_bias():
    lin = _pruned()
    lin.bias = nn.Parameter(lin.bias.detach().as_subclass(_MyT), requires_grad=False)
    report, _ = _sparsify(nn.Sequential(lin))
    assert report.skipped[0].reason.startswith("bias is a _MyT")
    lin = _pruned()
    lin.bias = nn.Parameter(lin.bias.detach().reshape(1, 64))
    report, _ = _sparsify(nn.Sequential(lin))
    reason = report.skipped[0].reason
    assert "bias has shape (1, 64); expected (64,)" in reason and "BitmapTiles" not in reason


# ---- 8. new modules take the training flag of those they replace ---------------------------------------------------
def test_converted_and_merged_layers_keep_eval_flag():
    model = nn.Sequential(_pruned()).eval()
    _sparsify(model)
    assert isinstance(model[0], SparseLinear) and not model[0].training
    assert not model[0].to_linear().training
    block = _Block().eval()
    assert merge_projections(block)["qkv_proj"] == "merged"
    assert not any(m.training for m in block.modules())
    unmerge_projections(block)
    assert not any(m.training for m in block.modules())


# ---- 9. numpy scalars and 0-d tensors --------------------------------------------------------------------------------
@pytest.mark.parametrize("v", [np.float32(0.5), torch.tensor(0.5), np.float64(0.5)])
def test_min_sparsity_accepts_numpy_and_0d(v):
    cfg = SparsifyConfig(min_sparsity=v)
    assert cfg.min_sparsity == 0.5 and type(cfg.min_sparsity) is float
    report, _ = _sparsify(nn.Sequential(_pruned()), cfg)
    assert len(report.converted) == 1


def test_min_sparsity_still_refuses_bools_and_out_of_range():
    for bad in (True, np.bool_(True), 1.5, torch.tensor([0.5]), float("nan")):
        with pytest.raises(ValueError, match="min_sparsity"):
            SparsifyConfig(min_sparsity=bad)


def test_zeros_accepts_numpy_and_0d_ints():
    s = SparseLinear.zeros(np.int64(64), torch.tensor(8))
    assert (s.in_features, s.out_features) == (64, 8) and type(s.in_features) is int
    for bad in (True, 64.0, torch.tensor([3]), np.int64(0)):
        with pytest.raises(ValueError, match="in_features"):
            SparseLinear.zeros(bad, 8)
    assert flash_llm.SparseLinear.zeros(64, 8).nnz == 0

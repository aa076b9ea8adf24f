"""Fixes of the bug hunt on flash_llm/nn.py and flash_llm/ops.py (/tmp/hunt_nn/REPORT.md, items 1-11): sparsify_
keeps dense, with a reason in its report and its warning, what it cannot replace safely (modules torch reads
directly, hooks of every kind, lossy casts, format limits, a bias on meta), never raises half-way, builds normal
tensors under inference mode and warns when it freezes trainable layers; the fused siblings of spmm carry
forward-mode tangents.  CPU, tiny models."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

import flash_llm
from flash_llm import BitmapTiles, SparseLinear, SparsifyConfig, sparsify_
from flash_llm.ops import spmm_add_, spmm_layer_norm, spmm_rms_norm, spmm_silu_mul
from conftest import assert_bit_equal, random_values, sparse_weight

pytestmark = [pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning"),
              pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")]


def _prune_(model: nn.Module, density: float = 0.4) -> nn.Module:
    """Every nn.Linear of ``model`` given a random weight of ``density`` nonzeros (in its dtype)."""
    with torch.no_grad():
        for i, m in enumerate(m for m in model.modules() if isinstance(m, nn.Linear)):
            if not m.weight.is_meta:
                m.weight.copy_(sparse_weight(*m.weight.shape, density, m.weight.dtype, seed=i))
    return model


def _sparsify(model, *args, **kw):
    """sparsify_ and the text of its 'kept dense' warning (None if it gave none), other warnings recorded too."""
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        report = sparsify_(model, *args, **kw)
    kept = [str(w.message) for w in rec if "nn.Linear layer(s) dense" in str(w.message)]
    assert len(kept) <= 1
    return report, (kept[0] if kept else None), rec


def _assert_warning_matches_report(report, msg):
    """The warning lists exactly the report's skipped layers and reasons."""
    assert msg is not None
    assert msg.startswith(f"sparsify_ kept {len(report.skipped)} nn.Linear layer(s) dense "
                          f"({len(report.converted)} converted):")
    assert msg.splitlines()[1:] == [f"  {s.fqn}: {s.reason}" for s in report.skipped]


# ---------------------------------------------------------------------------------------------------
# 1. modules torch reads directly: nn.TransformerEncoderLayer's linear1 / linear2
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stacked", [False, True], ids=["layer", "encoder"])
def test_transformer_encoder_still_runs_its_fast_path_after_sparsify(stacked):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False) if stacked else layer
    model = _prune_(model.half().eval())
    x = torch.randn(2, 5, 32, dtype=torch.float16)
    with torch.no_grad():
        ref = model(x)
    report, msg, _ = _sparsify(model)
    with torch.no_grad():  # the fast path reads .linear1.weight (torch._transformer_encoder_layer_fwd)
        assert torch.equal(model(x), ref)
    reasons = dict(report.skipped)
    prefixes = ["layers.0.", "layers.1."] if stacked else [""]
    for p in prefixes:
        for n in ("linear1", "linear2"):
            assert "nn.TransformerEncoderLayer" in reasons[p + n] and "reads its .weight directly" in reasons[p + n]
            assert type(model.get_submodule(p + n)) is nn.Linear
        assert "nn.MultiheadAttention" in reasons[p + "self_attn.out_proj"]
    _assert_warning_matches_report(report, msg)


def test_transformer_decoder_layer_linears_convert_and_run():
    # torch's TransformerDecoderLayer calls linear1 / linear2 as modules: they convert (its attention's out_proj,
    # read by nn.MultiheadAttention, stays dense)
    torch.manual_seed(0)
    model = _prune_(nn.TransformerDecoderLayer(32, 4, 64, dropout=0.0, batch_first=True).half().eval())
    x, mem = torch.randn(2, 5, 32, dtype=torch.float16), torch.randn(2, 3, 32, dtype=torch.float16)
    with torch.no_grad():
        ref = model(x, mem)
    report, msg, _ = _sparsify(model)
    assert [c.fqn for c in report.converted] == ["linear1", "linear2"]
    assert sorted(dict(report.skipped)) == ["multihead_attn.out_proj", "self_attn.out_proj"]
    with torch.no_grad():
        y = model(x, mem)
    assert (y.float() - ref.float()).abs().max() <= 2e-2 * max(1.0, ref.float().abs().max().item())
    _assert_warning_matches_report(report, msg)


# ---------------------------------------------------------------------------------------------------
# 2. forward-mode AD through spmm_silu_mul / spmm_rms_norm / spmm_layer_norm / spmm_add_
# ---------------------------------------------------------------------------------------------------
def _fused_cases():
    """name -> (the fused call of x, the same function in fp64 on the dense weight); w 32x64 at 40 %."""
    wd = sparse_weight(32, 64, 0.4, torch.float16, seed=3)
    w, w64 = BitmapTiles.from_dense(wd), wd.double()
    nw, nb = random_values(1, 64, torch.float16, seed=4)[0], random_values(1, 64, torch.float16, seed=5)[0]
    bias, acc = random_values(1, 32, torch.float16, seed=6)[0], random_values(3, 32, torch.float16, seed=7)
    rms64 = lambda t: nw.double() * t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6)  # noqa: E731
    ln64 = lambda t: torch.nn.functional.layer_norm(t, (64,), nw.double(), nb.double(), 1e-5)  # noqa: E731
    silu64 = lambda y: torch.nn.functional.silu(y[..., :16]) * y[..., 16:]  # noqa: E731
    return {
        "spmm_silu_mul": (lambda t: spmm_silu_mul(t, w), lambda t: silu64(t @ w64.T)),
        "spmm_rms_norm": (lambda t: spmm_rms_norm(t, nw, 1e-6, w), lambda t: rms64(t) @ w64.T),
        "spmm_rms_norm_silu": (lambda t: spmm_rms_norm(t, nw, 1e-6, w, act="silu_mul"),
                               lambda t: silu64(rms64(t) @ w64.T)),
        "spmm_layer_norm": (lambda t: spmm_layer_norm(t, nw, nb, 1e-5, w, bias, act="relu"),
                            lambda t: torch.relu(ln64(t) @ w64.T + bias.double())),
        "spmm_add_": (lambda t: spmm_add_(acc.clone(), t, w, bias), lambda t: acc.double() + t @ w64.T + bias.double()),
    }


def _assert_close(got, ref64):
    assert got.dtype == torch.float16 and got.shape == ref64.shape
    err = (got.double() - ref64).abs().max().item()
    assert err <= 1e-2 * ref64.abs().max().item() + 1e-3, f"max error {err:.3g} (|ref| {ref64.abs().max():.3g})"


@pytest.mark.parametrize("name", ["spmm_silu_mul", "spmm_rms_norm", "spmm_rms_norm_silu", "spmm_layer_norm",
                                  "spmm_add_"])
def test_fused_ops_forward_mode_tangents(name):
    f, ref = _fused_cases()[name]
    x, v = random_values(3, 64, torch.float16, seed=1), random_values(3, 64, torch.float16, seed=2)
    # torch.func.jvp (was an all-zero tangent)
    y, t = torch.func.jvp(f, (x,), (v,))
    assert torch.equal(y, f(x))  # the primal is the fused op's own result
    _, t64 = torch.func.jvp(ref, (x.double(),), (v.double(),))
    assert t64.abs().max() > 1
    _assert_close(t, t64)
    # torch.autograd.forward_ad (was a None tangent)
    with fwAD.dual_level():
        primal, tangent = fwAD.unpack_dual(f(fwAD.make_dual(x, v)))
    assert tangent is not None and torch.equal(primal, y) and torch.equal(tangent, t)
    # and against finite differences of the fp64 reference (the reference's own jvp is right)
    h = 1e-6
    fd = (ref(x.double() + h * v.double()) - ref(x.double() - h * v.double())) / (2 * h)
    assert (fd - t64).abs().max() <= 1e-5 * max(1.0, t64.abs().max().item())


def test_fused_ops_jacfwd_and_tangents_of_the_other_arguments():
    f, ref = _fused_cases()["spmm_silu_mul"]
    x = random_values(1, 64, torch.float16, seed=8)[0]
    _assert_close(torch.func.jacfwd(f)(x), torch.func.jacfwd(ref)(x.double()))
    # spmm_add_: acc's tangent adds to x's
    wd = sparse_weight(32, 64, 0.4, torch.float16, seed=3)
    w = BitmapTiles.from_dense(wd)
    acc, acc_t = random_values(3, 32, torch.float16, seed=9), random_values(3, 32, torch.float16, seed=10)
    x, v = random_values(3, 64, torch.float16, seed=11), random_values(3, 64, torch.float16, seed=12)
    with fwAD.dual_level():
        out = spmm_add_(fwAD.make_dual(acc.clone(), acc_t.clone()), fwAD.make_dual(x, v), w)
        tangent = fwAD.unpack_dual(out).tangent
    _assert_close(tangent, acc_t.double() + v.double() @ wd.double().T)
    # spmm_rms_norm: the norm weight's tangent
    nw, nw_t = random_values(1, 64, torch.float16, seed=13)[0], random_values(1, 64, torch.float16, seed=14)[0]
    _, t = torch.func.jvp(lambda g: spmm_rms_norm(x, g, 1e-6, w), (nw,), (nw_t,))
    x64 = x.double()
    _assert_close(t, (nw_t.double() * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6)) @ wd.double().T)


def test_fused_ops_without_forward_ad_run_their_ops_and_refuse_backward():
    f, _ = _fused_cases()["spmm_silu_mul"]
    x = random_values(3, 64, torch.float16, seed=1)
    xg = x.clone().requires_grad_()
    with pytest.raises(RuntimeError):  # no autograd formula: a backward is refused, not zeros
        f(xg).float().sum().backward()
    torch._dynamo.reset()
    with pytest.raises(Exception, match="flash_llm.spmm_silu_mul: forward-mode AD"):
        torch.compile(lambda t, u: torch.func.jvp(f, (t,), (u,))[1], fullgraph=True)(x, x)
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------------
# 3. backward and state-dict hooks are kept, like forward hooks
# ---------------------------------------------------------------------------------------------------
def test_layers_with_backward_or_state_dict_hooks_stay_dense():
    model = _prune_(nn.Sequential(*[nn.Linear(64, 64, dtype=torch.float16) for _ in range(6)])).eval()
    calls = []
    model[0].register_full_backward_hook(lambda *a: calls.append("bwd"))
    model[1].register_full_backward_pre_hook(lambda *a: calls.append("bwd_pre"))
    model[2]._register_state_dict_hook(lambda *a: calls.append("state_dict"))
    model[3].register_load_state_dict_post_hook(lambda *a: calls.append("load_post"))
    model[4].register_forward_hook(lambda *a: None)
    model[4].register_full_backward_hook(lambda *a: None)
    report, msg, _ = _sparsify(model)
    reasons = dict(report.skipped)
    assert reasons == {"0": "has 1 backward hook(s) that a replacement would drop",
                       "1": "has 1 backward hook(s) that a replacement would drop",
                       "2": "has 1 state-dict hook(s) that a replacement would drop",
                       "3": "has 1 state-dict hook(s) that a replacement would drop",
                       "4": "has 1 forward hook(s) and 1 backward hook(s) that a replacement would drop"}
    assert [c.fqn for c in report.converted] == ["5"]
    _assert_warning_matches_report(report, msg)
    x = random_values(2, 64, torch.float16).requires_grad_()
    model(x).float().sum().backward()
    model.load_state_dict(model.state_dict())
    assert sorted(calls) == ["bwd", "bwd_pre", "load_post", "state_dict"]


# ---------------------------------------------------------------------------------------------------
# 4. SparsifyConfig(dtype=...) / from_dense(dtype=...) casts that overflow or flush nonzeros
# ---------------------------------------------------------------------------------------------------
def test_lossy_dtype_cast_keeps_the_layer_dense():
    model = nn.Sequential(nn.Linear(64, 16, bias=False), nn.Linear(64, 64, bias=False), nn.Linear(64, 64),
                          nn.Linear(64, 64)).eval()
    _prune_(model)
    with torch.no_grad():
        model[0].weight[0, 0] = 7e4  # finite in fp32, above fp16's 65504
        model[1].weight.uniform_(1e-9, 2e-8)  # all nonzero in fp32; below fp16's smallest subnormal
        model[2].bias[3] = -1e5
    ref = [m.weight.detach().clone() for m in model]
    report, msg, _ = _sparsify(model, SparsifyConfig(dtype=torch.float16))
    reasons = dict(report.skipped)
    assert reasons["0"].startswith("weight cannot be cast to dtype=torch.float16 exactly to rounding: "
                                   "1 finite value(s) overflow to inf in torch.float16")
    assert reasons["1"].startswith("weight cannot be cast to dtype=torch.float16 exactly to rounding: "
                                   "4096 nonzero(s) flush to zero in torch.float16")
    assert reasons["2"] == ("bias cannot be cast to the weight's dtype torch.float16 exactly to rounding: "
                            "1 finite value(s) overflow to inf in torch.float16")
    assert [c.fqn for c in report.converted] == ["3"]
    assert all(torch.equal(model[i].weight, ref[i]) for i in range(3))
    _assert_warning_matches_report(report, msg)
    # bf16 holds fp32's range: the overflowing layer converts there, exact to rounding
    model = nn.Sequential(nn.Linear(64, 16, bias=False)).eval()
    _prune_(model)
    with torch.no_grad():
        model[0].weight[0, 0] = 7e4
    w32 = model[0].weight.detach().clone()
    report, _, _ = _sparsify(model, SparsifyConfig(dtype=torch.bfloat16))
    assert [c.fqn for c in report.converted] == ["0"]
    assert_bit_equal(model[0].to_dense(), w32.bfloat16())


def test_from_dense_refuses_a_lossy_cast_naming_the_argument():
    w = sparse_weight(16, 64, 0.4, torch.float32)
    w[0, 0] = 1e5
    with pytest.raises(ValueError, match=r"^weight cannot be cast to dtype=torch.float16 .*overflow to inf"):
        SparseLinear.from_dense(w, dtype=torch.float16)
    assert BitmapTiles.from_dense(w, dtype=torch.float16).to_dense()[0, 0] == float("inf")  # the formats: as .to
    w[0, 0] = 1e-42  # below bf16's smallest subnormal (about 9e-41)
    with pytest.raises(ValueError, match=r"^weight cannot be cast to dtype=torch.bfloat16 .*1 nonzero\(s\) flush"):
        SparseLinear.from_dense(w, dtype=torch.bfloat16)
    w[0, 0] = 1.0
    b = torch.zeros(16)
    b[1] = 1e6
    with pytest.raises(ValueError, match=r"^bias cannot be cast to the weight's dtype torch.float16 .*overflow"):
        SparseLinear.from_dense(w, b, dtype=torch.float16)
    lin = nn.Linear(64, 16, dtype=torch.float16)
    lin.bias = nn.Parameter(b)
    with pytest.raises(ValueError, match=r"^linear.bias cannot be cast"):
        SparseLinear.from_linear(lin)
    with pytest.raises(ValueError, match=r"^bias cannot be cast"):
        SparseLinear(BitmapTiles.from_dense(w.half()), b)
    sl = SparseLinear.from_dense(w, b.clamp(max=1e4), dtype=torch.float16)  # exact to rounding: fine
    assert_bit_equal(sl.to_dense(), w.half())


# ---------------------------------------------------------------------------------------------------
# 5. sparsify_ / from_dense under torch.inference_mode() build normal tensors
# ---------------------------------------------------------------------------------------------------
def test_sparsify_under_inference_mode_leaves_normal_tensors():
    model = _prune_(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)).half().eval())
    with torch.inference_mode():
        report, _, _ = _sparsify(model)
        lin = _prune_(nn.Sequential(nn.Linear(64, 32, dtype=torch.float16)))[0]
        extra = [SparseLinear.from_linear(lin), SparseLinear.from_dense(lin.weight, lin.bias)]
    assert [c.fqn for c in report.converted] == ["0", "2"]
    for layer in [model[0], model[2], *extra]:
        assert not any(t.is_inference() for t in layer.buffers())
    x = random_values(2, 64, torch.float16).requires_grad_()
    model(x).float().sum().backward()
    extra[0](x).float().sum().backward()
    assert x.grad is not None and x.grad.abs().max() > 0


# ---------------------------------------------------------------------------------------------------
# 6. a layer the format cannot hold stays dense; the others convert
# ---------------------------------------------------------------------------------------------------
def test_delta_rows_too_wide_layer_stays_dense():
    model = _prune_(nn.Sequential(nn.Linear(256, 256), nn.Linear(65536, 16)).half().eval())
    report, msg, _ = _sparsify(model, SparsifyConfig(format="delta-rows"))
    assert [c.fqn for c in report.converted] == ["0"]
    assert dict(report.skipped)["1"] == ("in_features 65536 >= 65536: DeltaRows stores 16-bit columns (use "
                                         "format='bitmap' or 'tiled-csl' for it)")
    assert type(model[1]) is nn.Linear
    _assert_warning_matches_report(report, msg)


def test_a_format_limit_found_while_compressing_keeps_the_layer_dense(monkeypatch):
    real = BitmapTiles.from_dense.__func__

    def limited(cls, w, *, dtype=None):
        if w.shape == (32, 64):
            raise ValueError("w (32, 64) is too large for one BitmapTiles matrix")
        return real(cls, w, dtype=dtype)

    monkeypatch.setattr(BitmapTiles, "from_dense", classmethod(limited))
    model = _prune_(nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 32)).half().eval())
    report, msg, _ = _sparsify(model)
    assert [c.fqn for c in report.converted] == ["0"]
    assert dict(report.skipped)["1"] == "BitmapTiles cannot hold it: w (32, 64) is too large for one BitmapTiles matrix"
    _assert_warning_matches_report(report, msg)


# ---------------------------------------------------------------------------------------------------
# 7. a bias on meta (or on another device than the weight)
# ---------------------------------------------------------------------------------------------------
def test_bias_on_meta_keeps_the_layer_dense():
    model = _prune_(nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64)).half().eval())
    model[1].bias = nn.Parameter(torch.empty(64, dtype=torch.float16, device="meta"))
    report, msg, _ = _sparsify(model)
    assert [c.fqn for c in report.converted] == ["0"]
    assert dict(report.skipped)["1"] == "bias is on the meta device (no values to copy); load the weights first"
    _assert_warning_matches_report(report, msg)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_bias_on_another_device_keeps_the_layer_dense():
    model = _prune_(nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64)).half().eval())
    model[1].bias = nn.Parameter(model[1].bias.detach().cuda())
    report, msg, _ = _sparsify(model)
    assert [c.fqn for c in report.converted] == ["0"]
    assert dict(report.skipped)["1"].startswith("bias is on cuda:0 but weight is on cpu")
    _assert_warning_matches_report(report, msg)


# ---------------------------------------------------------------------------------------------------
# 8. min_sparsity is an inclusive, exact bound
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pct", [20, 66, 70])
def test_min_sparsity_boundary_is_inclusive_and_exact(pct):
    def model_with(zeros):
        model = nn.Sequential(nn.Linear(200, 100, bias=False)).half().eval()  # 20000 weights
        w = random_values(1, 20000, torch.float16)[0]
        w[:zeros] = 0
        with torch.no_grad():
            model[0].weight.copy_(w[torch.randperm(20000, generator=torch.Generator().manual_seed(0))].view(100, 200))
        return model

    at = 20000 * pct // 100
    report, _, _ = _sparsify(model_with(at), SparsifyConfig(min_sparsity=pct / 100))
    assert [c.fqn for c in report.converted] == ["0"] and not report.skipped
    report, msg, _ = _sparsify(model_with(at - 1), SparsifyConfig(min_sparsity=pct / 100))
    assert not report.converted
    # (the sparsity printed rounded down, never as the bound it misses: 13199 / 20000 is "0.6599")
    assert dict(report.skipped)["0"] == (f"sparsity {(at - 1) * 10000 // 20000 / 10000:.4f} < min_sparsity {pct / 100} "
                                         f"({at - 1} of 20000 zeros)")
    _assert_warning_matches_report(report, msg)


# ---------------------------------------------------------------------------------------------------
# 9. skip_names items
# ---------------------------------------------------------------------------------------------------
def test_skip_names_are_validated_up_front():
    with pytest.raises(TypeError, match=r"SparsifyConfig.skip_names must hold names \(str\), got None"):
        SparsifyConfig(skip_names=("lm_head", None))
    with pytest.raises(TypeError, match=r"SparsifyConfig.skip_names must hold names \(str\), got 3"):
        SparsifyConfig(skip_names=[3])
    with pytest.raises(TypeError, match=r"SparsifyConfig.skip_names must be a sequence of names \(str\), got NoneType"):
        SparsifyConfig(skip_names=None)
    with pytest.raises(ValueError, match="SparsifyConfig.skip_names holds an empty name"):
        SparsifyConfig(skip_names=("",))
    assert SparsifyConfig(skip_names=["a", "b.c"]).skip_names == ("a", "b.c")
    # set after construction: sparsify_ checks again, before it changes anything
    model = _prune_(nn.Sequential(nn.Linear(64, 64)).half().eval())
    config = SparsifyConfig()
    config.skip_names = ("lm_head", None)
    with pytest.raises(TypeError, match="SparsifyConfig.skip_names must hold names"):
        sparsify_(model, config)
    assert type(model[0]) is nn.Linear


# ---------------------------------------------------------------------------------------------------
# 10. from_dense / from_linear errors name their own arguments
# ---------------------------------------------------------------------------------------------------
def test_from_dense_and_from_linear_errors_name_their_arguments():
    with pytest.raises(TypeError, match=r"^weight has dtype torch.float32; .*pass dtype="):
        SparseLinear.from_dense(torch.randn(4, 4))
    with pytest.raises(ValueError, match=r"^weight must be 2-D \[M, K\]; got 1-D"):
        SparseLinear.from_dense(torch.randn(4, dtype=torch.float16))
    with pytest.raises(TypeError, match=r"^weight must be a torch.Tensor, got list"):
        SparseLinear.from_dense([[1.0]])
    with pytest.raises(TypeError, match=r"^linear.weight has dtype torch.float32"):
        SparseLinear.from_linear(nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"^linear.weight is on the meta device"):
        SparseLinear.from_linear(nn.Linear(4, 4, dtype=torch.float16, device="meta"))


# ---------------------------------------------------------------------------------------------------
# 11. converting trainable layers of a train() model warns
# ---------------------------------------------------------------------------------------------------
def test_sparsify_of_a_training_model_warns_that_weights_are_frozen():
    model = _prune_(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.Linear(64, 8)).half())
    assert model.training
    report, msg, rec = _sparsify(model, SparsifyConfig(skip_names=("3",)))
    assert [c.fqn for c in report.converted] == ["0", "2"]
    frozen = [w for w in rec if issubclass(w.category, RuntimeWarning)]
    assert len(frozen) == 1
    assert str(frozen[0].message).startswith("sparsify_ converted 2 layer(s) whose weights were trainable in a model "
                                             "in train() mode: a SparseLinear is inference only")
    _assert_warning_matches_report(report, msg)
    # in eval(), or with frozen weights: no such warning
    for m in (_prune_(nn.Sequential(nn.Linear(64, 64)).half()).eval(),
              _prune_(nn.Sequential(nn.Linear(64, 64)).half()).requires_grad_(False)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert [c.fqn for c in sparsify_(m).converted] == ["0"]


# ---------------------------------------------------------------------------------------------------
# the report and the warning agree, for every new reason at once
# ---------------------------------------------------------------------------------------------------
def test_report_and_warning_agree_on_every_new_reason():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True, dtype=torch.float16)
            self.bwd = nn.Linear(64, 64, dtype=torch.float16)
            self.meta_bias = nn.Linear(64, 64, dtype=torch.float16)
            self.loud_bias = nn.Linear(64, 64, dtype=torch.float16)
            self.thin = nn.Linear(64, 64, dtype=torch.float16)
            self.ok = nn.Linear(64, 64, dtype=torch.float16)

    model = _prune_(Model()).eval()
    model.bwd.register_full_backward_hook(lambda *a: None)
    model.meta_bias.bias = nn.Parameter(torch.empty(64, dtype=torch.float16, device="meta"))
    model.loud_bias.bias = nn.Parameter(torch.full((64,), 1e6))
    with torch.no_grad():
        model.thin.weight.copy_(sparse_weight(64, 64, 0.95, torch.float16))
    report, msg, _ = _sparsify(model)
    assert [c.fqn for c in report.converted] == ["ok"]
    assert [s.fqn for s in report.skipped] == ["enc.self_attn.out_proj", "enc.linear1", "enc.linear2", "bwd",
                                               "meta_bias", "loud_bias", "thin"]
    _assert_warning_matches_report(report, msg)
    assert all(f"  {s.fqn}: {s.reason}" in str(report) for s in report.skipped)
    assert flash_llm.SparseLinear is SparseLinear

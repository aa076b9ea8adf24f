"""Session 84 hunt fixes (nn): sparsify_ and a torch.compile wrapper's own layer, assign=True loads of an nn.Parameter
bias, to_empty() off a real device, disjoint views of one storage in sparsify_, torch.fx.symbolic_trace."""

import copy
import io
import warnings

import pytest
import torch
from torch import nn

from flash_llm import SparseLinear, sparsify_
from flash_llm.prune import magnitude_prune_


def _pruned(k=64, m=64, seed=0, dtype=torch.float16):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, m)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(m, k, generator=g))
        lin.weight[torch.rand(m, k, generator=g) > 0.3] = 0
    return lin.to(dtype).eval()


def _sparsify(model, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = sparsify_(model, **kw)
    return report, [str(w.message) for w in caught]


# ---- 1. a layer a torch.compile wrapper holds as _orig_mod stays dense --------------------------------------------
def test_sparsify_keeps_a_compiled_linear_dense_and_says_why():
    """Its compiled forward calls the dense layer itself (bound at compile time): the swap was never used (silent
    wrong results after a load, bytes reported saved)."""
    model = nn.Sequential(_pruned(), nn.ReLU(), _pruned(64, 32, seed=1)).eval()
    dense = model[0]
    model[0] = torch.compile(dense, backend="eager")
    report, msgs = _sparsify(model)
    assert [c.fqn for c in report.converted] == ["2"]
    assert [s.fqn for s in report.skipped] == ["0._orig_mod"]
    reason = report.skipped[0].reason
    assert "torch.compile" in reason and "OptimizedModule '0'" in reason
    assert any("0._orig_mod: wrapped by torch.compile" in m for m in msgs)
    assert model[0]._orig_mod is dense  # untouched, and still the layer forward runs
    x = torch.randn(4, 64, dtype=torch.float16)
    torch.testing.assert_close(model(x), model[2](torch.relu(dense(x))))


def test_sparsify_a_compiled_linear_root_is_refused_the_same_way():
    report, _ = _sparsify(torch.compile(_pruned(), backend="eager"))
    assert not report.converted
    assert report.skipped[0].fqn == "_orig_mod" and "OptimizedModule '<the model>'" in report.skipped[0].reason


def test_sparsify_converts_layers_inside_a_compiled_parent():
    """A compiled module holding the layer deeper down calls it by attribute: the replacement runs (Dynamo
    recompiles), also after a load_state_dict of other weights into it."""
    inner = nn.Sequential(_pruned(), nn.ReLU())
    model = nn.Sequential(torch.compile(inner, backend="eager"), _pruned(64, 32, seed=1)).eval()
    x = torch.randn(4, 64, dtype=torch.float16)
    model(x)  # compiled once with the dense layer
    report, _ = _sparsify(model)
    assert [c.fqn for c in report.converted] == ["0._orig_mod.0", "1"] and not report.skipped
    other = SparseLinear.from_linear(_pruned(seed=2))
    model[0]._orig_mod[0].load_state_dict(other.state_dict())
    torch.testing.assert_close(model(x), model[1](torch.relu(other(x))))


# ---- 2. assign=True keeps the bias a buffer in the weight's dtype ---------------------------------------------------
@pytest.mark.parametrize("bias_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_assign_load_of_a_parameter_bias_keeps_a_buffer(bias_dtype, device):
    dense = _pruned(dtype=torch.float32)
    sparse = SparseLinear.from_linear(dense, dtype=torch.float16)
    sd = {k: v for k, v in sparse.state_dict().items() if k != "bias"}
    sd["bias"] = nn.Parameter(dense.bias.detach().to(bias_dtype))  # a dense model's bias parameter
    layer = SparseLinear.zeros(64, 64, device=device)
    layer.load_state_dict(sd, assign=True)
    assert not list(layer.parameters())
    assert [n for n, _ in layer.named_buffers()] == ["weight_data", "weight_offsets", "bias"]
    assert type(layer.bias) is torch.Tensor and layer.bias.dtype == torch.float16 and not layer.bias.requires_grad
    x = torch.randn(3, 64, dtype=torch.float16)
    torch.testing.assert_close(layer(x), sparse(x))


# ---- 3. to_empty() anywhere leaves the layer flagged uninitialized ---------------------------------------------------
@pytest.mark.parametrize("fmt", ["bitmap", "tiled-csl", "delta-rows"])
def test_to_empty_off_a_real_device_refuses_forward_until_loaded(fmt):
    src = SparseLinear.from_linear(_pruned(), fmt=fmt)
    layer = copy.deepcopy(src).to_empty(device="cpu")
    x = torch.randn(2, 64, dtype=torch.float16)
    with pytest.raises(RuntimeError, match=r"uninitialized memory \(to_empty\(\) allocated them without values\): "
                                           r"load_state_dict its weights first"):
        layer(x)
    with pytest.raises(RuntimeError, match="uninitialized memory"):
        layer.to_dense()
    layer.load_state_dict(src.state_dict())
    torch.testing.assert_close(layer(x), src(x))


def test_to_empty_of_a_model_holding_a_cpu_shell():
    with torch.device("meta"):
        model = nn.Sequential(SparseLinear.zeros(64, 32))  # (device=None: built on the CPU all the same)
    model.to_empty(device="cpu")
    with pytest.raises(RuntimeError, match="uninitialized memory"):
        model(torch.randn(2, 64, dtype=torch.float16))


def test_value_keeping_moves_do_not_flag_the_layer():
    src = SparseLinear.from_linear(_pruned())
    x = torch.randn(2, 64, dtype=torch.float16)
    layer = copy.deepcopy(src)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the casts' "leaves SparseLinear layers in float16")
        for move in (lambda m: m.to("cpu"), lambda m: m.half(), lambda m: m.float(), lambda m: m.to(torch.bfloat16),
                     lambda m: m.type(torch.float64), lambda m: m.type(torch.bfloat16), lambda m: m.cpu(),
                     lambda m: m.to("cpu", non_blocking=True), lambda m: m.share_memory(), copy.deepcopy):
            layer = move(layer)
            assert not layer._unfilled
            torch.testing.assert_close(layer(x), src(x))
    meta = copy.deepcopy(src).to("meta")
    assert not meta._unfilled
    assert meta.to_empty(device="cpu")._unfilled  # (off meta: as before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_moves_keep_the_layer_and_to_empty_on_cuda_flags_it():
    """The probe on a GPU: moves to and from CUDA (blocking or not, a model's .cuda()) keep the layer usable; to_empty()
    on CUDA, from a CUDA or a CPU layer, flags it."""
    src = SparseLinear.from_linear(_pruned())
    x = torch.randn(2, 64, dtype=torch.float16)
    want = src(x)
    for move in (lambda m: m.cuda(), lambda m: m.to("cuda", non_blocking=True), lambda m: nn.Sequential(m).cuda()[0],
                 lambda m: m.cuda().cpu(), lambda m: m.cuda().to("cpu", non_blocking=True)):
        layer = move(copy.deepcopy(src))
        assert not layer._unfilled
        torch.testing.assert_close(layer(x.to(layer.weight_data.device)).cpu(), want, atol=2e-2, rtol=2e-3)
    for start in ("cpu", "cuda"):
        layer = copy.deepcopy(src).to(start).to_empty(device="cuda")
        assert layer._unfilled
        with pytest.raises(RuntimeError, match="uninitialized memory"):
            layer(x.cuda())


# ---- 4. disjoint views of one storage are not tied ------------------------------------------------------------
class _Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(64, 64, bias=False) for _ in range(3))


def test_sparsify_converts_disjoint_views_of_a_fused_weight():
    torch.manual_seed(0)
    qkv = torch.randn(192, 64, dtype=torch.float16)
    buf = io.BytesIO()
    torch.save({"q.weight": qkv[:64], "k.weight": qkv[64:128], "v.weight": qkv[128:]}, buf)
    buf.seek(0)
    m = _Attn().half().eval()
    m.load_state_dict(torch.load(buf), assign=True)  # (torch.load keeps the views of one storage)
    assert len(magnitude_prune_(m, 0.5)) == 3
    expected = {n: getattr(m, n).weight.detach().clone() for n in "qkv"}
    report, _ = _sparsify(m)
    assert sorted(c.fqn for c in report.converted) == ["k", "q", "v"] and not report.skipped
    for n in "qkv":
        assert torch.equal(getattr(m, n).to_dense(), expected[n])


def test_sparsify_still_refuses_overlapping_views():
    m = _Attn().half().eval()
    base = _pruned(64, 96).weight.detach()
    m.q.weight = nn.Parameter(base[:64])
    m.k.weight = nn.Parameter(base[32:])  # rows 32..63 shared with q
    report, _ = _sparsify(m)
    reasons = {s.fqn: s.reason for s in report.skipped}
    assert reasons["q"] == "weight shares memory with k.weight (tied); converting would untie it"
    assert reasons["k"] == "weight shares memory with q.weight (tied); converting would untie it"
    assert [c.fqn for c in report.converted] in ([], ["v"])  # (v: its own random weight, maybe too dense)


# ---- 5. torch.fx.symbolic_trace records a SparseLinear as one call -------------------------------------------------
def test_fx_symbolic_trace_keeps_the_layer():
    model = nn.Sequential(_pruned(), nn.ReLU(), _pruned(64, 32, seed=1)).eval()
    _sparsify(model)
    gm = torch.fx.symbolic_trace(model)
    x = torch.randn(4, 64, dtype=torch.float16)
    torch.testing.assert_close(gm(x), model(x))
    assert isinstance(gm.get_submodule("0"), SparseLinear)
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target.__name__ == "_sparse_linear"]
    assert len(calls) == 2
    other = SparseLinear.from_linear(_pruned(seed=3))  # a load into the traced model reaches the layer
    gm.get_submodule("0").load_state_dict(other.state_dict())
    torch.testing.assert_close(gm(x), model[2](torch.relu(other(x))))


def test_fx_symbolic_trace_of_the_layer_itself_says_what_to_do():
    with pytest.raises(TypeError, match="symbolic_trace of a SparseLinear itself is not supported"):
        torch.fx.symbolic_trace(SparseLinear.from_linear(_pruned()))

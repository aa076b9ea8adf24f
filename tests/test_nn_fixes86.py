"""Session 86: ``SparseLinear`` under ``torch.autocast``.  ``nn.Linear`` runs an fp32 input in autocast's dtype; the
drop-in layer raised a TypeError that never named autocast (a model converted to bf16 and run as usual, fp32 residual
stream under autocast, failed at its first sparse layer), and an fp16 layer under bf16 autocast answered in fp16.  Now
autocast in the layer's dtype casts the input as for ``nn.Linear``; autocast to another dtype is refused in words."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flash_llm import SparseLinear


def _pair(dtype, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(128, 48, bias=bias, dtype=dtype)
    with torch.no_grad():
        lin.weight[lin.weight.abs() < 0.05] = 0  # about 40 % zeros
    return lin, SparseLinear.from_linear(lin)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_autocast_matches_nn_linear(x_dtype, bias):
    lin, sp = _pair(torch.bfloat16, bias)
    x = torch.randn(3, 5, 128, dtype=x_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = lin(x), sp(x)
    assert got.dtype == want.dtype == torch.bfloat16
    assert torch.equal(got, want)


def test_autocast_to_another_dtype_than_the_layers_is_refused():
    """An fp16 layer under bf16 autocast would compute bf16-range inputs in fp16 (inf / nan where nn.Linear, in bf16,
    stays finite): refused in words naming both dtypes."""
    _, sp = _pair(torch.float16)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(
            TypeError, match=r"holds a torch.float16 weight .* torch.autocast asks for torch.bfloat16"):
        sp(torch.full((2, 128), 1e5))


def test_autocast_gradients_reach_x_and_bias():
    lin, sp = _pair(torch.bfloat16)
    sp.bias.requires_grad_(True)
    x = torch.randn(2, 128, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sp(x).float().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()
    assert sp.bias.grad is not None


def test_without_autocast_a_dtype_mismatch_is_still_refused():
    _, sp = _pair(torch.bfloat16)
    with pytest.raises(TypeError, match="holds a torch.bfloat16 weight"):
        sp(torch.randn(2, 128))
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(TypeError, match="holds a torch.bfloat16"):
        sp(torch.ones(2, 128, dtype=torch.int64))  # (not floating: autocast leaves it alone)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(TypeError, match="x has dtype torch.float64"):
        sp(torch.randn(2, 128, dtype=torch.float64))  # (autocast leaves float64 alone: nn.Linear refuses it too)


def _layer(seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(64, 128, generator=g)
    w[w.abs() < 1] = 0
    return SparseLinear.from_dense(w.half(), torch.randn(64, generator=g).half())


def test_a_partial_load_with_strict_false_says_what_it_dropped():
    """A state dict lacking one of the layer's arrays loads nothing into it (all or nothing per layer); with
    strict=False the keys it was given and dropped (the other array, the bias) were reported nowhere."""
    src, dst = _layer(1), _layer(0)
    before = {k: v.clone() for k, v in dst.state_dict().items() if isinstance(v, torch.Tensor)}
    sd = {k: v for k, v in src.state_dict().items() if k != "weight_offsets"}
    with pytest.warns(UserWarning, match=r"weight_data, bias not loaded, as the checkpoint lacks weight_offsets"):
        res = dst.load_state_dict(sd, strict=False)
    assert res.missing_keys == ["weight_offsets"]
    after = {k: v for k, v in dst.state_dict().items() if isinstance(v, torch.Tensor)}
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing changed
    with pytest.raises(RuntimeError, match="weight_offsets"):
        dst.load_state_dict(sd)  # strict: torch's error names the missing array (alone since session 87)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_on_cuda_matches_nn_linear(dtype):
    torch.manual_seed(3)
    lin = nn.Linear(256, 192, dtype=dtype, device="cuda")
    with torch.no_grad():
        lin.weight[lin.weight.abs() < 0.04] = 0
    sp = SparseLinear.from_linear(lin)
    x = torch.randn(5, 256, device="cuda")  # fp32, as a residual stream under autocast
    with torch.autocast("cuda", dtype=dtype):
        want, got = lin(x), sp(x)
    assert got.dtype == want.dtype == dtype
    ref = x.double() @ lin.weight.double().t() + lin.bias.double()
    err_torch = (want.double() - ref).abs().max().item()
    assert (got.double() - ref).abs().max().item() <= 2 * err_torch + 1e-3

"""flash_llm.spmm on CPU (the pure-PyTorch reference path): accuracy, shapes, errors, custom-op checks."""

from __future__ import annotations

import pytest
import torch

import flash_llm
from flash_llm import BitmapTiles
from flash_llm.reference import FORMAT_IDS
from conftest import assert_close_to_reference, random_values, sparse_weight

# opcheck goes through torch.jit internals that warn about their own deprecation
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

M, K = 70, 130  # not multiples of 16/64: exercises the padding of both formats


def _weight(fmt, dtype, density=0.5, m=M, k=K, seed=0):
    w = sparse_weight(m, k, density, dtype, seed=seed)
    return fmt.from_dense(w), w


def _bias(dtype, m=M, seed=99):
    return random_values(1, m, dtype, seed=seed)[0]


# ---------------------------------------------------------------------------------------------------
# Accuracy against a float64 reference of the rounded inputs
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("x_shape", [(1, K), (3, K), (17, K), (64, K), (2, 3, K)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_spmm_matches_fp64(fmt, dtype, x_shape, with_bias):
    c, w = _weight(fmt, dtype)
    x = random_values(1, int(torch.tensor(x_shape).prod()), dtype, seed=len(x_shape) * 100 + x_shape[0])
    x = x.reshape(x_shape)
    bias = _bias(dtype) if with_bias else None
    y = flash_llm.spmm(x, c, bias)
    assert y.shape == (*x_shape[:-1], M)
    assert_close_to_reference(y.reshape(-1, M), x.reshape(-1, K), w, bias)


@pytest.mark.parametrize("m,k", [(4096, 4096), (11008, 256), (256, 11008)])
def test_spmm_matches_fp64_llm_shapes(fmt, dtype, m, k):
    """Large K: an fp16-accumulating implementation would fail the fp32-derived tolerance here."""
    c, w = _weight(fmt, dtype, density=0.5, m=m, k=k, seed=m + k)
    x = random_values(3, k, dtype, seed=5)
    bias = _bias(dtype, m)
    assert_close_to_reference(flash_llm.spmm(x, c, bias), x, w, bias)


@pytest.mark.parametrize("density", [0.0, 1.0])
def test_spmm_extreme_densities(fmt, dtype, density):
    c, w = _weight(fmt, dtype, density=density)
    x = random_values(17, K, dtype, seed=3)
    bias = _bias(dtype)
    y = flash_llm.spmm(x, c, bias)
    assert_close_to_reference(y, x, w, bias)
    if density == 0.0:
        assert torch.equal(y, bias.expand(17, M))
        assert torch.equal(flash_llm.spmm(x, c), torch.zeros(17, M, dtype=dtype))


def test_spmm_fp32_accumulation_exactness(fmt, dtype):
    """Sums an fp16/bf16 accumulator could not hold: 1 + 2^-11 * 1024 terms must give 1.5 exactly."""
    k = 1025
    w = torch.ones(2, k, dtype=dtype)
    x = torch.full((1, k), 2.0 ** -11, dtype=dtype)
    x[0, 0] = 1.0
    y = flash_llm.spmm(x, fmt.from_dense(w))
    assert y.tolist() == [[1.5, 1.5]]


def test_spmm_non_contiguous_x(fmt, dtype):
    c, w = _weight(fmt, dtype)
    bias = _bias(dtype)
    xt = random_values(K, 9, dtype, seed=8).t()  # [9, K], transposed view
    assert not xt.is_contiguous()
    xs = random_values(20, 2 * K, dtype, seed=9)[::3, ::2]  # [7, K], strided in both dims
    assert not xs.is_contiguous()
    for x in (xt, xs):
        y = flash_llm.spmm(x, c, bias)
        assert_close_to_reference(y, x, w, bias)
        assert torch.equal(y, flash_llm.spmm(x.contiguous(), c, bias))
    # non-contiguous bias too
    b2 = random_values(1, 2 * M, dtype, seed=4)[0, ::2]
    assert torch.equal(flash_llm.spmm(xt, c, b2), flash_llm.spmm(xt, c, b2.contiguous()))


@pytest.mark.parametrize("x_shape", [(0, K), (2, 0, K)])
def test_spmm_empty_x(fmt, dtype, x_shape):
    c, _ = _weight(fmt, dtype)
    y = flash_llm.spmm(torch.empty(x_shape, dtype=dtype), c, _bias(dtype))
    assert y.shape == (*x_shape[:-1], M) and y.dtype == dtype


def test_spmm_1d_x(fmt, dtype):
    c, w = _weight(fmt, dtype)
    x = random_values(1, K, dtype, seed=1)[0]
    y = flash_llm.spmm(x, c)
    assert y.shape == (M,)
    assert torch.equal(y, flash_llm.spmm(x[None], c)[0])


def test_spmm_after_save_load(tmp_path, fmt, dtype):
    c, w = _weight(fmt, dtype)
    c.save(tmp_path / "w.safetensors")
    x = random_values(5, K, dtype, seed=2)
    assert torch.equal(flash_llm.spmm(x, flash_llm.load(tmp_path / "w.safetensors")), flash_llm.spmm(x, c))


# ---------------------------------------------------------------------------------------------------
# Errors name the argument and show actual vs expected
# ---------------------------------------------------------------------------------------------------
def _bad_calls():
    c16, _ = _weight(BitmapTiles, torch.float16)
    x = random_values(4, K, torch.float16)
    b = _bias(torch.float16)
    return [
        ("x-last-dim", lambda: flash_llm.spmm(random_values(4, K + 1, torch.float16), c16), ValueError,
         rf"x has shape \(4, {K + 1}\); its last dimension must be K={K} \(w is {M}x{K}\)"),
        ("x-0-d", lambda: flash_llm.spmm(torch.tensor(1.0, dtype=torch.float16), c16), ValueError,
         rf"x has shape \(\); its last dimension must be K={K}"),
        ("x-dtype-bf16", lambda: flash_llm.spmm(x.bfloat16(), c16), TypeError,
         r"x has dtype torch\.bfloat16 but w has dtype torch\.float16; they must match"),
        ("x-dtype-fp32", lambda: flash_llm.spmm(x.float(), c16), TypeError,
         r"x has dtype torch\.float32 but w has dtype torch\.float16"),
        ("x-int", lambda: flash_llm.spmm(torch.ones(4, K, dtype=torch.int32), c16), TypeError,
         r"x has dtype torch\.int32 but w has dtype torch\.float16"),
        ("x-not-tensor", lambda: flash_llm.spmm([[1.0] * K], c16), TypeError, r"x must be a torch\.Tensor, got list"),
        ("bias-shape", lambda: flash_llm.spmm(x, c16, b[:-1]), ValueError,
         rf"bias has shape \({M - 1},\); expected \({M},\)"),
        ("bias-2d", lambda: flash_llm.spmm(x, c16, b[None]), ValueError, rf"bias has shape \(1, {M}\); expected \({M},\)"),
        ("bias-dtype", lambda: flash_llm.spmm(x, c16, b.bfloat16()), TypeError,
         r"bias has dtype torch\.bfloat16; expected torch\.float16 \(the dtype of x\)"),
        ("bias-not-tensor", lambda: flash_llm.spmm(x, c16, [0.0] * M), TypeError,
         r"bias must be a torch\.Tensor or None, got list"),
        ("w-dense-tensor", lambda: flash_llm.spmm(x, torch.ones(M, K, dtype=torch.float16)), TypeError,
         r"w must be a flash_llm compressed weight \(BitmapTiles, TiledCSL or DeltaRows\), got Tensor"),
        ("w-none", lambda: flash_llm.spmm(x, None), TypeError, r"w must be a flash_llm compressed weight .*got NoneType"),
    ]


BAD_CALLS = _bad_calls()


@pytest.mark.parametrize("call,exc,match", [b[1:] for b in BAD_CALLS], ids=[b[0] for b in BAD_CALLS])
def test_spmm_rejects_bad_arguments(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ---------------------------------------------------------------------------------------------------
# The custom op: opcheck and torch.compile
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,with_bias", [(3, True), (1, False), (0, True)])
def test_opcheck(fmt, dtype, n, with_bias):
    c, _ = _weight(fmt, dtype, density=0.3)
    x = random_values(max(n, 1), K, dtype, seed=n)[:n]
    bias = _bias(dtype) if with_bias else None
    args = (x, c.data, c.offsets, FORMAT_IDS[fmt], M, K, bias)
    torch.library.opcheck(torch.ops.flash_llm.spmm.default, args)
    # and the op computes what the public function does
    assert torch.equal(torch.ops.flash_llm.spmm(*args), flash_llm.spmm(x, c, bias))


class SparseLinear(torch.nn.Module):
    def __init__(self, w, bias):
        super().__init__()
        self.w = w
        self.bias = bias

    def forward(self, x):
        return torch.relu(flash_llm.spmm(x, self.w, self.bias)) * 2


@pytest.mark.parametrize("x_shape", [(5, K), (2, 3, K)])
def test_torch_compile_fullgraph_matches_eager(fmt, x_shape):
    torch._dynamo.reset()
    c, _ = _weight(fmt, torch.float16)
    mod = SparseLinear(c, _bias(torch.float16))
    x = random_values(1, int(torch.tensor(x_shape).prod()), torch.float16, seed=6).reshape(x_shape)
    compiled = torch.compile(mod, fullgraph=True)
    y = compiled(x)
    assert y.shape == (*x_shape[:-1], M)
    assert torch.equal(y, mod(x))


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_gradients_match_dense_autograd(fmt, dtype, with_bias):
    """d(loss)/dx and d(loss)/dbias equal those of F.linear on the dense weight (the weight is a constant)."""
    c, w = _weight(fmt, dtype, density=0.4)
    x = random_values(2 * 3, K, dtype, seed=3).view(2, 3, K).requires_grad_()
    bias = _bias(dtype).requires_grad_() if with_bias else None
    r = random_values(2 * 3, M, dtype, seed=4).view(2, 3, M)
    (flash_llm.spmm(x, c, bias).float() * r.float()).sum().backward()
    x64 = x.detach().double().requires_grad_()
    b64 = bias.detach().double().requires_grad_() if with_bias else None
    (torch.nn.functional.linear(x64, w.double(), b64) * r.double()).sum().backward()
    # the gradient is rounded to x's dtype once: within one ulp of its magnitude (plus fp32 sums)
    tol = float(x64.grad.abs().max()) * (2.0**-7 if dtype == torch.bfloat16 else 2.0**-10) + 1e-6
    assert x.grad.dtype == dtype and (x.grad.double() - x64.grad).abs().max() <= tol
    if with_bias:
        tol_b = float(b64.grad.abs().max()) * (2.0**-7 if dtype == torch.bfloat16 else 2.0**-10) + 1e-6
        assert (bias.grad.double() - b64.grad).abs().max() <= tol_b


def test_opcheck_with_gradients(fmt):
    c, _ = _weight(fmt, torch.float16, density=0.3)
    x = random_values(4, K, torch.float16, seed=5).requires_grad_()
    bias = _bias(torch.float16).requires_grad_()
    torch.library.opcheck(torch.ops.flash_llm.spmm.default, (x, c.data, c.offsets, FORMAT_IDS[fmt], M, K, bias))
    g = random_values(4, M, torch.float16, seed=6)
    torch.library.opcheck(torch.ops.flash_llm.spmm_t.default, (g, c.data, c.offsets, FORMAT_IDS[fmt], M, K))


def test_raw_ops_check_what_they_take():
    """``torch.ops.flash_llm.*`` (reachable without :func:`flash_llm.spmm`'s checks, e.g. from an exported graph)
    refuse an ``x`` that is not ``[N, K]`` and an unknown format id, in the real and the fake kernels alike
    (session 71: the fakes answered [N, M] for a 3-D x, the CPU kernels broadcast, a bad id gave an IndexError)."""
    w = BitmapTiles.from_dense(sparse_weight(8, 16, 0.5, torch.float16, seed=3))
    ops = torch.ops.flash_llm
    for x in (torch.zeros(2, 3, 16, dtype=torch.float16), torch.zeros(16, dtype=torch.float16),
              torch.zeros(3, 15, dtype=torch.float16)):
        for dev_x in (x, x.to("meta")):
            with pytest.raises(ValueError, match=r"x must be 2-D \[N, 16\]"):
                ops.spmm(dev_x, w.data.to(dev_x.device), w.offsets.to(dev_x.device), 0, 8, 16, None)
    with pytest.raises(ValueError, match=r"fmt must be one of \[0, 1, 2\]"):
        ops.spmm(torch.zeros(3, 16, dtype=torch.float16), w.data, w.offsets, 5, 8, 16, None)
    with pytest.raises(ValueError, match=r"grad must be 2-D \[N, 8\]"):
        ops.spmm_t(torch.zeros(3, 7, dtype=torch.float16), w.data, w.offsets, 0, 8, 16)
    assert ops.spmm(torch.ones(3, 16, dtype=torch.float16), w.data, w.offsets, 0, 8, 16, None).shape == (3, 8)


def test_spmm_add_refuses_to_drop_a_gradient():
    """``spmm_add_`` has no autograd formula: with grad enabled and an input that requires grad it is refused
    (session 71: the gradient to x was silently None); under no_grad it runs."""
    from flash_llm.ops import spmm_add_

    w = BitmapTiles.from_dense(sparse_weight(8, 16, 0.5, torch.float16, seed=4))
    x = torch.randn(3, 16, dtype=torch.float16, requires_grad=True)
    for acc in (torch.zeros(3, 8, dtype=torch.float16), torch.zeros(3, 8, dtype=torch.float16).requires_grad_()):
        with pytest.raises(ValueError, match=r"spmm_add_ is not differentiable, and .*x.* require"):
            spmm_add_(acc, x, w)
    with torch.no_grad():
        acc = torch.zeros(3, 8, dtype=torch.float16)
        spmm_add_(acc, x, w)
        assert torch.equal(acc, flash_llm.spmm(x, w))

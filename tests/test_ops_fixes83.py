"""Session 83's fixes in flash_llm.ops (hunt83_ops): ``torch.compile`` around ``torch.func.grad`` / ``vjp`` /
``jacrev`` of spmm, the fused ops under the reverse-mode ``torch.func`` transforms, and an eps too large for a float."""
from fractions import Fraction

import pytest
import torch

from flash_llm import SparseLinear, TiledCSL, ops
from flash_llm.reference import layer_norm, rms_norm, silu_mul_halves


def _weight(m, k, dtype=torch.float16, density=0.3):
    return TiledCSL.from_dense((torch.randn(m, k) * (torch.rand(m, k) < density)).to(dtype))


def _tensors(r):
    return (r,) if isinstance(r, torch.Tensor) else tuple(r)


# ---- 1. torch.compile around a reverse-mode torch.func transform of spmm ----------------------------------------

def test_compiled_reverse_transforms_of_spmm_match_eager():
    """Traced by Dynamo, spmm called its custom op as it is, whose own autograd does not run under the ``torch.func``
    transforms: ``torch.compile(torch.func.grad(f))`` failed in fake-tensor propagation (a TorchRuntimeError naming
    neither flash_llm nor an argument, with or without ``fullgraph``).  Now it traces a backward-only
    autograd.Function (no graph break: ``fullgraph``), and gives the eager gradient bit for bit."""
    torch.manual_seed(0)
    m, k = 48, 64
    w = _weight(m, k)
    x, b = torch.randn(3, k).half(), torch.randn(m).half()
    layer = SparseLinear(w)
    cases = [("grad", torch.func.grad(lambda t, u: ops.spmm(t * 2, w, u).float().pow(2).sum(), argnums=(0, 1)),
              (x, b)),
             ("jacrev", torch.func.jacrev(lambda t: ops.spmm(t, w, b)), (x[0],)),
             ("vjp", lambda t, g: torch.func.vjp(lambda u: ops.spmm(u, w, b), t)[1](g)[0],
              (x, torch.randn(3, m).half())),
             ("SparseLinear", torch.func.grad(lambda t: layer(t).float().pow(2).sum()), (x,))]
    for name, fn, args in cases:
        torch._dynamo.reset()
        got, want = (_tensors(r) for r in (torch.compile(fn, backend="eager", fullgraph=True)(*args), fn(*args)))
        assert len(got) == len(want) and all(e.abs().max() > 0 for e in want), name
        for g, e in zip(got, want):
            assert g.shape == e.shape and torch.equal(g, e), name


def test_compiled_nested_reverse_transforms_are_refused_naming_flash_llm():
    """Nested with another transform, Dynamo's trace of the backward-only Function gave zeros for ``grad`` of ``grad``
    (and torch's own error for ``vmap`` of ``grad``): refused, naming flash_llm.spmm, as forward-mode AD is."""
    torch.manual_seed(1)
    w = _weight(32, 64)
    x = torch.randn(3, 64).half()
    f = torch.func.grad(lambda t: ops.spmm(t, w).float().pow(2).sum())
    for fn in (torch.func.grad(lambda t: f(t).float().sum()), torch.func.vmap(f)):
        torch._dynamo.reset()
        with pytest.raises(Exception, match=r"flash_llm\.spmm: torch\.func\.grad / vjp / jacrev nested"):
            torch.compile(fn, backend="eager", fullgraph=True)(x)
        assert fn(x).abs().max() > 0  # (eagerly it runs)


# ---- 2. the fused ops under torch.func.grad / vjp / jacrev --------------------------------------------------------

def _fused_cases(w, k):
    nw, nb = torch.randn(k).half(), torch.randn(k).half()
    b = torch.randn(w.shape[0]).half()
    return [("spmm_silu_mul", lambda t: ops.spmm_silu_mul(t, w), lambda t: silu_mul_halves(ops.spmm(t, w))),
            ("spmm_rms_norm", lambda t: ops.spmm_rms_norm(t, nw, 1e-6, w, act="silu_mul"),
             lambda t: silu_mul_halves(ops.spmm(rms_norm(t, nw, 1e-6), w))),
            ("spmm_layer_norm", lambda t: ops.spmm_layer_norm(t, nw, nb, 1e-5, w, b, act="relu"),
             lambda t: torch.relu(ops.spmm(layer_norm(t, nw, nb, 1e-5), w, b)))]


def test_fused_ops_under_reverse_transforms_are_their_decomposition():
    """Under ``torch.func.grad`` / ``jacrev`` the fused ops called their custom op, and failed with torch's "an
    autograd.Function ... must override the setup_context staticmethod", naming neither flash_llm nor the op.  Now
    they run as their decomposition (as under forward-mode AD): the gradient is the decomposition's, bit for bit,
    also compiled; a plain backward still raises (no autograd formula), and spmm_add_ is still refused by name."""
    torch.manual_seed(2)
    k = 64
    w = _weight(48, k)
    x = torch.randn(3, k).half()
    for name, fused, decomposed in _fused_cases(w, k):
        grad, ref = (torch.func.grad(lambda t, f=f: f(t).float().pow(2).sum()) for f in (fused, decomposed))
        want = ref(x)
        assert want.abs().max() > 0 and torch.equal(grad(x), want), name
        assert torch.equal(torch.func.jacrev(fused)(x[0]), torch.func.jacrev(decomposed)(x[0])), name
        torch._dynamo.reset()
        assert torch.equal(torch.compile(grad, backend="eager", fullgraph=True)(x), want), name
        xr = x.clone().requires_grad_()
        with pytest.raises(RuntimeError, match=f"flash_llm.{name}"):
            fused(xr).float().sum().backward()
    with pytest.raises(ValueError, match="spmm_add_ is not differentiable"):
        torch.func.grad(lambda t: ops.spmm_add_(torch.zeros(3, 48).half(), t, w).float().sum())(x)


def test_fused_norm_weight_gradient_under_grad():
    """The norm's weight and bias are differentiable under ``torch.func.grad`` as well (the decomposition's)."""
    torch.manual_seed(3)
    k = 64
    w = _weight(32, k)
    x, nw, nb = torch.randn(2, 5, k).half(), torch.randn(k).half(), torch.randn(k).half()
    args = (x, nw, nb)
    for fused, decomposed in ((lambda t, g, b: ops.spmm_layer_norm(t, g, b, 1e-5, w),
                               lambda t, g, b: ops.spmm(layer_norm(t, g, b, 1e-5), w)),
                              (lambda t, g, b: ops.spmm_rms_norm(t, g, 1e-6, w) * b.sum(),
                               lambda t, g, b: ops.spmm(rms_norm(t, g, 1e-6), w) * b.sum())):
        got, want = (torch.func.grad(lambda *a, f=f: f(*a).float().pow(2).sum(), argnums=(0, 1, 2))(*args)
                     for f in (fused, decomposed))
        for g, e in zip(got, want):
            assert g.shape == e.shape and torch.equal(g, e)


# ---- 3. an eps beyond the largest float -------------------------------------------------------------------------

@pytest.mark.parametrize("eps", [10 ** 400, -(10 ** 400), Fraction(10 ** 400, 3)], ids=["int", "-int", "Fraction"])
def test_eps_beyond_float_range_is_a_value_error_naming_eps(eps):
    """``float(eps)`` of such an int / Fraction raised OverflowError ("int too large to convert to float"), which the
    eps check did not catch: a bare error naming no argument, where every other bad eps is a ValueError naming it."""
    torch.manual_seed(4)
    k = 64
    w = _weight(32, k)
    x, nw = torch.randn(2, k).half(), torch.randn(k).half()
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        ops.spmm_rms_norm(x, nw, eps, w)
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        ops.spmm_layer_norm(x, nw, None, eps, w)
    assert torch.equal(ops.spmm_rms_norm(x, nw, 10 ** 3, w), ops.spmm(rms_norm(x, nw, 1000.0), w))  # (ints still do)

"""Session 76's SparseLinear hunt: second-order derivatives through the layer (its backward's transposed product had
neither a backward nor a forward-mode rule: ``torch.func.hessian`` and ``jvp(jacrev(...))`` gave zeros without a
word, double backward and ``jacrev(jacrev(...))`` raised), and the density of a layer loaded without its count."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.func import hessian, jacrev, jvp

from flash_llm import SparseLinear

FORMATS = ["bitmap", "tiled-csl", "delta-rows"]


def _case(seed: int = 0, m: int = 5, k: int = 70):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, k, generator=g)
    w[torch.rand(m, k, generator=g) >= 0.5] = 0
    return w.half(), torch.randn(k, generator=g).half()


def _close(got: torch.Tensor, dense: torch.Tensor, exact: torch.Tensor):
    """``got`` (through SparseLinear) within twice the fp16 dense path's own error of ``exact`` (float64), poisoned
    zeros caught by ``exact`` being far from zero."""
    tol = 2 * (dense.double() - exact).abs().max().item() + 1e-3
    assert exact.abs().max().item() > 1.0  # (so an all-zero answer cannot pass)
    assert (got.double() - exact).abs().max().item() <= tol, ((got.double() - exact).abs().max().item(), tol)


@pytest.mark.parametrize("fmt", FORMATS)
def test_hessian_and_forward_over_reverse_match_the_dense_layer(fmt):
    w, x = _case()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        layer = SparseLinear.from_dense(w, fmt=fmt)
    f = lambda t: (layer(t).float() ** 2).sum()  # noqa: E731
    fd = lambda t: (F.linear(t, w).float() ** 2).sum()  # noqa: E731
    exact_h = 2 * w.double().t() @ w.double()  # (the Hessian of |W x|^2, whatever x)
    _close(hessian(f)(x), hessian(fd)(x), exact_h)
    ones = torch.ones_like(x)
    _close(jvp(jacrev(f), (x,), (ones,))[1], jvp(jacrev(fd), (x,), (ones,))[1], exact_h @ ones.double())
    _close(jacrev(jacrev(f))(x), jacrev(jacrev(fd))(x), exact_h)


@pytest.mark.parametrize("fmt", FORMATS)
def test_double_backward_matches_the_dense_layer(fmt):
    w, x0 = _case(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        layer = SparseLinear.from_dense(w, fmt=fmt)
    got, want = [], []
    for fn, out in ((layer, got), (lambda t: F.linear(t, w), want)):
        x = x0.clone().requires_grad_(True)
        (g,) = torch.autograd.grad((fn(x).float() ** 2).sum(), x, create_graph=True)
        (h,) = torch.autograd.grad(g.float().sum(), x)
        out.append(h)
    _close(got[0], want[0], 2 * w.double().t() @ (w.double() @ torch.ones(w.shape[1], dtype=torch.float64)))


def test_a_layer_without_its_count_says_unknown_on_meta_and_counts_elsewhere():
    w, _ = _case(2, 20, 70)
    src = SparseLinear.from_dense(w, fmt="bitmap")
    sd = {k: v for k, v in src.state_dict().items() if k != "_extra_state"}  # (a checkpoint without the metadata)
    meta = SparseLinear.zeros(70, 20, bias=False, device="meta")
    meta.load_state_dict({k: v.to("meta") for k, v in sd.items()}, assign=True, strict=False)
    assert meta.nnz == -1 and "density=unknown" in repr(meta)
    with pytest.raises(ValueError, match="meta device"):
        meta.density
    cpu = SparseLinear.from_dense(torch.zeros(20, 70, dtype=torch.float16), fmt="bitmap")
    cpu.load_state_dict(sd, strict=False)
    cpu._nnz = -1  # (a count not known: its arrays are counted)
    assert cpu.density == src.density and cpu.nnz == src.nnz

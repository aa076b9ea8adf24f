"""CPU checks of the delta-rows prototype's encoder (benchmarks/proto_delta): exact round trips and the reference sum
the GPU benchmark compares its kernel with."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks", "proto_delta"))
import delta_rows as D  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,k,density,splits", [
    (64, 64, 0.2, 1), (70, 256, 0.2, 3), (33, 512, 0.05, 4), (96, 1024, 0.5, 7), (5, 8, 0.0, 2),
    (40, 64, 1.0, 2), (128, 4096, 0.2, 16), (32, 4096, 0.01, 5), (1, 16, 0.5, 9)])
def test_round_trip_and_reference(m, k, density, splits, dtype):
    g = torch.Generator().manual_seed(m * k + splits)
    w = torch.randn(m, k, generator=g).to(dtype) * (torch.rand(m, k, generator=g) < density)
    enc = D.encode(w, splits)
    back = D.decode(enc)
    assert torch.equal(back, w)
    nz = w != 0
    assert torch.equal(back.view(torch.int16)[nz], w.view(torch.int16)[nz])  # every bit of every nonzero
    assert enc.nnz == int(nz.sum())
    x = torch.randn(k, generator=g).to(dtype)
    ref = w.double() @ x.double()
    y = D.matvec_reference(enc, x)  # raises if an entry leaves its split's X window
    assert (y.double() - ref).abs().max().item() <= 1e-5 * (1 + ref.abs().max().item())


def test_long_gaps_take_escapes():
    w = torch.zeros(3, 4096, dtype=torch.float16)
    w[0, 4095] = 1.5
    w[1, 0] = -2.0
    w[1, 17] = 3.0
    enc = D.encode(w, 3)
    assert torch.equal(D.decode(enc), w)
    x = torch.arange(4096, dtype=torch.float16) / 1024
    assert torch.allclose(D.matvec_reference(enc, x), w.float() @ x.float())


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="K"):
        D.encode(torch.ones(4, 12, dtype=torch.float16), 1)
    with pytest.raises(ValueError, match="splits"):
        D.encode(torch.ones(4, 16, dtype=torch.float16), 0)
    with pytest.raises(ValueError, match="fp16"):
        D.encode(torch.ones(4, 16), 1)


def test_every_tensor_is_contiguous():  # the kernel reads them by raw pointer
    w = torch.randn(70, 256).half() * (torch.rand(70, 256) < 0.3)
    enc = D.encode(w, 3)
    for t in (enc.data, enc.off, enc.starts, enc.win, enc.perm):
        assert t.is_contiguous()

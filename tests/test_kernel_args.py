"""The CUDA entry points refuse bad ``out`` / ``add_to`` / ``l2`` arguments before anything reaches a GPU, and
``decode_attention_ok`` turns away what its kernel cannot read (session 71; they were passed to the kernels)."""

from __future__ import annotations

import pytest
import torch

from flash_llm import TiledCSL, kernels


def _weight():
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0)).half()
    w[w.abs() < 1] = 0
    return TiledCSL.from_dense(w)


@pytest.mark.parametrize("what", ["out", "add_to"])
def test_spmm_cuda_refuses_a_bad_output(what):
    c = _weight()
    x = torch.randn(3, 128).half()
    good = torch.empty(3, 64, dtype=torch.float16)
    bad = {"shape": torch.empty(3, 63, dtype=torch.float16), "dtype": torch.empty(3, 64),
           "strides": torch.empty(64, 3, dtype=torch.float16).t(), "device": torch.empty(3, 64, device="meta",
                                                                                     dtype=torch.float16)}
    assert good.is_contiguous()
    for why, t in bad.items():
        with pytest.raises(ValueError, match=f"{what} must be a contiguous torch.float16 tensor of shape \\(3, 64\\)"):
            kernels.spmm_cuda(x, c.data, c.offsets, kernels.TILED_CSL, 64, 128, None, **{what: t})
    with pytest.raises(ValueError, match=r"out must be .* shape \(3, 32\)"):  # silu_mul halves the columns
        kernels.spmm_cuda(x, c.data, c.offsets, kernels.TILED_CSL, 64, 128, None, out=good, act="silu_mul")


class _FakeCuda(torch.Tensor):
    """A CPU tensor that says it is on CUDA, to reach ``decode_attention_ok``'s checks on a machine without one."""

    @property
    def is_cuda(self):
        return True


def _attention_case(b=2, h=8, hkv=2, d=64, slots=32):
    q = torch.zeros(b, h, 1, d, dtype=torch.float16).as_subclass(_FakeCuda)
    k = torch.zeros(b, hkv, 1, d, dtype=torch.float16)
    cache = torch.zeros(b, hkv, slots, d, dtype=torch.float16)
    mask = torch.zeros(b, 1, 1, slots, dtype=torch.float16)
    return q, k, k.clone(), cache, cache.clone(), mask


def test_decode_attention_ok_turns_away_what_the_kernel_cannot_read(monkeypatch):
    monkeypatch.setattr(kernels, "supported", lambda device: (True, ""))
    q, k, v, kc, vc, mask = _attention_case()
    assert kernels.decode_attention_ok(q, k, v, kc, vc, mask, 16)
    assert not kernels.decode_attention_ok(q, k, v, kc, vc, torch.zeros(2, 8, 1, 32, dtype=torch.float16), 16)
    assert not kernels.decode_attention_ok(q, k, v, kc, vc, torch.zeros(2, 0, 1, 32, dtype=torch.float16), 16)
    assert not kernels.decode_attention_ok(q, k, v, kc, vc, mask.to("meta"), 16)
    assert not kernels.decode_attention_ok(q, k.to("meta"), v, kc, vc, mask, 16)
    assert not kernels.decode_attention_ok(q, k, v, kc, vc, mask, 10.5)
    assert not kernels.decode_attention_ok(q, k, v, kc, vc, mask, True)
    q0, k0, v0, kc0, vc0, mask0 = _attention_case(b=0)
    assert not kernels.decode_attention_ok(q0, k0, v0, kc0, vc0, mask0, 16)


def test_decode_attention_cuda_refuses_a_bad_out_or_table_first():
    q, k, v, kc, vc, mask = _attention_case()
    slot = torch.zeros(1, dtype=torch.long)
    for out in (torch.empty(2, 1, 512, dtype=torch.float16, device="meta"), torch.empty(2, 1, 511).half()):
        with pytest.raises(ValueError, match="out must be a contiguous torch.float16 tensor of shape"):
            kernels.decode_attention_cuda(q, k, v, kc, vc, slot, mask, 16, 0.125, out=out)
    for table in (torch.zeros(3, 2, dtype=torch.int32), torch.zeros(3, 3, dtype=torch.int64),
                  torch.zeros(3, 4, dtype=torch.int64)[:, :2]):
        with pytest.raises(ValueError, match="l2 must be a contiguous, 16-byte aligned int64"):
            kernels.decode_attention_cuda(q, k, v, kc, vc, slot, mask, 16, 0.125, l2=table)

"""Session 87: host-side launch limits found by reading (a hunt of the kernels' host code; no GPU there).

1. The decode-attention grid is ``(B * kv_heads, ceil(kv_len / 64), groups)``, and CUDA allows at most 65535 blocks in
   y: a context of more than 65535 * 64 slots was taken (``decode_attention_ok``) and failed at launch with an error
   that named nothing, instead of running on the PyTorch path.  It is refused now (the caller attends with PyTorch).
2. DeltaRows' opt-in ``_tmma<NT>`` kernel (``FLASH_LLM_DR_MMA_TILE=1``) asked for ``(32 + NT) (2 band + 16)`` bytes of
   dynamic shared memory without the device's limit: a band over 768 at 17-32 tokens failed at launch on sm_86 / 89 /
   120 (99 KiB).  The band is cut to what fits, and below 256 the ``_mma`` kernel runs."""

from __future__ import annotations

import pytest
import torch

from flash_llm import kernels

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_decode_attention_refuses_a_context_past_the_grid():
    limit = 65535 * kernels.DECODE_ATTN_CHUNK
    dev, dt = torch.device("cuda"), torch.float16
    q = torch.randn(1, 1, 1, 64, dtype=dt, device=dev)
    k, v = torch.randn_like(q), torch.randn_like(q)
    k_cache = torch.zeros(1, 1, limit + 1, 64, dtype=dt, device=dev)  # (512 MiB each)
    v_cache = torch.zeros_like(k_cache)
    if not kernels.supported(dev)[0]:
        pytest.skip("the kernels do not run on this GPU")
    assert kernels.decode_attention_ok(q, k, v, k_cache, v_cache, None, limit)
    assert not kernels.decode_attention_ok(q, k, v, k_cache, v_cache, None, limit + 1)


@pytest.mark.parametrize("limit, band, kernel", [
    (101376 - 2048, 768, "tmma32"),   # sm_86-like: the band cut to fit
    (232448 - 2048, 1024, "tmma32"),  # sm_90: as asked
    (20000, None, "mma32"),           # too small for a 256-column band: the _mma kernel
])
def test_tmma_band_fits_the_shared_memory(limit, band, kernel, monkeypatch):
    from flash_llm import DeltaRows
    from flash_llm import kernels as k
    from flash_llm.reference import FORMAT_IDS

    calls = []
    monkeypatch.setattr(k, "DR_MMA_MIN", 1)
    monkeypatch.setattr(k, "DR_MMA_TILE", True)
    monkeypatch.setattr(k, "DR_MMA_TILE_BAND", 1024)
    monkeypatch.setattr(k, "dynamic_shared_limit", lambda device, name: limit)
    monkeypatch.setattr(k, "launch",
                        lambda name, grid, block, args, *a, **kw: calls.append((name, grid, block, args, a)))
    monkeypatch.setattr(k.torch.cuda, "current_stream", lambda dev=None: type("S", (), {"cuda_stream": 0})())
    gen = torch.Generator().manual_seed(87)
    w = torch.where(torch.rand(96, 1024, generator=gen) < 0.2, torch.randn(96, 1024, generator=gen), 0.0)
    dr = DeltaRows.from_dense(w.to(torch.bfloat16), splits=3)
    x = torch.randn(24, 1024, generator=gen).to(torch.bfloat16)
    k.spmm_cuda(x, dr.data, dr.offsets, FORMAT_IDS[DeltaRows], 96, 1024, None)
    name, _, _, args, rest = calls[0]
    assert name == f"delta_rows_spmm_bf16_{kernel}", name
    if band is not None:
        assert args[-1][0] == band and rest[-1] == 64 * (2 * band + 16) <= limit

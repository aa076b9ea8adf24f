"""Locate the decode-attention kernel's error seen by bench_decode_attention.py (session 11): one case, variants of
how its inputs are made, the error per head and per half of the head dimension.  Needs a CUDA GPU."""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flash_llm import kernels  # noqa: E402
from flash_llm.models import _common  # noqa: E402
from flash_llm.models._common import KVCache  # noqa: E402


def run(b, slots, gen_dev, mask_kind, kv_len=None, h=32, hkv=8, d=128, dt=torch.float16, seed=1):
    dev = torch.device("cuda")
    kv_len = kv_len or slots
    pos = slots * 3 // 4
    g = torch.Generator(device=gen_dev).manual_seed(seed)
    qkv = torch.randn(b, 1, (h + 2 * hkv) * d, generator=g, device=gen_dev).to(dev, dt)
    q = qkv[..., :h * d].view(b, 1, h, d).transpose(1, 2)
    k = qkv[..., h * d:(h + hkv) * d].view(b, 1, hkv, d).transpose(1, 2)
    v = qkv[..., (h + hkv) * d:].view(b, 1, hkv, d).transpose(1, 2)
    cache = KVCache(1, b, hkv, slots, d, dt, dev)
    cache.k[0].copy_(torch.randn(cache.k[0].shape, generator=g, device=gen_dev))
    cache.v[0].copy_(torch.randn(cache.v[0].shape, generator=g, device=gen_dev))
    valid = torch.zeros(b, slots, dtype=torch.bool, device=dev)
    valid[:, : pos + 1] = True
    mask = None if mask_kind == "none" else _common.additive_mask(valid[:, None, None, :kv_len], dt)
    st = torch.tensor([pos], dtype=torch.int64, device=dev)
    scale = d ** -0.5
    out = torch.full((b, 1, h * d), float("nan"), dtype=dt, device=dev)
    kernels.decode_attention_cuda(q, k, v, cache.k[0], cache.v[0], st, mask, kv_len, scale, out=out)
    kk = cache.k[0][:, :, :kv_len].double().repeat_interleave(h // hkv, 1)
    vv = cache.v[0][:, :, :kv_len].double().repeat_interleave(h // hkv, 1)
    w = (q.double() @ kk.transpose(-1, -2)) * scale
    if mask is not None:
        w = w + mask.double()
    ref = (torch.softmax(w, -1) @ vv).transpose(1, 2).reshape(b, 1, h, d)
    err = (out.view(b, 1, h, d).double() - ref).abs()
    per_head = err.amax(dim=(0, 1, 3))
    halves = [err[..., : d // 2].max().item(), err[..., d // 2:].max().item()]
    print(f"b={b} slots={slots} kv_len={kv_len} gen={gen_dev} mask={mask_kind}: max err {err.max().item():.2e}, "
          f"halves {halves[0]:.1e} / {halves[1]:.1e}, heads wrong {int((per_head > 1e-2).sum())} / {h}, "
          f"|q| max {q.abs().max().item():.1f}, |k cache| max {cache.k[0].abs().max().item():.1f}")


if __name__ == "__main__":
    for gen_dev in ("cpu", "cuda"):
        for mask_kind in ("mask", "none"):
            run(1, 256, gen_dev, mask_kind)
    run(1, 256, "cuda", "mask", kv_len=64)
    run(1, 256, "cuda", "mask", kv_len=65)
    run(1, 2048, "cuda", "mask")
    run(1, 2048, "cpu", "mask")

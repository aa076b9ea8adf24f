"""Decode attention alone: flash-llm's kernel (cache write + attention in one launch) against the PyTorch path it
replaces (``KVCache.update``: two ``index_copy_``, then ``scaled_dot_product_attention``), timed in the same process.

    python benchmarks/bench_decode_attention.py [--batches 1,16,64] [--slots 256,2048] [--heads 32 --kv-heads 8 --dim 128]
        [--rope]

Per point: the median of CUDA-graph replays (``_timing.time_calls``, 32 layers' caches rotated so the caches exceed
L2 as in a model), the mask as the engine builds it (the last quarter of the slots not yet written), and the
errors of both against float64 (max abs difference, first four sequences; the kernel's on its first launch, before
the PyTorch path ran, and after it).  Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _timing import time_calls  # noqa: E402

from flash_llm import kernels  # noqa: E402
from flash_llm.models import _common, _fused  # noqa: E402
from flash_llm.models._common import KVCache, attention  # noqa: E402


def decode_case(layers: int, b: int, h: int, hkv: int, d: int, slots: int, dt: torch.dtype, gen: torch.Generator,
                rope: bool):
    """One decode step's inputs as the engine builds them, on ``gen``'s device: ``layers`` caches of ``b`` rows and
    ``slots`` slots filled with normal values; the slot written this step at 3/4 of the cache (the slots after it
    masked: ``mask [b, 1, 1, slots]``, ``slot`` an int64 device tensor); ``q [b, h, 1, d]`` and ``k, v [b, hkv, 1,
    d]`` as views of one qkv projection output; RoPE's ``cos, sin [b, 1, d]`` (``None`` unless ``rope``).
    Returns ``(cache, mask, slot, q, k, v, cos, sin)``."""
    dev = gen.device
    cache = KVCache(layers, b, hkv, slots, d, dt, dev)
    for c in cache.k + cache.v:
        c.normal_(generator=gen)
    pos = slots * 3 // 4
    valid = torch.zeros(b, slots, dtype=torch.bool, device=dev)
    valid[:, : pos + 1] = True
    mask = _common.additive_mask(valid[:, None, None, :], dt)
    slot = torch.tensor([pos], dtype=torch.int64, device=dev)
    qkv = torch.randn(b, 1, (h + 2 * hkv) * d, generator=gen, device=dev, dtype=dt)
    q = qkv[..., :h * d].view(b, 1, h, d).transpose(1, 2)
    k = qkv[..., h * d:(h + hkv) * d].view(b, 1, hkv, d).transpose(1, 2)
    v = qkv[..., (h + hkv) * d:].view(b, 1, hkv, d).transpose(1, 2)
    ang = torch.rand(b, 1, d // 2, generator=gen, device=dev) * 100
    cos, sin = (torch.cat([ang, ang], -1).cos().to(dt), torch.cat([ang, ang], -1).sin().to(dt)) if rope \
        else (None, None)
    return cache, mask, slot, q, k, v, cos, sin


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--slots", default="256,2048")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=32, help="caches rotated (one per layer)")
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"])
    ap.add_argument("--check-only", action="store_true", help="errors only, no timing (for compute-sanitizer)")
    ap.add_argument("--rope", action="store_true",
                    help="RoPE too: the kernel's own against the eager rotation before the PyTorch path")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_decode_attention.py needs a CUDA GPU")
    dt = torch.float16 if a.dtype == "fp16" else torch.bfloat16
    dev = torch.device("cuda")
    h, hkv, d = a.heads, a.kv_heads, a.dim
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {a.dtype}, heads {h} / {hkv}, D {d}, "
          f"{a.layers} layers rotated" + (", RoPE in both paths" if a.rope else ""))
    print("| batch | slots | kernel us | PyTorch us | ratio | kernel error | PyTorch error |")
    print("|---|---|---|---|---|---|---|")
    for slots in (int(x) for x in a.slots.split(",")):
        for b in (int(x) for x in a.batches.split(",")):
            gen = torch.Generator(device=dev).manual_seed(b + slots)
            cache, mask, slot, q, k, v, cos, sin = decode_case(a.layers, b, h, hkv, d, slots, dt, gen, a.rope)
            scale = d ** -0.5
            assert kernels.decode_attention_ok(q, k, v, cache.k[0], cache.v[0], mask, slots)
            outs = [torch.empty(b, 1, h * d, dtype=dt, device=dev) for _ in range(a.layers)]

            def ours(i):
                return lambda: kernels.decode_attention_cuda(q, k, v, cache.k[i], cache.v[i], slot, mask, slots,
                                                             scale, out=outs[i], cos=cos, sin=sin)

            def theirs(i):
                def f():
                    qq, kn = _fused.rope(q, k, cos, sin) if a.rope else (q, k)
                    kk, vv = cache.update(i, kn, v, slot, slots)
                    return attention(qq, kk, vv, mask, scale)
                return f

            got = ours(0)().clone()  # the kernel first, then the PyTorch path, then the kernel again
            want = theirs(0)()
            got2 = ours(0)()
            r = min(b, 4)  # float64 reference on the first rows
            kk = cache.k[0][:r].double().repeat_interleave(h // hkv, 1)
            vv = cache.v[0][:r].double().repeat_interleave(h // hkv, 1)
            qr = _fused.rope(q, k, cos, sin)[0] if a.rope else q
            w = (qr[:r].double() @ kk.transpose(-1, -2)) * scale + mask[:r].double()
            ref = (torch.softmax(w, -1) @ vv).transpose(1, 2).reshape(r, 1, h * d)
            err_ours = (got[:r].double() - ref).abs().max().item()
            err_ours2 = (got2[:r].double() - ref).abs().max().item()
            if a.check_only:
                print(f"| {b} | {slots} | - | - | - | {err_ours:.2e} / {err_ours2:.2e} | "
                      f"{(want[:r].double() - ref).abs().max().item():.2e} |")
                continue
            err_theirs = (want[:r].double() - ref).abs().max().item()
            t_ours = time_calls([ours(i) for i in range(a.layers)], replays=20)
            t_theirs = time_calls([theirs(i) for i in range(a.layers)], replays=20)
            print(f"| {b} | {slots} | {t_ours * 1e6:.1f} | {t_theirs * 1e6:.1f} | {t_theirs / t_ours:.2f}x | "
                  f"{err_ours:.2e} / {err_ours2:.2e} | {err_theirs:.2e} |")
            del cache, outs
    return 0


if __name__ == "__main__":
    sys.exit(main())

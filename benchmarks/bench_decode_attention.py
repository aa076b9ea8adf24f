"""Decode attention alone: flash-llm's kernel (cache write + attention in one launch) against the PyTorch path it
replaces (``KVCache.update``: two ``index_copy_``, then ``scaled_dot_product_attention``), timed in the same process.

    python benchmarks/bench_decode_attention.py [--batches 1,16,64] [--slots 256,2048]
        [--heads 32 --kv-heads 8 --dim 128] [--layers 32] [--rope] [--out FILE]

Per point: the median of CUDA-graph replays (``_timing.time_calls``, the caches of ``--layers`` layers rotated, or of
as many more as make them exceed 3x L2 as in a model, where about 4 GB of weights stream between two attentions;
``_timing.copies_needed``; ``--check-only``: ``--layers``), the mask as the engine builds it (the last quarter of the
slots not yet written), and the errors of both against float64 (max abs difference, first four sequences; the
kernel's on its first launch, before the PyTorch path ran, and after it).  Prints a table and writes it to a JSON
file (``--out``, after every point) with the environment: date, card, versions, commit, the ``FLASH_LLM_*`` settings
and the command.  Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _timing as T  # noqa: E402

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


def layer_bytes(b: int, hkv: int, slots: int, d: int, dt: torch.dtype) -> int:
    """Bytes of one layer's cache: k and v of ``[b, hkv, slots, d]`` in ``dt``."""
    return 2 * b * hkv * slots * d * dt.itemsize


def cache_layers(minimum: int, per_layer: int) -> int:
    """How many layers' caches of ``per_layer`` bytes to rotate: ``minimum``, or as many more as exceed 3x L2."""
    return max(minimum, T.copies_needed(per_layer))


def write_results(path: str, env: dict, rows: list[dict]) -> None:
    """``{"env": env, "rows": rows}`` as JSON at ``path`` (its directory made)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump({"env": env, "rows": rows}, f, indent=1)


def parse_args(argv=None) -> argparse.Namespace:
    """The options (``argv``: default ``sys.argv[1:]``)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--slots", default="256,2048")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=32,
                    help="caches rotated (one per layer), at least: more where they stay below 3x L2")
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"])
    ap.add_argument("--check-only", action="store_true", help="errors only, no timing (for compute-sanitizer)")
    ap.add_argument("--rope", action="store_true",
                    help="RoPE too: the kernel's own against the eager rotation before the PyTorch path")
    ap.add_argument("--out", default=os.path.join(
        "benchmarks", "out", "decode_attention",
        datetime.datetime.now(datetime.timezone.utc).strftime("results-%Y%m%d-%H%M%S.json")),
                    help="the results JSON (default: benchmarks/out/decode_attention/results-<UTC time>.json)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_decode_attention.py needs a CUDA GPU")
    dt = torch.float16 if a.dtype == "fp16" else torch.bfloat16
    dev = torch.device("cuda")
    h, hkv, d = a.heads, a.kv_heads, a.dim
    env = T.environment(dev)
    env["command"] = T.command(__file__, argv)
    env["options"] = vars(a)
    rows = []
    print(f"{env['card']}, torch {env['torch']}, CUDA {env['cuda']}, NVRTC {env['nvrtc']}, commit {env['commit']}, "
          f"{env['date']}; {a.dtype}, heads {h} / {hkv}, D {d}, at least {a.layers} layers rotated (3x L2: "
          f"{3 * T.l2_bytes(dev) / 2**20:.0f} MiB)" + (", RoPE in both paths" if a.rope else ""))
    print("| batch | slots | layers | rotated MiB | kernel us | PyTorch us | ratio | kernel error | PyTorch error |")
    print("|---|---|---|---|---|---|---|---|---|")
    for slots in (int(x) for x in a.slots.split(",")):
        for b in (int(x) for x in a.batches.split(",")):
            gen = torch.Generator(device=dev).manual_seed(b + slots)
            per_layer = layer_bytes(b, hkv, slots, d, dt)
            layers = a.layers if a.check_only else cache_layers(a.layers, per_layer)  # (no timing: no rotation)
            cache, mask, slot, q, k, v, cos, sin = decode_case(layers, b, h, hkv, d, slots, dt, gen, a.rope)
            scale = d ** -0.5
            assert kernels.decode_attention_ok(q, k, v, cache.k[0], cache.v[0], mask, slots)
            outs = [torch.empty(b, 1, h * d, dtype=dt, device=dev) for _ in range(layers)]

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
            err_theirs = (want[:r].double() - ref).abs().max().item()
            row = {"batch": b, "slots": slots, "layers": layers, "rotated_bytes": layers * per_layer,
                   "below_3x_l2": bool(T.rotation_shortfall(per_layer, layers)), "kernel_us": None, "pytorch_us": None,
                   "kernel_error_first": err_ours, "kernel_error_after": err_ours2, "pytorch_error": err_theirs}
            if not a.check_only:
                row["kernel_us"] = 1e6 * T.time_calls([ours(i) for i in range(layers)], replays=20)
                row["pytorch_us"] = 1e6 * T.time_calls([theirs(i) for i in range(layers)], replays=20)
            times = ("- | - | -" if a.check_only else
                     f"{row['kernel_us']:.1f} | {row['pytorch_us']:.1f} | {row['pytorch_us'] / row['kernel_us']:.2f}x")
            short = " (below 3x L2)" if row["below_3x_l2"] and not a.check_only else ""
            print(f"| {b} | {slots} | {layers} | {row['rotated_bytes'] / 2**20:.0f}{short} | {times} | "
                  f"{err_ours:.2e} / {err_ours2:.2e} | {err_theirs:.2e} |", flush=True)
            rows.append(row)
            write_results(a.out, env, rows)
            cache = outs = None  # (this point's caches freed before the next point allocates its own)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

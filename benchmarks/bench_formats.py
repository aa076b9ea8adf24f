"""Encoder (``from_dense``) and decoder (``to_dense``) speed of the BitmapTiles and Tiled-CSL formats, on CPU and on
the GPU (``FORMATS``; the third format, DeltaRows, is not timed here).

    python benchmarks/bench_formats.py [--device cpu|cuda|all] [--sizes 4096x4096,8192x8192,...] [--sparsity 80]

Reports million elements per second and GB/s of dense fp16 input.  The GPU numbers are device time
(synchronized wall clock around each call, median of repeats after a warm-up).  ``--device all`` (the default) skips
the GPU where there is none; ``--device cuda`` there is refused (exit status 2).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing as T  # noqa: E402

import flash_llm  # noqa: E402
from flash_llm.cli import _shape, sparsity_arg  # noqa: E402

FORMATS = {"bitmap": flash_llm.BitmapTiles, "tiled-csl": flash_llm.TiledCSL}


def timed(fn, device, repeats):
    out, times = None, []
    for _ in range(repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:]), out


def _sizes(text: str) -> list[tuple[int, int]]:
    """``--sizes``: comma-separated MxK shapes (:func:`flash_llm.cli._shape` each)."""
    return [_shape(part) for part in text.split(",")]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="all", choices=["cpu", "cuda", "all"],
                    help="where to time the encoders and decoders (default all: the CPU, and the GPU where there is "
                         "one)")
    ap.add_argument("--sizes", type=_sizes, default=None,
                    help="comma-separated MxK (default 8192x8192 on the CPU, 8192x8192,28672x8192,57344x8192 on the "
                         "GPU)")
    ap.add_argument("--sparsity", type=sparsity_arg, default=0.8,
                    help="fraction of the weights set to zero, or a percentage: 0.8, 80 and 80%% alike (default 0.8)")
    args = ap.parse_args(argv)
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        if args.device == "cuda":  # (asked for the GPU alone: measuring nothing and exiting 0 hid it)
            ap.error("--device cuda: no CUDA device is available; use --device cpu, or all (the CPU alone here)")
        devices.remove("cuda")
    env = T.environment()
    env["cpu_threads"] = torch.get_num_threads()
    env["command"] = "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:]))
    print(json.dumps(env))
    rows = []
    for device in devices:
        sizes = args.sizes or ([(8192, 8192)] if device == "cpu" else [(8192, 8192), (28672, 8192), (57344, 8192)])
        repeats = 3 if device == "cpu" else 10
        for m, k in sizes:
            w = torch.randn(m, k, device=device).half()
            w.mul_(torch.rand(m, k, device=device) >= args.sparsity)
            for name, cls in FORMATS.items():
                t_enc, f = timed(lambda cls=cls, w=w: cls.from_dense(w), device, repeats)
                t_dec, d = timed(f.to_dense, device, repeats)
                assert torch.equal(d, w), "round trip failed"
                row = dict(device=device, format=name, M=m, K=k, sparsity=args.sparsity,
                           encode_Melem_s=m * k / t_enc / 1e6, encode_GB_s=2 * m * k / t_enc / 1e9,
                           decode_Melem_s=m * k / t_dec / 1e6, bytes_per_elem=f.nbytes / (m * k))
                rows.append(row)
                print(f"{device:4s} {name:9s} {m:6d}x{k:<6d} encode {row['encode_Melem_s']:9.0f} Melem/s "
                      f"({row['encode_GB_s']:6.1f} GB/s fp16 in)  to_dense {row['decode_Melem_s']:9.0f} Melem/s  "
                      f"{row['bytes_per_elem']:.4f} B/elem", flush=True)
            del w
    return rows


if __name__ == "__main__":
    main()

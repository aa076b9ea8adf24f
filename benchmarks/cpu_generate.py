"""Decode speed on the CPU: a synthetic model's compressed layers (``Engine(formats="keep")``, every call through
``flash_llm.spmm``'s reference, which expands the weight) against the same layers expanded once
(``Engine(formats="dense")``, what ``flash-llm generate`` does on a CPU).

    python benchmarks/cpu_generate.py [--layers 4] [--hidden 1024] [--sparsity 0.8] [--tokens 16]

Session 62 (the dev machine, 2 cores, bf16, the defaults): 2.2-3.7 tokens/s compressed against 82-84 expanded.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

from flash_llm.cli import _positive, sparsity_arg
from flash_llm.engine import Engine
from flash_llm.models import preset
from flash_llm.models.synthetic import build_synthetic
from flash_llm.nn import FORMAT_NAMES


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=_positive, default=4)
    ap.add_argument("--hidden", type=_positive, default=1024,
                    help="hidden size (intermediate 3.5x, Llama-3-8B's ratio; 8 heads)")
    ap.add_argument("--sparsity", type=sparsity_arg, default=0.8,
                    help="fraction of the projections' weights set to zero, or a percentage (0.8, 80 and 80%% alike)")
    ap.add_argument("--tokens", type=_positive, default=16, help="new tokens timed (after a 2-token warm-up)")
    ap.add_argument("--formats", default="bitmap,delta-rows,tiled-csl",
                    help=f"comma-separated, of {', '.join(sorted(FORMAT_NAMES))}")
    a = ap.parse_args(argv)
    formats = [f.strip() for f in a.formats.split(",")]
    unknown = [f for f in formats if f not in FORMAT_NAMES]
    if unknown:  # (before any model is built or timed)
        ap.error(f"--formats: unknown {', '.join(map(repr, unknown))}; choose from {', '.join(sorted(FORMAT_NAMES))}")
    try:
        cfg = preset("llama-3-8b").replace(num_layers=a.layers, hidden_size=a.hidden,
                                           intermediate_size=a.hidden * 7 // 2, num_heads=8, num_kv_heads=2,
                                           vocab_size=4096, name="cpu-small")
    except ValueError as e:  # (e.g. a hidden size that 8 heads do not divide)
        ap.error(f"--hidden {a.hidden}: {e} (this script uses 8 heads: --hidden a multiple of 16)")
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8]]
    print(f"{a.layers} layers, hidden {a.hidden}, {a.sparsity:.0%} sparse, bf16, {torch.get_num_threads()} threads")
    for fmt in formats:
        model, _ = build_synthetic(cfg, a.sparsity, fmt=fmt, device="cpu", progress=False, dtype=torch.bfloat16)
        for how in ("keep", "dense"):
            eng = Engine(copy.deepcopy(model) if how == "dense" else model, max_batch=1, max_seq=64, formats=how)
            eng.generate(prompts, 2, eos_token_id=None)
            t = time.perf_counter()
            eng.generate(prompts, a.tokens, eos_token_id=None)
            print(f"{fmt:>10} {'compressed' if how == 'keep' else 'expanded':>10}: "
                  f"{a.tokens / (time.perf_counter() - t):6.1f} tokens/s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

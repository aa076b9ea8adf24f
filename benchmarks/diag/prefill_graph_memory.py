"""What the engine's prefill graphs hold in GPU memory (session 63): one synthetic model, an engine with prefill graphs
on and one with them off, each generating twice; the allocator's allocated / reserved bytes and the peak of each
generate, in GiB.

    python3 benchmarks/diag/prefill_graph_memory.py [--model llama-3-8b] [--sparsity 80] [--batch 1] [--prompt 128]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from flash_llm import engine as E  # noqa: E402
from flash_llm.models.synthetic import build_synthetic  # noqa: E402

G = 2 ** 30


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-3-8b")
    ap.add_argument("--sparsity", type=float, default=80)
    ap.add_argument("--format", default="delta-rows")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=128)
    a = ap.parse_args()
    model, _ = build_synthetic(a.model, a.sparsity / 100 or None, dtype=torch.bfloat16, device="cuda", seed=1,
                               progress=False, fmt=a.format)
    prompts = torch.randint(0, model.config.vocab_size, (a.batch, a.prompt)).tolist()

    def state(label):
        torch.cuda.synchronize()
        print(f"  {label:34s} allocated {torch.cuda.memory_allocated() / G:6.2f}  reserved "
              f"{torch.cuda.memory_reserved() / G:6.2f}  peak {torch.cuda.max_memory_allocated() / G:6.2f}", flush=True)
        torch.cuda.reset_peak_memory_stats()

    for on in (False, True, False):
        E.PREFILL_GRAPHS = on
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        print(f"prefill graphs {'on' if on else 'off'}:")
        state("before the engine")
        eng = E.Engine(model, max_batch=a.batch, max_seq=a.prompt + 8, fuse=True, merge=True)
        state("engine built")
        for i in range(3):
            eng.generate(prompts, 4, eos_token_id=None)
            state(f"generate {i + 1}")
        del eng
        torch.cuda.empty_cache()
        state("engine deleted, cache emptied")


if __name__ == "__main__":
    main()

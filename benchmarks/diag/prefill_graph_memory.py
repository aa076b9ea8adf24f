"""What the engine's prefill graphs hold in GPU memory (session 63): one synthetic model, an engine with prefill graphs
on and one with them off, each generating three times; the allocator's allocated / reserved bytes and the peak of each
generate, in GiB, and (session 64) the memory by pool with the largest blocks and the code that asked for them.

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


def _where(frames) -> str:
    """The innermost frame of flash_llm's code that asked for a block (else the innermost frame), as file:line name."""
    frames = frames or []
    ours = [f for f in frames if "flash_llm" in f.get("filename", "")] or frames
    if not ours:
        return "?"
    f = ours[0]
    return f"{os.path.basename(f.get('filename', '?'))}:{f.get('line', '?')} {f.get('name', '?')}"


def pools_report(snapshot: dict, top: int = 4) -> list[str]:
    """Lines on the allocator's memory by pool (the default pool is (0, 0), CUDA graphs' pools others): reserved and
    allocated GiB, then the ``top`` largest allocated blocks overall and in each other pool, with the code that asked
    for them (``snapshot``: ``torch.cuda.memory._snapshot()``, its frames recorded by ``_record_memory_history``)."""
    pools: dict = {}
    blocks = []
    for seg in snapshot.get("segments", []):
        pid = tuple(seg.get("segment_pool_id", (0, 0)))
        r = pools.setdefault(pid, [0, 0])
        r[0] += seg.get("total_size", 0)
        r[1] += seg.get("allocated_size", 0)
        for b in seg.get("blocks", []):
            if b.get("state") == "active_allocated":
                blocks.append((b.get("size", 0), pid, _where(b.get("frames"))))
    out = [f"    pool {pid}: reserved {res / G:6.2f}  allocated {alloc / G:6.2f}"
           for pid, (res, alloc) in sorted(pools.items())]
    blocks.sort(key=lambda b: -b[0])
    for pid in [None] + [p for p in sorted(pools) if p != (0, 0)]:
        for size, q, where in [b for b in blocks if pid is None or b[1] == pid][:top]:
            out.append(f"    {'largest' if pid is None else 'in pool':7s} {size / 2 ** 20:9.1f} MiB  pool {q}  {where}")
    return out


def _report() -> None:
    print("\n".join(pools_report(torch.cuda.memory._snapshot())), flush=True)


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

    torch.cuda.memory._record_memory_history(max_entries=200000)  # (the frames of each block, for pools_report)
    for on in (False, True, False):
        E.PREFILL_GRAPHS = on
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        print(f"prefill graphs {'on' if on else 'off'}:")
        state("before the engine")
        eng = E.Engine(model, max_batch=a.batch, max_seq=a.prompt + 8, fuse=True, merge=True)
        state("engine built")
        _report()
        for i in range(3):
            eng.generate(prompts, 4, eos_token_id=None)
            state(f"generate {i + 1}")
            _report()
        del eng
        torch.cuda.empty_cache()
        state("engine deleted, cache emptied")


if __name__ == "__main__":
    main()

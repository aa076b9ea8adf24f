"""How long a synthetic model takes to build, and its build's peak device memory (session 66: OPT-66B's DeltaRows
build took 2.5x OPT-30B's time per parameter after the encoder began working a run of slices at a time; is it the
runs?).  Run it once per setting of ``FLASH_LLM_ENCODE_CHUNK_ENTRIES`` and ``FLASH_LLM_ENCODE_CHUNK_ELEMENTS`` (2^22 /
2^26 the least; on a GPU without them set, runs up to an eighth of its free memory since session 67; 2^27 / 2^31 lay
out each layer in one run, as before session 66), each in its own process:

    python3 benchmarks/diag/build_time.py [--model opt-30b] [--layers N]
    FLASH_LLM_ENCODE_CHUNK_ENTRIES=134217728 FLASH_LLM_ENCODE_CHUNK_ELEMENTS=2147483648 python3 benchmarks/diag/build_time.py
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from flash_llm.formats import delta_rows as D  # noqa: E402
from flash_llm.formats._base import band_elements  # noqa: E402
from flash_llm.models import preset  # noqa: E402
from flash_llm.models.synthetic import build_synthetic  # noqa: E402


def _time_encoders() -> dict:
    """Wrap the formats' ``from_dense`` so each round reports how many calls it made and their seconds (the device
    synchronized around each: the build's time in the encoders, against drawing the weights and the rest)."""
    from flash_llm import BitmapTiles, DeltaRows, TiledCSL

    spent: dict = {}
    depth = [0]  # (BitmapTiles / Tiled-CSL encode a large weight band by band through from_dense: the outer call counts)
    for cls in (DeltaRows, TiledCSL, BitmapTiles):
        real = cls.__dict__["from_dense"].__func__

        def timed(c, w, *args, _real=real, _name=cls.__name__, **kwargs):
            if depth[0]:
                return _real(c, w, *args, **kwargs)
            if w.is_cuda:
                torch.cuda.synchronize(w.device)
            t = time.perf_counter()
            depth[0] += 1
            try:
                out = _real(c, w, *args, **kwargs)
            finally:
                depth[0] -= 1
            if w.is_cuda:
                torch.cuda.synchronize(w.device)
            n, s = spent.get(_name, (0, 0.0))
            spent[_name] = (n + 1, s + time.perf_counter() - t)
            return out

        setattr(cls, "from_dense", classmethod(timed))
    return spent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="opt-30b")
    ap.add_argument("--sparsity", type=float, default=80)
    ap.add_argument("--format", default="delta-rows")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--layers", type=int, default=0, help="build only this many decoder layers (0: all)")
    a = ap.parse_args()
    spent = _time_encoders()
    cfg = preset(a.model)
    if a.layers:
        cfg = cfg.replace(num_layers=a.layers)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    for i in range(a.rounds):
        if dev == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        model, report = build_synthetic(cfg, a.sparsity / 100, dtype=torch.bfloat16, device=dev, seed=1,
                                        progress=False, fmt=a.format)
        if dev == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
        peak = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else float("nan")
        print(f"{a.model} {a.sparsity:g} % {a.format}: round {i + 1}: built in {dt:.1f} s, peak {peak:.2f} GiB, "
              f"weights {report.weight_bytes / 2**30:.2f} GiB (a run's entries / elements now "
              f"{D._encode_budget(torch.device(dev))}, bands {band_elements(dev)} elements)", flush=True)
        print("  of it: " + ", ".join(f"{name} {n} calls {t:.1f} s" for name, (n, t) in spent.items()), flush=True)
        spent.clear()
        del model, report


if __name__ == "__main__":
    main()

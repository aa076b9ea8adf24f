"""Time to first token over prompts of varied lengths: an eager prefill, one CUDA graph per prompt length, and graphs
per bucket of lengths (``engine.prefill_bucket``), interleaved prompt by prompt in one process (session 64).

A benchmark of one fixed prompt length (``bench_e2e.py``: 128) replays one graph after the first prompt; a server sees
a new length at almost every prompt, and without buckets each new length runs eagerly and is then captured. Here the
same stream of prompts (lengths drawn uniformly from ``--lengths``, seeded) goes through three engines over one model:

- ``eager``: ``engine.PREFILL_GRAPHS`` off (every prefill eager);
- ``exact``: graphs, ``engine.PREFILL_BUCKETS`` off (a graph per prompt length);
- ``buckets``: graphs over the bucketed lengths (the default);
- ``dense`` (with ``--prefill-dense``): ``buckets`` on an engine holding dense copies of the sparse layers for the
  prefill (``Engine(prefill_dense=True)``).

    python3 benchmarks/ttft_lengths.py --model llama-3-8b --sparsity 80 --lengths 64-192 --count 32

It prints, per mode, the median / mean / 90th percentile of ``Generation.ttft_s`` (the prefill and the first
sampling), the prefills replayed from a graph, and the graphs held at the end; and the median / total of each whole
``generate`` call's wall time (synchronized), which also holds what the time to first token leaves out: the capture of
a new shape's prefill graph after the generation (session 65: the cost a server pays at every new shape, and what
would decide capturing only shapes seen twice).  ``--json`` writes every time (:func:`json_record`; its
``args.sparsity`` in percent, 80 for 80 %, however ``--sparsity`` was given).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from flash_llm import engine as E  # noqa: E402
from flash_llm.cli import sparsity_arg  # noqa: E402

MODES = ("eager", "exact", "buckets")
DENSE_MODE = "dense"


def parse_lengths(text: str, option: str = "--lengths") -> tuple[int, int]:
    """``"64-192"`` -> ``(64, 192)``; ``"128"`` -> ``(128, 128)`` (errors name ``option``)."""
    lo, _, hi = text.partition("-")
    try:
        a, b = int(lo), int(hi or lo)
    except ValueError:
        raise ValueError(f"{option}: {text!r} is not LO-HI (two ints) or one int") from None
    if not 1 <= a <= b:
        raise ValueError(f"{option}: need 1 <= LO <= HI, got {a}-{b}")
    return a, b


def draw_prompts(count: int, batch: int, lengths: tuple[int, int], vocab: int, seed: int = 0) -> list[list[list[int]]]:
    """``count`` prompt batches of ``batch`` prompts each; a batch's prompts share one length drawn uniformly from
    ``lengths`` (inclusive), the tokens uniform over the vocabulary."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        n = int(torch.randint(lengths[0], lengths[1] + 1, (1,), generator=gen))
        out.append(torch.randint(0, vocab, (batch, n), generator=gen).tolist())
    return out


def engines(model, batch: int, max_seq: int, dense: bool = False, **kwargs) -> dict[str, E.Engine]:
    """The modes' engines over ``model`` (the three of :data:`MODES`, and with ``dense`` the ``dense`` one; on a CPU,
    or with ``cuda_graphs=False``, all run eagerly)."""
    saved = E.PREFILL_GRAPHS
    out = {}
    try:
        for mode in MODES + ((DENSE_MODE,) if dense else ()):
            E.PREFILL_GRAPHS = mode != "eager"
            out[mode] = E.Engine(model, max_batch=batch, max_seq=max_seq, prefill_dense=mode == DENSE_MODE, **kwargs)
    finally:
        E.PREFILL_GRAPHS = saved
    return out


def run_modes(engs: dict[str, E.Engine], stream: list[list[list[int]]]) -> dict[str, dict]:
    """Each prompt batch of ``stream`` through every mode (the modes' order rotated prompt by prompt), one new token:
    ``{mode: {"ttft_ms": [...], "call_ms": [...], "replayed": n, "graphs": [(batch, length), ...], "tokens": [...]}}``
    (``call_ms``: each ``generate`` call's wall time, the device synchronized at its end)."""
    saved = E.PREFILL_BUCKETS
    out = {m: {"ttft_ms": [], "call_ms": [], "replayed": 0, "tokens": []} for m in engs}
    names = list(engs)
    try:
        for i, prompts in enumerate(stream):
            for mode in names[i % len(names):] + names[:i % len(names)]:
                eng = engs[mode]
                E.PREFILL_BUCKETS = mode in ("buckets", DENSE_MODE)
                before = _replays(eng)
                t0 = time.perf_counter()
                g = eng.generate(prompts, 1, eos_token_id=None)
                if eng.device.type == "cuda":
                    torch.cuda.synchronize(eng.device)
                out[mode]["call_ms"].append(1e3 * (time.perf_counter() - t0))
                out[mode]["ttft_ms"].append(1e3 * g.ttft_s)
                out[mode]["replayed"] += _replays(eng) - before
                out[mode]["tokens"].append(g.tokens[:, 0].tolist())
    finally:
        E.PREFILL_BUCKETS = saved
    for mode, eng in engs.items():
        out[mode]["graphs"] = sorted(eng._prefills) if eng._prefills is not None else []
    return out


def _replays(eng: E.Engine) -> int:
    """Prefill replays so far (the engine's graphs count theirs in ``_PrefillGraph.replays``)."""
    return sum(g.replays for g in eng._prefills.values()) if eng._prefills else 0


def summary(res: dict[str, dict]) -> list[tuple[str, float, float, float, int, int, float, float]]:
    """``[(mode, TTFT median ms, mean ms, p90 ms, prefills replayed, graphs held, call median ms, calls' total ms)]``."""
    rows = []
    for mode, r in res.items():
        t = sorted(r["ttft_ms"])
        p90 = t[min(len(t) - 1, int(0.9 * len(t)))]
        rows.append((mode, statistics.median(t), statistics.fmean(t), p90, r["replayed"], len(r["graphs"]),
                     statistics.median(r["call_ms"]), sum(r["call_ms"])))
    return rows


def json_args(args: argparse.Namespace) -> dict:
    """The options as ``--json`` records them: ``vars(args)`` with ``sparsity`` in percent (``--sparsity`` 0.8, 80 or
    80% -> 80.0; 0 -> 0.0), the unit of ``bench_e2e.py``'s and ``tp_check.py``'s rows and of the files this script,
    ``prefill_ab.py`` and ``uneven_rows.py`` wrote before session 85 (it parses ``--sparsity`` to a fraction since,
    which the key then held: 0.8 in one file, 80.0 in another)."""
    return {**vars(args), "sparsity": round(100 * args.sparsity, 6)}


def json_record(args: argparse.Namespace, card: str, stream: list[list[list[int]]], res: dict[str, dict]) -> dict:
    """What ``--json`` writes: the options (:func:`json_args`), the card, torch, the commit, each prompt batch's
    length and :func:`run_modes`'s results."""
    return {"args": json_args(args), "card": card, "torch": torch.__version__,
            "commit": os.environ.get("FLASH_LLM_COMMIT"), "lengths": [len(s[0]) for s in stream], "results": res}


def parse_args(argv=None) -> argparse.Namespace:
    """The options; a bad ``--sparsity`` is refused here (``ap.error``, exit status 2), before any CUDA work."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama-3-8b")
    p.add_argument("--format", default="delta-rows", choices=("bitmap", "tiled-csl", "delta-rows"))
    p.add_argument("--sparsity", type=sparsity_arg, default=0.8,
                   help="a fraction or a percentage (0.8, 80 and 80%% alike; 0: dense)")
    p.add_argument("--dtype", default="bf16", choices=("fp16", "bf16"))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--lengths", default="64-192", help="LO-HI: each prompt batch's length, uniform, inclusive")
    p.add_argument("--count", type=int, default=32, help="prompt batches")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prefill-dense", action="store_true",
                   help="a fourth mode: buckets on an engine with dense copies of the sparse layers for the prefill")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def main(argv=None) -> int:
    from flash_llm.models.synthetic import build_synthetic

    args = parse_args(argv)
    lengths = parse_lengths(args.lengths)
    if not torch.cuda.is_available():
        print("ttft_lengths.py: needs a CUDA GPU (on a CPU every mode is the eager prefill)", file=sys.stderr)
        return 2
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    model, report = build_synthetic(args.model, args.sparsity or None, dtype=dtype, device="cuda", seed=1,
                                    progress=False, fmt=args.format)
    print(report, flush=True)
    # max_seq: the longest bucket and the new token, in the cache's slots
    engs = engines(model, args.batch, E.prefill_bucket(lengths[1]) + 1, dense=args.prefill_dense, fuse=True,
                   merge=True)
    warm = draw_prompts(1, args.batch, (lengths[0], lengths[0]), model.config.vocab_size, seed=args.seed + 1)
    for eng in engs.values():  # (kernels compiled and loaded, the decode graph captured: not what is timed)
        eng.generate(warm[0], 2, eos_token_id=None)
        if eng._prefills:
            eng._prefills.clear()
    stream = draw_prompts(args.count, args.batch, lengths, model.config.vocab_size, seed=args.seed)
    res = run_modes(engs, stream)
    card = torch.cuda.get_device_name()
    print(f"\n{args.model} {args.format} {100 * args.sparsity:g} % {args.dtype}, batch {args.batch}, {args.count} "
          f"prompt batches of {lengths[0]}-{lengths[1]} tokens ({len({len(s[0]) for s in stream})} lengths), {card}, "
          f"torch {torch.__version__}, commit {os.environ.get('FLASH_LLM_COMMIT', '?')}")
    agree = sum(a == b for a, b in zip(res["eager"]["tokens"], res["buckets"]["tokens"]))
    print(f"first tokens of buckets equal to eager's: {agree} of {len(stream)} (greedy; the padding changes rounding)")
    print("\nmode | TTFT median ms | mean | p90 | prefills replayed | graphs held | call median ms | calls' total ms")
    print("---|---|---|---|---|---|---|---")
    for mode, med, mean, p90, rep, held, call, total in summary(res):
        print(f"{mode} | {med:.2f} | {mean:.2f} | {p90:.2f} | {rep} | {held} | {call:.2f} | {total:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(json_record(args, card, stream, res), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

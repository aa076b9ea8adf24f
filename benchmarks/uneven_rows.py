"""A batch of requests that want different numbers of new tokens, with the batch shrinking as its rows stop
(``engine.COMPACT_ROWS``, session 65) and without, interleaved round by round in one process.

Without the shrinking, a batch runs at its full size until its longest request is done, however few rows are still
going. Here one model and one engine (``max_batch`` = the batch) serve both settings: the same prompts (``--prompt``
tokens each) and the same limits a row (``generate(prompts, [n_0, n_1, ...])``, drawn uniformly from
``--limits LO-HI``, seeded), greedy, no EOS, so every row stops at its limit.

    python3 benchmarks/uneven_rows.py --model llama-3-8b --sparsity 80 --batch 16 --limits 16-256 --rounds 3

Per setting it prints the median wall time of a whole generation (synchronized), the tokens it produced (the sum of
the limits) per second, and the decode batch sizes it ran, and how many rows' tokens the two settings agree on (all
on a CPU; on a GPU the smaller batches run other kernels, whose sums may round otherwise, and a random-weight model's
greedy tokens part at near-ties: session 65 saw that on an H100).  ``--json`` writes every time (:func:`json_record`;
its ``args.sparsity`` in percent, 80 for 80 %, however ``--sparsity`` was given). ``--device cpu`` with a ``tiny-*``
model is a smoke run of the script.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_e2e import TINY as E2E_TINY  # noqa: E402
from flash_llm import engine as engine_mod  # noqa: E402
from flash_llm.cli import sparsity_arg  # noqa: E402
from flash_llm.engine import Engine  # noqa: E402
from ttft_lengths import json_args, parse_lengths  # noqa: E402

#: a smoke-run shape (``--model tiny-llama``, for ``--device cpu``): bench_e2e.py's
TINY = E2E_TINY["tiny-llama"]

SETTINGS = (("shrink", True), ("full", False))


def draw_limits(batch: int, lo: int, hi: int, seed: int = 0) -> list[int]:
    """``batch`` token limits, uniform in ``lo .. hi`` (inclusive), seeded."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi + 1, (batch,), generator=gen).tolist()


def run_settings(eng: Engine, prompts: list[list[int]], limits: list[int], rounds: int) -> dict[str, dict]:
    """Each setting of :data:`SETTINGS` once a round (their order alternating by round): ``{name: {"s": [...],
    "sizes": [...], "tokens": tensor}}`` (``sizes``: the decode batch sizes of the setting's last generation)."""
    out = {name: {"s": [], "sizes": [], "tokens": None} for name, _ in SETTINGS}
    saved, decode = engine_mod.COMPACT_ROWS, eng._decode
    try:
        for r in range(rounds):
            for name, on in (SETTINGS if r % 2 == 0 else SETTINGS[::-1]):
                engine_mod.COMPACT_ROWS = on
                sizes = []
                eng._decode = lambda b, kv, sizes=sizes: sizes.append(b) or decode(b, kv)
                t0 = time.perf_counter()
                g = eng.generate(prompts, limits, eos_token_id=None)
                if eng.device.type == "cuda":
                    torch.cuda.synchronize(eng.device)
                out[name]["s"].append(time.perf_counter() - t0)
                out[name]["sizes"], out[name]["tokens"] = sizes, g.tokens
    finally:
        engine_mod.COMPACT_ROWS = saved
        eng._decode = decode
    return out


def json_record(args: argparse.Namespace, card: str, limits: list[int], res: dict[str, dict]) -> dict:
    """What ``--json`` writes: the options (``sparsity`` in percent: ``ttft_lengths.json_args``), the card, the
    limits, whether the settings' tokens agree (all of them; rows) and each setting's times (s) and decode batch
    sizes from :func:`run_settings`'s ``res``."""
    same = torch.equal(res["shrink"]["tokens"], res["full"]["tokens"])
    rows_same = sum(torch.equal(a, b) for a, b in zip(res["shrink"]["tokens"], res["full"]["tokens"]))
    return {"args": json_args(args), "card": card, "limits": limits, "same_tokens": same, "rows_same": rows_same,
            "results": {k: {"s": v["s"], "sizes": v["sizes"]} for k, v in res.items()}}


def parse_args(argv=None) -> argparse.Namespace:
    """The options, checked before any CUDA work (a bad one: ``ap.error``, exit status 2)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama-3-8b")
    ap.add_argument("--format", default="delta-rows", choices=("bitmap", "tiled-csl", "delta-rows"))
    ap.add_argument("--sparsity", type=sparsity_arg, default=0.8,
                    help="a fraction or a percentage (0.8, 80 and 80%% alike; 0: dense)")
    ap.add_argument("--dtype", default="bf16", choices=("fp16", "bf16"))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--limits", default="16-256", help="LO-HI: each row's new tokens, uniform, inclusive")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    try:
        parse_lengths(args.limits, "--limits")
    except ValueError as e:
        ap.error(str(e))
    if args.batch < 1 or args.rounds < 1 or args.prompt < 1:
        ap.error("need --batch, --rounds and --prompt >= 1")
    return args


def main(argv=None) -> int:
    from flash_llm.models.synthetic import build_synthetic

    args = parse_args(argv)
    lo, hi = parse_lengths(args.limits, "--limits")  # (checked by parse_args)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("uneven_rows.py: needs a CUDA GPU (--device cpu with a tiny-* model for a smoke run)", file=sys.stderr)
        return 2
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    model, report = build_synthetic(TINY if args.model == "tiny-llama" else args.model, args.sparsity or None,
                                    dtype=dtype, device=args.device, seed=1, progress=False, fmt=args.format)
    print(report, flush=True)
    limits = draw_limits(args.batch, lo, hi, args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    prompts = torch.randint(0, model.config.vocab_size, (args.batch, args.prompt), generator=gen).tolist()
    eng = Engine(model, max_batch=args.batch, max_seq=args.prompt + hi, fuse=args.device == "cuda",
                 merge=True)
    eng.warmup(batches=(args.batch,), prompt_lengths=(args.prompt,))  # (and the smaller batches' graphs)
    res = run_settings(eng, prompts, limits, args.rounds)
    rows_same = sum(torch.equal(a, b) for a, b in zip(res["shrink"]["tokens"], res["full"]["tokens"]))
    card = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"\n{args.model} {args.format} {100 * args.sparsity:g} % {args.dtype}, batch {args.batch}, prompt "
          f"{args.prompt}, limits {lo}-{hi} (sum {sum(limits)}), {card}, torch {torch.__version__}, commit "
          f"{os.environ.get('FLASH_LLM_COMMIT', '?')}; rows whose tokens both settings agree on: {rows_same} of "
          f"{args.batch}")
    print("\nsetting | generation median s | tokens/s | decode batch sizes")
    print("---|---|---|---")
    for name, _ in SETTINGS:
        med = statistics.median(res[name]["s"])
        sizes = res[name]["sizes"]
        runs = [f"{b} x{sum(1 for _ in g)}" for b, g in itertools.groupby(sizes)]
        print(f"{name} | {med:.3f} | {sum(limits) / med:.0f} | {', '.join(runs)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(json_record(args, card, limits, res), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

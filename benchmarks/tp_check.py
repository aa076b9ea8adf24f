"""Tensor-parallel outputs against the single-GPU model, at a real model size (issue 8's correctness check).

    torchrun --nproc-per-node K benchmarks/tp_check.py [--model llama-3-8b] [--sparsities 0,80] [--out DIR]

For each sparsity, every rank builds its part of the synthetic model (``build_synthetic(..., tp=tp)``, one seed),
and rank 0 also builds the whole model on its GPU with the same seed (the same weights: the builder draws each
projection whole) plus an fp32 copy with every sparse layer expanded, as the reference.  On a batch of random
prompts it compares:

- the prefill logits: max |error| against the fp32 reference of the K-rank model and of the single-GPU model
  (the K-rank one should be within ``2 x single + 1 ulp``: only the summation order of the all-reduces differs);
- greedy decoding through the engine (CUDA graphs, NCCL all-reduces inside them): tokens equal up to the first
  step whose top-2 margin in the single-GPU run is within the logits' error, where a tie may break either way.

Prints a table and writes ``tp_check.json`` under ``--out``.  Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import torch

from flash_llm.demo import expanded_copy
from flash_llm.engine import Engine
from flash_llm.models import preset
from flash_llm.models.synthetic import build_synthetic
from flash_llm.parallel import init_tensor_parallel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing as T  # noqa: E402
from dr_coded import sparsities_arg  # noqa: E402  (flash_llm.cli.sparsity_arg, each)


# ``--model tiny``: a smoke run on CPU processes (gloo), as tests/test_parallel.py runs it
TINY = preset("llama-3-8b").replace(num_layers=2, hidden_size=128, intermediate_size=256, num_heads=4, num_kv_heads=2,
                                    vocab_size=300, max_position_embeddings=128, name="tiny")


def _empty_cache():
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _ulp(dtype, x: float) -> float:
    return float(torch.finfo(dtype).eps) * 2.0 ** torch.tensor(max(x, 1e-30)).log2().floor().item()


def _percent(sparsity: float) -> int | float:
    """A fraction as the percentage the rows and the table give (0.8 -> 80, 0.875 -> 87.5)."""
    pct = round(100 * sparsity, 6)
    return int(pct) if pct.is_integer() else pct


def parse_args(argv=None) -> argparse.Namespace:
    """The options, checked on every rank before the process group starts (a bad one: ``ap.error``, exit status 2)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-3-8b", help="a flash_llm.models preset, or tiny (CPU smoke run)")
    ap.add_argument("--sparsities", type=sparsities_arg, default="0,80",
                    help="comma-separated, each a fraction or a percentage (0.8, 80 and 80%% alike; 0: dense; "
                         "default 0,80)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--out", default="benchmarks/out/tp_check")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="auto (default: NCCL on cuda:LOCAL_RANK where CUDA is, else gloo on the CPU), cpu (gloo "
                         "ranks on the CPU, on a GPU machine too) or cuda")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    sparsities = args.sparsities
    cfg = TINY if args.model == "tiny" else preset(args.model)
    dtype = torch.float16
    with init_tensor_parallel({"auto": None, "cpu": "gloo", "cuda": "nccl"}[args.device]) as tp:
        lead = tp.rank == 0
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, cfg.vocab_size, (args.batch, args.prompt), generator=gen)
        prompts = ids.tolist()
        rows = []
        for sp in sparsities:
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                model, _ = build_synthetic(cfg, sp or None, dtype=dtype, device=tp.device, seed=1, tp=tp,
                                           progress=False)
            with torch.no_grad():
                got = model(ids.to(tp.device)).float()
            out = Engine(model, max_batch=args.batch, max_seq=args.prompt + args.new).generate(
                prompts, args.new, eos_token_id=None, output_logits=True)
            row = {"model": args.model, "sparsity": _percent(sp), "world_size": tp.world_size}
            del model
            _empty_cache()
            if lead:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    one, _ = build_synthetic(cfg, sp or None, dtype=dtype, device=tp.device, seed=1,
                                             progress=False)
                ref32 = expanded_copy(one).float()  # the dense-with-zeros reference
                with torch.no_grad():
                    want = one(ids.to(tp.device)).float()
                    want32 = ref32(ids.to(tp.device)).float()
                del ref32
                _empty_cache()
                single = Engine(one, max_batch=args.batch, max_seq=args.prompt + args.new).generate(
                    prompts, args.new, eos_token_id=None, output_logits=True)
                err_tp = float((got - want32).abs().max())
                err_one = float((want - want32).abs().max())
                tol = 2 * err_one + _ulp(dtype, float(want32.abs().max()))
                # greedy tokens: equal until a step where the single-GPU top-2 margin is within the error
                a, b = out.tokens.cpu(), single.tokens.cpu()
                margins = single.logits.float().topk(2, dim=-1).values
                margins = (margins[..., 0] - margins[..., 1]).cpu()  # [batch, new]
                first_diff, explained = None, True
                for r in range(args.batch):
                    diff = (a[r] != b[r]).nonzero()
                    if len(diff):
                        s = int(diff[0])
                        first_diff = s if first_diff is None else min(first_diff, s)
                        explained &= bool(margins[r, s] <= 2 * tol)
                row.update({"max_err_tp_vs_fp32": err_tp, "max_err_single_vs_fp32": err_one, "tolerance": tol,
                            "logits_ok": err_tp <= tol, "tokens_equal": bool(torch.equal(a, b)),
                            "first_token_difference": first_diff, "difference_at_a_near_tie": explained,
                            "tokens_compared": int(a.numel()), "build_s": time.perf_counter() - t0})
                del one
                _empty_cache()
                print(json.dumps(row), flush=True)
            rows.append(row)
            tp.barrier()
        if not lead:
            return 0
    env = T.environment(tp.device)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "tp_check.json"), "w") as f:
        json.dump({"env": env, "command": " ".join(sys.argv), "rows": rows}, f, indent=1)
    print(f"\n{args.model} on {rows[0]['world_size']} ranks against one process, batch {args.batch}, prompt "
          f"{args.prompt}, {args.new} greedy tokens ({env['card']})")
    print("| sparsity | max err K-rank vs fp32 | single vs fp32 | tolerance | logits | greedy tokens |")
    print("|---|---|---|---|---|---|")
    ok = True
    for r in rows:
        toks = ("all equal" if r["tokens_equal"] else
                f"differ from step {r['first_token_difference']} ({'near tie' if r['difference_at_a_near_tie'] else 'NOT a tie'})")
        good = r["logits_ok"] and (r["tokens_equal"] or r["difference_at_a_near_tie"])
        ok &= good
        print(f"| {r['sparsity']} % | {r['max_err_tp_vs_fp32']:.4g} | {r['max_err_single_vs_fp32']:.4g} | "
              f"{r['tolerance']:.4g} | {'PASS' if r['logits_ok'] else 'FAIL'} | {toks} |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""DeltaRows with coded values (``DeltaRows.code_values``: 2 bytes an entry instead of 2.5) against the plain values,
on Llama-3-8B's decoder projections at batch 1, bf16, laid out as ``Engine(delta_layout="auto")`` lays them out at
``max_batch`` 1 (the parts layout's lanes by ``auto_parts``).

    PYTHONPATH=$PWD python benchmarks/dr_coded.py [--sparsities 0.7,0.8] [--layers 8] [--replays 30] [--check-only]

Weights: normal values pruned by magnitude (as ``build_synthetic`` draws them).  Each projection kind runs with the
engine's epilogue (q/k/v after RMSNorm, o adding into the residual, gate / up after RMSNorm with SiLU x up, down adding
into the residual).  First a check: the coded weight's output has the plain weight's bits (the same values, summed in
the same order).  Then the timing: ``--layers`` weights a kind at least, more where that kind's coded bytes (the
smaller) need them to pass 3x L2 (``_timing.layers_to_rotate``; each its own weight), one CUDA graph of programmatic
launches under ``static_weights`` as the decode step, median us a call over the replays; plain and coded interleaved,
two rounds; then the four kinds in a layer's order (as many layers as the whole layer's bytes need, at least
``--layers``).  Prints a table with the weights rotated (``layers``) and their bytes (``rotated_bytes``, plain / coded);
``--out`` writes it as JSON.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch

from flash_llm import DeltaRows, kernels
from flash_llm.cli import _positive, sparsity_arg
from flash_llm.formats.delta_rows import auto_parts
from flash_llm.reference import FORMAT_IDS

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _timing import environment, layers_to_rotate, time_calls  # noqa: E402

FID = FORMAT_IDS[DeltaRows]
H, EPS = 4096, 1e-5
# (kind, M, K, epilogue, normed input)
KINDS = [("qkv", 6144, 4096, "norm", True), ("o", 4096, 4096, "resid", False),
         ("gate_up", 28672, 4096, "norm_silu", True), ("down", 4096, 14336, "resid", False)]


def pruned(m: int, k: int, sparsity: float, gen: torch.Generator) -> torch.Tensor:
    w = torch.randn(m, k, generator=gen, device="cuda") * 0.02
    t = 0.02 * float(torch.special.ndtri(torch.tensor(1.0 - (1.0 - sparsity) / 2, dtype=torch.float64)))
    return w.masked_fill_(w.abs() < t, 0.0).to(torch.bfloat16)


class Bufs:
    """the step's activations: the residual h, RMSNorm's weight, q/k/v's output, the MLP's intermediate"""

    def __init__(self, gen):
        def r(*s):
            return (0.5 * torch.randn(*s, generator=gen, device="cuda")).to(torch.bfloat16)

        self.h, self.attn, self.act = r(1, H), r(1, H), r(1, 14336)
        self.g = (torch.rand(H, generator=gen, device="cuda") + 0.5).to(torch.bfloat16)
        self.q = torch.empty(1, 6144, dtype=torch.bfloat16, device="cuda")
        self.mlp = torch.empty(1, 14336, dtype=torch.bfloat16, device="cuda")


def call(kind: str, w: DeltaRows, b: Bufs, out: torch.Tensor | None = None) -> torch.Tensor:
    m, k = w.shape
    if kind == "qkv":
        return kernels.spmm_cuda(b.h, w.data, w.offsets, FID, m, k, None, norm=(b.g, EPS), out=b.q if out is None
                                 else out)
    if kind == "gate_up":
        return kernels.spmm_cuda(b.h, w.data, w.offsets, FID, m, k, None, norm=(b.g, EPS), act="silu_mul",
                                 out=b.mlp if out is None else out)
    x = b.attn if kind == "o" else b.act
    return kernels.spmm_cuda(x, w.data, w.offsets, FID, m, k, None, add_to=b.h if out is None else out)


def build(sparsity: float, layers: int, gen, rotate: bool = True) -> dict:
    """{kind: (plain weights, coded weights)}: ``layers`` of each, more where ``rotate`` and the kind's coded bytes
    (the smaller) need them to pass 3x L2 (:func:`kind_layers`)"""
    ws = {}
    for kind, m, k, _, normed in KINDS:
        plain, coded = [], []
        want = layers
        while len(plain) < want:
            d = pruned(m, k, sparsity, gen)
            p = auto_parts(m, k, int((d != 0).sum()), "cuda", normed=normed)
            w = DeltaRows.from_dense(d, parts=p, pair_halves=kind == "gate_up")
            c = w.code_values()
            if c is None:
                raise SystemExit(f"{kind}: a row's values span more than 7 exponents; nothing to compare")
            plain.append(w)
            coded.append(c)
            del d
            if rotate and len(plain) == 1:  # (the count from the first weight's bytes: the others' are alike)
                want = kind_layers(layers, w.nbytes, c.nbytes)
        ws[kind] = (plain, coded)
    return ws


def kind_layers(layers: int, *nbytes: int, min_total: int | None = None) -> int:
    """Weights to rotate of a kind whose plain / coded weights are ``nbytes``: at least ``layers``, more where the
    smaller needs them to pass ``min_total`` (default 3x L2), so both variants read beyond L2."""
    return layers_to_rotate(layers, min(nbytes), min_total)


def rotated(ws: dict, kind: str, n: int) -> list[int]:
    """Bytes of the first ``n`` plain and coded weights of ``kind`` (what a graph over them reads)."""
    return [sum(w.nbytes for w in v[:n]) for v in ws[kind]]


def check(ws: dict, b: Bufs) -> None:
    for kind, (plain, coded) in ws.items():
        outs = []
        for w in (plain[0], coded[0]):
            m = w.shape[0]
            if kind in ("o", "down"):
                out = b.h.clone()
            else:
                out = torch.full((1, m // 2 if kind == "gate_up" else m), float("nan"), dtype=torch.bfloat16,
                                 device="cuda")
            outs.append(call(kind, w, b, out).clone())
        if not torch.equal(outs[0], outs[1]) or torch.isnan(outs[1]).any():
            raise SystemExit(f"{kind}: the coded weight's output differs from the plain weight's")
        print(f"check {kind}: P = {plain[0].parts}, the same bits", flush=True)


def timed(fns: list, replays: int) -> float:
    with kernels.static_weights():
        return time_calls(fns, replays=replays, warmup=3) * 1e6


def sparsities_arg(text: str) -> list[float]:
    """``--sparsities``: comma-separated sparsities, each read by ``flash_llm.cli.sparsity_arg`` (0.8, 80 and 80%
    alike; out of [0, 1) refused)."""
    out = [sparsity_arg(part.strip()) for part in text.split(",") if part.strip()]
    if not out:
        raise argparse.ArgumentTypeError(f"no sparsity given in {text!r}")
    return out


def parse_args(argv=None) -> argparse.Namespace:
    """The options, checked before any CUDA work (a bad one: ``ap.error``, exit status 2)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sparsities", type=sparsities_arg, default="0.7,0.8",
                    help="comma-separated, each a fraction or a percentage (0.8, 80 and 80%% alike)")
    ap.add_argument("--layers", type=_positive, default=8)
    ap.add_argument("--replays", type=_positive, default=30)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--check-only", action="store_true", help="the check, no timing (for compute-sanitizer)")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    gen = torch.Generator(device="cuda").manual_seed(0)
    b = Bufs(gen)
    rows = []
    for sp in args.sparsities:
        ws = build(sp, args.layers, gen, rotate=not args.check_only)
        check(ws, b)
        for rnd in range(0 if args.check_only else 2):
            for kind, (plain, coded) in ws.items():
                t = [timed([functools.partial(call, kind, w, b) for w in v], args.replays) for v in (plain, coded)]
                nb = [v[0].nbytes for v in (plain, coded)]
                rows.append({"sparsity": sp, "round": rnd, "kind": kind, "parts": plain[0].parts, "bytes": nb,
                             "layers": len(plain), "rotated_bytes": rotated(ws, kind, len(plain)), "us": t})

            def layer(v, i):
                for kind, _, _, _, _ in KINDS:
                    call(kind, ws[kind][v][i], b)

            nb = [sum(ws[kind][v][0].nbytes for kind in ws) for v in (0, 1)]
            # (at most the fewest weights a kind has: each kind has the layer's bytes' count or more, its bytes fewer)
            n = min(kind_layers(args.layers, *nb), *(len(v[0]) for v in ws.values()))
            t = [timed([functools.partial(layer, v, i) for i in range(n)], args.replays) for v in (0, 1)]
            rows.append({"sparsity": sp, "round": rnd, "kind": "layer", "parts": 0, "bytes": nb, "layers": n,
                         "rotated_bytes": [sum(rotated(ws, kind, n)[v] for kind in ws) for v in (0, 1)], "us": t})
        del ws
        torch.cuda.empty_cache()
    if args.check_only:
        return
    env = environment()
    print(f"\n{env.get('card', torch.cuda.get_device_name())}; us a call (median of {args.replays} replays of "
          f"at least {args.layers} layers: as many as pass 3x L2), plain / coded")
    print("| sparsity | round | kind | P | MB plain / coded | layers | MB rotated plain / coded | us plain | us coded "
          "| coded / plain |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['sparsity']:.0%} | {r['round']} | {r['kind']} | {r['parts'] or '-'} | "
              f"{r['bytes'][0] / 1e6:.1f} / {r['bytes'][1] / 1e6:.1f} | {r['layers']} | "
              f"{r['rotated_bytes'][0] / 1e6:.1f} / {r['rotated_bytes'][1] / 1e6:.1f} | {r['us'][0]:.1f} | "
              f"{r['us'][1]:.1f} | {r['us'][1] / r['us'][0]:.3f} |")
    if args.out:
        args.out.write_text(json.dumps({"environment": env, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

"""DeltaRows' two layouts on a model's decoder layers at batch 1 (Llama-3-8B, or OPT-30B's shapes): the split layout
(32 rows a warp, split-K: ``from_dense(..., parts=1)``) against the parts layout (P lanes a row, one split;
``delta_rows.auto_parts``'s P, or ``--parts``), both through the library's kernels.

    python benchmarks/dr_layouts.py [--model llama-3-8b|opt-30b] [--sparsity 0.8] [--layers 8] [--parts qkv=8,down=8]
                                    [--sweep] [--replays 30]

Why: inside the decode step's CUDA graph each split-layout launch ends in a ticket and the last warp's sum over the
splits, 2-3.5 us a launch (session 29's graph trace, ``benchmarks/RESULTS.md``), 4 launches a layer; the parts
layout's kernel (``delta_rows_parts_*``) needs no other block: a row's parts meet by shuffles.  Every block stages all
of X instead of a split's window.  (Session 29's prototype of it, ``dr_parts_proto.py``, measured 1.13x per Llama
layer at 80 %; session 30 moved it into the library.)

On a GPU it first checks each projection kind (Llama: q/k/v with RMSNorm, o with the residual add, gate / up with
RMSNorm and SiLU x up, down with the residual add; OPT: LayerNorm before q/k/v, LayerNorm and ReLU around fc1, the
residual add after out and fc2, a bias on every projection) against an fp32 product of the dense weight, outputs
poisoned, tolerance from the split layout's own error there (the same inputs; at least 2 units of the dtype's rounding
at the output's scale).  Then it times, in CUDA graphs of at least ``--layers`` layers (each its own weights; more
where the bytes of what is timed, the smaller layout's, need them to pass 3x L2: ``_timing.layers_to_rotate``, per
kind and for the whole layer, printed with the bytes rotated), programmatic launches under ``static_weights`` as the
engine's decode step (no attention between q/k/v and o): each projection kind alone, then the four in a layer's order,
split against parts, median us a layer over the replays, two rounds.  ``--sweep`` then times every other P for each
kind alone.  fp16 only.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch

from flash_llm import DeltaRows, kernels
from flash_llm.cli import _positive, sparsity_arg
from flash_llm.formats.delta_rows import auto_parts
from flash_llm.reference import FORMAT_IDS, layer_norm

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _timing import layers_to_rotate, time_calls  # noqa: E402

FID = FORMAT_IDS[DeltaRows]
EPS = 1e-5
DEVICE = "cuda"  # (the CPU test of the harness sets "cpu")
# a decoder layer's projections in order: (kind, M, K, epilogue, input buffer, output buffer).  Epilogues: "norm"
# RMSNorm before (weight g_in), "norm_silu" RMSNorm (g_post) and SiLU x up on paired halves, "ln" LayerNorm before
# (g_in, b_in), "ln_relu" LayerNorm (g_post, b_post) and ReLU after, "resid" the residual add into h, "plain" none.
# "bias": every projection has one (OPT).
MODELS = {
    "llama-3-8b": {"H": 4096, "bias": False, "kinds": [
        ("qkv", 6144, 4096, "norm", "h", "q"), ("o", 4096, 4096, "resid", "attn", "h"),
        ("gate_up", 28672, 4096, "norm_silu", "h", "act"), ("down", 4096, 14336, "resid", "act", "h")]},
    "opt-30b": {"H": 7168, "bias": True, "kinds": [
        ("qkv", 21504, 7168, "ln", "h", "q"), ("o", 7168, 7168, "resid", "attn", "h"),
        ("fc1", 28672, 7168, "ln_relu", "h", "act"), ("fc2", 7168, 28672, "resid", "act", "h")]},
}


# ---- the layers ----------------------------------------------------------------------------------------------------
def weight(m, k, sparsity, gen):
    w = torch.randn(m, k, device=DEVICE, generator=gen) / (k * (1 - sparsity)) ** 0.5
    return torch.where(torch.rand(m, k, device=DEVICE, generator=gen) >= sparsity, w, 0.0).half()


def build(model: dict, sparsity: float, gen, parts: dict) -> dict:
    """One layer: per kind (split layout, parts layout), the norms' weights and the activation buffers.  ``parts``:
    P per kind (absent: ``auto_parts``, which is 1 for a K it leaves to the split layout)."""
    lay = {"model": model}
    hsz = model["H"]
    for kind, m, k, epi, xin, yout in model["kinds"]:
        wd = weight(m, k, sparsity, gen)
        pair = epi == "norm_silu"
        p = parts.get(kind) or auto_parts(m, k, int((wd != 0).sum()), wd.device)
        lay[kind] = (DeltaRows.from_dense(wd, pair_halves=pair, parts=1),
                     DeltaRows.from_dense(wd, pair_halves=pair, parts=p))
        lay.setdefault(xin, torch.randn(1, k, device=DEVICE, generator=gen).half())
        lay.setdefault(yout, torch.randn(1, m // 2 if pair else m, device=DEVICE, generator=gen).half())
        if model["bias"]:
            lay["bias_" + kind] = (0.1 * torch.randn(m, device=DEVICE, generator=gen)).half()
    for name in ("g_in", "g_post"):
        lay[name] = (torch.rand(hsz, device=DEVICE, generator=gen) + 0.5).half()
    for name in ("b_in", "b_post"):
        lay[name] = (0.1 * torch.randn(hsz, device=DEVICE, generator=gen)).half()
    return lay


def spec(lay, kind):
    return next(t for t in lay["model"]["kinds"] if t[0] == kind)


def step(lay, kind, which: int) -> None:
    """One projection kind on layout ``which`` (0 split, 1 parts), its epilogue inside the kernel."""
    _, _, _, epi, xin, yout = spec(lay, kind)
    w = lay[kind][which]
    kw = {"norm": {"out": lay[yout], "norm": (lay["g_in"], EPS)},
          "norm_silu": {"out": lay[yout], "norm": (lay["g_post"], EPS), "act": "silu_mul"},
          "ln": {"out": lay[yout], "norm": (lay["g_in"], lay["b_in"], EPS)},
          "ln_relu": {"out": lay[yout], "norm": (lay["g_post"], lay["b_post"], EPS), "act": "relu"},
          "resid": {"add_to": lay[yout]}, "plain": {"out": lay[yout]}}[epi]
    kernels.spmm_cuda(lay[xin], w.data, w.offsets, FID, w.shape[0], w.shape[1], lay.get("bias_" + kind), **kw)


split_step = functools.partial(step, which=0)
parts_step = functools.partial(step, which=1)


def reference(lay, kind) -> torch.Tensor:
    """The kind's output in fp32 from the dense weight (the inputs as the layer holds them now)."""
    _, m, _, epi, xin, yout = spec(lay, kind)
    wd = lay[kind][0].to_dense().float()
    x = lay[xin].float()
    if epi in ("norm", "norm_silu"):
        g = lay["g_in" if epi == "norm" else "g_post"]
        x = (x * g.float()).half().float() * torch.rsqrt(x.pow(2).mean() + EPS)
    elif epi in ("ln", "ln_relu"):
        post = epi == "ln_relu"
        x = layer_norm(lay[xin], lay["g_post" if post else "g_in"], lay["b_post" if post else "b_in"], EPS).float()
    y = x @ wd.T
    if "bias_" + kind in lay:
        y = y + lay["bias_" + kind].float()
    if epi == "norm_silu":
        return torch.nn.functional.silu(y[..., : m // 2]) * y[..., m // 2:]
    if epi == "ln_relu":
        return torch.relu(y)
    return lay[yout].float() + y if epi == "resid" else y


def check(lay) -> bool:
    """Each kind once from the same inputs: the parts layout against the fp32 product, the split layout's error the
    bar."""
    ok = True
    saved = {k: v.clone() for k, v in lay.items() if isinstance(v, torch.Tensor)}
    for kind, *_ in lay["model"]["kinds"]:
        yout = spec(lay, kind)[5]
        errs = []
        for run in (split_step, parts_step):
            for k, v in saved.items():
                lay[k].copy_(v)
            ref = reference(lay, kind)
            if spec(lay, kind)[3] != "resid":
                lay[yout].fill_(float("nan"))
            run(lay, kind)
            torch.cuda.synchronize()
            out = lay[yout]
            errs.append(((out.float() - ref).abs().max().item(), bool(torch.isfinite(out).all()),
                         ref.abs().max().item()))
        (e_lib, _, scale), (e_new, fin, _) = errs
        bar = max(2 * e_lib, 2 * scale * 2.0 ** -10)
        good = fin and e_new <= bar
        ok &= good
        print(f"  {kind:8s} P={lay[kind][1].parts:2d} max |err| split {e_lib:.3e}, parts {e_new:.3e} (bar {bar:.3e}) "
              f"{'ok' if good else 'WRONG'}")
    for k, v in saved.items():
        lay[k].copy_(v)
    return ok


def timed(fn, layers, replays) -> float:
    """us a layer: ``fn`` on every layer, captured in one CUDA graph under ``static_weights`` (programmatic launches,
    as the decode step), median of the replays (``_timing.time_calls``)."""
    with kernels.static_weights():
        return time_calls([functools.partial(fn, lay) for lay in layers], replays=replays, warmup=3) * 1e6


def rotation_plan(lay: dict, names: list, minimum: int, min_total: int | None = None) -> dict:
    """Layers to rotate when timing each kind of ``names`` alone and (key ``"+".join(names)``) all of them: at least
    ``minimum``, more where the smaller layout's bytes of a layer like ``lay`` need them to pass ``min_total``
    (default 3x L2)."""
    small = {k: min(w.nbytes for w in lay[k]) for k in names}
    plan = {k: layers_to_rotate(minimum, b, min_total) for k, b in small.items()}
    plan["+".join(names)] = layers_to_rotate(minimum, sum(small.values()), min_total)
    return plan


def rotated_mb(layers: list, kinds: list, which: int) -> float:
    """MB (10^6 bytes) of layout ``which``'s weights of ``kinds`` over ``layers``: what one replay reads of them."""
    return sum(lay[k][which].nbytes for lay in layers for k in kinds) / 1e6


def chain(step, kinds):
    def run(lay):
        for kind in kinds:
            step(lay, kind)
    return run


def parse_parts(model: dict, text: str) -> dict:
    """``qkv=8,down=16`` -> P per kind (kinds not named: ``auto_parts``)."""
    kinds = [kind for kind, *_ in model["kinds"]]
    parts = {}
    for item in filter(None, text.split(",")):
        kind, _, p = item.partition("=")
        if kind not in kinds or p not in ("1", "2", "4", "8", "16"):
            raise SystemExit(f"--parts: {item!r} (kinds {', '.join(kinds)}; P of 1, 2, 4, 8, 16)")
        parts[kind] = int(p)
    return parts


def parse_args(argv=None) -> argparse.Namespace:
    """The options, checked before any CUDA work (a bad one: ``ap.error``, exit status 2)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama-3-8b", choices=sorted(MODELS))
    ap.add_argument("--sparsity", type=sparsity_arg, default=0.8,
                    help="a fraction or a percentage (0.8, 80 and 80%% alike)")
    ap.add_argument("--layers", type=_positive, default=8)
    ap.add_argument("--parts", default="", help="P per kind, e.g. qkv=8,down=8 (default: auto_parts)")
    ap.add_argument("--sweep", action="store_true", help="each kind alone at every other P (2, 4, 8, 16)")
    ap.add_argument("--replays", type=_positive, default=30)
    ap.add_argument("--skip-check", action="store_true",
                    help="time without checking the outputs (what-if patches that are wrong by design)")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    a = parse_args(argv)
    model = MODELS[a.model]
    parts = parse_parts(model, a.parts)
    names = [kind for kind, *_ in model["kinds"]]
    gen = torch.Generator(device="cuda").manual_seed(0)
    layers = [build(model, a.sparsity, gen, parts)]
    plan = rotation_plan(layers[0], names, a.layers)
    layers += [build(model, a.sparsity, gen, parts) for _ in range(max(plan.values()) - 1)]
    got = {k: layers[0][k][1].parts for k in names}
    nbytes = [sum(lay[k][i].nbytes for lay in layers for k in names) / len(layers) for i in (0, 1)]
    print(f"{a.model} layers at {a.sparsity:.0%}, fp16, N = 1, on {torch.cuda.get_device_name()}; parts {got}; "
          f"bytes a layer: split {nbytes[0] / 1e6:.1f} MB, parts {nbytes[1] / 1e6:.1f} MB; layers rotated {plan}")
    if not a.skip_check and not check(layers[0]):
        raise SystemExit("the parts layout's outputs are wrong")
    for rnd in (1, 2):
        for kinds in [[k] for k in names] + [names]:
            use = layers[:plan["+".join(kinds)]]
            t_split = timed(chain(split_step, kinds), use, a.replays)
            t_parts = timed(chain(parts_step, kinds), use, a.replays)
            print(f"round {rnd}: {'+'.join(kinds):22s} split {t_split:7.2f} us a layer, parts {t_parts:7.2f} "
                  f"({t_split / t_parts:.3f}x); {len(use)} layers, {rotated_mb(use, kinds, 0):.1f} / "
                  f"{rotated_mb(use, kinds, 1):.1f} MB rotated")
    if a.sweep:
        for kind, m, k, epi, *_ in model["kinds"]:
            for p in (2, 4, 8, 16):
                if p == got[kind]:
                    continue
                for lay in layers:
                    lay[kind] = (lay[kind][0], DeltaRows.from_dense(lay[kind][0].to_dense(), parts=p,
                                                                    pair_halves=epi == "norm_silu"))
                if not check(layers[0]):
                    print(f"  {kind} P={p}: WRONG, not timed")
                    continue
                # (this P's bytes: as many layers as they need, at most those built)
                use = layers[:min(len(layers), rotation_plan(layers[0], [kind], a.layers)[kind])]
                t = timed(chain(parts_step, [kind]), use, a.replays)
                print(f"sweep: {kind:8s} P={p:2d} parts {t:7.2f} us a layer; {len(use)} layers, "
                      f"{rotated_mb(use, [kind], 1):.1f} MB rotated")


if __name__ == "__main__":
    main()

"""Prototype (session 29): DeltaRows with P lanes a row and no split-K (``dr_parts_proto.cu``) against the library's
DeltaRows N = 1 kernel, on a model's decoder layers at batch 1 (Llama-3-8B, or OPT-30B's shapes).

    python benchmarks/dr_parts_proto.py --cpu-check          # no GPU: the encoder's round trip, the kernels' ptxas
    python benchmarks/dr_parts_proto.py [--model llama-3-8b|opt-30b] [--sparsity 0.8] [--layers 8]
                                        [--parts qkv=8,down=8] [--stage 0|1|2] [--sweep] [--replays 30]

Why: inside the decode step's CUDA graph each DeltaRows launch ends in a ticket and the last warp's sum over the
splits, 2-3.5 us a launch (session 29's graph trace, ``benchmarks/RESULTS.md``), 4 launches a layer.  Here a row's
entries are cut into P parts of equal stream length (contiguous column ranges), walked by P adjacent lanes of one
warp, so no launch waits on another block: the parts meet by shuffles and part 0's lane writes the row, with the
epilogue (RMSNorm's factor, SiLU x up, bias, ReLU, the residual add).  Every block stages all of X instead of a
split's window (LayerNorm: X staged raw, its statistics taken on the way, then normalized in place).

On a GPU it first checks each projection kind (Llama: q/k/v with RMSNorm, o with the residual add, gate / up with
RMSNorm and SiLU x up, down with the residual add; OPT: LayerNorm before q/k/v, LayerNorm and ReLU around fc1, the
residual add after out and fc2, a bias on every projection) against an fp32 product of the dense weight, outputs
poisoned, tolerance from the library kernel's own error there (the same inputs; at least 2 units of the dtype's
rounding at the output's scale).  Then it times, in CUDA graphs of ``--layers`` layers (each its own weights, so the
weight bytes pass L2), programmatic launches under ``static_weights`` as the engine's decode step (no attention
between q/k/v and o): each projection kind alone, then the four in a layer's order, library against prototype,
median us a layer over the replays, two rounds.  ``--sweep`` then times every other P for each kind alone.  fp16
only.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import sys
from pathlib import Path

import torch

from flash_llm import DeltaRows, kernels
from flash_llm.formats._layout import ceil_div
from flash_llm.formats.delta_rows import GROUP, LANES, _escapes, _groups, _lay_streams
from flash_llm.kernels import _build as B
from flash_llm.reference import FORMAT_IDS, layer_norm

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _timing import time_calls  # noqa: E402

FID = FORMAT_IDS[DeltaRows]
EPS = 1e-5
DEVICE = "cuda"  # (the CPU test of the harness sets "cpu")
# a decoder layer's projections in order: (kind, M, K, epilogue, input buffer, output buffer, default P).  Epilogues:
# "norm" RMSNorm before (weight g_in), "norm_silu" RMSNorm (g_post) and SiLU x up on paired halves, "ln" LayerNorm
# before (g_in, b_in), "ln_relu" LayerNorm (g_post, b_post) and ReLU after, "resid" the residual add into h, "plain"
# none.  "bias": every projection has one (OPT).
MODELS = {
    "llama-3-8b": {"H": 4096, "bias": False, "kinds": [
        ("qkv", 6144, 4096, "norm", "h", "q", 16), ("o", 4096, 4096, "resid", "attn", "h", 16),
        ("gate_up", 28672, 4096, "norm_silu", "h", "act", 4), ("down", 4096, 14336, "resid", "act", "h", 16)]},
    "opt-30b": {"H": 7168, "bias": True, "kinds": [
        ("qkv", 21504, 7168, "ln", "h", "q", 4), ("o", 7168, 7168, "resid", "attn", "h", 8),
        ("fc1", 28672, 7168, "ln_relu", "h", "act", 2), ("fc2", 7168, 28672, "resid", "act", "h", 4)]},
}
DRP_WARPS = 4
_DR_RESID, _DR_RMS, _DR_SILU, _DR_LN, _DR_RELU = 1, 2, 4, 8, 16  # spmm.cu's mode bits


# ---- the format ------------------------------------------------------------------------------------------------
def encode(w: torch.Tensor, parts: int, pair: bool = False) -> dict:
    """``w [M, K]`` fp16 -> the prototype's arrays (``data``, ``goff``, ``starts``, ``rows``; ``dr_parts_proto.cu``).
    Rows are ranked by their nonzeros (descending; paired: gate rows by gate + up nonzeros, each slice's second half
    their up rows); each row's nonzeros are cut into ``parts`` runs of equal stream length (escapes counted), each
    walked from its first column.  The streams are laid out and packed as DeltaRows' (``_lay_streams``, ``_groups``)."""
    m, k = w.shape
    dev = w.device
    R = LANES // parts
    cnt = (w != 0).sum(1)
    if pair:
        h, hs = m // 2, R // 2
        order = torch.sort(cnt[:h] + cnt[h:], descending=True, stable=True).indices
        slices = ceil_div(h, hs)
        gate = torch.full((slices * hs,), -1, dtype=torch.int64, device=dev)
        gate[:h] = order
        gate = gate.view(slices, hs)
        rows = torch.cat([gate, torch.where(gate >= 0, gate + h, gate)], 1).reshape(-1)
    else:
        slices = ceil_div(m, R)
        rows = torch.full((slices * R,), -1, dtype=torch.int64, device=dev)
        rows[:m] = torch.sort(cnt, descending=True, stable=True).indices
    slot = torch.empty(m, dtype=torch.int64, device=dev)
    valid = rows >= 0
    slot[rows[valid]] = torch.arange(rows.numel(), device=dev)[valid]
    r, c = (w != 0).nonzero(as_tuple=True)  # row-major: each row's columns rise
    vals = w.view(torch.int16)[r, c]
    nnz = r.numel()
    # parts of equal stream length (escapes counted, from the row's own gaps): each nonzero's part is where the
    # stream before it falls among the row's P equal shares
    rfirst = torch.ones(nnz, dtype=torch.bool, device=dev)
    rfirst[1:] = r[1:] != r[:-1]
    rgap = c.clone()
    rgap[1:] -= c[:-1]
    rgap[rfirst] = 0
    rspan = 1 + _escapes(rgap)
    before = torch.cumsum(rspan, 0) - rspan
    rbase = torch.zeros(m, dtype=torch.int64, device=dev)
    rbase[r[rfirst]] = before[rfirst]
    rtotal = torch.zeros(m, dtype=torch.int64, device=dev).index_add_(0, r, rspan)
    part = (before - rbase[r]) * parts // rtotal[r].clamp(min=1)
    lane_of = slot[r] * parts + part  # = slice * 32 + (slot % R) * parts + part
    order = torch.sort(lane_of, stable=True).indices  # (a lane's entries keep their rising columns)
    lg, cc, vv = lane_of[order], c[order], vals[order]
    nl = slices * LANES
    first = torch.ones(nnz, dtype=torch.bool, device=dev)
    first[1:] = lg[1:] != lg[:-1]
    prev = torch.empty_like(cc)
    prev[1:] = cc[:-1]
    prev[first] = cc[first]  # a lane's first step is 0, from its start column
    starts = torch.zeros(nl, dtype=torch.int64, device=dev)
    starts[lg[first]] = cc[first]
    gap = cc - prev
    vals2, steps2, groups, ent = _lay_streams(lg, first, vv, gap, _escapes(gap), nl)
    data, goff = _groups(vals2, steps2, groups)
    return {"data": data, "goff": goff.to(torch.int32), "starts": starts.to(torch.int32),
            "rows": rows.to(torch.int32), "m": m, "k": k, "parts": parts, "slices": slices, "pair": pair,
            "entries": int(ent.sum()), "padded": int(groups.sum()) * GROUP * LANES}


def lane_streams(enc: dict, t: int):
    """Slice ``t``'s 32 lanes as the kernel walks them: value bits int16 and columns int64 ``[32, L]`` (each lane from
    its start column, pads included), and each lane's row (``rows[t R + lane / P]``, -1 for padding); None for a slice
    without groups."""
    dev = enc["data"].device
    goff = enc["goff"].long()
    g = enc["data"].view(-1, LANES * GROUP // 2 + LANES)[goff[t]: goff[t + 1]]  # [G, 160]
    if g.shape[0] == 0:
        return None
    vals = g[:, : LANES * GROUP // 2].contiguous().view(torch.int16).view(-1, LANES, GROUP)
    steps = ((g[:, LANES * GROUP // 2:].long()[:, :, None] & 0xFFFFFFFF) >> (4 * torch.arange(GROUP, device=dev))) & 15
    steps = steps.permute(1, 0, 2).reshape(LANES, -1)
    cols = enc["starts"][t * LANES: (t + 1) * LANES].long()[:, None] + torch.cumsum(steps, 1)
    row = enc["rows"][t * (LANES // enc["parts"]) + torch.arange(LANES, device=dev) // enc["parts"]].long()
    return vals.permute(1, 0, 2).reshape(LANES, -1), cols, row


def decode(enc: dict) -> torch.Tensor:
    """The dense ``[M, K]`` fp16 weight back from the prototype's arrays (every entry walked as the kernel does)."""
    m, k = enc["m"], enc["k"]
    out = torch.zeros(m, k, dtype=torch.int16, device=enc["data"].device)
    for t in range(enc["slices"]):
        lanes = lane_streams(enc, t)
        if lanes is None:
            continue
        vals, cols, row = lanes
        nz = (vals != 0) & (row[:, None] >= 0)
        if bool((cols[nz] >= k).any()):
            raise AssertionError(f"slice {t}: an entry past column {k}")
        out[row[:, None].expand_as(vals)[nz], cols[nz]] = vals[nz]
    return out.view(torch.float16)


# ---- the kernels ---------------------------------------------------------------------------------------------------
def compile_source(arch: str, use_cache: bool = True) -> B.Compiled:
    """spmm.cu with the prototype's kernels appended, compiled by NVRTC (``use_cache=False``: fresh, with ptxas's
    resource report in the log)."""
    return B.compile_kernels(arch, use_cache=use_cache,
                             source=B.SOURCE.read_bytes() + b"\n" + (HERE / "dr_parts_proto.cu").read_bytes())


_fns: dict[str, object] = {}


def _fn(name: str):
    if not _fns:
        compiled = compile_source(B.device_arch(torch.cuda.current_device()))
        _fns["module"] = B._check_cu(B._driver().cuModuleLoadData(compiled.cubin), "cuModuleLoadData")
    if name not in _fns:
        _fns[name] = B._check_cu(B._driver().cuModuleGetFunction(_fns["module"], name.encode()), name)
    return _fns[name]


STAGE = 0  # --stage: X staged as fp32 (1) or 16-bit (2) everywhere; 0: default_stage


def default_stage(enc: dict, device_index: int) -> int:
    """fp32 X (one instruction less an entry) where the grid still fits one wave with its 4 K bytes a block, else
    16-bit (2 K bytes)."""
    blocks = ceil_div(enc["slices"], DRP_WARPS)
    per_sm = min(32 // DRP_WARPS, (228 * 1024) // (20 * 1024 + 512 + 4 * enc["k"] + 1024))
    return 1 if ceil_div(blocks, kernels.sm_count(device_index)) <= per_sm else 2


def launch(enc: dict, x: torch.Tensor, y: torch.Tensor, mode: int = 0, colscale=None, stage: int | None = None,
           pdl: bool = True, bias=None, colbias=None) -> None:
    """``y`` (``[M]``, or ``[M / 2]`` with SiLU x up; with the residual add it is read first) from ``x [K]`` fp16;
    ``colscale``: the norm's weight (RMSNorm, LayerNorm), ``colbias``: LayerNorm's bias, ``bias``: the output's."""
    k = enc["k"]
    if k % 8 or x.data_ptr() % 16 or x.dtype != torch.float16:
        raise ValueError("the prototype needs K % 8 == 0 and fp16 X on 16 bytes")
    stage = stage or STAGE or default_stage(enc, x.device.index)
    name = f"drp_f16_p{enc['parts']}_s{stage}"
    P = ctypes.c_void_p
    args = [(enc["data"].data_ptr(), P), (enc["goff"].data_ptr(), P), (enc["starts"].data_ptr(), P),
            (enc["rows"].data_ptr(), P), (x.data_ptr(), P), (y.data_ptr(), P),
            (bias.data_ptr() if bias is not None else 0, P), (mode, ctypes.c_int),
            (colscale.data_ptr() if colscale is not None else 0, P), (EPS, ctypes.c_float), (k, ctypes.c_int),
            (enc["slices"], ctypes.c_int), (colbias.data_ptr() if colbias is not None else 0, P)]
    dev = x.device.index
    B.launch_function(_fn(name), name, (ceil_div(enc["slices"], DRP_WARPS), 1, 1), 32 * DRP_WARPS, args,
                      torch.cuda.current_stream().cuda_stream, dev, k * (4 if stage == 1 else 2), pdl)


# ---- the layers ----------------------------------------------------------------------------------------------------
def weight(m, k, sparsity, gen):
    w = torch.randn(m, k, device=DEVICE, generator=gen) / (k * (1 - sparsity)) ** 0.5
    return torch.where(torch.rand(m, k, device=DEVICE, generator=gen) >= sparsity, w, 0.0).half()


def build(model: dict, sparsity: float, gen, parts: dict) -> dict:
    """One layer: per kind (library DeltaRows, prototype arrays), the norms' weights and the activation buffers."""
    lay = {"model": model}
    hsz = model["H"]
    for kind, m, k, epi, xin, yout, _ in model["kinds"]:
        wd = weight(m, k, sparsity, gen)
        pair = epi == "norm_silu"
        lay[kind] = (DeltaRows.from_dense(wd, pair_halves=pair), encode(wd, parts[kind], pair))
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


def lib_step(lay, kind):
    _, _, _, epi, xin, yout, _ = spec(lay, kind)
    w = lay[kind][0]
    kw = {"norm": {"out": lay[yout], "norm": (lay["g_in"], EPS)},
          "norm_silu": {"out": lay[yout], "norm": (lay["g_post"], EPS), "act": "silu_mul"},
          "ln": {"out": lay[yout], "norm": (lay["g_in"], lay["b_in"], EPS)},
          "ln_relu": {"out": lay[yout], "norm": (lay["g_post"], lay["b_post"], EPS), "act": "relu"},
          "resid": {"add_to": lay[yout]}, "plain": {"out": lay[yout]}}[epi]
    kernels.spmm_cuda(lay[xin], w.data, w.offsets, FID, w.shape[0], w.shape[1], lay.get("bias_" + kind), **kw)


def proto_step(lay, kind):
    _, _, _, epi, xin, yout, _ = spec(lay, kind)
    mode, g, b = {"norm": (_DR_RMS, lay["g_in"], None), "norm_silu": (_DR_RMS | _DR_SILU, lay["g_post"], None),
                  "ln": (_DR_LN, lay["g_in"], lay["b_in"]),
                  "ln_relu": (_DR_LN | _DR_RELU, lay["g_post"], lay["b_post"]),
                  "resid": (_DR_RESID, None, None), "plain": (0, None, None)}[epi]
    launch(lay[kind][1], lay[xin].view(-1), lay[yout].view(-1), mode, g, bias=lay.get("bias_" + kind), colbias=b)


def reference(lay, kind) -> torch.Tensor:
    """The kind's output in fp32 from the dense weight (the inputs as the layer holds them now)."""
    _, m, _, epi, xin, yout, _ = spec(lay, kind)
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
    """Each kind once from the same inputs: the prototype against the fp32 product, the library's error the bar."""
    ok = True
    saved = {k: v.clone() for k, v in lay.items() if isinstance(v, torch.Tensor)}
    for kind, *_ in lay["model"]["kinds"]:
        yout = spec(lay, kind)[5]
        errs = []
        for step in (lib_step, proto_step):
            for k, v in saved.items():
                lay[k].copy_(v)
            ref = reference(lay, kind)
            if spec(lay, kind)[3] != "resid":
                lay[yout].fill_(float("nan"))
            step(lay, kind)
            torch.cuda.synchronize()
            out = lay[yout]
            errs.append(((out.float() - ref).abs().max().item(), bool(torch.isfinite(out).all()),
                         ref.abs().max().item()))
        (e_lib, _, scale), (e_new, fin, _) = errs
        bar = max(2 * e_lib, 2 * scale * 2.0 ** -10)
        good = fin and e_new <= bar
        ok &= good
        print(f"  {kind:8s} max |err| library {e_lib:.3e}, prototype {e_new:.3e} (bar {bar:.3e}) "
              f"{'ok' if good else 'WRONG'}")
    for k, v in saved.items():
        lay[k].copy_(v)
    return ok


def timed(fn, layers, replays) -> float:
    """us a layer: ``fn`` on every layer, captured in one CUDA graph under ``static_weights`` (programmatic launches,
    as the decode step), median of the replays (``_timing.time_calls``)."""
    with kernels.static_weights():
        return time_calls([functools.partial(fn, lay) for lay in layers], replays=replays, warmup=3) * 1e6


def chain(step, kinds):
    def run(lay):
        for kind in kinds:
            step(lay, kind)
    return run


def parse_parts(model: dict, text: str) -> dict:
    parts = {kind: p for kind, *_, p in model["kinds"]}
    for item in filter(None, text.split(",")):
        kind, _, p = item.partition("=")
        if kind not in parts or p not in ("2", "4", "8", "16"):
            raise SystemExit(f"--parts: {item!r} (kinds {', '.join(parts)}; P of 2, 4, 8, 16)")
        parts[kind] = int(p)
    return parts


def cpu_check() -> int:
    torch.manual_seed(0)
    fails = 0
    for m, k, dens, parts, pair in [(64, 64, 0.5, 2, False), (100, 512, 0.2, 4, False), (128, 4096, 0.2, 16, True),
                                    (96, 1000, 0.01, 8, False), (64, 64, 1.0, 16, False), (32, 64, 0.0, 4, False),
                                    (64, 2048, 0.05, 16, True), (256, 14336, 0.2, 16, False)]:
        w = (torch.randn(m, k) * (torch.rand(m, k) < dens)).half()
        enc = encode(w, parts, pair)
        same = torch.equal(decode(enc).view(torch.int16), w.view(torch.int16).masked_fill(w == 0, 0))
        fails += not same
        print(f"  {m}x{k} density {dens} P={parts} pair={pair}: {enc['entries']} entries, "
              f"{enc['padded']} with padding, round trip {'ok' if same else 'WRONG'}")
    for arch in ("sm_80", "sm_90"):
        res = compile_source(arch, use_cache=False).resources()
        for name, r in sorted(res.items()):
            if name.startswith("drp_"):
                bad = r["spill_stores"] or r["spill_loads"]
                fails += bool(bad)
                print(f"  {arch} {name}: {r['registers']} registers, {r['smem']} bytes static shared, "
                      f"spills {r['spill_stores']} / {r['spill_loads']}")
    print("fails", fails)
    return fails


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu-check", action="store_true", help="the encoder's round trip and the kernels' ptxas only")
    ap.add_argument("--model", default="llama-3-8b", choices=sorted(MODELS))
    ap.add_argument("--sparsity", type=float, default=0.8)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--parts", default="", help="P per kind, e.g. qkv=8,down=8 (defaults: MODELS)")
    ap.add_argument("--sweep", action="store_true", help="each kind alone at every P (2, 4, 8, 16)")
    ap.add_argument("--replays", type=int, default=30)
    ap.add_argument("--stage", type=int, default=0, choices=(0, 1, 2), help="X as fp32 (1) or 16-bit (2); 0: "
                    "fp32 where the grid fits one wave with it")
    a = ap.parse_args()
    global STAGE
    STAGE = a.stage
    if a.cpu_check:
        sys.exit(1 if cpu_check() else 0)
    model = MODELS[a.model]
    parts = parse_parts(model, a.parts)
    names = [kind for kind, *_ in model["kinds"]]
    gen = torch.Generator(device="cuda").manual_seed(0)
    layers = [build(model, a.sparsity, gen, parts) for _ in range(a.layers)]
    enc_bytes = sum(lay[k][1]["data"].numel() * 4 for lay in layers for k in names) / len(layers)
    lib_bytes = sum(lay[k][0].data.numel() * 4 for lay in layers for k in names) / len(layers)
    print(f"{a.model} layers at {a.sparsity:.0%}, fp16, N = 1, on {torch.cuda.get_device_name()}; parts {parts}; "
          f"bytes a layer: library {lib_bytes / 1e6:.1f} MB, prototype {enc_bytes / 1e6:.1f} MB")
    if not check(layers[0]):
        raise SystemExit("the prototype's outputs are wrong")
    for rnd in (1, 2):
        for kinds in [[k] for k in names] + [names]:
            t_lib = timed(chain(lib_step, kinds), layers, a.replays)
            t_new = timed(chain(proto_step, kinds), layers, a.replays)
            print(f"round {rnd}: {'+'.join(kinds):22s} library {t_lib:7.2f} us a layer, prototype {t_new:7.2f} "
                  f"({t_lib / t_new:.3f}x)")
    if a.sweep:
        for kind, m, k, epi, *_ in model["kinds"]:
            for p in (2, 4, 8, 16):
                if p == parts[kind]:
                    continue
                for lay in layers:
                    lay[kind] = (lay[kind][0], encode(lay[kind][0].to_dense(), p, epi == "norm_silu"))
                if not check(layers[0]):
                    print(f"  {kind} P={p}: WRONG, not timed")
                    continue
                t = timed(chain(proto_step, [kind]), layers, a.replays)
                print(f"sweep: {kind:8s} P={p:2d} prototype {t:7.2f} us a layer")


if __name__ == "__main__":
    main()

"""Randomized differential fuzzer of the public sparse matmul: finds silent wrong answers.

Each case draws, from its own seed, a weight (format, dtype, shape, density, pattern, magnitudes; DeltaRows' layouts:
split counts, the parts layout, ``auto_parts`` as the engine's relayout picks it, paired halves, coded values; built by
``from_dense``, ``concat`` or ``slice``), an input (tokens, ``[N, K]`` / ``[B, T, K]`` / transposed / strided /
misaligned), one of the public ops (:func:`flash_llm.spmm`, :class:`flash_llm.SparseLinear`, and
``flash_llm.ops.spmm_silu_mul`` / ``spmm_rms_norm`` / ``spmm_layer_norm`` / ``spmm_add_``) and some kernel switches,
runs it on ``--device`` and checks it against a float64 reference computed on the CPU from the dense weight:

* the tolerance is PyTorch's own error (``tests/test_kernels_gpu.py``'s ``check``: 2x the error of the same
  computation in the same dtype on the same device with ``torch.nn.functional.linear``, plus a few ulps of the output
  magnitude), taken row by row (a token's error against that token's magnitude) instead of over the whole output,
  plus, element by element, what fp32 accumulation in any order may lose where a sum cancels (``ACC_EPS``: next to
  nothing unless terms far larger than the sum cancel, as 6e4 / 1e30 values can; through SiLU x up such a gate's
  error is multiplied by its up);
* the reference rounds to the dtype where the op's documented computation does (the norm's output, the product before
  SiLU x up or before the residual add: ``flash_llm.reference``), so an overflow to Inf that the op is defined to
  produce is expected, and NaN / Inf elsewhere is a failure;
* ``w.to_dense()`` must equal the dense weight bit for bit (-0.0 read as +0.0); ``x``, the bias, the norm's tensors
  and the weight's arrays must be unchanged (compared bitwise, with the unused bytes around strided inputs
  NaN-poisoned so that a kernel reading past a view shows NaN); ``spmm_add_`` must return ``acc`` and write nothing
  outside it (NaN guards on both sides); on CUDA each output's block is NaN-filled in the caching allocator first;
* a drawn combination the API refuses (DeltaRows' K >= 65536, its parts layout with ``K % 8 != 0``, paired halves
  with ``M % 64 != 0``, SiLU x up of an odd ``M``) is *refused* when a ValueError / TypeError names the argument;
  any other exception, or a refusal that does not say why, is a failure.

Switches: ``FLASH_LLM_WGMMA`` is read at each call (``kernels.wgmma_ok``), so a case sets it in the environment.  The
other ``FLASH_LLM_*`` switches are read once, at import, into ``flash_llm.kernels`` attributes that the kernels'
dispatch reads at each call (and whose launch-plan cache is cleared when one is set: ``kernels._PLAN_SWITCHES``), so
a case sets those attributes, as the GPU tests and ``prefill_ab.py --settings`` do; ``SPLITS`` is
``FLASH_LLM_SPLITS`` for the case's M x K x N (``kernels.SPLIT_OVERRIDES``).  All are restored after each case.  On
the CPU the ops run their PyTorch reference and the switches change nothing (they are drawn all the same, so a seed
draws the same case on every device).

Every failure is printed and (``--out``) written to ``failures.jsonl`` with all its drawn parameters and the command
that reruns it (``--replay CASE_SEED``, with the run's ``--max-elems``, ``--formats`` and ``--ops``).  Exit status 1
if any case failed.

    python benchmarks/fuzz_spmm.py --seconds 300 --out /tmp/fuzz        # on a GPU machine
    python benchmarks/fuzz_spmm.py --replay 123456789 --device cuda     # one case again, verbosely
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import sys
import time
import traceback
import warnings
from types import SimpleNamespace

import torch
import torch.nn.functional as F

import flash_llm
from flash_llm import kernels, ops
from flash_llm.formats.delta_rows import auto_parts
from flash_llm.reference import layer_norm, rms_norm, silu_mul_halves

FORMATS = {"BitmapTiles": flash_llm.BitmapTiles, "TiledCSL": flash_llm.TiledCSL, "DeltaRows": flash_llm.DeltaRows}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
#: densities ("one": exactly one nonzero) and patterns of the nonzeros
DENSITIES = (0.0, "one", 0.005, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
PATTERNS = ("uniform", "empty_rows", "empty_cols", "dense_row", "blocks", "far")
#: the weight's values: randn; magnitude-pruned (|v| >= 0.5: few binades a row, so DeltaRows can code them); some
#: extreme (fp16 6e4, bf16 1e30) in the weight or in x; subnormal weights; rows scaled over many binades
MAGNITUDES = ("normal", "pruned", "extreme_w", "extreme_x", "subnormal_w", "row_scales")
BIG = {torch.float16: 6.0e4, torch.bfloat16: 1.0e30}
TOKENS = (1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 24, 31, 32, 33, 48, 63, 64, 65, 100, 127, 128, 129, 255, 256, 257, 512,
          1000, 2048)
#: layer shapes (M, K) of Llama-3-8B / Llama-2-7B / OPT
REALISTIC = ((4096, 4096), (14336, 4096), (4096, 14336), (1024, 4096), (6144, 4096), (11008, 4096), (4096, 11008),
             (7168, 7168))
X_LAYOUTS = ("contiguous", "batched", "transposed", "row_slice", "col_stride", "misaligned")
#: op name -> how often it is drawn
OP_WEIGHTS = {"spmm": 0.3, "linear": 0.1, "silu_mul": 0.15, "rms_norm": 0.15, "layer_norm": 0.12, "add_": 0.18}
#: the ulps of the output's magnitude (row by row) allowed above twice PyTorch's own error: one rounding of the
#: product (two for the residual add); SiLU x up and the fused norms round an intermediate the kernels may round
#: otherwise ("the same to rounding, not bit for bit"): 4 and 8, as ``tests/test_kernels_gpu.py`` allows them
ULPS = {"spmm": 2, "linear": 2, "add_": 2, "silu_mul": 4, "rms_norm": 8, "layer_norm": 8}
#: the fp32 accumulation's error a unit of ``sqrt(K) sum |x_i w_i|`` (two roundings of fp32; :func:`reference`)
ACC_EPS = 2.0**-23
#: the tensor cores flush fp32-subnormal products and sums (|x_i w_i| < 2^-126, only reachable from bf16 operands) to
#: zero: each term of a bf16 product may lose up to this much (session 77, H100: Tiled-CSL's ``_nt1a`` gave 0 for a sum
#: of 47 such products, -2.29e-38; cuBLAS kept it), allowed as ``FTZ_TINY (K + sum |x_i|)`` an element
FTZ_TINY = 2.0**-126
DR_LAYOUTS = ("default", "splits", "parts", "auto")
BUILDS = ("from_dense", "concat", "slice")
#: switch -> values a case may set (the defaults are the library's own); see the module docstring
SWITCHES = {
    "FLASH_LLM_WGMMA": ("0",), "SPLITS": (1, 2, 3, 7, 64),
    "TCSL_N1": (False,), "N1_MIN_TILES": (1, 4, 16), "NT_MIN_TILES": (1, 4, 16), "BITMAP_WG_MIN_N": (1, 9, 65),
    "TCSL_WG32_MIN_N": (1, 33), "NT_ATOMIC": (0, 2), "NT_ATOMIC_MIN_SPLITS": (0, 2), "N1_FUSED": (False,),
    "N1_EVEN": (False,), "WG_SPREAD": (False,), "DR_NT_ATOMIC": (False,), "DR_NT_ATOMIC_MIN_SPLITS": (0, 2),
    "DR_NT_NORM": (False,), "DELTA_MULTI_MAX": (1, 2, 3, 5), "DELTA_CHUNK_MAX": (0, 8, 32, 64),
    "DR_MMA_MIN": (1, 2, 9), "DR_MMA_TILE": (True,), "DR_MMA_XRING": (False,), "PARTS_STAGE": (1, 2),
    "DR_DENSE_ROWS": (False,), "DR_DENSE_SPLIT_ROWS": (False,), "DR_DENSE_NOFILL": (False,),
    "DR_DENSE_TILED": (True,), "DR_PLACE_SKIP": (False,), "DR_PLACE_RANGES": (True,), "DR_PLACE_AHEAD": (1, 2),
}
ENV_SWITCHES = ("FLASH_LLM_WGMMA",)
#: exception messages that mean the CUDA context is lost: no later case could run
FATAL = ("CUDA error", "illegal memory access", "device-side assert", "misaligned address")


# ---- drawing a case ----------------------------------------------------------------------------------------------
def _dim(r: random.Random) -> int:
    """One of M, K: tiny, small and odd, or medium and often off a multiple of 8 / 16 / 64."""
    kind = r.choices(("tiny", "odd", "medium"), (0.2, 0.4, 0.4))[0]
    if kind == "tiny":
        return r.randint(1, 8)
    if kind == "odd":
        return r.randint(9, 300)
    return max(1, r.choice((64, 128, 256, 512, 1024, 2048)) * r.randint(1, 3) + r.choice((0, 0, -1, 1, 7, -8, 33)))


def draw_case(seed: int, max_elems: int, formats=tuple(FORMATS), op_names=tuple(OP_WEIGHTS), **fixed) -> dict:
    """Every parameter of case ``seed`` as a JSON-able dict (the case is a function of its seed, ``max_elems``,
    ``formats`` and ``op_names`` alone).  Sizes: ``M K``, ``N K`` and ``N M`` at most ``max_elems``, ``N M K`` at most
    ``64 max_elems`` (the float64 CPU reference's multiply-adds).  ``fixed`` names parameters to take as given instead
    of drawing them (the tests pin format, op and dtype this way); the draws after them follow from them."""
    r = random.Random(seed)

    def pick(name, choices, weights=None):
        return fixed[name] if name in fixed else r.choices(choices, weights)[0]

    c = {"seed": seed, "max_elems": max_elems}
    c["format"] = pick("format", list(formats))
    c["dtype"] = pick("dtype", list(DTYPES))
    c["op"] = pick("op", list(op_names), [OP_WEIGHTS[o] for o in op_names])
    dr = c["format"] == "DeltaRows"
    act = None
    if c["op"] == "rms_norm":
        act = "silu_mul" if r.random() < 0.35 else None
    elif c["op"] == "layer_norm":
        act = r.choice((None, "relu"))
    c["act"] = pick("act", [act])
    silu = c["op"] == "silu_mul" or c["act"] == "silu_mul"
    c["build"] = pick("build", list(BUILDS), (0.8, 0.1, 0.1))
    c["paired"] = pick("paired", [dr and c["build"] != "slice" and r.random() < (0.5 if silu else 0.1)])
    if dr and c["build"] != "from_dense":  # (concat and slice go through the encoder's defaults)
        c["dr_layout"] = pick("dr_layout", ["default"])
    else:
        c["dr_layout"] = pick("dr_layout", list(DR_LAYOUTS) if dr else [None], (0.3, 0.25, 0.3, 0.15) if dr else None)
    c["splits"] = pick("splits", [(1, 2, 3, 5, 8, 16, 33)[r.randrange(7)] if c["dr_layout"] == "splits" else None])
    c["parts"] = pick("parts", [(1, 2, 4, 8, 16)[r.randrange(5)] if c["dr_layout"] == "parts" else None])
    c["normed"] = pick("normed", [r.random() < 0.5 if c["dr_layout"] == "auto" else None])
    for _ in range(100):
        shape = r.choices(("any", "square", "realistic", "wide"), (0.62, 0.2, 0.15, 0.03))[0]
        if shape == "realistic":
            m, k = r.choice(REALISTIC)
        elif shape == "wide":  # DeltaRows' 16-bit columns: K = 65535 is the last it takes
            m, k = r.randint(1, 64), r.choice((65535, 65536, 65537))
        else:
            m = _dim(r)
            k = m if shape == "square" else _dim(r)
        if silu and m % 2 and r.random() < 0.9:  # (an odd M now and then: the refusal)
            m += 1
        if c["paired"] and m % 64 and r.random() < 0.85:  # (else the refusal)
            m = -(-m // 64) * 64
        if (c["parts"] or 1) > 1 and k % 8 and r.random() < 0.85:  # (else the refusal)
            k = -(-k // 8) * 8
        if m * k <= max_elems:
            break
    else:
        m, k = 64, 64
    c["m"], c["k"] = pick("m", [m]), pick("k", [k])
    m, k = c["m"], c["k"]
    ns = [n for n in TOKENS if n * k <= max_elems and n * m <= max_elems and n * m * k <= 64 * max_elems] or [1]
    c["n"] = pick("n", ns)
    c["density"] = pick("density", list(DENSITIES))
    c["pattern"] = pick("pattern", ["uniform"] if c["density"] == "one" else list(PATTERNS))
    c["magnitude"] = pick("magnitude", list(MAGNITUDES))
    c["neg_zero"] = pick("neg_zero", [r.random() < 0.3])
    c["coded"] = pick("coded", [dr and r.random() < (0.5 if c["dtype"] == "bfloat16" else 0.1)])
    c["x_layout"] = pick("x_layout", list(X_LAYOUTS))
    n = c["n"]
    c["batch"] = pick("batch", [r.choice([b for b in range(1, n + 1) if n % b == 0]) if c["x_layout"] == "batched"
                                else None])
    c["x_offset"] = pick("x_offset", [r.choice((0.0, 0.0, 4.0, 64.0)) if c["op"] in ("rms_norm", "layer_norm")
                                      else 0.0])
    c["bias"] = pick("bias", [c["op"] in ("spmm", "linear", "add_", "layer_norm") and r.random() < 0.5])
    c["bias_layout"] = pick("bias_layout", [r.choice(("contiguous", "strided")) if c["bias"] else None])
    norm = c["op"] in ("rms_norm", "layer_norm")
    c["eps"] = pick("eps", [r.choice((1e-6, 1e-5, 1e-3)) if norm else None])
    c["norm_layout"] = pick("norm_layout", [r.choice(("contiguous", "strided", "misaligned")) if norm else None])
    c["ln_bias"] = pick("ln_bias", [c["op"] == "layer_norm" and r.random() < 0.7])
    c["alias"] = pick("alias", [c["op"] == "add_" and m == k and c["x_layout"] in ("contiguous", "batched")
                                and r.random() < 0.3])
    c["slice_at"] = pick("slice_at", [_slice_at(r, c) if c["build"] == "slice" else None])
    chosen = {}
    if r.random() < 0.5:
        for name in r.sample(sorted(SWITCHES), r.randint(1, 3)):
            chosen[name] = r.choice(SWITCHES[name])
    c["switches"] = pick("switches", [chosen])
    return c


def _slice_at(r: random.Random, c: dict) -> list[int]:
    """``[rows before, rows after, columns before, columns after]`` of the larger weight a slice is cut from: on the
    format's record boundaries (the record gather) or off them (through the dense weight)."""
    tr = FORMATS[c["format"]].TILE_ROWS
    return [r.choice((0, tr, r.randint(1, 20))), r.choice((0, tr, r.randint(1, 20))),
            r.choice((0, 64, r.randint(1, 70))), r.choice((0, 64, r.randint(1, 70)))]


def expected_refusals(c: dict) -> list[tuple[str, str]]:
    """``(stage, word)``: where the API may refuse this case ("build" or "op") and a word its message must hold."""
    out = []
    if c["format"] == "DeltaRows":
        if c["k"] + (sum(c["slice_at"][2:]) if c["build"] == "slice" else 0) >= 1 << 16:  # (the weight encoded)
            out.append(("build", "K"))
        if (c["parts"] or 1) > 1 and c["k"] % 8:
            out.append(("build", "parts"))
        if c["paired"] and c["m"] % 64:
            out.append(("build", "pair_halves"))
    if (c["op"] == "silu_mul" or c["act"] == "silu_mul") and c["m"] % 2:
        out.append(("op", "even"))
    return out


# ---- building the inputs -------------------------------------------------------------------------------------------
def dense_weight(c: dict, g: torch.Generator) -> torch.Tensor:
    """The case's dense ``[M, K]`` weight on the CPU: its nonzeros where the density and pattern put them (exactly),
    -0.0 at some zeros when ``neg_zero``."""
    m, k, dtype = c["m"], c["k"], DTYPES[c["dtype"]]
    d = c["density"]
    if d == "one":
        mask = torch.zeros(m * k, dtype=torch.bool)
        mask[int(torch.randint(m * k, (1,), generator=g))] = True
        mask = mask.view(m, k)
    else:
        mask = torch.rand(m, k, generator=g) < d
    p = c["pattern"]
    if p == "empty_rows":
        mask &= ~(torch.rand(m, 1, generator=g) < 0.3)
    elif p == "empty_cols":
        mask &= ~(torch.rand(1, k, generator=g) < 0.3)
    elif p == "dense_row":
        mask[int(torch.randint(m, (1,), generator=g))] = True
    elif p == "blocks":  # whole blocks of 16 / 32 / 48 / 64 set
        b = (16, 32, 48, 64)[int(torch.randint(4, (1,), generator=g))]
        coarse = torch.rand(-(-m // b), -(-k // b), generator=g) < 0.3
        mask |= coarse.repeat_interleave(b, 0).repeat_interleave(b, 1)[:m, :k]
    elif p == "far":  # each row's nonzeros in 256 columns at one end of K: DeltaRows' widest windows
        cols = torch.arange(k)
        left = (torch.arange(m) % 2 == 0)[:, None]
        mask &= torch.where(left, cols < 256, cols >= k - 256)
    v = torch.randn(m, k, generator=g)
    mag = c["magnitude"]
    if mag == "pruned":
        v = torch.sign(v) * (0.5 + v.abs())
    elif mag == "extreme_w":
        v = torch.where(torch.rand(m, k, generator=g) < 0.02, torch.sign(v) * BIG[dtype], v)
    elif mag == "subnormal_w":  # fp16: multiples of 2^-24 below 2^-14; bf16: of 2^-133 below 2^-126
        step, top = (2.0**-24, 1023) if dtype == torch.float16 else (2.0**-133, 127)
        v = torch.sign(v) * torch.randint(1, top + 1, (m, k), generator=g).double() * step
    elif mag == "row_scales":
        lo, hi = (-14, 4) if dtype == torch.float16 else (-60, 60)
        v = v.double() * torch.exp2(torch.randint(lo, hi + 1, (m, 1), generator=g).double())
    v = v.to(dtype)
    v = torch.where(v == 0, torch.full((), torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps,
                                       dtype=dtype), v)
    zero = torch.zeros((), dtype=dtype)
    if c["neg_zero"]:
        zero = torch.where(torch.rand(m, k, generator=g) < 0.5, -zero, zero)
    return torch.where(mask, v, zero)


def activations(c: dict, g: torch.Generator) -> torch.Tensor:
    """The case's input ``[N, K]`` on the CPU (normal, shifted by ``x_offset``; some extreme values for
    ``extreme_x``)."""
    dtype = DTYPES[c["dtype"]]
    x = torch.randn(c["n"], c["k"], generator=g) + c["x_offset"]
    if c["magnitude"] == "extreme_x":
        x = torch.where(torch.rand(x.shape, generator=g) < 0.01, torch.sign(x) * BIG[dtype], x)
    return x.to(dtype)


def place(t: torch.Tensor, layout: str, device: torch.device, batch: int | None = None):
    """``(view, base)``: ``t`` on ``device`` laid out as ``layout`` (a view of ``base``, the whole storage, whose
    bytes outside the view are NaN)."""
    if layout in ("contiguous", "batched"):
        base = t.to(device, copy=True)
        return (base.view(batch, -1, t.shape[-1]) if layout == "batched" else base), base
    if layout == "transposed":
        base = t.t().contiguous().to(device)
        return base.t(), base
    if layout == "misaligned":  # contiguous, starting 2 bytes past the allocation (not on 16 bytes)
        base = torch.full((t.numel() + 1,), math.nan, dtype=t.dtype, device=device)
        view = base[1:].view(t.shape)
    elif layout == "strided":  # a 1-D tensor's every other element
        base = torch.full((2 * t.numel(),), math.nan, dtype=t.dtype, device=device)
        view = base[::2]
    elif layout == "row_slice":  # every other row, from column 3 of wider rows
        base = torch.full((2 * t.shape[0], t.shape[1] + 5), math.nan, dtype=t.dtype, device=device)
        view = base[::2, 3:3 + t.shape[1]]
    elif layout == "col_stride":
        base = torch.full((t.shape[0], 2 * t.shape[1]), math.nan, dtype=t.dtype, device=device)
        view = base[:, ::2]
    else:
        raise ValueError(f"unknown layout {layout!r}")
    view.copy_(t)
    return view, base


def build_weight(c: dict, dense: torch.Tensor, device: torch.device, g: torch.Generator):
    """The compressed weight of ``dense`` (moved to ``device``) as the case builds it."""
    cls = FORMATS[c["format"]]
    w = dense.to(device)
    opts = {}
    if c["format"] == "DeltaRows":
        opts = {"pair_halves": c["paired"], "splits": c["splits"], "parts": c["parts"]}
        if c["dr_layout"] == "auto":  # as the engine's relayout chooses
            nnz = int(((dense.view(torch.int16) & 0x7FFF) != 0).sum())
            opts["parts"] = auto_parts(c["m"], c["k"], nnz, device, normed=c["normed"])
    if c["build"] == "concat":  # two halves (a paired DeltaRows weight: its gate and up)
        cut = c["m"] // 2 if c["paired"] else int(torch.randint(c["m"] + 1, (1,), generator=g))
        pieces = [cls.from_dense(p) for p in (w[:cut], w[cut:]) if p.shape[0]]
        sw = cls.concat(pieces, pair_halves=c["paired"])
    elif c["build"] == "slice":
        r0, r1, c0, c1 = c["slice_at"]
        big = torch.randn(c["m"] + r0 + r1, c["k"] + c0 + c1, generator=g).to(dense.dtype).to(device)
        big[r0:r0 + c["m"], c0:c0 + c["k"]] = w
        sw = cls.from_dense(big, **opts).slice((r0, r0 + c["m"]), (c0, c0 + c["k"]))
    else:
        sw = cls.from_dense(w, **opts)
    if c["coded"]:
        sw = sw.code_values() or sw  # (None: not bf16, or a row's exponents span too much; kept plain)
    return sw


def make_inputs(c: dict, device: torch.device) -> tuple[SimpleNamespace, SimpleNamespace]:
    """``(cpu, dev)``: the case's dense weight and tensors on the CPU (contiguous), and the op's arguments on
    ``device`` (``w`` compressed; ``bases``: every storage an input view lives in, to compare afterwards)."""
    g = torch.Generator().manual_seed(c["seed"])
    dtype = DTYPES[c["dtype"]]
    m, k, n = c["m"], c["k"], c["n"]
    cpu = SimpleNamespace(dense=dense_weight(c, g), x=activations(c, g), bias=None, norm_weight=None, ln_bias=None,
                          acc=None)
    if c["bias"]:
        cpu.bias = torch.randn(m, generator=g).to(dtype)
    if c["op"] in ("rms_norm", "layer_norm"):
        cpu.norm_weight = (1 + 0.5 * torch.randn(k, generator=g)).to(dtype)
    if c["ln_bias"]:
        cpu.ln_bias = torch.randn(k, generator=g).to(dtype)
    lead = (c["batch"], n // c["batch"]) if c["x_layout"] == "batched" else (n,)
    if c["op"] == "add_":
        cpu.acc = cpu.x.view(*lead, k).clone() if c["alias"] else torch.randn(*lead, m, generator=g).to(dtype)
    dev = SimpleNamespace(bases={}, act=c["act"], eps=c["eps"])
    dev.x, dev.bases["x"] = place(cpu.x, c["x_layout"], device, c["batch"])
    dev.bias, dev.norm_weight, dev.ln_bias = None, None, None
    if cpu.bias is not None:
        dev.bias, dev.bases["bias"] = place(cpu.bias, c["bias_layout"], device)
    if cpu.norm_weight is not None:
        dev.norm_weight, dev.bases["norm_weight"] = place(cpu.norm_weight, c["norm_layout"], device)
    if cpu.ln_bias is not None:
        dev.ln_bias, dev.bases["ln_bias"] = place(cpu.ln_bias, c["norm_layout"], device)
    if cpu.acc is not None:  # acc between two NaN guards of 64 elements
        if c["alias"]:
            dev.acc, dev.guarded = dev.x, dev.bases.pop("x")
        else:
            dev.guarded = torch.full((cpu.acc.numel() + 128,), math.nan, dtype=dtype, device=device)
            dev.acc = dev.guarded[64:64 + cpu.acc.numel()].view(cpu.acc.shape)
            dev.acc.copy_(cpu.acc)
    dev.g = g
    return cpu, dev


# ---- the ops under test ------------------------------------------------------------------------------------------
def _op_add(a):
    """``spmm_add_``, which must return ``acc`` itself."""
    ret = ops.spmm_add_(a.acc, a.x, a.w, a.bias)
    if ret is not a.acc:
        raise AssertionError("spmm_add_ did not return acc")
    return a.acc


#: op name -> the call under test (the tests swap an entry for a wrong one to see the harness fail)
OPS = {
    "spmm": lambda a: flash_llm.spmm(a.x, a.w, a.bias),
    "linear": lambda a: flash_llm.SparseLinear(a.w, a.bias)(a.x),
    "silu_mul": lambda a: ops.spmm_silu_mul(a.x, a.w),
    "rms_norm": lambda a: ops.spmm_rms_norm(a.x, a.norm_weight, a.eps, a.w, act=a.act),
    "layer_norm": lambda a: ops.spmm_layer_norm(a.x, a.norm_weight, a.ln_bias, a.eps, a.w, a.bias, act=a.act),
    "add_": _op_add,
}


def torch_version(c: dict, a: SimpleNamespace, dense: torch.Tensor) -> torch.Tensor:
    """The case's computation by PyTorch in the dtype on the device (``F.linear`` of the dense weight ``dense``)."""
    x = a.x
    if c["op"] == "rms_norm":
        x = rms_norm(x, a.norm_weight, c["eps"])
    elif c["op"] == "layer_norm":
        x = layer_norm(x, a.norm_weight, a.ln_bias, c["eps"])
    y = F.linear(x, dense, a.bias)
    if c["op"] == "silu_mul" or c["act"] == "silu_mul":
        y = silu_mul_halves(y)
    elif c["act"] == "relu":
        y = torch.relu(y)
    elif c["op"] == "add_":
        y = a.acc + y
    return y


def _row_max(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Each row's largest ``|t|`` over the elements that round to a finite ``dtype`` value (0 where none does)."""
    if not t.shape[1]:
        return torch.zeros(t.shape[0], dtype=torch.float64)
    return torch.where(t.to(dtype).isfinite(), t.abs(), torch.zeros((), dtype=t.dtype)).amax(1)


def reference(c: dict, cpu: SimpleNamespace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(want, scale, slack)``: the case's result in float64 on the CPU ``[rows, cols]`` (tokens by outputs), rounded
    to the dtype where the op's documented computation rounds except at its last step; each row's magnitude (the
    largest of the result's and, for the residual add, the product's, over the elements finite in the dtype); and each
    element's share of the fp32 accumulation's error where its sum cancels (:data:`ACC_EPS` ``sqrt(K) sum |x_i w_i|``,
    through SiLU x up by its derivative: an order-dependent error no fp32 kernel avoids, negligible elsewhere)."""
    dtype = DTYPES[c["dtype"]]
    x = cpu.x.double()
    if c["op"] == "rms_norm":  # transformers' LlamaRMSNorm: normalize, round, scale by the weight, round
        h = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c["eps"])).to(dtype).double()
        x = (cpu.norm_weight.double() * h).to(dtype).double()
    elif c["op"] == "layer_norm":
        lb = None if cpu.ln_bias is None else cpu.ln_bias.double()
        x = F.layer_norm(x, (c["k"],), cpu.norm_weight.double(), lb, c["eps"]).to(dtype).double()
    w = cpu.dense.double()
    y, slack = x @ w.t(), x.abs() @ w.abs().t()
    if cpu.bias is not None:
        y += cpu.bias.double()
        slack += cpu.bias.double().abs()
    slack *= ACC_EPS * math.sqrt(c["k"])
    if dtype == torch.bfloat16:  # (fp16 operands' products are fp32 normals: nothing to flush)
        slack += FTZ_TINY * (c["k"] + x.abs().sum(-1, keepdim=True))
    scale = _row_max(y, dtype)
    if c["op"] == "silu_mul" or c["act"] == "silu_mul":
        gate, up = y.to(dtype).double().chunk(2, dim=-1)
        s_gate, s_up = slack.chunk(2, dim=-1)
        sig = torch.sigmoid(gate)
        y = F.silu(gate) * up
        slack = (sig * (1 + gate * (1 - sig))).abs() * up.abs() * s_gate + F.silu(gate).abs() * s_up
        scale = _row_max(y, dtype)
    elif c["act"] == "relu":
        y = y.clamp_min(0)
    elif c["op"] == "add_":
        # a product within ULPS of the range's edge may round either way before the add: its sum is judged by sign
        # only (infinite slack; :func:`compare` then takes the largest finite value of that sign too)
        fi = torch.finfo(dtype)
        yr = y.to(dtype).double()
        slack = torch.where(yr.isinf() & (y.abs() <= fi.max * (1 + ULPS["add_"] * fi.eps)), math.inf, slack)
        y = cpu.acc.reshape(-1, c["m"]).double() + yr
        scale = torch.maximum(scale, _row_max(y, dtype))
    return y, scale, slack


def compare(got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor, slack: torch.Tensor, theirs: torch.Tensor,
            dtype: torch.dtype, ulps: int) -> str | None:
    """Why ``got`` (the op's result) is wrong, or None.  ``want`` (float64 ``[rows, cols]``), ``scale`` (each row's
    magnitude) and ``slack`` (each element's cancellation allowance) from :func:`reference`; ``theirs``: PyTorch's
    result in the dtype.  Where the reference rounds to a finite value, and PyTorch's is finite, ``got`` must be
    finite and within ``2 |theirs - want| + ulps * eps * scale + ulps`` subnormal steps (maxima over the row) ``+
    slack``; where the reference overflows and PyTorch's too, ``got`` must be NaN or Inf (an Inf of the reference's
    sign, where PyTorch's Inf has it too: PyTorch's own SiLU x up of overflowed halves can disagree with the reference
    there, session 77); a finite output of the dtype's largest magnitude, of the reference's sign, passes where the
    reference overflows by no more than ``ulps`` of it, or where its slack is infinite (a residual add's product at
    the edge: rounding at the edge of the range, as a fp32 sum a few ulps below the reference's rounds back into
    range); the rest at the edge of the range is not judged."""
    rows, cols = want.shape
    o = got.detach().cpu().double().reshape(rows, cols)
    t = theirs.detach().cpu().double().reshape(rows, cols)
    w_d = want.to(dtype).double()
    fin_o, fin_w, fin_t = o.isfinite(), w_d.isfinite(), t.isfinite()
    nonfinite = ~fin_o & fin_w & fin_t
    if nonfinite.any():
        r, col = nonfinite.nonzero()[0].tolist()
        return (f"{int(nonfinite.sum())} NaN / Inf outputs where the reference and PyTorch are finite; first "
                f"[{r}, {col}]: got {o[r, col].item()}, want {want[r, col].item():.6g}")
    fi = torch.finfo(dtype)
    edge = (o.abs() == fi.max) & (o.sign() == want.sign()) & (
        (want.abs() <= fi.max * (1 + ulps * fi.eps)) | slack.isinf())
    finite = fin_o & ~fin_w & ~fin_t & ~edge
    wrong_inf = o.isinf() & w_d.isinf() & (o.sign() != w_d.sign()) & (t.sign() == w_d.sign())
    if (finite | wrong_inf).any():
        r, col = (finite | wrong_inf).nonzero()[0].tolist()
        return (f"{int(finite.sum())} finite outputs where the reference overflows, {int(wrong_inf.sum())} Infs of "
                f"the wrong sign; first [{r}, {col}]: got {o[r, col].item()}, want {w_d[r, col].item()}")
    both = fin_o & fin_w & fin_t
    zero = torch.zeros((), dtype=torch.float64)
    err = torch.where(both, (o - want).abs(), zero)
    err_t = torch.where(both, (t - want).abs(), zero).amax(1) if cols else torch.zeros(rows, dtype=torch.float64)
    tol = 2 * err_t + ulps * fi.eps * scale + ulps * fi.smallest_normal * fi.eps
    over = err - tol[:, None] - slack
    bad = (over > 0).any(1) if cols else torch.zeros(rows, dtype=torch.bool)
    if bad.any():
        r, col = divmod(int(over.argmax()), cols)
        tiny = " (every such row of subnormal magnitude: flushed to zero?)" if bool(
            (scale[bad] < fi.smallest_normal).all()) else ""
        return (f"{int(bad.sum())} of {rows} rows out of tolerance{tiny}; worst [{r}, {col}]: error "
                f"{err[r, col].item():.4g} > tolerance {tol[r].item():.4g} + {slack[r, col].item():.3g} (PyTorch's "
                f"error {err_t[r].item():.4g}, row magnitude {scale[r].item():.4g}): got {o[r, col].item():.6g}, want "
                f"{want[r, col].item():.6g}, PyTorch {t[r, col].item():.6g}")
    return None


# ---- running a case ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def switched(c: dict):
    """The case's switches set (environment or ``flash_llm.kernels`` attributes), restored on the way out."""
    saved_env, saved_attr = {}, {}
    try:
        for name, value in c["switches"].items():
            if name in ENV_SWITCHES:
                saved_env[name] = os.environ.get(name)
                os.environ[name] = value
            elif name == "SPLITS":
                saved_attr["SPLIT_OVERRIDES"] = kernels.SPLIT_OVERRIDES
                kernels.SPLIT_OVERRIDES = {**kernels.SPLIT_OVERRIDES, (c["m"], c["k"], c["n"]): value}
            else:
                saved_attr[name] = getattr(kernels, name)
                setattr(kernels, name, value)  # (a launch-plan switch clears the plan cache: kernels._PLAN_SWITCHES)
        yield
    finally:
        for name, value in saved_attr.items():
            setattr(kernels, name, value)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _bits(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t``'s bytes (NaN-safe bitwise comparisons)."""
    return t.detach().reshape(-1).view(torch.uint8).clone() if t.numel() else t.detach().clone()


def _poison_next_output(numel: int, dtype: torch.dtype, device: torch.device) -> None:
    """On CUDA, a NaN block of ``numel`` elements handed back to the caching allocator, so that the op's output
    (which it will likely be given) shows NaN wherever a kernel does not write it."""
    if device.type == "cuda" and numel:
        torch.full((numel,), math.nan, dtype=dtype, device=device)


def _refusal(c: dict, stage: str, e: Exception) -> str | None:
    """The refusal ``e`` stands for (a ValueError / TypeError at ``stage`` whose message holds the word the case's
    refusal must name), or None (a failure)."""
    msg = str(e)
    if not isinstance(e, (ValueError, TypeError)) or not msg.strip():
        return None
    for where, word in expected_refusals(c):
        if where == stage and word in msg:
            return f"{type(e).__name__}: {msg}"
    return None


def run_case(c: dict, device: torch.device) -> dict:
    """Run case ``c`` on ``device``: ``{"status": "ok" | "refused" | "fail", "message": ..., "seconds": ...}``."""
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            status, message = _run(c, device, lambda s: None)
    except Exception as e:  # noqa: BLE001  (every exception is either a refusal or a failure)
        status, message = _classify(c, e)
    return {"status": status, "message": message, "seconds": time.perf_counter() - t0}


def _classify(c: dict, e: Exception) -> tuple[str, str]:
    """``("refused", why)`` or ``("fail", what)`` for an exception out of a case (its stage in ``e.fuzz_stage``,
    set by :func:`_staged`; none: the checks)."""
    stage = getattr(e, "fuzz_stage", "check")
    why = _refusal(c, stage, e)
    if why is not None:
        return "refused", why
    tb = "".join(traceback.format_exception(type(e), e, e.__traceback__, limit=-4))
    return "fail", f"{type(e).__name__} at {stage}: {e!s:.600}\n{tb}"


def _staged(stage: str, fn):
    """``fn()``, an exception out of it tagged with ``stage`` (``build`` / ``op``) for :func:`_classify`."""
    try:
        return fn()
    except Exception as e:
        e.fuzz_stage = stage
        raise


def _run(c: dict, device: torch.device, log) -> tuple[str, str | None]:
    """The body of :func:`run_case`: ``(status, message)``; exceptions go to the caller."""
    dtype = DTYPES[c["dtype"]]
    cpu, a = make_inputs(c, device)
    a.w = _staged("build", lambda: build_weight(c, cpu.dense, device, a.g))
    log(f"built {a.w!r}" + (f" (splits {a.w.splits}, parts {a.w.parts}, paired {a.w.paired}, coded {a.w.coded})"
                             if c["format"] == "DeltaRows" else ""))
    decoded = a.w.to_dense().cpu()
    bits = cpu.dense.view(torch.int16)
    want_bits = torch.where((bits & 0x7FFF) == 0, torch.zeros((), dtype=torch.int16), bits)  # (-0.0 decodes as +0.0)
    if decoded.shape != cpu.dense.shape or not torch.equal(decoded.view(torch.int16), want_bits):
        diff = int((decoded.view(torch.int16) != want_bits).sum()) if decoded.shape == cpu.dense.shape else "all"
        return "fail", f"to_dense differs from the dense weight ({diff} elements)"
    refusing = [word for stage, word in expected_refusals(c) if stage == "op"]
    if refusing:  # (no result to check: the op must refuse, naming why)
        _staged("op", lambda: OPS[c["op"]](a))
        return "fail", f"the op took the case; want a ValueError / TypeError saying {refusing[0]!r}"
    dense_dev = cpu.dense.to(device)
    inputs = {**{n: (t, _bits(t)) for n, t in a.bases.items()},
              **{f"w.{n}": (t, _bits(t)) for n, t in a.w.tensors().items()}}
    guards_before = None
    if c["op"] == "add_":
        if not c["alias"]:
            guards_before = _bits(torch.cat([a.guarded[:64], a.guarded[-64:]]))
        theirs = torch_version(c, SimpleNamespace(x=a.x.clone(), bias=a.bias, norm_weight=a.norm_weight,
                                                  ln_bias=a.ln_bias, acc=a.acc.clone()), dense_dev)
    else:
        theirs = torch_version(c, a, dense_dev)
    cols = c["m"] // 2 if c["op"] == "silu_mul" or c["act"] == "silu_mul" else c["m"]
    _poison_next_output(c["n"] * cols, dtype, device)
    with switched(c):
        got = _staged("op", lambda: OPS[c["op"]](a))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    problems = []
    lead = tuple(a.x.shape[:-1])
    if tuple(got.shape) != (*lead, cols) or got.dtype != dtype or got.device != a.x.device:
        problems.append(f"result is {got.dtype} {tuple(got.shape)} on {got.device}; want {dtype} {(*lead, cols)} "
                        f"on {a.x.device}")
    for name, (t, before) in inputs.items():
        if not torch.equal(_bits(t), before):
            problems.append(f"input {name} was modified")
    if guards_before is not None and not torch.equal(_bits(torch.cat([a.guarded[:64], a.guarded[-64:]])),
                                                     guards_before):
        problems.append("spmm_add_ wrote outside acc")
    if not problems:
        want, scale, slack = reference(c, cpu)
        why = compare(got, want, scale, slack, theirs, dtype, ULPS[c["op"]])
        if why:
            problems.append(why)
    return ("fail", "; ".join(problems)) if problems else ("ok", None)


# ---- the driver --------------------------------------------------------------------------------------------------
def describe(c: dict) -> str:
    """One line naming a case."""
    extra = ""
    if c["format"] == "DeltaRows":
        extra = (f" {c['dr_layout']}" + (f" splits={c['splits']}" if c["splits"] else "")
                 + (f" parts={c['parts']}" if c["parts"] else "") + (" paired" if c["paired"] else "")
                 + (" coded" if c["coded"] else ""))
    return (f"seed {c['seed']}: {c['op']}{'/' + c['act'] if c['act'] else ''} {c['format']}{extra} {c['dtype']} "
            f"{c['m']}x{c['k']} N={c['n']} density={c['density']} {c['pattern']} {c['magnitude']} x={c['x_layout']} "
            f"build={c['build']}{' bias' if c['bias'] else ''}{' alias' if c['alias'] else ''}"
            f"{' ' + json.dumps(c['switches']) if c['switches'] else ''}")


def replay_command(c: dict, args) -> str:
    """The command line that reruns case ``c`` alone."""
    cmd = f"python benchmarks/fuzz_spmm.py --replay {c['seed']} --max-elems {c['max_elems']} --device {args.device}"
    if args.formats != ",".join(FORMATS):
        cmd += f" --formats {args.formats}"
    if args.ops != ",".join(OP_WEIGHTS):
        cmd += f" --ops {args.ops}"
    return cmd


def table(results: list[tuple[dict, dict]]) -> str:
    """Cases, failures and refusals per format and dtype, and per op; the slowest case (markdown)."""
    lines = ["| format | dtype | cases | ok | failures | refused |", "|---|---|---:|---:|---:|---:|"]
    for f in FORMATS:
        for d in DTYPES:
            rs = [res["status"] for c, res in results if c["format"] == f and c["dtype"] == d]
            if rs:
                lines.append(f"| {f} | {d} | {len(rs)} | {rs.count('ok')} | {rs.count('fail')} | "
                             f"{rs.count('refused')} |")
    lines += ["", "| op | cases | ok | failures | refused |", "|---|---:|---:|---:|---:|"]
    for o in OP_WEIGHTS:
        rs = [res["status"] for c, res in results if c["op"] == o]
        if rs:
            lines.append(f"| {o} | {len(rs)} | {rs.count('ok')} | {rs.count('fail')} | {rs.count('refused')} |")
    if results:
        c, res = max(results, key=lambda cr: cr[1]["seconds"])
        lines += ["", f"slowest case: {res['seconds']:.2f} s, {describe(c)}"]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=120, help="how long to draw cases (default 120)")
    p.add_argument("--seed", type=int, default=None, help="the run's seed (default: a fresh one, printed)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="a directory for failures.jsonl and summary.md")
    p.add_argument("--max-elems", type=int, default=None,
                   help="bound on M*K, N*K and N*M (N*M*K at most 64x it); default 2^26 on CUDA, 2^24 on the CPU")
    p.add_argument("--formats", default=",".join(FORMATS), help="formats to draw from (comma-separated)")
    p.add_argument("--ops", default=",".join(OP_WEIGHTS), help="ops to draw from (comma-separated)")
    p.add_argument("--replay", type=int, default=None, metavar="CASE_SEED", help="run this one case, verbosely")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    max_elems = args.max_elems or (1 << 26 if device.type == "cuda" else 1 << 24)
    formats, op_names = args.formats.split(","), args.ops.split(",")
    for name, given, known in (("--formats", formats, FORMATS), ("--ops", op_names, OP_WEIGHTS)):
        if not given or any(v not in known for v in given):
            p.error(f"{name} takes names from {', '.join(known)}; got {','.join(given)}")
    if args.replay is not None:
        c = draw_case(args.replay, max_elems, formats, op_names)
        print(json.dumps(c, indent=1))
        print(describe(c))
        t0 = time.perf_counter()
        try:
            status, message = _run(c, device, print)
        except Exception as e:  # noqa: BLE001
            status, message = _classify(c, e)
        print(f"{status} in {time.perf_counter() - t0:.2f} s" + (f": {message}" if message else ""))
        return int(status == "fail")
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(6), "little")
    print(f"fuzz_spmm: seed {seed}, device {device}, {args.seconds:g} s, max-elems {max_elems}, torch "
          f"{torch.__version__}", flush=True)
    master = random.Random(seed)
    out = None
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        out = open(os.path.join(args.out, "failures.jsonl"), "w")
    results: list[tuple[dict, dict]] = []
    start = last = time.perf_counter()
    stopped = None
    try:
        while time.perf_counter() - start < args.seconds:
            c = draw_case(master.getrandbits(48), max_elems, formats, op_names)
            res = run_case(c, device)
            results.append((c, res))
            if res["status"] == "fail":
                rec = {"case": c, "message": res["message"], "seconds": res["seconds"],
                       "replay": replay_command(c, args)}
                print(f"FAIL {describe(c)}\n  {res['message']}\n  replay: {rec['replay']}", flush=True)
                if out:
                    out.write(json.dumps(rec) + "\n")
                    out.flush()
                if any(s in res["message"] for s in FATAL):
                    stopped = "the CUDA context is lost (see the last failure): stopped"
                    break
            now = time.perf_counter()
            if now - last >= 10:
                last = now
                st = [r["status"] for _, r in results]
                print(f"[{now - start:5.0f} s] cases {len(st)}, failures {st.count('fail')}, refused "
                      f"{st.count('refused')}", flush=True)
    except KeyboardInterrupt:
        stopped = "interrupted"
    finally:
        if out:
            out.close()
    st = [r["status"] for _, r in results]
    summary = (f"fuzz_spmm: seed {seed}, device {device}, {time.perf_counter() - start:.0f} s, {len(st)} cases, "
               f"{st.count('fail')} failures, {st.count('refused')} refused" + (f"; {stopped}" if stopped else "")
               + "\n\n" + table(results))
    print("\n" + summary)
    if args.out:
        with open(os.path.join(args.out, "summary.md"), "w") as f:
            f.write(summary + "\n")
    return int(st.count("fail") > 0)


if __name__ == "__main__":
    sys.exit(main())

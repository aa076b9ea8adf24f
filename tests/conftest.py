"""Shared helpers for the flash-llm tests: random sparse weights, independent byte/layout math, tolerances.

Everything here is written from the format descriptions (module docstrings of ``flash_llm.formats``),
not from the library code, so the tests check the library against an independent reading of the spec.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

from flash_llm import BitmapTiles, DeltaRows, TiledCSL

# No example database written into the repository; no per-example deadline (first calls warm up torch).
settings.register_profile("flash_llm", database=None, deadline=None, print_blob=True)
settings.load_profile("flash_llm")

# Under pytest-xdist each worker takes its share of the cores for torch's CPU threads. With `-n 16` on a 16-core
# machine, 16 workers of 16 threads each oversubscribed the cores: session 86's whole-suite run on the GPU machine
# covered a sixth of the tests in 9 minutes, and three CPU-heavy tests that pass alone failed there.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
if _WORKERS > 1:
    _CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, _CPUS // _WORKERS))

FORMATS = (BitmapTiles, TiledCSL, DeltaRows)
DTYPES = (torch.float16, torch.bfloat16)

REPO = Path(__file__).resolve().parent.parent


def load_script(relpath: str, name: str):
    """A fresh module of the repository's script ``relpath`` (e.g. ``benchmarks/fuzz_spmm.py``) under ``name``:
    scripts are not a package, so the tests import them by path."""
    spec = importlib.util.spec_from_file_location(name, REPO / relpath)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


STRIP_M, STRIP_K = 16, 64  # BitmapTiles record = one 16x64 strip
TILE_M, TILE_K = 64, 64  # TiledCSL record = one 64x64 tile


@pytest.fixture(params=FORMATS, ids=lambda c: c.__name__)
def fmt(request):
    """Each compressed format class."""
    return request.param


@pytest.fixture(params=DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def dtype(request):
    """Each value dtype (fp16, bf16)."""
    return request.param


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw 16-bit patterns of an fp16/bf16 tensor (for bit-exact comparisons)."""
    return t.contiguous().view(torch.int16)


def assert_bit_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"dtype {actual.dtype} != {expected.dtype}"
    a, e = bits(actual), bits(expected)
    if not torch.equal(a, e):
        idx = torch.nonzero(a != e)
        r, c = idx[0].tolist()
        raise AssertionError(f"{idx.shape[0]} elements differ bitwise; first at ({r}, {c}): "
                             f"got 0x{int(a[r, c]) & 0xFFFF:04x}, expected 0x{int(e[r, c]) & 0xFFFF:04x}")


def random_mask(m: int, k: int, density: float, seed: int = 0) -> torch.Tensor:
    """``bool [m, k]``, each element True with probability ``density`` (0 and 1 are exact)."""
    if density <= 0:
        return torch.zeros(m, k, dtype=torch.bool)
    if density >= 1:
        return torch.ones(m, k, dtype=torch.bool)
    g = torch.Generator().manual_seed(seed)
    return torch.rand(m, k, generator=g) < density


def random_values(m: int, k: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Normal values of ``dtype`` none of which is +0.0 or -0.0 (so a mask fully controls sparsity)."""
    g = torch.Generator().manual_seed(seed + 1_000_003)
    v = torch.randn(m, k, generator=g).to(dtype)
    return torch.where(v == 0, torch.ones((), dtype=dtype), v)


def sparse_weight(m: int, k: int, density: float, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """A random ``[m, k]`` weight of ``dtype`` whose nonzeros are exactly ``random_mask(...)``."""
    mask = random_mask(m, k, density, seed)
    return torch.where(mask, random_values(m, k, dtype, seed), torch.zeros((), dtype=dtype))


def nonzero_mask(w: torch.Tensor) -> torch.Tensor:
    """Elements the formats must store: every bit pattern except +0.0 and -0.0 (NaN included)."""
    return (bits(w) & 0x7FFF) != 0


def record_nnz(mask: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Nonzeros per ``rows x cols`` block of the zero-padded mask, blocks numbered row-major. int64 [T]."""
    m, k = mask.shape
    mp, kp = math.ceil(m / rows) * rows, math.ceil(k / cols) * cols
    padded = torch.zeros(mp, kp, dtype=torch.int64)
    padded[:m, :k] = mask.to(torch.int64)
    return padded.view(mp // rows, rows, kp // cols, cols).sum((1, 3)).reshape(-1)


def expected_nbytes(fmt_cls, mask: torch.Tensor, splits: int | None = None, parts: int = 1) -> int:
    """The closed-form byte count of each format's module docstring, from the dense mask (DeltaRows: and the split
    count and lanes a row the encoder chose, which its byte count includes)."""
    if fmt_cls is BitmapTiles:
        n = record_nnz(mask, STRIP_M, STRIP_K)
        t = n.numel()
        return 128 * t + 16 * int(((n + 7) // 8).sum()) + 4 * (t + 1)
    if fmt_cls is TiledCSL:
        n = record_nnz(mask, TILE_M, TILE_K)
        t = n.numel()
        return 4 * int(((n + 3) // 4 * 4).sum()) + 4 * (t + 1)
    if fmt_cls is DeltaRows:
        return delta_rows_nbytes(mask, splits, parts)
    raise AssertionError(f"unknown format {fmt_cls}")


def _delta_span(gap: int) -> int:
    """Entries a DeltaRows stream spends on a nonzero ``gap`` columns after the previous one: the nonzero, after
    floor((gap - 1) / 15) escapes when the gap is over 15."""
    return 1 + ((gap - 1) // 15 if gap > 15 else 0)


def delta_rows_parts_nbytes(mask: torch.Tensor, parts: int) -> int:
    """DeltaRows' byte count in the parts layout (version 2, ``parts`` lanes a row, one split), from its docstring:
    rows ranked by nonzeros, 32 / parts to a slice; a row's stream (escapes from its own gaps, the first nonzero none)
    cut into parts of equal length: nonzero j of a row of T stream entries, with B entries before it, goes to part
    floor(B parts / T); each part walked from its first column (escapes only for gaps inside the part); each slice
    padded to whole groups of its longest part; then the parts trailer, 4 (slices + 1) + 72 slices + 4 x 32 slices."""
    m, k = mask.shape
    lanes = []
    for r in range(m):
        cols = mask[r].nonzero().flatten().tolist()
        spans = [1] + [_delta_span(c - p) for p, c in zip(cols, cols[1:])]
        total, before, ents, last = sum(spans), 0, [0] * parts, [None] * parts
        for c, sp in zip(cols, spans):
            j = before * parts // total
            gap = 0 if last[j] is None else c - last[j]
            ents[j] += _delta_span(gap)
            last[j] = c
            before += sp
        lanes.append((len(cols), ents))
    order = sorted(range(m), key=lambda r: -lanes[r][0])  # (stable: ties keep row order)
    per_slice = 32 // parts
    slices = math.ceil(m / per_slice)
    groups = 0
    for i in range(slices):
        rows = order[per_slice * i: per_slice * (i + 1)]
        groups += math.ceil(max(max(lanes[r][1]) for r in rows) / 8)
    return 640 * groups + 4 * parts + 4 * (slices + 1) + 72 * slices + 4 * 32 * slices


def delta_rows_nbytes(mask: torch.Tensor, splits: int, parts: int = 1) -> int:
    """DeltaRows' byte count from its docstring: per row, one entry per nonzero plus floor((gap - 1) / 15) escapes per
    gap over 15 columns (the first gap counted from column 0); rows ranked by entries, 32 to a slice, each slice padded
    to whole groups of 8 entries of its longest row; 640 bytes a group, then 4 (slices + 1) + 72 slices S + 4 Mp."""
    if parts > 1:
        return delta_rows_parts_nbytes(mask, parts)
    m, k = mask.shape
    ents = []
    for r in range(m):
        cols = mask[r].nonzero().flatten().tolist()
        prev, e = 0, 0
        for c in cols:
            gap = c - prev
            e += _delta_span(gap)
            prev = c
        ents.append(e)
    ents.sort(reverse=True)
    slices = math.ceil(m / 32)
    groups = sum(math.ceil(max(ents[32 * i: 32 * i + 32]) / 8) for i in range(slices))
    return 640 * groups + 4 * (slices + 1) + 72 * slices * splits + 4 * 32 * slices


def fragment_lane_bit(r: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where strip element (r, c) (r < 16, c < 64) sits in fragment order: ``(lane, bit)``.

    The layout documented in ``flash_llm/formats/_layout.py``, re-implemented here independently of its
    ``permute`` code: lane ``4g + t`` holds, for k-step ``s``, A-operand half ``j = 4q + 2h + e`` at row
    ``8h + g`` and strip column ``16t + 4s + 2q + e`` (each lane's 16 columns contiguous).
    """
    lane = 4 * (r % 8) + c // 16
    bit = 8 * ((c // 4) % 4) + 4 * ((c // 2) % 2) + 2 * (r // 8) + c % 2
    return lane, bit


def fragment_row_col(lane: torch.Tensor, bit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward direction, straight from the PTX mma.m16n8k16 A-fragment table plus the column
    order above: ``(lane, bit = 8s + j)`` -> strip ``(row, col)``."""
    g, t = lane // 4, lane % 4
    s, j = bit // 8, bit % 8
    e, h, q = j & 1, (j >> 1) & 1, j >> 2
    return g + 8 * h, 16 * t + 4 * s + 2 * q + e


def bitmap_word_bit(bit: torch.Tensor) -> torch.Tensor:
    """BitmapTiles version 2: the bit of a lane's bitmap word that holds fragment-order bit
    ``bit = 8 s + j`` (k-step ``s``, A-fragment half ``j``): ``8 (j // 2) + 4 (j % 2) + s``, from the
    format docstring (byte ``i`` of the word is A register ``i`` of every k-step)."""
    s, j = bit // 8, bit % 8
    return 8 * (j // 2) + 4 * (j % 2) + s


def ulp(dtype: torch.dtype, magnitude: float) -> float:
    """One unit in the last place of ``dtype`` at ``magnitude`` (the subnormal step near zero)."""
    fi = torch.finfo(dtype)
    magnitude = max(abs(float(magnitude)), fi.smallest_normal)
    return fi.eps * 2.0 ** math.floor(math.log2(magnitude))


def max_abs_err(a: torch.Tensor, ref64: torch.Tensor) -> float:
    return float((a.double() - ref64).abs().max()) if ref64.numel() else 0.0


def assert_close_to_reference(y: torch.Tensor, x: torch.Tensor, w_dense: torch.Tensor,
                              bias: torch.Tensor | None) -> None:
    """STYLE lesson 4: ``err(y vs fp64) <= 2 * err(torch fp32-accumulated vs fp64) + 1 ulp``.

    The fp64 reference is built from the *already rounded* fp16/bf16 inputs; the torch baseline is the
    same product accumulated in fp32 and rounded to ``x.dtype`` (what a correct kernel can achieve).
    """
    ref = x.double() @ w_dense.double().t()
    base = x.float() @ w_dense.float().t()
    if bias is not None:
        ref = ref + bias.double()
        base = base + bias.float()
    base = base.to(x.dtype)
    assert y.shape == ref.shape, f"result shape {tuple(y.shape)}, expected {tuple(ref.shape)}"
    assert y.dtype == x.dtype, f"result dtype {y.dtype}, expected {x.dtype}"
    assert bool(torch.isfinite(y).all()), "result has non-finite values"
    magnitude = float(ref.abs().max()) if ref.numel() else 0.0
    err, err_torch = max_abs_err(y, ref), max_abs_err(base, ref)
    tol = 2 * err_torch + ulp(x.dtype, magnitude)
    assert err <= tol, f"max |spmm - fp64| = {err:.3g} > {tol:.3g} (torch fp32-accumulated error {err_torch:.3g})"


TINY_VOCAB = 97


def tiny_hf_model(family: str, seed: int = 0):
    """A tiny transformers ``LlamaForCausalLM`` (GQA: 4 query heads, 2 KV heads) or ``OPTForCausalLM`` with
    random weights (seeded), vocabulary ``TINY_VOCAB``, in eval mode: the reference of the engine and
    tensor-parallel tests."""
    import transformers

    torch.manual_seed(seed)
    if family == "llama":
        hc = transformers.LlamaConfig(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      rope_theta=1000.0, initializer_range=0.1, bos_token_id=None,
                                      eos_token_id=None, pad_token_id=0)
        return transformers.LlamaForCausalLM(hc).eval()
    hc = transformers.OPTConfig(vocab_size=TINY_VOCAB, hidden_size=64, ffn_dim=96, num_hidden_layers=2,
                                num_attention_heads=4, max_position_embeddings=64, init_std=0.1, dropout=0.0,
                                bos_token_id=None, eos_token_id=None, pad_token_id=0)
    return transformers.OPTForCausalLM(hc).eval()


@pytest.fixture
def world1():
    """A one-rank gloo tensor-parallel group (no torchrun variables: a single-process group), closed after the test."""
    from flash_llm.parallel import init_tensor_parallel

    with init_tensor_parallel("gloo") as tp:
        yield tp
    assert not torch.distributed.is_initialized()


@pytest.fixture
def nvrtc():
    """Skips where cuda-python's NVRTC is not installed (or cannot be loaded)."""
    from flash_llm.kernels import _build

    pytest.importorskip("cuda.bindings", reason="cuda-python not installed")
    try:
        _build.nvrtc_version()
    except (ImportError, RuntimeError, OSError) as e:
        pytest.skip(f"NVRTC is not loadable: {e}")

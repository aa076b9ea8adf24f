"""The formats' encoders, decoders and checks on a CUDA GPU give the CPU's arrays and weights bit for bit: with the
runs and bands the GPU's free memory sizes (sessions 66-67: a whole layer in one run there, where the CPU takes
many) and with small ones forced (many runs on the GPU too).  The CPU tests check the same sizes against each other
on the CPU only; the kernels' GPU tests build their weights on the GPU but compare with those same weights."""

from __future__ import annotations

import pytest
import torch

from flash_llm import BitmapTiles, DeltaRows, TiledCSL
from flash_llm.formats import _base
from flash_llm.formats import delta_rows as D

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
pytestmark = [pytest.mark.gpu, cuda]

CASES = [(BitmapTiles, {}), (TiledCSL, {}), (DeltaRows, {}), (DeltaRows, {"parts": 4}),
         (DeltaRows, {"splits": 3, "pair_halves": True})]
CASE_IDS = ["bitmap", "tiled-csl", "delta-rows", "delta-rows-parts4", "delta-rows-split3-paired"]
SHAPES = [((64 * 5 + 3, 200), 0.3), ((320, 4104), 0.2), ((1024, 14336), 0.2)]
_CPU: dict = {}  # (case, dtype, shape): the weight and its CPU encoding, shared by both run sizes


def _weight(m: int, k: int, density: float, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """A random weight with an empty row, a row whose only nonzero is its last column, a full row and a run of empty
    columns; magnitudes in 0.25 .. 3.9 (a bf16 DeltaRows' values can then be coded)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, k, generator=g)
    w = torch.where(torch.rand(m, k, generator=g) < density, w, 0.0)
    w[5] = 0
    w[2] = 0
    w[2, -1] = 1.0
    w[7] = torch.randn(k, generator=g)
    w[:, 40:170] = 0
    return torch.where(w != 0, w.sign() * w.abs().clamp(0.25, 3.9), 0.0).to(dtype)


def _cpu(case: int, dtype: torch.dtype, shape, density):
    key = (case, dtype, shape)
    if key not in _CPU:
        fmt, kw = CASES[case]
        m, k = shape
        if kw.get("pair_halves"):
            m -= m % 64  # (paired halves take whole 64-row slices)
        w = _weight(m, k, density, dtype, seed=m + k)
        _CPU[key] = w, fmt.from_dense(w, **kw)
    return _CPU[key]


def _assert_same_arrays(gpu, cpu) -> None:
    assert gpu.device.type == "cuda" and gpu.shape == cpu.shape and gpu.dtype == cpu.dtype and gpu.nnz == cpu.nnz
    a, b = gpu.tensors(), cpu.tensors()
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n].cpu(), b[n]), n


@pytest.mark.parametrize("runs", ["gpu", "small"])
@pytest.mark.parametrize("shape, density", SHAPES, ids=["x".join(map(str, s)) for s, _ in SHAPES])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", range(len(CASES)), ids=CASE_IDS)
def test_gpu_encoding_decoding_and_checks_give_the_cpus_bits(case, dtype, shape, density, runs, monkeypatch):
    w, cpu = _cpu(case, dtype, shape, density)
    fmt, kw = CASES[case]
    if runs == "small":  # the GPU's free memory read as none: every run and band at the (small) constants
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (0, 80 * 10**9))
        monkeypatch.setattr(_base, "BAND_ELEMENTS", 4096 * 3)
        monkeypatch.setattr(D, "ENCODE_CHUNK_ENTRIES", 300)
        monkeypatch.setattr(D, "ENCODE_CHUNK_ELEMENTS", 1 << 16)
        monkeypatch.setattr(D, "ENTRY_CHUNK_GROUPS", 3)
        monkeypatch.setattr(D, "CODE_CHUNK_GROUPS", 5)
        assert _base.band_elements(torch.device("cuda")) == 4096 * 3
    else:
        assert _base.band_elements(torch.device("cuda")) >= _base.BAND_ELEMENTS
    wg = w.cuda()
    gpu = fmt.from_dense(wg, **kw)
    _assert_same_arrays(gpu, cpu)
    dense = gpu.to_dense()
    assert dense.device.type == "cuda" and torch.equal(dense.view(torch.int16), wg.view(torch.int16))
    tensors, meta = gpu.state()
    again = fmt.from_state(tensors, meta)  # every check, on the GPU
    assert again.device.type == "cuda" and again.nnz == cpu.nnz == int(torch.count_nonzero(w))
    if fmt is DeltaRows and dtype == torch.bfloat16:
        coded_gpu, coded_cpu = gpu.code_values(), cpu.code_values()
        assert coded_gpu is not None and coded_cpu is not None
        _assert_same_arrays(coded_gpu, coded_cpu)
        assert torch.equal(coded_gpu.to_dense().view(torch.int16), wg.view(torch.int16))

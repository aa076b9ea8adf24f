"""Fixes from session 77's fuzzer (benchmarks/fuzz_spmm.py) that the CPU can check."""

import pytest
import torch
from conftest import load_script

from flash_llm import kernels

MM = torch.backends.cuda.matmul


def _settings():
    return {name: getattr(MM, name) for name in kernels._LOSSY_CUBLAS}


@pytest.fixture
def restore_cublas_settings():
    saved = _settings()
    yield
    for name, value in saved.items():
        setattr(MM, name, value)


def test_expansion_gemm_runs_without_reduced_precision_reductions(monkeypatch, restore_cublas_settings):
    """The large-N path's cuBLAS product sums in fp32: PyTorch's default fp16 reduced-precision split-K reductions
    overflowed (-inf for -20415, Infs of the wrong sign on the H100), so they are off inside the call and the
    caller's settings, split-K flags included, come back after it."""
    MM.allow_fp16_reduced_precision_reduction = True
    MM.allow_bf16_reduced_precision_reduction = (False, False)
    before = _settings() | {"bf16_split_k": MM.allow_bf16_reduced_precision_reduction_split_k}
    w = torch.randn(6, 16, dtype=torch.float16)
    monkeypatch.setattr(kernels, "decode_dense", lambda fmt, data, offsets, m, k, dtype: w)
    seen = []
    linear = torch.nn.functional.linear

    def spy(x, weight, bias=None):
        seen.append(_settings())
        return linear(x, weight, bias)

    monkeypatch.setattr(torch.nn.functional, "linear", spy)
    x = torch.randn(3, 16, dtype=torch.float16)
    y = kernels._expand_and_gemm(x, None, None, kernels.BITMAP, 6, 16, None, None)
    assert torch.equal(y, linear(x, w))
    assert seen == [{name: False for name in kernels._LOSSY_CUBLAS}]
    assert _settings() | {"bf16_split_k": MM.allow_bf16_reduced_precision_reduction_split_k} == before
    # restored when the product raises too
    monkeypatch.setattr(torch.nn.functional, "linear", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        kernels._expand_and_gemm(x, None, None, kernels.BITMAP, 6, 16, None, None)
    assert _settings() | {"bf16_split_k": MM.allow_bf16_reduced_precision_reduction_split_k} == before


# ---- the fuzzer's judging, as session 77's H100 triage (benchmarks/diag/fuzz_triage.py) found it must be ----------
def _fuzz():
    return load_script("benchmarks/fuzz_spmm.py", "fuzz_spmm_fixes")


def _judge(got, want, theirs, dtype=torch.float16, slack=0.0):
    fz = _fuzz()
    want = torch.tensor([want], dtype=torch.float64)
    return fz.compare(torch.tensor([got], dtype=dtype), want, want.abs().clamp_max(torch.finfo(dtype).max),
                      torch.tensor([[slack]], dtype=torch.float64), torch.tensor([theirs], dtype=dtype), dtype, 2)


def test_fuzzer_judges_an_inf_by_sign_only_where_pytorch_agrees_with_the_reference():
    inf = float("inf")
    assert _judge([-inf], [inf], [inf]) is not None  # PyTorch has the reference's sign: ours is wrong
    assert _judge([-inf], [inf], [-inf]) is None  # PyTorch's own overflow gives ours' sign: not judged


def test_fuzzer_takes_the_largest_finite_value_at_the_edge_of_the_range():
    inf = float("inf")
    assert _judge([-65504.0], [-65530.0], [-inf]) is None  # past 65520 by a few ulps: rounds either way
    assert _judge([-65504.0], [-70000.0], [-inf]) is not None  # far past the edge: must overflow
    assert _judge([65504.0], [-65530.0], [-inf]) is not None  # the wrong sign
    assert _judge([-65504.0], [-inf], [-inf], slack=inf) is None  # a residual add's product at the edge


def test_fuzzer_allows_the_tensor_cores_flushed_subnormal_products_in_bf16(monkeypatch):
    """bf16 products below 2^-126 may be flushed (a slack of FTZ_TINY (K + sum |x|) an element); fp16 ones are
    fp32 normals.  (FTZ_TINY made 1 here so that its share shows beside the other allowances.)"""
    fz = _fuzz()
    monkeypatch.setattr(fz, "FTZ_TINY", 1.0)
    c = fz.draw_case(228097387214529, 1 << 26)  # the H100's failure: Tiled-CSL bf16, 47 fp32-subnormal products
    c.update(m=8, k=64, n=2)
    for dtype, flushed in (("bfloat16", True), ("float16", False)):
        c["dtype"] = dtype
        cpu, _ = fz.make_inputs(c, torch.device("cpu"))
        _, _, slack = fz.reference(c, cpu)
        assert bool((slack >= c["k"]).all()) is flushed

"""Fixes from session 77's fuzzer (benchmarks/fuzz_spmm.py) that the CPU can check."""

import pytest
import torch

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

"""benchmarks/sync_cost.py on the CPU: its kernels compile for sm_90 without warnings or spills, and without a GPU it
says so and exits 1."""

import pytest
from conftest import load_script

sync_cost = load_script("benchmarks/sync_cost.py", "sync_cost")  # (it puts benchmarks/ on sys.path itself)


def test_sync_cost_kernels_compile_clean(tmp_path, monkeypatch):
    pytest.importorskip("cuda.bindings", reason="cuda-python not installed")
    from flash_llm.kernels._build import compile_kernels

    monkeypatch.setenv("FLASH_LLM_CACHE", str(tmp_path))
    c = compile_kernels("sm_90", use_cache=False, source=sync_cost.SOURCE.encode())
    assert c.warnings() == [], c.log
    for name, r in c.resources().items():
        assert r["spill_stores"] == 0 and r["stack"] == 0, (name, r)


def test_sync_cost_needs_a_gpu(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert sync_cost.main([]) == 1
    assert "needs a CUDA device" in capsys.readouterr().out

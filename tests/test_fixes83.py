"""Session 83's fixes outside the checkpoint code: NVRTC's output buffers, and the fused norms' eps check under a
fullgraph torch.compile with a dynamic float."""
import pytest
import torch

from flash_llm import TiledCSL, ops


def test_nvrtc_buffers_are_private_and_an_empty_cubin_is_refused(tmp_path, monkeypatch):
    """The log was read into ``b" " * size``: for an empty log (size 1) that is CPython's shared ``b" "``, which NVRTC
    overwrote with NUL for the whole process; and an option that yields no cubin (``-dlto``: LTO IR) returned and
    cached an empty one.  Now: writable buffers, and no cubin is a KernelBuildError."""
    pytest.importorskip("cuda.bindings", reason="cuda-python not installed")
    from flash_llm.kernels._build import KernelBuildError, compile_kernels
    monkeypatch.setenv("FLASH_LLM_CACHE", str(tmp_path))
    src = b'extern "C" __global__ void k(int *p) { p[0] = 1; }\n'
    with pytest.raises(KernelBuildError, match="produced no cubin"):
        compile_kernels("sm_80", source=src, extra_options=("-dlto",))
    assert b" ".join([b"a", b"b"]) == b"a b"  # (the shared one-byte object untouched)
    assert not any(p.is_file() for p in tmp_path.rglob("*"))  # (nothing cached)
    good = compile_kernels("sm_80", source=src)
    assert good.cubin[:4] == b"\x7fELF" and b" ".join([b"a", b"b"]) == b"a b"


@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_fused_norm_float_eps_under_fullgraph_dynamic_compile(norm):
    """A Python float eps that Dynamo makes dynamic (``dynamic=True``, or a second value) failed in the eps check's
    ``math.isfinite`` (untraceable on a symbolic float) instead of computing."""
    torch.manual_seed(0)
    m, k = 64, 96
    w = TiledCSL.from_dense((torch.randn(m, k) * (torch.rand(m, k) < 0.3)).half())
    g, b, x = torch.rand(k).half(), torch.rand(k).half(), torch.randn(3, k).half()

    def f(x, eps):
        return ops.spmm_rms_norm(x, g, eps, w) if norm == "rms" else ops.spmm_layer_norm(x, g, b, eps, w)

    for dynamic, values in ((True, (1e-5,)), (None, (1e-5, 1e-6))):
        torch._dynamo.reset()
        cf = torch.compile(f, backend="eager", dynamic=dynamic, fullgraph=True)
        for eps in values:
            torch.testing.assert_close(cf(x, eps), f(x, eps), rtol=0, atol=0)
    for bad in (float("nan"), float("inf"), -1e-5):  # (still refused, naming eps)
        with pytest.raises(ValueError, match="eps"):
            f(x, bad)


def test_tensor_parallel_compression_error_note_does_not_promise_an_unchanged_model(monkeypatch):
    """An unexpected error compressing a tensor-parallel slice was noted "sparsify_: ...; the model is unchanged",
    which a half-done tensor_parallel_ / load_tensor_parallel is not: the note names tensor parallelism only."""
    from flash_llm import BitmapTiles
    from flash_llm.nn import SparsifyConfig
    from flash_llm.parallel.layers import local_layer

    def boom(cls, w, *, dtype=None):
        raise RuntimeError("boom")

    monkeypatch.setattr(BitmapTiles, "from_dense", classmethod(boom))
    w = torch.randn(32, 64).half() * (torch.rand(32, 64) < 0.3)
    with pytest.raises(RuntimeError, match="boom") as info:
        local_layer(w, None, "model.layers.0.mlp.up_proj", sparsify=SparsifyConfig(format="bitmap"))
    if hasattr(info.value, "add_note"):  # Python >= 3.11
        assert info.value.__notes__ == ["tensor parallel: while compressing 'model.layers.0.mlp.up_proj' (32, 64)"]

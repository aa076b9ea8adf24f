"""Session 84's fixes to the kernels' host side and build (hunt ``/tmp/h84/kernels``):

1. DeltaRows' parts-layout kernels ask for no more shared memory than the device lets a block have (99 KiB on sm_86 /
   sm_89, static and dynamic together): the multi-token kernels read X from global memory where all of K does not
   fit, and the N = 1 kernel, which has no such fallback, leaves the weight to the expansion; sm_90's plans unchanged;
2. ``flash-llm build --arch sm_90a`` fills the sm_90 slot the runtime reads;
3. a cubin compiled at first use that cannot be stored in the cache is said once, with what to do;
4. ``flash-llm build`` without ``--arch`` on a GPU the kernels cannot run on refuses before compiling;
5. ``plan()`` checks ``splits``, ``fmt`` and ``density``.

CPU only: the GPU's limits are monkeypatched, ``spmm_cuda``'s host side runs with its launches recorded instead of
made, and NVRTC is the fake of ``test_build_fixes81``."""

from __future__ import annotations

import ctypes
import types

import numpy as np
import pytest
import torch

from flash_llm import cli, kernels
from flash_llm.formats import DeltaRows
from flash_llm.formats.delta_rows import layout
from flash_llm.kernels import BITMAP, DELTA_ROWS, TILED_CSL, _build
from test_build_fixes81 import FakeNVRTC, fake_cubin

SM86 = 99 * 1024  # shared memory a block on compute capability 8.6 / 8.9 (cudaDevAttrMaxSharedMemoryPerBlockOptin)
SM90 = 227 * 1024
#: static shared memory of the parts kernels (ptxas, sm_86, NVRTC 13.5; docs/kernels.md's resources table)
STATIC = {"nt8": 10272, "nt4": 10272, "nt2": 10304, "nt4c": 11296, "nt2c": 11328, "s1": 20512, "s2": 20512,
          "s2c": 21536}


def _static(name: str) -> int:
    return STATIC[name.rsplit("_", 1)[1]]


def _limit_of(optin: int):
    """A ``dynamic_shared_limit`` of a GPU whose blocks may have ``optin`` bytes of shared memory."""
    return lambda device, name: optin - _static(name)


# 1. the parts layout within the device's shared memory ------------------------------------------------------------

def test_parts_nt_window_is_capped_by_the_device_limit():
    """sm_86: all of K at NT x 2 bytes a column fits 91 KB at most past the nt kernels' 10 KB of static shared memory;
    the repro's 96 KiB windows (K = 6144 at 8 tokens, 12288 at 4, 24576 at 2) read X from global memory instead."""
    for k, nt in ((6144, 8), (12288, 4), (24576, 2)):
        limit = SM86 - _static(f"x_nt{nt}")
        assert kernels.parts_nt_window(k, nt) == k  # (no device limit: as before)
        assert kernels.parts_nt_window(k, nt, limit) == 0
        assert kernels.parts_nt_window(k // 2, nt, limit) == k // 2  # (half of it still staged)
    limit = SM86 - STATIC["nt8"]
    assert all(kernels.parts_nt_window(k, 8, limit) * 16 + STATIC["nt8"] <= SM86 for k in range(8, 8192, 8))
    assert not kernels.dr_nt_norm_ok(2, 24576, 4, limit=SM86 - STATIC["nt2"])  # (the norm needs the window)
    assert kernels.dr_nt_norm_ok(2, 24576, 4) and kernels.dr_nt_norm_ok(2, 16384, 4, limit=SM86 - STATIC["nt2"])


def test_parts_n1_fits_and_the_fp32_stage_within_the_device_limit(monkeypatch):
    limit = SM86 - STATIC["s2"]
    assert kernels.parts_n1_fits(40432, 2, limit) and not kernels.parts_n1_fits(40440, 2, limit)
    assert kernels.parts_n1_fits(10 ** 6, 2, None)  # (no device limit)
    monkeypatch.setattr(kernels, "PARTS_STAGE", 1)
    assert kernels.parts_stage(20216, limit) == 1 and kernels.parts_stage(20224, limit) == 2
    assert kernels.parts_stage(24576) == 1  # (DR_NT_STAGE_MAX alone, as before)


def test_sm90_plans_are_unchanged_at_its_real_limit(monkeypatch):
    """H100 / H200 (227 KiB a block): the windows, stages and N = 1 kernels are what they were before the cap."""
    for nt in (2, 4, 8):
        limit = SM90 - _static(f"x_nt{nt}")
        for k in (64, 1024, 4092, 4096, 6144, 6152, 7168, 8192, 11008, 12288, 14336, 16384, 24576, 24584, 28672):
            before = (k + 7) // 8 * 8 if (k + 7) // 8 * 8 * nt * 2 <= 96 * 1024 else 0
            assert kernels.parts_nt_window(k, nt, limit) == before, (k, nt)
        assert kernels.dr_nt_norm_ok(2, 16384, 4, limit=limit) == kernels.dr_nt_norm_ok(2, 16384, 4)
    monkeypatch.setattr(kernels, "dynamic_shared_limit", _limit_of(SM90))
    lay = types.SimpleNamespace(parts=4, coded=False)
    for k in (4096, 8192, 14336, 16384, 28672, 57344):
        assert kernels._parts_n1_kernel(torch.float16, lay, k, None) == ("delta_rows_parts_f16_p4_s2", 2 * k)
    for stage_env in (0, 1):
        monkeypatch.setattr(kernels, "PARTS_STAGE", stage_env)
        for k in (4096, 24576, 24584):
            assert kernels.parts_stage(k, SM90 - STATIC["s1"]) == kernels.parts_stage(k)


def test_the_coded_and_fp32_parts_kernels_are_checked_against_their_own_limit(monkeypatch):
    monkeypatch.setattr(kernels, "dynamic_shared_limit", _limit_of(SM86))
    coded = types.SimpleNamespace(parts=8, coded=True)
    assert kernels._parts_n1_kernel(torch.bfloat16, coded, 39920, None) == ("delta_rows_parts_bf16_p8_s2c", 79840)
    assert kernels._parts_n1_kernel(torch.bfloat16, coded, 39928, None) is None  # (21536 static + 2 K > 99 KiB)
    monkeypatch.setattr(kernels, "PARTS_STAGE", 1)
    plain = types.SimpleNamespace(parts=2, coded=False)
    assert kernels._parts_n1_kernel(torch.float16, plain, 16384, None) == ("delta_rows_parts_f16_p2_s1", 65536)
    assert kernels._parts_n1_kernel(torch.float16, plain, 24576, None) == ("delta_rows_parts_f16_p2_s2", 49152)


class _Ran:
    """``spmm_cuda``'s host side on the CPU: its launches recorded as (name, dynamic shared memory, args), the
    expansion counted, nothing computed."""

    def __init__(self, monkeypatch):
        self.launches, self.expanded = [], 0
        monkeypatch.setattr(kernels, "launch", self._launch)
        monkeypatch.setattr(kernels, "_expand_and_gemm", self._expand)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(cuda_stream=0))
        monkeypatch.setattr(kernels, "_scratch", kernels._Scratch())

    def _launch(self, name, grid, block, args, stream, dev, shared=0, **kw):
        self.launches.append((name, shared, args))

    def _expand(self, x, data, offsets, fmt, m, k, bias, out):
        self.expanded += 1
        y = torch.zeros(x.shape[0], m, dtype=x.dtype)
        return y if out is None else out.copy_(y)

    def run(self, x, w, **kw):
        self.launches, self.expanded = [], 0
        kernels.spmm_cuda(x, w.data, w.offsets, DELTA_ROWS, *w.shape, None, **kw)
        return self


_WEIGHTS: dict = {}


def _parts_weight(k: int, m: int = 64) -> DeltaRows:
    if k not in _WEIGHTS:
        g = torch.Generator().manual_seed(k)
        w = torch.randn(m, k, generator=g).half()
        w[torch.rand(w.shape, generator=g) < 0.8] = 0
        _WEIGHTS[k] = DeltaRows.from_dense(w, parts=4)
        assert layout(m, _WEIGHTS[k].offsets.numel(), _WEIGHTS[k].data.numel()).parts == 4
    return _WEIGHTS[k]


@pytest.mark.parametrize("k,n", [(6144, 8), (12288, 4), (24576, 2), (49152, 1)])
def test_spmm_on_a_fake_sm86_asks_no_more_shared_memory_than_it_has(monkeypatch, k, n):
    """The repro's shapes: before, 98304 B dynamic on 10272-10304 static (multi-token) and 2 K on 20512 (N = 1), past
    sm_86's 101376, so ``cuFuncSetAttribute`` failed and the spmm raised.  Now the multi-token kernels run with window
    0 (X from global memory) and N = 1 expands the weight."""
    monkeypatch.setattr(kernels, "dynamic_shared_limit", _limit_of(SM86), raising=False)
    ran = _Ran(monkeypatch).run(torch.randn(n, k).half(), _parts_weight(k))
    for name, shared, _ in ran.launches:
        assert shared + _static(name) <= SM86, (name, shared)
    if n == 1:
        assert ran.launches == [] and ran.expanded == 1
    else:
        [(name, shared, args)] = ran.launches
        assert name == f"delta_rows_parts_f16_nt{n}" and shared == 0 and args[10][0] == 0  # (wmax: X from global)


def test_spmm_n1_with_an_epilogue_that_does_not_fit_runs_it_separately(monkeypatch):
    monkeypatch.setattr(kernels, "dynamic_shared_limit", _limit_of(SM86), raising=False)
    w = _parts_weight(49152)
    x = torch.randn(1, 49152).half()
    add_to = torch.ones(1, 64, dtype=torch.float16)
    ran = _Ran(monkeypatch).run(x, w, add_to=add_to)
    assert ran.launches == [] and ran.expanded == 1 and torch.equal(add_to, torch.ones(1, 64).half())
    ran.run(x, w, act="relu")
    assert ran.launches == [] and ran.expanded == 1


def test_spmm_two_token_norm_without_a_window_runs_the_norm_separately(monkeypatch):
    """The 2-token kernel's RMSNorm needs X staged (it traps otherwise): where the window does not fit, the norm is
    applied first and the kernel runs without it."""
    monkeypatch.setattr(kernels, "dynamic_shared_limit", _limit_of(SM86), raising=False)
    k = 24576
    norm = (torch.ones(k, dtype=torch.float16), 1e-5)
    ran = _Ran(monkeypatch).run(torch.randn(2, k).half(), _parts_weight(k), norm=norm)
    [(name, shared, args)] = ran.launches
    assert name == "delta_rows_parts_f16_nt2" and shared == 0 and args[10][0] == 0
    assert args[14][0] == 0 and not args[13][0] & kernels._DR_RMS  # (no norm weight, no DR_RMS mode)


@pytest.mark.parametrize("k,n", [(4096, 1), (4096, 2), (4096, 5), (4096, 8), (14336, 1), (14336, 3), (16384, 2),
                                 (24576, 2), (6144, 8), (49152, 1)])
def test_spmm_on_a_fake_sm90_launches_what_it_did_before(monkeypatch, k, n):
    """The same launches (names, shared memory, arguments) with sm_90's limit as with none (the CPU's, as before)."""
    x, w = torch.randn(n, k).half(), _parts_weight(k)

    def seen(ran):  # (pointers as given or not: the output is a fresh tensor each time)
        return [(name, shared, [v if t is not ctypes.c_void_p else bool(v) for v, t in args])
                for name, shared, args in ran.launches]

    before = seen(_Ran(monkeypatch).run(x, w))
    monkeypatch.setattr(kernels, "dynamic_shared_limit", _limit_of(SM90))
    ran = _Ran(monkeypatch).run(x, w)
    assert seen(ran) == before and before and ran.expanded == 0


def test_dynamic_shared_limit_is_the_device_optin_less_the_static(monkeypatch):
    assert kernels.dynamic_shared_limit(torch.device("cpu"), "delta_rows_parts_f16_nt8") is None
    monkeypatch.setattr(kernels, "shared_optin", lambda index: SM86 if index == 1 else 0)
    monkeypatch.setattr(kernels, "static_shared", lambda index, name: 10272 if index == 1 else -1)
    assert kernels.dynamic_shared_limit(torch.device("cuda", 1), "delta_rows_parts_f16_nt8") == SM86 - 10272


def test_shared_optin_reads_torch_or_the_table(monkeypatch):
    props = {0: types.SimpleNamespace(major=8, minor=6, shared_memory_per_block_optin=101376),
             1: types.SimpleNamespace(major=8, minor=9), 2: types.SimpleNamespace(major=9, minor=0),
             3: types.SimpleNamespace(major=8, minor=0, shared_memory_per_block_optin=0),
             4: types.SimpleNamespace(major=11, minor=0)}
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props[index])
    monkeypatch.setattr(kernels, "_SHARED_OPTIN", {})
    assert [kernels.shared_optin(i) for i in range(5)] == [101376, 101376, 232448, 166912, kernels.SHARED_OPTIN_MIN]
    props[0] = None  # (remembered: no second query)
    assert kernels.shared_optin(0) == 101376


def test_static_shared_asks_the_driver_once(monkeypatch):
    asked = []

    class Driver:
        CUfunction_attribute = types.SimpleNamespace(CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES="SHARED_SIZE")

        def cuFuncGetAttribute(self, attr, fn):
            asked.append((attr, fn))
            return 0, 10272

    monkeypatch.setattr(_build, "_driver", Driver)
    monkeypatch.setattr(_build, "_function", lambda index, name: ("fn", index, name))
    monkeypatch.setattr(_build, "_static_smem", {})
    assert _build.static_shared(0, "k") == 10272 and _build.static_shared(0, "k") == 10272
    assert asked == [("SHARED_SIZE", ("fn", 0, "k"))]


# 2-4. build ------------------------------------------------------------------------------------------------------

@pytest.fixture
def fake(monkeypatch, tmp_path):
    """A fake NVRTC (an sm_90 cubin), its build fixed, and the cache in ``tmp_path / "cubin"``."""
    monkeypatch.setenv("FLASH_LLM_CACHE", str(tmp_path))
    nvrtc = FakeNVRTC(fake_cubin(sm=90))
    monkeypatch.setattr(_build, "_nvrtc", lambda: nvrtc)
    monkeypatch.setattr(_build, "nvrtc_build", lambda: "libnvrtc:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return nvrtc


def test_build_sm90a_fills_the_slot_the_runtime_reads(fake, capsys):
    assert cli.main(["build", "--arch", "sm_90a"]) == 0
    out, err = capsys.readouterr()
    assert "sm_90:" in out and "trying" not in err  # (no "unusual arch" note: it is sm_90)
    assert _build.is_cached("sm_90") and _build.is_cached("sm_90a") and fake.compiles == 1
    c = _build.compile_kernels("sm_90")  # (what an H100's first spmm does)
    assert c.cached and c.arch == "sm_90" and fake.compiles == 1
    assert cli.main(["build", "--arch", "sm_90", "sm_90a"]) == 0 and fake.compiles == 1  # (one arch, cached)
    assert _build.compile_kernels("sm_90a").arch == "sm_90" and _build._options("sm_90a") == _build._options("sm_90")


@pytest.mark.parametrize("why,hint", [(None, "set FLASH_LLM_CACHE to a writable directory"),
                                      ("cannot write x: no space left on device",
                                       "free some space there or set FLASH_LLM_CACHE to a directory with room")])
def test_a_cubin_not_stored_at_first_use_is_said_once(fake, monkeypatch, tmp_path, capsys, why, hint):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("FLASH_LLM_CACHE", str(blocker / "cache"))  # (cannot be created: a file above it)
    if why is not None:
        monkeypatch.setenv("FLASH_LLM_CACHE", str(tmp_path))
        monkeypatch.setattr(_build, "_store_cached", lambda slot, cubin: why)
    monkeypatch.setattr(_build, "_unstored_said", set(), raising=False)
    c = _build.compile_kernels("sm_90", notify=True)
    err = capsys.readouterr().err
    assert c.cache_error and "not stored in the cubin cache" in err and c.cache_error in err and hint in err
    _build.compile_kernels("sm_90", notify=True)  # (the next first use: said already)
    assert "not stored" not in capsys.readouterr().err and fake.compiles == 2
    _build.compile_kernels("sm_90")  # (without notify, as flash-llm build, which says it itself: nothing)
    assert "not stored" not in capsys.readouterr().err


def _gpu0(monkeypatch, cc):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cc)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4" if cc < (8, 0) else "A10")
    monkeypatch.setattr(_build, "device_arch", lambda index: f"sm_{cc[0]}{cc[1]}")


@pytest.mark.parametrize("cc", [(7, 5), (7, 0)])
def test_build_without_arch_on_an_unsupported_gpu_refuses_before_compiling(fake, monkeypatch, capsys, cc):
    _gpu0(monkeypatch, cc)
    assert cli.main(["build"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert f"compute capability {cc[0]}.{cc[1]}" in err and "--arch sm_80 sm_90" in err and fake.compiles == 0


def test_build_without_arch_on_a_supported_gpu_builds_its_arch(fake, monkeypatch, capsys):
    fake.cubin = fake_cubin(sm=86)
    _gpu0(monkeypatch, (8, 6))
    assert cli.main(["build"]) == 0 and fake.compiles == 1
    assert "sm_86: compiled" in capsys.readouterr().out and _build.is_cached("sm_86")
    assert cli.main(["build", "--arch", "sm_75"]) != cli.EXIT_USAGE  # (an --arch asked for is tried, as before)


# 5. plan's arguments ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("splits,error", [(2.5, TypeError), (True, TypeError), ("2", TypeError), (0, ValueError),
                                          (-3, ValueError)])
def test_plan_refuses_a_bad_splits(splits, error):
    with pytest.raises(error, match="splits"):
        kernels.plan(4096, 4096, 1, 0.2, 132, splits=splits)


def test_plan_takes_integer_splits_of_any_integer_type():
    p = kernels.plan(4096, 4096, 1, 0.2, 132, splits=np.int64(4))
    assert p.splits == 4 and type(p.splits) is int and type(p.kt_per_split) is int
    assert kernels.plan(4096, 4096, 1, 0.2, 132, splits=4) == p


@pytest.mark.parametrize("fmt", [DELTA_ROWS, 7, -1, True, "bitmap"])
def test_plan_refuses_an_unknown_fmt(fmt):
    with pytest.raises(ValueError, match="fmt"):
        kernels.plan(4096, 4096, 4, 0.2, 132, fmt=fmt)


@pytest.mark.parametrize("density,error", [(float("nan"), ValueError), (float("inf"), ValueError),
                                           (-0.1, ValueError), ("0.2", TypeError), (None, TypeError),
                                           (True, TypeError)])
def test_plan_refuses_a_bad_density(density, error):
    with pytest.raises(error, match="density"):
        kernels.plan(4096, 4096, 1, density, 132)


def test_plan_takes_the_density_spmm_cuda_estimates_for_small_dense_weights():
    """The estimate from the array's size counts the format's pads: above 1 for a dense weight of ragged edges."""
    from flash_llm import TiledCSL
    from flash_llm.formats import BitmapTiles

    for cls, fmt in ((TiledCSL, TILED_CSL), (BitmapTiles, BITMAP)):
        w = cls.from_dense(torch.randn(65, 65).half())
        density = kernels._density(fmt, w.data, 65, 65)
        assert density > 1
        assert kernels.plan(65, 65, 1, density, 132, fmt=fmt).splits >= 1
    for density in (0, 0.0, 1, np.float64(0.5)):
        assert kernels.plan(4096, 4096, 1, density, 132).splits >= 1

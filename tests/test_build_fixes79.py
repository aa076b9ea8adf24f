"""Session 79's fixes to the NVRTC build and its cubin cache: each ptxas "Function properties" block is given to the
function it names (a ``__noinline__`` device function no longer overwrites the kernel before it), no home directory
costs only the cache, cached cubins honour the umask, only a CUDA ELF for the requested SM is taken from the cache,
no temporary file stays after an interrupt, and bad ``source`` / ``extra_options`` are refused by name.

The tests that compile need cuda-python's NVRTC (no GPU); the others run anywhere."""

from __future__ import annotations

import os
import stat
import sys

import pytest

from flash_llm.kernels import _build

SMALL = b'extern "C" __global__ void k(int* p) { p[0] = 79; }\n'

#: ``k1`` calls a recursive ``__noinline__`` device function with a stack frame and spills of its own (ptxas lists
#: its block after k1's); ``k3`` has a stack frame of its own and calls a device function without one
CALLS = b"""
__device__ __noinline__ int rec(int* p, int n) {
    int a[16];
    for (int j = 0; j < 16; j++) a[j] = p[j + n];
    return n > 0 ? rec(p, n - 1) + a[p[n] & 15] : a[p[0] & 15];
}
__device__ __noinline__ int big(int* p, int i) {
    int a[64];
    for (int j = 0; j < 64; j++) a[j] = p[j + i];
    return a[p[0] & 63];
}
extern "C" __global__ void k1(int* p) { p[0] = rec(p, threadIdx.x); }
extern "C" __global__ void k2(int* p) { p[1] = 2; }
extern "C" __global__ void k3(int* p) { p[0] = big(p, threadIdx.x); }
"""



def _no_home(monkeypatch):
    """As for a uid without a passwd entry and no ``$HOME`` (``docker run --user 12345``): no ``~`` expands."""
    import pwd

    def no_entry(uid):
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.delenv("FLASH_LLM_CACHE", raising=False)
    monkeypatch.setattr(pwd, "getpwuid", no_entry)


# ---- 1. ptxas' report: each "Function properties for X" block describes X ------------------------------------

LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'a' for 'sm_80'
ptxas info    : Function properties for a
ptxas         .     256 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 32 registers, used 0 barriers, 384 bytes cumulative stack size, 360 bytes cmem[0]
ptxas info    : Compile time = 5.156 ms
ptxas info    : Function properties for _Z4tailPi
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Compiling entry function 'b' for 'sm_80'
ptxas info    : Function properties for b
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 64 registers, used 1 barriers, 6176 bytes smem, 448 bytes cmem[0]
ptxas info    : Compile time = 104.765 ms
ptxas info    : Function properties for _Z4tailPi
ptxas         .     128 bytes stack frame, 16 bytes spill stores, 12 bytes spill loads
ptxas info    : Function properties for $__internal_0_$__cuda_sm20_div_u64
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
"""


def test_a_device_function_block_does_not_overwrite_the_kernel_before_it():
    """A called device function's stack and spills are its own (the largest over the kernels it is compiled into),
    and leave the kernel listed before it as ptxas reported that kernel (they were written over it)."""
    c = _build.Compiled("sm_80", b"", LOG, False)
    res = c.resources()
    assert set(res) == {"a", "b"}
    assert res["a"] == {"stack": 256, "spill_stores": 8, "spill_loads": 4, "registers": 32, "smem": 0,
                        "cumulative_stack": 384}
    assert res["b"] == {"stack": 0, "spill_stores": 0, "spill_loads": 0, "registers": 64, "smem": 6176}
    assert c.device_functions() == {
        "_Z4tailPi": {"stack": 128, "spill_stores": 16, "spill_loads": 12},
        "$__internal_0_$__cuda_sm20_div_u64": {"stack": 0, "spill_stores": 0, "spill_loads": 0}}


def test_a_compiled_device_function_reports_under_its_own_name(nvrtc):
    """Through NVRTC: ``k1`` has no stack frame of its own while the recursive ``rec`` it calls has one and spills
    (``k1`` was reported with ``rec``'s figures); ``k3`` keeps its own frame."""
    # sm_90: NVRTC 13.0 (the device image's) returns no ptxas report for this source on sm_80, 13.5 does
    c = _build.compile_kernels("sm_90", source=CALLS, use_cache=False)
    if "ptxas info" not in c.log and _build.nvrtc_version() < (13, 5):  # (13.0 returned none on sm_90 too: session 88)
        pytest.skip(f"NVRTC {_build.nvrtc_version()} returned no ptxas report")
    assert "ptxas info" in c.log, c.log  # (OPTIONS ask ptxas for its report: --ptxas-options=-v)
    res = c.resources()
    assert set(res) == {"k1", "k2", "k3"}
    assert (res["k1"]["stack"], res["k1"]["spill_stores"], res["k1"]["spill_loads"]) == (0, 0, 0), c.log
    assert res["k3"]["stack"] > 0, c.log
    fns = c.device_functions()
    assert fns["_Z3recPii"]["stack"] > 0 and fns["_Z3recPii"]["spill_stores"] > 0, c.log
    assert fns["_Z3bigPii"]["stack"] == 0, c.log


# ---- 2. no home directory: compiled all the same, without the cache -------------------------------------------

def test_no_home_directory_compiles_without_the_cache(nvrtc, monkeypatch, capsys):
    """Without a home directory (and no ``FLASH_LLM_CACHE``) a compile works, with or without the cache, and
    ``cache_error`` says why nothing was cached (it raised "Could not determine home directory." even with
    ``use_cache=False``); ``is_cached`` says False; ``cache_dir`` names ``FLASH_LLM_CACHE`` in its error."""
    _no_home(monkeypatch)
    plain = _build.compile_kernels("sm_80", source=SMALL, use_cache=False)
    assert not plain.cached and plain.cache_error is None and _build._cubin_ok(plain.cubin, "sm_80")
    c = _build.compile_kernels("sm_80", source=SMALL, notify=True)
    assert not c.cached and c.cubin == plain.cubin
    assert "FLASH_LLM_CACHE" in c.cache_error and "home directory" in c.cache_error
    err = capsys.readouterr().err
    assert "compiling the CUDA kernels for sm_80" in err and "not cached" in err
    assert _build.is_cached("sm_80") is False
    with pytest.raises(RuntimeError, match="FLASH_LLM_CACHE"):
        _build.cache_dir()
    monkeypatch.setenv("FLASH_LLM_CACHE", "~/fl")  # (a ~ that cannot expand either)
    c = _build.compile_kernels("sm_80", source=SMALL)
    assert not c.cached and "FLASH_LLM_CACHE='~/fl'" in c.cache_error


# ---- 6. cached cubins get 0o666 less the umask -------------------------------------------------------------------

@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_a_cached_cubin_honours_the_umask(tmp_path, umask):
    """A stored cubin's mode is ``0o666 & ~umask`` (0o644 under umask 022), as any file the user writes, so a
    cache shared between users is readable by all (mkstemp made every one 0o600)."""
    old = os.umask(umask)
    try:
        assert _build._store_cubin(tmp_path / "cubin" / "x.cubin", b"\x7fELF") is None
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "cubin" / "x.cubin").st_mode) == 0o666 & ~umask
    assert os.listdir(tmp_path / "cubin") == ["x.cubin"]


# ---- 9. only a CUDA ELF for the requested SM comes from the cache -----------------------------------------------

def test_cubin_ok_wants_a_cuda_elf_for_the_arch(nvrtc):
    """``_cubin_ok`` refuses a 64-bit ELF that is not CUDA's (e_machine 190) and, given an arch, a cubin whose
    e_flags name another SM, in either CUDA ELF layout (SM in bits 8-15 from CUDA 13, bits 0-7 before)."""
    with open(sys.executable, "rb") as f:
        host = f.read()
    if host[:6] != b"\x7fELF\x02\x01":
        pytest.skip("the Python binary is not a 64-bit little-endian ELF")
    assert not _build._cubin_ok(host) and not _build._cubin_ok(host, "sm_80")
    cubins = {a: _build.compile_kernels(a, source=SMALL, use_cache=False).cubin for a in ("sm_80", "sm_86", "sm_90")}
    for arch, cubin in cubins.items():
        assert _build._cubin_ok(cubin) and _build._cubin_ok(cubin, arch)
        for other in {"sm_80", "sm_86", "sm_89", "sm_90"} - {arch}:
            assert not _build._cubin_ok(cubin, other), (arch, other)
    assert _build._cubin_ok(cubins["sm_90"], "sm_90a")
    old = bytearray(cubins["sm_80"])  # (the first CUDA ELF ABI, EI_ABIVERSION 7, as CUDA 12 writes for sm_80)
    old[8] = 7
    old[0x30:0x34] = (0x500550).to_bytes(4, "little")
    assert _build._cubin_ok(bytes(old), "sm_80") and not _build._cubin_ok(bytes(old), "sm_86")


def test_a_foreign_elf_in_the_cache_is_compiled_again(nvrtc, tmp_path, monkeypatch):
    """An x86 program or a cubin for another SM in a cache slot is compiled again and replaced (it was returned as
    the cubin, ``cached=True``)."""
    monkeypatch.setenv("FLASH_LLM_CACHE", str(tmp_path))
    good = _build.compile_kernels("sm_80", source=SMALL)
    assert not good.cached
    [path] = _build.cache_dir().glob("spmm-sm_80-*.cubin")
    with open(sys.executable, "rb") as f:
        host = f.read()
    for foreign in (host, _build.compile_kernels("sm_90", source=SMALL, use_cache=False).cubin):
        path.write_bytes(foreign)
        again = _build.compile_kernels("sm_80", source=SMALL)
        assert not again.cached and again.cubin == good.cubin and path.read_bytes() == good.cubin
    assert _build.compile_kernels("sm_80", source=SMALL).cached


# ---- 10. no temporary file stays, whatever stops the write -----------------------------------------------------

@pytest.mark.parametrize("stop", [KeyboardInterrupt, SystemExit, RuntimeError])
def test_an_interrupted_store_leaves_no_temporary_file(tmp_path, monkeypatch, stop):
    """An interrupt (or any exception) while a cubin is stored propagates and leaves no ``*.tmp`` file behind
    (only an OSError removed it)."""
    def interrupted(*args, **kwargs):
        raise stop()

    path = tmp_path / "cubin" / "x.cubin"
    monkeypatch.setattr(_build.os, "replace", interrupted)
    with pytest.raises(stop):
        _build._store_cubin(path, b"\x7fELF" * 100)
    assert os.listdir(path.parent) == []


# ---- smaller: bad arguments named, the source named ----------------------------------------------------------

def test_a_str_source_or_str_options_are_refused_by_name():
    """``source`` must be bytes and ``extra_options`` a sequence of strings; a str is refused with a TypeError that
    names the argument (a str source failed in cache_key, a str of options was split into characters)."""
    with pytest.raises(TypeError, match=r"source=.*str"):
        _build.compile_kernels("sm_80", source=SMALL.decode(), use_cache=False)
    for bad in ("-DX=1", None, ("-DX=1", 1)):
        with pytest.raises(TypeError, match=r"extra_options="):
            _build.compile_kernels("sm_80", source=SMALL, extra_options=bad, use_cache=False)


def test_a_custom_source_fails_under_its_own_name(nvrtc):
    """NVRTC's failure on a ``source`` names that source, not spmm.cu; a bytearray source and a list of options
    (not refused above) compile."""
    with pytest.raises(_build.KernelBuildError, match=r"(?s)^NVRTC failed to compile the given source .*for sm_80"):
        _build.compile_kernels("sm_80", source=b"int broken = undefined_name;\n", use_cache=False)
    c = _build.compile_kernels("sm_80", source=bytearray(b'extern "C" __global__ void k(int* p) { p[0] = X; }'),
                               extra_options=["-DX=1"], use_cache=False)
    assert c.cubin[:4] == b"\x7fELF" and not c.cached


def test_cli_info_and_build_without_a_home_directory(monkeypatch, capsys):
    """``flash-llm info`` says there is no cubin cache and why; ``flash-llm build`` (which exists to fill it) exits 1
    with that reason, not a traceback."""
    from flash_llm import cli
    from flash_llm.kernels import _build

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.delenv("FLASH_LLM_CACHE", raising=False)
    monkeypatch.setattr(_build.Path, "home", staticmethod(no_home))
    monkeypatch.setattr(_build, "nvrtc_version", lambda: (13, 0))
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "cubin cache" in out and "none:" in out and "FLASH_LLM_CACHE" in out
    assert cli.main(["build", "--arch", "sm_90"]) == 1
    err = capsys.readouterr().err
    assert "no cubin cache to fill" in err and "FLASH_LLM_CACHE" in err

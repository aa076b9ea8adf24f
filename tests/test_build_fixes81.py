"""Session 81's fixes to the NVRTC build, its cubin cache and ``flash-llm build`` / ``info`` (bug hunt 81):

1. a cache file's name holds the sha256 of its bytes, checked when read, so a cubin damaged inside its body is compiled
   again; stores are fsynced before the rename; a cached cubin CUDA refuses to load is dropped and compiled once more;
2. the cache key counts only the NVRTC library cuda-bindings calls, not every ``libnvrtc`` mapped into the process;
3. ``supported()`` is False (with the install hint) where the NVRTC library cannot be loaded, and remembers it;
4. ``flash-llm info`` reports a cache path it cannot look at instead of crashing;
5. Ctrl-C in ``flash-llm build`` leaves at once (exit 130), without waiting for NVRTC;
6. ``flash-llm build`` accepts a read-only cache that holds every cubin, and names the directory, not its probe;
7. a full disk is found before compiling, and said as "no space left on device";
8. temporary files of killed stores are removed once stale;
9. ``FLASH_LLM_CACHE=~nosuchuser/...`` names that user;
10. the module is loaded with its device current.

Nothing here runs NVRTC on spmm.cu: a fake NVRTC (:class:`FakeNVRTC`) returns a small hand-made CUDA ELF, and a fake
driver stands in for the GPU.  Test 2 needs cuda-python's real NVRTC library (it skips without)."""

from __future__ import annotations

import builtins
import contextlib
import ctypes
import errno
import io
import os
import pwd
import signal
import stat
import struct
import threading
import time
from collections import namedtuple

import pytest
import torch

from flash_llm import cli, kernels, ops
from flash_llm.kernels import _build

SRC = b'extern "C" __global__ void k(int* p) { p[0] = 81; }\n'


def run(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def fake_cubin(sm: int = 80, body: bytes | None = None) -> bytes:
    """A 64-bit CUDA ELF (second CUDA ELF ABI: the SM in e_flags bits 8-15) of one section holding ``body``, which
    :func:`_build._cubin_ok` takes as a whole cubin for ``sm_<sm>``."""
    body = bytes(range(256)) * 32 if body is None else body
    header = bytearray(64)
    header[0:9] = b"\x7fELF\x02\x01\x01\x33\x08"
    struct.pack_into("<HHIQQQIHHHHHH", header, 0x10, 2, 190, 1, 0, 0, 64 + len(body), sm << 8, 64, 56, 0, 64, 2, 0)
    sections = bytearray(128)  # (a null section, then PROGBITS over the body)
    struct.pack_into("<IIQQQQIIQQ", sections, 64, 0, 1, 0, 0, 64, len(body), 0, 0, 1, 0)
    return bytes(header) + body + bytes(sections)


def _fill(buffer: bytes, data: bytes) -> None:
    """Write ``data`` into ``buffer`` in place, as cuda-bindings' NVRTC does into the bytes it is given."""
    assert len(buffer) == len(data)
    if isinstance(buffer, bytearray):  # (what compile_kernels passes since session 83)
        buffer[:] = data
        return
    assert len(data) > 1  # (never a 1-byte bytes: CPython shares those)
    ctypes.memmove(ctypes.cast(ctypes.c_char_p(buffer), ctypes.c_void_p).value, data, len(data))


class FakeNVRTC:
    """The NVRTC calls :func:`_build.compile_kernels` makes; every compile returns :attr:`cubin`."""

    def __init__(self, cubin: bytes):
        self.cubin = cubin
        self.compiles = 0

    def nvrtcVersion(self):
        return 0, 13, 5

    def nvrtcCreateProgram(self, source, name, n, headers, includes):
        return 0, "program"

    def nvrtcCompileProgram(self, program, n, options):
        self.compiles += 1
        return (0,)

    def nvrtcGetProgramLogSize(self, program):
        return 0, 0

    def nvrtcGetProgramLog(self, program, buffer):
        return (0,)

    def nvrtcGetCUBINSize(self, program):
        return 0, len(self.cubin)

    def nvrtcGetCUBIN(self, program, buffer):
        _fill(buffer, self.cubin)
        return (0,)

    def nvrtcDestroyProgram(self, program):
        return (0,)


@pytest.fixture
def fake(monkeypatch, tmp_path):
    """A fake NVRTC, its build fixed, and the cache in ``tmp_path / "cubin"``."""
    monkeypatch.setenv("FLASH_LLM_CACHE", str(tmp_path))
    nvrtc = FakeNVRTC(fake_cubin())
    monkeypatch.setattr(_build, "_nvrtc", lambda: nvrtc)
    monkeypatch.setattr(_build, "nvrtc_build", lambda: "libnvrtc:1")
    return nvrtc


def _files(root) -> list[str]:
    return sorted(os.listdir(root)) if os.path.isdir(root) else []


# ---- 1. a checksum in the name; fsync; a cubin CUDA refuses is compiled again -----------------------------------

def test_a_cubin_damaged_inside_its_body_is_compiled_again(fake, tmp_path):
    """64 KiB zeroed inside a cached cubin (its size, header and section table intact, what a crash before the data
    reached the disk leaves) is compiled again and replaced (it was returned, ``cached=True``)."""
    good = _build.compile_kernels("sm_80", source=SRC)
    assert not good.cached and fake.compiles == 1
    [name] = _files(tmp_path / "cubin")
    path = tmp_path / "cubin" / name
    damaged = bytearray(path.read_bytes())
    damaged[1000:1000 + 4096] = bytes(4096)
    assert _build._cubin_ok(bytes(damaged), "sm_80")  # (the header checks cannot see it)
    path.write_bytes(bytes(damaged))
    again = _build.compile_kernels("sm_80", source=SRC)
    assert not again.cached and again.cubin == good.cubin and fake.compiles == 2
    assert _files(tmp_path / "cubin") == [name] and path.read_bytes() == good.cubin
    third = _build.compile_kernels("sm_80", source=SRC)
    assert third.cached and third.cubin == good.cubin and fake.compiles == 2 and third.path == path


def test_a_cache_file_of_the_scheme_before_is_missed_not_loaded(fake, tmp_path):
    """A cubin at the slot's name without a digest (the scheme before) is compiled again, without an error, and
    left alone."""
    slot, _ = _build._cache_path("sm_80", SRC, _build._options("sm_80"))
    slot.parent.mkdir(parents=True)
    slot.write_bytes(fake_cubin(body=b"old" * 1000))
    c = _build.compile_kernels("sm_80", source=SRC)
    assert not c.cached and c.cubin == fake.cubin and fake.compiles == 1
    assert slot.read_bytes() == fake_cubin(body=b"old" * 1000)
    assert _build.compile_kernels("sm_80", source=SRC).cached


def test_a_store_is_fsynced_before_its_rename_and_the_directory_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync " + ("directory" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"))
        real_fsync(fd)

    def replace(a, b):
        events.append("replace")
        real_replace(a, b)

    monkeypatch.setattr(_build.os, "fsync", fsync)
    monkeypatch.setattr(_build.os, "replace", replace)
    assert _build._store_cubin(tmp_path / "cubin" / "x.cubin", b"\x7fELF" * 100) is None
    assert events == ["fsync file", "replace", "fsync directory"]
    assert _files(tmp_path / "cubin") == ["x.cubin"]


class FakeDriver:
    """``cuModuleLoadData`` failing the first ``failures`` times (CUDA_ERROR_INVALID_IMAGE); each load records the
    device current at the time (:func:`current_device`)."""

    def __init__(self, failures: int, current: list):
        self.failures, self.current, self.loads = failures, current, []

    def cuModuleLoadData(self, cubin):
        self.loads.append((bytes(cubin), self.current[-1] if self.current else None))
        if len(self.loads) <= self.failures:
            return 200, None
        return 0, f"module{len(self.loads)}"

    def cuGetErrorName(self, err):
        return 0, b"CUDA_ERROR_INVALID_IMAGE"

    def cuModuleGetFunction(self, module, name):
        return 0, (module, name)


@pytest.fixture
def gpu(monkeypatch):
    """A fake GPU (sm_80) behind ``_function``: returns ``(make_driver, current)``; ``current`` lists the devices
    entered with ``torch.cuda.device``."""
    current: list = []

    @contextlib.contextmanager
    def device(index):
        current.append(index)
        try:
            yield
        finally:
            current.pop()

    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(_build, "device_arch", lambda index: "sm_80")
    monkeypatch.setattr(_build, "_modules", {})

    def make_driver(failures):
        driver = FakeDriver(failures, current)
        monkeypatch.setattr(_build, "_driver", lambda: driver)
        return driver

    return make_driver, current


def test_a_cached_cubin_cuda_refuses_is_dropped_and_compiled_once_more(fake, gpu, tmp_path, capsys):
    make_driver, _ = gpu
    _build.compile_kernels("sm_80")  # (fills the cache: spmm.cu's slot, compiled by the fake)
    [name] = _files(tmp_path / "cubin")
    driver = make_driver(failures=1)
    fn = _build._function(0, "bitmap_to_dense")
    assert fn == ("module2", b"bitmap_to_dense")
    assert fake.compiles == 2 and len(driver.loads) == 2
    assert _files(tmp_path / "cubin") == [name]  # (stored again)
    assert "cannot be loaded" in capsys.readouterr().err


def test_a_fresh_cubin_cuda_refuses_is_not_compiled_again(fake, gpu, tmp_path):
    make_driver, _ = gpu
    driver = make_driver(failures=5)
    with pytest.raises(_build.CudaDriverError, match="CUDA_ERROR_INVALID_IMAGE"):
        _build._function(0, "bitmap_to_dense")
    assert fake.compiles == 1 and len(driver.loads) == 1


# ---- 10. the module is loaded with its device current ----------------------------------------------------------

def test_the_module_is_loaded_with_its_device_current(fake, gpu):
    """``cuda:1`` while device 0 is current: cuModuleLoadData runs inside ``torch.cuda.device(1)``, so the module lands
    in device 1's context."""
    make_driver, current = gpu
    driver = make_driver(failures=0)
    _build._function(1, "bitmap_to_dense")
    assert [device for _, device in driver.loads] == [1] and current == []


# ---- 2. the cache key counts only the NVRTC that cuda-bindings calls --------------------------------------------

@pytest.fixture
def real_nvrtc(nvrtc):
    _build.nvrtc_build.cache_clear()
    yield
    _build.nvrtc_build.cache_clear()


def _with_mapped(monkeypatch, *libraries):
    """``/proc/self/maps`` read through ``open`` lists ``libraries`` too (other NVRTCs, e.g. torch's)."""
    real_open = builtins.open

    def fake_open(file, *args, **kwargs):
        if file == "/proc/self/maps":
            with real_open(file) as f:
                text = f.read()
            extra = "".join(f"7f00{i:08x}000-7f00{i:08x}fff r-xp 00000000 00:00 {i + 1} {lib}\n"
                            for i, lib in enumerate(libraries))
            return io.StringIO(text + extra)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)


def test_another_libnvrtc_in_the_process_keeps_the_key(real_nvrtc, monkeypatch, tmp_path):
    """A second libnvrtc mapped into the process (another major, or the same major from elsewhere) leaves
    ``nvrtc_build`` and so the cache key as they were (each was added to the key)."""
    plain = _build.nvrtc_build()
    key = _build.cache_key(SRC, ("-O3",), "sm_90")
    assert plain.startswith("libnvrtc:") and ";" not in plain
    major, _ = _build.nvrtc_version()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    other = tmp_path / "a" / "libnvrtc.so.12"
    other.write_bytes(b"\0" * 121280)
    same_major = tmp_path / "b" / f"libnvrtc.so.{major}"
    same_major.write_bytes(b"\0" * 4321)
    _with_mapped(monkeypatch, other, same_major)
    _build.nvrtc_build.cache_clear()
    assert _build.nvrtc_build() == plain
    assert _build.cache_key(SRC, ("-O3",), "sm_90") == key


def test_without_the_bindings_hook_only_nvrtcs_major_is_counted(real_nvrtc, monkeypatch, tmp_path):
    """Where cuda-bindings cannot say which library it calls, the mapped ``libnvrtc.so.<major>`` of nvrtcVersion's
    major is counted, another major is not."""
    plain = _build.nvrtc_build()
    major, _ = _build.nvrtc_version()
    other = tmp_path / f"libnvrtc.so.{major + 1}"
    other.write_bytes(b"\0" * 121280)
    _with_mapped(monkeypatch, other)
    monkeypatch.setattr(_build, "_nvrtc_symbol_library", lambda: None, raising=False)
    _build.nvrtc_build.cache_clear()
    assert _build.nvrtc_build() == plain


def test_the_library_named_is_the_one_that_defines_nvrtcversion(real_nvrtc):
    path = _build._nvrtc_symbol_library()
    if path is None:
        pytest.skip("this cuda-bindings has no _inspect_function_pointer")
    assert os.path.basename(path).startswith("libnvrtc.so") and _build.nvrtc_build() == \
        f"libnvrtc:{os.stat(path).st_size}"


# ---- 3. no NVRTC library: not supported, with the hint, and remembered ----------------------------------------

def test_no_nvrtc_library_is_not_supported_and_is_remembered(monkeypatch, capsys):
    bindings = pytest.importorskip("cuda.bindings.nvrtc", reason="cuda-python not installed")
    try:
        from cuda.pathfinder import DynamicLibNotFoundError as missing_error
    except ImportError:
        missing_error = RuntimeError
    calls = []

    def missing():
        calls.append(1)
        raise missing_error('Failure finding "libnvrtc.so.13 or libnvrtc.so.12": No such file')

    monkeypatch.setattr(bindings, "nvrtcVersion", missing)
    monkeypatch.setattr(_build, "_nvrtc_state", [], raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(ops, "_warned", set())
    ok, why = kernels.supported(torch.device("cuda", 0))
    assert not ok and "pip install nvidia-cuda-nvrtc" in why and "libnvrtc.so.13" in why
    with pytest.warns(RuntimeWarning, match="PyTorch reference.*pip install nvidia-cuda-nvrtc"):
        assert ops._no_kernels(torch.device("cuda", 0))  # (spmm falls back to the reference)
    for _ in range(3):
        with pytest.raises(_build.KernelBuildError, match="pip install nvidia-cuda-nvrtc"):
            _build.compile_kernels("sm_90", source=SRC, use_cache=False)
        assert kernels.supported(torch.device("cuda", 0))[0] is False
    with pytest.raises(_build.KernelBuildError, match="pip install nvidia-cuda-nvrtc"):
        _build.nvrtc_version()
    assert len(calls) == 1  # (looked for once)
    rc, _, err = run(capsys, "build", "--arch", "sm_90")
    assert rc == 1 and "pip install nvidia-cuda-nvrtc" in err


# ---- 4. info: a cache path it cannot look at ------------------------------------------------------------------

def test_info_reports_a_cache_name_too_long(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("FLASH_LLM_CACHE", str(tmp_path / ("a" * 300)))
    rc, out, err = run(capsys, "info")
    assert rc == 0, err
    line = next(ln for ln in out.splitlines() if ln.startswith("cubin cache"))
    assert "File name too long" in line and "set FLASH_LLM_CACHE" in line, line


def test_info_reports_a_cache_it_may_not_search(capsys, tmp_path, monkeypatch):
    """As for a non-root user under a directory without search permission: ``is_dir`` raises PermissionError."""
    cache = tmp_path / "noexec" / "fl"
    monkeypatch.setenv("FLASH_LLM_CACHE", str(cache))
    real_is_dir = _build.Path.is_dir

    def is_dir(self):
        if str(self).startswith(str(tmp_path / "noexec")):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_is_dir(self)

    monkeypatch.setattr(_build.Path, "is_dir", is_dir)
    rc, out, err = run(capsys, "info")
    assert rc == 0, err
    line = next(ln for ln in out.splitlines() if ln.startswith("cubin cache"))
    assert "Permission denied" in line and str(cache / "cubin") in line, line


# ---- 5. Ctrl-C in build leaves at once --------------------------------------------------------------------------

class _Exited(Exception):
    pass


def test_ctrl_c_in_build_exits_130_without_waiting_for_nvrtc(capsys, tmp_path, monkeypatch):
    release = threading.Event()
    started = threading.Event()

    def compile_kernels(arch, **kw):  # (NVRTC for minutes, not interruptible)
        started.set()
        release.wait(8)
        return _build.Compiled(arch, b"\0" * 8, "", False)

    def exit_now(code):
        raise _Exited(code)

    monkeypatch.setenv("FLASH_LLM_CACHE", str(tmp_path))
    monkeypatch.setattr(_build, "nvrtc_version", lambda: (13, 5))
    monkeypatch.setattr(_build, "is_cached", lambda arch: False)
    monkeypatch.setattr(_build, "compile_kernels", compile_kernels)
    monkeypatch.setattr(os, "_exit", exit_now)
    old_handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    main_thread = threading.main_thread().ident

    def interrupt():
        started.wait(5)
        time.sleep(0.2)
        signal.pthread_kill(main_thread, signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(_Exited) as exited:
            cli.main(["build", "--arch", "sm_80"])
        elapsed = time.perf_counter() - t0
    finally:
        signal.signal(signal.SIGINT, old_handler)
        release.set()
    assert exited.value.args == (130,)
    assert elapsed < 4, elapsed
    assert "interrupted" in capsys.readouterr().err


# ---- 6. a read-only cache holding every cubin; the directory named ----------------------------------------------

def _read_only(monkeypatch, root):
    """Creating a file under ``root`` fails with EACCES (as for a non-root user on a read-only cache)."""
    real_open = os.open

    def open_(path, flags, *args, **kwargs):
        if str(path).startswith(str(root)) and flags & os.O_CREAT:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(_build.os, "open", open_)


def test_build_accepts_a_read_only_cache_that_holds_every_cubin(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("FLASH_LLM_CACHE", str(tmp_path))
    (tmp_path / "cubin").mkdir()
    monkeypatch.setattr(_build, "nvrtc_version", lambda: (13, 5))
    monkeypatch.setattr(_build, "is_cached", lambda arch: True)
    monkeypatch.setattr(_build, "compile_kernels",
                        lambda arch, use_cache=True, **kw: _build.Compiled(arch, b"\0" * 8, "", use_cache))
    _read_only(monkeypatch, tmp_path)
    for argv in (["build", "--arch", "sm_80", "--arch", "sm_90"], ["build", "--arch", "sm_80", "--report"]):
        rc, out, err = run(capsys, *argv)
        assert rc == 0, err
        assert "sm_80:" in out and "error" not in err


def test_build_names_the_cache_directory_not_its_probe(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("FLASH_LLM_CACHE", str(tmp_path))
    root = tmp_path / "cubin"
    root.mkdir()
    monkeypatch.setattr(_build, "nvrtc_version", lambda: (13, 5))
    monkeypatch.setattr(_build, "is_cached", lambda arch: arch == "sm_90")

    def compile_kernels(*args, **kwargs):
        raise AssertionError("compiled although the cache cannot be written")

    monkeypatch.setattr(_build, "compile_kernels", compile_kernels)
    _read_only(monkeypatch, tmp_path)
    rc, out, err = run(capsys, "build", "--arch", "sm_80", "--arch", "sm_90")
    assert rc == 1 and out == "", err
    assert f"error: no cubin cache to fill: {root}: cannot write {root}: Permission denied; set FLASH_LLM_CACHE " \
           "to a writable directory" in err, err
    assert ".probe" not in err and _files(root) == []


# ---- 7. a full disk, before compiling and when storing ---------------------------------------------------------

Usage = namedtuple("Usage", "total used free")


def test_build_finds_a_full_disk_before_compiling(capsys, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setenv("FLASH_LLM_CACHE", str(tmp_path))
    monkeypatch.setattr(_build, "nvrtc_version", lambda: (13, 5))
    monkeypatch.setattr(_build, "is_cached", lambda arch: False)

    def compile_kernels(*args, **kwargs):
        raise AssertionError("compiled although the disk is full")

    monkeypatch.setattr(_build, "compile_kernels", compile_kernels)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(1 << 30, (1 << 30) - (16 << 10), 16 << 10))
    rc, out, err = run(capsys, "build", "--arch", "sm_80")
    assert rc == 1 and out == "", err
    assert f"no cubin cache to fill: {tmp_path / 'cubin'}: no space left on device" in err, err
    assert "free some space there" in err and "writable directory" not in err
    assert _files(tmp_path / "cubin") == []


def test_the_space_asked_for_is_an_existing_cubins_size_or_32_mib(tmp_path, monkeypatch):
    import shutil

    root = tmp_path / "cubin"
    assert _build.cubin_size_estimate(root) == 32 << 20
    root.mkdir()
    (root / "spmm-sm_80-x-y.cubin").write_bytes(b"\0" * (5 << 20))
    assert _build.cubin_size_estimate(root) == 5 << 20
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(1 << 30, 0, 8 << 20))
    assert _build.cache_problem(root, create=True, space=5 << 20) is None
    assert _build.cache_problem(root, create=True, space=10 << 20).startswith("no space left on device: ")


def test_enospc_when_storing_says_no_space_left(fake, capsys, tmp_path, monkeypatch):
    real_replace = os.replace

    def replace(a, b):
        if os.path.basename(b).startswith("spmm-"):
            raise OSError(errno.ENOSPC, "No space left on device", str(a))
        return real_replace(a, b)

    monkeypatch.setattr(_build.os, "replace", replace)
    rc, out, err = run(capsys, "build", "--arch", "sm_80")
    assert rc == 1
    assert "sm_80: compiled, but not stored in the cubin cache (cannot write " in err, err
    assert "no space left on device); free some space there or set FLASH_LLM_CACHE to a directory with room" in err
    assert "writable directory" not in err and _files(tmp_path / "cubin") == []


# ---- 8. stale temporary files are removed ------------------------------------------------------------------------

def _stale_files(root):
    """Two stale temporary files of the cache (a killed store, a killed probe), a fresh one and someone else's."""
    root.mkdir(parents=True, exist_ok=True)
    old = time.time() - 2 * 3600
    names = {"stale": "spmm-sm_80-0123.cubin.0123456789abcdef.tmp", "probe": ".probe-0123456789abcdef.fedc.tmp",
             "fresh": "spmm-sm_80-0123.cubin.fedcba9876543210.tmp", "foreign": "notes.tmp"}
    for kind, name in names.items():
        (root / name).write_bytes(b"\0" * 64)
        if kind != "fresh":
            os.utime(root / name, (old, old))
    return names


def test_a_store_removes_stale_temporary_files(fake, tmp_path):
    names = _stale_files(tmp_path / "cubin")
    c = _build.compile_kernels("sm_80", source=SRC)
    assert not c.cached and c.cache_error is None
    left = _files(tmp_path / "cubin")
    assert names["stale"] not in left and names["probe"] not in left
    assert names["fresh"] in left and names["foreign"] in left and c.path.name in left


def test_build_removes_stale_temporary_files(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("FLASH_LLM_CACHE", str(tmp_path))
    names = _stale_files(tmp_path / "cubin")
    monkeypatch.setattr(_build, "nvrtc_version", lambda: (13, 5))
    monkeypatch.setattr(_build, "is_cached", lambda arch: True)
    monkeypatch.setattr(_build, "compile_kernels", lambda arch, **kw: _build.Compiled(arch, b"\0" * 8, "", True))
    rc, _, err = run(capsys, "build", "--arch", "sm_80")
    assert rc == 0, err
    assert _files(tmp_path / "cubin") == sorted([names["fresh"], names["foreign"]])


# ---- 9. ~user of no such user ----------------------------------------------------------------------------------

def test_a_tilde_of_an_unknown_user_is_named(monkeypatch, tmp_path):
    user = "nosuchuser81x"
    try:
        pwd.getpwnam(user)
        pytest.skip(f"a user {user} exists")
    except KeyError:
        pass
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("FLASH_LLM_CACHE", f"~{user}/cache")
    with pytest.raises(RuntimeError) as e:
        _build.cache_dir()
    assert f"'{user}'" in str(e.value) and "no such user" in str(e.value) and "$HOME" not in str(e.value)
    c = _build._cache_dir_or_why()
    assert c[0] is None and user in c[1]

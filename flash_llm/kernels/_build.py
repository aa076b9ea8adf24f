"""Run-time compilation of the CUDA kernels with NVRTC (through ``cuda-python``) and launching.

* :func:`compile_kernels` compiles ``spmm.cu`` for one architecture (``"sm_90"``) to a cubin; it
  needs no GPU, so CI compiles for sm_80 and sm_90 through this same function.
* Cubins are cached on disk (``$FLASH_LLM_CACHE`` or ``~/.cache/flash_llm``) under a key made of the
  source hash, the options, the architecture, the NVRTC version and its library's build (:func:`nvrtc_build`).
* :func:`launch` loads the module into the current CUDA context (PyTorch's primary context) once per
  device and launches a kernel on a given stream.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import re
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .._env import env_flag

SOURCE = Path(__file__).with_name("spmm.cu")
OPTIONS = ("-std=c++17", "-lineinfo", "--ptxas-options=-v", "-default-device")
SUPPORTED_ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90")


class KernelBuildError(RuntimeError):
    """NVRTC failed to compile the kernels; the message holds its log."""


class CudaDriverError(RuntimeError):
    """A CUDA driver call failed."""


def _nvrtc():
    try:
        from cuda.bindings import nvrtc
    except ImportError as e:  # pragma: no cover - exercised only without the cuda extra
        raise ImportError("flash-llm's CUDA kernels need cuda-python's NVRTC bindings: "
                          "pip install cuda-bindings nvidia-cuda-nvrtc") from e
    return nvrtc


def _check_nvrtc(result, what: str):
    err = result[0]
    if int(err) != 0:
        raise KernelBuildError(f"{what} failed: {err}")
    return result[1:] if len(result) > 2 else (result[1] if len(result) == 2 else None)


def nvrtc_version() -> tuple[int, int]:
    nvrtc = _nvrtc()
    major, minor = _check_nvrtc(nvrtc.nvrtcVersion(), "nvrtcVersion")
    return int(major), int(minor)


@functools.lru_cache(maxsize=None)
def nvrtc_build() -> str:
    """What tells this process's NVRTC library apart from another build of the same major.minor (``nvrtcVersion``
    names no patch release, whose code generation may differ): the byte size of each ``libnvrtc.so*`` mapped into the
    process (Linux ``/proc/self/maps``, read after NVRTC is loaded; its builtins library, loaded only while compiling,
    left out), e.g. ``"libnvrtc:104857600"``; ``""`` where the maps cannot be read.  Sizes, not paths, so the same
    build installed elsewhere (a cache carried to another machine) keeps its key."""
    nvrtc_version()  # (loads the library)
    try:
        with open("/proc/self/maps") as f:
            paths = {ln.split(None, 5)[5].strip() for ln in f if "libnvrtc" in ln and len(ln.split(None, 5)) == 6}
    except OSError:
        return ""
    sizes = []
    for path in paths:
        if not os.path.basename(path).startswith("libnvrtc.so"):
            continue
        try:
            sizes.append(os.stat(path).st_size)
        except OSError:
            continue
    return ";".join(f"libnvrtc:{n}" for n in sorted(set(sizes)))


def cache_key(source: bytes, options: tuple[str, ...], arch: str) -> str:
    """The cubin cache's key: a hash of the source, the compile options, the architecture, NVRTC's version and its
    library's build (:func:`nvrtc_build`)."""
    return hashlib.sha256(b"\0".join([source, repr(options).encode(), arch.encode(), repr(nvrtc_version()).encode(),
                                      nvrtc_build().encode()])).hexdigest()[:32]


def cache_dir() -> Path:
    """Where cubins are cached: ``$FLASH_LLM_CACHE/cubin`` (``~`` expanded; unset or empty: ``~/.cache/flash_llm``)."""
    root = os.environ.get("FLASH_LLM_CACHE") or str(Path.home() / ".cache" / "flash_llm")
    return Path(root).expanduser() / "cubin"


def _cubin_ok(b: bytes) -> bool:
    """Whether ``b`` looks like a whole cubin: a 64-bit little-endian ELF whose header tables and every section's
    bytes lie inside it, so an empty, truncated or foreign cache file is compiled again, not loaded."""
    if len(b) < 64 or b[:4] != b"\x7fELF" or b[4] != 2 or b[5] != 1:
        return False

    def word(at: int, n: int) -> int:
        return int.from_bytes(b[at:at + n], "little")

    phoff, shoff = word(0x20, 8), word(0x28, 8)
    phsize, phnum, shsize, shnum = word(0x36, 2), word(0x38, 2), word(0x3A, 2), word(0x3C, 2)
    if not shoff or shsize < 64 or shoff + shsize * shnum > len(b) or phoff + phsize * phnum > len(b):
        return False
    for i in range(shnum):  # (SHT_NOBITS, type 8, holds no bytes in the file)
        h = shoff + i * shsize
        if word(h + 4, 4) != 8 and word(h + 0x18, 8) + word(h + 0x20, 8) > len(b):
            return False
    return True


@dataclass
class Compiled:
    """A cubin for ``arch`` with NVRTC's ``log`` (empty when ``cached``: read from the cache); ``cache_error`` says
    why a freshly compiled cubin could not be stored in the cache (None when it was, or when not asked to)."""

    arch: str
    cubin: bytes
    log: str
    cached: bool
    cache_error: str | None = None

    def resources(self) -> dict[str, dict[str, int]]:
        """Per kernel: registers, spill stores/loads (bytes), stack frame and static shared memory,
        parsed from ptxas' ``-v`` report in the NVRTC log (empty when loaded from the cache)."""
        out: dict[str, dict[str, int]] = {}
        current = None
        for line in self.log.splitlines():
            m = re.search(r"Compiling entry function '(\w+)'", line)
            if m:
                current = out.setdefault(m.group(1), {})
                continue
            if current is None:
                continue
            m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
            if m:
                current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
            m = re.search(r"Used (\d+) registers", line)
            if m:
                current["registers"] = int(m.group(1))
                s = re.search(r"(\d+) bytes smem", line)
                current["smem"] = int(s.group(1)) if s else 0
        return out

    def warnings(self) -> list[str]:
        return [ln for ln in self.log.splitlines() if "warning" in ln.lower()]


def compile_kernels(arch: str, *, use_cache: bool = True, extra_options: tuple[str, ...] = (),
                    source: bytes | None = None, notify: bool = False) -> Compiled:
    """Compile ``spmm.cu`` (or ``source``) for ``arch`` (e.g. ``"sm_90"``) with NVRTC; return the cubin
    and log.  ``notify``: say on stderr, before and after, when it compiles (not when the cubin comes from the
    cache): the first ``spmm`` call on a device waits for it (about a minute for the whole ``spmm.cu``).

    Raises :class:`KernelBuildError` with NVRTC's log when compilation fails.
    """
    if not re.fullmatch(r"sm_\d+a?", arch):
        raise ValueError(f"arch must look like 'sm_90', got {arch!r}")
    nvrtc = _nvrtc()
    source = SOURCE.read_bytes() if source is None else source
    path, options = _cubin_path(arch, source, extra_options)
    cached = _read_cached(path) if use_cache else None
    if cached is not None:
        return Compiled(arch, cached, "", True)

    if notify:
        print(f"flash-llm: compiling the CUDA kernels for {arch} with NVRTC (first use; about a minute; cached "
              f"in {cache_dir()}; `flash-llm build` compiles them ahead of time) ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    prog = _check_nvrtc(nvrtc.nvrtcCreateProgram(source, b"spmm.cu", 0, [], []), "nvrtcCreateProgram")
    try:
        opts = [o.encode() for o in options]
        err = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)[0]
        size = _check_nvrtc(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
        buf = b" " * size
        nvrtc.nvrtcGetProgramLog(prog, buf)
        log = buf.decode(errors="replace").rstrip("\x00 \n")
        if int(err) != 0:
            raise KernelBuildError(f"NVRTC failed to compile {SOURCE.name} for {arch} ({err}):\n{log}")
        size = _check_nvrtc(nvrtc.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize")
        cubin = b" " * size
        _check_nvrtc((nvrtc.nvrtcGetCUBIN(prog, cubin)[0], None), "nvrtcGetCUBIN")
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
    if notify:
        print(f"flash-llm: compiled in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return Compiled(arch, cubin, log, False, _store_cubin(path, cubin) if use_cache else None)


def _cubin_path(arch: str, source: bytes, extra_options: tuple[str, ...] = ()) -> tuple[Path, tuple[str, ...]]:
    """Where the cubin of ``source`` for ``arch`` is cached, and NVRTC's options for it."""
    # sm_90 builds as sm_90a: the warpgroup MMA (wgmma) of the large-N Tiled-CSL kernel needs the arch-specific
    # target; its cubin runs on compute capability 9.0 (H100, H200) only, which is what "sm_90" means here
    target = "sm_90a" if arch == "sm_90" else arch
    options = OPTIONS + tuple(extra_options) + (f"--gpu-architecture={target}",)
    return cache_dir() / f"spmm-{arch}-{cache_key(source, options, arch)}.cubin", options


def _read_cached(path: Path) -> bytes | None:
    """The whole cubin cached at ``path``, or None (missing, unreadable, a directory, empty or truncated: compiled
    again)."""
    try:
        cached = path.read_bytes()
    except OSError:
        return None
    return cached if _cubin_ok(cached) else None


def is_cached(arch: str) -> bool:
    """Whether the cache holds a whole cubin of ``spmm.cu`` for ``arch``, so :func:`compile_kernels` returns it at
    once (loads NVRTC: the cache key holds its version)."""
    return _read_cached(_cubin_path(arch, SOURCE.read_bytes())[0]) is not None


def _store_cubin(path: Path, cubin: bytes) -> str | None:
    """Write ``cubin`` to ``path`` through a temporary file of its own name (so concurrent writers never mix); return
    why it could not be stored, or None.  No partial file stays.  A cache that cannot be written only costs a
    recompile next time; ``flash-llm build``, which exists to fill it, fails instead."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(cubin)
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        return f"cannot write {e.filename or path}: {e.strerror or e}"
    return None


# ------------------------------------------------------------------------------------------------
# loading and launching
# ------------------------------------------------------------------------------------------------
def _driver():
    from cuda.bindings import driver

    return driver


def _check_cu(result, what: str):
    err = result[0]
    if int(err) != 0:
        driver = _driver()
        _, name = driver.cuGetErrorName(err)
        raise CudaDriverError(f"{what} failed: {name.decode() if isinstance(name, bytes) else name}")
    return result[1] if len(result) == 2 else result[1:]


_lock = threading.Lock()
_modules: dict[int, tuple[object, dict[str, object]]] = {}


def device_arch(device_index: int) -> str:
    import torch

    major, minor = torch.cuda.get_device_capability(device_index)
    return f"sm_{major}{minor}"


def _function(device_index: int, name: str):
    with _lock:
        entry = _modules.get(device_index)
        if entry is None:
            arch = device_arch(device_index)
            compiled = compile_kernels(arch, notify=True)
            module = _check_cu(_driver().cuModuleLoadData(compiled.cubin), "cuModuleLoadData")
            entry = _modules[device_index] = (module, {})
        module, funcs = entry
        fn = funcs.get(name)
        if fn is None:
            fn = funcs[name] = _check_cu(_driver().cuModuleGetFunction(module, name.encode()),
                                         f"cuModuleGetFunction({name})")
        return fn


#: programmatic dependent launch for the launches that ask for it (``launch(pdl=True)``) on sm_90 and newer;
#: ``FLASH_LLM_PDL=0`` turns it off (the kernels then run strictly one after the other, as without it)
PDL = env_flag("FLASH_LLM_PDL", True)
_sm90: dict[int, bool] = {}


def sm90(device_index: int) -> bool:
    """Whether the device has compute capability 9.0 or more (programmatic launches, thread-block clusters)."""
    ok = _sm90.get(device_index)
    if ok is None:
        import torch

        ok = _sm90[device_index] = torch.cuda.get_device_capability(device_index)[0] >= 9
    return ok


_dyn_smem: dict[tuple[int, str], int] = {}


def _allow_shared(fn, device_index: int, name: str, shared: int) -> None:
    """Let ``fn`` take ``shared`` bytes of dynamic shared memory.  Static plus dynamic shared memory above 48 KiB
    must be asked for; asking for any dynamic amount covers kernels that also have static shared memory."""
    key = (device_index, name)
    if shared > 0 and _dyn_smem.get(key, 0) < shared:
        drv = _driver()
        _check_cu(drv.cuFuncSetAttribute(
            fn, drv.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, shared),
            f"cuFuncSetAttribute({name}, {shared} bytes of shared memory)")
        _dyn_smem[key] = shared


def launch(name: str, grid: tuple[int, int, int], block: int, args: list, stream: int, device_index: int,
           shared: int = 0, pdl: bool = False, cluster: tuple[int, int, int] | None = None) -> None:
    """Launch kernel ``name`` with ``args`` (ints for pointers/ints, as ``(value, ctype)`` pairs) and ``shared``
    bytes of dynamic shared memory.

    ``pdl``: launch with programmatic stream serialization (sm_90+, unless ``FLASH_LLM_PDL=0``): the kernel may
    start before the previous kernel in the stream has finished, so it must wait for it (``griddepcontrol.wait``)
    before reading its results.  ``cluster``: thread-block cluster dimensions (sm_90+; the caller checks), each
    dividing the grid's."""
    launch_function(_function(device_index, name), name, grid, block, args, stream, device_index, shared, pdl,
                    cluster)


def launch_function(fn, name: str, grid: tuple[int, int, int], block: int, args: list, stream: int,
                    device_index: int, shared: int = 0, pdl: bool = False,
                    cluster: tuple[int, int, int] | None = None) -> None:
    """:func:`launch` of a function handle ``fn`` (``CUfunction``) from any module (a benchmark's prototype
    compiled with :func:`compile_kernels` ``source=``); ``name`` names it in errors and the shared-memory cache."""
    _allow_shared(fn, device_index, name, shared)
    holders = [ctype(value) for value, ctype in args]
    ptrs = (ctypes.c_void_p * len(holders))(*[ctypes.addressof(h) for h in holders])
    drv = _driver()
    attrs = []
    if pdl and PDL and sm90(device_index):
        attr = drv.CUlaunchAttribute()
        attr.id = drv.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
        attr.value.programmaticStreamSerializationAllowed = 1
        attrs.append(attr)
    if cluster is not None:
        attr = drv.CUlaunchAttribute()
        attr.id = drv.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION
        attr.value.clusterDim.x, attr.value.clusterDim.y, attr.value.clusterDim.z = cluster
        attrs.append(attr)
    if attrs:
        cfg = drv.CUlaunchConfig()
        cfg.gridDimX, cfg.gridDimY, cfg.gridDimZ = grid
        cfg.blockDimX, cfg.blockDimY, cfg.blockDimZ = block, 1, 1
        cfg.sharedMemBytes = shared
        cfg.hStream = drv.CUstream(stream)
        cfg.attrs = attrs
        cfg.numAttrs = len(attrs)
        _check_cu((drv.cuLaunchKernelEx(cfg, fn, ctypes.addressof(ptrs), 0)[0], None), f"launch of {name}")
        return
    _check_cu((drv.cuLaunchKernel(fn, grid[0], grid[1], grid[2], block, 1, 1, shared, stream,
                                  ctypes.addressof(ptrs), 0)[0], None), f"launch of {name}")


_occupancy: dict[tuple[int, str, int, int], int] = {}


def blocks_per_sm(name: str, device_index: int, block: int, shared: int = 0) -> int:
    """Resident blocks per SM of kernel ``name`` at ``block`` threads and ``shared`` bytes of dynamic shared memory
    (CUDA occupancy calculator)."""
    key = (device_index, name, block, shared)
    n = _occupancy.get(key)
    if n is None:
        fn = _function(device_index, name)
        _allow_shared(fn, device_index, name, shared)
        n = _occupancy[key] = int(_check_cu(
            _driver().cuOccupancyMaxActiveBlocksPerMultiprocessor(fn, block, shared), "cuOccupancyMaxActiveBlocks"))
    return max(1, n)

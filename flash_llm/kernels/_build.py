"""Run-time compilation of the CUDA kernels with NVRTC (through ``cuda-python``) and launching.

* :func:`compile_kernels` compiles ``spmm.cu`` for one architecture (``"sm_90"``) to a cubin; it
  needs no GPU, so CI compiles for sm_80 and sm_90 through this same function.
* Cubins are cached on disk (``$FLASH_LLM_CACHE/cubin``, by default ``~/.cache/flash_llm/cubin``) under a key made
  of the source hash, the options, the architecture, the NVRTC version and its library's build
  (:func:`nvrtc_build`); each file's name ends in the sha256 of its content, checked when it is read.
* :func:`launch` loads the module into the device's CUDA context (PyTorch's primary context, made current for the
  load) once per device and launches a kernel on a given stream.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import os
import re
import secrets
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .._env import env_flag

SOURCE = Path(__file__).with_name("spmm.cu")
OPTIONS = ("-std=c++17", "-lineinfo", "--ptxas-options=-v", "-default-device")
SUPPORTED_ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90")


def canonical_arch(arch: str) -> str:
    """The name the cubin cache keys ``spmm.cu``'s cubin for ``arch`` by: the runtime looks it up by
    :func:`device_arch`'s ``"sm_NN"``, so an arch-specific or family name is that plain name.  ``"sm_90a"`` is
    ``"sm_90"``: sm_90 is built as sm_90a (:func:`_options`), the same cubin.  Any other ``"sm_NNa"`` (or
    ``"sm_NNf"``) is ``"sm_NN"``, built for plain sm_NN as the runtime builds it on that GPU (``spmm.cu`` uses no
    feature of those targets), so ``flash-llm build --arch sm_100a`` fills the slot a B200 reads; any other name as
    it is."""
    m = re.fullmatch(r"(sm_\d+)[af]", arch)
    return m.group(1) if m else arch


class KernelBuildError(RuntimeError):
    """NVRTC failed to compile the kernels; the message holds its log."""


class CudaDriverError(RuntimeError):
    """A CUDA driver call failed."""


#: what to install when the NVRTC library itself (not its Python bindings) cannot be loaded
NVRTC_HINT = "pip install nvidia-cuda-nvrtc"

#: ``[None]`` once NVRTC's library has loaded, ``[why]`` once it has failed to (remembered for the process: looking
#: for the library again on every call costs a file system search and fails the same way); empty before the first try
_nvrtc_state: list[str | None] = []
_nvrtc_lock = threading.Lock()


def _nvrtc():
    """cuda-python's NVRTC bindings, with their library loaded.  ImportError without the bindings;
    :class:`KernelBuildError` (with :data:`NVRTC_HINT`) where the library cannot be loaded (cuda-bindings installed
    alone, ``pip install --no-deps``, a slim image), from the first failure on without trying again."""
    try:
        from cuda.bindings import nvrtc
    except ImportError as e:  # pragma: no cover - exercised only without the cuda extra
        raise ImportError("flash-llm's CUDA kernels need cuda-python's NVRTC bindings: "
                          "pip install cuda-bindings nvidia-cuda-nvrtc") from e
    if not _nvrtc_state:
        with _nvrtc_lock:
            if not _nvrtc_state:  # (cuda-bindings loads the library at the first call into it)
                try:
                    nvrtc.nvrtcVersion()
                    _nvrtc_state.append(None)
                except (RuntimeError, OSError) as e:
                    _nvrtc_state.append(f"the NVRTC library cannot be loaded ({type(e).__name__}: {str(e).strip()}): "
                                        f"{NVRTC_HINT}")
    if _nvrtc_state[0] is not None:
        raise KernelBuildError(_nvrtc_state[0])
    return nvrtc


def nvrtc_problem() -> str | None:
    """Why NVRTC cannot be used (its bindings or its library missing, with what to install), or None; the library
    is loaded once, and a failure remembered (:func:`_nvrtc`)."""
    try:
        _nvrtc()
    except ImportError as e:
        return str(e)
    except KernelBuildError as e:
        return str(e)
    return None


def _check_nvrtc(result, what: str):
    err = result[0]
    if int(err) != 0:
        raise KernelBuildError(f"{what} failed: {err}")
    return result[1:] if len(result) > 2 else (result[1] if len(result) == 2 else None)


def nvrtc_version() -> tuple[int, int]:
    nvrtc = _nvrtc()
    major, minor = _check_nvrtc(nvrtc.nvrtcVersion(), "nvrtcVersion")
    return int(major), int(minor)


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p), ("dli_sname", ctypes.c_char_p),
                ("dli_saddr", ctypes.c_void_p)]


def _library_of(address: int) -> str | None:
    """The file of the shared library mapped at ``address`` (``dladdr``), or None."""
    for name in (None, "libdl.so.2"):  # (dladdr is in libc from glibc 2.34 on, in libdl before)
        try:
            dladdr = ctypes.CDLL(name).dladdr
        except (OSError, AttributeError, TypeError):
            continue
        dladdr.argtypes, dladdr.restype = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)], ctypes.c_int
        info = _DlInfo()
        if dladdr(ctypes.c_void_p(address), ctypes.byref(info)) and info.dli_fname:
            return os.fsdecode(info.dli_fname)
        return None
    return None


def _nvrtc_symbol_library() -> str | None:
    """The NVRTC library that cuda-bindings calls: the file holding the ``nvrtcVersion`` its NVRTC module resolved
    (cuda-bindings' ``_inspect_function_pointer``, then ``dladdr``); None where this cuda-bindings cannot say."""
    try:
        from cuda.bindings._internal import nvrtc as internal

        address = internal._inspect_function_pointer("__nvrtcVersion")
    except Exception:  # (an older or newer cuda-bindings without this private hook: any failure means "unknown")
        return None
    return _library_of(address) if address else None


def _mapped_nvrtc_libraries(major: int) -> set[str]:
    """The ``libnvrtc.so.<major>*`` files mapped into this process (Linux ``/proc/self/maps``); empty where the
    maps cannot be read."""
    try:
        with open("/proc/self/maps") as f:
            lines = [ln.split(None, 5) for ln in f if "libnvrtc" in ln]
    except OSError:
        return set()
    paths = {parts[5].strip() for parts in lines if len(parts) == 6}
    return {p for p in paths if re.fullmatch(rf"libnvrtc\.so\.{major}(\.[\d.]+)?", os.path.basename(p))}


@functools.lru_cache(maxsize=None)
def nvrtc_build() -> str:
    """What tells this process's NVRTC library apart from another build of the same major.minor (``nvrtcVersion``
    names no patch release, whose code generation may differ): the byte size of the library that cuda-bindings calls,
    e.g. ``"libnvrtc:104857600"``; ``""`` where it cannot be found.  Sizes, not paths, so the same build installed
    elsewhere (a cache carried to another machine) keeps its key.

    Which library: the one holding the ``nvrtcVersion`` function that cuda-bindings resolved and calls (its function
    pointer, from cuda-bindings' ``_inspect_function_pointer``, given to ``dladdr``), so another NVRTC mapped into the
    process (torch's, cuDNN's or CuPy's ``libnvrtc.so.12``, loaded lazily, and so before or after the first lookup as
    it happens) does not change the key.  Where that hook is missing (another cuda-bindings release) it falls back to
    the ``libnvrtc.so.<major>`` files mapped into the process (``/proc/self/maps``) whose major is
    ``nvrtcVersion``'s; the builtins library (loaded only while compiling) is never counted."""
    major, _ = nvrtc_version()  # (loads the library)
    path = _nvrtc_symbol_library()
    paths = {path} if path else _mapped_nvrtc_libraries(major)
    sizes = set()
    for p in paths:
        try:
            sizes.add(os.stat(p).st_size)
        except OSError:
            continue
    return ";".join(f"libnvrtc:{n}" for n in sorted(sizes))


def cache_key(source: bytes, options: tuple[str, ...], arch: str) -> str:
    """The cubin cache's key: a hash of the source, the compile options, the architecture, NVRTC's version and its
    library's build (:func:`nvrtc_build`)."""
    return hashlib.sha256(b"\0".join([source, repr(options).encode(), arch.encode(), repr(nvrtc_version()).encode(),
                                      nvrtc_build().encode()])).hexdigest()[:32]


def cache_dir() -> Path:
    """Where cubins are cached: ``$FLASH_LLM_CACHE/cubin`` (``~`` expanded; blanks around it stripped, as for every
    ``FLASH_LLM_*`` variable; unset, empty or blank: ``~/.cache/flash_llm/cubin``).

    Raises RuntimeError, naming ``FLASH_LLM_CACHE``, where that needs a home directory and none can be found
    (``$HOME`` unset and no passwd entry for this user: a container run with an arbitrary ``--user``);
    :func:`compile_kernels` then compiles without the cache and says why in :attr:`Compiled.cache_error`."""
    root = (os.environ.get("FLASH_LLM_CACHE") or "").strip()
    try:
        return Path(root or Path.home() / ".cache" / "flash_llm").expanduser() / "cubin"
    except RuntimeError as e:  # (Path.home / expanduser: "Could not determine home directory.")
        user = re.match(r"~([^/]+)", root or "")
        if user:  # (~name: no user of that name, whatever $HOME says)
            raise RuntimeError(f"FLASH_LLM_CACHE={root!r} names the home directory of {user.group(1)!r}, and there "
                               "is no such user; set FLASH_LLM_CACHE to a writable directory") from e
        where = f"FLASH_LLM_CACHE={root!r}" if root else "the default cubin cache (~/.cache/flash_llm/cubin)"
        raise RuntimeError(f"{where} needs a home directory and none can be found ($HOME is unset and this user "
                           "has no passwd entry); set FLASH_LLM_CACHE to a writable directory") from e


def _cache_dir_or_why() -> tuple[Path | None, str | None]:
    """:func:`cache_dir`, or None and why there is no cache."""
    try:
        return cache_dir(), None
    except RuntimeError as e:
        return None, str(e)


#: what a cubin of ``spmm.cu`` is taken to need on disk before it is compiled, where the cache holds none to go by
#: (CUDA 13.5: 12.8 MB for sm_80, 17.9 MB for sm_90)
CUBIN_SIZE_ESTIMATE = 32 << 20

NO_SPACE = "no space left on device"


def cubin_size_estimate(root: Path) -> int:
    """The room one more cubin takes in the cache ``root``: its largest ``spmm-*.cubin`` where it holds one, else
    :data:`CUBIN_SIZE_ESTIMATE`."""
    sizes = []
    with contextlib.suppress(OSError):
        with os.scandir(root) as it:
            for e in it:
                if e.name.startswith("spmm-") and e.name.endswith(".cubin"):
                    with contextlib.suppress(OSError):
                        sizes.append(e.stat().st_size)
    return max(sizes) if sizes else CUBIN_SIZE_ESTIMATE


def cache_problem(root: Path, *, create: bool = False, space: int = 0) -> str | None:
    """Why the cubin cache directory ``root`` (:func:`cache_dir`) cannot take new cubins, or None.

    ``create=False`` (``flash-llm info``) only looks: ``root``, or where it does not exist yet its nearest existing
    ancestor, must be a directory this process may write.  ``create=True`` (``flash-llm build``, before it compiles)
    makes ``root`` with its parents, writes and removes a probe file there and checks that its file system has
    ``space`` bytes free (``shutil.disk_usage``), so what cannot be stored is said in a moment, not after minutes of
    compiling.  The message names ``root``, never the probe file."""
    if create:  # (an empty probe stored as a cubin is: _store_cubin makes the directories and cleans up)
        probe = root / f".probe-{secrets.token_hex(8)}"
        try:
            _write_atomically(probe, b"", sync=False)
        except OSError as e:
            return f"cannot write {root}: {_reason(e)}"
        finally:
            with contextlib.suppress(OSError):
                os.unlink(probe)
        try:
            free = shutil.disk_usage(root).free
        except OSError:
            return None
        if free < space:
            return (f"{NO_SPACE}: {root} has {free / 2**20:.1f} MiB free, and the cubins to store need about "
                    f"{space / 2**20:.0f} MiB")
        return None
    try:
        here = root
        while not os.path.lexists(here) and here.parent != here:
            here = here.parent
        if os.path.lexists(here) and not here.is_dir():
            what = "a dangling symbolic link" if here.is_symlink() and not here.exists() else "not a directory"
            return f"{here} is {what}" if here == root else f"cannot be created: {here} is {what}"
        if not os.access(here, os.W_OK | os.X_OK):
            return f"no write permission on {here}" if here == root else \
                f"cannot be created: no write permission on {here}"
    except OSError as e:  # (e.g. a name longer than the file system allows)
        return f"cannot be used: {e.strerror or e}"
    return None


#: ``e_machine`` of a CUDA ELF (a cubin)
EM_CUDA = 190


def _arch_sm(arch: str) -> int | None:
    """The SM number of ``arch`` (``"sm_90a"`` -> 90, ``"sm_100f"`` -> 100), None when it names none."""
    m = re.fullmatch(r"sm_(\d+)[af]?", arch)
    return int(m.group(1)) if m else None


def _cubin_ok(b: bytes, arch: str | None = None) -> bool:
    """Whether ``b`` looks like a whole cubin (for ``arch`` when given): a 64-bit little-endian CUDA ELF
    (``e_machine`` 190) whose header tables and every section's bytes lie inside it, and whose ``e_flags`` name the
    SM of ``arch``, so an empty, truncated or foreign cache file (another program, a cubin for another GPU) is
    compiled again, not loaded."""
    if len(b) < 64 or b[:4] != b"\x7fELF" or b[4] != 2 or b[5] != 1:
        return False

    def word(at: int, n: int) -> int:
        return int.from_bytes(b[at:at + n], "little")

    if word(0x12, 2) != EM_CUDA:
        return False
    if arch is not None:
        # the SM number sits in e_flags bits 0-7 in the first CUDA ELF ABI (EI_ABIVERSION 7: CUDA 12 and older) and
        # in bits 8-15 in the second (8: every target from CUDA 13 on, e.g. sm_80 0x9005004, sm_90a 0x9005a04)
        flags = word(0x30, 4)
        sm = flags & 0xFF if b[8] == 7 else (flags >> 8) & 0xFF
        if sm != _arch_sm(arch):
            return False
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
    why a freshly compiled cubin could not be stored in the cache (None when it was, or when not asked to);
    ``path``: the cache file it was read from or stored to (None when neither)."""

    arch: str
    cubin: bytes
    log: str
    cached: bool
    cache_error: str | None = None
    path: Path | None = None

    def resources(self) -> dict[str, dict[str, int]]:
        """Per kernel (entry function): registers, spill stores/loads (bytes), stack frame and static shared memory,
        and ``cumulative_stack`` (its own frame and its callees') where ptxas reports one, parsed from ptxas' ``-v``
        report in the NVRTC log (empty when loaded from the cache).  A kernel's figures are its own: those of the
        non-inlined device functions it calls are in :meth:`device_functions`."""
        return self._ptxas_report()[0]

    def device_functions(self) -> dict[str, dict[str, int]]:
        """Per non-inlined device function (``__noinline__``, by its mangled name): stack frame and spill
        stores/loads (bytes), the largest over the kernels it is compiled into, from the same ptxas report as
        :meth:`resources` (empty when there is none, or when loaded from the cache)."""
        return self._ptxas_report()[1]

    def _ptxas_report(self) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, int]]]:
        """``(kernels, device functions)``: each "Function properties for X" block's stack and spill line goes to
        X (a kernel's own block comes after its "Compiling entry function" line; a called device function's after
        the kernel's), never to the kernel compiled before it."""
        entries: dict[str, dict[str, int]] = {}
        functions: dict[str, dict[str, int]] = {}
        entry = None  # the kernel being compiled: its "Used N registers" line
        target, of_kernel = None, False  # whose "N bytes stack frame" line comes next; whether a kernel's
        for line in self.log.splitlines():
            m = re.search(r"Compiling entry function '([^']+)'", line)
            if m:
                entry = target = entries.setdefault(m.group(1), {})
                of_kernel = True
                continue
            m = re.search(r"Function properties for (\S+)", line)
            if m:
                name = m.group(1)
                of_kernel = name in entries
                target = entries[name] if of_kernel else functions.setdefault(name, {})
                continue
            m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
            if m and target is not None:
                figures = dict(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
                if of_kernel:
                    target.update(figures)
                else:  # (a device function is reported once per kernel that calls it: keep the largest)
                    for k, v in figures.items():
                        target[k] = max(v, target.get(k, 0))
                continue
            m = re.search(r"Used (\d+) registers", line)
            if m and entry is not None:
                entry["registers"] = int(m.group(1))
                s = re.search(r"(\d+) bytes smem", line)
                entry["smem"] = int(s.group(1)) if s else 0
                s = re.search(r"(\d+) bytes cumulative stack size", line)
                if s:
                    entry["cumulative_stack"] = int(s.group(1))
        return entries, functions

    def warnings(self) -> list[str]:
        return [ln for ln in self.log.splitlines() if "warning" in ln.lower()]


def compile_kernels(arch: str, *, use_cache: bool = True, extra_options: tuple[str, ...] = (),
                    source: bytes | None = None, notify: bool = False) -> Compiled:
    """Compile ``spmm.cu`` (or ``source``, the bytes of a CUDA source; a ``str`` is refused) for ``arch`` (e.g.
    ``"sm_90"``) with NVRTC, with the options in ``extra_options`` (a sequence of strings, e.g. ``("-DX=1",)``)
    added; return the cubin and log.  ``notify``: say on stderr, before and after, when it compiles (not when the
    cubin comes from the cache): the first ``spmm`` call on a device waits for it (about a minute for the whole
    ``spmm.cu``).  Without a cache directory (no home directory, see :func:`cache_dir`) it compiles and says so in
    :attr:`Compiled.cache_error`.

    ``"sm_90a"`` is taken as ``"sm_90"``, and for ``spmm.cu`` any other ``"sm_NNa"`` or family name ``"sm_NNf"``
    as ``"sm_NN"`` (:func:`canonical_arch`); a ``source`` is compiled for the ``"sm_NNa"`` / ``"sm_NNf"`` asked
    for.  A cubin compiled with ``notify`` that cannot be stored in the cache is said once per cache directory on
    stderr, with what to do (:func:`cache_hint`).

    A source that reads other files (an ``#include "..."`` or a computed ``#include``, found in the working
    directory; an ``-I`` / ``--include-path`` / ``-include`` / ``--pre-include`` option) is compiled every time,
    never cached: the cache key does not cover those files, so an edited header would give the old cubin
    (:func:`uncacheable`; :attr:`Compiled.cache_error` says so).

    Raises :class:`KernelBuildError` with NVRTC's log when compilation fails.
    """
    if not re.fullmatch(r"sm_\d+[af]?", arch):
        raise ValueError(f"arch must look like 'sm_90' (or 'sm_90a', 'sm_100f'), got {arch!r}")
    # (sm_90a: the sm_90 cubin, and for spmm.cu sm_NNa / sm_NNf the sm_NN one: in the slot the runtime reads; a
    # prototype's source keeps the arch-specific or family target it asks for, whose features it may use)
    arch = canonical_arch(arch) if source is None or arch == "sm_90a" else arch
    if source is not None and not isinstance(source, (bytes, bytearray, memoryview)):
        raise TypeError(f"compile_kernels(source=...) takes the source's bytes (e.g. text.encode()), got "
                        f"{type(source).__name__}")
    try:
        options_given = None if isinstance(extra_options, (str, bytes)) else tuple(extra_options)
    except TypeError:
        options_given = None
    if options_given is None or not all(isinstance(o, str) for o in options_given):
        raise TypeError(f"compile_kernels(extra_options=...) takes a sequence of option strings, e.g. ('-DX=1',), "
                        f"got {extra_options!r}")
    nvrtc = _nvrtc()
    what = SOURCE.name if source is None else f"the given source ({len(source)} bytes; spmm.cu in the log)"
    source = SOURCE.read_bytes() if source is None else bytes(source)
    options = _options(arch, options_given)
    path = why = None
    if use_cache:
        path, why = _cache_path(arch, source, options)
        found = _find_cached(path, arch) if path is not None else None
        if found is not None:
            return Compiled(arch, found[0], "", True, path=found[1])

    if notify:
        where = (f"cached in {path.parent}" if path is not None else f"not cached: {why}") if use_cache \
            else "not cached"
        print(f"flash-llm: compiling the CUDA kernels for {arch} with NVRTC (first use; about a minute; {where}; "
              "`flash-llm build` compiles them ahead of time) ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    prog = _check_nvrtc(nvrtc.nvrtcCreateProgram(source, b"spmm.cu", 0, [], []), "nvrtcCreateProgram")
    try:
        opts = [o.encode() for o in options]
        err = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)[0]
        size = _check_nvrtc(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
        buf = bytearray(size)  # (writable: NVRTC fills it; never an immutable bytes, which CPython may share)
        nvrtc.nvrtcGetProgramLog(prog, buf)
        log = bytes(buf).decode(errors="replace").rstrip("\x00 \n")
        if int(err) != 0:
            raise KernelBuildError(f"NVRTC failed to compile {what} for {arch} ({err}):\n{log}")
        size = _check_nvrtc(nvrtc.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize")
        if size == 0:  # (e.g. -dlto in extra_options: NVRTC then gives LTO IR, not a cubin)
            raise KernelBuildError(f"NVRTC compiled {what} for {arch} but produced no cubin (options {list(options)})"
                                   + (f":\n{log}" if log else ""))
        out = bytearray(size)
        _check_nvrtc((nvrtc.nvrtcGetCUBIN(prog, out)[0], None), "nvrtcGetCUBIN")
        cubin = bytes(out)
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
    if notify:
        print(f"flash-llm: compiled in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    if not use_cache:
        return Compiled(arch, cubin, log, False)
    if path is None:
        return Compiled(arch, cubin, log, False, why)
    stored = _cached_name(path, cubin)
    why = _store_cached(path, cubin)
    if why and notify:
        _warn_unstored(arch, why)
    return Compiled(arch, cubin, log, False, why, None if why else stored)


def cache_hint(problem: str) -> str:
    """What to do about a cubin cache that cannot take a cubin for ``problem`` (:func:`cache_problem`,
    :attr:`Compiled.cache_error`): make room where it is full, else point ``FLASH_LLM_CACHE`` elsewhere."""
    return "free some space there or set FLASH_LLM_CACHE to a directory with room" if NO_SPACE in problem \
        else "set FLASH_LLM_CACHE to a writable directory"


#: the store failures :func:`_warn_unstored` has said in this process
_unstored_said: set[str] = set()


def _warn_unstored(arch: str, why: str) -> None:
    """Say once on stderr that the cubin compiled for ``arch`` at first use could not be stored (``why``, which
    names the cache directory, :func:`_store_cubin`: once per directory and reason): each new process then compiles
    it again."""
    if why in _unstored_said:
        return
    _unstored_said.add(why)
    print(f"flash-llm: warning: the cubin for {arch} was compiled but not stored in the cubin cache ({why}), so every "
          f"new process compiles it again; {cache_hint(why)}", file=sys.stderr, flush=True)


def _options(arch: str, extra_options: tuple[str, ...] = ()) -> tuple[str, ...]:
    """NVRTC's options for ``arch``."""
    # sm_90 builds as sm_90a: the warpgroup MMA (wgmma) of the large-N Tiled-CSL kernel needs the arch-specific
    # target; its cubin runs on compute capability 9.0 (H100, H200) only, which is what "sm_90" means here
    target = "sm_90a" if canonical_arch(arch) == "sm_90" else arch
    return OPTIONS + tuple(extra_options) + (f"--gpu-architecture={target}",)


#: an ``#include`` (or ``#include_next``, or ``__has_include``) of anything but ``<name>``: a quoted name, which
#: NVRTC looks for in the working directory, or a macro that may expand to one
_FILE_INCLUDE = re.compile(rb"^[ \t]*#[ \t]*include(?:_next)?\b(?![ \t]*<)|__has_include(?:_next)?[ \t]*\((?![ \t]*<)",
                           re.MULTILINE)

#: NVRTC options that make it read header files (directories searched, headers included before the source)
_INCLUDE_OPTIONS = ("-I", "--include-path", "-include", "--pre-include")


def uncacheable(source: bytes, options: tuple[str, ...]) -> str | None:
    """Why the cubin of ``source`` built with ``options`` must not be cached, or None: the source or the options make
    NVRTC read header files (:data:`_FILE_INCLUDE`, :data:`_INCLUDE_OPTIONS`), whose bytes the cache key
    (:func:`cache_key`) does not cover, so an edited header (or another working directory) would get the old cubin.
    An ``#include <name>`` alone reads no file: without an include path NVRTC searches no directory for it."""
    option = next((o for o in options if o.startswith(_INCLUDE_OPTIONS)), None)
    if option is not None:
        return (f"the option {option!r} makes NVRTC read header files, which the cache key does not cover: compiled "
                "every time")
    m = _FILE_INCLUDE.search(source)
    if m is not None:
        line = source[m.start():].split(b"\n", 1)[0].strip().decode(errors="replace")
        return f"the source reads header files ({line!r}), which the cache key does not cover: compiled every time"
    return None


def _cache_path(arch: str, source: bytes, options: tuple[str, ...]) -> tuple[Path | None, str | None]:
    """The cache slot of the cubin of ``source`` for ``arch`` built with ``options`` (``spmm-<arch>-<key>.cubin``,
    whose files are named by :func:`_cached_name`); or None and why there is no cache (:func:`cache_dir`) or none
    for this source (:func:`uncacheable`)."""
    why = uncacheable(source, options)
    if why is not None:
        return None, why
    root, why = _cache_dir_or_why()
    if root is None:
        return None, why
    return root / f"spmm-{arch}-{cache_key(source, options, arch)}.cubin", None


def _cached_name(slot: Path, cubin: bytes) -> Path:
    """The file that holds ``cubin`` in the cache slot ``slot`` (:func:`_cache_path`): the slot's name with the
    sha256 of the content before ``.cubin`` (``spmm-sm_90-<key>-<sha256>.cubin``).  A file whose bytes do not hash
    to its name (damaged on disk, e.g. a range zeroed by a crash) is never loaded; a slot file of the scheme before,
    without a digest, is never found, so it is compiled again."""
    return slot.with_name(f"{slot.name[:-len('.cubin')]}-{hashlib.sha256(cubin).hexdigest()}.cubin")


def _slot_files(slot: Path) -> list[tuple[Path, str]]:
    """The files of the cache slot ``slot``, each with the digest its name gives, in name order."""
    prefix = slot.name[:-len(".cubin")] + "-"
    try:
        names = sorted(os.listdir(slot.parent))
    except OSError:
        return []
    out = []
    for name in names:
        digest = name[len(prefix):-len(".cubin")] if name.startswith(prefix) and name.endswith(".cubin") else ""
        if re.fullmatch(r"[0-9a-f]{64}", digest):
            out.append((slot.parent / name, digest))
    return out


def _find_cached(slot: Path, arch: str | None = None) -> tuple[bytes, Path] | None:
    """A whole cubin (for ``arch`` when given) of the cache slot ``slot`` and its file, or None.  A file whose
    content does not match the sha256 in its name, or is no cubin for ``arch``, is removed (best effort: unless
    another process has replaced it meanwhile) and the next one tried; one that cannot be read (a directory) is
    skipped."""
    for path, digest in _slot_files(slot):
        try:
            with open(path, "rb") as f:
                seen = os.fstat(f.fileno())
                data = f.read()
        except OSError:
            continue
        if hashlib.sha256(data).hexdigest() == digest and _cubin_ok(data, arch):
            return data, path
        with contextlib.suppress(OSError):
            now = os.stat(path)
            if (now.st_ino, now.st_dev, now.st_mtime_ns) == (seen.st_ino, seen.st_dev, seen.st_mtime_ns):
                os.unlink(path)
    return None


def _read_cached(slot: Path, arch: str | None = None) -> bytes | None:
    """The whole cubin (for ``arch`` when given) cached in the slot ``slot``, or None (missing, unreadable, a
    directory, damaged, empty, truncated or foreign: compiled again)."""
    found = _find_cached(slot, arch)
    return None if found is None else found[0]


def _drop_cached(slot: Path) -> None:
    """Remove every file of the cache slot ``slot`` (best effort)."""
    for path, _ in _slot_files(slot):
        with contextlib.suppress(OSError):
            os.unlink(path)


def is_cached(arch: str) -> bool:
    """Whether the cache holds a whole cubin of ``spmm.cu`` for ``arch``, so :func:`compile_kernels` returns it at
    once (loads NVRTC: the cache key holds its version); False without a cache directory.  ``"sm_90a"`` is
    ``"sm_90"`` (:func:`canonical_arch`)."""
    arch = canonical_arch(arch)
    path, _ = _cache_path(arch, SOURCE.read_bytes(), _options(arch))
    return path is not None and _read_cached(path, arch) is not None


#: temporary files of the cache older than this (seconds) belong to no store still running: a process killed
#: between its write and its rename (SIGKILL, the OOM killer) left them
STALE_TMP_AGE = 3600


def remove_stale_temporary_files(root: Path, age: float = STALE_TMP_AGE) -> list[str]:
    """Remove the temporary files of stores into the cache ``root`` (``spmm-*.cubin.<hex>.tmp``, and ``build``'s
    probes) last written more than ``age`` seconds ago; return their names (best effort: what cannot be removed
    stays)."""
    removed = []
    now = time.time()
    with contextlib.suppress(OSError):
        with os.scandir(root) as it:
            for e in it:
                if not (e.name.endswith(".tmp") and e.name.startswith(("spmm-", ".probe-"))):
                    continue
                with contextlib.suppress(OSError):
                    if e.is_file(follow_symlinks=False) and now - e.stat(follow_symlinks=False).st_mtime > age:
                        os.unlink(e.path)
                        removed.append(e.name)
    return removed


def _store_cached(slot: Path, cubin: bytes) -> str | None:
    """Store ``cubin`` in the cache slot ``slot`` (:func:`_cached_name`), first removing the cache's stale temporary
    files; why it could not be stored, or None."""
    remove_stale_temporary_files(slot.parent)
    return _store_cubin(_cached_name(slot, cubin), cubin)


def _reason(e: OSError) -> str:
    """Why ``e`` failed a write, in words: :data:`NO_SPACE` for a full file system (or quota)."""
    if e.errno == errno.ENOSPC:
        return NO_SPACE
    if e.errno == getattr(errno, "EDQUOT", None):
        return f"{NO_SPACE} ({e.strerror})"
    return str(e.strerror or e)


def _store_cubin(path: Path, cubin: bytes, *, sync: bool = True) -> str | None:
    """Write ``cubin`` to ``path`` through a temporary file of its own name (so concurrent writers never mix); return
    why it could not be stored, or None.  No partial file stays, whatever the failure (an interrupt too, which is
    raised again).  ``sync``: the file's data reach the disk (``fsync``) before it is renamed into place, and the
    rename after it (the directory's ``fsync``, best effort), so a crash leaves the old file or the whole new one, not
    a file of the right size holding zeros (XFS, ext4 ``data=writeback``).  The file gets the mode of any file this
    process creates (``0o666`` less the umask), so a cache shared between users is read by all.  A cache that cannot
    be written only costs a recompile next time; ``flash-llm build``, which exists to fill it, fails instead.  A full
    file system is said as :data:`NO_SPACE`."""
    try:
        _write_atomically(path, cubin, sync=sync)
    except OSError as e:
        # the cache directory, not the temporary file (a random name that never existed, where it could not be
        # created): the same message for every store there, so :func:`_warn_unstored` says it once; a directory
        # above it that could not be created is named as it is
        where = e.filename
        if where is None or Path(os.fsdecode(where)).parent == path.parent:
            where = path.parent
        return f"cannot write {where}: {_reason(e)}"
    return None


def _write_atomically(path: Path, data: bytes, *, sync: bool) -> None:
    """:func:`_store_cubin`'s write, raising its OSError."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        name = path.parent / f"{path.name}.{secrets.token_hex(8)}.tmp"
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        tmp = name
        with open(fd, "wb") as f:
            f.write(data)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        if sync:
            _fsync_directory(path.parent)
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _fsync_directory(directory: Path) -> None:
    """``fsync`` a directory, so a rename in it is on disk (best effort: not every system can open one)."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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


def _load_module(device_index: int, cubin: bytes):
    """``cuModuleLoadData`` of ``cubin`` with ``device_index`` the current device, so the module lands in that
    device's (primary) context whatever device was current (``cuda:1`` while device 0 is)."""
    import torch

    with torch.cuda.device(device_index):
        return _check_cu(_driver().cuModuleLoadData(cubin), "cuModuleLoadData")


def _function(device_index: int, name: str):
    with _lock:
        entry = _modules.get(device_index)
        if entry is None:
            arch = device_arch(device_index)
            compiled = compile_kernels(arch, notify=True)
            try:
                module = _load_module(device_index, compiled.cubin)
            except CudaDriverError as e:
                if not compiled.cached:
                    raise
                # a cached cubin CUDA refuses (damaged past what the checksum and header checks see, or written by
                # a broken NVRTC): drop it and compile once more
                print(f"flash-llm: the cached cubin {compiled.path} cannot be loaded ({e}); compiling again",
                      file=sys.stderr, flush=True)
                slot, _ = _cache_path(arch, SOURCE.read_bytes(), _options(arch))
                if slot is not None:
                    _drop_cached(slot)
                compiled = compile_kernels(arch, notify=True)
                if compiled.cached:  # (the file could not be removed: a read-only cache)
                    compiled = compile_kernels(arch, notify=True, use_cache=False)
                module = _load_module(device_index, compiled.cubin)
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


_static_smem: dict[tuple[int, str], int] = {}


def static_shared(device_index: int, name: str) -> int:
    """Bytes of static shared memory of kernel ``name`` on the device (``CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES``; the
    module is loaded, compiled at first use, as for a launch).  A block's static and dynamic shared memory together
    must fit the device's opt-in limit (``kernels.shared_optin``), else its launch fails."""
    key = (device_index, name)
    n = _static_smem.get(key)
    if n is None:
        drv = _driver()
        n = _static_smem[key] = int(_check_cu(drv.cuFuncGetAttribute(
            drv.CUfunction_attribute.CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES, _function(device_index, name)),
            f"cuFuncGetAttribute({name}, static shared memory)"))
    return n


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

"""Session 85's fixes to the NVRTC build and its cubin cache (bug hunt ``/tmp/h85/build``):

1. the cache key covers the source, options, arch and NVRTC, not the header files NVRTC reads: a source with an
   ``#include "x.h"`` (found in the working directory) or a computed ``#include``, or options with ``-I`` /
   ``--include-path`` / ``-include`` / ``--pre-include``, was given its old cubin from the cache after the header
   changed (``cached=True``).  Such a compile now bypasses the cache (neither read nor stored) and says so in
   ``Compiled.cache_error``;
2. a cache directory that exists but cannot be written gave a "not stored" message naming the store's random
   temporary file (which never existed), and since that name changes on every store the "said once" warning repeated
   on every first-use compile.  The message now names the cache directory, so it is said once per directory;
3. ``flash-llm build --arch sm_100a`` (``sm_120a``, ...) stored a cubin in a slot the runtime never reads (it looks
   up ``device_arch``'s plain ``sm_100``).  ``canonical_arch`` now maps every ``sm_NNa`` / ``sm_NNf`` to ``sm_NN``,
   and ``spmm.cu`` is built for plain ``sm_NN`` there as the runtime builds it; sm_90 stays built as sm_90a, and a
   prototype's ``source=`` keeps the ``sm_NNa`` target asked for;
4. a blank or newline-ended ``FLASH_LLM_CACHE`` was used as a path (``' /cubin'``); it is stripped like every other
   ``FLASH_LLM_*`` variable, and blank means the default.

NVRTC is the fake of ``test_build_fixes81`` except in the one test that needs a real compile reading a real header
(it skips without cuda-python's NVRTC)."""

from __future__ import annotations

import errno
import os

import pytest
import torch

from flash_llm import cli
from flash_llm.kernels import _build
from test_build_fixes81 import FakeNVRTC, fake_cubin

SRC = b'extern "C" __global__ void k(int* p) { p[0] = 85; }\n'
INCLUDING = b'#include "val.h"\nextern "C" __global__ void k(float* x) { x[threadIdx.x] = VAL; }\n'


class RecordingNVRTC(FakeNVRTC):
    """:class:`FakeNVRTC` that keeps the options of each compile."""

    def __init__(self, cubin: bytes):
        super().__init__(cubin)
        self.options: list[list[str]] = []

    def nvrtcCompileProgram(self, program, n, options):
        self.options.append([o.decode() for o in options])
        return super().nvrtcCompileProgram(program, n, options)


@pytest.fixture
def fake(monkeypatch, tmp_path):
    """A fake NVRTC (an sm_80 cubin), its build fixed, the cache in ``tmp_path / "cubin"``, no GPU and nothing said
    about unstored cubins yet."""
    monkeypatch.setenv("FLASH_LLM_CACHE", str(tmp_path))
    nvrtc = RecordingNVRTC(fake_cubin(sm=80))
    monkeypatch.setattr(_build, "_nvrtc", lambda: nvrtc)
    monkeypatch.setattr(_build, "nvrtc_build", lambda: "libnvrtc:1")
    monkeypatch.setattr(_build, "_unstored_said", set())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return nvrtc


def _cubins(root) -> list[str]:
    return sorted(n for n in os.listdir(root) if n.endswith(".cubin")) if os.path.isdir(root) else []


# ---- 1. sources that read header files are not cached -----------------------------------------------------------

def test_a_source_with_a_quoted_include_is_compiled_every_time_and_never_stored(fake, tmp_path):
    first = _build.compile_kernels("sm_80", source=INCLUDING)
    second = _build.compile_kernels("sm_80", source=INCLUDING)
    assert not first.cached and not second.cached and fake.compiles == 2
    assert first.path is None and '#include "val.h"' in first.cache_error and "cache key" in first.cache_error
    assert _cubins(tmp_path / "cubin") == []


@pytest.mark.parametrize("option", ["-I/some/dir", "-I", "--include-path=/some/dir", "-include=val.h",
                                    "--pre-include=val.h"])
def test_options_that_read_headers_bypass_the_cache(fake, tmp_path, option):
    for _ in range(2):
        c = _build.compile_kernels("sm_80", source=SRC, extra_options=(option,))
        assert not c.cached and repr(option) in c.cache_error
    assert fake.compiles == 2 and _cubins(tmp_path / "cubin") == []


@pytest.mark.parametrize("source", [b'#  include "a.h"\n', b'\t#include MACRO_NAMING_A_FILE\n',
                                    b'#include_next "a.h"\n', b'#if __has_include("a.h")\n#endif\n'])
def test_every_form_that_can_read_a_file_is_found(source):
    assert _build.uncacheable(source + SRC, ()) is not None


def test_sources_that_read_no_file_are_still_cached(fake, tmp_path):
    """An ``#include <name>`` without an include path reads no file (NVRTC searches no directory for it), an include
    in a comment or a longer word is none, and spmm.cu includes nothing: all cached as before."""
    for src in (b"#include <cuda_fp16.h>\n" + SRC, b"#include<x.h>\n" + SRC, b'// see #include "x.h"\n' + SRC,
                b"#includes\n" + SRC, b"#if __has_include( <x.h> )\n#endif\n" + SRC):
        assert _build.uncacheable(src, ()) is None, src
    assert _build.uncacheable(_build.SOURCE.read_bytes(), _build._options("sm_90")) is None
    a = _build.compile_kernels("sm_80", source=SRC, extra_options=("-DX=1",))
    b = _build.compile_kernels("sm_80", source=SRC, extra_options=("-DX=1",))
    assert not a.cached and b.cached and fake.compiles == 1 and a.cache_error is None


def test_a_header_edited_gives_a_new_cubin_with_the_real_nvrtc(monkeypatch, tmp_path):
    """The bug as it was found: real NVRTC reads ``val.h`` from the working directory; after the header changes the
    cubin is the new header's, not the cached old one."""
    if _build.nvrtc_problem() is not None:
        pytest.skip(_build.nvrtc_problem())
    monkeypatch.setenv("FLASH_LLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    cubins = []
    for value in ("1.0f", "2.0f"):
        (tmp_path / "val.h").write_text(f"#define VAL {value}\n")
        c = _build.compile_kernels("sm_80", source=INCLUDING)
        fresh = _build.compile_kernels("sm_80", source=INCLUDING, use_cache=False)
        assert not c.cached and c.cubin == fresh.cubin
        cubins.append(c.cubin)
    assert cubins[0] != cubins[1]


# ---- 2. a cache directory that cannot be written: named, said once ------------------------------------------------

def _read_only(monkeypatch):
    """Creating a file fails as in a directory this (non-root) user may not write: root ignores ``chmod``."""
    real_open = os.open

    def open_(path, flags, *args, **kwargs):
        if flags & os.O_CREAT:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_)


def test_an_unwritable_cache_is_named_by_its_directory_and_said_once(fake, monkeypatch, tmp_path, capsys):
    (tmp_path / "cubin").mkdir()
    _read_only(monkeypatch)
    errors = []
    for _ in range(3):  # (three GPUs of one process, each compiling at first use)
        errors.append(_build.compile_kernels("sm_80", source=SRC, notify=True).cache_error)
    err = capsys.readouterr().err
    assert errors == [f"cannot write {tmp_path / 'cubin'}: Permission denied"] * 3 and ".tmp" not in err
    assert sum("not stored" in line for line in err.splitlines()) == 1 and fake.compiles == 3


def test_a_store_failure_names_the_directory_or_the_one_that_cannot_be_made(tmp_path, monkeypatch):
    cubin = fake_cubin()
    blocker = tmp_path / "file"
    blocker.write_text("")
    why = _build._store_cubin(blocker / "cache" / "cubin" / "x.cubin", cubin)  # (a file where a directory goes)
    assert why == f"cannot write {blocker / 'cache' / 'cubin'}: Not a directory"

    def full(path, data, *, sync):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # (no file name: a write or fsync)

    monkeypatch.setattr(_build, "_write_atomically", full)
    assert _build._store_cubin(tmp_path / "c" / "x.cubin", cubin) == \
        f"cannot write {tmp_path / 'c'}: {_build.NO_SPACE}"


# ---- 3. sm_NNa / sm_NNf: the slot the runtime reads ---------------------------------------------------------------

def test_canonical_arch_maps_every_arch_specific_name_to_the_runtimes():
    assert [_build.canonical_arch(a) for a in ("sm_90a", "sm_100a", "sm_120a", "sm_100f", "sm_80", "sm_90")] == \
        ["sm_90", "sm_100", "sm_120", "sm_100", "sm_80", "sm_90"]
    assert _build._options("sm_90")[-1] == _build._options("sm_90a")[-1] == "--gpu-architecture=sm_90a"  # (as is)


@pytest.mark.parametrize("asked,sm", [("sm_100a", 100), ("sm_120a", 120)])
def test_build_of_an_a_variant_fills_the_slot_the_runtime_reads(fake, capsys, asked, sm):
    fake.cubin = fake_cubin(sm=sm)
    assert cli.main(["build", "--arch", asked]) == 0
    plain = f"sm_{sm}"
    assert f"{plain}:" in capsys.readouterr().out and fake.compiles == 1
    assert fake.options[-1][-1] == f"--gpu-architecture={plain}"  # (what the runtime builds on that GPU)
    assert _build.is_cached(plain) and _build.is_cached(asked)
    c = _build.compile_kernels(plain, notify=True)  # (that GPU's first spmm: device_arch's plain name)
    assert c.cached and c.arch == plain and fake.compiles == 1
    assert cli.main(["build", "--arch", plain, asked]) == 0 and fake.compiles == 1  # (one arch, cached)


def test_sm90_and_a_prototypes_arch_specific_target_are_unchanged(fake):
    fake.cubin = fake_cubin(sm=90)
    c = _build.compile_kernels("sm_90a")
    assert c.arch == "sm_90" and fake.options[-1][-1] == "--gpu-architecture=sm_90a"
    fake.cubin = fake_cubin(sm=100)
    p = _build.compile_kernels("sm_100a", source=SRC)  # (a prototype may use sm_100a's features: kept)
    assert p.arch == "sm_100a" and fake.options[-1][-1] == "--gpu-architecture=sm_100a"


# ---- 4. FLASH_LLM_CACHE is stripped -----------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["", " ", "\n", " \t\n"])
def test_a_blank_cache_variable_means_the_default(monkeypatch, tmp_path, value):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("FLASH_LLM_CACHE", value)
    assert _build.cache_dir() == tmp_path / ".cache" / "flash_llm" / "cubin"


def test_the_cache_variable_is_stripped_but_inner_spaces_kept(monkeypatch, tmp_path):
    monkeypatch.setenv("FLASH_LLM_CACHE", f"  {tmp_path / 'a b'}\n")
    assert _build.cache_dir() == tmp_path / "a b" / "cubin"

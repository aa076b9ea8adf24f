"""The ``FLASH_LLM_*`` switches (session 71, ``flash_llm._env``): every on / off switch reads the same words the
same way, and a number that does not parse, is not finite or is out of range warns, naming the variable, and keeps
the default (they were bare ``int()`` / ``float()`` calls that failed the import without naming the variable, or let
a ``DELTA_MULTI_MAX`` above 8 skip tokens, a ``*_MIN_TILES`` of 0 divide by zero)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from flash_llm import _env


@pytest.mark.parametrize("text,want", [("1", True), ("true", True), ("ON", True), ("yes", True), ("0", False),
                                       ("false", False), ("Off", False), ("no", False), ("", None), (" ", None)])
def test_flags_read_the_same_words_the_same_way(text, want, monkeypatch):
    monkeypatch.setenv("FLASH_LLM_TEST_FLAG", text)
    for default in (True, False):
        assert _env.env_flag("FLASH_LLM_TEST_FLAG", default) is (default if want is None else want)


def test_bad_values_warn_naming_the_variable_and_keep_the_default(monkeypatch):
    for text in ("maybe", "2"):
        monkeypatch.setenv("FLASH_LLM_TEST_FLAG", text)
        with pytest.warns(RuntimeWarning, match=f"FLASH_LLM_TEST_FLAG='{text}' is not one of 1, 0"):
            assert _env.env_flag("FLASH_LLM_TEST_FLAG", True) is True
    for text, match in (("abc", "an integer >= 1 and <= 8"), ("0", "an integer >= 1"),
                        ("16", "an integer >= 1 and <= 8"), ("2.5", "an integer")):
        monkeypatch.setenv("FLASH_LLM_TEST_INT", text)
        with pytest.warns(RuntimeWarning, match=f"FLASH_LLM_TEST_INT='{text}' is not {match}.*; using 8"):
            assert _env.env_int("FLASH_LLM_TEST_INT", 8, 1, 8) == 8
    monkeypatch.setenv("FLASH_LLM_TEST_INT", " 3 ")
    assert _env.env_int("FLASH_LLM_TEST_INT", 8, 1, 8) == 3
    for text in ("nan", "inf", "-1", "x"):
        monkeypatch.setenv("FLASH_LLM_TEST_FLOAT", text)
        with pytest.warns(RuntimeWarning, match=f"FLASH_LLM_TEST_FLOAT='{text}' is not a finite number >= 0.0"):
            assert _env.env_float("FLASH_LLM_TEST_FLOAT", 0.5, 0.0) == 0.5
    monkeypatch.setenv("FLASH_LLM_TEST_FLOAT", "1e-3")
    assert _env.env_float("FLASH_LLM_TEST_FLOAT", 0.5, 0.0) == 1e-3


def test_every_module_reads_its_switches_through_the_shared_helpers():
    """No module parses a FLASH_LLM_* variable with a bare int() / float() / == "1" any more."""
    import pathlib
    import re

    root = pathlib.Path(_env.__file__).parent
    bare = re.compile(r'(int|float)\(os\.environ\.get\("FLASH_LLM|os\.environ\.get\("FLASH_LLM_\w+", "[01]"\) [!=]=')
    found = [f"{p.relative_to(root)}:{i}" for p in root.rglob("*.py")
             for i, line in enumerate(p.read_text().splitlines(), 1) if bare.search(line)]
    assert not found, found


def test_the_import_survives_bad_switches():
    """Bad values of real switches: the import warns for each and takes the defaults."""
    env = {**os.environ, "FLASH_LLM_NT_MIN_TILES": "0", "FLASH_LLM_DELTA_MULTI_MAX": "16",
           "FLASH_LLM_L2_WARM_MB": "nan", "FLASH_LLM_WG_LATENCY_SHARE": "abc", "FLASH_LLM_TCSL_N1": "true",
           "FLASH_LLM_N1_FUSED": "off"}
    code = ("import flash_llm.kernels as K; print(K.NT_MIN_TILES, K.DELTA_MULTI_MAX, K.L2_WARM_MB, "
            "K.WG_LATENCY_SHARE, K._WG_SHARE_ENV, K.TCSL_N1, K.N1_FUSED)")
    run = subprocess.run([sys.executable, "-W", "always", "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["2", "8", "0", "0.8", "False", "True", "False"]
    for name in ("FLASH_LLM_NT_MIN_TILES", "FLASH_LLM_DELTA_MULTI_MAX", "FLASH_LLM_L2_WARM_MB",
                 "FLASH_LLM_WG_LATENCY_SHARE"):
        assert name in run.stderr


def test_cubin_cache_leaves_no_partial_file_when_the_write_fails(tmp_path, monkeypatch):
    """A cubin whose final rename fails (here a directory stands where it goes) leaves no temporary file behind
    (session 72: a *.tmp<pid> of the whole cubin stayed, one a process)."""
    from flash_llm.kernels import _build

    src = b'extern "C" __global__ void k_tmp_test(int* p) { *p = 1; }\n'
    monkeypatch.setenv("FLASH_LLM_CACHE", str(tmp_path))
    c = _build.compile_kernels("sm_90", source=src)
    path = next(tmp_path.rglob("*.cubin"))
    path.unlink()
    path.mkdir()  # (os.replace onto a directory fails)
    _build.compile_kernels("sm_90", source=src)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
    assert c.cubin


def test_delta_rows_switches_read_as_the_others():
    """``FLASH_LLM_DELTA_PARTS`` takes ``Auto`` and `` 4`` as every other switch takes its words; a bad or blank
    ``FLASH_LLM_DELTA_BLOCKS`` warns and is no override (it used to replace the device's wave by 3600)."""
    code = ("import warnings; warnings.simplefilter('always')\n"
            "from flash_llm.formats import delta_rows as D\n"
            "print(repr(D.PARTS_ENV), D.BLOCKS_OVERRIDE, D.TARGET_BLOCKS)")
    cases = ((" Auto", "x", "'auto' 0 3600"), (" 4 ", " ", "'4' 0 3600"), ("", "512", "'1' 512 512"))
    for parts, blocks, want in cases:
        env = {**os.environ, "FLASH_LLM_DELTA_PARTS": parts, "FLASH_LLM_DELTA_BLOCKS": blocks}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.strip() == want, (parts, blocks, out.stdout)
        assert ("FLASH_LLM_DELTA_BLOCKS='x'" in out.stderr) == (blocks == "x"), out.stderr[-2000:]

"""Session 80's command-line fixes (the CLI hunt's items 3, 8 and 10-14; tests/test_cli_fixes80.py has the others):

* 3: a closed stdout (``| head -1``) ends every command quietly with exit status 1, as ``generate`` did: no
  BrokenPipeError traceback and no "Exception ignored" at the interpreter's exit;
* 8: ``demo --method magnitude --owl`` is refused before the model is loaded;
* 10: sizes that cannot fit in memory (``demo --layer --shape`` / ``--tokens``, ``--calib-seqs`` of demo and prune)
  are refused up front naming the option, and an allocation that fails anyway is one line naming it, no traceback;
* 11: an option of another mode is refused when given, whatever its value (its default's too);
* 12: ``prune --method magnitude`` without --verbose checks that --calib exists and refuses --calib-seqs;
* 13: ``demo --method magnitude`` makes no calibration batches and its header says so;
* 14: ``build`` fails at once, naming FLASH_LLM_CACHE, where the cubin cache cannot be created; ``info`` says so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flash_llm import data, demo
from flash_llm.kernels import _build
import test_demo
from test_demo import run

calib_file = test_demo.calib_file  # (a fixture)
REPO = Path(__file__).resolve().parent.parent
HUGE = str(10 ** 14)  # sequences, tokens: far more than any address space


def _no_load(*args, **kwargs):
    raise AssertionError("the model was loaded although the arguments are wrong")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama checkpoint (2 layers, context 64) with flash-llm's byte tokenizer: the demo and prune run on it in
    about a second."""
    pytest.importorskip("transformers")
    from _ckpt import hf_model, save_hf

    d = save_hf(hf_model("llama", vocab=256), tmp_path_factory.mktemp("tiny") / "tiny", shard="5GB")
    cfg = json.loads((d / "config.json").read_text())
    cfg["flash_llm"] = {"tokenizer": "bytes"}
    (d / "config.json").write_text(json.dumps(cfg))
    return d


# ---- 3. a closed stdout ---------------------------------------------------------------------------------------
_MAIN = "import sys; from flash_llm.cli import main; sys.exit(main(sys.argv[1:]))"


def _closed_stdout(argv: list[str], unbuffered: bool) -> subprocess.Popen:
    """``flash-llm argv`` with stdout a pipe whose reader has gone (what ``| head -1`` becomes once head exits)."""
    env = dict(os.environ)
    env.pop("PYTHONUNBUFFERED", None)
    if unbuffered:  # (the print fails at once; buffered, the flush at the end does)
        env["PYTHONUNBUFFERED"] = "1"
    r, w = os.pipe()
    os.close(r)
    try:
        return subprocess.Popen([sys.executable, "-c", _MAIN, *argv], stdout=w, stderr=subprocess.PIPE, text=True,
                                cwd=REPO, env=env)
    finally:
        os.close(w)


def test_closed_stdout_ends_every_command_quietly(tiny, tmp_path):
    cases = {
        "info": (["info"], True),
        "info, buffered": (["info"], False),
        "inspect": (["inspect", "tiny-shakespeare"], True),
        "demo --layer": (["demo", "--layer", "--shape", "64x64", "--sparsities", "50", "--device", "cpu"], True),
        "convert": (["convert", str(tiny), str(tmp_path / "c")], True),
        "prune": (["prune", str(tiny), "--method", "magnitude", "--sparsity", "0.5", "--out", str(tmp_path / "p"),
                   "--device", "cpu"], True),
        "demo": (["demo", "--model", str(tiny), "--eval-tokens", "64", "--seq-len", "32", "--calib-seqs", "2",
                  "--gen-tokens", "0", "--device", "cpu"], True),
        "demo, buffered": (["demo", "--model", str(tiny), "--eval-tokens", "64", "--seq-len", "32", "--method",
                            "magnitude", "--gen-tokens", "0", "--device", "cpu"], False),
    }
    procs = {name: _closed_stdout(argv, unbuffered) for name, (argv, unbuffered) in cases.items()}
    for name, p in procs.items():
        _, err = p.communicate(timeout=300)
        assert p.returncode == 1, (name, p.returncode, err)
        assert "Traceback" not in err and "BrokenPipeError" not in err and "Exception ignored" not in err, (name, err)
        assert "error:" not in err, (name, err)  # (the command ran: only its output was dropped)


def test_stdout_still_written_when_open(capsys):
    rc, out, err = run(capsys, "info")
    assert rc == 0 and "cubin cache" in out, err


# ---- 8. demo --method magnitude --owl ------------------------------------------------------------------------
def test_demo_owl_with_magnitude_is_refused_before_loading(capsys, monkeypatch):
    monkeypatch.setattr(demo, "load_model", _no_load)
    rc, out, err = run(capsys, "demo", "--method", "magnitude", "--owl", "--device", "cpu")
    assert rc == 2 and "--owl applies to wanda and sparsegpt, not magnitude" in err, err
    assert out == ""


# ---- 10. sizes that cannot fit in memory ---------------------------------------------------------------------
@pytest.mark.parametrize("argv, option", [
    (["--shape", f"{10 ** 7}x{10 ** 7}"], f"--shape {10 ** 7}x{10 ** 7}"),
    (["--shape", "64x64", "--tokens", HUGE], f"--tokens {HUGE}"),
])
def test_demo_layer_refuses_sizes_beyond_memory(capsys, argv, option):
    rc, out, err = run(capsys, "demo", "--layer", "--sparsities", "50", "--device", "cpu", *argv)
    assert rc == 2 and out == "", err
    assert err.startswith(f"error: {option} (") and "more than this machine has" in err, err


def test_demo_layer_allocation_failure_is_one_line(capsys, monkeypatch):
    """Where the memory available is unknown (no up-front refusal), the allocation's failure names the options."""
    import flash_llm.models.synthetic as synthetic

    monkeypatch.setattr(synthetic, "host_available_memory", lambda: 0)
    rc, out, err = run(capsys, "demo", "--layer", "--sparsities", "50", "--device", "cpu", "--shape",
                       f"{10 ** 7}x{10 ** 7}")
    assert rc == 1 and out == "", err
    assert f"error: out of memory with --shape {10 ** 7}x{10 ** 7} and --tokens 8: " in err, err
    assert "can't allocate memory" in err and "Traceback" not in err


def test_prune_refuses_calib_seqs_beyond_memory(capsys, tmp_path, tiny, calib_file):
    out = tmp_path / "out"
    rc, _, err = run(capsys, "prune", str(tiny), "--method", "wanda", "--sparsity", "0.5", "--calib", str(calib_file),
                     "--calib-seqs", HUGE, "--seq-len", "32", "--out", str(out), "--device", "cpu")
    assert rc == 2 and err.startswith(f"error: --calib-seqs {HUGE} x --seq-len 32 tokens"), err
    assert "more than this machine has" in err and not out.exists()


def test_prune_calib_allocation_failure_is_one_line(capsys, tmp_path, tiny, calib_file, monkeypatch):
    import flash_llm.models.synthetic as synthetic

    monkeypatch.setattr(synthetic, "host_available_memory", lambda: 0)
    out = tmp_path / "out"
    rc, _, err = run(capsys, "prune", str(tiny), "--method", "sparsegpt", "--sparsity", "0.5", "--calib",
                     str(calib_file), "--calib-seqs", HUGE, "--seq-len", "32", "--out", str(out), "--device", "cpu")
    assert rc == 1 and f"error: out of memory with --calib-seqs {HUGE} x --seq-len 32: " in err, err
    assert "Traceback" not in err and not out.exists()


def test_demo_refuses_calib_seqs_beyond_memory(capsys, tiny):
    rc, out, err = run(capsys, "demo", "--model", str(tiny), "--calib-seqs", HUGE, "--seq-len", "32", "--eval-tokens",
                       "64", "--gen-tokens", "0", "--device", "cpu")
    assert rc == 2 and err.startswith(f"error: --calib-seqs {HUGE} x --seq-len 32 tokens"), err
    assert out == ""


def test_sizes_that_fit_are_taken(capsys):
    rc, out, err = run(capsys, "demo", "--layer", "--shape", "64x96", "--tokens", "1000", "--sparsities", "50",
                       "--device", "cpu")
    assert rc == 0 and "synthetic 64x96" in out, err


# ---- 11. another mode's option given at its default value ---------------------------------------------------
@pytest.mark.parametrize("argv, match", [
    (["--layer", "--shape", "64x64", "--sparsities", "50", "--sparsity", "0.5"], "--sparsity: option(s) of the model"),
    (["--layer", "--shape", "64x64", "--sparsities", "50", "--method", "sparsegpt", "--batch-size", "64"],
     "--method, --batch-size: option(s) of the model demo"),
    (["--layer", "--shape", "64x64", "--sparsities", "50", "--prompt", demo.DEFAULT_PROMPT],
     "--prompt: option(s) of the model demo"),
    (["--tokens", "8"], "--tokens: option(s) of the synthetic-layer demo; add --layer"),
    (["--shape", "4096x4096", "--warmup", "3"], "--shape, --warmup: option(s) of the synthetic-layer demo"),
])
def test_demo_refuses_other_mode_options_at_default_values(capsys, monkeypatch, argv, match):
    monkeypatch.setattr(demo, "load_model", _no_load)
    rc, out, err = run(capsys, "demo", "--device", "cpu", *argv)
    assert rc == 2 and match in err and out == "", err


@pytest.mark.parametrize("method, argv, match", [
    ("magnitude", ["--steps", "500"], "--steps: option(s) of --method gradual"),
    ("wanda", ["--lr", "5e-4"], "--lr: option(s) of --method gradual"),
    ("sparsegpt", ["--steps", "500", "--lr", "0.0005"], "--steps, --lr: option(s) of --method gradual"),
    ("gradual", ["--calib-seqs", "128"], "--calib-seqs: the calibration sequences of the one-shot methods; gradual"),
])
def test_prune_refuses_other_mode_options_at_default_values(capsys, tmp_path, calib_file, monkeypatch, method, argv,
                                                            match):
    monkeypatch.setattr(demo, "load_model", _no_load)
    out = tmp_path / "out"
    rc, _, err = run(capsys, "prune", "tiny-shakespeare", "--method", method, "--sparsity", "0.5", "--calib",
                     str(calib_file), "--out", str(out), "--device", "cpu", *argv)
    assert rc == 2 and match in err, err
    assert not out.exists()


def test_given_options_are_what_the_command_line_holds():
    from flash_llm.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["prune", "m", "--method", "gradual", "--sparsity", "0.5", "--out", "o", "--steps", "500"])
    assert args.steps == 500 and args.lr == 5e-4  # the values are the parser's, given or not
    assert demo._given(args, ("steps", "lr", "calib_seqs")) == ["--steps"]
    args = parser.parse_args(["prune", "m", "--method", "gradual", "--sparsity", "0.5", "--out", "o"])
    assert demo._given(args, ("steps", "lr", "calib_seqs")) == []  # (nothing left over from the parse before)
    args = parser.parse_args(["demo", "--owl", "--layer"])
    assert demo._given(args, demo._MODEL_ONLY) == ["--owl"] and args.layer and args.owl


# ---- 12. prune --method magnitude: --calib checked, --calib-seqs refused without --verbose ----------------------
@pytest.mark.parametrize("what", ["missing", "directory"])
def test_prune_magnitude_checks_calib_although_unread(capsys, tmp_path, monkeypatch, what):
    monkeypatch.setattr(demo, "load_model", _no_load)
    calib = tmp_path / "nope" / "calib.txt" if what == "missing" else tmp_path
    out = tmp_path / "out"
    rc, _, err = run(capsys, "prune", "tiny-shakespeare", "--method", "magnitude", "--sparsity", "0.5", "--calib",
                     str(calib), "--out", str(out), "--device", "cpu")
    assert rc == 2, err
    why = "does not exist" if what == "missing" else "is a directory"
    assert f"--calib: text file {str(calib)!r} {why}" in err, err
    assert not out.exists()


@pytest.mark.parametrize("with_calib", [False, True])
def test_prune_magnitude_refuses_calib_seqs_without_verbose(capsys, tmp_path, calib_file, monkeypatch, with_calib):
    monkeypatch.setattr(demo, "load_model", _no_load)
    out = tmp_path / "out"
    rc, _, err = run(capsys, "prune", "tiny-shakespeare", "--method", "magnitude", "--sparsity", "0.5", "--out",
                     str(out), "--calib-seqs", "5", "--device", "cpu", *(["--calib", str(calib_file)] * with_calib))
    assert rc == 2, err
    assert "--calib-seqs: the calibration sequences of the one-shot methods; magnitude reads them only with " \
           "--verbose and --calib" in err, err
    assert not out.exists()


def test_prune_magnitude_verbose_still_takes_calib_seqs(capsys, tmp_path, tiny, calib_file):
    out = tmp_path / "out"
    rc, stdout, err = run(capsys, "prune", str(tiny), "--method", "magnitude", "--sparsity", "0.5", "--calib",
                          str(calib_file), "--calib-seqs", "2", "--seq-len", "32", "--verbose", "--out", str(out),
                          "--device", "cpu")
    assert rc == 0, err
    assert json.loads((out / "config.json").read_text())["flash_llm"]["pruning"]["calib_seqs"] == 2


# ---- 13. demo --method magnitude: no calibration ------------------------------------------------------------
def test_demo_magnitude_makes_no_calibration_batches(capsys, tiny, monkeypatch):
    def no_batches(*args, **kwargs):
        raise AssertionError("calibration batches made for magnitude pruning")

    monkeypatch.setattr(data, "calibration_batches", no_batches)
    rc, out, err = run(capsys, "demo", "--model", str(tiny), "--method", "magnitude", "--eval-tokens", "64",
                       "--seq-len", "32", "--gen-tokens", "0", "--device", "cpu")
    assert rc == 0, err
    assert "pruning a copy with magnitude 50% (no calibration data), float16 on CPU" in out, out
    assert "calibration:" not in out and "calibration pass" not in err


# ---- 14. build / info with a cubin cache that cannot be created ----------------------------------------------
def _no_compile(monkeypatch):
    monkeypatch.setattr(_build, "nvrtc_version", lambda: (13, 5))
    monkeypatch.setattr(_build, "is_cached", lambda arch: False)

    def compile_kernels(*args, **kwargs):
        raise AssertionError("compiled although the cache cannot be written")

    monkeypatch.setattr(_build, "compile_kernels", compile_kernels)


def test_build_with_an_unusable_cache_fails_before_compiling(capsys, tmp_path, monkeypatch):
    _no_compile(monkeypatch)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("FLASH_LLM_CACHE", str(blocker))
    rc, out, err = run(capsys, "build", "--arch", "sm_80")
    assert rc == 1 and out == "", err
    assert f"error: no cubin cache to fill: {blocker / 'cubin'}: cannot write " in err, err
    assert "Not a directory" in err and "set FLASH_LLM_CACHE to a writable directory" in err


def test_build_creates_its_cache_first_and_leaves_no_probe(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(_build, "nvrtc_version", lambda: (13, 5))
    monkeypatch.setattr(_build, "is_cached", lambda arch: False)
    monkeypatch.setattr(_build, "compile_kernels", lambda arch, **kw: _build.Compiled(arch, b"\0" * 8, "", False))
    monkeypatch.setenv("FLASH_LLM_CACHE", str(tmp_path / "a" / "b"))
    rc, out, err = run(capsys, "build", "--arch", "sm_80")
    assert rc == 0, err
    assert os.listdir(tmp_path / "a" / "b" / "cubin") == []


def test_info_says_when_the_cache_cannot_be_created(capsys, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("FLASH_LLM_CACHE", str(blocker / "deeper"))
    rc, out, err = run(capsys, "info")
    assert rc == 0, err
    line = next(ln for ln in out.splitlines() if ln.startswith("cubin cache"))
    assert line.endswith(f"{blocker / 'deeper' / 'cubin'} (cannot be created: {blocker} is not a directory; set "
                         "FLASH_LLM_CACHE to a writable directory)"), line
    monkeypatch.setenv("FLASH_LLM_CACHE", str(tmp_path / "fresh"))
    rc, out, _ = run(capsys, "info")
    assert f"{tmp_path / 'fresh' / 'cubin'} (not created yet)" in out


def test_cache_problem_looks_without_create_and_probes_with_it(tmp_path):
    root = tmp_path / "new" / "cubin"
    assert _build.cache_problem(root) is None and not (tmp_path / "new").exists()  # (only looks)
    assert _build.cache_problem(root, create=True) is None and root.is_dir() and os.listdir(root) == []
    (tmp_path / "f").write_text("")
    assert _build.cache_problem(tmp_path / "f") == f"{tmp_path / 'f'} is not a directory"
    assert "Not a directory" in _build.cache_problem(tmp_path / "f" / "cubin", create=True)

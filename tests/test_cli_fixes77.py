"""Session 77's command-line fixes: the bundled model's name in every command, help true to the three formats, one
sparsity parser, errors that name the flag, ``build`` failing when it cannot fill the cache, saved files that
honour the umask, and ``prune --method magnitude`` without calibration."""

from __future__ import annotations

import json
import os
import re
import stat
import warnings
from pathlib import Path

import pytest
import torch

import flash_llm
from flash_llm import cli, demo
from flash_llm.cli import build_parser, main
from flash_llm.kernels import _build
from flash_llm.prune import magnitude_prune_

ROOT = Path(__file__).resolve().parents[1]


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


# ---- 1. the bundled model's name ------------------------------------------------------------------------------

def test_inspect_accepts_bundled_name(capsys):
    rc, out, err = run(capsys, "inspect", "tiny-shakespeare")
    assert rc == 0, err
    assert "dense checkpoint" in out and "tiny-shakespeare" in out


def test_generate_accepts_bundled_name(capsys):
    rc, out, err = run(capsys, "generate", "tiny-shakespeare", "--prompt", "RO", "--max-new-tokens", "2",
                       "--device", "cpu")
    assert rc == 0, err
    assert out.startswith("RO")


def test_convert_accepts_bundled_name(capsys, tmp_path):
    rc, out, err = run(capsys, "convert", "tiny-shakespeare", str(tmp_path / "out"))
    assert rc == 0, err
    assert (tmp_path / "out" / "config.json").is_file()


def test_model_dir_is_the_one_resolver():
    assert cli.model_dir("tiny-shakespeare") == flash_llm.bundled.path("tiny-shakespeare")
    assert cli.model_dir("some/dir") == Path("some/dir")


# ---- 2. three formats in help and docs ------------------------------------------------------------------------

def test_demo_help_names_three_formats(capsys):
    assert main(["demo", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "BitmapTiles, TiledCSL and DeltaRows" in out
    assert "both formats" not in (demo.__doc__ or "")


def test_docs_name_three_formats():
    assert "both formats" not in (ROOT / "docs" / "pruning.md").read_text()
    usage = [ln for ln in (ROOT / "docs" / "checkpoints.md").read_text().splitlines() if "flash-llm convert IN" in ln]
    assert usage and all("delta-rows" in ln for ln in usage)


# ---- 3. one sparsity parser -----------------------------------------------------------------------------------

@pytest.mark.parametrize("text, value", [("0.5", 0.5), ("50", 0.5), ("50%", 0.5), ("0", 0.0), ("0.9", 0.9),
                                         ("95", 0.95), ("2.5%", 0.025)])
def test_sparsity_and_sparsities_read_alike(text, value):
    parser = build_parser()
    a = parser.parse_args(["demo", "--sparsity", text])
    b = parser.parse_args(["demo", "--layer", "--sparsities", text])
    assert a.sparsity == pytest.approx(value)
    assert b.sparsities == [[pytest.approx(100 * value)]]


@pytest.mark.parametrize("text", ["1", "100", "100%", "-0.1", "half", "nan"])
def test_sparsity_and_sparsities_refuse_alike(capsys, text):
    errors = []
    for argv in (["demo", "--sparsity", text], ["demo", "--layer", "--sparsities", text]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(argv)
        errors.append(capsys.readouterr().err.strip().splitlines()[-1])
    assert "argument --sparsity:" in errors[0] and "argument --sparsities:" in errors[1]
    assert errors[0].split(": ", 3)[-1] == errors[1].split(": ", 3)[-1]


def test_layer_demo_sparsities_fraction_is_not_percent(capsys):
    rc, out, err = run(capsys, "demo", "--layer", "--shape", "64x64", "--sparsities", "0.5", "--device", "cpu")
    assert rc == 0, err
    assert re.search(r"^\s*50%\s+BitmapTiles", out, re.M), out
    assert "0.5%" not in out


# ---- 4. errors name the flag ----------------------------------------------------------------------------------

def test_prune_out_appearing_late_names_force(capsys, tmp_path, monkeypatch):
    def taken(*args, **kwargs):  # (--out created by someone else while the model was pruned)
        raise FileExistsError(f"{tmp_path / 'out'} already exists; pass overwrite=True (--overwrite) to replace it")

    monkeypatch.setattr(flash_llm, "save_pretrained", taken)
    rc, _, err = run(capsys, "prune", "tiny-shakespeare", "--method", "magnitude", "--sparsity", "0.5", "--out",
                     str(tmp_path / "out"), "--device", "cpu")
    assert rc == 1
    assert "--force" in err and "overwrite=True" not in err and "--overwrite" not in err


# ---- 5. build and the cache -----------------------------------------------------------------------------------

def test_store_cubin_reports_failure(tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_bytes(b"")
    why = _build._store_cubin(blocker / "cubin" / "x.cubin", b"\x7fELF")
    assert why and "afile" in why
    assert _build._store_cubin(tmp_path / "ok" / "x.cubin", b"\x7fELF") is None
    assert (tmp_path / "ok" / "x.cubin").read_bytes() == b"\x7fELF"
    assert os.listdir(tmp_path / "ok") == ["x.cubin"]


def _fake_build(monkeypatch, cache_error):
    monkeypatch.setattr(_build, "nvrtc_version", lambda: (13, 0))
    monkeypatch.setattr(_build, "is_cached", lambda arch: False)
    monkeypatch.setattr(_build, "compile_kernels",
                        lambda arch, **kw: _build.Compiled(arch, b"cubin", "", False, cache_error))


def test_build_fails_when_cache_not_written(capsys, monkeypatch):
    _fake_build(monkeypatch, "cannot write /x/afile/cubin: Not a directory")
    rc, _, err = run(capsys, "build", "--arch", "sm_90")
    assert rc == 1
    assert "compiling" in err and "about a minute" in err
    assert "not stored in the cubin cache" in err and "Not a directory" in err


def test_build_ok_when_cache_written(capsys, monkeypatch):
    _fake_build(monkeypatch, None)
    rc, _, err = run(capsys, "build", "--arch", "sm_90")
    assert rc == 0, err
    assert "compiling" in err


# ---- 6. saved files honour the umask --------------------------------------------------------------------------

@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _weight():
    w = torch.randn(64, 64, dtype=torch.float16)
    return flash_llm.BitmapTiles.from_dense(torch.where(w.abs() > 1, w, torch.zeros_like(w)))


def test_saved_weight_files_honour_umask(tmp_path, umask_022):
    w = _weight()
    w.save(tmp_path / "w.safetensors")
    flash_llm.save({"a": w}, tmp_path / "d.safetensors")
    assert _mode(tmp_path / "w.safetensors") == 0o644
    assert _mode(tmp_path / "d.safetensors") == 0o644
    os.umask(0o077)
    w.save(tmp_path / "p.safetensors")
    assert _mode(tmp_path / "p.safetensors") == 0o600


def test_transformers_save_pretrained_honours_umask(tmp_path, umask_022):
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(flash_llm.bundled.path("tiny-shakespeare"), dtype=torch.float16)
    q_only = lambda m, n: n.endswith("q_proj")  # noqa: E731
    magnitude_prune_(model, 0.5, filter_fn=q_only)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the layers left dense, by design)
        assert flash_llm.sparsify_(model, filter_fn=q_only).converted
    model.save_pretrained(tmp_path / "copy")
    files = list((tmp_path / "copy").glob("*.safetensors"))
    assert files and all(_mode(f) == 0o644 for f in files)


# ---- 7. prune --method magnitude without calibration ----------------------------------------------------------

def test_prune_magnitude_needs_no_calib(capsys, tmp_path, monkeypatch):
    def no_calibration(*a, **kw):
        raise AssertionError("magnitude pruning without --verbose must not calibrate")

    monkeypatch.setattr(flash_llm.data, "calibration_batches", no_calibration)
    rc, out, err = run(capsys, "prune", "tiny-shakespeare", "--method", "magnitude", "--sparsity", "0.5", "--out",
                       str(tmp_path / "out"), "--device", "cpu")
    assert rc == 0, err
    assert "to 50.00% over 28 layers" in out
    record = json.loads((tmp_path / "out" / "config.json").read_text())["flash_llm"]["pruning"]
    assert record["calib"] is None and "calib_seqs" not in record and "seq_len" not in record


def test_prune_other_methods_still_need_calib(capsys, tmp_path):
    rc, _, err = run(capsys, "prune", "tiny-shakespeare", "--method", "wanda", "--sparsity", "0.5", "--out",
                     str(tmp_path / "out"), "--device", "cpu")
    assert rc == 2
    assert "--calib" in err and "wanda" in err
    assert not (tmp_path / "out").exists()


def test_prune_magnitude_verbose_report_has_progress(capsys, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_bytes(flash_llm.data.load_tokens(flash_llm.data.corpus_path())[:5_000].numpy().tobytes())
    rc, out, err = run(capsys, "prune", "tiny-shakespeare", "--method", "magnitude", "--sparsity", "0.5", "--out",
                       str(tmp_path / "out"), "--device", "cpu", "--calib", str(calib), "--calib-seqs", "2",
                       "--seq-len", "32", "--batch-size", "1", "--verbose")
    assert rc == 0, err
    assert "calibration" in err  # the error-measuring pass's progress bar
    assert re.search(r"q_proj\s+256x256\s+0\.5000\s+0\.\d+$", out, re.M), out  # the report's per-layer errors


def test_convert_reads_min_sparsity_as_sparsity_does(capsys):
    """``--min-sparsity 50`` is 50 %, as ``--sparsity 50`` (it was refused: only 0.5 and 50% read); 1 is a fraction."""
    from flash_llm.checkpoint.cli import _fraction

    assert _fraction("50") == _fraction("50%") == _fraction("0.5") == 0.5 == cli.sparsity_arg("50")
    assert _fraction("1") == 1.0 and _fraction("100") == 1.0
    with pytest.raises(Exception, match="between 0 and 1"):
        _fraction("150")
    assert main(["convert", "--help"]) == 0
    assert "delta-rows (DeltaRows)" in " ".join(capsys.readouterr().out.split())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_from_pretrained_on_cuda_without_cuda_names_the_device():
    """docs/checkpoints.md's ``from_pretrained(..., device="cuda")`` on a machine without CUDA: a ValueError naming
    the device before any work (it was PyTorch's assertion from deep inside the load)."""
    with pytest.raises(ValueError, match="device='cuda': CUDA is not available"):
        flash_llm.from_pretrained(flash_llm.bundled.path("tiny-shakespeare"), device="cuda")

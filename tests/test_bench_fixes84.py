"""Fixes from session 84: the GPU-only benchmark scripts (dr_*.py, n1_trace.py, profile_decode.py, profile_kernel.py)
read --sparsity (dr_coded: each of --sparsities) with flash_llm.cli.sparsity_arg, 80 as 80 %, and refuse one out of
range when the arguments are parsed, before any CUDA work; bench_spmm checks --ns when the arguments are parsed;
bench_checkpoint --quick records in results.json's "options" what ran, not the defaults --quick replaced."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import REPO, load_script
import test_bench_fixes82

BENCH = REPO / "benchmarks"
#: the scripts with a --sparsity and their own default
SPARSITY_SCRIPTS = {"dr_expand": 0.8, "dr_layouts": 0.8, "dr_mma": 0.8, "dr_parts_tokens": 0.8, "n1_trace": 0.8,
                    "profile_decode": 0.8, "profile_kernel": 0.9}
RANGE = "sparsity must be in [0, 1) as a fraction or [0, 100) as a percentage"


class CudaTouched(Exception):
    pass


def _load(name: str, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # (n1_trace imports profile_decode as its folder's neighbour)
    return load_script(f"benchmarks/{name}.py", f"{name}_fixes84")


def _refused(capsys, fn, argv) -> str:
    """``fn(argv)`` exits 2 (``ap.error``); its stderr."""
    with pytest.raises(SystemExit) as e:
        fn(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def _no_cuda_work(mod, monkeypatch) -> None:
    """Every way these scripts start their GPU work raises :class:`CudaTouched`."""
    def touched(*a, **k):
        raise CudaTouched

    for name in ("Generator", "randn", "rand"):
        monkeypatch.setattr(torch, name, touched)
    monkeypatch.setattr(torch.cuda, "is_available", touched)
    if hasattr(mod, "T"):  # (dr_mma / dr_expand print the environment first)
        monkeypatch.setattr(mod.T, "environment", touched)


# ---- 1. --sparsity 80 is 80 %, as 0.8 and 80%; out of range refused at parse time, before any CUDA work ----------
@pytest.mark.parametrize("name", sorted(SPARSITY_SCRIPTS))
def test_gpu_scripts_read_sparsity_as_flash_llm_does(name, capsys, monkeypatch):
    mod = _load(name, monkeypatch)
    assert mod.parse_args([]).sparsity == SPARSITY_SCRIPTS[name]
    for text in ("80", "0.8", "80%"):
        assert mod.parse_args(["--sparsity", text]).sparsity == pytest.approx(0.8), text  # (was 80.0 for "80")
    assert mod.parse_args(["--sparsity", "0"]).sparsity == 0.0
    for text in ("120", "100", "-5", "1", "abc", "nan"):
        err = _refused(capsys, mod.parse_args, ["--sparsity", text])
        assert "argument --sparsity: sparsity must be" in err, (text, err)
    _no_cuda_work(mod, monkeypatch)
    err = _refused(capsys, mod.main, ["--sparsity", "120"])  # main: refused before its first CUDA call
    assert f"argument --sparsity: {RANGE} (0.5, 50 and 50% all mean 50 %), got '120'" in err, err
    with pytest.raises(CudaTouched):  # (a good value gets as far as the GPU work)
        mod.main(["--sparsity", "80"])


def test_dr_coded_reads_each_of_its_sparsities_as_flash_llm_does(capsys, monkeypatch):
    mod = _load("dr_coded", monkeypatch)
    assert mod.parse_args([]).sparsities == [0.7, 0.8]
    assert mod.parse_args(["--sparsities", "70, 0.8,90%"]).sparsities == pytest.approx([0.7, 0.8, 0.9])
    for text, says in (("0.7,120", RANGE), ("80,x", "sparsity must be a fraction in [0, 1) or a percentage"),
                       ("100", RANGE), (",", "no sparsity given in ','")):
        err = _refused(capsys, mod.parse_args, ["--sparsities", text])
        assert f"argument --sparsities: {says}" in err, (text, err)
    _no_cuda_work(mod, monkeypatch)
    err = _refused(capsys, mod.main, ["--sparsities", "0.7,120"])  # (was: 0.7's weights built and timed first)
    assert "argument --sparsities:" in err and "got '120'" in err, err
    with pytest.raises(CudaTouched):
        mod.main(["--sparsities", "80"])


def test_profile_kernel_is_importable_and_refuses_before_cuda(capsys, monkeypatch):
    """profile_kernel.py ran at import; now its work is ``main()`` and a bad option exits 2 from the command line."""
    mod = _load("profile_kernel", monkeypatch)  # (was: its whole run at import, failing on the first CUDA tensor)
    err = _refused(capsys, mod.parse_args, ["--coded", "--fmt", "bitmap", "--dtype", "bf16"])
    assert "--coded needs --fmt delta-rows --dtype bf16" in err, err
    assert mod.parse_args(["--coded", "--fmt", "delta-rows", "--dtype", "bf16"]).coded
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    p = subprocess.run([sys.executable, "benchmarks/profile_kernel.py", "--sparsity", "120"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and f"argument --sparsity: {RANGE}" in p.stderr, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr


spmm, dry_spmm = test_bench_fixes82.spmm, test_bench_fixes82.dry_spmm  # (its fixtures: a CPU dry run of main())


# ---- 2. bench_spmm --ns: positive integers, checked when parsed (a bad one: exit 2 naming --ns, nothing written) ---
def test_bench_spmm_checks_ns_when_parsing(dry_spmm, tmp_path, capsys, monkeypatch):
    bench = dry_spmm  # (test_bench_fixes82's CPU dry run of main(): CUDA present, fixed times, 64 x 64 layers)
    timed = []
    monkeypatch.setattr(bench.T, "time_calls", lambda fns, **k: timed.append(1) or 1e-5)
    base = ["--models", "Llama-3-8B", "--formats", "bitmap", "--dtypes", "fp16", "--sparsities", "80"]
    for bad in ("1,x", "0", "8,-1", "1.5", ",", ""):
        err = _refused(capsys, bench.main, base + ["--ns", bad, "--out", str(tmp_path / "a")])
        assert f"argument --ns: expected comma-separated positive integers (N: the rows of X), got {bad!r}" in err, \
            (bad, err)
    assert not timed and not (tmp_path / "a").exists()  # (was: --out made, then a ValueError; 0: timed 0-row X)
    with contextlib.redirect_stdout(io.StringIO()):
        assert bench.main(base + ["--ns", " 1, 32,", "--out", str(tmp_path / "b")]) == 0
    rows = json.loads((tmp_path / "b" / "results.json").read_text())["rows"]
    assert [r["N"] for r in rows] == [1, 32]
    assert bench.ns_arg(",".join(map(str, bench.NS))) == bench.NS  # (the default)


# ---- 3. bench_checkpoint: "options" holds what ran (--quick's model, 2MB shards, the CPU; layers resolved) --------
class Stop(Exception):
    pass


def _options(bc, tmp_path, monkeypatch, argv) -> dict:
    """results.json of ``bc.main(argv)`` stopped after its first step (the dense source stubbed): (options, result)."""
    monkeypatch.setattr(bc, "write_dense_source", lambda *a, **k: {})
    monkeypatch.setattr(bc._files, "open_checkpoint", lambda p: types.SimpleNamespace(shards=[Path(__file__)],
                                                                                       nbytes=1))
    monkeypatch.setattr(bc, "_evict", lambda p: (_ for _ in ()).throw(Stop()))
    monkeypatch.setattr(bc.shutil, "disk_usage", lambda p: types.SimpleNamespace(free=1 << 50))
    out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
    with contextlib.redirect_stdout(io.StringIO()), pytest.raises(Stop):
        bc.main([*argv, "--no-hf", "--out", str(out)])
    result = json.loads((out / "results.json").read_text())
    return result["options"], result


def test_bench_checkpoint_quick_records_the_options_that_ran(tmp_path, monkeypatch):
    bc = load_script("benchmarks/bench_checkpoint.py", "bench_checkpoint_fixes84")
    opts, res = _options(bc, tmp_path, monkeypatch, ["--quick"])
    # (was model llama-3-8b, shard 5GB, device None, layers None: the defaults, not the tiny CPU model that ran)
    assert (opts["model"], opts["shard"], opts["device"], opts["layers"]) == ("quick", "2MB", "cpu", 2)
    assert (res["model"], res["shard"], res["device"], res["layers"]) == ("quick", "2MB", "cpu", 2)
    assert opts["quick"] is True and opts["sparsity"] == 0.8 and "_child" not in opts
    opts, _ = _options(bc, tmp_path, monkeypatch, ["--quick", "--layers", "1", "--sparsity", "50"])
    assert (opts["model"], opts["shard"], opts["layers"], opts["sparsity"]) == ("quick", "2MB", 1, 0.5)
    # without --quick: the model and shard given (or their defaults), the layer count and device resolved
    opts, res = _options(bc, tmp_path, monkeypatch, ["--model", "opt-13b", "--shard", "64KiB", "--layers", "1",
                                                     "--device", "cpu"])
    assert (opts["model"], opts["shard"], opts["device"], opts["layers"]) == ("opt-13b", "64KiB", "cpu", 1)
    assert res["shard"] == "64KiB" and res["layers"] == 1


# ---- 4. the dr_* scripts' lists and counts: checked when parsed (were int()'d after, or took 0 / negatives) ---------
@pytest.mark.parametrize("name, flag, good, want", [
    ("dr_mma", "--ns", "8, 16,", [8, 16]), ("dr_mma", "--tile-bands", "", []),
    ("dr_mma", "--tile-splits", "2,4", [2, 4]),
    ("dr_parts_tokens", "--ns", "1,2", [1, 2]), ("dr_parts_tokens", "--replays", "5", 5),
    ("dr_coded", "--layers", "3", 3), ("dr_coded", "--replays", "7", 7),
    ("dr_layouts", "--layers", "3", 3), ("dr_layouts", "--replays", "7", 7)])
def test_dr_scripts_check_their_lists_and_counts_when_parsing(name, flag, good, want, capsys, monkeypatch):
    mod = _load(name, monkeypatch)
    assert getattr(mod.parse_args([flag, good]), flag[2:].replace("-", "_")) == want
    for bad in ("0", "-1", "x", "1.5") + (("1,x", "8,0") if "," in good or flag == "--ns" else ()):
        err = _refused(capsys, mod.parse_args, [flag, bad])
        assert f"argument {flag}:" in err, (flag, bad, err)

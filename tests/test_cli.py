"""The ``flash-llm`` command line (CPU): the synthetic-layer demo (``demo --layer``), info, build, inspect, exit
statuses and the console script.  The model demo and ``prune`` are tested in test_demo.py."""

from __future__ import annotations

import importlib.metadata
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import flash_llm
from flash_llm.cli import magnitude_prune, main

from _kernel_names import EXPECTED_KERNELS
from conftest import sparse_weight

# One row of the demo table: sparsity, weight, bytes, bytes/elem, vs dense, compress, rel. error, round trip.
DEMO_ROW = re.compile(r"^\s*(?P<sparsity>[\d.]+)%\s+(?P<weight>dense \w+|BitmapTiles|TiledCSL|DeltaRows)\s+"
                      r"(?P<bytes>[\d,]+)\s+(?P<bpe>[\d.]+)\s+(?P<ratio>[\d.]+)x\s+(?P<time>-|[\d.]+ s)\s+"
                      r"(?P<err>[\d.e+-]+)\s+(?P<trip>\S+)$")
# One row of the build report: kernel, registers, spill stores, spill loads, stack, static smem.
KERNEL_ROW = re.compile(r"^\s+(?P<name>\w+)\s+(?P<regs>\d+)\s+(?P<st>\d+)\s+(?P<ld>\d+)\s+(?P<stack>\d+)\s+"
                        r"(?P<smem>\d+)$")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def demo_rows(out: str) -> dict[tuple[float, str], dict]:
    rows = {}
    for line in out.splitlines():
        m = DEMO_ROW.match(line)
        if m:
            d = m.groupdict()
            rows[(float(d["sparsity"]), d["weight"])] = {
                "bytes": int(d["bytes"].replace(",", "")), "bpe": float(d["bpe"]), "ratio": float(d["ratio"]),
                "err": float(d["err"]), "trip": d["trip"], "time": d["time"]}
    return rows


def bitmap_bounds(m: int, k: int, nnz: int) -> tuple[int, int]:
    """BitmapTiles bytes are ``128 T + 16 sum ceil(nnz_i / 8) + 4 (T + 1)``: between nnz packed tightly
    and every strip wasting up to 14 bytes of padding."""
    t = math.ceil(m / 16) * math.ceil(k / 64)
    low = 128 * t + 2 * nnz + 4 * (t + 1)
    return low, low + 14 * t


def tiled_csl_bounds(m: int, k: int, nnz: int) -> tuple[int, int]:
    """TiledCSL bytes are ``4 sum ceil4(nnz_i) + 4 (T + 1)``: up to 3 pad entries per 64x64 tile."""
    t = math.ceil(m / 64) * math.ceil(k / 64)
    low = 4 * nnz + 4 * (t + 1)
    return low, low + 12 * t


# ------------------------------------------------------------------------------------------------
# demo
# ------------------------------------------------------------------------------------------------
def test_demo_end_to_end(capsys):
    m, k = 256, 512
    rc, out, err = run(capsys, "demo", "--layer", "--shape", f"{m}x{k}", "--device", "cpu")
    assert rc == 0, err
    rows = demo_rows(out)
    for s in (50.0, 70.0, 80.0, 90.0):
        dense = rows[(s, "dense float16")]
        assert dense["bytes"] == m * k * 2 and dense["bpe"] == 2.0 and dense["ratio"] == 1.0
        nnz = m * k - round(m * k * s / 100)
        for name, bounds in (("BitmapTiles", bitmap_bounds), ("TiledCSL", tiled_csl_bounds)):
            r = rows[(s, name)]
            low, high = bounds(m, k, nnz)
            assert low <= r["bytes"] <= high, (s, name, r)
            assert r["bpe"] == pytest.approx(r["bytes"] / (m * k), abs=1e-3)
            assert r["ratio"] == pytest.approx(m * k * 2 / r["bytes"], abs=0.01)
            assert r["err"] < 1e-2, (s, name, r)
            assert r["trip"] == "exact"
            assert r["time"].endswith(" s")
        r = rows[(s, "DeltaRows")]  # 2.5 bytes an entry at least, plus headers (the split count is the encoder's)
        assert 2.5 * nnz <= r["bytes"] <= 2.5 * nnz * 1.4 + 4096, (s, r)
        assert r["err"] < 1e-2 and r["trip"] == "exact" and r["time"].endswith(" s"), (s, r)
    assert rows[(50.0, "BitmapTiles")]["bpe"] < rows[(50.0, "TiledCSL")]["bpe"]
    for name in ("BitmapTiles", "TiledCSL", "DeltaRows"):
        sizes = [rows[(s, name)]["bytes"] for s in (50.0, 70.0, 80.0, 90.0)]
        assert sizes == sorted(sizes, reverse=True), (name, sizes)
    assert "kernel timings need a CUDA GPU" in out
    assert "`flash-llm demo` without --layer prunes the bundled model" in out
    assert "error" not in err


def test_demo_options_awkward_shape_bf16(capsys):
    """Shape that is no tile multiple, 0 % and 95 % sparsity, bf16, comma and space separated."""
    rc, out, err = run(capsys, "demo", "--layer", "--shape", "100x200", "--sparsities", "0,95", "33", "--dtype",
                       "bfloat16", "--seed", "3", "--tokens", "3", "--device", "cpu")
    assert rc == 0, err
    rows = demo_rows(out)
    assert {s for s, _ in rows} == {0.0, 95.0, 33.0}
    for (s, name), r in rows.items():
        if name == "dense bfloat16":
            continue
        assert name in ("BitmapTiles", "TiledCSL", "DeltaRows")
        assert r["trip"] == "exact" and r["err"] < 1e-2, (s, name, r)
    assert "100x200 bfloat16" in out


@pytest.mark.parametrize("argv, match", [
    (["--shape", "4096"], "shape must be MxK"),
    (["--shape", "0x16"], "shape must be MxK"),
    (["--sparsities", "100"], r"sparsity must be in \[0, 1\) as a fraction or \[0, 100\)"),
    (["--sparsities", "half"], "sparsity must be a fraction in"),
    (["--dtype", "float32"], "invalid choice"),
    (["--device", "tpu"], "--device must be"),
])
def test_demo_bad_arguments(capsys, argv, match):
    rc, _, err = run(capsys, "demo", "--layer", *argv)
    assert rc == 2
    assert re.search(match, err), err


def test_model_demo_checks_gen_tokens_first(capsys):
    """A negative --gen-tokens is a usage error before the model demo prunes or evaluates anything."""
    rc, out, err = run(capsys, "demo", "--gen-tokens", "-5", "--eval-tokens", "64", "--calib-seqs", "1", "--seq-len",
                       "32", "--device", "cpu")
    assert rc == 2 and "argument --gen-tokens: expected a non-negative integer, got -5" in err, err
    assert out == ""


def test_demo_cuda_without_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    rc, _, err = run(capsys, "demo", "--layer", "--device", "cuda", "--shape", "64x64")
    assert rc == 2 and "error: --device cuda: CUDA is not available" in err


def test_demo_layer_excludes_model(capsys):
    rc, out, err = run(capsys, "demo", "--layer", "--model", "some/dir")
    assert rc == 2
    assert out == ""
    assert "error: --model and --layer exclude each other" in err


@pytest.mark.parametrize("sparsity", [0.0, 37.5, 75.0, 99.9])
def test_magnitude_prune_keeps_largest(sparsity):
    w = torch.randn(48, 80, generator=torch.Generator().manual_seed(1)).half()
    order = torch.argsort(w.abs().float().view(-1), descending=True, stable=True)
    p = magnitude_prune(w, order, sparsity)
    kept = p != 0
    assert int(kept.sum()) == w.numel() - round(w.numel() * sparsity / 100)
    assert torch.equal(p[kept], w[kept])
    if 0 < int(kept.sum()) < w.numel():
        assert float(w[kept].abs().min()) >= float(w[~kept].abs().max())
    assert not bool(torch.signbit(p[~kept]).any()), "pruned entries must be +0.0"


# ------------------------------------------------------------------------------------------------
# info and build
# ------------------------------------------------------------------------------------------------
def test_info(capsys):
    rc, out, _ = run(capsys, "info")
    assert rc == 0
    assert re.search(rf"^torch\s+{re.escape(torch.__version__)}", out, re.M), out
    assert re.search(rf"^flash-llm\s+{re.escape(flash_llm.__version__)}", out, re.M), out
    assert re.search(r"^CUDA\s+(not available|available)", out, re.M)
    assert re.search(r"^kernels( on GPU \d+)?\s+(supported|not supported: )", out, re.M)
    assert re.search(r"^NVRTC\s+", out, re.M)
    assert re.search(r"^cubin cache\s+\S+", out, re.M)


def test_build_report_sm80(capsys, tmp_path, monkeypatch):
    pytest.importorskip("cuda.bindings", reason="cuda-python not installed")
    monkeypatch.setenv("FLASH_LLM_CACHE", str(tmp_path))
    rc, out, err = run(capsys, "build", "--arch", "sm_80", "--report", "--strict")
    assert rc == 0, err
    assert re.search(r"^sm_80: compiled in [\d.]+ s, cubin [\d,]+ bytes$", out, re.M), out
    kernels = {m["name"]: m for m in map(KERNEL_ROW.match, out.splitlines()) if m}
    if not kernels:  # (the GPU image's NVRTC 13.0 returns no ptxas report at times; CI's 13.5 always does)
        from flash_llm.kernels._build import nvrtc_version

        if nvrtc_version() < (13, 5):
            pytest.skip(f"NVRTC {nvrtc_version()} returned no ptxas resource report")
    assert set(kernels) == EXPECTED_KERNELS, out
    for name, r in kernels.items():
        assert 0 < int(r["regs"]) <= 255, (name, r.groups())
    assert "warnings: none" in out
    assert list((tmp_path / "cubin").glob("spmm-sm_80-*.cubin")), "build must fill the cubin cache"

    # a second build comes from the cache (no ptxas log, so no table unless --report)
    rc, out, _ = run(capsys, "build", "--arch", "sm_80")
    assert rc == 0
    assert re.search(r"^sm_80: from the cache, cubin [\d,]+ bytes$", out, re.M), out
    assert not any(KERNEL_ROW.match(line) for line in out.splitlines())


def test_build_bad_arch(capsys):
    rc, _, err = run(capsys, "build", "--arch", "hopper")
    assert rc == 2 and "arch must look like 'sm_90'" in err


# ------------------------------------------------------------------------------------------------
# inspect
# ------------------------------------------------------------------------------------------------
def inspect_rows(out: str) -> dict[str, list[str]]:
    rows = {}
    for line in out.splitlines():
        cells = line.split()
        if cells and cells[0] not in ("name",) and len(cells) == 8:
            rows[cells[0]] = cells
    return rows


def test_inspect_single_weight(capsys, tmp_path):
    w = flash_llm.BitmapTiles.from_dense(sparse_weight(100, 200, 0.3, torch.float16, seed=2))
    path = tmp_path / "w.safetensors"
    w.save(path)
    rc, out, err = run(capsys, "inspect", str(path))
    assert rc == 0, err
    row = inspect_rows(out)["weight"]
    assert row[1:4] == ["BitmapTiles", "100x200", "float16"]
    assert int(row[4].replace(",", "")) == w.nnz
    assert float(row[5]) == pytest.approx(w.density, abs=1e-4)
    assert int(row[6].replace(",", "")) == w.nbytes
    assert f"{path}: 1 weight," in out


def test_inspect_multi_weight(capsys, tmp_path):
    weights = {"q_proj": flash_llm.BitmapTiles.from_dense(sparse_weight(64, 128, 0.5, torch.float16, seed=1)),
               "k_proj": flash_llm.TiledCSL.from_dense(sparse_weight(70, 65, 0.1, torch.bfloat16, seed=2))}
    path = tmp_path / "layer0.safetensors"
    flash_llm.save(weights, path)
    rc, out, err = run(capsys, "inspect", str(path))
    assert rc == 0, err
    rows = inspect_rows(out)
    for name, w in weights.items():
        m, k = w.shape
        r = rows[name]
        assert r[1:4] == [type(w).__name__, f"{m}x{k}", str(w.dtype).removeprefix("torch.")]
        assert float(r[5]) == pytest.approx(w.density, abs=1e-4)
        assert int(r[6].replace(",", "")) == w.nbytes
    total = out.splitlines()
    total_row = next(line.split() for line in total if line.startswith("total"))
    assert int(total_row[1].replace(",", "")) == sum(w.nnz for w in weights.values())
    assert int(total_row[3].replace(",", "")) == sum(w.nbytes for w in weights.values())


def test_inspect_corrupt_file(capsys, tmp_path):
    w = flash_llm.TiledCSL.from_dense(sparse_weight(64, 64, 0.5, torch.float16))
    good = tmp_path / "good.safetensors"
    w.save(good)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(good.read_bytes()[:40])
    rc, out, err = run(capsys, "inspect", str(bad))
    assert rc == 2
    assert err.startswith("error: ") and str(bad) in err and "Traceback" not in err
    assert out == ""


def test_inspect_not_flash_llm_and_missing(capsys, tmp_path):
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"a": torch.zeros(3)}, str(other))
    rc, _, err = run(capsys, "inspect", str(other))
    assert rc == 2 and "error: " in err and "not a flash-llm weight file" in err
    rc, _, err = run(capsys, "inspect", str(tmp_path / "missing.safetensors"))
    assert rc == 2 and "error: " in err and "no such file" in err


# ------------------------------------------------------------------------------------------------
# top level and the console script
# ------------------------------------------------------------------------------------------------
def test_no_subcommand(capsys):
    rc, out, err = run(capsys)
    assert rc == 2
    assert "usage: flash-llm" in err and "demo" in err and "inspect" in err


@pytest.mark.parametrize("command", ["demo", "prune", "info", "build", "inspect"])
def test_subcommand_help(capsys, command):
    rc, out, _ = run(capsys, command, "--help")
    assert rc == 0
    assert out.startswith(f"usage: flash-llm {command}")


def _console_script() -> str:
    try:  # run from a source tree on PYTHONPATH (no install, e.g. the GPU machine): no script to test
        importlib.metadata.distribution("flash-llm")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("flash-llm is not pip-installed here, so there is no console script")
    script = Path(sys.executable).with_name("flash-llm")
    found = str(script) if script.exists() else shutil.which("flash-llm")
    assert found, "the flash-llm console script is not installed (pip install -e .)"
    return found


def test_console_script(tmp_path):
    script = _console_script()
    r = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for command in ("demo", "prune", "info", "build", "inspect"):
        assert command in r.stdout
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 16)
    r = subprocess.run([script, "inspect", str(bad)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and "Traceback" not in r.stderr

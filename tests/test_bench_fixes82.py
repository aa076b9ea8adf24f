"""Fixes from session 82's review of the benchmark scripts, on the CPU: bench_e2e refuses a sequence longer than a
model's positions before the sweep and applies --max-batch with --tp; bench_spmm checks its lists before timing,
exits with its refusals' status, lets an explicit --models win over --quick and labels sparsities as given;
bench_formats refuses --device cuda without a GPU."""

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
from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]


def _load(rel: str, name: str):
    return load_script(f"benchmarks/{rel}", f"{name}_fixes82")


@pytest.fixture(scope="module")
def e2e():
    return _load("bench_e2e.py", "bench_e2e")


@pytest.fixture
def spmm():
    return _load("bench_spmm.py", "bench_spmm")


def _refused(capsys, fn, *args) -> str:
    """``fn(*args)`` exits 2 (``ap.error``); its stderr."""
    with pytest.raises(SystemExit) as e:
        fn(*args)
    assert e.value.code == 2
    return capsys.readouterr().err


# ---- 1. bench_e2e: --prompt + --new / --max-seq against each model's positions, before anything is built ---------
def test_bench_e2e_refuses_a_sequence_longer_than_a_models_positions(e2e, capsys):
    assert e2e.TINY["tiny-opt"].max_position_embeddings == 512
    argv = ["--device", "cpu", "--models", "tiny-llama,tiny-opt", "--prompt", "510", "--new", "4"]
    err = _refused(capsys, e2e.parse_args, argv)
    assert "--prompt + --new (514) exceeds the max_position_embeddings of tiny-opt (512)" in err, err
    assert "tiny-llama" not in err.split("error:")[-1]  # (8192 positions: not named)
    err = _refused(capsys, e2e.parse_args, ["--models", "tiny-opt", "--prompt", "8", "--new", "4", "--max-seq", "600"])
    assert "--max-seq (600) exceeds the max_position_embeddings of tiny-opt (512)" in err, err
    # the defaults' OPT-30B (2048 positions) at a prompt Llama-3-8B takes
    err = _refused(capsys, e2e.parse_args, ["--prompt", "2000", "--new", "128"])
    assert "max_position_embeddings of opt-30b (2048)" in err and "llama-3-8b" not in err.split("error:")[-1], err
    # up to the positions is fine
    assert e2e.parse_args(["--models", "tiny-llama,tiny-opt", "--prompt", "508", "--new", "4"]).prompt == 508
    assert e2e.parse_args(["--models", "tiny-opt", "--prompt", "8", "--new", "4", "--max-seq", "512"]).max_seq == 512
    assert e2e.parse_args(["--models", "tiny-llama", "--prompt", "510", "--new", "4"]).new == 4


# ---- 2. bench_e2e --tp: --max-batch sizes every engine, and the env records the engine's settings -----------------
def test_bench_e2e_tp_applies_max_batch_and_records_it(e2e, world1, tmp_path, monkeypatch):
    seen = []
    real = e2e.Engine

    def spy(model, **kw):
        seen.append((kw["max_batch"], kw["max_seq"]))
        return real(model, **kw)

    monkeypatch.setattr(e2e, "Engine", spy)
    argv = ["--tp", "1", "--device", "cpu", "--models", "tiny-llama", "--sparsities", "0", "--batches", "1,2",
            "--prompt", "4", "--new", "3", "--repeats", "1", "--no-progress", "--max-batch", "4", "--out",
            str(tmp_path)]
    with contextlib.redirect_stdout(io.StringIO()):
        assert e2e.main(argv) == 0
    assert seen == [(4, 7), (4, 7)]  # one engine size for both batches (was max_batch 1, then 2)
    data = json.loads((tmp_path / "results.json").read_text())
    assert [r["status"] for r in data["rows"]] == ["ok", "ok"]
    cache = [r["per_rank"][0]["cache_bytes"] for r in data["rows"]]
    assert cache[0] == cache[1] > 0
    env = data["env"]
    assert (env["max_batch"], env["max_seq"], env["delta_layout"], env["engine_formats"]) == (4, None, "auto", "keep")


# ---- 3-6. bench_spmm: a CPU dry run of main() (CUDA, timings and the generator stubbed; 64 x 64 layers) -----------
@pytest.fixture
def dry_spmm(spmm, monkeypatch):
    """``spmm`` whose ``main()`` runs on the CPU: CUDA present, fixed times (dense 20 us, sparse 10 us), every layer
    64 x 64; the argument handling, rows, summary and writers are the script's own."""

    class FakeTorch(types.ModuleType):
        def __getattr__(self, name):
            return getattr(torch, name)

    ft = FakeTorch("torch")
    ft.cuda = types.SimpleNamespace(is_available=lambda: True)
    ft.Generator = lambda device=None: torch.Generator()
    ft.randn = lambda *a, device=None, **k: torch.randn(*a, **k)
    ft.rand = lambda *a, device=None, **k: torch.rand(*a, **k)
    monkeypatch.setattr(spmm, "torch", ft)
    for name, fn in (("kernels_missing", lambda device=None: ""), ("environment", lambda device=None: {}),
                     ("copy_bandwidth", lambda nbytes=0: 3.0e12), ("time_calls", lambda fns, **k: 1e-5),
                     ("weight_copies", lambda w: [w]), ("copies_needed", lambda nbytes, **k: 1),
                     ("rotation_shortfall", lambda nbytes, copies, **k: 0)):
        monkeypatch.setattr(spmm.T, name, fn)
    monkeypatch.setattr(spmm, "time_dense", lambda copies, xs: {n: 2e-5 for n in xs})
    monkeypatch.setattr(spmm.kernels, "dispatches_sparse", lambda n, *a, **k: n <= 16)
    monkeypatch.setattr(spmm, "LAYERS", {model: {"o": (64, 64)} for model in spmm.LAYERS})
    return spmm


def _run(spmm, tmp_path, *argv) -> list[dict]:
    with contextlib.redirect_stdout(io.StringIO()):
        assert not spmm.main([*argv, "--out", str(tmp_path)])  # (0; a refusal: 2)
    return json.loads((tmp_path / "results.json").read_text())["rows"]


def test_bench_spmm_refuses_unknown_names_and_sparsities_before_timing(dry_spmm, tmp_path, capsys, monkeypatch):
    timed = []
    monkeypatch.setattr(dry_spmm.T, "time_calls", lambda fns, **k: timed.append(1) or 1e-5)
    base = ["--models", "Llama-3-8B", "--formats", "bitmap", "--dtypes", "fp16", "--ns", "1", "--sparsities", "80",
            "--out", str(tmp_path)]
    for bad, flag, names in ((["--models", "llama-3-8b"], "--models", "'llama-3-8b'"),
                             (["--formats", "bitmap,tiledcsl"], "--formats", "'tiledcsl'"),
                             (["--dtypes", "fp16,fp32"], "--dtypes", "'fp32'")):
        err = _refused(capsys, dry_spmm.main, base + bad)
        assert f"{flag}: unknown {names}; choose from" in err, err
        # the allowed values are named
        known = {"--models": dry_spmm.LAYERS, "--formats": dry_spmm.FORMATS, "--dtypes": dry_spmm.DTYPES}[flag]
        assert all(k in err for k in known), err
    for bad in ("150", "-20", "100", "50,150"):
        err = _refused(capsys, dry_spmm.main, base + ["--sparsities", bad])
        assert "--sparsities are percentages in [0, 100)" in err, err
    err = _refused(capsys, dry_spmm.main, base + ["--sparsities", "0.8"])
    assert "--sparsities takes comma-separated integers" in err, err
    assert not timed and not list(tmp_path.iterdir())  # refused before any timing or file
    rows = _run(dry_spmm, tmp_path, *base[:-2], "--sparsities", "0,99")
    assert sorted({r["sparsity"] for r in rows}) == [0.0, 0.99]


def test_bench_spmm_exits_with_its_refusals_status(tmp_path):
    """No CUDA (hidden from the child where there is one): the "error:" line and exit status 2, not 0."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    p = subprocess.run([sys.executable, "benchmarks/bench_spmm.py", "--out", str(tmp_path)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert "error: no CUDA device" in p.stderr, p.stderr
    assert p.returncode == 2
    assert not list(tmp_path.iterdir())


def test_bench_spmm_explicit_models_win_over_quick(dry_spmm, tmp_path):
    fast = ["--dtypes", "fp16", "--formats", "bitmap", "--sparsities", "80"]
    rows = _run(dry_spmm, tmp_path / "a", "--quick", "--models", "OPT-30B", *fast, "--ns", "1,16")
    assert {r["model"] for r in rows} == {"OPT-30B"}
    # --quick alone: its two models, every N (what benchmarks/RESULTS.md's --quick runs measured), as its help says
    rows = _run(dry_spmm, tmp_path / "b", "--quick", *fast)
    assert sorted({r["model"] for r in rows}) == sorted(dry_spmm.QUICK_MODELS) == ["Llama-3-8B", "OPT-66B"]
    assert sorted({r["N"] for r in rows}) == dry_spmm.NS
    rows = _run(dry_spmm, tmp_path / "c", *fast, "--ns", "1")
    assert [r["model"] for r in rows] == list(dry_spmm.LAYERS)  # no --quick: every model
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit):
        dry_spmm.main(["--help"])
    text = " ".join(buf.getvalue().split())
    assert "every N of --ns; an explicit --models wins" in text, text


def test_bench_spmm_labels_sparsities_as_given(dry_spmm, tmp_path, monkeypatch):
    rows = _run(dry_spmm, tmp_path, "--models", "Llama-3-8B", "--formats", "bitmap", "--dtypes", "fp16", "--ns", "1",
                "--sparsities", "29,57,58,80")
    table = [x.split(" | ")[2] for x in dry_spmm.summarize(rows).splitlines() if x.startswith("| bitmap")]
    assert table == ["29%", "57%", "58%", "80%"]  # (int(0.57 * 100) was 56)
    assert (tmp_path / "summary.md").read_text() == dry_spmm.summarize(rows)
    assert [dry_spmm.sparsity_pct(s) for s in (0.29, 0.57, 0.58, 0.5)] == [29, 57, 58, 50]
    labels = []

    class Ax:
        def plot(self, *a, label=None, **k):
            labels.append(label)

        def __getattr__(self, name):
            return lambda *a, **k: None

    plt = types.ModuleType("matplotlib.pyplot")
    plt.subplots = lambda r, c, **k: (types.SimpleNamespace(tight_layout=lambda: None, savefig=lambda *a, **k: None),
                                      [[Ax() for _ in range(c)] for _ in range(r)])
    mpl = types.ModuleType("matplotlib")
    mpl.use, mpl.pyplot = (lambda backend: None), plt
    monkeypatch.setitem(sys.modules, "matplotlib", mpl)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", plt)
    dry_spmm.plot(rows, str(tmp_path / "speedup.png"))
    assert labels == ["29%", "57%", "58%", "80%"]


# ---- 7. bench_formats: --device cuda without a GPU is refused; --device all still skips the GPU ------------------
def test_bench_formats_refuses_cuda_without_a_gpu(capsys, monkeypatch):
    bf = _load("bench_formats.py", "bench_formats")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        bf.main(["--device", "cuda", "--sizes", "64x64"])
    assert e.value.code == 2
    out, err = capsys.readouterr()
    assert "--device cuda: no CUDA device is available" in err and "--device cpu" in err, err
    assert out == ""  # nothing run, not even the environment line
    rows = bf.main(["--device", "all", "--sizes", "64x64"])
    assert [(r["device"], r["format"]) for r in rows] == [("cpu", "bitmap"), ("cpu", "tiled-csl")]

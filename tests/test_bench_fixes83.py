"""Fixes from session 83's review of the CPU benchmark scripts: accuracy.py scores a --model directory on its own
tokenizer's ids and checks its options before the run; bench_formats / bench_checkpoint / bench_prune / cpu_generate
read --sparsity 80 as 80 % (flash-llm's reading) and refuse bad options up front with exit status 2;
bench_checkpoint refuses --model / --shard with --quick and replaces only a --workdir's dense/ and flash/ of its
own."""

from __future__ import annotations

import contextlib
import io
import math
import types
from pathlib import Path

import pytest
import test_demo
import torch
from conftest import load_script

from flash_llm import data
from flash_llm.cli import main as flash_llm_main
from flash_llm.demo import load_model

hf_checkpoint = test_demo.hf_checkpoint  # (a tiny random OPT with a 320-token BPE tokenizer, and that tokenizer)


def _load(name: str):
    return load_script(f"benchmarks/{name}.py", f"{name}_fixes83")


def _refused(capsys, fn, argv) -> str:
    """``fn(argv)`` exits 2 (``ap.error``); its stderr."""
    with pytest.raises(SystemExit) as e:
        fn(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


class Stop(Exception):
    pass


# ---- 1. accuracy.py --model DIR: calibration, training and validation on the directory's own tokenizer -----------
def test_accuracy_scores_a_model_directory_on_its_tokenizers_ids(hf_checkpoint, tmp_path, monkeypatch):
    acc = _load("accuracy")
    d, fast = hf_checkpoint
    seen = {}

    def spy_calibration(tokens, n, seq_len, **kw):
        seen["train"] = tokens.clone()
        return real_calibration(tokens, n, seq_len, **kw)

    def spy_evaluate(model, tokens, **kw):  # the dense evaluation: what it scores, then stop
        seen["val"] = tokens.clone()
        raise Stop

    real_calibration = acc.data.calibration_batches
    monkeypatch.setattr(acc.data, "calibration_batches", spy_calibration)
    monkeypatch.setattr(acc, "evaluate", spy_evaluate)
    n = int(torch.randint(50, 400, ()))
    with pytest.raises(Stop):
        acc.main(["--model", str(d), "--methods", "magnitude", "--sparsities", "50", "--eval-tokens", str(n),
                  "--calib-seqs", "1", "--seq-len", "32", "--device", "cpu", "--quiet", "--out",
                  str(tmp_path / "A.md")])
    train_bytes, val_bytes = data.split(data.load_tokens(data.corpus_path()))
    want = torch.tensor(fast(data.decode(val_bytes), add_special_tokens=False)["input_ids"])[:n + 1]
    assert torch.equal(seen["val"].long(), want)  # (was the bytes: ids 10, 10, 71, ... of a 320-token vocabulary)
    assert int(seen["val"].max()) > 255 and not torch.equal(seen["val"][:n + 1].long(), val_bytes[:n + 1].long())
    head = torch.tensor(fast(data.decode(train_bytes[:5000]), add_special_tokens=False)["input_ids"])[:500]
    assert torch.equal(seen["train"][:500].long(), head)  # the calibration (and training) tokens too


# ---- 2. accuracy.py: every option checked before the model is loaded; --seq-len above the context refused -------
def test_accuracy_refuses_bad_options_before_the_run(hf_checkpoint, tmp_path, capsys, monkeypatch):
    acc = _load("accuracy")
    loads = []

    def no_load(*a, **k):
        loads.append(a)
        raise Stop

    monkeypatch.setattr(acc, "load_model", no_load)
    base = ["--methods", "magnitude,gradual-distill", "--sparsities", "50", "--device", "cpu", "--quiet",
            "--out", str(tmp_path / "A.md")]
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    bad = -int(torch.randint(1, 1000, ()))
    for extra, says in ((["--eval-tokens", "0"], "argument --eval-tokens: expected a positive integer, got 0"),
                        (["--eval-tokens", str(bad)], f"--eval-tokens: expected a positive integer, got {bad}"),
                        (["--seq-len", "0"], "argument --seq-len: expected a positive integer, got 0"),
                        (["--retrain-lr", "-1"], "argument --retrain-lr: expected a finite number > 0, got '-1'"),
                        (["--retrain-lr", "0"], "argument --retrain-lr: expected a finite number > 0"),
                        (["--retrain-lr", "nan"], "argument --retrain-lr: expected a finite number > 0"),
                        (["--distill", "0"], "argument --distill: expected a finite number > 0, got '0'"),
                        (["--distill", "inf"], "argument --distill: expected a finite number > 0"),
                        (["--out", str(a_file / "A.md")], f"--out {a_file / 'A.md'}: {a_file} is not a directory"),
                        (["--json", str(a_file / "a.json")], f"--json {a_file / 'a.json'}: {a_file} is not a "
                                                             "directory"),
                        (["--out", str(tmp_path)], f"--out {tmp_path} is a directory")):
        err = _refused(capsys, acc.main, base + extra)
        assert says in err, (extra, err)
    assert not loads and a_file.read_text() == "x"  # refused before loading anything
    # --seq-len above the model's context (128): refused after loading it, before any evaluation (was clamped)
    evaluated = []
    monkeypatch.setattr(acc, "load_model", load_model)
    monkeypatch.setattr(acc, "evaluate", lambda *a, **k: evaluated.append(1))
    d, _ = hf_checkpoint
    assert acc.main(["--model", str(d), *base[2:], "--seq-len", "129"]) == 2
    assert "--seq-len 129 exceeds the context of" in capsys.readouterr().err
    assert not evaluated and not (tmp_path / "A.md").exists()
    assert acc.parse_args(base + ["--seq-len", "128", "--eval-tokens", "1", "--retrain-lr", "1e-4",
                                  "--distill", "0.5"]).seq_len == 128


# ---- 3. --sparsity 80 is 80 % (bench_formats, bench_checkpoint), as 0.8 and 80%; out-of-range refused ------------
def test_bench_formats_reads_sparsity_as_flash_llm_does(capsys, monkeypatch):
    bf = _load("bench_formats")
    dens = []

    class Spy:
        def __init__(self, cls):
            self.cls = cls

        def from_dense(self, w):
            dens.append(float((w != 0).float().mean()))
            return self.cls.from_dense(w)

    monkeypatch.setattr(bf, "FORMATS", {k: Spy(v) for k, v in bf.FORMATS.items()})
    for text in ("80", "0.8", "80%"):
        dens.clear()
        rows = bf.main(["--device", "cpu", "--sizes", "128x128", "--sparsity", text])
        assert [r["sparsity"] for r in rows] == [0.8, 0.8]
        assert all(abs(x - 0.2) < 0.03 for x in dens), (text, dens)  # (80 kept no weight at all)
    capsys.readouterr()
    for text in ("100", "1", "-5", "abc", "nan"):
        err = _refused(capsys, bf.main, ["--device", "cpu", "--sizes", "64x64", "--sparsity", text])
        assert "argument --sparsity: sparsity must be" in err, err


def test_bench_checkpoint_reads_sparsity_as_flash_llm_does(tmp_path, capsys, monkeypatch):
    bc = _load("bench_checkpoint")
    real = bc.write_dense_source
    got = []

    def spy(cfg, path, sparsity, device, shard):
        got.append(real(cfg, path, sparsity, device, shard)["projection_density"])
        raise Stop

    monkeypatch.setattr(bc, "write_dense_source", spy)
    with pytest.raises(Stop):
        bc.main(["--quick", "--no-hf", "--sparsity", "80", "--out", str(tmp_path / "a")])
    assert abs(got[0] - 0.2) < 0.01, got  # (was 0.0: every projection zero, "at 8000% sparsity")
    assert "projections at 80% sparsity" in capsys.readouterr().out
    for text in ("100", "-5", "1", "250"):  # (a bare 1 is the fraction 1; 2 would be 2 %)
        err = _refused(capsys, bc.main, ["--quick", "--sparsity", text, "--out", str(tmp_path / "b")])
        assert "argument --sparsity: sparsity must be in [0, 1) as a fraction or [0, 100) as a percentage" in err
    assert not (tmp_path / "b").exists()


# ---- 4. bench_checkpoint --quick with --model / --shard: refused, not replaced; without --quick they count -------
def test_bench_checkpoint_quick_refuses_model_and_shard(tmp_path, capsys, monkeypatch):
    bc = _load("bench_checkpoint")
    got = []

    def spy(cfg, path, sparsity, device, shard):
        got.append((cfg.name, cfg.num_layers, shard))
        raise Stop

    monkeypatch.setattr(bc, "write_dense_source", spy)
    for extra, drop in ((["--model", "opt-13b", "--shard", "64KiB"], "--model and --shard"),
                        (["--shard", "64KiB"], "--shard"), (["--model", "llama-3-8b"], "--model")):
        err = _refused(capsys, bc.main, ["--quick", *extra, "--out", str(tmp_path / "q")])
        assert f"--quick runs its own tiny model with 2MB shards: drop {drop}" in err, err
    assert not got and not (tmp_path / "q").exists()
    with pytest.raises(Stop):
        bc.main(["--quick", "--no-hf", "--out", str(tmp_path / "a")])
    # (no disk needed: stopped before writing)
    monkeypatch.setattr(bc.shutil, "disk_usage", lambda p: types.SimpleNamespace(free=1 << 50))
    layers = int(torch.randint(1, 4, ()))
    with pytest.raises(Stop):
        bc.main(["--model", "opt-13b", "--shard", "64KiB", "--layers", str(layers), "--device", "cpu", "--no-hf",
                 "--out", str(tmp_path / "b")])
    assert got == [("quick", 2, "2MB"), ("opt-13b", layers, "64KiB")]


# ---- 5. bench_checkpoint --workdir: a dense/ or flash/ it did not make is refused, one of its own replaced --------
def test_bench_checkpoint_workdir_keeps_what_it_did_not_make(tmp_path, capsys, monkeypatch):
    bc = _load("bench_checkpoint")
    monkeypatch.setattr(bc, "write_dense_source", lambda *a, **k: (_ for _ in ()).throw(Stop()))
    work = tmp_path / "models"
    secret = str(torch.randint(0, 1 << 30, ()).item())
    (work / "flash").mkdir(parents=True)
    (work / "flash" / "precious.txt").write_text(secret)
    argv = ["--quick", "--no-hf", "--workdir", str(work), "--out", str(tmp_path / "out")]
    assert bc.main(argv) == 2
    err = capsys.readouterr().err
    assert f"--workdir {work}: {work / 'flash'} already exists, not made by this script" in err, err
    assert (work / "flash" / "precious.txt").read_text() == secret and sorted(p.name for p in work.iterdir()) == \
        ["flash"]
    assert not (tmp_path / "out").exists()
    # a workdir the script marked (its earlier run's dense/ and flash/): replaced, as before
    fresh = tmp_path / "fresh"
    (fresh / "dense").mkdir(parents=True)  # (an empty directory: nothing to lose)
    with pytest.raises(Stop):
        bc.main(["--quick", "--no-hf", "--workdir", str(fresh), "--out", str(tmp_path / "o2")])
    assert (fresh / bc.WORKDIR_MARKER).is_file() and not (fresh / "dense").exists()
    for sub in ("dense", "flash"):  # (what the stopped run would have written)
        (fresh / sub).mkdir()
        (fresh / sub / "model.safetensors").write_bytes(b"earlier run")
    with pytest.raises(Stop):
        bc.main(["--quick", "--no-hf", "--workdir", str(fresh), "--out", str(tmp_path / "o2"), "--overwrite"])
    assert sorted(p.name for p in fresh.iterdir()) == [bc.WORKDIR_MARKER]
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert bc.main(["--quick", "--workdir", str(a_file), "--out", str(tmp_path / "o3")]) == 2
    assert f"{a_file} is not a directory" in capsys.readouterr().err and a_file.read_text() == "x"


# ---- 6. bad options: exit status 2 naming the option, before any work (not a traceback, some after the timing) ---
def test_bench_checkpoint_refuses_bad_options(tmp_path, capsys):
    bc = _load("bench_checkpoint")
    out = str(tmp_path / "out")
    for argv, says in ((["--quick", "--layers", "0"], "argument --layers: expected a positive integer, got 0"),
                       (["--model", "llama-8b"], "argument --model: invalid choice: 'llama-8b'"),
                       (["--shard", "5XB"], "--shard: max_shard_size must be a byte count"),
                       (["--quick", "--device", "cudax"], "--device 'cudax':")):
        err = _refused(capsys, bc.main, argv + ["--out", out])
        assert says in err and "Traceback" not in err, (argv, err)
    assert not Path(out).exists()
    # through flash-llm bench checkpoint: the same refusal, its status
    assert flash_llm_main(["bench", "checkpoint", "--quick", "--model", "opt-13b", "--out", out]) == 2
    assert "drop --model" in capsys.readouterr().err


def test_bench_prune_refuses_bad_options_and_reads_percent(capsys, monkeypatch):
    bp = _load("bench_prune")
    calls = []
    real = bp.sparsegpt_prune_
    monkeypatch.setattr(bp, "sparsegpt_prune_", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    small = ["--shape", "64x64", "--seqs", "2", "--seq-len", "8", "--device", "cpu"]
    for extra, says in ((["--repeat", "0"], "argument --repeat: expected a positive integer, got 0"),
                        (["--batch", "0"], "argument --batch: expected a positive integer, got 0"),
                        (["--seqs", "0"], "argument --seqs: expected a positive integer, got 0"),
                        (["--seq-len", "-3"], "argument --seq-len: expected a positive integer, got -3"),
                        (["--shape", "64"], "argument --shape: shape must be MxK"),
                        (["--shape", "0x64"], "argument --shape: shape must be MxK"),
                        (["--sparsity", "100"], "argument --sparsity: sparsity must be in [0, 1)")):
        err = _refused(capsys, bp.main, small + extra)
        assert says in err, (extra, err)
    assert not calls  # refused before the warm-up SparseGPT pass
    assert bp.main(small + ["--repeat", "1", "--sparsity", "50"]) == 0  # (was: ValueError after the calibration)
    assert calls == [0.5, 0.5]
    assert "sparsity 0.5, calibration 2 x 8" in capsys.readouterr().out


def test_cpu_generate_refuses_bad_options_before_building(capsys, monkeypatch):
    cg = _load("cpu_generate")
    built = []

    def spy(cfg, sparsity, **kw):
        built.append((cfg.hidden_size, sparsity, kw["fmt"]))
        raise Stop

    monkeypatch.setattr(cg, "build_synthetic", spy)
    small = ["--layers", "1", "--hidden", "64"]
    for extra, says in ((["--tokens", "0"], "argument --tokens: expected a positive integer, got 0"),
                        (["--layers", "0"], "argument --layers: expected a positive integer, got 0"),
                        (["--formats", "bitmap,"], "--formats: unknown ''; choose from bitmap, delta-rows, tiled-csl"),
                        (["--formats", "bitmap,csr"], "--formats: unknown 'csr'"),
                        (["--hidden", "60"], "--hidden 60: hidden_size (60) is not a multiple of num_heads (8)"),
                        (["--sparsity", "100"], "argument --sparsity: sparsity must be in [0, 1)")):
        err = _refused(capsys, cg.main, small + extra)
        assert says in err, (extra, err)
    assert not built
    pct = int(torch.randint(2, 100, ()))  # (a bare 1 reads as the fraction 1: refused, as by flash-llm)
    with contextlib.redirect_stdout(io.StringIO()) as out, pytest.raises(Stop):
        cg.main(small + ["--sparsity", str(pct), "--formats", "tiled-csl"])  # (was: ValueError in build_synthetic)
    assert len(built) == 1 and built[0][::2] == (64, "tiled-csl") and math.isclose(built[0][1], pct / 100)
    assert f"{pct}% sparse" in out.getvalue()

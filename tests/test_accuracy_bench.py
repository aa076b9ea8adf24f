"""benchmarks/accuracy.py and benchmarks/bench_prune.py in reduced CPU settings: the report holds every method
and sparsity, its numbers match independent evaluations, the target checks decide correctly, outputs are
not overwritten without --force."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import load_script

from flash_llm import bundled, data
from flash_llm.evaluate import evaluate


@pytest.fixture(scope="module")
def accuracy():
    return load_script("benchmarks/accuracy.py", "accuracy_bench")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A small byte-level Llama, random weights (structure, not quality, is under test here)."""
    train = load_script("scripts/train_bundled.py", "train_bundled_for_accuracy")
    cfg = train.model_config(hidden=64, layers=2, heads=2, ffn=128, seq_len=32)
    cfg["flash_llm"] = {"tokenizer": "bytes"}
    out = tmp_path_factory.mktemp("acc") / "tiny"
    bundled.save_model_dir(bundled.build_model(cfg, seed=0), cfg, out)
    return out


def test_accuracy_report(accuracy, tiny_model, tmp_path, capsys):
    out, js = tmp_path / "ACCURACY.md", tmp_path / "acc.json"
    argv = ["--model", str(tiny_model), "--sparsities", "50,80", "--eval-tokens", "1024", "--calib-seqs", "4",
            "--retrain-steps", "3", "--retrain-batch", "2", "--out", str(out), "--json", str(js), "--quiet",
            "--device", "cpu"]  # (compared with CPU runs below, on a GPU machine too)
    assert accuracy.main(argv) == 0
    printed = capsys.readouterr().out
    report = out.read_text()
    raw = json.loads(js.read_text())
    results = {(r["method"], r["sparsity"]): r for r in raw["results"]}
    assert set(results) == {(m, s) for m in accuracy.METHODS for s in (50, 80)}

    model = bundled.load_dir(tiny_model)
    _, val = data.split(data.load_tokens(data.corpus_path()))
    dense = evaluate(model, val, seq_len=32, max_tokens=1024, progress=False)
    assert raw["dense"]["loss"] == pytest.approx(dense.loss, rel=1e-6)
    assert f"val loss {dense.loss:.4f}" in report

    sizes = [m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    for (method, s), r in results.items():
        if method == "magnitude-global":  # exact over all pruned weights together
            assert r["reached"] == pytest.approx(round(s / 100 * sum(sizes)) / sum(sizes), abs=1e-12)
        elif method not in ("wanda", "owl-wanda", "owl-sparsegpt"):  # exact per layer (Wanda: per row)
            assert r["reached"] == pytest.approx(sum(round(s / 100 * n) for n in sizes) / sum(sizes), abs=1e-12), \
                (method, s)
        assert abs(r["reached"] - s / 100) < 0.02, (method, s)
        assert r["seconds"] > 0
    # each table row lists the method, its kind and one number per sparsity
    loss_table = report.split("### Validation loss (nats/token)")[1].split("###")[0]
    for method in accuracy.METHODS:
        kind = "one-shot" if method in accuracy.ONE_SHOT else "retrained"
        row = f"| {method} | {kind} | {results[method, 50]['loss']:.4f} | {results[method, 80]['loss']:.4f} |"
        assert row in loss_table, row
    assert "### Targets" in report and "### Pruning time (s)" in report
    assert re.search(r"^(PASS|FAIL): sparsegpt at 50 %", printed, flags=re.M)

    with pytest.raises(SystemExit):
        accuracy.parse_args(argv)  # outputs exist, no --force
    assert "exists; pass --force" in capsys.readouterr().err


def test_one_shot_matches_the_library(accuracy, tiny_model, tmp_path):
    """The sparsegpt row is flash_llm.prune.sparsegpt_prune_ with the documented calibration, evaluated."""
    from flash_llm.prune import sparsegpt_prune_

    out, js = tmp_path / "A.md", tmp_path / "a.json"
    assert accuracy.main(["--model", str(tiny_model), "--sparsities", "60", "--methods", "sparsegpt", "--eval-tokens",
                          "512", "--calib-seqs", "3", "--seed", "2", "--out", str(out), "--json", str(js),
                          "--quiet", "--device", "cpu"]) == 0  # (compared with the library on the CPU)
    (r,) = json.loads(js.read_text())["results"]
    model = bundled.load_dir(tiny_model)
    train, val = data.split(data.load_tokens(data.corpus_path()))
    calib = data.calibration_batches(train, 3, 32, seed=2, batch_size=32)
    sparsegpt_prune_(model, calib, 0.6, filter_fn=lambda m, fqn: fqn != "lm_head")
    assert r["loss"] == pytest.approx(evaluate(model, val, seq_len=32, max_tokens=512, progress=False).loss,
                                      rel=1e-6)


def test_check_targets(accuracy):
    rows = [("magnitude", 50, 1.70), ("wanda", 50, 1.55), ("sparsegpt", 50, 1.56),
            ("magnitude", 80, 3.00), ("sparsegpt", 80, 2.20), ("gradual", 80, 1.90), ("sparsegpt-ft", 80, 2.00)]
    results = [{"method": m, "sparsity": s, "loss": v} for m, s, v in rows]
    checks = accuracy.check_targets(results, 1.50)
    text = {t.split(":")[0]: ok for ok, t in checks}
    assert text["sparsegpt at 50 %"] is True  # +4.0 %
    assert text["wanda at 50 %"] is True  # +3.3 %
    assert text["sparsegpt beats magnitude at 50 %"] and text["wanda beats magnitude at 50 %"]
    (ok_beat, beat), (ok_rec, rec) = [c for c in checks if "at 80 %" in c[1]]
    assert ok_beat and "gradual, 1.9000" in beat and "best: sparsegpt, 2.2000" in beat
    assert ok_rec and "recovers 73.3 %" in rec  # (3.0 - 1.9) / (3.0 - 1.5)
    results[5]["loss"] = 2.10  # gradual now recovers 60 %; sparsegpt-ft (2.00) is the best retrained: 66.7 %
    (_, _), (ok_rec, rec) = [c for c in accuracy.check_targets(results, 1.50) if "at 80 %" in c[1]]
    assert not ok_rec and "sparsegpt-ft recovers 66.7 %" in rec
    results[2]["loss"] = 1.58  # +5.33 %
    assert not dict((t.split(":")[0], ok) for ok, t in accuracy.check_targets(results, 1.50))["sparsegpt at 50 %"]


def test_bench_prune_small(capsys):
    bench = load_script("benchmarks/bench_prune.py", "bench_prune_small")
    assert bench.main(["--shape", "128x192", "--seqs", "3", "--seq-len", "16", "--batch", "2", "--repeat", "2",
                       "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "SparseGPT on an nn.Linear 128x192 float16, sparsity 0.5, calibration 3 x 16 = 48 tokens" in out
    assert re.search(r"whole call: median [\d.]+ s over 2 runs", out)
    assert re.search(r"solve alone \(given the Hessian\): median [\d.]+ s", out)
    assert "NO TARGET" in out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bench_prune_gpu_small(capsys):
    bench = load_script("benchmarks/bench_prune.py", "bench_prune_gpu")
    assert bench.main(["--shape", "1024x1024", "--seqs", "8", "--seq-len", "256", "--repeat", "2"]) == 0
    assert "whole call: median" in capsys.readouterr().out

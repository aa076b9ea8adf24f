"""What the documentation promises, checked on the CPU (bug hunt 73): the submodules its snippets call are
attributes of ``flash_llm`` after a plain ``import flash_llm`` (loaded lazily), the checkpoint and kernel benchmarks
keep earlier results unless ``--overwrite``, and ``flash-llm prune`` / ``demo`` refuse a ``--seq-len`` longer than
the model's context (prune records the one it used)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_script

import flash_llm
from flash_llm import data
from flash_llm.cli import main

ROOT = Path(__file__).resolve().parent.parent
LAZY = ("bundled", "data", "demo", "engine", "evaluate", "models", "parallel", "prune")
# `flash_llm.<submodule>...` as the docs write it, but not in `from ... import` / `import ...` lines
_PATH = re.compile(r"(?<!from )(?<!import )\bflash_llm\.(?:" + "|".join(LAZY) + r")(?:\.[A-Za-z_]\w*)*")


def _documented_paths() -> dict[str, list[str]]:
    found: dict[str, set[str]] = {name: {f"flash_llm.{name}"} for name in LAZY}
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for m in _PATH.finditer(doc.read_text()):
            found[m.group().split(".")[1]].add(m.group().rstrip("."))
    return {name: sorted(paths) for name, paths in found.items()}


DOCUMENTED = _documented_paths()


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


# ---- 1. the documented snippets' attribute paths, after a plain `import flash_llm` ------------------------------
def test_the_report_s_paths_are_among_the_documented_ones():
    """(The scan of the docs finds what the hunt ran, so the test below checks them.)"""
    for path in ("flash_llm.bundled.load", "flash_llm.data.encode", "flash_llm.evaluate.evaluate",
                 "flash_llm.engine.expand_sparse_", "flash_llm.engine.Engine", "flash_llm.models.preset",
                 "flash_llm.demo.not_lm_head", "flash_llm.prune.magnitude_prune_"):
        assert path in DOCUMENTED[path.split(".")[1]], path


_CHECK = """
import sys
import flash_llm
name, paths = sys.argv[1], sys.argv[2:]
early = [m for m in ("transformers", "flash_llm.engine", "flash_llm.models", "flash_llm.demo") if m in sys.modules]
assert not early, f"import flash_llm imported {early}"
assert name == "prune" or name not in vars(flash_llm), f"flash_llm.{name} was imported eagerly"
for path in paths:
    obj = flash_llm
    for part in path.split(".")[1:]:
        obj = getattr(obj, part)
print("resolved", len(paths))
"""


@pytest.mark.parametrize("name", LAZY)
def test_documented_attribute_paths_resolve_in_a_fresh_process(name):
    paths = DOCUMENTED[name]
    proc = subprocess.run([sys.executable, "-c", _CHECK, name, *paths], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"resolved {len(paths)}" in proc.stdout


def test_unknown_attribute_still_raises_naming_it():
    with pytest.raises(AttributeError, match="module 'flash_llm' has no attribute 'no_such_submodule'"):
        flash_llm.no_such_submodule  # noqa: B018
    assert not hasattr(flash_llm, "synthetic")  # (flash_llm.models.synthetic is not a top-level name)
    assert set(LAZY) <= set(dir(flash_llm)) and "from_pretrained" in dir(flash_llm)


def test_model_config_preset_is_the_module_function():
    """docs/engine.md names ``flash_llm.models.preset``; ``ModelConfig`` has no such method."""
    text = (ROOT / "docs" / "engine.md").read_text()
    assert "flash_llm.models.preset(name)" in text and "  - `preset(name)`" not in text
    assert flash_llm.models.preset("llama-3-8b").name == "llama-3-8b"
    assert not hasattr(flash_llm.models.ModelConfig, "preset")


# ---- 3. the benchmarks keep earlier results in --out unless --overwrite -----------------------------------------
def _bench(name):
    return load_script(f"benchmarks/{name}.py", f"{name}_docs_edge")


def test_bench_checkpoint_refuses_an_out_with_results(tmp_path, capsys):
    bench = _bench("bench_checkpoint")
    (tmp_path / "results.json").write_text('{"precious": 1}')
    argv = ["--quick", "--no-hf", "--no-cpu-load", "--out", str(tmp_path)]
    assert bench.main(argv) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path} already holds results.json; pass --overwrite or another --out" in err, err
    assert json.loads((tmp_path / "results.json").read_text()) == {"precious": 1}
    assert bench.main(argv + ["--overwrite"]) == 0  # a smoke run on the CPU
    result = json.loads((tmp_path / "results.json").read_text())
    assert "precious" not in result and result["model"] == "quick" and result["rows"]


def test_bench_spmm_refuses_an_out_with_results(tmp_path, capsys, monkeypatch):
    bench = _bench("bench_spmm")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # (the check comes before any CUDA work)
    (tmp_path / "speedup.png").write_bytes(b"earlier")
    assert bench.main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path} already holds speedup.png; pass --overwrite or another --out" in err, err
    class Past(Exception):
        pass

    monkeypatch.setattr(bench.T, "kernels_missing", lambda device=None: (_ for _ in ()).throw(Past()))
    with pytest.raises(Past):  # --overwrite gets past the check, to the next one (the kernels)
        bench.main(["--out", str(tmp_path), "--overwrite"])
    assert (tmp_path / "speedup.png").read_bytes() == b"earlier"


# ---- 4. --seq-len above the model's context: refused; prune records what it used ---------------------------------
@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    f = tmp_path_factory.mktemp("calib") / "calib.txt"
    f.write_bytes(data.load_tokens(data.corpus_path())[:4000].numpy().tobytes())
    return f


def test_prune_refuses_a_seq_len_above_the_context(tmp_path, capsys, calib):
    out = tmp_path / "out"
    rc, stdout, err = run(capsys, "prune", "tiny-shakespeare", "--method", "magnitude", "--sparsity", "0.5",
                          "--calib", calib, "--verbose", "--out", out, "--seq-len", 257, "--device", "cpu")
    assert rc == 2 and stdout == ""
    assert "error: --seq-len 257 exceeds the context of tiny-shakespeare (256 tokens)" in err, err
    assert not out.exists()


def test_demo_refuses_a_seq_len_above_the_context(capsys):
    rc, stdout, err = run(capsys, "demo", "--seq-len", 4096, "--eval-tokens", 64, "--calib-seqs", 1,
                          "--gen-tokens", 0, "--device", "cpu")
    assert rc == 2 and stdout == ""
    assert "error: --seq-len 4096 exceeds the context of tiny-shakespeare (256 tokens)" in err, err


def test_prune_records_seq_len_and_calib_seqs(tmp_path, capsys, calib):
    out = tmp_path / "out"
    rc, _, err = run(capsys, "prune", "tiny-shakespeare", "--method", "magnitude", "--sparsity", "0.5", "--calib",
                     calib, "--out", out, "--calib-seqs", 3, "--device", "cpu", "--verbose")  # (magnitude calibrates
    # only for --verbose's error report)
    assert rc == 0, err
    record = json.loads((out / "config.json").read_text())["flash_llm"]["pruning"]
    assert record["seq_len"] == 256 and record["calib_seqs"] == 3  # the default: the model's context
    out = tmp_path / "gradual"
    rc, _, err = run(capsys, "prune", "tiny-shakespeare", "--method", "gradual", "--sparsity", "0.5", "--calib",
                     calib, "--out", out, "--seq-len", 16, "--steps", 2, "--batch-size", 2, "--device", "cpu")
    assert rc == 0, err
    record = json.loads((out / "config.json").read_text())["flash_llm"]["pruning"]
    assert record["seq_len"] == 16 and (record["steps"], record["batch_size"], record["lr"]) == (2, 2, 5e-4)
    assert "calib_seqs" not in record  # gradual draws fine-tuning batches, not calibration sequences


# ---- 5. docs/pruning.md: the demo's dtype -----------------------------------------------------------------------
def test_pruning_doc_gives_the_demo_s_dtype_per_device():
    from flash_llm.demo import default_dtype

    assert default_dtype(torch.device("cuda"), None) == "float16"
    assert default_dtype(torch.device("cpu"), None) == "bfloat16"
    assert default_dtype(torch.device("cpu"), "/some/checkpoint") == "float16"
    text = " ".join((ROOT / "docs" / "pruning.md").read_text().split())
    assert "load the bundled model in fp16 on a GPU, bf16 on a CPU" in text
    assert "checkpoint loads in fp16 everywhere" in text

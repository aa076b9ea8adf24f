"""``flash-llm convert / inspect / generate / bench`` end to end on tiny Llama and OPT checkpoints (CPU)."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest
import torch

import flash_llm
from flash_llm import SparseLinear
from flash_llm.cli import main
from flash_llm.engine import Engine

from _ckpt import hf_model, save_hf

transformers = pytest.importorskip("transformers")

ROW = re.compile(r"^(?P<name>\S+)\s+(?P<format>dense|BitmapTiles|TiledCSL|sparse-bitmask)\s+(?P<shape>[\dx]+)\s+"
                 r"(?P<dtype>\w+)\s+(?P<nnz>[\d,]+)\s+(?P<density>[\d.]+)\s+(?P<bytes>[\d,]+)$")


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def inspect_rows(out: str) -> dict[str, dict]:
    return {m["name"]: m.groupdict() for m in map(ROW.match, out.splitlines()) if m}


@pytest.fixture(scope="module", params=["llama", "opt"])
def dense(request, tmp_path_factory):
    """A byte-level (vocabulary 256) pruned model saved by transformers, declaring the byte tokenizer as the
    bundled model does."""
    family = request.param
    model = hf_model(family, vocab=256)
    path = save_hf(model, tmp_path_factory.mktemp(f"cli-{family}") / "dense")
    config = json.loads((path / "config.json").read_text())
    config["flash_llm"] = {"tokenizer": "bytes (token id = byte value, vocabulary 256)"}
    (path / "config.json").write_text(json.dumps(config))
    return family, model, path


def test_convert_inspect_generate(dense, tmp_path, capsys):
    family, model, path = dense
    out = tmp_path / "flash"
    rc, stdout, err = run(capsys, "convert", path, out, "--min-sparsity", "50%", "--max-shard-size", "16KB")
    assert rc == 0, err
    n_sparse = sum(isinstance(m, torch.nn.Linear) for m in model.modules()) - 2  # lm_head, the 10 % layer
    assert f"converted {n_sparse} layer(s):" in stdout
    assert re.search(rf"wrote {re.escape(str(out))} \(flash-llm \(bitmap\) checkpoint\): [\d,]+ bytes on disk", stdout)
    assert (out / "model.safetensors.index.json").exists()

    rc, stdout, err = run(capsys, "inspect", out)
    assert rc == 0, err
    rows = inspect_rows(stdout)
    sparse = {n for n, r in rows.items() if r["format"] == "BitmapTiles"}
    assert len(sparse) == n_sparse
    state = model.state_dict()
    for name, r in rows.items():
        if name == "total":
            continue
        t = state[name]
        assert r["shape"] == "x".join(map(str, t.shape)) and int(r["nnz"].replace(",", "")) == int(t.count_nonzero())
    assert re.search(rf"^total\s+{n_sparse} sparse\s", stdout, re.M)

    prompt = "ABBA"
    rc, stdout, err = run(capsys, "generate", out, "--prompt", prompt, "--max-new-tokens", 12, "--device", "cpu",
                          "--ignore-eos")
    assert rc == 0, err
    assert "12 new tokens; time to first token" in err
    # (counted as inspect counts them: the checkpoint's layers, and the engine's merged ones after them)
    assert re.search(rf"\(on the CPU: {n_sparse} compressed layer\(s\) expanded to dense for decoding; [1-9]\d* after "
                     r"merging the projections that share an input\)", err)
    loaded = flash_llm.from_pretrained(out)
    want = Engine(loaded, max_seq=len(prompt) + 12).generate([list(prompt.encode())], 12, eos_token_id=None)
    assert stdout == prompt + bytes(want.sequences()[0]).decode("utf-8", errors="replace") + "\n"


def test_convert_formats_and_inspect_other_kinds(dense, tmp_path, capsys):
    _, model, path = dense
    rc, stdout, _ = run(capsys, "inspect", path)
    assert rc == 0 and all(r["format"] == "dense" for r in inspect_rows(stdout).values() if r["name"] != "total")
    assert stdout.startswith(f"{path}: dense checkpoint")
    rc, _, err = run(capsys, "convert", path, tmp_path / "bm", "--format", "sparse-bitmask")
    assert rc == 0, err
    rc, stdout, _ = run(capsys, "inspect", tmp_path / "bm")
    rows = inspect_rows(stdout)
    bm = [n for n, r in rows.items() if r["format"] == "sparse-bitmask"]
    assert len(bm) == sum(isinstance(m, torch.nn.Linear) for m in model.modules()) - 1  # all but lm_head
    rc, _, err = run(capsys, "convert", tmp_path / "bm", tmp_path / "csl", "--format", "tiled-csl")
    assert rc == 0, err
    m = flash_llm.from_pretrained(tmp_path / "csl")
    assert {x.weight_format for x in m.modules() if isinstance(x, SparseLinear)} == {flash_llm.TiledCSL}


def test_cli_errors(dense, tmp_path, capsys):
    _, _, path = dense
    out = tmp_path / "out"
    out.mkdir()
    rc, _, err = run(capsys, "convert", path, out)
    assert rc == 2 and f"error: {out} already exists; pass --overwrite to replace it" in err
    rc, _, err = run(capsys, "convert", tmp_path / "missing", tmp_path / "x")
    assert rc == 2 and "no such checkpoint directory" in err and not (tmp_path / "x").exists()
    # (a bare 1.5 reads 1.5 %, as --sparsity does: 150 is past 100 %)
    rc, _, err = run(capsys, "convert", path, tmp_path / "y", "--min-sparsity", "150")
    assert rc == 2 and "sparsity must be between 0 and 1" in err
    rc, _, err = run(capsys, "inspect", tmp_path / "missing-dir-or-file")
    assert rc == 2
    config = json.loads((path / "config.json").read_text())
    other = tmp_path / "no-tokenizer"
    save_hf(hf_model("llama", vocab=97), other)
    rc, _, err = run(capsys, "generate", other, "--prompt", "hi", "--device", "cpu")
    assert rc == 2 and "has no tokenizer files" in err and "--tokenizer bytes" in err
    rc, _, err = run(capsys, "generate", other, "--prompt", "hi", "--device", "cpu", "--tokenizer", "bytes")
    assert rc == 2 and "token id 104 outside the model's vocabulary (97)" in err
    assert config["flash_llm"]["tokenizer"].startswith("bytes")


def test_bench_dispatches_to_the_scripts(tmp_path, capsys):
    rc, out, _ = run(capsys, "bench", "kernel", "--help")
    assert rc == 0 and "Sparse matmul against dense cuBLAS" in out
    rc, out, err = run(capsys, "bench", "checkpoint", "--quick", "--no-hf", "--out", tmp_path)
    assert rc == 0, err
    result = json.loads((tmp_path / "results.json").read_text())
    steps = {r["step"]: r for r in result["rows"]}
    assert result["convert"]["converted"] == 14 and result["convert"]["output_bytes"] < result["convert"]["input_bytes"]
    assert all(r["seconds"] > 0 for r in steps.values())
    assert "flash_llm.from_pretrained on cpu (warm)" in steps
    assert (tmp_path / "results.csv").read_text().startswith("step,seconds,bytes")
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "checkpoint_times.png").stat().st_size > 1000


def test_bench_refuses_what_it_cannot_run(tmp_path, capsys, monkeypatch):
    """``bench kernel`` without CUDA, and ``bench checkpoint`` where its checkpoints would not fit the disk, stop with
    a usage error before any work (session 71: an AssertionError from torch.cuda; gigabytes written first)."""
    import shutil as sh
    from collections import namedtuple

    if not torch.cuda.is_available():
        rc, _, err = run(capsys, "bench", "kernel", "--out", tmp_path / "k")
        assert rc == 2 and "no CUDA device" in err
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(sh, "disk_usage", lambda p: usage(10**9, 10**9 - 10**6, 10**6))
    work = tmp_path / "work"
    rc, _, err = run(capsys, "bench", "checkpoint", "--model", "llama-3-8b", "--workdir", work, "--out", tmp_path / "c")
    assert rc == 2 and "needs about 32.1 GB" in err and "0.0 GB are free" in err and "--workdir elsewhere" in err
    assert not work.exists()


def test_bundled_model(tmp_path, capsys):
    from flash_llm import bundled
    from flash_llm.prune import magnitude_prune_

    model = flash_llm.from_pretrained(bundled.path("tiny-shakespeare"), dtype=torch.float16, sparsify=False)
    magnitude_prune_(model, 0.6, filter_fn=lambda m, n: n != "lm_head")
    flash_llm.save_pretrained(model, tmp_path / "pruned")  # dense weights with zeros
    rc, _, err = run(capsys, "convert", tmp_path / "pruned", tmp_path / "flash")
    assert rc == 0, err
    rc, out, err = run(capsys, "inspect", tmp_path / "flash")
    assert rc == 0 and "BitmapTiles" in out, err
    rc, out, err = run(capsys, "generate", tmp_path / "flash", "--prompt", "ROMEO:", "--max-new-tokens", 16,
                       "--device", "cpu", "--ignore-eos")
    assert rc == 0 and out.startswith("ROMEO:") and "16 new tokens" in err, err


def test_generate_tensor_parallel_prints_what_one_process_does(tmp_path, capsys):
    """`flash-llm generate --tp` under torchrun (2 gloo ranks on the CPU) on a pruned, converted bundled model:
    rank 0 prints the single-process text; without torchrun --tp is a one-rank group; bad input exits 2."""
    import os
    import subprocess
    import sys

    from flash_llm import bundled
    from flash_llm.prune import magnitude_prune_

    model = flash_llm.from_pretrained(bundled.path("tiny-shakespeare"), dtype=torch.float16, sparsify=False)
    magnitude_prune_(model, 0.6, filter_fn=lambda m, n: n != "lm_head")
    flash_llm.save_pretrained(model, tmp_path / "pruned")
    assert run(capsys, "convert", tmp_path / "pruned", tmp_path / "flash")[0] == 0
    gen = ["generate", str(tmp_path / "flash"), "--prompt", "ROMEO:", "--max-new-tokens", "20", "--ignore-eos"]
    gen += ["--device", "cpu"]  # (gloo ranks on the CPU, on a GPU machine too: the text is the CPU's)
    rc, one, err = run(capsys, *gen)
    assert rc == 0, err
    rc, solo, err = run(capsys, *gen, "--tp")  # no torchrun: a group of one, the same code path
    assert rc == 0 and solo == one and "on 1 tensor-parallel ranks" in err, err
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "flash_llm.cli", *gen, "--tp"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout == one  # rank 0's text once, nothing from rank 1
    assert "20 new tokens" in proc.stderr and "on 2 tensor-parallel ranks" in proc.stderr
    rc, _, err = run(capsys, "generate", str(tmp_path / "nope"), "--prompt", "x", "--tp")
    assert rc == 2 and "nope" in err
    assert not torch.distributed.is_initialized()


def test_generate_says_what_the_engine_laid_out(dense, tmp_path, capsys, monkeypatch):
    """generate names the layers the engine took over (Engine.adopted, a GPU's formats="auto"), by their format; here
    the engine is wrapped to report some, since on this CPU it expands them instead."""
    from flash_llm import engine as E

    _, _, path = dense
    out = tmp_path / "flash"
    assert run(capsys, "convert", path, out, "--min-sparsity", "50%")[0] == 0

    class Reporting(E.Engine):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.adopted = {"x": "bitmap", "y": "bitmap", "z": "tiled-csl"}

    monkeypatch.setattr(E, "Engine", Reporting)
    rc, _, err = run(capsys, "generate", out, "--prompt", "AB", "--max-new-tokens", 2, "--device", "cpu")
    assert rc == 0, err
    assert "(laid out for decoding: 2 bitmap, 1 tiled-csl layer(s) as DeltaRows, the fastest format at batch 1)" in err


@pytest.mark.parametrize("argv, match", [
    (["--max-new-tokens", "0"], r"argument --max-new-tokens: expected a positive integer, got 0"),
    (["--max-new-tokens", "-5"], r"argument --max-new-tokens: expected a positive integer, got -5"),
    (["--temperature", "1", "--top-p", "2"], r"argument --top-p: expected a probability in \(0, 1\], got '2'"),
    (["--temperature", "1", "--top-p", "0"], r"argument --top-p: expected a probability in \(0, 1\], got '0'"),
    (["--temperature", "1", "--top-k", "0"], r"argument --top-k: expected a positive integer, got 0"),
    (["--temperature", "1", "--top-k", "-3"], r"argument --top-k: expected a positive integer, got -3"),
    (["--temperature", "-1"], r"argument --temperature: expected a finite number >= 0, got '-1'"),
    (["--temperature", "nan"], r"argument --temperature: expected a finite number >= 0, got 'nan'"),
    (["--device", "meta"], r"argument --device: --device must be auto, cpu, cuda or cuda:N, got 'meta'"),
    (["--device", "mps"], r"argument --device: --device must be auto, cpu, cuda or cuda:N, got 'mps'"),
    (["--tokenizer", "/nonexistent/dir"], r"error: --tokenizer /nonexistent/dir: no such directory"),
])
def test_generate_bad_arguments_exit_2(capsys, argv, match):
    """Bad numbers and devices are usage errors before anything is loaded; a missing tokenizer directory too."""
    from flash_llm import bundled

    argv = ["--device", "cpu", *argv] if "--device" not in argv else argv
    rc, out, err = run(capsys, "generate", bundled.path("tiny-shakespeare"), "--prompt", "ROMEO:", *argv)
    assert rc == 2 and re.search(match, err), err
    assert out == "" and "Traceback" not in err


@pytest.mark.parametrize("device", ["meta", "mps"])
def test_convert_bad_device_exits_2(capsys, tmp_path, device):
    from flash_llm import bundled

    rc, _, err = run(capsys, "convert", bundled.path("tiny-shakespeare"), tmp_path / "out", "--device", device)
    assert rc == 2 and f"argument --device: --device must be auto, cpu, cuda or cuda:N, got '{device}'" in err, err
    assert not (tmp_path / "out").exists()

"""``benchmarks/fuzz_spmm.py``'s harness on the CPU: its drawn cases run and agree with the CPU reference path, a
refusal that names its argument counts as one, and a wrong op or an unrelated exception is reported as a failure (so
the harness can fail); switches come back after each case; the command line runs, replays and writes its files."""

import json
import os

import pytest
import torch
from conftest import load_script

CPU = torch.device("cpu")
SMALL = 1 << 14  # --max-elems of these tests: every case a few ms to a few tens of ms


@pytest.fixture(scope="module")
def fuzz():
    return load_script("benchmarks/fuzz_spmm.py", "fuzz_spmm")


def _run(fuzz, seed, **fixed):
    c = fuzz.draw_case(seed, SMALL, **fixed)
    return c, fuzz.run_case(c, CPU)


@pytest.mark.parametrize("seed", range(12))
def test_drawn_cases_pass_on_the_cpu(fuzz, seed):
    c, res = _run(fuzz, seed)
    assert res["status"] in ("ok", "refused"), f"{fuzz.describe(c)}: {res['message']}"


@pytest.mark.parametrize("op", ["spmm", "linear", "silu_mul", "rms_norm", "layer_norm", "add_"])
@pytest.mark.parametrize("fmt", ["BitmapTiles", "TiledCSL", "DeltaRows"])
def test_every_format_and_op_runs(fuzz, fmt, op):
    statuses = []
    for seed in range(3):
        c, res = _run(fuzz, seed, format=fmt, op=op)
        assert res["status"] in ("ok", "refused"), f"{fuzz.describe(c)}: {res['message']}"
        statuses.append(res["status"])
    assert "ok" in statuses


def test_a_case_is_a_function_of_its_seed(fuzz):
    a, b = fuzz.draw_case(12345, SMALL), fuzz.draw_case(12345, SMALL)
    assert a == b and json.loads(json.dumps(a)) == a
    assert fuzz.draw_case(12346, SMALL) != a


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("fmt", ["BitmapTiles", "TiledCSL", "DeltaRows"])
def test_a_wrong_op_is_reported(fuzz, monkeypatch, fmt, dtype):
    """``spmm`` off by 1e-2 on an all-zero weight (the reference is 0: no tolerance to hide it)."""
    real = fuzz.OPS["spmm"]
    monkeypatch.setitem(fuzz.OPS, "spmm", lambda a: real(a) + 1e-2)
    c, res = _run(fuzz, 7, format=fmt, op="spmm", dtype=dtype, density=0.0, pattern="uniform", bias=False)
    assert res["status"] == "fail" and "out of tolerance" in res["message"], res


def test_an_unrelated_exception_is_a_failure(fuzz, monkeypatch):
    def boom(a):
        raise RuntimeError("boom")

    monkeypatch.setitem(fuzz.OPS, "spmm", boom)
    _, res = _run(fuzz, 3, op="spmm", format="TiledCSL")
    assert res["status"] == "fail" and "RuntimeError at op: boom" in res["message"]


def test_a_refusal_naming_its_argument_is_refused(fuzz):
    _, res = _run(fuzz, 5, format="DeltaRows", op="spmm", dr_layout="parts", parts=4, m=64, k=100, build="from_dense")
    assert res["status"] == "refused" and "parts=4" in res["message"]
    _, res = _run(fuzz, 5, format="BitmapTiles", op="silu_mul", m=33, k=40)
    assert res["status"] == "refused" and "even" in res["message"]


def test_a_refusal_without_its_reason_is_a_failure(fuzz, monkeypatch):
    def bare(a):
        raise ValueError("")

    monkeypatch.setitem(fuzz.OPS, "silu_mul", bare)
    _, res = _run(fuzz, 5, format="BitmapTiles", op="silu_mul", m=33, k=40)
    assert res["status"] == "fail"


def test_switches_are_restored(fuzz, monkeypatch):
    kernels = fuzz.kernels
    monkeypatch.delenv("FLASH_LLM_WGMMA", raising=False)
    before = (kernels.NT_ATOMIC, dict(kernels.SPLIT_OVERRIDES), kernels.DELTA_MULTI_MAX)
    c, res = _run(fuzz, 9, switches={"NT_ATOMIC": 2, "SPLITS": 3, "DELTA_MULTI_MAX": 1, "FLASH_LLM_WGMMA": "0"})
    assert res["status"] in ("ok", "refused"), res
    assert (kernels.NT_ATOMIC, dict(kernels.SPLIT_OVERRIDES), kernels.DELTA_MULTI_MAX) == before
    assert "FLASH_LLM_WGMMA" not in os.environ


def test_the_command_line_runs_and_replays(fuzz, tmp_path, capsys):
    assert fuzz.main(["--seconds", "0.3", "--seed", "1", "--device", "cpu", "--max-elems", "4096",
                      "--out", str(tmp_path)]) == 0
    summary = (tmp_path / "summary.md").read_text()
    assert "| format | dtype | cases |" in summary and (tmp_path / "failures.jsonl").read_text() == ""
    assert fuzz.main(["--replay", "42", "--device", "cpu", "--max-elems", "4096"]) == 0
    assert "seed 42:" in capsys.readouterr().out

"""Fixes from session 87: the sparsity unit of the ``--json`` files of ttft_lengths.py, prefill_ab.py and
uneven_rows.py.

They wrote ``vars(args)`` as ``args``.  Since session 85 ``--sparsity`` is parsed to a fraction, so a new file said
``"sparsity": 0.8`` where every file recorded before (``results/2026-12-05-s63/call1/prefill_*.json``,
``results/2026-12-05-s65/call4/uneven_rows.json``) says ``80.0``, as ``bench_e2e.py``'s and ``tp_check.py``'s rows
do: one key, two units, nothing in the file to tell them apart.  The records are built by pure functions now
(``json_record``; ``ttft_lengths.json_args``), with ``args.sparsity`` in percent however ``--sparsity`` was given.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO, load_script

BENCH = REPO / "benchmarks"


def _load(name: str, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # (their neighbours: bench_e2e, ttft_lengths)
    return load_script(f"benchmarks/{name}.py", f"{name}_fixes87")


@pytest.mark.parametrize("name", ["ttft_lengths", "prefill_ab", "uneven_rows"])
@pytest.mark.parametrize("text, pct", [("0.8", 80.0), ("80", 80.0), ("80%", 80.0), ("0.875", 87.5), ("0", 0.0)])
def test_json_args_give_the_sparsity_in_percent(name, text, pct, monkeypatch):
    mod = _load(name, monkeypatch)
    args = mod.parse_args(["--sparsity", text])
    rec = mod.json_args(args)  # (prefill_ab and uneven_rows import ttft_lengths')
    assert rec["sparsity"] == pct and isinstance(rec["sparsity"], float)  # (was 0.8 / 0.875 / 0.0: a fraction)
    assert {k: v for k, v in rec.items() if k != "sparsity"} == {k: v for k, v in vars(args).items() if k != "sparsity"}
    assert args.sparsity == pytest.approx(pct / 100)  # (the options themselves stay a fraction, as parsed)


def test_recorded_files_hold_percent():
    """The unit the records go back to: what this repository's recorded files of these scripts hold."""
    for path in ("2026-12-05-s63/call1/prefill_llama.json", "2026-12-05-s65/call4/uneven_rows.json"):
        assert json.loads((BENCH / "results" / path).read_text())["args"]["sparsity"] == 80.0, path


def test_ttft_lengths_record(monkeypatch):
    mod = _load("ttft_lengths", monkeypatch)
    args = mod.parse_args(["--sparsity", "0.8", "--lengths", "4-6"])
    res = {"eager": {"ttft_ms": [1.0], "call_ms": [2.0], "replayed": 0, "tokens": [[3]], "graphs": []}}
    rec = json.loads(json.dumps(mod.json_record(args, "card", [[[1, 2, 3, 4]], [[1] * 6]], res)))
    assert rec["args"]["sparsity"] == 80.0 and rec["args"]["lengths"] == "4-6"
    assert rec["lengths"] == [4, 6] and rec["results"] == res and rec["card"] == "card"
    assert rec["torch"] == torch.__version__ and "commit" in rec


def test_prefill_ab_record(monkeypatch):
    mod = _load("prefill_ab", monkeypatch)
    args = mod.parse_args(["--sparsity", "80%"])
    rec = json.loads(json.dumps(mod.json_record(args, "card", {"base": [1.5]}, {"base": [("k", 2.0, 3)]}, None)))
    assert rec["args"]["sparsity"] == 80.0
    assert rec["ttft_ms"] == {"base": [1.5]} and rec["kernels"] == {"base": [["k", 2.0, 3]]} and rec["graph"] is None


def test_uneven_rows_record(monkeypatch):
    mod = _load("uneven_rows", monkeypatch)
    args = mod.parse_args(["--sparsity", "0.5"])
    tok = torch.tensor([[1, 2], [3, 4]])
    res = {"shrink": {"s": [0.5], "sizes": [2, 1], "tokens": tok},
           "full": {"s": [0.75], "sizes": [2, 2], "tokens": torch.tensor([[1, 2], [3, 5]])}}
    rec = json.loads(json.dumps(mod.json_record(args, "cpu", [2, 3], res)))
    assert rec["args"]["sparsity"] == 50.0  # (was 0.5)
    assert rec["card"] == "cpu" and rec["limits"] == [2, 3]
    assert rec["same_tokens"] is False and rec["rows_same"] == 1
    assert rec["results"] == {"shrink": {"s": [0.5], "sizes": [2, 1]}, "full": {"s": [0.75], "sizes": [2, 2]}}

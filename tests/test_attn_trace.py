"""benchmarks/attn_trace.py's summary of the decode attention's phase stamps (the tool itself needs a GPU and a
patched kernel)."""

import importlib.util
import os
import sys

import torch

_dir = os.path.join(os.path.dirname(__file__), "..", "benchmarks")
sys.path.insert(0, _dir)  # attn_trace imports _timing from there
_spec = importlib.util.spec_from_file_location("attn_trace", os.path.join(_dir, "attn_trace.py"))
attn_trace = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(attn_trace)


def _stamps(launches=3, blocks=4, ghz=2):
    """Block j of launch i enters at 10000 i + 10 j ns; its phases take 100 (k + 1) ns each (k = 0..5); the last block
    of each launch alone runs the combine, 700 ns; SM j."""
    t = torch.zeros(launches, blocks, 32, dtype=torch.int64)
    for i in range(launches):
        for j in range(blocks):
            at = 10000 * i + 10 * j
            for k in range(7):
                t[i, j, 2 * k], t[i, j, 2 * k + 1] = at, ghz * at
                at += 100 * (k + 1)  # (after stamp 6: unused)
            if j == blocks - 1:
                end = int(t[i, j, 12]) + 700
                t[i, j, 14], t[i, j, 15] = end, ghz * end
            t[i, j, 31] = j
    return t


def test_summary_of_synthetic_stamps():
    r = attn_trace.summarize(_stamps())
    assert r["sms"] == 4 and abs(r["ghz"] - 2) < 1e-9
    # each launch: first entry at 10000 i, last stamp 30 + 2100 + 700 later (the combine of the last block)
    assert r["spans"] == [2830] * 3 and r["gaps"] == [10000 - 2830] * 2 and r["spread"] == [30] * 3
    phases = r["phases"]
    assert list(phases) == attn_trace.PHASES
    for k, name in enumerate(attn_trace.PHASES[:-1]):
        assert phases[name] == (2 * 100 * (k + 1), 2 * 100 * (k + 1))
    assert phases["combine"] == (1400, 1400)  # only the blocks that ran it

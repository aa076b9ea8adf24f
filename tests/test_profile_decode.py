"""benchmarks/profile_decode.py's critical-path attribution (the tool itself needs a GPU)."""

import importlib.util
import os

import pytest

_path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "profile_decode.py")
_spec = importlib.util.spec_from_file_location("profile_decode", _path)
profile_decode = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(profile_decode)


def _k(start, end):
    return {"name": "k", "start": float(start), "end": float(end)}


def test_critical_times_of_a_chain_with_early_starts_and_gaps():
    """A kernel that starts early (programmatic launch) gets only the time after the one before it ends; a gap goes
    to idle; a kernel inside another's run gets nothing; the times and idle add up to the span."""
    ks = [_k(0, 10), _k(4, 15), _k(15, 18), _k(20, 30), _k(22, 25), _k(29, 40)]
    crit, idle = profile_decode.critical_times(ks)
    assert crit == [10, 5, 3, 10, 0, 10]
    assert idle == 2
    assert sum(crit) + idle == ks[-1]["end"] - ks[0]["start"]


@pytest.mark.parametrize("ks", [[], [{"name": "a", "start": 5.0, "end": 9.0}]])
def test_critical_times_of_no_or_one_kernel(ks):
    crit, idle = profile_decode.critical_times(ks)
    assert crit == [k["end"] - k["start"] for k in ks] and idle == 0

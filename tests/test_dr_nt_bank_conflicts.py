"""The wavefront counter of benchmarks/diag/dr_nt_bank_conflicts.py, on loads whose answer is known, and its walk on a
small weight."""
import numpy as np
import pytest
from conftest import load_script

from flash_llm import DeltaRows

bc = load_script("benchmarks/diag/dr_nt_bank_conflicts.py", "dr_nt_bank_conflicts")


def test_wavefronts_of_known_patterns():
    assert bc.wavefronts(np.zeros(32, dtype=np.int64)) == 4  # one chunk: a broadcast in every phase
    assert bc.wavefronts(16 * np.arange(32)) == 4  # 8 consecutive chunks a phase: 8 distinct quads
    assert bc.wavefronts(128 * np.arange(32)) == 32  # every lane in quad 0, all distinct: 8 a phase
    two = 16 * np.array([0, 8] * 16)  # two distinct chunks in quad 0 in every phase
    assert bc.wavefronts(two) == 8
    with pytest.raises(AssertionError):
        bc.wavefronts(np.arange(32))  # not 16-byte aligned


def test_walk_counts_every_entry_of_the_sampled_splits():
    w = DeltaRows.from_dense(bc.pruned(256, 1024, 0.8), splits=2, parts=1)
    mean, loads = bc.walk_wavefronts(w, blocks=2, splits=2)
    # 2 blocks of 4 slices (256 rows: 8 slices), both splits: every group of those slices, 8 loads a group
    assert loads == 8 * (w.data.numel() // 160)
    assert 4 <= mean <= 32
    with pytest.raises(ValueError, match="split-layout"):
        bc.walk_wavefronts(DeltaRows.from_dense(bc.pruned(256, 1024, 0.8), parts=4))

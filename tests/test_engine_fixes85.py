"""Session 85: an engine whose KV cache cannot fit the device's free memory is refused before it changes the model.
It checked the room only after merging, fusing and ``formats="dense"``'s expansion, and its clean-up undid the first
two only: the sparse layers were left expanded to dense ``nn.Linear`` (the memory the user was short of).  A failure
after the changes (the second check, or the allocation) still undoes the merge and fuse
(``tests/test_engine_fixes84.py``)."""

from __future__ import annotations

import warnings

import pytest
import torch

import flash_llm
import flash_llm.engine as E
from flash_llm.engine import Engine
from flash_llm.models import ModelConfig, from_config

CFG = ModelConfig(family="llama", vocab_size=97, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  intermediate_size=128, max_position_embeddings=64)


def _sparse_model():
    model = from_config(CFG, dtype=torch.bfloat16, seed=851)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.mul_(torch.rand_like(m.weight) > 0.8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        flash_llm.sparsify_(model)
    return model


@pytest.mark.parametrize("formats", ["dense", "auto"])
def test_a_cache_that_cannot_fit_is_refused_before_the_model_changes(monkeypatch, formats):
    model = _sparse_model()
    kinds = [(p, type(m).__name__, getattr(m, "fused", None)) for p, m in model.named_modules()]
    assert any(k == "SparseLinear" for _, k, _ in kinds)
    state = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    model.train()
    calls = []
    monkeypatch.setattr(E, "_cache_room", lambda device: calls.append(device) or 1)  # (1 byte free)
    with pytest.raises(ValueError, match=r"^the KV cache of max_batch=2 x max_seq=32 \(0\.00 GiB\) could not be "
                                         r"allocated on cpu: lower max_batch or max_seq \(0\.00 GiB free\)$"):
        Engine(model, max_batch=2, max_seq=32, merge=True, fuse=True, formats=formats)
    assert len(calls) == 1  # (refused at the first check)
    # nothing expanded, merged or fused, the training flags and every tensor as they were
    assert [(p, type(m).__name__, getattr(m, "fused", None)) for p, m in model.named_modules()] == kinds
    assert all(m.training for m in model.modules())
    after = model.state_dict()
    assert set(state) <= set(after) and all(torch.equal(after[k], v) for k, v in state.items())


def test_a_failing_first_query_is_the_kv_cache_error_and_changes_nothing(monkeypatch):
    model = _sparse_model()
    kinds = [(p, type(m).__name__) for p, m in model.named_modules()]

    def broken(device):
        raise RuntimeError("CUDA error: unspecified launch failure")

    monkeypatch.setattr(E, "_cache_room", broken)
    with pytest.raises(ValueError, match=r"could not be allocated on cpu: lower max_batch or max_seq \(CUDA error: "
                                         r"unspecified launch failure\)$") as e:
        Engine(model, max_batch=2, max_seq=32, merge=True, formats="dense")
    assert isinstance(e.value.__cause__, RuntimeError)
    assert [(p, type(m).__name__) for p, m in model.named_modules()] == kinds


def test_room_for_the_cache_builds_the_engine(monkeypatch):
    monkeypatch.setattr(E, "_cache_room", lambda device: 1 << 40)
    eng = Engine(_sparse_model(), max_batch=2, max_seq=32, formats="dense")
    assert eng.cache is not None and eng.expanded

"""Session 84's engine fix (CPU): an ``Engine`` whose KV cache cannot be allocated puts the model back as it was.

Its cleanup called ``unmerge_projections(model)`` whenever ``merge=True`` had reported anything (a group left alone
too), which split every merged group of the model, those merged before the engine included, and which (since session
83) refuses a merged group with hooks: the user saw that refusal instead of the out-of-memory error, and the model was
left fused.  ``_cache_room`` failing itself (a RuntimeError) raised an UnboundLocalError.  Now only the groups this
engine merged are split back (groups merged before it keep their layers and hooks), the fused switches and training
flags are restored first, and the error raised is always the KV cache's ValueError (with a note when a split failed).
The allocation is made to fail by monkeypatching ``_cache_room`` (too little room) or ``KVCache`` (torch's
out-of-memory error)."""

from __future__ import annotations

import os

import pytest
import torch

import flash_llm.engine as E
from flash_llm.engine import Engine
from flash_llm.models import ModelConfig, from_config, merge_projections
from flash_llm.models._merge import MergedLinear

CFG = ModelConfig(family="llama", vocab_size=97, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2,
                  intermediate_size=96, max_position_embeddings=64)
OOM = r"^the KV cache of max_batch=2 x max_seq=32 \(0\.00 GiB\) could not be allocated on cpu: lower max_batch or " \
      r"max_seq \("


def _seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


def _snapshot(model):
    """Everything the engine may change: the module tree (paths, types, training flags, fused switches, hooks) and
    the state_dict (keys, in order, and values)."""
    tree = [(p, type(m).__name__, m.training, getattr(m, "fused", None), len(m._forward_hooks))
            for p, m in model.named_modules()]
    return tree, [(k, v.detach().clone()) for k, v in model.state_dict().items()]


def _same(model, snap):
    tree, state = _snapshot(model)
    assert tree == snap[0]
    assert [k for k, _ in state] == [k for k, _ in snap[1]]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(state, snap[1]))


def _user_merged(seed, hook_on_merged):
    """A tiny Llama that its user merged before the engine, with layer 1's q_proj hooked at the time (so its qkv group
    was left alone; the hook removed since, so the engine merges it), optionally a hook on layer 0's merged qkv_proj;
    mixed training flags."""
    model = from_config(CFG, dtype=torch.float32, seed=seed % 2**31)
    h = model.model.layers[1].self_attn.q_proj.register_forward_hook(lambda *a: None)
    report = merge_projections(model)
    assert report["model.layers.1.self_attn.qkv_proj"] != "merged" and list(report.values()).count("merged") == 5
    h.remove()
    if hook_on_merged:
        model.model.layers[0].self_attn.qkv_proj.register_forward_hook(lambda *a: None)
    model.train()
    model.model.layers[2].eval()
    return model


def _room_after_changes(monkeypatch) -> None:
    """The free memory unknown when the engine checks it first (session 85: a cache that cannot fit then is refused
    before the model is changed), and 1 byte when it checks again after merging: the clean-up path."""
    calls = []

    def room(device):
        calls.append(device)
        return 0 if len(calls) == 1 else 1

    monkeypatch.setattr(E, "_cache_room", room)


@pytest.mark.parametrize("hook_on_merged", [True, False])
def test_a_failed_cache_splits_only_the_groups_the_engine_merged(monkeypatch, hook_on_merged):
    seed = _seed()
    model = _user_merged(seed, hook_on_merged)
    x = torch.randint(0, CFG.vocab_size, (2, 5), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        want = model(x)
    snap = _snapshot(model)
    _room_after_changes(monkeypatch)
    with pytest.raises(ValueError, match=OOM + r"0\.00 GiB free\)$"):
        # (hooked: "model.layers.0.self_attn.qkv_proj has 1 forward hook(s) that unmerging would drop" before, and
        # the model left fused; not hooked: the user's five merged groups split too)
        Engine(model, max_batch=2, max_seq=32, merge=True, fuse=True)
    _same(model, snap)
    assert isinstance(model.model.layers[0].self_attn.qkv_proj, MergedLinear), seed
    assert model.model.layers[1].self_attn.qkv_proj is None, seed  # (the group the engine merged: split back)
    with torch.no_grad():
        assert torch.equal(model(x), want), seed


def test_an_out_of_memory_allocation_undoes_the_engine_merge_and_fuse(monkeypatch):
    """The allocation itself failing (torch's OutOfMemoryError, a RuntimeError): the same clean-up, the error
    chained."""
    seed = _seed()
    model = from_config(CFG, dtype=torch.float32, seed=seed % 2**31)
    model.train()
    snap = _snapshot(model)

    def oom(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    monkeypatch.setattr(E, "KVCache", oom)
    with pytest.raises(ValueError, match=OOM + r"CUDA out of memory\. Tried to allocate 80\.00 GiB\)$") as e:
        Engine(model, max_batch=2, max_seq=32, merge=True, fuse=True)
    assert isinstance(e.value.__cause__, torch.OutOfMemoryError)
    _same(model, snap)  # (unmerged, not fused, and in train mode again: eval() was left before)


def test_a_failing_free_memory_query_is_the_kv_cache_error(monkeypatch):
    """``_cache_room`` itself raising (a CUDA error in the query): an UnboundLocalError on ``need`` before."""
    model = from_config(CFG, dtype=torch.float32, seed=_seed() % 2**31)
    snap = _snapshot(model)

    def broken(device):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(E, "_cache_room", broken)
    with pytest.raises(ValueError, match=OOM + r"CUDA error: an illegal memory access was encountered\)$"):
        Engine(model, max_batch=2, max_seq=32, merge=True, fuse=True)
    _same(model, snap)


def test_a_split_that_fails_too_is_a_note_of_the_kv_cache_error(monkeypatch):
    """Splitting the groups back needs memory itself: when it fails, the KV cache error is still the one raised, it
    says what is left merged and how to undo it, and the fused switches and training flags are back."""
    model = from_config(CFG, dtype=torch.float32, seed=_seed() % 2**31)
    model.train()
    before = [(p, m.training, getattr(m, "fused", None)) for p, m in model.named_modules()]
    _room_after_changes(monkeypatch)

    def no_room(model, only=None):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB")

    monkeypatch.setattr(E, "unmerge_projections", no_room)
    with pytest.raises(ValueError, match=OOM + r"0\.00 GiB free\); the projections merge=True stacked could not all "
                                         r"be split back \(OutOfMemoryError: CUDA out of memory\. Tried to allocate "
                                         r"2\.00 MiB\): flash_llm\.models\.unmerge_projections\(model\) splits them$"):
        Engine(model, max_batch=2, max_seq=32, merge=True, fuse=True)
    # (merged still, as the note says; paths of merged groups have no counterpart before: compare the others)
    after = {p: (t, f) for p, m in model.named_modules() for t, f in [(m.training, getattr(m, "fused", None))]}
    assert all(after[p] == (t, f) for p, t, f in before if p in after)
    assert isinstance(model.model.layers[0].self_attn.qkv_proj, MergedLinear)


def test_unmerge_only_refuses_a_path_that_is_no_merged_group():
    """Review of session 84: ``only=`` entries naming no merged group (a typo, a member layer) were ignored and nothing
    was split, without a word; a bare string was read as a set of characters."""
    from flash_llm.models import merge_projections, unmerge_projections

    model = from_config(CFG, dtype=torch.float32, seed=_seed() % 2**31)
    merged = [p for p, how in merge_projections(model).items() if how == "merged"]
    assert merged
    for bad in ("model.layers.0.self_attn.q_proj", ["model.layers.0.self_attn.qkv"]):
        with pytest.raises(ValueError, match=r"names no merged group of the model .*nothing was unmerged"):
            unmerge_projections(model, only=bad)
    assert unmerge_projections(model, only=merged[0]) == [merged[0]]  # a bare path: that group alone
    still = [p for p, m in model.named_modules() if isinstance(m, MergedLinear)]
    assert merged[0] not in still and set(merged[1:]) <= set(still)

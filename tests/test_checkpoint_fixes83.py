"""Session 83's checkpoint fixes: write_sparse_bitmask names a weight's parts as today's compressed-tensors does
(``P.compressed`` for module ``P``: its ``BaseSparseCompressor.compress`` strips ``.weight`` and its decompressor adds
it back, so the older full names read as ``P.weight.weight`` there); a module whose name ends in ``weight`` is stored
dense (its parts' names would be ambiguous)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flash_llm import SparseLinear
from flash_llm.checkpoint import load_checkpoint, write_sparse_bitmask
from flash_llm.checkpoint import sparse_bitmask as sb

from _ckpt import read_shard


class _Named(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(64, 32, dtype=torch.float16)
        self.add_module("weight", nn.Linear(32, 16, bias=False, dtype=torch.float16))  # (a module named 'weight')


def _decompress_as_today(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What today's compressed-tensors' decompressor yields: per module prefix P with the four parts, 'P.weight'."""
    prefixes = {k.rpartition(".")[0] for k in tensors if sb.split_key(k)}
    out = {k: v for k, v in tensors.items() if not (sb.split_key(k) and k.rpartition(".")[0] in prefixes)}
    for p in prefixes:
        out[f"{p}.weight"] = sb.decompress({q: tensors[f"{p}.{q}"] for q in sb.PARTS}, p)
    return out


def test_writer_uses_todays_names_and_a_module_named_weight_stays_dense(tmp_path):
    torch.manual_seed(0)
    m = _Named()
    with torch.no_grad():
        for lin in (m.up, m.weight):
            lin.weight[torch.rand_like(lin.weight, dtype=torch.float32) < 0.7] = 0
    report = write_sparse_bitmask(m, tmp_path / "sb", config={"model_type": "custom"}, progress=False)
    assert [c.fqn for c in report.converted] == ["up"]
    assert [s.fqn for s in report.skipped] == ["weight"] and "ends in 'weight'" in report.skipped[0].reason
    tensors, _ = read_shard(tmp_path / "sb" / "model.safetensors")
    assert {f"up.{p}" for p in sb.PARTS} <= tensors.keys() and not any(k.startswith("up.weight.") for k in tensors)
    # read as today's compressed-tensors reads it: every state-dict name of the model, the same values
    state = {k: v.detach() for k, v in m.state_dict().items()}
    today = _decompress_as_today(tensors)
    assert today.keys() == state.keys()
    assert all(torch.equal(today[k], state[k]) for k in state)
    # and as flash-llm reads it
    with torch.device("meta"):
        back = _Named()
    load_checkpoint(back, tmp_path / "sb", progress=False)
    assert isinstance(back.up, SparseLinear) and torch.equal(back.up.to_dense(), m.up.weight.detach())
    got = back.weight.to_dense() if isinstance(back.weight, SparseLinear) else back.weight.weight
    assert torch.equal(got, m.weight.weight.detach())


def test_a_cast_refused_names_the_weight(tmp_path):
    """The overflow refusal of a compressed weight names the state-dict key ('up.weight'), not the parts' prefix."""
    m = _Named().float()
    with torch.no_grad():
        m.up.weight.zero_()
        m.up.weight[0, 0] = 1e6
    write_sparse_bitmask(m, tmp_path / "sb", config={"model_type": "custom"}, progress=False)
    back = _Named()
    with pytest.raises(Exception, match=r"'up\.weight' cannot be cast to torch\.float16"):
        load_checkpoint(back, tmp_path / "sb", progress=False)

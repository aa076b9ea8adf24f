"""Session 84 hunt fixes (tensor parallel): ``ShardReport.of`` after ``sparsify_`` compressed the slices
``tensor_parallel_`` had kept dense still printed them as kept dense (the layer's note); ``ColumnParallelLinear`` /
``RowParallelLinear`` took any shard range (beyond the weight, negative, float) and reported it."""

from __future__ import annotations

import warnings

import pytest
import torch

import flash_llm
from flash_llm.models import ModelConfig, from_config
from flash_llm.parallel import ColumnParallelLinear, RowParallelLinear, ShardReport, tensor_parallel_
from flash_llm.prune import magnitude_prune_


def _model():
    cfg = ModelConfig(family="llama", vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=128, max_position_embeddings=64)
    m = from_config(cfg, dtype=torch.float16, seed=84)
    magnitude_prune_(m, 0.7, filter_fn=lambda mod, fqn: fqn != "lm_head")
    return m.eval()


def test_a_recomputed_report_drops_the_kept_dense_note_of_compressed_slices(world1):
    model = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = tensor_parallel_(model, world1, sparsify=flash_llm.SparsifyConfig(min_sparsity=0.95))
        assert rep.layers and all(s.note and s.format == "dense" for s in rep.layers)
        flash_llm.sparsify_(model, flash_llm.SparsifyConfig())
    again = ShardReport.of(model)
    assert again.layers and all(s.format == "BitmapTiles" and not s.note for s in again.layers)
    assert "kept dense" not in str(again)


@pytest.mark.parametrize("cls", [ColumnParallelLinear, RowParallelLinear])
def test_parallel_linears_refuse_a_shard_outside_the_weight(world1, cls):
    # a 48 x 48 weight: a [40:72] shard of 32 features matches a 32-wide local layer, but lies past the weight
    local = torch.nn.Linear(48, 32) if cls is ColumnParallelLinear else torch.nn.Linear(32, 48, bias=False)
    for start, stop in ((40, 72), (-8, 24)):
        with pytest.raises(ValueError, match=rf"shard \[start:stop\] must satisfy 0 <= start < stop <= \w+_features "
                                             rf"\(48\), got \[{start}:{stop}\]"):
            cls(local, 48, 48, start, stop, world1)
    with pytest.raises(TypeError, match="start must be an int, got float"):
        cls(local, 48, 48, 0.0, 32, world1)
    assert cls(local, 48, 48, 16, 48, world1).stop == 48

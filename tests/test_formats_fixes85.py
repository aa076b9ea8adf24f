"""Session 85's fixes of the formats (a hunt in a frozen copy): ``sparse_bitmask.compress`` decided zeros by
``!= 0``, so under ``torch.set_flush_denormal(True)`` an fp32 subnormal was written back as +0.0 (and the reported
sparsity, counted by bits, disagreed); ``from_state`` let a metadata value that is not a JSON string (the dict
``metadata()`` returns) through as json's bare TypeError and called numpy arrays "int32 ... expected a 1-D int32
tensor"; and DeltaRows took any split count, while every kernel launches the splits as its grid's y dimension (at
most 65535): such a weight encoded, saved and loaded, then failed at its first launch on a GPU."""

from __future__ import annotations

import pytest
import torch

from flash_llm.checkpoint import sparse_bitmask
from flash_llm.formats import BitmapTiles, DeltaRows, FormatError
from flash_llm.formats.delta_rows import MAX_SPLITS


def test_compress_keeps_subnormals_under_flush_denormal():
    w = torch.zeros(3, 10, dtype=torch.float32)
    w[0, 1] = 1e-40  # (an fp32 subnormal)
    w[2, 9] = -2.5
    w[1, 4] = -0.0
    before = torch.set_flush_denormal(True)
    if not before and not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        parts = sparse_bitmask.compress(w)
    finally:
        torch.set_flush_denormal(False)
    assert parts["compressed"].numel() == 2
    back = sparse_bitmask.decompress(parts)
    assert back[0, 1].view(torch.int32) == w[0, 1].view(torch.int32) and back[2, 9] == -2.5
    assert back[1, 4].view(torch.int32) == 0  # (-0.0 is a zero, stored as +0.0)


def test_from_state_refuses_metadata_that_is_not_a_json_string():
    w = BitmapTiles.from_dense(torch.eye(16, dtype=torch.float16))
    with pytest.raises(FormatError, match=r"metadata 'flash_llm' must be a JSON string \(as state\(\) returns it\), "
                                          r"got dict"):
        BitmapTiles.from_state(w.tensors(), {"flash_llm": w.metadata()})


def test_from_state_names_arrays_that_are_not_tensors():
    w = BitmapTiles.from_dense(torch.eye(16, dtype=torch.float16))
    tensors, meta = w.state()
    with pytest.raises(FormatError, match=r"tensor '(data|offsets)' is a ndarray, not a torch\.Tensor"):
        BitmapTiles.from_state({k: v.numpy() for k, v in tensors.items()}, meta)


def test_delta_rows_refuses_more_splits_than_the_kernels_launch():
    w = torch.zeros(32, 64, dtype=torch.float16)
    w[0, 3] = 1
    with pytest.raises(ValueError, match=rf"splits must be an int in \[1, {MAX_SPLITS}\].*got 70000"):
        DeltaRows.from_dense(w, splits=70000)
    assert DeltaRows.from_dense(w, splits=MAX_SPLITS).splits == MAX_SPLITS
    # a file's arrays of more splits: refused on load, values or meta
    ok = DeltaRows.from_dense(w, splits=MAX_SPLITS)
    lay_words = ok.offsets.numel()
    extra = 18  # (18 words of offsets a slice and split: 1 slice)
    tensors, meta = ok.state()
    grown = dict(tensors, offsets=torch.cat([tensors["offsets"], tensors["offsets"][-extra:]]))
    assert DeltaRows.arrays_fit(32, 64, lay_words + extra, tensors["data"].numel()) is not None
    with pytest.raises(FormatError, match=rf"65536 splits, more than the {MAX_SPLITS} the kernels take"):
        DeltaRows.from_state(grown, meta)
    with pytest.raises(FormatError, match=rf"the kernels take at most {MAX_SPLITS}"):
        DeltaRows.from_state({k: v.to("meta") for k, v in grown.items()}, meta)

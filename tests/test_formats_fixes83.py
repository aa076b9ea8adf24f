"""Session 83's format fixes: saving to a directory or into a missing directory is an OSError naming the path
(safetensors' own error named neither and was no OSError); ``w.to(x, True)`` / ``w.to(dtype, True)`` read the bool as
``non_blocking``, as ``Tensor.to`` does."""

from __future__ import annotations

import pytest
import torch

import flash_llm
from flash_llm import BitmapTiles, DeltaRows, TiledCSL


def _weight(fmt):
    g = torch.Generator().manual_seed(83)
    w = torch.randn(48, 80, generator=g) * (torch.rand(48, 80, generator=g) < 0.4)
    return fmt.from_dense(w.half())


@pytest.mark.parametrize("fmt", [BitmapTiles, TiledCSL, DeltaRows])
def test_save_to_a_directory_or_a_missing_directory_names_the_path(fmt, tmp_path):
    w = _weight(fmt)
    for save in (w.save, lambda p: flash_llm.save({"a": w}, p)):
        with pytest.raises(IsADirectoryError, match=str(tmp_path)):
            save(tmp_path)
        missing = tmp_path / "no_such_dir" / "w.safetensors"
        with pytest.raises(FileNotFoundError, match="no_such_dir"):
            save(missing)
        (tmp_path / "file").write_text("x")
        with pytest.raises(NotADirectoryError, match="file"):
            save(tmp_path / "file" / "w.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # (nothing written)
    w.save(tmp_path / "ok.safetensors")
    assert torch.equal(flash_llm.load(tmp_path / "ok.safetensors").to_dense(), w.to_dense())


@pytest.mark.parametrize("fmt", [BitmapTiles, TiledCSL, DeltaRows])
def test_to_reads_a_bool_after_a_tensor_or_dtype_as_non_blocking(fmt):
    w = _weight(fmt)
    x = torch.zeros(2, dtype=torch.float16)
    assert x.to(x, True).dtype == torch.float16  # (what Tensor.to takes)
    assert w.to(x, True) is w and w.to(torch.float16, True) is w
    with pytest.raises(TypeError, match="dtype=torch.bfloat16"):
        w.to(x.bfloat16(), True)

"""Regression tests of the formats' bug hunt (session 74)."""

import json

import pytest
import torch

from flash_llm.formats import BitmapTiles, DeltaRows, TiledCSL, load
from flash_llm.reference import FORMAT_IDS, as_format

FORMATS = [BitmapTiles, TiledCSL, DeltaRows]


def _weight(m=20, k=70, d=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, k, generator=g) * (torch.rand(m, k, generator=g) < d)).half()


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda c: c.__name__)
def test_unknown_nnz_weight_density_is_counted_and_saves_loadably(fmt, tmp_path):
    """A weight built without its count (nnz -1, as ``reference.as_format`` wraps raw arrays) reported a negative
    density (-1 / (M K)) and wrote ``"nnz": -1`` into its file, which ``load`` then refused."""
    w = _weight()
    x = fmt.from_dense(w)
    y = as_format(FORMAT_IDS[fmt], x.data, x.offsets, *w.shape, w.dtype)
    assert y.density == x.density
    assert "density=-" not in repr(y)
    y = as_format(FORMAT_IDS[fmt], x.data, x.offsets, *w.shape, w.dtype)
    y.save(tmp_path / "w.safetensors")
    z = load(tmp_path / "w.safetensors")
    assert z.nnz == x.nnz
    assert torch.equal(z.to_dense(), x.to_dense())


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda c: c.__name__)
def test_meta_weight_without_nnz_refuses_density(fmt):
    """A meta weight loaded from a state without ``nnz`` has no count to give: density raises, repr still works."""
    x = fmt.from_dense(_weight()).to("meta")
    st, md = x.state()
    meta = json.loads(md["flash_llm"])
    meta["nnz"] = None
    y = fmt.from_state(st, {"flash_llm": json.dumps(meta)})
    with pytest.raises(ValueError, match="density"):
        y.density
    assert "density=unknown" in repr(y)
    assert y.metadata()["nnz"] is None

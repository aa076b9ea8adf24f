"""Session 87 fixes in the formats (the formats / checkpoint hunt's findings 1 and 2).

1. ``arrays_fit`` of BitmapTiles and TiledCSL checked only ``len(offsets)``: a meta load (``from_state`` of arrays on
   the meta device, ``flash_llm.load`` of them, a meta state dict) took ``data`` of any length (a 20x70 BitmapTiles
   weight of 0 or 5 words, a TiledCSL one of 3) and believed its metadata's nnz, and the raw ops
   (``ops._raw_weight``: their only size check before a kernel reads ``data``) passed a BitmapTiles ``data`` shorter
   than its 32 bitmap words a strip.  Now ``data``'s length must be one some weight of that shape has (whole units,
   at least the bitmaps, at most every element nonzero), and a meta load's nnz one that length can hold; no length a
   real encoding gives (any density, shape, dtype, version) is refused.
2. ``flash_llm.load(path, device=...)`` passed ``device`` to ``SparseFormat.to``, which also takes a dtype or a
   tensor: ``load(p, torch.float16)`` returned the CPU weight.  Now a TypeError naming ``device``, before the file is
   read.
"""

import json

import pytest
import torch

import flash_llm
from flash_llm.formats import BitmapTiles, FormatError, TiledCSL
from flash_llm.reference import FORMAT_IDS

FORMATS = (BitmapTiles, TiledCSL)
SHAPES = ((1, 1), (1, 65), (15, 1), (17, 129), (31, 7), (33, 100), (64, 65), (65, 64), (97, 200), (129, 1))


def _weight(m, k, density, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(m, k, generator=g).add(0.5)  # (no zeros: density 1 is every element)
    keep = torch.rand(m, k, generator=g) < density
    return (w * keep).to(dtype)


def _meta_state(c, **meta_changes):
    tensors, md = c.state()
    if meta_changes:
        md = {k: json.dumps({**json.loads(v), **meta_changes}) for k, v in md.items()}
    return {n: t.to("meta") for n, t in tensors.items()}, md


# ---- 1. arrays_fit bounds data's length ------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", FORMATS)
def test_real_encodings_fit_and_load_on_meta(cls):
    """Every real encoding (densities 0, ~0.5 and 1, odd shapes, fp16 and bf16) fits, for every version a file may
    hold, and loads on the meta device with its nnz; at density 1 one unit more, at density 0 one unit less (where
    there is one) is refused: the bounds are exact."""
    for m, k in SHAPES:
        for dtype in (torch.float16, torch.bfloat16):
            for density in (0.0, 0.5, 1.0):
                c = cls.from_dense(_weight(m, k, density, dtype))
                n_off, n_data = c.offsets.numel(), c.data.numel()
                for version in (None, *cls.READ_VERSIONS):
                    assert cls.arrays_fit(m, k, n_off, n_data, version=version) is None, (m, k, density, version)
                arrays, md = _meta_state(c)
                w = cls.from_state(arrays, md)
                assert (w.device.type, w.shape, w.nnz, w.dtype) == ("meta", (m, k), c.nnz, dtype)
                if density == 1.0:
                    assert c.nnz == m * k
                    assert "at most" in cls.arrays_fit(m, k, n_off, n_data + 4)
                if density == 0.0 and n_data >= 4:
                    assert "at least" in cls.arrays_fit(m, k, n_off, n_data - 4)


@pytest.mark.parametrize("cls, n", [(BitmapTiles, 0), (BitmapTiles, 5), (BitmapTiles, 124), (BitmapTiles, 4 * 208),
                                    (TiledCSL, 3), (TiledCSL, 1404)])
def test_meta_load_refuses_impossible_data_length(cls, n):
    """The hunt's repro: a 20x70 weight (BitmapTiles: 4 strips, so 128 to 128 + 700 words; TiledCSL: 2 tiles, so a
    multiple of 4 up to 1400 entries) with ``data`` of ``n`` words on the meta device is refused, naming ``data``."""
    c = cls.from_dense(_weight(20, 70, 1.0, torch.float16))
    arrays, md = _meta_state(c)
    arrays["data"] = torch.empty(n, dtype=torch.int32, device="meta")
    with pytest.raises(FormatError, match=rf"on the meta device.* data has {n} "):
        cls.from_state(arrays, md)
    assert cls.arrays_fit(20, 70, c.offsets.numel(), n).startswith(f"data has {n} ")


@pytest.mark.parametrize("cls", FORMATS)
def test_meta_load_refuses_nnz_the_data_cannot_hold(cls):
    """A meta weight's nnz is its metadata's word, but only a count its ``data`` length can hold: all-zero arrays
    with nnz = M K (what the hunt's repro reported as density 1.0) and a full-density length with nnz 0 are refused;
    the true count and ``null`` load."""
    zero, full = cls.zeros(20, 70), cls.from_dense(_weight(20, 70, 1.0, torch.float16))
    for c, nnz in ((zero, 1400), (full, 0), (full, 1)):
        arrays, md = _meta_state(c, nnz=nnz)
        with pytest.raises(FormatError, match=rf"metadata says nnz={nnz}; data of \d+ \w+ holds"):
            cls.from_state(arrays, md)
    for c in (zero, full):
        assert cls.from_state(*_meta_state(c)).nnz == c.nnz
        assert cls.from_state(*_meta_state(c, nnz=None)).nnz == -1


@pytest.mark.parametrize("cls", FORMATS)
def test_raw_op_refuses_too_short_data(cls):
    """The raw op (CPU reference; a CUDA kernel would read ``data`` past its end) refuses ``data`` shorter than any
    20x70 weight's with a ValueError naming data, instead of failing inside the decoder."""
    c = cls.from_dense(_weight(20, 70, 0.5, torch.float16))
    x = torch.randn(3, 70, dtype=torch.float16)
    fmt = FORMAT_IDS[cls]
    y = torch.ops.flash_llm.spmm(x, c.data, c.offsets, fmt, 20, 70, None)
    torch.testing.assert_close(y, flash_llm.spmm(x, c))
    short = c.data[:3] if cls is TiledCSL else c.data[:64]
    with pytest.raises(ValueError, match=r"not the arrays of a 20x70 .*: data has \d+ "):
        torch.ops.flash_llm.spmm(x, short, c.offsets, fmt, 20, 70, None)


# ---- 2. load's device ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_load_refuses_a_dtype_or_tensor_as_device(tmp_path, dtype):
    p = tmp_path / "w.safetensors"
    BitmapTiles.from_dense(_weight(16, 64, 0.5, dtype)).save(p)
    for bad in (torch.float16, torch.zeros(1, dtype=dtype), True, 1.0, [0]):
        with pytest.raises(TypeError, match="device must be a str, an int or a torch.device"):
            flash_llm.load(p, device=bad)
        with pytest.raises(TypeError, match="device must be"):  # (before the file is read: a missing one says so)
            flash_llm.load(tmp_path / "missing.safetensors", bad)
    with pytest.raises(ValueError, match="device='nodevice': not a device"):
        flash_llm.load(tmp_path / "missing.safetensors", "nodevice")
    for ok in ("cpu", torch.device("cpu"), None, "meta"):
        w = flash_llm.load(p, device=ok)
        assert w.device.type == ("meta" if ok == "meta" else "cpu") and w.dtype == dtype

"""Saving and loading compressed weights; every kind of corrupt file must raise FormatError."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import flash_llm
from flash_llm import BitmapTiles, DeltaRows, FormatError, TiledCSL
from conftest import assert_bit_equal, bitmap_word_bit, fragment_lane_bit, sparse_weight

M, K = 70, 130  # not a multiple of the strip (16 x 64) or tile (64 x 64) size: there is padding


# ---------------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,density", [((M, K), 0.5), ((1, 1), 1.0), ((64, 64), 0.0), ((300, 520), 0.1)])
def test_save_load_single(tmp_path, fmt, dtype, shape, density):
    w = sparse_weight(*shape, density, dtype, seed=shape[0])
    c = fmt.from_dense(w)
    path = tmp_path / "w.safetensors"
    c.save(path)
    loaded = flash_llm.load(path)
    assert type(loaded) is fmt
    assert (loaded.shape, loaded.dtype, loaded.nnz) == (c.shape, c.dtype, c.nnz)
    assert loaded.device == torch.device("cpu")
    for name, t in c.tensors().items():
        assert torch.equal(loaded.tensors()[name], t), f"array {name} changed"
    assert_bit_equal(loaded.to_dense(), w)
    # also a str path
    assert_bit_equal(flash_llm.load(str(path)).to_dense(), w)


def test_saved_metadata_describes_the_weight(tmp_path, fmt, dtype):
    c = fmt.from_dense(sparse_weight(M, K, 0.5, dtype))
    c.save(tmp_path / "w.safetensors")
    with safe_open(tmp_path / "w.safetensors", framework="pt") as f:
        meta = json.loads(f.metadata()["flash_llm"])
        assert set(f.keys()) == {"data", "offsets"}
    assert meta == {"format": fmt.FORMAT_NAME, "version": fmt.FORMAT_VERSION,
                    "dtype": str(dtype).removeprefix("torch."), "shape": [M, K], "nnz": c.nnz}


def test_save_load_several(tmp_path):
    weights = {
        "layers.0.q_proj": BitmapTiles.from_dense(sparse_weight(M, K, 0.5, torch.float16, seed=1)),
        "layers.0.k_proj": TiledCSL.from_dense(sparse_weight(M, K, 0.5, torch.bfloat16, seed=2)),
        "layers.0.mlp.up": BitmapTiles.from_dense(sparse_weight(130, 70, 0.2, torch.bfloat16, seed=3)),
        "layers.0.mlp.down": TiledCSL.from_dense(sparse_weight(1, 300, 1.0, torch.float16, seed=4)),
        "lm_head": BitmapTiles.from_dense(sparse_weight(17, 17, 0.0, torch.float16, seed=5)),
    }
    path = tmp_path / "model.safetensors"
    flash_llm.save(weights, path)
    loaded = flash_llm.load(path)
    assert isinstance(loaded, dict) and set(loaded) == set(weights)
    for name, c in weights.items():
        got = loaded[name]
        assert type(got) is type(c), name
        assert (got.shape, got.dtype, got.nnz) == (c.shape, c.dtype, c.nnz), name
        assert_bit_equal(got.to_dense(), c.to_dense())


def test_save_load_one_named_weight_is_a_dict(tmp_path, fmt, dtype):
    c = fmt.from_dense(sparse_weight(M, K, 0.3, dtype))
    flash_llm.save({"only": c}, tmp_path / "one.safetensors")
    loaded = flash_llm.load(tmp_path / "one.safetensors")
    assert list(loaded) == ["only"]
    assert_bit_equal(loaded["only"].to_dense(), c.to_dense())


def test_save_same_weight_under_two_names(tmp_path, fmt):
    """One weight object stored under two names (e.g. shared between layers) saves and loads as two
    equal weights; its arrays are the same tensors, which safetensors' save_file refuses to write."""
    c = fmt.from_dense(sparse_weight(M, K, 0.4, torch.float16))
    flash_llm.save({"a": c, "b": c}, tmp_path / "shared.safetensors")
    loaded = flash_llm.load(tmp_path / "shared.safetensors")
    assert set(loaded) == {"a", "b"}
    for name in ("a", "b"):
        assert_bit_equal(loaded[name].to_dense(), c.to_dense())


def test_load_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        flash_llm.load(tmp_path / "nope.safetensors")


# ---------------------------------------------------------------------------------------------------
# Helpers to build corrupt files
# ---------------------------------------------------------------------------------------------------
def read_file(path):
    """All tensors (cloned, editable) and the metadata of a safetensors file."""
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k).clone() for k in f.keys()}, dict(f.metadata() or {})


def saved(tmp_path, c, name="w.safetensors"):
    path = tmp_path / name
    c.save(path)
    tensors, meta = read_file(path)
    return path, tensors, meta


def write(path, tensors, metadata):
    save_file(tensors, os.fspath(path), metadata=metadata)
    return path


def edit_meta(metadata, key="flash_llm", **changes):
    d = json.loads(metadata[key])
    d.update(changes)
    return {**metadata, key: json.dumps(d)}


def load_fails(path, match):
    with pytest.raises(FormatError, match=match) as info:
        flash_llm.load(path)
    assert os.fspath(path) in str(info.value), "the error should name the file"
    return info.value


def _weight(fmt, dtype, density=0.5, shape=(M, K)):
    return fmt.from_dense(sparse_weight(*shape, density, dtype, seed=42))


# ---------------------------------------------------------------------------------------------------
# Unreadable files
# ---------------------------------------------------------------------------------------------------
TRUNCATIONS = {  # bytes kept, from the file size
    "empty": lambda n: 0, "5-bytes": lambda n: 5, "header-length-only": lambda n: 8,
    "mid-header": lambda n: 20, "half": lambda n: n // 2, "last-100-cut": lambda n: n - 100,
    "last-byte-cut": lambda n: n - 1,
}


@pytest.mark.parametrize("cut", list(TRUNCATIONS))
def test_truncated_file(tmp_path, fmt, cut):
    path, _, _ = saved(tmp_path, _weight(fmt, torch.float16))
    raw = path.read_bytes()
    short = tmp_path / "cut.safetensors"
    short.write_bytes(raw[:TRUNCATIONS[cut](len(raw))])
    load_fails(short, "not a readable safetensors file")


@pytest.mark.parametrize("content", [b"\x00" * 64, b"not a safetensors file at all, just text",
                                     bytes(range(256)) * 4, b"\xff" * 8 + b"{}"], ids=["zeros", "text", "bytes", "huge-header"])
def test_garbage_file(tmp_path, content):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(content)
    load_fails(path, "not a readable safetensors file")


def test_safetensors_without_flash_llm_metadata(tmp_path):
    path = write(tmp_path / "plain.safetensors", {"weight": torch.zeros(4, 4)}, {"format": "pt"})
    load_fails(path, "no flash-llm metadata")


# ---------------------------------------------------------------------------------------------------
# Arrays that disagree
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("missing", ["data", "offsets"])
def test_missing_tensor(tmp_path, fmt, missing):
    path, tensors, meta = saved(tmp_path, _weight(fmt, torch.float16))
    del tensors[missing]
    load_fails(write(path, tensors, meta), f"tensor '{missing}' is missing")


def test_missing_tensor_in_multi_weight_file_names_it(tmp_path, fmt):
    path = tmp_path / "m.safetensors"
    flash_llm.save({"a": _weight(fmt, torch.float16), "b.c": _weight(fmt, torch.bfloat16)}, path)
    tensors, meta = read_file(path)
    del tensors["b.c.offsets"]
    load_fails(write(path, tensors, meta), r"tensor 'b\.c\.offsets' is missing")


@pytest.mark.parametrize("bad", ["int64", "float32", "2-D"])
def test_array_wrong_dtype_or_rank(tmp_path, fmt, bad):
    path, tensors, meta = saved(tmp_path, _weight(fmt, torch.float16))
    d = tensors["data"]
    tensors["data"] = {"int64": d.long(), "float32": d.float(), "2-D": d.view(1, -1).clone()}[bad]
    load_fails(write(path, tensors, meta), r"tensor 'data' has dtype .* expected a 1-D int32 tensor")


@pytest.mark.parametrize("change", ["drop-last", "add-one"])
def test_offsets_wrong_length(tmp_path, fmt, change):
    c = _weight(fmt, torch.float16)
    path, tensors, meta = saved(tmp_path, c)
    off = tensors["offsets"]
    tensors["offsets"] = off[:-1].clone() if change == "drop-last" else torch.cat([off, off[-1:]])
    n_records = c.offsets.numel() - 1
    if fmt is DeltaRows:  # its offsets' length depends on the split count too
        load_fails(write(path, tensors, meta), rf"tensor 'offsets' has {tensors['offsets'].numel()} entries, which "
                   r"is not .* for any split count")
        return
    load_fails(write(path, tensors, meta),
               rf"tensor 'offsets' has {tensors['offsets'].numel()} entries; a {M}x{K} matrix has {n_records} "
               rf"\w+, so {n_records + 1} are expected")


def test_offsets_not_starting_at_zero(tmp_path, fmt):
    path, tensors, meta = saved(tmp_path, _weight(fmt, torch.float16))
    tensors["offsets"] = tensors["offsets"] + 4
    load_fails(write(path, tensors, meta), r"tensor 'offsets'.*start")


@pytest.mark.parametrize("change", [-1, +1, -4, +4])
def test_data_word_removed_or_added(tmp_path, fmt, change):
    path, tensors, meta = saved(tmp_path, _weight(fmt, torch.float16))
    d = tensors["data"]
    n = d.numel()
    tensors["data"] = d[:change].clone() if change < 0 else torch.cat([d, d[:change]])
    load_fails(write(path, tensors, meta),
               rf"tensor 'data' has {n + change} (words|entries); the offsets describe {n} \(truncated or inconsistent\)")


# ---------------------------------------------------------------------------------------------------
# BitmapTiles: bitmap bits
# ---------------------------------------------------------------------------------------------------
def _i32(v: int) -> int:
    """A 32-bit pattern as the signed value an int32 tensor element holds."""
    return (v + (1 << 31)) % (1 << 32) - (1 << 31)


def _bitmap_word(tensors, strip, lane):
    return 4 * int(tensors["offsets"][strip]) + lane


def _strip_weight(dtype, nnz_first_strip):
    """A 70x130 weight whose strip 0 holds exactly ``nnz_first_strip`` nonzeros, the rest dense-ish."""
    w = sparse_weight(M, K, 0.5, dtype, seed=3)
    w[:16, :64] = 0
    idx = torch.arange(nnz_first_strip)
    w[idx // 64, idx % 64] = 1.5
    return w


@pytest.fixture(params=["whole", "bands"])
def bands(request, monkeypatch):
    """BitmapTiles' and Tiled-CSL's validation over the whole weight, or a band of one record row (a strip row, a
    tile row) at a time (``_base.BAND_ELEMENTS``)."""
    if request.param == "bands":
        from flash_llm.formats import _base

        monkeypatch.setattr(_base, "BAND_ELEMENTS", 1)


@pytest.mark.parametrize("action", ["set", "clear"])
def test_bitmap_bit_flip_changes_record_length(tmp_path, dtype, action, bands):
    # strip 0 holds 16 nonzeros (2 value units; one more bit needs 3) or 17 (3 units; one fewer needs 2)
    n = 16 if action == "set" else 17
    c = BitmapTiles.from_dense(_strip_weight(dtype, n))
    path, tensors, meta = saved(tmp_path, c)
    # strip element (r=15, c=63) is zero; (r=0, c=16) is the 17th nonzero when n == 17
    r, col = (15, 63) if action == "set" else (0, 16)
    lane, bit = fragment_lane_bit(torch.tensor(r), torch.tensor(col))
    word = _bitmap_word(tensors, 0, int(lane))
    before = int(tensors["data"][word])
    assert bool((before >> int(bit)) & 1) == (action == "clear")
    tensors["data"][word] = _i32(before ^ (1 << int(bit)))
    load_fails(write(path, tensors, meta),
               rf"tensor 'data': record 0 has {n + (1 if action == 'set' else -1)} nonzero bits, so it should "
               rf"be {8 + (3 if action == 'set' else 2)} units long, but the offsets give {8 + (2 if n == 16 else 3)}")


def test_bitmap_bit_flip_in_a_later_strip_row_names_its_record(tmp_path, dtype, bands):
    """A set bit in a strip of the last strip row (8 nonzeros, one value unit; 9 need two): the error names the
    record by its number in the whole weight, also when the records are checked a strip row at a time."""
    w = torch.zeros(M, K, dtype=dtype)
    w[64, :8] = 1.25  # strip (4, 0): record 4 * 3 = 12
    c = BitmapTiles.from_dense(w)
    path, tensors, meta = saved(tmp_path, c)
    rec = 4 * c.grid[1]
    lane, bit = fragment_lane_bit(torch.tensor(0), torch.tensor(8))  # (row 64, col 8): a zero of that strip
    word, bit = _bitmap_word(tensors, rec, int(lane)), int(bitmap_word_bit(bit))
    assert not (int(tensors["data"][word]) >> bit) & 1
    tensors["data"][word] = _i32(int(tensors["data"][word]) | (1 << bit))
    load_fails(write(path, tensors, meta),
               rf"tensor 'data': record {rec} has 9 nonzero bits, so it should be 10 units long, but the offsets "
               rf"give 9")


def test_bitmap_bit_in_padding_region(tmp_path, dtype, bands):
    """A bit moved (count unchanged) from a real element to a padding element of the last strip."""
    w = torch.zeros(M, K, dtype=dtype)
    w[M - 1, K - 1] = 2.0  # the only nonzero, in the last strip (rows 64..79, cols 128..191)
    c = BitmapTiles.from_dense(w)
    path, tensors, meta = saved(tmp_path, c)
    last = c.offsets.numel() - 2
    r0, c0 = (M - 1) % 16, (K - 1) % 64
    r1, c1 = 15, 63  # row 79, col 191: outside the 70x130 matrix
    l0, b0 = (int(v) for v in fragment_lane_bit(torch.tensor(r0), torch.tensor(c0)))
    l1, b1 = (int(v) for v in fragment_lane_bit(torch.tensor(r1), torch.tensor(c1)))
    b0, b1 = int(bitmap_word_bit(torch.tensor(b0))), int(bitmap_word_bit(torch.tensor(b1)))
    d = tensors["data"]
    w0, w1 = _bitmap_word(tensors, last, l0), _bitmap_word(tensors, last, l1)
    assert int(d[w0]) == 1 << b0 and (l0 == l1 or int(d[w1]) == 0)
    d[w0] = _i32(int(d[w0]) & ~(1 << b0))
    d[w1] = _i32(int(d[w1]) | (1 << b1))
    load_fails(write(path, tensors, meta),
               rf"tensor 'data': record {last} has nonzero bits outside the logical {M}x{K} matrix")


@pytest.mark.parametrize("zero_bits", [0x0000, 0x8000], ids=["+0.0", "-0.0"])
def test_bitmap_set_bit_with_zero_value(tmp_path, dtype, zero_bits, bands):
    """A set bit must carry a nonzero value: ``nnz`` counts set bits, and the format promises that
    -0.0 never comes back.  TiledCSL rejects stored zeros; BitmapTiles must too."""
    w = torch.zeros(M, K, dtype=dtype)
    w[0, 0] = 2.0
    c = BitmapTiles.from_dense(w)
    path, tensors, meta = saved(tmp_path, c)
    first_value = 8 * int(tensors["offsets"][0]) + 64  # in 16-bit halves
    d16 = tensors["data"].view(torch.int16)
    assert int(d16[first_value]) == int(torch.tensor(2.0, dtype=dtype).view(torch.int16))
    d16[first_value] = zero_bits - (0x10000 if zero_bits >= 0x8000 else 0)
    load_fails(write(path, tensors, meta), r"tensor 'data'.*zero")


def test_bitmap_zero_value_in_a_dense_file_and_nonzero_padding(tmp_path, dtype, bands):
    """The load check marks the halves that are values (one pass over ``data``): a stored zero in a half-full matrix
    is named by record, a nonzero in a record's padding is refused, and the two together are not taken for a good
    record."""
    c = _weight(BitmapTiles, dtype, density=0.5)
    path, tensors, meta = saved(tmp_path, c)
    off, d16 = tensors["offsets"].to(torch.int64), tensors["data"].view(torch.int16)
    assert flash_llm.load(path).nnz == c.nnz

    def values_in(r):  # set bits of record r
        return sum(bin(int(x) & 0xFFFFFFFF).count("1") for x in tensors["data"][int(off[r]) * 4:int(off[r]) * 4 + 32])

    rec = 4  # (in the second strip row: a band of its own when validated in bands)
    zeroed = d16.clone()
    zeroed[8 * int(off[rec]) + 64 + values_in(rec) - 1] = 0  # the record's last value
    load_fails(write(tmp_path / "z.safetensors", {**tensors, "data": zeroed.view(torch.int32)}, meta),
               rf"tensor 'data': record {rec} stores a zero value under a set bit")
    pad = next(r for r in range(off.numel() - 1) if values_in(r) % 8)  # a record with padding
    first_pad = 8 * int(off[pad]) + 64 + values_in(pad)
    padded = d16.clone()
    assert int(padded[first_pad]) == 0  # the writer pads with zeros
    padded[first_pad] = 0x3C00
    load_fails(write(tmp_path / "p.safetensors", {**tensors, "data": padded.view(torch.int32)}, meta),
               r"tensor 'data': 1 nonzero 16-bit words lie in the padding after the records' values")
    # both at once, in one band: the count of nonzero halves matches nnz, but the zero value is still named (the
    # count alone let them cancel out until session 71)
    both = padded.clone()
    both[8 * int(off[pad]) + 64] = 0  # the padded record's first value
    load_fails(write(tmp_path / "b.safetensors", {**tensors, "data": both.view(torch.int32)}, meta),
               rf"tensor 'data': record {pad} stores a zero value under a set bit")


# ---------------------------------------------------------------------------------------------------
# TiledCSL: entries
# ---------------------------------------------------------------------------------------------------
def _entry(pos, value_bits):
    """A TiledCSL entry: position in the high half, value bits in the low half (as a signed int32)."""
    return _i32((pos << 16) | (value_bits & 0xFFFF))


def _tile_entries(tensors, tile):
    off = tensors["offsets"]
    return tensors["data"][int(off[tile]):int(off[tile + 1])]


def test_tiled_csl_any_order_but_no_repeated_position(tmp_path, dtype, bands):
    """Version 2 reads entries in any order inside a tile (they land by position), but refuses a position twice."""
    w = _weight(TiledCSL, dtype)
    path, tensors, meta = saved(tmp_path, w)
    e = _tile_entries(tensors, 1)  # a view: edits go into tensors["data"]
    e[[3, 4]] = e[[4, 3]].clone()
    assert torch.equal(flash_llm.load(write(path, tensors, meta)).to_dense(), w.to_dense())
    e[4] = (e[4] & 0xFFFF) | (e[3] & -65536)  # position of entry 3, value of entry 4
    load_fails(write(path, tensors, meta), r"tensor 'data': tile 1 holds a position twice")


@pytest.mark.parametrize("pos", [4096, 5000, 65534])
def test_tiled_csl_position_out_of_range(tmp_path, dtype, pos, bands):
    c = TiledCSL.from_dense(torch.where(torch.arange(K) == K - 1, 1.0, 0.0).repeat(M, 1).to(dtype))
    path, tensors, meta = saved(tmp_path, c)
    d = tensors["data"]
    last_real = int(torch.nonzero(((d >> 16) & 0xFFFF) != 0xFFFF)[-1])
    d[last_real] = _entry(pos, int(d[last_real]) & 0xFFFF)
    load_fails(write(path, tensors, meta),
               rf"tensor 'data': entry {last_real} has position {pos}, outside the 4096-element tile")


def test_tiled_csl_position_in_padding(tmp_path, dtype, bands):
    """An entry moved to a tile position that lies outside the logical matrix (row 127, col 191)."""
    w = torch.zeros(M, K, dtype=dtype)
    w[M - 1, K - 1] = 3.0  # the only nonzero: last tile (rows 64..127, cols 128..191)
    c = TiledCSL.from_dense(w)
    path, tensors, meta = saved(tmp_path, c)
    r, col = 63, 63
    lane, bit = fragment_lane_bit(torch.tensor(r % 16), torch.tensor(col))
    pad_pos = 1024 * (r // 16) + int(lane) * 32 + int(bit)
    e = _tile_entries(tensors, c.offsets.numel() - 2)
    assert int(e[1]) == int(e[2]) == int(e[3]) == -(1 << 16)  # one real entry, three pads
    e[0] = _entry(pad_pos, int(e[0]) & 0xFFFF)
    load_fails(write(path, tensors, meta), rf"tensor 'data': an entry lies outside the logical {M}x{K} matrix")


@pytest.mark.parametrize("zero_bits", [0x0000, 0x8000], ids=["+0.0", "-0.0"])
def test_tiled_csl_stored_zero_value(tmp_path, dtype, zero_bits, bands):
    path, tensors, meta = saved(tmp_path, _weight(TiledCSL, dtype))
    e = _tile_entries(tensors, 0)
    e[2] = _entry((int(e[2]) >> 16) & 0xFFFF, zero_bits)
    load_fails(write(path, tensors, meta), r"tensor 'data': an entry stores a zero value")


def test_tiled_csl_pad_entry_with_value(tmp_path, dtype, bands):
    c = TiledCSL.from_dense(torch.ones(1, 1, dtype=dtype))  # one real entry + three pads
    path, tensors, meta = saved(tmp_path, c)
    tensors["data"][3] = _entry(0xFFFF, 0x3C00)
    load_fails(write(path, tensors, meta), r"tensor 'data': a pad entry \(position 65535\) carries a nonzero value")


def test_tiled_csl_too_much_padding(tmp_path, dtype, bands):
    c = TiledCSL.from_dense(torch.ones(1, 1, dtype=dtype))
    path, tensors, meta = saved(tmp_path, c)
    tensors["data"] = torch.cat([tensors["data"], torch.full((4,), -(1 << 16), dtype=torch.int32)])
    tensors["offsets"] = torch.tensor([0, 8], dtype=torch.int32)
    load_fails(write(path, tensors, meta), r"tensor 'data': tile 0 has 1 nonzeros in 8 entries")


# ---------------------------------------------------------------------------------------------------
# The current layouts, pinned byte for byte (the worked example of docs/formats.md)
# ---------------------------------------------------------------------------------------------------
# A 16x64 fp16 matrix with w[r, c] = 64 r + c + 1 at these positions, zero elsewhere ...
PINNED_POSITIONS = [(0, 0), (0, 1), (0, 2), (1, 9), (5, 17), (8, 33), (15, 63), (9, 40)]
# ... and its encoding: {format: (version, {word index: value}, data words, offsets)}.  Any change of
# layout must fail here until FORMAT_VERSION is bumped (and old files refused or converted).
PINNED = {
    BitmapTiles: (2, {0: 0x10011, 2: 0x1000, 4: 0x40, 6: 0x400, 21: 0x10, 31: 0x80000000, 32: 0x40003C00,
                      33: 0x60444200, 34: 0x54A05D48, 35: 0x640060D2}, 36, [0, 9]),
    TiledCSL: (3, {0: 0x3C00, 1: 0x3C76400, 2: 0x1795D48, 3: 0x26060D2, 4: 0x24200, 5: 0x2216044, 6: 0x14000,
                   7: 0x4154A0}, 8, [0, 8]),
    # one slice, one split, one group: rows ranked 15 (5 entries: 4 escapes), 0, 8, 9, 5, 1, then the empty rows
    DeltaRows: (2, {2: 0x6400, 4: 0x40003C00, 5: 0x4200, 9: 0x6044, 13: 0x60D2, 16: 0x5D480000, 20: 0x54A0,
                    128: 0x3FFFF, 129: 0x110, 130: 0x3FF, 131: 0xAFF, 132: 0x2F, 133: 0x9}, 160,
                [0, 1, 0, 64] + [0] * 16 + [15, 0, 8, 9, 5, 1, 2, 3, 4, 6, 7, 10, 11, 12, 13, 14] + [-1] * 16),
}
# DeltaRows version 2's parts layout, 2 lanes a row (``from_dense(..., parts=2)``): one slice of 16 rows ranked 0 (3
# nonzeros), 1, 5, 8, 9, 15 (one each), then the empty rows, each on two lanes; row 0's stream of 3 cut at 3 x 1 / 2:
# lane 0 walks columns 0 and 1 (step 1), lane 1 column 2; each lane starts at its first column (step 0); the window
# (0, 64); data ends with the trailer [2, 2]
PINNED_DR_PARTS2 = ({0: 0x40003C00, 4: 0x4200, 8: 0x54A0, 16: 0x5D48, 24: 0x6044, 32: 0x60D2, 40: 0x6400, 128: 0x10,
                     160: 2, 161: 2}, 162,
                    [0, 1, 0, 64, 2 << 16, 9, 17, 33, 40, 63] + [0] * 10
                    + [r for r in (0, 1, 5, 8, 9, 15, 2, 3, 4, 6, 7, 10, 11, 12, 13, 14) for _ in range(2)])
# TiledCSL version 2: positions in fragment order (1024 (r // 16) + 32 lane + bit), bank order for that layout;
# converted on load.
PINNED_TCSL_V2 = {0: 0x3C00, 1: 0x436044, 2: 0x2A15D48, 3: 0xD260D2, 4: 0x44200, 5: 0x3FF6400, 6: 0x14000,
                  7: 0x9154A0}
# TiledCSL version 1: the version-2 entries sorted by position (version 2 puts them in bank order), converted on load.
PINNED_TCSL_V1 = {0: 0x3C00, 1: 0x14000, 2: 0x44200, 3: 0x436044, 4: 0x9154A0, 5: 0xD260D2, 6: 0x2A15D48,
                  7: 0x3FF6400}
# BitmapTiles version 1 (bitmap word bit 8 s + j instead of 8 (j // 2) + 4 (j % 2) + s; values and
# offsets as in version 2): files written by earlier flash-llm releases, converted on load.
PINNED_BITMAP_V1 = {0: 0x13, 2: 0x8, 4: 0x20000, 6: 0x40000, 21: 0x2, 31: 0x80000000, 32: 0x40003C00,
                    33: 0x60444200, 34: 0x54A05D48, 35: 0x640060D2}


def _pinned_expected() -> torch.Tensor:
    expected = torch.zeros(16, 64, dtype=torch.float16)
    for r, c in PINNED_POSITIONS:
        expected[r, c] = 64 * r + c + 1
    return expected


def _pinned_file(tmp_path, fmt, version, words, n, offsets, shape=(16, 64), nnz=len(PINNED_POSITIONS)):
    data = torch.zeros(n, dtype=torch.int32)
    for i, v in words.items():
        data[i] = _i32(v)
    meta = {"flash_llm": json.dumps({"format": fmt.FORMAT_NAME, "version": version, "dtype": "float16",
                                     "shape": list(shape), "nnz": nnz})}
    tensors = {"data": data, "offsets": torch.tensor(offsets, dtype=torch.int32)}
    return write(tmp_path / f"v{version}.safetensors", tensors, meta), data


def test_current_layout_is_pinned(tmp_path, fmt):
    version, words, n, offsets = PINNED[fmt]
    expected = _pinned_expected()
    assert fmt.FORMAT_VERSION == version
    path, data = _pinned_file(tmp_path, fmt, version, words, n, offsets)
    w = fmt.from_dense(expected)
    assert torch.equal(w.data, data) and w.offsets.tolist() == offsets
    assert torch.equal(flash_llm.load(path).to_dense(), expected)


def test_delta_rows_parts_layout_is_pinned(tmp_path):
    words, n, offsets = PINNED_DR_PARTS2
    path, data = _pinned_file(tmp_path, DeltaRows, 2, words, n, offsets)
    w = DeltaRows.from_dense(_pinned_expected(), parts=2)
    assert w.parts == 2 and w.splits == 1
    assert torch.equal(w.data, data) and w.offsets.tolist() == offsets
    assert torch.equal(flash_llm.load(path).to_dense(), _pinned_expected())
    with pytest.raises(FormatError, match="162 words; the offsets describe 160"):  # version 1: no parts layout
        flash_llm.load(_pinned_file(tmp_path, DeltaRows, 1, words, n, offsets)[0])


def test_bitmap_version_1_files_are_converted(tmp_path, bands):
    path, _ = _pinned_file(tmp_path, BitmapTiles, 1, PINNED_BITMAP_V1, 36, [0, 9])
    w = flash_llm.load(path)
    assert torch.equal(w.to_dense(), _pinned_expected())
    assert torch.equal(w.data, BitmapTiles.from_dense(_pinned_expected()).data)  # now in the version-2 layout


@pytest.mark.parametrize("version,words", [(1, PINNED_TCSL_V1), (2, PINNED_TCSL_V2)], ids=["v1", "v2"])
def test_tiled_csl_old_files_are_converted(tmp_path, version, words, bands):
    """Versions 1 and 2 (fragment-order positions) load as the version-3 weight: same matrix, same arrays as
    ``from_dense`` writes now."""
    path, _ = _pinned_file(tmp_path, TiledCSL, version, words, 8, [0, 8])
    w = flash_llm.load(path)
    assert torch.equal(w.to_dense(), _pinned_expected())
    assert torch.equal(w.data, TiledCSL.from_dense(_pinned_expected()).data)  # version-3 positions, bank order


def test_tiled_csl_entry_order_rules_per_version(tmp_path, bands):
    # version 1 still requires its sorted order; versions 2 and 3 accept any order but no repeated position
    swapped = {**PINNED_TCSL_V1, 1: PINNED_TCSL_V1[2], 2: PINNED_TCSL_V1[1]}
    load_fails(_pinned_file(tmp_path, TiledCSL, 1, swapped, 8, [0, 8])[0],
               r"tensor 'data': tile 0 has positions out of order or repeated")
    assert torch.equal(flash_llm.load(_pinned_file(tmp_path, TiledCSL, 2, swapped, 8, [0, 8])[0]).to_dense(),
                       _pinned_expected())
    twice = {**PINNED_TCSL_V1, 1: PINNED_TCSL_V1[0] + 1}  # position 0 again (another value)
    load_fails(_pinned_file(tmp_path, TiledCSL, 2, twice, 8, [0, 8])[0], r"tensor 'data': tile 0 holds a position twice")
    v3 = PINNED[TiledCSL][1]
    swapped3 = {**v3, 1: v3[2], 2: v3[1]}
    assert torch.equal(flash_llm.load(_pinned_file(tmp_path, TiledCSL, 3, swapped3, 8, [0, 8])[0]).to_dense(),
                       _pinned_expected())
    twice3 = {**v3, 6: v3[0] + 1}  # position 0 again (another value)
    load_fails(_pinned_file(tmp_path, TiledCSL, 3, twice3, 8, [0, 8])[0], r"tensor 'data': tile 0 holds a position twice")


def test_tiled_csl_version_3_padding_checked_in_its_own_layout(tmp_path, bands):
    """Position 63 is element (0, 63) in version 3, inside a 16x63 matrix's padding; in version 2 the same number
    is fragment lane 1, bit 31: element (8, 31), inside the matrix."""
    path, _ = _pinned_file(tmp_path, TiledCSL, 3, {0: (63 << 16) | 0x3C00, 1: -(1 << 16), 2: -(1 << 16),
                                                   3: -(1 << 16)}, 4, [0, 4], (16, 63), 1)
    load_fails(path, r"tensor 'data': an entry lies outside the logical 16x63 matrix")
    path, _ = _pinned_file(tmp_path, TiledCSL, 2, {0: (63 << 16) | 0x3C00, 1: -(1 << 16), 2: -(1 << 16),
                                                   3: -(1 << 16)}, 4, [0, 4], (16, 63), 1)
    expected = torch.zeros(16, 63, dtype=torch.float16)
    expected[8, 31] = 1.0
    assert torch.equal(flash_llm.load(path).to_dense(), expected)


def test_bitmap_version_1_padding_bits_checked_in_its_own_order(tmp_path, bands):
    """Version 1 puts fragment bit b at word bit b: its bits are read in that order, for the padding check
    and for the matrix (read in the version-2 order, both would go wrong)."""
    # (7, 63) is padding of a 16x63 matrix: lane 31, fragment bit 29; read as a version-2 word, bit 29
    # would be fragment bit 15, element (15, 55), inside the matrix
    lane, bit = (int(v) for v in fragment_lane_bit(torch.tensor(7), torch.tensor(63)))
    assert (lane, bit) == (31, 29)
    path, _ = _pinned_file(tmp_path, BitmapTiles, 1, {lane: 1 << bit, 32: 0x3C00}, 36, [0, 9], (16, 63), 1)
    load_fails(path, r"tensor 'data': record 0 has nonzero bits outside the logical 16x63 matrix")
    # fragment bit 3 of lane 31 is element (15, 49); as a version-2 word bit, bit 3 would be (7, 60)
    path, _ = _pinned_file(tmp_path, BitmapTiles, 1, {31: 1 << 3, 32: 0x3C00}, 36, [0, 9], (16, 63), 1)
    expected = torch.zeros(16, 63, dtype=torch.float16)
    expected[15, 49] = 1.0
    assert torch.equal(flash_llm.load(path).to_dense(), expected)


# ---------------------------------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", [0, 4, "1", None, True], ids=["0", "4", "str-1", "null", "true"])
def test_wrong_format_version(tmp_path, fmt, version):
    path, tensors, meta = saved(tmp_path, _weight(fmt, torch.float16))
    readable = fmt.readable_versions()
    load_fails(write(path, tensors, edit_meta(meta, version=version)),
               rf"'weight' has {fmt.FORMAT_NAME} format version {version!r}; this flash-llm reads {readable}")


@pytest.mark.parametrize("dt", ["float32", "int8", "fp16", None, 16])
def test_unknown_dtype(tmp_path, fmt, dt):
    path, tensors, meta = saved(tmp_path, _weight(fmt, torch.float16))
    load_fails(write(path, tensors, edit_meta(meta, dtype=dt)),
               rf"'weight' has value dtype {dt!r}; expected one of \['bfloat16', 'float16'\]")


@pytest.mark.parametrize("shape", [[M], [0, K], [M, -1], [M, K, 1], "70x130", [70.0, 130], [True, K], None],
                         ids=["1-D", "zero", "negative", "3-D", "string", "float", "bool", "null"])
def test_bad_shape(tmp_path, fmt, shape):
    path, tensors, meta = saved(tmp_path, _weight(fmt, torch.float16))
    load_fails(write(path, tensors, edit_meta(meta, shape=shape)),
               r"'weight' has logical shape .*; expected \[M, K\] with M, K >= 1")


def test_shape_with_other_record_count(tmp_path, fmt):
    path, tensors, meta = saved(tmp_path, _weight(fmt, torch.float16))
    load_fails(write(path, tensors, edit_meta(meta, shape=[4 * M, K])), r"tensor 'offsets' has \d+ entries")


def test_shape_smaller_than_stored_nonzeros(tmp_path, fmt):
    """Shrinking the shape within the same records leaves stored nonzeros outside the matrix."""
    path, tensors, meta = saved(tmp_path, _weight(fmt, torch.float16, density=1.0))
    load_fails(write(path, tensors, edit_meta(meta, shape=[M, K - 1], nnz=None)),
               rf"tensor 'data':.* outside the logical {M}x{K - 1} matrix")


def test_metadata_for_the_other_format(tmp_path, fmt):
    """Arrays of one format labelled as the other are rejected by the other format's validation."""
    other = TiledCSL if fmt is BitmapTiles else BitmapTiles
    for shape in [(M, K), (16, 64)]:  # 16x64: both formats have exactly one record
        path, tensors, meta = saved(tmp_path, _weight(fmt, torch.float16, density=1.0, shape=shape))
        load_fails(write(path, tensors, edit_meta(meta, format=other.FORMAT_NAME, version=other.FORMAT_VERSION)),
                   r"tensor '(offsets|data)'")


def test_from_state_checks_the_format_name(fmt):
    other = TiledCSL if fmt is BitmapTiles else BitmapTiles
    tensors, meta = other.from_dense(sparse_weight(M, K, 0.5, torch.float16)).state()
    with pytest.raises(FormatError, match=rf"'weight' has format '{other.FORMAT_NAME}'; expected '{fmt.FORMAT_NAME}'"):
        fmt.from_state(tensors, meta)


@pytest.mark.parametrize("name", ["flash_llm.csr", None, 3])
def test_unknown_format_name(tmp_path, fmt, name):
    path, tensors, meta = saved(tmp_path, _weight(fmt, torch.float16))
    load_fails(write(path, tensors, edit_meta(meta, format=name)), rf"'weight' has unknown format {name!r}; known:")


@pytest.mark.parametrize("delta", [+1, -1])
def test_nnz_disagrees(tmp_path, fmt, delta):
    c = _weight(fmt, torch.float16)
    path, tensors, meta = saved(tmp_path, c)
    load_fails(write(path, tensors, edit_meta(meta, nnz=c.nnz + delta)),
               rf"'weight' metadata says nnz={c.nnz + delta} but the arrays hold {c.nnz} nonzeros")


def test_nnz_disagrees_in_multi_weight_file_names_the_weight(tmp_path, fmt):
    path = tmp_path / "m.safetensors"
    c = _weight(fmt, torch.float16)
    flash_llm.save({"q": _weight(fmt, torch.bfloat16), "k": c}, path)
    tensors, meta = read_file(path)
    load_fails(write(path, tensors, edit_meta(meta, key="k.flash_llm", nnz=c.nnz + 8)),
               rf"'k' metadata says nnz={c.nnz + 8}")


@pytest.mark.parametrize("raw", ["{not json", "[1, 2]", "\"bitmap\""], ids=["broken", "list", "string"])
def test_metadata_not_a_json_object(tmp_path, fmt, raw):
    path, tensors, meta = saved(tmp_path, _weight(fmt, torch.float16))
    # from_state reports it precisely ...
    with pytest.raises(FormatError, match=r"metadata 'flash_llm' (is not valid JSON|must be a JSON object)"):
        fmt.from_state(tensors, {"flash_llm": raw})
    # ... and load must too, not report an "unknown format None"
    load_fails(write(path, tensors, {"flash_llm": raw}), r"metadata 'flash_llm' (is not valid JSON|must be a JSON object)")

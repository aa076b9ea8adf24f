"""Session 84 fixes of the checkpoint code and the formats' save / meta load:

1. Tensors of one storage are compared element by element before a save refuses them (``ops._overlaps`` first, then
   the bytes each element covers): two interleaved column views of one weight (``w[:, 0::2]``, ``w[:, 1::2]``) are
   saved under both names, as any other disjoint views; overlapping views are still refused, also where a view
   overlaps the second view of a storage but not the first.
2. ``SparseFormat.save`` / ``flash_llm.save`` check their path with ``_files.check_writable(file=True)`` (one function
   for both): a directory the process cannot write in is a PermissionError naming the path, a name too long a
   NameTooLongError (safetensors' own error named a temporary file and was no OSError).
3. A DeltaRows format-version-1 file in the parts layout (version 2's) is refused on the meta device as it is with its
   values, when it loads, not later when its values do; so are a file's arrays with coded values' lengths.
4. A flash-llm checkpoint transformers loaded (a dense one too) keeps the absolute source directory for its
   ``config._name_or_path``: after ``os.chdir`` an unrelated directory of the same relative name may be saved over.
"""

from __future__ import annotations

import itertools
import json
import os
import random

import pytest
import torch
from torch import nn

import flash_llm
from flash_llm import BitmapTiles, DeltaRows, FormatError, TiledCSL
from flash_llm.checkpoint import _files, _model
from flash_llm.models import ModelConfig, from_config

from _ckpt import hf_model

CFG = ModelConfig(family="llama", vocab_size=97, hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
                  intermediate_size=96, max_position_embeddings=64)


# ---- 1. disjoint views of one storage, element by element ---------------------------------------------------------

def _attention(model):
    return model.get_submodule("model.layers.0.self_attn")


def test_interleaved_column_views_of_one_weight_are_saved_and_loaded(tmp_path):
    model = from_config(CFG, dtype=torch.float16, seed=84)
    attn = _attention(model)
    fused = torch.randn(32, 128, generator=torch.Generator().manual_seed(84)).half()  # k and v interleaved by column
    attn.k_proj.weight, attn.v_proj.weight = nn.Parameter(fused[:, 0::2]), nn.Parameter(fused[:, 1::2])
    assert attn.k_proj.weight.untyped_storage().data_ptr() == attn.v_proj.weight.untyped_storage().data_ptr()
    state, _ = _model.state_to_save(model)
    assert {"model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.v_proj.weight"} <= set(state)
    flash_llm.save_pretrained(model, tmp_path / "out", progress=False)
    back = _attention(flash_llm.from_pretrained(tmp_path / "out", progress=False))
    assert torch.equal(back.k_proj.weight, fused[:, 0::2]) and torch.equal(back.v_proj.weight, fused[:, 1::2])
    assert back.k_proj.weight is not back.v_proj.weight  # (not tied: two tensors, as in the model)


def test_overlapping_views_of_one_storage_are_still_refused(tmp_path):
    model = from_config(CFG, dtype=torch.float16, seed=84)
    attn = _attention(model)
    base = torch.randn(32, 96, generator=torch.Generator().manual_seed(1)).half()
    attn.k_proj.weight, attn.v_proj.weight = nn.Parameter(base[:, 0:64]), nn.Parameter(base[:, 16:80])
    with pytest.raises(ValueError, match=r"tensors 'model\.layers\.0\.self_attn\.k_proj\.weight' and "
                                         r"'model\.layers\.0\.self_attn\.v_proj\.weight' share memory but are "
                                         r"different views"):
        flash_llm.save_pretrained(model, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    # a view that overlaps the second view of a storage, not its first: q = rows 0-63, k = 64-95, v = 80-111
    rows = torch.randn(112, 64, generator=torch.Generator().manual_seed(2)).half()
    model = from_config(CFG, dtype=torch.float16, seed=84)
    attn = _attention(model)
    attn.q_proj.weight, attn.k_proj.weight = nn.Parameter(rows[0:64]), nn.Parameter(rows[64:96])
    attn.v_proj.weight = nn.Parameter(rows[80:112])
    with pytest.raises(ValueError, match=r"tensors 'model\.layers\.0\.self_attn\.k_proj\.weight' and "
                                         r"'model\.layers\.0\.self_attn\.v_proj\.weight' share memory"):
        _model.state_to_save(model)
    # disjoint rows of one storage (q / k / v split from a fused weight) are saved, as before
    fused = torch.randn(128, 64, generator=torch.Generator().manual_seed(3)).half()
    attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight = (nn.Parameter(fused[0:64]),
                                                                 nn.Parameter(fused[64:96]), nn.Parameter(fused[96:]))
    assert {"model.layers.0.self_attn.v_proj.weight"} <= set(_model.state_to_save(model)[0])


def test_disjoint_views_of_a_flat_buffer_are_not_compared_pairwise(monkeypatch):
    """The review's finding: every view was compared with every earlier view of its storage (a ZeRO / FSDP flat buffer
    of 4000 views took a minute).  Views whose spans do not overlap are not compared at all now; the first of
    several overlapping pairs, in state-dict order, is the one named."""
    flat = torch.zeros(3000 * 4)
    model = nn.Module()
    for i in range(3000):
        model.register_buffer(f"b{i}", flat[4 * i:4 * i + 4])
    calls = []
    real = _model._shares_bytes
    monkeypatch.setattr(_model, "_shares_bytes", lambda a, b: calls.append(1) or real(a, b))
    assert len(_model.state_to_save(model)[0]) == 3000 and not calls
    model.register_buffer("late", flat[8:16])  # overlaps b2 and b3
    model.register_buffer("later", flat[2:6])  # overlaps b0 and b1
    with pytest.raises(ValueError, match=r"^tensors 'b2' and 'late' share memory"):
        _model.state_to_save(model)


def _bytes_of(t: torch.Tensor) -> set[int]:
    e = t.element_size()
    out: set[int] = set()
    for ix in itertools.product(*(range(n) for n in t.shape)):
        start = (t.storage_offset() + sum(i * s for i, s in zip(ix, t.stride()))) * e
        out.update(range(start, start + e))
    return out


def test_shares_bytes_is_exact_for_strided_views_of_any_dtype():
    gen = random.Random(84)
    base = torch.zeros(200, dtype=torch.float32)
    shared = 0
    for _ in range(600):
        views = []
        for _ in range(2):
            st = base.view(gen.choice([torch.float32, torch.float16, torch.int8, torch.float64]))
            shape = [gen.randint(1, 4) for _ in range(gen.randint(1, 3))]
            stride = [gen.randint(0, 9) for _ in shape]  # (0: expanded; overlapping strides too)
            span = sum((n - 1) * s for n, s in zip(shape, stride)) + 1
            views.append(st.as_strided(shape, stride, gen.randint(0, min(16, st.numel() - span))))
        want = bool(_bytes_of(views[0]) & _bytes_of(views[1]))
        assert _model._shares_bytes(*views) == want, [(v.shape, v.stride(), v.storage_offset(), v.dtype) for v in views]
        shared += want
    assert 100 < shared < 500  # (both answers were tested)
    w = torch.zeros(8, 16)
    assert not _model._shares_bytes(w[:, 0::2], w[:, 1::2]) and _model._shares_bytes(w[:, 0::2], w[:, 2::4])
    assert not _model._shares_bytes(w, torch.zeros(8, 16))  # (another storage)


# ---- 2. one path check for every writer ----------------------------------------------------------------------------

def _weight(fmt):
    g = torch.Generator().manual_seed(84)
    w = torch.randn(48, 80, generator=g) * (torch.rand(48, 80, generator=g) < 0.4)
    return fmt.from_dense(w.half())


@pytest.mark.skipif(not os.path.isdir("/sys"), reason="needs /sys (not writable, even for root)")
@pytest.mark.parametrize("fmt", [BitmapTiles, TiledCSL, DeltaRows])
def test_format_save_into_a_directory_it_cannot_write_is_a_permission_error(fmt, tmp_path):
    w = _weight(fmt)
    for save in (w.save, lambda p: flash_llm.save({"a": w}, p)):
        with pytest.raises(PermissionError, match=r"^path /sys/w\.safetensors: cannot create a file in /sys \("):
            save("/sys/w.safetensors")
        long = tmp_path / ("w" * 300)
        with pytest.raises(_files.NameTooLongError, match=rf"^path {long}: its name is 300 bytes long; the file "
                                                          r"system allows at most \d+"):
            save(long)
    assert list(tmp_path.iterdir()) == []  # (nothing written, no probe left)
    # the directory writers keep their own words
    with pytest.raises(PermissionError, match=r"^output /sys/out: cannot create a directory in /sys \("):
        _files.check_writable("/sys/out")


def test_the_file_check_keeps_the_format_savers_errors(tmp_path):
    (tmp_path / "file").write_text("x")
    cases = [(tmp_path, IsADirectoryError, f"path {tmp_path} is a directory; give a file name (e.g. "
                                           f"{tmp_path / 'weight.safetensors'})"),
             (tmp_path / "no" / "w.safetensors", FileNotFoundError,
              f"path {tmp_path / 'no' / 'w.safetensors'}: its directory {tmp_path / 'no'} does not exist"),
             (tmp_path / "file" / "w.safetensors", NotADirectoryError,
              f"path {tmp_path / 'file' / 'w.safetensors'}: {tmp_path / 'file'} is not a directory")]
    for path, error, message in cases:
        with pytest.raises(error) as e:
            _files.check_writable(path, "path", file=True)
        assert str(e.value) == message
    _files.check_writable(tmp_path / "w.safetensors", "path", file=True)
    assert not hasattr(flash_llm.formats._base, "_check_save_path")  # (one check: _files.check_writable)


# ---- 3. a DeltaRows version-1 file on the meta device --------------------------------------------------------------

def _state(w: DeltaRows, version: int | None = None):
    tensors, meta = w.state()
    m = json.loads(meta["flash_llm"])
    if version is not None:
        m["version"] = version
    return tensors, {"flash_llm": json.dumps(m)}


def _on_meta(tensors):
    return {k: t.to("meta") for k, t in tensors.items()}


def _dense(dtype=torch.float16):
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(84))
    return (w * (torch.rand(64, 128, generator=torch.Generator().manual_seed(1)) >= 0.8)).to(dtype)


@pytest.mark.parametrize("parts", [2, 4, 16])
def test_delta_rows_version_1_in_the_parts_layout_is_refused_on_the_meta_device(parts):
    tensors, meta = _state(DeltaRows.from_dense(_dense(), parts=parts), version=1)
    with pytest.raises(FormatError, match=r"format version 1"):  # (with its values: refused, as before)
        DeltaRows.from_state(tensors, meta)
    with pytest.raises(FormatError, match=rf"^'weight' \(on the meta device\) is no 64x128 flash_llm\.delta_rows "
                                          rf"weight: data of \d+ words is in the parts layout \({parts} lanes a row\), "
                                          r"which format version 2 added: a format version 1 file holds the split "
                                          r"layout only \(1 lane a row\)$"):
        DeltaRows.from_state(_on_meta(tensors), meta)
    # version 2 in the parts layout, and version 1 in the split layout, load there (shapes only)
    for tensors, meta in (_state(DeltaRows.from_dense(_dense(), parts=parts)),
                          _state(DeltaRows.from_dense(_dense(), splits=2), version=1)):
        w = DeltaRows.from_state(_on_meta(tensors), meta)
        assert w.device.type == "meta" and w.shape == (64, 128)


def test_delta_rows_coded_lengths_in_a_file_are_refused_on_the_meta_device():
    w = _dense(torch.bfloat16)
    coded = DeltaRows.from_dense(w).code_values()
    assert coded is not None and coded.coded
    _, meta = _state(DeltaRows.from_dense(w))
    arrays = {"data": coded.data, "offsets": coded.offsets}  # (a file holds plain values: state() writes them)
    with pytest.raises(FormatError, match="truncated or inconsistent"):
        DeltaRows.from_state(arrays, meta)
    with pytest.raises(FormatError, match=r"\(on the meta device\) is no 64x128 flash_llm\.delta_rows weight: data of "
                                          r"\d+ words has the length of coded values"):
        DeltaRows.from_state(_on_meta(arrays), meta)
    # a coded weight in memory (no file version) is a DeltaRows weight: what the raw ops check
    assert DeltaRows.arrays_fit(64, 128, coded.offsets.numel(), coded.data.numel()) is None


# ---- 4. a transformers-loaded flash-llm checkpoint's source across chdir -------------------------------------------

@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_a_transformers_loaded_checkpoint_is_not_its_namesake_after_chdir(sparse, tmp_path, monkeypatch):
    import warnings

    transformers = pytest.importorskip("transformers")
    model = hf_model("llama", seed=84)
    if sparse:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # (the layers kept dense)
            flash_llm.sparsify_(model)
    src = tmp_path / "a" / "ck"
    flash_llm.save_pretrained(model, src, progress=False)  # (dense: quantization_config without sparse modules)
    (src / "tokenizer.json").write_text("{}")
    monkeypatch.chdir(tmp_path / "a")
    loaded = transformers.AutoModelForCausalLM.from_pretrained("ck")  # (config._name_or_path: "ck", relative)
    assert loaded.config._name_or_path == "ck"
    unrelated = tmp_path / "b" / "ck"
    unrelated.mkdir(parents=True)
    (unrelated / "notes.txt").write_text("x")
    monkeypatch.chdir(tmp_path / "b")  # './ck' is now the unrelated directory
    flash_llm.save_pretrained(loaded, "ck", overwrite=True, progress=False)  # (not the source: written)
    assert (unrelated / "config.json").is_file() and not (unrelated / "notes.txt").exists()
    with pytest.raises(ValueError, match=rf"source directory {src} and path {src} are the same directory"):
        flash_llm.save_pretrained(loaded, src, overwrite=True, progress=False)
    assert (src / "tokenizer.json").is_file()
    # a name changed since the load is read as it is, as before
    loaded.config._name_or_path = str(unrelated)
    with pytest.raises(ValueError, match=rf"source directory {unrelated} and path ck are the same directory"):
        flash_llm.save_pretrained(loaded, "ck", overwrite=True, progress=False)

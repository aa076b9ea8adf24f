"""DeltaRows beyond the generic format tests (which run it through test_formats.py / test_serialization.py): split
counts and windows, refusal of what it cannot store, validation of damaged arrays, slicing and merging, the CPU
product, and its use through SparseLinear / sparsify_."""

from __future__ import annotations

import pytest
import torch

import flash_llm
from flash_llm import DeltaRows, FormatError
from flash_llm.formats import delta_rows as D


def _w(m, k, density, dtype=torch.float16, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, k, generator=g)
    return torch.where(torch.rand(m, k, generator=g) < density, w, 0.0).to(dtype)


def _windows_ok(c: DeltaRows) -> None:
    """Every entry's column lies in its split's window (what the kernel's shared-memory X relies on)."""
    DeltaRows._validate(c.tensors(), c.shape, "", "")


@pytest.mark.parametrize("splits", [1, 2, 7, 64, 300])
def test_explicit_split_counts_round_trip(splits):
    w = _w(100, 512, 0.3)
    c = DeltaRows.from_dense(w, splits=splits)
    assert c.splits == splits
    assert torch.equal(c.to_dense(), w)
    _windows_ok(c)
    r = c.resplit(3)
    assert r.splits == 3 and torch.equal(r.to_dense(), w)


def test_default_split_count_aims_at_the_block_target():
    w = _w(4096, 1024, 0.2)
    c = DeltaRows.from_dense(w, parts=1)
    slices = 4096 // 32
    assert c.splits == D.default_splits(4096, int(((c.offsets[1:slices + 1] - c.offsets[:slices]).max())))
    assert c.splits * slices <= 2 * D.TARGET_BLOCKS


def test_split_target_follows_the_device_wave(monkeypatch):
    """Encoding on a CUDA device aims at WAVE_SHARE of one wave of the N = 1 kernel there (H200: 8 blocks of 4 warps
    on 132 SMs -> 3590 warps, the split counts of the 3600 default); on the CPU, or where the kernels cannot say,
    TARGET_BLOCKS; FLASH_LLM_DELTA_BLOCKS wins over both."""
    from flash_llm import kernels

    monkeypatch.delenv("FLASH_LLM_DELTA_BLOCKS", raising=False)
    monkeypatch.setattr(kernels, "sm_count", lambda index: 132)
    monkeypatch.setattr(kernels, "blocks_per_sm", lambda name, index, block, shared=0: 8)
    cuda0 = torch.device("cuda", 0)
    assert D.target_warps(cuda0) == int(D.WAVE_SHARE * 8 * 132 * 4) == 3590
    for m, s in ((28672, 4), (6144, 19), (4096, 28)):  # Llama-3-8B gate / up, qkv, o: as with 3600
        assert D.default_splits(m, 1000, cuda0) == D.default_splits(m, 1000) == s
    monkeypatch.setattr(kernels, "sm_count", lambda index: 108)  # an A100: 6 blocks an SM (164 KB of shared memory)
    monkeypatch.setattr(kernels, "blocks_per_sm", lambda name, index, block, shared=0: 6)
    assert D.target_warps("cuda:0") == int(0.85 * 6 * 108 * 4)
    assert D.default_splits(28672, 1000, "cuda:0") == 2  # 896 slices: 2 splits, 448 blocks of 648
    assert D.target_warps("cpu") == D.target_warps(None) == D.TARGET_BLOCKS

    def broken(*a, **k):
        raise RuntimeError("no driver")

    monkeypatch.setattr(kernels, "blocks_per_sm", broken)
    assert D.target_warps(cuda0) == D.TARGET_BLOCKS
    monkeypatch.setenv("FLASH_LLM_DELTA_BLOCKS", "1234")
    assert D.target_warps(cuda0) == D.TARGET_BLOCKS  # (read at import: the override in force then)
    monkeypatch.setattr(kernels, "blocks_per_sm", lambda name, index, block, shared=0: 8)
    monkeypatch.setattr(D, "BLOCKS_OVERRIDE", 1234)  # (set at import: it wins over the device's wave)
    assert D.target_warps(cuda0) == D.target_warps("cpu") == 1234
    monkeypatch.setattr(D, "BLOCKS_OVERRIDE", 0)  # (unset, or a bad or blank value: warned at import, no override)
    assert D.target_warps(cuda0) == int(D.WAVE_SHARE * 8 * 108 * 4)


@pytest.mark.parametrize("runs", [False, True], ids=["whole", "runs"])
def test_empty_rows_do_not_widen_their_slices_window(runs, monkeypatch):
    """A slice of 31 empty rows and one row of nonzeros in columns 400-410 (the 32 shortest rows: the second slice), two
    splits: the second split's window starts at the row's own column, not at column 0 (where an empty lane would start
    it), as when that slice is encoded alone, whether the weight is encoded whole or a slice a run (the lanes' entry
    counts carried into the joined windows)."""
    if runs:
        monkeypatch.setattr(D, "ENCODE_CHUNK_ENTRIES", 1)
    w = torch.zeros(64, 520, dtype=torch.float16)
    w[:32] = _w(32, 520, 0.5, torch.float16, seed=4)
    w[40, 400:411] = 1.5
    c = DeltaRows.from_dense(w, splits=2)
    assert len(D._slice_runs(torch.tensor([300, 11]), 32, 520)) == (2 if runs else 1)
    win = c._offset_arrays()[1]
    alone = DeltaRows.from_dense(w[32:], splits=2)._offset_arrays()[1]  # (the slice encoded by itself)
    assert alone[0, 1, 0] > 0 and torch.equal(win[1], alone[0])  # split 1 starts at the row's own column (240)
    assert torch.equal(c.to_dense(), w)


def test_windows_are_narrowed_by_more_splits_when_they_can_be():
    w = _w(64, 16384, 0.2, seed=3)  # 2 slices: few splits by the block target, windows of thousands of columns
    c = DeltaRows.from_dense(w, parts=1)
    win = c._offset_arrays()[1]
    assert int(win[..., 1].max()) <= D.WINDOW_MAX
    assert torch.equal(c.to_dense(), w)


def test_block_window_max_is_the_union_of_a_blocks_slices_per_split():
    win = torch.tensor([[[0, 8], [100, 16]],     # slice 0: split 0 columns 0-7, split 1 100-115
                        [[40, 24], [96, 8]],     # slice 1
                        [[8, 8], [200, 40]],     # slice 2
                        [[16, 8], [120, 8]],     # slice 3
                        [[1000, 8], [0, 8]]])    # slice 4: a block of its own (the kernel repeats it, no widening)
    assert D.block_window_max(win) == 240 - 96  # split 1 of slices 0-3: 96 .. 239
    assert D.block_window_max(win, block=1) == 40
    assert D.block_window_max(win[:0]) == 0
    assert D.BLOCK_SLICES == 4


def test_encoder_fits_each_blocks_window_and_wide_k_takes_few_splits(monkeypatch):
    """A wide-K weight (OPT-30B's fc2, K = 28672, shrunk in M with the warp target to match): the encoder raises the
    split count from the target's only until every block's union window fits WINDOW_MAX (3072: the kernel stages up
    to 1536 columns as fp32, up to 3072 as 16-bit)."""
    monkeypatch.setattr(D, "TARGET_BLOCKS", 64)  # 8 slices: 8 splits to start from, windows of some 6000 columns
    w = _w(256, 28672, 0.2, seed=4)
    c = DeltaRows.from_dense(w)
    bw = D.block_window_max(c._offset_arrays()[1])
    assert 1536 < bw <= D.WINDOW_MAX == 3072, bw  # (the 16-bit staging's range: 1536 would have taken more splits)
    assert c.splits > D.default_splits(256, 10**9) == 8
    fewer = DeltaRows.from_dense(w, splits=c.splits * 2 // 3)  # the encoder's previous step
    assert D.block_window_max(fewer._offset_arrays()[1]) > D.WINDOW_MAX
    assert torch.equal(c.to_dense(), w)


def test_rows_far_apart_keep_a_wide_window_and_stay_exact():
    """Rows of one slice whose nonzeros lie at opposite ends of K: no split count narrows the window below
    WINDOW_MAX (the kernel then reads X from global memory); the weight is still stored exactly."""
    k = 8192
    w = torch.zeros(32, k, dtype=torch.float16)
    g = torch.Generator().manual_seed(1)
    for r in range(32):
        cols = torch.randperm(1024, generator=g)[:200] + (0 if r < 16 else k - 1024)
        w[r, cols] = torch.randn(200, generator=g).half()
    c = DeltaRows.from_dense(w)
    assert int(c._offset_arrays()[1][..., 1].max()) > D.WINDOW_MAX
    assert torch.equal(c.to_dense(), w)
    x = torch.randn(3, k).half()
    torch.testing.assert_close(flash_llm.spmm(x, c), torch.nn.functional.linear(x.float(), w.float()).half(),
                               atol=2e-2, rtol=2e-3)


def test_what_it_cannot_store_is_refused():
    with pytest.raises(ValueError, match="K = 65536"):
        DeltaRows.from_dense(torch.zeros(2, 65536, dtype=torch.float16))
    with pytest.raises(ValueError, match="splits"):
        DeltaRows.from_dense(torch.ones(2, 8, dtype=torch.float16), splits=0)
    with pytest.raises(ValueError, match="splits"):
        DeltaRows.from_dense(torch.ones(2, 8, dtype=torch.float16), splits=True)


def test_largest_k_that_fits():
    w = torch.zeros(3, 65535, dtype=torch.bfloat16)
    w[0, 65534] = 1.0
    w[2, 0] = -3.0
    w[1, 40000] = 0.5
    c = DeltaRows.from_dense(w)
    assert torch.equal(c.to_dense(), w)


def _damaged(c: DeltaRows, what: str) -> dict:
    data, off = c.data.clone(), c.offsets.clone()
    lay = D.layout(c.shape[0], off.numel(), data.numel())
    slices, s = lay.slices, lay.splits
    win0 = slices + 1
    st0 = win0 + 2 * slices * s
    perm0 = st0 + 16 * slices * s
    if what == "window":  # split 0 of slice 0 shrunk to 8 columns
        off[win0 + 1] = 8
    elif what == "window-unaligned":
        off[win0] = 3
    elif what == "start":  # a lane's start far outside its window
        off[st0 + 3] = 0x7FFF7FFF
    elif what == "perm-duplicate":
        off[perm0 + 1] = off[perm0]
    elif what == "perm-range":
        off[perm0] = c.shape[0]
    elif what == "pad-rank-nonzero":  # a value in the last lane (a padding rank) of the last slice's first group
        data[int(off[slices - 1]) * D.GROUP_WORDS + 4 * 31] = 0x3C00
    elif what == "repeated-column":  # lane 0's second entry steps 0 onto the first's column with a value
        data[0] = 0x3C003C00
        data[128] = data[128] & ~0xF0
    elif what == "goff":
        off[0] = 1
    elif what == "length":
        off = off[:-1]
    return {"data": data, "offsets": off}


@pytest.mark.parametrize("what", ["window", "window-unaligned", "start", "perm-duplicate", "perm-range",
                                  "pad-rank-nonzero", "repeated-column", "goff", "length"])
@pytest.mark.parametrize("chunk", [None, 1])
def test_damaged_arrays_are_refused(what, chunk, monkeypatch):
    if chunk:  # (validation reads a run of slices at a time: the damage in the last slice or the first is seen)
        monkeypatch.setattr(D, "ENTRY_CHUNK_GROUPS", chunk)
    w = _w(40, 256, 0.4, seed=5)
    c = DeltaRows.from_dense(w, splits=2)
    with pytest.raises(FormatError):
        DeltaRows._validate(_damaged(c, what), c.shape, "", "")


def test_damaged_file_is_refused(tmp_path):
    c = DeltaRows.from_dense(_w(40, 256, 0.4, seed=6), splits=2)
    tensors, meta = c.state()
    bad = _damaged(c, "window")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in bad.items()}, str(tmp_path / "w.safetensors"), metadata=meta)
    with pytest.raises(FormatError, match="window"):
        flash_llm.load(tmp_path / "w.safetensors")


def test_slice_and_concat_match_the_dense_weight():
    w = _w(150, 320, 0.3, seed=7)
    c = DeltaRows.from_dense(w)
    for rows, cols in (((0, 150), (0, 320)), ((10, 97), (0, 320)), ((0, 64), (64, 200)), ((149, 150), (5, 6))):
        s = c.slice(rows, cols)
        assert torch.equal(s.to_dense(), w[rows[0]:rows[1], cols[0]:cols[1]])
    parts = [DeltaRows.from_dense(w[:70]), DeltaRows.from_dense(w[70:])]
    assert torch.equal(DeltaRows.concat(parts).to_dense(), w)
    with pytest.raises(TypeError, match="DeltaRows"):
        DeltaRows.concat([parts[0], flash_llm.TiledCSL.from_dense(w[70:])])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_product_and_sparse_linear(dtype):
    w = _w(96, 200, 0.25, dtype, seed=8)
    bias = torch.randn(96).to(dtype)
    x = torch.randn(5, 200).to(dtype)
    ref = (x.float() @ w.float().t() + bias.float()).to(dtype)
    assert torch.equal(flash_llm.spmm(x, DeltaRows.from_dense(w), bias), ref)
    layer = flash_llm.SparseLinear.from_dense(w, bias, fmt="delta-rows")
    assert isinstance(layer.weight, DeltaRows) and "DeltaRows" in repr(layer)
    assert torch.equal(layer(x), ref)


def test_sparsify_to_delta_rows():
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 32)).half()
    with torch.no_grad():
        for lin in (model[0], model[2]):
            lin.weight.mul_(torch.rand_like(lin.weight.float()).lt(0.3).half())
    x = torch.randn(4, 64).half()
    want = model(x)
    report = flash_llm.sparsify_(model, flash_llm.SparsifyConfig(format="delta-rows"))
    assert len(report.converted) == 2 and isinstance(model[0].weight, DeltaRows)
    torch.testing.assert_close(model(x), want, atol=2e-3, rtol=2e-3)


def test_synthetic_formula_is_close_to_the_stored_bytes():
    from flash_llm.models.synthetic import delta_rows_formula_bytes

    for density in (0.2, 0.3, 0.5):
        w = _w(1024, 1024, density, seed=9)
        c = DeltaRows.from_dense(w)
        ratio = c.nbytes / delta_rows_formula_bytes(1024, 1024, c.nnz)
        assert abs(ratio - 1) < 0.03, (density, ratio)


@pytest.mark.parametrize("parts", [1, 4])
def test_synthetic_formula_follows_coded_values(parts):
    """bf16 values coded (2 bytes an entry instead of 2.5): the formula with ``coded`` stays within 3 % of the stored
    bytes, where the plain formula overstates them by about a fifth (bench_e2e's weight check read 0.82)."""
    from flash_llm.models.synthetic import delta_rows_formula_bytes

    g = torch.Generator().manual_seed(11)
    for density in (0.2, 0.3, 0.5):
        # magnitudes in [0.25, 4): each row's exponents within the coding's span, as pruned weights keep them
        mag = 0.25 * torch.pow(16.0, torch.rand(1024, 1024, generator=g))
        sign = torch.where(torch.rand(1024, 1024, generator=g) < 0.5, -1.0, 1.0)
        w = torch.where(torch.rand(1024, 1024, generator=g) < density, sign * mag, 0.0).to(torch.bfloat16)
        plain = DeltaRows.from_dense(w) if parts == 1 else DeltaRows.from_dense(w, splits=1, parts=parts)
        c = plain.code_values()
        assert c is not None and c.coded and c.parts == parts and torch.equal(c.to_dense(), w)
        ratio = c.nbytes / delta_rows_formula_bytes(1024, 1024, c.nnz, parts, coded=True)
        assert abs(ratio - 1) < 0.03, (density, ratio)
        plain_ratio = c.nbytes / delta_rows_formula_bytes(1024, 1024, c.nnz, parts)
        assert plain_ratio < 0.9, (density, plain_ratio)


def test_paired_halves_round_trip_and_validation():
    w = _w(128, 300, 0.3, seed=10)
    c = DeltaRows.from_dense(w, pair_halves=True)
    assert c.paired and not DeltaRows.from_dense(w).paired
    assert torch.equal(c.to_dense(), w)
    perm = c._offset_arrays()[3]
    assert torch.equal(perm[64:], perm[:64] + 64)  # rank r of the up half holds the up row of rank r's gate row
    assert c.resplit(5).paired and c.resplit(5).splits == 5
    assert DeltaRows.concat([DeltaRows.from_dense(w[:64]), DeltaRows.from_dense(w[64:])], pair_halves=True).paired
    with pytest.raises(ValueError, match="pair_halves"):
        DeltaRows.from_dense(_w(96, 64, 0.5), pair_halves=True)  # halves of 48 rows: not whole slices
    bad = c.offsets.clone()
    lay = D.layout(128, bad.numel(), c.data.numel())
    slices, s = lay.slices, lay.splits
    p0 = slices + 1 + 18 * slices * s
    bad[p0 + 64], bad[p0 + 65] = bad[p0 + 65].clone(), bad[p0 + 64].clone()  # two up rows swapped: unpaired
    with pytest.raises(FormatError, match="paired"):
        DeltaRows._validate({"data": c.data, "offsets": bad}, c.shape, "", "")


def test_merged_gate_up_is_paired():
    from flash_llm.models import preset
    from flash_llm.models._merge import merge_projections
    from flash_llm.models.synthetic import build_synthetic

    cfg = preset("llama-3-8b").replace(num_layers=1, hidden_size=128, intermediate_size=256, num_heads=4,
                                       num_kv_heads=2, vocab_size=64, name="tiny")
    model, _ = build_synthetic(cfg, 0.8, device="cpu", progress=False, fmt="delta-rows")
    merge_projections(model)
    mlp = model.model.layers[0].mlp
    assert mlp.gate_up_proj.layer.weight.paired
    assert not model.model.layers[0].self_attn.qkv_proj.layer.weight.paired
    x = torch.randn(1, 128).half()
    g, u = (x.float() @ mlp.gate_up_proj.layer.weight.to_dense().float().t()).half().chunk(2, -1)
    want = (torch.nn.functional.silu(g.float()) * u.float()).half()
    torch.testing.assert_close(flash_llm.ops.spmm_silu_mul(x, mlp.gate_up_proj.layer.weight), want)


def _awkward(m: int, k: int, density: float, dtype, seed: int) -> torch.Tensor:
    """a random weight with an empty row, a row whose only nonzero is its last column (escapes) and a full row; its
    magnitudes in 0.25 .. 3.9, so a bf16 one's values can be coded"""
    w = _w(m, k, density, torch.float32, seed)
    w[5] = 0
    w[2] = 0
    w[2, -1] = 1.0
    w[7] = torch.randn(k, generator=torch.Generator().manual_seed(seed))
    return torch.where(w != 0, w.sign() * w.abs().clamp(0.25, 3.9), 0.0).to(dtype)


@pytest.mark.parametrize("kw", [{}, {"splits": 3}, {"pair_halves": True}, {"parts": 2},
                                {"parts": 8, "pair_halves": True}],
                         ids=["auto", "splits3", "paired", "parts2", "parts8-paired"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_encoding_a_run_of_slices_at_a_time_gives_the_same_arrays(kw, dtype, monkeypatch):
    w = _awkward(320, 520, 0.3, dtype, seed=11)
    whole = DeltaRows.from_dense(w, **kw)
    assert torch.equal(whole.to_dense().view(torch.int16), w.view(torch.int16))
    for entries, elements in [(1, 1), (300, 1 << 26), (1 << 22, 3000)]:
        monkeypatch.setattr(D, "ENCODE_CHUNK_ENTRIES", entries)
        monkeypatch.setattr(D, "ENCODE_CHUNK_ELEMENTS", elements)
        runs = D._slice_runs(torch.full((10,), 100, dtype=torch.int64), 32, 520)
        assert len(runs) > 1  # (these settings do cut a weight into runs)
        part = DeltaRows.from_dense(w, **kw)
        assert torch.equal(part.data, whole.data) and torch.equal(part.offsets, whole.offsets)
        assert part.nnz == whole.nnz == int(torch.count_nonzero(w))


@pytest.mark.parametrize("coded", [False, True])
@pytest.mark.parametrize("parts", [1, 4])
def test_decoding_a_run_of_slices_at_a_time_gives_the_same_weight(coded, parts, monkeypatch):
    w = _awkward(320, 512, 0.3, torch.bfloat16, seed=12)
    plain = DeltaRows.from_dense(w, **({"parts": parts} if parts > 1 else {"splits": 3}))
    c = plain.code_values() if coded else plain
    assert c is not None and c.coded == coded
    whole = c.entries()
    nnz = DeltaRows._validate(plain.tensors(), c.shape, "", "")  # (files hold plain values: state() uncodes)
    monkeypatch.setattr(D, "ENTRY_CHUNK_GROUPS", 3)
    goff = c._offset_arrays()[0]
    chunks = D._slice_chunks(goff, 3)
    assert len(chunks) > 2
    got = [D._entries(c.data, c.offsets, 320, s0, s1)[:3] for s0, s1 in chunks]
    for a, b in zip(whole, (torch.cat([g[i] for g in got]) for i in range(3))):
        assert torch.equal(a, b)
    assert torch.equal(c.to_dense().view(torch.int16), w.view(torch.int16))
    assert DeltaRows._validate(plain.tensors(), c.shape, "", "") == nnz == int(torch.count_nonzero(w))
    monkeypatch.setattr(D, "CODE_CHUNK_GROUPS", 5)
    assert torch.equal(D.uncode_values(c.data, c.offsets, 320), plain.data)


def test_runs_are_larger_on_a_gpu_with_free_memory(monkeypatch):
    """``_encode_budget`` and ``_entry_groups`` (the encoder's and the decoder's runs): the constants on the CPU and
    where an environment variable fixes them; on a GPU an eighth of its free memory at 100 bytes an entry and 4 a
    gathered element, within [constants, 2^25 entries / 2^29 elements / 2^17 groups]."""
    free = {"v": 8 * 10**9}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free["v"], 80 * 10**9))
    cuda = torch.device("cuda", 0)
    assert D._encode_budget(torch.device("cpu")) == (D.ENCODE_CHUNK_ENTRIES, D.ENCODE_CHUNK_ELEMENTS)
    assert D._encode_budget(cuda) == (10**7, 25 * 10**7)  # (1 GB: 10^7 entries, 2.5 x 10^8 elements)
    free["v"] = 80 * 10**9
    assert D._encode_budget(cuda) == (1 << 25, 1 << 29)
    free["v"] = 10**6
    assert D._encode_budget(cuda) == (D.ENCODE_CHUNK_ENTRIES, D.ENCODE_CHUNK_ELEMENTS)
    assert D._entry_groups(cuda) == D.ENTRY_CHUNK_GROUPS == D._entry_groups(torch.device("cpu"))
    free["v"] = 8 * 10**9
    assert D._entry_groups(cuda) == 10**9 // (256 * 100)  # (1 GB at 100 bytes an entry, 256 entries a group)
    free["v"] = 80 * 10**9
    assert D._entry_groups(cuda) == 1 << 17
    free["v"] = 8 * 10**9
    monkeypatch.setattr(D, "_ENCODE_FIXED", True)
    assert D._encode_budget(cuda) == (D.ENCODE_CHUNK_ENTRIES, D.ENCODE_CHUNK_ELEMENTS)
    assert D._entry_groups(cuda) == D.ENTRY_CHUNK_GROUPS


def test_slice_runs_and_chunks_cover_every_slice_within_their_bounds(monkeypatch):
    goff = torch.tensor([0, 4, 4, 9, 30, 31, 40])  # slices of 4, 0, 5, 21, 1, 9 groups
    for most in (1, 5, 9, 21, 100):
        chunks = D._slice_chunks(goff, most)
        assert chunks[0][0] == 0 and chunks[-1][1] == 6
        assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
        g = goff.tolist()
        assert all(s1 - s0 == 1 or g[s1] - g[s0] <= most for s0, s1 in chunks)
    assert D._slice_chunks(goff, 100) == [(0, 6)]
    assert D._slice_chunks(torch.tensor([0]), 5) == []
    monkeypatch.setattr(D, "ENCODE_CHUNK_ENTRIES", 10)
    monkeypatch.setattr(D, "ENCODE_CHUNK_ELEMENTS", 32 * 64 * 3)
    cost = torch.tensor([4, 5, 2, 30, 1, 1, 1, 1])
    runs = D._slice_runs(cost, 32, 64)
    assert runs == [(0, 2), (2, 3), (3, 4), (4, 7), (7, 8)]  # at most 10 entries and 3 slices, or one slice alone

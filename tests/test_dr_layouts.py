"""DeltaRows' parts layout (version 2: P lanes a row, one split) on the CPU: round trips, what the encoder picks, what
it refuses, damaged arrays, the layout read lane by lane as ``delta_rows_parts_*`` reads it, and the check of
``benchmarks/dr_layouts.py`` (which times the two layouts on a GPU) with faked launches."""

import os

import pytest
import torch
from conftest import load_script

from flash_llm import DeltaRows, FormatError
from flash_llm.formats import delta_rows as D

bench = load_script("benchmarks/dr_layouts.py", "dr_layouts")


def _w(m, k, density, seed=0, dtype=torch.float16):
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(m, k, generator=gen) * (torch.rand(m, k, generator=gen) < density)).to(dtype)
    return w.masked_fill(w == 0, 0)  # (-0.0 is dropped as a zero)


@pytest.mark.parametrize("m, k, density, parts, pair", [
    (64, 64, 0.5, 2, False), (100, 520, 0.2, 4, False), (128, 4096, 0.2, 16, True), (96, 1000, 0.01, 8, False),
    (64, 64, 1.0, 16, False), (32, 64, 0.0, 4, False), (64, 2048, 0.03, 16, True), (40, 3000, 0.2, 8, False),
    (7, 16, 0.6, 16, False), (192, 256, 0.3, 2, True)])
def test_round_trip_every_lane_count(m, k, density, parts, pair):
    w = _w(m, k, density, seed=m * k + parts)
    if density:
        w[0, k - 1] = 3.0  # the last column, and a gap of K - 1 from the row's previous entry (escapes)
    c = DeltaRows.from_dense(w, parts=parts, pair_halves=pair)
    assert (c.parts, c.splits, c.paired) == (parts, 1, pair)
    assert torch.equal(c.to_dense().view(torch.int16), w.view(torch.int16))
    assert DeltaRows._validate(c.tensors(), c.shape, "", "") == int((w != 0).sum()) == c.nnz
    assert c.data.numel() % D.GROUP_WORDS == parts and bool((c.data[-parts:] == parts).all())
    perm = c._offset_arrays()[3].view(-1, parts)
    assert bool((perm == perm[:, :1]).all())  # a row's lanes are adjacent
    valid = perm[:, 0][perm[:, 0] >= 0]
    assert torch.equal(torch.sort(valid).values, torch.arange(m))  # every row once
    if pair:  # each slice's lanes 16-31 hold the up rows of its lanes 0-15
        g, u = perm.reshape(-1, 2, 16)[:, 0], perm.reshape(-1, 2, 16)[:, 1]
        assert torch.equal(torch.where(g >= 0, g + m // 2, g), u)
    bf = DeltaRows.from_dense(w.to(torch.bfloat16), parts=parts, pair_halves=pair)
    assert torch.equal(bf.to_dense(), w.to(torch.bfloat16))


def test_parts_are_equal_shares_of_each_row():
    w = _w(32, 4096, 0.2, seed=1)
    c = DeltaRows.from_dense(w, parts=8)
    rank, vals, cols = c.entries()
    nz = (vals != 0)
    per_lane = torch.bincount(rank[nz], minlength=c.layout.mp).view(-1, 8)  # nonzeros of each row's 8 lanes
    row_nnz = per_lane.sum(1, keepdim=True).float()
    assert bool(((per_lane - row_nnz / 8).abs() <= 2 + 0.05 * row_nnz / 8).all())
    lane_cols = [cols[nz & (rank == r)] for r in range(16)]  # slice 0's first two rows: parts in column order
    for r in range(0, 16, 8):
        for a, b in zip(lane_cols[r: r + 7], lane_cols[r + 1: r + 8]):
            assert a.numel() == 0 or b.numel() == 0 or int(a.max()) < int(b.min())


def test_default_lane_count_follows_the_rule(monkeypatch):
    assert D.PARTS_ENV == (os.environ.get("FLASH_LLM_DELTA_PARTS", "1").strip().lower() or "1")
    monkeypatch.setattr(D, "PARTS_ENV", "1")  # the default: the split layout
    assert D.default_parts(6144, 4096, 6144 * 800) == 1 and D.auto_parts(6144, 4096, 6144 * 800) == 16
    assert DeltaRows.from_dense(_w(256, 1024, 0.3)).parts == 1
    monkeypatch.setattr(D, "PARTS_ENV", "auto")
    target = D.PARTS_SHARE * D.target_warps()
    for (m, k), want in (((6144, 4096), 16), ((28672, 4096), 4), ((4096, 4096), 16), ((2048, 2048), 8),
                         ((57344, 1024), 2)):  # (Llama-3-8B's q/k/v, gate / up, o at 80 %; 2048: 25-entry parts at 16)
        assert D.default_parts(m, k, m * k // 5) == want
        assert want == 8 or (want == 16 or -(-m * want // 32) >= target) and (want == 2 or -(-m * want // 64) < target)
    for m, k in ((4096, 14336), (21504, 7168), (7168, 28672)):  # K above PARTS_MAX_K: the split layout
        assert D.default_parts(m, k, m * k // 5) == 1
    assert D.default_parts(4096, 4100, 4096 * 4100 // 5) == 1  # K % 8 != 0
    assert D.default_parts(4096, 4096, 4096 * 4096 // 10) == 8  # 90 %: 410 nonzeros a row, 8 parts of 51
    assert D.default_parts(4096, 1024, 4096 * 60) == 1  # 60 a row: even 2 parts would hold under 48
    monkeypatch.setattr(D, "PARTS_ENV", "1")
    assert D.default_parts(6144, 4096, 6144 * 800) == 1
    assert DeltaRows.from_dense(_w(256, 1024, 0.3)).parts == 1
    monkeypatch.setattr(D, "PARTS_ENV", "4")
    assert DeltaRows.from_dense(_w(256, 1024, 0.3)).parts == 4
    assert DeltaRows.from_dense(_w(256, 1020, 0.3)).parts == 1  # (K % 8 != 0)
    monkeypatch.setattr(D, "PARTS_ENV", "3")
    with pytest.raises(ValueError, match="FLASH_LLM_DELTA_PARTS"):
        DeltaRows.from_dense(_w(256, 1024, 0.3))


def test_what_the_parts_layout_cannot_take_is_refused():
    w = _w(64, 100, 0.5)
    with pytest.raises(ValueError, match="parts"):
        DeltaRows.from_dense(w, parts=2)  # K % 8 != 0
    with pytest.raises(ValueError, match="parts"):
        DeltaRows.from_dense(_w(64, 128, 0.5), parts=2, splits=2)
    for bad in (3, 0, 32, True, 2.0):
        with pytest.raises(ValueError, match="parts"):
            DeltaRows.from_dense(_w(64, 128, 0.5), parts=bad)
    c = DeltaRows.from_dense(_w(64, 128, 0.5), parts=4)
    assert c.resplit(3).splits == 3 and c.resplit(3).parts == 1
    assert torch.equal(c.resplit(1, parts=8).to_dense(), c.to_dense())


def _damaged(c, what):
    data, off = c.data.clone(), c.offsets.clone()
    lay = c.layout
    perm0 = lay.slices + 1 + 18 * lay.slices
    if what == "trailer":
        data[-1] = 7
    elif what == "lanes-apart":  # lane 1 of row 0 given another row's lane
        off[perm0 + 1], off[perm0 + lay.parts] = off[perm0 + lay.parts].clone(), off[perm0 + 1].clone()
    elif what == "column-twice":  # lane 1 starts on lane 0's first column (two parts of one row hold it)
        starts = off[lay.slices + 1 + 2 * lay.slices: perm0].clone().view(torch.int16)
        starts[1] = starts[0]
        off[lay.slices + 1 + 2 * lay.slices: perm0] = starts.view(torch.int32)
    elif what == "data-cut":
        data = data[:-1]
    return {"data": data, "offsets": off}


@pytest.mark.parametrize("what, match", [("trailer", "trailer"), ("lanes-apart", "adjacent lanes"),
                                         ("column-twice", "twice"), ("data-cut", "describe")])
def test_damaged_parts_arrays_are_refused(what, match):
    w = _w(64, 256, 0.6, seed=3)
    w[:, 0] = 1.0  # every row's first part starts at column 0
    c = DeltaRows.from_dense(w, parts=2)
    with pytest.raises(FormatError, match=match):
        DeltaRows._validate(_damaged(c, what), c.shape, "", "")


def _kernel_model(c: DeltaRows, x: torch.Tensor, silu: bool) -> torch.Tensor:
    """What delta_rows_parts_body computes, lane by lane, in float64: lane l of slice t walks its entries from its
    start column (``entries()``: pads included, so every column it reads lies inside X), the P lanes of a row are summed
    (the butterfly), part 0's lane writes ``perm[32 t + l]`` (with SiLU x up, lanes below 16 only, times lane + 16's
    sum: the up row)."""
    lay = c.layout
    p = lay.parts
    rank, vals, cols = c.entries()
    assert int(cols.max()) < x.numel()
    acc = torch.zeros(lay.mp, dtype=torch.float64).index_add_(0, rank, vals.view(c.dtype).double() * x.double()[cols])
    tot = acc.view(-1, p).sum(1).repeat_interleave(p)  # every lane of a row holds its row's sum
    perm = c._offset_arrays()[3]
    y = torch.full((c.shape[0] // 2 if silu else c.shape[0],), float("nan"), dtype=torch.float64)
    for lane in range(lay.mp):
        row = int(perm[lane])
        if lane % p or row < 0 or (silu and lane % 32 >= 16):
            continue
        y[row] = torch.nn.functional.silu(tot[lane]) * tot[lane + 16] if silu else tot[lane]
    return y


@pytest.mark.parametrize("m, k, parts, pair", [(96, 512, 16, False), (128, 1024, 4, True), (64, 256, 8, True),
                                               (100, 2048, 2, False), (64, 512, 16, True)])
def test_the_kernels_lane_indexing_computes_the_product(m, k, parts, pair):
    """The layout read as delta_rows_parts_body reads it gives x @ W^T (silu(gate) * up when paired), every output
    written."""
    w = _w(m, k, 0.2, seed=m + k + parts)
    x = torch.randn(k, generator=torch.Generator().manual_seed(parts)).half()
    y = _kernel_model(DeltaRows.from_dense(w, parts=parts, pair_halves=pair), x, pair)
    ref = w.double() @ x.double()
    if pair:
        ref = torch.nn.functional.silu(ref[: m // 2]) * ref[m // 2:]
    assert not torch.isnan(y).any()
    assert torch.allclose(y, ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("model", sorted(bench.MODELS))
def test_harness_check_passes_right_outputs_and_catches_wrong_ones(model, monkeypatch):
    """The script's check on the CPU at 1/16 of the shapes, the launches replaced by the fp32 reference rounded to
    fp16 (right) or shifted by 1 (wrong): the bar passes the one and fails the other, per projection kind."""
    spec = dict(bench.MODELS[model])
    spec["H"] //= 16
    spec["kinds"] = [(k, m // 16, kk // 16, e, x, y) for k, m, kk, e, x, y in spec["kinds"]]
    monkeypatch.setattr(bench, "DEVICE", "cpu")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)

    def fake(shift):
        def step(lay, kind):
            lay[bench.spec(lay, kind)[5]].copy_((bench.reference(lay, kind) + shift).half())
        return step

    lay = bench.build(spec, 0.8, torch.Generator().manual_seed(0), bench.parse_parts(spec, "qkv=4"))
    assert lay["qkv"][1].parts == 4 and lay["qkv"][0].parts == 1
    monkeypatch.setattr(bench, "split_step", fake(0.0))
    monkeypatch.setattr(bench, "parts_step", fake(0.0))
    assert bench.check(lay)
    monkeypatch.setattr(bench, "parts_step", fake(1.0))
    assert not bench.check(lay)
    with pytest.raises(SystemExit):
        bench.parse_parts(spec, "qkv=3")


def test_parts_kernels_stage_choices(monkeypatch):
    """The parts layout's N = 1 kernel stages 16-bit X unless fp32 is asked for and fits; its multi-token kernel
    stages all of K (rounded up to 8) while NT x 2 bytes a column fit 96 KB, else reads X from global memory."""
    from flash_llm import kernels as kern

    monkeypatch.setattr(kern, "PARTS_STAGE", 0)
    assert [kern.parts_stage(k) for k in (64, 4096, 28672)] == [2, 2, 2]
    monkeypatch.setattr(kern, "PARTS_STAGE", 1)
    assert [kern.parts_stage(k) for k in (64, 4096, 24576, 24584)] == [1, 1, 1, 2]
    assert kern.parts_nt_window(4096, 8) == 4096 and kern.parts_nt_window(4092, 2) == 4096
    assert kern.parts_nt_window(6144, 8) == 6144 and kern.parts_nt_window(6152, 8) == 0  # 96 KB at NT = 8
    assert kern.parts_nt_window(24576, 2) == 24576 and kern.parts_nt_window(24584, 2) == 0


def test_split_layout_multi_token_window_is_the_weights_widest(monkeypatch):
    """The split layout's multi-token kernels stage the weight's widest block window, rounded up to 8 and capped at
    DR_NT_WINDOW_BYTES (NT x 2 bytes a column), read from the offsets once and remembered on the tensor itself."""
    from flash_llm import DeltaRows
    from flash_llm import kernels as kern
    from flash_llm.formats import delta_rows as D

    g = torch.Generator().manual_seed(3)
    w = torch.randn(300, 6144, generator=g).half()
    w[torch.rand(300, 6144, generator=g) < 0.8] = 0
    d = DeltaRows.from_dense(w, splits=3)
    lay = D.layout(300, d.offsets.numel(), d.data.numel())
    widest = D.block_window_max(d._offset_arrays()[1])
    assert widest % 8 == 0 and 1536 < widest <= 3072
    got = [kern.split_nt_window(d.offsets, lay.slices, lay.splits, nt) for nt in (2, 4, 8)]
    assert got == [widest, widest, widest]  # (up to 3072 columns at NT = 8: 48 KB)
    monkeypatch.setattr(kern, "DR_NT_WINDOW_BYTES", 24 * 1024)
    assert [kern.split_nt_window(d.offsets, lay.slices, lay.splits, nt) for nt in (2, 4, 8)] == [widest, widest, 1536]
    monkeypatch.setattr(kern, "DR_NT_WINDOW_BYTES", 48 * 1024)
    memo = getattr(d.offsets, kern._WINDOW_ATTR)
    assert memo == {(lay.slices, lay.splits): widest}  # read once
    memo[(lay.slices, lay.splits)] = 100
    assert kern.split_nt_window(d.offsets, lay.slices, lay.splits, 2) == 104  # remembered, not read again
    monkeypatch.setattr(kern, "DR_NT_WINDOW_BYTES", 4096)
    assert kern.split_nt_window(d.offsets, lay.slices, lay.splits, 8) == 104 and \
        kern.split_nt_window(DeltaRows.from_dense(w, splits=3).offsets.clone(), lay.slices, lay.splits, 8) == 256


def test_split_layout_window_is_not_taken_from_a_freed_tensor_at_the_same_address():
    """Another tensor at a remembered tensor's address, of the same size (a freed weight's memory reused by the next
    one), reads its own window: until session 63 the window was remembered by address and size, and OPT-30B's fc2
    took o's (most blocks then read X from global memory, 2.8x slower)."""
    from flash_llm import DeltaRows
    from flash_llm import kernels as kern
    from flash_llm.formats import delta_rows as D

    g = torch.Generator().manual_seed(4)
    w = torch.randn(300, 6144, generator=g).half()
    w[torch.rand(300, 6144, generator=g) < 0.8] = 0
    d = DeltaRows.from_dense(w, splits=3)
    lay = D.layout(300, d.offsets.numel(), d.data.numel())
    widest = D.block_window_max(d._offset_arrays()[1])
    getattr(d.offsets, kern._WINDOW_ATTR, {}).clear()
    setattr(d.offsets, kern._WINDOW_ATTR, {(lay.slices, lay.splits): 8})  # as if an older weight's
    assert kern.split_nt_window(d.offsets, lay.slices, lay.splits, 2) == 8
    again = d.offsets.view_as(d.offsets)  # the same address and size, another tensor
    assert again.data_ptr() == d.offsets.data_ptr() and again.numel() == d.offsets.numel()
    assert kern.split_nt_window(again, lay.slices, lay.splits, 2) == widest


def test_python_mirrors_of_the_delta_rows_kernel_constants():
    """kernels.DR_WARPS / DR_WMAX and the mode bits are spmm.cu's (the launchers size grids and windows by them)."""
    import re
    from pathlib import Path

    from flash_llm import kernels as kern

    src = (Path(kern.__file__).parent / "spmm.cu").read_text()

    def const(name):
        return int(re.search(rf"constexpr int [^;]*\b{name} = (\d+)", src).group(1))

    assert (const("DR_WARPS"), const("DR_WMAX")) == (kern.DR_WARPS, kern.DR_WMAX)
    assert [const(n) for n in ("DR_RESID", "DR_RMS", "DR_SILU", "DR_LN", "DR_RELU")] == [
        kern._DR_RESID, kern._DR_RMS, kern._DR_SILU, kern._DR_LN, kern._DR_RELU]

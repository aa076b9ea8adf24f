"""DeltaRows with coded values (``DeltaRows.code_values``): exact round trips at every lane count, what it refuses,
the kernels' decode (``dr_decode_coded`` in spmm.cu) mirrored bit for bit, serialization of the plain values, the
CPU product, and the engine's opt-in coding.  The GPU kernels are checked in ``tests/test_delta_rows_gpu.py``."""

from __future__ import annotations

import pytest
import torch

import flash_llm
from flash_llm import DeltaRows
from flash_llm.formats.delta_rows import (CODED_GROUP_WORDS, GROUP_WORDS, LANES, code_values, layout,
                                          uncode_values)


def _pruned(m: int, k: int, density: float, seed: int, dtype=torch.bfloat16) -> torch.Tensor:
    """normal values pruned by magnitude (the large ones kept, as in a pruned model), in ``dtype``"""
    w = torch.randn(m, k, generator=torch.Generator().manual_seed(seed))
    t = float(torch.special.ndtri(torch.tensor(1.0 - density / 2, dtype=torch.float64)))
    w[w.abs() < t] = 0.0
    return w.to(dtype)


def _encode(w: torch.Tensor, parts: int, pair: bool = False) -> DeltaRows:
    return DeltaRows.from_dense(w, pair_halves=pair, **({"parts": parts} if parts > 1 else {"splits": 3}))


@pytest.mark.parametrize("parts", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("pair", [False, True])
@pytest.mark.parametrize("density", [0.5, 0.2, 0.05])
def test_round_trip_every_lane_count(parts, pair, density):
    w = _pruned(128, 512, density, seed=parts * 7 + pair)
    w[3, 5] = -w[3, 5].abs() - 1  # negative values keep their sign
    plain = _encode(w, parts, pair)
    c = plain.code_values()
    assert c is not None and c.coded and not plain.coded
    assert (c.parts, c.splits, c.paired) == (plain.parts, plain.splits, plain.paired)
    assert torch.equal(c.to_dense().view(torch.int16), w.view(torch.int16))
    assert torch.equal(uncode_values(c.data, c.offsets, 128), plain.data)
    # 2 bytes an entry instead of 2.5, plus a table of 8 bytes a row and the trailer
    groups = int(plain.offsets[plain.layout.slices])
    assert c.data.numel() * 4 <= groups * CODED_GROUP_WORDS * 4 + 8 * plain.layout.mp // parts + 4 * (GROUP_WORDS + 32)
    assert c.nbytes < plain.nbytes


def test_coding_in_chunks_gives_the_same_words(monkeypatch):
    from flash_llm.formats import delta_rows as D

    plain = _encode(_pruned(256, 1024, 0.3, seed=4), 4, pair=True)
    whole = code_values(plain.data, plain.offsets, 256)
    groups = int(plain.offsets[plain.layout.slices])
    monkeypatch.setattr(D, "CODE_CHUNK_GROUPS", 7)
    assert groups > 7 * 3 and torch.equal(code_values(plain.data, plain.offsets, 256), whole)
    w = _pruned(256, 1024, 0.3, seed=4)
    w[200, 3] = 2.0 ** -30  # (in the last chunks: the span check sees every chunk)
    assert code_values(*(lambda d: (d.data, d.offsets))(_encode(w, 4, pair=True)), 256) is None


def test_layout_tells_coded_from_plain_by_sizes():
    for parts in (1, 2, 4, 8, 16):
        plain = _encode(_pruned(64, 256, 0.3, seed=parts), parts)
        c = plain.code_values()
        assert not layout(64, plain.offsets.numel(), plain.data.numel()).coded
        lay = layout(64, c.offsets.numel(), c.data.numel())
        assert lay.coded and lay.parts == parts and lay.splits == plain.splits
        assert c.data.numel() % GROUP_WORDS == parts + 16
        assert bool((c.data[-(parts + 16):] == parts + 16).all())


def test_what_cannot_be_coded_is_left_plain():
    assert _encode(_pruned(64, 256, 0.3, seed=1, dtype=torch.float16), 1).code_values() is None  # fp16
    w = _pruned(64, 256, 0.3, seed=2)
    w[7, 9] = 2.0 ** -20  # row 7 spans more than 7 steps of e7..e1 (14 binades)
    assert _encode(w, 1).code_values() is None
    assert _encode(w, 2).code_values() is None
    w[7, 9] = 0.0
    assert _encode(w, 1).code_values() is not None
    # values spanning exactly 7 steps in one row (14 binades), and extremes of the range (a subnormal, the largest
    # finite)
    w = torch.zeros(64, 256, dtype=torch.bfloat16)
    w[0, :14] = torch.tensor([(-1) ** e * 2.0 ** e for e in range(-7, 7)], dtype=torch.bfloat16)
    w[1, 0] = torch.finfo(torch.bfloat16).max
    w[1, 1] = -torch.finfo(torch.bfloat16).max
    w[2, 0] = torch.finfo(torch.bfloat16).smallest_normal / 4  # subnormal
    c = _encode(w, 1).code_values()
    assert c is not None and torch.equal(c.to_dense().view(torch.int16), w.view(torch.int16))
    with pytest.raises(ValueError, match="plain"):
        code_values(c.data, c.offsets, 64)


def _prmt(x: int, y: int, sel: int) -> int:
    """PTX ``prmt.b32`` (default mode: a selector nibble's bit 3 replicates the chosen byte's sign), as
    ``__byte_perm``; the low 16 bits of ``sel`` select"""
    b = [(x >> (8 * i)) & 0xFF for i in range(4)] + [(y >> (8 * i)) & 0xFF for i in range(4)]
    out = 0
    for n in range(4):
        nib = (sel >> (4 * n)) & 15
        v = b[nib & 7]
        out |= ((0xFF if v & 0x80 else 0) if nib & 8 else v) << (8 * n)
    return out


def _decode_like_the_kernel(q: list[int], lut: tuple[int, int]) -> list[int]:
    """spmm.cu's dr_decode_coded on one lane's 16 bytes: the plain group's four value words"""
    sel = q[2] & 0x77777777
    h03 = _prmt(lut[0], lut[1], sel & 0xFFFF) | (q[2] & 0x80808080)
    h47 = _prmt(lut[0], lut[1], sel >> 16) | ((q[2] << 4) & 0x80808080)
    return [_prmt(q[0], h03, 0x5140), _prmt(q[0], h03, 0x7362), _prmt(q[1], h47, 0x5140), _prmt(q[1], h47, 0x7362)]


@pytest.mark.parametrize("parts", [1, 4])
def test_the_kernels_decode_gives_the_plain_words(parts):
    w = _pruned(64, 384, 0.3, seed=11 + parts)
    w[5, :3] = torch.tensor([-1.5, 0.3, -0.2])  # (within 7 exponents of the row's largest)
    plain = _encode(w, parts)
    c = plain.code_values()
    lay = c.layout
    groups = int(c.offsets[lay.slices])
    goff = [int(v) for v in c.offsets[: lay.slices + 1]]
    coded = [int(v) & 0xFFFFFFFF for v in c.data]
    ref = [int(v) & 0xFFFFFFFF for v in plain.data]
    luts = coded[groups * CODED_GROUP_WORDS:]
    for g in range(groups):
        sl = max(i for i in range(lay.slices) if goff[i] <= g)
        for lane in range(LANES):
            q = coded[g * CODED_GROUP_WORDS + 4 * lane: g * CODED_GROUP_WORDS + 4 * lane + 4]
            r = (sl * LANES + lane) // parts
            words = _decode_like_the_kernel(q, (luts[2 * r], luts[2 * r + 1]))
            assert words == ref[g * GROUP_WORDS + 4 * lane: g * GROUP_WORDS + 4 * lane + 4], (g, lane)
            assert q[3] == ref[g * GROUP_WORDS + 128 + lane]  # the steps word


def test_state_writes_the_plain_values(tmp_path):
    plain = _encode(_pruned(128, 256, 0.2, seed=5), 2, pair=True)
    c = plain.code_values()
    tensors, meta = c.state("w.")
    assert torch.equal(tensors["w.data"], plain.data)
    c.save(tmp_path / "w.safetensors")
    back = flash_llm.load(tmp_path / "w.safetensors")
    assert not back.coded and torch.equal(back.to_dense().view(torch.int16), c.to_dense().view(torch.int16))


def test_cpu_product_matches_the_plain_weight():
    w = _pruned(64, 256, 0.25, seed=9)
    plain = _encode(w, 2)
    c = plain.code_values()
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    assert torch.equal(flash_llm.spmm(x, c), flash_llm.spmm(x, plain))


def test_code_delta_rows_codes_the_bf16_layers_in_place():
    from flash_llm.engine import code_delta_rows
    from flash_llm.nn import SparseLinear

    model = torch.nn.Sequential(SparseLinear(_encode(_pruned(64, 128, 0.2, seed=1), 2)),
                                SparseLinear(_encode(_pruned(64, 64, 0.2, seed=2, dtype=torch.float16), 1)))
    before = [m.to_dense().clone() for m in model]
    assert code_delta_rows(model) == ["0"]
    assert model[0].weight.coded and not model[1].weight.coded
    for m, d in zip(model, before):
        assert torch.equal(m.to_dense().view(torch.int16), d.view(torch.int16))
    assert code_delta_rows(model) == []


def test_checkpoint_writers_take_the_coded_layers_plain_copies_on_the_cpu(monkeypatch):
    """state_to_save (save_pretrained, the sparse-bitmask writer) asks state_dict() under plain_state_on_cpu, where a
    coded layer's plain copies are moved to the CPU as each is made (so a GPU holds one layer's at a time); the switch
    is per thread and put back after, nested or not, and state_dict() outside it is unchanged."""
    from flash_llm import nn as fnn
    from flash_llm.checkpoint import _model
    from flash_llm.engine import code_delta_rows
    from flash_llm.nn import SparseLinear, plain_state_on_cpu

    src = torch.nn.Sequential(SparseLinear(_encode(_pruned(64, 128, 0.2, seed=1), 2), bias=None))
    code_delta_rows(src)
    seen = []
    real = SparseLinear._save_to_state_dict
    monkeypatch.setattr(SparseLinear, "_save_to_state_dict",
                        lambda self, *a: seen.append(getattr(fnn._SAVING, "on", False)) or real(self, *a))
    state, sparse = _model.state_to_save(src)
    assert seen == [True] and list(sparse) == ["0"] and not fnn._SAVING.on
    assert torch.equal(state["0.weight_data"], src.state_dict()["0.weight_data"]) and seen == [True, False]
    moved = []
    real_to = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: moved.append(a) or real_to(self, *a, **k))
    with plain_state_on_cpu():
        with plain_state_on_cpu():
            assert fnn._SAVING.on
        assert fnn._SAVING.on
        src.state_dict()
    assert not fnn._SAVING.on and ("cpu",) in moved


def test_a_coded_models_state_dict_and_checkpoint_hold_the_plain_values(tmp_path):
    """The engine codes its layers in place; saving such a model writes the plain values (the files' format), and
    they load back into a fresh model, a coded one included, as the same weights."""
    from flash_llm.engine import code_delta_rows
    from flash_llm.nn import SparseLinear

    def model():
        return torch.nn.Sequential(SparseLinear(_encode(_pruned(64, 128, 0.2, seed=1), 2), bias=None),
                                   SparseLinear(_encode(_pruned(96, 64, 0.3, seed=2), 1), bias=None))

    src = model()
    plain = {k: v.clone() for k, v in src.state_dict().items() if isinstance(v, torch.Tensor)}
    assert code_delta_rows(src) == ["0", "1"]
    sd = src.state_dict()
    for k, v in plain.items():
        assert torch.equal(sd[k], v), k
    assert src[0].weight.coded  # saving left the buffers coded
    dst = model()
    code_delta_rows(dst)
    dst.load_state_dict(sd)
    for a, b in zip(src, dst):
        assert not b.weight.coded and torch.equal(a.to_dense().view(torch.int16), b.to_dense().view(torch.int16))
    flash_llm.save_pretrained(src, tmp_path / "ckpt", config={"model_type": "toy"})
    back = model()
    from flash_llm.checkpoint import load_checkpoint
    load_checkpoint(back, tmp_path / "ckpt", progress=False)
    for a, b in zip(src, back):
        assert torch.equal(a.to_dense().view(torch.int16), b.to_dense().view(torch.int16))

"""benchmarks/dr_parts_proto.py (session 29 prototype, timed on a GPU by the script): its encoder walked back to the
dense weight, and its kernels compiled for sm_80 / sm_90 without spills (NVRTC needs no GPU)."""

import importlib.util
import os

import pytest
import torch

_path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "dr_parts_proto.py")
_spec = importlib.util.spec_from_file_location("dr_parts_proto", _path)
proto = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(proto)


@pytest.mark.parametrize("m, k, density, parts, pair", [
    (64, 64, 0.5, 2, False), (100, 520, 0.2, 4, False), (128, 4096, 0.2, 16, True), (96, 1000, 0.01, 8, False),
    (64, 64, 1.0, 16, False), (32, 64, 0.0, 4, False), (64, 2048, 0.03, 16, True), (40, 3000, 0.2, 8, False)])
def test_encoding_walks_back_to_the_weight(m, k, density, parts, pair):
    gen = torch.Generator().manual_seed(m * k + parts)
    w = (torch.randn(m, k, generator=gen) * (torch.rand(m, k, generator=gen) < density)).half()
    w[0, k - 1] = 3.0  # the last column, and a gap of K - 1 from the row's previous entry (escapes)
    w = w.masked_fill(w == 0, 0)  # (-0.0 is dropped as a zero)
    enc = proto.encode(w, parts, pair)
    assert torch.equal(proto.decode(enc).view(torch.int16), w.view(torch.int16))
    assert enc["entries"] >= int((w != 0).sum()) and enc["padded"] % (proto.GROUP * proto.LANES) == 0
    lanes = enc["slices"] * proto.LANES
    assert enc["starts"].numel() == lanes and enc["rows"].numel() == lanes // parts
    valid = enc["rows"][enc["rows"] >= 0].long()
    assert torch.equal(torch.sort(valid).values, torch.arange(m))  # every row once
    if pair:  # each slice's second half holds the up rows of its first half
        r = enc["rows"].view(enc["slices"], -1).long()
        half = r.shape[1] // 2
        g, u = r[:, :half], r[:, half:]
        assert torch.equal(torch.where(g >= 0, g + m // 2, g), u)


def test_kernels_compile_without_spills():
    for arch in ("sm_80", "sm_90"):
        res = {n: r for n, r in proto.compile_source(arch, use_cache=False).resources().items() if n.startswith("drp_")}
        assert len(res) == 8
        for name, r in res.items():
            assert r["spill_stores"] == 0 and r["spill_loads"] == 0 and r["registers"] <= 64, (arch, name, r)


@pytest.mark.parametrize("model", sorted(proto.MODELS))
def test_harness_check_passes_right_outputs_and_catches_wrong_ones(model, monkeypatch):
    """The script's check on the CPU at 1/16 of the shapes, the launches replaced by the fp32 reference rounded to
    fp16 (right) or shifted by 1 (wrong): the bar passes the one and fails the other, per projection kind."""
    spec = dict(proto.MODELS[model])
    spec["H"] //= 16
    spec["kinds"] = [(k, m // 16, kk // 16, e, x, y, p) for k, m, kk, e, x, y, p in spec["kinds"]]
    monkeypatch.setattr(proto, "DEVICE", "cpu")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)

    def fake(shift):
        def step(lay, kind):
            lay[proto.spec(lay, kind)[5]].copy_((proto.reference(lay, kind) + shift).half())
        return step

    lay = proto.build(spec, 0.8, torch.Generator().manual_seed(0), proto.parse_parts(spec, ""))
    monkeypatch.setattr(proto, "lib_step", fake(0.0))
    monkeypatch.setattr(proto, "proto_step", fake(0.0))
    assert proto.check(lay)
    monkeypatch.setattr(proto, "proto_step", fake(1.0))
    assert not proto.check(lay)
    with pytest.raises(SystemExit):
        proto.parse_parts(spec, "qkv=3")


def _kernel_model(enc, x, silu):
    """What drp_body computes, lane by lane, in float64: each lane walks its stream from its start column
    (proto.lane_streams), the P lanes of a row are summed, part 0's lane writes its row (with SiLU x up, lanes below
    16 pair with lane + 16, the up row's)."""
    parts = enc["parts"]
    R = proto.LANES // parts
    y = torch.full((enc["m"] // 2 if silu else enc["m"],), float("nan"), dtype=torch.float64)
    for t in range(enc["slices"]):
        acc = torch.zeros(proto.LANES, dtype=torch.float64)
        lanes = proto.lane_streams(enc, t)
        if lanes is not None:
            vals, cols, _ = lanes
            assert int(cols.max()) < x.numel()  # (the kernel reads X's staged copy there: pads included)
            acc = (vals.view(torch.float16).double() * x.double()[cols]).sum(1)
        tot = acc.view(R, parts).sum(1)  # the butterfly: every lane of a row holds its row's sum
        for i in range(R):
            lane = i * parts
            row = int(enc["rows"][t * R + i])
            if row < 0 or (silu and lane >= 16):
                continue
            y[row] = torch.nn.functional.silu(tot[i]) * tot[(lane + 16) // parts] if silu else tot[i]
    return y


@pytest.mark.parametrize("m, k, parts, pair", [(96, 512, 16, False), (128, 1024, 4, True), (64, 256, 8, True),
                                               (100, 2048, 2, False)])
def test_the_kernels_lane_indexing_computes_the_product(m, k, parts, pair):
    """The layout read as drp_body reads it (rows[slice R + lane / P], starts[32 slice + lane], the P-lane sums, the
    SiLU pairing across the warp's halves) gives x @ W^T (silu(gate) * up when paired), every output written."""
    gen = torch.Generator().manual_seed(m + k + parts)
    w = (torch.randn(m, k, generator=gen) * (torch.rand(m, k, generator=gen) < 0.2)).half()
    x = torch.randn(k, generator=gen).half()
    y = _kernel_model(proto.encode(w, parts, pair), x, pair)
    ref = w.double() @ x.double()
    if pair:
        ref = torch.nn.functional.silu(ref[: m // 2]) * ref[m // 2:]
    assert not torch.isnan(y).any()
    assert torch.allclose(y, ref, rtol=1e-9, atol=1e-9)

"""Session 78's formats hunt: a SparseLinear load that cast a bias to the loaded dtype without the lossless-cast
check (a finite bias became inf), operations on a meta-device weight that failed inside torch, a meta fp32 bias
that crashed ``SparseLinear(weight, bias)``, and the DeltaRows width limit reported through SparseLinear in the
format's own words (``w``, ``K``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import flash_llm
from flash_llm import BitmapTiles, DeltaRows, SparseLinear, TiledCSL
from flash_llm.nn import cast_loss

M, K = 32, 64


def _weight(dtype=torch.float16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(M, K, generator=g)
    w[w.abs() < 1] = 0
    return w.to(dtype)


def _snapshot(layer: SparseLinear) -> dict:
    """Everything a load could change: the buffers (dtype and bits) and the format, dtype and count."""
    bufs = {n: (t.dtype, t.clone()) for n, t in layer._buffers.items() if t is not None}
    return {"bufs": bufs, "attrs": (layer.weight_format, layer.weight_dtype, layer.nnz)}


def _assert_unchanged(layer: SparseLinear, before: dict) -> None:
    assert (layer.weight_format, layer.weight_dtype, layer.nnz) == before["attrs"]
    assert set(n for n, t in layer._buffers.items() if t is not None) == set(before["bufs"])
    for n, (dt, t) in before["bufs"].items():
        now = layer._buffers[n]
        assert now.dtype == dt and torch.equal(now, t), n


# ---------------------------------------------------------------------------------------------------
# 1. load_state_dict: a bias cast to the loaded dtype that is not exact is refused, the layer unchanged
# ---------------------------------------------------------------------------------------------------
def test_load_refuses_to_overflow_the_kept_bias():
    """strict=False, no bias in an fp16 state dict: the layer's bf16 bias of 1e5 would become inf in fp16."""
    w = _weight()
    layer = SparseLinear.from_dense(w.to(torch.bfloat16), torch.full((M,), 1e5), dtype=torch.bfloat16)
    before = _snapshot(layer)
    sd = SparseLinear.from_dense(w, None).state_dict()
    with pytest.raises(RuntimeError, match=r"bias \(this layer's own, kept: the state dict has none\) cannot be cast "
                                           r"to the weight's dtype torch.float16 exactly to rounding: 32 finite "
                                           r"value\(s\) overflow to inf.*nothing was loaded"):
        layer.load_state_dict(sd, strict=False)
    _assert_unchanged(layer, before)
    assert torch.isfinite(layer.bias.float()).all()


@pytest.mark.parametrize("assign", [False, True])
def test_load_refuses_a_lossy_checkpoint_bias(assign):
    """A checkpoint bias of another dtype (fp32) that overflows / flushes in the layer's fp16: copied (assign=False)
    or assigned and cast (assign=True), it became inf / 0; now an error naming the key, nothing loaded."""
    sd = SparseLinear.from_dense(_weight(seed=1), torch.zeros(M, dtype=torch.float16)).state_dict()
    for bad, what in ((torch.full((M,), 1e5), "overflow to inf"), (torch.full((M,), 1e-30), "flush to zero")):
        layer = SparseLinear.from_dense(_weight(seed=2), torch.ones(M, dtype=torch.float16), fmt="tiled-csl")
        before = _snapshot(layer)
        with pytest.raises(RuntimeError, match=rf"(?s)\tbias cannot be cast to the weight's dtype torch.float16 "
                                               rf"exactly to rounding: 32 .*{what}"):
            layer.load_state_dict(dict(sd, bias=bad), assign=assign)
        _assert_unchanged(layer, before)
        with pytest.raises(RuntimeError, match=what):  # a state dict of the bias alone (strict=False) too
            layer.load_state_dict({"bias": bad}, strict=False, assign=assign)
        _assert_unchanged(layer, before)


def test_load_refuses_under_a_prefix_naming_the_key():
    model = nn.Sequential(SparseLinear.from_dense(_weight(), torch.ones(M, dtype=torch.float16)))
    sd = dict(model.state_dict(), **{"0.bias": torch.full((M,), -7e4)})
    with pytest.raises(RuntimeError, match=r"\t0\.bias cannot be cast to the weight's dtype torch.float16"):
        model.load_state_dict(sd)


@pytest.mark.parametrize("assign", [False, True])
def test_load_keeps_exact_bias_casts(assign):
    """What fits (fp32 values within fp16's range, rounded) loads as before, cast to the weight's dtype."""
    src = SparseLinear.from_dense(_weight(seed=3), torch.zeros(M, dtype=torch.float16))
    b = torch.linspace(-6e4, 6e4, M)
    layer = SparseLinear.zeros(K, M)
    layer.load_state_dict(dict(src.state_dict(), bias=b), assign=assign)
    assert layer.bias.dtype == torch.float16 and torch.equal(layer.bias, b.half())
    kept = SparseLinear.from_dense(_weight(torch.bfloat16), torch.full((M,), 1e4), dtype=torch.bfloat16)
    res = kept.load_state_dict(SparseLinear.from_dense(_weight(), None).state_dict(), strict=False, assign=assign)
    assert res.missing_keys == ["bias"] and kept.weight_dtype == torch.float16
    assert torch.equal(kept.bias, torch.full((M,), 1e4, dtype=torch.bfloat16).half())


# ---------------------------------------------------------------------------------------------------
# 2. operations that read a meta weight's values: the clear refusal, not NotImplementedError / RuntimeError
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [BitmapTiles, TiledCSL, DeltaRows], ids=lambda c: c.__name__)
def test_meta_weight_reads_are_refused_clearly(cls, tmp_path):
    w = cls.zeros(M, K, dtype=torch.bfloat16, device="meta")
    path = tmp_path / "w.safetensors"
    msg = "is on the meta device \\(no values to read\\); load its arrays first"
    with pytest.raises(ValueError, match=rf"^save: the weight {msg}"):
        w.save(path)
    with pytest.raises(ValueError, match=rf"^save: weights\['b'\] {msg}"):
        flash_llm.save({"a": cls.zeros(M, K), "b": w}, path)
    assert not path.exists()
    with pytest.raises(ValueError, match=rf"^to\('cpu'\): the weight {msg}"):
        w.to("cpu")
    with pytest.raises(ValueError, match=rf"^l2_streams: the weight {msg}"):
        w.l2_streams()
    if cls is DeltaRows:
        for name in ("code_values", "entries"):
            with pytest.raises(ValueError, match=rf"^{name}: the weight {msg}"):
                getattr(w, name)()
        with pytest.raises(ValueError, match=rf"^resplit: the weight {msg}"):
            w.resplit(2)
    # what needs no values still works: staying on meta, going there, real weights
    assert w.to("meta") is w and w.to() is w
    real = cls.zeros(M, K, dtype=torch.bfloat16)
    moved = real.to("meta")
    assert moved.device.type == "meta" and moved.shape == (M, K)
    real.save(path)
    assert flash_llm.load(path).nnz == 0
    assert real.l2_streams()[0]


# ---------------------------------------------------------------------------------------------------
# 3. SparseLinear(meta weight, meta bias of another dtype): cast by dtype, no value check
# ---------------------------------------------------------------------------------------------------
def test_meta_bias_of_another_dtype_is_cast_without_a_value_check():
    w = BitmapTiles.zeros(M, K, device="meta")
    layer = SparseLinear(w, torch.zeros(M, device="meta"))  # fp32, as nn.Linear(device="meta") makes
    assert layer.bias.is_meta and layer.bias.dtype == torch.float16
    assert cast_loss(torch.zeros(3, device="meta"), torch.zeros(3, dtype=torch.float16, device="meta")) is None
    src = SparseLinear.from_dense(_weight(seed=4), torch.ones(M, dtype=torch.float16))
    layer.load_state_dict(src.state_dict(), assign=True)  # the shell loads
    x = torch.randn(2, K).half()
    assert torch.equal(layer(x), src(x))


# ---------------------------------------------------------------------------------------------------
# 4. DeltaRows' 16-bit columns through SparseLinear: named as the caller passed them
# ---------------------------------------------------------------------------------------------------
def test_delta_rows_width_limit_names_the_sparse_linear_arguments():
    tail = "70000 >= 65536: DeltaRows stores 16-bit columns \\(use fmt='bitmap' or 'tiled-csl' for it\\)"
    with pytest.raises(ValueError, match=rf"^in_features {tail}$"):
        SparseLinear.zeros(70000, 4, fmt="delta-rows")
    with pytest.raises(ValueError, match=rf"^in_features \(weight.shape\[1\]\) {tail}$"):
        SparseLinear.from_dense(torch.zeros(4, 70000, dtype=torch.float16), fmt="delta-rows")
    lin = nn.Linear(70000, 4, bias=False, dtype=torch.float16, device="meta").to_empty(device="cpu")
    with pytest.raises(ValueError, match=rf"^in_features \(linear.weight.shape\[1\]\) {tail}$"):
        SparseLinear.from_linear(lin, fmt=DeltaRows)
    # the formats' own API keeps its own words, and what fits still builds
    with pytest.raises(ValueError, match="K = 70000 does not fit DeltaRows' 16-bit columns"):
        DeltaRows.zeros(4, 70000)
    assert SparseLinear.zeros(65535, 1, fmt="delta-rows", device="meta").in_features == 65535

"""The raw ops (``torch.ops.flash_llm.*``, reachable from an exported graph without :func:`flash_llm.spmm`'s checks)
refuse arrays that are no weight of the format, shape and dtype they are told, in their CPU and fake kernels alike;
format subclasses, meta weights and ``save``'s names (session 72's bug hunt).  CPU."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import flash_llm
from flash_llm.formats import BitmapTiles, DeltaRows, TiledCSL, save

OPS = torch.ops.flash_llm
FMT = {BitmapTiles: 0, TiledCSL: 1, DeltaRows: 2}


def _weight(cls, m=48, k=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, k, generator=g).half()
    w[torch.rand(m, k, generator=g) < 0.7] = 0
    return w, cls.from_dense(w)


def _both(fn):
    """The error of ``fn`` run on the real tensors, and on fakes of them (the fake kernel's)."""
    errors = []
    for fake in (False, True):
        try:
            if fake:
                with FakeTensorMode(allow_non_fake_inputs=True):
                    fn()
            else:
                fn()
            errors.append(None)
        except ValueError as e:
            errors.append(str(e))
    return errors


@pytest.mark.parametrize("cls,other", [(BitmapTiles, TiledCSL), (TiledCSL, DeltaRows), (DeltaRows, BitmapTiles)],
                         ids=lambda c: c.__name__)
def test_arrays_of_another_format_are_refused(cls, other):
    _, w = _weight(cls)
    x = torch.randn(3, 64).half()
    errs = _both(lambda: OPS.spmm(x, w.data, w.offsets, FMT[other], 48, 64, None))
    assert all(e and "data / offsets are not the arrays" in e for e in errs), errs
    assert OPS.spmm(x, w.data, w.offsets, FMT[cls], 48, 64, None).shape == (3, 48)


@pytest.mark.parametrize("case", ["x_fp32", "bias_shape", "bias_dtype", "m_tiles", "data_int64", "k_zero"])
def test_raw_spmm_names_a_bad_argument(case):
    _, w = _weight(BitmapTiles)
    x = torch.randn(3, 64).half()
    args = dict(x=x, data=w.data, offsets=w.offsets, fmt=0, m=48, k=64, bias=None)
    want = {"x_fp32": "x must be float16", "bias_shape": "bias must be", "bias_dtype": "bias must be",
            "m_tiles": "data / offsets", "data_int64": "data must be", "k_zero": "must be 2-D"}[case]
    if case == "x_fp32":
        args["x"] = x.float()
    elif case == "bias_shape":
        args["bias"] = torch.ones(1).half()
    elif case == "bias_dtype":
        args["bias"] = torch.ones(48).bfloat16()
    elif case == "m_tiles":
        args["m"] = 80  # (another count of 16-row strips)
    elif case == "data_int64":
        args["data"] = w.data.long()
    elif case == "k_zero":
        args["k"] = 0
    errs = _both(lambda: OPS.spmm(*args.values()))
    assert all(e and want in e for e in errs), errs


def test_fused_raw_ops_check_what_their_cuda_path_checks():
    """spmm_silu_mul with an odd m, spmm_rms_norm with a norm weight not [K], spmm_add_ with acc not [N, M] in x's
    dtype: refused by the CPU and the fake kernel alike (the fake answered shapes the real one never makes)."""
    _, w = _weight(BitmapTiles, m=41)
    _, w48 = _weight(BitmapTiles, m=48)
    x = torch.randn(3, 64).half()
    cases = {
        "silu_mul needs an even m": lambda: OPS.spmm_silu_mul(x, w.data, w.offsets, 0, 41, 64),
        "norm weight must be [64]": lambda: OPS.spmm_rms_norm(x, torch.ones(1).half(), 1e-5, w48.data, w48.offsets,
                                                              0, 48, 64, False),
        "acc must be [3, 48]": lambda: OPS.spmm_add_(torch.zeros(3, 1).half(), x, w48.data, w48.offsets, 0, 48, 64),
        "acc must be [3, 48] in torch.float16": lambda: OPS.spmm_add_(torch.zeros(3, 48), x, w48.data, w48.offsets,
                                                                       0, 48, 64),
    }
    for want, fn in cases.items():
        errs = _both(fn)
        assert all(e and want in e for e in errs), (want, errs)


def test_a_subclass_of_a_format_runs_as_its_format():
    class MyTiles(BitmapTiles):
        pass

    dense, w = _weight(BitmapTiles)
    mine = MyTiles._from_parts(w.tensors(), w.shape, w.dtype, w.nnz)
    x = torch.randn(5, 64).half()
    assert torch.equal(flash_llm.spmm(x, mine), flash_llm.spmm(x, w))


@pytest.mark.parametrize("cls", [BitmapTiles, TiledCSL, DeltaRows], ids=lambda c: c.__name__)
def test_meta_weights_say_what_needs_values(cls):
    w = cls.zeros(64, 128, dtype=torch.float16, device="meta")
    dense = w.to_dense()
    assert dense.is_meta and dense.shape == (64, 128) and dense.dtype == torch.float16
    assert w.slice() is w
    with pytest.raises(ValueError, match="slice: the weight is on the meta device"):
        w.slice(rows=(0, 32))
    with pytest.raises(ValueError, match=r"concat: parts\[0\] is on the meta device"):
        cls.concat([w, w])
    with pytest.raises(ValueError, match="w is on the meta device"):
        cls.from_dense(torch.empty(64, 128, dtype=torch.float16, device="meta"))


def test_save_refuses_an_empty_name(tmp_path):
    _, w = _weight(BitmapTiles)
    with pytest.raises(ValueError, match="names must be non-empty"):
        save({"": w}, tmp_path / "w.safetensors")
    assert not (tmp_path / "w.safetensors").exists()


def test_sparse_linear_state_with_a_non_string_format_is_a_load_error():
    """A corrupt ``_extra_state`` whose format is a list: load_state_dict's error names the weight (was a TypeError
    from the dict lookup, "unhashable type")."""
    from flash_llm.nn import SparseLinear

    sl = SparseLinear.from_linear(torch.nn.Linear(64, 32).half())
    sd = sl.state_dict()
    sd["_extra_state"] = {**sd["_extra_state"], "format": ["x"]}
    with pytest.raises(RuntimeError, match="weight has unknown format"):
        sl.load_state_dict(sd)

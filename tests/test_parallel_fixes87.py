"""Session 87 fixes from the bug hunt of flash_llm/parallel and flash_llm/demo.py (CPU, gloo, world size 1).

1. ``load_tensor_parallel(dtype=torch.float8_e4m3fn)`` (or ``float8_e5m2``) passed the only dtype check
   (``is_floating_point``), built the model and read every slice, then died deep inside in torch's words
   (``"isfinite" not implemented for 'Float8_e4m3fn'``; e5m2: ``"nonzero_count_cpu" not implemented``).  A dtype
   outside fp16 / bf16 / fp32 / fp64 (those the loader and ``flash_llm.from_pretrained`` load dense models in) is
   now a ``TypeError`` naming ``dtype``, before anything is read.
2. ``flash_llm.demo.reference_linears`` overwrote a layer's instance ``forward`` on entry and deleted it on exit:
   nested blocks lost the outer patch at the inner exit (the rest of the outer block ran the plain linear) and the
   outer exit raised ``AttributeError``; a user's patched ``forward`` was lost.  It now puts back what was there.
3. ``TensorParallel.timeout`` ("the group's timeout") was always the 10-minute default for an existing group
   (``TensorParallel.from_group``, ``init_tensor_parallel`` when a group exists), so sub-groups sized from it
   (``benchmarks/bench_e2e.py``) got the wrong timeout.  It is now read from torch (the backend's options), with
   the default as a fallback where torch does not expose it.
4. ``ShardReport.table([])`` raised a bare ``ZeroDivisionError``; it is now a ``ValueError`` naming ``reports``.
"""

from __future__ import annotations

import datetime
import json
import os

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import save_file

import flash_llm
from flash_llm.demo import reference_linears
from flash_llm.models import ModelConfig, from_config
from flash_llm.parallel import ShardReport, TensorParallel, init_tensor_parallel, load_tensor_parallel
from flash_llm.parallel import checkpoint as tp_checkpoint
from flash_llm.parallel import group as tp_group


# ---- 1. load_tensor_parallel: a dtype it cannot load is refused before anything is read --------------------------
def _tiny_checkpoint(folder) -> tuple[str, torch.nn.Module]:
    cfg = ModelConfig(family="llama", vocab_size=64, hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
                      intermediate_size=128, max_position_embeddings=64)
    m = from_config(cfg, dtype=torch.float32, device="cpu", seed=87).eval()
    os.makedirs(folder)
    save_file({k: v.contiguous().clone() for k, v in m.state_dict().items()}, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg.to_hf(), f)
    return str(folder), m


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_load_tensor_parallel_refuses_a_float8_dtype_naming_it_before_reading(world1, tmp_path, monkeypatch, dtype):
    path, _ = _tiny_checkpoint(tmp_path / "ck")

    def read(*a, **k):
        raise AssertionError("the checkpoint was read (or the model built) before the dtype was checked")

    monkeypatch.setattr(tp_checkpoint, "from_config", read)
    monkeypatch.setattr(tp_checkpoint, "_Checkpoint", read)
    with pytest.raises(TypeError) as e:
        load_tensor_parallel(path, world1, dtype=dtype, progress=False)
    assert str(e.value) == ("dtype must be torch.float16, torch.bfloat16, torch.float32 or torch.float64, "
                            f"got {dtype!r}")


def test_load_tensor_parallel_still_loads_every_dtype_it_accepts(world1, tmp_path):
    path, m = _tiny_checkpoint(tmp_path / "ck")
    ids = torch.tensor([[1, 2, 3, 4]])
    for dtype in tp_checkpoint.LOAD_DTYPES:
        tpm, _ = load_tensor_parallel(path, world1, dtype=dtype, progress=False)
        assert {p.dtype for p in tpm.parameters()} == {dtype}
        single = flash_llm.from_pretrained(path, dtype=dtype, progress=False)  # (the same set loads there)
        with torch.no_grad():
            assert torch.equal(tpm(ids), single(ids))
            if dtype in (torch.float32, torch.float64):
                assert torch.allclose(tpm(ids).double(), m(ids).double(), atol=1e-5)


# ---- 2. reference_linears nests and keeps a layer's own instance forward ------------------------------------------
def test_reference_linears_nests_and_restores_what_was_there():
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 8, dtype=torch.bfloat16)
    model = torch.nn.Sequential(lin)
    x = torch.randn(3, 32).to(torch.bfloat16)
    ref = torch.nn.functional.linear(x.float(), lin.weight.float(), lin.bias.float()).to(torch.bfloat16)
    with reference_linears(model):
        outer = lin.__dict__["forward"]
        with reference_linears(model):
            assert lin.__dict__["forward"] is not outer and torch.equal(model(x), ref)
        assert lin.__dict__.get("forward") is outer  # the outer block still computes as the reference
        assert torch.equal(model(x), ref)
    assert "forward" not in lin.__dict__  # (the outer exit raised AttributeError before)

    def mine(t):
        return torch.zeros(len(t), 8, dtype=t.dtype)

    lin.forward = mine  # a user's own patch
    with reference_linears(model):
        assert torch.equal(model(x), ref)
    assert lin.__dict__.get("forward") is mine and torch.equal(model(x), torch.zeros(3, 8, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="inside"):
        with reference_linears(model):
            with reference_linears(model):
                raise RuntimeError("inside")
    assert lin.__dict__.get("forward") is mine  # restored on an error too


# ---- 3. TensorParallel.timeout is an existing group's own -----------------------------------------------------------
def test_timeout_of_an_existing_group_is_the_groups_own():
    assert not dist.is_initialized()
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore(),
                            timeout=datetime.timedelta(seconds=5))
    try:
        five, seven = datetime.timedelta(seconds=5), datetime.timedelta(seconds=7)
        assert init_tensor_parallel("gloo", timeout=30).timeout == five  # (it uses the group as it is)
        assert TensorParallel.from_group().timeout == five
        assert TensorParallel(None, "cpu").timeout == five
        sub = dist.new_group([0], timeout=seven)
        assert TensorParallel.from_group(sub).timeout == seven
        assert TensorParallel(sub, "cpu").timeout == seven
        assert TensorParallel(sub, "cpu", datetime.timedelta(seconds=9)).timeout == datetime.timedelta(seconds=9)
    finally:
        dist.destroy_process_group()


def test_timeout_of_a_group_init_tensor_parallel_creates():
    with init_tensor_parallel("gloo", timeout=12) as tp:
        assert tp.timeout == datetime.timedelta(seconds=12)
        assert TensorParallel.from_group().timeout == datetime.timedelta(seconds=12)


def test_group_timeout_falls_back_to_the_default_where_torch_does_not_expose_it():
    class NoOptions:
        def _get_backend(self, device):
            raise RuntimeError("no backend for this device")

    assert tp_group._group_timeout(NoOptions(), torch.device("cpu")) == tp_group.DEFAULT_TIMEOUT
    assert tp_group._group_timeout(object(), torch.device("cpu")) == tp_group.DEFAULT_TIMEOUT


# ---- 4. ShardReport.table of no reports ---------------------------------------------------------------------------
def test_shard_report_table_of_no_reports_is_a_value_error_naming_it():
    with pytest.raises(ValueError, match=r"^reports is empty: ShardReport.table needs at least one rank's "
                                         r"ShardReport"):
        ShardReport.table([])


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_from_pretrained_and_from_config_refuse_a_float8_dtype_before_building(dtype, tmp_path):
    """The same hole in flash_llm.from_pretrained (``_resolve_dtype``) and ``models.from_config``: any floating dtype
    passed, and float8 failed deep inside (torch has no isfinite / normal_ kernels for it) after the whole read."""
    from flash_llm.models import ModelConfig, from_config

    cfg = ModelConfig(family="llama", vocab_size=64, hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
                      intermediate_size=128, max_position_embeddings=64)
    with pytest.raises(TypeError, match=r"dtype must be torch.float16, .* got torch.float8"):
        from_config(cfg, dtype=dtype)
    model = from_config(cfg, dtype=torch.float32, seed=0)
    flash_llm.save_pretrained(model, tmp_path / "m")
    with pytest.raises(TypeError, match=r"dtype must be torch.float16, .* got torch.float8"):
        flash_llm.from_pretrained(tmp_path / "m", dtype=dtype)

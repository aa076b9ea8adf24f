"""Session 82 fixes from the bug hunt of flash_llm/nn.py and flash_llm/parallel (CPU, gloo, world size 1):

1. ``tensor_parallel_(..., sparsify=SparsifyConfig(dtype=...))`` casts each slice with the loss check of
   ``sparsify_`` (``nn._compressed``): a weight or bias that the cast would overflow to inf or flush to zero keeps
   its slice dense and exact, the reason in the slice's note, where it became inf / 0 silently before.
2. fp32 in ``load_tensor_parallel``: a sparse-bitmask checkpoint loads with ``dtype=torch.float32`` (its slices
   dense, as ``from_pretrained`` keeps such layers dense); ``sparsify`` with fp32 is refused before anything is
   read, by a TypeError naming ``dtype`` and ``sparsify`` that no longer advises ``SparsifyConfig(dtype=...)`` (which
   the loader refuses); a flash-llm checkpoint loaded in fp32 is told to pass its dtype, not a SparsifyConfig.
3. ``tensor_parallel_`` refuses a projection carrying what a rebuilt layer would drop (forward hooks, a subclass's
   or an instance's own ``forward``, a parametrization), naming it, before the model is changed.
4. The tensor-parallel paths check a ``SparsifyConfig``'s fields again (a field set after construction), as
   ``sparsify_`` does: the same errors, naming the field, before anything is sharded or read.
5. ``tensor_parallel_`` gives each new module the training flag of the projection it replaces.
"""

from __future__ import annotations

import copy
import json
import os
import re
import warnings

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils import parametrize

import flash_llm
from flash_llm import FormatError, SparseLinear, SparsifyConfig
from flash_llm.checkpoint import convert
from flash_llm.models import ModelConfig, from_config
from flash_llm.parallel import load_tensor_parallel, tensor_parallel_
from flash_llm.prune import magnitude_prune_

UP = "model.layers.0.mlp.up_proj"
FC1 = "model.decoder.layers.0.fc1"
IDS = torch.tensor([[1, 2, 3, 5, 8]])


def _llama(dtype=torch.float32, seed=0) -> nn.Module:
    """A tiny Llama, its projections magnitude-pruned to 70 % (lm_head dense)."""
    cfg = ModelConfig(family="llama", vocab_size=64, hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
                      intermediate_size=128, max_position_embeddings=32)
    torch.manual_seed(seed)
    m = from_config(cfg, dtype=torch.float32, device="cpu")
    magnitude_prune_(m, 0.7, filter_fn=lambda mod, fqn: fqn != "lm_head")
    return m.to(dtype).eval()


def _opt() -> nn.Module:
    """A tiny fp32 OPT (biases everywhere), its projections magnitude-pruned to 70 %."""
    cfg = ModelConfig(family="opt", vocab_size=64, hidden_size=64, num_layers=1, num_heads=4, intermediate_size=128,
                      max_position_embeddings=32, activation="relu", attention_bias=True, mlp_bias=True)
    torch.manual_seed(0)
    m = from_config(cfg, dtype=torch.float32, device="cpu")
    magnitude_prune_(m, 0.7, filter_fn=lambda mod, fqn: fqn != "lm_head")
    return m.eval()


def _quiet_sparsify(model, config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return flash_llm.sparsify_(model, config)


def _unchanged(model, modules: dict) -> bool:
    """``model`` holds exactly the module objects of ``modules`` and is not tensor-parallel."""
    now = dict(model.named_modules())
    return (getattr(model, "tensor_parallel", None) is None and now.keys() == modules.keys()
            and all(now[n] is modules[n] for n in modules))


def _save_dense(model, folder) -> str:
    os.makedirs(folder)
    save_file({k: v.contiguous().clone() for k, v in model.state_dict().items()},
              os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(model.config.to_hf(), f)
    return str(folder)


# ---- 1. SparsifyConfig(dtype=...) in tensor_parallel_: a lossy cast keeps the slice dense --------------------------
def test_tensor_parallel_sparsify_dtype_keeps_a_lossy_weight_dense(world1):
    m = _llama()
    with torch.no_grad():
        w = m.get_submodule(UP).weight
        w[0, 0], w[1, 1] = 1e5, 1e-9  # inf in fp16; zero in fp16
    want = m.get_submodule(UP).weight.detach().clone()
    cfg = SparsifyConfig(dtype=torch.float16, min_sparsity=0.5)
    single = _quiet_sparsify(copy.deepcopy(m), cfg)
    reason = dict(single.skipped)[UP]
    assert "overflow to inf" in reason and "flush to zero" in reason

    report = tensor_parallel_(m, world1, sparsify=cfg)
    up = m.get_submodule(UP)
    assert type(up.linear) is nn.Linear and up.linear.weight.dtype == torch.float32
    assert torch.equal(up.linear.weight, want)  # exact: no inf, the 1e-9 kept
    assert {s.fqn: s.note for s in report.layers}[UP] == reason  # sparsify_'s words
    others = [s for s in report.layers if s.fqn != UP]
    assert others and all(s.format == "BitmapTiles" and s.note == "" for s in others)
    assert {mod.linear.weight_dtype for n, mod in m.named_modules() if n in {s.fqn for s in others}} == {torch.float16}


def test_tensor_parallel_sparsify_dtype_keeps_a_lossy_bias_dense(world1):
    m = _opt()
    with torch.no_grad():
        m.get_submodule(FC1).bias[3] = 1e5
    cfg = SparsifyConfig(dtype=torch.float16, min_sparsity=0.5)
    reason = dict(_quiet_sparsify(copy.deepcopy(m), cfg).skipped)[FC1]
    assert reason.startswith("bias cannot be cast")
    report = tensor_parallel_(m, world1, sparsify=cfg)
    fc1 = m.get_submodule(FC1).linear
    assert type(fc1) is nn.Linear and fc1.bias[3].item() == 1e5
    assert {s.fqn: s.note for s in report.layers}[FC1] == reason


# ---- 2. fp32 in load_tensor_parallel ---------------------------------------------------------------------------------
@pytest.fixture
def checkpoints(tmp_path):
    """A pruned fp16 Llama saved dense, and converted to sparse-bitmask and flash-llm (bitmap)."""
    m = _llama(torch.float16)
    dense = _save_dense(m, tmp_path / "dense")
    convert(dense, tmp_path / "sb", format="sparse-bitmask", progress=False)
    convert(dense, tmp_path / "flash", format="bitmap", progress=False)
    return {"dense": dense, "sb": str(tmp_path / "sb"), "flash": str(tmp_path / "flash")}


def test_sparse_bitmask_checkpoint_loads_in_fp32_with_dense_slices(world1, checkpoints):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        one = flash_llm.from_pretrained(checkpoints["sb"], dtype=torch.float32, backend="flash", progress=False)
        tpm, report = load_tensor_parallel(checkpoints["sb"], world1, dtype=torch.float32, progress=False)
    assert len(report.layers) == 7 and {s.format for s in report.layers} == {"dense"}
    assert {s.note for s in report.layers} == {"dtype torch.float32: the sparse formats hold fp16/bf16"}
    assert {p.dtype for p in tpm.parameters()} == {torch.float32}
    with torch.no_grad():  # world size 1: the single-process model, bit for bit
        assert torch.equal(tpm(IDS), one(IDS))


@pytest.mark.parametrize("sp", [SparsifyConfig(), SparsifyConfig(dtype=torch.float16)])
@pytest.mark.parametrize("which", ["dense", "sb", "flash"])
def test_sparsify_with_fp32_is_refused_up_front_naming_dtype(world1, checkpoints, sp, which):
    with pytest.raises(TypeError, match=r"^sparsify needs dtype=torch.float16 or torch.bfloat16 .*got "
                                        r"dtype=torch.float32; .*sparsify=None") as e:
        load_tensor_parallel(checkpoints[which], world1, dtype=torch.float32, sparsify=sp, progress=False)
    assert "SparsifyConfig(dtype" not in str(e.value)


def test_flash_checkpoint_in_fp32_is_told_to_pass_its_dtype_only(world1, checkpoints):
    with pytest.raises(FormatError, match=r"is compressed as torch.float16 but the model is loaded in "
                                          r"torch.float32; pass dtype=torch.float16$"):
        load_tensor_parallel(checkpoints["flash"], world1, dtype=torch.float32, progress=False)
    # in bf16 the re-encoding advice stays (load_tensor_parallel accepts it there)
    with pytest.raises(FormatError, match=r"pass dtype=torch.float16, or a SparsifyConfig as sparsify"):
        load_tensor_parallel(checkpoints["flash"], world1, dtype=torch.bfloat16, progress=False)


# ---- 3. projections carrying what a rebuilt layer would drop --------------------------------------------------------
class _Scaled(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 0.5


class _Half(nn.Module):
    def forward(self, w):
        return w * 0.5


def _hooked(m):
    m.get_submodule(UP).register_forward_hook(lambda mod, inp, out: out * 0.5)
    return r"has 1 forward hook\(s\) that a replacement would drop"


def _pre_hooked(m):
    m.get_submodule(UP).register_forward_pre_hook(lambda mod, inp: (inp[0] * 0.5,))
    return r"has 1 forward hook\(s\) that a replacement would drop"


def _subclassed(m):
    old = m.get_submodule(UP)
    new = _Scaled(old.in_features, old.out_features, bias=False)
    new.load_state_dict(old.state_dict())
    m.get_submodule(UP.rpartition(".")[0]).up_proj = new.eval()
    return r"_Scaled overrides nn\.Linear\.forward"


def _instance_forward(m):
    up = m.get_submodule(UP)
    plain = up.forward
    up.forward = lambda x: plain(x) * 0.5
    return r"forward replaced on the instance"


def _parametrized(m):
    parametrize.register_parametrization(m.get_submodule(UP), "weight", _Half())
    return r"parametrized weight or bias \(torch.nn.utils.parametrize\)"


def _sparse_hooked(m):
    _quiet_sparsify(m, SparsifyConfig())
    assert isinstance(m.get_submodule(UP), SparseLinear)
    m.get_submodule(UP).register_forward_hook(lambda mod, inp, out: out * 0.5)
    return r"has 1 forward hook\(s\) that a replacement would drop"


@pytest.mark.parametrize("carry", [_hooked, _pre_hooked, _subclassed, _instance_forward, _parametrized,
                                   _sparse_hooked])
def test_tensor_parallel_refuses_what_a_rebuilt_projection_would_drop(world1, carry):
    m = _llama(torch.float16 if carry is _sparse_hooked else torch.float32)
    what = carry(m)
    modules = dict(m.named_modules())
    with pytest.raises(ValueError, match=rf"^{re.escape(UP)}: {what}.*tensor_parallel_ rebuilds each projection "
                                         r"from its weight and bias alone"):
        tensor_parallel_(m, world1)
    assert _unchanged(m, modules)


def test_tensor_parallel_of_a_plain_model_is_still_bitwise_the_single_process_one(world1):
    m = _llama()
    with torch.no_grad():
        want = m(IDS)
    tensor_parallel_(m, world1)
    with torch.no_grad():
        assert torch.equal(m(IDS), want)


# ---- 4. SparsifyConfig fields set after construction ----------------------------------------------------------------
def _late(field, value):
    cfg = SparsifyConfig()
    setattr(cfg, field, value)
    return cfg


LATE = [("skip_names", "down_proj", TypeError, r"SparsifyConfig.skip_names must be a sequence of names, got the "
                                               r"string 'down_proj'"),
        ("min_sparsity", 1.5, ValueError, r"SparsifyConfig.min_sparsity must be a number in \[0, 1\], got 1.5"),
        ("format", "csr", ValueError, r"SparsifyConfig.format must be one of"),
        ("dtype", torch.float32, TypeError, r"SparsifyConfig.dtype must be None, torch.float16 or torch.bfloat16")]


@pytest.mark.parametrize("field, value, error, match", LATE)
def test_tensor_parallel_checks_sparsify_fields_set_later(world1, field, value, error, match):
    m = _llama(torch.float16)
    with pytest.raises(error, match=match):  # (what sparsify_ says)
        _quiet_sparsify(copy.deepcopy(m), _late(field, value))
    modules = dict(m.named_modules())
    with pytest.raises(error, match=match):
        tensor_parallel_(m, world1, sparsify=_late(field, value))
    assert _unchanged(m, modules)


@pytest.mark.parametrize("field, value, error, match", LATE)
def test_load_tensor_parallel_checks_sparsify_fields_set_later(world1, tmp_path, field, value, error, match):
    path = _save_dense(_llama(torch.float16), tmp_path / "dense")
    with pytest.raises(error, match=match):
        load_tensor_parallel(path, world1, sparsify=_late(field, value), progress=False)


def test_skip_names_set_later_as_a_list_is_read_as_names(world1):
    m = _llama(torch.float16)
    report = tensor_parallel_(m, world1, sparsify=_late("skip_names", ["down_proj"]))
    notes = {s.fqn: (s.format, s.note) for s in report.layers}
    assert notes["model.layers.0.mlp.down_proj"] == ("dense", "name in skip_names ('down_proj',)")
    assert notes[UP] == ("BitmapTiles", "")


# ---- 5. the training flag ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("training", [False, True])
def test_tensor_parallel_keeps_the_projections_training_flag(world1, training):
    m = _opt().train(training)
    tensor_parallel_(m, world1, sparsify=SparsifyConfig(dtype=torch.float16, min_sparsity=0.5))
    assert {mod.training for mod in m.modules()} == {training}
    if not training:  # the documented workflow: sparsify_ on the tensor-parallel model keeps the flag too
        m2 = _opt().eval()
        tensor_parallel_(m2, world1)
        _quiet_sparsify(m2, SparsifyConfig(dtype=torch.float16, min_sparsity=0.5))
        assert any(isinstance(mod, SparseLinear) for mod in m2.modules())
        assert not any(mod.training for mod in m2.modules())

"""Session 87 fixes of the checkpoint conversion paths (and two pruning doc nits):

1. sparse-bitmask ``targets`` / ``ignore`` class names are matched against every class of a module's MRO, as
   compressed-tensors matches them: a model whose linear layers subclass ``nn.Linear`` (Falcon's ``FalconLinear``)
   was refused on load ("does not target ...") although ``"Linear"`` selects it, and ``write_sparse_bitmask``'s
   default ``targets=("Linear",)`` compressed none of its layers while its config.json said ``"Linear"``.
2. A model loaded with ``backend="hf"`` whose ``generation_config.json`` only draws transformers' warnings
   (``do_sample`` false with a ``temperature`` / ``top_p``) could not be saved at all: flash-llm built its
   ``GenerationConfig`` with ``from_dict`` without marking it as loaded, so transformers validated it strictly at
   the end of every save.  It is marked now; a save that still fails (a config changed after loading) fails before
   any weight is written and leaves nothing.
3. ``convert`` / ``save_pretrained`` / ``write_sparse_bitmask`` check ``max_shard_size`` and ``overwrite`` (a bool:
   ``"no"`` is truthy) before any loading or compression; ``"500Mb"`` (megabits to transformers) is refused.
4. A config.json declaring a float8 ``torch_dtype`` / ``dtype`` with no ``dtype`` argument is refused naming the file
   and the key, not with "dtype must be ..." as if the user had passed one.
5. prune.py / docs: ``gradual_prune_`` passes non-tensor (dict) batches to the model as they are; Wanda / OWL scores
   are fp64 for float64 weights.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

import flash_llm
from flash_llm import FormatError, SparseLinear
from flash_llm.checkpoint import _files, convert, load_checkpoint, pretrained, write_sparse_bitmask
from flash_llm.checkpoint import sparse_bitmask as sb
from flash_llm.prune import magnitude_prune_

from _ckpt import VOCAB, edit_json, hf_model, read_shard, save_hf, shards

transformers = pytest.importorskip("transformers")

GENERATION = {"bos_token_id": 1, "eos_token_id": 2, "do_sample": False, "temperature": 0.7, "top_p": 0.8}


# ---- 1. class targets match the MRO -------------------------------------------------------------------------

def falcon():
    torch.manual_seed(0)
    cfg = transformers.FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    model = transformers.FalconForCausalLM(cfg).half().eval()
    magnitude_prune_(model, 0.6, filter_fn=lambda m, n: n != "lm_head")
    return model


def falcon_linears(model) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if type(m).__name__ == "FalconLinear"}


def bitmask_prefixes(path) -> set[str]:
    return {k.rpartition(".")[0] for f in shards(path) for k in read_shard(f)[0] if k.endswith(".bitmask")}


def test_class_names_are_the_mro():
    class MyLinear(nn.Linear):
        pass

    names = sb.class_names(MyLinear(2, 2))
    assert names == ("MyLinear", "Linear", "Module")
    cfg = sb.BitmaskConfig(("Linear",), ("lm_head",))
    assert cfg.is_target("a.b", names) and cfg.is_target("a.b", "Linear")
    assert not cfg.is_target("lm_head", names)
    only_sub = sb.BitmaskConfig(("MyLinear",), ())
    assert only_sub.is_target("x", names) and not only_sub.is_target("x", sb.class_names(nn.Linear(2, 2)))
    assert not sb.BitmaskConfig(("Linear",), ("MyLinear",)).is_target("x", names)  # (ignore by class, too)
    assert not sb.BitmaskConfig(("re:Linear",), ()).is_target("x", names)  # (a regex matches the name only)
    assert sb.BitmaskConfig(("re:x",), ()).is_target("x", names)


def test_writer_compresses_linear_subclasses_under_linear(tmp_path):
    model = falcon()
    layers = falcon_linears(model)
    assert len(layers) == 8
    report = write_sparse_bitmask(model, tmp_path / "sb", progress=False)
    assert sorted(c.fqn for c in report.converted) == sorted(layers)
    assert bitmask_prefixes(tmp_path / "sb") == set(layers)
    sparsity = json.loads((tmp_path / "sb" / "config.json").read_text())["quantization_config"]["sparsity_config"]
    assert sparsity["targets"] == ["Linear"] and sparsity["ignore"] == ["lm_head"]
    # and it reads back: FalconLinear is not a plain nn.Linear, so it loads dense, with the source's weights
    back = flash_llm.from_pretrained(tmp_path / "sb", progress=False)
    for name, m in falcon_linears(back).items():
        assert torch.equal(m.weight, layers[name].weight)


def test_reader_takes_a_linear_target_for_linear_subclasses(tmp_path):
    """What compressed-tensors writes for Falcon: the FalconLinear layers compressed, targets ["Linear"]."""
    model = falcon()
    out = tmp_path / "sb"
    write_sparse_bitmask(model, out, targets=["Linear", "FalconLinear"], progress=False)
    edit_json(out / "config.json",
              lambda c: c["quantization_config"]["sparsity_config"].update(targets=["Linear"]))
    assert bitmask_prefixes(out) == set(falcon_linears(model))
    back, report = flash_llm.from_pretrained(out, progress=False, output_report=True)
    assert any("not a plain nn.Linear" in s.reason for s in report.skipped)
    want, got = model.state_dict(), back.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    # an ignore entry by class name is honoured in the same way: such a file is refused
    edit_json(out / "config.json",
              lambda c: c["quantization_config"]["sparsity_config"].update(ignore=["lm_head", "FalconLinear"]))
    with pytest.raises(FormatError, match="does not target"):
        flash_llm.from_pretrained(out, progress=False)


class _MyLinear(nn.Linear):  # (nn.Linear's own forward: a plain linear layer, which the loader compresses)
    pass


class _Net(nn.Module):
    def __init__(self, device=None):
        super().__init__()
        self.a = _MyLinear(32, 48, device=device, dtype=torch.float16)
        self.b = _MyLinear(48, 32, device=device, dtype=torch.float16)


def test_custom_linear_subclass_round_trip(tmp_path):
    torch.manual_seed(0)
    net = _Net()
    with torch.no_grad():
        for lin in (net.a, net.b):
            lin.weight[torch.rand(lin.weight.shape) < 0.7] = 0
    report = write_sparse_bitmask(net, tmp_path / "sb", config={"model_type": "net"}, ignore=[], progress=False)
    assert sorted(c.fqn for c in report.converted) == ["a", "b"]
    assert bitmask_prefixes(tmp_path / "sb") == {"a", "b"}
    shell = _Net(device="meta")
    load_checkpoint(shell, tmp_path / "sb", progress=False)
    for name in ("a", "b"):
        got = shell.get_submodule(name)
        assert isinstance(got, SparseLinear) and torch.equal(got.to_dense(), net.get_submodule(name).weight)


# ---- 2. a published generation_config that only draws warnings ----------------------------------------------

@pytest.fixture
def hf_source(tmp_path):
    src = save_hf(hf_model("llama"), tmp_path / "src")
    (src / "generation_config.json").write_text(json.dumps(GENERATION))
    return src


@pytest.fixture
def saves_back(hf_source, tmp_path):
    """Skip where transformers' own load + save of that generation config fails too (a transformers that validates
    every saved generation config strictly, loaded or not)."""
    try:
        transformers.GenerationConfig.from_pretrained(hf_source).save_pretrained(tmp_path / "gen-only")
    except ValueError:
        pytest.skip("this transformers refuses to save the loaded generation config itself")
    return hf_source


def _generation(path) -> dict:
    got = json.loads((path / "generation_config.json").read_text())
    return {k: got.get(k) for k in GENERATION}


def test_hf_backend_model_with_warned_generation_config_saves(saves_back, hf_source, tmp_path):
    model = flash_llm.from_pretrained(hf_source, backend="hf", progress=False)
    assert isinstance(model, transformers.PreTrainedModel)
    flash_llm.save_pretrained(model, tmp_path / "flash", progress=False)
    write_sparse_bitmask(model, tmp_path / "sb", progress=False)
    model.save_pretrained(tmp_path / "tf")  # (transformers' own save, through flash-llm's quantizer)
    for out in ("flash", "sb", "tf"):
        assert _generation(tmp_path / out) == GENERATION, out
    again = flash_llm.from_pretrained(tmp_path / "flash", backend="hf", progress=False)
    assert again.generation_config.temperature == 0.7 and again.generation_config.do_sample is False
    assert "_original_object_hash" not in json.loads((tmp_path / "flash" / "generation_config.json").read_text())


def test_failing_generation_config_save_writes_nothing(saves_back, hf_source, tmp_path, monkeypatch):
    model = flash_llm.from_pretrained(hf_source, backend="hf", progress=False)
    model.generation_config.top_p = 0.5  # changed after loading: transformers validates it strictly at the save
    added = []
    original = _files.ShardWriter.add
    monkeypatch.setattr(_files.ShardWriter, "add", lambda self, *a, **k: (added.append(1), original(self, *a, **k)))
    before = sorted(os.listdir(tmp_path))  # (the source and gen-only)
    for save in (lambda d: flash_llm.save_pretrained(model, d, progress=False),
                 lambda d: write_sparse_bitmask(model, d, progress=False)):
        with pytest.raises(ValueError, match="(?i)invalid"):
            save(tmp_path / "out")
        assert sorted(os.listdir(tmp_path)) == before and not added  # (failed before any weight was written)


# ---- 3. max_shard_size / overwrite checked up front ----------------------------------------------------------

@pytest.mark.parametrize("size", ["5 G", 5e9, "0MB", "500Mb", "5gb"])
def test_convert_checks_max_shard_size_before_loading(hf_source, tmp_path, monkeypatch, size):
    def never(*a, **k):
        raise AssertionError("the model was loaded before max_shard_size was checked")

    monkeypatch.setattr(pretrained, "load_checkpoint", never)
    monkeypatch.setattr(pretrained._model, "build_skeleton", never)
    for fmt in ("bitmap", "sparse-bitmask"):
        with pytest.raises(ValueError, match="max_shard_size"):
            convert(hf_source, tmp_path / "out", format=fmt, max_shard_size=size, progress=False)
    assert not (tmp_path / "out").exists()


def test_writers_check_max_shard_size_and_overwrite_first(tmp_path, monkeypatch):
    model = hf_model("llama")

    def never(*a, **k):
        raise AssertionError("the state dict was gathered before the arguments were checked")

    monkeypatch.setattr(pretrained._model, "state_to_save", never)
    for write in (flash_llm.save_pretrained, write_sparse_bitmask):
        with pytest.raises(ValueError, match="max_shard_size"):
            write(model, tmp_path / "out", max_shard_size="5 G", progress=False)
        with pytest.raises(TypeError, match="overwrite must be True or False, got 'no'"):
            write(model, tmp_path / "out", overwrite="no", progress=False)
    assert not (tmp_path / "out").exists()


def test_convert_refuses_a_non_bool_overwrite_and_keeps_the_output(hf_source, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for overwrite in ("no", 2, None):  # (True, False, numpy bools, 0 and 1 taken)
        with pytest.raises(TypeError, match="overwrite must be True or False"):
            convert(hf_source, out, overwrite=overwrite, progress=False)
    assert os.listdir(out) == ["keep.txt"]


def test_parse_size_follows_transformers_or_refuses():
    assert _files.parse_size("500MB") == _files.parse_size("500mB") == 500 * 10**6
    assert _files.parse_size("64KiB") == _files.parse_size("64kib") == 64 * 1024  # (bytes in transformers, too)
    assert _files.parse_size("100B") == 100
    for bits in ("500Mb", "5gb", "16kb", "1Tb", "100b"):  # megabits etc. to transformers (or refused there)
        with pytest.raises(ValueError, match=rf"max_shard_size '{bits}' ends in a lowercase 'b'.*write '\d+[KMGT]?B'"):
            _files.parse_size(bits)


# ---- 4. a float8 dtype in config.json ----------------------------------------------------------------------

@pytest.mark.parametrize("key", ["torch_dtype", "dtype"])
def test_float8_config_dtype_names_the_key_and_file(hf_source, tmp_path, key):
    def declare(c):
        c.pop("dtype", None), c.pop("torch_dtype", None)
        c[key] = "float8_e4m3fn"

    edit_json(hf_source / "config.json", declare)
    where = f"{hf_source / 'config.json'} declares dtype 'float8_e4m3fn' \\(key \"{key}\"\\)"
    with pytest.raises(ValueError, match=f"^{where}, which flash-llm builds no model in.*pass dtype="):
        flash_llm.from_pretrained(hf_source, sparsify=False, progress=False)
    with pytest.raises(ValueError, match=f"^{where}, which flash-llm builds no model in"):
        convert(hf_source, tmp_path / "out", format="sparse-bitmask", progress=False)
    with pytest.raises(ValueError, match=f"^{where}; the sparse formats hold fp16/bf16"):
        flash_llm.from_pretrained(hf_source, progress=False)
    assert not (tmp_path / "out").exists()
    model = flash_llm.from_pretrained(hf_source, sparsify=False, dtype=torch.float16, progress=False)  # (as it says)
    assert model.get_submodule("model.layers.0.mlp.up_proj").weight.dtype == torch.float16


# ---- 5. pruning doc nits ---------------------------------------------------------------------------------

def test_gradual_prune_passes_dict_batches_as_documented():
    from flash_llm import prune

    seen = []

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, b):
            seen.append(type(b))
            return self.lin(b["x"]) * b["mask"]

    batch = {"x": torch.randn(2, 8), "mask": torch.ones(2, 1)}
    prune.gradual_prune_(M(), [batch], 0.5, steps=2, loss_fn=lambda o, b: o.square().mean(), progress=False)
    assert seen and set(seen) == {dict}
    doc = " ".join(prune.gradual_prune_.__doc__.split())
    assert "A batch that is not a tensor (a dict, a ``BatchEncoding``) is not refused" in doc
    assert "gradual_prune_` takes other batches too" in " ".join(prune.__doc__.split())


def test_wanda_scores_are_fp64_for_float64_weights_as_documented():
    from flash_llm import prune

    lin = nn.Linear(4, 3).double()
    assert prune._wanda_score(lin, torch.ones(4, dtype=torch.float64)).dtype == torch.float64
    assert prune._wanda_score(nn.Linear(4, 3).half(), torch.ones(4, dtype=torch.float64)).dtype == torch.float32
    assert "fp64, 8 bytes, for a float64 weight" in " ".join(prune.wanda_prune_.__doc__.split())
    with open(os.path.join(os.path.dirname(__file__), "..", "docs", "pruning.md"), encoding="utf-8") as f:
        assert "fp64, 8 bytes, for float64 weights" in " ".join(f.read().split())

"""Session 81 fixes from the bug hunt of flash_llm/checkpoint and flash_llm/parallel (CPU, gloo):

1. ``min_sparsity`` is an inclusive, exact bound everywhere (one helper, ``nn.min_sparsity_shortfall``): a layer with
   exactly that fraction of zeros is compressed by ``from_pretrained``, ``convert`` (both kinds of output),
   ``write_sparse_bitmask``, ``sparsify_`` and the tensor-parallel paths; one zero fewer stays dense, and the reason
   prints the sparsity rounded down (never "sparsity 0.2000 < min_sparsity 0.2").
2. A model that ``load_checkpoint(module, path)`` filled remembers ``path``: ``save_pretrained`` /
   ``write_sparse_bitmask`` refuse to replace it (its tokenizer files would be deleted), as for ``from_pretrained``.
3. ``tensor_parallel_`` refused inside its replacement loop (an fp32 dense projection to compress) leaves the model
   as it was: every module the original object, and a retry works.
4. A flash-llm checkpoint listing a non-linear module (the embedding) as sparse: FormatError naming the file and the
   module (``generate`` exits 2), not a bare KeyError.
"""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import flash_llm
from flash_llm import FormatError, SparseLinear, SparsifyConfig
from flash_llm.checkpoint import convert, load_checkpoint, write_sparse_bitmask
from flash_llm.cli import main
from flash_llm.formats import BitmapTiles
from flash_llm.models import ModelConfig, from_config
from flash_llm.parallel import load_tensor_parallel, tensor_parallel_

UP = "model.layers.0.mlp.up_proj"
NUMEL = 160 * 64  # up_proj's weight: 10240 elements, 2048 of them (exactly 20 %) zeros at the bound
AT = NUMEL // 5
IDS = torch.tensor([[1, 2, 3, 5, 8]])


def _cfg(**kw) -> ModelConfig:
    base = dict(family="llama", vocab_size=97, hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
                intermediate_size=160, max_position_embeddings=64)
    base.update(kw)
    return ModelConfig(**base)


def _model_with_up_zeros(zeros: int) -> nn.Module:
    """An fp16 Llama without a zero anywhere but ``zeros`` of up_proj's 10240 weights."""
    torch.manual_seed(0)
    m = from_config(_cfg(), dtype=torch.float16, device="cpu").eval()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(0.1 * torch.rand_like(p) + 0.5)
        flat = m.get_submodule(UP).weight.view(-1)
        flat[torch.randperm(NUMEL, generator=torch.Generator().manual_seed(1))[:zeros]] = 0
    assert NUMEL - int(torch.count_nonzero(m.get_submodule(UP).weight)) == zeros
    return m


def _dense_checkpoint(folder, zeros: int) -> str:
    m = _model_with_up_zeros(zeros)
    os.makedirs(folder)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({**m.config.to_hf(), "torch_dtype": "float16"}, f)
    return str(folder)


def _below_reason() -> str:
    return f"sparsity 0.1999 < min_sparsity 0.2 ({AT - 1} of {NUMEL} zeros)"


# ---- 1. min_sparsity: inclusive and exact on every path ------------------------------------------------------------
def test_shortfall_is_exact_and_never_prints_a_contradiction():
    from flash_llm.nn import min_sparsity_shortfall  # (here: the other tests run on a tree without it too)

    assert min_sparsity_shortfall(AT, NUMEL, 0.2) is None  # (1.0 - 8192 / 10240 is 0.19999999999999996 in floats)
    assert min_sparsity_shortfall(AT - 1, NUMEL, 0.2) == _below_reason()
    for rows, cols in ((5120, 5120), (20480, 5120)):  # OPT-13B's shapes at exactly 10 %, 20 %, 45 %
        numel = rows * cols
        for pct in (10, 20, 45):
            assert min_sparsity_shortfall(numel * pct // 100, numel, pct / 100) is None
            assert min_sparsity_shortfall(numel * pct // 100 - 1, numel, pct / 100) is not None
    # one zero short of 66 % of 20000 is 0.65995: rounded to 4 places it would read 0.6600 < 0.66
    assert min_sparsity_shortfall(13199, 20000, 0.66).startswith("sparsity 0.6599 < min_sparsity 0.66 ")
    assert min_sparsity_shortfall(0, 50, 0.3) == "sparsity 0.0000 < min_sparsity 0.3 (0 of 50 zeros)"
    assert min_sparsity_shortfall(0, 50, 0) is None and min_sparsity_shortfall(50, 50, 1) is None
    assert min_sparsity_shortfall(49, 50, 1.0) == "sparsity 0.9800 < min_sparsity 1.0 (49 of 50 zeros)"


@pytest.mark.parametrize("zeros", [AT, AT - 1])
def test_from_pretrained_min_sparsity_is_inclusive(tmp_path, zeros):
    src = _dense_checkpoint(tmp_path / "dense", zeros)
    model, report = flash_llm.from_pretrained(src, sparsify=SparsifyConfig(min_sparsity=0.2), output_report=True,
                                              progress=False)
    up = model.get_submodule(UP)
    skipped = dict(report.skipped)
    if zeros == AT:
        assert isinstance(up, SparseLinear) and UP not in skipped
        assert [c.fqn for c in report.converted] == [UP]
    else:
        assert type(up) is nn.Linear and skipped[UP] == _below_reason()


@pytest.mark.parametrize("zeros", [AT, AT - 1])
def test_sparsify_min_sparsity_is_inclusive(zeros):
    m = _model_with_up_zeros(zeros)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = flash_llm.sparsify_(m, SparsifyConfig(min_sparsity=0.2))
    assert isinstance(m.get_submodule(UP), SparseLinear) == (zeros == AT)
    if zeros != AT:
        assert dict(report.skipped)[UP] == _below_reason()


@pytest.mark.parametrize("zeros", [AT, AT - 1])
def test_convert_flash_min_sparsity_is_inclusive(tmp_path, zeros):
    src = _dense_checkpoint(tmp_path / "dense", zeros)
    report = convert(src, tmp_path / "flash", min_sparsity=0.2, progress=False)
    with open(tmp_path / "flash" / "config.json") as f:
        sparse = json.load(f)["quantization_config"]["sparse_modules"]
    assert (UP in sparse) == (zeros == AT)
    if zeros != AT:
        assert dict(report.skipped)[UP] == _below_reason()
    back = flash_llm.from_pretrained(tmp_path / "flash", progress=False)
    assert isinstance(back.get_submodule(UP), SparseLinear) == (zeros == AT)


@pytest.mark.parametrize("zeros", [AT, AT - 1])
def test_convert_sparse_bitmask_min_sparsity_is_inclusive(tmp_path, zeros):
    src = _dense_checkpoint(tmp_path / "dense", zeros)
    report = convert(src, tmp_path / "bm", format="sparse-bitmask", min_sparsity=0.2, progress=False)
    with open(tmp_path / "bm" / "config.json") as f:
        ignore = json.load(f)["quantization_config"]["sparsity_config"]["ignore"]
    assert (UP in ignore) == (zeros != AT)
    with safe_open(str(tmp_path / "bm" / "model.safetensors"), "pt") as f:
        assert (f"{UP}.bitmask" in f.keys()) == (zeros == AT)
    if zeros != AT:
        assert dict(report.skipped)[UP] == _below_reason()


@pytest.mark.parametrize("zeros", [AT, AT - 1])
def test_write_sparse_bitmask_min_sparsity_is_inclusive(tmp_path, zeros):
    report = write_sparse_bitmask(_model_with_up_zeros(zeros), tmp_path / "bm", min_sparsity=0.2, progress=False)
    assert (UP in [c.fqn for c in report.converted]) == (zeros == AT)
    if zeros != AT:
        assert dict(report.skipped)[UP] == _below_reason()


@pytest.mark.parametrize("zeros", [AT, AT - 1])
def test_tensor_parallel_min_sparsity_is_inclusive(world1, zeros):
    m = _model_with_up_zeros(zeros)
    report = tensor_parallel_(m, world1, sparsify=SparsifyConfig(min_sparsity=0.2))
    assert isinstance(m.get_submodule(UP).linear, SparseLinear) == (zeros == AT)
    note = {s.fqn: s.note for s in report.layers}[UP]
    assert note == ("" if zeros == AT else _below_reason())


@pytest.mark.parametrize("zeros", [AT, AT - 1])
def test_load_tensor_parallel_min_sparsity_is_inclusive(world1, tmp_path, zeros):
    src = _dense_checkpoint(tmp_path / "dense", zeros)
    model, _ = load_tensor_parallel(src, world1, sparsify=SparsifyConfig(min_sparsity=0.2), progress=False)
    assert isinstance(model.get_submodule(UP).linear, SparseLinear) == (zeros == AT)


# ---- 2. a model load_checkpoint filled may not be saved over its source ----------------------------------------------
def _checkpoint_with_tokenizer(folder) -> str:
    m = from_config(_cfg(), dtype=torch.float16, device="cpu")
    flash_llm.save_pretrained(m, folder, progress=False)
    with open(os.path.join(folder, "tokenizer.json"), "w") as f:
        f.write("{}")
    return str(folder)


def test_save_over_the_directory_load_checkpoint_read_is_refused(tmp_path):
    src = _checkpoint_with_tokenizer(tmp_path / "ckpt")
    before = sorted(os.listdir(src))
    model = from_config(_cfg(), dtype=torch.float16, device="meta")
    load_checkpoint(model, src, progress=False)
    for save in (lambda p: flash_llm.save_pretrained(model, p, overwrite=True, progress=False),
                 lambda p: write_sparse_bitmask(model, p, overwrite=True, progress=False)):
        for target in (src, tmp_path):  # the directory itself, and one holding it
            with pytest.raises(ValueError, match="source directory .* the model was loaded from .*nothing was"):
                save(target)
            assert sorted(os.listdir(src)) == before
    flash_llm.save_pretrained(model, tmp_path / "elsewhere", progress=False)  # elsewhere: fine
    back = flash_llm.from_pretrained(tmp_path / "elsewhere", progress=False)
    with torch.no_grad():
        assert torch.equal(back(IDS), model(IDS))


def test_every_directory_a_model_was_loaded_from_is_refused(tmp_path):
    first = _checkpoint_with_tokenizer(tmp_path / "first")
    second = _checkpoint_with_tokenizer(tmp_path / "second")
    model = flash_llm.from_pretrained(first, progress=False)
    load_checkpoint(model, second, progress=False)
    for path in (first, second):
        with pytest.raises(ValueError, match="the model was loaded from"):
            flash_llm.save_pretrained(model, path, overwrite=True, progress=False)
        assert "tokenizer.json" in os.listdir(path)


# ---- 3. tensor_parallel_ refused midway leaves the model as it was ---------------------------------------------------
def test_tensor_parallel_refusal_inside_the_loop_leaves_the_model_as_it_was(world1):
    torch.manual_seed(0)
    m = from_config(_cfg(num_layers=2, intermediate_size=128), dtype=torch.float32, device="cpu").eval()
    with torch.no_grad():
        ref = m(IDS)
    modules = dict(m.named_modules())
    tensors = {n: t for n, t in [*m.named_parameters(), *m.named_buffers()]}
    with pytest.raises(TypeError, match="k_proj: compressed weights hold fp16/bf16"):
        # q_proj (kept dense by name) would be sharded before k_proj (fp32) is refused
        tensor_parallel_(m, world1, sparsify=SparsifyConfig(skip_names=("lm_head", "q_proj")))
    assert getattr(m, "tensor_parallel", None) is None
    after = dict(m.named_modules())
    assert after.keys() == modules.keys() and all(after[n] is modules[n] for n in modules)
    assert all(t is tensors[n] for n, t in [*m.named_parameters(), *m.named_buffers()])
    tensor_parallel_(m, world1)  # the retry without sparsify works
    assert m.tensor_parallel is world1
    with torch.no_grad():
        assert torch.equal(m(IDS), ref)


# ---- 4. a non-linear module listed as sparse ---------------------------------------------------------------------
@pytest.fixture
def sparse_embedding_checkpoint(tmp_path):
    """A flash-llm checkpoint whose embedding is stored compressed and listed in sparse_modules."""
    torch.manual_seed(0)
    m = from_config(_cfg(vocab_size=256, intermediate_size=128), dtype=torch.float16, device="cpu")
    path = tmp_path / "ckpt"
    flash_llm.save_pretrained(m, path, progress=False)
    f = str(path / "model.safetensors")
    with safe_open(f, "pt") as h:
        meta = h.metadata()
    state = load_file(f)
    emb = state.pop("model.embed_tokens.weight")
    w = BitmapTiles.from_dense(emb * (torch.rand(emb.shape) > 0.5).half())
    state["model.embed_tokens.weight_data"], state["model.embed_tokens.weight_offsets"] = w.data, w.offsets
    wm = w.metadata()
    meta["model.embed_tokens.weight_flash_llm"] = json.dumps(wm)
    save_file(state, f, metadata=meta)
    with open(path / "config.json") as fh:
        cfg = json.load(fh)
    wm.pop("nnz", None)
    cfg["quantization_config"]["sparse_modules"]["model.embed_tokens"] = wm
    with open(path / "config.json", "w") as fh:
        json.dump(cfg, fh)
    return path


MESSAGE = ("model.safetensors: 'model.embed_tokens.weight' is stored compressed (sparse_modules) but "
           "'model.embed_tokens' is not a linear layer of the model")


def test_sparse_non_linear_module_is_a_format_error(sparse_embedding_checkpoint):
    with pytest.raises(FormatError, match=MESSAGE.replace("(", r"\(").replace(")", r"\)")) as e:
        flash_llm.from_pretrained(sparse_embedding_checkpoint, progress=False)
    assert str(e.value).startswith(str(sparse_embedding_checkpoint))
    model = from_config(_cfg(vocab_size=256, intermediate_size=128), dtype=torch.float16, device="meta")
    with pytest.raises(FormatError, match="is not a linear layer of the model"):
        load_checkpoint(model, sparse_embedding_checkpoint, sparsify=SparsifyConfig(), progress=False)


def test_generate_exits_2_on_a_sparse_non_linear_module(capsys, sparse_embedding_checkpoint):
    rc = main(["generate", str(sparse_embedding_checkpoint), "--prompt", "hi", "--max-new-tokens", "2",
               "--tokenizer", "bytes", "--device", "cpu"])
    _, err = capsys.readouterr()
    assert rc == 2
    assert err.strip().splitlines()[-1].startswith("error: ") and MESSAGE in err and "Traceback" not in err

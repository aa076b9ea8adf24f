"""Chains of steps that each worked alone (CPU): an OPT with ``_remove_final_layer_norm`` saved and converted (the
flag was dropped from ``config.json``, so the checkpoint no longer loaded and transformers built a LayerNorm it never
had), ``flash-llm generate --dtype`` on a flash-llm checkpoint of the other dtype (refused, naming API arguments the
command line does not have), and ``convert``'s argument errors (they named ``SparsifyConfig``)."""

from __future__ import annotations

import json

import pytest
import torch

import flash_llm
from flash_llm import SparseLinear, SparsifyConfig, bundled, data
from flash_llm.checkpoint import convert
from flash_llm.checkpoint.pretrained import sparsify_for_dtype
from flash_llm.cli import main
from flash_llm.models import ModelConfig, from_config


def _opt_without_final_norm():
    cfg = ModelConfig(family="opt", vocab_size=101, hidden_size=64, num_layers=1, num_heads=4, intermediate_size=96,
                      max_position_embeddings=64, remove_final_layer_norm=True)
    return from_config(cfg, dtype=torch.float16, device="cpu", seed=0)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float() if hasattr(model(ids), "logits") else model(ids).float()


@pytest.mark.parametrize("via", ["save_pretrained", "convert", "sparse-bitmask"])
def test_opt_without_final_layer_norm_survives_save_and_convert(via, tmp_path):
    model = _opt_without_final_norm()
    ids = torch.tensor([[3, 7, 11, 2, 9]])
    flash_llm.save_pretrained(model, tmp_path / "a", progress=False)
    out = tmp_path / "a"
    if via != "save_pretrained":
        out = tmp_path / "b"
        convert(tmp_path / "a", out, format="bitmap" if via == "convert" else via, min_sparsity=0.0, progress=False)
    assert json.loads((out / "config.json").read_text())["_remove_final_layer_norm"] is True
    back = flash_llm.from_pretrained(out, progress=False)
    assert back.config.remove_final_layer_norm
    assert torch.equal(_logits(back, ids), _logits(model, ids))  # (the same fp16 weights, compressed exactly)


def test_config_dict_still_drops_transformers_bookkeeping():
    from flash_llm.checkpoint._model import config_dict

    out = config_dict(torch.nn.Module(), {"model_type": "opt", "_name_or_path": "x", "_attn_implementation": "eager",
                                          "_remove_final_layer_norm": False})
    assert out == {"model_type": "opt", "_remove_final_layer_norm": False}


@pytest.fixture(scope="module")
def fp16_checkpoint(tmp_path_factory):
    """The bundled model pruned by magnitude to 60 % by ``flash-llm prune`` (fp16 bitmap layers, its default)."""
    path = tmp_path_factory.mktemp("wf") / "fp16"
    assert main(["prune", "tiny-shakespeare", "--method", "magnitude", "--sparsity", "0.6", "--out", str(path),
                 "--calib", str(data.corpus_path()), "--device", "cpu"]) == 0
    return path


def test_sparsify_for_dtype(fp16_checkpoint):
    assert sparsify_for_dtype(fp16_checkpoint, None) is None
    assert sparsify_for_dtype(fp16_checkpoint, torch.float16) is None
    assert sparsify_for_dtype(bundled.path(), torch.bfloat16) is None  # (a dense checkpoint loads in any dtype)
    redo = sparsify_for_dtype(fp16_checkpoint, torch.bfloat16)
    assert isinstance(redo, SparsifyConfig) and redo.format == "bitmap"
    model = flash_llm.from_pretrained(fp16_checkpoint, dtype=torch.bfloat16, sparsify=redo, progress=False)
    ref = flash_llm.from_pretrained(fp16_checkpoint, progress=False)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, SparseLinear)]
    assert layers
    for name, layer in layers:
        assert layer.weight_dtype == torch.bfloat16, name
        assert torch.equal(layer.weight.to_dense(), ref.get_submodule(name).weight.to_dense().to(torch.bfloat16))


def test_generate_in_another_dtype_than_the_checkpoints(fp16_checkpoint, capsys):
    rc = main(["generate", str(fp16_checkpoint), "--prompt", "ROMEO:", "--max-new-tokens", "3", "--device", "cpu",
               "--dtype", "bfloat16", "--ignore-eos"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "3 new tokens" in err and "bfloat16 on cpu" in err, err


def test_convert_names_its_own_bad_arguments(fp16_checkpoint, tmp_path):
    with pytest.raises(ValueError, match=r"^format must be one of .*'sparse-bitmask'.*got 'sparse_bitmask'"):
        convert(fp16_checkpoint, tmp_path / "x", format="sparse_bitmask", progress=False)
    with pytest.raises(ValueError, match=r"^min_sparsity must be a number in \[0, 1\], got 1.5"):
        convert(fp16_checkpoint, tmp_path / "x", min_sparsity=1.5, progress=False)
    with pytest.raises(ValueError, match=r"^min_sparsity must be"):
        convert(fp16_checkpoint, tmp_path / "x", format="sparse-bitmask", min_sparsity=True, progress=False)
    assert not (tmp_path / "x").exists()


def test_fp32_model_saved_reloads_without_a_dtype(tmp_path):
    """``save_pretrained`` of an fp32 model (``bundled.load``'s default) reloads exactly with ``from_pretrained``, as
    it is and with ``sparsify=False``; a dense fp32 checkpoint to be compressed is still refused, naming dtype."""
    model = bundled.load("tiny-shakespeare")
    assert model.lm_head.weight.dtype == torch.float32
    flash_llm.save_pretrained(model, tmp_path / "fp32", progress=False)
    x = torch.randint(0, 256, (1, 8))
    for kw in ({}, {"sparsify": False}):
        back = flash_llm.from_pretrained(tmp_path / "fp32", progress=False, **kw)
        assert back.lm_head.weight.dtype == torch.float32
        assert torch.equal(_logits(back, x), _logits(model, x))
    with pytest.raises(ValueError, match=r"fp16/bf16 values: pass dtype=torch.float16 or torch.bfloat16"):
        flash_llm.from_pretrained(tmp_path / "fp32", sparsify=SparsifyConfig(), progress=False)

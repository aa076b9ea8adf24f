"""flash_llm.parallel edge cases from the session-73 tensor-parallel bug hunt (CPU, gloo).

1. A flash-llm checkpoint stored in another dtype than the one asked for: ``load_tensor_parallel(..., dtype=X,
   sparsify=SparsifyConfig())`` decompresses its layers and compresses the slices again in X, as
   ``from_pretrained`` does, and ``flash-llm generate --dtype X --tp`` prints what the same command without ``--tp``
   prints (it refused both before).  ``sparsify=None`` still refuses the other dtype by name.
2. A tied model's compressed checkpoint (flash-llm or sparse-bitmask) that also stores ``lm_head.weight``: the
   tensor is not read, with the warning the dense route gives, instead of "another model's checkpoint".
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import flash_llm
from flash_llm.checkpoint import convert
from flash_llm.cli import main
from flash_llm.models import ModelConfig, from_config
from flash_llm.parallel import load_tensor_parallel
from flash_llm.prune import magnitude_prune_

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IDS = torch.tensor([[5, 6, 7, 8, 9, 72, 101]])
FORMATS = {"bitmap": "BitmapTiles", "tiled-csl": "TiledCSL", "delta-rows": "DeltaRows"}


def _model(family: str, seed: int = 0):
    """A tiny fp16 model, byte vocabulary (256: ``generate`` reads the prompt with the byte tokenizer), its
    projections magnitude-pruned to 70 % (lm_head dense)."""
    extra = dict(activation="relu", attention_bias=True, mlp_bias=True, tie_word_embeddings=True) \
        if family == "opt" else dict(num_kv_heads=2)
    cfg = ModelConfig(family=family, vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                      max_position_embeddings=64, **extra)
    torch.manual_seed(seed)
    m = from_config(cfg, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        for n, p in m.named_parameters():
            norm = "norm" in n and n.endswith("weight")
            p.copy_(1 + 0.1 * torch.randn_like(p) if norm else 0.1 * torch.randn_like(p))
    m = m.half().eval()
    magnitude_prune_(m, 0.7, filter_fn=lambda mod, fqn: fqn != "lm_head")
    return m


def _save_hf(model, folder, keep_tied_lm_head: bool = False) -> None:
    os.makedirs(folder)
    state = {k: v.contiguous().clone() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings and not keep_tied_lm_head:
        del state["lm_head.weight"]
    save_file(state, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(model.config.to_hf(), f)


def _flash(tmp_path, family="llama", fmt="bitmap"):
    _save_hf(_model(family), tmp_path / "pruned")
    convert(tmp_path / "pruned", tmp_path / fmt, format=fmt, progress=False)
    return tmp_path / fmt


# ---- 1. a flash-llm checkpoint in another dtype ------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["bitmap", "tiled-csl"])
def test_flash_checkpoint_of_another_dtype_is_reencoded_with_sparsify(world1, tmp_path, fmt):
    path = _flash(tmp_path, fmt=fmt)
    sp = flash_llm.SparsifyConfig(format=fmt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        tpm, rep = load_tensor_parallel(path, world1, dtype=torch.bfloat16, sparsify=sp, progress=False)
        one = flash_llm.from_pretrained(path, dtype=torch.bfloat16, sparsify=sp, backend="flash", progress=False)
    assert len(rep.layers) == 14 and {s.format for s in rep.layers} == {FORMATS[fmt]}
    sparse = [m for m in tpm.modules() if isinstance(m, flash_llm.SparseLinear)]
    assert len(sparse) == 14 and {m.weight.dtype for m in sparse} == {torch.bfloat16}
    assert {p.dtype for p in tpm.parameters()} == {torch.bfloat16}
    with torch.no_grad():  # world size 1: the same layers as one process, compressed again from the same values
        assert torch.equal(tpm(IDS), one(IDS))
    # as saved (sparsify=None), the other dtype is still refused by name
    with pytest.raises(flash_llm.FormatError, match=r"'model\.layers\.0\.\w+\.\w+_proj' is compressed as "
                                                    r"torch\.float16 but the model is loaded in torch\.bfloat16"):
        load_tensor_parallel(path, world1, dtype=torch.bfloat16, progress=False)


def _generate(capsys, path, *extra):
    rc = main(["generate", str(path), "--prompt", "Hello", "--max-new-tokens", "5", "--ignore-eos", "--dtype",
               "bfloat16", "--device", "cpu", *extra])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out


def test_generate_dtype_tp_at_world_size_one_prints_what_one_process_prints(tmp_path, capsys):
    path = _flash(tmp_path)
    one = _generate(capsys, path)
    assert _generate(capsys, path, "--tp") == one and one.startswith("Hello")
    assert not torch.distributed.is_initialized()


def test_generate_dtype_tp_on_two_ranks_prints_what_one_process_prints(tmp_path, capsys):
    """``flash-llm generate --dtype bfloat16 --tp`` under torchrun on 2 gloo ranks, on an fp16 flash-llm OPT
    checkpoint (biases: the row-parallel one added once), greedy: rank 0 prints the single-process text."""
    path = _flash(tmp_path, family="opt")
    one = _generate(capsys, path)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "flash_llm.cli", "generate", str(path), "--prompt", "Hello", "--max-new-tokens", "5", "--ignore-eos",
           "--dtype", "bfloat16", "--device", "cpu", "--tp"]  # (gloo ranks on the CPU, on a GPU machine too)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "holds layers compressed as" not in proc.stderr
    assert proc.stdout == one  # rank 0 prints, rank 1 does not


# ---- 2. a tied model's compressed checkpoint that stores lm_head.weight ------------------------------------------
@pytest.mark.parametrize("fmt", ["bitmap", "sparse-bitmask"])
def test_tied_lm_head_stored_in_a_compressed_checkpoint_is_not_read(world1, tmp_path, fmt):
    model = _model("opt", seed=1)
    _save_hf(model, tmp_path / "pruned")
    path = tmp_path / fmt
    convert(tmp_path / "pruned", path, format=fmt, progress=False)
    f = str(path / "model.safetensors")
    with safe_open(f, "pt") as h:
        meta = h.metadata()
    state = load_file(f)
    assert "lm_head.weight" not in state
    state["lm_head.weight"] = state["model.decoder.embed_tokens.weight"].clone()  # as many HF files store it
    save_file(state, f, metadata=meta)
    with pytest.warns(UserWarning, match=r"1 tensor\(s\) of the checkpoint are not weights of a opt model and were "
                                         r"not read, e\.g\. \['lm_head\.weight'\]"):
        tpm, _ = load_tensor_parallel(path, world1, progress=False)
    assert tpm.lm_head.weight is tpm.input_embeddings().weight
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        one = flash_llm.from_pretrained(path, dtype=torch.float16, progress=False)
    with torch.no_grad():
        assert torch.equal(tpm(IDS), one(IDS))
    # the dense route says the same of the dense checkpoint that stores it
    _save_hf(model, tmp_path / "dense-with-lm-head", keep_tied_lm_head=True)
    with pytest.warns(UserWarning, match=r"1 tensor\(s\) .* not read, e\.g\. \['lm_head\.weight'\]"):
        load_tensor_parallel(tmp_path / "dense-with-lm-head", world1, progress=False)
    # any other tensor the model has no place for is still refused
    state["model.decoder.layers.9.fc1.weight"] = state["model.decoder.embed_tokens.weight"].clone()
    save_file(state, f, metadata=meta)
    with pytest.raises(flash_llm.FormatError, match=r"tensor 'model\.decoder\.layers\.9\.fc1\.weight' has no place"):
        load_tensor_parallel(path, world1, progress=False)


# ---- 5. generate --tp --device: the device picks the group's backend ---------------------------------------------
def test_generate_tp_device_cpu_asks_for_gloo_ranks(tmp_path, capsys, monkeypatch):
    """``--device cpu --tp`` runs gloo ranks on the CPU (on a GPU machine --tp took NCCL on CUDA whatever --device
    said: the tests' CPU text and the GPU ranks' then differed); ``cuda:N`` with --tp is refused by name (each rank
    takes cuda:LOCAL_RANK)."""
    import flash_llm.parallel as par
    from flash_llm.checkpoint import cli as ckpt_cli

    path = _flash(tmp_path)
    asked = []
    real = par.init_tensor_parallel

    def spy(backend=None, **kw):
        asked.append(backend)
        return real(backend, **kw)

    monkeypatch.setattr(par, "init_tensor_parallel", spy)
    one = _generate(capsys, path)
    assert _generate(capsys, path, "--tp") == one and asked == ["gloo"]
    with pytest.raises(ValueError, match=r"--device cuda:1 with --tp: each rank runs on cuda:LOCAL_RANK"):
        ckpt_cli._load_tensor_parallel(path, None, torch.device("cuda", 1))
    assert asked == ["gloo"] and not torch.distributed.is_initialized()

"""Session 80's fixes, each test failing without its fix: a model loaded by transformers itself is protected from a
save over the directory it came from, as one loaded by ``flash_llm.from_pretrained`` is."""

from __future__ import annotations

import os

import pytest
import torch

import flash_llm
from flash_llm.checkpoint import write_sparse_bitmask

from _ckpt import hf_model, save_hf


def test_saving_a_transformers_loaded_model_over_its_source_is_refused(tmp_path):
    import transformers

    d = save_hf(hf_model("llama", seed=8), tmp_path / "src")
    (d / "tokenizer.json").write_text("{}")
    before = sorted(os.listdir(d))
    model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float16)
    flash_llm.sparsify_(model)
    for save in (flash_llm.save_pretrained, write_sparse_bitmask):
        with pytest.raises(ValueError, match=rf"the model's source directory {d} and path {d} are the same directory"
                                             rf".*loaded from {d}, whose tokenizer files.*nothing was written"):
            save(model, d, overwrite=True, progress=False)
        with pytest.raises(ValueError, match=rf"source directory {d} lies inside path {tmp_path}"):
            save(model, tmp_path, overwrite=True, progress=False)
    assert sorted(os.listdir(d)) == before
    flash_llm.save_pretrained(model, tmp_path / "elsewhere", progress=False)  # anywhere else: fine
    assert (tmp_path / "elsewhere" / "config.json").exists()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
@pytest.mark.parametrize("n", [1, 8, 40])
def test_spmm_add_with_a_bias_inside_acc(fmt, dtype, n, device):
    """``spmm_add_(acc, x, w, acc[-1])``: the bias row is read as it was before the call (on the GPU the kernels get a
    copy of it), for every format on the one-token, multi-token and warpgroup paths: the same result as with a bias
    apart from acc, within two units in the last place (split-K sums by atomics may differ in the last bits).  (Session
    80's first GPU run of this test called a ``flash_llm.spmm_add_`` that does not exist: it now runs on the CPU too.)"""
    from conftest import sparse_weight, ulp
    from flash_llm import ops

    m, k = 256, 512
    wd = sparse_weight(m, k, 0.2, dtype, seed=n).to(device)
    w = fmt.from_dense(wd)
    g = torch.Generator(device=device).manual_seed(n)
    x = torch.randn(n, k, generator=g, device=device).to(dtype)
    acc = torch.randn(n, m, generator=g, device=device).to(dtype)
    apart = acc.clone()
    ops.spmm_add_(apart, x, w, acc[-1].clone())
    ops.spmm_add_(acc, x, w, acc[-1])
    assert torch.isfinite(apart).all()
    err = float((acc.float() - apart.float()).abs().max())
    assert err <= 2 * ulp(dtype, float(apart.float().abs().max())), err


@pytest.mark.parametrize("which", ["cwd", "parent"])
def test_saving_over_the_working_directory_is_refused_in_python_too(tmp_path, monkeypatch, which):
    """``save_pretrained(model, os.getcwd(), overwrite=True)`` (and ``convert``, and a parent of the working
    directory) moved the working directory aside and deleted it with everything in it; the CLI refused it, the Python
    API did not."""
    from flash_llm.checkpoint import convert

    src = save_hf(hf_model("llama", seed=9), tmp_path / "src")
    work = tmp_path / "parent" / "work"
    work.mkdir(parents=True)
    (work / "keep.txt").write_text("mine")
    monkeypatch.chdir(work)
    out = work if which == "cwd" else work.parent
    model = flash_llm.from_pretrained(src, progress=False)
    for save in (lambda: flash_llm.save_pretrained(model, out, overwrite=True, progress=False),
                 lambda: convert(src, out, overwrite=True, progress=False)):
        with pytest.raises(ValueError, match="current directory"):
            save()
        assert (work / "keep.txt").read_text() == "mine"
    flash_llm.save_pretrained(model, work / "sub", progress=False)  # (inside it: fine)
    assert (work / "sub" / "config.json").exists() and (work / "keep.txt").exists()

"""Session 84: the transformers quantizer under a transformers whose ``update_weight_conversions`` hook takes the
conversions only (the H100 image's transformers: ``hf_quantizer.update_weight_conversions(weight_conversions)``).
Session 83 defined the hook as ``(weight_conversions, model)`` and waited for it to install the sparse layers, so every
load of a flash-llm checkpoint by that transformers raised a TypeError (tests/test_checkpoint_gpu.py failed there)."""

from __future__ import annotations

import warnings

import pytest
import torch

import flash_llm

from _ckpt import hf_model, logits, one_arg_hook

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_a_transformers_whose_hook_takes_no_model_loads_the_checkpoint(tmp_path, monkeypatch, family):
    model = hf_model(family)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        flash_llm.sparsify_(model)
    model.save_pretrained(tmp_path / "c")
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    want = logits(model, ids)

    one_arg_hook(monkeypatch)  # that transformers: the base hook without the model, called with the conversions alone
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "c")
    sparse = [n for n, m in loaded.named_modules() if isinstance(m, flash_llm.SparseLinear)]
    assert sparse and len(sparse) == sum(isinstance(m, flash_llm.SparseLinear) for m in model.modules())
    for n in sparse:  # the same weights (logits: transformers' own RoPE buffers differ by the load's dtype path)
        torch.testing.assert_close(loaded.get_submodule(n).to_dense(), model.get_submodule(n).to_dense(), rtol=0,
                                   atol=0)
    torch.testing.assert_close(logits(loaded, ids), want, rtol=0.02, atol=0.02)


def test_takes_model_reads_the_hooks_signature():
    from flash_llm.checkpoint.hf_quantizer import _takes_model

    class H:
        def one(self, conversions):
            return conversions

        def two(self, conversions, model):
            return conversions

        def star(self, *args):
            return args

    h = H()
    assert (_takes_model(None), _takes_model(h.one), _takes_model(h.two), _takes_model(h.star)) == (
        False, False, True, True)

"""Session 85: under a transformers whose ``update_weight_conversions`` hook takes the conversions only (5.17, the H100
image's), session 84 installed the sparse layers in ``preprocess_model`` with the model's own renames, so a load with
``from_pretrained(..., key_mapping=...)`` raised "has no such module" (three tests of ``test_hfq_fixes83.py`` failed on
the GPU machine), and a load that never gave the quantizer its conversions was not refused.  The layers now go in at
that hook in both APIs (5.17 calls it after ``preprocess_model`` too).  Here 5.17's hook is emulated and session 83's
tests run under it."""

from __future__ import annotations

import pytest

import _ckpt
import test_hfq_fixes83 as s83

transformers = pytest.importorskip("transformers")


@pytest.fixture
def one_arg_hook(monkeypatch):
    """transformers 5.17's API (``_ckpt.one_arg_hook``)."""
    _ckpt.one_arg_hook(monkeypatch)


def test_key_mapping_renames_the_sparse_layers_under_a_hook_without_the_model(one_arg_hook, tmp_path):
    s83.test_key_mapping_renames_the_sparse_layers_on_load_and_save(tmp_path)


def test_key_mapping_with_own_names_under_a_hook_without_the_model(one_arg_hook, tmp_path):
    s83.test_save_original_format_false_ignores_a_key_mapping_that_matches_the_own_names(tmp_path)


def test_a_load_without_the_hook_call_is_refused_under_a_hook_without_the_model(one_arg_hook, tmp_path, monkeypatch):
    s83.test_a_load_that_never_names_its_conversions_to_the_quantizer_is_refused(tmp_path, monkeypatch)


def test_a_hook_call_outside_a_load_changes_nothing(one_arg_hook):
    # the hook without a load under way (no preprocess_model before it) returns the conversions as they are
    from flash_llm.checkpoint import hf_quantizer

    q = hf_quantizer.FlashLLMHfQuantizer(hf_quantizer.FlashLLMConfig(sparse_modules={}))
    marker = [object()]
    assert q.update_weight_conversions(marker) is marker
    assert q._pending is None

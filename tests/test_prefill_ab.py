"""benchmarks/prefill_ab.py's settings (the tool itself needs a GPU)."""


import pytest
from conftest import load_script

from flash_llm import kernels

prefill_ab = load_script("benchmarks/prefill_ab.py", "prefill_ab")


def test_settings_parse_names_and_literals():
    got = prefill_ab.parse_settings("base:;nofill:DR_DENSE_NOFILL=1, DR_DENSE_NF_WARPS=4;x:DR_DENSE_NOFILL=true")
    assert got == [("base", {}), ("nofill", {"DR_DENSE_NOFILL": 1, "DR_DENSE_NF_WARPS": 4}),
                   ("x", {"DR_DENSE_NOFILL": True})]


@pytest.mark.parametrize("text, word", [("a:NO_SUCH_SWITCH=1", "NO_SUCH_SWITCH"), ("a:DR_DENSE_NOFILL", "NAME=VALUE"),
                                        (" ; ", "no setting")])
def test_settings_refuse_what_they_cannot_apply(text, word):
    with pytest.raises(ValueError, match=word):
        prefill_ab.parse_settings(text)


def test_applied_sets_and_restores_the_switches():
    before = kernels.DR_DENSE_NOFILL
    with prefill_ab.applied({"DR_DENSE_NOFILL": not before}):
        assert kernels.DR_DENSE_NOFILL is (not before)
    assert kernels.DR_DENSE_NOFILL is before

"""Session 86: ``flash-llm build --arch`` takes the family names its cache already maps (``sm_100f`` fills the
``sm_100`` slot, :func:`flash_llm.kernels._build.canonical_arch`); it refused them before as not looking like an arch."""

from __future__ import annotations

import argparse

import pytest

from flash_llm import cli
from flash_llm.kernels import _build


@pytest.mark.parametrize("arch", ["sm_80", "sm_90a", "sm_100a", "sm_100f", "sm_120f"])
def test_build_arch_takes_plain_specific_and_family_names(arch):
    assert cli._arch(arch) == arch
    assert _build.canonical_arch(arch) == arch.rstrip("af")


@pytest.mark.parametrize("arch", ["hopper", "sm_90x", "sm_", "compute_90", "sm_90af"])
def test_build_arch_refuses_other_names(arch):
    with pytest.raises(argparse.ArgumentTypeError, match="arch must look like 'sm_90'"):
        cli._arch(arch)

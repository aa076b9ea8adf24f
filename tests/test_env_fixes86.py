"""Session 86: environment variables set blank (or to a refused value) read as unset everywhere.

* ``FLASH_LLM_ENCODE_CHUNK_ENTRIES`` / ``_ELEMENTS``: the DeltaRows encoder took any value, blank or refused, as run
  sizes fixed by the environment, so on a GPU its runs stayed at the CPU constants instead of growing with free memory
  (slower builds, no word why).
* ``NCCL_NVLS_ENABLE`` / ``TORCH_SYMM_MEM_DISABLE_MULTICAST`` set blank were kept blank without a warning; NCCL reads a
  blank value as unset, so its default (NVLink multicast on) held where flash-llm says it keeps it off."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from flash_llm.parallel.group import NCCL_ENV_DEFAULTS, nccl_env_defaults

_PROBE = r"""
import json, warnings
warnings.simplefilter("ignore")
import torch
torch.cuda.mem_get_info = lambda device: (8 * 10**9, 80 * 10**9)  # a GPU with 8 GB free, faked
from flash_llm.formats import delta_rows as D
print(json.dumps({"fixed": D._ENCODE_FIXED, "entries": D.ENCODE_CHUNK_ENTRIES, "elements": D.ENCODE_CHUNK_ELEMENTS,
                  "budget": D._encode_budget(torch.device("cuda", 0))}))
"""


def _probe(**env) -> dict:
    e = {k: v for k, v in os.environ.items() if not k.startswith("FLASH_LLM_ENCODE_CHUNK_")}
    e.update(env)
    out = subprocess.run([sys.executable, "-c", _PROBE], env=e, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_blank_or_refused_encode_chunks_are_unset_and_a_valid_one_fixes_the_runs():
    unset = _probe()
    assert not unset["fixed"] and unset["entries"] == 1 << 22 and unset["elements"] == 1 << 26
    assert unset["budget"][0] > 1 << 22  # on a GPU the runs grow with its free memory
    for value in ("", "  ", "abc", "0"):
        assert _probe(FLASH_LLM_ENCODE_CHUNK_ENTRIES=value) == unset, value
        assert _probe(FLASH_LLM_ENCODE_CHUNK_ELEMENTS=value) == unset, value
    fixed = _probe(FLASH_LLM_ENCODE_CHUNK_ENTRIES="4096")
    assert fixed["fixed"] and fixed["entries"] == 4096 and fixed["budget"] == [4096, 1 << 26]


@pytest.mark.parametrize("blank", ["", "  "])
def test_blank_nccl_switches_get_flash_llms_defaults(monkeypatch, blank):
    for k in NCCL_ENV_DEFAULTS:
        monkeypatch.setenv(k, blank)
    assert nccl_env_defaults() == NCCL_ENV_DEFAULTS
    assert {k: os.environ[k] for k in NCCL_ENV_DEFAULTS} == NCCL_ENV_DEFAULTS


def test_a_users_nccl_setting_is_still_kept(monkeypatch):
    monkeypatch.setenv("NCCL_NVLS_ENABLE", " 0 ")
    monkeypatch.setenv("TORCH_SYMM_MEM_DISABLE_MULTICAST", "0")
    assert nccl_env_defaults() == {"NCCL_NVLS_ENABLE": " 0 ", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "0"}
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "2")
    with pytest.warns(UserWarning, match="NCCL_NVLS_ENABLE=2 in the environment turns NVLink multicast"):
        nccl_env_defaults()

"""``kernels.plan``'s cache is keyed by the module switches its planning reads (session 74's dispatch hunt: a switch
set at run time, as ``benchmarks/prefill_ab.py --settings`` does, got a plan cached under the old setting, so a new
kernel was launched on the old grid and rows of Y were never written)."""

from __future__ import annotations

import dis
import types

from flash_llm import kernels as K

_CONSTANTS = {"BITMAP", "TILED_CSL", "DELTA_ROWS", "ROWS_PER_BLOCK", "STRIP_K", "STRIP_M", "_MAX_NT"}


def _globals_read(fn, seen) -> set[str]:
    """The upper-case module globals ``fn`` and the module's functions it calls read (nested code included)."""
    if fn in seen:
        return set()
    seen.add(fn)
    names, codes = set(), [fn.__code__]
    while codes:
        code = codes.pop()
        codes += [c for c in code.co_consts if isinstance(c, types.CodeType)]
        for ins in dis.get_instructions(code):
            if ins.opname not in ("LOAD_GLOBAL", "LOAD_NAME"):
                continue
            v = getattr(K, ins.argval, None)
            if isinstance(v, types.FunctionType) and v.__module__ == K.__name__:
                names |= _globals_read(v, seen)
            elif ins.argval.lstrip("_").isupper() and not isinstance(v, types.ModuleType):
                names.add(ins.argval)
    return names


def test_the_key_lists_every_switch_the_planning_reads():
    read = _globals_read(K._plan.__wrapped__, set()) - _CONSTANTS
    assert read and read <= set(K._PLAN_SWITCHES), sorted(read - set(K._PLAN_SWITCHES))


def test_a_switch_set_at_run_time_gets_its_own_plan(monkeypatch):
    args = (4096, 4096, 1, 0.3, 132, 8, None, K.TILED_CSL, True)  # one token, Tiled-CSL: splits of >= 2 tiles
    first = K.plan(*args)
    assert first.splits * first.kt_per_split == 64 and first.kt_per_split < 32
    monkeypatch.setattr(K, "N1_MIN_TILES", 32)  # (each split at least 32 tiles: at most 2 splits)
    second = K.plan(*args)
    assert second.splits == 2 and second.kt_per_split == 32
    monkeypatch.setattr(K, "N1_MIN_TILES", first.kt_per_split)
    assert K.plan(*args) == first

"""benchmarks/uneven_rows.py on the CPU: its limits, and its two settings over a tiny model (the same tokens, the
shrinking batch only where asked)."""
from __future__ import annotations


import torch
from conftest import load_script

from flash_llm.engine import Engine
from flash_llm.models.synthetic import build_synthetic

uneven_rows = load_script("benchmarks/uneven_rows.py", "uneven_rows")


def test_limits_are_seeded_and_in_range():
    a = uneven_rows.draw_limits(50, 16, 40, seed=2)
    assert a == uneven_rows.draw_limits(50, 16, 40, seed=2) != uneven_rows.draw_limits(50, 16, 40, seed=3)
    assert min(a) >= 16 and max(a) <= 40 and len(set(a)) > 10


def test_settings_give_the_same_tokens_and_only_one_shrinks():
    model, _ = build_synthetic(uneven_rows.TINY, 0.8, device="cpu", progress=False, fmt="delta-rows")
    eng = Engine(model, max_batch=4, max_seq=40)
    limits = [3, 20, 1, 9]
    prompts = torch.randint(0, 300, (4, 6), generator=torch.Generator().manual_seed(0)).tolist()
    res = uneven_rows.run_settings(eng, prompts, limits, rounds=2)
    assert torch.equal(res["shrink"]["tokens"], res["full"]["tokens"])
    assert res["full"]["sizes"] == [4] * 19 and sorted(set(res["shrink"]["sizes"])) == [1, 2, 4]
    assert all(len(r["s"]) == 2 and min(r["s"]) > 0 for r in res.values())
    assert eng._decode.__func__ is Engine._decode  # (the spy taken away again)

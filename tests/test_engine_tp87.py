"""Session 87's engine fix (CPU, 2 gloo ranks): a KV cache refused on one tensor-parallel rank is refused on all.

``Engine(...)`` is built on every rank of a tensor-parallel model.  Where the KV cache's room check (the one before the
model is changed, or the one again before the allocation) or the allocation itself failed on one rank only (another
process took memory on that GPU), that rank raised its ``ValueError`` (and undid its fuse / merge / training flags)
while the other ranks built their engines, and then waited in their first collective (``generate``'s all-reduces)
until the process group's timeout.  The ranks now agree (``Engine._cache_on_every_rank``: one small all-reduce, an
all-gather of the outcomes where one failed): if any rank refused its cache, every rank drops its own, undoes its
changes to the model as the failing path does, and raises a ``ValueError``; the refusing rank its own, the others one
naming the refusing rank.  A single-process engine runs no collective and raises as before.  Rank 1's refusal is made
by monkeypatching ``flash_llm.engine._cache_room`` (1 byte free) or ``KVCache`` (torch's out-of-memory error) in its
process only; the group's timeout is short, so a rank left waiting fails the test instead of hanging it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

import flash_llm.engine as E
from flash_llm.engine import Engine
from flash_llm.models import ModelConfig, from_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GROUP_TIMEOUT_S = 30  # (a rank left waiting in a collective: a RuntimeError after this)
OOM = (r"^the KV cache of max_batch=2 x max_seq=32 \(0\.00 GiB\) could not be allocated on cpu: lower max_batch or "
       r"max_seq \(")

# both ranks: each case on a fresh sharded tiny Llama (mixed training flags, so the engine's eval() shows), its
# Engine(fuse=True) with rank 1's (or both ranks') cache refused as the case says; then a barrier (the ranks must
# still be in step: mismatched collectives would pair up or time out there)
WORKER = r'''
import json, sys, time, torch
import flash_llm.engine as E
from flash_llm.engine import Engine
from flash_llm.models import ModelConfig, from_config
from flash_llm.parallel import init_tensor_parallel, tensor_parallel_

out = sys.argv[1]
tp = init_tensor_parallel("gloo", timeout=TIMEOUT)
cfg = ModelConfig(family="llama", vocab_size=101, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  intermediate_size=128, max_position_embeddings=64)


def snapshot(m):
    tree = [(p, type(x).__name__, x.training, getattr(x, "fused", None)) for p, x in m.named_modules()]
    return tree, [(k, v.detach().clone()) for k, v in m.state_dict().items()]


def same(a, b):
    return a[0] == b[0] and [k for k, _ in a[1]] == [k for k, _ in b[1]] and all(
        torch.equal(x, y) for (_, x), (_, y) in zip(a[1], b[1]))


def room_first(device):  # (1 byte free: refused at the first check, before the model is changed)
    return 1


calls = []


def room_second(device):  # (unknown at the first check, 1 byte at the second: after the fuse / eval())
    calls.append(device)
    return 0 if len(calls) == 1 else 1


def oom(*args):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")


cases = {  # name: (what is patched, the value, the ranks patched)
    "first_check": ("_cache_room", room_first, [1]),
    "second_check": ("_cache_room", room_second, [1]),
    "allocation": ("KVCache", oom, [1]),
    "rank0_first_check": ("_cache_room", room_first, [0]),
    "every_rank": ("_cache_room", room_first, [0, 1]),
    "fits": ("_cache_room", E._cache_room, []),
}
res = {}
for name, (attr, value, ranks) in cases.items():
    model = from_config(cfg, dtype=torch.float32, seed=87)
    tensor_parallel_(model, tp)
    model.train()
    model.model.layers[1].eval()
    before = snapshot(model)
    real = getattr(E, attr)
    if tp.rank in ranks:
        setattr(E, attr, value)
    calls.clear()
    t = time.perf_counter()
    try:
        eng = Engine(model, max_batch=2, max_seq=32, fuse=True)
        got = {"built": True}
    except Exception as e:
        eng, got = None, {"type": type(e).__name__, "msg": str(e), "cause": type(e.__cause__).__name__}
    got["seconds"] = time.perf_counter() - t
    setattr(E, attr, real)
    got["unchanged"] = same(snapshot(model), before)
    got["fused"] = any(getattr(x, "fused", False) for x in model.modules())
    if name == "fits":  # (built on both ranks; no generate: fuse=True compiles its kernels, seconds on a CPU)
        got["cache"] = eng.cache is not None
    del eng
    tp.barrier()
    res[name] = got
with open(f"{out}/rank{tp.rank}.json", "w") as f:
    json.dump(res, f)
tp.close()
'''


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    d = tmp_path_factory.mktemp("tp87")
    script = d / "worker.py"
    script.write_text(WORKER.replace("TIMEOUT", str(GROUP_TIMEOUT_S)))
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
           str(d)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=4 * GROUP_TIMEOUT_S, cwd=ROOT)
    except subprocess.TimeoutExpired as e:
        out = lambda b: (b or b"").decode(errors="replace") if isinstance(b, bytes) else (b or "")  # noqa: E731
        pytest.fail(f"torchrun did not finish within {4 * GROUP_TIMEOUT_S} s (a rank waiting for another?):\n"
                    f"{out(e.stdout)[-3000:]}\n{out(e.stderr)[-5000:]}")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]
    return [json.loads((d / f"rank{r}.json").read_text()) for r in range(2)]


def _other(failed: int, rank: int) -> str:
    return (f"the KV cache of max_batch=2 x max_seq=32 (0.00 GiB a rank) could not be allocated on tensor-parallel "
            f"rank {failed} of 2 (the error there says why), so no rank builds the engine (this rank, {rank}, had "
            f"room for its own on cpu): lower max_batch or max_seq, or free memory on that rank's device")


@pytest.mark.parametrize("case, why, cause", [
    ("first_check", r"0\.00 GiB free\)$", "MemoryError"),
    ("second_check", r"0\.00 GiB free\)$", "MemoryError"),
    ("allocation", r"CUDA out of memory\. Tried to allocate 80\.00 GiB\)$", "OutOfMemoryError"),
])
def test_a_cache_refused_on_one_rank_raises_on_every_rank_and_undoes_the_engine(two_ranks, case, why, cause):
    mine, other = two_ranks[1][case], two_ranks[0][case]
    assert mine["type"] == "ValueError" and re.match(OOM + why, mine["msg"]), mine  # (its own error, as before)
    assert mine["cause"] == cause, mine
    assert other.get("type") == "ValueError" and other["msg"] == _other(1, 0), other  # (rank 0 built its engine before)
    assert other["cause"] == "NoneType"
    for got in (mine, other):  # promptly (not the group's timeout), and the model as it was: not fused, train()
        assert got["seconds"] < GROUP_TIMEOUT_S / 3, got
        assert got["unchanged"] and not got["fused"], got


def test_a_cache_refused_on_rank_0_names_it_on_rank_1(two_ranks):
    mine, other = two_ranks[0]["rank0_first_check"], two_ranks[1]["rank0_first_check"]
    assert mine["type"] == "ValueError" and re.match(OOM, mine["msg"]), mine
    assert other.get("msg") == _other(0, 1), other
    assert all(two_ranks[r]["rank0_first_check"]["unchanged"] for r in range(2))


def test_a_cache_refused_on_every_rank_raises_each_ranks_own_error(two_ranks):
    for r in range(2):
        got = two_ranks[r]["every_rank"]
        assert got["type"] == "ValueError" and re.match(OOM + r"0\.00 GiB free\)$", got["msg"]), (r, got)
        assert got["unchanged"], (r, got)


def test_room_on_every_rank_builds_the_engines(two_ranks):
    for r in range(2):
        got = two_ranks[r]["fits"]
        assert got["built"] and got["cache"] and got["fused"] and not got["unchanged"], (r, got)  # (fuse, eval())


# ---- one process: no collective, the same error as before -----------------------------------------------------------
CFG = ModelConfig(family="llama", vocab_size=97, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  intermediate_size=96, max_position_embeddings=64)


@pytest.mark.parametrize("first", [True, False])
def test_a_single_process_engine_refuses_its_cache_as_before_without_agreeing(monkeypatch, first):
    def agree(*args):
        raise AssertionError("a single-process engine ran the ranks' agreement")

    monkeypatch.setattr(Engine, "_cache_on_every_rank", agree, raising=False)
    calls = []
    monkeypatch.setattr(E, "_cache_room", lambda device: calls.append(device) or (1 if first or len(calls) > 1 else 0))
    model = from_config(CFG, dtype=torch.float32, seed=87).train()
    tree = [(p, type(m).__name__, m.training, getattr(m, "fused", None)) for p, m in model.named_modules()]
    with pytest.raises(ValueError, match=OOM + r"0\.00 GiB free\)$") as e:
        Engine(model, max_batch=2, max_seq=32, merge=True, fuse=True)
    assert isinstance(e.value.__cause__, MemoryError) and len(calls) == (1 if first else 2)
    assert [(p, type(m).__name__, m.training, getattr(m, "fused", None)) for p, m in model.named_modules()] == tree
    monkeypatch.setattr(E, "_cache_room", lambda device: 1 << 40)
    assert Engine(model, max_batch=2, max_seq=32).cache is not None


def test_a_world_size_one_engine_refused_raises_its_own_error_and_undoes(world1, monkeypatch):
    from flash_llm.parallel import tensor_parallel_

    model = from_config(CFG, dtype=torch.float32, seed=87)
    tensor_parallel_(model, world1)
    model.train()
    tree = [(p, type(m).__name__, m.training, getattr(m, "fused", None)) for p, m in model.named_modules()]

    def oom(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    monkeypatch.setattr(E, "KVCache", oom)
    with pytest.raises(ValueError, match=OOM + r"CUDA out of memory\. Tried to allocate 80\.00 GiB\)$") as e:
        Engine(model, max_batch=2, max_seq=32, fuse=True)
    assert isinstance(e.value.__cause__, torch.OutOfMemoryError)
    assert [(p, type(m).__name__, m.training, getattr(m, "fused", None)) for p, m in model.named_modules()] == tree

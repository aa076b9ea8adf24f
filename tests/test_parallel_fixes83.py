"""Session 83 fixes from the bug hunt of flash_llm/parallel (CPU, gloo: 2 ranks under torchrun, or world size 1).

1. ``load_tensor_parallel`` refuses a checkpoint on every rank or on none: a refusal of one rank's slice only (a
   float32 value above fp16's 65504 in that rank's rows or columns) is agreed on at the end of the load
   (``TensorParallel.raise_if_any``), so the other ranks raise the same error instead of returning a model and
   waiting for the failed rank in their next collective; ``flash-llm generate --tp`` prints the same ``error: ...``
   on every rank and each exits with status 2.
4. ``init_tensor_parallel(timeout=...)``: inf, NaN, a value beyond ``MAX_TIMEOUT`` are refused by a ValueError
   naming ``timeout`` (they crashed in ``datetime`` or gloo); any real number of seconds (numpy too) is accepted.
5. docs/parallel.md's ``ShardReport`` example is what the code prints (rank 0 holds the row-parallel biases).

This file is also the 2-rank worker of test 1 (run by torchrun as ``__main__``).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import random
import re
import subprocess
import sys
import types
import warnings

import pytest
import torch
from safetensors.torch import save_file

import flash_llm
from flash_llm.models import ModelConfig, from_config
from flash_llm.parallel import ShardReport, init_tensor_parallel, load_tensor_parallel, tensor_parallel_
from flash_llm.parallel.group import MAX_TIMEOUT
from flash_llm.prune import magnitude_prune_

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_TIMEOUT_S = 240  # the whole torchrun launch (the group's own timeout is 30 s: a hang fails, not waits)
GROUP_TIMEOUT_S = 30


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p])}


def _torchrun(*args, timeout=RUN_TIMEOUT_S) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    try:
        return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired as e:
        out = lambda b: (b or b"").decode(errors="replace") if isinstance(b, bytes) else (b or "")  # noqa: E731
        pytest.fail(f"torchrun did not finish within {timeout} s (a rank waiting for another?):\n"
                    f"{out(e.stdout)[-3000:]}\n{out(e.stderr)[-6000:]}")


def _llama_fp32(vocab=64, seed=None):
    """A tiny fp32 Llama (4 heads, 2 KV heads: q_proj 64x64, o_proj 64x64) with fresh random weights."""
    cfg = ModelConfig(family="llama", vocab_size=vocab, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=128, max_position_embeddings=64)
    torch.manual_seed(random.randrange(2**31) if seed is None else seed)
    return from_config(cfg, dtype=torch.float32, device="cpu")


def _save(state: dict, config, folder) -> str:
    os.makedirs(folder)
    save_file({k: v.contiguous().clone() for k, v in state.items()}, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config.to_hf(), f)
    return str(folder)


def _with_big_value(model, key: str, rows, cols) -> dict:
    """The model's state with one float32 value beyond fp16's range at a random place of ``key``'s ``rows`` x
    ``cols`` ranges (one rank's slice)."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    r, c = random.randrange(*rows), random.randrange(*cols)
    state[key][r, c] = random.choice([-1, 1]) * random.uniform(7e4, 1e7)
    return state


# ---- 1. a refusal on one rank only: every rank raises ----------------------------------------------------------------
def _outcome(fn) -> dict:
    """What ``fn()`` did on this rank: ``{"ok": ...}`` or the exception's type, message and notes."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
        return {"ok": True, "warnings": [(str(w.message), os.path.abspath(w.filename)) for w in caught]}
    except Exception as e:
        return {"type": type(e).__name__, "msg": str(e), "notes": getattr(e, "__notes__", [])}


def _worker(out_dir: str, col: str, row: str, fine: str) -> None:
    """Under torchrun (2 ranks): load each checkpoint in fp16 on both ranks, then a barrier (the ranks must be in
    step after each); write what happened to ``out_dir/rank<r>.json``."""
    tp = init_tensor_parallel("gloo", timeout=GROUP_TIMEOUT_S)
    got = {}

    class Unpicklable(ValueError):  # (a local class: pickle cannot find it by name)
        pass

    def refuse_on_rank_1():
        tp.raise_if_any(Unpicklable("only rank 1's") if tp.rank == 1 else None, "in the test")

    for name, fn in [("column", lambda: load_tensor_parallel(col, tp, dtype=torch.float16, progress=False)),
                     ("row", lambda: load_tensor_parallel(row, tp, dtype=torch.float16, progress=False)),
                     ("fine", lambda: load_tensor_parallel(fine, tp, dtype=torch.float16, progress=False)),
                     ("unpicklable", refuse_on_rank_1)]:
        got[name] = _outcome(fn)
        tp.barrier()  # (mismatched collectives would pair up or time out here)
    with open(os.path.join(out_dir, f"rank{tp.rank}.json"), "w") as f:
        json.dump(got, f)
    tp.close()


def test_a_checkpoint_refused_on_one_rank_is_refused_on_every_rank(tmp_path):
    m = _llama_fp32()
    q, o = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.o_proj.weight"
    # q_proj is column-parallel: rank 1 reads rows 32..63; o_proj row-parallel: rank 0 reads columns 0..31
    col = _save(_with_big_value(m, q, (32, 64), (0, 64)), m.config, tmp_path / "col")
    row = _save(_with_big_value(m, o, (0, 64), (0, 32)), m.config, tmp_path / "row")
    fine = {k: v.detach().clone() for k, v in m.state_dict().items()}
    fine["extra.weight"] = torch.zeros(2)  # (not the model's: the unused-tensor warning, told at the caller)
    fine = _save(fine, m.config, tmp_path / "fine")
    proc = _torchrun(os.path.abspath(__file__), str(tmp_path), col, row, fine)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    for case, folder, key, failed in [("column", col, q, 1), ("row", row, o, 0)]:
        got = [r[case] for r in ranks]
        assert [g.get("type") for g in got] == ["LossyCastError"] * 2, got  # (a rank returned a model before)
        assert got[0]["msg"] == got[1]["msg"]  # the same words on every rank
        assert re.match(rf"^{re.escape(folder)}/model\.safetensors: tensor '{re.escape(key)}' cannot "
                        r"be cast to torch\.float16: 1 finite value\(s\) overflow to inf", got[0]["msg"])
        assert got[failed]["notes"] == []  # the failed rank: its own error
        assert got[1 - failed]["notes"] == [f"(raised on tensor-parallel rank {failed} of 2 while loading the "
                                            f"checkpoint; rank {1 - failed} stopped with it)"]

    for r in ranks:  # a checkpoint every rank reads is loaded as before, the warning pointing at the caller
        assert r["fine"]["ok"] and len(r["fine"]["warnings"]) == 1
        msg, where = r["fine"]["warnings"][0]
        assert "1 tensor(s) of the checkpoint are not weights" in msg and "extra.weight" in msg
        assert where == os.path.abspath(__file__)
    # an error that does not pickle reaches the other rank as a RuntimeError quoting it
    assert ranks[1]["unpicklable"] == {"type": "Unpicklable", "msg": "only rank 1's", "notes": []}
    assert ranks[0]["unpicklable"]["type"] == "RuntimeError"
    assert ranks[0]["unpicklable"]["msg"] == "Unpicklable: only rank 1's"
    assert ranks[0]["unpicklable"]["notes"] == ["(raised on tensor-parallel rank 1 of 2 in the test; rank 0 stopped "
                                                "with it)"]


def test_generate_tp_prints_the_same_error_on_every_rank_and_exits_2(tmp_path):
    """``flash-llm generate --tp`` on a float32 checkpoint with a value beyond fp16 in rank 1's rows of q_proj:
    each rank prints ``error: ...`` and exits with status 2 (rank 0 went on to print the prompt and died in the
    engine's first all-reduce with a gloo traceback before)."""
    m = _llama_fp32(vocab=256)
    path = _save(_with_big_value(m, "model.layers.0.self_attn.q_proj.weight", (32, 64), (0, 64)), m.config,
                 tmp_path / "ck")
    proc = _torchrun("-m", "flash_llm.cli", "generate", path, "--prompt", "Hello", "--max-new-tokens", "3",
                     "--ignore-eos", "--device", "cpu", "--tokenizer", "bytes", "--dtype", "float16", "--tp")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and errors[0] == errors[1], proc.stderr[-6000:]
    assert "cannot be cast to torch.float16: 1 finite value(s) overflow to inf" in errors[0]
    assert not re.search(r"\[rank\d\]: ", proc.stderr) and proc.stdout == ""  # (no rank's traceback, no text)
    # status 2 (torchrun stops a rank still exiting when the other has: SIGTERM, -15)
    codes = re.findall(r"exitcode\s*: (-?\d+)", proc.stderr)
    assert "2" in codes and set(codes) <= {"2", "-15"}, proc.stderr[-4000:]
    assert proc.returncode == 1  # (torchrun's own status for a failed worker)


def test_raise_if_any_at_world_size_one(world1):
    world1.raise_if_any(None)
    err = KeyError(f"mine {random.random()}")
    with pytest.raises(KeyError) as e:
        world1.raise_if_any(err)
    assert e.value is err


# ---- 4. init_tensor_parallel(timeout=...) ----------------------------------------------------------------------------
BAD_TIMEOUTS = {  # (random values drawn in the test: the ids stay the same from one collection to the next)
    "inf": lambda: math.inf, "-inf": lambda: -math.inf, "nan": lambda: math.nan, "1e15 s": lambda: 1e15,
    "beyond the maximum, s": lambda: random.uniform(366, 1e6) * 86400, "huge int": lambda: 10**400,
    "timedelta.max-ish": lambda: datetime.timedelta(days=999_999_999),
    "timedelta beyond the maximum": lambda: datetime.timedelta(days=random.uniform(366, 1e6)),
    "negative": lambda: -random.uniform(0, 100), "zero": lambda: 0.0}


@pytest.mark.parametrize("kind", BAD_TIMEOUTS)
def test_init_refuses_a_timeout_it_cannot_use_naming_it(kind):
    timeout = BAD_TIMEOUTS[kind]()
    with pytest.raises(ValueError, match=r"^timeout must be a positive number of seconds or a datetime\.timedelta, "
                                         r"at most 365 days \(3\.1536e\+07 s; there is no unlimited timeout\), "
                                         r"got "):
        init_tensor_parallel("gloo", timeout=timeout)
    assert not torch.distributed.is_initialized()


def test_init_takes_any_real_number_of_seconds_up_to_the_maximum():
    import numpy as np

    seconds = random.randint(1, 10**6)
    for value in (np.int64(seconds), np.float32(seconds), MAX_TIMEOUT, MAX_TIMEOUT.total_seconds()):
        with init_tensor_parallel("gloo", timeout=value) as tp:
            want = value if isinstance(value, datetime.timedelta) else datetime.timedelta(seconds=float(value))
            assert tp.timeout == want
            tp.barrier()
        assert not torch.distributed.is_initialized()


# ---- 5. docs/parallel.md's ShardReport example -------------------------------------------------------------------
def test_the_shard_report_example_of_the_docs_is_what_the_code_prints():
    """The tiny 70 %-pruned OPT of the tests on 2 ranks, each rank's report built in this process (sharding needs
    no communication: a stand-in group with the rank's number)."""
    pytest.importorskip("transformers")
    from conftest import tiny_hf_model

    reports, biases = [], []
    for rank in range(2):
        hm = tiny_hf_model("opt")
        m = from_config(hm.config, dtype=torch.float16, device="meta")
        m.load_state_dict({k: v.half() for k, v in hm.state_dict().items()}, assign=True)
        magnitude_prune_(m, 0.7, filter_fn=lambda mod, fqn: fqn != "lm_head")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            flash_llm.sparsify_(m)
        biases.append(sum(mod.bias.numel() * mod.bias.element_size() for n, mod in m.named_modules()
                          if n.endswith(("out_proj", "fc2"))))
        reports.append(tensor_parallel_(m, types.SimpleNamespace(rank=rank, world_size=2,
                                                                 device=torch.device("cpu"))))
    # rank 0 holds the full row-parallel biases, the other rank none of them
    assert biases[0] > 0 and reports[0].other_bytes - reports[1].other_bytes == biases[0]
    doc = open(os.path.join(ROOT, "docs", "parallel.md"), encoding="utf-8").read()
    block = re.search(r"This is the tiny 70 %-pruned OPT of the tests, on 2 ranks:\n\n```\n(.*?)\n```", doc, re.S)
    assert block, "the example is no longer in docs/parallel.md"
    assert block.group(1) == ShardReport.table(reports)


if __name__ == "__main__":  # the 2-rank worker of test 1, under torchrun
    _worker(*sys.argv[1:5])

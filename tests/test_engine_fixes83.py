"""Session 83's engine fixes (CPU):

1. An ``Engine`` built under ``torch.inference_mode()`` keeps its state (KV cache, step inputs, mask, logits) as
   normal tensors, so its ``generate()`` / ``stream()`` run outside inference mode too (they raised "Inplace update
   to inference tensor outside InferenceMode" before).
2. A generation's body runs outside inference mode (as without grad), so the tensors it makes (stop flags, a prefill
   graph's static inputs) are normal ones: a stream begun under ``torch.inference_mode()`` goes on outside it, and
   a prefill graph kept by a request under inference mode is replayed by a later one outside it.
3. Tensor-parallel ``generate`` / ``stream``: a call that one rank's own argument checks refuse raises on every rank
   (the "... differ between the K tensor-parallel ranks" ``ValueError``), where the other ranks waited for the group
   timeout before.  Two gloo ranks under torchrun.
4. (the review of session 83) Tensor-parallel: ``on_token`` / ``output_logits`` / ``stream()``'s keywords are checked
   before the comparison too, and whether tokens are handed over per step (``stream()`` / ``on_token``) and
   ``output_logits`` are compared (they change the steps' collectives: ranks that differed in them were aborted by
   gloo's collective mismatch, or waited for the timeout).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import flash_llm.engine as E
from flash_llm.engine import Engine
from flash_llm.models import ModelConfig, from_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = ModelConfig(family="llama", vocab_size=97, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  intermediate_size=96, max_position_embeddings=64)


def _seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


def _inputs(seed: int):
    """A random tiny Llama, two random prompts of different lengths and random stop tokens (a stop list, so the
    steps update their stop flags in place)."""
    g = torch.Generator().manual_seed(seed)
    model = from_config(CFG, dtype=torch.float32, seed=seed % 2**31)
    lens = torch.randint(2, 8, (2,), generator=g).tolist()
    prompts = [torch.randint(0, CFG.vocab_size, (n,), generator=g).tolist() for n in lens]
    eos = torch.randint(0, CFG.vocab_size, (3,), generator=g).tolist()
    return model, prompts, eos


def test_engine_built_under_inference_mode_generates_outside_it():
    seed = _seed()
    model, prompts, eos = _inputs(seed)
    want = Engine(model, max_batch=2, max_seq=32).generate(prompts, 6, eos_token_id=eos)
    with torch.inference_mode():
        eng = Engine(model, max_batch=2, max_seq=32)
    assert not any(t.is_inference() for t in (*eng.cache.k, *eng.cache.v, eng._tok, eng._pos, eng._slot, eng._mask,
                                              eng._logits)), seed
    got = eng.generate(prompts, 6, eos_token_id=eos)  # (outside inference mode: raised before)
    assert torch.equal(got.tokens, want.tokens) and torch.equal(got.lengths, want.lengths), seed
    streamed = list(eng.stream(prompts, 6, eos_token_id=eos))
    assert torch.equal(torch.stack(streamed, 1), want.tokens), seed
    with torch.inference_mode():  # (and inside it, as before)
        assert torch.equal(eng.generate(prompts, 6, eos_token_id=eos).tokens, want.tokens), seed


def test_stream_begun_under_inference_mode_goes_on_outside_it():
    seed = _seed()
    model, prompts, eos = _inputs(seed)
    eng = Engine(model, max_batch=2, max_seq=32)
    want = list(eng.stream(prompts, 6, eos_token_id=eos))
    with torch.inference_mode():  # (a request handler takes the first token ...)
        s = eng.stream(prompts, 6, eos_token_id=eos)
        first = next(s)
    got = [first, *s]  # (... and the rest is consumed elsewhere: raised at the next step before)
    assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want)), seed
    # the other way round: begun outside, taken on inside
    s = eng.stream(prompts, 6, eos_token_id=eos)
    first = next(s)
    with torch.inference_mode():
        got = [first, *s]
    assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want)), seed


def test_prefill_graph_kept_under_inference_mode_is_replayed_outside_it(monkeypatch):
    """The prefill graphs' static inputs (``_pending``'s clones, ``copy_``'d into by every later prompt of their
    shape) are made by the generation's body: normal tensors, whatever the mode of the request that kept them.  A
    CPU stand-in for the CUDA graph: its replay runs the prefill eagerly over the static inputs."""
    seed = _seed()
    model, prompts, eos = _inputs(seed)
    want = Engine(model, max_batch=2, max_seq=32).generate(prompts, 5, eos_token_id=eos).tokens
    eng = Engine(model, max_batch=2, max_seq=32)
    eng._prefills = {}  # (prefill graphs on, as on a GPU)

    class Replay:
        def __init__(self, ids, mask):
            self.ids, self.mask = ids, mask

        def replay(self):
            eng._prefill(self.ids, self.mask)

    monkeypatch.setattr(eng, "_prefill_graph_fits", lambda b, p: True)
    monkeypatch.setattr(eng, "_capture_prefill", lambda ids, mask: E._PrefillGraph(Replay(ids, mask), ids, mask))
    with torch.inference_mode():
        first = eng.generate(prompts, 5, eos_token_id=eos).tokens  # (runs the prefill eagerly and keeps its inputs)
    (entry,) = eng._prefills.values()
    assert not entry.ids.is_inference() and not entry.mask.is_inference(), seed
    again = eng.generate(prompts, 5, eos_token_id=eos).tokens  # (replays it: copies the prompts into its inputs)
    assert entry.replays == 1, seed
    assert torch.equal(first, want) and torch.equal(again, want), seed


# ---- 3. tensor parallelism: a call one rank refuses ------------------------------------------------------------
# the start of both torchrun workers: a sharded tiny Llama, its engine, two random prompts (the same on every rank)
PREAMBLE = r'''
import json, sys, torch
from flash_llm.engine import Engine
from flash_llm.models import ModelConfig, from_config
from flash_llm.parallel import init_tensor_parallel, tensor_parallel_

seed, out = int(sys.argv[1]), sys.argv[2]
tp = init_tensor_parallel("gloo", timeout=TIMEOUT)  # (a rank left waiting: a RuntimeError after TIMEOUT s)
cfg = ModelConfig(family="llama", vocab_size=101, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  intermediate_size=128, max_position_embeddings=64)
model = from_config(cfg, dtype=torch.float32, seed=seed % 2**31)
tensor_parallel_(model, tp)
eng = Engine(model, max_batch=2, max_seq=32)
g = torch.Generator().manual_seed(seed)  # (the same draws on every rank)
good = [torch.randint(0, 101, (int(n),), generator=g).tolist() for n in torch.randint(2, 8, (2,), generator=g)]
'''

WORKER = PREAMBLE + r'''
r1 = tp.rank == 1
calls = {  # rank 1's call refused by its own checks, rank 0's valid
    "too_many_prompts": lambda: eng.generate(good + [good[0]] if r1 else good, 3, eos_token_id=None),
    "token_out_of_vocabulary": lambda: eng.generate([good[0], [101]] if r1 else good, 3, eos_token_id=None),
    "bad_eos_id": lambda: eng.generate(good, 3, eos_token_id=101 if r1 else None),
    "bad_temperature": lambda: eng.generate(good, 3, eos_token_id=None, temperature=-1.0 if r1 else 0.0),
    "too_long": lambda: eng.generate(good, 40 if r1 else 3, eos_token_id=None),
    "stream_too_many_prompts": lambda: eng.stream(good + [good[0]] if r1 else good, 3, eos_token_id=None),
    # refused on both ranks: each raises its own error
    "refused_everywhere": lambda: eng.generate(good + [good[0]], 3, eos_token_id=None),
}
res = {}
for name, call in calls.items():
    try:
        call()
        res[name] = "accepted"
    except Exception as e:
        res[name] = f"{type(e).__name__}: {e}"
res["after"] = eng.generate(good, 4, eos_token_id=None).tokens.tolist()  # (still in step)
with open(f"{out}/rank{tp.rank}.json", "w") as f:
    json.dump(res, f)
tp.close()
'''


# what the ranks compare (a prefix of the ValueError's message; "prompts, max_new_tokens or eos_token_id differ
# between the K tensor-parallel ranks" stays in it, as docs/parallel.md and tests/test_parallel.py quote it)
DIFFER = ("the call (generate(), generate(on_token=...) or stream(); output_logits), prompts, max_new_tokens or "
          "eos_token_id")


def _torchrun(tmp_path, worker: str, seed: int, timeout: int = 20) -> list[dict]:
    """``worker`` run by 2 gloo ranks under torchrun (group timeout ``timeout`` s, 300 s in all); each rank's
    ``rank{r}.json``."""
    script = tmp_path / "worker.py"
    script.write_text(worker.replace("TIMEOUT", str(timeout)))
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
           str(seed), str(tmp_path)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    except subprocess.TimeoutExpired as e:
        out = lambda b: (b or b"").decode(errors="replace") if isinstance(b, bytes) else (b or "")  # noqa: E731
        pytest.fail(f"torchrun did not finish within 300 s (seed {seed}):\n{out(e.stdout)[-3000:]}\n"
                    f"{out(e.stderr)[-5000:]}")
    assert proc.returncode == 0, f"seed {seed}: {proc.stdout[-2000:]}\n{proc.stderr[-5000:]}"
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


def test_tensor_parallel_call_refused_on_one_rank_raises_on_every_rank(tmp_path):
    seed = _seed()
    ranks = _torchrun(tmp_path, WORKER, seed)
    differ = f"ValueError: {DIFFER} differ between the 2 tensor-parallel ranks"
    one_sided = [k for k in ranks[0] if k not in ("refused_everywhere", "after")]
    for r, res in enumerate(ranks):
        for k in one_sided:
            assert res[k].startswith(differ), (seed, r, k, res[k])
        assert res["refused_everywhere"].startswith("ValueError: batch of 3 prompts"), (seed, r, res)
    for k in one_sided:  # (the refusing rank says why)
        assert "this rank (1) refused its call" in ranks[1][k], (seed, k, ranks[1][k])
    assert "batch of 3 prompts" in ranks[1]["too_many_prompts"] and "temperature" in ranks[1]["bad_temperature"]
    assert ranks[0]["after"] == ranks[1]["after"] and len(ranks[0]["after"]) == 2, seed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_inference_mode_on_cuda_with_graphs():
    """The same on a GPU, where the engine captures CUDA graphs (decode and prefill) and lags its stop flags."""
    seed = _seed()
    model, prompts, eos = _inputs(seed)
    model = model.to("cuda", torch.float16)
    want = Engine(model, max_batch=2, max_seq=32).generate(prompts, 6, eos_token_id=eos)
    with torch.inference_mode():
        eng = Engine(model, max_batch=2, max_seq=32)
        s = eng.stream(prompts, 6, eos_token_id=eos)
        first = next(s)
    streamed = [first, *s]  # (consumed outside inference mode)
    assert torch.equal(torch.stack(streamed, 1).cpu(), want.tokens[:, :len(streamed)].cpu()), seed
    got = eng.generate(prompts, 6, eos_token_id=eos)
    assert torch.equal(got.tokens, want.tokens) and torch.equal(got.lengths, want.lengths), seed


# ---- 4. (review) tensor parallelism: on_token / output_logits / stream()'s keywords -----------------------------
WORKER_OPTIONS = PREAMBLE + r"""
import time
first = eng.generate(good[:1], 6, eos_token_id=None).tokens
eos = int(first[0, 1])  # (row 0 stops at its 2nd token: the steps that follow differ with the options)
r0, r1 = tp.rank == 0, tp.rank == 1
seen = []
noop = lambda s, t: None
calls = {  # the ranks differ in an option that changes the collectives, or rank 1's own checks refuse it
    "on_token_rank0": lambda: eng.generate(good, 8, eos_token_id=eos, on_token=seen.append if r0 else None),
    "output_logits_rank0": lambda: eng.generate(good, 8, eos_token_id=eos, output_logits=r0),
    "stream_and_generate": lambda: (list(eng.stream(good, 8, eos_token_id=eos)) if r0
                                    else eng.generate(good, 8, eos_token_id=eos)),
    "bad_output_logits_rank1": lambda: eng.generate(good, 4, eos_token_id=None, output_logits=1 if r1 else False),
    "bad_on_token_rank1": lambda: eng.generate(good, 4, eos_token_id=None, on_token="print" if r1 else None),
    "stream_on_token_rank1": lambda: eng.stream(good, 4, eos_token_id=None, **({"on_token": noop} if r1 else {})),
    "stream_bad_keyword_rank1": lambda: eng.stream(good, 4, eos_token_id=None, **({"temprature": 1.0} if r1 else {})),
    "stream_bad_output_logits_rank1": lambda: eng.stream(good, 4, eos_token_id=None, output_logits=1 if r1 else False),
}
res = {}
for name, call in calls.items():
    t0 = time.time()
    try:
        call()
        res[name] = "accepted"
    except Exception as e:
        res[name] = f"{type(e).__name__}: {e}"
    res[name + "/s"] = time.time() - t0
# accepted where the options match: stream() on one rank, generate(on_token=...) on the other run the same steps
want = eng.generate(good, 8, eos_token_id=eos)
if r0:
    streamed = list(eng.stream(good, 8, eos_token_id=eos))
    res["handed"] = torch.stack(streamed, 1).tolist()
else:
    res["handed"] = eng.generate(good, 8, eos_token_id=eos, on_token=noop).tokens.tolist()
res["want"] = want.tokens.tolist()
res["logits"] = eng.generate(good, 8, eos_token_id=eos, output_logits=True).logits.shape[1]
res["after"] = eng.generate(good, 4, eos_token_id=None).tokens.tolist()  # (still in step)
with open(f"{out}/rank{tp.rank}.json", "w") as f:
    json.dump(res, f)
tp.close()
"""


def test_tensor_parallel_options_that_change_the_collectives_are_compared(tmp_path):
    """Ranks that differ in ``on_token`` (tokens handed over per step: a decode step more once every row stopped)
    or ``output_logits`` (no batch compaction: larger all-reduces), or whose ``on_token`` / ``output_logits`` /
    ``stream()`` keywords one rank refuses, raise the "... differ between the 2 tensor-parallel ranks" ValueError on
    both ranks at once.  Before, a rank was aborted by gloo (a collective mismatch) or waited for the group timeout:
    those checks ran before the comparison, and the options were not compared."""
    seed = _seed()
    timeout = 20
    ranks = _torchrun(tmp_path, WORKER_OPTIONS, seed, timeout)
    differ = f"ValueError: {DIFFER} differ between the 2 tensor-parallel ranks"
    cases = [k for k in ranks[0] if k.endswith(("_rank0", "_rank1", "_and_generate"))]
    assert len(cases) == 8, cases
    for r, res in enumerate(ranks):
        for k in cases:
            assert res[k].startswith(differ), (seed, r, k, res[k])
            assert res[k + "/s"] < timeout / 2, (seed, r, k, res[k + "/s"])  # (not the group's timeout)
    for k in cases:
        if k.endswith("_rank1"):  # (the refusing rank says why)
            assert "this rank (1) refused its call" in ranks[1][k], (seed, k, ranks[1][k])
    assert "on_token must be None or a callable" in ranks[1]["bad_on_token_rank1"], seed
    assert "on_token belongs to generate()" in ranks[1]["stream_on_token_rank1"], seed
    assert "unexpected keyword arguments ['temprature']" in ranks[1]["stream_bad_keyword_rank1"], seed
    assert "output_logits must be True or False" in ranks[1]["stream_bad_output_logits_rank1"], seed
    for res in ranks:
        assert res["handed"] == res["want"], seed
        assert res["logits"] == len(res["want"][0]), seed
    assert ranks[0]["after"] == ranks[1]["after"] and ranks[0]["want"] == ranks[1]["want"], seed

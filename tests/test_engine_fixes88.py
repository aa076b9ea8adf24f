"""Session 88's engine fixes (CPU): stale cache values, autocast, and a model whose dtype or device changed.

1. Non-finite keys / values one request left in the engine's static KV cache (an fp16 overflow's inf / NaN) poisoned
   the next, unrelated request on the same engine: its decode steps attend ``decode_kv_len(P + i)`` slots, the ones it
   has not written yet masked with -inf only, and softmax weight 0 x inf / NaN = NaN, so every token after its first
   came from NaN logits (token 0).  Each generation now zeroes, in its rows, the slots its steps attend past the prompt
   (``KVCache.zero_slots``: one kernel, before the prefill and outside the prefill / decode graphs).
2. ``Engine.generate`` / ``stream`` under ``torch.autocast`` to another dtype than the engine's (an fp32 model under
   bf16 autocast) failed mid-prefill with a bare ``index_copy_(): ... Float and BFloat16``.  Now refused at the call
   with a ValueError naming autocast and the engine's dtype; autocast to the engine's own dtype is accepted and the
   steps run with autocast off (as ``SparseLinear`` takes autocast to its own dtype only).
3. A model whose dtype or device changed after the engine was built (``load_state_dict(fp32, assign=True)`` into a
   bf16 model, ``model.float()``, ``model.to(...)``) failed the next generation with the same bare error.  Now a
   ValueError at the call (and at each generation's weights check) saying to build a new Engine, before any cache
   write.
4. ``Engine.warmup``'s own decode-graph captures ran with the caller's grad mode (on by default), so over trainable
   weights a captured step recorded autograd state; now under no_grad, as the generations' captures.
5. An engine on ``cuda:1`` driven while ``cuda:0`` was current captured its graphs on ``cuda:0``'s streams (the
   flash-llm kernels, launched on ``cuda:1``'s current stream, fell outside them) and recorded its timing events
   there; its steps now run with its device current (``_device_current``; the two-GPU test waits for two GPUs).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

import flash_llm.engine as E
from flash_llm.engine import Engine, decode_kv_len
from flash_llm.models import KVCache, ModelConfig, _fused, from_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA = ModelConfig(family="llama", vocab_size=97, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                    intermediate_size=96, max_position_embeddings=256)
OPT = ModelConfig(family="opt", vocab_size=97, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=96,
                  max_position_embeddings=256)
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [3, 4, 5]]


def _poison(eng: Engine) -> None:
    """Every slot of every row of the cache NaN (keys) / inf (values): what an overflowing request leaves behind."""
    eng.cache.kv[0].fill_(float("nan"))
    eng.cache.kv[1].fill_(float("inf"))


# ---- 1. stale non-finite cache values --------------------------------------------------------------------------------
def test_an_fp16_overflow_no_longer_poisons_the_next_request():
    cfg = ModelConfig(family="opt", vocab_size=97, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=96,
                      max_position_embeddings=256, do_layer_norm_before=False, tie_word_embeddings=False)
    model = from_config(cfg, dtype=torch.float16, seed=0)
    with torch.no_grad():  # (token 96 at position 20 overflows fp16 in the embedding sum)
        model.model.decoder.embed_tokens.weight[96] = 65000.0
        model.model.decoder.embed_positions.weight[2 + 20] = 1000.0
    fresh = Engine(model, max_batch=1, max_seq=64).generate([[5, 6, 7]], 6, eos_token_id=None, output_logits=True)
    eng = Engine(model, max_batch=1, max_seq=64)
    bad = eng.generate([[1] * 20 + [96]], 4, eos_token_id=None, output_logits=True)
    assert bad.logits.isnan().any()  # (its own NaN: expected)
    assert not torch.isfinite(eng.cache.v[0][0, :, 3:64]).all()  # (what it left where the next request attends)
    again = eng.generate([[5, 6, 7]], 6, eos_token_id=None, output_logits=True)
    assert again.sequences() == fresh.sequences() and len(set(fresh.sequences()[0])) > 1
    assert torch.equal(again.logits, fresh.logits)


@pytest.mark.parametrize("cfg", [LLAMA, OPT], ids=["llama", "opt"])
@pytest.mark.parametrize("options", [
    {},
    {"merge": True},
    {"formats": "dense"},
    {"chunked": True},
    {"buckets_off": True},
    {"fuse": True},
], ids=lambda o: "-".join(o) or "plain")
def test_stale_nan_in_every_slot_changes_nothing(cfg, options, monkeypatch):
    options = dict(options)
    if options.pop("chunked", False):  # (a prefill forward of one 7-token row at a time)
        monkeypatch.setattr(E, "PREFILL_TOKENS", 7)
    if options.pop("buckets_off", False):  # (every step attends all the slots)
        monkeypatch.setattr(E, "DECODE_KV_BUCKETS", False)
    if options.get("fuse"):  # (the fused structure with its eager functions: no compiler)
        monkeypatch.setattr(_fused, "_FUSED", {})
        monkeypatch.setattr(_fused, "_keyed", lambda name: _fused._EAGER[name])
    model = from_config(cfg, dtype=torch.float32, seed=1)
    eng = Engine(model, max_batch=4, max_seq=64, **options)
    kw = dict(eos_token_id=None, output_logits=True)
    ref = eng.generate(PROMPTS, 9, **kw)  # (a fresh cache: zeros)
    assert torch.isfinite(ref.logits).all()
    _poison(eng)
    out = eng.generate(PROMPTS, 9, **kw)
    assert out.sequences() == ref.sequences() and torch.equal(out.logits, ref.logits)
    _poison(eng)  # streaming, per-row limits: the same
    got = list(eng.stream(PROMPTS, [9, 4, 6], **kw))
    assert len(got) == 9 and eng.last.sequences() == [s[:n] for s, n in zip(ref.sequences(), [9, 4, 6])]


def test_stale_nan_with_rows_stopping_and_compacted(monkeypatch):
    model = from_config(LLAMA, dtype=torch.float32, seed=2)
    eng = Engine(model, max_batch=4, max_seq=64)
    prompts = PROMPTS + [[1, 2, 3, 4]]
    ref = eng.generate(prompts, [12, 2, 3, 1], eos_token_id=None)
    calls = []
    real = Engine._compacted
    monkeypatch.setattr(Engine, "_compacted", lambda self, *a: calls.append(a[1]) or real(self, *a))
    _poison(eng)
    out = eng.generate(prompts, [12, 2, 3, 1], eos_token_id=None)
    assert out.sequences() == ref.sequences() and all(len(s) > 1 for s in ref.sequences()[:1])
    assert 4 in calls  # (the batch of 4 shrank: rows moved with their written slots only)


def test_only_the_slots_the_steps_attend_are_zeroed():
    """Rows 0..B-1, slots P .. decode_kv_len(P + max_new_tokens - 1) - 1 (the prompt's own written by the prefill):
    the rows past the batch and the slots past the last attended length keep what they held (the cost stays with what
    the request reads)."""
    cfg = dataclasses.replace(LLAMA, max_position_embeddings=640)
    eng = Engine(from_config(cfg, dtype=torch.float32, seed=3), max_batch=3, max_seq=600)  # (slots 640)
    _poison(eng)
    eng.generate([[1, 2, 3], [4, 5]], 10, eos_token_id=None)
    k = eng.cache.kv[0]
    last = decode_kv_len(3 + 10 - 1, eng.cache.max_seq)
    assert last == 256
    assert torch.isfinite(k[:, :2, :, :last]).all()  # (prompt, new tokens, zeros)
    assert (k[:, :2, :, 3 + 9:last] == 0).all()  # (never written by this request: zero)
    assert k[:, :2, :, last:].isnan().all() and k[:, 2:].isnan().all()  # (not attended: left alone)


def test_one_new_token_zeroes_nothing():
    model = from_config(LLAMA, dtype=torch.float32, seed=3)
    eng = Engine(model, max_batch=1, max_seq=64)
    ref = eng.generate([[1, 2, 3]], 1, output_logits=True)
    _poison(eng)
    out = eng.generate([[1, 2, 3]], 1, output_logits=True)
    assert torch.equal(out.logits, ref.logits) and eng.cache.kv[:, :, :, :, 3:].isnan().any()


def test_kv_cache_zero_slots_and_views():
    c = KVCache(3, 4, 2, 16, 8, torch.float32, "cpu")
    assert [t.data_ptr() for t in (*c.k, *c.v)] == [c.kv[i // 3, i % 3].data_ptr() for i in range(6)]
    c.kv.fill_(1.0)
    c.zero_slots(2, 5, 9)
    for t in (*c.k, *c.v):
        assert (t[:2, :, 5:9] == 0).all() and (t[:2, :, :5] == 1).all() and (t[:2, :, 9:] == 1).all()
        assert (t[2:] == 1).all() and t.is_contiguous()
    c.zero_slots(2, 9, 9)  # (empty: nothing)
    v = c.view(1, 3)
    v.zero_slots(1, 0, 16)  # (row 1 of the whole cache)
    assert (c.k[2][1] == 0).all() and (c.k[2][0, :, :5] == 1).all() and (c.k[2][2] == 1).all()
    assert c.nbytes == 2 * 3 * 4 * 2 * 16 * 8 * 4
    with torch.no_grad():  # (layers' tensors as separate ones were: written in place from a grad-requiring key)
        c = KVCache(2, 2, 1, 4, 8, torch.float32, "cpu")
    c.update(1, torch.ones(2, 1, 1, 8, requires_grad=True) * 2, torch.ones(2, 1, 1, 8), torch.tensor([3]), 4)
    assert (c.kv[0, 1, :, :, 3] == 2).all() and (c.kv[0, 0] == 0).all()


# ---- 2. autocast -----------------------------------------------------------------------------------------------------
def test_generate_under_autocast_to_another_dtype_is_refused_at_the_call():
    model = from_config(LLAMA, dtype=torch.float32, seed=4)
    eng = Engine(model, max_batch=2, max_seq=64)
    ref = eng.generate([[1, 2, 3]], 4).sequences()
    before = eng.cache.kv.clone()
    msg = (r"^generate\(\) / stream\(\) under torch\.autocast\('cpu', dtype=torch\.bfloat16\) is not supported: this "
           r"engine computes in the model's dtype, torch\.float32 .*build an Engine over the model cast to "
           r"torch\.bfloat16$")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(ValueError, match=msg):
            eng.generate([[1, 2, 3]], 4)
        with pytest.raises(ValueError, match=msg):
            eng.stream([[1, 2, 3]], 4)  # (at the call, not at the first token)
    assert torch.equal(eng.cache.kv, before)
    assert eng.generate([[1, 2, 3]], 4).sequences() == ref


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=["bf16", "fp64"])
def test_autocast_to_the_engines_dtype_runs_the_steps_with_autocast_off(dtype):
    model = from_config(OPT, dtype=dtype, seed=5)
    eng = Engine(model, max_batch=2, max_seq=64)
    ref = eng.generate(PROMPTS[:2], 5, eos_token_id=None, output_logits=True)
    seen = []
    model.model.decoder.layers[0].register_forward_hook(lambda *a: seen.append(torch.is_autocast_enabled("cpu")))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = eng.generate(PROMPTS[:2], 5, eos_token_id=None, output_logits=True)
        between = []
        for _ in eng.stream(PROMPTS[:2], 5, eos_token_id=None):
            between.append(torch.is_autocast_enabled("cpu"))  # (the caller's autocast between the steps)
    assert torch.is_autocast_enabled("cpu") is False
    assert out.sequences() == ref.sequences() and torch.equal(out.logits, ref.logits)
    assert eng.last.sequences() == ref.sequences() and between == [True] * 5
    assert seen and not any(seen)


# ---- 3. the model's dtype / device changed under the engine ----------------------------------------------------------
def _changed(w, dtype, device="cpu"):
    return (rf"^the model is now {w} on {device} \(its input embedding\), but this engine was built for {dtype} on "
            rf"cpu: its KV cache, attention mask and RoPE tables keep that dtype and device; build a new Engine for "
            rf"the model as it is, or cast / move the model back \(model\.to\('cpu', {dtype}\)\)$")


def test_a_checkpoint_of_another_dtype_loaded_with_assign_is_refused_with_words():
    model = from_config(LLAMA, dtype=torch.bfloat16, seed=6)
    eng = Engine(model, max_batch=2, max_seq=64)
    eng.generate([[1, 2, 3]], 4)
    new = from_config(LLAMA, dtype=torch.float32, seed=7).state_dict()
    model.load_state_dict(new, assign=True)
    eng.cache.kv.fill_(3.0)
    msg = _changed(r"torch\.float32", r"torch\.bfloat16")
    with pytest.raises(ValueError, match=msg):
        eng.generate([[1, 2, 3]], 4)
    with pytest.raises(ValueError, match=msg):
        eng.stream([[1, 2, 3]], 4)
    with pytest.raises(ValueError, match=msg):
        eng.use_layout(1)
    assert (eng.cache.kv == 3.0).all()  # (refused before any cache write)
    model.to(torch.bfloat16)  # (cast back: the engine serves the new weights)
    fresh = from_config(LLAMA, dtype=torch.float32, seed=7).to(torch.bfloat16)
    want = Engine(fresh, max_batch=2, max_seq=64).generate([[1, 2, 3]], 4).sequences()
    assert eng.generate([[1, 2, 3]], 4).sequences() == want


def test_a_model_cast_or_moved_after_the_engine_is_refused_with_words():
    model = from_config(OPT, dtype=torch.float32, seed=8)
    eng = Engine(model, max_batch=2, max_seq=64)
    ref = eng.generate([[1, 2, 3]], 4).sequences()
    model.half()
    with pytest.raises(ValueError, match=_changed(r"torch\.float16", r"torch\.float32")):
        eng.generate([[1, 2, 3]], 4)
    model.to("meta")
    with pytest.raises(ValueError, match=_changed(r"torch\.float16", r"torch\.float32", "meta")):
        eng.generate([[1, 2, 3]], 4)
    model.to_empty(device="cpu").float()
    model.load_state_dict(from_config(OPT, dtype=torch.float32, seed=8).state_dict())
    assert eng.generate([[1, 2, 3]], 4).sequences() == ref


# ---- the tensor-parallel engine (2 gloo ranks): stale NaN in each rank's cache changes nothing ----------------------
WORKER = r'''
import json, sys, torch
from flash_llm.engine import Engine
from flash_llm.models import ModelConfig, from_config
from flash_llm.parallel import init_tensor_parallel, tensor_parallel_

tp = init_tensor_parallel("gloo", timeout=60)
cfg = ModelConfig(family="llama", vocab_size=101, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  intermediate_size=128, max_position_embeddings=64)
model = from_config(cfg, dtype=torch.float32, seed=88)
tensor_parallel_(model, tp)
eng = Engine(model, max_batch=2, max_seq=64)
prompts = [[5, 6, 7, 8], [9, 10]]
ref = eng.generate(prompts, 6, eos_token_id=None, output_logits=True)
eng.cache.kv.fill_(float("nan"))
out = eng.generate(prompts, 6, eos_token_id=None, output_logits=True)
with open(f"{sys.argv[1]}/rank{tp.rank}.json", "w") as f:
    json.dump({"ref": ref.sequences(), "out": out.sequences(), "finite": bool(torch.isfinite(out.logits).all()),
               "same": bool(torch.equal(out.logits, ref.logits))}, f)
tp.close()
'''


def test_tensor_parallel_stale_nan_changes_nothing(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
           str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]
    for r in range(2):
        got = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert got["out"] == got["ref"] and got["finite"] and got["same"], (r, got)


# ---- 1 on a GPU: CUDA graphs, the decode-attention kernel (head_dim 64) and PyTorch's attention (fp32) ----------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_stale_nan_changes_nothing_on_the_gpu(dtype):
    """The CPU test's check where the engine captures its steps in CUDA graphs: a cache full of NaN / inf gives the
    tokens and logits of a zeroed one (fp16 / bf16 with head_dim 64: the decode-attention kernel; fp32: PyTorch's)."""
    cfg = LLAMA.replace(hidden_size=256, num_heads=4, num_kv_heads=2, intermediate_size=512)  # (head_dim 64)
    model = from_config(cfg, dtype=dtype, device="cuda", seed=3)
    eng = Engine(model, max_batch=4, max_seq=128)
    kw = dict(eos_token_id=None, output_logits=True)
    ref = eng.generate(PROMPTS, 20, **kw)
    assert torch.isfinite(ref.logits).all()
    for _ in range(2):  # (the second time replays the graphs the first captured)
        _poison(eng)
        out = eng.generate(PROMPTS, 20, **kw)
        assert torch.isfinite(out.logits).all() and out.sequences() == ref.sequences()
        torch.testing.assert_close(out.logits, ref.logits)  # (eager and replayed steps: the same kernels, or rounding)


def test_warmup_captures_without_autograd(monkeypatch):
    """``warmup``'s own decode-graph captures (the lengths and batches a generation would capture midway) ran with
    the caller's grad mode: over trainable weights (``from_config``'s parameters require grad) the captured step
    recorded autograd state into the cache.  Now they run under no_grad, as the generations' captures do (checked on
    the CPU with the capture replaced by a probe, and on a GPU by the next test)."""
    model = from_config(LLAMA, dtype=torch.float32, seed=4)
    assert next(model.parameters()).requires_grad
    eng = Engine(model, max_batch=2, max_seq=64)
    seen = []
    monkeypatch.setattr(eng, "cuda_graphs", True)
    monkeypatch.setattr(eng, "_capture", lambda b, kv: seen.append((b, kv, torch.is_grad_enabled())))
    monkeypatch.setattr(eng, "generate", lambda *a, **kw: None)  # (its generations: no_grad already, and eager here)
    assert torch.is_grad_enabled()
    eng.warmup(batches=(2,), prompt_lengths=(8,))
    assert seen and not any(g for _, _, g in seen)
    assert torch.is_grad_enabled()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_warmup_leaves_the_cache_out_of_autograd_on_the_gpu():
    """After ``warmup`` over trainable weights, with grad on, the cache holds no autograd history and the engine's
    generations equal a fresh engine's."""
    cfg = LLAMA.replace(hidden_size=256, num_heads=4, num_kv_heads=2, intermediate_size=512)  # (head_dim 64)
    model = from_config(cfg, dtype=torch.float16, device="cuda", seed=5)
    assert next(model.parameters()).requires_grad and torch.is_grad_enabled()
    eng = Engine(model, max_batch=2, max_seq=128)
    eng.warmup(batches=(2,), prompt_lengths=(8,))
    assert not eng.cache.kv.requires_grad and all(t.grad_fn is None for t in eng.cache.k + eng.cache.v)
    ref = Engine(model, max_batch=2, max_seq=128).generate(PROMPTS[:2], 12, eos_token_id=None)
    assert eng.generate(PROMPTS[:2], 12, eos_token_id=None).sequences() == ref.sequences()


# ---- 5. an engine on a CUDA device that is not the current one ----------------------------------------------------------
def test_device_current_enters_the_engines_device_only_where_another_is_current(monkeypatch):
    """``_device_current``: ``torch.cuda.device(d)`` where ``cuda:i`` other than ``d`` is current, a null context for
    the current device, a CPU engine or a device without an index (checked with fakes: no GPU here)."""
    entered = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda d: entered.append(d) or E.contextlib.nullcontext())
    for dev, want in ((torch.device("cuda", 1), [torch.device("cuda", 1)]), (torch.device("cuda", 0), []),
                      (torch.device("cpu"), []), (torch.device("cuda"), [])):
        entered.clear()
        with E._device_current(dev):
            pass
        assert entered == want, dev


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_an_engine_on_the_second_gpu_while_the_first_is_current():
    """An engine on ``cuda:1`` driven while ``cuda:0`` is current captures its graphs on ``cuda:1``: the same tokens
    and logits (to rounding) as the same engine driven with ``cuda:1`` current."""
    cfg = LLAMA.replace(hidden_size=256, num_heads=4, num_kv_heads=2, intermediate_size=512)
    assert torch.cuda.current_device() == 0
    runs = []
    for current in (1, 0):
        model = from_config(cfg, dtype=torch.float16, device="cuda:1", seed=6)
        with torch.cuda.device(current):
            eng = Engine(model, max_batch=2, max_seq=128)
            runs.append(eng.generate(PROMPTS[:2], 20, eos_token_id=None, output_logits=True))
            runs.append(eng.generate(PROMPTS[:2], 20, eos_token_id=None, output_logits=True))  # (replayed graphs)
    for r in runs[1:]:
        assert r.sequences() == runs[0].sequences()
        torch.testing.assert_close(r.logits, runs[0].logits)

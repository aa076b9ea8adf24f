"""flash_llm.parallel: a 2-rank run under torchrun (tests/tp_worker.py; on CPU with gloo, and with NCCL on 2 GPUs
where a machine has them) against the single-process model, for tiny OPT and Llama (GQA) models, dense and pruned + compressed, loaded from checkpoints slice by slice
and sharded in memory; sampling identical on every rank; uneven nonzeros per slice reported exactly; synthetic
models built per rank; clear errors (world size not dividing the heads, prompts differing between ranks, a rank
that never starts) instead of hangs; the benchmark's tensor-parallel mode as a smoke run.

Tolerances: the tensor-parallel sums split each row-parallel dot product in two partial sums (rounded to the
model's dtype, then added), so the logits are not bitwise the single-process ones.  Both are compared with the
same model in float64: err(tensor-parallel vs fp64) <= 2 * err(single process vs fp64) + 1 ulp of the largest
logit (STYLE lesson 4).  Greedy tokens must be identical where the top-2 logit gap exceeds that bound (asserted).
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import socket
import subprocess
import sys
import time
import types
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import flash_llm
from flash_llm.checkpoint import convert
from flash_llm.demo import expanded_copy
from flash_llm.engine import Engine
from flash_llm.models import from_config, preset
from flash_llm.models.synthetic import build_synthetic, estimate_bytes
from flash_llm.parallel import (ColumnParallelLinear, RowParallelLinear, ShardReport, TensorParallel,
                                check_divisible, init_tensor_parallel, load_tensor_parallel, tensor_parallel_)
from flash_llm.parallel.group import NCCL_ENV_DEFAULTS, nccl_env_defaults
from flash_llm.prune import magnitude_prune_
from conftest import TINY_VOCAB, expected_nbytes, load_script, max_abs_err, tiny_hf_model, ulp
from tp_worker import NEW, PROMPTS, SYNTH, full_model, padded

transformers = pytest.importorskip("transformers")

VOCAB = TINY_VOCAB
WORLD = 2
FAMILIES = ("opt", "llama")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "tp_worker.py")


_hf = tiny_hf_model


def _save_hf(model, folder) -> None:
    """Our model as a Hugging Face checkpoint folder (same keys; tied lm_head left out, as HF does)."""
    os.makedirs(folder)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        del state["lm_head.weight"]
    save_file(state, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(model.config.to_hf(), f)


def _dense64(model):
    """A float64 copy with every SparseLinear expanded (the dense-with-zeros reference)."""
    return expanded_copy(model).double()


def _min_margin(logits: torch.Tensor) -> float:
    top2 = logits.topk(2, dim=-1).values
    return float((top2[..., 0] - top2[..., 1]).min())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_error(actual, single, ref64, dtype, what):
    err, base = max_abs_err(actual, ref64), max_abs_err(single, ref64)
    tol = 2 * base + ulp(dtype, float(ref64.abs().max()))
    assert err <= tol, f"{what}: max |tensor-parallel - fp64| = {err:.3g} > {tol:.3g} (single process: {base:.3g})"
    return tol


# ---------------------------------------------------------------------------------------------------
# the 2-rank run (once per module)
# ---------------------------------------------------------------------------------------------------
RUN_TIMEOUT_S = float(os.environ.get("FLASH_LLM_TP_TEST_TIMEOUT_S", 600))


@pytest.fixture(scope="module", params=["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < WORLD, reason=f"needs {WORLD} CUDA GPUs")])])
def tp_run(request, tmp_path_factory):
    device = request.param
    d = tmp_path_factory.mktemp(f"tp-{device}")
    for family in FAMILIES:
        hm = _hf(family)
        hm.save_pretrained(d / f"{family}-dense")  # transformers' own checkpoint writer
        pruned = from_config(hm.config, dtype=torch.float16, device="meta")
        pruned.load_state_dict({k: v.half() for k, v in hm.state_dict().items()}, assign=True)
        magnitude_prune_(pruned, 0.7, filter_fn=lambda m, fqn: fqn != "lm_head")
        _save_hf(pruned, d / f"{family}-pruned")
        convert(d / f"{family}-pruned", d / f"{family}-flash", progress=False)  # flash-llm checkpoint (bitmap)
        convert(d / f"{family}-pruned", d / f"{family}-bitmask", format="sparse-bitmask", progress=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    # --standalone: a rendezvous on a free localhost port chosen by torchrun itself
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(WORLD), WORKER,
           str(d), str(d / "bench"), device]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, cwd=ROOT)
    except subprocess.TimeoutExpired as e:
        out = lambda b: (b or b"").decode(errors="replace") if isinstance(b, bytes) else (b or "")  # noqa: E731
        pytest.fail(f"torchrun did not finish within {RUN_TIMEOUT_S} s; the ranks' output so far:\n"
                    f"{out(e.stdout)[-3000:]}\n{out(e.stderr)[-8000:]}")
    assert proc.returncode == 0, (f"torchrun failed ({proc.returncode}); the ranks' output:\n{proc.stdout[-3000:]}\n"
                                  f"{proc.stderr[:8000]}")
    outs = [torch.load(d / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return {"dir": d, "outs": outs, "seconds": time.perf_counter() - t0, "device": torch.device(device)}


@pytest.fixture(scope="module")
def single(tp_run):
    """Single-process references, per family: fp32 dense, fp64 dense, fp16 sparsified, fp64 of the pruned."""
    d, dev = tp_run["dir"], tp_run["device"]
    refs = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for family in FAMILIES:
            refs[family, "dense"] = full_model(str(d / f"{family}-dense"), torch.float32, dev)
            refs[family, "dense64"] = full_model(str(d / f"{family}-dense"), torch.float64, dev)
            sparse = full_model(str(d / f"{family}-pruned"), torch.float16, dev)
            refs[family, "sparse64"] = copy.deepcopy(sparse).double()
            flash_llm.sparsify_(sparse)
            refs[family, "sparse"] = sparse
    return refs


def _engine(model):
    return Engine(model, max_batch=3, max_seq=32).generate(PROMPTS, NEW, output_logits=True, eos_token_id=None)


def test_run_has_two_ranks_and_they_agree(tp_run):
    a, b = tp_run["outs"]
    backend = "gloo" if tp_run["device"].type == "cpu" else "nccl"
    assert (a["rank"], b["rank"], a["world_size"], a["backend"]) == (0, 1, WORLD, backend)
    assert (a["device"], b["device"]) == (("cpu", "cpu") if backend == "gloo" else ("cuda:0", "cuda:1"))
    tensors = [k for k, v in a.items() if isinstance(v, torch.Tensor)]
    assert len(tensors) >= 30
    for k in tensors:  # all-reduced activations and replicated lm_head: every rank computes the same logits
        assert torch.equal(a[k], b[k]), k
    print(f"2-rank torchrun run: {tp_run['seconds']:.1f} s")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_logits_and_greedy_tokens_match_single_process(tp_run, single, family, kind):
    out = tp_run["outs"][0]
    one, ref = single[family, kind], single[family, kind + "64"]
    dtype = torch.float32 if kind == "dense" else torch.float16
    ids, mask = (t.to(tp_run["device"]) for t in padded(PROMPTS))
    with torch.no_grad():
        want, want64 = one(ids, attention_mask=mask).float().cpu(), ref(ids, attention_mask=mask).cpu()
    real = mask.bool().cpu()  # padding rows carry no meaning (and attend only to themselves)
    _check_error(out[f"{family}/{kind}/logits"][real], want[real], want64[real], dtype, f"{family} {kind} forward")
    # greedy decoding through the engine: the same tokens, the same per-step logits up to the bound
    g = _engine(one)
    assert torch.equal(out[f"{family}/{kind}/tokens"], g.tokens)
    for i, p in enumerate(PROMPTS):
        seq = torch.tensor([p + g.tokens[i].tolist()], device=tp_run["device"])
        with torch.no_grad():
            full64 = ref(seq)[0, len(p) - 1:len(p) - 1 + NEW].cpu()
        _check_error(out[f"{family}/{kind}/step_logits"][i], g.logits[i], full64, dtype,
                     f"{family} {kind} decode, prompt {i}")
        # the tokens are determined, not a lucky tie-break: no logit moved by half the top-2 gap
        moved = float((out[f"{family}/{kind}/step_logits"][i] - g.logits[i]).abs().max())
        assert _min_margin(g.logits[i]) > 2 * moved, "greedy choices closer than the difference: pick other inputs"


@pytest.mark.parametrize("family", FAMILIES)
def test_in_memory_sharding_equals_sharded_checkpoint_loading(tp_run, family):
    """The same slices either way (read from the file, or cut from a whole model, or from its SparseLinear
    layers expanded and compressed again): bitwise the same results."""
    out = tp_run["outs"][0]
    for kind in ("dense", "sparse"):
        for what in ("logits", "tokens", "step_logits"):
            assert torch.equal(out[f"{family}/{kind}/{what}"], out[f"{family}/{kind}-mem/{what}"]), (kind, what)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("route", ["flash", "bitmask"])
def test_compressed_checkpoints_load_sharded_like_the_dense_one(tp_run, family, route):
    """load_tensor_parallel on the pruned model saved as a flash-llm checkpoint (its layers compressed whole)
    and as a sparse-bitmask one: the ranks get the same compressed slices, so the same nonzeros and bytes and
    bitwise the same results as from the pruned dense checkpoint."""
    for r, o in enumerate(tp_run["outs"]):
        assert o[f"{family}/{route}/sizes"] == o[f"{family}/sparse/sizes"], (r, o[f"{family}/{route}/sizes"])
        assert o[f"{family}/{route}/sizes"][0] > 0
    out = tp_run["outs"][0]
    for what in ("logits", "tokens", "step_logits"):
        assert torch.equal(out[f"{family}/{route}/{what}"], out[f"{family}/sparse/{what}"]), what


@pytest.mark.parametrize("family", FAMILIES)
def test_shard_report_counts_uneven_nonzeros_exactly(tp_run, family):
    """Every rank's slice of every projection: its range, shape, nonzeros and bytes, against the checkpoint's
    weights sliced here and the BitmapTiles byte formula (conftest); slices hold different nonzero counts."""
    weights = load_file(str(tp_run["dir"] / f"{family}-pruned" / "model.safetensors"))
    reports = tp_run["outs"][0][f"{family}/sparse/report"]
    assert reports == tp_run["outs"][1][f"{family}/sparse/report"] and len(reports) == WORLD
    assert len(reports[0]) == 2 * (7 if family == "llama" else 6)
    uneven = 0
    for i, layer in enumerate(reports[0]):
        fqn, kind, shape, _, _, _, fmt, _, _ = layer
        w = weights[fqn + ".weight"]
        assert tuple(w.shape) == shape and fmt == "BitmapTiles"
        dim = 0 if kind == "column" else 1
        assert kind == ("row" if fqn.endswith(("o_proj", "out_proj", "down_proj", "fc2")) else "column")
        stops = []
        counts = []
        for r in range(WORLD):
            f2, k2, s2, local, start, stop, _, nnz, nbytes = reports[r][i]
            assert (f2, k2, s2) == (fqn, kind, shape)
            assert (start, stop) == (r * shape[dim] // WORLD, (r + 1) * shape[dim] // WORLD)
            piece = w.narrow(dim, start, stop - start)
            assert local == tuple(piece.shape)
            assert nnz == int(torch.count_nonzero(piece))
            assert nbytes == expected_nbytes(flash_llm.BitmapTiles, piece != 0)
            stops.append(stop)
            counts.append(nnz)
        assert stops[-1] == shape[dim] and sum(counts) == int(torch.count_nonzero(w))
        uneven += len(set(counts)) > 1
    assert uneven > 0  # random pruning leaves the slices with different counts; the report shows them
    table = tp_run["outs"][0][f"{family}/sparse/table"]
    assert "nonzeros max / mean over ranks" in table and "most uneven projection" in table


@pytest.mark.parametrize("family", FAMILIES)
def test_sampling_takes_rank0_tokens_everywhere(tp_run, single, family):
    """Each rank sampled with a differently seeded generator; all took rank 0's tokens, which are the
    single-process model's tokens for rank 0's seed."""
    a, b = (o[f"{family}/dense/sampled"] for o in tp_run["outs"])
    assert torch.equal(a, b)
    eng = Engine(single[family, "dense"], max_batch=3, max_seq=32)
    dev = tp_run["device"]
    ref = eng.generate(PROMPTS, NEW, temperature=1.0, top_p=0.9, eos_token_id=None,
                       generator=torch.Generator(dev).manual_seed(100))
    other = eng.generate(PROMPTS, NEW, temperature=1.0, top_p=0.9, eos_token_id=None,
                         generator=torch.Generator(dev).manual_seed(101))
    assert torch.equal(a, ref.tokens) and not torch.equal(a, other.tokens)


@pytest.mark.parametrize("family", FAMILIES)
def test_cache_holds_this_ranks_kv_heads_and_bad_calls_are_refused(tp_run, family):
    cfg = from_config(_hf(family).config, device="meta").config
    for out in tp_run["outs"]:
        assert out[f"{family}/dense/kv_heads"] == cfg.num_kv_heads // WORLD
        for key in ("mismatch_error", "mismatch_error_same_sums"):
            msg = out.get(f"{family}/{key}", "(no error)")
            assert "prompts, max_new_tokens or eos_token_id differ between the 2 tensor-parallel ranks" in msg, key
        assert torch.equal(out[f"{family}/after_error"], out[f"{family}/dense/tokens"][:, :2])


def test_prefill_graphs_are_captured_by_every_rank_or_none(tp_run):
    """engine.PREFILL_GRAPHS_TP: a shape that one rank has no room to capture is captured by no rank (its prefill stays
    eager everywhere); one that all can is captured by all and replayed, with the eager engine's tokens."""
    for o in tp_run["outs"]:
        assert o["prefill_graphs/keys"] == [(2, 5)] and o["prefill_graphs/replays"] == [1], o["rank"]
        assert torch.equal(o["prefill_graphs/a"], o["synth/tokens"]) and torch.equal(o["prefill_graphs/d"],
                                                                                       o["synth/tokens"])
        assert torch.equal(o["prefill_graphs/b"], o["prefill_graphs/c"])
        if tp_run["device"].type == "cuda":  # (graphs: the weights moved on rank 1 alone, both ranks dropped theirs)
            assert o["prefill_graphs/cleared"] == 1, o["rank"]


def test_world_size_not_dividing_heads_is_refused_on_every_rank(tp_run):
    for out in tp_run["outs"]:
        for key in ("divisible_error", "divisible_error_synthetic"):
            msg = out[key]
            assert "cannot split three-heads over a tensor-parallel world size of 2" in msg
            assert "num_heads (3) is not a multiple of it; num_kv_heads (3) is not a multiple of it" in msg
            assert "world sizes that work for this model: [1, 3]" not in msg  # 64 % 3 != 0
            assert "world sizes that work for this model: [1]" in msg


def test_synthetic_model_built_per_rank_is_the_single_process_one(tp_run):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        one, _ = build_synthetic(SYNTH, 0.8, device=tp_run["device"], seed=3, progress=False)
    layers = [o["synth/layers"] for o in tp_run["outs"]]
    kinds = {fqn: kind for fqn, kind in ((f, "row" if f.endswith(("o_proj", "down_proj")) else "column")
                                         for f, *_ in layers[0])}
    for i, (fqn, m, k, _, _) in enumerate(layers[0]):
        w = one.get_submodule(fqn).to_dense().cpu()
        dim = 0 if kinds[fqn] == "column" else 1
        size = w.shape[dim] // WORLD
        for r in range(WORLD):
            piece = w.narrow(dim, r * size, size)
            f2, m2, k2, nnz, nbytes = layers[r][i]
            assert (f2, m2, k2) == (fqn, *piece.shape)
            assert nnz == int(torch.count_nonzero(piece)) and nbytes == expected_nbytes(flash_llm.BitmapTiles,
                                                                                       piece != 0)
    ids, mask = (t.to(tp_run["device"]) for t in padded(PROMPTS))
    ref = _dense64(one)
    with torch.no_grad():
        want, want64 = one(ids, attention_mask=mask).float().cpu(), ref(ids, attention_mask=mask).cpu()
    real = mask.bool().cpu()
    _check_error(tp_run["outs"][0]["synth/logits"][real], want[real], want64[real], torch.float16, "synthetic")
    g = Engine(one, max_batch=3, max_seq=32).generate(PROMPTS, NEW, eos_token_id=None, output_logits=True)
    assert torch.equal(tp_run["outs"][0]["synth/tokens"], g.tokens)
    # rows stopping at different steps: every rank the single-process engine's tokens and lengths, streamed alike
    eos, free, tokens, lengths, streamed = tp_run["outs"][0]["synth/eos"]
    for o in tp_run["outs"][1:]:
        assert all(torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b for a, b in zip(o["synth/eos"],
                                                                                             (eos, free, tokens,
                                                                                              lengths, streamed)))
    want = Engine(one, max_batch=3, max_seq=32).generate(PROMPTS, 16, eos_token_id=eos)
    hit = torch.isin(free, torch.tensor(eos))
    firsts = [int(hit[r].nonzero()[0]) for r in range(3)]
    assert lengths.tolist() == want.lengths.tolist() == [f + 1 for f in firsts]
    assert torch.equal(tokens, want.tokens) and torch.equal(streamed, tokens[:, :streamed.shape[1]])


def test_bench_tensor_parallel_mode_smoke(tp_run):
    out_dir = tp_run["dir"] / "bench"
    assert [o["bench_rc"] for o in tp_run["outs"]] == [0, 0]
    data = json.loads((out_dir / "results.json").read_text())
    rows = [(r["impl"], r["tp"], r["sparsity"], r["batch"], r["status"]) for r in data["rows"]]
    assert rows == [("flash-llm-tp", 2, 0, 2, "ok"), ("flash-llm-tp", 2, 80, 2, "ok")]
    for r in data["rows"]:
        assert r["gpus"] == 2 and r["tok_per_gpu_s"] > 0
        assert r["tok_per_gpu_s"] == pytest.approx(r["tok_s"] / 2)
        assert len(r["per_rank"]) == 2 and all(p["weight_bytes"] > 0 for p in r["per_rank"])
        assert 0 <= r["allreduce_share"] and r["allreduce_ms_per_step"] > 0
        assert r["allreduce_timing"] == ("eager" if tp_run["device"].type == "cpu" else "cuda graph")
        assert (r["peak_mem_bytes_max"] > r["weight_bytes_max"]) == (tp_run["device"].type == "cuda")
    sparse = data["rows"][1]
    assert sum(p["nnz"] for p in sparse["per_rank"]) < 0.25 * sum(p["nnz"] for p in data["rows"][0]["per_rank"])
    summary = (out_dir / "summary.md").read_text()
    assert "tokens per GPU-second" in summary and "| 2 |" in summary


def test_tp_check_script_compares_ranks_with_one_process(tmp_path):
    """benchmarks/tp_check.py (issue 8's check at real sizes on GPUs), as a 2-rank gloo smoke run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           os.path.join(ROOT, "benchmarks", "tp_check.py"), "--model", "tiny", "--prompt", "6", "--new", "5",
           "--out", str(tmp_path), "--device", "cpu"]  # (gloo ranks on the CPU, on a GPU machine too)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = json.loads((tmp_path / "tp_check.json").read_text())["rows"]
    assert [(r["sparsity"], r["world_size"]) for r in rows] == [(0, 2), (80, 2)]
    for r in rows:
        assert r["logits_ok"] and r["tokens_equal"] and r["tokens_compared"] == 4 * 5
        assert 0 < r["max_err_tp_vs_fp32"] <= r["tolerance"] and r["max_err_single_vs_fp32"] > 0
    assert "| 80 % |" in proc.stdout and "PASS" in proc.stdout


# ---------------------------------------------------------------------------------------------------
# in this process: no torchrun
# ---------------------------------------------------------------------------------------------------
def test_a_rank_that_never_starts_gives_an_error_within_the_timeout():
    port = _free_port()
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match=r"rank 0 of 2: the process group did not form within 2 s at "
                                           rf"127\.0\.0\.1:{port} \(gloo\): a rank failed to start"):
        init_tensor_parallel("gloo", rank=0, world_size=2, master_addr="127.0.0.1", master_port=port,
                             timeout=datetime.timedelta(seconds=2))
    assert time.perf_counter() - t0 < 15
    assert not torch.distributed.is_initialized()
    t0 = time.perf_counter()  # the other side: nobody listens at the address
    with pytest.raises(RuntimeError, match=r"rank 1 of 2: the process group did not form within 1 s"):
        init_tensor_parallel("gloo", rank=1, world_size=2, master_addr="127.0.0.1", master_port=_free_port(),
                             timeout=1)
    assert time.perf_counter() - t0 < 15


def test_check_divisible_names_every_problem():
    cfg = preset("llama-3-8b")  # 32 heads, 8 KV heads, 14336 intermediate
    check_divisible(cfg, 8)
    with pytest.raises(ValueError, match=r"cannot split llama-3-8b over a tensor-parallel world size of 16: "
                                         r"num_kv_heads \(8\) is not a multiple of it\. .*work for this model: "
                                         r"\[1, 2, 4, 8\]"):
        check_divisible(cfg, 16)
    with pytest.raises(ValueError, match=r"num_heads \(96\) is not a multiple of it; num_kv_heads \(96\) .*; "
                                         r"intermediate_size \(49152\) is not"):
        check_divisible(preset("opt-175b"), 5)
    with pytest.raises(ValueError, match=r"world_size must be an int >= 1, got 0"):
        check_divisible(cfg, 0)


def test_opt_175b_at_80_percent_fits_two_80gb_gpus_per_rank_estimate():
    one = estimate_bytes("opt-175b", 0.8)
    two = estimate_bytes("opt-175b", 0.8, tp_size=2)
    assert 90e9 < one["total"] < 95e9  # more than one 80 GB card
    assert abs(two["projections"] / one["projections"] - 0.5) < 0.01  # each rank half the projections
    assert two["other"] == one["other"]  # embeddings, norms, lm_head replicated
    assert two["total"] + two["transient"] < 80e9 < one["total"]


def test_nccl_environment_defaults_keep_nvls_off(monkeypatch):
    for k in NCCL_ENV_DEFAULTS:
        monkeypatch.delenv(k, raising=False)
    assert nccl_env_defaults() == {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
    assert os.environ["NCCL_NVLS_ENABLE"] == "0"
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "1")  # the user's choice is kept, with a warning
    with pytest.warns(UserWarning, match=r"NCCL_NVLS_ENABLE=1 in the environment turns NVLink multicast"):
        assert nccl_env_defaults()["NCCL_NVLS_ENABLE"] == "1"


def test_close_resets_the_tracked_graphs_before_destroying_the_group():
    class FakeGraph:  # stands in for a CUDA graph holding captured collectives
        resets = 0

        def reset(self):
            FakeGraph.resets += 1
            assert torch.distributed.is_initialized()  # reset before the group goes

    kept, dropped = FakeGraph(), FakeGraph()
    tp = init_tensor_parallel("gloo")
    tp.track_graph(kept)
    tp.track_graph(dropped)
    del dropped  # tracked weakly: a graph nobody holds is not kept alive
    tp.close()
    assert FakeGraph.resets == 1 and not torch.distributed.is_initialized()
    tp.close()  # twice: nothing more to do
    assert FakeGraph.resets == 1


def test_world_size_one_runs_the_same_code_in_one_process(world1):
    tp = world1
    assert (tp.rank, tp.world_size, tp.backend, tp.device.type) == (0, 1, "gloo", "cpu")
    hm = _hf("opt", seed=1)
    one = from_config(hm.config, dtype=torch.float32, device="meta")
    one.load_state_dict(hm.state_dict(), assign=True)
    model = copy.deepcopy(one)
    report = tensor_parallel_(model, tp)
    assert model.tensor_parallel is tp and len(report.layers) == 12
    assert isinstance(model.model.decoder.layers[0].fc1, ColumnParallelLinear)
    assert isinstance(model.model.decoder.layers[0].fc2, RowParallelLinear)
    assert report.nnz == sum(int(torch.count_nonzero(m.weight)) for n, m in one.named_modules()
                             if isinstance(m, torch.nn.Linear) and n != "lm_head")
    assert "rank 0 of 1: 12 projection slices (12 dense)" in str(report)
    assert ShardReport.table([report]).splitlines()[1].split()[:2] == ["0", "12"]
    ids = torch.tensor([PROMPTS[2]])
    with torch.no_grad():  # one rank: the same products, biases inside them, an all-reduce of one: bitwise equal
        assert torch.equal(model(ids), one(ids))
    a, b = _engine(model), _engine(one)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logits, b.logits)
    with pytest.raises(ValueError, match=r"cuda_graphs=True needs a model on a CUDA device"):
        Engine(model, cuda_graphs=True)
    with pytest.raises(ValueError, match=r"the model is already tensor-parallel"):
        tensor_parallel_(model, tp)
    with pytest.raises(ValueError, match=r"on the meta device; load the weights first"):
        tensor_parallel_(from_config(hm.config, device="meta"), tp)
    # a sparsified model is sharded from its compressed layers (kept compressed), then runs as before
    sp = from_config(hm.config, dtype=torch.float16, device="meta")
    sp.load_state_dict({k: v.half() for k, v in hm.state_dict().items()}, assign=True)
    magnitude_prune_(sp, 0.6, filter_fn=lambda m, fqn: fqn != "lm_head")
    pruned = copy.deepcopy(sp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        flash_llm.sparsify_(sp)
    sp_tp = copy.deepcopy(sp)
    rep = tensor_parallel_(sp_tp, tp)
    assert {s.format for s in rep.layers} == {"BitmapTiles"}
    assert rep.nnz == sum(m.nnz for m in sp.modules() if isinstance(m, flash_llm.SparseLinear))
    a, b = _engine(sp_tp), _engine(sp)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logits, b.logits)
    # or sharded dense, then sparsify_ on the tensor-parallel model: it compresses the local slices
    dense_tp = copy.deepcopy(pruned)
    tensor_parallel_(dense_tp, tp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        flash_llm.sparsify_(dense_tp)
    again = ShardReport.of(dense_tp)
    assert [(s.fqn, s.format, s.nnz, s.nbytes) for s in again.layers] == [(s.fqn, s.format, s.nnz, s.nbytes)
                                                                          for s in rep.layers]
    assert torch.equal(_engine(dense_tp).tokens, _engine(sp).tokens)


def test_dense_checkpoint_slices_compressed_while_loading(world1, tmp_path):
    """load_tensor_parallel with a SparsifyConfig: each slice decided on its own (min_sparsity, skip_names),
    and the reason recorded for slices kept dense."""
    hm = _hf("llama", seed=2)
    model = from_config(hm.config, dtype=torch.float16, device="meta")
    model.load_state_dict({k: v.half() for k, v in hm.state_dict().items()}, assign=True)
    magnitude_prune_(model, 0.6, filter_fn=lambda m, fqn: "mlp" in fqn)  # attention stays dense
    _save_hf(model, tmp_path / "ckpt")
    tpm, rep = load_tensor_parallel(tmp_path / "ckpt", world1, sparsify=flash_llm.SparsifyConfig(
        skip_names=("lm_head", "down_proj")), progress=False)
    by = {s.fqn.split(".", 3)[-1]: s for s in rep.layers if ".0." in s.fqn}
    assert by["mlp.gate_proj"].format == "BitmapTiles" and by["mlp.up_proj"].format == "BitmapTiles"
    assert by["mlp.down_proj"].format == "dense" and "skip_names" in by["mlp.down_proj"].note
    assert by["self_attn.q_proj"].format == "dense" and "< min_sparsity 0.3" in by["self_attn.q_proj"].note
    assert "kept dense: 10 slice(s)" in str(rep)  # 2 layers x (q, k, v, o below min_sparsity; down skipped)
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        torch.testing.assert_close(tpm(ids), model(ids), rtol=0, atol=4 * ulp(torch.float16, 1.0))
    with pytest.raises(FileNotFoundError, match=r"is not a directory"):
        load_tensor_parallel(tmp_path / "nope", world1)
    os.remove(tmp_path / "ckpt" / "model.safetensors")
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors files"):
        load_tensor_parallel(tmp_path / "ckpt", world1)


def test_bench_tp_mode_at_world_size_one_reports_no_allreduce(world1, tmp_path):
    bench = load_script("benchmarks/bench_e2e.py", "bench_e2e_w1")
    assert bench.main(["--tp", "1", "--device", "cpu", "--models", "tiny-llama", "--sparsities", "80", "--batches",
                       "2", "--prompt", "4", "--new", "3", "--repeats", "1", "--no-progress", "--out",
                       str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [(r["tp"], r["sparsity"], r["status"]) for r in rows] == [(1, 0, "ok"), (1, 80, "ok")]
    assert all(r["allreduce_timing"] == "none (world size 1)" and r["allreduce_ms_per_step"] == 0 for r in rows)
    assert torch.distributed.is_initialized()  # the benchmark used the existing group and left it alone


def test_flash_checkpoint_keeps_its_formats_and_dense_layers_at_world_size_one(world1, tmp_path):
    """A flash-llm checkpoint with attention dense and the MLP compressed (Tiled-CSL): the sharded model keeps
    each layer as saved, equals flash_llm.from_pretrained's model, and a dtype that differs from the stored
    one is refused by name."""
    hm = _hf("llama", seed=4)
    model = from_config(hm.config, dtype=torch.float16, device="meta")
    model.load_state_dict({k: v.half() for k, v in hm.state_dict().items()}, assign=True)
    magnitude_prune_(model, 0.7, filter_fn=lambda m, fqn: "mlp" in fqn)
    _save_hf(model, tmp_path / "pruned")
    convert(tmp_path / "pruned", tmp_path / "flash", format="tiled-csl", progress=False)
    tpm, rep = load_tensor_parallel(tmp_path / "flash", world1, progress=False)
    by = {s.fqn.split(".", 3)[-1]: s for s in rep.layers if ".0." in s.fqn}
    assert by["mlp.gate_proj"].format == "TiledCSL" and by["mlp.down_proj"].format == "TiledCSL"
    assert by["self_attn.q_proj"].format == "dense" and by["self_attn.o_proj"].format == "dense"
    one = flash_llm.from_pretrained(tmp_path / "flash", progress=False)
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        assert torch.equal(tpm(ids), one(ids))
    with pytest.raises(flash_llm.FormatError, match=r"'model\.layers\.0\.mlp\.\w+_proj' is compressed as "
                                                    r"torch\.float16 but the model is loaded in torch\.bfloat16"):
        load_tensor_parallel(tmp_path / "flash", world1, dtype=torch.bfloat16, progress=False)


def test_checkpoint_loader_reads_old_opt_files_and_names_problems(world1, tmp_path):
    """OPT-350m's layout (project_in / project_out, post-LayerNorm) from an old-style file whose keys lack the
    leading ``model.``: every tensor read, the same logits; unknown tensors are reported, shape mismatches and
    missing tensors raise naming them."""
    torch.manual_seed(4)
    hc = transformers.OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=96, num_hidden_layers=2,
                                num_attention_heads=4, max_position_embeddings=64, init_std=0.1, dropout=0.0,
                                do_layer_norm_before=False, word_embed_proj_dim=32, pad_token_id=1)
    hm = transformers.OPTForCausalLM(hc).eval()
    one = from_config(hm.config, dtype=torch.float32, device="meta")
    one.load_state_dict(hm.state_dict(), assign=True)
    folder = tmp_path / "opt-350m-style"
    _save_hf(one, folder)
    state = load_file(str(folder / "model.safetensors"))
    state = {k.removeprefix("model."): v for k, v in state.items()}
    state["decoder.version"] = torch.zeros(1)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.warns(UserWarning, match=r"1 tensor\(s\) of the checkpoint are not weights of a opt model and were "
                                         r"not read, e.g. \['decoder.version'\]"):
        model, _ = load_tensor_parallel(folder, world1, dtype=torch.float32, progress=False)
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), one(ids), rtol=0, atol=1e-5)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "ffn_dim": 128}))
    with pytest.raises(ValueError, match=r"tensor 'decoder.layers.0.fc1.weight' has shape \(96, 64\); the "
                                         r"config.json says \(128, 64\)"):
        load_tensor_parallel(folder, world1, dtype=torch.float32, progress=False)
    (folder / "config.json").write_text(json.dumps(cfg))
    del state["decoder.layers.1.fc2.bias"]
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(KeyError, match=r"no tensor 'model.decoder.layers.1.fc2.bias' in the checkpoint"):
        load_tensor_parallel(folder, world1, dtype=torch.float32, progress=False)


def test_sharding_refuses_merged_projections_and_bad_sparsify_leaving_the_model_as_it_was(world1):
    """A merged model (Engine(merge=True), merge_projections) is refused naming the merged layer, before any layer is
    replaced; a ``sparsify`` that is not a SparsifyConfig is refused by type (session 71: an AttributeError either
    way, the first after some projections were already sharded)."""
    from flash_llm.models import merge_projections

    hm = _hf("llama", seed=2)
    model = from_config(hm.config, dtype=torch.float32, device="meta")
    model.load_state_dict(hm.state_dict(), assign=True)
    merge_projections(model)
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match=r"q_proj is merged into model.layers.0.self_attn.qkv_proj .*"
                                         r"unmerge_projections\(model\) first"):
        tensor_parallel_(model, world1)
    assert {n: type(m) for n, m in model.named_modules()} == before and getattr(model, "tensor_parallel", None) is None
    for bad in (True, "bitmap"):
        with pytest.raises(TypeError, match=r"sparsify must be a flash_llm.SparsifyConfig or None"):
            tensor_parallel_(model, world1, sparsify=bad)


def test_parallel_layers_check_their_shapes(world1):
    lin = torch.nn.Linear(8, 4)
    with pytest.raises(ValueError, match=r"local layer is 4x8; a column shard \[0:2\] of a 4x8 weight is 2x8"):
        ColumnParallelLinear(lin, 8, 4, 0, 2, world1)
    with pytest.raises(ValueError, match=r"local layer is 4x8; a row shard \[0:4\] of a 4x16 weight is 4x4"):
        RowParallelLinear(lin, 16, 4, 0, 4, world1)
    rank1 = types.SimpleNamespace(rank=1, world_size=2)
    with pytest.raises(ValueError, match=r"rank 1's row-parallel local layer has a bias; only rank 0's may"):
        RowParallelLinear(lin, 16, 4, 8, 16, rank1)
    with pytest.raises(TypeError, match=r"local must be an nn.Linear or a flash_llm.SparseLinear, got Identity"):
        ColumnParallelLinear(torch.nn.Identity(), 8, 4, 0, 4, world1)
    row = RowParallelLinear(lin, 8, 4, 0, 8, world1)
    x = torch.randn(3, 8)
    assert torch.equal(row(x), lin(x))  # one rank: the all-reduce leaves the product as it is
    assert isinstance(TensorParallel.from_group(), TensorParallel)


def test_init_arguments_are_checked():
    with pytest.raises(ValueError, match=r"rank must be in \[0, world_size\); got rank=2, world_size=2"):
        init_tensor_parallel("gloo", rank=2, world_size=2, master_addr="127.0.0.1", master_port=1)
    with pytest.raises(ValueError, match=r"backend must be 'nccl' or 'gloo', got 'mpi'"):
        init_tensor_parallel("mpi")
    with pytest.raises(ValueError, match=r"world size 2 needs a rendezvous address"):
        init_tensor_parallel("gloo", rank=0, world_size=2)
    with pytest.raises(ValueError, match=r"timeout must be a positive number of seconds"):
        init_tensor_parallel("gloo", timeout=0)
    with pytest.raises(RuntimeError, match=r"torch.distributed is not initialized"):
        TensorParallel.from_group()
    assert not torch.distributed.is_initialized()


def test_small_helpers_name_bad_inputs():
    """An uneven share is refused, not truncated; numpy ints decode; a backend that is not a string is named."""
    import numpy as np

    from flash_llm import data
    from flash_llm.parallel.layers import shard_range

    assert shard_range(8, 2, 1) == (4, 8)
    with pytest.raises(ValueError, match="5 features do not split into 2 equal shares"):
        shard_range(5, 2, 0)
    assert data.decode(np.array([104, 105])) == data.decode([np.int64(104), 105]) == "hi"
    with pytest.raises(ValueError, match=r"got 256"):
        data.decode([256])
    with pytest.raises(ValueError, match="backend must be 'nccl' or 'gloo', got 5"):
        init_tensor_parallel(5)

"""End-to-end decoding: flash-llm's engine on dense and sparse synthetic models at real shapes, and Hugging Face
``generate`` on the dense model (what users run today).

    python benchmarks/bench_e2e.py [--quick] [--models llama-3-8b,opt-30b] [--sparsities 0,50,70,80,90]
                                   [--batches 1,8,16,32,64] [--prompt 128] [--new 128] [--repeats 3]
                                   [--dtype fp16] [--no-hf] [--memory-limit-gb 80] [--out DIR] [--overwrite]

For every (model, sparsity, batch): a synthetic model (random weights, each decoder projection pruned to the
sparsity and compressed as it is drawn; sparsity 0 = dense), random prompts of ``--prompt`` tokens, ``--new``
new tokens, greedy, no early stop.  Reported: decode tokens/s (batch x decode steps / their time), tokens per
GPU-second end to end (prefill included), time per output token (median step), time to first token (prefill
plus the first token), weight bytes and their ratio to the format's formula (as each run's engine had them: after
its merge and DeltaRows layout; ``flash_llm.models.synthetic.projection_bytes``), peak GPU memory, and the
bandwidth floor of one decode step (``floor_ms``: bytes of weights read per step / measured copy bandwidth, the
issue's definition) with the share of it a batch-1 step reaches (``floor_pct``: from the mean step, where no slow
step hides, since session 74; the target line prints the mean step beside it, and ``floor_pct_median`` from the
median step, the time per output token).  That floor leaves out the KV cache, which each step reads too, a large
share at large batches (OPT-30B's cache at batch 64 is about as large as its 80 %-sparse weights): ``kv_read_bytes``
is the least a decode step must read of it, averaged over the steps (per step the positions its sequences hold, the
step's own token included: the prompt and the tokens generated before it, x 2 (K and V) x layers x batch x KV heads x
head_dim x the dtype's bytes; :func:`kv_read_bytes`), and ``floor_kv_ms`` / ``floor_kv_pct`` the floor and share with
those bytes added to the weights' (:func:`kv_floor`; the log line prints both).  The engine itself reads more of the
cache: each step attends ``engine.decode_kv_len`` slots (the positions rounded up to its KV-cache bucket, at least
``DECODE_KV_MIN``, up to the cache's size), so the minimum understates its traffic and the share it reaches.  Times
are CUDA events, the median over ``--repeats`` generations after a warm-up of the same length (it captures the decode
graphs of every KV-cache bucket the runs reach).  ``--memory-limit-gb`` caps the process' GPU memory
(``set_per_process_memory_fraction``; in 10^9 bytes), e.g. 85.5 to ask what fits on an 80 GB H100 (81559 MiB, 79.6
GiB) while running on an H200, or 80 for a margin below it.

Writes ``results.json``, ``results.csv``, ``e2e.png`` and ``summary.md`` (a table for benchmarks/RESULTS.md
with card, versions, commit and command) under ``--out``; prints the summary, whose target lines say NOT RUN (with
the reason) where a point did not run.  ``--device cpu`` with the ``tiny-*`` models is a smoke run of the script
itself.  On CUDA, sparse models are refused where flash-llm's kernels cannot run (``kernels.supported``: its ops would
run their PyTorch reference).

Tensor-parallel mode (``--tp``), under torchrun: every model is sharded over K ranks (flash_llm.parallel, NCCL)::

    torchrun --nproc-per-node 4 benchmarks/bench_e2e.py --tp 4,2 --models opt-66b --sparsities 0,80 --no-hf

``--tp 4,2`` measures on the first 4 ranks, then on the first 2 (the others wait), so one run compares dense on
4 GPUs with sparse on 2.  Reported per (model, sparsity, K, batch): tokens per GPU-second (batch x new tokens /
end-to-end time / K), decode tokens/s, TPOT and TTFT of every rank, weight bytes, nonzeros and peak GPU memory of
every rank, and the all-reduce share of a decode step (the step's 2 x layers all-reduces of ``[batch, hidden]``,
captured and timed alone, over the measured time per token).  The Hugging Face baseline is not run.  ``--tp 1``
also runs without torchrun (a one-process group).
"""

from __future__ import annotations

import argparse
import csv
import gc
import io
import json
import math
import os
import statistics
import sys
import time
from collections import Counter

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing as T  # noqa: E402

from flash_llm import kernels  # noqa: E402
from flash_llm.cli import _on_device  # noqa: E402
from flash_llm.engine import Engine, _dense_from_delta_rows  # noqa: E402
from flash_llm import engine as engine_mod  # noqa: E402
from flash_llm.nn import FORMAT_NAMES, SparseLinear  # noqa: E402
from flash_llm.models import preset, unmerge_projections  # noqa: E402
from flash_llm.models import _common  # noqa: E402
from flash_llm.models.config import PRESETS  # noqa: E402
from flash_llm.models.synthetic import DoesNotFit, build_synthetic, projection_bytes  # noqa: E402
from flash_llm.parallel import ShardReport, TensorParallel, check_divisible, init_tensor_parallel  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
TINY = {  # smoke-test shapes (CPU)
    "tiny-llama": preset("llama-3-8b").replace(num_layers=2, hidden_size=128, intermediate_size=256, num_heads=4,
                                               num_kv_heads=2, vocab_size=512, bos_token_id=1, eos_token_id=2,
                                               name="tiny-llama"),
    "tiny-opt": preset("opt-13b").replace(num_layers=2, hidden_size=128, intermediate_size=512, num_heads=4,
                                          vocab_size=512, max_position_embeddings=512, name="tiny-opt"),
}
OUTPUTS = ("results.json", "results.csv", "e2e.png", "summary.md")
# Issue targets (one H100): decode tokens/s over dense at batch 1-16, by sparsity; never slower at batch 64;
# batch-1 decode at >= 80 % of the bandwidth floor; weight bytes within 3 % of the format's formula.
SPEEDUP_TARGETS = {0.8: 3.0, 0.7: 2.3}
TARGET_MODELS = ("llama-3-8b", "opt-30b")


def _cap_memory(device: torch.device, gb: float) -> None:
    """Cap this process' allocations on CUDA ``device`` (the current one without an index) at ``gb`` x 10^9 bytes."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, gb * 1e9 / total), index)


def _no_kernels(device: torch.device, sparsities) -> str:
    """Why the sparse models of ``sparsities`` (percent) cannot be timed on CUDA ``device``: flash-llm's kernels
    cannot run there (``kernels.supported``), so its ops would run their PyTorch reference; "" where they can."""
    if device.type != "cuda" or not any(sparsities):
        return ""
    ok, why = kernels.supported(device)
    return "" if ok else f"flash-llm's sparse layers would run their PyTorch reference, not the CUDA kernels: {why}"


def _config(name):
    if name in TINY:
        return TINY[name]
    return preset(name)


def _atomic_write(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak(device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


def _reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bytes_read_per_step(model) -> int:
    """Weight bytes one decode step reads: every parameter and buffer once, except embedding tables that are
    only indexed (the input embedding when it is not the tied ``lm_head``, OPT's positions)."""
    head = getattr(model.lm_head, "weight", None)
    indexed = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding) and m.weight is not head}
    return _stored_bytes(model, skip=indexed)


def _stored_bytes(model, skip=frozenset()) -> int:
    """Bytes of the model's parameters and buffers, each tensor once, but those whose ``id`` is in ``skip``."""
    stored = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for i, t in stored.items() if i not in skip)


def kv_read_bytes(cfg, batch: int, prompt_len: int, new: int, itemsize: int) -> float:
    """The KV-cache bytes a decode step must read at least, averaged over a generation's ``new - 1`` decode steps
    (the first token comes from the prefill): step ``i`` (1 to ``new - 1``) attends the ``prompt_len + i`` positions
    its sequences hold (the prompt, the ``i`` tokens generated before it, its own input among them), each holding K
    and V of every layer and KV head: ``2 x num_layers x batch x num_kv_heads x head_dim x itemsize`` bytes a
    position.  (The engine reads more: :func:`flash_llm.engine.decode_kv_len` slots a step.)"""
    per_position = 2 * cfg.num_layers * batch * cfg.num_kv_heads * cfg.head_dim * itemsize
    steps = range(1, new)
    return per_position * sum(prompt_len + i for i in steps) / len(steps)


def kv_floor(read_bytes: int, kv_bytes: float, copy_bw_Bps: float, tpot_mean_ms: float | None = None) -> dict:
    """``floor_kv_ms``: the weights' ``read_bytes`` and the KV cache's ``kv_bytes`` a step reads over the copy
    bandwidth; ``floor_kv_pct``: its share of the mean step ``tpot_mean_ms`` (where given)."""
    out = {"kv_read_bytes": kv_bytes, "floor_kv_ms": 1e3 * (read_bytes + kv_bytes) / copy_bw_Bps}
    if tpot_mean_ms:
        out["floor_kv_pct"] = 100 * out["floor_kv_ms"] / tpot_mean_ms
    return out


def random_prompts(batch, length, vocab, gen) -> list[list[int]]:
    return torch.randint(3, vocab, (batch, length), generator=gen).tolist()


def measure_engine(model, batch, prompt_len, new, repeats, gen, fuse: bool = False, merge: bool = False,
                   delta_layout: str = "auto", max_batch: int | None = None, formats: str = "keep",
                   prefill_dense: bool = False, max_seq: int | None = None, progress: bool = True) -> dict:
    """One engine (``max_batch``: default ``batch``) generating ``batch`` prompts: the medians of ``repeats`` runs.
    ``formats``: ``Engine(formats=)``: "keep" (the format --format asked for) or "auto" (the engine re-encodes
    BitmapTiles / Tiled-CSL layers for its max_batch, as it does by default); ``prefill_dense``: ``Engine``'s (dense
    copies for the prefill, their bytes in ``prefill_dense_bytes``); ``max_seq``: the engine's cache (default: the
    prompt and the new tokens); ``progress``: the engine's bars while it re-encodes layers (off: the log's lines stay
    whole)."""
    device = next(model.parameters()).device
    _reset_peak(device)
    eng = Engine(model, max_batch=max_batch or batch, max_seq=max_seq or prompt_len + new, fuse=fuse, merge=merge,
                 delta_layout=delta_layout, formats=formats, prefill_dense=prefill_dense, progress=progress)
    prompts = random_prompts(batch, prompt_len, model.config.vocab_size, gen)
    # warm-up as long as the runs: the kernels, and the decode graph of every KV-cache bucket the runs reach (a
    # shorter one left a capture inside a timed step where prompt + new crosses a bucket)
    eng.generate(prompts, new, eos_token_id=None)
    runs = [eng.generate(prompts, new, eos_token_id=None) for _ in range(repeats)]
    _sync(device)
    eng.use_layout(batch)
    row = {
        "decode_tok_s": statistics.median(r.decode_tokens_per_s for r in runs),
        "tok_per_gpu_s": statistics.median(batch * new / r.total_s for r in runs),
        "tpot_ms": 1e3 * statistics.median(r.tpot_s for r in runs),
        # the mean step (what the throughput sees; the floor's share is taken from it)
        "tpot_mean_ms": 1e3 * statistics.median(sum(r.step_s) / len(r.step_s) for r in runs),
        "ttft_ms": 1e3 * statistics.median(r.ttft_s for r in runs),
        "peak_mem_bytes": _peak(device),
        "cache_bytes": eng.cache_bytes,
        "max_batch": eng.max_batch,
        "max_seq": eng.max_seq,
        "copies_bytes": eng.copies_bytes,  # (delta_layout="dual": the Tiled-CSL copies beside the weights)
        "prefill_dense_bytes": eng.prefill_dense_bytes,  # (prefill_dense: the dense copies the prefill ran on)
        # (below: the weights this batch's steps ran on: delta_layout="dual" holds two sets and swaps them by batch)
        "read_bytes": bytes_read_per_step(model),  # (after the engine's merge and DeltaRows layout)
    }
    stored, formula = projection_bytes(model)  # the weights this engine ran on (the build's report is before it)
    ran = _ran_formats(model)
    if ran:  # (a sparse model: the weights as this engine held them)
        row.update(weight_bytes=_stored_bytes(model), ran_formats=ran)
    if formula:  # (none where the engine held every projection dense: 50 % sparsity from batch 4)
        row.update(projection_bytes=stored, formula_ratio=stored / formula)
    del eng
    return row


def _ran_formats(model) -> dict[str, int]:
    """``{format class name: layers}`` of ``model``'s sparse layers as they stand (``Engine.use_layout`` first), and
    ``"dense"``: the layers an engine holds dense in place of DeltaRows ones (``flash_llm.engine.DENSE``)."""
    ran = Counter(m.weight_format.__name__ for m in model.modules() if isinstance(m, SparseLinear))
    ran.update("dense" for m in model.modules() if _dense_from_delta_rows(m))
    return dict(ran)


def hf_twin(model):
    """A transformers model sharing ``model``'s dense tensors (no copy), or None with the reason.  Projections
    merged by ``Engine(merge=True)`` are split back first (transformers keeps q/k/v and gate/up separate)."""
    try:
        import transformers
    except ImportError:
        return None, "transformers is not installed"
    unmerge_projections(model)
    cfg = model.config
    device = next(model.parameters()).device
    hc = transformers.AutoConfig.for_model(**cfg.to_hf())
    with torch.device("meta"):
        hm = transformers.AutoModelForCausalLM.from_config(hc)
    hm.load_state_dict(model.state_dict(), assign=True, strict=True)
    if hasattr(hm.model, "rotary_emb"):  # its frequencies are a non-persistent buffer, still on meta
        with torch.device(device):
            hm.model.rotary_emb = type(hm.model.rotary_emb)(config=hm.config)
    if cfg.tie_word_embeddings:
        hm.lm_head.weight = hm.get_input_embeddings().weight
    left = [n for n, t in [*hm.named_parameters(), *hm.named_buffers()] if t.is_meta]
    if left:
        return None, f"could not place {left[:3]} on {device}"
    return hm.eval(), ""


def measure_hf(hm, batch, prompt_len, new, repeats, gen, pad_id) -> dict:
    device = next(hm.parameters()).device
    ids = torch.tensor(random_prompts(batch, prompt_len, hm.config.vocab_size, gen), device=device)
    mask = torch.ones_like(ids)

    def run(n):
        _sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = hm.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              pad_token_id=pad_id)
        _sync(device)
        assert out.shape[1] == prompt_len + n
        return time.perf_counter() - t0

    _reset_peak(device)
    run(2)  # warm-up
    ttft = statistics.median(run(1) for _ in range(repeats))
    total = statistics.median(run(new) for _ in range(repeats))
    decode = max(total - ttft, 1e-9)
    return {"decode_tok_s": batch * (new - 1) / decode, "tok_per_gpu_s": batch * new / total,
            "tpot_ms": 1e3 * decode / (new - 1), "ttft_ms": 1e3 * ttft, "peak_mem_bytes": _peak(device),
            "cache_bytes": 0}


def copy_bandwidth(device) -> float:
    """The device's copy bandwidth (bytes/s, read plus written) that the bandwidth floor divides by: measured on
    ``device`` itself (``--device cuda:N``: on GPU N; until session 88 on the current device, GPU 0)."""
    if device.type == "cuda":
        return T.copy_bandwidth(device=device)
    a = torch.empty(1 << 26, dtype=torch.uint8)
    b = torch.empty_like(a)
    t0 = time.perf_counter()
    for _ in range(5):
        b.copy_(a)
    return 2 * 5 * a.numel() / (time.perf_counter() - t0)


def run_sweep(args, device, dtype, env, log) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(0)
    for name in args.models:
        cfg = _config(name)
        dense_tok = {}
        for sp in args.sparsities:
            base = {"model": name, "sparsity": sp, "dtype": args.dtype, "prompt": args.prompt, "new_tokens": args.new,
                    "format": args.format if sp else "dense"}
            _free(device)
            limit = None
            if args.memory_limit_gb and device.type == "cuda":  # the cap, not the card's free memory
                limit = int(args.memory_limit_gb * 1e9) - torch.cuda.memory_reserved(device)
            try:
                model, report = build_synthetic(cfg, sp / 100 or None, dtype=dtype, device=device, seed=1,
                                                progress=not args.no_progress, memory_limit=limit, fmt=args.format)
            except (DoesNotFit, torch.cuda.OutOfMemoryError) as e:
                msg = str(e).splitlines()[0]
                log(f"{name} sparsity {sp}: {msg}")
                rows += [{**base, "impl": "flash-llm", "batch": b, "status": f"does not fit: {msg}"}
                         for b in args.batches]
                continue
            log(str(report))
            mem = {"weight_bytes": report.weight_bytes, "projection_bytes": report.projection_bytes,
                   "formula_ratio": report.formula_ratio if sp else 1.0,
                   "model_allocated_bytes": report.allocated_bytes, "achieved_sparsity": report.achieved_sparsity}
            read = bytes_read_per_step(model)
            floor_ms = 1e3 * read / env["copy_bw_Bps"]
            for b in args.batches:
                row = {**base, "impl": "flash-llm", "batch": b, **mem, "read_bytes": read, "floor_ms": floor_ms}
                try:
                    row.update(measure_engine(model, b, args.prompt, args.new, args.repeats, gen, args.fuse,
                                              args.merge, args.delta_layout, args.max_batch, args.engine_formats,
                                              args.prefill_dense and sp > 0, args.max_seq,
                                              progress=not args.no_progress))
                    row["floor_ms"] = 1e3 * row["read_bytes"] / env["copy_bw_Bps"]
                    row["status"] = "ok"
                    row["floor_pct"] = 100 * row["floor_ms"] / row["tpot_mean_ms"]  # (mean step: no slow one hidden)
                    row["floor_pct_median"] = 100 * row["floor_ms"] / row["tpot_ms"]  # (the median step, as tpot_ms)
                    # (the same with the KV cache's least bytes a step added: the floor leaves them out)
                    row.update(kv_floor(row["read_bytes"], kv_read_bytes(cfg, b, args.prompt, args.new, dtype.itemsize),
                                        env["copy_bw_Bps"], row["tpot_mean_ms"]))
                    if sp == 0:
                        dense_tok[b] = row["decode_tok_s"]
                    if b in dense_tok:
                        row["speedup_vs_dense"] = row["decode_tok_s"] / dense_tok[b]
                    log(f"{name} {sp:>3}% b={b:<3} decode {row['decode_tok_s']:9.1f} tok/s  tpot "
                        f"{row['tpot_ms']:7.3f} ms  ttft {row['ttft_ms']:8.2f} ms  floor {row['floor_ms']:6.3f} ms "
                        f"({row['floor_pct']:.0f} %; with KV {row['floor_kv_ms']:.3f} ms, "
                        f"{row['floor_kv_pct']:.0f} %)  peak {row['peak_mem_bytes'] / 2**30:.1f} GiB"
                        + (f"  x{row['speedup_vs_dense']:.2f}" if "speedup_vs_dense" in row else "")
                        + "".join(f"  (ran as {f})" for f in row.get("ran_formats", {})
                                  if f != FORMAT_NAMES[args.format].__name__))
                except torch.cuda.OutOfMemoryError as e:
                    row["status"] = f"out of memory: {str(e).splitlines()[0][:120]}"
                    log(f"{name} {sp}% b={b}: {row['status']}")
                _free(device)
                rows.append(row)
            if sp == 0 and args.hf:
                hm, why = hf_twin(model)
                for b in args.batches:
                    row = {**base, "impl": "hf-generate", "batch": b, **mem, "read_bytes": read, "floor_ms": floor_ms}
                    if hm is None:
                        row["status"] = f"skipped: {why}"
                        rows.append(row)
                        continue
                    try:
                        row.update(measure_hf(hm, b, args.prompt, args.new, max(1, min(args.repeats, 2)), gen,
                                              cfg.pad_token_id if cfg.pad_token_id is not None else 0))
                        row["status"] = "ok"
                        row["floor_pct"] = 100 * floor_ms / row["tpot_ms"]
                        row.update(kv_floor(read, kv_read_bytes(cfg, b, args.prompt, args.new, dtype.itemsize),
                                            env["copy_bw_Bps"], row["tpot_ms"]))
                        log(f"{name} HF generate b={b:<3} decode {row['decode_tok_s']:9.1f} tok/s  tpot "
                            f"{row['tpot_ms']:7.3f} ms  ttft {row['ttft_ms']:8.2f} ms")
                    except torch.cuda.OutOfMemoryError as e:
                        row["status"] = f"out of memory: {str(e).splitlines()[0][:120]}"
                    _free(device)
                    rows.append(row)
                del hm
            del model
            _free(device)
    return rows


# ---- tensor-parallel mode ------------------------------------------------------------------------------
def _agree(tp, ok: bool) -> bool:
    """True on every rank of ``tp`` iff ``ok`` on every rank (a collective)."""
    t = torch.tensor([1 if ok else 0], device=tp.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=tp.group)
    return bool(t.item())


def allreduce_ms_per_step(tp, batch, cfg, dtype) -> tuple[float, str]:
    """Time of one decode step's all-reduces alone: ``2 x num_layers`` of a ``[batch, 1, hidden]`` activation,
    captured in a CUDA graph (as the engine runs them) on CUDA, timed eagerly on CPU.  Every rank calls it, and
    every rank replays the graph as often: the warm-up's count is agreed over the group (:func:`_largest_over`;
    until session 88 each rank warmed up until its own clock passed 0.2 s, and the ranks' all-reduces fell out of
    step: a hang, or all-reduces matched with the all-gather that follows)."""
    if tp.world_size == 1:  # nothing to reduce (NCCL captures an empty graph): no communication time
        return 0.0, "none (world size 1)"
    n = 2 * cfg.num_layers
    x = torch.zeros(batch, 1, cfg.hidden_size, dtype=dtype, device=tp.device)
    if tp.device.type == "cuda":
        torch.cuda.synchronize(tp.device)
        return (1e3 * T.time_calls([lambda: tp.all_reduce_(x)] * n, replays=20, agree=_largest_over(tp)) * n,
                "cuda graph")
    for _ in range(2):
        tp.all_reduce_(x)
    reps = 5
    t0 = time.perf_counter()
    for _ in range(reps * n):
        tp.all_reduce_(x)
    return 1e3 * (time.perf_counter() - t0) / reps, "eager"


def _largest_over(tp):
    """``agree`` of :func:`_timing.time_calls` for the ranks of ``tp``: the largest of the ranks' counts (a
    collective: a small all-gather that every rank makes)."""
    return lambda n: max(tp.all_gather_object(int(n)))


def run_tp_sweep(args, world, dtype, log) -> list[dict]:
    """Every (model, sparsity) sharded over each K in ``args.tp`` (the first K ranks), measured on every batch."""
    # every rank creates every group, in the same order (torch.distributed requires it)
    groups = {k: (None if k == world.world_size else dist.new_group(list(range(k)), timeout=world.timeout))
              for k in args.tp}
    device = world.device
    rows = []
    for k in args.tp:
        tp = TensorParallel(groups[k], device, world.timeout) if world.rank < k else None
        for name in args.models:
            cfg = _config(name)
            try:
                check_divisible(cfg, k)
            except ValueError as e:
                log(f"{name} on {k} GPUs: {e}")
                rows += [{"model": name, "impl": "flash-llm-tp", "tp": k, "gpus": k, "sparsity": sp, "batch": b,
                          "status": f"cannot split: {e}"} for sp in args.sparsities for b in args.batches]
                continue
            for sp in args.sparsities:
                if k not in (args.tp_dense if sp == 0 else args.tp_sparse):
                    continue  # not asked for (--tp-dense / --tp-sparse)
                base = {"model": name, "impl": "flash-llm-tp", "tp": k, "gpus": k, "sparsity": sp,
                        "dtype": args.dtype, "prompt": args.prompt, "new_tokens": args.new,
                        "format": args.format if sp else "dense"}
                if tp is not None:
                    rows += _tp_point(args, tp, cfg, name, sp, dtype, base, log)
                world.barrier()  # ranks outside this K wait here
    return rows


def _tp_point(args, tp, cfg, name, sp, dtype, base, log) -> list[dict]:
    """One (model, sparsity) on the ranks of ``tp``: build this rank's part, measure every batch."""
    device = tp.device
    _free(device)
    limit = None
    if args.memory_limit_gb and device.type == "cuda":
        limit = int(args.memory_limit_gb * 1e9) - torch.cuda.memory_reserved(device)
    model, why = None, ""
    t0 = time.perf_counter()
    try:
        model, report = build_synthetic(cfg, sp / 100 or None, dtype=dtype, device=device, seed=1, tp=tp,
                                        progress=not args.no_progress and tp.rank == 0, memory_limit=limit,
                                        fmt=args.format)
    except (DoesNotFit, torch.cuda.OutOfMemoryError) as e:
        why = str(e).splitlines()[0]
    build_s = time.perf_counter() - t0
    if not _agree(tp, model is not None):  # one rank failing means no point for anyone
        whys = [w for w in tp.all_gather_object(why) if w]
        log(f"{name} sparsity {sp} on {tp.world_size} GPUs: {whys[0]}")
        return [{**base, "batch": b, "status": f"does not fit: {whys[0]}"} for b in args.batches]
    if tp.rank == 0:
        log(str(report))
    shard = ShardReport.of(model)
    rows = []
    for b in args.batches:
        row = {**base, "batch": b, "achieved_sparsity": report.achieved_sparsity}
        gen = torch.Generator().manual_seed(b)  # the same prompts on every rank
        try:
            m = measure_engine(model, b, args.prompt, args.new, args.repeats, gen, args.fuse, args.merge,
                               args.delta_layout, args.max_batch, formats=args.engine_formats, max_seq=args.max_seq,
                               progress=not args.no_progress and tp.rank == 0)
            ok = True
        except torch.cuda.OutOfMemoryError as e:
            m, ok = {"error": str(e).splitlines()[0][:120]}, False
        if not _agree(tp, ok):
            errs = [x.get("error") for x in tp.all_gather_object(m) if x.get("error")]
            row["status"] = f"out of memory: {errs[0] if errs else 'on another rank'}"
            rows.append(row)
            _free(device)
            continue
        ar_ms, ar_how = allreduce_ms_per_step(tp, b, cfg, dtype)
        mine = {"rank": tp.rank, "weight_bytes": shard.total_bytes, "projection_bytes": shard.projection_bytes,
                "nnz": shard.nnz, "peak_mem_bytes": m["peak_mem_bytes"], "cache_bytes": m["cache_bytes"],
                "tpot_ms": m["tpot_ms"], "ttft_ms": m["ttft_ms"], "build_s": build_s}
        per_rank = tp.all_gather_object(mine)
        nnz = [p["nnz"] for p in per_rank]
        row.update({
            "status": "ok",
            "tok_s": m["tok_per_gpu_s"],  # measure_engine's figure is for the whole run, here K GPUs
            "tok_per_gpu_s": m["tok_per_gpu_s"] / tp.world_size,
            "decode_tok_s": m["decode_tok_s"],
            "decode_tok_per_gpu_s": m["decode_tok_s"] / tp.world_size,
            "tpot_ms": max(p["tpot_ms"] for p in per_rank),
            "ttft_ms": max(p["ttft_ms"] for p in per_rank),
            "allreduce_ms_per_step": ar_ms,
            "allreduce_timing": ar_how,
            "allreduce_share": ar_ms / max(p["tpot_ms"] for p in per_rank),
            "weight_bytes_max": max(p["weight_bytes"] for p in per_rank),
            "peak_mem_bytes_max": max(p["peak_mem_bytes"] for p in per_rank),
            "nnz_max_over_mean": max(nnz) / (sum(nnz) / len(nnz)) if sum(nnz) else 1.0,
            "per_rank": per_rank,
        })
        log(f"{name} {sp:>3}% on {tp.world_size} GPU(s) b={b:<3} {row['tok_per_gpu_s']:9.1f} tok/GPU-s  decode "
            f"{row['decode_tok_s']:9.1f} tok/s  tpot {row['tpot_ms']:7.3f} ms  all-reduce {ar_ms:6.3f} ms/step "
            f"({100 * row['allreduce_share']:.0f} %)  weights/rank {_size(row['weight_bytes_max'])}  "
            f"peak/rank {_size(row['peak_mem_bytes_max'])}")
        rows.append(row)
        _free(device)
    del model
    _free(device)
    return rows


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def summarize_tp(rows, env) -> str:
    buf = io.StringIO()
    p = lambda s="": print(s, file=buf)  # noqa: E731
    p(f"**{env['card']}** x {env['world_size']}, torch {env['torch']}, CUDA {env['cuda']}, NCCL {env['nccl']}, "
      f"Python {env['python']}, commit `{env['commit']}`, {env['date']}. Tensor parallel over "
      f"torch.distributed ({env['backend']}); NCCL_NVLS_ENABLE={env['nccl_nvls_enable']}.")
    p()
    p(f"Command: `{env['command']}`")
    lab = lambda sp: "dense" if sp == 0 else f"{sp} %"  # noqa: E731
    for model in dict.fromkeys(r["model"] for r in rows):
        mrows = [r for r in rows if r["model"] == model]
        batches = sorted({r["batch"] for r in mrows})
        get = {(r["sparsity"], r["tp"], r["batch"]): r for r in mrows}
        configs = sorted({(r["sparsity"], r["tp"]) for r in mrows}, key=lambda c: (c[0], -c[1]))
        p()
        p(f"### {model}: tokens per GPU-second (end to end, prefill included)")
        p()
        p("| sparsity | GPUs | " + " | ".join(f"batch {b}" for b in batches) + " |")
        p("|---|---|" + "---|" * len(batches))
        for sp, k in configs:
            cells = []
            for b in batches:
                r = get.get((sp, k, b))
                ok = r and r.get("status") == "ok"
                cells.append(f"{r['tok_per_gpu_s']:.1f}" if ok else "-" if not r else r["status"].split(":")[0])
            p(f"| {lab(sp)} | {k} | " + " | ".join(cells) + " |")
        p()
        p(f"{model}: per rank at the largest batch that ran (max over ranks)")
        p()
        p("| sparsity | GPUs | batch | weights / rank | nonzeros max / mean | peak GPU mem / rank | TPOT ms | TTFT ms "
          "| all-reduce ms / step | all-reduce share |")
        p("|---|---|---|---|---|---|---|---|---|---|")
        for sp, k in configs:
            done = [get.get((sp, k, b)) for b in batches]
            done = [r for r in done if r and r.get("status") == "ok"]
            if not done:
                continue
            r = done[-1]
            p(f"| {lab(sp)} | {k} | {r['batch']} | {_size(r['weight_bytes_max'])} | "
              f"{r['nnz_max_over_mean']:.4f} | {_size(r['peak_mem_bytes_max'])} | {r['tpot_ms']:.3f} | "
              f"{r['ttft_ms']:.1f} | {r['allreduce_ms_per_step']:.3f} | {100 * r['allreduce_share']:.1f} % |")
        lines = []
        dense_k = [k for sp, k in configs if sp == 0]
        for sp, k in configs:
            for kd in dense_k:
                if sp == 0 or k >= kd:
                    continue
                for b in batches:
                    rs, rd = get.get((sp, k, b)), get.get((0, kd, b))
                    if rs and rd and rs.get("status") == rd.get("status") == "ok":
                        lines.append(f"{model} batch {b}: {sp} % sparse on {k} GPU(s) {rs['tok_per_gpu_s']:.1f} vs "
                                     f"dense on {kd} GPU(s) {rd['tok_per_gpu_s']:.1f} tokens per GPU-second "
                                     f"({rs['tok_per_gpu_s'] / rd['tok_per_gpu_s']:.2f}x)")
        if lines:
            p()
            p("Sparse on fewer GPUs against dense on more:")
            p()
            for line in lines:
                p(f"- {line}")
    return buf.getvalue()


def plot_tp(rows, path) -> bool:
    def series(mrows):
        for sp, k in sorted({(r["sparsity"], r["tp"]) for r in mrows}):
            pts = sorted((r["batch"], r["tok_per_gpu_s"]) for r in mrows if (r["sparsity"], r["tp"]) == (sp, k))
            yield f"{'dense' if sp == 0 else f'{sp} % sparse'} on {k} GPU(s)", "-", pts

    return _plot_per_model(rows, path, "tokens per GPU-second", series)


def main_tp(args, argv) -> int:
    """``--tp``: the sweep on torchrun's ranks; rank 0 writes the results."""
    backend = "gloo" if args.device == "cpu" else "nccl"
    if backend == "nccl" and not torch.cuda.is_available():
        print("error: no CUDA device (use --device cpu with the tiny-* models for a smoke run)", file=sys.stderr)
        return 2
    world = init_tensor_parallel(backend, timeout=args.tp_timeout_min * 60)
    try:
        return _main_tp(args, argv, world)
    finally:
        world.close()


def _main_tp(args, argv, world) -> int:
    lead = world.rank == 0
    problems = []
    why = _no_kernels(world.device, args.sparsities)
    if why:
        problems.append(why)
    if max(args.tp) > world.world_size:
        problems.append(f"--tp {','.join(map(str, args.tp))} needs {max(args.tp)} processes, but this run has "
                        f"{world.world_size}; start it with torchrun --nproc-per-node {max(args.tp)}")
    if lead:
        os.makedirs(args.out, exist_ok=True)
        existing = [f for f in OUTPUTS if os.path.exists(os.path.join(args.out, f))]
        if existing and not args.overwrite:
            problems.append(f"{args.out} already holds {', '.join(existing)}; pass --overwrite or another --out")
    problems = [p for ps in world.all_gather_object(problems) for p in ps]
    if problems:
        if lead:
            print(f"error: {problems[0]}", file=sys.stderr)
        return 2
    device = world.device
    if args.memory_limit_gb and device.type == "cuda":
        _cap_memory(device, args.memory_limit_gb)
    env = T.environment(device)
    env.update({"world_size": world.world_size, "backend": world.backend, "tp": args.tp,
                "nccl": ".".join(map(str, torch.cuda.nccl.version())) if device.type == "cuda" else None,
                "nccl_nvls_enable": os.environ.get("NCCL_NVLS_ENABLE"), "memory_limit_gb": args.memory_limit_gb,
                "fuse": args.fuse, "merge": args.merge, "delta_layout": args.delta_layout,
                "engine_formats": args.engine_formats, "max_batch": args.max_batch, "max_seq": args.max_seq,
                "decode_attention": _common.DECODE_ATTENTION,
                "command": T.command(__file__, argv, f"torchrun --nproc-per-node {world.world_size}"
                                     if "LOCAL_RANK" in os.environ else "python")})
    if lead:
        print(json.dumps(env), flush=True)

    def log(msg):
        if lead:
            print(msg, flush=True)

    rows = run_tp_sweep(args, world, DTYPES[args.dtype], log)
    if not lead:
        return 0
    _write_outputs(args.out, env, rows, summarize_tp(rows, env), plot_tp,
                   [{k: v for k, v in r.items() if k != "per_rank"} for r in rows])
    return 0


def _write_outputs(out: str, env: dict, rows: list[dict], text: str, plot_fn, csv_rows: list[dict] | None = None):
    """``results.json`` (env and rows), ``results.csv`` (``csv_rows``, default ``rows``), ``summary.md`` and
    ``e2e.png`` (``plot_fn(rows, path)``) under ``out``, each written atomically; prints the summary."""
    _atomic_write(os.path.join(out, "results.json"), json.dumps({"env": env, "rows": rows}, indent=1).encode())
    csv_rows = rows if csv_rows is None else csv_rows
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in csv_rows for k in r)))
    w.writeheader()
    w.writerows(csv_rows)
    _atomic_write(os.path.join(out, "results.csv"), buf.getvalue().encode())
    _atomic_write(os.path.join(out, "summary.md"), text.encode())
    plotted = plot_fn(rows, os.path.join(out, "e2e.png"))
    print()
    print(text)
    print(f"wrote {', '.join(f for f in OUTPUTS if plotted or f != 'e2e.png')} to {out}")


# ---- reporting -------------------------------------------------------------------------------------------
def _fmt(v, spec):
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def target_checks(rows) -> list[str]:
    """The issue's targets, each PASS / FAIL / PARTIAL / n/a with the numbers behind it, or NOT RUN with the reason
    (the rows' status: out of memory, does not fit) where the points a target needs were in the run but failed."""
    ok = {(r["model"], r["impl"], r["sparsity"], r["batch"]): r for r in rows if r.get("status") == "ok"}
    status = {(r["model"], r["sparsity"], r["batch"]): r.get("status") for r in rows if r["impl"] == "flash-llm"}
    every_batch = sorted({b for *_, b in status})

    def failed(model, sps, want) -> str:
        """Why flash-llm's ``model`` at the sparsities ``sps`` (0: "dense: " before it) did not run at the batches
        ``want``: the statuses other than ok ("" where none failed, or none was in the run)."""
        whys = (("dense: " if sp == 0 else "") + w for sp in sps for b in want
                if (w := status.get((model, sp, b))) not in (None, "ok"))
        return "; ".join(dict.fromkeys(whys))

    out = []
    for model in sorted({r["model"] for r in rows}):
        for sp, target in SPEEDUP_TARGETS.items():
            pct = round(100 * sp)
            got = {b: ok[key]["speedup_vs_dense"] for b in (1, 8, 16)
                   if (key := (model, "flash-llm", pct, b)) in ok and "speedup_vs_dense" in ok[key]}
            if got:  # (a batch not run, or without its dense run, cannot pass: PARTIAL names it)
                missing = [b for b in (1, 8, 16) if b not in got]
                why = failed(model, (pct, 0), missing)
                verdict = "FAIL" if min(got.values()) < target else "PARTIAL" if missing else "PASS"
                out.append(f"{verdict} {model} {pct} %: decode speedup over dense at batch 1-16 "
                           f"{', '.join(f'batch {b} {g:.2f}x' for b, g in got.items())} (target >= {target}x)"
                           + (f"; no speedup at batch {', '.join(map(str, missing))}" if missing else "")
                           + (f" ({why})" if why else ""))
            elif why := failed(model, (pct, 0), (1, 8, 16)):
                out.append(f"NOT RUN {model} {pct} %: decode speedup over dense at batch 1-16: {why} "
                           f"(target >= {target}x)")
        for sp in sorted({r["sparsity"] for r in rows if r["model"] == model and r["sparsity"]}):
            r = ok.get((model, "flash-llm", sp, 64))
            if r and "speedup_vs_dense" in r:
                verdict = "PASS" if r["speedup_vs_dense"] >= 1.0 else "FAIL"
                out.append(f"{verdict} {model} {sp} % batch 64: {r['speedup_vs_dense']:.2f}x dense (target >= 1x)")
            elif r:
                why = failed(model, (0,), (64,))
                out.append(f"n/a {model} {sp} % batch 64: {r['decode_tok_s']:.1f} tokens/s, no dense run at batch 64 "
                           f"to compare with{f' ({why})' if why else ''} (target >= 1x)")
            elif why := failed(model, (sp,), (64,)):
                out.append(f"NOT RUN {model} {sp} % batch 64: {why} (target >= 1x)")
        for sp in sorted({r["sparsity"] for r in rows if r["model"] == model}):
            r = ok.get((model, "flash-llm", sp, 1))
            if r:
                verdict = "PASS" if r["floor_pct"] >= 80 else "FAIL"
                median = (f"; the median step {r['tpot_ms']:.3f} ms: {r['floor_pct_median']:.0f} %"
                          if "floor_pct_median" in r else "")
                step = f"the mean step {r['tpot_mean_ms']:.3f} ms" if "tpot_mean_ms" in r else f"{r['tpot_ms']:.3f} ms"
                out.append(f"{verdict} {model} {sp} % batch 1: {r['floor_pct']:.0f} % of the bandwidth floor "
                           f"({r['floor_ms']:.3f} ms floor, {step} per token{median}; target >= 80 %)")
            elif why := failed(model, (sp,), (1,)):
                out.append(f"NOT RUN {model} {sp} % batch 1: {why} (target >= 80 % of the bandwidth floor)")
            r = next((v for k, v in sorted(ok.items()) if k[:3] == (model, "flash-llm", sp)), None)
            if r and sp:
                verdict = "PASS" if abs(r["formula_ratio"] - 1) <= 0.03 else "FAIL"
                out.append(f"{verdict} {model} {sp} %: projection bytes / format formula = {r['formula_ratio']:.4f} "
                           "(target within 3 %)")
            elif sp and (why := failed(model, (sp,), every_batch)):
                out.append(f"NOT RUN {model} {sp} %: projection bytes / format formula: {why} (target within 3 %)")
    return out


def summarize(rows, env) -> str:
    buf = io.StringIO()
    p = lambda s="": print(s, file=buf)  # noqa: E731
    p(f"**{env['card']}**, torch {env['torch']}, CUDA {env['cuda']}, NVRTC {env['nvrtc']}, Python {env['python']}, "
      f"commit `{env['commit']}`, {env['date']}. Copy bandwidth {env['copy_bw_Bps'] / 1e9:.0f} GB/s"
      + (f"; GPU memory capped at {env['memory_limit_gb']} GB" if env.get("memory_limit_gb") else "")
      + ("; fused elementwise kernels (--fuse)" if env.get("fuse") else "")
      + ("; merged q/k/v and gate/up projections (--merge)" if env.get("merge") else "")
      + ("; DeltaRows weights kept as encoded (--delta-layout keep)" if env.get("delta_layout") == "keep" else "")
      + ("; the engine re-encodes BitmapTiles / Tiled-CSL layers for each batch (--engine-formats auto)"
         if env.get("engine_formats") == "auto" else "")
      + (f"; decode-attention kernel: FLASH_LLM_DECODE_ATTENTION={env['decode_attention']}"
         if env.get("decode_attention") not in (None, False, "0") else "") + ".")
    p()
    p(f"Command: `{env['command']}`")
    if env.get("settings"):
        p()
        p("Settings: " + " ".join(f"`{k}={v}`" for k, v in env["settings"].items()))
    for model in dict.fromkeys(r["model"] for r in rows):
        mrows = [r for r in rows if r["model"] == model]
        sps = sorted({r["sparsity"] for r in mrows})
        batches = sorted({r["batch"] for r in mrows})
        has_hf = any(r["impl"] == "hf-generate" and r.get("status") == "ok" for r in mrows)
        get = {(r["impl"], r["sparsity"], r["batch"]): r for r in mrows}
        p()
        p(f"### {model}: decode tokens/s (speedup over dense flash-llm)")
        p()
        head = ["batch"] + (["HF generate (dense)"] if has_hf else []) + [
            "dense" if s == 0 else f"{s} %" for s in sps]
        p("| " + " | ".join(head) + " |")
        p("|" + "---|" * len(head))
        for b in batches:
            cells = [str(b)]
            if has_hf:
                r = get.get(("hf-generate", 0, b))
                cells.append(_fmt(r.get("decode_tok_s"), ".0f") if r and r.get("status") == "ok" else "-")
            for s in sps:
                r = get.get(("flash-llm", s, b))
                if not r or r.get("status") != "ok":
                    fits = not (r and r["status"].startswith("does not fit"))
                    cells.append("-" if not r else "OOM" if fits else "does not fit")
                elif s == 0 or "speedup_vs_dense" not in r:
                    cells.append(_fmt(r["decode_tok_s"], ".0f"))
                else:
                    cells.append(f"{r['decode_tok_s']:.0f} ({r['speedup_vs_dense']:.2f}x)")
            p("| " + " | ".join(cells) + " |")
        p()
        p(f"{model}: memory and latency (batch {batches[0]}, the smallest run, unless noted)")
        p()
        p("| sparsity | weights | / formula | peak GPU mem (largest batch) | TTFT ms | TPOT ms (median step) "
          "| floor ms | % of floor (mean step) |")
        p("|---|---|---|---|---|---|---|---|")
        for s in sps:
            r1 = get.get(("flash-llm", s, batches[0]))
            big = [get.get(("flash-llm", s, b)) for b in batches]
            big = [r for r in big if r and r.get("status") == "ok"]
            if not r1 or r1.get("status") != "ok":
                p(f"| {'dense' if s == 0 else f'{s} %'} | {(r1 or {}).get('status', '-')[:60]} |  |  |  |  |  |  |")
                continue
            p(f"| {'dense' if s == 0 else f'{s} %'} | {r1['weight_bytes'] / 2**30:.2f} GiB | "
              f"{_fmt(r1['formula_ratio'], '.4f') if s else '-'} | "
              f"{big[-1]['peak_mem_bytes'] / 2**30:.1f} GiB (b={big[-1]['batch']}) | {r1['ttft_ms']:.1f} | "
              f"{r1['tpot_ms']:.3f} | {r1['floor_ms']:.3f} | {r1['floor_pct']:.0f} % |")
    checks = target_checks(rows)
    if checks:
        p()
        p("Targets:")
        p()
        for c in checks:
            p(f"- {c}")
    return buf.getvalue()


def plot(rows, path) -> bool:
    def series(mrows):
        for impl, sp in sorted({(r["impl"], r["sparsity"]) for r in mrows}, key=lambda s: (s[0] != "hf-generate", s[1])):
            pts = sorted((r["batch"], r["decode_tok_s"]) for r in mrows if r["impl"] == impl and r["sparsity"] == sp)
            label = "HF generate (dense)" if impl == "hf-generate" else ("dense" if sp == 0 else f"{sp} % sparse")
            yield label, "--" if impl == "hf-generate" else "-", pts

    return _plot_per_model(rows, path, "decode tokens/s", series)


def _plot_per_model(rows, path, ylabel: str, series) -> bool:
    """One log-log panel per model: ``series(ok rows of the model)`` yields (label, linestyle, [(batch, y)]).
    Writes a PNG atomically; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models):
        mrows = [r for r in rows if r["model"] == model and r.get("status") == "ok"]
        for label, linestyle, pts in series(mrows):
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=label, linestyle=linestyle)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch")
        ax.set_ylabel(ylabel)
        ax.set_title(model)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    _atomic_write(path, buf.getvalue())
    return True


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="a reduced sweep of a few GPU minutes: llama-3-8b, dense/70/80 %%, batches 1,16,64, "
                         "64 new tokens, 2 repeats (explicit options still apply)")
    ap.add_argument("--models", help=f"comma-separated, from {sorted(PRESETS)} or {sorted(TINY)} "
                                     "(default llama-3-8b,opt-30b)")
    ap.add_argument("--sparsities", help="percent, 0 = dense (default 0,50,70,80,90)")
    ap.add_argument("--batches", help="default 1,8,16,32,64")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens (default 128)")
    ap.add_argument("--new", type=int, help="new tokens per prompt (default 128)")
    ap.add_argument("--repeats", type=int, help="timed generations per point, median reported (default 3)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    ap.add_argument("--format", choices=["bitmap", "tiled-csl", "delta-rows"], default="bitmap",
                    help="compressed format of the sparse models (default bitmap)")
    ap.add_argument("--no-hf", dest="hf", action="store_false", help="skip the Hugging Face generate baseline")
    ap.add_argument("--fuse", action="store_true",
                    help="the engine's fused elementwise kernels (Engine(fuse=True): torch.compile'd RMSNorm, RoPE, "
                         "SiLU x up; Llama family)")
    ap.add_argument("--merge", action="store_true",
                    help="the engine's merged projections (Engine(merge=True): q/k/v and gate/up as one matmul each)")
    ap.add_argument("--delta-layout", default="auto", choices=("auto", "keep", "dual"),
                    help="Engine(delta_layout=): DeltaRows weights re-encoded for each batch (auto: the parts layout "
                         "at batch 1, at 2 where K <= 4096, the split layout at 3, Tiled-CSL from 4 where the memory "
                         "holds it), kept as encoded, or (dual) DeltaRows for steps of 1-2 tokens and Tiled-CSL copies "
                         "for the rest")
    ap.add_argument("--engine-formats", default="keep", choices=("keep", "auto"),
                    help="Engine(formats=): keep the --format weights as built (default), or let the engine re-encode "
                         "BitmapTiles / Tiled-CSL layers for each batch as it does by default (auto: DeltaRows up to "
                         "batch 3, Tiled-CSL from 4; the rows' ran_formats say what ran)")
    ap.add_argument("--prefill-dense", action="store_true",
                    help="Engine(prefill_dense=True) for the sparse models: dense copies of the sparse layers for the "
                         "prefill (time to first token as dense, for their memory; the rows' prefill_dense_bytes)")
    ap.add_argument("--max-batch", type=int,
                    help="every engine's max_batch, --tp too (default: each batch its own); at least the largest of "
                         "--batches (one engine serving smaller batches, as a server does)")
    ap.add_argument("--max-seq", type=int,
                    help="every engine's cache in tokens (default: --prompt + --new), e.g. 2048 to time an engine sized "
                         "for longer requests than it serves (FLASH_LLM_DECODE_KV_BUCKETS=0: its steps attend it all); "
                         "it, or --prompt + --new, at most each model's max_position_embeddings")
    ap.add_argument("--memory-limit-gb", type=float,
                    help="cap this process' GPU memory, in 10^9 bytes (85.5: an 80 GB H100's 79.6 GiB)")
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu (smoke runs with tiny-* models)")
    ap.add_argument("--out", default="benchmarks/out/e2e")
    ap.add_argument("--overwrite", action="store_true", help="replace existing result files in --out")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    ap.add_argument("--tp", help="tensor-parallel mode, under torchrun: comma-separated world sizes to shard over "
                                 "(each run on the first K ranks), e.g. 4,2; the Hugging Face baseline is skipped")
    ap.add_argument("--tp-dense", help="world sizes (among --tp) for the dense model (default: all of --tp)")
    ap.add_argument("--tp-sparse", help="world sizes (among --tp) for the sparse models (default: all of --tp), "
                                        "e.g. --tp 4,2,1 --tp-dense 4 --tp-sparse 2,1")
    ap.add_argument("--tp-timeout-min", type=float, default=30.0,
                    help="timeout of the process group's collectives, minutes (default 30: ranks outside a "
                         "smaller --tp size wait while it builds and runs)")
    args = ap.parse_args(argv)
    if args.tp is not None and args.prefill_dense:
        ap.error("--prefill-dense is for a model on one GPU, not with --tp")
    if args.tp is not None:
        try:
            args.tp = [int(v) for v in args.tp.split(",")]
        except ValueError as e:
            ap.error(f"--tp takes comma-separated integers: {e}")
        if any(k < 1 for k in args.tp):
            ap.error(f"--tp sizes must be >= 1, got {args.tp}")
        args.tp = sorted(set(args.tp), reverse=True)
        args.hf = False
        for opt in ("tp_dense", "tp_sparse"):
            flag = "--" + opt.replace("_", "-")
            raw = getattr(args, opt)
            try:
                sizes = args.tp if raw is None else sorted({int(v) for v in raw.split(",")}, reverse=True)
            except ValueError as e:
                ap.error(f"{flag} takes comma-separated integers: {e}")
            if not set(sizes) <= set(args.tp):
                ap.error(f"{flag} {raw} names world sizes that are not in --tp {','.join(map(str, args.tp))}")
            setattr(args, opt, sizes)
    elif args.tp_dense is not None or args.tp_sparse is not None:
        ap.error("--tp-dense and --tp-sparse need --tp")
    quick = {"models": "llama-3-8b", "sparsities": "0,70,80", "batches": "1,16,64", "new": 64, "repeats": 2}
    full = {"models": "llama-3-8b,opt-30b", "sparsities": "0,50,70,80,90", "batches": "1,8,16,32,64", "new": 128,
            "repeats": 3}
    for k, v in (quick if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    raw_models = args.models
    try:  # (duplicates dropped, the order kept: each point is built and timed once)
        args.models = list(dict.fromkeys(m.strip() for m in args.models.split(",") if m.strip()))
        args.sparsities = [int(v) for v in args.sparsities.split(",")]
        args.batches = list(dict.fromkeys(int(v) for v in args.batches.split(",")))
    except ValueError as e:
        ap.error(f"--sparsities and --batches take comma-separated integers: {e}")
    if not args.models:  # (it ran nothing and wrote empty results, over a real run's with --overwrite)
        ap.error(f"--models names no model, got {raw_models!r}; known: {sorted(PRESETS) + sorted(TINY)}")
    for m in args.models:
        if m not in PRESETS and m not in TINY:
            ap.error(f"unknown model {m!r}; known: {sorted(PRESETS) + sorted(TINY)}")
    if any(not 0 <= s < 100 for s in args.sparsities):
        ap.error(f"--sparsities are percentages in [0, 100), got {args.sparsities}")
    if 0 not in args.sparsities:
        args.sparsities = [0] + args.sparsities  # speedups need the dense run
        print("note: adding sparsity 0 (dense): speedups are measured against it", file=sys.stderr)
    args.sparsities = sorted(set(args.sparsities))
    if any(b < 1 for b in args.batches) or args.prompt < 1 or args.new < 2 or args.repeats < 1:
        ap.error("--batches and --prompt must be >= 1, --new >= 2, --repeats >= 1")
    if args.max_seq is not None and args.max_seq < args.prompt + args.new:
        ap.error(f"--max-seq {args.max_seq} is below --prompt + --new ({args.prompt + args.new})")
    if args.max_batch is not None and args.max_batch < max(args.batches):
        ap.error(f"--max-batch {args.max_batch} is below the largest of --batches ({max(args.batches)})")
    # (refused here: Engine() refused it only when the sweep reached the model, the earlier models' results lost)
    seq, what = (args.max_seq, "--max-seq") if args.max_seq else (args.prompt + args.new, "--prompt + --new")
    short = [f"{m} ({n})" for m in args.models if (n := _config(m).max_position_embeddings) < seq]
    if short:
        ap.error(f"{what} ({seq}) exceeds the max_position_embeddings of {', '.join(short)}; lower it, or leave "
                 "those models out of --models")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.tp is not None:
        return main_tp(args, argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device (use --device cpu with the tiny-* models for a smoke run)", file=sys.stderr)
        return 2
    why = _no_kernels(device, args.sparsities)
    if why:
        print(f"error: {why}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    existing = [f for f in OUTPUTS if os.path.exists(os.path.join(args.out, f))]
    if existing and not args.overwrite:
        print(f"error: {args.out} already holds {', '.join(existing)}; pass --overwrite or another --out",
              file=sys.stderr)
        return 2
    # --device cuda:N: GPU N current for the whole run (the engine's CUDA events, graphs and streams, the copy
    # bandwidth: torch puts them on the current device; until session 88 GPU 0 with --device cuda:1)
    with _on_device(device):
        return _run(args, argv, device)


def _run(args, argv, device) -> int:
    """:func:`main`'s single-process sweep, its arguments checked (``device`` current where it is a GPU)."""
    if args.memory_limit_gb and device.type == "cuda":
        _cap_memory(device, args.memory_limit_gb)
    env = T.environment(device)
    env["copy_bw_Bps"] = copy_bandwidth(device)
    env["memory_limit_gb"] = args.memory_limit_gb
    env["fuse"] = args.fuse
    env["merge"] = args.merge
    env["delta_layout"] = args.delta_layout
    env["engine_formats"] = args.engine_formats
    env["max_batch"] = args.max_batch
    env["max_seq"] = args.max_seq
    env["decode_kv_buckets"] = engine_mod.DECODE_KV_BUCKETS
    env["decode_attention"] = _common.DECODE_ATTENTION  # FLASH_LLM_DECODE_ATTENTION
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        env["transformers"] = None
    env["command"] = T.command(__file__, argv)
    print(json.dumps(env), flush=True)

    def log(msg):
        print(msg, flush=True)

    rows = run_sweep(args, device, DTYPES[args.dtype], env, log)
    _write_outputs(args.out, env, rows, summarize(rows, env), plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())

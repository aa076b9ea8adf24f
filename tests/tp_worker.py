"""One rank of the 2-rank run of tests/test_parallel.py, started there with
``python -m torch.distributed.run --nproc-per-node 2 tests/tp_worker.py FOLDER BENCH_OUT DEVICE``.

DEVICE ``cpu`` runs on gloo (CI), ``cuda`` on NCCL with one GPU per rank.  FOLDER holds the checkpoints the test
wrote (``{family}-dense``: transformers' ``save_pretrained`` in fp32, ``{family}-pruned``: magnitude-pruned fp16).
Every rank runs the same scenarios and saves what it computed to ``FOLDER/rank{R}.pt`` (tensors on the CPU,
strings); the test compares them with the single-process model.  Nothing is asserted here: a failure raises,
torchrun exits non-zero, and the test shows the ranks' output.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch
from safetensors.torch import load_file

import flash_llm
from flash_llm.engine import Engine
from flash_llm.models import from_config, preset
from flash_llm.models.synthetic import build_synthetic
from flash_llm.parallel import ShardReport, init_tensor_parallel, load_tensor_parallel, tensor_parallel_

PROMPTS = [[5, 6, 7, 8, 9], [1, 2, 3], [10, 11, 12, 13, 14, 15, 16]]
NEW = 8
SYNTH = preset("llama-3-8b").replace(num_layers=2, hidden_size=128, intermediate_size=256, num_heads=4,
                                     num_kv_heads=2, vocab_size=300, max_position_embeddings=64, name="tiny-synth")


def padded(prompts):
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def full_model(folder, dtype, device="cpu"):
    """The whole model in this process (the in-memory route), loaded as the test loads its reference."""
    from flash_llm.models import ModelConfig

    cfg = ModelConfig.from_hf(os.path.join(folder, "config.json"))
    model = from_config(cfg, dtype=dtype, device="meta")
    state = {k: v.to(device, dtype) for k, v in load_file(os.path.join(folder, "model.safetensors")).items()}
    model.load_state_dict(state, assign=True)
    return model.eval()


def run_model(out, key, model, device):
    ids, mask = padded(PROMPTS)
    with torch.no_grad():
        out[f"{key}/logits"] = model(ids.to(device), attention_mask=mask.to(device)).float().cpu()
    eng = Engine(model, max_batch=3, max_seq=32)
    g = eng.generate(PROMPTS, NEW, output_logits=True, eos_token_id=None)
    out[f"{key}/tokens"], out[f"{key}/step_logits"] = g.tokens, g.logits


def prefill_graphs(out, model, tp, step) -> None:
    """Prefill graphs on a tensor-parallel engine (engine.PREFILL_GRAPHS_TP): rank 1 alone finds no room for the 3 x 7
    shape, so no rank captures it; the 2 x 5 shape is captured by both and replayed.  On CUDA the graphs are real (the
    all-reduces captured); on gloo a capture is a stand-in whose replay runs the eager prefill."""
    import flash_llm.engine as E

    step("prefill graphs")
    E.PREFILL_GRAPHS_TP = True
    try:
        eng = Engine(model, max_batch=3, max_seq=32)
    finally:
        E.PREFILL_GRAPHS_TP = False
    cuda = tp.device.type == "cuda"
    if not cuda:
        eng._prefills = {}

        class Replay:
            def __init__(self, fn):
                self.fn = fn

            def replay(self):
                self.fn()

            def reset(self):  # (TensorParallel.close resets the graphs the engine tracked)
                self.fn = None

        eng._capture_prefill = lambda ids, mask: E._PrefillGraph(Replay(lambda: eng._prefill(ids, mask)), ids, mask)
    fits = eng._prefill_graph_fits
    eng._prefill_graph_fits = lambda b, p: (tp.rank == 0 or (b, p) != (3, 7)) and (not cuda or fits(b, p))
    runs = [(PROMPTS, "a"), (PROMPTS[:2], "b"), (PROMPTS[:2], "c"), (PROMPTS, "d")]
    for prompts, key in runs:
        out[f"prefill_graphs/{key}"] = eng.generate(prompts, NEW, eos_token_id=None).tokens
    out["prefill_graphs/keys"] = sorted(eng._prefills)
    out["prefill_graphs/replays"] = [g.replays for g in eng._prefills.values()]
    # the weights moved on rank 1 alone (a new storage for one norm weight): with graphs, both ranks drop theirs
    if cuda:
        cleared = []
        clear = eng.clear_graphs
        eng.clear_graphs = lambda: cleared.append(1) or clear()
        if tp.rank == 1:
            w = model.model.norm.weight
            model.model.norm.weight = torch.nn.Parameter(w.detach().clone(), requires_grad=False)
        eng.generate(PROMPTS[:2], 2, eos_token_id=None)
        out["prefill_graphs/cleared"] = len(cleared)


def main(folder: str, bench_out: str, device: str) -> None:
    # FLASH_LLM_TP_WORKER_DUMP_S=S: after S seconds, print every thread's stack and exit (to see where a run hangs)
    if os.environ.get("FLASH_LLM_TP_WORKER_DUMP_S"):
        import faulthandler

        faulthandler.dump_traceback_later(float(os.environ["FLASH_LLM_TP_WORKER_DUMP_S"]), exit=True)
    tp = init_tensor_parallel("nccl" if device == "cuda" else "gloo", timeout=120)

    def step(what):  # where each rank is, on stderr (the test shows it when the run fails)
        print(f"[rank {tp.rank}] {what}", file=sys.stderr, flush=True)

    dev = tp.device
    out: dict = {"rank": tp.rank, "world_size": tp.world_size, "backend": tp.backend, "device": str(dev)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # lm_head kept dense by sparsify_: expected
        for family in ("opt", "llama"):
            dense_dir = os.path.join(folder, f"{family}-dense")
            pruned_dir = os.path.join(folder, f"{family}-pruned")
            # dense, read from the checkpoint (each rank its slices only)
            step(f"{family}: dense from the checkpoint")
            model, rep = load_tensor_parallel(dense_dir, tp, dtype=torch.float32, progress=False)
            run_model(out, f"{family}/dense", model, dev)
            out[f"{family}/dense/kv_heads"] = Engine(model, max_batch=1, max_seq=8).cache.k[0].shape[1]
            step(f"{family}: sampling, then mismatched prompts")
            eng = Engine(model, max_batch=3, max_seq=32)
            s = eng.generate(PROMPTS, NEW, temperature=1.0, top_p=0.9, eos_token_id=None,
                             generator=torch.Generator(dev).manual_seed(100 + tp.rank))  # different seeds per rank
            out[f"{family}/dense/sampled"] = s.tokens
            try:  # ranks given different prompts: refused on every rank, no hang
                eng.generate([PROMPTS[tp.rank]], 2)
            except ValueError as e:
                out[f"{family}/mismatch_error"] = str(e)
            try:  # the same shapes and sums (session 71: the old fingerprint's sums took these for the same)
                eng.generate([[1, 2]] if tp.rank == 0 else [[3, 1]], 2)
            except ValueError as e:
                out[f"{family}/mismatch_error_same_sums"] = str(e)
            out[f"{family}/after_error"] = eng.generate(PROMPTS, 2).tokens  # still works
            # dense, sharded in memory
            step(f"{family}: dense sharded in memory")
            model = full_model(dense_dir, torch.float32, dev)
            tensor_parallel_(model, tp)
            run_model(out, f"{family}/dense-mem", model, dev)
            # pruned fp16, each rank compressing its slices while reading them
            step(f"{family}: pruned, compressed while loading")
            model, rep = load_tensor_parallel(pruned_dir, tp, dtype=torch.float16,
                                              sparsify=flash_llm.SparsifyConfig(), progress=False)
            run_model(out, f"{family}/sparse", model, dev)
            out[f"{family}/sparse/sizes"] = (rep.nnz, rep.projection_bytes)
            reports = tp.all_gather_object(rep)
            out[f"{family}/sparse/report"] = [[(s.fqn, s.kind, s.shape, s.local_shape, s.start, s.stop, s.format,
                                                s.nnz, s.nbytes) for s in r.layers] for r in reports]
            out[f"{family}/sparse/table"] = ShardReport.table(reports)
            # pruned fp16, sparsified whole (single-process SparseLinear layers), then sharded from them
            step(f"{family}: pruned, sparsified then sharded")
            model = full_model(pruned_dir, torch.float16, dev)
            flash_llm.sparsify_(model)
            tensor_parallel_(model, tp)
            run_model(out, f"{family}/sparse-mem", model, dev)
            # the same pruned model as a flash-llm checkpoint and as a sparse-bitmask one (written by the test):
            # every rank expands, slices and compresses each projection again
            for route in ("flash", "bitmask"):
                step(f"{family}: {route} checkpoint")
                model, rep = load_tensor_parallel(os.path.join(folder, f"{family}-{route}"), tp, dtype=torch.float16,
                                                  progress=False)
                run_model(out, f"{family}/{route}", model, dev)
                out[f"{family}/{route}/sizes"] = (rep.nnz, rep.projection_bytes)
    # a synthetic model built per rank (only this rank's slices kept)
    step("synthetic")
    model, srep = build_synthetic(SYNTH, 0.8, device=dev, tp=tp, seed=3, progress=False)
    ids, mask = padded(PROMPTS)
    with torch.no_grad():
        out["synth/logits"] = model(ids.to(dev), attention_mask=mask.to(dev)).float().cpu()
    out["synth/layers"] = srep.layers
    out["synth/tokens"] = Engine(model, max_batch=3, max_seq=32).generate(PROMPTS, NEW, eos_token_id=None).tokens
    # rows stopping at different steps (the batch shrinks as they stop: engine.COMPACT_ROWS), generated and streamed
    step("synthetic: EOS")
    eng = Engine(model, max_batch=3, max_seq=32)
    free = eng.generate(PROMPTS, 16, eos_token_id=None).tokens
    eos = sorted({int(free[r, a]) for r, a in enumerate((1, 9, 4))})
    g = eng.generate(PROMPTS, 16, eos_token_id=eos)
    out["synth/eos"] = (eos, free, g.tokens, g.lengths, torch.stack(list(eng.stream(PROMPTS, 16, eos_token_id=eos)), 1))
    prefill_graphs(out, model, tp, step)
    # a world size that does not divide the heads: the same clear error on every rank, before any collective
    bad = preset("llama-3-8b").replace(num_layers=1, hidden_size=48, intermediate_size=64, num_heads=3,
                                       num_kv_heads=3, vocab_size=50, name="three-heads")
    try:
        tensor_parallel_(from_config(bad, dtype=torch.float32, device=dev), tp)
    except ValueError as e:
        out["divisible_error"] = str(e)
    try:
        build_synthetic(bad, 0.5, device=dev, tp=tp, progress=False)
    except ValueError as e:
        out["divisible_error_synthetic"] = str(e)
    step("divisibility errors done")
    tp.barrier()
    step("bench_e2e --tp")
    # the benchmark's tensor-parallel mode, as a smoke run on the same group
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
    import bench_e2e

    # --tp 2,1 with both filters on 2: the world size 1 points are skipped (only 2 rows come back)
    out["bench_rc"] = bench_e2e.main(["--tp", "2,1", "--tp-dense", "2", "--tp-sparse", "2", "--device", device, "--models", "tiny-llama", "--sparsities",
                                      "80", "--batches", "2", "--prompt", "4", "--new", "3", "--repeats", "1",
                                      "--no-progress", "--out", bench_out])
    step("closing")
    # engines with CUDA graphs of NCCL all-reduces are still alive here: close() must reset them (it hung before)
    path = os.path.join(folder, f"rank{tp.rank}.pt")
    torch.save(out, path + ".tmp")
    os.replace(path + ".tmp", path)
    tp.close()
    step("closed")


if __name__ == "__main__":
    main(*sys.argv[1:4])

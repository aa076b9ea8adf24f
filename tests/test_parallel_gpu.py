"""flash_llm.parallel on one CUDA GPU with world size 1 (NCCL): the tensor-parallel code path (an NCCL all-reduce
after every row-parallel projection, captured in the engine's CUDA graphs, tokens broadcast from rank 0) against
the single-process model, dense and sparse; checkpoint slices loaded onto the GPU; a synthetic model built for
the rank; the benchmark's --tp mode.  The 2-GPU run is tests/test_parallel.py's "cuda" case.  Skipped cleanly
without CUDA."""

from __future__ import annotations

import copy
import json
import os
import warnings

import pytest
import torch
from conftest import load_script

import flash_llm
from flash_llm.engine import Engine
from flash_llm.models import from_config, preset
from flash_llm.models.synthetic import build_synthetic
from flash_llm.parallel import ShardReport, init_tensor_parallel, load_tensor_parallel, tensor_parallel_
from flash_llm.prune import magnitude_prune_

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
pytestmark = [pytest.mark.gpu, cuda]
transformers = pytest.importorskip("transformers")

VOCAB = 512


def _hf(family: str, seed: int = 0):
    torch.manual_seed(seed)
    if family == "llama":
        hc = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=640, num_hidden_layers=3,
                                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
                                      bos_token_id=None, eos_token_id=None, pad_token_id=0)
        return transformers.LlamaForCausalLM(hc).eval()
    hc = transformers.OPTConfig(vocab_size=VOCAB, hidden_size=256, ffn_dim=1024, num_hidden_layers=3,
                                num_attention_heads=8, max_position_embeddings=256, dropout=0.0, bos_token_id=None,
                                eos_token_id=None, pad_token_id=1)
    return transformers.OPTForCausalLM(hc).eval()


def _ours(hm, dtype, sparse: bool):
    m = from_config(hm.config, dtype=dtype, device="meta")
    m.load_state_dict({k: v.to("cuda", dtype) for k, v in hm.state_dict().items()}, assign=True)
    if sparse:
        magnitude_prune_(m, 0.8, filter_fn=lambda mod, fqn: fqn != "lm_head")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            flash_llm.sparsify_(m)
    return m.eval()


def _prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, VOCAB, (int(k),), generator=g).tolist() for k in torch.randint(3, 40, (n,), generator=g)]


@pytest.fixture(scope="module")
def tp():
    with init_tensor_parallel() as group:  # no torchrun variables: world size 1, NCCL on cuda:0
        yield group


def test_world_size_one_uses_nccl_with_nvls_off(tp):
    assert (tp.rank, tp.world_size, tp.backend, tp.device.type) == (0, 1, "nccl", "cuda")
    assert os.environ["NCCL_NVLS_ENABLE"] == "0" and os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1"


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_tensor_parallel_decode_with_graphs_equals_single_process(tp, family, sparse, monkeypatch):
    from flash_llm import engine as E

    # (the single-process engine below would pad its prompts to engine.prefill_bucket's lengths, which a
    # tensor-parallel one without prefill graphs does not: for the same bits, neither does)
    monkeypatch.setattr(E, "PREFILL_BUCKETS", False)
    one = _ours(_hf(family).cuda(), torch.float16, sparse)
    model = copy.deepcopy(one)
    report = tensor_parallel_(model, tp)
    assert {s.format for s in report.layers} == ({"BitmapTiles"} if sparse else {"dense"})
    prompts = _prompts(5, 1)
    graph = Engine(model, max_batch=5, max_seq=128)  # default on CUDA + NCCL: CUDA graphs
    assert graph.cuda_graphs
    g = graph.generate(prompts, 24, output_logits=True, eos_token_id=None)
    e = Engine(model, max_batch=5, max_seq=128, cuda_graphs=False).generate(prompts, 24, output_logits=True,
                                                                             eos_token_id=None)
    assert torch.equal(g.tokens, e.tokens) and float((g.logits - e.logits).abs().max()) == 0.0
    # one rank: the same kernels on the same slices (the bias inside rank 0's product), an all-reduce of one
    s = Engine(one, max_batch=5, max_seq=128).generate(prompts, 24, output_logits=True, eos_token_id=None)
    assert torch.equal(g.tokens, s.tokens) and float((g.logits - s.logits).abs().max()) == 0.0


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_tensor_parallel_prefill_graphs_equal_the_eager_prefill(tp, sparse, monkeypatch):
    """engine.PREFILL_GRAPHS_TP: the prefill (its NCCL all-reduces captured) replayed from its graph for new prompts of
    a captured shape gives the eager engine's tokens and logits bit for bit; a capture error would have warned."""
    from flash_llm import engine as E

    model = copy.deepcopy(_ours(_hf("llama").cuda(), torch.float16, sparse))
    tensor_parallel_(model, tp)
    monkeypatch.setattr(E, "PREFILL_GRAPHS_TP", True)
    eng = Engine(model, max_batch=3, max_seq=96)
    assert eng._prefills == {}
    eager = Engine(model, max_batch=3, max_seq=96, cuda_graphs=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for seed in (1, 2, 3):
            prompts = [p[:30] + [7] * (30 - len(p[:30])) for p in _prompts(3, seed)]  # (3 x 30: one shape)
            g = eng.generate(prompts, 6, output_logits=True, eos_token_id=None)
            e = eager.generate(prompts, 6, output_logits=True, eos_token_id=None)
            assert torch.equal(g.tokens, e.tokens) and torch.equal(g.logits[:, 0], e.logits[:, 0]), seed
    assert list(eng._prefills) == [(3, 30)] and eng._prefills[(3, 30)].replays == 2


def test_checkpoint_slices_load_onto_the_gpu(tp, tmp_path):
    from safetensors.torch import save_file

    hm = _hf("llama", seed=3)
    pruned = from_config(hm.config, dtype=torch.float16, device="meta")
    pruned.load_state_dict({k: v.half() for k, v in hm.state_dict().items()}, assign=True)
    magnitude_prune_(pruned, 0.7, filter_fn=lambda m, fqn: fqn != "lm_head")
    os.makedirs(tmp_path / "ckpt")
    save_file({k: v.contiguous() for k, v in pruned.state_dict().items()}, str(tmp_path / "ckpt" / "model.safetensors"))
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(pruned.config.to_hf()))
    model, report = load_tensor_parallel(tmp_path / "ckpt", tp, sparsify=flash_llm.SparsifyConfig(), progress=False)
    assert all(t.device.type == "cuda" for t in [*model.parameters(), *model.buffers()] if t.numel())
    mem = copy.deepcopy(pruned).cuda()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        flash_llm.sparsify_(mem)
    tensor_parallel_(mem, tp)
    prompts = _prompts(3, 4)
    a = Engine(model, max_batch=3, max_seq=96).generate(prompts, 16, output_logits=True, eos_token_id=None)
    b = Engine(mem, max_batch=3, max_seq=96).generate(prompts, 16, output_logits=True, eos_token_id=None)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logits, b.logits)
    assert report.nnz == ShardReport.of(mem).nnz


def test_synthetic_model_for_the_rank_runs_with_graphs(tp):
    cfg = preset("llama-3-8b").replace(num_layers=2, hidden_size=512, intermediate_size=1536, vocab_size=1000,
                                       name="small-llama")
    model, report = build_synthetic(cfg, 0.8, device="cuda", tp=tp, progress=False)
    assert (report.tp_rank, report.tp_size) == (0, 1) and abs(report.achieved_sparsity - 0.8) < 0.01
    single, _ = build_synthetic(cfg, 0.8, device="cuda", progress=False)
    prompts = _prompts(4, 5)
    a = Engine(model, max_batch=4, max_seq=64).generate(prompts, 8, eos_token_id=None, output_logits=True)
    b = Engine(single, max_batch=4, max_seq=64).generate(prompts, 8, eos_token_id=None, output_logits=True)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logits, b.logits)  # the same weights, one rank


def test_bench_e2e_tp_mode_on_one_gpu(tp, tmp_path):
    bench = load_script("benchmarks/bench_e2e.py", "bench_e2e")
    argv = ["--tp", "1", "--models", "tiny-llama,tiny-opt", "--sparsities", "80", "--batches", "1,4", "--prompt",
            "8", "--new", "8", "--repeats", "1", "--no-progress", "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert len(rows) == 8 and all(r["status"] == "ok" and r["gpus"] == 1 for r in rows)
    # one rank: no all-reduce to time (the graph NCCL would capture is empty)
    assert all(r["allreduce_timing"] == "none (world size 1)" and r["allreduce_share"] == 0 for r in rows)
    assert "tokens per GPU-second" in (tmp_path / "summary.md").read_text()

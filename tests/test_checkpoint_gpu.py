"""Checkpoints on a CUDA GPU: loading compresses and validates on the device, the CUDA kernels give logits as
accurate as transformers' dense model, and GPU compression writes the same bytes as CPU compression."""

from __future__ import annotations

import copy

import pytest
import torch

import flash_llm
from flash_llm import SparseLinear
from flash_llm.checkpoint import convert

from _ckpt import VOCAB, assert_logits_as_accurate_as_torch, hf_model, logits, read_shard, save_hf, shards

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
pytestmark = [pytest.mark.gpu, cuda]
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module", params=["llama", "opt"])
def pruned(request, tmp_path_factory):
    model = hf_model(request.param)
    return model, save_hf(model, tmp_path_factory.mktemp(f"gpu-{request.param}") / "dense")


@pytest.mark.parametrize("backend", ["flash", "hf"])
def test_load_on_gpu_matches_transformers(pruned, backend):
    hf, path = pruned
    model = flash_llm.from_pretrained(path, device="cuda", backend=backend)
    sparse = [m for m in model.modules() if isinstance(m, SparseLinear)]
    assert sparse and all(m.weight_data.is_cuda for m in sparse)
    assert all(p.is_cuda for p in model.parameters())
    on_cpu = flash_llm.from_pretrained(path, backend=backend)
    for (n, a), (_, b) in zip(model.named_modules(), on_cpu.named_modules()):
        if isinstance(a, SparseLinear):
            assert torch.equal(a.weight_data.cpu(), b.weight_data) and torch.equal(a.weight_offsets.cpu(),
                                                                                   b.weight_offsets), n
    ids = torch.randint(0, VOCAB, (3, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_logits_as_accurate_as_torch(logits(model, ids.cuda()), copy.deepcopy(hf).cuda(), ids.cuda())


def test_gpu_conversion_writes_the_same_checkpoint(pruned, tmp_path):
    _, path = pruned
    convert(path, tmp_path / "cpu", max_shard_size="16KB", progress=False)
    convert(path, tmp_path / "gpu", device="cuda", max_shard_size="16KB", progress=False)
    a, b = shards(tmp_path / "cpu"), shards(tmp_path / "gpu")
    assert [f.name for f in a] == [f.name for f in b]
    for fa, fb in zip(a, b):
        (ta, ma), (tb, mb) = read_shard(fa), read_shard(fb)
        assert ma == mb and ta.keys() == tb.keys()
        assert all(torch.equal(ta[k], tb[k]) for k in ta), fa.name


def test_flash_checkpoint_round_trip_on_gpu(pruned, tmp_path):
    _, path = pruned
    model = flash_llm.from_pretrained(path, device="cuda")
    flash_llm.save_pretrained(model, tmp_path / "flash")
    again = flash_llm.from_pretrained(tmp_path / "flash", device="cuda")
    auto = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "flash").cuda()
    hf_classes = flash_llm.from_pretrained(tmp_path / "flash", device="cuda", backend="hf")
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1)).cuda()
    with torch.no_grad():
        assert torch.equal(logits(again, ids), logits(model, ids))
        assert torch.equal(logits(auto, ids), logits(hf_classes, ids))

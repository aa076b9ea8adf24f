"""The one-launch Llama MLP kernel (``delta_rows_mlp_<dtype>_p<P>``) on a CUDA GPU against the unfused ops
(``spmm_rms_norm`` with SiLU x up, then ``spmm_add_``) and a float64 reference: fresh random weights and inputs,
several block counts and lanes a row, both dtypes, the scratch sums and ticket zeroed again, and CUDA-graph replay.
Skipped cleanly where there is no CUDA GPU."""

from __future__ import annotations

import pytest
import torch

from flash_llm import DeltaRows, ops
from flash_llm.formats.delta_mlp import owned_down
from test_kernels_gpu import DTYPES, ULP, assert_scratch_zeroed, sparse_weight

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
pytestmark = [pytest.mark.gpu, cuda]


def _kernels():
    from flash_llm import kernels

    return kernels


def _case(h, inter, parts, dtype, gen, density=0.2):
    # (scaled so the sums stay near 1: fp16 overflows at Llama-3-8B's sizes otherwise)
    gu_dense = (sparse_weight(2 * inter, h, density, dtype, gen).float() / (density * h) ** 0.5).to(dtype)
    down_dense = (sparse_weight(h, inter, density, dtype, gen).float() / (density * inter) ** 0.5).to(dtype)
    gu = DeltaRows.from_dense(gu_dense, pair_halves=True, parts=parts)
    down = DeltaRows.from_dense(down_dense, splits=1)
    norm = (1 + 0.1 * torch.randn(h, generator=gen, device="cuda")).to(dtype)
    x = torch.randn(1, 1, h, generator=gen, device="cuda").to(dtype)
    return gu_dense, down_dense, gu, down, norm, x


def _reference(x, norm, eps, gu_dense, down_dense):
    """x + down(silu(g) u) in float64 from the dtype's rounded steps (the norm's output and the intermediate rounded)."""
    dt = x.dtype
    xf = x.double().view(-1)
    n = (xf * torch.rsqrt(xf.pow(2).mean() + eps)).to(dt).double() * norm.double()
    n = n.to(dt).double()
    gu = (gu_dense.double() @ n).to(dt).double()
    g, u = gu.chunk(2)
    hmid = (torch.nn.functional.silu(g) * u).to(dt).double()
    return xf + down_dense.double() @ hmid


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("h,inter,parts,blocks", [(256, 512, 4, 4), (512, 1024, 2, 17), (512, 1024, 8, 9),
                                                   (256, 768, 16, 3), (1024, 2816, 4, 132), (4096, 14336, 4, 132)])
def test_mlp_kernel_matches_unfused(dtype, h, inter, parts, blocks):
    k = _kernels()
    gen = torch.Generator(device="cuda").manual_seed(h + inter + parts + blocks)
    gu_dense, down_dense, gu, down, norm, x = _case(h, inter, parts, dtype, gen)
    if -(-gu.layout.slices // blocks) > 32:
        blocks = -(-gu.layout.slices // 32)
    od = owned_down(gu, down_dense, blocks)
    eps = 1e-5
    want = x.clone()
    ops.spmm_add_(want, ops.spmm_rms_norm(want, norm, eps, gu, act="silu_mul"), down)
    got = x.clone()
    k.delta_rows_mlp_(got, norm, eps, gu, od)
    torch.cuda.synchronize()
    ref = _reference(x, norm, eps, gu_dense, down_dense)
    assert not torch.isnan(got).any()
    err = (got.double().view(-1) - ref).abs().max().item()
    err_unfused = (want.double().view(-1) - ref).abs().max().item()
    tol = 2 * err_unfused + ULP[dtype] * (1 + ref.abs().max().item())
    assert err <= tol, f"error {err:.3g} > {tol:.3g} (unfused ops: {err_unfused:.3g})"
    assert_scratch_zeroed(k, x.device)
    again = x.clone()  # a second launch: the ticket and sums were reset
    k.delta_rows_mlp_(again, norm, eps, gu, od)
    assert (again.double() - got.double()).abs().max().item() <= ULP[dtype] * (1 + ref.abs().max().item())
    assert_scratch_zeroed(k, x.device)


def test_mlp_kernel_in_a_cuda_graph():
    k = _kernels()
    dtype = torch.bfloat16
    gen = torch.Generator(device="cuda").manual_seed(5)
    gu_dense, down_dense, gu, down, norm, x = _case(512, 1024, 4, dtype, gen)
    od = owned_down(gu, down_dense, 16)
    buf = x.clone()
    k.delta_rows_mlp_(buf, norm, 1e-5, gu, od)  # (loads the kernel)
    buf.copy_(x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), k.static_weights():
        k.delta_rows_mlp_(buf, norm, 1e-5, gu, od)
        k.delta_rows_mlp_(buf, norm, 1e-5, gu, od)
    buf.copy_(x)
    graph.replay()
    torch.cuda.synchronize()
    want = x.clone()
    for _ in range(2):
        ops.spmm_add_(want, ops.spmm_rms_norm(want, norm, 1e-5, gu, act="silu_mul"), down)
    scale = want.double().abs().max().item()
    assert (buf.double() - want.double()).abs().max().item() <= 4 * ULP[dtype] * (1 + scale)
    assert_scratch_zeroed(k, x.device)


def test_mlp_kernel_refuses_bad_arguments():
    k = _kernels()
    gen = torch.Generator(device="cuda").manual_seed(1)
    _, down_dense, gu, _, norm, x = _case(256, 512, 4, torch.float16, gen)
    od = owned_down(gu, down_dense, 4)
    with pytest.raises(ValueError, match="x must be"):
        k.delta_rows_mlp_(x.to(torch.bfloat16), norm, 1e-5, gu, od)
    with pytest.raises(ValueError, match="x must be"):
        k.delta_rows_mlp_(x.cpu(), norm, 1e-5, gu, od)


def test_engine_runs_the_one_launch_mlp(monkeypatch):
    """An engine of max_batch 1 with FLASH_LLM_FUSED_MLP lays each Llama layer's down out by owner and runs the MLP
    kernel (eager and in its CUDA graph), its logits within rounding of the engine without; after another engine
    re-encodes the weights the stale owner layout is left unused."""
    from flash_llm import kernels
    from flash_llm.engine import Engine
    from test_engine_gpu import _assert_first_steps_close, _small_delta_rows_llama
    from test_kernels_gpu import record_launches

    model = _small_delta_rows_llama(0.8)
    prompts = [[int(t) for t in torch.randint(0, 4096, (40,), generator=torch.Generator().manual_seed(3))]]
    base = Engine(model, max_batch=1, max_seq=128).generate(prompts, 8, output_logits=True, eos_token_id=None)
    monkeypatch.setattr(kernels, "FUSED_MLP", 1)
    eng = Engine(model, max_batch=1, max_seq=128)
    assert eng.owned_mlp == 2
    launched = record_launches(kernels, monkeypatch)
    eager = Engine(model, max_batch=1, max_seq=128, cuda_graphs=False).generate(prompts, 8, output_logits=True,
                                                                                eos_token_id=None)
    assert sum(n.startswith("delta_rows_mlp_") for n in launched) == 2 * 7  # two layers, seven decode steps
    _assert_first_steps_close(eager, base)
    got = eng.generate(prompts, 8, output_logits=True, eos_token_id=None)
    _assert_first_steps_close(got, base)
    monkeypatch.setattr(kernels, "FUSED_MLP", 0)
    Engine(model, max_batch=3, max_seq=128)  # re-encodes gate / up and down in the split layout
    launched.clear()
    Engine(model, max_batch=3, max_seq=128, cuda_graphs=False).generate(prompts, 4, eos_token_id=None)
    assert not any(n.startswith("delta_rows_mlp_") for n in launched)

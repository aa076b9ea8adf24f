"""The decode-attention op (``flash_llm.models._common.decode_attention``): one decode step's KV-cache write and
attention.  On the CPU (CI) the PyTorch path, against the cache update and ``attention`` it replaces; on a CUDA GPU the
kernel (``kernels.decode_attention_cuda``) against a float64 reference, with poisoned outputs and fresh random inputs,
and whole models with it against the same models without it.  GPU tests skip cleanly without a GPU."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from flash_llm import kernels
from flash_llm.models import _common
from flash_llm.models._common import Attend, KVCache, attention, decode_attention, use_decode_attention

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DTYPES = [torch.float16, torch.bfloat16]


def _case(b, h, hkv, d, slots, kv_len, slot, dtype, device, seed=0, masked=()):
    """Random q, k, v ([B, heads, 1, D] views of one projection-like output), a random cache, the additive mask
    (``-inf`` at ``masked`` slots and past the written ones for row 1), the slot tensor."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    qkv = torch.randn(b, 1, (h + 2 * hkv) * d, generator=g).to(device, dtype)
    q = qkv[..., :h * d].view(b, 1, h, d).transpose(1, 2)
    k = qkv[..., h * d:(h + hkv) * d].view(b, 1, hkv, d).transpose(1, 2)
    v = qkv[..., (h + hkv) * d:].view(b, 1, hkv, d).transpose(1, 2)
    cache = KVCache(1, b + 1, hkv, slots, d, dtype, device)
    cache.k[0].copy_(torch.randn(cache.k[0].shape, generator=g))
    cache.v[0].copy_(torch.randn(cache.v[0].shape, generator=g))
    valid = torch.ones(b, slots, dtype=torch.bool)
    valid[:, list(masked)] = False
    if b > 1:
        valid[1, : kv_len // 2] = False  # a left-padded row
    valid[:, slot] = True
    mask = _common.additive_mask(valid[:, None, None, :kv_len].to(device), dtype)
    return q, k, v, cache, mask, torch.tensor([slot], dtype=torch.int64, device=device)


def _reference(q, k, v, cache, mask, slot, kv_len, scale):
    """float64: the cache with k, v written at the slot, then softmax attention over the first kv_len slots."""
    b, h, _, d = q.shape
    kc, vc = cache.k[0][:b].double().clone(), cache.v[0][:b].double().clone()
    s = int(slot)
    kc[:, :, s] = k[:, :, 0].double()
    vc[:, :, s] = v[:, :, 0].double()
    rep = h // k.shape[1]
    kk = kc[:, :, :kv_len].repeat_interleave(rep, 1)
    vv = vc[:, :, :kv_len].repeat_interleave(rep, 1)
    w = (q.double() @ kk.transpose(-1, -2)) * scale + mask.double()
    out = torch.softmax(w, -1) @ vv
    return out.transpose(1, 2).reshape(b, 1, h * d), kc, vc


def _tolerance(theirs: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> float:
    """2x PyTorch's own error (``theirs``, in ``dtype``, against the float64 ``want``) plus one ulp of the largest
    value."""
    ulp = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[dtype]
    return 2 * (theirs.double() - want).abs().max().item() + ulp * want.abs().max().item()


def test_cpu_path_is_the_cache_update_and_attention():
    """On the CPU (where the kernel never runs) the op writes the cache and attends exactly as before."""
    q, k, v, cache, mask, slot = _case(2, 8, 2, 64, 96, 80, 37, torch.float32, "cpu", masked=(5, 6))
    attend = Attend(positions=torch.zeros(2, 1, dtype=torch.long), mask=mask, cache=cache, slots=slot, kv_len=80)
    ref_cache = KVCache(1, 3, 2, 96, 64, torch.float32, "cpu")
    ref_cache.k[0].copy_(cache.k[0])
    ref_cache.v[0].copy_(cache.v[0])
    got = decode_attention(q, k, v, attend, 0, None)
    kk, vv = ref_cache.update(0, k, v, slot, 80)
    want = attention(q, kk, vv, mask, None)
    assert torch.equal(got, want)
    assert torch.equal(cache.k[0], ref_cache.k[0]) and torch.equal(cache.v[0], ref_cache.v[0])
    assert not use_decode_attention(q, attend)  # CPU tensors never take the kernel
    assert not kernels.decode_attention_ok(q, k, v, cache.k[0], cache.v[0], mask, 80)


def test_policy_takes_the_kernel_where_it_measured_faster():
    """``auto`` (the default): batch x slots up to DECODE_ATTENTION_MAX_WORK (batch 1 at 2048 slots, batch 16 at 2048,
    batch 64 at 256 and 512, not batch 64 at 2048); ``"1"`` / ``True`` always, ``"0"`` / ``False`` never."""
    from flash_llm.models._common import DECODE_ATTENTION_MAX_WORK, decode_attention_wanted

    assert decode_attention_wanted(1, 2048, "auto") and decode_attention_wanted(16, 2048, "auto")
    assert decode_attention_wanted(64, 256, "auto") and decode_attention_wanted(64, 512, "auto")
    assert not decode_attention_wanted(64, 2048, "auto") and not decode_attention_wanted(32, 2048, "auto")
    assert decode_attention_wanted(1, DECODE_ATTENTION_MAX_WORK, "auto")
    assert not decode_attention_wanted(1, DECODE_ATTENTION_MAX_WORK + 1, "auto")
    assert decode_attention_wanted(64, 2048, "1") and decode_attention_wanted(64, 2048, True)
    assert not decode_attention_wanted(1, 1, "0") and not decode_attention_wanted(1, 1, False)


def test_launcher_constants_are_the_kernels():
    """The launcher sizes the attention's grid and clusters by spmm.cu's DA_CHUNK, DA_MAX_REP, DA_HEADS and
    DA_CLUSTER_MAX (a cluster larger than the kernel's combine would leave chunks out)."""
    import re
    from pathlib import Path

    from flash_llm import kernels as kern

    src = (Path(kern.__file__).parent / "spmm.cu").read_text()

    def const(name):
        return int(re.search(rf"constexpr int [^;]*\b{name} = (\d+)", src).group(1))

    assert [const(n) for n in ("DA_CHUNK", "DA_MAX_REP", "DA_HEADS", "DA_CLUSTER_MAX")] == [
        kern.DECODE_ATTN_CHUNK, kern.DECODE_ATTN_MAX_REP, kern.DECODE_ATTN_HEADS, kern.DECODE_ATTN_CLUSTER_MAX]


def test_programmatic_launch_of_the_attention_only_for_small_work(monkeypatch):
    """The decode attention is launched programmatically under static_weights (and FLASH_LLM_PDL_ATTN) only up to
    DECODE_ATTN_PDL_MAX_WORK = batch x slots (batch 16 at 256 slots, not batch 64 at 256), never outside it."""
    from flash_llm import kernels

    monkeypatch.setattr(kernels, "PDL_ATTN", True)
    assert not kernels._pdl_attention(1, 256)  # outside static_weights
    with kernels.static_weights():
        assert kernels._pdl_attention(1, 2048) and kernels._pdl_attention(16, 256)
        assert kernels._pdl_attention(1, kernels.DECODE_ATTN_PDL_MAX_WORK)
        assert not kernels._pdl_attention(1, kernels.DECODE_ATTN_PDL_MAX_WORK + 1)
        assert not kernels._pdl_attention(64, 256)
        monkeypatch.setattr(kernels, "PDL_ATTN", False)
        assert not kernels._pdl_attention(1, 256)


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("b,h,hkv,d", [(1, 32, 8, 128), (3, 8, 8, 64), (2, 16, 2, 128), (1, 12, 4, 64),
                                       (2, 12, 2, 64)])
@pytest.mark.parametrize("kv_len,slot", [(1, 0), (64, 63), (65, 64), (100, 99), (128, 5), (129, 128), (300, 200),
                                         (1000, 611), (2500, 2047)])
def test_kernel_matches_float64(dtype, b, h, hkv, d, kv_len, slot):
    """Output within 2x PyTorch's own error (scaled_dot_product_attention in the same dtype against float64) plus
    one ulp of the largest value; the cache holds the new key and value at the slot and nothing else changed; a
    second launch gives the same bits (the chunks combine in a fixed order).  2500 slots are 40 chunks, which the last
    block combines in two groups (32, then 8), the second rescaling the first's sums."""
    slots = max(kv_len, slot + 1) + 64
    q, k, v, cache, mask, st = _case(b, h, hkv, d, slots, kv_len, slot, dtype, "cuda", seed=kv_len + h,
                                     masked=(kv_len - 1,) if kv_len > 2 and slot != kv_len - 1 else ())
    scale = d ** -0.5
    assert kernels.decode_attention_ok(q, k, v, cache.k[0], cache.v[0], mask, kv_len)
    want, kc, vc = _reference(q, k, v, cache, mask, st, kv_len, scale)
    before = cache.k[0].clone(), cache.v[0].clone()
    out = torch.full((b, 1, h * d), float("nan"), dtype=dtype, device="cuda")
    kernels.decode_attention_cuda(q, k, v, cache.k[0], cache.v[0], st, mask, kv_len, scale, out=out)
    torch.cuda.synchronize()
    kk, vv = cache.rows(0, b, kv_len)
    theirs = attention(q, kk, vv, mask, scale)  # PyTorch in the same dtype, on the written cache
    tol = _tolerance(theirs, want, dtype)
    assert not out.isnan().any()
    assert (out.double() - want).abs().max().item() <= tol
    assert torch.equal(cache.k[0][:b].double(), kc) and torch.equal(cache.v[0][:b].double(), vc)
    assert torch.equal(cache.k[0][b:], before[0][b:]) and torch.equal(cache.v[0][b:], before[1][b:])
    again = kernels.decode_attention_cuda(q, k, v, cache.k[0], cache.v[0], st, mask, kv_len, scale)
    assert torch.equal(again, out)


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("b,slots", [(1, 256), (4, 256), (2, 2048)])
def test_kernel_on_a_full_cache_with_a_masked_tail(b, slots, monkeypatch):
    """As the engine runs it: every slot of a cache of exactly B rows attended (kv_len == slots), the ones past the
    slot written this step masked (whole chunks of them at 2048), Llama-3-8B's heads.  The split-K tickets are
    allocated by this very call, as in a fresh process (session 11: the partial sums' buffer, freed before the
    launch, was handed to the tickets, and every output came out NaN)."""
    monkeypatch.setattr(kernels._scratch, "buffers", {})
    h, hkv, d, dtype = 32, 8, 128, torch.float16
    pos = slots * 3 // 4
    g = torch.Generator(device="cpu").manual_seed(slots + b)
    qkv = torch.randn(b, 1, (h + 2 * hkv) * d, generator=g).to("cuda", dtype)
    q = qkv[..., :h * d].view(b, 1, h, d).transpose(1, 2)
    k = qkv[..., h * d:(h + hkv) * d].view(b, 1, hkv, d).transpose(1, 2)
    v = qkv[..., (h + hkv) * d:].view(b, 1, hkv, d).transpose(1, 2)
    cache = KVCache(1, b, hkv, slots, d, dtype, "cuda")
    cache.k[0].copy_(torch.randn(cache.k[0].shape, generator=g))
    cache.v[0].copy_(torch.randn(cache.v[0].shape, generator=g))
    valid = torch.zeros(b, slots, dtype=torch.bool)
    valid[:, : pos + 1] = True
    mask = _common.additive_mask(valid[:, None, None, :].to("cuda"), dtype)
    st = torch.tensor([pos], dtype=torch.int64, device="cuda")
    scale = d ** -0.5
    want, _, _ = _reference(q, k, v, cache, mask, st, slots, scale)
    out = torch.full((b, 1, h * d), float("nan"), dtype=dtype, device="cuda")
    kernels.decode_attention_cuda(q, k, v, cache.k[0], cache.v[0], st, mask, slots, scale, out=out)
    kk, vv = cache.rows(0, b, slots)
    theirs = attention(q, kk, vv, mask, scale)
    tol = _tolerance(theirs, want, dtype)
    assert not out.isnan().any()
    assert (out.double() - want).abs().max().item() <= tol


def _rope_tables(b, d, dtype, device, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    ang = torch.rand(b, 1, d // 2, generator=g, dtype=torch.float64) * 100
    ang = torch.cat([ang, ang], -1)
    return ang.cos().to(device, dtype), ang.sin().to(device, dtype)


def test_cpu_path_with_rope_rotates_then_attends():
    """On the CPU, ``rope=(cos, sin, fused)`` is the eager RoPE, the cache update and attention, in that order."""
    from flash_llm.models import _fused

    q, k, v, cache, mask, slot = _case(2, 8, 2, 64, 96, 80, 37, torch.float32, "cpu", masked=(5, 6))
    cos, sin = _rope_tables(2, 64, torch.float32, "cpu", 1)
    attend = Attend(positions=torch.zeros(2, 1, dtype=torch.long), mask=mask, cache=cache, slots=slot, kv_len=80)
    ref_cache = KVCache(1, 3, 2, 96, 64, torch.float32, "cpu")
    ref_cache.k[0].copy_(cache.k[0])
    ref_cache.v[0].copy_(cache.v[0])
    got = decode_attention(q, k, v, attend, 0, None, (cos, sin, False))
    qr, kr = _fused.rope(q, k, cos, sin)
    kk, vv = ref_cache.update(0, kr, v, slot, 80)
    assert torch.equal(got, attention(qr, kk, vv, mask, None))
    assert torch.equal(cache.k[0], ref_cache.k[0]) and torch.equal(cache.v[0], ref_cache.v[0])


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("b,h,hkv,d", [(1, 32, 8, 128), (3, 8, 8, 64), (2, 16, 2, 128)])
@pytest.mark.parametrize("kv_len,slot", [(1, 0), (129, 128), (300, 200)])
def test_kernel_with_rope(dtype, b, h, hkv, d, kv_len, slot):
    """RoPE inside the kernel: the cache slot holds exactly the key eager ``_fused.rope`` gives (same rounding), and the
    output is within 2x PyTorch's own error of float64 attention over the rotated query and that key."""
    from flash_llm.models import _fused

    slots = max(kv_len, slot + 1) + 64
    q, k, v, cache, mask, st = _case(b, h, hkv, d, slots, kv_len, slot, dtype, "cuda", seed=kv_len + 7 * h)
    cos, sin = _rope_tables(b, d, dtype, "cuda", kv_len)
    scale = d ** -0.5
    assert kernels.decode_attention_ok(q, k, v, cache.k[0], cache.v[0], mask, kv_len, cos, sin)
    qr, kr = _fused.rope(q, k, cos, sin)
    want, kc, vc = _reference(qr, kr, v, cache, mask, st, kv_len, scale)
    out = torch.full((b, 1, h * d), float("nan"), dtype=dtype, device="cuda")
    kernels.decode_attention_cuda(q, k, v, cache.k[0], cache.v[0], st, mask, kv_len, scale, out=out, cos=cos, sin=sin)
    torch.cuda.synchronize()
    assert torch.equal(cache.k[0][:b].double(), kc) and torch.equal(cache.v[0][:b].double(), vc)
    kk, vv = cache.rows(0, b, kv_len)
    theirs = attention(qr, kk, vv, mask, scale)
    tol = _tolerance(theirs, want, dtype)
    assert not out.isnan().any()
    assert (out.double() - want).abs().max().item() <= tol
    assert not kernels.decode_attention_ok(q, k, v, cache.k[0], cache.v[0], mask, kv_len, cos, None)
    assert not kernels.decode_attention_ok(q, k, v, cache.k[0], cache.v[0], mask, kv_len, cos.float(), sin.float())


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("b,h,hkv,d", [(1, 32, 8, 128), (3, 8, 8, 64), (2, 16, 2, 128), (2, 12, 2, 64)])
@pytest.mark.parametrize("rope", [False, True], ids=["plain", "rope"])
def test_chunks_combined_in_a_cluster_give_the_global_combines_bits(dtype, b, h, hkv, d, rope, monkeypatch):
    """With 2-8 chunks (65-512 slots) on sm_90 the blocks of a (sequence, kv head, head group) run as one cluster and
    block 0 combines the chunks from the others' shared memory (kernels.DECODE_ATTN_CLUSTER): the same outputs and
    cache as the combine through global memory, bit for bit, for 1 to 8 chunks and past 8 (600 slots: the global
    combine either way); under a programmatic launch too; by push (kernels.DECODE_ATTN_PUSH: the others store into
    block 0's shared memory, arrive at the cluster barrier and exit) and by pull (block 0 loads from theirs between two cluster
    barriers).  (Every grid here may take the cluster: the limit on the grid is policy, tested below; 64-slot chunks
    throughout: the 32-slot ones only combine in a cluster.)"""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("thread-block clusters need compute capability 9.0")
    monkeypatch.setattr(kernels, "DECODE_ATTN_CLUSTER_GRID", 1 << 20)
    monkeypatch.setattr(kernels, "DECODE_ATTN_C32", False)
    for kv_len, slot in ((64, 10), (65, 64), (129, 100), (256, 255), (300, 17), (512, 500), (600, 599)):
        slots = max(kv_len, slot + 1) + 64
        q, k, v, cache, mask, st = _case(b, h, hkv, d, slots, kv_len, slot, dtype, "cuda", seed=kv_len + b,
                                         masked=(kv_len - 1,) if slot != kv_len - 1 else ())
        cos, sin = _rope_tables(b, d, dtype, "cuda", kv_len) if rope else (None, None)
        outs, caches = [], []
        for on, push, pdl in ((False, False, False), (True, False, False), (True, False, True), (True, True, False),
                              (True, True, True)):
            monkeypatch.setattr(kernels, "DECODE_ATTN_CLUSTER", on)
            monkeypatch.setattr(kernels, "DECODE_ATTN_PUSH", push)
            kc, vc = cache.k[0].clone(), cache.v[0].clone()
            out = torch.full((b, 1, h * d), float("nan"), dtype=dtype, device="cuda")
            with kernels.static_weights() if pdl else contextlib.nullcontext():
                kernels.decode_attention_cuda(q, k, v, kc, vc, st, mask, kv_len, d ** -0.5, out=out, cos=cos, sin=sin)
            torch.cuda.synchronize()
            outs.append(out)
            caches.append((kc, vc))
        assert not outs[0].isnan().any()
        for i in range(1, len(outs)):
            assert torch.equal(outs[i], outs[0]), (kv_len, i, (outs[i].float() - outs[0].float()).abs().max().item())
            assert torch.equal(caches[i][0], caches[0][0]) and torch.equal(caches[i][1], caches[0][1])


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("b,h,hkv,d", [(1, 32, 8, 128), (3, 8, 8, 64), (2, 16, 2, 128), (2, 12, 2, 64)])
@pytest.mark.parametrize("rope", [False, True], ids=["plain", "rope"])
def test_small_chunks_match_float64(dtype, b, h, hkv, d, rope, monkeypatch):
    """kernels.DECODE_ATTN_C32: chunks of 32 slots (``decode_attn_<dtype>_d<D>_c32``, four threads a key row) where
    2-8 of them combine in a cluster (33-256 slots), else the 64-slot kernel (32 slots: one chunk; 300: ten): each
    output within 2x PyTorch's own error of float64 (with RoPE: of the rotated query and key), the cache written at
    the slot and nowhere else, the same bits again and under a programmatic launch.  Outputs poisoned."""
    from flash_llm.models import _fused

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("thread-block clusters need compute capability 9.0")
    monkeypatch.setattr(kernels, "DECODE_ATTN_C32", True)
    monkeypatch.setattr(kernels, "DECODE_ATTN_C32_MIN_BATCH", 1)
    monkeypatch.setattr(kernels, "DECODE_ATTN_CLUSTER_GRID", 1 << 20)
    monkeypatch.setattr(kernels, "DECODE_ATTN_PUSH", True)
    names = []
    real = kernels.launch
    monkeypatch.setattr(kernels, "launch", lambda name, *a, **kw: names.append(name) or real(name, *a, **kw))
    for kv_len, slot in ((32, 31), (33, 32), (64, 10), (100, 99), (129, 100), (256, 255), (256, 3), (300, 17)):
        slots = max(kv_len, slot + 1) + 64
        q, k, v, cache, mask, st = _case(b, h, hkv, d, slots, kv_len, slot, dtype, "cuda", seed=kv_len + 3 * b,
                                         masked=(kv_len - 1,) if slot != kv_len - 1 else ())
        cos, sin = _rope_tables(b, d, dtype, "cuda", kv_len) if rope else (None, None)
        qr, kr = _fused.rope(q, k, cos, sin) if rope else (q, k)
        scale = d ** -0.5
        want, kc, vc = _reference(qr, kr, v, cache, mask, st, kv_len, scale)
        before = cache.k[0].clone(), cache.v[0].clone()
        names.clear()
        monkeypatch.setattr(kernels, "DECODE_ATTN_PUSH", True)  # (the loop below ends with the pull combine)
        out = torch.full((b, 1, h * d), float("nan"), dtype=dtype, device="cuda")
        kernels.decode_attention_cuda(q, k, v, cache.k[0], cache.v[0], st, mask, kv_len, scale, out=out, cos=cos,
                                      sin=sin)
        torch.cuda.synchronize()
        assert ("_c32" in names[-1]) == (33 <= kv_len <= 256), (kv_len, names)
        assert names[-1].endswith("_p") == (65 <= kv_len <= 512 or "_c32" in names[-1]), (kv_len, names)
        assert torch.equal(cache.k[0][:b].double(), kc) and torch.equal(cache.v[0][:b].double(), vc)
        assert torch.equal(cache.k[0][b:], before[0][b:]) and torch.equal(cache.v[0][b:], before[1][b:])
        kk, vv = cache.rows(0, b, kv_len)
        tol = _tolerance(attention(qr, kk, vv, mask, scale), want, dtype)
        assert not out.isnan().any()
        err = (out.double() - want).abs().max().item()
        assert err <= tol, (kv_len, slot, err, tol)
        for pdl, push in ((False, True), (True, True), (False, False), (True, False)):  # push: the default above
            monkeypatch.setattr(kernels, "DECODE_ATTN_PUSH", push)
            kc2, vc2 = before[0].clone(), before[1].clone()
            with kernels.static_weights() if pdl else contextlib.nullcontext():
                again = kernels.decode_attention_cuda(q, k, v, kc2, vc2, st, mask, kv_len, scale, cos=cos, sin=sin)
            torch.cuda.synchronize()
            assert torch.equal(again, out) and torch.equal(kc2, cache.k[0]) and torch.equal(vc2, cache.v[0])


def test_small_chunks_only_where_they_combine_in_a_cluster(monkeypatch):
    """kernels._decode_attn_chunk (no launch, so on the CPU too): with DECODE_ATTN_C32, 32 slots a chunk where 2-8
    chunks of 32 fit a cluster within the grid limit (Llama-3-8B's heads at batch 1: 33-256 slots), else 64; by
    default from batch 2 only (batch 1 lost on an H200, session 58) and without sm_90 always 64."""
    monkeypatch.setattr(kernels, "sm90", lambda i: True)
    monkeypatch.setattr(kernels, "sm_count", lambda i: 132)
    monkeypatch.setattr(kernels, "DECODE_ATTN_CLUSTER", True)
    monkeypatch.setattr(kernels, "DECODE_ATTN_CLUSTER_GRID", 1)
    chunk = kernels._decode_attn_chunk
    assert kernels.DECODE_ATTN_C32 and kernels.DECODE_ATTN_C32_MIN_BATCH == 2  # the defaults
    assert chunk(1, 8, 1, 256, 0) == kernels.DECODE_ATTN_CHUNK == 64
    assert chunk(2, 8, 1, 256, 0) == 32
    assert chunk(1, 8, 1, 256, 0, 1) == 32 and chunk(2, 8, 1, 256, 0, 3) == 64  # (an engine's small_chunks_from)
    monkeypatch.setattr(kernels, "DECODE_ATTN_C32", False)
    assert chunk(2, 8, 1, 256, 0) == 64 and chunk(1, 8, 1, 256, 0, 1) == 64
    monkeypatch.setattr(kernels, "DECODE_ATTN_C32", True)
    monkeypatch.setattr(kernels, "DECODE_ATTN_C32_MIN_BATCH", 1)
    assert [chunk(1, 8, 1, n, 0) for n in (32, 33, 129, 256, 257, 512)] == [64, 32, 32, 32, 64, 64]
    assert chunk(2, 8, 1, 256, 0) == 32  # 2 x 8 x 8 = 128 blocks fit 132 SMs
    assert chunk(3, 8, 1, 256, 0) == 64  # 192 blocks: more than the SMs
    monkeypatch.setattr(kernels, "sm90", lambda i: False)
    assert chunk(1, 8, 1, 256, 0) == 64


@cuda
@pytest.mark.gpu
def test_cluster_combine_only_for_grids_within_the_sms(monkeypatch):
    """The cluster combine runs where the grid has at most DECODE_ATTN_CLUSTER_GRID blocks an SM (batch 1 of
    Llama-3-8B's heads at 256 slots: 32 blocks) and 2-8 chunks; batch 16 (512 blocks) keeps the global combine."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("thread-block clusters need compute capability 9.0")
    seen = []
    real = kernels.launch

    def spy(name, grid, *args, **kw):
        if name.startswith("decode_attn"):
            seen.append((grid, kw.get("cluster")))
        return real(name, grid, *args, **kw)

    monkeypatch.setattr(kernels, "launch", spy)
    for b in (1, 16):
        q, k, v, cache, mask, st = _case(b, 32, 8, 128, 320, 256, 255, torch.float16, "cuda", seed=b)
        kernels.decode_attention_cuda(q, k, v, cache.k[0], cache.v[0], st, mask, 256, 128 ** -0.5)
    torch.cuda.synchronize()
    (g1, c1), (g16, c16) = seen
    assert g1[1] == 4 and g1[0] * g1[1] * g1[2] <= kernels.sm_count(0) and c1 == (1, 4, 1)
    assert g16[0] * g16[1] * g16[2] > kernels.sm_count(0) and c16 is None


@cuda
@pytest.mark.gpu
def test_kernel_without_mask_and_slot_outside_the_cache():
    """No mask: every slot attended.  A slot past the cache writes nothing (the keys come from the cache alone)."""
    b, h, hkv, d, slots = 2, 8, 2, 128, 256
    q, k, v, cache, _, _ = _case(b, h, hkv, d, slots, 200, 3, torch.float16, "cuda")
    st = torch.tensor([slots + 5], dtype=torch.int64, device="cuda")
    before = cache.k[0].clone()
    out = kernels.decode_attention_cuda(q, k, v, cache.k[0], cache.v[0], st, None, 200, 0.1)
    assert torch.equal(cache.k[0], before)
    rep = h // hkv
    kk = cache.k[0][:b, :, :200].double().repeat_interleave(rep, 1)
    vv = cache.v[0][:b, :, :200].double().repeat_interleave(rep, 1)
    want = (torch.softmax(q.double() @ kk.transpose(-1, -2) * 0.1, -1) @ vv).transpose(1, 2).reshape(b, 1, h * d)
    assert (out.double() - want).abs().max().item() <= 4 * 2.0**-10 * want.abs().max().item() + 1e-3


@cuda
@pytest.mark.gpu
def test_unsupported_shapes_fall_back():
    """Head size 32, more than 8 query heads per kv head, a float32 model: PyTorch attention, same results."""
    for h, hkv, d, dtype in [(8, 2, 32, torch.float16), (32, 2, 64, torch.float16), (8, 2, 64, torch.float32)]:
        q, k, v, cache, mask, st = _case(1, h, hkv, d, 80, 64, 10, dtype, "cuda")
        assert not kernels.decode_attention_ok(q, k, v, cache.k[0], cache.v[0], mask, 64)
        attend = Attend(positions=torch.zeros(1, 1, dtype=torch.long, device="cuda"), mask=mask, cache=cache,
                        slots=st, kv_len=64)
        got = decode_attention(q, k, v, attend, 0, None)
        want, _, _ = _reference(q, k, v, cache, mask, st, 64, d ** -0.5)
        assert (got.double() - want).abs().max().item() < 1e-2


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_engine_with_the_kernel(family, dtype, monkeypatch):
    """Whole models (head size 64) decode with the kernel within 2x the error of the PyTorch path against fp32, and
    their CUDA-graph replay equals their eager decode."""
    transformers = pytest.importorskip("transformers")
    from flash_llm.engine import Engine
    from flash_llm.models import from_config

    torch.manual_seed(0)
    if family == "llama":
        hc = transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                      bos_token_id=None, eos_token_id=None, pad_token_id=0)
        hm = transformers.LlamaForCausalLM(hc).eval()
    else:
        hc = transformers.OPTConfig(vocab_size=512, hidden_size=256, ffn_dim=512, num_hidden_layers=2,
                                    num_attention_heads=4, max_position_embeddings=512, dropout=0.0,
                                    bos_token_id=None, eos_token_id=None, pad_token_id=1)
        hm = transformers.OPTForCausalLM(hc).eval()

    def ours(dt):
        m = from_config(hm.config, dtype=dt, device="meta")
        m.load_state_dict({k: x.to("cuda", dt) for k, x in hm.state_dict().items()}, assign=True)
        return m.eval()

    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(2, 512, (n,), generator=g).tolist() for n in (5, 17, 40)]
    monkeypatch.setattr(_common, "DECODE_ATTENTION", "0")  # the PyTorch path (the default "auto" takes the kernel here)
    ref = Engine(ours(torch.float32), max_batch=3, max_seq=200).generate(prompts, 10, output_logits=True)
    plain = Engine(ours(dtype), max_batch=3, max_seq=200).generate(prompts, 10, output_logits=True)
    monkeypatch.setattr(_common, "DECODE_ATTENTION", "1")
    model = ours(dtype)
    got = Engine(model, max_batch=3, max_seq=200).generate(prompts, 10, output_logits=True)
    eager = Engine(model, max_batch=3, max_seq=200, cuda_graphs=False).generate(prompts, 10, output_logits=True)
    assert (got.logits - eager.logits).abs().max().item() == 0.0, "graph replay differs from eager"
    ulp = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[dtype]
    same = [i for i in range(3) if ref.tokens[i].tolist() == plain.tokens[i].tolist() == got.tokens[i].tolist()]
    assert same, "no prompt decoded the same three ways: pick other prompts"
    for i in same:
        err_plain = (plain.logits[i] - ref.logits[i]).abs().max().item()
        err_got = (got.logits[i] - ref.logits[i]).abs().max().item()
        assert err_got <= 2 * err_plain + ulp * ref.logits[i].abs().max().item(), (i, err_got, err_plain)
    assert math.isfinite(err_got)

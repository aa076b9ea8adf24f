"""The decode attention's L2 warm-up of the projections after it (session 71, ``kernels.L2_WARM_MB``): the range
tables (:func:`flash_llm.kernels.l2_warm_ranges`, from each format's ``l2_streams``), which weights follow a layer's
attention, the engine's tables, and on a GPU that the warm-up changes no bit."""

from __future__ import annotations

import types
import warnings

import pytest
import torch

import flash_llm
from flash_llm import kernels
from flash_llm.formats import BitmapTiles, DeltaRows, TiledCSL
from flash_llm.models import _common, from_config, merge_projections
from flash_llm.models._common import after_attention_weights
from flash_llm.prune import magnitude_prune_
from conftest import tiny_hf_model

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _weight(m, k, density, seed, **kw):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, k, generator=g).to(torch.bfloat16)
    w[torch.rand(m, k, generator=g) >= density] = 0
    return w, DeltaRows.from_dense(w, **kw)


def _covered(table: torch.Tensor) -> list[tuple[int, int]]:
    """The table's ranges as ``(start, end)`` addresses, merged where they touch."""
    out: list[list[int]] = []
    for a, n in sorted(table.tolist()):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], a + n)
        else:
            out.append([a, a + n])
    return [tuple(r) for r in out]


def _bytes_in(cov, lo, hi) -> int:
    return sum(max(0, min(b, hi) - max(a, lo)) for a, b in cov)


@pytest.mark.parametrize("kw", [dict(splits=1, parts=4), dict(splits=3), dict(splits=1, parts=16)],
                         ids=["parts4", "split3", "parts16"])
def test_delta_rows_streams_are_its_slices_groups(kw):
    """``l2_streams`` of a DeltaRows weight: ``offsets`` is the head; the walks are each (slice, split)'s groups, in
    order, together exactly the groups of ``data``; what follows the groups (the parts layout's trailer, a coded
    weight's row tables) joins the head."""
    _, w = _weight(200, 256, 0.2, 1, **kw)
    for c in (w, w.code_values()):
        if c is None:
            continue
        head, walks = c.l2_streams()
        assert head[0] == (c.offsets, 0, c.offsets.numel() * 4)
        lay = c.layout
        gw = 128 if lay.coded else 160
        goff = c.offsets[: lay.slices + 1].tolist()
        assert walks[0][1] == 0 and walks[-1][2] == goff[-1] * gw * 4
        assert all(t is c.data for t, _, _ in walks)
        assert all(walks[i][2] == walks[i + 1][1] for i in range(len(walks) - 1))  # contiguous, in order
        assert all(b > a and (a % (gw * 4)) == 0 for _, a, b in walks)
        end, total = goff[-1] * gw * 4, c.data.numel() * 4  # past the groups: the trailer, a coded weight's tables
        assert head[1:] == ([(c.data, end, total)] if total > end else [])
        assert not lay.coded or total - end > 64
        assert len(walks) <= lay.slices * max(lay.splits, 1)


def test_ranges_take_the_first_weight_whole_then_a_share_of_each_walk():
    """The table asks for the first weight's head and walks whole, then the same leading share of every walk of the
    second, within the budget; ranges 16-byte aligned, inside their arrays, no longer than ``piece``."""
    _, o = _weight(128, 256, 0.2, 2, splits=1, parts=4)
    _, up = _weight(512, 256, 0.2, 3, splits=1, parts=4)
    o_bytes, up_bytes = o.nbytes, up.nbytes
    budget = o_bytes + up_bytes // 3
    table = kernels.l2_warm_ranges([o, up], budget, piece=1024)
    assert table.dtype == torch.int64 and table.shape[1] == 2
    assert ((table % 16) == 0).all() and (table[:, 1] > 0).all() and (table[:, 1] <= 1024).all()
    cov = _covered(table)
    total = sum(b - a for a, b in cov)
    assert total <= budget
    for t in (o.data, o.offsets):  # the first weight whole (to 16-byte bounds)
        a = t.data_ptr()
        assert _bytes_in(cov, a, a + t.numel() * 4) >= t.numel() * 4 - 32
    head, walks = up.l2_streams()
    a = up.offsets.data_ptr()
    assert _bytes_in(cov, a, a + up.offsets.numel() * 4) >= up.offsets.numel() * 4 - 32
    base = up.data.data_ptr()
    shares = []
    for _, lo, hi in walks:
        got = _bytes_in(cov, base + lo, base + hi)
        # the leading share: what is covered starts at the walk's start
        assert got == 0 or _bytes_in(cov, base + lo, base + lo + 16) == 16
        shares.append(got / (hi - lo))
    assert 0.05 < min(shares) and max(shares) < 0.6 and max(shares) - min(shares) < 0.2
    everything = kernels.l2_warm_ranges([o, up], 1 << 40)
    assert sum(b - a for a, b in _covered(everything)) >= o_bytes + up_bytes - 32 * (len(walks) + 8)


@pytest.mark.parametrize("fmt", [BitmapTiles, TiledCSL], ids=lambda c: c.__name__)
def test_record_formats_walk_by_record_row(fmt):
    """BitmapTiles and TiledCSL: ``offsets`` is the head, each record row's run of ``data`` a walk (contiguous, in
    order, the whole of ``data``)."""
    w, _ = _weight(130, 200, 0.3, 6)
    c = fmt.from_dense(w)
    head, walks = c.l2_streams()
    assert head == [(c.offsets, 0, c.offsets.numel() * 4)]
    assert len(walks) == c.grid[0] and all(t is c.data for t, _, _ in walks)
    assert walks[0][1] == 0 and walks[-1][2] == c.data.numel() * 4
    assert all(walks[i][2] == walks[i + 1][1] for i in range(len(walks) - 1))


def test_ranges_of_other_formats_and_dense_tensors_and_nothing():
    """Other formats and dense tensors are read whole; no weights or no budget give None; a piece that is not a
    multiple of 16, or over the instruction's 1 MB, is refused."""
    w, dr = _weight(64, 128, 0.3, 4)
    t = TiledCSL.from_dense(w)
    table = kernels.l2_warm_ranges([t, w], 1 << 30)
    cov = _covered(table)
    for x in (*t.tensors().values(), w):
        a, n = x.data_ptr(), x.numel() * x.element_size()
        assert _bytes_in(cov, a, a + n) >= n - 32
    assert kernels.l2_warm_ranges([], 1 << 20) is None
    assert kernels.l2_warm_ranges([dr, None], 0) is None
    with pytest.raises(ValueError, match="piece"):
        kernels.l2_warm_ranges([dr], 1 << 20, piece=1000)
    with pytest.raises(ValueError, match="piece"):
        kernels.l2_warm_ranges([dr], 1 << 20, piece=1 << 20)


def _tiny(family: str, merge: bool):
    hm = tiny_hf_model(family)
    m = from_config(hm.config, dtype=torch.bfloat16, device="meta")
    m.load_state_dict({k: v.to(torch.bfloat16) for k, v in hm.state_dict().items()}, assign=True)
    magnitude_prune_(m, 0.8, filter_fn=lambda mod, fqn: fqn != "lm_head")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        flash_llm.sparsify_(m, flash_llm.SparsifyConfig(format="delta-rows"))
    if merge:
        merge_projections(m)
    return m.eval()


@pytest.mark.parametrize("family,merge", [("llama", False), ("llama", True), ("opt", False)])
def test_the_weights_after_a_layers_attention(family, merge):
    """o (out_proj), then the MLP's first projection(s): gate / up merged or both, fc1."""
    m = _tiny(family, merge)
    layer = m.model.layers[0] if family == "llama" else m.model.decoder.layers[0]
    got = after_attention_weights(layer)
    if family == "llama":
        want = [layer.self_attn.o_proj.weight] + ([layer.mlp.gate_up_proj.layer.weight] if merge else
                                                  [layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight])
    else:
        want = [layer.self_attn.out_proj.weight, layer.fc1.weight]
    assert len(got) == len(want) and all(a.data.data_ptr() == b.data.data_ptr() for a, b in zip(got, want))
    assert all(isinstance(w, DeltaRows) for w in got)
    assert after_attention_weights(torch.nn.Linear(4, 4)) == []


def test_engine_tables_per_layer_built_once_and_kept(monkeypatch):
    """An engine (on CUDA; here its device faked, the tables built from CPU tensors) builds one table a layer for
    the weights after that layer's attention, reuses it while they stay, and builds none with the budget at 0."""
    from flash_llm.engine import Engine

    m = _tiny("llama", True)
    eng = Engine(m, max_batch=1, max_seq=32)
    assert eng._l2_next() is None  # (on the CPU)
    eng.device = types.SimpleNamespace(type="cuda")
    monkeypatch.setattr(kernels, "L2_WARM_MB", 0.0)
    assert eng._l2_next() is None
    monkeypatch.setattr(kernels, "L2_WARM_MB", 1.0)
    tables = eng._l2_next()
    assert len(tables) == len(m.model.layers) and all(t is not None for t in tables)
    for layer, table in zip(m.model.layers, tables):
        o = layer.self_attn.o_proj.weight
        cov = _covered(table)
        a = o.data.data_ptr()
        assert _bytes_in(cov, a, a + o.data.numel() * 4) >= o.data.numel() * 4 - 32
    assert eng._l2_next() is tables


def test_attend_hands_each_layer_its_table(monkeypatch):
    """``decode_attention`` passes ``attend.l2_next[layer]`` to the kernel."""
    seen = {}
    monkeypatch.setattr(kernels, "decode_attention_ok", lambda *a, **k: True)
    monkeypatch.setattr(kernels, "decode_attention_cuda", lambda *a, **k: seen.setdefault("l2", k["l2"]))
    q = torch.zeros(1, 4, 1, 8)
    cache = _common.KVCache(2, 1, 2, 16, 8, torch.float32, "cpu")
    tables = [torch.zeros(1, 2, dtype=torch.int64), torch.ones(3, 2, dtype=torch.int64)]
    attend = _common.Attend(positions=torch.zeros(1, 1, dtype=torch.long), cache=cache,
                            slots=torch.zeros(1, dtype=torch.long), kv_len=4, l2_next=tables)
    _common.decode_attention(q, q[:, :2], q[:, :2], attend, 1, None)
    assert seen["l2"] is tables[1]


def test_a_side_stream_gets_the_warm_up_and_the_attention_none(monkeypatch):
    """With ``attend.l2_stream`` the layer's table goes to :func:`kernels.l2_warm_cuda` on that stream, forked from
    the current one first, and the attention kernel gets no table; a layer without a table forks nothing."""
    calls = []

    class Stream:
        def wait_stream(self, other):
            calls.append(("fork", other))

    class Ctx:
        def __init__(self, stream):
            self.stream = stream

        def __enter__(self):
            calls.append(("enter", self.stream))

        def __exit__(self, *exc):
            calls.append(("exit", self.stream))

    side = Stream()
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: "main")
    monkeypatch.setattr(torch.cuda, "stream", Ctx)
    monkeypatch.setattr(kernels, "decode_attention_ok", lambda *a, **k: True)
    monkeypatch.setattr(kernels, "decode_attention_cuda", lambda *a, **k: calls.append(("attention", k["l2"])))
    monkeypatch.setattr(kernels, "l2_warm_cuda", lambda t: calls.append(("warm", t)))
    q = torch.zeros(1, 4, 1, 8)
    cache = _common.KVCache(2, 1, 2, 16, 8, torch.float32, "cpu")
    tables = [None, torch.ones(3, 2, dtype=torch.int64)]
    attend = _common.Attend(positions=torch.zeros(1, 1, dtype=torch.long), cache=cache,
                            slots=torch.zeros(1, dtype=torch.long), kv_len=4, l2_next=tables, l2_stream=side)
    _common.decode_attention(q, q[:, :2], q[:, :2], attend, 1, None)
    assert calls == [("fork", "main"), ("enter", side), ("warm", tables[1]), ("exit", side), ("attention", None)]
    calls.clear()
    _common.decode_attention(q, q[:, :2], q[:, :2], attend, 0, None)
    assert calls == [("attention", None)]


def test_warm_up_kernel_refuses_what_is_not_a_table_on_a_gpu():
    """:func:`kernels.l2_warm_cuda` names ``l2`` when it is not a CUDA int64 ``[n, 2]`` table (here: on the CPU)."""
    with pytest.raises(ValueError, match="l2 must be a CUDA tensor"):
        kernels.l2_warm_cuda(torch.zeros(4, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="l2 must be a CUDA tensor"):
        kernels.l2_warm_cuda([[0, 16]])


# ---------------------------------------------------------------------------------------------------
# GPU
@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("early", [False, True], ids=["after_wait", "early"])
def test_attention_with_the_warm_up_gives_the_same_bits(early, monkeypatch):
    """The decode attention asking L2 for a weight's ranges (a hint) writes the same output and cache, bit for bit,
    launched plainly and programmatically."""
    import contextlib

    monkeypatch.setattr(kernels, "L2_WARM_EARLY", early)
    _, w = _weight(4096, 1024, 0.2, 5, splits=1, parts=4)
    w = w.to("cuda")
    table = kernels.l2_warm_ranges([w], 8 << 20)
    g = torch.Generator(device="cuda").manual_seed(0)
    b, h, hkv, d, slots, kv_len = 1, 32, 8, 128, 320, 200
    q, k, v = (torch.randn(b, n, 1, d, generator=g, device="cuda", dtype=torch.bfloat16) for n in (h, hkv, hkv))
    kc0 = torch.randn(b, hkv, slots, d, generator=g, device="cuda", dtype=torch.bfloat16)
    vc0 = torch.randn(b, hkv, slots, d, generator=g, device="cuda", dtype=torch.bfloat16)
    mask = torch.zeros(b, 1, 1, kv_len, device="cuda", dtype=torch.bfloat16)
    st = torch.tensor([kv_len - 1], device="cuda")
    outs = []
    for l2, pdl in ((None, False), (table, False), (table, True)):
        kc, vc = kc0.clone(), vc0.clone()
        out = torch.full((b, 1, h * d), float("nan"), dtype=torch.bfloat16, device="cuda")
        with kernels.static_weights() if pdl else contextlib.nullcontext():
            kernels.decode_attention_cuda(q, k, v, kc, vc, st, mask, kv_len, d ** -0.5, out=out, l2=l2)
        torch.cuda.synchronize()
        outs.append((out, kc, vc))
    assert not outs[0][0].isnan().any()
    for o in outs[1:]:
        assert all(torch.equal(x, y) for x, y in zip(o, outs[0]))
    with pytest.raises(ValueError, match="l2"):
        kernels.decode_attention_cuda(q, k, v, kc, vc, st, mask, kv_len, d ** -0.5, l2=table.to(torch.int32))


@cuda
@pytest.mark.gpu
def test_warm_up_kernel_runs_plainly_and_in_a_graph():
    """:func:`kernels.l2_warm_cuda` (the side stream's kernel) launches on a table, eagerly and captured, changes
    nothing it is pointed at, and refuses an int32 table naming ``l2``."""
    _, w = _weight(4096, 1024, 0.2, 5, splits=1, parts=4)
    w = w.to("cuda")
    before = {k: t.clone() for k, t in w.tensors().items()}
    table = kernels.l2_warm_ranges([w], 8 << 20)
    kernels.l2_warm_cuda(table)
    kernels.l2_warm_cuda(table[:0])
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kernels.l2_warm_cuda(table)
    graph.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(t, before[k]) for k, t in w.tensors().items())
    with pytest.raises(ValueError, match="l2"):
        kernels.l2_warm_cuda(table.to(torch.int32))


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("side", [False, True], ids=["inside", "side_stream"])
def test_engine_with_the_warm_up_decodes_the_same_tokens(side, monkeypatch):
    """A sparse Llama engine with the warm-up on (inside the attention, or on a side stream) generates the same
    tokens and logits as with it off (graphs)."""
    from flash_llm.engine import Engine

    monkeypatch.setattr(kernels, "L2_WARM_SIDE", side)
    prompts = [[5, 6, 7, 8, 9]]
    got = {}
    for mb in (0.0, 4.0):
        monkeypatch.setattr(kernels, "L2_WARM_MB", mb)
        m = _tiny("llama", True).to("cuda")
        got[mb] = Engine(m, max_batch=1, max_seq=48).generate(prompts, 8, output_logits=True)
    assert got[0.0].tokens.tolist() == got[4.0].tokens.tolist()
    assert torch.equal(got[0.0].logits, got[4.0].logits)

"""benchmarks/ttft_lengths.py on the CPU: its prompt stream, and its three modes over a tiny model with a stand-in for
the CUDA graph's capture (the tool itself times on a GPU)."""


import pytest
from conftest import load_script

from flash_llm.engine import _PrefillGraph
from flash_llm.models import preset
from flash_llm.models.synthetic import build_synthetic

ttft_lengths = load_script("benchmarks/ttft_lengths.py", "ttft_lengths")


def test_lengths_parse_and_refuse():
    assert ttft_lengths.parse_lengths("64-192") == (64, 192)
    assert ttft_lengths.parse_lengths("128") == (128, 128)
    for bad in ("0-4", "9-3", "a-b", "1-2-3"):
        with pytest.raises(ValueError, match="--lengths"):
            ttft_lengths.parse_lengths(bad)


def test_prompt_stream_is_seeded_and_in_range():
    a = ttft_lengths.draw_prompts(40, 2, (33, 47), 300, seed=3)
    assert a == ttft_lengths.draw_prompts(40, 2, (33, 47), 300, seed=3)
    assert a != ttft_lengths.draw_prompts(40, 2, (33, 47), 300, seed=4)
    lengths = [len(b[0]) for b in a]
    assert all(len(b) == 2 and len(b[1]) == len(b[0]) for b in a)
    assert min(lengths) >= 33 and max(lengths) <= 47 and len(set(lengths)) > 5
    assert all(0 <= t < 300 for b in a for p in b for t in p)


class _Replay:
    def __init__(self, fn):
        self.fn = fn

    def replay(self):
        self.fn()


def test_modes_replay_as_their_graphs_allow(monkeypatch):
    """Over a stream of lengths 33-47, the exact mode replays only repeated lengths, the bucketed one every prompt
    whose bucket (40 or 48) came before; the three give the same first tokens (where the logits' margin is wide)."""
    cfg = preset("llama-3-8b").replace(num_layers=2, hidden_size=128, intermediate_size=320, num_heads=4,
                                       num_kv_heads=2, vocab_size=300, name="tiny-llama")
    model, _ = build_synthetic(cfg, 0.8, device="cpu", progress=False, fmt="delta-rows")
    engs = ttft_lengths.engines(model, 1, 49, dense=True)
    assert list(engs) == [*ttft_lengths.MODES, "dense"] and engs["dense"].prefill_dense_bytes > 0
    assert all(engs[m].prefill_dense_bytes == 0 for m in ttft_lengths.MODES)
    for mode in ("exact", "buckets", "dense"):  # (CPU: no CUDA graphs; a capture whose replay runs the eager prefill)
        eng = engs[mode]
        eng._prefills = {}
        monkeypatch.setattr(eng, "_capture_prefill", lambda ids, mask, eng=eng: _PrefillGraph(
            _Replay(lambda: eng._prefill(ids, mask)), ids, mask))
    stream = ttft_lengths.draw_prompts(12, 1, (33, 47), 300, seed=1)
    res = ttft_lengths.run_modes(engs, stream)
    lengths = [len(b[0]) for b in stream]
    assert res["eager"]["replayed"] == 0 and res["eager"]["graphs"] == []
    assert res["exact"]["replayed"] == len(lengths) - len(set(lengths))
    assert res["exact"]["graphs"] == sorted({(1, n) for n in lengths})
    assert res["buckets"]["graphs"] == sorted({(1, 40 if n <= 40 else 48) for n in lengths})
    assert res["buckets"]["replayed"] == len(lengths) - len(res["buckets"]["graphs"])
    assert res["buckets"]["replayed"] > res["exact"]["replayed"]
    assert res["dense"]["graphs"] == res["buckets"]["graphs"] and res["dense"]["replayed"] == res["buckets"]["replayed"]
    assert res["eager"]["tokens"] == res["exact"]["tokens"]  # (same shapes: bit for bit)
    assert res["eager"]["tokens"] == res["buckets"]["tokens"]  # (fp32: the padding moves the logits by ~1e-6)
    assert res["dense"]["tokens"] == res["buckets"]["tokens"]
    rows = ttft_lengths.summary(res)
    assert [r[0] for r in rows] == [*ttft_lengths.MODES, "dense"]
    assert all(r[1] > 0 and r[3] >= r[1] for r in rows)
    # each call's wall time holds its time to first token (and, where a new shape ran eagerly, the capture after it)
    assert all(len(res[m]["call_ms"]) == len(stream) for m in res)
    assert all(c >= t for m in res for c, t in zip(res[m]["call_ms"], res[m]["ttft_ms"]))
    assert all(r[6] > 0 and abs(r[7] - sum(res[r[0]]["call_ms"])) < 1e-9 for r in rows)

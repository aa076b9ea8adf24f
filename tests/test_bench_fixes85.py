"""Fixes from session 85.

1. Six more benchmark scripts read ``--sparsity`` with ``flash_llm.cli.sparsity_arg``, as session 84's seven do, and
   tp_check reads each of ``--sparsities`` with it (dr_coded's ``sparsities_arg``): 0.8, 80 and 80% all mean 80 %, and
   a value out of range is refused when the arguments are parsed, before any CUDA work.  ttft_lengths, prefill_ab and
   uneven_rows divided a bare number by 100 (``--sparsity 0.8``, the form the other scripts document, built and timed
   a 0.8 %-sparse model); time_across_n and delta_rows_trace took ``80`` as a fraction (an all-zero weight timed,
   "8000%" printed); attn_trace ``--sparsity 80`` and tp_check ``--sparsities 0.8`` died with tracebacks.  Each has a
   ``parse_args(argv)`` now (time_across_n's work, which ran at import, is ``main()``), and their labels give percent.
2. ``synthetic.estimate_bytes``'s ``transient`` counts ``_draw``'s float32 temporaries (a chunk of rows, up to 2**26
   elements): a dense build's were left out (one Llama-3-8B layer: 117 MB estimated, 470 MB of temporaries), so
   ``build_synthetic``'s DoesNotFit check could pass and the build then run out of memory.  ``_draw`` also scales its
   chunk in place and drops it before drawing the next (4 bytes an element, not 8 or 12; the same values bit for bit).
3. ``bench_e2e.py --models ","`` is refused (it measured nothing and wrote empty results, over a real run's with
   ``--overwrite``); ``--models`` and ``--batches`` drop duplicates, keeping their order.
"""

from __future__ import annotations

import contextlib
import io
import json
import types
import weakref

import pytest
import torch
from conftest import REPO, load_script
from test_bench_fixes84 import RANGE, CudaTouched, _no_cuda_work, _refused
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import flash_llm.models.synthetic as S
from flash_llm.models.config import ModelConfig

BENCH = REPO / "benchmarks"
#: the scripts with a --sparsity fixed here (each defaults to 0.8)
SPARSITY_SCRIPTS = ("ttft_lengths", "prefill_ab", "uneven_rows", "time_across_n", "delta_rows_trace", "attn_trace")
#: those that read a bare number as a percentage (0.8 was 0.8 %)
PERCENT_SCRIPTS = ("ttft_lengths", "prefill_ab", "uneven_rows")


class Stop(Exception):
    pass


def _load(name: str, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # (their neighbours: _timing, bench_e2e, ttft_lengths, profile_decode...)
    return load_script(f"benchmarks/{name}.py", f"{name}_fixes85")


# ---- 1. --sparsity 0.8, 80 and 80% are 80 %; out of range refused at parse time, before any CUDA work ------------
@pytest.mark.parametrize("name", SPARSITY_SCRIPTS)
def test_scripts_read_sparsity_as_flash_llm_does(name, capsys, monkeypatch):
    mod = _load(name, monkeypatch)
    assert mod.parse_args([]).sparsity == 0.8  # (was 80.0 in the percent scripts)
    for text in ("80", "0.8", "80%"):  # (was 80.0 / 0.8 / error, or 0.8 / 80.0 / error)
        assert mod.parse_args(["--sparsity", text]).sparsity == pytest.approx(0.8), text
    assert mod.parse_args(["--sparsity", "0"]).sparsity == 0.0
    for text in ("120", "100", "-5", "1", "abc", "nan"):
        err = _refused(capsys, mod.parse_args, ["--sparsity", text])
        assert "argument --sparsity: sparsity must be" in err, (text, err)
    _no_cuda_work(mod, monkeypatch)
    err = _refused(capsys, mod.main, ["--sparsity", "120"])
    assert f"argument --sparsity: {RANGE} (0.5, 50 and 50% all mean 50 %), got '120'" in err, err
    with pytest.raises(CudaTouched):  # (a good value gets as far as the GPU work)
        mod.main(["--sparsity", "80"])


@pytest.mark.parametrize("name", PERCENT_SCRIPTS)
def test_percent_scripts_build_the_sparsity_asked_for(name, monkeypatch):
    """What reaches ``build_synthetic``: 0.8 for 0.8, 80 and 80% (``--sparsity 0.8`` built a 0.8 %-sparse model)."""
    mod = _load(name, monkeypatch)
    seen = []

    def spy(config, sparsity=0.8, **kw):
        seen.append(sparsity)
        raise Stop

    monkeypatch.setattr(S, "build_synthetic", spy)  # (ttft_lengths / uneven_rows import it in main)
    if hasattr(mod, "build_synthetic"):
        monkeypatch.setattr(mod, "build_synthetic", spy)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # (only to get past the check: nothing runs)
    for text in ("0.8", "80", "80%", "0"):
        with pytest.raises(Stop):
            mod.main(["--sparsity", text])
    assert seen[:3] == pytest.approx([0.8] * 3) and seen[3] is None, seen  # (was 0.008, 0.8, error, None)


def test_uneven_rows_cpu_run_builds_and_labels_the_sparsity(monkeypatch, capsys):
    mod = _load("uneven_rows", monkeypatch)
    assert mod.main(["--model", "tiny-llama", "--device", "cpu", "--sparsity", "0.5", "--batch", "2", "--prompt", "4",
                     "--limits", "2-3", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "tiny-llama: 50% sparse (achieved 0.4" in out, out  # (was: 0.005 built, "0.5 %" printed)
    assert "tiny-llama delta-rows 50 % bf16, batch 2" in out, out


def test_time_across_n_is_importable_and_parses_on_cpu(monkeypatch, capsys):
    """time_across_n.py ran at import (its options read from ``sys.argv``); now its work is ``main()``."""
    mod = _load("time_across_n", monkeypatch)  # (was: its whole run at import)
    a = mod.parse_args(["--fmt", "tiled-csl", "--sparsity", "80", "--pdl"])
    assert (a.fmt, a.sparsity, a.pdl) == ("tiled-csl", pytest.approx(0.8), True)  # (80 was kept: an all-zero weight)
    monkeypatch.setattr(mod, "kernels_missing", lambda: "no kernels here")
    with pytest.raises(SystemExit, match="error: no kernels here"):
        mod.main([])


def test_tp_check_reads_each_of_its_sparsities_as_flash_llm_does(capsys, monkeypatch):
    mod = _load("tp_check", monkeypatch)
    assert mod.parse_args([]).sparsities == [0.0, 0.8]
    assert mod.parse_args(["--sparsities", "0, 0.8,90%"]).sparsities == pytest.approx([0.0, 0.8, 0.9])
    for text, says in (("0,120", RANGE), ("80,x", "sparsity must be a fraction in [0, 1) or a percentage"),
                       (",", "no sparsity given in ','")):
        err = _refused(capsys, mod.parse_args, ["--sparsities", text])
        assert f"argument --sparsities: {says}" in err, (text, err)
        assert "Traceback" not in err

    started = []

    @contextlib.contextmanager
    def fake_group(backend=None):  # one rank on the CPU
        started.append(backend)
        yield types.SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu"), barrier=lambda: None)

    seen = []

    def spy(config, sparsity=0.8, **kw):
        seen.append(sparsity)
        raise Stop

    monkeypatch.setattr(mod, "init_tensor_parallel", fake_group)
    monkeypatch.setattr(mod, "build_synthetic", spy)
    err = _refused(capsys, mod.main, ["--sparsities", "0,120"])  # (before the process group starts)
    assert "argument --sparsities:" in err and "got '120'" in err and not started, err
    for text in ("0.8", "80"):  # (0.8 was a ValueError traceback from int(); 80 was right)
        with pytest.raises(Stop):
            mod.main(["--model", "tiny", "--sparsities", text])
    assert seen == pytest.approx([0.8, 0.8])
    # the rows and the table keep giving percent (tests/test_parallel.py's torchrun run: "| 80 % |")
    assert [mod._percent(s) for s in (0.0, 0.8, 0.875, 0.7)] == [0, 80, 87.5, 70]
    assert isinstance(mod._percent(0.8), int)


# ---- 2. estimate_bytes: the draw's float32 temporaries counted; the estimate covers the measured peak ------------
class LiveBytes(TorchDispatchMode):
    """The bytes of the CPU storages made under this mode that are still alive (``cur``), and their peak after any
    operation (``peak``): an allocator's view, as ``torch.cuda.max_memory_allocated`` has (the process' RSS does not
    count ``torch.empty``'s pages until they are written)."""

    def __init__(self):
        super().__init__()
        self.live, self.cur, self.peak = {}, 0, 0

    def _free(self, key):
        self.cur -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                s = t.untyped_storage()
                if id(s) not in self.live:
                    self.live[id(s)] = s.nbytes()
                    self.cur += s.nbytes()
                    weakref.finalize(s, self._free, id(s))
        self.peak = max(self.peak, self.cur)
        return out


SMALL = ModelConfig(family="llama", vocab_size=256, hidden_size=512, num_layers=2, num_heads=8, num_kv_heads=2,
                    intermediate_size=2048, name="small")


def _measured(sparsity, tp=None):
    """``(estimate_bytes(...), the build's peak bytes beyond the weights it ends with)`` for SMALL on the CPU."""
    est = S.estimate_bytes(SMALL, sparsity, tp_size=tp.world_size if tp else 1)
    mode = LiveBytes()
    with mode:
        _, report = S.build_synthetic(SMALL, sparsity, device="cpu", progress=False, tp=tp)
    assert mode.cur == report.weight_bytes  # (the tracker saw every tensor the model holds)
    return est, mode.peak - report.weight_bytes


@pytest.mark.parametrize("chunk", [S._CHUNK, 100_000], ids=["one-chunk", "chunks"])
def test_estimate_covers_a_dense_builds_peak(chunk, monkeypatch):
    monkeypatch.setattr(S, "_CHUNK", chunk)
    largest = max(m * k for _, m, k in SMALL.linear_shapes())  # 2048 x 512
    est, extra = _measured(None)
    # (was: transient = the largest projection's fp16 bytes, 2 MB; the draw held 8 bytes an element of its chunk, 12
    # where there were several: 8 MB and 1.2 MB)
    if chunk > largest:
        assert extra == 4 * largest == est["transient"]  # the draw's one float32 chunk now, nothing else
    else:  # (the peak: the last projection's chunk, 48 rows of 2048, over all the weights; the largest chunk, 195
        # rows of 512, came before the last layer's down_proj was allocated)
        assert extra == 4 * 48 * 2048 and est["transient"] == 4 * 195 * 512 and est["transient"] <= 1.02 * extra


def test_estimate_covers_tensor_parallel_and_sparse_builds():
    tp = types.SimpleNamespace(world_size=2, rank=0, device=torch.device("cpu"))  # (rank 0's build; no collectives)
    est, extra = _measured(None, tp)
    largest = max(m * k for _, m, k in SMALL.linear_shapes())
    assert est["transient"] >= extra > 2 * largest * (1 + 1 / 2)  # (was the estimate: the full draw and a slice)
    for sparsity in (0.5, 0.8):  # (covered before too: the compression's peak is larger than the draw's)
        est, extra = _measured(sparsity)
        assert est["transient"] >= extra, (sparsity, est, extra)
        est, extra = _measured(sparsity, tp)
        assert est["transient"] >= extra, (sparsity, est, extra)


def test_draw_scales_in_place_and_keeps_its_values(monkeypatch):
    """One float32 chunk at a time (in place), the same values as ``randn(...) * std`` drawn chunk by chunk."""
    monkeypatch.setattr(S, "_CHUNK", 7000)  # (rows of 500: 14 a chunk, 22 chunks)
    for density in (1.0, 0.3):
        got = S._draw(300, 500, density, torch.bfloat16, "cpu", torch.Generator().manual_seed(3), 0.02)
        gen = torch.Generator().manual_seed(3)
        want = torch.cat([torch.randn(min(14, 300 - r), 500, generator=gen) * 0.02 for r in range(0, 300, 14)])
        if density < 1:
            t = 0.02 * float(torch.special.ndtri(torch.tensor(1 - density / 2, dtype=torch.float64)))
            want = want.masked_fill(want.abs() < t, 0.0)
        assert torch.equal(got, want.to(torch.bfloat16))
    mode = LiveBytes()
    with mode:
        w = S._draw(300, 500, 1.0, torch.float16, "cpu", torch.Generator().manual_seed(3), 0.02)
    assert mode.peak - w.numel() * 2 == 4 * 14 * 500 == S._draw_temp_bytes(300, 500, True)


# ---- 3. bench_e2e: --models must name one; --models / --batches without duplicates ------------------------------
@pytest.fixture(scope="module")
def e2e():
    import sys

    sys.path.insert(0, str(BENCH))
    try:
        return load_script("benchmarks/bench_e2e.py", "bench_e2e_fixes85")
    finally:
        sys.path.remove(str(BENCH))


@pytest.mark.parametrize("models", [",", "", " , "])
def test_bench_e2e_refuses_no_models_before_writing(e2e, models, tmp_path, capsys):
    out = tmp_path / "e2e"
    out.mkdir()
    (out / "results.json").write_text(json.dumps({"env": {}, "rows": [{"model": "llama-3-8b", "status": "ok"}]}))
    with contextlib.redirect_stdout(io.StringIO()):
        err = _refused(capsys, e2e.main, ["--models", models, "--device", "cpu", "--out", str(out), "--overwrite",
                                          "--no-progress"])
    assert f"--models names no model, got {models!r}; known: [" in err, err
    assert json.loads((out / "results.json").read_text())["rows"] == [{"model": "llama-3-8b", "status": "ok"}]


def test_bench_e2e_drops_duplicates_keeping_the_order(e2e):
    a = e2e.parse_args(["--models", "tiny-llama, tiny-opt,tiny-llama", "--batches", "16,1,16,1,4"])
    assert a.models == ["tiny-llama", "tiny-opt"] and a.batches == [16, 1, 4]  # (was [.., tiny-llama], [16,1,16,1,4])
    a = e2e.parse_args(["--models", "tiny-llama", "--sparsities", "80,0,80"])
    assert a.sparsities == [0, 80]  # (as before)

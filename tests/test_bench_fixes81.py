"""Fixes from session 81's review of the benchmark scripts, on the CPU: bench_e2e's floor with the KV cache's bytes,
the rotations of dr_coded / dr_layouts / time_across_n past 3x L2, ``_timing.time_calls``'s time-based warm-up and
replays, ``demo --layer``'s L2 flush by reading, bench_spmm's plot per dtype, the shared guard against timing the
PyTorch reference, and the environment's ``l2_mib``."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import _timing as T  # noqa: E402

from flash_llm import cli, kernels  # noqa: E402

MIB = 1 << 20


def _load(rel: str, name: str):
    return load_script(f"benchmarks/{rel}", f"{name}_fixes81")


# ---- 1. bench_e2e: the floor with the KV cache's least bytes beside the weights-only floor ----------------
@pytest.fixture(scope="module")
def e2e():
    return _load("bench_e2e.py", "bench_e2e")


def test_kv_read_bytes_is_the_mean_of_the_positions_each_step_attends(e2e):
    cfg = e2e.TINY["tiny-llama"]  # 2 layers, 2 KV heads of 32
    assert (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim) == (2, 2, 32)
    # 4 new tokens: the prefill gives the first, 3 decode steps hold 5 + 1, 5 + 2, 5 + 3 positions: 7 on average
    per_position = 2 * 2 * 3 * 2 * 32 * 2  # K and V x layers x batch x KV heads x head_dim x fp16's bytes
    assert e2e.kv_read_bytes(cfg, 3, 5, 4, 2) == pytest.approx(7 * per_position)
    assert e2e.kv_read_bytes(cfg, 3, 5, 2, 2) == pytest.approx(6 * per_position)  # one decode step
    assert e2e.kv_read_bytes(cfg, 1, 128, 128, 2) == pytest.approx((128 + 64) * per_position / 3)
    opt = e2e.TINY["tiny-opt"]  # no GQA: KV heads = heads
    assert e2e.kv_read_bytes(opt, 1, 1, 3, 4) == pytest.approx(2.5 * 2 * 2 * 1 * 4 * 32 * 4)


def test_kv_floor_adds_the_cache_to_the_weights(e2e):
    got = e2e.kv_floor(3_000_000, 1_000_000.0, 2e12, tpot_mean_ms=0.004)
    assert got["kv_read_bytes"] == 1_000_000.0
    assert got["floor_kv_ms"] == pytest.approx(1e3 * 4e6 / 2e12)  # 0.002 ms
    assert got["floor_kv_pct"] == pytest.approx(50.0)
    assert "floor_kv_pct" not in e2e.kv_floor(1, 1.0, 1.0)


def test_bench_e2e_rows_and_log_carry_the_kv_floor(e2e, tmp_path, capsys):
    argv = ["--device", "cpu", "--models", "tiny-llama", "--sparsities", "80", "--batches", "2", "--prompt", "4",
            "--new", "4", "--repeats", "1", "--no-progress", "--no-hf", "--out", str(tmp_path)]
    assert e2e.main(argv) == 0
    log = capsys.readouterr().out
    data = json.loads((tmp_path / "results.json").read_text())
    cfg, bw = e2e.TINY["tiny-llama"], data["env"]["copy_bw_Bps"]
    rows = [r for r in data["rows"] if r["status"] == "ok"]
    assert len(rows) == 2  # dense and 80 %
    for r in rows:
        # the floor as it was: weights over the copy bandwidth
        assert r["floor_ms"] == pytest.approx(1e3 * r["read_bytes"] / bw)
        assert r["floor_pct"] == pytest.approx(100 * r["floor_ms"] / r["tpot_mean_ms"])
        assert r["kv_read_bytes"] == pytest.approx(e2e.kv_read_bytes(cfg, 2, 4, 4, 2))  # fp16
        assert r["floor_kv_ms"] == pytest.approx(1e3 * (r["read_bytes"] + r["kv_read_bytes"]) / bw)
        assert r["floor_kv_pct"] == pytest.approx(100 * r["floor_kv_ms"] / r["tpot_mean_ms"])
        assert r["floor_kv_ms"] > r["floor_ms"]
        assert f"with KV {r['floor_kv_ms']:.3f} ms, {r['floor_kv_pct']:.0f} %)" in log
    for field in ("kv_read_bytes", "floor_kv_ms", "floor_kv_pct", "decode_kv_len"):
        assert field in e2e.__doc__


# ---- 2. dr_coded / dr_layouts: max(--layers, the copies 3x L2 needs) a kind, the rotated bytes reported -----------
def test_layers_to_rotate():
    assert T.layers_to_rotate(8, 100 * MIB, min_total=150 * MIB) == 8
    assert T.layers_to_rotate(8, int(7.8e6), min_total=3 * 60 * MIB) == 25  # the coded o at 80 % on an H200
    assert T.layers_to_rotate(1, 150 * MIB, min_total=150 * MIB) == 1


@pytest.fixture(scope="module")
def coded():
    return _load("dr_coded.py", "dr_coded")


def test_dr_coded_rotates_each_kind_past_3x_l2_by_its_smaller_bytes(coded):
    # the session-54 numbers: o at 80 % is 9.7 / 7.8 MB plain / coded; 8 layers of coded were 0.99x an H200's L2
    assert coded.kind_layers(8, int(9.7e6), int(7.8e6), min_total=3 * 60 * MIB) == 25
    assert coded.kind_layers(8, int(7.8e6), int(9.7e6), min_total=3 * 60 * MIB) == 25
    assert coded.kind_layers(8, int(68e6), int(55e6), min_total=3 * 60 * MIB) == 8  # gate / up: --layers


def test_dr_coded_build_draws_the_extra_weights(coded, monkeypatch):
    gen = torch.Generator().manual_seed(0)

    def pruned(m, k, sparsity, gen):  # (on the CPU, values within a few exponents so they code)
        w = (1 + torch.rand(m, k, generator=gen)) * torch.where(torch.rand(m, k, generator=gen) < 0.5, -1.0, 1.0)
        return w.masked_fill_(torch.rand(m, k, generator=gen) < sparsity, 0.0).to(torch.bfloat16)

    monkeypatch.setattr(coded, "pruned", pruned)
    monkeypatch.setattr(coded, "auto_parts", lambda *a, **k: 1)
    monkeypatch.setattr(coded, "KINDS", [("qkv", 192, 256, "norm", True), ("o", 64, 64, "resid", False)])
    monkeypatch.setattr(T, "l2_bytes", lambda device=None: 64 << 10)  # 3x L2: 192 KiB
    ws = coded.build(0.5, 2, gen)
    for kind, (plain, coded_ws) in ws.items():
        smaller = min(plain[0].nbytes, coded_ws[0].nbytes)  # (the count from the first weight's: the others' alike)
        assert coded_ws[0].nbytes < plain[0].nbytes
        assert len(plain) == len(coded_ws) == max(2, -(-(192 << 10) // smaller)), kind
        assert len({id(w.data) for w in plain}) == len(plain)  # each its own weight
        got = coded.rotated(ws, kind, len(plain))
        assert got == [sum(w.nbytes for w in v) for v in (plain, coded_ws)] and min(got) >= 0.9 * (192 << 10)
    assert len(ws["o"][0]) > len(ws["qkv"][0]) > 2
    assert [len(v[0]) for v in coded.build(0.5, 2, gen, rotate=False).values()] == [2, 2]  # (--check-only)


@pytest.fixture(scope="module")
def layouts():
    return _load("dr_layouts.py", "dr_layouts")


def test_dr_layouts_plan_per_kind_and_for_the_layer(layouts, monkeypatch):
    monkeypatch.setattr(layouts, "DEVICE", "cpu")
    spec = {"H": 64, "bias": False, "kinds": [("qkv", 192, 64, "norm", "h", "q"), ("o", 64, 64, "resid", "attn", "h")]}
    lay = layouts.build(spec, 0.8, torch.Generator().manual_seed(0), {})
    small = {k: min(lay[k][0].nbytes, lay[k][1].nbytes) for k in ("qkv", "o")}
    total = 64 << 10
    plan = layouts.rotation_plan(lay, ["qkv", "o"], 2, min_total=total)
    assert plan["qkv"] == max(2, -(-total // small["qkv"])) and plan["o"] == max(2, -(-total // small["o"]))
    assert plan["qkv+o"] == max(2, -(-total // (small["qkv"] + small["o"])))
    assert plan["o"] > plan["qkv"] >= plan["qkv+o"] > 2
    assert layouts.rotation_plan(lay, ["o"], 2, min_total=total) == {"o": plan["o"]}  # (--sweep: one kind)
    assert layouts.rotation_plan(lay, ["qkv", "o"], 10 ** 6, min_total=total) == dict.fromkeys(plan, 10 ** 6)
    assert layouts.rotated_mb([lay, lay], ["qkv", "o"], 1) == pytest.approx(
        2 * (lay["qkv"][1].nbytes + lay["o"][1].nbytes) / 1e6)


# ---- 3. time_across_n: the graph calls every copy, each as often ----------------------------------------------
@pytest.mark.parametrize("copies, calls", [(1, 10), (3, 12), (10, 10), (12, 12), (18, 18), (34, 34), (0, 10)])
def test_graph_calls_cover_every_copy(copies, calls):
    assert T.graph_calls(10, copies) == calls
    n = max(1, copies)
    seen = [i % n for i in range(7, 7 + calls)]  # (rotating() starts wherever the warm-up left it)
    assert calls >= 10 and calls % n == 0 and {seen.count(c) for c in range(n)} == {calls // n}


def test_time_across_n_uses_graph_calls():
    src = (ROOT / "benchmarks" / "time_across_n.py").read_text()
    assert "graph_calls(REPS, len(fs))" in src and "graph_calls(REPS, len(ws))" in src
    assert "/ calls" in src and "/ REPS" not in src


# ---- 4. time_calls: a time-based warm-up, at least 30 samples where one copy rotates -----------------------------
def test_warm_up_runs_at_least_the_calls_and_the_seconds():
    now = [0.0]

    def step():
        now[0] += 0.01

    assert T.warm_up(step, 2, 0.2, clock=lambda: now[0]) == 20
    now[0] = 0.0
    assert T.warm_up(step, 50, 0.2, clock=lambda: now[0]) == 50
    synced = []
    assert T.warm_up(lambda: None, 3, 0.0, sync=lambda: synced.append(1)) == 3 and len(synced) == 3


def test_timed_replays():
    def f():
        pass

    def g():
        pass

    assert T.timed_replays([f], 10) == T.SINGLE_COPY_REPLAYS == 30
    assert T.timed_replays([f] * 6, 10) == 30  # the same callable repeated: nothing rotates
    assert T.timed_replays([f], 50) == 50
    assert T.timed_replays([f, g], 10) == 10


class _FakeCuda:
    """torch.cuda's pieces time_calls uses: a replay takes 1 ms of (host) time, every event pair 2 ms."""

    def __init__(self):
        self.replays = 0
        self.calls = 0

    def install(self, mp):
        cuda = torch.cuda
        outer = self

        class Stream:
            def wait_stream(self, other):
                pass

        class Graph:
            def replay(self):
                outer.replays += 1
                time.sleep(0.001)

        class Event:
            def __init__(self, enable_timing=False):
                pass

            def record(self):
                pass

            def synchronize(self):
                pass

            def elapsed_time(self, other):
                return 2.0

        mp.setattr(cuda, "Stream", Stream)
        mp.setattr(cuda, "current_stream", lambda: Stream())
        mp.setattr(cuda, "stream", lambda s: contextlib.nullcontext())
        mp.setattr(cuda, "graph", lambda g: contextlib.nullcontext())
        mp.setattr(cuda, "CUDAGraph", Graph)
        mp.setattr(cuda, "Event", Event)
        mp.setattr(cuda, "synchronize", lambda device=None: None)
        return self


def test_time_calls_warms_up_for_the_seconds_and_samples_30_single_calls(monkeypatch):
    fake = _FakeCuda().install(monkeypatch)
    monkeypatch.setattr(T, "WARMUP_S", 0.05)
    calls = []
    t0 = time.perf_counter()
    got = T.time_calls([lambda: calls.append(1)])  # (the interface as before: fns, replays=10, warmup=2)
    assert time.perf_counter() - t0 >= 0.05
    assert got == pytest.approx(2e-3)
    assert fake.replays >= 30 + 2 + 10  # the timed 30, and the warm-up's 0.05 s of 1 ms replays
    assert len(calls) == 2 + 1  # the eager warm-up passes and the capture

    fake.replays = 0
    monkeypatch.setattr(T, "WARMUP_S", 0.0)
    assert T.time_calls([lambda: None, lambda: None], replays=7, warmup=4) == pytest.approx(1e-3)  # per call
    assert fake.replays == 4 + 7  # two copies: the replays asked for; the warm-up's minimum of calls


# ---- 5. demo --layer: the L2 flush reads its buffer ---------------------------------------------------------------
def test_demo_flush_reads_instead_of_writing(monkeypatch):
    flush = torch.ones(4096)
    total = flush.new_zeros(())
    before = flush._version
    cli._flush_l2(flush, total)
    assert flush._version == before and float(total) == 4096.0

    events = []

    class Event:
        def __init__(self, enable_timing=False):
            events.append(self)

        def record(self):
            pass

        def elapsed_time(self, other):
            return 0.005

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: None, raising=False)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    read = []
    monkeypatch.setattr(cli, "_flush_l2", lambda buf, out: read.append(buf))
    ran = []
    assert cli._cuda_median_us(lambda: ran.append(1), flush, 2, 3) == pytest.approx(5.0)
    assert len(read) == 5 and all(b is flush for b in read) and len(ran) == 5 and len(events) == 6
    assert flush._version == before  # nothing wrote it
    assert "zero_()" not in Path(cli.__file__).read_text().split("def _cuda_median_us")[1].split("\ndef ")[0]


def test_demo_flush_buffer_is_twice_l2(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(L2_cache_size=1 << 16))
    buf = cli._l2_flush_buffer(torch.device("cpu"))
    assert buf.numel() * buf.element_size() == 2 << 16 and not buf.any()


# ---- 7. bench_spmm's plot: one panel per format and dtype, the dtype in its title -------------------------------
def _spmm_row(fmt, dtype, sp, n, x):
    return {"format": fmt, "dtype": dtype, "sparsity": sp, "N": n, "speedup_spmm": x}


def test_bench_spmm_plot_has_a_panel_per_dtype(monkeypatch, tmp_path):
    spmm = _load("bench_spmm.py", "bench_spmm")
    rows = [_spmm_row(f, d, sp, n, {"fp16": 2.0, "bf16": 3.0}[d]) for d in ("fp16", "bf16")
            for f in ("bitmap", "tiled-csl", "delta-rows") for sp in (0.5, 0.8) for n in (1, 8)]
    assert spmm.plot_panels(rows) == (["bitmap", "tiled-csl", "delta-rows"], ["fp16", "bf16"])

    class Ax:
        def __init__(self):
            self.title, self.lines = None, []

        def plot(self, xs, ys, **kw):
            self.lines.append(list(ys))

        def set_title(self, t):
            self.title = t

        def __getattr__(self, name):  # axhline, set_xscale, set_xlabel, set_ylabel, legend
            return lambda *a, **k: None

    grid = []

    def subplots(r, c, **kw):
        grid[:] = [[Ax() for _ in range(c)] for _ in range(r)]
        return types.SimpleNamespace(tight_layout=lambda: None, savefig=lambda *a, **k: None), grid

    mpl = types.ModuleType("matplotlib")
    mpl.use = lambda backend: None
    plt = types.ModuleType("matplotlib.pyplot")
    plt.subplots = subplots
    mpl.pyplot = plt
    monkeypatch.setitem(sys.modules, "matplotlib", mpl)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", plt)
    spmm.plot(rows, str(tmp_path / "speedup.png"))
    assert [[ax.title.split(":")[0] for ax in r] for r in grid] == [
        ["bitmap fp16", "tiled-csl fp16", "delta-rows fp16"], ["bitmap bf16", "tiled-csl bf16", "delta-rows bf16"]]
    assert grid[0][0].lines == [[2.0, 2.0]] * 2 and grid[1][2].lines == [[3.0, 3.0]] * 2


# ---- 8. the shared guard: no timing of the PyTorch reference as the sparse kernel ------------------------------
def test_kernels_missing(monkeypatch):
    assert "is not a CUDA device" in T.kernels_missing("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(kernels, "supported", lambda device: (False, "cuda-python is not installed"))
    why = T.kernels_missing()
    assert "PyTorch reference" in why and "cuda-python is not installed" in why
    monkeypatch.setattr(kernels, "supported", lambda device: (True, ""))
    assert T.kernels_missing() == ""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "no CUDA device" in T.kernels_missing()


@pytest.fixture
def no_kernels(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(kernels, "supported", lambda device: (False, "cuda-python is not installed"))


def test_dr_parts_tokens_refuses_without_the_kernels(no_kernels, monkeypatch):
    bench = _load("dr_parts_tokens.py", "dr_parts_tokens")
    monkeypatch.setattr(sys, "argv", ["dr_parts_tokens.py"])
    with pytest.raises(SystemExit) as e:
        bench.main()
    assert "PyTorch reference" in str(e.value) and "cuda-python is not installed" in str(e.value)


def test_dense_drift_refuses_without_the_kernels(no_kernels, capsys):
    bench = _load("diag/dense_drift.py", "dense_drift")
    assert bench.main([]) == 2
    err = capsys.readouterr().err
    assert "PyTorch reference" in err and "cuda-python is not installed" in err


def test_time_across_n_refuses_without_the_kernels():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "time_across_n.py")], capture_output=True,
                       text=True, env=env, cwd=ROOT, timeout=300)
    assert p.returncode != 0 and "PyTorch reference" in p.stderr and "no CUDA device" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr


# ---- minor: the environment's L2 is named for its unit ------------------------------------------------------------
def test_environment_l2_is_mib():
    env = T.environment("cpu")
    assert env["l2_mib"] == 0 and "l2_mb" not in env

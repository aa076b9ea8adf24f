"""Fixes from session 88's review of the benchmark scripts and the demos' timing, on the CPU (CUDA's pieces faked
where the defect is which device, or how many collectives, the timing code makes).

1. ``bench_e2e.py --tp`` on CUDA: ``allreduce_ms_per_step`` times NCCL all-reduces with ``_timing.time_calls``, whose
   warm-up (since session 81) replayed the graph until each rank's own clock passed 0.2 s.  Ranks that start it
   apart (a capture of different length) made different numbers of replays: all-reduces left without a partner (a
   hang, or all-reduces matched with the all-gather that follows).  ``time_calls(agree=...)`` warms up in rounds
   whose counts the ranks agree on (``_timing.warm_up_agreed``; ``bench_e2e._largest_over``: the largest over the
   group); one process times as before.
2. ``flash-llm demo --layer --device cuda:N`` recorded its CUDA events, GPU sleep and synchronize on the current
   device (0) while the timed work ran on cuda:N: the times were device 0's idle stream.  ``cmd_demo`` makes the
   device current (``cli._on_device``); so does the model demo, whose decode speed the engine times with CUDA events.
3. ``bench_e2e.py --device cuda:N`` measured the bandwidth floor's copy bandwidth on the current device (0):
   ``_timing.copy_bandwidth(device=)``, and the single-process run makes the device current.
4. ``bench_spmm.py`` kept duplicates in ``--ns`` / ``--models`` / ``--formats`` / ``--dtypes`` / ``--sparsities``
   (points timed twice and counted twice in the medians); they are dropped in order, as bench_e2e.py's lists.
5. ``accuracy.py``'s pruning time of ``magnitude`` included a forward pass over the calibration sequences that only
   measured each layer's error for a report the script does not use (magnitude-global's did not): the pruning call
   is timed alone now; ACCURACY.md carries a note.
6. ``accuracy.py --quiet`` still printed the bars of sparsegpt, owl-* and magnitude's calibration pass.
7. ``bench_formats.py``'s docstring said "every format" though DeltaRows is not timed.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import socket
import sys
import threading
import time
import types
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from conftest import load_script
from test_accuracy_bench import tiny_model  # noqa: F401  (a small byte-level Llama's directory)
from test_bench_fixes82 import _run, dry_spmm, spmm  # noqa: F401  (the fixtures: a CPU dry run of bench_spmm)

import flash_llm
from flash_llm import cli, kernels
from flash_llm import demo as demo_mod

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))
import _timing as T  # noqa: E402  (the module bench_e2e.py imports as its T)


class Stop(Exception):
    pass


@pytest.fixture(scope="module")
def e2e():
    return load_script("benchmarks/bench_e2e.py", "bench_e2e_fixes88")


@pytest.fixture(scope="module")
def accuracy():
    return load_script("benchmarks/accuracy.py", "accuracy_fixes88")


@pytest.fixture
def current_device(monkeypatch):
    """CUDA "available" with a current device (``[index]``, 0 at first) that a fake ``torch.cuda.device`` context
    sets while it is open, as torch's does."""
    cur = [0]

    @contextlib.contextmanager
    def device(d):
        prev, cur[0] = cur[0], torch.device(d).index
        try:
            yield
        finally:
            cur[0] = prev

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device", device)
    return cur


# ---- 1. bench_e2e --tp: every rank replays the all-reduce graph as often ------------------------------------------
class _Ranks:
    """Threads as the ranks of a group: a collective returns when every rank has made its own (a barrier, as NCCL's
    wait for their partners), and each rank logs the collectives it made, in order."""

    def __init__(self, world: int = 2):
        self.world = world
        self.barrier = threading.Barrier(world, timeout=3.0)
        self.values = {}
        self.log = [[] for _ in range(world)]
        self.local = threading.local()  # .graph: the graph this thread captures into

    def collective(self, rank: int, kind: str, value=None) -> list:
        i = len(self.log[rank])
        self.log[rank].append(kind)
        self.values[rank, i] = value
        self.barrier.wait()
        return [self.values[r, i] for r in range(self.world)]


class _FakeTP:
    """``TensorParallel``'s collectives over :class:`_Ranks`; an all-reduce made while a graph captures runs at
    each replay of that graph (as a captured NCCL all-reduce)."""

    def __init__(self, ranks: _Ranks, rank: int):
        self.ranks, self.rank, self.world_size = ranks, rank, ranks.world
        self.device = torch.device("cuda", rank)

    def all_reduce_(self, t):
        op = lambda: self.ranks.collective(self.rank, "all_reduce")  # noqa: E731
        graph = getattr(self.ranks.local, "graph", None)
        if graph is not None:
            graph.ops.append(op)
        else:
            op()
        return t

    def all_gather_object(self, obj) -> list:
        return self.ranks.collective(self.rank, "all_gather_object", obj)


def _fake_graphs(mp, ranks: _Ranks, capture_s: dict) -> None:
    """torch.cuda's pieces ``time_calls`` uses: a graph replays the collectives captured into it; rank r's capture
    takes ``capture_s[r]`` seconds more (host work of different length on each rank)."""
    cuda = torch.cuda

    class Stream:
        def wait_stream(self, other):
            pass

    class Graph:
        def __init__(self):
            self.ops = []

        def replay(self):
            for op in self.ops:
                op()

    @contextlib.contextmanager
    def graph(g):
        ranks.local.graph = g
        try:
            yield
        finally:
            ranks.local.graph = None
            time.sleep(capture_s[ranks.local.rank])

    class Event:
        def __init__(self, enable_timing=False):
            pass

        def record(self, stream=None):
            pass

        def synchronize(self):
            pass

        def elapsed_time(self, other):
            return 0.5

    mp.setattr(cuda, "Stream", Stream)
    mp.setattr(cuda, "current_stream", lambda device=None: Stream())
    mp.setattr(cuda, "stream", lambda s: contextlib.nullcontext())
    mp.setattr(cuda, "graph", graph)
    mp.setattr(cuda, "CUDAGraph", Graph)
    mp.setattr(cuda, "Event", Event)
    mp.setattr(cuda, "synchronize", lambda device=None: None)


def test_tp_allreduce_timing_replays_alike_on_every_rank(e2e, monkeypatch):
    """Two ranks time the step's all-reduces on "CUDA", rank 1's capture 30 ms longer: both make the same
    collectives in the same order, none is left without a partner (was: rank 1 made more warm-up replays, and its
    last all-reduces waited for a partner that had gone on)."""
    ranks = _Ranks()
    _fake_graphs(monkeypatch, ranks, {0: 0.0, 1: 0.03})
    monkeypatch.setattr(T, "WARMUP_S", 0.05)
    assert e2e.T is T
    fake_torch = types.ModuleType("torch")
    fake_torch.__getattr__ = lambda name: getattr(torch, name)  # (module __getattr__: the rest is torch's)
    fake_torch.zeros = lambda *a, device=None, **k: torch.zeros(*a, **k)  # (x "on cuda:r": on the CPU here)
    monkeypatch.setattr(e2e, "torch", fake_torch)
    cfg = types.SimpleNamespace(num_layers=2, hidden_size=8)
    got, errors = {}, {}

    def rank(r):
        ranks.local.rank = r
        try:
            got[r] = e2e.allreduce_ms_per_step(_FakeTP(ranks, r), 1, cfg, torch.float32)
        except BaseException as e:  # (a broken barrier: a collective without its partner)
            errors[r] = e
            ranks.barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert ranks.log[0] == ranks.log[1], [len(x) for x in ranks.log]
    replays = ranks.log[0].count("all_reduce") // (2 * cfg.num_layers) - 2  # (less the eager warm-up pass x 2)
    assert replays >= T.SINGLE_COPY_REPLAYS + 2  # the timed replays, and a warm-up of at least its calls
    assert got[0] == got[1] == (pytest.approx(0.5), "cuda graph")  # (ms per step: an event pair's 0.5 ms)


def test_warm_up_agreed_alone_is_warm_up():
    """One rank (``agree`` returns its own count): at least ``calls`` and until the clock passes ``seconds``."""
    now = [0.0]

    def step():
        now[0] += 0.01

    assert 20 <= T.warm_up_agreed(step, 2, 0.2, agree=lambda n: n, clock=lambda: now[0]) <= 22
    now[0] = 0.0
    assert T.warm_up_agreed(step, 50, 0.2, agree=lambda n: n, clock=lambda: now[0]) == 50
    synced = []
    assert T.warm_up_agreed(lambda: None, 3, 0.0, agree=lambda n: n, sync=lambda: synced.append(1)) == 3
    assert len(synced) == 3


def _gloo_rank(rank: int, port: int, delays: list, seconds: float, out: str) -> None:
    """One rank of :func:`test_warm_up_agreed_over_gloo`: all-reduces as the warm-up's step, the count agreed by
    ``bench_e2e._largest_over``."""
    import importlib.util

    import torch.distributed as dist

    from flash_llm.parallel import TensorParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=20))
    try:
        sys.path.insert(0, str(BENCH))
        spec = importlib.util.spec_from_file_location("bench_e2e_gloo88", BENCH / "bench_e2e.py")
        e2e = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(e2e)
        tp = TensorParallel(None, "cpu")
        x = torch.ones(4)
        time.sleep(delays[rank])  # (this rank starts its warm-up later)
        t0 = time.perf_counter()
        n = e2e.T.warm_up_agreed(lambda: tp.all_reduce_(x), 2, seconds, e2e._largest_over(tp))
        took = time.perf_counter() - t0
        counts = tp.all_gather_object(n)
        Path(out, f"{rank}.json").write_text(json.dumps({"counts": counts, "took": took}))
    finally:
        dist.destroy_process_group()


def test_warm_up_agreed_over_gloo(tmp_path):
    """Two gloo ranks, rank 1 starting 50 ms late: the same number of all-reduces on both, each for at least the
    seconds asked on its own clock."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.spawn(_gloo_rank, args=(port, [0.0, 0.05], 0.1, str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1):
        assert time.monotonic() < deadline, "the gloo ranks did not finish"
    res = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    assert res[0]["counts"] == res[1]["counts"]
    a, b = res[0]["counts"]
    assert a == b >= 2
    assert all(r["took"] >= 0.1 for r in res), res


def test_single_process_time_calls_does_not_agree(monkeypatch):
    """Without ``agree``, ``time_calls`` warms up with ``warm_up`` as before (no collective)."""
    ranks = _Ranks(1)
    ranks.local.rank = 0
    _fake_graphs(monkeypatch, ranks, {0: 0.0})
    monkeypatch.setattr(T, "WARMUP_S", 0.0)
    used = []
    monkeypatch.setattr(T, "warm_up_agreed", lambda *a, **k: used.append("agreed"))
    real = T.warm_up
    monkeypatch.setattr(T, "warm_up", lambda *a, **k: used.append("own") or real(*a, **k))
    T.time_calls([lambda: None])
    assert used == ["own"]


# ---- 2. demo --layer / demo --device cuda:N: the device is current while it is timed -------------------------------
def test_demo_layer_times_on_the_device_asked(current_device, monkeypatch):
    log = []

    class Event:
        def __init__(self, enable_timing=False):
            pass

        def record(self, stream=None):  # (torch's default: the current device's current stream)
            log.append(("event", current_device[0]))

        def elapsed_time(self, other):
            return 0.001

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: log.append(("sleep", current_device[0])), raising=False)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: log.append(
        ("synchronize", current_device[0] if device is None else torch.device(device).index)))
    monkeypatch.setattr(kernels, "supported", lambda device: (False, "(faked)"))  # (no NVRTC compile)

    def layer_demo(args, device, sparsities, timing_ok, timing_why):  # the timing the real one does on the GPU
        cli._gpu_warmup([lambda: log.append(("work", device.index))], seconds=1e-3)
        cli._cuda_median_us(lambda: log.append(("work", device.index)), torch.zeros(16), warmup=1, repeat=2)
        return 0

    monkeypatch.setattr(cli, "_layer_demo", layer_demo)
    assert cli.main(["demo", "--layer", "--device", "cuda:1", "--shape", "64x64", "--tokens", "4"]) == 0
    assert {kind for kind, _ in log} == {"event", "sleep", "synchronize", "work"}
    assert {d for _, d in log} == {1}, log  # (was: events, sleep and synchronize on device 0)
    assert current_device[0] == 0  # (put back afterwards)


def test_model_demo_runs_on_the_device_asked(current_device, monkeypatch):
    seen = []

    def load_model(*a, device=None, **k):
        seen.append((device, current_device[0]))
        raise Stop

    monkeypatch.setattr(demo_mod, "load_model", load_model)
    with pytest.raises(Stop):
        cli.main(["demo", "--device", "cuda:1", "--method", "magnitude"])
    assert seen == [(torch.device("cuda:1"), 1)]  # (was: current device 0; the engine's events timed device 0)


# ---- 3. bench_e2e --device cuda:N: the copy bandwidth and the run on GPU N --------------------------------------
def test_e2e_copy_bandwidth_on_the_device_asked(e2e, current_device, monkeypatch):
    seen = []
    real_empty = torch.empty

    def empty(*shape, device=None, **kw):
        seen.append(("buffer", str(device), current_device[0]))
        return real_empty(4, **kw)

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(T, "time_calls", lambda fns, **k: seen.append(("timed", "", current_device[0])) or 1.0)
    assert e2e.copy_bandwidth(torch.device("cuda:1")) == 2 * 4 * 4 / 1.0
    assert seen == [("buffer", "cuda:1", 1), ("timed", "", 1), ("timed", "", 1)], seen  # (was: "cuda", device 0)
    with pytest.raises(ValueError, match="copy_bandwidth: device must be a CUDA device, got cpu"):
        T.copy_bandwidth(device="cpu")


def test_e2e_run_on_the_device_asked(e2e, current_device, monkeypatch, tmp_path):
    seen = []

    def environment(device=None):
        seen.append((device, current_device[0]))
        raise Stop

    monkeypatch.setattr(e2e, "_no_kernels", lambda device, sparsities: "")
    monkeypatch.setattr(T, "environment", environment)
    with pytest.raises(Stop):
        e2e.main(["--device", "cuda:1", "--models", "tiny-llama", "--out", str(tmp_path)])
    assert seen == [(torch.device("cuda:1"), 1)]  # (was: current device 0 for the engine and the copy bandwidth)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit):
        e2e.parse_args(["--help"])
    assert "cuda (default), cuda:N or cpu" in " ".join(buf.getvalue().split())


# ---- 4. bench_spmm: duplicates in its lists are run once ---------------------------------------------------------
def test_bench_spmm_drops_duplicates_in_order(dry_spmm, tmp_path):  # noqa: F811
    import argparse

    assert dry_spmm.ns_arg("8,1,8, 1,16") == [8, 1, 16]
    assert dry_spmm._items(argparse.ArgumentParser(), "--models", "OPT-30B,Llama-3-8B,OPT-30B",
                           dry_spmm.LAYERS) == ["OPT-30B", "Llama-3-8B"]
    rows = _run(dry_spmm, tmp_path, "--models", "Llama-3-8B,Llama-3-8B", "--formats", "bitmap,bitmap",
                "--dtypes", "fp16,fp16", "--ns", "1,8,1", "--sparsities", "80,80,080")
    points = [(r["model"], r["layer"], r["dtype"], r["format"], r["sparsity"], r["N"]) for r in rows]
    assert len(points) == len(set(points)) == 2  # (was 2 x 2 x 2 x 3 x 3 rows for the 2 points)
    assert [r["N"] for r in rows] == [1, 8]
    check = next(c for c in dry_spmm.target_checks(rows) if "bitmap fp16 80 % N = 1," in c)
    assert "median of 2 points" in check, check


# ---- 5. accuracy.py: the pruning time is the pruning alone; 6. --quiet prints no bars ----------------------------
@pytest.fixture(scope="module")
def tiny_lm(tiny_model):  # noqa: F811
    lm = demo_mod.load_model(str(tiny_model), dtype=torch.float32, device=torch.device("cpu"), note=False)
    train, _ = demo_mod.corpus_splits(lm.tokenizer)
    calib = flash_llm.data.calibration_batches(train, 4, lm.context, seed=0, batch_size=32)
    return lm, calib


def test_accuracy_magnitude_time_holds_no_forward_pass(accuracy, tiny_lm, monkeypatch):
    """No forward pass inside the timed call of magnitude (was: one over every calibration sequence, for an error
    report the script does not use), and the same pruned weights as before."""
    from flash_llm import prune as P

    lm, calib = tiny_lm
    args = types.SimpleNamespace(no_amp=True, quiet=True)
    forwards = []
    real_call = torch.nn.Module.__call__

    def counting(self, *a, **k):
        forwards.append(type(self).__name__)
        return real_call(self, *a, **k)

    for method, scope in (("magnitude", "layer"), ("magnitude-global", "global")):
        forwards.clear()
        monkeypatch.setattr(torch.nn.Module, "__call__", counting)
        model, report = accuracy.run_method(method, lm.model, 0.5, calib, None, args, torch.device("cpu"))
        monkeypatch.setattr(torch.nn.Module, "__call__", real_call)
        assert forwards == [], (method, sorted(set(forwards)))
        assert report.sparsity == pytest.approx(0.5, abs=1e-6)
        ref = copy.deepcopy(lm.model)
        P.magnitude_prune_(ref, 0.5, scope=scope, filter_fn=demo_mod.not_lm_head)
        for (name, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
            assert torch.equal(a, b), (method, name)


def test_accuracy_quiet_prints_no_bars(accuracy, tiny_model, capfd, tmp_path):  # noqa: F811
    argv = ["--model", str(tiny_model), "--sparsities", "50", "--methods", "magnitude,sparsegpt,owl-sparsegpt,owl-wanda",
            "--eval-tokens", "256", "--calib-seqs", "2", "--device", "cpu", "--out", str(tmp_path / "A.md")]
    assert accuracy.main(argv + ["--quiet"]) == 0
    err = capfd.readouterr().err
    assert "sparsegpt" not in err and "calibration pass" not in err and "%|" not in err, err[-2000:]
    report = (tmp_path / "A.md").read_text()
    assert "Wall time of the pruning call alone" in report
    # (the bars are there without --quiet: the check above sees them)
    assert accuracy.main(argv[:4] + ["--methods", "sparsegpt"] + argv[6:] + ["--force"]) == 0
    assert "sparsegpt" in capfd.readouterr().err


def test_accuracy_md_notes_magnitudes_old_time():
    text = (BENCH / "ACCURACY.md").read_text()
    note = text.split("### Pruning time (s)")[1].split("### Targets")[0]
    assert "Note (session 88" in note and "magnitude" in note and "calibration" in note


# ---- 7. bench_formats: the docstring names the formats it times -------------------------------------------------
def test_bench_formats_docstring_names_what_it_times():
    bf = load_script("benchmarks/bench_formats.py", "bench_formats_fixes88")
    head = bf.__doc__.split("\n\n")[0]
    assert "every format" not in head
    assert set(bf.FORMATS.values()) == {flash_llm.BitmapTiles, flash_llm.TiledCSL}
    assert "BitmapTiles" in head and "Tiled-CSL" in head and "DeltaRows" in head and "not timed" in head


"""Timing helpers shared by the benchmarks: CUDA-graph replays timed with CUDA events, buffers rotated
beyond L2, the device copy bandwidth, and the environment line every result carries."""

from __future__ import annotations

import datetime
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time

import torch


def l2_bytes(device=None) -> int:
    return torch.cuda.get_device_properties(device or torch.cuda.current_device()).L2_cache_size


#: most copies :func:`copies_needed` asks for: 3x a 50 MiB L2 from buffers down to 150 KiB (a 4096 x 4096 Tiled-CSL
#: weight at 99 % is 0.66 MiB: 64 copies, the cap before, rotated 42 MiB, less than L2)
COPIES_CAP = 1024


def copies_needed(nbytes: int, min_total: int | None = None, cap: int = COPIES_CAP) -> int:
    """How many distinct copies of a buffer to rotate through so their total reaches ``min_total`` (default 3x L2),
    at most ``cap``: a buffer too small for that stays short of it, which :func:`rotation_shortfall` tells."""
    min_total = min_total or 3 * l2_bytes()
    return max(1, min(cap, -(-min_total // max(1, nbytes))))


def rotation_shortfall(nbytes: int, copies: int, min_total: int | None = None) -> int:
    """Bytes by which ``copies`` copies of an ``nbytes`` buffer fall short of ``min_total`` (default 3x L2); 0 where
    they reach it."""
    return max(0, (min_total or 3 * l2_bytes()) - copies * nbytes)


def weight_copies(w) -> list:
    """A compressed weight and as many clones as :func:`copies_needed` rotates through (their arrays cloned)."""
    return [w] + [type(w)._from_parts({n: t.clone() for n, t in w.tensors().items()}, w.shape, w.dtype, w.nnz)
                  for _ in range(copies_needed(w.nbytes) - 1)]


#: seconds of replays before the timed ones (the SM clock ramps up under load; ``time_across_n.py`` warms up 0.3 s)
WARMUP_S = 0.2
#: timed replays at least where one call is the whole rotation (one copy: a sample is a single call)
SINGLE_COPY_REPLAYS = 30


def layers_to_rotate(minimum: int, nbytes: int, min_total: int | None = None) -> int:
    """Copies (layers) of an ``nbytes`` buffer to rotate: at least ``minimum``, more where :func:`copies_needed`
    needs them to pass ``min_total`` (default 3x L2)."""
    return max(minimum, copies_needed(nbytes, min_total))


def graph_calls(minimum: int, copies: int) -> int:
    """Calls to capture in one CUDA graph that rotates ``copies`` buffers: the smallest multiple of ``copies`` that
    is at least ``minimum``, so every copy is called, each as often."""
    copies = max(1, copies)
    return copies * max(1, -(-minimum // copies))


def timed_replays(fns: list, replays: int) -> int:
    """Replays :func:`time_calls` times: ``replays``, at least :data:`SINGLE_COPY_REPLAYS` where ``fns`` is one
    callable (alone or repeated: nothing rotates, so a sample is one call's time and noisier)."""
    return max(replays, SINGLE_COPY_REPLAYS) if len({id(f) for f in fns}) == 1 else replays


def warm_up(step, calls: int, seconds: float, sync=None, clock=time.perf_counter) -> int:
    """Run ``step()`` at least ``calls`` times and until ``seconds`` have passed, ``sync()`` after each (so the clock
    measures the device's work, not the host's queueing); returns the calls made."""
    t0, done = clock(), 0
    while done < calls or clock() - t0 < seconds:
        step()
        if sync is not None:
            sync()
        done += 1
    return done


def warm_up_agreed(step, calls: int, seconds: float, agree, sync=None, clock=time.perf_counter) -> int:
    """:func:`warm_up` for a ``step`` that is a collective (a graph of tensor-parallel all-reduces): every rank
    makes the same number of calls, at least ``calls`` and until every rank's clock has passed ``seconds``.

    It runs in rounds: ``calls``, then as many as this rank's clock still needs at the pace so far (at most 10x
    the calls made), each round's count ``agree(n)`` of the ranks' ``n``: a collective every rank calls between
    rounds that returns the same count on each (the largest), 0 once every rank has passed ``seconds``.  With
    :func:`warm_up` each rank's own clock stopped it, and ranks that started it apart (a capture of different
    length) made different numbers of replays: collectives left without a partner (until session 88).  Returns the
    calls made."""
    t0, done, batch = clock(), 0, max(0, calls)
    while True:
        for _ in range(batch):
            step()
            if sync is not None:
                sync()
        done += batch
        elapsed = clock() - t0
        if elapsed >= seconds:
            want = 0
        elif done == 0 or elapsed <= 0:
            want = max(1, 10 * done)
        else:
            want = max(1, min(10 * done, math.ceil((seconds - elapsed) * done / elapsed)))
        batch = int(agree(want))
        if batch <= 0:
            return done


def time_calls(fns: list, replays: int = 10, warmup: int = 2, agree=None) -> float:
    """Median time (seconds) of one call, from CUDA-graph replays of ``fns`` called in turn.

    ``fns`` are zero-argument callables, typically the same op on rotating buffers; capturing them in
    one graph removes Python and launch overhead, so the number is device time.  Before the timed replays:
    ``warmup`` eager passes (before the capture), then graph replays for at least ``warmup`` replays and
    :data:`WARMUP_S` seconds (clocks ramp up under load).  ``replays``: at least :data:`SINGLE_COPY_REPLAYS` where
    ``fns`` is one callable (:func:`timed_replays`).

    ``agree``: for ``fns`` that are collectives (every rank of a group calls ``time_calls`` with them), a callable
    that returns the largest of the ranks' ints (a collective itself): the warm-up replays are then counted alike
    on every rank (:func:`warm_up_agreed`), so their collectives pair up; None (one process): :func:`warm_up`.
    """
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            for f in fns:
                f()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    if agree is None:
        warm_up(g.replay, warmup, WARMUP_S, torch.cuda.synchronize)
    else:
        warm_up_agreed(g.replay, warmup, WARMUP_S, agree, torch.cuda.synchronize)
    times = []
    for _ in range(timed_replays(fns, replays)):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / len(fns))
    del g
    return statistics.median(times)


def kernels_missing(device=None) -> str:
    """Why ``flash_llm.spmm`` would run its PyTorch reference instead of the CUDA kernels on ``device`` (default:
    the current CUDA device), so a benchmark would time that as the sparse kernel (``kernels.supported``); "" where
    the kernels can run."""
    from flash_llm import kernels

    device = torch.device("cuda" if device is None else device)
    ok, why = (False, "no CUDA device") if device.type == "cuda" and not torch.cuda.is_available() else \
        kernels.supported(device)
    return "" if ok else f"flash_llm.spmm would run its PyTorch reference, not the CUDA kernels: {why}"


def copy_bandwidth(nbytes: int = 1 << 30, device=None) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written: the faster of a
    ``copy_`` (inside a CUDA graph it can become a memcpy node served by a copy engine: 2.7 TB/s on an H200,
    while dense GEMV there read 4.0 TB/s) and an elementwise kernel on the SMs.  ``device``: the CUDA device to
    measure (default: the current one); it is made current while timing, so the buffers, the graphs and the events
    are all on it (until session 88 ``bench_e2e.py --device cuda:N`` measured the current device)."""
    device = torch.device("cuda" if device is None else device)
    if device.type != "cuda":
        raise ValueError(f"copy_bandwidth: device must be a CUDA device, got {device}")
    with torch.cuda.device(device):
        a = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
        b = torch.empty_like(a)
        a.uniform_()
        t_copy = time_calls([lambda: b.copy_(a)], replays=10)
        t_kernel = time_calls([lambda: torch.mul(a, 1.0, out=b)], replays=10)
    return 2 * a.numel() * 4 / min(t_copy, t_kernel)


def git_state(root=None) -> tuple[str | None, bool | None]:
    """The short commit of the git repository whose top directory is ``root`` (default: the one above this file's
    directory, the benchmarks' repository whatever the working directory) and whether its tree is dirty (changed or
    untracked files); ``(None, None)`` where ``root`` is not a repository's top (the device machine's copy of the tree
    has no ``.git``; a repository around that copy is another one) or there is no git."""
    root = os.path.realpath(root or os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    def git(*args):
        return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, check=True).stdout.strip()

    try:
        if os.path.realpath(git("rev-parse", "--show-toplevel")) != root:
            return None, None
        return git("rev-parse", "--short", "HEAD"), bool(git("status", "--porcelain"))
    except (OSError, subprocess.CalledProcessError):
        return None, None


def command(script: str, argv=None, launcher: str = "python") -> str:
    """The command line that ran a benchmark: ``launcher`` and ``sys.argv`` as typed where ``argv`` is None (run
    from a shell), else ``launcher``, ``script`` and ``argv`` (its ``main(argv)`` called from Python)."""
    return f"{launcher} {shlex.join(sys.argv if argv is None else [script, *argv])}"


def environment(device=None) -> dict:
    """The run's machine, versions and provenance.  ``device``: the run's device (a CPU run on a GPU machine names
    the CPU, not the card, and touches no CUDA); None: CUDA's device 0 where there is CUDA (the kernels' benchmarks).
    ``commit``: ``FLASH_LLM_COMMIT`` where set (the device machine gets the working tree without ``.git``), else the
    benchmarks' repository's commit ("unknown" without one), with "+dirty" where :func:`git_state` finds the tree
    dirty; ``commit_given``, ``git_commit`` and ``dirty`` (None: no repository to tell) keep the parts apart.
    ``l2_mib``: the L2 in MiB (2^20 bytes; the key was ``l2_mb`` until session 81, the same MiB)."""
    device = None if device is None else torch.device(device)
    on_gpu = torch.cuda.is_available() if device is None else device.type == "cuda"
    props = torch.cuda.get_device_properties(device.index or 0 if device is not None else 0) if on_gpu else None
    try:
        from flash_llm.kernels._build import nvrtc_version

        nvrtc = ".".join(map(str, nvrtc_version()))
    except Exception:
        nvrtc = "n/a"
    given = os.environ.get("FLASH_LLM_COMMIT") or None
    sha, dirty = git_state()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "card": props.name if props else "cpu",
        "sms": props.multi_processor_count if props else 0,
        "l2_mib": props.L2_cache_size / 2**20 if props else 0,  # (MiB)
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "nvrtc": nvrtc,
        "python": platform.python_version(),
        "commit": (given or sha or "unknown") + ("+dirty" if dirty else ""),
        "commit_given": given,
        "git_commit": sha,
        "dirty": dirty,
        # the library's switches set for this run (A/B runs of one tree differ only here)
        "settings": {k: v for k, v in sorted(os.environ.items())
                     if k.startswith("FLASH_LLM_") and k not in ("FLASH_LLM_COMMIT", "FLASH_LLM_CACHE")},
    }


def positive_ints(text: str, *, empty: bool = False) -> list[int]:
    """An argparse type: comma-separated positive integers (blanks dropped, each read as ``flash-llm``'s options read
    one; ``empty``: none at all is fine), else ``argparse.ArgumentTypeError``, so a bad list fails when the arguments
    are parsed, before any CUDA work."""
    import argparse

    from flash_llm.cli import _positive

    items = [v.strip() for v in text.split(",") if v.strip()]
    if not items and not empty:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return [_positive(v) for v in items]

"""Timing helpers shared by the benchmarks: CUDA-graph replays timed with CUDA events, buffers rotated
beyond L2, the device copy bandwidth, and the environment line every result carries."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess

import torch


def l2_bytes(device=None) -> int:
    return torch.cuda.get_device_properties(device or torch.cuda.current_device()).L2_cache_size


def copies_needed(nbytes: int, min_total: int | None = None, cap: int = 64) -> int:
    """How many distinct copies of a buffer to rotate through so their total exceeds 3x L2."""
    min_total = min_total or 3 * l2_bytes()
    return max(1, min(cap, -(-min_total // max(1, nbytes))))


def weight_copies(w) -> list:
    """A compressed weight and as many clones as :func:`copies_needed` rotates through (their arrays cloned)."""
    return [w] + [type(w)._from_parts({n: t.clone() for n, t in w.tensors().items()}, w.shape, w.dtype, w.nnz)
                  for _ in range(copies_needed(w.nbytes) - 1)]


def time_calls(fns: list, replays: int = 10, warmup: int = 2) -> float:
    """Median time (seconds) of one call, from CUDA-graph replays of ``fns`` called in turn.

    ``fns`` are zero-argument callables, typically the same op on rotating buffers; capturing them in
    one graph removes Python and launch overhead, so the number is device time.
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
    for _ in range(warmup):
        g.replay()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / len(fns))
    del g
    return statistics.median(times)


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written: the faster of a
    ``copy_`` (inside a CUDA graph it can become a memcpy node served by a copy engine: 2.7 TB/s on an H200,
    while dense GEMV there read 4.0 TB/s) and an elementwise kernel on the SMs."""
    a = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda")
    b = torch.empty_like(a)
    a.uniform_()
    t_copy = time_calls([lambda: b.copy_(a)], replays=10)
    t_kernel = time_calls([lambda: torch.mul(a, 1.0, out=b)], replays=10)
    return 2 * a.numel() * 4 / min(t_copy, t_kernel)


def environment(device=None) -> dict:
    """The run's machine and versions.  ``device``: the run's device (a CPU run on a GPU machine names the CPU, not
    the card, and touches no CUDA); None: CUDA's device 0 where there is CUDA (the kernels' benchmarks)."""
    def git(*args):
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()
        except Exception:
            return "unknown"

    device = None if device is None else torch.device(device)
    on_gpu = torch.cuda.is_available() if device is None else device.type == "cuda"
    props = torch.cuda.get_device_properties(device.index or 0 if device is not None else 0) if on_gpu else None
    try:
        from flash_llm.kernels._build import nvrtc_version

        nvrtc = ".".join(map(str, nvrtc_version()))
    except Exception:
        nvrtc = "n/a"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "card": props.name if props else "cpu",
        "sms": props.multi_processor_count if props else 0,
        "l2_mb": props.L2_cache_size / 2**20 if props else 0,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "nvrtc": nvrtc,
        "python": platform.python_version(),
        # the device machine gets the working tree without .git: pass FLASH_LLM_COMMIT there
        "commit": os.environ.get("FLASH_LLM_COMMIT")
        or git("rev-parse", "--short", "HEAD") + ("+dirty" if git("status", "--porcelain") else ""),
        # the library's switches set for this run (A/B runs of one tree differ only here)
        "settings": {k: v for k, v in sorted(os.environ.items())
                     if k.startswith("FLASH_LLM_") and k not in ("FLASH_LLM_COMMIT", "FLASH_LLM_CACHE")},
    }

"""The ``flash-llm`` command line: one subcommand per workflow.

* ``flash-llm demo``: prune the bundled model and compare it with the dense one (:mod:`flash_llm.demo`);
  ``flash-llm demo --layer``: prune a synthetic layer, compress it to each format, check and time them.
* ``flash-llm info``: versions, the GPU, whether the CUDA kernels can run, NVRTC, the cubin cache.
* ``flash-llm build``: compile the CUDA kernels ahead of time and report registers / spills / smem.
* ``flash-llm inspect``: what a saved weight file or checkpoint directory holds (format, shape, density, bytes).
* ``flash-llm convert`` / ``generate`` / ``bench``: checkpoints, text generation, benchmarks
  (``flash_llm/checkpoint/cli.py``).

:func:`main` takes ``argv`` and returns the exit status (0 ok, 1 failure, 2 usage or input error), so
tests call it directly.  Tables go to stdout as plain aligned text, progress bars (tqdm) and errors
to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import math
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import flash_llm
from flash_llm import BitmapTiles, DeltaRows, FormatError, TiledCSL

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
DEMO_SPARSITIES = (50.0, 70.0, 80.0, 90.0)
DEMO_MAX_REL_ERR = 1e-2
LAYER_FORMATS = (BitmapTiles, TiledCSL, DeltaRows)  # what `demo --layer` compresses to
_SLEEP_CYCLES = 1_000_000  # about 0.5 ms of GPU clock: longer than Python takes to queue one call
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
# Modules that define more subcommands through a ``register_cli(subparsers)`` function, in help order.
SUBCOMMAND_MODULES: tuple[str, ...] = ("flash_llm.demo", "flash_llm.checkpoint.cli")


# ------------------------------------------------------------------------------------------------
# small output helpers
# ------------------------------------------------------------------------------------------------
def _err(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)


def _table(headers: list[str], rows: list[list[str]], align: str) -> list[str]:
    """Plain-text table: ``align`` has one 'l' or 'r' per column; rows of ``None`` print blank lines."""
    widths = [len(h) for h in headers]
    for row in rows:
        if row is not None:
            widths = [max(w, len(c)) for w, c in zip(widths, row)]

    def fmt(cells):
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(cells, widths, align)).rstrip()

    return [fmt(headers)] + [fmt(r) if r is not None else "" for r in rows]


def _int(n: int) -> str:
    return f"{n:,}"


def _pct(s: float) -> str:
    return f"{s:g}%"


def _progress(**kw) -> tqdm:
    return tqdm(file=sys.stderr, leave=False, dynamic_ncols=True, **kw)


def discard_stdout() -> None:
    """After a ``BrokenPipeError`` on stdout (its reader has gone: ``flash-llm ... | head -1``): point stdout's file
    descriptor at ``os.devnull``, so that nothing written later, nor Python's flush at exit, fails again (the recipe
    of Python's documentation of SIGPIPE).  Nothing where stdout is no file (e.g. captured by a test)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def _plug_closed_stderr() -> None:
    """A process started with stderr closed (``2>&-``) has ``sys.stderr`` None, and ``print(..., file=sys.stderr)``
    then writes to stdout: the diagnostics would land in the output (``generate``'s text, ``info``'s table).  They go
    to ``os.devnull`` instead."""
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w", encoding="utf-8")


def _host_room() -> int:
    """Bytes of host memory this process could get at most, 0 if unknown: what is available
    (:func:`flash_llm.models.synthetic.host_available_memory`, a cgroup's limit included) plus the free swap.  An
    upper bound, so a size refused for exceeding it can never fit."""
    from flash_llm.models.synthetic import host_available_memory

    room = host_available_memory()
    if not room:
        return 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("SwapFree:"):
                    room += int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):  # (no /proc/meminfo or an unparsable one: the swap is not counted)
        pass
    return room


def too_big_for_memory(need: int, what: str) -> str | None:
    """Why ``need`` bytes, the least that ``what`` (a phrase naming the option, e.g. ``"--shape 10x10"``) allocates
    at once on the host, cannot fit there (:func:`_host_room`); None where they may fit or the room is unknown."""
    from flash_llm.nn import _human

    room = _host_room()
    if room and need > room:
        return f"{what} needs at least {_human(need)} of memory at once, more than this machine has " \
               f"({_human(room)} available)"
    return None


def is_out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is an allocation failure: ``torch.OutOfMemoryError`` (CUDA), ``MemoryError``, or the CPU
    allocator's ``RuntimeError`` ("can't allocate memory")."""
    if isinstance(e, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))):
        return True
    return isinstance(e, RuntimeError) and ("can't allocate memory" in str(e) or "out of memory" in str(e))


def out_of_memory_message(e: BaseException, what: str) -> str:
    """The one-line error for the allocation failure ``e`` while ``what`` (a phrase naming the options) ran."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    first = re.sub(r"^\[enforce fail at [^\]]*\]\s*(err == 0\.\s*)?", "", first)
    return f"out of memory with {what}: {first}"


# ------------------------------------------------------------------------------------------------
# argument types
# ------------------------------------------------------------------------------------------------
def _shape(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise argparse.ArgumentTypeError(f"shape must be MxK with M, K >= 1 (e.g. 4096x4096), got {text!r}")
    return int(m.group(1)), int(m.group(2))


def fraction_or_percent(text: str) -> float:
    """``text`` as a fraction: a bare number up to 1 is one, a larger one a percentage; one ending in ``%`` is always
    a percentage (``0.5``, ``50`` and ``50%`` all read 0.5; ``0.5%`` reads 0.005).  ValueError if it is no number.
    The reading of every sparsity option (:func:`sparsity_arg`, ``convert --min-sparsity``), each with its range."""
    t = text.strip()
    v = float(t.removesuffix("%"))
    return v / 100 if t.endswith("%") or v > 1 else v


def sparsity_arg(text: str) -> float:
    """A sparsity as a fraction in ``[0, 1)``, read by :func:`fraction_or_percent`.  The one reading of
    ``--sparsity`` (demo, prune) and of each of ``--sparsities`` (``demo --layer``)."""
    try:
        v = fraction_or_percent(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"sparsity must be a fraction in [0, 1) or a percentage (0.5, 50 and 50% "
                                         f"all mean 50 %), got {text!r}") from None
    if not 0 <= v < 1:  # (NaN fails too)
        raise argparse.ArgumentTypeError(f"sparsity must be in [0, 1) as a fraction or [0, 100) as a percentage "
                                         f"(0.5, 50 and 50% all mean 50 %), got {text!r}")
    return v


def _sparsities(text: str) -> list[float]:
    """``--sparsities`` of ``demo --layer``: comma-separated sparsities, each read by :func:`sparsity_arg`, in
    percent (what :func:`magnitude_prune` and the table take)."""
    out = [100 * sparsity_arg(part) for part in text.split(",") if part.strip()]
    if not out:
        raise argparse.ArgumentTypeError(f"no sparsity given in {text!r}")
    return out


def _int_from(text: str, least: int, what: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a {what} integer, got {text!r}") from None
    if v < least:
        raise argparse.ArgumentTypeError(f"expected a {what} integer, got {v}")
    return v


def _positive(text: str) -> int:
    return _int_from(text, 1, "positive")


def _non_negative(text: str) -> int:
    return _int_from(text, 0, "non-negative")


def _float_from(text: str, ok, what: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not ok(v):  # (NaN fails every test)
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return v


def _non_negative_float(text: str) -> float:
    """A finite number >= 0 (e.g. a sampling temperature)."""
    return _float_from(text, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")


def _probability(text: str) -> float:
    """A number in (0, 1] (e.g. a nucleus-sampling top-p)."""
    return _float_from(text, lambda v: 0 < v <= 1, "a probability in (0, 1]")


def _device_arg(text: str) -> torch.device:
    """:func:`_checked_device` as an argparse ``type=`` (``--device`` of convert, generate): auto, cpu, cuda or
    cuda:N, checked while the arguments are parsed."""
    try:
        return _checked_device(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


class _RecordedStore(argparse._StoreAction):
    """argparse's ``store`` action that also records its dest in the namespace's ``given_options``."""

    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, values, option_string)
        namespace.given_options = frozenset(getattr(namespace, "given_options", ())) | {self.dest}


class _RecordedStoreTrue(argparse._StoreTrueAction):
    """argparse's ``store_true`` action that also records its dest in the namespace's ``given_options``."""

    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, values, option_string)
        namespace.given_options = frozenset(getattr(namespace, "given_options", ())) | {self.dest}


def record_given_options(parser: argparse.ArgumentParser) -> None:
    """Make each ``store`` / ``store_true`` option added to ``parser`` (and its argument groups) from now on record,
    when the command line holds it, its dest in the parsed namespace's ``given_options`` (a frozenset, empty by
    default): which options the user gave, whatever their values (one equal to its default too), for the checks that
    refuse the options of another mode (:func:`given`)."""
    parser.register("action", None, _RecordedStore)
    parser.register("action", "store", _RecordedStore)
    parser.register("action", "store_true", _RecordedStoreTrue)
    parser.set_defaults(given_options=frozenset())


def given(args, names) -> list[str]:
    """The options among ``names`` (argparse dests) that the command line holds (:func:`record_given_options`), as
    ``--option`` names, in the order of ``names``."""
    held = getattr(args, "given_options", frozenset())
    return [f"--{n.replace('_', '-')}" for n in names if n in held]


def is_bundled(spec: str) -> bool:
    """Whether a MODEL / PATH argument names a bundled model (:func:`model_dir`): one of
    :data:`flash_llm.bundled.NAMES` with no directory of that name here."""
    from flash_llm import bundled

    return spec in bundled.NAMES and not Path(spec).is_dir()


def model_dir(spec: str, *, note: bool = True) -> Path:
    """The directory a MODEL / PATH argument names: a bundled model's name (:data:`flash_llm.bundled.NAMES`) is its
    directory inside the package (FileNotFoundError if that install is incomplete), anything else a path as given.
    A directory of a bundled model's name here wins, as in :func:`flash_llm.from_pretrained` (which reads paths
    only), so ``prune --out tiny-shakespeare`` writes what ``inspect tiny-shakespeare`` then reads; a one-line note on
    stderr says so (unless ``note`` is False: a second look-up of the same argument).  The one rule of every
    command that reads a model: demo, prune, generate, convert and inspect."""
    from flash_llm import bundled

    if is_bundled(spec):
        return bundled.path(spec)
    if note and spec in bundled.NAMES:
        print(f"note: {spec!r} is the local directory {Path(spec).absolute()}, not the bundled model of that name "
              f"(for that one, pass its path: {Path(bundled.__file__).parent / spec})", file=sys.stderr)
    return Path(spec)


def _arch(text: str) -> str:
    if not re.fullmatch(r"sm_\d+[af]?", text):  # (sm_NNa / sm_NNf fill sm_NN's slot: _build.canonical_arch)
        raise argparse.ArgumentTypeError(f"arch must look like 'sm_90' (or 'sm_90a', 'sm_100f'), got {text!r}")
    return text


# ------------------------------------------------------------------------------------------------
# demo
# ------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def magnitude_prune(w: torch.Tensor, order: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep the ``round(numel * (1 - sparsity / 100))`` largest ``|w|`` (``order``: indices of ``w``
    flattened, by decreasing magnitude); zero the rest with ``+0.0``."""
    keep = w.numel() - round(w.numel() * sparsity / 100)
    mask = torch.zeros(w.numel(), dtype=torch.bool, device=w.device)
    mask[order[:keep]] = True
    zero = torch.zeros((), dtype=w.dtype, device=w.device)
    # kept values that are -0.0 become +0.0, the formats' zero, so the round trip is bitwise exact
    return torch.where(mask.view_as(w) & (w != 0), w, zero)


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref).norm() / ref.norm().clamp_min(torch.finfo(torch.float32).tiny))


def _flush_l2(flush: torch.Tensor, total: torch.Tensor) -> None:
    """Evict L2 by reading ``flush`` (twice L2's size), its sum into the preallocated scalar ``total``: reads leave no
    dirty lines (a ``zero_()`` left up to one L2 of them, written back to DRAM during the timed call after it)."""
    torch.sum(flush, 0, out=total)


def _on_device(device: torch.device):
    """A context manager that makes ``device`` the current CUDA device while it is open (nothing for a CPU).  CUDA
    events, ``torch.cuda._sleep``, ``torch.cuda.synchronize()`` and the CUDA graphs' streams act on the current
    device: timing work on ``cuda:N`` needs it current (until session 88 ``demo --layer --device cuda:1`` timed
    device 0's idle stream)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _cuda_median_us(fn, flush: torch.Tensor, warmup: int, repeat: int) -> float:
    """Median of ``repeat`` CUDA-event timings of ``fn()`` after ``warmup`` calls, L2 flushed before each
    (:func:`_flush_l2`: ``flush``, twice L2, read).

    This is GPU time: a short GPU sleep before each start event keeps the GPU busy while Python
    queues the call, so host-side overhead (argument checks, dispatch, launch) is not counted.  It acts on the
    current CUDA device: ``fn``'s work and ``flush`` must be there (:func:`_on_device`).
    """
    sleep = getattr(torch.cuda, "_sleep", None)
    events = []
    total = flush.new_zeros(())
    for i in range(warmup + repeat):  # warm-up calls run the same sequence, untimed
        _flush_l2(flush, total)
        if sleep is not None:
            sleep(_SLEEP_CYCLES)
        if i < warmup:
            fn()
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return 1000 * statistics.median(s.elapsed_time(e) for s, e in events)


def _gpu_warmup(fns, seconds: float = 0.3) -> None:
    """Run ``fns`` for ``seconds`` so the GPU leaves its idle clocks before anything is timed (synchronizing the
    current CUDA device: :func:`_on_device`)."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for fn in fns:
            fn()
        torch.cuda.synchronize()


def _demo_device(text: str) -> torch.device:
    """``--device`` of the demos: auto, cpu, cuda or cuda:N (a CUDA device always with its index)."""
    device = _checked_device(text)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _checked_device(text: str) -> torch.device:
    """``--device``: auto, cpu, cuda or cuda:N, else ValueError (CUDA's index left as given: ``generate --tp`` picks
    each rank's own later, so nothing here touches a GPU but the availability check)."""
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {text!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {text}: CUDA is not available here")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {text!r}")
    return device


def _demo_device_or_none(text: str) -> torch.device | None:
    """:func:`_demo_device`, or ``None`` after printing its error (the caller exits with EXIT_USAGE)."""
    try:
        return _demo_device(text)
    except ValueError as e:
        _err(str(e))
        return None


def cmd_demo(args) -> int:
    """``flash-llm demo --layer`` (parsed by :mod:`flash_llm.demo`): the synthetic-layer demo."""
    device = _demo_device_or_none(args.device)
    if device is None:
        return EXIT_USAGE
    sparsities = [s for group in (args.sparsities or [list(DEMO_SPARSITIES)]) for s in group]
    m, k = args.shape
    dtype = DTYPES[args.dtype]
    dtype_name = args.dtype
    # the least held at once on the host: the weight drawn in float32 and its cast; then x the same (beside the
    # weight on a CPU): refused before any work where that cannot fit
    size = dtype.itemsize
    why = (too_big_for_memory(m * k * (4 + size), f"--shape {m}x{k} (its weight drawn in float32, cast to "
                                                  f"{dtype_name})")
           or too_big_for_memory((m * k * size if device.type == "cpu" else 0) + args.tokens * k * (4 + size),
                                 f"--tokens {args.tokens} (x of {args.tokens}x{k}, drawn in float32, cast to "
                                 f"{dtype_name})"))
    if why is not None:
        _err(f"{why}; pass a smaller --shape or --tokens")
        return EXIT_USAGE

    from flash_llm import kernels

    timing_ok, timing_why = kernels.supported(device)
    if device.type == "cuda" and timing_ok:
        from flash_llm.kernels._build import compile_kernels, device_arch

        arch = device_arch(device.index)
        print(f"preparing the CUDA kernels for {arch} (NVRTC at first use, cached afterwards) ...", file=sys.stderr)
        t0 = time.perf_counter()
        try:
            compiled = compile_kernels(arch)
        except kernels.KernelBuildError as e:
            _err(str(e))
            return EXIT_FAILURE
        if not compiled.cached:
            print(f"compiled the CUDA kernels for {arch} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    try:
        with _on_device(device):  # (the timing's CUDA events, GPU sleep and synchronize act on the current device)
            return _layer_demo(args, device, sparsities, timing_ok, timing_why)
    except (RuntimeError, MemoryError) as e:
        if not is_out_of_memory(e):
            raise
        _err(out_of_memory_message(e, f"--shape {m}x{k} and --tokens {args.tokens}") + "; pass a smaller --shape "
             "or --tokens")
        return EXIT_FAILURE


def _layer_demo(args, device: torch.device, sparsities: list[float], timing_ok: bool, timing_why: str | None) -> int:
    """The body of :func:`cmd_demo` once its arguments are checked."""
    m, k = args.shape
    dtype = DTYPES[args.dtype]
    dtype_name = args.dtype
    g = torch.Generator().manual_seed(args.seed)
    w = torch.randn(m, k, generator=g).to(dtype).to(device)
    x = torch.randn(args.tokens, k, generator=g).to(dtype).to(device)
    order = torch.argsort(w.abs().float().view(-1), descending=True, stable=True)
    dense_bytes = m * k * w.element_size()
    for cls in LAYER_FORMATS:  # first calls pay one-time costs (CUDA init, kernel loads): not timed
        flash_llm.spmm(x[:1, :64], cls.from_dense(w[:64, :64]))

    headers = ["sparsity", "weight", "bytes", "bytes/elem", "vs dense", "compress", "rel. error", "round trip"]
    rows: list[list[str] | None] = []
    timing_rows: list[list[str] | None] = []
    failures: list[str] = []
    steps_per_level = 1 + len(LAYER_FORMATS) * (2 if timing_ok else 1)
    bar = _progress(total=len(sparsities) * steps_per_level, desc="demo", unit="step")
    for level, s in enumerate(sparsities):
        bar.set_description(f"{_pct(s)} prune")
        w_sp = magnitude_prune(w, order, s)
        ref = x.float() @ w_sp.float().t()
        y_dense = torch.nn.functional.linear(x, w_sp)
        if level:
            rows.append(None)
        rows.append([_pct(s), f"dense {dtype_name}", _int(dense_bytes), f"{w.element_size():.3f}", "1.00x", "-",
                     f"{_rel_err(y_dense, ref):.2e}", "-"])
        bar.update()
        compressed = []
        for cls in LAYER_FORMATS:
            name = cls.__name__
            bar.set_description(f"{_pct(s)} {name}")
            _sync(device)
            t0 = time.perf_counter()
            c = cls.from_dense(w_sp)
            _sync(device)
            t_compress = time.perf_counter() - t0
            exact = torch.equal(c.to_dense().view(torch.int16), w_sp.view(torch.int16))
            err = _rel_err(flash_llm.spmm(x, c), ref)
            if not exact:
                failures.append(f"{name} at {_pct(s)}: to_dense() does not reproduce the pruned weight bit for bit")
            if not err <= DEMO_MAX_REL_ERR:
                failures.append(f"{name} at {_pct(s)}: spmm relative error {err:.3g} > {DEMO_MAX_REL_ERR:g}")
            rows.append([_pct(s), name, _int(c.nbytes), f"{c.nbytes / (m * k):.3f}",
                         f"{dense_bytes / c.nbytes:.2f}x", f"{t_compress:.3f} s", f"{err:.2e}",
                         "exact" if exact else "MISMATCH"])
            compressed.append(c)
            bar.update()
        if timing_ok:
            flush = _l2_flush_buffer(device)
            if level == 0:
                _gpu_warmup([lambda c=c: flash_llm.spmm(x, c) for c in compressed] +
                            [lambda: torch.nn.functional.linear(x, w_sp)])
            for c in compressed:
                bar.set_description(f"{_pct(s)} time {type(c).__name__}")
                for n in (1, 16):
                    xn = torch.randn(n, k, generator=g).to(dtype).to(device)
                    t_sparse = _cuda_median_us(lambda: flash_llm.spmm(xn, c), flush, args.warmup, args.repeat)
                    t_dense = _cuda_median_us(lambda: torch.nn.functional.linear(xn, w_sp), flush,
                                              args.warmup, args.repeat)
                    timing_rows.append([_pct(s), type(c).__name__, str(n), f"{t_sparse:.1f}", f"{t_dense:.1f}",
                                        f"{t_dense / t_sparse:.2f}x"])
                bar.update()
            timing_rows.append(None)
        del compressed
    bar.close()

    where = "CPU" if device.type == "cpu" else f"{torch.cuda.get_device_name(device)} ({device})"
    print(f"flash-llm demo: synthetic {m}x{k} {dtype_name} layer (seed {args.seed}), magnitude-pruned "
          f"(largest |w| kept), on {where}")
    print()
    print("\n".join(_table(headers, rows, "rlrrrrrl")))
    print()
    print(f"rel. error: ||y - x.float() @ W.float().T|| / ||x.float() @ W.float().T|| for x of {args.tokens} random "
          "tokens,\n            y = flash_llm.spmm(x, w) (dense row: torch.nn.functional.linear(x, W)).")
    print("round trip: w.to_dense() equals the pruned weight W bit for bit.")
    if device.type == "cpu":
        print("spmm ran the pure-PyTorch reference on CPU; kernel timings need a CUDA GPU.")
    elif not timing_ok:
        print(f"kernel timings skipped: {timing_why}")
    else:
        from flash_llm.kernels._build import device_arch

        print()
        print(f"kernel time on {torch.cuda.get_device_name(device)} ({device_arch(device.index)}), {dtype_name}: "
              f"GPU time, median of {args.repeat} CUDA-event timings after {args.warmup} warm-up calls,\n"
              "L2 flushed before each, host launch overhead not counted")
        print("\n".join(_table(["sparsity", "weight", "N", "spmm (us)", "dense linear (us)", "speedup"],
                               timing_rows[:-1], "rlrrrr")))
    print()
    print("This run used a synthetic magnitude-pruned layer; `flash-llm demo` without --layer prunes the bundled "
          "model.")
    for f in failures:
        _err(f)
    return EXIT_FAILURE if failures else EXIT_OK


def _l2_flush_buffer(device: torch.device) -> torch.Tensor:
    """Twice L2's bytes of float32 zeros (written once here; :func:`_flush_l2` only reads them)."""
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 64 << 20
    return torch.zeros(2 * l2 // 4, dtype=torch.float32, device=device)


# ------------------------------------------------------------------------------------------------
# info
# ------------------------------------------------------------------------------------------------
def _package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def cmd_info(args) -> int:
    from flash_llm import kernels
    from flash_llm.kernels import _build

    lines = [("flash-llm", f"{flash_llm.__version__} ({Path(flash_llm.__file__).parent})"),
             ("python", sys.version.split()[0]),
             ("torch", f"{torch.__version__} (CUDA build: {torch.version.cuda or 'none'})")]
    if torch.cuda.is_available():
        lines.append(("CUDA", f"available, {torch.cuda.device_count()} device(s)"))
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            major, minor = props.major, props.minor
            lines.append((f"GPU {i}", f"{props.name}, compute capability {major}.{minor} (sm_{major}{minor}), "
                                      f"{props.multi_processor_count} SMs, {props.total_memory / 2**30:.1f} GiB"))
            ok, why = kernels.supported(torch.device("cuda", i))
            lines.append((f"kernels on GPU {i}", "supported" if ok else f"not supported: {why}"))
    else:
        lines.append(("CUDA", "not available"))
        ok, why = kernels.supported(torch.device("cpu"))
        lines.append(("kernels", "supported" if ok else f"not supported: {why} "
                                                        "(flash_llm.spmm runs the PyTorch reference)"))
    bindings = _package_version("cuda-bindings")
    lines.append(("cuda-bindings", bindings or "not installed (pip install cuda-bindings nvidia-cuda-nvrtc)"))
    try:
        major, minor = _build.nvrtc_version()
        lines.append(("NVRTC", f"{major}.{minor}"))
    except ImportError:
        lines.append(("NVRTC", "not available (cuda-python is not installed: "
                               "pip install cuda-bindings nvidia-cuda-nvrtc)"))
    except (RuntimeError, OSError) as e:
        lines.append(("NVRTC", f"not loadable: {e}"))
    cache, why = _build._cache_dir_or_why()
    if cache is None:
        lines.append(("cubin cache", f"none: {why}"))
    else:
        problem = _build.cache_problem(cache)
        try:  # (is_dir raises for a parent this user may not search, or a name longer than the file system allows)
            exists = cache.is_dir()
            cubins = sorted(cache.glob("*.cubin")) if exists else []
            state = f"{len(cubins)} cubin{'s' if len(cubins) != 1 else ''}" if exists else "not created yet"
        except OSError as e:
            exists, state = False, ""
            problem = f"cannot be used: {e.strerror or e}" + (f"; {problem}" if problem else "")
        if problem is not None:
            state = (f"{state}; " if exists else "") + f"{problem}; set FLASH_LLM_CACHE to a writable directory"
        lines.append(("cubin cache", f"{cache} ({state})"))
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        print(f"{key.ljust(width)}  {value}")
    return EXIT_OK


# ------------------------------------------------------------------------------------------------
# build
# ------------------------------------------------------------------------------------------------
def cmd_build(args) -> int:
    from flash_llm.kernels import _build

    try:
        nvrtc = "{}.{}".format(*_build.nvrtc_version())
    except ImportError as e:
        _err(str(e))
        return EXIT_FAILURE
    except (RuntimeError, OSError) as e:
        _err(f"NVRTC is not loadable: {e}")
        return EXIT_FAILURE
    # (sm_90a is sm_90: the same cubin, stored where the runtime looks for it, _build.canonical_arch)
    archs = list(dict.fromkeys(_build.canonical_arch(a) for a in args.arch)) if args.arch else None
    if not archs and torch.cuda.is_available():  # the present GPU's, if the kernels can run there at all
        from flash_llm import kernels

        ok, why = kernels.supported(torch.device("cuda", 0))
        if not ok:
            _err(f"GPU 0 cannot run flash-llm's CUDA kernels: {why}; nothing to build for it (pass --arch sm_80 "
                 "sm_90, or the architectures you want, to build the cubins for other GPUs)")
            return EXIT_USAGE
        archs = [_build.device_arch(0)]
    if not archs:
        archs = ["sm_80", "sm_90"]
    unusual = [a for a in archs if a not in _build.SUPPORTED_ARCHS]
    if unusual:
        print(f"note: flash-llm's kernels target {', '.join(_build.SUPPORTED_ARCHS)}; trying {', '.join(unusual)} "
              "anyway", file=sys.stderr)
    need_log = args.report or args.strict
    cache, why = _build._cache_dir_or_why()
    if cache is None:  # (flash-llm build exists to fill the cache)
        _err(f"no cubin cache to fill: {why}")
        return EXIT_FAILURE
    _build.remove_stale_temporary_files(cache)  # (of stores killed before their rename)
    missing = [a for a in archs if not _build.is_cached(a)]  # (--report alone stores nothing: it recompiles)
    if missing:  # (before compiling, which takes minutes: a cache that cannot take the cubins, or has no room)
        problem = _build.cache_problem(cache, create=True, space=len(missing) * _build.cubin_size_estimate(cache))
        if problem is not None:
            _err(f"no cubin cache to fill: {cache}: {problem}; {_build.cache_hint(problem)}")
            return EXIT_FAILURE
    print(f"NVRTC {nvrtc}; cubin cache {cache}")

    def build(arch):  # (compiled, seconds); NVRTC releases the GIL, so the archs compile at the same time
        t0 = time.perf_counter()
        compiled = _build.compile_kernels(arch)  # fills the cache when the cubin is not there yet
        if need_log and compiled.cached:  # cached cubins carry no ptxas log: compile again for it
            compiled = _build.compile_kernels(arch, use_cache=False)
        return compiled, time.perf_counter() - t0

    compiling = archs if need_log else missing
    if compiling:  # (the bar below moves only when a whole arch is done)
        print(f"compiling the CUDA kernels for {', '.join(compiling)} with NVRTC (about a minute"
              f"{', all at once' if len(compiling) > 1 else ''}) ...", file=sys.stderr, flush=True)

    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(len(archs))
    try:
        futures = [pool.submit(build, arch) for arch in archs]
        bar = _progress(total=len(archs), desc="compiling", unit="arch", disable=len(archs) < 2 or None)
        for f in futures:
            f.exception()  # (waits)
            bar.update()
        bar.close()
    except KeyboardInterrupt:
        # NVRTC cannot be stopped and the interpreter's exit joins the pool's threads (minutes): leave them, and the
        # process, at once.  Nothing is lost: a cubin is stored whole or not at all (a rename).
        pool.shutdown(wait=False, cancel_futures=True)
        print("\ninterrupted", file=sys.stderr)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # (a broken pipe, or a closed stream: nothing more to say)
                pass
        os._exit(130)
    pool.shutdown()
    all_warnings = 0
    unstored = []
    for arch, f in zip(archs, futures):
        try:
            compiled, elapsed = f.result()
        except _build.KernelBuildError as e:
            _err(str(e))
            return EXIT_FAILURE
        except ValueError as e:
            _err(str(e))
            return EXIT_USAGE
        how = "from the cache" if compiled.cached else f"compiled in {elapsed:.1f} s"
        print()
        print(f"{arch}: {how}, cubin {_int(len(compiled.cubin))} bytes")
        res = compiled.resources()
        if res:
            rows = [[name, str(r.get("registers", "?")), str(r.get("spill_stores", "?")),
                     str(r.get("spill_loads", "?")), str(r.get("stack", "?")), str(r.get("smem", "?"))]
                    for name, r in sorted(res.items())]
            headers = ["kernel", "registers", "spill stores (B)", "spill loads (B)", "stack (B)", "static smem (B)"]
            print("\n".join("  " + line for line in _table(headers, rows, "lrrrrr")))
        elif compiled.cached:
            print("  (no ptxas report for a cached cubin; pass --report to recompile and show it)")
        warns = compiled.warnings()
        if not compiled.cached:
            print(f"  warnings: {len(warns) or 'none'}")
        for line in warns:
            print(f"  {line}")
        all_warnings += len(warns)
        if compiled.cache_error:
            unstored.append(f"{arch}: compiled, but not stored in the cubin cache ({compiled.cache_error}); "
                            f"{_build.cache_hint(compiled.cache_error)}")
    for why in unstored:
        _err(why)
    if unstored:
        return EXIT_FAILURE
    if args.strict and all_warnings:
        _err(f"{all_warnings} compiler warning(s) with --strict")
        return EXIT_FAILURE
    return EXIT_OK


# ------------------------------------------------------------------------------------------------
# inspect
# ------------------------------------------------------------------------------------------------
#: how :func:`flash_llm.load`'s FormatError for a safetensors file without flash-llm metadata ends
NOT_A_WEIGHT_FILE = "(not a flash-llm weight file)"


def _checkpoint_shard_hint(path: str) -> str | None:
    """What ``inspect`` says of ``path``, a safetensors file without flash-llm metadata, when it is part of the
    checkpoint directory it lies in (a ``config.json`` beside it): the ``model.safetensors`` of that directory, or,
    without one, a shard its ``model.safetensors.index.json`` lists.  A flash-llm checkpoint's shards carry no
    metadata of the weight files :func:`flash_llm.save` writes, so a shard alone is no flash-llm weight file; the
    message names the directory to inspect instead.  None otherwise (the caller keeps :func:`flash_llm.load`'s
    message)."""
    import json
    import shlex

    from flash_llm.checkpoint import _files

    file = Path(path)
    directory = file.parent
    where = os.path.dirname(path) or "."  # (the directory as the user named it)
    if not (directory / _files.CONFIG_NAME).is_file():
        return None
    if file.name == _files.WEIGHTS_NAME:
        what = f"the weights file of the checkpoint directory {where}"
    elif (directory / _files.WEIGHTS_NAME).exists():  # (the directory is read from that file: an old index's shard)
        return None
    else:
        try:
            weight_map = json.loads((directory / _files.INDEX_NAME).read_text(encoding="utf-8")).get("weight_map")
        except (OSError, UnicodeDecodeError, ValueError, AttributeError):  # (no index, or none that can be read)
            return None
        shards = sorted({f for f in weight_map.values() if isinstance(f, str)}) if isinstance(weight_map, dict) else []
        if file.name not in shards:
            return None
        what = (f"shard {shards.index(file.name) + 1} of {len(shards)} of the checkpoint directory {where} "
                f"({_files.INDEX_NAME} lists it)")
    return (f"{path} is {what}, not a flash-llm weight file of its own; inspect the whole checkpoint: "
            f"flash-llm inspect {shlex.quote(where)}")


def cmd_inspect(args) -> int:
    status = EXIT_OK
    for i, path in enumerate(args.paths):
        if os.path.isdir(path):  # a checkpoint directory (flash_llm/checkpoint/cli.py)
            from flash_llm.checkpoint.cli import inspect_directory

            if i:
                print()
            status = max(status, inspect_directory(path))
            continue
        try:
            loaded = flash_llm.load(path)
        except FormatError as e:
            shard = _checkpoint_shard_hint(path) if str(e).endswith(NOT_A_WEIGHT_FILE) else None
            _err(shard or str(e))
            status = EXIT_USAGE
            continue
        except FileNotFoundError:
            _err(f"{path}: no such file")
            status = EXIT_USAGE
            continue
        except OSError as e:
            _err(f"{path}: {e.strerror or e}")
            status = EXIT_USAGE
            continue
        weights = loaded if isinstance(loaded, dict) else {"weight": loaded}
        if i:
            print()
        size = os.path.getsize(path)
        print(f"{path}: {len(weights)} weight{'s' if len(weights) != 1 else ''}, {_int(size)} bytes on disk")
        rows = []
        elems = nnz = nbytes = dense = 0
        for name, w in weights.items():
            m, k = w.shape
            rows.append([name, type(w).__name__, f"{m}x{k}", str(w.dtype).removeprefix("torch."), _int(w.nnz),
                         f"{w.density:.4f}", _int(w.nbytes), f"{w.nbytes / (m * k):.3f}"])
            elems += m * k
            nnz += w.nnz
            nbytes += w.nbytes
            dense += m * k * torch.empty((), dtype=w.dtype).element_size()
        rows.append(["total", "", "", "", _int(nnz), f"{nnz / elems:.4f}", _int(nbytes), f"{nbytes / elems:.3f}"])
        headers = ["name", "format", "shape", "dtype", "nnz", "density", "bytes", "bytes/elem"]
        print("\n".join(_table(headers, rows, "llllrrrr")))
        print(f"dense equivalent: {_int(dense)} bytes; compressed is {dense / nbytes:.2f}x smaller")
    return status


# ------------------------------------------------------------------------------------------------
# parser and entry point
# ------------------------------------------------------------------------------------------------
def add_layer_demo_arguments(p) -> None:
    """The options of the synthetic-layer demo (``flash-llm demo --layer``; ``--seed``, ``--dtype`` and
    ``--device`` are shared with the model demo and defined by :mod:`flash_llm.demo`)."""
    p.add_argument("--shape", type=_shape, default=(4096, 4096), metavar="MxK",
                   help="weight shape [M, K] (default: 4096x4096)")
    p.add_argument("--sparsities", type=_sparsities, nargs="+", metavar="S",
                   help="sparsities, comma- or space-separated, each read like --sparsity: 0.5, 50 or 50%% "
                        "(default: 50,70,80,90)")
    p.add_argument("--tokens", type=_positive, default=8,
                   help="tokens (rows of x) for the error check (default: 8)")
    p.add_argument("--repeat", type=_positive, default=20, help="timed calls per GPU measurement (default: 20)")
    p.add_argument("--warmup", type=_non_negative, default=3, help="warm-up calls before GPU timing (default: 3)")


def model_path(text: str) -> str:
    """:func:`model_dir` as an argparse ``type=`` that keeps the argument a string (inspect's PATH, generate's PATH,
    convert's IN)."""
    try:
        return str(model_dir(text))
    except FileNotFoundError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flash-llm",
        description="flash-llm: unstructured-sparse LLM weights kept compressed (BitmapTiles, TiledCSL, DeltaRows) and "
                    "multiplied on tensor cores.",
        epilog="Run `flash-llm COMMAND --help` for a command's options.")
    parser.add_argument("--version", action="version", version=f"flash-llm {flash_llm.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for register in _subcommand_modules():  # the workflows (demo, prune, ...) first, then the tools
        register(sub)

    p = sub.add_parser(
        "info", help="versions, GPU, kernel support, NVRTC and the cubin cache",
        description="Print the flash-llm and torch versions, CUDA availability and each GPU's name and compute "
                    "capability, whether the CUDA kernels can run there, the NVRTC version (cuda-python) and "
                    "the cubin cache directory ($FLASH_LLM_CACHE/cubin, by default ~/.cache/flash_llm/cubin).")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "build", help="compile the CUDA kernels ahead of time (NVRTC) and report their resources",
        description="Compile the CUDA kernels with NVRTC for each --arch and store the cubins in the cache, so "
                    "the first flash_llm.spmm call does not wait for the compiler. No GPU is needed. Prints "
                    "whether each cubin came from the cache, its size and, when compiled, per kernel the "
                    "registers, spill bytes, stack frame and static shared memory reported by ptxas. "
                    "Exits 1 with NVRTC's log if compilation fails, and 1 if a cubin cannot be stored in the "
                    "cache (checked before compiling: the cache directory, $FLASH_LLM_CACHE/cubin, must be "
                    "creatable and writable).")
    p.add_argument("--arch", type=_arch, nargs="+", action="extend", metavar="SM",
                   help="target architectures, e.g. sm_80 sm_90 (default: the present GPU's, or sm_80 and "
                        "sm_90 without a GPU)")
    p.add_argument("--report", action="store_true",
                   help="always show the per-kernel resource table (recompiles a cached cubin for ptxas' report)")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 if NVRTC/ptxas print any warning (implies compiling for the log, like --report)")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser(
        "inspect", help="show the weights of a saved flash-llm file or checkpoint directory",
        description="Load a file written by w.save(path) or flash_llm.save({...}, path), validating every "
                    "weight, and print per weight its name, format, shape, dtype, nonzeros, density, bytes and "
                    "bytes per element, with totals. A directory is read as a Hugging Face checkpoint (dense, "
                    "sparse-bitmask or flash-llm): per tensor its format, shape, dtype, nonzeros, density and "
                    "bytes. Exits 2 if a file is missing, corrupt or not a flash-llm file.")
    p.add_argument("paths", nargs="+", metavar="PATH", type=model_path,
                   help="safetensors file(s) written by flash-llm, checkpoint directories, or a bundled model's name "
                        "(tiny-shakespeare)")
    p.set_defaults(func=cmd_inspect)
    return parser


def _subcommand_modules():
    """``register(subparsers)`` functions of the subcommands that live beside their workflow's code
    (each adds its parser and sets ``func``).  Imported lazily so ``flash-llm --help`` stays fast."""
    registers = []
    for module in SUBCOMMAND_MODULES:
        registers.append(importlib.import_module(module).register_cli)
    return registers


def main(argv: list[str] | None = None) -> int:
    """Run the ``flash-llm`` command line with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors: argparse has printed the message
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    _plug_closed_stderr()
    try:
        status = args.func(args)
        if sys.stdout is not None:
            sys.stdout.flush()  # (here, where a closed pipe is caught, not in the interpreter's flush at exit)
        return status
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout's reader has gone (`| head -1`): drop the rest quietly, as generate does
        discard_stdout()
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())

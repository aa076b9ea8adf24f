"""Checkpoint conversion and loading at real model shapes.

    python benchmarks/bench_checkpoint.py [--quick] [--model llama-3-8b] [--layers N] [--sparsity 80]
                                          [--device cuda] [--format bitmap] [--workdir DIR] [--out DIR]
                                          [--overwrite]

1. Writes a *dense* pruned checkpoint the way transformers stores one (fp16 safetensors shards + index): the
   model's real shapes (``flash_llm.models`` presets; ``--layers`` cuts the stack), random normal weights,
   every decoder projection pruned to ``--sparsity`` (random unstructured mask), embeddings and ``lm_head``
   dense.  Not timed.
2. Converts it with ``flash_llm.checkpoint.convert`` (compression on ``--device``) in a child process: wall
   time, input/output bytes, and the child's peak anonymous and file-backed resident memory (sampled every
   20 ms; memory-mapped shard pages are file-backed and reclaimable, anonymous memory is what the
   conversion really holds) above its baseline after the imports (and the CUDA context on CUDA), the absolute
   peaks beside them, against the largest input shard and the compressed model.
3. Opens the flash-llm checkpoint with ``flash_llm.from_pretrained`` on ``--device`` and on CPU (memory-mapped),
   each cold (the files' pages evicted from the page cache with ``posix_fadvise(DONTNEED)``, best effort) and
   warm, every tensor read inside the time (safetensors maps a CPU load lazily: its GB/s would count bytes never
   read), then checking the model (sparse layer count, one forward token).  With transformers installed, also
   ``AutoModelForCausalLM.from_pretrained`` (CPU, every tensor read inside the time too).

Writes ``results.json`` (environment with the command, the options, every measurement), ``results.csv`` and
``checkpoint_times.png`` under ``--out`` and prints a summary (an ``--out`` that holds any of them is refused without
``--overwrite``).
``--quick``: a tiny model (2MB shards) on CPU, a smoke run of every step (seconds); ``--model`` and ``--shard`` are
refused with it.  ``--workdir DIR`` keeps the checkpoints in ``DIR/dense`` and ``DIR/flash``; ones there are replaced
only where an earlier run made them (it leaves the marker ``DIR/.flash-llm-bench-checkpoint``), anything else there
of those names is refused.
"""

from __future__ import annotations

import argparse
import csv
import json
import mmap
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing as T  # noqa: E402

import flash_llm  # noqa: E402
from flash_llm import SparseLinear  # noqa: E402
from flash_llm.checkpoint import _files  # noqa: E402
from flash_llm.cli import _positive, sparsity_arg  # noqa: E402
from flash_llm.models import PRESETS, ModelConfig, from_config, preset  # noqa: E402

OUTPUTS = ("results.json", "results.csv", "checkpoint_times.png")
#: in ``--workdir``: its ``dense/`` and ``flash/`` are this script's, to replace (nothing else there is removed)
WORKDIR_MARKER = ".flash-llm-bench-checkpoint"
QUICK = ModelConfig(family="llama", vocab_size=1000, hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
                    intermediate_size=512, max_position_embeddings=128, name="quick")


def _memory() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


class _PeakMemory:
    """Samples this process's anonymous and file-backed resident memory in a thread; keeps the maxima."""

    def __init__(self, every: float = 0.02):
        self.every, self.peak, self._stop = every, {"RssAnon": 0, "RssFile": 0}, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            m = _memory()
            for k in self.peak:
                self.peak[k] = max(self.peak[k], m.get(k, 0))
            time.sleep(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def write_dense_source(cfg: ModelConfig, path: Path, sparsity: float, device: torch.device, shard: str) -> dict:
    """A transformers-style dense fp16 checkpoint of ``cfg`` with pruned projections, one tensor at a time."""
    skeleton = from_config(cfg, dtype=torch.float16, device="meta")
    linears = {n for n, m in skeleton.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    gen = torch.Generator(device=device).manual_seed(0)
    state = skeleton.state_dict()
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight")
    path.mkdir(parents=True)
    writer = _files.ShardWriter(path, shard)
    nnz = total = 0
    for name, meta in flash_llm.checkpoint.pretrained._progress(iterable=state.items(), total=len(state),
                                                                desc="writing the dense source", unit="tensor"):
        t = torch.randn(meta.shape, generator=gen, device=device, dtype=torch.float32).mul_(0.02).half()
        if name.endswith(".weight") and name[:-7] in linears:
            t[torch.rand(meta.shape, generator=gen, device=device) < sparsity] = 0
            nnz += int(torch.count_nonzero(t))
            total += t.numel()
        elif t.ndim == 1:
            t.fill_(1.0 if "norm" in name else 0.0)
        writer.add({name: t})
    writer.close()
    _files.write_json(path / "config.json", {**cfg.to_hf(), "dtype": "float16"})
    return {"projection_density": nnz / max(total, 1)}


def _evict(path: Path) -> bool:
    """Drop ``path``'s files from the page cache (best effort; returns whether the call was available)."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for p in path.iterdir():
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    return True


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _read_all(model) -> None:
    """Read every CPU parameter and buffer of ``model`` from memory: one byte of each page and its last byte, so a
    memory-mapped tensor (safetensors maps a CPU load lazily) has every page read from its file.  Tensors on a GPU
    were read when copied there."""
    for t in {id(t): t for t in [*model.parameters(), *model.buffers()]}.values():
        if t.device.type == "cpu" and t.numel():
            flat = t.detach().reshape(-1).view(torch.uint8)
            flat[::mmap.PAGESIZE].sum()
            flat[-1].item()


def time_open(path: Path, device, n_sparse: int, vocab: int) -> float:
    """Seconds to load the flash-llm checkpoint at ``path`` on ``device`` with every tensor read (:func:`_read_all`),
    then a check of the model: ``n_sparse`` sparse layers, one forward token to ``vocab`` finite logits."""
    _sync(device)
    t0 = time.perf_counter()
    model = flash_llm.from_pretrained(path, device=device, progress=False)
    _read_all(model)
    _sync(device)
    elapsed = time.perf_counter() - t0
    got = sum(isinstance(m, SparseLinear) for m in model.modules())
    if got != n_sparse:
        raise AssertionError(f"{path}: {got} sparse layers after loading, expected {n_sparse}")
    with torch.no_grad():
        out = model(torch.tensor([[1]], device=device))
    if tuple(out.shape) != (1, 1, vocab) or not bool(torch.isfinite(out).all()):
        raise AssertionError(f"forward after loading gave shape {tuple(out.shape)} / non-finite logits")
    del model, out
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return elapsed


def _child_convert(args) -> None:
    """Run in a child process: convert and print a JSON line with the time and the memory peaks, absolute and above
    the baseline (the resident memory after the imports, and the CUDA context on CUDA, sampled before converting)."""
    if torch.device(args.device).type == "cuda":
        torch.zeros(1, device=args.device)  # (the context's host memory belongs to the baseline)
    base = _memory()
    with _PeakMemory() as peak:
        t0 = time.perf_counter()
        report = flash_llm.checkpoint.convert(args.src, args.dst, format=args.format, min_sparsity=0.5,
                                              device=args.device, max_shard_size=args.shard, progress=False)
        _sync(args.device)
        elapsed = time.perf_counter() - t0
    out = {"seconds": elapsed}
    for kind, key in (("anon", "RssAnon"), ("file", "RssFile")):
        out.update({f"peak_{kind}_above_baseline": max(0, peak.peak[key] - base[key]),
                    f"peak_{kind}_absolute": peak.peak[key], f"baseline_{kind}": base[key]})
    print(json.dumps({**out, "converted": len(report.converted), "skipped": len(report.skipped),
                      "sparse_bytes": report.sparse_bytes, "dense_bytes": report.dense_bytes}))


def _unusable_workdir(work: Path) -> str | None:
    """Why the run must not use ``work`` (a ``--workdir``), or None: it is not a directory, or its ``dense`` /
    ``flash`` exist, are not empty directories, and no earlier run of this script marked ``work`` as its own
    (:data:`WORKDIR_MARKER`): the run replaces those two, and only what it made itself."""
    if os.path.lexists(work) and not work.is_dir():
        return f"{work} is not a directory"
    if (work / WORKDIR_MARKER).is_file():
        return None
    held = [str(p) for p in (work / "dense", work / "flash")
            if os.path.lexists(p) and (p.is_symlink() or not p.is_dir() or any(p.iterdir()))]
    if not held:
        return None
    return (f"{' and '.join(held)} already exist{'s' if len(held) == 1 else ''}, not made by this script (it replaces "
            f"only a dense/ and flash/ of its own, marked by {WORKDIR_MARKER}); pass another --workdir, or remove "
            f"{'it' if len(held) == 1 else 'them'}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="a tiny model with 2MB shards on CPU: a smoke run of every step (--model / --shard refused)")
    ap.add_argument("--model", default=None, choices=sorted(PRESETS),
                    help="a flash_llm.models preset (default llama-3-8b; not with --quick)")
    ap.add_argument("--layers", type=_positive, default=None, help="decoder layers (default: the model's)")
    ap.add_argument("--sparsity", type=sparsity_arg, default=0.8,
                    help="of the projections: a fraction or a percentage, 0.8, 80 and 80%% alike (default 0.8)")
    ap.add_argument("--format", default="bitmap", choices=["bitmap", "tiled-csl"])
    ap.add_argument("--device", default=None, help="compression / load device (default: cuda if available)")
    ap.add_argument("--shard", default=None, help="shard size of both checkpoints (default 5GB; not with --quick)")
    ap.add_argument("--workdir", default=None,
                    help="where the checkpoints go, as DIR/dense and DIR/flash, kept (default: a temporary "
                         "directory); a dense/ or flash/ there that an earlier run did not make is refused")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints of the temporary directory")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers load")
    ap.add_argument("--no-cpu-load", action="store_true", help="time loading on --device only, not also on CPU")
    ap.add_argument("--out", default="benchmarks/out/checkpoint")
    ap.add_argument("--overwrite", action="store_true", help="replace existing result files in --out")
    ap.add_argument("--_child", nargs=5, metavar=("SRC", "DST", "FORMAT", "DEVICE", "SHARD"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._child:
        src, dst, fmt, device, shard = args._child
        _child_convert(argparse.Namespace(src=src, dst=dst, format=fmt, device=device, shard=shard))
        return 0
    # every option checked before anything is written or removed (exit status 2, the option named)
    if args.quick and (args.model or args.shard):
        ap.error(f"--quick runs its own tiny model with 2MB shards: drop "
                 f"{' and '.join(f for f, v in (('--model', args.model), ('--shard', args.shard)) if v)}")
    args.model, args.shard = args.model or "llama-3-8b", args.shard or "5GB"  # (--quick: replaced below)
    try:
        _files.parse_size(args.shard)
    except ValueError as e:
        ap.error(f"--shard: {e}")
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.quick else "cpu"))
    except RuntimeError as e:
        ap.error(f"--device {args.device!r}: {e}")
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: no CUDA device is available; use --device cpu")
    cfg = QUICK if args.quick else preset(args.model)
    if args.layers is not None:
        cfg = cfg.replace(num_layers=args.layers)
    shard = "2MB" if args.quick else args.shard
    # what runs, as "options" records it: --quick's tiny model and 2MB shards, the device and layer count resolved
    options = {**{k: v for k, v in vars(args).items() if k != "_child"},
               "model": cfg.name if args.quick else args.model, "shard": shard, "device": str(device),
               "layers": cfg.num_layers}
    existing = [f for f in OUTPUTS if os.path.exists(os.path.join(args.out, f))]  # as bench_e2e.py
    if existing and not args.overwrite:
        print(f"error: {args.out} already holds {', '.join(existing)}; pass --overwrite or another --out",
              file=sys.stderr)
        return 2
    why = _unusable_workdir(Path(args.workdir)) if args.workdir else None
    if why:  # (as the --out check: nothing of the user's is deleted)
        print(f"error: --workdir {args.workdir}: {why}", file=sys.stderr)
        return 2
    # the dense source (2 bytes a parameter) and the converted checkpoint (at most as large) go to the workdir: refuse
    # up front where they cannot fit, not after writing gigabytes of it
    need = 2 * 2 * cfg.num_parameters()
    root = Path(args.workdir) if args.workdir else Path(tempfile.gettempdir())
    probe = next((p for p in (root, *root.parents) if p.exists()), Path("/"))
    free = shutil.disk_usage(probe).free
    if need > free:
        print(f"error: {cfg.name} needs about {need / 1e9:.1f} GB in {root} (its dense source and the converted "
              f"checkpoint) and {free / 1e9:.1f} GB are free; pass --workdir elsewhere, --layers N, or --quick",
              file=sys.stderr)
        return 2
    # a SIGTERM (a time limit, say) unwinds like Ctrl-C, so the temporary workdir is removed below
    old_term = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="flash-llm-bench-ckpt-"))
    dense, flash = work / "dense", work / "flash"
    if args.workdir:  # (checked above: what is there of those names is an earlier run's, or an empty directory)
        work.mkdir(parents=True, exist_ok=True)
        (work / WORKDIR_MARKER).write_text("dense/ and flash/ here are checkpoints of benchmarks/bench_checkpoint.py, "
                                           "replaced by its next run with this --workdir\n")
        for p in (dense, flash):
            if p.exists():
                shutil.rmtree(p)
    os.makedirs(args.out, exist_ok=True)
    env = T.environment(device)
    env["command"] = T.command(__file__, argv)
    rows = []
    result = {"env": env, "options": options, "model": cfg.name,
              "layers": cfg.num_layers, "params": cfg.num_parameters(), "sparsity": args.sparsity,
              "format": args.format, "device": str(device), "shard": shard, "rows": rows}
    def save():  # after every step, so a run cut short still leaves what it measured
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(result, f, indent=2)
        keys = ["step", "seconds", "bytes", "gb_per_s", "peak_anon_above_baseline_bytes", "peak_anon_absolute_bytes",
                "peak_file_above_baseline_bytes", "peak_file_absolute_bytes"]
        with open(os.path.join(args.out, "results.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)

    def step(row):
        rows.append(row)
        save()
        extra = f", {row['gb_per_s']:.2f} GB/s" if "gb_per_s" in row else ""
        print(f"  {row['step']}: {row['seconds']:.2f} s{extra}", flush=True)

    print(f"{cfg.name}: {cfg.num_layers} layers, {cfg.num_parameters() / 1e9:.2f} B parameters, projections at "
          f"{args.sparsity:.0%} sparsity; device {device}; workdir {work}")
    try:
        t0 = time.perf_counter()
        result.update(write_dense_source(cfg, dense, args.sparsity, device, shard))
        dense_files = _files.open_checkpoint(dense)
        largest = max(p.stat().st_size for p in dense_files.shards)
        step({"step": "write dense source (not the benchmark)", "seconds": time.perf_counter() - t0,
              "bytes": dense_files.nbytes})

        _evict(dense)
        pythonpath = os.pathsep.join(filter(None, [str(Path(flash_llm.__file__).resolve().parents[1]),
                                                   os.environ.get("PYTHONPATH")]))
        child = subprocess.run([sys.executable, os.path.abspath(__file__), "--_child", str(dense), str(flash),
                                args.format, str(device), shard], capture_output=True, text=True,
                               env={**os.environ, "PYTHONPATH": pythonpath})
        if child.returncode != 0:
            raise RuntimeError(f"conversion failed:\n{child.stderr}")
        conv = json.loads(child.stdout.strip().splitlines()[-1])
        flash_files = _files.open_checkpoint(flash)
        result["convert"] = {**conv, "input_bytes": dense_files.nbytes, "output_bytes": flash_files.nbytes,
                             "largest_input_shard": largest}
        step({"step": f"convert on {device} (input cold)", "seconds": conv["seconds"],
              "bytes": dense_files.nbytes, "gb_per_s": dense_files.nbytes / conv["seconds"] / 1e9,
              **{f"peak_{kind}_{how}_bytes": conv[f"peak_{kind}_{how}"]
                 for kind in ("anon", "file") for how in ("above_baseline", "absolute")}})
        c = result["convert"]
        print(f"dense source {c['input_bytes'] / 1e9:.2f} GB (largest shard {c['largest_input_shard'] / 1e9:.2f} GB)"
              f" -> flash-llm {c['output_bytes'] / 1e9:.2f} GB; {c['converted']} layers compressed, {c['skipped']} "
              f"kept dense; conversion peak memory above the baseline after the imports: anonymous "
              f"{c['peak_anon_above_baseline'] / 1e9:.2f} GB, file-backed (mmap) "
              f"{c['peak_file_above_baseline'] / 1e9:.2f} GB (absolute peaks {c['peak_anon_absolute'] / 1e9:.2f} / "
              f"{c['peak_file_absolute'] / 1e9:.2f} GB); compressed projections {c['sparse_bytes'] / 1e9:.2f} GB",
              flush=True)

        n_sparse = conv["converted"]
        for dev in dict.fromkeys([str(device)] + ([] if args.no_cpu_load else ["cpu"])):
            for state in ("cold", "warm"):
                evicted = _evict(flash) if state == "cold" else None
                s = time_open(flash, dev, n_sparse, cfg.vocab_size)
                step({"step": f"flash_llm.from_pretrained on {dev} ({state}"
                              f"{'' if evicted in (None, True) else ', eviction unavailable'})",
                      "seconds": s, "bytes": flash_files.nbytes, "gb_per_s": flash_files.nbytes / s / 1e9})
        if not args.no_hf:
            try:
                import transformers
            except ImportError:
                transformers = None
            if transformers is not None:
                t0 = time.perf_counter()
                hf = transformers.AutoModelForCausalLM.from_pretrained(flash)
                _read_all(hf)  # (as time_open: every byte counted read)
                s = time.perf_counter() - t0
                got = sum(isinstance(m, SparseLinear) for m in hf.modules())
                if got != n_sparse:
                    raise AssertionError(f"transformers loaded {got} sparse layers, expected {n_sparse}")
                del hf
                step({"step": "transformers AutoModelForCausalLM.from_pretrained on cpu (warm)",
                      "seconds": s, "bytes": flash_files.nbytes, "gb_per_s": flash_files.nbytes / s / 1e9})
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
        signal.signal(signal.SIGTERM, old_term)

    save()
    _plot(rows, os.path.join(args.out, "checkpoint_times.png"), f"{cfg.name} ({cfg.num_layers} layers), "
          f"{args.sparsity:.0%} sparse, {env['card']}")
    return 0


def _plot(rows, path, title):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return
    timed = [r for r in rows if not r["step"].startswith("write")]
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(timed) + 1.5))
    ax.barh([r["step"] for r in timed][::-1], [r["seconds"] for r in timed][::-1], color="tab:blue")
    ax.set_xlabel("seconds")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())

"""Time to first token of one engine, switches of the package A/B'd inside one process (session 63).

End-to-end runs of ``bench_e2e.py`` compare settings across processes, where the time to first token moves by tens
of milliseconds between runs (session 62: dense OPT-30B 47-74 ms).  Here one model and one engine serve every
setting, the settings interleaved round by round, so the card, the clocks and the allocator are the same for all.
A setting is a module attribute of :mod:`flash_llm.kernels` read at launch time (e.g. ``DR_DENSE_NOFILL``).

    python3 benchmarks/prefill_ab.py --model opt-30b --format delta-rows --sparsity 80 --dtype bf16 \\
        --settings "base:;nofill:DR_DENSE_NOFILL=1" --rounds 8

Per setting it prints the median time to first token (``Generation.ttft_s``: the prefill of the batch's prompts and
the first sampling) and, once each, the prefill's CUDA kernel time by kernel name under ``torch.profiler`` (top
``--top``), so a kernel's gain can be followed into the prefill.  With ``--graph`` it also captures the prefill in a
CUDA graph under each setting and times its replays (since session 69; before, under the defaults only): the eager
time to first token is bound by the host's launches (Llama-3-8B: 57-136 ms either way in session 69, where the
graph's was 15.6 against 23.8), so a kernel's gain shows there.  ``--json`` writes all of it (:func:`json_record`;
its ``args.sparsity`` in percent, 80 for 80 %, however ``--sparsity`` was given).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from flash_llm import kernels  # noqa: E402
from flash_llm import engine as engine_mod  # noqa: E402
from flash_llm.engine import Engine  # noqa: E402
from flash_llm.cli import sparsity_arg  # noqa: E402
from flash_llm.models.synthetic import build_synthetic  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ttft_lengths import json_args  # noqa: E402


def parse_settings(text: str) -> list[tuple[str, dict[str, object]]]:
    """``"name:A=1,B=0;other:"`` -> ``[(name, {A: 1, B: 0}), (other, {})]``; values are Python literals
    (``1``, ``0.5``, ``True``) or else strings; every name must be an attribute of :mod:`flash_llm.kernels`."""
    out = []
    for part in text.split(";"):
        part = part.strip()
        if not part:
            continue
        name, _, assigns = part.partition(":")
        values: dict[str, object] = {}
        for a in filter(None, (s.strip() for s in assigns.split(","))):
            key, eq, val = a.partition("=")
            if not eq:
                raise ValueError(f"--settings: {a!r} is not NAME=VALUE")
            if not hasattr(kernels, key):
                raise ValueError(f"--settings: flash_llm.kernels has no attribute {key!r}")
            try:
                values[key] = json.loads(val.lower() if val.lower() in ("true", "false") else val)
            except json.JSONDecodeError:
                values[key] = val
        out.append((name.strip() or f"setting{len(out)}", values))
    if not out:
        raise ValueError("--settings: no setting given")
    return out


class applied:
    """Context manager: set ``kernels``' attributes, restore them on exit."""

    def __init__(self, values: dict[str, object]):
        self.values, self.saved = values, {}

    def __enter__(self):
        for k, v in self.values.items():
            self.saved[k] = getattr(kernels, k)
            setattr(kernels, k, v)  # (a switch the launch plans read clears their cache: kernels._PLAN_SWITCHES)

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            setattr(kernels, k, v)


def kernel_times(eng: Engine, prompts, top: int) -> list[tuple[str, float, int]]:
    """``[(kernel name, total us, calls)]`` of one ``generate(prompts, 1)`` under ``torch.profiler``, longest first."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        eng.generate(prompts, 1, eos_token_id=None)
        torch.cuda.synchronize()
    sums: dict[str, list] = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            s = sums.setdefault(ev.name, [0.0, 0])
            s[0] += ev.device_time
            s[1] += 1
    rows = sorted(((n[:70], t, c) for n, (t, c) in sums.items()), key=lambda r: -r[1])
    return rows[:top] + [("(all kernels)", sum(t for _, t, _ in rows), sum(c for _, _, c in rows))]


def _event_ms(fn) -> tuple[float, float]:
    """(GPU ms between events around ``fn()``, host ms of the call itself)."""
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    a.record()
    t0 = time.perf_counter()
    fn()
    host = 1e3 * (time.perf_counter() - t0)
    b.record()
    b.synchronize()
    return a.elapsed_time(b), host


def prefill_graph(eng: Engine, prompts, rounds: int) -> dict:
    """The engine's prefill (``Engine._prefill``, the first sampling left out) run eagerly and replayed from a CUDA graph
    captured over it, in turn: medians of GPU ms (events) and the eager call's host ms, and whether the graph's logits
    are the eager ones bit for bit.  A what-if for capturing the prefill (session 63); an error in the capture is
    returned, not raised."""
    ids, mask, _, _ = eng._prepare(prompts, None, 1)
    out: dict = {}
    eager = [_event_ms(lambda: eng._prefill(ids, mask)) for _ in range(rounds)]
    ref = eng._logits[: ids.shape[0]].clone()
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            eng._prefill(ids, mask)
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            eng._prefill(ids, mask)
    except Exception as e:  # noqa: BLE001 (a what-if: say why the capture failed)
        out["capture_error"] = f"{type(e).__name__}: {e}"[:300]
        return out
    g.replay()
    torch.cuda.synchronize()
    out["graph_logits_equal"] = bool(torch.equal(eng._logits[: ids.shape[0]], ref))
    graph = [_event_ms(g.replay) for _ in range(rounds)]
    out.update(eager_gpu_ms=statistics.median(t for t, _ in eager), eager_host_ms=statistics.median(h for _, h in eager),
               graph_gpu_ms=statistics.median(t for t, _ in graph))
    del g
    return out


def json_record(args: argparse.Namespace, card: str, times: dict[str, list[float]],
                prof: dict[str, list[tuple[str, float, int]]], graph: dict | None) -> dict:
    """What ``--json`` writes: the options (``sparsity`` in percent: ``ttft_lengths.json_args``), the card, torch,
    the commit, each setting's times to first token (ms), its prefill kernels ``[name, us, calls]`` and, with
    ``--graph``, its :func:`prefill_graph` (else None)."""
    return {"args": json_args(args), "card": card, "torch": torch.__version__,
            "commit": os.environ.get("FLASH_LLM_COMMIT"), "ttft_ms": times,
            "kernels": {n: [list(r) for r in rows] for n, rows in prof.items()}, "graph": graph}


def parse_args(argv=None) -> argparse.Namespace:
    """The options; a bad ``--sparsity`` is refused here (``ap.error``, exit status 2), before any CUDA work."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="opt-30b")
    p.add_argument("--format", default="delta-rows", choices=("bitmap", "tiled-csl", "delta-rows"))
    p.add_argument("--sparsity", type=sparsity_arg, default=0.8,
                   help="a fraction or a percentage (0.8, 80 and 80%% alike; 0: dense)")
    p.add_argument("--dtype", default="bf16", choices=("fp16", "bf16"))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--settings", default="base:;nofill:DR_DENSE_NOFILL=1",
                   help='"name:ATTR=V,...;name2:..." (attributes of flash_llm.kernels; an empty list is the defaults)')
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--top", type=int, default=8)
    p.add_argument("--graph", action="store_true",
                   help="also time the prefill captured in a CUDA graph under each setting (the eager time to first "
                        "token is bound by the host's launches on small models)")
    p.add_argument("--engine-graphs", action="store_true",
                   help="let the engine capture its prefill (engine.PREFILL_GRAPHS; off here by default: a graph keeps the "
                        "switches it was captured under, so the settings would not differ)")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("prefill_ab.py: needs a CUDA GPU", file=sys.stderr)
        return 2
    settings = parse_settings(args.settings)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    dev = torch.device("cuda")
    model, report = build_synthetic(args.model, args.sparsity or None, dtype=dtype, device=dev, seed=1,
                                    progress=False, fmt=args.format)
    print(report, flush=True)
    engine_mod.PREFILL_GRAPHS = args.engine_graphs
    eng = Engine(model, max_batch=args.batch, max_seq=args.prompt + 4, fuse=True, merge=True)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, model.config.vocab_size, (args.batch, args.prompt), generator=gen).tolist()
    for _, values in settings:  # warm-up: each setting's kernels compiled and loaded, the graphs captured
        with applied(values):
            eng.generate(prompts, 2, eos_token_id=None)
    times: dict[str, list[float]] = {n: [] for n, _ in settings}
    for _ in range(args.rounds):
        for name, values in settings:
            with applied(values):
                times[name].append(1e3 * eng.generate(prompts, 1, eos_token_id=None).ttft_s)
    prof = {}
    for name, values in settings:
        with applied(values):
            prof[name] = kernel_times(eng, prompts, args.top)
    graph = None
    if args.graph:  # (captured under each setting: the switches are read as the kernels are launched, so captured)
        graph = {}
        for name, values in settings:
            with applied(values):
                graph[name] = prefill_graph(eng, prompts, args.rounds)
    card = torch.cuda.get_device_name(dev)
    print(f"\n{args.model} {args.format} {100 * args.sparsity:g} % {args.dtype}, batch {args.batch}, prompt "
          f"{args.prompt}, {card}, torch {torch.__version__}")
    for name, _ in settings:
        print(f"\n{name}: prefill kernels (one generate of one token, us, calls)")
        for n, t, c in prof[name]:
            print(f"  {t:10.1f} {c:5d}  {n}")
    print("\nsetting | TTFT median ms | min | max | rounds" + (" | prefill in a CUDA graph, GPU ms" if graph else ""))
    print("---|---|---|---|---" + ("|---" if graph else ""))
    for name, _ in settings:
        t = times[name]
        cell = ""
        if graph:
            gr = graph[name]
            cell = f" | {gr['graph_gpu_ms']:.2f}" if "graph_gpu_ms" in gr else f" | {gr.get('capture_error', '-')}"
        print(f"{name} | {statistics.median(t):.2f} | {min(t):.2f} | {max(t):.2f} | {len(t)}{cell}")
    if graph is not None:
        for name, gr in graph.items():
            print(f"prefill eager / CUDA graph ({name}): {json.dumps(gr)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(json_record(args, card, times, prof, graph), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

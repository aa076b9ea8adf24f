"""Where a DeltaRows N = 1 launch's time goes: phase stamps of every warp, from a kernel built with a tracing patch.

    # in a copy of the tree at commit 9938e1e (session 28's kernel; at 7fb70b8, before the ring, the patch
    # benchmarks/results/2026-12-01-s27/dr_trace.patch):
    git apply benchmarks/results/2026-12-01-s28/dr_trace.patch   # adds a trace pointer to delta_rows_spmm_*_n1
    python benchmarks/delta_rows_trace.py [--sparsity 0.8] [--graph-layers 3]

The patch makes lane 0 of every warp write ``%globaltimer`` (ns) at seven points: 0 entry, 1 the window's header
loaded (the block barrier after it), 2 after the programmatic wait, 3 X staged (the last block barrier), 4 the walk
done, 5 the ticket taken, 6 the output written (the slice's last warp only); then its SM, groups walked, ticket
order, slice, split and window width (words 8-13).  The script times Llama-3-8B's four projections (fp16, the
engine's epilogues: qkv with RMSNorm, o and down with the residual add, gate / up paired with RMSNorm and SiLU), each
alone and then the four launched one after another programmatically (as in the decode step), and prints per launch
the span, the spread of the warps' entries and ends, and each phase's percentiles over the warps (us).  With
``--graph-layers L`` it then captures L decoder layers' sixteen launches (each layer its own weights) in a CUDA graph
under ``static_weights`` (programmatic launches, as the engine's decode step, without the attention between q/k/v and
o) and traces one replay: there the next launch's blocks become resident while the previous one runs, so the report
adds how many of its warps entered before the previous launch's last end and what each launch's span adds to the
chain.  The stamps take a few instructions each; they order nothing else.  Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse

import torch

from flash_llm import DeltaRows, kernels
from flash_llm.cli import sparsity_arg
from flash_llm.reference import FORMAT_IDS

FID = FORMAT_IDS[DeltaRows]
LAYERS = [("qkv", 6144, 4096, "norm"), ("o", 4096, 4096, "resid"), ("gate_up", 28672, 4096, "norm_silu"),
          ("down", 4096, 14336, "resid")]
PHASES = ["header", "pdl wait", "staging", "walk", "ticket"]


def pct(v: torch.Tensor, qs=(0.1, 0.5, 0.9, 1.0)) -> str:
    v = v.double()
    return " / ".join(f"{float(torch.quantile(v, q)) / 1000:6.2f}" for q in qs)


def report(name: str, t: torch.Tensor, base: int | None = None) -> tuple[int, int]:
    """Print one launch's stamps ``t`` [warps, 16] (int64); returns its first entry and last end (ns)."""
    t = t[t[:, 5] > 0]  # live warps (those past a slice's end stamp nothing after entry)
    first = int(t[:, 0].min())
    base = first if base is None else base
    end = torch.where(t[:, 6] > 0, t[:, 6], t[:, 5])
    last = t[:, 6] > 0
    sms = len(set(t[:, 8].tolist()))
    print(f"{name}: {t.shape[0]} warps on {sms} SMs, span {(int(end.max()) - first) / 1000:.2f} us"
          f" (entries from {(first - base) / 1000:.2f}), groups a warp {int(t[:, 9].min())}-{int(t[:, 9].max())},"
          f" window {int(t[:, 13].float().mean())} columns on average")
    print(f"  {'(us: p10 / p50 / p90 / max)':28s}")
    print(f"  {'entry':16s} {pct(t[:, 0] - base)}")
    for k, ph in enumerate(PHASES):
        print(f"  {ph:16s} {pct(t[:, k + 1] - t[:, k])}")
    print(f"  {'finish (last)':16s} {pct((t[:, 6] - t[:, 5])[last])}")
    print(f"  {'end':16s} {pct(end - base)}")
    walk = (t[:, 4] - t[:, 3]).double() / t[:, 9].clamp(min=1).double()
    per = " / ".join(f"{float(torch.quantile(walk, q)):6.0f}" for q in (0.1, 0.5, 0.9, 1.0))
    print(f"  {'walk ns / group':16s} {per}")
    slow = int(end.argmax())
    print(f"  slowest warp: slice {int(t[slow, 11])} split {int(t[slow, 12])} SM {int(t[slow, 8])}, "
          f"entry {(int(t[slow, 0]) - base) / 1000:.2f}, phases "
          + ", ".join(f"{ph} {(int(t[slow, k + 1]) - int(t[slow, k])) / 1000:.2f}" for k, ph in enumerate(PHASES))
          + f", groups {int(t[slow, 9])}")
    return first, int(end.max())


def parse_args(argv=None) -> argparse.Namespace:
    """The options; a bad ``--sparsity`` is refused here (``ap.error``, exit status 2), before any CUDA work."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sparsity", type=sparsity_arg, default=0.8,
                    help="a fraction or a percentage (0.8, 80 and 80%% alike)")
    ap.add_argument("--graph-layers", type=int, default=0, help="decoder layers to trace in a CUDA graph (0: none)")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    a = parse_args(argv)
    gen = torch.Generator(device="cuda").manual_seed(0)
    cases = build(a.sparsity, gen)
    print(f"DeltaRows at {a.sparsity:.0%}, fp16, N = 1, on {torch.cuda.get_device_name()}")
    chain(cases)
    if a.graph_layers > 0:
        layers = [cases] + [build(a.sparsity, gen) for _ in range(a.graph_layers - 1)]
        graph([c for layer in layers for c in layer])


def build(sparsity: float, gen: torch.Generator) -> list:
    """One decoder layer's four cases (name, weight, x, the epilogue's keyword arguments, trace buffer)."""
    cases = []
    for name, m, k, epi in LAYERS:
        wd = torch.randn(m, k, device="cuda", generator=gen)
        wd = torch.where(torch.rand(m, k, device="cuda", generator=gen) >= sparsity, wd, 0.0).half()
        w = DeltaRows.from_dense(wd, pair_halves=epi == "norm_silu")
        del wd
        x = torch.randn(1, k, device="cuda", generator=gen).half()
        g = (torch.rand(k, device="cuda", generator=gen) + 0.5).half()
        acc = torch.randn(1, m, device="cuda", generator=gen).half()
        kw = {"norm": {"norm": (g, 1e-5)}, "resid": {"add_to": acc},
              "norm_silu": {"norm": (g, 1e-5), "act": "silu_mul"}}[epi]
        warps = -(-m // 32 // kernels.DR_WARPS) * kernels.DR_WARPS * w.splits
        tr = torch.zeros(warps * 16, dtype=torch.int64, device="cuda")
        cases.append((name, w, x, kw, tr))
    return cases


def launch(case, traced):
    name, w, x, kw, tr = case
    kernels.DR_TRACE = tr if traced else None
    kernels.spmm_cuda(x, w.data, w.offsets, FID, w.shape[0], w.shape[1], None, **kw)


def chain(cases: list) -> None:
    """Each case alone, then the four launched one after another programmatically (host launches: gaps between)."""
    for case in cases:  # alone, plain launches
        for _ in range(5):
            launch(case, False)
        case[4].zero_()
        torch.cuda.synchronize()
        launch(case, True)
        torch.cuda.synchronize()
        report(case[0] + " (alone)", case[4].view(-1, 16).cpu())
    # one decoder layer's four launches, programmatic (as the engine's decode step), after a warm-up round
    with kernels.static_weights():
        for traced in (False, True):
            for case in cases:
                if traced:
                    case[4].zero_()
            torch.cuda.synchronize()
            for case in cases:
                launch(case, traced)
            torch.cuda.synchronize()
    kernels.DR_TRACE = None
    base = None
    prev_end = None
    for case in cases:
        first, end = report(case[0] + " (in the chain)", case[4].view(-1, 16).cpu(), base)
        base = first if base is None else base
        if prev_end is not None:
            print(f"  first entry {(first - prev_end) / 1000:+.2f} us after the previous launch's last end")
        prev_end = end
    print(f"chain: {(prev_end - base) / 1000:.2f} us from the first entry to the last end")


def graph(cases: list) -> None:
    """The cases' launches captured in one CUDA graph (programmatic, under static_weights), one replay traced."""
    stream = torch.cuda.Stream()
    with kernels.static_weights():
        with torch.cuda.stream(stream):
            for case in cases:  # warm-up (and kernel loading) outside the capture
                launch(case, True)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=stream):
            for case in cases:
                launch(case, True)
    kernels.DR_TRACE = None
    for _ in range(3):
        g.replay()
    for case in cases:
        case[4].zero_()
    torch.cuda.synchronize()
    g.replay()
    torch.cuda.synchronize()
    print(f"\n{len(cases)} launches in one CUDA graph, programmatic (one replay):")
    base = prev_end = None
    spans = {}
    for i, case in enumerate(cases):
        t = case[4].view(-1, 16).cpu()
        first, end = report(f"{case[0]} #{i // len(LAYERS)} (graph)", t, base)
        base = first if base is None else base
        if prev_end is not None:
            live = t[t[:, 5] > 0]
            early = float((live[:, 0] < prev_end).double().mean())
            print(f"  first entry {(first - prev_end) / 1000:+.2f} us after the previous launch's last end; "
                  f"{early:.0%} of its warps entered before it; adds {(end - prev_end) / 1000:.2f} us to the chain")
            spans.setdefault(case[0], []).append((end - prev_end) / 1000)
        prev_end = end
    total = (prev_end - base) / 1000
    print(f"graph chain: {total:.2f} us, {total / (len(cases) / len(LAYERS)):.2f} us a layer; us added a launch: "
          + ", ".join(f"{k} {sum(v) / len(v):.2f}" for k, v in spans.items()))


if __name__ == "__main__":
    main()

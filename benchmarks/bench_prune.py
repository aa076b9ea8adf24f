"""Time SparseGPT on one LLM-sized layer: ``flash_llm.prune.sparsegpt_prune_`` on an ``nn.Linear`` 4096x4096
(fp16) with 128 calibration sequences of 2048 tokens.

    python benchmarks/bench_prune.py                       # on a GPU; target: under 2 s on an H100
    python benchmarks/bench_prune.py --shape 256x256 --seqs 4 --seq-len 64 --repeat 2    # CPU check

Why these numbers: 128 sequences x 2048 tokens is the calibration set of the SparseGPT paper (128 segments of
2048 tokens), i.e. 262,144 input rows of 4096 features, the Llama/OPT-7B hidden size (a q/k/v/o projection).
Inputs are random normal activations (fp16) already on the device: SparseGPT's time does not depend on
their values (the Hessian is dense and positive definite either way).

What is timed, CUDA-synchronized, median of ``--repeat`` runs after one warm-up run (each run on a fresh
copy of the weight): the whole call (a forward pass to order the layers, the float64 Hessian
``2/N X^T X`` accumulated batch by batch, dampening and Cholesky factors, the blockwise OBS update of all
4096 columns, the error measurement) and, separately, the solve alone (everything after the Hessian).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from flash_llm.cli import _positive, _shape, sparsity_arg  # noqa: E402
from flash_llm.prune import _sparsegpt_layer, sparsegpt_prune_  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shape", type=_shape, default="4096x4096", help="layer shape MxK (out x in features)")
    p.add_argument("--seqs", type=_positive, default=128, help="calibration sequences")
    p.add_argument("--seq-len", type=_positive, default=2048, help="tokens per sequence")
    p.add_argument("--batch", type=_positive, default=8, help="sequences per forward pass")
    p.add_argument("--sparsity", type=sparsity_arg, default=0.5,
                   help="fraction of weights to zero, or a percentage (0.5, 50 and 50%% alike)")
    p.add_argument("--dtype", choices=("float16", "bfloat16"), default="float16")
    p.add_argument("--repeat", type=_positive, default=5, help="timed runs (median reported)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    args = p.parse_args(argv)
    m, k = args.shape
    dtype = getattr(torch, args.dtype)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    g = torch.Generator(device=device).manual_seed(0)
    weight = (torch.randn(m, k, device=device, generator=g) / k ** 0.5).to(dtype)
    n_batches = -(-args.seqs // args.batch)
    calib = [torch.randn(min(args.batch, args.seqs - i * args.batch), args.seq_len, k, device=device,
                         generator=g).to(dtype) for i in range(n_batches)]
    tokens = args.seqs * args.seq_len
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"SparseGPT on an nn.Linear {m}x{k} {args.dtype}, sparsity {args.sparsity}, calibration {args.seqs} x "
          f"{args.seq_len} = {tokens:,} tokens ({sum(c.numel() * c.element_size() for c in calib) / 2**30:.2f} GiB) "
          f"on {card}, torch {torch.__version__}, commit {os.environ.get('FLASH_LLM_COMMIT', 'see git')}",
          flush=True)

    def whole():
        layer = nn.Linear(k, m, bias=False, device=device, dtype=dtype)
        with torch.no_grad():
            layer.weight.copy_(weight)
        _sync(device)
        t0 = time.perf_counter()
        report = sparsegpt_prune_(layer, calib, args.sparsity)
        _sync(device)
        dt = time.perf_counter() - t0
        assert abs(report[0].sparsity - args.sparsity) < 1e-6 + 1 / (m * k), report
        return dt, report[0].error

    H = torch.zeros(k, k, dtype=torch.float64, device=device)
    for c in calib:
        x = c.reshape(-1, k).double()
        H.addmm_(x.t(), x)
    H.mul_(2.0 / tokens)

    def solve():
        Hc = H.clone()
        _sync(device)
        t0 = time.perf_counter()
        _sparsegpt_layer(weight, Hc, args.sparsity, 128, 0.01, "bench")
        _sync(device)
        return time.perf_counter() - t0

    whole(), solve()  # warm-up: CUDA context, cuBLAS/cuSOLVER handles, allocator
    runs = [whole() for _ in range(args.repeat)]
    solves = [solve() for _ in range(args.repeat)]
    times = [t for t, _ in runs]
    med, med_solve = statistics.median(times), statistics.median(solves)
    print(f"whole call: median {med:.3f} s over {args.repeat} runs ({', '.join(f'{t:.3f}' for t in times)}); "
          f"relative reconstruction error {runs[0][1]:.4f}")
    print(f"solve alone (given the Hessian): median {med_solve:.3f} s ({', '.join(f'{t:.3f}' for t in solves)})")
    target_setting = (m, k, args.seqs, args.seq_len) == (4096, 4096, 128, 2048) and device.type == "cuda"
    verdict = ("PASS" if med < 2.0 else "FAIL") if target_setting else "NO TARGET (not the 4096x4096, 128 x 2048 GPU setting)"
    print(f"{verdict}: SparseGPT {m}x{k} with {args.seqs} x {args.seq_len} calibration tokens in {med:.3f} s on "
          f"{card} (target: under 2 s on an H100)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

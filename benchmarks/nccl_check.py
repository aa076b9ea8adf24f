"""Two-GPU NCCL sanity check before longer tensor-parallel runs (``torchrun --nproc-per-node K``): an eager
all-reduce, an all-reduce captured in a CUDA graph and replayed, and their times.  NVLS stays off
(flash_llm.parallel's defaults).  Exit status 1 on a wrong sum."""

import sys
import time

import torch

from flash_llm.parallel import init_tensor_parallel

with init_tensor_parallel(timeout=60) as tp:
    t = torch.full((64, 9216), float(tp.rank + 1), device=tp.device, dtype=torch.float16)
    t0 = time.perf_counter()
    tp.all_reduce_(t)
    torch.cuda.synchronize()
    eager_s = time.perf_counter() - t0
    want = tp.world_size * (tp.world_size + 1) / 2
    ok = bool((t == want).all())
    x = torch.ones(64, 9216, device=tp.device, dtype=torch.float16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        tp.all_reduce_(x.clone())  # warm-up on the capture stream
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = x.clone()
        tp.all_reduce_(y)
    tp.track_graph(g)  # kept alive to the end on purpose: close() must reset it before destroying the group
    g.replay()
    torch.cuda.synchronize()
    ok &= bool((y == tp.world_size).all())
    t0 = time.perf_counter()
    for _ in range(100):
        g.replay()
    torch.cuda.synchronize()
    print(f"rank {tp.rank}: eager all-reduce {'ok' if ok else 'WRONG'} (first call {eager_s * 1e3:.0f} ms), "
          f"graph replay {(time.perf_counter() - t0) * 1e4:.1f} us per [64, 9216] fp16 all-reduce", flush=True)
    t0 = time.perf_counter()
print(f"rank {tp.rank}: group closed in {time.perf_counter() - t0:.2f} s with a graph of its all-reduces alive",
      flush=True)
sys.exit(0 if ok else 1)

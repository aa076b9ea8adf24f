"""What one dependency between two steps of the decode costs: a kernel boundary against a grid-wide barrier.

    python benchmarks/sync_cost.py [--steps 160] [--grids 132,264,528] [--n 4096] [--replays 20]

Why (issue 4, batch 1): a Llama-3-8B layer at batch 1 is 5 dependent launches (q/k/v, attention, o, gate / up, down);
session 43's profile put each projection 2-6 us past its bytes, and the step at 58 % of the bandwidth floor. How much
of that is the boundary itself decides between making each kernel cheaper and one persistent kernel a layer (or a
step) whose phases meet at a barrier. This times ``--steps`` dependent steps of the same small work (every block reads
all ``--n`` floats the step before wrote, from L2, as a projection stages X, and writes its slice of the next buffer),
in one CUDA graph, four ways:

* ``plain``: one launch a step, no programmatic launch (each launch waits for the one before to finish);
* ``pdl``: programmatic launches, every block waiting in ``griddepcontrol.wait`` (the engine's way: the kernel before
  must complete and flush);
* ``flag``: programmatic launches, every block waiting instead for a counter the blocks of the step before bump after
  their writes (release / acquire at gpu scope): no wait for the grid's completion.  Safe from deadlock: a programmatic
  launch starts only once every block of the kernel before has started;
* ``persist``: one launch of all steps, the grid meeting at a barrier on the same kind of counter between steps (every
  block resident: the grid is capped at what fits);
* ``combine`` (``--combine``, session 51): programmatic launches as ``pdl``, but every block also adds a vector of all
  ``--n`` floats into zeroed fp32 sums by ``red.global.add.v4.f32`` and takes a ticket, and the last block writes the
  step's output from the sums and zeroes them: the all-to-all sum that a one-launch MLP by ownership of the
  intermediate columns needs instead of a boundary (``benchmarks/ab/README.md`` item 2).  ``combine/<c>``: launched in
  clusters of ``c`` blocks, which first sum their vectors through distributed shared memory (``c`` times fewer
  atomics).  ``combine - pdl`` is what the sum costs beyond a boundary.  ``comb-nt`` (session 52): the same adds
  without the ticket and the last block's pass over the sums (the next step reads the fp32 sums itself, and each
  step zeroes its share of the buffer the step after adds into, three buffers in turn): what the atomics alone cost,
  for a design whose consumer finishes the sum.

Prints us a step for each grid size (median of ``--replays`` graph replays, at least 30: ``_timing.time_calls`` of
one callable), the work alone being the same in every column.  fp32 buffers; nothing here is part of the library.
"""

from __future__ import annotations

import argparse
import ctypes
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

SOURCE = r"""
__device__ __forceinline__ void pdl_trigger() { asm volatile("griddepcontrol.launch_dependents;" ::: "memory"); }
__device__ __forceinline__ void pdl_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
__device__ __forceinline__ unsigned ld_acquire(const unsigned* p) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void add_release(unsigned* p, unsigned v) {
  asm volatile("red.release.gpu.global.add.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
// thread 0 waits until *counter >= target, then the block goes on (its loads after the barrier see what the blocks
// that counted wrote before counting)
__device__ __forceinline__ void block_wait(const unsigned* counter, unsigned target, unsigned sleep_ns) {
  if (threadIdx.x == 0)
    for (unsigned polls = 0; ld_acquire(counter) < target; ++polls) {
      if (polls == (1u << 24)) __trap();  // (seconds: a bug, not a wait)
      if (sleep_ns) __nanosleep(sleep_ns);
    }
  __syncthreads();
}
// every thread's writes of the block done, then one count for the block
__device__ __forceinline__ void block_count(unsigned* counter) {
  __syncthreads();
  if (threadIdx.x == 0) add_release(counter, 1u);
}
// the step's work: read all n floats of `in` (from L2: __ldcg), a block sum, this block's slice of `out`
__device__ __forceinline__ void step_work(const float* __restrict__ in, float* __restrict__ out, int n) {
  __shared__ float red[4];
  float acc = 0.f;
  for (int i = 4 * threadIdx.x; i < n; i += 4 * blockDim.x) {
    const float4 v = __ldcg(reinterpret_cast<const float4*>(in + i));
    acc += v.x + v.y + v.z + v.w;
  }
  for (int o = 16; o; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = acc;
  __syncthreads();
  const float s = red[0] + red[1] + red[2] + red[3];
  const int per = (n + gridDim.x - 1) / gridDim.x, lo = blockIdx.x * per, hi = min(n, lo + per);
  for (int i = lo + threadIdx.x; i < hi; i += blockDim.x) out[i] = 0.5f * __ldcg(in + i) + 1e-6f * s;
}
// mode 0: plain / pdl (griddepcontrol.wait; a no-op for a plain launch), mode 1: flag (wait for step's count)
extern "C" __global__ void __launch_bounds__(128) chain_step(const float* __restrict__ in, float* __restrict__ out,
                                                             int n, int mode, unsigned* counter, int step,
                                                             unsigned sleep_ns) {
  pdl_trigger();
  if (mode == 0) pdl_wait();
  else block_wait(counter, (unsigned)step * gridDim.x, sleep_ns);
  step_work(in, out, n);
  if (mode == 1) block_count(counter);
}
// combine: the step's input read as every step reads it, then every block's vector of n floats (the input scaled) added
// into `sums` (zeroed) by 16-byte atomics, a ticket, and the last block writes all of `out` and zeroes the sums; cl > 1:
// clusters of cl blocks, block rank c adding slice c of the cluster's summed vectors (distributed shared memory).
// zero != null: no ticket and no last block; the step reads the sums the step before added (in = those sums), and
// zeroes its share of the buffer the step after adds into (three buffers in turn), so only the atomics remain
__device__ __forceinline__ void cluster_sync() {  // every thread of the cluster; shared-memory writes seen after it
  asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}
__device__ __forceinline__ void red4(float* p, float4 v) {
  asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(p), "f"(v.x), "f"(v.y), "f"(v.z), "f"(v.w)
               : "memory");
}
extern "C" __global__ void __launch_bounds__(128) combine_step(const float* __restrict__ in, float* __restrict__ out,
                                                               int n, float* __restrict__ sums,
                                                               unsigned* __restrict__ ticket, int cl,
                                                               float* __restrict__ zero) {
  extern __shared__ float4 vec[];  // n / 4
  __shared__ int last;
  pdl_trigger();
  pdl_wait();
  const int n4 = n >> 2;
  for (int i = threadIdx.x; i < n4; i += blockDim.x) {
    const float4 v = __ldcg(reinterpret_cast<const float4*>(in) + i);
    vec[i] = make_float4(1e-3f * v.x, 1e-3f * v.y, 1e-3f * v.z, 1e-3f * v.w);
  }
  __syncthreads();
  if (cl > 1) {
    cluster_sync();
    unsigned c;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(c));
    const int lo = (int)c * n4 / cl, hi = ((int)c + 1) * n4 / cl;
    unsigned base;
    asm volatile("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(base) : "l"(vec));
    for (int i = lo + threadIdx.x; i < hi; i += blockDim.x) {
      float4 a = make_float4(0.f, 0.f, 0.f, 0.f);
      for (int j = 0; j < cl; ++j) {
        unsigned r;
        float4 v;
        asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(base + 16u * i), "r"(j));
        asm volatile("ld.shared::cluster.v4.f32 {%0, %1, %2, %3}, [%4];" : "=f"(v.x), "=f"(v.y), "=f"(v.z),
                     "=f"(v.w) : "r"(r) : "memory");
        a.x += v.x;
        a.y += v.y;
        a.z += v.z;
        a.w += v.w;
      }
      red4(sums + 4 * i, a);
    }
    cluster_sync();
  } else {
    for (int i = threadIdx.x; i < n4; i += blockDim.x) red4(sums + 4 * i, vec[i]);
  }
  if (zero) {  // no tail: the next step reads the sums; this one zeroes its slice of the buffer after next
    const int per = (n + gridDim.x - 1) / gridDim.x, lo = blockIdx.x * per, hi = min(n, lo + per);
    for (int i = lo + threadIdx.x; i < hi; i += blockDim.x) __stcg(zero + i, 0.f);
    return;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned prev;
    asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], 1;" : "=r"(prev) : "l"(ticket) : "memory");
    last = prev == gridDim.x - 1;
  }
  __syncthreads();
  if (!last) return;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    out[i] = 0.5f * __ldcg(in + i) + 1e-6f * __ldcg(sums + i);
    __stcg(sums + i, 0.f);
  }
  if (threadIdx.x == 0) *ticket = 0u;
}
extern "C" __global__ void __launch_bounds__(128) persist(float* __restrict__ bufs, int n, int steps,
                                                          unsigned* counter, unsigned sleep_ns) {
  for (int s = 0; s < steps; ++s) {
    if (s) block_wait(counter, (unsigned)s * gridDim.x, sleep_ns);
    step_work(bufs + (s & 1) * n, bufs + ((s + 1) & 1) * n, n);
    block_count(counter);
  }
}
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=160, help="dependent steps a graph (5 a layer x 32 layers)")
    ap.add_argument("--grids", default="132,264,528", help="blocks a step (128 threads each)")
    ap.add_argument("--n", type=int, default=4096, help="floats every block reads a step (a multiple of 4)")
    ap.add_argument("--replays", type=int, default=20)
    ap.add_argument("--combine", default="",
                    help="cluster sizes for the combine columns, e.g. '1,4,8' (1: atomics only; empty: none)")
    ap.add_argument("--sleeps", default="20,200", help="ns the polling thread sleeps between loads of the counter "
                    "(flag and persist columns, one pair each; 0: no sleep; the engine's chain_wait sleeps 20)")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("sync_cost.py needs a CUDA device")
        return 1
    from flash_llm.kernels._build import _check_cu, _driver, compile_kernels, device_arch, launch_function, sm90
    from _timing import SINGLE_COPY_REPLAYS, time_calls

    dev = torch.cuda.current_device()
    if not sm90(dev):
        print("sync_cost.py needs sm_90 (programmatic launches)")
        return 1
    if a.n % 4 or a.n < 4:
        raise SystemExit(f"--n must be a positive multiple of 4, got {a.n}")
    bufs = torch.randn(2 * a.n, device="cuda")  # (first: PyTorch makes its context current, the module loads into it)
    counter = torch.zeros(1, dtype=torch.int32, device="cuda")
    compiled = compile_kernels(device_arch(dev), use_cache=False, source=SOURCE.encode())
    drv = _driver()
    module = _check_cu(drv.cuModuleLoadData(compiled.cubin), "cuModuleLoadData")
    fn = {k: _check_cu(drv.cuModuleGetFunction(module, k.encode()), k)
          for k in ("chain_step", "persist", "combine_step")}
    combine = [int(c) for c in a.combine.split(",") if c]
    sums = torch.zeros(a.n, device="cuda")
    sums3 = torch.zeros(3 * a.n, device="cuda")  # combine-nt's three buffers
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    P, I, U = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint

    def chain(grid: int, mode: str, sleep: int = 0):
        def run():
            counter.zero_()
            stream = torch.cuda.current_stream().cuda_stream
            for s in range(a.steps):
                args = [(bufs.data_ptr() + 4 * a.n * (s & 1), P), (bufs.data_ptr() + 4 * a.n * ((s + 1) & 1), P),
                        (a.n, I), (int(mode == "flag"), I), (counter.data_ptr(), P), (s, I), (sleep, U)]
                # (the first step plainly: it must not start before the counter's reset)
                launch_function(fn["chain_step"], "chain_step", (grid, 1, 1), 128, args, stream, dev,
                                pdl=mode != "plain" and s > 0)
        return run

    def persist(grid: int, sleep: int):
        def run():
            counter.zero_()
            launch_function(fn["persist"], "persist", (grid, 1, 1), 128,
                            [(bufs.data_ptr(), P), (a.n, I), (a.steps, I), (counter.data_ptr(), P), (sleep, U)],
                            torch.cuda.current_stream().cuda_stream, dev)
        return run

    def combined(grid: int, cl: int, tail: bool = True):
        def run():
            stream = torch.cuda.current_stream().cuda_stream
            if not tail:
                sums3[:a.n].zero_()  # (step 0 adds into buffer 0)
            for s in range(a.steps):
                if tail:
                    args = [(bufs.data_ptr() + 4 * a.n * (s & 1), P), (bufs.data_ptr() + 4 * a.n * ((s + 1) & 1), P),
                            (a.n, I), (sums.data_ptr(), P), (counter.data_ptr(), P), (cl, I), (0, P)]
                else:  # reads buffer s - 1, adds into s, zeroes s + 1 (mod 3)
                    b3 = [sums3.data_ptr() + 4 * a.n * ((s + d) % 3) for d in (2, 0, 1)]
                    args = [(b3[0], P), (bufs.data_ptr(), P), (a.n, I), (b3[1], P), (counter.data_ptr(), P),
                            (cl, I), (b3[2], P)]
                launch_function(fn["combine_step"], "combine_step", (grid, 1, 1), 128, args, stream, dev, 4 * a.n,
                                pdl=s > 0, cluster=(cl, 1, 1) if cl > 1 else None)
        return run

    resident = sms * _check_cu(drv.cuOccupancyMaxActiveBlocksPerMultiprocessor(fn["persist"], 128, 0), "occupancy")
    print(f"{torch.cuda.get_device_name(dev)}, {sms} SMs; {a.steps} dependent steps a graph, {a.n} floats read by every "
          f"block a step; us a step (median of {max(a.replays, SINGLE_COPY_REPLAYS)} replays)")
    sleeps = [int(x) for x in a.sleeps.split(",")]
    heads = (["plain", "pdl"] + [f"flag/{z}" for z in sleeps] + [f"persist/{z}" for z in sleeps]
             + [f"combine/{c}" if c > 1 else "combine" for c in combine]
             + [f"comb-nt/{c}" if c > 1 else "comb-nt" for c in combine])
    print(f"{'blocks':>7} " + " ".join(f"{h:>11}" for h in heads) + "   (flag / persist: ns slept between polls)")
    for grid in (int(g) for g in a.grids.split(",")):
        row = [time_calls([chain(grid, m)], replays=a.replays) / a.steps * 1e6 for m in ("plain", "pdl")]
        row += [time_calls([chain(grid, "flag", z)], replays=a.replays) / a.steps * 1e6 for z in sleeps]
        # (every block of the persistent grid must be resident, or its barrier never opens)
        row += [time_calls([persist(grid, z)], replays=a.replays) / a.steps * 1e6 if grid <= resident
                else float("nan") for z in sleeps]
        counter.zero_()
        row += [time_calls([combined(grid, c)], replays=a.replays) / a.steps * 1e6 if grid % c == 0 else float("nan")
                for c in combine]
        row += [time_calls([combined(grid, c, tail=False)], replays=a.replays) / a.steps * 1e6 if grid % c == 0
                else float("nan") for c in combine]
        print(f"{grid:>7} " + " ".join(f"{t:11.2f}" for t in row))
    return 0


if __name__ == "__main__":
    sys.exit(main())

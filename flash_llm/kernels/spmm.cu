// flash-llm sparse x dense kernels: Y[N, M] = X[N, K] @ W[M, K]^T (+ bias), W compressed.
//
// Load-as-Sparse, Compute-as-Dense: the compressed weight is streamed from device memory, expanded
// to dense mma.m16n8k16 A fragments on chip, and multiplied on tensor cores with fp32 accumulators.
// The tensor-core picture is transposed: A = W (rows = output features M), B = X^T (columns = tokens
// N), so one warp owns 16 output features and all N tokens of its block.
//
// Compiled at run time by NVRTC (flash_llm/kernels/_build.py); needs no CUDA headers.  Every
// configuration is an extern "C" instantiation at the end of the file.  docs/kernels.md explains the
// design and records registers / shared memory / spills.

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned long long u64;

#define DEVI __device__ __forceinline__
#define FULL_MASK 0xffffffffu

constexpr int WARPS = 4;            // warps per block; each owns one 16-row strip of W
constexpr int THREADS = WARPS * 32;

// ------------------------------------------------------------------------------------------------
// small helpers
// ------------------------------------------------------------------------------------------------
template <bool BF16>
DEVI void mma16816(float (&d)[4], const u32 (&a)[4], const u32 (&b)[2]) {
  if (BF16) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
                 "{%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
                 "{%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

template <bool BF16>
DEVI float to_float(u16 v) {
  if (BF16) return __uint_as_float(((u32)v) << 16);
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
  return f;
}

template <bool BF16>
DEVI u16 from_float(float f) {
  u16 r;
  if (BF16)
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f));
  else
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(f));
  return r;
}

// silu(g) x u of a gate sum g and an up sum u: each rounded to the dtype first (the merged projection's output), then
// silu(g) u in fp32, rounded once (as the fused silu_mul kernel of the engine)
template <bool BF16>
DEVI u16 silu_mul_rounded(float g, float u) {
  const float gr = to_float<BF16>(from_float<BF16>(g)), ur = to_float<BF16>(from_float<BF16>(u));
  return from_float<BF16>(__fdividef(gr, 1.f + expf(-gr)) * ur);  // no division call
}

// One ticket of a split-K group: an acquire-release add at GPU scope by one thread, after a barrier that orders the
// other threads' partial sums before it (the release is cumulative), instead of a fence in every thread.
DEVI int ticket_acq_rel(int* t) {
  int prev;
  asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], 1;" : "=r"(prev) : "l"(t) : "memory");
  return prev;
}
// An acquire load at GPU scope (the spread split-K's wait for a group's partial sums)
DEVI int ld_acquire(const int* t) {
  int v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(t) : "memory");
  return v;
}

DEVI u32 smem_addr(const void* p) {
  u32 r;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(r) : "l"(p));
  return r;
}

DEVI void cp_async16(u32 dst, const void* src) {
  // .cg: bypass L1, the weight is read exactly once.
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src));
}
DEVI void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
DEVI void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }

// Wait until at most `pending` of this thread's most recent cp.async groups are still in flight.
// (wait_group takes an immediate; waiting for fewer pending than allowed is always correct.)
DEVI void cp_async_wait_dyn(int pending) {
  if (pending >= 6) cp_async_wait<6>();
  else if (pending >= 4) cp_async_wait<4>();
  else if (pending >= 2) cp_async_wait<2>();
  else cp_async_wait<0>();
}

// BitmapTiles (format version 2) bit order: bit `8 * (j >> 1) + 4 * (j & 1) + s` of lane l's word is
// A-fragment half j (0..7) of k-step s.  So byte i of the word belongs to A register i (halves 2i, 2i+1)
// of every k-step: bits 0..3 are its low halves in steps 0..3, bits 4..7 its high halves.  The bits of
// step s are the bits of `w & (0x11111111 << s)`.
DEVI u32 step_counts(u32 w) {
  return __popc(w & 0x11111111u) | (__popc(w & 0x22222222u) << 8) | (__popc(w & 0x44444444u) << 16) |
         ((u32)__popc(w & 0x88888888u) << 24);
}

// incl += incl of the lane O below, within each half-warp (shfl.up's predicate: the source is in range)
template <int O>
DEVI void scan_step(u32& incl) {
  asm("{ .reg .pred p; .reg .u32 t; shfl.sync.up.b32 t|p, %0, %1, 0x1000, -1; @p add.u32 %0, %0, t; }"
      : "+r"(incl) : "n"(O));
}

// Values are stored in step order (k-step major, then lane, then half j).  Given this lane's per-step
// value counts `c` (byte s = count of step s, <= 8), return where its values of each k-step start
// (value index inside the record) and the record's total.  A scan over each half-warp (sums <= 128 fit a
// byte) and one fix-up for the upper half (<= 248) serve all four steps.
DEVI void step_starts(u32 c, int lane, u32 (&start)[4], u32& total) {
  u32 incl = c;
  scan_step<1>(incl);
  scan_step<2>(incl);
  scan_step<4>(incl);
  scan_step<8>(incl);
  const u32 lower = __shfl_sync(FULL_MASK, incl, 15), upper = __shfl_sync(FULL_MASK, incl, 31);
  u32 excl = incl - c;
  if (lane >= 16) excl += lower;
  // per-step totals need 9 bits: add the half-warp totals in 16-bit fields (steps 0, 2 and 1, 3)
  const u32 t02 = (lower & 0x00ff00ffu) + (upper & 0x00ff00ffu);
  const u32 t13 = ((lower >> 8) & 0x00ff00ffu) + ((upper >> 8) & 0x00ff00ffu);
  const u32 base1 = t02 & 0xffffu, base2 = base1 + (t13 & 0xffffu), base3 = base2 + (t02 >> 16);
  total = base3 + (t13 >> 16);
  start[0] = excl & 0xffu;
  start[1] = base1 + ((excl >> 8) & 0xffu);
  start[2] = base2 + ((excl >> 16) & 0xffu);
  start[3] = base3 + (excl >> 24);
}

// ------------------------------------------------------------------------------------------------
// The B operand (X^T) for one 64-column strip starting at k0 and n-tiles nt = 0..NT-1 from n0.
// The strip's column order (docs/formats.md) gives lane (g = lane/4, t = lane%4) the 16 contiguous
// columns k0 + 16t .. k0 + 16t + 15 of row n0 + 8nt + g for all four k-steps: two 16-byte loads.
// Register b[s][nt][h] holds columns 16t + 4s + 2h (+1).  Columns past K read as zero (W's padding is
// zero, but garbage in X could be NaN/Inf and 0 * NaN = NaN); rows past N are clamped to N - 1.
// ------------------------------------------------------------------------------------------------
template <int NT>
DEVI void load_b(u32 (&b)[4][NT][2], const u16* __restrict__ x, int ldx, int n_rows, int k_len, int n0,
                 int k0, int lane, bool vec) {
  const int g = lane >> 2, t = lane & 3;
  const int kc = k0 + 16 * t;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    // rows past N read row N - 1: they only feed accumulator columns that are never stored
    const int n = min(n0 + nt * 8 + g, n_rows - 1);
    const u16* src = x + (long long)n * ldx + kc;
    u32 v[8];
    if (vec && kc + 16 <= k_len) {  // rows 16-byte aligned (ldx % 8 == 0)
      const uint4 lo = __ldg(reinterpret_cast<const uint4*>(src));
      const uint4 hi = __ldg(reinterpret_cast<const uint4*>(src) + 1);
      v[0] = lo.x; v[1] = lo.y; v[2] = lo.z; v[3] = lo.w;
      v[4] = hi.x; v[5] = hi.y; v[6] = hi.z; v[7] = hi.w;
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int k = kc + 2 * i;
        const u32 e0 = k < k_len ? (u32)src[2 * i] : 0u;
        const u32 e1 = k + 1 < k_len ? (u32)src[2 * i + 1] : 0u;
        v[i] = e0 | (e1 << 16);
      }
    }
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      b[s][nt][0] = v[2 * s];
      b[s][nt][1] = v[2 * s + 1];
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Epilogue.  A block covers 64 rows (4 strips) x 8 NT tokens; at the end warp w holds acc[nt][i] of the
// block's strip w: rows m = 16 * strip + g (+8 for i >= 2), columns n = n0 + 8nt + 2t + (i & 1).
// Without split-K it writes Y (+ bias) directly.  With split-K every block writes its fp32 partial tile to
// ws in fragment order -- ws[split][blockIdx.x][w][nt][i][lane], so every store is 128 contiguous bytes --
// and the last block of a row group to arrive (atomic ticket) sums the partials in split order (so the
// result is deterministic), 16 bytes per load, adds the bias, writes Y and resets its ticket for the next
// launch.
// ------------------------------------------------------------------------------------------------
struct Problem {
  const u16* x;
  u16* y;
  const u16* bias;
  float* ws;
  int* tickets;
  int M, K, N, ldx;
  int splits;    // blocks along K (gridDim.y): partial tiles to sum
  int n_chunks;  // blocks along N; blockIdx.x = row_block * n_chunks + n_chunk, so the blocks that
                 // share a weight row block run together and re-read it from L2, not DRAM
  int vec;
};

DEVI int row_block_of(const Problem& p) { return blockIdx.x / p.n_chunks; }
DEVI int n_chunk_of(const Problem& p) { return blockIdx.x % p.n_chunks; }

// This block's partial tile of split `split` (512 NT floats).
// (The Tiled-CSL kernels for N > 32 store one partial tile per 64 rows and 32 tokens: `tile` of `tiles`.)
template <int NT>
DEVI float* ws_tile(const Problem& p, int split, int tile, int tiles) {
  return p.ws + ((long long)split * tiles + tile) * (512 * NT);
}

// Y from a strip's accumulators in the m16n8 fragment layout (rows of `strip`, tokens from n0; those past M or N not
// written): plus the bias, or with SILU silu(gate) x up of the gate rows `acc` and their up rows `up` into Y's M / 2
// columns (silu_mul_rounded)
template <bool BF16, int NT, bool SILU = false>
DEVI void store_frag(const Problem& p, const float (&acc)[NT][4], const float (&up)[NT][4], int strip, int n0,
                     int lane) {
  const int g = lane >> 2, t = lane & 3, M = SILU ? p.M / 2 : p.M;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int m = strip * 16 + g + (i >= 2 ? 8 : 0);
      const int n = n0 + nt * 8 + 2 * t + (i & 1);
      if (m < M && n < p.N) {
        if (SILU) {
          p.y[(long long)n * M + m] = silu_mul_rounded<BF16>(acc[nt][i], up[nt][i]);
        } else {
          float v = acc[nt][i];
          if (p.bias) v += to_float<BF16>(p.bias[m]);
          p.y[(long long)n * M + m] = from_float<BF16>(v);
        }
      }
    }
  }
}

template <bool BF16, int NT>
DEVI void store_acc(const Problem& p, float (&acc)[NT][4], int strip, int sib, bool active, int n0, int lane,
                    int tile = -1, int tiles = 0) {
  const int t = lane & 3;
  if (!active) return;
  if (p.splits > 1) {
    float* dst = ws_tile<NT>(p, blockIdx.y, tile < 0 ? (int)blockIdx.x : tile, tile < 0 ? (int)gridDim.x : tiles) +
                 sib * 128 * NT + lane;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i)  // columns past N are never summed: not stored (7 of 8 at N = 1)
        if (n0 + nt * 8 + 2 * t + (i & 1) < p.N) dst[(nt * 4 + i) * 32] = acc[nt][i];
    return;
  }
  store_frag<BF16, NT>(p, acc, acc, strip, n0, lane);
}

// Group q of a partial tile (512 NT floats, fragment order) is four lanes (t = 0..3) of one (strip, nt, i): one row
// m and the columns n, n + 2, n + 4, n + 6, for a tile whose first row and column are m0 and n0.
template <int NT>
DEVI void group_row_col(int q, int m0, int n0, int& m, int& n) {
  const int e = 4 * q;  // tile element of lane t = 0
  const int i = (e >> 5) & 3, nt = (e >> 7) % NT, sib = (e >> 7) / NT;
  m = m0 + sib * 16 + ((e & 31) >> 2) + (i >= 2 ? 8 : 0);
  n = n0 + nt * 8 + (i & 1);
}

DEVI void add_into(float4& v, const float4& a) { v.x += a.x; v.y += a.y; v.z += a.z; v.w += a.w; }
DEVI void add_into(float2& v, const float2& a) { v.x += a.x; v.y += a.y; }

// The sum over splits s_begin .. s_end - 1 of load(s) (a V), in split order, the loads of U splits in flight together.
template <int U, typename V, class F>
DEVI V sum_rounds(F&& load, int s_begin, int s_end) {
  V v{};
#pragma unroll 1
  for (int s0 = s_begin; s0 < s_end; s0 += U) {
    V a[U];
#pragma unroll
    for (int u = 0; u < U; ++u) a[u] = s0 + u < s_end ? load(s0 + u) : V{};
#pragma unroll
    for (int u = 0; u < U; ++u) add_into(v, a[u]);
  }
  return v;
}

// The sum of splits s_begin .. s_end - 1 of one group (src: its 16 bytes in split 0; V = float2: 8 bytes, the N = 1
// kernels' rows), in split order, the loads of U splits in flight together.
template <int U = 8, typename V = float4>
DEVI V sum_splits(const V* src, long long split_stride, int s_begin, int s_end) {
  return sum_rounds<U, V>([&](int s) { return __ldcg(src + s * split_stride); }, s_begin, s_end);
}

// sum_splits of two groups `off` apart (a gate group and its up group) in the same rounds, so the second's loads do not
// wait for the first's sums: the same sums in the same order as two sum_splits (a: the first's, b: the second's)
template <typename V>
struct SplitPair {
  V a, b;
};
template <typename V>
DEVI void add_into(SplitPair<V>& v, const SplitPair<V>& w) { add_into(v.a, w.a); add_into(v.b, w.b); }
template <int U, typename V>
DEVI SplitPair<V> sum_split_pairs(const V* src, long long off, long long split_stride, int s_begin, int s_end) {
  return sum_rounds<U, SplitPair<V>>([&](int s) {
    return SplitPair<V>{__ldcg(src + s * split_stride), __ldcg(src + off + s * split_stride)};
  }, s_begin, s_end);
}

// Y at row m, columns n, n + 2, n + 4, n + 6 (those below N): a group's sums plus the bias.
template <bool BF16>
DEVI void store_group(const float4& v, u16* y, const u16* bias, int M, int N, int m, int n) {
  const float b = bias ? to_float<BF16>(bias[m]) : 0.f;
  const float r[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int t = 0; t < 4; ++t)
    if (n + 2 * t < N) y[(long long)(n + 2 * t) * M + m] = from_float<BF16>(r[t] + b);
}

// Y at row m (of the M = H outputs), columns n, n + 2, n + 4, n + 6 (those below N) of silu(gate) x up, from the sums
// of gate row m (g) and up row H + m (u) of the merged [2 H, K] weight (silu_mul_rounded).
template <bool BF16>
DEVI void store_silu_group(const float4& g4, const float4& u4, u16* y, int M, int N, int m, int n) {
  const float g[4] = {g4.x, g4.y, g4.z, g4.w}, u[4] = {u4.x, u4.y, u4.z, u4.w};
#pragma unroll
  for (int t = 0; t < 4; ++t)
    if (n + 2 * t < N) y[(long long)(n + 2 * t) * M + m] = silu_mul_rounded<BF16>(g[t], u[t]);
}

// Y at row m, columns n, n + 2, n + 4, n + 6 (those below N) <- `old` (Y's values there, loaded before the sums) +
// (v + bias), the sum rounded to the dtype first (the product's output), then the add rounded (the layer's residual
// add).
template <bool BF16>
DEVI void add_group(const float4& v, const float4& old, u16* y, const u16* bias, int M, int N, int m, int n) {
  const float b = bias ? to_float<BF16>(bias[m]) : 0.f;
  const float r[4] = {v.x, v.y, v.z, v.w}, o[4] = {old.x, old.y, old.z, old.w};
#pragma unroll
  for (int t = 0; t < 4; ++t)
    if (n + 2 * t < N)
      y[(long long)(n + 2 * t) * M + m] = from_float<BF16>(o[t] + to_float<BF16>(from_float<BF16>(r[t] + b)));
}

// Sum the split partials of partial tile `tile` (of `tiles` per split) in split order, add the bias and write Y, for
// the 16-byte groups q = q0, q0 + step, ... < 128 NT of the tile; groups with no column below N load nothing.
template <bool BF16, int NT>
DEVI void reduce_partials(const float* ws, int tiles, int tile, int splits, u16* y, const u16* bias, int M, int N,
                          int m0, int n0, int q0, int step) {
  const long long split_stride = (long long)tiles * 128 * NT;  // float4s per split
#pragma unroll 1
  for (int q = q0; q < 128 * NT; q += step) {
    int m, n;
    group_row_col<NT>(q, m0, n0, m, n);
    if (m >= M || n >= N) continue;
    const float4* src = reinterpret_cast<const float4*>(ws) + (long long)tile * 128 * NT + q;
    store_group<BF16>(sum_splits(src, split_stride, 0, splits), y, bias, M, N, m, n);
  }
}

// Split-K in the bitmap kernel: the last block of a row group to arrive sums the partials (see above).
// (The Tiled-CSL kernel leaves them to splitk_reduce, below.)  Every
// thread of the block calls it after storing its partials.
template <bool BF16, int NT>
DEVI void finish_splits(const Problem& p, int n0) {
  if (p.splits == 1) return;
  __shared__ int last;
  __threadfence();
  __syncthreads();
  int* ticket = p.tickets + blockIdx.x;
  if (threadIdx.x == 0) {
    const int prev = atomicAdd(ticket, 1);
    last = (prev == p.splits - 1);
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  reduce_partials<BF16, NT>(p.ws, gridDim.x, blockIdx.x, p.splits, p.y, p.bias, p.M, p.N, row_block_of(p) * (WARPS * 16),
                            n0, threadIdx.x, THREADS);
  if (threadIdx.x == 0) *ticket = 0;
}

template <bool BF16, int NT>
DEVI void epilogue(const Problem& p, float (&acc)[NT][4], int strip, int sib, bool active, int n0, int lane) {
  store_acc<BF16, NT>(p, acc, strip, sib, active, n0, lane);
  finish_splits<BF16, NT>(p, n0);
}

// The four k-steps of one strip: acc[nt] += A[s] * B[s][nt].  For NT <= 4 the caller loaded `b`
// (early, so the loads overlap the decode); for NT = 8 B comes in two halves of 4 n-tiles, so 64
// tokens fit in registers next to 32 accumulators.
template <bool BF16, int NT, int NB>
DEVI void multiply_strip(float (&acc)[NT][4], const u32 (&a)[4][4], u32 (&b)[4][NB][2], const Problem& p,
                         int n0, int k0, int lane) {
#pragma unroll
  for (int h = 0; h < NT / NB; ++h) {
    if (NT > 4) load_b<NB>(b, p.x, p.ldx, p.N, p.K, n0 + h * 32, k0, lane, p.vec);
#pragma unroll
    for (int s = 0; s < 4; ++s)
#pragma unroll
      for (int nt = 0; nt < NB; ++nt) mma16816<BF16>(acc[h * NB + nt], a[s], b[s][nt]);
  }
}

// ------------------------------------------------------------------------------------------------
// BitmapTiles kernel.
//
// Block (x = row block * n_chunks + n chunk, y = split): warp w owns strip row
// mrow = 4 * row_block + w and the strips kt in [kb, ke) of that row.  Those records are one
// contiguous byte range of `data`, so each warp streams its range into a private ring buffer in
// shared memory with 16-byte cp.async copies, one 512-byte chunk (32 lanes x 16 B) per group, up to
// RING_AHEAD chunks ahead of the record it decodes -- no per-record offset lookups in the loop.
//
// Decode: lane l's bitmap word is exactly its 32 A-fragment elements for the strip's four k-steps
// (fragment order, docs/formats.md).  Values are stored in step order, so a lane's values of one
// k-step are contiguous: per-step popcounts and one warp scan (step_starts) give where they begin;
// then, branch-free, every element loads the value under the cursor and keeps it (and advances the
// cursor) only if its bit is set.
// ------------------------------------------------------------------------------------------------
constexpr int RING_UNITS = 256;    // 16-byte units per warp ring = 4 KiB (a power of two: addresses wrap)
constexpr int RING_BYTES = RING_UNITS * 16;
constexpr int RING_CHUNKS = RING_UNITS / 32;
constexpr int RING_AHEAD = 6;     // chunks in flight ahead of the record being decoded
constexpr int MAX_RECORD_UNITS = 8 + 128;  // 128-byte bitmap + 1024 values, in 16-byte units
constexpr int READ_UNITS = MAX_RECORD_UNITS + 1;  // the staging pass may read 8 bytes past a record
constexpr int STAGE_WORDS = 128 * 9;      // window words of one strip: 9 rounds of 32 lanes x 4 (see stage_windows)

// 128, read from constant memory so that ptxas keeps `__umulhi(x, 128) + y` as one IMAD.HI (FMA pipe)
// instead of strength-reducing it to a shift, a mask and an add on the ALU pipe, the decode's bottleneck.
__constant__ u32 kHalfByteScale = 128;

DEVI u32 prmt(u32 a, u32 b, u32 sel) {
  u32 d;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
  return d;
}
DEVI u32 lds32(u32 addr) {
  u32 v;
  asm volatile("ld.shared.b32 %0, [%1];" : "=r"(v) : "r"(addr));
  return v;
}

// Staging: window word k (k = 0 .. total) of the strip holds the values v[k - 1] (low half) and v[k]
// (high half), so any two consecutive values are one aligned 32-bit word.  Lane q of the warp writes
// words 4q .. 4q + 3 (one 16-byte store) from the 8 value bytes at 8q and the 4 before them.  `vals` is
// the ring offset (bytes) of the record's value 0; ring addresses wrap at RING_BYTES.  The 4 bytes before
// value 0 are the last bitmap word, whose garbage only ever lands in a masked half; so do the up to 8
// bytes read past the record.
DEVI void stage_windows(u32 ring, u32 vals, u32 stage, u32 total, int lane) {
  const int rounds = (int)(total >> 7) + 1;  // quads 0 .. total / 4 are needed; whole rounds of 32 are
                                            // written (STAGE_WORDS has room), without a branch per lane
  u32 at = vals + 8 * lane, to = stage + 16 * lane;
#pragma unroll 1
  for (int i = 0; i < rounds; ++i, at += 256, to += 512) {
    u32 prev, lo, hi;
    asm volatile("ld.shared.b32 %0, [%1];" : "=r"(prev) : "r"(ring + ((at - 4) & (RING_BYTES - 1))));
    asm volatile("ld.shared.v2.b32 {%0, %1}, [%2];" : "=r"(lo), "=r"(hi) : "r"(ring + (at & (RING_BYTES - 1))));
    asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};" ::"r"(to), "r"(prmt(prev, lo, 0x5432)), "r"(lo),
                 "r"(prmt(lo, hi, 0x5432)), "r"(hi));
  }
}

// The four A registers of k-step S from the window words: register i takes window word
// start + c, c = number of set bits among halves 0 .. 2i of this lane's k-step (so its high half is half
// 2i + 1's value and, when half 2i is set, its low half is half 2i's), masked by the two bits.
//   Q: byte i = 8c (b0 bits x multiplier summing them into bytes i..3, b1 bits into bytes i+1..3);
//   mask: prmt sign-replicates bit b0 (moved to bit 7 of byte i of A) and b1 (bit 7 of byte i of B).
template <int S>
DEVI void gather_step(u32 w, u32 stage_at_start, u32 (&a)[4]) {
  const u32 b0 = w & (0x01010101u << S), b1 = w & (0x10101010u << S);
  const u32 q = b0 * (0x08080808u >> S) + b1 * (0x08080800u >> (4 + S));
  const u32 A = w << (7 - S), B = w << (3 - S);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    // 4c = byte i of q, halved: moved to the top (dropping the bytes above it), then taken down by the
    // high half of a multiply, which also adds the base (IMAD.HI: FMA pipe, not the busier ALU pipe)
    u32 addr;
    asm("mad.hi.u32 %0, %1, %2, %3;" : "=r"(addr) : "r"(q << (24 - 8 * i)), "r"(kHalfByteScale), "r"(stage_at_start));
    const u32 win = lds32(addr);
    a[i] = win & prmt(A, B, (0x8888u | (u32)i * 0x1111u) | 0x4400u);
  }
}

// The A registers of one record, given this lane's bitmap word `w` and the value starts and count from
// step_starts, with the values at byte `vals` of `ring`: stage the window words, gather the 16 registers.  Both
// __syncwarp()s are inside: on return every lane is done with the record and the windows.
DEVI void gather_record(u32 w, const u32 (&start)[4], u32 total, u32 ring, u32 vals, u32 stage, int lane,
                        u32 (&a)[4][4]) {
  stage_windows(ring, vals, stage, total, lane);
  __syncwarp();
  gather_step<0>(w, stage + 4 * start[0], a[0]);
  gather_step<1>(w, stage + 4 * start[1], a[1]);
  gather_step<2>(w, stage + 4 * start[2], a[2]);
  gather_step<3>(w, stage + 4 * start[3], a[3]);
  __syncwarp();
}

// The records of one strip row over the strips [kb, ke) of its split: one contiguous byte range, streamed into the
// warp's private ring (`ring`, RING_UNITS 16-byte units) and decoded one record at a time.  Shared by the NT kernels
// and the warpgroup kernel; a warp that has no records (`live` false) must not call next().
struct BitmapRecords {
  const int4* src;
  int total_units, total_chunks;
  int issued = 0;  // chunks issued (warp-uniform)
  int ready = 0;   // units [0, ready) of the stream are complete and visible to the warp
  int r = 0;       // first unit of the current record, relative to the split's first
  u32 ring, stage;
  int lane;
  DEVI BitmapRecords(const int* data, const int* offsets, int strip, int kt, int kb, int ke, bool live, u32 ring_,
                     u32 stage_, int lane_)
      : ring(ring_), stage(stage_), lane(lane_) {
    const long long begin = live ? offsets[(long long)strip * kt + kb] : 0;  // in 16-byte units
    const long long end = live ? offsets[(long long)strip * kt + ke] : 0;
    total_units = (int)(end - begin);
    total_chunks = (total_units + 31) >> 5;
    src = reinterpret_cast<const int4*>(data) + begin;
  }
  // Make units [0, upto) of the stream visible to the whole warp, keeping up to RING_AHEAD more chunks in flight
  // but never overwriting the current record (which starts at unit r).  Called only when a record is not in yet:
  // about once per 32 units consumed.
  DEVI void refill(int upto) {
    const int need = min((upto + 31) >> 5, total_chunks);
    const int limit = min(total_chunks, min(need + RING_AHEAD, (r >> 5) + RING_CHUNKS));
#pragma unroll 1
    for (; issued < limit; ++issued) {
      const int u = issued * 32 + lane;
      if (u < total_units) cp_async16(ring + (u & (RING_UNITS - 1)) * 16, src + u);
      cp_async_commit();
    }
    cp_async_wait_dyn(issued - need);
    __syncwarp();
    ready = min(need * 32, total_units);
  }
  // The next record's 16 A registers (the strip's four k-steps).
  DEVI void next(u32 (&a)[4][4]) {
    if (r + READ_UNITS > ready && ready < total_units) refill(r + READ_UNITS);
    const u32 rec = (u32)(r & (RING_UNITS - 1)) * 16;  // ring offset of the record
    const u32 w = lds32(ring + ((rec + 4 * lane) & (RING_BYTES - 1)));
    u32 total, start[4];
    step_starts(step_counts(w), lane, start, total);
    r += 8 + (int)((total + 7) >> 3);
    gather_record(w, start, total, ring, rec + 128, stage, lane, a);
  }
};

template <bool BF16, int NT>
DEVI void bitmap_spmm_body(const int* __restrict__ data, const int* __restrict__ offsets, int mt, int kt,
                           int kt_per_split, Problem p) {
  __shared__ __align__(16) u32 ring_all[WARPS][RING_UNITS * 4];
  __shared__ __align__(16) u32 stage_all[WARPS][STAGE_WORDS];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int strip = row_block_of(p) * WARPS + warp;
  const int n0 = n_chunk_of(p) * NT * 8;
  const int kb = blockIdx.y * kt_per_split;
  const int ke = min(kt, kb + kt_per_split);
  const bool active = strip < mt && kb < ke;
  const u32 ring_base = smem_addr(ring_all[warp]);
  const u32 stage_base = smem_addr(stage_all[warp]);

  float acc[NT][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[nt][i] = 0.f;

  if (active) {
    BitmapRecords recs(data, offsets, strip, kt, kb, ke, true, ring_base, stage_base, lane);

    // This lane's X rows (clamped to N - 1: rows past N only feed accumulator columns never stored),
    // 16 columns from 16t, as 16-byte vectors; a full strip advances them by 8 vectors.
    constexpr int NB = NT < 4 ? NT : 4;  // n-tiles per B group (NT = 8: two groups)
    const uint4* xv[NB];
#pragma unroll
    for (int nt = 0; nt < NB; ++nt)
      xv[nt] = reinterpret_cast<const uint4*>(p.x + (long long)min(n0 + nt * 8 + (lane >> 2), p.N - 1) * p.ldx +
                                              16 * (lane & 3)) + 8 * (long long)kb;
    const int full_strips = p.vec ? min(ke, p.K / 64) : kb;  // strips whose X loads need no checks

    // B fragments of n-tiles g*NB .. g*NB + NB - 1 for strip j (hoisted pointers on full strips)
    auto load_group = [&](u32 (&bg)[4][NB][2], int g, int j) {
      if (g == 0 && j < full_strips) {
#pragma unroll
        for (int nt = 0; nt < NB; ++nt) {
          const uint4 lo = __ldg(xv[g * NB + nt]), hi = __ldg(xv[g * NB + nt] + 1);
          bg[0][nt][0] = lo.x; bg[0][nt][1] = lo.y; bg[1][nt][0] = lo.z; bg[1][nt][1] = lo.w;
          bg[2][nt][0] = hi.x; bg[2][nt][1] = hi.y; bg[3][nt][0] = hi.z; bg[3][nt][1] = hi.w;
        }
      } else {
        load_b<NB>(bg, p.x, p.ldx, p.N, p.K, n0 + g * NB * 8, j * 64, lane, p.vec);
      }
    };

    for (int j = kb; j < ke; ++j) {
      u32 b[4][NB][2];
      load_group(b, 0, j);  // issued first, in flight during the decode (NT = 8: the first 4 n-tiles)

      u32 a[4][4];
      recs.next(a);

      if (NT <= 4) {
        multiply_strip<BF16, NT>(acc, a, b, p, n0, j * 64, lane);
      } else {  // NT = 8: the first group was loaded before the decode; the second reuses its registers
#pragma unroll
        for (int s = 0; s < 4; ++s)
#pragma unroll
          for (int nt = 0; nt < NB; ++nt) mma16816<BF16>(acc[nt], a[s], b[s][nt]);
        load_group(b, 1, j);
#pragma unroll
        for (int s = 0; s < 4; ++s)
#pragma unroll
          for (int nt = 0; nt < NB; ++nt) mma16816<BF16>(acc[(NB + nt) % NT], a[s], b[s][nt]);
      }
#pragma unroll
      for (int nt = 0; nt < NB; ++nt) xv[nt] += 8;
    }
    cp_async_wait<0>();
  }
  epilogue<BF16, NT>(p, acc, strip, warp, active, n0, lane);
}

// ------------------------------------------------------------------------------------------------
// TiledCSL kernel: one warp per block.  The warp owns a whole 64-row tile row (its four strips) and walks
// the tiles kb .. ke - 1 with no block barrier.  For each tile, the lanes scatter the values of the tile's
// entries (16-byte units: lane l takes units 32 r + l) into a private zeroed 8 KiB dense tile in shared
// memory, laid out in fragment order with the 16-byte chunks swizzled so that the read-back is free of bank
// conflicts; after a __syncwarp each lane reads its 4 x 32 elements back with 16 LDS.128 (zeroing them) and
// multiplies them by one set of B fragments, so X is loaded once per 4096 weight elements.  The entries come in
// bank order (format version 2, docs/formats.md): the 32 entries of one warp store mostly hit distinct banks.  The next tile's
// first csl_pf_units<NT> units per lane are loaded into registers while this tile is multiplied; denser
// tiles (over 25 % density, 12.5 % at NT = 4) load the rest when they scatter them.
// N > 32 runs several blocks along N (kernels.plan, max_nt): 64 tokens would need 128 accumulators.
// ------------------------------------------------------------------------------------------------

// Byte offset in the dense tile of an entry's position (entry >> 16).  Every Tiled-CSL kernel holds a 64 x 64 tile in
// shared memory row-major, 128 bytes per row, with the 16-byte chunk c of row r at chunk c ^ (r % 8) (the 128-byte
// swizzle that wgmma reads), and since format version 3 the position is the element's index in that layout, so the
// byte is 2 * position: one shift and one mask.
DEVI u32 csl_tile_byte(u32 e) { return (e >> 15) & 0x1ffeu; }

template <int NT> struct csl_pf_units { static constexpr int value = NT >= 4 ? 4 : 8; };  // 8: 25 % density

// Scatter one unit's four entries into the tile at `dense_base`, in every Tiled-CSL kernel; pad entries (0xffff0000)
// store nothing.  The store is predicated inside the asm: as an `if` around it, the compiler branched around every
// entry of the warpgroup kernels (BSSY / BRA / BSYNC).  With KEEP, `kept` receives their tile offsets, two per
// register, for a later clear (pads give some offset inside the tile: zeroing it again after the read-back is
// harmless).
template <bool KEEP>
DEVI void csl_scatter4(u32 dense_base, const uint4& e, u32 (&kept)[2]) {
  const u32 v[4] = {e.x, e.y, e.z, e.w};
  u32 o[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    o[q] = csl_tile_byte(v[q]);
    asm volatile("{ .reg .pred p; setp.lt.u32 p, %2, 0x10000000; @p st.shared.u16 [%0], %1; }"
                 ::"r"(dense_base + o[q]), "h"((u16)v[q]), "r"(v[q]));
  }
  if (KEEP) {
    kept[0] = __byte_perm(o[0], o[1], 0x5410);
    kept[1] = __byte_perm(o[2], o[3], 0x5410);
  }
}
DEVI void csl_scatter4(u32 dense_base, const uint4& e) {
  u32 unused[2];
  csl_scatter4<false>(dense_base, e, unused);
}

// Programmatic dependent launch (sm_90): every spmm block lets the next kernel in the stream launch at once
// (launch_dependents); the Tiled-CSL split-K reduction, launched with the programmatic-serialization attribute
// (kernels._build.launch, pdl=True), so has its blocks resident while the spmm finishes and waits in
// griddepcontrol.wait until the spmm grid has completed and its writes are visible.  This hides the second
// launch's latency.  Under kernels.static_weights the Tiled-CSL spmm itself is launched so, and waits after loading
// its first weight entries.  Both instructions are no-ops when the launch did not ask for it; not compiled before
// sm_90.
DEVI void pdl_launch_dependents() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
DEVI void pdl_wait() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
// Asks L2 for `bytes` (a multiple of 16) from the 16-byte aligned `src` (sm_90 bulk prefetch; nothing before sm_90).
DEVI void l2_prefetch(const void* src, u32 bytes) {
#if __CUDA_ARCH__ >= 900
  if (bytes) asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(src), "r"(bytes) : "memory");
#endif
}
// Asks L2 for `n` ranges (address, bytes) of a table in global memory (16-byte aligned starts and sizes), spread
// over every block of the grid first: thread t of block b takes ranges t * blocks + b + k * (threads of the grid).
// (Session 71's first version gave block 0 the first blockDim.x ranges: one SM's bulk prefetches then ran at about
// 0.26 TB/s, and the attention waited for them, 7.4 -> 38.6 us a layer on an H200.)  Used by the decode attention to
// warm the next projections' weights while DRAM would idle (kernels.L2_WARM_MB).
DEVI void l2_warm(const long long* ranges, int n) {
  if (!ranges) return;
  const int blocks = gridDim.x * gridDim.y * gridDim.z;
  const int b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  for (int i = threadIdx.x * blocks + b; i < n; i += blocks * blockDim.x) {
    const longlong2 r = __ldg(reinterpret_cast<const longlong2*>(ranges) + i);
    l2_prefetch(reinterpret_cast<const void*>(r.x), (u32)r.y);
  }
}

// The entries of one Tiled-CSL tile row over a split's tiles [kb, ke), for the W warps that share the row: the
// current tile's 16-byte units (four entries each) are [lo, hi).  Lane l keeps the end unit of tile kb + 32 c + l in
// `ends` (reloaded every 32 tiles), so stepping to the next tile is one shuffle.  The warps take units in rounds of
// 32 W: warp w's lane l has unit lo + 32 (W r + w) + l in round r.  The first PF rounds are prefetched into `pf`
// one tile ahead; `rest` loads the others as they are scattered.  A tile row past M (`row_ok` false) has no units.
template <int PF, int W>
struct CslTiles {
  const int* tile_off;
  const uint4* units;
  int kb, ke, first, lane, ends, lo, hi;
  bool row_ok;
  uint4 pf[PF];
  DEVI CslTiles(const int* data, const int* offsets, int tile_row, bool row_ok_, int kt, int kb_, int ke_, int warp,
                int lane_)
      : tile_off(offsets + (long long)(row_ok_ ? tile_row : 0) * kt), units(reinterpret_cast<const uint4*>(data)),
        kb(kb_), ke(ke_), first(32 * warp + lane_), lane(lane_), row_ok(row_ok_) {
    ends = row_ok && kb + 1 + lane <= ke ? tile_off[kb + 1 + lane] >> 2 : 0;
    lo = row_ok ? tile_off[kb] >> 2 : 0;
    hi = __shfl_sync(FULL_MASK, ends, 0);
  }
  DEVI uint4 load(int u) const {  // unit u, or a pad past the tile
    return u < hi ? __ldcs(units + u) : make_uint4(0xffff0000u, 0xffff0000u, 0xffff0000u, 0xffff0000u);
  }
  DEVI void prefetch() {
#pragma unroll
    for (int r = 0; r < PF; ++r) pf[r] = load(lo + 32 * W * r + first);
  }
  template <class F>
  DEVI void rest(F&& f) const {  // f(unit) for this lane's units past the prefetched rounds
#pragma unroll 1
    for (int u0 = lo + 32 * W * PF + first - lane; u0 < hi; u0 += 32 * W) f(load(u0 + lane));
  }
  DEVI void next(int j) {  // from tile j to tile j + 1 (< ke), whose first rounds are then in flight
    const int t = j + 1 - kb;
    if ((t & 31) == 0) ends = row_ok && j + 2 + lane <= ke ? tile_off[j + 2 + lane] >> 2 : 0;
    lo = hi;
    hi = __shfl_sync(FULL_MASK, ends, t & 31);
    prefetch();
  }
};

template <int NT>
DEVI void zero_acc(float (&acc)[4][NT][4]) {
#pragma unroll
  for (int s = 0; s < 4; ++s)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[s][nt][i] = 0.f;
}

// The Tiled-CSL one-warp and multi-warp kernels read both operands with ldmatrix.  X: the tile's 8 NT tokens x 64
// columns are copied into `xs` in shared memory (one 128-byte row per token, the 16-byte chunk c of token row n at
// c ^ (n % 8), as the weight tile) by up to 2 NT cp.async per lane; where K is not a multiple of 8 or the tile ends
// past K, by 4-byte loads and stores instead (zeros past K).  Rows past N are not written: the kernel zeroes the tile
// once, and those rows only feed accumulator columns that are never stored.  The caller waits
// (cp.async.wait_group 0, __syncwarp) before csl_multiply_tile reads it.
template <int NT>
DEVI void csl_load_x(u32 xs, const Problem& p, int n0, int k0, int lane) {
  if (p.vec && k0 + 64 <= p.K) {  // rows 16-byte aligned (K % 8 == 0, x aligned): whole chunks
#pragma unroll
    for (int i = 0; i < 2 * NT; ++i) {
      const int q = 32 * i + lane, n = q >> 3, c = q & 7;  // token row n of the tile, chunk c
      if (n0 + n < p.N)
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(xs + n * 128 + ((c ^ (n & 7)) << 4)),
                     "l"(p.x + (long long)(n0 + n) * p.ldx + k0 + 8 * c));
    }
  } else {
#pragma unroll 1
    for (int q = lane; q < min(NT * 8, p.N - n0) * 32; q += 32) {  // word w (columns 2 w, 2 w + 1) of token row n
      const int n = q >> 5, w = q & 31, k = k0 + 2 * w;
      const u16* src = p.x + (long long)(n0 + n) * p.ldx + k;
      const u32 e0 = k < p.K ? (u32)src[0] : 0u, e1 = k + 1 < p.K ? (u32)src[1] : 0u;
      asm volatile("st.shared.u32 [%0], %1;" ::"r"(xs + n * 128 + (((w >> 2) ^ (n & 7)) << 4) + 4 * (w & 3)),
                   "r"(e0 | (e1 << 16)));
    }
  }
  cp_async_commit();  // one group per call on both paths (empty on the second), so callers may count groups
}

// acc[s] += strip s of the dense tile at `base` (swizzled row-major, as csl_tile_byte writes it) times the X tile at
// `xs`.  A: k-step c of strip s is the 16 x 16 block of rows 16 s .. 16 s + 15 and columns 16 c .. 16 c + 15, one
// ldmatrix.x4 whose four 8 x 8 matrices (rows + 0 / + 8, columns + 0 / + 8) lanes 0-7, 8-15, 16-23, 24-31 address,
// one 16-byte row each; so k index j of step c is column 16 c + j.  B: for 8 tokens and k-steps c, c + 1 one
// ldmatrix.x4 of the X tile (chunks 2 c .. 2 c + 3 of the 8 token rows), whose registers are the B pairs of both
// steps.  The 8 rows of every matrix sit in 8 distinct chunks: no bank conflict.  16 + 2 NT ldmatrix.x4 per tile;
// with `clear`, every lane zeroes the 16 bytes of the weight tile it addressed right after.
template <bool BF16, int NT>
DEVI void csl_multiply_tile(float (&acc)[4][NT][4], u32 base, u32 xs, int lane, bool clear) {
  const int r = lane & 15, hi = lane >> 4;  // weight: the row in the strip and the column half this lane addresses
  const int xr = lane & 7, xm = lane >> 3;  // X: the token row and the matrix (chunk) this lane addresses
#pragma unroll
  for (int h = 0; h < 2; ++h) {  // k-steps 2 h and 2 h + 1
    u32 b[2][NT][2];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
      asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                   : "=r"(b[0][nt][0]), "=r"(b[0][nt][1]), "=r"(b[1][nt][0]), "=r"(b[1][nt][1])
                   : "r"(xs + (8 * nt + xr) * 128 + ((u32)((4 * h + xm) ^ xr) << 4)));
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      u32 a[2][4];
#pragma unroll
      for (int c2 = 0; c2 < 2; ++c2) {
        const u32 at = base + (16 * s + r) * 128 + ((u32)((2 * (2 * h + c2) + hi) ^ (r & 7)) << 4);
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                     : "=r"(a[c2][0]), "=r"(a[c2][1]), "=r"(a[c2][2]), "=r"(a[c2][3]) : "r"(at));
        if (clear) asm volatile("st.shared.v4.b32 [%0], {%1, %1, %1, %1};" ::"r"(at), "r"(0u));
      }
#pragma unroll
      for (int c2 = 0; c2 < 2; ++c2)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) mma16816<BF16>(acc[s][nt], a[c2], b[c2][nt]);
    }
  }
}

// Where a block lets the next kernel launch (griddepcontrol.launch_dependents, when that kernel is launched
// programmatically): at its start (the bitmap kernels), or (the one-warp Tiled-CSL kernels) once its product is done,
// before its partial tiles: the reduction after them is then dispatched only when every spmm block is past its main
// loop, so its waiting blocks never take SM room from the spmm's blocks, while its launch overlaps the last blocks'
// stores.  Session 23 (H200, Llama-3-8B decode): batch 16 1.7 % faster at 70 / 80 % with _nt2's reduction launched so,
// batch 8 3.7 % faster with _nt1's trigger moved from its start to here.
constexpr bool bitmap_trigger_at_start = true, tiled_csl_trigger_at_start = false;

constexpr int RED_SILU = 1, RED_RMS = 2, RED_RESID = 4;  // the modes: splitk_reduce_body

// Split-K of the one-warp kernels summed by atomics (tiled_csl_spmm_<dtype>_nt<NT>a, kernels.NT_ATOMIC): each block
// adds its four strips' accumulators into `p.ws`, fp32 sums kept zeroed between launches ([row block][strip][nt][lane]
// x 4 floats, one red.global.add.v4.f32 per strip and 8 tokens), then lane 0 takes its row group's ticket (acquire-
// release after a __syncwarp, as _n1r); the last block to arrive reads the group's sums, zeroes them and its ticket,
// and writes Y (plain + bias, or with RED_SILU silu(gate) x up of a gate row block and its up row block gridDim.x / 2
// further, the ticket counting both).  No partial tiles and no second launch; the sums' order is the atomics' (fp32
// results may differ in the last bits from launch to launch).  n_chunks is 1 (N <= 16).
DEVI void red_add_v4(float* dst, const float (&v)[4]) {
#if __CUDA_ARCH__ >= 900
  asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(dst), "f"(v[0]), "f"(v[1]), "f"(v[2]), "f"(v[3])
               : "memory");
#else
#pragma unroll
  for (int i = 0; i < 4; ++i) atomicAdd(dst + i, v[i]);
#endif
}

template <bool BF16, int NT>
DEVI void csl_atomic_finish(const Problem& p, float (&acc)[4][NT][4], int row_block, int lane, int mode) {
  pdl_wait();  // (a block with no tiles waits here before its writes; a no-op after the kernel's wait)
  float* sums = p.ws + (long long)row_block * 512 * NT + 4 * lane;
#pragma unroll
  for (int s = 0; s < 4; ++s)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
      if (nt * 8 < p.N) red_add_v4(sums + (s * NT + nt) * 128, acc[s][nt]);
  const bool silu = mode & RED_SILU;
  const int half = gridDim.x / 2, group = silu ? row_block % half : row_block;
  __syncwarp();  // every lane's adds before lane 0's release
  int prev = 0;
  if (lane == 0) prev = ticket_acq_rel(p.tickets + group);
  prev = __shfl_sync(FULL_MASK, prev, 0);
  if (prev != (silu ? 2 : 1) * p.splits - 1) return;
  __syncwarp();  // lane 0's acquire before every lane's loads
  if (lane == 0) p.tickets[group] = 0;
  float* g = p.ws + (long long)group * 512 * NT + 4 * lane;
  float* u = g + (long long)half * 512 * NT;
  const float4 zero = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
  for (int s = 0; s < 4; ++s) {
    float a[NT][4], b[NT][4];  // the strip's sums (and its up rows') in the fragment layout, zeroed behind
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const bool live = nt * 8 < p.N;
      float4* gs = reinterpret_cast<float4*>(g + (s * NT + nt) * 128);
      float4* us = reinterpret_cast<float4*>(u + (s * NT + nt) * 128);
      const float4 va = live ? __ldcg(gs) : zero, vb = live && silu ? __ldcg(us) : zero;
      if (live) __stcg(gs, zero);
      if (live && silu) __stcg(us, zero);
      a[nt][0] = va.x; a[nt][1] = va.y; a[nt][2] = va.z; a[nt][3] = va.w;
      b[nt][0] = vb.x; b[nt][1] = vb.y; b[nt][2] = vb.z; b[nt][3] = vb.w;
    }
    if (silu)
      store_frag<BF16, NT, true>(p, a, b, group * 4 + s, 0, lane);
    else
      store_frag<BF16, NT>(p, a, b, group * 4 + s, 0, lane);
  }
}

template <bool BF16, int NT, bool ATOMIC = false>
DEVI void tiled_csl_spmm_body(const int* __restrict__ data, const int* __restrict__ offsets, int mt, int kt,
                             int kt_per_split, Problem p, int mode = 0) {
  __shared__ __align__(128) u32 dense[4 * 1024 / 2];  // 8 KiB: the tile, swizzled row-major (csl_tile_byte)
  __shared__ __align__(128) u32 xtile[NT * 8 * 32];     // the X tile, NT KiB (csl_load_x)
  const int lane = threadIdx.x & 31;
  const int row_block = row_block_of(p);
  const int n0 = n_chunk_of(p) * NT * 8;
  const int kb = blockIdx.y * kt_per_split;
  const int ke = min(kt, kb + kt_per_split);
  const bool active = kb < ke;
  const u32 dense_base = smem_addr(dense), xs = smem_addr(xtile);
  const uint4 zero4 = make_uint4(0, 0, 0, 0);
#pragma unroll
  for (int i = 0; i < 16; ++i) reinterpret_cast<uint4*>(dense)[i * 32 + lane] = zero4;
#pragma unroll
  for (int i = 0; i < 2 * NT; ++i) reinterpret_cast<uint4*>(xtile)[i * 32 + lane] = zero4;  // rows past N stay zero
  __syncwarp();

  float acc[4][NT][4];
  zero_acc<NT>(acc);

  if (active) {
    constexpr int PF = csl_pf_units<NT>::value;
    CslTiles<PF, 1> st(data, offsets, row_block, true, kt, kb, ke, 0, lane);
    st.prefetch();
    // Launched programmatically (kernels.spmm_cuda, pdl_spmm) this block may run before the kernel that writes X
    // has finished: the weight's offsets and first entries above are loaded meanwhile, X and every global write
    // come after the wait.  A no-op for a plain launch.
    pdl_wait();
    // NT = 1: a sparse tile's scatter offsets, zeroed again after the read-back (tcsl_zero_scatter: at NT = 2 the
    // 16 registers cost more occupancy than the clear saves; benchmarks/ab/README.md)
    constexpr bool KEEP = NT == 1;
    u32 kept[KEEP ? PF : 1][2];
    for (int j = kb; j < ke; ++j) {
      csl_load_x<NT>(xs, p, n0, j * 64, lane);  // in flight during the scatter
      const int rounds = (st.hi - st.lo + 31) >> 5;  // warp-uniform
      const bool sparse_tile = KEEP && rounds <= PF;  // every unit prefetched: clear only what was written
#pragma unroll
      for (int r = 0; r < PF; ++r)
        if (r < rounds) csl_scatter4<KEEP>(dense_base, st.pf[r], kept[KEEP ? r : 0]);
      st.rest([&](const uint4& e) {
        csl_scatter4(dense_base, e);
      });
      if (j + 1 < ke) st.next(j);  // the next tile's entries, in flight during this tile's multiply
      cp_async_wait<0>();
      __syncwarp();
      csl_multiply_tile<BF16, NT>(acc, dense_base, xs, lane, !sparse_tile);
      if (sparse_tile) {  // every lane has read its elements: clear the positions this tile wrote, in bank order
        __syncwarp();
#pragma unroll
        for (int r = 0; r < PF; ++r)
          if (r < rounds)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              asm volatile("st.shared.u16 [%0], %1;" ::"r"(dense_base + (kept[KEEP ? r : 0][h] & 0xffffu)), "r"(0u));
              asm volatile("st.shared.u16 [%0], %1;" ::"r"(dense_base + (kept[KEEP ? r : 0][h] >> 16)), "r"(0u));
            }
      }
      __syncwarp();
    }
  }
  // with split-K, the partials are summed by a second launch (splitk_reduce): the last 32-thread block of a row
  // group would sum them with 32 threads, a long tail at N >= 16; or (ATOMIC, _nt<NT>a) added by atomics, whose sums
  // the last block reads in one round trip (csl_atomic_finish)
  if (!tiled_csl_trigger_at_start) pdl_launch_dependents();  // the late trigger (INSTANTIATE: else at the start)
  if (ATOMIC) {
    csl_atomic_finish<BF16, NT>(p, acc, row_block, lane, mode);
  } else {
#pragma unroll
    for (int s = 0; s < 4; ++s)
      store_acc<BF16, NT>(p, acc[s], row_block * 4 + s, s, active && row_block * 4 + s < mt, n0, lane);
  }
}

// Split-K of the N = 1 kernel summed in the same launch (tiled_csl_spmm_<dtype>_n1r / _n1rs, kernels.N1_FUSED): each
// block stores its 64 row sums compactly (ws[split][row block][64], then one sum of squares of X per split and row
// block for the RMS mode: every row block of a split computes the same one), and the last block of a row group to
// arrive (a ticket per group, reset by that block) sums the splits in split order, 16 loads in flight per lane, and
// applies the reduction's mode (RED_SILU: the group is a gate row block and its up row block M / 128 further, the
// ticket counts both; RED_RMS; RED_RESID) with splitk_reduce's rounding steps.  No second launch: at batch 1 the
// reductions' launches cost 10-12 % of a decode step (session 17's what-if).
template <bool BF16, bool SCALE>
DEVI void n1_finish(const Problem& p, float s0, float s1, float ssq, int mode, float eps, float rscale, int lane) {
  const int rb = blockIdx.x, blocks = gridDim.x, split = blockIdx.y;  // n_chunks = 1 at N = 1
  const bool silu = mode & RED_SILU;
  pdl_wait();  // (an inactive split waits here before its writes; a no-op after the kernel's wait)
  reinterpret_cast<float2*>(p.ws + ((long long)split * blocks + rb) * 64)[lane] = make_float2(s0, s1);
  float* ssq_ws = p.ws + (long long)p.splits * blocks * 64;  // [split][row block]
  if (SCALE) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) ssq += __shfl_xor_sync(0xffffffffu, ssq, o);
    if (lane == 0) ssq_ws[(long long)split * blocks + rb] = ssq;
  }
  const int half = blocks / 2;  // RED_SILU: the up rows' first row block (M / 2 is a multiple of 64)
  const int group = silu ? rb % half : rb;
  __syncwarp();  // orders every lane's stores before lane 0's release
  int prev = 0;
  if (lane == 0) prev = ticket_acq_rel(p.tickets + group);
  prev = __shfl_sync(0xffffffffu, prev, 0);
  if (prev != (silu ? 2 : 1) * p.splits - 1) return;
  __syncwarp();  // lane 0's acquire before every lane's loads
  const long long stride = (long long)blocks * 32;  // float2s per split
  const float2* src = reinterpret_cast<const float2*>(p.ws) + (long long)group * 32 + lane;
  // 24 loads in flight (72 registers); with SiLU the gate and up rows' splits in the same rounds
  const SplitPair<float2> gu = silu ? sum_split_pairs<12>(src, (long long)half * 32, stride, 0, p.splits)
                                    : SplitPair<float2>{};
  const float2 v = silu ? gu.a : sum_splits<24>(src, stride, 0, p.splits), u = gu.b;
  if (lane == 0) p.tickets[group] = 0;  // every block of the group has taken its ticket
  float rms = 1.f;
  if (mode & RED_RMS) {  // every lane the same factor: the same sums in the same order (as splitk_reduce)
    float q = 0.f;
    for (int i = lane; i < p.splits; i += 32) q += __ldcg(ssq_ws + (long long)i * blocks + group);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) q += __shfl_xor_sync(0xffffffffu, q, o);
    rms = rscale * rsqrtf(q * __fdividef(1.f, (float)p.K) + eps);
  }
  // rows m and m + 1, token 0 only (N = 1): splitk_reduce's group stores with one live column
  const int M = silu ? p.M / 2 : p.M, m = group * 64 + 2 * lane;
  const float r[2] = {v.x * rms, v.y * rms}, up[2] = {u.x * rms, u.y * rms};
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    if (m + i >= M) break;
    const float4 g4 = make_float4(r[i], 0.f, 0.f, 0.f);
    if (silu)
      store_silu_group<BF16>(g4, make_float4(up[i], 0.f, 0.f, 0.f), p.y, M, 1, m + i, 0);
    else if (mode & RED_RESID)
      add_group<BF16>(g4, make_float4(to_float<BF16>(p.y[m + i]), 0.f, 0.f, 0.f), p.y, p.bias, M, 1, m + i, 0);
    else
      store_group<BF16>(g4, p.y, p.bias, M, 1, m + i, 0);
  }
}

// N = 1 (tiled_csl_spmm_<dtype>_n1): the one-warp kernel's walk over a tile row and its entries, but no dense tile, no
// read-back and no MMA.  Each entry is multiplied on the CUDA cores by X's element of its column and added into the
// lane's own partial sum of its row: `part` holds 64 rows x 32 lanes of fp32, lane l's column in bank l, so the
// read-modify-write of a round of entries is two conflict-free wavefronts, and the X row (128 bytes, unswizzled) is
// one bank row, so the gather of a round is one.  Per 4096-element tile at 80 %: about 26 rounds x 3 wavefronts plus
// the 26 of the entry loads, against about 180 for nt1 (its scatter, read-back and clear).  The 32 lanes' partials
// are summed once per split (rotated, so the loads of a step hit 32 banks), then handed to store_acc in the m16n8
// fragment layout of token 0, so split-K and its reduction are nt1's.
template <bool BF16>
DEVI void csl_fma4_n1(u32 pbase, u32 xs, const uint4& e4) {
  const u32 v[4] = {e4.x, e4.y, e4.z, e4.w};
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const u32 tb = csl_tile_byte(v[q]);                  // 128 r + 2 (swizzled column)
    const u32 xb = (tb & 0x7eu) ^ ((tb >> 3) & 0x70u);   // 2 x the column: the chunk unswizzled by r % 8
    const u32 pb = pbase + (tb & 0x1f80u);                // row r of this lane's column
    u32 xh;
    float acc;
    asm volatile("ld.shared.u16 %0, [%1];" : "=r"(xh) : "r"(xs + xb));
    asm volatile("ld.shared.f32 %0, [%1];" : "=f"(acc) : "r"(pb));
    acc = fmaf(to_float<BF16>((u16)v[q]), to_float<BF16>((u16)xh), acc);
    asm volatile("{ .reg .pred p; setp.lt.u32 p, %2, 0x10000000; @p st.shared.f32 [%0], %1; }"  // pads: no store
                 ::"r"(pb), "f"(acc), "r"(v[q]) : "memory");
  }
}

// SCALE (tiled_csl_spmm_<dtype>_n1s): X's column c is first multiplied by colscale[c], rounded to the dtype once (the
// RMSNorm weight of kernels.spmm_cuda(norm=...); the norm's per-token factor is applied by the reduction).  Each lane
// scales its own two columns of the tile's X row after it lands; the scale's load is issued with the previous tile.
template <bool BF16, bool SCALE = false, bool FUSE = false>
DEVI void tiled_csl_n1_body(const int* __restrict__ data, const int* __restrict__ offsets, int mt, int kt,
                            int kt_per_split, Problem p, const u16* __restrict__ colscale = nullptr, int mode = 0,
                            float eps = 0.f, float rscale = 1.f) {
  __shared__ __align__(128) float part[64 * 32];  // 8 KiB: part[32 r + l] = lane l's partial sum of row r
  __shared__ __align__(128) u16 xrow[2][64];       // token 0's 64 columns of the tile, double-buffered
  const int lane = threadIdx.x & 31;
  const int row_block = row_block_of(p);
  // kt_per_split 0 (kernels.N1_EVEN): split s of p.splits takes tiles s kt / splits .. (s + 1) kt / splits - 1
  const int kb = kt_per_split ? blockIdx.y * kt_per_split : (int)((long long)blockIdx.y * kt / p.splits);
  const int ke = kt_per_split ? min(kt, kb + kt_per_split) : (int)((long long)(blockIdx.y + 1) * kt / p.splits);
  const bool active = kb < ke;
  const u32 pbase = smem_addr(part) + 4 * lane, xs0 = smem_addr(xrow);
#pragma unroll
  for (int r = 0; r < 64; ++r) part[32 * r + lane] = 0.f;
  // token 0's columns 64 j .. 64 j + 63 -> xrow[b]: csl_load_x's row 0, which is not swizzled
  auto load_x = [&](int j, int b) { csl_load_x<1>(xs0 + 128 * b, p, 0, 64 * j, lane); };
  float acc[4][1][4];
  zero_acc<1>(acc);
  float s0 = 0.f, s1 = 0.f;  // this lane's rows 2 lane and 2 lane + 1, summed over the split
  float ssq = 0.f;  // SCALE: this lane's sum of squares of X's raw values over the split's columns
  if (active) {
    constexpr int PF = csl_pf_units<1>::value;
    CslTiles<PF, 1> st(data, offsets, row_block, true, kt, kb, ke, 0, lane);
    st.prefetch();
    pdl_wait();  // X and every global write come after the previous kernel (programmatic launch; else a no-op)
    load_x(kb, 0);
    const int sc = 64 * kb + 2 * lane;  // this lane's first column of the tile (SCALE)
    u32 gs = SCALE && sc < p.K ? *reinterpret_cast<const u32*>(colscale + sc) : 0u;
    for (int j = kb; j < ke; ++j) {
      const int b = (j - kb) & 1;
      if (j + 1 < ke) {
        load_x(j + 1, b ^ 1);  // the next tile's X row, in flight during this tile
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      __syncwarp();
      const u32 xs = xs0 + 128 * b;
      if (SCALE) {
        const int c = 64 * j + 2 * lane;
        if (c < p.K) {  // K is even here (the launcher asks K % 8 == 0): both columns or neither
          u32 xv;
          asm volatile("ld.shared.u32 %0, [%1];" : "=r"(xv) : "r"(xs + 4 * lane));
          const float x0 = to_float<BF16>((u16)xv), x1 = to_float<BF16>((u16)(xv >> 16));
          ssq = fmaf(x0, x0, fmaf(x1, x1, ssq));
          const u32 lo = from_float<BF16>(x0 * to_float<BF16>((u16)gs));
          const u32 hi = from_float<BF16>(x1 * to_float<BF16>((u16)(gs >> 16)));
          asm volatile("st.shared.u32 [%0], %1;" ::"r"(xs + 4 * lane), "r"(lo | (hi << 16)) : "memory");
        }
        gs = j + 1 < ke && c + 64 < p.K ? *reinterpret_cast<const u32*>(colscale + c + 64) : 0u;
        __syncwarp();
      }
      const int rounds = (st.hi - st.lo + 31) >> 5;  // warp-uniform
#pragma unroll
      for (int r = 0; r < PF; ++r)
        if (r < rounds) csl_fma4_n1<BF16>(pbase, xs, st.pf[r]);
      st.rest([&](const uint4& e) { csl_fma4_n1<BF16>(pbase, xs, e); });
      if (j + 1 < ke) st.next(j);
      __syncwarp();  // every lane has read xrow[b] before it is refilled
    }
    // lane l sums rows 2 l and 2 l + 1 over the 32 columns, starting at its own (column (l + i) % 32 at step i)
#pragma unroll 8
    for (int i = 0; i < 32; ++i) {
      const int c = (lane + i) & 31;
      s0 += part[64 * lane + c];
      s1 += part[64 * lane + 32 + c];
    }
    if (!FUSE) {  // the fused kernel hands s0, s1 to n1_finish instead
      __syncwarp();
      part[2 * lane] = s0;
      part[2 * lane + 1] = s1;
      __syncwarp();
      const int g = lane >> 2;
      if ((lane & 3) == 0) {  // token 0 is column 0 of the m16n8 accumulator: rows g and g + 8 of each strip
#pragma unroll
        for (int s = 0; s < 4; ++s) {
          acc[s][0][0] = part[16 * s + g];
          acc[s][0][2] = part[16 * s + g + 8];
        }
      }
    }
  }
  if constexpr (FUSE) {
    n1_finish<BF16, SCALE>(p, s0, s1, ssq, mode, eps, rscale, lane);
  } else {
#pragma unroll
    for (int s = 0; s < 4; ++s)
      store_acc<BF16, 1>(p, acc[s], row_block * 4 + s, s, active && row_block * 4 + s < mt, 0, lane);
    if (SCALE && p.splits > 1) {  // the split's sum of squares (row block 0 writes it) after the partial tiles: the
                                  // reduction's RMSNorm factor, without reading X again
      pdl_wait();  // (an inactive split waits here before its write; a no-op after the wait above)
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) ssq += __shfl_xor_sync(0xffffffffu, ssq, o);
      if (row_block == 0 && lane == 0) p.ws[(long long)p.splits * gridDim.x * 512 + blockIdx.y] = ssq;
    }
  }
}

// N > 32 without wgmma: W warps per block share one decode of every tile.  Warp w multiplies the
// 32 tokens of chunk (block's n chunk) * W + w, so the block covers 32 W tokens, where the one-warp kernel decodes
// every tile once per 32 tokens.  The warps scatter a share of the tile's units each (warp w: rounds w, w + W, ...)
// into one of three dense tiles; one block barrier; every warp reads the whole tile back and multiplies it by its
// own B.  Three buffers make one barrier per tile enough: after barrier j every warp has read tile j - 1, so each
// warp clears its share of that buffer, which is scattered into again only after barrier j + 1.
template <bool BF16, int W>
DEVI void tiled_csl_multi_body(const int* __restrict__ data, const int* __restrict__ offsets, int mt, int kt,
                              int kt_per_split, Problem p) {
  constexpr int NT = 4, PF = 8 / W;  // PF rounds per warp: 8 rounds of 32 units in all (25 % density)
  __shared__ __align__(128) u32 dense[3][4 * 1024 / 2];  // 3 x 8 KiB
  __shared__ __align__(128) u32 xtile[W][NT * 8 * 32];    // each warp's X tile, 4 KiB (csl_load_x)
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const u32 xs = smem_addr(xtile[warp]);
  const int nl = (p.N + 31) >> 5;  // 32-token chunks: the partial tiles along N, as the one-warp kernel's
  const int row_block = row_block_of(p);
  const int chunk = n_chunk_of(p) * W + warp;
  const bool live = chunk < nl;  // a warp past N still scatters its share and meets the barriers
  const int n0 = chunk * 32;
  const int kb = blockIdx.y * kt_per_split;
  const int ke = min(kt, kb + kt_per_split);
  const bool active = kb < ke;  // block-uniform
  const uint4 zero4 = make_uint4(0, 0, 0, 0);
  for (int i = threadIdx.x; i < 3 * 512; i += 32 * W) reinterpret_cast<uint4*>(dense)[i] = zero4;
  for (int i = threadIdx.x; i < W * 2 * NT * 32; i += 32 * W) reinterpret_cast<uint4*>(xtile)[i] = zero4;
  __syncthreads();

  float acc[4][NT][4];
  zero_acc<NT>(acc);

  if (active) {
    CslTiles<PF, W> st(data, offsets, row_block, true, kt, kb, ke, warp, lane);
    st.prefetch();
    pdl_wait();  // X and every global write after the previous kernel (programmatic launch; else a no-op)
    for (int j = kb; j < ke; ++j) {
      const int buf = (j - kb) % 3;
      const u32 base = smem_addr(dense[buf]);
      if (live) csl_load_x<NT>(xs, p, n0, j * 64, lane);
#pragma unroll
      for (int r = 0; r < PF; ++r) csl_scatter4(base, st.pf[r]);  // pads past the tile: no stores
      st.rest([&](const uint4& e) { csl_scatter4(base, e); });
      if (j + 1 < ke) st.next(j);
      cp_async_wait<0>();
      __syncthreads();
      if (j > kb) {  // every warp has read tile j - 1: clear this warp's share of its buffer
        uint4* prev = reinterpret_cast<uint4*>(dense[(j - kb + 2) % 3]);
#pragma unroll
        for (int i = 0; i < 16 / W; ++i) prev[(warp * (16 / W) + i) * 32 + lane] = zero4;
      }
      if (live) csl_multiply_tile<BF16, NT>(acc, base, xs, lane, false);
    }
  }
  const int tiles = (int)(gridDim.x / p.n_chunks) * nl;
#pragma unroll
  for (int s = 0; s < 4; ++s)
    store_acc<BF16, NT>(p, acc[s], row_block * 4 + s, s, live && active && row_block * 4 + s < mt, n0, lane,
                        row_block * nl + chunk, tiles);
}

// ------------------------------------------------------------------------------------------------
// Tiled-CSL for N > 32 with warpgroup MMA (sm_90a, compiled only there): `_wg<NB>x<R>`, NB = 64 or 128 tokens and
// R = 2 warpgroups (4 warps each) per block, one 64-row tile row per warpgroup.  Per tile: the X tile (NB tokens x
// 64 columns) is copied to shared memory with cp.async in the 128-byte-swizzled K-major layout that wgmma reads,
// once for the block; each warpgroup scatters its tile's entries (a share per warp) straight into the same layout
// (row-major W tile at its physical columns, docs/formats.md); then four wgmma.m64nNBk16 read both from shared
// memory.  The tile is decoded once for NB tokens, and the tensor cores read A from shared memory themselves
// instead of 16 LDS.128 per lane per 32 tokens.  The pipeline (tiled_csl_wg_body) has one block barrier per tile.
// The accumulators follow the m16n8 layout per warp (rows 16 w + g, + 8): one 32-token chunk of them is exactly the
// one-warp kernel's acc[4][4], so the epilogue and the split-K partial tiles are the same.
// ------------------------------------------------------------------------------------------------
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define FLASH_LLM_WGMMA 1
#endif

// The accumulator lists of wgmma.m64nNk16 (N / 2 fp32 registers per thread) and their "+f" operands, eight at a time.
#define WG_D64 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, " \
  "%22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, " \
  "%45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
#define WG_D32 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, " \
  "%22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define WG_D16 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}"
#define WG_D8 "{%0, %1, %2, %3, %4, %5, %6, %7}"
#define WG_D4 "{%0, %1, %2, %3}"
#define WG_OUT8(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
  "+f"(d[i + 6]), "+f"(d[i + 7])
template <bool BF16, int NB> DEVI void wgmma_tile(float (&d)[NB / 2], u64 da, u64 db);
#ifdef FLASH_LLM_WGMMA
template <> DEVI void wgmma_tile<false, 32>(float (&d)[16], u64 da, u64 db) {
  asm volatile("wgmma.mma_async.sync.aligned.m64n32k16.f32.f16.f16 " WG_D16 ", %16, %17, 1, 1, 1, 0, 0;"
               : WG_OUT8(0), WG_OUT8(8) : "l"(da), "l"(db));
}
template <> DEVI void wgmma_tile<true, 32>(float (&d)[16], u64 da, u64 db) {
  asm volatile("wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 " WG_D16 ", %16, %17, 1, 1, 1, 0, 0;"
               : WG_OUT8(0), WG_OUT8(8) : "l"(da), "l"(db));
}
template <> DEVI void wgmma_tile<false, 64>(float (&d)[32], u64 da, u64 db) {
  asm volatile("wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 " WG_D32 ", %32, %33, 1, 1, 1, 0, 0;"
               : WG_OUT8(0), WG_OUT8(8), WG_OUT8(16), WG_OUT8(24) : "l"(da), "l"(db));
}
template <> DEVI void wgmma_tile<true, 64>(float (&d)[32], u64 da, u64 db) {
  asm volatile("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " WG_D32 ", %32, %33, 1, 1, 1, 0, 0;"
               : WG_OUT8(0), WG_OUT8(8), WG_OUT8(16), WG_OUT8(24) : "l"(da), "l"(db));
}
template <> DEVI void wgmma_tile<false, 128>(float (&d)[64], u64 da, u64 db) {
  asm volatile("wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 " WG_D64 ", %64, %65, 1, 1, 1, 0, 0;"
               : WG_OUT8(0), WG_OUT8(8), WG_OUT8(16), WG_OUT8(24), WG_OUT8(32), WG_OUT8(40), WG_OUT8(48), WG_OUT8(56)
               : "l"(da), "l"(db));
}
template <> DEVI void wgmma_tile<true, 128>(float (&d)[64], u64 da, u64 db) {
  asm volatile("wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " WG_D64 ", %64, %65, 1, 1, 1, 0, 0;"
               : WG_OUT8(0), WG_OUT8(8), WG_OUT8(16), WG_OUT8(24), WG_OUT8(32), WG_OUT8(40), WG_OUT8(48), WG_OUT8(56)
               : "l"(da), "l"(db));
}
#endif

// Shared-memory matrix descriptor: 128-byte swizzle, K-major; 8-row groups 1024 bytes apart (SBO); LBO unused.
DEVI u64 sw128_desc(u32 addr) {
  return (u64)((addr & 0x3ffffu) >> 4) | ((u64)1 << 16) | ((u64)(1024 >> 4) << 32) | ((u64)1 << 62);
}

template <int NB>
DEVI void wg_fence_acc(float (&d)[NB / 2]) {  // keep the compiler from touching the accumulators mid-flight
#pragma unroll
  for (int i = 0; i < NB / 2; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// Dynamic shared memory of the warpgroup kernel: R x S A tiles (8 KiB each), S X tiles (NB x 128 bytes), and
// 1 KiB to align the start to the 1024 bytes of the swizzle pattern.
constexpr int wg_smem_bytes(int NB, int R, int S) { return R * S * 8192 + S * NB * 128 + 1024; }

// R warpgroups per block, one 64-row tile row each, share the X tile of NB tokens (X is read once per 64 R weight
// rows).  Software pipeline of S stages, one block barrier per tile: the wgmma of tile j runs (async) while the warps
// scatter tile j + S - 1 into a free A buffer and copy its X tile into a free X buffer.  The generic-proxy writes
// (scatter, clear, cp.async) must be ordered before the wgmma that reads them by a proxy fence, a MEMBAR in SASS that
// costs 9-12 % of these kernels (session 13).  With S = 2 each tile's writes are read at the next tile, so every tile
// fences; with S = 3 they are read two tiles later, so the fence at the end of every odd
// tile (counted from kb) covers the writes of that tile and the one before.
// Split-K summed in the same launch, spread over the group's blocks (the warpgroup kernels'
// tiled_csl_spmm_<dtype>_wg<NB>x<R>r, kernels.WG_SPREAD).  A group is the (splits) blocks of one row block and N chunk, with RED_SILU (mode) those of a gate
// row block and of its up row block M / 2 rows further (the launcher asks M / 2 % (64 R) == 0).  Each block stores its
// partial tiles as for splitk_reduce, takes the group's arrival ticket (acquire-release, thread 0) and waits until
// every block of the group has stored; then block `me` of the group's `parts` sums the me-th 1 / parts of the group's
// float4 groups over the splits, in split order (the bits of splitk_reduce with one way), and stores them with the
// reduction's rounding steps (bias; SiLU x up).  The last block to leave (a second counter) resets both counters.
// Blocks wait for blocks of the same launch, so the launcher takes this path only when the whole grid is resident at
// once (one wave); session 18's `wg_fused`, where the last block summed the whole group alone, lost to the second
// launch.  Layout: a block covers R 64-row tile rows x CPB partial tiles of 8 NT tokens (the warpgroup kernels: NT = 4,
// CPB = NB / 32); `row_tiles` x `nl` partial tiles per split; T threads a block.
template <bool BF16, int NT, int R, int CPB, int T>
DEVI void spread_sum(const Problem& p, int mode, int row_tiles, int nl) {
  constexpr int Q = 128 * NT, ITEMS = R * CPB * Q;  // float4 groups per partial tile; per group of blocks
  const bool silu = mode & RED_SILU;
  u32 bx, gx;  // read here, not hoisted above the main loop (where _wg64x2s2r's 64 registers would spill them)
  asm volatile("mov.u32 %0, %%ctaid.x;" : "=r"(bx));
  asm volatile("mov.u32 %0, %%nctaid.x;" : "=r"(gx));
  const int rb = (int)bx / p.n_chunks, nc = (int)bx % p.n_chunks;
  const int rbs = (int)gx / p.n_chunks, half = rbs / 2;  // row blocks; RED_SILU: the first up row block
  const int grb = silu ? rb % half : rb;
  const int groups = (silu ? half : rbs) * p.n_chunks, group = grb * p.n_chunks + nc;
  const int parts = (silu ? 2 : 1) * p.splits, me = (silu && rb >= half ? p.splits : 0) + (int)blockIdx.y;
  int* arrive = p.tickets + group;
  int* done = p.tickets + groups + group;
  pdl_wait();  // (an inactive split waits here before its ticket; a no-op after the kernel's wait)
  __syncthreads();  // every thread's partial tiles before thread 0's release
  if (threadIdx.x == 0) {
    ticket_acq_rel(arrive);
    while (ld_acquire(arrive) < parts) __nanosleep(64);
  }
  __syncthreads();  // thread 0's acquire before every thread's loads
  const long long stride = (long long)row_tiles * nl * Q;  // float4s per split
  const long long up = (long long)half * R * nl * Q;       // RED_SILU: gate tile row -> its up tile row
  const int lo = (int)((long long)me * ITEMS / parts), hi = (int)((long long)(me + 1) * ITEMS / parts);
  for (int i = lo + (int)threadIdx.x; i < hi; i += T) {
    const int tile_row = grb * R + i / (CPB * Q), chunk = nc * CPB + (i / Q) % CPB, q = i % Q;
    int m, n;
    group_row_col<NT>(q, tile_row * 64, chunk * 8 * NT, m, n);
    if (tile_row >= row_tiles || chunk >= nl || m >= (silu ? p.M / 2 : p.M) || n >= p.N) continue;  // never stored
    const float4* src = reinterpret_cast<const float4*>(p.ws) + ((long long)tile_row * nl + chunk) * Q + q;
    const float4 v = sum_splits(src, stride, 0, p.splits);
    if (silu)
      store_silu_group<BF16>(v, sum_splits(src + up, stride, 0, p.splits), p.y, p.M / 2, p.N, m, n);
    else
      store_group<BF16>(v, p.y, p.bias, p.M, p.N, m, n);
  }
  if (threadIdx.x == 0 && atomicAdd(done, 1) == parts - 1) {  // every block of the group is past its wait
    *arrive = 0;
    *done = 0;
  }
}

template <bool BF16, int NB, int R, int S, bool SPREAD = false, int PF = 2>
DEVI void tiled_csl_wg_body(const int* __restrict__ data, const int* __restrict__ offsets, int mt, int kt,
                           int kt_per_split, Problem p, int mode = 0) {
#ifdef FLASH_LLM_WGMMA
  static_assert(S == 2 || S == 3, "two or three stages");
  constexpr int AHEAD = S - 1;
  // PF rounds per warp prefetched in registers a tile ahead, 4 PF rounds of 32 units in all: 25 % density at PF = 2,
  // 37.5 % at 3 (_wg32x2p3), 50 % at 4 (_wg32x2p4); the units past them (the rest) are loaded when the tile is scattered, a wait on DRAM
  constexpr int T = 128 * R;
  extern __shared__ unsigned char wg_smem[];
  const u32 sbase = (smem_addr(wg_smem) + 1023u) & ~1023u;
  const int tid = threadIdx.x, wg = tid >> 7, wtid = tid & 127, warp = wtid >> 5, lane = tid & 31;
  const u32 a_base = sbase + wg * (S * 8192);        // this warpgroup's S A tiles
  const u32 x_base = sbase + R * (S * 8192);         // the S X tiles
  const int nl = (p.N + 31) >> 5;                    // 32-token partial tiles along N, as the one-warp kernel's
  const int row_tiles = (mt + 3) >> 2;               // 64-row tile rows
  const int tile_row = (int)(blockIdx.x / p.n_chunks) * R + wg;
  const bool row_ok = tile_row < row_tiles;
  const int n0 = n_chunk_of(p) * NB;
  const int kb = blockIdx.y * kt_per_split;
  const int ke = min(kt, kb + kt_per_split);
  const bool active = kb < ke;  // block-uniform
  for (int i = wtid; i < S * 512; i += 128)
    asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};" ::"r"(a_base + 16 * i), "r"(0), "r"(0), "r"(0), "r"(0));
  float d[NB / 2];
#pragma unroll
  for (int i = 0; i < NB / 2; ++i) d[i] = 0.f;
  if (active) {
    CslTiles<PF, 4> st(data, offsets, tile_row, row_ok, kt, kb, ke, warp, lane);
    // scatter the current tile's entries (the first PF rounds prefetched) into A buffer `abuf`; then, apart, step
    // from tile j to tile j + 1, loading its first PF rounds.  The step comes after the proxy fence that follows a
    // scatter: the fence (a MEMBAR in SASS) waits for this thread's loads in flight, so rounds asked for before it
    // would be waited for there, a DRAM round trip a fenced tile, instead of during the next tile's MMA
    auto scatter = [&](u32 abuf) {
#pragma unroll
      for (int r = 0; r < PF; ++r)  // warp-uniform: a round that starts past the tile's units holds only pads
        if (st.lo + 32 * (4 * r + warp) < st.hi) csl_scatter4(abuf, st.pf[r]);
      st.rest([&](const uint4& e) { csl_scatter4(abuf, e); });
    };
    auto advance = [&](int j) {
      if (j + 1 < ke) st.next(j);
    };
    // X rows n0 .. n0 + NB - 1, columns k0 .. k0 + 63 -> the swizzled X tile at `xb` (NB rows of 128 bytes) with
    // cp.async, zero-filled past N and K (K % 8 == 0 here: a 16-byte chunk is all in or all out).  Thread tid copies
    // chunk tid % 8 of rows tid / 8 + i T / 8: its pointers and shared offsets are the same for every tile but k0.
    constexpr int XI = NB * 8 / T, XROWS = T / 8;
    const int xr = tid >> 3, xc = tid & 7;
    const u16* xsrc = p.x + (long long)(n0 + xr) * p.ldx + 8 * xc;
    const u32 xdst = xr * 128 + ((xc ^ (xr & 7)) << 4);
    auto load_x = [&](u32 xb, int k0) {
      const bool kok = k0 + 8 * xc < p.K;
#pragma unroll
      for (int i = 0; i < XI; ++i) {
        const bool ok = kok && n0 + xr + i * XROWS < p.N;
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(xb + xdst + i * XROWS * 128),
                     "l"(ok ? xsrc + (long long)i * XROWS * p.ldx + k0 : p.x), "r"(ok ? 16 : 0));
      }
      asm volatile("cp.async.commit_group;" ::: "memory");
    };
    st.prefetch();
    pdl_wait();  // X and every global write after the previous kernel (programmatic launch; else a no-op)
    __syncthreads();  // the A tiles are clear
#pragma unroll
    for (int a = 0; a < AHEAD; ++a)  // tiles kb .. kb + AHEAD - 1 into buffers 0 .. AHEAD - 1
      if (kb + a < ke) {
        load_x(x_base + a * (NB * 128), (kb + a) * 64);
        scatter(a_base + a * 8192);
        if (a + 1 < AHEAD) advance(kb + a);
      }
    asm volatile("cp.async.wait_group 0;" ::: "memory");
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // generic-proxy writes -> wgmma reads
    if (kb + AHEAD - 1 < ke) advance(kb + AHEAD - 1);  // tile kb + AHEAD's first rounds, after the fence
    __syncthreads();
    // descriptors of buffer 0; the address field counts 16 bytes, so the other buffers and the k16 steps are additions
    const u64 da0 = sw128_desc(a_base), dx0 = sw128_desc(x_base);
    int buf = 0;  // (j - kb) % S
    for (int j = kb; j < ke; ++j) {
      const int ahead = buf + AHEAD >= S ? buf + AHEAD - S : buf + AHEAD;  // (j + AHEAD - kb) % S
      const u32 abuf = a_base + buf * 8192;
      const u64 da = da0 + buf * (8192 >> 4), dx = dx0 + buf * (NB * 128 >> 4);
      wg_fence_acc<NB>(d);
      asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#pragma unroll
      for (int kk = 0; kk < 4; ++kk)  // k16 steps: 32 bytes further along each 128-byte row
        wgmma_tile<BF16, NB>(d, da + 2 * kk, dx + 2 * kk);
      asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
      if (j + AHEAD < ke) {  // tile j + AHEAD into free buffers while the tensor cores run
        load_x(x_base + ahead * (NB * 128), (j + AHEAD) * 64);
        scatter(a_base + ahead * 8192);
      }
      // S = 3: the writes of this tile and the one before are read from tile j + 1 on.  The fence also covers the
      // clear of the A tile an earlier tile read (below, after it): that buffer is scattered next at the tile after
      // this one and read after that tile's fence.
      if (S == 2 || ((j - kb) & 1)) {
        asm volatile("cp.async.wait_group 0;" ::: "memory");
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
      }
      if (j + AHEAD < ke) advance(j + AHEAD);  // tile j + AHEAD + 1's first rounds, in flight through the barrier
      asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
      wg_fence_acc<NB>(d);
#pragma unroll
      for (int i = 0; i < 4; ++i)  // clear the A tile just read (this warpgroup's own), for tile j + S
        asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};" ::"r"(abuf + 16 * (i * 128 + wtid)), "r"(0), "r"(0),
                     "r"(0), "r"(0));
      __syncthreads();  // every warpgroup is done with tile j's buffers; the next tile's are complete
      buf = buf + 1 == S ? 0 : buf + 1;
    }
  }
  const int tiles = row_tiles * nl;
#pragma unroll
  for (int c = 0; c < NB / 32; ++c) {  // one 32-token chunk: acc[nt][i] = d[16 c + 4 nt + i]
    const int chunk = n0 / 32 + c;
    float acc[4][4];
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[nt][i] = d[16 * c + 4 * nt + i];
    store_acc<BF16, 4>(p, acc, tile_row * 4 + warp, warp, active && chunk < nl && tile_row * 4 + warp < mt,
                       chunk * 32, lane, tile_row * nl + chunk, tiles);
  }
  if (SPREAD && p.splits > 1) spread_sum<BF16, 4, R, NB / 32, 128 * R>(p, mode, row_tiles, nl);
#else
  __trap();  // launched only on sm_90 (kernels.spmm_cuda)
#endif
}

// ------------------------------------------------------------------------------------------------
// BitmapTiles with warpgroup MMA, A from registers (sm_90a; NB = 8 .. 128 tokens per block).  The block is the
// bitmap kernel's: 4 warps, one strip row (16 rows) each, so the 64 rows of one wgmma.m64nNBk16.  Each warp decodes
// its strip exactly as the one-warp-per-strip kernel does (ring, window words, gather) into the 16 A registers of
// the strip, and those registers are wgmma's A operand as they are: the register fragment of a k16 step is the
// m16n8k16 one.  Their k index kappa of step s is strip column c = 16 t + 4 s + 2 q + e (kappa = 2 t + e + 8 q,
// docs/formats.md), so X is given with its columns in that order inside every 64-column tile (X', made by the
// launcher with one PyTorch permute) and copied into shared memory as it is: 128-byte-swizzled rows of NB tokens,
// two buffers, each filled by cp.async whose completion arrives on an mbarrier.  No A tile in shared memory and no
// block barrier in the loop: a warp waits for the X tile's barrier, issues its part of the four wgmma, and waits
// for them before its next gather overwrites the registers.
// ------------------------------------------------------------------------------------------------
DEVI void mbar_init(u32 bar, u32 count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}
DEVI void mbar_wait(u32 bar, u32 parity) {  // until the phase of this parity has completed
  u32 done = 0;
  while (!done)
    asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
                 : "=r"(done) : "r"(bar), "r"(parity) : "memory");
}
constexpr int bw_smem_bytes(int NB) { return 2 * NB * 128 + 1024 + 16; }  // dynamic: X tiles, alignment, barriers

template <bool BF16, int NB> DEVI void wgmma_rs(float (&d)[NB / 2], const u32 (&a)[4], u64 db);
#ifdef FLASH_LLM_WGMMA
template <> DEVI void wgmma_rs<false, 128>(float (&d)[64], const u32 (&a)[4], u64 db) {
  asm volatile("wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 " WG_D64 ", {%64, %65, %66, %67}, %68, 1, 1, 1, 0;"
               : WG_OUT8(0), WG_OUT8(8), WG_OUT8(16), WG_OUT8(24), WG_OUT8(32), WG_OUT8(40), WG_OUT8(48), WG_OUT8(56)
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db));
}
template <> DEVI void wgmma_rs<true, 128>(float (&d)[64], const u32 (&a)[4], u64 db) {
  asm volatile("wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " WG_D64 ", {%64, %65, %66, %67}, %68, 1, 1, 1, 0;"
               : WG_OUT8(0), WG_OUT8(8), WG_OUT8(16), WG_OUT8(24), WG_OUT8(32), WG_OUT8(40), WG_OUT8(48), WG_OUT8(56)
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db));
}
template <> DEVI void wgmma_rs<false, 64>(float (&d)[32], const u32 (&a)[4], u64 db) {
  asm volatile("wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 " WG_D32 ", {%32, %33, %34, %35}, %36, 1, 1, 1, 0;"
               : WG_OUT8(0), WG_OUT8(8), WG_OUT8(16), WG_OUT8(24)
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db));
}
template <> DEVI void wgmma_rs<true, 64>(float (&d)[32], const u32 (&a)[4], u64 db) {
  asm volatile("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " WG_D32 ", {%32, %33, %34, %35}, %36, 1, 1, 1, 0;"
               : WG_OUT8(0), WG_OUT8(8), WG_OUT8(16), WG_OUT8(24)
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db));
}
template <> DEVI void wgmma_rs<false, 32>(float (&d)[16], const u32 (&a)[4], u64 db) {
  asm volatile("wgmma.mma_async.sync.aligned.m64n32k16.f32.f16.f16 " WG_D16 ", {%16, %17, %18, %19}, %20, 1, 1, 1, 0;"
               : WG_OUT8(0), WG_OUT8(8) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db));
}
template <> DEVI void wgmma_rs<true, 32>(float (&d)[16], const u32 (&a)[4], u64 db) {
  asm volatile("wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 " WG_D16 ", {%16, %17, %18, %19}, %20, 1, 1, 1, 0;"
               : WG_OUT8(0), WG_OUT8(8) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db));
}
template <> DEVI void wgmma_rs<false, 16>(float (&d)[8], const u32 (&a)[4], u64 db) {
  asm volatile("wgmma.mma_async.sync.aligned.m64n16k16.f32.f16.f16 " WG_D8 ", {%8, %9, %10, %11}, %12, 1, 1, 1, 0;"
               : WG_OUT8(0) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db));
}
template <> DEVI void wgmma_rs<true, 16>(float (&d)[8], const u32 (&a)[4], u64 db) {
  asm volatile("wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 " WG_D8 ", {%8, %9, %10, %11}, %12, 1, 1, 1, 0;"
               : WG_OUT8(0) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db));
}
template <> DEVI void wgmma_rs<false, 8>(float (&d)[4], const u32 (&a)[4], u64 db) {
  asm volatile("wgmma.mma_async.sync.aligned.m64n8k16.f32.f16.f16 " WG_D4 ", {%4, %5, %6, %7}, %8, 1, 1, 1, 0;"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db));
}
template <> DEVI void wgmma_rs<true, 8>(float (&d)[4], const u32 (&a)[4], u64 db) {
  asm volatile("wgmma.mma_async.sync.aligned.m64n8k16.f32.bf16.bf16 " WG_D4 ", {%4, %5, %6, %7}, %8, 1, 1, 1, 0;"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db));
}
#endif

template <bool BF16, int NB>
DEVI void bitmap_wg_body(const int* __restrict__ data, const int* __restrict__ offsets, int mt, int kt,
                         int kt_per_split, Problem p) {
#ifdef FLASH_LLM_WGMMA
  __shared__ __align__(16) u32 ring_all[WARPS][RING_UNITS * 4];
  __shared__ __align__(16) u32 stage_all[WARPS][STAGE_WORDS];
  extern __shared__ unsigned char bw_smem[];
  const u32 xs = (smem_addr(bw_smem) + 1023u) & ~1023u;  // X tiles (2 x NB x 128 bytes), then 2 mbarriers
  const u32 xbar = xs + 2 * NB * 128;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int row_block = row_block_of(p), strip = row_block * WARPS + warp;
  const int n0 = n_chunk_of(p) * NB;
  const int kb = blockIdx.y * kt_per_split;
  const int ke = min(kt, kb + kt_per_split);
  const bool live = strip < mt;  // a warp past M decodes nothing (zero A) but takes part in every wgmma
  const u32 ring_base = smem_addr(ring_all[warp]);
  const u32 stage_base = smem_addr(stage_all[warp]);
  if (tid < 2) mbar_init(xbar + 8 * tid, 128);
  __syncthreads();
  float d[NB / 2];
#pragma unroll
  for (int i = 0; i < NB / 2; ++i) d[i] = 0.f;
  // X' tile j -> buffer (j - kb) & 1: thread tid copies chunk tid % 8 of rows tid / 8 + 16 i; X' has no partial
  // 64-column tile (the launcher pads it), so only rows past N are zero-filled
  const int xr = tid >> 3, xc = tid & 7;
  const u16* xsrc = p.x + (long long)(n0 + xr) * p.ldx + 8 * xc;
  const u32 xdst = xr * 128 + ((xc ^ (xr & 7)) << 4);
  auto load_x = [&](int j) {
    const u32 xb = xs + ((j - kb) & 1) * (NB * 128);
#pragma unroll
    for (int i = 0; i < (NB + 15) / 16; ++i) {  // NB = 8: threads 64-127 copy nothing
      if (NB >= 16 || xr < NB) {
        const bool ok = n0 + xr + 16 * i < p.N;
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(xb + xdst + i * 16 * 128),
                     "l"(ok ? xsrc + (long long)16 * i * p.ldx + j * 64 : p.x), "r"(ok ? 16 : 0));
      }
    }
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" ::"r"(xbar + 8 * ((j - kb) & 1)) : "memory");
    cp_async_commit();
  };
  if (kb < ke) {
    BitmapRecords recs(data, offsets, strip, kt, kb, ke, live, ring_base, stage_base, lane);
    const u64 dx0 = sw128_desc(xs);
    load_x(kb);
    for (int j = kb; j < ke; ++j) {
      const int t = j - kb;
      u32 a[4][4];
      if (live) {
        recs.next(a);
      } else {
#pragma unroll
        for (int s = 0; s < 4; ++s)
#pragma unroll
          for (int i = 0; i < 4; ++i) a[s][i] = 0u;
      }
      mbar_wait(xbar + 8 * (t & 1), (t >> 1) & 1);  // X' tile j is in
      asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
      wg_fence_acc<NB>(d);
      asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
      const u64 dx = dx0 + (t & 1) * (NB * 128 >> 4);
#pragma unroll
      for (int s = 0; s < 4; ++s) wgmma_rs<BF16, NB>(d, a[s], dx + 2 * s);
      asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
      // the other X buffer was read by tile j - 1's wgmma, which every warp waited for before issuing this one
      if (j + 1 < ke) load_x(j + 1);
      asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");  // before the next gather rewrites a
      wg_fence_acc<NB>(d);
    }
    cp_async_wait<0>();
  }
  // partial tiles of 8 NTC tokens (NTC = 4, or NB / 8 below 32 tokens per block), as the NT = NTC kernels'
  constexpr int NTC = NB < 32 ? NB / 8 : 4;
  const int nlc = (p.N + 8 * NTC - 1) / (8 * NTC);
  const int tiles = ((mt + 3) >> 2) * nlc;
#pragma unroll
  for (int c = 0; c < NB / (8 * NTC); ++c) {
    const int chunk = n0 / (8 * NTC) + c;
    float acc[NTC][4];
#pragma unroll
    for (int nt = 0; nt < NTC; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[nt][i] = d[4 * NTC * c + 4 * nt + i];
    store_acc<BF16, NTC>(p, acc, strip, warp, kb < ke && live && chunk < nlc, chunk * 8 * NTC, lane,
                         row_block * nlc + chunk, tiles);
  }
#else
  __trap();  // launched only on sm_90 (kernels.spmm_cuda)
#endif
}

// ------------------------------------------------------------------------------------------------
// Decoders to a dense row-major W[M, K] (for the large-N path: expand once, then dense GEMM).
// ------------------------------------------------------------------------------------------------
extern "C" __global__ void __launch_bounds__(THREADS)
bitmap_to_dense(const int* __restrict__ data, const int* __restrict__ offsets, u16* __restrict__ out,
                int M, int K, int mt, int kt) {
  // One warp per strip, decoded like the spmm kernel: the record is copied into shared memory (16-byte loads),
  // its values staged as window words and gathered into the 16 A-fragment registers of every lane; the
  // registers are stored as a row-major 16x64 tile over the record's buffer and written out as whole rows
  // (128 bytes, 16-byte stores) when K allows it.  In the tile, 16-byte chunk c of row r sits at chunk c ^ (r % 8),
  // so that the lanes of one register store (same column, eight rows) hit different banks.
  __shared__ __align__(16) u32 buf_all[WARPS][RING_UNITS * 4];
  __shared__ __align__(16) u32 stage_all[WARPS][STAGE_WORDS];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const long long strip = (long long)blockIdx.x * WARPS + warp;
  if (strip >= (long long)mt * kt) return;  // whole warps only: nothing below synchronizes the block
  const u32 buf = smem_addr(buf_all[warp]), stage = smem_addr(stage_all[warp]);
  const long long r0 = offsets[strip];
  const int units = (int)(offsets[strip + 1] - r0);
  const int4* src = reinterpret_cast<const int4*>(data) + r0;
  for (int u = lane; u < units; u += 32) {
    const int4 v = __ldcs(src + u);
    asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};" ::"r"(buf + 16 * u), "r"(v.x), "r"(v.y), "r"(v.z),
                 "r"(v.w) : "memory");
  }
  __syncwarp();
  const u32 w = lds32(buf + 4 * lane);
  u32 total, start[4];
  step_starts(step_counts(w), lane, start, total);
  u32 a[4][4];
  gather_record(w, start, total, buf, 128, stage, lane, a);  // then the record's buffer becomes the tile
  // register i of k-step s: halves (row g + 8 (i & 1), columns 16t + 4s + 2 (i >> 1) + {0, 1}), one 32-bit word
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int s = 0; s < 4; ++s)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int row = g + 8 * (i & 1), col = 16 * t + 4 * s + 2 * (i >> 1);
      const int chunk = (col >> 3) ^ (row & 7);
      asm volatile("st.shared.b32 [%0], %1;" ::"r"(buf + 128 * row + 16 * chunk + 2 * (col & 7)), "r"(a[s][i])
                   : "memory");
    }
  __syncwarp();
  const u16* tile = reinterpret_cast<const u16*>(buf_all[warp]);
  auto at = [](int rr, int cc) { return rr * 64 + (((cc >> 3) ^ (rr & 7)) << 3) + (cc & 7); };  // tile index
  const int row0 = (int)(strip / kt) * 16, col0 = (int)(strip % kt) * 64;
  if ((K & 7) == 0 && col0 + 64 <= K) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int rr = i * 4 + (lane >> 3), cc = (lane & 7) * 8;
      if (row0 + rr < M)
        *reinterpret_cast<uint4*>(out + (long long)(row0 + rr) * K + col0 + cc) =
            *reinterpret_cast<const uint4*>(tile + at(rr, cc));
    }
  } else {
    for (int i = lane; i < 16 * 64; i += 32) {
      const int rr = i >> 6, cc = i & 63;
      if (row0 + rr < M && col0 + cc < K) out[(long long)(row0 + rr) * K + col0 + cc] = tile[at(rr, cc)];
    }
  }
}

// One block per 64x64 tile: the entries are scattered into a zeroed tile in shared memory at their positions (the
// spmm kernels' swizzled row-major layout), which is then written out as whole 128-byte rows (16-byte stores) when K
// allows it.  `out` needs no zeroing.
extern "C" __global__ void __launch_bounds__(THREADS)
tiled_csl_to_dense(const int* __restrict__ data, const int* __restrict__ offsets, u16* __restrict__ out,
                   int M, int K, int kt) {
  __shared__ __align__(16) u16 stage[64 * 64];
  const long long t = blockIdx.x;
  const int row0 = (int)(t / kt) * 64, col0 = (int)(t % kt) * 64;
  const uint4 zero4 = make_uint4(0, 0, 0, 0);
#pragma unroll
  for (int i = 0; i < 4; ++i) reinterpret_cast<uint4*>(stage)[threadIdx.x + i * THREADS] = zero4;
  __syncthreads();
  for (int e = offsets[t] + threadIdx.x; e < offsets[t + 1]; e += THREADS) {
    const u32 v = (u32)__ldcs(data + e);
    const int pos = v >> 16;
    if (pos >= 4096) continue;  // pad entry
    stage[pos] = (u16)(v & 0xffff);
  }
  __syncthreads();
  auto at = [](int rr, int cc) { return rr * 64 + (((cc >> 3) ^ (rr & 7)) << 3) + (cc & 7); };  // (r, c) -> position
  if ((K & 7) == 0 && col0 + 64 <= K) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int idx = threadIdx.x + i * THREADS, rr = idx >> 3, cc = (idx & 7) * 8;
      if (row0 + rr < M)
        *reinterpret_cast<uint4*>(out + (long long)(row0 + rr) * K + col0 + cc) =
            *reinterpret_cast<const uint4*>(stage + at(rr, cc));
    }
  } else {
    for (int i = threadIdx.x; i < 64 * 64; i += THREADS) {
      const int rr = i >> 6, cc = i & 63;
      if (row0 + rr < M && col0 + cc < K) out[(long long)(row0 + rr) * K + col0 + cc] = stage[at(rr, cc)];
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Instantiations: <format>_spmm_<dtype>_nt<NT>, NT = number of 8-token tiles per block (N <= 8 NT).
// ------------------------------------------------------------------------------------------------
#define SPMM_ARGS                                                                                   \
  const int *__restrict__ data, const int *__restrict__ offsets, const u16 *__restrict__ x,         \
      u16 *__restrict__ y, const u16 *__restrict__ bias, float *__restrict__ ws, int *tickets,      \
      int M, int K, int N, int ldx, int mt, int kt, int splits, int kt_per_split, int n_chunks, int vec
#define SPMM_PROBLEM {x, y, bias, ws, tickets, M, K, N, ldx, splits, n_chunks, vec}

// Threads per block and minimum resident blocks per SM by format and NT.  The minimum caps registers so that the
// blocks the shared memory allows also fit the register file.  Bitmap: 4 warps and 34 KB of ring and windows per
// block, so 6-7 blocks.  Tiled-CSL: one warp, its 8 KB tile and its NT KB X tile per block; 20 / 20 / 10 blocks for
// NT = 1 / 2 / 4 on sm_90 (at NT = 1 the kept scatter offsets take 16 registers: 24 blocks before) (H200: the most
// that compile without spills; 24 at NT = 1 measured faster than 16, benchmarks/ab/README.md).
constexpr int bitmap_threads = THREADS, tiled_csl_threads = 32;
template <int NT> struct bitmap_min_blocks { static constexpr int value = NT <= 2 ? 7 : NT == 4 ? 5 : 4; };
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900  // sm_8x: 164 KB of shared memory per SM; these compile without spills
template <int NT> struct tiled_csl_min_blocks { static constexpr int value = NT == 1 ? 18 : NT == 2 ? 16 : 8; };
#else
template <int NT> struct tiled_csl_min_blocks { static constexpr int value = NT == 1 ? 20 : NT == 2 ? 20 : 10; };
#endif

#define INSTANTIATE(FMT, NAME, BF16, NT)                                                           \
  extern "C" __global__ void __launch_bounds__(FMT##_threads, FMT##_min_blocks<NT>::value)                \
  FMT##_spmm_##NAME##_nt##NT(SPMM_ARGS) {                                                            \
    if (FMT##_trigger_at_start) pdl_launch_dependents();                                          \
    FMT##_spmm_body<BF16, NT>(data, offsets, mt, kt, kt_per_split, Problem SPMM_PROBLEM);           \
  }

#define INSTANTIATE_ALL(FMT)                                                                      \
  INSTANTIATE(FMT, f16, false, 1)                                                                 \
  INSTANTIATE(FMT, f16, false, 2)                                                                 \
  INSTANTIATE(FMT, f16, false, 4)                                                                 \
  INSTANTIATE(FMT, bf16, true, 1)                                                                 \
  INSTANTIATE(FMT, bf16, true, 2)                                                                 \
  INSTANTIATE(FMT, bf16, true, 4)

// Split-K reduction for the Tiled-CSL kernel.  A block's 4 warps take 4 / WAYS sets of 32 16-byte groups of
// partial tile `tile` (tile = row block * n_chunks + n chunk, as in the spmm launch); block (tile, y) starts at
// set 4 y / WAYS.  The WAYS warps of a set each sum a contiguous 1 / WAYS of the splits in order; the first adds
// the others' sums in order and writes Y (so the result is deterministic for a given split count and WAYS).
// WAYS = 4 gives layers with few row blocks four times the threads (Llama-3-8B's 4096 rows: 64 tiles; at N = 1
// 28 -> 22 us on 4096 x 14336, H200); WAYS = 1 (one thread per group, no shared memory) is faster once the
// launch already fills the GPU (9216 x 36864 at N = 32: 105 vs 101 us).  The launcher picks (reduce_ways).
// The reduction's modes (bits of MODE; kernels.spmm_cuda picks them):
// - RED_SILU: the reduction of a merged gate / up projection ([2 M, K], M a multiple of 64, no bias) that writes
//   silu(gate) x up [N, M] instead of [N, 2 M]: its grid covers the gate rows' tiles; each group also sums the up row
//   M + m, which sits M / 64 row tiles further in the partial sums.
// - RED_RMS (N = 1, after the n1s kernel): the sums are multiplied by the token's RMSNorm factor rsqrt(mean(x^2) +
//   eps) before anything else: with the norm's weight folded into X by the spmm, the product of the normalized X.
//   The n1s kernel leaves each split's sum of squares of X after the partial tiles (`splits` floats); every warp
//   sums them in the same order (fp32).
// - RED_RESID: Y (the residual stream, [N, M]) is added to: y <- y + (sum + bias), see add_group.
template <bool BF16, int NT, int MODE = 0>
DEVI void splitk_reduce_body(const float* __restrict__ ws, u16* __restrict__ y, const u16* __restrict__ bias, int M,
                             int N, int splits, int tiles, int n_chunks, int ways, int K, float eps,
                             float rscale) {
  constexpr bool SILU = MODE & RED_SILU, RMS = MODE & RED_RMS;
  __shared__ float4 part[WARPS][32];
  __shared__ float4 part_up[SILU ? WARPS : 1][32];
  pdl_launch_dependents();  // the next kernel, if launched programmatically, may load its weights meanwhile
  pdl_wait();  // the spmm grid's partials (a no-op without programmatic launch)
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, tile = blockIdx.x;
  float ssq = 0.f;  // RMS: this lane's share of the spmm's per-split sums of squares of X (after the partial tiles)
  if (RMS)
    for (int i = lane; i < splits; i += 32) ssq += __ldcg(ws + (long long)splits * tiles * 512 * NT + i);
  const int way = warp % ways;                                   // which share of the splits
  const int q = (blockIdx.y * WARPS + warp) / ways * 32 + lane;  // the group
  int m, n;
  group_row_col<NT>(q, tile / n_chunks * (WARPS * 16), tile % n_chunks * NT * 8, m, n);
  const bool live = q < 128 * NT && m < M && n < N;
  float4 v = make_float4(0.f, 0.f, 0.f, 0.f), vu = v;
  float4 old = v;  // RED_RESID: Y before the add, asked for before the partial sums
  if ((MODE & RED_RESID) && live) {
    const u16* src = y + (long long)n * M + m;
    old.x = to_float<BF16>(src[0]);
    old.y = n + 2 < N ? to_float<BF16>(src[2LL * M]) : 0.f;
    old.z = n + 4 < N ? to_float<BF16>(src[4LL * M]) : 0.f;
    old.w = n + 6 < N ? to_float<BF16>(src[6LL * M]) : 0.f;
  }
  if (live) {
    const long long stride = (long long)tiles * 128 * NT;
    const float4* src = reinterpret_cast<const float4*>(ws) + (long long)tile * 128 * NT + q;
    const int s_begin = way * splits / ways, s_end = (way + 1) * splits / ways;
    // the gate and up rows' splits in the same rounds; 16 loads in flight (one round for up to 64 splits over 4 ways),
    // 8 under the RMS modes' 64-register bound
    if (SILU) {
      const long long up = (long long)(M / 64) * n_chunks * 128 * NT;
      const SplitPair<float4> gu = RMS ? sum_split_pairs<4>(src, up, stride, s_begin, s_end)
                                       : sum_split_pairs<8>(src, up, stride, s_begin, s_end);
      v = gu.a;
      vu = gu.b;
    } else {
      v = RMS ? sum_splits<8>(src, stride, s_begin, s_end) : sum_splits<16>(src, stride, s_begin, s_end);
    }
  }
  float rms = 0.f;
  if (RMS) {  // every warp the same factor: the same sums in the same order (N = 1 only: NaN otherwise, never a
              // silently wrong number)
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) ssq += __shfl_xor_sync(0xffffffffu, ssq, o);
    // sum x (1 / K), as torch's mean; rscale: a power of two (kernels.rms_kernel_weight)
    rms = N == 1 ? rscale * rsqrtf(ssq * __fdividef(1.f, (float)K) + eps) : __int_as_float(0x7fc00000);
  }
  if (ways > 1) {  // uniform over the block
    if (way > 0) {
      part[warp][lane] = v;
      if (SILU) part_up[warp][lane] = vu;
    }
    __syncthreads();
    if (way > 0) return;
    for (int w = 1; w < ways; ++w) {
      const float4 a = part[warp + w][lane];
      v.x += a.x; v.y += a.y; v.z += a.z; v.w += a.w;
      if (SILU) {
        const float4 b = part_up[warp + w][lane];
        vu.x += b.x; vu.y += b.y; vu.z += b.z; vu.w += b.w;
      }
    }
  }
  if (live) {
    if (RMS) {  // N = 1: token 0 only
      v.x *= rms; v.y *= rms; v.z *= rms; v.w *= rms;
      vu.x *= rms; vu.y *= rms; vu.z *= rms; vu.w *= rms;
    }
    if (SILU)
      store_silu_group<BF16>(v, vu, y, M, N, m, n);
    else if (MODE & RED_RESID)
      add_group<BF16>(v, old, y, bias, M, N, m, n);
    else
      store_group<BF16>(v, y, bias, M, N, m, n);
  }
}

// splitk_reduce[_<mode>]_<dtype>_nt<NT>: mode silu, rms, rms_silu or resid (the last three only at NT = 1, after the
// n1 / n1s kernels at N = 1; kernels.spmm_cuda)
#define REDUCE_ARGS                                                                                          \
  const float *__restrict__ ws, u16 *__restrict__ y, const u16 *__restrict__ bias, int M, int N, int splits, \
      int tiles, int n_chunks, int ways, int K, float eps, float rscale
// (BOUNDS: the RMS modes ask for 8 blocks per SM, so ptxas may use 64 registers; left alone it took 32 and spilled)
#define REDUCE_KERNEL(KNAME, BF16, NT, MODE, BOUNDS)                                                     \
  extern "C" __global__ void __launch_bounds__ BOUNDS KNAME(REDUCE_ARGS) {                              \
    splitk_reduce_body<BF16, NT, MODE>(ws, y, bias, M, N, splits, tiles, n_chunks, ways, K, eps, rscale); \
  }
#define INSTANTIATE_REDUCE(NAME, BF16, NT)                                   \
  REDUCE_KERNEL(splitk_reduce_##NAME##_nt##NT, BF16, NT, 0, (THREADS))               \
  REDUCE_KERNEL(splitk_reduce_silu_##NAME##_nt##NT, BF16, NT, RED_SILU, (THREADS))
#define INSTANTIATE_REDUCE_N1(NAME, BF16)                                            \
  REDUCE_KERNEL(splitk_reduce_rms_##NAME##_nt1, BF16, 1, RED_RMS, (THREADS, 8))                 \
  REDUCE_KERNEL(splitk_reduce_rms_silu_##NAME##_nt1, BF16, 1, RED_RMS | RED_SILU, (THREADS, 8)) \
  REDUCE_KERNEL(splitk_reduce_resid_##NAME##_nt1, BF16, 1, RED_RESID, (THREADS))
INSTANTIATE_REDUCE(f16, false, 1)
INSTANTIATE_REDUCE(f16, false, 2)
INSTANTIATE_REDUCE(f16, false, 4)
INSTANTIATE_REDUCE(bf16, true, 1)
INSTANTIATE_REDUCE(bf16, true, 2)
INSTANTIATE_REDUCE(bf16, true, 4)
INSTANTIATE_REDUCE_N1(f16, false)
INSTANTIATE_REDUCE_N1(bf16, true)

INSTANTIATE_ALL(bitmap)
INSTANTIATE(bitmap, f16, false, 8)
INSTANTIATE(bitmap, bf16, true, 8)
INSTANTIATE_ALL(tiled_csl)
// tiled_csl_spmm_<dtype>_nt<1|2>a: the one-warp kernels with their split-K summed by atomics (csl_atomic_finish)
#define INSTANTIATE_ATOMIC(NAME, BF16, NT)                                                                    \
  extern "C" __global__ void __launch_bounds__(tiled_csl_threads, tiled_csl_min_blocks<NT>::value)             \
  tiled_csl_spmm_##NAME##_nt##NT##a(SPMM_ARGS, int mode) {                                                  \
    tiled_csl_spmm_body<BF16, NT, true>(data, offsets, mt, kt, kt_per_split, Problem SPMM_PROBLEM, mode);   \
  }
INSTANTIATE_ATOMIC(f16, false, 1)
INSTANTIATE_ATOMIC(f16, false, 2)
INSTANTIATE_ATOMIC(bf16, true, 1)
INSTANTIATE_ATOMIC(bf16, true, 2)

// The Tiled-CSL kernels for N > 32.  tiled_csl_spmm_<dtype>_w<W>: W warps of 32 tokens each share every tile's decode.
// tiled_csl_spmm_<dtype>_wg<NB>x<R> (sm_90a; a trap elsewhere): NB tokens and R warpgroups (64 R weight rows) per
// block, warpgroup MMA.
#define INSTANTIATE_MULTI(NAME, BF16, W)                                                                  \
  extern "C" __global__ void __launch_bounds__(32 * W, 12 / W)                                             \
  tiled_csl_spmm_##NAME##_w##W(SPMM_ARGS) {                                                               \
    pdl_launch_dependents();                                                                              \
    tiled_csl_multi_body<BF16, W>(data, offsets, mt, kt, kt_per_split, Problem SPMM_PROBLEM);              \
  }
INSTANTIATE_MULTI(f16, false, 2)
INSTANTIATE_MULTI(f16, false, 4)
INSTANTIATE_MULTI(bf16, true, 2)
INSTANTIATE_MULTI(bf16, true, 4)
// tiled_csl_spmm_<dtype>_n1: N = 1 on the CUDA cores; 8.25 KiB of shared memory, 24 blocks per SM
#define INSTANTIATE_N1(NAME, BF16)                                                                       \
  extern "C" __global__ void __launch_bounds__(32, 24) tiled_csl_spmm_##NAME##_n1(SPMM_ARGS) {            \
    pdl_launch_dependents();                                                                              \
    tiled_csl_n1_body<BF16>(data, offsets, mt, kt, kt_per_split, Problem SPMM_PROBLEM);                   \
  }
INSTANTIATE_N1(f16, false)
INSTANTIATE_N1(bf16, true)
// tiled_csl_spmm_<dtype>_n1s: the same with X's columns scaled by colscale first (SCALE above)
#define INSTANTIATE_N1S(NAME, BF16)                                                                      \
  extern "C" __global__ void __launch_bounds__(32, 24)                                                    \
  tiled_csl_spmm_##NAME##_n1s(SPMM_ARGS, const u16* __restrict__ colscale) {                              \
    pdl_launch_dependents();                                                                              \
    tiled_csl_n1_body<BF16, true>(data, offsets, mt, kt, kt_per_split, Problem SPMM_PROBLEM, colscale);   \
  }
INSTANTIATE_N1S(f16, false)
INSTANTIATE_N1S(bf16, true)
// tiled_csl_spmm_<dtype>_n1r / _n1rs: the n1 / n1s kernels with their split-K summed in the same launch (n1_finish;
// mode: the RED_* bits of the reduction it replaces, eps: RED_RMS's)
#define INSTANTIATE_N1R(NAME, BF16, SUFFIX, SCALE)                                                       \
  extern "C" __global__ void __launch_bounds__(32, 24)                                                    \
  tiled_csl_spmm_##NAME##_##SUFFIX(SPMM_ARGS, const u16* __restrict__ colscale, int mode, float eps,       \
                                    float rscale) {                                                     \
    pdl_launch_dependents();                                                                              \
    tiled_csl_n1_body<BF16, SCALE, true>(data, offsets, mt, kt, kt_per_split, Problem SPMM_PROBLEM, colscale, \
                                         mode, eps, rscale);                                              \
  }
INSTANTIATE_N1R(f16, false, n1r, false)
INSTANTIATE_N1R(f16, false, n1rs, true)
INSTANTIATE_N1R(bf16, true, n1r, false)
INSTANTIATE_N1R(bf16, true, n1rs, true)

// ------------------------------------------------------------------------------------------------
// DeltaRows (flash_llm/formats/delta_rows.py): N = 1 on the CUDA cores, one weight row per lane
// ------------------------------------------------------------------------------------------------
// delta_rows_spmm_<dtype>_n1: grid (ceil(slices / DR_WARPS), S), DR_WARPS warps a block, warp i on slice
// DR_WARPS blockIdx.x + i, the block's X window the union of its warps' (staged once, by every thread; session 27: 4 %
// faster end to end at batch 1 than a warp a block staging its own).  Lane l walks rank 32 slice + l's entries of
// split s (groups s G / S .. (s + 1) G / S - 1 of the slice): per entry its column steps on (LOP3 + LEA.HI on a byte
// offset), X's element there is read from the split's window, staged once per block in shared memory as fp32, and
// the value (HADD2.F32 / a shift for bf16) is added in by one FFMA into one of two register sums.  Groups are copied
// DR_RING ahead into shared memory by cp.async (16 + 4 bytes a lane each; each lane reads back only its own).  Each
// warp stores its 32 sums to ws[s][rank]; the last warp of a slice to arrive (an acquire-release ticket, as
// n1_finish) sums the S partials in split order and writes Y[perm[rank]].  The modes (the N = 1 epilogues of the
// Tiled-CSL n1r kernel, with its rounding steps):
// - plain: + bias; DR_RESID: the rounded sum (+ bias) added into Y, rounded (add_group);
// - DR_RMS: X's columns scaled by colscale (the RMSNorm weight) while staged, rounded to the dtype once (as n1s); each
//   block also sums the squares of X's raw values over its share of K (columns s K / S .. (s + 1) K / S - 1, every
//   slice the same), and the last block multiplies its sums by rsqrt(sum / K + eps);
// - DR_SILU (a paired weight: formats/delta_rows.py paired_halves, slices 0 .. hs - 1 the gate rows, hs .. the up
//   rows of the same ranks): one ticket per gate slice and its up slice (2 S arrivals); the last block writes
//   silu(g) u of the rounded sums (store_silu_group) to Y[perm[rank]] (M / 2 outputs).
// A window of DR_WMAX .. DR_WMAX16 columns (wide K: the encoder then needs fewer splits, so fewer waves) is staged as
// 16-bit (the dtype's bits: the same sums, one more instruction an entry); a wider one (rows of one slice far apart in
// K) or X without 16-byte rows is read from global memory instead: slower, same sums.  Per entry: LOP3, LEA.HI, LDS, HADD2.F32, FFMA (Tiled-CSL's _n1 walk: about 13).
// Session 26 prototype (benchmarks/results/2026-12-01-s26/proto_delta/, benchmarks/RESULTS.md): 1.21-1.56x faster than
// _n1r on Llama-3-8B's layers at 70-80 %.
constexpr int DR_WMAX = 1536;     // the widest window staged as fp32 (6 KiB)
constexpr int DR_WMAX16 = 3072;   // the widest staged at all, as 16-bit in the same 6 KiB; delta_rows.WINDOW_MAX
constexpr int DR_WARPS = 4;     // slices per block (the same split), sharing one staged X window; kernels.DR_WARPS
constexpr int DR_RING = 8;  // groups a warp copies ahead into shared memory (cp.async), 640 bytes each
constexpr int DR_RESID = 1, DR_RMS = 2, DR_SILU = 4, DR_LN = 8, DR_RELU = 16;  // kernels.__init__: _DR_RESID, ...

// A DeltaRows weight's offsets (formats/delta_rows.py): goff[slices + 1] (each slice's first group),
// win[slices][S][2] (a0, w), starts[slices][S][32] (16-bit), perm[32 slices].  Split s of a slice holds its groups
// s G / S .. (s + 1) G / S - 1.
DEVI void dr_split(const int* offsets, int slice, int s, int S, int& goff, int& g0, int& g1) {
  goff = offsets[slice];
  const int G = offsets[slice + 1] - goff;
  g0 = (int)((u32)(s * G) / (u32)S);
  g1 = (int)((u32)((s + 1) * G) / (u32)S);
}
DEVI const int* dr_win(const int* offsets, int slices, int S, int slice, int s) {
  return offsets + slices + 1 + 2 * (slice * S + s);
}
DEVI int dr_start(const int* offsets, int slices, int S, int slice, int s, int lane) {  // the lane's column before
  return reinterpret_cast<const u16*>(offsets + slices + 1 + 2 * slices * S)[(slice * S + s) * 32 + lane];
}
DEVI const int* dr_perm(const int* offsets, int slices, int S) { return offsets + slices + 1 + 18 * slices * S; }

// the block's X window (a0, w): the union of its DR_WARPS warps' (each warp's posted in lo / hi, then a barrier);
// a0 and w are multiples of 8, as every window's ends
DEVI int2 dr_union(const int* lo, const int* hi) {
  int a0 = lo[0], h = hi[0];
#pragma unroll
  for (int i = 1; i < DR_WARPS; ++i) {
    a0 = min(a0, lo[i]);
    h = max(h, hi[i]);
  }
  return make_int2(a0, h - a0);
}

template <bool BF16>
DEVI void dr_unpack(u32 w, float& lo, float& hi) {
  if (BF16) {
    lo = __uint_as_float(w << 16);
    hi = __uint_as_float(w & 0xffff0000u);
  } else {
    asm("{ .reg .f16 l, h; mov.b32 {l, h}, %2; cvt.f32.f16 %0, l; cvt.f32.f16 %1, h; }"
        : "=f"(lo), "=f"(hi) : "r"(w));
  }
}

DEVI float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
  return v;
}
DEVI float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
  return v;
}

template <bool BF16>
DEVI void unpack8(const uint4& v, float (&f)[8]) {  // eight halves, low half of each word first
  const u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if (BF16) {
      f[2 * i] = __uint_as_float(w[i] << 16);
      f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    } else {
      asm("{ .reg .f16 l, h; mov.b32 {l, h}, %2; cvt.f32.f16 %0, l; cvt.f32.f16 %1, h; }"
          : "=f"(f[2 * i]), "=f"(f[2 * i + 1]) : "r"(w[i]));
    }
  }
}

template <bool BF16>
DEVI uint4 pack8(const float (&f)[8]) {  // eight values rounded to the dtype, low half of each word first
  u32 o[4];
#pragma unroll
  for (int h = 0; h < 4; ++h) o[h] = (u32)from_float<BF16>(f[2 * h]) | ((u32)from_float<BF16>(f[2 * h + 1]) << 16);
  return make_uint4(o[0], o[1], o[2], o[3]);
}

// eight products a b of the dtype, each rounded once to the dtype (packed: one instruction for two).  The product of
// two fp16 / bf16 values is exact in fp32, so these are the bits of from_float(to_float(a) * to_float(b)) wherever
// that product is a normal fp32 number (bf16 products below 2^-126 may differ in their last bit).  bf16 as an fma
// with -0 (a b + -0 == a b, signed zeros included): mul.bf16x2 needs sm_90, fma.rn.bf16x2 sm_80.
template <bool BF16>
DEVI uint4 mul8_rn(const uint4& a, const uint4& b) {
  const u32 x[4] = {a.x, a.y, a.z, a.w}, y[4] = {b.x, b.y, b.z, b.w};
  u32 o[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if (BF16)
      asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(o[i]) : "r"(x[i]), "r"(y[i]), "r"(0x80008000u));
    else
      asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(o[i]) : "r"(x[i]), "r"(y[i]));
  }
  return make_uint4(o[0], o[1], o[2], o[3]);
}

// columns c .. c + 7 of an X window staged in shared memory as fp32 (32 bytes) or as the dtype's bits (16 bytes)
template <bool BF16>
DEVI void dr_xs_load8(const float* xs, int c, bool fp32, float (&f)[8]) {
  if (fp32) {
    const float4 p0 = reinterpret_cast<const float4*>(xs + c)[0], p1 = reinterpret_cast<const float4*>(xs + c)[1];
    f[0] = p0.x, f[1] = p0.y, f[2] = p0.z, f[3] = p0.w, f[4] = p1.x, f[5] = p1.y, f[6] = p1.z, f[7] = p1.w;
  } else {
    unpack8<BF16>(*reinterpret_cast<const uint4*>(reinterpret_cast<const u16*>(xs) + c), f);
  }
}
template <bool BF16>
DEVI void dr_xs_store8(float* xs, int c, bool fp32, const float (&f)[8]) {
  if (fp32) {
    reinterpret_cast<float4*>(xs + c)[0] = make_float4(f[0], f[1], f[2], f[3]);
    reinterpret_cast<float4*>(xs + c)[1] = make_float4(f[4], f[5], f[6], f[7]);
  } else {
    *reinterpret_cast<uint4*>(reinterpret_cast<u16*>(xs) + c) = pack8<BF16>(f);
  }
}

// LayerNorm's mean and 1 / sqrt(var + eps) over K from W warps' sums of d = x - c0 and of d^2 (shifted sums: less
// cancellation in var = E[d^2] - E[d]^2), added in warp order so every thread gets the same bits
template <int W>
DEVI void dr_ln_stats(const float* s1, const float* s2, float c0, int K, float eps, float& mu, float& rstd) {
  float t1 = s1[0], t2 = s2[0];
#pragma unroll
  for (int i = 1; i < W; ++i) {
    t1 += s1[i];
    t2 += s2[i];
  }
  const float md = t1 * __fdividef(1.f, (float)K);
  mu = c0 + md;
  // var NaN: the sums overflowed fp32 (inf - inf; bf16 deviations beyond about 1.8e19): the variance is infinite and
  // 1 / std 0, as PyTorch's fp32 LayerNorm (the reference) has it; fmaxf(NaN, 0) would have taken 0 and scaled the
  // huge deviations by rsqrt(eps) (fuzz_spmm, session 78: 1.35e32 where the reference gives the bias)
  const float var = t2 * __fdividef(1.f, (float)K) - md * md;
  rstd = rsqrtf((isnan(var) ? __int_as_float(0x7f800000) : fmaxf(var, 0.f)) + eps);
}

// two sums over the warp's lanes (every lane the same), posted by lane 0 at s1[warp], s2[warp]
DEVI void dr_post_sums(float a, float b, float* s1, float* s2) {
  a = warp_sum(a);
  b = warp_sum(b);
  if ((threadIdx.x & 31) == 0) {
    s1[threadIdx.x >> 5] = a;
    s2[threadIdx.x >> 5] = b;
  }
}

// LayerNorm of staged columns c .. c + 7 in place, as the separate LayerNorm rounds it: (x - mu) rstd g + b, rounded
// to the dtype once; g and b: the norm's weight and bias at those columns (b zeros without a bias)
template <bool BF16>
DEVI void dr_ln8(float* xs, int c, bool fp32, const uint4& g, const uint4& b, float mu, float rstd) {
  float f[8], e[8], b8[8];
  dr_xs_load8<BF16>(xs, c, fp32, f);
  unpack8<BF16>(g, e);
  unpack8<BF16>(b, b8);
#pragma unroll
  for (int t = 0; t < 8; ++t) f[t] = to_float<BF16>(from_float<BF16>(fmaf((f[t] - mu) * rstd, e[t], b8[t])));
  dr_xs_store8<BF16>(xs, c, fp32, f);
}

// what the kernel multiplies X's columns by (the norm before the projection, from the window's first column a0)
struct DrNorm {
  const u16* gs;    // the norm's weight (RMSNorm, LayerNorm), or null: X as it is
  const u16* gb;    // LayerNorm's bias, or null
  float mu, rstd;   // LayerNorm: X's mean and 1 / sqrt(var + eps)
  bool ln;
};

// X's column i (of the window) as the kernel multiplies it: with a norm, rounded to the dtype once (RMSNorm: x g;
// LayerNorm: (x - mu) rstd g + b)
template <bool BF16>
DEVI float dr_x(const u16* xg, const DrNorm& nm, u32 i) {
  const float v = to_float<BF16>(__ldg(xg + i));
  if (!nm.gs) return v;
  const float g = to_float<BF16>(__ldg(nm.gs + i));
  if (nm.ln) {
    const float b = nm.gb ? to_float<BF16>(__ldg(nm.gb + i)) : 0.f;
    return to_float<BF16>(from_float<BF16>(fmaf((v - nm.mu) * nm.rstd, g, b)));
  }
  return to_float<BF16>(from_float<BF16>(v * g));
}

// 8 entries: values v (two a word), steps d (4 bits each); `off` is (the lane's column - a0) << LG.  STAGE: 0 X
// read from global memory (LG = 2), 1 staged as fp32 (LG = 2), 2 staged as 16-bit (LG = 1: one more instruction an
// entry, the conversion)
template <bool BF16, int STAGE>
DEVI void dr_group(u32& off, float& a0, float& a1, const uint4& v, u32 d, const float* xs, const u16* xg,
                   const DrNorm& nm) {
  constexpr int LG = STAGE == 2 ? 1 : 2;
  const u32 w[4] = {v.x, v.y, v.z, v.w};
  auto xat = [&](u32 o) {
    if (STAGE == 1) return *reinterpret_cast<const float*>(reinterpret_cast<const char*>(xs) + o);
    if (STAGE == 2) return to_float<BF16>(*reinterpret_cast<const u16*>(reinterpret_cast<const char*>(xs) + o));
    return dr_x<BF16>(xg, nm, o >> 2);
  };
#pragma unroll
  for (int h = 0; h < 4; ++h) {
    float f0, f1;
    dr_unpack<BF16>(w[h], f0, f1);
    const int k0 = 2 * h, k1 = 2 * h + 1;
    const u32 m0 = d & (0xFu << (4 * k0));
    off += k0 == 0 ? m0 << LG : m0 >> (4 * k0 - LG);
    a0 = fmaf(f0, xat(off), a0);
    const u32 m1 = d & (0xFu << (4 * k1));
    off += m1 >> (4 * k1 - LG);
    a1 = fmaf(f1, xat(off), a1);
  }
}

// lane l's part of group g (its 16 bytes of values, its 4-byte steps word) copied into ring slot `slot` at rs (the
// warp's ring, shared-memory address): the same offsets as in the group.  The "memory" clobbers keep the compiler
// from moving the slot's earlier reads past the copy that refills it.
DEVI void dr_copy(u32 rs, int slot, const unsigned char* base, int g) {
  const int lane = threadIdx.x & 31;
  const unsigned char* p = base + (long long)g * 640;  // (base: the slice's first group + 16 lane)
  const u32 d = rs + slot * 640;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d + 16 * lane), "l"(p) : "memory");
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(d + 512 + 4 * lane), "l"(p + 512 - 12 * lane)
               : "memory");
}

// Coded values (bf16 only; formats/delta_rows.py, code_values): a lane's group is 16 bytes, [the low bytes of entries
// 0-3][of 4-7][codes and signs][steps], one 16-byte copy (512 bytes a group).  A value's low byte is stored as it is
// ([e0 m6..m0]); its high byte [s e7..e1] is its sign and byte `code` of the row's table `lut` (byte 0 zero: code 0
// is the value 0; bytes 1-7 the row's e7..e1 values base .. base + 6).  The codes word holds entry i's 3-bit code in
// bits 4 i .. 4 i + 2 and its sign in bit 8 i + 7 (entries 0-3) or 8 (i - 4) + 3 (entries 4-7), so one PRMT looks up
// four high bytes, one LOP3 puts their signs in, and two PRMTs pair low and high bytes as the plain group's words:
// 11 instructions for 8 entries.
DEVI uint4 dr_decode_coded(uint4 q, uint2 lut) {
  const u32 sel = q.z & 0x77777777u;  // the codes, signs cleared (PRMT reads bit 3 of a selector as sign-extend)
  const u32 h03 = __byte_perm(lut.x, lut.y, sel) | (q.z & 0x80808080u);
  const u32 h47 = __byte_perm(lut.x, lut.y, sel >> 16) | ((q.z << 4) & 0x80808080u);
  uint4 v;
  v.x = __byte_perm(q.x, h03, 0x5140);
  v.y = __byte_perm(q.x, h03, 0x7362);
  v.z = __byte_perm(q.y, h47, 0x5140);
  v.w = __byte_perm(q.y, h47, 0x7362);
  return v;
}
DEVI void dr_copy_coded(u32 rs, int slot, const unsigned char* base, int g) {
  const int lane = threadIdx.x & 31;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(rs + slot * 640 + 16 * lane),
               "l"(base + (long long)g * 512) : "memory");
}
// the row's exponent table: after the groups (offsets[slices] of them, 128 words each), two words a row rank (lane
// rank / P: a row's P lanes are adjacent)
DEVI uint2 dr_lut(const int* data, const int* offsets, int slices, int row_rank) {
  return __ldg(reinterpret_cast<const uint2*>(data + (long long)offsets[slices] * 128) + row_rank);
}

// lane's first byte of the groups of a slice that starts at group goff (plain groups 640 bytes, coded 512)
template <bool CODED>
DEVI const unsigned char* dr_lane_base(const int* data, int goff, int lane) {
  return reinterpret_cast<const unsigned char*>(data) + (long long)goff * (CODED ? 512 : 640) + 16 * lane;
}
// lane's part of group g into ring slot `slot`: dr_copy_coded or dr_copy
template <bool CODED>
DEVI void dr_fetch(u32 rs, int slot, const unsigned char* base, int g) {
  if (CODED)
    dr_copy_coded(rs, slot, base, g);
  else
    dr_copy(rs, slot, base, g);
}
// the first RING groups g0 .. of a split into slots 0 .., one commit a slot (empty ones too, so that the count stays
// one a group); a warp that is not `live` copies nothing
template <bool CODED, int RING>
DEVI void dr_prime(u32 rs, const unsigned char* base, int g0, int g1, bool live = true) {
#pragma unroll
  for (int i = 0; i < RING; ++i) {
    if (live && g0 + i < g1) dr_fetch<CODED>(rs, i, base, g0 + i);
    cp_async_commit();
  }
}
// lane's group in ring slot `slot` (`rg`: the warp's ring): its four value words (coded values decoded with the
// row's table `*lut`, read after the group; unused for plain values) and its steps word
template <bool CODED>
DEVI uint4 dr_read(const unsigned char* rg, int slot, int lane, const uint2* lut, u32& d) {
  uint4 v = *reinterpret_cast<const uint4*>(rg + slot * 640 + 16 * lane);
  if (CODED) {
    d = v.w;
    return dr_decode_coded(v, *lut);
  }
  d = *reinterpret_cast<const u32*>(rg + slot * 640 + 512 + 4 * lane);
  return v;
}

template <bool BF16, int STAGE, bool CODED = false>
DEVI float dr_walk(const unsigned char* base, int g0, int g1, u32 off, const float* xs, const u16* xg,
                   const DrNorm& nm, const unsigned char* ring, u32 rs, const uint2* lut = nullptr) {
  float a0 = 0.f, a1 = 0.f;
  const int lane = threadIdx.x & 31;
  for (int g = g0; g < g1; ++g) {
    const int slot = (g - g0) & (DR_RING - 1);
    cp_async_wait<DR_RING - 1>();  // this lane's copy of group g is in (one commit a group, DR_RING ahead)
    u32 d;  // (coded: the table from shared memory each group, a register less for the walk)
    uint4 v = dr_read<CODED>(ring, slot, lane, lut, d);
    if (g + DR_RING < g1) dr_fetch<CODED>(rs, slot, base, g + DR_RING);
    cp_async_commit();  // (empty past the end, so the count stays one a group)
    dr_group<BF16, STAGE>(off, a0, a1, v, d, xs, xg, nm);
  }
  return a0 + a1;
}

// the last block's sums over the S splits: v of pw[t mp], u of pu[t mp] (SILU), q of pq[t] (RMS), each in split
// order, T splits' loads in flight at once (one round trip each T splits instead of one a split)
template <int T, bool SILU, bool RMS>
DEVI void dr_tail(const float* pw, const float* pu, const float* pq, int mp, int S, float& v, float& u, float& q) {
  for (int t0 = 0; t0 < S; t0 += T) {
    float a[T], b[T], c[T];
#pragma unroll
    for (int i = 0; i < T; ++i) {
      const bool in = t0 + i < S;
      a[i] = in ? __ldcg(pw + (long long)(t0 + i) * mp) : 0.f;
      if (SILU) b[i] = in ? __ldcg(pu + (long long)(t0 + i) * mp) : 0.f;
      if (RMS) c[i] = in ? __ldcg(pq + t0 + i) : 0.f;
    }
#pragma unroll
    for (int i = 0; i < T; ++i)
      if (t0 + i < S) {
        v += a[i];
        if (SILU) u += b[i];
        if (RMS) q += c[i];
      }
  }
}

template <bool BF16, bool CODED = false>
DEVI void delta_rows_n1_body(const int* __restrict__ data, const int* __restrict__ offsets, const u16* __restrict__ x,
                             u16* __restrict__ y, const u16* __restrict__ bias, float* __restrict__ ws,
                             int* __restrict__ tickets, int S, int vec, int mode, const u16* __restrict__ colscale,
                             float eps, float rscale, int K, int slices, const u16* __restrict__ colbias) {
  __shared__ __align__(16) float xs[DR_WMAX];
  __shared__ __align__(16) unsigned char ring[DR_WARPS][DR_RING * 640];
  __shared__ int win_lo[DR_WARPS], win_hi[DR_WARPS];
  __shared__ float qpart[DR_WARPS], qpart2[DR_WARPS];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, s = blockIdx.y;
  const int slice = min(blockIdx.x * DR_WARPS + warp, slices - 1);  // (a warp past the last slice repeats it, unstored)
  const bool live = blockIdx.x * DR_WARPS + warp < slices;
  const bool rms = mode & DR_RMS, ln = mode & DR_LN;
  int goff, g0, g1;
  dr_split(offsets, slice, s, S, goff, g0, g1);
  const unsigned char* base = dr_lane_base<CODED>(data, goff, lane);
  const u32 rs = smem_addr(ring[warp]);
  // the first DR_RING groups (a warp past the last slice copies nothing)
  dr_prime<CODED, DR_RING>(rs, base, g0, g1, live);
  __shared__ uint2 lut_s[CODED ? 32 * DR_WARPS : 1];  // the lanes' exponent tables
  if (CODED) lut_s[threadIdx.x] = dr_lut(data, offsets, slices, slice * 32 + lane);
  const uint2* lut = lut_s + (CODED ? threadIdx.x : 0);
  pdl_launch_dependents();  // the next kernel's blocks may become resident (programmatic launch; else a no-op)
  const int* win = dr_win(offsets, slices, S, slice, s);
  if (lane == 0) {  // the block's window: the union of its warps' (DR_WARPS slices, the same split)
    win_lo[warp] = win[0];
    win_hi[warp] = win[0] + win[1];
  }
  const int start = dr_start(offsets, slices, S, slice, s, lane);
  const int* perm = dr_perm(offsets, slices, S);
  const bool silu = mode & DR_SILU;
  const int hs = slices >> 1, group = silu ? slice % hs : slice;
  const int grank = group * 32 + lane;
  const int row = perm[grank];  // (static: asked for with the header, so the ticket's fence does not wait for it)
  __syncthreads();
  const int2 bw = dr_union(win_lo, win_hi);
  const int a0 = bw.x, w = bw.y;
  DrNorm nm{rms || ln ? colscale + a0 : nullptr, ln && colbias ? colbias + a0 : nullptr, 0.f, 1.f, ln};
  const u16* gs = nm.gs;
  // the same for every warp of the block: 1 fp32, 2 16-bit (windows over DR_WMAX columns), 0 X from global memory
  const int stage = !vec || w > DR_WMAX16 ? 0 : w > DR_WMAX ? 2 : 1;
  const bool staged = stage != 0;
  // DR_RMS, fp32 staging: the norm's weight over the window (static), asked for before the wait (two rounds at most)
  uint4 gv[2];
  if (rms && stage == 1) {
#pragma unroll
    for (int i = 0; i < 2; ++i)
      if (8 * (int)threadIdx.x + 256 * DR_WARPS * i < w)
        gv[i] = __ldg(reinterpret_cast<const uint4*>(gs + 8 * threadIdx.x + 256 * DR_WARPS * i));
  }
  if (ln && staged) {  // DR_LN: the norm's weight and bias over the window (static) into L2 before the wait
    for (int c = 8 * threadIdx.x; c < w; c += 256 * DR_WARPS) {
      asm volatile("prefetch.global.L2 [%0];" ::"l"(gs + c));
      if (nm.gb) asm volatile("prefetch.global.L2 [%0];" ::"l"(nm.gb + c));
    }
  }
  pdl_wait();  // X and every global write come after the previous kernel (programmatic launch; else a no-op)
  const int mp = slices * 32;
  float* ssq_ws = ws + (long long)S * mp;  // DR_RMS: [slice][s]
  // DR_RMS: split s's share of sum(x^2) over K, by the block's threads together (the same for every slice), their
  // first 2 x 16 bytes loaded with the window's X (one round trip for both), the rest (K / S above 2048 columns) after
  float q = 0.f;
  uint4 qv[2];
  const int u0 = (int)((long long)s * (K >> 3) / S), u1 = (int)((long long)(s + 1) * (K >> 3) / S);
  constexpr int NT = 32 * DR_WARPS;
  if (rms && vec) {
#pragma unroll
    for (int i = 0; i < 2; ++i)
      if (u0 + (int)threadIdx.x + NT * i < u1)
        qv[i] = __ldg(reinterpret_cast<const uint4*>(x) + u0 + threadIdx.x + NT * i);
  }
  // DR_LN: X's sum and sum of squares over all K (each block: its walk needs the mean and the deviation), about x[0]
  // (shifted sums: less cancellation in var = E[d^2] - E[d]^2), 4 loads a thread in flight
  float lsum = 0.f, lsq = 0.f, c0 = 0.f;
  if (ln) {
    c0 = to_float<BF16>(__ldg(x));
    auto acc8 = [&](const uint4& r) {
      const u32 rw[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
      for (int h = 0; h < 4; ++h) {
        float f0, f1;
        dr_unpack<BF16>(rw[h], f0, f1);
        f0 -= c0;
        f1 -= c0;
        lsum += f0 + f1;
        lsq = fmaf(f0, f0, fmaf(f1, f1, lsq));
      }
    };
    if (vec) {
      const int units = K >> 3;
      for (int u = threadIdx.x; u < units; u += 4 * NT) {
        uint4 r[4];
#pragma unroll
        for (int i = 0; i < 4; ++i)
          if (u + NT * i < units) r[i] = __ldg(reinterpret_cast<const uint4*>(x) + u + NT * i);
#pragma unroll
        for (int i = 0; i < 4; ++i)
          if (u + NT * i < units) acc8(r[i]);
      }
    } else {
      for (int c = threadIdx.x; c < K; c += NT) {
        const float f = to_float<BF16>(x[c]) - c0;
        lsum += f;
        lsq = fmaf(f, f, lsq);
      }
    }
    dr_post_sums(lsum, lsq, qpart, qpart2);
  }
  float acc;
  static_assert(DR_WMAX <= 2 * 256 * DR_WARPS, "the fp32 staging's rounds: gv holds two");
  if (stage == 2) {  // X[a0 + c .. + 7] (x colscale, rounded to the dtype) -> xs16[c .. + 7], the dtype's bits
    u16* xs16 = reinterpret_cast<u16*>(xs);
    for (int c = 8 * threadIdx.x; c < w; c += 256 * DR_WARPS) {
      uint4 r = __ldg(reinterpret_cast<const uint4*>(x + a0 + c));
      if (rms) r = mul8_rn<BF16>(r, __ldg(reinterpret_cast<const uint4*>(gs + c)));
      *reinterpret_cast<uint4*>(xs16 + c) = r;
    }
  } else if (stage == 1) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {  // X[a0 + c .. + 7] (x colscale) -> xs[c .. + 7]
      const int c = 8 * threadIdx.x + 256 * DR_WARPS * i;
      if (c >= w) break;
      float f[8];
      const uint4 r = __ldg(reinterpret_cast<const uint4*>(x + a0 + c));
      unpack8<BF16>(rms ? mul8_rn<BF16>(r, gv[i]) : r, f);
      dr_xs_store8<BF16>(xs, c, true, f);
    }
  }
  if (ln) {  // (block-uniform) the statistics, then each thread normalizes the columns it staged, in place
    __syncthreads();
    dr_ln_stats<DR_WARPS>(qpart, qpart2, c0, K, eps, nm.mu, nm.rstd);
    for (int c = 8 * threadIdx.x; staged && c < w; c += 256 * DR_WARPS)
      dr_ln8<BF16>(xs, c, stage == 1, __ldg(reinterpret_cast<const uint4*>(gs + c)),
                   nm.gb ? __ldg(reinterpret_cast<const uint4*>(nm.gb + c)) : make_uint4(0, 0, 0, 0), nm.mu, nm.rstd);
  }
  if (rms) {
    auto sq = [&](const uint4& r) {
      const u32 rw[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
      for (int h = 0; h < 4; ++h) {
        float f0, f1;
        dr_unpack<BF16>(rw[h], f0, f1);
        q = fmaf(f0, f0, fmaf(f1, f1, q));
      }
    };
    if (vec) {
#pragma unroll
      for (int i = 0; i < 2; ++i)
        if (u0 + (int)threadIdx.x + NT * i < u1) sq(qv[i]);
      for (int u = u0 + threadIdx.x + 2 * NT; u < u1; u += NT) sq(__ldg(reinterpret_cast<const uint4*>(x) + u));
    } else {
      const int c0 = (int)((long long)s * K / S), c1 = (int)((long long)(s + 1) * K / S);
      for (int c = c0 + threadIdx.x; c < c1; c += NT) {
        const float f = to_float<BF16>(x[c]);
        q = fmaf(f, f, q);
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) q += __shfl_xor_sync(0xffffffffu, q, o);
    if (lane == 0) qpart[warp] = q;
  }
  // (the same for every warp) the last barrier: from here each warp runs alone
  if (staged || rms || ln) __syncthreads();
  if (!live) return;
  if (rms) {  // every warp the same sum, in the same order
    q = qpart[0];
#pragma unroll
    for (int i = 1; i < DR_WARPS; ++i) q += qpart[i];
    if (lane == 0) ssq_ws[slice * S + s] = q;
  }
  const u32 rel = (u32)(start - a0);  // the lane's first column in the window
  if (stage == 1) {
    acc = dr_walk<BF16, 1, CODED>(base, g0, g1, rel << 2, xs, x + a0, nm, ring[warp], rs, lut);
  } else if (stage == 2) {
    acc = dr_walk<BF16, 2, CODED>(base, g0, g1, rel << 1, xs, x + a0, nm, ring[warp], rs, lut);
  } else {
    acc = dr_walk<BF16, 0, CODED>(base, g0, g1, rel << 2, xs, x + a0, nm, ring[warp], rs, lut);
  }
  ws[(long long)s * mp + slice * 32 + lane] = acc;
  // the epilogue's inputs, asked for by every warp before its ticket so the last one does not wait for them after it:
  // the row, its bias and Y's old value there (DR_RESID; only this slice's last warp writes it, and only after this)
  const bool keep = row >= 0 && !silu;
  const float bv = bias && keep ? to_float<BF16>(bias[row]) : 0.f;
  const float yv = (mode & DR_RESID) && keep ? to_float<BF16>(y[row]) : 0.f;
  __syncwarp();  // orders every lane's stores before lane 0's release
  int prev = 0;
  if (lane == 0) prev = ticket_acq_rel(tickets + group);
  prev = __shfl_sync(0xffffffffu, prev, 0);
  if (prev != (silu ? 2 : 1) * S - 1) return;
  __syncwarp();  // lane 0's acquire before every lane's loads
  // the S partials (and the up half's, and the sums of squares), loaded T splits a round trip, summed in split order
  float v = 0.f, u = 0.f, qs = 0.f;
  const float* pw = ws + grank;
  const float* pq = ssq_ws + group * S;
  if (!silu && !rms) {
    dr_tail<16, false, false>(pw, pw, pq, mp, S, v, u, qs);
  } else if (!silu) {
    dr_tail<12, false, true>(pw, pw, pq, mp, S, v, u, qs);
  } else if (!rms) {
    dr_tail<8, true, false>(pw, pw + hs * 32, pq, mp, S, v, u, qs);
  } else {
    dr_tail<8, true, true>(pw, pw + hs * 32, pq, mp, S, v, u, qs);
  }
  if (lane == 0) tickets[group] = 0;  // every block of the group has taken its ticket
  if (rms) {  // every lane the same factor: the same sums in the same order
    const float f = rscale * rsqrtf(qs * __fdividef(1.f, (float)K) + eps);
    v *= f;
    u *= f;
  }
  if (row < 0) return;
  if (silu) {
    y[row] = silu_mul_rounded<BF16>(v, u);
  } else {
    const float r = (mode & DR_RELU) ? fmaxf(v + bv, 0.f) : v + bv;
    y[row] = (mode & DR_RESID) ? from_float<BF16>(yv + to_float<BF16>(from_float<BF16>(r))) : from_float<BF16>(r);
  }
}

#define DR_ARGS                                                                                                \
  const int *__restrict__ data, const int *__restrict__ offsets, const u16 *__restrict__ x, u16 *__restrict__ y, \
      const u16 *__restrict__ bias, float *__restrict__ ws, int *__restrict__ tickets, int S, int vec, int mode,  \
      const u16 *__restrict__ colscale, float eps, float rscale, int K, int slices, const u16 *__restrict__ colbias
#define INSTANTIATE_DR(NAME, BF16)                                                                           \
  extern "C" __global__ void __launch_bounds__(32 * DR_WARPS, 32 / DR_WARPS) delta_rows_spmm_##NAME##_n1(DR_ARGS) { \
    delta_rows_n1_body<BF16>(data, offsets, x, y, bias, ws, tickets, S, vec, mode, colscale, eps, rscale, K,  \
                             slices, colbias);                                                           \
  }
// the coded-values variant (bf16 only): delta_rows_spmm_bf16_n1c
extern "C" __global__ void __launch_bounds__(32 * DR_WARPS, 32 / DR_WARPS) delta_rows_spmm_bf16_n1c(DR_ARGS) {
  delta_rows_n1_body<true, true>(data, offsets, x, y, bias, ws, tickets, S, vec, mode, colscale, eps, rscale, K,
                                 slices, colbias);
}
INSTANTIATE_DR(f16, false)
INSTANTIATE_DR(bf16, true)

// delta_rows_parts_<dtype>_p<P>_s<STAGE>: N = 1 on a DeltaRows weight of the parts layout (formats/delta_rows.py,
// version 2: P lanes a row, one split), grid ceil(slices / DR_WARPS), DR_WARPS warps a block, warp i on slice
// DR_WARPS blockIdx.x + i.  Lane l walks part l % P of row perm[32 slice + l] from its start column, as the _n1
// kernel's walk; the P parts of a row (adjacent lanes) meet by an xor butterfly (every lane the same sum), and the
// lane of part 0 applies the epilogue and writes the row.  No launch waits on another block: no split-K partials, no
// ticket, no last-warp sum (2-3.5 us a launch inside the decode step's graph, session 29's trace).  The price: every
// block stages all of X (K columns, dynamic shared memory: fp32 for STAGE 1, 16-bit for STAGE 2; the launcher picks
// fp32 where the grid still fits one wave), and parts pad to whole groups (4-7 % more bytes at P = 8-16).  The modes
// as the _n1 kernel's, with its rounding steps: DR_RMS (X times the norm's weight rounded once while staged, the
// sum of squares of the raw values over all of K by the block), DR_LN (X staged raw with its sums shifted by x[0],
// then normalized in place after a barrier, as the separate LayerNorm), DR_SILU (a paired weight: lanes 16-31 hold the
// up rows of lanes 0-15's gate rows), DR_RESID, DR_RELU, the bias.  Needs K % 8 == 0 and X on 16 bytes (the
// launcher copies X otherwise).  Session 30 prototype (benchmarks/RESULTS.md): 1.13x the _n1 kernel's speed on
// Llama-3-8B's four projections at 80 % in CUDA graphs of 8 layers (H200).
template <bool BF16, int P, int STAGE, bool CODED = false>
DEVI void delta_rows_parts_body(const int* __restrict__ data, const int* __restrict__ offsets,
                                const u16* __restrict__ x, u16* __restrict__ y, const u16* __restrict__ bias, int mode,
                                const u16* __restrict__ colscale, float eps, float rscale, int K, int slices,
                                const u16* __restrict__ colbias) {
  static_assert(P >= 2 && P <= 16 && (P & (P - 1)) == 0, "P: 2, 4, 8 or 16 lanes a row");
  static_assert(STAGE == 1 || STAGE == 2, "X staged as fp32 (1) or 16-bit (2)");
  extern __shared__ __align__(16) unsigned char drp_x[];  // X, all K columns
  __shared__ __align__(16) unsigned char ring[DR_WARPS][DR_RING * 640];
  __shared__ float qpart[DR_WARPS], qpart2[DR_WARPS];
  constexpr int NT = 32 * DR_WARPS;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int slice = min(blockIdx.x * DR_WARPS + warp, slices - 1);  // (a warp past the last slice repeats it, idle)
  const bool live = blockIdx.x * DR_WARPS + warp < slices;
  int goff, g0, g1;
  dr_split(offsets, slice, 0, 1, goff, g0, g1);
  const unsigned char* base = dr_lane_base<CODED>(data, goff, lane);
  const u32 rs = smem_addr(ring[warp]);
  // the first DR_RING groups, before the wait (the weight is static); written out, not dr_prime: through the helper
  // NVRTC schedules this kernel's prologue differently (session 61's SASS), and the batch-1 kernel is timed as it is
#pragma unroll
  for (int i = 0; i < DR_RING; ++i) {
    if (live && g0 + i < g1) dr_fetch<CODED>(rs, i, base, g0 + i);
    cp_async_commit();
  }
  __shared__ uint2 lut_s[CODED ? 32 * DR_WARPS : 1];  // the lanes' exponent tables
  if (CODED) lut_s[threadIdx.x] = dr_lut(data, offsets, slices, (slice * 32 + lane) / P);
  const uint2* lut = lut_s + (CODED ? threadIdx.x : 0);
  pdl_launch_dependents();
  const bool rms = mode & DR_RMS, silu = mode & DR_SILU, resid = mode & DR_RESID, ln = mode & DR_LN;
  const int start = dr_start(offsets, slices, 1, slice, 0, lane);
  const int row = dr_perm(offsets, slices, 1)[slice * 32 + lane];
  const bool writer = lane % P == 0 && row >= 0 && (!silu || lane < 16);
  const float bv = bias && writer && !silu ? to_float<BF16>(bias[row]) : 0.f;
  if (rms || ln)  // the norm's weight (and LayerNorm's bias) into L2 before the wait (static): each 128-byte line
    // asked for once by the whole grid, not by every block (which would send blocks x K / 64 requests to the same
    // few L2 lines while the previous kernel, the attention say, still runs)
    for (int c = 64 * (threadIdx.x + NT * blockIdx.x); c < K; c += 64 * NT * gridDim.x) {
      asm volatile("prefetch.global.L2 [%0];" ::"l"(colscale + c));
      if (ln && colbias) asm volatile("prefetch.global.L2 [%0];" ::"l"(colbias + c));
    }
  // the norm's weight for the staging's first round, before the wait (static): after it only X crosses from L2
  const int units = K >> 3;
  uint4 g[4];
  if (rms)
#pragma unroll
    for (int i = 0; i < 4; ++i)
      if ((int)threadIdx.x + NT * i < units) g[i] = __ldg(reinterpret_cast<const uint4*>(colscale) + threadIdx.x + NT * i);
  pdl_wait();  // X, Y and every write after the previous kernel
  const float yv = resid && writer ? to_float<BF16>(y[row]) : 0.f;
  // all of X staged, 4 loads a thread in flight; RMSNorm's sum of squares of the raw values on the way, X times the
  // norm's weight rounded to the dtype once.  LayerNorm: X staged raw with its sums shifted by x[0] on the way
  float q = 0.f, q2 = 0.f;
  const float c0 = ln ? to_float<BF16>(__ldg(x)) : 0.f;
  for (int u0 = threadIdx.x; u0 < units; u0 += 4 * NT) {
    uint4 r[4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
      if (u0 + NT * i < units) {
        r[i] = __ldg(reinterpret_cast<const uint4*>(x) + u0 + NT * i);
        if (rms && u0 != (int)threadIdx.x) g[i] = __ldg(reinterpret_cast<const uint4*>(colscale) + u0 + NT * i);
      }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int u = u0 + NT * i;
      if (u >= units) break;
      float f[8];
      unpack8<BF16>(r[i], f);
      if (rms) {
#pragma unroll
        for (int t = 0; t < 8; ++t) q = fmaf(f[t], f[t], q);
        const uint4 v = mul8_rn<BF16>(r[i], g[i]);  // X times the norm's weight, packed
        if (STAGE == 2) {
          *reinterpret_cast<uint4*>(reinterpret_cast<u16*>(drp_x) + 8 * u) = v;
          continue;
        }
        unpack8<BF16>(v, f);
      } else if (ln) {
#pragma unroll
        for (int t = 0; t < 8; ++t) {
          const float dv = f[t] - c0;
          q += dv;
          q2 = fmaf(dv, dv, q2);
        }
      }
      dr_xs_store8<BF16>(reinterpret_cast<float*>(drp_x), 8 * u, STAGE == 1, f);
    }
  }
  if (rms || ln) dr_post_sums(q, q2, qpart, qpart2);
  __syncthreads();
  if (ln) {  // mean and 1 / std over K (every thread the same sums in the same order), then X normalized in place
    float mu, rstd;
    dr_ln_stats<DR_WARPS>(qpart, qpart2, c0, K, eps, mu, rstd);
    for (int u = threadIdx.x; u < units; u += NT)
      dr_ln8<BF16>(reinterpret_cast<float*>(drp_x), 8 * u, STAGE == 1, __ldg(reinterpret_cast<const uint4*>(colscale) + u),
                   colbias ? __ldg(reinterpret_cast<const uint4*>(colbias) + u) : make_uint4(0, 0, 0, 0), mu, rstd);
    __syncthreads();
  }
  // from here each warp runs alone
  if (!live) return;
  if (rms) {
    q = qpart[0];
#pragma unroll
    for (int i = 1; i < DR_WARPS; ++i) q += qpart[i];
  }
  const DrNorm nm{nullptr, nullptr, 0.f, 1.f, false};
  float acc = dr_walk<BF16, STAGE, CODED>(base, g0, g1, (u32)start << (STAGE == 2 ? 1 : 2),
                                          reinterpret_cast<const float*>(drp_x), x, nm, ring[warp], rs, lut);
#pragma unroll
  for (int o = 1; o < P; o <<= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);  // (a + b == b + a: one sum a row)
  if (rms) acc *= rscale * rsqrtf(q * __fdividef(1.f, (float)K) + eps);
  if (silu) {
    const float u = __shfl_down_sync(0xffffffffu, acc, 16);  // the up row of the gate row in lane - 16
    if (writer) {
      y[row] = silu_mul_rounded<BF16>(acc, u);
    }
  } else if (writer) {
    const float r = (mode & DR_RELU) ? fmaxf(acc + bv, 0.f) : acc + bv;
    y[row] = resid ? from_float<BF16>(yv + to_float<BF16>(from_float<BF16>(r))) : from_float<BF16>(r);
  }
}

#define DR_PARTS_ARGS                                                                                          \
  const int *__restrict__ data, const int *__restrict__ offsets, const u16 *__restrict__ x, u16 *__restrict__ y, \
      const u16 *__restrict__ bias, int mode, const u16 *__restrict__ colscale, float eps, float rscale, int K,   \
      int slices, const u16 *__restrict__ colbias
#define INSTANTIATE_DR_PARTS(NAME, BF16, P, STAGE)                                                             \
  extern "C" __global__ void __launch_bounds__(32 * DR_WARPS, 32 / DR_WARPS)                                  \
      delta_rows_parts_##NAME##_p##P##_s##STAGE(DR_PARTS_ARGS) {                                              \
    delta_rows_parts_body<BF16, P, STAGE>(data, offsets, x, y, bias, mode, colscale, eps, rscale, K, slices,       \
                                          colbias);                                                           \
  }
#define INSTANTIATE_DR_PARTS_P(NAME, BF16, P) \
  INSTANTIATE_DR_PARTS(NAME, BF16, P, 1)      \
  INSTANTIATE_DR_PARTS(NAME, BF16, P, 2)
// the coded-values variants (bf16 only, X staged 16-bit): delta_rows_parts_bf16_p<P>_s2c
#define INSTANTIATE_DR_PARTS_CODED(P)                                                                          \
  extern "C" __global__ void __launch_bounds__(32 * DR_WARPS, 32 / DR_WARPS)                                  \
      delta_rows_parts_bf16_p##P##_s2c(DR_PARTS_ARGS) {                                                       \
    delta_rows_parts_body<true, P, 2, true>(data, offsets, x, y, bias, mode, colscale, eps, rscale, K, slices,       \
                                            colbias);                                                           \
  }
INSTANTIATE_DR_PARTS_P(f16, false, 2)
INSTANTIATE_DR_PARTS_P(f16, false, 4)
INSTANTIATE_DR_PARTS_P(f16, false, 8)
INSTANTIATE_DR_PARTS_P(f16, false, 16)
INSTANTIATE_DR_PARTS_P(bf16, true, 2)
INSTANTIATE_DR_PARTS_P(bf16, true, 4)
INSTANTIATE_DR_PARTS_P(bf16, true, 8)
INSTANTIATE_DR_PARTS_P(bf16, true, 16)
INSTANTIATE_DR_PARTS_CODED(2)
INSTANTIATE_DR_PARTS_CODED(4)
INSTANTIATE_DR_PARTS_CODED(8)
INSTANTIATE_DR_PARTS_CODED(16)

// delta_rows_spmm_<dtype>_nt<NT>: 2 <= N <= NT tokens (NT = 2, 4, 8), the same blocks as _n1 (4 warps, 4 slices of
// one split, one X window) and the same walk, each entry's value multiplied into NT sums: X's window is staged as
// 16-bit, column-major by token (NT values a column, 4-16 bytes, read by one LDS), so a lane reads its column's
// tokens at once.  No split-K sum in the launch: each warp stores its NT x 32 partials at ws[s][t][row] (the weight's
// own row order), and delta_rows_reduce_<dtype> sums them in split order and applies the epilogue.  Windows wider than
// wmax read X from global memory (slower, the same sums).  Bound by the shared-memory reads at NT = 8 (16 bytes of X at
// a random column an entry), so it pays most at small N.
// - The window in dynamic shared memory, wmax columns (the launcher's kernels.split_nt_window: the weight's widest
//   block window, at most 48 KB: 3072 columns at NT = 8).  Until session 34 NT = 2, 4 had a static window of DR_WMAX =
//   1536 columns, narrower than the encoder's windows of up to 3072 (delta_rows.WINDOW_MAX since session 28), so on
//   OPT-30B (K = 7168, 28672) most blocks read X from global memory: batch 2 / 3 ran at 0.91x / 0.82x of dense, staged
//   2.05x / 1.53x (H200, session 34 call F; Llama-3-8B, windows within 1536: 2.912 -> 2.942 ms a batch-2 token).
// - NT = 2, 4: groups copied DR_RING_NT = 4 ahead.  NT = 8 (session 32): a ring of 2 groups: 56 registers instead of
//   94, and 5 KB less a block, so the grid the encoder sized for the N = 1 kernel fits one wave on Llama-3-8B's gate /
//   up (7 blocks an SM; 5 before).
constexpr int DR_RING_NT = 4;
constexpr int dr_ring_nt(int nt) { return nt == 8 ? 2 : DR_RING_NT; }

template <bool BF16, int NT>
DEVI void dr_xcol(const unsigned char* xsb, u32 off, float (&xv)[NT]) {  // the NT tokens of one staged column
  if (NT == 8) {
    const uint4 r = *reinterpret_cast<const uint4*>(xsb + off);
    dr_unpack<BF16>(r.x, xv[0], xv[1]);
    dr_unpack<BF16>(r.y, xv[2], xv[3]);
    dr_unpack<BF16>(r.z, xv[4], xv[5]);
    dr_unpack<BF16>(r.w, xv[6], xv[7]);
  } else if (NT == 4) {
    const uint2 r = *reinterpret_cast<const uint2*>(xsb + off);
    dr_unpack<BF16>(r.x, xv[0], xv[1]);
    dr_unpack<BF16>(r.y, xv[2], xv[3]);
  } else {
    dr_unpack<BF16>(*reinterpret_cast<const u32*>(xsb + off), xv[0], xv[1]);
  }
}

// The 2-token kernels' X window (columns a0 .. a0 + w - 1 of the N <= 2 tokens, w a multiple of 8 within K, X rows
// on 16 bytes) staged as two 16-bit values a column (token 0 in a word's low half, token 1 in its high half): each
// thread 8 columns of both tokens a unit, 16-byte loads, U units' loads in flight, paired by PRMT and stored as two
// 16-byte words.  A token past N is zeros.  One L2 round trip for all of K on Llama's parts layout (512 units), where
// the column-a-thread loop took one a 8 columns (four).  Session 56 (H200, Llama-3-8B bf16 80 %): batch 2 2.820 ->
// 2.647 ms a token.  The same for NT = 4 (one unit a thread in flight: more registers spilled the split kernel) ran
// batch 3 2.4 % slower, so NT = 4 and 8 keep the column loop.
// RMS (the parts layout's DR_RMS, kernels.DR_NT_NORM; g the norm's weight on 16 bytes): as the N = 1 parts kernel's
// staging, each token's columns times the norm's weight rounded once (mul8_rn) and its sum of squares of the raw
// values added into q0 / q1 (this thread's columns in order; dr_post_sums then sums the block's), 2 units in flight.
template <bool BF16, bool RMS>
DEVI void dr_nt_stage_vec(const u16* __restrict__ x, u16* xs, int a0, int w, int N, int K, const u16* __restrict__ g,
                          float& q0, float& q1) {
  constexpr int NT = 2;
  constexpr int T = 32 * DR_WARPS, U = RMS ? 2 : 4;
  const int units = w >> 3;
  for (int u0 = threadIdx.x; u0 < units; u0 += U * T) {
    uint4 r[U][NT], gw[RMS ? U : 1];
#pragma unroll
    for (int i = 0; i < U; ++i) {
#pragma unroll
      for (int t = 0; t < NT; ++t)
        r[i][t] = u0 + i * T < units && t < N
                      ? __ldg(reinterpret_cast<const uint4*>(x + (long long)t * K + a0) + u0 + i * T)
                      : make_uint4(0u, 0u, 0u, 0u);
      if (RMS)
        gw[i] = u0 + i * T < units ? __ldg(reinterpret_cast<const uint4*>(g + a0) + u0 + i * T)
                                   : make_uint4(0u, 0u, 0u, 0u);
    }
#pragma unroll
    for (int i = 0; i < U; ++i) {
      if (u0 + i * T >= units) break;
      if (RMS) {
#pragma unroll
        for (int t = 0; t < NT; ++t) {
          if (t >= N) break;
          float f[8];
          unpack8<BF16>(r[i][t], f);
          float& q = t == 0 ? q0 : q1;
#pragma unroll
          for (int c = 0; c < 8; ++c) q = fmaf(f[c], f[c], q);
          r[i][t] = mul8_rn<BF16>(r[i][t], gw[RMS ? i : 0]);
        }
      }
      u16* dst = xs + (long long)(u0 + i * T) * 8 * NT;
      u32 out[4 * NT];  // the unit's 8 columns, NT / 2 words each
#pragma unroll
      for (int j = 0; j < 4; ++j)  // columns 2 j and 2 j + 1
#pragma unroll
        for (int p = 0; p < NT / 2; ++p) {
          const uint4& ra = r[i][2 * p];
          const uint4& rb = r[i][2 * p + 1];
          const u32 a = j == 0 ? ra.x : j == 1 ? ra.y : j == 2 ? ra.z : ra.w;
          const u32 b = j == 0 ? rb.x : j == 1 ? rb.y : j == 2 ? rb.z : rb.w;
          out[2 * j * (NT / 2) + p] = __byte_perm(a, b, 0x5410);
          out[(2 * j + 1) * (NT / 2) + p] = __byte_perm(a, b, 0x7632);
        }
#pragma unroll
      for (int q = 0; q < NT; ++q)
        reinterpret_cast<uint4*>(dst)[q] = make_uint4(out[4 * q], out[4 * q + 1], out[4 * q + 2], out[4 * q + 3]);
    }
  }
}

// Y at weight row `row`, token t, from its sum `acc` (DeltaRows' 2-8 token kernels and delta_rows_reduce): plus the
// bias `bv`, added into Y with DR_RESID (the sum rounded to the dtype first), or with DR_SILU silu(acc) x `up` (the up
// row's sum) into Y's M / 2 columns (silu_mul_rounded)
template <bool BF16>
DEVI void dr_nt_store1(float acc, float up, float bv, int row, int t, int M, u16* y, int mode) {
  const bool silu = mode & DR_SILU;
  u16* dst = y + (long long)t * (silu ? M / 2 : M) + row;
  if (silu) {
    *dst = silu_mul_rounded<BF16>(acc, up);
  } else {
    const float r = acc + bv;
    *dst = (mode & DR_RESID) ? from_float<BF16>(to_float<BF16>(*dst) + to_float<BF16>(from_float<BF16>(r)))
                             : from_float<BF16>(r);
  }
}
template <bool BF16, int NT>
DEVI void dr_nt_store(const float (&acc)[NT], const float (&up)[NT], int row, int N, int M, u16* y, const u16* bias,
                      int mode) {
  const float bv = bias && !(mode & DR_SILU) ? to_float<BF16>(bias[row]) : 0.f;
#pragma unroll
  for (int t = 0; t < NT; ++t) {
    if (t >= N) break;
    dr_nt_store1<BF16>(acc[t], up[t], bv, row, t, M, y, mode);
  }
}

// The multi-token kernels' split-K summed by atomics (ATOMIC below), after a warp's adds: lane 0 takes the ticket of
// `group` (a slice, or a gate slice and its up slice with DR_SILU), and the last warp reads the group's sums, zeroes
// them and the ticket and writes y.  Not inlined: inlined, it cost the 64-register _nt4 kernel 4-12 bytes of spills in
// its walk.
template <bool BF16>
__device__ __noinline__ void dr_nt_atomic_tail(const int* __restrict__ offsets, float* __restrict__ ws,
                                               int* __restrict__ tickets, u16* __restrict__ y,
                                               const u16* __restrict__ bias, int S, int N, int M, int slices,
                                               int group, int lane, int mode) {
  const bool silu = mode & DR_SILU;
  const int hs = slices >> 1, mp = slices * 32;
  int prev = 0;
  if (lane == 0) prev = ticket_acq_rel(tickets + group);
  prev = __shfl_sync(0xffffffffu, prev, 0);
  if (prev != (silu ? 2 : 1) * S - 1) return;
  __syncwarp();  // lane 0's acquire before every lane's loads
  if (lane == 0) tickets[group] = 0;
  const int grank = group * 32 + lane;
  const int orow = dr_perm(offsets, slices, S)[grank];
  const float bv = bias && !silu && orow >= 0 ? to_float<BF16>(bias[orow]) : 0.f;
  for (int t = 0; t < N; ++t) {
    float* g = ws + (long long)t * mp + grank;
    const float v = __ldcg(g), u = silu ? __ldcg(g + hs * 32) : 0.f;
    __stcg(g, 0.f);
    if (silu) __stcg(g + hs * 32, 0.f);
    if (orow >= 0) dr_nt_store1<BF16>(v, u, bv, orow, t, M, y, mode);
  }
}

// ONE: the parts layout's kernel (delta_rows_parts_<dtype>_nt<NT>, P > 1 lanes a row: a row's P lanes summed by
// shuffles), whose one window is all of K (wmax: all of K while NT x 2 K bytes fit DR_NT_STAGE_MAX).
// It has one split, so the kernel applies the epilogue itself and writes y
// ([N, M], or [N, M / 2] for SiLU x up; mode DR_SILU / DR_RESID and the bias as delta_rows_reduce_<dtype>, with its
// rounding steps, so the same bits), and no reduction is launched; ws is unused.
// ATOMIC (delta_rows_spmm_<dtype>_nt<NT>a, the split layout, P = 1): each lane adds its sums into `ws`, fp32 sums kept
// zeroed between launches ([token][rank], rank = 32 slice + lane), lane 0 takes the slice's ticket (gate and up
// slices one ticket for DR_SILU, as the _n1 kernel), and the last warp reads its slice's sums, zeroes them and its
// ticket and writes y as ONE does: no partials and no delta_rows_reduce launch; the sums' order is the atomics'.
template <bool BF16, int NT, bool ONE, bool ATOMIC = false, bool CODED = false>
DEVI void delta_rows_nt_body(const int* __restrict__ data, const int* __restrict__ offsets, const u16* __restrict__ x,
                             float* __restrict__ ws, int S, int N, int K, int M, int slices, int P, int wmax,
                             u16* __restrict__ y = nullptr, const u16* __restrict__ bias = nullptr, int mode = 0,
                             int* __restrict__ tickets = nullptr, const u16* __restrict__ colscale = nullptr,
                             float eps = 0.f, float rscale = 1.f) {
  constexpr int LG = NT == 8 ? 4 : NT == 4 ? 3 : 2;  // log2 of a staged column's bytes (2 NT)
  extern __shared__ __align__(16) u16 drnt_x[];
  u16* const xs = drnt_x;  // wmax x NT 16-bit values (dynamic shared memory)
  constexpr int RING = ONE ? DR_RING_NT : dr_ring_nt(NT);
  __shared__ __align__(16) unsigned char ring[DR_WARPS][RING * 640];
  __shared__ int win_lo[DR_WARPS], win_hi[DR_WARPS];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, s = blockIdx.y;
  const int slice = min(blockIdx.x * DR_WARPS + warp, slices - 1);  // (a warp past the last slice repeats it, unstored)
  const bool live = blockIdx.x * DR_WARPS + warp < slices;
  int goff, g0, g1;
  dr_split(offsets, slice, s, S, goff, g0, g1);
  const unsigned char* base = dr_lane_base<CODED>(data, goff, lane);
  const u32 rs = smem_addr(ring[warp]);
  dr_prime<CODED, RING>(rs, base, g0, g1, live);
  __shared__ uint2 lut_s[CODED ? 32 * DR_WARPS : 1];  // the rows' exponent tables (coded values)
  if (CODED) lut_s[threadIdx.x] = dr_lut(data, offsets, slices, (slice * 32 + lane) / P);
  pdl_launch_dependents();  // the next kernel's blocks may become resident (programmatic launch; else a no-op)
  const int* win = dr_win(offsets, slices, S, slice, s);
  if (lane == 0) {
    win_lo[warp] = win[0];
    win_hi[warp] = win[0] + win[1];
  }
  const int start = dr_start(offsets, slices, S, slice, s, lane);
  const int row = dr_perm(offsets, slices, S)[slice * 32 + lane];
  __syncthreads();
  const int2 bw = dr_union(win_lo, win_hi);
  const int a0 = bw.x, w = bw.y;
  pdl_wait();  // X and every global write come after the previous kernel (programmatic launch; else a no-op)
  const bool staged = w <= wmax;  // (the same for the whole block)
  // DR_RMS: the parts layout at 2 tokens only, X and the norm's weight on 16 bytes, K % 8 == 0 (the launcher's
  // _delta_rows_cuda takes it only so; anything else would be a wrong answer, so it traps)
  const bool rms = ONE && NT == 2 && (mode & DR_RMS);
  __shared__ float qpart[DR_WARPS], qpart2[DR_WARPS];
  if (NT == 2 && staged && (K & 7) == 0 && (reinterpret_cast<size_t>(x) & 15) == 0) {  // (a0, w: 8-aligned, in K)
    float q0 = 0.f, q1 = 0.f;
    if (rms) {
      if (reinterpret_cast<size_t>(colscale) & 15) __trap();
      dr_nt_stage_vec<BF16, true>(x, xs, a0, w, N, K, colscale, q0, q1);
      dr_post_sums(q0, q1, qpart, qpart2);
    } else {
      dr_nt_stage_vec<BF16, false>(x, xs, a0, w, N, K, nullptr, q0, q1);
    }
    __syncthreads();
  } else if (rms) {
    __trap();
  } else if (staged) {
    for (int c = threadIdx.x; c < w; c += 32 * DR_WARPS) {  // column a0 + c of every token (0 past N or K)
      u32 h[NT / 2];
#pragma unroll
      for (int t = 0; t < NT; t += 2) {
        const u32 lo = t < N && a0 + c < K ? (u32)x[(long long)t * K + a0 + c] : 0u;
        const u32 up = t + 1 < N && a0 + c < K ? (u32)x[(long long)(t + 1) * K + a0 + c] : 0u;
        h[t / 2] = lo | (up << 16);
      }
      if (NT == 8) {
        *reinterpret_cast<uint4*>(xs + c * NT) = make_uint4(h[0], h[1], h[2 % (NT / 2)], h[3 % (NT / 2)]);
      } else if (NT == 4) {
        *reinterpret_cast<uint2*>(xs + c * NT) = make_uint2(h[0], h[1 % (NT / 2)]);
      } else {
        *reinterpret_cast<u32*>(xs + c * NT) = h[0];
      }
    }
    __syncthreads();
  }
  if (!live) return;
  float acc[NT];
#pragma unroll
  for (int t = 0; t < NT; ++t) acc[t] = 0.f;
  const unsigned char* xsb = reinterpret_cast<const unsigned char*>(xs);
  const unsigned char* rg = ring[warp];
  u32 off = (u32)(start - a0) << LG;  // the running column's byte offset in the window
  for (int g = g0; g < g1; ++g) {
    const int slot = (g - g0) & (RING - 1);
    cp_async_wait<RING - 1>();
    u32 d;
    uint4 v = dr_read<CODED>(rg, slot, lane, lut_s + threadIdx.x, d);
    if (g + RING < g1) dr_fetch<CODED>(rs, slot, base, g + RING);
    cp_async_commit();
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      off += ((d >> (4 * e)) & 15u) << LG;
      float f0, f1;
      dr_unpack<BF16>(e < 2 ? v.x : e < 4 ? v.y : e < 6 ? v.z : v.w, f0, f1);
      const float f = e & 1 ? f1 : f0;
      float xv[NT];
      if (staged) {
        dr_xcol<BF16, NT>(xsb, off, xv);
      } else {
        const long long col = a0 + (off >> LG);
#pragma unroll
        for (int t = 0; t < NT; ++t) xv[t] = t < N ? to_float<BF16>(__ldg(x + (long long)t * K + col)) : 0.f;
      }
#pragma unroll
      for (int t = 0; t < NT; ++t) acc[t] = fmaf(f, xv[t], acc[t]);
    }
  }
  for (int o = 1; o < P; o <<= 1) {  // the parts layout: a row's P adjacent lanes summed (P = 1: none)
#pragma unroll
    for (int t = 0; t < NT; ++t) acc[t] += __shfl_xor_sync(0xffffffffu, acc[t], o);
  }
  if (ONE) {  // one split: the epilogue here (SiLU x up: lanes 16-31 hold the up rows of lanes 0-15)
    if (NT == 2 && rms) {  // each token's RMSNorm factor, from the block's sums of squares (in warp order)
      float s0 = qpart[0], s1 = qpart2[0];
#pragma unroll
      for (int i = 1; i < DR_WARPS; ++i) {
        s0 += qpart[i];
        s1 += qpart2[i];
      }
      acc[0] *= rscale * rsqrtf(s0 * __fdividef(1.f, (float)K) + eps);
      acc[NT - 1] *= rscale * rsqrtf(s1 * __fdividef(1.f, (float)K) + eps);
    }
    const bool silu = mode & DR_SILU;
    float up[NT];
#pragma unroll
    for (int t = 0; t < NT; ++t) up[t] = __shfl_down_sync(0xffffffffu, acc[t], 16);
    if (row < 0 || lane % P != 0 || (silu && lane >= 16)) return;
    dr_nt_store<BF16, NT>(acc, up, row, N, M, y, bias, mode);
    return;
  }
  if (ATOMIC) {
    const bool silu = mode & DR_SILU;
    const int mp = slices * 32;
#pragma unroll
    for (int t = 0; t < NT; ++t)
      if (t < N) atomicAdd(ws + (long long)t * mp + slice * 32 + lane, acc[t]);
    __syncwarp();  // every lane's adds before lane 0's release
    dr_nt_atomic_tail<BF16>(offsets, ws, tickets, y, bias, S, N, M, slices, silu ? slice % (slices >> 1) : slice,
                            lane, mode);
    return;
  }
  if (row >= 0 && lane % P == 0) {
#pragma unroll
    for (int t = 0; t < NT; ++t)
      if (t < N) ws[((long long)s * N + t) * M + row] = acc[t];
  }
}

// (NT = 8: no occupancy bound; 54-56 registers on sm_80 and sm_90 since session 32's dynamic window, 94-148 before)
#define DR_NT_ARGS                                                                                           \
  const int *__restrict__ data, const int *__restrict__ offsets, const u16 *__restrict__ x, float *__restrict__ ws, \
      int S, int N, int K, int M, int slices, int P, int wmax
#define INSTANTIATE_DR_NT(NAME, BF16, NT, BOUNDS)                                                           \
  extern "C" __global__ void __launch_bounds__ BOUNDS delta_rows_spmm_##NAME##_nt##NT(DR_NT_ARGS) {         \
    delta_rows_nt_body<BF16, NT, false>(data, offsets, x, ws, S, N, K, M, slices, P, wmax);                    \
  }                                                                                                          \
  extern "C" __global__ void __launch_bounds__ BOUNDS delta_rows_parts_##NAME##_nt##NT(DR_NT_ARGS,              \
      u16 *__restrict__ y, const u16 *__restrict__ bias, int mode, const u16 *__restrict__ colscale, float eps,    \
      float rscale) {                                                                                        \
    delta_rows_nt_body<BF16, NT, true>(data, offsets, x, ws, S, N, K, M, slices, P, wmax, y, bias, mode, nullptr, \
                                       colscale, eps, rscale);                                               \
  }                                                                                                          \
  extern "C" __global__ void __launch_bounds__ BOUNDS delta_rows_spmm_##NAME##_nt##NT##a(DR_NT_ARGS,           \
      u16 *__restrict__ y, const u16 *__restrict__ bias, int mode, int *__restrict__ tickets) {                \
    delta_rows_nt_body<BF16, NT, false, true>(data, offsets, x, ws, S, N, K, M, slices, P, wmax, y, bias, mode, \
                                              tickets);                                                      \
  }
INSTANTIATE_DR_NT(f16, false, 2, (32 * DR_WARPS, 8))
INSTANTIATE_DR_NT(f16, false, 4, (32 * DR_WARPS, 8))
INSTANTIATE_DR_NT(f16, false, 8, (32 * DR_WARPS))
INSTANTIATE_DR_NT(bf16, true, 2, (32 * DR_WARPS, 8))
INSTANTIATE_DR_NT(bf16, true, 4, (32 * DR_WARPS, 8))
INSTANTIATE_DR_NT(bf16, true, 8, (32 * DR_WARPS))
// coded values (bf16): delta_rows_spmm_bf16_nt<NT>c (the split layout, partials and the reduction), _nt<NT>ac (its
// atomics) and
// delta_rows_parts_bf16_nt<NT>c (NT = 2, 4: 5-8 tokens run as 4 and the rest, kernels.py; an _nt8c of the parts
// layout took 48 registers and a 24-byte stack on sm_80 under any bound)
#define INSTANTIATE_DR_NT_CODED(NT, BOUNDS)                                                                     \
  extern "C" __global__ void __launch_bounds__ BOUNDS delta_rows_spmm_bf16_nt##NT##c(DR_NT_ARGS) {             \
    delta_rows_nt_body<true, NT, false, false, true>(data, offsets, x, ws, S, N, K, M, slices, P, wmax);        \
  }                                                                                                           \
  extern "C" __global__ void __launch_bounds__ BOUNDS delta_rows_spmm_bf16_nt##NT##ac(DR_NT_ARGS,               \
      u16 *__restrict__ y, const u16 *__restrict__ bias, int mode, int *__restrict__ tickets) {                \
    delta_rows_nt_body<true, NT, false, true, true>(data, offsets, x, ws, S, N, K, M, slices, P, wmax, y, bias, \
                                                    mode, tickets);                                           \
  }
#define INSTANTIATE_DR_PARTS_NT_CODED(NT, BOUNDS)                                                               \
  extern "C" __global__ void __launch_bounds__ BOUNDS delta_rows_parts_bf16_nt##NT##c(DR_NT_ARGS,                \
      u16 *__restrict__ y, const u16 *__restrict__ bias, int mode, const u16 *__restrict__ colscale, float eps,    \
      float rscale) {                                                                                        \
    delta_rows_nt_body<true, NT, true, false, true>(data, offsets, x, ws, S, N, K, M, slices, P, wmax, y, bias, \
                                                    mode, nullptr, colscale, eps, rscale);                   \
  }
INSTANTIATE_DR_NT_CODED(2, (32 * DR_WARPS, 8))
INSTANTIATE_DR_NT_CODED(4, (32 * DR_WARPS, 8))
INSTANTIATE_DR_NT_CODED(8, (32 * DR_WARPS))
INSTANTIATE_DR_PARTS_NT_CODED(2, (32 * DR_WARPS, 8))
INSTANTIATE_DR_PARTS_NT_CODED(4, (32 * DR_WARPS, 8))

// delta_rows_spmm_<dtype>_mma<NT>[c][x]: N <= NT tokens (NT = 8, 16, 32) on a DeltaRows weight of the split layout
// (P = 1) with the tensor cores (session 60; off by default, kernels.DR_MMA_MIN: measured 0.24-0.84x of cuBLAS at
// 8-16 tokens, docs/kernels.md "DeltaRows on the tensor cores").  Grid (ceil(slices / DRM_WARPS), S), a warp a
// slice and split, nothing shared between warps.  Each warp keeps its slice's 32 rows as a ring of DRM_RC columns in
// shared memory (16-bit, zeroed): every lane walks its row's groups and stores each nonzero at (its row, column mod
// DRM_RC) -- a column step, an LDS-free 2-byte store an entry, no product.  After each round the warp's smallest
// running column (one REDUX) says which columns every lane is past: those 16-column blocks are final, and the warp
// multiplies them on the tensor cores (ldmatrix.x4 of the two 16-row halves, X's columns from global memory through
// L1 as the B fragments, mma.m16n8k16 with fp32 sums), then zeroes them for reuse.  A lane whose next group would
// reach past the ring's end waits that round (its group stays in the copy ring); the lane with the smallest column
// always fits (a group spans at most 120 columns), so every round moves.  A pass drains at most DRM_RC columns: past
// that its slots alias blocks read in the same pass and not yet zeroed.  Groups come DRM_RING ahead by cp.async, as
// the other kernels' (each lane its own, at its own pace).  The partials go to ws[s][t][row] as the _nt kernels', and
// delta_rows_reduce_<dtype> sums them with the epilogue.  Values -- plain or coded -- are stored as their bits, so
// the products and sums are the tensor cores': exact products, fp32 sums in the MMA's order.
constexpr int DRM_WARPS = 2;                 // warps (slices) a block; kernels.DRM_WARPS
constexpr int DRM_RC = 256;                  // the ring's columns (a power of 2, > 120 + 16)
constexpr int DRM_PITCH = 2 * DRM_RC + 16;   // bytes a ring row (+16: ldmatrix's 8 rows in 8 distinct bank quads)
constexpr int DRM_RING = 4;                  // groups copied ahead (640-byte slots)

constexpr int DRM_XRC = 128;                // XR: X's ring, columns (a power of 2)
constexpr int DRM_XPITCH = 2 * DRM_XRC + 16;  // bytes a token's row of it
constexpr int DRM_XC = 64;                  // XR: columns of X loaded a round (into registers, stored after the drain)

template <bool BF16, int NT, bool CODED, bool XR = false>
DEVI void delta_rows_mma_body(const int* __restrict__ data, const int* __restrict__ offsets,
                              const u16* __restrict__ x, float* __restrict__ ws, int S, int N, int K, int M,
                              int slices, int vec) {
  __shared__ __align__(16) unsigned char tile[DRM_WARPS][32 * DRM_PITCH];
  __shared__ __align__(16) unsigned char ring[DRM_WARPS][DRM_RING * 640];
  // XR (K % 8 == 0, X on 16 bytes: vec == 2): X's columns staged a round ahead in a ring [NT][DRM_XRC] a warp, read
  // by ldmatrix as the B fragments (instead of 4-byte loads from global memory in the drain)
  __shared__ __align__(16) unsigned char xring[XR ? DRM_WARPS : 1][XR ? NT * DRM_XPITCH : 16];
  constexpr int XU = XR ? NT * DRM_XC / 8 / 32 : 1;  // 16-byte units of X a lane a round
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, s = blockIdx.y;
  const int slice = blockIdx.x * DRM_WARPS + warp;
  pdl_launch_dependents();
  if (slice >= slices) return;
  int goff, g0, g1;
  dr_split(offsets, slice, s, S, goff, g0, g1);
  const unsigned char* base = dr_lane_base<CODED>(data, goff, lane);
  const u32 rs = smem_addr(ring[warp]);
  dr_prime<CODED, DRM_RING>(rs, base, g0, g1);
  const uint2 lut = CODED ? dr_lut(data, offsets, slices, slice * 32 + lane) : make_uint2(0, 0);
  unsigned char* const trow = tile[warp] + lane * DRM_PITCH;  // this lane's row of the ring
#pragma unroll
  for (int c = 0; c < 2 * DRM_RC; c += 16) *reinterpret_cast<uint4*>(trow + c) = make_uint4(0, 0, 0, 0);
  const int* win = dr_win(offsets, slices, S, slice, s);
  const int a0 = win[0], wend = win[0] + win[1];
  int col = dr_start(offsets, slices, S, slice, s, lane);  // the lane's column before its next entry
  const u32 tb = smem_addr(tile[warp]);
  // ldmatrix.x4 addresses (lanes 0-7 / 8-15 / 16-23 / 24-31: rows +0 / +8, columns +0 / +8) of the two 16-row halves
  const u32 la = tb + ((lane & 7) + ((lane >> 3) & 1) * 8) * DRM_PITCH + (lane >> 4) * 16;
  float acc[2][NT / 8][4];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < NT / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;
  // B fragments: token nt 8 + lane / 4, columns k + 2 (lane % 4) (+1) and + 8 (+1)
  const int tq = lane >> 2, kq = 2 * (lane & 3);
  pdl_wait();  // X after the previous kernel
  int drained = a0 & ~15;  // columns below are multiplied (and zeroed in the ring)
  int g = g0;
  // XR: columns below xl are in X's ring; xv holds columns xl .. xl + DRM_XC - 1 while xpend
  int xl = drained;
  uint4 xv[XU];
  bool xpend = false;
  const u32 xb = smem_addr(xring[XR ? warp : 0]);
  auto xstore = [&]() {  // xv (X's columns xl ..) into its ring: the columns they replace are multiplied
#pragma unroll
    for (int u = 0; u < XU; ++u) {
      const int p = lane + 32 * u, t = p / (DRM_XC / 8), c = xl + 8 * (p % (DRM_XC / 8));
      asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};" ::"r"(xb + t * DRM_XPITCH + 2 * (c & (DRM_XRC - 1))),
                   "r"(xv[u].x), "r"(xv[u].y), "r"(xv[u].z), "r"(xv[u].w) : "memory");
    }
    xl += DRM_XC;
    xpend = false;
  };
  __syncwarp();
  for (;;) {
    if (XR && !xpend && xl + DRM_XC - DRM_XRC <= drained && xl < wend) {  // the next columns, where the ring has room
#pragma unroll
      for (int u = 0; u < XU; ++u) {
        const int p = lane + 32 * u, t = p / (DRM_XC / 8), c = xl + 8 * (p % (DRM_XC / 8));
        xv[u] = t < N && c < K ? __ldg(reinterpret_cast<const uint4*>(x + (long long)t * K + c))
                               : make_uint4(0, 0, 0, 0);
      }
      xpend = true;
    }
    if (g < g1) {
      const int slot = (g - g0) & (DRM_RING - 1);
      cp_async_wait<DRM_RING - 1>();
      u32 d;
      uint4 v = dr_read<CODED>(ring[warp], slot, lane, &lut, d);
      const u32 t = (d & 0x0f0f0f0fu) + ((d >> 4) & 0x0f0f0f0fu);
      const int last = col + (int)((t * 0x01010101u) >> 24);
      if (last < drained + DRM_RC) {  // the group fits the ring: store its nonzeros
        const u32 w[4] = {v.x, v.y, v.z, v.w};
        int c = col;
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          c += (d >> (4 * e)) & 15u;
          const u16 h = (u16)(w[e >> 1] >> (16 * (e & 1)));
          if (h & 0x7fff) *reinterpret_cast<u16*>(trow + 2 * (c & (DRM_RC - 1))) = h;
        }
        col = last;
        if (g + DRM_RING < g1) dr_fetch<CODED>(rs, slot, base, g + DRM_RING);
        cp_async_commit();
        ++g;
      }
    }
    // columns below every lane's running column are final (a lane's next entries lie at or past it)
    const int front = (int)__reduce_min_sync(0xffffffffu, g < g1 ? (u32)col : 0x7fffffffu);
    // (at most DRM_RC columns a pass: past that the ring's slots alias blocks read in this pass but not yet zeroed --
    // a lane holding only pads, or the last lane's end, can put `front` or wend that far ahead)
    const int lim = min(min(front == 0x7fffffff ? wend : front & ~15, XR ? xl : 0x7fffffff), drained + DRM_RC);
    if (drained >= lim) {
      if (XR && xpend) {
        xstore();
        continue;
      }
      if (front == 0x7fffffff && drained >= wend) break;
      continue;
    }
    __syncwarp();  // the lanes' stores before the other lanes' ldmatrix
    const int d0 = drained;
    for (; drained < lim; drained += 16) {
      const u32 cb = 2 * (drained & (DRM_RC - 1));
      u32 a[2][4];
#pragma unroll
      for (int h = 0; h < 2; ++h)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                     : "=r"(a[h][0]), "=r"(a[h][1]), "=r"(a[h][2]), "=r"(a[h][3])
                     : "r"(la + h * 16 * DRM_PITCH + cb));
      if (XR) {  // B from X's ring: ldmatrix.x4 of tokens 16 i .. 16 i + 15, columns + 0 / + 8
        const u32 xa = xb + ((lane & 7) + 8 * (lane >> 4)) * DRM_XPITCH + 2 * (drained & (DRM_XRC - 1)) +
                       16 * ((lane >> 3) & 1);
#pragma unroll
        for (int i = 0; i < (NT + 15) / 16; ++i) {
          u32 b[4];
          if (NT == 8) {
            asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];"
                         : "=r"(b[0]), "=r"(b[1]) : "r"(xa));
          } else {
            asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                         : "=r"(b[0]), "=r"(b[1]), "=r"(b[2]), "=r"(b[3]) : "r"(xa + i * 16 * DRM_XPITCH));
          }
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const u32 b0[2] = {b[0], b[1]};
            mma16816<BF16>(acc[h][(2 * i) % (NT / 8)], a[h], b0);
            if (NT > 8) {
              const u32 b1[2] = {b[2], b[3]};
              mma16816<BF16>(acc[h][(2 * i + 1) % (NT / 8)], a[h], b1);
            }
          }
        }
        continue;
      }
      const int k0 = drained + kq, k1 = k0 + 8;
#pragma unroll
      for (int j = 0; j < NT / 8; ++j) {
        const int tk = 8 * j + tq;
        u32 b[2] = {0u, 0u};
        if (tk < N) {
          const u16* xr = x + (long long)tk * K;
          if (vec) {
            if (k0 < K) b[0] = __ldg(reinterpret_cast<const u32*>(xr + k0));
            if (k1 < K) b[1] = __ldg(reinterpret_cast<const u32*>(xr + k1));
          } else {
            if (k0 < K) b[0] = (u32)__ldg(xr + k0) | (k0 + 1 < K ? (u32)__ldg(xr + k0 + 1) << 16 : 0u);
            if (k1 < K) b[1] = (u32)__ldg(xr + k1) | (k1 + 1 < K ? (u32)__ldg(xr + k1 + 1) << 16 : 0u);
          }
        }
#pragma unroll
        for (int h = 0; h < 2; ++h) mma16816<BF16>(acc[h][j], a[h], b);
      }
    }
    __syncwarp();  // every lane's ldmatrix before the zeroing
    for (int c = d0; c < drained; c += 16) {
      uint4* z = reinterpret_cast<uint4*>(trow + 2 * (c & (DRM_RC - 1)));
      z[0] = make_uint4(0, 0, 0, 0);
      z[1] = make_uint4(0, 0, 0, 0);
    }
    if (XR && xpend && xl + DRM_XC - DRM_XRC <= drained) xstore();
    if (front == 0x7fffffff && drained >= wend) break;
  }
  // the partials: acc[h][j][e] is row 16 h + lane / 4 (+ 8 for e >= 2), token 8 j + 2 (lane % 4) (+ 1 for odd e)
  const int* perm = dr_perm(offsets, slices, S) + slice * 32;
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int e2 = 0; e2 < 2; ++e2) {
      const int row = __ldg(perm + 16 * h + tq + 8 * e2);
      if (row < 0) continue;
#pragma unroll
      for (int j = 0; j < NT / 8; ++j)
#pragma unroll
        for (int e1 = 0; e1 < 2; ++e1) {
          const int t = 8 * j + kq + e1;
          if (t < N) ws[((long long)s * N + t) * M + row] = acc[h][j][2 * e2 + e1];
        }
    }
}
#define DR_MMA_ARGS                                                                                             \
  const int *__restrict__ data, const int *__restrict__ offsets, const u16 *__restrict__ x, float *__restrict__ ws, \
      int S, int N, int K, int M, int slices, int vec
#define INSTANTIATE_DR_MMA(NAME, BF16, NT)                                                                      \
  extern "C" __global__ void __launch_bounds__(32 * DRM_WARPS) delta_rows_spmm_##NAME##_mma##NT(DR_MMA_ARGS) {  \
    delta_rows_mma_body<BF16, NT, false>(data, offsets, x, ws, S, N, K, M, slices, vec);                       \
  }
INSTANTIATE_DR_MMA(f16, false, 8)
INSTANTIATE_DR_MMA(f16, false, 16)
INSTANTIATE_DR_MMA(f16, false, 32)
INSTANTIATE_DR_MMA(bf16, true, 8)
INSTANTIATE_DR_MMA(bf16, true, 16)
INSTANTIATE_DR_MMA(bf16, true, 32)
#define INSTANTIATE_DR_MMA_CODED(NT)                                                                            \
  extern "C" __global__ void __launch_bounds__(32 * DRM_WARPS) delta_rows_spmm_bf16_mma##NT##c(DR_MMA_ARGS) {   \
    delta_rows_mma_body<true, NT, true>(data, offsets, x, ws, S, N, K, M, slices, vec);                        \
  }
#define INSTANTIATE_DR_MMA_X(NAME, BF16, NT)                                                                    \
  extern "C" __global__ void __launch_bounds__(32 * DRM_WARPS) delta_rows_spmm_##NAME##_mma##NT##x(DR_MMA_ARGS) { \
    delta_rows_mma_body<BF16, NT, false, true>(data, offsets, x, ws, S, N, K, M, slices, vec);                 \
  }
INSTANTIATE_DR_MMA_X(f16, false, 8)
INSTANTIATE_DR_MMA_X(f16, false, 16)
INSTANTIATE_DR_MMA_X(bf16, true, 8)
INSTANTIATE_DR_MMA_X(bf16, true, 16)
#define INSTANTIATE_DR_MMA_CODED_X(NT)                                                                          \
  extern "C" __global__ void __launch_bounds__(32 * DRM_WARPS) delta_rows_spmm_bf16_mma##NT##cx(DR_MMA_ARGS) {  \
    delta_rows_mma_body<true, NT, true, true>(data, offsets, x, ws, S, N, K, M, slices, vec);                  \
  }
INSTANTIATE_DR_MMA_CODED(8)
INSTANTIATE_DR_MMA_CODED(16)
INSTANTIATE_DR_MMA_CODED(32)
INSTANTIATE_DR_MMA_CODED_X(8)
INSTANTIATE_DR_MMA_CODED_X(16)

// The block-parallel placement of delta_rows_to_dense_pr / _sr and delta_rows_spmm_<dtype>_tmma<NT> (sessions 68-69):
// the G groups at gbase (gw ints a group: 160 plain, 128 coded) of one slice's 32 lanes, DRP_WARPS warps a block.  Warp
// w takes group c DRP_WARPS + w of every lane (one coalesced load a warp; groups past G read as zeros), the next
// chunk's asked for before this chunk's barrier; each thread sums its group's 8 steps in bytes, the warps post the sums
// (double-buffered by chunk, one barrier a chunk), and each thread starts its entries at its lane's running column
// `run` plus the sums of the warps before it.  The lane's nonzeros (not pads, escapes or -0.0) whose columns fall in
// base .. base + nb - 1 go to trow[col - base]; a padding lane (row < 0) places nothing.  `coded`: the values coded
// (dr_decode_coded with `lut`).  The first barrier also orders the caller's writes before it (its tile's zeroing).
// AHEAD (session 70): the chunks whose loads are in flight, in a ring of registers (5 a chunk): 1 asks for chunk c + 1
// while chunk c is placed, as sessions 68-69 built it; the _sr / _tmma blocks walk their groups in chunks that each
// wait for one load (about 10 dependent rounds a block on gate / up), so they may ask further ahead.
constexpr int DRP_WARPS = 8;
DEVI int dr_step_sum(u32 d) {  // a group's 8 steps (nibbles) summed: in bytes, then in the top byte
  const u32 t = (d & 0x0f0f0f0fu) + ((d >> 4) & 0x0f0f0f0fu);
  return (int)((t * 0x01010101u) >> 24);
}
// this lane's part of group g (zeros at g >= limit): its 16 bytes, and a plain group's steps word (a coded group's
// steps are its word v.w, taken where the group is used: taken here, as before session 70, the copy waited for the
// load at once, so no load was in flight across a chunk; Nsight Compute put 29 % of _sr's stall samples on it)
DEVI void dr_load_group(const int* gbase, int g, int limit, int gw, int coded, int lane, uint4& v, u32& d) {
  v = make_uint4(0, 0, 0, 0);
  d = 0;
  if (g < limit) {
    const int* gp = gbase + (long long)g * gw;
    v = __ldg(reinterpret_cast<const uint4*>(gp + 4 * lane));
    if (!coded) d = (u32)__ldg(gp + 128 + lane);
  }
}
// a group's 8 entries (values v, decoded; steps d) from column col on: its nonzeros (not pads, escapes or -0.0) whose
// columns fall in base .. base + nb - 1 go to trow[col - base] where `keep`; col ends at the group's last column
DEVI void dr_put_group(uint4 v, u32 d, bool keep, int& col, u16* trow, int base, int nb) {
  const u32 wv[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    col += (d >> (4 * k)) & 15;
    const u16 h = (u16)(wv[k >> 1] >> (16 * (k & 1)));
    if (keep && (h & 0x7fff) && (unsigned)(col - base) < (unsigned)nb) trow[col - base] = h;
  }
}
template <int AHEAD, bool SKIP = false>
DEVI void dr_place(const int* gbase, int G, int gw, int coded, uint2 lut, int run, int row, u16* trow, int base,
                   int nb, int (&sums)[2][DRP_WARPS][32]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  uint4 vq[AHEAD];
  u32 dq[AHEAD];
#pragma unroll
  for (int j = 0; j < AHEAD; ++j) dr_load_group(gbase, j * DRP_WARPS + warp, G, gw, coded, lane, vq[j], dq[j]);
  for (int c0 = 0; c0 * DRP_WARPS < G; c0 += AHEAD) {
#pragma unroll
    for (int j = 0; j < AHEAD; ++j) {
      const int c = c0 + j;
      if (c * DRP_WARPS >= G) break;  // (the same for the whole block: G is the block's)
      uint4 v = vq[j];
      const u32 d = coded ? v.w : dq[j];
      dr_load_group(gbase, (c + AHEAD) * DRP_WARPS + warp, G, gw, coded, lane, vq[j], dq[j]);
      if (!SKIP && coded && c * DRP_WARPS + warp < G) v = dr_decode_coded(v, lut);
      const int own = dr_step_sum(d);
      sums[c & 1][warp][lane] = own;
      __syncthreads();
      int col = run, total = 0;
#pragma unroll
      for (int q = 0; q < DRP_WARPS; ++q) {
        const int sq = sums[c & 1][q][lane];
        col += q < warp ? sq : 0;
        total += sq;
      }
      run += total;
      // SKIP: a group whose columns col + 1 .. col + own (its entries lie in them: steps >= 0) miss the band is
      // neither decoded nor walked (a window of several bands walks each group once a pass)
      if (SKIP && (row < 0 || col + own < base || col >= base + nb)) continue;
      if (SKIP && coded && c * DRP_WARPS + warp < G) v = dr_decode_coded(v, lut);
      dr_put_group(v, d, row >= 0, col, trow, base, nb);
    }
  }
}

// dr_place_ranges (session 70, kernels.DR_PLACE_RANGES; the same contract as dr_place): warp w takes the contiguous
// groups G w / 8 .. G (w + 1) / 8 - 1 of every lane instead of every 8th, so the warps meet once, not once a chunk of 8
// groups.  A pre-pass sums each thread's range of steps (the steps words only: a plain group's 128 bytes of them, a
// coded group's 4th word; 4 loads in flight), the warps post those sums, one barrier, and each thread starts its range
// at its lane's running column plus the sums of the warps before it; then it walks its range alone, AHEAD groups'
// loads in flight.  SKIP: a range, and then a group, whose columns miss the band is not walked (a range wholly outside
// it is not even loaded).  Nsight Compute put 20 % of _srk's stall samples on the chunk barrier (session 70).
template <int AHEAD, bool SKIP>
DEVI void dr_place_ranges(const int* gbase, int G, int gw, int coded, uint2 lut, int run, int row, u16* trow,
                          int base, int nb, int (&sums)[2][DRP_WARPS][32]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int r0 = (int)((u32)(warp * G) / DRP_WARPS), r1 = (int)((u32)((warp + 1) * G) / DRP_WARPS);
  auto steps = [&](int g) -> u32 {  // this lane's steps word of group g
    const int* gp = gbase + (long long)g * gw;
    return (u32)__ldg(coded ? gp + 4 * lane + 3 : gp + 128 + lane);
  };
  int own = 0;
  int g = r0;
  for (; g + 4 <= r1; g += 4) {
    u32 d[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) d[i] = steps(g + i);
#pragma unroll
    for (int i = 0; i < 4; ++i) own += dr_step_sum(d[i]);
  }
  for (; g < r1; ++g) own += dr_step_sum(steps(g));
  sums[0][warp][lane] = own;
  __syncthreads();
  int col = run;
#pragma unroll
  for (int q = 0; q < DRP_WARPS; ++q) col += q < warp ? sums[0][q][lane] : 0;
  if (row < 0 || (SKIP && (col + own < base || col >= base + nb))) return;
  uint4 vq[AHEAD];
  u32 dq[AHEAD];
#pragma unroll
  for (int j = 0; j < AHEAD; ++j) dr_load_group(gbase, r0 + j, r1, gw, coded, lane, vq[j], dq[j]);
  for (int g0 = r0; g0 < r1; g0 += AHEAD) {
#pragma unroll
    for (int j = 0; j < AHEAD; ++j) {
      const int gg = g0 + j;
      if (gg >= r1) break;
      uint4 v = vq[j];
      const u32 d = coded ? v.w : dq[j];
      dr_load_group(gbase, gg + AHEAD, r1, gw, coded, lane, vq[j], dq[j]);
      const int sum = dr_step_sum(d);
      if (SKIP && (col + sum < base || col >= base + nb)) {
        col += sum;
        continue;
      }
      if (coded) v = dr_decode_coded(v, lut);
      dr_put_group(v, d, true, col, trow, base, nb);
    }
  }
}
// the placement a kernel variant names: dr_place_ranges where RANGES, else dr_place
template <int AHEAD, bool SKIP, bool RANGES>
DEVI void dr_place_any(const int* gbase, int G, int gw, int coded, uint2 lut, int run, int row, u16* trow, int base,
                       int nb, int (&sums)[2][DRP_WARPS][32]) {
  if (RANGES)
    dr_place_ranges<AHEAD, SKIP>(gbase, G, gw, coded, lut, run, row, trow, base, nb, sums);
  else
    dr_place<AHEAD, SKIP>(gbase, G, gw, coded, lut, run, row, trow, base, nb, sums);
}

// delta_rows_spmm_<dtype>_tmma<NT>[c] (session 69, kernels.DR_MMA_TILE; with DR_MMA_MIN <= N <= DR_MMA_MAX): the
// split layout's tensor-core product built on delta_rows_to_dense_sr's placement instead of _mma's per-warp ring.  A
// block of DRT_WARPS warps takes one (slice, split); its window (the 16-column steps from a0 & ~15 to a0 + w) in
// passes of `band` columns (a multiple of 16, the launcher's kernels.DR_MMA_TILE_BAND).  Each pass: the tile (the
// slice's 32 rows of the band, rows DRT pitch bytes apart: +16 so ldmatrix's 8 rows sit in 8 bank quads) zeroed and
// X's band staged (NT token rows of it, 16-byte loads: K % 8 == 0, X on 16 bytes; tokens >= N and columns >= K as 0);
// the split's nonzeros of the band placed as _sr places them (warp w group c * 8 + w of every lane, step sums posted
// double-buffered, one barrier a chunk); then warp w multiplies the band's 16-column steps w, w + 8, ... (ldmatrix.x4
// of the tile's two 16-row halves, of X's tokens as _mma<NT>x does, mma.m16n8k16 into fp32 sums).  The split's tile
// holds only its own nonzeros, so the whole window is multiplied with no ownership rule.  After the passes the warps'
// sums meet in shared memory in warp order (deterministic) and the block writes the split's partials ws[s][t][row],
// which delta_rows_reduce_<dtype> sums with the epilogue.  Dynamic shared memory: (32 + NT) pitch bytes.
constexpr int DRTM_WARPS = DRP_WARPS;
// (session 70: a pass skips the groups outside its band, dr_place's SKIP; 4 chunks of groups in flight were no faster)
constexpr int DRTM_AHEAD = 1;
constexpr bool DRTM_SKIP = true;
template <bool BF16, int NT, bool CODED, int AHEAD>
DEVI void delta_rows_tmma_body(const int* __restrict__ data, const int* __restrict__ offsets,
                               const u16* __restrict__ x, float* __restrict__ ws, int S, int N, int K, int M,
                               int slices, int band) {
  extern __shared__ __align__(16) unsigned char drt_smem[];
  __shared__ int sums[2][DRP_WARPS][32];
  const int pitch = 2 * band + 16;
  unsigned char* tile = drt_smem;
  unsigned char* xs = drt_smem + 32 * pitch;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, slice = blockIdx.x, s = blockIdx.y;
  pdl_launch_dependents();
  int goff, g0, g1;
  dr_split(offsets, slice, s, S, goff, g0, g1);
  const int G = g1 - g0;
  const int* perm = dr_perm(offsets, slices, S) + slice * 32;
  const int row = perm[lane];
  const int start = dr_start(offsets, slices, S, slice, s, lane);
  const int* win = dr_win(offsets, slices, S, slice, s);
  const int c_lo = win[0] & ~15, c_hi = win[0] + win[1];
  const int gw = CODED ? 128 : 160;
  const uint2 lut = CODED ? dr_lut(data, offsets, slices, slice * 32 + lane) : make_uint2(0, 0);
  const int* gbase = data + (long long)(goff + g0) * gw;
  float acc[2][NT / 8][4];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < NT / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;
  const u32 tb = smem_addr(tile), xb = smem_addr(xs);
  // ldmatrix.x4 addresses: A (lanes 0-7 / 8-15 / 16-23 / 24-31: rows +0 / +8, columns +0 / +8), B (tokens
  // lane & 7 (+ 8 for lanes 16-31), columns + 8 for lanes 8-15 / 24-31), as _mma<NT>x
  const u32 la = tb + ((lane & 7) + ((lane >> 3) & 1) * 8) * pitch + (lane >> 4) * 16;
  const u32 xa = xb + ((lane & 7) + 8 * (lane >> 4)) * pitch + 16 * ((lane >> 3) & 1);
  pdl_wait();  // X after the previous kernel
  for (int b0 = c_lo; b0 < c_hi; b0 += band) {
    const int nb = min(band, (c_hi - b0 + 15) & ~15), nb8 = nb >> 3;
    for (int i = tid; i < 32 * nb8; i += 32 * DRTM_WARPS) {
      const int r = i / nb8, q = i - r * nb8;
      *reinterpret_cast<uint4*>(tile + r * pitch + 16 * q) = make_uint4(0, 0, 0, 0);
    }
    for (int i = tid; i < NT * nb8; i += 32 * DRTM_WARPS) {
      const int t = i / nb8, q = i - t * nb8, c = b0 + 8 * q;
      *reinterpret_cast<uint4*>(xs + t * pitch + 16 * q) =
          t < N && c < K ? __ldg(reinterpret_cast<const uint4*>(x + (long long)t * K + c)) : make_uint4(0, 0, 0, 0);
    }
    dr_place<AHEAD, DRTM_SKIP>(gbase, G, gw, CODED, lut, start, row, reinterpret_cast<u16*>(tile + lane * pitch),
                               b0, nb, sums);
    __syncthreads();  // the placement (and, without groups, the zeroing and X) before the products
    for (int q = warp; q < (nb >> 4); q += DRTM_WARPS) {
      const u32 cb = 32 * q;
      u32 a[2][4];
#pragma unroll
      for (int h = 0; h < 2; ++h)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                     : "=r"(a[h][0]), "=r"(a[h][1]), "=r"(a[h][2]), "=r"(a[h][3])
                     : "r"(la + h * 16 * pitch + cb));
#pragma unroll
      for (int i = 0; i < (NT + 15) / 16; ++i) {
        u32 bl[2], bh[2];  // tokens 16 i .. + 7 and + 8 .. + 15: the B fragments (columns + 0 / + 8)
        if (NT == 8) {
          asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];" : "=r"(bl[0]), "=r"(bl[1])
                       : "r"(xa + cb));
        } else {
          asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                       : "=r"(bl[0]), "=r"(bl[1]), "=r"(bh[0]), "=r"(bh[1]) : "r"(xa + i * 16 * pitch + cb));
        }
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          mma16816<BF16>(acc[h][(2 * i) % (NT / 8)], a[h], bl);
          if (NT > 8) mma16816<BF16>(acc[h][(2 * i + 1) % (NT / 8)], a[h], bh);
        }
      }
    }
    __syncthreads();  // the products before the next pass overwrites the tile and X (or the sums below, the tile)
  }
  // the warps' sums in shared memory (over the tile: 8 warps x 2 NT 4 x 32 floats, within 32 pitch bytes), then
  // summed in warp order: acc[h][j][e] is row rank 16 h + lane / 4 (+ 8 for e >= 2), token 8 j + 2 (lane % 4) (+1
  // for odd e)
  constexpr int NV = 2 * (NT / 8) * 4;
  float* red = reinterpret_cast<float*>(drt_smem);
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int j = 0; j < NT / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) red[((warp * NV) + (h * (NT / 8) + j) * 4 + e) * 32 + lane] = acc[h][j][e];
  __syncthreads();
  for (int o = tid; o < NV * 32; o += 32 * DRTM_WARPS) {
    const int idx = o >> 5, ln = o & 31, h = idx / ((NT / 8) * 4), j = (idx >> 2) % (NT / 8), e = idx & 3;
    const int rank = 16 * h + (ln >> 2) + 8 * (e >> 1), t = 8 * j + 2 * (ln & 3) + (e & 1);
    const int r = perm[rank];
    if (r < 0 || t >= N) continue;
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < DRTM_WARPS; ++w) v += red[(w * NV + idx) * 32 + ln];
    ws[((long long)s * N + t) * M + r] = v;
  }
}
#define DR_TMMA_ARGS                                                                                            \
  const int *__restrict__ data, const int *__restrict__ offsets, const u16 *__restrict__ x, float *__restrict__ ws, \
      int S, int N, int K, int M, int slices, int band
#define INSTANTIATE_DR_TMMA(NAME, BF16, NT)                                                                     \
  extern "C" __global__ void __launch_bounds__(32 * DRTM_WARPS, 2) delta_rows_spmm_##NAME##_tmma##NT(DR_TMMA_ARGS) { \
    delta_rows_tmma_body<BF16, NT, false, DRTM_AHEAD>(data, offsets, x, ws, S, N, K, M, slices, band);         \
  }
INSTANTIATE_DR_TMMA(f16, false, 8)
INSTANTIATE_DR_TMMA(f16, false, 16)
INSTANTIATE_DR_TMMA(f16, false, 32)
INSTANTIATE_DR_TMMA(bf16, true, 8)
INSTANTIATE_DR_TMMA(bf16, true, 16)
INSTANTIATE_DR_TMMA(bf16, true, 32)
#define INSTANTIATE_DR_TMMA_CODED(NT)                                                                           \
  extern "C" __global__ void __launch_bounds__(32 * DRTM_WARPS, 2) delta_rows_spmm_bf16_tmma##NT##c(DR_TMMA_ARGS) {  \
    delta_rows_tmma_body<true, NT, true, DRTM_AHEAD>(data, offsets, x, ws, S, N, K, M, slices, band);          \
  }
INSTANTIATE_DR_TMMA_CODED(8)
INSTANTIATE_DR_TMMA_CODED(16)
INSTANTIATE_DR_TMMA_CODED(32)

// delta_rows_reduce_<dtype>: y[t][m] from the _nt kernels' partials ws[s][t][m] (M weight rows, N tokens), summed in
// split order, 16 splits' loads in flight; one thread an output.  mode (DR_RESID, DR_SILU) as the _n1 kernel's, with
// its rounding steps: + bias; DR_RESID: added into Y; DR_SILU (a paired weight, M even, no bias): silu(g) u of rows m
// and m + M / 2, written to y[t][m] (M / 2 outputs a token).
template <bool BF16>
DEVI void delta_rows_reduce_body(const float* __restrict__ ws, u16* __restrict__ y, const u16* __restrict__ bias,
                                 int S, int N, int M, int mode) {
  pdl_launch_dependents();
  pdl_wait();  // the _nt kernel's partials
  const bool silu = mode & DR_SILU;
  const int mo = silu ? M / 2 : M;
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= (long long)N * mo) return;
  const int t = (int)(i / mo), m = (int)(i % mo);
  const float* p = ws + (long long)t * M + m;
  const long long stride = (long long)N * M;
  float v = 0.f, u = 0.f;
  for (int s0 = 0; s0 < S; s0 += 16) {
    float a[16], b[16];
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      const bool in = s0 + j < S;
      a[j] = in ? __ldcg(p + (s0 + j) * stride) : 0.f;
      b[j] = in && silu ? __ldcg(p + (s0 + j) * stride + mo) : 0.f;
    }
#pragma unroll
    for (int j = 0; j < 16; ++j)
      if (s0 + j < S) {
        v += a[j];
        u += b[j];
      }
  }
  dr_nt_store1<BF16>(v, u, bias && !silu ? to_float<BF16>(bias[m]) : 0.f, m, t, M, y, mode);
}
extern "C" __global__ void __launch_bounds__(256, 4) delta_rows_reduce_f16(const float* __restrict__ ws,
    u16* __restrict__ y, const u16* __restrict__ bias, int S, int N, int M, int mode) {
  delta_rows_reduce_body<false>(ws, y, bias, S, N, M, mode);
}
extern "C" __global__ void __launch_bounds__(256, 4) delta_rows_reduce_bf16(const float* __restrict__ ws,
    u16* __restrict__ y, const u16* __restrict__ bias, int S, int N, int M, int mode) {
  delta_rows_reduce_body<true>(ws, y, bias, S, N, M, mode);
}

// delta_rows_to_dense: the nonzeros of split s of slices into the zeroed out[M][K], one warp a slice (grid
// (ceil(slices / warps), S), blockDim 32 warps). `coded`: 0, or the values are coded (dr_decode_coded) and it is the
// lanes a row. Each lane gathers its row's values in 16-element chunks (32-byte sectors, by element index) and writes a
// chunk whole (zeros included, two 16-byte stores) where it lies between the lane's first nonzero of the split and a
// later one: those columns of the row are the lane's alone (a lane's entries are split by groups and a row's parts by
// columns, so they are disjoint runs in column order). Its first and last chunks store their nonzeros one by one.
// The next group's loads are issued before this group's stores. Session 59 (H200, 80 %, OPT-30B / Llama-3-8B layer
// shapes, benchmarks/dr_expand.py): 750-820 GB/s of dense bytes, 2-3x the one-store-a-nonzero kernel's 260-400.
//
// delta_rows_to_dense_nf (session 61, kernels.DR_DENSE_NOFILL, on since session 63): into an out that need not be
// zeroed (the zero fill took 126 of OPT-30B fc1's 512 us). Every element of out is written once, zeros included, by
// the lane and split that own its column: in the split layout split s owns the row's columns start_s + 1 ..
// start_{s + 1} (start_s is the column of split s - 1's last entry, so split s's nonzeros lie inside; the split of
// the slice's first group from column 0, splits before it (more splits than groups) nothing, the last split to K - 1;
// a lane without entries has the splits' window starts, which rise with s); in the
// parts layout part p owns start_p .. (the next part with entries' start) - 1 (part 0 from column 0, the last such
// part to K - 1; a part p >= 1 of start 0 has no entries, since the row's first nonzero is part 0's). A chunk inside
// the lane's columns is written whole, a chunk at their ends element by element (only its owned elements), the chunks
// between two of the lane's nonzeros as zeros. benchmarks/diag/dr_dense_emulate.py checks the cover on the CPU.
DEVI void dr_dense_flush(u16* out, long long q, const u32 (&b)[8], bool whole) {
  if (whole) {
    uint4* o = reinterpret_cast<uint4*>(out + q * 16);
    o[0] = make_uint4(b[0], b[1], b[2], b[3]);
    o[1] = make_uint4(b[4], b[5], b[6], b[7]);
    return;
  }
#pragma unroll
  for (int t = 0; t < 8; ++t) {
    if (b[t] & 0xffffu) out[q * 16 + 2 * t] = (u16)b[t];
    if (b[t] >> 16) out[q * 16 + 2 * t + 1] = (u16)(b[t] >> 16);
  }
}
// (_nf) chunk q of out, its elements e0 .. e1 only: whole where it lies inside them, else element by element
DEVI void dr_dense_flush_owned(u16* out, long long q, const u32 (&b)[8], long long e0, long long e1) {
  if (q * 16 >= e0 && q * 16 + 15 <= e1) {
    dr_dense_flush(out, q, b, true);
    return;
  }
#pragma unroll
  for (int t = 0; t < 16; ++t) {
    const long long e = q * 16 + t;
    if (e >= e0 && e <= e1) out[e] = (u16)(b[t >> 1] >> (16 * (t & 1)));
  }
}
// The elements e0 .. e1 of out that a lane of delta_rows_to_dense_nf / _nft writes (none: e0 = 0, e1 = -1): its row's
// columns by the ownership rule above (`col`: the lane's start; g0 .. g1: its split's groups).  With parts > 1 the
// lanes of a row exchange their starts by shuffles, so every lane of the warp calls it.
DEVI void dr_dense_owned(const int* offsets, int slices, int S, int slice, int s, int lane, int row, int col, int g0,
                         int g1, int K, int parts, long long& e0, long long& e1) {
  int lo, hi;
  if (parts > 1) {  // (warp-uniform: every lane takes part in the shuffles)
    const int p = lane & (parts - 1);
    const int mine = p == 0 || col > 0 ? col : 0x7fffffff;  // the part's first column, or none (no entries)
    const int up = __shfl_down_sync(0xffffffffu, mine, 1);
    int nxt = p + 1 < parts ? up : 0x7fffffff;
    for (int off = 1; off < parts; off <<= 1) {  // the smallest first column of the row's later parts
      const int o = __shfl_down_sync(0xffffffffu, nxt, off);
      if (p + off < parts) nxt = min(nxt, o);
    }
    lo = p == 0 ? 0 : col;
    hi = mine == 0x7fffffff ? -1 : nxt == 0x7fffffff ? K - 1 : nxt - 1;
  } else {  // (a split before the slice's first group owns nothing: the split of its first group owns column 0)
    lo = g0 == 0 ? 0 : col + 1;
    hi = s + 1 < S ? (g1 == 0 ? -1 : dr_start(offsets, slices, S, slice, s + 1, lane)) : K - 1;
  }
  e0 = 0;
  e1 = -1;
  if (row >= 0 && lo <= hi) {
    const long long rowbase = (long long)row * K;
    e0 = rowbase + lo;
    e1 = rowbase + hi;
  }
}
// A lane of an expansion kernel: its split's groups g0 .. g1 of the slice's stream at `base` (`gw` ints a group), its
// row (-1: none) and the element where that row starts in out, the column before its first entry, its coded values'
// table (`coded`: the lanes a row, or 0).
struct DrDenseLane {
  int g0, g1, row, col, gw;
  const int* base;
  uint2 lut;
  long long rowbase;
};
DEVI DrDenseLane dr_dense_lane(const int* data, const int* offsets, int K, int S, int coded, int slices, int slice,
                               int s, int lane) {
  DrDenseLane l;
  int goff;
  dr_split(offsets, slice, s, S, goff, l.g0, l.g1);
  l.row = dr_perm(offsets, slices, S)[slice * 32 + lane];
  l.col = dr_start(offsets, slices, S, slice, s, lane);
  l.gw = coded ? 128 : 160;
  l.base = data + (long long)goff * l.gw;
  l.lut = coded ? dr_lut(data, offsets, slices, (slice * 32 + lane) / coded) : make_uint2(0, 0);
  l.rowbase = (long long)max(l.row, 0) * K;
  return l;
}
// Group g of a lane: its 8 values as stored (coded: not yet decoded) and, plain, its 8 column steps.  A coded group's
// steps are its word v.w, which the caller takes where it uses the group (dr_dense_steps): taken here, the copy waits
// for the load at once, and _nf's next group was then never in flight during the walk of the current one (the shape
// session 70 found in dr_place; benchmarks/diag/sass_load_use.py lists it).
DEVI void dr_dense_load(const int* base, int g, int gw, int lane, int coded, uint4& v, u32& d) {
  v = __ldg(reinterpret_cast<const uint4*>(base + (long long)g * gw + 4 * lane));
  if (!coded) d = (u32)__ldg(base + (long long)g * 160 + 128 + lane);
}
DEVI u32 dr_dense_steps(const uint4& v, u32 d, int coded) { return coded ? v.w : d; }
template <bool NOFILL>
DEVI void dr_dense_body(const int* __restrict__ data, const int* __restrict__ offsets, u16* __restrict__ out, int K,
                        int S, int coded, int slices, int parts) {
  const int lane = threadIdx.x & 31, slice = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), s = blockIdx.y;
  if (slice >= slices) return;
  auto [g0, g1, row, col, gw, base, lut, rowbase] = dr_dense_lane(data, offsets, K, S, coded, slices, slice, s, lane);
  long long e0 = 0, e1 = -1;  // NOFILL: the elements of out this lane writes (its row's owned columns)
  if (NOFILL) dr_dense_owned(offsets, slices, S, slice, s, lane, row, col, g0, g1, K, parts, e0, e1);
  uint4 v = make_uint4(0, 0, 0, 0);
  u32 d = 0;
  if (g0 < g1) dr_dense_load(base, g0, gw, lane, coded, v, d);
  long long cur = -1, first = -1;  // the chunk being gathered; the first nonzero's element
  bool from_first = false;         // whether that chunk starts at or after the first nonzero
  u32 b[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  const u32 zero[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int g = g0; g < g1; ++g) {
    uint4 vn = make_uint4(0, 0, 0, 0);
    u32 dn = 0;
    if (g + 1 < g1) dr_dense_load(base, g + 1, gw, lane, coded, vn, dn);
    d = dr_dense_steps(v, d, coded);
    if (coded) v = dr_decode_coded(v, lut);
    const u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      col += (d >> (4 * k)) & 15;
      const u16 h = (u16)(w[k >> 1] >> (16 * (k & 1)));
      if (row >= 0 && (h & 0x7fff)) {
        const long long e = rowbase + col, q = e >> 4;
        if (first < 0) first = e;
        if (q != cur) {
          if (NOFILL) {  // the chunk gathered, then zeros up to this one (the lane's columns between)
            if (cur >= 0) dr_dense_flush_owned(out, cur, b, e0, e1);
            for (long long z = cur >= 0 ? cur + 1 : e0 >> 4; z < q; ++z) dr_dense_flush_owned(out, z, zero, e0, e1);
          } else if (cur >= 0) {
            dr_dense_flush(out, cur, b, from_first);  // (an entry past its end: covered)
          }
#pragma unroll
          for (int j = 0; j < 8; ++j) b[j] = 0;
          cur = q;
          from_first = first <= (q << 4);
        }
        const int j = (int)(e & 15);
        const u32 sh = (u32)h << (16 * (j & 1));
#pragma unroll
        for (int t = 0; t < 8; ++t) b[t] |= (j >> 1) == t ? sh : 0u;
      }
    }
    v = vn;
    d = dn;
  }
  if (NOFILL) {  // the last chunk gathered, then zeros to the lane's last column
    if (cur >= 0) dr_dense_flush_owned(out, cur, b, e0, e1);
    if (e0 <= e1)
      for (long long z = cur >= 0 ? cur + 1 : e0 >> 4; z <= e1 >> 4; ++z) dr_dense_flush_owned(out, z, zero, e0, e1);
  } else if (cur >= 0) {
    dr_dense_flush(out, cur, b, false);
  }
}
// delta_rows_to_dense_nft (session 63): the _nf kernel's ownership, written through shared memory.  Each lane owns the
// elements e0 .. e1 of out (its row's owned columns, as _nf) and walks them in tiles of DRT_COLS elements from
// e0 rounded down to 8: per tile it zeroes its tile row in shared memory, stores its nonzeros of the tile there (the
// group's values and steps shifted out as they are taken: no indexing by entry), and then the warp writes 4 lanes'
// tiles an instruction, 8 lanes a tile, 16 bytes a lane: whole 128-byte lines where a lane owns the tile's elements,
// element by element at its two ends.  The _nf kernel writes 32 rows a store, 32 bytes each, its lanes flushing at
// different entries (about 1.1-1.2 TB/s of dense bytes on an H200).
constexpr int DRT_COLS = 64;             // elements a lane's tile (128 bytes)
constexpr int DRT_STRIDE = DRT_COLS + 8;  // 16-bit words a lane's tile row (144 bytes: a lane's 16-byte quads rotate)
constexpr int DRT_WARPS = 4;             // the most warps a block (kernels.DR_DENSE_T_WARPS)
DEVI void dr_dense_group(const int* base, int g, int gw, int lane, int coded, uint2 lut, uint4& v, u32& d) {
  dr_dense_load(base, g, gw, lane, coded, v, d);
  d = dr_dense_steps(v, d, coded);
  if (coded) v = dr_decode_coded(v, lut);
}
// PF (delta_rows_to_dense_nftp, session 64): a lane asks for its next group by cp.async into a ring of two slots in
// shared memory when it moves on to a group, so the load has a group of the walk to arrive; without PF a lane loads
// each group when it reaches it and waits for it there.  (The next group kept in registers instead gained nothing:
// ptxas copied the loaded registers right after the load, which waits for it.)
template <bool PF>
DEVI void dr_dense_tiled_body(const int* __restrict__ data, const int* __restrict__ offsets, u16* __restrict__ out,
                              int K, int S, int coded, int slices, int parts) {
  __shared__ __align__(16) u16 tile[DRT_WARPS][32 * DRT_STRIDE];
  __shared__ long long own_0[DRT_WARPS][32], own_1[DRT_WARPS][32];
  // (PF) group g's values in slot g & 1, and (plain values) its steps; one element without PF
  __shared__ __align__(16) uint4 ring_v[PF ? DRT_WARPS : 1][PF ? 2 : 1][PF ? 32 : 1];
  __shared__ u32 ring_d[PF ? DRT_WARPS : 1][PF ? 2 : 1][PF ? 32 : 1];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, s = blockIdx.y;
  const int slice = blockIdx.x * (blockDim.x >> 5) + warp;
  if (slice >= slices) return;  // (warp-uniform; no block barrier below)
  auto [g0, g1, row, col, gw, base, lut, rowbase] = dr_dense_lane(data, offsets, K, S, coded, slices, slice, s, lane);
  long long e0, e1;  // the lane's owned elements (as delta_rows_to_dense_nf)
  dr_dense_owned(offsets, slices, S, slice, s, lane, row, col, g0, g1, K, parts, e0, e1);
  const bool owns = e0 <= e1;
  const long long b0 = e0 & ~7LL;  // the lane's first tile (16-byte aligned)
  own_0[warp][lane] = e0;
  own_1[warp][lane] = e1;
  // the walk: the next entry's column `nc` (INT_MAX: none), its value in the low half of v.x
  uint4 v = make_uint4(0, 0, 0, 0);
  u32 d = 0;
  int g = g0, k = 0;
  // (PF) ask for group h into its slot: one cp.async group a call
  auto ask = [&, base = base, gw = gw](int h) {  // (structured bindings are captured by copy in C++17)
    cp_async16(smem_addr(&ring_v[PF ? warp : 0][h & 1][lane]), base + (long long)h * gw + 4 * lane);
    if (!coded)
      asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(smem_addr(&ring_d[PF ? warp : 0][h & 1][lane])),
                   "l"(base + (long long)h * 160 + 128 + lane));
    cp_async_commit();
  };
  if (owns && g < g1) {
    dr_dense_group(base, g, gw, lane, coded, lut, v, d);
    if (PF && g + 1 < g1) ask(g + 1);
  }
  int nc = owns && g < g1 ? col + (int)(d & 15u) : 0x7fffffff;
  u16* const mine = tile[warp] + lane * DRT_STRIDE;
  const u16* const tw = tile[warp];
  for (long long t0 = 0;; t0 += DRT_COLS) {
    const long long tb = b0 + t0;  // this lane's tile: elements tb .. tb + DRT_COLS - 1
    if (!__any_sync(0xffffffffu, owns && tb <= e1)) break;
#pragma unroll
    for (int i = 0; i < DRT_COLS / 8; ++i) reinterpret_cast<uint4*>(mine)[i] = make_uint4(0, 0, 0, 0);
    const int end = (int)min(tb + DRT_COLS - rowbase, (long long)0x7fffffff);  // the tile's end as a column
    while (true) {
      const bool take = nc < end;
      if (!__any_sync(0xffffffffu, take)) break;
      if (take) {
        col = nc;
        const u16 h = (u16)v.x;
        if (h & 0x7fff) mine[rowbase + col - tb] = h;
        v.x = __funnelshift_r(v.x, v.y, 16);
        v.y = __funnelshift_r(v.y, v.z, 16);
        v.z = __funnelshift_r(v.z, v.w, 16);
        v.w >>= 16;
        d >>= 4;
        if (++k == 8) {
          k = 0;
          if (++g < g1) {
            if (PF) {  // (the slot asked for a group ago; the other slot, group g - 1's, is free for g + 1)
              cp_async_wait<0>();
              v = ring_v[warp][g & 1][lane];
              d = coded ? v.w : ring_d[warp][g & 1][lane];
              if (coded) v = dr_decode_coded(v, lut);
              if (g + 1 < g1) ask(g + 1);
            } else {
              dr_dense_group(base, g, gw, lane, coded, lut, v, d);
            }
          }
        }
        nc = g < g1 ? col + (int)(d & 15u) : 0x7fffffff;
      }
    }
    __syncwarp();
#pragma unroll 2
    for (int j = 0; j < 8; ++j) {  // lanes 8 i .. 8 i + 7 write lane 4 j + i's tile, 16 bytes each
      const int src = 4 * j + (lane >> 3), c = (lane & 7) * 8;
      const long long a = own_0[warp][src], z = own_1[warp][src], e = (a & ~7LL) + t0 + c;
      if (e > z || e + 7 < a) continue;
      const uint4 q = *reinterpret_cast<const uint4*>(tw + src * DRT_STRIDE + c);
      if (e >= a && e + 7 <= z) {
        *reinterpret_cast<uint4*>(out + e) = q;
      } else {
        const u32 w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
        for (int i = 0; i < 8; ++i)
          if (e + i >= a && e + i <= z) out[e + i] = (u16)(w[i >> 1] >> (16 * (i & 1)));
      }
    }
    __syncwarp();
  }
  if (PF) cp_async_wait<0>();  // (a group asked for past the lane's last owned column: landed before the block ends)
}
extern "C" __global__ void __launch_bounds__(32 * DRT_WARPS) delta_rows_to_dense_nft(const int* __restrict__ data,
    const int* __restrict__ offsets, u16* __restrict__ out, int K, int S, int coded, int slices, int parts) {
  dr_dense_tiled_body<false>(data, offsets, out, K, S, coded, slices, parts);
}
extern "C" __global__ void __launch_bounds__(32 * DRT_WARPS) delta_rows_to_dense_nftp(const int* __restrict__ data,
    const int* __restrict__ offsets, u16* __restrict__ out, int K, int S, int coded, int slices, int parts) {
  dr_dense_tiled_body<true>(data, offsets, out, K, S, coded, slices, parts);
}
// delta_rows_to_dense_pr (session 68, kernels.DR_DENSE_ROWS, the default since session 69): the parts layout (P >= 2
// lanes a row, one split) expanded a slice a block, through a tile of the slice's 32 / P whole rows in shared memory.
// The _nf kernels walk each lane's entries one after another (a column sum, a branch to flush a chunk, 16-byte stores
// of 32 rows a warp store) and write 0.7-1.1 TB/s of dense bytes; here the 8 warps of a block take 8 consecutive groups
// at a time (warp w group c * 8 + w of every lane: one coalesced 512- or 640-byte load a warp), so a lane's entries are
// placed in parallel: each thread sums its group's 8 steps, the 8 warps post the sums (double-buffered by chunk, one
// barrier a chunk), and each thread adds those of the warps before it to its lane's running column (kept by every
// thread of the lane: it reads the chunk's 8 sums anyway).  Its nonzeros go into the zeroed tile (16-bit stores), and
// once every group is placed the block writes its rows whole, 16 bytes a thread, consecutive threads consecutive
// bytes.  Padding ranks (row -1) are placed nowhere and written nowhere.  `coded`: 0, or the lanes a row (the values
// coded, dr_decode_coded).  Session 69: a block takes the columns b0 .. b0 + nb - 1 of its slice's rows, b0 =
// blockIdx.y band (grid.y = K / band rounded up, band a multiple of 8; band = K: whole rows, the default), walking all
// the slice's groups and placing the band's nonzeros: a smaller tile for more blocks an SM
// (kernels.DR_DENSE_ROWS_BAND).
// Dynamic shared memory: (32 / P) band 2 bytes (the launcher keeps it within kernels.DR_DENSE_ROWS_SMEM).
// benchmarks/diag/dr_dense_emulate.py (emulate_rows) runs these steps on the CPU.
template <int AHEAD, bool RANGES = false>
DEVI void dr_dense_pr_body(const int* __restrict__ data, const int* __restrict__ offsets, u16* __restrict__ out, int K,
                           int coded, int slices, int parts, int band) {
  extern __shared__ __align__(16) unsigned char drp_smem[];
  __shared__ int sums[2][DRP_WARPS][32];
  u16* tile = reinterpret_cast<u16*>(drp_smem);
  const int tid = threadIdx.x, lane = tid & 31, slice = blockIdx.x;
  const int rows = 32 / parts, rl = lane / parts;  // the slice's rows; this lane's row in the tile
  const int b0 = blockIdx.y * band, nb = min(band, K - b0);  // the block's columns
  const int goff = offsets[slice], G = offsets[slice + 1] - goff;
  const int* perm = dr_perm(offsets, slices, 1);
  const int row = perm[slice * 32 + lane];
  const int gw = coded ? 128 : 160;
  const uint2 lut = coded ? dr_lut(data, offsets, slices, (slice * 32 + lane) / coded) : make_uint2(0, 0);
  const int start = dr_start(offsets, slices, 1, slice, 0, lane);  // the lane's column before its first group
  const int k8 = nb >> 3;  // 16-byte words a tile row (K % 8 == 0 in the parts layout)
  for (int i = tid; i < rows * k8; i += 32 * DRP_WARPS) reinterpret_cast<uint4*>(tile)[i] = make_uint4(0, 0, 0, 0);
  dr_place_any<AHEAD, false, RANGES>(data + (long long)goff * gw, G, gw, coded, lut, start, row, tile + rl * nb, b0, nb,
                                     sums);
  __syncthreads();
  for (int i = tid; i < rows * k8; i += 32 * DRP_WARPS) {
    const int r = i / k8, q = i - r * k8;
    const int orow = perm[slice * 32 + r * parts];
    if (orow >= 0)
      reinterpret_cast<uint4*>(out + (long long)orow * K + b0)[q] = reinterpret_cast<const uint4*>(tile)[i];
  }
}
// delta_rows_to_dense_pr: launch bounds (256, 8), 32 registers, as session 69 timed it, so that 8 blocks of small
// tiles fit an SM; _pr4 (session 70, kernels.DR_PLACE_AHEAD): 4 chunks of groups in flight, for the large tiles (gate /
// up's 64 KiB: three blocks an SM whatever the registers)
extern "C" __global__ void __launch_bounds__(32 * DRP_WARPS, 8) delta_rows_to_dense_pr(const int* __restrict__ data,
    const int* __restrict__ offsets, u16* __restrict__ out, int K, int coded, int slices, int parts, int band) {
  dr_dense_pr_body<1>(data, offsets, out, K, coded, slices, parts, band);
}
extern "C" __global__ void __launch_bounds__(32 * DRP_WARPS, 3) delta_rows_to_dense_pr4(const int* __restrict__ data,
    const int* __restrict__ offsets, u16* __restrict__ out, int K, int coded, int slices, int parts, int band) {
  dr_dense_pr_body<4>(data, offsets, out, K, coded, slices, parts, band);
}
// _prw (session 70, kernels.DR_PLACE_RANGES): the placement by ranges of groups a warp (dr_place_ranges), 2 ahead
extern "C" __global__ void __launch_bounds__(32 * DRP_WARPS, 5) delta_rows_to_dense_prw(const int* __restrict__ data,
    const int* __restrict__ offsets, u16* __restrict__ out, int K, int coded, int slices, int parts, int band) {
  dr_dense_pr_body<2, true>(data, offsets, out, K, coded, slices, parts, band);
}
// delta_rows_to_dense_sr (session 69, kernels.DR_DENSE_SPLIT_ROWS): the split layout (one lane a row, S splits)
// expanded as _pr expands the parts layout, a block a (slice, split), so that OPT's weights and Llama's down (K > 4096)
// leave _nf's serial walks too.  The split's lanes visit only its window's columns a0 .. a0 + w - 1 (the encoder's
// win[slice][s]), so the tile holds the slice's 32 rows over a band of `band` window columns (dynamic shared memory,
// 32 band 2 bytes; a window wider than the band takes more passes, each walking the split's groups again and keeping
// the band's nonzeros).  Each pass: the tile zeroed; the 8 warps place 8 groups at a time as _pr does (warp w group
// c * 8 + w of every lane, the step sums posted double-buffered, one barrier a chunk); then every lane's owned
// columns within the band are written from the tile, 16 bytes a thread, consecutive threads consecutive bytes (an
// edge chunk element by element).  Ownership is _nf's (dr_dense_owned): lane l of split s owns start_s + 1 ..
// start_{s + 1}, inside the window, except that the split of the slice's first group owns from column 0 (its window
// starts at 0) and the last split up to K - 1: after the passes it writes the zeros past its window (whole chunks:
// a0 + w and K are multiples of 8).  K % 8 == 0 (the launcher's condition).  `coded`: 0, or 1 (the values coded).
// benchmarks/diag/dr_dense_emulate.py (emulate_split_rows) runs these steps on the CPU.
DEVI void drs_put(u16* orow, int c0, uint4 v, int lo, int hi) {  // chunk c0 .. c0 + 7 of a row, its owned columns
  if (c0 >= lo && c0 + 7 <= hi) {
    *reinterpret_cast<uint4*>(orow + c0) = v;
    return;
  }
  if (c0 + 7 < lo || c0 > hi) return;
  const u32 b[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int t = 0; t < 8; ++t)
    if (c0 + t >= lo && c0 + t <= hi) orow[c0 + t] = (u16)(b[t >> 1] >> (16 * (t & 1)));
}
template <int AHEAD, bool SKIP, bool RANGES = false>
DEVI void dr_dense_sr_body(const int* __restrict__ data, const int* __restrict__ offsets, u16* __restrict__ out, int K,
                           int S, int coded, int slices, int band) {
  extern __shared__ __align__(16) unsigned char drs_smem[];
  __shared__ int sums[2][DRP_WARPS][32];
  __shared__ int own_lo[32], own_hi[32], own_row[32];
  u16* tile = reinterpret_cast<u16*>(drs_smem);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, slice = blockIdx.x, s = blockIdx.y;
  int goff, g0, g1;
  dr_split(offsets, slice, s, S, goff, g0, g1);
  const int row = dr_perm(offsets, slices, S)[slice * 32 + lane];
  const int start = dr_start(offsets, slices, S, slice, s, lane);  // the lane's column before the split
  const int* win = dr_win(offsets, slices, S, slice, s);
  const int a0 = win[0], w = win[1];
  if (warp == 0) {  // the lane's owned columns lo .. hi (none: hi < lo), as dr_dense_owned
    const int lo = g0 == 0 ? 0 : start + 1;
    const int hi = row < 0 ? -1 : s + 1 < S ? (g1 == 0 ? -1 : dr_start(offsets, slices, S, slice, s + 1, lane)) : K - 1;
    own_lo[lane] = lo;
    own_hi[lane] = hi;
    own_row[lane] = row;
  }
  const int gw = coded ? 128 : 160, G = g1 - g0;
  const uint2 lut = coded ? dr_lut(data, offsets, slices, slice * 32 + lane) : make_uint2(0, 0);
  const int* gbase = data + (long long)(goff + g0) * gw;
  for (int b0 = 0; b0 < w; b0 += band) {  // window columns a0 + b0 .. a0 + b0 + nb - 1
    const int nb = min(band, w - b0), nb8 = nb >> 3, c0 = a0 + b0;
    for (int i = tid; i < 32 * nb8; i += 32 * DRP_WARPS) reinterpret_cast<uint4*>(tile)[i] = make_uint4(0, 0, 0, 0);
    dr_place_any<AHEAD, SKIP, RANGES>(gbase, G, gw, coded, lut, start, row, tile + lane * nb, c0, nb, sums);
    __syncthreads();  // (also orders own_* and, without groups, the zeroing before the writes)
    for (int i = tid; i < 32 * nb8; i += 32 * DRP_WARPS) {
      const int r = i / nb8, q = i - r * nb8, orow = own_row[r];
      if (orow >= 0)
        drs_put(out + (long long)orow * K, c0 + 8 * q, reinterpret_cast<const uint4*>(tile)[i], own_lo[r], own_hi[r]);
    }
    __syncthreads();  // (before the next pass zeroes the tile)
  }
  if (s + 1 == S) {  // the last split: its rows' zeros past the window
    __syncthreads();  // (own_*: a window is never empty, so a pass's barriers ordered them already)
    const int t0 = a0 + w, t8 = (K - t0) >> 3;
    for (int i = tid; i < 32 * t8; i += 32 * DRP_WARPS) {
      const int r = i / t8, q = i - r * t8, orow = own_row[r];
      if (orow >= 0) drs_put(out + (long long)orow * K, t0 + 8 * q, make_uint4(0, 0, 0, 0), own_lo[r], own_hi[r]);
    }
  }
}
// delta_rows_to_dense_sr (AHEAD 1, as session 69 measured it), _sr4 (session 70: 4 chunks of groups in flight,
// kernels.DR_PLACE_AHEAD), _srk (session 70: a pass skips the groups outside its band, kernels.DR_PLACE_SKIP; the
// default), _srk4 (both) and _srw (session 70: dr_place_ranges, skipping, 2 ahead; kernels.DR_PLACE_RANGES)
#define INSTANTIATE_DR_DENSE_SR(SUF, AHEAD, SKIP, RANGES)                                                       \
  extern "C" __global__ void __launch_bounds__(32 * DRP_WARPS) delta_rows_to_dense_sr##SUF(                     \
      const int* __restrict__ data, const int* __restrict__ offsets, u16* __restrict__ out, int K, int S, int coded, \
      int slices, int band) {                                                                                   \
    dr_dense_sr_body<AHEAD, SKIP, RANGES>(data, offsets, out, K, S, coded, slices, band);                          \
  }
INSTANTIATE_DR_DENSE_SR(, 1, false, false)
INSTANTIATE_DR_DENSE_SR(4, 4, false, false)
INSTANTIATE_DR_DENSE_SR(k, 1, true, false)
INSTANTIATE_DR_DENSE_SR(k4, 4, true, false)
INSTANTIATE_DR_DENSE_SR(w, 2, true, true)
extern "C" __global__ void __launch_bounds__(128) delta_rows_to_dense(const int* __restrict__ data,
                                                                      const int* __restrict__ offsets,
                                                                      u16* __restrict__ out, int K, int S,
                                                                      int coded, int slices) {
  dr_dense_body<false>(data, offsets, out, K, S, coded, slices, 1);
}
extern "C" __global__ void __launch_bounds__(128) delta_rows_to_dense_nf(const int* __restrict__ data,
                                                                         const int* __restrict__ offsets,
                                                                         u16* __restrict__ out, int K, int S,
                                                                         int coded, int slices, int parts) {
  dr_dense_body<true>(data, offsets, out, K, S, coded, slices, parts);
}
#define INSTANTIATE_WG(NAME, BF16, NB, R, MINB, S, PF, SUF)                                               \
  extern "C" __global__ void __launch_bounds__(128 * R, MINB)                                             \
  tiled_csl_spmm_##NAME##_wg##NB##x##R##SUF(SPMM_ARGS) {                                                  \
    pdl_launch_dependents();                                                                              \
    tiled_csl_wg_body<BF16, NB, R, S, false, PF>(data, offsets, mt, kt, kt_per_split, Problem SPMM_PROBLEM); \
  }
// tiled_csl_spmm_<dtype>_wg<NB>x<R>r: the same with the split-K summed in the launch (spread_sum; mode: 0 or RED_SILU)
#define INSTANTIATE_WGR(NAME, BF16, NB, R, MINB, S, PF, SUF)                                              \
  extern "C" __global__ void __launch_bounds__(128 * R, MINB)                                             \
  tiled_csl_spmm_##NAME##_wg##NB##x##R##SUF##r(SPMM_ARGS, int mode) {                                     \
    pdl_launch_dependents();                                                                              \
    tiled_csl_wg_body<BF16, NB, R, S, true, PF>(data, offsets, mt, kt, kt_per_split, Problem SPMM_PROBLEM,  \
                                               mode);                                                     \
  }
#define INSTANTIATE_WG2(NAME, BF16, NB, R, MINB, S, PF, SUF) \
  INSTANTIATE_WG(NAME, BF16, NB, R, MINB, S, PF, SUF)        \
  INSTANTIATE_WGR(NAME, BF16, NB, R, MINB, S, PF, SUF)
// Both dtypes of one configuration: tokens NB, warpgroups R, blocks an SM MINB, stages S, prefetched rounds PF, and
// the name's variant suffix SUF.
#define INSTANTIATE_WG_DTYPES(NB, R, MINB, S, PF, SUF)   \
  INSTANTIATE_WG2(f16, false, NB, R, MINB, S, PF, SUF)  \
  INSTANTIATE_WG2(bf16, true, NB, R, MINB, S, PF, SUF)
// S = 3 where three stages keep the blocks per SM (wg32x2 would drop from 4 to 3); kernels.wg_stages.
// wg64x2s2: wg64x2 with S = 2 for 4 blocks an SM (49 KiB, 64 registers; wg64x2: 3 blocks of 73 KiB), from density
// kernels.TCSL_WG64_S2_MIN_DENSITY.  wg32x2p3: wg32x2 with three rounds of entries prefetched a tile ahead (PF = 3),
// from density kernels.TCSL_WG32_PF3_MIN_DENSITY; wg32x2p4 four (50 %) from kernels.TCSL_WG32_PF4_MIN_DENSITY
INSTANTIATE_WG_DTYPES(32, 2, 4, 2, 2, )
INSTANTIATE_WG_DTYPES(32, 2, 4, 2, 3, p3)
INSTANTIATE_WG_DTYPES(32, 2, 4, 2, 4, p4)
INSTANTIATE_WG_DTYPES(64, 2, 3, 3, 2, )
INSTANTIATE_WG_DTYPES(64, 2, 4, 2, 2, s2)
INSTANTIATE_WG_DTYPES(128, 2, 2, 3, 2, )
INSTANTIATE_WG_DTYPES(128, 4, 1, 3, 2, )
// bitmap_spmm_<dtype>_wg<NB>: BitmapTiles with warpgroup MMA, A from the decoded registers (sm_90a; from N = 17)
#define INSTANTIATE_BW(NAME, BF16, NB)                                                                    \
  extern "C" __global__ void __launch_bounds__(128, 3) bitmap_spmm_##NAME##_wg##NB(SPMM_ARGS) {            \
    bitmap_wg_body<BF16, NB>(data, offsets, mt, kt, kt_per_split, Problem SPMM_PROBLEM);                   \
  }
INSTANTIATE_BW(f16, false, 8)
INSTANTIATE_BW(f16, false, 16)
INSTANTIATE_BW(f16, false, 32)
INSTANTIATE_BW(f16, false, 64)
INSTANTIATE_BW(f16, false, 128)
INSTANTIATE_BW(bf16, true, 8)
INSTANTIATE_BW(bf16, true, 16)
INSTANTIATE_BW(bf16, true, 32)
INSTANTIATE_BW(bf16, true, 64)
INSTANTIATE_BW(bf16, true, 128)

// ------------------------------------------------------------------------------------------------
// Decode attention: one query token per sequence against a static KV cache, with the cache write, in one launch
// (flash-decoding: the slots are cut into chunks of DA_CHUNK (32 in the `_c32` kernels), one block per (sequence, kv
// head, chunk, group of up to DA_HEADS of the kv head's query heads)).
//   q [B, H, D] (batch stride q_b, heads D apart), the new key and value k_new, v_new [B, Hkv, D] (batch strides
//   k_b, v_b), the cache kc, vc [*, Hkv, slots, D] (contiguous), *slot: where the new key and value go, an additive
//   mask [B, S] (batch stride mask_b; -inf where a query may not look) or null, S: the slots attended (0 .. S - 1).
//   out [B, H, D] = softmax(scale q K^T + mask) V over the H / Hkv query heads of each kv head (grouped-query).
//   With cos, sin [B, D] (batch stride cs_b), q and the new key are rotated first (RoPE, transformers' half-split
//   convention and rounding: rope_val), so the layer needs no RoPE launch of its own.
// - Every block rotates the new key into shared memory (kn); the block of head group 0 whose chunk holds the slot
//   (the last chunk if the slot is past S) writes it and the new value into the cache.  Every block reads that
//   slot's key and value from kn and v_new, never from the cache, so no block waits for another.
// - Before the programmatic wait every thread loads its key rows (the cache is static until this launch writes the
//   slot, whose stale row is replaced from kn), and at batch 1 thread 0 asks L2 for the chunk's value rows.
// - After it a block issues all its other first loads at once, none waiting for another (session 16): the slot, the
//   mask, the new value, the queries, the new key and cos / sin.  The value
//   rows are asked for right after the scores, so they are in flight during the softmax statistics.
//   - scores: two threads per slot, each with half the key row (D / 16 16-byte loads; `_c32`: four threads, a quarter
//     each); dot products with the group's queries (fp32, shared memory), summed over the slot's threads by shuffles;
//     masked slots and slots past S score -inf;
//   - softmax statistics per head by block reduction;
//   - values: thread t takes the 8 columns 8 (t % (D / 8)) .. + 7 of the slots t / (D / 8) + 128 / (D / 8) i
//     (16-byte loads); a slot without weight in any head adds nothing (its row may hold anything), and the slot
//     groups' sums meet in shared memory.
// - With one chunk the block writes out; otherwise it writes (o, m, l) in fp32 to ws, and the last block of its
//   (sequence, kv head, head group) to arrive (an atomic ticket, reset for the next launch) combines them, 32 chunks at
//   a time: warp h weighs head h's chunks (one per lane), then every thread sums its outputs over the group with all
//   the group's loads in flight.  The order is fixed, so the result is deterministic.  A row with every slot masked
//   comes out NaN, as scaled_dot_product_attention's.
// ------------------------------------------------------------------------------------------------
constexpr int DA_THREADS = 128, DA_CHUNK = 64, DA_MAX_REP = 8, DA_HEADS = 4;
constexpr int DA_CLUSTER_MAX = 8;  // the most chunks combined inside a cluster (the portable cluster size)
#define DA_NEG_INF __int_as_float(0xff800000)
static_assert(2 * DA_CHUNK == DA_THREADS, "decode attention: two threads per slot of the chunk");
static_assert(DA_MAX_REP <= 2 * DA_HEADS, "decode attention: at most two head groups (tickets per kv head)");
static_assert(DA_CLUSTER_MAX <= 32, "decode attention: a cluster's chunks are weighed one per lane");

struct DecodeAttn {
  const u16* q;
  const u16* k_new;
  const u16* v_new;
  u16* kc;
  u16* vc;
  const long long* slot;
  const u16* mask;
  u16* out;
  float* ws;
  int* tickets;
  const u16* cos;  // [B, D] (batch stride cs_b) or null: q and the new key are used as they are
  const u16* sin;
  long long q_b, k_b, v_b, mask_b, cs_b;
  int heads, kv_heads, slots, S, splits;
  float scale;
  int cluster;  // 1: launched as clusters of the splits blocks of a (sequence, kv head, head group): they combine there
  const long long* l2;  // (address, bytes) ranges asked of L2 (l2_warm): the next projections' weights, or null
  int l2_n;
  int l2_early;  // 1: asked before the programmatic wait (while the projection before still runs); 0: after it
};

// Thread-block clusters (sm_90): the address of a variable of this block's shared memory in block `rank` of the
// cluster, a load from it, and a barrier of every thread of the cluster (release / acquire: each block's shared
// memory writes before it are seen by the others' reads after it).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
DEVI u32 cluster_addr(const void* p, u32 rank) {
  u32 r;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(smem_addr(p)), "r"(rank));
  return r;
}
DEVI float cluster_ld(u32 addr) {
  float v;
  asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(addr) : "memory");
  return v;
}
DEVI void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}
// The push combine's pieces (decode attention, PUSH): a store into another block's shared memory, and the cluster
// barrier's arrival alone (release: this thread's stores before it are seen by the threads past the phase's wait).
// A thread may exit after its arrival: the barrier's wait waits for the threads that have not exited to arrive.
DEVI void cluster_st(u32 addr, float v) {
  asm volatile("st.shared::cluster.f32 [%0], %1;" ::"r"(addr), "f"(v) : "memory");
}
DEVI void cluster_arrive() { asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory"); }
#endif

// Element d of a D-vector rotated as transformers' apply_rotary_pos_emb does it in the tensors' dtype, from the raw
// element x = v[d], its partner p = v[d + D / 2] (d < D / 2) or v[d - D / 2], and cos / sin at d:
// x * cos + rotate_half(v)[d] * sin, each product and the sum rounded to the dtype (so the cache holds the bits the
// PyTorch path would write).
template <bool BF16>
DEVI float rope_val(u16 x, u16 p, u16 c, u16 s, bool low) {
  const float r = low ? -to_float<BF16>(p) : to_float<BF16>(p);
  const float a = to_float<BF16>(from_float<BF16>(to_float<BF16>(x) * to_float<BF16>(c)));
  const float b = to_float<BF16>(from_float<BF16>(r * to_float<BF16>(s)));
  return to_float<BF16>(from_float<BF16>(a + b));
}

// CHUNK: the slots a block attends, DA_CHUNK (64: two threads a slot's key row) or 32 (four threads a row, half the
// scores' and the values' work a thread, twice the blocks: `_c32`, kernels.DECODE_ATTN_C32, where the grid is small)
// The cluster combines' chunk weights (push and pull alike, the global combine's arithmetic): lane c of a head's warp
// holds chunk c's m and l (-inf and 0 past the chunks); cw[c] = exp(m_c - max m) (0 for a chunk with every slot
// masked) and, from lane 0, cr = sum of cw l.
DEVI void da_weigh(float mj, float lj, int lane, float* cw, float& cr) {
  const float mnew = warp_max(mj);
  const float w = mj == DA_NEG_INF ? 0.f : __expf(mj - mnew);
  cw[lane] = w;
  const float lsum = warp_sum(w * lj);
  if (lane == 0) cr = lsum;
}

// PUSH (`_p`, kernels.DECODE_ATTN_PUSH; launched only as clusters): the cluster's blocks other than rank 0 store their
// chunk's (o, m, l) into rank 0's shared memory (rv, rst), arrive at the cluster barrier and exit without waiting;
// rank 0 alone waits there, then combines from its own shared memory.  Against the pull combine below: no block but
// rank 0 waits for the slowest chunk, no remote loads, and no second barrier for the others' shared memory to outlive
// rank 0's reads.  A first cluster barrier, before the programmatic wait (hidden behind the projection before under
// programmatic launch), sees every block of the cluster started before any stores into another's shared memory.  The
// same weights and order as the pull combine: the same bits.  (Session 76 first had rank 0 wait on an mbarrier that
// the others' threads arrived at remotely: compute-sanitizer's racecheck does not follow an mbarrier across blocks
// and reported every remote store as one into a block that might have exited.)
template <bool BF16, int D, int CHUNK = DA_CHUNK, bool PUSH = false>
DEVI void decode_attn_body(const DecodeAttn a) {
  constexpr int WARPS_DA = DA_THREADS / 32, HALF = D / 2;
  constexpr int TPS = DA_THREADS / CHUNK, QD = D / TPS;  // scores: threads a slot, the dimensions each takes
  constexpr int CG = D / 8, SG = DA_THREADS / CG, PER = CHUNK / SG;  // value phase: column groups, slot groups
  constexpr int QPT = DA_HEADS * D / DA_THREADS;  // query elements per thread (the thread's column d, heads apart)
  static_assert(WARPS_DA == DA_HEADS, "decode attention: the combine gives each head of a group one warp");
  static_assert(DA_THREADS % D == 0, "decode attention: a thread's query elements share one column");
  static_assert(TPS * CHUNK == DA_THREADS && (TPS == 2 || TPS == 4) && PER >= 1, "decode attention: chunk");
  __shared__ __align__(16) float qs[DA_HEADS][D];
  __shared__ float ps[DA_HEADS][CHUNK];
  __shared__ float red[DA_HEADS][WARPS_DA];
  __shared__ __align__(16) float os[SG][DA_HEADS][D];
  __shared__ float stat[2][DA_HEADS];  // the chunk's m and l per head; in the combine, the running max and sum
  __shared__ float cw[DA_HEADS][32];   // the combine: a group of up to 32 chunks' weights, and the running rescale
  __shared__ float cr[DA_HEADS];
  __shared__ __align__(16) u16 kn[D];  // the new key (rotated with cos / sin)
  __shared__ int last;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  __shared__ __align__(16) float rv[PUSH ? DA_CLUSTER_MAX - 1 : 1][DA_HEADS][PUSH ? D : 1];  // PUSH: chunks 1 ..
  __shared__ float rst[PUSH ? DA_CLUSTER_MAX - 1 : 1][2][DA_HEADS];                          // their m and l
#endif
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int bh = blockIdx.x, b = bh / a.kv_heads, kvh = bh % a.kv_heads, split = blockIdx.y, hg = blockIdx.z;
  const int rep = a.heads / a.kv_heads, h0 = hg * DA_HEADS, nh = min(DA_HEADS, rep - h0);
  const int s0 = split * CHUNK;
  const int sl = tid / TPS, part = tid % TPS, s = s0 + sl;  // scores: slot s, dimensions part * QD .. + QD - 1
  const int cg = tid % CG, sg = tid / CG;                 // values: columns 8 cg .. + 7 of slots s0 + sg + SG u
  const int d = tid % D, dp = d < HALF ? d + HALF : d - HALF;  // the thread's query column and its RoPE partner
  // Under kernels.static_weights the kernel is launched programmatically: it waits here for the projection that
  // wrote q, k_new and v_new (and reads nothing before), and lets the next kernel (the o projection, whose blocks only
  // load their weights before their own wait) launch at once.  Both are no-ops for a plain launch.
  pdl_launch_dependents();
  const long long cache0 = ((long long)b * a.kv_heads + kvh) * a.slots * D;
  // At batch 1, the chunk's cached key and value rows (the slot's row among them: stale, replaced below) asked of L2
  // before the wait, so a programmatically launched block streams them while the projection finishes.  Only a hint:
  // L2 is where every write lands, so no block can read a stale line through it.  (Session 19, H200, Llama-3-8B at
  // 80 %: batch 1 2.908 -> 2.884 ms per token; at batch 16, asked by every block, 4.23 -> 4.27 ms, so batch 1 only.)
  if (tid == 0 && s0 < a.S && gridDim.x == a.kv_heads) {
    const u32 bytes = 2u * D * (u32)min(CHUNK, a.S - s0);
    l2_prefetch(a.vc + cache0 + (long long)s0 * D, bytes);
  }
  // The chunk's key rows (static: only this launch writes the cache, at the slot, whose stale row is replaced below
  // from kn), loaded before the wait so their latency hides behind the projection's end.
  uint4 kr[QD / 8];
  {
    const u16* krow = a.kc + cache0 + (long long)s * D + part * QD;
#pragma unroll
    for (int c = 0; c < QD / 8; ++c)
      kr[c] = s < a.S ? *reinterpret_cast<const uint4*>(krow + 8 * c) : make_uint4(0, 0, 0, 0);
  }
  // The next projections' weights asked of L2 (kernels.L2_WARM_MB, session 71): after the wait DRAM has little to do
  // until the o projection starts (this kernel reads about 1 MB of cache at batch 1), so that time can bring in o's
  // weight and the first part of each slice of the MLP's first one.  Static weights: only a hint, nothing to order.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if constexpr (PUSH) cluster_sync();  // every block of the cluster started (before the wait: hidden, under PDL)
#else
  if constexpr (PUSH) __trap();  // (clusters are sm_90's: the launcher never picks a `_p` kernel below it)
#endif
  if (a.l2_early) l2_warm(a.l2, a.l2_n);
  pdl_wait();
  if (!a.l2_early) l2_warm(a.l2, a.l2_n);
  const u16* knew = a.k_new + b * a.k_b + kvh * D;
  const u16* vnew = a.v_new + b * a.v_b + kvh * D;
  const u16* cs = a.cos ? a.cos + b * a.cs_b : nullptr;
  const u16* sn = a.cos ? a.sin + b * a.cs_b : nullptr;
  // Every global load of the block, none waiting for another: the slot, the mask, the key and value rows of the
  // chunk (the slot's too, replaced below: the cache row there is stale), the new value, the queries, the new key and
  // the RoPE tables.  So the block pays one memory latency before it computes.
  const long long slot64 = *a.slot;
  const u16 mraw = s < a.S && a.mask ? a.mask[b * a.mask_b + s] : (u16)0;
  const uint4 vn = *reinterpret_cast<const uint4*>(vnew + 8 * cg);
  u16 qx[QPT], qp[QPT];
#pragma unroll
  for (int j = 0; j < QPT; ++j) {
    const int h = (tid + DA_THREADS * j) / D;
    const u16* qh = a.q + b * a.q_b + (long long)(kvh * rep + h0 + min(h, nh - 1)) * D;
    qx[j] = qh[d];
    qp[j] = cs ? qh[dp] : (u16)0;
  }
  const bool kt = tid < D;  // the threads that rotate the new key, one column each
  const u16 kx = kt ? knew[d] : (u16)0, kp = kt && cs ? knew[dp] : (u16)0;
  const u16 cd = cs ? cs[d] : (u16)0, sd = cs ? sn[d] : (u16)0;

  const int slot = slot64 < 0 || slot64 >= a.slots ? -1 : (int)slot64;  // -1: outside the cache, nothing written
  if (kt) kn[d] = cs ? from_float<BF16>(rope_val<BF16>(kx, kp, cd, sd, d < HALF)) : kx;
#pragma unroll
  for (int j = 0; j < QPT; ++j) {
    const int h = (tid + DA_THREADS * j) / D;
    if (h < nh) qs[h][d] = (cs ? rope_val<BF16>(qx[j], qp[j], cd, sd, d < HALF) : to_float<BF16>(qx[j])) * a.scale;
  }
  const float mk = s < a.S ? (a.mask ? to_float<BF16>(mraw) : 0.f) : DA_NEG_INF;
  const bool live = mk != DA_NEG_INF;
  __syncthreads();  // qs, kn
  if (s == slot)
#pragma unroll
    for (int c = 0; c < QD / 8; ++c) kr[c] = *reinterpret_cast<const uint4*>(kn + part * QD + 8 * c);
  if (hg == 0 && slot >= 0 && split == min(slot / CHUNK, a.splits - 1) && tid < D / 8) {
    *reinterpret_cast<uint4*>(a.kc + cache0 + (long long)slot * D + 8 * tid) =
        *reinterpret_cast<const uint4*>(kn + 8 * tid);
    *reinterpret_cast<uint4*>(a.vc + cache0 + (long long)slot * D + 8 * tid) = vn;  // (cg == tid here)
  }
  float sc[DA_HEADS];
  {
    float acc[DA_HEADS];
#pragma unroll
    for (int h = 0; h < DA_HEADS; ++h) acc[h] = 0.f;
#pragma unroll
    for (int c = 0; c < QD / 8; ++c) {
      float kf[8];
      unpack8<BF16>(kr[c], kf);
#pragma unroll
      for (int h = 0; h < DA_HEADS; ++h)
        if (h < nh) {
          const float4 q0 = *reinterpret_cast<const float4*>(&qs[h][part * QD + 8 * c]);
          const float4 q1 = *reinterpret_cast<const float4*>(&qs[h][part * QD + 8 * c + 4]);
          acc[h] += q0.x * kf[0] + q0.y * kf[1] + q0.z * kf[2] + q0.w * kf[3] + q1.x * kf[4] + q1.y * kf[5] +
                    q1.z * kf[6] + q1.w * kf[7];
        }
    }
#pragma unroll
    for (int h = 0; h < DA_HEADS; ++h) {
      acc[h] += __shfl_xor_sync(FULL_MASK, acc[h], 1);
      if (TPS == 4) acc[h] += __shfl_xor_sync(FULL_MASK, acc[h], 2);
      sc[h] = live ? acc[h] + mk : DA_NEG_INF;
    }
  }
  // the value rows, in flight during the softmax statistics (the key rows' registers are free by now)
  uint4 vv[PER];
#pragma unroll
  for (int u = 0; u < PER; ++u) {
    const int sv = s0 + sg + SG * u;
    vv[u] = sv < a.S ? *reinterpret_cast<const uint4*>(a.vc + cache0 + (long long)sv * D + 8 * cg)
                     : make_uint4(0, 0, 0, 0);
  }
  // softmax statistics of the chunk, per head: m = max, p = exp(score - m) (0 where masked), l = sum p
  float m[DA_HEADS];
#pragma unroll
  for (int h = 0; h < DA_HEADS; ++h) {
    if (h >= nh) break;
    const float wm = warp_max(sc[h]);
    if (lane == 0) red[h][warp] = wm;
  }
  __syncthreads();
#pragma unroll
  for (int h = 0; h < DA_HEADS; ++h) {
    if (h >= nh) break;
    float mm = red[h][0];
#pragma unroll
    for (int w = 1; w < WARPS_DA; ++w) mm = fmaxf(mm, red[h][w]);
    m[h] = mm;
  }
  __syncthreads();  // red is reused for the sums
#pragma unroll
  for (int h = 0; h < DA_HEADS; ++h) {
    if (h >= nh) break;
    const float p = sc[h] == DA_NEG_INF ? 0.f : __expf(sc[h] - m[h]);
    if (part == 0) ps[h][sl] = p;
    const float ws = warp_sum(part == 0 ? p : 0.f);
    if (lane == 0) red[h][warp] = ws;
  }
  __syncthreads();
  if (tid == 0)
#pragma unroll
    for (int h = 0; h < DA_HEADS; ++h)
      if (h < nh) {
        float ll = 0.f;
#pragma unroll
        for (int w = 0; w < WARPS_DA; ++w) ll += red[h][w];
        stat[0][h] = m[h];
        stat[1][h] = ll;
      }

  // values: slots without weight in any head count as zeros (their rows, loaded above, may hold anything)
  float o[DA_HEADS][8];
#pragma unroll
  for (int h = 0; h < DA_HEADS; ++h)
#pragma unroll
    for (int j = 0; j < 8; ++j) o[h][j] = 0.f;
#pragma unroll
  for (int u = 0; u < PER; ++u) {
    const int i = sg + SG * u;
    float any = 0.f;
#pragma unroll
    for (int h = 0; h < DA_HEADS; ++h)
      if (h < nh) any += ps[h][i];
    if (any == 0.f) continue;
    float vf[8];
    unpack8<BF16>(s0 + i == slot ? vn : vv[u], vf);
#pragma unroll
    for (int h = 0; h < DA_HEADS; ++h)
      if (h < nh) {
        const float p = ps[h][i];
#pragma unroll
        for (int j = 0; j < 8; ++j) o[h][j] += p * vf[j];
      }
  }
#pragma unroll
  for (int h = 0; h < DA_HEADS; ++h)
    if (h < nh) {
      *reinterpret_cast<float4*>(&os[sg][h][8 * cg]) = make_float4(o[h][0], o[h][1], o[h][2], o[h][3]);
      *reinterpret_cast<float4*>(&os[sg][h][8 * cg + 4]) = make_float4(o[h][4], o[h][5], o[h][6], o[h][7]);
    }
  __syncthreads();

  // one chunk: out = o / l; else the partials ws[bh][hg][split][h] = (o[0 .. D - 1], m, l)
  const long long bhg = (long long)bh * 2 + hg;  // two head groups at most (DA_MAX_REP <= 2 DA_HEADS)
  float* wb = a.ws + (bhg * a.splits + split) * DA_HEADS * (D + 2);
  u16* ob = a.out + b * (long long)a.heads * D + (long long)(kvh * rep + h0) * D;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const u32 rv0 = PUSH && split > 0 ? cluster_addr(&rv[split - 1][0][0], 0) : 0u;  // rank 0's rows for this chunk
#endif
  for (int i = tid; i < nh * D; i += DA_THREADS) {
    const int h = i / D, dd = i % D;
    float acc = 0.f;
#pragma unroll
    for (int g = 0; g < SG; ++g) acc += os[g][h][dd];
    if (a.splits == 1)  // (a reciprocal: the IEEE division's slow path is a call, which costs a stack frame)
      ob[i] = from_float<BF16>(acc * __frcp_rn(stat[1][h]));
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    else if (PUSH && split > 0)
      cluster_st(rv0 + 4u * (u32)(h * (PUSH ? D : 1) + dd), acc);
#endif
    else if (a.cluster)
      os[0][h][dd] = acc;  // (in place: only this thread reads os[.][h][dd])
    else
      wb[h * (D + 2) + dd] = acc;
  }
  if (a.splits == 1) return;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if constexpr (PUSH) {
    if (split > 0) {  // this chunk's m and l after its o rows, then the arrival (release: after this thread's stores)
      if (tid < nh) {
        cluster_st(cluster_addr(&rst[split - 1][0][tid], 0), stat[0][tid]);
        cluster_st(cluster_addr(&rst[split - 1][1][tid], 0), stat[1][tid]);
      }
      cluster_arrive();
      return;
    }
    cluster_sync();  // every other chunk's rows and statistics are here, and this block's own os[0] (in place above)
    if (warp < nh) {
      const bool in = lane < a.splits;
      const float mj = !in ? DA_NEG_INF : lane == 0 ? stat[0][warp] : rst[lane - 1][0][warp];
      const float lj = !in ? 0.f : lane == 0 ? stat[1][warp] : rst[lane - 1][1][warp];
      da_weigh(mj, lj, lane, cw[warp], cr[warp]);
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < QPT; ++j) {
      const int i = tid + DA_THREADS * j, h = i / D;
      if (h >= nh) continue;
      float num = 0.f;
#pragma unroll
      for (int c = 0; c < DA_CLUSTER_MAX; ++c)
        if (c < a.splits) num += cw[h][c] * (c == 0 ? os[0][h][d] : rv[c - 1][h][PUSH ? d : 0]);
      ob[i] = from_float<BF16>(num * __frcp_rn(cr[h]));
    }
    return;
  }
  if (a.cluster) {  // the cluster's blocks are its chunks, block rank = split; block 0 combines them from their
    // shared memory (os[0], stat) with the global combine's weights and order (the same bits), then every block waits
    // until it has: a block's shared memory must outlive the reads of the others
    cluster_sync();
    if (split == 0) {
      if (warp < nh) {
        const bool in = lane < a.splits;
        const float mj = in ? cluster_ld(cluster_addr(&stat[0][warp], lane)) : DA_NEG_INF;
        const float lj = in ? cluster_ld(cluster_addr(&stat[1][warp], lane)) : 0.f;
        da_weigh(mj, lj, lane, cw[warp], cr[warp]);
      }
      __syncthreads();
#pragma unroll
      for (int j = 0; j < QPT; ++j) {
        const int i = tid + DA_THREADS * j, h = i / D;
        if (h >= nh) continue;
        float v[DA_CLUSTER_MAX];
#pragma unroll
        for (int c = 0; c < DA_CLUSTER_MAX; ++c)
          v[c] = c < a.splits ? cluster_ld(cluster_addr(&os[0][h][d], c)) : 0.f;
        float num = 0.f;
#pragma unroll
        for (int c = 0; c < DA_CLUSTER_MAX; ++c) num += cw[h][c] * v[c];
        ob[i] = from_float<BF16>(num * __frcp_rn(cr[h]));
      }
    }
    cluster_sync();
    return;
  }
#endif
  if (tid < nh) {
    wb[tid * (D + 2) + D] = stat[0][tid];
    wb[tid * (D + 2) + D + 1] = stat[1][tid];
  }
  __syncthreads();  // every thread's chunk results before thread 0's release
  if (tid == 0) last = ticket_acq_rel(a.tickets + bhg) == a.splits - 1;
  __syncthreads();  // (and thread 0's acquire before every thread's loads)
  if (!last) return;
  // The combine, in groups of 32 chunks (online: a later group with a larger max rescales the running sums).  Warp h
  // weighs head h's chunks, one per lane: w = exp(m - M) (0 for a chunk with every slot masked), the running sum
  // l += sum w l; then every thread adds w o over the group for its outputs (h, dd), all of a group's loads in
  // flight together.  The order is fixed, so the result is deterministic.
  const float* w0 = a.ws + bhg * a.splits * DA_HEADS * (D + 2);
  if (tid < DA_HEADS) {
    stat[0][tid] = DA_NEG_INF;
    stat[1][tid] = 0.f;
  }
  float num[QPT];
#pragma unroll
  for (int j = 0; j < QPT; ++j) num[j] = 0.f;
  for (int g0 = 0; g0 < a.splits; g0 += 32) {
    const int n = min(32, a.splits - g0);
    __syncthreads();  // stat initialised / the previous group's weights used
    if (warp < nh) {
      const float* e = w0 + ((g0 + lane) * DA_HEADS + warp) * (D + 2);
      const float mj = lane < n ? __ldcg(e + D) : DA_NEG_INF, lj = lane < n ? __ldcg(e + D + 1) : 0.f;
      const float mold = stat[0][warp], lold = stat[1][warp], mnew = fmaxf(mold, warp_max(mj));
      const float w = mj == DA_NEG_INF ? 0.f : __expf(mj - mnew);
      const float r = mold == DA_NEG_INF ? 0.f : __expf(mold - mnew);
      cw[warp][lane] = w;
      const float lsum = warp_sum(w * lj);
      __syncwarp();  // every lane has read the running max before lane 0 replaces it
      if (lane == 0) {
        cr[warp] = r;
        stat[0][warp] = mnew;
        stat[1][warp] = lold * r + lsum;
      }
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < QPT; ++j) num[j] *= cr[min((tid + DA_THREADS * j) / D, nh - 1)];
    // 8 chunks at a time, the loads of all the thread's outputs first (a runtime-bounded loop over the chunks would
    // wait for each load in turn: 4 us of a 10 us launch at batch 1, session 16's trace)
    for (int c0 = 0; c0 < n; c0 += 8) {
      float v[QPT][8];
#pragma unroll
      for (int j = 0; j < QPT; ++j) {
        const int h = (tid + DA_THREADS * j) / D;
        const float* e = w0 + ((long long)(g0 + c0) * DA_HEADS + h) * (D + 2) + d;
#pragma unroll
        for (int u = 0; u < 8; ++u) v[j][u] = h < nh && c0 + u < n ? __ldcg(e + u * DA_HEADS * (D + 2)) : 0.f;
      }
#pragma unroll
      for (int j = 0; j < QPT; ++j) {
        const int h = min((tid + DA_THREADS * j) / D, nh - 1);
#pragma unroll
        for (int u = 0; u < 8; ++u) num[j] += cw[h][c0 + u] * v[j][u];  // (c0 + u < 32)
      }
    }
  }
#pragma unroll
  for (int j = 0; j < QPT; ++j) {
    const int i = tid + DA_THREADS * j, h = i / D;
    if (h < nh) ob[i] = from_float<BF16>(num[j] * __frcp_rn(stat[1][h]));
  }
  if (tid == 0) a.tickets[bhg] = 0;
}

#define DA_ARGS                                                                                           \
  const u16 *q, const u16 *k_new, const u16 *v_new, u16 *kc, u16 *vc, const long long *slot, const u16 *mask, \
      u16 *out, float *ws, int *tickets, const u16 *cos, const u16 *sin, long long q_b, long long k_b,          \
      long long v_b, long long mask_b, long long cs_b, int heads, int kv_heads, int slots, int S, int splits,   \
      float scale, int cluster, const long long *l2, int l2_n, int l2_early
#define DA_STRUCT {q, k_new, v_new, kc, vc, slot, mask, out, ws, tickets, cos, sin, q_b, k_b, v_b, mask_b, cs_b,  \
                   heads, kv_heads, slots, S, splits, scale, cluster, l2, l2_n, l2_early}
#define INSTANTIATE_DA(NAME, BF16, D)                                                                     \
  extern "C" __global__ void __launch_bounds__(DA_THREADS, 4) decode_attn_##NAME##_d##D(DA_ARGS) {           \
    decode_attn_body<BF16, D>(DecodeAttn DA_STRUCT);                                                      \
  }                                                                                                       \
  extern "C" __global__ void __launch_bounds__(DA_THREADS, 4) decode_attn_##NAME##_d##D##_c32(DA_ARGS) {     \
    decode_attn_body<BF16, D, 32>(DecodeAttn DA_STRUCT);                                                  \
  }                                                                                                       \
  extern "C" __global__ void __launch_bounds__(DA_THREADS, 4) decode_attn_##NAME##_d##D##_p(DA_ARGS) {       \
    decode_attn_body<BF16, D, DA_CHUNK, true>(DecodeAttn DA_STRUCT);                                      \
  }                                                                                                       \
  extern "C" __global__ void __launch_bounds__(DA_THREADS, 4) decode_attn_##NAME##_d##D##_c32_p(DA_ARGS) {   \
    decode_attn_body<BF16, D, 32, true>(DecodeAttn DA_STRUCT);                                            \
  }
// The warm-up alone, for a side stream (kernels.L2_WARM_SIDE): launched beside the decode attention instead of
// inside it, so no block of the attention waits for its prefetches.  One warp a block, one range a block.
extern "C" __global__ void __launch_bounds__(32) l2_warm_side(const long long* ranges, int n) {
  l2_warm(ranges, n);
}

INSTANTIATE_DA(f16, false, 64)
INSTANTIATE_DA(f16, false, 128)
INSTANTIATE_DA(bf16, true, 64)
INSTANTIATE_DA(bf16, true, 128)

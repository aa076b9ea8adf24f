// Prototype (session 26): the N = 1 product from a row-walk format, "delta rows".  Compiled on its own by
// benchmarks/proto_delta/delta_rows.py (NVRTC through flash_llm.kernels._build); the few helpers it needs are
// spmm.cu's, repeated here so the prototype builds in a second.
//
// Format (delta_rows.py: encode): rows are sorted by entry count (perm: rank -> row) and taken 32 at a time
// (a slice: lane l owns the slice's row l).  A row is a stream of entries, each a 16-bit value and a 4-bit
// column step (col += step; then value x X[col]); gaps over 15 take escape entries (value 0, step 15), the
// stream ends with pads (value 0, step 0), all 32 streams of a slice padded to the same whole number of groups
// of 8 entries.  A group is 640 bytes: 32 lanes x 8 values (16 bytes a lane), then 32 lanes x 8 steps (a
// 32-bit word a lane).  Split s of S takes groups s G / S .. (s + 1) G / S - 1 of every slice (G the slice's
// groups) and starts each lane's column at starts[slice][s][lane]; win[slice][s] = (a0, w): the split's columns
// lie in a0 .. a0 + w - 1 (a0 and w multiples of 8), X's part there is staged in shared memory as fp32.
//
// One warp per block, grid (slices, S); each lane sums its row's entries in registers, stores the sum to
// ws[s][rank], and the last block of a slice to arrive (a ticket) sums the S partials in split order and writes
// y[perm[rank]] (+ bias).


typedef unsigned int u32;
typedef unsigned short u16;
#define DEVI __device__ __forceinline__

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
DEVI int ticket_acq_rel(int* t) {
  int prev;
  asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], 1;" : "=r"(prev) : "l"(t) : "memory");
  return prev;
}
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

template <bool BF16>
DEVI void dr_split(u32 w, float& lo, float& hi) {
  if (BF16) {
    lo = __uint_as_float(w << 16);
    hi = __uint_as_float(w & 0xffff0000u);
  } else {
    asm("{ .reg .f16 l, h; mov.b32 {l, h}, %2; cvt.f32.f16 %0, l; cvt.f32.f16 %1, h; }"
        : "=f"(lo), "=f"(hi) : "r"(w));
  }
}

// 8 entries: values v (2 per word), steps d (4 bits each); `off` is the lane's byte offset into xs
template <bool BF16>
DEVI void dr_group(u32& off, float& a0, float& a1, const uint4& v, u32 d, const char* xs) {
  const u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int h = 0; h < 4; ++h) {
    float f0, f1;
    dr_split<BF16>(w[h], f0, f1);
    const int k0 = 2 * h, k1 = 2 * h + 1;
    const u32 m0 = d & (0xFu << (4 * k0));
    off += k0 == 0 ? m0 << 2 : m0 >> (4 * k0 - 2);
    a0 = fmaf(f0, *reinterpret_cast<const float*>(xs + off), a0);
    const u32 m1 = d & (0xFu << (4 * k1));
    off += m1 >> (4 * k1 - 2);
    a1 = fmaf(f1, *reinterpret_cast<const float*>(xs + off), a1);
  }
}

template <bool BF16, int PF>
DEVI void delta_rows_n1_body(const unsigned char* __restrict__ data, const long long* __restrict__ off,
                             const u16* __restrict__ starts, const int2* __restrict__ win, const u16* __restrict__ x,
                             u16* __restrict__ y, const u16* __restrict__ bias, float* __restrict__ ws,
                             int* __restrict__ tickets, const int* __restrict__ perm, int S) {
  extern __shared__ __align__(16) char xs[];
  const int lane = threadIdx.x & 31, slice = blockIdx.x, s = blockIdx.y;
  const int mp = gridDim.x * 32;
  const long long o0 = off[slice];
  const int G = (int)((u32)(off[slice + 1] - o0) / 640u);  // (a slice's groups are far below 2^32 bytes)
  const int g0 = (int)((u32)(s * G) / (u32)S), g1 = (int)((u32)((s + 1) * G) / (u32)S);
  const unsigned char* base = data + o0 + 16 * lane;
  uint4 pv[PF];
  u32 pd[PF];
#pragma unroll
  for (int i = 0; i < PF; ++i)
    if (g0 + i < g1) {
      pv[i] = __ldg(reinterpret_cast<const uint4*>(base + (long long)(g0 + i) * 640));
      pd[i] = __ldg(reinterpret_cast<const u32*>(base + (long long)(g0 + i) * 640 + 512 - 12 * lane));
    }
  pdl_launch_dependents();  // the next kernel's blocks may become resident now (programmatic launch; else a no-op)
  const int2 wv = win[(long long)slice * S + s];  // (a0, w)
  const int start = starts[((long long)slice * S + s) * 32 + lane];
  pdl_wait();
  for (int c = 8 * lane; c < wv.y; c += 256) {  // X[a0 + c .. + 7] -> xs as fp32
    const uint4 r = __ldg(reinterpret_cast<const uint4*>(x + wv.x + c));
    float f[8];
    dr_split<BF16>(r.x, f[0], f[1]);
    dr_split<BF16>(r.y, f[2], f[3]);
    dr_split<BF16>(r.z, f[4], f[5]);
    dr_split<BF16>(r.w, f[6], f[7]);
    float4* dst = reinterpret_cast<float4*>(xs + 4 * c);
    dst[0] = make_float4(f[0], f[1], f[2], f[3]);
    dst[1] = make_float4(f[4], f[5], f[6], f[7]);
  }
  __syncwarp();
  u32 xoff = 4u * (u32)(start - wv.x);
  float a0 = 0.f, a1 = 0.f;
  for (int g = g0; g < g1; g += PF) {
#pragma unroll
    for (int i = 0; i < PF; ++i) {
      if (g + i < g1) {
        const uint4 v = pv[i];
        const u32 d = pd[i];
        if (g + i + PF < g1) {
          pv[i] = __ldg(reinterpret_cast<const uint4*>(base + (long long)(g + i + PF) * 640));
          pd[i] = __ldg(reinterpret_cast<const u32*>(base + (long long)(g + i + PF) * 640 + 512 - 12 * lane));
        }
        dr_group<BF16>(xoff, a0, a1, v, d, xs);
      }
    }
  }
  const int rank = slice * 32 + lane;
  ws[(long long)s * mp + rank] = a0 + a1;
  __syncwarp();
  int prev = 0;
  if (lane == 0) prev = ticket_acq_rel(tickets + slice);
  prev = __shfl_sync(0xffffffffu, prev, 0);
  if (prev != S - 1) return;
  __syncwarp();
  float sum = 0.f;
#pragma unroll 8
  for (int t = 0; t < S; ++t) sum += __ldcg(ws + (long long)t * mp + rank);
  if (lane == 0) tickets[slice] = 0;
  const int row = perm[rank];
  if (row >= 0) {
    if (bias) sum += to_float<BF16>(bias[row]);
    y[row] = from_float<BF16>(sum);
  }
}

#define DR_ARGS                                                                                              \
  const unsigned char *__restrict__ data, const long long *__restrict__ off, const u16 *__restrict__ starts, \
      const int2 *__restrict__ win, const u16 *__restrict__ x, u16 *__restrict__ y,                         \
      const u16 *__restrict__ bias, float *__restrict__ ws, int *__restrict__ tickets,                       \
      const int *__restrict__ perm, int S
#define DR_INST(NAME, BF16, PF, MINB)                                                                      \
  extern "C" __global__ void __launch_bounds__(32, MINB) delta_rows_n1_##NAME##_pf##PF##_b##MINB(DR_ARGS) { \
    delta_rows_n1_body<BF16, PF>(data, off, starts, win, x, y, bias, ws, tickets, perm, S);                \
  }
DR_INST(f16, false, 2, 24)
DR_INST(f16, false, 4, 24)
DR_INST(f16, false, 8, 24)
DR_INST(f16, false, 2, 32)
DR_INST(f16, false, 4, 32)
DR_INST(bf16, true, 2, 24)
DR_INST(bf16, true, 4, 24)
DR_INST(bf16, true, 8, 24)
DR_INST(bf16, true, 2, 32)
DR_INST(bf16, true, 4, 32)

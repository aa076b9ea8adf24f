// Prototype (session 29, benchmarks/dr_parts_proto.py): DeltaRows with P lanes a row and one split.
//
// Compiled appended to flash_llm/kernels/spmm.cu (it uses its helpers: dr_copy, dr_walk, to_float, from_float, the
// programmatic-launch calls).  The question: the N = 1 DeltaRows kernel splits K across blocks (S splits), so every
// launch ends in a ticket and the last warp's sum of the S partials: 2-3.5 us a launch inside the decode step
// (session 29's graph trace).  Here each row's entries are cut into P parts of equal count, each a contiguous range
// of columns, walked by P adjacent lanes of one warp (32 / P rows a warp), so a launch needs no other block: the P
// sums meet by shuffles, and the lane of part 0 applies the epilogue and writes the row.  The price: every block
// stages all of X (K columns, fp32 or 16-bit) instead of its split's window, and fewer, longer walks on small
// layers.
//
// Layout (the proto's encoder): groups of 640 bytes as the library's (32 lanes x 8 values, then 32 step words),
// slice t's groups goff[t] .. goff[t + 1] - 1; lane l of slice t is part l % P of the row in slot t (32 / P) + l / P
// (rows[slot]: the row, -1 for padding; with SiLU x up the slots R / 2 .. R - 1 of a slice hold the up rows of
// slots 0 .. R / 2 - 1, so lane l < 16 pairs with lane l + 16); starts[32 t + l]: the lane's first column (its
// first step is 0).  No windows, no perm beyond rows[], no workspace, no tickets.

constexpr int DRP_WARPS = 4;  // slices a block (warps), sharing the staged X

template <bool BF16, int P, int STAGE>
DEVI void drp_body(const int* __restrict__ data, const int* __restrict__ goff, const int* __restrict__ starts,
                   const int* __restrict__ rows, const u16* __restrict__ x, u16* __restrict__ y,
                   const u16* __restrict__ bias, int mode, const u16* __restrict__ colscale, float eps, int K,
                   int slices) {
  static_assert(P >= 2 && P <= 16 && (P & (P - 1)) == 0, "P: 2, 4, 8 or 16 lanes a row");
  static_assert(STAGE == 1 || STAGE == 2, "X staged as fp32 (1) or 16-bit (2)");
  extern __shared__ __align__(16) unsigned char drp_x[];  // X, all K columns
  __shared__ __align__(16) unsigned char ring[DRP_WARPS][DR_RING * 640];
  __shared__ float qpart[DRP_WARPS];
  constexpr int R = 32 / P;  // rows a warp
  constexpr int NT = 32 * DRP_WARPS;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int slice = min(blockIdx.x * DRP_WARPS + warp, slices - 1);
  const bool live = blockIdx.x * DRP_WARPS + warp < slices;
  const int g0 = goff[slice], g1 = goff[slice + 1];
  const unsigned char* base = reinterpret_cast<const unsigned char*>(data) + 16 * lane;
  const u32 rs = smem_addr(ring[warp]);
#pragma unroll
  for (int i = 0; i < DR_RING; ++i) {  // the first DR_RING groups, before the wait
    if (live && g0 + i < g1) dr_copy(rs, i, base, g0 + i);
    cp_async_commit();
  }
  pdl_launch_dependents();
  const bool rms = mode & DR_RMS, silu = mode & DR_SILU, resid = mode & DR_RESID;
  const int start = starts[slice * 32 + lane];
  const int row = rows[slice * R + lane / P];
  const bool writer = lane % P == 0 && row >= 0 && (!silu || lane < 16);
  const float bv = bias && writer && !silu ? to_float<BF16>(bias[row]) : 0.f;
  if (rms)  // the norm's weight into L2 before the wait (static)
    for (int c = 8 * threadIdx.x; c < K; c += 8 * NT) asm volatile("prefetch.global.L2 [%0];" ::"l"(colscale + c));
  pdl_wait();  // X, Y and every write after the previous kernel
  const float yv = resid && writer ? to_float<BF16>(y[row]) : 0.f;
  // all of X staged (K % 8 == 0, X 16-byte aligned: the launcher checks), 4 loads a thread in flight; RMSNorm's sum
  // of squares of the raw values on the way, X times the norm's weight rounded to the dtype once
  float q = 0.f;
  const int units = K >> 3;
  for (int u0 = threadIdx.x; u0 < units; u0 += 4 * NT) {
    uint4 r[4], g[4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
      if (u0 + NT * i < units) {
        r[i] = __ldg(reinterpret_cast<const uint4*>(x) + u0 + NT * i);
        if (rms) g[i] = __ldg(reinterpret_cast<const uint4*>(colscale) + u0 + NT * i);
      }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int u = u0 + NT * i;
      if (u >= units) break;
      float f[8];
      dr_unpack<BF16>(r[i].x, f[0], f[1]);
      dr_unpack<BF16>(r[i].y, f[2], f[3]);
      dr_unpack<BF16>(r[i].z, f[4], f[5]);
      dr_unpack<BF16>(r[i].w, f[6], f[7]);
      if (rms) {
        float e[8];
        dr_unpack<BF16>(g[i].x, e[0], e[1]);
        dr_unpack<BF16>(g[i].y, e[2], e[3]);
        dr_unpack<BF16>(g[i].z, e[4], e[5]);
        dr_unpack<BF16>(g[i].w, e[6], e[7]);
#pragma unroll
        for (int t = 0; t < 8; ++t) {
          q = fmaf(f[t], f[t], q);
          f[t] = to_float<BF16>(from_float<BF16>(f[t] * e[t]));
        }
      }
      if (STAGE == 1) {
        float4* dst = reinterpret_cast<float4*>(drp_x) + 2 * u;
        dst[0] = make_float4(f[0], f[1], f[2], f[3]);
        dst[1] = make_float4(f[4], f[5], f[6], f[7]);
      } else {
        u32 o[4];
#pragma unroll
        for (int h = 0; h < 4; ++h)
          o[h] = (u32)from_float<BF16>(f[2 * h]) | ((u32)from_float<BF16>(f[2 * h + 1]) << 16);
        reinterpret_cast<uint4*>(drp_x)[u] = make_uint4(o[0], o[1], o[2], o[3]);
      }
    }
  }
  if (rms) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) q += __shfl_xor_sync(0xffffffffu, q, o);
    if (lane == 0) qpart[warp] = q;
  }
  __syncthreads();  // the last barrier: from here each warp runs alone
  if (!live) return;
  if (rms) {
    q = qpart[0];
#pragma unroll
    for (int i = 1; i < DRP_WARPS; ++i) q += qpart[i];
  }
  const DrNorm nm{nullptr, nullptr, 0.f, 1.f, false};
  float acc = dr_walk<BF16, STAGE>(base, g0, g1, (u32)start << (STAGE == 2 ? 1 : 2),
                                   reinterpret_cast<const float*>(drp_x), x, nm, ring[warp], rs);
  // the P parts of a row (adjacent lanes): a butterfly, so every lane holds the same sum (a + b == b + a)
#pragma unroll
  for (int o = 1; o < P; o <<= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  if (rms) acc *= rsqrtf(q * __fdividef(1.f, (float)K) + eps);
  if (silu) {
    const float u = __shfl_down_sync(0xffffffffu, acc, 16);  // the up row of the gate row in lane - 16
    if (writer) {
      const float gr = to_float<BF16>(from_float<BF16>(acc)), ur = to_float<BF16>(from_float<BF16>(u));
      y[row] = from_float<BF16>(__fdividef(gr, 1.f + expf(-gr)) * ur);
    }
  } else if (writer) {
    const float r = acc + bv;
    y[row] = resid ? from_float<BF16>(yv + to_float<BF16>(from_float<BF16>(r))) : from_float<BF16>(r);
  }
}

#define DRP_ARGS                                                                                                  \
  const int *__restrict__ data, const int *__restrict__ goff, const int *__restrict__ starts,                     \
      const int *__restrict__ rows, const u16 *__restrict__ x, u16 *__restrict__ y, const u16 *__restrict__ bias, \
      int mode, const u16 *__restrict__ colscale, float eps, int K, int slices
#define INSTANTIATE_DRP(P, STAGE)                                                                                 \
  extern "C" __global__ void __launch_bounds__(32 * DRP_WARPS, 32 / DRP_WARPS) drp_f16_p##P##_s##STAGE(DRP_ARGS) { \
    drp_body<false, P, STAGE>(data, goff, starts, rows, x, y, bias, mode, colscale, eps, K, slices);             \
  }
INSTANTIATE_DRP(2, 1)
INSTANTIATE_DRP(2, 2)
INSTANTIATE_DRP(4, 1)
INSTANTIATE_DRP(4, 2)
INSTANTIATE_DRP(8, 1)
INSTANTIATE_DRP(8, 2)
INSTANTIATE_DRP(16, 1)
INSTANTIATE_DRP(16, 2)

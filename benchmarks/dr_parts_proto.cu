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
                   int slices, const u16* __restrict__ colbias) {
  static_assert(P >= 2 && P <= 16 && (P & (P - 1)) == 0, "P: 2, 4, 8 or 16 lanes a row");
  static_assert(STAGE == 1 || STAGE == 2, "X staged as fp32 (1) or 16-bit (2)");
  extern __shared__ __align__(16) unsigned char drp_x[];  // X, all K columns
  __shared__ __align__(16) unsigned char ring[DRP_WARPS][DR_RING * 640];
  __shared__ float qpart[DRP_WARPS], qpart2[DRP_WARPS];
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
  const bool rms = mode & DR_RMS, silu = mode & DR_SILU, resid = mode & DR_RESID, ln = mode & DR_LN;
  const int start = starts[slice * 32 + lane];
  const int row = rows[slice * R + lane / P];
  const bool writer = lane % P == 0 && row >= 0 && (!silu || lane < 16);
  const float bv = bias && writer && !silu ? to_float<BF16>(bias[row]) : 0.f;
  if (rms || ln)  // the norm's weight (and LayerNorm's bias) into L2 before the wait (static)
    for (int c = 8 * threadIdx.x; c < K; c += 8 * NT) {
      asm volatile("prefetch.global.L2 [%0];" ::"l"(colscale + c));
      if (ln && colbias) asm volatile("prefetch.global.L2 [%0];" ::"l"(colbias + c));
    }
  pdl_wait();  // X, Y and every write after the previous kernel
  const float yv = resid && writer ? to_float<BF16>(y[row]) : 0.f;
  // all of X staged (K % 8 == 0, X 16-byte aligned: the launcher checks), 4 loads a thread in flight; RMSNorm's sum
  // of squares of the raw values on the way, X times the norm's weight rounded to the dtype once.  LayerNorm (DR_LN):
  // X staged raw with its sums shifted by x[0] on the way, then normalized in place after a barrier
  float q = 0.f, q2 = 0.f;
  const float c0 = ln ? to_float<BF16>(__ldg(x)) : 0.f;
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
      unpack8<BF16>(r[i], f);
      if (rms) {
        float e[8];
        unpack8<BF16>(g[i], e);
#pragma unroll
        for (int t = 0; t < 8; ++t) {
          q = fmaf(f[t], f[t], q);
          f[t] = to_float<BF16>(from_float<BF16>(f[t] * e[t]));
        }
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
  if (rms || ln) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      q += __shfl_xor_sync(0xffffffffu, q, o);
      q2 += __shfl_xor_sync(0xffffffffu, q2, o);
    }
    if (lane == 0) {
      qpart[warp] = q;
      qpart2[warp] = q2;
    }
  }
  __syncthreads();
  if (ln) {  // mean and 1 / std over K (every thread the same sums in the same order), then X normalized in place:
    // (x - mu) rstd g + b rounded to the dtype once, as the separate LayerNorm
    float mu, rstd;
    dr_ln_stats<DRP_WARPS>(qpart, qpart2, c0, K, eps, mu, rstd);
    for (int u = threadIdx.x; u < units; u += NT) {
      float f[8], e[8], b8[8];
      dr_xs_load8<BF16>(reinterpret_cast<const float*>(drp_x), 8 * u, STAGE == 1, f);
      unpack8<BF16>(__ldg(reinterpret_cast<const uint4*>(colscale) + u), e);
      unpack8<BF16>(colbias ? __ldg(reinterpret_cast<const uint4*>(colbias) + u) : make_uint4(0, 0, 0, 0), b8);
#pragma unroll
      for (int t = 0; t < 8; ++t) f[t] = to_float<BF16>(from_float<BF16>(fmaf((f[t] - mu) * rstd, e[t], b8[t])));
      dr_xs_store8<BF16>(reinterpret_cast<float*>(drp_x), 8 * u, STAGE == 1, f);
    }
    __syncthreads();
  }
  // from here each warp runs alone
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
    const float r = (mode & DR_RELU) ? fmaxf(acc + bv, 0.f) : acc + bv;
    y[row] = resid ? from_float<BF16>(yv + to_float<BF16>(from_float<BF16>(r))) : from_float<BF16>(r);
  }
}

#define DRP_ARGS                                                                                                  \
  const int *__restrict__ data, const int *__restrict__ goff, const int *__restrict__ starts,                     \
      const int *__restrict__ rows, const u16 *__restrict__ x, u16 *__restrict__ y, const u16 *__restrict__ bias, \
      int mode, const u16 *__restrict__ colscale, float eps, int K, int slices, const u16 *__restrict__ colbias
#define INSTANTIATE_DRP(P, STAGE)                                                                                 \
  extern "C" __global__ void __launch_bounds__(32 * DRP_WARPS, 32 / DRP_WARPS) drp_f16_p##P##_s##STAGE(DRP_ARGS) { \
    drp_body<false, P, STAGE>(data, goff, starts, rows, x, y, bias, mode, colscale, eps, K, slices, colbias);    \
  }
INSTANTIATE_DRP(2, 1)
INSTANTIATE_DRP(2, 2)
INSTANTIATE_DRP(4, 1)
INSTANTIATE_DRP(4, 2)
INSTANTIATE_DRP(8, 1)
INSTANTIATE_DRP(8, 2)
INSTANTIATE_DRP(16, 1)
INSTANTIATE_DRP(16, 2)

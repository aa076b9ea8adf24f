"""CPU emulation of ``delta_rows_mma_body`` (spmm.cu, session 60): the DeltaRows tensor-core kernel, statement by
statement, on the encoded bytes, with ``ldmatrix`` and ``mma.m16n8k16`` fragments laid out as the PTX ISA gives them.

Session 61 had no GPU.  The kernel's only GPU run (session 60) failed its test; one fault was found afterwards and fixed
(a drain pass wider than the ring).  This script runs the kernel's control flow (each lane's group walk and ring stores,
the warp's ``REDUX`` front, the drain limit, the X ring's fill and store, the zeroing), its shared-memory addresses (the
``ldmatrix`` row addresses of every lane) and its register conventions (A/B/C fragments, the partials' rows and tokens)
on the CPU, so a fault in any of those shows as a wrong result here, before device time is spent:

    python3 benchmarks/diag/dr_mma_emulate.py            # the GPU test's cases, every variant
    python3 benchmarks/diag/dr_mma_emulate.py --quick    # a few

What it cannot see: hardware ordering (``__syncwarp``, ``cp.async`` completion), register allocation, and NVRTC.
The emulator follows the code as written; keep it in step with ``delta_rows_mma_body`` when that changes.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from flash_llm import DeltaRows
from flash_llm.formats.delta_rows import _split_offsets, layout

RC, RING, XRC, XC = 256, 4, 128, 64  # DRM_RC, DRM_RING, DRM_XRC, DRM_XC
PITCH, XPITCH = 2 * RC + 16, 2 * XRC + 16
BIG = 0x7FFFFFFF


def _f(bits: np.ndarray, bf16: bool) -> np.ndarray:
    """16-bit patterns as float64 values of the dtype."""
    bits = np.asarray(bits, dtype=np.uint16)
    if bf16:
        return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return bits.view(np.float16).astype(np.float64)


def _byte_perm(x: int, y: int, s: int) -> int:
    """CUDA's __byte_perm: result byte i is byte (s >> 4 i) & 7 of the 8 bytes {y: 4-7, x: 0-3}."""
    b = (x & 0xFFFFFFFF) | ((y & 0xFFFFFFFF) << 32)
    r = 0
    for i in range(4):
        r |= ((b >> (8 * ((s >> (4 * i)) & 7))) & 0xFF) << (8 * i)
    return r


def _decode_coded(q, lut):
    """dr_decode_coded: (q.x, q.y, q.z, q.w) and the row's (lut.x, lut.y) -> the plain group's four value words."""
    sel = q[2] & 0x77777777
    h03 = _byte_perm(lut[0], lut[1], sel) | (q[2] & 0x80808080)
    h47 = _byte_perm(lut[0], lut[1], sel >> 16) | ((q[2] << 4) & 0x80808080)
    return [_byte_perm(q[0], h03, 0x5140), _byte_perm(q[0], h03, 0x7362),
            _byte_perm(q[1], h47, 0x5140), _byte_perm(q[1], h47, 0x7362)]


class Smem:
    """A byte-addressed shared-memory buffer."""

    def __init__(self, size):
        self.b = np.zeros(size, dtype=np.uint8)

    def u32(self, addr):
        assert addr % 4 == 0 and 0 <= addr and addr + 4 <= self.b.size, addr
        return int(self.b[addr: addr + 4].view(np.uint32)[0])

    def st16(self, addr, h):
        assert addr % 2 == 0 and 0 <= addr and addr + 2 <= self.b.size, addr
        self.b[addr: addr + 2] = np.array([h], dtype=np.uint16).view(np.uint8)

    def st_u32x4(self, addr, words):
        assert addr % 16 == 0 and 0 <= addr and addr + 16 <= self.b.size, addr
        self.b[addr: addr + 16] = np.array(words, dtype=np.uint32).view(np.uint8)

    def ldmatrix(self, addrs, count):
        """ldmatrix.sync.aligned.m8n8.x<count>.shared.b16: matrix i's row r is the 16 bytes at lane 8 i + r's
        address; lane T receives from each matrix the 32-bit word (row T / 4, elements 2 (T % 4), + 1)."""
        addrs = np.asarray(addrs, dtype=np.int64)
        src = addrs[8 * np.arange(count)[None, :] + (_T // 4)[:, None]]  # [32, count]
        assert (src % 16 == 0).all() and (src >= 0).all() and (src + 16 <= self.b.size).all()
        return self.b.view(np.uint32)[(src + 4 * (_T % 4)[:, None]) // 4]


_T = np.arange(32)
_G, _C = _T // 4, _T % 4
_AROW = np.stack([_G, _G + 8, _G, _G + 8], 1)  # [lane, register]: A's row and first k of each register
_AK = np.stack([2 * _C, 2 * _C, 2 * _C + 8, 2 * _C + 8], 1)
_BK = np.stack([2 * _C, 2 * _C + 8], 1)


def _mma(acc, a, b, bf16):
    """mma.sync.m16n8k16.row.col, fp32 sums: acc [32 lanes, 4], a [32, 4], b [32, 2] (32-bit registers of two 16-bit
    halves, the low half first).  Fragments (PTX ISA): A row g / g + 8 = lane / 4 (+ 8), k 2 (lane % 4) (+1), + 8 for
    a2, a3; B k as A's, n = lane / 4; C row g (+ 8 for c2, c3), n 2 (lane % 4) (+1)."""
    a = np.asarray(a, dtype=np.uint32)
    b = np.asarray(b, dtype=np.uint32)
    A = np.full((16, 16), np.nan)
    B = np.full((16, 8), np.nan)
    A[_AROW, _AK] = _f(a & 0xFFFF, bf16)
    A[_AROW, _AK + 1] = _f(a >> 16, bf16)
    B[_BK, _G[:, None]] = _f(b & 0xFFFF, bf16)
    B[_BK + 1, _G[:, None]] = _f(b >> 16, bf16)
    assert not np.isnan(A).any() and not np.isnan(B).any()  # every element of both operands held by one register
    D = A @ B
    acc[:, 0] = (acc[:, 0] + D[_G, 2 * _C]).astype(np.float32)
    acc[:, 1] = (acc[:, 1] + D[_G, 2 * _C + 1]).astype(np.float32)
    acc[:, 2] = (acc[:, 2] + D[_G + 8, 2 * _C]).astype(np.float32)
    acc[:, 3] = (acc[:, 3] + D[_G + 8, 2 * _C + 1]).astype(np.float32)


def emulate(w: DeltaRows, x: torch.Tensor, xr: bool, vec: bool, cap: bool = True, max_rounds: int = 10 ** 6,
            only: list | None = None, stats: dict | None = None) -> np.ndarray:
    """Y [N, M] (float64 of the fp32 split sums) as delta_rows_spmm_<dtype>_mma<NT>[c][x] and delta_rows_reduce
    would compute it (no bias), for ``x [N, K]`` (fp16 / bf16, CPU).  ``cap=False``: session 60's first version,
    whose drain pass was not capped at the ring's width (the fault its GPU test found).  ``only``: these slices alone
    (no check that every partial was written); ``stats``: counts added into it (rounds, lanes, drains: :func:`_report`)."""
    m, K = w.shape
    N = x.shape[0]
    NT = 8 if N <= 8 else 16 if N <= 16 else 32
    assert N <= 32 and (not xr or (NT <= 16 and K % 8 == 0)) and (not vec or K % 2 == 0)
    bf16 = x.dtype == torch.bfloat16
    data = w.data.cpu().numpy().astype(np.int32)
    lay = layout(m, w.offsets.numel(), data.size)
    assert lay.parts == 1
    coded, slices, S = lay.coded, lay.slices, lay.splits
    dbytes = data.view(np.uint8)
    dwords = data.view(np.uint32)
    xb = x.contiguous().view(torch.int16).numpy().view(np.uint16).reshape(N, K)
    gbytes = 512 if coded else 640
    goffs, win, starts, perm = (t.numpy() for t in _split_offsets(w.offsets.cpu(), slices, lay.mp, S))
    ws = np.zeros((S, N, m), dtype=np.float32)
    written = np.zeros((S, N, m), dtype=bool)
    lane = np.arange(32)
    tq, kq = lane >> 2, 2 * (lane & 3)
    st = stats if stats is not None else {}

    def count(key, v=1):
        st[key] = st.get(key, 0) + v

    for slice_ in (range(slices) if only is None else only):
        for s in range(S):
            count("warps")
            goff = int(goffs[slice_])
            G = int(goffs[slice_ + 1]) - goff
            g0, g1 = (s * G) // S, ((s + 1) * G) // S
            a0, wd = (int(v) for v in win[slice_, s])
            wend = a0 + wd
            col = [int(c) for c in starts[slice_, s]]
            lut = [(int(dwords[int(goffs[-1]) * 128 + 2 * (slice_ * 32 + ln)]),  # (dr_lut: after the groups)
                    int(dwords[int(goffs[-1]) * 128 + 2 * (slice_ * 32 + ln) + 1])) if coded else (0, 0)
                   for ln in range(32)]
            tile = Smem(32 * PITCH)
            xring = Smem(NT * XPITCH)
            acc = np.zeros((2, NT // 8, 32, 4), dtype=np.float32)
            la = ((lane & 7) + ((lane >> 3) & 1) * 8) * PITCH + (lane >> 4) * 16
            drained = a0 & ~15
            g = [g0] * 32
            xl, xpend, xv = drained, False, None
            XU = NT * XC // 8 // 32

            def xstore():
                nonlocal xl, xpend
                for ln in range(32):
                    for u in range(XU):
                        p = ln + 32 * u
                        t, c = p // (XC // 8), xl + 8 * (p % (XC // 8))
                        xring.st_u32x4(t * XPITCH + 2 * (c & (XRC - 1)), xv[ln][u])
                xl += XC
                xpend = False

            rounds = 0
            while True:
                rounds += 1
                count("rounds")
                if rounds > max_rounds:
                    raise RuntimeError(f"slice {slice_} split {s}: no end after {max_rounds} rounds")
                if xr and not xpend and xl + XC - XRC <= drained and xl < wend:
                    xv = []
                    for ln in range(32):
                        units = []
                        for u in range(XU):
                            p = ln + 32 * u
                            t, c = p // (XC // 8), xl + 8 * (p % (XC // 8))
                            if t < N and c < K:
                                units.append(xb[t, c: c + 8].view(np.uint32).tolist())
                            else:
                                units.append([0, 0, 0, 0])
                        xv.append(units)
                    xpend = True
                for ln in range(32):
                    if g[ln] >= g1:
                        continue
                    count("lane_active")
                    gb = (goff + g[ln]) * gbytes
                    q = dbytes[gb + 16 * ln: gb + 16 * ln + 16].view(np.uint32).tolist()
                    if coded:
                        d = q[3]
                        v = _decode_coded(q, lut[ln])
                    else:
                        d = int(dbytes[gb + 512 + 4 * ln: gb + 516 + 4 * ln].view(np.uint32)[0])
                        v = q
                    steps = [(d >> (4 * e)) & 15 for e in range(8)]
                    last = col[ln] + sum(steps)
                    if last < drained + RC:
                        c = col[ln]
                        for e in range(8):
                            c += steps[e]
                            h = (v[e >> 1] >> (16 * (e & 1))) & 0xFFFF
                            if h & 0x7FFF:
                                tile.st16(ln * PITCH + 2 * (c & (RC - 1)), h)
                        col[ln] = last
                        g[ln] += 1
                        count("lane_groups")
                    else:
                        count("lane_waits")
                live = [col[ln] for ln in range(32) if g[ln] < g1]
                front = min(live) if live else BIG
                lim = min(min(wend if front == BIG else front & ~15, xl if xr else BIG), drained + RC if cap else BIG)
                if drained >= lim:
                    if xr and xpend:
                        xstore()
                        continue
                    if front == BIG and drained >= wend:
                        break
                    continue
                d0 = drained
                count("passes")
                count("blocks", (lim - drained + 15) // 16)
                if xr and lim == xl and lim < (wend if front == BIG else front & ~15):
                    count("xr_capped")
                while drained < lim:
                    cb = 2 * (drained & (RC - 1))
                    a = [tile.ldmatrix(la + h * 16 * PITCH + cb, 4) for h in range(2)]
                    if xr:
                        xa = ((lane & 7) + 8 * (lane >> 4)) * XPITCH + 2 * (drained & (XRC - 1)) + 16 * ((lane >> 3) & 1)
                        for i in range((NT + 15) // 16):
                            if NT == 8:
                                b = xring.ldmatrix(xa, 2)
                            else:
                                b = xring.ldmatrix(xa + i * 16 * XPITCH, 4)
                            for h in range(2):
                                _mma(acc[h, (2 * i) % (NT // 8)], a[h], b[:, 0:2], bf16)
                                if NT > 8:
                                    _mma(acc[h, (2 * i + 1) % (NT // 8)], a[h], b[:, 2:4], bf16)
                    else:
                        k0 = drained + kq
                        k1 = k0 + 8
                        for j in range(NT // 8):
                            b = np.zeros((32, 2), dtype=np.uint32)
                            for ln in range(32):
                                tk = 8 * j + tq[ln]
                                if tk >= N:
                                    continue
                                for r, kk in enumerate((k0[ln], k1[ln])):
                                    if kk < K:
                                        lo = int(xb[tk, kk])
                                        hi = int(xb[tk, kk + 1]) if (vec or kk + 1 < K) else 0
                                        b[ln, r] = lo | (hi << 16)
                            for h in range(2):
                                _mma(acc[h, j], a[h], b, bf16)
                    drained += 16
                for c in range(d0, drained, 16):
                    for ln in range(32):
                        base = ln * PITCH + 2 * (c & (RC - 1))
                        tile.b[base: base + 32] = 0
                if xr and xpend and xl + XC - XRC <= drained:
                    xstore()
                if front == BIG and drained >= wend:
                    break
            pr = perm[slice_ * 32: slice_ * 32 + 32]
            for h in range(2):
                for e2 in range(2):
                    for ln in range(32):
                        row = int(pr[16 * h + tq[ln] + 8 * e2])
                        if row < 0:
                            continue
                        for j in range(NT // 8):
                            for e1 in range(2):
                                t = 8 * j + kq[ln] + e1
                                if t < N:
                                    ws[s, t, row] = acc[h, j, ln, 2 * e2 + e1]
                                    written[s, t, row] = True
    if only is None and not written.all():
        raise AssertionError(f"{(~written).sum()} partials never written")
    return ws.astype(np.float64).sum(0)


def weight(m: int, k: int, density: float, dtype: torch.dtype, gen: torch.Generator,
           by_magnitude: bool = False) -> torch.Tensor:
    """A random ``[m, k]`` weight of about ``density``: normal values kept by a random mask, or (``by_magnitude``, as
    the GPU test for coded values: ``code_values`` needs a row's kept values within 7 binades) the largest ones."""
    w = torch.randn(m, k, generator=gen)
    if not by_magnitude:
        return torch.where(torch.rand(m, k, generator=gen) < density, w, 0.0).to(dtype)
    if density >= 1:  # (all kept: magnitudes 0.5 to 8)
        return (w.sign() * (0.5 + 7.5 * torch.rand(m, k, generator=gen))).to(dtype)
    t = float(torch.special.ndtri(torch.tensor(1.0 - density / 2, dtype=torch.float64)))
    return w.masked_fill_(w.abs() < t, 0.0).to(dtype)


def _cases(quick: bool):
    shapes = (((64, 64), 1.0), ((96, 4096), 0.2), ((70, 517), 0.5), ((128, 2056), 0.01), ((32, 1000), 0.0),
              ((300, 14336), 0.2), ((64, 4104), 0.95))
    if quick:
        shapes = shapes[:3]
    for (m, k), density in shapes:
        for splits in (None, 1, 7):
            for n in ((1, 9, 17) if quick else (1, 3, 8, 9, 16, 17, 32)):
                yield m, k, density, splits, n


def _report(st: dict) -> str:
    """One line of per-warp averages from :func:`emulate`'s counts."""
    w, r = st["warps"], st["rounds"]
    return (f"{w} warps: {st.get('lane_groups', 0) / w / 32:.1f} groups a lane, {r / w:.1f} rounds a warp "
            f"({st.get('lane_groups', 0) / r / 32:.0%} of lanes store a group a round, "
            f"{st.get('lane_waits', 0) / r / 32:.1%} wait for the ring, "
            f"{1 - st.get('lane_active', 0) / r / 32:.0%} are done), {st.get('passes', 0) / r:.2f} drain passes a round "
            f"of {st.get('blocks', 0) / max(1, st.get('passes', 0)):.1f} blocks, "
            f"{st.get('xr_capped', 0) / max(1, st.get('passes', 0)):.0%} of passes stopped by X's ring")


def stats_main(args) -> int:
    """Counts of the kernel's rounds on a real layer shape (a sample of slices)."""
    m, k = (int(v) for v in args.shape.split(","))
    gen = torch.Generator().manual_seed(61)
    dtype = torch.bfloat16 if args.dtypes.startswith("bf16") else torch.float16
    wd = torch.randn(m, k, generator=gen)  # (the mask drawn as in the counts docs/kernels.md quotes)
    wd = torch.where(torch.rand(m, k, generator=gen) >= args.sparsity, wd, 0.0).to(dtype)
    w = DeltaRows.from_dense(wd, **({} if args.splits is None else {"splits": args.splits}))
    slices = w.layout.slices
    only = sorted({int(i) for i in np.linspace(0, slices - 1, min(args.slices, slices))})
    for n in (int(v) for v in args.ns.split(",")):
        x = torch.randn(n, k, generator=gen).to(dtype)
        for xr in (False, True) if (k % 8 == 0 and n <= 16) else (False,):
            st = {}
            emulate(w, x, xr, k % 2 == 0, only=only, stats=st)
            print(f"{m}x{k} {args.sparsity:.0%} S={w.splits} N={n} xring={xr}: {_report(st)}", flush=True)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="three shapes, three token counts")
    ap.add_argument("--dtypes", default="f16,bf16,bf16c", help="of f16, bf16, bf16c (coded values)")
    ap.add_argument("--no-cap", action="store_true", help="session 60's first version (no cap on a drain pass)")
    ap.add_argument("-v", "--verbose", action="store_true", help="a line for every case")
    ap.add_argument("--stats", action="store_true", help="count rounds on --shape instead of checking results")
    ap.add_argument("--shape", default="14336,4096", help="--stats: M,K")
    ap.add_argument("--sparsity", type=float, default=0.8, help="--stats")
    ap.add_argument("--splits", type=int, default=None, help="--stats: the split count (default: the encoder's)")
    ap.add_argument("--slices", type=int, default=6, help="--stats: slices sampled")
    ap.add_argument("--ns", default="8,16", help="--stats: token counts")
    args = ap.parse_args(argv)
    if args.stats:
        return stats_main(args)
    gen = torch.Generator().manual_seed(61)
    bad = total = 0
    for dt in args.dtypes.split(","):
        dtype = torch.bfloat16 if dt.startswith("bf16") else torch.float16
        coded = dt == "bf16c"
        cache = {}
        for m, k, density, splits, n in _cases(args.quick):
            key = (m, k, density, splits)
            if key not in cache:
                wd = weight(m, k, density, dtype, gen, by_magnitude=coded)
                w = DeltaRows.from_dense(wd, **({} if splits is None else {"splits": splits}))
                if w.parts != 1:
                    w = DeltaRows.from_dense(wd, splits=3)
                if coded:
                    w = w.code_values()
                    assert w is not None
                cache = {key: (wd, w)}
            wd, w = cache[key]
            x = torch.randn(n, k, generator=gen).to(dtype)
            ref = x.double() @ wd.double().t()
            for xr in (False, True) if (k % 8 == 0 and n <= 16) else (False,):
                for vec in (True, False) if k % 2 == 0 else (False,):
                    if xr and not vec:
                        continue
                    total += 1
                    y = emulate(w, x, xr, vec, cap=not args.no_cap)
                    err = np.abs(y - ref.numpy()).max() if y.size else 0.0
                    tol = 1e-5 * (1 + (np.abs(ref.numpy()).max() if y.size else 0.0)) * max(1, k) ** 0.5
                    ok = err <= tol
                    bad += not ok
                    if not ok or args.verbose:
                        print(f"{'FAIL' if not ok else 'ok  '} {dt} m={m} k={k} d={density} S={w.splits} n={n} "
                              f"xring={xr} vec={vec}: max err {err:.3g} (tol {tol:.3g})", flush=True)
    print(f"{total - bad} of {total} cases exact to fp32 sums, {bad} wrong")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

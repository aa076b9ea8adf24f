"""Prototype (session 26): "delta rows", a row-walk format for the N = 1 product, and its kernel's launcher.

The question it answers: can a format of about 2.5 bytes per nonzero (a 16-bit value and a 4-bit column step),
walked one row per lane with the sum in a register, beat the Tiled-CSL N = 1 kernel (4 bytes per nonzero, a
read-modify-write of shared memory per entry) on time, not only on bytes?  Layout: ``delta_rows.cu``.

    enc = encode(w, splits)            # w: [M, K] fp16 / bf16 on any device (K % 8 == 0, K < 65536)
    dense = decode(enc)                # [M, K], the exact weight back
    y = matvec_reference(enc, x)       # x: [K]; the kernel's sums in its order, fp32
    y = launch(enc, x, bias=None)      # on CUDA: [M] in w's dtype

Not part of the library: if it wins, it becomes a format (docs/formats.md rules: versioned, serialized,
GPU encoder) and a kernel in spmm.cu.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import torch

GROUP = 8  # entries per lane per group
LANES = 32  # rows per slice
GROUP_BYTES = LANES * GROUP * 2 + LANES * 4  # 640: values, then one 32-bit word of steps per lane
MAX_STEP = 15


@dataclass
class DeltaRows:
    shape: tuple[int, int]
    dtype: torch.dtype
    splits: int
    data: torch.Tensor  # uint8 [bytes], groups of GROUP_BYTES per slice
    off: torch.Tensor  # int64 [slices + 1], byte offset of each slice's groups
    starts: torch.Tensor  # int16 (read as u16) [slices, splits, 32]: each lane's column before the split
    win: torch.Tensor  # int32 [slices, splits, 2]: (a0, w) of the split's X window, multiples of 8
    perm: torch.Tensor  # int32 [slices * 32]: rank -> row, -1 for padding ranks
    nnz: int
    max_window: int = 0  # the widest split window (columns): 4 x this is the kernel's dynamic shared memory

    @property
    def slices(self) -> int:
        return self.off.numel() - 1

    @property
    def nbytes(self) -> int:
        """Bytes the kernel reads per product, X excluded (perm is read by the last blocks only)."""
        return sum(t.numel() * t.element_size() for t in (self.data, self.off, self.starts, self.win, self.perm))

    def to(self, device) -> "DeltaRows":
        return DeltaRows(self.shape, self.dtype, self.splits, *(t.to(device) for t in (
            self.data, self.off, self.starts, self.win, self.perm)), self.nnz, self.max_window)


def _streams(w: torch.Tensor):
    """Per rank (rows sorted by entry count), the values and steps of its stream, padded to whole groups per slice.
    Returns (vals int16 [Mp, L], steps uint8 [Mp, L], groups per slice int64 [slices], perm int64 [Mp])."""
    m, k = w.shape
    dev = w.device
    bits = w.contiguous().view(torch.int16)
    rows, cols = (w != 0).nonzero(as_tuple=True)
    nnz = rows.numel()
    vals = bits[rows, cols]
    first = torch.ones(nnz, dtype=torch.bool, device=dev)
    if nnz:
        first[1:] = rows[1:] != rows[:-1]
    prev = torch.zeros_like(cols)
    if nnz:
        prev[1:] = cols[:-1]
    prev[first] = 0
    gap = cols - prev  # the first entry of a row steps from column 0 (so it may be 0)
    esc = torch.where(gap > MAX_STEP, torch.div(gap - 1, MAX_STEP, rounding_mode="floor"), torch.zeros_like(gap))
    span = esc + 1
    ent = torch.zeros(m, dtype=torch.int64, device=dev).index_add_(0, rows, span)
    perm = torch.sort(ent, descending=True, stable=True).indices
    mp = -(-m // LANES) * LANES
    slices = mp // LANES
    rank = torch.empty(m, dtype=torch.int64, device=dev)
    rank[perm] = torch.arange(m, device=dev)
    ent_rank = torch.zeros(mp, dtype=torch.int64, device=dev)
    ent_rank[:m] = ent[perm]
    groups = (ent_rank.view(slices, LANES).amax(1) + GROUP - 1) // GROUP
    length = int(groups.max()) * GROUP if slices else 0
    # position of each nonzero's entry in its row's stream (after its escapes)
    csum = torch.cumsum(span, 0) - span
    row_base = torch.zeros(m, dtype=torch.int64, device=dev)
    row_base[rows[first]] = csum[first]
    pos = csum - row_base[rows] + esc
    r = rank[rows]
    vals2 = torch.zeros(mp, max(length, 1), dtype=torch.int16, device=dev)
    steps2 = torch.zeros(mp, max(length, 1), dtype=torch.uint8, device=dev)
    vals2[r, pos] = vals
    steps2[r, pos] = (gap - MAX_STEP * esc).to(torch.uint8)
    n_esc = int(esc.sum()) if nnz else 0
    if n_esc:
        owner = torch.repeat_interleave(torch.arange(nnz, device=dev), esc)
        j = torch.arange(n_esc, device=dev) - torch.repeat_interleave(torch.cumsum(esc, 0) - esc, esc)
        steps2[r[owner], pos[owner] - esc[owner] + j] = MAX_STEP
    perm_full = torch.full((mp,), -1, dtype=torch.int64, device=dev)
    perm_full[:m] = perm
    return vals2[:, :length], steps2[:, :length], groups, perm_full, nnz


def encode(w: torch.Tensor, splits: int) -> DeltaRows:
    """Encode a dense ``[M, K]`` fp16 / bf16 weight (zeros are dropped) for ``splits`` K-splits."""
    if w.dim() != 2 or w.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"w must be a 2-D fp16 / bf16 tensor, got {tuple(w.shape)} {w.dtype}")
    m, k = w.shape
    if k % 8 or k >= 65536:
        raise ValueError(f"K must be a multiple of 8 below 65536, got {k}")
    if splits < 1:
        raise ValueError(f"splits must be >= 1, got {splits}")
    dev = w.device
    vals, steps, groups, perm, nnz = _streams(w)
    mp, length = vals.shape
    slices = mp // LANES
    gmax = length // GROUP
    colpos = torch.cumsum(steps.to(torch.int32), 1)  # [Mp, L]: the column of each entry
    # split s of a slice: groups s G / S .. (s + 1) G / S - 1
    s_idx = torch.arange(splits + 1, device=dev)
    bounds = (s_idx[None, :] * groups[:, None]) // splits * GROUP  # [slices, S + 1] entry index
    t0, t1 = bounds[:, :-1], bounds[:, 1:]  # [slices, S]
    colpos_s = colpos.view(slices, LANES, max(length, 1)) if length else torch.zeros(slices, LANES, 1, dtype=torch.int32,
                                                                                         device=dev)
    def at(t):  # column after entry t - 1 (0 before the first), [slices, S, 32]
        idx = (t - 1).clamp(min=0)[:, :, None].expand(slices, splits, LANES).permute(0, 2, 1)
        c = torch.gather(colpos_s, 2, idx).permute(0, 2, 1)
        return torch.where((t > 0)[:, :, None], c, torch.zeros_like(c))
    start = at(t0)
    last = at(t1)  # column of each lane's last entry of the split (its start when the split is empty)
    lo = start.amin(2)
    hi = last.amax(2) + 1
    a0 = lo // 8 * 8
    wlen = (hi - a0 + 7) // 8 * 8
    win = torch.stack([a0, wlen], 2).to(torch.int32)
    # data: [slices, Gmax, 640 bytes], then only each slice's own groups
    v = vals.view(slices, LANES, gmax, GROUP).permute(0, 2, 1, 3).contiguous().view(torch.uint8)
    v = v.reshape(slices, gmax, LANES * GROUP * 2)
    sh = (4 * torch.arange(GROUP, device=dev, dtype=torch.int64))
    d = (steps.view(slices, LANES, gmax, GROUP).to(torch.int64) << sh).sum(3).to(torch.int32)  # [slices, 32, G]
    d = d.permute(0, 2, 1).contiguous().view(torch.uint8).reshape(slices, gmax, LANES * 4)
    full = torch.cat([v, d], 2)  # [slices, Gmax, 640]
    keep = torch.arange(gmax, device=dev)[None, :] < groups[:, None]
    data = full[keep].reshape(-1)
    off = torch.zeros(slices + 1, dtype=torch.int64, device=dev)
    off[1:] = torch.cumsum(groups * GROUP_BYTES, 0)
    return DeltaRows((m, k), w.dtype, splits, data.contiguous(), off.contiguous(),
                     start.to(torch.int16).contiguous(), win.contiguous(), perm.to(torch.int32).contiguous(), nnz,
                     int(wlen.max()) if wlen.numel() else 0)


def _lanes(enc: DeltaRows):
    """(vals int16 [Mp, L], steps int64 [Mp, L]) back from the data, L = 8 x the most groups of a slice."""
    slices = enc.slices
    groups = (enc.off[1:] - enc.off[:-1]) // GROUP_BYTES
    gmax = int(groups.max()) if slices else 0
    dev = enc.data.device
    full = torch.zeros(slices, gmax, GROUP_BYTES, dtype=torch.uint8, device=dev)
    keep = torch.arange(gmax, device=dev)[None, :] < groups[:, None]
    full[keep] = enc.data.view(-1, GROUP_BYTES)
    v = full[:, :, :LANES * GROUP * 2].contiguous().view(torch.int16).view(slices, gmax, LANES, GROUP)
    vals = v.permute(0, 2, 1, 3).reshape(slices * LANES, gmax * GROUP)
    d = full[:, :, LANES * GROUP * 2:].contiguous().view(torch.int32).view(slices, gmax, LANES).to(torch.int64)
    d = d & 0xFFFFFFFF
    steps = (d[..., None] >> (4 * torch.arange(GROUP, device=dev))) & 15  # [slices, G, 32, 8]
    steps = steps.permute(0, 2, 1, 3).reshape(slices * LANES, gmax * GROUP)
    return vals, steps, groups


def decode(enc: DeltaRows) -> torch.Tensor:
    """The dense ``[M, K]`` weight back (exact)."""
    m, k = enc.shape
    vals, steps, _ = _lanes(enc)
    cols = torch.cumsum(steps, 1)
    out = torch.zeros(m, k, dtype=torch.int16, device=enc.data.device)
    nz = vals != 0
    ranks, t = nz.nonzero(as_tuple=True)
    rows = enc.perm.to(torch.int64)[ranks]
    out[rows, cols[ranks, t]] = vals[ranks, t]
    return out.view(enc.dtype)


def matvec_reference(enc: DeltaRows, x: torch.Tensor) -> torch.Tensor:
    """fp32 ``[M]``: every split's sum (over its entries, in the kernel's even / odd order) summed in split order,
    starting from the stored starts (so a wrong start or window shows)."""
    m, k = enc.shape
    vals, steps, groups = _lanes(enc)
    vf = vals.view(enc.dtype).float()
    xf = x.float()
    s_idx = torch.arange(enc.splits + 1, device=vals.device)
    bounds = (s_idx[None, :] * groups[:, None]) // enc.splits * GROUP
    total = torch.zeros(vals.shape[0], dtype=torch.float32, device=vals.device)
    for s in range(enc.splits):
        t0 = bounds[:, s].repeat_interleave(LANES)
        t1 = bounds[:, s + 1].repeat_interleave(LANES)
        t = torch.arange(vals.shape[1], device=vals.device)[None, :]
        inside = (t >= t0[:, None]) & (t < t1[:, None])
        st = steps * inside
        start = enc.starts[:, s, :].reshape(-1).to(torch.int64) & 0xFFFF
        cols = start[:, None] + torch.cumsum(st, 1)
        cols = torch.where(inside, cols, torch.zeros_like(cols))
        a0 = enc.win[:, s, 0].repeat_interleave(LANES).to(torch.int64)
        wl = enc.win[:, s, 1].repeat_interleave(LANES).to(torch.int64)
        bad = inside & ((cols < a0[:, None]) | (cols >= (a0 + wl)[:, None]))
        if bool(bad.any()):
            raise AssertionError("an entry's column lies outside its split's window")
        prod = torch.where(inside, vf * xf[cols.clamp(max=k - 1)], torch.zeros_like(vf))
        even = prod[:, 0::2].sum(1)
        odd = prod[:, 1::2].sum(1)
        total += even + odd
    out = torch.zeros(m, dtype=torch.float32, device=vals.device)
    valid = enc.perm >= 0
    out[enc.perm[valid].to(torch.int64)] = total[valid]
    return out


# ------------------------------------------------------------------------------------------------------------
# launching (CUDA)
# ------------------------------------------------------------------------------------------------------------
_mod: dict = {}


def _function(name: str, device_index: int):
    from flash_llm.kernels import _build as B

    key = (device_index, name)
    if key in _mod:
        return _mod[key]
    if device_index not in _mod:
        src = Path(__file__).with_name("delta_rows.cu").read_bytes()
        compiled = B.compile_kernels(B.device_arch(device_index), source=src)
        _mod[device_index] = B._check_cu(B._driver().cuModuleLoadData(compiled.cubin), "cuModuleLoadData")
    fn = B._check_cu(B._driver().cuModuleGetFunction(_mod[device_index], name.encode()), name)
    _mod[key] = fn
    return fn


class Scratch:
    """The split partials (fp32 [S, Mp]) and the slices' tickets (zeroed once; the last block resets its own)."""

    def __init__(self, enc: DeltaRows, device):
        self.ws = torch.empty(enc.splits * enc.slices * LANES, dtype=torch.float32, device=device)
        self.tickets = torch.zeros(enc.slices, dtype=torch.int32, device=device)


def launch(enc: DeltaRows, x: torch.Tensor, scratch: Scratch, out: torch.Tensor, bias: torch.Tensor | None = None,
           pf: int = 2, minb: int = 24, pdl: bool = False) -> torch.Tensor:
    """``out[M] = W @ x`` (+ bias) on the current stream; x: [K] contiguous, 16-byte aligned, w's dtype.
    ``pf``: groups prefetched per lane (2, 4, 8); ``minb``: the kernel's blocks per SM bound (24, 32; pf 8: 24);
    ``pdl``: programmatic dependent launch (sm_90: the blocks load their weight before the previous kernel ends)."""
    from flash_llm.kernels import _build as B

    dev = x.device.index or 0
    name = f"delta_rows_n1_{'bf16' if enc.dtype == torch.bfloat16 else 'f16'}_pf{pf}_b{minb}"
    for t in (enc.data, enc.off, enc.starts, enc.win, enc.perm, x, out):
        if not t.is_contiguous() or t.device != x.device:
            raise ValueError("every tensor of the launch must be contiguous and on x's device")
    fn = _function(name, dev)
    shared = 4 * enc.max_window
    if shared > 48 * 1024:
        B._check_cu(B._driver().cuFuncSetAttribute(
            fn, B._driver().CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, shared), "smem")
    args = [(enc.data.data_ptr(), ctypes.c_void_p), (enc.off.data_ptr(), ctypes.c_void_p),
            (enc.starts.data_ptr(), ctypes.c_void_p), (enc.win.data_ptr(), ctypes.c_void_p),
            (x.data_ptr(), ctypes.c_void_p), (out.data_ptr(), ctypes.c_void_p),
            (bias.data_ptr() if bias is not None else 0, ctypes.c_void_p),
            (scratch.ws.data_ptr(), ctypes.c_void_p), (scratch.tickets.data_ptr(), ctypes.c_void_p),
            (enc.perm.data_ptr(), ctypes.c_void_p), (enc.splits, ctypes.c_int)]
    holders = [ctype(value) for value, ctype in args]
    ptrs = (ctypes.c_void_p * len(holders))(*[ctypes.addressof(h) for h in holders])
    stream = torch.cuda.current_stream(x.device).cuda_stream
    drv = B._driver()
    if pdl:
        cfg = drv.CUlaunchConfig()
        cfg.gridDimX, cfg.gridDimY, cfg.gridDimZ = enc.slices, enc.splits, 1
        cfg.blockDimX, cfg.blockDimY, cfg.blockDimZ = 32, 1, 1
        cfg.sharedMemBytes = shared
        cfg.hStream = drv.CUstream(stream)
        attr = drv.CUlaunchAttribute()
        attr.id = drv.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
        attr.value.programmaticStreamSerializationAllowed = 1
        cfg.attrs = [attr]
        cfg.numAttrs = 1
        B._check_cu((drv.cuLaunchKernelEx(cfg, fn, ctypes.addressof(ptrs), 0)[0], None), f"launch of {name}")
        return out
    B._check_cu((drv.cuLaunchKernel(fn, enc.slices, enc.splits, 1, 32, 1, 1, shared, stream,
                                    ctypes.addressof(ptrs), 0)[0], None), f"launch of {name}")
    return out

"""A Llama MLP's down projection laid out by owner, for the one-launch MLP kernel at N = 1.

``delta_rows_mlp_<dtype>_p<P>`` (``flash_llm/kernels/spmm.cu``) runs ``x += down(silu(gate(n)) * up(n))``,
``n = rms_norm(x)``, in one launch: block ``b`` of its grid (``blocks`` blocks of ``warps`` warps) walks the gate / up
slices ``b + blocks * w`` of a paired parts-layout :class:`~flash_llm.formats.delta_rows.DeltaRows` weight (warp ``w``,
one slice each), so it produces ``cols = warps * 16 / P`` intermediate values (column ``w * 16 / P + j``: the gate row
of lane ``P j`` of that slice), and then walks the entries of down that read exactly those columns, for all ``H`` rows.
No block waits for another until the end, where the blocks' row sums meet by atomics.

:class:`OwnedDown` holds down that way: for each block, ``H / 32`` slices of 32 rows (one row a lane, each row's
entries over the block's local columns ``0 .. cols - 1``, a value and a 4-bit step from column 0, as DeltaRows' split
layout with one split), rows ranked by their entries within the block.  The ranked slices go to the block's warps
longest first, each to the warp with the least work so far (its gate / up groups, plus the down groups it holds, plus
:data:`SLICE_COST` a slice), and each warp's slices are stored as one run: the warps then reach the end together,
although their gate / up slices span the whole ranking of gate / up (warp 0 of every block the longest).
Arrays: ``data`` (int32 groups of 160 words, as DeltaRows), ``goff`` (int32, each slice's first group, ``blocks x ns +
1``), ``perm`` (int32, each lane's row of down, -1 for none), ``runs`` (int32 ``[blocks, warps + 1]``: warp ``w``'s
run is the block's slices ``runs[b, w] .. runs[b, w + 1] - 1``).  Derived data: it is built from the dense down weight and
the gate / up weight's row order, and not serialized (a checkpoint holds the DeltaRows weights).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._layout import ceil_div
from .delta_rows import GROUP, GROUP_WORDS, LANES, DeltaRows, _entries, _escapes, _groups, _lay_streams

#: what a down slice costs a warp beyond its groups, in groups (its row's store, the next slice's start)
SLICE_COST = 0.5


class OwnedDown(NamedTuple):
    """Down ``[rows, inter]`` laid out by owner block (module docstring)."""
    data: torch.Tensor   # int32, groups
    goff: torch.Tensor   # int32 [blocks * ns + 1]
    perm: torch.Tensor   # int32 [blocks * ns * 32]: each lane's row of down (-1: none)
    runs: torch.Tensor   # int32 [blocks, warps + 1]: each warp's run of the block's slices
    columns: torch.Tensor  # int64 [blocks, cols]: each block's intermediate columns (-1: none)
    blocks: int
    warps: int
    rows: int

    @property
    def cols(self) -> int:
        return self.columns.shape[1]

    @property
    def slices(self) -> int:
        """Slices a block (``rows / 32``)."""
        return self.rows // LANES

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.data, self.goff, self.perm, self.runs))


def owner_columns(gate_up: DeltaRows, blocks: int) -> tuple[torch.Tensor, int]:
    """Each block's intermediate columns ``[blocks, warps * 16 / P]`` (int64, -1 where none) and the warps a block, for
    a paired parts-layout gate / up weight run on ``blocks`` blocks (warp ``w`` of block ``b`` walks slice
    ``b + blocks * w``)."""
    lay = gate_up.layout
    if not (isinstance(gate_up, DeltaRows) and lay.parts > 1 and lay.paired):
        raise ValueError("gate_up must be a DeltaRows weight of the parts layout with paired halves "
                         f"(got parts={lay.parts}, paired={lay.paired})")
    if not isinstance(blocks, int) or blocks < 1:
        raise ValueError(f"blocks must be a positive int, got {blocks!r}")
    p, sg = lay.parts, lay.slices
    warps = ceil_div(sg, blocks)
    if warps > 32:
        raise ValueError(f"blocks={blocks} gives {warps} warps a block for {sg} gate / up slices; at most 32 "
                         f"(use at least {ceil_div(sg, 32)} blocks)")
    perm = gate_up._offset_arrays()[3]
    dev = perm.device
    s = torch.arange(blocks, device=dev)[:, None] + blocks * torch.arange(warps, device=dev)[None, :]  # [B, W]
    lanes = p * torch.arange(16 // p, device=dev)
    idx = (LANES * s.clamp(max=sg - 1))[:, :, None] + lanes[None, None, :]
    cols = torch.where((s < sg)[:, :, None], perm[idx], torch.full_like(idx, -1))
    return cols.reshape(blocks, -1), warps


def owned_down(gate_up: DeltaRows, down: torch.Tensor, blocks: int) -> OwnedDown:
    """Lay ``down`` (dense ``[H, I]``, fp16 / bf16, ``H % 32 == 0``; ``I`` the gate / up weight's rows / 2) out by
    owner for ``blocks`` blocks of the MLP kernel over ``gate_up`` (:func:`owner_columns`), on ``down``'s device."""
    h, inter = down.shape
    if h % LANES:
        raise ValueError(f"down has {h} rows; the owner layout needs a multiple of {LANES}")
    if gate_up.shape[0] != 2 * inter:
        raise ValueError(f"down has {inter} columns but gate_up {gate_up.shape[0]} rows (want 2 x {inter})")
    columns, warps = owner_columns(gate_up, blocks)
    columns = columns.to(down.device)
    c = columns.shape[1]
    ns = h // LANES
    dev = down.device
    # the blocks' column sets side by side: [B, H, C] as B H rows of C columns
    w = down[:, columns.clamp(min=0).reshape(-1)].view(h, blocks, c)
    w = torch.where((columns >= 0)[None], w, torch.zeros((), dtype=w.dtype, device=dev))
    w = w.permute(1, 0, 2).reshape(blocks * h, c)
    rows, cols = (w != 0).nonzero(as_tuple=True)
    vals = w.view(torch.int16)[rows, cols]
    first = torch.ones(rows.numel(), dtype=torch.bool, device=dev)
    first[1:] = rows[1:] != rows[:-1]
    prev = torch.zeros_like(cols)
    prev[1:] = cols[:-1]
    prev[first] = 0
    gap = cols - prev
    esc = _escapes(gap)
    ent = torch.zeros(blocks * h, dtype=torch.int64, device=dev).index_add_(0, rows, esc + 1)
    # rank within each block by entries (descending, stable): ranked slice k holds ranks 32 k .. 32 k + 31
    top = int(ent.max()) + 1 if ent.numel() else 1
    blk = torch.arange(blocks * h, device=dev) // h
    order = torch.sort(blk * top + (top - 1 - ent), stable=True).indices
    r_in = torch.arange(blocks * h, device=dev) % h  # the rank within the block at each place of `order`
    k = r_in // LANES
    pos, runs = _deal(gate_up, blocks, warps, ent[order].view(blocks, ns, LANES).amax(2))
    pos = pos.view(-1)[(blk * ns + k)]
    lane_of = torch.empty(blocks * h, dtype=torch.int64, device=dev)
    lane_of[order] = (blk * ns + pos) * LANES + r_in % LANES
    vals2, steps2, groups, _ = _lay_streams(lane_of[rows], first, vals, gap, esc, blocks * h)
    data, goff = _groups(vals2, steps2, groups)
    perm = torch.empty(blocks * h, dtype=torch.int64, device=dev)
    perm[lane_of] = torch.arange(blocks * h, device=dev) % h
    return OwnedDown(data.to(torch.int32).contiguous(), goff.to(torch.int32).contiguous(),
                     perm.to(torch.int32).contiguous(), runs.to(torch.int32).contiguous(), columns, blocks, warps, h)


def _deal(gate_up: DeltaRows, blocks: int, warps: int, longest: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each block's ranked down slices dealt to its warps (module docstring): ``longest [blocks, ns]`` the longest
    lane's entries of each ranked slice (descending).  Returns each ranked slice's place in the block's stored order
    ``[blocks, ns]`` and the warps' runs ``[blocks, warps + 1]`` (int64)."""
    dev = longest.device
    ns = longest.shape[1]
    goff = gate_up._offset_arrays()[0].to(dev)
    sg = goff.numel() - 1
    s = torch.arange(blocks, device=dev)[:, None] + blocks * torch.arange(warps, device=dev)[None, :]
    load = torch.where(s < sg, (goff[1:] - goff[:-1])[s.clamp(max=sg - 1)], torch.zeros_like(s)).double()
    cost = (longest + GROUP - 1).div(GROUP, rounding_mode="floor").double() + SLICE_COST
    owner = torch.empty(blocks, ns, dtype=torch.int64, device=dev)
    rows = torch.arange(blocks, device=dev)
    for j in range(ns):  # longest first (the ranking's order), each to the least loaded warp of its block
        w = load.argmin(1)
        owner[:, j] = w
        load[rows, w] += cost[:, j]
    key = owner * ns + torch.arange(ns, device=dev)[None, :]  # by warp, then in ranked order
    place = torch.empty_like(owner)
    place.scatter_(1, key.argsort(1), torch.arange(ns, device=dev).expand(blocks, ns).contiguous())
    counts = torch.zeros(blocks, warps, dtype=torch.int64, device=dev).scatter_add_(1, owner, torch.ones_like(owner))
    runs = torch.zeros(blocks, warps + 1, dtype=torch.int64, device=dev)
    runs[:, 1:] = counts.cumsum(1)
    return place, runs


def owned_to_dense(od: OwnedDown, inter: int, dtype: torch.dtype) -> torch.Tensor:
    """The dense down ``[rows, inter]`` an :class:`OwnedDown` holds (the inverse of :func:`owned_down`, for checks)."""
    nsl = od.blocks * od.slices
    dev = od.data.device
    z = torch.zeros(18 * nsl, dtype=torch.int32, device=dev)
    offsets = torch.cat([od.goff, z, od.perm])  # DeltaRows' split layout, one split, starts and windows unused
    assert od.data.numel() % GROUP_WORDS == 0
    rank, vals, cols, _ = _entries(od.data, offsets, nsl * LANES)
    keep = vals != 0
    rank, vals, cols = rank[keep], vals[keep], cols[keep]
    row = od.perm.to(torch.int64)[rank]
    col = od.columns[rank // (od.slices * LANES), cols]
    if bool(((row < 0) | (col < 0)).any()):
        raise ValueError("an entry of the owner layout lies outside down (a padding row or column)")
    out = torch.zeros(od.rows * inter, dtype=torch.int16, device=dev)
    out[row * inter + col] = vals
    return out.view(od.rows, inter).view(dtype)

"""Megatron-style tensor-parallel projections and the sharding of a :mod:`flash_llm.models` causal LM.

* :class:`ColumnParallelLinear`: the output features are split (q/k/v by whole heads, gate/up/fc1 by features);
  the input is replicated, the output stays sharded, no communication.
* :class:`RowParallelLinear`: the input features are split (o/out_proj by heads, down/fc2 by features); each rank
  multiplies its slice and one all-reduce sums the partial outputs.  Rank 0's partial product includes the bias
  (so it is counted once, inside the product's own epilogue: with one rank the computation is exactly the
  single-process one).

So each decoder layer costs two all-reduces of a ``[tokens, hidden]`` activation.  Embeddings, norms and
``lm_head`` are replicated: every rank computes the full logits, and sampling takes rank 0's tokens.

Each rank's local layer is a dense ``nn.Linear`` or a :class:`~flash_llm.SparseLinear` holding only its slice,
compressed on its own; slices of one weight hold different numbers of nonzeros, which :class:`ShardReport`
shows.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn
from tqdm import tqdm

from ..formats._base import VALUE_DTYPES, SparseFormat, count_nonzero
from ..models import CausalLM
from ..models._merge import MergedLinear
from ..models.config import ModelConfig
from ..models.llama import LlamaAttention
from ..models.opt import OPTAttention
from ..nn import SparseLinear, SparsifyConfig, _compressed, _format_class, _human, _replacement_drops
from .group import TensorParallel

COLUMN, ROW = "column", "row"


# ---- the plan ----------------------------------------------------------------------------------------------
def shard_plan(config: ModelConfig) -> dict[str, str]:
    """How each projection of one decoder layer is split: ``{name relative to the layer: "column" | "row"}``,
    in :meth:`ModelConfig.linear_shapes` order."""
    row = {"self_attn.o_proj", "mlp.down_proj", "self_attn.out_proj", "fc2"}
    return {name: ROW if name in row else COLUMN for name, _, _ in config.linear_shapes()}


def layer_prefix(config: ModelConfig) -> str:
    return "model.layers" if config.family == "llama" else "model.decoder.layers"


def projections(config: ModelConfig) -> Iterator[tuple[str, str, int, int]]:
    """``(fqn, kind, out_features, in_features)`` of every decoder projection, in model order (global shapes)."""
    plan = shard_plan(config)
    for i in range(config.num_layers):
        for name, m, k in config.linear_shapes():
            yield f"{layer_prefix(config)}.{i}.{name}", plan[name], m, k


def check_divisible(config: ModelConfig, world_size: int) -> None:
    """Raise ``ValueError`` unless ``world_size`` ranks can each take whole attention heads, whole KV heads and
    an equal share of the MLP's intermediate features."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    c = config
    bad = [f"{what} ({n}) is not a multiple of it" for what, n in
           (("num_heads", c.num_heads), ("num_kv_heads", c.num_kv_heads), ("intermediate_size", c.intermediate_size))
           if n % world_size]
    if bad:
        ok = [k for k in range(1, c.num_kv_heads + 1)
              if c.num_heads % k == 0 and c.num_kv_heads % k == 0 and c.intermediate_size % k == 0]
        raise ValueError(f"cannot split {c.name or 'the model'} over a tensor-parallel world size of {world_size}: "
                         + "; ".join(bad) + f". Each rank needs whole attention heads and whole KV heads; world "
                         f"sizes that work for this model: {ok}")


def check_sparsify(sparsify) -> None:
    """``sparsify`` of the sharding functions: a :class:`~flash_llm.SparsifyConfig` or None, else TypeError; its
    fields checked again (``SparsifyConfig._checked``: a field may be set after construction), as
    :func:`flash_llm.sparsify_` does, so a bad one is refused, naming it, before anything is read or sharded."""
    if sparsify is not None and not isinstance(sparsify, SparsifyConfig):
        raise TypeError(f"sparsify must be a flash_llm.SparsifyConfig or None, got {type(sparsify).__name__}")
    if sparsify is not None:
        sparsify._checked()


def shard_range(n: int, world_size: int, rank: int) -> tuple[int, int]:
    """``(start, stop)`` of rank ``rank``'s equal share of ``n`` features; ValueError unless ``world_size`` divides
    ``n`` (the rest would be nobody's: the public paths check the config first, :func:`check_divisible`)."""
    if n % world_size:
        raise ValueError(f"{n} features do not split into {world_size} equal shares")
    size = n // world_size
    return rank * size, (rank + 1) * size


# ---- the layers --------------------------------------------------------------------------------------------
def _dense_linear(w: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta", dtype=w.dtype)
    lin.weight = nn.Parameter(w, requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias, requires_grad=False)
    return lin


def _local_nnz(layer: nn.Module) -> int:
    if isinstance(layer, SparseLinear):
        return layer.nnz
    return count_nonzero(layer.weight)


def _local_nbytes(layer: nn.Module) -> int:
    if isinstance(layer, SparseLinear):
        return layer.nbytes
    return layer.weight.numel() * layer.weight.element_size()


class _ParallelLinear(nn.Module):
    kind = ""

    def __init__(self, local: nn.Module, in_features: int, out_features: int, start: int, stop: int,
                 tp: TensorParallel, note: str = ""):
        super().__init__()
        if not isinstance(local, (nn.Linear, SparseLinear)):
            raise TypeError(f"local must be an nn.Linear or a flash_llm.SparseLinear, got {type(local).__name__}")
        full = in_features if self.kind == ROW else out_features  # (the sharded dimension's full size)
        for name, v in (("in_features", in_features), ("out_features", out_features), ("start", start),
                        ("stop", stop)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name} must be an int, got {type(v).__name__}")
        if not 0 <= start < stop <= full:
            raise ValueError(f"a {self.kind} shard [start:stop] must satisfy 0 <= start < stop <= "
                             f"{'in' if self.kind == ROW else 'out'}_features ({full}), got [{start}:{stop}]")
        self.linear = local
        self.in_features, self.out_features = in_features, out_features
        self.start, self.stop = start, stop
        self.tp = tp
        self.note = note  # why a slice stayed dense, when compression was asked for

    @property
    def nnz(self) -> int:
        """Nonzeros of this rank's slice of the weight."""
        return _local_nnz(self.linear)

    @property
    def nbytes(self) -> int:
        """Bytes of this rank's slice of the weight as stored (compressed arrays, or dense)."""
        return _local_nbytes(self.linear)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.kind} shard "
                f"[{self.start}:{self.stop}] of rank {self.tp.rank}/{self.tp.world_size}")


class ColumnParallelLinear(_ParallelLinear):
    """``y_r = x @ W[start:stop]^T + b[start:stop]``: this rank's output features of ``W [out_features,
    in_features]``; no communication.

    Args:
        local: this rank's layer, ``nn.Linear`` or :class:`~flash_llm.SparseLinear` of shape ``[stop - start,
            in_features]`` with the matching bias slice.
        in_features, out_features: the full (unsharded) sizes.
        start, stop: the output features this rank holds.
        tp: the :class:`TensorParallel` group.

    ``forward``: ``x [..., in_features]`` (replicated on every rank) -> ``[..., stop - start]`` in ``x``'s dtype.
    """

    kind = COLUMN

    def __init__(self, local, in_features, out_features, start, stop, tp, note: str = ""):
        super().__init__(local, in_features, out_features, start, stop, tp, note)
        if (local.out_features, local.in_features) != (stop - start, in_features):
            raise ValueError(f"local layer is {local.out_features}x{local.in_features}; a column shard "
                             f"[{start}:{stop}] of a {out_features}x{in_features} weight is "
                             f"{stop - start}x{in_features}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class RowParallelLinear(_ParallelLinear):
    """``y = all_reduce(x_r @ W[:, start:stop]^T (+ b on rank 0))``: this rank's input features of ``W
    [out_features, in_features]``, partial outputs summed over the group (one all-reduce).

    Args:
        local: this rank's layer, ``nn.Linear`` or :class:`~flash_llm.SparseLinear` of shape ``[out_features,
            stop - start]``; on rank 0 with the full bias ``[out_features]`` (if the weight has one), on every
            other rank without bias (so the bias is added once).
        in_features, out_features, start, stop, tp: as for :class:`ColumnParallelLinear` (``start:stop`` on the
            input features).

    ``forward``: ``x [..., stop - start]`` (this rank's shard of the input) -> ``[..., out_features]``, the same
    on every rank.  Every rank of the group must call it (it is a collective).
    """

    kind = ROW

    def __init__(self, local, in_features, out_features, start, stop, tp, note: str = ""):
        super().__init__(local, in_features, out_features, start, stop, tp, note)
        if (local.out_features, local.in_features) != (out_features, stop - start):
            raise ValueError(f"local layer is {local.out_features}x{local.in_features}; a row shard [{start}:{stop}] "
                             f"of a {out_features}x{in_features} weight is {out_features}x{stop - start}")
        if local.bias is not None and tp.rank != 0:
            raise ValueError(f"rank {tp.rank}'s row-parallel local layer has a bias; only rank 0's may (the "
                             "all-reduce would add it once per rank)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce_(self.linear(x))


# ---- building local layers ---------------------------------------------------------------------------------
def _matches(fqn: str, names) -> bool:
    return any(fqn == n or fqn.endswith("." + n) for n in names)


def local_layer(w: torch.Tensor, bias: torch.Tensor | None, fqn: str, *, fmt=None,
                sparsify: SparsifyConfig | None = None) -> tuple[nn.Module, str]:
    """This rank's layer for a weight slice ``w [m, k]`` (and ``bias [m]`` or ``None``), on ``w``'s device.
    ``w`` may be a compressed slice already (a :class:`~flash_llm.formats.SparseFormat`): it is used as it is.

    ``fmt`` (a format class or name) compresses the slice into that format whatever its sparsity (the source
    layer was compressed); else ``sparsify`` decides as :func:`flash_llm.sparsify_` does, with its fields checked
    again (``skip_names``; a cast to ``SparsifyConfig.dtype``, or of the bias to the weight's dtype, that is not
    exact to rounding; ``min_sparsity``; a shape the format cannot hold; only when the compressed slice is smaller:
    :func:`flash_llm.nn._compressed`); else the slice stays a dense ``nn.Linear``.  A slice neither fp16 / bf16 nor
    cast by ``SparsifyConfig.dtype`` is refused (TypeError).  Returns ``(layer, note)``: ``note`` says why a slice
    stayed dense when compression was asked for, else ``""``.  The layer takes ownership of ``w`` and ``bias`` when
    it is dense (no copy), in their own dtype.
    """
    if isinstance(w, SparseFormat):  # a slice of a compressed weight, cut as it is (SparseFormat.slice)
        return SparseLinear(w, bias), ""
    if fmt is not None:
        return SparseLinear(_format_class(fmt).from_dense(w), bias), ""
    if sparsify is None:
        return _dense_linear(w, bias), ""
    fmt_cls, skip_names = sparsify._checked()  # (again: a field may be set after construction, as in sparsify_)
    if _matches(fqn, skip_names):
        return _dense_linear(w, bias), f"name in skip_names {skip_names}"
    if (sparsify.dtype or w.dtype) not in VALUE_DTYPES:
        raise TypeError(f"{fqn}: compressed weights hold fp16/bf16, but the weight slice is {w.dtype}; cast the "
                        "model to torch.float16 or torch.bfloat16, or set SparsifyConfig(dtype=...)")
    dense = _dense_linear(w, bias)
    layer, why = _compressed(dense, fqn, sparsify, fmt_cls, "tensor parallel")  # (the checks and words of sparsify_)
    return (dense, why) if layer is None else (layer, "")


def parallel_linear(kind: str, weight: torch.Tensor, bias: torch.Tensor | None, tp: TensorParallel, fqn: str = "",
                    *, fmt=None, sparsify: SparsifyConfig | None = None, device=None) -> _ParallelLinear:
    """Shard a full weight for this rank: ``weight [out_features, in_features]`` and ``bias [out_features]``
    (any device) -> a :class:`ColumnParallelLinear` (``kind="column"``) or :class:`RowParallelLinear`
    (``kind="row"``) on ``device`` (default ``tp.device``) holding only this rank's slice (a copy: the full
    weight can be freed).  ``fmt`` / ``sparsify``: see :func:`local_layer`.  A bias of another shape than
    ``[out_features]`` is refused (ValueError naming ``bias`` and ``fqn``), before anything is sliced: a column
    shard would take its ``[start:stop]`` of any length, and a row shard fail only at its first forward."""
    if kind not in (COLUMN, ROW):
        raise ValueError(f"kind must be {COLUMN!r} or {ROW!r}, got {kind!r}")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{fqn or 'parallel_linear'}: weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"{fqn or 'parallel_linear'}: weight has shape {tuple(weight.shape)}; expected a 2-D "
                         "[out_features, in_features]")
    m, k = weight.shape
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"{fqn or 'parallel_linear'}: bias must be a torch.Tensor or None, got "
                            f"{type(bias).__name__}")
        if tuple(bias.shape) != (m,):
            raise ValueError(f"{fqn or 'parallel_linear'}: bias has shape {tuple(bias.shape)}; a {m}x{k} weight "
                             f"needs a bias of shape ({m},) ([out_features])")
    start, stop = shard_range(m if kind == COLUMN else k, tp.world_size, tp.rank)
    device = tp.device if device is None else torch.device(device)

    def piece(t):  # a contiguous copy on the device: the full tensor is not kept alive by a view
        return t.to(device=device, memory_format=torch.contiguous_format, copy=True)

    if kind == COLUMN:
        return column_from_slice(piece(weight[start:stop]), None if bias is None else piece(bias[start:stop]),
                                 m, start, tp, fqn, fmt=fmt, sparsify=sparsify)
    return row_from_slice(piece(weight[:, start:stop]), None if bias is None else piece(bias), k, start, tp, fqn,
                          fmt=fmt, sparsify=sparsify)


def column_from_slice(w: torch.Tensor, bias, out_features: int, start: int, tp, fqn: str = "", *, fmt=None,
                      sparsify=None) -> ColumnParallelLinear:
    """A :class:`ColumnParallelLinear` from this rank's slice ``w [stop - start, in_features]`` (and bias slice)."""
    local, note = local_layer(w, bias, fqn, fmt=fmt, sparsify=sparsify)
    return ColumnParallelLinear(local, w.shape[1], out_features, start, start + w.shape[0], tp, note)


def row_from_slice(w: torch.Tensor, bias, in_features: int, start: int, tp, fqn: str = "", *, fmt=None,
                   sparsify=None) -> RowParallelLinear:
    """A :class:`RowParallelLinear` from this rank's slice ``w [out_features, stop - start]`` and the full bias
    (kept on rank 0 only)."""
    local, note = local_layer(w, bias if tp.rank == 0 else None, fqn, fmt=fmt, sparsify=sparsify)
    return RowParallelLinear(local, in_features, w.shape[0], start, start + w.shape[1], tp, note)


def set_local_heads(model: CausalLM, world_size: int) -> None:
    """Record the per-rank head counts on the attention modules (their forward infers them from the shapes)."""
    cfg = model.config
    for m in model.modules():
        if isinstance(m, (LlamaAttention, OPTAttention)):
            m.num_heads = cfg.num_heads // world_size
            if isinstance(m, LlamaAttention):
                m.num_kv_heads = cfg.num_kv_heads // world_size


# ---- sharding an in-memory model ---------------------------------------------------------------------------
def _check_projections(model: CausalLM, cfg) -> None:
    """What :func:`tensor_parallel_` shards, checked before it changes anything: every projection there, an
    ``nn.Linear`` or :class:`~flash_llm.SparseLinear` of the config's shape, with its weights loaded, carrying
    nothing that a layer rebuilt from its weight and bias would drop (:func:`flash_llm.nn._replacement_drops`:
    hooks, a ``forward`` of its own, a parametrization)."""
    for fqn, _, m, k in projections(cfg):
        parent_name, _, name = fqn.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, name, None)
        if old is None:
            merged = [n for n, c in parent.named_children() if isinstance(c, MergedLinear)]
            if merged:
                raise ValueError(f"{fqn} is merged into {parent_name}.{merged[0]} (Engine(merge=True) or "
                                 "merge_projections); call flash_llm.models.unmerge_projections(model) first")
            raise ValueError(f"{fqn} is missing; the model does not match its config")
        if isinstance(old, SparseLinear):
            meta, shape = old.weight_data.is_meta, (old.out_features, old.in_features)
        elif isinstance(old, nn.Linear):
            meta, shape = old.weight.is_meta, tuple(old.weight.shape)
        else:
            raise TypeError(f"{fqn} is a {type(old).__name__}; expected nn.Linear or flash_llm.SparseLinear")
        if meta:
            raise ValueError(f"{fqn}.weight is on the meta device; load the weights first")
        if shape != (m, k):
            raise ValueError(f"{fqn}.weight has shape {shape}; the config says ({m}, {k})")
        if (why := _replacement_drops(old)) is not None:  # (what sparsify_ keeps dense and merge_projections refuses)
            raise ValueError(f"{fqn}: {why}; tensor_parallel_ rebuilds each projection from its weight and bias "
                             "alone, so the sharded model would compute something else: remove it first")


def tensor_parallel_(model: CausalLM, tp: TensorParallel | None = None, *, sparsify: SparsifyConfig | None = None,
                     progress: bool = False) -> "ShardReport":
    """Turn a single-process :mod:`flash_llm.models` causal LM into this rank's tensor-parallel part, in place.

    Every decoder projection is replaced by a :class:`ColumnParallelLinear` (q, k, v, gate, up, fc1: whole
    heads / equal feature shares) or :class:`RowParallelLinear` (o / out_proj, down, fc2) holding only this
    rank's slice: a dense ``nn.Linear`` stays dense (unless ``sparsify`` is given), a
    :class:`~flash_llm.SparseLinear` is expanded one layer at a time and its slice compressed again in the same
    format.  Embeddings, norms and ``lm_head`` stay replicated.  The model is then moved to ``tp.device`` and
    keeps ``tp`` as ``model.tensor_parallel``; :class:`flash_llm.engine.Engine` runs it (its KV cache holds
    this rank's KV heads only).  Every rank must call this with the same model (same weights).  Each new module
    (and its local layer) takes the training flag of the projection it replaces, as in an ``eval()`` model.

    The full model must fit in this process' memory first (tests, small models, synthetic weights); to load a
    large checkpoint without any rank holding all of it, use :func:`flash_llm.parallel.load_tensor_parallel`.

    Args:
        model: ``LlamaForCausalLM`` / ``OPTForCausalLM`` with its weights loaded (dense or sparsified).
        tp: the group (default: :meth:`TensorParallel.from_group` on the default process group).
        sparsify: compress dense slices with this :class:`~flash_llm.SparsifyConfig` (decided per slice, as
            :func:`flash_llm.sparsify_` decides: a cast to ``SparsifyConfig.dtype`` that is not exact to rounding
            keeps the slice dense, the reason in its note); fp32 slices need ``SparsifyConfig.dtype`` (TypeError).
        progress: a tqdm bar over the decoder layers (stderr).

    Returns:
        This rank's :class:`ShardReport` (nonzeros and bytes per slice).

    Raises:
        ValueError: the world size does not divide the heads, KV heads or intermediate size (raised on every
            rank, before any communication); the model is already tensor-parallel or still on ``meta``; a
            projection carries what a rebuilt layer would drop (forward hooks, a ``forward`` of its own, a
            parametrization: as :func:`flash_llm.sparsify_` keeps such a layer dense).  A ``sparsify`` field set
            after construction that ``SparsifyConfig`` refuses raises as in ``sparsify_`` (ValueError or
            TypeError naming it).  All before the model is changed.
    """
    if not isinstance(model, CausalLM):
        raise TypeError(f"model must be a flash_llm.models causal LM, got {type(model).__name__}")
    if getattr(model, "tensor_parallel", None) is not None:
        raise ValueError(f"the model is already tensor-parallel ({model.tensor_parallel})")
    check_sparsify(sparsify)
    tp = TensorParallel.from_group() if tp is None else tp
    cfg = model.config
    check_divisible(cfg, tp.world_size)
    _check_projections(model, cfg)  # (all of them before any is replaced: an error leaves the model as it was)
    per_layer = len(cfg.linear_shapes())
    bar = tqdm(total=cfg.num_layers, desc=f"sharding (rank {tp.rank}/{tp.world_size})", file=sys.stderr,
               leave=False, disable=not progress, dynamic_ncols=True)
    # Every slice is built before any is swapped in: a refusal while building one (local_layer's dtype check, a
    # format's limit, out of memory) leaves the model as it was, not half-sharded.  (The slices are copies, so the
    # peak holds the model plus this rank's slices, which the docstring's "must fit" already asks for.)
    plan: list[tuple[nn.Module, str, _ParallelLinear]] = []
    try:
        with torch.no_grad():
            for i, (fqn, kind, m, k) in enumerate(projections(cfg)):
                parent_name, _, name = fqn.rpartition(".")
                parent = model.get_submodule(parent_name)
                old = getattr(parent, name)
                if isinstance(old, SparseLinear):
                    weight, bias, fmt = old.to_dense(), old.bias, old.weight_format
                else:
                    weight, bias, fmt = old.weight.detach(), old.bias, None
                plan.append((parent, name, parallel_linear(kind, weight, None if bias is None else bias.detach(), tp,
                                                           fqn, fmt=fmt, sparsify=sparsify)))
                del old, weight, bias
                if (i + 1) % per_layer == 0:
                    bar.update(1)
    finally:
        bar.close()
    for parent, name, new in plan:
        new.train(getattr(parent, name).training)  # (the flag of the layer it replaces, as in an eval() model)
        setattr(parent, name, new)
    del plan
    set_local_heads(model, tp.world_size)
    model.to(tp.device)
    model.tensor_parallel = tp
    return ShardReport.of(model)


# ---- reports -----------------------------------------------------------------------------------------------
@dataclass
class ShardedLayer:
    """One projection's slice on one rank.  ``shape`` is the full weight, ``local_shape`` this rank's slice,
    ``start:stop`` the features it holds (output features for ``column``, input features for ``row``)."""

    fqn: str
    kind: str
    shape: tuple[int, int]
    local_shape: tuple[int, int]
    start: int
    stop: int
    format: str
    nnz: int
    nbytes: int
    note: str = ""


@dataclass
class ShardReport:
    """What one rank holds: every projection slice (:class:`ShardedLayer`) and the bytes of everything else
    (replicated embeddings, norms, ``lm_head``; biases: rank 0 also holds the full row-parallel biases, which
    the other ranks leave out, so its ``other_bytes`` are larger).

    ``reports = tp.all_gather_object(report)`` collects every rank's; :meth:`table` compares them.
    """

    rank: int
    world_size: int
    layers: list[ShardedLayer] = field(default_factory=list)
    other_bytes: int = 0

    @classmethod
    def of(cls, model: nn.Module) -> "ShardReport":
        """The report of a tensor-parallel model as it is now (e.g. after ``flash_llm.sparsify_`` on it)."""
        tp = getattr(model, "tensor_parallel", None)
        if tp is None:
            raise ValueError("the model is not tensor-parallel (no model.tensor_parallel)")
        rep = cls(tp.rank, tp.world_size)
        counted = set()
        for fqn, m in model.named_modules():
            if isinstance(m, _ParallelLinear):
                lin = m.linear
                fmt = lin.weight_format.__name__ if isinstance(lin, SparseLinear) else "dense"
                rep.layers.append(ShardedLayer(fqn, m.kind, (m.out_features, m.in_features),
                                               (lin.out_features, lin.in_features), m.start, m.stop, fmt, m.nnz,
                                               m.nbytes, m.note if fmt == "dense" else ""))
                counted |= {id(t) for n, t in [*lin.named_parameters(), *lin.named_buffers()] if n != "bias"}
        stored = {id(t): t for t in [*model.parameters(), *model.buffers()] if id(t) not in counted}
        rep.other_bytes = sum(t.numel() * t.element_size() for t in stored.values())
        return rep

    @property
    def nnz(self) -> int:
        return sum(s.nnz for s in self.layers)

    @property
    def projection_bytes(self) -> int:
        return sum(s.nbytes for s in self.layers)

    @property
    def total_bytes(self) -> int:
        return self.projection_bytes + self.other_bytes

    def __str__(self) -> str:
        kinds: dict[str, int] = {}
        for s in self.layers:
            kinds[s.format] = kinds.get(s.format, 0) + 1
        lines = [f"rank {self.rank} of {self.world_size}: {len(self.layers)} projection slices ("
                 + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) + f"), {self.nnz:,} nonzeros, "
                 f"{_human(self.projection_bytes)}; replicated and other weights {_human(self.other_bytes)}; "
                 f"total {_human(self.total_bytes)}"]
        dense = [s for s in self.layers if s.note]
        if dense:
            lines.append(f"  kept dense: {len(dense)} slice(s), e.g. {dense[0].fqn}: {dense[0].note}")
        return "\n".join(lines)

    @staticmethod
    def table(reports: list["ShardReport"]) -> str:
        """Every rank's totals side by side, and how uneven the slices are: max / mean nonzeros over the ranks,
        for the whole model and for its most uneven projection.  ``reports``: one or more (every rank's, from
        ``tp.all_gather_object(report)``); an empty list is a ``ValueError``."""
        reports = list(reports)
        if not reports:
            raise ValueError("reports is empty: ShardReport.table needs at least one rank's ShardReport (every rank's, "
                             "from tp.all_gather_object(report))")
        rows = [("rank", "slices", "nonzeros", "projections", "other", "total")]
        rows += [(str(r.rank), str(len(r.layers)), f"{r.nnz:,}", _human(r.projection_bytes), _human(r.other_bytes),
                  _human(r.total_bytes)) for r in reports]
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in rows]
        mean = sum(r.nnz for r in reports) / len(reports)
        if mean > 0:
            lines.append(f"nonzeros max / mean over ranks: {max(r.nnz for r in reports) / mean:.4f}")
        worst = None
        for i, s in enumerate(reports[0].layers):
            counts = [r.layers[i].nnz for r in reports if i < len(r.layers)]
            avg = sum(counts) / len(counts)
            if avg > 0 and (worst is None or max(counts) / avg > worst[0]):
                worst = (max(counts) / avg, s.fqn, counts)
        if worst is not None:
            lines.append(f"most uneven projection: {worst[1]}: nonzeros per rank {worst[2]} (max / mean "
                         f"{worst[0]:.4f})")
        return "\n".join(lines)



"""Projections that read the same input, merged into one matmul: q, k, v -> ``qkv_proj``; gate, up -> ``gate_up_proj``.

At decode the matmuls are small: Llama-3-8B's k and v projections read 8 MB each (dense), a few microseconds
of memory time, about what a kernel launch costs inside a CUDA graph.  One matmul over the stacked weight reads
the same bytes with one launch and fills the GPU better.  The stacked weight is built once:

* dense ``nn.Linear``: the weights (and biases) concatenated along the output features;
* :class:`~flash_llm.SparseLinear`: the compressed weights joined record by record
  (:meth:`~flash_llm.formats.SparseFormat.concat`, no decode when the row counts fall on record boundaries).

Groups whose layers differ (one dense and one sparse, another format, dtype or device, a bias on one only), are
tensor-parallel shards, or carry what the stacked layer would drop (hooks, a ``forward`` of their own or their
class's, submodules or tensors beyond the weight and bias) are left as they are.  Merging changes the module tree and
so the ``state_dict`` keys (``self_attn.qkv_proj.layer.*``); :func:`unmerge_projections` restores the separate layers
exactly.
"""

from __future__ import annotations

import torch
from torch import nn

from ..nn import SparseLinear, _extra_members, _hook_counts
from ._common import overridden_forward


class MergedLinear(nn.Module):
    """``layer(x).split(sizes, -1)``: several projections of one input as one matmul.

    ``layer`` (``nn.Linear`` or :class:`~flash_llm.SparseLinear`) holds the stacked ``[sum(sizes), in_features]``
    weight; ``names`` are the attributes the parts had on their parent module.  ``forward``: ``x [..., in]`` ->
    a tuple of ``[..., sizes[i]]`` views (not contiguous) in ``x``'s dtype.
    """

    def __init__(self, layer: nn.Module, sizes, names, order=()):
        super().__init__()
        self.layer = layer
        self.sizes = tuple(int(s) for s in sizes)
        self.names = tuple(names)
        self.order = tuple(order)  # the parent's child modules before merging, restored by unmerge
        if sum(self.sizes) != layer.out_features:
            raise ValueError(f"sizes {self.sizes} do not add up to the layer's {layer.out_features} output features")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.layer(x).split(self.sizes, dim=-1)

    def extra_repr(self) -> str:
        return ", ".join(f"{n}={s}" for n, s in zip(self.names, self.sizes))


def project(module: nn.Module, target: str, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The outputs of ``module``'s projection group ``target`` (a key of its ``_merge_groups``) for input ``x``: one
    matmul when the group is merged, else one per layer, in the group's order."""
    merged = getattr(module, target)
    if merged is not None:
        return merged(x)
    return tuple(getattr(module, n)(x) for n in module._merge_groups[target])


def sparse_layer(module: nn.Module, name: str, bias_ok: bool = False) -> SparseLinear | None:
    """``module.<name>`` as one :class:`~flash_llm.SparseLinear` (the layer itself, or the stacked layer of a
    :class:`MergedLinear`), without a bias unless ``bias_ok``; else None."""
    layer = getattr(module, name, None)
    if isinstance(layer, MergedLinear):
        layer = layer.layer
    if not isinstance(layer, SparseLinear) or (layer.bias is not None and not bias_ok):
        return None
    return layer


def sparse_gate_up(module: nn.Module) -> SparseLinear | None:
    """``module``'s merged gate / up projection when it is one :class:`~flash_llm.SparseLinear` of two equal halves
    without a bias, whose ``silu(gate) * up`` :func:`flash_llm.ops.spmm_silu_mul` computes in one call; else None."""
    merged = getattr(module, "gate_up_proj", None)
    if not isinstance(merged, MergedLinear) or len(merged.sizes) != 2 or merged.sizes[0] != merged.sizes[1]:
        return None
    return sparse_layer(module, "gate_up_proj")


def _dropped(m: nn.Module) -> list[str]:
    """What a layer rebuilt from ``m``'s weights (stacked, or split back) would drop: ``m``'s hooks
    (:func:`~flash_llm.nn._hook_counts`), a ``forward`` replaced on the instance and one its class overrides
    (:func:`~flash_llm.models._common.overridden_forward`: a subclass adding a LoRA term...): the output would
    change."""
    hooks = _hook_counts(m)
    if "forward" in m.__dict__:
        hooks.append("a forward replaced on the instance (an accelerate-style hook?)")
    cls = overridden_forward(m)
    if cls is not None:
        hooks.append(f"a forward overridden by its class {cls}")
    return hooks


def _own_members(m: nn.Module) -> str | None:
    """The submodules and tensors beyond the weight and bias that a plain ``nn.Linear`` / :class:`SparseLinear`
    ``m`` holds (a LoRA pair or a scale registered on it), which a layer rebuilt from its weight and bias would drop
    with their state-dict keys (:func:`~flash_llm.nn._extra_members`'s reason, ``"has ..."``), or None (for other
    modules too)."""
    base = SparseLinear if isinstance(m, SparseLinear) else nn.Linear if isinstance(m, nn.Linear) else None
    return None if base is None else _extra_members(m, base)


# (an unfilled SparseLinear's forward refuses; a layer stacked from it, or split from it, would not)
_UNFILLED = "arrays are uninitialized memory (to_empty() allocated them without values): load its weights first"


def _why_not(layers: list[nn.Module], names) -> str | None:
    """Why these layers (the attributes ``names`` of their parent) cannot be stacked (None if they can)."""
    kinds = {type(m) for m in layers}
    if len(kinds) != 1 or next(iter(kinds)) not in (nn.Linear, SparseLinear):
        return "the layers are not all nn.Linear or all SparseLinear: " + ", ".join(sorted(k.__name__ for k in kinds))
    first = layers[0]
    for m in layers:
        hooks = _dropped(m)
        if hooks:
            return f"a layer has {' and '.join(hooks)} that merging would drop"
    for m, name in zip(layers, names):
        extra = _own_members(m)
        if extra is not None:
            return f"{name} {extra}"
    if any(getattr(m, "_unfilled", False) for m in layers):
        return f"a layer's {_UNFILLED}"
    if any(m.in_features != first.in_features for m in layers):
        return "in_features differ"
    if len({m.bias is None for m in layers}) != 1:
        return "only some layers have a bias"
    if isinstance(first, SparseLinear):
        if len({(m.weight_format, m.weight_dtype, m.weight_data.device) for m in layers}) != 1:
            return "the compressed weights differ in format, dtype or device"
    elif len({(m.weight.dtype, m.weight.device) for m in layers}) != 1:
        return "the weights differ in dtype or device"
    return None


def _carry_mark(layers: list[nn.Module], into: nn.Module, paired: bool) -> nn.Module:
    """``into``, marked as an engine's re-encoding of DeltaRows (``_delta_rows_paired``: Tiled-CSL or dense, which a
    later engine turns back into DeltaRows with that pairing) when every one of ``layers`` was one."""
    if all(getattr(m, "_delta_rows_paired", None) is not None for m in layers):
        into._delta_rows_paired = paired
    return into


# normal tensors under torch.inference_mode() too, so the layers run with autograd afterwards (as sparsify_'s);
# no_grad inside: entering inference_mode(False) turns grad mode on
@torch.inference_mode(False)
@torch.no_grad()
def _stack(layers: list[nn.Module], pair_halves: bool = False) -> nn.Module:
    out = _carry_mark(layers, _stacked(layers, pair_halves), pair_halves)
    return out.train(layers[0].training)  # (the flag of the layers it replaces, as in an eval() model)


def _stacked(layers: list[nn.Module], pair_halves: bool) -> nn.Module:
    first = layers[0]
    bias = None if first.bias is None else torch.cat([m.bias for m in layers])
    if isinstance(first, SparseLinear):  # (pair_halves: gate / up, kept beside each other where a format asks)
        return SparseLinear(first.weight_format.concat([m.weight for m in layers], pair_halves=pair_halves), bias)
    w = torch.cat([m.weight for m in layers])
    out = nn.Linear(first.in_features, w.shape[0], bias=bias is not None, device="meta", dtype=w.dtype)
    out.weight = nn.Parameter(w, requires_grad=first.weight.requires_grad)
    if bias is not None:
        out.bias = nn.Parameter(bias, requires_grad=first.bias.requires_grad)
    return out


@torch.inference_mode(False)  # (as _stack)
@torch.no_grad()
def _split(layer: nn.Module, sizes: tuple[int, ...]) -> list[nn.Module]:
    parts, r0 = [], 0
    for s in sizes:
        r1 = r0 + s
        bias = None if layer.bias is None else layer.bias[r0:r1].clone()
        if isinstance(layer, SparseLinear):
            parts.append(SparseLinear(layer.weight.slice(rows=(r0, r1)), bias))
        else:
            lin = nn.Linear(layer.in_features, s, bias=bias is not None, device="meta", dtype=layer.weight.dtype)
            lin.weight = nn.Parameter(layer.weight[r0:r1].clone(), requires_grad=layer.weight.requires_grad)
            if bias is not None:
                lin.bias = nn.Parameter(bias, requires_grad=layer.bias.requires_grad)
            parts.append(lin)
        _carry_mark([layer], parts[-1], False).train(layer.training)
        r0 = r1
    return parts


def merge_projections(model: nn.Module) -> dict[str, str]:
    """Stack each group of projections that share an input (``_merge_groups`` of Llama's attention and MLP and
    OPT's attention) into one :class:`MergedLinear`, in place.

    Returns ``{group path: "merged" or why it was left alone}``, e.g.
    ``{"model.layers.0.self_attn.qkv_proj": "merged", ...}``.  Groups already merged are skipped.  The outputs
    equal the separate layers' to rounding (the sparse kernel's split-K choice depends on the stacked shape).
    Memory: each group's stacked weight is built before its parts are freed, so the peak grows by one group.  (Only
    the modules that hold groups are listed up front: a list of every module kept every replaced layer alive to the
    end, which took Llama-3-8B's engine build at 80 % 3.4 GiB above its weights; session 66.)
    """
    report = {}
    for path, module in [(p, m) for p, m in model.named_modules() if getattr(m, "_merge_groups", None)]:
        groups = module._merge_groups
        for target, names in groups.items():
            where = f"{path}.{target}" if path else target
            if isinstance(getattr(module, target, None), MergedLinear):
                continue
            layers = [getattr(module, n) for n in names]
            why = _why_not(layers, names)
            if why is None:
                merged = MergedLinear(_stack(layers, target == "gate_up_proj"), [m.out_features for m in layers],
                                      names, list(module._modules)).train(layers[0].training)
                for n in names:
                    delattr(module, n)
                setattr(module, target, merged)
            del layers  # (the parts go now, not when the next group is stacked)
            report[where] = why or "merged"
    return report


def unmerge_projections(model: nn.Module, *, only=None) -> list[str]:
    """Undo :func:`merge_projections` in place: every :class:`MergedLinear` is split back into its layers (the same
    weights, biases and formats; compressed weights cut with :meth:`~flash_llm.formats.SparseFormat.slice`).
    ``only``: a group path or a collection of them (as :func:`merge_projections` reports them): those groups alone
    are split, the others stay merged and are not checked; a path that names no merged group is a ValueError.
    Returns the paths of the groups split.  A :class:`MergedLinear` (or its stacked layer) with hooks or a
    ``forward`` replaced on the instance or overridden by its class, a stacked layer with submodules or tensors of its
    own beyond the weight and bias, which the split layers would drop, or a stacked
    :class:`~flash_llm.SparseLinear` whose arrays are unfilled (``to_empty()``, which allocates them without
    values: the split layers would compute on them) is a ValueError naming it, raised before any group is split."""
    # (where, parent, attribute, MergedLinear) of every merged group, before any is split
    merged_groups = [(f"{path}.{target}" if path else target, module, target, getattr(module, target))
                     for path, module in model.named_modules()
                     for target in getattr(module, "_merge_groups", None) or ()
                     if isinstance(getattr(module, target, None), MergedLinear)]
    if only is not None:
        only = {only} if isinstance(only, str) else set(only)
        unknown = sorted(only - {where for where, *_ in merged_groups})
        if unknown:
            raise ValueError(f"only={unknown[0]!r} names no merged group of the model (the groups merge_projections "
                             f"stacked: {', '.join(sorted(w for w, *_ in merged_groups)) or 'none'}); nothing was "
                             "unmerged")
    groups = [g for g in merged_groups if only is None or g[0] in only]
    for where, _, _, merged in groups:
        for name, m in ((where, merged), (f"{where}.layer", merged.layer)):
            hooks = _dropped(m)
            if hooks:
                raise ValueError(f"{name} has {' and '.join(hooks)} that unmerging would drop; remove them "
                                 "first (nothing was unmerged)")
        extra = _own_members(merged.layer)
        if extra is not None:
            raise ValueError(f"{where}.layer {extra} (nothing was unmerged)")
        if getattr(merged.layer, "_unfilled", False):
            raise ValueError(f"{where}.layer's {_UNFILLED} (nothing was unmerged)")
    done = []
    for where, module, target, merged in groups:
        for n, part in zip(merged.names, _split(merged.layer, merged.sizes)):
            setattr(module, n, part)
        delattr(module, target)
        setattr(module, target, None)
        rank = {n: i for i, n in enumerate(merged.order)}
        module._modules = dict(sorted(module._modules.items(), key=lambda kv: rank.get(kv[0], len(rank))))
        done.append(where)
    return done

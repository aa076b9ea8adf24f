"""Pruning of a model's ``nn.Linear`` weights, in place: one-shot magnitude, Wanda and SparseGPT (with
one sparsity or per-layer targets, e.g. from :func:`owl_sparsities`), and :func:`gradual_prune_`
(gradual magnitude pruning while fine-tuning).

Each pruner writes exact zeros into the weights and leaves the model dense; compress it afterwards::

    report = flash_llm.prune.sparsegpt_prune_(model, calib, 0.5)   # calib: LongTensor [B, T] or a list
    print(report)                                                   # per layer: sparsity, error
    flash_llm.sparsify_(model)                                      # nn.Linear -> SparseLinear

Calibration data is a tensor (token ids ``[B, T]``, or whatever the model takes) or a sequence of them;
each batch is moved to the device of the model's first parameter (of its first buffer when it has none, e.g.
weights kept as buffers; CPU when it has neither), integer ones (token ids of any integer dtype such as
:func:`flash_llm.data.load_tokens`'s uint8) as int64, and the model is called as ``model(batch)`` under
``torch.no_grad()`` and in eval mode (every submodule's own training flag is restored after).  Calibration inputs
of a pruned layer that contain NaN or Inf are refused (ValueError naming the layer) before any weight is modified,
as are, for a model with an int ``config.vocab_size``, integer batches holding a token id outside it (the check of
:func:`flash_llm.evaluate.evaluate`) and, where it reads token ids (an ``nn.Embedding``; a transformers model's
``main_input_name`` is ``input_ids``), batches that are not integer at all (floating-point, complex or bool: a float
batch is never rounded or truncated to ids; ValueError naming the batch).  Other models take whatever they take (the
float inputs of an MLP, a CTC speech model's audio).

Padding: no attention mask is passed (a calibration batch of the one-shot pruners and :func:`owl_sparsities` is a
plain tensor; a dict or ``BatchEncoding`` is refused), so every position of every batch is counted, pad tokens
included: in Wanda's and OWL's input norms, SparseGPT's Hessians and the reported errors (and with left padding the
pads change the real tokens' activations too).  Pass unpadded sequences: equal-length windows cut from the text (what
:func:`flash_llm.data.calibration_batches` and ``flash-llm prune`` give) or a list of ``[1, T_i]`` batches of
different lengths, never one padded batch.  (:func:`gradual_prune_` takes other batches too: see its "Padding".)

Exact counts.  Each count applies to a group of ``count`` weights; with
``n = min(round(sparsity * count), count - 1)`` (Python's ``round``; at least one weight of the group is
kept, since ``sparsity < 1``, so rounding never empties a layer or a row):

* :func:`magnitude_prune_` zeroes ``n`` weights per layer (``scope="layer"``) or ``n`` of all selected
  weights (``scope="global"``; one threshold over all layers, which can empty a layer of small weights);
* :func:`wanda_prune_` zeroes ``n`` weights in every output row (``count = K``);
* :func:`sparsegpt_prune_` zeroes ``n`` weights per layer (``count = M * K``).

Selection.  Every pruner takes the ``nn.Linear`` layers that ``filter_fn`` accepts, except empty ones
(``in_features`` or ``out_features`` 0: nothing to prune; they are left out of the report, as
:func:`flash_llm.sparsify_` keeps them dense).  A layer whose weight is recomputed from other tensors at
every forward (``torch.nn.utils.parametrize``, ``torch.nn.utils.prune``'s ``weight_orig``/``weight_mask``,
the old ``torch.nn.utils.weight_norm``/``spectral_norm`` hooks) is refused with a ValueError naming it,
as is a weight tied to another tensor, before any layer is modified: zeros written into such a weight
would be undone at the next forward or would zero the other tensor too.  So is a weight that cannot be written in
place (an inference tensor, made under ``torch.inference_mode()`` and pruned outside it, or a weight whose elements
share memory, expanded or of ``as_strided``'s overlapping strides: clone it; :func:`owl_sparsities` only reads the
weights and takes them), and so are a weight whose shape is not the layer's ``(out_features, in_features)`` (the
calibration statistics are sized from those) and a weight holding NaN or Inf (every score would rank it highest, so
it would be kept, and SparseGPT would spread it over its row).

Ties in the score go to the lower flat index (for ``scope="global"``, to the earlier layer first; for
Wanda, within a row, to the lower column), so results are deterministic.  Weights already zero score
lowest and are pruned first, below any other weight of equal score (e.g. Wanda's score 0 of a weight
whose input is zero on every calibration token), so a group ends with exactly ``max(n, zeros it had)``
zeros; a layer that had more zeros than requested keeps them (its reported sparsity is then higher).

Dtypes: scores and updates are computed in fp32 (in fp64 for float64 weights; SparseGPT's Hessian always in
float64) on each weight's device; magnitude and Wanda only write zeros, so the kept weights are bit-identical;
SparseGPT writes its updated weights back in the weight's dtype, and a kept weight that would round to zero in fp16/bf16
becomes the smallest subnormal of its sign, so the zero count stays exact; one beyond the dtype's range (fp16:
65504; the update can enlarge weights several times) is refused with a ValueError naming the layer before it is
written (the layers already pruned get their weights back: prune in fp32 or bf16, or raise ``percdamp``).

Each function returns a :class:`PruneReport`: per layer its fqn, shape, reached sparsity and the
relative reconstruction error ``||W X - W_p X||_F^2 / ||W X||_F^2`` over the calibration inputs ``X``
of that layer (``None`` for magnitude pruning without ``calib``).  When ``W X`` is zero on every
calibration token the error is ``0.0`` if ``W_p X`` is zero too (pruning lost nothing) and ``nan``
otherwise (a relative error of a nonzero change to a zero output is undefined).
"""

from __future__ import annotations

import itertools
import math
import numbers
import sys
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils import prune as torch_prune
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm
from tqdm.auto import tqdm


__all__ = ["magnitude_prune_", "wanda_prune_", "sparsegpt_prune_", "owl_sparsities", "gradual_prune_"]

FilterFn = Callable[[nn.Module, str], bool]


# ---- report ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PrunedLayer:
    """One pruned layer.

    Attributes:
        fqn: fully qualified name in the model (``""`` when the model itself is the ``nn.Linear``).
        shape: ``(out_features, in_features)``.
        sparsity: fraction of exact zeros in the weight after pruning.
        error: ``||W X - W_p X||_F^2 / ||W X||_F^2`` over the layer's calibration inputs, or ``None`` when
            not measured (magnitude pruning without ``calib``).  When ``W X`` is zero on every token:
            ``0.0`` if ``W_p X`` is zero too (nothing lost), else ``nan`` (undefined).
    """

    fqn: str
    shape: tuple[int, int]
    sparsity: float
    error: float | None


@dataclass
class PruneReport:
    """What a pruner did: ``method``, the requested ``target`` sparsity and the ``layers`` in the order
    they were pruned.  Iterating, ``len`` and indexing go over ``layers``."""

    method: str
    target: float
    layers: list[PrunedLayer] = field(default_factory=list)

    def __iter__(self):
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i):
        return self.layers[i]

    @property
    def sparsity(self) -> float:
        """Fraction of zeros over all pruned layers together."""
        total = sum(p.shape[0] * p.shape[1] for p in self.layers)
        return sum(p.sparsity * p.shape[0] * p.shape[1] for p in self.layers) / total if total else 0.0

    def __str__(self) -> str:
        rows = [("layer", "shape", "sparsity", "rel. error")]
        rows += [(p.fqn or "<model>", f"{p.shape[0]}x{p.shape[1]}", f"{p.sparsity:.4f}",
                  "-" if p.error is None else f"{p.error:.4g}") for p in self.layers]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = [f"{self.method}: {len(self.layers)} layer(s), target sparsity {self.target}, "
                 f"reached {self.sparsity:.4f} overall"]
        lines += ["  " + "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
                  for r in rows]
        return "\n".join(lines)


# ---- argument checks --------------------------------------------------------------------------------

def _real(v) -> float | None:
    """``v`` as a float when it is a real number: any ``numbers.Real`` (Python's and numpy's ints and floats,
    ``fractions.Fraction``) or a 0-d integer or floating-point tensor; None for anything else, bools (Python's,
    numpy's or a bool tensor) included.  NaN and Inf are returned as they are: the range checks refuse them."""
    if isinstance(v, torch.Tensor):
        ok = v.ndim == 0 and not v.is_meta and not v.is_complex() and v.dtype != torch.bool
    else:
        ok = isinstance(v, numbers.Real) and not isinstance(v, bool)
    return float(v) if ok else None


def _check_sparsity(sparsity, name: str = "sparsity") -> float:
    """``sparsity`` as a float in ``[0, 1)``: a real number (:func:`_real`: numpy scalars and 0-d tensors too)."""
    value = _real(sparsity)
    if value is None or not 0.0 <= value < 1.0:  # (NaN fails too)
        raise ValueError(f"{name} must be a number in [0, 1) (the fraction of weights set to zero), "
                         f"got {sparsity!r}")
    return value


def _vocab_size(model: nn.Module) -> int | None:
    """The model's int ``config.vocab_size`` (flash-llm's and transformers' configs name it alike): a model that takes
    token ids; None for a model without one."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    return vocab if isinstance(vocab, int) and not isinstance(vocab, bool) else None


def _token_id_error(tokens, model: nn.Module) -> str | None:
    """Why the integer tensor ``tokens`` cannot be fed to ``model``: an id outside ``[0, model.config.vocab_size)``
    (the embedding would fail with a bare IndexError), as ``"token id X is out of range for the model's vocabulary
    of V"``; None when they fit, when ``tokens`` is empty or not integer (not token ids), or when the model has no
    int ``config.vocab_size`` (:func:`_vocab_size`).  Any integer dtype works, uint16/uint32/uint64 too (torch has no
    min/max for those: they are read as int64)."""
    vocab = _vocab_size(model)
    if (vocab is None or not isinstance(tokens, torch.Tensor)
            or not tokens.numel() or tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool):
        return None
    lo, hi = _min_max(tokens)
    if lo < 0 or hi >= vocab:
        return f"token id {lo if lo < 0 else hi} is out of range for the model's vocabulary of {vocab}"
    return None


def _min_max(tokens: torch.Tensor) -> tuple[int, int]:
    """The least and the greatest value of the non-empty integer tensor ``tokens``, as Python ints.  torch has no
    reductions (nor comparisons) for uint16, uint32 and uint64: those are widened to int64 first, uint64 by its bits
    (a value of 2**63 or more reads as negative there, and is given back as itself)."""
    if tokens.dtype not in (torch.uint16, torch.uint32, torch.uint64):
        return int(tokens.min()), int(tokens.max())
    wide = tokens.view(torch.int64) if tokens.dtype == torch.uint64 else tokens.to(torch.int64)
    lo, hi = int(wide.min()), int(wide.max())
    if lo >= 0:
        return lo, hi
    # uint64 values of 2**63 or more: the negative ones of `wide`, each 2**64 below its value
    wrapped, plain = wide[wide < 0], wide[wide >= 0]
    return (int(plain.min()) if plain.numel() else int(wrapped.min()) + 2**64), int(wrapped.max()) + 2**64


def _takes_token_ids(model: nn.Module) -> bool:
    """Whether ``model`` (one with a ``config.vocab_size``) reads token ids: it has an ``nn.Embedding`` and, for a
    transformers model, its ``main_input_name`` is ``input_ids`` (a CTC speech model has a vocabulary, its
    alphabet, but takes float audio: ``input_values``)."""
    if getattr(model, "main_input_name", "input_ids") != "input_ids":
        return False
    return any(isinstance(m, nn.Embedding) for m in model.modules())


def _token_batch_error(b: torch.Tensor, model: nn.Module, name: str) -> str | None:
    """Why the tensor batch ``b`` (the argument ``name``, e.g. ``"calib[1]"``) cannot be fed to ``model``, a message
    that starts with ``name``; None when it can.  A model with a vocabulary (:func:`_vocab_size`) that reads token
    ids (:func:`_takes_token_ids`) takes integer ones: a floating-point, complex or bool batch is refused (it would
    reach the embedding as such, or a model that casts its input would truncate 2.5 to the id 2), as is an integer
    one holding an id outside the vocabulary (:func:`_token_id_error`).  Another model takes what it takes (the float
    inputs of an MLP, a CTC speech model's audio)."""
    vocab = _vocab_size(model)
    if vocab is not None and _takes_token_ids(model) and (b.is_floating_point() or b.is_complex() or
                                                          b.dtype == torch.bool):
        return (f"{name} has dtype {b.dtype}, but the model (config.vocab_size={vocab}) takes integer token ids: pass "
                f"them as an integer tensor (e.g. .long(); no value is rounded or cast to an id here)")
    why = _token_id_error(b, model)
    return None if why is None else f"{name}: {why}; {name.split('[')[0]} must hold token ids of the model's tokenizer"


def _as_token_batch(b: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The tensor batch ``b`` on ``device``; an integer (not bool) one as int64, what ``nn.Embedding`` and
    ``cross_entropy`` take, whatever integer dtype the token ids came in (e.g. :func:`flash_llm.data.load_tokens`'s
    uint8, a uint16 token file), as :func:`flash_llm.evaluate.evaluate` does; other dtypes (the float inputs of a
    model that takes those) as they are."""
    if b.is_floating_point() or b.is_complex() or b.dtype == torch.bool:
        return b.to(device)
    return b.to(device=device, dtype=torch.int64)


def _calib_batches(calib, model: nn.Module) -> list[torch.Tensor]:
    """``calib`` as a list of non-empty tensors on the device of the model's first parameter (its first buffer for a
    model without parameters, e.g. weights kept as buffers; CPU for neither: :func:`flash_llm.evaluate._model_device`),
    integer batches (token ids of any integer dtype, e.g. uint8) as int64 (:func:`_as_token_batch`).  Raises for
    anything but a tensor or an iterable of tensors, for no non-empty batch, and, for a model with a vocabulary, for a
    batch that is not integer or holds a token id outside it (:func:`_token_batch_error`)."""
    if isinstance(calib, torch.Tensor):
        batches = [calib]
    elif isinstance(calib, Mapping):  # (a tokenizer's output: list() would give its keys, refused as 'calib[0]')
        raise TypeError(f"calib must be a tensor or a sequence of tensors (token batches [B, T]), got a "
                        f"{type(calib).__name__}: no attention mask is passed, so pass the token ids, e.g. "
                        "calib['input_ids'] (unpadded)")
    elif isinstance(calib, Iterable) and not isinstance(calib, (str, bytes)):
        batches = list(calib)
    else:
        raise TypeError(f"calib must be a tensor or a sequence of tensors (token batches [B, T]), "
                        f"got {type(calib).__name__}")
    for i, b in enumerate(batches):
        if not isinstance(b, torch.Tensor):
            hint = f": pass the token ids, e.g. calib[{i}]['input_ids']" if isinstance(b, Mapping) else ""
            raise TypeError(f"calib[{i}] must be a tensor, got {type(b).__name__}{hint}")
    for i, b in enumerate(batches):
        why = _token_batch_error(b, model, "calib" if isinstance(calib, torch.Tensor) else f"calib[{i}]")
        if why is not None:
            raise ValueError(why)
    batches = [b for b in batches if b.numel() > 0]
    if not batches:
        raise ValueError("calib is empty: pass at least one non-empty batch of calibration tokens, "
                         "e.g. a LongTensor [B, T]")
    from .evaluate import _model_device  # (lazily: flash_llm.evaluate imports this module)

    device = _model_device(model)
    return [_as_token_batch(b, device) for b in batches]


def _all_finite(t: torch.Tensor) -> bool:
    """Whether ``t`` holds no NaN or Inf: its min and max (which propagate NaN) are finite, so no temporary of the
    size of ``t`` is made (one pass, one sync)."""
    if t.numel() == 0:
        return True
    if not t.is_floating_point():  # (integers are; complex has no aminmax)
        return bool(torch.isfinite(t.detach()).all())
    return bool(torch.isfinite(torch.stack(torch.aminmax(t.detach()))).all())


def _nonfinite_parameter(model: nn.Module) -> str | None:
    """The name of the first parameter of ``model`` holding NaN or Inf (:func:`_all_finite`), or None."""
    return next((n for n, p in model.named_parameters() if not _all_finite(p)), None)


def _by_storage(named) -> dict:
    """``(name, tensor)`` pairs grouped by storage (:func:`flash_llm.nn._storage_key`); tensors without one (e.g. on
    meta) left out."""
    from .nn import _storage_key

    groups: dict = {}
    for n, t in named:
        key = _storage_key(t)
        if key is not None:
            groups.setdefault(key, []).append((n, t))
    return groups


def _sharing(t: torch.Tensor, groups: dict) -> list[str]:
    """The names in ``groups`` (:func:`_by_storage`) whose tensors share bytes with ``t``
    (:func:`flash_llm.ops._overlaps`: one storage, overlapping spans).  Disjoint views of one storage, e.g. ``q``,
    ``k`` and ``v`` split from a fused weight, do not; views interleaved within one span (two column slices) do."""
    from .nn import _storage_key
    from .ops import _overlaps

    return [n for n, u in groups.get(_storage_key(t), ()) if _overlaps(t, u)]


def _shares_elements(t: torch.Tensor) -> bool:
    """Whether two elements of ``t`` are one place in memory (an expanded tensor, stride 0; ``as_strided``'s
    overlapping strides), so that a zero written into one is written into the other: torch's own test (no / yes /
    too hard to tell, e.g. for a slice), then where it cannot tell, a layout whose strides, smallest first, each step
    past the extent of the smaller dimensions shares nothing (a slice), and otherwise the elements' distinct offsets
    are counted (exact; such a weight is rare)."""
    how = torch._debug_has_internal_overlap(t)  # (0: no, 1: yes, 2: too hard)
    if how != 2:
        return how == 1
    span = 1
    for st, n in sorted((st, n) for n, st in zip(t.shape, t.stride()) if n > 1):
        if st < span:
            break
        span += st * (n - 1)
    else:
        return False
    offsets = torch.zeros((), dtype=torch.long)
    for n, st in zip(t.shape, t.stride()):
        offsets = offsets.unsqueeze(-1) + torch.arange(n) * st
    return offsets.unique().numel() < t.numel()


def _recomputed_weight(module: nn.Linear) -> str | None:
    """How ``module.weight`` is recomputed from other tensors at every forward (zeros written into it
    would be undone), with the call that removes that; None for a plain weight.

    :func:`flash_llm.nn._skip_reason` refuses the same reparametrizations for ``sparsify_``, but among
    refusals that do not apply to pruning (hooks, subclasses, dtypes, names), so it is not called here.
    """
    if parametrize.is_parametrized(module, "weight"):
        return ("parametrized weight (torch.nn.utils.parametrize, e.g. parametrizations.weight_norm); call "
                "torch.nn.utils.parametrize.remove_parametrizations(module, 'weight') first")
    hooks = list(module._forward_pre_hooks.values())
    if any(isinstance(h, SpectralNorm) and h.name == "weight" for h in hooks):
        return "spectral_norm hook (torch.nn.utils.spectral_norm); call remove_spectral_norm(module) first"
    if hasattr(module, "weight_orig") or hasattr(module, "weight_mask") \
            or any(isinstance(h, torch_prune.BasePruningMethod) and h._tensor_name == "weight" for h in hooks):
        return ("pruning reparametrization (torch.nn.utils.prune: weight_orig * weight_mask); call "
                "torch.nn.utils.prune.remove(module, 'weight') first")
    if any(isinstance(h, WeightNorm) and h.name == "weight" for h in hooks):
        return "weight_norm hook (torch.nn.utils.weight_norm); call torch.nn.utils.remove_weight_norm(module) first"
    if "weight" not in module._parameters and "weight" not in module._buffers:
        return "weight is neither a parameter nor a buffer of the layer (set by a hook or a property)"
    return None


def _select_linears(model: nn.Module, filter_fn: FilterFn | None,
                    empty: list[str] | None = None, *, writes: bool = True) -> list[tuple[str, nn.Linear]]:
    """The ``nn.Linear`` layers to prune, in module order, without empty ones (a dimension 0; their
    names are appended to ``empty`` when given).  Raises (ValueError naming the weight, before any layer is
    modified) when there are none, when a weight is recomputed from other tensors at every forward
    (:func:`_recomputed_weight`: the zeros would be undone), when a weight is not 2-D of the layer's
    ``(out_features, in_features)`` (the pruners size their statistics from those), when it is on the meta
    device, when ``writes`` (the caller writes the weights) and it cannot be written in place (an inference tensor
    outside ``torch.inference_mode()``, or elements sharing memory, :func:`_shares_elements`: found otherwise only
    at the write, with earlier layers already pruned), when it shares memory with another parameter or buffer
    (overlapping bytes of one storage,
    :func:`_sharing`: pruning it would silently zero the other one too; disjoint views of one storage are not
    tied) and when it holds NaN or Inf (every score ranks such a weight highest, so it would be kept; SparseGPT
    would spread it over its row; one pass over the weights)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    layers = [(fqn, m) for fqn, m in model.named_modules()
              if isinstance(m, nn.Linear) and (filter_fn is None or filter_fn(m, fqn))]
    skipped = [fqn for fqn, m in layers if m.in_features == 0 or m.out_features == 0]
    if empty is not None:
        empty.extend(skipped)
    layers = [(fqn, m) for fqn, m in layers if fqn not in skipped]
    if not layers:
        raise ValueError("model has no nn.Linear layer to prune" + (" that filter_fn accepts" if filter_fn else "")
                         + (f" (only empty ones: {skipped})" if skipped else ""))
    for fqn, m in layers:
        how = _recomputed_weight(m)
        if how is not None:
            raise ValueError(f"{fqn + '.weight' if fqn else 'weight'} is recomputed from other tensors at every "
                             f"forward ({how}): zeros written into it would be undone at the next forward")
    owners = _by_storage([*model.named_parameters(remove_duplicate=False),
                          *model.named_buffers(remove_duplicate=False)])
    aliases: dict[int, set[str]] = {}  # a module registered under several names (one block applied twice)
    for fqn, m in model.named_modules(remove_duplicate=False):
        aliases.setdefault(id(m), set()).add(f"{fqn}.weight" if fqn else "weight")
    for fqn, m in layers:
        name = f"{fqn}.weight" if fqn else "weight"
        shape, declared = tuple(m.weight.shape), (m.out_features, m.in_features)
        if shape != declared:
            raise ValueError(f"{name} has shape {shape} but the layer declares (out_features, in_features) = "
                             f"{declared}; the pruners size the layer's calibration statistics from those: make "
                             "them agree (e.g. set in_features/out_features after replacing the weight) or exclude "
                             "the layer with filter_fn")
        if m.weight.is_meta:
            raise ValueError(f"{name} is on the meta device (no values to prune); load the weights first")
        if writes and m.weight.is_inference() and not torch.is_inference_mode_enabled():
            raise ValueError(f"{name} is an inference tensor (made under torch.inference_mode()) and cannot be "
                             "written in place outside it: recreate the layer outside inference mode or replace its "
                             "weight by a clone, or exclude the layer with filter_fn")
        if writes and _shares_elements(m.weight):
            expanded = any(st == 0 and n > 1 for n, st in zip(shape, m.weight.stride()))
            how = "an expanded tensor" if expanded else "overlapping strides"
            raise ValueError(f"{name} has elements sharing memory ({how}, stride {m.weight.stride()}) and cannot be "
                             "written in place: replace it by a clone, or exclude the layer with filter_fn")
        others = [n for n in _sharing(m.weight, owners) if n not in aliases[id(m)]]
        if others:
            raise ValueError(f"{name} shares memory with {', '.join(others)} (tied weights): pruning it would "
                             "zero those too; exclude the layer with filter_fn")
    for fqn, m in layers:  # (after the checks above, which read no values)
        if not _all_finite(m.weight):
            raise ValueError(f"{fqn + '.weight' if fqn else 'weight'} contains NaN or Inf: a pruner would keep those "
                             "weights (they score highest) and SparseGPT would spread them over their rows; repair "
                             "or reload the weights, or exclude the layer with filter_fn")
    return layers


def _count(sparsity: float, n: int) -> int:
    """Zeros for a group of ``n`` weights: ``round(sparsity * n)``, but at most ``n - 1`` (``sparsity < 1``
    never empties the group through rounding)."""
    return max(0, min(n - 1, round(sparsity * n)))


def _layer_targets(sparsity, layers: list[tuple[str, nn.Linear]],
                   empty: list[str] = ()) -> tuple[list[float], float]:
    """Per-layer targets from ``sparsity``: a number (the same for every layer) or a dict ``{fqn: number}``
    that names every selected layer and nothing else (keys of the selected ``empty`` layers, which are not
    pruned, are ignored).  Also returns the report's ``target``: the number, or for a dict the
    parameter-weighted mean of its values."""
    if not isinstance(sparsity, dict):
        s = _check_sparsity(sparsity)
        return [s] * len(layers), s
    names = [fqn for fqn, _ in layers]
    unknown = sorted(k for k in sparsity if k not in names and k not in empty)
    if unknown:
        raise ValueError(f"sparsity has key(s) {unknown} that are not selected nn.Linear layers of model; "
                         f"selected: {names}")
    missing = [n for n in names if n not in sparsity]
    if missing:
        raise ValueError(f"sparsity (a dict) has no target for layer(s) {missing}: give one for every selected "
                         "layer or exclude them with filter_fn")
    targets = []
    for fqn in names:
        try:
            targets.append(_check_sparsity(sparsity[fqn]))
        except ValueError as e:
            raise ValueError(f"sparsity[{fqn!r}]: {e}") from None
    sizes = [m.weight.numel() for _, m in layers]
    return targets, sum(t * n for t, n in zip(targets, sizes)) / sum(sizes)


# ---- calibration passes ----------------------------------------------------------------------------

def _layer_input(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["input"]


def _training_flags(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    """Every submodule's own ``training`` flag, for :func:`_restore_training_flags` (``model.train(flag)``
    would set them all to one value)."""
    return [(m, m.training) for m in model.modules()]


def _restore_training_flags(flags: list[tuple[nn.Module, bool]]) -> None:
    for m, flag in flags:
        m.training = flag


def _run_with_hooks(model: nn.Module, batches: list[torch.Tensor], hooks: dict[nn.Module, Callable]) -> None:
    """``model(batch)`` for every batch with ``hooks[module](x)`` seeing each input of each hooked
    module; eval mode and no_grad during the pass (every module's training flag is restored after).
    Raises when a hooked module never ran, or when an input of one contained NaN or Inf (naming the first
    such module in call order; checked on the device after the pass, so the pass is not synchronized)."""
    seen: dict[nn.Module, None] = {}  # in order of first call
    nonfinite: dict[nn.Module, torch.Tensor] = {}

    def make(fn):
        def pre_hook(module, args, kwargs):
            seen.setdefault(module, None)
            x = _layer_input(args, kwargs).detach()
            bad = ~torch.isfinite(x).all()
            nonfinite[module] = bad if module not in nonfinite else nonfinite[module] | bad
            fn(x)
        return pre_hook

    handles = [m.register_forward_pre_hook(make(fn), with_kwargs=True) for m, fn in hooks.items()]
    flags = _training_flags(model)
    try:
        model.eval()
        with torch.no_grad():
            for b in batches:
                model(b)
    finally:
        for h in handles:
            h.remove()
        _restore_training_flags(flags)
    names = {m: n for n, m in model.named_modules()}
    for m in seen:
        if bool(nonfinite[m]):
            raise ValueError(f"calibration inputs to {names.get(m) or '<model>'} contain NaN or Inf; check calib "
                             "and the model (e.g. an fp16 overflow)")
    missing = [m for m in hooks if m not in seen]
    if missing:
        raise ValueError(f"layer(s) {', '.join(repr(names.get(m, '?')) for m in missing)} received no input when "
                         "the model ran on calib (not called by model(tokens)); exclude them with filter_fn")


def _forward_order(model, batches, layers):
    """``layers`` sorted by their first call when the model runs on all calibration batches (a layer that
    only later batches reach, e.g. a routed expert, comes after those the earlier batches called).  This
    pass also refuses non-finite calibration inputs before any layer is modified."""
    order: dict[nn.Module, int] = {}
    hooks = {m: (lambda x, m=m: order.setdefault(m, len(order))) for _, m in layers}
    _run_with_hooks(model, batches, hooks)
    return sorted(layers, key=lambda item: order[item[1]])


def _rel_error(num: float, den: float) -> float:
    return num / den if den > 0 else (0.0 if num == 0 else float("nan"))


def _measure_errors(model, batches, layers, masks) -> list[float]:
    """Relative error of zeroing ``masks`` (True = pruned) in each layer, one pass of the model as it is
    (before the zeros are written)."""
    num = [0.0] * len(layers)
    den = [0.0] * len(layers)

    def make(i, module, mask):
        def fn(x):
            x = x.reshape(-1, module.in_features).float()
            w = module.weight.detach().float()
            den[i] += float((x @ w.t()).double().square().sum())
            num[i] += float((x @ (w * mask).t()).double().square().sum())
        return fn

    _run_with_hooks(model, batches, {m: make(i, m, masks[i]) for i, (_, m) in enumerate(layers)})
    return [_rel_error(n, d) for n, d in zip(num, den)]


# ---- mask selection ---------------------------------------------------------------------------------

def _lowest_k(scores: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Boolean masks marking exactly the ``k`` smallest entries of all ``scores`` together (non-negative
    floats; ties go to the earlier tensor, then the lower flat index).

    Finds the k-th smallest value by bisection over fp32 bit patterns (fp64 ones when a score is float64, so
    magnitudes that differ only below fp32's precision or range are not ties; both are ordered like the values for
    non-negative floats) instead of sorting a concatenation: memory stays one temporary per layer.
    """
    wide = any(s.dtype == torch.float64 for s in scores)
    keys = [(s.detach().double() if wide else s.detach().float()).abs().contiguous()
            .view(torch.int64 if wide else torch.int32) for s in scores]
    masks = [torch.zeros(s.shape, dtype=torch.bool, device=s.device) for s in scores]
    if k <= 0:
        return masks
    lo, hi = 0, (2**63 - 1 if wide else 2**31 - 1)  # smallest t with #(key <= t) >= k
    while lo < hi:
        mid = (lo + hi) // 2
        if sum(int((key <= mid).sum()) for key in keys) >= k:
            hi = mid
        else:
            lo = mid + 1
    for m, key in zip(masks, keys):
        m.copy_(key < lo)
    left = k - sum(int(m.sum()) for m in masks)
    for m, key in zip(masks, keys):
        if left <= 0:
            break
        ties = torch.nonzero((key == lo).reshape(-1)).squeeze(1)[:left]
        m.view(-1)[ties] = True
        left -= ties.numel()
    return masks


def _lowest_per_row(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Mask of the ``n`` smallest entries of each row (stable: ties go to the lower column)."""
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if n > 0:
        mask.scatter_(1, torch.sort(scores, dim=1, stable=True).indices[:, :n], True)
    return mask


def _layer_sparsity(w: torch.Tensor) -> float:
    from .formats._base import count_nonzero

    return (w.numel() - count_nonzero(w)) / w.numel()


def _finish_zero_masks(method, target, model, layers, masks, batches) -> PruneReport:
    errors = _measure_errors(model, batches, layers, masks) if batches is not None else [None] * len(layers)
    report = PruneReport(method, target)
    with torch.no_grad():
        for (fqn, m), mask, err in zip(layers, masks, errors):
            m.weight.masked_fill_(mask, 0)
            report.layers.append(PrunedLayer(fqn, tuple(m.weight.shape), _layer_sparsity(m.weight), err))
    return report


# ---- magnitude --------------------------------------------------------------------------------------

def magnitude_prune_(model: nn.Module, sparsity: float, *, scope: str = "layer", filter_fn: FilterFn | None = None,
                     calib=None) -> PruneReport:
    """Zero the smallest-magnitude weights of every selected ``nn.Linear``, in place.

    Args:
        model: any module; every non-empty ``nn.Linear`` that ``filter_fn`` accepts is pruned.
        sparsity: fraction of weights to zero, in ``[0, 1)``.
        scope: ``"layer"``: exactly ``min(round(sparsity * M * K), M * K - 1)`` zeros in each layer (one
            weight is always kept); ``"global"``: one threshold over all selected layers, exactly
            ``min(round(sparsity * total), total - 1)`` zeros in total (layers of larger weights keep more;
            a layer of small weights can lose all of them).
        filter_fn: ``(module, fqn) -> bool``; False leaves the layer untouched.
        calib: optional calibration batches (tensor ``[B, T]`` or a sequence); only used to measure each
            layer's reconstruction error in the report (one forward pass; every position counted, pads included).

    Returns:
        A :class:`PruneReport`; ``error`` is ``None`` without ``calib``.
    """
    sparsity = _check_sparsity(sparsity)
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    layers = _select_linears(model, filter_fn)
    batches = None if calib is None else _calib_batches(calib, model)
    weights = [m.weight for _, m in layers]
    if scope == "layer":
        masks = [_lowest_k([w], _count(sparsity, w.numel()))[0] for w in weights]
    else:
        masks = _lowest_k(weights, _count(sparsity, sum(w.numel() for w in weights)))
    return _finish_zero_masks("magnitude", sparsity, model, layers, masks, batches)


# ---- Wanda ------------------------------------------------------------------------------------------

def wanda_prune_(model: nn.Module, calib, sparsity: float | dict[str, float], *,
                 filter_fn: FilterFn | None = None) -> PruneReport:
    """Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for LLMs"), in place.

    Weight ``W_ij`` of a layer ``[M, K]`` scores ``|W_ij| * ||X_j||_2``, with ``X_j`` input feature ``j``
    of that layer over all calibration tokens; each output row keeps its ``K - n`` highest-scoring
    weights, ``n = min(round(sparsity * K), K - 1)`` (a row always keeps one weight).  No weight update.
    Weights already zero go first (below every score), so a row ends with exactly ``max(n, zeros it had)``
    zeros; among equal scores (e.g. the score 0 of weights whose input is zero on every calibration token)
    the lower column goes first.

    The input norms of all layers are collected in one pass of the *dense* model (forward hooks).  The
    reference implementation instead propagates the calibration activations block by block through the
    already pruned blocks; the paper finds the difference small, and one pass works for any model.  The
    scores are made one layer at a time, as in the reference: a layer's fp32 scores (4 bytes per weight; fp64, 8
    bytes, for a float64 weight) and its row sort's temporaries are freed once its mask is chosen, before the next
    layer's.  A second pass (still dense) measures each layer's reconstruction error before the zeros are written;
    meanwhile one bool mask per layer is held (1 byte per weight: half an fp16 model's weights).

    Args:
        model: any module called as ``model(batch)``.
        calib: calibration batches: a tensor (token ids ``LongTensor [B, T]``) or a sequence of them; every
            position is counted, pad tokens included (no attention mask): pass unpadded windows, or a list of
            unpadded ``[1, T_i]`` batches (module docstring, "Padding").
        sparsity: fraction of each row to zero, in ``[0, 1)``; or a dict ``{fqn: fraction}`` with one
            target per selected layer (e.g. from :func:`owl_sparsities`), each layer's rows then get
            ``min(round(sparsity[fqn] * K), K - 1)`` zeros.  Keys naming empty layers are ignored.
        filter_fn: ``(module, fqn) -> bool``; False leaves the layer untouched.

    Returns:
        A :class:`PruneReport` with every layer's sparsity and reconstruction error; for a dict its
        ``target`` is the parameter-weighted mean of the per-layer targets.
    """
    if not isinstance(sparsity, dict):
        _check_sparsity(sparsity)  # bad numbers fail before the model is inspected, as before
    empty: list[str] = []
    layers = _select_linears(model, filter_fn, empty)
    targets, target = _layer_targets(sparsity, layers, empty)
    batches = _calib_batches(calib, model)
    norms = _wanda_input_norms(model, batches, layers)
    masks = []
    for (_, m), norm, s in zip(layers, norms, targets):
        # one layer's scores at a time (as the reference Wanda does): made, masked and freed before the next layer's
        score = _wanda_score(m, norm)
        # weights already zero fill the row's quota first, before weights of equal score 0 (inputs that are zero on
        # every calibration token): a row ends with exactly max(n, zeros it had) zeros
        score.masked_fill_(m.weight.detach() == 0, -1.0)
        masks.append(_lowest_per_row(score, _count(s, m.in_features)))
        del score
    del norms
    return _finish_zero_masks("wanda", target, model, layers, masks, batches)


def _wanda_input_norms(model, batches, layers) -> list[torch.Tensor]:
    """``||X_j||_2`` of every layer's inputs (float64 ``[in_features]``, on the weight's device; float64 inputs'
    squares summed in fp64, others in fp32), from one pass of the model.  The scores are made from them one layer at
    a time (:func:`_wanda_score`): all layers' scores together would take 4 bytes per weight (2x fp16 weights; 8 for
    float64 weights)."""
    sq_norms = {m: torch.zeros(m.in_features, dtype=torch.float64, device=m.weight.device) for _, m in layers}

    def make(m):
        def fn(x):
            sq_norms[m] += x.reshape(-1, m.in_features).to(torch.promote_types(x.dtype, torch.float32)).square() \
                .sum(0).double()
        return fn

    _run_with_hooks(model, batches, {m: make(m) for _, m in layers})
    return [sq_norms[m].sqrt() for _, m in layers]


def _wanda_score(m: nn.Linear, norm: torch.Tensor) -> torch.Tensor:
    """``|W_ij| * ||X_j||_2`` of layer ``m`` (fp32, or fp64 for a float64 weight), ``norm`` from
    :func:`_wanda_input_norms`: a new tensor, which the caller may modify."""
    dtype = torch.promote_types(m.weight.dtype, torch.float32)
    return m.weight.detach().to(dtype).abs() * norm.to(dtype)


# ---- SparseGPT --------------------------------------------------------------------------------------

def _checked_cholesky(A: torch.Tensor, upper: bool, what: str, percdamp: float) -> torch.Tensor:
    """The (``upper`` or lower) Cholesky factor of the float64 matrix ``A``; ValueError starting with ``what`` (the
    layer's name and the matrix) and advising a larger ``percdamp`` when ``A`` is not positive definite in float64 or
    its factor is not finite (never a bare ``torch.linalg.LinAlgError``)."""
    L, info = torch.linalg.cholesky_ex(A, upper=upper)
    if int(info) != 0 or not _all_finite(L):
        at = f"Cholesky failed at column {int(info)}" if int(info) != 0 else "its Cholesky factor is not finite"
        raise ValueError(f"{what} is not positive definite ({at}); raise percdamp (now {percdamp}) or use more "
                         "calibration data")
    return L


def _sparsegpt_layer(weight: torch.Tensor, H: torch.Tensor, sparsity: float, blocksize: int, percdamp: float,
                     name: str) -> tuple[torch.Tensor, float]:
    """Prune one weight ``[M, K]`` given its input Gram matrix ``H`` ``[K, K]`` (float64; its scale cancels unless an
    input is dead, whose ``H_jj = 1`` then enters the damping's mean: :func:`sparsegpt_prune_` passes the reference's
    per-sequence ``2/S X^T X``); the update runs in fp32 (in fp64 for a float64 weight).  Returns the pruned weight
    in the weight's dtype and the relative reconstruction error; raises ValueError naming the layer when an updated
    weight does not fit that dtype (e.g. beyond fp16's 65504: it would be written as Inf)."""
    M, K = weight.shape
    W0 = weight.detach().to(torch.promote_types(weight.dtype, torch.float32))
    W = W0.clone()
    diag0 = H.diagonal().clone()
    dead = diag0 == 0  # inputs that are zero on every calibration token
    H.diagonal()[dead] = 1.0
    H.diagonal().add_(percdamp * float(H.diagonal().mean()))
    L = _checked_cholesky(H, False, f"{name}: the dampened Hessian", percdamp)
    # upper Cholesky of H^-1: checked too (a percdamp small enough can pass the first factorization and still leave
    # an inverse that rounding makes indefinite)
    Hinv = _checked_cholesky(torch.cholesky_inverse(L), True, f"{name}: the inverse of the dampened Hessian",
                             percdamp).to(W0.dtype)
    del L
    H.diagonal().copy_(diag0)  # H is the plain Gram matrix again, for the error below

    total = M * K
    # Weights already zero stay zero (each is masked in its block, so no update brings it back); the zeros still
    # wanted on top of them are shared by the blocks in proportion to their other weights, by cumulative rounding,
    # so the layer ends with exactly max(count, zeros it had) zeros and no block is asked for more than it holds.
    zero0 = W0 == 0
    free = [0] + (~zero0).sum(0).cumsum(0).tolist()  # weights not yet zero in columns 0 .. j - 1
    extra = max(0, _count(sparsity, total) - (total - free[-1]))
    share = [round(extra * f / free[-1]) if free[-1] else 0 for f in free]  # the extra zeros of columns 0 .. j - 1
    for i1 in range(0, K, blocksize):
        i2 = min(i1 + blocksize, K)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        zeros1 = zero0[:, i1:i2]
        n_block = share[i2] - share[i1] + int(zeros1.sum())
        score = W1.square() / Hinv1.diagonal().square().unsqueeze(0)
        score[:, dead[i1:i2]] = 0.0  # free to prune: no error on the calibration data
        score[zeros1] = -1.0  # (first: zero already)
        mask1 = torch.zeros(W1.numel(), dtype=torch.bool, device=W.device)
        mask1[torch.sort(score.reshape(-1), stable=True).indices[:n_block]] = True
        mask1 = mask1.view_as(W1)
        for i in range(i2 - i1):
            w = W1[:, i]
            d = Hinv1[i, i]
            q = w.masked_fill(mask1[:, i], 0.0)
            Q1[:, i] = q
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    out = W.to(weight.dtype)
    if not _all_finite(out):  # (refused before the weight is written: sparsegpt_prune_ restores the earlier layers)
        big = float(W.abs().max()) if _all_finite(W) else math.inf
        wider = "prune in a wider dtype (model.float() or bfloat16) or " if weight.dtype == torch.float16 else ""
        raise ValueError(f"{name}: the updated weights overflow {weight.dtype} (largest |w| after the update "
                         f"{big:.6g}, the dtype's maximum {torch.finfo(weight.dtype).max:.6g}); {wider}raise "
                         f"percdamp (now {percdamp}), or exclude the layer with filter_fn")
    kept_underflow = (out == 0) & (W != 0)  # kept weights too small for fp16/bf16: keep them nonzero
    if bool(kept_underflow.any()):
        tiny = torch.finfo(weight.dtype).smallest_normal * torch.finfo(weight.dtype).eps
        out = torch.where(kept_underflow, torch.where(W > 0, tiny, -tiny).to(weight.dtype), out)
    W0d = W0.double()
    dW = W0d - out.double()
    err = _rel_error(float(((dW @ H) * dW).sum()), float(((W0d @ H) * W0d).sum()))
    return out, err


def sparsegpt_prune_(model: nn.Module, calib, sparsity: float | dict[str, float], *, blocksize: int = 128,
                     percdamp: float = 0.01, filter_fn: FilterFn | None = None,
                     progress: bool = True) -> PruneReport:
    """SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
    One-Shot"), in place: prune each layer and update its remaining weights to compensate (OBS).

    Per layer ``W [M, K]`` with calibration inputs ``X [N, K]`` (all tokens of all batches): ``H = 2/S X^T X``
    (float64 on the weight's device), normalised per calibration sequence as the reference code does
    (``sparsegpt.py``'s ``add_batch``, one sequence a forward): ``S`` counts the calibration batches' sequences
    (``B`` for a ``[B, T]`` token batch, whatever shape a layer's input takes inside the model; for a model fed
    features, the dims before ``[T, K]``: 1 for a 2-D batch).  Inputs that are zero on every
    token get ``H_jj = 1``, then ``percdamp * mean(diag H)`` is added to the diagonal (the mean taken after that, the
    dead inputs' 1s included, as the reference code does: where the live ``H_jj`` are far below 1 they raise the live
    inputs' damping, so with dead inputs the result depends on ``H``'s scale, and the per-sequence one gives the
    reference's result on the live columns; without dead inputs the scale cancels).  The upper Cholesky factor of
    ``H^-1`` drives the blockwise update of
    the reference algorithm in fp32: for each block of ``blocksize`` columns the mask is chosen by
    ``w^2 / [H^-1]_jj^2`` over the whole block (all rows), then the columns are pruned one by one and
    their error is spread over the not yet processed columns.

    Exact sparsity: weights already zero are masked in their block (kept zero: an update of an earlier block
    does not bring them back); the zeros wanted beyond them are shared by the blocks in proportion to each
    block's other weights (cumulative rounding), so the layer ends with exactly ``max(min(round(sparsity * M *
    K), M * K - 1), zeros it had)`` zeros (a layer always keeps one weight); rows may differ, as in the paper.
    Weights of dead inputs score 0 (free to prune) but are never zeroed beyond the block's share.

    Order: layers are pruned one after another in the order the model first calls them when it runs on
    all of ``calib`` (a layer that only later batches reach, e.g. a routed expert, comes after the layers
    of the earlier batches), each on the inputs it receives from the already pruned earlier layers.  That
    ordering pass also refuses NaN/Inf calibration inputs before any layer is modified.  Then the model
    runs on all of ``calib`` once per layer (a hook accumulates that layer's ``H``): ``L + 1`` forward
    passes, simple and exact for any model, meant for models small enough to run that often.

    All or nothing where the host has the room: each layer's original weight is kept (a CPU copy) until the last
    layer is done; if a layer fails (e.g. its dampened Hessian is not positive definite: raise ``percdamp``; or its
    updated fp16 weights would overflow to Inf: prune in fp32 or bf16, or raise ``percdamp``) or the call is
    interrupted, the layers already pruned get their original weights back before the error
    propagates, so the model is left as it was and the call can simply be retried.  Where the layers' weights
    exceed half the host's available memory (:func:`flash_llm.models.synthetic.host_available_memory`), no copy
    is kept (a warning says so) and an error names the layers already pruned.

    Args:
        model: any module called as ``model(batch)``.
        calib: calibration batches: a tensor (token ids ``LongTensor [B, T]``) or a sequence of them; every
            position is counted, pad tokens included (no attention mask): pass unpadded windows, or a list of
            unpadded ``[1, T_i]`` batches (module docstring, "Padding").
        sparsity: fraction of each layer's weights to zero, in ``[0, 1)``; or a dict ``{fqn: fraction}``
            with one target per selected layer (e.g. from :func:`owl_sparsities`); keys naming empty
            layers are ignored.
        blocksize: columns per block (the lazy-update batch of the reference; 128); any integer >= 1 but bool
            (numpy's, a 0-d tensor).
        percdamp: dampening, as a fraction of the mean of ``diag(H)`` (``H = 2/S X^T X``; dead inputs counted as 1;
            0.01).
        filter_fn: ``(module, fqn) -> bool``; False leaves the layer untouched.
        progress: tqdm bar (stderr) over the layers.

    Returns:
        A :class:`PruneReport`; each layer's error is on the inputs it saw when it was pruned; for a dict
        its ``target`` is the parameter-weighted mean of the per-layer targets.
    """
    if not isinstance(sparsity, dict):
        _check_sparsity(sparsity)  # bad numbers fail before the other arguments, as before
    from .data import _check_positive  # (flash_llm.data is imported lazily: tests/test_docs_edge.py)

    blocksize = _check_positive("blocksize", blocksize)
    damp = _real(percdamp)
    if damp is None or not 0.0 < damp < math.inf:
        raise ValueError(f"percdamp must be a positive number, got {percdamp!r}")
    empty: list[str] = []
    layers = _select_linears(model, filter_fn, empty)
    targets, target = _layer_targets(sparsity, layers, empty)
    layer_target = {m: t for (_, m), t in zip(layers, targets)}
    batches = _calib_batches(calib, model)
    report = PruneReport("sparsegpt", target)
    from .models.synthetic import host_available_memory

    # (layer, CPU copy of its weight) of the layers written; None: no copies kept (no room on the host)
    total = sum(m.weight.numel() * m.weight.element_size() for _, m in layers)
    room = host_available_memory()
    originals: list[tuple[nn.Linear, torch.Tensor]] | None = [] if total <= room // 2 else None
    if originals is None:
        warnings.warn(f"sparsegpt_prune_: the layers' weights ({total / 2**30:.1f} GiB) exceed half the host's "
                      f"available memory ({room / 2**30:.1f} GiB), so their originals are not kept: a layer that "
                      "fails leaves the layers before it pruned", RuntimeWarning, stacklevel=2)
    done: list[str] = []
    try:
        for fqn, m in tqdm(_forward_order(model, batches, layers), desc="sparsegpt", unit="layer",
                           disable=not progress, file=sys.stderr):
            _sparsegpt_one(model, batches, fqn, m, layer_target[m], blocksize, damp, originals, report)
            done.append(fqn)
    except BaseException as e:
        if originals is not None:
            with torch.no_grad():  # nothing lost on bad input: the layers already pruned get their weights back
                for m, w in reversed(originals):
                    m.weight.copy_(w)
        if done and type(e) is ValueError:
            how = (f"the model is unchanged: the {len(done)} layer(s) already pruned got their original weights "
                   "back" if originals is not None else
                   f"{len(done)} layer(s) were already pruned and stay so: {', '.join(done[:8])}"
                   f"{', ...' if len(done) > 8 else ''}")
            raise ValueError(f"{e} ({how})") from None
        raise
    return report


def _sequences(batch: torch.Tensor) -> int:
    """The calibration sequences in ``batch`` (what ``model(batch)`` is given) as the SparseGPT reference code counts
    them for its ``H = 2/nsamples * sum x x^T``: it feeds one sequence a forward, so its ``nsamples`` is the number of
    sequences whatever shape a layer's input takes inside the model (transformers' OPT flattens ``[B, T, K]`` to
    ``[B T, K]`` before ``fc1`` / ``fc2``: counted from that input, ``B`` sequences would count as one).  Token ids
    ``[..., T]``: the product of the dims before ``T`` (a 1-D ``[T]`` batch: 1); features ``[..., T, K]`` (floating
    point): the product of the dims before ``T`` and ``K`` (a ``[T, K]`` batch: 1, the reference's ``unsqueeze``)."""
    return math.prod(batch.shape[:-2] if batch.is_floating_point() else batch.shape[:-1])


def _sparsegpt_one(model: nn.Module, batches: list[torch.Tensor], fqn: str, m: nn.Linear, sparsity: float,
                   blocksize: int, percdamp: float, originals: list[tuple[nn.Linear, torch.Tensor]] | None,
                   report: PruneReport) -> None:
    """One layer of :func:`sparsegpt_prune_`: its Hessian on the current model's inputs, then the pruned weight
    written in place (its original appended to ``originals`` once written, unless None) and its entry appended to
    ``report``."""
    H = torch.zeros(m.in_features, m.in_features, dtype=torch.float64, device=m.weight.device)

    def accumulate(x, m=m, H=H):
        x = x.reshape(-1, m.in_features).double()
        H.addmm_(x.t(), x)

    _run_with_hooks(model, batches, {m: accumulate})
    seqs = sum(_sequences(b) for b in batches)  # (of the batches, not the layer's inputs: see _sequences)
    H.mul_(2.0 / max(seqs, 1))  # (the reference's running average 2/n * sum x x^T, summed first: fewer roundings)
    pruned, err = _sparsegpt_layer(m.weight, H, sparsity, blocksize, percdamp,
                                   f"{fqn}.weight" if fqn else "weight")
    del H
    original = m.weight.detach().to("cpu", copy=True) if originals is not None else None
    with torch.no_grad():
        m.weight.copy_(pruned)
    if originals is not None:  # (only once written: a failed write leaves the layer as it was, nothing to restore)
        originals.append((m, original))
    report.layers.append(PrunedLayer(fqn, tuple(m.weight.shape), _layer_sparsity(m.weight), err))


# ---- OWL: outlier-weighted layerwise sparsity --------------------------------------------------------

def _shift_to_mean(raw: list[float], sizes: list[int], target: float, hi: list[float]) -> list[float]:
    """``clip(raw_l + c, 0, hi_l)`` with the one shift ``c`` that makes the ``sizes``-weighted mean equal
    ``target``: the weighted mean is nondecreasing in ``c``, so bisect, then solve the last step exactly
    on the layers left unclipped.  When ``target`` is not below the weighted mean of ``hi`` every layer
    gets its ``hi_l``."""
    total = float(sum(sizes))

    def mean(c):
        return sum(min(max(r + c, 0.0), h) * n for r, h, n in zip(raw, hi, sizes)) / total

    lo_c, hi_c = -max(raw) - 1.0, max(hi) - min(raw) + 1.0  # mean(lo_c) = 0; mean(hi_c) = mean of hi
    for _ in range(200):
        mid = 0.5 * (lo_c + hi_c)
        if mean(mid) < target:
            lo_c = mid
        else:
            hi_c = mid
    c = 0.5 * (lo_c + hi_c)
    free = sum(n for r, h, n in zip(raw, hi, sizes) if 0.0 < r + c < h)
    if free:
        c += (target - mean(c)) * total / free
    return [min(max(r + c, 0.0), h) for r, h in zip(raw, hi)]


def owl_sparsities(model: nn.Module, calib, sparsity: float, *, M: float = 5.0, lam: float = 0.08,
                   filter_fn: FilterFn | None = None) -> dict[str, float]:
    """Per-layer sparsities by outlier-weighted layerwise sparsity (OWL; Yin et al. 2023, "Outlier
    Weighed Layerwise Sparsity: A Missing Secret Sauce for Pruning LLMs to High Sparsity").

    For each selected layer, ``D_l`` is the fraction of its Wanda scores ``|W_ij| * ||X_j||_2`` (input
    norms over all calibration tokens, one pass of the dense model; one layer's scores held at a time) greater
    than ``M`` times the layer's mean score.  ``D`` is min-max scaled to ``d_l`` in ``[-1, 1]`` across layers
    (all ``0`` when every layer has the same ``D_l``) and ``s_l = sparsity - lam * d_l``: more outliers, fewer
    zeros.  The values are then shifted by one common constant so that the parameter-weighted mean
    ``sum_l s_l * M_l K_l / sum_l M_l K_l`` equals ``sparsity`` (the paper shifts the plain mean); when a
    shifted value leaves ``[0, (K_l - 1) / K_l]`` it is clipped (to 0, or to ``(K_l - 1) / K_l``: all but
    one weight of each row for Wanda, ``M_l * (K_l - 1)`` zeros for SparseGPT, the most a layer can lose
    while every row can keep a weight) and the shift is solved again over the others, so the weighted
    mean stays exactly ``sparsity`` (up to rounding of doubles); only when ``sparsity`` is at least the
    weighted mean of those caps does every layer get its cap and the mean fall short.  Pass the result to
    :func:`wanda_prune_` or :func:`sparsegpt_prune_`; their zero counts are then rounded per layer (Wanda
    per row) as usual, so the model's overall sparsity can differ from ``sparsity`` by that rounding.

    Args:
        model: any module called as ``model(batch)``; not modified.
        calib: calibration batches: a tensor (token ids ``LongTensor [B, T]``) or a sequence of them; every
            position is counted, pad tokens included (no attention mask): pass unpadded windows, or a list of
            unpadded ``[1, T_i]`` batches (module docstring, "Padding").
        sparsity: target mean sparsity, in ``[0, 1)``.
        M: outlier threshold, a multiple of the layer's mean score (> 0; paper: 3 to 10, default 5).
        lam: the spread ``lambda`` of the layer sparsities around ``sparsity``, in ``[0, 1]`` (paper: 0.08).
        filter_fn: ``(module, fqn) -> bool``; False leaves the layer out.

    Returns:
        ``{fqn: sparsity}`` for every selected non-empty ``nn.Linear``, in module order.
    """
    sparsity = _check_sparsity(sparsity)
    M_, lam_ = _real(M), _real(lam)
    if M_ is None or not 0.0 < M_ < math.inf:
        raise ValueError(f"M (the outlier threshold, a multiple of the mean score) must be a positive number, "
                         f"got {M!r}")
    if lam_ is None or not 0.0 <= lam_ <= 1.0:
        raise ValueError(f"lam must be a number in [0, 1], got {lam!r}")
    M, lam = M_, lam_
    layers = _select_linears(model, filter_fn, writes=False)  # (reads the weights only)
    batches = _calib_batches(calib, model)
    ratios = []
    for (_, m), norm in zip(layers, _wanda_input_norms(model, batches, layers)):
        score = _wanda_score(m, norm)  # (one layer's scores at a time, freed before the next layer's)
        ratios.append(float((score > M * score.mean()).float().mean()))
        del score
    lo, hi = min(ratios), max(ratios)
    d = [2.0 * (r - lo) / (hi - lo) - 1.0 if hi > lo else 0.0 for r in ratios]
    sizes = [m.weight.numel() for _, m in layers]
    caps = [(m.in_features - 1) / m.in_features for _, m in layers]
    out = _shift_to_mean([sparsity - lam * x for x in d], sizes, sparsity, caps)
    return {fqn: s for (fqn, _), s in zip(layers, out)}


# ---- gradual magnitude pruning with fine-tuning --------------------------------------------------------

@dataclass
class GradualPruneReport(PruneReport):
    """A :class:`PruneReport` of :func:`gradual_prune_`, plus ``losses`` (the training loss of every step,
    distillation term included) and ``schedule`` (``(step, sparsity)`` of every mask update, in order;
    the masks hold that sparsity from that step on)."""

    losses: list[float] = field(default_factory=list)
    schedule: list[tuple[int, float]] = field(default_factory=list)


def _cubic_sparsity(t: int, s_i: float, s_f: float, begin: int, end: int) -> float:
    if t >= end:
        return s_f
    return s_f + (s_i - s_f) * (1.0 - (t - begin) / (end - begin)) ** 3


def _cycle(batches, device, model: nn.Module | None = None):
    """Yield the batches of ``batches`` again and again (tensors moved to ``device``, integer ones as int64:
    :func:`_as_token_batch`).  With ``model``, each tensor batch is checked as it comes (:func:`_token_batch_error`,
    naming it ``batches[i]``, its index in the pass): for an iterable whose batches could not be checked up front."""
    n = 0
    while True:
        got = False
        for i, b in enumerate(batches):
            got = True
            n += 1
            if model is not None and isinstance(b, torch.Tensor):
                why = _token_batch_error(b, model, f"batches[{i}]")
                if why is not None:
                    raise ValueError(why)
            yield _as_token_batch(b, device) if isinstance(b, torch.Tensor) else b
        if not got:
            raise ValueError("batches is empty" + (f" on its second pass (after {n} batches): pass a re-iterable "
                                                    "(a list or a DataLoader), not a one-shot iterator" if n else ""))


def _check_loss(loss) -> None:
    """``loss_fn``'s result: a one-element tensor with a graph back to the model (else ``backward`` would fail)."""
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise TypeError(f"loss_fn must return a scalar tensor, got "
                        f"{type(loss).__name__ if not isinstance(loss, torch.Tensor) else tuple(loss.shape)}")
    if not loss.requires_grad:
        raise TypeError("loss_fn's result does not require grad: it has no graph back to the model's parameters "
                        "(e.g. detached, rebuilt from .item(), or computed under torch.no_grad()); return a loss "
                        "computed from model_output")


def _finite_loss(loss: torch.Tensor, t: int, t_out: torch.Tensor | None = None) -> float:
    """The loss of step ``t`` (``-1``: the check before the first step) as a float; FloatingPointError if it is NaN or
    Inf (checked before ``backward``, so Adam never spreads it over the weights), naming the teacher when its logits
    ``t_out`` (given with distillation) hold NaN or Inf themselves."""
    value = float(loss.detach())
    if not math.isfinite(value):
        state = ("checked on the first batch before any weight is modified" if t < 0 else
                 f"at step {t}; the model is left as trained and pruned up to that step")
        if t_out is not None and not _all_finite(t_out):
            raise FloatingPointError(f"gradual_prune_: the training loss is {value} ({state}) because teacher(batch) "
                                     "returned logits holding NaN or Inf: check the teacher (e.g. an fp16 copy whose "
                                     "logits overflow: use teacher.float()) and the batches")
        raise FloatingPointError(f"gradual_prune_: the training loss is {value} ({state}): the training diverged or "
                                 "a batch holds NaN or Inf; lower the learning rate (lr, or the optimizer's) or "
                                 "check the batches")
    return value


def _distill_loss(out: torch.Tensor, t_out: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(t_out) || softmax(out))`` in fp32 over the last dimension ``V`` (summed over ``V``, averaged over
    the other positions): the distillation term of :func:`gradual_prune_`, before ``distill_weight``."""
    v = out.shape[-1]
    return nn.functional.kl_div(out.float().reshape(-1, v).log_softmax(-1),
                                t_out.float().reshape(-1, v).log_softmax(-1), reduction="batchmean", log_target=True)


def _check_logits(out, t_out) -> None:
    if not isinstance(out, torch.Tensor) or not isinstance(t_out, torch.Tensor) or out.shape != t_out.shape:
        raise ValueError("distillation needs model(batch) and teacher(batch) to return logits of one "
                         f"shape, got {getattr(out, 'shape', type(out).__name__)} and "
                         f"{getattr(t_out, 'shape', type(t_out).__name__)}")


def _shared_with(teacher: nn.Module, model: nn.Module) -> list[tuple[str, str]]:
    """``(teacher tensor, model parameter)`` names of the teacher's parameters and buffers that share memory with a
    parameter of ``model`` (overlapping bytes of one storage, :func:`_sharing`; the first such parameter): those
    ``gradual_prune_`` would prune and train in the teacher too.  Disjoint views of one storage are not shared."""
    owners = _by_storage(model.named_parameters(remove_duplicate=False))
    tensors = [*teacher.named_parameters(remove_duplicate=False), *teacher.named_buffers(remove_duplicate=False)]
    return [(n, hits[0]) for n, t in tensors if (hits := _sharing(t, owners))]


def _check_int(name, v, lo) -> int:
    """``v`` as a Python int >= ``lo``: any integer but bool (numpy's, a 0-d tensor: :func:`flash_llm.data._as_int`);
    ValueError naming ``name`` otherwise."""
    from .data import _as_int  # (imported lazily, as above)

    n = _as_int(v)
    if isinstance(n, bool) or not isinstance(n, int) or n < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    return n


def gradual_prune_(model: nn.Module, batches, final_sparsity: float, *, steps: int, loss_fn: Callable,
                   optimizer: torch.optim.Optimizer | None = None, lr: float = 1e-3, begin: int = 0,
                   end: int | None = None, frequency: int = 10, initial_sparsity: float = 0.0,
                   teacher: nn.Module | None = None, distill_weight: float = 0.0,
                   filter_fn: FilterFn | None = None, progress: bool = True) -> GradualPruneReport:
    """Gradual magnitude pruning while training (Zhu & Gupta 2017, "To prune, or not to prune"; the
    retraining-based pruning Flash-LLM uses for its models), in place.

    ``steps`` optimizer steps ``t = 0 .. steps-1`` on ``batches`` (cycled).  At ``t = begin, begin +
    frequency, ...`` below ``end``, and at ``t = end``, each selected layer's mask is recomputed by
    magnitude: exactly ``max(min(round(s_t * M * K), M * K - 1), Z)`` zeros (a layer always keeps one weight,
    unless all were zero to begin with) with the cubic schedule
    ``s_t = s_f + (s_i - s_f) * (1 - (t - begin) / (end - begin))^3`` (``s_i = initial_sparsity``,
    ``s_f = final_sparsity``).  ``Z`` counts the layer's weights that are zero when the call starts (an already
    pruned model's zeros): those stay zero throughout, from step 0 on (no mask keeps them; the schedule's
    sparsity is a floor on top of them, as the one-shot pruners keep a layer's existing zeros), so continuing to
    prune a pruned model never revives its mask.  (A layer initialized to all zeros thus stays zero: leave it out
    with ``filter_fn``.)  The other zeros of each update go to the smallest ``|w|`` of the other weights.  Between
    updates the masks are fixed: gradients of pruned weights are zeroed before every optimizer step and
    the zeros are written again after it (momentum or weight decay cannot revive them), so pruned weights
    stay exactly zero.  With ``end == steps`` the last update (to ``s_f``) comes after the last step.
    Every layer thus ends with exactly ``max(min(round(final_sparsity * M * K), M * K - 1), Z)`` zeros (more
    only if training drove a kept weight to exactly zero).

    Each step: ``out = model(batch)`` in train mode, ``loss = loss_fn(out, batch)`` and, with a teacher,
    ``loss += distill_weight * KL(softmax(teacher(batch)) || softmax(out))`` (temperature 1; both outputs
    are logits ``[..., V]``, KL summed over ``V`` and averaged over the other positions; the teacher runs
    in eval mode under ``no_grad``).  The training flags of model and teacher (every submodule's own) are
    restored at the end.

    Bad input is refused before any weight is modified: a one-shot iterator as ``batches`` (TypeError; a generator's
    second pass would be empty) or one dict batch as ``batches`` (TypeError: pass ``[batch]``) and selected weights
    holding NaN or Inf (ValueError) before anything runs, for a model with a ``config.vocab_size``, a tensor batch of a
    tensor, list or tuple ``batches`` that is not integer or holds an id outside the vocabulary (ValueError naming it;
    those of another iterable, a DataLoader, as they come), an empty ``batches`` before the first step, and with
    ``begin == 0`` (a mask update before the first step) ``loss_fn``'s result (a scalar tensor that requires grad, else
    TypeError), the teacher's output shape and the step's whole loss (distillation term included: a finite value, else
    FloatingPointError) are checked first on one extra forward of the first batch in eval mode (with autograd on, no
    backward; the teacher under ``no_grad``).  (With ``begin > 0`` step 0 checks them before its backward and optimizer
    step.)

    Non-finite training: every step's loss is checked before its backward; a NaN or Inf loss raises
    FloatingPointError naming the step (lower the learning rate or check the batches; the model is then left
    as trained and pruned up to that step), and so does a parameter holding NaN or Inf after the last step.
    When the teacher's logits hold NaN or Inf themselves (e.g. an fp16 copy of the dense model that overflows),
    the error names the teacher instead.

    Precision: the model trains in fp32; fp16/bf16 parameters are refused (call ``model.float()`` first;
    mixed precision, e.g. ``torch.autocast`` inside ``loss_fn`` or the model, is the caller's job).

    State left: once a step has run, the call ends (on return, and on an error after that step) with no ``.grad``
    on the model's parameters that require grad, the pruned weights, and ``optimizer``'s parameters (set to None:
    the last step's gradients, nonzero even at weights a final mask update pruned, would otherwise take the
    memory of the trained parameters and be summed into a caller's next ``backward()``).  A given ``optimizer``'s
    state (e.g. Adam's moments) stays the caller's: it is neither reset nor masked.

    Padding: a tensor batch is all the model gets (``model(batch)``, no attention mask), so the pad positions of a
    padded tensor batch are trained on unless ``loss_fn`` ignores them (with left padding they change the real
    tokens' outputs too): pass unpadded windows, as ``flash-llm prune`` does.  A batch that is not a tensor (a dict, a
    ``BatchEncoding``) is not refused: it reaches ``model(batch)`` and ``loss_fn`` as it is (not moved to a device
    nor checked), so the pads are masked only if the model reads a mask from it.

    Args:
        model: any module called as ``model(batch)``; every ``nn.Linear`` that ``filter_fn`` accepts is pruned,
            all parameters with ``requires_grad`` are trained (by the default optimizer).
        batches: an iterable of batches (token ids ``LongTensor [B, T]`` or whatever the model takes), or one
            tensor; it is iterated again when exhausted, so it must be re-iterable (list, DataLoader; a one-shot
            iterator such as a generator is refused).  Integer tensors (token ids of any integer dtype, e.g.
            uint8) reach the model and ``loss_fn`` as int64.
        final_sparsity: ``s_f``, in ``[0, 1)``.
        steps: number of optimizer steps, >= 1.  (``steps``, ``begin``, ``end`` and ``frequency`` may be any
            integers but bools: numpy's, 0-d tensors.)
        loss_fn: ``(model_output, batch) -> scalar tensor``.
        optimizer: over the model's parameters; default ``torch.optim.Adam(trainable params, lr=lr)``.
        lr: learning rate of the default optimizer (ignored when ``optimizer`` is given).
        begin: step of the first mask update (``s_i``), ``0 <= begin <= end``.
        end: step at which ``s_f`` is reached, ``<= steps``; default ``begin + 3 * (steps - begin) // 4``
            (the last quarter fine-tunes at ``s_f``).
        frequency: steps between mask updates, >= 1.
        initial_sparsity: ``s_i``, in ``[0, final_sparsity]``.
        teacher: optional module for distillation (e.g. a copy of the dense model); not ``model`` itself, and
            none of its parameters or buffers may share memory with a parameter of ``model`` (overlapping bytes;
            disjoint views of one storage are fine), else ValueError.
        distill_weight: weight of the KL term, >= 0; must be > 0 when ``teacher`` is given, and 0 without.
        filter_fn: ``(module, fqn) -> bool``; False leaves the layer unpruned (still trained).
        progress: tqdm bar over the steps with the loss, the sparsity the masks hold (``sparsity``: zeros over
            the weights of the pruned layers, their initial zeros included) and the schedule's ``target``.

    Returns:
        A :class:`GradualPruneReport` (``method="gradual"``, ``error`` ``None``) with the loss per step and
        the schedule of mask updates.
    """
    final_sparsity = _check_sparsity(final_sparsity, "final_sparsity")
    initial_sparsity = _check_sparsity(initial_sparsity, "initial_sparsity")
    if initial_sparsity > final_sparsity:
        raise ValueError(f"initial_sparsity ({initial_sparsity}) must not exceed final_sparsity ({final_sparsity})")
    steps = _check_int("steps", steps, 1)
    begin = _check_int("begin", begin, 0)
    frequency = _check_int("frequency", frequency, 1)
    if end is None:
        end = begin + 3 * (steps - begin) // 4
    end = _check_int("end", end, 0)
    if not begin <= end <= steps:
        raise ValueError(f"need 0 <= begin <= end <= steps, got begin={begin}, end={end}, steps={steps}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable (model_output, batch) -> scalar, got {type(loss_fn).__name__}")
    if isinstance(batches, Iterator):  # (a generator: its second pass would be empty, found only after training)
        raise TypeError(f"batches is a one-shot iterator ({type(batches).__name__}) that gradual_prune_ could not "
                        "cycle over: pass a re-iterable (a list or a DataLoader)")
    if isinstance(batches, Mapping):  # (one dict batch given as the batches: cycled over its keys until session 87)
        raise TypeError(f"batches must be an iterable of batches (a list or a DataLoader), got a "
                        f"{type(batches).__name__}: for one batch pass [batch]")
    weight = _real(distill_weight)
    if weight is None or not 0.0 <= weight < math.inf:
        raise ValueError(f"distill_weight must be a number >= 0, got {distill_weight!r}")
    distill_weight = weight
    if teacher is None and distill_weight > 0:
        raise ValueError(f"distill_weight is {distill_weight} but no teacher is given")
    if teacher is not None:
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be an nn.Module, got {type(teacher).__name__}")
        if teacher is model:
            raise ValueError("teacher is model itself: pass a copy (copy.deepcopy(model)) taken before pruning")
        shared = _shared_with(teacher, model)
        if shared:
            raise ValueError(f"teacher shares memory with model ({shared[0][0]!r} of teacher is {shared[0][1]!r} of "
                             f"model{f', and {len(shared) - 1} more' if len(shared) > 1 else ''}): it would be "
                             "pruned and trained along with it; pass a copy (copy.deepcopy(model)) taken before "
                             "pruning")
        if distill_weight == 0:
            raise ValueError("teacher is given but distill_weight is 0: set distill_weight > 0 or drop teacher")
    layers = _select_linears(model, filter_fn)
    low = [(n, p.dtype) for n, p in model.named_parameters() if p.dtype in (torch.float16, torch.bfloat16)]
    if low:
        raise TypeError(f"model has {low[0][1]} parameters (e.g. {low[0][0]!r}); gradual_prune_ trains in fp32: "
                        "call model.float() first (mixed precision is the caller's job)")
    if optimizer is None:
        rate = _real(lr)
        if rate is None or not 0.0 < rate < math.inf:
            raise ValueError(f"lr must be a positive number, got {lr!r}")
        # Adam's first step is lr / (1 - beta1) = 10 lr, passed to fp32 kernels: beyond float32 it is a bare
        # RuntimeError ("cannot be converted to type float without overflow") in the middle of the first step
        if rate / (1 - 0.9) > torch.finfo(torch.float32).max:
            raise ValueError(f"lr must be at most {torch.finfo(torch.float32).max * (1 - 0.9):.4g} (the default Adam's "
                             f"first step, 10 x lr, must fit float32), got {lr!r}")
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("model has no parameter with requires_grad=True to train")
        optimizer = torch.optim.Adam(params, lr=rate)
    elif not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")

    from .evaluate import _model_device  # (lazily: flash_llm.evaluate imports this module)

    device = _model_device(model)  # (a model whose weights are buffers, trained by a given optimizer, has none)
    weights = [m.weight for _, m in layers]
    # the weights zero at the start (an already pruned model's) stay zero: no mask keeps them, from step 0 on
    # (None for a layer without zeros: no mask kept for it, a byte a weight over the whole run)
    zero0: list[torch.Tensor | None] = []
    for w in weights:
        z = w.detach() == 0
        zero0.append(z if bool(z.any()) else None)
        del z
    zeros0 = [0 if z is None else int(z.sum()) for z in zero0]
    keep = [torch.ones_like(w, dtype=torch.bool) if z is None else ~z for w, z in zip(weights, zero0)]
    # zeros each layer's mask holds (kept up to date by update_masks, no pass over the weights): the progress bar
    # shows the sparsity reached, which the schedule's target understates (initial zeros, rounding, the cap)
    masked = list(zeros0)
    numel = sum(w.numel() for w in weights)
    report = GradualPruneReport("gradual", final_sparsity)
    update_at = set(range(begin, end, frequency)) | {end}

    def update_masks(t):
        s = _cubic_sparsity(t, initial_sparsity, final_sparsity, begin, end)
        with torch.no_grad():
            for i, w in enumerate(weights):
                # max(count, initial zeros) zeros: the initial zeros, plus the `extra` smallest of the other weights
                # (the initial zeros score +inf there, never picked: extra is below the number of the others)
                extra = max(0, _count(s, w.numel()) - zeros0[i])
                masked[i] = zeros0[i] + extra
                if zero0[i] is None:
                    keep[i] = ~_lowest_k([w], extra)[0]
                else:
                    keep[i] = ~(_lowest_k([w.detach().masked_fill(zero0[i], math.inf)], extra)[0] | zero0[i])
                w.masked_fill_(~keep[i], 0)
        report.schedule.append((t, s))

    model_flags = _training_flags(model)
    teacher_flags = _training_flags(teacher) if teacher is not None else []
    # a model with a vocabulary takes integer token ids in it (_token_batch_error): the tensors of a tensor, list or
    # tuple checked here, before anything is modified; those of another iterable (a DataLoader) as they come
    listed = isinstance(batches, (torch.Tensor, list, tuple))
    named = [("batches", batches)] if isinstance(batches, torch.Tensor) else \
        [(f"batches[{i}]", b) for i, b in enumerate(batches)] if listed else []
    for name, b in named:
        why = _token_batch_error(b, model, name) if isinstance(b, torch.Tensor) else None
        if why is not None:
            raise ValueError(why)
    data = _cycle([batches] if isinstance(batches, torch.Tensor) else batches, device, None if listed else model)
    bar = tqdm(range(steps), desc="gradual prune", unit="step", disable=not progress)
    trained = False  # (set once a step starts its backward: the gradients it leaves are cleared at the end)
    try:
        if teacher is not None:
            teacher.eval()
        first = next(data)  # an empty `batches` is refused here, before anything is modified
        data = itertools.chain([first], data)
        if begin == 0:  # the first mask update precedes step 0's checks: check loss_fn (and teacher) first
            model.eval()
            out = model(first)  # (autograd on, to see that the loss has a graph; no backward)
            loss = loss_fn(out, first)
            _check_loss(loss)
            t_out = None
            if teacher is not None:  # (the whole loss, as the steps compute it: the teacher's term can be NaN too)
                with torch.no_grad():
                    t_out = teacher(first)
                _check_logits(out, t_out)
                loss = loss + distill_weight * _distill_loss(out, t_out)
            _finite_loss(loss, -1, t_out)
            del out, loss, t_out
        model.train()
        for t in bar:
            if t in update_at:
                update_masks(t)
            batch = next(data)
            out = model(batch)
            loss = loss_fn(out, batch)
            _check_loss(loss)
            if teacher is not None:
                with torch.no_grad():
                    t_out = teacher(batch)
                _check_logits(out, t_out)
                loss = loss + distill_weight * _distill_loss(out, t_out)
            value = _finite_loss(loss, t, t_out if teacher is not None else None)
            trained = True
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for w, k in zip(weights, keep):
                if w.grad is not None:
                    w.grad.mul_(k)
            try:
                optimizer.step()
            except RuntimeError as e:  # (a step size beyond float32, say: the caller's optimizer's lr)
                if "overflow" not in str(e):
                    raise
                raise FloatingPointError(f"gradual_prune_: the optimizer's step {t} overflowed ({e}); the model is "
                                         "left as trained and pruned up to that step, the step perhaps half applied: "
                                         "lower the learning rate (lr, or the optimizer's)") from e
            with torch.no_grad():
                for w, k in zip(weights, keep):
                    w.masked_fill_(~k, 0)
            report.losses.append(value)
            bar.set_postfix(loss=f"{report.losses[-1]:.4g}",
                            sparsity=f"{sum(masked) / numel:.3f}",  # (numel > 0: no layer, refused)
                            target=f"{report.schedule[-1][1]:.3f}" if report.schedule else "0")
        if end == steps:
            update_masks(steps)
        # the last step's update is followed by no loss that would show a blow-up: check the weights themselves
        bad = _nonfinite_parameter(model)
        if bad is not None:
            raise FloatingPointError(f"gradual_prune_: parameter {bad!r} holds NaN or Inf after the last step: the "
                                     "training diverged; lower the learning rate (lr, or the optimizer's)")
    finally:
        bar.close()
        _restore_training_flags(model_flags)
        _restore_training_flags(teacher_flags)
        if trained:  # the last step's gradients (nonzero at weights a final mask update pruned): not left behind
            optimizer.zero_grad(set_to_none=True)
            for p in itertools.chain(model.parameters(), weights):
                if p.requires_grad:
                    p.grad = None
    for (fqn, m) in layers:
        report.layers.append(PrunedLayer(fqn, tuple(m.weight.shape), _layer_sparsity(m.weight), None))
    return report

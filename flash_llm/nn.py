"""Model integration: :class:`SparseLinear`, a drop-in ``nn.Linear`` whose weight stays compressed, and
:func:`sparsify_`, which swaps a model's ``nn.Linear`` layers for it in place (torchao conventions).

::

    report = flash_llm.sparsify_(model)             # fp16/bf16 model, pruned weights
    print(report)                                   # what was converted, what stayed dense and why
    y = model(x)                                    # SparseLinear layers call flash_llm.spmm

Inference only: a :class:`SparseLinear` holds no parameters and no gradient flows to its weight.
"""

from __future__ import annotations

import contextlib
import copy as _copy
import functools
import json
import math
import random
import sys
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable, NamedTuple

import torch
import torch.fx
from torch import nn
from torch.nn.utils import parametrize

from .formats import FORMATS, BitmapTiles, DeltaRows, FormatError, SparseFormat, TiledCSL
from .formats._base import (COUNT_CHUNK, METADATA_KEY, VALUE_DTYPES, _magnitude_bits, check_dense_weight,
                            count_nonzero, dtype_name)
from .formats.delta_rows import MAX_K as _DELTA_ROWS_MAX_K
from .ops import spmm
from .prune import _by_storage, _real, _recomputed_weight, _sharing

#: Format names accepted by ``fmt=`` and :attr:`SparsifyConfig.format`.
FORMAT_NAMES = {"bitmap": BitmapTiles, "tiled-csl": TiledCSL, "delta-rows": DeltaRows}

_SAVING = threading.local()  # .on: coded weights' plain copies in state_dict() go to the CPU (plain_state_on_cpu)


@contextlib.contextmanager
def plain_state_on_cpu():
    """Inside, a :class:`SparseLinear` whose weight the engine coded (``DeltaRows.code_values``) puts the plain copies
    it writes into ``state_dict()`` on the CPU, each moved there (and its device copy freed) before the next layer's
    is made.  The checkpoint writers use it, so saving a coded model from a GPU takes one layer's plain copy of device
    memory at a time, not every layer's at once.  Elsewhere ``state_dict()`` keeps them on the weight's device."""
    before = getattr(_SAVING, "on", False)
    _SAVING.on = True
    try:
        yield
    finally:
        _SAVING.on = before


def _format_class(fmt, name: str = "fmt") -> type[SparseFormat]:
    if isinstance(fmt, type) and issubclass(fmt, SparseFormat) and fmt in FORMATS.values():
        return fmt
    if isinstance(fmt, str) and fmt in FORMAT_NAMES:
        return FORMAT_NAMES[fmt]
    raise ValueError(f"{name} must be one of {sorted(FORMAT_NAMES)} or a format class "
                     f"(BitmapTiles, TiledCSL, DeltaRows); got {fmt!r}")


def check_fraction(value, name: str) -> float:
    """``value`` as a float, or ValueError naming ``name`` unless it is a real number (not a bool; numpy scalars and
    0-d tensors too: :func:`flash_llm.prune._real`) in [0, 1]."""
    v = _real(value)
    if v is None or not 0.0 <= v <= 1.0:  # (NaN fails too)
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return v


@functools.lru_cache(maxsize=None)
def _loss_checkable(dtype: torch.dtype) -> bool:
    """Whether :func:`cast_loss` can check a cast from ``dtype``: torch has no ``isfinite`` for some float8 dtypes
    (``float8_e4m3fn``, the ``fnuz`` ones)."""
    try:
        torch.isfinite(torch.zeros(1, dtype=dtype))
    except (NotImplementedError, RuntimeError):
        return False
    return True


def _uncheckable_cast(t: torch.Tensor, dtype: torch.dtype | None, name: str) -> str | None:
    """Why ``t`` (named ``name``) cannot be cast to ``dtype`` with the loss check, or None where it can."""
    if dtype is None or t.dtype == dtype or not t.dtype.is_floating_point or _loss_checkable(t.dtype):
        return None
    return (f"{name} has dtype {t.dtype}, which is not supported: a cast from it to {dtype} cannot be checked for "
            "overflow (torch has no isfinite for it); cast it to float32 first")


def _tensor_bytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _delta_rows_too_wide(k: int, what: str, fmt_arg: str) -> str | None:
    """Why DeltaRows (16-bit columns) cannot hold ``k`` columns, in the caller's words (``what`` names them, ``fmt_arg``
    its format argument; the format's own message says ``w`` / ``K``), or None where it can."""
    if k < _DELTA_ROWS_MAX_K:
        return None
    return (f"{what} {k} >= {_DELTA_ROWS_MAX_K}: DeltaRows stores 16-bit columns (use {fmt_arg}='bitmap' or "
            "'tiled-csl' for it)")


class LossyCastError(ValueError):
    """A cast to fp16 / bf16 would change a weight or bias beyond rounding: finite values overflow to inf, or
    nonzeros flush to zero (:func:`cast_loss`).  :class:`SparseLinear` refuses such a cast and :func:`sparsify_`
    keeps such a layer dense; the formats' own ``from_dense(dtype=...)`` casts as ``Tensor.to`` does."""


def cast_loss(src: torch.Tensor, dst: torch.Tensor, underflow: bool = True) -> str | None:
    """What ``dst``, the cast of ``src`` (the same shape), lost beyond rounding, or None: finite values that became
    inf (overflow: fp16 holds at most 65504) and, unless ``underflow`` is False, nonzeros that became zero
    (underflow: below half of fp16's smallest subnormal, about 6e-8, or of bf16's, about 9e-41).  Counted ``COUNT_CHUNK`` elements at a time, zeros by bits
    (as :func:`~flash_llm.formats._base.count_nonzero`).  None where either is on the meta device: it holds no values,
    so none can be lost (a meta tensor, as ``nn.Linear(device="meta")`` makes, casts by its dtype alone).  A source
    dtype torch has no ``isfinite`` for (``float8_e4m3fn``, the ``fnuz`` ones: :func:`_loss_checkable`) is checked a
    chunk at a time in float32, which holds each of its values exactly (a float8 checkpoint's load, session 88;
    :class:`SparseLinear` still refuses such weights: :func:`_uncheckable_cast`)."""
    a, b = src.detach().reshape(-1), dst.detach().reshape(-1)
    if a.dtype == b.dtype or not a.dtype.is_floating_point or a.is_meta or b.is_meta:
        return None
    upcast = not _loss_checkable(a.dtype)
    over = torch.zeros((), dtype=torch.int64, device=a.device)
    under = torch.zeros((), dtype=torch.int64, device=a.device)
    for i in range(0, a.numel(), COUNT_CHUNK):
        x, y = a[i: i + COUNT_CHUNK], b[i: i + COUNT_CHUNK]
        x = x.float() if upcast else x
        over += torch.count_nonzero(torch.isfinite(x) & ~torch.isfinite(y))
        if underflow:
            under += torch.count_nonzero((_magnitude_bits(x) != 0) & (_magnitude_bits(y) == 0))
    over, under = int(over), int(under)
    parts = [*([f"{over} finite value(s) overflow to inf"] if over else []),
             *([f"{under} nonzero(s) flush to zero"] if under else [])]
    return f"{' and '.join(parts)} in {b.dtype}" if parts else None


#: torch's own ``nn.Module.load_state_dict`` (taken at import: a library wrapping the method later leaves its frame
#: on the stack with this code)
_LOAD_STATE_DICT_CODE = nn.Module.load_state_dict.__code__


def _strict_load() -> bool:
    """Whether the ``nn.Module.load_state_dict`` running this load was asked for ``strict=True`` (its frame's
    ``strict``).  Its loader passes ``strict=True`` to every module's ``_load_from_state_dict`` whatever was asked (and
    raises on missing keys afterwards only where asked), so the argument cannot tell.  False where no such call is on
    the stack (a loader of its own calling ``_load_from_state_dict``, a patched ``load_state_dict``): no error of
    torch's is sure to follow there."""
    code = _LOAD_STATE_DICT_CODE
    f = sys._getframe(1)
    while f is not None:
        if f.f_code is code:
            return bool(f.f_locals.get("strict", False))
        f = f.f_back
    return False


def _exact_bias(bias: torch.Tensor, dtype: torch.dtype, name: str, copy: bool = True) -> torch.Tensor:
    """``bias`` in ``dtype`` (a copy unless ``copy`` is False), refusing (:class:`LossyCastError`, naming ``name``) a
    cast that is not exact to rounding.  A meta ``bias`` (no values to check: :func:`cast_loss`) is cast as it is."""
    if (why := _uncheckable_cast(bias, dtype, name)) is not None:
        raise TypeError(why)
    cast = bias.detach().to(dtype, copy=copy)
    loss = cast_loss(bias, cast)
    if loss is not None:
        raise LossyCastError(f"{name} cannot be cast to the weight's dtype {dtype} exactly to rounding: {loss}")
    return cast


def _exact_dense_weight(weight, dtype: torch.dtype | None, name: str) -> torch.Tensor:
    """``check_dense_weight(weight, dtype, name)``, refusing (:class:`LossyCastError`, naming ``name``) a cast to
    ``dtype`` that is not exact to rounding."""
    if isinstance(weight, torch.Tensor) and (why := _uncheckable_cast(weight, dtype, name)) is not None:
        raise TypeError(why)
    w = check_dense_weight(weight, dtype, name=name)
    loss = cast_loss(weight, w) if dtype is not None else None
    if loss is not None:
        raise LossyCastError(f"{name} cannot be cast to dtype={dtype} exactly to rounding: {loss} (rescale it, or "
                             "pick the other dtype: bfloat16 has fp32's range)")
    return w


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype ``torch.autocast`` runs a linear layer on ``x`` in (its device type's autocast dtype), or None where
    autocast is off there or leaves ``x`` alone (not floating, or float64)."""
    kind = x.device.type
    if (not x.is_floating_point() or x.dtype == torch.float64 or kind not in ("cpu", "cuda")
            or not torch.is_autocast_enabled(kind)):  # (autocast leaves float64 alone)
        return None
    return torch.get_autocast_dtype(kind)


class SparseLinear(nn.Module):
    """``y = x @ W^T + b`` with ``W [out_features, in_features]`` kept compressed; a drop-in
    replacement for an inference-only ``nn.Linear``.

    The compressed arrays are persistent buffers ``weight_data`` and ``weight_offsets`` (int32, 1-D);
    the bias is a buffer ``bias`` (``[out_features]`` in the weight's dtype) or ``None``.  Buffers,
    not parameters: the layer is for inference, ``model.parameters()`` does not list it and no
    gradient reaches the weight or the bias.  :attr:`weight` rebuilds the format object from the
    buffers (no copies), so ``.to(device)`` / ``.cuda()`` moves work as for any module.

    **Dtype is fixed at compression.**  Module dtype casts (``.half()``, ``.float()``,
    ``.to(torch.bfloat16)``, ``.type(...)``) move nothing but the device: the int32 arrays encode
    fp16/bf16 bit patterns and the bias stays in the weight's dtype (a ``UserWarning`` says so when a
    cast would have changed it).  Inputs must have the weight's dtype (:attr:`weight_dtype`); to
    change it, rebuild the layer: ``SparseLinear.from_dense(layer.to_dense(), layer.bias, dtype=...)``.

    **State dicts** hold the two arrays, the bias and ``_extra_state``: the format metadata (format,
    version, dtype, shape, nnz; a dict of str/int, loadable with ``torch.load(weights_only=True)``).
    ``load_state_dict`` validates the arrays fully (a corrupt checkpoint raises, naming the tensor) and
    *replaces* them, so any layer of the same shape and bias presence loads any other's state, whatever
    its nnz, format or dtype; :meth:`zeros` builds such a shell (also on the ``meta`` device, for
    ``load_state_dict(..., assign=True)``).  As for ``nn.Linear``: a load under ``torch.inference_mode()``
    leaves normal tensors (the layer still runs with autograd); loading values into a ``meta`` layer without
    ``assign=True`` loads none (a ``UserWarning`` says so); a checkpoint whose arrays are on ``meta`` loads
    only into a ``meta`` layer or with ``assign=True``, and elsewhere is an error naming the keys.  The bias
    ends in the weight's dtype either way (``assign=True`` casts a checkpoint bias of another dtype); a bias cast
    that is not exact to rounding (the checkpoint's, or with ``strict=False`` and no bias in it the layer's own,
    into the loaded weight's dtype: values overflowing to inf, nonzeros flushed to zero) is an error naming the
    key (:class:`LossyCastError`'s message) and loads nothing into the layer.  A load that takes the checkpoint's
    arrays puts the bias in a new tensor too (references held to the old arrays or bias keep the old values), so a
    ``copy.copy`` of the layer (its own buffer dict, the tensors shared) loads without changing the original.  A
    state dict lacking one of the layer's arrays loads nothing into it: strict, the load's error names the array (the
    layer's message beside torch's missing keys, also where a post-hook takes them out); with ``strict=False`` a
    ``UserWarning`` names what was dropped.

    **Not supported** (each refused in words): ``torch.jit.script`` (a TypeError; use ``torch.jit.trace``,
    ``torch.compile`` or ``torch.export``) and ``torch.nn.utils.parametrize`` parametrizations of the layer's buffers
    (its forward, dtype casts and moves raise a TypeError, a load the RuntimeError of ``load_state_dict`` with the
    reason among its errors; remove the parametrization first).

    Args:
        weight: the compressed weight ``[out_features, in_features]``
            (:class:`~flash_llm.BitmapTiles`, :class:`~flash_llm.TiledCSL` or :class:`~flash_llm.DeltaRows`).
        bias: optional ``[out_features]`` floating tensor on the weight's device; cast to the
            weight's dtype, a cast not exact to rounding refused (:class:`LossyCastError`).  On the ``meta``
            device there are no values to check (or lose): a meta bias of another dtype (an fp32 one, as
            ``nn.Linear(device="meta")`` makes) is cast by its dtype alone.
    """

    weight_data: torch.Tensor
    weight_offsets: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, weight: SparseFormat, bias: torch.Tensor | None = None):
        super().__init__()
        if not isinstance(weight, SparseFormat):
            raise TypeError(f"weight must be a flash_llm compressed weight (BitmapTiles, TiledCSL or DeltaRows), got "
                            f"{type(weight).__name__}; use SparseLinear.from_dense for a dense tensor")
        m, k = weight.shape
        if bias is not None:
            if not isinstance(bias, torch.Tensor):
                raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
            if tuple(bias.shape) != (m,):
                raise ValueError(f"bias has shape {tuple(bias.shape)}; expected ({m},) for a {m}x{k} weight")
            if not bias.dtype.is_floating_point:
                raise TypeError(f"bias has dtype {bias.dtype}; expected a floating-point tensor")
            if bias.device != weight.device:
                raise ValueError(f"bias is on {bias.device} but weight is on {weight.device}")
            bias = _exact_bias(bias, weight.dtype, "bias", copy=False)
        self.in_features = k
        self.out_features = m
        self.weight_format: type[SparseFormat] = type(weight)
        self.weight_dtype: torch.dtype = weight.dtype
        for n, t in weight.tensors().items():
            self.register_buffer("weight_" + n, t)
        self.register_buffer("bias", bias)
        nnz = weight.nnz
        if nnz < 0 and weight.device.type != "meta":  # a weight built without its count (reference.as_format)
            nnz = type(weight)._validate(weight.tensors(), weight.shape, "", "")
        self._nnz: int = nnz
        self._unfilled = False  # arrays allocated without values (to_empty()): forward / to_dense refuse

    # ---- constructors --------------------------------------------------------------------------
    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, fmt="bitmap",
                   dtype: torch.dtype | None = None) -> "SparseLinear":
        """Compress a dense ``weight [out_features, in_features]`` (fp16/bf16; ``dtype=`` casts another
        floating dtype) into format ``fmt`` (``"bitmap"``, ``"tiled-csl"`` or ``"delta-rows"``), on its device.  The
        bias is copied (cast to the weight's dtype); the layer shares no memory with the inputs.  A cast that is not
        exact to rounding (a finite value overflowing to inf, a nonzero flushed to zero) raises a ValueError
        (:class:`LossyCastError`) naming ``weight`` or ``bias``; ``fmt="delta-rows"`` with ``in_features`` of 65536
        or more a ValueError naming ``weight`` (16-bit columns).  Built outside inference
        mode (under ``torch.inference_mode()`` too), so the layer runs with autograd afterwards."""
        return cls._from_dense(weight, bias, fmt, dtype, "weight", "bias")

    @classmethod
    def _from_dense(cls, weight, bias, fmt, dtype, name: str, bias_name: str) -> "SparseLinear":
        """:meth:`from_dense`, its errors naming the weight ``name`` and the bias ``bias_name``."""
        cls_ = _format_class(fmt)
        with torch.inference_mode(False):  # normal tensors, as a load_state_dict under inference mode leaves
            w = _exact_dense_weight(weight.detach() if isinstance(weight, torch.Tensor) else weight, dtype, name)
            if cls_ is DeltaRows and (why := _delta_rows_too_wide(w.shape[1], f"in_features ({name}.shape[1])",
                                                                  "fmt")) is not None:
                raise ValueError(why)
            w = cls_.from_dense(w)
            if isinstance(bias, torch.Tensor) and bias.dtype.is_floating_point:  # others: __init__ says why not
                bias = _exact_bias(bias, w.dtype, bias_name)
            return cls(w, bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt="bitmap", dtype: torch.dtype | None = None) -> "SparseLinear":
        """The compressed equivalent of ``linear`` (its weight fp16/bf16, or any floating dtype with
        ``dtype=``), on its device, in its ``train()`` / ``eval()`` mode.  Zeros of the weight are what gets dropped:
        prune first."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        layer = cls._from_dense(linear.weight, linear.bias, fmt, dtype, "linear.weight", "linear.bias")
        return layer.train(linear.training)  # (as to_linear and sparsify_ carry it)

    @classmethod
    def zeros(cls, in_features: int, out_features: int, bias: bool = True, fmt="bitmap",
              dtype: torch.dtype = torch.float16, device=None) -> "SparseLinear":
        """An all-zero layer (nnz 0, zero bias): a shell to ``load_state_dict`` a checkpoint into.

        Built without a dense matrix, so cheap for any shape, on ``device`` as torch reads it (``None``: the CPU;
        ``0`` is ``cuda:0``); ``device="meta"`` allocates nothing (load with ``assign=True`` then).
        ``fmt="delta-rows"`` needs ``in_features`` below 65536 (16-bit columns; else ValueError naming
        ``in_features``).
        """
        if dtype not in VALUE_DTYPES:
            raise TypeError(f"dtype must be torch.float16 or torch.bfloat16, got {dtype}")
        from .data import _as_int  # (numpy integers and 0-d integer tensors as Python ints)

        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(_as_int(v), int) or _as_int(v) < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        in_features, out_features = _as_int(in_features), _as_int(out_features)
        cls_ = _format_class(fmt)
        if cls_ is DeltaRows and (why := _delta_rows_too_wide(in_features, "in_features", "fmt")) is not None:
            raise ValueError(why)
        w = cls_.zeros(out_features, in_features, dtype, "cpu" if device is None else device)  # (0 is cuda:0)
        return cls(w, torch.zeros(out_features, dtype=dtype, device=w.device) if bias else None)

    # ---- the weight ----------------------------------------------------------------------------
    def _format(self, nnz: int) -> SparseFormat:
        arrays = {n: getattr(self, "weight_" + n) for n in self.weight_format._arrays}
        return self.weight_format._from_parts(arrays, (self.out_features, self.in_features), self.weight_dtype,
                                              nnz)

    @property
    def weight(self) -> SparseFormat:
        """The compressed weight as a format object over this module's buffers (no copies)."""
        return self._format(self._nnz)

    @property
    def nnz(self) -> int:
        """Nonzeros of the weight (validated from the arrays when built or loaded)."""
        return self._nnz

    @property
    def density(self) -> float:
        """Fraction of nonzero elements, ``nnz / (M * K)``.  A layer loaded without its count (a state dict without
        ``_extra_state``: nnz -1) counts it from its arrays, as its weight does; on the meta device: ValueError (until
        session 76 it returned ``-1 / (M * K)``)."""
        if self._nnz < 0:
            w = self.weight
            d = w.density  # (counts and validates; raises on meta)
            self._nnz = w.nnz
            return d
        return self._nnz / (self.out_features * self.in_features)

    @property
    def nbytes(self) -> int:
        """Bytes of the compressed weight's arrays (the bias not included)."""
        return sum(_tensor_bytes(getattr(self, "weight_" + n)) for n in self.weight_format._arrays)

    def _replace_weight(self, weight: SparseFormat) -> None:
        """Hold ``weight`` (any format, the same shape, dtype and device) in place of the present one: the same
        module, its arrays' buffers replaced (the engine's re-encoding; the bias is kept).  The buffers are
        ``weight``'s tensors themselves, no copies (the engine swaps weights by identity), so tensors made under
        ``torch.inference_mode()`` stay inference tensors here."""
        if not isinstance(weight, SparseFormat):
            raise TypeError(f"weight must be a flash_llm compressed weight, got {type(weight).__name__}")
        if (tuple(weight.shape) != (self.out_features, self.in_features) or weight.dtype != self.weight_dtype
                or weight.device != self.weight_data.device):
            raise ValueError(f"weight is {weight.dtype} {tuple(weight.shape)} on {weight.device}; this layer holds "
                             f"{self.weight_dtype} {(self.out_features, self.in_features)} on "
                             f"{self.weight_data.device}")
        for n in self.weight_format._arrays:
            if n not in weight._arrays:
                del self._buffers["weight_" + n]
        for n, t in weight.tensors().items():
            self._buffers["weight_" + n] = t  # (the same names keep their places in the state dict)
        self.weight_format, self._nnz = type(weight), weight.nnz
        self._unfilled = False

    def _check_filled(self) -> None:
        if getattr(self, "_unfilled", False):
            raise RuntimeError("this SparseLinear's arrays are uninitialized memory (to_empty() allocated them "
                               "without values): load_state_dict its weights first")

    def _parametrized_error(self, action: str) -> str | None:
        """Why ``action`` is refused on a layer with ``torch.nn.utils.parametrize`` parametrizations, or None (one
        dict lookup: the forward's check).  Refused since session 85: a parametrized tensor moves into a child module
        (``parametrizations.bias.original``) that dtype casts cast and loads do not reach, so a ``.float()`` or a load
        of the other dtype left the bias in another dtype than the weight (every forward raising), or wrote a stray
        ``bias`` buffer beside the parametrized one."""
        if "parametrizations" not in self._modules:
            return None
        names = list(getattr(self._modules["parametrizations"], "_modules", {})) or ["bias"]
        return (f"{action}: SparseLinear does not support torch.nn.utils.parametrize (parametrized "
                f"{', '.join(map(repr, names))}: the layer keeps its bias in the weight's dtype through dtype casts "
                "and state-dict loads, which do not reach a parametrization's tensors); call "
                f"torch.nn.utils.parametrize.remove_parametrizations(layer, {names[0]!r}) first")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., in_features]`` in :attr:`weight_dtype` -> ``[..., out_features]``.  ``torch.fx.symbolic_trace``
        records the layer as one call (:func:`_sparse_linear`), so a traced model keeps it as a submodule.

        Under ``torch.autocast`` on ``x``'s device in :attr:`weight_dtype`, an ``x`` autocast would cast (floating, not
        float64) is cast to it, as ``nn.Linear``'s input is; autocast to another dtype is a TypeError (the compressed
        weight keeps its dtype)."""
        if isinstance(x, torch.fx.Proxy) and x.tracer.root is self:
            raise TypeError("torch.fx.symbolic_trace of a SparseLinear itself is not supported (FX records the layer "
                            "as one call on a submodule): trace a model holding it")
        return _sparse_linear(self, x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_filled()
        if "parametrizations" in self._modules:  # (the cheap test first: _parametrized_error says why)
            raise TypeError(self._parametrized_error("forward"))
        if not isinstance(x, torch.Tensor):  # (before x.dtype: as spmm says it)
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        cast_to = _autocast_dtype(x)
        if cast_to is not None:  # (as nn.Linear under autocast: the input cast to autocast's dtype, the output in it)
            if cast_to != self.weight_dtype:  # (an fp16 product of bf16-range inputs would overflow to inf / nan)
                raise TypeError(f"SparseLinear holds a {self.weight_dtype} weight (fixed at compression) and "
                                f"torch.autocast asks for {cast_to}: autocast to {self.weight_dtype}, or rebuild the "
                                "layer with SparseLinear.from_dense(layer.to_dense(), layer.bias, dtype=...)")
            with torch.autocast(x.device.type, enabled=False):  # (spmm's reference path calls F.linear)
                return spmm(x.to(self.weight_dtype), self.weight, self.bias)
        if x.dtype != self.weight_dtype:
            raise TypeError(f"SparseLinear holds a {self.weight_dtype} weight (fixed at compression; module "
                            f"dtype casts do not change it) but x has dtype {x.dtype}; cast x, or rebuild "
                            "the layer with SparseLinear.from_dense(layer.to_dense(), layer.bias, dtype=...)")
        return spmm(x, self.weight, self.bias)

    def to_dense(self) -> torch.Tensor:
        """The dense weight ``[out_features, in_features]`` in :attr:`weight_dtype`, on this module's device."""
        self._check_filled()
        return self.weight.to_dense()

    def to_linear(self) -> nn.Linear:
        """An ``nn.Linear`` computing the same function (dense weight and bias copied out).  Its parameters are
        normal tensors even under ``torch.inference_mode()`` (as :meth:`from_dense` and :func:`sparsify_` make them),
        so the layer can be trained afterwards."""
        with torch.inference_mode(False):
            w = self.to_dense()
            lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta",
                            dtype=self.weight_dtype)
            lin.weight = nn.Parameter(w)
            if self.bias is not None:
                lin.bias = nn.Parameter(self.bias.clone())
        return lin.train(self.training)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"format={self.weight_format.__name__}, dtype={dtype_name(self.weight_dtype)}, "
                f"density={'unknown' if self._nnz < 0 else f'{self.density:.4f}'}, nbytes={self.nbytes}, "
                f"bias={self.bias is not None}")

    # ---- module plumbing: copies, dtype casts, state dicts ---------------------------------------------
    def __copy__(self) -> "SparseLinear":
        """``copy.copy(layer)``: a new module sharing this one's tensors, with dicts of its own for its buffers,
        parameters and submodules.  The weight's format, dtype and nnz are attributes of each module, so a module
        swapping its arrays (``load_state_dict``, a device move, an engine's re-encoding) must swap them in its own
        dict: with nn.Module's shared ``_buffers`` a load into the copy left the original holding the new arrays under
        its old format / dtype (silently wrong outputs; until session 85).  A load into either now leaves the other as
        it was (a load replaces the bias too, see :meth:`_load_from_state_dict`); in-place writes into a shared tensor
        (``layer.bias.add_(1)``) show in both, as for any shallow copy."""
        new = type(self).__new__(type(self))
        new.__dict__.update(self.__dict__)
        for name in ("_buffers", "_parameters", "_modules", "_non_persistent_buffers_set"):
            if name in self.__dict__:
                new.__dict__[name] = _copy.copy(self.__dict__[name])
        return new

    def __prepare_scriptable__(self):
        """``torch.jit.script`` calls this first (on every module of a model): refused with a clear error (before
        session 85 TorchScript failed on an unknown type annotation, naming neither the layer nor an alternative)."""
        raise TypeError("torch.jit.script does not support flash_llm.SparseLinear (TorchScript cannot compile its "
                        "format objects and checks); use torch.jit.trace, torch.compile or torch.export, which do")

    def _apply(self, fn, recurse=True):
        # Device moves apply; dtype changes would corrupt the bit patterns (int32 arrays under
        # .type()) or desynchronize bias and weight, so every buffer keeps its dtype.
        if (why := self._parametrized_error("a module cast or move (nn.Module._apply)")) is not None:
            raise TypeError(why)  # (before anything moves: a parametrization's tensors would be cast)
        before = dict(self._buffers)
        probe = fn(torch.empty(0, dtype=self.weight_dtype, device=self.weight_data.device))
        empty = _allocates_without_values(fn, self.weight_data.device)
        super()._apply(fn, recurse)
        for n, old in before.items():
            new = self._buffers[n]
            if old is not None and new is not None and new.dtype != old.dtype:
                self._buffers[n] = old.to(new.device)
            if old is not None and new is not None and not new.is_meta and (old.is_meta or empty):
                self._unfilled = True  # (no values come off meta, nor out of to_empty elsewhere: allocated empty)
        if probe.dtype != self.weight_dtype:
            warnings.warn(f"a cast to {probe.dtype} leaves SparseLinear layers in {self.weight_dtype}: a "
                          "compressed weight keeps the dtype it was compressed in (rebuild it with "
                          "SparseLinear.from_dense(layer.to_dense(), layer.bias, dtype=...) to change it)",
                          UserWarning, stacklevel=2)
        return self

    def get_extra_state(self) -> dict:
        meta = self.weight.metadata()
        if self._nnz < 0:
            meta["nnz"] = None
        return meta

    def set_extra_state(self, state) -> None:
        pass  # read together with the arrays in _load_from_state_dict

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if getattr(self.weight, "coded", False):  # in-memory coding (DeltaRows.code_values): saved as plain values
            for n, t in self.weight.state("weight_")[0].items():  # a copy; the buffers stay coded
                if getattr(_SAVING, "on", False):  # (plain_state_on_cpu: the checkpoint writers)
                    t = t.to("cpu")
                destination[prefix + n] = t if keep_vars else t.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # All or nothing per layer: the arrays are validated together with the metadata, and unless they
        # load, the bias is not loaded either; nor is anything where a bias cast the load makes (the checkpoint's
        # bias, or the layer's own kept, into the loaded dtype) is not exact to rounding.  The arrays are popped
        # so nn.Module's loader (bias, extra state, hooks, unexpected keys) does not size-check them: another nnz
        # means other sizes.
        # The tensors this makes (copies, casts) are made outside inference mode: a load under
        # torch.inference_mode() leaves normal tensors, as nn.Module's in-place copies do, so the layer still
        # runs with autograd after it.
        # The layer's load_state_dict pre-hooks run first, before anything is read (torch runs them in nn.Module's
        # loader, which comes last here): a hook that upgrades a checkpoint (its _extra_state, its key names) is seen.
        where = f"loading into {prefix[:-1]!r}" if prefix else "loading into the layer"
        if (why := self._parametrized_error(where)) is not None:  # (before anything is read or changed)
            error_msgs.append(why + "; nothing was loaded into this layer")
            return
        hooks = self._load_state_dict_pre_hooks
        for hook in hooks.values():
            hook(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        keys = {n: prefix + "weight_" + n for n in self.weight_format._arrays}
        arrays = {n: state_dict.pop(k) for n, k in keys.items() if k in state_dict}
        popped = [keys[n] for n in arrays]
        assign = local_metadata.get("assign_to_params_buffers", False)
        bias_key = prefix + "bias"
        if assign and isinstance(state_dict.get(bias_key), torch.Tensor):
            # the bias stays a buffer: nn.Module's loader assigns with setattr, which would register an nn.Parameter
            # (a dense layer's bias put into the checkpoint) as a parameter, and the layer holds none
            state_dict[bias_key] = state_dict[bias_key].detach()
        w = None
        if arrays:
            with torch.inference_mode(False):
                w = self._checked_weight(arrays, state_dict.get(prefix + "_extra_state"), prefix, assign,
                                         error_msgs) if len(arrays) == len(keys) else None
        b = state_dict.get(bias_key)
        bias_fits = self.bias is None or b is None or (isinstance(b, torch.Tensor)
                                                       and tuple(b.shape) == (self.out_features,))
        lossy = None  # a bias cast this load would make that is not exact: then nothing loads
        if bias_fits and (w is not None or not arrays):  # (a misfit bias is reported by nn.Module's loader)
            lossy = self._bias_cast_error(state_dict, prefix, self.weight_dtype if w is None else w.dtype)
            if lossy is not None:
                error_msgs.append(lossy)
                w = None
        if arrays or lossy is not None:
            if w is not None and bias_fits:
                device = self.weight_data.device
                if device.type == "meta" and w.device.type != "meta" and not assign:  # (as nn.Module warns)
                    warnings.warn(f"for {', '.join(popped)}: copying from non-meta arrays in the checkpoint to a "
                                  "meta SparseLinear, which loads no values: the layer stays on the meta device "
                                  "(with the checkpoint's format and sizes).  Did you mean to pass `assign=True` to "
                                  "take the checkpoint's arrays?", UserWarning, stacklevel=2)
                with torch.inference_mode(False):
                    for n, t in w.tensors().items():
                        self._buffers["weight_" + n] = t if assign else t.to(device, copy=True)
                    if self.bias is not None:  # a new tensor, which the loader copies into, if given
                        # (the old bias cast, not an empty tensor: a state dict without the bias, strict=False,
                        # keeps it; exact to rounding, _bias_cast_error checked it.  New as the arrays are: a
                        # shallow copy of the layer sharing the old bias keeps its own bias with its own arrays)
                        old = self.bias
                        self._buffers["bias"] = old.detach().to(w.dtype, copy=True).requires_grad_(old.requires_grad)
                self.weight_format, self.weight_dtype, self._nnz = type(w), w.dtype, w.nnz
                self._unfilled = False  # (the arrays are the checkpoint's now)
            elif w is None and bias_key in state_dict:
                state_dict.pop(bias_key)
                popped.append(bias_key)
        if arrays and len(arrays) != len(keys):
            lacks = [k for n, k in keys.items() if n not in arrays]
            said = (f"{where}: {', '.join(popped)} not loaded, as the checkpoint lacks {', '.join(lacks)} (a "
                    "SparseLinear loads all of its weight arrays and its bias, or none)")
            # (nn.Module's loader passes strict=True here whatever was asked: _strict_load reads what was.  Strict:
            # an error of the load's, also where a post-hook takes the missing keys out of torch's own; session 87)
            if _strict_load():
                error_msgs.append(said)
            else:
                warnings.warn(said, UserWarning, stacklevel=2)
        self._load_state_dict_pre_hooks = OrderedDict()  # (run above: not again in nn.Module's loader)
        try:
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                          error_msgs)
        finally:
            self._load_state_dict_pre_hooks = hooks
        if self.bias is not None and self.bias.dtype != self.weight_dtype:  # assign=True takes the checkpoint's as is
            # (exact to rounding: _bias_cast_error checked it)
            with torch.inference_mode(False):
                self._buffers["bias"] = self.bias.detach().to(self.weight_dtype)
        for k in popped:  # present in the checkpoint, so not missing (errors, if any, are in error_msgs)
            if k in missing_keys:
                missing_keys.remove(k)

    def _bias_cast_error(self, state_dict, prefix: str, dtype: torch.dtype) -> str | None:
        """Why a load leaving this layer in ``dtype`` would change its bias beyond rounding (the
        :class:`LossyCastError` message of :func:`_exact_bias`, naming the key), or None.  The bias cast is the
        checkpoint's (copied into the layer's buffer, or assigned and cast), or where the state dict has none
        (``strict=False``) the layer's own, which it keeps in ``dtype``."""
        key = prefix + "bias"
        if self.bias is None:  # (a checkpoint bias is then an unexpected key: nn.Module's loader says so)
            return None
        b, name = ((state_dict[key], key) if key in state_dict
                   else (self.bias, f"{key} (this layer's own, kept: the state dict has none)"))
        if not isinstance(b, torch.Tensor) or tuple(b.shape) != (self.out_features,):
            return None  # (nn.Module's loader reports a misfit)
        try:
            _exact_bias(b, dtype, name, copy=False)
        except LossyCastError as e:
            return f"{e}; nothing was loaded into this layer"
        return None

    def _checked_weight(self, arrays, meta, prefix, assign, error_msgs) -> SparseFormat | None:
        """The checkpoint's weight, fully validated, or None with the reason in ``error_msgs``.  Arrays on the meta
        device (no values) load only where there are none to copy: into a meta layer, or with ``assign=True``
        (shapes only, :meth:`SparseFormat.from_state`), as nn.Module's loader takes a meta tensor."""
        label = prefix + "weight"
        if meta is None:  # no metadata: read the arrays as this layer's format and dtype
            meta = {**self.weight.metadata(), "nnz": None}
        if not isinstance(meta, dict):
            error_msgs.append(f"{prefix}_extra_state is a {type(meta).__name__}; expected the flash-llm format "
                              "metadata dict of a SparseLinear")
            return None
        fmt = meta.get("format")
        cls = FORMATS.get(fmt) if isinstance(fmt, str) else None
        if cls is None:
            error_msgs.append(f"{label} has unknown format {meta.get('format')!r}; known: {sorted(FORMATS)}")
            return None
        if any(not isinstance(t, torch.Tensor) for t in arrays.values()):
            error_msgs.append(f"{label}: the checkpoint's weight arrays must be tensors")
            return None
        device = self.weight_data.device
        if any(t.is_meta for t in arrays.values()) and device.type != "meta" and not assign:
            names = ", ".join(prefix + "weight_" + n for n, t in arrays.items() if t.is_meta)
            error_msgs.append(f"{names}: on the meta device in the checkpoint (no values to load into this layer on "
                              f"{device}); load a checkpoint with values")
            return None
        try:  # errors name the state-dict keys: prefix + "weight_data", ...
            w = cls.from_state({prefix + "weight_" + n: t for n, t in arrays.items()},
                               {prefix + "weight_" + METADATA_KEY: json.dumps(meta)}, prefix=prefix + "weight_",
                               source="state_dict")
        except (FormatError, TypeError) as e:  # TypeError: metadata json cannot encode
            error_msgs.append(f"{label}: {e}" if isinstance(e, TypeError) else str(e))
            return None
        if w.shape != (self.out_features, self.in_features):
            error_msgs.append(f"size mismatch for {label}: the checkpoint holds a {w.shape[0]}x{w.shape[1]} weight, "
                              f"this layer is {self.out_features}x{self.in_features}")
            return None
        return w


@torch.fx.wrap
def _sparse_linear(layer: SparseLinear, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)``: :meth:`SparseLinear.forward`'s body.  Wrapped for ``torch.fx.symbolic_trace``, which records it
    as one ``call_function`` node on the layer (a ``get_attr`` of the submodule) instead of tracing into the format
    and :func:`~flash_llm.spmm`, whose checks need real tensors: the traced model runs the layer, and a
    ``load_state_dict`` into it reaches the layer.  (Elsewhere a plain call: torch.compile / export inline it.)"""
    return layer._forward(x)


_PROBE = random.Random()  # the probe values of _allocates_without_values (not torch's or Python's global RNG)


def _allocates_without_values(fn, device: torch.device) -> bool:
    """Whether ``fn``, a function ``nn.Module._apply`` applies to every tensor, returns tensors that do not hold
    their input's values, as ``to_empty()``'s ``torch.empty_like`` does: a small int32 tensor of random values on
    ``device`` goes through it and is compared, on ``device`` (after a non-blocking move the copy is ordered), with
    what comes back.  False where that cannot tell: on or to the meta device (no values; a layer coming off meta is
    told by its buffers), a dtype change (a SparseLinear keeps its buffers' dtypes, their values with them), or
    tensors without values to read (fake tensors)."""
    if device.type == "meta":
        return False
    values = [_PROBE.randrange(1, 2**31) for _ in range(4)]
    t = torch.tensor(values, dtype=torch.int32, device=device)
    out = fn(t)
    if not isinstance(out, torch.Tensor) or out.is_meta or out.dtype != torch.int32 or out.shape != t.shape:
        return False
    try:
        return not torch.equal(out.to(device), t)
    except Exception:  # (a fake tensor, a device that cannot copy back: cannot tell, so as before)
        return False


# ---- sparsify_ ------------------------------------------------------------------------------------

@dataclass
class SparsifyConfig:
    """What :func:`sparsify_` converts, and to which format.

    Attributes:
        format: ``"bitmap"`` (default; :class:`~flash_llm.BitmapTiles`), ``"tiled-csl"`` or ``"delta-rows"``
            (:class:`~flash_llm.DeltaRows`: the fastest at batch 1 on a GPU, multi-token kernels up to 8 tokens, above
            that it expands to dense).
        min_sparsity: layers whose weight has a smaller fraction of zeros stay dense (default 0.3); the bound is
            inclusive and exact: a layer with exactly that fraction converts (the count of zeros is compared with
            ``min_sparsity`` read as the decimal it prints as, e.g. 0.2 = 1/5, in integers, not in floats).
            Why: a bitmap weight costs 1 bit per element plus 2 bytes per nonzero, so it is smaller
            than fp16 only above ~6 % zeros, and at 30 % it takes ~0.77x the dense bytes; the kernels
            only beat dense cuBLAS from about 50-70 % sparsity, and at decode batch sizes
            (``benchmarks/RESULTS.md``).  Raise it when speed, not memory, is the goal.  Independently,
            a layer whose compressed weight is not smaller than its dense weight (TiledCSL below ~50 %
            sparsity) stays dense.
        dtype: ``None`` keeps each layer's fp16/bf16 dtype and skips other dtypes (fp32...);
            ``torch.float16`` / ``torch.bfloat16`` casts every converted layer to it (then cast the rest
            of the model too, e.g. ``model.to(dtype)``: a SparseLinear takes inputs of its dtype).  A layer
            whose weight or bias that cast would change beyond rounding (a finite value overflowing to inf,
            e.g. above 65504 in fp16, or a nonzero flushed to zero) stays dense, the reason in the report.
        skip_names: layers kept dense by name: a layer is skipped when its fully qualified name equals
            an entry or ends with ``"." + entry`` (default ``("lm_head",)``).  Non-empty strings (checked
            here and again by :func:`sparsify_` and the tensor-parallel paths).
    """

    format: str = "bitmap"
    min_sparsity: float = 0.3
    dtype: torch.dtype | None = None
    skip_names: tuple[str, ...] = ("lm_head",)

    def __post_init__(self):
        _, self.skip_names = self._checked()
        self.min_sparsity = _as_printed(self.min_sparsity)  # (a numpy scalar or 0-d tensor as a plain float)

    def _checked(self) -> tuple[type[SparseFormat], tuple[str, ...]]:
        """Every field checked (ValueError / TypeError naming it): the format's class and the skip names as a
        tuple.  Run at construction and again by :func:`sparsify_` and the tensor-parallel paths (a field may be set
        afterwards)."""
        fmt_cls = _format_class(self.format, "SparsifyConfig.format")
        check_fraction(self.min_sparsity, "SparsifyConfig.min_sparsity")
        if self.dtype is not None and self.dtype not in VALUE_DTYPES:
            raise TypeError(f"SparsifyConfig.dtype must be None, torch.float16 or torch.bfloat16, got {self.dtype}")
        return fmt_cls, _checked_skip_names(self.skip_names)


def _checked_skip_names(names) -> tuple[str, ...]:
    """``SparsifyConfig.skip_names`` as a tuple of non-empty strings, else TypeError / ValueError naming it."""
    if isinstance(names, str):
        raise TypeError(f"SparsifyConfig.skip_names must be a sequence of names, got the string "
                        f"{names!r} (write ({names!r},))")
    try:
        names = tuple(names)
    except TypeError:
        raise TypeError(f"SparsifyConfig.skip_names must be a sequence of names (str), got "
                        f"{type(names).__name__}") from None
    for n in names:
        if not isinstance(n, str):
            raise TypeError(f"SparsifyConfig.skip_names must hold names (str), got {n!r} ({type(n).__name__}) "
                            f"in {names!r}")
        if not n:
            raise ValueError(f"SparsifyConfig.skip_names holds an empty name in {names!r} (it would match nothing)")
    return names


class ConvertedLayer(NamedTuple):
    """One converted layer.  Bytes count the weight and bias tensors, before and after."""

    fqn: str
    shape: tuple[int, int]
    density: float
    dense_bytes: int
    sparse_bytes: int


class SkippedLayer(NamedTuple):
    fqn: str
    reason: str


def _human(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


@dataclass
class SparsifyReport:
    """What :func:`sparsify_` did: ``converted`` and ``skipped`` layers, in model order."""

    converted: list[ConvertedLayer] = field(default_factory=list)
    skipped: list[SkippedLayer] = field(default_factory=list)

    @property
    def dense_bytes(self) -> int:
        """Bytes the converted layers' weights and biases took before."""
        return sum(c.dense_bytes for c in self.converted)

    @property
    def sparse_bytes(self) -> int:
        """Bytes they take now (compressed weight plus bias)."""
        return sum(c.sparse_bytes for c in self.converted)

    @property
    def bytes_saved(self) -> int:
        return self.dense_bytes - self.sparse_bytes

    def __str__(self) -> str:
        rows = [("layer", "shape", "density", "dense", "sparse", "saved")]
        rows += [(c.fqn, f"{c.shape[0]}x{c.shape[1]}", f"{c.density:.4f}", _human(c.dense_bytes),
                  _human(c.sparse_bytes), _human(c.dense_bytes - c.sparse_bytes)) for c in self.converted]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [f"converted {len(self.converted)} layer(s):"]
        lines += ["  " + "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
                  for r in rows]
        lines.append(f"total: {_human(self.dense_bytes)} -> {_human(self.sparse_bytes)}, "
                     f"saved {_human(self.bytes_saved)} ({self.bytes_saved} bytes)")
        if self.skipped:
            lines.append(f"kept dense {len(self.skipped)} layer(s):")
            lines += [f"  {s.fqn}: {s.reason}" for s in self.skipped]
        return "\n".join(lines)


def _storage_key(t: torch.Tensor):
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensor subclasses without a plain storage
        return None
    return (t.device, ptr) if ptr else None


_SPARSE_LAYOUTS = (torch.sparse_coo, torch.sparse_csr, torch.sparse_csc, torch.sparse_bsr, torch.sparse_bsc)

#: the hook dicts of an nn.Module a replacement would drop, by kind (register_forward_hook,
#: register_full_backward_hook, register_full_backward_pre_hook, state-dict save / load hooks)
_HOOKS = (("forward", ("_forward_hooks", "_forward_pre_hooks")),
          ("backward", ("_backward_hooks", "_backward_pre_hooks")),
          ("state-dict", ("_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                          "_load_state_dict_post_hooks")))




def _hook_counts(module: nn.Module) -> list[str]:
    """The hooks of ``module`` a replacement would drop (:data:`_HOOKS`), as ``"N kind hook(s)"``, kinds it has."""
    counts = [(kind, sum(len(getattr(module, a, None) or ()) for a in attrs)) for kind, attrs in _HOOKS]
    return [f"{n} {kind} hook(s)" for kind, n in counts if n]


def _replacement_drops(module: nn.Module) -> str | None:
    """What a layer built from ``module``'s weight and bias alone would drop, or None: a ``forward`` of its own (an
    ``nn.Linear`` / :class:`SparseLinear` subclass's, or one replaced on the instance), a parametrization, a weight
    recomputed at every forward, hooks (:func:`_hook_counts`), submodules or tensors of its own beyond the weight and
    bias (:func:`_extra_members`).  :func:`sparsify_` keeps such a layer dense;
    ``flash_llm.parallel.tensor_parallel_`` refuses it."""
    base = SparseLinear if isinstance(module, SparseLinear) else nn.Linear
    if type(module).forward is not base.forward:
        return f"{type(module).__name__} overrides {'nn.Linear' if base is nn.Linear else base.__name__}.forward"
    if "forward" in module.__dict__:  # (accelerate's add_hook_to_module, monkey patches: a replacement drops it)
        return "forward replaced on the instance (an accelerate-style hook?) that a replacement would drop"
    if parametrize.is_parametrized(module):
        return "parametrized weight or bias (torch.nn.utils.parametrize); remove the parametrization first"
    # (torch prune's weight_orig / weight_mask, weight_norm, ...: as the pruners; a SparseLinear's weight is buffers)
    how = _recomputed_weight(module) if base is nn.Linear else None
    if how is not None:
        return f"weight recomputed at every forward: {how}"
    hooks = _hook_counts(module)
    if hooks:
        return f"has {' and '.join(hooks)} that a replacement would drop"
    if (extra := _extra_members(module, base)) is not None:
        return extra
    return None


def _extra_members(module: nn.Module, base: type) -> str | None:
    """The submodules, and the parameters or buffers other than the weight (an ``nn.Linear``'s ``weight``, a
    :class:`SparseLinear`'s arrays) and ``bias``, that ``module`` holds (a replacement built from its weight and bias
    would drop them, their state-dict keys with them; before session 85 :func:`sparsify_` replaced such a layer, its
    children silently gone, or half-converted the model when a child converted too), as a reason, or None."""
    own = ({"weight_" + n for n in module.weight_format._arrays} if base is SparseLinear else {"weight"}) | {"bias"}
    tensors = [n for n in (*module._parameters, *module._buffers) if n not in own]
    parts = [f"submodule(s) {', '.join(map(repr, module._modules))}" if module._modules else "",
             f"parameter(s) / buffer(s) {', '.join(map(repr, tensors))}" if tensors else ""]
    parts = [p for p in parts if p]
    if not parts:
        return None
    return f"has {' and '.join(parts)} of its own that a replacement built from its weight and bias would drop"


_MHA_OUT_PROJ = "out_proj of nn.MultiheadAttention, which reads its .weight directly"


def _read_directly(model: nn.Module) -> dict[int, str]:
    """``id(linear) -> reason`` for the ``nn.Linear`` children whose ``.weight`` another torch module reads itself,
    past ``Linear.forward`` (a SparseLinear there breaks it): ``nn.TransformerEncoderLayer``'s ``linear1`` /
    ``linear2`` (its inference fast path, and ``nn.TransformerEncoder``'s, pass them to
    ``torch._transformer_encoder_layer_fwd``) and ``nn.MultiheadAttention``'s ``out_proj``.
    ``nn.TransformerDecoderLayer`` calls its ``linear1`` / ``linear2`` as modules (torch 2.1 to 2.13): they convert.
    Also the ``nn.Linear`` that a ``torch.compile`` wrapper (``OptimizedModule``) holds as ``_orig_mod``: the
    wrapper's compiled ``forward`` holds the layer's bound ``__call__`` (``OptimizedModule._initialize``), so a
    replacement set as ``_orig_mod`` would never run.  A compiled module holding the layer deeper down calls it by
    attribute (its replacement runs, Dynamo recompiles): that one converts."""
    found: dict[int, str] = {}
    # (no torch.compile wrapper exists unless torch._dynamo was imported: sparsify_ does not import it)
    compiled = getattr(sys.modules.get("torch._dynamo.eval_frame"), "OptimizedModule", None)
    for fqn, mod in model.named_modules():
        if compiled is not None and isinstance(mod, compiled) and isinstance(getattr(mod, "_orig_mod", None),
                                                                             nn.Linear):
            found.setdefault(id(mod._orig_mod), f"wrapped by torch.compile (OptimizedModule "
                                                f"'{fqn or '<the model>'}'), whose compiled forward calls this "
                                                "nn.Linear itself, not whatever holds its place: a replacement would "
                                                "never run; sparsify_ before torch.compile, or compile the module "
                                                "holding the layer instead")
        if isinstance(mod, nn.TransformerEncoderLayer):
            for n in ("linear1", "linear2"):
                child = getattr(mod, n, None)
                if isinstance(child, nn.Linear):
                    found.setdefault(id(child), f"{n} of nn.TransformerEncoderLayer '{fqn}', whose inference fast "
                                                "path reads its .weight directly")
        if isinstance(mod, nn.MultiheadAttention) and isinstance(getattr(mod, "out_proj", None), nn.Linear):
            found.setdefault(id(mod.out_proj), _MHA_OUT_PROJ)
    return found


def _skip_reason(module: nn.Linear, fqn: str, config: SparsifyConfig, sharing: dict, skip_names: tuple = (),
                 read_directly: dict | None = None, fmt_cls: type | None = None,
                 match_name: str | None = None) -> str | None:
    """Why ``module`` stays dense, or None to convert it (the checks that need no compression).  ``skip_names``
    match ``fqn`` and ``match_name`` (for a tensor-parallel projection's local layer ``<projection>.linear``, the
    projection's name: either name skips it)."""
    if not fqn:
        return "the model itself is an nn.Linear (sparsify_ replaces submodules; use SparseLinear.from_linear)"
    names = {fqn, fqn if match_name is None else match_name}
    if any(name == n or name.endswith("." + n) for name in names for n in skip_names):
        return f"name in skip_names {skip_names}"
    if read_directly and id(module) in read_directly:
        return read_directly[id(module)]
    if isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
        return _MHA_OUT_PROJ
    if (why := _replacement_drops(module)) is not None:
        return why
    w, b = module.weight, module.bias
    for name, t in (("weight", w), ("bias", b)):
        if t is not None and type(t) not in (torch.Tensor, nn.Parameter):
            return f"{name} is a {type(t).__name__} (a tensor subclass), not a plain tensor"
    for name, t in (("weight", w), ("bias", b)):
        if t is not None and t.layout != torch.strided:
            what = "a sparse tensor" if t.layout in _SPARSE_LAYOUTS else "not a dense (strided) tensor"
            return f"{name} is {what} (layout {t.layout}); the formats compress a dense weight"
    if w.ndim != 2:
        return f"weight is not 2-D (shape {tuple(w.shape)})"
    if b is not None and tuple(b.shape) != (w.shape[0],):
        return f"bias has shape {tuple(b.shape)}; expected ({w.shape[0]},)"
    if w.is_meta:
        return "weight is on the meta device (no values to compress); load the weights first"
    if w.numel() == 0:
        return f"empty weight {tuple(w.shape)}"
    if b is not None and b.is_meta:
        return "bias is on the meta device (no values to copy); load the weights first"
    if b is not None and b.device != w.device:
        return f"bias is on {b.device} but weight is on {w.device}; move the layer to one device first"
    if w.numel() >= 2**31:
        return f"weight {tuple(w.shape)} has 2^31 or more elements; the formats index it with int32"
    if fmt_cls is DeltaRows and (why := _delta_rows_too_wide(w.shape[1], "in_features", "format")) is not None:
        return why
    for name, t in (("weight", w), ("bias", module.bias)):
        others = [n for n in _sharing(t, sharing) if n != f"{fqn}.{name}"] if t is not None else []
        if others:
            return f"{name} shares memory with {', '.join(others)} (tied); converting would untie it"
    if config.dtype is None and w.dtype not in VALUE_DTYPES:
        if w.dtype.is_floating_point:
            return (f"dtype {w.dtype}: the formats hold fp16/bf16; pass SparsifyConfig(dtype=torch.float16 or "
                    "torch.bfloat16) to cast")
        return f"dtype {w.dtype} is not supported (fp16/bf16)"
    if not w.dtype.is_floating_point:
        return f"dtype {w.dtype} is not a floating-point dtype"
    for name, t, to in (("weight", w, config.dtype), ("bias", b, config.dtype or w.dtype)):
        if t is not None and (why := _uncheckable_cast(t, to, name)) is not None:
            return why
    return None


def _as_printed(value) -> float | None:
    """A real number (:func:`flash_llm.prune._real`) as a float, a narrower float (a numpy float16 / float32 scalar,
    a 0-d float16 / bfloat16 / float32 tensor) as the shortest decimal that reads back as it in its own precision:
    ``np.float32(0.3)`` prints as 0.3 and is 0.3 here, not 0.30000001192092896.  None for what is not a real number."""
    v = _real(value)
    dtype = value.dtype if isinstance(value, torch.Tensor) else getattr(value, "dtype", None)
    if v is None or not math.isfinite(v) or dtype is None:
        return v
    try:
        narrow = torch.tensor(v, dtype=dtype if isinstance(dtype, torch.dtype) else
                              getattr(torch, str(dtype), torch.float64))
    except (TypeError, RuntimeError):
        return v
    if not narrow.is_floating_point() or torch.finfo(narrow.dtype).bits >= 64:
        return v
    for digits in range(1, 18):  # (the shortest decimal that rounds back to the same narrow value)
        short = float(f"{v:.{digits}g}")
        if torch.tensor(short, dtype=narrow.dtype) == narrow:
            return short
    return v


def min_sparsity_shortfall(zeros: int, numel: int, min_sparsity) -> str | None:
    """Whether a weight with ``zeros`` zeros among ``numel`` elements is below ``min_sparsity``, decided exactly, as
    every path that applies ``min_sparsity`` decides it (:func:`sparsify_`, ``load_checkpoint`` / ``from_pretrained``
    / ``convert``, ``write_sparse_bitmask``, the tensor-parallel slices): None where ``zeros / numel >=
    min_sparsity`` (inclusive), compared in integers with ``min_sparsity`` read as the decimal it prints as (0.2 is
    1/5, not 0.2000000000000000111); else the reason to keep the weight dense.  The reason prints the sparsity rounded
    down to 4 decimals, so it never reads as reaching the bound (``sparsity 0.1999 < min_sparsity 0.2``)."""
    bound = _as_printed(min_sparsity)
    min_zeros = Fraction(repr(bound))
    if zeros * min_zeros.denominator >= min_zeros.numerator * numel:
        return None
    q = zeros * 10000 // numel  # in 1/10000s, rounded down (numel > 0 here: 0 < numerator * numel)
    return f"sparsity {q // 10000}.{q % 10000:04d} < min_sparsity {bound} ({zeros} of {numel} zeros)"


def _compressed(module: nn.Linear, fqn: str, config: SparsifyConfig, fmt_cls: type[SparseFormat],
                caller: str = "sparsify_") -> tuple[SparseLinear | None, str | None]:
    """``(layer, None)``: ``module`` compressed; or ``(None, reason)`` to keep it dense, for what compression finds:
    a cast to ``config.dtype`` (or the bias's to the weight's dtype) that is not exact to rounding, a sparsity below
    ``config.min_sparsity``, a shape the format cannot hold, or a compressed weight not smaller than dense.  Other
    errors propagate, noted with ``caller`` (for :func:`sparsify_`: the model is unchanged, nothing is swapped in
    before every layer is compressed; other callers say what they leave)."""
    try:
        w = _exact_dense_weight(module.weight.detach(), config.dtype, "weight")
        bias = None if module.bias is None else _exact_bias(module.bias, w.dtype, "bias")
    except LossyCastError as e:
        return None, str(e)
    numel = w.numel()
    zeros = numel - count_nonzero(w)
    sparsity = zeros / numel
    if (short := min_sparsity_shortfall(zeros, numel, config.min_sparsity)) is not None:
        return None, short
    try:
        layer = SparseLinear(fmt_cls.from_dense(w), bias)
    except ValueError as e:  # a limit of the format (its record offsets, 16-bit columns...): this layer stays dense
        return None, f"{fmt_cls.__name__} cannot hold it: {e}"
    except Exception as e:
        if hasattr(e, "add_note"):  # Python >= 3.11
            e.add_note(f"{caller}: while compressing '{fqn}' {tuple(w.shape)}"
                       + ("; the model is unchanged" if caller == "sparsify_" else ""))
        raise
    dense_w = _tensor_bytes(w)
    if layer.nbytes >= dense_w:
        return None, (f"compressed weight ({fmt_cls.__name__}, {_human(layer.nbytes)}) is not "
                      f"smaller than dense ({_human(dense_w)}) at sparsity {sparsity:.4f}")
    return layer, None


def sparsify_(model: nn.Module, config: SparsifyConfig | None = None,
              filter_fn: Callable[[nn.Module, str], bool] | None = None) -> SparsifyReport:
    """Replace, in place, the ``nn.Linear`` layers of ``model`` worth compressing by :class:`SparseLinear`.

    Every layer gets a decision first: a layer stays dense when ``filter_fn(module, fqn)`` returns False, its name
    is in ``config.skip_names`` (``lm_head`` by default), its weight or bias shares bytes with another parameter or
    buffer (tied weights; disjoint views of one storage, e.g. q / k / v sliced from a fused weight, are not tied), it
    is an ``nn.Linear`` subclass with its own ``forward`` or one another module reads or calls directly
    (``nn.MultiheadAttention.out_proj``, ``nn.TransformerEncoderLayer``'s ``linear1`` / ``linear2``, the layer a
    ``torch.compile`` wrapper holds as ``_orig_mod``: compile the model, or the module holding the layer, instead), it
    carries forward, backward or state-dict hooks, a ``forward`` replaced on the instance (accelerate's hooks),
    parametrizations or ``torch.nn.utils.prune`` masks, submodules or parameters / buffers of its own beyond
    ``weight`` and ``bias`` (a replacement would drop them), its weight is not a dense 2-D tensor (or has a dtype whose
    cast torch cannot check, e.g. ``float8_e4m3fn``), its weight or bias is on ``meta`` (or the bias on another
    device than the weight), its dtype is not fp16/bf16 and ``config.dtype`` is unset, a cast to ``config.dtype``
    (or of the bias to the weight's dtype) would overflow to inf or flush nonzeros to zero, its sparsity is below
    ``config.min_sparsity`` (inclusive: exactly that fraction converts), the format cannot hold its shape
    (DeltaRows: ``in_features >= 65536``), or its compressed weight would not be smaller.  Then all chosen layers
    are compressed (on their devices, so peak memory holds both versions of them; outside inference mode, so the
    buffers are normal tensors even under ``torch.inference_mode()``) and only then swapped in: any other exception
    raised while compressing propagates with the model unchanged.  Converted layers are inference only: when a layer
    whose weight required grad in a ``train()`` model is converted, a ``RuntimeWarning`` says how many (it is done
    all the same).

    Args:
        model: any module; converted layers must then be fed inputs of their dtype.
        config: a :class:`SparsifyConfig` (default ``SparsifyConfig()``).
        filter_fn: ``(module, fqn) -> bool``, called for every ``nn.Linear`` with its fully qualified
            name; False keeps the layer dense.  After ``flash_llm.parallel`` sharding, a projection's local layer
            (``<projection>.linear``) goes by the projection's name here, as before it; ``skip_names`` match either.

    Returns:
        A :class:`SparsifyReport` of converted layers (shape, density, bytes before and after) and
        skipped layers with reasons.  When any layer was skipped, or the model has no ``nn.Linear``, a
        ``UserWarning`` lists them.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    config = SparsifyConfig() if config is None else config
    if not isinstance(config, SparsifyConfig):
        raise TypeError(f"config must be a SparsifyConfig or None, got {type(config).__name__}")
    fmt_cls, skip_names = config._checked()  # (again: a dataclass field may be set after __post_init__)
    read_directly = _read_directly(model)

    # tied: sharing bytes of one storage (prune._sharing, as the pruners decide it): disjoint views of one storage,
    # e.g. q / k / v split from a fused weight, are not tied and convert
    sharing = _by_storage([*model.named_parameters(remove_duplicate=False),
                           *model.named_buffers(remove_duplicate=False)])

    # a tensor-parallel projection's local layer ('<projection>.linear') goes by the projection's name, as in the
    # single-process model and tensor_parallel_(sparsify=): skip_names and filter_fn see that name.  (Without
    # flash_llm.parallel imported there are none: sparsify_ does not import it, nor torch.distributed with it.)
    layers = sys.modules.get(__name__.rpartition(".")[0] + ".parallel.layers")
    projection = {f"{p}.linear": p for p, m in model.named_modules()
                  if p and layers is not None and isinstance(m, layers._ParallelLinear)}
    report = SparsifyReport()
    plan: list[tuple[str, SparseLinear]] = []
    trainable = 0  # converted layers whose weight or bias was trainable in a model in train() mode
    for fqn, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        name = projection.get(fqn, fqn)
        if filter_fn is not None and not filter_fn(module, name):
            report.skipped.append(SkippedLayer(fqn, "excluded by filter_fn"))
            continue
        reason = _skip_reason(module, fqn, config, sharing, skip_names, read_directly, fmt_cls, name)
        if reason is None:
            # (outside inference mode: under torch.inference_mode() the buffers would be inference tensors, and the
            # model could not run with autograd afterwards; the same as load_state_dict does)
            with torch.no_grad(), torch.inference_mode(False):
                layer, reason = _compressed(module, fqn, config, fmt_cls)
        if reason is not None:
            report.skipped.append(SkippedLayer(fqn, reason))
            continue
        if module.training and any(p is not None and p.requires_grad for p in (module.weight, module.bias)):
            trainable += 1
        plan.append((fqn, layer))
        report.converted.append(ConvertedLayer(
            fqn, (layer.out_features, layer.in_features), layer.density,
            _tensor_bytes(module.weight) + _tensor_bytes(module.bias), layer.nbytes + _tensor_bytes(layer.bias)))

    # every module looked up before anything is swapped (a failing lookup leaves the model unchanged); a layer with
    # children stays dense (_extra_members), so no swap detaches another planned one
    swaps = [(model.get_submodule(fqn.rpartition(".")[0]), fqn.rpartition(".")[2], model.get_submodule(fqn), layer)
             for fqn, layer in plan]
    for parent, name, old, layer in swaps:
        layer.train(old.training)  # (the flag of the layer it replaces, as in an eval() model)
        setattr(parent, name, layer)
    if plan:  # a transformers model then saves through its own save_pretrained, as one from_pretrained gives
        from .checkpoint.pretrained import _attach_hf_quantizer

        _attach_hf_quantizer(model)

    if trainable:
        warnings.warn(f"sparsify_ converted {trainable} layer(s) whose weights were trainable in a model in train() "
                      "mode: a SparseLinear is inference only, its weight and bias are now buffers that no gradient "
                      "or optimizer updates (an optimizer built before holds the old, orphaned parameters); keep "
                      "layers to train dense with filter_fn or SparsifyConfig.skip_names", RuntimeWarning,
                      stacklevel=2)
    if not report.converted and not report.skipped:
        warnings.warn("sparsify_: the model has no nn.Linear layers; nothing was converted", UserWarning,
                      stacklevel=2)
    elif report.skipped:
        limit = 20
        lines = [f"  {s.fqn}: {s.reason}" for s in report.skipped[:limit]]
        if len(report.skipped) > limit:
            lines.append(f"  ... and {len(report.skipped) - limit} more (see the returned report)")
        warnings.warn(f"sparsify_ kept {len(report.skipped)} nn.Linear layer(s) dense "
                      f"({len(report.converted)} converted):\n" + "\n".join(lines), UserWarning, stacklevel=2)
    return report

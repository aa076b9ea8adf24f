"""The compressed-tensors ``sparse-bitmask`` checkpoint layout: our own reader and writer (no dependency
on the compressed-tensors package).

Per compressed weight (e.g. ``model.layers.0.mlp.up_proj.weight``, a ``[rows, cols]`` matrix) a checkpoint holds
four tensors instead of it, named after ``P``: today's compressed-tensors (and flash-llm's writer since session 83)
strips ``.weight``, so ``P`` is the module's name (``model.layers.0.mlp.up_proj``) and its reader gives them back as
``P.weight``; older files keep the full name (``P`` = ``...up_proj.weight``).  The reader takes both:

* ``P.shape``: int64 ``[2]``, ``(rows, cols)``;
* ``P.compressed``: the nonzero values in row-major order, in the weight's dtype, ``[nnz]``;
* ``P.bitmask``: uint8 ``[rows, ceil(cols / 8)]``; bit ``j`` (LSB first) of byte ``b`` of a row is column
  ``8 b + j``; each row is padded to whole bytes with clear bits;
* ``P.row_offsets``: int64 ``[rows]``, the exclusive prefix sum of the nonzeros per row.

Older compressed-tensors (configs without ``targets``) stored every tensor of the state dict so, 1-D ones (norm
weights, biases) too: ``P.shape`` ``[n]``, ``P.bitmask`` ``[ceil(n / 8)]`` and a 0-d ``P.row_offsets`` (0), one row
without its dimension.  :func:`decompress` reads both; :func:`compress` writes the 2-D form only.

``config.json`` declares it under ``quantization_config`` (older files: ``compression_config``)::

    "quantization_config": {"quant_method": "compressed-tensors",
                            "sparsity_config": {"format": "sparse-bitmask", "targets": ["Linear"],
                                                "ignore": ["lm_head"], "global_sparsity": 0.5,
                                                "sparsity_structure": "unstructured"}}

``targets`` / ``ignore`` name modules: a module class name (``"Linear"``), an exact module name, or
``"re:<regex>"`` matched (``re.match``) against the module name.  A class name matches a module of that class or of a
subclass, as in compressed-tensors (``"Linear"`` selects Falcon's ``FalconLinear(nn.Linear)`` too: any ``nn.Module``
class of its MRO, :func:`class_names`).  Other keys are accepted and ignored;
quantization (non-empty ``config_groups``, a ``kv_cache_scheme``) and other sparsity formats are
refused with an error, since flash-llm would otherwise read the weights wrongly.

A zero is an element equal to 0 (``+0.0`` or ``-0.0``), so a round trip is exact except that ``-0.0``
comes back as ``+0.0``; NaN and Inf are kept.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..formats import FormatError
from ..formats._base import _magnitude_bits

FORMAT = "sparse-bitmask"
QUANT_METHOD = "compressed-tensors"
PARTS = ("shape", "compressed", "bitmask", "row_offsets")
_BIT_WEIGHTS = (1 << torch.arange(8, dtype=torch.int32)).to(torch.uint8)


def compress(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """The four sparse-bitmask tensors of ``weight [rows, cols]`` (any floating dtype, any device):
    ``shape`` int64 [2], ``compressed`` [nnz] in ``weight.dtype``, ``bitmask`` uint8 [rows, ceil(cols/8)],
    ``row_offsets`` int64 [rows].  Keys are the part names (``"shape"``, ...).  TypeError for anything but a 2-D
    floating-point tensor; ValueError for one without elements (rows or cols 0), which :func:`decompress` refuses
    (store it dense)."""
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2 or not weight.dtype.is_floating_point:
        desc = f"{weight.dtype} tensor of shape {tuple(weight.shape)}" if isinstance(weight, torch.Tensor) \
            else type(weight).__name__
        raise TypeError(f"weight must be a 2-D floating-point tensor, got a {desc}")
    rows, cols = weight.shape
    if rows < 1 or cols < 1:
        raise ValueError(f"weight has shape ({rows}, {cols}); the sparse-bitmask layout needs rows, cols >= 1 (store "
                         "a weight without elements dense)")
    mask = _magnitude_bits(weight) != 0  # (by bits: a subnormal is kept under torch.set_flush_denormal(True))
    nbytes = (cols + 7) // 8
    padded = torch.zeros(rows, nbytes * 8, dtype=torch.uint8, device=weight.device)
    padded[:, :cols] = mask
    bits = padded.view(rows, nbytes, 8) * _BIT_WEIGHTS.to(weight.device)
    bitmask = bits.sum(-1, dtype=torch.int32).to(torch.uint8)
    counts = mask.sum(1)
    return {"shape": torch.tensor([rows, cols], dtype=torch.int64),
            "compressed": weight[mask].contiguous(),
            "bitmask": bitmask,
            "row_offsets": (torch.cumsum(counts, 0) - counts).to(torch.int64)}


def decompress(parts: dict[str, torch.Tensor], name: str = "", where: str = "") -> torch.Tensor:
    """The dense ``[rows, cols]`` weight from its four parts (as :func:`compress` returns them), or the 1-D ``[n]``
    tensor of older files' 1-D form (``shape`` ``[n]``, ``bitmask`` ``[ceil(n / 8)]``, 0-d ``row_offsets``),
    validated: :class:`~flash_llm.FormatError` naming the tensor (``name + "." + part``) and, with ``where``, the
    file, for a wrong dtype or shape, bits set in the row padding, row offsets that are not the prefix sum of the
    bitmask, or a value count that does not match it.  Runs on the parts' device."""
    where = f"{where}: " if where else ""
    label = (lambda p: f"{where}tensor '{name}.{p}'") if name else (lambda p: f"{where}part '{p}'")
    missing = [p for p in PARTS if p not in parts]
    if missing:
        raise FormatError(f"{label(missing[0])} is missing (a sparse-bitmask weight has {', '.join(PARTS)})")
    shape, values, bitmask, offsets = (parts[p] for p in PARTS)
    if shape.dtype not in (torch.int64, torch.int32) or tuple(shape.shape) not in ((2,), (1,)):
        raise FormatError(f"{label('shape')} has dtype {shape.dtype} and shape {tuple(shape.shape)}; expected "
                          "int64 [2] (or [1]: a 1-D tensor)")
    dims = tuple(int(v) for v in shape.tolist())
    if min(dims) < 1:
        raise FormatError(f"{label('shape')} is {dims}; expected " + ("rows, cols >= 1" if len(dims) == 2 else
                                                                          "a length >= 1"))
    rows, cols = dims if len(dims) == 2 else (1, dims[0])
    nbytes = (cols + 7) // 8
    lead = (rows,) if len(dims) == 2 else ()  # (the 1-D form is one row without its dimension)
    what = f"a {rows}x{cols} weight" if len(dims) == 2 else f"a 1-D tensor of length {cols}"
    if bitmask.dtype != torch.uint8 or tuple(bitmask.shape) != (*lead, nbytes):
        raise FormatError(f"{label('bitmask')} has dtype {bitmask.dtype} and shape {tuple(bitmask.shape)}; "
                          f"expected uint8 {(*lead, nbytes)} for {what}")
    if offsets.dtype not in (torch.int64, torch.int32) or tuple(offsets.shape) != lead:
        raise FormatError(f"{label('row_offsets')} has dtype {offsets.dtype} and shape {tuple(offsets.shape)}; "
                          f"expected int64 {lead} for {what}")
    bitmask, offsets = bitmask.reshape(rows, nbytes), offsets.reshape(rows)
    if not values.dtype.is_floating_point or values.ndim != 1:
        raise FormatError(f"{label('compressed')} has dtype {values.dtype} and shape {tuple(values.shape)}; "
                          "expected a 1-D floating-point tensor of the nonzero values")
    bits = ((bitmask.unsqueeze(-1) & _BIT_WEIGHTS.to(bitmask.device)) != 0).view(rows, nbytes * 8)
    if nbytes * 8 != cols and bool(bits[:, cols:].any()):
        r = int(torch.nonzero(bits[:, cols:].any(1))[0])
        raise FormatError(f"{label('bitmask')}: row {r} has bits set in its padding past column {cols - 1}")
    mask = bits[:, :cols]
    counts = mask.sum(1)
    expected = torch.cumsum(counts, 0) - counts
    bad = torch.nonzero(offsets.to(torch.int64) != expected)
    if bad.numel():
        r = int(bad[0])
        raise FormatError(f"{label('row_offsets')}[{r}] is {int(offsets[r])}; the bitmask's rows before it hold "
                          f"{int(expected[r])} nonzeros")
    nnz = int(counts.sum())
    if values.numel() != nnz:
        raise FormatError(f"{label('compressed')} holds {values.numel()} values; the bitmask has {nnz} set bits "
                          "(truncated or inconsistent)")
    dense = torch.zeros(rows, cols, dtype=values.dtype, device=values.device)
    dense[mask] = values
    return dense.reshape(dims)


# ---- config.json -----------------------------------------------------------------------------------

def _patterns(value, key: str, source: str) -> tuple[str, ...]:
    """``sparsity_config.<key>`` as a tuple of patterns, each ``re:`` regex compiled once here so that a bad one is
    a :class:`~flash_llm.FormatError` naming ``source`` and the pattern (not an ``re.error`` at first match)."""
    if value is None:
        return ()
    if isinstance(value, str) or not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise FormatError(f"{source}: sparsity_config.{key} must be a list of strings, got {value!r}")
    for p in value:
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as e:
                raise FormatError(f"{source}: sparsity_config.{key} has an invalid regular expression {p!r}: "
                                  f"{e}") from None
    return tuple(value)


def class_names(module) -> tuple[str, ...]:
    """The class names a class pattern of ``targets`` / ``ignore`` matches for ``module``: the name of every
    ``nn.Module`` class in its MRO, as compressed-tensors' ``_match_class`` (so ``"Linear"`` selects a subclass of
    ``nn.Linear``, e.g. Falcon's ``FalconLinear``, and ``"FalconLinear"`` selects only it)."""
    return tuple(c.__name__ for c in type(module).__mro__ if issubclass(c, torch.nn.Module))


def _matches(name: str, classes: str | tuple[str, ...], patterns: tuple[str, ...]) -> bool:
    """Whether a pattern matches the module ``name`` (exactly, or ``re:`` by ``re.match``) or one of its class names
    ``classes`` (:func:`class_names`; a str is one name).  A ``re:`` pattern is matched against the name only."""
    classes = (classes,) if isinstance(classes, str) else classes
    for p in patterns:
        if p.startswith("re:"):
            if re.match(p[3:], name):
                return True
        elif p == name or p in classes:
            return True
    return False


@dataclass
class BitmaskConfig:
    """The ``sparsity_config`` of a sparse-bitmask checkpoint.  ``targets`` is ``None`` when the config
    does not say (old files, which compressed every tensor of the state dict): then every tensor stored in bitmask
    form is accepted (one that is not a linear layer's weight loads as a dense tensor), unless ``ignore`` names it."""

    targets: tuple[str, ...] | None = ("Linear",)
    ignore: tuple[str, ...] = ("lm_head",)
    extra: dict = field(default_factory=dict)

    def is_target(self, module_name: str, class_name: str | tuple[str, ...] = "Linear") -> bool:
        """Whether ``module_name`` is to be compressed: it matches a target and no ``ignore`` entry.
        ``class_name`` is the module's class names (:func:`class_names`: every class of its MRO, so that ``"Linear"``
        selects a subclass of ``nn.Linear`` as compressed-tensors does), or a str for one."""
        if _matches(module_name, class_name, self.ignore):
            return False
        return self.targets is None or _matches(module_name, class_name, self.targets)


# transform_config locations compressed-tensors fuses into the stored weights; every other one (``input``,
# ``output``, ``q_attn``, ``k_cache``...) is applied to the activations at run time
_WEIGHT_TRANSFORMS = ("weight_input", "weight_output")


def _online_transforms(transform_config) -> str:
    """What of a compressed-tensors ``transform_config`` (compressed-tensors >= 0.10: Hadamard / random rotations,
    ``{"config_groups": {name: {"type", "apply": [{"targets", "location", ...}, ...]}}}``) is not fused into the
    stored weights, in words (``"scheme 'v' location 'input'"``), or ``""`` when nothing is: no transforms, or only
    ``weight_input`` / ``weight_output`` ones (merged into the weights when they were saved).  A section this cannot
    read is described as it is (so refused)."""
    if transform_config is None or transform_config == {}:
        return ""
    groups = transform_config.get("config_groups") if isinstance(transform_config, dict) else None
    if not isinstance(groups, dict):
        return f"{transform_config!r}"[:200]
    online = []
    for name, scheme in groups.items():
        applies = scheme.get("apply") if isinstance(scheme, dict) else None
        if not isinstance(applies, list):
            online.append(f"scheme {name!r} {scheme!r}"[:200])
            continue
        for args in applies:
            location = args.get("location") if isinstance(args, dict) else None
            if location not in _WEIGHT_TRANSFORMS:
                online.append(f"scheme {name!r} location {location!r}")
    return ", ".join(online)


def parse_config(config: dict, source: str | Path = "config.json") -> BitmaskConfig | None:
    """The sparse-bitmask declaration of a model's ``config.json`` (a dict), or ``None`` when the checkpoint
    is not compressed-tensors (or declares no sparsity, i.e. is dense).

    Raises :class:`~flash_llm.FormatError` naming ``source`` for compressed-tensors checkpoints flash-llm cannot
    read: quantized ones (``config_groups``, ``kv_cache_scheme``), ones whose ``transform_config`` rotates the
    activations at run time (transforms other than ``weight_input`` / ``weight_output``, which the stored weights hold
    already), sparsity formats other than ``sparse-bitmask`` / ``dense``, and sections of the wrong type
    (``config_groups`` or ``sparsity_config`` not an object, ``targets`` / ``ignore`` not a list of strings).
    """
    source = str(source)
    for key in ("quantization_config", "compression_config"):
        section = config.get(key)
        if isinstance(section, dict) and (section.get("quant_method") == QUANT_METHOD or
                                          (key == "compression_config" and "sparsity_config" in section)):
            break
    else:
        return None
    groups = section.get("config_groups")
    if groups and not isinstance(groups, dict):
        raise FormatError(f"{source}: {key}.config_groups must be an object (quantization schemes by group name), "
                          f"got {type(groups).__name__}")
    if groups:
        raise FormatError(f"{source}: {key} declares quantization (config_groups {sorted(groups)}); flash-llm reads "
                          "sparse fp16/bf16/fp32 weights only, not quantized compressed-tensors checkpoints")
    if section.get("kv_cache_scheme") is not None:
        raise FormatError(f"{source}: {key} declares a kv_cache_scheme (quantized KV cache), which flash-llm "
                          "does not support")
    online = _online_transforms(section.get("transform_config"))
    if online:
        raise FormatError(f"{source}: {key}.transform_config applies {online} (rotations computed at run time "
                          "on the activations, such as QuIP / SpinQuant's online Hadamard transforms), which "
                          "flash-llm does not support; the stored weights are the rotated ones")
    sparsity = section.get("sparsity_config")
    if sparsity is None or sparsity == {}:
        return None
    if not isinstance(sparsity, dict):
        raise FormatError(f"{source}: {key}.sparsity_config must be an object, got {type(sparsity).__name__}")
    fmt = sparsity.get("format")
    if fmt == "dense":
        return None
    if fmt != FORMAT:
        raise FormatError(f"{source}: {key}.sparsity_config has format {fmt!r}; flash-llm reads {FORMAT!r} "
                          "(and dense checkpoints)")
    targets = sparsity.get("targets")
    extra = {k: v for k, v in sparsity.items() if k not in ("format", "targets", "ignore")}
    return BitmaskConfig(None if targets is None else _patterns(targets, "targets", source),
                         _patterns(sparsity.get("ignore"), "ignore", source), extra)


def quantization_config(targets=("Linear",), ignore=("lm_head",), global_sparsity: float | None = None) -> dict:
    """The ``quantization_config`` section of a sparse-bitmask checkpoint's ``config.json``."""
    sparsity = {"format": FORMAT, "targets": list(targets), "ignore": list(ignore),
                "sparsity_structure": "unstructured"}
    if global_sparsity is not None:
        sparsity["global_sparsity"] = global_sparsity
    return {"quant_method": QUANT_METHOD, "sparsity_config": sparsity}


def split_key(key: str) -> tuple[str, str] | None:
    """``"P.bitmask"`` -> ``("P", "bitmask")`` for the four part names, else ``None``."""
    head, _, part = key.rpartition(".")
    return (head, part) if head and part in PARTS else None

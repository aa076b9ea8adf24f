"""Whole-model checkpoints: flash-llm's own format, and loading any of dense / sparse-bitmask / flash-llm
Hugging Face checkpoint directories into a model (compressing the pruned layers on the way).

flash-llm checkpoint format, version 1 (a Hugging Face directory; ``docs/checkpoints.md``):

* ``config.json``: the model's Hugging Face config plus::

      "quantization_config": {"quant_method": "flash_llm", "format_version": 1, "flash_llm_version": "0.1.0",
                              "sparse_modules": {"model.layers.0.mlp.up_proj": {"format": "flash_llm.bitmap_tiles",
                                                  "version": 1, "dtype": "float16", "shape": [11008, 4096]}, ...}}

* ``model.safetensors`` or shards plus ``model.safetensors.index.json``: the model's state dict.  A
  sparse layer ``L`` (a :class:`~flash_llm.SparseLinear`) is stored as its buffers ``L.weight_data``,
  ``L.weight_offsets`` (int32) and ``L.bias``; its format metadata (the JSON of
  ``flash_llm.save``: format, version, dtype, shape, nnz) is in the header of the shard holding it,
  under ``L.weight_flash_llm`` (the state-dict prefix ``L.weight_`` + ``flash_llm``).  All other tensors
  are stored as they are; tied tensors once, under their first name (tensors that only share memory, under each).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import warnings
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import __version__
from ..formats import FORMATS, FormatError, SparseFormat
from ..formats._base import (METADATA_KEY, VALUE_DTYPES, _DTYPES_BY_NAME, _is_int, count_nonzero, dtype_name,
                             parse_metadata)
from ..nn import (FORMAT_NAMES, ConvertedLayer, LossyCastError, SkippedLayer, SparseLinear, SparsifyConfig,
                  SparsifyReport, _format_class, cast_loss, check_fraction, _human, _tensor_bytes,
                  min_sparsity_shortfall)
from . import _files, _model
from . import sparse_bitmask as sb

QUANT_METHOD = "flash_llm"
FORMAT_VERSION = 1
_ARRAYS = ("data", "offsets")  # SparseLinear buffers weight_data, weight_offsets
_HEADER_SUFFIX = f".weight_{METADATA_KEY}"  # a sparse layer's format metadata in its shard's header


def _progress(**kw):
    """A tqdm bar on stderr that appears only for work longer than a second."""
    return tqdm(file=sys.stderr, delay=1.0, leave=False, dynamic_ncols=True, **kw)


# ---- what a checkpoint directory holds ----------------------------------------------------------------

@dataclass
class CheckpointKind:
    """``kind`` is ``"flash-llm"``, ``"sparse-bitmask"`` or ``"dense"``; ``sparse_modules`` (flash-llm) maps
    layer names to their format metadata; ``bitmask`` (sparse-bitmask) is the parsed sparsity_config."""

    kind: str
    sparse_modules: dict[str, dict] | None = None
    bitmask: sb.BitmaskConfig | None = None


def checkpoint_kind(config: dict, source="config.json") -> CheckpointKind:
    """Which of the three checkpoint kinds ``config`` (a ``config.json`` dict) declares; FormatError for
    an unknown flash-llm format version, a malformed section, or quantization methods flash-llm cannot
    read."""
    qc = config.get("quantization_config")
    if isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD:
        return CheckpointKind("flash-llm", sparse_modules=_parse_section(qc, str(source)))
    bitmask = sb.parse_config(config, source)
    if bitmask is not None:
        return CheckpointKind("sparse-bitmask", bitmask=bitmask)
    if qc is not None and not (isinstance(qc, dict) and qc.get("quant_method") == sb.QUANT_METHOD):
        method = qc.get("quant_method") if isinstance(qc, dict) else qc
        raise FormatError(f"{source}: quantization_config has quant_method {method!r}; flash-llm reads dense, "
                          f"compressed-tensors sparse-bitmask and flash-llm ({QUANT_METHOD!r}) checkpoints")
    return CheckpointKind("dense")


def _parse_section(qc: dict, source: str) -> dict[str, dict]:
    version = qc.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version != FORMAT_VERSION:
        raise FormatError(f"{source}: quantization_config.format_version is {version!r}; this flash-llm "
                          f"({__version__}) reads flash-llm checkpoint format version {FORMAT_VERSION}")
    modules = qc.get("sparse_modules")
    if not isinstance(modules, dict):
        raise FormatError(f"{source}: quantization_config.sparse_modules must be an object of layer name -> "
                          f"format metadata, got {type(modules).__name__}")
    for name, meta in modules.items():
        ok = (isinstance(meta, dict) and isinstance(meta.get("format"), str) and meta["format"] in FORMATS
              and isinstance(meta.get("dtype"), str) and meta["dtype"] in _DTYPES_BY_NAME
              and isinstance(meta.get("shape"), list) and len(meta["shape"]) == 2
              and all(isinstance(v, int) and v >= 1 for v in meta["shape"]))
        if not ok:
            raise FormatError(f"{source}: quantization_config.sparse_modules['{name}'] is {meta!r}; expected "
                              f"{{'format': one of {sorted(FORMATS)}, 'version': int, 'dtype': 'float16' or "
                              "'bfloat16', 'shape': [M, K]}")
        fmt = FORMATS[meta["format"]]
        if not fmt.reads_version(meta.get("version")):
            raise FormatError(f"{source}: layer '{name}' has {meta['format']} format version "
                              f"{meta.get('version')!r}; this flash-llm reads {fmt.readable_versions()}")
    return modules


def read_config(path) -> dict:
    """The ``config.json`` of checkpoint directory ``path`` as a dict (FormatError if absent or invalid)."""
    path = Path(os.fspath(path))
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint directory")
    if not path.is_dir():
        raise FormatError(f"{path}: expected a checkpoint directory (config.json and *.safetensors), got a file")
    return _files.read_json(path / _files.CONFIG_NAME, "config.json")


GENERATION_CONFIG_NAME = "generation_config.json"


def generation_eos(path) -> int | list[int] | None:
    """The ``eos_token_id`` of checkpoint directory ``path``'s ``generation_config.json``: a token id or a list of
    them, as stored; ``None`` where the file is absent or sets none (no key, ``null`` or ``[]``).  FormatError if
    the file is not a JSON object or the value is neither an int nor a list of ints."""
    file = Path(os.fspath(path)) / GENERATION_CONFIG_NAME
    if not file.is_file():
        return None
    eos = _files.read_json(file, GENERATION_CONFIG_NAME).get("eos_token_id")
    if eos is None or eos == []:
        return None
    if not (_is_int(eos) or (isinstance(eos, list) and all(_is_int(v) for v in eos))):
        raise FormatError(f"{file}: eos_token_id must be a token id or a list of token ids, got {eos!r}")
    return eos


def use_generation_eos(config, path) -> None:
    """Make the ``eos_token_id`` of ``generation_config.json`` in checkpoint directory ``path`` (where it sets one)
    the :class:`~flash_llm.models.ModelConfig`'s, in place, so the engine stops where transformers' ``generate``
    does: transformers takes the stop tokens from that file, not from ``config.json`` (Llama-3-8B-Instruct:
    ``config.json`` 128001, ``generation_config.json`` ``[128001, 128009]``, 128009 being ``<|eot_id|>``).
    Anything but a ModelConfig (a transformers model's config) is left alone."""
    from ..models import ModelConfig

    if isinstance(config, ModelConfig):
        eos = generation_eos(path)
        if eos is not None:
            config.eos_token_id = eos


def config_dtype(config: dict) -> torch.dtype | None:
    """The dtype ``config.json`` declares (``dtype``, or the older ``torch_dtype``), or None."""
    name = config.get("dtype", config.get("torch_dtype"))
    return getattr(torch, name) if isinstance(name, str) and isinstance(getattr(torch, name, None),
                                                                       torch.dtype) else None


# ---- loading into a module ----------------------------------------------------------------------------

@dataclass
class _Slot:
    """A linear layer of the target module: where a weight may land compressed."""

    fqn: str
    out_features: int
    in_features: int
    bias: bool
    dtype: torch.dtype
    keep_dense: str | None  # why it never gets compressed, or None


def _class_names(m: nn.Module) -> tuple[str, ...]:
    """The class names a sparse-bitmask class pattern matches for module ``m``: every class of its MRO
    (:func:`sb.class_names`, as compressed-tensors: ``"Linear"`` selects Falcon's ``FalconLinear``), and ``"Linear"``
    for a :class:`~flash_llm.SparseLinear` (it stands for the ``nn.Linear`` it compressed)."""
    names = sb.class_names(m)
    return ("Linear", *names) if isinstance(m, SparseLinear) else names


def _slots(module: nn.Module, aliases: dict, config: SparsifyConfig | None) -> dict[str, _Slot]:
    slots = {}
    skip_names = config.skip_names if config is not None else ()
    for fqn, m in module.named_modules():
        if isinstance(m, SparseLinear):
            slot = _Slot(fqn, m.out_features, m.in_features, m.bias is not None, m.weight_dtype, None)
        elif isinstance(m, nn.Linear):
            slot = _Slot(fqn, m.out_features, m.in_features, m.bias is not None, m.weight.dtype, None)
            if type(m).forward is not nn.Linear.forward or isinstance(
                    m, nn.modules.linear.NonDynamicallyQuantizableLinear):  # read directly by MultiheadAttention
                slot.keep_dense = f"{type(m).__name__} is not a plain nn.Linear"
            elif len(aliases.get(f"{fqn}.weight", ())) > 1:
                others = [n for n in aliases[f"{fqn}.weight"] if n != f"{fqn}.weight"]
                slot.keep_dense = f"weight is tied to {', '.join(others)}"
        else:
            continue
        if not fqn:
            raise ValueError("the module itself is a linear layer; load_checkpoint fills submodules")
        if slot.keep_dense is None and any(fqn == n or fqn.endswith("." + n) for n in skip_names):
            slot.keep_dense = f"name in skip_names {tuple(skip_names)}"
        if slot.keep_dense is None and slot.dtype not in VALUE_DTYPES:
            slot.keep_dense = f"dtype {slot.dtype}: the sparse formats hold fp16/bf16"
        if slot.keep_dense is None and slot.out_features * slot.in_features == 0:  # (as sparsify_ says it)
            slot.keep_dense = f"empty weight {(slot.out_features, slot.in_features)}"
        if slot.keep_dense is None and slot.out_features * slot.in_features >= 2**31:
            slot.keep_dense = "2^31 or more elements (the formats index with int32)"
        slots[fqn] = slot
    return slots


@dataclass
class Entry:
    """One weight as :func:`iter_checkpoint` reads it.

    ``kind`` ``"dense"``: ``value`` is the tensor ``key``; ``"flash-llm"``: ``value`` is the validated compressed
    weight of layer ``key[:-7]`` (``key`` ends with ``.weight``); ``"sparse-bitmask"``: ``value`` holds the four
    parts (by part name, plus ``"_name"``, the stored prefix, ``key``) of the tensor ``key``: a linear layer's weight,
    or any tensor in an older compressed-tensors file (one without ``targets``, which compressed every tensor).
    ``path`` is the shard (for a weight spread over shards, the one holding its first part)."""

    key: str
    kind: str
    value: object
    path: Path


def iter_checkpoint(files: _files.CheckpointFiles, kind: CheckpointKind, device="cpu", progress: bool = True):
    """Read a checkpoint's shards one at a time and yield an :class:`Entry` per weight or other tensor, in
    file order (tensors on ``device``; on CPU memory-mapped).  A flash-llm sparse layer is validated in full
    against its header metadata and ``config.json``; the parts of a sparse-bitmask weight are gathered
    (decompress them with :func:`sparse_bitmask.decompress`).  Raises FormatError naming file and tensor, also
    for a weight stored twice (dense and compressed, in one shard or two) and, before anything is read, for a layer
    that ``config.json`` lists as sparse but whose arrays no shard holds (stored dense: transformers' loader refuses
    it in the same words)."""
    if kind.kind == "flash-llm":
        _check_listed_layers(files, kind.sparse_modules or {})
    seen: dict[str, tuple[str, Path]] = {}  # key -> how and where it was stored (no tensors kept)
    for e in _read_entries(files, kind, device, progress):
        form = _stored_form(e)
        if e.key in seen:
            other, where = seen[e.key]
            place = "the same file" if where == e.path else where.name
            raise FormatError(f"{e.path}: tensor '{e.key}' is stored twice: {form} here, and {other} in {place}")
        seen[e.key] = (form, e.path)
        yield e


def _check_listed_layers(files: _files.CheckpointFiles, sparse_modules: dict[str, dict]) -> None:
    """FormatError for a layer of a flash-llm checkpoint's ``sparse_modules`` none of whose arrays a shard holds (a
    config.json from another save beside dense shards); one holding some of them is told as its missing array."""
    for fqn in sparse_modules:
        arrays = [f"{fqn}.weight_{n}" for n in _ARRAYS]
        if any(a in files.tensors for a in arrays):
            continue
        dense = (f"; '{fqn}.weight' is stored dense: config.json's quantization_config.sparse_modules does not match "
                 "the weights") if f"{fqn}.weight" in files.tensors else ""
        raise FormatError(f"{files.path}: tensor '{arrays[0]}' of sparse layer '{fqn}' is missing (no shard holds "
                          f"it{dense})")


def _stored_form(e: Entry) -> str:
    """How entry ``e`` is stored, for the error of a weight stored twice."""
    if e.kind == "flash-llm":
        owner = e.key[: -len(".weight")]
        return f"compressed ({', '.join(repr(f'{owner}.weight_{n}') for n in _ARRAYS)})"
    if e.kind == "sparse-bitmask":
        name = e.value["_name"]
        return f"in sparse-bitmask form ({', '.join(repr(f'{name}.{p}') for p in sb.PARTS)})"
    return "dense"


def _bitmask_key(gname: str, bitmask: sb.BitmaskConfig | None) -> str:
    """The state-dict name of a tensor stored in sparse-bitmask form under the prefix ``gname``.  Today's
    compressed-tensors strips ``.weight`` (``model.layers.0.mlp.up_proj.compressed``): the prefix is a module
    name, and the weight's key is ``gname + ".weight"``.  Older files (no ``targets`` in their config) compressed
    every tensor under its full name (``...up_proj.weight.compressed``, ``...up_proj.bias.compressed``,
    ``model.norm.weight.compressed``): the prefix is the key."""
    if gname.endswith(".weight") or (bitmask is not None and bitmask.targets is None):
        return gname
    return gname + ".weight"


def _read_entries(files: _files.CheckpointFiles, kind: CheckpointKind, device, progress: bool):
    """:func:`iter_checkpoint`'s reading, without its checks across entries."""
    device = torch.device(device)
    header: dict[str, str] = {}
    pending: dict[str, dict[str, tuple[torch.Tensor, Path]]] = {}
    sparse_modules = kind.sparse_modules or {}
    with _progress(total=len(files.tensors), desc="reading", unit="tensor", disable=not progress) as bar:
        for path, keys in files.shard_keys().items():
            shard = _files.Shard(path)
            for k, v in shard.metadata.items():
                if k.endswith(_HEADER_SUFFIX):  # flash-llm's own (other tools' entries, e.g. "format", may differ)
                    if header.get(k, v) != v:
                        raise FormatError(f"{path}: header metadata '{k}' differs from another shard's")
                    header[k] = v
            for key in keys:
                bar.update(1)
                group = None
                if kind.kind == "flash-llm":
                    owner, _, attr = key.rpartition(".")
                    if attr.startswith("weight_") and attr[len("weight_"):] in _ARRAYS:
                        if owner not in sparse_modules:
                            raise FormatError(f"{path}: tensor '{key}' belongs to a sparse layer '{owner}' that "
                                              "config.json's quantization_config.sparse_modules does not list "
                                              "(wrong config.json)")
                        group = (owner, attr[len("weight_"):])
                elif kind.kind == "sparse-bitmask":
                    group = sb.split_key(key)
                if group is None:
                    yield Entry(key, "dense", shard.get(key).to(device), path)
                    continue
                gname, part = group
                parts = pending.setdefault(gname, {})
                parts[part] = (shard.get(key).to(device), path)
                if kind.kind == "flash-llm" and len(parts) == len(_ARRAYS):
                    yield _flash_entry(gname, pending.pop(gname), sparse_modules[gname], header)
                elif kind.kind == "sparse-bitmask" and len(parts) == len(sb.PARTS):
                    parts = pending.pop(gname)
                    first = min((f for _, f in parts.values()), key=lambda f: f.name)
                    value = {p: t for p, (t, _) in parts.items()}
                    value["_name"] = gname
                    yield Entry(_bitmask_key(gname, kind.bitmask), kind.kind, value, first)
            del shard
    for gname, parts in pending.items():
        if kind.kind == "flash-llm":
            names, have = [f"{gname}.weight_{n}" for n in _ARRAYS], {f"{gname}.weight_{p}": f
                                                                      for p, (_, f) in parts.items()}
        else:
            names, have = [f"{gname}.{p}" for p in sb.PARTS], {f"{gname}.{p}": f for p, (_, f) in parts.items()}
        missing = [n for n in names if n not in have]
        name, f = next(iter(have.items()))
        raise FormatError(f"{files.path}: tensor '{missing[0]}' is missing (no shard holds it; '{name}' is in "
                          f"{f.name})")


def _flash_entry(fqn: str, parts: dict[str, tuple[torch.Tensor, Path]], declared: dict,
                 header: dict[str, str]) -> Entry:
    path = parts["data"][1]
    meta_key = f"{fqn}.weight_{METADATA_KEY}"
    if meta_key not in header:
        raise FormatError(f"{path}: no format metadata '{meta_key}' in the header of the shard holding "
                          f"'{fqn}.weight_data'")
    prefix = f"{fqn}.weight_"
    stored = parse_metadata(header, prefix, f"{path}: ")
    for field in ("format", "version", "dtype", "shape"):
        if stored.get(field) != declared.get(field):
            raise FormatError(f"{path}: '{fqn}' has {field} {stored.get(field)!r} in the shard header but "
                              f"{declared.get(field)!r} in config.json's sparse_modules")
    arrays = {prefix + n: t for n, (t, _) in parts.items()}
    w = FORMATS[stored["format"]].from_state(arrays, {meta_key: header[meta_key]}, prefix=prefix, source=str(path))
    if w.device.type == "cpu":  # validation's temporaries
        _trim_host_heap()
    return Entry(f"{fqn}.weight", "flash-llm", w, path)


def check_dtype(path, key: str, got: torch.dtype, want: torch.dtype) -> None:
    """FormatError naming file ``path`` and tensor ``key`` where the stored dtype ``got`` is not of the kind (floating
    point or not) of the model's tensor, dtype ``want``: a cast would turn integers into weights (or the reverse)
    silently.  (Floating dtypes are cast to the model's.)  The check of every loader of flash-llm."""
    if want.is_floating_point != got.is_floating_point:
        raise FormatError(f"{path}: tensor '{key}' has dtype {got}; the model expects {want}")


_LOAD_HINTS = ("load it in bfloat16, which has float32's range (on the command line: --dtype bfloat16)",
               "load it in a dtype that holds these values")


def cast_checked(path, key: str, t: torch.Tensor, want: torch.dtype, *, target: str | None = None,
                 hints: tuple[str, str] = _LOAD_HINTS) -> torch.Tensor:
    """``t`` (tensor ``key`` of file ``path``) cast to the model's dtype ``want``, refusing (:class:`~flash_llm.nn.
    LossyCastError`, naming both) a cast that turns finite values into inf (:func:`~flash_llm.nn.cast_loss`): fp16
    holds at most 65504, and a model run on inf weights computes NaN silently.  (Nonzeros that flush to zero are
    rounding here, as in transformers' loader: a float32 checkpoint has a few below fp16's smallest subnormal, which
    casting it to fp16 loses.)  ``target`` (the message's words for ``want``) and ``hints`` (the remedy for fp16,
    and for any other dtype) are a loader's unless given (a writer's: :func:`flash_llm.bundled.save_model_dir`)."""
    if t.dtype == want:
        return t
    cast = t.to(want)
    loss = cast_loss(t, cast, underflow=False)
    if loss is not None:
        a, b = t.detach().reshape(-1), cast.detach().reshape(-1)
        largest = float(a[torch.isfinite(a) & ~torch.isfinite(b)].abs().max())
        hint = hints[0] if want == torch.float16 else hints[1]
        raise LossyCastError(f"{path}: tensor '{key}' cannot be cast to {target or want}: {loss} (largest magnitude "
                             f"{largest:g}); {hint}")
    return cast


def stored_twice(path, key: str, name: str, other: str | None = None,
                 under: str = "the name without the leading 'model.'") -> FormatError:
    """The error of tensor ``name`` of the model stored a second time in the checkpoint, at ``key`` in file ``path``:
    ``other`` (the name it was read under before) where ``key`` is the model's own name, else ``key`` is another
    name for it, ``under`` saying which (older OPT files drop the leading ``model.``)."""
    if other is not None:
        return FormatError(f"{path}: tensor '{key}' is stored a second time (also as '{other}')")
    return FormatError(f"{path}: tensor '{key}' is '{name}' stored a second time (under {under})")


def ignored_unexpected_regex(module: nn.Module) -> re.Pattern | None:
    """The tensors that ``module``'s class (a transformers model: its ``_keys_to_ignore_on_load_unexpected``, and
    those of the models inside it, which newer transformers' ``post_init`` gathers) declares no weights of it although
    published checkpoints store them (GPT-J's and GPT-2's causal-mask buffers ``attn.bias`` / ``attn.masked_bias``,
    Qwen3.5's multi-token prediction ``mtp.*``), as one regular expression that transformers' loader searches
    (``re.search``) the name it gives a checkpoint tensor with, dropping a match without a word.  None where the module
    declares none (flash_llm.models: OPT and Llama, whose transformers classes declare none either)."""
    found = set()
    for m in _model.unwrap(module).modules():  # (each model's own: a transformers whose post_init gathers none)
        for patterns in (getattr(m, "_keys_to_ignore_on_load_unexpected", None),
                         getattr(type(m), "_keys_to_ignore_on_load_unexpected", None)):
            if patterns:
                found.update((patterns,) if isinstance(patterns, str) else patterns)
    return re.compile("|".join(f"({p})" for p in sorted(found))) if found else None


class _Loader:
    """One pass over a checkpoint's shards, filling ``values`` (state-dict name -> tensor on ``device``, or a
    compressed weight for a linear layer's ``.weight``)."""

    def __init__(self, module, files: _files.CheckpointFiles, kind: CheckpointKind, device, mode, progress):
        self.module, self.files, self.kind, self.device, self.progress = module, files, kind, device, progress
        self.mode = mode  # "as-saved", "dense" or a SparsifyConfig
        self.config_path = files.path / _files.CONFIG_NAME
        self.aliases = _model.alias_groups(module)
        self.slots = _slots(module, self.aliases, mode if isinstance(mode, SparsifyConfig) else None)
        self.expected: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for name, t in module.state_dict(keep_vars=True).items():
            owner, _, attr = name.rpartition(".")
            if owner in self.slots and isinstance(module.get_submodule(owner), SparseLinear):
                continue  # a SparseLinear slot expects its logical weight (below) and bias
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"state-dict entry '{name}' of the module is a {type(t).__name__}; "
                                "load_checkpoint fills tensors only")
            self.expected[name] = (tuple(t.shape), t.dtype)
        for fqn, s in self.slots.items():
            self.expected[f"{fqn}.weight"] = ((s.out_features, s.in_features), s.dtype)
            if s.bias:
                self.expected[f"{fqn}.bias"] = ((s.out_features,), s.dtype)
        self.non_persistent = _model.non_persistent_buffers(module)
        # other names the checkpoint may store a tensor under (files saved from the base model: older OPT)
        self.renamed = {alt: key for key in self.expected for alt in _files.stored_names(key)[1:]
                        if alt not in self.expected}
        self.stored_as: dict[str, str] = {}  # model name -> the checkpoint's name, where they differ
        self._hf_rename = None  # transformers' renames of checkpoint names for a transformers model (False: none)
        self.ignore_unexpected = ignored_unexpected_regex(module)
        self.values: dict[str, torch.Tensor | SparseFormat] = {}
        self.report = SparsifyReport()

    # -- the pass --
    def run(self) -> None:
        for e in iter_checkpoint(self.files, self.kind, self.device, self.progress):
            if e.key not in self.expected and (e.key in self.renamed or self._transformers_name(e.key)[1]):
                key = self.renamed.get(e.key) or self._transformers_name(e.key)[0]
                if key in self.values or key in self.stored_as:
                    raise stored_twice(e.path, e.key, key, **({} if e.key in self.renamed
                                                             else {"under": "the name transformers renames"}))
                self.stored_as[key] = e.key
                e.key = key
            elif e.key in self.stored_as:
                raise stored_twice(e.path, e.key, e.key, self.stored_as[e.key])
            if e.kind == "dense":
                self._place(e.key, e.value, e.path)
            elif e.kind == "flash-llm":
                self._place_flash(e.key, e.value, e.path)
            else:
                self._place_bitmask(e.key, e.value, e.path)

    def _transformers_name(self, key: str) -> tuple[str, bool]:
        """For a transformers model, the name transformers' loader gives checkpoint tensor ``key`` (its conversion
        mapping: GPT-NeoX's ``embed_out.weight`` is ``lm_head.weight``), and whether it is a plain rename to a
        tensor of the model (which this loader follows too; a converter merging tensors it does not)."""
        if self._hf_rename is None:
            from .hf_quantizer import load_renamer

            self._hf_rename = load_renamer(self.module) or False
        if self._hf_rename is False:
            return key, False
        name, converted = self._hf_rename(key)
        return name, not converted and name != key and name in self.expected

    # -- placing values --
    def _check_known(self, key: str, path: Path) -> bool:
        if key in self.expected:
            return True
        if key in self.non_persistent or key.endswith(_files.IGNORED_SUFFIXES):
            return False  # an old checkpoint storing a buffer the model computes itself (rotary inv_freq)
        cls = type(self.module).__name__
        name, _ = self._transformers_name(key)
        if self.ignore_unexpected is not None and self.ignore_unexpected.search(name):
            return False  # a tensor the model class declares no weight of it (GPT-J's attn.bias, Qwen3.5's mtp.*)
        why = "(wrong config.json, or a checkpoint of another model)"
        if name != key:
            why = (f"(a checkpoint name transformers converts, to '{name}', when it loads {cls}: flash-llm follows "
                   "its plain renames but not conversions that merge or split tensors; load this checkpoint with "
                   "transformers' from_pretrained, then flash_llm.sparsify_ compresses its linear layers)")
        raise FormatError(f"{path}: tensor '{key}' has no place in the {cls} built from {self.config_path} {why}")

    def _check_shape(self, key: str, shape, path: Path) -> None:
        want = self.expected[key][0]
        if tuple(shape) != want:
            raise FormatError(f"{path}: tensor '{key}' has shape {tuple(shape)}; the model built from "
                              f"{self.config_path.name} expects {want} (shape mismatch: does config.json match "
                              "the weights?)")

    def _place(self, key: str, t: torch.Tensor, path: Path) -> None:
        if not self._check_known(key, path):
            return
        self._check_shape(key, t.shape, path)
        want = self.expected[key][1]
        check_dtype(path, key, t.dtype, want)
        t = cast_checked(path, key, t.to(self.device), want)
        owner = key[: -len(".weight")] if key.endswith(".weight") else None
        slot = self.slots.get(owner) if owner is not None else None
        self.values[key] = self._decide(slot, t, path) if slot is not None else t

    def _place_flash(self, key: str, w: SparseFormat, path: Path) -> None:
        if not self._check_known(key, path):
            return
        owner = key[: -len(".weight")]  # (a flash-llm entry is always "<layer>.weight")
        slot = self.slots.get(owner)
        if slot is None:  # (a known tensor, e.g. the embedding, but no linear layer: as _place_bitmask refuses)
            raise FormatError(f"{path}: '{key}' is stored compressed (sparse_modules) but '{owner}' is not a linear "
                              "layer of the model")
        self._check_shape(key, w.shape, path)
        self.values[key] = self._decide(slot, w, path)

    def _place_bitmask(self, key: str, parts: dict[str, torch.Tensor], path: Path) -> None:
        """A tensor stored in sparse-bitmask form, whose module config.json's sparsity_config must select: a linear
        layer's weight is decided as a dense one is (:meth:`_decide`); any other tensor (older compressed-tensors,
        without ``targets``, compressed every one: embeddings, norm weights, biases) is decompressed and placed as
        it would be stored dense (:meth:`_place`)."""
        if key not in self.expected and f"{key}.weight" in self.expected:  # (a module prefix in a file without targets)
            key = f"{key}.weight"
        owner, _, attr = key.rpartition(".")
        pname = parts.pop("_name")
        slot = self.slots.get(owner) if attr == "weight" else None
        if slot is None and not self._check_known(key, path):
            return  # (a buffer the model computes itself, as _place skips it)
        # (a linear layer's weight or bias, or another module's tensor: matched by every class of its MRO)
        if not self.kind.bitmask.is_target(owner, _class_names(self.module.get_submodule(owner))):
            raise FormatError(f"{path}: '{key}' is stored in sparse-bitmask form ('{pname}.*') but config.json's "
                              f"sparsity_config does not target '{owner}' (targets "
                              f"{list(self.kind.bitmask.targets or [])}, ignore {list(self.kind.bitmask.ignore)})")
        dense = sb.decompress(parts, pname, str(path))
        if slot is None:
            self._place(key, dense, path)
            return
        self._check_shape(key, dense.shape, path)
        if not dense.dtype.is_floating_point:
            raise FormatError(f"{path}: '{pname}.compressed' is not floating point")
        self.values[key] = self._decide(slot, cast_checked(path, key, dense, slot.dtype), path)

    def _decide(self, slot: _Slot, w, path: Path) -> torch.Tensor | SparseFormat:
        """The value a linear layer's weight gets: kept as it is, compressed, or made dense (in the layer's dtype: a
        compressed weight of another dtype is cast, refusing values that overflow there, as :func:`cast_checked`)."""
        def dense_of(w):  # (a dense w is in the layer's dtype already, _place / _place_bitmask: returned as it is)
            return cast_checked(path, f"{slot.fqn}.weight", w.to_dense() if isinstance(w, SparseFormat) else w,
                                slot.dtype)

        if self.mode == "as-saved":
            if isinstance(w, SparseFormat):
                if w.dtype != slot.dtype:
                    raise FormatError(f"'{slot.fqn}' is compressed as {w.dtype} but the model's layer is "
                                      f"{slot.dtype}; build the model in {w.dtype}")
                self._converted(slot, w)
            return w
        # (whatever is decided comes out in the layer's dtype, as the dense tensors do in _place: a compressed weight
        # of another dtype is decompressed or re-encoded, not left to fail in the first forward; session 71)
        if self.mode == "dense":
            return dense_of(w)
        config: SparsifyConfig = self.mode
        fmt = _format_class(config.format, "SparsifyConfig.format")
        if slot.keep_dense is not None:
            self.report.skipped.append(SkippedLayer(slot.fqn, slot.keep_dense))
            return dense_of(w)
        numel = slot.out_features * slot.in_features
        zeros = numel - int(w.nnz if isinstance(w, SparseFormat) else count_nonzero(w))
        sparsity = zeros / numel
        if (short := min_sparsity_shortfall(zeros, numel, config.min_sparsity)) is not None:  # (exact, inclusive)
            self.report.skipped.append(SkippedLayer(slot.fqn, short))
            return dense_of(w)
        if isinstance(w, SparseFormat) and type(w) is fmt and w.dtype == slot.dtype:
            self._converted(slot, w)
            return w
        dense = dense_of(w)
        c = fmt.from_dense(dense)
        if c.device.type == "cpu":
            _trim_host_heap()
        dense_bytes = _tensor_bytes(dense)
        if c.nbytes >= dense_bytes:
            self.report.skipped.append(SkippedLayer(slot.fqn, f"compressed weight ({fmt.__name__}, "
                                                              f"{_human(c.nbytes)}) is not smaller than dense "
                                                              f"({_human(dense_bytes)}) at sparsity {sparsity:.4f}"))
            return dense
        self._converted(slot, c)
        return c

    def _converted(self, slot: _Slot, w: SparseFormat) -> None:
        elem = torch.empty((), dtype=w.dtype).element_size()
        bias = slot.out_features * elem if slot.bias else 0
        self.report.converted.append(ConvertedLayer(slot.fqn, w.shape, w.density,
                                                    slot.out_features * slot.in_features * elem + bias,
                                                    w.nbytes + bias))

    # -- the module --
    def finish(self) -> None:
        """Check that every tensor arrived, then put the values into the module."""
        loaded = set(self.values)
        for key in self.expected:
            if key in loaded or any(a in loaded for a in self.aliases.get(key, ())):
                continue
            owner = key[: -len(".weight")] if key.endswith(".weight") else None
            hint = ""
            if owner in self.slots and self.kind.kind == "flash-llm" and owner in (self.kind.sparse_modules or {}):
                hint = f" (a sparse layer: expected '{owner}.weight_data' and '{owner}.weight_offsets')"
            raise FormatError(f"{self.files.path}: tensor '{key}' is missing (no shard holds it){hint}")
        for fqn, slot in self.slots.items():  # weights that arrive as another tensor's alias (tied lm_head)
            if f"{fqn}.weight" not in loaded and isinstance(self.mode, SparsifyConfig):
                self.report.skipped.append(SkippedLayer(fqn, slot.keep_dense or "weight is tied to another tensor"))
        # tied tensors stored more than once must agree
        for key in loaded:
            for other in self.aliases.get(key, ()):
                if other != key and other in loaded and other > key:
                    a, b = self.values[key], self.values[other]
                    dense = [v.to_dense() if isinstance(v, SparseFormat) else v for v in (a, b)]
                    if not torch.equal(dense[0], dense[1]):
                        raise FormatError(f"{self.files.path}: '{key}' and '{other}' are tied in the model but "
                                          "differ in the checkpoint")
        module = self.module
        dense_state = {}
        for key, v in self.values.items():
            owner = key[: -len(".weight")] if key.endswith(".weight") else None
            if owner in self.slots and isinstance(v, SparseFormat):
                continue
            if key.endswith(".bias") and key[: -len(".bias")] in self.slots and \
                    isinstance(self.values.get(key[: -len(".bias")] + ".weight"), SparseFormat):
                continue
            dense_state[key] = v
        for fqn, slot in self.slots.items():
            w = self.values.get(f"{fqn}.weight")
            current = module.get_submodule(fqn)
            if isinstance(w, SparseFormat):
                b = self.values.get(f"{fqn}.bias") if slot.bias else None
                new = SparseLinear(w, None if b is None else b.to(w.dtype))
            elif isinstance(current, SparseLinear):
                new = nn.Linear(slot.in_features, slot.out_features, bias=slot.bias, device="meta", dtype=slot.dtype)
            else:
                continue
            parent, _, name = fqn.rpartition(".")
            setattr(module.get_submodule(parent), name, new)
        result = module.load_state_dict(dense_state, strict=False, assign=True)
        if result.unexpected_keys:
            raise FormatError(f"{self.files.path}: tensors {result.unexpected_keys[:5]} did not fit the model")
        # re-tie: every name of a tied tensor becomes the tensor loaded under the first of its names the checkpoint
        # holds (whichever it is: a tied checkpoint may store the shared matrix as lm_head.weight only); names
        # stored more than once (equal, checked above) are tied again too, as load_state_dict(assign=True)
        # assigned them separately
        for key, group in self.aliases.items():
            src = next((a for a in group if a in loaded), None)
            if len(group) < 2 or key == src or src not in dense_state:
                continue
            if isinstance(self.values.get(key), SparseFormat):  # (became a SparseLinear: nothing to tie)
                continue
            owner, _, attr = src.rpartition(".")
            src_mod = module.get_submodule(owner)
            tensor = src_mod._parameters.get(attr) if attr in src_mod._parameters else src_mod._buffers[attr]
            downer, _, dattr = key.rpartition(".")
            dst_mod = module.get_submodule(downer)
            if dattr in dst_mod._parameters:
                dst_mod._parameters[dattr] = tensor
            else:
                dst_mod._buffers[dattr] = tensor
        # (non-persistent buffers are the module's own business: flash_llm.models computes them on first use)
        left = [n for n, t in [*module.named_parameters(), *module.named_buffers()]
                if t.is_meta and n not in self.non_persistent]
        if left:
            raise FormatError(f"{self.files.path}: after loading, {len(left)} tensor(s) of the model have no data "
                              f"(first: '{left[0]}')")


_LIBC = None


def _trim_host_heap() -> None:
    """Give the C heap's free pages back to the system (glibc ``malloc_trim``).  Compressing a layer on the CPU
    frees several times its dense size of temporaries; glibc keeps such blocks in the heap, where the
    compressed arrays allocated between them fragment it, so without this the resident memory of a CPU
    conversion grows by several layers' worth beyond the compressed model.  A no-op elsewhere."""
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        name = ctypes.util.find_library("c") if sys.platform.startswith("linux") else None
        try:
            lib = ctypes.CDLL(name) if name else False
        except OSError:
            lib = False
        _LIBC = lib if lib is not False and hasattr(lib, "malloc_trim") else False
    if _LIBC:
        _LIBC.malloc_trim(0)


def _mode(sparsify, kind: CheckpointKind):
    if sparsify is None:
        return "as-saved" if kind.kind == "flash-llm" else SparsifyConfig()
    if sparsify is False:
        return "dense"
    if isinstance(sparsify, SparsifyConfig):
        _, skip_names = sparsify._checked()  # (again, as sparsify_: a field may be set after __post_init__)
        if sparsify.dtype is not None:
            raise ValueError("load_checkpoint compresses each layer in the model's own dtype; leave "
                             "SparsifyConfig.dtype unset and build the model in the dtype you want")
        return replace(sparsify, skip_names=skip_names)  # (a tuple: the names may have been an iterator)
    raise TypeError(f"sparsify must be None, False or a SparsifyConfig, got {type(sparsify).__name__}")


def load_checkpoint(module: nn.Module, path, *, device="cpu", sparsify: SparsifyConfig | None | bool = None,
                    progress: bool = True) -> SparsifyReport:
    """Load the Hugging Face checkpoint directory ``path`` into ``module`` (in place), compressing its
    pruned linear layers.

    ``module`` has the checkpoint's state-dict names (e.g. a ``transformers`` causal LM, or a
    ``flash_llm.models`` model); its parameters may be on ``meta``: tensors are *assigned*
    (``load_state_dict(assign=True)``), so nothing is allocated twice and, on CPU, dense tensors stay
    memory-mapped from the files.  Shards are read one at a time; each linear layer's weight is compressed
    (on ``device``) as soon as it is read.  Its ``nn.Linear`` / :class:`~flash_llm.SparseLinear` layers are
    replaced by whichever the weight ends up as.

    Checkpoint kinds: flash-llm (``flash_llm.save_pretrained``), compressed-tensors ``sparse-bitmask``, and
    dense (any pruned model saved by ``transformers``).

    Args:
        module: the model to fill; its floating tensors' dtypes are the dtypes loaded (fp16/bf16 for the
            layers to compress).
        path: the checkpoint directory.
        device: where tensors go (``"cpu"``, ``"cuda"``...); compression runs there.
        sparsify: ``None``: a flash-llm checkpoint loads exactly as saved, the other kinds are compressed
            with ``SparsifyConfig()`` (layers with >= 30 % zeros, ``lm_head`` and tied weights excluded);
            a :class:`~flash_llm.SparsifyConfig`: that decision for every linear layer, re-encoding or
            decompressing stored sparse layers as needed; ``False``: everything dense.
        progress: show a progress bar (stderr) when loading takes more than a second.

    Returns:
        A :class:`flash_llm.nn.SparsifyReport`: the layers that are sparse now, and those kept dense with the
        reason (``sparsify=None`` on a flash-llm checkpoint lists the sparse layers only).  The module remembers
        ``path``: :func:`save_pretrained` / :func:`write_sparse_bitmask` refuse to replace it (its tokenizer and
        other files would be lost), as for a model :func:`from_pretrained` loaded.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        flash_llm.FormatError: anything wrong with the checkpoint, naming the file and tensor: truncated or
            corrupt shard, missing or unexpected tensor, shape mismatch, unknown format version, a wrong or
            inconsistent ``config.json``.
        ValueError: ``device`` where nothing can be loaded, or a tensor-parallel ``module`` (load before sharding,
            or with :func:`flash_llm.parallel.load_tensor_parallel`), before the checkpoint is read.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    check_device(device)
    _refuse_tensor_parallel(module, loading=True)  # (else "has no place in the model", blaming the checkpoint)
    files = _files.open_checkpoint(path)
    kind = checkpoint_kind(files.config, files.path / _files.CONFIG_NAME)
    loader = _Loader(module, files, kind, torch.device(device), _mode(sparsify, kind), progress)
    with torch.no_grad():
        loader.run()
        loader.finish()
    _remember_loaded_from(module, files.path)
    return loader.report


# what load_checkpoint filled a model from: the directories a save of it may not replace (_refuse_own_source)
_LOADED_FROM_ATTR = "_flash_llm_loaded_from"
# the config._name_or_path a transformers load named its source by, and that source's absolute path
_NAME_OR_PATH_ATTR = "_flash_llm_name_or_path"


def _remember_loaded_from(module: nn.Module, path: Path, name_or_path: str | None = None) -> None:
    """Record on ``module`` (the model inside its wrappers, which the writers see) that :func:`load_checkpoint`
    filled it from checkpoint directory ``path``: :func:`save_pretrained` and :func:`write_sparse_bitmask` then refuse
    to replace that directory, as they refuse a :func:`from_pretrained` model's source (which ``_model.Source``
    records, with what a save writes back: a model filled by ``load_checkpoint`` was built by its caller, whose config
    the save writes as it is).  ``name_or_path``: the ``config._name_or_path`` of a load by transformers (the name as
    it was passed, maybe relative), which names ``path``: :func:`_transformers_source` reads it as ``path`` from then
    on, not against a later working directory."""
    model = _model.unwrap(module)
    loaded = model.__dict__.get(_LOADED_FROM_ATTR, ())
    where = Path(os.path.abspath(path))  # (absolute: a later chdir does not move it)
    if where not in loaded:
        model.__dict__[_LOADED_FROM_ATTR] = (*loaded, where)
    if isinstance(name_or_path, str) and name_or_path:
        model.__dict__[_NAME_OR_PATH_ATTR] = (name_or_path, where)


# ---- from_pretrained / save_pretrained -------------------------------------------------------------------

def _resolve_dtype(config: dict, kind: CheckpointKind, dtype, source: Path, sparsify=None) -> torch.dtype:
    """The dtype to build the model in for :func:`from_pretrained` / :func:`convert`: ``dtype``, else a flash-llm
    checkpoint's sparse layers', else ``config.json``'s (or the weights' own).  A ``dtype`` other than a flash-llm
    checkpoint's sparse layers' is refused only where they are to load as saved (``sparsify=None``); with
    ``sparsify=False`` or a SparsifyConfig they are decompressed or re-encoded in ``dtype``.  A declared dtype other
    than fp16 / bf16 (fp32) is taken only where nothing is compressed: ``sparsify=False``, or a flash-llm checkpoint
    without sparse layers loaded as saved."""
    from ..models import MODEL_DTYPES

    if dtype is not None and (not isinstance(dtype, torch.dtype) or dtype not in MODEL_DTYPES):
        raise TypeError(f"dtype must be torch.float16, torch.bfloat16, torch.float32 or torch.float64, got {dtype!r}")
    if kind.kind == "flash-llm" and kind.sparse_modules and (dtype is None or sparsify is None):
        stored = {_DTYPES_BY_NAME[m["dtype"]] for m in kind.sparse_modules.values()}
        if len(stored) > 1:
            raise FormatError(f"{source}: sparse layers of several dtypes {sorted(map(str, stored))}")
        (stored,) = stored
        if dtype is not None and dtype != stored:
            raise ValueError(f"{source.parent} holds layers compressed as {stored}; dtype={dtype} would need them "
                             "decompressed or re-encoded: load without dtype, or pass sparsify=False (dense) or a "
                             "SparsifyConfig (compressed again in dtype)")
        return stored
    if dtype is not None:
        return dtype
    # (nothing compressed in this load: a flash-llm checkpoint without sparse layers as saved, or sparsify=False)
    dense = sparsify is False or (sparsify is None and kind.kind == "flash-llm" and not kind.sparse_modules)
    declared = config_dtype(config)
    hint = (f"pass dtype=torch.float16{', torch.bfloat16 or torch.float32' if dense else ' or torch.bfloat16'} "
            "(on the command line: --dtype float16 or bfloat16)")
    if declared is None:  # as transformers' dtype="auto": the weights' own floating dtype
        # (not the tensors every reader skips: Llama-2-era files store rotary_emb.inv_freq in fp32 beside bf16 weights)
        found = {t.dtype for name, t in _files.open_checkpoint(source.parent).tensors.items()
                 if t.dtype.startswith(("F", "BF")) and not name.endswith(_files.IGNORED_SUFFIXES)}
        declared = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}.get(
            next(iter(found))) if len(found) == 1 else None
        if declared is None:
            raise ValueError(f"{source} declares no dtype and the weights are {sorted(found) or 'not floating'}; "
                             f"{hint}")
        said = f"declares no dtype and the weights are {sorted(found)}"
    else:
        key = "dtype" if "dtype" in config else "torch_dtype"  # (the key config_dtype read)
        said = f"declares dtype {config[key]!r} (key \"{key}\")"
    if declared in VALUE_DTYPES or (dense and declared in MODEL_DTYPES):
        return declared
    if dense:  # (float8, an integer or complex dtype: no model is built in it, and the argument is not the user's)
        raise ValueError(f"{source} {said}, which flash-llm builds no model in (it takes float16, bfloat16, float32 "
                         f"or float64): {hint}")
    raise ValueError(f"{source} {said}; the sparse formats hold fp16/bf16 values: {hint}")


def sparsify_for_dtype(path, dtype: torch.dtype | None) -> SparsifyConfig | None:
    """The ``sparsify`` argument that loads checkpoint directory ``path`` in ``dtype`` with its compressed layers kept
    compressed: None (load as saved) unless ``path`` is a flash-llm checkpoint whose compressed layers hold another
    dtype; then a :class:`~flash_llm.SparsifyConfig` of their format (the most common), so :func:`from_pretrained`
    re-encodes them in ``dtype`` (what ``flash-llm generate --dtype`` asks for; without it the load refuses)."""
    if dtype is None:
        return None
    path = Path(os.fspath(path))
    kind = checkpoint_kind(read_config(path), path / _files.CONFIG_NAME)
    if kind.kind != "flash-llm" or not kind.sparse_modules:
        return None
    metas = list(kind.sparse_modules.values())
    if all(_DTYPES_BY_NAME[m["dtype"]] == dtype for m in metas):
        return None
    counts = Counter(FORMATS[m["format"]] for m in metas)
    (stored, _), = counts.most_common(1)
    return SparsifyConfig(format={cls: name for name, cls in FORMAT_NAMES.items()}[stored])


def from_pretrained(path, *, device="cpu", dtype: torch.dtype | None = None,
                    sparsify: SparsifyConfig | None | bool = None, backend: str = "auto",
                    output_report: bool = False, progress: bool = True):
    """Load a Hugging Face checkpoint directory as a model with compressed sparse layers.

    The model is built on the ``meta`` device (``flash_llm.models`` for OPT and Llama, else
    ``transformers.AutoModelForCausalLM``; ``backend="flash"`` / ``"hf"`` chooses) and filled by
    :func:`load_checkpoint`: a flash-llm checkpoint loads as saved (memory-mapped, fully validated), a dense
    or ``sparse-bitmask`` one is compressed layer by layer while the shards stream by.

    Args:
        path: the checkpoint directory (``config.json`` + safetensors).
        device: where the model goes.
        dtype: the model's dtype; default: a flash-llm checkpoint's, else ``config.json``'s if fp16/bf16
            (a float32 checkpoint needs ``dtype=torch.float16`` or ``torch.bfloat16``).  A flash-llm checkpoint
            loads in another dtype only with ``sparsify=False`` or a SparsifyConfig (its sparse layers are then
            decompressed or re-encoded; as saved, they keep the dtype they were compressed in).
        sparsify: as in :func:`load_checkpoint`.
        backend: ``"auto"``, ``"flash"`` or ``"hf"``.
        output_report: also return the :class:`flash_llm.nn.SparsifyReport`.

    Returns:
        The model in eval mode (or ``(model, report)``).  A flash_llm.models model's ``config.eos_token_id`` is
        ``generation_config.json``'s where that file sets one (:func:`use_generation_eos`), else ``config.json``'s.
    """
    check_device(device)
    path = Path(os.fspath(path))
    config = read_config(path)
    kind = checkpoint_kind(config, path / _files.CONFIG_NAME)
    dtype = _resolve_dtype(config, kind, dtype, path / _files.CONFIG_NAME, sparsify)
    model = _model.build_skeleton(config, dtype, backend, path / _files.CONFIG_NAME)
    use_generation_eos(getattr(model, "config", None), path)
    generation = _generation_config(model, path)
    report = load_checkpoint(model, path, device=device, sparsify=sparsify, progress=progress)
    model.to(device)  # what the model computes itself (rotary frequencies) was built on the CPU beside the skeleton
    model.eval()
    _attach_hf_quantizer(model)
    _model.remember_source(model, path, config, generation)
    return (model, report) if output_report else model


def check_device(device, *, meta_ok: bool = False) -> None:
    """Before any work, a ValueError naming ``device`` where no model can be loaded onto it: ``meta`` (which holds no
    data: the load would end blaming the checkpoint for tensors without data; ``meta_ok`` lets it through), CUDA where
    it is not available, a device this torch cannot allocate on (another ordinal than the GPUs', a backend it is not
    built with)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device={device!r}: not a device ({e})") from None
    if dev.type == "meta":
        if meta_ok:
            return
        raise ValueError(f"device={device!r}: loading onto the meta device is not supported (it holds no data, and "
                         "the model is built on meta already before its tensors are loaded); pass 'cpu' or 'cuda'")
    if dev.type == "cuda" and not torch.cuda.is_available():  # (was an assertion from deep inside the load)
        raise ValueError(f"device={device!r}: CUDA is not available here")
    if dev.type != "cpu":
        try:
            torch.empty(0, device=dev)
        except (RuntimeError, AssertionError) as e:  # (torch's: no such ordinal, a backend it is not linked with)
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]  # (torch's names every backend after it)
            raise ValueError(f"device={device!r}: this torch cannot allocate there ({first})") from None


def _generation_config(model: nn.Module, path: Path) -> dict | None:
    """``generation_config.json`` of checkpoint directory ``path`` as a dict (None where absent), which a save of
    ``model`` writes back (:func:`_model.remember_source`); a transformers model gets it as its
    ``generation_config`` too (sampling defaults and stop tokens, as transformers' own from_pretrained gives it,
    where the skeleton built from config.json has only the config's tokens)."""
    file = path / GENERATION_CONFIG_NAME
    if not file.is_file():
        return None
    try:
        generation = _files.read_json(file, GENERATION_CONFIG_NAME)
    except FormatError as e:  # (a flash_llm.models model has been refused by use_generation_eos already)
        warnings.warn(f"{e}; a save of the model writes none", UserWarning, stacklevel=3)
        return None
    if hasattr(getattr(model, "generation_config", None), "save_pretrained"):
        from transformers import GenerationConfig

        try:
            loaded = GenerationConfig.from_dict(dict(generation))
        except (TypeError, ValueError) as e:  # (transformers' own loader keeps the model's default then too)
            warnings.warn(f"{file}: not a generation config transformers reads ({e}); the model keeps the one "
                          "config.json gives", UserWarning, stacklevel=3)
        else:
            _mark_unmodified(loaded)
            model.generation_config = loaded
    return generation


def _mark_unmodified(generation_config) -> None:
    """Mark a ``GenerationConfig`` made by ``from_dict`` as loaded and not modified since, as transformers'
    ``GenerationConfig.from_pretrained`` does (``_original_object_hash = hash(config)``): its ``save_pretrained``
    then validates strictly only a config changed after loading, so a published one that only draws warnings
    (``do_sample`` false with a ``temperature`` / ``top_p``, common on the Hub) is saved back as it is instead of
    failing every save at its end.  A transformers whose ``to_dict`` would write the attribute out (one that does
    not know it as metadata) gets it removed again: there it changes nothing."""
    try:
        generation_config._original_object_hash = hash(generation_config)
    except (TypeError, ValueError, AttributeError):  # (unhashable: left as from_dict made it)
        return
    if "_original_object_hash" in generation_config.to_dict():
        del generation_config._original_object_hash


def _attach_hf_quantizer(model: nn.Module) -> None:
    """A transformers model with sparse layers saves through transformers' own save_pretrained when it carries
    flash-llm's quantizer (as one loaded by transformers does)."""
    if "transformers" not in sys.modules or not hasattr(model, "config") or not hasattr(model, "save_pretrained"):
        return
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel) or not any(isinstance(m, SparseLinear) for m in model.modules()):
        return
    from .hf_quantizer import give_quantizers

    give_quantizers(model)  # (and the transformers models inside it: model.model saves through transformers too)


def sparse_modules_section(model: nn.Module) -> dict[str, dict]:
    """``quantization_config.sparse_modules`` for ``model``: each SparseLinear's format metadata without nnz."""
    out = {}
    for fqn, m in model.named_modules():
        if isinstance(m, SparseLinear):
            meta = m.weight.metadata()
            meta.pop("nnz", None)
            out[fqn] = meta
    return out


def quantization_section(model: nn.Module) -> dict:
    """The ``quantization_config`` of a flash-llm checkpoint of ``model``."""
    return {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "flash_llm_version": __version__,
            "sparse_modules": sparse_modules_section(model)}


def header_metadata(sparse: dict[str, SparseLinear]) -> dict[str, str]:
    """Shard-header metadata of sparse layers: ``L.weight_flash_llm`` -> the weight's format metadata JSON."""
    return {f"{fqn}.weight_{METADATA_KEY}": json.dumps(m.weight.metadata()) for fqn, m in sparse.items()}


def _model_dtype(model: nn.Module, state: dict[str, torch.Tensor]) -> torch.dtype | None:
    sparse = {m.weight_dtype for m in model.modules() if isinstance(m, SparseLinear)}
    if len(sparse) == 1:
        return next(iter(sparse))
    counts: dict[torch.dtype, int] = {}
    for t in state.values():
        if t.dtype.is_floating_point:
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    return max(counts, key=counts.get) if counts else None


def mixed_dtype_warning(state: dict[str, torch.Tensor], dtype: torch.dtype, declared: str,
                        advice: str | None = None, *, writer: str = "save_pretrained") -> str | None:
    """The warning of a save (by ``writer``) whose floating tensors are not all ``dtype`` (the one the checkpoint
    declares, as ``declared`` says), or None."""
    other = [(n, t.dtype) for n, t in state.items() if t.dtype.is_floating_point and t.dtype != dtype]
    if not other:
        return None
    return (f"{writer}: {len(other)} tensor(s) are not {dtype} (e.g. '{other[0][0]}' is {other[0][1]}); they "
            f"are written as they are, but {declared}, so loading casts them: "
            f"{advice or f'cast the model to {dtype} first'} for an exact round trip")


def refuse_mixed_sparse_dtypes(model: nn.Module) -> None:
    """ValueError naming the layers and their dtypes where ``model``'s SparseLinear layers hold more than one dtype.
    A flash-llm checkpoint has one dtype, the model's (``config.json``'s ``dtype``, or ``quantization_config.dtype``):
    both readers build the model in it and load every sparse layer as saved only in it (the ``dtype`` of each layer in
    ``sparse_modules`` is checked against it, as the shard header's is).  Such a model runs no forward pass either
    (a SparseLinear refuses inputs of another dtype).  The writers call this before anything is written."""
    by_dtype: dict[str, list[str]] = {}
    for fqn, m in model.named_modules():
        if isinstance(m, SparseLinear):
            by_dtype.setdefault(dtype_name(m.weight_dtype), []).append(fqn)
    if len(by_dtype) < 2:
        return
    parts = ", ".join(f"{name} ({len(fqns)} layer{'s' if len(fqns) > 1 else ''}: "
                      f"{', '.join(repr(f) for f in fqns[:3])}{', ...' if len(fqns) > 3 else ''})"
                      for name, fqns in sorted(by_dtype.items()))
    raise ValueError(f"{type(model).__name__}'s sparse layers hold several dtypes: {parts}; a flash-llm checkpoint "
                     "holds them in one dtype, the model's, in which its readers load them: compress them in one dtype "
                     "first (SparseLinear.from_dense(layer.to_dense(), layer.bias, dtype=...)); nothing was written")


def _refuse_merged(model: nn.Module) -> None:
    """Saving writes the module names: merged projections (``...qkv_proj.layer``) are names no reader knows."""
    from ..models._merge import MergedLinear

    merged = [fqn for fqn, m in model.named_modules() if isinstance(m, MergedLinear)]
    if merged:
        raise ValueError(f"model has {len(merged)} merged projections ({merged[0]}, ...; Engine(merge=True) or "
                         "flash_llm.models.merge_projections), whose names no checkpoint reader knows: call "
                         "flash_llm.models.unmerge_projections(model) before saving")


def _refuse_tensor_parallel(model: nn.Module, loading: bool = False) -> None:
    """A tensor-parallel model holds only this rank's slices of the projections, under names no reader knows
    (``...down_proj.linear.weight``): saving it would write an unloadable checkpoint, so it is refused; so is
    loading a checkpoint into it (``loading``: a checkpoint's full weights have no place in its slices)."""
    from ..parallel.layers import _ParallelLinear

    sharded = [fqn for fqn, m in model.named_modules() if isinstance(m, _ParallelLinear)]
    if not sharded and getattr(model, "tensor_parallel", None) is None:
        return
    which = f" ({len(sharded)} sharded projections: {sharded[0]}, ...)" if sharded else ""
    if loading:
        raise ValueError(f"module is tensor-parallel{which}: each rank holds only its slices, where a checkpoint's "
                         "full weights have no place; load the checkpoint before sharding (tensor_parallel_), or "
                         "with flash_llm.parallel.load_tensor_parallel, which loads each rank's slices")
    raise ValueError(f"model is tensor-parallel{which}: each rank holds only its slices, which no checkpoint "
                     "reader can load, and flash-llm cannot gather them into the full weights: save the "
                     "single-process model before sharding it (tensor_parallel_); a model from "
                     "load_tensor_parallel has its full weights in the checkpoint it was loaded from (`flash-llm "
                     "convert` compresses that one)")


def _refuse_own_source(model: nn.Module, path) -> None:
    """ValueError, before anything is written, where ``path`` exists and is a directory ``model`` was loaded from
    (:func:`from_pretrained`, :func:`load_checkpoint`, transformers' own ``from_pretrained``), or holds one: writing
    replaces ``path`` as a whole, which would delete the source's tokenizer files, ``generation_config.json`` and
    other files, as :func:`convert` refuses for the same reason."""
    if not os.path.lexists(os.fspath(path)):
        return
    src = _model.source_of(model)
    sources = [src.path if src is not None else _transformers_source(model),
               *model.__dict__.get(_LOADED_FROM_ATTR, ())]
    for src in sources:
        if src is None:
            continue
        try:
            _files.refuse_inside(src, path, "the model's source directory", "path")
        except ValueError as e:
            raise ValueError(f"{e}: the model was loaded from {src}, whose tokenizer files, generation_config.json "
                             "and other files the save would delete (`convert` refuses the same); nothing was "
                             "written") from None


def _transformers_source(model: nn.Module) -> Path | None:
    """The local directory a model loaded by transformers itself came from (its config's ``_name_or_path``, where that
    is a directory here), or None.  transformers records the name as it was passed: where flash-llm's quantizer saw
    the load (a flash-llm checkpoint, dense ones too), the absolute directory it recorded for that name
    (:func:`_remember_loaded_from`); otherwise a relative name is read against today's working directory, which is
    right unless the process changed directory since the load (flash-llm does not see a load of a checkpoint of
    another kind; :func:`from_pretrained` and :func:`load_checkpoint` record absolute paths)."""
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    if not isinstance(name, str) or not name:
        return None
    recorded = model.__dict__.get(_NAME_OR_PATH_ATTR)
    if recorded is not None and recorded[0] == name:  # (the name has not been changed since the load)
        return recorded[1]
    return Path(name) if os.path.isdir(name) else None


def _write_side_files(model: nn.Module, tmp: Path, copy_from: Path | None) -> None:
    """The files beside the weights and config.json: ``copy_from``'s non-weight files (convert), else the model's
    ``generation_config.json``: a transformers model's ``generation_config``, or the one a flash_llm.models model was
    loaded with (:func:`_model.generation_config_to_save`)."""
    if copy_from is not None:
        for f in _files.auxiliary_files(copy_from):
            shutil.copy2(f, tmp / f.name)
    elif hasattr(getattr(model, "generation_config", None), "save_pretrained"):
        model.generation_config.save_pretrained(tmp)
    else:
        generation = _model.generation_config_to_save(model)
        if generation is not None:
            _files.write_json(tmp / GENERATION_CONFIG_NAME, generation)


def save_pretrained(model: nn.Module, path, *, config=None, max_shard_size="5GB", overwrite: bool = False,
                    progress: bool = True, _copy_files_from: Path | None = None) -> None:
    """Write ``model`` (with or without :class:`~flash_llm.SparseLinear` layers) as a flash-llm checkpoint
    directory that :func:`from_pretrained` and ``transformers.AutoModelForCausalLM.from_pretrained`` (after
    ``import flash_llm``) read back exactly.

    The directory is written under a temporary name and renamed when complete: an existing ``path`` is an
    error unless ``overwrite=True``, and an interrupted save leaves no partial checkpoint.  A path that appears while
    the save runs is not replaced without ``overwrite`` either (``FileExistsError``).  ``path`` may not be the
    directory the model was loaded from, nor hold it (ValueError, as :func:`convert`): the directory is replaced as a
    whole, and its tokenizer and other files would be lost.

    A model :func:`from_pretrained` loaded keeps what it was loaded with: ``config.json`` keeps the source's keys
    that the model's config does not hold (a flash_llm.models model's: flash-llm's ``"flash_llm"`` section, custom
    keys), and the source's ``generation_config.json`` is written beside it.  A ``torch.compile``'d (or
    ``DistributedDataParallel``-wrapped) model is saved as the model inside, under its own names.

    Args:
        model: the model; its state-dict names become the tensor names.
        path: the output directory.
        config: the Hugging Face config (dict or ``PretrainedConfig``); default ``model.config``.
        max_shard_size: bytes (int) or a size like ``"5GB"`` (:func:`_files.parse_size`); a layer's tensors stay
            in one shard.
        overwrite: replace an existing ``path`` (a bool).

    ``max_shard_size`` and ``overwrite`` are checked before anything else (ValueError / TypeError).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _check_write_args(max_shard_size, overwrite)
    model = _model.unwrap(model)
    _refuse_own_source(model, path)
    _refuse_tensor_parallel(model)
    _refuse_merged(model)
    refuse_mixed_sparse_dtypes(model)
    cfg = _model.config_dict(model, config)
    cfg.pop("compression_config", None)
    state, sparse = _model.state_to_save(model)
    cfg["quantization_config"] = quantization_section(model)
    dtype = _model_dtype(model, state)
    if dtype is not None:
        cfg["dtype"] = dtype_name(dtype) if dtype in VALUE_DTYPES else str(dtype).removeprefix("torch.")
        if "torch_dtype" in cfg:
            cfg["torch_dtype"] = cfg["dtype"]
        message = mixed_dtype_warning(state, dtype, f"config.json says {cfg['dtype']}")
        if message is not None:  # (the readers cast every dense tensor to config.json's dtype)
            warnings.warn(message, UserWarning, stacklevel=2)
    groups: dict[str, list[str]] = {}
    for name in state:
        groups.setdefault(name.rpartition(".")[0], []).append(name)
    meta = header_metadata(sparse)
    with _files.atomic_directory(path, overwrite) as tmp:
        # (first: a generation config transformers refuses to save fails the save before any weight is written)
        _write_side_files(model, tmp, _copy_files_from)
        writer = _files.ShardWriter(tmp, max_shard_size)
        for owner, names in _progress(iterable=groups.items(), total=len(groups), desc="saving", unit="module",
                                      disable=not progress):
            key = f"{owner}.weight_{METADATA_KEY}"
            writer.add({n: state[n] for n in names}, {key: meta[key]} if key in meta else None)
        writer.close({"flash_llm_format_version": FORMAT_VERSION})
        _files.write_json(tmp / _files.CONFIG_NAME, cfg)


def _check_write_args(max_shard_size, overwrite) -> None:
    """The writers' ``max_shard_size`` (ValueError: :func:`_files.parse_size`) and ``overwrite`` (TypeError unless a
    bool: ``"no"`` is truthy and would replace the output), checked before any loading or compression."""
    _files.parse_size(max_shard_size)
    kind = type(overwrite)
    if not (isinstance(overwrite, bool) or (kind.__module__ == "numpy" and kind.__name__ in ("bool", "bool_"))
            or (isinstance(overwrite, int) and overwrite in (0, 1))):  # (numpy's bools, 0 and 1 too)
        raise TypeError(f"overwrite must be True or False, got {overwrite!r}")


def convert(src, dst, *, format: str = "bitmap", min_sparsity: float | None = None,
            dtype: torch.dtype | None = None, device="cpu", max_shard_size="5GB", overwrite: bool = False,
            backend: str = "auto", progress: bool = True) -> SparsifyReport:
    """Convert checkpoint directory ``src`` (dense, sparse-bitmask or flash-llm) into ``dst``.

    ``format``: ``"bitmap"`` / ``"tiled-csl"`` / ``"delta-rows"`` write a flash-llm checkpoint whose linear layers
    with at least ``min_sparsity`` zeros (default 0.3) are compressed in that format (``lm_head`` and tied weights
    stay dense); ``"sparse-bitmask"`` writes a compressed-tensors sparse-bitmask checkpoint (every linear layer but
    ``lm_head``; with ``min_sparsity``, those with fewer zeros are stored dense and listed in its ``ignore``).  The
    source's tokenizer and other non-weight files are copied; ``config.json`` is the source's with its quantization
    section replaced.  Written atomically (see :func:`save_pretrained`); ``dst`` may not be ``src`` nor hold it
    (ValueError), and its location is checked to be writable before anything is loaded, as are ``max_shard_size``
    (bytes or a size like ``"5GB"``, :func:`_files.parse_size`) and ``overwrite`` (a bool).  The model is loaded in
    ``dtype``, else (as :func:`from_pretrained`) the dtype ``config.json`` declares, else the weights' own; for
    ``"sparse-bitmask"`` any floating dtype (float32 too), as its values are stored decompressed.

    Returns the :class:`flash_llm.nn.SparsifyReport` of the layers compressed and kept dense.
    """
    src, dst = Path(os.fspath(src)), Path(os.fspath(dst))
    names = sorted(FORMAT_NAMES) + [sb.FORMAT]
    if format not in names:
        raise ValueError(f"format must be one of {names}; got {format!r}")
    _check_write_args(max_shard_size, overwrite)  # (before the model is loaded: the writer checks them at its start)
    if min_sparsity is not None:
        check_fraction(min_sparsity, "min_sparsity")
    check_device(device)
    _files.check_name_lengths(dst, "destination")
    _files.refuse_inside(src, dst)
    if os.path.lexists(dst) and not overwrite:
        raise FileExistsError(f"{dst} already exists; pass overwrite=True (--overwrite) to replace it")
    if os.path.lexists(dst) and not dst.is_dir():  # (before the model is loaded: writing would fail at the end)
        raise FileExistsError(f"{dst} exists and is not a directory; remove it first")
    config = read_config(src)
    kind = checkpoint_kind(config, src / _files.CONFIG_NAME)
    _files.check_writable(dst, "destination")
    # (every layer is decided again: a flash-llm source is decompressed or re-encoded, in any dtype)
    sparsify = False if format == sb.FORMAT else SparsifyConfig(
        format=format, min_sparsity=0.3 if min_sparsity is None else min_sparsity)
    if format == sb.FORMAT and kind.kind != "flash-llm":  # dense output: any floating dtype
        declared = config_dtype(config)
        if dtype is None and declared is not None and not declared.is_floating_point:
            raise ValueError(f"{src / _files.CONFIG_NAME} declares dtype "
                             f"{config.get('dtype', config.get('torch_dtype'))!r}, which is not a floating-point "
                             "dtype; the weights are loaded in it: pass dtype=torch.float16, torch.bfloat16 or "
                             "torch.float32 (on the command line: --dtype)")
    # (sparse-bitmask: as from_pretrained(sparsify=False): dtype, else config.json's, else the weights' own)
    load_dtype = _resolve_dtype(config, kind, dtype, src / _files.CONFIG_NAME, sparsify)
    out_config = {k: v for k, v in config.items() if k not in ("quantization_config", "compression_config")}
    model = _model.build_skeleton(config, load_dtype, backend, src / _files.CONFIG_NAME)
    if format == sb.FORMAT:
        load_checkpoint(model, src, device=device, sparsify=sparsify, progress=progress)
        return write_sparse_bitmask(model, dst, config=out_config, max_shard_size=max_shard_size,
                                    overwrite=overwrite, progress=progress, min_sparsity=min_sparsity,
                                    _copy_files_from=src)
    report = load_checkpoint(model, src, device=device, progress=progress, sparsify=sparsify)
    save_pretrained(model, dst, config=out_config, max_shard_size=max_shard_size, overwrite=overwrite,
                    progress=progress, _copy_files_from=src)
    return report


# ---- the sparse-bitmask writer -------------------------------------------------------------------------

def _pattern_list(value, name: str) -> tuple[str, ...]:
    """``write_sparse_bitmask``'s ``targets`` / ``ignore`` as a tuple of patterns: a str is one pattern (not its
    characters); a list, tuple or other iterable of str is taken as it is.  TypeError naming ``name`` for anything
    else, ValueError for an invalid ``re:`` regular expression (compiled here, before anything is written)."""
    if isinstance(value, str):
        value = (value,)
    try:
        patterns = None if isinstance(value, (bytes, dict)) else tuple(value)
    except TypeError:
        patterns = None
    if patterns is None or not all(isinstance(v, str) for v in patterns):
        raise TypeError(f"{name} must be a str or a list of str (module class names, module names or 're:<regex>' "
                        f"patterns), got {value!r}")
    for v in patterns:
        if v.startswith("re:"):
            try:
                re.compile(v[3:])
            except re.error as e:
                raise ValueError(f"{name} has an invalid regular expression {v!r}: {e}") from None
    return patterns


def write_sparse_bitmask(model: nn.Module, path, *, config=None, targets=("Linear",), ignore=("lm_head",),
                         max_shard_size="5GB", overwrite: bool = False, progress: bool = True,
                         min_sparsity: float | None = None, _copy_files_from: Path | None = None) -> SparsifyReport:
    """Write ``model`` as a compressed-tensors ``sparse-bitmask`` checkpoint directory (see
    :mod:`flash_llm.checkpoint.sparse_bitmask`): the weight of every linear layer (``nn.Linear``, or a
    ``SparseLinear``, decompressed) that ``targets`` / ``ignore`` select is stored as its four bitmask
    tensors, everything else densely.  With ``min_sparsity`` (a fraction in [0, 1]), a selected layer whose weight
    has a smaller fraction of zeros is stored densely too, and config.json's ``ignore`` names it; so is a selected
    layer whose weight has no elements (the layout needs rows, cols >= 1), with or without ``min_sparsity``.  Written
    atomically, like :func:`save_pretrained`, with the model's ``generation_config.json`` (stop tokens, sampling
    defaults) as it writes it.

    ``targets`` and ``ignore`` are lists (or tuples) of patterns: a module class name (``"Linear"``; as in
    compressed-tensors it matches any class of the module's MRO, so a subclass of ``nn.Linear`` such as Falcon's
    ``FalconLinear`` is a ``"Linear"`` too), an exact module name, or ``"re:<regex>"``; a single str is one pattern
    (``ignore="lm_head"`` is ``ignore=["lm_head"]``).  Anything else, or an invalid regular expression, is refused
    (TypeError / ValueError naming the argument) before anything is written.  What :func:`save_pretrained` says of
    ``path`` (not the model's source directory), of the config and generation config of a model
    :func:`from_pretrained` loaded, of ``max_shard_size`` / ``overwrite`` and of wrapped models holds here too.

    Returns a :class:`flash_llm.nn.SparsifyReport` of the layers stored compressed (dense/sparse bytes of
    the weight and bias) and those not targeted, below ``min_sparsity`` or empty.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _check_write_args(max_shard_size, overwrite)
    if min_sparsity is not None:
        check_fraction(min_sparsity, "min_sparsity")
    targets, ignore = _pattern_list(targets, "targets"), _pattern_list(ignore, "ignore")
    model = _model.unwrap(model)
    _refuse_own_source(model, path)
    _refuse_tensor_parallel(model)
    _refuse_merged(model)
    cfg = _model.config_dict(model, config)
    cfg.pop("compression_config", None)
    selector = sb.BitmaskConfig(targets, ignore)
    state, sparse = _model.state_to_save(model)
    aliases = _model.alias_groups(model)
    report = SparsifyReport()
    chosen: dict[str, nn.Module] = {}
    for fqn, m in model.named_modules():
        if not isinstance(m, (nn.Linear, SparseLinear)):
            continue
        if not selector.is_target(fqn, _class_names(m)):  # (a subclass of nn.Linear is a "Linear" too)
            report.skipped.append(SkippedLayer(fqn, "not selected by targets/ignore"))
        elif len(aliases.get(f"{fqn}.weight", ())) > 1:
            report.skipped.append(SkippedLayer(fqn, "weight is tied to another tensor"))
        else:
            chosen[fqn] = m
    dtype = _model_dtype(model, state)
    if dtype is not None:  # (as save_pretrained: the readers cast every dense tensor to config.json's dtype)
        written = {**state, **{f"{fqn}.weight": torch.empty(0, dtype=m.weight_dtype, device="meta")
                               for fqn, m in sparse.items()}}  # (a SparseLinear is written decompressed, in its dtype)
        message = mixed_dtype_warning(written, dtype, f"config.json says {str(dtype).removeprefix('torch.')}",
                                      writer="write_sparse_bitmask")
        if message is not None:
            warnings.warn(message, UserWarning, stacklevel=2)
    zeros = total = 0
    kept_dense: list[str] = []
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in state.items():
        owner = name.rpartition(".")[0]
        groups.setdefault(owner, {})[name] = t
    with _files.atomic_directory(path, overwrite) as tmp:
        _write_side_files(model, tmp, _copy_files_from)  # (as save_pretrained: first, before any weight)
        writer = _files.ShardWriter(tmp, max_shard_size)
        for owner, tensors in _progress(iterable=groups.items(), total=len(groups), desc="saving", unit="module",
                                        disable=not progress):
            m = chosen.get(owner)
            if m is None:
                if owner in sparse:  # a SparseLinear that is not targeted is stored dense
                    tensors = {f"{owner}.weight": sparse[owner].to_dense(),
                               **{n: t for n, t in tensors.items() if n == f"{owner}.bias"}}
                writer.add(tensors)
                continue
            weight = m.to_dense() if isinstance(m, SparseLinear) else m.weight.detach()
            if weight.numel() == 0:  # (the layout needs rows, cols >= 1: sb.compress refuses it)
                short = f"empty weight {tuple(weight.shape)}: the sparse-bitmask layout needs rows, cols >= 1"
            elif owner.rpartition(".")[2] == "weight":  # (its parts would read back as the weight of '<owner>.weight')
                short = "module name ends in 'weight': its sparse-bitmask tensor names would be ambiguous"
            else:
                short = None if min_sparsity is None else min_sparsity_shortfall(
                    weight.numel() - count_nonzero(weight), weight.numel(), min_sparsity)  # (exact, inclusive)
            if short is not None:  # stored dense, and left out of the targets by name
                report.skipped.append(SkippedLayer(owner, short))
                kept_dense.append(owner)
                writer.add({f"{owner}.weight": weight, **{n: t for n, t in tensors.items() if n == f"{owner}.bias"}})
                continue
            parts = sb.compress(weight)
            out = {f"{owner}.{p}": v for p, v in parts.items()}  # (today's naming: the module's name, no '.weight')
            bias = tensors.get(f"{owner}.bias")
            if bias is not None:
                out[f"{owner}.bias"] = bias
            writer.add(out)
            nnz = parts["compressed"].numel()
            zeros += weight.numel() - nnz
            total += weight.numel()
            bias_bytes = _tensor_bytes(bias)
            report.converted.append(ConvertedLayer(owner, tuple(weight.shape), nnz / weight.numel(),
                                                   _tensor_bytes(weight) + bias_bytes,
                                                   sum(_tensor_bytes(v) for v in parts.values()) + bias_bytes))
        writer.close()
        cfg["quantization_config"] = sb.quantization_config(targets, (*ignore, *kept_dense),
                                                            zeros / total if total else 0.0)
        if dtype is not None:
            cfg["dtype"] = str(dtype).removeprefix("torch.")
            if "torch_dtype" in cfg:  # (as save_pretrained: the older key, where the config has it, agrees)
                cfg["torch_dtype"] = cfg["dtype"]
        _files.write_json(tmp / _files.CONFIG_NAME, cfg)
    return report

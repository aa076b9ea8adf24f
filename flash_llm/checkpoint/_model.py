"""Module-side helpers of the checkpoint code: building a model skeleton without allocating its weights,
tied (aliased) tensors, and the state dict a checkpoint stores."""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from ..nn import SparseLinear, plain_state_on_cpu
from ..ops import _byte_span, _overlaps

EXTRA_STATE = "_extra_state"


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Within the block, every parameter a module registers moves to the ``meta`` device (no memory, no
    initialization cost); buffers are created where the code creates them, so computed non-persistent
    buffers (rotary frequencies) stay real."""
    register = nn.Module.register_parameter

    def register_parameter(self, name, param):
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        register(self, name, param)

    nn.Module.register_parameter = register_parameter
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def transformers_available() -> bool:
    """Whether ``import transformers`` can work, without importing it."""
    try:
        return importlib.util.find_spec("transformers") is not None
    except (ImportError, ValueError):  # blocked, or a sys.modules entry without a spec
        return False


def _flash_config(cfg: dict, backend: str, source):
    """``ModelConfig.from_hf(cfg)``, or None where ``backend="auto"`` should build the model with transformers
    instead: an architecture or option flash_llm.models does not implement (``UnsupportedConfigError``).  Any other
    error of the config (a missing or invalid field of a supported architecture: transformers would quietly build
    another model from its defaults) is a ValueError naming ``source``."""
    from ..models import ModelConfig
    from ..models.config import UnsupportedConfigError

    try:
        return ModelConfig.from_hf(cfg)
    except UnsupportedConfigError as e:
        if backend == "auto" and transformers_available():
            return None
        error = e
    except ValueError as e:
        error = e
    raise ValueError(f"{source}: {str(error).removeprefix('config: ')}") from None


def build_skeleton(config: dict, dtype: torch.dtype, backend: str = "auto", source="config.json") -> nn.Module:
    """A causal LM for the Hugging Face ``config`` dict with every parameter on ``meta``.

    ``backend``: ``"flash"`` (:func:`flash_llm.models.from_config`: OPT and Llama), ``"hf"`` (transformers'
    ``AutoModelForCausalLM``, any architecture it knows) or ``"auto"`` (flash_llm.models for the
    architectures and options it supports, else transformers).  A config flash_llm.models refuses for another
    reason (a missing or invalid field) raises ``ValueError`` naming ``source`` (the ``config.json`` path) under
    ``"auto"`` too.
    """
    if backend not in ("auto", "flash", "hf"):
        raise ValueError(f"backend must be 'auto', 'flash' or 'hf', got {backend!r}")
    cfg = {k: v for k, v in config.items() if k not in ("quantization_config", "compression_config")}
    if backend in ("auto", "flash"):
        from ..models import from_config

        model_config = _flash_config(cfg, backend, source)
        if model_config is not None:
            return from_config(model_config, dtype=dtype, device="meta")
    try:
        import transformers
    except ImportError:
        raise ImportError(f"building a {cfg.get('model_type', '?')!r} model needs transformers "
                          "(pip install 'flash-llm[hf]')") from None
    if "model_type" not in cfg:
        raise ValueError("config.json has no 'model_type'; cannot tell which model to build")
    hf_config = transformers.AutoConfig.for_model(**cfg)
    with parameters_on_meta():
        model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    return model


def alias_groups(module: nn.Module) -> dict[str, tuple[str, ...]]:
    """For every parameter/buffer name, all names of the same tensor object (tied weights), in module order."""
    by_id: dict[int, list[str]] = {}
    for name, t in [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]:
        if t is not None:
            by_id.setdefault(id(t), []).append(name)
    return {n: tuple(names) for names in by_id.values() for n in names}


def non_persistent_buffers(module: nn.Module) -> set[str]:
    out = set()
    for prefix, m in module.named_modules():
        for b in getattr(m, "_non_persistent_buffers_set", ()):
            out.add(f"{prefix}.{b}" if prefix else b)
    return out


def _view_key(t: torch.Tensor):
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def state_to_save(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, SparseLinear]]:
    """The tensors a checkpoint of ``model`` stores, by state-dict name, and its SparseLinear layers by name.

    SparseLinear ``_extra_state`` entries are left out (their format metadata goes into the file header);
    of tied tensors (one tensor object under several names: :func:`alias_groups`) only the first name is kept.
    Other names of the same view of the same memory are no ties (a parameter assigned another's tensor, as
    ``load_state_dict(..., assign=True)`` of tensors sharing memory leaves them; the model does not tie them, nor
    does a reader): each of those gets a copy, so every name is stored.  The plain copies of coded weights (an
    engine's model) come on the CPU (:func:`flash_llm.nn.plain_state_on_cpu`).  Raises for tensors on ``meta``,
    partially overlapping tensors and other modules' extra state.
    """
    sparse = {fqn: m for fqn, m in model.named_modules() if isinstance(m, SparseLinear)}
    aliases = alias_groups(model)
    seen: dict[tuple, str] = {}
    storages: dict[tuple, list[str]] = {}  # the names stored so far of each storage
    out: dict[str, torch.Tensor] = {}
    with plain_state_on_cpu():  # (a coded layer's plain copy leaves the GPU before the next one is made)
        state = model.state_dict()
    for name, t in state.items():
        owner, _, attr = name.rpartition(".")
        if attr == EXTRA_STATE and owner in sparse:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state-dict entry '{name}' is a {type(t).__name__}; a safetensors checkpoint holds "
                            "tensors only (extra state of modules other than SparseLinear is not supported)")
        if t.is_meta:
            raise ValueError(f"tensor '{name}' is on the meta device (no data); load the weights before saving")
        if t.numel() == 0:
            out[name] = t
            continue
        if any(a in out for a in aliases.get(name, ()) if a != name):
            continue  # tied: stored once, under its first name
        key = _view_key(t)
        if key in seen:  # the same memory under a name not tied to the first: stored again, as a copy
            out[name] = t.clone()
            continue
        seen[key] = name
        storages.setdefault((t.device, t.untyped_storage().data_ptr()), []).append(name)
        out[name] = t
    _refuse_shared_views(out, storages)
    return out, sparse


def _refuse_shared_views(out: dict[str, torch.Tensor], storages: dict[tuple, list[str]]) -> None:
    """ValueError naming the first pair (in ``out``'s order) of different views of one storage (``storages``: the
    names of each) that share a byte (:func:`_shares_bytes`).  The views of a storage are swept in the order of their
    spans' starts (:func:`flash_llm.ops._byte_span`), so only views whose spans overlap are compared: a flat buffer
    of thousands of disjoint views (DeepSpeed ZeRO, FSDP's ``use_orig_params``) costs a sort, not a comparison of
    every pair."""
    order = {n: i for i, n in enumerate(out)}
    first = None  # (index of the later name, of the earlier one)
    for names in storages.values():
        if len(names) < 2:
            continue
        active: list[tuple[int, str]] = []  # (end, name) of the spans begun so far and not yet ended
        for lo, hi, name in sorted((*_byte_span(out[n]), n) for n in names):
            active = [(end, n) for end, n in active if end > lo]
            for _, other in active:
                pair = tuple(sorted((order[name], order[other]), reverse=True))
                if (first is None or pair < first) and _shares_bytes(out[name], out[other]):
                    first = pair
            active.append((hi, name))
    if first is not None:
        names = list(out)
        raise ValueError(f"tensors '{names[first[1]]}' and '{names[first[0]]}' share memory but are different views; "
                         "save cannot store them faithfully")


def _shares_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether an element of ``a`` and one of ``b`` cover a common byte of memory.  :func:`flash_llm.ops._overlaps`
    first (one storage, overlapping spans); where the spans overlap, the bytes the elements cover are compared, so that
    views interleaved within one span (``w[:, 0::2]`` and ``w[:, 1::2]``: one storage, no element in common) share
    nothing.  (A mark per unit of ``gcd`` of the two element sizes over the spans' union, set through strided views:
    no index tensors; only for tensors of one storage whose spans overlap.)"""
    if not _overlaps(a, b):
        return False
    unit = math.gcd(a.element_size(), b.element_size())

    def place(t):  # (size, stride, offset) of t's bytes in units, each element's units along a last dimension
        e = t.element_size() // unit
        size, stride = (*t.shape, e), (*(st * e for st in t.stride()), 1)
        return size, stride, t.storage_offset() * e

    (sa, ta, oa), (sb, tb, ob) = place(a), place(b)
    end = max(o + sum((n - 1) * st for n, st in zip(s, t)) + 1 for s, t, o in ((sa, ta, oa), (sb, tb, ob)))
    lo = min(oa, ob)
    marks = torch.zeros(end - lo, dtype=torch.bool)
    marks.as_strided(sa, ta, oa - lo).fill_(True)
    return bool(marks.as_strided(sb, tb, ob - lo).any())


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside the wrappers whose state-dict names are not the model's: ``torch.compile``'s
    ``OptimizedModule`` (``_orig_mod.``), ``DistributedDataParallel`` / ``DataParallel`` (``module.``), any number
    of them; ``model`` itself otherwise.  A checkpoint stores the names of the model, as transformers' own
    ``save_pretrained`` does (its ``unwrap_model``)."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # (not imported: nothing is compiled)
    compiled = getattr(eval_frame, "OptimizedModule", None)
    wrappers = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    while True:
        if compiled is not None and isinstance(model, compiled):
            model = model._orig_mod
        elif isinstance(model, wrappers):
            model = model.module
        else:
            return model


#: The attribute of a model :func:`flash_llm.from_pretrained` loaded in which it records what it loaded it from.
SOURCE_ATTR = "_flash_llm_source"


@dataclass
class Source:
    """What a model was loaded from (:func:`remember_source`): the checkpoint directory (absolute, as it was at the
    load: a later ``os.chdir`` does not move it), its ``config.json`` (without the quantization sections) and
    ``generation_config.json`` (None where absent) as read, and the model's config object with the ``eos_token_id`` it
    had right after the load."""

    path: Path
    config: dict
    generation_config: dict | None
    model_config: object
    eos_token_id: object


def remember_source(model: nn.Module, path: Path, config: dict, generation_config: dict | None) -> None:
    """Record on ``model`` (loaded from checkpoint directory ``path``, whose ``config.json`` is ``config``) what a save
    needs to write a faithful checkpoint of it and to refuse replacing ``path``."""
    cfg = getattr(model, "config", None)
    kept = {k: copy.deepcopy(v) for k, v in config.items() if k not in ("quantization_config", "compression_config")}
    model.__dict__[SOURCE_ATTR] = Source(Path(os.path.abspath(path)), kept, copy.deepcopy(generation_config), cfg,
                                         copy.deepcopy(getattr(cfg, "eos_token_id", None)))


def source_of(model: nn.Module) -> Source | None:
    """The :class:`Source` :func:`remember_source` recorded on ``model``, or None."""
    src = getattr(model, "__dict__", {}).get(SOURCE_ATTR)
    return src if isinstance(src, Source) else None


# config.json keys that ModelConfig.from_hf reads but to_hf writes under other keys (transformers 5's rope_parameters,
# a llama3 rope's top-level original_max_position_embeddings: to_hf writes rope_theta and rope_scaling), so a source's
# value is not kept beside them (it could disagree with a config changed after loading)
_MODELLED_ELSEWHERE = frozenset({"rope_parameters", "original_max_position_embeddings"})

# config.json keys that to_hf writes as constants (0.0: the flash models run inference only, and model no dropout), so
# a source's value wins (OPT checkpoints say "dropout": 0.1: a fine-tune of the saved checkpoint keeps it)
_UNMODELLED_CONSTANTS = frozenset({"dropout", "attention_dropout", "layerdrop"})


def _with_source_keys(model_config, out: dict, src: Source) -> dict:
    """``out`` (``model_config.to_hf()``) plus the keys of the source's ``config.json`` that a ModelConfig does not
    model (flash-llm's ``"flash_llm"`` section, ``use_cache``, ``transformers_version``, custom keys, the dropout
    settings ``to_hf`` writes as 0.0...), and the source's ``eos_token_id`` where the model's is still the one it was
    loaded with (from_pretrained puts ``generation_config.json``'s there, which the save writes beside it)."""
    merged = {k: copy.deepcopy(v) for k, v in src.config.items() if k not in out and k not in _MODELLED_ELSEWHERE}
    merged.update(out)
    for k in _UNMODELLED_CONSTANTS & src.config.keys():
        merged[k] = copy.deepcopy(src.config[k])
    if model_config.eos_token_id == src.eos_token_id and "eos_token_id" in src.config:
        merged["eos_token_id"] = copy.deepcopy(src.config["eos_token_id"])
    return merged


def generation_config_to_save(model: nn.Module) -> dict | None:
    """The ``generation_config.json`` to write for ``model`` (a model without ``generation_config`` of its own, a
    flash_llm.models one): its source's, as loaded, with the model's ``eos_token_id`` where that was changed after the
    load; None where the source had none."""
    src = source_of(model)
    if src is None or src.generation_config is None:
        return None
    out = copy.deepcopy(src.generation_config)
    cfg = getattr(model, "config", None)
    eos = getattr(cfg, "eos_token_id", None)
    if cfg is src.model_config and eos != src.eos_token_id:  # (changed since the load: the reload must agree)
        out["eos_token_id"] = copy.deepcopy(eos)
    return out


def config_dict(model: nn.Module, config=None) -> dict:
    """The Hugging Face config dict to write as ``config.json``: ``config`` (a dict, a
    ``transformers.PretrainedConfig`` or an object with ``to_dict()``), else ``model.config``.  A flash_llm.models
    config (``to_hf()``) of a model :func:`flash_llm.from_pretrained` loaded keeps the keys of the source's
    ``config.json`` that it does not model (:func:`_with_source_keys`)."""
    cfg = config if config is not None else getattr(model, "config", None)
    if cfg is None:
        raise ValueError(f"{type(model).__name__} has no .config; pass config= (the Hugging Face config dict)")
    if isinstance(cfg, dict):
        out = dict(cfg)
    elif hasattr(cfg, "to_hf"):  # flash_llm.models.ModelConfig
        out = cfg.to_hf()
        src = source_of(model)
        if config is None and src is not None and src.model_config is cfg:
            out = _with_source_keys(cfg, out, src)
    elif hasattr(cfg, "to_dict"):
        out = cfg.to_dict()
    else:
        raise TypeError(f"config must be a dict or have to_dict(); got {type(cfg).__name__}")
    if not isinstance(out, dict) or "model_type" not in out:
        raise ValueError("the model config has no 'model_type'; pass config= with the Hugging Face config dict")
    return {k: v for k, v in out.items() if not k.startswith("_") or k in _MODEL_PRIVATE_KEYS}


# Hugging Face config keys that start with "_" yet describe the model (not transformers' bookkeeping, such as
# "_name_or_path" or "_attn_implementation", which config_dict drops): OPT-350m's final LayerNorm is absent.
_MODEL_PRIVATE_KEYS = frozenset({"_remove_final_layer_norm"})

"""transformers integration: flash-llm checkpoints as a quantization method of transformers.

After ``import flash_llm`` (with transformers installed), ``AutoModelForCausalLM.from_pretrained(dir)`` on a
directory written by :func:`flash_llm.save_pretrained` / ``flash-llm convert`` returns the model with its
sparse layers as :class:`~flash_llm.SparseLinear`, and ``model.save_pretrained(dir2)`` writes it back in
the same format.  The method is registered under ``quant_method = "flash_llm"`` through transformers'
public plug-in hooks (``register_quantization_config`` / ``register_quantizer``); this module imports
transformers, so ``flash_llm`` registers it only when transformers itself is being imported
(:func:`install`).

How loading works: before the weights are read, each layer ``config.json`` lists as sparse is replaced by an
empty SparseLinear shell on ``meta``; transformers then assigns the checkpoint's tensors to its buffers
(``weight_data``, ``weight_offsets``, ``bias``) like any other tensor; afterwards every sparse layer is
validated in full (a corrupt or missing array raises, naming the layer and tensor).  The layer names follow
transformers' own mapping of checkpoint names: the base-model prefix (``AutoModel`` reading a causal LM's checkpoint,
and the reverse), the renames of its conversion mappings (GPT-NeoX's ``embed_out``) and ``from_pretrained``'s
``key_mapping``, on load and on save (the shells go in when transformers hands the quantizer the load's conversions,
``update_weight_conversions``, before it reads any tensor).  Every
transformers model inside the loaded one that holds sparse layers (``model.model``) gets the quantizer too.

How saving works: a model carrying the quantizer (loaded by transformers, or converted by ``flash_llm.sparsify_``) saves
its sparse layers through ``get_state_dict_and_metadata``.  A model holding SparseLinear layers without it (layers
swapped in by hand) gets it when its ``save_pretrained`` is called: ``PreTrainedModel.save_pretrained`` is wrapped
(:func:`_install_save_guard`, the one hook here that is not a public plug-in hook of transformers) to attach it, or to
refuse a model of another quantization method, before transformers writes anything.
"""

from __future__ import annotations

import contextvars
import copy
import functools
import importlib.abc
import importlib.machinery
import inspect
import json
import os
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from .. import __version__
from ..formats import FORMATS, FormatError
from ..formats._base import METADATA_KEY, _DTYPES_BY_NAME, parse_metadata
from ..nn import SparseLinear
from . import _files, _model
from .pretrained import (FORMAT_VERSION, QUANT_METHOD, _model_dtype, _parse_section, _remember_loaded_from,
                         cast_checked, config_dtype, mixed_dtype_warning, refuse_mixed_sparse_dtypes,
                         sparse_modules_section)

_AUTO = "transformers.quantizers.auto"
_MODELING = "transformers.modeling_utils"

# whether the save_pretrained call under way reverts transformers' conversion mapping (its save_original_format):
# where it does not, the arrays are stored under the model's own names, and the section and headers name those
_SAVE_ORIGINAL_FORMAT: contextvars.ContextVar[bool] = contextvars.ContextVar("flash_llm_save_original_format",
                                                                              default=True)


def register() -> None:
    """Register flash-llm's quantization config and quantizer with transformers 5 (idempotent)."""
    import transformers
    from transformers.quantizers import auto

    major = transformers.__version__.split(".")[0]
    if not major.isdigit() or int(major) < 5:
        raise ImportError(f"flash-llm's transformers integration needs transformers >= 5 (found "
                          f"{transformers.__version__})")
    if QUANT_METHOD not in auto.AUTO_QUANTIZER_MAPPING:
        config_cls, quantizer_cls = _classes()
        auto.register_quantization_config(QUANT_METHOD)(config_cls)
        auto.register_quantizer(QUANT_METHOD)(quantizer_cls)
    _install_save_guard()  # (now if transformers' modeling_utils is imported in full, else right after it is)


def _registered() -> bool:
    auto = sys.modules.get(_AUTO)
    return QUANT_METHOD in (getattr(auto, "AUTO_QUANTIZER_MAPPING", None) or {})


def _install_save_guard() -> None:
    """Wrap ``PreTrainedModel.save_pretrained`` so that it calls :func:`prepare_save` first (idempotent).  Only once
    flash-llm's quantizer is registered (transformers 5) and ``transformers.modeling_utils`` is imported in full (this
    runs again right after it is: :class:`_RegisterOnImport`)."""
    cls = getattr(sys.modules.get(_MODELING), "PreTrainedModel", None)
    save = getattr(cls, "save_pretrained", None)
    if save is None or getattr(save, "_flash_llm_guard", False) or not _registered():
        return
    signature = inspect.signature(save)

    @functools.wraps(save)
    def save_pretrained(self, save_directory, *args, **kwargs):
        prepare_save(self)
        before = _safetensors_files(save_directory)
        try:  # (arguments transformers refuses: it says so itself)
            bound = signature.bind(self, save_directory, *args, **kwargs).arguments
        except TypeError:
            bound = {}
        revert = _SAVE_ORIGINAL_FORMAT.set(bool(bound.get("save_original_format", True)))
        try:
            out = save(self, save_directory, *args, **kwargs)
        finally:
            _SAVE_ORIGINAL_FORMAT.reset(revert)
        if any(isinstance(m, SparseLinear) for m in self.modules()):  # (safetensors writes its files 0600)
            for f, stat in _safetensors_files(save_directory).items():
                if before.get(f) != stat:  # written by this save (new, or rewritten); other files keep their mode
                    _files.usual_permissions(f)
        return out

    save_pretrained._flash_llm_guard = True
    cls.save_pretrained = save_pretrained


def _safetensors_files(directory) -> dict[Path, tuple[int, int, int, int]]:
    """The ``*.safetensors`` files of ``directory`` (none where it is no directory), each with what tells whether a
    save rewrote it: device, inode, size and modification time (ns)."""
    out = {}
    try:
        files = list(Path(directory).glob("*.safetensors"))
    except (OSError, TypeError, ValueError):  # (no such directory, or a save_directory transformers refuses itself)
        return out
    for f in files:
        try:
            st = f.stat()
        except OSError:
            continue
        out[f] = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    return out


def prepare_save(model) -> None:
    """Ready ``model`` (a transformers model whose ``save_pretrained`` was called) for transformers' save, before
    anything is written: where it holds SparseLinear layers but no quantizer (layers swapped in by hand, or
    ``sparsify_`` run on a model inside it), it and the transformers models inside it get flash-llm's, as
    ``sparsify_`` gives them (without, transformers would write config.json, then fail on SparseLinear's extra state);
    a model quantized by another method is refused (ValueError): its quantizer cannot store SparseLinear's arrays."""
    if getattr(model, "_hf_peft_config_loaded", False):  # (transformers saves the adapters' weights only)
        return
    sparse = next((fqn for fqn, m in model.named_modules() if isinstance(m, SparseLinear)), None)
    if sparse is None:
        return
    refuse_mixed_sparse_dtypes(model)  # (before transformers makes the directory)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        give_quantizers(model)
    elif not isinstance(quantizer, _classes()[1]):
        method = getattr(quantizer.quantization_config, "quant_method", "?")
        raise ValueError(f"{type(model).__name__} holds flash-llm sparse layers ('{sparse}') but is quantized with "
                         f"{str(getattr(method, 'value', method))!r}, whose quantizer cannot save them; nothing was "
                         "written: convert them back to nn.Linear first (flash_llm.engine.expand_sparse_(model))")


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Runs :func:`_register_or_warn` right after ``transformers.quantizers.auto`` is first imported, and
    :func:`_install_save_guard` right after ``transformers.modeling_utils`` is."""

    def __init__(self):
        self.pending = {_AUTO, _MODELING}

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.pending:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_hook(module):
            exec_module(module)
            self.pending.discard(fullname)
            if not self.pending:
                _uninstall()
            if fullname == _AUTO:
                _register_or_warn()
            else:
                _install_save_guard()

        spec.loader.exec_module = exec_then_hook
        return spec


_finder = _RegisterOnImport()


def _uninstall() -> None:
    if _finder in sys.meta_path:
        sys.meta_path.remove(_finder)


def _register_or_warn() -> None:
    try:
        register()
    except (ImportError, AttributeError, TypeError, ValueError) as e:  # a transformers API we do not know
        warnings.warn(f"flash-llm could not register its checkpoint format with transformers "
                      f"{getattr(sys.modules.get('transformers'), '__version__', '?')}: {e}; "
                      "load flash-llm checkpoints with flash_llm.from_pretrained", RuntimeWarning, stacklevel=3)


def install() -> None:
    """Make ``transformers`` know flash-llm checkpoints without importing it: register now if transformers'
    quantizers are already imported, else when they are; nothing when transformers is not installed."""
    _finder.pending -= set(sys.modules)
    if _AUTO in sys.modules:
        _register_or_warn()
    if _finder.pending and _model.transformers_available() and _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)


_CLASSES = None


def _classes():
    """The config and quantizer classes (built on first use: they subclass transformers' classes)."""
    global _CLASSES
    if _CLASSES is None:
        _CLASSES = _define()
    return _CLASSES


def __getattr__(name):
    if name in ("FlashLLMConfig", "FlashLLMHfQuantizer"):
        config_cls, quantizer_cls = _classes()
        return config_cls if name == "FlashLLMConfig" else quantizer_cls
    raise AttributeError(name)


class _Shell(SparseLinear):
    """A SparseLinear waiting for transformers to assign its arrays.  It has no ``_extra_state`` entry:
    transformers' loader reads tensors only (the format metadata comes from config.json)."""

    get_extra_state = nn.Module.get_extra_state
    set_extra_state = nn.Module.set_extra_state
    sized = False  # whether its arrays have the checkpoint's lengths (read from the shard headers)


def load_renamer(model, quantizer=None, transforms=None):
    """``key -> (name, converted)``: the name transformers' loader gives checkpoint tensor ``key`` in ``model``
    (the renames of its conversion mapping: GPT-NeoX's ``embed_out`` -> ``lm_head``, Mixtral's ``block_sparse_moe`` ->
    ``mlp``...), and whether one of its converters (merging or splitting tensors: Mixtral's ``experts.N.w1``) takes
    it.  None where ``model`` is not a transformers model or this transformers has no such mapping (names are then
    taken as they are).  The base-model prefix is not handled here (:func:`_with_base_prefix`).  ``transforms``: the
    conversions a load used (given to the quantizer's ``update_weight_conversions``: ``from_pretrained``'s
    ``key_mapping`` comes first in them), default the model's own mapping; they are copied, not changed."""
    if "transformers" not in sys.modules:
        return None
    try:
        from transformers import PreTrainedModel
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        if not isinstance(model, PreTrainedModel):
            return None
        if transforms is None:
            transforms = get_model_conversion_mapping(model, None, quantizer)
        else:  # (renaming marks a transform used, or a group active: the loader's own are left as they are)
            transforms = [copy.copy(t) for t in transforms]
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        rename_source_key("model.x.weight", renamings, converters)
    except (ImportError, AttributeError, TypeError, ValueError):  # a transformers without (this) conversion API
        return None
    if not renamings and not converters:
        return None

    def rename(key: str) -> tuple[str, bool]:
        name, pattern = rename_source_key(key, renamings, converters)
        return name, pattern is not None

    return rename


def _with_base_prefix(model, name: str, modules) -> str:
    """Module name ``name`` of a checkpoint as transformers' loader places it in ``model``: without the base-model
    prefix (``model.``) where ``model`` is the base model of the checkpoint's (``AutoModel`` reading a causal LM),
    with it in the reverse case."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    if prefix:
        if name.startswith(prefix + ".") and name[len(prefix) + 1:] in modules:
            return name[len(prefix) + 1:]
        if f"{prefix}.{name}" in modules:
            return f"{prefix}.{name}"
    return name


def _past_last_block(modules: dict[str, nn.Module], name: str) -> bool:
    """Whether module ``name`` would lie in a block past the last of one of the model's ``nn.ModuleList``s
    (``model.layers.1.mlp.down_proj`` where ``model.layers`` has one block): ``modules`` is its ``named_modules()``."""
    parts = name.split(".")
    for i in range(1, len(parts)):
        blocks = modules.get(".".join(parts[:i]))
        if isinstance(blocks, nn.ModuleList) and parts[i].isdigit() and int(parts[i]) >= len(blocks):
            return True
    return False


def _save_keeps_names(model) -> bool:
    """Whether transformers' ``save_pretrained`` provably stores ``model``'s tensors under their own names: it knows no
    conversion mapping for it (none its loader attached, none for its class, no legacy
    ``_checkpoint_conversion_mapping``).  False where this transformers cannot say."""
    if getattr(model, "_weight_conversions", None) or getattr(model, "_checkpoint_conversion_mapping", None):
        return False
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import PrefixChange

        transforms = get_model_conversion_mapping(model, add_legacy=False)
    except (ImportError, AttributeError, TypeError, ValueError):
        return False
    # (transformers' revert drops the prefix changes of a model it did not load, as this one to be saved)
    return not [t for t in transforms if not isinstance(t, PrefixChange)]


def saved_layer_names(model, sparse: dict[str, SparseLinear], original_format: bool = True,
                      conversions=None) -> dict[str, str]:
    """Module name -> the name transformers' ``save_pretrained`` writes the tensors of each sparse layer under (it
    reverts its conversion mapping's renames on save: GPT-NeoX's ``lm_head`` is stored as ``embed_out``; with
    ``original_format=False``, its ``save_original_format=False``, it keeps the module names).  Raises ValueError,
    before anything is written, for a layer whose tensors transformers would not save under one name that its loader
    maps back to the layer, or whose saved name cannot be traced (a save calls this before it writes any file).  The
    names written into ``sparse_modules`` and the headers must be those transformers gives the arrays: a section naming
    ``lm_head`` beside arrays stored as ``embed_out`` is a checkpoint neither loader reads.  ``conversions``: those the
    load of ``model`` used (with its ``key_mapping``), which map a saved name back; default the model's own mapping."""
    cls = type(model).__name__
    how = "save the model with flash_llm.save_pretrained(model, path) (and read it back with flash_llm.from_pretrained)"
    fix = f"no reader maps them back to the layer: {how}"
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # (such a transformers has no save_original_format either: it reverts, or keeps the names)
        # transformers' save renames by means unknown here: its own names are right only where it has nothing to rename
        if _save_keeps_names(model):
            return {fqn: fqn for fqn in sparse}
        raise ValueError(f"this transformers has no core_model_loading.revert_weight_conversion: flash-llm cannot tell "
                         f"under which names save_pretrained of {cls} (which has a conversion mapping) stores sparse "
                         f"layer{'s' if len(sparse) > 1 else ''} {', '.join(repr(f) for f in list(sparse)[:3])}"
                         f"{', ...' if len(sparse) > 3 else ''}; {how}") from None

    def arrays(fqn):
        return [f"{fqn}.weight_{n}" for n in sparse[fqn].weight_format._arrays] + (
            [f"{fqn}.bias"] if sparse[fqn].bias is not None else [])

    def revert(fqns):  # {name: its saved name}; a name a converter takes, or one that cannot be traced, is absent
        # (each probe has a length of its own: a tensor transformers copies under an unchanged name is still told)
        names = [k for fqn in fqns for k in arrays(fqn)]
        probe = {k: torch.empty(i + 1, device="meta") for i, k in enumerate(names)}
        ids = {id(t): k for k, t in probe.items()}
        out = revert_weight_conversion(model, dict(probe))
        traced = {ids[id(t)]: k for k, t in out.items() if id(t) in ids}
        if not traced:  # copies: only a name kept with its own probe's shape is known
            traced = {k: k for k, t in out.items()
                      if k in probe and isinstance(t, torch.Tensor) and t.shape == probe[k].shape}
        return traced

    if not original_format:  # (transformers stores the state dict as it is)
        saved = {k: k for fqn in sparse for k in arrays(fqn)}
    else:
        try:
            saved = revert(list(sparse))
        except Exception:  # a converter that cannot take a sparse layer's arrays: find the layer (absent below)
            saved = {}
            for fqn in sparse:
                try:
                    saved.update(revert([fqn]))
                except Exception:
                    pass
    # (a layer absent from `saved` is refused below: its own name is never assumed, which, for a model with a
    # conversion mapping, would list it under a name its arrays are not stored under)
    out = {}
    rename = load_renamer(model, transforms=conversions)
    modules = dict(model.named_modules())
    for fqn in sparse:
        first = saved.get(f"{fqn}.weight_data") or ""
        layer = first[: -len(".weight_data")] if first.endswith(".weight_data") else None
        if layer is None or [saved.get(k) for k in arrays(fqn)] != [layer + k[len(fqn):] for k in arrays(fqn)]:
            raise ValueError(f"transformers' save_pretrained of {cls} would not store the tensors of sparse layer "
                             f"'{fqn}' under names of their own (its conversion mapping merges, splits or collides "
                             f"them, or its revert gives them back under names flash-llm cannot trace): {fix}")
        back, converted = rename(f"{layer}.weight_data") if rename is not None else (f"{layer}.weight_data", False)
        if not converted and back.endswith(".weight_data"):
            back = _with_base_prefix(model, back[: -len(".weight_data")], modules)
        if back != fqn:  # its loader must map the saved name back to the layer
            raise ValueError(f"transformers' save_pretrained of {cls} would store sparse layer '{fqn}' as '{layer}', "
                             f"which its loader reads as '{back}' (its conversion mapping): {fix}")
        out[fqn] = layer
    return out


def give_quantizers(model, quantizer=None) -> None:
    """Give ``model`` and every transformers model inside it that holds SparseLinear layers (a causal LM's base model
    ``model.model``) flash-llm's quantizer, so that transformers' ``save_pretrained`` of any of them writes a flash-llm
    checkpoint (without one, it would save SparseLinear's extra state as a tensor and fail half-way).  ``quantizer``:
    the one ``model`` has (from transformers' loader); else ``model`` gets a new one, with a quantization section of
    its sparse layers.  Models sharing a config share its quantization section."""
    from transformers import PreTrainedModel

    config_cls, quantizer_cls = _classes()
    sections: dict[int, object] = {}
    for fqn, sub in model.named_modules():
        if not isinstance(sub, PreTrainedModel) or not any(isinstance(m, SparseLinear) for m in sub.modules()):
            continue
        if fqn == "" and quantizer is not None:
            sections[id(sub.config)] = quantizer.quantization_config
            continue
        qc = sections.get(id(sub.config))
        if qc is None:
            qc = sections[id(sub.config)] = config_cls(sparse_modules=sparse_modules_section(sub))
            sub.config.quantization_config = qc
        sub.hf_quantizer = quantizer_cls(qc, pre_quantized=True)
        sub.is_quantized = True
        sub.quantization_method = QUANT_METHOD


def _base_hook(base, name: str, config):
    """``base``'s config hook ``name`` on ``config`` where this transformers has it (its hooks differ by version),
    else ``config`` as it is."""
    hook = getattr(base, name, None)
    return config if hook is None else hook(config)


def _takes_model(hook) -> bool:
    """Whether transformers' ``update_weight_conversions`` hook ``hook`` (bound; None: this transformers has none) takes
    the model beside the conversions: transformers 5.17 passes only the conversions, 5.25
    ``(weight_conversions, model)``, both after ``preprocess_model`` (the model is then the one that
    ``preprocess_model`` was given)."""
    if hook is None:
        return False
    try:
        params = inspect.signature(hook).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind == p.VAR_POSITIONAL for p in params) or sum(
        p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params) >= 2


def _define():
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    class FlashLLMConfig(QuantizationConfigMixin):
        """``quantization_config`` of a flash-llm checkpoint: format version and the sparse layers with
        their format metadata (format, version, dtype, shape)."""

        def __init__(self, format_version: int = FORMAT_VERSION, flash_llm_version: str | None = None,
                     sparse_modules: dict | None = None, **kwargs):
            kwargs.pop("quant_method", None)
            self.quant_method = QUANT_METHOD
            self.format_version = format_version
            self.flash_llm_version = flash_llm_version or __version__
            self.sparse_modules = dict(sparse_modules or {})
            for k, v in kwargs.items():  # tolerate keys a later version may add
                setattr(self, k, v)
            _parse_section(self.__dict__, "quantization_config")

    class FlashLLMHfQuantizer(HfQuantizer):
        """Loads and saves flash-llm checkpoints in transformers (pre-compressed weights only)."""

        requires_calibration = False

        def __init__(self, quantization_config, **kwargs):
            super().__init__(quantization_config, **kwargs)
            if not self.pre_quantized:
                raise ValueError("quant_method 'flash_llm' loads checkpoints written by flash-llm; to compress a "
                                 "dense pruned model use flash_llm.from_pretrained(dir) or `flash-llm convert`")
            self._headers: dict[str, str] = {}
            self._header_files: dict[str, Path] = {}  # header entry -> the shard holding it
            self._source = "the checkpoint"
            self._names: dict[str, str | None] = {}  # checkpoint layer name -> module name (None: not in the model)
            self._source_dir: Path | None = None  # the local directory of the shards (a later save may not replace it)
            self._keys: dict[str, _files.TensorInfo] | None = None  # the checkpoint's tensors (None: not known)
            self._pending = None  # the model whose shells update_weight_conversions installs (the load under way)
            self._conversions = None  # the conversions that load used (key_mapping included): a save maps back by them

        def _dtype(self) -> torch.dtype | None:
            dtypes = {_DTYPES_BY_NAME[m["dtype"]] for m in self.quantization_config.sparse_modules.values()}
            return dtypes.pop() if len(dtypes) == 1 else None

        def _declare_dtype(self, config):
            # transformers' save_pretrained writes config.json's dtype from the model's first parameter; where the
            # sparse layers' dtype differs (dense tensors of another dtype), the quantization section names the dtype
            # to load in, as flash_llm's save does (a dtype passed to from_pretrained other than "auto" is used
            # instead of config.dtype, as before).  Set from the hooks that see config.json before the dtype is
            # settled: update_attn_implementation (transformers 5.25), update_tp_plan / update_ep_plan (5.17)
            declared = getattr(self.quantization_config, "dtype", None)
            if not isinstance(declared, torch.dtype):  # (a name, as config.json holds it)
                declared = config_dtype({"dtype": declared})
            if declared is not None:
                config.dtype = declared
            return config

        def update_attn_implementation(self, config):
            return _base_hook(super(), "update_attn_implementation", self._declare_dtype(config))

        def update_tp_plan(self, config):
            return _base_hook(super(), "update_tp_plan", self._declare_dtype(config))

        def update_ep_plan(self, config):
            return _base_hook(super(), "update_ep_plan", self._declare_dtype(config))

        def update_dtype(self, dtype):
            sparse = self._dtype()
            if sparse is not None and dtype is not None and dtype != sparse:
                # (transformers gives the dtype passed, or config.json's where none is or it is "auto")
                raise ValueError(f"this flash-llm checkpoint's sparse layers are {sparse} (fixed when they were "
                                 f"compressed); load it with dtype={sparse}, not {dtype} (the dtype passed to "
                                 "from_pretrained, or config.json's where none is)")
            return sparse if sparse is not None else dtype

        def validate_environment(self, *args, **kwargs):
            return None

        def _read_headers(self, model, checkpoint_files) -> dict[str, _files.TensorInfo] | None:
            """Tensor headers (dtype, shape) by name and flash-llm header metadata of the checkpoint's shards (headers
            only), or None when transformers does not say where they are and the model's path is not a local
            directory."""
            files = [Path(f) for f in (checkpoint_files or []) if str(f).endswith(".safetensors")]
            if not files:
                where = getattr(model.config, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
                if not where or not Path(where).is_dir():
                    return None
                files = _files.open_checkpoint(where).shards
            self._source = str(files[0].parent)
            self._source_dir = Path(os.path.abspath(files[0].parent))  # (absolute: a later chdir moves nothing)
            keys: dict[str, _files.TensorInfo] = {}
            for f in files:
                shard = _files.Shard(f)
                keys.update({k: shard.info(k) for k in shard.keys})
                entries = {k: v for k, v in shard.metadata.items() if k.endswith("_" + METADATA_KEY)}
                self._headers.update(entries)
                self._header_files.update(dict.fromkeys(entries, f))
            return keys

        def _module_names(self, model, rename) -> dict[str, str | None]:
            """Checkpoint layer name -> the module transformers' loader puts its tensors in: the renames of ``rename``
            (:func:`load_renamer` of the load's conversions) and the base-model prefix applied (None: a layer the model
            being loaded lacks, whose tensors transformers drops, as it drops a dense checkpoint's: one of the
            checkpoint's task head, outside its base model, such as ``lm_head`` read into ``AutoModel`` or a sequence
            classifier, or one of a block past the model's last, where a ``from_pretrained`` config override such as
            ``num_hidden_layers=1`` builds fewer blocks than the checkpoint holds)."""
            listed = self.quantization_config.sparse_modules
            modules = dict(model.named_modules())
            prefix = getattr(model, "base_model_prefix", "") or ""

            def renamed(key: str) -> tuple[str, bool]:
                return rename(key) if rename is not None else (key, False)

            # a task model's checkpoint: a tensor of it, sparse or dense, under the prefix (lm_head may be its only
            # sparse layer)
            headed = bool(prefix) and any(renamed(k)[0].startswith(prefix + ".")
                                          for k in (*(f"{c}.weight_data" for c in listed), *(self._keys or ())))
            out: dict[str, str | None] = {}
            for c in listed:
                key, converted = renamed(f"{c}.weight_data")
                if converted or not key.endswith(".weight_data"):
                    raise FormatError(f"{self._source}: config.json lists sparse layer '{c}', whose tensors "
                                      f"transformers converts (not only renames: '{c}.weight_data' -> '{key}') when it "
                                      f"loads {type(model).__name__}; load this checkpoint with "
                                      "flash_llm.from_pretrained")
                name = _with_base_prefix(model, key[: -len(".weight_data")], modules)
                if name not in modules:
                    # (a block past the last is no module, which _with_base_prefix cannot place: each form is tried)
                    forms = {name, name.removeprefix(prefix + "."), f"{prefix}.{name}"} if prefix else {name}
                    if (headed and not key.startswith(prefix + ".")) or any(_past_last_block(modules, n)
                                                                            for n in forms):
                        out[c] = None
                        continue
                    loaded_as = f" (transformers loads its tensors as '{name}')" if name != c else ""
                    raise FormatError(f"{self._source}: config.json lists sparse layer '{c}' but "
                                      f"{type(model).__name__} has no such module{loaded_as}")
                out[c] = name
            return out

        def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
            keys = self._keys = self._read_headers(model, checkpoint_files)
            listed = self.quantization_config.sparse_modules
            unlisted = sorted({k.rpartition(".")[0] for k in (keys or {}) if k.endswith(".weight_data")} - set(listed))
            if unlisted:  # (transformers would leave such a layer's weight as initialized, with a warning only)
                raise FormatError(f"{self._source}: '{unlisted[0]}' is stored compressed (its weight_data is in the "
                                  "shards) but config.json's quantization_config.sparse_modules does not list it"
                                  f"{f' ({len(unlisted)} such layers)' if len(unlisted) > 1 else ''}")
            if getattr(super(), "update_weight_conversions", None) is not None:
                # transformers calls it next (get_model_conversion_mapping, after preprocess_model; with the model
                # in 5.25, the conversions only in 5.17), with every conversion of this load (from_pretrained's
                # key_mapping too), before it reads any tensor: the shells go in there
                self._pending = model
            else:  # (no such hook: a transformers 5.x before it)
                self._install_shells(model, load_renamer(model, self))
            return model

        def update_weight_conversions(self, weight_conversions, model=None):
            base = getattr(super(), "update_weight_conversions", None)
            takes_model = _takes_model(base)
            if base is not None:
                weight_conversions = base(weight_conversions, model) if takes_model else base(weight_conversions)
            if model is None and not takes_model:  # (a hook without the model: the load under way's)
                model = self._pending
            if model is not None and self._pending is model:  # the load's own call (after preprocess_model)
                self._pending = None
                self._conversions = [copy.copy(t) for t in weight_conversions]  # (before the loader uses them)
                self._install_shells(model, load_renamer(model, transforms=weight_conversions))
            return weight_conversions

        def _install_shells(self, model, rename) -> None:
            """Swap each listed layer of ``model`` for an empty :class:`_Shell` whose buffers transformers fills,
            after checking the layer, and the checkpoint's tensors of it where the shard headers were read."""
            keys, listed = self._keys, self.quantization_config.sparse_modules
            self._names = self._module_names(model, rename)
            for fqn, meta in listed.items():
                name = self._names[fqn]
                if name is None:
                    continue
                lin = model.get_submodule(name)
                if not isinstance(lin, nn.Linear):
                    raise FormatError(f"config.json lists sparse layer '{fqn}' but it is a {type(lin).__name__}, "
                                      "not a linear layer")
                m, k = meta["shape"]
                if (lin.out_features, lin.in_features) != (m, k):
                    raise FormatError(f"sparse layer '{fqn}' is {m}x{k} in config.json's sparse_modules but the "
                                      f"model built from config.json has {lin.out_features}x{lin.in_features}")
                arrays = [f"{fqn}.weight_{n}" for n in FORMATS[meta["format"]]._arrays]
                if keys is not None:  # transformers would fill a missing tensor with garbage: refuse it here
                    bias = [f"{fqn}.bias"] if lin.bias is not None else []
                    for key in arrays + bias:
                        if key not in keys:
                            raise FormatError(f"{self._source}: tensor '{key}' of sparse layer '{fqn}' is missing "
                                              "(no shard holds it)")
                    if f"{fqn}.weight" in keys:  # (transformers would drop one of the two without a word)
                        raise FormatError(f"{self._source}: tensor '{fqn}.weight' is stored twice: dense, and "
                                          f"compressed ({', '.join(repr(a) for a in arrays)})")
                    # (transformers casts a tensor to the dtype of the buffer it fills: the stored one is checked here)
                    for key in arrays:
                        if keys[key].dtype != "I32" or len(keys[key].shape) != 1:
                            raise FormatError(f"{keys[key].file}: tensor '{key}' of sparse layer '{fqn}' has dtype "
                                              f"{keys[key].dtype} and shape {keys[key].shape}; expected a 1-D int32 "
                                              "tensor")
                    if bias and not keys[bias[0]].dtype.startswith(("F", "BF")):
                        raise FormatError(f"{keys[bias[0]].file}: tensor '{bias[0]}' of sparse layer '{fqn}' has dtype "
                                          f"{keys[bias[0]].dtype}; expected a floating-point tensor")
                shell = _Shell.zeros(k, m, bias=lin.bias is not None, fmt=FORMATS[meta["format"]],
                                     dtype=_DTYPES_BY_NAME[meta["dtype"]], device="meta")
                if keys is not None:  # the arrays' real lengths: transformers' shape checks then pass as for any tensor
                    for n in shell.weight_format._arrays:
                        shell._buffers["weight_" + n] = torch.empty(keys[f"{fqn}.weight_{n}"].shape,
                                                                    dtype=torch.int32, device="meta")
                    shell.sized = True
                parent, _, attr = name.rpartition(".")
                setattr(model.get_submodule(parent), attr, shell)
            self._keys = None  # (not needed after this)

        def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
            # Without the shard headers the shells' arrays have placeholder lengths (they depend on the weight's
            # nonzeros): transformers 5 then skips its shape check for them.
            owner, _, attr = param_name.rpartition(".")
            try:
                module = model.get_submodule(owner)
            except AttributeError:
                return False
            return isinstance(module, _Shell) and not module.sized and attr in ("weight_data", "weight_offsets")

        def _process_model_after_weight_loading(self, model, **kwargs):
            if self._pending is not None:  # (no shell was installed: the layers hold no tensor of the checkpoint)
                raise FormatError(f"{self._source}: this transformers read the tensors without calling the quantizer's "
                                  "update_weight_conversions, where flash-llm installs the sparse layers; load this "
                                  "checkpoint with flash_llm.from_pretrained")
            for fqn, meta in self.quantization_config.sparse_modules.items():
                name = self._names.get(fqn, fqn)
                if name is None:
                    continue
                shell = model.get_submodule(name)
                if not isinstance(shell, _Shell):
                    continue
                prefix = f"{fqn}.weight_"
                arrays = {prefix + n: getattr(shell, "weight_" + n) for n in shell.weight_format._arrays}
                for key, t in arrays.items():
                    if t.is_meta:
                        raise FormatError(f"{self._source}: tensor '{key}' of sparse layer '{fqn}' is missing")
                if shell.bias is not None and shell.bias.is_meta:
                    raise FormatError(f"{self._source}: tensor '{fqn}.bias' of sparse layer '{fqn}' is missing")
                meta_key = prefix + METADATA_KEY
                header = self._headers.get(meta_key)
                declared = json.dumps({**meta, "nnz": None})
                if header is not None:  # (FormatError naming the shard and the entry: not JSON, not an object)
                    shard = self._header_files.get(meta_key, self._source)
                    stored = parse_metadata(self._headers, prefix, f"{shard}: ")
                    for field in ("format", "version", "dtype", "shape"):
                        if stored.get(field) != meta.get(field):
                            raise FormatError(f"{self._source}: '{fqn}' has {field} {stored.get(field)!r} in the "
                                              f"shard header but {meta.get(field)!r} in config.json")
                cls = FORMATS[meta["format"]]
                w = cls.from_state(arrays, {meta_key: header or declared}, prefix=prefix, source=self._source)
                try:
                    new = SparseLinear(w, shell.bias)
                except (TypeError, ValueError) as e:
                    raise FormatError(f"{self._source}: sparse layer '{fqn}': {e}") from None
                parent, _, attr = name.rpartition(".")
                setattr(model.get_submodule(parent), attr, new)
            # the section in memory lists the model's own names (a base model read from a causal LM's checkpoint)
            listed = self.quantization_config.sparse_modules
            self.quantization_config.sparse_modules = {self._names.get(c, c): meta for c, meta in listed.items()
                                                       if self._names.get(c, c) is not None}
            give_quantizers(model, self)
            if self._source_dir is not None:  # (a save may not replace it: absolute, unlike config._name_or_path)
                from transformers import PreTrainedModel

                for sub in model.modules():  # (its base model too: a save of loaded.model may not replace it either)
                    if isinstance(sub, PreTrainedModel):
                        _remember_loaded_from(sub, self._source_dir,
                                              getattr(getattr(sub, "config", None), "_name_or_path", None))
            return model

        def get_state_dict_and_metadata(self, model, *args, **kwargs):
            refuse_mixed_sparse_dtypes(model)  # (a checkpoint no reader loads: refused before anything is written)
            state, sparse = _model.state_to_save(model)
            original = _SAVE_ORIGINAL_FORMAT.get()
            # (the load's conversions, key_mapping included, only where the save reverts them: with
            # save_original_format=False it stores the model's own names, which a plain from_pretrained reads back)
            conversions = self._conversions if original and getattr(model, "hf_quantizer", None) is self else None
            saved = saved_layer_names(model, sparse, original, conversions)  # (refuses before anything is written)
            section = {saved[fqn]: meta for fqn, meta in sparse_modules_section(model).items()}
            header = {f"{saved[fqn]}.weight_{METADATA_KEY}": json.dumps(m.weight.metadata())
                      for fqn, m in sparse.items()}
            dtype = _model_dtype(model, state)
            self.quantization_config.sparse_modules = section
            self.quantization_config.flash_llm_version = __version__
            self.quantization_config.__dict__.pop("dtype", None)
            if dtype is not None:
                name = str(dtype).removeprefix("torch.")
                model.config.dtype = dtype  # (transformers 5.25 then overwrites it with its model.dtype)
                first = next((p.dtype for p in model.parameters() if p.is_floating_point()), dtype)
                declared = f"config.json says {name}"
                if first != dtype:  # transformers writes config.json's dtype from the first parameter: name ours here
                    self.quantization_config.dtype = name
                    declared = (f"config.json's quantization_config.dtype says {name} (transformers writes the first "
                                f"parameter's, {str(first).removeprefix('torch.')}, as config.json's dtype)")
                message = mixed_dtype_warning(state, dtype, declared, f"cast the model with model.to({dtype}) first "
                                              "(transformers refuses .half() on it)")
                if message is not None:
                    warnings.warn(message, UserWarning, stacklevel=3)
            return state, header

        def _dequantize(self, model, dtype=None):
            """``model.dequantize()`` (transformers' ``dequantize`` calls this, then ``remove_quantization_config``):
            every SparseLinear of ``model`` becomes the ``nn.Linear`` of its weight and bias
            (:func:`flash_llm.engine.expand_sparse_`), its parameters requiring grad as the input embedding's do.
            ``dtype`` (transformers passes ``config.dtype`` where none is given): every parameter in the sparse layers'
            dtype ends in it, not only the new layers' (a forward would mix dtypes); a parameter the model keeps in
            another dtype (an fp32 MoE router) and the buffers (a rotary table) stay as they are.  The transformers
            models inside ``model`` that carry flash-llm's quantizer (its base model ``model.model``) lose it here, as
            transformers then removes ``model``'s: ``.half()`` works, and a save writes a dense checkpoint without a
            quantization section.  Refused (ValueError) before any layer is changed: a layer that carries what the
            dense one would drop (hooks, a ``forward`` of its own, members beyond its arrays and bias), one module at
            two paths (shared), a cast to ``dtype`` that turns values into inf.  A failure while expanding (out of
            memory) puts the sparse layers back."""
            from transformers import PreTrainedModel

            from ..engine import _kept_for_hooks, expand_sparse_

            if isinstance(dtype, str):
                dtype = config_dtype({"dtype": dtype}) or dtype  # (a name of no dtype: refused below)
            if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
                raise ValueError(f"dtype must be a floating-point torch dtype, got {dtype!r}")
            paths: dict[SparseLinear, list[str]] = {}  # (every path of each layer, in named_modules' order)
            for p, m in model.named_modules(remove_duplicate=False):
                if isinstance(m, SparseLinear):
                    paths.setdefault(m, []).append(p)
            layers = [(ps[0], m) for m, ps in paths.items()]
            shared = next((ps for ps in paths.values() if len(ps) > 1), None)
            if shared is not None:
                raise ValueError(f"cannot dequantize {type(model).__name__}: one sparse layer stands at "
                                 f"{' and '.join(map(repr, shared))} (shared), which one dense layer per path would "
                                 "untie; nothing was changed")
            hooked: dict[str, str] = {}
            for path, m in layers:
                _kept_for_hooks(m, path, hooked)
            if hooked:
                path, what = next(iter(hooked.items()))
                raise ValueError(f"cannot dequantize {type(model).__name__}: sparse layer '{path}' carries {what}, "
                                 f"which a dense layer in its place would drop ({len(hooked)} such layer(s)); "
                                 "remove them first; nothing was changed")
            sparse_dtypes = {m.weight.dtype for _, m in layers}  # (the model's dtype: what dtype= recasts)
            if dtype is not None:  # (a cast that overflows is refused before anything is changed)
                hints = ("dequantize in bfloat16 (model.dequantize(dtype=torch.bfloat16))",
                         "dequantize in a dtype that holds these values")
                target = f"{dtype} (dequantize's dtype)"
                for path, m in layers:
                    if m.weight.dtype != dtype:
                        cast_checked("dequantize", f"{path}.weight", m.weight.to_dense(), dtype, target=target,
                                     hints=hints)
                        if m.bias is not None:  # (a buffer: not among the parameters below)
                            cast_checked("dequantize", f"{path}.bias", m.bias, dtype, target=target, hints=hints)
                for name, t in model.named_parameters():
                    if t.dtype in sparse_dtypes and t.dtype != dtype:
                        cast_checked("dequantize", name, t, dtype, target=target, hints=hints)
            try:  # (a SparseLinear holds buffers only: the new weights take the embedding's requires_grad)
                grad = bool(model.get_input_embeddings().weight.requires_grad)
            except (AttributeError, NotImplementedError):  # (no input embedding: as any parameter of the model)
                grad = any(p.requires_grad for p in model.parameters())
            try:
                expanded, _ = expand_sparse_(model)
                for path in expanded:
                    lin = model.get_submodule(path)
                    lin.__dict__.pop("_delta_rows_paired", None)  # (a plain layer: no engine makes it sparse again)
                    lin.requires_grad_(grad)
            except BaseException:
                for path, m in layers:  # (those expanded before the failure: back to the sparse layer)
                    model.set_submodule(path, m)
                raise
            if dtype is not None:  # (in place: a tied lm_head stays the embedding's; transformers' .to would refuse)
                with torch.no_grad():
                    for t in model.parameters():
                        if t.dtype in sparse_dtypes and t.dtype != dtype:
                            t.data = t.data.to(dtype)
            for sub in model.modules():
                if sub is not model and isinstance(sub, PreTrainedModel) and \
                        isinstance(getattr(sub, "hf_quantizer", None), type(self)):
                    sub.hf_quantizer.remove_quantization_config(sub)
            return model

        def is_serializable(self, *args, **kwargs):
            return True

        @property
        def is_trainable(self):
            return False

    FlashLLMConfig.__module__ = FlashLLMHfQuantizer.__module__ = __name__
    # (pickle finds classes by module and qualified name: the module's __getattr__ gives these)
    FlashLLMConfig.__qualname__, FlashLLMHfQuantizer.__qualname__ = "FlashLLMConfig", "FlashLLMHfQuantizer"
    return FlashLLMConfig, FlashLLMHfQuantizer

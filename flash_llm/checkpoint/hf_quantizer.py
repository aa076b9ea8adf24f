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
validated in full (a corrupt or missing array raises, naming the layer and tensor).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from .. import __version__
from ..formats import FORMATS, FormatError
from ..formats._base import METADATA_KEY, _DTYPES_BY_NAME
from ..nn import SparseLinear
from . import _files, _model
from .pretrained import FORMAT_VERSION, QUANT_METHOD, _parse_section, header_metadata, sparse_modules_section

_AUTO = "transformers.quantizers.auto"


def register() -> None:
    """Register flash-llm's quantization config and quantizer with transformers 5 (idempotent)."""
    import transformers
    from transformers.quantizers import auto

    major = transformers.__version__.split(".")[0]
    if not major.isdigit() or int(major) < 5:
        raise ImportError(f"flash-llm's transformers integration needs transformers >= 5 (found "
                          f"{transformers.__version__})")
    if QUANT_METHOD in auto.AUTO_QUANTIZER_MAPPING:
        return
    config_cls, quantizer_cls = _classes()
    auto.register_quantization_config(QUANT_METHOD)(config_cls)
    auto.register_quantizer(QUANT_METHOD)(quantizer_cls)


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Runs :func:`register` right after ``transformers.quantizers.auto`` is first imported."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _AUTO:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _uninstall()
            _register_or_warn()

        spec.loader.exec_module = exec_then_register
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
    if _AUTO in sys.modules:
        _register_or_warn()
    elif _model.transformers_available() and _finder not in sys.meta_path:
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
            self._source = "the checkpoint"

        def _dtype(self) -> torch.dtype | None:
            dtypes = {_DTYPES_BY_NAME[m["dtype"]] for m in self.quantization_config.sparse_modules.values()}
            return dtypes.pop() if len(dtypes) == 1 else None

        def update_dtype(self, dtype):
            sparse = self._dtype()
            if sparse is not None and dtype is not None and dtype != sparse:
                raise ValueError(f"this flash-llm checkpoint's sparse layers are {sparse} (fixed when they were "
                                 f"compressed); load it with dtype={sparse} or dtype='auto', not {dtype}")
            return sparse if sparse is not None else dtype

        def validate_environment(self, *args, **kwargs):
            return None

        def _read_headers(self, model, checkpoint_files) -> dict[str, tuple[int, ...]] | None:
            """Tensor shapes by name and flash-llm header metadata of the checkpoint's shards (headers only), or
            None when transformers does not say where they are and the model's path is not a local directory."""
            files = [Path(f) for f in (checkpoint_files or []) if str(f).endswith(".safetensors")]
            if not files:
                where = getattr(model.config, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
                if not where or not Path(where).is_dir():
                    return None
                files = _files.open_checkpoint(where).shards
            self._source = str(files[0].parent)
            keys: dict[str, tuple[int, ...]] = {}
            for f in files:
                shard = _files.Shard(f)
                keys.update({k: shard.info(k).shape for k in shard.keys})
                self._headers.update({k: v for k, v in shard.metadata.items() if k.endswith("_" + METADATA_KEY)})
            return keys

        def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
            keys = self._read_headers(model, checkpoint_files)
            listed = self.quantization_config.sparse_modules
            unlisted = sorted({k.rpartition(".")[0] for k in (keys or {}) if k.endswith(".weight_data")} - set(listed))
            if unlisted:  # (transformers would leave such a layer's weight as initialized, with a warning only)
                raise FormatError(f"{self._source}: '{unlisted[0]}' is stored compressed (its weight_data is in the "
                                  "shards) but config.json's quantization_config.sparse_modules does not list it"
                                  f"{f' ({len(unlisted)} such layers)' if len(unlisted) > 1 else ''}")
            for fqn, meta in self.quantization_config.sparse_modules.items():
                try:
                    lin = model.get_submodule(fqn)
                except AttributeError:
                    raise FormatError(f"config.json lists sparse layer '{fqn}' but {type(model).__name__} has no "
                                      "such module (wrong config.json)") from None
                if not isinstance(lin, nn.Linear):
                    raise FormatError(f"config.json lists sparse layer '{fqn}' but it is a {type(lin).__name__}, "
                                      "not a linear layer")
                m, k = meta["shape"]
                if (lin.out_features, lin.in_features) != (m, k):
                    raise FormatError(f"sparse layer '{fqn}' is {m}x{k} in config.json's sparse_modules but the "
                                      f"model built from config.json has {lin.out_features}x{lin.in_features}")
                if keys is not None:  # transformers would fill a missing tensor with garbage: refuse it here
                    need = [f"{fqn}.weight_{n}" for n in FORMATS[meta["format"]]._arrays]
                    need += [f"{fqn}.bias"] if lin.bias is not None else []
                    for key in need:
                        if key not in keys:
                            raise FormatError(f"{self._source}: tensor '{key}' of sparse layer '{fqn}' is missing "
                                              "(no shard holds it)")
                shell = _Shell.zeros(k, m, bias=lin.bias is not None, fmt=FORMATS[meta["format"]],
                                     dtype=_DTYPES_BY_NAME[meta["dtype"]], device="meta")
                if keys is not None:  # the arrays' real lengths: transformers' shape checks then pass as for any tensor
                    for n in shell.weight_format._arrays:
                        shell._buffers["weight_" + n] = torch.empty(keys[f"{fqn}.weight_{n}"], dtype=torch.int32,
                                                                    device="meta")
                    shell.sized = True
                parent, _, name = fqn.rpartition(".")
                setattr(model.get_submodule(parent), name, shell)
            return model

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
            for fqn, meta in self.quantization_config.sparse_modules.items():
                shell = model.get_submodule(fqn)
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
                if header is not None:
                    stored = json.loads(header)
                    for field in ("format", "version", "dtype", "shape"):
                        if stored.get(field) != meta.get(field):
                            raise FormatError(f"{self._source}: '{fqn}' has {field} {stored.get(field)!r} in the "
                                              f"shard header but {meta.get(field)!r} in config.json")
                cls = FORMATS[meta["format"]]
                w = cls.from_state(arrays, {meta_key: header or declared}, prefix=prefix, source=self._source)
                new = SparseLinear(w, shell.bias)
                parent, _, name = fqn.rpartition(".")
                setattr(model.get_submodule(parent), name, new)
            return model

        def get_state_dict_and_metadata(self, model, *args, **kwargs):
            state, sparse = _model.state_to_save(model)
            self.quantization_config.sparse_modules = sparse_modules_section(model)
            self.quantization_config.flash_llm_version = __version__
            return state, header_metadata(sparse)

        def is_serializable(self, *args, **kwargs):
            return True

        @property
        def is_trainable(self):
            return False

    FlashLLMConfig.__module__ = FlashLLMHfQuantizer.__module__ = __name__
    return FlashLLMConfig, FlashLLMHfQuantizer

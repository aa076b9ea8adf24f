"""Models that ship inside the package, loadable by name with no network::

    model = flash_llm.bundled.load("tiny-shakespeare")            # fp32 on CPU by default
    model = flash_llm.bundled.load("tiny-shakespeare", dtype=torch.float16, device="cuda")

``tiny-shakespeare`` is a small byte-level Llama (Hugging Face ``LlamaForCausalLM`` names and
``config.json`` fields; vocabulary = the 256 bytes, see :mod:`flash_llm.data`) trained from scratch on
the training split of tinyshakespeare by ``scripts/train_bundled.py``.  Its directory is a plain dense
Hugging Face checkpoint (``transformers`` loads it as it is): ``config.json``, with a ``"flash_llm"``
section recording the tokenizer, the data split and how the weights were trained (command, card, time,
steps, validation loss), and ``model.safetensors`` (fp16).  It is the default model of ``flash-llm demo``
and the testbed of ``benchmarks/accuracy.py``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

__all__ = ["NAMES", "path", "load", "load_dir", "build_model", "save_model_dir", "is_byte_level"]

_HERE = Path(__file__).parent
#: Names of the bundled models.
NAMES = ("tiny-shakespeare",)
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
#: ``config["flash_llm"]["tokenizer"]`` of a model that reads bytes (:mod:`flash_llm.data`); a declared tokenizer
#: whose name starts with it (``"bytes (UTF-8)"``) is byte-level too (:func:`is_byte_level`).
BYTE_TOKENIZER = "bytes"
#: the files a Hugging Face tokenizer directory holds one of at least (a directory with one uses its own tokenizer)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def path(name: str = "tiny-shakespeare") -> Path:
    """The directory of bundled model ``name`` (``config.json`` + ``model.safetensors``)."""
    if name not in NAMES:
        raise ValueError(f"no bundled model named {name!r}; bundled: {', '.join(NAMES)}")
    d = _HERE / name
    for f in (CONFIG_FILE, WEIGHTS_FILE):
        if not (d / f).is_file():
            raise FileNotFoundError(f"bundled model {name!r} is incomplete: {d / f} is missing (reinstall flash-llm, "
                                    "or train it with scripts/train_bundled.py)")
    return d


def is_byte_level(config: dict, directory: str | os.PathLike | None = None) -> bool:
    """Whether the model of the ``config.json`` dict ``config`` reads bytes (flash-llm's byte tokenizer: token id =
    byte value, :mod:`flash_llm.data`): its ``"flash_llm"`` section declares a tokenizer whose name starts with
    ``"bytes"`` (``{"tokenizer": "bytes"}``, as the bundled model), or its vocabulary has 256 tokens.  With
    ``directory`` (the model's), a directory that holds Hugging Face tokenizer files (:data:`TOKENIZER_FILES`) is
    not: its own tokenizer wins.  The one rule of ``flash-llm generate``, ``demo --model`` and ``prune``."""
    if directory is not None and any((Path(directory) / f).is_file() for f in TOKENIZER_FILES):
        return False
    section = config.get("flash_llm")
    declared = section.get("tokenizer") if isinstance(section, dict) else None
    if isinstance(declared, str) and declared.startswith(BYTE_TOKENIZER):
        return True
    return config.get("vocab_size") == 256


def build_model(cfg: dict, *, dtype: torch.dtype = torch.float32, device="cpu", seed: int | None = None) -> nn.Module:
    """A randomly initialised Llama (:mod:`flash_llm.models`) for the ``config.json`` dict ``cfg`` (Hugging
    Face ``LlamaForCausalLM`` fields and state-dict names), in eval mode; ``model(tokens int64 [B, T])``
    returns logits ``[B, T, vocab_size]``.  ``seed`` seeds the initialisation."""
    from ..models import from_config

    return from_config({k: v for k, v in cfg.items() if k != "flash_llm"}, dtype=dtype, device=device, seed=seed)


def load_dir(directory: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device="cpu",
             progress: bool = False) -> nn.Module:
    """A model directory (any checkpoint :func:`flash_llm.from_pretrained` reads: dense, sparse-bitmask or
    flash-llm; Llama or OPT) as a **dense** :mod:`flash_llm.models` model in ``dtype`` on ``device``, eval
    mode.  Missing or unreadable files raise ``FileNotFoundError`` / :class:`flash_llm.FormatError`
    naming the file."""
    from ..checkpoint import from_pretrained

    return from_pretrained(directory, dtype=dtype, device=device, sparsify=False, backend="flash", progress=progress)


def load(name: str = "tiny-shakespeare", *, dtype: torch.dtype = torch.float32, device="cpu") -> nn.Module:
    """Bundled model ``name`` (see :data:`NAMES`) in ``dtype`` (weights are stored in fp16) on ``device``,
    in eval mode.  ``model(tokens int64 [B, T])`` gives logits ``[B, T, 256]``."""
    return load_dir(path(name), dtype=dtype, device=device)


def save_model_dir(model: nn.Module, cfg: dict, out: str | os.PathLike, *, dtype: torch.dtype = torch.float16,
                   overwrite: bool = False) -> Path:
    """Write ``model`` as a plain dense Hugging Face checkpoint directory ``out``: ``config.json`` (``cfg`` with
    ``"dtype"`` and ``"torch_dtype"`` set to ``dtype``, as :func:`flash_llm.save_pretrained` sets them, and without
    its ``quantization_config`` / ``compression_config``: the weights are written dense) and ``model.safetensors``
    (the state dict's floating-point tensors in ``dtype``, a floating-point dtype).  A cast that turns finite values
    into inf (fp16 holds at most 65504) is refused before anything is written (:class:`~flash_llm.nn.LossyCastError`,
    a ``ValueError`` naming the tensor): a model run on inf weights computes NaN silently.

    A :class:`~flash_llm.SparseLinear` layer is written as its dense weight (and bias), so a pruned and
    sparsified model saves as the dense checkpoint transformers and :func:`load_dir` read; tied tensors (a tied
    ``lm_head``) are written once, under their first name, as transformers writes them.  Merged projections are
    refused (unmerge them first, :func:`flash_llm.models.unmerge_projections`), and so is a tensor-parallel model
    (:func:`flash_llm.parallel.tensor_parallel_`, :func:`flash_llm.parallel.load_tensor_parallel`: each rank holds
    only its slices), as by :func:`flash_llm.save_pretrained`; both before anything is written (``ValueError``).

    Atomic: both files go to a temporary directory beside ``out`` that replaces ``out`` at the end, so an
    interrupted call leaves ``out`` as it was.  Raises ``FileExistsError`` when ``out`` exists, unless
    ``overwrite``."""
    from ..checkpoint._files import atomic_directory, save_safetensors
    from ..checkpoint._model import state_to_save
    from ..checkpoint.pretrained import _refuse_merged, _refuse_tensor_parallel, cast_checked

    from ..models import MODEL_DTYPES

    if not isinstance(dtype, torch.dtype) or dtype not in MODEL_DTYPES:  # (float8: no overflow check, no reader)
        raise TypeError(f"dtype must be a floating-point torch.dtype (torch.float16, torch.bfloat16, torch.float32), "
                        f"got {dtype!r}")
    out = Path(out)
    _refuse_tensor_parallel(model)  # (its slices under '<proj>.linear.weight' names: a checkpoint nothing loads)
    _refuse_merged(model)
    saved, sparse = state_to_save(model)  # (tied tensors once; SparseLinear's arrays, without its extra state)
    state = {}
    for k, v in saved.items():
        owner, _, attr = k.rpartition(".")
        if owner in sparse and attr.startswith("weight_"):  # a compressed array: the layer's dense weight instead
            if f"{owner}.weight" not in state:
                state[f"{owner}.weight"] = sparse[owner].to_dense()
            continue
        state[k] = v
    # Copies (a tensor already in dtype on the CPU would otherwise be the model's own, shared with its ties); a cast
    # that overflows to inf is refused by the loaders' own check (checkpoint.pretrained.cast_checked), and nonzeros
    # flushed to zero are rounding, as there.
    hints = ("pass dtype=torch.bfloat16, which has float32's range", "pass a dtype that holds these values")
    cast = {}
    for k, v in state.items():
        if not v.is_floating_point():
            continue
        src = v.detach().to("cpu")
        c = cast_checked("save_model_dir", k, src, dtype, target=f"dtype {dtype}", hints=hints)
        cast[k] = (c.clone() if c is src else c).contiguous()
    state = cast
    # (config.json as save_pretrained writes it: readers take "dtype" first, "torch_dtype" is the older key; the
    # quantization / compression sections of a sparse source describe tensors this dense checkpoint does not hold)
    name = str(dtype).removeprefix("torch.")
    cfg = {k: v for k, v in cfg.items() if k not in ("quantization_config", "compression_config")}
    cfg.update(dtype=name, torch_dtype=name)
    with atomic_directory(out, overwrite) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        save_safetensors(state, tmp / WEIGHTS_FILE, {"format": "pt"})
    return out

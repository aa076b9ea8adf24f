"""Models that ship inside the package, loadable by name with no network::

    model = flash_llm.bundled.load("tiny-shakespeare")            # fp32 on CPU by default
    model = flash_llm.bundled.load("tiny-shakespeare", dtype=torch.float16, device="cuda")

``tiny-shakespeare`` is a small byte-level Llama (Hugging Face ``LlamaForCausalLM`` names and
``config.json`` fields; vocabulary = the 256 bytes, see :mod:`flash_llm.data`) trained from scratch on
the training split of tinyshakespeare by ``scripts/train_bundled.py``.  Its directory holds
``config.json`` (with a ``"flash_llm"`` section recording the tokenizer, the data split and how the
weights were trained: command, card, time, steps, validation loss) and ``model.safetensors`` (fp16).
It is the default model of ``flash-llm demo`` and the testbed of ``benchmarks/accuracy.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

__all__ = ["NAMES", "path", "read_config", "load", "build_model", "save_model_dir"]

_HERE = Path(__file__).parent
#: Names of the bundled models.
NAMES = ("tiny-shakespeare",)
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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


def read_config(directory: str | os.PathLike) -> dict:
    """``config.json`` of a model directory as a dict; clear errors for a missing or unreadable file."""
    f = Path(directory) / CONFIG_FILE
    try:
        text = f.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{f} does not exist (a model directory holds config.json and "
                                f"{WEIGHTS_FILE})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise OSError(f"cannot read {f}: {e}") from None
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{f} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{f} must hold a JSON object, got {type(cfg).__name__}")
    return cfg


def _check_llama_config(cfg: dict, where: str) -> None:
    arch = cfg.get("architectures") or []
    if cfg.get("model_type") != "llama" and "LlamaForCausalLM" not in arch:
        raise ValueError(f"{where}: model_type is {cfg.get('model_type')!r} (architectures {arch}); the bundled-model "
                         "loader builds Llama models only")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if not isinstance(cfg.get(k), int)]
    if missing:
        raise ValueError(f"{where}: missing or non-integer field(s) {missing}")


def build_model(cfg: dict, *, dtype: torch.dtype = torch.float32, device="cpu", seed: int | None = None) -> nn.Module:
    """A randomly initialised Llama (:mod:`flash_llm.models`) for the ``config.json`` dict ``cfg`` (Hugging
    Face ``LlamaForCausalLM`` fields and state-dict names), in eval mode; ``model(tokens int64 [B, T])``
    returns logits ``[B, T, vocab_size]``.  ``seed`` seeds the initialisation."""
    from ..models import from_config

    _check_llama_config(cfg, "config")
    return from_config({k: v for k, v in cfg.items() if k != "flash_llm"}, dtype=dtype, device=device, seed=seed)


def _load_state(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    f = directory / WEIGHTS_FILE
    if not f.is_file():
        raise FileNotFoundError(f"{f} does not exist (a model directory holds {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        return load_file(str(f))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"cannot read {f}: {e}") from None


def load_dir(directory: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device="cpu") -> nn.Module:
    """A Llama model from a directory with ``config.json`` and one ``model.safetensors`` (the layout of the
    bundled models and of :func:`save_model_dir`), in ``dtype`` on ``device``, in eval mode.  Every
    tensor of the model must be in the file with its shape, and nothing else (errors name the tensors)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory {str(directory)!r} does not exist")
    cfg = read_config(directory)
    _check_llama_config(cfg, str(directory / CONFIG_FILE))
    state = _load_state(directory)
    model = build_model(cfg, dtype=dtype, device=device)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{directory / WEIGHTS_FILE} does not match {CONFIG_FILE}: missing {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                         f"{' ...' if len(unexpected) > 5 else ''}")
    for k, e in expected.items():  # in model order
        if state[k].shape != e.shape:
            raise ValueError(f"{directory / WEIGHTS_FILE}: tensor {k!r} has shape {tuple(state[k].shape)}, "
                             f"{CONFIG_FILE} needs {tuple(e.shape)}")
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()})
    return model.eval()


def load(name: str = "tiny-shakespeare", *, dtype: torch.dtype = torch.float32, device="cpu") -> nn.Module:
    """Bundled model ``name`` (see :data:`NAMES`) in ``dtype`` (weights are stored in fp16) on ``device``,
    in eval mode.  ``model(tokens int64 [B, T])`` gives logits ``[B, T, 256]``."""
    return load_dir(path(name), dtype=dtype, device=device)


def save_model_dir(model: nn.Module, cfg: dict, out: str | os.PathLike, *, dtype: torch.dtype = torch.float16,
                   overwrite: bool = False) -> Path:
    """Write ``config.json`` (``cfg`` plus ``"torch_dtype"``) and ``model.safetensors`` (the model's state
    dict in ``dtype``) to directory ``out``, atomically: both go to a temporary directory beside ``out``
    that is renamed to ``out`` at the end, so an interrupted call leaves no partial ``out``.

    Raises ``FileExistsError`` when ``out`` exists, unless ``overwrite`` (then the old directory is replaced,
    also atomically: it is moved aside first and deleted only after the new one is in place).
    """
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--force) to replace it")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()
             if v.is_floating_point()}
    cfg = dict(cfg, torch_dtype=str(dtype).removeprefix("torch."))
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result gets the usual permissions
        for f in (CONFIG_FILE, WEIGHTS_FILE):
            os.chmod(tmp / f, 0o666 & ~umask)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "d")
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out

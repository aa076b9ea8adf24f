"""Compact OPT and Llama-family models that load Hugging Face weights by name, and their configs.

::

    from flash_llm.models import ModelConfig, from_config

    cfg = ModelConfig.from_hf("path/to/config.json")        # or a dict, or presets: preset("llama-3-8b")
    model = from_config(cfg, dtype=torch.float16, device="meta")
    model.load_state_dict(hf_state_dict, assign=True)       # keys as in transformers' *ForCausalLM
    logits = model(input_ids)                               # [B, T] int64 -> [B, T, vocab]
    flash_llm.sparsify_(model)                              # projections -> SparseLinear

The modules' ``state_dict()`` keys are exactly those of transformers' ``LlamaForCausalLM`` and
``OPTForCausalLM``.  :mod:`flash_llm.models.synthetic` builds the real shapes with random pruned
weights, compressed layer by layer; :class:`flash_llm.engine.Engine` runs them.
"""

from __future__ import annotations

import torch
from torch import nn

from ._common import Attend, CausalLM, KVCache
from ._fused import set_fused
from ._merge import MergedLinear, merge_projections, unmerge_projections
from .config import DEFAULT_INIT_STD, PRESETS, ModelConfig, preset
from .llama import LlamaForCausalLM
from .opt import OPTForCausalLM

MODEL_CLASSES = {"llama": LlamaForCausalLM, "opt": OPTForCausalLM}
INIT_STD = DEFAULT_INIT_STD  # transformers' initializer_range default for both families (from_config: the config's)

__all__ = ["ModelConfig", "from_config", "preset", "PRESETS", "LlamaForCausalLM", "OPTForCausalLM", "CausalLM",
           "set_fused", "merge_projections", "unmerge_projections", "MergedLinear",
           "KVCache", "Attend", "init_weights_"]


def as_config(config) -> ModelConfig:
    """``config`` as a :class:`ModelConfig`: itself, or read with :meth:`ModelConfig.from_hf` from a dict,
    a path to ``config.json`` (or its folder) or a transformers config."""
    return config if isinstance(config, ModelConfig) else ModelConfig.from_hf(config)


@torch.no_grad()
def init_weights_(module: nn.Module, generator: torch.Generator | None = None, std: float = INIT_STD) -> None:
    """Initialize ``module``'s own parameters in place as transformers does: ``nn.Linear`` and ``nn.Embedding``
    weights normal(0, ``std``) (an embedding's padding row zero), biases zero, norm weights one (LayerNorm
    biases zero).  Recurses into children."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            m.weight.normal_(0.0, std, generator=generator)
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, nn.Embedding):
            m.weight.normal_(0.0, std, generator=generator)
        elif isinstance(m, nn.LayerNorm):
            if m.weight is not None:
                m.weight.fill_(1.0)
                m.bias.zero_()
        elif type(m).__name__ == "LlamaRMSNorm":
            m.weight.fill_(1.0)
    for m in module.modules():  # (after every draw: a head tied to an embedding redraws the shared matrix)
        if isinstance(m, nn.Embedding) and m.padding_idx is not None:
            m.weight[m.padding_idx].zero_()


#: The dtypes a model is built and loaded in (:func:`from_config`, :func:`flash_llm.from_pretrained`,
#: :func:`flash_llm.parallel.load_tensor_parallel`).  Other floating dtypes (float8) have no random init, ``isfinite``
#: or ``count_nonzero`` kernels in torch: until session 87 they failed deep inside, after a checkpoint's whole read.
MODEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def from_config(config, *, dtype: torch.dtype = torch.float16, device="cpu", seed: int | None = None) -> CausalLM:
    """Build the causal LM of ``config`` with random weights (transformers' initialization: linear and embedding
    weights normal(0, ``config.initializer_range``), HF's ``initializer_range`` / OPT's ``init_std``, 0.02 unless set).

    Args:
        config: a :class:`ModelConfig`, a Hugging Face config dict, a path to ``config.json`` (or its
            folder), or a transformers config object.
        dtype: parameter dtype (``torch.float16``, ``torch.bfloat16`` or ``torch.float32``).
        device: where to allocate.  ``"meta"`` allocates nothing (no initialization): load weights with
            ``model.load_state_dict(state_dict, assign=True)``.
        seed: seeds the initialization (default: torch's global generator).

    Returns:
        :class:`LlamaForCausalLM` or :class:`OPTForCausalLM` in eval mode; ``model.config`` is the
        :class:`ModelConfig`.
    """
    cfg = as_config(config)
    if not isinstance(dtype, torch.dtype) or dtype not in MODEL_DTYPES:
        raise TypeError(f"dtype must be torch.float16, torch.bfloat16, torch.float32 or torch.float64, got {dtype!r}")
    device = torch.device(device)
    model = MODEL_CLASSES[cfg.family](cfg, device="meta", dtype=dtype)
    if device.type != "meta":
        model.to_empty(device=device)
        model.tie_weights()
        gen = None
        if seed is not None:
            gen = torch.Generator(device=device).manual_seed(seed)
        init_weights_(model, gen, std=cfg.initializer_range)
    return model.eval()

"""Shared helpers of the checkpoint tests: tiny OPT / Llama models built by transformers itself, pruned here,
saved by transformers' own ``save_pretrained`` (safetensors, sharded small so the index file is used), and
small readers/writers of safetensors files used to damage checkpoints on purpose."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import max_abs_err, ulp

VOCAB = 97
SHARD = "24KB"  # a tiny model of ~200 KB is split into about ten shards
LOW_SPARSITY_LAYER = {"llama": "model.layers.1.self_attn.v_proj", "opt": "model.decoder.layers.1.self_attn.v_proj"}
EMBED = {"llama": "model.embed_tokens.weight", "opt": "model.decoder.embed_tokens.weight"}


def gpt_neox_model():
    """A tiny transformers ``GPTNeoXForCausalLM`` (fp16, its ``lm_head`` saved as ``embed_out``), pruned by magnitude
    to 60 % zeros."""
    import transformers

    from flash_llm.prune import magnitude_prune_

    torch.manual_seed(0)
    cfg = transformers.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                     num_attention_heads=4, max_position_embeddings=64)
    model = transformers.GPTNeoXForCausalLM(cfg).half().eval()
    magnitude_prune_(model, 0.6)
    return model


def hf_model(family: str, dtype=torch.float16, seed: int = 0, vocab: int = VOCAB, tie: bool | None = None):
    """A transformers ``LlamaForCausalLM`` / ``OPTForCausalLM`` with random weights, pruned by magnitude: every
    projection to 60 % zeros except :data:`LOW_SPARSITY_LAYER` (10 %); ``lm_head`` untouched."""
    import transformers

    from flash_llm.prune import magnitude_prune_

    torch.manual_seed(seed)
    if family == "llama":
        kw = {} if tie is None else {"tie_word_embeddings": tie}
        cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                       initializer_range=0.1, **kw)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.OPTConfig(vocab_size=vocab, hidden_size=64, ffn_dim=96, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=64, init_std=0.1, dropout=0.0)
        model = transformers.OPTForCausalLM(cfg)
    model = model.to(dtype).eval()
    low = LOW_SPARSITY_LAYER[family]
    magnitude_prune_(model, 0.6, filter_fn=lambda m, n: n not in ("lm_head", low))
    magnitude_prune_(model, 0.1, filter_fn=lambda m, n: n == low)
    return model


def save_hf(model, path: Path, shard: str = SHARD) -> Path:
    model.save_pretrained(path, max_shard_size=shard)
    return path


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    return getattr(out, "logits", out)


def assert_logits_as_accurate_as_torch(out: torch.Tensor, hf_model_, ids: torch.Tensor) -> None:
    """``err(out vs fp64) <= 2 * err(transformers' own dense model in out's dtype vs fp64) + 1 ulp``: the fp64
    reference runs transformers' model on the same (already rounded) weights."""
    ref64 = logits(copy.deepcopy(hf_model_).double(), ids).double()
    own = logits(hf_model_, ids)
    assert out.shape == ref64.shape and out.dtype == own.dtype
    err, err_torch = max_abs_err(out, ref64), max_abs_err(own, ref64)
    tol = 2 * err_torch + ulp(out.dtype, float(ref64.abs().max()))
    assert err <= tol, f"max |logits - fp64| = {err:.3g} > {tol:.3g} (transformers' own error {err_torch:.3g})"


def shards(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.suffix == ".safetensors")


def shard_of(path: Path, tensor: str) -> Path:
    index = path / "model.safetensors.index.json"
    if index.exists():
        return path / json.loads(index.read_text())["weight_map"][tensor]
    return path / "model.safetensors"


def read_shard(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(file), "pt") as f:
        return {k: f.get_tensor(k).clone() for k in f.keys()}, dict(f.metadata() or {})


def rewrite_shard(file: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    save_file(tensors, str(file), metadata=metadata)


def edit_json(file: Path, fn) -> None:
    d = json.loads(file.read_text())
    fn(d)
    file.write_text(json.dumps(d))


def edit_tensor(path: Path, name: str, fn) -> Path:
    """Replace tensor ``name`` of checkpoint ``path`` by ``fn(tensor)`` (``None`` deletes it, from the index
    too); return the shard that held it."""
    file = shard_of(path, name)
    tensors, meta = read_shard(file)
    new = fn(tensors[name])
    if new is None:
        del tensors[name]
        index = path / "model.safetensors.index.json"
        if index.exists():
            edit_json(index, lambda d: d["weight_map"].pop(name))
    else:
        tensors[name] = new
    rewrite_shard(file, tensors, meta)
    return file


def one_arg_hook(monkeypatch) -> None:
    """transformers 5.17's quantizer API (the H100 image's): the base ``update_weight_conversions`` hook without the
    model, and flash-llm's called with the conversions alone (sessions 84-85)."""
    from transformers.quantizers.base import HfQuantizer

    from flash_llm.checkpoint import hf_quantizer

    monkeypatch.setattr(HfQuantizer, "update_weight_conversions", lambda self, weight_conversions: weight_conversions,
                        raising=False)
    cls = hf_quantizer.FlashLLMHfQuantizer
    ours = cls.update_weight_conversions
    monkeypatch.setattr(cls, "update_weight_conversions", lambda self, weight_conversions, *rest: ours(
        self, weight_conversions))

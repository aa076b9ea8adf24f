"""Checkpoints: load a pruned Hugging Face model directory (dense, compressed-tensors ``sparse-bitmask`` or
flash-llm's own format) with its sparse layers compressed, and save flash-llm checkpoints.

::

    model = flash_llm.from_pretrained("pruned-llama/", device="cuda")  # layers with >= 30 % zeros compressed
    flash_llm.save_pretrained(model, "pruned-llama-flash/")            # compact; reloads memory-mapped
    model = flash_llm.from_pretrained("pruned-llama-flash/")           # exactly as saved

With transformers installed, ``import flash_llm`` also teaches ``transformers.AutoModelForCausalLM`` to load
and save flash-llm checkpoints (``flash_llm.checkpoint.hf_quantizer``).  ``docs/checkpoints.md`` describes
the format.
"""

from .pretrained import convert, from_pretrained, load_checkpoint, save_pretrained, write_sparse_bitmask

__all__ = ["from_pretrained", "save_pretrained", "load_checkpoint", "convert", "write_sparse_bitmask"]

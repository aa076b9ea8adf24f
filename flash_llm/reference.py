"""Pure-PyTorch reference of the sparse matmul: decode to dense, multiply with fp32 accumulation.

It is the CPU path of :func:`flash_llm.spmm` and what the GPU kernels are tested against.
"""

from __future__ import annotations

import torch

from .formats import BitmapTiles, SparseFormat, TiledCSL

# Format classes by the integer id the custom op carries (ops cannot take Python objects).
FORMAT_CLASSES = (BitmapTiles, TiledCSL)
FORMAT_IDS = {cls: i for i, cls in enumerate(FORMAT_CLASSES)}


def as_format(fmt: int, data: torch.Tensor, offsets: torch.Tensor, m: int, k: int,
              dtype: torch.dtype) -> SparseFormat:
    """Wrap raw arrays (already validated when the weight was built or loaded) as a format object."""
    # nnz is only informational; decoding derives everything from the arrays.
    return FORMAT_CLASSES[fmt]._from_parts({"data": data, "offsets": offsets}, (m, k), dtype, -1)


def spmm_reference(x: torch.Tensor, w: SparseFormat, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [N, K] @ w.to_dense().T (+ bias)`` -> ``[N, M]`` in ``x.dtype``, accumulated in fp32."""
    y = x.float() @ w.to_dense().float().t()
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype)

"""Pure-PyTorch reference of the sparse matmul: decode to dense, multiply with fp32 accumulation.

It is the CPU path of :func:`flash_llm.spmm` and what the GPU kernels are tested against.
"""

from __future__ import annotations

import torch

from .formats import BitmapTiles, DeltaRows, SparseFormat, TiledCSL

# Format classes by the integer id the custom op carries (ops cannot take Python objects).
FORMAT_CLASSES = (BitmapTiles, TiledCSL, DeltaRows)
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


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm of ``x [..., K]`` with ``weight [K]``: normalize in fp32, round to ``x``'s dtype,
    then scale by ``weight`` (rounded again)."""
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``nn.LayerNorm`` of ``x [..., K]`` with ``weight [K]`` and ``bias [K]`` (or ``None``), computed in fp32 and
    rounded once to ``x``'s dtype (as PyTorch's CUDA kernel does for fp16 / bf16)."""
    return torch.nn.functional.layer_norm(x.float(), (x.shape[-1],), weight.float(),
                                          None if bias is None else bias.float(), eps).to(x.dtype)


def apply_norm(x: torch.Tensor, norm: tuple) -> torch.Tensor:
    """``norm=(weight, eps)``: :func:`rms_norm`; ``norm=(weight, bias, eps)``: :func:`layer_norm`."""
    return rms_norm(x, norm[0], norm[1]) if len(norm) == 2 else layer_norm(x, norm[0], norm[1], norm[2])


def silu_mul_halves(y: torch.Tensor) -> torch.Tensor:
    """``y [..., 2 H]`` (a merged gate / up projection's output) -> ``silu(y[..., :H]) * y[..., H:]`` ``[..., H]``,
    computed in fp32 and rounded once to ``y``'s dtype (as the engine's compiled ``silu_mul`` does)."""
    g, u = y.float().chunk(2, dim=-1)
    return (torch.nn.functional.silu(g) * u).to(y.dtype)

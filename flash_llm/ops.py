"""The public sparse matmul and its PyTorch custom op (declared here, with its fake implementation).

The op takes the format's raw arrays (custom ops cannot take Python objects); :func:`spmm` checks
every argument and names the wrong one.  The CUDA kernels register a CUDA implementation of the same
op (``flash_llm.kernels``); everywhere else the pure-PyTorch reference runs.
"""

from __future__ import annotations

import warnings

import torch

from .formats import SparseFormat
from .reference import FORMAT_IDS, as_format, spmm_reference


@torch.library.custom_op("flash_llm::spmm", mutates_args=())
def _spmm_op(x: torch.Tensor, data: torch.Tensor, offsets: torch.Tensor, fmt: int, m: int, k: int,
             bias: torch.Tensor | None) -> torch.Tensor:
    return spmm_reference(x, as_format(fmt, data, offsets, m, k, x.dtype), bias)


_warned: set[str] = set()


@_spmm_op.register_kernel("cuda")
def _spmm_cuda(x, data, offsets, fmt, m, k, bias):
    from . import kernels

    ok, why = kernels.supported(x.device)
    if not ok:
        if why not in _warned:
            _warned.add(why)
            warnings.warn(f"flash_llm.spmm runs the slow PyTorch reference: {why}", RuntimeWarning, stacklevel=3)
        return spmm_reference(x, as_format(fmt, data, offsets, m, k, x.dtype), bias)
    return kernels.spmm_cuda(x, data, offsets, fmt, m, k, bias)


@_spmm_op.register_fake
def _(x, data, offsets, fmt, m, k, bias):
    return x.new_empty((x.shape[0], m))


# ---- gradients: d/dx (x W^T + b) = grad W, d/db = sum of grad over rows; the compressed weight itself
# is a constant (no gradient).  The transposed product is its own op so that it traces as well.
@torch.library.custom_op("flash_llm::spmm_t", mutates_args=())
def _spmm_t_op(grad: torch.Tensor, data: torch.Tensor, offsets: torch.Tensor, fmt: int, m: int,
               k: int) -> torch.Tensor:
    """``grad [N, M] @ W [M, K]`` -> ``[N, K]`` in ``grad.dtype``, fp32 accumulation (reference path)."""
    w = as_format(fmt, data, offsets, m, k, grad.dtype).to_dense()
    return (grad.float() @ w.float()).to(grad.dtype)


@_spmm_t_op.register_fake
def _(grad, data, offsets, fmt, m, k):
    return grad.new_empty((grad.shape[0], k))


def _setup_context(ctx, inputs, output):
    x, data, offsets, fmt, m, k, bias = inputs
    ctx.save_for_backward(data, offsets)
    ctx.meta = (fmt, m, k, bias is not None)


def _backward(ctx, grad):
    data, offsets = ctx.saved_tensors
    fmt, m, k, has_bias = ctx.meta
    grad_x = _spmm_t_op(grad.contiguous(), data, offsets, fmt, m, k) if ctx.needs_input_grad[0] else None
    grad_bias = grad.float().sum(0).to(grad.dtype) if has_bias and ctx.needs_input_grad[6] else None
    return grad_x, None, None, None, None, None, grad_bias


_spmm_op.register_autograd(_backward, setup_context=_setup_context)


def spmm(x: torch.Tensor, w: SparseFormat, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y = x @ W^T (+ bias)`` with ``W`` kept compressed.

    Args:
        x: ``[..., K]`` activations, fp16 or bf16 (the dtype of ``w``), any strides.
        w: compressed weight (:class:`~flash_llm.BitmapTiles` or :class:`~flash_llm.TiledCSL`) of
           logical shape ``[M, K]``, on the device of ``x``.
        bias: optional ``[M]`` in the same dtype and device.

    Returns:
        ``[..., M]`` in ``x.dtype``; products accumulated in fp32.  ``x`` with zero rows gives an
        empty result.
    """
    if not isinstance(w, SparseFormat):
        raise TypeError(f"w must be a flash_llm compressed weight (BitmapTiles or TiledCSL), got "
                        f"{type(w).__name__}")
    m, k = w.shape
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim < 1 or x.shape[-1] != k:
        raise ValueError(f"x has shape {tuple(x.shape)}; its last dimension must be K={k} (w is {m}x{k})")
    if x.dtype != w.dtype:
        raise TypeError(f"x has dtype {x.dtype} but w has dtype {w.dtype}; they must match")
    if x.device != w.device:
        raise ValueError(f"x is on {x.device} but w is on {w.device}; move them to the same device")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if bias.shape != (m,):
            raise ValueError(f"bias has shape {tuple(bias.shape)}; expected ({m},)")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias has dtype {bias.dtype}; expected {x.dtype} (the dtype of x)")
        if bias.device != x.device:
            raise ValueError(f"bias is on {bias.device} but x is on {x.device}")
        bias = bias.contiguous()
    lead = x.shape[:-1]
    y = _spmm_op(x.reshape(-1, k), w.data, w.offsets, FORMAT_IDS[type(w)], m, k, bias)
    return y.reshape(*lead, m)

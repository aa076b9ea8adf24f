"""Elementwise parts of a decoder layer as single functions, optionally compiled into one kernel each.

Besides its 7 projections and the attention, an eager fp16 Llama layer runs 32 small kernels per decode step
(counted from the CPU op profile): the RMSNorms (8 each), RoPE (5 per tensor), SiLU x up and the residual adds.
Inside a CUDA graph each still costs a few microseconds; over 32 layers that is about 1000 small kernels per
token.
``torch.compile`` turns each function below into one kernel (Triton on CUDA).  The eager versions compute in
transformers' order and precision and are what runs unless a model is switched with :func:`set_fused`.
"""

from __future__ import annotations

import types
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..reference import rms_norm  # noqa: F401  (one of the functions below: transformers' LlamaRMSNorm)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add and the next RMSNorm: ``(x + delta, rms_norm(x + delta))``."""
    x = x + delta
    return x, rms_norm(x, weight, eps)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """``q, k [B, H, T, D]`` rotated by ``cos, sin [B, T, D]`` (transformers' half-split convention)."""
    cos, sin = cos[:, None], sin[:, None]
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def rope_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               kc: torch.Tensor, vc: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """:func:`rope` and the KV-cache write in one: ``k`` rotated and ``v [B, Hkv, T, D]`` are written into the
    cache rows ``kc, vc [B, Hkv, S, D]`` at ``slots [T]`` (int64), in place; returns ``q`` rotated.  Compiled, the
    two cache writes join the rotation's kernels (two ``index_copy_`` launches fewer per layer and step; on the
    CPU the compiled code writes the cache in place, it does not copy it)."""
    q, k = rope(q, k, cos, sin)
    kc.index_copy_(2, slots, k)
    vc.index_copy_(2, slots, v)
    return q


def add_layer_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """OPT's residual add and the next LayerNorm: ``(x + delta, layer_norm(x + delta))``."""
    x = x + delta
    return x, F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def scale_cache(q: torch.Tensor, scaling: float, k: torch.Tensor, v: torch.Tensor, kc: torch.Tensor,
                vc: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """OPT's query scaling and the KV-cache write in one: ``k, v [B, H, T, D]`` written into ``kc, vc`` at
    ``slots`` in place (as :func:`rope_cache`); returns ``q * scaling``."""
    kc.index_copy_(2, slots, k)
    vc.index_copy_(2, slots, v)
    return q * scaling


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


_EAGER = {"rms_norm": rms_norm, "add_rms_norm": add_rms_norm, "rope": rope, "rope_cache": rope_cache,
          "silu_mul": silu_mul, "add_layer_norm": add_layer_norm, "scale_cache": scale_cache}
_COMPILED: dict[tuple[str, str, torch.dtype], object] = {}  # (name, device type, dtype): compiled, or eager
_FUSED: dict[str, object] = {}


def op(name: str, fused: bool):
    """The function ``name``: eager, or (``fused``) compiled with ``torch.compile`` (``dynamic=True``: one
    compilation serves every batch size and sequence length) once per process for each device type and dtype of its
    first argument.

    Each device type and dtype compiles its own copy of the function: dynamo counts recompilations per code object,
    and past its limit (``torch._dynamo.config.recompile_limit``, 8) a ``fullgraph`` function fails; one copy for
    fp16, bf16 and fp32 on the GPU and the CPU, at one and at several tokens, would reach it.  If compiling fails (no
    C compiler or Triton, an unsupported backend...), a warning says why and the eager function is used from then on
    for that device type and dtype: the results are the same, only slower."""
    if not fused or torch.compiler.is_compiling():  # (inside an outer torch.compile, which fuses them itself)
        return _EAGER[name]
    fn = _FUSED.get(name)
    if fn is None:
        fn = _FUSED[name] = _keyed(name)
    return fn


def _keyed(name: str):
    def call(*args):
        x = args[0]
        key = (name, x.device.type, x.dtype)
        fn = _COMPILED.get(key)
        if fn is None:
            fn = _COMPILED[key] = _with_fallback(key, torch.compile(_copy(_EAGER[name]), dynamic=True, fullgraph=True))
        return fn(*args)

    return call


def _copy(fn):
    """``fn`` with a code object of its own (so dynamo keeps its compilations apart from ``fn``'s)."""
    g = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    g.__kwdefaults__, g.__qualname__, g.__doc__ = fn.__kwdefaults__, fn.__qualname__, fn.__doc__
    return g


def _with_fallback(key: tuple[str, str, torch.dtype], compiled):
    """``compiled``, or where it raises and the eager function does not (so compiling, or its toolchain, failed): a
    warning, and the eager function from then on (``_COMPILED[key]``).  Where the eager function raises too, the
    call itself was wrong (a shape or dtype error of the caller's): its error is raised, and nothing switched."""
    name = key[0]
    eager = _EAGER[name]

    def call(*args):
        try:
            return compiled(*args)
        except Exception as e:  # compilation (or its toolchain) failed, or the call itself is wrong
            failed = e
        out = eager(*args)  # (raises, and switches nothing, where the call itself is wrong)
        _COMPILED[key] = eager  # compiling failed: the eager function gives the same result
        first = str(failed).splitlines()[0][:200] if str(failed) else ""
        warnings.warn(f"flash_llm: compiling the fused {name} failed ({type(failed).__name__}: {first}); using the "
                      f"eager version for {key[1]} {str(key[2]).removeprefix('torch.')}", RuntimeWarning,
                      stacklevel=3)
        return out

    return call


def set_fused(model: nn.Module, fused: bool = True) -> nn.Module:
    """Switch every module of ``model`` that has a fused path (``fused`` attribute: Llama's RMSNorm, attention,
    MLP, decoder layer and model; OPT's attention, decoder layer and decoder) to the compiled single-kernel functions,
    or back (``fused=False``).  In place; returns ``model``.  The first forward after switching compiles (seconds);
    the results equal the eager ones to rounding (a module with hooks, which a fused path would skip for its weights, is
    called as a module: :func:`~flash_llm.models._common.hooked`).  :class:`flash_llm.engine.Engine` does this with
    ``fuse=True``."""
    for m in model.modules():
        if hasattr(m, "fused"):
            m.fused = bool(fused)
    return model

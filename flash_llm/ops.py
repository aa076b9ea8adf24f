"""The public sparse matmul and its PyTorch custom op (declared here, with its fake implementation).

The op takes the format's raw arrays (custom ops cannot take Python objects); :func:`spmm` checks
every argument and names the wrong one.  The CUDA kernels register a CUDA implementation of the same
op (``flash_llm.kernels``); everywhere else the pure-PyTorch reference runs.
"""

from __future__ import annotations

import math
import numbers
import warnings

import torch
import torch.autograd.forward_ad as fwAD

from .formats import DeltaRows, SparseFormat, delta_rows
from .formats._base import check_strided
from .reference import FORMAT_CLASSES, FORMAT_IDS, as_format, layer_norm, rms_norm, silu_mul_halves, spmm_reference


@torch.library.custom_op("flash_llm::spmm", mutates_args=())
def _spmm_op(x: torch.Tensor, data: torch.Tensor, offsets: torch.Tensor, fmt: int, m: int, k: int,
             bias: torch.Tensor | None) -> torch.Tensor:
    _checked_raw(x, data, offsets, fmt, m, k, bias=bias)
    return spmm_reference(x, as_format(fmt, data, offsets, m, k, x.dtype), bias)


_warned: set[str] = set()


def _raw(x: torch.Tensor, fmt: int, k: int, name: str = "x") -> None:
    """What the raw ops take, checked where they run (they are reachable as ``torch.ops.flash_llm.*``, e.g. from
    an exported graph, without :func:`spmm`'s checks; the kernels read ``x`` as ``[N, K]``): ``x`` 2-D ``[N, k]``
    fp16 / bf16 and a known format id."""
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"{name} must be 2-D [N, {k}], got shape {tuple(x.shape)} (flash_llm.spmm and its "
                         "siblings take [..., K])")
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"{name} must be float16 or bfloat16 (the weight's dtype), got {x.dtype}")
    if fmt not in FORMAT_IDS.values():
        raise ValueError(f"fmt must be one of {sorted(FORMAT_IDS.values())} (BitmapTiles, TiledCSL, DeltaRows), got "
                         f"{fmt!r}")


def _raw_weight(x: torch.Tensor, data: torch.Tensor, offsets: torch.Tensor, fmt: int, m: int, k: int, *,
                bias: torch.Tensor | None = None, silu_mul: bool = False, norm: tuple = (),
                acc: torch.Tensor | None = None) -> None:
    """The rest of a raw op's arguments, after :func:`_raw`: ``data`` / ``offsets`` 1-D contiguous int32 on ``x``'s
    device of the lengths an ``[m, k]`` weight of format ``fmt`` has
    (:meth:`~flash_llm.formats.SparseFormat.arrays_fit`: sizes only, nothing read; the kernels trust the arrays to be
    that weight), ``bias [m]``, an even ``m`` for ``silu_mul``, the norm's ``(name, tensor)`` pairs ``[k]`` and
    ``acc [N, m]`` (contiguous), all in ``x``'s dtype.  The
    lengths fix ``m`` and ``k`` only to the format's granularity (16 / 64 / 32-row records, 64 columns), and the
    arrays do not say whether their values are fp16 or bf16: within those, ``m``, ``k`` and ``x``'s dtype are the
    caller's word (:func:`spmm` and its siblings always pass the weight's own; a DeltaRows weight told fewer rows
    than it has would have rows written past ``m``)."""
    for n, v in (("m", m), ("k", k)):
        if isinstance(v, bool) or not isinstance(v, (int, torch.SymInt)) or v < 1:  # (SymInt: traced shapes)
            raise ValueError(f"{n} must be an int >= 1, got {v!r}")
    for n, t in (("data", data), ("offsets", offsets)):
        if t.dtype != torch.int32 or t.dim() != 1 or t.device != x.device:
            raise ValueError(f"{n} must be a 1-D int32 tensor on {x.device}, got {t.dtype} {tuple(t.shape)} on "
                             f"{t.device}")
        _contiguous(n, t)  # (the CUDA kernels read them as flat arrays from their first word)
    cls = FORMAT_CLASSES[fmt]
    why = cls.arrays_fit(m, k, offsets.numel(), data.numel())
    if why is not None:
        raise ValueError(f"data / offsets are not the arrays of a {m}x{k} {cls.__name__} weight: {why}")
    if cls is DeltaRows and x.dtype != torch.bfloat16 and delta_rows.layout(m, offsets.numel(), data.numel()).coded:
        # (coded values are bf16's, as the CUDA path refuses; the reference would read their bits as fp16: session 88)
        raise ValueError(f"x: a DeltaRows weight with coded values is bf16, got x in {x.dtype}")
    if silu_mul and m % 2:
        raise ValueError(f"silu_mul needs an even m (gate and up halves), got m={m}")
    for n, t, shape in (("bias", bias, (m,)), *((f"norm {n}", t, (k,)) for n, t in norm),
                        ("acc", acc, (x.shape[0], m))):
        if t is not None and (t.shape != shape or t.dtype != x.dtype or t.device != x.device):
            raise ValueError(f"{n} must be {list(shape)} in {x.dtype} on {x.device}, got {t.dtype} "
                             f"{tuple(t.shape)} on {t.device}")
        if t is not None:  # (the CUDA kernels read them by index: strides would be lost)
            _contiguous(n, t)


def _contiguous(name: str, t: torch.Tensor) -> None:
    """ValueError naming a raw op's tensor argument ``name`` where ``t`` is not contiguous (the kernels take its
    ``data_ptr()`` and read it by index; on every device, so that a call refused on CUDA is refused on the CPU)."""
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {t.stride()}")


def _byte_span(t: torch.Tensor) -> tuple[int, int]:
    """``[lo, hi)``: the bytes of its storage the non-empty tensor ``t``'s elements lie within."""
    lo = t.storage_offset() * t.element_size()
    return lo, lo + (sum((n - 1) * st for n, st in zip(t.shape, t.stride())) + 1) * t.element_size()


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` share bytes of one storage (the span each covers, :func:`_byte_span`, not element by
    element)."""
    if a.device != b.device or a.numel() == 0 or b.numel() == 0:
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    (a0, a1), (b0, b1) = _byte_span(a), _byte_span(b)
    return a0 < b1 and b0 < a1


def _checked_raw(x, data, offsets, fmt, m, k, **kw) -> None:
    """:func:`_raw` and :func:`_raw_weight`: every argument of an op taking ``x [N, k]``."""
    _raw(x, fmt, k)
    _raw_weight(x, data, offsets, fmt, m, k, **kw)


def _no_kernels(device: torch.device) -> bool:
    """Whether the CUDA kernels cannot run on ``device`` (then the ops run their PyTorch reference), with a one-time
    warning that says why."""
    from . import kernels

    ok, why = kernels.supported(device)
    if not ok and why not in _warned:
        _warned.add(why)
        warnings.warn(f"flash_llm.spmm runs the slow PyTorch reference: {why}", RuntimeWarning, stacklevel=4)
    return not ok


@_spmm_op.register_kernel("cuda")
def _spmm_cuda(x, data, offsets, fmt, m, k, bias):
    _checked_raw(x, data, offsets, fmt, m, k, bias=bias)
    from . import kernels

    if _no_kernels(x.device):
        return spmm_reference(x, as_format(fmt, data, offsets, m, k, x.dtype), bias)
    return kernels.spmm_cuda(x, data, offsets, fmt, m, k, bias)


@_spmm_op.register_fake
def _spmm_fake(x, data, offsets, fmt, m, k, bias):
    _checked_raw(x, data, offsets, fmt, m, k, bias=bias)
    return x.new_empty((x.shape[0], m))


def _silu_mul_reference(x, data, offsets, fmt, m, k):
    return silu_mul_halves(spmm_reference(x, as_format(fmt, data, offsets, m, k, x.dtype), None))


@torch.library.custom_op("flash_llm::spmm_silu_mul", mutates_args=())
def _spmm_silu_mul_op(x: torch.Tensor, data: torch.Tensor, offsets: torch.Tensor, fmt: int, m: int,
                      k: int) -> torch.Tensor:
    _checked_raw(x, data, offsets, fmt, m, k, silu_mul=True)
    return _silu_mul_reference(x, data, offsets, fmt, m, k)


@_spmm_silu_mul_op.register_kernel("cuda")
def _spmm_silu_mul_cuda(x, data, offsets, fmt, m, k):
    _checked_raw(x, data, offsets, fmt, m, k, silu_mul=True)
    from . import kernels

    if _no_kernels(x.device):
        return _silu_mul_reference(x, data, offsets, fmt, m, k)
    return kernels.spmm_cuda(x, data, offsets, fmt, m, k, None, act="silu_mul")


@_spmm_silu_mul_op.register_fake
def _spmm_silu_mul_fake(x, data, offsets, fmt, m, k):
    _checked_raw(x, data, offsets, fmt, m, k, silu_mul=True)
    return x.new_empty((x.shape[0], m // 2))


def _rms_norm_reference(x, weight, eps, data, offsets, fmt, m, k, silu_mul):
    y = spmm_reference(rms_norm(x, weight, eps), as_format(fmt, data, offsets, m, k, x.dtype), None)
    return silu_mul_halves(y) if silu_mul else y


@torch.library.custom_op("flash_llm::spmm_rms_norm", mutates_args=())
def _spmm_rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float, data: torch.Tensor, offsets: torch.Tensor,
                      fmt: int, m: int, k: int, silu_mul: bool) -> torch.Tensor:
    _checked_raw(x, data, offsets, fmt, m, k, silu_mul=silu_mul, norm=(("weight", weight),))
    return _rms_norm_reference(x, weight, eps, data, offsets, fmt, m, k, silu_mul)


@_spmm_rms_norm_op.register_kernel("cuda")
def _spmm_rms_norm_cuda(x, weight, eps, data, offsets, fmt, m, k, silu_mul):
    _checked_raw(x, data, offsets, fmt, m, k, silu_mul=silu_mul, norm=(("weight", weight),))
    from . import kernels

    if _no_kernels(x.device):
        return _rms_norm_reference(x, weight, eps, data, offsets, fmt, m, k, silu_mul)
    return kernels.spmm_cuda(x, data, offsets, fmt, m, k, None, act="silu_mul" if silu_mul else None,
                             norm=(weight, eps))


@_spmm_rms_norm_op.register_fake
def _spmm_rms_norm_fake(x, weight, eps, data, offsets, fmt, m, k, silu_mul):
    _checked_raw(x, data, offsets, fmt, m, k, silu_mul=silu_mul, norm=(("weight", weight),))
    return x.new_empty((x.shape[0], m // 2 if silu_mul else m))


def _layer_norm_reference(x, weight, ln_bias, eps, data, offsets, fmt, m, k, bias, relu):
    y = spmm_reference(layer_norm(x, weight, ln_bias, eps), as_format(fmt, data, offsets, m, k, x.dtype), bias)
    return torch.relu_(y) if relu else y


@torch.library.custom_op("flash_llm::spmm_layer_norm", mutates_args=())
def _spmm_layer_norm_op(x: torch.Tensor, weight: torch.Tensor, ln_bias: torch.Tensor | None, eps: float,
                        data: torch.Tensor, offsets: torch.Tensor, fmt: int, m: int, k: int,
                        bias: torch.Tensor | None, relu: bool) -> torch.Tensor:
    _checked_raw(x, data, offsets, fmt, m, k, bias=bias,
                 norm=(("weight", weight), ("bias", ln_bias)))
    return _layer_norm_reference(x, weight, ln_bias, eps, data, offsets, fmt, m, k, bias, relu)


@_spmm_layer_norm_op.register_kernel("cuda")
def _spmm_layer_norm_cuda(x, weight, ln_bias, eps, data, offsets, fmt, m, k, bias, relu):
    _checked_raw(x, data, offsets, fmt, m, k, bias=bias,
                 norm=(("weight", weight), ("bias", ln_bias)))
    from . import kernels

    if _no_kernels(x.device):
        return _layer_norm_reference(x, weight, ln_bias, eps, data, offsets, fmt, m, k, bias, relu)
    return kernels.spmm_cuda(x, data, offsets, fmt, m, k, bias, act="relu" if relu else None,
                             norm=(weight, ln_bias, eps))


@_spmm_layer_norm_op.register_fake
def _spmm_layer_norm_fake(x, weight, ln_bias, eps, data, offsets, fmt, m, k, bias, relu):
    _checked_raw(x, data, offsets, fmt, m, k, bias=bias,
                 norm=(("weight", weight), ("bias", ln_bias)))
    return x.new_empty((x.shape[0], m))


def _add_reference(acc, x, data, offsets, fmt, m, k, bias):
    acc.add_(spmm_reference(x, as_format(fmt, data, offsets, m, k, x.dtype), bias))


@torch.library.custom_op("flash_llm::spmm_add_", mutates_args=("acc",))
def _spmm_add_op(acc: torch.Tensor, x: torch.Tensor, data: torch.Tensor, offsets: torch.Tensor, fmt: int, m: int,
                 k: int, bias: torch.Tensor | None = None) -> None:
    _checked_raw(x, data, offsets, fmt, m, k, bias=bias, acc=acc)
    _add_reference(acc, x, data, offsets, fmt, m, k, bias)


@_spmm_add_op.register_kernel("cuda")
def _spmm_add_cuda(acc, x, data, offsets, fmt, m, k, bias=None):
    _checked_raw(x, data, offsets, fmt, m, k, bias=bias, acc=acc)
    from . import kernels

    if _no_kernels(x.device):
        _add_reference(acc, x, data, offsets, fmt, m, k, bias)
    else:  # (x and bias read while acc is written: blocks would read what other blocks already wrote)
        x = x.clone() if _overlaps(acc, x) else x
        bias = bias.clone() if bias is not None and _overlaps(acc, bias) else bias
        kernels.spmm_cuda(x, data, offsets, fmt, m, k, bias, add_to=acc)


@_spmm_add_op.register_fake
def _spmm_add_fake(acc, x, data, offsets, fmt, m, k, bias=None):
    _checked_raw(x, data, offsets, fmt, m, k, bias=bias, acc=acc)
    return None


# ---- gradients: d/dx (x W^T + b) = grad W, d/db = sum of grad over rows; the compressed weight itself
# is a constant (no gradient).  The transposed product is its own op so that it traces as well.
@torch.library.custom_op("flash_llm::spmm_t", mutates_args=())
def _spmm_t_op(grad: torch.Tensor, data: torch.Tensor, offsets: torch.Tensor, fmt: int, m: int,
               k: int) -> torch.Tensor:
    """``grad [N, M] @ W [M, K]`` -> ``[N, K]`` in ``grad.dtype``, fp32 accumulation (reference path)."""
    _raw(grad, fmt, m, "grad")
    _raw_weight(grad, data, offsets, fmt, m, k)
    w = as_format(fmt, data, offsets, m, k, grad.dtype).to_dense()
    return (grad.float() @ w.float()).to(grad.dtype)


@_spmm_t_op.register_fake
def _spmm_t_fake(grad, data, offsets, fmt, m, k):
    _raw(grad, fmt, m, "grad")
    _raw_weight(grad, data, offsets, fmt, m, k)
    return grad.new_empty((grad.shape[0], k))


def _setup_context(ctx, inputs, output):
    x, data, offsets, fmt, m, k, bias = inputs
    ctx.save_for_backward(data, offsets)
    ctx.meta = (fmt, m, k, bias is not None)


def _backward(ctx, grad):
    data, offsets = ctx.saved_tensors
    fmt, m, k, has_bias = ctx.meta
    grad_x = None
    if ctx.needs_input_grad[0]:  # (through the differentiable transposed product where a transform is in effect)
        grad_x = _through(_SpmmTFunction, _SpmmTReverse, _spmm_t_op)(grad.contiguous(), data, offsets, fmt, m, k)
    grad_bias = grad.float().sum(0).to(grad.dtype) if has_bias and ctx.needs_input_grad[6] else None
    return grad_x, None, None, None, None, None, grad_bias


_spmm_op.register_autograd(_backward, setup_context=_setup_context)


# Second order: the transposed product is linear in ``grad`` and the weight a constant, so its own gradient is the
# product again (``gg W^T``, :func:`spmm`'s op) and its tangent the transposed product of the tangent.  Until session
# 76 it had neither: double backward (``create_graph=True``) raised "no autograd formula" and ``torch.func.hessian`` /
# ``jvp(jacrev(...))`` gave zeros without a word.
def _setup_context_t(ctx, inputs, output):
    grad, data, offsets, fmt, m, k = inputs
    ctx.save_for_backward(data, offsets)
    ctx.meta = (fmt, m, k)


def _backward_t(ctx, gg):
    data, offsets = ctx.saved_tensors
    fmt, m, k = ctx.meta
    if not ctx.needs_input_grad[0]:
        return None, None, None, None, None, None
    op = _through(_SpmmFunction, _SpmmReverse, _spmm_op)
    return op(gg.contiguous(), data, offsets, fmt, m, k, None), None, None, None, None, None


_spmm_t_op.register_autograd(_backward_t, setup_context=_setup_context_t)


# ---- torch.vmap: each op runs once per sample, as torch's fallback ran it, and over a dimension of size 0 gives the
# empty result.  The fallback refuses that dimension ("does not support vmap over dims of size 0"): until session 84
# ``vmap`` over an empty batch, and ``jacrev`` / ``jacfwd`` of spmm and its siblings with an empty input or output
# (they vmap over its elements), failed in torch, naming no argument.
def _register_vmap(name: str, op, fake) -> None:
    """A ``torch.vmap`` rule for the custom op ``op``, ``torch.ops.flash_llm.<name>`` (``fake``: its fake
    implementation): the op on each sample in turn, the results stacked (a mutated argument, ``spmm_add_``'s ``acc``,
    is written sample by sample, so it must be batched); with no samples, ``fake``'s checks on one sample's shapes and
    an empty result (nothing computed)."""
    arguments = getattr(torch.ops.flash_llm, name).default._schema.arguments
    names = [a.name for a in arguments]
    mutated = [i for i, a in enumerate(arguments) if a.alias_info is not None and a.alias_info.is_write]

    def rule(info, in_dims, *args):
        if any(in_dims[i] is None for i in mutated):
            raise ValueError(f"flash_llm.{name}: under torch.vmap {', '.join(names[i] for i in mutated)} must "
                             "be batched too (the op writes into it, one sample at a time), got batched "
                             f"{', '.join(names[i] for i, d in enumerate(in_dims) if d is not None)} only")
        if info.batch_size == 0:  # (one sample's shapes and strides; the memory is not read)
            one = [a if d is None else torch.empty_strided(a.shape[:d] + a.shape[d + 1:],
                                                           a.stride()[:d] + a.stride()[d + 1:], dtype=a.dtype,
                                                           device=a.device) for a, d in zip(args, in_dims)]
            out = fake(*one)
            return (None, None) if out is None else (out.new_empty((0, *out.shape)), 0)
        outs = [op(*(a if d is None else a.select(d, i) for a, d in zip(args, in_dims)))
                for i in range(info.batch_size)]
        return (None, None) if outs[0] is None else (torch.stack(outs), 0)

    op.register_vmap(rule)


for _name, _op, _fake in (("spmm", _spmm_op, _spmm_fake), ("spmm_t", _spmm_t_op, _spmm_t_fake),
                          ("spmm_silu_mul", _spmm_silu_mul_op, _spmm_silu_mul_fake),
                          ("spmm_rms_norm", _spmm_rms_norm_op, _spmm_rms_norm_fake),
                          ("spmm_layer_norm", _spmm_layer_norm_op, _spmm_layer_norm_fake),
                          ("spmm_add_", _spmm_add_op, _spmm_add_fake)):
    _register_vmap(_name, _op, _fake)


class _SpmmTReverse(torch.autograd.Function):
    """The transposed product as an ``autograd.Function`` with its backward only: :class:`_SpmmTFunction` without
    the forward-mode rule, for the backward of :func:`spmm` under a reverse-mode ``torch.func`` transform in a graph
    Dynamo traces (as :class:`_SpmmReverse`)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad, data, offsets, fmt, m, k):
        return _spmm_t_op(grad, data, offsets, fmt, m, k)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_context_t(ctx, inputs, output)

    @staticmethod
    def backward(ctx, gg):
        return _backward_t(ctx, gg)


class _SpmmTFunction(_SpmmTReverse):
    """The transposed product as an ``autograd.Function`` with a forward-mode rule (as :class:`_SpmmFunction` is
    the product's), for the backward of :func:`spmm` under forward-mode AD and the ``torch.func`` transforms
    (``hessian``, ``jvp`` of ``jacrev``)."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_context_t(ctx, inputs, output)
        ctx.save_for_forward(inputs[1], inputs[2])

    @staticmethod
    def jvp(ctx, grad_t, data_t, offsets_t, fmt_t, m_t, k_t):
        data, offsets = ctx.saved_tensors
        fmt, m, k = ctx.meta
        return None if grad_t is None else _spmm_t_op(grad_t.contiguous(), data, offsets, fmt, m, k)


class _SpmmReverse(torch.autograd.Function):
    """The op as an ``autograd.Function`` with its backward only, for :func:`spmm` under a reverse-mode
    ``torch.func`` transform (``grad``, ``vjp``, ``jacrev``) in a graph Dynamo traces: the op's own autograd (its
    ``register_autograd``) does not run under the ``torch.func`` transforms (torch's generated ``autograd.Function``
    has no ``setup_context``), and Dynamo does not take :class:`_SpmmFunction` (a custom ``jvp``).  Until session 83
    the op was traced as it is there, and ``torch.compile(torch.func.grad(f))`` failed in torch's fake-tensor
    propagation, naming neither flash_llm nor an argument."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, data, offsets, fmt, m, k, bias):
        return _spmm_op(x, data, offsets, fmt, m, k, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_context(ctx, inputs, output)

    @staticmethod
    def backward(ctx, grad):
        return _backward(ctx, grad)


class _SpmmFunction(_SpmmReverse):
    """The op as an ``autograd.Function`` with a forward-mode rule, for :func:`spmm` under forward-mode AD and the
    ``torch.func`` transforms: a ``torch.library`` custom op takes a backward formula only, and its tangents were
    dropped without an error (``jacfwd`` gave zeros; session 73's bug hunt).  The product is linear in ``x`` and the
    weight is a constant, so the tangent of ``y`` is ``spmm(x_t, W)`` (+ the bias's tangent).  Underneath it is the
    same ``torch.ops.flash_llm.spmm``.  Not used where Dynamo traces (it does not take a custom ``jvp``, and would
    trace the op's forward alone): there :func:`spmm` calls :class:`_SpmmReverse` under a reverse-mode transform and
    the op itself otherwise, as it does in plain eager (:func:`_through` says which)."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_context(ctx, inputs, output)
        ctx.save_for_forward(inputs[1], inputs[2])
        ctx.n = inputs[0].shape[0]

    @staticmethod
    def jvp(ctx, x_t, data_t, offsets_t, fmt_t, m_t, k_t, bias_t):
        data, offsets = ctx.saved_tensors
        fmt, m, k, _ = ctx.meta
        y_t = None if x_t is None else _spmm_op(x_t, data, offsets, fmt, m, k, None)
        if bias_t is not None:
            y_t = bias_t.expand(ctx.n, m).clone() if y_t is None else y_t + bias_t
        return y_t


def _assume_constant_result(fn):
    """``torch.compiler.assume_constant_result`` without importing ``torch._dynamo`` (about 1.3 s, which every
    ``import flash_llm`` and ``flash-llm --help`` paid): that decorator imports Dynamo only to set this one attribute,
    which Dynamo reads when it inlines a call to ``fn`` (it runs ``fn`` then and takes the result as a constant).
    Dynamo is imported anyway by the time anything traces, so marking the function now is the same as marking it
    through torch (tests/test_cli_fixes78.py checks that torch's decorator sets just this attribute)."""
    fn._dynamo_marked_constant = True
    return fn


@_assume_constant_result  # (Dynamo runs it while tracing, with the dual level its caller read: see below)
def _forward_ad_active(level: int) -> bool:
    """Whether forward-mode AD is on: ``level``, ``torch.autograd.forward_ad._current_level`` as the caller read it,
    is a dual level (>= 0), or ``torch.func.jvp`` (``jacfwd``) is among the ``torch.func`` transforms in effect.

    The caller reads the dual level (``_forward_ad_active(fwAD._current_level)``) in code Dynamo traces: a module
    global read there is guarded, so a graph compiled outside a dual level is compiled again inside one (where
    forward-mode AD is refused).  Until session 80 the level was read in here, and this function's result, a
    constant taken once at trace time, had no guard: a function compiled outside ``dual_level`` and then called
    inside one ran the op without its forward-mode rule, and the tangent was dropped without a word.  The
    interpreter stack is read here, as a constant (Dynamo cannot trace its query)."""
    return level >= 0 or any(i.key() == torch._C._functorch.TransformType.Jvp
                             for i in torch._C._functorch.get_interpreter_stack() or ())


@_assume_constant_result  # (a graph traced under a torch.func transform is guarded on the transforms in effect)
def _reverse_transform() -> str:
    """Whether a reverse-mode ``torch.func`` transform (``grad``, ``vjp``, ``jacrev``) is in effect: ``"grad"`` where
    it is the only transform, ``"nested"`` where others are too (``vmap`` of ``grad``, ``grad`` of ``grad``), else
    ``""`` (read as a constant where Dynamo traces, as :func:`_forward_ad_active` reads forward-mode AD)."""
    keys = [i.key() for i in torch._C._functorch.get_interpreter_stack() or ()]
    if torch._C._functorch.TransformType.Grad not in keys:
        return ""
    return "grad" if len(keys) == 1 else "nested"


def _through(function, reverse, op):
    """What :func:`spmm` (``op``: its custom op, or the transposed product's in its backward) runs as: under
    forward-mode AD or a ``torch.func`` transform (``jvp``, ``jacfwd``, ``grad``, ``vmap``...), outside Dynamo,
    ``function.apply`` (:class:`_SpmmFunction`, with the forward-mode rule).  Under Dynamo, ``reverse.apply``
    (:class:`_SpmmReverse`, backward only) under a reverse-mode transform alone and ``op`` itself where there is
    none; forward-mode AD, which would lose the tangent there, and a reverse-mode transform nested with another
    (Dynamo's trace gave zeros for ``grad`` of ``grad``) are refused.  In plain eager, ``op``."""
    if not torch.compiler.is_compiling():
        transformed = fwAD._current_level >= 0 or torch._C._functorch.peek_interpreter_stack() is not None
        return function.apply if transformed else op
    if _forward_ad_active(fwAD._current_level):
        _refuse_traced_forward_ad("spmm", eager_fallback=True)
    reverse_mode = _reverse_transform()
    if reverse_mode == "nested":
        raise NotImplementedError("flash_llm.spmm: torch.func.grad / vjp / jacrev nested with another torch.func "
                                  "transform (vmap of grad, grad of grad) is not supported in a graph "
                                  "torch.compile traces: run the transforms and the function eagerly (grad / vjp / "
                                  "jacrev alone compile)")
    return reverse.apply if reverse_mode else op


def _refuse_traced_forward_ad(name: str, eager_fallback: bool = False):
    """NotImplementedError naming ``flash_llm.<name>``: forward-mode AD inside a graph Dynamo traces
    (``eager_fallback``: the message says that without ``fullgraph=True`` the call runs eagerly)."""
    raise NotImplementedError(f"flash_llm.{name}: forward-mode AD (torch.func.jvp / jacfwd, "
                              "torch.autograd.forward_ad) is not supported in a graph torch.compile traces (the "
                              "tangent would be lost): run the transform outside the compiled region" +
                              (", or compile without fullgraph=True (the call then runs eagerly, where it is "
                               "supported)" if eager_fallback else ""))


def _decomposed(name: str, reverse: bool = True) -> bool:
    """Whether :func:`spmm`'s fused sibling ``name`` runs as its decomposition into differentiable ops (the norm,
    :func:`spmm` and the activation, as its PyTorch reference computes it, so the same to rounding): under
    forward-mode AD (``torch.autograd.forward_ad``, ``torch.func.jvp`` / ``jacfwd``), outside Dynamo, and (with
    ``reverse``) under a reverse-mode ``torch.func`` transform (``grad``, ``vjp``, ``jacrev``), traced or not.  Their
    custom ops take no forward-mode rule, and their tangents were dropped without an error (zeros under ``jvp``,
    ``None`` under ``forward_ad``); under a reverse-mode transform they failed in torch (its generated
    ``autograd.Function`` has no ``setup_context``), naming nothing (session 83).  In a graph Dynamo traces,
    forward-mode AD raises NotImplementedError naming the function, as :func:`spmm` does."""
    if not _forward_ad_active(fwAD._current_level):
        return reverse and _reverse_transform() != ""
    if torch.compiler.is_compiling():
        _refuse_traced_forward_ad(name)
    return True


def _format_id(w: SparseFormat) -> int:
    """The op's format id of ``w``'s class (or of the format a subclass of it derives from)."""
    for c in type(w).__mro__:
        if c in FORMAT_IDS:
            return FORMAT_IDS[c]
    raise TypeError(f"w must be a flash_llm compressed weight (BitmapTiles, TiledCSL or DeltaRows), got "
                    f"{type(w).__name__}")


def _checked(x, w, bias):
    """The argument checks of :func:`spmm`: ``(m, k, bias)`` with the bias made contiguous, or an error that names
    the argument."""
    if not isinstance(w, SparseFormat):
        raise TypeError(f"w must be a flash_llm compressed weight (BitmapTiles, TiledCSL or DeltaRows), got "
                        f"{type(w).__name__}")
    m, k = w.shape
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    check_strided(x, "x")
    if x.ndim < 1 or x.shape[-1] != k:
        raise ValueError(f"x has shape {tuple(x.shape)}; its last dimension must be K={k} (w is {m}x{k})")
    if x.dtype != w.dtype:
        raise TypeError(f"x has dtype {x.dtype} but w has dtype {w.dtype}; they must match")
    if x.device != w.device:
        raise ValueError(f"x is on {x.device} but w is on {w.device}; move them to the same device")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        check_strided(bias, "bias")
        if bias.shape != (m,):
            raise ValueError(f"bias has shape {tuple(bias.shape)}; expected ({m},)")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias has dtype {bias.dtype}; expected {x.dtype} (the dtype of x)")
        if bias.device != x.device:
            raise ValueError(f"bias is on {bias.device} but x is on {x.device}")
        bias = bias.contiguous()
    return m, k, bias


def _checked_eps(eps) -> float:
    """``eps`` of a fused norm as a float: a real number (a Python or NumPy number, or a one-element real tensor; not
    a bool), finite and >= 0 (0 as torch's ``rms_norm`` / ``layer_norm`` take it), or a ValueError that names it.  A
    tensor is read eagerly only: while ``torch.compile`` / ``torch.export`` traces, a TypeError naming ``eps`` (its
    value would be data-dependent; a compile that may break the graph then runs this call eagerly)."""
    if isinstance(eps, torch.Tensor):
        if torch.compiler.is_compiling():  # (its value would be data-dependent: a guard error deep inside the trace)
            raise TypeError("eps must be a Python number under torch.compile / torch.export, got a tensor; pass "
                            "float(eps) (or eps.item()) outside the compiled function")
        ok = eps.numel() == 1 and not eps.is_complex() and eps.dtype != torch.bool
    else:
        ok = isinstance(eps, numbers.Real) and not isinstance(eps, bool)
    try:
        value = float(eps) if ok else math.nan
    except (TypeError, ValueError, RuntimeError, OverflowError):  # (a tensor float() cannot read: under a
        value = math.nan  # transform, say; or an int / Fraction beyond the largest float, uncaught until session 83)
    if not (value >= 0 and value != math.inf):  # (not math.isfinite: dynamic floats; NaN fails)
        if ok and torch.compiler.is_compiling():  # (a float Dynamo made dynamic has no repr it can trace: until
            # session 87 an invalid one was refused by a "BUILD_STRING type error" that never named eps)
            got = ("nan" if value != value else "inf" if value == math.inf else "-inf" if value == -math.inf
                   else "a negative number")
            raise ValueError(f"eps must be a finite number >= 0, got {got}")
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    return value


def spmm(x: torch.Tensor, w: SparseFormat, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y = x @ W^T (+ bias)`` with ``W`` kept compressed.

    Args:
        x: ``[..., K]`` activations, fp16 or bf16 (the dtype of ``w``), any strides.
        w: compressed weight (:class:`~flash_llm.BitmapTiles`, :class:`~flash_llm.TiledCSL` or
           :class:`~flash_llm.DeltaRows`) of logical shape ``[M, K]``, on the device of ``x``.
        bias: optional ``[M]`` in the same dtype and device.

    Returns:
        ``[..., M]`` in ``x.dtype``; products accumulated in fp32.  ``x`` with zero rows gives an
        empty result.

    Differentiable in ``x`` and ``bias`` (the compressed weight is a constant) in reverse mode and in forward mode
    (``torch.autograd.forward_ad``, ``torch.func.jvp`` / ``jacfwd``; the tangent of ``y`` is ``spmm(x_t, w)`` plus
    the bias's tangent), and under the other ``torch.func`` transforms (``grad``, ``jacrev``, ``vmap``).  In a
    graph Dynamo traces (``torch.compile``, ``torch.export``) the op is traced as it is, with no forward-mode rule:
    forward-mode AD there raises NotImplementedError naming flash_llm (without ``fullgraph=True`` the call falls
    back to eager, where it is supported).  A reverse-mode transform (``grad``, ``vjp``, ``jacrev``) traces there
    with its backward; nested with another transform (``vmap`` of ``grad``, ``grad`` of ``grad``) it raises
    NotImplementedError naming flash_llm (run those eagerly).  The op itself, ``torch.ops.flash_llm.spmm`` (what a
    ``torch.export``-ed program calls), has a plain backward, but the ``torch.func`` transforms refuse it (torch's
    autograd for custom ops has no ``setup_context``: pytorch/pytorch#170834): run them over this function.
    """
    m, k, bias = _checked(x, w, bias)
    lead = x.shape[:-1]
    op = _through(_SpmmFunction, _SpmmReverse, _spmm_op)
    y = op(x.reshape(math.prod(lead), k), w.data, w.offsets, _format_id(w), m, k, bias)
    return y.reshape(*lead, m)


def spmm_silu_mul(x: torch.Tensor, w: SparseFormat) -> torch.Tensor:
    """``silu(gate) * up`` for a merged gate / up weight ``w`` (``[2 H, K]``: the gate rows, then the up rows).

    Args:
        x: ``[..., K]`` activations, fp16 or bf16 (the dtype of ``w``), any strides.
        w: compressed weight of logical shape ``[2 H, K]``, on the device of ``x``.

    Returns:
        ``[..., H]`` in ``x.dtype``: ``y = x @ w^T`` rounded to the dtype, then ``silu(y[..., :H]) * y[..., H:]`` in
        fp32, rounded once.  On CUDA the product and the activation share the split-K reduction where one runs
        (no separate activation kernel).  Differentiable in ``x`` in forward mode (``torch.func.jvp`` / ``jacfwd``,
        ``torch.autograd.forward_ad``) and under the reverse-mode ``torch.func`` transforms (``grad``, ``vjp``,
        ``jacrev``): it then runs as ``silu_mul_halves(spmm(x, w))``, the same to rounding; a plain backward through
        it (``.backward()``, ``torch.autograd.grad``) raises (no autograd formula).
    """
    m, k, _ = _checked(x, w, None)
    if m % 2:
        raise ValueError(f"w has {m} rows; a merged gate / up weight has an even number (gate rows, then up rows)")
    lead = x.shape[:-1]
    if _decomposed("spmm_silu_mul"):
        return silu_mul_halves(spmm(x, w))
    y = _spmm_silu_mul_op(x.reshape(math.prod(lead), k), w.data, w.offsets, _format_id(w), m, k)
    return y.reshape(*lead, m // 2)


def spmm_rms_norm(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, w: SparseFormat,
                  act: str | None = None) -> torch.Tensor:
    """``rms_norm(x) @ w^T``: a decoder layer's RMSNorm and the projection after it, in one call.

    Args:
        x: ``[..., K]`` activations (the residual stream), fp16 or bf16 (the dtype of ``w``), any strides.
        norm_weight: the RMSNorm's ``[K]`` weight, same dtype and device.
        eps: the RMSNorm's epsilon: a finite number >= 0 (else a ValueError that names it).
        w: compressed weight of logical shape ``[M, K]``, on the device of ``x``.
        act: ``None``, or ``"silu_mul"`` for a merged gate / up weight (as :func:`spmm_silu_mul`).

    Returns:
        ``[..., M]`` (``[..., M / 2]`` with ``act``) in ``x.dtype``: :func:`~flash_llm.reference.rms_norm`
        (transformers' LlamaRMSNorm), then the product accumulated in fp32.  On CUDA at one token with split-K
        (Tiled-CSL), the norm's weight scales ``x`` inside the spmm and each token's factor is applied in the split-K
        reduction, so the norm has no kernel of its own; the result is the same to rounding, not bit for bit.
        Differentiable in ``x`` and ``norm_weight`` in forward mode (``torch.func.jvp`` / ``jacfwd``,
        ``torch.autograd.forward_ad``) and under the reverse-mode ``torch.func`` transforms (``grad``, ``vjp``,
        ``jacrev``): it then runs as ``spmm(rms_norm(x, norm_weight, eps), w)``, the same to rounding; a plain
        backward through it (``.backward()``, ``torch.autograd.grad``) raises (no autograd formula).
    """
    m, k, _ = _checked(x, w, None)
    if act not in (None, "silu_mul"):
        raise ValueError(f"act must be None or 'silu_mul', got {act!r}")
    if act is not None and m % 2:
        raise ValueError(f"w has {m} rows; a merged gate / up weight has an even number (gate rows, then up rows)")
    check_strided(norm_weight, "norm_weight", ValueError)
    if not isinstance(norm_weight, torch.Tensor) or norm_weight.shape != (k,) or norm_weight.dtype != x.dtype:
        raise ValueError(f"norm_weight must be a [{k}] {x.dtype} tensor, got "
                         f"{getattr(norm_weight, 'dtype', type(norm_weight).__name__)} "
                         f"{tuple(getattr(norm_weight, 'shape', ()))}")
    if norm_weight.device != x.device:
        raise ValueError(f"norm_weight is on {norm_weight.device} but x is on {x.device}")
    eps = _checked_eps(eps)
    lead = x.shape[:-1]
    if _decomposed("spmm_rms_norm"):
        y = spmm(rms_norm(x, norm_weight, eps), w)
        return silu_mul_halves(y) if act is not None else y
    y = _spmm_rms_norm_op(x.reshape(math.prod(lead), k), norm_weight.contiguous(), eps, w.data, w.offsets,
                          _format_id(w), m, k, act is not None)
    return y.reshape(*lead, y.shape[-1])


def spmm_add_(acc: torch.Tensor, x: torch.Tensor, w: SparseFormat, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``acc += x @ w^T (+ bias)`` in place (a decoder layer's projection and the residual add after it); returns
    ``acc``.

    Args:
        acc: ``[..., M]``, contiguous, the dtype and device of ``x`` (the residual stream); it may be ``x``
            itself (a square projection added onto its input: ``x`` is read before ``acc`` is written).
        x: ``[..., K]`` activations, fp16 or bf16 (the dtype of ``w``), any strides.
        w: compressed weight of logical shape ``[M, K]``.
        bias: optional ``[M]``, the dtype and device of ``x``.

    The product (+ bias) is rounded to the dtype, then added (rounded again), as ``acc + spmm(x, w, bias)`` would; on
    CUDA at one token with split-K (Tiled-CSL, DeltaRows) the add happens in the split-K reduction.  Differentiable
    in forward mode only (``torch.func.jvp`` / ``jacfwd``, ``torch.autograd.forward_ad``: it then runs as
    ``acc.add_(spmm(x, w, bias))``, the same to rounding; ``acc`` takes the tangent); reverse mode is refused.
    """
    m, k, bias = _checked(x, w, bias)
    check_strided(acc, "acc", ValueError)
    if not isinstance(acc, torch.Tensor) or acc.shape != (*x.shape[:-1], m) or acc.dtype != x.dtype:
        raise ValueError(f"acc must be a {x.dtype} tensor of shape {(*x.shape[:-1], m)}, got "
                         f"{getattr(acc, 'dtype', type(acc).__name__)} {tuple(getattr(acc, 'shape', ()))}")
    if acc.device != x.device or not acc.is_contiguous():
        raise ValueError(f"acc must be contiguous and on {x.device} (it is {'' if acc.is_contiguous() else 'not '}"
                         f"contiguous, on {acc.device})")
    if _decomposed("spmm_add_", reverse=False):  # (in place: refused below under a reverse-mode transform)
        return acc.add_(spmm(x, w, bias))
    if torch.is_grad_enabled():  # (no autograd formula: a gradient through it would be dropped without a word)
        needs = [n for n, t in (("acc", acc), ("x", x), ("bias", bias)) if t is not None and t.requires_grad]
        if needs:
            raise ValueError(f"spmm_add_ is not differentiable, and {', '.join(needs)} require(s) grad: use "
                             "acc + spmm(x, w, bias), or run it under torch.no_grad()")
    n = math.prod(x.shape[:-1])  # (not -1: ambiguous for no elements, under torch.vmap over 0 samples; math.prod:
    # numel() would pin symbolic sizes, failing a non-strict export with a dynamic batch)
    _spmm_add_op(acc.view(n, m), x.reshape(n, k), w.data, w.offsets, _format_id(w), m, k, bias)
    return acc


def spmm_layer_norm(x: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor | None, eps: float,
                    w: SparseFormat, bias: torch.Tensor | None = None, act: str | None = None) -> torch.Tensor:
    """``layer_norm(x) @ w^T (+ bias)``, then ``act``: an OPT layer's LayerNorm and the projection after it, in one
    call.

    Args:
        x: ``[..., K]`` activations (the residual stream), fp16 or bf16 (the dtype of ``w``), any strides.
        norm_weight, norm_bias: the LayerNorm's ``[K]`` weight and bias (or ``None``), same dtype and device.
        eps: the LayerNorm's epsilon: a finite number >= 0 (else a ValueError that names it).
        w: compressed weight of logical shape ``[M, K]``, on the device of ``x``.
        bias: optional ``[M]``, same dtype and device.
        act: ``None`` or ``"relu"``.

    Returns:
        ``[..., M]`` in ``x.dtype``: :func:`~flash_llm.reference.layer_norm` (fp32, rounded once to the dtype), the
        product accumulated in fp32 (+ bias, rounded), then ReLU.  On CUDA at one token with a DeltaRows weight the
        whole of it runs in the spmm's launch: each block takes X's mean and variance itself and normalizes its
        window while staging it (the same to rounding, not bit for bit: another summation order for the statistics).
        Differentiable in ``x``, ``norm_weight``, ``norm_bias`` and ``bias`` in forward mode (``torch.func.jvp`` /
        ``jacfwd``, ``torch.autograd.forward_ad``) and under the reverse-mode ``torch.func`` transforms (``grad``,
        ``vjp``, ``jacrev``): it then runs as ``spmm(layer_norm(x, norm_weight, norm_bias, eps), w, bias)``, then
        ReLU, the same to rounding; a plain backward through it (``.backward()``, ``torch.autograd.grad``) raises (no
        autograd formula).
    """
    m, k, bias = _checked(x, w, bias)
    if act not in (None, "relu"):
        raise ValueError(f"act must be None or 'relu', got {act!r}")
    for t, what in ((norm_weight, "norm_weight"), (norm_bias, "norm_bias")):
        if t is None and what == "norm_bias":
            continue
        check_strided(t, what, ValueError)
        if not isinstance(t, torch.Tensor) or t.shape != (k,) or t.dtype != x.dtype:
            raise ValueError(f"{what} must be a [{k}] {x.dtype} tensor, got "
                             f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
        if t.device != x.device:
            raise ValueError(f"{what} is on {t.device} but x is on {x.device}")
    eps = _checked_eps(eps)
    lead = x.shape[:-1]
    if _decomposed("spmm_layer_norm"):
        y = spmm(layer_norm(x, norm_weight, norm_bias, eps), w, bias)
        return torch.relu(y) if act == "relu" else y
    y = _spmm_layer_norm_op(x.reshape(math.prod(lead), k), norm_weight.contiguous(),
                            None if norm_bias is None else norm_bias.contiguous(), eps, w.data, w.offsets,
                            _format_id(w), m, k, bias, act == "relu")
    return y.reshape(*lead, m)

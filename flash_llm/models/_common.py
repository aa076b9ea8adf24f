"""What the OPT and Llama modules share: the static KV cache, how a forward attends (:class:`Attend`), and
scaled-dot-product attention with grouped-query heads that never copies keys or values."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _nn_module

from .._env import env_choice


class KVCache:
    """A static key/value cache: per layer ``k`` and ``v`` of shape ``[max_batch, kv_heads, max_seq, head_dim]``
    in the model's dtype, allocated once.  Row ``b`` of a batch uses cache row ``b``; slot ``s`` holds the
    keys/values of the token at sequence index ``s`` (prompts are left-padded, so every row writes the
    same slot at each step).  Every layer's ``k`` and ``v`` lie in one tensor, :attr:`kv`, so :meth:`zero_slots`
    clears a range of slots in all of them with one kernel."""

    def __init__(self, num_layers: int, max_batch: int, kv_heads: int, max_seq: int, head_dim: int,
                 dtype: torch.dtype, device):
        shape = (max_batch, kv_heads, max_seq, head_dim)
        #: ``[2, num_layers, max_batch, kv_heads, max_seq, head_dim]``: the keys (``[0]``) and values (``[1]``)
        self.kv = torch.zeros((2, num_layers, *shape), dtype=dtype, device=device)
        # (detached: they share kv's memory but are no autograd views of it, as the separate tensors before were not: a
        # view made under no_grad may not be written in place from a grad-requiring key, as Engine.warmup's captures do)
        self.k = [self.kv[0, i].detach() for i in range(num_layers)]
        self.v = [self.kv[1, i].detach() for i in range(num_layers)]
        self.max_batch, self.max_seq = max_batch, max_seq

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    def view(self, r0: int, r1: int) -> "KVCache":
        """Rows ``r0..r1-1`` as a cache of ``r1 - r0`` rows (views: what a forward writes there lands here)."""
        if not 0 <= r0 < r1 <= self.max_batch:
            raise ValueError(f"rows {r0}..{r1 - 1} are not within the cache's {self.max_batch}")
        if (r0, r1) == (0, self.max_batch):
            return self
        c = KVCache.__new__(KVCache)
        c.kv = self.kv[:, :, r0:r1]
        c.k, c.v = [t[r0:r1] for t in self.k], [t[r0:r1] for t in self.v]
        c.max_batch, c.max_seq = r1 - r0, self.max_seq
        return c

    def zero_slots(self, b: int, start: int, stop: int) -> None:
        """Zero slots ``start..stop-1`` of rows ``0..b-1`` in every layer's keys and values (one kernel; nothing where
        the range is empty).  The engine zeroes the slots a generation's decode steps attend before writing them:
        they are masked (-inf), but a value an earlier generation left there (an fp16 overflow's inf or NaN) would
        still reach the result through its weight 0 (0 x inf = NaN)."""
        if b > 0 and stop > start:
            self.kv[:, :, :b, :, start:stop].zero_()

    def rows(self, layer: int, b: int, kv_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k, v`` cache of ``layer`` for rows ``0..b-1`` and its first ``kv_len`` slots (default all):
        ``[b, kv_heads, kv_len, head_dim]`` views."""
        return self.k[layer][:b, :, :kv_len], self.v[layer][:b, :, :kv_len]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, kv_len: int):
        """Write ``k, v [B, kv_heads, T, head_dim]`` at ``slots [T]`` (int64, on the cache's device) of rows
        ``0..B-1``, and return the first ``kv_len`` slots of those rows (views, no copies)."""
        kc, vc = self.rows(layer, k.shape[0])
        kc.index_copy_(2, slots, k)
        vc.index_copy_(2, slots, v)
        return self.rows(layer, k.shape[0], kv_len)


@dataclass
class Attend:
    """How one forward pass attends (built by :class:`flash_llm.engine.Engine`, or by the model itself for a
    plain full-sequence forward).

    Attributes:
        positions: ``[B, T]`` int64 position of every input token (RoPE angle / OPT position row).
        mask: ``[B, 1, T, S]`` bool, True where query ``t`` may attend key slot ``s``; ``None`` means plain
            causal attention over the ``T`` inputs themselves (``S == T``, no padding).
        cache: the :class:`KVCache` to write to and read from, or ``None`` (keys are the inputs' own).
        slots: ``[T]`` int64 cache slots the inputs' keys/values go to (with ``cache``).
        kv_len: how many leading cache slots the queries attend over (``S``; with ``cache``).
        rope: ``(cos, sin)`` tables ``[rows, head_dim]`` of the model's RoPE at positions ``0 .. rows - 1``
            (``RotaryEmbedding.tables``, every ``positions`` below ``rows``), or ``None``: a Llama model then
            indexes them (one kernel each, the same bits) instead of computing cos / sin (seven kernels).
        small_chunks_from: the batch from which the decode-attention kernel may attend in 32-slot chunks
            (``small_chunks_from`` of :func:`flash_llm.kernels.decode_attention_cuda`; ``None``: its default).
        l2_next: per layer, the ``(address, bytes)`` table the decode-attention kernel asks L2 for
            (:func:`flash_llm.kernels.l2_warm_ranges` over the layer's :meth:`after_attention` weights), or ``None``.
        l2_stream: a side stream for that warm-up (:data:`flash_llm.kernels.L2_WARM_SIDE`): forked where the attention
            starts, its own kernel instead of the attention's; whoever passes it joins it back.  ``None``: inside.
    """

    positions: torch.Tensor
    mask: torch.Tensor | None = None
    cache: KVCache | None = None
    slots: torch.Tensor | None = None
    kv_len: int = 0
    rope: "tuple[torch.Tensor, torch.Tensor] | None" = None
    small_chunks_from: int | None = None
    l2_next: "list[torch.Tensor | None] | None" = None
    l2_stream: "torch.cuda.Stream | None" = None


#: {module class: its name where its ``forward`` is not flash-llm's or torch's (:func:`overridden_forward`), else None}
_OVERRIDES: dict[type, str | None] = {}


def _forward_owner(cls: type) -> str | None:
    """``cls.__name__`` where the ``forward`` its instances run is defined outside flash-llm and torch (the first class
    of its MRO that defines one), else None."""
    owner = next((c for c in cls.__mro__ if "forward" in c.__dict__), nn.Module)
    return None if (owner.__module__ or "").partition(".")[0] in ("flash_llm", "torch") else cls.__name__


def overridden_forward(m: nn.Module) -> str | None:
    """The name of ``m``'s class where the ``forward`` it runs is defined by a class outside flash-llm and torch (the
    first of its MRO that defines one): a subclass of ``nn.Linear``, :class:`~flash_llm.SparseLinear`,
    :class:`~flash_llm.models.MergedLinear`, ``LlamaRMSNorm``... adding a LoRA term or scaling the output, whose
    ``forward`` a module rebuilt from the weights, or a fused path reading them, would skip; also under a class torch
    derives from it (``torch.nn.utils.parametrize``, FSDP2), which defines no ``forward`` of its own.  Else None: the
    package's own classes (the tensor-parallel layers, the quantizer's shells) and torch's.  (Cached per class; under
    ``torch.compile`` worked out from the class each time, so the cache is no guard of compiled graphs.)"""
    cls = type(m)
    if torch.compiler.is_compiling():
        return _forward_owner(cls)
    if cls not in _OVERRIDES:
        _OVERRIDES[cls] = _forward_owner(cls)
    return _OVERRIDES[cls]


def hooked(*modules: nn.Module | None) -> bool:
    """Whether calling any of ``modules`` (None skipped) runs more than its base class's ``forward``: forward or
    backward hooks / pre-hooks of its own or global ones (the test of ``nn.Module.__call__``), a ``forward`` replaced on
    the instance, or one its class overrides (:func:`overridden_forward`: a subclass of ``SparseLinear``, a norm...).  A
    fused path that reads such a module's weights instead of calling it would skip them (the output would change
    silently), so it calls the modules instead."""
    g = _nn_module
    if g._global_forward_hooks or g._global_forward_pre_hooks or g._global_backward_hooks \
            or g._global_backward_pre_hooks:
        return True
    return any(m is not None and bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                                      or m._backward_pre_hooks or "forward" in m.__dict__ or overridden_forward(m))
               for m in modules)


def after_attention_weights(layer: nn.Module) -> list:
    """The weights (a sparse format, a dense tensor) of the projections a decoder layer runs right after its
    attention, in order (the layer's ``after_attention()``; none for a layer without it or a module it does not
    know): what :class:`~flash_llm.engine.Engine` asks L2 for while the attention runs."""
    from ..nn import SparseLinear

    def weight(m):
        m = getattr(m, "layer", m)  # (a MergedLinear's stacked layer)
        return m.weight if isinstance(m, SparseLinear) or type(m) is nn.Linear else None

    find = getattr(layer, "after_attention", None)
    return [] if find is None else [w for w in (weight(m) for m in find()) if w is not None]


def padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, 1, T, T]`` bool attention mask for a padded batch: causal, keys restricted to real tokens, and
    every query sees at least itself (so padding rows stay finite instead of NaN)."""
    t = attention_mask.shape[1]
    dev = attention_mask.device
    causal = torch.ones(t, t, dtype=torch.bool, device=dev).tril()
    eye = torch.eye(t, dtype=torch.bool, device=dev)
    return causal & (attention_mask.bool()[:, None, None, :] | eye)


def additive_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A bool attention mask (True attends) as the additive one ``scaled_dot_product_attention`` makes of it:
    0 where True, ``-inf`` where False, in ``dtype``.  Done once per forward instead of inside every layer's
    attention call (three small kernels per layer per decode step: a fill, a logical not and a masked fill).
    Float masks and ``None`` pass through."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def padded_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` int64 positions of a padded batch: the number of real tokens before each one (padding gets
    0), as Hugging Face ``generate`` computes them."""
    m = attention_mask.long()
    return ((m.cumsum(1) - 1) * m).clamp_(min=0)


def default_attend(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   positions: torch.Tensor | None) -> Attend:
    """The :class:`Attend` of a plain forward over ``input_ids [B, T]`` (no cache)."""
    b, t = input_ids.shape
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected "
                             f"{tuple(input_ids.shape)} (the shape of input_ids)")
        attention_mask = attention_mask.to(input_ids.device)
        if positions is None:
            positions = padded_positions(attention_mask)
        # (all ones: plain causal, unless compiling: a branch on the mask's values is data-dependent, which
        # fullgraph refuses, and the padding mask of all ones is the causal mask)
        mask = (padding_mask(attention_mask) if torch.compiler.is_compiling() or not bool(attention_mask.bool().all())
                else None)
    else:
        mask = None
    if positions is None:
        positions = torch.arange(t, device=input_ids.device).expand(b, t)
    elif positions.shape != input_ids.shape:
        raise ValueError(f"positions has shape {tuple(positions.shape)}; expected {tuple(input_ids.shape)}")
    return Attend(positions=positions, mask=mask)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              scale: float | None) -> torch.Tensor:
    """Scaled dot-product attention with grouped-query heads.

    Args:
        q: ``[B, H, T, D]`` queries.
        k, v: ``[B, Hkv, S, D]`` keys and values, ``H`` a multiple of ``Hkv``; query head ``h`` uses kv head
            ``h // (H / Hkv)`` (HF's ``repeat_kv`` order).
        mask: ``[B, 1, T, S]`` bool (True attends), or additive float in the dtype of ``q`` (:func:`additive_mask`),
            or ``None`` for causal attention with ``S == T``.
        scale: softmax scale; ``None`` means ``1 / sqrt(D)``.

    Returns:
        ``[B, T, H * D]``.  The ``H / Hkv`` query heads of a group are stacked along the query axis, so keys
        and values are read in place (no ``repeat_interleave`` copy of the cache).
    """
    b, h, t, d = q.shape
    hkv = k.shape[1]
    rep = h // hkv
    if mask is None and t > 1 and k.shape[2] != t:  # (SDPA's is_causal aligns the queries with the first keys)
        raise ValueError(f"attention: mask=None means causal attention over the queries themselves, but {t} queries "
                         f"attend {k.shape[2]} keys (a cache); pass the mask (Attend.mask)")
    if rep == 1:
        # (a branch, not is_causal=mask is None and t > 1: under torch.compile with a dynamic length that is a
        # symbolic bool, which is_causal refuses; the branch makes dynamo guard on it)
        if mask is None and t > 1:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        return out.transpose(1, 2).reshape(b, t, h * d)
    if mask is None:
        mask = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()[None, None]
    qg = q.reshape(b, hkv, rep * t, d)
    if t > 1:  # query row r * T + t of a group is head r, token t
        mask = mask[:, :, None].expand(mask.shape[0], 1, rep, t, mask.shape[-1]).reshape(mask.shape[0], 1, rep * t,
                                                                                        mask.shape[-1])
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)
    return out.reshape(b, h, t, d).transpose(1, 2).reshape(b, t, h * d)


#: Decode steps (one token per sequence, with a KV cache, on CUDA) may attend through flash-llm's decode-attention
#: kernel (``kernels.decode_attention_cuda``: the cache write and the attention in one launch, flash-decoding over
#: chunks of 64 slots) instead of the cache write and ``scaled_dot_product_attention``.  ``FLASH_LLM_DECODE_ATTENTION``
#: (read at import) or setting this: ``"auto"`` (the default) where the kernel measured faster: batch x attended
#: slots up to :data:`DECODE_ATTENTION_MAX_WORK`; ``"1"`` always, ``"0"`` never.  H200, ``bench_decode_attention.py
#: --rope`` (session 16, the kernel against the PyTorch path): 4.0x / 5.7x at batch 1 with 256 / 2048 slots, 3.1x at
#: batch 16 and 1.7x at batch 64 with 256, 1.08x at batch 16 with 2048, 0.76x at batch 64 with 2048.  End to end on
#: Llama-3-8B at batch 64 (``--fuse --merge``, session 17, the kernel launched plainly there, see
#: ``kernels.DECODE_ATTN_PDL_MAX_WORK``): 6.267 -> 6.130 ms per token dense, 6.378 -> 6.284 at 80 %.
DECODE_ATTENTION = env_choice("FLASH_LLM_DECODE_ATTENTION", "auto", ("auto", "1", "0"), on="1", off="0")
DECODE_ATTENTION_MAX_WORK = 32768


def use_decode_attention(q: torch.Tensor, attend: Attend) -> bool:
    """Whether this forward's attention may go through :func:`decode_attention`'s kernel: a cached decode step (one
    query token) on a CUDA device, and :data:`DECODE_ATTENTION` ``"1"``, or ``"auto"`` with batch x ``kv_len`` at
    most :data:`DECODE_ATTENTION_MAX_WORK`."""
    if attend.cache is None or q.shape[2] != 1 or not q.is_cuda:
        return False
    return decode_attention_wanted(q.shape[0], attend.kv_len)


def decode_attention_wanted(batch: int, kv_len: int, mode: str | bool | None = None) -> bool:
    """The policy of :func:`use_decode_attention` for ``batch`` sequences attending ``kv_len`` slots, under ``mode``
    (default :data:`DECODE_ATTENTION`)."""
    mode = str(DECODE_ATTENTION if mode is None else mode)
    if mode in ("1", "True"):
        return True
    return mode == "auto" and batch * kv_len <= DECODE_ATTENTION_MAX_WORK


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attend: Attend, layer: int,
                     scale: float | None, rope: "tuple[torch.Tensor, torch.Tensor, bool] | None" = None
                     ) -> torch.Tensor:
    """Write ``k, v [B, Hkv, 1, D]`` into ``attend.cache`` at ``attend.slots`` and attend ``q [B, H, 1, D]`` over the
    first ``attend.kv_len`` slots: one kernel launch where :func:`flash_llm.kernels.decode_attention_ok` accepts the
    tensors, else :meth:`KVCache.update` and :func:`attention`.  ``scale`` as in :func:`attention`.  ``rope``
    ``(cos, sin, fused)``: ``q`` and ``k`` are rotated first (inside the kernel, else by ``_fused.rope``, compiled when
    ``fused``).  Returns ``[B, 1, H * D]``."""
    cache, slots = attend.cache, attend.slots
    cos, sin = (None, None) if rope is None else rope[:2]
    if slots.numel() == 1 and slots.dtype == torch.int64 and slots.device == q.device:
        from .. import kernels

        kc, vc = cache.k[layer], cache.v[layer]
        if kernels.decode_attention_ok(q, k, v, kc, vc, attend.mask, attend.kv_len, cos, sin):
            s = q.shape[-1] ** -0.5 if scale is None else scale
            l2 = None if attend.l2_next is None else attend.l2_next[layer]
            if l2 is not None and attend.l2_stream is not None:  # beside the attention, not inside it
                attend.l2_stream.wait_stream(torch.cuda.current_stream(q.device))
                with torch.cuda.stream(attend.l2_stream):
                    kernels.l2_warm_cuda(l2)
                l2 = None
            return kernels.decode_attention_cuda(q, k, v, kc, vc, slots, attend.mask, attend.kv_len, s, cos=cos,
                                                 sin=sin, small_chunks_from=attend.small_chunks_from, l2=l2)
    if rope is not None:
        from . import _fused

        q, k = _fused.op("rope", rope[2])(q, k, cos, sin)
    k, v = cache.update(layer, k, v, slots, attend.kv_len)
    return attention(q, k, v, attend.mask, scale)


def _differ(a, b) -> bool:
    """Whether two state-dict values of a tied pair hold different values: False for the same tensor (or a view of
    the same bytes), and where they cannot be compared here (not tensors, meta, shapes that differ: the load itself
    reports those)."""
    if a is b or not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return False
    if a.shape != b.shape or a.is_meta or b.is_meta:
        return False
    if (a.device, a.dtype, a.stride(), a.data_ptr()) == (b.device, b.dtype, b.stride(), b.data_ptr()):
        return False
    if a.device != b.device:
        b = b.to(a.device)
    if a.dtype != b.dtype:  # (in the smallest dtype holding both exactly: fp16 and bf16 as fp32)
        common = torch.promote_types(a.dtype, b.dtype)
        a, b = a.to(common), b.to(common)
    return not torch.equal(a, b)


class CausalLM(nn.Module):
    """What both families' top-level modules share: tying, the forward signature, state-dict hooks."""

    config: "ModelConfig"  # noqa: F821

    def _embed_key(self) -> str:
        raise NotImplementedError

    def input_embeddings(self) -> nn.Embedding:
        return self.get_submodule(self._embed_key().removesuffix(".weight"))

    def tie_weights(self) -> None:
        """Make ``lm_head.weight`` the input embedding's parameter again (when ``config.tie_word_embeddings``)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.input_embeddings().weight

    def _install_tying_hooks(self) -> None:
        # A tied checkpoint may store the shared matrix under one of its two names only (HF's safetensors files omit
        # lm_head.weight; others keep lm_head.weight alone, and transformers loads both); and
        # load_state_dict(assign=True) assigns the two keys separately, untying them.  Fill the missing key in
        # before loading, re-tie after.  A state dict whose two tensors differ (an untied model's, or a checkpoint
        # whose config says tied: transformers 5 then loads them untied) is refused here, before any tensor of the
        # model changes: the re-tie would silently drop one of them.
        def pre(module, state_dict, prefix, *args):
            if not self.config.tie_word_embeddings:
                return
            key, head = prefix + self._embed_key(), prefix + "lm_head.weight"
            if head not in state_dict and key in state_dict:
                state_dict[head] = state_dict[key]
            elif key not in state_dict and head in state_dict:
                state_dict[key] = state_dict[head]
            elif key in state_dict and isinstance(self.lm_head, nn.Linear) and _differ(state_dict[head],
                                                                                        state_dict[key]):
                raise ValueError(f"'{head}' and '{key}' are tied in the model but differ in the state dict "
                                 "(config.tie_word_embeddings is True): build the model from a config with "
                                 "tie_word_embeddings=False to load both, or leave one of the two out")

        def post(module, incompatible):
            if isinstance(self.lm_head, nn.Linear):
                self.tie_weights()

        self.register_load_state_dict_pre_hook(pre)
        self.register_load_state_dict_post_hook(post)

    def _check_positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                         positions: torch.Tensor | None, attend: Attend) -> None:
        """Refuse the positions of a plain forward (no ``attend`` given) that the model cannot embed; nothing here
        (a family with a bounded position table checks them)."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                positions: torch.Tensor | None = None, attend: Attend | None = None,
                last_only: bool = False) -> torch.Tensor:
        """Logits of a batch of token sequences.

        Args:
            input_ids: ``[B, T]`` int64 token ids.
            attention_mask: optional ``[B, T]`` (1 = token, 0 = padding; left padding for generation).  With
                it, positions count real tokens only, as in Hugging Face ``generate``.
            positions: optional ``[B, T]`` int64 positions (default ``0..T-1``, or from ``attention_mask``).
            attend: how to attend, with a KV cache (built by :class:`flash_llm.engine.Engine`); overrides
                ``attention_mask`` and ``positions``.
            last_only: compute logits for the last position only.

        Returns:
            ``[B, T, vocab_size]`` (``[B, 1, vocab_size]`` with ``last_only``) in the model's dtype.
        """
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq]; got shape {tuple(input_ids.shape)}")
        if attend is None:
            attend = default_attend(input_ids, attention_mask, positions)
            self._check_positions(input_ids, attention_mask, positions, attend)
        if attend.mask is not None and attend.mask.dtype == torch.bool:  # converted once, not in every layer
            attend = replace(attend, mask=additive_mask(attend.mask, self.input_embeddings().weight.dtype))
        h = self.model(input_ids, attend)
        if last_only:
            h = h[:, -1:]
        return self.lm_head(h)

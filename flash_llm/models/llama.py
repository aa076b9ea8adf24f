"""A compact Llama (2 / 3 / 3.1) causal LM whose ``state_dict`` keys are those of transformers'
``LlamaForCausalLM`` (``model.embed_tokens.weight``, ``model.layers.0.self_attn.q_proj.weight``, ...,
``model.norm.weight``, ``lm_head.weight``), so a Hugging Face state dict loads with ``load_state_dict``.

RMSNorm, RoPE (plain or Llama 3.1 ``llama3`` scaling) and the SwiGLU MLP compute in the same order and
precision as transformers; attention goes through ``scaled_dot_product_attention`` with grouped-query heads.
Every projection is a plain ``nn.Linear`` (q, k, v, o, gate, up, down kept separate, not fused), so
``flash_llm.sparsify_`` swaps them for ``SparseLinear`` and column/row sharding stays possible;
:func:`flash_llm.models.merge_projections` stacks q, k, v and gate, up into one matmul each for decoding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import _fused
from .. import ops
from .._env import env_flag
from ..ops import spmm_silu_mul
from ._merge import project, sparse_gate_up, sparse_layer
from ._common import Attend, CausalLM, attention, decode_attention, hooked, use_decode_attention
from .config import ModelConfig

#: ``FLASH_LLM_FUSE_NORMS=0``: the fused model never runs :meth:`LlamaDecoderLayer.forward_one_token` (the RMSNorms
#: and residual adds inside the sparse projections at one token) and keeps :meth:`~LlamaDecoderLayer.forward_deferred`
FUSE_NORMS = env_flag("FLASH_LLM_FUSE_NORMS", True)
#: ``FLASH_LLM_SILU_REDUCE=0``: the fused MLP runs ``silu(gate) * up`` as its own compiled kernel even where the merged
#: gate / up projection is sparse (else inside its split-K reduction, :func:`flash_llm.ops.spmm_silu_mul`)
SILU_REDUCE = env_flag("FLASH_LLM_SILU_REDUCE", True)

ACT = {"silu": F.silu, "relu": F.relu, "gelu": F.gelu}


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """``[head_dim / 2]`` float32 inverse frequencies of RoPE, computed on the CPU exactly as transformers
    does (float32 powers of ``rope_theta``), with Llama 3.1's frequency-dependent scaling when
    ``config.rope_scaling`` is of type ``llama3``."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    rs = config.rope_scaling
    if rs is None:
        return inv_freq
    # Llama 3.1: wavelengths longer than original_len / low_freq_factor are slowed down by `factor`, shorter
    # than original_len / high_freq_factor are kept, and the band between is interpolated linearly in
    # original_len / wavelength.
    factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old_len = rs["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """``cos, sin [B, T, head_dim]`` (in the activations' dtype) for positions ``[B, T]``.

    ``inv_freq`` is a non-persistent float32 buffer (not in the state dict, as in transformers); on a model
    built on ``meta``, or after a dtype cast of the model, it is recomputed at the next forward.
    """

    inv_freq: torch.Tensor

    def __init__(self, config: ModelConfig, device=None):
        super().__init__()
        self.config = config
        inv = rope_inv_freq(config)
        self.register_buffer("inv_freq", inv.to(device) if device is not None else inv, persistent=False)

    def _apply(self, fn, recurse=True):
        # .half() / .to(dtype) / to_empty() would round or discard the frequencies: recompute them (float32)
        super()._apply(fn, recurse)
        if not self.inv_freq.is_meta:
            self.inv_freq = rope_inv_freq(self.config).to(self.inv_freq.device)
        return self

    def forward(self, x: torch.Tensor, positions: torch.Tensor,
                tables: "tuple[torch.Tensor, torch.Tensor] | None" = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos, sin [*positions.shape, head_dim]`` in ``x``'s dtype; from ``tables`` (:meth:`tables`, rows by
        position) where given."""
        if tables is not None:
            return tables[0][positions], tables[1][positions]
        return self._cos_sin(positions, x.dtype)

    def _cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inv_freq.device != positions.device:  # built on meta and loaded with assign=True
            self.inv_freq = rope_inv_freq(self.config).to(positions.device)
        freqs = positions[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def tables(self, rows: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos, sin [rows, head_dim]`` in ``dtype`` on ``device`` at positions ``0 .. rows - 1``, computed as
        :meth:`forward` computes them (the same bits), for :attr:`Attend.rope`."""
        return self._cos_sin(torch.arange(rows, device=device), dtype)


class LlamaRMSNorm(nn.Module):
    """RMSNorm as transformers computes it: normalize in float32, cast back, then scale by ``weight``.
    ``fused``: one compiled kernel instead of eight (:func:`flash_llm.models.set_fused`)."""

    def __init__(self, hidden_size: int, eps: float, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.eps = eps
        self.fused = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _fused.op("rms_norm", self.fused)(x, self.weight, self.eps)


class LlamaAttention(nn.Module):
    _merge_groups = {"qkv_proj": ("q_proj", "k_proj", "v_proj")}

    def __init__(self, config: ModelConfig, layer_idx: int, **kw):
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, c.q_size, bias=c.attention_bias, **kw)
        self.k_proj = nn.Linear(c.hidden_size, c.kv_size, bias=c.attention_bias, **kw)
        self.v_proj = nn.Linear(c.hidden_size, c.kv_size, bias=c.attention_bias, **kw)
        self.o_proj = nn.Linear(c.q_size, c.hidden_size, bias=c.attention_bias, **kw)
        self.qkv_proj = None  # q, k, v stacked (flash_llm.models.merge_projections)
        self.fused = False

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: Attend) -> torch.Tensor:
        return self.o_proj(self.attend_heads(*project(self, "qkv_proj", x), cos, sin, attend))

    def attend_heads(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     attend: Attend) -> torch.Tensor:
        """The attention between the projections: ``q, k, v [B, T, heads * D]`` (the q / k / v projections'
        outputs) -> ``[B, T, heads * D]``, the o projection's input; writes the cache."""
        b, t, _ = q.shape
        q = q.view(b, t, -1, self.head_dim).transpose(1, 2)
        k = k.view(b, t, -1, self.head_dim).transpose(1, 2)
        v = v.view(b, t, -1, self.head_dim).transpose(1, 2)
        if use_decode_attention(q, attend):  # RoPE, the cache write and the attention in one kernel
            return decode_attention(q, k, v, attend, self.layer_idx, None, (cos, sin, self.fused))
        if self.fused and attend.cache is not None:  # RoPE and the cache write in one compiled function
            kc, vc = attend.cache.rows(self.layer_idx, b)
            q = _fused.op("rope_cache", True)(q, k, v, cos, sin, kc, vc, attend.slots)
            k, v = attend.cache.rows(self.layer_idx, b, attend.kv_len)
        else:
            q, k = _fused.op("rope", self.fused)(q, k, cos, sin)
            if attend.cache is not None:
                k, v = attend.cache.update(self.layer_idx, k, v, attend.slots, attend.kv_len)
        return attention(q, k, v, attend.mask, None)


class LlamaMLP(nn.Module):
    _merge_groups = {"gate_up_proj": ("gate_proj", "up_proj")}

    def __init__(self, config: ModelConfig, **kw):
        super().__init__()
        c = config
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias, **kw)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias, **kw)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias, **kw)
        self.act = ACT[c.activation]
        self.gate_up_proj = None  # gate, up stacked (flash_llm.models.merge_projections)
        self.fused = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and self.act is F.silu and SILU_REDUCE and not torch.is_grad_enabled():  # (no autograd formula)
            gu = sparse_gate_up(self)
            # silu x up inside the sparse projection's reduction (not past hooks of gate_up_proj, which it skips)
            if gu is not None and x.dtype == gu.weight_dtype and not hooked(self.gate_up_proj, gu):
                return self.down_proj(spmm_silu_mul(x, gu.weight))
        gate, up = project(self, "gate_up_proj", x)
        if self.fused and self.act is F.silu:
            return self.down_proj(_fused.op("silu_mul", True)(gate, up))
        return self.down_proj(self.act(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, **kw):
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx, **kw)
        self.mlp = LlamaMLP(config, **kw)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, config.norm_eps, **kw)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, config.norm_eps, **kw)
        self.fused = False

    def after_attention(self) -> list[nn.Module]:
        """The projections that run right after the attention, in order: o, then gate / up (merged or not)."""
        mlp = self.mlp
        first = [m for m in (getattr(mlp, n, None) for n in ("gate_up_proj", "gate_proj", "up_proj")) if m is not None]
        return [self.self_attn.o_proj, *first]

    def forward(self, x, cos, sin, attend: Attend) -> torch.Tensor:
        if self.fused:
            x, delta = self.forward_deferred(x, None, cos, sin, attend)
            return x + delta
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attend)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_deferred(self, x: torch.Tensor, delta: torch.Tensor | None, cos, sin, attend: Attend
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """The fused layer with its residual adds folded into the norms: takes the residual stream ``x`` and the
        previous layer's MLP output ``delta`` not yet added to it (``None`` for the first layer) and returns
        ``(x', mlp_out)``, where ``x' + mlp_out`` is the layer's output.  Each add runs in the kernel of the
        RMSNorm that follows it (:func:`~flash_llm.models._fused.add_rms_norm`): one kernel fewer per layer.  Where
        a norm has hooks (:func:`~flash_llm.models._common.hooked`) the norms are called as modules instead, so the
        hooks run."""
        norm, post = self.input_layernorm, self.post_attention_layernorm
        if hooked(norm, post):
            x = x if delta is None else x + delta
            x = x + self.self_attn(norm(x), cos, sin, attend)
            return x, self.mlp(post(x))
        if delta is None:
            h = _fused.op("rms_norm", True)(x, norm.weight, norm.eps)
        else:
            x, h = _fused.op("add_rms_norm", True)(x, delta, norm.weight, norm.eps)
        x, h = _fused.op("add_rms_norm", True)(x, self.self_attn(h, cos, sin, attend), post.weight, post.eps)
        return x, self.mlp(h)

    def sparse_projections(self, x: torch.Tensor) -> tuple | None:
        """The layer's ``(qkv, o, gate_up, down)`` :class:`~flash_llm.SparseLinear` layers when
        :meth:`forward_one_token` may run it for ``x``: one token in all (``x [1, 1, H]``, contiguous; or a decode step
        of 2 sequences, ``x [2, 1, H]``, with :data:`flash_llm.kernels.DR_NT_NORM`),
        :data:`FUSE_NORMS`, no autograd, q / k / v and gate / up merged, all four sparse without bias and both norms'
        weights in ``x``'s dtype, SiLU, no hooks on the modules it skips (the norms, the attention, the MLP and the
        projections, :func:`~flash_llm.models._common.hooked`), and on CUDA the kernels able to do the elementwise work
        (:func:`_kernels_fuse`: Tiled-CSL with split-K) and to take both norms' weights (:func:`_norms_fuse`: finite
        ones); else None (the layer then runs :meth:`forward_deferred`)."""
        if not FUSE_NORMS or x.shape[1] != 1 or x.shape[0] > _one_token_batch() or torch.is_grad_enabled() \
                or self.mlp.act is not F.silu:
            return None
        norms = (self.input_layernorm.weight, self.post_attention_layernorm.weight)
        if not x.is_contiguous() or any(w.dtype != x.dtype or w.device != x.device for w in norms):
            return None  # (spmm_add_ writes x in place; the norms' weights scale x in its dtype)
        a = self.self_attn
        layers = (sparse_layer(a, "qkv_proj") if a.qkv_proj is not None else None, sparse_layer(a, "o_proj"),
                  sparse_gate_up(self.mlp), sparse_layer(self.mlp, "down_proj"))
        if any(p is None or p.weight_dtype != x.dtype for p in layers) or not _norms_fuse(norms, x):
            return None
        if hooked(self.input_layernorm, self.post_attention_layernorm, a, self.mlp, a.qkv_proj, a.o_proj,
                  self.mlp.gate_up_proj, self.mlp.down_proj, *layers):  # (their hooks would be skipped)
            return None
        return layers if _kernels_fuse(layers, x) else None

    def forward_one_token(self, x: torch.Tensor, cos, sin, attend: Attend, layers: tuple) -> torch.Tensor:
        """The fused layer for one token on sparse projections (``layers`` from :meth:`sparse_projections`): each
        RMSNorm runs inside the projection after it (:func:`flash_llm.ops.spmm_rms_norm`), each residual add inside
        the projection before it (:func:`flash_llm.ops.spmm_add_`), SiLU x up inside the gate / up projection.  With
        the Tiled-CSL kernels a layer is then 4 spmm launches that sum their own splits (``kernels.N1_FUSED``; else
        4 split-K reductions more) and the attention, against 12 launches for :meth:`forward_deferred`.  ``x [1, 1,
        H]`` (``[2, 1, H]``: a step of 2 sequences, :data:`flash_llm.kernels.DR_NT_NORM`), the residual stream, is
        updated in place and returned."""
        qkv, o, gate_up, down = layers
        a, norm, post = self.self_attn, self.input_layernorm, self.post_attention_layernorm
        q, k, v = ops.spmm_rms_norm(x, norm.weight, norm.eps, qkv.weight).split(a.qkv_proj.sizes, dim=-1)
        ops.spmm_add_(x, a.attend_heads(q, k, v, cos, sin, attend), o.weight)
        ops.spmm_add_(x, ops.spmm_rms_norm(x, post.weight, post.eps, gate_up.weight, act="silu_mul"), down.weight)
        return x


_FUSES: dict[tuple, bool] = {}


def _one_token_batch() -> int:
    """The most sequences a decode step may run :meth:`LlamaDecoderLayer.forward_one_token` on: 2 with
    :data:`flash_llm.kernels.DR_NT_NORM` (DeltaRows' 2-token kernel takes the RMSNorm), else 1."""
    from .. import kernels

    return 2 if kernels.DR_NT_NORM else 1


def _norms_fuse(norms: tuple, x: torch.Tensor) -> bool:
    """Whether the kernels take these RMSNorm weights inside for ``x``'s dtype (:func:`flash_llm.kernels.rms_fusable`:
    finite weights, in fp16 above 1 through a copy scaled into [-1, 1]; not one with NaN / inf, nor inside a CUDA-graph
    capture one not checked before it).  Where they do not, ``spmm_cuda`` would run each norm as separate eager
    operations (8 kernels), slower than ``forward_deferred``'s compiled norms, so the layer runs that instead.  The
    CPU runs the reference either way: True."""
    if not x.is_cuda:
        return True
    from .. import kernels

    return all(kernels.rms_fusable(w, x.dtype) for w in norms)


def _kernels_fuse(layers: tuple, x: torch.Tensor) -> bool:
    """Whether, on ``x``'s device, the kernels do the elementwise work of :meth:`LlamaDecoderLayer.forward_one_token`
    for these ``(qkv, o, gate_up, down)`` layers (:func:`flash_llm.kernels.epilogue_fusable`: Tiled-CSL with split-K at
    N = 1, or DeltaRows with gate / up paired).  Elsewhere the one-token ops would run it as separate operations,
    slower than the compiled norms of ``forward_deferred``.  The CPU runs the reference either way: True.  Cached per
    weights, device, dtype, token count (1, or 2 with :data:`flash_llm.kernels.DR_NT_NORM`) and that switch."""
    if not x.is_cuda:
        return True
    from .. import kernels
    from ..reference import FORMAT_IDS

    n = x.shape[0] * x.shape[1]
    key = (x.device, x.dtype, n, kernels.DR_NT_NORM) + tuple(
        (type(p.weight), p.weight.data.data_ptr(), p.weight.data.numel(), p.weight.shape)
        for p in layers)
    if key not in _FUSES:
        wants = ({"norm": True}, {"add": True}, {"norm": True, "act": "silu_mul"}, {"add": True})
        _FUSES[key] = kernels.supported(x.device)[0] and all(
            kernels.epilogue_fusable(FORMAT_IDS[type(p.weight)], p.weight.data, *p.weight.shape, n, x.dtype, x.device,
                                     offsets=p.weight.offsets, **want) for p, want in zip(layers, wants))
    return _FUSES[key]


class LlamaModel(nn.Module):
    """The decoder stack (HF's ``LlamaModel``): ``embed_tokens``, ``layers``, ``norm``."""

    def __init__(self, config: ModelConfig, **kw):
        super().__init__()
        self.fused = False  # set_fused: the layers' residual adds run inside the next norm's kernel
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.padding_idx, **kw)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i, **kw) for i in range(config.num_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, config.norm_eps, **kw)
        dev = kw.get("device")
        self.rotary_emb = RotaryEmbedding(config, device=None if dev is None or torch.device(dev).type == "meta"
                                          else dev)

    def forward(self, input_ids: torch.Tensor, attend: Attend) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(x, attend.positions, attend.rope)
        if self.fused and len(self.layers) and all(layer.fused for layer in self.layers):
            delta = None  # the last layer's MLP output, not yet added to x
            # seen: a hook has seen x (and may keep it): forward_one_token, which updates x in place, takes a copy
            seen = hooked(self.embed_tokens, self.rotary_emb)  # (rotary_emb is called with x too)
            for layer in self.layers:
                if hooked(layer):  # (called as a module, so that its hooks run)
                    x, delta, seen = layer(x if delta is None else x + delta, cos, sin, attend), None, True
                    continue
                sparse = layer.sparse_projections(x)
                if sparse is None:
                    x, delta = layer.forward_deferred(x, delta, cos, sin, attend)
                    continue
                if delta is not None:
                    x, delta = x + delta, None
                elif seen:
                    x = x.clone()
                x, seen = layer.forward_one_token(x, cos, sin, attend, sparse), False
            if hooked(self.norm):
                return self.norm(x if delta is None else x + delta)
            if delta is None:
                return _fused.op("rms_norm", True)(x, self.norm.weight, self.norm.eps)
            return _fused.op("add_rms_norm", True)(x, delta, self.norm.weight, self.norm.eps)[1]
        for layer in self.layers:
            x = layer(x, cos, sin, attend)
        return self.norm(x)


class LlamaForCausalLM(CausalLM):
    """Llama causal LM; ``state_dict()`` keys equal transformers' ``LlamaForCausalLM``'s.

    Build with :func:`flash_llm.models.from_config`; load HF weights with ``load_state_dict`` (strict).
    """

    def __init__(self, config: ModelConfig, *, device=None, dtype=None):
        super().__init__()
        if config.family != "llama":
            raise ValueError(f"LlamaForCausalLM needs a llama config, got family {config.family!r}")
        kw = {"device": device, "dtype": dtype}
        self.config = config
        self.model = LlamaModel(config, **kw)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, **kw)
        self.tie_weights()
        self._install_tying_hooks()

    def _embed_key(self) -> str:
        return "model.embed_tokens.weight"

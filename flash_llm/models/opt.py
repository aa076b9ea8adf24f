"""A compact OPT causal LM whose ``state_dict`` keys are those of transformers' ``OPTForCausalLM``
(``model.decoder.embed_tokens.weight``, ``model.decoder.embed_positions.weight``,
``model.decoder.layers.0.self_attn.q_proj.weight``, ``model.decoder.layers.0.fc1.weight``, ...,
``lm_head.weight``), so a Hugging Face state dict loads with ``load_state_dict``.

Learned positions with OPT's offset of 2, pre- or post-LayerNorm (``do_layer_norm_before``), the optional
``project_in`` / ``project_out`` of OPT-350m, the query scaled before the attention product as transformers
does.  Every projection is a plain ``nn.Linear``, so ``flash_llm.sparsify_`` converts them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from . import _fused
from . import llama as _llama
from ._common import Attend, CausalLM, attention, decode_attention, hooked, use_decode_attention
from ._merge import project, sparse_layer
from .config import ModelConfig

ACT = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}
POSITION_OFFSET = 2  # OPT's position table has two extra leading rows: position p reads row p + 2


class OPTLearnedPositionalEmbedding(nn.Embedding):
    """``[max_position_embeddings + 2, hidden]`` table; position ``p`` reads row ``p + 2``."""

    def __init__(self, num_positions: int, dim: int, **kw):
        super().__init__(num_positions + POSITION_OFFSET, dim, **kw)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return super().forward(positions + POSITION_OFFSET)


class OPTAttention(nn.Module):
    _merge_groups = {"qkv_proj": ("q_proj", "k_proj", "v_proj")}

    def __init__(self, config: ModelConfig, layer_idx: int, **kw):
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.num_heads, self.head_dim = c.num_heads, c.head_dim
        self.scaling = c.head_dim ** -0.5
        self.k_proj = nn.Linear(c.hidden_size, c.hidden_size, bias=c.attention_bias, **kw)
        self.v_proj = nn.Linear(c.hidden_size, c.hidden_size, bias=c.attention_bias, **kw)
        self.q_proj = nn.Linear(c.hidden_size, c.hidden_size, bias=c.attention_bias, **kw)
        self.out_proj = nn.Linear(c.hidden_size, c.hidden_size, bias=c.attention_bias, **kw)
        self.qkv_proj = None  # q, k, v stacked (flash_llm.models.merge_projections)
        self.fused = False  # the query scaling and the cache write as one compiled function (set_fused)

    def forward(self, x: torch.Tensor, attend: Attend) -> torch.Tensor:
        q, k, v = project(self, "qkv_proj", x)
        return self.out_proj(self.attend_heads(q, k, v, attend))

    def attend_heads(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attend: Attend) -> torch.Tensor:
        """The attention of the projected ``q, k, v [B, T, H * D]`` (the query scaling and the cache write included),
        before ``out_proj``: ``[B, T, H * D]``."""
        b, t, _ = q.shape
        q = q.view(b, t, -1, self.head_dim).transpose(1, 2)
        k = k.view(b, t, -1, self.head_dim).transpose(1, 2)
        v = v.view(b, t, -1, self.head_dim).transpose(1, 2)
        if use_decode_attention(q, attend):  # the cache write, the query scaling and the attention in one kernel
            return decode_attention(q, k, v, attend, self.layer_idx, self.scaling)
        if self.fused and attend.cache is not None:
            kc, vc = attend.cache.rows(self.layer_idx, b)
            q = _fused.op("scale_cache", True)(q, self.scaling, k, v, kc, vc, attend.slots)
            k, v = attend.cache.rows(self.layer_idx, b, attend.kv_len)
        else:
            q = q * self.scaling
            if attend.cache is not None:
                k, v = attend.cache.update(self.layer_idx, k, v, attend.slots, attend.kv_len)
        return attention(q, k, v, attend.mask, 1.0)


class OPTDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, **kw):
        super().__init__()
        c = config
        self.do_layer_norm_before = c.do_layer_norm_before
        self.self_attn = OPTAttention(c, layer_idx, **kw)
        self.self_attn_layer_norm = nn.LayerNorm(c.hidden_size, elementwise_affine=c.layer_norm_elementwise_affine,
                                                 **kw)
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias, **kw)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias, **kw)
        self.final_layer_norm = nn.LayerNorm(c.hidden_size, elementwise_affine=c.layer_norm_elementwise_affine, **kw)
        self.act = ACT[c.activation]
        self.fused = False  # pre-LN layers: residual adds inside the next LayerNorm's kernel (forward_deferred)

    def after_attention(self) -> list[nn.Module]:
        """The projections that run right after the attention, in order: out_proj, then fc1."""
        return [self.self_attn.out_proj, self.fc1]

    def forward_deferred(self, x: torch.Tensor, delta: torch.Tensor | None, attend: Attend
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """A pre-LN layer with its residual adds folded into the LayerNorms that follow them (as Llama's
        ``forward_deferred``): takes the residual stream ``x`` and the previous layer's MLP output ``delta`` not
        yet added (``None`` for the first layer); returns ``(x', mlp_out)`` with ``x' + mlp_out`` the output.  Where
        a LayerNorm has hooks (:func:`~flash_llm.models._common.hooked`) both are called as modules instead, so the
        hooks run."""
        ln1, ln2 = self.self_attn_layer_norm, self.final_layer_norm
        if hooked(ln1, ln2):
            x = x if delta is None else x + delta
            x = x + self.self_attn(ln1(x), attend)
            return x, self.fc2(self.act(self.fc1(ln2(x))))
        if delta is None:
            h = ln1(x)
        else:
            x, h = _fused.op("add_layer_norm", True)(x, delta, ln1.weight, ln1.bias, ln1.eps)
        x, h = _fused.op("add_layer_norm", True)(x, self.self_attn(h, attend), ln2.weight, ln2.bias, ln2.eps)
        return x, self.fc2(self.act(self.fc1(h)))

    def sparse_projections(self, x: torch.Tensor) -> tuple | None:
        """The layer's ``(qkv, out, fc1, fc2)`` :class:`~flash_llm.SparseLinear` layers when
        :meth:`forward_one_token` may run it for ``x``: one token in all (``x [1, 1, H]``, contiguous), pre-LN,
        ``FLASH_LLM_FUSE_NORMS`` on (:data:`flash_llm.models.llama.FUSE_NORMS`), no autograd, ReLU, q / k / v merged,
        all four sparse (biases allowed), both LayerNorms affine in ``x``'s dtype, no hooks on the modules it skips
        (the LayerNorms, the attention and the projections, :func:`~flash_llm.models._common.hooked`), and on CUDA the
        kernels able to do the LayerNorms, ReLU and residual adds (:func:`flash_llm.kernels.epilogue_fusable`:
        DeltaRows); else None (the layer then runs :meth:`forward_deferred`)."""
        if (not _llama.FUSE_NORMS or not self.do_layer_norm_before or x.shape[0] * x.shape[1] != 1
                or torch.is_grad_enabled() or self.act is not F.relu or not x.is_contiguous()):
            return None
        lns = (self.self_attn_layer_norm, self.final_layer_norm)
        if any(ln.weight is None or any(t is not None and (t.dtype != x.dtype or t.device != x.device)
                                        for t in (ln.weight, ln.bias)) for ln in lns):
            return None
        a = self.self_attn
        layers = (sparse_layer(a, "qkv_proj", True) if a.qkv_proj is not None else None,
                  sparse_layer(a, "out_proj", True), sparse_layer(self, "fc1", True), sparse_layer(self, "fc2", True))
        if any(p is None or p.weight_dtype != x.dtype for p in layers):
            return None
        if hooked(*lns, a, a.qkv_proj, *layers):  # (their hooks would be skipped)
            return None
        return layers if _kernels_fuse(layers, x) else None

    def forward_one_token(self, x: torch.Tensor, attend: Attend, layers: tuple) -> torch.Tensor:
        """The fused pre-LN layer for one token on sparse projections (``layers`` from :meth:`sparse_projections`):
        each LayerNorm runs inside the projection after it (:func:`flash_llm.ops.spmm_layer_norm`, ReLU inside fc1's),
        each residual add inside the projection before it (:func:`flash_llm.ops.spmm_add_`): 4 spmm launches and the
        attention, against 8 launches for :meth:`forward_deferred`.  ``x [1, 1, H]``, the residual stream, is updated
        in place and returned."""
        qkv, out, fc1, fc2 = layers
        a, ln1, ln2 = self.self_attn, self.self_attn_layer_norm, self.final_layer_norm
        q, k, v = ops.spmm_layer_norm(x, ln1.weight, ln1.bias, ln1.eps, qkv.weight, qkv.bias).split(
            a.qkv_proj.sizes, dim=-1)
        ops.spmm_add_(x, a.attend_heads(q, k, v, attend), out.weight, out.bias)
        h = ops.spmm_layer_norm(x, ln2.weight, ln2.bias, ln2.eps, fc1.weight, fc1.bias, act="relu")
        ops.spmm_add_(x, h, fc2.weight, fc2.bias)
        return x

    def forward(self, x: torch.Tensor, attend: Attend) -> torch.Tensor:
        if self.fused and self.do_layer_norm_before:
            x, delta = self.forward_deferred(x, None, attend)
            return x + delta
        pre = self.do_layer_norm_before
        h = self.self_attn(self.self_attn_layer_norm(x) if pre else x, attend)
        x = x + h
        if not pre:
            x = self.self_attn_layer_norm(x)
        h = self.fc2(self.act(self.fc1(self.final_layer_norm(x) if pre else x)))
        x = x + h
        return x if pre else self.final_layer_norm(x)


_FUSES: dict[tuple, bool] = {}


def _kernels_fuse(layers: tuple, x: torch.Tensor) -> bool:
    """Whether, on ``x``'s device, the kernels do the elementwise work of :meth:`OPTDecoderLayer.forward_one_token`
    for these ``(qkv, out, fc1, fc2)`` layers (DeltaRows at N = 1: LayerNorm, ReLU, bias and residual add inside).
    The CPU runs the reference either way: True.  Cached per weights, device and dtype."""
    if not x.is_cuda:
        return True
    from .. import kernels
    from ..reference import FORMAT_IDS

    key = (x.device, x.dtype) + tuple((type(p.weight), p.weight.data.data_ptr(), p.weight.data.numel(), p.weight.shape)
        for p in layers)
    if key not in _FUSES:
        wants = ({"norm": True, "layer_norm": True}, {"add": True},
                 {"norm": True, "layer_norm": True, "act": "relu"}, {"add": True})
        _FUSES[key] = kernels.supported(x.device)[0] and all(
            kernels.epilogue_fusable(FORMAT_IDS[type(p.weight)], p.weight.data, *p.weight.shape, 1, x.dtype, x.device,
                                     offsets=p.weight.offsets, **want) for p, want in zip(layers, wants))
    return _FUSES[key]


class OPTDecoder(nn.Module):
    """HF's ``OPTDecoder``: ``embed_tokens``, ``embed_positions``, optional ``project_in`` / ``project_out``,
    ``layers``, optional ``final_layer_norm``."""

    def __init__(self, config: ModelConfig, **kw):
        super().__init__()
        c = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.word_embed_proj_dim, padding_idx=c.padding_idx, **kw)
        self.embed_positions = OPTLearnedPositionalEmbedding(c.max_position_embeddings, c.hidden_size, **kw)
        if c.word_embed_proj_dim != c.hidden_size:
            self.project_out = nn.Linear(c.hidden_size, c.word_embed_proj_dim, bias=False, **kw)
            self.project_in = nn.Linear(c.word_embed_proj_dim, c.hidden_size, bias=False, **kw)
        else:
            self.project_out = self.project_in = None
        if c.do_layer_norm_before and not c.remove_final_layer_norm:
            self.final_layer_norm = nn.LayerNorm(c.hidden_size, elementwise_affine=c.layer_norm_elementwise_affine,
                                                 **kw)
        else:
            self.final_layer_norm = None
        self.layers = nn.ModuleList(OPTDecoderLayer(c, i, **kw) for i in range(c.num_layers))
        self.fused = False  # set_fused: pre-LN layers fold their residual adds into the next LayerNorm

    def forward(self, input_ids: torch.Tensor, attend: Attend) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        if self.project_in is not None:
            x = self.project_in(x)
        x = x + self.embed_positions(attend.positions)
        if self.fused and len(self.layers) and all(la.fused and la.do_layer_norm_before for la in self.layers):
            delta = None  # the last layer's MLP output, not yet added to x
            # seen: a hook has seen x (and may keep it): forward_one_token, which updates x in place, takes a copy
            seen = False  # (x + the positions: a tensor of its own)
            for layer in self.layers:
                if hooked(layer):  # (called as a module, so that its hooks run)
                    x, delta, seen = layer(x if delta is None else x + delta, attend), None, True
                    continue
                sparse = layer.sparse_projections(x)
                if sparse is None:
                    x, delta = layer.forward_deferred(x, delta, attend)
                    continue
                if delta is not None:
                    x, delta = x + delta, None
                elif seen:
                    x = x.clone()
                x, seen = layer.forward_one_token(x, attend, sparse), False
            if delta is None or hooked(self.final_layer_norm):
                x = x if delta is None else x + delta
                x = x if self.final_layer_norm is None else self.final_layer_norm(x)
            elif self.final_layer_norm is not None:
                ln = self.final_layer_norm
                x = _fused.op("add_layer_norm", True)(x, delta, ln.weight, ln.bias, ln.eps)[1]
            else:
                x = x + delta
        else:
            for layer in self.layers:
                x = layer(x, attend)
            if self.final_layer_norm is not None:
                x = self.final_layer_norm(x)
        if self.project_out is not None:
            x = self.project_out(x)
        return x


class OPTModel(nn.Module):
    def __init__(self, config: ModelConfig, **kw):
        super().__init__()
        self.decoder = OPTDecoder(config, **kw)

    def forward(self, input_ids: torch.Tensor, attend: Attend) -> torch.Tensor:
        return self.decoder(input_ids, attend)


class OPTForCausalLM(CausalLM):
    """OPT causal LM; ``state_dict()`` keys equal transformers' ``OPTForCausalLM``'s (``lm_head.weight`` is
    the token embedding when ``config.tie_word_embeddings``, as for every published OPT).

    Build with :func:`flash_llm.models.from_config`; load HF weights with ``load_state_dict`` (strict).
    """

    def __init__(self, config: ModelConfig, *, device=None, dtype=None):
        super().__init__()
        if config.family != "opt":
            raise ValueError(f"OPTForCausalLM needs an opt config, got family {config.family!r}")
        kw = {"device": device, "dtype": dtype}
        self.config = config
        self.model = OPTModel(config, **kw)
        self.lm_head = nn.Linear(config.word_embed_proj_dim, config.vocab_size, bias=False, **kw)
        self.tie_weights()
        self._install_tying_hooks()

    def _embed_key(self) -> str:
        return "model.decoder.embed_tokens.weight"

    def _check_positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                         positions: torch.Tensor | None, attend: Attend) -> None:
        """A plain forward's positions past the learned table (``max_position_embeddings`` rows) are a ValueError
        naming the limit, instead of the embedding's bare IndexError: from the shape alone where the positions are
        ``0..T-1`` (no mask, none given), from their values where they are on the CPU; never a GPU sync (positions
        on a GPU from a mask or the caller are left to the embedding).  The Engine's steps do not come here: it
        bounds ``max_seq`` by the table itself."""
        limit = self.config.max_position_embeddings
        if attention_mask is None and positions is None:
            top = input_ids.shape[1] - 1
        elif attend.positions.device.type == "cpu" and attend.positions.numel() and \
                not torch.compiler.is_compiling():
            top = int(attend.positions.max())
        else:
            return
        if top >= limit:
            raise ValueError(f"position {top} is past OPT's learned position table: max_position_embeddings is "
                             f"{limit} (positions 0..{limit - 1}); shorten the sequence to at most {limit} tokens")

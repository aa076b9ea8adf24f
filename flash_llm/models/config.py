"""``ModelConfig``: the shape and options of an OPT or Llama-family model, read from and written to a Hugging
Face ``config.json``, plus presets at the real published shapes (OPT-13B/30B/66B/175B, Llama-3-8B/70B)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field

FAMILIES = ("llama", "opt")
#: RoPE variants implemented (``rope_scaling`` / ``rope_parameters`` ``rope_type``); others are refused.
ROPE_TYPES = ("default", "llama3")
#: Activations of the MLP (HF names).
ACTIVATIONS = ("relu", "gelu", "silu")
#: Other HF names of those activations, read as the one they name: transformers' ``ACT2FN`` maps ``"swish"`` to
#: ``nn.SiLU``, the function of ``"silu"`` (``SiLUActivation``, ``F.silu``).
ACTIVATION_ALIASES = {"swish": "silu"}
#: transformers' default ``initializer_range`` (Llama) / ``init_std`` (OPT).
DEFAULT_INIT_STD = 0.02
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
# every key of a rope_scaling dict that is read (rope_theta aside: taken out first)
_ROPE_KEYS = ("rope_type", "type", *_LLAMA3_KEYS, "partial_rotary_factor")
DEFAULT_ROPE_THETA = 10000.0
DEFAULT_NORM_EPS = 1e-5
# The defaults of the options only one family reads: the other family's config must leave them there (ValueError
# naming the option otherwise, as it would be silently ignored).
_OPT_ONLY = {"do_layer_norm_before": True, "layer_norm_elementwise_affine": True, "remove_final_layer_norm": False}
_LLAMA_ONLY = {"norm_eps": DEFAULT_NORM_EPS, "rope_theta": DEFAULT_ROPE_THETA, "rope_scaling": None}
#: transformers' ``OPTConfig`` default ``pad_token_id`` (a config.json without the key: the embedding's padding_idx).
OPT_DEFAULT_PAD_TOKEN_ID = 1


class _FamilyDefault:
    """The default of a :class:`ModelConfig` field whose usual value differs by family (:data:`FAMILY_DEFAULTS`):
    ``ModelConfig.__post_init__`` replaces it by the family's."""

    def __repr__(self) -> str:
        return "<the family's default>"


_FAMILY_DEFAULT = _FamilyDefault()
#: The defaults of the fields that differ by family, taken where a ``ModelConfig`` is built without them: Llama's,
#: and OPT's as every published OPT, transformers' ``OPTConfig`` and ``ModelConfig.from_hf`` of an OPT config.json
#: without these keys have them (ReLU, biases, a tied head, pad token 1).
FAMILY_DEFAULTS = {
    "llama": {"tie_word_embeddings": False, "activation": "silu", "attention_bias": False, "mlp_bias": False,
              "pad_token_id": None},
    "opt": {"tie_word_embeddings": True, "activation": "relu", "attention_bias": True, "mlp_bias": True,
            "pad_token_id": OPT_DEFAULT_PAD_TOKEN_ID},
}
# HF ``model_type`` values read as each family (only these two: a mistral or other type is refused, and
# from_pretrained(backend="auto") hands it to transformers).
_MODEL_TYPES = {"llama": "llama", "opt": "opt"}
# The flags of ModelConfig: real bools only (a string such as "false" would count as true wherever it is used).
_FLAGS = ("tie_word_embeddings", "attention_bias", "mlp_bias", "do_layer_norm_before", "layer_norm_elementwise_affine",
          "remove_final_layer_norm")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_positive_number(v) -> bool:
    """``v`` is an int or float (not bool) in ``(0, inf)``: NaN and infinities are not."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < math.inf


class UnsupportedConfigError(ValueError):
    """A config of an architecture or option flash_llm.models does not implement (transformers may build it:
    ``from_pretrained(backend="auto")`` falls back to transformers on this error only)."""


@dataclass
class ModelConfig:
    """Everything the compact models need to know about an OPT or Llama-family checkpoint.

    ``tie_word_embeddings``, ``activation``, ``attention_bias``, ``mlp_bias`` and ``pad_token_id`` take the
    family's usual value where not given (:data:`FAMILY_DEFAULTS`): a Llama's ``False``, ``"silu"``, ``False``,
    ``False``, ``None``; an OPT's ``True``, ``"relu"``, ``True``, ``True``, ``1``, those of every published OPT and
    of transformers' ``OPTConfig``.  So ``ModelConfig(family="opt", ...)`` with the sizes alone is an OPT: the config
    :meth:`from_hf` reads from an OPT config.json without these keys.  (Before session 87 an OPT took the Llama
    values.)  :meth:`replace` keeps the values of the config it copies, ``family`` changed or not.

    Attributes:
        family: ``"llama"`` (Llama 2 / 3, RMSNorm, RoPE, SwiGLU, GQA) or ``"opt"`` (LayerNorm, learned
            positions with an offset of 2, ReLU MLP, biases).
        vocab_size, hidden_size, num_layers, num_heads, intermediate_size: the usual sizes
            (``intermediate_size`` is OPT's ``ffn_dim``).
        num_kv_heads: key/value heads (GQA); ``None`` means ``num_heads``.  OPT has no GQA.
        head_dim: per-head size; ``None`` means ``hidden_size // num_heads`` (a Llama's must then divide
            evenly).  A Llama's must be even (RoPE rotates pairs of features): odd ones are refused (ValueError).
        max_position_embeddings: longest sequence (OPT's position table has this many rows plus 2).
        norm_eps: RMSNorm epsilon (Llama's ``rms_norm_eps``); OPT's LayerNorm uses 1e-5 as in HF.
        rope_theta: RoPE base (Llama).
        rope_scaling: ``None`` (plain RoPE) or ``{"rope_type": "llama3", "factor", "low_freq_factor",
            "high_freq_factor", "original_max_position_embeddings"}`` (Llama 3.1+).  A ``rope_theta`` in the dict
            (transformers 5's ``rope_parameters`` shape) becomes ``rope_theta`` where that was left at its default
            (another value is refused); any other key is refused by name.  A llama3 dict's
            ``partial_rotary_factor`` must be 1 (transformers' llama3 RoPE reads it; UnsupportedConfigError).
        tie_word_embeddings: ``lm_head.weight`` is the input embedding (default: Llama no, OPT yes).  This and
            the other flags (``attention_bias``, ``mlp_bias``, ``do_layer_norm_before``,
            ``layer_norm_elementwise_affine``, ``remove_final_layer_norm``) must be bools (ValueError otherwise,
            None too: transformers 5 refuses a null there as well).
        activation: MLP activation, one of :data:`ACTIVATIONS` (default: Llama ``silu``, OPT ``relu``); an alias of
            :data:`ACTIVATION_ALIASES` (``"swish"``) is stored as the name it stands for.
        attention_bias, mlp_bias: biases of the attention / MLP projections (default: Llama none, OPT both).
            OPT's ``enable_bias`` sets both: they must be equal there, and the one given alone sets the other.
        do_layer_norm_before, word_embed_proj_dim, layer_norm_elementwise_affine, remove_final_layer_norm:
            OPT specifics as in HF's ``OPTConfig`` (``word_embed_proj_dim`` ``None`` means ``hidden_size``;
            ``remove_final_layer_norm`` is HF's ``_remove_final_layer_norm``).  A llama config must leave these at
            their defaults, and an opt config ``norm_eps``, ``rope_theta`` and ``rope_scaling`` at theirs
            (ValueError naming the option otherwise: the other family never reads them).
        bos_token_id, eos_token_id, pad_token_id: special tokens, None or an int (``eos_token_id`` may be a list
            of ints; ``pad_token_id``, None for a Llama and 1 for an OPT where not given, is, when in the
            vocabulary, the input embedding's ``padding_idx``, as in transformers, a negative one counted from the
            end of the vocabulary as ``nn.Embedding`` does; one below ``-vocab_size`` is refused).
        initializer_range: the std of the normal init of linear and embedding weights
            (:func:`flash_llm.models.from_config`); HF's ``initializer_range`` (Llama) or ``init_std`` (OPT).  Not
            part of the model's function: configs that differ only there (or in ``name``) compare equal.
        name: a label (the preset name, or ``""``).
    """

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    norm_eps: float = DEFAULT_NORM_EPS
    rope_theta: float = DEFAULT_ROPE_THETA
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = _FAMILY_DEFAULT
    activation: str = _FAMILY_DEFAULT
    attention_bias: bool = _FAMILY_DEFAULT
    mlp_bias: bool = _FAMILY_DEFAULT
    do_layer_norm_before: bool = True
    word_embed_proj_dim: int | None = None
    layer_norm_elementwise_affine: bool = True
    remove_final_layer_norm: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = _FAMILY_DEFAULT
    initializer_range: float = field(default=DEFAULT_INIT_STD, compare=False)
    name: str = field(default="", compare=False)

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"ModelConfig.family must be one of {FAMILIES}, got {self.family!r}")
        if self.family == "opt":  # (one bias flag, enable_bias: the one given sets the other)
            if self.mlp_bias is _FAMILY_DEFAULT:
                self.mlp_bias = self.attention_bias
            if self.attention_bias is _FAMILY_DEFAULT:
                self.attention_bias = self.mlp_bias
        for n, default in FAMILY_DEFAULTS[self.family].items():
            if getattr(self, n) is _FAMILY_DEFAULT:
                setattr(self, n, default)
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        derived_head_dim = self.head_dim is None
        if self.head_dim is None and _is_int(self.hidden_size) and _is_int(self.num_heads) and self.num_heads > 0:
            self.head_dim = self.hidden_size // self.num_heads
        if self.word_embed_proj_dim is None:
            self.word_embed_proj_dim = self.hidden_size
        for n in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size", "num_kv_heads",
                  "head_dim", "max_position_embeddings", "word_embed_proj_dim"):
            v = getattr(self, n)
            if not _is_int(v) or v < 1:
                raise ValueError(f"ModelConfig.{n} must be an int >= 1, got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"ModelConfig.num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads})")
        if isinstance(self.activation, str):
            self.activation = ACTIVATION_ALIASES.get(self.activation, self.activation)
        if self.activation not in ACTIVATIONS:
            raise UnsupportedConfigError(f"ModelConfig.activation must be one of {ACTIVATIONS}, got "
                                         f"{self.activation!r}")
        for n in ("norm_eps", "rope_theta"):  # (finite: NaN or an infinity gives NaN logits or a broken RoPE)
            if not _is_positive_number(getattr(self, n)):
                raise ValueError(f"ModelConfig.{n} must be a number > 0, got {getattr(self, n)!r}")
        if isinstance(self.rope_scaling, dict) and "rope_theta" in self.rope_scaling:
            # (transformers 5's rope_parameters shape: the theta inside the dict)
            rs = dict(self.rope_scaling)
            theta = rs.pop("rope_theta")
            if not _is_positive_number(theta):
                raise ValueError(f"ModelConfig.rope_scaling['rope_theta'] must be a number > 0, got {theta!r}")
            if self.rope_theta == DEFAULT_ROPE_THETA:
                self.rope_theta = theta
            elif theta != self.rope_theta:
                raise ValueError(f"ModelConfig.rope_scaling['rope_theta'] ({theta!r}) disagrees with rope_theta "
                                 f"({self.rope_theta!r}): give the RoPE base once, as rope_theta")
            self.rope_scaling = rs
        for n in _FLAGS:
            if not isinstance(getattr(self, n), bool):
                raise ValueError(f"ModelConfig.{n} must be a bool, got {getattr(self, n)!r}")
        for n in ("bos_token_id", "pad_token_id"):
            if getattr(self, n) is not None and not _is_int(getattr(self, n)):
                raise ValueError(f"ModelConfig.{n} must be None or an int, got {getattr(self, n)!r}")
        if self.pad_token_id is not None and self.pad_token_id < -self.vocab_size:
            raise ValueError(f"ModelConfig.pad_token_id ({self.pad_token_id}) is below -vocab_size "
                             f"({-self.vocab_size}): a negative id counts from the end of the vocabulary (-1 is the "
                             "last token), as nn.Embedding's padding_idx")
        e = self.eos_token_id
        if not (e is None or _is_int(e) or isinstance(e, (list, tuple)) and all(_is_int(i) for i in e)):
            raise ValueError(f"ModelConfig.eos_token_id must be None, an int or a list of ints, got {e!r}")
        r = self.initializer_range
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r < float("inf"):
            raise ValueError(f"ModelConfig.initializer_range must be a number >= 0, got {r!r}")
        self.rope_scaling = _check_rope_scaling(self.rope_scaling, self.max_position_embeddings)
        if self.family == "opt":
            for n, default in _LLAMA_ONLY.items():  # (OPT's LayerNorm eps is 1e-5; it has learned positions)
                if getattr(self, n) != default:
                    raise ValueError(f"{n} is a Llama option, which OPT never reads; an opt config must leave it at "
                                     f"{default!r}, got {getattr(self, n)!r}")
            if self.num_kv_heads != self.num_heads:
                raise ValueError(f"OPT has no grouped-query attention: num_kv_heads ({self.num_kv_heads}) must "
                                 f"equal num_heads ({self.num_heads})")
            if self.head_dim * self.num_heads != self.hidden_size:
                raise ValueError(f"OPT needs hidden_size ({self.hidden_size}) = num_heads ({self.num_heads}) x "
                                 f"head_dim ({self.head_dim})")
            if self.attention_bias != self.mlp_bias:
                raise ValueError("OPT has one bias flag (enable_bias): attention_bias and mlp_bias must be equal, "
                                 f"got {self.attention_bias} and {self.mlp_bias}")
        else:
            if self.word_embed_proj_dim != self.hidden_size:
                raise ValueError(f"word_embed_proj_dim is an OPT option; a llama config must leave it at hidden_size "
                                 f"({self.hidden_size}), got {self.word_embed_proj_dim}")
            for n, default in _OPT_ONLY.items():
                if getattr(self, n) != default:
                    raise ValueError(f"{n} is an OPT option, which a Llama never reads; a llama config must leave it "
                                     f"at {default!r}, got {getattr(self, n)!r}")
            if derived_head_dim and self.hidden_size % self.num_heads:
                raise ValueError(f"hidden_size ({self.hidden_size}) is not a multiple of num_heads ({self.num_heads})"
                                 f"; give head_dim to choose the per-head size")
            if self.head_dim % 2:
                raise ValueError(f"RoPE needs an even head_dim (it rotates pairs of features), got {self.head_dim}")

    # ---- derived sizes -----------------------------------------------------------------------------
    @property
    def q_size(self) -> int:
        """Width of the query projection output (``num_heads * head_dim``)."""
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        """Width of the key (and of the value) projection output (``num_kv_heads * head_dim``)."""
        return self.num_kv_heads * self.head_dim

    @property
    def padding_idx(self) -> int | None:
        """The input embedding's ``padding_idx``: ``pad_token_id`` where it is a token of the vocabulary, as
        transformers sets it (init zeroes that row and training gives it no gradient), a negative one counted from
        the end (``pad + vocab_size``, as ``nn.Embedding`` reads a negative ``padding_idx``), else None."""
        pad = self.pad_token_id
        if not _is_int(pad) or not -self.vocab_size <= pad < self.vocab_size:
            return None
        return pad + self.vocab_size if pad < 0 else pad

    def linear_shapes(self) -> list[tuple[str, int, int]]:
        """``(name, out_features, in_features)`` of every projection of ONE decoder layer, names relative
        to the layer (``self_attn.q_proj``...), in the model's order."""
        h, q, kv, f = self.hidden_size, self.q_size, self.kv_size, self.intermediate_size
        if self.family == "llama":
            return [("self_attn.q_proj", q, h), ("self_attn.k_proj", kv, h), ("self_attn.v_proj", kv, h),
                    ("self_attn.o_proj", h, q), ("mlp.gate_proj", f, h), ("mlp.up_proj", f, h),
                    ("mlp.down_proj", h, f)]
        return [("self_attn.k_proj", h, h), ("self_attn.v_proj", h, h), ("self_attn.q_proj", h, h),
                ("self_attn.out_proj", h, h), ("fc1", f, h), ("fc2", h, f)]

    def num_parameters(self) -> int:
        """Parameters of the causal LM (tied embeddings counted once), as HF's ``num_parameters()``."""
        h, v = self.hidden_size, self.vocab_size
        per_layer = sum(m * k for _, m, k in self.linear_shapes())
        if self.family == "llama":
            if self.attention_bias:
                per_layer += self.q_size + 2 * self.kv_size + h
            if self.mlp_bias:
                per_layer += 2 * self.intermediate_size + h
            per_layer += 2 * h  # two RMSNorms
            total = self.num_layers * per_layer + v * h + h  # embeddings, final norm
            return total + (0 if self.tie_word_embeddings else v * h)
        e = self.word_embed_proj_dim
        if self.attention_bias:
            per_layer += 4 * h + self.intermediate_size + h
        if self.layer_norm_elementwise_affine:
            per_layer += 4 * h
        total = self.num_layers * per_layer + v * e + (self.max_position_embeddings + 2) * h
        if e != h:
            total += 2 * e * h  # project_in, project_out
        if self.do_layer_norm_before and not self.remove_final_layer_norm and self.layer_norm_elementwise_affine:
            total += 2 * h
        return total + (0 if self.tie_word_embeddings else v * e)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """``eos_token_id`` as a tuple (empty when unset)."""
        e = self.eos_token_id
        return () if e is None else (e,) if _is_int(e) else tuple(e)

    # ---- Hugging Face config.json ---------------------------------------------------------------------
    @classmethod
    def from_hf(cls, config) -> "ModelConfig":
        """Read a Hugging Face config: a ``config.json`` path (or its folder), a dict, or a
        ``transformers.PretrainedConfig`` (anything with ``to_dict()``).

        Reads ``model_type`` ``"llama"`` or ``"opt"``; RoPE from ``rope_theta`` + ``rope_scaling`` (transformers
        4.x files) or ``rope_parameters`` (5.x), with transformers 5's precedence where both are there: a
        non-empty ``rope_scaling`` replaces ``rope_parameters``, and ``rope_theta`` comes from that dict first,
        then from the top level (:func:`_read_rope`).  Raises ``ValueError`` naming the key for anything
        unsupported (another model type, an unknown RoPE type, a sliding window...).  A value that
        :class:`ModelConfig` refuses raises its error, of the same type, starting with the file (``config`` for a
        dict or a transformers config) and ending with the config.json key(s) the field was read from where the
        names differ, e.g. ``".../config.json: ModelConfig.num_layers must be an int >= 1, got 0 (read from
        config.json key 'num_hidden_layers')"``.

        Read as transformers 5 computes them: ``hidden_act`` / ``activation_function`` ``"swish"`` as ``"silu"``;
        Llama's ``pretraining_tp`` ignored (transformers 5's ``LlamaMLP`` / ``LlamaAttention`` never read it; 4.x
        split the projections into that many slices and summed them, the same product up to float rounding
        order, so 4.x logits match within rounding); ``initializer_range`` (Llama, ``None`` or 0: 0.02, as
        transformers' ``_init_weights``) or OPT's ``init_std``.  A Llama ``sliding_window`` is refused:
        transformers 5 attends in full within a forward but its ``DynamicCache`` keeps sliding-window layers for
        such a config, so its cached decoding attends the last window only.
        """
        src = "config"
        if isinstance(config, (str, os.PathLike)):
            path = os.fspath(config)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            with open(path, encoding="utf-8") as f:
                try:
                    d = json.load(f)
                except UnicodeDecodeError as e:
                    raise ValueError(f"{path}: not UTF-8 text: {e}") from None
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: not valid JSON: {e}") from None
            src = path
        elif hasattr(config, "to_dict") and not isinstance(config, dict):
            d = config.to_dict()
        elif isinstance(config, dict):
            d = dict(config)
        else:
            raise TypeError(f"config must be a path, a dict or a transformers config, got {type(config).__name__}")
        if not isinstance(d, dict):
            raise ValueError(f"{src}: expected a JSON object, got {type(d).__name__}")
        model_type = d.get("model_type")
        family = _MODEL_TYPES.get(model_type) if isinstance(model_type, str) else None
        if family is None:
            raise UnsupportedConfigError(f"{src}: model_type {model_type!r} is not supported; flash_llm.models "
                                         f"reads {sorted(_MODEL_TYPES)}")

        def need(key):
            if key not in d:
                raise ValueError(f"{src}: key {key!r} is missing (needed for a {model_type} model)")
            return d[key]

        common = dict(vocab_size=need("vocab_size"), hidden_size=need("hidden_size"),
                      num_layers=need("num_hidden_layers"), num_heads=need("num_attention_heads"),
                      max_position_embeddings=d.get("max_position_embeddings", 2048),
                      bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"),
                      pad_token_id=d.get("pad_token_id", _FAMILY_DEFAULT), name=d.get("_name_or_path", "") or "")
        # (a key the file leaves out: the family's default, FAMILY_DEFAULTS, as transformers' config classes give)
        if family == "opt":
            # transformers' OPTConfig defaults: pad 1 (the embedding's padding_idx; FAMILY_DEFAULTS).  Its bos / eos
            # defaults (2) are not taken: flash_llm never reads bos, and transformers' generate does not stop on an
            # eos_token_id the file leaves out (its generation config has none), which an eos of 2 here would do.
            bias = d.get("enable_bias", _FAMILY_DEFAULT)
            return _from_keys(cls, src, _OPT_KEYS, family="opt", intermediate_size=need("ffn_dim"),
                              tie_word_embeddings=d.get("tie_word_embeddings", _FAMILY_DEFAULT),
                              activation=d.get("activation_function", _FAMILY_DEFAULT), attention_bias=bias,
                              mlp_bias=bias,
                              do_layer_norm_before=d.get("do_layer_norm_before", True),
                              word_embed_proj_dim=d.get("word_embed_proj_dim"),
                              layer_norm_elementwise_affine=d.get("layer_norm_elementwise_affine", True),
                              remove_final_layer_norm=d.get("_remove_final_layer_norm", False),
                              initializer_range=_or_default(d.get("init_std")), **common)
        if d.get("sliding_window") is not None:  # (transformers windows the cached decode only: see above)
            raise UnsupportedConfigError(f"{src}: sliding_window={d['sliding_window']!r} is not supported (full "
                                         "attention only; transformers' Llama attends in full within a forward but "
                                         "windows its cached decoding)")
        # pretraining_tp: ignored, as transformers 5 ignores it (4.x: the same matmuls in slices, see above)
        theta, scaling = _read_rope(d, src)
        keys = _LLAMA_KEYS
        for rope_key in ("rope_scaling", "rope_parameters"):  # (where _read_rope took rope_theta from)
            if isinstance(d.get(rope_key), dict) and d[rope_key]:
                if "rope_theta" in d[rope_key]:
                    keys = {**keys, "rope_theta": f"{rope_key}.rope_theta"}
                break
        return _from_keys(cls, src, keys, family="llama", intermediate_size=need("intermediate_size"),
                          num_kv_heads=d.get("num_key_value_heads"), head_dim=d.get("head_dim"),
                          norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
                          tie_word_embeddings=d.get("tie_word_embeddings", _FAMILY_DEFAULT),
                          activation=d.get("hidden_act", _FAMILY_DEFAULT),
                          attention_bias=d.get("attention_bias", _FAMILY_DEFAULT),
                          mlp_bias=d.get("mlp_bias", _FAMILY_DEFAULT),
                          initializer_range=d.get("initializer_range") or DEFAULT_INIT_STD, **common)

    def to_hf(self) -> dict:
        """This config as a Hugging Face ``config.json`` dict (``json.dump`` it; ``transformers`` reads it
        with ``AutoConfig.for_model(**d)`` or from a folder).  RoPE is written as ``rope_theta`` plus
        ``rope_scaling``, which transformers 4.x and 5.x both read."""
        common = {"vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
                  "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
                  "max_position_embeddings": self.max_position_embeddings,
                  "tie_word_embeddings": self.tie_word_embeddings, "bos_token_id": self.bos_token_id,
                  "eos_token_id": self.eos_token_id, "pad_token_id": self.pad_token_id}
        if self.family == "opt":
            return {"architectures": ["OPTForCausalLM"], "model_type": "opt", **common,
                    "ffn_dim": self.intermediate_size, "activation_function": self.activation,
                    "enable_bias": self.attention_bias, "do_layer_norm_before": self.do_layer_norm_before,
                    "word_embed_proj_dim": self.word_embed_proj_dim,
                    "layer_norm_elementwise_affine": self.layer_norm_elementwise_affine,
                    "_remove_final_layer_norm": self.remove_final_layer_norm, "init_std": self.initializer_range,
                    "dropout": 0.0, "attention_dropout": 0.0, "layerdrop": 0.0}
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **common,
                "intermediate_size": self.intermediate_size, "num_key_value_heads": self.num_kv_heads,
                "head_dim": self.head_dim, "rms_norm_eps": self.norm_eps, "rope_theta": self.rope_theta,
                "rope_scaling": None if self.rope_scaling is None else dict(self.rope_scaling),
                "hidden_act": self.activation, "attention_bias": self.attention_bias, "mlp_bias": self.mlp_bias,
                "attention_dropout": 0.0, "initializer_range": self.initializer_range}

    def replace(self, **changes) -> "ModelConfig":
        """A copy with ``changes`` applied (validated again), e.g. ``preset("llama-3-8b").replace(num_layers=2)``.

        Sizes that were derived (``head_dim = hidden_size // num_heads``, ``num_kv_heads = num_heads``,
        ``word_embed_proj_dim = hidden_size``) are derived again from the new sizes unless given.
        """
        derived = {"head_dim": (self.hidden_size % self.num_heads == 0
                                and self.head_dim == self.hidden_size // self.num_heads),
                   "num_kv_heads": self.num_kv_heads == self.num_heads,
                   "word_embed_proj_dim": self.word_embed_proj_dim == self.hidden_size}
        for k, was_derived in derived.items():
            if was_derived and k not in changes:
                changes[k] = None
        return dataclasses.replace(self, **changes)


# The config.json keys from_hf reads ModelConfig's fields from, where the names differ (the others: the same name).
_COMMON_KEYS = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads"}
_OPT_KEYS = {**_COMMON_KEYS, "intermediate_size": "ffn_dim", "activation": "activation_function",
             "attention_bias": "enable_bias", "mlp_bias": "enable_bias",
             "remove_final_layer_norm": "_remove_final_layer_norm", "initializer_range": "init_std"}
_LLAMA_KEYS = {**_COMMON_KEYS, "num_kv_heads": "num_key_value_heads", "norm_eps": "rms_norm_eps",
               "activation": "hidden_act"}


def _from_keys(cls, src: str, keys: dict[str, str], **fields) -> ModelConfig:
    """``cls(**fields)`` for :meth:`ModelConfig.from_hf`: a ValueError it raises is raised again, of the same type
    (``UnsupportedConfigError`` stays one: from_pretrained's fallback keys on it), naming ``src`` (the file) and
    the config.json keys (``keys``: field -> key) of the fields its message names."""
    try:
        return cls(**fields)
    except ValueError as e:
        msg = str(e)
        named = list(dict.fromkeys(key for n, key in keys.items() if re.search(rf"\b{n}\b", msg)))
        if named:
            msg += f" (read from config.json key{'s' if len(named) > 1 else ''} {', '.join(map(repr, named))})"
        raise type(e)(f"{src}: {msg}") from None


def _or_default(std):
    """OPT's ``init_std``: its value, or transformers' default where missing or null."""
    return DEFAULT_INIT_STD if std is None else std


def _check_rope_scaling(rs, max_pos) -> dict | None:
    if rs is None:
        return None
    if not isinstance(rs, dict):
        raise ValueError(f"ModelConfig.rope_scaling must be None or a dict, got {type(rs).__name__}")
    rope_type = rs.get("rope_type", rs.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise UnsupportedConfigError(f"rope_scaling type {rope_type!r} is not supported; flash_llm.models "
                                     f"implements {ROPE_TYPES} (plain RoPE and Llama 3.1's 'llama3')")
    unknown = sorted(str(k) for k in rs if k not in _ROPE_KEYS)
    if unknown:  # (rope_theta is taken out before: ModelConfig.__post_init__, _read_rope)
        raise ValueError(f"rope_scaling: unknown key(s) {unknown}; flash_llm.models reads 'rope_type' (or 'type'), "
                         f"'rope_theta' and the llama3 keys {list(_LLAMA3_KEYS)}")
    if rope_type == "default":
        return None
    partial = rs.get("partial_rotary_factor", 1.0)
    if partial != 1.0:  # (transformers' llama3 RoPE rotates only that fraction of head_dim)
        raise UnsupportedConfigError(f"rope_scaling: partial_rotary_factor={partial!r} is not supported (RoPE over "
                                     "the whole head_dim only)")
    out = {"rope_type": "llama3"}
    for k in _LLAMA3_KEYS:
        v = rs.get(k, max_pos if k == "original_max_position_embeddings" else None)
        if not _is_positive_number(v):  # (finite too: a NaN factor makes every frequency NaN)
            raise ValueError(f"rope_scaling of type 'llama3' needs a number > 0 for {k!r}, got {v!r}")
        out[k] = v
    if out["high_freq_factor"] <= out["low_freq_factor"]:
        raise ValueError(f"rope_scaling: high_freq_factor ({out['high_freq_factor']}) must be larger than "
                         f"low_freq_factor ({out['low_freq_factor']})")
    return out


def _read_rope(d: dict, src: str) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from a 4.x (rope_theta + rope_scaling) or 5.x (rope_parameters) config, with
    transformers 5's precedence (``convert_rope_params_to_dict`` / ``standardize_rope_params``):

    * a non-empty ``rope_scaling`` replaces ``rope_parameters`` whole (its type, its factors and its theta);
    * ``rope_theta`` is the chosen dict's, else the top-level ``rope_theta``, else 10000;
    * a llama3 dict without ``original_max_position_embeddings`` takes ``max_position_embeddings``;
    * a top-level ``partial_rotary_factor`` goes into the dict where it has none (a llama3 dict's must be 1);
    * the dict's keys transformers' Llama never reads (it warns about them) are dropped.

    A top-level ``original_max_position_embeddings`` beside a llama3 dict that says otherwise is refused
    (ValueError naming both keys): transformers 5 itself resolves it two ways (``LlamaConfig.from_pretrained``
    takes the top-level value, ``AutoConfig`` / ``from_dict`` the dict's), so no reading of it is safe."""
    params = d.get("rope_parameters")
    scaling = d.get("rope_scaling")
    for key, value in (("rope_parameters", params), ("rope_scaling", scaling)):
        if value is not None and not isinstance(value, dict):
            raise ValueError(f"{src}: {key} must be an object or null, got {type(value).__name__}")
    key, rope = ("rope_scaling", scaling) if scaling else ("rope_parameters", params or {})
    if any(isinstance(v, dict) for v in rope.values()):
        raise UnsupportedConfigError(f"{src}: per-layer-type {key} are not supported")
    theta = rope.get("rope_theta", d.get("rope_theta", DEFAULT_ROPE_THETA))
    # keys transformers' Llama does not read either (it warns and ignores them) are dropped; ModelConfig itself
    # refuses them.  A top-level partial_rotary_factor goes into the dict, as transformers 5 moves it there.
    rope = {k: v for k, v in rope.items() if k in _ROPE_KEYS}
    if d.get("partial_rotary_factor") is not None and rope:
        rope.setdefault("partial_rotary_factor", d["partial_rotary_factor"])
    top = d.get("original_max_position_embeddings")
    if top is not None and rope.get("rope_type", rope.get("type", "default")) == "llama3":
        inner = rope.get("original_max_position_embeddings", d.get("max_position_embeddings", 2048))
        where = (f"{key}.original_max_position_embeddings" if "original_max_position_embeddings" in rope
                 else "max_position_embeddings (the default of a llama3 rope)")
        if top != inner:
            raise ValueError(f"{src}: the top-level original_max_position_embeddings ({top!r}) disagrees with "
                             f"{where} ({inner!r}); transformers reads this either way depending on how the "
                             "config is loaded: keep one of the two")
    try:  # (checked here as well as by ModelConfig, so that the error names the file and the key it read)
        _check_rope_scaling(rope or None, d.get("max_position_embeddings", 2048))
    except ValueError as e:  # (UnsupportedConfigError too: from_pretrained's fallback keys on its type)
        raise type(e)(f"{src}: {str(e).replace('rope_scaling', key)}") from None
    return theta, rope or None


def _opt(name, hidden, layers, heads, max_pos=2048) -> ModelConfig:
    return ModelConfig(family="opt", vocab_size=50272, hidden_size=hidden, num_layers=layers, num_heads=heads,
                       intermediate_size=4 * hidden, max_position_embeddings=max_pos, tie_word_embeddings=True,
                       activation="relu", attention_bias=True, mlp_bias=True, bos_token_id=2, eos_token_id=2,
                       pad_token_id=1, name=name)


def _llama3(name, hidden, layers, heads, inter) -> ModelConfig:
    return ModelConfig(family="llama", vocab_size=128256, hidden_size=hidden, num_layers=layers, num_heads=heads,
                       num_kv_heads=8, intermediate_size=inter, max_position_embeddings=8192, norm_eps=1e-5,
                       rope_theta=500000.0, tie_word_embeddings=False, activation="silu", bos_token_id=128000,
                       eos_token_id=128001, name=name)


#: Real model shapes, as published in the models' ``config.json`` files (facebook/opt-*, meta-llama/Meta-Llama-3-*).
PRESETS: dict[str, ModelConfig] = {
    "opt-13b": _opt("opt-13b", 5120, 40, 40),
    "opt-30b": _opt("opt-30b", 7168, 48, 56),
    "opt-66b": _opt("opt-66b", 9216, 64, 72),
    "opt-175b": _opt("opt-175b", 12288, 96, 96),
    "llama-3-8b": _llama3("llama-3-8b", 4096, 32, 32, 14336),
    "llama-3-70b": _llama3("llama-3-70b", 8192, 80, 64, 28672),
}

#: The parameter counts the model publishers state (OPT paper, Table 1; Llama 3 model card), for checks.
PUBLISHED_PARAMS: dict[str, float] = {
    "opt-13b": 13e9, "opt-30b": 30e9, "opt-66b": 66e9, "opt-175b": 175e9,
    "llama-3-8b": 8.03e9, "llama-3-70b": 70.6e9,
}


def preset(name: str) -> ModelConfig:
    """A copy of the preset ``name`` (one of :data:`PRESETS`); ``ValueError`` listing them otherwise."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name])

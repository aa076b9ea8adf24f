"""Config options transformers accepts (and computes as flash_llm.models does) that ModelConfig once refused or
ignored: ``hidden_act: "swish"``, Llama's ``pretraining_tp`` > 1, ``initializer_range`` / ``init_std``; Llama's
``sliding_window``, still refused (transformers windows only its cached decoding); and ``estimate_bytes``
counting the RoPE ``inv_freq`` buffer as the built model holds it."""

from __future__ import annotations

import copy

import pytest
import torch

from flash_llm.models import ModelConfig, from_config
from flash_llm.models.config import UnsupportedConfigError
from flash_llm.models.synthetic import build_synthetic, estimate_bytes
from conftest import max_abs_err, ulp
from test_models import VOCAB, hf_llama, hf_opt, ours_from

transformers = pytest.importorskip("transformers")


def _llama_model(seed: int = 0, **kw):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(hf_llama(**kw)).float().eval()


def _logits_match(hm, ids):
    """Our fp32 logits within twice transformers' own fp32 error, both against transformers in fp64 (the
    tolerance of test_models.test_logits_match_transformers)."""
    ours = ours_from(hm)
    with torch.no_grad():
        ref = copy.deepcopy(hm).double()(ids).logits
        theirs = hm(ids).logits
        got = ours(ids)
    err, err_hf = max_abs_err(got, ref), max_abs_err(theirs, ref)
    assert err <= 2 * err_hf + ulp(torch.float32, float(ref.abs().max())), (err, err_hf)
    return ours


# ---- 1. hidden_act "swish" is SiLU ----------------------------------------------------------------------------
def test_swish_activation_is_read_as_silu():
    # transformers.activations.ACT2CLS maps "swish" to nn.SiLU, "silu" to SiLUActivation (F.silu): one function
    assert isinstance(transformers.activations.ACT2FN["swish"], torch.nn.SiLU)
    d = {**hf_llama().to_dict(), "hidden_act": "swish"}
    cfg = ModelConfig.from_hf(d)
    assert cfg.activation == "silu"
    assert ModelConfig.from_hf({**hf_opt().to_dict(), "activation_function": "swish"}).activation == "silu"
    assert ModelConfig(family="llama", vocab_size=8, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=8,
                       activation="swish").activation == "silu"
    hm = _llama_model(hidden_act="swish")
    ours = _logits_match(hm, torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(1)))
    assert ours.model.layers[0].mlp.act is torch.nn.functional.silu  # (the fused SiLU paths apply)


@pytest.mark.parametrize("act", ["tanh", "gelu_new", "swiglu"])
def test_other_activations_stay_refused_by_name(act):
    with pytest.raises(UnsupportedConfigError, match=rf"activation must be one of .*, got '{act}'"):
        ModelConfig.from_hf({**hf_llama().to_dict(), "hidden_act": act})


# ---- 2. pretraining_tp > 1 ------------------------------------------------------------------------------------
@pytest.mark.parametrize("tp", [2, 4])
def test_pretraining_tp_is_accepted_and_logits_match(tp):
    hm = _llama_model(pretraining_tp=tp)
    assert hm.config.pretraining_tp == tp
    assert ModelConfig.from_hf(hm.config) == ModelConfig.from_hf(_llama_model().config)
    ids = torch.randint(0, VOCAB, (3, 17), generator=torch.Generator().manual_seed(2))
    _logits_match(hm, ids)
    plain = _llama_model()  # the same weights (same seed): transformers 5 ignores pretraining_tp
    with torch.no_grad():
        assert torch.equal(hm(ids).logits, plain(ids).logits)


# ---- 3. Llama sliding_window: still refused -------------------------------------------------------------------
def test_llama_sliding_window_stays_refused():
    """transformers 5's Llama attends in full over one forward (create_causal_mask), but its DynamicCache makes
    sliding-window layers of a config with ``sliding_window`` (cache_utils.get_layer_types_and_kwargs), so cached
    decoding attends the last window only: no single attention to follow.  Should this start failing (transformers
    no longer windows the cache), the refusal in ModelConfig.from_hf may go."""
    with pytest.raises(UnsupportedConfigError, match=r"sliding_window=4 is not supported"):
        ModelConfig.from_hf(hf_llama(sliding_window=4))
    windowed = _llama_model(sliding_window=4)
    full = _llama_model()
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(windowed(ids, use_cache=False).logits, full(ids, use_cache=False).logits)
        out = windowed(ids[:, :6], use_cache=True)
        for t in range(6, 12):
            out = windowed(ids[:, t:t + 1], cache=out.past_key_values, use_cache=True)
        last = full(ids, use_cache=False).logits[0, -1]
    assert max_abs_err(out.logits[0, -1], last.double()) > 1e-2  # the window changed the cached decode


# ---- 4. from_config uses the config's initializer_range -------------------------------------------------------
@pytest.mark.parametrize("std", [0.1, 0.02, 0.005])
def test_from_config_uses_initializer_range(std):
    cfg = ModelConfig.from_hf(hf_llama(initializer_range=std, intermediate_size=512, hidden_size=256))
    assert cfg.initializer_range == std
    m = from_config(cfg, dtype=torch.float32, seed=0)
    for w in (m.model.layers[0].mlp.up_proj.weight, m.lm_head.weight, m.model.embed_tokens.weight):
        assert abs(float(w.detach().std()) / std - 1) < 0.03
    # a dict and a transformers config read the same way; ModelConfig round-trips it through to_hf
    assert from_config(hf_llama(initializer_range=std), dtype=torch.float32, device="meta").config.initializer_range \
        == std
    assert ModelConfig.from_hf(cfg.to_hf()).initializer_range == std
    assert transformers.AutoConfig.for_model(**cfg.to_hf()).initializer_range == std


def test_from_config_reads_opt_init_std_and_defaults_to_0_02():
    cfg = ModelConfig.from_hf(hf_opt(init_std=0.1, ffn_dim=512, hidden_size=256))
    assert cfg.initializer_range == 0.1
    assert ModelConfig.from_hf(cfg.to_hf()).initializer_range == 0.1
    assert transformers.AutoConfig.for_model(**cfg.to_hf()).init_std == 0.1
    w = from_config(cfg, dtype=torch.float32, seed=0).model.decoder.layers[0].fc1.weight.detach()
    assert abs(float(w.std()) / 0.1 - 1) < 0.03
    d = hf_llama(hidden_size=256, intermediate_size=512).to_dict()
    del d["initializer_range"]
    plain = ModelConfig.from_hf(d)
    assert plain.initializer_range == 0.02
    w = from_config(plain, dtype=torch.float32, seed=0).model.layers[0].mlp.up_proj.weight.detach()
    assert abs(float(w.std()) / 0.02 - 1) < 0.03
    # a different initializer_range is the same model: configs compare equal
    assert ModelConfig.from_hf({**d, "initializer_range": 0.3}) == plain


@pytest.mark.parametrize("bad", [-0.1, "0.1", True])
def test_initializer_range_is_checked(bad):
    with pytest.raises(ValueError, match=r"initializer_range must be a number >= 0"):
        ModelConfig.from_hf({**hf_llama().to_dict(), "initializer_range": bad})


# ---- 5. estimate_bytes counts the RoPE buffer ------------------------------------------------------------------
def _held_bytes(model) -> int:
    held = {id(t): t for t in [*model.parameters(), *model.buffers()]}  # tied tensors once
    return sum(t.numel() * t.element_size() for t in held.values())


@pytest.mark.parametrize("kw", [{}, {"tie_word_embeddings": True}, {"attention_bias": True, "mlp_bias": True,
                                                                     "head_dim": 8}])
def test_estimate_bytes_other_is_exact_for_llama(kw):
    cfg = ModelConfig.from_hf(hf_llama(**kw))
    model, report = build_synthetic(cfg, None, dtype=torch.float16, device="cpu", progress=False)
    est = estimate_bytes(cfg, None, torch.float16)
    inv_freq = model.model.rotary_emb.inv_freq
    assert inv_freq.numel() == cfg.head_dim // 2 and inv_freq.dtype == torch.float32
    assert est["other"] == report.other_bytes
    assert est["projections"] == report.projection_bytes  # dense: exact
    assert est["total"] == _held_bytes(model) == report.weight_bytes
    sparse, sparse_report = build_synthetic(cfg, 0.8, dtype=torch.bfloat16, device="cpu", progress=False)
    assert estimate_bytes(cfg, 0.8, torch.bfloat16)["other"] == sparse_report.other_bytes
    assert _held_bytes(sparse) == sparse_report.weight_bytes


def test_estimate_bytes_other_is_exact_for_opt():
    cfg = ModelConfig.from_hf(hf_opt(word_embed_proj_dim=32))
    model, report = build_synthetic(cfg, None, dtype=torch.float16, device="cpu", progress=False)
    est = estimate_bytes(cfg, None, torch.float16)
    assert est["other"] == report.other_bytes and est["total"] == _held_bytes(model)


@pytest.mark.parametrize("rope,match", [({"rope_type": "linear", "factor": 2.0}, "rope_parameters type 'linear'"),
                                        ({"rope_type": "llama3", "factor": 8.0}, "rope_parameters of type 'llama3'")])
def test_a_refused_rope_names_the_key_and_the_file_it_was_read_from(rope, match, tmp_path):
    """transformers 5 writes RoPE as ``rope_parameters`` (no ``rope_scaling`` key): an unsupported or incomplete one is
    refused naming that key and the config file (session 76's models hunt: it named ``rope_scaling``, a key the file
    does not have, and no file).  A 4.x ``rope_scaling`` is still named as such."""
    import json

    d = {k: v for k, v in hf_llama().to_dict().items() if k not in ("rope_scaling", "rope_parameters")}
    (tmp_path / "config.json").write_text(json.dumps({**d, "rope_parameters": {**rope, "rope_theta": 1e4}}))
    kind = UnsupportedConfigError if rope["rope_type"] == "linear" else ValueError
    with pytest.raises(kind, match=match) as e:
        ModelConfig.from_hf(tmp_path)
    assert str(tmp_path / "config.json") in str(e.value)
    with pytest.raises(kind, match=match.replace("rope_parameters", "rope_scaling")):
        ModelConfig.from_hf({**d, "rope_scaling": rope})

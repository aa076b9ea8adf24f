"""flash_llm.models on CPU: configs (HF round trips, presets, refusals), and the compact OPT / Llama modules
against tiny transformers models built from configs with random weights (state-dict keys, logits, padding,
sparsified equals dense-with-zeros)."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

import flash_llm
from flash_llm.models import ModelConfig, from_config, preset
from flash_llm.models.config import PRESETS, PUBLISHED_PARAMS
from flash_llm.prune import magnitude_prune_
from conftest import max_abs_err, ulp

transformers = pytest.importorskip("transformers")

VOCAB = 97


def hf_llama(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, rope_theta=1000.0, initializer_range=0.1)
    base.update(kw)
    return transformers.LlamaConfig(**base)


def hf_opt(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=64, init_std=0.1, dropout=0.0)
    base.update(kw)
    return transformers.OPTConfig(**base)


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
CASES = {
    "llama-gqa": lambda: hf_llama(),
    "llama-mha-tied": lambda: hf_llama(num_key_value_heads=4, tie_word_embeddings=True),
    "llama3-rope": lambda: hf_llama(rope_scaling=dict(LLAMA3_ROPE)),
    "llama-bias-headdim": lambda: hf_llama(attention_bias=True, mlp_bias=True, head_dim=8),
    "opt": lambda: hf_opt(),
    "opt-350m-style": lambda: hf_opt(do_layer_norm_before=False, word_embed_proj_dim=32),
}


def hf_model(case: str, seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    hc = CASES[case]()
    cls = transformers.LlamaForCausalLM if hc.model_type == "llama" else transformers.OPTForCausalLM
    return cls(hc).to(dtype).eval()


def ours_from(hm, dtype=torch.float32):
    m = from_config(hm.config, dtype=dtype, device="meta")
    m.load_state_dict({k: v.to(dtype) for k, v in hm.state_dict().items()}, assign=True)
    return m.eval()


# ---------------------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_have_published_sizes(name):
    cfg = preset(name)
    n = cfg.num_parameters()
    # Published counts are rounded (e.g. "13B" for 12.85e9): within 2 %.
    published = PUBLISHED_PARAMS[name]
    assert abs(n / published - 1) < 0.02, f"{name}: {n / 1e9:.2f}B vs published {published / 1e9}B"
    # and transformers counts the same parameters for the same config (built on meta: no memory)
    hc = transformers.AutoConfig.for_model(**cfg.to_hf())
    with torch.device("meta"):
        hm = transformers.AutoModelForCausalLM.from_config(hc)
    assert hm.num_parameters() == n


def test_preset_shapes():
    assert (preset("opt-66b").hidden_size, preset("opt-66b").num_layers, preset("opt-66b").num_heads) == (9216, 64, 72)
    c = preset("llama-3-70b")
    assert (c.hidden_size, c.intermediate_size, c.num_layers, c.num_kv_heads, c.vocab_size) == (8192, 28672, 80, 8,
                                                                                                128256)
    with pytest.raises(ValueError, match=r"unknown preset 'opt-7b'; known presets: \['llama-3-70b'"):
        preset("opt-7b")


@pytest.mark.parametrize("case", sorted(CASES))
def test_config_round_trip_through_hf(case, tmp_path):
    hc = CASES[case]()
    cfg = ModelConfig.from_hf(hc)
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf()))
    assert ModelConfig.from_hf(tmp_path) == cfg  # a folder holding config.json
    hc2 = transformers.AutoConfig.for_model(**cfg.to_hf())  # transformers reads what we write
    assert ModelConfig.from_hf(hc2) == cfg


def test_config_reads_transformers_4_rope_keys():
    d = {"model_type": "llama", "vocab_size": 10, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
         "intermediate_size": 32, "rope_theta": 500000.0, "rope_scaling": {"type": "llama3", **{
             k: v for k, v in LLAMA3_ROPE.items() if k != "rope_type"}}}
    cfg = ModelConfig.from_hf(d)
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling["rope_type"] == "llama3"
    assert cfg.rope_scaling["original_max_position_embeddings"] == 16
    d5 = {k: v for k, v in d.items() if k not in ("rope_theta", "rope_scaling")}
    d5["rope_parameters"] = {"rope_type": "default", "rope_theta": 123.0}
    c5 = ModelConfig.from_hf(d5)
    assert c5.rope_theta == 123.0 and c5.rope_scaling is None


@pytest.mark.parametrize("change, match", [
    ({"model_type": "gpt2"}, r"model_type 'gpt2' is not supported; flash_llm.models reads \['llama', 'opt'\]"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, r"rope_scaling type 'yarn' is not supported"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, r"needs a number > 0 for 'low_freq_factor'"),
    ({"num_key_value_heads": 3}, r"num_heads \(4\) must be a multiple of num_kv_heads \(3\)"),
    ({"hidden_act": "tanh"}, r"activation must be one of \('relu', 'gelu', 'silu'\), got 'tanh'"),
    ({"sliding_window": 4096}, r"sliding_window=4096 is not supported"),
])
def test_config_refusals(change, match):
    d = {**hf_llama().to_dict(), **change}
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf(d)


def test_config_missing_key_is_named(tmp_path):
    d = hf_opt().to_dict()
    del d["ffn_dim"]
    p = tmp_path / "config.json"
    p.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"config.json: key 'ffn_dim' is missing"):
        ModelConfig.from_hf(p)


# ---------------------------------------------------------------------------------------------------
# the modules against transformers
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(CASES))
def test_state_dict_keys_and_strict_load(case):
    hm = hf_model(case)
    ours = from_config(hm.config, dtype=torch.float32)
    assert list(ours.state_dict()) == list(hm.state_dict())
    for k, v in hm.state_dict().items():
        assert ours.state_dict()[k].shape == v.shape, k
    ours.load_state_dict(hm.state_dict())  # strict


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case):
    """fp32 logits within twice transformers' own fp32 error (both against transformers in fp64)."""
    hm = hf_model(case)
    ours = ours_from(hm)
    hm64 = copy.deepcopy(hm).double()
    ids = torch.randint(0, VOCAB, (3, 21), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hm64(ids).logits
        theirs = hm(ids).logits
        got = ours(ids)
    assert got.shape == (3, 21, VOCAB) and got.dtype == torch.float32
    err, err_hf = max_abs_err(got, ref), max_abs_err(theirs, ref)
    assert err <= 2 * err_hf + ulp(torch.float32, float(ref.abs().max())), (err, err_hf)


@pytest.mark.parametrize("case", ["llama-gqa", "opt"])
def test_padded_batch_matches_transformers_and_unpadded_rows(case):
    hm = hf_model(case)
    ours = ours_from(hm)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, VOCAB, (3, 12), generator=g)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[0, :5] = 0
    mask[1, :1] = 0
    pos = ((mask.cumsum(1) - 1) * mask).clamp(min=0)  # what HF generate computes for left padding
    with torch.no_grad():
        theirs = hm(ids, attention_mask=mask, position_ids=pos).logits
        got = ours(ids, mask)
        alone = ours(ids[0:1, 5:])  # row 0 without its padding
    real = mask.bool()
    assert torch.isfinite(got).all(), "padding rows must stay finite"
    assert max_abs_err(got[real], theirs[real].double()) < 1e-4
    assert max_abs_err(got[0, 5:], alone[0].double()) < 1e-4


def test_last_only_and_positions():
    ours = ours_from(hf_model("llama-gqa"))
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = ours(ids)
        last = ours(ids, last_only=True)
        shifted = ours(ids, positions=torch.arange(3, 10).expand(2, 7))
    assert last.shape == (2, 1, VOCAB) and torch.allclose(last[:, 0], full[:, -1], atol=1e-5)
    assert not torch.allclose(shifted, full), "RoPE positions must change the logits"


def test_meta_build_assign_load_keeps_tie_and_accepts_missing_lm_head():
    hm = hf_model("opt")
    sd = {k: v for k, v in hm.state_dict().items() if k != "lm_head.weight"}  # as HF's safetensors files store it
    m = from_config(hm.config, dtype=torch.float32, device="meta")
    assert all(p.is_meta for p in m.parameters())
    m.load_state_dict(sd, assign=True)
    assert m.lm_head.weight is m.model.decoder.embed_tokens.weight
    ids = torch.randint(0, VOCAB, (1, 5))
    with torch.no_grad():
        assert torch.allclose(m(ids), hm(ids).logits, atol=1e-5)


def test_rope_frequencies_survive_casts_and_meta_loading():
    hm = hf_model("llama3-rope")
    m = ours_from(hm)  # built on meta: inv_freq recomputed at the first forward
    ids = torch.randint(0, VOCAB, (1, 9))
    with torch.no_grad():
        a = m(ids)
        m.half().float()  # a round trip through fp16 must not round the frequencies
        b = m.float()(ids)
    assert m.model.rotary_emb.inv_freq.dtype == torch.float32
    assert torch.allclose(a, b, atol=1e-2)  # the weights went through fp16; RoPE did not
    expected = hm.model.rotary_emb.inv_freq
    assert torch.equal(m.model.rotary_emb.inv_freq, expected)


def test_from_config_init_and_seed():
    cfg = ModelConfig.from_hf(hf_llama())
    a, b = from_config(cfg, dtype=torch.float32, seed=5), from_config(cfg, dtype=torch.float32, seed=5)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    w = a.model.layers[0].mlp.up_proj.weight.detach()
    # the config's initializer_range (hf_llama: 0.1), as transformers' _init_weights (0.02 only where unset)
    assert abs(float(w.std()) - 0.1) < 0.01 and w.dtype == torch.float32
    assert torch.equal(a.model.norm.weight, torch.ones(64))
    assert from_config(cfg).lm_head.weight.dtype == torch.float16  # default dtype
    with pytest.raises(TypeError, match=r"dtype must be torch.float16, .* or torch.float64, got torch.int8"):
        from_config(cfg, dtype=torch.int8)
    with pytest.raises(ValueError, match=r"input_ids must be \[batch, seq\]; got shape \(5,\)"):
        a(torch.zeros(5, dtype=torch.long))


# ---------------------------------------------------------------------------------------------------
# sparsify_
# ---------------------------------------------------------------------------------------------------
def _not_head(module, fqn):
    return fqn != "lm_head"


@pytest.mark.parametrize("case", ["llama-gqa", "opt"])
def test_sparsified_matches_dense_with_zeros(case):
    """Pruned fp16 model: SparseLinear logits as accurate as the dense-with-zeros fp16 model's, both against
    the same zeroed weights in fp64."""
    ours = ours_from(hf_model(case), dtype=torch.float16)
    magnitude_prune_(ours, 0.6, filter_fn=_not_head)
    dense = copy.deepcopy(ours)
    ref = copy.deepcopy(ours).double()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        report = flash_llm.sparsify_(ours)
    n_proj = len(ours.config.linear_shapes()) * ours.config.num_layers
    assert len(report.converted) == n_proj
    assert [s.fqn for s in report.skipped] == ["lm_head"]
    assert any("kept 1 nn.Linear layer(s) dense" in str(x.message) for x in w)
    assert sum(isinstance(m, flash_llm.SparseLinear) for m in ours.modules()) == n_proj
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        y64, yd, ys = ref(ids), dense(ids), ours(ids)
    err, err_dense = max_abs_err(ys, y64), max_abs_err(yd, y64)
    assert err <= 2 * err_dense + ulp(torch.float16, float(y64.abs().max())), (err, err_dense)
    # the sparse model's state dict still names every projection as HF does (compressed arrays under it)
    prefix = "model.layers.0." if case.startswith("llama") else "model.decoder.layers.0."
    keys = set(ours.state_dict())
    assert {prefix + "self_attn.q_proj.weight_data", prefix + "self_attn.q_proj.weight_offsets"} <= keys


def test_sparsify_fp32_model_stays_dense_with_a_warning():
    ours = ours_from(hf_model("llama-gqa"))
    ids = torch.randint(0, VOCAB, (1, 6))
    with torch.no_grad():
        before = ours(ids)
    with pytest.warns(UserWarning, match=r"dtype torch.float32: the formats hold fp16/bf16"):
        report = flash_llm.sparsify_(ours)
    assert not report.converted
    with torch.no_grad():
        assert torch.equal(ours(ids), before)


@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_engine_equals_eager_engine(case):
    """Engine(fuse=True) (compiled norms, RoPE / query scaling with the cache write, residual adds folded into
    the next norm where the layers are pre-norm) gives the eager engine's logits on every model shape here,
    including post-LN OPT (opt-350m-style), where only the attention part is fused."""
    from flash_llm.engine import Engine
    from flash_llm.models import set_fused

    hm = hf_model(case, seed=4)
    eager, fused = ours_from(hm), ours_from(hm)
    prompts = [[5, 9, 3, 7], [11, 2]]
    a = Engine(eager, max_batch=2, max_seq=24).generate(prompts, 5, output_logits=True, eos_token_id=None)
    b = Engine(fused, max_batch=2, max_seq=24, fuse=True).generate(prompts, 5, output_logits=True, eos_token_id=None)
    assert any(getattr(m, "fused", False) for m in fused.modules())
    torch.testing.assert_close(b.logits, a.logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(a.tokens, b.tokens)
    set_fused(fused, False)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_compiles_to_one_graph_across_lengths(family):
    """``torch.compile(fullgraph=True)`` of a model takes a second prompt length (dynamic) without a graph break
    and gives eager's bits (session 71: ``is_causal=t > 1`` was a symbolic bool there, which attention refuses)."""
    m = from_config(ModelConfig(family=family, vocab_size=128, hidden_size=64, num_layers=1, num_heads=4,
                                intermediate_size=128), dtype=torch.float32, seed=0)
    c = torch.compile(m, fullgraph=True, backend="eager")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n in (7, 11, 1, 13):
            ids = torch.randint(0, 128, (1, n), generator=g)
            assert torch.equal(c(ids), m(ids)), n


def test_fused_merged_sparse_llama_backpropagates():
    """The fused MLP's SiLU-inside-the-projection path (no autograd formula) is taken only without grad, as the
    fused norms are: with grad the model backpropagates to its inputs' embeddings (session 71: a RuntimeError)."""
    from flash_llm.models import merge_projections, set_fused

    m = from_config(ModelConfig(family="llama", vocab_size=128, hidden_size=64, num_layers=1, num_heads=4,
                                intermediate_size=128), dtype=torch.float16, seed=0)
    magnitude_prune_(m, 0.5, filter_fn=lambda mod, fqn: fqn != "lm_head")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        flash_llm.sparsify_(m)
    merge_projections(m)
    set_fused(m, True)
    ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = m(ids)
    out = m(ids)
    out.float().sum().backward()
    grad = m.model.embed_tokens.weight.grad
    assert grad is not None and grad.isfinite().all() and grad.abs().sum() > 0
    torch.testing.assert_close(out.detach(), want, atol=2e-2, rtol=2e-2)

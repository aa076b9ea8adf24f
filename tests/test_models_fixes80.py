"""flash_llm.models fixes from the session-80 models bug hunt (CPU), against transformers 5.

1. A tied model refuses a state dict whose ``lm_head.weight`` differs from the embedding (``load_state_dict``,
   ``assign`` True or False), before any tensor of the model changes, in the words of from_pretrained's FormatError;
   equal tensors (or the same one) still load.
2. A ``rope_theta`` inside ``ModelConfig(rope_scaling=...)`` (transformers 5's ``rope_parameters`` shape) becomes
   ``rope_theta`` (a conflicting one is refused); any other unknown key of the dict is refused by name.
3. One family's options set away from their defaults in the other family's config are refused by name.
4. An OPT config.json without ``pad_token_id`` takes transformers' ``OPTConfig`` default (1: the embedding's
   ``padding_idx``); a negative ``pad_token_id`` counts from the end of the vocabulary as ``nn.Embedding`` does.
5. A plain OPT forward past ``max_position_embeddings`` is a ValueError naming the limit, not a bare IndexError.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import flash_llm
from flash_llm.models import ModelConfig, from_config
from flash_llm.models.config import UnsupportedConfigError

transformers = pytest.importorskip("transformers")

VOCAB = 97
L3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 16}
LLAMA = dict(family="llama", vocab_size=VOCAB, hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
             intermediate_size=96, max_position_embeddings=64)
OPT = dict(family="opt", vocab_size=VOCAB, hidden_size=64, num_layers=1, num_heads=4, intermediate_size=96,
           max_position_embeddings=64, activation="relu", attention_bias=True, mlp_bias=True)
HF_LLAMA = {"model_type": "llama", "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
HF_OPT = {"model_type": "opt", "vocab_size": VOCAB, "hidden_size": 64, "ffn_dim": 96, "num_hidden_layers": 1,
          "num_attention_heads": 4, "max_position_embeddings": 64}
IDS = torch.randint(3, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))


def _quiet_transformers():
    transformers.logging.set_verbosity_error()


def _config(family: str, **kw) -> ModelConfig:
    return ModelConfig(**{**(LLAMA if family == "llama" else OPT), **kw})


# ---- 1. tied model, untied state dict ------------------------------------------------------------------------------
EMBED = {"llama": "model.embed_tokens.weight", "opt": "model.decoder.embed_tokens.weight"}


def _snapshot(m: nn.Module) -> dict:
    return {n: (p, p.detach().clone()) for n, p in m.named_parameters()}


def _unchanged(m: nn.Module, snap: dict) -> bool:
    now = dict(m.named_parameters())
    return now.keys() == snap.keys() and all(now[n] is p and torch.equal(p, v) for n, (p, v) in snap.items())


@pytest.mark.parametrize("assign", [True, False])
@pytest.mark.parametrize("family", ["llama", "opt"])
def test_tied_model_refuses_a_state_dict_whose_head_differs(family, assign):
    """The stored lm_head.weight was silently replaced by the embedding (the post hook re-tied over it)."""
    state = from_config(_config(family, tie_word_embeddings=False), dtype=torch.float32, seed=1).state_dict()
    assert not torch.equal(state["lm_head.weight"], state[EMBED[family]])
    m = from_config(_config(family, tie_word_embeddings=True), dtype=torch.float32, seed=2)
    snap = _snapshot(m)
    with pytest.raises(ValueError, match=rf"'lm_head\.weight' and '{EMBED[family]}' are tied in the model but "
                                         r"differ in the state dict"):
        m.load_state_dict(state, assign=assign)
    assert _unchanged(m, snap)  # refused before any tensor changed
    assert m.lm_head.weight is m.input_embeddings().weight
    # under a prefix (the model inside another module) too
    outer = nn.Module()
    outer.lm = m
    with pytest.raises(ValueError, match=rf"'lm\.lm_head\.weight' and 'lm\.{EMBED[family]}' are tied"):
        outer.load_state_dict({f"lm.{k}": v for k, v in state.items()}, assign=assign)
    assert _unchanged(m, snap)


@pytest.mark.parametrize("assign", [True, False])
def test_transformers_untied_load_of_a_tied_config_is_refused(assign):
    """The report's case: transformers 5 loads a tie_word_embeddings=True checkpoint whose two tensors differ
    untied (its config still says tied); from_config(hf.config) + load_state_dict(hf.state_dict()) refuses."""
    _quiet_transformers()
    torch.manual_seed(0)
    hc = transformers.LlamaConfig(**{k: v for k, v in HF_LLAMA.items() if k != "model_type"}, initializer_range=0.1,
                                  tie_word_embeddings=False)
    hf = transformers.LlamaForCausalLM(hc).eval()
    hf.config.tie_word_embeddings = True
    m = from_config(hf.config, dtype=torch.float32, device="meta" if assign else "cpu")
    with pytest.raises(ValueError, match=r"are tied in the model but differ"):
        m.load_state_dict(hf.state_dict(), assign=assign)
    # the untied config loads both, with transformers' logits
    hf.config.tie_word_embeddings = False
    m = from_config(hf.config, dtype=torch.float32, device="meta" if assign else "cpu")
    m.load_state_dict(hf.state_dict(), assign=assign)
    with torch.no_grad():
        assert (hf(IDS).logits - m(IDS)).abs().max().item() < 1e-4


@pytest.mark.parametrize("assign", [True, False])
@pytest.mark.parametrize("same", [True, False])
@pytest.mark.parametrize("family", ["llama", "opt"])
def test_tied_state_dict_with_equal_tensors_still_loads(family, same, assign):
    src = from_config(_config(family, tie_word_embeddings=True), dtype=torch.float32, seed=1)
    state = src.state_dict()
    if not same:
        state["lm_head.weight"] = state["lm_head.weight"].clone()
    m = from_config(_config(family, tie_word_embeddings=True), dtype=torch.float32, seed=2)
    assert not m.load_state_dict(state, assign=assign).missing_keys
    assert m.lm_head.weight is m.input_embeddings().weight
    assert torch.equal(m.lm_head.weight, state[EMBED[family]])
    with torch.no_grad():
        assert torch.equal(m(IDS), src(IDS))


# ---- 2. rope_theta inside rope_scaling ------------------------------------------------------------------------------
def test_rope_theta_inside_rope_scaling_is_taken():
    cfg = _config("llama", rope_scaling={**L3, "rope_theta": 500000.0})
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling == L3
    assert cfg == _config("llama", rope_theta=500000.0, rope_scaling=L3)
    plain = _config("llama", rope_scaling={"rope_type": "default", "rope_theta": 500000.0})
    assert plain.rope_theta == 500000.0 and plain.rope_scaling is None
    # the same value given twice is fine; replace() reads it as the constructor
    assert _config("llama", rope_theta=500000.0, rope_scaling={**L3, "rope_theta": 500000.0}) == cfg
    assert _config("llama").replace(rope_scaling={**L3, "rope_theta": 500000.0}) == cfg
    assert cfg.replace(num_layers=2).rope_theta == 500000.0


def test_transformers_rope_parameters_as_rope_scaling_equal_from_hf():
    """transformers 5's own ``config.rope_parameters`` passed as rope_scaling: the config from_hf reads."""
    _quiet_transformers()
    hc = transformers.LlamaConfig(**{k: v for k, v in HF_LLAMA.items() if k != "model_type"},
                                  rope_parameters={**L3, "rope_theta": 500000.0})
    assert hc.rope_parameters["rope_theta"] == 500000.0
    cfg = _config("llama", rope_scaling=dict(hc.rope_parameters))
    read = ModelConfig.from_hf(hc)
    assert (cfg.rope_theta, cfg.rope_scaling) == (read.rope_theta, read.rope_scaling) == (500000.0, L3)


def test_conflicting_rope_theta_inside_rope_scaling_is_refused():
    with pytest.raises(ValueError, match=r"rope_scaling\['rope_theta'\] \(500000\.0\) disagrees with rope_theta "
                                         r"\(7\.0\)"):
        _config("llama", rope_theta=7.0, rope_scaling={**L3, "rope_theta": 500000.0})
    with pytest.raises(ValueError, match=r"disagrees with rope_theta"):
        _config("llama", rope_theta=7.0).replace(rope_scaling={"rope_type": "default", "rope_theta": 8.0})
    with pytest.raises(ValueError, match=r"rope_scaling\['rope_theta'\] must be a number > 0"):
        _config("llama", rope_scaling={**L3, "rope_theta": float("nan")})


@pytest.mark.parametrize("rs, key", [({**L3, "attention_factor": 2.0}, "attention_factor"),
                                     ({**L3, "fator": 8.0}, "fator"),
                                     ({"rope_type": "default", "beta_fast": 32}, "beta_fast")])
def test_unknown_rope_scaling_keys_are_refused_by_name(rs, key):
    with pytest.raises(ValueError, match=rf"rope_scaling: unknown key\(s\) \['{key}'\]"):
        _config("llama", rope_scaling=rs)
    with pytest.raises(ValueError, match=rf"unknown key\(s\) \['{key}'\]"):
        _config("llama").replace(rope_scaling=rs)


def test_llama3_partial_rotary_factor_other_than_one_is_refused():
    """transformers' llama3 RoPE rotates only that fraction of head_dim (from the dict, or a top-level key it moves
    there): not implemented, so an UnsupportedConfigError (backend="auto" falls back to transformers)."""
    assert _config("llama", rope_scaling={**L3, "partial_rotary_factor": 1.0}).rope_scaling == L3
    with pytest.raises(UnsupportedConfigError, match=r"partial_rotary_factor=0\.5 is not supported"):
        _config("llama", rope_scaling={**L3, "partial_rotary_factor": 0.5})
    with pytest.raises(UnsupportedConfigError, match=r"rope_parameters: partial_rotary_factor=0\.5"):
        ModelConfig.from_hf({**HF_LLAMA, "rope_parameters": {**L3, "partial_rotary_factor": 0.5}})
    with pytest.raises(UnsupportedConfigError, match=r"partial_rotary_factor=0\.5"):
        ModelConfig.from_hf({**HF_LLAMA, "partial_rotary_factor": 0.5, "rope_scaling": L3})


def test_from_hf_still_reads_rope_dicts_with_keys_transformers_ignores():
    """transformers warns about and ignores keys its RoPE type does not read: from_hf reads those files as before,
    with transformers' frequencies."""
    _quiet_transformers()
    for rope in ({**L3, "attention_factor": 1.0, "rope_theta": 500.0}, {"rope_type": "default", "factor": 4.0},
                 {"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.5}):
        d = {**HF_LLAMA, "rope_parameters": rope}
        cfg = ModelConfig.from_hf(json.loads(json.dumps(d)))
        hc = transformers.LlamaConfig.from_dict(json.loads(json.dumps(d)))
        ours = from_config(cfg, dtype=torch.float32).model.rotary_emb
        theirs = transformers.LlamaForCausalLM(hc).model.rotary_emb
        assert cfg.rope_theta == hc.rope_parameters["rope_theta"]
        assert torch.equal(ours.inv_freq.float(), theirs.inv_freq.float())


# ---- 3. the other family's options ----------------------------------------------------------------------------------
@pytest.mark.parametrize("family, option, value, named", [
    ("llama", "do_layer_norm_before", False, "do_layer_norm_before"),
    ("llama", "layer_norm_elementwise_affine", False, "layer_norm_elementwise_affine"),
    ("llama", "remove_final_layer_norm", True, "remove_final_layer_norm"),
    ("opt", "norm_eps", 0.1, "norm_eps"), ("opt", "rope_theta", 5.0, "rope_theta"),
    ("opt", "rope_scaling", L3, "rope_scaling"),
    ("opt", "rope_scaling", {"rope_type": "default", "rope_theta": 5.0}, "rope_theta")])
def test_the_other_familys_options_are_refused_by_name(family, option, value, named):
    """They were accepted and silently ignored (the model never reads them); word_embed_proj_dim was refused."""
    other = "an OPT" if family == "llama" else "a Llama"
    with pytest.raises(ValueError, match=rf"^{named} is {other} option"):
        _config(family, **{option: value})
    with pytest.raises(ValueError, match=rf"^{named} is {other} option"):
        _config(family).replace(**{option: value})


def test_the_other_familys_options_at_their_defaults_are_fine():
    _config("llama", do_layer_norm_before=True, layer_norm_elementwise_affine=True, remove_final_layer_norm=False)
    _config("opt", norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None)
    _config("opt", rope_scaling={"rope_type": "default"})


def test_from_hf_never_sets_the_other_familys_options():
    """Keys of the other family in a config.json are not read (transformers ignores them too): no refusal."""
    _quiet_transformers()
    opt = ModelConfig.from_hf({**HF_OPT, "rms_norm_eps": 0.1, "rope_theta": 5.0, "rope_scaling": L3,
                               "rope_parameters": {**L3, "rope_theta": 5.0}})
    assert (opt.norm_eps, opt.rope_theta, opt.rope_scaling) == (1e-5, 10000.0, None)
    llama = ModelConfig.from_hf({**HF_LLAMA, "do_layer_norm_before": False, "layer_norm_elementwise_affine": False,
                                 "_remove_final_layer_norm": True})
    assert (llama.do_layer_norm_before, llama.layer_norm_elementwise_affine, llama.remove_final_layer_norm) == \
        (True, True, False)
    for hc in (transformers.OPTConfig(**{k: v for k, v in HF_OPT.items() if k != "model_type"},
                                      do_layer_norm_before=False, _remove_final_layer_norm=True),
               transformers.LlamaConfig(**{k: v for k, v in HF_LLAMA.items() if k != "model_type"},
                                        rope_parameters={**L3, "rope_theta": 5.0}, rms_norm_eps=0.1)):
        cfg = ModelConfig.from_hf(hc)
        assert ModelConfig.from_hf(cfg.to_hf()) == cfg


# ---- 4. padding_idx: OPT's default pad, negative pad ids ----------------------------------------------------------
def test_opt_config_without_pad_token_id_takes_transformers_default():
    _quiet_transformers()
    cfg = ModelConfig.from_hf(dict(HF_OPT))
    assert cfg.pad_token_id == 1 and cfg.padding_idx == 1
    hf = transformers.OPTForCausalLM(transformers.OPTConfig(**{k: v for k, v in HF_OPT.items() if k != "model_type"}))
    assert hf.get_input_embeddings().padding_idx == 1
    m = from_config(cfg, dtype=torch.float32, seed=0)
    assert m.input_embeddings().padding_idx == 1 and torch.count_nonzero(m.input_embeddings().weight[1]) == 0
    assert cfg.to_hf()["pad_token_id"] == 1
    # eos / bos are not defaulted: transformers' generate does not stop on an eos the file leaves out either
    assert cfg.eos_token_id is None and cfg.bos_token_id is None
    # an explicit null stays null, as in transformers
    assert ModelConfig.from_hf({**HF_OPT, "pad_token_id": None}).padding_idx is None
    assert ModelConfig.from_hf({**HF_OPT, "pad_token_id": 5}).padding_idx == 5


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("pad, idx", [(-1, VOCAB - 1), (-VOCAB, 0), (-3, VOCAB - 3)])
def test_negative_pad_token_id_counts_from_the_end(family, pad, idx):
    _quiet_transformers()
    cfg = _config(family, pad_token_id=pad)
    assert cfg.padding_idx == idx
    m = from_config(cfg, dtype=torch.float32, seed=0)
    emb = m.input_embeddings()
    assert emb.padding_idx == idx and torch.count_nonzero(emb.weight[idx]) == 0
    hf_cfg = (transformers.LlamaConfig if family == "llama" else transformers.OPTConfig)(
        **{k: v for k, v in (HF_LLAMA if family == "llama" else HF_OPT).items() if k != "model_type"},
        pad_token_id=pad)
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    assert hf.get_input_embeddings().padding_idx == idx


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_pad_token_id_below_minus_vocab_is_refused(family):
    with pytest.raises(ValueError, match=rf"ModelConfig\.pad_token_id \({-VOCAB - 1}\) is below -vocab_size"):
        _config(family, pad_token_id=-VOCAB - 1)
    with pytest.raises(ValueError, match=r"pad_token_id \(-1000\) is below -vocab_size"):
        ModelConfig.from_hf({**(HF_LLAMA if family == "llama" else HF_OPT), "pad_token_id": -1000})
    # ids past the vocabulary still mean no padding_idx (the engine shows them in stopped rows)
    assert _config(family, pad_token_id=VOCAB).padding_idx is None


# ---- 5. OPT past max_position_embeddings ----------------------------------------------------------------------------
def _opt_model(max_pos=8):
    return from_config(_config("opt", max_position_embeddings=max_pos), dtype=torch.float32, seed=0).eval()


def test_opt_forward_past_the_position_table_names_the_limit():
    m = _opt_model()
    ids = torch.randint(3, VOCAB, (1, 12))
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"max_position_embeddings is 8 \(positions 0\.\.7\)"):
            m(ids)
        with pytest.raises(ValueError, match=r"position 9 is past OPT's learned position table"):
            m(ids[:, :10], attention_mask=torch.ones(1, 10, dtype=torch.long))
        with pytest.raises(ValueError, match=r"position 8 is past"):
            m(ids[:, :3], positions=torch.tensor([[0, 1, 8]]))
        assert m(ids[:, :8]).shape == (1, 8, VOCAB)  # the whole table
        # a padded batch whose real tokens fit runs (the padding is not counted), as in transformers
        mask = torch.ones(2, 10, dtype=torch.long)
        mask[:, :4] = 0
        assert m(torch.randint(3, VOCAB, (2, 10)), attention_mask=mask).shape == (2, 10, VOCAB)


def test_opt_engine_is_unchanged_by_the_position_check():
    """The engine passes its own Attend (it bounds max_seq by the table): its steps never come through the check."""
    from flash_llm.engine import Engine

    m = _opt_model(16)
    calls = []
    orig = m._check_positions
    m._check_positions = lambda *a: calls.append(1) or orig(*a)
    out = Engine(m, max_batch=2, max_seq=16, progress=False).generate([[5, 6, 7], [8, 9]], 6, eos_token_id=None)
    assert out.tokens.shape[1] == 6 and not calls
    with pytest.raises(ValueError, match=r"max_position_embeddings"):
        Engine(m, max_batch=1, max_seq=17, progress=False)


def test_opt_from_pretrained_past_the_table(tmp_path):
    _quiet_transformers()
    torch.manual_seed(0)
    hf = transformers.OPTForCausalLM(transformers.OPTConfig(**{**{k: v for k, v in HF_OPT.items()
                                                                   if k != "model_type"},
                                                                "max_position_embeddings": 8}, dropout=0.0)).eval()
    hf.save_pretrained(tmp_path)
    m = flash_llm.from_pretrained(tmp_path, dtype=torch.float32, sparsify=False, backend="flash", progress=False)
    ids = torch.randint(3, VOCAB, (1, 9))
    with pytest.raises(IndexError):
        hf(ids)
    with torch.no_grad(), pytest.raises(ValueError, match=r"max_position_embeddings is 8"):
        m(ids)
    with torch.no_grad():
        assert (hf(ids[:, :8]).logits - m(ids[:, :8])).abs().max().item() < 1e-4

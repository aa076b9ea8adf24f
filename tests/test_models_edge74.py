"""flash_llm.models edge cases from the session-74 models bug hunt (CPU), against transformers 5.

1. RoPE keys of ``config.json`` read with transformers 5's precedence: a non-empty ``rope_scaling`` replaces
   ``rope_parameters`` whole; ``rope_theta`` from that dict first, then the top level.  A top-level
   ``original_max_position_embeddings`` that disagrees with a llama3 dict is refused (transformers reads it two ways).
2. ``generation_config.json``'s ``eos_token_id`` (Llama-3-Instruct's ``<|eot_id|>``) becomes the loaded model's
   ``config.eos_token_id`` (from_pretrained, load_tensor_parallel), so the engine stops where transformers does.
3. An odd Llama ``head_dim`` (given, or derived from a hidden size the heads do not divide) is a ValueError at
   config time, not a RoPE shape error at the first forward.
4. ``load_tensor_parallel`` reads a tied checkpoint that stores the shared matrix as ``lm_head.weight`` only.
5. The Llama embedding's ``padding_idx`` is ``pad_token_id`` (zero row at init, no gradient), as transformers'.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import flash_llm
from flash_llm.checkpoint import convert
from flash_llm.engine import Engine
from flash_llm.models import ModelConfig, from_config
from flash_llm.models.config import UnsupportedConfigError
from flash_llm.parallel import load_tensor_parallel

transformers = pytest.importorskip("transformers")

VOCAB = 97
L3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
BASE = {"model_type": "llama", "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
IDS = torch.randint(3, VOCAB, (2, 60), generator=torch.Generator().manual_seed(1))


def _quiet_transformers():
    transformers.logging.set_verbosity_error()


# ---- 1. RoPE precedence ------------------------------------------------------------------------------------------
# (config.json keys, expected rope_theta, expected rope_scaling or None): what transformers 5.25 resolves
ROPE_CASES = {
    # B: the legacy name holds the theta, no top-level rope_theta: the dict's theta
    "scaling-carries-theta": ({"rope_scaling": {**L3, "rope_theta": 500.0, "original_max_position_embeddings": 16}},
                              500.0, {**L3, "original_max_position_embeddings": 16}),
    # C: rope_scaling replaces rope_parameters whole (its theta included: none there, none on top -> 10000)
    "scaling-replaces-params": ({"rope_parameters": {"rope_type": "default", "rope_theta": 100.0},
                                 "rope_scaling": {**L3, "original_max_position_embeddings": 16}},
                                10000.0, {**L3, "original_max_position_embeddings": 16}),
    # D: a default rope_scaling beats a llama3 rope_parameters
    "default-scaling-beats-llama3-params": ({"rope_parameters": {**L3, "rope_theta": 100.0,
                                                                 "original_max_position_embeddings": 16},
                                             "rope_scaling": {"rope_type": "default", "rope_theta": 100.0}},
                                            100.0, None),
    # the dict's theta before the top-level one
    "scaling-theta-beats-top-level": ({"rope_theta": 9.0, "rope_scaling": {**L3, "rope_theta": 11.0}},
                                      11.0, {**L3, "original_max_position_embeddings": 64}),
    # an empty rope_scaling does not replace rope_parameters; the top-level theta fills a dict without one
    "empty-scaling-keeps-params": ({"rope_scaling": {}, "rope_theta": 3.0, "rope_parameters": {**L3}},
                                   3.0, {**L3, "original_max_position_embeddings": 64}),
    # a top-level original_max_position_embeddings that agrees with the dict is fine
    "top-level-omp-agrees": ({"original_max_position_embeddings": 16,
                              "rope_scaling": {**L3, "original_max_position_embeddings": 16}},
                             10000.0, {**L3, "original_max_position_embeddings": 16}),
}


def _hf_rope(d: dict) -> dict:
    _quiet_transformers()
    return transformers.LlamaConfig.from_dict(dict(d)).rope_parameters


@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_rope_keys_are_read_with_transformers_precedence(case):
    keys, theta, scaling = ROPE_CASES[case]
    d = {**BASE, **keys}
    cfg = ModelConfig.from_hf(json.loads(json.dumps(d)))
    assert cfg.rope_theta == theta
    assert cfg.rope_scaling == scaling
    hf = _hf_rope(json.loads(json.dumps(d)))  # transformers itself resolves the same
    assert hf["rope_theta"] == theta
    if scaling is None:
        assert hf["rope_type"] == "default"
    else:
        assert {k: hf[k] for k in scaling} == scaling


@pytest.mark.parametrize("case", ["scaling-carries-theta", "scaling-replaces-params",
                                  "default-scaling-beats-llama3-params"])
def test_rope_precedence_logits_equal_transformers(tmp_path, case):
    """The report's cases B, C, D through config.json: transformers' and flash_llm's from_pretrained agree."""
    _quiet_transformers()
    torch.manual_seed(0)
    hm = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{k: v for k, v in BASE.items()
                                                                   if k != "model_type"}, initializer_range=0.1))
    hm.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    cfg = json.loads(path.read_text())
    for k in ("rope_parameters", "rope_theta", "rope_scaling"):
        cfg.pop(k, None)
    cfg.update(ROPE_CASES[case][0])
    path.write_text(json.dumps(cfg))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ours = flash_llm.from_pretrained(tmp_path, dtype=torch.float32, sparsify=False, backend="flash", progress=False)
    with torch.no_grad():
        ref, got = theirs(IDS).logits, ours(IDS)
    assert (ref - got).abs().max().item() < 1e-4


@pytest.mark.parametrize("rope", [{"original_max_position_embeddings": 8,
                                   "rope_scaling": {**L3, "original_max_position_embeddings": 16}},
                                  {"original_max_position_embeddings": 8, "rope_parameters": {**L3}}])
def test_top_level_original_max_position_embeddings_that_disagrees_is_refused(tmp_path, rope):
    """transformers 5.25 reads this two ways (LlamaConfig / AutoModel from_pretrained: the top-level key;
    AutoConfig, from_dict: the dict's), so flash refuses it by name, and backend="auto" does not fall back."""
    d = {**BASE, "rope_theta": 10000.0, **rope}
    with pytest.raises(ValueError, match=r"top-level original_max_position_embeddings \(8\) disagrees with "
                                         r"(rope_scaling\.original_max_position_embeddings \(16\)|"
                                         r"max_position_embeddings .* \(64\))") as e:
        ModelConfig.from_hf(d)
    assert not isinstance(e.value, UnsupportedConfigError)
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"config\.json: the top-level original_max_position_embeddings"):
        flash_llm.from_pretrained(tmp_path, dtype=torch.float32, backend="auto", progress=False)
    # beside plain RoPE it means nothing (transformers ignores it too)
    plain = ModelConfig.from_hf({**BASE, "original_max_position_embeddings": 8, "rope_theta": 7.0})
    assert plain.rope_scaling is None and plain.rope_theta == 7.0


# ---- 2. generation_config.json's eos_token_id ----------------------------------------------------------------------
def _instruct_checkpoint(tmp_path, gen_eos="stop"):
    """A tiny Llama whose config.json says eos 96 and whose generation_config.json says ``[96, stop]`` (the layout of
    Llama-3-8B-Instruct's first release), ``stop`` being the 4th token of the prompt's greedy continuation."""
    _quiet_transformers()
    torch.manual_seed(0)
    hc = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)
    hm = transformers.LlamaForCausalLM(hc).eval()
    prompt = [5, 17, 33, 8]
    with torch.no_grad():
        free = hm.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[0, len(prompt):].tolist()
    stop = free[3]
    assert 96 not in free[:4] and stop not in free[:3]
    hm.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["eos_token_id"] = 96
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    if gen_eos == "stop":
        gen["eos_token_id"] = [96, stop]
    elif gen_eos == "absent":
        gen.pop("eos_token_id", None)
    else:
        gen["eos_token_id"] = gen_eos
    (tmp_path / "generation_config.json").write_text(json.dumps(gen))
    return prompt, free, stop


def test_generation_config_eos_stops_the_engine_where_transformers_stops(tmp_path):
    prompt, free, stop = _instruct_checkpoint(tmp_path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        h = theirs.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=0)
    expected = h[0, len(prompt):].tolist()
    assert expected == free[:4]
    ours = flash_llm.from_pretrained(tmp_path, dtype=torch.float32, sparsify=False, progress=False)
    assert ours.config.eos_token_ids == (96, stop)
    g = Engine(ours, max_batch=1, progress=False).generate([prompt], 12)
    assert g.tokens[0, :g.lengths[0]].tolist() == expected


@pytest.mark.parametrize("gen_eos", ["absent", None, []])
def test_generation_config_without_eos_keeps_config_json_eos(tmp_path, gen_eos):
    _instruct_checkpoint(tmp_path, gen_eos)
    ours = flash_llm.from_pretrained(tmp_path, dtype=torch.float32, sparsify=False, progress=False)
    assert ours.config.eos_token_ids == (96,)


def test_generation_config_eos_replaces_config_json_eos_and_bad_values_are_refused(tmp_path):
    """transformers' generate stops at generation_config.json's ids only (not config.json's beside them)."""
    _instruct_checkpoint(tmp_path, 7)
    ours = flash_llm.from_pretrained(tmp_path, dtype=torch.float32, sparsify=False, progress=False)
    assert ours.config.eos_token_id == 7 and ours.config.eos_token_ids == (7,)
    gen = tmp_path / "generation_config.json"
    gen.write_text(json.dumps({"eos_token_id": ["7"]}))
    with pytest.raises(flash_llm.FormatError, match=r"generation_config\.json: eos_token_id must be a token id or a "
                                                    r"list of token ids, got \['7'\]"):
        flash_llm.from_pretrained(tmp_path, dtype=torch.float32, sparsify=False, progress=False)


def test_generation_config_eos_in_load_tensor_parallel(world1, tmp_path):
    _, _, stop = _instruct_checkpoint(tmp_path)
    tpm, _ = load_tensor_parallel(tmp_path, world1, dtype=torch.float32, progress=False)
    assert tpm.config.eos_token_ids == (96, stop)


# ---- 3. an odd Llama head_dim ------------------------------------------------------------------------------------
def test_odd_head_dim_is_refused_at_config_time(tmp_path):
    with pytest.raises(ValueError, match=r"RoPE needs an even head_dim .* got 7"):
        ModelConfig.from_hf({**BASE, "head_dim": 7})
    with pytest.raises(ValueError, match=r"hidden_size \(60\) is not a multiple of num_heads \(8\)"):
        ModelConfig.from_hf({**BASE, "hidden_size": 60, "num_attention_heads": 8, "num_key_value_heads": 8})
    with pytest.raises(ValueError, match=r"RoPE needs an even head_dim"):
        ModelConfig(family="llama", vocab_size=VOCAB, hidden_size=28, num_layers=1, num_heads=4, intermediate_size=32)
    with pytest.raises(ValueError, match=r"hidden_size \(64\) is not a multiple of num_heads \(6\)"):
        ModelConfig(family="llama", vocab_size=VOCAB, hidden_size=48, num_layers=1, num_heads=6,
                    intermediate_size=32).replace(hidden_size=64)
    # a ValueError naming config.json under backend="auto" too (transformers refuses these configs as well)
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "head_dim": 7}))
    with pytest.raises(ValueError, match=r"config\.json: RoPE needs an even head_dim") as e:
        flash_llm.from_pretrained(tmp_path, dtype=torch.float32, backend="auto", progress=False)
    assert not isinstance(e.value, UnsupportedConfigError)
    # even head_dims (given or derived) still build and run
    for extra in ({"head_dim": 6}, {"hidden_size": 48, "num_attention_heads": 8, "num_key_value_heads": 4}):
        m = from_config(ModelConfig.from_hf({**BASE, **extra}), dtype=torch.float32, seed=0)
        assert m(torch.tensor([[1, 2, 3]])).shape == (1, 3, VOCAB)
    # OPT has no RoPE: an odd head_dim is fine there
    ModelConfig(family="opt", vocab_size=VOCAB, hidden_size=28, num_layers=1, num_heads=4, intermediate_size=32,
                activation="relu")


# ---- 4. load_tensor_parallel: a tied checkpoint with lm_head.weight only ---------------------------------------------
EMBED = {"llama": "model.embed_tokens.weight", "opt": "model.decoder.embed_tokens.weight"}


def _tied_hf(family: str):
    _quiet_transformers()
    torch.manual_seed(0)
    if family == "opt":
        hc = transformers.OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=96, num_hidden_layers=1,
                                    num_attention_heads=4, max_position_embeddings=64, init_std=0.1, dropout=0.0)
    else:
        hc = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                      num_attention_heads=4, initializer_range=0.1, tie_word_embeddings=True)
    return transformers.AutoModelForCausalLM.from_config(hc).eval()


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_tp_loads_a_tied_checkpoint_stored_as_lm_head_only(world1, tmp_path, family):
    hm = _tied_hf(family)
    state = {k: v.contiguous() for k, v in hm.state_dict().items() if k != EMBED[family]}
    assert "lm_head.weight" in state
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    hm.config.save_pretrained(tmp_path)
    ids = IDS[:, :20]
    with torch.no_grad():
        ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()(ids).logits
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (lm_head.weight is read: no "not read" warning)
        tpm, _ = load_tensor_parallel(tmp_path, world1, dtype=torch.float32, progress=False)
    assert tpm.lm_head.weight is tpm.input_embeddings().weight
    with torch.no_grad():
        assert (tpm(ids) - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("fmt", ["bitmap", "sparse-bitmask"])
def test_tp_loads_a_tied_compressed_checkpoint_stored_as_lm_head_only(world1, tmp_path, fmt):
    hm = _tied_hf("opt").half()
    hm.save_pretrained(tmp_path / "dense")
    path = tmp_path / fmt
    convert(tmp_path / "dense", path, format=fmt, min_sparsity=0.0, progress=False)
    f = str(path / "model.safetensors")
    with safe_open(f, "pt") as h:
        meta = h.metadata()
    state = load_file(f)
    assert "lm_head.weight" not in state
    state["lm_head.weight"] = state.pop(EMBED["opt"])
    save_file(state, f, metadata=meta)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        one = flash_llm.from_pretrained(path, dtype=torch.float16, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tpm, _ = load_tensor_parallel(path, world1, progress=False)
    assert tpm.lm_head.weight is tpm.input_embeddings().weight
    with torch.no_grad():
        assert torch.equal(tpm(IDS[:, :20]), one(IDS[:, :20]))


# ---- 5. Llama embedding padding_idx ------------------------------------------------------------------------------
def _llama_config(pad):
    return ModelConfig(family="llama", vocab_size=VOCAB, hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
                       intermediate_size=96, pad_token_id=pad)


def test_llama_embedding_padding_idx_is_pad_token_id():
    m = from_config(_llama_config(3), dtype=torch.float32, seed=0)
    emb = m.input_embeddings()
    assert emb.padding_idx == 3
    assert torch.count_nonzero(emb.weight[3]) == 0 and torch.count_nonzero(emb.weight[4]) > 0
    m.train()
    m(torch.tensor([[1, 3, 5, 3, 7]])).float().pow(2).mean().backward()
    assert torch.count_nonzero(emb.weight.grad[3]) == 0 and torch.count_nonzero(emb.weight.grad[5]) > 0
    # as transformers: the same index; none without a pad token (or one outside the vocabulary)
    _quiet_transformers()
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{k: v for k, v in BASE.items() if k != "model_type"},
                                                                pad_token_id=3))
    assert hf.model.embed_tokens.padding_idx == 3
    assert from_config(_llama_config(None), dtype=torch.float32, seed=0).input_embeddings().padding_idx is None
    assert from_config(_llama_config(VOCAB), dtype=torch.float32, seed=0).input_embeddings().padding_idx is None


def test_llama_padding_idx_loads_weights_and_runs_the_engine():
    """Loaded weights (a pad row that is not zero) are kept as loaded; a padded batch decodes as each prompt alone."""
    cfg = _llama_config(0)
    src = from_config(cfg, dtype=torch.float32, seed=1)
    with torch.no_grad():
        src.input_embeddings().weight[0].normal_(0.0, 0.02)
    state = src.state_dict()
    m = from_config(cfg, dtype=torch.float32, device="meta")
    m.load_state_dict(state, assign=True)
    assert m.input_embeddings().padding_idx == 0
    assert torch.equal(m.input_embeddings().weight[0], state["model.embed_tokens.weight"][0])
    prompts = [[5, 6, 7, 8, 9], [11, 12]]
    e = Engine(m.eval(), max_batch=2, progress=False)
    both = e.generate(prompts, 6, eos_token_id=None)
    for i, p in enumerate(prompts):
        alone = Engine(m, max_batch=1, progress=False).generate([p], 6, eos_token_id=None)
        assert both.tokens[i, :both.lengths[i]].tolist() == alone.tokens[0, :alone.lengths[0]].tolist()

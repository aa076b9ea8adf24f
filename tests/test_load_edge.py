"""Checkpoint layouts found in the wild that transformers reads and flash-llm must read the same way (a tied matrix
stored as ``lm_head.weight`` only, OPT files without the leading ``model.``, Llama-2-era ``rotary_emb.inv_freq``
buffers, a stale index beside ``model.safetensors``, shard headers with other tools' metadata), loading a flash-llm
checkpoint dense in another dtype, config errors under ``backend="auto"``, ``bundled.save_model_dir`` of tied and
sparsified models, and ``estimate_bytes``' argument checks."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import flash_llm
from flash_llm import FormatError, SparseLinear, SparsifyConfig, bundled
from flash_llm.checkpoint import _files, convert, load_checkpoint
from flash_llm.models import ModelConfig, from_config
from flash_llm.models.synthetic import build_synthetic, estimate_bytes

from _ckpt import EMBED, hf_model, logits, read_shard, rewrite_shard, save_hf

transformers = pytest.importorskip("transformers")

WEIGHTS = "model.safetensors"


def _hf(family: str, seed: int = 0, **kw):
    """A tiny transformers model in fp32 with random (not initialiser-shaped) weights: norms near 1, the rest
    N(0, 0.1), so that a weight loaded wrongly shows in the logits."""
    torch.manual_seed(seed)
    if family == "llama":
        base = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=64)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**base, **kw}))
    else:
        base = dict(vocab_size=96, hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=64, word_embed_proj_dim=64, dropout=0.0)
        model = transformers.OPTForCausalLM(transformers.OPTConfig(**{**base, **kw}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    return model.eval()


def _save(model, path):
    """transformers' own single-file save of ``model`` into ``path``; returns ``path``."""
    model.save_pretrained(path)
    return path


def _ids(vocab: int = 96) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(0))


def _assert_same_logits(model, hf, atol=1e-4):
    ids = _ids(hf.config.vocab_size)
    with torch.no_grad():
        got, ref = logits(model, ids).float(), logits(hf, ids).float()
    err = (got - ref).abs().max().item()
    assert err <= atol, f"max |logits - transformers'| = {err:.3g}"


def _rewrite_single(path, fn) -> dict[str, torch.Tensor]:
    """Replace ``model.safetensors`` of ``path`` by ``fn(its tensors)``; return the new tensors."""
    tensors = fn(load_file(str(path / WEIGHTS)))
    save_file(tensors, str(path / WEIGHTS), metadata={"format": "pt"})
    return tensors


# ---- 1. a tied matrix stored under either name ----------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "opt"])
def test_tied_checkpoint_storing_only_lm_head(family, tmp_path):
    hf = _hf(family, tie_word_embeddings=True)
    path = _save(hf, tmp_path / "ckpt")
    stored = _rewrite_single(path, lambda sd: {("lm_head.weight" if k == EMBED[family] else k): v
                                               for k, v in sd.items()})
    assert EMBED[family] not in stored and "lm_head.weight" in stored
    for backend in ("flash", "hf"):
        model = flash_llm.from_pretrained(path, dtype=torch.float32, sparsify=False, backend=backend, progress=False)
        embed = model.get_parameter(EMBED[family])
        assert model.lm_head.weight is embed and torch.equal(embed, stored["lm_head.weight"]), backend
        _assert_same_logits(model, hf)
    # into a model that already has (other, random) weights: the embedding must be overwritten too
    model = from_config(json.loads((path / "config.json").read_text()), dtype=torch.float32, device="cpu", seed=3)
    load_checkpoint(model, path, sparsify=False, progress=False)
    assert model.lm_head.weight is model.get_parameter(EMBED[family])
    assert torch.equal(model.get_parameter(EMBED[family]), stored["lm_head.weight"])
    _assert_same_logits(model, hf)
    # plain load_state_dict of such a state dict (the tying hook fills the embedding's name in)
    model = from_config(json.loads((path / "config.json").read_text()), dtype=torch.float32, device="cpu", seed=3)
    model.load_state_dict(stored)
    _assert_same_logits(model, hf)


def test_tied_checkpoint_storing_both_names_stays_tied_in_a_transformers_model(tmp_path):
    hf = _hf("llama", tie_word_embeddings=True)
    path = _save(hf, tmp_path / "ckpt")
    _rewrite_single(path, lambda sd: {**sd, "lm_head.weight": sd[EMBED["llama"]].clone()})
    for backend in ("flash", "hf"):
        model = flash_llm.from_pretrained(path, dtype=torch.float32, sparsify=False, backend=backend, progress=False)
        assert model.lm_head.weight is model.get_parameter(EMBED["llama"]), backend
        _assert_same_logits(model, hf)


# ---- 2. OPT files without the leading "model." -----------------------------------------------------------------

def test_stored_names():
    assert _files.stored_names("model.decoder.embed_tokens.weight") == ("model.decoder.embed_tokens.weight",
                                                                         "decoder.embed_tokens.weight")
    assert _files.stored_names("lm_head.weight") == ("lm_head.weight",)


@pytest.mark.parametrize("backend", ["flash", "hf"])
def test_opt_checkpoint_without_model_prefix(backend, tmp_path):
    # facebook/opt-6.7b and larger were saved from OPTModel: decoder.embed_tokens.weight ..., no lm_head (tied)
    hf = _hf("opt")
    path = _save(hf, tmp_path / "ckpt")
    stored = _rewrite_single(path, lambda sd: {k.removeprefix("model."): v for k, v in sd.items()})
    assert "decoder.embed_tokens.weight" in stored and not any(k.startswith("model.") for k in stored)
    model = flash_llm.from_pretrained(path, dtype=torch.float32, sparsify=False, backend=backend, progress=False)
    _assert_same_logits(model, hf)
    assert torch.equal(model.get_parameter("model.decoder.embed_tokens.weight"), stored["decoder.embed_tokens.weight"])


def test_opt_checkpoint_without_model_prefix_compresses(tmp_path):
    hf = hf_model("opt")  # pruned, fp16
    path = _save(hf, tmp_path / "ckpt")
    _rewrite_single(path, lambda sd: {k.removeprefix("model."): v for k, v in sd.items()})
    model, report = flash_llm.from_pretrained(path, output_report=True, progress=False)
    assert report.converted and isinstance(model.get_submodule("model.decoder.layers.0.fc1"), SparseLinear)
    ref = flash_llm.from_pretrained(path, dtype=torch.float32, sparsify=False, progress=False)
    fc1 = model.get_submodule("model.decoder.layers.0.fc1")
    assert torch.equal(fc1.to_dense().float(), ref.get_submodule("model.decoder.layers.0.fc1").weight)


def test_tensor_stored_under_both_names_is_refused(tmp_path):
    hf = _hf("opt")
    path = _save(hf, tmp_path / "ckpt")
    name = "model.decoder.final_layer_norm.weight"
    _rewrite_single(path, lambda sd: {**sd, name.removeprefix("model."): sd[name].clone()})
    with pytest.raises(FormatError, match=r"stored a second time"):
        flash_llm.from_pretrained(path, dtype=torch.float32, sparsify=False, progress=False)


# ---- 3. Llama-2-era rotary_emb.inv_freq ------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["flash", "hf"])
def test_per_layer_rotary_inv_freq_is_ignored(backend, tmp_path):
    hf = _hf("llama")
    path = _save(hf, tmp_path / "ckpt")
    inv = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    _rewrite_single(path, lambda sd: {**sd, **{f"model.layers.{i}.self_attn.rotary_emb.inv_freq": inv.clone()
                                               for i in range(2)}})
    model = flash_llm.from_pretrained(path, dtype=torch.float32, sparsify=False, backend=backend, progress=False)
    _assert_same_logits(model, hf)


# ---- 4. a flash-llm checkpoint loaded dense (or re-encoded) in another dtype -----------------------------------

@pytest.fixture(scope="module")
def flash_and_dense(tmp_path_factory):
    base = tmp_path_factory.mktemp("dtype")
    dense = save_hf(hf_model("llama", seed=3), base / "dense")
    convert(dense, base / "flash", progress=False)
    return base / "flash", dense


def test_flash_checkpoint_loads_dense_in_another_dtype(flash_and_dense):
    flash, dense = flash_and_dense
    ref = flash_llm.from_pretrained(dense, dtype=torch.float32, sparsify=False, progress=False)
    for load in (lambda: flash_llm.from_pretrained(flash, dtype=torch.float32, sparsify=False, progress=False),
                 lambda: bundled.load_dir(flash, dtype=torch.float32)):
        model = load()
        assert not any(isinstance(m, SparseLinear) for m in model.modules())
        got, want = model.state_dict(), ref.state_dict()
        assert got.keys() == want.keys()
        for k in want:
            assert got[k].dtype == torch.float32 and torch.equal(got[k], want[k]), k
    bf16 = bundled.load_dir(flash, dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}


def test_flash_checkpoint_reencodes_in_another_dtype(flash_and_dense):
    flash, dense = flash_and_dense
    model = flash_llm.from_pretrained(flash, dtype=torch.bfloat16, sparsify=SparsifyConfig(), progress=False)
    sparse = [m for m in model.modules() if isinstance(m, SparseLinear)]
    assert sparse and all(m.weight_dtype == torch.bfloat16 for m in sparse)
    ref = flash_llm.from_pretrained(dense, dtype=torch.bfloat16, progress=False)
    for name, m in model.named_modules():
        if isinstance(m, SparseLinear):
            assert torch.equal(m.to_dense(), ref.get_submodule(name).to_dense()), name


def test_flash_checkpoint_as_saved_keeps_its_dtype(flash_and_dense):
    flash, _ = flash_and_dense
    with pytest.raises(ValueError, match=r"compressed as torch.float16; dtype=torch.bfloat16 .*sparsify=False"):
        flash_llm.from_pretrained(flash, dtype=torch.bfloat16, progress=False)
    with pytest.raises(TypeError, match=r"dtype must be torch.float16, torch.bfloat16, torch.float32 or torch.float64"):
        flash_llm.from_pretrained(flash, dtype="float16", sparsify=False, progress=False)


# ---- 5. backend="auto" falls back to transformers only for what flash_llm.models does not implement -------------

def _saved_config(tmp_path, family, edit, **kw):
    path = _save(_hf(family, **kw).half(), tmp_path / "ckpt")
    cfg = json.loads((path / "config.json").read_text())
    edit(cfg)
    (path / "config.json").write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("backend", ["auto", "flash"])
def test_auto_backend_reports_config_errors(backend, tmp_path):
    path = _saved_config(tmp_path, "opt", lambda c: c.pop("num_attention_heads"))
    with pytest.raises(ValueError, match=rf"^{path / 'config.json'}: key 'num_attention_heads' is missing"):
        flash_llm.from_pretrained(path, backend=backend, progress=False)
    path = _saved_config(tmp_path / "neg", "llama", lambda c: c.update(hidden_size=-64))
    with pytest.raises(ValueError, match=rf"^{path / 'config.json'}: .*hidden_size must be an int >= 1, got -64"):
        flash_llm.from_pretrained(path, backend=backend, progress=False)


def test_auto_backend_falls_back_for_an_unsupported_option(tmp_path):
    path = _saved_config(tmp_path, "llama", lambda c: c.update(hidden_act="gelu_new"))
    model = flash_llm.from_pretrained(path, sparsify=False, progress=False)
    assert isinstance(model, transformers.LlamaForCausalLM)
    with pytest.raises(ValueError, match=r"config.json: ModelConfig.activation must be one of"):
        flash_llm.from_pretrained(path, backend="flash", progress=False)
    # an unsupported option does not hide an error of the config itself
    path = _saved_config(tmp_path / "both", "llama", lambda c: (c.update(hidden_act="gelu_new"),
                                                                 c.pop("intermediate_size")))
    with pytest.raises(ValueError, match=r"config.json: key 'intermediate_size' is missing"):
        flash_llm.from_pretrained(path, progress=False)


# ---- 6. model.safetensors wins over a stale index -------------------------------------------------------------

def test_single_file_preferred_over_a_stale_index(tmp_path):
    hf = _hf("llama")
    path = tmp_path / "ckpt"
    hf.save_pretrained(path, max_shard_size="40KB")
    assert (path / _files.INDEX_NAME).exists()
    with torch.no_grad():
        for p in hf.parameters():
            p.mul_(1.5)
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(path / WEIGHTS), metadata={"format": "pt"})
    files = _files.open_checkpoint(path)
    assert files.shards == [path / WEIGHTS]
    model = flash_llm.from_pretrained(path, dtype=torch.float32, sparsify=False, progress=False)
    _assert_same_logits(model, hf)
    # (a stale index whose shards are gone, as transformers leaves it after re-saving unsharded)
    for f in path.glob("model-*.safetensors"):
        f.unlink()
    model = flash_llm.from_pretrained(path, dtype=torch.float32, sparsify=False, progress=False)
    _assert_same_logits(model, hf)


# ---- 7. shard headers: only flash-llm's own metadata is compared -----------------------------------------------

def test_shard_headers_may_differ_in_other_metadata(tmp_path):
    hf = _hf("llama").half()
    path = tmp_path / "ckpt"
    hf.save_pretrained(path, max_shard_size="40KB")
    shards = sorted(path.glob("model-*.safetensors"))
    assert len(shards) > 1
    for i, f in enumerate(shards):
        tensors, meta = read_shard(f)
        rewrite_shard(f, tensors, {**meta, "format": "pt", "shard": str(i)})
    model = flash_llm.from_pretrained(path, dtype=torch.float32, sparsify=False, progress=False)
    _assert_same_logits(model, hf.float(), atol=1e-3)


def test_flash_metadata_differing_between_shards_is_refused(flash_and_dense, tmp_path):
    flash = shutil.copytree(flash_and_dense[0], tmp_path / "flash")
    convert(flash, tmp_path / "sharded", max_shard_size="16KB", overwrite=True, progress=False)
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    metas = [read_shard(f) for f in shards]
    src = next(i for i, (_, m) in enumerate(metas) if any(k.endswith(".weight_flash_llm") for k in m))
    key = next(k for k in metas[src][1] if k.endswith(".weight_flash_llm"))
    other = next(i for i in range(len(shards)) if i != src)
    tensors, meta = metas[other]
    changed = json.loads(metas[src][1][key])
    changed["nnz"] += 1
    rewrite_shard(shards[other], tensors, {**meta, key: json.dumps(changed)})
    second = shards[max(src, other)]  # (the error names the shard read second)
    with pytest.raises(FormatError, match=rf"{second}: header metadata '{key}' differs from another shard's"):
        flash_llm.from_pretrained(tmp_path / "sharded", progress=False)


# ---- 8. bundled.save_model_dir: tied and sparsified models -----------------------------------------------------

def _tiny(tie: bool) -> dict:
    return ModelConfig(family="llama", vocab_size=64, hidden_size=64, num_layers=1, num_heads=2,
                       intermediate_size=128, tie_word_embeddings=tie).to_hf()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_save_model_dir_of_a_tied_model(dtype, tmp_path):
    cfg = _tiny(tie=True)
    model = bundled.build_model(cfg, dtype=dtype, seed=0)
    out = bundled.save_model_dir(model, cfg, tmp_path / "m", dtype=torch.float16)
    stored = load_file(str(out / WEIGHTS))
    assert "lm_head.weight" not in stored  # tied: once, under the embedding's name (as transformers writes it)
    back = bundled.load_dir(out, dtype=dtype)
    assert back.lm_head.weight is back.model.embed_tokens.weight
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v.half().to(dtype)), k
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the model itself is left as it was


def test_save_model_dir_writes_sparse_layers_dense(tmp_path):
    from flash_llm.prune import magnitude_prune_

    cfg = _tiny(tie=False)
    model = bundled.build_model(cfg, dtype=torch.float16, seed=0)
    magnitude_prune_(model, 0.7, filter_fn=lambda m, fqn: "lm_head" not in fqn)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (lm_head kept dense, by name)
        flash_llm.sparsify_(model)
    assert any(isinstance(m, SparseLinear) for m in model.modules())
    out = bundled.save_model_dir(model, cfg, tmp_path / "m")
    stored = load_file(str(out / WEIGHTS))
    assert stored.keys() == dense.keys()
    for k, v in dense.items():
        assert torch.equal(stored[k], v), k
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    _assert_same_logits(bundled.load_dir(out), hf)


# ---- 9. estimate_bytes checks its arguments as build_synthetic does --------------------------------------------

@pytest.mark.parametrize("sparsity", [1.5, -0.1, 1, 1.0, True, False, "0.5"])
def test_estimate_bytes_refuses_a_sparsity_outside_0_1(sparsity):
    cfg = ModelConfig(family="llama", vocab_size=64, hidden_size=64, num_layers=1, num_heads=2, intermediate_size=128)
    with pytest.raises(ValueError, match=r"sparsity must be None \(dense\) or a number in \(0, 1\)"):
        estimate_bytes(cfg, sparsity)
    with pytest.raises(ValueError, match=r"sparsity must be None \(dense\) or a number in \(0, 1\)"):
        build_synthetic(cfg, sparsity, device="cpu", progress=False)


def test_estimate_bytes_checks_tp_size_and_config():
    cfg = ModelConfig(family="llama", vocab_size=64, hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
                      intermediate_size=128)
    assert estimate_bytes(cfg, 0) == estimate_bytes(cfg, None)
    assert estimate_bytes(cfg, 0.5, tp_size=2)["projections"] > 0
    with pytest.raises(ValueError, match=r"cannot split .* world size of 4: num_kv_heads \(2\) is not a multiple"):
        estimate_bytes(cfg, 0.5, tp_size=4)
    with pytest.raises(ValueError, match=r"world_size must be an int >= 1, got 0"):
        estimate_bytes(cfg, 0.5, tp_size=0)
    with pytest.raises(TypeError, match=r"config must be a ModelConfig or a preset name, got dict"):
        estimate_bytes(cfg.to_hf(), 0.5)


def test_tensor_parallel_reader_prefers_the_single_file_and_reads_older_opt_names(tmp_path):
    """The tensor-parallel loader's reader (parallel.checkpoint._Checkpoint) reads ``model.safetensors`` before a
    stale index (whose shards are gone), and finds a model name stored without the leading ``model.``."""
    import json

    from safetensors.torch import save_file

    from flash_llm.parallel.checkpoint import _Checkpoint

    save_file({"decoder.embed_tokens.weight": torch.ones(2, 3)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"decoder.embed_tokens.weight": "model-00001-of-00002.safetensors"}}))
    ck = _Checkpoint(str(tmp_path))
    assert ck.key("model.decoder.embed_tokens.weight") == "decoder.embed_tokens.weight"
    assert ck.key("model.decoder.missing") is None

"""Session 88 fixes of the transformers integration of the checkpoints:

1. ``flash_llm.from_pretrained`` / ``load_checkpoint`` / ``convert`` refused dense checkpoints that transformers loads:
   tensors that the transformers model class declares no weights of it (``_keys_to_ignore_on_load_unexpected``,
   regular expressions: GPT-J's, GPT-2's and Pythia-era GPT-NeoX's causal-mask buffers ``attn.bias`` /
   ``attn.masked_bias``, Qwen3.5's multi-token-prediction ``mtp.*``), which real published files carry and transformers
   drops without a word, raised "has no place in the model (wrong config.json ...)".  They are skipped now, as
   transformers skips them (``re.search`` in the name its loader gives the tensor), and ``convert`` does not write them
   back (as transformers' save does not).  Any other unexpected tensor is still refused.
2. ``model.dequantize()`` (transformers' way back to a plain model) raised transformers' ``NotImplementedError``
   ("please raise an issue on GitHub") on a model carrying flash-llm's quantizer.  The quantizer implements
   ``_dequantize`` now: every SparseLinear becomes the dense ``nn.Linear`` of its weight
   (``flash_llm.engine.expand_sparse_``), and the quantizer leaves the model and the transformers models inside it,
   so ``.half()`` works and transformers' save writes a plain dense checkpoint without a ``quantization_config``.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import flash_llm
from flash_llm import FormatError, SparseLinear
from flash_llm.checkpoint import convert, load_checkpoint
from flash_llm.checkpoint.pretrained import ignored_unexpected_regex
from flash_llm.nn import LossyCastError
from flash_llm.prune import magnitude_prune_

from _ckpt import (VOCAB, assert_logits_as_accurate_as_torch, hf_model, logits, read_shard, rewrite_shard, save_hf,
                   shards)

transformers = pytest.importorskip("transformers")

IDS = torch.tensor([[1, 5, 7, 9, 11, 3]])


def _all_tensors(path) -> dict[str, torch.Tensor]:
    out = {}
    for f in shards(path):
        out.update(read_shard(f)[0])
    return out


def _add_tensors(path, extra: dict[str, torch.Tensor]) -> None:
    """Store ``extra`` beside the tensors of single-file checkpoint ``path``."""
    f = path / "model.safetensors"
    tensors, meta = read_shard(f)
    rewrite_shard(f, {**tensors, **extra}, meta)


def _gptj_checkpoint(path):
    """A tiny pruned fp16 GPT-J saved by transformers, plus the causal-mask buffers EleutherAI/gpt-j-6b's files hold
    (``transformer.h.N.attn.bias`` / ``attn.masked_bias``); returns transformers' load of it (the dense reference)."""
    torch.manual_seed(0)
    cfg = transformers.GPTJConfig(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=64,
                                  bos_token_id=1, eos_token_id=2)
    model = transformers.GPTJForCausalLM(cfg).half().eval()
    regex = ignored_unexpected_regex(model)
    if regex is None or not regex.search("transformer.h.0.attn.bias"):
        pytest.skip(f"transformers {transformers.__version__}'s GPT-J declares no ignorable causal-mask buffers")
    magnitude_prune_(model, 0.6, filter_fn=lambda m, n: n != "lm_head")
    model.save_pretrained(path)
    _add_tensors(path, {f"transformer.h.{i}.attn.{name}": t for i in range(2) for name, t in (
        ("bias", torch.tril(torch.ones(64, 64, dtype=torch.bool)).view(1, 1, 64, 64)),
        ("masked_bias", torch.tensor(-1e9)))})
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


# ---- 1. tensors the transformers model class declares to ignore ---------------------------------------------------

def test_gptj_mask_buffers_are_skipped_as_transformers_skips_them(tmp_path):
    ref = _gptj_checkpoint(tmp_path / "dense")
    model, report = flash_llm.from_pretrained(tmp_path / "dense", output_report=True, progress=False)
    assert type(model).__name__ == "GPTJForCausalLM"
    assert report.converted and any(isinstance(m, SparseLinear) for m in model.modules())
    assert not [k for k in model.state_dict() if k.endswith(("attn.bias", "attn.masked_bias"))]
    with torch.no_grad():
        assert_logits_as_accurate_as_torch(logits(model, IDS), ref, IDS)


def test_convert_drops_the_ignored_tensors_and_its_output_loads(tmp_path):
    ref = _gptj_checkpoint(tmp_path / "dense")
    report = convert(tmp_path / "dense", tmp_path / "fl", progress=False)
    assert report.converted
    stored = _all_tensors(tmp_path / "fl")
    assert not [k for k in stored if k.endswith(("attn.bias", "attn.masked_bias"))]  # (as transformers' save)
    assert any(k.endswith(".weight_data") for k in stored)
    with torch.no_grad():
        for model in (flash_llm.from_pretrained(tmp_path / "fl", progress=False),
                      transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fl").eval()):
            assert_logits_as_accurate_as_torch(logits(model, IDS), ref, IDS)
    # the sparse-bitmask writer too
    convert(tmp_path / "dense", tmp_path / "sb", format="sparse-bitmask", progress=False)
    assert not [k for k in _all_tensors(tmp_path / "sb") if "masked_bias" in k or k.endswith("attn.bias")]


def test_load_checkpoint_into_a_transformers_model_skips_them(tmp_path):
    _gptj_checkpoint(tmp_path / "dense")
    cfg = transformers.AutoConfig.from_pretrained(tmp_path / "dense")
    with torch.device("meta"):
        module = transformers.GPTJForCausalLM(cfg).half()
    load_checkpoint(module, tmp_path / "dense", progress=False)
    assert not any(t.is_meta for t in module.parameters())  # (non-persistent buffers are the model's business)
    assert any(isinstance(m, SparseLinear) for m in module.modules())


def test_qwen3_5_mtp_weights_are_skipped(tmp_path):
    cls = getattr(transformers, "Qwen3_5TextConfig", None)
    if cls is None:
        pytest.skip("this transformers has no Qwen3.5")
    cfg = cls(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    q = transformers.AutoModelForCausalLM.from_config(cfg).half().eval()
    assert any("mtp" in p for p in q._keys_to_ignore_on_load_unexpected)
    magnitude_prune_(q, 0.6, filter_fn=lambda m, n: n != "lm_head")
    q.save_pretrained(tmp_path / "dense")
    _add_tensors(tmp_path / "dense", {"mtp.fc.weight": torch.zeros(64, 128, dtype=torch.float16),
                                      "mtp.layers.0.mlp.up_proj.weight": torch.zeros(96, 64, dtype=torch.float16)})
    model = flash_llm.from_pretrained(tmp_path / "dense", progress=False)
    assert not [k for k in model.state_dict() if k.startswith("mtp.")]
    assert any(isinstance(m, SparseLinear) for m in model.modules())


def test_other_unexpected_tensors_are_still_refused(tmp_path):
    _gptj_checkpoint(tmp_path / "dense")
    _add_tensors(tmp_path / "dense", {"transformer.h.0.attn.extra": torch.zeros(3, dtype=torch.float16)})
    with pytest.raises(FormatError, match=r"'transformer\.h\.0\.attn\.extra' has no place in the GPTJForCausalLM"):
        flash_llm.from_pretrained(tmp_path / "dense", progress=False)
    # a class that declares none (Llama, transformers' and flash_llm.models'): mtp.* is no tensor of it
    save_hf(hf_model("llama", tie=False), tmp_path / "llama", shard="10GB")
    _add_tensors(tmp_path / "llama", {"mtp.fc.weight": torch.zeros(4, 4, dtype=torch.float16)})
    for backend in ("flash", "hf"):
        with pytest.raises(FormatError, match=r"'mtp\.fc\.weight' has no place"):
            flash_llm.from_pretrained(tmp_path / "llama", backend=backend, progress=False)


# ---- 2. model.dequantize() ---------------------------------------------------------------------------------------

@pytest.fixture
def flash_dir(tmp_path):
    save_hf(hf_model("llama", tie=False), tmp_path / "dense")
    convert(tmp_path / "dense", tmp_path / "fl", progress=False)
    return tmp_path


def _quantizer_gone(model) -> None:
    from transformers import PreTrainedModel

    for sub in model.modules():
        if isinstance(sub, PreTrainedModel):
            assert getattr(sub, "hf_quantizer", None) is None and not getattr(sub, "is_quantized", False)
            assert getattr(sub.config, "quantization_config", None) is None


def test_dequantize_gives_the_dense_model_back(flash_dir):
    dense = transformers.AutoModelForCausalLM.from_pretrained(flash_dir / "dense").eval()
    model = transformers.AutoModelForCausalLM.from_pretrained(flash_dir / "fl").eval()
    sparse = [n for n, m in model.named_modules() if isinstance(m, SparseLinear)]
    assert sparse and model.model.hf_quantizer is not None  # (its base model carries the quantizer too)
    assert model.dequantize() is model
    assert not any(isinstance(m, SparseLinear) for m in model.modules())
    assert all(type(model.get_submodule(n)) is nn.Linear for n in sparse)
    assert not any(hasattr(model.get_submodule(n), "_delta_rows_paired") for n in sparse)
    for n in sparse:  # the same weights, exactly; requiring grad as the model's other parameters
        lin = model.get_submodule(n)
        assert torch.equal(lin.weight, dense.get_submodule(n).weight) and lin.weight.requires_grad
    _quantizer_gone(model)
    with torch.no_grad():
        assert torch.equal(logits(model, IDS), logits(dense, IDS))
    model.float().half()  # (refused by transformers while the model is quantized)
    model.save_pretrained(flash_dir / "again")
    cfg = json.loads((flash_dir / "again" / "config.json").read_text())
    assert "quantization_config" not in cfg
    stored = _all_tensors(flash_dir / "again")
    assert not [k for k in stored if "weight_data" in k or "weight_offsets" in k]
    assert {f"{n}.weight" for n in sparse} <= set(stored)
    again = transformers.AutoModelForCausalLM.from_pretrained(flash_dir / "again").eval()
    assert not any(isinstance(m, SparseLinear) for m in again.modules()) and not getattr(again, "is_quantized", False)
    with torch.no_grad():
        assert torch.equal(logits(again, IDS), logits(dense, IDS))


def test_dequantize_of_a_flash_llm_from_pretrained_hf_model(flash_dir):
    dense = transformers.AutoModelForCausalLM.from_pretrained(flash_dir / "dense").eval()
    model = flash_llm.from_pretrained(flash_dir / "fl", backend="hf", progress=False)
    assert getattr(model, "hf_quantizer", None) is not None
    model.dequantize()
    assert not any(isinstance(m, SparseLinear) for m in model.modules())
    _quantizer_gone(model)
    with torch.no_grad():
        assert torch.equal(logits(model, IDS), logits(dense, IDS))


def test_dequantize_in_another_dtype(flash_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(flash_dir / "fl").eval()
    sparse = [n for n, m in model.named_modules() if isinstance(m, SparseLinear)]
    model.dequantize(dtype=torch.float32)
    assert all(model.get_submodule(n).weight.dtype == torch.float32 for n in sparse)
    _quantizer_gone(model)


def test_dequantize_refuses_a_cast_to_inf_and_changes_nothing(tmp_path):
    m = hf_model("llama", dtype=torch.bfloat16, tie=False)
    with torch.no_grad():
        w = m.model.layers[0].mlp.up_proj.weight
        w.view(-1)[torch.nonzero(w.view(-1))[0]] = 1e6  # (a nonzero, above fp16's 65504)
    save_hf(m, tmp_path / "dense")
    convert(tmp_path / "dense", tmp_path / "fl", progress=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fl").eval()
    with pytest.raises(LossyCastError, match=r"model\.layers\.0\.mlp\.up_proj\.weight' cannot be cast"):
        model.dequantize(dtype=torch.float16)
    assert isinstance(model.model.layers[0].mlp.up_proj, SparseLinear) and model.is_quantized
    assert all(isinstance(m, SparseLinear) for n, m in model.named_modules() if n.endswith("mlp.down_proj"))


def test_dequantize_refuses_a_hooked_layer_and_changes_nothing(flash_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(flash_dir / "fl").eval()
    model.model.layers[1].mlp.up_proj.register_forward_hook(lambda *a: None)
    with pytest.raises(ValueError, match=r"'model\.layers\.1\.mlp\.up_proj' carries .*hook.*nothing was changed"):
        model.dequantize()
    assert isinstance(model.model.layers[0].mlp.up_proj, SparseLinear)
    assert model.is_quantized and model.model.hf_quantizer is not None


def test_dequantize_dtype_by_name_and_a_wrong_one(flash_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(flash_dir / "fl").eval()
    with pytest.raises(ValueError, match="dtype must be a floating-point torch dtype, got 'float17'"):
        model.dequantize(dtype="float17")
    assert model.is_quantized and isinstance(model.model.layers[0].mlp.up_proj, SparseLinear)
    model.dequantize(dtype="bfloat16")
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16


# ---- the review of dequantize: shared layers, a failure midway, the dtype of the rest, requires_grad --------------
def test_dequantize_refuses_a_shared_sparse_layer_and_changes_nothing(flash_dir):
    """One SparseLinear at two paths: refused before any change (a dense layer per path would untie them; until the
    review the second path stayed sparse while the quantizer was removed, and a save wrote compressed arrays under a
    dense config)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(flash_dir / "fl").eval()
    layers = model.model.layers
    layers[1].mlp.up_proj = layers[0].mlp.up_proj
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.up_proj' and 'model\.layers\.1\.mlp\.up_proj' "
                                         r"\(shared\).*nothing was changed"):
        model.dequantize()
    assert model.is_quantized and all(isinstance(m, SparseLinear) for m in (layers[0].mlp.up_proj,
                                                                            layers[0].mlp.down_proj))


def test_dequantize_failing_midway_puts_the_sparse_layers_back(flash_dir, monkeypatch):
    """An error while expanding (out of memory at the third layer) leaves every layer sparse and the quantizer on;
    a retry then gives the dense model of a clean call (every layer trainable as the embedding, none marked)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(flash_dir / "fl").eval()
    before = {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}
    real, calls = SparseLinear.to_linear, []

    def flaky(self):
        calls.append(1)
        if len(calls) == 3:
            raise torch.cuda.OutOfMemoryError("out of memory (test)")
        return real(self)

    monkeypatch.setattr(SparseLinear, "to_linear", flaky)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        model.dequantize()
    assert {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)} == before
    assert model.is_quantized
    model.dequantize()
    grad = model.get_input_embeddings().weight.requires_grad
    for n in before:
        lin = model.get_submodule(n)
        assert type(lin) is nn.Linear and lin.weight.requires_grad == grad and "_delta_rows_paired" not in lin.__dict__
    _quantizer_gone(model)


def test_dequantize_to_another_dtype_casts_every_parameter(flash_dir):
    """``dequantize(dtype=torch.bfloat16)`` of an fp16 model: the embedding and norms too, so the forward runs (only
    the new layers were cast until the review: a dtype mismatch in the forward); buffers (the rotary table) keep
    their dtype."""
    model = transformers.AutoModelForCausalLM.from_pretrained(flash_dir / "fl").eval()
    rotary = {n: b.dtype for n, b in model.named_buffers() if b.is_floating_point()}
    model.dequantize(dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {n: b.dtype for n, b in model.named_buffers() if b.is_floating_point()} == rotary
    with torch.no_grad():
        out = logits(model, IDS)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_dequantize_refuses_a_sparse_layers_bias_that_would_overflow(tmp_path):
    """A sparse layer's bias is a buffer, outside the parameters' check: a bf16 OPT whose ``fc1.bias`` holds 1e6,
    dequantized to fp16, is refused naming the bias, nothing changed (the third review: it became inf)."""
    m = hf_model("opt", dtype=torch.bfloat16)
    with torch.no_grad():
        m.model.decoder.layers[0].fc1.bias[0] = 1e6
    save_hf(m, tmp_path / "dense")
    convert(tmp_path / "dense", tmp_path / "fl", progress=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fl").eval()
    assert isinstance(model.model.decoder.layers[0].fc1, SparseLinear)
    with pytest.raises(LossyCastError, match=r"layers\.0\.fc1\.bias' cannot be cast"):
        model.dequantize(dtype=torch.float16)
    assert model.is_quantized and isinstance(model.model.decoder.layers[0].fc1, SparseLinear)


def test_dequantize_keeps_a_parameter_the_model_holds_in_another_dtype(flash_dir):
    """transformers passes ``config.dtype`` to every ``dequantize()``: a parameter the model keeps in fp32 (an MoE
    router, ``_keep_in_fp32_modules``; here the final norm made fp32 by hand) stays fp32; the sparse layers' dtype is
    what ``dtype=`` recasts (the third review: it was cast down too)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(flash_dir / "fl").eval()
    norm = model.model.norm.weight
    norm.data = norm.data.float()
    model.dequantize()
    assert model.model.norm.weight.dtype == torch.float32 and model.model.layers[0].mlp.up_proj.weight.dtype == \
        torch.float16
    _quantizer_gone(model)

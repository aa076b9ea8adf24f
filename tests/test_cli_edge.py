"""Edge cases of the ``flash-llm`` command line (CPU): outputs that would swallow their own input, unwritable
outputs, streamed text of Hugging Face tokenizers (characters split between tokens, SentencePiece's leading space),
option combinations that were silently ignored or crashed, odd dtypes and corrupt metadata in ``inspect``, and
the numbers of the demo's table when pruned layers stay dense."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import flash_llm
from flash_llm import BitmapTiles, FormatError, bundled, data
from flash_llm.checkpoint import convert
from flash_llm.cli import main

from _ckpt import LOW_SPARSITY_LAYER, hf_model, save_hf

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def listing(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Path:
    """A pruned tiny Llama saved by transformers (every projection 60 % zeros but one at 10 %)."""
    return save_hf(hf_model("llama"), tmp_path_factory.mktemp("edge") / "dense")


# ---- 1. an output that holds its own input ----------------------------------------------------------------
def test_convert_refuses_a_destination_that_holds_the_source(dense, tmp_path, capsys):
    proj = tmp_path / "proj"
    shutil.copytree(dense, proj / "ck")
    (proj / "notes.txt").write_text("precious")
    before = listing(proj)
    rc, _, err = run(capsys, "convert", proj / "ck", proj, "--overwrite")
    assert rc == 2 and f"source {proj / 'ck'} lies inside destination {proj}" in err, err
    rc, _, err = run(capsys, "convert", proj / "ck", proj / "ck" / ".." / "ck", "--overwrite")
    assert rc == 2 and "are the same directory" in err, err
    os.symlink(proj, tmp_path / "link")  # a link to the parent is the parent
    rc, _, err = run(capsys, "convert", proj / "ck", tmp_path / "link", "--overwrite")
    assert rc == 2 and "lies inside destination" in err, err
    with pytest.raises(ValueError, match="lies inside destination"):
        convert(proj / "ck", proj, overwrite=True, progress=False)
    assert listing(proj) == before and (proj / "notes.txt").read_text() == "precious"


def test_prune_refuses_an_out_that_holds_the_model(tmp_path, capsys):
    proj = tmp_path / "proj"
    shutil.copytree(bundled.path(), proj / "m")
    (proj / "notes.txt").write_text("precious")
    calib = tmp_path / "calib.txt"
    calib.write_bytes(data.load_tokens(data.corpus_path())[:4000].numpy().tobytes())
    before = listing(proj)
    base = ["prune", proj / "m", "--method", "magnitude", "--sparsity", "0.5", "--calib", calib, "--calib-seqs", "1",
            "--seq-len", "16", "--device", "cpu", "--force"]
    rc, _, err = run(capsys, *base, "--out", proj)
    assert rc == 2 and f"MODEL {proj / 'm'} lies inside --out {proj}" in err, err
    rc, _, err = run(capsys, *base, "--out", proj / "m")
    assert rc == 2 and "are the same directory" in err, err
    rc, _, err = run(capsys, "prune", "tiny-shakespeare", *base[2:], "--out", bundled.path().parent)
    assert rc == 2 and "lies inside --out" in err, err
    rc, _, err = run(capsys, *base, "--out", tmp_path)  # the calibration file too
    assert rc == 2 and "lies inside --out" in err, err
    assert listing(proj) == before and calib.is_file()


# ---- 2. streamed text of Hugging Face tokenizers --------------------------------------------------------------
def _fixed_model(path: Path, tokenizer, next_token: dict[int, int], default: int) -> Path:
    """A 1-layer Llama (vocabulary 256) whose greedy next token after ``t`` is ``next_token.get(t, default)``,
    saved with ``tokenizer`` (a ``tokenizers.Tokenizer``)."""
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>")
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                                   bos_token_id=None, eos_token_id=None, pad_token_id=None, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.fill_(1.0 if "norm" in n else 0.0)
        model.model.embed_tokens.weight.copy_(torch.eye(256))
        for t in range(256):
            model.lm_head.weight[next_token.get(t, default), t] = 1.0
    model.half().save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def byte_bpe(tmp_path_factory) -> Path:
    """Byte-level BPE (token id = byte): "A" is followed by "é" as two tokens (C3, A9), then "!" for ever."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    b2u = bytes_to_unicode()
    tk = tokenizers.Tokenizer(tokenizers.models.BPE(vocab={b2u[b]: b for b in range(256)}, merges=[]))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = tokenizers.decoders.ByteLevel()
    return _fixed_model(tmp_path_factory.mktemp("tok") / "bytebpe", tk, {ord("A"): 0xC3, 0xC3: 0xA9}, ord("!"))


@pytest.fixture(scope="module")
def metaspace(tmp_path_factory) -> Path:
    """SentencePiece-style (Metaspace, as Llama-2 / Mistral): "Hello" is followed by "▁world" for ever."""
    vocab = {w: i for i, w in enumerate(["<unk>", "▁Hello", "▁world"])}
    vocab.update({f"<x{i}>": i for i in range(3, 256)})
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tk.decoder = tokenizers.decoders.Metaspace(replacement="▁", prepend_scheme="first")
    return _fixed_model(tmp_path_factory.mktemp("tok") / "metaspace", tk, {}, 2)


def test_generate_streams_split_characters_and_leading_spaces(byte_bpe, metaspace, capsys):
    rc, out, err = run(capsys, "generate", byte_bpe, "--prompt", "A", "--max-new-tokens", 5, "--device", "cpu")
    assert rc == 0, err
    assert out == "Aé!!!\n"  # (no U+FFFD printed for the first half of "é" while streaming)
    rc, out, err = run(capsys, "generate", metaspace, "--prompt", "Hello", "--max-new-tokens", 3, "--device", "cpu")
    assert rc == 0, err
    assert out == "Hello world world world\n"


def test_continuation_holds_back_a_partial_character(byte_bpe, metaspace):
    from flash_llm.demo import continuation

    tok = transformers.AutoTokenizer.from_pretrained(byte_bpe)
    assert continuation(tok.decode, [ord("A")], [0xC3], partial=True) == ""
    assert continuation(tok.decode, [ord("A")], [0xC3]) == "\ufffd"  # (the end: flushed as it is)
    assert continuation(tok.decode, [ord("A")], [0xC3, 0xA9, ord("!")], partial=True) == "é!"
    assert continuation(tok.decode, [ord("A"), 0xC3], [0xA9]) == "é"  # a character split by the prompt's end
    tok = transformers.AutoTokenizer.from_pretrained(metaspace)
    assert continuation(tok.decode, torch.tensor([1]), torch.tensor([2, 2])) == " world world"


def test_demo_sample_keeps_the_first_new_tokens_space(metaspace, capsys):
    rc, out, err = run(capsys, "demo", "--model", metaspace, "--method", "magnitude", "--eval-tokens", 50,
                       "--seq-len", 16, "--gen-tokens", 3, "--prompt", "Hello", "--device", "cpu")
    assert rc == 0, err
    lines = out.splitlines()
    for label in ("--- dense ---", "--- sparse, magnitude 50% ---"):
        assert lines[lines.index(label) + 1] == "  Hello world world world", out


# ---- 3. and minor: generate's options ---------------------------------------------------------------------
def test_generate_top_k_top_p_need_a_temperature(capsys, tmp_path):
    path = bundled.path()
    rc, _, err = run(capsys, "generate", path, "--prompt", "ROMEO:", "--top-k", 3)
    assert rc == 2 and "error: --top-k applies to sampling: give --temperature > 0" in err, err
    assert "Traceback" not in err
    rc, _, err = run(capsys, "generate", tmp_path / "missing", "--prompt", "x", "--top-k", 3, "--top-p", 0.5)
    assert rc == 2 and "--top-k and --top-p apply to sampling" in err, err  # (refused before anything is read)
    rc, out, err = run(capsys, "generate", path, "--prompt", "ROMEO:", "--max-new-tokens", 4, "--top-k", 3,
                       "--temperature", 0.8, "--seed", 0, "--device", "cpu", "--ignore-eos")
    assert rc == 0 and "4 new tokens" in err, err


def test_generate_sampler_value_errors_exit_2(capsys, monkeypatch):
    from flash_llm.engine import Engine

    def refuse(self, *a, **kw):
        raise ValueError("the sampler refuses")
        yield  # (a generator, as Engine.stream)

    monkeypatch.setattr(Engine, "stream", refuse)
    rc, _, err = run(capsys, "generate", bundled.path(), "--prompt", "ROMEO:", "--device", "cpu")
    assert rc == 2 and "error: the sampler refuses" in err, err


def test_generate_token_limits(capsys):
    path = bundled.path()
    context = json.loads((path / "config.json").read_text())["max_position_embeddings"]
    prompt = "ROMEO:"
    rc, _, err = run(capsys, "generate", path, "--prompt", prompt, "--max-new-tokens", context + 44, "--device", "cpu")
    assert rc == 2 and f"--prompt ({len(prompt)} tokens) + --max-new-tokens ({context + 44}) exceed" in err, err
    assert f"at most {context - len(prompt) + 1} new tokens" in err and "max_seq" not in err
    rc, out, err = run(capsys, "generate", path, "--prompt", prompt, "--max-new-tokens", context - len(prompt) + 1,
                       "--device", "cpu", "--ignore-eos")  # the longest that fits
    assert rc == 0 and f"{context - len(prompt) + 1} new tokens" in err, err
    rc, out, err = run(capsys, "generate", path, "--prompt", prompt, "--max-new-tokens", 1, "--device", "cpu")
    assert rc == 0 and "1 new token;" in err and "nan" not in err and "no decode steps after it" in err, err


# ---- 4. an output location that cannot be written --------------------------------------------------------------
@pytest.mark.skipif(not os.path.isdir("/sys"), reason="needs /sys")
def test_convert_to_an_unwritable_location(dense, tmp_path, capsys, monkeypatch):
    import flash_llm.checkpoint._model as model_module

    def no_loading(*a, **kw):
        raise AssertionError("the model was loaded before the output location was checked")

    monkeypatch.setattr(model_module, "build_skeleton", no_loading)
    rc, _, err = run(capsys, "convert", dense, "/sys/flash-llm-test-out")
    assert rc == 2 and "error: destination /sys/flash-llm-test-out: cannot create a directory in /sys" in err, err
    (tmp_path / "file").write_text("x")
    rc, _, err = run(capsys, "convert", dense, tmp_path / "file" / "sub" / "out")
    assert rc == 2 and f"{tmp_path / 'file'} is not a directory" in err, err
    assert "Traceback" not in err
    rc, _, err = run(capsys, "prune", "tiny-shakespeare", "--method", "magnitude", "--sparsity", "0.5", "--calib",
                     tmp_path / "file", "--out", "/sys/flash-llm-test-out")
    assert rc == 2 and "error: --out /sys/flash-llm-test-out: cannot create a directory in /sys" in err, err


def test_convert_write_errors_name_out(dense, tmp_path, capsys, monkeypatch):
    import flash_llm.checkpoint.cli as ccli

    def disk_full(*a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ccli, "convert", disk_full)
    rc, _, err = run(capsys, "convert", dense, tmp_path / "out")
    assert rc == 1 and f"error: writing OUT {tmp_path / 'out'}: [Errno 28] No space left on device" in err, err


# ---- 5. and minor: demo --layer and the model demo's options ----------------------------------------------------
@pytest.mark.parametrize("argv, match", [
    (["--sparsity", "0.9"], "--sparsity: option(s) of the model demo"),
    (["--method", "wanda", "--gen-tokens", "5", "--prompt", "hi", "--seq-len", "7"],
     "--method, --seq-len, --gen-tokens, --prompt: option(s) of the model demo"),
    (["--owl", "--calib-seqs", "2", "--eval-tokens", "9", "--batch-size", "3", "--speed-tokens", "4"],
     "--owl, --calib-seqs, --eval-tokens, --batch-size, --speed-tokens: option(s) of the model demo"),
    (["--warmup", "-5"], "argument --warmup: expected a non-negative integer, got -5"),
])
def test_demo_layer_refuses_model_demo_options(capsys, argv, match):
    rc, out, err = run(capsys, "demo", "--layer", "--shape", "64x64", "--sparsities", "50", *argv)
    assert rc == 2 and match in err and out == "", err


def test_demo_layer_still_takes_shared_options(capsys):
    rc, out, err = run(capsys, "demo", "--layer", "--shape", "64x64", "--sparsities", "50", "--seed", "3", "--dtype",
                       "bfloat16", "--device", "cpu", "--warmup", "0")
    assert rc == 0 and "64x64 bfloat16 layer (seed 3)" in out, err


# ---- 6. convert --format sparse-bitmask --min-sparsity ------------------------------------------------------
def test_convert_sparse_bitmask_honours_min_sparsity(dense, tmp_path, capsys):
    low = LOW_SPARSITY_LAYER["llama"]  # 10 % zeros; the others 60 %
    rc, _, err = run(capsys, "convert", dense, tmp_path / "all", "--format", "sparse-bitmask")
    assert rc == 0, err
    cfg = json.loads((tmp_path / "all" / "config.json").read_text())
    assert cfg["quantization_config"]["sparsity_config"]["ignore"] == ["lm_head"]  # (default: every layer)
    rc, out, err = run(capsys, "convert", dense, tmp_path / "half", "--format", "sparse-bitmask", "--min-sparsity",
                       "50%")
    assert rc == 0, err
    cfg = json.loads((tmp_path / "half" / "config.json").read_text())
    assert cfg["quantization_config"]["sparsity_config"]["ignore"] == ["lm_head", low]
    rc, out, _ = run(capsys, "inspect", tmp_path / "half")
    formats = {line.split()[0]: line.split()[1] for line in out.splitlines()[2:-2]}
    assert formats[f"{low}.weight"] == "dense"
    assert formats["model.layers.0.self_attn.q_proj.weight"] == "sparse-bitmask"
    assert sum(f == "sparse-bitmask" for f in formats.values()) == 13  # 14 projections but the 10 % one
    a = flash_llm.from_pretrained(dense, sparsify=False, progress=False).state_dict()
    b = flash_llm.from_pretrained(tmp_path / "half", sparsify=False, progress=False).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rc, _, err = run(capsys, "convert", dense, tmp_path / "none", "--format", "sparse-bitmask", "--min-sparsity", "1")
    assert rc == 0, err
    rc, out, _ = run(capsys, "inspect", tmp_path / "none")
    assert "0 sparse" in out


# ---- 7. inspect: dense tensors of any dtype -------------------------------------------------------------------
def test_inspect_directory_with_float8_and_uint16(tmp_path, capsys):
    w = torch.randn(4, 4)
    w[0] = 0
    w[1, 0] = -0.0
    save_file({"w": w.to(torch.float8_e4m3fn), "u": torch.tensor([0, 1, 65535], dtype=torch.uint16),
               "e": torch.ones(2, 2).to(torch.float8_e5m2)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    rc, out, err = run(capsys, "inspect", tmp_path)
    assert rc == 0, err
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:]}
    assert rows["w"][3:5] == ["float8_e4m3fn", str(16 - 5)]
    assert rows["u"][3:5] == ["uint16", "2"]
    assert rows["e"][3:5] == ["float8_e5m2", "4"]


# ---- 8. metadata whose format / dtype is not a string ---------------------------------------------------------
def _rewrite_metadata(src: Path, dst: Path, **fields) -> None:
    with safe_open(src, "pt") as f:
        meta = json.loads(f.metadata()["flash_llm"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta.update(fields)
    save_file(tensors, dst, metadata={"flash_llm": json.dumps(meta)})


@pytest.mark.parametrize("field", ["format", "dtype"])
def test_non_string_metadata_fields_are_format_errors(dense, tmp_path, capsys, field):
    w = torch.randn(64, 128).half()
    w[w.abs() < 1] = 0
    BitmapTiles.from_dense(w).save(tmp_path / "ok.safetensors")
    bad = tmp_path / "bad.safetensors"
    _rewrite_metadata(tmp_path / "ok.safetensors", bad, **{field: ["x"]})
    with pytest.raises(FormatError, match=rf"{bad}: 'weight' has .*\['x'\]"):
        flash_llm.load(bad)
    rc, _, err = run(capsys, "inspect", bad)
    assert rc == 2 and str(bad) in err and "['x']" in err and "Traceback" not in err, err

    ck = tmp_path / "ck"
    rc, _, err = run(capsys, "convert", dense, ck)
    assert rc == 0, err
    cfg = json.loads((ck / "config.json").read_text())
    modules = cfg["quantization_config"]["sparse_modules"]
    modules[next(iter(modules))][field] = ["x"]
    (ck / "config.json").write_text(json.dumps(cfg))
    for argv in (["inspect", ck], ["convert", ck, tmp_path / "again"]):
        rc, _, err = run(capsys, *argv)
        assert rc == 2 and f"{ck / 'config.json'}: quantization_config.sparse_modules[" in err, (argv, err)
        assert "unhashable" not in err


# ---- 9. the demo's table when pruned layers stay dense ----------------------------------------------------------
def test_demo_table_counts_pruned_layers_kept_dense(capsys):
    rc, out, err = run(capsys, "demo", "--method", "magnitude", "--sparsity", "0.125", "--eval-tokens", 100,
                       "--seq-len", 32, "--gen-tokens", 0, "--device", "cpu")
    assert rc == 0, err
    model = bundled.load(dtype=torch.bfloat16)
    weight_bytes = sum(m.weight.numel() * 2 for n, m in model.named_modules()
                       if isinstance(m, torch.nn.Linear) and n != "lm_head")
    row = next(line for line in out.splitlines() if line.startswith("their weight bytes")).split()
    assert row[3:] == [f"{weight_bytes:,}", f"{weight_bytes:,}", "none", "compressed"], out
    assert "; 28 kept dense" in out and "28 of the 28 pruned layers stay dense nn.Linear" in out
    assert "min_sparsity" in out
    assert "pruning a copy with magnitude 12.5% " in out and "sparse (magnitude 12.5%)" in out  # (not 12%)


# ---- 10. the sparse-bitmask writer and config.json's torch_dtype ------------------------------------------------
def test_sparse_bitmask_keeps_torch_dtype_consistent(dense, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(dense, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["torch_dtype"] = cfg.pop("dtype", "float16")  # as transformers 4 wrote it
    (src / "config.json").write_text(json.dumps(cfg))
    for fmt in ("bitmap", "sparse-bitmask"):
        rc, _, err = run(capsys, "convert", src, tmp_path / fmt, "--format", fmt, "--dtype", "bfloat16")
        assert rc == 0, err
        out = json.loads((tmp_path / fmt / "config.json").read_text())
        assert out["dtype"] == out["torch_dtype"] == "bfloat16", fmt

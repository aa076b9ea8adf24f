"""``flash-llm demo`` (the bundled model, pruned, compressed and compared; also on a Hugging Face checkpoint
with its own tokenizer) and ``flash-llm prune`` end to end on CPU, in reduced settings, with the printed
numbers checked against independent computations; bad inputs give clear errors and leave no output."""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import pytest
import torch

import flash_llm
from flash_llm import bundled, data
from flash_llm.cli import main
from flash_llm.demo import reference_linears
from flash_llm.evaluate import evaluate
from flash_llm.prune import sparsegpt_prune_

ROW = re.compile(r"^(?P<name>[a-z ()/]+?)\s{2,}(?P<dense>\S+(?: \S+)?)\s{2,}(?P<sparse>\S+(?: \S+){0,2})"
                 r"(?:\s{2,}(?P<note>.+))?$")


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def table(out: str) -> dict[str, dict]:
    rows = {}
    for line in out.splitlines():
        m = ROW.match(line)
        if m and m["name"].strip() in ("pruned layers", "their weight bytes", "whole model bytes",
                                       "val loss (nats/token)", "val perplexity"):
            rows[m["name"].strip()] = m.groupdict()
    return rows


def _num(text: str) -> float:
    return float(text.replace(",", ""))


def _linear_weights(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}


# ---- the bundled-model demo -----------------------------------------------------------------------------
def test_demo_bundled_end_to_end(capsys):
    n_eval, n_calib, n_gen, seq = 4096, 4, 30, 64
    rc, out, err = run(capsys, "demo", "--eval-tokens", str(n_eval), "--calib-seqs", str(n_calib), "--gen-tokens",
                       str(n_gen), "--seq-len", str(seq), "--device", "cpu")
    assert rc == 0, err
    rows = table(out)
    assert set(rows) == {"pruned layers", "their weight bytes", "whole model bytes", "val loss (nats/token)",
                         "val perplexity"}, out
    assert "sparsity 50.0%" in rows["pruned layers"]["note"]
    assert "bfloat16 on CPU" in out  # the CPU's default: float16 matmuls there have no fast kernel

    # independent: the same model, calibration and pruning, evaluated with the weights kept dense
    model = bundled.load(dtype=torch.bfloat16)
    train, val = data.split(data.load_tokens(data.corpus_path()))
    val = val[:n_eval + 1]
    with reference_linears(model):  # on a CPU the demo evaluates both models' linears as spmm's reference
        dense_loss = evaluate(model, val, seq_len=seq, batch_size=64, progress=False).loss
    linears = _linear_weights(model)
    dense_bytes = sum(m.weight.numel() * 2 for m in linears.values())
    calib = data.calibration_batches(train, n_calib, seq, seed=0, batch_size=64)
    sparsegpt_prune_(model, calib, 0.5, filter_fn=lambda m, fqn: fqn != "lm_head")
    with reference_linears(model):
        pruned_loss = evaluate(model, val, seq_len=seq, batch_size=64, progress=False).loss
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        conv = flash_llm.sparsify_(model)

    loss = rows["val loss (nats/token)"]
    assert _num(loss["dense"]) == pytest.approx(dense_loss, abs=6e-5)
    assert _num(loss["sparse"]) == pytest.approx(pruned_loss, abs=6e-5)  # the same arithmetic: fp32 linears
    assert loss["note"].endswith(" %")  # from the unrounded losses: equal up to the rounding of the printed ones
    assert float(loss["note"][:-2]) == pytest.approx(100 * (_num(loss["sparse"]) / _num(loss["dense"]) - 1), abs=0.02)
    wb = rows["their weight bytes"]
    assert _num(wb["dense"]) == dense_bytes == conv.dense_bytes
    assert _num(wb["sparse"]) == conv.sparse_bytes < dense_bytes
    assert wb["note"] == f"{dense_bytes / conv.sparse_bytes:.2f}x smaller"
    assert _num(rows["whole model bytes"]["dense"]) - _num(rows["whole model bytes"]["sparse"]) == \
        dense_bytes - conv.sparse_bytes
    assert f"validation: {n_eval:,} tokens" in out
    assert "on a CPU both models' linear layers compute in fp32" in out

    texts = re.findall(r"^--- (dense|sparse, sparsegpt 50%) ---\n((?:  .*\n?)+)", out, flags=re.M)
    assert [label for label, _ in texts] == ["dense", "sparse, sparsegpt 50%"], out
    for _, body in texts:
        text = "\n".join(line[2:] for line in body.rstrip("\n").split("\n"))
        assert text.startswith("ROMEO:\n") and len(text.encode()) >= len("ROMEO:\n") + n_gen - 2  # ends trimmed
    assert "decode speed: needs a CUDA GPU" in out
    assert re.search(r"total time [\d.]+ s \(load", out)


def test_demo_is_deterministic_and_other_methods(capsys):
    argv = ["demo", "--eval-tokens", "512", "--calib-seqs", "2", "--seq-len", "32", "--gen-tokens", "12",
            "--device", "cpu",
            "--method", "wanda", "--sparsity", "60%", "--owl", "--seed", "3"]
    rc, out1, err = run(capsys, *argv)
    assert rc == 0, err
    rc, out2, _ = run(capsys, *argv)
    strip = lambda s: re.sub(r"(pruning took|total time) [^\n]*", "", s)  # noqa: E731
    assert strip(out1) == strip(out2)
    assert "OWL + wanda 60%" in out1
    rc, out, err = run(capsys, "demo", "--eval-tokens", "256", "--seq-len", "32", "--gen-tokens", "0",
                       "--device", "cpu", "--method", "magnitude", "--sparsity", "0.9", "--dtype", "bfloat16")
    assert rc == 0, err
    assert "sparsity 90.0%" in out and "generated" not in out and "bfloat16 on CPU" in out


@pytest.mark.parametrize("argv, match", [
    (["--sparsity", "1"], r"sparsity must be in \[0, 1\)"),
    (["--sparsity", "100%"], r"sparsity must be in \[0, 1\)"),
    (["--sparsity", "-0.1"], r"sparsity must be in \[0, 1\)"),
    (["--sparsity", "half"], "sparsity must be a fraction in"),
    (["--shape", "64x64"], "--shape: option.* of the synthetic-layer demo; add --layer"),
    (["--layer", "--model", "x"], "--model and --layer exclude each other"),
    (["--model", "/nonexistent/model"], "neither a bundled model .* nor an existing directory"),
    (["--method", "magnitude", "--owl"], "--owl applies to wanda and sparsegpt, not magnitude"),
    (["--gen-tokens", "100000"], r"--gen-tokens \(100000\) exceed the model's context"),
    (["--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N"),
])
def test_demo_bad_arguments(capsys, argv, match):
    rc, out, err = run(capsys, "demo", "--eval-tokens", "64", "--calib-seqs", "1", *argv)
    assert rc == 2, (out, err)
    assert re.search(match, err), err
    assert "Traceback" not in err


def test_demo_bad_model_directories(capsys, tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    rc, _, err = run(capsys, "demo", "--model", str(f))
    assert rc == 2 and "is a file; pass a checkpoint directory" in err
    d = tmp_path / "broken"
    d.mkdir()
    rc, _, err = run(capsys, "demo", "--model", str(d))
    assert rc == 2 and "config.json is missing" in err
    cfg = json.loads((bundled.path() / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    rc, _, err = run(capsys, "demo", "--model", str(d))
    assert rc == 2 and "model.safetensors: not a readable safetensors file" in err
    cfg.pop("flash_llm")  # no byte tokenizer declared and no tokenizer files
    cfg["vocab_size"] = 320  # (256 tokens alone say byte-level, to demo as to generate: session 88)
    (d / "config.json").write_text(json.dumps(cfg))
    rc, _, err = run(capsys, "demo", "--model", str(d))
    assert rc == 2 and "has no tokenizer files" in err


# ---- a Hugging Face checkpoint with its own tokenizer ---------------------------------------------------
@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    """A tiny random OPT with a BPE tokenizer trained on the training split, saved by transformers."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    d = tmp_path_factory.mktemp("hf") / "tiny-opt"
    train, _ = data.split(data.load_tokens(data.corpus_path()))
    text = data.decode(train[:50_000])
    tk = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = tokenizers.decoders.ByteLevel()
    tk.train_from_iterator([text], tokenizers.trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<pad>", "</s>", "<unk>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>", pad_token="<pad>",
                                                unk_token="<unk>")
    cfg = transformers.OPTConfig(vocab_size=len(fast), hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                 num_attention_heads=2, max_position_embeddings=128, word_embed_proj_dim=64,
                                 pad_token_id=0, bos_token_id=1, eos_token_id=1)
    torch.manual_seed(0)
    model = transformers.OPTForCausalLM(cfg).to(torch.float16)
    model.save_pretrained(d)
    fast.save_pretrained(d)
    return d, fast


def test_demo_on_a_hf_checkpoint(capsys, hf_checkpoint):
    d, fast = hf_checkpoint
    rc, out, err = run(capsys, "demo", "--model", str(d), "--eval-tokens", "1000", "--calib-seqs", "4",
                       "--seq-len", "64", "--gen-tokens", "8", "--device", "cpu")
    assert rc == 0, err
    assert "OPTForCausalLM" in out and f"tokenizer {type(fast).__name__}" in out
    rows = table(out)
    assert rows["pruned layers"]["dense"] == "12 nn.Linear"  # 2 layers x (q, k, v, out_proj, fc1, fc2)
    _, val = data.split(data.load_tokens(data.corpus_path()))
    ids = torch.tensor(fast(data.decode(val), add_special_tokens=False)["input_ids"])
    model = flash_llm.from_pretrained(d, dtype=torch.float16, sparsify=False, progress=False)
    ref = evaluate(model, ids[:1001], seq_len=64, progress=False).loss
    assert _num(rows["val loss (nats/token)"]["dense"]) == pytest.approx(ref, abs=6e-5)


def test_prune_hf_checkpoint_writes_a_flash_llm_checkpoint(capsys, hf_checkpoint, tmp_path):
    d, fast = hf_checkpoint
    calib = tmp_path / "calib.txt"
    calib.write_bytes(data.load_tokens(data.corpus_path())[:20_000].numpy().tobytes())
    out = tmp_path / "pruned"
    rc, stdout, err = run(capsys, "prune", str(d), "--method", "wanda", "--sparsity", "0.6", "--calib", str(calib),
                          "--out", str(out), "--calib-seqs", "8", "--seq-len", "64", "--device", "cpu")
    assert rc == 0, err
    assert f"-> {out} (flash-llm checkpoint, 12 layers compressed" in stdout
    assert (out / "tokenizer.json").is_file()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "flash_llm"
    assert cfg["flash_llm"]["pruning"]["method"] == "wanda" and cfg["flash_llm"]["pruning"]["sparsity"] == 0.6
    model = flash_llm.from_pretrained(out, progress=False)
    sparse = {n: m for n, m in model.named_modules() if isinstance(m, flash_llm.SparseLinear)}
    assert len(sparse) == 12
    for name, m in sparse.items():
        k = m.in_features
        zeros_per_row = (m.to_dense() == 0).sum(1)
        assert bool((zeros_per_row == round(0.6 * k)).all()), name  # Wanda: exact per row
    rc, _, err = run(capsys, "demo", "--model", str(out), "--eval-tokens", "200", "--calib-seqs", "2",
                     "--seq-len", "32", "--gen-tokens", "4", "--device", "cpu")
    assert rc == 0, err  # a flash-llm checkpoint loads (dense) for the demo too


# ---- flash-llm prune ------------------------------------------------------------------------------------
@pytest.fixture
def calib_file(tmp_path):
    f = tmp_path / "calib.txt"
    f.write_bytes(data.load_tokens(data.corpus_path())[:30_000].numpy().tobytes())
    return f


@pytest.mark.parametrize("method", ["sparsegpt", "magnitude"])
def test_prune_bundled(capsys, tmp_path, calib_file, method):
    out = tmp_path / "out"
    rc, stdout, err = run(capsys, "prune", "tiny-shakespeare", "--method", method, "--sparsity", "70%", "--calib",
                          str(calib_file), "--out", str(out), "--device", "cpu",
                          *(["--calib-seqs", "4", "--seq-len", "32"] if method != "magnitude" else []))
    # (magnitude refuses --calib-seqs (session 80) and, without --verbose, --seq-len (81): it reads no data)
    assert rc == 0, err
    assert "to 70.00% over 28 layers" in stdout
    model = flash_llm.from_pretrained(out, progress=False)
    sparse = [m for m in model.modules() if isinstance(m, flash_llm.SparseLinear)]
    assert len(sparse) == 28
    for m in sparse:
        n = m.out_features * m.in_features
        assert n - m.nnz == round(0.7 * n)  # exact per layer
    original = bundled.load(dtype=torch.float16)
    assert torch.equal(model.lm_head.weight, original.lm_head.weight)  # not pruned
    assert torch.equal(model.model.embed_tokens.weight, original.model.embed_tokens.weight)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["flash_llm"]["tokenizer"] == "bytes" and cfg["flash_llm"]["pruning"]["reached"] == pytest.approx(0.7)


def test_prune_gradual_and_sparse_bitmask(capsys, tmp_path, calib_file):
    out = tmp_path / "out"
    rc, stdout, err = run(capsys, "prune", "tiny-shakespeare", "--method", "gradual", "--sparsity", "0.5", "--calib",
                          str(calib_file), "--out", str(out), "--steps", "4", "--batch-size", "2", "--seq-len",
                          "32", "--device", "cpu", "--format", "sparse-bitmask")
    assert rc == 0, err
    assert "compressed-tensors sparse-bitmask checkpoint" in stdout
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["sparsity_config"]["format"] == "sparse-bitmask"
    model = flash_llm.from_pretrained(out, sparsify=False, progress=False)
    for name, m in _linear_weights(model).items():
        assert int((m.weight == 0).sum()) == round(0.5 * m.weight.numel()), name


def test_prune_bad_inputs_leave_no_output(capsys, tmp_path, calib_file):
    out = tmp_path / "out"
    base = ["prune", "tiny-shakespeare", "--method", "sparsegpt", "--out", str(out), "--device", "cpu"]
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    short = tmp_path / "short.txt"
    short.write_bytes(b"To be")
    cases = [
        (["--sparsity", "0.5", "--calib", str(empty)], "--calib: text file .*empty.txt' is empty"),
        (["--sparsity", "0.5", "--calib", str(tmp_path / "missing.txt")], "--calib: text file .* does not exist"),
        (["--sparsity", "0.5", "--calib", str(short)], r"has 5 tokens; at least \d+ are needed"),
        (["--sparsity", "1.0", "--calib", str(calib_file)], r"sparsity must be in \[0, 1\)"),
        (["--sparsity", "0.5", "--calib", str(calib_file), "--owl", "--method", "magnitude"],
         "--owl applies to wanda and sparsegpt, not magnitude"),
    ]
    for argv, match in cases:
        rc, _, err = run(capsys, *base, *argv)
        assert rc == 2, (argv, err)
        assert re.search(match, err), (argv, err)
        assert not out.exists()
    rc, _, err = run(capsys, "prune", str(tmp_path / "nope"), "--method", "wanda", "--sparsity", "0.5", "--calib",
                     str(calib_file), "--out", str(out))
    assert rc == 2 and "neither a bundled model" in err and not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc, _, err = run(capsys, *base, "--sparsity", "0.5", "--calib", str(calib_file))
    assert rc == 2 and "exists; pass --force" in err
    assert os.listdir(out) == ["keep.txt"]
    assert sorted(os.listdir(tmp_path)) == sorted(["out", "calib.txt", "empty.txt", "short.txt"])


# ---- GPU ------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_demo_on_gpu_reports_decode_speed(capsys):
    rc, out, err = run(capsys, "demo", "--eval-tokens", "8192", "--gen-tokens", "40", "--speed-tokens", "64",
                       "--device", "cuda")
    assert rc == 0, err
    rows = table(out)
    dense, sparse = (_num(rows["val loss (nats/token)"][k]) for k in ("dense", "sparse"))
    assert sparse < 1.1 * dense
    m = re.search(r"dense (\d+) tokens/s \(([\d.]+) ms/token\), sparse (\d+) tokens/s", out)
    assert m, out
    assert int(m[1]) > 0 and int(m[3]) > 0


def test_demo_runs_without_transformers():
    """A fresh `pip install flash-llm` has no transformers: the bundled-model demo must not need it."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['transformers'] = None; sys.modules['tokenizers'] = None\n"
            "from flash_llm.cli import main\n"
            "sys.exit(main(['demo', '--eval-tokens', '256', '--calib-seqs', '2', '--seq-len', '32', '--gen-tokens', "
            "'8', '--device', 'cpu']))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                       cwd=Path(__file__).resolve().parent.parent)
    assert r.returncode == 0, r.stderr
    assert "val loss (nats/token)" in r.stdout and "--- dense ---" in r.stdout


def test_prune_out_name_longer_than_the_file_system_allows(capsys, tmp_path, calib_file):
    """``prune --out`` with a name over the file system's limit (255 bytes): a usage error naming ``--out`` before any
    work (session 76: ``Path.exists`` raised an uncaught OSError there)."""
    out = tmp_path / ("o" * 300)
    rc, _, err = run(capsys, "prune", "tiny-shakespeare", "--method", "magnitude", "--sparsity", "0.5", "--calib",
                     str(calib_file), "--out", str(out), "--device", "cpu")
    assert rc == 2 and "--out" in err and "300 bytes long" in err, err
    assert sorted(os.listdir(tmp_path)) == ["calib.txt"]


def test_reference_linears_computes_as_spmm_reference_and_restores():
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 40, dtype=torch.bfloat16)
    model = torch.nn.Sequential(lin, torch.nn.ReLU())
    sparse = flash_llm.SparseLinear.from_linear(lin)
    x = torch.randn(5, 96).to(torch.bfloat16)
    plain = torch.nn.functional.linear(x, lin.weight, lin.bias)
    with reference_linears(model):
        assert torch.equal(model[0](x), sparse(x))  # the CPU reference's arithmetic, bit for bit
        assert "forward" in lin.__dict__
    assert "forward" not in lin.__dict__ and torch.equal(model[0](x), plain)
    with pytest.raises(RuntimeError, match="inside"):
        with reference_linears(model):
            raise RuntimeError("inside")
    assert "forward" not in lin.__dict__  # restored on an error too
    with reference_linears(model, enabled=False):
        assert "forward" not in lin.__dict__

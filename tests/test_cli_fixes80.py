"""Session 80 fixes of ``flash-llm convert`` / ``generate``: convert refuses to replace the current directory (or a
parent of it) as ``prune --out`` does; a ``--dtype`` cast that overflows to inf is refused naming the tensor; closed
stdout / stderr handled without a traceback or diagnostics in the text; ``--seed`` checked while parsing and refused
with greedy decoding; a ``--prompt`` that is not UTF-8 refused naming it; the automatic tokenizer accepts
``vocab.json`` + ``merges.txt``; a failed write removes the parent directories it created."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flash_llm import FormatError
from flash_llm.checkpoint import _files, convert, write_sparse_bitmask
from flash_llm.checkpoint import cli as ckpt_cli
from flash_llm.checkpoint import pretrained as pretrained_module
from flash_llm.cli import build_parser, main
from flash_llm.nn import LossyCastError

from _ckpt import hf_model, save_hf

transformers = pytest.importorskip("transformers")

UP = "model.layers.0.mlp.up_proj"  # 60 % zeros: compressed by convert
NORM = "model.norm.weight"


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _no_load(*args, **kwargs):
    raise AssertionError("the model was loaded although the arguments are wrong")


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Path:
    """A pruned tiny Llama saved by transformers (fp16)."""
    return save_hf(hf_model("llama", seed=3), tmp_path_factory.mktemp("fixes80") / "dense")


@pytest.fixture(scope="module")
def byte_model(tmp_path_factory) -> Path:
    """A pruned tiny Llama with a vocabulary of 256: ``generate`` picks the byte tokenizer for it."""
    return save_hf(hf_model("llama", seed=4, vocab=256), tmp_path_factory.mktemp("fixes80") / "bytes")


# ---- 1. convert into the current directory --------------------------------------------------------------------

@pytest.mark.parametrize("which", ["absolute", "dot", "parent"])
def test_convert_refuses_the_current_directory(capsys, tmp_path, monkeypatch, dense, which):
    cwd = tmp_path / "work" / "inner"
    cwd.mkdir(parents=True)
    (cwd / "precious.txt").write_text("precious\n")
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(ckpt_cli, "convert", _no_load)
    out = {"absolute": str(cwd), "dot": ".", "parent": ".."}[which]
    rc, stdout, err = run(capsys, "convert", dense, out, "--overwrite")
    assert rc == 2 and stdout == ""
    where = f"a parent of the current directory {cwd}" if which == "parent" else "the current directory"
    assert f"error: OUT {out} is {where}, which cannot be replaced as a whole; write elsewhere" in err
    assert (cwd / "precious.txt").read_text() == "precious\n" and os.getcwd() == str(cwd)
    assert sorted(p.name for p in cwd.iterdir()) == ["precious.txt"]


def test_convert_still_writes_beside_and_below_the_current_directory(capsys, tmp_path, monkeypatch, dense):
    monkeypatch.chdir(tmp_path)
    rc, _, err = run(capsys, "convert", dense, "out")
    assert rc == 0, err
    rc, _, err = run(capsys, "convert", dense, "out", "--overwrite")
    assert rc == 0, err
    assert (tmp_path / "out" / "model.safetensors").is_file()


# ---- 2. --dtype casts that overflow ------------------------------------------------------------------------------

def _with_big_values(model, values: dict[str, tuple[tuple[int, ...], float]]):
    with torch.no_grad():
        for name, (index, value) in values.items():
            model.get_parameter(name)[index] = value
    return model


@pytest.fixture(scope="module")
def bf16_big(tmp_path_factory) -> Path:
    """A bf16 Llama whose final norm holds 3e5 (more than fp16's 65504)."""
    model = _with_big_values(hf_model("llama", dtype=torch.bfloat16, seed=6), {NORM: ((0,), 3e5)})
    return save_hf(model, tmp_path_factory.mktemp("fixes80") / "bf16_big")


def test_convert_refuses_a_dtype_that_overflows(capsys, tmp_path, bf16_big):
    out = tmp_path / "new" / "out"
    rc, stdout, err = run(capsys, "convert", bf16_big, out, "--dtype", "float16")
    assert rc == 2 and stdout == ""
    assert f"tensor '{NORM}' cannot be cast to torch.float16: 1 finite value(s) overflow to inf" in err
    assert "--dtype bfloat16" in err
    assert not out.exists() and not out.parent.exists()
    rc, _, err = run(capsys, "convert", bf16_big, out, "--dtype", "bfloat16")  # (its own dtype: fine)
    assert rc == 0, err


def test_convert_refuses_an_overflowing_fp32_bias(capsys, tmp_path):
    model = _with_big_values(hf_model("opt", dtype=torch.float32, seed=7),
                             {"model.decoder.layers.0.fc1.bias": ((0,), 1e6)})
    src = save_hf(model, tmp_path / "opt32")
    rc, _, err = run(capsys, "convert", src, tmp_path / "out", "--dtype", "float16")
    assert rc == 2
    assert "tensor 'model.decoder.layers.0.fc1.bias' cannot be cast to torch.float16" in err
    assert not (tmp_path / "out").exists()


def test_fp32_values_that_flush_to_zero_are_rounding(capsys, tmp_path):
    """Values below fp16's smallest subnormal become 0: rounding, as transformers casts (a float32 checkpoint has a
    few such values; refusing them would refuse it)."""
    model = _with_big_values(hf_model("opt", dtype=torch.float32, seed=8),
                             {"model.decoder.layers.0.fc1.bias": ((0,), 1e-9)})
    src = save_hf(model, tmp_path / "opt32")
    rc, _, err = run(capsys, "convert", src, tmp_path / "out", "--dtype", "float16")
    assert rc == 0, err


def test_compressed_layers_cast_to_an_overflowing_dtype_are_refused(capsys, tmp_path):
    """A flash-llm (bf16) checkpoint whose compressed layer holds 1e6, re-encoded in fp16, and a sparse-bitmask one."""
    model = _with_big_values(hf_model("llama", dtype=torch.bfloat16, seed=9), {f"{UP}.weight": ((0, 0), 1e6)})
    src = save_hf(model, tmp_path / "src")
    flash = tmp_path / "flash"
    report = convert(src, flash, progress=False)
    assert UP in {c.fqn for c in report.converted}
    bitmask = tmp_path / "bitmask"
    convert(src, bitmask, format="sparse-bitmask", progress=False)
    for checkpoint, fmt in ((flash, "bitmap"), (flash, "sparse-bitmask"), (bitmask, "bitmap")):
        out = tmp_path / f"out-{checkpoint.name}-{fmt}"
        rc, _, err = run(capsys, "convert", checkpoint, out, "--dtype", "float16", "--format", fmt)
        assert rc == 2, (checkpoint, fmt)
        assert f"'{UP}.weight' cannot be cast to torch.float16: 1 finite value(s) overflow to inf" in err
        assert not out.exists()


def test_from_pretrained_refuses_an_overflowing_dtype(bf16_big):
    import flash_llm

    with pytest.raises(LossyCastError, match=f"'{NORM}' cannot be cast to torch.float16"):
        flash_llm.from_pretrained(bf16_big, dtype=torch.float16)
    assert isinstance(LossyCastError("x"), ValueError) and not issubclass(LossyCastError, FormatError)


def test_generate_refuses_a_dtype_that_overflows(capsys, bf16_big):
    rc, stdout, err = run(capsys, "generate", bf16_big, "--prompt", "\x05\x06", "--tokenizer", "bytes", "--dtype",
                          "float16", "--max-new-tokens", "3")
    assert rc == 2 and stdout == ""
    assert f"tensor '{NORM}' cannot be cast to torch.float16" in err


# ---- 4. closed stdout / stderr ----------------------------------------------------------------------------------

def test_generate_with_stdout_closed(capsys, monkeypatch, byte_model):
    monkeypatch.setattr(sys, "stdout", None)  # (what Python sets for `>&-`)
    rc = main(["generate", str(byte_model), "--prompt", "hi", "--max-new-tokens", "3"])
    assert rc == 1
    assert "Traceback" not in capsys.readouterr().err


def test_generate_with_stderr_closed_keeps_stdout_clean(monkeypatch, byte_model):
    text = io.StringIO()
    monkeypatch.setattr(sys, "stdout", text)
    monkeypatch.setattr(sys, "stderr", None)  # (what Python sets for `2>&-`)
    try:
        rc = main(["generate", str(byte_model), "--prompt", "hi", "--max-new-tokens", "3"])
    finally:
        if sys.stderr is not None:
            sys.stderr.close()
    assert rc == 0
    lines = text.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hi"), lines  # (no "(on the CPU ..." nor "3 new tokens")


def test_generate_with_stderr_closed_in_a_process(tmp_path, byte_model):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1]),
                                                                     os.environ.get("PYTHONPATH")]))}
    for argv in (["generate", str(byte_model), "--prompt", "hi", "--max-new-tokens", "3"],
                 ["generate", str(tmp_path / "nope"), "--prompt", "hi"]):
        proc = subprocess.run([sys.executable, "-c", "import sys; from flash_llm.cli import main; "
                               "sys.exit(main(sys.argv[1:]))", *argv],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
                              preexec_fn=lambda: os.close(2), timeout=300)
        out = proc.stdout.decode()
        assert "error" not in out and "new tokens" not in out and "on the CPU" not in out, out
        assert proc.returncode == (0 if "--max-new-tokens" in argv else 2), out


# ---- 5. --seed -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", ["99999999999999999999999", str(2**64), str(-2**63 - 1), "1.5", "x"])
def test_seed_checked_while_parsing(capsys, seed):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["generate", "m", "--prompt", "hi", "--temperature", "1", "--seed", seed])
    assert e.value.code == 2
    assert "argument --seed: expected an integer in [-2**63, 2**64)" in capsys.readouterr().err


@pytest.mark.parametrize("seed", ["0", "-5", str(2**64 - 1)])
def test_seeds_in_range_are_taken(seed):
    args = build_parser().parse_args(["generate", "m", "--prompt", "hi", "--temperature", "1", "--seed", seed])
    assert args.seed == int(seed)


def test_seed_with_greedy_decoding_refused(capsys, monkeypatch, byte_model):
    monkeypatch.setattr(ckpt_cli, "from_pretrained", _no_load)
    rc, stdout, err = run(capsys, "generate", byte_model, "--prompt", "hi", "--seed", "1")
    assert rc == 2 and stdout == ""
    assert "error: --seed applies to sampling: give --temperature > 0 too (the default 0 is greedy decoding)" in err
    rc, _, err = run(capsys, "generate", byte_model, "--prompt", "hi", "--seed", "1", "--top-k", "3")
    assert rc == 2 and "error: --top-k and --seed apply to sampling" in err


def test_seeded_sampling_repeats(capsys, byte_model):
    argv = ("generate", byte_model, "--prompt", "hi", "--temperature", "1", "--seed", "-3", "--max-new-tokens", "8")
    rc, a, err = run(capsys, *argv)
    assert rc == 0, err
    rc, b, _ = run(capsys, *argv)
    assert rc == 0 and a == b


# ---- 6. --prompt that is not UTF-8 -----------------------------------------------------------------------------

@pytest.mark.parametrize("prompt, where", [("\udcff\udcfe", "byte 0xff at byte 0"),
                                           ("hé\udcff", "byte 0xff at byte 3"),
                                           ("a\ud800", "a lone surrogate U+D800 at byte 1")])
def test_prompt_not_utf8_refused(capsys, monkeypatch, byte_model, prompt, where):
    monkeypatch.setattr(ckpt_cli, "from_pretrained", _no_load)
    rc, out, err = run(capsys, "generate", byte_model, "--prompt", prompt)
    assert rc == 2 and out == ""
    assert f"argument --prompt: not valid UTF-8 text ({where}); give the prompt as UTF-8" in err


# ---- 7. vocab.json + merges.txt ---------------------------------------------------------------------------------

def test_generate_finds_a_vocab_json_tokenizer(capsys, tmp_path):
    src = save_hf(hf_model("opt", seed=10), tmp_path / "opt")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "\u0120": 3}
    for c in range(33, 126):
        vocab[chr(c)] = len(vocab)
    assert len(vocab) == 97
    (src / "vocab.json").write_text(json.dumps(vocab))
    (src / "merges.txt").write_text("#version: 0.2\n")
    rc, out, err = run(capsys, "generate", src, "--prompt", "hi there", "--max-new-tokens", "3")
    assert rc == 0, err
    assert out.startswith("hi there")
    rc, _, err = run(capsys, "generate", save_hf(hf_model("opt", seed=10), tmp_path / "bare"), "--prompt", "hi")
    assert rc == 2 and "(tokenizer.json, tokenizer_config.json, tokenizer.model, vocab.json)" in err


# ---- 9. parent directories of a failed write ---------------------------------------------------------------------

@pytest.mark.parametrize("error, rc", [(KeyboardInterrupt, 130), (OSError(28, "No space left on device"), 1)])
def test_failed_convert_removes_the_directories_it_made(capsys, tmp_path, monkeypatch, dense, error, rc):
    (tmp_path / "kept").mkdir()

    def fail(*args, **kwargs):
        (tmp_path / "kept" / "made" / "other").mkdir()  # (another process's, meanwhile: not removed)
        raise error

    monkeypatch.setattr(_files, "save_safetensors", fail)
    got, _, err = run(capsys, "convert", dense, tmp_path / "kept" / "made" / "a" / "b" / "out")
    assert got == rc, err
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
        "kept", "kept/made", "kept/made/other"]


def test_atomic_directory_removes_only_what_it_created(tmp_path, monkeypatch):
    with pytest.raises(RuntimeError):
        with _files.atomic_directory(tmp_path / "x" / "y" / "out") as tmp:
            (tmp / "f").write_text("partial")
            raise RuntimeError("fail")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(OSError):  # the temporary directory cannot be made: the parents go too
        monkeypatch.setattr(_files.tempfile, "mkdtemp", lambda **kw: (_ for _ in ()).throw(OSError(13, "denied")))
        with _files.atomic_directory(tmp_path / "p" / "q" / "out"):
            pass
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    with _files.atomic_directory(tmp_path / "ok" / "out") as tmp:  # (success keeps them)
        (tmp / "f").write_text("done")
    assert (tmp_path / "ok" / "out" / "f").read_text() == "done"


def test_failed_sparse_bitmask_write_removes_the_directories_it_made(tmp_path, monkeypatch):
    model = hf_model("llama", seed=11)
    monkeypatch.setattr(_files, "save_safetensors", _no_load)
    with pytest.raises(AssertionError):
        write_sparse_bitmask(model, tmp_path / "a" / "b" / "out", progress=False)
    with pytest.raises(AssertionError):
        pretrained_module.save_pretrained(model, tmp_path / "c" / "d" / "out", progress=False)
    assert list(tmp_path.iterdir()) == []

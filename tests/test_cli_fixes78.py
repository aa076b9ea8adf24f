"""Session 78's command-line fixes: ``import flash_llm`` without ``torch._dynamo`` (``flash-llm --help`` about 1.5 s
faster), ``bench`` scripts' usage naming ``flash-llm bench NAME``, ``inspect`` of one shard of a checkpoint pointing at
its directory, ``generate`` counting compressed layers as ``inspect`` does, and ``convert``'s errors naming its flags
(not the Python arguments)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import flash_llm
from flash_llm import SparseLinear
from flash_llm.checkpoint import _files
from flash_llm.cli import main

from _ckpt import hf_model, save_hf


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """A pruned byte-level (vocabulary 256) Llama saved by transformers, declaring the byte tokenizer."""
    pytest.importorskip("transformers")
    path = save_hf(hf_model("llama", vocab=256), tmp_path_factory.mktemp("fixes78") / "dense")
    config = json.loads((path / "config.json").read_text())
    config["flash_llm"] = {"tokenizer": "bytes (token id = byte value, vocabulary 256)"}
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def flash(dense, tmp_path_factory):
    """``dense`` saved by :func:`flash_llm.save_pretrained` in shards: a flash-llm checkpoint directory."""
    model = flash_llm.from_pretrained(dense, progress=False)
    assert any(isinstance(m, SparseLinear) for m in model.modules())
    out = tmp_path_factory.mktemp("fixes78") / "flash"
    flash_llm.save_pretrained(model, out, max_shard_size="16KB", progress=False, _copy_files_from=dense)
    return out


# ---- 1. import flash_llm without torch._dynamo ------------------------------------------------------------------

def test_import_does_not_import_dynamo():
    """``torch.compiler.assume_constant_result`` (on ``flash_llm.ops._forward_ad_active``) imported all of Dynamo,
    about 1.3 s of every ``flash-llm`` command and ``import flash_llm``."""
    code = ("import sys, flash_llm, flash_llm.cli; from flash_llm.cli import build_parser; build_parser(); "
            "print(sorted(m for m in sys.modules if m.startswith(('torch._dynamo', 'torch._inductor'))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout


def test_forward_ad_check_is_marked_as_torch_marks_it():
    """The mark flash_llm.ops sets itself is what ``torch.compiler.assume_constant_result`` sets (Dynamo runs the
    function while tracing and takes its result as a constant); if torch ever marks functions otherwise, this fails."""
    from flash_llm import ops

    def probe():
        return False

    assert torch.compiler.assume_constant_result(probe) is probe
    assert vars(probe) == {"_dynamo_marked_constant": True}
    assert {k: v for k, v in vars(ops._forward_ad_active).items() if k.startswith("_dynamo")} == vars(probe)


def test_compiled_spmm_still_refuses_forward_ad_in_the_graph():
    """Traced by Dynamo, ``_forward_ad_active`` still runs at trace time: forward-mode AD inside a ``fullgraph``
    compile is refused naming flash_llm, and the plain compiled call matches eager."""
    torch.manual_seed(0)
    w = torch.randn(32, 64, dtype=torch.bfloat16)
    w[torch.rand_like(w, dtype=torch.float32) < 0.6] = 0
    sl = SparseLinear(flash_llm.BitmapTiles.from_dense(w))
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    assert torch.equal(torch.compile(sl, fullgraph=True)(x), sl(x))
    with pytest.raises(Exception, match="flash_llm.spmm: forward-mode AD"):
        torch.compile(lambda t, u: torch.func.jvp(sl, (t,), (u,))[1], fullgraph=True)(x, x)


# ---- 2. bench scripts' usage -------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["kernel", "e2e", "checkpoint"])
def test_bench_usage_names_the_command(which, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/somewhere/flash-llm", "bench", which, "--help"])
    rc, out, _ = run(capsys, "bench", which, "--help")
    assert rc == 0
    assert out.startswith(f"usage: flash-llm bench {which} [-h]"), out.splitlines()[0]
    assert sys.argv == ["/somewhere/flash-llm", "bench", which, "--help"]  # (put back)
    rc, _, err = run(capsys, "bench", which, "--no-such-option")
    assert rc == 2 and f"flash-llm bench {which}: error: unrecognized arguments: --no-such-option" in err


# ---- 3. inspect of one shard --------------------------------------------------------------------------------------

def test_inspect_shard_names_its_checkpoint(flash, capsys):
    shards = sorted(flash.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 2 and (flash / _files.INDEX_NAME).is_file()
    rc, _, err = run(capsys, "inspect", shards[1])
    assert rc == 2 and "Traceback" not in err
    assert f"{shards[1]} is shard 2 of {len(shards)} of the checkpoint directory {flash}" in err
    assert f"flash-llm inspect {flash}" in err and "not a flash-llm weight file" in err
    rc, out, err = run(capsys, "inspect", flash)  # (what the message says to do works)
    assert rc == 0, err


def test_inspect_single_file_checkpoint_names_its_directory(dense, tmp_path, capsys):
    model = flash_llm.from_pretrained(dense, progress=False)
    one = tmp_path / "one"
    flash_llm.save_pretrained(model, one, progress=False)
    rc, _, err = run(capsys, "inspect", one / _files.WEIGHTS_NAME)
    assert rc == 2
    assert f"the weights file of the checkpoint directory {one}" in err and f"flash-llm inspect {one}" in err


def test_inspect_other_files_keep_the_message(tmp_path, capsys):
    """A safetensors file that no checkpoint beside it lists keeps load's message, no hint."""
    plain = tmp_path / "model-00001-of-00002.safetensors"
    save_file({"a": torch.zeros(3)}, str(plain))
    rc, _, err = run(capsys, "inspect", plain)  # (no config.json, no index)
    assert rc == 2 and "no flash-llm metadata (not a flash-llm weight file)" in err and "shard" not in err
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / _files.INDEX_NAME).write_text(json.dumps({"weight_map": {"b": "model-00002-of-00002.safetensors"}}))
    rc, _, err = run(capsys, "inspect", plain)  # (an index that does not list it)
    assert rc == 2 and "no flash-llm metadata (not a flash-llm weight file)" in err and "shard" not in err


# ---- 4. generate counts compressed layers as inspect does ---------------------------------------------------------

def test_generate_counts_layers_as_inspect(flash, capsys):
    rc, out, err = run(capsys, "inspect", flash)
    assert rc == 0, err
    n_sparse = int(re.search(r"^total\s+(\d+) sparse", out, re.M).group(1))
    assert n_sparse == 13  # (two Llama layers of 7 projections; one of them too dense to compress)
    rc, _, err = run(capsys, "generate", flash, "--prompt", "ab", "--max-new-tokens", "2", "--device", "cpu")
    assert rc == 0, err
    # merged: layer 0's q/k/v and gate/up (4 matmuls), layer 1's gate/up only (its dense v_proj keeps q, k apart: 5)
    assert (f"(on the CPU: {n_sparse} compressed layer(s) expanded to dense for decoding; 9 after merging the "
            "projections that share an input)") in err
    rc, _, err = run(capsys, "generate", flash, "--prompt", "ab", "--max-new-tokens", "2", "--device", "cpu",
                     "--no-merge")
    assert rc == 0, err
    assert f"(on the CPU: {n_sparse} compressed layer(s) expanded to dense for decoding)" in err


# ---- 5. convert's errors name its flags -------------------------------------------------------------------------

def test_convert_existing_out_names_the_flag(dense, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    rc, _, err = run(capsys, "convert", dense, out)
    assert rc == 2 and f"error: {out} already exists; pass --overwrite to replace it" in err
    assert "overwrite=True" not in err
    with pytest.raises(FileExistsError, match=r"already exists; pass overwrite=True \(--overwrite\)"):
        flash_llm.checkpoint.convert(dense, out, progress=False)  # (the Python API's message is unchanged)


@pytest.mark.parametrize("size", ["5XB", "0", "0.1B"])
def test_convert_bad_shard_size_names_the_flag(dense, tmp_path, capsys, size):
    rc, _, err = run(capsys, "convert", dense, tmp_path / "out", "--max-shard-size", size)
    assert rc == 2 and "argument --max-shard-size:" in err and repr(size) in err
    assert "max_shard_size" not in err and not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="max_shard_size must be"):  # (the Python API's message is unchanged)
        _files.parse_size(size)


def test_convert_shard_size_still_shards(dense, tmp_path, capsys):
    rc, _, err = run(capsys, "convert", dense, tmp_path / "out", "--max-shard-size", "16KB")
    assert rc == 0, err
    assert (tmp_path / "out" / _files.INDEX_NAME).is_file()

"""Session 82's command-line and bundled-model fixes:

1. ``bundled.save_model_dir`` sets ``config.json``'s ``"dtype"`` (and ``"torch_dtype"``) to the dtype it writes, as
   ``flash_llm.save_pretrained`` does: a stale ``"dtype"`` made the readers load the weights in another dtype;
2. a local directory of a bundled model's name wins over the bundled model in every command that reads a model
   (inspect, generate, convert, demo, prune), as in ``flash_llm.from_pretrained``, with a one-line note on stderr;
3. ``bundled.save_model_dir`` drops the source's ``quantization_config`` / ``compression_config``: the dense checkpoint
   it writes no longer declared sparse tensors it does not hold (every load failed);
4. ``bundled.save_model_dir`` refuses a cast that overflows to inf, naming the tensor (a ``LossyCastError``);
5. ``demo`` on a CPU refuses a ``--prompt`` that fills the context without ``--gen-tokens`` (exit 2), as with it;
6. ``flash_llm.data``'s docstring says that ``calibration_batches`` returns a list of batches.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

import flash_llm
from flash_llm import bundled, cli, data, demo
from flash_llm.models import ModelConfig
from flash_llm.nn import LossyCastError
from test_demo import run

CONTEXT = 32  # the tiny model's context


def _tiny_cfg() -> dict:
    """A byte-level 1-layer Llama (the bundled model's tokenizer), small enough to save and load in milliseconds."""
    cfg = ModelConfig(family="llama", vocab_size=data.VOCAB_SIZE, hidden_size=64, num_layers=1, num_heads=2,
                      intermediate_size=128, max_position_embeddings=CONTEXT).to_hf()
    return dict(cfg, flash_llm={"tokenizer": bundled.BYTE_TOKENIZER})


def _config(directory) -> dict:
    return json.loads((directory / "config.json").read_text())


# ---- 1. save_model_dir: config.json's dtype keys -------------------------------------------------------------------
@pytest.mark.parametrize("declared", [{"dtype": "bfloat16"}, {"dtype": "bfloat16", "torch_dtype": "bfloat16"},
                                      {"torch_dtype": "float32"}, {}])
def test_save_model_dir_declares_the_dtype_it_writes(tmp_path, declared):
    cfg = dict(_tiny_cfg(), **declared)
    model = bundled.build_model(cfg, seed=0)
    out = bundled.save_model_dir(model, cfg, tmp_path / "m", dtype=torch.float16)
    written = _config(out)
    assert written["dtype"] == written["torch_dtype"] == "float16", written
    assert {t.dtype for t in load_file(str(out / "model.safetensors")).values()} == {torch.float16}
    back = flash_llm.from_pretrained(out, progress=False)  # (in config.json's dtype)
    for k, v in model.state_dict().items():
        assert back.state_dict()[k].dtype == torch.float16, k
        assert torch.equal(back.state_dict()[k], v.half()), k
    assert _config(out)["flash_llm"] == cfg["flash_llm"]  # (the rest of cfg as given)


# ---- 3. save_model_dir of a flash-llm checkpoint's config ----------------------------------------------------------
def test_save_model_dir_drops_the_sparse_sections_of_cfg(tmp_path):
    """The use case of its docstring: a pruned and sparsified model saved dense, with the config.json of its
    flash-llm checkpoint (which declares its sparse modules)."""
    from flash_llm.prune import magnitude_prune_

    cfg = _tiny_cfg()
    model = bundled.build_model(cfg, dtype=torch.float16, seed=0)
    magnitude_prune_(model, 0.7, filter_fn=lambda m, fqn: "lm_head" not in fqn)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (lm_head kept dense, by name)
        flash_llm.sparsify_(model)
    flash_llm.save_pretrained(model, tmp_path / "sparse", config=cfg, progress=False)
    sparse_cfg = dict(_config(tmp_path / "sparse"), compression_config={"format": "sparse-bitmask"})
    assert sparse_cfg["quantization_config"]["quant_method"] == "flash_llm"
    out = bundled.save_model_dir(model, sparse_cfg, tmp_path / "dense")
    written = _config(out)
    assert "quantization_config" not in written and "compression_config" not in written, written
    back = bundled.load_dir(out, dtype=torch.float16)
    assert not any(isinstance(m, flash_llm.SparseLinear) for m in back.modules())
    for k, v in dense.items():
        assert torch.equal(back.state_dict()[k], v), k


# ---- 4. save_model_dir refuses a cast that overflows ---------------------------------------------------------------
def test_save_model_dir_refuses_a_cast_that_overflows(tmp_path):
    cfg = _tiny_cfg()
    model = bundled.build_model(cfg, seed=0)  # float32
    with torch.no_grad():
        model.model.norm.weight[0] = 1e5  # finite in float32 and bfloat16, inf in float16
    with pytest.raises(LossyCastError, match=r"tensor 'model.norm.weight' cannot be cast to dtype torch.float16: 1 "
                                             r"finite value\(s\) overflow to inf .*largest magnitude 100000.*"
                                             r"pass dtype=torch.bfloat16"):
        bundled.save_model_dir(model, cfg, tmp_path / "m")
    assert not (tmp_path / "m").exists() and list(tmp_path.iterdir()) == []  # nothing written
    out = bundled.save_model_dir(model, cfg, tmp_path / "m", dtype=torch.bfloat16)  # bf16 holds it
    stored = load_file(str(out / "model.safetensors"))["model.norm.weight"]
    assert stored.dtype == torch.bfloat16 and float(stored[0]) == float(torch.tensor(1e5).bfloat16())
    assert _config(out)["dtype"] == "bfloat16"


@pytest.mark.parametrize("dtype", [torch.int8, "float16", None])
def test_save_model_dir_refuses_a_dtype_that_is_not_floating_point(tmp_path, dtype):
    cfg = _tiny_cfg()
    with pytest.raises(TypeError, match=r"dtype must be a floating-point torch.dtype"):
        bundled.save_model_dir(bundled.build_model(cfg, seed=0), cfg, tmp_path / "m", dtype=dtype)
    assert not (tmp_path / "m").exists()


# ---- 2. a local directory of a bundled model's name wins -----------------------------------------------------------
NOTE = "note: 'tiny-shakespeare' is the local directory "


@pytest.fixture
def local_tiny(tmp_path, monkeypatch):
    """A directory named ``tiny-shakespeare`` in the working directory, holding a 1-layer model (the bundled one has
    more layers and a context of 256)."""
    monkeypatch.chdir(tmp_path)
    cfg = _tiny_cfg()
    bundled.save_model_dir(bundled.build_model(cfg, seed=3), cfg, tmp_path / "tiny-shakespeare")
    return tmp_path / "tiny-shakespeare"


def test_model_dir_prefers_a_local_directory(local_tiny, capsys):
    assert cli.model_dir("tiny-shakespeare").resolve() == local_tiny.resolve()
    assert not cli.is_bundled("tiny-shakespeare")
    err = capsys.readouterr().err
    assert err.count(NOTE) == 1 and err.count("\n") == 1, err  # (one line, naming the bundled one's path too)
    assert str(local_tiny.resolve()) in err and str(bundled.path("tiny-shakespeare")) in err, err
    assert cli.model_dir("tiny-shakespeare", note=False) == cli.model_dir("./tiny-shakespeare")
    assert capsys.readouterr().err.count(NOTE) == 0


def test_model_dir_without_a_local_directory_is_the_bundled_one(tmp_path, monkeypatch, capsys):
    """(Unchanged: a file of that name, e.g. generate's output redirected to it, is not a model directory.)"""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny-shakespeare").write_text("a file, not a checkpoint directory")
    assert cli.model_dir("tiny-shakespeare") == bundled.path("tiny-shakespeare")
    assert cli.is_bundled("tiny-shakespeare")
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("argv, dest", [(["inspect", "tiny-shakespeare"], "paths"),
                                        (["generate", "tiny-shakespeare", "--prompt", "hi"], "path"),
                                        (["convert", "tiny-shakespeare", "out"], "input")])
def test_checkpoint_commands_read_the_local_directory(local_tiny, capsys, argv, dest):
    args = cli.build_parser().parse_args(argv)
    got = getattr(args, dest)
    assert (got[0] if isinstance(got, list) else got) == "tiny-shakespeare"
    assert capsys.readouterr().err.count(NOTE) == 1


def test_inspect_reads_the_local_directory(local_tiny, capsys):
    rc, out, err = run(capsys, "inspect", "tiny-shakespeare")
    assert rc == 0, err
    assert out.startswith("tiny-shakespeare: dense checkpoint (llama)"), out
    assert str(bundled.path()) not in out and err.count(NOTE) == 1, (out, err)


def test_demo_and_prune_read_the_local_directory(local_tiny, capsys):
    lm = demo.load_model("tiny-shakespeare", dtype=torch.float32, device=torch.device("cpu"))
    assert lm.source == local_tiny.relative_to(local_tiny.parent) and lm.context == CONTEXT
    assert "(bundled)" not in lm.label and len(lm.model.model.layers) == 1
    assert demo.default_dtype(torch.device("cpu"), "tiny-shakespeare") == "float16"  # (a checkpoint directory's)
    assert capsys.readouterr().err.count(NOTE) == 1
    rc, out, err = run(capsys, "prune", "tiny-shakespeare", "--method", "magnitude", "--sparsity", "0.5", "--out",
                       "pruned", "--device", "cpu")
    assert rc == 0, err
    assert err.count(NOTE) == 1, err  # (once, though prune looks MODEL up twice)
    cfg = _config(local_tiny.parent / "pruned")
    assert cfg["flash_llm"]["pruning"]["from"] == "tiny-shakespeare" and cfg["num_hidden_layers"] == 1
    # prune --out tiny-shakespeare --force: MODEL is now the local directory, which --out may not replace
    rc, out, err = run(capsys, "prune", "tiny-shakespeare", "--method", "magnitude", "--sparsity", "0.5", "--out",
                       "tiny-shakespeare", "--force", "--device", "cpu")
    assert rc == 2 and err.count(NOTE) == 1 and "error: " in err, err


# ---- 5. demo: a --prompt that fills the context ---------------------------------------------------------------------
def test_demo_refuses_a_prompt_that_fills_the_context_without_gen_tokens(local_tiny, capsys):
    prompt = "x" * (CONTEXT + 8)
    argv = ["demo", "--model", "tiny-shakespeare", "--method", "magnitude", "--eval-tokens", "50", "--seq-len", "16",
            "--device", "cpu", "--prompt", prompt]
    rc, out, err = run(capsys, *argv)
    assert rc == 2, (out, err)
    assert f"error: --prompt ({CONTEXT + 8} tokens) + --gen-tokens (1) exceed the model's context of {CONTEXT} " \
           "tokens" in err, err
    assert "generated" not in out
    rc, _, explicit = run(capsys, *argv, "--gen-tokens", "1")
    assert rc == 2 and explicit.splitlines()[-1] == err.splitlines()[-1]  # (the same refusal)


# ---- 6. flash_llm.data's docstring ---------------------------------------------------------------------------------
def test_data_docstring_says_calibration_batches_returns_a_list():
    line = next(x for x in data.__doc__.splitlines() if "calibration_batches(" in x)
    assert "list" in line.partition("#")[2], line
    calib = data.calibration_batches(torch.arange(1000) % 256, 64, 256, seed=0)
    assert isinstance(calib, list) and [(tuple(c.shape), c.dtype) for c in calib] == [((64, 256), torch.int64)]

"""The bundled model and model directories on CPU: the shipped checkpoint (size, config, Hugging Face
compatibility, recorded validation loss), atomic saving, clear errors for missing or unreadable files, and
the training script (a few steps on a tiny model: the loss drops and the files reload)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import load_script

from flash_llm import bundled, data
from flash_llm.evaluate import evaluate

ROOT = Path(__file__).resolve().parent.parent


def _train_script():
    return load_script("scripts/train_bundled.py", "train_bundled")


TINY = ["--steps", "40", "--batch-size", "8", "--seq-len", "32", "--hidden", "64", "--layers", "1", "--heads", "2",
        "--ffn", "128", "--warmup", "5", "--lr", "3e-3", "--eval-every", "20", "--eval-tokens", "1024",
        "--no-progress", "--device", "cpu"]  # the smoke test trains on the CPU also on a GPU machine


# ---- the shipped model ----------------------------------------------------------------------------------
def test_bundled_model_files_and_config():
    d = bundled.path("tiny-shakespeare")
    size = (d / "model.safetensors").stat().st_size
    assert size <= 8_000_000, f"bundled weights are {size} bytes, over the 8 MB budget"
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert cfg["vocab_size"] == data.VOCAB_SIZE
    for key in ("hidden_size", "intermediate_size", "head_dim"):
        assert cfg[key] % 64 == 0, (key, cfg[key])
    assert cfg["torch_dtype"] == "float16"
    t = cfg["flash_llm"]["training"]
    for key in ("command", "card", "train_seconds", "steps", "val_loss"):
        assert key in t, key
    model = bundled.load("tiny-shakespeare")
    n = sum(p.numel() for p in model.parameters())
    assert 3_000_000 <= n <= 6_000_000 and n == t["parameters"]
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_bundled_model_recorded_val_loss_reproduces():
    """The val loss in config.json is what evaluate gives on the whole validation split (about 4 s on
    2 CPU cores; the first windows alone are easier text, 0.12 nats lower for the shipped model)."""
    model = bundled.load("tiny-shakespeare")
    cfg = json.loads((bundled.path() / "config.json").read_text())
    _, val = data.split(data.load_tokens(data.corpus_path()))
    r = evaluate(model, val, seq_len=cfg["flash_llm"]["training"]["seq_len"], progress=False)
    assert r.loss < 0.8 * 5.545  # far better than uniform over 256 bytes (ln 256)
    assert abs(r.loss - cfg["flash_llm"]["training"]["val_loss"]) < 1e-3  # recorded to 4 decimals


def test_bundled_model_matches_transformers():
    transformers = pytest.importorskip("transformers")
    d = bundled.path()
    ours = bundled.load("tiny-shakespeare")
    hf = transformers.LlamaForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    x = data.encode("ROMEO:\nWhat light through yonder window breaks?")[None]
    with torch.no_grad():
        a, b = ours(x), hf(x).logits
    assert a.shape == b.shape == (1, x.shape[1], data.VOCAB_SIZE)
    assert float((a - b).abs().max()) <= 1e-4 * float(b.abs().max())


def test_unknown_name():
    with pytest.raises(ValueError, match="no bundled model named 'gpt-5'; bundled: tiny-shakespeare"):
        bundled.load("gpt-5")


# ---- model directories ----------------------------------------------------------------------------------
def _tiny_cfg():
    return _train_script().model_config(hidden=64, layers=1, heads=2, ffn=128, seq_len=32)


def test_save_load_round_trip_and_overwrite(tmp_path):
    cfg = _tiny_cfg()
    model = bundled.build_model(cfg, seed=1)
    out = bundled.save_model_dir(model, cfg, tmp_path / "m")
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    back = bundled.load_dir(out)
    for (k, a), (k2, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(a.half().float(), b), k
    with pytest.raises(FileExistsError, match="exists; pass overwrite=True"):
        bundled.save_model_dir(model, cfg, out)
    other = bundled.build_model(cfg, seed=2)
    bundled.save_model_dir(other, cfg, out, overwrite=True)
    assert torch.equal(bundled.load_dir(out).lm_head.weight, other.lm_head.weight.half().float())
    assert sorted(os.listdir(tmp_path)) == ["m"]  # no temporary or backup directories left


def test_saved_model_directory_has_the_usual_permissions(tmp_path):
    import stat

    umask = os.umask(0o022)
    try:
        out = bundled.save_model_dir(bundled.build_model(_tiny_cfg(), seed=1), _tiny_cfg(), tmp_path / "m")
        assert stat.S_IMODE(out.stat().st_mode) == 0o755  # not mkdtemp's 0700
        assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in out.iterdir()} == \
            {"config.json": 0o644, "model.safetensors": 0o644}  # not safetensors' 0600
    finally:
        os.umask(umask)


def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.torch

    cfg = _tiny_cfg()
    model = bundled.build_model(cfg, seed=1)
    bundled.save_model_dir(model, cfg, tmp_path / "old")
    before = (tmp_path / "old" / "model.safetensors").read_bytes()

    def broken(state, path, metadata=None):
        Path(path).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(KeyboardInterrupt):
        bundled.save_model_dir(model, cfg, tmp_path / "new")
    with pytest.raises(KeyboardInterrupt):
        bundled.save_model_dir(bundled.build_model(cfg, seed=2), cfg, tmp_path / "old", overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["old"]
    assert (tmp_path / "old" / "model.safetensors").read_bytes() == before


def test_load_dir_errors(tmp_path):
    """Missing or unreadable model directories: errors (from flash_llm.from_pretrained) name the file."""
    from flash_llm import FormatError

    cfg = _tiny_cfg()
    with pytest.raises(FileNotFoundError, match="nowhere: no such checkpoint directory"):
        bundled.load_dir(tmp_path / "nowhere")
    d = tmp_path / "d"
    d.mkdir()
    with pytest.raises(FormatError, match="config.json is missing"):
        bundled.load_dir(d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(FormatError, match="config.json is not valid JSON"):
        bundled.load_dir(d)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="no model.safetensors"):
        bundled.load_dir(d)
    (d / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(FormatError, match="model.safetensors: not a readable safetensors file"):
        bundled.load_dir(d)
    bundled.save_model_dir(bundled.build_model(cfg), cfg, tmp_path / "good")
    (tmp_path / "good" / "config.json").write_text(json.dumps(dict(cfg, intermediate_size=192)))
    with pytest.raises(FormatError, match=r"tensor 'model.layers.0.mlp.\w+_proj.weight' has shape"):
        bundled.load_dir(tmp_path / "good")
    (tmp_path / "good" / "config.json").write_text(json.dumps(dict(cfg, num_hidden_layers=2)))
    with pytest.raises(FormatError, match=r"tensor 'model.layers.1.self_attn.q_proj.weight' is missing"):
        bundled.load_dir(tmp_path / "good")


# ---- the training script --------------------------------------------------------------------------------
def test_training_script_smoke(tmp_path, capsys):
    mod = _train_script()
    out = tmp_path / "model"
    record = mod.train(mod.parse_args(TINY + ["--out", str(out)]))
    printed = capsys.readouterr()
    assert "trained tiny-shakespeare: card CPU" in printed.out and f"-> {out}" in printed.out
    curve = record["curve"]
    assert [c[0] for c in curve] == [20, 40]
    assert record["val_loss"] < 0.75 * 5.545  # from ~ln(256) = 5.545 at initialisation
    assert curve[-1][2] < curve[0][2] or curve[-1][2] < 3.5
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["flash_llm"]["training"]["val_loss"] == record["val_loss"]
    assert cfg["flash_llm"]["training"]["command"].startswith("python scripts/train_bundled.py")
    model = bundled.load_dir(out)
    _, val = data.split(data.load_tokens(data.corpus_path()))
    r = evaluate(model, val, seq_len=32, progress=False)
    assert r.loss == pytest.approx(record["val_loss"], abs=1e-4)  # the reloaded fp16 weights give the recorded loss
    with pytest.raises(SystemExit):
        mod.parse_args(TINY + ["--out", str(out)])  # exists, no --force
    assert "exists; pass --force" in capsys.readouterr().err


def test_training_script_arguments_and_schedule(capsys):
    mod = _train_script()
    for argv, match in ((["--hidden", "100"], "--hidden must be a multiple of 64"),
                        (["--steps", "0"], "--steps must be >= 1"),
                        (["--min-lr", "1"], "need 0 < --min-lr <= --lr")):
        with pytest.raises((SystemExit, ValueError), match=None) as e:
            args = mod.parse_args(TINY + argv + ["--out", "/nonexistent/x"])
            mod.model_config(hidden=args.hidden, layers=1, heads=2, ffn=args.ffn, seq_len=32)
        text = str(e.value) if e.type is ValueError else capsys.readouterr().err
        assert match in text, text
    lrs = [mod.lr_at(s, steps=100, lr=1e-3, min_lr=1e-4, warmup=10) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # non-increasing after warm-up
    assert mod.lr_at(100, steps=100, lr=1e-3, min_lr=1e-4, warmup=10) == pytest.approx(1e-4)

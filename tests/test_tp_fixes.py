"""Fixes from the tensor-parallel bug hunt (CPU, gloo):

1. ``flash-llm generate --tp`` whose stdout's reader goes away (``| head``) no longer hangs until the collective
   timeout: rank 0 discards the rest of the text and keeps generating (the other ranks need its collectives), all
   ranks close the group normally, and rank 0 exits 1 without a traceback, as one process now does.  A rank that
   an exception takes out of the generation closes the group without the final barrier.
2. A checkpoint that lacks a tensor: ``load_tensor_parallel`` raises a FormatError naming the file and the tensor
   (a KeyError too, as before), so ``generate --tp`` prints ``error: ...`` and exits 2, as without ``--tp``.
3. The dense route picks and checks the safetensors files as ``from_pretrained`` does (``_files.open_shards``): no
   stray ``*.safetensors`` file is read, and an index that disagrees with its shards is refused by name.
4. ``save_pretrained`` / ``write_sparse_bitmask`` refuse a tensor-parallel model before writing anything.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch
from safetensors.torch import save_file

import flash_llm
from flash_llm.checkpoint import convert, write_sparse_bitmask
from flash_llm.cli import main
from flash_llm.models import ModelConfig, from_config
from flash_llm.parallel import load_tensor_parallel, tensor_parallel_
from flash_llm.parallel.checkpoint import MissingTensorError

from _ckpt import edit_json, edit_tensor, hf_model, read_shard, rewrite_shard, save_hf, shards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IDS = torch.tensor([[5, 6, 7, 8, 9, 72, 101]])
ENV = {**os.environ, "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p])}


def _byte_model(context: int = 64):
    """A tiny fp16 Llama with the byte vocabulary (256: ``generate`` reads the prompt with the byte tokenizer)."""
    cfg = ModelConfig(family="llama", vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=128, max_position_embeddings=context)
    torch.manual_seed(0)
    m = from_config(cfg, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in n else 0.1 * torch.randn_like(p))
    return m.half().eval()


def _save_single(model, folder, drop=()) -> None:
    """``model`` as ``folder/model.safetensors`` + ``config.json``, without the tensors ``drop``."""
    os.makedirs(folder)
    state = {k: v.contiguous().clone() for k, v in model.state_dict().items() if k not in drop}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(model.config.to_hf(), f)


def _generate_cmd(path, *extra, new: int = 5) -> list[str]:
    return ["generate", str(path), "--prompt", "Hello", "--max-new-tokens", str(new), "--ignore-eos", "--device",
            "cpu", "--tokenizer", "bytes", *extra]


def _descendants(pid: int) -> list[int]:
    """The processes ``pid`` started, recursively (Linux ``/proc``): torchrun starts its ranks in sessions of
    their own, so killing torchrun's process group leaves them running."""
    out = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                children = [int(c) for c in f.read().split()]
        except OSError:
            continue
        for c in children:
            out += [c, *_descendants(c)]
    return out


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc`` and every process it started (by their ids)."""
    for pid in [*_descendants(proc.pid), proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _closed_after_prompt(cmd: list[str], timeout: float) -> tuple[int, str, float]:
    """Run ``cmd`` with stdout a pipe that is closed once the prompt ("Hello") has come through it; return the exit
    status, stderr and seconds.  Past ``timeout`` it and the processes it started are killed and the test fails."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, cwd=ROOT)
    try:
        assert proc.stdout.read(5) == b"Hello"
        proc.stdout.close()  # (the reader goes away, as `| head -c 5` does)
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_tree(proc)
            _, err = proc.communicate()
            pytest.fail(f"still running {timeout} s after its stdout closed (hung); stderr:\n"
                        f"{err.decode(errors='replace')[-4000:]}")
    finally:
        if proc.poll() is None:
            _kill_tree(proc)
            proc.wait()
    return proc.returncode, err.decode(errors="replace"), time.perf_counter() - t0


# ---- 1. a closed stdout ------------------------------------------------------------------------------------------
def test_generate_on_a_closed_pipe_exits_1_without_a_traceback(tmp_path):
    """One process: the rest of the text is discarded and generation stops; exit status 1 (what Python's own
    uncaught BrokenPipeError gave before), but no traceback."""
    _save_single(_byte_model(context=512), tmp_path / "ck")
    rc, err, _ = _closed_after_prompt([sys.executable, "-m", "flash_llm.cli",
                                       *_generate_cmd(tmp_path / "ck", new=400)], timeout=60)
    assert rc == 1, err
    assert "Traceback" not in err and "BrokenPipeError" not in err and "Exception ignored" not in err, err


def test_generate_tp_on_a_closed_pipe_ends_every_rank_without_waiting_for_the_timeout(tmp_path):
    """2 gloo ranks under torchrun, rank 0's stdout closed after the prompt: it hung at tp.close()'s barrier while
    rank 1 waited in the next step's all-reduce, for the 10-minute collective timeout.  Now rank 0 keeps stepping
    with its output discarded, both ranks finish, and rank 0 exits 1 (as one process does) without a traceback."""
    _save_single(_byte_model(context=512), tmp_path / "ck")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "flash_llm.cli", *_generate_cmd(tmp_path / "ck", "--tp", new=400)]
    rc, err, seconds = _closed_after_prompt(cmd, timeout=120)
    print(f"2-rank generate --tp on a closed pipe: {seconds:.1f} s")
    assert "BrokenPipeError" not in err and "Exception ignored" not in err, err[-4000:]
    # torchrun reports rank 0's status 1 (the pipe closed before the 400 tokens were printed)
    assert rc == 1 and "exitcode  : 1" in err and "rank      : 0" in err, err[-4000:]


def test_generate_tp_closes_the_group_without_the_barrier_when_an_error_leaves_the_generation(
        tmp_path, monkeypatch, capsys):
    """An exception that leaves the generation on one rank: that rank must not wait at the final barrier for ranks
    still in their all-reduces (they fail at once when its group goes)."""
    from flash_llm.checkpoint import cli as ckpt_cli
    from flash_llm.parallel import TensorParallel

    _save_single(_byte_model(), tmp_path / "ck")
    barriers = []
    real_close = TensorParallel.close

    def close(self, *, barrier=True):
        barriers.append(barrier)
        real_close(self, barrier=barrier)

    def failing_stream(*args, **kw):
        raise RuntimeError("a rank's own failure in the generation")

    monkeypatch.setattr(TensorParallel, "close", close)
    assert main(_generate_cmd(tmp_path / "ck", "--tp")) == 0  # a complete run meets at the barrier
    assert barriers == [True]
    monkeypatch.setattr(ckpt_cli, "_stream", failing_stream)
    with pytest.raises(RuntimeError, match="a rank's own failure"):
        main(_generate_cmd(tmp_path / "ck", "--tp"))
    assert barriers == [True, False] and not torch.distributed.is_initialized()


# ---- 2. a missing tensor -----------------------------------------------------------------------------------------
def test_generate_tp_on_a_checkpoint_missing_a_tensor_is_an_input_error(tmp_path, capsys):
    missing = "model.layers.1.mlp.up_proj.weight"
    _save_single(_byte_model(), tmp_path / "ck", drop=[missing])
    assert main(_generate_cmd(tmp_path / "ck")) == 2
    one = capsys.readouterr().err
    assert main(_generate_cmd(tmp_path / "ck", "--tp")) == 2
    err = capsys.readouterr().err
    assert f"tensor '{missing}' is missing" in one
    assert f"error: {tmp_path / 'ck' / 'model.safetensors'}: no tensor '{missing}' in the checkpoint" in err, err
    assert "Traceback" not in err and "KeyError" not in err
    assert not torch.distributed.is_initialized()


def test_missing_tensors_raise_a_format_error_naming_file_and_tensor(world1, tmp_path):
    """Dense route (one file, and shards with an index), a replicated tensor, and a compressed checkpoint's
    projection bias: a FormatError (what from_pretrained raises), still a KeyError for older callers."""
    model = hf_model("opt")
    path = save_hf(model, tmp_path / "sharded")  # (several shards and an index)
    edit_tensor(path, "model.decoder.layers.1.fc2.bias", lambda t: None)
    with pytest.raises(flash_llm.FormatError, match=rf"^{path}: no tensor 'model\.decoder\.layers\.1\.fc2\.bias' "
                                                    r"in the checkpoint \(no shard holds it\)$") as e:
        load_tensor_parallel(path, world1, progress=False)
    assert isinstance(e.value, KeyError) and isinstance(e.value, MissingTensorError)
    with pytest.raises(flash_llm.FormatError, match=r"'model\.decoder\.layers\.1\.fc2\.bias' is missing"):
        flash_llm.from_pretrained(path, progress=False)

    dense = save_hf(model, tmp_path / "dense", shard="50MB")
    convert(dense, tmp_path / "flash", format="bitmap", progress=False)
    flash = tmp_path / "flash"
    data, meta = read_shard(flash / "model.safetensors")
    bias = "model.decoder.layers.0.fc1.bias"
    assert "model.decoder.layers.0.fc1.weight_data" in data  # (a compressed projection)
    rewrite_shard(flash / "model.safetensors", {k: v for k, v in data.items() if k != bias}, meta)
    with pytest.raises(MissingTensorError, match=rf"^{flash}: tensor '{bias}' is missing \(no shard holds it\)$"):
        load_tensor_parallel(flash, world1, progress=False)
    norm = "model.decoder.final_layer_norm.weight"
    rewrite_shard(flash / "model.safetensors", {k: v for k, v in data.items() if k != norm}, meta)
    with pytest.raises(MissingTensorError, match=rf"^{flash}: the checkpoint lacks 1 tensor\(s\) of the model, e\.g\. "
                                                 rf"\['{norm}'\]$"):
        load_tensor_parallel(flash, world1, progress=False)


# ---- 3. the files read: those from_pretrained reads, checked the same way -----------------------------------------
def test_files_are_chosen_and_checked_as_from_pretrained_does(world1, tmp_path):
    model = _byte_model()
    state = {k: v.contiguous().clone() for k, v in model.state_dict().items()}
    config = model.config.to_hf()
    down = "model.layers.0.mlp.down_proj.weight"

    # no index: a stray file beside the shard used to override a tensor silently (the later file won)
    folder = tmp_path / "noindex"
    os.makedirs(folder)
    save_file(state, str(folder / "model-00001-of-00001.safetensors"))
    save_file({down: torch.zeros_like(state[down])}, str(folder / "z-stale.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(flash_llm.FormatError) as one:
        flash_llm.from_pretrained(folder, progress=False)
    with pytest.raises(flash_llm.FormatError) as tp:
        load_tensor_parallel(folder, world1, progress=False)
    assert str(tp.value) == str(one.value) and "z-stale.safetensors" in str(tp.value)

    # model.safetensors beside a stray file: only model.safetensors is read
    os.replace(folder / "model-00001-of-00001.safetensors", folder / "model.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no "tensors not read" warning either: the stray file is not opened)
        tpm, _ = load_tensor_parallel(folder, world1, progress=False)
    with torch.no_grad():
        assert torch.equal(tpm(IDS), model(IDS))

    # an index that lists a tensor in a shard that lacks it (a raw SafetensorError naming no file before), or a
    # shard that holds a tensor the index does not list for it (silently read from elsewhere before)
    sharded = save_hf(hf_model("llama"), tmp_path / "sharded")
    first, second = shards(sharded)[:2]
    moved = next(iter(read_shard(second)[0]))
    edit_json(sharded / "model.safetensors.index.json", lambda d: d["weight_map"].update({moved: first.name}))
    with pytest.raises(flash_llm.FormatError) as one:
        flash_llm.from_pretrained(sharded, progress=False)
    with pytest.raises(flash_llm.FormatError) as tp:
        load_tensor_parallel(sharded, world1, progress=False)
    assert str(tp.value) == str(one.value) == (f"{first}: tensor '{moved}' is missing (the index lists it in this "
                                               "shard)")
    edit_json(sharded / "model.safetensors.index.json", lambda d: d["weight_map"].update({moved: second.name}))
    tensors, meta = read_shard(first)
    rewrite_shard(first, {**tensors, "model.extra.weight": torch.ones(2)}, meta)
    with pytest.raises(flash_llm.FormatError, match=rf"^{first}: holds tensor 'model\.extra\.weight' that "
                                                    r"model\.safetensors\.index\.json does not list"):
        load_tensor_parallel(sharded, world1, progress=False)


# ---- 4. saving a tensor-parallel model ---------------------------------------------------------------------------
def test_saving_a_tensor_parallel_model_is_refused_before_anything_is_written(world1, tmp_path):
    model = _byte_model()
    _save_single(model, tmp_path / "ck")
    tensor_parallel_(model, world1)
    loaded, _ = load_tensor_parallel(tmp_path / "ck", world1, progress=False)
    for m in (model, loaded):
        for save in (flash_llm.save_pretrained, write_sparse_bitmask):
            with pytest.raises(ValueError, match=r"model is tensor-parallel \(14 sharded projections: model\.layers"
                                                 r"\.0\.self_attn\.q_proj, \.\.\.\): each rank holds only its slices.*"
                                                 r"save the single-process model before sharding it"):
                save(m, tmp_path / "out", progress=False)
            assert not (tmp_path / "out").exists() and sorted(os.listdir(tmp_path)) == ["ck"]

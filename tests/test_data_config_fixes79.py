"""Session 79: the memory limit of the process' own cgroup (Slurm, ``systemd-run -p MemoryMax=``), gzip corpora that are
corrupted or come through a pipe, NaN / infinite and non-bool ``ModelConfig`` values, a non-UTF-8 ``config.json``,
a 0-d token stream given to ``evaluate``, ``calibration_batches``' seed, numpy / 0-d tensor counts and sparsities,
and ``random_batches`` without a generator."""

from __future__ import annotations

import gzip
import json
import math
import os
import threading

import numpy as np
import pytest
import torch
from torch import nn

from flash_llm import data
from flash_llm.evaluate import evaluate
from flash_llm.models import synthetic
from flash_llm.models.config import ModelConfig, preset

LLAMA = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
             num_attention_heads=2, max_position_embeddings=32)
OPT = dict(model_type="opt", vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=2,
           max_position_embeddings=32)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}


# ---- the cgroup memory limit (finding 3) ---------------------------------------------------------------
def _limit(directory, limit, used, v1=False):
    directory.mkdir(parents=True, exist_ok=True)
    names = ("memory.limit_in_bytes", "memory.usage_in_bytes") if v1 else ("memory.max", "memory.current")
    (directory / names[0]).write_text(f"{limit}\n")
    (directory / names[1]).write_text(f"{used}\n")


def test_cgroup_v2_limit_of_the_process_own_cgroup_counts(tmp_path):
    """cgroup v2 without a namespace (a Slurm job, a systemd-run scope): the root has no ``memory.max``, the limit sits
    on the process' own cgroup (``0::<path>`` of /proc/self/cgroup), and a parent's tighter limit applies too."""
    root = tmp_path / "cgroup"
    job = root / "system.slice" / "slurmstepd.scope" / "job_42"
    _limit(job, 8 << 30, 6 << 30)
    (root / "memory.stat").write_text("")
    own = "0::/system.slice/slurmstepd.scope/job_42\n"
    assert synthetic._cgroup_room(str(root), own) == 2 << 30
    _limit(root / "system.slice", 16 << 30, 15 << 30)  # (a parent with less room left: 1 GiB)
    assert synthetic._cgroup_room(str(root), own) == 1 << 30
    (root / "system.slice" / "memory.max").write_text("max\n")
    assert synthetic._cgroup_room(str(root), own) == 2 << 30
    _limit(job, "max", 6 << 30)
    assert synthetic._cgroup_room(str(root), own) is None
    _limit(job, 4 << 30, 5 << 30)  # (over its limit: no room, not a negative one)
    assert synthetic._cgroup_room(str(root), own) == 0


def test_cgroup_v1_limit_of_the_process_own_cgroup_counts(tmp_path):
    """cgroup v1: the memory line of /proc/self/cgroup (also where it lists several controllers) under
    ``root/memory``, whose own root is unlimited (v1's page-rounded 2^63)."""
    root = tmp_path / "cgroup"
    mem = root / "memory"
    _limit(mem, 9223372036854771712, 50 << 30, v1=True)
    _limit(mem / "slurm" / "uid_0" / "job_7", 3 << 30, 1 << 30, v1=True)
    for line in ("4:memory:/slurm/uid_0/job_7", "4:cpu,memory:/slurm/uid_0/job_7"):
        own = f"9:name=systemd:/user.slice\n5:devices:/\n{line}\n3:cpuset:/\n0::/\n"
        assert synthetic._cgroup_room(str(root), own) == 2 << 30
    _limit(mem / "slurm" / "uid_0" / "job_7", 9223372036854771712, 1 << 30, v1=True)
    assert synthetic._cgroup_room(str(root), "4:memory:/slurm/uid_0/job_7\n") is None


def test_cgroup_limit_at_the_root_still_counts_for_a_container(tmp_path):
    """A container sees its own cgroup at the root: the path /proc/self/cgroup names (a host path, or one outside the
    namespace's view) does not exist under ``root`` and is skipped, and the root's limit counts as before."""
    v2 = tmp_path / "v2"
    _limit(v2, 1 << 30, 256 << 20)
    for own in ("0::/\n", "0::/docker/0123abcd\n", "0::/../../system.slice/x.scope\n", ""):
        assert synthetic._cgroup_room(str(v2), own) == 768 << 20
    v1 = tmp_path / "v1"
    _limit(v1 / "memory", 512 << 20, 100 << 20, v1=True)
    assert synthetic._cgroup_room(str(v1), "4:memory:/docker/0123abcd\n0::/\n") == 412 << 20
    assert synthetic._cgroup_room(str(tmp_path / "none"), "0::/a\n4:memory:/a\n") is None


# ---- reading text files (findings 4 and 5) ---------------------------------------------------------------
TEXT = ("To be, or not to be, that is the question.\n" * 200).encode()


def test_corrupted_gzip_stream_raises_value_error_naming_the_file(tmp_path):
    """A damaged deflate stream raised a bare zlib.error (the CLI died with a traceback): now the ValueError of the
    other gzip damage, naming the file."""
    b = bytearray(gzip.compress(TEXT))
    b[30] ^= 0xFF
    p = tmp_path / "corrupt.txt.gz"
    p.write_bytes(bytes(b))
    with pytest.raises(ValueError, match=r"corrupt\.txt\.gz' looks gzip-compressed but cannot be decompressed"):
        data.load_tokens(p)


def _through_fifo(tmp_path, payload):
    """load_tokens of a FIFO that a thread fills with ``payload`` (as ``<(zcat corpus.gz)`` gives)."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)

    def write():
        try:
            with open(fifo, "wb") as f:
                f.write(payload)
        except OSError:  # (the reader gave up early: BrokenPipeError)
            pass

    t = threading.Thread(target=write, daemon=True)
    t.start()
    try:
        return data.load_tokens(fifo)
    finally:
        t.join(timeout=10)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
@pytest.mark.parametrize("compressed", [False, True])
def test_load_tokens_reads_a_pipe(tmp_path, compressed):
    """A pipe cannot seek: reading it, plain or gzip, failed with 'File or stream is not seekable'."""
    tokens = _through_fifo(tmp_path, gzip.compress(TEXT) if compressed else TEXT)
    assert bytes(tokens.tolist()) == TEXT


# ---- ModelConfig values (findings 7 and 8) ---------------------------------------------------------------
@pytest.mark.parametrize("key", ["rms_norm_eps", "rope_theta"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_config_refuses_nan_and_infinite_eps_and_theta(key, value):
    field = {"rms_norm_eps": "norm_eps", "rope_theta": "rope_theta"}[key]
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field} must be a number > 0, got"):
        ModelConfig.from_hf({**LLAMA, key: value})
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field} must be a number > 0"):
        preset("llama-3-8b").replace(**{field: value})


@pytest.mark.parametrize("key", ["factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_config_refuses_nan_and_infinite_llama3_factors(key, value):
    """A NaN factor made every RoPE frequency NaN; a NaN high_freq_factor also slipped past ``high <= low``."""
    with pytest.raises(ValueError, match=rf"needs a number > 0 for '{key}'"):
        ModelConfig.from_hf({**LLAMA, "rope_scaling": {**LLAMA3, key: value}})
    with pytest.raises(ValueError, match=rf"needs a number > 0 for '{key}'"):
        preset("llama-3-8b").replace(rope_scaling={**LLAMA3, key: value})


FLAGS = ["tie_word_embeddings", "attention_bias", "mlp_bias", "do_layer_norm_before", "layer_norm_elementwise_affine",
         "remove_final_layer_norm"]


@pytest.mark.parametrize("flag", FLAGS)
@pytest.mark.parametrize("value", ["false", "true", 0, 1, 0.0, None, np.bool_(False)])
def test_config_flags_must_be_bools(flag, value):
    """``"false"`` used to tie lm_head to the embedding (any non-empty string counts as true)."""
    family = "llama" if flag in ("tie_word_embeddings", "attention_bias", "mlp_bias") else "opt"
    base = preset("llama-3-8b" if family == "llama" else "opt-13b")
    changes = {flag: value}
    if family == "opt" and flag in ("attention_bias", "mlp_bias"):
        changes = {"attention_bias": value, "mlp_bias": value}
    with pytest.raises(ValueError, match=rf"ModelConfig\.{flag} must be a bool, got"):
        base.replace(**changes)


@pytest.mark.parametrize("hf", [
    {**LLAMA, "tie_word_embeddings": "false"}, {**LLAMA, "attention_bias": 1}, {**LLAMA, "mlp_bias": "no"},
    {**OPT, "enable_bias": None}, {**OPT, "do_layer_norm_before": "false"}, {**OPT, "_remove_final_layer_norm": 0},
    {**OPT, "layer_norm_elementwise_affine": None}, {**OPT, "tie_word_embeddings": None}])
def test_from_hf_refuses_non_bool_flags(hf):
    """As transformers 5 does (its strict config dataclasses refuse a null or a string there too)."""
    with pytest.raises(ValueError, match="must be a bool, got"):
        ModelConfig.from_hf(hf)


@pytest.mark.parametrize("key,value", [
    ("eos_token_id", "12"), ("eos_token_id", 2.0), ("eos_token_id", True), ("eos_token_id", [1, "2"]),
    ("eos_token_id", [1, True]), ("bos_token_id", "1"), ("bos_token_id", 1.0), ("pad_token_id", [1]),
    ("pad_token_id", False)])
def test_config_special_tokens_must_be_ints(key, value):
    """``eos_token_id="12"`` became ``eos_token_ids == ('1', '2')``, which never matches a token."""
    with pytest.raises(ValueError, match=rf"ModelConfig\.{key} must be None"):
        ModelConfig.from_hf({**LLAMA, key: value})


def test_from_hf_names_a_config_json_that_is_not_utf8(tmp_path):
    (tmp_path / "config.json").write_bytes(json.dumps({**LLAMA, "_name_or_path": "caf\u00e9"},
                                                      ensure_ascii=False).encode("latin-1"))
    with pytest.raises(ValueError, match=r"config\.json: not UTF-8 text"):
        ModelConfig.from_hf(tmp_path)


# ---- evaluate, batches, counts and sparsities (smaller issues) ----------------------------------------------
class _Bigram(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(256, 256)

    def forward(self, x):
        return self.emb(x)


def test_evaluate_refuses_a_0d_stream_before_slicing_it():
    """``evaluate(model, torch.tensor(5), max_tokens=3)`` failed with IndexError 'slice() cannot be applied to a 0-dim
    tensor'."""
    with pytest.raises(ValueError, match="tokens must be a 1-D integer tensor of token ids, got shape"):
        evaluate(_Bigram(), torch.tensor(5), max_tokens=3, progress=False)


def test_evaluate_takes_numpy_and_0d_tensor_counts():
    tokens = data.encode("hello world, " * 20)
    want = evaluate(_Bigram(), tokens, seq_len=16, batch_size=3, max_tokens=100, progress=False)
    got = evaluate(_Bigram(), tokens, seq_len=np.int64(16), batch_size=torch.tensor(3), max_tokens=np.int32(100),
                   progress=False)
    assert got == want and type(got.seq_len) is int


def test_calibration_batches_seed_is_checked():
    """A seed torch cannot take raised torch's own error (not naming ``seed``), or wrapped around silently."""
    train = torch.arange(256, dtype=torch.int64) % 251
    for bad in (1.5, "0", None, True, 2**64, -2**63 - 1, np.float64(1.0), torch.tensor([1])):
        with pytest.raises(ValueError, match=r"seed must be an integer in \[-2\*\*63, 2\*\*64\)"):
            data.calibration_batches(train, 4, 8, seed=bad)
    same = data.calibration_batches(train, 4, 8, seed=5)
    for seed in (np.int64(5), torch.tensor(5)):
        assert all(torch.equal(a, b) for a, b in zip(same, data.calibration_batches(train, 4, 8, seed=seed)))
    ends = [data.calibration_batches(train, 4, 8, seed=s) for s in (-2**63, 2**64 - 1, -1)]
    assert torch.equal(ends[1][0], ends[2][0])  # (as torch counts a negative seed: modulo 2**64)


def test_counts_take_numpy_and_0d_tensor_ints():
    train = torch.arange(256, dtype=torch.int64) % 251
    want = data.calibration_batches(train, 6, 8, seed=1, batch_size=4)
    got = data.calibration_batches(train, np.int64(6), np.int32(8), seed=1, batch_size=torch.tensor(4))
    assert [b.shape for b in got] == [b.shape for b in want] and all(map(torch.equal, got, want))
    assert data.windows(train, np.int16(100)) == data.windows(train, 100)
    a = next(data.random_batches(train, np.int64(2), torch.tensor(8), generator=torch.Generator().manual_seed(0)))
    b = next(data.random_batches(train, 2, 8, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for bad in (torch.tensor(True), torch.tensor([4]), np.float64(4.0)):  # (not integers, or not 0-d)
        with pytest.raises(ValueError, match="seq_len must be a positive int"):
            data.calibration_batches(train, 2, bad)
    with pytest.raises(ValueError, match="ids must be ints"):
        data.decode([torch.tensor(True)])


def test_random_batches_needs_a_generator():
    """``generator=None`` drew from torch's global RNG: batches no seed given here fixes.  Refused when called."""
    tokens = torch.arange(64)
    for bad in (None, 0, np.random.default_rng(0)):
        with pytest.raises(TypeError, match="generator must be a CPU torch.Generator"):
            data.random_batches(tokens, 2, 8, generator=bad)


@pytest.mark.parametrize("sparsity", [np.float32(0.5), np.float16(0.5), torch.tensor(0.5)])
def test_synthetic_sparsity_takes_numpy_floats_and_0d_tensors(sparsity):
    """``np.float32(0.5)`` was refused while ``np.float64`` passed; what comes back is a Python float."""
    got = synthetic._check_sparsity(sparsity)
    assert got == 0.5 and type(got) is float
    assert synthetic.estimate_bytes("opt-13b", sparsity) == synthetic.estimate_bytes("opt-13b", 0.5)
    assert synthetic._check_sparsity(np.float64(0.5)) == 0.5
    assert synthetic._check_sparsity(np.float32(0)) is None
    for bad in (np.bool_(True), torch.tensor(True), np.float32(1.0), np.float32("nan"), torch.tensor([0.5])):
        with pytest.raises(ValueError, match="sparsity must be None"):
            synthetic._check_sparsity(bad)

"""flash_llm.data on CPU: the byte tokenizer, reading text files, the fixed train/validation split, evaluation
windows, training and calibration batches."""

from __future__ import annotations

import gzip
import hashlib

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from flash_llm import data

SHAKESPEARE_BYTES = 1_115_394


# ---- tokenizer ------------------------------------------------------------------------------------------
@given(st.text(max_size=200))
def test_encode_decode_round_trip(text):
    ids = data.encode(text)
    assert ids.dtype == torch.int64 and ids.ndim == 1
    assert ids.tolist() == list(text.encode("utf-8"))
    assert data.decode(ids) == text
    assert data.decode(ids.tolist()) == text


def test_encode_multibyte_and_decode_invalid_bytes():
    assert data.encode("é€").tolist() == [0xC3, 0xA9, 0xE2, 0x82, 0xAC]
    assert data.encode("").shape == (0,)
    # a truncated multi-byte sequence and a lone continuation byte decode to U+FFFD, not an exception
    assert data.decode(torch.tensor([0x41, 0xE2, 0x82])) == "A\ufffd"
    assert data.decode([0x80, 0x42]) == "\ufffdB"
    assert data.decode(torch.tensor([255], dtype=torch.uint8)) == "\ufffd"


def test_tokenizer_errors():
    with pytest.raises(TypeError, match="text must be a str, got bytes"):
        data.encode(b"abc")
    with pytest.raises(ValueError, match=r"ids must be ints in \[0, 256\) \(byte tokens\), got 256"):
        data.decode([65, 256])
    with pytest.raises(ValueError, match=r"got -1"):
        data.decode(torch.tensor([-1]))
    with pytest.raises(TypeError, match="ids must be an integer tensor, got dtype torch.float32"):
        data.decode(torch.tensor([65.0]))
    with pytest.raises(ValueError, match=r"ids must be 1-D, got shape \(1, 2\)"):
        data.decode(torch.tensor([[65, 66]]))


# ---- files ----------------------------------------------------------------------------------------------
def test_load_tokens_plain_and_gzip(tmp_path):
    raw = "To be, or not to be\n".encode() * 3
    plain, packed = tmp_path / "a.txt", tmp_path / "a.txt.gz"
    plain.write_bytes(raw)
    packed.write_bytes(gzip.compress(raw))
    for f in (plain, packed):
        t = data.load_tokens(f, sha256=hashlib.sha256(raw).hexdigest())
        assert t.dtype == torch.uint8 and t.tolist() == list(raw)


def test_load_tokens_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="text file .*missing.txt' does not exist"):
        data.load_tokens(tmp_path / "missing.txt")
    with pytest.raises(IsADirectoryError, match="is a directory"):
        data.load_tokens(tmp_path)
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.txt' is empty"):
        data.load_tokens(empty)
    bad = tmp_path / "bad.gz"
    bad.write_bytes(b"\x1f\x8b" + b"\x00" * 20)
    with pytest.raises(ValueError, match="looks gzip-compressed but cannot be decompressed"):
        data.load_tokens(bad)
    ok = tmp_path / "ok.txt"
    ok.write_bytes(b"abc")
    with pytest.raises(ValueError, match="has SHA-256 ba7816bf.*, expected 00"):
        data.load_tokens(ok, sha256="00" * 32)


def test_bundled_corpus_is_tinyshakespeare():
    tokens = data.load_tokens(data.corpus_path(), sha256=data.CORPUS_SHA256)
    assert tokens.numel() == SHAKESPEARE_BYTES
    assert data.decode(tokens[:15]) == "First Citizen:\n"


# ---- the fixed split ------------------------------------------------------------------------------------
@given(st.integers(10, 5000))
def test_split_is_fixed_contiguous_and_disjoint(n):
    tokens = torch.arange(n)
    train, val = data.split(tokens)
    assert val.numel() == n // 10 and train.numel() == n - n // 10
    assert torch.equal(torch.cat([train, val]), tokens)  # in order, nothing shared, nothing lost


def test_split_of_the_corpus():
    train, val = data.split(data.load_tokens(data.corpus_path()))
    assert (train.numel(), val.numel()) == (1_003_855, 111_539)
    again_train, again_val = data.split(data.load_tokens(data.corpus_path()))
    assert torch.equal(train, again_train) and torch.equal(val, again_val)


def test_split_errors():
    with pytest.raises(ValueError, match="has 9 tokens; the train/validation split needs at least 10"):
        data.split(torch.arange(9))
    with pytest.raises(ValueError, match=r"1-D integer tensor of token ids, got shape \(2, 5\)"):
        data.split(torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="got list"):
        data.split([1, 2, 3])


# ---- windows and batches --------------------------------------------------------------------------------
@given(st.integers(2, 400), st.integers(1, 70))
def test_windows_score_every_target_once(n, seq_len):
    wins = data.windows(torch.zeros(n, dtype=torch.long), seq_len)
    targets = [t for s, length in wins for t in range(s + 1, s + length + 1)]
    assert targets == list(range(1, n))
    assert all(length == seq_len for _, length in wins[:-1]) and 1 <= wins[-1][1] <= seq_len


def test_windows_errors():
    with pytest.raises(ValueError, match="has 1 token"):
        data.windows(torch.zeros(1, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="seq_len must be a positive int, got 0"):
        data.windows(torch.zeros(5, dtype=torch.long), 0)


def test_random_batches_shift_and_seed():
    tokens = torch.arange(1000) % 251
    a = data.random_batches(tokens, 4, 16, generator=torch.Generator().manual_seed(3))
    b = data.random_batches(tokens, 4, 16, generator=torch.Generator().manual_seed(3))
    for _ in range(3):
        (x, y), (x2, y2) = next(a), next(b)
        assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
        assert torch.equal(x, x2) and torch.equal(y, y2)
        assert torch.equal(x[:, 1:], y[:, :-1])
        assert torch.equal((x + 1) % 251, y)  # consecutive stream positions
    with pytest.raises(ValueError, match="seq_len=16 needs at least 17"):
        next(data.random_batches(tokens[:16], 2, 16, generator=torch.Generator()))


def test_calibration_batches_come_from_the_given_tokens():
    train, val = data.split(torch.arange(10_000))
    batches = data.calibration_batches(train, 10, 32, seed=5, batch_size=4)
    assert [b.shape for b in batches] == [(4, 32), (4, 32), (2, 32)]
    seqs = torch.cat(batches)
    assert seqs.dtype == torch.int64
    assert bool((seqs < train.numel()).all())  # no validation token
    assert torch.equal(seqs - seqs[:, :1], torch.arange(32).expand(10, 32))  # contiguous windows
    assert all(torch.equal(a, b) for a, b in zip(batches, data.calibration_batches(train, 10, 32, seed=5,
                                                                                      batch_size=4)))
    assert not torch.equal(seqs, torch.cat(data.calibration_batches(train, 10, 32, seed=6)))
    with pytest.raises(ValueError, match="n_sequences must be a positive int, got 0"):
        data.calibration_batches(train, 0, 32)
    with pytest.raises(ValueError, match="fewer than seq_len=64"):
        data.calibration_batches(train[:63], 1, 64)

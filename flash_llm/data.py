"""Byte-level text data: the tokenizer, the corpus and its fixed train/validation split, batches.

The bundled model reads bytes: token id ``i`` is the byte ``i`` (vocabulary 256, no special tokens),
so any text encodes (as UTF-8) and any id sequence decodes (invalid UTF-8 becomes U+FFFD)::

    tokens = flash_llm.data.load_tokens("input.txt")     # uint8 [n]
    train, val = flash_llm.data.split(tokens)            # fixed: the last 10 % is validation
    calib = flash_llm.data.calibration_batches(train, 64, 256, seed=0)   # [int64 [64, 256]]: a list of batches

**The fixed split** (:func:`split`): of ``n`` tokens the last ``n_val = n // 10`` are the validation
split and the first ``n - n_val`` the training split; nothing is shuffled, so the two are contiguous,
disjoint, and the same on every machine.  For tinyshakespeare (1,115,394 bytes) that is 1,003,855
training and 111,539 validation bytes.  Validation text is never used for training or calibration.

The corpus the bundled model was trained on ships with the package (gzip); :func:`corpus_path`
returns it, :func:`load_tokens` reads ``.gz`` files transparently.
"""

from __future__ import annotations

import gzip
import operator
import hashlib
import os
import zlib
from pathlib import Path

import torch

__all__ = ["VOCAB_SIZE", "encode", "decode", "load_tokens", "corpus_path", "split", "windows", "random_batches",
           "calibration_batches"]

#: Size of the byte vocabulary: ids ``0..255`` are the bytes ``0x00..0xff``.
VOCAB_SIZE = 256
#: Fraction of a token stream held out for validation, at its end (see :func:`split`).
VAL_FRACTION = 0.1
#: The bundled corpus: tinyshakespeare (Karpathy's char-rnn collection, public-domain Shakespeare).
CORPUS_FILE = Path(__file__).parent / "bundled" / "tinyshakespeare.txt.gz"
#: SHA-256 of the uncompressed corpus, checked by :func:`corpus_path` users that need the exact text.
CORPUS_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def _utf8_bytes(text: str) -> bytes:
    """``text`` as UTF-8 bytes, for any ``str``: a lone surrogate ``U+DC80..U+DCFF`` (how Python's ``surrogateescape``
    keeps a byte that is not UTF-8, e.g. in command-line arguments and file names) gives back that byte, any other
    lone surrogate its 3-byte form (``surrogatepass``)."""
    try:
        return text.encode("utf-8", errors="surrogateescape")
    except UnicodeEncodeError:  # a surrogate outside U+DC80..U+DCFF: one character at a time
        return b"".join(c.encode("utf-8", errors="surrogateescape" if "\udc80" <= c <= "\udcff" else "surrogatepass")
                        for c in text)


def encode(text: str) -> torch.Tensor:
    """The UTF-8 bytes of ``text`` as token ids: ``int64 [n]``, values in ``0..255``.  Any ``str`` encodes: a lone
    surrogate (e.g. a ``surrogateescape``-decoded byte of a command-line argument) as :func:`_utf8_bytes` says."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return torch.frombuffer(bytearray(_utf8_bytes(text)), dtype=torch.uint8).long() if text else \
        torch.zeros(0, dtype=torch.int64)


def _as_int(v):
    """``v`` as a Python int where it is an integer of any kind but bool (numpy's integers, 0-d integer tensors);
    anything else as it is, a bool tensor and a one-element tensor of 1 or more dimensions too (``__index__`` would
    take both)."""
    if isinstance(v, bool) or isinstance(v, torch.Tensor) and (v.ndim != 0 or v.dtype == torch.bool):
        return v
    try:
        return operator.index(v)
    except TypeError:
        return v


def decode(ids) -> str:
    """Token ids (a 1-D integer tensor or a sequence of ints, each in ``0..255``) back to text; bytes
    that are not valid UTF-8 become U+FFFD (``errors='replace'``)."""
    if isinstance(ids, torch.Tensor):
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise TypeError(f"ids must be an integer tensor, got dtype {ids.dtype}")
        if ids.ndim != 1:
            raise ValueError(f"ids must be 1-D, got shape {tuple(ids.shape)}")
        ids = ids.tolist()
    ids = [_as_int(i) for i in ids]
    bad = [i for i in ids if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < VOCAB_SIZE]
    if bad:
        raise ValueError(f"ids must be ints in [0, {VOCAB_SIZE}) (byte tokens), got {bad[0]!r}")
    return bytes(ids).decode("utf-8", errors="replace")


def corpus_path() -> Path:
    """Path of the bundled training corpus (tinyshakespeare, gzip-compressed; read it with
    :func:`load_tokens`)."""
    if not CORPUS_FILE.is_file():
        raise FileNotFoundError(f"the bundled corpus {CORPUS_FILE} is missing: the flash-llm installation is "
                                "incomplete (reinstall the package)")
    return CORPUS_FILE


def _open_text_file(path):
    """``open(path, "rb")``, its usual failures raised again naming the text file (what :func:`load_tokens` and
    :func:`check_readable` say)."""
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise FileNotFoundError(f"text file {str(path)!r} does not exist") from None
    except IsADirectoryError:
        raise IsADirectoryError(f"text file {str(path)!r} is a directory, expected a file") from None
    except PermissionError:
        raise PermissionError(f"text file {str(path)!r} cannot be read (no read permission)") from None


def check_readable(path: str | os.PathLike) -> None:
    """Raise what :func:`load_tokens` would for a text file it cannot open (missing, a directory, no permission),
    without reading it: for an option whose file is not read this time (``flash-llm prune --method magnitude
    --calib``), so a mistyped path is still told."""
    _open_text_file(path).close()


def _read_bytes(path: Path) -> bytes:
    """The bytes of the file at ``path``, gunzipped when they start with the gzip magic.  Read in one go, never
    seeked, so a pipe (``<(zcat corpus.gz)``, ``/dev/stdin``) reads too; a damaged gzip stream (a bad header, CRC or
    length, a truncated or corrupted deflate stream) raises ValueError naming the file."""
    with _open_text_file(path) as f:
        raw = f.read()
    if raw[:2] != b"\x1f\x8b":  # gzip magic
        return raw
    try:
        return gzip.decompress(raw)
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise ValueError(f"text file {str(path)!r} looks gzip-compressed but cannot be decompressed: {e}") from None


def load_tokens(path: str | os.PathLike, *, sha256: str | None = None) -> torch.Tensor:
    """The bytes of a text file (plain, or gzip when it starts with the gzip magic) as tokens.

    Args:
        path: the file.
        sha256: optional hex digest the (uncompressed) bytes must have; a mismatch raises ``ValueError``.

    Returns:
        ``uint8 [n]`` (1 byte per token; index or ``.long()`` it for a model).
    """
    path = Path(path)
    raw = _read_bytes(path)
    if sha256 is not None:
        got = hashlib.sha256(raw).hexdigest()
        if got != sha256.lower():
            raise ValueError(f"text file {str(path)!r} has SHA-256 {got}, expected {sha256.lower()}")
    if not raw:
        raise ValueError(f"text file {str(path)!r} is empty")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).clone()


def _check_stream(tokens, name="tokens") -> torch.Tensor:
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"{name} must be a 1-D integer tensor of token ids, got {type(tokens).__name__}")
    if tokens.ndim != 1 or tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise ValueError(f"{name} must be a 1-D integer tensor of token ids, got shape {tuple(tokens.shape)} "
                         f"dtype {tokens.dtype}")
    return tokens


def _check_positive(name, v) -> int:
    """``v`` as a Python int >= 1 (any integer but bool: numpy's, a 0-d tensor, see :func:`_as_int`); ValueError
    naming ``name`` otherwise."""
    n = _as_int(v)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return n


def _check_seed(seed) -> int:
    """``seed`` as a Python int that ``torch.Generator.manual_seed`` takes: an integer (not bool; numpy's and 0-d
    tensors too) in ``[-2**63, 2**64)``, a negative one counting modulo 2**64 as torch counts it (the range of
    ``flash-llm prune --seed``); ValueError naming ``seed`` otherwise."""
    n = _as_int(seed)
    if isinstance(n, bool) or not isinstance(n, int) or not -2**63 <= n < 2**64:
        raise ValueError(f"seed must be an integer in [-2**63, 2**64) (a torch.Generator seed), got {seed!r}")
    return n


def split(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed train/validation split: ``(tokens[:n - n // 10], tokens[n - n // 10:])``.

    Args:
        tokens: ``[n]`` token ids (any integer dtype), ``n >= 10``.

    Returns:
        ``(train [n - n // 10], val [n // 10])``: views of ``tokens``, contiguous, disjoint, in order.
    """
    tokens = _check_stream(tokens)
    n = tokens.numel()
    if n < 10:
        raise ValueError(f"tokens has {n} tokens; the train/validation split needs at least 10")
    n_val = n // 10
    return tokens[:n - n_val], tokens[n - n_val:]


def windows(tokens: torch.Tensor, seq_len: int) -> list[tuple[int, int]]:
    """Non-overlapping evaluation windows over a stream of ``n`` tokens: ``(start, length)`` pairs with
    inputs ``tokens[start:start + length]`` and targets ``tokens[start + 1:start + length + 1]``.

    Windows start at ``0, seq_len, 2 * seq_len, ...``; all have ``length = seq_len`` except possibly the
    last (shorter).  Every token but the first is a target exactly once, so the windows hold ``n - 1``
    targets in all; each window starts from an empty context.
    """
    tokens = _check_stream(tokens)
    seq_len = _check_positive("seq_len", seq_len)
    n = tokens.numel()
    if n < 2:
        raise ValueError(f"tokens has {n} token(s); at least 2 are needed (an input and its target)")
    return [(s, min(seq_len, n - 1 - s)) for s in range(0, n - 1, seq_len)]


def random_batches(tokens: torch.Tensor, batch_size: int, seq_len: int, *, generator: torch.Generator):
    """Endless training batches: each a pair ``(x, y)`` of ``int64 [batch_size, seq_len]`` with
    ``y = x`` shifted by one token, from windows starting at uniformly random offsets of ``tokens``.

    Args:
        tokens: ``[n]`` token ids, ``n > seq_len``.
        batch_size, seq_len: batch shape.
        generator: a CPU ``torch.Generator``: the same seed gives the same batches.  Required: None (which would
            draw from torch's global RNG, so that no seed given here fixes the batches) or anything else raises
            TypeError.

    The arguments are checked when this is called, before the first batch is asked for.
    """
    tokens = _check_stream(tokens)
    batch_size = _check_positive("batch_size", batch_size)
    seq_len = _check_positive("seq_len", seq_len)
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise TypeError(f"generator must be a CPU torch.Generator (e.g. torch.Generator().manual_seed(seed)), got "
                        f"{generator!r}")
    if tokens.numel() <= seq_len:
        raise ValueError(f"tokens has {tokens.numel()} tokens; seq_len={seq_len} needs at least {seq_len + 1}")
    return _random_batches(tokens, batch_size, seq_len, generator)


def _random_batches(tokens: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator):
    """:func:`random_batches`' endless loop, its arguments checked."""
    offsets = torch.arange(seq_len + 1)
    while True:
        starts = torch.randint(0, tokens.numel() - seq_len, (batch_size,), generator=generator)
        chunk = tokens[starts[:, None] + offsets].long()
        yield chunk[:, :-1], chunk[:, 1:]


def calibration_batches(tokens: torch.Tensor, n_sequences: int, seq_len: int, *, seed: int = 0,
                        batch_size: int | None = None) -> list[torch.Tensor]:
    """Calibration data for the pruners: ``n_sequences`` windows of ``seq_len`` tokens from random
    offsets of ``tokens`` (pass the training split, never the validation split).

    Args:
        tokens: ``[n]`` token ids, ``n >= seq_len``.
        n_sequences: number of sequences, >= 1.
        seq_len: tokens per sequence, >= 1.
        seed: the offsets are drawn from ``torch.Generator().manual_seed(seed)``: an integer in
            ``[-2**63, 2**64)`` (a negative one counts modulo 2**64); anything else raises ValueError.
        batch_size: sequences per batch (default: all in one batch).

    The counts may be any integers but bools (numpy's, 0-d tensors).

    Returns:
        A list of ``int64 [b, seq_len]`` batches holding ``n_sequences`` sequences together.
    """
    tokens = _check_stream(tokens)
    n_sequences = _check_positive("n_sequences", n_sequences)
    seq_len = _check_positive("seq_len", seq_len)
    if batch_size is not None:
        batch_size = _check_positive("batch_size", batch_size)
    seed = _check_seed(seed)
    if tokens.numel() < seq_len:
        raise ValueError(f"tokens has {tokens.numel()} tokens, fewer than seq_len={seq_len}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seq_len + 1, (n_sequences,), generator=g)
    seqs = tokens[starts[:, None] + torch.arange(seq_len)].long()
    return list(seqs.split(batch_size or n_sequences))

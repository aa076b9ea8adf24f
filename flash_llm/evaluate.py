"""Validation loss and perplexity of a causal language model on a token stream, the same code for dense
and sparse (``flash_llm.sparsify_``-converted) models::

    result = flash_llm.evaluate.evaluate(model, val_tokens, seq_len=256)
    print(result.loss, result.perplexity)        # mean cross-entropy (nats/token) and exp(loss)

The stream is cut into non-overlapping windows (:func:`flash_llm.data.windows`): window ``i`` feeds
``tokens[i*T : i*T + T]`` and scores the next-token predictions against ``tokens[i*T + 1 : i*T + T + 1]``,
so each of the ``n - 1`` targets is scored exactly once, with ``0 .. T-1`` tokens of context (no
context carries over between windows).  The loss is the mean over all targets of the cross-entropy,
computed from the logits in fp32 per token and summed in fp64 (so it does not depend on ``batch_size``),
whatever the model's dtype.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .data import _as_int, _check_positive, _check_stream, windows
from .prune import _restore_training_flags, _token_id_error, _training_flags

__all__ = ["EvalResult", "evaluate", "logits_of"]


@dataclass(frozen=True)
class EvalResult:
    """``loss``: mean next-token cross-entropy in nats; ``perplexity``: ``exp(loss)`` (``inf`` when that
    overflows a float, for a loss above about 709.78; ``loss`` is still the finite mean); ``tokens``: the
    number of targets scored; ``seq_len``: the window length used."""

    loss: float
    perplexity: float
    tokens: int
    seq_len: int

    def __str__(self) -> str:
        return f"loss {self.loss:.4f} nats/token, perplexity {self.perplexity:.3f} ({self.tokens:,} tokens, " \
               f"windows of {self.seq_len})"


def logits_of(output) -> torch.Tensor:
    """The logits ``[B, T, V]`` of a model's output: the tensor itself, or its ``.logits`` (Hugging Face
    ``CausalLMOutput``), or element 0 of a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"the model returned {type(output).__name__}; expected logits [B, T, V] (a tensor, an object "
                    "with .logits, or a tuple starting with the logits)")


def _model_device(model: nn.Module) -> torch.device:
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


@torch.no_grad()
def evaluate(model: nn.Module, tokens: torch.Tensor, *, seq_len: int = 256, batch_size: int = 32,
             max_tokens: int | None = None, progress: bool = True, desc: str = "evaluate") -> EvalResult:
    """Mean next-token cross-entropy and perplexity of ``model`` on ``tokens``.

    Args:
        model: called as ``model(x)`` with ``x`` int64 ``[B, T]`` on the model's device, returning logits
            ``[B, T, V]`` (any float dtype) or an object/tuple holding them (see :func:`logits_of`).
            Runs in eval mode under ``no_grad``; every submodule's training flag is restored after.
        tokens: ``[n]`` token ids (any integer dtype, e.g. the ``uint8`` of :func:`flash_llm.data.load_tokens`),
            on any device; ``n >= 2``.
        seq_len: window length ``T`` (at most the model's context length).
        batch_size: windows per forward pass.
        max_tokens: score only the first ``max_tokens + 1`` tokens of the stream (``max_tokens`` targets);
            default: all.  (``seq_len``, ``batch_size`` and ``max_tokens`` may be any integers but bools: numpy's,
            0-d tensors.)
        progress: tqdm bar (stderr) over the windows.
        desc: the bar's label.

    Returns:
        An :class:`EvalResult` (``tokens`` = number of targets scored; ``perplexity`` is ``inf`` when ``exp(loss)``
        overflows).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    seq_len, batch_size = _check_positive("seq_len", seq_len), _check_positive("batch_size", batch_size)
    tokens = _check_stream(tokens)  # (before slicing it: a 0-d tensor has no [:n])
    if max_tokens is not None:
        n = _as_int(max_tokens)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"max_tokens must be a positive int or None, got {max_tokens!r}")
        tokens = tokens[:n + 1]
    cfg = getattr(model, "config", None)  # (flash_llm's and transformers' configs name these alike)
    context = getattr(cfg, "max_position_embeddings", None)
    if isinstance(context, int) and seq_len > context:
        raise ValueError(f"seq_len={seq_len} is longer than the model's context (max_position_embeddings={context})")
    why = _token_id_error(tokens, model)  # (the pruners' calibration check, the same message)
    if why is not None:
        raise ValueError(why)
    wins = windows(tokens, seq_len)
    device = _model_device(model)
    stream = tokens.to(device=device, dtype=torch.long)
    full = [s for s, n in wins if n == seq_len]
    groups = [full[i:i + batch_size] for i in range(0, len(full), batch_size)]
    groups += [[s] for s, n in wins if n < seq_len]  # the shorter last window runs alone
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    flags = _training_flags(model)  # every submodule's own flag: model.train(flag) would set them all alike
    model.eval()
    bar = tqdm(total=len(wins), desc=desc, unit="window", disable=not progress, file=sys.stderr, leave=False)
    try:
        for starts in groups:
            length = min(seq_len, stream.numel() - 1 - starts[0])
            idx = torch.tensor(starts, device=device)[:, None] + torch.arange(length + 1, device=device)
            chunk = stream[idx]
            logits = logits_of(model(chunk[:, :-1]))
            if logits.shape[:2] != (len(starts), length):
                raise ValueError(f"the model returned logits of shape {tuple(logits.shape)} for input "
                                 f"{(len(starts), length)}; expected [B, T, V] = [{len(starts)}, {length}, V]")
            loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                               chunk[:, 1:].reshape(-1), reduction="none")  # fp32, per token
            total += loss.double().sum()  # (summed in fp64: the mean does not depend on batch_size)
            count += chunk[:, 1:].numel()
            bar.update(len(starts))
    finally:
        bar.close()
        _restore_training_flags(flags)
    mean = float(total) / count
    if not math.isfinite(mean):
        raise FloatingPointError(f"the loss is {mean} (the model produced non-finite logits)")
    try:
        perplexity = math.exp(mean)
    except OverflowError:  # (a finite loss above ~709.78 nats: a diverged model; the loss itself is kept)
        perplexity = math.inf
    return EvalResult(mean, perplexity, count, seq_len)

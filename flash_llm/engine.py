"""A decode engine for the :mod:`flash_llm.models` (OPT, Llama): static KV cache, one eager prefill, then
token-by-token decode whose step is captured in a CUDA graph per batch size.  Dense and sparsified
(``flash_llm.sparsify_``) models run through the same code.

::

    engine = Engine(model, max_batch=8, max_seq=512)
    out = engine.generate([[2, 100, 200], [2, 300]], max_new_tokens=32)             # greedy
    out = engine.generate(prompts, 32, temperature=0.8, top_p=0.95, generator=g)     # sampling
    for tokens in engine.stream(prompts, 32):                                        # [B] per step, as they come
        ...
    out.sequences(), out.ttft_s, out.tpot_s, out.decode_tokens_per_s

``docs/engine.md`` describes the cache layout and what the graph captures.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import numbers
import operator
import statistics
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator, NamedTuple, Sequence

import torch

from ._env import env_flag, env_float, env_int
from .models import CausalLM, merge_projections, set_fused, unmerge_projections
from .models._common import Attend, KVCache, after_attention_weights, padded_positions, padding_mask
from .models._merge import _dropped, _own_members

#: Warm-up runs of the decode step before it is captured (the first also compiles/loads the spmm kernels).
WARMUP_STEPS = 2
#: capture each prefill (one batch size and padded prompt length) in a CUDA graph at its first use and replay it
#: later, where ``cuda_graphs`` is on and the model is not tensor-parallel (``FLASH_LLM_PREFILL_GRAPHS=0``: always
#: eager).  An eager prefill is bound by the host's launches: Llama-3-8B at 80 %, a prompt of 128 on an H200, 19-23 ms
#: of kernels in a time to first token of 49-87 ms (session 63, ``benchmarks/prefill_ab.py``).
PREFILL_GRAPHS = env_flag("FLASH_LLM_PREFILL_GRAPHS", True)
#: ... for tensor-parallel models too (NCCL: the all-reduces captured, as the decode graphs do; every rank captures
#: the same shapes, by agreement).  Off until it is run on GPUs (session 64, ``FLASH_LLM_PREFILL_GRAPHS_TP=1``)
PREFILL_GRAPHS_TP = env_flag("FLASH_LLM_PREFILL_GRAPHS_TP", False)
#: the most prefill graphs an engine keeps (the least recently used is dropped; they share one memory pool)
PREFILL_GRAPHS_MAX = 8
#: where the prefill runs from graphs, pad the prompts on the left to the next length of :func:`prefill_bucket`, so
#: prompts of nearby lengths share one graph (``FLASH_LLM_PREFILL_BUCKETS=0``: every padded prompt length its own)
PREFILL_BUCKETS = env_flag("FLASH_LLM_PREFILL_BUCKETS", True)
#: prompts up to this many tokens keep their length (below it the sparse kernels change with the token count)
PREFILL_BUCKET_FROM = 32
#: a decode step attends only the leading cache slots that can hold its sequence so far, rounded up by
#: :func:`decode_kv_len` (one decode graph a batch size and rounded length), instead of all ``max_seq`` of them: the
#: attention's work and the cache it reads grow with the tokens there are, not with the cache's size (session 65;
#: ``FLASH_LLM_DECODE_KV_BUCKETS=0``: every step attends the whole cache).  The slots left out are masked anyway.
DECODE_KV_BUCKETS = env_flag("FLASH_LLM_DECODE_KV_BUCKETS", True)
#: the fewest slots a decode step attends with :data:`DECODE_KV_BUCKETS` (then twice as many, four times, ...)
DECODE_KV_MIN = 256
#: Without streaming, on a CUDA device, the host learns that every row has stopped this many steps late (the steps
#: between are queued on the device, so none waits for the host; :class:`_HostCopies`).  Until session 65 it checked
#: every 16 steps with a synchronization: 7.5 steps past the end on average.  On a CPU it checks every step.
EOS_LAG = 3
#: the stop flags (and, streaming, the tokens) copied to the host on a side stream (:class:`_HostCopies`, session 65);
#: ``FLASH_LLM_HOST_COPIES=0``: read with a synchronization every step, the tokens handed over after each step
HOST_COPIES = env_flag("FLASH_LLM_HOST_COPIES", True)
#: where the rows of a generation stop at different steps, decode the rows still going as a smaller batch, a power of
#: two, once they fit one smaller than the batch decoded (:meth:`Engine._compacted`; session 65): a batch no longer
#: runs at its full size to its longest row's end (``FLASH_LLM_COMPACT_ROWS=0``: it does).  Not with
#: ``output_logits``.
COMPACT_ROWS = env_flag("FLASH_LLM_COMPACT_ROWS", True)
#: an engine's ``max_seq`` where none is given: the model's ``max_position_embeddings``, at most this (the demo checks
#: its requests against it)
DEFAULT_MAX_SEQ = 2048
_CACHE_ALIGN = 64  # cache slots allocated in multiples of this (aligned attention masks)
_FROM_CONFIG = "config"


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _as_int(v) -> int | None:
    """``v`` as an int where it is an integer scalar: a Python or numpy int, or a 0-d integer tensor (not a bool, not
    a float however whole); else None."""
    if isinstance(v, torch.Tensor):
        ok = v.ndim == 0 and not v.dtype.is_floating_point and not v.dtype.is_complex and v.dtype != torch.bool
        return int(v.item()) if ok else None
    return operator.index(v) if isinstance(v, numbers.Integral) and not isinstance(v, bool) else None


def _as_float(v) -> float | None:
    """``v`` as a float where it is a real number: a Python or numpy int or float, or a 0-d tensor of one (not a
    bool); else None.  (An int too large for a float: an infinity of its sign.)"""
    if isinstance(v, torch.Tensor):
        ok = v.ndim == 0 and not v.dtype.is_complex and v.dtype != torch.bool
        return float(v.item()) if ok else None
    if not isinstance(v, numbers.Real) or isinstance(v, bool):  # (numpy's bool is no numbers.Real)
        return None
    try:
        return float(v)
    except OverflowError:
        return math.inf if v > 0 else -math.inf


def _temperature_arg(temperature) -> float:
    """``temperature`` checked and taken as a float (numpy scalars and 0-d tensors as their values): a finite number
    >= 0; ValueError naming it otherwise.  :func:`sample_tokens` and ``Engine``'s generations share it."""
    t = _as_float(temperature)
    if t is None or not (t >= 0 and math.isfinite(t)):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    return t


def _top_args(top_k, top_p) -> tuple[int | None, float | None]:
    """``top_k`` / ``top_p`` checked and taken as an int / a float (numpy scalars and 0-d tensors as their values:
    :func:`_as_int`, :func:`_as_float`); ValueError naming the argument otherwise.  :func:`sample_tokens` and
    ``Engine``'s generations share it."""
    k = None if top_k is None else _as_int(top_k)
    if top_k is not None and (k is None or k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    q = None if top_p is None else _as_float(top_p)
    if top_p is not None and (q is None or not 0 < q <= 1):
        raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")
    return k, q


def sample_tokens(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                  top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Choose one token per row.

    Args:
        logits: ``[B, V]`` (any floating dtype; computed in float32).
        temperature: 0 for greedy (argmax); otherwise sample from ``softmax(logits / temperature)``.
        top_k: keep only the ``top_k`` largest logits (ties at the boundary kept); None or an int >= 1.
        top_p: keep the smallest set of most likely tokens whose probability reaches ``top_p`` (nucleus); None or
            a number in ``(0, 1]``.
        generator: a ``torch.Generator`` on ``logits``' device, for reproducible sampling.

    Returns:
        ``[B]`` int64 token ids, on ``logits``' device.  Sampling draws ``E ~ Exp(1)`` per token and takes
        ``argmax(p / E)``, which picks token ``i`` with probability ``p_i`` and needs no host synchronization.
        A row holding ``+inf`` (an fp16 head that overflowed) or NaN takes greedy's token whatever the temperature:
        the first ``+inf``, the limit of ``softmax(logits / T)``, or the first NaN, as ``argmax`` (no check that
        would synchronize; the softmax of such a row is all NaN, whose sampled token was an arbitrary 0).  Logits
        of more dimensions (``[..., V]``) choose one token per row of the last dimension.
    """
    temperature = _temperature_arg(temperature)
    top_k, top_p = _top_args(top_k, top_p)
    return _sample(logits, temperature, top_k, top_p, generator)


def _sample(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
            generator: torch.Generator | None) -> torch.Tensor:
    """:func:`sample_tokens` of arguments checked already (an engine's every step: :meth:`Engine._sampler`)."""
    if temperature < torch.finfo(torch.float32).tiny:  # (0, or so small it would be 0 in float32: x / 0 is NaN)
        return logits.argmax(-1)
    x = logits.float()
    top = x.amax(-1, keepdim=True)  # (NaN where the row holds one: amax propagates NaN)
    x = (x - top) / temperature  # (the largest at 0: a tiny temperature tends to greedy, no inf)
    neg = float("-inf")
    if top_k is not None and top_k < x.shape[-1]:
        kth = x.topk(top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, neg)
    if top_p is not None and top_p < 1.0:
        s, idx = x.sort(dim=-1, descending=True)
        p = s.softmax(-1)
        drop = (p.cumsum(-1) - p) >= top_p  # mass before a token already reaches top_p: outside the nucleus
        drop[..., 0] = False  # (the most likely token always stays: a top_p that is 0 in float32 kept none)
        x = torch.full_like(x, neg).scatter(-1, idx, s.masked_fill(drop, neg))
    probs = x.softmax(-1)
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    race.clamp_min_(torch.finfo(race.dtype).tiny)  # (a 0 draw, which some torch versions give, made p / 0 NaN: argmax's)
    greedy = (top.isnan() | top.isposinf()).squeeze(-1)  # (+inf or NaN in the row: every probability is NaN)
    return torch.where(greedy, logits.argmax(-1), (probs / race).argmax(-1))


def _check_output_logits(v) -> bool:
    """``output_logits`` (of :meth:`Engine.generate` / :meth:`Engine.stream`), checked: True or False."""
    if not isinstance(v, bool):
        raise ValueError(f"output_logits must be True or False, got {v!r}")
    return v


def _from_rank0(sampler: Callable[[torch.Tensor], torch.Tensor], tp) -> Callable[[torch.Tensor], torch.Tensor]:
    """``sampler`` whose tokens ``[B]`` are rank 0's on every rank of ``tp`` (one broadcast per step)."""
    return lambda logits: tp.broadcast_(sampler(logits).contiguous())


def _fingerprint(ids: torch.Tensor, mask: torch.Tensor, max_new_tokens, eos: tuple[int, ...]) -> list[int]:
    """The prompts' shape and a SHA-256 of the prompts, their mask and the stopping rules (four 56-bit ints): what
    two ranks given different inputs do not share.  (Until session 71 a few weighted sums, which other inputs could
    match: prompts [1, 2] and [3, 1], stop tokens [45, 126] and [95, 76].)"""
    limits = [max_new_tokens] if _is_int(max_new_tokens) else list(max_new_tokens)
    h = hashlib.sha256()
    for t in (ids, mask):
        h.update(f"{tuple(t.shape)}:{t.to('cpu', torch.int64).flatten().tolist()};".encode())
    h.update(f"{[int(n) for n in limits]};{[int(e) for e in eos]}".encode())
    d = h.digest()
    return [*ids.shape, *(int.from_bytes(d[i:i + 7], "little") for i in range(0, 28, 7))]


def _compared(request: "_Request | None") -> list[int]:
    """What tensor-parallel ranks compare of a request (:meth:`Engine._request`): its inputs' :func:`_fingerprint`,
    and the options that change the steps' collectives: ``per_step_sync`` (tokens handed over per step, ``stream()``
    or ``generate(on_token=...)``: a decode step more once every row has stopped, no stop flags read late) and
    ``output_logits`` (the batch is not compacted: larger all-reduces).  ``None`` (a call this rank refused): as
    many -1s, which no request's values (all >= 0) match."""
    if request is None:  # (as long as a request's: a fingerprint of any 2-D prompts, and the two options)
        one = torch.ones(1, 1, dtype=torch.long)
        return [-1] * (len(_fingerprint(one, one, 1, ())) + 2)
    limits = request.max_new_tokens if request.limits is None else request.limits
    return [*_fingerprint(request.ids, request.mask, limits, request.eos), int(request.per_step_sync),
            int(request.output_logits)]


def _autocast_off(device: torch.device):
    """A context that turns ``torch.autocast`` off for ``device``'s type where the caller has it on there (an engine
    computes in its own dtype, :attr:`Engine.dtype`: its cache, mask and RoPE tables are in it), else a null one
    (nothing entered: the host time of a step)."""
    kind = device.type
    if kind in ("cpu", "cuda") and torch.is_autocast_enabled(kind):
        return torch.autocast(kind, enabled=False)
    return contextlib.nullcontext()


def _device_current(device: torch.device):
    """A context that makes CUDA device ``device`` current where another one is (else a null one): CUDA graphs are
    captured on the current device's streams and CUDA events recorded on its current stream, so an engine on
    ``cuda:1`` driven while ``cuda:0`` was current captured its graphs on the wrong device (the flash-llm kernels,
    launched on ``cuda:1``'s stream, fell outside them) and timed another GPU's stream (session 88)."""
    if device.type == "cuda" and device.index is not None and torch.cuda.current_device() != device.index:
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _lagged_stop(device: torch.device) -> bool:
    """Whether a generation without streaming on ``device`` learns of its rows' stop :data:`EOS_LAG` steps late
    (:class:`_HostCopies`; CUDA), or reads it every step (a CPU: no synchronization to save)."""
    return device.type == "cuda" and HOST_COPIES


class _Request(NamedTuple):
    """A generation's checked arguments (:meth:`Engine._request`)."""

    sampler: Callable[[torch.Tensor], torch.Tensor]
    eos: tuple[int, ...]
    ids: torch.Tensor
    mask: torch.Tensor
    lengths: list[int]
    limits: list[int] | None
    max_new_tokens: int
    rng: "_Rng | None" = None  # the random stream sampling draws from (None: greedy)
    per_step_sync: bool = False  # tokens handed over per step (stream(), generate(on_token=...)): see Engine._steps
    output_logits: bool = False  # every step's logits kept


class _Rng:
    """The random stream a generation samples from: the caller's ``torch.Generator``, or the default one of
    ``device`` (``torch.manual_seed``'s).  :meth:`get_state` / :meth:`set_state` (host-side, no synchronization)
    let :meth:`Engine._steps` undo the draws of steps it launched past the end and then dropped (streaming learns of
    the end a step late, generate() on a GPU :data:`EOS_LAG` steps late), so a seed's stream is left where a CPU's
    generate() leaves it, and the next request draws the same numbers through every path."""

    def __init__(self, generator: torch.Generator | None, device: torch.device):
        self.generator, self.device = generator, device

    def get_state(self) -> torch.Tensor:
        if self.generator is not None:
            return self.generator.get_state()
        return torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else torch.get_rng_state()

    def set_state(self, state: torch.Tensor) -> None:
        if self.generator is not None:
            self.generator.set_state(state)
        elif self.device.type == "cuda":
            torch.cuda.set_rng_state(state, self.device)
        else:
            torch.set_rng_state(state)


class _HostCopies:
    """Device tensors of a generation's steps, copied to the host without stalling the device: at step ``i``
    :meth:`add` snapshots them (a copy on the current stream, so later in-place updates do not reach it) and copies
    the snapshots into fresh pinned memory on a side stream; :meth:`take` waits for step ``i``'s copies only.  Used
    for the rows' stop flags ``done [B]`` (read :data:`EOS_LAG` steps late: the device keeps the steps between
    queued) and, when streaming, each step's tokens (handed over once the next step is launched).  Until session 65
    the host synchronized with the device for both (every 16 steps / every step).  On a CPU, plain copies."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.pending: dict[int, tuple] = {}  # step -> (copied event or None, host tensors, device snapshots)

    def add(self, i: int, *tensors: torch.Tensor | None) -> None:
        """Step ``i``'s tensors (on the device; ``None`` passes through)."""
        snaps = [None if t is None else t.clone() for t in tensors]
        if not self.cuda:
            self.pending[i] = (None, snaps, None)
            return
        hosts = [None if t is None else torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in snaps]
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        with torch.cuda.stream(self.stream):
            for h, t in zip(hosts, snaps):
                if t is not None:
                    h.copy_(t, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self.stream)
        self.pending[i] = (copied, hosts, snaps)  # (the snapshots kept alive until copied)

    def take(self, i: int) -> list[torch.Tensor | None] | None:
        """Step ``i``'s tensors on the host (the caller's to keep), or None where step ``i`` was not added or was
        taken already."""
        entry = self.pending.pop(i, None)
        if entry is None:
            return None
        if entry[0] is not None:
            entry[0].synchronize()
        return entry[1]

    def close(self) -> None:
        """Wait for the copies still in flight, and forget them."""
        if self.cuda:
            self.stream.synchronize()
        self.pending.clear()


@dataclass
class Generation:
    """What :meth:`Engine.generate` returns.

    Attributes:
        tokens: ``[B, n]`` int64 (CPU) new tokens; after a row's end-of-sequence token (or its own token limit)
            the row holds the pad token (``n`` is the largest ``max_new_tokens`` unless every row stopped earlier).
        lengths: ``[B]`` int64 new tokens per row, its end-of-sequence token included.
        prompt_lengths: the real (unpadded) length of every prompt.
        ttft_s: time to first token: prefill plus the first sampling, seconds.
        step_s: seconds of each later decode step (one per token after the first, for the whole batch).
        logits: with ``output_logits=True``, ``[B, n, V]`` float32 (CPU): the logits each token was chosen from.
    """

    tokens: torch.Tensor
    lengths: torch.Tensor
    prompt_lengths: list[int]
    ttft_s: float
    step_s: list[float] = field(default_factory=list)
    logits: torch.Tensor | None = None

    def sequences(self) -> list[list[int]]:
        """New tokens of every row up to and including its end-of-sequence token."""
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths.tolist())]

    @property
    def tpot_s(self) -> float:
        """Median time per output token after the first (one decode step), seconds; NaN with one token."""
        return statistics.median(self.step_s) if self.step_s else math.nan

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens the decode steps produced per second: every row's tokens after its first, up to its end (EOS or
        its limit; the padding after it not counted), over the steps' time.  Where no row stopped early, batch x
        steps / their time.  NaN with one token."""
        t = sum(self.step_s)
        return (int(self.lengths.sum()) - len(self.lengths)) / t if t > 0 else math.nan

    @property
    def total_s(self) -> float:
        return self.ttft_s + sum(self.step_s)


#: ``Engine(fuse=None)`` fuses the elementwise kernels of CUDA models with at least this many parameters.
FUSE_MIN_PARAMETERS = 10**9


#: what ``Engine(delta_layout=)`` accepts
DELTA_LAYOUTS = ("auto", "keep", "dual")
#: what ``Engine(formats=)`` accepts: "auto" lays out every sparse layer (BitmapTiles ones re-encoded as DeltaRows,
#: Tiled-CSL ones taken into ``delta_layout``'s choice), "keep" only the DeltaRows ones, "dense" expands them all (the
#: fastest where there are no sparse kernels: the CPU)
ENGINE_FORMATS = ("auto", "keep", "dense")
#: ``delta_layout="auto"`` takes the parts layout up to this ``max_batch``, the split layout above (session 31); at
#: ``max_batch`` 2 only where the input is normed or K is within ``PARTS_MAX_K`` (session 35, H200, Llama-3-8B at 80 %:
#: Llama-3-8B's down, K = 14336, 41.9 us a call at 2 tokens in the parts layout against 21.7 split; so laid out, batch
#: 1 / 2 2.030 / 2.935 ms per token, the split layout's 2.939 at batch 2, its batch 1 about 2.2 since session 31)
DELTA_PARTS_MAX_BATCH = 2
#: ... and from this ``max_batch`` on re-encodes DeltaRows weights as Tiled-CSL where the device has the memory
#: (1.5x the bytes at 80 %).  Session 33 (H200, Llama-3-8B at 80 %, speedup over dense in each run): Tiled-CSL at batch
#: 2 / 4 / 8 / 16 1.35x / 1.35x / 1.37x / 1.26x; DeltaRows' split layout 1.60x / 1.24x / 0.89x (its multi-token
#: kernels multiply on CUDA cores, one column gathered per entry) and from batch 9 the expansion to dense.  Session 34
#: (H200, OPT-30B at 80 %): DeltaRows 2.05x / 1.53x / 1.50x / 0.84x at batch 2 / 3 / 4 / 8, Tiled-CSL 1.53x at 2 and 3,
#: 1.56x / 1.48x at 4 / 8 (calls D, F, G)
DELTA_TCSL_MIN_BATCH = env_int("FLASH_LLM_DELTA_TCSL_MIN_BATCH", 4, 1)
#: ``delta_layout="dual"`` serves steps of this many tokens and more on its Tiled-CSL copies, fewer on DeltaRows in the
#: batch-1 layout without the parts layout on the plain-input layers above ``PARTS_MAX_K`` (Llama-3-8B's down: its
#: multi-token parts kernels stage all of K, 57 KB at 2 tokens, and at 3-4 tokens no longer fit and read X from
#: global memory).  Session 35 (H200, Llama-3-8B at 80 %, one engine of max_batch 16, ms per token, dense 4.63 / 4.67
#: / 4.70): with down in the parts layout batch 1 / 2 / 3 2.000 / 3.563 / 11.922; without 2.030 / 2.935 / 4.049; the
#: split layout (max_batch 2, 3) 2.939 / 3.437; as chosen here (call C, another card) 2.029 / 2.899 / 3.525
DUAL_TCSL_MIN_BATCH = env_int("FLASH_LLM_DUAL_TCSL_MIN_BATCH", 3, 1)
#: what a layout choice returns for "re-encode as Tiled-CSL" (else the DeltaRows lanes a row)
TILED_CSL = "tiled-csl"
#: ... and for "re-encode as BitmapTiles": where the device lacks the memory for Tiled-CSL, an engine of at least
#: :data:`BITMAP_FALLBACK_MIN_BATCH` holds its DeltaRows layers as BitmapTiles (about the same bytes as plain DeltaRows
#: values: 0.54 against 0.52 bytes an element at 80 %), whose kernels take any batch in one pass, where DeltaRows'
#: multi-token kernels take 8 tokens a pass (``kernels.DELTA_MULTI_MAX``; up to ``DELTA_CHUNK_MAX`` in chunks) and
#: expand the weight above.  Session 66 (H200, OPT-175B at 80 %, whose Tiled-CSL needs 62 GiB more than the card has
#: beside the cache): batch 16 172.1 ms a token as DeltaRows, 102.4 as BitmapTiles (1.68x); batch 8 86.4 / 86.6
BITMAP = "bitmap"
#: (``FLASH_LLM_BITMAP_FALLBACK_MIN_BATCH``; a large value: never, the layers stay DeltaRows with a warning)
BITMAP_FALLBACK_MIN_BATCH = env_int("FLASH_LLM_BITMAP_FALLBACK_MIN_BATCH", 9, 1)
#: ... and for "hold the weight dense" (the layer becomes an ``nn.Linear``, cuBLAS): from
#: :data:`DELTA_TCSL_MIN_BATCH` on, where Tiled-CSL would take at least :data:`RELAYOUT_DENSE_SHARE` of the dense
#: weight's bytes (4 bytes a nonzero: about 55 % sparsity and denser), so the dense weight costs at most 1.11x
#: Tiled-CSL's memory (none more at 50 %) and runs at cuBLAS's speed (session 45, H200, Llama-3-8B at 50 %, batch 8 /
#: 32 / 64: Tiled-CSL 0.75x / 0.88x / 0.74x of dense, dense layers 1.00x / 1.00x / 1.01x)
DENSE = "dense"
#: (0.9: at 50 % Tiled-CSL's bytes are within 0.1 % of dense, either side, so 1.0 would be a coin toss; 0.9 holds
#: dense up to about 55 % sparsity, at most 1.11x Tiled-CSL's bytes; ``FLASH_LLM_RELAYOUT_DENSE_SHARE``, a large
#: value: never)
RELAYOUT_DENSE_SHARE = env_float("FLASH_LLM_RELAYOUT_DENSE_SHARE", 0.9, 0.0, 1.0)
#: ... and also, for an engine of at least this ``max_batch``, where the weight's density is at least
#: :data:`DENSE_FAST_MIN_DENSITY`: there the Tiled-CSL kernels run slower than cuBLAS on the dense weight, so the
#: engine holds the layer dense when the device has the memory (1.67x Tiled-CSL's bytes at 70 %), else Tiled-CSL.
#: Session 41's table of record (H200, Llama-3-8B / OPT-30B, Tiled-CSL against dense at batch 64): 80 % 1.01x / 1.01x,
#: 70 % 0.92x / 0.92x; session 41 / 37, 60 %: 0.84-0.85x.  ``FLASH_LLM_DENSE_FAST_MIN_BATCH``, a large value: never
DENSE_FAST_MIN_BATCH = env_int("FLASH_LLM_DENSE_FAST_MIN_BATCH", 64, 1)
#: (0.22: between 80 % (density 0.2, 1.01x) and 70 % (0.3, 0.92x) the ratio crosses 1.0 at about 0.21)
DENSE_FAST_MIN_DENSITY = env_float("FLASH_LLM_DENSE_FAST_MIN_DENSITY", 0.22, 0.0, 1.0)
#: free device memory ``delta_layout="auto"`` leaves beside the Tiled-CSL weights, the engine's cache and its prefill's
#: activations (:func:`_prefill_bytes`)
RELAYOUT_MARGIN_BYTES = 1 << 30


#: ``FLASH_LLM_PREFILL_TOKENS``: the most prompt tokens one prefill forward takes.  A larger batch of prompts runs in
#: chunks of whole rows (:func:`_prefill_rows`; a row longer than this alone), so the prefill's activations stay within
#: about this many tokens' (a batch of 64 prompts of 2048 tokens would otherwise hold Llama-3-8B's gate / up output of
#: 7.5 GB at once).  Each chunk writes its rows of the cache; the logits are the same to rounding.
PREFILL_TOKENS = env_int("FLASH_LLM_PREFILL_TOKENS", 8192, 1)


def prefill_bucket(p: int, limit: int | None = None) -> int:
    """The prompt length a graph-captured prefill pads ``p`` tokens to: ``p`` itself up to
    :data:`PREFILL_BUCKET_FROM`, above it the next multiple of an eighth of the power of two at or above ``p`` (four
    lengths an octave: 40, 48, 56, 64, 80, ..., 128, 160, ...; at most 25 % padding, about 10 % on average).  Where
    that exceeds ``limit`` (the longest padded prompt the cache holds with the new tokens), ``p``.

    A prefill of up to a few hundred tokens a batch reads each weight once whatever its length (the sparse weights are
    expanded once), so the padding costs little there (at thousands of tokens, its share of the arithmetic); the graph
    it replays saves the eager prefill's launches (about 35 of Llama-3-8B's 54 ms at 128 tokens, session 63) and a
    capture for each new length."""
    if p <= PREFILL_BUCKET_FROM:
        return p
    step = 1 << max(0, (p - 1).bit_length() - 3)
    q = -(-p // step) * step
    return p if limit is not None and q > limit else q


def decode_kv_len(n: int, slots: int) -> int:
    """The cache slots a decode step attends when its sequences hold ``n`` tokens (the step's own included) in a cache
    of ``slots``: with :data:`DECODE_KV_BUCKETS`, ``n`` rounded up to :data:`DECODE_KV_MIN` or the power of two above
    it, at most ``slots``; else ``slots``.  A decode graph serves every ``n`` of its length."""
    if not DECODE_KV_BUCKETS:
        return slots
    kv = DECODE_KV_MIN
    while kv < n:
        kv *= 2
    return min(kv, slots)


def _prefill_rows(batch: int, prompt_len: int) -> int:
    """The prompts (rows) one prefill forward takes for ``batch`` prompts of ``prompt_len`` tokens: as many as fit
    :data:`PREFILL_TOKENS`, at least one."""
    return max(1, min(batch, PREFILL_TOKENS // max(1, prompt_len)))


def _prefill_bytes(cfg, max_batch: int, max_seq: int) -> int:
    """An upper bound of a prefill's activations (bytes) in an engine of ``max_batch`` x ``max_seq`` tokens: the
    largest forward it runs (a chunk of :func:`_prefill_rows`, at most ``max(PREFILL_TOKENS, max_seq)`` tokens), 4
    bytes a token for each of the MLP's intermediate columns and four times the hidden size.  (Session 50, H200:
    OPT-30B dense at batch 64, prompt 128, peaked 1.5 GiB above its weights and cache, about 190 KB a token against
    this bound's 229; the relayout's memory check had left it 1 GiB, so under an H100's 79.6 GiB its 70 % weights made
    dense ran out of memory in the prefill.)"""
    tokens = min(max_batch * max_seq, max(PREFILL_TOKENS, max_seq))
    return tokens * (cfg.intermediate_size + 4 * cfg.hidden_size) * 4


#: the device types on which ``delta_layout="auto"`` / ``"dual"`` re-encode (the CPU reference computes through the
#: dense weight, so no layout is faster there; the tests add "cpu" to run the same path)
RELAYOUT_DEVICES = ("cuda",)


def _free_memory(device: torch.device) -> int:
    """Bytes this process can still allocate on ``device`` (:func:`~flash_llm.models.synthetic.available_memory`)."""
    from .models.synthetic import available_memory

    return available_memory(device)


def _cache_room(device: torch.device) -> int:
    """Bytes the KV cache may take on ``device``, checked before it is allocated: the free memory as it is (apart from
    :func:`_free_memory`, which the engine's plans read and tests stand in for)."""
    from .models.synthetic import available_memory

    return available_memory(device)


def _undo_engine_changes(model: torch.nn.Module, merged: dict[str, str], was_fused: list,
                         was_training: dict[str, bool]) -> str:
    """Put ``model`` back as it was before an :class:`Engine` whose cache could not be allocated: every module's
    ``fused`` switch as ``was_fused`` holds it, the groups that engine's ``merge_projections`` stacked (``merged``'s
    ``"merged"`` entries) split back, and every module's training flag as ``was_training`` (by path) holds it.  Only
    those groups: groups merged before the engine stay merged, their hooks too (:func:`unmerge_projections` would
    split every group and refuses one with hooks, so ``only=``: that refusal hid the out-of-memory error).
    Never raises, so the caller's error is the one raised: returns ``""``, or what could not be undone (a split that
    fails for memory, say) as a note for that error's message."""
    for m, on in was_fused:
        m.fused = on
    mine = {p for p, how in merged.items() if how == "merged"}
    note = ""
    if mine:
        try:
            unmerge_projections(model, only=mine)
        except Exception as e:  # (the split layers are new memory: out of memory too, perhaps)
            note = (f"; the projections merge=True stacked could not all be split back ({type(e).__name__}: {e}): "
                    "flash_llm.models.unmerge_projections(model) splits them")
    for path, m in model.named_modules():  # (by path: the split layers are new modules at the old paths)
        if path in was_training:
            m.training = was_training[path]
    return note


def _was_delta_rows(m: torch.nn.Module) -> bool:
    """Whether ``m`` (a :class:`~flash_llm.SparseLinear`) holds a Tiled-CSL weight an engine re-encoded from
    DeltaRows (it remembers the pairing in ``_delta_rows_paired``)."""
    from .formats import TiledCSL

    return getattr(m, "weight_format", None) is TiledCSL and getattr(m, "_delta_rows_paired", None) is not None


def _bitmap_from_delta_rows(m: torch.nn.Module) -> bool:
    """Whether ``m`` (a :class:`~flash_llm.SparseLinear`) holds a BitmapTiles weight an engine re-encoded from
    DeltaRows (:data:`BITMAP`; it remembers the pairing in ``_delta_rows_paired``)."""
    from .formats import BitmapTiles

    return getattr(m, "weight_format", None) is BitmapTiles and getattr(m, "_delta_rows_paired", None) is not None


def _dense_from_delta_rows(m: torch.nn.Module) -> bool:
    """Whether ``m`` is an ``nn.Linear`` an engine made from a DeltaRows layer (:data:`DENSE`; it remembers the
    pairing in ``_delta_rows_paired``)."""
    return isinstance(m, torch.nn.Linear) and getattr(m, "_delta_rows_paired", None) is not None


def _nnz(m: torch.nn.Module) -> int:
    """The nonzeros of a :class:`~flash_llm.SparseLinear`'s weight, or of an ``nn.Linear``'s (counted)."""
    from .formats._base import count_nonzero

    return m.nnz if hasattr(m, "nnz") else count_nonzero(m.weight)


def _dense_bytes(m: torch.nn.Module) -> int:
    """The bytes of layer ``m``'s weight dense (a :class:`~flash_llm.SparseLinear` or an ``nn.Linear``)."""
    dtype = m.weight_dtype if hasattr(m, "weight_dtype") else m.weight.dtype
    return m.out_features * m.in_features * dtype.itemsize


def _tiled_csl_bytes(m: torch.nn.Module) -> int:
    """The Tiled-CSL bytes of layer ``m``'s weight (its formula, with the tiles' rounding of their entries)."""
    from .models.synthetic import tiled_csl_formula_bytes

    tiles = math.ceil(m.out_features / 64) * math.ceil(m.in_features / 64)
    return int(tiled_csl_formula_bytes(m.out_features, m.in_features, _nnz(m))) + 8 * tiles


def _to_bitmap(m: torch.nn.Module) -> str:
    """The layout choice of an engine that holds its DeltaRows layers as BitmapTiles (:data:`BITMAP`)."""
    return BITMAP


def _bitmap_bytes(m: torch.nn.Module) -> int:
    """The BitmapTiles bytes of layer ``m``'s weight (its formula, with each strip's values rounded to 16 bytes)."""
    from .models.synthetic import bitmap_formula_bytes

    strips = math.ceil(m.out_features / 16) * math.ceil(m.in_features / 64)
    return int(bitmap_formula_bytes(m.out_features, m.in_features, _nnz(m))) + 16 * strips


def _large_batch_format(m: torch.nn.Module, max_batch: int = 0) -> str:
    """:data:`TILED_CSL`, or :data:`DENSE` where Tiled-CSL would take :data:`RELAYOUT_DENSE_SHARE` of the dense
    weight's bytes or more, or, for an engine of ``max_batch`` :data:`DENSE_FAST_MIN_BATCH` or more, where the weight's
    density is :data:`DENSE_FAST_MIN_DENSITY` or more (there cuBLAS on the dense weight is the faster)."""
    if max_batch >= DENSE_FAST_MIN_BATCH and _nnz(m) >= DENSE_FAST_MIN_DENSITY * m.out_features * m.in_features:
        return DENSE
    return DENSE if _tiled_csl_bytes(m) >= RELAYOUT_DENSE_SHARE * _dense_bytes(m) else TILED_CSL


def _set_module(model: torch.nn.Module, path: str, new: torch.nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, new)


def _kept_for_hooks(m: torch.nn.Module, path: str, hooked: dict[str, str] | None) -> bool:
    """Whether layer ``m`` (at ``path``) carries what a new module put in its place would drop (its hooks, a
    ``forward`` replaced on the instance or overridden by its class: ``flash_llm.models._merge._dropped``; submodules
    or tensors of its own beyond the weight and bias: ``_own_members``), so the engine's module-swapping paths leave
    it as it is; if so, and ``hooked`` is a dict, it records ``{path: what}`` there."""
    extra = _own_members(m)
    what = " and ".join(_dropped(m) + ([] if extra is None else [extra]))
    if what and hooked is not None:
        hooked[path] = what
    return bool(what)


def _hooked_now(m: torch.nn.Module, path: str) -> bool:
    """:func:`_kept_for_hooks` for the weights check at each generation's start (:meth:`Engine._follow_weights`):
    first the cheap test that a plain ``SparseLinear`` / ``nn.Linear`` carries no hook, no ``forward`` of its own and
    no member beyond its arrays and bias (about 0.5 us), else the full one (4 us a layer, with its reasons)."""
    from .nn import _HOOKS, SparseLinear

    d = m.__dict__
    kind = type(m)
    if kind is SparseLinear:  # (its arrays and its bias are buffers, as _extra_members reads a layer's own tensors)
        own = (not d["_parameters"] and "bias" in d["_buffers"]
               and len(d["_buffers"]) == len(m.weight_format._arrays) + 1)
    else:
        own = kind is torch.nn.Linear and d["_parameters"].keys() <= {"weight", "bias"} and not d["_buffers"]
    if (own and not d["_modules"] and "forward" not in d
            and not any(d.get(a) for _, attrs in _HOOKS for a in attrs)):
        return False
    return _kept_for_hooks(m, path, None)


def _gate_up_layers(model: torch.nn.Module) -> set[int]:
    """The ``id`` of the stacked layer of every merged gate / up projection of ``model`` (``merge_projections``
    pairs its halves: DeltaRows encodes them so for the SiLU x up inside its kernels)."""
    from .models._merge import MergedLinear

    return {id(m.layer) for path, m in model.named_modules()
            if isinstance(m, MergedLinear) and path.rsplit(".", 1)[-1] == "gate_up_proj"}


def _pairing(m: torch.nn.Module, gate_up: set[int]) -> bool:
    """Whether sparse layer ``m`` holds (or, in DeltaRows, would hold) paired halves: a DeltaRows weight's own pairing;
    the pairing a layer an engine re-encoded remembers (``_delta_rows_paired``); else, as ``DeltaRows.concat`` pairs
    them, a merged gate / up (``gate_up``: :func:`_gate_up_layers`) of halves of whole slices."""
    from .formats import DeltaRows
    from .formats.delta_rows import LANES

    if getattr(m, "weight_format", None) is DeltaRows:
        return m.weight.paired
    if getattr(m, "_delta_rows_paired", None) is not None:
        return m._delta_rows_paired
    return id(m) in gate_up and m.out_features % (2 * LANES) == 0


def adopt_formats(model: torch.nn.Module, target: str = "delta-rows", budget: int | None = None,
                  progress: bool = True, parts: Callable[[torch.nn.Module], int] | None = None
                  ) -> tuple[dict[str, str], list[str]]:
    """Make every sparse layer of ``model`` one that :func:`relayout_delta_rows` lays out (``Engine(formats="auto")``),
    in place: each Tiled-CSL :class:`~flash_llm.SparseLinear` is marked as a layout an engine may change
    (``_delta_rows_paired``, as the Tiled-CSL layers an engine makes from DeltaRows), and each
    :class:`~flash_llm.BitmapTiles` one (not those an engine made from DeltaRows, :data:`BITMAP`:
    :func:`relayout_delta_rows` lays them out as the DeltaRows layers they were) is re-encoded as ``target``:
    ``"delta-rows"`` (the format of batch 1-3; its halves paired where it is a merged gate / up) or ``"tiled-csl"``
    (of batch 4 and more; marked so), the same nonzeros and bias, one layer at a time through its dense weight.
    ``budget``: the bytes the re-encoding may add (the target's formula bytes, DeltaRows at its widest parts layout,
    against the layers' present bytes, plus the largest layer's temporaries: 4x its dense weight); ``None``: no limit.
    Over it the BitmapTiles layers stay as they are.  ``parts``: DeltaRows' lanes a row for a layer (the engine's
    layout, so :func:`relayout_delta_rows` need not encode it again; default: the encoder's).  Returns ``({layer path:
    "bitmap" or "tiled-csl"}`` for the layers taken over, ``[why BitmapTiles layers were left as they are]``)."""
    from tqdm import tqdm

    from .formats import BitmapTiles, DeltaRows, TiledCSL
    from .models.synthetic import delta_rows_formula_bytes
    from .nn import SparseLinear

    if target not in ("delta-rows", TILED_CSL):
        raise ValueError(f"target must be 'delta-rows' or {TILED_CSL!r}, got {target!r}")
    pairs = _gate_up_layers(model)
    taken, bitmap = {}, []
    for path, m in model.named_modules():
        if not isinstance(m, SparseLinear):
            continue
        if m.weight_format is TiledCSL and getattr(m, "_delta_rows_paired", None) is None:
            m._delta_rows_paired = _pairing(m, pairs)
            taken[path] = "tiled-csl"
        elif m.weight_format is BitmapTiles and not _bitmap_from_delta_rows(m):  # (an engine's: relayout's to lay out)
            bitmap.append((path, m))
    if not bitmap:
        return taken, []
    if target == TILED_CSL:
        grow = sum(_tiled_csl_bytes(m) - m.nbytes for _, m in bitmap)
    else:
        grow = sum(max(delta_rows_formula_bytes(m.out_features, m.in_features, m.nnz, p) for p in (1, 16))
                   - m.nbytes for _, m in bitmap)
    need = max(grow, 0) + 4 * max(_dense_bytes(m) for _, m in bitmap)
    name = "Tiled-CSL" if target == TILED_CSL else "DeltaRows"
    if budget is not None and need > budget:
        return taken, [f"{len(bitmap)} BitmapTiles layer(s) stay BitmapTiles: as {name} they would need "
                       f"{need / 2**30:.2f} GiB more, of {budget / 2**30:.2f} GiB to spare"]
    left = []
    bar = tqdm(total=len(bitmap), desc=f"BitmapTiles to {name}", unit="layer", file=sys.stderr, leave=False,
               disable=not progress or len(bitmap) < 2, dynamic_ncols=True)
    for path, m in bitmap:
        paired = _pairing(m, pairs)
        try:
            w = m.to_dense()
            m._replace_weight(TiledCSL.from_dense(w) if target == TILED_CSL else DeltaRows.from_dense(
                w, pair_halves=paired, parts=None if parts is None else int(parts(m))))
            # (marked as an engine's Tiled-CSL; a DeltaRows layer carries no mark, whatever the BitmapTiles one had)
            m._delta_rows_paired = paired if target == TILED_CSL else None
            taken[path] = "bitmap"
        except ValueError as e:  # (FormatError too: a shape the format refuses; the layer keeps its weight, named)
            left.append(f"{path}: {e}")
        w = None
        bar.update()
    bar.close()
    return taken, left


def expand_sparse_(model: torch.nn.Module, budget: int | None = None,
                   hooked: dict[str, str] | None = None) -> tuple[list[str], list[str]]:
    """Put a dense ``nn.Linear`` (the same weight and bias, no gradient) in the place of every
    :class:`~flash_llm.SparseLinear` of ``model``, in place (``Engine(formats="dense")``): on a CPU, where
    ``flash_llm.spmm``'s reference expands the weight on every call, a decode step runs tens of times faster so.  Each
    dense layer remembers its DeltaRows pairing (``_delta_rows_paired``), so an engine on a GPU later makes it sparse
    again (:func:`relayout_delta_rows`).  A layer with hooks, a ``forward`` replaced on the instance or overridden by
    its class (a subclass), or submodules or tensors of its own beyond the weight and bias, which the new module would
    drop, stays as it is (compressed, its hooks and forward run); ``hooked``, where a dict, gets ``{its path: what it
    carries}``.  ``budget``: the bytes the expansion may add (the dense weights less the compressed ones); over it
    nothing is expanded.  Returns ``([the layers expanded], [why none was])``."""
    from .nn import SparseLinear

    layers = [(p, m) for p, m in model.named_modules()
              if isinstance(m, SparseLinear) and not _kept_for_hooks(m, p, hooked)]
    if not layers:
        return [], []
    pairs = _gate_up_layers(model)
    grow = sum(_dense_bytes(m) - m.nbytes for _, m in layers)
    if budget is not None and grow > budget:
        return [], [f"{len(layers)} sparse layer(s) stay compressed: dense they would take {grow / 2**30:.2f} GiB "
                    f"more, of {budget / 2**30:.2f} GiB to spare"]
    for path, m in layers:
        new = m.to_linear()
        new.requires_grad_(False)
        new._delta_rows_paired = bool(_pairing(m, pairs))
        _set_module(model, path, new)
    return [p for p, _ in layers], []


def relayout_delta_rows(model: torch.nn.Module, parts: Callable[[torch.nn.Module], int | str],
                        progress: bool = True, hooked: dict[str, str] | None = None) -> dict[str, int | str]:
    """Re-encode, in place, every DeltaRows :class:`~flash_llm.SparseLinear` of ``model`` (and every layer an earlier
    call turned from DeltaRows into Tiled-CSL, BitmapTiles or dense) whose layout differs from ``parts(layer)``: 1 for
    the split layout; 2, 4, 8, 16 for the parts layout (``docs/formats.md`` section 4b); :data:`TILED_CSL` for a
    Tiled-CSL weight; :data:`BITMAP` for a BitmapTiles one; :data:`DENSE` for an ``nn.Linear`` put in the layer's place
    (the layer remembers it was DeltaRows, and whether its halves were paired, so a later call can turn it back). The
    same nonzeros and bias; one layer at a time, through its dense weight (the peak grows by one dense weight and the
    encoder's temporaries); ``progress``: a tqdm bar (stderr) when there are two or more. A layer with hooks, a
    ``forward`` replaced on the instance or overridden by its class, or submodules or tensors of its own beyond the
    weight and bias is re-encoded in place only: where the layout asked for would put a new
    module in its place (a ``SparseLinear`` as :data:`DENSE`, an ``nn.Linear`` as anything else), dropping them, it
    stays as it is (``hooked``, where a dict, gets ``{its path: what it carries}``). Returns ``{layer path: new
    lanes a row, TILED_CSL, BITMAP or DENSE}`` for the layers re-encoded. Captured CUDA graphs of the old arrays go
    stale: :class:`Engine` notices and captures again."""
    from tqdm import tqdm

    from .formats import BitmapTiles, DeltaRows, TiledCSL
    from .nn import SparseLinear

    todo = []
    for path, m in model.named_modules():
        if _dense_from_delta_rows(m):
            now = DENSE
        elif _bitmap_from_delta_rows(m):
            now = BITMAP
        elif isinstance(m, SparseLinear) and (m.weight_format is DeltaRows or _was_delta_rows(m)):
            now = m.weight.parts if m.weight_format is DeltaRows else TILED_CSL
        else:
            continue
        want = parts(m)
        if want != now and not ((want == DENSE or now == DENSE) and _kept_for_hooks(m, path, hooked)):
            todo.append((path, m, want))
    done = {}
    bar = tqdm(total=len(todo), desc="DeltaRows layout", unit="layer", file=sys.stderr, leave=False,
               disable=not progress or len(todo) < 2, dynamic_ncols=True)
    todo.reverse()
    while todo:
        # (popped: once a layer is replaced nothing here holds its old weight, so the peak grows by one layer's
        # temporaries, not by every old weight at once, as the memory check counts)
        path, m, want = todo.pop()
        sparse = isinstance(m, SparseLinear)
        paired = m.weight.paired if sparse and m.weight_format is DeltaRows else m._delta_rows_paired
        if want == DENSE:
            new = m.to_linear()
            new.requires_grad_(False)
        else:
            w = m.to_dense() if sparse else m.weight.detach()
            fmt = (TiledCSL.from_dense(w) if want == TILED_CSL else BitmapTiles.from_dense(w) if want == BITMAP
                   else DeltaRows.from_dense(w, pair_halves=paired, parts=int(want)))
            if sparse:
                m._replace_weight(fmt)
                new = m
            else:
                new = SparseLinear(fmt, None if m.bias is None else m.bias.detach())
        new._delta_rows_paired = paired if want in (TILED_CSL, BITMAP, DENSE) else None
        if new is not m:
            _set_module(model, path, new)
        done[path] = want
        del m, new
        w = fmt = None
        bar.update()
    bar.close()
    return done


#: up to ``max_batch`` 3 ``Engine(delta_layout="auto")`` also codes the values of its bf16 DeltaRows layers
#: (:meth:`~flash_llm.DeltaRows.code_values`: 2 bytes an entry instead of 2.5, the same bits) where every row allows
#: it; ``FLASH_LLM_DELTA_CODED=0`` keeps the plain values.  Session 54 (H200, Llama-3-8B bf16, batch 1, one run):
#: 80 % 2.000 -> 1.927 ms per token, 70 % 2.448 -> 2.346, weights 5.54 -> 4.85 GiB at 80 %
#: (``benchmarks/RESULTS.md``; per layer ``benchmarks/dr_coded.py``: 47.5 -> 45.2 us)
DELTA_CODED = env_flag("FLASH_LLM_DELTA_CODED", True)
#: ... up to this ``max_batch`` (``FLASH_LLM_DELTA_CODED_MAX_BATCH``; DeltaRows serves batches 1-3, Tiled-CSL from 4).
#: Session 54 (H200, Llama-3-8B bf16, one run, ms per token plain -> coded): batch 2 80 % 2.864 -> 2.806, 70 % 3.452
#: -> 3.381; batch 3 80 % 3.214 -> 3.181, 70 % 3.840 -> 3.819
DELTA_CODED_MAX_BATCH = env_int("FLASH_LLM_DELTA_CODED_MAX_BATCH", 3, 0)


def code_delta_rows(model: torch.nn.Module) -> list[str]:
    """Code the values of every bf16 DeltaRows :class:`~flash_llm.SparseLinear` of ``model`` in place
    (:meth:`~flash_llm.DeltaRows.code_values`), where possible; returns the paths of the layers coded.  Coded weights
    run DeltaRows' kernels of 1-8 tokens (the same bits as the plain values); more tokens expand them (prefill)."""
    from .formats import DeltaRows
    from .nn import SparseLinear

    done = []
    for path, m in model.named_modules():
        if isinstance(m, SparseLinear) and m.weight_format is DeltaRows and not m.weight.coded:
            coded = m.weight.code_values()
            if coded is not None:
                m._replace_weight(coded)
                done.append(path)
    return done


def _small_chunks_from(model: torch.nn.Module) -> int | None:
    """The batch from which the decode attention of an engine over ``model`` attends in 32-slot chunks
    (``Attend.small_chunks_from``): 1 where every projection is dense or DeltaRows with plain values, else ``None``
    (the kernel's default, ``kernels.DECODE_ATTN_C32_MIN_BATCH``).  Session 58 (H200, Llama-3-8B at 80 %, batch 1,
    ms per token): beside plain DeltaRows values 1.937 -> 1.901 (fp16) and 1.939 -> 1.920 (bf16), dense 4.583 ->
    4.560; beside coded values 1.881 -> 1.917; Bitmap and Tiled-CSL not measured."""
    from .formats import DeltaRows
    from .nn import SparseLinear

    for m in model.modules():
        if isinstance(m, SparseLinear) and (m.weight_format is not DeltaRows or m.weight.coded):
            return None
    return 1


def _submodule(model: torch.nn.Module, path: str) -> torch.nn.Module | None:
    """The module at ``path`` in ``model``, or None where the path no longer exists (the projection merged into another
    by ``merge_projections``, say)."""
    m = model  # (through the ``_modules`` dicts: ``get_submodule``'s attribute lookups were half of each
    for name in path.split(".") if path else ():  # generation start's weights check, session 87)
        m = m._modules.get(name)
        if m is None:
            return None
    return m


def _holds(m: torch.nn.Module, w) -> bool:
    """Whether layer ``m`` (a :class:`~flash_llm.SparseLinear`) holds the arrays of the compressed weight ``w``: the
    very tensors (a state dict loaded into the layer, or another engine's re-encoding, puts new ones in)."""
    return m.weight_format is type(w) and all(m._buffers.get("weight_" + n) is t for n, t in w.tensors().items())


def _versions(lin: torch.nn.Linear) -> tuple[tuple[int, int], ...]:
    """The identities and version counters of a copy's parameters: an in-place write into them (a state dict loaded
    into the model while the copy stood at the layer's path) moves a counter, a parameter replaced (``assign=True``,
    ``copy.bias = ...``; until session 87 unseen, and the next small step swapped the old one back) an identity."""
    return tuple((id(t), _version(t)) for t in lin.parameters())


def _version(t: torch.Tensor) -> int:
    """``t._version``; -1 for an inference tensor (made under ``torch.inference_mode()``), which keeps none."""
    return -1 if t.is_inference() else t._version


def _bias_key(m: torch.nn.Module) -> tuple[int, int] | None:
    """Layer ``m``'s bias as a dense copy made from it depends on it: its identity and version counter (a bias
    replaced, or written in place: ``load_state_dict`` without ``assign``, ``bias.copy_``; until session 87 only a
    replaced one was seen, and the copies ran the old bias), None without one."""
    b = m.bias
    return None if b is None else (id(b), _version(b))


def _swap_module(model: torch.nn.Module, path: str, layer: torch.nn.Module, copy: torch.nn.Module,
                 to_copy: bool) -> None:
    """Put ``copy`` (``to_copy``) or ``layer`` at ``path`` in ``model``, where one of the two is there (else the
    model changed under the engine, and nothing is touched: also where the path no longer exists, the projection
    merged by another engine or ``merge_projections``; until session 86 that raised a bare AttributeError)."""
    now, want = _submodule(model, path), copy if to_copy else layer
    if now is not None and now is not want and (now is layer or now is copy):
        _set_module(model, path, want)


class _TwoLayouts:
    """``Engine(delta_layout="dual")``'s two encodings of a model's DeltaRows layers: the layers' own DeltaRows
    weights for steps of fewer than ``min_tokens`` tokens, copies (made here, one layer at a time through its dense
    weight) from ``min_tokens`` on: Tiled-CSL, or a dense ``nn.Linear`` put in the layer's place where Tiled-CSL
    would be no smaller (:func:`_large_batch_format`, as ``"auto"`` holds them: about 55 % sparsity and denser).
    :meth:`install` puts one set into the model (the layers' buffers, or the modules at their paths: no copy); both
    stay alive here, so a CUDA graph captured over either keeps reading valid memory.  A layer whose copy would be
    dense but which carries hooks, a ``forward`` replaced on the instance or overridden by its class, or members of its
    own (:func:`_kept_for_hooks`: the copy in its place would drop them) gets no copy: it keeps its DeltaRows weight
    for every step (:attr:`hooked`: ``{its path: what it carries}``).  Where a layer no longer holds either set (a state
    dict loaded into the model) or is no longer at its path (merged), :meth:`stale` says so and the engine remakes or
    drops its copy (:meth:`Engine._follow_weights`); :meth:`install` never puts an array into such a layer."""

    def __init__(self, model: torch.nn.Module, min_tokens: int, progress: bool = True):
        from tqdm import tqdm

        from .formats import DeltaRows
        from .nn import SparseLinear

        self.min_tokens, self.model = min_tokens, model
        #: the layers left without a copy for their hooks: {path: what a dense copy in their place would drop}
        self.hooked: dict[str, str] = {}
        #: {layer: its path in the model}
        self.paths = {m: p for p, m in model.named_modules()
                      if isinstance(m, SparseLinear) and m.weight_format is DeltaRows
                      and not (_large_batch_format(m) == DENSE and _kept_for_hooks(m, p, self.hooked))}
        self.small: dict[torch.nn.Module, object] = {}  # DeltaRows (over the layers' own arrays)
        #: {layer: its Tiled-CSL copy, or the nn.Linear that takes its place}
        self.large: dict[torch.nn.Module, object] = {}
        #: {layer: its bias and, for a dense copy, the copy's version counters, when the copy was made}
        self.made: dict[torch.nn.Module, tuple] = {}
        for m in tqdm(list(self.paths), desc="Tiled-CSL copies", unit="layer", file=sys.stderr, leave=False,
                      disable=not progress or len(self.paths) < 2, dynamic_ncols=True):
            self._copy(m)
        self.nbytes = self._bytes()

    def _copy(self, m: torch.nn.Module) -> None:
        """Make layer ``m``'s copy from the DeltaRows weight it holds now, which becomes its smaller steps' set."""
        from .formats import TiledCSL

        self.small[m] = m.weight
        if _large_batch_format(m) == DENSE:
            lin = m.to_linear()
            lin.requires_grad_(False)
            lin._delta_rows_paired = self.small[m].paired
            self.large[m] = lin
        else:
            self.large[m] = TiledCSL.from_dense(self.small[m].to_dense())
        self.made[m] = (_bias_key(m), _versions(lin) if isinstance(self.large[m], torch.nn.Linear) else ())

    def _bytes(self) -> int:
        return sum(_dense_bytes(m) if isinstance(w, torch.nn.Linear) else w.nbytes for m, w in self.large.items())

    def copy_bytes(self, m: torch.nn.Module) -> int:
        """The bytes of layer ``m``'s copy."""
        w = self.large[m]
        return _dense_bytes(m) if isinstance(w, torch.nn.Linear) else w.nbytes

    def stale(self) -> tuple[list[torch.nn.Module], list[torch.nn.Module]]:
        """``(changed, gone)``: the layers that hold neither set's arrays (a state dict loaded into the model, another
        engine's re-encoding), or whose dense copy holds another bias than the layer's (a Tiled-CSL copy uses the
        layer's own bias, so a new one changes neither set: until session 87 it read as a change, which dropped the
        copies and left a layer holding the Tiled-CSL set with it for good) or which has hooks now
        (:func:`_kept_for_hooks`: registered after the engine was built, which its dense copy in its place would not
        run), and the layers no longer at their paths (merged, replaced) or whose dense copy was written into in place,
        given new parameters or hooks where it stood at the path (session 87: the next small step put the layer back,
        dropping them)."""
        changed, gone = [], []
        for m, path in self.paths.items():
            w, (bias, versions) = self.large[m], self.made[m]
            dense = isinstance(w, torch.nn.Linear)
            now = _submodule(self.model, path)
            if (now is not m and not (dense and now is w)) or (dense and (_versions(w) != versions
                                                                         or _hooked_now(w, path))):
                gone.append(m)
            elif ((dense and (_bias_key(m) != bias or _hooked_now(m, path)))
                  or not (_holds(m, self.small[m]) or (not dense and _holds(m, w)))):
                changed.append(m)
        return changed, gone

    def forget(self, layers, rebuild=()) -> None:
        """Drop the copies of ``layers`` (those :meth:`stale` found), each layer put back at its path where its dense
        copy stands there (not for a layer gone: nothing is touched), and remake those of ``rebuild`` from the
        DeltaRows weights the layers hold now."""
        for m in layers:
            w = self.large.pop(m)
            if isinstance(w, torch.nn.Linear) and _versions(w) == self.made[m][1] and not _hooked_now(
                    w, self.paths[m]):  # (a copy the user changed at the path stays there)
                _swap_module(self.model, self.paths[m], m, w, False)
            del w, self.small[m], self.made[m]
        for m in rebuild:
            self._copy(m)
        for m in layers:
            if m not in self.large:
                del self.paths[m]
        self.nbytes = self._bytes()

    def install(self, tokens: int) -> None:
        """Put the set for a step of ``tokens`` tokens into the model (nothing to do when it is there; nor for a layer
        that holds neither set: the model changed under the engine, :meth:`stale`)."""
        large = tokens >= self.min_tokens
        for m, w in self.large.items():
            if isinstance(w, torch.nn.Linear):
                _swap_module(self.model, self.paths[m], m, w, large)
                continue
            w, other = (w, self.small[m]) if large else (self.small[m], w)
            data = m._buffers.get("weight_data")
            if data is not w.tensors()["data"] and data is other.tensors()["data"]:
                m._replace_weight(w)
                m._delta_rows_paired = self.small[m].paired if large else None

    def swapped(self) -> set[int]:
        """The ``id`` of every tensor an :meth:`install` moves in or out of the model: the DeltaRows layers' arrays,
        and where a dense copy takes a layer's place, the layer's bias and the copy's parameters."""
        ids = {id(t) for m in self.small for n, t in m._buffers.items() if n.startswith("weight_")}
        for m, w in self.large.items():
            if isinstance(w, torch.nn.Linear):
                ids.update(id(t) for t in (m.bias, *w.parameters()) if t is not None)
        return ids

    def tensors(self) -> list[torch.Tensor]:
        """Every array of both sets (and the biases of the layers whose dense copy takes their place)."""
        out = [t for w in self.small.values() for t in w.tensors().values()]
        for m, w in self.large.items():
            if isinstance(w, torch.nn.Linear):
                out += [t for t in (*w.parameters(), m.bias) if t is not None]
            else:
                out += w.tensors().values()
        return out


#: ``Engine(prefill_dense=True)`` runs a prefill forward of at least this many tokens on the dense copies (below it
#: the sparse kernels run: DeltaRows' multi-token kernels take up to 16 tokens, :data:`kernels.DELTA_CHUNK_MAX`)
PREFILL_DENSE_MIN_TOKENS = 17


class _DenseCopies:
    """``Engine(prefill_dense=True)``: a dense ``nn.Linear`` copy of the model's sparse layers, put in each layer's
    place for the prefill's forwards of at least ``min_tokens`` tokens, so the prompt runs on cuBLAS as a dense model
    does instead of expanding every weight (the sparse prefill's cost: Llama-3-8B at 80 % 19.0 against 6.2 ms dense,
    session 63).  Made one layer at a time, largest first, while they fit in ``budget`` bytes; the layers left keep
    the expansion.  :meth:`install` swaps the modules at their paths (no copy); both stay alive here, so a graph
    captured over either keeps reading valid memory.  A layer with hooks, a ``forward`` replaced on the instance or
    overridden by its class, or members of its own (:func:`_kept_for_hooks`), which the copy in its place would drop,
    gets no copy (:attr:`hooked`): its prefill runs on it, hooks and all.  Where a layer no longer holds the weight its
    copy was made from (a state dict loaded into the model) or is no longer at its path (merged), :meth:`stale` says
    so and the engine remakes or drops its copy (:meth:`Engine._follow_weights`)."""

    def __init__(self, model: torch.nn.Module, min_tokens: int, budget: int, progress: bool = True,
                 skip: frozenset | set = frozenset()):
        from tqdm import tqdm

        from .nn import SparseLinear

        self.model, self.min_tokens = model, min_tokens
        #: the layers left without a copy for their hooks: {path: what a dense copy in their place would drop}
        self.hooked: dict[str, str] = {}
        # (skip: layers that hold a dense copy already, delta_layout="dual"'s for its larger steps)
        layers = sorted(((p, m) for p, m in model.named_modules() if isinstance(m, SparseLinear) and m not in skip
                         and not _kept_for_hooks(m, p, self.hooked)),
                        key=lambda pm: -_dense_bytes(pm[1]))
        #: {layer: its path}, {layer: its dense copy}; the layers left without one (their paths)
        self.paths: dict[torch.nn.Module, str] = {}
        self.copies: dict[torch.nn.Module, torch.nn.Linear] = {}
        #: {layer: the weight, bias and copy's version counters its copy was made from}
        self.made: dict[torch.nn.Module, tuple] = {}
        self.left: list[str] = []
        for path, m in tqdm(layers, desc="dense prefill copies", unit="layer", file=sys.stderr, leave=False,
                            disable=not progress or len(layers) < 2, dynamic_ncols=True):
            need = _dense_bytes(m)
            if need > budget:
                self.left.append(path)
                continue
            self.paths[m] = path
            self._copy(m)
            budget -= need
        self.nbytes = self._bytes()

    def _copy(self, m: torch.nn.Module) -> None:
        lin = m.to_linear()
        lin.requires_grad_(False)
        self.copies[m], self.made[m] = lin, (m.weight, _bias_key(m), _versions(lin))

    def _bytes(self) -> int:
        return sum(t.numel() * t.element_size() for lin in self.copies.values() for t in lin.parameters())

    def stale(self, moving: frozenset | set = frozenset()) -> tuple[list[torch.nn.Module], list[torch.nn.Module]]:
        """``(changed, gone)`` as :meth:`_TwoLayouts.stale` says them (the arrays of the layers in ``moving``, which
        ``delta_layout="dual"`` swaps, not compared: its own check does)."""
        changed, gone = [], []
        for m, lin in self.copies.items():
            weight, bias, versions = self.made[m]
            path = self.paths[m]
            now = _submodule(self.model, path)
            if (now is not m and now is not lin) or _versions(lin) != versions or _hooked_now(lin, path):
                gone.append(m)
            elif _bias_key(m) != bias or _hooked_now(m, path) or (m not in moving and not _holds(m, weight)):
                changed.append(m)
        return changed, gone

    def forget(self, layers, rebuild=()) -> None:
        """Drop the copies of ``layers``, each layer put back at its path where its copy stands there (not for a layer
        gone: nothing is touched), and remake those of ``rebuild`` from the layers as they are now (each old copy let
        go first: the same bytes)."""
        for m in layers:
            lin = self.copies.pop(m)
            if _versions(lin) == self.made[m][2] and not _hooked_now(lin, self.paths[m]):
                _swap_module(self.model, self.paths[m], m, lin, False)
            del lin, self.made[m]
        for m in rebuild:
            self._copy(m)
        for m in layers:
            if m not in self.copies:
                del self.paths[m]
        self.nbytes = self._bytes()

    def install(self, dense: bool) -> None:
        """Put the copies (``dense``) or the sparse layers back at their paths (nothing to do when they are there)."""
        for m, lin in self.copies.items():
            _swap_module(self.model, self.paths[m], m, lin, dense)

    def swapped(self) -> set[int]:
        """The ``id`` of every tensor an :meth:`install` moves in or out of the model."""
        return {id(t) for m, lin in self.copies.items() for t in (*m.parameters(), *m.buffers(), *lin.parameters())}

    def tensors(self, moving: set[int] = frozenset()) -> list[torch.Tensor]:
        """The copies' tensors and the layers' own (but those whose ``id`` is in ``moving``: a layer's arrays that
        ``delta_layout="dual"`` swaps, which its own set counts)."""
        return [t for m, lin in self.copies.items()
                for t in (*lin.parameters(), *(u for u in (*m.parameters(), *m.buffers()) if id(u) not in moving))]


#: the projections whose input comes from no norm (the attention's output, the MLP's activation): their attribute names
PLAIN_INPUT_PROJECTIONS = frozenset({"o_proj", "out_proj", "down_proj", "fc2"})


def _plain_input_layers(model: torch.nn.Module) -> set[int]:
    """The ``id`` of every module of ``model`` held under a name of :data:`PLAIN_INPUT_PROJECTIONS`."""
    return {id(m) for path, m in model.named_modules() if path.rsplit(".", 1)[-1] in PLAIN_INPUT_PROJECTIONS}


def _batch_parts(max_batch: int, device: torch.device, tiled_csl: bool = True, plain: frozenset | set = frozenset(),
                 dense_fast: bool = False) -> Callable[[torch.nn.Module], int | str]:
    """``Engine(delta_layout="auto")``'s choice for a layer: the parts layout's lanes by
    :func:`~flash_llm.formats.delta_rows.auto_parts` up to :data:`DELTA_PARTS_MAX_BATCH` (its N = 1 kernel needs no
    split-K; session 31, H200, Llama-3-8B at 80 %: 2.281 -> 2.061 ms per token), the split layout above (its
    multi-token kernels stage a window, not all of K: batch 2 / 4 / 8 2.94 / 3.82 / 6.36 against 3.02 / 4.45 / 9.55
    ms), Tiled-CSL from :data:`DELTA_TCSL_MIN_BATCH` where ``tiled_csl`` (the memory is there; dense where Tiled-CSL
    would be no smaller: :func:`_large_batch_format`; with ``dense_fast`` also where cuBLAS would be the faster at
    ``max_batch``).  ``plain``: the ids of
    the layers whose input comes from no norm (:func:`_plain_input_layers`; ``auto_parts(normed=False)``), taken
    at ``max_batch`` 1 only (the wider K it allows loses from 2 tokens)."""
    from .formats.delta_rows import auto_parts

    if tiled_csl and max_batch >= DELTA_TCSL_MIN_BATCH:
        return functools.partial(_large_batch_format, max_batch=max_batch if dense_fast else 0)
    if max_batch > DELTA_PARTS_MAX_BATCH:
        return lambda m: 1
    plain = plain if max_batch == 1 else frozenset()
    return lambda m: auto_parts(m.out_features, m.in_features, _nnz(m), device, normed=id(m) not in plain)


def _tiled_csl_growth(model: torch.nn.Module, copies: bool = False, max_batch: int = 0) -> tuple[int, int]:
    """``(bytes, largest dense layer)``: how much more the model's DeltaRows weights take as the batched engine holds
    them (Tiled-CSL by its formula, or dense where :func:`_large_batch_format` says so; 0 or less: no growth), and the
    bytes of its largest such layer expanded to dense (the re-encoding's temporary).  ``copies``: the bytes of the
    copies beside them (``delta_layout="dual"``: Tiled-CSL, or dense where :func:`_large_batch_format` says so), the
    layers an earlier engine turned from DeltaRows into Tiled-CSL or dense counted too (the engine turns them back
    first; their present bytes, an upper bound of their DeltaRows ones, are not subtracted).  ``max_batch``: the
    engine's, for :func:`_large_batch_format`'s speed rule; without ``copies`` the layers an earlier engine made
    Tiled-CSL or dense count too where this one holds them otherwise (Tiled-CSL turned dense, or back)."""
    from .formats import DeltaRows

    grow, largest = 0, 0
    for m in model.modules():
        was = _was_delta_rows(m) or _dense_from_delta_rows(m)
        # (BitmapTiles an earlier engine made from DeltaRows: about its bytes, so counted as DeltaRows)
        if getattr(m, "weight_format", None) is DeltaRows or _bitmap_from_delta_rows(m) or (copies and was):
            dense = _dense_bytes(m)
            held = _tiled_csl_bytes(m) if _large_batch_format(m, max_batch) == TILED_CSL else dense
            grow += held - (0 if copies else m.nbytes)
            largest = max(largest, dense)
        elif was and (_large_batch_format(m, max_batch) == DENSE) != _dense_from_delta_rows(m):
            dense = _dense_bytes(m)
            grow += dense - m.nbytes if _was_delta_rows(m) else _tiled_csl_bytes(m) - dense
            largest = max(largest, dense)
    return grow, largest


def _delta_rows_batch_note(model: torch.nn.Module, device: torch.device, max_batch: int, chosen: bool = False
                           ) -> str | None:
    """A warning for an engine whose DeltaRows layers would run above the batch their CUDA kernels take (they expand
    each weight to dense there, slower than the dense model), or a batched engine over parts-layout weights unless
    ``chosen`` (the engine chose the layout itself, ``delta_layout="auto"``: the parts layout at ``max_batch`` 2 only
    where it pays); ``None`` when there is nothing to say."""
    if device.type != "cuda":
        return None
    from . import kernels
    from .formats import DeltaRows
    from .nn import SparseLinear

    layers = [m for m in model.modules() if isinstance(m, SparseLinear) and m.weight_format is DeltaRows]

    def sparse_at(b: int, m) -> bool:  # (the parts layout never takes the tensor-core kernel: dr_mma_ok)
        return kernels.use_sparse_kernel(b, 0.2, kernels.DELTA_ROWS, parts=m.weight.parts)

    over = [m for m in layers if not sparse_at(max_batch, m)]
    notes = []
    if over:
        first = min(next(b for b in range(1, max_batch + 1) if not sparse_at(b, m)) for m in over)
        notes.append(f"max_batch={max_batch}: {len(over)} DeltaRows layer(s) run their sparse kernel up to batch "
                     f"{first - 1} only; from batch {first} on each call expands the weight to dense, slower than the "
                     f"dense model (delta_layout='auto' re-encodes them as Tiled-CSL from batch {DELTA_TCSL_MIN_BATCH} "
                     f"where the GPU has the memory; DeltaRows is the fastest at batch 1-3)")
    parts = sum(m.weight.parts > 1 for m in layers)
    if parts and max_batch > 1 and not chosen:
        notes.append(f"max_batch={max_batch}: {parts} DeltaRows layer(s) in the parts layout (FLASH_LLM_DELTA_PARTS / "
                     f"parts=, kept by delta_layout='keep') run 2 or more tokens slower than the split layout "
                     f"(their multi-token kernels stage all of K in every block: Llama-3-8B's down, K = 14336, 1.9x "
                     f"slower at 2 tokens and 2.4x at 3, where X no longer fits and comes from global memory); "
                     f"delta_layout='auto' or 'dual' re-encodes them for batched serving")
    return "; ".join(notes) or None


@dataclass
class _PrefillGraph:
    """A captured prefill, the static inputs it reads (``ids`` / ``mask`` ``[B, P]``) and how often it was replayed."""

    graph: "torch.cuda.CUDAGraph"
    ids: torch.Tensor
    mask: torch.Tensor
    replays: int = 0


class Engine:
    """Generation with a preallocated KV cache for ``max_batch x max_seq`` tokens.

    Args:
        model: a :mod:`flash_llm.models` causal LM (``LlamaForCausalLM`` / ``OPTForCausalLM``), dense or
            sparsified, on its device, in eval mode; or this rank's part of a tensor-parallel one
            (:mod:`flash_llm.parallel`): then every rank makes the same calls, the cache holds this rank's KV
            heads, every rank takes rank 0's sampled tokens, and prompts that differ between ranks are refused.
        max_batch: the largest batch :meth:`generate` accepts.
        max_seq: the longest padded prompt plus new tokens (default: the model's
            ``max_position_embeddings``, at most :data:`DEFAULT_MAX_SEQ`, 2048).
        cuda_graphs: capture the decode step in CUDA graphs, one per batch size and attended length, at its first
            use (default: on CUDA devices); ``False`` runs it eagerly.  A step attends the cache slots its sequences
            can fill so far, rounded up by :func:`decode_kv_len` (256, 512, 1024, ...: :data:`DECODE_KV_BUCKETS`), so
            a large ``max_seq`` costs a short generation no attention work.  The prefill too, one graph per batch size and padded prompt
            length (the first prompt of a shape runs eagerly, later ones replay; at most ``prefill_graphs`` kept;
            tensor-parallel models only with :data:`PREFILL_GRAPHS_TP`; ``FLASH_LLM_PREFILL_GRAPHS=0`` keeps it
            eager); prompts longer than :data:`PREFILL_BUCKET_FROM` tokens are then padded on the left to the next
            length of :func:`prefill_bucket`, so nearby lengths share a graph (the logits the same to rounding).
        fuse: run the elementwise parts of each layer (the norms with the residual adds before them, RoPE or
            OPT's query scaling together with the KV-cache write, SiLU x up) as ``torch.compile``d single kernels
            (:func:`flash_llm.models.set_fused`, applied to ``model`` in place).  The first generation compiles
            them (tens of seconds; torch's compile cache shortens later processes).  Default (``None``): on for
            CUDA models of at least ``FUSE_MIN_PARAMETERS`` (1 B) parameters, where it decodes Llama-3-8B 1.3x
            faster at batch 1 on an H200 (``docs/engine.md``); off for smaller or CPU models, where the compile
            time would dominate.
        merge: stack the projections that read the same input (q, k, v; Llama's gate and up) into one matmul
            each (:func:`flash_llm.models.merge_projections`, applied to ``model`` in place: its ``state_dict``
            keys change until :func:`flash_llm.models.unmerge_projections`).  Fewer, larger kernels per decode
            step.  ``False`` (default) leaves the model as it is.
        delta_layout: ``"auto"`` (default) re-encodes the model's DeltaRows weights on a CUDA device, in place (after
            ``merge``; :func:`relayout_delta_rows`), into the layout fastest at ``max_batch``: the parts layout where
            :func:`~flash_llm.formats.delta_rows.auto_parts` takes it at ``max_batch`` 1 (Llama-3-8B at 80 % on an
            H200: 1.09-1.11x faster at batch 1), at ``max_batch`` 2 the parts layout for the normed inputs and K
            within ``PARTS_MAX_K`` only (:data:`DELTA_PARTS_MAX_BATCH`), the split layout at 3 (the parts layout's
            multi-token kernels are 1.07x slower at batch 4, 1.7x at 8; session 32), and Tiled-CSL from
            :data:`DELTA_TCSL_MIN_BATCH` (4) where the device's free memory holds it beside the cache (about 1.5x
            the DeltaRows bytes at 80 %; else, from ``max_batch`` :data:`BITMAP_FALLBACK_MIN_BATCH` (9), BitmapTiles,
            about DeltaRows' bytes, whose kernels take any batch in one pass, where that fits; else a warning and the
            split layout), or as dense ``nn.Linear`` layers
            where Tiled-CSL would take :data:`RELAYOUT_DENSE_SHARE` (0.9) of the dense bytes or more (about 55 %
            sparsity and denser: at most 1.11x Tiled-CSL's memory, cuBLAS's speed; :data:`DENSE`); from ``max_batch``
            :data:`DENSE_FAST_MIN_BATCH` (64) also at density :data:`DENSE_FAST_MIN_DENSITY` (0.22, about 78 %
            sparsity) and denser, where cuBLAS on the dense weight is the faster, if the memory holds them dense (1.67x
            Tiled-CSL's bytes at 70 %; else Tiled-CSL, no warning).  A later engine
            at a smaller ``max_batch`` turns such layers back into DeltaRows.  The values do not change (the sums'
            order does, within rounding).  ``"keep"`` leaves the weights as they are.  ``"dual"``: from ``max_batch``
            :data:`DUAL_TCSL_MIN_BATCH` (3) on, where the memory holds both (else a warning and ``"auto"``'s
            choice), the layers keep DeltaRows in the batch-1 layout for steps of fewer than that many tokens and the
            engine adds Tiled-CSL copies for the larger steps and the prefill (:attr:`copies_bytes`: about 1.5x the
            DeltaRows bytes at 80 %; dense ``nn.Linear`` copies where Tiled-CSL would be no smaller, as above), so
            one engine serves batch 1-2 at DeltaRows' speed and batch 3 and more at Tiled-CSL's (or cuBLAS's); each
            step swaps the set into the model (no copy; :meth:`use_layout`).  On other devices
            nothing is re-encoded.
        formats: ``"auto"`` (default): on a CUDA device, where ``delta_layout`` is not ``"keep"``, the model's other
            sparse layers are laid out too, in place, before ``delta_layout`` applies (:func:`adopt_formats`;
            :attr:`adopted`): BitmapTiles layers are re-encoded as DeltaRows up to ``max_batch`` 3 (about the same
            bytes: plain values 2.5 bytes an entry, coded bf16 2) and as Tiled-CSL from 4 (1.5x the bytes at 80 %;
            from 3 with ``"dual"``), the same values (every format round-trips exactly), and Tiled-CSL layers join
            the choice above (DeltaRows at ``max_batch`` 1-3, Tiled-CSL or dense from 4).  So a model converted with
            the defaults (BitmapTiles: about dense speed in decode) runs at DeltaRows' or Tiled-CSL's (Llama-3-8B at
            80 % on an H200, batch 1: 2.4x dense in DeltaRows, 1.6x in Tiled-CSL, about 1.0x in BitmapTiles;
            ``docs/engine.md``).  Where the device lacks the memory for the re-encoding the BitmapTiles layers stay
            (a warning).  ``"keep"``: only DeltaRows layers are laid out (the formats a benchmark asked for stay).
            ``"dense"``: every sparse layer becomes a dense ``nn.Linear`` (:func:`expand_sparse_`, in place, where the
            memory holds it, else a warning), for a device without the sparse kernels: on a CPU, where
            ``flash_llm.spmm``'s reference expands each weight on every call, decode runs 23-37x faster so (a 4-layer
            Llama-3-8B-shaped model at 80 %, bf16, on the dev machine's 2 cores); ``delta_layout`` then has nothing to lay
            out.  (``flash-llm generate`` on a CPU asks for it.)
        prefill_dense: hold a dense copy of every sparse layer (``nn.Linear``, made here where the memory allows
            beside the cache and the prefill, else a warning) and run the prefill's forwards of at least
            :data:`PREFILL_DENSE_MIN_TOKENS` tokens on them: a prompt then costs what it costs the dense model
            (cuBLAS) instead of expanding every weight, for :attr:`prefill_dense_bytes` more memory (the dense
            model's projections).  Decode steps keep the sparse layers.  Not for tensor-parallel models.  Default
            ``False``: the memory stays free.
        prefill_graphs: the most prefill graphs kept (the least recently used dropped; they share one memory pool,
            so a graph costs little beyond the largest); ``0`` keeps the prefill eager.  Default (``None``):
            :data:`PREFILL_GRAPHS_MAX`, or ``0`` where ``FLASH_LLM_PREFILL_GRAPHS=0``.
        progress: progress bars (tqdm, stderr) while the layers are re-encoded or copied (default ``True``).

    A layer with hooks, a ``forward`` replaced on the instance or overridden by its class (a subclass of
    ``SparseLinear`` adding a LoRA term...), or submodules or tensors of its own beyond the weight and bias keeps its
    module: ``formats="dense"``, ``prefill_dense`` and ``delta_layout``'s dense layouts, which would put a new module
    in its place (dropping them), leave it as it is, with one warning (:attr:`hooked` lists such layers); re-encodings
    in place go on.

    The cache takes ``2 x layers x max_batch x kv_heads x slots x head_dim`` elements of the model's dtype
    (:attr:`cache_bytes`), ``slots`` being ``max_seq`` rounded up to a multiple of 64 (aligned attention masks).
    """

    def __init__(self, model: CausalLM, *, max_batch: int = 1, max_seq: int | None = None,
                 cuda_graphs: bool | None = None, fuse: bool | None = None, merge: bool = False,
                 delta_layout: str = "auto", formats: str = "auto", prefill_graphs: int | None = None,
                 prefill_dense: bool = False, progress: bool = True):
        if not isinstance(model, CausalLM):
            hf = type(model).__module__.startswith("transformers")
            raise TypeError(f"model must be a flash_llm.models causal LM (LlamaForCausalLM, OPTForCausalLM), got "
                            f"{type(model).__module__}.{type(model).__name__}"
                            + (" (for a transformers model's weights: flash_llm.from_pretrained, or "
                               "flash_llm.models.from_config and load_state_dict)" if hf else ""))
        cfg = model.config
        emb = model.input_embeddings().weight
        if emb.is_meta:
            raise ValueError("the model is on the meta device; load its weights first")
        if delta_layout not in DELTA_LAYOUTS:
            raise ValueError(f"delta_layout must be one of {DELTA_LAYOUTS}, got {delta_layout!r}")
        if formats not in ENGINE_FORMATS:
            raise ValueError(f"formats must be one of {ENGINE_FORMATS}, got {formats!r}")
        n_graphs = None if prefill_graphs is None else _as_int(prefill_graphs)  # (numpy ints too: _as_int)
        if prefill_graphs is not None and (n_graphs is None or n_graphs < 0):
            raise ValueError(f"prefill_graphs must be an int >= 0 (0: an eager prefill) or None, got {prefill_graphs!r}")
        prefill_graphs = n_graphs
        self._prefill_max = prefill_graphs  # (None: PREFILL_GRAPHS_MAX, read when used)
        for name, v, none_ok in (("prefill_dense", prefill_dense, False), ("merge", merge, False),
                                 ("progress", progress, False), ("fuse", fuse, True),
                                 ("cuda_graphs", cuda_graphs, True)):
            if not (isinstance(v, bool) or (none_ok and v is None)):
                raise ValueError(f"{name} must be True or False{' or None' if none_ok else ''}, got {v!r}")
        # (every argument checked before the model is changed: a refused engine leaves it as it was)
        self.config = cfg
        self.device, self.dtype = emb.device, emb.dtype
        if max_seq is None:
            max_seq = min(cfg.max_position_embeddings, DEFAULT_MAX_SEQ)
        sizes = (_as_int(max_batch), _as_int(max_seq))  # (numpy ints and 0-d tensors as their values)
        for name, v, n in (("max_batch", max_batch, sizes[0]), ("max_seq", max_seq, sizes[1])):
            if n is None or n < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        max_batch, max_seq = sizes
        if max_seq > cfg.max_position_embeddings:
            raise ValueError(f"max_seq={max_seq} exceeds the model's max_position_embeddings "
                             f"({cfg.max_position_embeddings})")
        # a tensor-parallel model (flash_llm.parallel): this rank holds 1/K of the heads; collectives in the layers
        self.tp = getattr(model, "tensor_parallel", None)
        kv_heads = cfg.num_kv_heads if self.tp is None else cfg.num_kv_heads // self.tp.world_size
        if self.tp is not None and self.tp.device != self.device:
            raise ValueError(f"the model is on {self.device} but its tensor-parallel group computes on "
                             f"{self.tp.device}")
        if prefill_dense and self.tp is not None:
            raise ValueError("prefill_dense=True is for a model on one device, not a tensor-parallel one")
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs a model on a CUDA device; this one is on {self.device}")
        if cuda_graphs and self.tp is not None and self.tp.backend != "nccl":
            raise ValueError(f"cuda_graphs=True needs NCCL collectives to capture; this tensor-parallel group uses "
                             f"{self.tp.backend}")
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda" and (self.tp is None or self.tp.backend == "nccl")
        self.max_batch, self.max_seq = max_batch, max_seq
        slots = -(-max_seq // _CACHE_ALIGN) * _CACHE_ALIGN
        need = self._cache_bytes(kv_heads, slots)
        if self.tp is None:
            self._check_cache_room(need)  # (a cache that cannot fit now is refused before the model is changed)
        else:  # (tensor-parallel: refused on every rank if on any, before any model is changed)
            try:
                self._check_cache_room(need)
                refused = None
            except ValueError as e:
                refused = e
            self._cache_on_every_rank(need, refused)
        # (each module's training flag, by path, and fused switch as they were: an engine whose cache cannot be
        # allocated puts them back, an earlier engine's fusing included; _undo_engine_changes)
        was_training = {p: m.training for p, m in model.named_modules()}
        self.model = model.eval()
        if fuse is None:
            fuse = emb.device.type == "cuda" and cfg.num_parameters() >= FUSE_MIN_PARAMETERS
        was_fused = [(m, m.fused) for m in model.modules() if hasattr(m, "fused")]
        if fuse:
            set_fused(model, True)
        #: what merge=True did, per group (flash_llm.models.merge_projections); empty without merge
        self.merged: dict[str, str] = merge_projections(model) if merge else {}
        self.cuda_graphs = bool(cuda_graphs)
        #: what delta_layout="auto" re-encoded: {layer path: lanes a row, TILED_CSL, BITMAP or DENSE} (empty when
        #: nothing was)
        self.relayout: dict[str, int | str] = {}
        #: the layers whose values code_delta_rows coded (bf16 DeltaRows up to DELTA_CODED_MAX_BATCH)
        self.coded: list[str] = []
        #: what formats="auto" took over (adopt_formats): {layer path: "bitmap" (re-encoded as DeltaRows up to
        #: max_batch 3, as Tiled-CSL from 4) or "tiled-csl" (laid out as the DeltaRows ones)}; empty when nothing was
        self.adopted: dict[str, str] = {}
        #: what formats="dense" expanded (expand_sparse_): the layer paths
        self.expanded: list[str] = []
        #: the layers formats="dense", delta_layout or prefill_dense=True left in their own modules, since a new
        #: module in their place would drop their hooks, forward or members of their own: {layer path: what they carry}
        self.hooked: dict[str, str] = {}
        kept: list[str] = []  # (the options that left them so, for the warning)
        #: delta_layout="dual": the Tiled-CSL copies of the DeltaRows layers (None without them)
        self._two: _TwoLayouts | None = None
        if formats == "dense":
            self.expanded, left = expand_sparse_(model, self._spare_bytes(kv_heads, slots), hooked=self.hooked)
            if self.hooked:
                kept.append("formats='dense' (they stay compressed)")
            if left:
                warnings.warn(f"formats='dense': {left[0]}; they run flash_llm.spmm as they are", stacklevel=2)
        # (the engine lays the weights out; not over layers formats="dense" has just expanded)
        chosen = delta_layout != "keep" and self.device.type in RELAYOUT_DEVICES and formats != "dense"
        if chosen:
            plain = _plain_input_layers(model)
            if formats == "auto":  # (BitmapTiles layers as the format this engine's largest steps run on)
                large = max_batch >= (DUAL_TCSL_MIN_BATCH if delta_layout == "dual" else DELTA_TCSL_MIN_BATCH)
                self.adopted, left = adopt_formats(model, TILED_CSL if large else "delta-rows",
                                                   self._spare_bytes(kv_heads, slots), progress=progress,
                                                   parts=_batch_parts(max_batch, self.device, False, plain))
                if left:
                    warnings.warn(f"formats='auto': {'; '.join(left)}; they run their own kernels (BitmapTiles: "
                                  f"about dense speed)", stacklevel=2)
            dual = (delta_layout == "dual" and max_batch >= DUAL_TCSL_MIN_BATCH
                    and self._tiled_csl_fits(kv_heads, slots, dual=True))
            # (from DENSE_FAST_MIN_BATCH the denser layers dense where the memory allows, else as below)
            fast = (not dual and max_batch >= DENSE_FAST_MIN_BATCH
                    and self._tiled_csl_fits(kv_heads, slots, fast=True))
            # (where Tiled-CSL does not fit, from BITMAP_FALLBACK_MIN_BATCH BitmapTiles where that does)
            fallback = not dual and max_batch >= max(DELTA_TCSL_MIN_BATCH, BITMAP_FALLBACK_MIN_BATCH)
            tcsl = fast or (not dual and max_batch >= DELTA_TCSL_MIN_BATCH
                            and self._tiled_csl_fits(kv_heads, slots, warn=not fallback))
            bitmap = fallback and not tcsl and self._bitmap_fits(kv_heads, slots)
            if fallback and not tcsl and not bitmap:
                self._tiled_csl_fits(kv_heads, slots)  # (its warning: the layers stay DeltaRows)
            # (dual: its DeltaRows serve up to DUAL_TCSL_MIN_BATCH - 1 tokens, so the layout for that max_batch)
            choose = (_to_bitmap if bitmap else
                      _batch_parts(DUAL_TCSL_MIN_BATCH - 1 if dual else max_batch, self.device, tcsl, plain, fast))
            hooked: dict[str, str] = {}
            self.relayout = relayout_delta_rows(model, choose, progress=progress, hooked=hooked)
            if hooked:
                kept.append(f"delta_layout={delta_layout!r} (they keep their layout: no new module)")
                self.hooked.update(hooked)
            if DELTA_CODED and max_batch <= DELTA_CODED_MAX_BATCH:
                self.coded = code_delta_rows(model)
            if dual:
                self._two = _TwoLayouts(model, DUAL_TCSL_MIN_BATCH, progress=progress)
                if self._two.hooked:
                    kept.append("delta_layout='dual' (no dense copy for the larger steps: they keep DeltaRows)")
                    self.hooked.update(self._two.hooked)
        note = None if self._two is not None else _delta_rows_batch_note(model, self.device, max_batch, chosen)
        if note:
            warnings.warn(note, stacklevel=2)
        #: prefill_dense=True: the dense copies the prefill runs on (None without them)
        self._dense: _DenseCopies | None = None
        #: the last use_layout's arguments (the set the layers hold; a deferred prefill capture puts it back)
        self._layout: tuple[int, bool] | None = None
        if prefill_dense:
            dense_already = ({m for m, w in self._two.large.items() if isinstance(w, torch.nn.Linear)}
                             if self._two is not None else set())  # (those serve the prefill as its larger steps)
            self._dense = _DenseCopies(model, PREFILL_DENSE_MIN_TOKENS, self._spare_bytes(kv_heads, slots),
                                       progress=progress, skip=dense_already)
            if self._dense.left:
                warnings.warn(f"prefill_dense=True: no room for the dense copies of {len(self._dense.left)} of the "
                              f"sparse layers (the first: {self._dense.left[0]}) beside the cache and the prefill on "
                              f"{self.device}; their prefill expands them, as without", stacklevel=2)
            if self._dense.hooked:
                kept.append("prefill_dense=True (no dense copy: their prefill runs on them)")
                self.hooked.update(self._dense.hooked)
        if self.hooked:
            named = "; ".join(f"{p} ({what})" for p, what in list(self.hooked.items())[:3])
            more = f"; and {len(self.hooked) - 3} more (Engine.hooked lists them)" if len(self.hooked) > 3 else ""
            warnings.warn(f"{len(self.hooked)} layer(s) carry what a new module in their place would drop, so the "
                          f"engine leaves their modules as they are for {' and '.join(kept)}: {named}{more}; their "
                          f"hooks and forwards run, the layers perhaps slower than the engine's layout would (remove "
                          f"the hooks, or make them plain layers, before building the engine to have them laid out)",
                          stacklevel=2)
        dev = self.device
        # the engine's state as normal tensors, whatever the caller's mode: under torch.inference_mode() they would be
        # inference tensors, and a generation outside it could not update them in place
        with torch.inference_mode(False):
            refused = None
            try:  # (again: the engine's re-encodings and copies above took memory)
                self._check_cache_room(need, raw=True)
                self.cache = KVCache(cfg.num_layers, max_batch, kv_heads, slots, cfg.head_dim, self.dtype, dev)
            except (RuntimeError, MemoryError) as e:  # (out of memory: no engine, so the model's merge / fuse undone)
                left = _undo_engine_changes(model, self.merged, was_fused, was_training)
                refused = self._cache_error(need, e, left)
                if self.tp is None:
                    raise refused from e
                refused.__cause__ = e  # (raised once the other ranks know of it)
            if self.tp is not None:  # (every rank's cache, or none and every rank's model changes undone)
                self._cache_on_every_rank(need, refused,
                                          lambda: _undo_engine_changes(model, self.merged, was_fused, was_training))
            self._slots = slots
            # decode-step state, read and advanced inside the captured graph
            self._tok = torch.zeros(max_batch, 1, dtype=torch.long, device=dev)  # token fed to the next step
            self._pos = torch.zeros(max_batch, dtype=torch.long, device=dev)  # its position
            self._slot = torch.zeros(1, dtype=torch.long, device=dev)  # its cache slot
            # the additive attention mask over the cache slots: 0 where a slot holds a token of the row, -inf where not
            # (kept additive, so a step does not convert a bool mask: three kernels less)
            self._mask = torch.full((max_batch, slots), float("-inf"), dtype=self.dtype, device=dev)
            # RoPE's cos / sin at every slot's position (Llama): a step indexes them instead of computing them
            rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
            self._rope = rotary.tables(slots, self.dtype, dev) if hasattr(rotary, "tables") else None
            self._logits = torch.zeros(max_batch, cfg.vocab_size, dtype=torch.float32, device=dev)
        #: the batch from which a decode step's attention takes 32-slot chunks (None: the kernel's default)
        self._small_chunks_from = _small_chunks_from(model)
        #: the decode attention's L2 warm-up tables (kernels.L2_WARM_MB), by where the weights they name live
        self._l2_tables: dict[tuple, list] = {}
        self._l2_stream: "torch.cuda.Stream | None" = None  # (kernels.L2_WARM_SIDE: _l2_side)
        self._generation: object | None = None  # (the generation in progress: _steps)
        # (held while a generation's step runs, released between its steps: one step at a time, whatever the thread;
        # reentrant, so that a hook or callback inside a step that starts a generation on this thread takes it over as
        # before instead of waiting for itself: _run)
        self._lock = threading.RLock()
        #: the :class:`Generation` of the last :meth:`stream` that ran to its end; None before (and while one runs)
        self.last: Generation | None = None
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}  # (batch, attended slots) -> decode graph
        self._pool = None
        # the prefill's graphs ((batch, padded prompt length) -> _PrefillGraph), most recently used last, in a pool
        # of their own; None: the prefill runs eagerly (no CUDA graphs, tensor parallelism, or a capture that failed)
        self._prefills: dict[tuple[int, int], _PrefillGraph] | None = (
            {} if self.cuda_graphs and (PREFILL_GRAPHS if prefill_graphs is None else prefill_graphs > 0)
            and (self.tp is None or PREFILL_GRAPHS_TP) else None)
        self._prefill_pool = None
        self._prefill_scratch: int | None = None  # the largest sparse layer's dense bytes (_prefill_graph_fits)
        # the static inputs of the prefill this generation ran eagerly, captured when its tokens are out
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self._captured_over = self._weights_key()
        # (where the input embedding sits: its weight's dtype and device are checked at each generation, _check_model)
        self._embed_path = model._embed_key().removesuffix(".weight")

    def _beside_bytes(self, kv_heads: int, slots: int) -> int:
        """Bytes this engine will take beside the weights: its cache (``kv_heads`` x ``slots`` a layer and sequence)
        and its prefill's activations (:func:`_prefill_bytes`)."""
        return self._cache_bytes(kv_heads, slots) + _prefill_bytes(self.config, self.max_batch, self.max_seq)

    def _cache_error(self, need: int, e: BaseException, note: str = "") -> ValueError:
        return ValueError(f"the KV cache of max_batch={self.max_batch} x max_seq={self.max_seq} ({need / 2**30:.2f} "
                          f"GiB) could not be allocated on {self.device}: lower max_batch or max_seq ({e}){note}")

    def _cache_on_every_rank(self, need: int, refused: ValueError | None, undo=None) -> None:
        """Tensor parallelism: raise on every rank if the KV cache of ``need`` bytes (a rank's) was refused on any
        (a collective: every rank calls it, with ``refused`` None where its own check, or allocation, succeeded).
        Until session 87 a rank short of memory (another process on its GPU) raised alone while the others built
        their engines and waited in their first collective until the group's timeout.  A refusing rank raises its own
        ``refused``; the others drop their cache, call ``undo`` (what it returns: a note of what could not be undone,
        as :func:`_undo_engine_changes`) and raise a ``ValueError`` naming the refusing ranks.  One small all-reduce
        where every rank succeeded; an all-gather of the outcomes else."""
        tp = self.tp
        try:
            ok = tp.all_true(refused is None)
            failed = [] if ok else [r for r, no in enumerate(tp.all_gather_object(refused is not None)) if no]
        except Exception:
            if refused is not None:  # (another rank is gone: this rank's own error says more than the collective's)
                raise refused
            vars(self).pop("cache", None)
            if undo is not None:
                undo()
            raise
        if refused is not None:
            raise refused
        if not failed:
            return
        vars(self).pop("cache", None)  # (freed: no engine on any rank)
        note = undo() if undo is not None else ""
        one = len(failed) == 1
        ranks = f"rank {failed[0]}" if one else f"ranks {', '.join(map(str, failed))}"
        where = "that rank's device" if one else "those ranks' devices"
        raise ValueError(f"the KV cache of max_batch={self.max_batch} x max_seq={self.max_seq} ({need / 2**30:.2f} "
                         f"GiB a rank) could not be allocated on tensor-parallel {ranks} of {tp.world_size} (the "
                         f"error there says why), so no rank builds the engine (this rank, {tp.rank}, had room for "
                         f"its own on {self.device}): lower max_batch or max_seq, or free memory on "
                         f"{where}{note}")

    def _check_cache_room(self, need: int, raw: bool = False) -> None:
        """Refuse a KV cache of ``need`` bytes that the device's free memory cannot hold (a ValueError naming
        ``max_batch`` / ``max_seq``; ``raw``: the MemoryError or the query's own error, for the caller to wrap).
        Checked before it is allocated: on a host that overcommits, an allocation past its memory succeeds and the
        process is killed when the cache is filled (an H100 machine's 125 GiB host, session 74)."""
        try:
            free = _cache_room(self.device)
            if 0 < free < need:
                raise MemoryError(f"{free / 2**30:.2f} GiB free")
        except (RuntimeError, MemoryError) as e:
            if raw:
                raise
            raise self._cache_error(need, e) from e

    def _cache_bytes(self, kv_heads: int, slots: int) -> int:
        """Bytes of the KV cache this engine allocates (``kv_heads`` x ``slots`` a layer and sequence)."""
        cfg = self.config
        return 2 * cfg.num_layers * self.max_batch * kv_heads * slots * cfg.head_dim * self.dtype.itemsize

    def _spare_bytes(self, kv_heads: int, slots: int) -> int:
        """The device's free memory less what this engine will take beside the weights and
        :data:`RELAYOUT_MARGIN_BYTES`: what re-encoding its layers may add (0 at least)."""
        return max(_free_memory(self.device) - self._beside_bytes(kv_heads, slots) - RELAYOUT_MARGIN_BYTES, 0)

    def _tiled_csl_fits(self, kv_heads: int, slots: int, dual: bool = False, fast: bool = False,
                        warn: bool = True) -> bool:
        """Whether the device has the memory to hold the model's DeltaRows weights as Tiled-CSL (``dual``: as
        Tiled-CSL copies beside them, also counting the layers an earlier engine made Tiled-CSL; ``fast``: dense
        where :func:`_large_batch_format` at this ``max_batch`` says cuBLAS is the faster) beside the cache
        this engine is about to allocate (``kv_heads`` x ``slots`` a layer and sequence), its prefill's activations
        (:func:`_prefill_bytes`) and :data:`RELAYOUT_MARGIN_BYTES`; warns when it has not (not for ``fast``: the
        engine tries without it; nor without ``warn``: the caller tries BitmapTiles first)."""
        grow, largest = _tiled_csl_growth(self.model, copies=dual, max_batch=self.max_batch if fast else 0)
        if largest == 0:  # no DeltaRows layer (layers an earlier engine made Tiled-CSL stay so): nothing to copy
            return not dual
        beside = self._beside_bytes(kv_heads, slots)
        free = _free_memory(self.device)
        need = max(grow, 0) + 4 * largest + beside + RELAYOUT_MARGIN_BYTES  # (dense, mask, indices, entries)
        if need <= free:
            return True
        if fast or not warn:
            return False
        if dual:
            warnings.warn(f"max_batch={self.max_batch}: no Tiled-CSL copies beside the DeltaRows weights "
                          f"(delta_layout='dual'): they would take {grow / 2**30:.2f} GiB, and with the cache "
                          f"and the prefill ({beside / 2**30:.2f} GiB) that needs {need / 2**30:.2f} GiB of the "
                          f"{free / 2**30:.2f} GiB free on {self.device}; one layout as under delta_layout='auto'",
                          stacklevel=3)
            return False
        warnings.warn(f"max_batch={self.max_batch}: the DeltaRows weights stay DeltaRows (slower than Tiled-CSL from "
                      f"batch {DELTA_TCSL_MIN_BATCH}): as Tiled-CSL (dense where that would be no smaller) they would "
                      f"take {grow / 2**30:.2f} GiB more, and with the cache and the prefill "
                      f"({beside / 2**30:.2f} GiB) that needs {need / 2**30:.2f} GiB of the "
                      f"{free / 2**30:.2f} GiB free on {self.device}", stacklevel=3)
        return False

    def _bitmap_fits(self, kv_heads: int, slots: int) -> bool:
        """Whether the device has the memory to hold the model's DeltaRows layers (and those an earlier engine made
        Tiled-CSL or dense) as BitmapTiles beside the cache, the prefill and :data:`RELAYOUT_MARGIN_BYTES` (as
        :meth:`_tiled_csl_fits` counts); warns that they run as BitmapTiles when it has."""
        from . import kernels
        from .formats import DeltaRows

        grow, largest, n = 0, 0, 0
        for m in self.model.modules():
            if _bitmap_from_delta_rows(m):  # (an earlier engine's: they stay)
                n += 1
            elif getattr(m, "weight_format", None) is DeltaRows or _was_delta_rows(m) or _dense_from_delta_rows(m):
                grow += _bitmap_bytes(m) - (_dense_bytes(m) if _dense_from_delta_rows(m) else m.nbytes)
                largest = max(largest, _dense_bytes(m))
                n += 1
        if n == 0:
            return False
        tgrow, _ = _tiled_csl_growth(self.model)
        beside = self._beside_bytes(kv_heads, slots)
        free = _free_memory(self.device)
        if max(grow, 0) + 4 * largest + beside + RELAYOUT_MARGIN_BYTES > free:
            return False
        warnings.warn(f"max_batch={self.max_batch}: the {n} DeltaRows layer(s) run as BitmapTiles (their kernels take "
                      f"any batch in one pass; DeltaRows' take {kernels.DELTA_MULTI_MAX} tokens a pass): as Tiled-CSL, "
                      f"the faster from batch {DELTA_TCSL_MIN_BATCH}, they would take {tgrow / 2**30:.2f} GiB more, "
                      f"more than the {free / 2**30:.2f} GiB free on {self.device} beside the cache and the prefill "
                      f"({beside / 2**30:.2f} GiB)", stacklevel=3)
        return True

    @property
    def cache_bytes(self) -> int:
        """Bytes of the KV cache."""
        return self.cache.nbytes

    @property
    def copies_bytes(self) -> int:
        """Bytes of the copies ``delta_layout="dual"`` holds beside the model's weights (Tiled-CSL, or dense where
        that would be no larger; 0 without)."""
        return 0 if self._two is None else self._two.nbytes

    def use_layout(self, batch: int, prefill: bool = False) -> None:
        """Put into the model's layers the weights a decode step of ``batch`` rows runs on (``delta_layout="dual"``
        swaps its two sets by step size; nothing to do otherwise), or with ``prefill`` a prefill forward of ``batch``
        tokens (``prefill_dense=True``: the dense copies from :data:`PREFILL_DENSE_MIN_TOKENS`): to read the model's
        formats or bytes as that step sees them (a captured graph keeps the set it was captured over, whatever the
        layers hold later)."""
        n = _as_int(batch)
        if n is None or n < 1:
            raise ValueError(f"batch must be an int >= 1, got {batch!r}")
        batch = n
        with self._lock:  # (not while another thread's step runs)
            self._follow_weights()  # (the copies made again or dropped first where the layers changed under it)
            self._install_layout(batch, prefill)

    def _install_layout(self, batch: int, prefill: bool = False) -> None:
        """:meth:`use_layout` without its checks (the engine's own steps: the copies followed at the start)."""
        self._layout = (batch, prefill)
        if self._dense is not None:
            self._dense.install(False)
        if self._two is not None:
            self._two.install(batch)
        if self._dense is not None and prefill and batch >= self._dense.min_tokens:
            self._dense.install(True)

    @property
    def prefill_dense_bytes(self) -> int:
        """Bytes of the dense copies ``prefill_dense=True`` holds for the prefill (0 without)."""
        return 0 if self._dense is None else self._dense.nbytes

    @property
    def prefill_graphs_max(self) -> int:
        """The most prefill graphs this engine keeps (``Engine(prefill_graphs=...)``, else :data:`PREFILL_GRAPHS_MAX`)."""
        return PREFILL_GRAPHS_MAX if self._prefill_max is None else self._prefill_max

    def clear_graphs(self) -> None:
        """Drop the captured decode and prefill graphs (and their memory pools); they are captured again when
        needed.  (Under the engine's lock: not while another thread's step runs.)"""
        with self._lock:
            self._graphs.clear()
            self._pool = None
            if self._prefills is not None:
                self._prefills.clear()
            self._prefill_pool = None

    def _weights_key(self) -> tuple:
        """Where the model's tensors live: a graph captured over other storage (the model merged or re-encoded by
        another engine, a state dict loaded with ``assign=True``) would read freed memory."""
        if self._two is None and self._dense is None:
            return tuple(t.data_ptr() for t in (*self.model.parameters(), *self.model.buffers()))
        # delta_layout="dual" / prefill_dense=True: the layers swap their arrays or modules between the sets this
        # engine holds (either set's graphs stay valid), so the key takes every set and leaves the layers' present
        # arrays out
        moving = self._two.swapped() if self._two is not None else set()
        swapped = moving | (self._dense.swapped() if self._dense is not None else set())
        own = [t for t in (*self.model.parameters(), *self.model.buffers()) if id(t) not in swapped]
        sets = [*(self._two.tensors() if self._two is not None else ()),
                *(self._dense.tensors(moving) if self._dense is not None else ())]
        return tuple(t.data_ptr() for t in (*own, *sets))

    def _on_every_rank(self, flag: bool) -> bool:
        """``flag``, or for a tensor-parallel model whether it holds on every rank (a collective: every rank calls it),
        so that ranks deciding from their own state take the same branch."""
        return flag if self.tp is None else self.tp.all_true(flag)

    def _check_model(self) -> None:
        """Refuse a model whose dtype or device changed since the engine was built (``load_state_dict(...,
        assign=True)`` of a checkpoint in another dtype, ``model.float()``, ``model.to(other_device)``): the KV cache,
        the attention mask and the RoPE tables keep the dtype and device of construction, so the prefill's first cache
        write failed with a bare ``index_copy_`` dtype error (until session 88).  The input embedding's weight stands
        for the model (a path lookup and two compares: each generation's start)."""
        m = _submodule(self.model, self._embed_path)
        w = None if m is None else m._parameters.get("weight")
        if w is None:  # (the module replaced by one of another kind: the model's own lookup)
            w = self.model.input_embeddings().weight
        if w.dtype != self.dtype or w.device != self.device:
            raise ValueError(f"the model is now {w.dtype} on {w.device} (its input embedding), but this engine was "
                             f"built for {self.dtype} on {self.device}: its KV cache, attention mask and RoPE tables "
                             f"keep that dtype and device; build a new Engine for the model as it is, or cast / move "
                             f"the model back (model.to({str(self.device)!r}, {self.dtype}))")

    def _check_autocast(self) -> None:
        """Refuse a generation under ``torch.autocast`` to a dtype other than the engine's (:attr:`dtype`) on its
        device type (until session 88 it failed in the prefill with a bare ``index_copy_`` dtype error: autocast made
        the keys and values another dtype than the cache's).  Autocast to the engine's dtype, or over a float64
        model (autocast leaves float64 alone), is accepted: the steps run with autocast off (:meth:`_run`), in the
        engine's dtype, as :class:`~flash_llm.SparseLinear` takes autocast to its own dtype only."""
        kind = self.device.type
        if kind not in ("cpu", "cuda") or not torch.is_autocast_enabled(kind) or self.dtype == torch.float64:
            return
        want = torch.get_autocast_dtype(kind)
        if want != self.dtype:
            raise ValueError(f"generate() / stream() under torch.autocast({kind!r}, dtype={want}) is not supported: "
                             f"this engine computes in the model's dtype, {self.dtype} (its KV cache, attention mask "
                             f"and RoPE tables are in it); call it outside the autocast region, or build an Engine "
                             f"over the model cast to {want}")

    def _follow_weights(self) -> None:
        """``delta_layout="dual"`` / ``prefill_dense=True``: where the model changed under the engine since it made its
        copies (a state dict loaded, with ``assign`` or not; another engine's re-encoding; projections merged), the
        copies follow the layers as they are now.  A layer that still holds a DeltaRows weight (``"dual"``), or any
        sparse one (``prefill_dense``), gets its copy made again from it, as a new engine would (``"dual"``: where the
        device's memory holds the new copies beside the prefill, else every dual copy is dropped); a layer gone from
        its path (merged, replaced), or no longer eligible, loses its copy and runs as without the option, the model
        left as it is, with one warning.  Never puts the old weights back into the model (until session 86 the next
        step did, or prefilled on dense copies of them).  Called where the graphs are checked (each generation's
        start, each capture); the check is identities only (no device work).  First the model's dtype and device
        against the engine's (:meth:`_check_model`, a ValueError)."""
        from .formats import DeltaRows
        from .nn import SparseLinear

        self._check_model()
        two, dense = self._two, self._dense
        if two is None and dense is None:
            return
        if two is not None and dense is not None:  # (the prefill's copies out of the layers' paths first: else the
            dense.install(False)  # dual layout's check reads a layer under them as gone; the caller installs after)
        changed, gone = two.stale() if two is not None else ([], [])
        d_changed, d_gone = (dense.stale(set(two.small) if two is not None else frozenset())
                             if dense is not None else ([], []))
        if not (changed or gone or d_changed or d_gone):
            return
        dropped: dict[str, list[str]] = {}  # (option -> the paths of the layers whose copies it dropped)
        self._prefill_scratch = None
        if two is not None and (changed or gone):
            remake = [m for m in changed if m.weight_format is DeltaRows
                      and not (_large_batch_format(m) == DENSE and _kept_for_hooks(m, two.paths[m], None))]
            grow = (sum(_dense_bytes(m) if _large_batch_format(m) == DENSE else _tiled_csl_bytes(m) for m in remake)
                    - sum(two.copy_bytes(m) for m in changed))
            largest = max((_dense_bytes(m) for m in remake), default=0)  # (the re-encoding's dense temporary)
            need = max(grow, 0) + 4 * largest + _prefill_bytes(self.config, self.max_batch, self.max_seq)
            if remake and need + RELAYOUT_MARGIN_BYTES > _free_memory(self.device):
                dropped["delta_layout='dual' (no memory to make the changed layers' copies again: every one)"] = [
                    *two.paths.values()]
                two.forget(changed + gone)
                two.install(1)  # (the layers' own DeltaRows weights back, where they hold the copies)
                two.forget(list(two.paths))
                self._two = None
            else:
                lost = [m for m in changed if m not in remake] + gone
                dropped["delta_layout='dual'"] = [two.paths[m] for m in lost]
                two.forget(changed + gone, remake)
        if dense is not None:
            moved = d_changed + [m for m in changed if m in dense.copies and m not in d_changed]
            remake = [m for m in moved if isinstance(m, SparseLinear) and not _kept_for_hooks(m, dense.paths[m], None)]
            dropped["prefill_dense=True"] = [dense.paths[m] for m in moved + d_gone if m not in remake]
            dense.forget(moved + d_gone, remake)
        said = [f"{option}: the copies of {len(paths)} layer(s) ({', '.join(sorted(paths)[:3])}"
                f"{f' and {len(paths) - 3} more' if len(paths) > 3 else ''})"
                for option, paths in dropped.items() if paths]
        if said:  # (stacklevel: the caller of generate() or of a stream's next())
            warnings.warn(f"flash_llm.Engine: the model changed under the engine since it made its copies "
                          f"(projections merged, layers replaced, hooks added, or a layer loaded in another format); "
                          f"dropped for {'; '.join(said)}: those layers run as without the option (build a new Engine "
                          f"to have them again)",
                          RuntimeWarning, stacklevel=8)

    def _check_graphs(self) -> None:
        """Drop the graphs when the model's tensors moved since they were captured (the copies of
        ``delta_layout="dual"`` / ``prefill_dense=True`` made again or dropped first where the layers changed:
        :meth:`_follow_weights`).
        Tensor-parallel with graphs: on every rank when they moved on any (a collective), since a rank capturing again
        alone would run its warm-up's all-reduces while the others replay theirs."""
        self._follow_weights()
        key = self._weights_key()
        same = key == self._captured_over
        if not (self._on_every_rank(same) if self.cuda_graphs else same):
            self.clear_graphs()
            self._captured_over = key

    # ---- inputs ----------------------------------------------------------------------------------------
    def _prepare(self, prompts, attention_mask, max_new_tokens
                 ) -> tuple[torch.Tensor, torch.Tensor, list[int], list[int] | None]:
        """Left-padded ``ids [B, P]`` int64 and ``mask [B, P]`` bool on the device, the prompt lengths, and the limits
        a prompt (``max_new_tokens`` as a list; None for an int)."""
        if isinstance(max_new_tokens, (list, tuple)):  # (numpy and 0-d tensor ints as their values: _as_int)
            limits = [_as_int(n) for n in max_new_tokens]
            if not limits or not all(n is not None and n >= 1 for n in limits):
                raise ValueError(f"max_new_tokens as a list must hold one int >= 1 a prompt, got {max_new_tokens!r}")
            max_new_tokens = max(limits)
        else:
            limits, n = None, _as_int(max_new_tokens)
            if n is None or n < 1:
                raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r} (or a list of them, one "
                                 f"a prompt)")
            max_new_tokens = n
        if isinstance(prompts, torch.Tensor):
            if prompts.ndim != 2 or prompts.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"prompts as a tensor must be [batch, seq] int64; got shape {tuple(prompts.shape)} "
                                 f"and dtype {prompts.dtype}")
            ids = prompts.to(self.device, torch.long)
            if attention_mask is None:
                mask = torch.ones_like(ids, dtype=torch.bool)
            else:
                if not isinstance(attention_mask, torch.Tensor):
                    raise TypeError(f"attention_mask must be a [batch, seq] tensor like prompts, got "
                                    f"{type(attention_mask).__name__}")
                if tuple(attention_mask.shape) != tuple(ids.shape):
                    raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected "
                                     f"{tuple(ids.shape)} (the shape of prompts)")
                mask = attention_mask.to(self.device)
                if mask.dtype != torch.bool and bool(((mask != 0) & (mask != 1)).any()):
                    bad = mask[(mask != 0) & (mask != 1)][0].item()
                    raise ValueError(f"attention_mask must hold 0 / 1 (or bool) values, 1 = token; got {bad!r}")
                mask = mask.bool()
                if bool((mask[:, 1:] < mask[:, :-1]).any()):
                    raise ValueError("attention_mask must be left-padded (zeros, then ones, in every row); right "
                                     "padding would put padding between the prompt and the new tokens")
            lengths = mask.sum(1).tolist()
        else:
            if attention_mask is not None:
                raise ValueError("attention_mask goes with a prompts tensor; lists of token lists are padded here")
            if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, (list, tuple)) for p in prompts):
                raise TypeError("prompts must be a list of token-id lists or a [batch, seq] int64 tensor")
            lengths = [len(p) for p in prompts]
            prompts = [[_as_int(t) for t in p] for p in prompts]  # (numpy ints and 0-d tensors as their values)
            if any(t is None for p in prompts for t in p):
                raise TypeError("prompts must hold int token ids")
            # (checked as Python ints, before a tensor is built: one past int64 would be torch's overflow error)
            flat = [t for p in prompts for t in p]
            lo, hi = min(flat, default=0), max(flat, default=0)
            if lo < 0 or hi >= self.config.vocab_size:
                bad = lo if lo < 0 else hi
                raise ValueError(f"token id {bad} is out of range for a vocabulary of {self.config.vocab_size}")
            width = max(lengths, default=0)
            ids = torch.zeros(len(prompts), width, dtype=torch.long)
            mask = torch.zeros(len(prompts), width, dtype=torch.bool)
            for i, p in enumerate(prompts):
                if p:
                    ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
                    mask[i, width - len(p):] = True
            ids, mask = ids.to(self.device), mask.to(self.device)
        b, p = ids.shape
        if not 1 <= b <= self.max_batch:
            raise ValueError(f"batch of {b} prompts; this engine takes 1 to max_batch={self.max_batch}")
        if limits is not None and len(limits) != b:
            raise ValueError(f"max_new_tokens as a list has {len(limits)} limits for {b} prompts")
        if min(lengths) < 1:
            raise ValueError(f"prompt {lengths.index(min(lengths))} is empty; every prompt needs at least one token")
        if p + max_new_tokens - 1 > self.max_seq:
            raise ValueError(f"padded prompt length {p} + max_new_tokens {max_new_tokens} - 1 = "
                             f"{p + max_new_tokens - 1} tokens exceed the cache (max_seq={self.max_seq})")
        real = ids[mask]
        if real.numel() and (int(real.min()) < 0 or int(real.max()) >= self.config.vocab_size):
            bad = int(real.min()) if int(real.min()) < 0 else int(real.max())
            raise ValueError(f"token id {bad} is out of range for a vocabulary of {self.config.vocab_size}")
        return ids.masked_fill(~mask, 0), mask, lengths, limits

    # ---- the two phases ---------------------------------------------------------------------------------
    def _prefill(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Run the prompts ``[B, P]`` through the model, filling cache slots ``0..P-1``; last logits ``[B, V]``.  At
        most :func:`_prefill_rows` prompts a forward (each chunk its own rows of the cache)."""
        b, p = ids.shape
        rows = _prefill_rows(b, p)
        self._install_layout(rows * p, prefill=True)
        self._mask[:b].fill_(float("-inf"))
        self._mask[:b, :p].masked_fill_(mask, 0.0)
        slots = torch.arange(p, device=self.device)
        for r0 in range(0, b, rows):
            r1 = min(b, r0 + rows)
            m = mask[r0:r1]
            attend = Attend(positions=padded_positions(m), mask=padding_mask(m), cache=self.cache.view(r0, r1),
                            slots=slots, kv_len=p, rope=self._rope)
            self._logits[r0:r1].copy_(self.model(ids[r0:r1], attend=attend, last_only=True)[:, -1])
        self._pos[:b] = mask.sum(1)
        self._slot.fill_(p)
        return self._logits[:b]

    def _bucketed(self, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """``ids`` / ``mask`` ``[B, P]`` padded on the left to ``[B, prefill_bucket(P)]`` (where
        :data:`PREFILL_BUCKETS`, and the cache holds it with the new tokens): the same prompts, more padding."""
        b, p = ids.shape
        q = prefill_bucket(p, self.max_seq - max_new_tokens + 1) if PREFILL_BUCKETS else p
        if q == p:
            return ids, mask
        return (torch.nn.functional.pad(ids, (q - p, 0), value=0),
                torch.nn.functional.pad(mask, (q - p, 0), value=False))

    def _prefill_replayed(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """:meth:`_prefill` from a CUDA graph of its batch size and prompt length: replayed if captured, else run
        eagerly (the result of this call, and the capture's warm-up) and kept for :meth:`_capture_pending`, which
        captures it once the generation's tokens are out, so the capture does not delay this prompt's first token."""
        key = tuple(ids.shape)
        entry = self._prefills.pop(key, None)
        if entry is not None:
            self._prefills[key] = entry  # (most recently used last)
            entry.ids.copy_(ids)
            entry.mask.copy_(mask)
            entry.graph.replay()
            entry.replays += 1
            return self._logits[: key[0]]
        logits = self._prefill(ids, mask)
        self._pending = (ids.clone(), mask.clone())
        return logits

    def _capture_pending(self) -> None:
        """Capture the prefill that the current generation ran eagerly (:meth:`_prefill_replayed`) for the next prompts
        of its shape, where the memory allows (:meth:`_prefill_graph_fits`; else asked again at the next prompt of that
        shape).  A capture error warns and leaves every later prefill eager."""
        pending, self._pending = self._pending, None
        if pending is None or self._prefills is None:
            return
        key = tuple(pending[0].shape)
        if not self._on_every_rank(self._prefill_graph_fits(*key)):  # (tensor-parallel: all ranks or none)
            return
        entry, error = None, None
        last = self._layout  # (the set the generation's last step ran on: the capture installs the prefill's)
        try:
            entry = self._capture_prefill(*pending)
        except RuntimeError as e:
            error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        finally:
            if last is not None:
                self._install_layout(*last)
        if not self._on_every_rank(error is None) and error is None:
            error = "another tensor-parallel rank's capture failed"
        if error is not None:
            warnings.warn(f"flash_llm.Engine: the prefill could not be captured in a CUDA graph, so it runs "
                          f"eagerly from now on ({error})", RuntimeWarning, stacklevel=4)
            self._prefills = None
            self._prefill_pool = None
            return
        self._prefills[key] = entry
        if self.tp is not None:
            self.tp.track_graph(entry.graph)  # (reset when the group is closed: NCCL work captured in it)
        while len(self._prefills) > self.prefill_graphs_max:
            self._prefills.pop(next(iter(self._prefills)))

    def _prefill_graph_fits(self, b: int, p: int) -> bool:
        """Whether the device's free memory, less :data:`RELAYOUT_MARGIN_BYTES`, holds what a prefill graph of ``b``
        prompts of ``p`` tokens keeps in its pool: the activations of its largest forward (as :func:`_prefill_bytes`)
        and the largest sparse layer expanded to dense (the large-N path's scratch); counted once, as the graphs share
        their pool.  Else the prefill stays eager (the memory is the model's and the cache's to use)."""
        from .nn import SparseLinear

        if self._prefill_scratch is None:  # (the layers with a dense copy are not expanded)
            copied = self._dense.copies if self._dense is not None else {}
            self._prefill_scratch = max((_dense_bytes(m) for m in self.model.modules()
                                         if isinstance(m, SparseLinear) and m not in copied), default=0)
        need = _prefill_bytes(self.config, b, p) + self._prefill_scratch  # (b prompts of p tokens: its largest forward)
        torch.cuda.empty_cache()  # (the eager prefill's activations, cached by the allocator, are free memory)
        return _free_memory(self.device) - RELAYOUT_MARGIN_BYTES >= need

    def _capture_prefill(self, ids: torch.Tensor, mask: torch.Tensor) -> _PrefillGraph:
        """A graph of :meth:`_prefill` over the static inputs ``ids`` / ``mask`` (recorded, not run)."""
        from . import kernels  # (CUDA only, like the graphs)

        if self._prefill_pool is None:
            self._prefill_pool = torch.cuda.graph_pool_handle()
        # (the eager prefill's activations, cached by the allocator, cannot serve the graph's own pool: the caller's
        # _prefill_graph_fits gave them back first, so the prefill's memory is not held twice)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._prefill_pool), kernels.static_weights():
            self._prefill(ids, mask)
        return _PrefillGraph(graph, ids, mask)

    def _step(self, b: int, kv: int | None = None) -> None:
        """One decode step for rows ``0..b-1``: feed ``_tok`` at ``_pos`` into cache slot ``_slot``, attend the first
        ``kv`` slots (default all; they must include ``_slot``), write the next logits to ``_logits``, advance
        position and slot.  Fixed shapes, no host synchronization."""
        kv = self._slots if kv is None else kv
        mask = self._mask[:b]
        mask.index_fill_(1, self._slot, 0.0)
        l2_next = self._l2_next()
        side = self._l2_side() if l2_next is not None else None
        if side is not None:  # (forked here, so the join below is legal in a capture even if no layer used it)
            side.wait_stream(torch.cuda.current_stream(self.device))
        attend = Attend(positions=self._pos[:b, None], mask=mask[:, None, None, :kv], cache=self.cache,
                        slots=self._slot, kv_len=kv, rope=self._rope, small_chunks_from=self._small_chunks_from,
                        l2_next=l2_next, l2_stream=side)
        logits = self.model(self._tok[:b], attend=attend)
        if side is not None:  # (the warm-up's side stream joins back: a capture must end on its own stream)
            torch.cuda.current_stream(self.device).wait_stream(side)
        self._logits[:b].copy_(logits[:, 0])
        torch._foreach_add_([self._pos[:b], self._slot], 1)  # (one kernel for both)

    def _l2_next(self) -> list | None:
        """Per layer (by index), the table of :func:`flash_llm.kernels.l2_warm_ranges` over the weights that follow
        its attention (:func:`~flash_llm.models._common.after_attention_weights`), :data:`kernels.L2_WARM_MB` of them;
        None where that is 0 or the engine is not on CUDA.  Built on first use for the weights the layers hold (a
        host read of their slice starts: :meth:`_capture` asks before it captures) and kept while the engine lives, so
        a graph captured over a table never sees it freed."""
        if self.device.type != "cuda":
            return None
        from . import kernels

        if kernels.L2_WARM_MB <= 0:
            return None
        layers = {m.self_attn.layer_idx: m for m in self.model.modules()
                  if hasattr(m, "after_attention") and hasattr(getattr(m, "self_attn", None), "layer_idx")}
        weights = [after_attention_weights(layers[i]) if i in layers else [] for i in range(len(self.cache.k))]
        key = (kernels.L2_WARM_MB, tuple((t.data_ptr(), t.numel()) for ws in weights for w in ws
                                          for t in ([w] if isinstance(w, torch.Tensor) else w.tensors().values())))
        if key not in self._l2_tables:
            budget = int(kernels.L2_WARM_MB * 2**20)
            self._l2_tables[key] = [kernels.l2_warm_ranges(ws, budget) for ws in weights]
        return self._l2_tables[key]

    def _l2_side(self) -> "torch.cuda.Stream | None":
        """The side stream the warm-up's own kernel runs on (:data:`flash_llm.kernels.L2_WARM_SIDE`), made on first
        use; None when that is off."""
        from . import kernels

        if not kernels.L2_WARM_SIDE:
            return None
        if self._l2_stream is None:
            self._l2_stream = torch.cuda.Stream(self.device)
        return self._l2_stream

    def _capture(self, b: int, kv: int) -> torch.cuda.CUDAGraph:
        # the key of the tensors this graph reads: a forward may have moved some since the generate began (a model
        # built on meta computes its RoPE frequencies at its first forward), so graphs over the old ones go now
        self._check_graphs()
        self._install_layout(b)
        self._l2_next()  # (its tables are built outside the capture: they read the weights' slice starts)
        saved = (self._slot.clone(), self._pos[:b].clone(), self._mask[:b].clone())
        # The warm-up steps (and the capture) run from a valid state: the slot among the ``kv`` slots attended, the
        # positions inside the position tables (``max_seq`` of them at least).  A capture during a generation is
        # there already (clamped to itself); warmup's later ones come after its generations ended, the slot up to
        # the cache's end.  Clamped in place on the device (no host read): a graph reads the state at its replay,
        # so what it records is the same.
        last = min(kv, self.max_seq) - 1
        self._slot.clamp_(max=last)
        self._pos[:b].clamp_(max=last)
        valid = (self._slot.clone(), self._pos[:b].clone())

        def restore(state):
            self._slot.copy_(state[0])
            self._pos[:b].copy_(state[1])
            self._mask[:b].copy_(saved[2])

        # Warm-up on a side stream (kernel loading, cuBLAS workspaces), the valid state restored after each run: the
        # cache slot it wrote is written again by the real step (or, after a generation, masked until written).
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self._step(b, kv)
                restore(valid)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        from . import kernels  # (CUDA only, like the graphs)

        graph = torch.cuda.CUDAGraph()
        # the weights are fixed while the graph runs: the spmm kernels may load theirs before the previous kernel
        # finishes (kernels.static_weights)
        with torch.cuda.graph(graph, pool=self._pool), kernels.static_weights():
            self._step(b, kv)  # recorded, not run
        restore(saved)  # (the state as it was: a generation goes on from it)
        self._graphs[(b, kv)] = graph
        if self.tp is not None:
            self.tp.track_graph(graph)  # reset when the group is closed (NCCL work captured in it)
        return graph

    def _decode(self, b: int, kv: int) -> torch.Tensor:
        """A decode step of rows ``0..b-1`` attending the first ``kv`` cache slots (:meth:`_step`), from its graph
        where ``cuda_graphs`` (captured at its first use); the logits ``[b, V]``."""
        if self.cuda_graphs:
            graph = self._graphs.get((b, kv)) or self._capture(b, kv)
            graph.replay()
        else:
            self._install_layout(b)
            self._step(b, kv)
        return self._logits[:b]

    def _compacted(self, known: torch.Tensor, b: int, rows: torch.Tensor | None, used: int
                   ) -> tuple[int, torch.Tensor | None]:
        """The decode's batch size and rows after dropping rows that ``known`` (the prompts' stop flags ``[B]`` of a
        recent step, on the host) says have stopped: the decode shrinks to the power of two at or above the rows still
        going (stopped rows fill it up, their tokens padding as before), where that is smaller than ``b``, so its batch
        sizes stay few (:meth:`warmup` captures them).  The rows kept move to rows ``0 .. n - 1`` of the cache (their
        first ``used`` slots), positions, mask and next tokens, in order.  Else ``(b, rows)`` unchanged.  ``rows``:
        the prompts' rows of the decode's rows (None: all)."""
        known = known.cpu()  # (one copy, where the flags are read on the device: FLASH_LLM_HOST_COPIES=0)
        cur = list(range(b)) if rows is None else rows.tolist()
        live = [j for j, r in enumerate(cur) if not bool(known[r])]
        n = 1 << max(0, len(live) - 1).bit_length()  # (1, 2, 4, 8, ...)
        if not live or n >= b:
            return b, rows
        going = set(live)
        keep = sorted(live + [j for j in range(b) if j not in going][: n - len(live)])
        idx = torch.tensor(keep, dtype=torch.long, device=self.device)
        for t in (*self.cache.k, *self.cache.v):  # (advanced indexing gathers a copy first)
            t[:n, :, :used] = t[idx, :, :used]
        self._pos[:n] = self._pos[idx]
        self._mask[:n] = self._mask[idx]
        self._tok[:n] = self._tok[idx]  # (the token each row feeds next)
        return n, torch.tensor([cur[j] for j in keep], dtype=torch.long, device=self.device)

    def _decode_graph(self, b: int) -> torch.cuda.CUDAGraph:
        """The captured decode graph of batch ``b`` that attends the most slots (benchmarks and tests replay it)."""
        keys = [key for key in self._graphs if key[0] == b]
        if not keys:
            raise KeyError(f"no decode graph of batch {b} captured")
        return self._graphs[max(keys)]

    def _mark(self):
        if self.device.type == "cuda":
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    @staticmethod
    def _seconds(a, b) -> float:
        return a.elapsed_time(b) / 1e3 if isinstance(a, torch.cuda.Event) else b - a

    # ---- generation ------------------------------------------------------------------------------------
    def _sampler(self, temperature, top_k, top_p, generator) -> Callable[[torch.Tensor], torch.Tensor]:
        # (numpy scalars and 0-d tensors, a config's or a sweep's, taken as their values: _as_float, _as_int)
        t = _temperature_arg(temperature)
        k, q = _top_args(top_k, top_p)
        if generator is not None:
            if not isinstance(generator, torch.Generator):
                raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
            if generator.device.type != self.device.type:
                raise ValueError(f"generator is on {generator.device} but the model is on {self.device}; create it "
                                 f"with torch.Generator(device={str(self.device)!r})")
        if t == 0 and (top_k is not None or top_p is not None or generator is not None):
            given = "generator applies" if top_k is None and top_p is None else "top_k / top_p apply"
            raise ValueError(f"{given} to sampling; set temperature > 0 (temperature=0 is greedy)")
        return lambda logits: _sample(logits, t, k, q, generator)  # (checked here, once)

    def _eos(self, eos_token_id) -> tuple[int, ...]:
        if isinstance(eos_token_id, str) and eos_token_id == _FROM_CONFIG:
            return self.config.eos_token_ids
        if eos_token_id is None:
            return ()
        def token(v) -> int | None:  # (a Python or numpy int; a tensor, even 0-d, is no token id here)
            return None if isinstance(v, torch.Tensor) else _as_int(v)

        one = token(eos_token_id)
        try:
            ids = (one,) if one is not None else tuple(token(i) for i in eos_token_id)
        except TypeError:  # (a bool, a float, an object: not a token id nor a list of them)
            ids = None
        if ids == () and not isinstance(eos_token_id, (str, bytes, torch.Tensor)):  # ([]: no stop token, as a config's)
            return ()
        if not ids or any(i is None or not 0 <= i < self.config.vocab_size for i in ids):
            raise ValueError(f"eos_token_id must be None, a token id or a list of token ids below the vocabulary "
                             f"size {self.config.vocab_size}; got {eos_token_id!r}")
        return ids

    def _run(self, *args, **kwargs) -> Iterator[tuple[torch.Tensor, Generation | None]]:
        """:meth:`_steps`, with the model's own sparse layers put back in place however it ends (a stream left early
        may stop it right after a prefill on ``prefill_dense``'s copies).  Each stretch of :meth:`_steps` between two of
        its yields (the prefill, a decode step, the result) runs under the engine's lock, released while the caller has
        the tokens: a generation begun in another thread waits for the step in flight, then takes the engine over,
        and the older one raises "overtaken" at its next step (its check comes after the lock is taken).  Until
        session 86 the older step went on writing the positions, slot and cache under the newer generation, which
        decoded wrong tokens silently.  Each stretch runs with ``torch.autocast`` off (:func:`_autocast_off`): the
        engine computes in its dtype (autocast to another is refused at the call, :meth:`_check_autocast`), and a graph
        captured in a stretch does not record the caller's autocast."""
        me = object()  # (this generation, once _steps has taken the engine over)
        steps = self._steps(*args, owner=me, **kwargs)
        try:
            while True:
                with self._lock, _autocast_off(self.device), _device_current(self.device):
                    try:
                        item = next(steps)
                    except StopIteration:
                        return
                yield item
        finally:
            with self._lock, _autocast_off(self.device), _device_current(self.device):
                steps.close()
                if self._dense is not None and self._generation is me:  # (else the newer one's layout)
                    self._dense.install(False)

    def _request(self, prompts, max_new_tokens, attention_mask=None, temperature=0.0, top_k=None, top_p=None,
                 generator=None, eos_token_id=_FROM_CONFIG, *, on_token=None, output_logits=False,
                 stream: dict | None = None) -> "_Request":
        """A generation's arguments checked and prepared (:meth:`_checked_request`), at the call: a bad one raises
        before the engine is taken over.  Tensor-parallel, the ranks then compare their inputs and the options that
        change the steps' collectives (:func:`_compared`: a collective, two small all-reduces), also where a rank's own
        checks refused its call, so that every rank raises: a call refused on some ranks only raises the
        ``ValueError`` "... differ between the K tensor-parallel ranks" on every rank (until session 83 the refusing
        rank raised alone and the others waited in the comparison until the timeout; until its review the checks of
        ``on_token``, ``output_logits`` and ``stream()``'s keywords came before the comparison, and those two options
        were not compared: ranks that differed in them mismatched their collectives); one refused on every rank
        raises each rank's own error."""
        args = (prompts, max_new_tokens, attention_mask, temperature, top_k, top_p, generator, eos_token_id,
                on_token, output_logits, stream)
        if self.tp is None:
            return self._checked_request(*args)
        try:
            request, error = self._checked_request(*args), None
        except Exception as e:  # (raised below, once the other ranks know of it)
            request, error = None, e
        what = ("the call (generate(), generate(on_token=...) or stream(); output_logits), prompts, max_new_tokens "
                "or eos_token_id")
        try:
            self.tp.check_same(what, _compared(request))
        except ValueError:
            if error is None:
                raise
            raise ValueError(f"{what} differ between the {self.tp.world_size} tensor-parallel ranks: this rank "
                             f"({self.tp.rank}) refused its call ({type(error).__name__}: {error}) where another "
                             f"rank accepted its own; every rank must make the same call with the same "
                             f"inputs") from error
        if error is not None:  # (refused on every rank)
            raise error
        return request

    def _checked_request(self, prompts, max_new_tokens, attention_mask, temperature, top_k, top_p, generator,
                         eos_token_id, on_token, output_logits, stream) -> "_Request":
        """A generation's arguments checked and prepared (``on_token``, ``output_logits``, :meth:`_sampler`,
        :meth:`_eos`, :meth:`_prepare`) on this process alone, after the model's dtype and device
        (:meth:`_check_model`) and the caller's autocast (:meth:`_check_autocast`).  ``stream``: ``stream()``'s keyword
        arguments other than the ones it shares with ``generate()`` (None: a ``generate()`` call)."""
        self._check_model()
        self._check_autocast()
        if stream is not None and "on_token" in stream:
            raise TypeError("stream() yields the tokens; on_token belongs to generate()")
        if on_token is not None and not callable(on_token):
            raise TypeError(f"on_token must be None or a callable on_token(step, tokens), got "
                            f"{type(on_token).__name__}")
        _check_output_logits(output_logits)
        if stream:
            raise TypeError(f"stream() got unexpected keyword arguments {sorted(stream)}")
        sampler = self._sampler(temperature, top_k, top_p, generator)
        if self.tp is not None:  # every rank takes rank 0's tokens, so all run the same steps
            sampler = _from_rank0(sampler, self.tp)
        eos = self._eos(eos_token_id)
        with torch.no_grad():
            ids, mask, lengths, limits = self._prepare(prompts, attention_mask, max_new_tokens)
        # (one limit a row: the steps run to the largest, a row stops at its own)
        return _Request(sampler, eos, ids, mask, lengths, limits,
                        _as_int(max_new_tokens) if limits is None else max(limits),
                        None if _temperature_arg(temperature) == 0 else _Rng(generator, self.device),
                        per_step_sync=stream is not None or on_token is not None, output_logits=output_logits)

    # a generator: grad is off while its body runs and the caller's own between its yields (until session 76 a `with`
    # block spanning the yields left it off in a stream's loop and in on_token, or set it back when a stream was
    # closed).  Inference mode is off there too (session 83): the tensors the body makes (stop flags, a prefill graph's
    # static inputs) are normal ones, so a stream begun under torch.inference_mode() goes on outside it, as does a
    # later request.
    @torch.inference_mode(False)
    @torch.no_grad()
    def _steps(self, request: "_Request", owner: object | None = None
               ) -> Iterator[tuple[torch.Tensor, Generation | None]]:
        """Yields ``(tokens [B], None)`` per step, then ``(None, Generation)`` once.  Without the request's
        ``per_step_sync`` the tokens stay on the device, yielded as each step is launched; with it (streaming) they come
        on the CPU, each step's once the next is launched (:class:`_HostCopies`), so the device never waits for the
        consumer.  A step launched after every row had stopped is dropped (its tokens neither yielded nor kept).
        Where the rows still going fit a smaller power of two than the batch decoded, they move to the first rows and
        decode as that batch (:meth:`_compacted`, :data:`COMPACT_ROWS`, not with the request's ``output_logits``).
        ``owner``: the object that stands for this generation in ``_generation`` (:meth:`_run`'s; default a new one)."""
        self._check_graphs()
        self._pending = None  # (a generation left unfinished does not capture its prefill)
        # one generation at a time: the cache, the step's inputs and its logits are the engine's.  A later one takes
        # them over; this one then raises at its next step instead of decoding from the other's state.
        me = self._generation = object() if owner is None else owner

        def check():
            if self._generation is not me:
                raise RuntimeError("this generation was overtaken: another generate() or stream() ran on the same "
                                   "engine before it finished (an engine decodes one generation at a time: finish "
                                   "or close a stream before the next, or use one engine each)")
        # (ranks compared: _request)
        sampler, eos, ids, mask, lengths, limits, max_new_tokens, rng, per_step_sync, output_logits = request
        b = ids.shape[0]
        eos_t = torch.tensor(eos, dtype=torch.long, device=self.device) if eos else None
        pad = self.config.pad_token_id if self.config.pad_token_id is not None else eos[0] if eos else 0
        # what a stopped row is fed (its output shows pad): a token of the vocabulary (a config's pad id, or its eos
        # id where it has no pad id, may be -1 or the vocabulary's size): pad, else the first stop token that is one,
        # else 0
        feed = next((t for t in (pad, *eos) if 0 <= t < self.config.vocab_size), 0)
        marks = [self._mark()]
        if self._prefills is not None:
            ids, mask = self._bucketed(ids, mask, max_new_tokens)
        p = ids.shape[1]  # (the padded prompt: step i writes cache slot p + i - 1 and attends slots 0 .. p + i - 1)
        # The slots the decode steps attend past the prompt before (or without) writing them, zeroed in rows 0 .. b - 1:
        # masked (-inf), but a value an earlier generation left there (an fp16 overflow's inf / NaN) reached this one's
        # attention through its weight 0 (0 x inf = NaN: every later token wrong, until session 88).  One kernel
        # (KVCache.zero_slots), before the prefill and outside its graph and the decode graphs: a graph serves every
        # max_new_tokens.  The rows a compaction moves keep them (it copies the written slots only).
        self.cache.zero_slots(b, p, decode_kv_len(p + max_new_tokens - 1, self._slots) if max_new_tokens > 1 else p)
        logits = self._prefill(ids, mask) if self._prefills is None else self._prefill_replayed(ids, mask)
        kept = [logits.clone()] if output_logits else None
        tok = sampler(logits)
        limit_t = torch.tensor(limits, dtype=torch.long, device=self.device) if limits is not None else None
        stops = bool(eos) or limits is not None  # (rows may stop before the last step)
        done = torch.isin(tok, eos_t) if eos else torch.zeros_like(tok, dtype=torch.bool) if stops else None
        if limit_t is not None:
            done |= limit_t <= 1
        # rows' stop flags read EOS_LAG steps late (a CPU reads them every step); streaming: tokens handed over
        watch = _HostCopies(self.device) if stops and not per_step_sync and _lagged_stop(self.device) else None
        hand = _HostCopies(self.device) if per_step_sync and HOST_COPIES else None
        if watch is not None:
            watch.add(0, done)
        self._tok[:b, 0].copy_(tok)
        marks.append(self._mark())
        out = [tok]
        if hand is None:
            yield tok, None
            check()
        else:
            hand.add(0, tok, done)
        b0, rows = b, None  # the decode runs rows 0 .. b - 1, which are the prompts' rows `rows` (None: all)
        # The decode of step i shrinks (_compacted) by the rows' stop flags of step i - lag, however soon the host
        # has them: at once (a CPU, HOST_COPIES off), a step late (streaming) or EOS_LAG steps late (generate() on a
        # GPU).  The sampler's draws follow the decode's batch size, so with one step for all a seed gives the same
        # tokens through generate(), on_token and stream() (until session 76 each shrank the batch at a step of its
        # own).  It costs a GPU nothing: generate() compacted from step i - EOS_LAG's flags there already, and
        # streaming keeps the flags its hand-over copies anyway a step longer; no synchronization is added.
        lag = max(EOS_LAG, 2)  # (streaming: step i - 2's flags are on the host when step i is launched)
        compact = stops and COMPACT_ROWS and not output_logits
        flags: dict[int, torch.Tensor] = {}  # step -> the rows' stop flags [B] after it, until the decode reads them
        # step -> the random stream's state before its sampling (the last lag + 1 steps): a step launched past the end
        # and dropped gives its draws back (_Rng), so the next request samples as after a CPU's generate()
        states: dict[int, torch.Tensor] = {}
        for i in range(1, max_new_tokens):
            if stops and hand is None:
                if watch is not None:
                    seen = (watch.take(i - EOS_LAG) or [None])[0]
                    if seen is not None and compact:
                        flags[i - EOS_LAG] = seen
                else:
                    seen = done
                    if compact:
                        flags[i - 1] = done.clone()  # (done changes in place)
                if seen is not None and bool(seen.all()):
                    if watch is not None and i - EOS_LAG + 1 in states:  # steps i - EOS_LAG + 1 .. i - 1 ran past
                        rng.set_state(states[i - EOS_LAG + 1])
                    break
            known = flags.pop(i - lag, None)  # (only kept where compact)
            if known is not None:
                b, rows = self._compacted(known, b, rows, p + i - 1)
            logits = self._decode(b, decode_kv_len(p + i, self._slots))
            if output_logits:
                kept.append(logits.clone())
            if rng is not None:
                states[i] = rng.get_state()
                states.pop(i - lag - 1, None)
            tok = sampler(logits)
            if rows is not None:  # (the rows stopped and dropped from the decode get the padding)
                tok = torch.full((b0,), pad, dtype=tok.dtype, device=tok.device).index_copy_(0, rows, tok)
            if stops:
                tok = tok.masked_fill(done, pad)
                if eos:
                    done |= torch.isin(tok, eos_t)
                if limit_t is not None:
                    done |= limit_t <= i + 1  # (the row's token i was its last)
                if watch is not None:
                    watch.add(i, done)
            fed = tok if not stops or feed == pad else tok.masked_fill(done, feed)
            self._tok[:b, 0].copy_(fed if rows is None else fed[rows])
            marks.append(self._mark())
            out.append(tok)
            if hand is None:
                yield tok, None
                check()
                continue
            hand.add(i, tok, done)
            prev, prev_done = hand.take(i - 1)  # (step i runs meanwhile)
            yield prev, None
            check()
            if compact:
                flags[i - 1] = prev_done
            if prev_done is not None and bool(prev_done.all()):  # step i ran past the end: dropped
                if rng is not None:
                    rng.set_state(states[i])
                hand.close()
                out.pop()
                marks.pop()
                if output_logits:
                    kept.pop()
                break
        else:  # (ran to max_new_tokens: generate() on a GPU may have sampled steps after every row had stopped)
            if watch is not None and rng is not None:  # (one wait, for a sampling generation with stops)
                for j in sorted(watch.pending):
                    seen = watch.take(j)[0]
                    if seen is not None and bool(seen.all()):
                        if j + 1 in states:
                            rng.set_state(states[j + 1])
                        break
        if hand is not None and hand.pending:  # (the last step's tokens, where the steps ran to the end)
            yield hand.take(len(out) - 1)[0], None
            check()
        tokens = torch.stack(out, 1)
        if eos:  # length up to and including the first EOS of each row
            hit = torch.isin(tokens, eos_t)
            n = tokens.shape[1]
            first = torch.where(hit, torch.arange(n, device=self.device), n).min(1).values
            lens = torch.clamp(first + 1, max=n)
        else:
            lens = torch.full((b0,), tokens.shape[1], dtype=torch.long, device=self.device)
        if limit_t is not None:
            lens = torch.minimum(lens, limit_t)
        if self.device.type == "cuda":
            marks[-1].synchronize()
        for copies in (watch, hand):
            if copies is not None:
                copies.close()
        secs = [self._seconds(x, y) for x, y in zip(marks, marks[1:])]
        self._capture_pending()  # (after the last step's time is taken)
        if self._dense is not None:  # (the model's own sparse layers back in place, also after a prefill alone)
            self._dense.install(False)
        yield None, Generation(tokens=tokens.cpu(), lengths=lens.cpu(), prompt_lengths=lengths, ttft_s=secs[0],
                               step_s=secs[1:], logits=torch.stack(kept, 1).cpu() if output_logits else None)

    def generate(self, prompts, max_new_tokens: int | Sequence[int], *, attention_mask: torch.Tensor | None = None,
                 temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 generator: torch.Generator | None = None, eos_token_id=_FROM_CONFIG,
                 on_token: Callable[[int, torch.Tensor], None] | None = None,
                 output_logits: bool = False) -> Generation:
        """Generate up to ``max_new_tokens`` tokens for every prompt.

        Args:
            prompts: a list of token-id lists (any lengths, left-padded here), or a ``[B, P]`` int64 tensor
                (left-padded, with ``attention_mask``).  ``1 <= B <= max_batch``; ``P + max_new_tokens - 1
                <= max_seq``.
            max_new_tokens: tokens to generate per prompt (>= 1), or a list of one limit a prompt: the steps run to
                the largest, and a row stops at its own (padded after it, and dropped from the decode as a row that
                stopped at its EOS is: :data:`COMPACT_ROWS`).
            attention_mask: ``[B, P]`` 0/1 or bool (1 = token) for a tensor of prompts.
            temperature, top_k, top_p, generator: see :func:`sample_tokens`; ``temperature=0`` is greedy.  No
                top-k unless asked (transformers' ``generate(do_sample=True)`` applies ``top_k=50`` by default).
            eos_token_id: stop a row at this token (an int or a list); default the config's
                ``eos_token_id``; ``None`` (or an empty list) never stops early.  Generation ends when every row
                has stopped.
            on_token: called as ``on_token(step, tokens)`` with ``tokens [B]`` int64 on the CPU as soon as
                each step's tokens exist on the host (copied while the next step runs: the device does not wait for
                the callback).
            output_logits: keep every step's logits in :attr:`Generation.logits` (a copy per step).

        Returns:
            A :class:`Generation` (tokens, lengths, time to first token, per-step times).
        """
        request = self._request(prompts, max_new_tokens, attention_mask, temperature, top_k, top_p, generator,
                                eos_token_id, on_token=on_token, output_logits=output_logits)
        steps = self._run(request)
        for step, (tok, result) in enumerate(steps):
            if result is not None:
                return result
            if on_token is not None:
                on_token(step, tok.cpu())
        raise AssertionError("unreachable: _run always ends with a result")

    def warmup(self, batches=(1,), prompt_lengths=(128,), *, progress: bool = False) -> list[tuple[int, int]]:
        """Run a short generation of each shape before the first requests, so they find it ready: the kernels loaded,
        the fused functions compiled (``fuse``: tens of seconds the first time), and with CUDA graphs each
        ``(batch, prefill_bucket(length))``'s prefill graph and each batch size's decode graphs captured (one for each
        length the steps may attend, :func:`decode_kv_len`, from the shortest prompt's up to ``max_seq``; and the
        powers of two below each batch size, which a batch whose rows stop shrinks to: :data:`COMPACT_ROWS`).

        Args:
            batches: batch sizes (each ``1 .. max_batch``).
            prompt_lengths: prompt lengths in tokens; lengths of one bucket (:func:`prefill_bucket`) warm one graph.
            progress: a progress bar over the shapes.

        Returns:
            The ``(batch, padded prompt length)`` shapes run, in order.  At most :attr:`prefill_graphs_max` prefill
            graphs are kept (a warning says so where more shapes are given: the first ones are dropped).  A request
            whose prompt and new tokens leave no room in the cache for its bucket keeps its own length, and so
            another graph.
        """
        batches, lengths = list(batches), list(prompt_lengths)
        for i, b in enumerate(batches):  # (numpy ints and 0-d tensors as their values: _as_int)
            if (n := _as_int(b)) is None or not 1 <= n <= self.max_batch:
                raise ValueError(f"batches: {b!r} is not a batch size of this engine (1 to max_batch={self.max_batch})")
            batches[i] = n
        for i, m in enumerate(lengths):
            if (n := _as_int(m)) is None or not 1 <= n <= self.max_seq - 1:
                raise ValueError(f"prompt_lengths: {m!r} is not a prompt length this engine can extend (1 to "
                                 f"max_seq - 1 = {self.max_seq - 1})")
            lengths[i] = n
        if not batches or not lengths:
            raise ValueError("warmup needs at least one batch size and one prompt length")
        limit = self.max_seq - 1  # (a prompt, then 2 new tokens)
        padded = sorted({prefill_bucket(n, limit) if PREFILL_BUCKETS and self._prefills is not None else n
                         for n in lengths})
        shapes = [(b, n) for b in batches for n in padded]
        keep = self.prefill_graphs_max
        if self._prefills is not None and len(shapes) > keep:
            warnings.warn(f"Engine.warmup: {len(shapes)} prefill shapes, but the engine keeps {keep} prefill graphs "
                          f"(Engine(prefill_graphs=...)); the first {len(shapes) - keep} are dropped again",
                          RuntimeWarning, stacklevel=2)
        from tqdm import tqdm

        for b, n in tqdm(shapes, desc="warm-up", unit="shape", disable=not progress):
            self.generate([[0] * n for _ in range(b)], 2, eos_token_id=None)
        if self.cuda_graphs:  # (the decode graphs of the longer lengths, which a long generation would capture midway,
            # and of the batches its rows' stops shrink it to: COMPACT_ROWS)
            sizes = set(batches) | ({1 << k for b in batches for k in range(b.bit_length()) if 1 << k < b}
                                            if COMPACT_ROWS else set())
            # (not while another thread's step runs; autocast as in _run; without autograd, as the generations' own
            # captures: with grad on, a capture over trainable weights recorded autograd state into the cache and
            # kept the step's saved tensors alive, until session 88)
            with self._lock, _autocast_off(self.device), _device_current(self.device), torch.no_grad():
                for b in sorted(sizes):
                    for kv in self._kv_lengths(padded[0] + 1):
                        if (b, kv) not in self._graphs:
                            self._capture(b, kv)
        return shapes

    def _kv_lengths(self, n: int) -> list[int]:
        """The lengths decode steps attend (:func:`decode_kv_len`) from sequences of ``n`` tokens up to the cache's
        end, in order."""
        out = [decode_kv_len(n, self._slots)]
        while out[-1] < self._slots:
            out.append(decode_kv_len(out[-1] + 1, self._slots))
        return out

    def stream(self, prompts, max_new_tokens: int | Sequence[int], **kwargs) -> Iterator[torch.Tensor]:
        """Like :meth:`generate` (same keyword arguments except ``on_token``), but yields each step's tokens
        ``[B]`` (int64, CPU) as they come (each once the next step is launched, so the device does not wait for the
        consumer); the :class:`Generation` is :attr:`last` when the iteration ends.  Bad arguments raise here, at the
        call, not at the first token."""
        args = {k: kwargs.pop(k) for k in ("attention_mask", "temperature", "top_k", "top_p", "generator",
                                           "eos_token_id", "output_logits") if k in kwargs}
        request = self._request(prompts, max_new_tokens, **args, stream=kwargs)  # (kwargs: the others, refused there)
        self.last = None
        return self._stream(request)

    def _stream(self, request: "_Request") -> Iterator[torch.Tensor]:
        for tok, result in self._run(request):
            if result is not None:
                self.last = result
                return
            yield tok.cpu()

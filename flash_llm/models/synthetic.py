"""Models at real shapes with random weights, pruned to a chosen unstructured sparsity and compressed layer by
layer directly on the target device, for throughput and memory measurements.

::

    model, report = build_synthetic("opt-66b", sparsity=0.8, device="cuda")   # ~36 GB instead of 131 GB
    print(report)

The skeleton is built on ``meta``; each projection is then drawn on the device (normal values, each kept with
probability ``1 - sparsity``), compressed (``BitmapTiles``, or ``TiledCSL`` with ``fmt="tiled-csl"``) and swapped in
as a ``SparseLinear`` before the next is drawn, so peak memory is the compressed model plus one dense projection
and the compression temporaries.  ``sparsity=None`` builds the dense model the same way (baselines).
What cannot fit in the device's free memory is refused before anything is allocated.
"""

from __future__ import annotations

import functools
import gc
import math
import operator
import os
import sys
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from ..nn import FORMAT_NAMES, SparseLinear, _delta_rows_too_wide
from ..parallel.layers import COLUMN, check_divisible, parallel_linear, set_local_heads, shard_plan
from ..parallel.layers import projections as tp_projections
from ..prune import _real
from . import INIT_STD, from_config
from .config import ModelConfig, preset
from .llama import rope_inv_freq

_STRIP_M, _STRIP_K = 16, 64  # BitmapTiles strip
_CHUNK = 1 << 26  # elements drawn per chunk (fp32 temporaries of 256 MB)
# Bytes an element of a chunk that _draw's float32 temporaries take at their peak, beside the weight it fills: the
# values (4; dense), and to prune them their magnitudes (4) and the mask (1)
_DRAW_TEMP_DENSE, _DRAW_TEMP_SPARSE = 4, 9
# Device memory one projection's compression takes at its peak, in multiples of its dense fp16 bytes
# (the dense weight, the fragment-order copy, masks, and the int64 indices of the nonzeros that
# BitmapTiles.from_dense gathers: about 8x at 50 % density; 10x leaves room).
_COMPRESS_PEAK = 10.0


class DoesNotFit(RuntimeError):
    """The model would not fit in the device's free memory (raised before anything is allocated)."""


def bitmap_formula_bytes(m: int, k: int, nnz: float) -> float:
    """The BitmapTiles size of an ``[m, k]`` weight with ``nnz`` nonzeros, from its format description: one bit
    per element of the strip-padded matrix, 2 bytes per nonzero, 4 bytes per strip offset (plus one), and each
    strip's values padded to 16 bytes, as expected for nonzeros placed at random (each element of a 1024-element strip
    nonzero with probability ``nnz / elements``: on average ~7 bytes a strip; none at density 0 or 1).  What it leaves
    out is only how far a weight's strips stray from that average (session 74: without the padding the formula was
    3.0 % short at 95 % sparsity)."""
    t = math.ceil(m / _STRIP_M) * math.ceil(k / _STRIP_K)
    return t * (_STRIP_M * _STRIP_K / 8 + _expected_strip_padding(nnz / (t * _STRIP_M * _STRIP_K))) + 2 * nnz \
        + 4 * (t + 1)


def _expected_strip_padding(p: float) -> float:
    """The expected bytes that pad a BitmapTiles strip's values (2 bytes each) up to 16, where each of its 1024
    elements is nonzero with probability ``p`` (:func:`_expected_pad_entries`: up to a multiple of 8 values)."""
    return 2 * _expected_pad_entries(_STRIP_M * _STRIP_K, p, 8)


@functools.lru_cache(maxsize=256)
def _expected_pad_entries(n: int, p: float, multiple: int) -> float:
    """The expected entries that pad a count up to a multiple of ``multiple``, where each of ``n`` elements is
    nonzero with probability ``p``: the binomial count's distribution modulo ``multiple``, in logs (no overflow);
    0 at density 0 or 1."""
    if not 0.0 < p < 1.0:
        return 0.0
    lp, lq = math.log(p), math.log1p(-p)
    logs = [math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1) + j * lp + (n - j) * lq
            for j in range(n + 1)]
    top = max(logs)
    weights = [math.exp(v - top) for v in logs]
    return sum(w * ((multiple - j % multiple) % multiple) for j, w in enumerate(weights)) / sum(weights)


def tiled_csl_formula_bytes(m: int, k: int, nnz: float) -> float:
    """The TiledCSL size of an ``[m, k]`` weight with ``nnz`` nonzeros, from its format description: 4 bytes per
    nonzero and 4 per tile offset (plus one), and each 64 x 64 tile's entries padded to a multiple of 4, as expected
    for nonzeros placed at random (each of a tile's 4096 elements nonzero with probability ``nnz / elements``: on
    average ~6 bytes a tile, which at 99 % sparsity, ~41 entries a tile, is 3.6 % of the weight; none at density 0
    or 1).  What it leaves out is only how far a weight's tiles stray from that average."""
    t = math.ceil(m / 64) * math.ceil(k / 64)
    pad = 4 * _expected_pad_entries(64 * 64, nnz / (t * 64 * 64), 4) if t else 0.0
    return 4 * nnz + t * pad + 4 * (t + 1)


def delta_rows_formula_bytes(m: int, k: int, nnz: float, parts: int | None = None, coded: bool = False) -> float:
    """The DeltaRows size of an ``[m, k]`` weight with ``nnz`` nonzeros placed at random, from its format description:
    2.5 bytes per entry (the nonzeros, plus the escapes of gaps over 15 columns: ``q^15 / (1 - q^15)`` per nonzero at
    zero fraction ``q``, less the same for each row that has a nonzero, since the gap after a row's last nonzero is
    never stored: 4.5 % of the weight at 99.5 % sparsity), each row's padding to whole groups of 8 entries (3.5
    entries on average), the split headers (72 bytes per slice and split, at the encoder's default split count) and
    the offsets and row order.  It leaves out the padding of a slice's rows to its longest (rows are ranked by length,
    so neighbours differ little) and how far a weight's rows stray from the expected escape counts.  With the parts
    layout (``parts``, else :func:`~flash_llm.formats.delta_rows.default_parts`: ``P`` lanes a row, one split) each of
    the ``m P`` lanes pads to whole groups, and ``data`` ends with ``P`` words.  ``coded`` (bf16 values coded,
    :meth:`~flash_llm.formats.DeltaRows.code_values`): 2 bytes per entry, plus each row's table of high bytes (8
    bytes), ``data``'s padding to whole groups (half a group on average) and its ``P + 16`` trailing words."""
    from ..formats.delta_rows import CODED_TRAILER, GROUP, GROUP_WORDS, LANES, default_parts, default_splits

    q = min(max(1.0 - nnz / (m * k), 0.0), 1.0 - 1e-12)
    escapes = q ** 15 / (1.0 - q ** 15)  # per gap, of an unbounded stream
    # the trailing gap of each row with a nonzero (probability 1 - q^k) takes no escapes
    entries = nnz * (1.0 + escapes) - m * (1.0 - q ** k) * escapes
    p = default_parts(m, k, int(nnz)) if parts is None else parts
    slices = math.ceil(m * p / LANES)
    splits = 1 if p > 1 else default_splits(m, math.ceil(entries / m / GROUP))
    if coded:
        values = 2.0 * (entries + 3.5 * m * p) + 8 * (slices * LANES // p) + 2 * GROUP_WORDS + 4 * (p + CODED_TRAILER)
    else:
        values = 2.5 * (entries + 3.5 * m * p) + (4 * p if p > 1 else 0)
    return values + 4 * (slices + 1) + 72 * slices * splits + 4 * slices * LANES


_FORMULAS = {"bitmap": bitmap_formula_bytes, "tiled-csl": tiled_csl_formula_bytes,
             "delta-rows": delta_rows_formula_bytes}  # keyed like nn.FORMAT_NAMES


def projection_bytes(model: torch.nn.Module) -> tuple[int, float]:
    """``(stored, formula)``: the bytes of ``model``'s :class:`~flash_llm.SparseLinear` weights as they stand (after
    a merge, or an engine's DeltaRows layout), and the same from their formats' formulas at their nonzero counts (a
    DeltaRows weight at its own lanes a row, its values coded or plain).  Dense projections are not counted."""
    from ..formats import DeltaRows

    by_class = {FORMAT_NAMES[name]: f for name, f in _FORMULAS.items()}
    stored, formula = 0, 0.0
    for mod in model.modules():
        if isinstance(mod, SparseLinear):
            m, k = mod.out_features, mod.in_features
            stored += mod.nbytes
            formula += (delta_rows_formula_bytes(m, k, mod.nnz, mod.weight.parts, mod.weight.coded)
                        if mod.weight_format is DeltaRows
                        else by_class[mod.weight_format](m, k, mod.nnz))
    return stored, formula


def _check_fmt(fmt) -> str:
    if not isinstance(fmt, str):
        raise TypeError(f"fmt must be a str, one of {sorted(FORMAT_NAMES)}, got {type(fmt).__name__}")
    if fmt not in FORMAT_NAMES:
        raise ValueError(f"fmt must be one of {sorted(FORMAT_NAMES)}, got {fmt!r}")
    return fmt


def _check_dtype(dtype) -> torch.dtype:
    """``dtype``, one of the formats' value dtypes (TypeError otherwise: estimates of another would describe no model
    :func:`build_synthetic` builds)."""
    if not isinstance(dtype, torch.dtype) or dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"dtype must be torch.float16 or torch.bfloat16, got {dtype!r}")
    return dtype


def _check_config(config) -> ModelConfig:
    """``config`` as the builders take it: a :class:`ModelConfig`, or a preset name; TypeError otherwise."""
    cfg = preset(config) if isinstance(config, str) else config
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"config must be a ModelConfig or a preset name, got {type(config).__name__}")
    return cfg


def _check_sparsity(sparsity) -> float | None:
    """``sparsity`` as the builders take it: None (or 0) for dense, else a float in (0, 1) (any real number but a
    bool: numpy's floats of every width and 0-d tensors too, see :func:`flash_llm.prune._real`); ValueError
    otherwise."""
    if sparsity is None:
        return None
    value = _real(sparsity)  # (None for a bool: False is refused, as True is)
    if value == 0:
        return None
    if value is None or not 0 < value < 1:  # (NaN fails too)
        raise ValueError(f"sparsity must be None (dense) or a number in (0, 1), got {sparsity!r}")
    return value


def _check_seed(seed) -> int:
    """``seed`` as :func:`build_synthetic` takes it: an int (not a bool) in ``[0, 2**32)``; TypeError / ValueError
    otherwise (torch's CPU generator keeps only the low 32 bits, so wider seeds would collide: 0 and 2**32 would build
    the same model)."""
    if isinstance(seed, bool):
        raise TypeError("seed must be an int, got bool")
    try:
        value = operator.index(seed)
    except TypeError:
        raise TypeError(f"seed must be an int, got {type(seed).__name__}") from None
    if not 0 <= value < 1 << 32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed!r}")
    return value


def _check_memory_limit(memory_limit) -> float | None:
    """``memory_limit`` as :func:`build_synthetic` takes it: None, or a real number >= 0 (not a bool, not NaN);
    TypeError / ValueError otherwise."""
    if memory_limit is None:
        return None
    value = _real(memory_limit)  # (None for a bool or a non-number)
    if value is None:
        raise TypeError(f"memory_limit must be None or a number of bytes, got {type(memory_limit).__name__}")
    if not value >= 0:  # (NaN fails too)
        raise ValueError(f"memory_limit must be None or a number of bytes >= 0, got {memory_limit!r}")
    return value


def _projection_fqns(config: ModelConfig) -> list[tuple[str, int, int]]:
    layers = "model.layers" if config.family == "llama" else "model.decoder.layers"
    return [(f"{layers}.{i}.{name}", m, k) for i in range(config.num_layers) for name, m, k in config.linear_shapes()]


def estimate_bytes(config: ModelConfig | str, sparsity: float | None, dtype: torch.dtype = torch.float16,
                   tp_size: int = 1, fmt: str = "bitmap") -> dict:
    """Device bytes the synthetic model will take, without building it (per rank with ``tp_size`` > 1).

    Returns a dict: ``projections`` (the decoder projections' weights: dense, or the ``fmt`` formula at
    the expected nonzero count; with ``tp_size`` ranks, one rank's slices), ``other`` (embeddings, norms, biases,
    a dense ``lm_head``, a Llama's float32 RoPE ``inv_freq`` buffer: replicated on every rank; exactly the bytes
    the built model holds besides its projections' weights on one rank, an upper bound with ``tp_size`` > 1, where
    the sharded projections' biases are split or kept on rank 0), ``total``, and ``transient`` (the extra peak while one
    projection is drawn and compressed: the float32 temporaries of the draw, a chunk of rows of up to 2**26 elements,
    and the compression's; tensor-parallel builds draw the full projection, then keep a slice).
    ``sparsity``, ``tp_size``, ``dtype`` (fp16 / bf16) and DeltaRows' column limit are checked as
    :func:`build_synthetic` checks them (ValueError / TypeError).
    """
    cfg = _check_config(config)
    sparsity = _check_sparsity(sparsity)
    dtype = _check_dtype(dtype)
    check_divisible(cfg, tp_size)
    formula_bytes = _FORMULAS[_check_fmt(fmt)]
    es = torch.empty(0, dtype=dtype).element_size()
    proj, largest = 0.0, 0
    plan = _split_dims(cfg)
    for name, m, k in cfg.linear_shapes():
        largest = max(largest, m * k)
        if tp_size > 1:  # this rank's slice
            m, k = (m // tp_size, k) if plan[name] == 0 else (m, k // tp_size)
        # (DeltaRows' 16-bit columns: refused here, before anything is built; the encoder's own error came after the
        # embeddings and the narrower projections, naming neither, until session 88)
        if fmt == "delta-rows" and sparsity and (why := _delta_rows_too_wide(k, f"{name} has K =", "fmt")):
            raise ValueError(why)
        proj += formula_bytes(m, k, (1 - sparsity) * m * k) if sparsity else m * k * es
    proj *= cfg.num_layers
    other = (cfg.num_parameters() - cfg.num_layers * sum(m * k for _, m, k in cfg.linear_shapes())) * es
    if cfg.family == "llama":  # the model's one RoPE buffer (float32 whatever dtype, replicated on every rank)
        inv_freq = rope_inv_freq(cfg)
        other += inv_freq.numel() * inv_freq.element_size()
    # _draw's float32 temporaries: up to a chunk of rows, whatever the dtype (the full projection is drawn with tp)
    draw = max(_draw_temp_bytes(m, k, not sparsity) for _, m, k in cfg.linear_shapes())
    full = largest * es  # one projection drawn whole, before it is compressed or sliced
    if tp_size > 1:  # the full dense draw, plus its temporaries or the slice (and its compression temporaries)
        transient = full + max(draw, full * (_COMPRESS_PEAK if sparsity else 1.0) / tp_size)
    elif sparsity:  # the dense draw and its temporaries, then its compression (the dense weight among them)
        transient = max(full + draw, full * _COMPRESS_PEAK)
    else:  # the weight drawn is the one kept (counted in ``projections``): only the draw's temporaries
        transient = draw
    return {"projections": int(proj), "other": int(other), "total": int(proj + other), "transient": int(transient)}


def _split_dims(cfg: ModelConfig) -> dict[str, int]:
    """The weight dimension tensor parallelism splits, per projection: 0 (output features) or 1 (input)."""
    return {name: 0 if kind == COLUMN else 1 for name, kind in shard_plan(cfg).items()}


@dataclass
class SyntheticReport:
    """What :func:`build_synthetic` built.

    Attributes:
        name, sparsity, dtype, device: as requested (``sparsity`` None for dense).
        achieved_sparsity: zeros / elements over all decoder projections.
        projection_bytes: bytes of the decoder projections' weights as stored (compressed arrays, or dense).
        fmt: the compressed format (``"bitmap"``, ``"tiled-csl"`` or ``"delta-rows"``).
        formula_bytes: the same from the format's formula (:func:`bitmap_formula_bytes`,
            :func:`tiled_csl_formula_bytes`, :func:`delta_rows_formula_bytes`) at the achieved nonzero counts
            (dense: M*K*2).
        other_bytes: every other parameter and buffer (embeddings, norms, biases, dense ``lm_head``).
        allocated_bytes: growth of ``torch.cuda.memory_allocated`` over the build (CUDA only, else 0).
        peak_bytes: ``torch.cuda.max_memory_allocated`` during the build minus the memory in use before it.
        seconds: build time.
        layers: ``(fqn, out_features, in_features, nnz, bytes)`` per projection as stored (this rank's slice).
        tp_rank, tp_size: the rank and world size of a tensor-parallel build (0 and 1 otherwise); every count
            above is then this rank's.
    """

    name: str
    sparsity: float | None
    dtype: torch.dtype
    device: str
    achieved_sparsity: float = 0.0
    projection_bytes: int = 0
    formula_bytes: float = 0.0
    other_bytes: int = 0
    allocated_bytes: int = 0
    peak_bytes: int = 0
    seconds: float = 0.0
    layers: list = field(default_factory=list, repr=False)
    tp_rank: int = 0
    tp_size: int = 1
    fmt: str = "bitmap"

    @property
    def weight_bytes(self) -> int:
        """All weights as stored: projections plus everything else."""
        return self.projection_bytes + self.other_bytes

    @property
    def formula_ratio(self) -> float:
        """Stored projection bytes / the format's formula (1.0 = exactly the formula)."""
        return self.projection_bytes / self.formula_bytes if self.formula_bytes else math.nan

    def __str__(self) -> str:
        from ..nn import _human as h

        kind = ("dense" if self.sparsity is None
                else f"{self.sparsity:.0%} sparse (achieved {self.achieved_sparsity:.4f}), {self.fmt}")
        where = f"{self.device}" + (f" (rank {self.tp_rank} of {self.tp_size})" if self.tp_size > 1 else "")
        lines = [f"{self.name}: {kind}, {str(self.dtype).removeprefix('torch.')}, on {where}, built in "
                 f"{self.seconds:.1f} s",
                 f"  projections {h(self.projection_bytes)} (format formula {h(int(self.formula_bytes))}, "
                 f"ratio {self.formula_ratio:.4f}); other weights {h(self.other_bytes)}; total {h(self.weight_bytes)}"]
        if self.allocated_bytes:
            lines.append(f"  device memory: {h(self.allocated_bytes)} allocated, build peak {h(self.peak_bytes)}")
        return "\n".join(lines)


def _draw(m: int, k: int, density: float, dtype, device, gen: torch.Generator,
          std: float = INIT_STD) -> torch.Tensor:
    """``[m, k]`` of ``dtype``: normal(0, ``std``) values pruned by magnitude, those below the threshold that keeps
    a share ``density`` of them in expectation zeroed (so each element is kept with probability ``density``,
    independently, as a random mask would, and the kept values are the large ones, as in a pruned model:
    ``DeltaRows.code_values`` depends on that); drawn in row chunks so the float32 temporaries stay small."""
    w = torch.empty(m, k, dtype=dtype, device=device)
    rows = max(1, _CHUNK // k)
    # P(|v| >= t) = density for v ~ N(0, std^2)
    t = std * float(torch.special.ndtri(torch.tensor(1.0 - density / 2, dtype=torch.float64)))
    for r in range(0, m, rows):
        n = min(rows, m - r)
        v = torch.randn(n, k, generator=gen, device=device).mul_(std)  # (in place: one float32 chunk, not two)
        if density < 1.0:
            v.masked_fill_(v.abs() < t, 0.0)
        w[r:r + n] = v
        del v  # (before the next chunk is drawn: never two chunks at once)
    return w


def _draw_temp_bytes(m: int, k: int, dense: bool) -> int:
    """The peak bytes of :func:`_draw`'s float32 temporaries for an ``[m, k]`` weight (besides the weight itself):
    one chunk of rows (:data:`_CHUNK` elements at most, a whole row at least) at :data:`_DRAW_TEMP_DENSE` or
    :data:`_DRAW_TEMP_SPARSE` bytes an element."""
    return min(m, max(1, _CHUNK // k)) * k * (_DRAW_TEMP_DENSE if dense else _DRAW_TEMP_SPARSE)


def _materialize_(module: nn.Module, device, gen, std: float = INIT_STD) -> None:
    """Give ``module``'s own meta parameters/buffers (not its children's) memory on ``device``, then init (linear and
    embedding weights normal(0, ``std``))."""
    for name, p in list(module._parameters.items()):
        if p is not None and p.is_meta:
            module._parameters[name] = nn.Parameter(torch.empty_like(p, device=device), requires_grad=False)
    for name, b in list(module._buffers.items()):
        if b is not None and b.is_meta:
            module._buffers[name] = torch.empty_like(b, device=device)
    for name, p in module._parameters.items():
        if p is None:
            continue
        with torch.no_grad():
            if isinstance(module, (nn.Linear, nn.Embedding)) and name == "weight":
                p.normal_(0.0, std, generator=gen)
                if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                    p[module.padding_idx].zero_()
            elif name == "bias":
                p.zero_()
            else:  # norm weights
                p.fill_(1.0)


def host_available_memory() -> int:
    """Bytes of host memory available to new allocations: ``MemAvailable`` of ``/proc/meminfo`` (Linux), else the
    free physical pages (``os.sysconf``), else 0 (unknown: callers then plan for none); no more than the room left
    under this process' cgroup memory limit (:func:`_cgroup_room`: a container's cap, where ``MemAvailable`` counts
    the whole host's)."""
    free = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if not free:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):
            free = 0
    room = _cgroup_room()
    if room is None:
        return free
    return max(min(free, room) if free else room, 1)  # (known, if full: 0 would read as unknown)


def _cgroup_room(root: str = "/sys/fs/cgroup", self_cgroup: str | None = None) -> int | None:
    """Bytes left under the tightest memory limit on this process' cgroups, or None without a limit or a readable one.

    Every cgroup from the process' own (its line of ``self_cgroup``, the text of ``/proc/self/cgroup``, read when
    None) up to the hierarchy's root under ``root`` counts, since a parent's limit applies too; of those with a limit,
    the smallest limit less usage is returned (v2, mounted at ``root``: ``memory.max`` less ``memory.current``; v1,
    at ``root/memory``: ``memory.limit_in_bytes`` less ``memory.usage_in_bytes``).  A Slurm job or ``systemd-run -p
    MemoryMax=`` sets its limit on the process' own cgroup, deep in the tree; a container sees its own cgroup at the
    root (a cgroup namespace, or its cgroup mounted there), and the directories of a path it does not see are
    skipped."""
    if self_cgroup is None:
        try:
            with open("/proc/self/cgroup") as f:
                self_cgroup = f.read()
        except OSError:
            self_cgroup = ""
    own = {"v2": "/", "v1": "/"}  # (the root itself where /proc/self/cgroup says nothing)
    for line in self_cgroup.splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            own["v2"] = parts[2]
        elif "memory" in parts[1].split(","):  # (v1: "4:memory:/path", or co-mounted "4:cpu,memory:/path")
            own["v1"] = parts[2]
    room = None
    for base, path, limit, used in ((root, own["v2"], "memory.max", "memory.current"),
                                    (os.path.join(root, "memory"), own["v1"], "memory.limit_in_bytes",
                                     "memory.usage_in_bytes")):
        names = [n for n in path.split("/") if n not in ("", ".")]
        if ".." in names:  # (a cgroup outside this namespace's view: only the root is known)
            names = []
        for depth in range(len(names), -1, -1):
            here = _cgroup_dir_room(os.path.join(base, *names[:depth]), limit, used)
            if here is not None and (room is None or here < room):
                room = here
    return room


def _cgroup_dir_room(directory: str, limit: str, used: str) -> int | None:
    """``limit`` less ``used`` (file names) in the cgroup ``directory``; None where it has no limit (``max``, or v1's
    page-rounded 2^63) or none that can be read (no such directory or file: the root of a v2 tree has none)."""
    try:
        with open(os.path.join(directory, limit)) as f:
            text = f.read().strip()
        if text == "max":
            return None
        cap = int(text)
        with open(os.path.join(directory, used)) as f:
            current = int(f.read().strip())
    except (OSError, ValueError):
        return None
    if cap >= 1 << 60:  # (v1's "no limit" is a page-rounded 2^63)
        return None
    return max(cap - current, 0)


def available_memory(device: torch.device) -> int:
    """Bytes this process can still allocate on CUDA ``device``: the card's free memory (``torch.cuda.mem_get_info``)
    plus what PyTorch's caching allocator holds unused, and no more than a cap set by
    ``torch.cuda.set_per_process_memory_fraction`` allows (``bench_e2e.py --memory-limit-gb 85.5`` plays an H100 on an
    H200: the card's free memory alone would let a plan count on more than the cap, and run out of memory).  On the
    CPU: :func:`host_available_memory`."""
    device = torch.device(device)
    if device.type == "cpu":
        return host_available_memory()
    index = device.index if device.index is not None else torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(index)
    allocated = torch.cuda.memory_allocated(index)
    free += torch.cuda.memory_reserved(index) - allocated
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda index: 1.0)(index)
    return max(0, min(free, int(total * fraction) - allocated))


def build_synthetic(config: ModelConfig | str, sparsity: float | None = 0.8, *, dtype: torch.dtype = torch.float16,
                    device="cuda", seed: int = 0, progress: bool = True,
                    memory_limit: int | None = None, tp=None, fmt: str = "bitmap") -> tuple[nn.Module, SyntheticReport]:
    """Build a model at ``config``'s shapes with random weights, its decoder projections pruned to ``sparsity``
    and compressed, one at a time, on ``device``.

    Args:
        config: a :class:`ModelConfig` or a preset name (``"opt-66b"``, ``"llama-3-8b"``...).
        sparsity: fraction of zeros in every decoder projection, in (0, 1) (each element kept independently
            with probability ``1 - sparsity``); ``None`` (or 0) builds the dense model.  Embeddings, norms and
            ``lm_head`` stay dense, as ``sparsify_`` leaves them.
        dtype: ``torch.float16`` or ``torch.bfloat16``.
        device: where to build (``"cuda"``, ``"cuda:1"``, or ``"cpu"`` for small configs).
        seed: seeds every random draw (same seed, same model): an int in ``[0, 2**32)`` (torch's CPU generator
            keeps only the low 32 bits).  Weights are normal with std ``config.initializer_range``, as
            :func:`~flash_llm.models.from_config` draws them (the projections' then pruned by magnitude).
        progress: a tqdm bar over the layers (stderr).
        memory_limit: bytes the model may take, a number >= 0 (default None: the device's free memory, CUDA only;
            no check on the CPU).
        tp: a :class:`flash_llm.parallel.TensorParallel`: build only this rank's part of the tensor-parallel
            model (its projection slices, as :class:`~flash_llm.parallel.ColumnParallelLinear` /
            :class:`~flash_llm.parallel.RowParallelLinear`; the rest replicated).  Each projection is still drawn
            whole (the same random stream as without ``tp``, so the same model for a given seed) and only this
            rank's slice is kept and compressed; ``device`` should be ``tp.device``.  The memory check and the
            report are per rank.
        fmt: the compressed format of the sparse projections, ``"bitmap"`` (default), ``"tiled-csl"`` or
            ``"delta-rows"``.

    Returns:
        ``(model, report)``: a :mod:`flash_llm.models` causal LM in eval mode whose projections are
        :class:`~flash_llm.SparseLinear` (or dense ``nn.Linear``), and a :class:`SyntheticReport`.

    Raises:
        TypeError / ValueError: an argument of the wrong type or out of range (nothing is allocated then).
        DoesNotFit: the estimated weights plus the build's transient memory exceed ``memory_limit`` (nothing
            is allocated then).
    """
    cfg = _check_config(config)
    sparsity = _check_sparsity(sparsity)
    seed = _check_seed(seed)
    memory_limit = _check_memory_limit(memory_limit)
    dtype = _check_dtype(dtype)
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    tp_size = 1
    if tp is not None:
        check_divisible(cfg, tp.world_size)
        tp_size = tp.world_size
        if device != tp.device:
            raise ValueError(f"device {device} differs from the tensor-parallel group's device {tp.device}")
    fmt_cls, formula_bytes = FORMAT_NAMES[_check_fmt(fmt)], _FORMULAS[fmt]
    est = estimate_bytes(cfg, sparsity, dtype, tp_size, fmt)
    if memory_limit is None and device.type == "cuda":
        memory_limit = available_memory(device)
    if memory_limit is not None and est["total"] + est["transient"] > memory_limit:
        kind = "dense" if sparsity is None else f"at {sparsity:.0%} sparsity"
        per = f" per rank over {tp_size} ranks" if tp_size > 1 else ""
        raise DoesNotFit(f"{cfg.name or 'the model'} {kind} needs {est['total'] / 1e9:.1f} GB of weights{per} plus "
                         f"{est['transient'] / 1e9:.1f} GB while building, but only {memory_limit / 1e9:.1f} GB "
                         f"are available on {device}")

    report = SyntheticReport(cfg.name or "custom", sparsity, dtype, str(device), tp_rank=tp.rank if tp else 0,
                             tp_size=tp_size, fmt=fmt)
    cuda = device.type == "cuda"
    if cuda:
        # garbage still waiting for the cycle collector (an earlier model, an engine's graphs) would otherwise be
        # freed during the build and make its growth come out short, even negative (seen on an H200)
        gc.collect()
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    gen = torch.Generator(device=device).manual_seed(seed)
    model = from_config(cfg, dtype=dtype, device="meta")
    projections = {fqn for fqn, _, _ in _projection_fqns(cfg)}
    for fqn, module in model.named_modules():  # everything but the projections: embeddings, norms, lm_head
        if fqn not in projections and not (fqn == "lm_head" and cfg.tie_word_embeddings):
            _materialize_(module, device, gen, cfg.initializer_range)
    model.tie_weights()
    rotary = getattr(model.model, "rotary_emb", None)
    if rotary is not None:
        rotary.to(device)  # recomputes inv_freq there
    zeros = total = 0
    bar = tqdm(total=cfg.num_layers, desc=f"building {report.name}", file=sys.stderr, leave=False,
               disable=not progress, dynamic_ncols=True)
    if tp is not None:
        kinds = {fqn: kind for fqn, kind, _, _ in tp_projections(cfg)}
    with torch.no_grad():
        for i, (fqn, m, k) in enumerate(_projection_fqns(cfg)):
            parent_name, _, name = fqn.rpartition(".")
            parent = model.get_submodule(parent_name)
            old = getattr(parent, name)
            w = _draw(m, k, 1.0 if sparsity is None else 1.0 - sparsity, dtype, device, gen, cfg.initializer_range)
            bias = torch.zeros(m, dtype=dtype, device=device) if old.bias is not None else None
            if tp is not None:
                layer = parallel_linear(kinds[fqn], w, bias, tp, fqn, fmt=None if sparsity is None else fmt_cls)
                del w
                local = layer.linear
                zeros += local.in_features * local.out_features - layer.nnz
                nbytes = layer.nbytes
                formula = nbytes if sparsity is None else formula_bytes(local.out_features, local.in_features,
                                                                        layer.nnz)
                report.layers.append((fqn, local.out_features, local.in_features, layer.nnz, nbytes))
                total += local.in_features * local.out_features
            elif sparsity is None:
                layer = nn.Linear(k, m, bias=bias is not None, device="meta", dtype=dtype)
                layer.weight = nn.Parameter(w, requires_grad=False)
                if bias is not None:
                    layer.bias = nn.Parameter(bias, requires_grad=False)
                nbytes, formula = w.numel() * w.element_size(), w.numel() * w.element_size()
                report.layers.append((fqn, m, k, m * k, nbytes))
            else:
                layer = SparseLinear(fmt_cls.from_dense(w), bias)
                del w
                zeros += m * k - layer.nnz
                nbytes, formula = layer.nbytes, formula_bytes(m, k, layer.nnz)
                report.layers.append((fqn, m, k, layer.nnz, nbytes))
            if tp is None:
                total += m * k
            report.projection_bytes += nbytes
            report.formula_bytes += formula
            setattr(parent, name, layer)
            if (i + 1) % len(cfg.linear_shapes()) == 0:
                bar.update(1)
    bar.close()
    report.achieved_sparsity = zeros / total if sparsity is not None else 0.0
    if tp is not None:
        set_local_heads(model, tp.world_size)
        model.tensor_parallel = tp
    stored = {id(t): t for t in [*model.parameters(), *model.buffers()]}  # tied tensors counted once
    report.other_bytes = sum(t.numel() * t.element_size() for t in stored.values()) - report.projection_bytes
    if cuda:
        torch.cuda.synchronize(device)
        report.allocated_bytes = torch.cuda.memory_allocated(device) - before
        report.peak_bytes = torch.cuda.max_memory_allocated(device) - before
    report.seconds = time.perf_counter() - t0
    return model.eval(), report

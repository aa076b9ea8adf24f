"""What every compressed weight format shares: input checks, byte counts, device moves, serialization."""

from __future__ import annotations

import json
import operator
import os
from typing import ClassVar

import torch

from ._layout import STRIP_K, ceil_div
from .._env import env_flag

VALUE_DTYPES = (torch.float16, torch.bfloat16)
_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16"}
_DTYPES_BY_NAME = {v: k for k, v in _DTYPE_NAMES.items()}
METADATA_KEY = "flash_llm"


class FormatError(ValueError):
    """A serialized weight is truncated, inconsistent or of an unsupported version."""


#: :func:`count_nonzero` counts this many elements at a time
COUNT_CHUNK = 1 << 24


#: a floating dtype's element size -> the integer dtype of its bits and the mask that clears its sign bit
_MAGNITUDE_BITS = {2: (torch.int16, 0x7FFF), 4: (torch.int32, 0x7FFFFFFF), 8: (torch.int64, (1 << 63) - 1)}


def _magnitude_bits(t: torch.Tensor) -> torch.Tensor:
    """A floating ``t``'s bits without the sign (nonzero exactly where ``t`` is neither ``+0.0`` nor ``-0.0``), as
    integers of its size; other dtypes as they are.  Zeros are decided by bits, not by ``!= 0``: under
    ``torch.set_flush_denormal(True)`` a bf16 or fp32 subnormal compares equal to 0 (session 73 hunt)."""
    if t.dtype.is_floating_point and t.element_size() in _MAGNITUDE_BITS:
        int_dtype, mask = _MAGNITUDE_BITS[t.element_size()]
        return t.resolve_neg().view(int_dtype) & mask  # (a tensor with the negative bit cannot be viewed as ints)
    return t


def count_nonzero(t: torch.Tensor) -> int:
    """The elements of ``t`` that are not zero (``-0.0`` counts as zero, subnormals as nonzero whatever
    ``torch.set_flush_denormal`` says: decided by bits), :data:`COUNT_CHUNK` at a time: ``torch.count_nonzero`` of a
    whole CUDA tensor allocates about 9 bytes an element (4.5x a bf16 weight, measured on an H100 in session 66),
    which a large layer's re-encoding could not afford."""
    flat = t.reshape(-1)
    if flat.numel() <= COUNT_CHUNK:
        return int(torch.count_nonzero(_magnitude_bits(flat)))
    total = torch.zeros((), dtype=torch.int64, device=flat.device)
    for i in range(0, flat.numel(), COUNT_CHUNK):
        total += torch.count_nonzero(_magnitude_bits(flat[i: i + COUNT_CHUNK]))
    return int(total)


def check_strided(t: torch.Tensor, name: str, error: type[Exception] = TypeError) -> None:
    """``error`` (a TypeError unless told) naming ``name`` where the tensor ``t`` is not a dense (strided) one: a
    torch.sparse tensor (COO, CSR, ...) or a nested tensor, whose ``contiguous()``, ``reshape`` or even ``shape`` fail
    inside torch with errors that name nothing (session 80's bug hunt).  Attribute reads only: cheap on any device.
    The one layout check of a weight to compress, a file's arrays and the arguments of :func:`flash_llm.spmm` and its
    siblings (what is no tensor at all passes: the checks after it name that)."""
    if getattr(t, "is_nested", False):
        raise error(f"{name} must be a dense (strided) tensor, got a nested tensor")
    if getattr(t, "layout", torch.strided) != torch.strided:
        raise error(f"{name} must be a dense (strided) tensor, got layout {t.layout} (call .to_dense() first)")


def check_dense_weight(w, dtype: torch.dtype | None = None, name: str = "w") -> torch.Tensor:
    """Validate a dense weight ``[M, K]`` and return it as a contiguous fp16/bf16 tensor.

    ``dtype`` casts a floating weight (e.g. fp32) to fp16/bf16; without it only fp16/bf16 are accepted.
    """
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
    check_strided(w, name)
    if w.ndim != 2:
        raise ValueError(f"{name} must be 2-D [M, K]; got {w.ndim}-D with shape {tuple(w.shape)}")
    if w.shape[0] < 1 or w.shape[1] < 1:
        raise ValueError(f"{name} must have M >= 1 and K >= 1; got shape {tuple(w.shape)}")
    if w.is_meta:
        raise ValueError(f"{name} is on the meta device: compressing needs its values (load them first)")
    if dtype is not None:
        if dtype not in VALUE_DTYPES:
            raise TypeError(f"dtype must be torch.float16 or torch.bfloat16, got {dtype}")
        if not w.dtype.is_floating_point:
            raise TypeError(f"{name} has dtype {w.dtype}; expected a floating-point tensor to cast to {dtype}")
        w = w.to(dtype)
    elif w.dtype not in VALUE_DTYPES:
        hint = " (pass dtype=torch.float16 or dtype=torch.bfloat16 to cast)" if w.dtype.is_floating_point else ""
        raise TypeError(f"{name} has dtype {w.dtype}; expected torch.float16 or torch.bfloat16{hint}")
    # (a lazily negated view, e.g. a complex32 conj().imag, has the negative bit set: its bits cannot be viewed as
    # ints, and contiguous() keeps the bit when the tensor is already contiguous)
    return w.resolve_neg().contiguous()


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES[dtype]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_shape_args(m, k, dtype) -> None:
    """The arguments of a format's ``zeros``: ``m, k`` ints >= 1, ``dtype`` fp16/bf16 (ValueError / TypeError naming
    the argument)."""
    for name, v in (("m", m), ("k", k)):
        if not _is_int(v) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if dtype not in VALUE_DTYPES:
        raise TypeError(f"dtype must be torch.float16 or torch.bfloat16, got {dtype}")


def _bounds(v, name: str, n: int) -> tuple[int, int]:
    """``slice``'s ``rows`` / ``cols`` (None: all ``n``) as ``(start, end)``: a pair of ints, else TypeError."""
    if v is None:
        return 0, n
    try:
        if isinstance(v, (str, bytes)) or len(v) != 2 or any(isinstance(x, bool) for x in v):
            raise TypeError
        return operator.index(v[0]), operator.index(v[1])  # (ints, numpy ints, 0-d integer tensors; not floats)
    except TypeError:
        raise TypeError(f"{name} must be None or a pair of ints (start, end), got {v!r}") from None


def _label(prefix: str) -> str:
    """How errors name a weight: its name in a multi-weight file, else 'weight'."""
    return prefix[:-1] if prefix.endswith(".") else (prefix or "weight")


def parse_metadata(metadata: dict | None, prefix: str, where: str = "") -> dict:
    """The JSON object stored under ``prefix + 'flash_llm'``; FormatError if absent or malformed."""
    key = prefix + METADATA_KEY
    if metadata is None or key not in metadata:
        raise FormatError(f"{where}no flash-llm metadata '{key}' (not a flash-llm weight)")
    if not isinstance(metadata[key], (str, bytes)):
        raise FormatError(f"{where}metadata '{key}' must be a JSON string (as state() returns it), got "
                          f"{type(metadata[key]).__name__}")
    try:
        meta = json.loads(metadata[key])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{where}metadata '{key}' is not valid JSON: {e}") from None
    if not isinstance(meta, dict):
        raise FormatError(f"{where}metadata '{key}' must be a JSON object, got {type(meta).__name__}")
    return meta


def _host_copy(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy that shares memory with nothing (safetensors refuses shared tensors)."""
    return t.detach().to("cpu", copy=True).contiguous()


#: the encoders and decoders of BitmapTiles and Tiled-CSL work on bands of whole record rows of at most about this
#: many elements (``SparseFormat._record_bands``).  At once, a Llama-3-8B gate / up (28672 x 4096) at 80 % took
#: 1.0-1.3 GB above its 235 MB on the CPU (session 66); a band's temporaries stay near 200 MB whatever the weight
BAND_ELEMENTS = 1 << 25
#: ... on a GPU, bands as large as :func:`gpu_run_size` allows at ``BAND_ELEMENT_BYTES`` an element, up to 2^28
#: elements (each band costs a few hundred operations, each a launch there: a 9216 x 36864 Tiled-CSL ``from_dense``
#: took 2574 in 11 bands); the constant where ``FLASH_LLM_BAND_FIXED=1`` (for measuring)
BAND_ELEMENT_BYTES = 6
BAND_FIXED = env_flag("FLASH_LLM_BAND_FIXED", False)
#: the share of a GPU's free memory one run (band) of the formats' encoders and decoders may take for its temporaries
GPU_FREE_SHARE = 1 / 8


def gpu_run_size(device, least: int, most: int, unit_bytes: int, fixed: bool = False) -> int:
    """How many units (elements, entries, groups) one run of an encoder or decoder takes on ``device``: ``least`` on
    the CPU (or where ``fixed``); on a GPU as many as :data:`GPU_FREE_SHARE` of its free memory holds at
    ``unit_bytes`` a unit, within ``[least, most]`` (fewer runs: each is some hundreds of launches there)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type != "cuda" or fixed:
        return least
    free = torch.cuda.mem_get_info(device)[0] * GPU_FREE_SHARE
    return max(least, min(most, int(free // unit_bytes)))


def band_elements(device) -> int:
    """The most elements a band of the BitmapTiles / Tiled-CSL encoders and decoders takes on ``device``:
    :data:`BAND_ELEMENTS`, or on a GPU more where its free memory allows (:func:`gpu_run_size`)."""
    return gpu_run_size(device, BAND_ELEMENTS, 1 << 28, BAND_ELEMENT_BYTES, BAND_FIXED)


class SparseFormat:
    """Base class of the compressed formats.  A format holds a few 1-D device tensors (``_arrays``)
    plus its logical shape ``[M, K]`` and value dtype; everything else derives from those."""

    FORMAT_NAME: ClassVar[str]
    FORMAT_VERSION: ClassVar[int]  # what this flash-llm writes
    READ_VERSIONS: ClassVar[tuple[int, ...]]  # what it reads (older versions are converted on load)
    TILE_ROWS: ClassVar[int]  # rows of one record: a 16-row strip (bitmap) or a 64-row tile (Tiled-CSL)
    _arrays: ClassVar[tuple[str, ...]] = ("data", "offsets")
    _UNIT_WORDS: ClassVar[int]  # int32 words of ``data`` per unit of ``offsets``

    data: torch.Tensor
    offsets: torch.Tensor
    shape: tuple[int, int]
    dtype: torch.dtype
    nnz: int

    @classmethod
    def _record_bands(cls, m: int, k: int, device=None) -> list[tuple[int, int]]:
        """Runs of whole record rows ``(r0, r1)`` (record-row indices) covering an ``[m, k]`` weight's
        ``ceil(m / TILE_ROWS)`` of them, each of at most :func:`band_elements` elements on ``device`` (one at least).
        Records are numbered row-major, so a band's records are one contiguous run of them: the encoders and decoders
        work a band at a time to bound their temporaries (some 5-6 bytes an element at once)."""
        mt, kt = cls.grid_of(m, k)
        step = max(1, band_elements(device) // (cls.TILE_ROWS * kt * STRIP_K))
        return [(r, min(mt, r + step)) for r in range(0, mt, step)]

    @classmethod
    def _from_dense_in_bands(cls, w: torch.Tensor) -> "SparseFormat | None":
        """``from_dense(w)`` as bands of whole record rows joined by :meth:`concat` (no decode: the same arrays), or
        None where one band holds the whole weight."""
        bands = cls._record_bands(*w.shape, w.device)
        if len(bands) < 2:
            return None
        tr = cls.TILE_ROWS
        return cls.concat([cls.from_dense(w[r0 * tr: r1 * tr]) for r0, r1 in bands])

    @classmethod
    def grid_of(cls, m: int, k: int) -> tuple[int, int]:
        """Records along M and along K of an ``[m, k]`` weight (K is cut in 64-column pieces)."""
        return ceil_div(m, cls.TILE_ROWS), ceil_div(k, STRIP_K)

    @classmethod
    def arrays_fit(cls, m: int, k: int, n_offsets: int, n_data: int, *, version: int | None = None) -> str | None:
        """Why ``offsets`` of ``n_offsets`` words and ``data`` of ``n_data`` cannot be the arrays of an ``[m, k]``
        weight of this format, from their lengths alone (nothing read: what the raw ops check before a kernel
        trusts them; :meth:`from_state` validates everything), or None where they can.  ``version``: that of a file's
        arrays (a meta load, :meth:`_from_meta_state`; None: a weight's arrays in memory), where it limits the
        layouts they may have."""
        rows, cols = cls.grid_of(m, k)
        if n_offsets != rows * cols + 1:
            return f"offsets has {n_offsets} entries; a {m}x{k} weight has {rows * cols} records, so {rows * cols + 1}"
        return None

    @property
    def grid(self) -> tuple[int, int]:
        """Records along M and along K: ``(ceil(M / TILE_ROWS), ceil(K / 64))``."""
        return self.grid_of(*self.shape)

    # ---- derived properties -------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return getattr(self, self._arrays[0]).device

    @property
    def density(self) -> float:
        """Fraction of nonzero elements, ``nnz / (M * K)``.  A weight built without its count (``nnz`` -1: raw arrays
        wrapped by ``reference.as_format``, a meta file without ``nnz``) counts it from its arrays (validating them);
        on the meta device there is nothing to count: ValueError (before session 75 it returned ``-1 / (M * K)``)."""
        nnz = self.nnz
        if nnz < 0:
            self._needs_values("density (its nnz is unknown)")
            nnz = self.nnz = type(self)._validate(self.tensors(), self.shape, "", "")
        return nnz / (self.shape[0] * self.shape[1])

    @property
    def nbytes(self) -> int:
        """Exact bytes of every array this weight holds on its device."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def tensors(self) -> dict[str, torch.Tensor]:
        """The arrays of this weight by name (no copies)."""
        return {n: getattr(self, n) for n in self._arrays}

    def l2_streams(self) -> tuple[list[tuple[torch.Tensor, int, int]], list[tuple[torch.Tensor, int, int]]]:
        """How a kernel reads this weight, for warming L2 ahead of it (:func:`flash_llm.kernels.l2_warm_ranges`):
        ``(head, walks)``, byte ranges ``(array, start, end)`` of the arrays.  ``head``: what every block reads
        first (headers, tables); ``walks``: ranges each read from start to end by one block or warp, side by side,
        so the first part of each is what the kernel wants first.  Here (records numbered row-major, ``offsets``
        their starts in units of ``_UNIT_WORDS`` words): ``offsets`` is the head, each record row's run of ``data``
        a walk (a block walks a row's records along K; reads ``offsets`` to the host).  On the meta device: ValueError
        (no values to read)."""
        self._needs_values("l2_streams")
        kt = self.grid[1]
        rows = (self.offsets[::kt].to(torch.int64) * (4 * self._UNIT_WORDS)).tolist()  # each row's first byte, the end
        walks = [(self.data, a, b) for a, b in zip(rows[:-1], rows[1:]) if b > a]
        return [(self.offsets, 0, self.offsets.numel() * 4)], walks

    def to(self, device=None, dtype: torch.dtype | None = None, non_blocking: bool = False) -> "SparseFormat":
        """A copy on ``device`` (``None``: this weight's; the same object if it is already there), as
        ``Tensor.to``: ``w.to("cuda")``, ``w.to(device="cuda", non_blocking=True)``.

        Only the device changes: the dtype is fixed at compression (the int32 arrays hold fp16 / bf16 bit patterns).
        A ``dtype`` (positional or ``dtype=``) other than :attr:`dtype` raises TypeError; re-compress instead:
        ``type(w).from_dense(w.to_dense(), dtype=...)``.  A weight on the meta device (shapes only) moves to no other
        device: ValueError (no values to copy; load its arrays there instead)."""
        if isinstance(device, (torch.dtype, torch.Tensor)) and isinstance(dtype, bool):
            dtype, non_blocking = None, dtype  # (Tensor.to(dtype, non_blocking) / Tensor.to(other, non_blocking))
        if isinstance(device, torch.dtype):  # w.to(torch.bfloat16), as Tensor.to(dtype)
            device, dtype = None, device
        elif isinstance(device, torch.Tensor):  # w.to(x): x's device and dtype, as Tensor.to(other)
            device, dtype = device.device, device.dtype if dtype is None else dtype
        elif device is not None and not isinstance(device, (str, int, torch.device)):
            raise TypeError(f"{type(self).__name__}.to() takes a device (str, int or torch.device), a dtype or a "
                            f"tensor, got {type(device).__name__}")
        if dtype is not None and dtype != self.dtype:
            name = type(self).__name__
            raise TypeError(f"{name}.to() moves between devices; dtype={dtype} cannot change a compressed weight's "
                            f"dtype, fixed at compression ({self.dtype}): re-compress with "
                            f"{name}.from_dense(w.to_dense(), dtype={dtype})")
        device = self.device if device is None else torch.device(device)
        if self.device == device:
            return self
        if device.type != "meta":
            self._needs_values(f"to({str(device)!r})")
        arrays = {n: t.to(device, non_blocking=non_blocking) for n, t in self.tensors().items()}
        return self._from_parts(arrays, self.shape, self.dtype, self.nnz)

    def slice(self, rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None) -> "SparseFormat":
        """The weight ``W[rows[0]:rows[1], cols[0]:cols[1]]`` (``None``: all) in the same format, on the same device.

        When the range starts on a record boundary (``TILE_ROWS`` rows, 64 columns) and ends on one or at the
        matrix's edge, the records are cut directly (a gather of whole records, no decode); otherwise the slice
        is expanded and compressed again.  Both give the same arrays as ``from_dense(to_dense()[...])``.
        Used to shard compressed weights for tensor parallelism.
        """
        m, k = self.shape
        r0, r1, c0, c1 = self._slice_bounds(rows, cols)
        tr = self.TILE_ROWS
        aligned = (r0 % tr == 0 and (r1 % tr == 0 or r1 == m) and c0 % STRIP_K == 0
                   and (c1 % STRIP_K == 0 or c1 == k))
        if not aligned:
            return type(self).from_dense(self.to_dense()[r0:r1, c0:c1].contiguous())
        if (r0, r1, c0, c1) == (0, m, 0, k):
            return self
        mt, kt = self.grid
        a0, a1 = r0 // tr, ceil_div(r1, tr)  # record rows and columns kept
        b0, b1 = c0 // STRIP_K, ceil_div(c1, STRIP_K)
        off = self.offsets.to(torch.int64)
        rec = (torch.arange(a0, a1, device=off.device)[:, None] * kt
               + torch.arange(b0, b1, device=off.device)).reshape(-1)  # kept records, in storage order
        starts, sizes = off[rec], off[rec + 1] - off[rec]
        new_off = torch.zeros(rec.numel() + 1, dtype=torch.int64, device=off.device)
        torch.cumsum(sizes, 0, out=new_off[1:])
        total = int(new_off[-1])
        if total >= 2**31:
            raise ValueError(f"the slice's {self.FORMAT_NAME} offsets exceed int32")
        unit = self._UNIT_WORDS
        src = torch.repeat_interleave(starts - new_off[:-1], sizes, output_size=total) + torch.arange(
            total, device=off.device)
        data = self.data.view(-1, unit)[src].reshape(-1)
        arrays = {"data": data, "offsets": new_off.to(torch.int32)}
        shape = (r1 - r0, c1 - c0)
        nnz = self._validate(arrays, shape, "", f"{self.FORMAT_NAME} slice: ")
        return self._from_parts(arrays, shape, self.dtype, nnz)

    def _needs_values(self, what: str, name: str = "the weight") -> None:
        """ValueError where this weight's arrays are on the meta device (shapes only) and ``what`` reads them."""
        if self.device.type == "meta":
            raise ValueError(f"{what}: {name} is on the meta device (no values to read); load its arrays first")

    def _meta_dense(self) -> torch.Tensor | None:
        """``to_dense`` of a weight on the meta device: an empty meta ``[M, K]`` (the shape and dtype it would have);
        None for a weight with values."""
        return torch.empty(self.shape, dtype=self.dtype, device="meta") if self.device.type == "meta" else None

    def _slice_bounds(self, rows, cols) -> tuple[int, int, int, int]:
        """``(r0, r1, c0, c1)`` of :meth:`slice`'s arguments (``None``: all); ValueError if empty or outside."""
        m, k = self.shape
        r0, r1 = _bounds(rows, "rows", m)
        c0, c1 = _bounds(cols, "cols", k)
        if not (0 <= r0 < r1 <= m and 0 <= c0 < c1 <= k):
            raise ValueError(f"slice rows {r0}:{r1}, cols {c0}:{c1} is empty or outside the {m}x{k} matrix")
        if (r0, r1, c0, c1) != (0, m, 0, k):  # (the whole weight is itself, values or not)
            self._needs_values("slice")
        return r0, r1, c0, c1

    @classmethod
    def _check_parts(cls, parts) -> list:
        """:meth:`concat`'s parts as a list: at least one, all of this format, with one K, dtype and device."""
        parts = list(parts)
        if not parts:
            raise ValueError("parts is empty: nothing to concatenate")
        first = parts[0]
        for i, p in enumerate(parts):
            if type(p) is not cls:
                raise TypeError(f"parts[{i}] is a {type(p).__name__}; expected {cls.__name__}")
            p._needs_values("concat", f"parts[{i}]")
            if (p.shape[1], p.dtype, p.device) != (first.shape[1], first.dtype, first.device):
                raise ValueError(f"parts[{i}] is {p.shape[0]}x{p.shape[1]} {p.dtype} on {p.device}; parts[0] is "
                                 f"{first.shape[0]}x{first.shape[1]} {first.dtype} on {first.device} (K, dtype "
                                 "and device must agree)")
        return parts

    @classmethod
    def concat(cls, parts: "list[SparseFormat] | tuple[SparseFormat, ...]", pair_halves: bool = False
               ) -> "SparseFormat":
        """The weights of ``parts`` stacked along M (``torch.cat([p.to_dense() for p in parts])``), in this format.

        Every part must be of this format with the same K, dtype and device.  When every part but the last
        has a multiple of ``TILE_ROWS`` rows, the records are joined as they are (no decode: records are
        numbered row-major); otherwise the stack is expanded and compressed again.  Both give the same arrays
        as ``from_dense`` of the stacked dense weight.  Used to merge projections that read the same input
        (q, k, v) into one matmul.  ``pair_halves`` says the two parts are a gate and its up projection; a format
        whose kernel needs them paired (DeltaRows) encodes for it, the others ignore it.
        """
        parts = cls._check_parts(parts)
        first = parts[0]
        if len(parts) == 1:
            return first
        m = sum(p.shape[0] for p in parts)
        k = first.shape[1]
        if any(p.shape[0] % cls.TILE_ROWS for p in parts[:-1]):
            return cls.from_dense(torch.cat([p.to_dense() for p in parts]))
        unit = cls._UNIT_WORDS
        offs, datas, base = [], [], 0
        for p in parts:
            off = p.offsets.to(torch.int64)
            end = int(off[-1])
            offs.append(off[:-1] + base)
            datas.append(p.data[: end * unit])
            base += end
        if base >= 2**31:
            raise ValueError(f"the concatenation's {cls.FORMAT_NAME} offsets exceed int32; merge fewer weights")
        offsets = torch.cat(offs + [torch.tensor([base], dtype=torch.int64, device=first.device)])
        data = torch.cat(datas)
        arrays = {"data": data, "offsets": offsets.to(torch.int32)}
        nnz = sum(p.nnz for p in parts)
        if any(p.nnz < 0 for p in parts):  # a part built without its count
            nnz = cls._validate(arrays, (m, k), "", f"{cls.FORMAT_NAME} concat: ")
        return cls._from_parts(arrays, (m, k), first.dtype, nnz)

    def __repr__(self) -> str:
        m, k = self.shape
        density = "unknown" if self.nnz < 0 and self.device.type == "meta" else f"{self.density:.4f}"
        return (f"{type(self).__name__}(shape=({m}, {k}), dtype={self.dtype}, density={density}, "
                f"nbytes={self.nbytes}, device={self.device})")

    @classmethod
    def _from_parts(cls, arrays, shape, dtype, nnz):
        obj = cls.__new__(cls)
        for n, t in arrays.items():
            setattr(obj, n, t)
        obj.shape = (int(shape[0]), int(shape[1]))
        obj.dtype = dtype
        obj.nnz = int(nnz)
        return obj

    # ---- serialization -----------------------------------------------------------------------
    def metadata(self) -> dict:
        # (an unknown count, -1, is written as null: loading counts it; a file saying -1 would be refused)
        return {"format": self.FORMAT_NAME, "version": self.FORMAT_VERSION, "dtype": dtype_name(self.dtype),
                "shape": list(self.shape), "nnz": self.nnz if self.nnz >= 0 else None}

    def state(self, prefix: str = "") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Tensors and string metadata for a safetensors file; ``prefix`` names this weight in it."""
        tensors = {prefix + n: t.contiguous() for n, t in self.tensors().items()}
        return tensors, {prefix + METADATA_KEY: json.dumps(self.metadata())}

    def save(self, path: str | os.PathLike) -> None:
        """Write this weight to one safetensors file (arrays plus format metadata), with the permissions of a new
        file under the process umask.  On the meta device: ValueError (no values to write; nothing is written)."""
        from ..checkpoint._files import check_writable, save_safetensors

        self._needs_values("save")
        check_writable(path, "path", file=True)  # (IsADirectoryError / FileNotFoundError / ... naming path)
        tensors, meta = self.state()
        save_safetensors({k: _host_copy(v) for k, v in tensors.items()}, path, meta)

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, str], prefix: str = "",
                   source: str = "") -> "SparseFormat":
        """Rebuild and fully validate a weight from :meth:`state` output.

        Raises :class:`FormatError` naming the tensor and what is wrong; never returns a wrong matrix.  Arrays on
        the meta device (no values) give a meta weight, checked for what their lengths say only.
        """
        where = f"{source}: " if source else ""
        meta = parse_metadata(metadata, prefix, where)
        label = _label(prefix)
        if meta.get("format") != cls.FORMAT_NAME:
            raise FormatError(f"{where}'{label}' has format {meta.get('format')!r}; expected {cls.FORMAT_NAME!r}")
        version = meta.get("version")
        if not cls.reads_version(version):
            raise FormatError(f"{where}'{label}' has {cls.FORMAT_NAME} format version {version!r}; "
                              f"this flash-llm reads {cls.readable_versions()}")
        if not isinstance(meta.get("dtype"), str) or meta["dtype"] not in _DTYPES_BY_NAME:
            raise FormatError(f"{where}'{label}' has value dtype {meta.get('dtype')!r}; "
                              f"expected one of {sorted(_DTYPES_BY_NAME)}")
        shape = meta.get("shape")
        if not isinstance(shape, list) or len(shape) != 2 or not all(_is_int(v) and v >= 1 for v in shape):
            raise FormatError(f"{where}'{label}' has logical shape {shape!r}; expected [M, K] with M, K >= 1")
        arrays = {}
        for n in cls._arrays:
            t = tensors.get(prefix + n)
            if t is None:
                raise FormatError(f"{where}tensor '{prefix + n}' is missing")
            if not isinstance(t, torch.Tensor):
                raise FormatError(f"{where}tensor '{prefix + n}' is a {type(t).__name__}, not a torch.Tensor")
            check_strided(t, f"{where}tensor '{prefix + n}'", FormatError)
            if t.dtype != torch.int32 or t.ndim != 1:
                raise FormatError(f"{where}tensor '{prefix + n}' has dtype {t.dtype} and shape {tuple(t.shape)}; "
                                  "expected a 1-D int32 tensor")
            arrays[n] = t.contiguous()  # (the decoders view slices of them as 16-bit words: needs stride 1)
        dtype = _DTYPES_BY_NAME[meta["dtype"]]
        if any(t.is_meta for t in arrays.values()):
            return cls._from_meta_state(arrays, shape, dtype, meta, version, prefix, where)
        nnz = cls._validate(arrays, tuple(shape), prefix, where, version)
        if meta.get("nnz") is not None and (not _is_int(meta["nnz"]) or meta["nnz"] != nnz):
            raise FormatError(f"{where}'{label}' metadata says nnz={meta['nnz']!r} but the arrays "
                              f"hold {nnz} nonzeros")
        return cls._from_parts(cls._upgrade(arrays, version), shape, dtype, nnz)

    @classmethod
    def _from_meta_state(cls, arrays, shape, dtype, meta, version, prefix, where) -> "SparseFormat":
        """:meth:`from_state` of arrays on the meta device (shapes only, as ``.to("meta")`` leaves them): nothing to
        read, so only what their lengths say is checked (:meth:`arrays_fit`), and ``nnz`` is the metadata's word
        (-1 where it has none).  The result is a meta weight, as the arrays.  A file of an older version is refused
        where converting it needs its values (:meth:`_converts`); one read as it is loads as a current one does."""
        label = _label(prefix)
        if not all(t.is_meta for t in arrays.values()):
            raise FormatError(f"{where}'{label}': some of its arrays are on the meta device and some are not "
                              f"({', '.join(f'{prefix + n} on {t.device}' for n, t in arrays.items())})")
        if cls._converts(version):
            raise FormatError(f"{where}'{label}' is {cls.FORMAT_NAME} format version {version} on the meta device: "
                              f"converting it to version {cls.FORMAT_VERSION} needs its values")
        m, k = shape
        why = cls.arrays_fit(m, k, arrays["offsets"].numel(), arrays["data"].numel(), version=version)
        if why is not None:
            raise FormatError(f"{where}'{label}' (on the meta device) is no {m}x{k} {cls.FORMAT_NAME} weight: {why}")
        nnz = meta.get("nnz")
        if nnz is not None and (not _is_int(nnz) or not 0 <= nnz <= m * k):
            raise FormatError(f"{where}'{label}' metadata says nnz={nnz!r}; expected an int in [0, {m * k}]")
        n_data = arrays["data"].numel()
        lo, hi = cls._nnz_range(m, k, arrays["offsets"].numel() - 1, n_data)
        if nnz is not None and not lo <= nnz <= hi:
            raise FormatError(f"{where}'{label}' (on the meta device) metadata says nnz={nnz}; data of {n_data} "
                              f"{cls._DATA_UNIT} holds {lo} to {hi} nonzeros")
        return cls._from_parts(arrays, shape, dtype, -1 if nnz is None else nnz)

    #: what one element of ``data`` is called in messages
    _DATA_UNIT = "words"

    @classmethod
    def _nnz_range(cls, m: int, k: int, records: int, n_data: int) -> tuple[int, int]:
        """The fewest and most nonzeros ``records`` records over ``data`` of ``n_data`` elements of an ``[m, k]``
        weight may hold (lengths only: a meta file's ``nnz`` is checked against them); here ``(0, m * k)``."""
        return 0, m * k

    @classmethod
    def reads_version(cls, version) -> bool:
        """Whether this flash-llm reads format ``version`` (an int; bools and strings are not versions)."""
        return _is_int(version) and version in cls.READ_VERSIONS

    @classmethod
    def readable_versions(cls) -> str:
        """``"version 1"`` or ``"versions 1 and 2"``: for error messages."""
        v = cls.READ_VERSIONS
        return f"version {v[0]}" if len(v) == 1 else f"versions {', '.join(map(str, v[:-1]))} and {v[-1]}"

    @classmethod
    def _upgrade(cls, arrays: dict[str, torch.Tensor], version: int) -> dict[str, torch.Tensor]:
        """The arrays of a validated ``version`` file in the current version's layout."""
        return arrays

    @classmethod
    def _converts(cls, version: int) -> bool:
        """Whether the arrays of a ``version`` file differ from the current version's, so that reading them needs
        their values (:meth:`_upgrade` rewrites them: BitmapTiles version 1, TiledCSL versions 1 and 2).  A format
        that does not override :meth:`_upgrade` reads every version it reads as it is (DeltaRows version 1, the split
        layout): such a file loads on the meta device too."""
        return version != cls.FORMAT_VERSION and cls._upgrade.__func__ is not SparseFormat._upgrade.__func__

    @classmethod
    def _validate(cls, arrays, shape, prefix, where, version=None) -> int:
        """Check the arrays (of format ``version``, default the current one) against each other and the
        shape; return nnz.  Raise FormatError.  ``version`` is given for a file's arrays (:meth:`from_state`) and
        None for a weight's arrays in memory (``density``, ``SparseLinear``), which may be in a form that is never
        written to a file (a coded DeltaRows weight's values)."""
        raise NotImplementedError


def save(weights: dict[str, SparseFormat], path: str | os.PathLike) -> None:
    """Write several compressed weights to one safetensors file, each under its name, with the permissions of a new
    file under the process umask.  A weight on the meta device: ValueError naming it (nothing is written)."""
    from ..checkpoint._files import check_writable, save_safetensors

    if not isinstance(weights, dict) or not weights:
        hint = " (one weight: weight.save(path))" if isinstance(weights, SparseFormat) else ""
        raise TypeError(f"weights must be a non-empty dict of name -> compressed weight, got "
                        f"{type(weights).__name__}{' (empty)' if isinstance(weights, dict) else ''}{hint}")
    bad = [n for n, w in weights.items() if not isinstance(n, str) or not isinstance(w, SparseFormat)]
    if bad:
        raise TypeError(f"weights must map str names to compressed weights (BitmapTiles, TiledCSL, DeltaRows); "
                        f"{bad[0]!r} maps to {type(weights[bad[0]]).__name__}")
    if "" in weights:  # (load would hand a lone "" back as the bare weight, not a dict)
        raise ValueError("weights: names must be non-empty (one weight alone: weight.save(path))")
    for name, w in weights.items():  # (all checked before any copy is made)
        w._needs_values("save", f"weights[{name!r}]")
    check_writable(path, "path", file=True)
    tensors, meta = {}, {}
    for name, w in weights.items():
        t, m = w.state(prefix=f"{name}.")
        tensors.update({k: _host_copy(v) for k, v in t.items()})
        meta.update(m)
    save_safetensors(tensors, path, meta)


def load(path: str | os.PathLike, device="cpu"):
    """Load what :meth:`SparseFormat.save` (one weight) or :func:`save` (a dict of weights) wrote.

    Every weight is validated; any truncation or inconsistency raises :class:`FormatError`.  ``device`` (what
    ``torch.device`` takes: a str, an int or a ``torch.device``; None: the CPU, where the file is read) is checked
    before the file is read: another type (a dtype, a tensor) raises TypeError, a string that names no device
    ValueError (until session 87 a dtype or a tensor went on to ``SparseFormat.to``, which took them as such), and so
    does a device this torch cannot allocate on, such as CUDA where it is not available (session 88: it failed after
    the whole read).
    """
    from safetensors import safe_open

    from ..checkpoint.pretrained import check_device
    from . import FORMATS

    if device is not None:
        if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
            got = f"dtype {device}" if isinstance(device, torch.dtype) else type(device).__name__
            raise TypeError(f"device must be a str, an int or a torch.device, got {got} (load moves the weights to "
                            "device only: a compressed weight's dtype is fixed at compression)")
        check_device(device, meta_ok=True)
    path = os.fspath(path)
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
        from ..checkpoint._files import non_utf8_message

        if (why := non_utf8_message(path)) is not None:  # (safetensors' error for it: "... is not valid UTF-8")
            raise FormatError(why) from None
        raise FormatError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    prefixes = sorted(k[: -len(METADATA_KEY)] for k in metadata
                      if k == METADATA_KEY or k.endswith("." + METADATA_KEY))
    if not prefixes:
        raise FormatError(f"{path}: no flash-llm metadata (not a flash-llm weight file)")
    out = {}
    for prefix in prefixes:
        fmt = parse_metadata(metadata, prefix, f"{path}: ").get("format")
        cls = FORMATS.get(fmt) if isinstance(fmt, str) else None  # (JSON lists / objects are no format names)
        if cls is None:
            raise FormatError(f"{path}: '{_label(prefix)}' has unknown format {fmt!r}; known: {sorted(FORMATS)}")
        out[prefix[:-1] if prefix else ""] = cls.from_state(tensors, metadata, prefix, source=path).to(device)
    return out[""] if list(out) == [""] else out

"""Load a Hugging Face checkpoint directory (``config.json`` + ``*.safetensors``) straight into this rank's
tensor-parallel model: the skeleton is built on ``meta``, and each rank reads only the slices of the projections
it holds (``safe_open(...).get_slice``) plus the replicated tensors, one projection at a time.  Flash-llm and
sparse-bitmask checkpoints are streamed one compressed projection at a time, expanded and sliced on the device."""

from __future__ import annotations

import json
import os
import re
import sys
import warnings

import torch
from tqdm import tqdm

from ..checkpoint._files import IGNORED_SUFFIXES as _IGNORED_SUFFIXES, INDEX_NAME as INDEX, Shard, open_shards, \
    stored_names
from ..formats import FormatError
from ..formats._base import VALUE_DTYPES
from ..models import MODEL_DTYPES, CausalLM, as_config, from_config
from ..nn import SparsifyConfig
from .group import TensorParallel
from .layers import COLUMN, ShardReport, check_divisible, check_sparsify, column_from_slice, layer_prefix, \
    projections, row_from_slice, set_local_heads, shard_range

_READ_CHUNK = 1 << 28  # bytes read at once for a row-parallel (column-sliced) weight

#: The dtypes :func:`load_tensor_parallel` builds a model in: those its reads, casts (checked for overflow) and
#: shard reports handle, as :func:`flash_llm.from_pretrained` loads dense models in them.  Other floating dtypes
#: (float8) have no ``isfinite`` / ``count_nonzero`` kernels in torch: they failed deep inside, after the read.
LOAD_DTYPES = MODEL_DTYPES


class MissingTensorError(FormatError, KeyError):
    """A tensor of the model that the checkpoint does not hold (the message names the file or folder and the
    tensor).  A :class:`~flash_llm.FormatError`, as :func:`flash_llm.from_pretrained` raises in that case (the
    CLI reports it as an input error), and a ``KeyError``, as this loader raised before."""

    __str__ = BaseException.__str__  # (KeyError's would quote the message)


class _Checkpoint:
    """The tensors of a checkpoint folder by name, read lazily from its safetensors files: ``model.safetensors``,
    or the shards its index lists, chosen and checked against the index as :func:`flash_llm.from_pretrained`
    does (:func:`flash_llm.checkpoint._files.open_shards`: a stray ``*.safetensors`` file is not read)."""

    def __init__(self, folder: str):
        self.folder = folder
        names = os.listdir(folder)
        if not any(f.endswith(".safetensors") for f in names) and INDEX not in names:
            raise FileNotFoundError(f"{folder}: no *.safetensors files (this loader reads safetensors checkpoints "
                                    "only; convert .bin files with transformers' save_pretrained)")
        shards, tensors = open_shards(folder)  # FormatError naming the file for a bad index or shard
        self.handles = {p: Shard(p) for p in shards}
        self.where = {k: t.file for k, t in tensors.items()}  # key -> shard path
        self.order = {k: i for i, k in enumerate(tensors)}  # key -> its place in file order
        # where a missing tensor is reported: the one file, or the folder of the shards
        self.source = str(shards[0]) if len(shards) == 1 else folder
        self.used: set[str] = set()

    def key(self, name: str) -> str | None:
        """The checkpoint's key for the model's ``name`` (older OPT files drop the leading ``model.``); FormatError
        naming file and tensor where the checkpoint holds it under both names, as from_pretrained refuses it."""
        from ..checkpoint.pretrained import stored_twice

        found = [k for k in stored_names(name) if k in self.where]
        if len(found) > 1:  # (told of the one that comes later in the files, as from_pretrained reads them)
            first, second = sorted(found, key=self.order.__getitem__)
            raise stored_twice(self.where[second], second, name, first if second == name else None)
        return found[0] if found else None

    def _slice(self, key: str, shape: tuple[int, ...]):
        sl = self.handles[self.where[key]].get_slice(key)
        got = tuple(sl.get_shape())
        if got != tuple(shape):
            raise ValueError(f"{self.where[key]}: tensor {key!r} has shape {got}; the config.json says "
                             f"{tuple(shape)}")
        self.used.add(key)
        return sl

    def read(self, key: str, shape, rows=None, cols=None, want: torch.dtype | None = None) -> torch.Tensor:
        """The tensor ``key`` (of full ``shape``), or its ``rows`` / ``cols`` ``(start, stop)`` range, as a new
        contiguous CPU tensor; column ranges are read in row chunks (bounded temporary memory).  With ``want`` (the
        model's dtype for it), a stored dtype of another kind (an integer tensor where a weight belongs) is a
        FormatError naming file and tensor, as in from_pretrained (:func:`~flash_llm.checkpoint.pretrained.
        check_dtype`)."""
        sl = self._slice(key, shape)
        if cols is None:
            out = (sl[rows[0]:rows[1]] if rows is not None else sl[:]).contiguous()
        else:
            m = shape[0]
            first = sl[0:1, cols[0]:cols[1]]
            out = torch.empty(m, cols[1] - cols[0], dtype=first.dtype)
            step = max(1, _READ_CHUNK // max(1, shape[1] * first.element_size()))
            for r in range(0, m, step):
                out[r:r + step] = sl[r:min(m, r + step), cols[0]:cols[1]]
        if want is not None:
            from ..checkpoint.pretrained import check_dtype

            check_dtype(self.where[key], key, out.dtype, want)
        return out


def load_tensor_parallel(path, tp: TensorParallel | None = None, *, dtype: torch.dtype = torch.float16,
                         sparsify: SparsifyConfig | None = None, progress: bool | None = None
                         ) -> tuple[CausalLM, ShardReport]:
    """Build this rank's tensor-parallel model from a Hugging Face checkpoint folder, reading only its share.

    The model is built on ``meta`` from ``config.json``; then, projection by projection, this rank reads its
    slice from the safetensors files (column-parallel: its rows; row-parallel: its columns, in row chunks),
    casts it to ``dtype``, moves it to ``tp.device`` and, with ``sparsify``, compresses it there before reading
    the next.  Embeddings, norms and ``lm_head`` are read whole (replicated).  So a rank's peak memory is its
    share of the model plus one projection slice (and, on the CPU, one chunk of the file).

    Every rank raises where any rank does (:meth:`TensorParallel.raise_if_any`, one small all-reduce at the end of
    the load): a refusal of one rank's slice alone (a value beyond fp16 in its rows only) is raised on the other
    ranks too, the same error with a note naming that rank, where they went on before to wait for it in their next
    collective until the timeout.  A rank that fails early waits there for the others to finish reading.

    Args:
        path: a folder with ``config.json`` and ``model.safetensors`` (or shards listed in
            ``model.safetensors.index.json``), as ``save_pretrained`` writes them, keys as in transformers'
            ``*ForCausalLM`` (OPT files without the ``model.`` prefix are read too).  Dense weights are read
            slice by slice.  A flash-llm checkpoint (``flash_llm.save_pretrained`` / ``convert``) or a
            compressed-tensors sparse-bitmask one is streamed one tensor at a time instead: each projection is
            expanded on this rank's device, sliced and compressed again (flash-llm layers in their stored
            format when ``sparsify`` is ``None``; sparse-bitmask ones as ``SparsifyConfig()`` decides).  A
            tied ``lm_head.weight`` the file stores is not read (a warning, as for a stray tensor), unless
            it is the only copy of the shared matrix (no embedding in the file): the embedding is read from it.
        tp: the group (default: :meth:`TensorParallel.from_group` on the default process group).
        dtype: parameter dtype (``torch.float16``, ``torch.bfloat16``, or ``torch.float32`` / ``torch.float64``
            without ``sparsify``: then every projection slice is dense, a compressed-tensors sparse-bitmask
            checkpoint's too, as :func:`flash_llm.from_pretrained` keeps such layers dense).  Another dtype (float8,
            an integer one) is a ``TypeError`` naming ``dtype``, before anything is read (:data:`LOAD_DTYPES`).
        sparsify: compress each projection slice with this :class:`~flash_llm.SparsifyConfig` (per slice:
            ``min_sparsity``, ``skip_names``, only when smaller); ``None`` keeps them dense.  With it, a
            flash-llm checkpoint's compressed layers are expanded and their slices compressed again in
            ``dtype`` (a checkpoint stored in another dtype loads so, as in :func:`flash_llm.from_pretrained`).
        progress: a tqdm bar over the decoder layers (stderr); ``None`` (default): on rank 0 only.

    Returns:
        ``(model, report)``: the model (eval mode, ``model.tensor_parallel`` set, ready for
        :class:`flash_llm.engine.Engine`) and this rank's :class:`ShardReport`.  ``model.config.eos_token_id`` is
        ``generation_config.json``'s where that file sets one, as in :func:`flash_llm.from_pretrained`.

    Raises:
        ValueError: the world size does not divide the heads / KV heads / intermediate size; a tensor's shape
            disagrees with ``config.json``; ``sparsify`` (its fields checked again) sets another dtype than
            ``dtype``, or a field it refuses; TypeError: ``dtype`` not one of :data:`LOAD_DTYPES`; ``sparsify``
            with a ``dtype`` other than fp16 / bf16;
            FileNotFoundError: no folder, or no safetensors files in it;
            FormatError (naming the file and tensor): the files are chosen and checked as
            :func:`flash_llm.from_pretrained` does (a bad index, or a shard that disagrees with it, is refused); a
            tensor of the model is missing (:class:`MissingTensorError`, a ``KeyError`` too); a tensor that has no
            place in the model built from ``config.json`` (a dense checkpoint's too, before anything is read, where
            it lies among the model's own: a bias, or a decoder layer, that ``config.json`` says the model lacks;
            other unused tensors, OPT's ``decoder.version``, give a warning); a compressed
            checkpoint that is invalid, or a flash-llm one stored in another dtype than ``dtype`` loaded with
            ``sparsify=None``; LossyCastError (a ValueError naming the file and tensor): a value that the cast to
            ``dtype`` turns into inf (a float32 weight above float16's 65504), as from_pretrained refuses it.
    """
    tp = TensorParallel.from_group() if tp is None else tp
    loaded = error = None
    try:
        loaded = _load(path, tp, dtype, sparsify, progress)
    except Exception as e:  # (agreed on below: a refusal on one rank only would leave the others waiting)
        error = e
    tp.raise_if_any(error, "while loading the checkpoint")
    model, report, (folder, cfg, unused) = loaded
    _warn_unused(folder, cfg, unused)
    return model, report


def _load(path, tp: TensorParallel, dtype, sparsify, progress):
    """:func:`load_tensor_parallel` on this rank alone: ``(model, report, (folder, config, unused keys))``."""
    if not isinstance(dtype, torch.dtype) or dtype not in LOAD_DTYPES:  # (before anything is read)
        raise TypeError(f"dtype must be torch.float16, torch.bfloat16, torch.float32 or torch.float64, got {dtype!r}")
    folder = os.fspath(path)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder} is not a directory (expected a checkpoint folder with config.json and "
                                "*.safetensors)")
    cfg = as_config(os.path.join(folder, "config.json"))
    check_divisible(cfg, tp.world_size)
    check_sparsify(sparsify)
    if sparsify is not None and dtype not in VALUE_DTYPES:  # (before anything is read, not at the first projection)
        raise TypeError(f"sparsify needs dtype=torch.float16 or torch.bfloat16 (the compressed formats hold those), "
                        f"got dtype={dtype}; load with one of them, or with sparsify=None to keep the slices dense")
    if sparsify is not None and sparsify.dtype not in (None, dtype):
        raise ValueError(f"sparsify.dtype ({sparsify.dtype}) differs from dtype ({dtype}): the whole model is loaded "
                         "in dtype; leave SparsifyConfig.dtype unset")
    device = tp.device
    from ..checkpoint import _files
    from ..checkpoint.pretrained import cast_checked, checkpoint_kind, use_generation_eos

    use_generation_eos(cfg, folder)  # (the engine's default stop tokens, as from_pretrained)
    model = from_config(cfg, dtype=dtype, device="meta")

    config_path = os.path.join(folder, "config.json")
    with open(config_path, encoding="utf-8") as f:
        kind = checkpoint_kind(json.load(f), config_path)
    # the files, chosen and checked before the progress bar shows (an error is then not printed after it)
    files = _files.open_checkpoint(folder) if kind.kind != "dense" else None
    ckpt = _Checkpoint(folder) if kind.kind == "dense" else None
    bar = tqdm(total=cfg.num_layers, desc=f"loading {os.path.basename(folder.rstrip(os.sep))} (rank {tp.rank}/"
               f"{tp.world_size})", file=sys.stderr, leave=False, dynamic_ncols=True,
               disable=not (tp.rank == 0 if progress is None else progress))
    if kind.kind != "dense":  # config.json names flash-llm's method or compressed-tensors' sparse-bitmask
        unused = _load_compressed(model, cfg, files, kind, tp, dtype, sparsify, bar)
        return *_finish(model, tp, device, folder), (folder, cfg, unused)
    _refuse_misplaced(ckpt, model, cfg, config_path)  # (the model as built from config.json, before any read)

    def need(name: str) -> str:
        k = ckpt.key(name)
        if k is None:
            raise MissingTensorError(f"{ckpt.source}: no tensor {name!r} in the checkpoint (no shard holds it)")
        return k

    def get(name, shape, **rng):  # (a cast that overflows to inf refused naming file and tensor, as in from_pretrained)
        key = need(name)
        return cast_checked(ckpt.where[key], key, ckpt.read(key, shape, **rng, want=dtype).to(device), dtype)

    per_layer = len(cfg.linear_shapes())
    with torch.no_grad(), bar:  # (the bar is closed on an error too, before the caller prints it)
        for i, (fqn, kind, m, k) in enumerate(projections(cfg)):
            parent_name, _, name = fqn.rpartition(".")
            parent = model.get_submodule(parent_name)
            has_bias = getattr(parent, name).bias is not None
            if kind == COLUMN:
                start, stop = shard_range(m, tp.world_size, tp.rank)
                w = get(fqn + ".weight", (m, k), rows=(start, stop))
                b = get(fqn + ".bias", (m,), rows=(start, stop)) if has_bias else None
                new = column_from_slice(w, b, m, start, tp, fqn, sparsify=sparsify)
            else:
                start, stop = shard_range(k, tp.world_size, tp.rank)
                w = get(fqn + ".weight", (m, k), cols=(start, stop))
                b = get(fqn + ".bias", (m,)) if has_bias else None
                new = row_from_slice(w, b, k, start, tp, fqn, sparsify=sparsify)
            setattr(parent, name, new)
            del w, b
            if (i + 1) % per_layer == 0:
                bar.update(1)
        bar.close()
        # everything else, replicated: embeddings, norms, lm_head (absent from tied checkpoints)
        state = {}
        embed = model._embed_key()
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if not t.is_meta:
                continue
            source = name
            if ckpt.key(name) is None and cfg.tie_word_embeddings:
                if name == "lm_head.weight":
                    continue  # the model's load hook ties it to the input embedding
                if name == embed and ckpt.key("lm_head.weight") is not None:
                    source = "lm_head.weight"  # a tied checkpoint that stores the shared matrix as lm_head only
            state[name] = get(source, tuple(t.shape))
        model.load_state_dict(state, strict=False, assign=True)
    unused = [k for k in ckpt.where if k not in ckpt.used and not k.endswith(_IGNORED_SUFFIXES)]
    return *_finish(model, tp, device, folder), (folder, cfg, unused)


def _refuse_misplaced(ckpt: _Checkpoint, model, cfg, config_path: str) -> None:
    """FormatError (naming the file and the tensor, in the words of the compressed route and of
    :func:`flash_llm.from_pretrained`) for a tensor of the dense checkpoint that has no place in ``model`` (as built
    from ``config.json``, not yet sharded) but lies where the model's own tensors do: beside the tensors of one of
    its modules (a projection's bias where ``config.json`` says it has none) or in a decoder layer (one of those
    the config counts, or one beyond them).  The file and its ``config.json`` disagree, and loading what the config
    asks for would compute another model than the weights.  Tensors elsewhere (OPT's ``decoder.version``) are only
    warned about after the load (:func:`_warn_unused`), as before."""
    from ..checkpoint import _model

    state = model.state_dict()
    known = set(state) | set(_model.non_persistent_buffers(model))  # (a tied model's lm_head.weight too)
    owners = {name.rpartition(".")[0] for name in state}  # the modules that hold tensors of their own
    block = re.compile(re.escape(layer_prefix(cfg)) + r"\.(\d+)\.")
    misplaced = []  # (key, its model names), in file order
    for key in sorted(ckpt.where, key=ckpt.order.__getitem__):
        names = (key,) if key.startswith("model.") else (key, "model." + key)  # (older OPT files drop "model.")
        if key.endswith(_IGNORED_SUFFIXES) or any(n in known for n in names):
            continue
        if any(block.match(n) or n.rpartition(".")[0] in owners for n in names):
            misplaced.append((key, names))
    if misplaced:
        key, names = misplaced[0]
        layer = next((int(m.group(1)) for n in names if (m := block.match(n))), -1)
        why = f"config.json says {cfg.num_layers} decoder layer(s); " if layer >= cfg.num_layers else ""
        more = f"; the checkpoint holds {len(misplaced) - 1} more such tensor(s)" if len(misplaced) > 1 else ""
        raise FormatError(f"{ckpt.where[key]}: tensor '{key}' has no place in the {cfg.family} model built from "
                          f"{config_path} ({why}wrong config.json, or another model's checkpoint{more})")


def _warn_unused(folder, cfg, unused: list[str]) -> None:
    """Warn (at load_tensor_parallel's caller) about the checkpoint's tensors that were not read."""
    if unused:
        warnings.warn(f"{folder}: {len(unused)} tensor(s) of the checkpoint are not weights of a "
                      f"{cfg.family} model and were not read, e.g. {unused[:5]}", UserWarning, stacklevel=3)


def _finish(model, tp, device, folder):
    """Check that every tensor arrived, then make the model this rank's part of the group, on ``device``."""
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # (a tied lm_head absent from the file was tied to the embedding by load_state_dict)
        raise MissingTensorError(f"{folder}: the checkpoint lacks {len(left)} tensor(s) of the model, e.g. "
                                 f"{left[:5]}")
    set_local_heads(model, tp.world_size)
    model.tensor_parallel = tp
    # the loaded tensors are on the device already; this moves what the model computes itself (rotary
    # frequencies, built on the CPU beside the meta skeleton), so every tensor is where the caller asked
    model.to(device)
    return model.eval(), ShardReport.of(model)


def _load_compressed(model, cfg, files, kind, tp, dtype, sparsify, bar) -> list[str]:
    """A flash-llm or sparse-bitmask checkpoint: its shards are streamed one entry at a time
    (:func:`flash_llm.checkpoint.pretrained.iter_checkpoint`, memory-mapped, validated).  A flash-llm layer
    loaded with ``sparsify=None`` keeps its format: this rank's slice is cut from its records
    (:meth:`SparseFormat.slice`; re-encoded only when the slice does not fall on record boundaries); it must hold
    ``dtype``.  Other projections (and, with ``sparsify``, flash-llm layers of any dtype) are expanded on this
    rank's device in ``dtype``, sliced, and compressed with ``sparsify`` (or with ``SparsifyConfig()`` for a
    sparse-bitmask checkpoint loaded with ``sparsify=None``, as :func:`flash_llm.from_pretrained` does; in a
    ``dtype`` other than fp16 / bf16 its slices stay dense, the reason in their note, as there).  A rank
    holds at most one expanded projection besides its share.  Returns the keys not read: a tied model's stored
    ``lm_head.weight`` (the model ties it to the input embedding, as the dense route and from_pretrained do)."""
    from ..checkpoint import sparse_bitmask as sb
    from ..checkpoint.pretrained import cast_checked, check_dtype, iter_checkpoint, stored_twice
    from ..formats import SparseFormat

    device = tp.device
    kept_dense = ""  # why every slice stays dense, where compression was implied (the report's note)
    if sparsify is None and kind.kind == "sparse-bitmask":
        if dtype in VALUE_DTYPES:
            sparsify = SparsifyConfig()
        else:  # (from_pretrained keeps such layers dense: load_checkpoint's slots, "the sparse formats hold...")
            kept_dense = f"dtype {dtype}: the sparse formats hold fp16/bf16"
    proj = {fqn: (pkind, m, k) for fqn, pkind, m, k in projections(cfg)}
    per_layer = len(cfg.linear_shapes())
    meta = {n: t for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta}
    wanted = {n: tuple(t.shape) for n, t in meta.items()}
    # checkpoint key -> model name (older OPT files drop the leading "model.")
    names = {}
    for n in wanted:
        names.setdefault(n, n)
        names.setdefault(n.removeprefix("model."), n)
    read_as: dict[str, str] = {}  # model name -> the checkpoint key it was read from (a second one is refused)
    read_from: dict[str, object] = {}  # model name -> the shard it was read from (named by a refused cast)
    pending: dict[str, dict[str, object]] = {}  # projection -> weight (dense / SparseFormat) and bias, until both
    state: dict[str, torch.Tensor] = {}
    done = 0
    source = str(files.path)
    unused: list[str] = []
    tied_head = None  # a tied model's stored lm_head.weight entry

    def cast(name: str, t: torch.Tensor) -> torch.Tensor:
        """The model's tensor ``name``, read as ``t``, in ``dtype``: a cast that overflows to inf refused naming the
        file and tensor (:func:`~flash_llm.checkpoint.pretrained.cast_checked`, as in from_pretrained)."""
        return cast_checked(read_from[name], read_as[name], t, dtype)

    def place(fqn: str) -> None:
        nonlocal done
        pkind, m, k = proj[fqn]
        got = pending.pop(fqn)
        w = got["weight"]
        fmt = None
        if isinstance(w, SparseFormat):
            if sparsify is None:  # kept in its format: records cut directly where the slice allows it
                if w.dtype != dtype:
                    # (sparsify re-encodes in fp16 / bf16 only: load_tensor_parallel refuses it with another dtype)
                    other = ", or a SparsifyConfig as sparsify to re-encode it" if dtype in VALUE_DTYPES else ""
                    raise FormatError(f"{source}: '{fqn}' is compressed as {w.dtype} but the model is loaded in "
                                      f"{dtype}; pass dtype={w.dtype}{other}")
                w = w.to(device)
                fmt = type(w)
            else:  # decompressed in dtype; each slice is compressed again as sparsify decides (from_pretrained)
                w = cast(f"{fqn}.weight", w.to(device).to_dense())
        else:
            w = cast(f"{fqn}.weight", w.to(device))
        bias = got.get("bias")
        bias = None if bias is None else cast(f"{fqn}.bias", bias.to(device))
        compressed = isinstance(w, SparseFormat)
        if pkind == COLUMN:
            start, stop = shard_range(m, tp.world_size, tp.rank)
            local = w.slice((start, stop)) if compressed else w[start:stop].contiguous()
            del w
            new = column_from_slice(local, None if bias is None else bias[start:stop].contiguous(), m, start, tp,
                                    fqn, fmt=fmt, sparsify=sparsify)
        else:
            start, stop = shard_range(k, tp.world_size, tp.rank)
            local = w.slice(None, (start, stop)) if compressed else w[:, start:stop].contiguous()
            del w
            new = row_from_slice(local, bias, k, start, tp, fqn, fmt=fmt, sparsify=sparsify)
        if kept_dense:
            new.note = kept_dense
        parent_name, _, name = fqn.rpartition(".")
        setattr(model.get_submodule(parent_name), name, new)
        done += 1
        if done % per_layer == 0:
            bar.update(1)

    def dense_value(e, name: str):
        """The entry ``e`` for the model's tensor ``name``: sparse-bitmask decompressed, shape and dtype checked
        (a dense tensor of another kind than the model's, an integer one for a weight, is refused as in
        from_pretrained)."""
        value = e.value
        if e.kind == "sparse-bitmask":
            value = sb.decompress(dict(value), value.get("_name", e.key), str(e.path))
        shape = tuple(value.shape)
        if shape != wanted[name]:
            raise FormatError(f"{e.path}: tensor '{e.key}' has shape {shape}; config.json says {wanted[name]}")
        if isinstance(value, torch.Tensor):
            check_dtype(e.path, e.key, value.dtype, meta[name].dtype)
        return value

    def replicated(value, name: str) -> torch.Tensor:
        """The model's replicated tensor ``name`` on this rank's device, floating point in ``dtype``."""
        if isinstance(value, SparseFormat):  # a replicated layer stored compressed (lm_head): dense here
            value = value.to(device).to_dense()
        return cast(name, value.to(device)) if value.is_floating_point() else value.to(device)

    with torch.no_grad(), bar:
        for e in iter_checkpoint(files, kind, "cpu", progress=False):
            name = names.get(e.key)
            if name is None:
                if e.key.endswith(_IGNORED_SUFFIXES):
                    continue
                if e.key == "lm_head.weight" and cfg.tie_word_embeddings:  # (tied: the embedding is read instead)
                    unused.append(e.key)
                    tied_head = e  # (unless the checkpoint stores the shared matrix as lm_head only)
                    continue
                raise FormatError(f"{e.path}: tensor '{e.key}' has no place in the {cfg.family} model built from "
                                  f"{files.path / 'config.json'} (wrong config.json, or another model's checkpoint)")
            if name in read_as:  # (stored as 'model.X' and as 'X': from_pretrained refuses it in the same words)
                raise stored_twice(e.path, e.key, name, None if e.key != name else read_as[name])
            read_as[name], read_from[name] = e.key, e.path
            value = dense_value(e, name)
            owner, _, attr = name.rpartition(".")
            if owner in proj and attr in ("weight", "bias"):
                pending.setdefault(owner, {})[attr] = value
                has_bias = getattr(model.get_submodule(owner), "bias", None) is not None
                if "weight" in pending[owner] and (not has_bias or "bias" in pending[owner]):
                    place(owner)
                continue
            state[name] = replicated(value, name)
        bar.close()
        embed = model._embed_key()
        if tied_head is not None and embed in wanted and embed not in state:  # the shared matrix as lm_head only
            read_as[embed], read_from[embed] = tied_head.key, tied_head.path
            state[embed] = replicated(dense_value(tied_head, embed), embed)
            unused.remove(tied_head.key)
        if pending:
            fqn, got = next(iter(pending.items()))
            part = "bias" if "weight" in got else "weight"
            raise MissingTensorError(f"{files.path}: tensor '{fqn}.{part}' is missing (no shard holds it)")
        model.load_state_dict(state, strict=False, assign=True)
    return unused

"""Hugging Face checkpoint directories on disk: finding and reading the safetensors shards (memory-mapped,
every inconsistency an error naming the file and the tensor), writing shards, and writing a whole
output directory atomically (a temporary directory renamed at the end).

A checkpoint directory holds ``config.json`` and either ``model.safetensors`` or the shards listed in
``model.safetensors.index.json`` (``{"metadata": {...}, "weight_map": {tensor: shard file}}``); where both are
present, ``model.safetensors`` is read (as transformers does: re-saving a model unsharded into the directory of
its sharded save leaves the old index behind).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from ..formats import FormatError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9
# Files next to the weights that describe them (copied by ``convert``); weights in other formats are not, nor the index
# of any weight format (``pytorch_model.bin.index.json`` beside the safetensors: the output writes its own index, and
# holds none of the shards such an index lists).
_WEIGHT_EXTENSIONS = "safetensors|bin|pt|pth|ckpt|h5|msgpack|gguf|onnx"
_WEIGHT_FILE = re.compile(rf".*\.({_WEIGHT_EXTENSIONS})$|.*\.({_WEIGHT_EXTENSIONS})\.index\.json$")
#: Endings of tensor names some checkpoints store that are no weights of the model: buffers it computes itself
#: (Llama-2-era files' per-layer ``...self_attn.rotary_emb.inv_freq``).  Readers skip them, as transformers does.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def stored_names(name: str) -> tuple[str, ...]:
    """The names under which a checkpoint may store the model's tensor ``name``, preferred first: ``name`` itself
    and, for a name under ``model.``, the name without it (files saved from the base model, as transformers
    reads them: older OPT files such as facebook/opt-6.7b and larger have ``decoder.embed_tokens.weight``)."""
    return (name, name.removeprefix("model.")) if name.startswith("model.") else (name,)


def parse_size(size) -> int:
    """``5_000_000``, ``"5GB"``, ``"500MB"``, ``"64KiB"`` -> bytes (KB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB
    of 1024, as in transformers; the letters' case is free, ``"500mB"`` is 500 MB).

    A decimal unit or a bare ``B`` ending in a lowercase ``b`` (``"500Mb"``, ``"5gb"``, ``"100b"``) is refused:
    transformers' ``convert_file_size_to_int`` reads ``"500Mb"`` as megabits (500 MB / 8) and does not take a bare
    ``b``, so the spelling means bits there and bytes to many a user; write ``B`` (``"500MB"``) or a byte count.
    (``"64Kib"`` is bytes, as in transformers.)  ValueError naming ``max_shard_size`` for anything else but an int
    or such a string, and for a size below 1 byte."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size < 1:
            raise ValueError(f"max_shard_size must be >= 1 byte, got {size}")
        return size
    if isinstance(size, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", size, flags=re.IGNORECASE)
        if m and m.group(2) and m.group(2)[-1] == "b" and m.group(2)[-2:-1].lower() != "i":
            raise ValueError(f"max_shard_size {size!r} ends in a lowercase 'b', which transformers reads as bits "
                             f"(or refuses); write '{m.group(1)}{m.group(2)[:-1].upper()}B' for bytes, or a byte count")
        if m:
            unit = (m.group(2) or "B").upper()
            scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
                     "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
            value = int(float(m.group(1)) * scale)
            if value >= 1:
                return value
    raise ValueError(f"max_shard_size must be a byte count or a size like '5GB' / '500MB', got {size!r}")


def named(path) -> str:
    """``path`` as a message names it: as given, but absolute where it holds no directory part (``.``, or a file of
    the working directory: ``Path(".") / "config.json"`` prints as ``config.json``, so ``flash-llm inspect .`` would
    say ``config.json: config.json is missing``, naming no directory)."""
    p = Path(os.fspath(path))
    if p.is_absolute() or len(p.parts) > 1:
        return str(p)
    try:
        return os.path.abspath(p)
    except OSError:  # (a working directory that was removed)
        return os.path.join(os.curdir, p)


def read_json(path: Path, what: str) -> dict:
    """A JSON object from ``path``; FormatError naming the file (:func:`named`) otherwise."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FormatError(f"{named(path)}: {what} is missing") from None
    except UnicodeDecodeError as e:
        raise FormatError(f"{named(path)}: {what} is not UTF-8 text ({e})") from None
    except OSError as e:  # a directory, no permission to read, an I/O error: an input problem all the same
        raise FormatError(f"{named(path)}: cannot read {what} ({e.strerror or e})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise FormatError(f"{named(path)}: {what} is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise FormatError(f"{named(path)}: {what} must hold a JSON object, got {type(obj).__name__}")
    return obj


@dataclass
class TensorInfo:
    """Where one tensor lives and what its header says (no data read)."""

    name: str
    file: Path
    dtype: str  # safetensors dtype code: "F16", "BF16", "F32", "I32", "I64", "U8", ...
    shape: tuple[int, ...]


class NonUTF8PathError(ValueError):
    """A path with a name that is not valid UTF-8 (e.g. the bytes of a Latin-1 name, which Python holds as lone
    surrogates): safetensors takes paths as UTF-8 text and cannot open it, so a file written there could never be
    read back."""


def shown_path(path) -> str:
    """``path`` as text that prints on any stream: the bytes of a name that are not UTF-8 as ``\\xNN``."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def non_utf8_name(path) -> str | None:
    """The first name in ``path`` that is not valid UTF-8 (as :func:`shown_path` shows it), or None if the whole
    path is UTF-8 (what safetensors needs to open it)."""
    for name in os.fsencode(path).split(b"/"):
        try:
            name.decode("utf-8")
        except UnicodeDecodeError:
            return name.decode("utf-8", "backslashreplace")
    return None


def non_utf8_message(path) -> str | None:
    """Why safetensors cannot open ``path`` when a name in it is not UTF-8 (the reader's side of
    :func:`check_utf8_path`), or None."""
    name = non_utf8_name(path)
    if name is None:
        return None
    return (f"{shown_path(path)}: the name '{name}' in this path is not valid UTF-8, which safetensors cannot open "
            "(the file is not necessarily damaged); rename it")


def check_utf8_path(out, what: str = "output") -> None:
    """:class:`NonUTF8PathError` naming ``what`` ``out`` where a name in the path ``out`` is not valid UTF-8: a
    safetensors file written there could not be opened again (safetensors takes UTF-8 paths only), so such an
    output is refused before any work."""
    name = non_utf8_name(out)
    if name is None:
        return
    which = "its name" if name == shown_path(Path(os.fspath(out)).name) else f"the directory name '{name}' in it"
    raise NonUTF8PathError(f"{what} {shown_path(out)}: {which} is not valid UTF-8; safetensors cannot open such a "
                           "path, so what is written there could not be read back: give a UTF-8 name")


class Shard:
    """One safetensors file, opened memory-mapped; tensors it returns share its pages (no copies)."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = path
        try:
            self._file = safe_open(os.fspath(path), framework="pt", device="cpu")
        except FileNotFoundError:
            raise FormatError(f"{named(path)}: shard file is missing") from None
        except Exception as e:  # safetensors raises its own error types for truncated or corrupt headers
            if (why := non_utf8_message(path)) is not None:  # (safetensors' error for it: "... is not valid UTF-8")
                raise FormatError(why) from None
            raise FormatError(f"{named(path)}: not a readable safetensors file, truncated or corrupt "
                              f"({type(e).__name__}: {e})") from None
        self.metadata: dict[str, str] = self._file.metadata() or {}
        self.keys: list[str] = list(self._file.keys())

    def info(self, name: str) -> TensorInfo:
        s = self._file.get_slice(name)
        return TensorInfo(name, self.path, s.get_dtype(), tuple(s.get_shape()))

    def get_slice(self, name: str):
        """``safe_open``'s lazy slice of the tensor ``name``: indexing it reads only that range."""
        return self._file.get_slice(name)

    def get(self, name: str) -> torch.Tensor:
        """The tensor ``name`` (memory-mapped, CPU)."""
        try:
            return self._file.get_tensor(name)
        except Exception as e:  # safetensors' own error types
            raise FormatError(f"{named(self.path)}: cannot read tensor '{name}' ({type(e).__name__}: {e})") from None


@dataclass
class CheckpointFiles:
    """The files of a checkpoint directory: ``config.json`` and the shards, in order, with the tensor names
    each holds (from the index, checked against every shard's header)."""

    path: Path
    config: dict
    shards: list[Path]
    tensors: dict[str, TensorInfo]  # every tensor of the checkpoint, in shard order

    def shard_keys(self) -> dict[Path, list[str]]:
        out: dict[Path, list[str]] = {p: [] for p in self.shards}
        for t in self.tensors.values():
            out[t.file].append(t.name)
        return out

    @property
    def nbytes(self) -> int:
        return sum(os.path.getsize(p) for p in self.shards)


def open_checkpoint(path) -> CheckpointFiles:
    """Read ``config.json`` and the headers of every shard of the checkpoint directory ``path``.

    ``model.safetensors`` is read when present, else the shards the index lists (transformers' order: an index
    left beside a newer single file is stale).  Raises ``FileNotFoundError`` for a missing directory and
    :class:`~flash_llm.FormatError` naming the file (and tensor) for anything inconsistent: no weights, a bad
    index, a shard that is missing, truncated or corrupt, a tensor the index lists in a shard that does not
    hold it, or a tensor in a shard that the index does not list.
    """
    path = Path(os.fspath(path))
    if not path.exists():
        raise FileNotFoundError(f"{named(path)}: no such checkpoint directory")
    if not path.is_dir():
        raise FormatError(f"{named(path)}: expected a checkpoint directory (config.json and *.safetensors), got a "
                          "file")
    config = read_json(path / CONFIG_NAME, "config.json")
    shards, tensors = open_shards(path)
    return CheckpointFiles(path, config, shards, tensors)


def _names(names: list[str], most: int = 3) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def _no_weights_hint(path: Path) -> str:
    """What :func:`open_shards`' error says of the weight files ``path`` holds instead (``""`` for none):
    safetensors files under other names (a transformers ``variant`` save such as ``model.fp16.safetensors``, shards
    without their index) get told which names are read; weights in other formats, that only safetensors is."""
    names = sorted(p.name for p in path.iterdir())
    found = [n for n in names if _WEIGHT_FILE.fullmatch(n)]
    # (transformers names a variant's index model.safetensors.index.<variant>.json)
    indexes = [n for n in names if re.fullmatch(r".*\.safetensors\.index(\..+)?\.json", n)]
    shards = [n for n in found if n.endswith(".safetensors")]
    if indexes:
        return (f" (found {_names(indexes)}: flash-llm reads a sharded checkpoint's index only as {INDEX_NAME}, "
                f"not a transformers variant's, model.safetensors.index.<variant>.json; rename the index to "
                f"{INDEX_NAME} (its shards keep their names) or save without variant=)")
    if len(shards) == 1 and re.fullmatch(r".*-\d+-of-\d+\.safetensors", shards[0]):
        return (f" (found {shards[0]}: a shard is read through {INDEX_NAME}, which maps each tensor to its file; "
                f"add the index, or rename a lone shard to {WEIGHTS_NAME})")
    if len(shards) == 1:
        return (f" (found {shards[0]}: flash-llm reads a single-file checkpoint only as {WEIGHTS_NAME}, not a "
                f"transformers variant's, model.<variant>.safetensors; rename the file to {WEIGHTS_NAME} or save "
                "without variant=)")
    if shards:
        return (f" (found {_names(shards)}: several safetensors files are read through {INDEX_NAME}, which maps "
                "each tensor to its file; it is missing)")
    return f" (found {', '.join(found)}: flash-llm reads safetensors checkpoints only)" if found else ""


def open_shards(path) -> tuple[list[Path], dict[str, TensorInfo]]:
    """The shards of the checkpoint directory ``path`` and every tensor they hold (in shard order), chosen and
    checked as :func:`open_checkpoint` describes, without reading ``config.json``; the same FormatErrors."""
    path = Path(os.fspath(path))
    index_path, single = path / INDEX_NAME, path / WEIGHTS_NAME
    tensors: dict[str, TensorInfo] = {}
    if single.exists():
        shard = Shard(single)
        shards = [single]
        tensors = {k: shard.info(k) for k in shard.keys}
    elif index_path.exists():
        index = read_json(index_path, "the safetensors index")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise FormatError(f"{named(index_path)}: 'weight_map' must be a non-empty object of tensor name -> shard "
                              "file")
        files: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            if not isinstance(file, str) or "/" in file or "\\" in file or file in ("", ".", ".."):
                raise FormatError(f"{named(index_path)}: tensor '{name}' maps to {file!r}; expected a file name "
                                  f"in {named(path)}")
            files.setdefault(file, []).append(name)
        shards = [path / f for f in sorted(files)]
        for file, names in sorted(files.items()):
            shard = Shard(path / file)
            have = set(shard.keys)
            for name in names:
                if name not in have:
                    raise FormatError(f"{named(path / file)}: tensor '{name}' is missing (the index lists it in this "
                                      "shard)")
            listed = set(names)
            extra = [k for k in shard.keys if k not in listed]
            if extra:
                raise FormatError(f"{named(path / file)}: holds tensor '{extra[0]}' that {INDEX_NAME} does not list "
                                  f"for it ({len(extra)} such tensor(s)); the index and the shards disagree")
            for name in shard.keys:
                tensors[name] = shard.info(name)
    else:
        raise FormatError(f"{named(path)}: no {WEIGHTS_NAME} or {INDEX_NAME}{_no_weights_hint(path)}")
    if not tensors:
        raise FormatError(f"{named(path)}: the checkpoint holds no tensors")
    return shards, tensors


def auxiliary_files(path: Path) -> list[Path]:
    """Files of a checkpoint directory other than weights, index and config.json (tokenizer files,
    generation_config.json, ...), which a conversion carries over."""
    return sorted(p for p in path.iterdir()
                  if p.is_file() and p.name != CONFIG_NAME and not _WEIGHT_FILE.fullmatch(p.name))


# ---- writing ---------------------------------------------------------------------------------------

def _umask() -> int:
    """The process umask (reading it means setting it: set it straight back)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def save_safetensors(tensors: dict[str, torch.Tensor], path, metadata: dict[str, str]) -> None:
    """``safetensors.torch.save_file`` with the usual file permissions (safetensors creates its files 0600)."""
    from safetensors.torch import save_file

    save_file(tensors, os.fspath(path), metadata=metadata)
    usual_permissions(path)


def usual_permissions(path) -> None:
    """Give the file ``path`` the permissions ``open()`` gives a new file under the process umask (0644 under umask
    022), for a file that safetensors' ``save_file`` wrote (0600, owner-only)."""
    os.chmod(path, 0o666 & ~_umask())


def refuse_inside(source, out, source_what: str = "source", out_what: str = "destination") -> None:
    """ValueError naming both paths when ``source`` is ``out`` or lies inside it (symbolic links resolved): replacing
    ``out`` would delete the source (and whatever lies beside it in ``out``) before or while it is read."""
    s, o = Path(os.fspath(source)).resolve(), Path(os.fspath(out)).resolve()
    if s == o:
        raise ValueError(f"{source_what} {source} and {out_what} {out} are the same directory, which writing "
                         f"replaces as a whole; write elsewhere")
    if o in s.parents:
        raise ValueError(f"{source_what} {source} lies inside {out_what} {out}, which writing replaces as a whole "
                         f"(deleting {source_what}); write elsewhere")


class NameTooLongError(OSError, ValueError):
    """An output path with a name longer than its file system allows (``ENAMETOOLONG``): an ``OSError``, and a
    ``ValueError`` as the other problems of an argument are (the CLI's status 2)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.errno = errno.ENAMETOOLONG


_NAME_MAX = 255  # bytes in one file name (ext4, xfs, btrfs, tmpfs...), where the file system does not say
_RANDOM_CHARS = 8  # what tempfile.mkdtemp appends to the prefix


def _name_max(directory: Path) -> int:
    """The longest file name (bytes) the file system of the existing ``directory`` allows."""
    try:
        return int(os.pathconf(directory, "PC_NAME_MAX"))
    except (AttributeError, OSError, ValueError):  # (no pathconf, or no limit it knows)
        return _NAME_MAX


def _existing_ancestor(path: Path) -> Path:
    """The nearest ancestor of the absolute ``path`` that exists (or is a symbolic link).  (``os.path.lexists``:
    ``Path.exists`` raises for a name longer than the file system allows, which the caller is to tell.)"""
    parent = path.absolute().parent
    while not os.path.lexists(parent) and parent != parent.parent:
        parent = parent.parent
    return parent


def check_name_lengths(out, what: str = "output") -> None:
    """:class:`NameTooLongError` naming ``what`` ``out`` where a name that creating ``out`` makes (its own, and those
    of missing directories above it) is longer than the file system allows; :class:`NonUTF8PathError` (a
    ``ValueError``) where a name in it is not valid UTF-8 (:func:`check_utf8_path`)."""
    check_utf8_path(out, what)
    out = Path(os.fspath(out))
    parent = _existing_ancestor(out)
    if not parent.is_dir():
        return  # (NotADirectoryError: check_writable's, or the mkdir's, to say)
    limit = _name_max(parent)
    for name in out.absolute().relative_to(parent).parts:
        size = len(os.fsencode(name))
        if size > limit:
            which = "its name" if name == out.name else f"the name of the directory '{name[:40]}...' on the way"
            raise NameTooLongError(f"{what} {out}: {which} is {size} bytes long; the file system allows at most "
                                   f"{limit} (File name too long)")


def _temp_prefix(out: Path, tag: str) -> str:
    """``.<name>.<tag>-``, the prefix of a hidden temporary name beside ``out`` (``tempfile.mkdtemp`` appends 8
    characters).  Where that would pass the file system's name limit, the name is cut short and a hash of it
    keeps the prefix unique to ``out``: ``.<start of name>~<hash>.<tag>-``."""
    name, parent = out.name, out.absolute().parent
    room = (_name_max(parent) if parent.is_dir() else _NAME_MAX) - _RANDOM_CHARS - len(f"..{tag}-")
    if len(os.fsencode(name)) <= room:
        return f".{name}.{tag}-"
    digest = hashlib.sha1(os.fsencode(name)).hexdigest()[:12]
    short = name
    while short and len(os.fsencode(short)) > room - len(digest) - 1:  # (whole characters: the bytes stay UTF-8)
        short = short[:-1]
    return f".{short}~{digest}.{tag}-"


def check_writable(out, what: str = "output", *, file: bool = False) -> None:
    """Before any work: that ``out`` can be created, i.e. its nearest existing ancestor is a directory in which this
    process can make one, no name on the way is longer than the file system allows, and every name in it is UTF-8
    (else safetensors could not open what is written there).  ``NotADirectoryError`` / ``PermissionError`` /
    :class:`NameTooLongError` / :class:`NonUTF8PathError` naming ``what`` ``out`` otherwise.  (The test makes and
    removes an empty hidden directory there: permission bits do not tell, e.g. for root on /sys.)

    ``file``: ``out`` is a file to write into an existing directory (:meth:`flash_llm.formats.SparseFormat.save`,
    :func:`flash_llm.save`; safetensors creates no directories, and its own errors name no path and are no OSError):
    ``IsADirectoryError`` where ``out`` is a directory, ``FileNotFoundError`` where its directory does not exist."""
    check_utf8_path(out, what)
    out = Path(os.fspath(out))
    if file and os.path.isdir(out):  # (Path.is_dir raises for a name longer than the file system allows)
        raise IsADirectoryError(f"{what} {out} is a directory; give a file name (e.g. {out / 'weight.safetensors'})")
    parent = _existing_ancestor(out)
    if not parent.is_dir():
        raise NotADirectoryError(f"{what} {out}: {parent} is not a directory")
    if file and parent != out.absolute().parent:
        raise FileNotFoundError(f"{what} {out}: its directory {out.parent} does not exist")
    check_name_lengths(out, what)
    try:
        os.rmdir(tempfile.mkdtemp(prefix=_temp_prefix(out, "probe"), dir=parent))
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:  # (a file system with a limit of its own that pathconf did not tell)
            raise NameTooLongError(f"{what} {out}: the name is too long for the file system in {parent} "
                                   f"({e.strerror or e})") from None
        raise PermissionError(f"{what} {out}: cannot create {'a file' if file else 'a directory'} in {parent} "
                              f"({e.strerror or e})") from None


def working_directory_role(out) -> str | None:
    """``"the current directory"`` or ``"a parent of the current directory <cwd>"`` where ``out`` is one, else None:
    replacing it as a whole would move the process' working directory aside and delete it with everything in it
    (:func:`atomic_directory` refuses it; ``flash-llm prune`` / ``convert`` before loading,
    :func:`flash_llm.demo._unreplaceable_out`)."""
    try:
        resolved, cwd = Path(os.fspath(out)).resolve(), Path.cwd().resolve()
    except OSError:  # (a working directory that no longer exists: nothing of it to protect)
        return None
    if resolved == cwd:
        return "the current directory"
    return f"a parent of the current directory {cwd}" if resolved in cwd.parents else None


@contextlib.contextmanager
def atomic_directory(out, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``out``; when the block completes, it replaces ``out``.

    An existing ``out`` raises ``FileExistsError`` unless ``overwrite``; then it is replaced only after the
    new directory is complete.  Without ``overwrite``, the final rename replaces nothing either: a path that
    appeared at ``out`` while the block ran (another process's save, a directory the user made) is left as it is,
    and ``FileExistsError`` naming it is raised.  A path at ``out`` that is not a directory is never replaced.  If
    the block raises (including ``KeyboardInterrupt``), or either rename of the swap fails, the temporary directory
    is removed and ``out`` is untouched (moved back to its name, if the swap had moved it aside), and so are the
    missing directories above ``out`` that this call created (those only, and only while empty).  (A process killed
    outright leaves a hidden ``.<name>.tmp-*`` directory beside ``out``, never a partial ``out``.)
    """
    out = Path(os.fspath(out))
    check_name_lengths(out)  # (else the final rename would fail, after all the writing)
    if os.path.lexists(out) and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True (--overwrite) to replace it")
    _refuse_non_directory(out)
    if (role := working_directory_role(out)) is not None:
        raise ValueError(f"{out} is {role}, which writing replaces as a whole (deleting what is in it); write "
                         "elsewhere")
    created = _make_directories(out.parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(out, "tmp"), dir=out.parent))
    except BaseException:
        _remove_empty(created)
        raise
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private (0700); the result gets the usual permissions
        yield tmp
        if overwrite and os.path.lexists(out):
            _refuse_non_directory(out)  # (one that appeared meanwhile: never moved aside and deleted)
            old = Path(tempfile.mkdtemp(prefix=_temp_prefix(out, "old"), dir=out.parent))
            try:
                os.replace(out, old / out.name)
            except BaseException:  # (out stays where it was; the empty holder goes)
                shutil.rmtree(old, ignore_errors=True)
                raise
            try:
                os.replace(tmp, out)
            except BaseException:  # the original goes back to its name: nothing lost
                os.replace(old / out.name, out)
                shutil.rmtree(old, ignore_errors=True)
                raise
            shutil.rmtree(old)
        else:
            _rename_without_replacing(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        raise


def _make_directories(directory: Path) -> list[Path]:
    """``directory.mkdir(parents=True, exist_ok=True)``, returning the directories this call created, deepest first
    (not one that another process made meanwhile).  If it fails, those it created are removed again."""
    missing, d = [], directory.absolute()
    while not os.path.lexists(d) and d != d.parent:
        missing.append(d)
        d = d.parent
    created: list[Path] = []
    try:
        for d in reversed(missing):
            try:
                os.mkdir(d)
            except FileExistsError:
                if not d.is_dir():
                    raise
                continue
            created.insert(0, d)
        if not missing:
            directory.mkdir(parents=True, exist_ok=True)  # (the error for a file or dangling link there)
    except BaseException:
        _remove_empty(created)
        raise
    return created


def _remove_empty(directories: list[Path]) -> None:
    """Remove ``directories`` (deepest first) where they are empty: what a failed write created above its output,
    never anything that another process has put there meanwhile."""
    for d in directories:
        try:
            os.rmdir(d)
        except OSError:  # (not created after all, or not empty: left as it is)
            pass


def _refuse_non_directory(out: Path) -> None:
    if os.path.lexists(out) and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory; remove it first")


def _rename_without_replacing(tmp: Path, out: Path) -> None:
    """Rename the directory ``tmp`` to ``out``, which did not exist when the save began: ``FileExistsError`` naming
    ``out`` where something is there now (made while the save ran), which is left as it is.  (``os.rename`` never
    replaces a non-empty directory nor a file with a directory; the check before it covers an empty directory.)"""
    appeared = (f"{out} appeared while the new checkpoint was being written (another process's save?); it was left "
                "as it is and the new checkpoint was not written: pass overwrite=True (--overwrite) to replace it")
    if os.path.lexists(out):
        raise FileExistsError(appeared)
    try:
        os.rename(tmp, out)
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise FileExistsError(appeared) from None
        raise


def _tensor_nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class ShardWriter:
    """Write tensors into ``model.safetensors`` or, past ``max_shard_size``, numbered shards plus
    ``model.safetensors.index.json`` (transformers' layout).  Tensors added in one :meth:`add` call stay in
    one shard; each shard's header carries ``{"format": "pt"}`` plus the metadata given with its tensors.
    """

    def __init__(self, directory: Path, max_shard_size=DEFAULT_MAX_SHARD_SIZE):
        self.directory = Path(directory)
        self.max_shard_size = parse_size(max_shard_size)
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_meta: dict[str, str] = {}
        self._pending_bytes = 0
        self._written: list[tuple[Path, list[str]]] = []
        self.total_size = 0

    def add(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
        size = sum(_tensor_nbytes(t) for t in tensors.values())
        if self._pending and self._pending_bytes + size > self.max_shard_size:
            self._flush()
        for name, t in tensors.items():
            if name in self._pending or any(name in names for _, names in self._written):
                raise ValueError(f"tensor '{name}' is written twice")
            # safetensors writes host memory; each tensor is copied (so it shares memory with nothing)
            self._pending[name] = t.detach().to("cpu", copy=True).contiguous()
        self._pending_meta.update(metadata or {})
        self._pending_bytes += size
        self.total_size += size

    def _flush(self) -> None:
        path = self.directory / f"shard-{len(self._written):05d}.tmp"
        save_safetensors(self._pending, path, {"format": "pt", **self._pending_meta})
        self._written.append((path, list(self._pending)))
        self._pending, self._pending_meta, self._pending_bytes = {}, {}, 0

    def close(self, index_metadata: dict | None = None) -> list[Path]:
        """Write the last shard, name the shards and write the index; return the shard paths."""
        if self._pending or not self._written:
            self._flush()
        n = len(self._written)
        if n == 1:
            final = [self.directory / WEIGHTS_NAME]
        else:
            final = [self.directory / f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for (tmp, _), dst in zip(self._written, final):
            os.replace(tmp, dst)
        if n > 1:
            weight_map = {name: dst.name for (_, names), dst in zip(self._written, final) for name in names}
            index = {"metadata": {"total_size": self.total_size, **(index_metadata or {})}, "weight_map": weight_map}
            (self.directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        return final


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")

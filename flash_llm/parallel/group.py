"""The process group tensor-parallel layers all-reduce over: :func:`init_tensor_parallel` (torchrun's environment,
NCCL on CUDA, gloo on CPU, a timeout on every collective) and :class:`TensorParallel`, the handle the layers and
the engine use."""

from __future__ import annotations

import datetime
import gc
import numbers
import os
import pickle
import weakref
import warnings

import torch
import torch.distributed as dist

#: Default timeout of the process group: rendezvous and every collective (torch's own default is 10 minutes).
DEFAULT_TIMEOUT = datetime.timedelta(minutes=10)

#: The longest timeout :func:`init_tensor_parallel` accepts.  There is no unlimited one: torch's rendezvous store
#: counts the timeout in nanoseconds (it overflows past about 106,000 days) and gloo in microseconds.
MAX_TIMEOUT = datetime.timedelta(days=365)

#: Set in the environment before NCCL initializes, unless the user already set them: NVLink SHARP / multicast
#: (NVLS) stays off, in NCCL and in torch's symmetric-memory collectives.  NVLS reserves GPU memory per
#: communicator and needs multicast support from the driver and fabric manager; the all-reduces here are small
#: (one ``[batch, hidden]`` activation per layer) and gain little from it.
NCCL_ENV_DEFAULTS = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    if v is None or v == "":
        return None
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"environment variable {name}={v!r} is not an integer") from None


def nccl_env_defaults() -> dict[str, str]:
    """Put :data:`NCCL_ENV_DEFAULTS` into ``os.environ`` where unset or blank (NCCL reads a blank value as unset,
    so its own default, NVLS on where the system has it, would hold), and return the values now in effect.  A
    user's own setting is kept; one that turns NVLS on gets a ``UserWarning``."""
    for k, v in NCCL_ENV_DEFAULTS.items():
        if not os.environ.get(k, "").strip():
            os.environ[k] = v
    now = {k: os.environ[k] for k in NCCL_ENV_DEFAULTS}
    if now["NCCL_NVLS_ENABLE"].strip() != "0":
        warnings.warn(f"NCCL_NVLS_ENABLE={now['NCCL_NVLS_ENABLE']} in the environment turns NVLink multicast (NVLS) "
                      "on; flash-llm leaves it off by default (unset it, or set it to 0)", UserWarning, stacklevel=3)
    return now


def _as_timeout(timeout) -> datetime.timedelta:
    """``timeout`` (seconds, any real number but a bool, or a ``datetime.timedelta``) as a ``timedelta`` in
    ``(0, MAX_TIMEOUT]``; else ValueError naming it (NaN, inf and a value beyond :data:`MAX_TIMEOUT` too, which
    ``datetime`` or gloo would refuse in words that do not name it)."""
    bad = (f"timeout must be a positive number of seconds or a datetime.timedelta, at most {MAX_TIMEOUT.days} days "
           f"({MAX_TIMEOUT.total_seconds():g} s; there is no unlimited timeout), got {timeout!r}")
    if isinstance(timeout, numbers.Real) and not isinstance(timeout, bool):
        try:
            seconds = float(timeout)
        except (OverflowError, ValueError):
            raise ValueError(bad) from None
        if not 0 < seconds <= MAX_TIMEOUT.total_seconds():  # (False for NaN too)
            raise ValueError(bad)
        timeout = datetime.timedelta(seconds=seconds)
    if not isinstance(timeout, datetime.timedelta) or not datetime.timedelta(0) < timeout <= MAX_TIMEOUT:
        raise ValueError(bad)
    return timeout


def _backend_for(group, device: torch.device) -> str:
    """The backend that carries ``device``'s tensors in ``group``: ``"nccl"`` / ``"gloo"`` (a group created
    without a backend has both, ``"cpu:gloo,cuda:nccl"``)."""
    name = str(dist.get_backend(group)).lower()
    if name == "undefined" and hasattr(dist, "get_backend_config"):  # no backend given at init: one per device
        name = str(dist.get_backend_config(group)).lower()
    if "," in name or ":" in name:
        per_device = dict(part.split(":", 1) for part in name.split(","))
        return per_device.get(device.type, name)
    return name


def _group_timeout(group, device: torch.device) -> datetime.timedelta:
    """The timeout ``group`` (``None``: the default group) gives ``device``'s collectives, as torch keeps it in the
    backend's options (``_timeout``: gloo and NCCL, torch 2.x); :data:`DEFAULT_TIMEOUT` where this torch does not
    expose it (a private attribute: any failure to read it falls back, never raises).  One attribute lookup."""
    try:
        pg = dist.group.WORLD if group is None else group
        timeout = pg._get_backend(torch.device(device.type)).options._timeout
    except Exception:  # (a torch without these, or a backend without options)
        return DEFAULT_TIMEOUT
    return timeout if isinstance(timeout, datetime.timedelta) and timeout > datetime.timedelta(0) else DEFAULT_TIMEOUT


def _check_member(group) -> None:
    """ValueError unless this process is a member of ``group`` (``None``: the default group, always): torch's own
    error on a rank outside it ("Invalid process group specified") names neither the rank nor the group."""
    if group is not None and dist.get_rank(group) < 0:
        try:
            ranks = f" (its global ranks: {dist.get_process_group_ranks(group)})"
        except Exception:  # (a torch without it, or a group it cannot describe: the message goes without)
            ranks = ""
        raise ValueError(f"this process (global rank {dist.get_rank()}) is not a member of the process group"
                         f"{ranks}; wrap a sub-group in a TensorParallel on its member ranks only "
                         "(torch.distributed.get_rank(group) >= 0)")


class TensorParallel:
    """This rank's place in a tensor-parallel group: the process group, its size and rank, the device.

    Built by :func:`init_tensor_parallel` (which creates the process group) or :meth:`from_group` (an existing
    one).  Tensor-parallel models keep it as ``model.tensor_parallel``; :class:`flash_llm.engine.Engine` reads
    it there.  Use it as a context manager, or call :meth:`close`, to destroy a process group it created.

    Attributes:
        group: the ``torch.distributed`` process group (``None`` = the default group).
        rank, world_size: this process' rank in ``group`` and the group's size (the tensor-parallel degree).
        device: where this rank computes (``cuda:LOCAL_RANK`` with NCCL, ``cpu`` with gloo).
        backend: ``"nccl"`` or ``"gloo"``.
        timeout: the group's timeout (``datetime.timedelta``): the one it was created with, as torch reports it
            for :attr:`device`'s backend (an existing group's too: :meth:`from_group`, or
            :func:`init_tensor_parallel` when a group exists); :data:`DEFAULT_TIMEOUT` where torch does not
            expose it.
    """

    def __init__(self, group, device, timeout: datetime.timedelta | None = None, *, owns_group: bool = False):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialized; call flash_llm.parallel.init_tensor_parallel() "
                               "(or torch.distributed.init_process_group) first")
        _check_member(group)
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.device = torch.device(device)
        self.backend = _backend_for(group, self.device)
        self.timeout = _group_timeout(group, self.device) if timeout is None else timeout
        self._src = dist.get_global_rank(group, 0) if group is not None else 0
        self._owns_group = owns_group
        self._graphs = weakref.WeakSet()  # CUDA graphs that captured this group's collectives (track_graph)
        if self.backend == "nccl" and self.device.type != "cuda":
            raise ValueError(f"the process group uses NCCL but device is {self.device}; NCCL needs CUDA tensors")

    @classmethod
    def from_group(cls, group=None, device=None) -> "TensorParallel":
        """Wrap an already initialized process group (default: the default group).  ``device`` defaults to
        ``cuda:<current device>`` for NCCL and ``cpu`` otherwise.  Call it on the group's member ranks only: on
        another rank it raises ``ValueError`` naming that rank and the group's ranks.  :attr:`timeout` is the
        group's own (read from torch; :data:`DEFAULT_TIMEOUT` where torch does not expose it)."""
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialized; call flash_llm.parallel.init_tensor_parallel() "
                               "or torch.distributed.init_process_group first")
        _check_member(group)  # (before the NCCL probe, which torch refuses in words that name nothing)
        nccl = torch.cuda.is_available() and _backend_for(group, torch.device("cuda")) == "nccl"
        if nccl:
            nccl_env_defaults()  # communicators are created lazily, at the first collective
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        return cls(group, device)

    def __repr__(self) -> str:
        return (f"TensorParallel(rank={self.rank}, world_size={self.world_size}, backend={self.backend!r}, "
                f"device={str(self.device)!r})")

    def __deepcopy__(self, memo):  # a handle on a process group: copies of a model share it
        return self

    # ---- collectives -----------------------------------------------------------------------------------
    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` (any shape, on :attr:`device`) over the group, in place; returns ``t``."""
        dist.all_reduce(t, group=self.group)
        return t

    def broadcast_(self, t: torch.Tensor) -> torch.Tensor:
        """Overwrite ``t`` with rank 0's ``t``, in place; returns ``t``."""
        dist.broadcast(t, src=self._src, group=self.group)
        return t

    def check_same(self, what: str, values) -> None:
        """Raise ``ValueError`` on every rank unless every rank passed the same ints ``values``.

        A collective (two small all-reduces and host synchronizations): every rank must call it.  The ranks agree
        on the number of values first, so lists of different lengths raise the ``ValueError`` too (naming the
        lengths), and so does a value that is not an integer in int64's range on some rank (naming that rank),
        on every rank, instead of a collective of mismatched sizes (which aborts a gloo rank) or one rank failing
        alone while the others wait in the all-reduce.
        """
        try:
            mine = [int(x) for x in values]
            v = torch.tensor(mine, dtype=torch.int64, device=self.device)
            bad = None
        except Exception as e:  # (agreed on below: raised here, the other ranks would wait in the all-reduce)
            mine, v, bad = None, None, e
        n = -1 if bad is not None else v.numel()
        # [max length, -min length, -first rank whose values did not convert] in one all-reduce
        head = torch.tensor([n, -n, -(self.rank if bad is not None else self.world_size)], dtype=torch.int64,
                            device=self.device)
        dist.all_reduce(head, op=dist.ReduceOp.MAX, group=self.group)
        longest, shortest, failed = (s * v for s, v in zip((1, -1, -1), head.tolist()))  # (one sync)
        if failed < self.world_size:
            if bad is not None:
                raise ValueError(f"{what}: this tensor-parallel rank ({self.rank} of {self.world_size}) cannot "
                                 f"compare its values as int64 integers ({type(bad).__name__}: {bad}); every rank "
                                 "raises") from bad
            raise ValueError(f"{what}: tensor-parallel rank {failed} of {self.world_size} passed values that are "
                             f"not int64 integers, so the ranks cannot compare them (this is rank {self.rank}: "
                             f"{mine}); every rank must make the same call with the same inputs")
        if longest != shortest:
            raise ValueError(f"{what} differ between the {self.world_size} tensor-parallel ranks (this is rank "
                             f"{self.rank}, with {n} value(s); the ranks pass {shortest} to {longest} values); "
                             "every rank must make the same call with the same inputs")
        both = torch.cat([v, -v])
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.group)
        hi, lo = both[:v.numel()], -both[v.numel():]
        if not torch.equal(hi, lo):
            raise ValueError(f"{what} differ between the {self.world_size} tensor-parallel ranks (this is rank "
                             f"{self.rank}: {mine}; the ranks' minimum {lo.tolist()}, maximum {hi.tolist()}); every "
                             "rank must make the same call with the same inputs")

    def all_true(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every rank (a collective: one small all-reduce and a host synchronization), so
        that the ranks take the same branch where each decides from its own state (e.g. its free memory)."""
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return bool(t.item())

    def raise_if_any(self, error: BaseException | None, what: str = "") -> None:
        """Raise on every rank if any rank passes an ``error`` (a collective: every rank must call it, with
        ``None`` where its step succeeded), so that a step that fails on some ranks only (their own slices of a
        checkpoint) fails on all of them, instead of leaving the others to wait in their next collective until
        the timeout.  A rank raises its own ``error``; the others raise the lowest failing rank's (the same type
        and message, unpickled; a ``RuntimeError`` quoting it where it does not pickle), with a note naming that
        rank and ``what`` failed.  One small all-reduce where no rank failed; an all-gather of the errors else."""
        try:
            ok = self.all_true(error is None)
        except Exception:
            if error is not None:  # (another rank is gone: this rank's own error says more than the collective's)
                raise error from None
            raise
        if ok:
            return
        errors = self.all_gather_object(None if error is None else _portable(error))
        if error is not None:
            raise error
        rank, payload = next((r, e) for r, e in enumerate(errors) if e is not None)
        theirs = pickle.loads(payload)
        if hasattr(theirs, "add_note"):  # (Python 3.11+)
            theirs.add_note(f"(raised on tensor-parallel rank {rank} of {self.world_size}"
                            f"{' ' + what if what else ''}; rank {self.rank} stopped with it)")
        raise theirs

    def all_gather_object(self, obj) -> list:
        """``obj`` of every rank, in rank order (pickled; for reports, not for tensors on a hot path)."""
        out = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def track_graph(self, graph) -> None:
        """Register a CUDA graph that captured collectives of this group (the engine does this): :meth:`close`
        resets it before destroying the group, since destroying a NCCL communicator that a live graph still
        holds work on can wait forever."""
        self._graphs.add(graph)

    def barrier(self) -> None:
        dist.barrier(group=self.group)

    # ---- lifetime --------------------------------------------------------------------------------------
    def close(self, *, barrier: bool = True) -> None:
        """Destroy the process group if :func:`init_tensor_parallel` created it (otherwise nothing).

        A CUDA graph that captured NCCL all-reduces holds work on the communicator, and destroying a communicator
        that a live graph uses waited forever on 2 H200s (2026-11-29).  So pending work is finished here, and every
        graph registered with :meth:`track_graph` (the engines' decode graphs) is reset first: an engine of this
        group cannot decode after ``close``.
        ``barrier=False`` (used when leaving a ``with`` block on an exception) skips the final barrier, so a rank
        that failed does not wait for the others.
        """
        if self._owns_group and dist.is_initialized():
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            for graph in list(self._graphs):
                graph.reset()
            self._graphs.clear()
            gc.collect()  # other graphs (kept alive only by reference cycles) released too
            if barrier:
                dist.barrier(group=self.group)  # no rank tears down while another still communicates
            dist.destroy_process_group()
        self._owns_group = False

    def __enter__(self) -> "TensorParallel":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(barrier=exc_type is None)


def _portable(error: BaseException) -> bytes:
    """``error`` pickled, for another rank to raise: the exception itself where it pickles and unpickles, else a
    ``RuntimeError`` quoting its type and message (a pickling error here would leave the other ranks waiting)."""
    try:
        data = pickle.dumps(error)
        pickle.loads(data)
        return data
    except Exception:
        return pickle.dumps(RuntimeError(f"{type(error).__name__}: {error}"))


def init_tensor_parallel(backend: str | None = None, *, timeout=DEFAULT_TIMEOUT, rank: int | None = None,
                         world_size: int | None = None, master_addr: str | None = None,
                         master_port: int | None = None) -> TensorParallel:
    """Join (or create) the process group of a tensor-parallel run and return this rank's :class:`TensorParallel`.

    Under ``torchrun --nproc-per-node K`` everything comes from its environment (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``).  Without torchrun and without arguments it forms a
    single-process group (world size 1), so the same script runs as plain ``python``.  If a process group
    already exists it is used as it is (``backend``, ``timeout`` and the rest are then ignored: the returned
    :attr:`TensorParallel.timeout` is that group's, as :meth:`TensorParallel.from_group` reads it).

    Args:
        backend: ``"nccl"`` (default when CUDA is available: device ``cuda:LOCAL_RANK``) or ``"gloo"`` (default
            otherwise: device ``cpu``).  Before NCCL initializes, ``NCCL_NVLS_ENABLE=0`` and
            ``TORCH_SYMM_MEM_DISABLE_MULTICAST=1`` are set where unset or blank (:data:`NCCL_ENV_DEFAULTS`).
        timeout: seconds (a real number) or a ``timedelta`` (default 10 minutes, at most :data:`MAX_TIMEOUT`, a
            year) for the rendezvous and for every collective: a rank that never starts, or stops answering,
            makes the others raise instead of waiting forever.
        rank, world_size, master_addr, master_port: instead of the environment variables (tests, notebooks).

    Raises:
        RuntimeError: the group did not form within ``timeout`` (a rank failed to start, or the ranks were
            given different addresses); the message names the rank, the world size and the address.
        ValueError: inconsistent rank / world size / ``LOCAL_RANK`` beyond the visible GPUs; a ``timeout`` that is
            not a positive number of seconds or timedelta of at most :data:`MAX_TIMEOUT` (NaN and inf too).
    """
    timeout = _as_timeout(timeout)
    if dist.is_available() and dist.is_initialized():
        return TensorParallel.from_group(None)
    if not dist.is_available():
        raise RuntimeError("this PyTorch build has no torch.distributed")
    rank = _env_int("RANK") if rank is None else rank
    world_size = _env_int("WORLD_SIZE") if world_size is None else world_size
    if world_size is None:
        if rank not in (None, 0):
            raise ValueError(f"rank={rank} needs a world size (WORLD_SIZE or world_size=)")
        world_size, rank = 1, 0
    if rank is None:
        raise ValueError(f"world size {world_size} needs this process' rank (RANK or rank=)")
    for name, v in (("rank", rank), ("world_size", world_size)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{name} must be an int, got {v!r}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size); got rank={rank}, world_size={world_size}")
    local_rank = _env_int("LOCAL_RANK")
    local_rank = rank if local_rank is None else local_rank

    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not isinstance(backend, str) or backend.lower() not in ("nccl", "gloo"):
        raise ValueError(f"backend must be 'nccl' or 'gloo', got {backend!r}")
    backend = backend.lower()
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise ValueError("backend 'nccl' needs CUDA, and no CUDA device is available; use backend='gloo'")
        n = torch.cuda.device_count()
        if not 0 <= local_rank < n:
            raise ValueError(f"LOCAL_RANK={local_rank} but only {n} CUDA device(s) are visible; start at most {n} "
                             "processes per node (torchrun --nproc-per-node)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        nccl_env_defaults()
    else:
        device = torch.device("cpu")

    addr = master_addr or os.environ.get("MASTER_ADDR")
    port = master_port if master_port is not None else _env_int("MASTER_PORT")
    kwargs = {"backend": backend, "rank": rank, "world_size": world_size, "timeout": timeout}
    if world_size == 1 and (addr is None or port is None):
        kwargs["store"] = dist.HashStore()  # one process: no rendezvous needed
        where = "an in-process store"
    elif addr is None or port is None:
        raise ValueError(f"world size {world_size} needs a rendezvous address: MASTER_ADDR and MASTER_PORT (set by "
                         "torchrun), or master_addr= and master_port=")
    else:
        kwargs["init_method"] = f"tcp://{addr}:{port}" if (master_addr or master_port is not None) else "env://"
        where = f"{addr}:{port}"
    try:
        dist.init_process_group(**kwargs)
    except dist.DistError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RuntimeError(f"rank {rank} of {world_size}: the process group did not form within "
                           f"{timeout.total_seconds():g} s at {where} ({backend}): a rank failed to start or "
                           f"cannot reach the address, or the ranks disagree on it. torch.distributed said: {first}"
                           ) from e
    return TensorParallel(None, device, timeout, owns_group=True)


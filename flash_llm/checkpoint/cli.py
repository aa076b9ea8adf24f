"""Command-line workflows around checkpoints: ``flash-llm convert``, ``flash-llm generate``, ``flash-llm bench``,
and what ``flash-llm inspect`` shows for a checkpoint directory (:func:`inspect_directory`)."""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from ..formats import FormatError, SparseFormat
from ..formats._base import count_nonzero
from ..cli import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, _err, _int, _non_negative_float, _positive, _probability, _table
from ..cli import fraction_or_percent, model_path
from ..cli import _device_arg as _device  # the demos' --device check (auto, cpu, cuda, cuda:N) as an argparse type
from . import _files
from . import sparse_bitmask as sb
from .pretrained import checkpoint_kind, convert, from_pretrained, iter_checkpoint, sparsify_for_dtype

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
BENCHMARKS = {"kernel": "bench_spmm.py", "e2e": "bench_e2e.py", "checkpoint": "bench_checkpoint.py"}
_INPUT_ERRORS = (FormatError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError, ValueError,
                 TypeError, ImportError)


def _fraction(text: str) -> float:
    """``--min-sparsity``: ``0.5``, ``50`` or ``50%`` -> 0.5, read as ``--sparsity`` is
    (:func:`flash_llm.cli.fraction_or_percent`), 1 (100 %) included here."""
    try:
        v = fraction_or_percent(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction like 0.5 or a percentage like 50 or 50%, got "
                                         f"{text!r}") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"sparsity must be between 0 and 1 (0 % and 100 %), got {text!r}")
    return v


def _shard_size(text: str) -> int:
    """``--max-shard-size``: bytes, or a size like ``5GB`` / ``500MB`` / ``64KiB`` (:func:`flash_llm.checkpoint.
    _files.parse_size`), checked while the arguments are parsed (the Python API's message names its
    ``max_shard_size`` argument; this one is the flag's, and comes before the model is loaded)."""
    try:
        return _files.parse_size(text)
    except ValueError as e:
        if "lowercase 'b'" in str(e):  # ("500Mb": megabits to transformers; its message says what to write)
            raise argparse.ArgumentTypeError(str(e).replace("max_shard_size ", "", 1)) from None
        raise argparse.ArgumentTypeError(f"expected a byte count >= 1 or a size like 5GB, 500MB or 64KiB, got "
                                         f"{text!r}") from None


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def _prompt(text: str) -> str:
    """``generate --prompt``: text that is UTF-8 (a command-line argument that is not arrives with its bytes as lone
    surrogates, ``surrogateescape``), checked while the arguments are parsed."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code, at = ord(text[e.start]), len(text[:e.start].encode("utf-8"))  # (all valid before the first error)
        what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"a lone surrogate U+{code:04X}"
        raise argparse.ArgumentTypeError(f"not valid UTF-8 text ({what} at byte {at}); give the prompt as UTF-8") \
            from None
    return text


# ---- convert ---------------------------------------------------------------------------------------------

def cmd_convert(args) -> int:
    from ..demo import _unreplaceable_out  # (prune --out's check)

    t0 = time.perf_counter()
    out = Path(args.output)
    try:  # (first: Path.exists raises for a name longer than the file system allows)
        _files.check_name_lengths(out, "OUT")
    except ValueError as e:
        _err(str(e))
        return EXIT_USAGE
    why = _unreplaceable_out(out)  # the current directory (or a parent, a mount point): refused before any work
    if why is not None:
        _err(why.replace(f"--out {out}", f"OUT {out}", 1))
        return EXIT_USAGE
    try:
        report = convert(args.input, args.output, format=args.format, min_sparsity=args.min_sparsity,
                         dtype=DTYPES.get(args.dtype), device=args.device, max_shard_size=args.max_shard_size,
                         overwrite=args.overwrite, backend=args.backend)
    except FileExistsError as e:  # (the library's text names overwrite=True as well; here only the flag counts)
        exists = not args.overwrite and os.path.lexists(args.output)
        _err(f"{args.output} already exists; pass --overwrite to replace it" if exists else str(e))
        return EXIT_USAGE
    except _INPUT_ERRORS as e:
        _err(str(e))
        return EXIT_USAGE
    except OSError as e:  # e.g. the disk filled up while writing: OUT is left as it was (written atomically)
        _err(f"writing OUT {args.output}: {e}")
        return EXIT_FAILURE
    elapsed = time.perf_counter() - t0
    print(report)
    src, dst = Path(args.input), Path(args.output)
    what = "compressed-tensors sparse-bitmask" if args.format == sb.FORMAT else f"flash-llm ({args.format})"
    print(f"wrote {dst} ({what} checkpoint): {_int(_dir_bytes(dst))} bytes on disk, input "
          f"{_int(_dir_bytes(src))} bytes; {elapsed:.1f} s")
    return EXIT_OK


# ---- inspect (directories) ------------------------------------------------------------------------------

def _count_nonzero(t: torch.Tensor) -> int:
    """Nonzero elements of a tensor of any dtype (``-0.0`` counts as zero; :func:`flash_llm.formats._base.
    count_nonzero` where torch has a kernel): ``torch.count_nonzero`` has none for some (float8, uint16/32/64), so
    those count as float32, or by their bytes for unsigned integers."""
    try:
        return count_nonzero(t)
    except (RuntimeError, NotImplementedError):
        pass
    if t.is_floating_point():
        return int(torch.count_nonzero(t.to(torch.float32)))
    if t.is_complex():
        return int(torch.count_nonzero(t.to(torch.complex64)))
    raw = t.contiguous().reshape(-1).view(torch.uint8).reshape(-1, t.element_size())
    return int((raw != 0).any(dim=1).sum())


def inspect_directory(path) -> int:
    """Print per weight of checkpoint directory ``path`` its name, format, shape, dtype, nonzeros, density and
    bytes, with totals (every sparse layer is validated); return the exit status."""
    try:
        files = _files.open_checkpoint(path)
        kind = checkpoint_kind(files.config, files.path / _files.CONFIG_NAME)
        rows, totals = [], {"elems": 0, "nnz": 0, "bytes": 0, "dense": 0}
        for e in iter_checkpoint(files, kind):
            if e.kind == "flash-llm":
                w: SparseFormat = e.value
                shape, dtype, nnz, nbytes, fmt = w.shape, w.dtype, w.nnz, w.nbytes, type(w).__name__
            elif e.kind == "sparse-bitmask":
                parts = {p: e.value[p] for p in sb.PARTS}
                dense = sb.decompress(parts, e.value["_name"], str(e.path))  # validates
                shape, dtype, nnz, fmt = tuple(dense.shape), dense.dtype, int(parts["compressed"].numel()), sb.FORMAT
                nbytes = sum(t.numel() * t.element_size() for t in parts.values())
            else:
                t = e.value
                shape, dtype, fmt = tuple(t.shape), t.dtype, "dense"
                nnz, nbytes = _count_nonzero(t), t.numel() * t.element_size()
            elems = 1
            for s in shape:
                elems *= s
            totals["elems"] += elems
            totals["nnz"] += nnz
            totals["bytes"] += nbytes
            totals["dense"] += elems * torch.empty((), dtype=dtype).element_size()
            rows.append([e.key, fmt, "x".join(map(str, shape)) or "scalar", str(dtype).removeprefix("torch."),
                         _int(nnz), f"{nnz / elems:.4f}" if elems else "-", _int(nbytes)])
    except (FormatError, OSError, ValueError) as e:  # (every problem of the input: an unreadable file too)
        _err(str(e))
        return EXIT_USAGE
    model = files.config.get("model_type", "?")
    print(f"{files.path}: {kind.kind} checkpoint ({model}), {len(files.shards)} shard(s), {len(rows)} weights, "
          f"{_int(files.nbytes)} bytes on disk")
    sparse_rows = [r for r in rows if r[1] != "dense"]
    elems = totals["elems"]
    rows.append(["total", f"{len(sparse_rows)} sparse", "", "", _int(totals["nnz"]),
                 f"{totals['nnz'] / elems:.4f}" if elems else "-", _int(totals["bytes"])])
    print("\n".join(_table(["name", "format", "shape", "dtype", "nnz", "density", "bytes"], rows, "lllllrr")))
    print(f"dense equivalent: {_int(totals['dense'])} bytes; this checkpoint's tensors take "
          f"{totals['bytes'] / totals['dense']:.3f}x of that" if totals["dense"] else "")
    return EXIT_OK


# ---- generate ---------------------------------------------------------------------------------------------

class _Bytes:
    """The byte tokenizer: token id = byte value (vocabulary 256), text as UTF-8.  A byte-level model may have
    special tokens above the bytes (an EOS of 256): ids outside 0..255 are no bytes and decode to nothing, as a
    Hugging Face tokenizer's ``decode(..., skip_special_tokens=True)`` skips its special tokens (generation still
    stops at the model's EOS, whatever its id)."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class _HFTokenizer:
    """A Hugging Face tokenizer directory (``transformers.AutoTokenizer``, local files only: never the hub)."""

    def __init__(self, path: Path, option: str = ""):
        where = f"{option} {path}" if option else str(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{where}: no such directory (a Hugging Face tokenizer directory)")
        from ..demo import load_hf_tokenizer, require_tokenizer_files

        require_tokenizer_files(path, where)
        self.tok = load_hf_tokenizer(path, where)  # (ValueError naming `where` for any failure, an empty vocabulary)

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


def _tokenizer(choice: str, path: Path, config: dict):
    from ..bundled import TOKENIZER_FILES, is_byte_level  # (one rule and one list: as demo --model and prune)

    if choice == "bytes":
        return _Bytes()
    if choice != "auto":
        return _HFTokenizer(Path(choice), "--tokenizer")
    if is_byte_level(config, path):  # (not where the directory holds tokenizer files: they win)
        return _Bytes()
    if any((path / f).is_file() for f in TOKENIZER_FILES):
        return _HFTokenizer(path)
    raise ValueError(f"{path} has no tokenizer files ({', '.join(TOKENIZER_FILES)}) and does not declare the byte "
                     "tokenizer; pass --tokenizer DIR (a Hugging Face tokenizer) or --tokenizer bytes")


def _load_tensor_parallel(path: Path, dtype, device: torch.device):
    """This rank's part of the checkpoint (``generate --tp``): dense layers compressed as from_pretrained does, a
    flash-llm checkpoint's layers loaded as saved or, in another ``dtype``, re-encoded (as without ``--tp``).
    ``device`` (``--device``) picks the group's backend: ``cpu`` gloo ranks on the CPU, ``cuda`` NCCL on
    ``cuda:LOCAL_RANK`` (``cuda:N`` is refused: each rank takes its own)."""
    if device.index is not None:
        raise ValueError(f"--device {device} with --tp: each rank runs on cuda:LOCAL_RANK; give --device cuda "
                         "(or cpu, or auto)")
    from ..nn import SparsifyConfig
    from ..parallel import init_tensor_parallel, load_tensor_parallel
    from .pretrained import _resolve_dtype

    config = _files.read_json(path / _files.CONFIG_NAME, "config.json")
    kind = checkpoint_kind(config, path / _files.CONFIG_NAME)
    resolved = sparsify_for_dtype(path, dtype)  # (None unless a flash-llm checkpoint's layers hold another dtype)
    dtype = _resolve_dtype(config, kind, dtype, path / _files.CONFIG_NAME, resolved)
    tp = init_tensor_parallel(backend="gloo" if device.type == "cpu" else None)
    try:
        sparsify = SparsifyConfig() if kind.kind == "dense" else resolved
        model, _ = load_tensor_parallel(path, tp, dtype=dtype, sparsify=sparsify, progress=tp.rank == 0)
    except BaseException:
        tp.close(barrier=False)
        raise
    return model, tp


def _layer_count(model, paths: list[str]) -> int:
    """How many of the checkpoint's layers the engine's layers ``paths`` of ``model`` are: a merged projection's
    stacked layer (``....qkv_proj.layer``, ``....gate_up_proj.layer``: :func:`flash_llm.models.merge_projections`)
    counts as the layers it stacks, any other as one."""
    from ..models._merge import MergedLinear

    n = 0
    for path in paths:
        parent = path.rpartition(".")[0]
        try:
            owner = model.get_submodule(parent) if parent else None
        except AttributeError:
            owner = None
        n += len(owner.names) if isinstance(owner, MergedLinear) else 1
    return n


def _after_merging(model, paths: list[str]) -> str:
    """``"; M after merging the projections that share an input"`` where the engine's ``M`` layers ``paths`` stack
    more of the checkpoint's (:func:`_layer_count`; ``--merge``: q/k/v, Llama's gate/up), else ``""``."""
    if _layer_count(model, paths) == len(paths):
        return ""
    return f"; {len(paths)} after merging the projections that share an input"


def cmd_generate(args) -> int:
    from ..engine import Engine

    sampling = (("--top-k", args.top_k), ("--top-p", args.top_p), ("--seed", args.seed))
    if args.temperature == 0 and any(v is not None for _, v in sampling):
        given = " and ".join(o for o, v in sampling if v is not None)
        _err(f"{given} appl{'y' if ' and ' in given else 'ies'} to sampling: give --temperature > 0 too (the "
             "default 0 is greedy decoding)")
        return EXIT_USAGE
    path = Path(args.path)
    tp = None
    try:
        if args.tp:
            model, tp = _load_tensor_parallel(path, DTYPES.get(args.dtype), args.device)
            args.device = tp.device
        else:
            dtype = DTYPES.get(args.dtype)  # (a flash-llm checkpoint of another dtype: its layers are re-encoded)
            model = from_pretrained(path, device=args.device, dtype=dtype, backend="flash",
                                    sparsify=sparsify_for_dtype(path, dtype))
        tok = _tokenizer(args.tokenizer, path, _files.read_json(path / _files.CONFIG_NAME, "config.json"))
        ids = tok.encode(args.prompt)
        if not ids:
            raise ValueError("the prompt encodes to no tokens; give a non-empty --prompt")
        bad = [i for i in ids if not 0 <= i < model.config.vocab_size]
        if bad:
            raise ValueError(f"the prompt has token id {bad[0]} outside the model's vocabulary "
                             f"({model.config.vocab_size}); wrong --tokenizer?")
        context = model.config.max_position_embeddings  # (the cache holds the prompt and all new tokens but the last)
        if len(ids) + args.max_new_tokens - 1 > context:
            raise ValueError(f"--prompt ({len(ids)} tokens) + --max-new-tokens ({args.max_new_tokens}) exceed the "
                             f"model's context of {context} tokens: at most {max(context - len(ids) + 1, 0)} new "
                             "tokens after this prompt")
        # (on a CPU the compressed layers run expanded: flash_llm.spmm's CPU reference would expand every weight for
        # every token; where the memory does not hold them dense the engine warns and keeps them)
        on_cpu = model.input_embeddings().weight.device.type == "cpu"
        engine = Engine(model, max_batch=1, max_seq=min(len(ids) + args.max_new_tokens, context), fuse=args.fuse,
                        merge=args.merge, formats="dense" if on_cpu else "auto")
        if tp is None or tp.rank == 0:
            # (counted as the checkpoint's layers, as `flash-llm inspect` counts them, not as the engine's merged
            # q/k/v and gate/up matmuls, which hold two or three of them each)
            if engine.expanded:
                print(f"(on the CPU: {_layer_count(model, engine.expanded)} compressed layer(s) expanded to dense for "
                      f"decoding{_after_merging(model, engine.expanded)})", file=sys.stderr)
            if engine.adopted:  # (Engine(formats="auto") on a GPU: BitmapTiles / Tiled-CSL laid out for batch 1)
                by_kind = Counter()
                for p, k in engine.adopted.items():
                    by_kind[k] += _layer_count(model, [p])
                kinds = ", ".join(f"{n} {k}" for k, n in sorted(by_kind.items()))
                print(f"(laid out for decoding: {kinds} layer(s) as DeltaRows, the fastest format at batch 1"
                      f"{_after_merging(model, list(engine.adopted))})", file=sys.stderr)
    except _INPUT_ERRORS as e:
        _err(str(e))
        if tp is not None:
            tp.close(barrier=False)
        return EXIT_USAGE
    out = _Output(show=tp is None or tp.rank == 0)
    finished = False
    try:
        rc = _stream(args, engine, tok, ids, out)
        finished = True
        return rc
    except ValueError as e:  # (what the sampler refuses; the arguments are checked above)
        out.write("\n")  # (ends the line of text printed so far)
        _err(str(e))
        return EXIT_USAGE
    finally:
        if tp is not None:
            del engine
            # the ranks meet at the barrier only after a complete run: a rank that an exception takes out of the
            # generation alone must not wait there for ranks still in its all-reduces (they fail at once instead)
            tp.close(barrier=finished)


class _Output:
    """Where ``generate`` prints the text: stdout on rank 0 (or without ``--tp``), nothing on the other ranks.
    Once the reader has closed stdout (``| head``), the rest is discarded: :attr:`closed` is set and stdout is
    pointed at ``os.devnull`` (so Python's final flush does not fail again), as Python's documentation advises.  A
    process started with stdout closed (``>&-``: ``sys.stdout`` is None) counts as closed from the start."""

    def __init__(self, show: bool):
        self.show = show
        self.closed = False

    def write(self, text: str) -> None:
        if not self.show or self.closed:
            return
        if sys.stdout is None:  # (started with stdout closed, `>&-`: as a reader that has gone)
            self.closed = True
            return
        try:
            sys.stdout.write(text)
            sys.stdout.flush()
        except BrokenPipeError:
            from ..cli import discard_stdout

            self.closed = True
            discard_stdout()


def _stream(args, engine, tok, ids, out: _Output) -> int:
    """Generate and print as tokens come.  In a tensor-parallel run every rank generates and rank 0 prints.

    When stdout's reader goes away (``BrokenPipeError``), the rest of the text is discarded and the exit status is
    1, without a traceback.  One process stops generating; in a tensor-parallel run rank 0 keeps generating to the
    end (every step is a collective the other ranks wait in), so all ranks finish and close the group normally."""
    from ..demo import continuation

    generator = None
    if args.seed is not None:
        generator = torch.Generator(device=args.device).manual_seed(args.seed)
    out.write(args.prompt)
    new: list[int] = []
    shown = ""
    stop = {"eos_token_id": None} if args.ignore_eos else {}
    for step in engine.stream([ids], args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, generator=generator, **stop):
        new.append(int(step[0]))
        text = continuation(tok.decode, ids, new, partial=True)
        out.write(text[len(shown):])
        shown = text
        if out.closed and engine.tp is None:
            break  # (one process: nobody needs the rest)
    final = continuation(tok.decode, ids, new)
    out.write(final[len(shown):] + "\n")
    if out.closed:
        return EXIT_FAILURE
    g = engine.last
    where = str(args.device) if engine.tp is None else f"{engine.tp.world_size} tensor-parallel ranks"
    if out.show:
        rate = (f"{g.decode_tokens_per_s:.1f} tokens/s after it" if math.isfinite(g.decode_tokens_per_s)
                else "no decode steps after it")
        print(f"{len(new)} new token{'' if len(new) == 1 else 's'}; time to first token {g.ttft_s * 1e3:.1f} ms, "
              f"{rate} ({str(engine.dtype).removeprefix('torch.')} on {where})", file=sys.stderr)
    return EXIT_OK


# ---- bench ------------------------------------------------------------------------------------------------

def benchmarks_dir() -> Path:
    """``benchmarks/`` of the source checkout this flash-llm runs from."""
    return Path(__file__).resolve().parents[2] / "benchmarks"


def cmd_bench(args) -> int:
    script = benchmarks_dir() / BENCHMARKS[args.which]
    if not script.is_file():
        _err(f"{script} not found: `flash-llm bench` runs the scripts of a flash-llm source checkout "
             "(pip install -e .)")
        return EXIT_USAGE
    spec = importlib.util.spec_from_file_location(f"_flash_llm_bench_{args.which}", script)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(script.parent))
    # the script's ArgumentParser takes its prog from sys.argv[0] ("flash-llm", or "cli.py" under python -m): its
    # usage lines and errors name the command typed instead
    saved_argv = sys.argv
    sys.argv = [f"flash-llm bench {args.which}", *saved_argv[1:]]
    try:
        spec.loader.exec_module(module)
        rc = module.main(list(args.args))
    except SystemExit as e:  # argparse --help / usage errors inside the script
        rc = e.code if isinstance(e.code, int) else EXIT_USAGE
    finally:
        sys.argv = saved_argv
        if sys.path and sys.path[0] == str(script.parent):
            sys.path.pop(0)
    return rc if isinstance(rc, int) else EXIT_OK


# ---- parsers ----------------------------------------------------------------------------------------------

def register_cli(sub) -> None:
    """Add ``convert``, ``generate`` and ``bench`` to the ``flash-llm`` subcommands."""
    from ..demo import _seed  # (prune's and demo's --seed: one range, one message)

    p = sub.add_parser(
        "convert", help="convert a pruned checkpoint directory into a compact flash-llm (or sparse-bitmask) one",
        description="Read a Hugging Face checkpoint directory (config.json + safetensors): dense (a pruned model "
                    "saved by transformers), compressed-tensors sparse-bitmask, or flash-llm. Every linear layer "
                    "with at least --min-sparsity zeros is compressed (lm_head and tied weights stay dense), shard "
                    "by shard, and the result is written to OUT as a flash-llm checkpoint that flash_llm."
                    "from_pretrained and transformers (after `import flash_llm`) load. OUT is written under a "
                    "temporary name and renamed when complete; an existing OUT is kept unless --overwrite. Exits "
                    "2 for a missing, inconsistent or unsupported input (naming the file and tensor), or an OUT "
                    "that is or holds IN or cannot be created (checked before the model is loaded); 1 if writing "
                    "fails.")
    p.add_argument("input", metavar="IN", type=model_path,
                   help="checkpoint directory to read, or a bundled model's name (tiny-shakespeare)")
    p.add_argument("output", metavar="OUT", help="directory to write")
    p.add_argument("--format", choices=["bitmap", "tiled-csl", "delta-rows", sb.FORMAT], default="bitmap",
                   help="bitmap (BitmapTiles, default), tiled-csl (TiledCSL) or delta-rows (DeltaRows): a flash-llm "
                        "checkpoint; sparse-bitmask: a compressed-tensors checkpoint")
    p.add_argument("--min-sparsity", type=_fraction, default=None, metavar="S",
                   help="compress layers with at least this fraction of zeros, e.g. 0.5, 50 or 50%% (default: 0.3; "
                        "--format sparse-bitmask honours it too: layers with fewer zeros are stored dense and named "
                        "in its ignore list; without it, that format compresses every linear layer but lm_head)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="value dtype (default: config.json's; required for a "
                                                            "float32 checkpoint)")
    p.add_argument("--device", type=_device, default="cpu",
                   help="where to compress: cpu (default), cuda, cuda:N or auto")
    p.add_argument("--max-shard-size", type=_shard_size, default="5GB",
                   help="largest output shard, e.g. 5GB or 500MB (default 5GB)")
    p.add_argument("--backend", choices=["auto", "flash", "hf"], default="auto",
                   help="model skeleton used to find the linear layers: flash_llm.models (OPT, Llama), "
                        "transformers, or auto (default)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser(
        "generate", help="generate text with a checkpoint (compressed layers, KV cache)",
        description="Load a checkpoint directory (any kind convert reads; dense ones are compressed on load) into "
                    "flash_llm.models and generate from --prompt with flash_llm.engine.Engine, printing tokens as "
                    "they come. Tokenizer: the directory's Hugging Face tokenizer files, or the byte tokenizer "
                    "(token id = byte; ids above 255, special tokens, print nothing) for a byte-level model such as "
                    "the bundled one.")
    p.add_argument("path", metavar="PATH", type=model_path,
                   help="checkpoint directory, or a bundled model's name (tiny-shakespeare)")
    p.add_argument("--prompt", type=_prompt, required=True, help="text to continue (UTF-8)")
    p.add_argument("--max-new-tokens", type=_positive, default=64, help="tokens to generate (default 64)")
    p.add_argument("--temperature", type=_non_negative_float, default=0.0, help="0 (default) is greedy")
    p.add_argument("--top-k", type=_positive, default=None,
                   help="sample from the K most likely tokens only (needs --temperature > 0)")
    p.add_argument("--top-p", type=_probability, default=None,
                   help="sample from the most likely tokens that reach this probability only, in (0, 1] (needs "
                        "--temperature > 0)")
    p.add_argument("--seed", type=_seed, default=None, help="seed of the sampler (needs --temperature > 0)")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token")
    p.add_argument("--device", type=_device, default="auto", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="model dtype (default: the checkpoint's)")
    p.add_argument("--tokenizer", default="auto", help="auto (default), bytes, or a tokenizer directory")
    p.add_argument("--tp", action="store_true",
                   help="tensor parallel over torchrun's ranks (torchrun --nproc-per-node K -m flash_llm.cli generate "
                        "... --tp): each rank loads only its slices (NCCL on cuda:LOCAL_RANK; gloo on the CPU with "
                        "--device cpu or without CUDA); rank 0 prints")
    p.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=None,
                   help="fused elementwise kernels (Engine(fuse=True): torch.compile'd RMSNorm, RoPE, SiLU x up; "
                        "default: on for CUDA models of 1 B parameters or more)")
    p.add_argument("--merge", action=argparse.BooleanOptionalAction, default=True,
                   help="q/k/v and gate/up as one matmul each (Engine(merge=True); default: on)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "bench", help="run a benchmark: kernel (spmm vs cuBLAS), e2e (generation), checkpoint (load/convert)",
        description="Run benchmarks/bench_spmm.py (kernel), benchmarks/bench_e2e.py (e2e) or "
                    "benchmarks/bench_checkpoint.py (checkpoint) of this source checkout with the remaining "
                    "arguments (e.g. `flash-llm bench kernel --quick --out results/`); each writes JSON/CSV and "
                    "PNG plots. `flash-llm bench kernel -- --help` shows a script's options.")
    p.add_argument("which", choices=sorted(BENCHMARKS), help="which benchmark")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark script")
    p.set_defaults(func=cmd_bench)

"""Pruning accuracy on the bundled model: dense against every pruning method at several sparsities, one-shot
and retrained, with validation loss, perplexity and pruning time; writes ``benchmarks/ACCURACY.md``.

    python benchmarks/accuracy.py --force                       # on a GPU, ~2-3 min
    python benchmarks/accuracy.py --sparsities 50 --eval-tokens 4096 --calib-seqs 8 --retrain-steps 5 \\
        --out /tmp/ACCURACY.md                                  # a quick CPU check

Methods (every ``nn.Linear`` of the decoder layers is pruned; ``lm_head`` and the embeddings stay dense):

* one-shot: ``magnitude`` (each layer to the target), ``magnitude-global`` (one threshold over all layers),
  ``wanda``, ``sparsegpt``, ``owl-wanda`` and ``owl-sparsegpt`` (per-layer targets from OWL);
  calibration: ``--calib-seqs`` sequences of ``--seq-len`` tokens from the training split;
* retrained (``--retrain-steps`` steps of ``--retrain-batch`` x ``--seq-len`` tokens of the training split,
  Adam, learning rate on a cosine from ``--retrain-lr`` to a tenth of it): ``gradual`` (magnitude pruning on a cubic schedule while fine-tuning,
  :func:`flash_llm.prune.gradual_prune_`), ``gradual-distill`` (the same plus ``--distill`` x KL to the
  dense model's predictions), ``sparsegpt-ft`` (SparseGPT, then fine-tuning with its mask fixed).

Validation: the whole validation split (last 10 % of tinyshakespeare) unless ``--eval-tokens``,
non-overlapping windows of ``--seq-len``, fp32 weights and compute.  Calibration, training and validation
text is encoded by the model's tokenizer (bytes for the bundled model, a ``--model`` directory's own
tokenizer otherwise, as ``flash-llm demo``: :func:`flash_llm.demo.corpus_splits`).  Pruning time: wall time of the
pruning call (retrained: including all its training steps; OWL: including its outlier pass), CUDA-synchronized, and
nothing else: magnitude reads no calibration data (until session 88 its time included a forward pass over the
calibration sequences that only measured the layers' errors).  The script ends with the
checks of the issue's targets (PASS / FAIL lines), also written to the report.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import flash_llm  # noqa: E402
from flash_llm import data  # noqa: E402
from flash_llm import prune as P  # noqa: E402
from flash_llm.checkpoint import _files  # noqa: E402
from flash_llm.cli import _float_from, _positive  # noqa: E402
from flash_llm.demo import _seq_len_too_long, corpus_splits, load_model, not_lm_head, prune  # noqa: E402
from flash_llm.evaluate import evaluate, logits_of  # noqa: E402

ONE_SHOT = ("magnitude", "magnitude-global", "wanda", "sparsegpt", "owl-wanda", "owl-sparsegpt")
RETRAINED = ("gradual", "gradual-distill", "sparsegpt-ft")
METHODS = ONE_SHOT + RETRAINED


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class NextToken(nn.Module):
    """``model`` on ``batch[:, :-1]`` of a ``[B, T + 1]`` batch (optionally under bf16 autocast), returning
    logits ``[B, T, V]``: what :func:`flash_llm.prune.gradual_prune_` calls."""

    def __init__(self, model: nn.Module, amp: bool):
        super().__init__()
        self.model, self.amp = model, amp

    def forward(self, batch):
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if self.amp else nullcontext()
        with ctx:
            return logits_of(self.model(batch[:, :-1]))


class TrainBatches:
    """``n`` batches ``int64 [batch, seq_len + 1]`` of random training windows, the same ones on every pass."""

    def __init__(self, tokens, n, batch, seq_len, seed):
        self.tokens, self.n, self.batch, self.seq_len, self.seed = tokens, n, batch, seq_len, seed

    def __iter__(self):
        gen = data.random_batches(self.tokens, self.batch, self.seq_len,
                                  generator=torch.Generator().manual_seed(self.seed))
        for _ in range(self.n):
            x, y = next(gen)
            yield torch.cat([x, y[:, -1:]], dim=1)


class CosineAdam(torch.optim.Adam):
    """Adam whose learning rate follows a cosine from ``lr`` down to ``lr * final_fraction`` over ``steps``
    calls of :meth:`step` (``gradual_prune_`` takes any optimizer but runs no scheduler)."""

    def __init__(self, params, lr: float, steps: int, final_fraction: float = 0.1):
        super().__init__(params, lr=lr)
        self.peak, self.total, self.final_fraction, self.t = lr, max(1, steps), final_fraction, 0

    def step(self, closure=None):
        progress = min(1.0, self.t / self.total)
        lr = self.peak * (self.final_fraction + (1 - self.final_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))
        for group in self.param_groups:
            group["lr"] = lr
        self.t += 1
        return super().step(closure)


def next_token_loss(logits, batch):
    return nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def run_method(method, dense, sparsity, calib, train_tokens, args, device):
    """A pruned copy of ``dense`` and the pruning report."""
    model = copy.deepcopy(dense)
    amp = device.type == "cuda" and not args.no_amp
    filt = not_lm_head
    if method in ONE_SHOT:
        # The pruning call alone (--quiet: without bars), and magnitude without the calibration batches:
        # magnitude_prune_ reads them only to measure the layers' errors for its report (a forward pass over every
        # --calib-seqs sequence, unused here), which magnitude's pruning time counted until session 88
        # (magnitude-global's never did).
        if method == "magnitude-global":
            return model, P.magnitude_prune_(model, sparsity, scope="global", filter_fn=filt)
        base, owl = method.removeprefix("owl-"), method.startswith("owl-")
        return model, prune(model, base, sparsity, None if base == "magnitude" else calib, owl=owl, filter_fn=filt,
                            progress=not args.quiet)
    batches = TrainBatches(train_tokens, args.retrain_steps, args.retrain_batch, args.seq_len, args.seed)
    optimizer = CosineAdam([p for p in model.parameters() if p.requires_grad], args.retrain_lr, args.retrain_steps)
    common = dict(steps=args.retrain_steps, loss_fn=next_token_loss, optimizer=optimizer, progress=not args.quiet,
                  filter_fn=lambda m, fqn: not_lm_head(m, fqn))
    wrapped = NextToken(model, amp)
    if method == "gradual":
        return model, P.gradual_prune_(wrapped, batches, sparsity, **common)
    if method == "gradual-distill":
        teacher = NextToken(dense, amp)
        return model, P.gradual_prune_(wrapped, batches, sparsity, teacher=teacher, distill_weight=args.distill,
                                       **common)
    if method == "sparsegpt-ft":
        P.sparsegpt_prune_(model, calib, sparsity, filter_fn=filt, progress=not args.quiet)
        # the SparseGPT zeros are exactly round(s * n) per layer, so the magnitude mask at s keeps them: fixed mask
        return model, P.gradual_prune_(wrapped, batches, sparsity, initial_sparsity=sparsity, begin=0, end=0,
                                       **common)
    raise ValueError(f"unknown method {method!r}")


def _git_commit() -> str:
    if os.environ.get("FLASH_LLM_COMMIT"):
        return os.environ["FLASH_LLM_COMMIT"]
    try:
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def check_targets(results, dense_loss) -> list[tuple[bool, str]]:
    """The issue's targets, as (passed, sentence) pairs, for the sparsities that were measured."""
    loss = {(r["method"], r["sparsity"]): r["loss"] for r in results}
    out = []
    for m in ("sparsegpt", "wanda"):
        if (m, 50) in loss:
            rise = 100 * (loss[m, 50] / dense_loss - 1)
            out.append((rise <= 5.0, f"{m} at 50 %: val loss {loss[m, 50]:.4f} vs dense {dense_loss:.4f}, "
                                     f"{rise:+.2f} % (target: at most +5 %)"))
    for s in (50, 60, 70):
        if ("magnitude", s) not in loss:
            continue
        for m in ("sparsegpt", "wanda"):
            if (m, s) in loss:
                out.append((loss[m, s] < loss["magnitude", s],
                            f"{m} beats magnitude at {s} %: {loss[m, s]:.4f} vs {loss['magnitude', s]:.4f}"))
    s = 80
    one = {m: loss[m, s] for m in ONE_SHOT if (m, s) in loss}
    re = {m: loss[m, s] for m in RETRAINED if (m, s) in loss}
    if one and re:
        best_re = min(re, key=re.get)
        best_one = min(one, key=one.get)
        out.append((re[best_re] < one[best_one],
                    f"at 80 % the best retrained ({best_re}, {re[best_re]:.4f}) beats every one-shot method "
                    f"(best: {best_one}, {one[best_one]:.4f})"))
        if "magnitude" in one:
            gap = one["magnitude"] - dense_loss
            rec = (one["magnitude"] - re[best_re]) / gap if gap > 0 else float("nan")
            out.append((rec >= 0.7, f"at 80 % {best_re} recovers {100 * rec:.1f} % of the gap between one-shot "
                                    f"magnitude ({one['magnitude']:.4f}) and dense ({dense_loss:.4f}) "
                                    "(target: at least 70 %)"))
    return out


def render(results, dense, env, args, targets) -> str:
    sparsities = sorted({r["sparsity"] for r in results})
    methods = [m for m in METHODS if any(r["method"] == m for r in results)]
    by = {(r["method"], r["sparsity"]): r for r in results}
    cols = [f"{s} %" for s in sparsities]

    def table(title, fmt, dense_cell):
        lines = [f"### {title}", "", "| method | kind | " + " | ".join(cols) + " |",
                 "|---|---|" + "---:|" * len(cols)]
        lines.append("| dense | - | " + " | ".join(dense_cell for _ in cols) + " |")
        for m in methods:
            kind = "one-shot" if m in ONE_SHOT else "retrained"
            cells = [fmt(by[m, s]) if (m, s) in by else "-" for s in sparsities]
            lines.append(f"| {m} | {kind} | " + " | ".join(cells) + " |")
        return lines + [""]

    lines = ["# Pruning accuracy on the bundled model", "",
             "Generated by `benchmarks/accuracy.py`; do not edit by hand. Validation loss is the mean next-token "
             "cross-entropy (nats per token of the model's tokenizer: per byte for a byte-level model) on the "
             "validation split of tinyshakespeare (its last 10 %, "
             "`flash_llm.data.split`), non-overlapping windows; fp32 weights and compute. Every `nn.Linear` "
             "of the decoder layers is pruned to the sparsity of the column; `lm_head` and the embeddings stay "
             "dense.", "",
             f"* model: {env['model']}",
             f"* bundled weights trained: {env['training']}",
             f"* dense: val loss {dense.loss:.4f}, perplexity {dense.perplexity:.3f} ({dense.tokens:,} tokens, "
             f"windows of {dense.seq_len})",
             f"* calibration: {args.calib_seqs} sequences x {args.seq_len} tokens of the training split "
             f"(seed {args.seed})",
             f"* retraining: {args.retrain_steps} steps x {args.retrain_batch} x {args.seq_len} tokens of the "
             f"training split, Adam, lr cosine {args.retrain_lr} -> {args.retrain_lr / 10:g}; gradual: cubic "
             f"sparsity schedule over the first 3/4 of the steps, masks updated every 10 steps; "
             f"distillation weight {args.distill}; bf16 autocast on a GPU: {env['amp']}",
             f"* card: {env['card']}; torch {env['torch']}; Python {env['python']}; flash-llm commit "
             f"{env['commit']}; {env['date']}",
             f"* command: `{env['command']}`; total {env['total_s']:.0f} s", ""]
    lines += table("Validation loss (nats/token)", lambda r: f"{r['loss']:.4f}", f"{dense.loss:.4f}")
    lines += table("Change of the validation loss against dense", lambda r: f"{100 * (r['loss'] / dense.loss - 1):+.1f} %",
                   "0")
    lines += table("Perplexity", lambda r: f"{r['perplexity']:.3f}", f"{dense.perplexity:.3f}")
    lines += table("Sparsity reached over the pruned layers", lambda r: f"{100 * r['reached']:.2f} %", "0")
    lines += table("Pruning time (s)", lambda r: f"{r['seconds']:.2f}", "-")
    lines += ["Wall time of the pruning call alone, CUDA-synchronized (OWL: with its outlier pass; retrained: with "
              "all its training steps); magnitude and magnitude-global read no calibration data.", ""]
    lines += ["### Targets", ""]
    lines += [f"* {'PASS' if ok else 'FAIL'}: {text}" for ok, text in targets] or ["* (no target measured)"]
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str, force: bool) -> None:
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists; pass --force to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _positive_float(text: str) -> float:
    """A finite number > 0 (a learning rate, a loss weight)."""
    return _float_from(text, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="tiny-shakespeare", help="bundled model name or model directory")
    p.add_argument("--sparsities", default="50,60,70,80,90", help="comma-separated percentages")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--calib-seqs", type=_positive, default=128, help="calibration sequences")
    p.add_argument("--seq-len", type=_positive, default=None,
                   help="sequence / window length (default: the context; more than the context is refused)")
    p.add_argument("--eval-tokens", type=_positive, default=None, help="validation tokens (default: all)")
    p.add_argument("--retrain-steps", type=_positive, default=600, help="training steps of the retrained methods")
    p.add_argument("--retrain-batch", type=_positive, default=32, help="sequences per training step")
    p.add_argument("--retrain-lr", type=_positive_float, default=1e-3,
                   help="peak Adam learning rate of the retrained methods (cosine decay to a tenth)")
    p.add_argument("--distill", type=_positive_float, default=1.0, help="distillation weight of gradual-distill")
    p.add_argument("--seed", type=int, default=0, help="seed of calibration and training batches")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--no-amp", action="store_true", help="train in fp32 on a GPU too (default: bf16 autocast)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "ACCURACY.md", help="report (markdown)")
    p.add_argument("--json", type=Path, default=None, help="also write the raw results as JSON")
    p.add_argument("--force", action="store_true", help="replace --out / --json if they exist")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    try:
        args.sparsities = sorted({int(s) for s in args.sparsities.split(",") if s.strip()})
    except ValueError:
        p.error(f"--sparsities must be comma-separated integer percentages, got {args.sparsities!r}")
    if not args.sparsities or not all(0 < s < 100 for s in args.sparsities):
        p.error(f"--sparsities must be percentages in (0, 100), got {args.sparsities}")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown or not args.methods:
        p.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    for flag, path in (("--out", args.out), ("--json", args.json)):
        if path is None:
            continue
        if path.is_dir():
            p.error(f"{flag} {path} is a directory; name the file to write")
        if path.exists() and not args.force:
            p.error(f"{path} exists; pass --force to replace it")
        try:  # (before the run, not when writing its results: the file's directory can be made and written in)
            _files.check_writable(path, flag)
        except OSError as e:
            p.error(str(e))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    lm = load_model(args.model, dtype=torch.float32, device=device)
    if _seq_len_too_long(args.seq_len, lm, args.model):  # (refused, not clamped, as flash-llm demo / prune)
        return 2
    args.seq_len = args.seq_len or lm.context
    train, val = corpus_splits(lm.tokenizer)  # the model's own token ids: bytes for a byte-level model
    if args.eval_tokens is not None:
        val = val[:args.eval_tokens + 1]
    train_dev = train.to(device)
    calib = data.calibration_batches(train, args.calib_seqs, args.seq_len, seed=args.seed, batch_size=32)
    dense = lm.model
    r_dense = evaluate(dense, val, seq_len=args.seq_len, batch_size=64, desc="dense", progress=not args.quiet)
    print(f"dense: val loss {r_dense.loss:.4f}, perplexity {r_dense.perplexity:.3f}", flush=True)
    results = []
    for s in args.sparsities:
        for method in args.methods:
            _sync(device)
            t0 = time.perf_counter()
            model, report = run_method(method, dense, s / 100, calib, train_dev, args, device)
            _sync(device)
            seconds = time.perf_counter() - t0
            r = evaluate(model, val, seq_len=args.seq_len, batch_size=64, desc=f"{method} {s}%",
                         progress=not args.quiet)
            results.append({"method": method, "sparsity": s, "loss": r.loss, "perplexity": r.perplexity,
                            "reached": report.sparsity, "seconds": seconds})
            print(f"{s:3d} %  {method:17s} val loss {r.loss:.4f} ({100 * (r.loss / r_dense.loss - 1):+6.1f} %)  "
                  f"ppl {r.perplexity:8.3f}  sparsity {100 * report.sparsity:6.2f} %  {seconds:7.2f} s", flush=True)
            del model
    t = (lm.config.get("flash_llm") or {}).get("training") or {}
    env = {"model": lm.label, "card": torch.cuda.get_device_name(device) if device.type == "cuda" else
           f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)",
           "training": f"`{t.get('command', '?')}` on {t.get('card', '?')}, {t.get('train_seconds', '?')} s, "
                       f"{t.get('steps', '?')} steps, recorded val loss {t.get('val_loss', '?')}",
           "torch": torch.__version__, "python": platform.python_version(), "commit": _git_commit(),
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "command": "python benchmarks/accuracy.py " + " ".join(shlex.quote(a) for a in
                                                                   (sys.argv[1:] if argv is None else argv)),
           "amp": device.type == "cuda" and not args.no_amp, "total_s": time.perf_counter() - t_start,
           "flash_llm": flash_llm.__version__}
    targets = check_targets(results, r_dense.loss)
    print()
    for ok, text in targets:
        print(f"{'PASS' if ok else 'FAIL'}: {text}")
    write_atomic(args.out, render(results, r_dense, env, args, targets), args.force)
    if args.json:
        write_atomic(args.json, json.dumps({"env": env, "dense": {"loss": r_dense.loss,
                                                                  "perplexity": r_dense.perplexity},
                                            "results": results}, indent=1) + "\n", args.force)
    print(f"wrote {args.out} ({time.perf_counter() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

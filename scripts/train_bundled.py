"""Train the bundled byte-level Llama (``tiny-shakespeare``) from scratch and write it as a model directory.

    python scripts/train_bundled.py --out flash_llm/bundled/tiny-shakespeare --force      # on a GPU, ~15 s

Data: the fixed split of :mod:`flash_llm.data` (first 90 % of the bytes train, last 10 % validation) of
tinyshakespeare (the bundled copy by default, SHA-256 checked, or ``--data FILE``).  Training: random
windows of ``--seq-len`` bytes from the training split, AdamW (weight decay on matrices only), linear
warm-up then cosine decay to ``--min-lr``, gradient clipping at 1.0, bf16 autocast on a GPU (fp32
master weights), fp32 on CPU.  At the end the fp16 weights are written (``config.json`` +
``model.safetensors``, atomically), reloaded, and evaluated on the whole validation split; the config
records the command, card, time, steps and validation loss, and one summary line is printed:

    trained tiny-shakespeare: card NVIDIA H200, 13.0 s, 700 steps x 64 x 256 tokens, val loss 1.45 (ppl 4.3)
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flash_llm import bundled, data  # noqa: E402
from flash_llm.evaluate import evaluate, logits_of  # noqa: E402

DEFAULT_OUT = ROOT / "flash_llm" / "bundled" / "tiny-shakespeare"


def model_config(*, hidden: int, layers: int, heads: int, ffn: int, seq_len: int) -> dict:
    """The ``config.json`` of the bundled model (Hugging Face ``LlamaForCausalLM`` fields)."""
    for name, v in (("hidden", hidden), ("ffn", ffn)):
        if v % 64:
            raise ValueError(f"--{name} must be a multiple of 64, got {v}")
    if hidden % heads or (hidden // heads) % 2:
        raise ValueError(f"--hidden ({hidden}) must split into --heads ({heads}) heads of an even size")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": data.VOCAB_SIZE,
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "head_dim": hidden // heads,
        "hidden_act": "silu",
        "max_position_embeddings": seq_len,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
    }


def lr_at(step: int, *, steps: int, lr: float, min_lr: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay from ``lr`` to ``min_lr`` at ``steps``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _card(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _commit() -> str:
    if os.environ.get("FLASH_LLM_COMMIT"):
        return os.environ["FLASH_LLM_COMMIT"]
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain"], capture_output=True, text=True,
                               check=True).stdout.strip()
        return out + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output model directory")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--data", type=Path, default=None,
                   help="training text (default: the bundled tinyshakespeare, SHA-256 checked)")
    p.add_argument("--steps", type=int, default=700, help="optimizer steps (the validation loss is lowest near 700: "
                   "4000 steps x 64 x 256 tokens, 65 epochs, overfit to val loss 4.7 on an H200, 2026-11-29)")
    p.add_argument("--batch-size", type=int, default=64, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (also the context length)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--min-lr", type=float, default=1e-4, help="final learning rate")
    p.add_argument("--warmup", type=int, default=100, help="warm-up steps")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (matrices only)")
    p.add_argument("--hidden", type=int, default=256, help="hidden size (multiple of 64)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--ffn", type=int, default=768, help="MLP intermediate size (multiple of 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the batches")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    p.add_argument("--eval-every", type=int, default=100,
                   help="print the loss on the first --eval-tokens validation tokens every N steps (0: never)")
    p.add_argument("--eval-tokens", type=int, default=32768, help="validation tokens of the periodic evaluation")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (GPU; pays compile time)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "seq_len", "layers", "heads", "warmup", "eval_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.eval_every < 0:
        p.error(f"--eval-every must be >= 0, got {args.eval_every}")
    if not 0 < args.min_lr <= args.lr:
        p.error(f"need 0 < --min-lr <= --lr, got {args.min_lr} and {args.lr}")
    if args.out.exists() and not args.force:
        p.error(f"--out {args.out} exists; pass --force to replace it")
    return args


def train(args: argparse.Namespace) -> dict:
    """Train, save, reload and evaluate; returns the ``"training"`` record written into the config."""
    from tqdm.auto import tqdm

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if args.data is None:
        tokens = data.load_tokens(data.corpus_path(), sha256=data.CORPUS_SHA256)
        source = "tinyshakespeare (bundled copy, sha256 " + data.CORPUS_SHA256[:12] + ")"
    else:
        tokens = data.load_tokens(args.data)
        source = str(args.data)
    train_tokens, val_tokens = data.split(tokens)
    cfg = model_config(hidden=args.hidden, layers=args.layers, heads=args.heads, ffn=args.ffn,
                       seq_len=args.seq_len)
    model = bundled.build_model(cfg, dtype=torch.float32, device=device, seed=args.seed).train()
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.99),
                            **({"fused": True} if device.type == "cuda" else {}))
    step_fn = torch.compile(model) if args.compile else model
    batches = data.random_batches(train_tokens.to(device), args.batch_size, args.seq_len,
                                  generator=torch.Generator().manual_seed(args.seed))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    print(f"training {n_params:,} parameters on {_card(device)}: {args.steps} steps x {args.batch_size} x "
          f"{args.seq_len} tokens, train {train_tokens.numel():,} / val {val_tokens.numel():,} bytes of {source}",
          file=sys.stderr)
    curve = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    bar = tqdm(range(args.steps), desc="train", unit="step", disable=args.no_progress, file=sys.stderr)
    loss_f = float("nan")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps=args.steps, lr=args.lr, min_lr=args.min_lr, warmup=args.warmup)
        x, y = next(batches)
        with autocast:
            logits = logits_of(step_fn(x))
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        last = step + 1 == args.steps
        evaluate_now = args.eval_every and ((step + 1) % args.eval_every == 0 or last)
        if step % 50 == 0 or last or evaluate_now:
            loss_f = float(loss.detach())
            if not math.isfinite(loss_f):
                raise FloatingPointError(f"training diverged: loss {loss_f} at step {step}; lower --lr")
            bar.set_postfix(loss=f"{loss_f:.4f}", lr=f"{opt.param_groups[0]['lr']:.2e}")
        if evaluate_now:
            with autocast:
                r = evaluate(model, val_tokens, seq_len=args.seq_len, batch_size=64, max_tokens=args.eval_tokens,
                             progress=False)
            model.train()
            curve.append([step + 1, round(loss_f, 4), round(r.loss, 4)])
            tqdm.write(f"step {step + 1:6d}  train loss {loss_f:.4f}  val loss (first {r.tokens:,} tokens) "
                       f"{r.loss:.4f}", file=sys.stderr)
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    train_s = time.perf_counter() - t0

    record = {
        "note": "trained by scripts/train_bundled.py; val loss of the fp16 weights below, on the whole "
                "validation split (last 10 % of the bytes), windows of seq_len, fp32 compute",
        "command": "python " + " ".join(shlex.quote(a) for a in
                                        [os.path.relpath(__file__, ROOT) if Path(__file__).is_relative_to(ROOT)
                                         else __file__] + sys.argv[1:]),
        "card": _card(device),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "commit": _commit(),
        "data": source,
        "train_tokens": train_tokens.numel(),
        "val_tokens": val_tokens.numel(),
        "parameters": n_params,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "tokens_seen": args.steps * args.batch_size * args.seq_len,
        "lr": args.lr, "min_lr": args.min_lr, "warmup": args.warmup, "weight_decay": args.weight_decay,
        "seed": args.seed,
        "train_seconds": round(train_s, 1),
        "final_train_loss": round(loss_f, 4),
        "curve": curve,
    }
    cfg["flash_llm"] = {"tokenizer": bundled.BYTE_TOKENIZER,
                        "tokenizer_note": "token id = byte value, vocabulary 256 (flash_llm.data)",
                        "split": "first 90 % of the bytes train, last 10 % validation (flash_llm.data.split)",
                        "training": record}
    with torch.no_grad():  # evaluate exactly the weights that are written: rounded to fp16
        for p in model.parameters():
            p.copy_(p.half().float())
    r = evaluate(model, val_tokens, seq_len=args.seq_len, batch_size=64, progress=not args.no_progress)
    record.update(val_loss=round(r.loss, 4), val_perplexity=round(r.perplexity, 3), val_scored_tokens=r.tokens)
    bundled.save_model_dir(model, cfg, args.out, dtype=torch.float16, overwrite=args.force)
    total_s = time.perf_counter() - t0
    print(f"trained tiny-shakespeare: card {record['card']}, {train_s:.1f} s training ({total_s:.1f} s with "
          f"evaluation and saving), {args.steps} steps x {args.batch_size} x {args.seq_len} tokens, "
          f"{n_params:,} parameters, val loss {r.loss:.4f} (ppl {r.perplexity:.3f}) -> {args.out}")
    return record


def main(argv=None) -> int:
    train(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())

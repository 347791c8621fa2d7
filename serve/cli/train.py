"""`llmserve students train`: fine-tune a LoRA adapter on teacher labels (serve/students/train.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from serve.students.data import LabelError, file_sha256, read_batch, read_labels
from serve.students.generate import pick_device
from serve.students.train import Hyper, train


def _fmt(scores: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.3f}" for k, v in scores.items()) or "(nothing held out)"


def golden_set(path: str) -> dict[str, Any]:
    """The labels' golden-set version (serve/students/curate.py: a content digest that any review's
    correction changes) and how many labels a review corrected or confirmed, for the manifest."""
    from serve.students.curate import version

    rows = [json.loads(x) for x in Path(path).read_text(encoding="utf-8").splitlines() if x.strip()]
    return {"golden_version": version(rows),
            "reviewed": {k: sum(1 for r in rows if r.get("reviewed") == k) for k in ("corrected", "confirmed")}}


def cmd_train(args: argparse.Namespace) -> int:
    try:
        if args.labels:
            examples, skipped = read_labels(args.labels), 0
            sources = [{"path": args.labels, "sha256": file_sha256(args.labels), **golden_set(args.labels)}]
        else:
            examples, skipped = read_batch(args.batch_output, args.batch_input)
            sources = [{"path": args.batch_output, "sha256": file_sha256(args.batch_output), "role": "batch output"},
                       {"path": args.batch_input, "sha256": file_sha256(args.batch_input), "role": "batch input"}]
    except (LabelError, OSError) as e:
        raise SystemExit(f"llmserve: {e}") from e
    if not examples:
        raise SystemExit("llmserve: no labels to train on")
    hp = Hyper(epochs=args.epochs, lr=args.lr, rank=args.rank, alpha=args.alpha or 2 * args.rank,
               batch_size=args.batch_size, max_length=args.max_length,
               targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()), holdout=args.holdout,
               seed=args.seed, max_new_tokens=args.max_new_tokens, eval_limit=args.eval_limit,
               grad_accum=args.grad_accum, gradient_checkpointing=args.gradient_checkpointing,
               group_by_length=args.group_by_length, patience=args.patience, checkpoint_steps=args.checkpoint_steps)
    import torch

    if args.threads or pick_device(args.device).type == "cpu":
        # One by default on the CPU: the tiny models gain nothing from intra-op threads, and on a
        # machine shared with CPU engines OpenMP threads spin against them (here, with the load at
        # 8 on 2 cores: 15 s of training with 1 thread, 246 s with 2).
        torch.set_num_threads(args.threads or 1)
    result = train(examples, sources, args.base, args.output, hp, args.device, args.dtype, skipped,
                   resume=args.resume, memory_budget_gb=args.memory_budget_gb)
    m = result.manifest
    held = m["agreement"]["held_out"]
    ep = m["epochs"]
    print(f"adapter {m['adapter']} (digest {m['digest'][:12]}), trained in {m['train_seconds']:.0f}s on {m['device']}; "
          f"kept epoch {ep['kept']} of {ep['run']}{' (stopped early)' if ep['stopped_early'] else ''}, "
          f"memory estimate {m['memory_estimate']['total_gib']:.2f} GiB")
    print(f"held-out agreement with the teacher ({len(m['split']['held_out'])} labels): "
          f"before {_fmt(held['before'])} -> after {_fmt(held['after'])}")
    print(json.dumps({"adapter": m["adapter"], "digest": m["digest"], "manifest": str(result.manifest_path),
                      "train": len(m["split"]["train"]), "held_out": len(m["split"]["held_out"]),
                      "agreement": m["agreement"], "loss": {k: m["loss"][k] for k in ("train", "held_out")},
                      "train_seconds": m["train_seconds"], "epochs": m["epochs"],
                      "effective_batch": m["effective_batch"], "memory_estimate": m["memory_estimate"]}))
    return 0


def add_train_command(students_subparsers: Any) -> None:
    p = students_subparsers.add_parser(
        "train", help="fine-tune a LoRA adapter for a student base model on teacher labels (peft)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--labels", help="labels file from `llmserve students label`")
    src.add_argument("--batch-output", help="output file of a teacher batch (needs --batch-input)")
    p.add_argument("--batch-input", help="the input file of that batch: the prompts")
    p.add_argument("--base", required=True, help="student base model: a directory, hub id or builtin://tiny?seed=N[&num_hidden_layers=M...]")
    p.add_argument("-o", "--output", required=True,
                   help="adapter directory to write; the manifest goes to <output>.manifest.json")
    d = Hyper()
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--rank", type=int, default=d.rank, help="LoRA rank; at most the engine's max_lora_rank")
    p.add_argument("--alpha", type=int, help="LoRA alpha (default: 2 x rank)")
    p.add_argument("--targets", default=",".join(d.targets), help="modules the adapter wraps")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="rows per micro-batch (one forward pass)")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum,
                   help="micro-batches per optimizer step; the effective batch is --batch-size x --grad-accum")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=d.gradient_checkpointing,
                   help="recompute each layer's activations in the backward pass instead of keeping them")
    p.add_argument("--group-by-length", action=argparse.BooleanOptionalAction, default=d.group_by_length,
                   help="batch rows of similar length together (less padding)")
    p.add_argument("--patience", type=int, default=d.patience,
                   help="stop after this many epochs without a lower held-out loss (0: never); the best epoch is kept")
    p.add_argument("--checkpoint-steps", type=int, default=d.checkpoint_steps,
                   help="checkpoint every N optimizer steps as well as at each epoch's end (<output>.checkpoint.pt)")
    p.add_argument("--resume", action="store_true", help="continue from <output>.checkpoint.pt if one is there")
    p.add_argument("--memory-budget-gb", type=float,
                   help="memory training may use (default: the GPU's free memory, or the host's available memory)")
    p.add_argument("--max-length", type=int, default=d.max_length, help="tokens per example (prompt + answer)")
    p.add_argument("--holdout", type=float, default=d.holdout, help="share of labels held out (by a hash of id)")
    p.add_argument("--seed", type=int, default=d.seed, help="seeds the split, the adapter's init and the order")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: 1 on the CPU, torch's own on a GPU)")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens,
                   help="answer budget when scoring labels whose request set no max_tokens")
    p.add_argument("--eval-limit", type=int, default=d.eval_limit, help="labels scored per split, before and after")

    def run(args: argparse.Namespace) -> int:
        if args.batch_output and not args.batch_input:
            p.error("--batch-output needs --batch-input (the prompts)")
        if not 0 <= args.holdout < 1:
            p.error("--holdout must be in [0, 1)")
        if args.batch_size < 1 or args.grad_accum < 1 or args.patience < 0 or args.checkpoint_steps < 0:
            p.error("--batch-size and --grad-accum must be at least 1, --patience and --checkpoint-steps at least 0")
        if args.base.startswith("builtin://"):
            from serve.model.tiny import parse_tiny_source

            try:  # before the labels are read and split, not when the base is loaded
                parse_tiny_source(args.base)
            except ValueError as e:
                p.error(f"--base: {e}")
        return cmd_train(args)

    p.set_defaults(func=run)

"""`llmserve students train`: fine-tune a LoRA adapter for a student base model on teacher labels.

One code path for the tiny CPU models and real GPU ones: the device is CUDA when there is one, the
precision float32 on the CPU and the checkpoint's (bf16) on a GPU. The loss is taken only on the
teacher's answer tokens, after the prompt rendered with the tokenizer's own chat template, so the
student learns what to answer and nothing about reproducing prompts.

Output: the adapter directory (PEFT save_pretrained, which vLLM loads) and, next to it,
`<dir>.manifest.json`: the adapter's content digest (the one `students eval` and `promote` check),
the base model, the label files' sha256, the training and held-out ids, the hyperparameters, the
loss, and the agreement with the teacher (greedy, in transformers) before and after on held-out
labels. The manifest lives outside the directory so it does not change the digest it records.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from serve.students.data import Example, LabelError, file_sha256, read_batch, read_labels, split
from serve.students.generate import agreement, load, pick_device, prompt_text, resolve_base

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Hyper:
    epochs: int = 4
    lr: float = 2e-3
    rank: int = 8  # must not exceed the engine's max_lora_rank (vLLM's default is 16; ours: 8)
    alpha: int = 16
    batch_size: int = 8
    max_length: int = 1024
    targets: tuple[str, ...] = ATTENTION + MLP
    holdout: float = 0.2
    seed: int = 0
    warmup: float = 0.05  # share of the steps the learning rate ramps up over
    max_new_tokens: int = 64  # answer budget when scoring a label whose request set none
    eval_limit: int = 200  # examples scored per split: generation, not training, dominates on big models


@dataclass(frozen=True)
class Result:
    manifest: dict[str, Any]
    manifest_path: Path


def encode(tok: Any, ex: Example, max_length: int) -> tuple[list[int], list[int]] | None:
    """(input ids, labels) with the prompt masked (-100); None when the prompt alone fills max_length.
    Prompt and answer are tokenized apart, as generation sees them: the prompt, then new tokens."""
    prompt = prompt_text(tok, ex.messages)
    full = str(tok.apply_chat_template([*ex.messages, {"role": "assistant", "content": ex.teacher}],
                                       tokenize=False))
    if ex.complete and full.startswith(prompt) and ex.teacher in full[len(prompt):]:
        answer = full[len(prompt):]  # the template's own end of turn: the student learns to stop
    else:  # cut off (no end of turn), or a template that renders the answer differently
        answer = ex.teacher + ((tok.eos_token or "") if ex.complete else "")
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    a = tok(answer, add_special_tokens=False)["input_ids"]
    if len(p) >= max_length or not a:
        return None
    ids = (p + a)[:max_length]
    return ids, ([-100] * len(p) + a)[:max_length]


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int, device: Any) -> dict[str, Any]:
    import torch

    width = max(len(ids) for ids, _ in rows)
    ids = [r[0] + [pad_id] * (width - len(r[0])) for r in rows]
    labels = [r[1] + [-100] * (width - len(r[1])) for r in rows]
    mask = [[1] * len(r[0]) + [0] * (width - len(r[0])) for r in rows]
    return {"input_ids": torch.tensor(ids, device=device), "labels": torch.tensor(labels, device=device),
            "attention_mask": torch.tensor(mask, device=device)}


def mean_loss(model: Any, rows: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int) -> float:
    """Mean cross-entropy per answer token over `rows` (no gradient)."""
    import torch

    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for s in range(0, len(rows), batch_size):
            batch = collate(rows[s:s + batch_size], pad_id, model.device)
            n = int((batch["labels"][:, 1:] != -100).sum())  # the shifted targets the loss averages over
            total += float(model(**batch).loss) * n
            count += n
    return total / count if count else float("nan")


def fit(model: Any, rows: list[tuple[list[int], list[int]]], pad_id: int, hp: Hyper) -> list[float]:
    """AdamW on the adapter's parameters, linear warmup then linear decay; mean loss per epoch."""
    import torch
    from tqdm import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=hp.lr, weight_decay=0.0)
    per_epoch = math.ceil(len(rows) / hp.batch_size)
    steps, warm = per_epoch * hp.epochs, max(1, int(per_epoch * hp.epochs * hp.warmup))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm))))
    rng = random.Random(hp.seed)
    losses: list[float] = []
    model.train()
    with tqdm(total=steps, desc="train", unit="step", file=sys.stderr) as bar:
        for epoch in range(hp.epochs):
            order = list(range(len(rows)))
            rng.shuffle(order)
            seen = 0.0
            for s in range(0, len(order), hp.batch_size):
                batch = collate([rows[i] for i in order[s:s + hp.batch_size]], pad_id, model.device)
                loss = model(**batch).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                seen += loss.item()
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
            losses.append(seen / per_epoch)
    model.eval()
    return losses


def _prepare_output(output: Path) -> None:
    """Refuse to replace anything but an earlier adapter (checked before training, not after)."""
    if output.exists() and not (output / "adapter_config.json").is_file() and any(output.iterdir()):
        raise SystemExit(f"llmserve: {output} exists and is not an adapter directory: not replacing it")


def _write_adapter(peft_model: Any, output: Path) -> None:
    """Written beside the target, then swapped in, so a reader never sees half an adapter and no
    file of an earlier adapter is left behind to change the digest."""
    tmp = output.with_name(f".{output.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    peft_model.save_pretrained(str(tmp))
    # peft writes target_modules from a set, in an order that changes from run to run: sorted, the
    # same labels, seed and thread count give the same digest.
    config = tmp / "adapter_config.json"
    cfg = json.loads(config.read_text())
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
    config.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    if output.exists():
        shutil.rmtree(output)
    tmp.rename(output)


def train(examples: list[Example], sources: list[dict[str, str]], base: str, output: str | Path,
          hp: Hyper | None = None, device: str = "auto", dtype: str = "auto", skipped: int = 0) -> Result:
    """Train, save, measure; returns the manifest (also written next to the adapter)."""
    import torch
    from peft import LoraConfig, get_peft_model

    hp = hp or Hyper()
    out = Path(output)
    _prepare_output(out)
    train_set, held = split(examples, hp.holdout, hp.seed)
    if not train_set:
        raise SystemExit("llmserve: no training examples left after the held-out split")
    torch.manual_seed(hp.seed)  # the adapter's initialisation
    dev = pick_device(device)
    base_path = resolve_base(base)
    model, tok, dt = load(base_path, dev, dtype)
    encoded = [(ex, encode(tok, ex, hp.max_length)) for ex in train_set]
    rows = [r for _, r in encoded if r is not None]
    too_long = [ex.id for ex, r in encoded if r is None]
    if not rows:
        raise SystemExit(f"llmserve: every training prompt fills --max-length {hp.max_length}: nothing to learn")
    held_rows = [r for r in (encode(tok, ex, hp.max_length) for ex in held) if r is not None]
    eval_train, eval_held = train_set[: hp.eval_limit], held[: hp.eval_limit]
    print(f"{len(examples)} labels: {len(train_set)} to train on, {len(held)} held out; "
          f"{base} on {dev} ({str(dt).removeprefix('torch.')})", file=sys.stderr)

    def measure(m: Any, when: str) -> dict[str, Any]:
        return {"held_out": agreement(m, tok, eval_held, hp.max_new_tokens, desc=f"score held-out ({when})"),
                "train": agreement(m, tok, eval_train, hp.max_new_tokens, desc=f"score train ({when})"),
                "loss_train": mean_loss(m, rows, tok.pad_token_id, hp.batch_size),
                "loss_held_out": mean_loss(m, held_rows, tok.pad_token_id, hp.batch_size) if held_rows else None}

    before = measure(model, "before")
    peft_model = get_peft_model(model, LoraConfig(r=hp.rank, lora_alpha=hp.alpha, lora_dropout=0.0,
                                                  target_modules=list(hp.targets), task_type="CAUSAL_LM"))
    started = time.monotonic()
    epoch_losses = fit(peft_model, rows, tok.pad_token_id, hp)
    train_s = time.monotonic() - started
    after = measure(peft_model, "after")
    _write_adapter(peft_model, out)
    import peft
    import transformers

    from serve.students.registry import adapter_digest

    manifest = {
        "adapter": str(out.resolve()), "digest": adapter_digest(out),
        "digest_method": "serve.students.registry.adapter_digest",
        "base": base, "base_path": str(base_path), "labels": sources, "skipped_labels": skipped,
        "split": {"seed": hp.seed, "holdout": hp.holdout, "method": "sha256(seed \\0 id) < holdout",
                  "train": [ex.id for ex in train_set], "held_out": [ex.id for ex in held],
                  "too_long": too_long, "scored": {"train": len(eval_train), "held_out": len(eval_held)}},
        "hyperparameters": {**asdict(hp), "targets": list(hp.targets)},
        "device": str(dev), "dtype": str(dt).removeprefix("torch."), "train_seconds": round(train_s, 2),
        "loss": {"per_epoch": epoch_losses, "train": {"before": before["loss_train"], "after": after["loss_train"]},
                 "held_out": {"before": before["loss_held_out"], "after": after["loss_held_out"]}},
        "agreement": {"method": "greedy answers in transformers, each with the teacher's max_tokens",
                      "held_out": {"before": before["held_out"], "after": after["held_out"]},
                      "train": {"before": before["train"], "after": after["train"]}},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__},
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    path = out.with_name(out.name + ".manifest.json")
    path.write_text(json.dumps(manifest, indent=1) + "\n")
    return Result(manifest, path)


def _fmt(scores: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.3f}" for k, v in scores.items()) or "(nothing held out)"


def cmd_train(args: argparse.Namespace) -> int:
    try:
        if args.labels:
            examples, skipped = read_labels(args.labels), 0
            sources = [{"path": args.labels, "sha256": file_sha256(args.labels)}]
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
               seed=args.seed, max_new_tokens=args.max_new_tokens, eval_limit=args.eval_limit)
    import torch

    if args.threads or pick_device(args.device).type == "cpu":
        # One by default on the CPU: the tiny models gain nothing from intra-op threads, and on a
        # machine shared with CPU engines OpenMP threads spin against them (here, with the load at
        # 8 on 2 cores: 15 s of training with 1 thread, 246 s with 2).
        torch.set_num_threads(args.threads or 1)
    result = train(examples, sources, args.base, args.output, hp, args.device, args.dtype, skipped)
    m = result.manifest
    held = m["agreement"]["held_out"]
    print(f"adapter {m['adapter']} (digest {m['digest'][:12]}), trained in {m['train_seconds']:.0f}s on {m['device']}")
    print(f"held-out agreement with the teacher ({len(m['split']['held_out'])} labels): "
          f"before {_fmt(held['before'])} -> after {_fmt(held['after'])}")
    print(json.dumps({"adapter": m["adapter"], "digest": m["digest"], "manifest": str(result.manifest_path),
                      "train": len(m["split"]["train"]), "held_out": len(m["split"]["held_out"]),
                      "agreement": m["agreement"], "loss": {k: m["loss"][k] for k in ("train", "held_out")},
                      "train_seconds": m["train_seconds"]}))
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
    p.add_argument("--batch-size", type=int, default=d.batch_size)
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
        if args.base.startswith("builtin://"):
            from serve.model.tiny import parse_tiny_source

            try:  # before the labels are read and split, not when the base is loaded
                parse_tiny_source(args.base)
            except ValueError as e:
                p.error(f"--base: {e}")
        return cmd_train(args)

    p.set_defaults(func=run)

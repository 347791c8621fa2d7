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

import json
import math
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from serve.students.data import Example, split
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

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

import hashlib
import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from serve.students import memory
from serve.students.data import Example, split
from serve.students.fit import Progress, Row, collate, fit
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
    grad_accum: int = 1  # micro-batches per optimizer step: the effective batch is batch_size x grad_accum
    gradient_checkpointing: bool = True  # keep each layer's input only, recompute the rest in backward
    group_by_length: bool = True  # batch rows of similar length together: less padding
    patience: int = 2  # epochs without a lower held-out loss before stopping (0: run every epoch)
    checkpoint_steps: int = 0  # also checkpoint every N optimizer steps (0: at each epoch's end only)


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


def mean_loss(model: Any, rows: list[Row], pad_id: int, batch_size: int) -> float:
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


def checkpoint_path(output: Path) -> Path:
    """Beside the adapter, not in it: the adapter directory's digest covers what is in it."""
    return output.with_name(output.name + ".checkpoint.pt")


def fingerprint(base: str, hp: Hyper, sources: list[dict[str, str]], train_ids: list[str]) -> str:
    """What a checkpoint must have been written for to be resumed: labels, base, the split and
    every hyperparameter that changes the steps (not patience, checkpointing or scoring)."""
    keep = {k: v for k, v in asdict(hp).items()
            if k not in ("patience", "checkpoint_steps", "eval_limit", "max_new_tokens")}
    blob = json.dumps({"base": base, "hp": keep, "labels": [s.get("sha256") for s in sources],
                       "train": train_ids}, sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()


def check_memory(model: Any, hp: Hyper, rows: list[Row], dev: Any, dt: Any, budget_gb: float | None) -> dict[str, Any]:
    """The estimate for the longest micro-batch this run will see, refused (SystemExit) before any
    step when it exceeds the memory there is."""
    base = memory.shape_of(model)
    shape = memory.Shape(base.params, memory.lora_trainable(model.config.to_dict(), hp.rank, hp.targets),
                         base.hidden, base.intermediate, base.layers, base.vocab, base.heads)
    # Scores are materialised on the CPU (SDPA's math path under a padding mask) and by eager attention.
    materialised = dev.type != "cuda" or getattr(model.config, "_attn_implementation", "sdpa") == "eager"
    dtype_bytes = dt.itemsize
    seq = max(len(ids) for ids, _ in rows)
    est = memory.estimate(shape, dtype_bytes, min(hp.batch_size, len(rows)), seq, hp.gradient_checkpointing,
                          memory.CUDA_OVERHEAD if dev.type == "cuda" else 0, materialised)
    have, source = memory.available(dev, budget_gb)
    memory.check(est, have, source, shape, dtype_bytes, hp.batch_size * hp.grad_accum)
    return {**est.as_dict(), "available_gib": round(have / memory.GIB, 3), "available_from": source}


def train(examples: list[Example], sources: list[dict[str, str]], base: str, output: str | Path,
          hp: Hyper | None = None, device: str = "auto", dtype: str = "auto", skipped: int = 0,
          resume: bool = False, memory_budget_gb: float | None = None,
          on_step: Callable[[Progress], None] | None = None) -> Result:
    """Train, save, measure; returns the manifest (also written next to the adapter). `resume`
    continues from `<output>.checkpoint.pt` when one was written for these labels and settings."""
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
    mem = check_memory(model, hp, rows, dev, dt, memory_budget_gb)
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
    if hp.gradient_checkpointing:
        # Non-reentrant: gradients reach the LoRA weights without forcing the inputs to need them.
        peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ckpt = checkpoint_path(out)
    started = time.monotonic()
    outcome = fit(peft_model, rows, tok.pad_token_id, hp,
                  evaluate=(lambda m: mean_loss(m, held_rows, tok.pad_token_id, hp.batch_size)) if held_rows else None,
                  checkpoint=ckpt, resume=resume, fingerprint=fingerprint(base, hp, sources, [e.id for e in train_set]),
                  on_step=on_step)
    train_s = time.monotonic() - started
    if hp.gradient_checkpointing:
        peft_model.gradient_checkpointing_disable()
    prog = outcome.progress
    after = measure(peft_model, "after")
    _write_adapter(peft_model, out)
    ckpt.unlink(missing_ok=True)  # the adapter is written: nothing left to resume
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
        "effective_batch": hp.batch_size * hp.grad_accum, "memory_estimate": mem,
        "epochs": {"run": len(prog.train_losses), "kept": prog.best_epoch or len(prog.train_losses),
                   "stopped_early": prog.stopped_early, "resumed_at_step": outcome.resumed_at_step,
                   "steps": prog.step, "input_tokens": prog.input_tokens,
                   "tokens_per_second": round(outcome.tokens_this_run / train_s, 1) if train_s else None,
                   "rule": "the epoch of the lowest held-out loss; the last when none is held out"},
        "loss": {"per_epoch": prog.train_losses, "held_out_per_epoch": prog.held_losses,
                 "train": {"before": before["loss_train"], "after": after["loss_train"]},
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

"""The training loop of `students train`: batches, accumulation, checkpoints, early stopping.

- Effective batch = micro-batch x accumulation. The loss of each micro-batch is its summed token
  cross-entropy divided by the answer tokens of the whole effective batch, so the accumulated
  gradient is exactly that of one batch of the effective size (a mean of micro-batch means would
  weight a short micro-batch's tokens more).
- Length-grouped batches: rows are shuffled, pooled, sorted by length within a pool and cut into
  effective batches whose order is shuffled again; padding (compute and memory spent on nothing)
  falls, and no epoch sees the batches longest-first. The order is a function of (seed, epoch)
  only, so a resumed run takes the batches the interrupted one would have.
- Checkpoints: the adapter's trainable tensors, AdamW's and the scheduler's state and the loop's
  position, written atomically every `checkpoint_steps` optimizer steps and at each epoch's end; a
  resume refuses a checkpoint written for other labels, base or hyperparameters (the fingerprint).
- Early stopping on held-out loss: after each epoch; the best epoch's adapter is the one kept, not
  the last, and `patience` epochs without improvement end the run.
"""

from __future__ import annotations

import math
import os
import random
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

Row = tuple[list[int], list[int]]
POOL = 32  # effective batches per sorting pool: local enough to stay shuffled, wide enough to group


def plan(lengths: list[int], effective: int, seed: int, epoch: int, group: bool) -> list[list[int]]:
    """Row indices of each effective batch of one epoch."""
    rng = random.Random(f"{seed}:{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if not group:
        return [order[s:s + effective] for s in range(0, len(order), effective)]
    batches: list[list[int]] = []
    pool = effective * POOL
    for s in range(0, len(order), pool):
        chunk = sorted(order[s:s + pool], key=lambda i: -lengths[i])
        batches += [chunk[k:k + effective] for k in range(0, len(chunk), effective)]
    rng.shuffle(batches)
    return batches


@dataclass
class Progress:
    """Where the loop is; what a checkpoint records besides tensors."""

    epoch: int = 0  # the epoch being run (0-based)
    batch: int = 0  # effective batches (optimizer steps) done in it
    step: int = 0  # optimizer steps done in all
    loss_sum: float = 0.0  # this epoch's summed token loss so far
    tokens: int = 0  # and its answer tokens
    train_losses: list[float] = field(default_factory=list)  # per finished epoch, per token
    held_losses: list[float] = field(default_factory=list)
    best_epoch: int | None = None  # 1-based
    best_loss: float | None = None
    bad_epochs: int = 0
    stopped_early: bool = False
    input_tokens: int = 0  # tokens (prompt and answer, no padding) through forward and backward, in all


@dataclass(frozen=True)
class Outcome:
    progress: Progress
    resumed_at_step: int | None
    steps_total: int
    tokens_this_run: int = 0  # input tokens this call trained on (not those before a resume)


def collate(rows: list[Row], pad_id: int, device: Any) -> dict[str, Any]:
    import torch

    width = max(len(ids) for ids, _ in rows)
    ids = [r[0] + [pad_id] * (width - len(r[0])) for r in rows]
    labels = [r[1] + [-100] * (width - len(r[1])) for r in rows]
    mask = [[1] * len(r[0]) + [0] * (width - len(r[0])) for r in rows]
    return {"input_ids": torch.tensor(ids, device=device), "labels": torch.tensor(labels, device=device),
            "attention_mask": torch.tensor(mask, device=device)}


def answer_tokens(rows: list[Row]) -> int:
    """Targets the loss counts: labels after the first position (the model predicts the next token)."""
    return sum(sum(1 for t in labels[1:] if t != -100) for _, labels in rows)


def summed_loss(model: Any, batch: dict[str, Any]) -> Any:
    """Summed next-token cross-entropy over the answer tokens of `batch`."""
    import torch

    labels = batch["labels"]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                             labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum")


def trainable_state(model: Any) -> dict[str, Any]:
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: Any, state: dict[str, Any]) -> None:
    import torch

    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t.to(params[n].device))


def _save(path: Path, payload: dict[str, Any]) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)  # a crash mid-write leaves the previous checkpoint whole


def fit(model: Any, rows: list[Row], pad_id: int, hp: Any, *, evaluate: Callable[[Any], float] | None = None,
        checkpoint: Path | None = None, resume: bool = False, fingerprint: str = "",
        on_step: Callable[[Progress], None] | None = None) -> Outcome:
    """AdamW on the trainable parameters, linear warmup then linear decay over `hp.epochs`.
    `evaluate(model)` gives the held-out loss after each epoch (None: no early stopping, the last
    epoch is kept). `on_step` is called after each optimizer step (tests interrupt through it)."""
    import torch
    from tqdm import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=hp.lr, weight_decay=0.0)
    effective = hp.batch_size * hp.grad_accum
    per_epoch = math.ceil(len(rows) / effective)
    steps, warm = per_epoch * hp.epochs, max(1, int(per_epoch * hp.epochs * hp.warmup))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm))))
    prog, best_state, resumed = Progress(), None, None
    if checkpoint is not None and resume and checkpoint.is_file():
        saved = torch.load(checkpoint, weights_only=True)
        if saved["fingerprint"] != fingerprint:
            raise SystemExit(f"llmserve: {checkpoint} was written for other labels, base or hyperparameters; "
                             "not resuming from it (remove it, or train without --resume)")
        load_trainable(model, saved["adapter"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        prog, best_state, resumed = Progress(**saved["progress"]), saved["best"], saved["progress"]["step"]

    def save() -> None:
        if checkpoint is not None:
            _save(checkpoint, {"fingerprint": fingerprint, "adapter": trainable_state(model),
                               "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                               "progress": asdict(prog), "best": best_state})

    lengths = [len(ids) for ids, _ in rows]
    tokens_before = prog.input_tokens
    model.train()
    with tqdm(total=steps, initial=prog.step, desc="train", unit="step", file=sys.stderr) as bar:
        while prog.epoch < hp.epochs and not prog.stopped_early:
            batches = plan(lengths, effective, hp.seed, prog.epoch, hp.group_by_length)
            for idx in batches[prog.batch:]:
                group = [rows[i] for i in idx]
                n = answer_tokens(group)
                for s in range(0, len(group), hp.batch_size):
                    loss = summed_loss(model, collate(group[s:s + hp.batch_size], pad_id, model.device))
                    (loss / max(1, n)).backward()
                    prog.loss_sum += loss.item()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                prog.tokens += n
                prog.input_tokens += sum(len(ids) for ids, _ in group)
                prog.batch += 1
                prog.step += 1
                bar.update(1)
                bar.set_postfix(epoch=prog.epoch + 1, loss=f"{prog.loss_sum / max(1, prog.tokens):.3f}")
                if hp.checkpoint_steps and prog.step % hp.checkpoint_steps == 0 and prog.batch < len(batches):
                    save()
                if on_step is not None:
                    on_step(prog)
            prog.train_losses.append(prog.loss_sum / max(1, prog.tokens))
            if evaluate is not None:
                held = evaluate(model)
                model.train()
                prog.held_losses.append(held)
                if prog.best_loss is None or held < prog.best_loss:
                    prog.best_loss, prog.best_epoch, prog.bad_epochs = held, prog.epoch + 1, 0
                    best_state = trainable_state(model)
                else:
                    prog.bad_epochs += 1
                    prog.stopped_early = bool(hp.patience) and prog.bad_epochs >= hp.patience
            prog.epoch, prog.batch, prog.loss_sum, prog.tokens = prog.epoch + 1, 0, 0.0, 0
            save()
    if best_state is not None and prog.best_epoch != len(prog.train_losses):
        load_trainable(model, best_state)  # the best epoch's adapter, not the last one's
    model.eval()
    return Outcome(prog, resumed, steps, prog.input_tokens - tokens_before)

"""Greedy answers in transformers (no server): teacher labels for experiments and tests, and the
student's answers for the before/after agreement `students train` records."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from serve.students.data import Example
from serve.students.metrics import score

METRICS = ["token_overlap", "exact_match"]


def resolve_base(base: str) -> str:
    """A local directory or hub id as given; builtin://tiny?seed=N[&shape...] built (once) where the
    engines find it, through the engines' own resolution, so the student is trained on exactly the
    weights vLLM serves. ValueError for a builtin URL with an unknown parameter or a bad value."""
    if not base.startswith("builtin://"):
        return base
    from serve.engine.models import resolve_tiny
    from serve.model.tiny import parse_tiny_source

    return resolve_tiny(parse_tiny_source(base))


def pick_device(flag: str = "auto") -> Any:
    import torch

    if flag == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(flag)


def pick_dtype(flag: str, device: Any, config_dtype: Any) -> Any:
    """float32 on the CPU (bf16 matmuls there are slow and lossy); on a GPU the checkpoint's own
    precision, as bf16 where the card has it (fp16 training would need loss scaling)."""
    import torch

    if flag != "auto":
        return getattr(torch, flag)
    if device.type != "cuda" or config_dtype in (torch.float32, "float32", None):
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32


def load(path: str, device: Any, dtype_flag: str = "auto") -> tuple[Any, Any, Any]:
    """(model, tokenizer, dtype) with the model on `device`, in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = AutoConfig.from_pretrained(path)
    dtype = pick_dtype(dtype_flag, device, getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None))
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:  # padding positions are masked out; any id will do
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    return model, tok, dtype


def prompt_text(tok: Any, messages: list[dict[str, Any]]) -> str:
    return str(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def greedy(model: Any, tok: Any, requests: list[tuple[list[dict[str, Any]], int]], batch_size: int = 16,
           desc: str | None = None) -> list[tuple[str, str]]:
    """(text, finish_reason) for each (messages, max_new_tokens), greedy, in order. Prompts are
    left-padded in batches of equal budget, as an engine would decode them side by side."""
    import torch
    from tqdm import tqdm

    out: list[tuple[str, str] | None] = [None] * len(requests)
    order = sorted(range(len(requests)), key=lambda i: requests[i][1])
    eos = model.generation_config.eos_token_id
    stops = set(eos if isinstance(eos, list) else [eos] if eos is not None else [tok.eos_token_id])
    side, tok.padding_side = tok.padding_side, "left"
    try:
        with torch.no_grad(), tqdm(total=len(requests), desc=desc, disable=desc is None, leave=False) as bar:
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                budget = max(requests[i][1] for i in idx)
                enc = tok([prompt_text(tok, requests[i][0]) for i in idx], add_special_tokens=False,
                          padding=True, return_tensors="pt").to(model.device)
                gen = model.generate(**enc, max_new_tokens=budget, do_sample=False, pad_token_id=tok.pad_token_id)
                for row, i in enumerate(idx):
                    ids = gen[row, enc["input_ids"].shape[1]:].tolist()[: requests[i][1]]
                    ended = next((k for k, t in enumerate(ids) if t in stops), None)
                    text = tok.decode(ids[:ended], skip_special_tokens=True)
                    out[i] = (text, "length" if ended is None else "stop")
                bar.update(len(idx))
    finally:
        tok.padding_side = side
    return [x for x in out if x is not None]


def agreement(model: Any, tok: Any, examples: list[Example], default_max_tokens: int, batch_size: int = 16,
              desc: str | None = None) -> dict[str, float]:
    """Mean token_overlap and exact_match of the model's greedy answers against the teacher's,
    each with the teacher's own token budget. Empty when there is nothing to score."""
    if not examples:
        return {}
    answers = greedy(model, tok, [(ex.messages, ex.max_tokens or default_max_tokens) for ex in examples],
                     batch_size, desc)
    return score([(text, ex.teacher, None) for (text, _), ex in zip(answers, examples, strict=True)], METRICS)


def label_with_transformers(model_path: str | Path, requests: Iterable[tuple[str, dict[str, Any]]],
                            teacher_model: str = "teacher", max_new_tokens: int = 64, device: str = "auto",
                            batch_size: int = 16) -> list[dict[str, Any]]:
    """Teacher labels without a server, in the format `llmserve students label` writes
    ({"id", "request", "teacher", "teacher_model"}, plus "finish_reason"): greedy answers of the
    model at `model_path` (a directory, hub id or builtin://tiny?seed=N[&shape...]) to (id, chat request) pairs,
    each with the request's max_tokens or `max_new_tokens`."""
    reqs = list(requests)
    model, tok, _ = load(resolve_base(str(model_path)), pick_device(device))
    budgets = [int(r.get("max_completion_tokens") or r.get("max_tokens") or max_new_tokens) for _, r in reqs]
    answers = greedy(model, tok, [(r["messages"], b) for (_, r), b in zip(reqs, budgets, strict=True)], batch_size)
    return [{"id": rid, "request": r, "teacher": text, "teacher_model": teacher_model, "finish_reason": fin}
            for (rid, r), (text, fin) in zip(reqs, answers, strict=True)]

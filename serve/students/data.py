"""Teacher labels for training a student: read from a `students label` file or from a teacher
batch's output paired with its input, hashed for provenance and split by id (pure but for reading
the files it is given)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class LabelError(ValueError):
    """A label file that cannot be trained on; the message names the file and the line."""


@dataclass(frozen=True)
class Example:
    id: str
    messages: list[dict[str, Any]]
    teacher: str
    # The teacher's token budget for this request: the student is scored with the same budget, so a
    # teacher answer cut at max_tokens is compared with a student answer cut at the same length.
    max_tokens: int | None
    # False when the teacher was cut off (finish_reason "length"): the student then learns the text
    # but not to end its turn there, or it would learn to stop mid-sentence.
    complete: bool = True


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _jsonl(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    out = []
    for n, raw in enumerate(Path(path).read_text().splitlines(), 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except ValueError as e:
            raise LabelError(f"{path}:{n}: not JSON: {e}") from e
        if not isinstance(obj, dict):
            raise LabelError(f"{path}:{n}: not a JSON object")
        out.append((n, obj))
    return out


def _max_tokens(request: Any) -> int | None:
    if not isinstance(request, dict):
        return None
    v = request.get("max_completion_tokens") or request.get("max_tokens")
    return int(v) if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


def _messages(request: Any, where: str) -> list[dict[str, Any]]:
    msgs = request.get("messages") if isinstance(request, dict) else None
    if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
        raise LabelError(f"{where}: no chat messages (a student is trained on chat requests)")
    return msgs


def _unique(examples: list[Example], path: str | Path) -> list[Example]:
    seen: set[str] = set()
    for ex in examples:
        if ex.id in seen:  # the split and the manifest name examples by id: two would be ambiguous
            raise LabelError(f"{path}: id {ex.id!r} appears twice")
        seen.add(ex.id)
    return examples


def read_labels(path: str | Path) -> list[Example]:
    """The file `llmserve students label` writes: {"id", "request": {"messages", ...}, "teacher", ...}."""
    examples = []
    for n, obj in _jsonl(path):
        where = f"{path}:{n}"
        if not isinstance(obj.get("id"), str) or not isinstance(obj.get("teacher"), str):
            raise LabelError(f"{where}: a label needs a string id and a string teacher answer")
        request = obj.get("request")
        examples.append(Example(obj["id"], _messages(request, where), obj["teacher"], _max_tokens(request),
                                obj.get("finish_reason") != "length"))
    return _unique(examples, path)


def read_batch(output: str | Path, input_file: str | Path) -> tuple[list[Example], int]:
    """Labels from a teacher batch: its output file (OpenAI batch output lines: custom_id,
    response.body.choices[0]) paired by custom_id with its input file (the prompts). Returns the
    examples and how many output lines were skipped (failed lines, empty or tool-call answers)."""
    from serve.policies.cascade import choice_text

    requests: dict[str, dict[str, Any]] = {}
    for n, obj in _jsonl(input_file):
        if isinstance(obj.get("custom_id"), str) and isinstance(obj.get("body"), dict):
            requests[obj["custom_id"]] = obj["body"]
        else:
            raise LabelError(f"{input_file}:{n}: a batch input line needs custom_id and body")
    examples, skipped = [], 0
    for n, obj in _jsonl(output):
        cid = obj.get("custom_id")
        if cid not in requests:
            raise LabelError(f"{output}:{n}: custom_id {cid!r} is not in {input_file}: is this the batch's input?")
        response = obj.get("response") or {}
        body = response.get("body") if response.get("status_code") == 200 else None
        choices = body.get("choices") if isinstance(body, dict) else None
        choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else None
        text = choice_text(choice) if choice else ""
        if not text:  # a failed line or an answer without text teaches nothing
            skipped += 1
            continue
        req = requests[cid]
        examples.append(Example(cid, _messages(req, f"{input_file} ({cid})"), text, _max_tokens(req),
                                choice.get("finish_reason") != "length" if choice else True))
    return _unique(examples, output), skipped


def held_out(example_id: str, holdout: float, seed: int) -> bool:
    """Whether an id is held out: a hash of (seed, id), so an example's side does not move when
    others are added, removed or reordered, and another seed draws another split."""
    u = int.from_bytes(hashlib.sha256(f"{seed}\0{example_id}".encode()).digest()[:8], "big") / 2**64
    return u < holdout


def split(examples: list[Example], holdout: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(training, held-out) examples, each in file order."""
    train = [ex for ex in examples if not held_out(ex.id, holdout, seed)]
    held = [ex for ex in examples if held_out(ex.id, holdout, seed)]
    return train, held


def time_split(log: Path, earlier: Path, later: Path, share: float) -> tuple[int, int]:
    """The log's first `share` of requests (what the cache and the labels are made from) to
    `earlier`, the rest (what the report replays) to `later`: every figure of the report is measured
    on traffic that came after what the route learnt from. (earlier, later) counts."""
    lines = [x for x in log.read_text().splitlines() if x.strip()]
    cut = int(len(lines) * share)
    earlier.write_text("".join(x + "\n" for x in lines[:cut]))
    later.write_text("".join(x + "\n" for x in lines[cut:]))
    return cut, len(lines) - cut


def tail_log(log: Path, tail: Path, top: int, route: str) -> tuple[int, float]:
    """Write the log's requests outside its `top` head queries to `tail`; (distinct head, coverage)."""
    from serve.cache.pipeline import read_log, select_head
    from serve.policies.cache_key import cache_key, endpoint_for

    with log.open("rb") as f:
        requests = read_log(f)
    head, total = select_head(requests, route, top)
    keys = {q.key for q in head}
    rest = [r for r in requests if cache_key(route, endpoint_for(r), r) not in keys]
    tail.write_text("".join(json.dumps(r) + "\n" for r in rest))
    return len(head), sum(q.count for q in head) / max(total, 1)


def held_out_labels(labels: Path, manifest: dict[str, Any], out: Path) -> int:
    """The labels `students train` held out (by id, from its manifest): eval and calibration use
    only these, so no score is measured on what the student was trained on."""
    held = set(manifest["split"]["held_out"])
    rows = [x for x in labels.read_text().splitlines() if x.strip() and json.loads(x)["id"] in held]
    out.write_text("".join(r + "\n" for r in rows))
    return len(rows)

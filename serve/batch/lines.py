"""Batch input lines and output records in OpenAI's formats. An input file is read a line at a
time (`read_lines`), never whole: it may be as large as batch.max_upload_bytes."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

WINDOW = re.compile(r"[1-9][0-9]{0,3}h")  # "24h"; [0-9], not \d, which matches every script's digits
CHUNK = 1024 * 1024
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses")


@dataclass(frozen=True)
class Line:
    line_no: int
    custom_id: str
    url: str
    body: dict[str, Any]


@dataclass(frozen=True)
class BadLine:
    line_no: int
    custom_id: str
    message: str


def window_hours(window: object) -> int | None:
    """Hours of a `completion_window` such as "24h"; None if it is not one. ASCII digits only:
    str.isdigit() also accepts "²", which int() then refuses."""
    if not isinstance(window, str) or not WINDOW.fullmatch(window):
        return None
    return int(window[:-1])


def loads(raw: bytes | str) -> Any:
    """json.loads, with nesting too deep for Python's parser as a ValueError like any bad JSON
    (json raises RecursionError for it)."""
    try:
        return json.loads(raw)
    except RecursionError as e:
        raise ValueError("the JSON is nested too deeply") from e


def parse_lines(lines: Iterable[bytes | TooLong], endpoint: str) -> Iterator[Line | BadLine]:
    """Every non-blank line becomes a Line or a BadLine, one at a time (a file is never held
    whole); a bad line never stops the others. An item of `lines` that is a TooLong stands for a
    line cut off at the reader's limit (read_lines)."""
    seen: set[str] = set()
    for no, raw in enumerate(lines):
        if isinstance(raw, TooLong):
            yield BadLine(no, f"line-{no}", f"line {no + 1} is longer than {raw.limit} bytes")
            continue
        if not raw.strip():
            continue
        try:
            obj = loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            yield BadLine(no, f"line-{no}", f"line {no + 1} is not valid JSON: {e}")
            continue
        if not isinstance(obj, dict):
            yield BadLine(no, f"line-{no}", f"line {no + 1} must be a JSON object")
            continue
        cid = obj.get("custom_id")
        if not isinstance(cid, str) or not cid:
            yield BadLine(no, f"line-{no}", f"line {no + 1} has no string custom_id")
            continue
        if cid in seen:
            yield BadLine(no, cid, f"custom_id {cid!r} is used twice")
            continue
        seen.add(cid)
        if obj.get("method", "POST") != "POST":
            yield BadLine(no, cid, "method must be POST")
        elif obj.get("url") != endpoint:
            yield BadLine(no, cid, f"url must be the batch's endpoint {endpoint}, not {obj.get('url')!r}")
        elif not isinstance(obj.get("body"), dict):
            yield BadLine(no, cid, "body must be a JSON object")
        else:
            yield Line(no, cid, endpoint, obj["body"])


def parse(content: bytes, endpoint: str) -> list[Line | BadLine]:
    return list(parse_lines(content.splitlines(), endpoint))


@dataclass(frozen=True)
class TooLong:
    """Stands in for a line longer than the reader's limit (its bytes were skipped, not kept)."""

    limit: int


def read_lines(f: BinaryIO, max_line_bytes: int) -> Iterator[bytes | TooLong]:
    """The lines of `f`, read one at a time with at most `max_line_bytes` of a line in memory:
    a longer line is skipped to its end and stands as a TooLong."""
    while raw := f.readline(max_line_bytes + 1):
        if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
            while (rest := f.readline(CHUNK)) and not rest.endswith(b"\n"):
                pass
            yield TooLong(max_line_bytes)
        else:
            yield raw


def count_lines(f: BinaryIO, max_line_bytes: int) -> int:
    """How many items parse_lines makes of `f` (its non-blank lines), reading it once."""
    return sum(1 for raw in read_lines(f, max_line_bytes) if isinstance(raw, TooLong) or raw.strip())


def output_record(custom_id: str, status: int, body: dict[str, Any]) -> dict[str, Any]:
    rid = f"batch_req_{uuid.uuid4().hex[:24]}"
    if 200 <= status < 300:
        return {"id": rid, "custom_id": custom_id,
                "response": {"status_code": status, "request_id": rid, "body": body}, "error": None}
    err = body.get("error", body) if isinstance(body, dict) else {"message": str(body)}
    return {"id": rid, "custom_id": custom_id, "response": {"status_code": status, "request_id": rid, "body": body},
            "error": {"code": err.get("code") or "request_failed", "message": err.get("message", "")}}


def bad_line_record(bad: BadLine) -> dict[str, Any]:
    return {"id": f"batch_req_{uuid.uuid4().hex[:24]}", "custom_id": bad.custom_id, "response": None,
            "error": {"code": "invalid_request", "message": bad.message, "line": bad.line_no + 1}}


def jsonl(records: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(r, separators=(",", ":")).encode() + b"\n" for r in records)

"""Batch input lines and output records in OpenAI's formats (pure)."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

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


def parse(content: bytes, endpoint: str) -> list[Line | BadLine]:
    """Every non-blank line becomes a Line or a BadLine; a bad line never stops the others."""
    out: list[Line | BadLine] = []
    seen: set[str] = set()
    for no, raw in enumerate(content.splitlines()):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            out.append(BadLine(no, f"line-{no}", f"line {no + 1} is not valid JSON: {e}"))
            continue
        if not isinstance(obj, dict):
            out.append(BadLine(no, f"line-{no}", f"line {no + 1} must be a JSON object"))
            continue
        cid = obj.get("custom_id")
        if not isinstance(cid, str) or not cid:
            out.append(BadLine(no, f"line-{no}", f"line {no + 1} has no string custom_id"))
            continue
        if cid in seen:
            out.append(BadLine(no, cid, f"custom_id {cid!r} is used twice"))
            continue
        seen.add(cid)
        if obj.get("method", "POST") != "POST":
            out.append(BadLine(no, cid, "method must be POST"))
        elif obj.get("url") != endpoint:
            out.append(BadLine(no, cid, f"url must be the batch's endpoint {endpoint}, not {obj.get('url')!r}"))
        elif not isinstance(obj.get("body"), dict):
            out.append(BadLine(no, cid, "body must be a JSON object"))
        else:
            out.append(Line(no, cid, endpoint, obj["body"]))
    return out


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

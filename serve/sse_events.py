"""One reader for server-sent events (`text/event-stream`), for every side that reads a stream.

The gateway (relaying an engine's stream, billing its usage chunk, caching a whole answer), the
benches (time to first token) and the Locust file all cut the same byte stream into events. Each
used to do it with its own `split(b"\\n\\n")` loop, and each had its own gaps (CRLF, an event split
across two reads, multi-line `data:`, `event:` names). This module is the one loop, stdlib only, so
bench/ and Locust import it without pulling in the gateway, Ray or vLLM.

Per the WHATWG SSE spec: an event ends at a blank line (`\\n\\n`, `\\r\\n\\r\\n` or mixed); `data:`
lines join with `\\n`; one space after the colon is dropped; lines starting with `:` are comments;
`id:` and `retry:` are ignored (nothing here reconnects). A bare `\\r` line ending is not supported:
neither vLLM nor any server we read uses it, and it would make a chunk ending in `\\r` ambiguous.

Speed: the parser runs per chunk on the gateway's relay path, so it never parses JSON by itself.
An `Event` carries its data bytes and its raw bytes as received (to forward untouched); a caller
tests cheaply first (`ev.event == "response.completed"`, `b'"usage"' in ev.data`) and calls
`ev.json()` only on the events it needs.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

DONE_DATA = b"[DONE]"
DONE = b"data: [DONE]\n\n"  # the OpenAI stream's last event, as vLLM writes it

# An object-valued `usage` (vLLM sends `"usage":null` in chunks that carry none).
_USAGE = re.compile(rb'"usage":\s*\{')
# Bytes to keep rescanning at the end of a buffer with no blank line yet (`\r\n\r` of `\r\n\r\n`).
_TAIL = 3


@dataclass(slots=True)  # not frozen: a frozen dataclass costs 3x to build, once per event
class Event:
    """One dispatched event: `data` is the `data:` lines joined by `\\n` (no trailing newline),
    `event` the `event:` field or None, `raw` the event's bytes as received, blank line included."""

    data: bytes
    event: str | None = None
    raw: bytes = b""

    @property
    def done(self) -> bool:
        """The OpenAI end-of-stream marker, `data: [DONE]`."""
        return self.data == DONE_DATA

    @property
    def has_usage(self) -> bool:
        """Whether the data holds a `usage` object, found without parsing the JSON (the gateway
        bills from the one chunk that does and relays every other untouched)."""
        return _USAGE.search(self.data) is not None

    def json(self) -> dict[str, Any] | None:
        """The data as a JSON object; None for `[DONE]`. Raises ValueError when the data is not
        JSON or not an object: a broken stream is the caller's to judge (fail, skip, don't cache)."""
        if self.data == DONE_DATA:
            return None
        obj = json.loads(self.data)
        if not isinstance(obj, dict):
            raise ValueError(f"SSE data is not a JSON object: {self.data[:80]!r}")
        return obj


def _blank(buf: bytes, pos: int) -> tuple[int, int] | None:
    """The first blank line (two line endings in a row, each `\\n` or `\\r\\n`) at or after `pos`:
    (where the block before it ends, where the next one starts); a `\\r` left at the block's end is
    a line ending that `parse_block` drops. A loop over `find`, not a regex: `\\r?\\n\\r?\\n` has no
    literal prefix to search for, and was 5x slower per event."""
    find = buf.find
    i = find(b"\n", pos)
    while i != -1:
        j = i + 1
        if buf[j:j + 1] == b"\r":
            j += 1
        if buf[j:j + 1] == b"\n":
            return i, j + 1
        i = find(b"\n", i + 1)
    return None


def parse_block(block: bytes, raw: bytes = b"") -> Event | None:
    """The event one block (the text between blank lines) holds, or None when it has no `data:`
    field (a comment or keep-alive), which the spec says is not dispatched."""
    if block.startswith(b"data: ") and b"\n" not in block and b"\r" not in block:
        return Event(block[6:], None, raw or block)  # fast path: vLLM's one-line chat chunk
    data: list[bytes] = []
    name: str | None = None
    for line in block.splitlines():
        if line.startswith(b":"):
            continue
        field, _, value = line.partition(b":")
        value = value.removeprefix(b" ")
        if field == b"data":
            data.append(value)
        elif field == b"event":
            name = value.decode(errors="replace")
    if not data:
        return None
    return Event(b"\n".join(data), name, raw or block)


class EventParser:
    """Incremental parser: `feed` any byte chunks, get back the events they complete.

    An event split across reads waits in the buffer until its blank line arrives; `pending` is
    what is buffered (a relay that ends the stream can forward it as is). With `keep_empty`, blocks
    without data (comments, keep-alives) come back too, as events with empty data, so a relay that
    re-emits `raw` loses no byte.
    """

    __slots__ = ("_buf", "_scan", "keep_empty")

    def __init__(self, keep_empty: bool = False) -> None:
        self._buf = b""
        self._scan = 0  # where the next search for a blank line starts (never rescans a long event)
        self.keep_empty = keep_empty

    @property
    def pending(self) -> bytes:
        return self._buf

    def feed(self, chunk: bytes | str) -> list[Event]:
        if isinstance(chunk, str):
            chunk = chunk.encode()
        if not self._buf and chunk.startswith(b"data: ") and chunk.find(b"\n") == len(chunk) - 2 \
                and chunk.endswith(b"\n\n") and b"\r" not in chunk:
            return [Event(chunk[6:-2], None, chunk)]  # the common read: one whole one-line event
        buf = self._buf + chunk if self._buf else chunk
        out: list[Event] = []
        start, pos = 0, self._scan
        lf_only = b"\r" not in buf  # then a blank line is two LFs, found by one C search
        while True:
            if lf_only:
                stop = buf.find(b"\n\n", pos)
                if stop == -1:
                    break
                end = stop + 2
            elif (m := _blank(buf, pos)) is not None:
                stop, end = m
            else:
                break
            ev = parse_block(buf[start:stop], buf[start:end])
            if ev is not None:
                out.append(ev)
            elif self.keep_empty:
                out.append(Event(b"", None, buf[start:end]))
            start = pos = end
        self._buf = buf[start:]
        self._scan = max(0, len(self._buf) - _TAIL)
        return out


def iter_events(chunks: Iterable[bytes | str], keep_empty: bool = False) -> Iterator[Event]:
    """Events from byte chunks of any size (httpx `iter_bytes()`, requests `iter_content()`)."""
    parser = EventParser(keep_empty)
    for chunk in chunks:
        yield from parser.feed(chunk)


async def aiter_events(chunks: AsyncIterable[bytes], keep_empty: bool = False) -> AsyncIterator[Event]:
    """Events from async byte chunks (httpx `aiter_bytes()`, aiohttp `content.iter_any()`)."""
    parser = EventParser(keep_empty)
    async for chunk in chunks:
        for ev in parser.feed(chunk):
            yield ev


def iter_line_events(lines: Iterable[bytes | str]) -> Iterator[Event]:
    """Events from lines with their endings stripped (httpx `iter_lines()`): an empty line ends an
    event, as a blank line does in the byte stream."""
    parser = EventParser()
    for line in lines:
        yield from parser.feed((line.encode() if isinstance(line, str) else line) + b"\n")


def encode(data: bytes | str, event: str | None = None) -> bytes:
    """One event on the wire. `data` must not contain a newline (JSON from `json.dumps` does not)."""
    body = data.encode() if isinstance(data, str) else data
    head = b"event: " + event.encode() + b"\n" if event is not None else b""
    return head + b"data: " + body + b"\n\n"

"""The one SSE reader (serve/sse_events.py): events come out whole however the bytes are cut."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serve.sse_events import (
    DONE,
    Event,
    EventParser,
    aiter_events,
    encode,
    iter_events,
    iter_line_events,
    parse_block,
)

CHUNK = {"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "hi"}}]}
USAGE = {"id": "c", "object": "chat.completion.chunk", "choices": [],
         "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}
# vLLM's chat stream with a comment in it, a Responses-style named event in CRLF, [DONE], and a
# multi-line event.
STREAM = (encode(json.dumps(CHUNK)) + b": ping\n\n" + encode(json.dumps(USAGE))
          + b"event: response.completed\r\ndata: {\"type\": \"response.completed\"}\r\n\r\n"
          + DONE + b"data: line one\ndata:line two\n\n")
EXPECTED = [
    (json.dumps(CHUNK).encode(), None),
    (json.dumps(USAGE).encode(), None),
    (b'{"type": "response.completed"}', "response.completed"),
    (b"[DONE]", None),
    (b"line one\nline two", None),
]


def _parse(chunks: list[bytes], keep_empty: bool = False) -> list[Event]:
    parser = EventParser(keep_empty)
    return [ev for c in chunks for ev in parser.feed(c)]


def _cut(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def test_whole_stream_in_one_chunk():
    events = _parse([STREAM])
    assert [(e.data, e.event) for e in events] == EXPECTED
    assert events[0].json() == CHUNK and events[1].json() == USAGE
    assert [e.done for e in events] == [False, False, False, True, False]
    assert events[3].json() is None


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=10_000), max_size=40))
def test_any_chunking_gives_the_same_events(cuts):
    chunks = _cut(STREAM, cuts)
    assert [(e.data, e.event) for e in _parse(chunks)] == EXPECTED
    # raw bytes of every block, comments included, are the stream again: a relay loses nothing.
    assert b"".join(e.raw for e in _parse(chunks, keep_empty=True)) == STREAM


def test_an_event_split_across_reads_waits_for_its_blank_line():
    parser = EventParser()
    assert parser.feed(b'data: {"a"') == []
    assert parser.feed(b": 1}\r\n\r") == [] and parser.pending == b'data: {"a": 1}\r\n\r'
    [ev] = parser.feed(b"\ndata: [DO")
    assert ev.json() == {"a": 1} and ev.raw == b'data: {"a": 1}\r\n\r\n'
    assert parser.pending == b"data: [DO"


def test_fields_per_spec():
    ev = parse_block(b"event: x\nid: 7\nretry: 10\n: note\ndata:  two spaces\ndata\ndata: end")
    assert ev is not None and ev.event == "x" and ev.data == b" two spaces\n\nend"
    assert parse_block(b": keep-alive") is None and parse_block(b"event: only-a-name") is None


def test_usage_is_found_without_parsing_json():
    [chunk, usage, done] = _parse([encode(json.dumps(CHUNK)), encode(json.dumps({**CHUNK, "usage": None})),
                                   encode(json.dumps(USAGE))])
    assert (chunk.has_usage, usage.has_usage, done.has_usage) == (False, False, True)


def test_malformed_or_non_object_json_raises():
    with pytest.raises(ValueError):
        Event(b'{"a": ').json()
    with pytest.raises(ValueError):
        Event(b"[1, 2]").json()


def test_sync_async_and_line_helpers_agree():
    chunks = _cut(STREAM, [5, 17, 100, 101, 230])
    sync = [(e.data, e.event) for e in iter_events(chunks)]

    async def agen() -> AsyncIterator[bytes]:
        for c in chunks:
            yield c

    async def collect() -> list[tuple[bytes, str | None]]:
        return [(e.data, e.event) async for e in aiter_events(agen())]

    lines = STREAM.decode().splitlines()  # endings stripped, as httpx's iter_lines gives them
    assert sync == asyncio.run(collect()) == [(e.data, e.event) for e in iter_line_events(lines)] == EXPECTED


def test_encode_names_the_event():
    assert encode("{}", "response.created") == b"event: response.created\ndata: {}\n\n"
    assert encode(b"[DONE]") == DONE

"""One request-body limit for every endpoint, enforced while the body arrives.

A declared Content-Length over the limit gets 413 before a byte is read. Otherwise the bytes are
counted as the app reads them: the read that passes the limit raises instead of returning, so no
app ever holds more than the limit plus one chunk, and a chunked body (no Content-Length) is cut
off the same way. Whatever the app answers after that (an error page, a 400 for a half body) is
replaced by the same 413; only a response already under way cannot be taken back.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from serve.gateway.errors import APIError

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Any]
Send = Callable[[Message], Any]
ASGIApp = Callable[[Scope, Receive, Send], Any]


def too_large(limit: int) -> APIError:
    return APIError(413, f"Request body is larger than {limit} bytes.", code="request_too_large")


class BodyLimit:
    """ASGI middleware: `limit_for(path)` is the largest body, in bytes, that `path` accepts."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[str], int]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            await _answer_413(send, limit)
            return
        if declared.isdigit() and b"transfer-encoding" not in headers:
            # A declared length within the limit: the server hands the app that many bytes and no
            # more (HTTP/1.1 framing; its parser refuses a body framed both ways), so there is
            # nothing to count, and no wrapper on each message the app sends: a streamed answer
            # sends one a chunk (issue 27).
            await self.app(scope, receive, send)
            return

        received = 0
        over = False
        started = False  # the app's response has gone out (its start message was passed on)

        async def limited_receive() -> Message:
            nonlocal received, over
            if over:  # an app that caught the first refusal still gets no more of the body
                raise too_large(limit)
            message: Message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    over = True
                    raise too_large(limit)
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if over and not started:
                return  # the app's answer to a cut-off body; ours replaces it below
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not (over and not started):
                raise
            # The app failed on the cut-off body (the refusal itself, most likely): answered below.
        if over and not started:
            await _answer_413(send, limit)


async def _answer_413(send: Send, limit: int) -> None:
    e = too_large(limit)
    body = json.dumps(e.body()).encode()
    # Connection: close, because the rest of the body was never read: the connection cannot
    # carry another request, and the client should stop sending.
    await send({"type": "http.response.start", "status": 413, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})

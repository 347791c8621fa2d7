"""BodyLimit: one body limit per path, enforced before and while the body is read.

httpx's ASGITransport hands a generator body to the app one chunk per `receive` (as a server does
with a chunked upload), so these tests see how much of a body the app got before the cut."""

import asyncio

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from serve.gateway.errors import APIError
from serve.gateway.limits import BodyLimit

CHUNK = 1000
LIMIT = 10_000


class Seen:
    def __init__(self) -> None:
        self.calls = 0
        self.bytes = 0
        self.chunks_sent = 0


def make_app(seen: Seen, catch: bool = False) -> BodyLimit:
    async def echo(request: Request) -> Response:
        seen.calls += 1
        body = b""
        try:
            async for part in request.stream():
                body += part
                seen.bytes = len(body)
        except APIError:
            if not catch:
                raise
            return JSONResponse({"error": "half a body"}, 400)  # an app that answers anyway
        return JSONResponse({"bytes": len(body), "tail": body[-5:].decode()})

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, APIError)
        return JSONResponse(exc.body(), exc.status)

    app = Starlette(routes=[Route("/v1/files", echo, methods=["POST"]), Route("/v1/chat", echo, methods=["POST"])],
                    exception_handlers={APIError: api_error})
    return BodyLimit(app, lambda path: LIMIT * 10 if path == "/v1/files" else LIMIT)


def post(app, path, content, headers=None) -> httpx.Response:
    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return await client.post(path, content=content, headers=headers)

    return asyncio.run(go())


def chunks(seen: Seen, total: int):
    async def gen():
        for i in range(0, total, CHUNK):
            seen.chunks_sent += 1
            yield b"x" * min(CHUNK, total - i)

    return gen()


def assert_413(r: httpx.Response) -> None:
    assert r.status_code == 413
    assert r.json()["error"] == {"message": f"Request body is larger than {LIMIT} bytes.",
                                 "type": "invalid_request_error", "param": None, "code": "request_too_large"}
    assert r.headers["connection"] == "close"


def test_declared_length_over_limit_is_refused_unread():
    seen = Seen()
    r = post(make_app(seen), "/v1/chat", chunks(seen, LIMIT * 3), headers={"content-length": str(LIMIT * 3)})
    assert_413(r)
    assert seen.calls == 0 and seen.chunks_sent == 0


def test_chunked_body_is_cut_off_at_the_limit():
    seen = Seen()
    r = post(make_app(seen), "/v1/chat", chunks(seen, LIMIT * 50))
    assert "content-length" not in r.request.headers  # really sent chunked
    assert_413(r)
    assert seen.calls == 1 and seen.bytes <= LIMIT  # the app never got past the limit
    assert seen.chunks_sent <= LIMIT // CHUNK + 2  # and the rest was never even pulled from the client


def test_answer_of_an_app_that_swallows_the_refusal_is_replaced():
    seen = Seen()
    assert_413(post(make_app(seen, catch=True), "/v1/chat", chunks(seen, LIMIT + 1)))


def test_bodies_up_to_the_limit_pass_intact():
    seen = Seen()
    body = b"y" * (LIMIT - 5) + b"tail!"
    r = post(make_app(seen), "/v1/chat", body)
    assert r.status_code == 200 and r.json() == {"bytes": LIMIT, "tail": "tail!"}
    r = post(make_app(seen), "/v1/chat", chunks(seen, LIMIT))
    assert r.status_code == 200 and r.json()["bytes"] == LIMIT


def test_limit_is_per_path():
    seen = Seen()
    r = post(make_app(seen), "/v1/files", chunks(seen, LIMIT * 5))
    assert r.status_code == 200 and r.json()["bytes"] == LIMIT * 5
    assert post(make_app(seen), "/v1/files", chunks(seen, LIMIT * 10 + 1)).status_code == 413


def test_other_scopes_pass_through():
    got = []

    async def app(scope, receive, send):
        got.append(scope["type"])

    asyncio.run(BodyLimit(app, lambda p: 1)({"type": "lifespan"}, None, None))
    assert got == ["lifespan"]


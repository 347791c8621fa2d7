"""Who may use an engine replica directly: holders of the per-deployment engine secret.

Each replica serves vLLM's whole OpenAI app on a port of its own (serve/engine/direct.py). Open,
that port lets anything that reaches it skip the gateway's keys and limits, and load a LoRA adapter
from any path. So every request to it must carry ``Authorization: Bearer <engine secret>``, a
secret only the gateways and the batch worker hold. (Adapters a replica loads on its own from the
runtime registry must lie under the configured adapter roots: serve/contract/paths.py.)

The secret travels as an environment variable, never in the YAML config (which the chart turns
into serveConfigV2, readable by anyone who can read the RayService).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

ENV = "LLMSERVE_ENGINE_SECRET"

# Paths served without the secret: the probe and our read-only engine counters. Everything else is
# refused, including routes vLLM's own --api-key leaves open (it guards only /v1, /v2, /inference
# and /cohere, so /invocations would run the model and SageMaker's /adapters would load a LoRA).
OPEN_PATHS = frozenset({"/health", "/llmserve/stats"})

# Ray's worker start expands `$VAR` in runtime_env env_vars (ray._private.utils.update_envs), so a
# secret with `$` would reach engines changed; header syntax rules out spaces and newlines. 16+
# characters keeps a hand-made secret from being guessable.
_SECRET_RE = re.compile(r"[A-Za-z0-9._~+/=-]{16,}")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def engine_secret() -> str | None:
    """The engine secret of this process (None when unset); a malformed one is an error."""
    value = os.environ.get(ENV) or None
    if value is not None and not _SECRET_RE.fullmatch(value):
        raise ValueError(f"{ENV} must be 16 or more characters from A-Z a-z 0-9 . _ ~ + / = -")
    return value


def ensure_engine_secret() -> str:
    """The engine secret, generated into this process's environment if it has none yet.

    Called before Ray starts: a Ray cluster started from this process (`llmserve run`) hands its
    environment to every worker, so engines, the batch worker and the in-process gateway share it."""
    value = engine_secret()
    if value is None:
        value = secrets.token_urlsafe(32)
        os.environ[ENV] = value
    return value


class RequireEngineSecret:
    """ASGI middleware: 401 for any HTTP or WebSocket request without the engine secret as a Bearer
    token, except OPEN_PATHS. Deny by default, so a route a vLLM upgrade adds is closed too."""

    def __init__(self, app: ASGIApp, secret: str, open_paths: Iterable[str] = OPEN_PATHS) -> None:
        self.app = app
        self._digest = hashlib.sha256(secret.encode()).digest()
        self._open = frozenset(open_paths)

    def authorized(self, scope: Scope) -> bool:
        header = next((v for k, v in scope.get("headers", ()) if k == b"authorization"), b"")
        scheme, _, token = header.decode("latin-1").partition(" ")
        if scheme.lower() != "bearer":
            return False
        # Compare digests in constant time: the token's length must not leak through timing either.
        return hmac.compare_digest(hashlib.sha256(token.strip().encode("latin-1")).digest(), self._digest)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"] in self._open or self.authorized(scope):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})  # policy violation
            return
        body = json.dumps({"error": {"message": "this engine serves only llmserve's gateways (engine secret "
                                                "missing or wrong)", "type": "invalid_request_error",
                                     "param": None, "code": "invalid_api_key"}}).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

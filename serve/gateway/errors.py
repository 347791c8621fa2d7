"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}`` with the right status.

The official SDK maps the status to an exception class and reads these four fields; engines (vLLM)
answer with the same keys but their own ``type`` names and numeric codes, so ``normalize`` rewrites
those into the values OpenAI itself sends.
"""

from __future__ import annotations

import json
from typing import Any

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "invalid_request_error",  # what OpenAI sends with code invalid_api_key
    403: "permission_error",
    404: "invalid_request_error",
    408: "timeout_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "server_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


class APIError(Exception):
    """Raised anywhere in the gateway; the app turns it into the HTTP answer."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, param=self.param, code=self.code)


def error_type(status: int) -> str:
    if status in _TYPE_BY_STATUS:
        return _TYPE_BY_STATUS[status]
    return "invalid_request_error" if 400 <= status < 500 else "server_error"


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}


def model_not_found(model: str) -> APIError:
    return APIError(
        404, f"The model `{model}` does not exist or you do not have access to it.",
        param="model", code="model_not_found",
    )


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def _code_for(status: int, message: str, code: Any) -> str | None:
    if "maximum context length" in message or ("context length" in message and "exceed" in message):
        return "context_length_exceeded"
    if isinstance(code, str) and code:
        return code
    return None


def normalize(status: int, raw: bytes) -> bytes:
    """Rewrite an engine's error body into OpenAI's shape, keeping its message and param.

    Anything that does not parse (an HTML 502 from a dying proxy, say) becomes a message too, so a
    client never has to deal with a non-JSON error."""
    try:
        data = json.loads(raw)
        err = data.get("error", data) if isinstance(data, dict) else {}
        if not isinstance(err, dict):
            err = {"message": str(err)}
    except (ValueError, UnicodeDecodeError):
        err = {"message": raw.decode("utf-8", "replace").strip()[:500] or f"engine answered {status}"}
    message = str(err.get("message") or err.get("detail") or f"engine answered {status}")
    param = err.get("param")
    if param == "input_tokens":  # vLLM's name; OpenAI points at the prompt itself
        param = "messages"
    body = error_body(
        status, message, param=param if isinstance(param, str) else None,
        code=_code_for(status, message, err.get("code")),
    )
    return json.dumps(body).encode()

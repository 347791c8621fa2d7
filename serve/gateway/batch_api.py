"""/v1/files and /v1/batches, in the shapes the official `openai` SDK reads.

Every file and batch belongs to the key that created it (its `name`; "anonymous" with auth off).
Another key gets exactly the answer an unknown id gets, so ids do not even show that they exist.
An admin key sees every owner's objects only when it asks with `?all_owners=true`, so a script
run with an admin key does not act on other tenants' batches by accident.

Every request spends one of the key's requests per minute, and a key holds at most its storage
quota of files and results (400 storage_quota_exceeded past it); the batch worker purges files
and batches past batch.retention_s, and a file shows when (`expires_at`).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from serve.batch.lines import ENDPOINTS, loads, window_hours
from serve.batch.store import ANONYMOUS, BatchStore, EmptyFile, FileTooLarge, QuotaExceeded, new_id
from serve.batch.worker import new_batch
from serve.config import ApiKey, AuthSpec, BatchSpec
from serve.gateway.errors import APIError, bad_request
from serve.gateway.ratelimit import RateLimiter

PURPOSES = {"batch", "batch_output", "fine-tune", "assistants", "user_data", "evals"}
LIMIT = re.compile(r"[0-9]{1,6}")


@dataclass(frozen=True)
class Caller:
    owner: str  # who new objects belong to
    sees: str | None  # whose objects reads find; None: every owner's (an admin who asked)
    quota: int  # bytes of files and results the owner may hold


Authenticate = Callable[[Request], ApiKey | None]  # the caller's key; raises APIError(401)
Handler = Callable[[Request, Caller], Awaitable[Response]]


def _not_found(kind: str, oid: str) -> APIError:
    return APIError(404, f"No such {kind}: '{oid}'", param="id", code=f"{kind}_not_found")


def _page(items: list[dict[str, Any]], limit: int) -> dict[str, Any]:
    page = items[:limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit}


def _limit(request: Request, default: int) -> int:
    raw = request.query_params.get("limit", str(default))
    # ASCII digits only: str.isdigit() also accepts "²", which int() then refuses (a 500).
    if not LIMIT.fullmatch(raw) or not 1 <= int(raw) <= 10_000:
        raise bad_request("`limit` must be an integer between 1 and 10000.", param="limit")
    return int(raw)


def _metadata(meta: object) -> dict[str, str] | None:
    """OpenAI's metadata: at most 16 pairs, keys up to 64 characters, string values up to 512."""
    if meta is None:
        return None
    if not isinstance(meta, dict) or len(meta) > 16 or not all(
            isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512 for k, v in meta.items()):
        raise bad_request("`metadata` must be an object of at most 16 string values (keys up to 64 characters, "
                          "values up to 512).", param="metadata")
    return meta


def _quota_error(e: QuotaExceeded) -> APIError:
    # OpenAI answers 400 invalid_request_error for its file storage limit; the code names it.
    return APIError(400, f"You have exceeded your file storage quota of {e.limit} bytes. Delete files you no "
                         "longer need, or upload a smaller file.", param="file", code="storage_quota_exceeded")


def caller(request: Request, key: ApiKey | None, quota: Callable[[str, ApiKey | None], int]) -> Caller:
    owner = key.name if key is not None else ANONYMOUS
    limit = quota(owner, key)
    raw = request.query_params.get("all_owners", "false").lower()
    if raw not in ("true", "1", "false", "0"):
        raise bad_request("`all_owners` must be true or false.", param="all_owners")
    if raw in ("false", "0"):
        return Caller(owner, owner, limit)
    if key is None or not key.admin:
        raise APIError(403, "`all_owners=true` needs an admin key; other keys see only their own files "
                            "and batches.", param="all_owners", code="admin_required")
    return Caller(owner, None, limit)


class BatchAPI:
    """`limiter` with `auth`: every request spends one of the key's requests per minute, the same
    bucket its online requests use (a batch's lines are admitted one by one as its owner, by the
    worker). `quota`: bytes a key may hold, its own storage_bytes or batch.storage_bytes_per_key."""

    def __init__(self, store: BatchStore, authenticate: Authenticate, *, batch: BatchSpec | None = None,
                 auth: AuthSpec | None = None, limiter: RateLimiter | None = None,
                 on_limited: Callable[[str], None] | None = None) -> None:
        self.store = store
        self.authenticate = authenticate
        self.batch = batch or BatchSpec()
        self.max_upload_bytes = self.batch.max_upload_bytes
        self.auth = auth or AuthSpec()
        self.limiter = limiter
        self.on_limited = on_limited

    def quota(self, owner: str, key: ApiKey | None) -> int:
        return key.storage_bytes if key is not None and key.storage_bytes else self.batch.storage_bytes_per_key

    async def admit(self, key: ApiKey | None) -> None:
        """The key's request rate limit, as admission applies it to online requests (429, Retry-After)."""
        rpm = None if key is None else key.requests_per_minute or self.auth.default_requests_per_minute
        if self.limiter is None or key is None or rpm is None:
            return
        verdict = await self.limiter.check(key.name, rpm, None, 0)
        if not verdict.allowed:
            if self.on_limited is not None:
                self.on_limited(key.name)
            raise APIError(429, f"Rate limit reached for requests per minute on key `{key.name}`. "
                                f"Retry after {verdict.headers['Retry-After']}s.",
                           code="rate_limit_exceeded", headers=verdict.headers)

    def _file(self, obj: dict[str, Any]) -> dict[str, Any]:
        """A file as OpenAI shows it, with when the purge will delete it."""
        return {**obj, "expires_at": obj["created_at"] + self.batch.retention_s}

    # ---- files ---------------------------------------------------------------------------------
    async def create_file(self, request: Request, who: Caller) -> Response:
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise bad_request("Upload a file as multipart/form-data with `file` and `purpose`.", param="file")
        # Starlette spools the file part to a temporary file (on disk past 1 MB), never all in memory;
        # the body limit in front of the app has already cut off an upload over the cap.
        try:
            form = await request.form(max_files=1, max_fields=16)
        except HTTPException as e:  # Starlette's answer to a malformed form, in OpenAI's shape
            raise bad_request(f"The multipart form could not be read: {e.detail}", param="file") from e
        try:
            upload, purpose = form.get("file"), form.get("purpose")
            if purpose not in PURPOSES:
                raise bad_request(f"`purpose` must be one of {sorted(PURPOSES)}.", param="purpose")
            if not isinstance(upload, UploadFile):
                raise bad_request("`file` is required.", param="file")
            try:
                obj = await asyncio.to_thread(self.store.put_file_stream, upload.file, upload.filename or "upload",
                                              str(purpose), owner=who.owner, max_bytes=self.max_upload_bytes,
                                              quota=who.quota)
            except FileTooLarge as e:
                raise APIError(413, f"The file is larger than {e.limit} bytes.", param="file",
                               code="request_too_large") from e
            except QuotaExceeded as e:
                raise _quota_error(e) from e
            except EmptyFile as e:
                raise bad_request("The uploaded file is empty.", param="file") from e
        finally:
            await form.close()
        return JSONResponse(self._file(obj))

    async def list_files(self, request: Request, who: Caller) -> Response:
        limit = _limit(request, 10_000)
        items = await asyncio.to_thread(self.store.list_files, owner=who.sees,
                                        purpose=request.query_params.get("purpose"), limit=limit + 1,
                                        after=request.query_params.get("after"))
        return JSONResponse(_page([self._file(f) for f in items], limit))

    async def get_file(self, request: Request, who: Caller) -> Response:
        fid = request.path_params["file_id"]
        obj = await asyncio.to_thread(self.store.get_file, fid, owner=who.sees)
        if obj is None:
            raise _not_found("file", fid)
        return JSONResponse(self._file(obj))

    async def file_content(self, request: Request, who: Caller) -> Response:
        fid = request.path_params["file_id"]
        path = await asyncio.to_thread(self.store.file_path, fid, owner=who.sees)
        if path is None:
            raise _not_found("file", fid)
        return FileResponse(path, media_type="application/octet-stream")  # streamed, not read whole

    async def delete_file(self, request: Request, who: Caller) -> Response:
        fid = request.path_params["file_id"]
        if not await asyncio.to_thread(self.store.delete_file, fid, owner=who.sees):
            raise _not_found("file", fid)
        return JSONResponse({"id": fid, "object": "file", "deleted": True})

    # ---- batches -------------------------------------------------------------------------------
    async def create_batch(self, request: Request, who: Caller) -> Response:
        try:
            body = loads(await request.body())
        except (ValueError, UnicodeDecodeError) as e:  # loads: nesting too deep is a ValueError too
            raise bad_request(f"We could not parse the JSON body of your request: {e}") from e
        if not isinstance(body, dict):
            raise bad_request("The request body must be a JSON object.")
        fid, endpoint = body.get("input_file_id"), body.get("endpoint")
        window = body.get("completion_window", "24h")
        if endpoint not in ENDPOINTS:
            raise bad_request(f"`endpoint` must be one of {list(ENDPOINTS)}.", param="endpoint")
        if window_hours(window) is None:
            raise bad_request("`completion_window` must look like '24h'.", param="completion_window")
        # Always the caller's own file (even for an admin): someone else's is as absent as a missing one.
        if not isinstance(fid, str) or await asyncio.to_thread(self.store.get_file, fid, owner=who.owner) is None:
            raise bad_request(f"Input file {fid!r} does not exist.", param="input_file_id")
        meta = _metadata(body.get("metadata"))
        # Its results will count against the quota: a key already over it frees space first.
        if await asyncio.to_thread(self.store.usage, who.owner) >= who.quota:
            raise _quota_error(QuotaExceeded(who.quota))
        batch = new_batch(new_id("batch"), fid, endpoint, window, meta)
        await asyncio.to_thread(self.store.put_batch, batch, owner=who.owner)
        return JSONResponse(batch)

    async def get_batch(self, request: Request, who: Caller) -> Response:
        bid = request.path_params["batch_id"]
        batch = await asyncio.to_thread(self.store.get_batch, bid, owner=who.sees)
        if batch is None:
            raise _not_found("batch", bid)
        return JSONResponse(batch)

    async def list_batches(self, request: Request, who: Caller) -> Response:
        limit = _limit(request, 20)
        items = await asyncio.to_thread(self.store.list_batches, owner=who.sees, limit=limit + 1,
                                        after=request.query_params.get("after"))
        return JSONResponse(_page(items, limit))

    async def cancel_batch(self, request: Request, who: Caller) -> Response:
        bid = request.path_params["batch_id"]
        batch = await asyncio.to_thread(self.store.get_batch, bid, owner=who.sees)
        if batch is None:
            raise _not_found("batch", bid)
        if batch["status"] in ("completed", "failed", "expired", "cancelled"):
            raise APIError(409, f"Cannot cancel a batch with status '{batch['status']}'.", code="invalid_state")
        updated = await asyncio.to_thread(self.store.update_batch, bid, owner=who.sees, status="cancelling",
                                          cancelling_at=int(time.time()))
        if updated is None:
            raise _not_found("batch", bid)
        if updated["status"] != "cancelling":  # it finished meanwhile (another gateway, the worker)
            raise APIError(409, f"Cannot cancel a batch with status '{updated['status']}'.", code="invalid_state")
        return JSONResponse(updated)

    def routes(self) -> list[Route]:
        """APIErrors raised here are answered by the app's APIError handler."""
        def r(path: str, fn: Handler, method: str) -> Route:
            async def endpoint(request: Request) -> Response:
                key = self.authenticate(request)
                await self.admit(key)
                return await fn(request, caller(request, key, self.quota))
            return Route(path, endpoint, methods=[method])

        return [
            r("/v1/files", self.create_file, "POST"), r("/v1/files", self.list_files, "GET"),
            r("/v1/files/{file_id}", self.get_file, "GET"), r("/v1/files/{file_id}", self.delete_file, "DELETE"),
            r("/v1/files/{file_id}/content", self.file_content, "GET"),
            r("/v1/batches", self.create_batch, "POST"), r("/v1/batches", self.list_batches, "GET"),
            r("/v1/batches/{batch_id}", self.get_batch, "GET"),
            r("/v1/batches/{batch_id}/cancel", self.cancel_batch, "POST"),
        ]

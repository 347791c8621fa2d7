"""/v1/files and /v1/batches, in the shapes the official `openai` SDK reads."""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from serve.batch.lines import ENDPOINTS
from serve.batch.store import BatchStore, new_id
from serve.batch.worker import new_batch
from serve.gateway.errors import APIError, bad_request

MAX_FILE_BYTES = 200 * 1024 * 1024
PURPOSES = {"batch", "batch_output", "fine-tune", "assistants", "user_data", "evals"}


def _not_found(kind: str, oid: str) -> APIError:
    return APIError(404, f"No such {kind}: '{oid}'", param="id", code=f"{kind}_not_found")


def _page(items: list[dict[str, Any]], limit: int) -> dict[str, Any]:
    page = items[:limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit}


def _limit(request: Request, default: int) -> int:
    raw = request.query_params.get("limit", str(default))
    if not raw.isdigit() or not 1 <= int(raw) <= 10_000:
        raise bad_request("`limit` must be an integer between 1 and 10000.", param="limit")
    return int(raw)


class BatchAPI:
    def __init__(self, store: BatchStore, authenticate: Any) -> None:
        self.store = store
        self.authenticate = authenticate  # request -> None, raising APIError(401)

    async def _guard(self, request: Request, handler: Any) -> Response:
        try:
            self.authenticate(request)
            return await handler(request)
        except APIError as e:
            return JSONResponse(e.body(), e.status, headers=e.headers)

    # ---- files ---------------------------------------------------------------------------------
    async def create_file(self, request: Request) -> Response:
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise bad_request("Upload a file as multipart/form-data with `file` and `purpose`.", param="file")
        form = await request.form(max_part_size=MAX_FILE_BYTES)
        upload, purpose = form.get("file"), form.get("purpose")
        if purpose not in PURPOSES:
            raise bad_request(f"`purpose` must be one of {sorted(PURPOSES)}.", param="purpose")
        if upload is None or isinstance(upload, str):
            raise bad_request("`file` is required.", param="file")
        content = await upload.read()
        if not content:
            raise bad_request("The uploaded file is empty.", param="file")
        obj = await asyncio.to_thread(self.store.put_file, content, upload.filename or "upload", str(purpose))
        return JSONResponse(obj)

    async def list_files(self, request: Request) -> Response:
        limit = _limit(request, 10_000)
        items = await asyncio.to_thread(self.store.list_files, request.query_params.get("purpose"), limit + 1,
                                        request.query_params.get("after"))
        return JSONResponse(_page(items, limit))

    async def get_file(self, request: Request) -> Response:
        fid = request.path_params["file_id"]
        obj = await asyncio.to_thread(self.store.get_file, fid)
        if obj is None:
            raise _not_found("file", fid)
        return JSONResponse(obj)

    async def file_content(self, request: Request) -> Response:
        fid = request.path_params["file_id"]
        data = await asyncio.to_thread(self.store.file_content, fid)
        if data is None:
            raise _not_found("file", fid)
        return Response(data, media_type="application/octet-stream")

    async def delete_file(self, request: Request) -> Response:
        fid = request.path_params["file_id"]
        if not await asyncio.to_thread(self.store.delete_file, fid):
            raise _not_found("file", fid)
        return JSONResponse({"id": fid, "object": "file", "deleted": True})

    # ---- batches -------------------------------------------------------------------------------
    async def create_batch(self, request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError as e:
            raise bad_request(f"We could not parse the JSON body of your request: {e}") from e
        if not isinstance(body, dict):
            raise bad_request("The request body must be a JSON object.")
        fid, endpoint = body.get("input_file_id"), body.get("endpoint")
        window = body.get("completion_window", "24h")
        if endpoint not in ENDPOINTS:
            raise bad_request(f"`endpoint` must be one of {list(ENDPOINTS)}.", param="endpoint")
        if not isinstance(window, str) or not window.endswith("h") or not window[:-1].isdigit():
            raise bad_request("`completion_window` must look like '24h'.", param="completion_window")
        if not isinstance(fid, str) or await asyncio.to_thread(self.store.get_file, fid) is None:
            raise bad_request(f"Input file {fid!r} does not exist.", param="input_file_id")
        meta = body.get("metadata")
        if meta is not None and not isinstance(meta, dict):
            raise bad_request("`metadata` must be an object.", param="metadata")
        batch = new_batch(new_id("batch"), fid, endpoint, window, meta)
        await asyncio.to_thread(self.store.put_batch, batch)
        return JSONResponse(batch)

    async def get_batch(self, request: Request) -> Response:
        bid = request.path_params["batch_id"]
        batch = await asyncio.to_thread(self.store.get_batch, bid)
        if batch is None:
            raise _not_found("batch", bid)
        return JSONResponse(batch)

    async def list_batches(self, request: Request) -> Response:
        limit = _limit(request, 20)
        items = await asyncio.to_thread(self.store.list_batches, limit + 1, request.query_params.get("after"))
        return JSONResponse(_page(items, limit))

    async def cancel_batch(self, request: Request) -> Response:
        bid = request.path_params["batch_id"]
        batch = await asyncio.to_thread(self.store.get_batch, bid)
        if batch is None:
            raise _not_found("batch", bid)
        if batch["status"] in ("completed", "failed", "expired", "cancelled"):
            raise APIError(409, f"Cannot cancel a batch with status '{batch['status']}'.", code="invalid_state")
        import time

        updated = self.store.update_batch(bid, status="cancelling", cancelling_at=int(time.time()))
        return JSONResponse(updated)

    def routes(self) -> list[Route]:
        def r(path: str, fn: Any, method: str) -> Route:
            async def endpoint(request: Request) -> Response:
                return await self._guard(request, fn)
            return Route(path, endpoint, methods=[method])

        return [
            r("/v1/files", self.create_file, "POST"), r("/v1/files", self.list_files, "GET"),
            r("/v1/files/{file_id}", self.get_file, "GET"), r("/v1/files/{file_id}", self.delete_file, "DELETE"),
            r("/v1/files/{file_id}/content", self.file_content, "GET"),
            r("/v1/batches", self.create_batch, "POST"), r("/v1/batches", self.list_batches, "GET"),
            r("/v1/batches/{batch_id}", self.get_batch, "GET"),
            r("/v1/batches/{batch_id}/cancel", self.cancel_batch, "POST"),
        ]

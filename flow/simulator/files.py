"""Files as OpenAI's `/v1/files` keeps them: uploads for batches, and the batches' results.

`POST /v1/files` (multipart: `file`, `purpose`), `GET /v1/files` (newest first, `purpose`,
`limit`, `after`), `GET /v1/files/{id}`, `GET /v1/files/{id}/content`, `DELETE /v1/files/{id}`.
Files live in memory for the simulator's life.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from aiohttp import BodyPartReader, web

from flow.simulator.clock import Clock
from flow.simulator.completions import error_reply
from flow.simulator.config import SimulatorStats

PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")
MAX_FILE_BYTES = 200 * 1024 * 1024  # OpenAI's limit for a batch input file
MAX_PAGE = 10_000


@dataclass
class StoredFile:
    """One file: its bytes and what `GET /v1/files/{id}` says of it."""

    id: str
    filename: str
    purpose: str
    data: bytes
    created_at: int

    def as_json(self) -> dict[str, Any]:
        """The FileObject."""
        return {"id": self.id, "object": "file", "bytes": len(self.data),
                "created_at": self.created_at, "filename": self.filename,
                "purpose": self.purpose, "status": "processed", "expires_at": None,
                "status_details": None}


class Files:
    """The files uploaded and made, by id, and the handlers that serve them."""

    def __init__(self, clock: Clock, stats: SimulatorStats) -> None:
        self._clock = clock
        self._stats = stats
        self._files: dict[str, StoredFile] = {}

    def add_routes(self, router: web.UrlDispatcher) -> None:
        """Serve `/v1/files`."""
        router.add_post("/v1/files", self.upload)
        router.add_get("/v1/files", self.list)
        router.add_get("/v1/files/{file_id}", self.retrieve)
        router.add_delete("/v1/files/{file_id}", self.delete)
        router.add_get("/v1/files/{file_id}/content", self.content)

    def add(self, data: bytes, filename: str, purpose: str) -> StoredFile:
        """Keep a file and return it."""
        stored = StoredFile("file-" + secrets.token_hex(12), filename, purpose, data,
                            self._clock.epoch())
        self._files[stored.id] = stored
        return stored

    def get(self, file_id: str) -> StoredFile | None:
        """The file with this id, if there is one."""
        return self._files.get(file_id)

    async def upload(self, request: web.Request) -> web.Response:
        """`POST /v1/files`."""
        if not request.content_type.startswith("multipart/"):
            return send_error(400, "Expected a multipart/form-data upload.", "file")
        fields: dict[str, str] = {}
        data: bytes | None = None
        filename = "upload"
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader) or part.name is None:
                continue
            if part.name == "file":
                filename = part.filename or filename
                data = await _read_capped(part)
                if data is None:
                    return send_error(400, f"File is too large: the limit is "
                                      f"{MAX_FILE_BYTES // (1024 * 1024)} MB.", "file")
            else:
                fields[part.name] = (await part.read(decode=True)).decode("utf-8", "replace")
        purpose = fields.get("purpose")
        if data is None:
            return send_error(400, "Missing required parameter: 'file'.", "file")
        if purpose not in PURPOSES:
            return send_error(400, f"Invalid value for 'purpose': {purpose!r}; expected one "
                              f"of {', '.join(PURPOSES)}.", "purpose")
        if purpose == "batch" and not filename.endswith(".jsonl"):
            return send_error(400, "Invalid file format for Batch API. Must be .jsonl", "file")
        stored = self.add(data, filename, purpose)
        self._stats.files_uploaded += 1
        return web.json_response(stored.as_json())

    async def list(self, request: web.Request) -> web.Response:
        """`GET /v1/files`: newest first, a page of `limit` after the id `after`."""
        purpose = request.query.get("purpose")
        files = [f.as_json() for f in reversed(self._files.values())
                 if purpose is None or f.purpose == purpose]
        return page_of(files, request, default_limit=MAX_PAGE, max_limit=MAX_PAGE)

    async def retrieve(self, request: web.Request) -> web.Response:
        """`GET /v1/files/{id}`."""
        stored = self._files.get(request.match_info["file_id"])
        if stored is None:
            return _no_such_file(request.match_info["file_id"])
        return web.json_response(stored.as_json())

    async def content(self, request: web.Request) -> web.Response:
        """`GET /v1/files/{id}/content`: the bytes."""
        stored = self._files.get(request.match_info["file_id"])
        if stored is None:
            return _no_such_file(request.match_info["file_id"])
        return web.Response(body=stored.data, content_type="application/octet-stream")

    async def delete(self, request: web.Request) -> web.Response:
        """`DELETE /v1/files/{id}`."""
        stored = self._files.pop(request.match_info["file_id"], None)
        if stored is None:
            return _no_such_file(request.match_info["file_id"])
        return web.json_response({"id": stored.id, "object": "file", "deleted": True})


def page_of(items: list[dict[str, Any]], request: web.Request, default_limit: int,
            max_limit: int) -> web.Response:
    """One page of a cursor list, as OpenAI pages: `limit` items after the id `after`."""
    try:
        limit = int(request.query.get("limit", default_limit))
        if not 1 <= limit <= max_limit:
            raise ValueError
    except ValueError:
        return send_error(400, f"Invalid 'limit': expected a whole number from 1 to "
                          f"{max_limit}.", "limit")
    after = request.query.get("after")
    if after is not None:
        ids = [item["id"] for item in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    data = items[:limit]
    return web.json_response({
        "object": "list", "data": data, "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None, "has_more": len(items) > limit})


def send_error(status: int, message: str, param: str | None = None,
               code: str | None = None) -> web.Response:
    """An error response in OpenAI's shape."""
    reply = error_reply(status, "invalid_request_error", code, message, param)
    return web.Response(status=status, text=reply.text, content_type="application/json")


def _no_such_file(file_id: str) -> web.Response:
    return send_error(404, f"No such File object: {file_id}", "id")


async def _read_capped(part: BodyPartReader) -> bytes | None:
    """The part's bytes, or None past `MAX_FILE_BYTES`."""
    chunks: list[bytes] = []
    size = 0
    while chunk := await part.read_chunk(1024 * 1024):
        size += len(chunk)
        if size > MAX_FILE_BYTES:
            return None
        chunks.append(chunk)
    return b"".join(chunks)

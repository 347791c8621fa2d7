"""The bytes of batch files, by file id: the only code that reads or writes them.

Metadata (owner, name, size, deleted) lives in the batch store's database; this holds only the
bytes, so the backend of one can change without the other. `LocalFiles` is a directory: on one
machine the cache directory, on Kubernetes a volume every gateway and the batch worker mount
(ReadWriteMany). An object store would be a second implementation of `FileBytes`.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Protocol

CHUNK = 1024 * 1024


class FileTooLarge(ValueError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"The file is larger than {limit} bytes.")
        self.limit = limit


class QuotaExceeded(ValueError):
    """The owner's files and results would pass its storage quota (batch.storage_bytes_per_key)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"The owner's storage would pass its quota of {limit} bytes.")
        self.limit = limit


class EmptyFile(ValueError):
    def __init__(self) -> None:
        super().__init__("The file is empty.")


class ChunkReader:
    """A read()-able view of an iterator of byte chunks, so a file made as it is written (a batch's
    output, page by page) goes through FileBytes.put without being joined in memory."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buf = b""

    def read(self, size: int = -1) -> bytes:
        while size < 0 or len(self._buf) < size:
            chunk = next(self._chunks, None)
            if chunk is None:
                break
            self._buf += chunk
        cut = len(self._buf) if size < 0 else size
        out, self._buf = self._buf[:cut], self._buf[cut:]
        return out


class FileBytes(Protocol):
    def put(self, file_id: str, fileobj: BinaryIO, *, max_bytes: int | None = None) -> int:
        """Copy `fileobj` under `file_id` a chunk at a time; return its size. Raises FileTooLarge
        past `max_bytes` and EmptyFile for no bytes, and then (as on any failure) stores nothing."""
        ...

    def open(self, file_id: str) -> BinaryIO:
        """The bytes for reading; FileNotFoundError if there are none."""
        ...

    def delete(self, file_id: str) -> None:
        """Remove the bytes; no error if they are already gone."""
        ...

    def local_path(self, file_id: str) -> Path | None:
        """A path on this machine to serve the bytes from, or None where there is none."""
        ...


class LocalFiles:
    """One file per id in `root`. Written under a temporary name and renamed, so a reader on any
    pod sees either no file or the whole file: rename is atomic on a local disk and on NFS."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, file_id: str) -> Path:
        if not file_id or "/" in file_id or file_id.startswith("."):  # ids are ours, but never a path
            raise ValueError(f"not a file id: {file_id!r}")
        return self.root / file_id

    def put(self, file_id: str, fileobj: BinaryIO, *, max_bytes: int | None = None) -> int:
        path = self._path(file_id)
        # A name no other writer uses, even one putting the same id on another pod.
        tmp = path.with_name(f".{file_id}.{uuid.uuid4().hex[:8]}.tmp")
        size = 0
        try:
            with open(tmp, "wb") as out:
                while chunk := fileobj.read(CHUNK):
                    size += len(chunk)
                    if max_bytes is not None and size > max_bytes:
                        raise FileTooLarge(max_bytes)
                    out.write(chunk)
                if size == 0:
                    raise EmptyFile()
                out.flush()
                # Durable before the caller commits the metadata row that makes other pods read it.
                os.fsync(out.fileno())
            os.replace(tmp, path)  # a crash leaves no half file under the real name
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return size

    def open(self, file_id: str) -> BinaryIO:
        return open(self._path(file_id), "rb")

    def delete(self, file_id: str) -> None:
        self._path(file_id).unlink(missing_ok=True)

    def local_path(self, file_id: str) -> Path | None:
        path = self._path(file_id)
        return path if path.exists() else None

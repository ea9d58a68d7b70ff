"""Receiving an upload within its limits: the body must arrive by its deadline (``--read-timeout-s`` from the
request's arrival: 408; ``--timeout-s``, when that comes first: 504; both close the connection), stay within
``--max-upload-mb`` (413) and stops at once when the server begins to shut down (503). The image is the raw
body or the multipart field ``file``; either is kept in a spooled temporary file (memory up to
:data:`SPOOL_BYTES`, then disk), so a large upload never sits in memory whole.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import IO, Any

from starlette.exceptions import HTTPException
from starlette.requests import Request

from unet_deploy.serve.decode import HTTPError

__all__ = ["SPOOL_BYTES", "Deadlines", "Upload", "receive_upload"]

#: an upload's bytes held in memory; beyond this they go to a temporary file (multipart files alike: 1 MiB)
SPOOL_BYTES = 1024 * 1024
_CLOSE = {"Connection": "close"}
Receive = Callable[[], Awaitable[Any]]


@dataclass(frozen=True)
class Deadlines:
    """When a request's body must be in (event-loop time) and why; ``stopping`` is set on shutdown."""

    read: float  #: arrival + --read-timeout-s
    answer: float  #: arrival + --timeout-s
    read_timeout_s: float
    timeout_s: float
    stopping: asyncio.Event

    def expired(self) -> HTTPError:
        if self.answer <= self.read:
            return HTTPError(504, f"not done within {self.timeout_s:g} s (--timeout-s): the upload was still "
                                  "arriving", _CLOSE)
        return HTTPError(408, f"upload not received within {self.read_timeout_s:g} s (--read-timeout-s); send "
                              "the whole body at once", _CLOSE)


class Upload:
    """The uploaded image's bytes as a seekable file (closed by :meth:`close`)."""

    def __init__(self, file: IO[bytes], size: int, closer: Callable[[], Any] | None = None):
        self.file = file
        self.size = size
        self._closer = closer or file.close

    def close(self) -> None:
        self._closer()


def _counted(receive: Receive, limit: int) -> Receive:
    """``receive`` that raises 413 past ``limit`` bytes and 499 when the client leaves."""
    received = 0

    async def counted() -> Any:
        nonlocal received
        message = await receive()
        if message["type"] == "http.disconnect":
            raise HTTPError(499, "client closed the connection during the upload")
        received += len(message.get("body", b""))
        if received > limit:
            raise HTTPError(413, f"upload is over the limit of {limit:,} bytes (--max-upload-mb)", _CLOSE)
        return message

    return counted


async def _raw(request: Request, receive: Receive) -> Upload:
    spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)  # noqa: SIM115 - closed by Upload.close
    size = 0
    try:
        async for chunk in Request(request.scope, receive).stream():
            spool.write(chunk)
            size += len(chunk)
    except BaseException:
        spool.close()
        raise
    return Upload(spool, size)


async def _multipart(request: Request, receive: Receive) -> Upload:
    try:
        form = await Request(request.scope, receive).form(max_files=1, max_fields=8)
    except HTTPException as e:  # python-multipart's complaint, e.g. two files
        detail = str(e.detail).rstrip(".")
        if "files" in detail.lower():
            raise HTTPError(400, f"multipart body with more than one file ({detail}): send one image per "
                                 "request, as field 'file'") from None
        raise HTTPError(400, f"malformed multipart body ({detail})") from None
    item = form.get("file") or next((v for v in form.values() if hasattr(v, "read")), None)
    if item is None or isinstance(item, str):
        await form.close()
        raise HTTPError(400, "multipart upload without a file: send the image as field 'file'")
    return Upload(item.file, item.size or 0, lambda: item.file.close())


async def _read(request: Request, limit: int, multipart: bool) -> Upload:
    receive = _counted(request.receive, limit)
    if multipart and request.headers.get("content-type", "").startswith("multipart/form-data"):
        return await _multipart(request, receive)
    return await _raw(request, receive)


async def receive_upload(request: Request, limit: int, deadlines: Deadlines, multipart: bool = True) -> Upload:
    """The image of ``request`` (raw body, or with ``multipart`` the multipart field ``file``), received within
    ``deadlines``: one watch over the whole upload (a task and a timer per request, not per chunk)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise HTTPError(413, f"upload of {int(length):,} bytes is over the limit of {limit:,} (--max-upload-mb)",
                        _CLOSE)
    remaining = min(deadlines.read, deadlines.answer) - asyncio.get_running_loop().time()
    reading = asyncio.ensure_future(_read(request, limit, multipart))
    stopping = asyncio.ensure_future(deadlines.stopping.wait())
    try:
        done, _ = await asyncio.wait({reading, stopping}, timeout=max(remaining, 0),
                                     return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        if not reading.done():
            reading.cancel()  # its spooled file is closed as the cancellation unwinds
    if reading not in done:
        if stopping in done:
            raise HTTPError(503, "shutting down: the upload was cut; send it to another instance",
                            {"Retry-After": "5", **_CLOSE})
        raise deadlines.expired()
    upload = reading.result()
    if not upload.size:
        upload.close()
        if not multipart:
            raise HTTPError(400, "empty body: send the request in the body")
        raise HTTPError(400, "empty upload: send an image file (multipart field 'file' or the raw body)")
    return upload

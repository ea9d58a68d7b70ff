"""HTTP/1.1 connections with bounded request headers, which uvicorn does not bound by itself: its
``timeout_keep_alive`` only covers the time between requests (any byte received resets it), and its httptools
parser accepts headers of any size (a 64 MB header was answered after 9.7 s, stalling the event loop).

At most :data:`MAX_CONNECTIONS` connections are open at once: one more is answered 503 and closed. A
connection whose request headers are not complete within ``--read-timeout-s`` of its first byte (or of the
connection's opening) is answered 408 and closed; headers beyond :data:`MAX_HEADER_BYTES` are answered 431 and
the connection closed. The body's own deadline is the application's (:mod:`unet_deploy.serve.upload`); but
when the application answers without reading the whole body (a 503 before the upload), uvicorn keeps the
connection and discards the rest as it comes: the rest must then arrive within ``--read-timeout-s`` too, or
the connection is closed (a client that finishes sending in time reads its answer; none is reset).

This subclasses uvicorn's httptools protocol (the class ``uvicorn.Config(http=...)`` takes) and uses only its
parser callbacks (``on_message_begin``, ``on_headers_complete``) and ``data_received``;
``tests/test_serve_limits.py`` holds it to this behaviour on the uvicorn version installed.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["MAX_HEADER_BYTES", "MAX_CONNECTIONS", "guarded_protocol"]

#: the most bytes of request line and headers one request may send (nginx and gunicorn allow about 8-32 KiB)
MAX_HEADER_BYTES = 32 * 1024
#: open connections per server process; one more is closed at once (bounds their buffers' memory)
MAX_CONNECTIONS = 512


def _answer(status: str, message: str) -> bytes:
    body = ('{"error": "' + message + '"}').encode()
    return (f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode() + body


class _GuardedHttpTools(HttpToolsProtocol):
    header_timeout_s = 15.0

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.in_headers = True  #: waiting for (the rest of) a request's headers
        self.header_bytes = 0
        self.header_timer: asyncio.TimerHandle | None = None
        self.body_timer: asyncio.TimerHandle | None = None  #: the unread rest of an answered request's body
        self.refused = False  #: answered 408/431/503 here: what the client still sends is dropped

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > MAX_CONNECTIONS:
            self._refuse("503 Service Unavailable", f"busy: {MAX_CONNECTIONS} connections are open; retry shortly")
            return
        self._arm()  # a connection that never sends a byte is closed too

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._stop_lingering()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self.header_timer is None:
            self.header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _disarm(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def _refuse(self, status: str, message: str) -> None:
        """Answer and end the connection: the answer, then our end closed for writing, the client's bytes still
        read (and dropped) for a moment, so that they do not make the system reset the connection before
        the client has read the answer."""
        self._disarm()
        self._stop_lingering()
        if self.refused or self.transport.is_closing():
            return
        self.refused = True
        self.transport.write(_answer(status, message))
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self.loop.call_later(1.0, self.transport.close)
        else:
            self.transport.close()

    def _headers_too_slow(self) -> None:
        self.header_timer = None
        if self.in_headers:
            self._refuse("408 Request Timeout", f"request headers not received within {self.header_timeout_s:g} s "
                                                "(--read-timeout-s)")

    def data_received(self, data: bytes) -> None:
        if self.refused or self.transport.is_closing():
            return
        super().data_received(data)
        if self.in_headers and self.header_timer is not None:
            self.header_bytes += len(data)
            if self.header_bytes > MAX_HEADER_BYTES:
                self._refuse("431 Request Header Fields Too Large",
                             f"request headers over {MAX_HEADER_BYTES // 1024} KiB")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.in_headers = True
        self.header_bytes = 0
        self._arm()

    def on_headers_complete(self) -> None:
        self.in_headers = False
        self._disarm()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        lingering = self.body_timer is not None
        self._stop_lingering()
        super().on_message_complete()
        if lingering:  # the rest of an answered request is in: the connection waits for the next one
            self.in_headers = True
            self.header_bytes = 0
            self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        cycle = self.cycle
        if cycle is not None and cycle.more_body and self.body_timer is None and not self.transport.is_closing():
            self.body_timer = self.loop.call_later(self.header_timeout_s, self._close_lingering)

    def _stop_lingering(self) -> None:
        if self.body_timer is not None:
            self.body_timer.cancel()
            self.body_timer = None

    def _close_lingering(self) -> None:
        self.body_timer = None
        if not self.transport.is_closing():
            self.transport.close()


def guarded_protocol(header_timeout_s: float) -> type[asyncio.Protocol]:
    """The protocol class for ``uvicorn.Config(http=...)``: headers within ``header_timeout_s`` and
    :data:`MAX_HEADER_BYTES`."""
    return type("GuardedHttpTools", (_GuardedHttpTools,), {"header_timeout_s": float(header_timeout_s)})

"""HTTP/1.1 for `fastsd serve`: uvicorn's httptools protocol with bounds on request heads.

uvicorn bounds neither the size nor the count of request headers under httptools, nor the
time a client may take to send them: a 64 MiB header was buffered whole, 3000 headers
were taken, and a client trickling a header byte by byte held its connection forever.
Here a request head over MAX_HEAD_BYTES or with more than MAX_HEADERS fields is answered
431, one not complete MAX_HEAD_SECONDS after its first byte 408; both in OpenAI's error
JSON, and the connection is closed.
"""

from __future__ import annotations

import json
import logging

log = logging.getLogger("fastsd.serve")

MAX_HEAD_BYTES = 64 * 1024  # request line and headers (nginx's defaults allow 32 KiB, Node's 16 KiB)
MAX_HEADERS = 100  # header fields per request (Apache's LimitRequestFields)
MAX_HEAD_SECONDS = 30.0  # from a request's first byte to the end of its headers (slow-header clients)
REASONS = {408: "Request Timeout", 431: "Request Header Fields Too Large"}


def bounded_protocol():
    """The protocol class for uvicorn's `http=`, or None without httptools."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return None
    return type("BoundedHttpToolsProtocol", (_Bounds, HttpToolsProtocol), {})


class _Bounds:
    """Mixed into HttpToolsProtocol: request heads bounded in size, field count and time.

    Bytes are counted as they arrive while a head is incomplete, so at most one read past
    the limit is ever buffered; the parser's callbacks count the exact size and fields."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._in_head = False  # a request head has begun and is not complete
        self._head_bytes = 0  # bytes received since the head began (a bound on its size)
        self._parsed_bytes = 0  # url and header bytes the parser has given
        self._fields = 0
        self._timer = None
        self._refusal: tuple[int, str] | None = None

    # ---- counting ---------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._refusal is not None or self.transport.is_closing():
            return
        super().data_received(data)  # may begin a head (counts reset) or complete one
        if self._in_head and self._refusal is None and not self.transport.is_closing():
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES + len(data):  # over the limit before this read
                self._refuse(431, f"the request's headers are over {MAX_HEAD_BYTES} bytes")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._head_bytes, self._parsed_bytes, self._fields = True, 0, 0, 0
        self._timer = self.loop.call_later(MAX_HEAD_SECONDS, self._head_timeout)

    def on_url(self, url: bytes) -> None:
        self._count(len(url), 0)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4, 1)  # "name: value\r\n"
        super().on_header(name, value)

    def _count(self, size: int, fields: int) -> None:
        self._parsed_bytes += size
        self._fields += fields
        if self._parsed_bytes > MAX_HEAD_BYTES:
            self._refusal = (431, f"the request's headers are over {MAX_HEAD_BYTES} bytes")
        elif self._fields > MAX_HEADERS:
            self._refusal = (431, f"the request has over {MAX_HEADERS} header fields")
        if self._refusal is not None:
            raise _HeadRefused()  # stops the parser; httptools reports it as a parser error

    def on_headers_complete(self) -> None:
        self._head_done()
        super().on_headers_complete()

    def _head_done(self) -> None:
        self._in_head = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def connection_lost(self, exc) -> None:
        self._head_done()
        super().connection_lost(exc)

    # ---- refusing --------------------------------------------------------------------

    def send_400_response(self, msg: str) -> None:
        if self._refusal is not None:  # our callback stopped the parser: answer with our status
            status, text = self._refusal
            self._refusal = None
            self._refuse(status, text)
        else:
            super().send_400_response(msg)

    def _head_timeout(self) -> None:
        self._timer = None
        if self._in_head and not self.transport.is_closing():  # the timer starts with a head's first byte
            self._refuse(408, f"the request's headers did not arrive within {MAX_HEAD_SECONDS:g} seconds")

    def _refuse(self, status: int, message: str) -> None:
        self._head_done()
        self._refusal = (status, message)
        log.warning("fastsd serve: %s: %s", self.client and f"{self.client[0]}:{self.client[1]}", message)
        body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                     "code": "request_header_fields_too_large" if status == 431
                                     else "request_timeout"}}).encode()
        head = [f"HTTP/1.1 {status} {REASONS[status]}".encode()]
        head += [name + b": " + value for name, value in self.server_state.default_headers]
        head += [b"content-type: application/json", b"content-length: " + str(len(body)).encode(),
                 b"connection: close"]
        self.transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        self.transport.close()


class _HeadRefused(Exception):
    pass

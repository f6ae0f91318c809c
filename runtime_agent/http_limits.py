"""Limits every HTTP listener of this project holds to (the agent's REST endpoint, the fleet dashboard and
the monitor's metrics port), on top of the standard library's threading HTTP server.

Why: a listener that waits as long as a client likes, or starts a thread for every connection, is held
by a slow-loris client (a byte every few seconds) or a connection flood, and a board has little memory.
So each request has deadlines, not just per-read timeouts (a byte every 9 s would pass a 10 s read
timeout forever): `idle_timeout_s` for a kept-alive connection to start its next request (then it is
closed quietly), `header_timeout_s` from a request's first byte to the end of its headers, and
`body_timeout_s` for its body; a request past one is answered 408 and closed. Headers over
`max_header_bytes` are a 431, a declared body over `max_body_bytes` a 413 (before it is read), and a
connection past `max_connections` open ones is answered 503 at once without a thread.
Every refusal closes that one connection; serving goes on.
"""

from __future__ import annotations

import io
import json
import math
import socket
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 32 << 20
    max_header_bytes: int = 16 << 10
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    idle_timeout_s: float = 30.0
    max_connections: int = 64


class RequestTimeout(Exception):
    """A deadline passed while reading a request (not `TimeoutError`: the base handler would swallow it)."""


def refusal(status: HTTPStatus, reason: str) -> bytes:
    """A complete `Connection: close` answer with `{"error": reason}`, written without a parsed request."""
    body = json.dumps({"error": reason}).encode()
    return (f"HTTP/1.1 {status.value} {status.phrase}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


def refuse(sock: socket.socket, status: HTTPStatus, reason: str, linger_s: float = 1.0) -> None:
    """Answer and half-close, then read and drop what the client still sends for up to `linger_s`: closing
    with unread input would reset the connection, and the client might lose the answer with it."""
    try:
        sock.settimeout(linger_s)
        sock.sendall(refusal(status, reason))
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + linger_s
        while time.monotonic() < deadline and sock.recv(65536):
            pass
    except OSError:
        pass


class _DeadlineReader(io.RawIOBase):
    """The socket as a raw stream whose every read ends at `deadline` (time.monotonic())."""

    def __init__(self, sock: Any) -> None:
        self.sock, self.deadline = sock, math.inf

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise RequestTimeout
        self.sock.settimeout(remaining)
        try:
            return self.sock.recv_into(buffer)
        except TimeoutError:
            raise RequestTimeout from None


class LimitedHandler(BaseHTTPRequestHandler):
    """Base of the project's handlers: reads through a deadline, refuses oversized headers."""

    server: "LimitedServer"

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # the stdlib's reader, replaced by one that keeps the deadlines
        self._reader = _DeadlineReader(self.connection)
        self.rfile = io.BufferedReader(self._reader)

    def _deadline(self, seconds: float) -> None:
        self._reader.deadline = time.monotonic() + seconds

    def handle_one_request(self) -> None:
        limits = self.server.limits
        try:
            self._deadline(limits.idle_timeout_s)
            if not self.rfile.peek(1):  # the client closed the connection
                self.close_connection = True
                return
        except (RequestTimeout, OSError):
            self.close_connection = True  # idle: close quietly, as keep-alive servers do
            return
        self._deadline(limits.header_timeout_s)
        self.headers = None  # set once this request's headers are in (`parse_request`)
        try:
            super().handle_one_request()
        except RequestTimeout:
            self.close_connection = True
            phase = "body" if self.headers is not None else "headers"
            seconds = limits.body_timeout_s if phase == "body" else limits.header_timeout_s
            self._refuse(HTTPStatus.REQUEST_TIMEOUT, f"the request's {phase} did not arrive within {seconds:g} s")

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        size = len(self.raw_requestline) + sum(len(k) + len(v) + 4 for k, v in self.headers.items())
        if size > self.server.limits.max_header_bytes:
            self.close_connection = True
            self._refuse(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                         f"request line and headers are {size} bytes, over the {self.server.limits.max_header_bytes}-byte limit")
            return False
        if "Transfer-Encoding" in self.headers:  # http.server reads bodies by Content-Length only
            self.close_connection = True
            self._refuse(HTTPStatus.LENGTH_REQUIRED, f"Transfer-Encoding {self.headers['Transfer-Encoding']!r} is not "
                         "supported; send the body in one piece with a Content-Length")
            return False
        declared = self.headers.get("Content-Length", "0")
        if declared.isdigit() and int(declared) > self.server.limits.max_body_bytes:  # refused before it is read
            self.close_connection = True
            self._refuse(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                         f"request body is {declared} bytes, over the {self.server.limits.max_body_bytes}-byte limit")
            return False
        self._deadline(self.server.limits.body_timeout_s)
        return True

    def send_response(self, *args: Any, **kwargs: Any) -> None:
        self.connection.settimeout(self.server.limits.idle_timeout_s)  # writing: not the reading deadline's rest
        super().send_response(*args, **kwargs)

    def _refuse(self, status: HTTPStatus, reason: str) -> None:
        refuse(self.connection, status, reason)


class LimitedServer(ThreadingHTTPServer):
    """A threading HTTP server with at most `limits.max_connections` connections being served."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[LimitedHandler], limits: Limits) -> None:
        self.limits = limits
        self._open = threading.BoundedSemaphore(limits.max_connections)
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._open.acquire(blocking=False):
            refuse(request, HTTPStatus.SERVICE_UNAVAILABLE,
                   f"{self.limits.max_connections} connections are open, the most this server serves", linger_s=0.05)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._open.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._open.release()

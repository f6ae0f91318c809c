"""The fleet dashboard: a local web page served next to the monitor, live over server-sent events.

Routes (GET): ``/`` the page (the current snapshot embedded, so it renders without a round trip),
``/api/snapshot`` the same data as JSON, ``/events`` a ``text/event-stream`` that sends the current
snapshot at once and then every new one (``event: snapshot``, ``id:`` its version), ``/metrics`` the
monitor's Prometheus metrics (`toolchain.fleet.metrics`).

Why server-sent events: the page only listens, browsers reconnect by themselves, and the standard
library's ``http.server`` can stream them, so there is nothing to install and nothing to load from a CDN.

Why snapshots are built on a thread of their own, at most every ``min_interval_s``: the monitor calls
`FleetDashboard.notify` from its network thread for every stored message (a thousand devices: a thousand
calls a second). Building a snapshot there would slow the monitor, and one per message would be wasted,
so ``notify`` only sets a flag. A snapshot merges every latency sketch in its time range, which grows
with the fleet, so the pause after one is also at least twice as long as building it took: the
dashboard never takes more than a third of the process's time from the monitor. The snapshot is read through the dashboard's own connection to the
database (WAL: readers never block the monitor's writes), and also rebuilt every ``refresh_s`` so the
time range slides while the fleet is quiet.

Security: binds to 127.0.0.1 unless told otherwise and, when bound to a loopback address, answers only
requests addressed to a loopback name (a web page elsewhere cannot read it by DNS rebinding); on any
other address it needs a token, and every connection has the listener limits (`toolchain.fleet.listener`). The page
loads nothing from anywhere else and its Content-Security-Policy forbids it (script and style by a
per-response nonce, connections to itself only); device data reaches the DOM only as text.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

from toolchain.errors import ToolchainError
from runtime_agent.http_limits import Limits
from toolchain.fleet.listener import LIMITS, GuardedHandler, GuardedServer, is_loopback
from toolchain.fleet.metrics import MISSING, FleetMetrics
from toolchain.fleet.snapshot import build_snapshot
from toolchain.fleet.store import FleetStore

log = logging.getLogger(__name__)

KEEPALIVE_S = 15.0
PAGE = resources.files("toolchain.fleet").joinpath("dashboard.html").read_text(encoding="utf-8")
CSP = ("default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; connect-src 'self'; "
       "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def embed_json(data: bytes) -> str:
    """JSON made safe inside ``<script type="application/json">``: no ``<``, ``>`` or ``&`` can end the
    element or start markup (they only occur inside JSON strings, where the \\u escapes mean the same)."""
    return data.decode("utf-8").replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


class _Server(GuardedServer):
    dashboard: "FleetDashboard"


class _Handler(GuardedHandler):
    server: _Server
    server_version = "edge-fleet-dashboard"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        dashboard = self.server.dashboard
        if dashboard.loopback_only and not is_loopback(urlsplit(f"//{self.headers.get('Host', '')}").hostname or ""):
            self._send(403, "text/plain; charset=utf-8", b"this dashboard answers only on its loopback address\n")
            return
        if not self.authorized():
            return
        path = urlsplit(self.path).path
        if path in ("/", "/index.html"):
            nonce = secrets.token_urlsafe(16)
            _, data = dashboard.latest()
            page = PAGE.replace("__NONCE__", nonce).replace("__SNAPSHOT__", embed_json(data))
            self._send(200, "text/html; charset=utf-8", page.encode("utf-8"), {"Content-Security-Policy": CSP.format(nonce=nonce), **self.token_cookie()})
        elif path == "/api/snapshot":
            self._send(200, "application/json", dashboard.latest()[1])
        elif path == "/events":
            self._stream(dashboard)
        elif path == "/metrics":
            self._metrics(dashboard)
        else:
            self._send(404, "text/plain; charset=utf-8", b"not found\n")

    def _send(self, status: int, content_type: str, body: bytes, headers: Mapping[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in {"Content-Type": content_type, "Content-Length": str(len(body)), "Cache-Control": "no-store",
                            "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", **(headers or {})}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _metrics(self, dashboard: "FleetDashboard") -> None:
        """Prometheus text format (`toolchain.fleet.metrics`); 404 saying what to install without it."""
        if dashboard.metrics is None:
            self._send(404, "text/plain; charset=utf-8", f"{MISSING}\n".encode())
            return
        try:
            body = dashboard.metrics.exposition()
        except Exception:  # a busy or broken read: this scrape fails, the next one retries
            log.exception("cannot collect the metrics")
            self._send(503, "text/plain; charset=utf-8", b"cannot read the fleet database now\n")
            return
        self._send(200, dashboard.metrics.content_type, body)

    def _stream(self, dashboard: "FleetDashboard") -> None:
        """The event stream: every new snapshot as one ``snapshot`` event; a comment line when idle, so a
        closed tab is noticed (the write fails) and proxies keep the connection."""
        self.send_response(200)
        for name, value in (("Content-Type", "text/event-stream; charset=utf-8"), ("Cache-Control", "no-store"),
                            ("X-Content-Type-Options", "nosniff")):
            self.send_header(name, value)
        self.end_headers()
        seen = -1
        try:
            self.wfile.write(b"retry: 2000\n\n")
            while not dashboard.stopping:
                update = dashboard.wait_newer(seen, KEEPALIVE_S)
                if update is None:
                    self.wfile.write(b": keep-alive\n\n")
                else:
                    seen, data = update
                    self.wfile.write(b"id: %d\nevent: snapshot\ndata: %s\n\n" % (seen, data))
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            log.debug("event stream to %s closed", self.address_string())


class FleetDashboard:
    """The dashboard's HTTP server over a fleet database. The socket is bound in the constructor (a port
    in use is a `ToolchainError` before anything else starts); `start()` serves in the background."""

    def __init__(self, db_path: Path | str, host: str = "127.0.0.1", port: int = 8765, *, since_s: float = 3600.0,
                 min_interval_s: float = 0.5, refresh_s: float = 30.0,
                 stats: Callable[[], Mapping[str, int]] | None = None, metrics: FleetMetrics | None = None,
                 token: str | None = None, limits: Limits = LIMITS) -> None:
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ToolchainError(f"--port must be 0-65535 (0: any free port), got {port!r}")
        if not since_s > 0:
            raise ToolchainError(f"--since must be > 0 seconds, got {since_s}")
        if min_interval_s < 0 or not refresh_s > 0:
            raise ValueError("min_interval_s must be >= 0 and refresh_s > 0")
        self.db_path, self.since_s = db_path, float(since_s)
        self.min_interval_s, self.refresh_s, self.stats = float(min_interval_s), float(refresh_s), stats
        self.metrics = metrics  # served at /metrics
        self._server = _Server(host, port, _Handler, token, "the dashboard", "--port", limits)  # token: toolchain.fleet.listener
        self._server.dashboard = self
        self.host, self.port = host, int(self._server.server_address[1])
        self.loopback_only = is_loopback(host)
        self._store: FleetStore | None = None
        self._cond = threading.Condition()
        self._version, self._data = 0, b"{}"
        self._dirty, self._stop = threading.Event(), threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def start(self) -> "FleetDashboard":
        """Open the database (it must exist: the monitor creates it), build the first snapshot, serve."""
        if self._threads:
            return self
        try:
            self._store = FleetStore(self.db_path, create=False)
            self.refresh()
        except BaseException:
            self.stop()
            raise
        self._threads = [threading.Thread(target=self._server.serve_forever, name="dashboard-http", daemon=True),
                         threading.Thread(target=self._refresh_loop, name="dashboard-snapshots", daemon=True)]
        for thread in self._threads:
            thread.start()
        return self

    def notify(self, *_: object) -> None:
        """Something new was stored: rebuild the snapshot soon (cheap; safe from any thread)."""
        self._dirty.set()

    def refresh(self) -> int:
        """Build and publish a snapshot now; returns its version."""
        assert self._store is not None, "start() first"
        snapshot = build_snapshot(self._store, self.since_s, stats=self.stats() if self.stats else None)
        data = json.dumps(snapshot, separators=(",", ":"), allow_nan=False).encode("utf-8")
        with self._cond:
            self._version += 1
            self._data = data
            self._cond.notify_all()
            return self._version

    def latest(self) -> tuple[int, bytes]:
        with self._cond:
            return self._version, self._data

    def wait_newer(self, seen: int, timeout: float) -> tuple[int, bytes] | None:
        """The newest snapshot once its version is above ``seen``; None on timeout or when stopping."""
        with self._cond:
            self._cond.wait_for(lambda: self._version > seen or self._stop.is_set(), timeout)
            if self._stop.is_set() or self._version <= seen:
                return None
            return self._version, self._data

    def _refresh_loop(self) -> None:
        while not self._stop.is_set():
            self._dirty.wait(self.refresh_s)
            if self._stop.is_set():
                return
            self._dirty.clear()
            started = time.monotonic()
            try:
                self.refresh()
            except Exception:  # a busy or broken read must not end the dashboard; the next change retries
                log.exception("cannot build the dashboard snapshot")
            self._stop.wait(max(self.min_interval_s, 2 * (time.monotonic() - started)))

    def stop(self) -> None:
        """Stop serving (open event streams end too) and close the database. Idempotent."""
        self._stop.set()
        self._dirty.set()
        with self._cond:
            self._cond.notify_all()
        if self._threads:
            self._server.shutdown()
            for thread in self._threads:
                thread.join(timeout=5)
        self._server.server_close()
        if self._store is not None:
            self._store.close()
            self._store = None

    def __enter__(self) -> "FleetDashboard":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

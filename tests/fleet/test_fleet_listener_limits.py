"""The fleet's listeners (toolchain.fleet.listener): off loopback the dashboard and the monitor's metrics
port need a token (401 without it), and the dashboard holds the agent's listener limits (408, 413, 503)."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from runtime_agent.http_limits import Limits
from tests.agent.test_listener_limits import answer
from tests.fleet_helpers import wait_until
from toolchain.errors import ToolchainError
from toolchain.fleet.dashboard import FleetDashboard
from toolchain.fleet.metrics import FleetMetrics
from toolchain.fleet.store import FleetStore

TOKEN = "t0ken-for-the-fleet-listener-test"


@pytest.fixture()
def db(tmp_path: Path) -> Path:
    path = tmp_path / "fleet.sqlite"
    FleetStore(path).close()
    return path


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def test_off_loopback_the_dashboard_and_metrics_need_a_token(db: Path) -> None:
    with pytest.raises(ToolchainError, match=r"^the dashboard on 0.0.0.0 \(not a loopback address\) requires a token: give --token-file FILE"):
        FleetDashboard(db, "0.0.0.0", 0)
    metrics = FleetMetrics(db)
    try:
        with pytest.raises(ToolchainError, match=r"^metrics on 0.0.0.0 \(not a loopback address\) requires a token"):
            metrics.serve("0.0.0.0", 0)
        url = metrics.serve("0.0.0.0", 0, TOKEN).replace("0.0.0.0", "127.0.0.1")
        status, headers, _ = get(url)
        assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
        status, _, body = get(url, {"Authorization": f"Bearer {TOKEN}"})
        assert status == 200 and b"edge_fleet_devices" in body
    finally:
        metrics.close()
    with FleetDashboard(db, "0.0.0.0", 0, token=TOKEN) as page:
        base = f"http://127.0.0.1:{page.port}/"
        assert get(base + "api/snapshot")[0] == 401
        assert get(base + "api/snapshot", {"Authorization": "Bearer wrong-token-of-some-length"})[0] == 401
        assert get(base + "api/snapshot", {"Authorization": f"Bearer {TOKEN}"})[0] == 200
        status, headers, _ = get(base + f"?token={TOKEN}")  # a browser: the link once, then the cookie
        assert status == 200 and headers["Set-Cookie"].startswith(f"edge_fleet_token={TOKEN}; HttpOnly; SameSite=Strict")
        assert get(base + "api/snapshot", {"Cookie": f"edge_fleet_token={TOKEN}"})[0] == 200
    with FleetDashboard(db, "127.0.0.1", 0) as page:  # loopback: no token needed
        assert get(f"http://127.0.0.1:{page.port}/api/snapshot")[0] == 200


def test_the_dashboard_cuts_slow_and_oversized_requests_and_caps_connections(db: Path) -> None:
    limits = Limits(max_body_bytes=0, header_timeout_s=1, idle_timeout_s=60, max_connections=3)
    with FleetDashboard(db, "127.0.0.1", 0, limits=limits) as page:
        slow = socket.create_connection(("127.0.0.1", page.port), timeout=30)
        slow.sendall(b"GET /api/snapshot HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and nothing more
        assert answer(slow) == (408, {"error": "the request's headers did not arrive within 1 s"})
        big = socket.create_connection(("127.0.0.1", page.port), timeout=30)
        big.sendall(b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000000\r\n\r\n")
        assert answer(big) == (413, {"error": "request body is 1000000 bytes, over the 0-byte limit"})
        held = [socket.create_connection(("127.0.0.1", page.port), timeout=30) for _ in range(3)]
        assert answer(socket.create_connection(("127.0.0.1", page.port), timeout=30)) == (
            503, {"error": "3 connections are open, the most this server serves"})
        for sock in held:
            sock.close()
        # a held connection counts until its handler reads the close: the page serves again once it has
        status = wait_until(lambda: (code := get(f"http://127.0.0.1:{page.port}/api/snapshot")[0]) != 503 and code,
                            timeout=10, what="the closed connections to be released")
        assert status == 200

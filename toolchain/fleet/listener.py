"""The fleet's HTTP listeners (the dashboard, the monitor's metrics port): the agent's limits
(`runtime_agent.http_limits`: deadlines, header and body sizes, a connection cap) and, on an address other
than loopback, a token.

Why a token only there: on 127.0.0.1 only this machine's users reach the port (and the dashboard also
refuses foreign Host names, against DNS rebinding); on any other address anyone on the network could
read the fleet. A client proves it knows the token with `Authorization: Bearer TOKEN` (Prometheus'
`authorization` setting), or a browser with `?token=TOKEN` once, after which an HttpOnly, same-site
cookie carries it (the page's own requests and event stream cannot set headers).
"""

from __future__ import annotations

import errno
import ipaddress
import secrets
from http import HTTPStatus
from http.cookies import SimpleCookie
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from runtime_agent.http_limits import LimitedHandler, LimitedServer, Limits, refusal
from toolchain.errors import ToolchainError

COOKIE = "edge_fleet_token"
LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}
LIMITS = Limits(max_body_bytes=0)  # these listeners only answer GETs


def is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_token(path: Path | None) -> str | None:
    """The token in a file (`--token-file`), or None without one; an unreadable or short one is an error."""
    if path is None:
        return None
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise ToolchainError(f"--token-file: cannot read {path} ({exc.strerror})") from None
    if len(token) < 16:
        raise ToolchainError(f"--token-file: the token in {path} is {len(token)} characters; use at least 16 "
                             "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))' > FILE`)")
    return token


class GuardedServer(LimitedServer):
    """A limited server that needs `token` unless it is bound to a loopback address."""

    def __init__(self, host: str, port: int, handler: type["GuardedHandler"], token: str | None, what: str,
                 port_option: str, limits: Limits = LIMITS) -> None:
        if token is None and not is_loopback(host):
            raise ToolchainError(f"{what} on {host} (not a loopback address) requires a token: give --token-file FILE "
                                 "(anyone who can reach the address could read the fleet)")
        self.token = token
        try:
            super().__init__((host, port), handler, limits)
        except OSError as exc:
            why = (f"the port is in use (choose another with {port_option})" if exc.errno == errno.EADDRINUSE
                   else exc.strerror or str(exc))
            raise ToolchainError(f"cannot serve {what} on {host}:{port}: {why}") from None


class GuardedHandler(LimitedHandler):
    server: GuardedServer

    def authorized(self) -> bool:
        """True when no token is needed or the request carries it; else answers 401 (and the caller stops)."""
        token = self.server.token
        if token is None:
            return True
        offered = self.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not offered:
            cookie = SimpleCookie(self.headers.get("Cookie", ""))
            offered = cookie[COOKIE].value if COOKIE in cookie else ""
        if not offered:
            offered = (parse_qs(urlsplit(self.path).query).get("token") or [""])[0]
        if offered and secrets.compare_digest(offered.encode(), token.encode()):
            return True
        self.close_connection = True
        self.wfile.write(refusal(HTTPStatus.UNAUTHORIZED, "this listener needs its token: Authorization: Bearer TOKEN")
                         .replace(b"\r\n\r\n", b"\r\nWWW-Authenticate: Bearer\r\n\r\n", 1))
        return False

    def token_cookie(self) -> dict[str, str]:
        """The header that lets a browser that came with `?token=` keep it (none without a token)."""
        if self.server.token is None:
            return {}
        return {"Set-Cookie": f"{COOKIE}={self.server.token}; HttpOnly; SameSite=Strict; Path=/"}

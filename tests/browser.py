"""Headless Chromium for the tests of web pages: one-shot runs (`chromium`: --dump-dom, --screenshot) and a
page kept open and inspected while it changes (`Browser`: the DevTools protocol over a pipe).

Why a pipe (``--remote-debugging-pipe``): it needs no websocket client and no debugging port (nothing to
collide with, nothing another process on the machine could connect to); messages are JSON separated by
NUL bytes, Chromium reads them on its fd 3 and writes on its fd 4.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]


def chromium_binary() -> str:
    binary = shutil.which("chromium")
    if binary is None:
        pytest.fail("chromium is not installed; run `bash scripts/setup.sh --dev`")
    return binary


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    """One run of headless Chromium (e.g. ``--dump-dom URL`` or ``--screenshot=PNG URL``)."""
    return subprocess.run([chromium_binary(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=120, check=True)


class Browser:
    """Headless Chromium driven over the DevTools protocol; `open(url)` gives a `Page`."""

    def __init__(self, profile: Path, window: str = "1400,1800") -> None:
        to_browser_r, to_browser_w = os.pipe()
        from_browser_r, from_browser_w = os.pipe()
        # bash (dash takes single-digit fds only) puts our pipe ends on the fds Chromium expects (3: commands
        # in, 4: replies out) and closes the originals.
        script = f'exec "$0" "$@" 3<&{to_browser_r} 4>&{from_browser_w} {to_browser_r}<&- {from_browser_w}>&-'
        self.log = profile / "chromium.log"
        profile.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                ["/bin/bash", "-c", script, chromium_binary(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                 f"--window-size={window}", "--remote-debugging-pipe", "about:blank"],
                pass_fds=(to_browser_r, from_browser_w), stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._out = os.fdopen(to_browser_w, "wb", buffering=0)
        self._in = os.fdopen(from_browser_r, "rb", buffering=0)
        self._ids = itertools.count(1)
        self._replies: dict[int, dict[str, Any]] = {}
        self._cond = threading.Condition()
        self._closed = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        buffer = b""
        while chunk := self._in.read(65536):
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            for raw in messages:
                message = json.loads(raw)
                if "id" in message:  # a reply; events (no id) are not needed by the tests
                    with self._cond:
                        self._replies[message["id"]] = message
                        self._cond.notify_all()
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None,
             timeout: float = 30.0) -> dict[str, Any]:
        """One DevTools command; its result (AssertionError with Chromium's message on an error)."""
        number = next(self._ids)
        message: dict[str, Any] = {"id": number, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        self._out.write(json.dumps(message).encode() + b"\0")
        with self._cond:
            if not self._cond.wait_for(lambda: number in self._replies or self._closed, timeout):
                raise AssertionError(f"no reply to {method} within {timeout} s")
            reply = self._replies.pop(number, None)
        if reply is None:
            raise AssertionError(f"Chromium exited before answering {method}: {self.log.read_text()[-2000:]}")
        if "error" in reply:
            raise AssertionError(f"{method} failed: {reply['error']}")
        return reply.get("result", {})

    def open(self, url: str) -> "Page":
        target = self.send("Target.createTarget", {"url": url})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        return Page(self, session)

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except (AssertionError, OSError):
            pass
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._reader.join(timeout=5)
        self._out.close()
        self._in.close()

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Page:
    """One open tab: evaluate JavaScript in it, wait for a condition on its DOM, take a screenshot."""

    def __init__(self, browser: Browser, session: str) -> None:
        self.browser, self.session = browser, session

    def evaluate(self, expression: str) -> Any:
        """The JSON value of ``expression`` in the page."""
        result = self.browser.send("Runtime.evaluate", {"expression": expression, "returnByValue": True},
                                   self.session)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30.0, what: str | None = None) -> None:
        """Poll until ``expression`` is truthy in the page, by JavaScript's rules (an element is; its JSON
        form ``{}`` would not be in Python). A condition, not a timing: the timeout only bounds a failure."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.evaluate(f"Boolean({expression})"):
                return
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what or expression}")

    def screenshot(self, path: Path) -> Path:
        data = self.browser.send("Page.captureScreenshot", {"format": "png"}, self.session)["data"]
        path.write_bytes(base64.b64decode(data))
        return path

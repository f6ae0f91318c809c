"""Many paho MQTT clients driven by one thread: one selector over all their sockets.

Why: a simulated fleet needs a thousand *distinct* MQTT clients (each its own connection, client id,
credentials and last will, so the broker's LWT and ACL work per device), but paho's own network loop is
one thread per client (two with the agent's pump), which a thousand times over is more scheduling than
work on a small machine. paho supports an external event loop: it tells us when a client's socket opens,
closes, or has data waiting to be written (the ``on_socket_*`` callbacks), and we call ``loop_read`` /
``loop_write`` when the selector says the socket is ready and ``loop_misc`` (keep-alive pings) about once a
second. Everything else (packets, QoS 1 flows, callbacks) is paho's own code.

Thread safety: the loop runs in one thread. A client may still publish from another thread (the agent
installs a pushed model off the network thread and then re-announces its status): paho locks its own
queues, the selector is only told to watch for writability (``epoll_ctl``, safe from any thread), and
the loop picks it up at its next ``poll`` (it never blocks longer than its timeout).
"""

from __future__ import annotations

import selectors
import time
from typing import Any

import paho.mqtt.client as mqtt

READ, WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE


class SharedLoop:
    """One selector for the sockets of many paho clients (see the module docstring)."""

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self.clients: list[mqtt.Client] = []

    def add(self, client: mqtt.Client) -> mqtt.Client:
        """Let this loop drive `client` (before it connects: ``client.reconnect()`` opens the socket)."""
        client.on_socket_open = self._opened
        client.on_socket_close = self._closed
        client.on_socket_register_write = self._want_write
        client.on_socket_unregister_write = self._written
        self.clients.append(client)
        return client

    # -- paho's socket callbacks -----------------------------------------------------------------
    def _opened(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._selector.register(sock, READ, client)

    def _closed(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        try:
            self._selector.unregister(sock)
        except (KeyError, ValueError):  # never registered, or already gone
            pass

    def _watch(self, sock: Any, events: int, client: mqtt.Client) -> None:
        try:
            self._selector.modify(sock, events, client)
        except (KeyError, ValueError):  # closed in the meantime: nothing left to write
            pass

    def _want_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._watch(sock, READ | WRITE, client)

    def _written(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._watch(sock, READ, client)

    # -- driving -----------------------------------------------------------------------------------
    def poll(self, timeout: float) -> int:
        """Wait up to `timeout` seconds for socket readiness and let paho read/write; returns the events handled."""
        if not self._selector.get_map():
            time.sleep(max(0.0, timeout))
            return 0
        ready = self._selector.select(max(0.0, timeout))
        for key, mask in ready:
            client: mqtt.Client = key.data
            if mask & READ:
                client.loop_read()
            if mask & WRITE and client.socket() is key.fileobj:  # the read may have closed it
                client.loop_write()
        return len(ready)

    def misc(self) -> None:
        """Keep-alive pings and timeouts of every client; call about once a second."""
        for client in self.clients:
            client.loop_misc()

    def close(self) -> None:
        self._selector.close()

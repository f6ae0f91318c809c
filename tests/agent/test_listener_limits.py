"""The agent's REST listener under hostile clients (runtime_agent.http_limits), while a client keeps
inferring: slow-loris connections (headers or body a byte at a time) are cut with a 408, an oversized
body is a 413, oversized headers a 431, a connection past the cap a 503, and no inference fails."""

from __future__ import annotations

import gzip
import json
import select
import socket
import threading
import time
from pathlib import Path

from tests.agent.test_kserve_rest_metrics import post
from tests.agent.test_multi_io import two_input_bundle, two_input_data
from tests.agent_helpers import running_agent
from tests.conftest import provision_device
from tests.fleet_helpers import wait_until
from toolchain.deploy.broker import ManagedBroker

LIMITS = {"max_body_bytes": 65536, "header_timeout_s": 1, "body_timeout_s": 1, "idle_timeout_s": 2, "max_connections": 32}
INFER = "/v2/models/m/infer"


def limited_device(tmp_path: Path, broker: ManagedBroker, limits: dict) -> Path:
    device = provision_device(tmp_path / "dev", two_input_bundle(tmp_path / "b"), broker.url, window_s=3600)
    toml = device / "agent.toml"
    toml.write_text(toml.read_text().replace("[serve]\n", "[serve]\n" + "".join(f"{k} = {v}\n" for k, v in limits.items())))
    return device


class SteadyInference(threading.Thread):
    """Infers over fresh connections until stopped; every answer must be a 200."""

    def __init__(self, base: str) -> None:
        super().__init__(daemon=True)
        x = two_input_data(2, seed=3)
        self.base, self.body = base, json.dumps({"inputs": [
            {"name": name, "datatype": datatype, "shape": list(x[name].shape), "data": x[name].ravel().tolist()}
            for name, datatype in (("features", "FP32"), ("ids", "INT64"))]}).encode()
        self.statuses: list[int] = []
        self.stopped = threading.Event()
        self.start()

    def run(self) -> None:
        while not self.stopped.is_set():
            self.statuses.append(post(self.base, self.body, {"Content-Type": "application/json"})[0])

    def stop(self) -> list[int]:
        self.stopped.set()
        self.join(15)
        return self.statuses


def connect(base: str) -> socket.socket:
    host, port = base.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=30)


def answer(sock: socket.socket) -> tuple[int, dict]:
    """Read one answer to the end (the server closes the connection after a refusal)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def slow_loris(base: str, lead: bytes, results: list) -> None:
    """Send `lead`, then one more byte every 0.2 s, until the server answers."""
    sock = connect(base)
    sock.sendall(lead)
    while not select.select([sock], [], [], 0.2)[0]:
        sock.sendall(b"X")
    results.append(answer(sock))
    sock.close()


def test_slow_loris_clients_are_cut_and_inference_goes_on(broker: ManagedBroker, tmp_path: Path) -> None:
    device = limited_device(tmp_path, broker, LIMITS)
    with running_agent(device) as (_, base):
        client = SteadyInference(base)
        results: list = []
        leads = [f"POST {INFER} HTTP/1.1\r\nHost: a\r\nX-Slow: ".encode()] * 6 + \
                [f"POST {INFER} HTTP/1.1\r\nHost: a\r\nContent-Length: 1000\r\n\r\n".encode()] * 6
        threads = [threading.Thread(target=slow_loris, args=(base, lead, results)) for lead in leads]
        for thread in threads:
            thread.start()
        idle = connect(base)  # connects and says nothing: closed quietly
        assert idle.recv(1) == b""
        for thread in threads:
            thread.join(30)
        statuses = client.stop()
    assert len(results) == 12 and {status for status, _ in results} == {408}
    reasons = sorted(body["error"] for _, body in results)
    assert reasons == ["the request's body did not arrive within 1 s"] * 6 + ["the request's headers did not arrive within 1 s"] * 6
    assert statuses and set(statuses) == {200}, f"{len(statuses) - statuses.count(200)} failed inferences"


def test_oversized_bodies_and_headers_are_refused_and_inference_goes_on(broker: ManagedBroker, tmp_path: Path) -> None:
    device = limited_device(tmp_path, broker, LIMITS)
    with running_agent(device) as (_, base):
        client = SteadyInference(base)
        refused = []
        for _ in range(5):
            big = connect(base)  # declares 10 MB, sends the headers only: refused before the body is read
            big.sendall(f"POST {INFER} HTTP/1.1\r\nHost: a\r\nContent-Length: {10 << 20}\r\n\r\n".encode() + b"{" * 1024)
            refused.append(answer(big))
            refused.append(post(base, gzip.compress(b" " * (1 << 20)), {"Content-Encoding": "gzip"}))  # 1 KB that inflates to 1 MB
            refused.append(post(base, b"{}", {"X-Big": "y" * 20000}))
        statuses = client.stop()
    assert [status for status, _ in refused] == [413, 413, 431] * 5
    assert refused[0][1]["error"] == f"request body is {10 << 20} bytes, over the 65536-byte limit"
    assert refused[1][1]["error"] == "the gzip request body inflates to more than 65536 bytes"
    assert refused[2][1]["error"].startswith("request line and headers are ") and "over the 16384-byte limit" in refused[2][1]["error"]
    assert statuses and set(statuses) == {200}, f"{len(statuses) - statuses.count(200)} failed inferences"


def test_a_chunked_body_is_a_411_not_an_empty_request(broker: ManagedBroker, tmp_path: Path) -> None:
    """A client streaming its body (Python requests with a generator) used to get "request body must be
    1..N bytes of JSON, got 0": the body it had sent was never read."""
    device = limited_device(tmp_path, broker, LIMITS)
    body = b'{"inputs": []}'
    with running_agent(device) as (_, base):
        sock = connect(base)
        sock.sendall(f"POST {INFER} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
                     + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
        status, answered = answer(sock)
    assert status == 411 and answered["error"] == ("Transfer-Encoding 'chunked' is not supported; send the body in one "
                                                   "piece with a Content-Length")


def test_http_servers_own_refusals_are_json_too(broker: ManagedBroker, tmp_path: Path) -> None:
    """A method without a route (PUT, OPTIONS) or a request line over 64 KiB got http.server's HTML page."""
    device = limited_device(tmp_path, broker, LIMITS)
    answers = []
    with running_agent(device) as (_, base):
        for request in (f"OPTIONS {INFER} HTTP/1.1\r\nHost: a\r\n\r\n", "PUT /v2 HTTP/1.1\r\nHost: a\r\n\r\n",
                        f"GET /{'a' * 70000} HTTP/1.1\r\nHost: a\r\n\r\n"):
            sock = connect(base)
            sock.sendall(request.encode())
            answers.append(answer(sock))
    assert answers == [(501, {"error": "Unsupported method ('OPTIONS')"}), (501, {"error": "Unsupported method ('PUT')"}),
                       (414, {"error": "Request-URI Too Long"})]


def test_a_connection_past_the_cap_is_a_503_and_serving_goes_on(broker: ManagedBroker, tmp_path: Path) -> None:
    device = limited_device(tmp_path, broker, LIMITS | {"max_connections": 4, "idle_timeout_s": 60})
    with running_agent(device) as (_, base):
        held = [connect(base) for _ in range(4)]
        extra = connect(base)
        status, body = answer(extra)
        assert status == 503 and body["error"] == "4 connections are open, the most this server serves"
        for sock in held:
            sock.close()
        # a held connection counts until its handler reads the close: wait for the first answer, then all must pass
        wait_until(lambda: post(base, b"{}", {})[0] != 503, timeout=10, what="the closed connections to be released")
        statuses = SteadyInference(base)
        time.sleep(0.5)
        assert set(statuses.stop()) == {200}

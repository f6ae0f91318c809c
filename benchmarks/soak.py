"""Soak: a real agent served at a steady rate for `--minutes` while updates and faults are injected on a
schedule, the way a device lives in the field.

Builds the default example (quick budget, a throwaway key) unless `--bundle B --keys DIR` are given,
starts a local mosquitto and a real agent (`edge-agent run`, 1 s telemetry windows, a 3 s probation), and
a paced REST client in its own process (`--rps`, a new connection per request). Every `--period` seconds
the next of these is injected, in turn: a push of the next version (PushSender, waits for `installed`);
a manual `rollback` command; a broker restart (mosquitto stopped for 2 s, started again); malformed
traffic (junk and oversized `cmd` messages, junk chunks, an oversized REST body, a slow-loris REST
connection, junk REST JSON). A persistent-session MQTT subscriber records every telemetry window and
event the device sends.

Reported: requests served and failed (target 0; a refusal the fault itself asked for, such as the
oversized body's 413, is not a served request and is counted apart), telemetry windows lost (gaps in the
outbox's `seq` over everything received, plus the windows the device says it dropped; target 0), and RSS
growth per hour (least-squares slope of the agent's VmRSS sampled every 2 s after the first minute;
target <= 5 MB/h; a run of a few minutes only bounds it loosely). The slope over the second half of the
run alone is reported beside it (`rss_growth_2nd_half_mb_per_h`, not the target): memory that levels off
(allocator and onnxruntime warm-up) shows a flat second half, a leak keeps its slope in both.

    python benchmarks/soak.py [--minutes 5] [--rps 20] [--period 15] [--bundle B --keys DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from _common import print_table, target, write_results
from push import RestClient, given_or_built, latency_stats, local_device, padded_version, sample_input, start_agent

FLEET, DEVICE = "soak", "soak-1"
PREFIX = f"edge/v1/{FLEET}/{DEVICE}/"
INJECTIONS = ("push", "rollback", "broker_restart", "malformed")


class Listener:
    """Every message the device publishes, kept across broker restarts (persistent session, QoS 1)."""

    def __init__(self, host: str, port: int) -> None:
        self.messages: list[tuple[str, dict]] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="soak-listener", protocol=mqtt.MQTTv5)
        self.client.on_connect = lambda c, u, f, rc, p=None: c.subscribe(PREFIX + "#", qos=1)
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.2, 2)
        self.client.connect(host, port, clean_start=False, properties=_session())
        self.client.loop_start()

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        try:
            payload = json.loads(message.payload)
        except ValueError:
            return
        with self._lock:
            self.messages.append((message.topic.removeprefix(PREFIX), payload))

    def of(self, topic: str) -> list[dict]:
        with self._lock:
            return [p for t, p in self.messages if t == topic]

    def wait(self, predicate: Any, timeout_s: float) -> Any:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if found := predicate(self):
                return found
            time.sleep(0.05)
        return None

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _session() -> Any:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = 3600
    return properties


def publish(broker_url: str, topic: str, payload: bytes) -> None:
    host, port = broker_url.removeprefix("mqtt://").split(":")
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"soak-junk-{time.monotonic_ns()}", protocol=mqtt.MQTTv5)
    client.connect(host, int(port))
    client.loop_start()
    client.publish(topic, payload, qos=1).wait_for_publish(5)
    client.loop_stop()
    client.disconnect()


def raw_http(port: int, data: bytes, slow: bool = False) -> int:
    """Send `data` on a fresh connection (a byte every 0.3 s when `slow`); the answer's status (0: none)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        try:
            if slow:
                for byte in data:
                    if select.select([sock], [], [], 0.3)[0]:  # answered (and cut off) before the end
                        break
                    sock.sendall(bytes([byte]))
            else:
                sock.sendall(data)
            answer = sock.recv(65536)
        except OSError:
            return 0
    return int(answer.split()[1]) if answer.startswith(b"HTTP/") else 0


def malformed(broker_url: str, port: int) -> list[int]:
    """Junk on every listener; the REST statuses the junk got back."""
    publish(broker_url, PREFIX + "cmd", b"\xff not json")
    publish(broker_url, PREFIX + "cmd", json.dumps({"id": "x" * 300, "type": "config"}).encode())
    publish(broker_url, PREFIX + "cmd", b"{" * (128 << 10))
    publish(broker_url, PREFIX + "push/0123456789abcdef/0", os.urandom(4096))
    return [raw_http(port, f"POST /v2/models/digits/infer HTTP/1.1\r\nHost: a\r\nContent-Length: {64 << 20}\r\n\r\n".encode()),
            raw_http(port, b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: a\r\nContent-Length: 9\r\n\r\n{not json"),
            raw_http(port, b"GET /v2/health/live HTTP/1.1\r\nHost: a\r\nX-Slow: " + b"y" * 60, slow=True)]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def rss_slope(samples: list[tuple[float, float]]) -> float:
    """MB per hour: the least-squares slope of (monotonic seconds, MB) samples."""
    if len(samples) < 2:
        return float("nan")
    t, m = np.array([s[0] for s in samples]), np.array([s[1] for s in samples])
    return float(np.polyfit((t - t[0]) / 3600, m, 1)[0])


def per_minute(samples: list[tuple[float, float]]) -> list[float]:
    """The first sample of each minute, to show the curve's shape in the results."""
    if not samples:
        return []
    minutes = [int((t - samples[0][0]) // 60) for t, _ in samples]
    return [m for i, (_, m) in enumerate(samples) if i == 0 or minutes[i] != minutes[i - 1]]


def lost_windows(listener: Listener) -> tuple[int, int, int]:
    """(windows received, seqs missing in the outbox stream, windows the device dropped)."""
    payloads = listener.of("telemetry") + listener.of("events")
    seqs = sorted({p["seq"] for p in payloads if isinstance(p.get("seq"), int)})
    missing = (seqs[-1] - seqs[0] + 1 - len(seqs)) if seqs else 0
    telemetry = listener.of("telemetry")
    dropped = max((p.get("queue", {}).get("dropped_telemetry", 0) for p in telemetry), default=0)
    return len(telemetry), missing, dropped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--rps", type=float, default=20.0, help="REST requests per second")
    parser.add_argument("--period", type=float, default=15.0, help="seconds between injections")
    parser.add_argument("--bundle", type=Path, help="soak with variants of this bundle (needs --keys) instead of building one")
    parser.add_argument("--keys", type=Path, help="key folder for --bundle")
    args = parser.parse_args()
    if (args.bundle is None) != (args.keys is None):
        parser.error("--bundle and --keys go together")

    work = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    os.environ["EDGE_TOOLCHAIN_KEYS"] = str(work / "keys")  # a throwaway key, never the user's
    from toolchain.deploy.broker import ManagedBroker, free_port
    from toolchain.deploy.push import PushSender, load_push_bundle

    broker = agent = client = listener = None
    injected: list[dict[str, Any]] = []
    rss: list[tuple[float, float]] = []
    try:
        base, keys = given_or_built(args.bundle, args.keys, work)
        broker = ManagedBroker(work / "broker", port=free_port(), authenticated=False).start()
        device = work / "device"
        port = local_device(device, base, keys, broker.url, DEVICE, FLEET, serve_extra="header_timeout_s = 2\n", probation_s=3)
        listener = Listener(broker.host, broker.port)
        agent = start_agent(device, work / "agent.log")
        client = RestClient(port, sample_input(base, keys), args.rps)
        started = time.monotonic()
        end, next_at, version, turn = started + args.minutes * 60, started + args.period, 1, 0
        while time.monotonic() < end:
            now = time.monotonic()
            if now - started >= 60 and (not rss or now - rss[-1][0] >= 2):
                rss.append((now, rss_mb(agent.pid)))
            if now < next_at:
                time.sleep(0.2)
                continue
            kind = INJECTIONS[turn % len(INJECTIONS)]
            turn, t0, outcome = turn + 1, time.monotonic(), ""
            if kind == "push":
                version += 1
                bundle = load_push_bundle(padded_version(base, keys, work / "bundles", version, 1.0), keys / "signing.pub")
                result = PushSender(bundle, DEVICE, FLEET, broker=broker.url).run(timeout_s=120)
                outcome = f"v{version} {result.state}"
            elif kind == "rollback":
                count = len([e for e in listener.of("events") if e.get("type") == "rollback"])
                publish(broker.url, PREFIX + "cmd", json.dumps({"id": f"rb-{turn}", "type": "rollback"}).encode())
                got = listener.wait(lambda r: len([e for e in r.of("events") if e.get("type") == "rollback"]) > count, 30)
                outcome = "rolled back" if got else "no answer"
            elif kind == "broker_restart":
                broker.stop()
                time.sleep(2)
                broker.start()
                outcome = "restarted"
            else:
                outcome = "REST answers " + ",".join(map(str, malformed(broker.url, port)))
            injected.append({"at_s": round(t0 - started, 1), "injection": kind, "took_s": round(time.monotonic() - t0, 2),
                             "outcome": outcome})
            print(f"{injected[-1]['at_s']:>7} s  {kind:<15} {outcome}", file=sys.stderr)
            next_at = t0 + args.period
        records = client.stop()
        client = None
        time.sleep(3)  # the last windows drain
        windows, missing, dropped = lost_windows(listener)
        alive = agent.poll() is None
    finally:
        if client:
            client.stop()
        if agent and agent.poll() is None:
            agent.terminate()
            agent.wait(30)
        if listener:
            listener.close()
        if broker:
            broker.stop()
        shutil.rmtree(work, ignore_errors=True)

    stats = latency_stats(records)
    growth, late_growth = rss_slope(rss), rss_slope(rss[len(rss) // 2:])
    print_table(injected, ["at_s", "injection", "took_s", "outcome"])
    summary = {"minutes": args.minutes, "rps": args.rps, "requests": stats["requests"], "failed": stats["failed"],
               "p50_ms": stats["p50_ms"], "p99_ms": stats["p99_ms"], "telemetry_windows": windows,
               "seq_missing": missing, "dropped_telemetry": dropped, "rss_first_mb": rss[0][1] if rss else None,
               "rss_last_mb": rss[-1][1] if rss else None, "rss_growth_mb_per_h": round(growth, 2),
               "rss_growth_2nd_half_mb_per_h": round(late_growth, 2), "agent_alive": alive,
               "load_avg_1m_end": round(os.getloadavg()[0], 2),
               "injections": {kind: sum(i["injection"] == kind for i in injected) for kind in INJECTIONS}}
    print()
    print_table([summary], ["minutes", "requests", "failed", "p50_ms", "p99_ms", "telemetry_windows", "seq_missing",
                            "dropped_telemetry", "rss_first_mb", "rss_last_mb", "rss_growth_mb_per_h",
                            "rss_growth_2nd_half_mb_per_h", "agent_alive"])
    targets = {"failed requests": target(float(stats["failed"]), "<=", 0),
               "telemetry windows lost": target(float(missing + dropped), "<=", 0),
               "RSS growth MB per hour": target(growth, "<=", 5.0)}
    write_results("soak", injected, targets, summary=summary,
                  rss_mb_each_minute=[round(m, 1) for m in per_minute(rss)])


if __name__ == "__main__":
    main()

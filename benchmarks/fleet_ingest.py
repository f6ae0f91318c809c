"""Fleet ingest capacity: replayed telemetry at rising rates through mosquitto into 1 and 2 monitor workers,
SQLite vs PostgreSQL; the highest rate each holds with 0 lost and p99 ingest lag <= 1 s.

1. Builds the default example (quick budget, a throwaway key) unless `--bundle B --keys DIR` is given, and
   makes one real telemetry window with the agent's own code (`Agent.close_window()`: latency sketch,
   drift statistics of 64 features, ~3 KB of JSON).
2. Per configuration (database x workers) and rate: a fresh mosquitto (`ManagedBroker`: persistence on,
   anonymous), a fresh database (a SQLite file, or a new database on one local PostgreSQL 15 started with
   its durable defaults: fsync and synchronous commit on), and the monitor as a user runs it, in its own
   processes: `toolchain fleet monitor --broker URL --db DB`, for 2 workers with `--workers-group bench
   --worker wN` (MQTT v5 shared subscription).
3. Replays the window at RATE messages/s for `--seconds`, QoS 1, from `--devices` MQTT clients (one client
   id and topic per device, in 2 publisher processes), each message with its device, its seq and the send
   time as the window's end.
4. Waits until the database holds every window (or nothing new arrives for 10 s), then reads it.

Measured per step: messages sent and the rate the publishers reached, lost (sent - stored: every window
carries a distinct (device, seq)), ingest lag = the monitor's ``received_at`` (stamped as its writer
handles the message, just before the batch commits) - the send time, p50/p99/max, one clock. A step
*holds* when 0 are lost, p99 lag <= 1 s and the publishers reached 95% of the rate; a configuration's
capacity is its highest held rate (rates rise until one fails). Everything shares the machine's cores:
publishers, mosquitto, workers, PostgreSQL; so each step also records the CPU each of them spent per
message sent (user + system seconds, from the go to the last window stored: `cpu_us_*`) and the load
average, which tell what the rate was spent on, and what other work on the machine took from it.

    python benchmarks/fleet_ingest.py [--quick] [--seconds 10] [--devices 200] [--bundle B --keys DIR]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from _common import print_table, target, write_results
from push import given_or_built

BIN = Path(sys.executable).parent
FLEET = "bench"
RATES = (500, 1000, 1500, 2000, 3000, 4000, 5000, 6000, 8000)
PUBLISHERS = 2
MAX_LAG_S = 1.0
TARGET_RATE = 5000.0  # msgs/s into PostgreSQL with 2 workers
CONFIGS = (("sqlite", 1), ("sqlite", 2), ("postgres", 1), ("postgres", 2))


def real_window(bundle: Path, keys: Path, work: Path) -> dict[str, Any]:
    """One telemetry window exactly as the agent makes it (real onnxruntime inference on the bundle)."""
    from runtime_agent.agent import Agent
    from runtime_agent.config import load_agent_config

    device = work / "template"
    device.mkdir()
    shutil.copyfile(bundle, device / "current.bundle")
    shutil.copyfile(keys / "signing.pub", device / "trusted.pub")
    (device / "agent.toml").write_text('device_id = "tmpl"\nfleet = "bench"\nbroker = "mqtt://127.0.0.1:1"\n'
                                       '[serve]\nhost = "127.0.0.1"\nport = 1\n')
    agent = Agent(load_agent_config(device))
    agent.load()
    agent.infer(np.random.default_rng(0).uniform(0, 16, (64, 1, 8, 8)).astype(np.float32))
    window = agent.close_window()
    agent.outbox.close()
    return window


def _varint(n: int) -> bytes:
    """MQTT's variable byte integer (a packet's remaining length)."""
    out = bytearray()
    while True:
        n, digit = n >> 7, n & 0x7F
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _text(value: str) -> bytes:
    data = value.encode()
    return len(data).to_bytes(2, "big") + data


class DeviceLink:
    """A device's MQTT v5 connection reduced to what the replay needs: CONNECT, QoS 1 PUBLISH with packet
    ids, and counting the broker's PUBACKs (a refusal, reason >= 0x80, is counted as not acknowledged).

    Why not paho, as the agent uses: the publishers share the cores with the broker, the workers and
    PostgreSQL, and paho's Python per publish and per acknowledgement cost them ~100-300 us of CPU per
    message (one thread per client: more), more than a monitor worker; these packets cost a few us."""

    def __init__(self, port: int, client_id: str, topic: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        body = _text("MQTT") + bytes([5, 0x02]) + (600).to_bytes(2, "big") + b"\x00" + _text(client_id)
        self.sock.sendall(b"\x10" + _varint(len(body)) + body)
        self.topic, self.mid, self.acked, self.refused = _text(topic), 0, 0, 0
        self.buffer, packets = b"", []
        while not packets:
            packets = self.read(blocking=True)
        if packets[0][0] != 0x20 or packets[0][1][1] != 0:
            raise SystemExit(f"the broker refused {client_id}: CONNACK {packets[0][1].hex()}")

    def publish(self, payload: bytes) -> None:
        self.mid = self.mid % 65535 + 1
        body = self.topic + self.mid.to_bytes(2, "big") + b"\x00" + payload
        self.sock.sendall(b"\x32" + _varint(len(body)) + body)

    def read(self, blocking: bool = False) -> list[tuple[int, bytes]]:
        """Read what arrived and count its PUBACKs; the whole packets, as (type, body)."""
        self.sock.setblocking(blocking)
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return []
        if not data:
            raise SystemExit("the broker closed a publisher's connection")
        self.buffer += data
        packets = []
        while len(self.buffer) >= 2:
            length, shift, at = 0, 0, 1
            while at < len(self.buffer):
                length |= (self.buffer[at] & 0x7F) << shift
                shift, at = shift + 7, at + 1
                if not self.buffer[at - 1] & 0x80:
                    break
            else:
                break
            if len(self.buffer) < at + length:
                break
            kind, body, self.buffer = self.buffer[0] & 0xF0, self.buffer[at:at + length], self.buffer[at + length:]
            packets.append((kind, body))
            if kind == 0x40:  # PUBACK: packet id, then a reason code unless success
                if len(body) > 2 and body[2] >= 0x80:
                    self.refused += 1
                else:
                    self.acked += 1
        return packets


def _publisher(index: int, port: int, template: str, devices: list[str], rate: float, seconds: float,
               ready: Any, go: Any, out: Any) -> None:
    """One publisher process: a connection per device (`DeviceLink`, one thread for all); paces `rate`
    messages/s round-robin over its devices; a payload is its template's fixed text joined with the
    message's values. Reports (index, sent, seconds, acknowledged, refused, CPU seconds)."""
    import selectors

    links = [DeviceLink(port, device, f"edge/v1/{FLEET}/{device}/telemetry") for device in devices]
    sockets = selectors.DefaultSelector()
    for link in links:
        sockets.register(link.sock, selectors.EVENT_READ, link)

    def pump(timeout: float) -> None:
        for key, _ in sockets.select(timeout):
            key.data.read()

    ready.release()
    go.wait()
    total, sent, seqs = int(rate * seconds), 0, [0] * len(devices)
    pieces = re.split(r'("@@DEVICE@@"|-987654321|\[-1\.5, -2\.5\])', template)  # text, placeholder, text, ...
    cpu, start = time.process_time(), time.perf_counter()
    while sent < total:
        due = min(total, int((time.perf_counter() - start) * rate) + 1)
        while sent < due:
            slot = sent % len(devices)
            seqs[slot] += 1
            now = time.time()
            values = {'"@@DEVICE@@"': f'"{devices[slot]}"', "-987654321": str(seqs[slot]),
                      "[-1.5, -2.5]": f"[{now - 1.0!r}, {now!r}]"}
            links[slot].publish("".join([values.get(piece, piece) if i % 2 else piece
                                         for i, piece in enumerate(pieces)]).encode())
            sent += 1
        pump(0.002)  # acknowledgements read every 2 ms at most: a select per message would cost more than the message
    elapsed = time.perf_counter() - start
    deadline = time.time() + 60
    while time.time() < deadline and sum(link.acked + link.refused for link in links) < sent:
        pump(0.05)
    cpu = time.process_time() - cpu  # publishing and reading the acknowledgements
    for link in links:
        link.sock.sendall(b"\xe0\x00")  # DISCONNECT
        link.sock.close()
    out.put((index, sent, elapsed, cpu, sum(link.acked for link in links), sum(link.refused for link in links)))


def start_workers(kind: str, db: str, workers: int, broker_url: str, logs: Path) -> list[subprocess.Popen]:
    processes = []
    for number in range(1, workers + 1):
        log = logs / f"worker-{number}.log"
        group = ["--workers-group", "bench", "--worker", f"w{number}"] if workers > 1 else []
        processes.append(subprocess.Popen([str(BIN / "toolchain"), "fleet", "monitor", "--broker", broker_url, "--db", db,
                                           *group], stdout=log.open("w"), stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 60
        while " monitoring " not in log.read_text():
            if processes[-1].poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"monitor worker {number} ({kind}) did not start:\n{log.read_text()}")
            time.sleep(0.05)
    return processes


def cpu_seconds(processes: list[psutil.Process]) -> float:
    """User + system CPU of these processes so far (one that has gone counts 0)."""
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def postgres_processes(pg: Any) -> list[psutil.Process]:
    """The server's processes: the postmaster (first line of postmaster.pid) and its backends and helpers."""
    postmaster = psutil.Process(int((pg.data / "postmaster.pid").read_text().split()[0]))
    return [postmaster, *postmaster.children(recursive=True)]


def stored_lags(db: str) -> np.ndarray:
    """received_at - window_end of every stored window (one row per (device, stream, seq))."""
    from toolchain.fleet.store import FleetStore

    with FleetStore(db, create=False) as store:
        rows = store._rows("SELECT received_at - window_end AS lag FROM telemetry WHERE fleet = ?", (FLEET,))
    return np.array([row["lag"] for row in rows], dtype=float)


def count_stored(db: str) -> int:
    from toolchain.fleet.store import FleetStore

    with FleetStore(db, create=False) as store:
        return int(store._rows("SELECT COUNT(*) AS n FROM telemetry WHERE fleet = ?", (FLEET,))[0]["n"])


def step(kind: str, workers: int, rate: float, args: argparse.Namespace, template: str, pg: Any, work: Path) -> dict[str, Any]:
    from toolchain.deploy.broker import ManagedBroker, free_port

    folder = Path(tempfile.mkdtemp(prefix=f"{kind}-{workers}-{int(rate)}-", dir=work))
    db = str(folder / "fleet.sqlite") if kind == "sqlite" else pg.create_database(f"bench_{folder.name.replace('-', '_')}")
    broker = ManagedBroker(folder / "broker", port=free_port(), authenticated=False).start()
    monitors: list[subprocess.Popen] = []
    try:
        monitors = start_workers(kind, db, workers, broker.url, folder)
        devices = [f"dev-{i:05d}" for i in range(args.devices)]
        spawn = mp.get_context("spawn")  # not fork: this process holds onnxruntime's threads (the template)
        ready, go, out = spawn.Semaphore(0), spawn.Event(), spawn.Queue()
        publishers = [spawn.Process(target=_publisher, args=(i, broker.port, template, devices[i::PUBLISHERS],
                                                          rate / PUBLISHERS, args.seconds, ready, go, out))
                      for i in range(PUBLISHERS)]
        for process in publishers:
            process.start()
        for _ in publishers:
            if not ready.acquire(timeout=120):
                raise SystemExit("the publishers did not connect")
        serving = {"workers": [psutil.Process(m.pid) for m in monitors], "broker": [psutil.Process(broker._process.pid)]}
        if kind == "postgres":
            serving["postgres"] = postgres_processes(pg)
        before = {name: cpu_seconds(group) for name, group in serving.items()}
        go.set()
        results = [out.get(timeout=args.seconds + 180) for _ in publishers]
        for process in publishers:
            process.join(30)
        sent = sum(r[1] for r in results)
        reached = sum(r[1] / r[2] for r in results)
        count, last_change = 0, time.monotonic()
        while time.monotonic() - last_change < 10:
            now_count = count_stored(db)
            if now_count >= sent:
                break
            if now_count != count:
                count, last_change = now_count, time.monotonic()
            time.sleep(0.5)
        used = {name: cpu_seconds(group) - before[name] for name, group in serving.items()}
        used["publishers"] = sum(r[3] for r in results)
        refused = sum(r[5] for r in results)  # the broker's PUBACK with a failure reason: counted as lost anyway
        lags = stored_lags(db)
    finally:
        for process in monitors:
            process.send_signal(signal.SIGTERM)
        for process in monitors:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
        broker.stop()
    lost = sent - len(lags)
    p99 = float(np.percentile(lags, 99)) if len(lags) else float("inf")
    held = lost == 0 and p99 <= MAX_LAG_S and reached >= 0.95 * rate
    per_message = {f"cpu_us_{name}": None if name not in used else round(used[name] / max(1, sent) * 1e6, 1)
                   for name in ("workers", "broker", "postgres", "publishers")}
    return {"db": kind, "workers": workers, "rate": rate, "reached_rate": round(reached, 1), "sent": sent,
            "lost": lost, "refused": refused, "lag_p50_s": round(float(np.percentile(lags, 50)), 4) if len(lags) else None,
            "lag_p99_s": round(p99, 4), "lag_max_s": round(float(lags.max()), 4) if len(lags) else None, "held": held,
            **per_message, "load_1m": round(os.getloadavg()[0], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 s per step, rates up to 5,000 msgs/s")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds of replay per step")
    parser.add_argument("--devices", type=int, default=200, help="MQTT clients (one device id each)")
    parser.add_argument("--bundle", type=Path, help="use this bundle instead of building one (needs --keys)")
    parser.add_argument("--keys", type=Path, help="key folder with the signing.pub that verifies --bundle")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (databases, logs)")
    parser.add_argument("--config", action="append", choices=[f"{kind}:{workers}" for kind, workers in CONFIGS],
                        help="only this database:workers (repeatable; default: all four)")
    args = parser.parse_args()
    if (args.bundle is None) != (args.keys is None):
        parser.error("--bundle and --keys go together")
    rates = [r for r in RATES if r <= 5000] if args.quick else list(RATES)
    if args.quick:
        args.seconds = min(args.seconds, 5.0)

    from toolchain.fleet.store.local_server import start_server, stop_server

    work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    os.environ["EDGE_TOOLCHAIN_KEYS"] = str(work / "keys")  # a throwaway key, never the user's
    pg_root = Path(tempfile.mkdtemp(prefix="bench-pg-"))
    pg = start_server(pg_root, durable=True)
    rows: list[dict[str, Any]] = []
    try:
        bundle, keys = given_or_built(args.bundle, args.keys, work)
        window = real_window(bundle, keys, work)
        template = json.dumps({**window, "device_id": "@@DEVICE@@", "seq": -987654321, "window": [-1.5, -2.5]})
        for kind, workers in CONFIGS:
            if args.config and f"{kind}:{workers}" not in args.config:
                continue
            for rate in rates:
                row = step(kind, workers, float(rate), args, template, pg, work)
                rows.append(row)
                print(f"{kind} x{workers} @ {rate}/s: reached {row['reached_rate']}/s, lost {row['lost']}, "
                      f"p99 lag {row['lag_p99_s']} s -> {'held' if row['held'] else 'FAILED'}; CPU us/msg: workers "
                      f"{row['cpu_us_workers']}, broker {row['cpu_us_broker']}, postgres {row['cpu_us_postgres']}, "
                      f"publishers {row['cpu_us_publishers']}; load {row['load_1m']}", file=sys.stderr)
                if not row["held"]:
                    break
    finally:
        stop_server(pg)
        shutil.rmtree(pg_root, ignore_errors=True)
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)

    print_table(rows, list(rows[0]))
    capacity = {f"{kind} x{workers}": max((r["rate"] for r in rows if (r["db"], r["workers"]) == (kind, workers)
                                          and r["held"]), default=0.0)
                for kind, workers in CONFIGS if any((r["db"], r["workers"]) == (kind, workers) for r in rows)}
    print("\nhighest rate held (0 lost, p99 ingest lag <= 1 s):", json.dumps(capacity))
    targets = {"telemetry msgs/s into PostgreSQL with 2 workers (0 lost, p99 ingest lag <= 1 s)":
               target(capacity.get("postgres x2", 0.0), ">=", TARGET_RATE)}
    write_results("fleet_ingest", rows, targets, capacity=capacity,
                  settings={"seconds": args.seconds, "devices": args.devices, "publishers": PUBLISHERS, "qos": 1,
                            "postgres": "15, durable defaults (fsync, synchronous_commit on)",
                            "sqlite": "WAL, synchronous=NORMAL", "broker": "mosquitto (ManagedBroker, persistence)"})


if __name__ == "__main__":
    main()

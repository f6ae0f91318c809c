"""Running agents in tests: in-process (`running_agent`) or as a real `edge-agent run` process
(`start_agent`), and a small KServe v2 REST client."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from runtime_agent.agent import Agent
from runtime_agent.config import load_agent_config
from tests.conftest import BIN


@contextlib.contextmanager
def running_agent(device_dir: Path, subscribed: bool = False) -> Iterator[tuple[Agent, str]]:
    """An agent serving in a thread. `subscribed`: also wait until the broker has acknowledged its
    subscriptions: a test that publishes to the device (a raw push offer, a command) right away would
    otherwise race them, and a message published before them is not delivered."""
    agent = Agent(load_agent_config(device_dir))
    stop, ports = threading.Event(), []
    thread = threading.Thread(target=agent.run, args=(stop, ports.append), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not ports and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert ports, "agent did not start"
    while subscribed and not (agent._link is not None and agent._link.subscribed.is_set()):
        assert thread.is_alive() and time.monotonic() < deadline, "the agent did not subscribe within 30 s"
        time.sleep(0.02)
    try:
        yield agent, f"http://127.0.0.1:{ports[0]}"
    finally:
        stop.set()
        thread.join(timeout=15)


def http(method: str, url: str, body: Any = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def infer_body(x: np.ndarray, datatype: str = "FP32") -> dict:
    return {"id": "r1", "inputs": [{"name": "input", "shape": list(x.shape), "datatype": datatype, "data": x.ravel().tolist()}]}


def start_agent(device: Path, log: Path, crash_at: str = "") -> subprocess.Popen:
    """`crash_at`: a step of `runtime_agent.faults.STEPS` at which the process ends itself."""
    env = {**os.environ, "EDGE_AGENT_CRASH_AT": crash_at}
    started = log.stat().st_size if log.exists() else 0
    process = subprocess.Popen([str(BIN / "edge-agent"), "run", "--device-dir", str(device)],
                               stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 60
    while b"serving" not in log.read_bytes()[started:]:
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    return process

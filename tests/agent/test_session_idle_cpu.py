"""What a served model costs while no request comes: onnxruntime's intra-op threads spin for more work
after every run (its own policy: ~40 ms, most of a core at a few requests per second), so the agent caps the
spin (`[serve] spin_us`, runtime_agent.config.SPIN_US) and the threads sleep between paced requests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from runtime_agent.config import SPIN_US, load_agent_config
from toolchain.perf.variants import VariantSpec, write_variant

# A child process that owns nothing else: opens the model as the agent does (2 threads: one pool thread
# beside the caller), and adds up its own CPU time over idle gaps that start 10 ms after a run ends.
IDLE_CPU = '''
import json, os, sys, time
import numpy as np
from runtime_agent.model import open_session
path, spin_us = sys.argv[1], int(sys.argv[2])
session = open_session("onnx", open(path, "rb").read(), path, (), threads=2, spin_us=spin_us)
feed = {session.get_inputs()[0].name: np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)}
for _ in range(20):
    session.run(None, feed)
idle = 0.0
for _ in range(8):
    session.run(None, feed)
    time.sleep(0.01)
    before = sum(os.times()[:2])
    time.sleep(0.15)
    idle += sum(os.times()[:2]) - before
print(json.dumps({"idle_cpu_s": idle, "spin": session.get_session_options().get_session_config_entry("session.intra_op.spin_duration_us")
                  if spin_us > 0 else None}))
'''


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_variant(VariantSpec("mobile", 32, 3, 3, 32, "fp32"), tmp_path_factory.mktemp("idle"))


def _idle(model: Path, spin_us: int) -> dict:
    child = subprocess.run([sys.executable, "-c", IDLE_CPU, str(model), str(spin_us)], capture_output=True, text=True,
                           timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert child.returncode == 0, child.stderr[-2000:]
    return json.loads(child.stdout)


def test_the_agents_threads_sleep_between_paced_requests(model: Path, tmp_path: Path) -> None:
    """1.2 s of idle gaps cost at most a few clock ticks of CPU with the agent's cap (onnxruntime's own policy
    spends ~30 ms of each 150 ms gap spinning: ~0.25 s here), and never spinning costs nothing either."""
    (tmp_path / "agent.toml").write_text('device_id = "d"\nbroker = "mqtt://127.0.0.1:1"\n')
    assert load_agent_config(tmp_path).serve_spin_us == SPIN_US  # what a device serves with unless told otherwise
    capped = _idle(model, SPIN_US)
    assert capped["spin"] == str(SPIN_US)
    assert capped["idle_cpu_s"] <= 0.03, capped
    assert _idle(model, 0)["idle_cpu_s"] <= 0.03

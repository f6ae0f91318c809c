"""What keeps a long-running agent's memory flat (benchmarks/soak.py measures it): over many pushes and
rollbacks it holds two onnxruntime sessions, the serving one and the previous (for rollback), never one
per update; and `edge-agent run` tunes glibc's malloc unless the environment says otherwise."""

from __future__ import annotations

import gc
import hashlib
import os
import shutil
import subprocess
import sys
import weakref
from pathlib import Path

from runtime_agent.agent import Agent
from runtime_agent.config import load_agent_config
from runtime_agent.push_receiver import Transfer
from tests.conftest import Build, provision_device
from tests.deploy.bundle_variants import variant


def _push(agent: Agent, bundle: Path, version: int) -> None:
    """What the receiver hands the installer once every chunk of `bundle` is staged."""
    data = bundle.read_bytes()
    transfer = Transfer(transfer=f"{version:016x}", size=len(data), sha256=hashlib.sha256(data).hexdigest(),
                        chunk_bytes=len(data), chunks=1, offer={"id": f"offer-{version}", "version": version})
    staged = agent.receiver.dir / f"{transfer.transfer}.part"
    shutil.copyfile(bundle, staged)
    agent.install(transfer, staged)


def test_pushes_and_rollbacks_keep_two_sessions_alive_not_one_per_update(default_build: Build, tmp_path: Path) -> None:
    device = provision_device(tmp_path / "dev", default_build, "mqtt://127.0.0.1:1")
    agent = Agent(load_agent_config(device))
    agent.load()
    sessions = [weakref.ref(agent.model.session)]
    for version in range(2, 9):
        _push(agent, variant(default_build.bundle, default_build.pubkey.parent, tmp_path / "bundles", version=version), version)
        assert agent.model.bundle.version == version
        sessions.append(weakref.ref(agent.model.session))
        if version % 2:
            assert agent.roll_back("soak-like manual rollback")
    gc.collect()
    assert sum(ref() is not None for ref in sessions) == 2
    agent.outbox.close()


def test_malloc_is_tuned_on_glibc_except_where_the_environment_chose() -> None:
    probe = "from runtime_agent.process import tune_malloc; print(*tune_malloc())"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    default = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
    chosen = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            env={**env, "MALLOC_ARENA_MAX": "4"}, check=True)
    assert (default.stdout.split(), chosen.stdout.split()) == (["MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_"],
                                                              ["MALLOC_MMAP_THRESHOLD_"])

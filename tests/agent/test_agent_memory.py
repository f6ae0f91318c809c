"""What keeps a long-running agent's memory and disk flat (benchmarks/soak.py measures RSS): over many
pushes and rollbacks it holds two onnxruntime sessions and two bundle files, the serving one and the
previous (for rollback), never one per update; and `edge-agent run` tunes glibc's malloc unless the environment says otherwise."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import weakref
from pathlib import Path

from runtime_agent.agent import Agent
from runtime_agent.config import load_agent_config
from tests.conftest import Build, install_push, provision_device
from tests.deploy.bundle_variants import variant


def test_pushes_and_rollbacks_keep_two_sessions_alive_not_one_per_update(default_build: Build, tmp_path: Path) -> None:
    device = provision_device(tmp_path / "dev", default_build, "mqtt://127.0.0.1:1")
    agent = Agent(load_agent_config(device))
    agent.load()
    sessions = [weakref.ref(agent.model.session)]
    for version in range(2, 9):
        install_push(agent, variant(default_build.bundle, default_build.pubkey.parent, tmp_path / "bundles", version=version), version)
        assert agent.model.bundle.version == version
        sessions.append(weakref.ref(agent.model.session))
        if version % 2:
            assert agent.roll_back("soak-like manual rollback")
        slots = sorted(path.name for path in agent.slots.slots.iterdir())  # and two bundles on disk, not one per push
        assert slots == sorted({agent.slots.current.resolve().name, agent.slots.previous.resolve().name}), slots
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


def test_release_free_memory_returns_pages_freed_in_the_middle_of_the_heap() -> None:
    """The creep `release_free_memory` stops (its docstring): 64 MB of 64 KiB blocks freed below one block
    still in use stay resident, because glibc trims only a heap's top by itself; the call releases them."""
    probe = """
import ctypes
from runtime_agent.process import release_free_memory, rss_mb, tune_malloc
tune_malloc()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
blocks = [libc.malloc(64 << 10) for _ in range(1024)]
for block in blocks:
    ctypes.memset(block, 1, 64 << 10)
pin = libc.malloc(64 << 10)  # in use above the freed blocks: the heap's top cannot shrink
for block in blocks:
    libc.free(block)
held = rss_mb()
released = release_free_memory()
print(held, rss_mb(), released)
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
    held, after, released = run.stdout.split()
    assert released == "True"
    assert float(held) - float(after) > 48, run.stdout  # most of the 64 MB went back

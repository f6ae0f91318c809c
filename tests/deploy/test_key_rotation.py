"""Key rotation and revocation with real agents (`edge-agent run` processes) and a real mosquitto:
`toolchain keys rotate` adds a key and revokes the old one on an online device, a device that was offline
through two rotations applies both, in order, when it reconnects (the retained chain), and a bundle signed
by the revoked key is refused with the reason, though it installed fine before the rotation."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from runtime_agent.keyring import load_keyring
from runtime_agent.signing import key_id, load_public_key, write_keypair
from tests.agent.test_multi_io import old_style_bundle
from tests.agent_helpers import start_agent
from tests.conftest import provision_device, run_cli
from tests.deploy.bundle_variants import variant
from tests.deploy.test_operator_commands import wait_for_log
from toolchain.deploy.broker import ManagedBroker

pytestmark = pytest.mark.slow  # four agent starts, three pushes, two rotations: ~30 s


def push(bundle: Path, broker: ManagedBroker, device: str, pubkey: Path) -> dict:
    result = run_cli("toolchain", "push", str(bundle), "--device", device, "--fleet", "lab", "--broker", broker.url,
                     "--pubkey", str(pubkey), "--chunk-kb", "4", "--no-wait-probation", "--timeout", "60", "--json",
                     timeout=120)
    return json.loads(result.stdout)["results"][device]  # the device's answer: state installed or rejected, reason


def rotate(broker: ManagedBroker, log: Path, key: Path, new: Path, *extra: str):
    return run_cli("toolchain", "keys", "rotate", "--broker", broker.url, "--fleet", "lab", "--log", str(log), "--key", str(key),
                   "--new-pubkey", str(new), "--timeout", "30", *extra, timeout=120)


def test_rotate_revoke_and_an_offline_device_catches_up_in_order(broker: ManagedBroker, tmp_path: Path) -> None:
    build = old_style_bundle(tmp_path / "build")  # signed by key 1 (build/keys)
    old_key, old_pub = build.pubkey.parent / "signing.key", build.pubkey
    new_key, new_pub = write_keypair(tmp_path / "key2")
    third_key, third_pub = write_keypair(tmp_path / "key3")
    old_id, new_id, third_id = (key_id(load_public_key(p)) for p in (old_pub, new_pub, third_pub))
    v2_old = variant(build.bundle, old_pub.parent, tmp_path / "v2-old", version=2)
    v3_old = variant(build.bundle, old_pub.parent, tmp_path / "v3-old", version=3)
    v3_new = variant(build.bundle, old_pub.parent, tmp_path / "v3-new", version=3, signing_key=new_key)
    devices = {name: provision_device(tmp_path / name, build, broker.url, name, "lab") for name in ("dev-a", "dev-b")}
    logs = {name: tmp_path / f"{name}.log" for name in devices}
    agents = {name: start_agent(devices[name], logs[name]) for name in devices}
    try:
        for name in devices:
            wait_for_log(logs[name], "connected to the broker")
        stopped = agents.pop("dev-b")
        stopped.terminate()  # a clean stop: its retained status says offline
        stopped.wait(timeout=30)

        before = push(v2_old, broker, "dev-a", old_pub)  # key 1 is trusted: installs
        assert before["state"] == "installed", before

        first = rotate(broker, tmp_path / "rotations.json", old_key, new_pub, "--revoke", old_id, "--reason", "key 1 leaked")
        assert first.returncode == 0, first.stdout + first.stderr
        assert f"rotation 1: adds {new_id}, revokes {old_id}; signed by {old_id}" in first.stdout
        assert re.search(rf"lab/dev-a: done: at rotation 1, trusts {new_id}", first.stdout), first.stdout
        assert "lab/dev-b: offline: applies the chain when it reconnects (retained)" in first.stdout
        second = rotate(broker, tmp_path / "rotations.json", new_key, third_pub)  # signed by key 2, which only rotation 1 made trusted
        assert second.returncode == 0, second.stdout + second.stderr
        assert re.search(rf"lab/dev-a: done: at rotation 2, trusts {min(new_id, third_id)}, {max(new_id, third_id)}",
                         second.stdout), second.stdout

        restarted = agents.pop("dev-a")  # dev-a restarts: its installed v2, signed by the revoked key, still loads
        restarted.terminate()
        restarted.wait(timeout=30)
        logs["dev-a"] = tmp_path / "dev-a.restarted.log"
        agents["dev-a"] = start_agent(devices["dev-a"], logs["dev-a"])
        assert "serving m v2" in logs["dev-a"].read_text()
        wait_for_log(logs["dev-a"], "connected to the broker")

        refused = push(v3_old, broker, "dev-a", old_pub)
        assert refused["state"] == "rejected", refused
        assert f"signed by key {old_id}, which was revoked (rotation 1: key 1 leaked)" in refused["reason"]
        accepted = push(v3_new, broker, "dev-a", new_pub)
        assert accepted["state"] == "installed", accepted

        logs["dev-b"] = tmp_path / "dev-b.restarted.log"
        agents["dev-b"] = start_agent(devices["dev-b"], logs["dev-b"])  # catches up: rotation 1, then 2
        wait_for_log(logs["dev-b"], r"key rotation\(s\) \[1, 2\] applied")
        keyring = load_keyring(devices["dev-b"] / "trusted", devices["dev-b"] / "trusted.pub")
        assert keyring.seq == 2 and sorted(keyring.trusted) == sorted([new_id, third_id])
        assert keyring.revoked == {old_id: "rotation 1: key 1 leaked"}
        late = push(v2_old, broker, "dev-b", old_pub)  # the very bundle dev-a installed before the rotation
        assert late["state"] == "rejected" and f"signed by key {old_id}, which was revoked" in late["reason"], late
        verify = run_cli("toolchain", "verify", str(v2_old), "--pubkey", str(devices["dev-b"] / "trusted"))
        assert verify.returncode == 2 and verify.stderr.strip() == (
            f"error: bundle {v2_old}: signed by key {old_id}, which was revoked (rotation 1: key 1 leaked); "
            f"sign it with a trusted key ({', '.join(sorted([new_id, third_id]))})"), verify.stderr
    finally:
        for agent in agents.values():
            agent.terminate()
            agent.wait(timeout=30)

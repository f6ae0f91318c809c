"""The device keyring: the old single key file is a keyring of one, rotations apply once and in order and
only when signed by a key trusted before them, a revoked key's bundles are refused with the reason (the
installed ones still load), and the host's rotation log is a chain. No network: the MQTT side is
tests/deploy/test_key_rotation.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime_agent.bundle import read_bundle, write_bundle
from runtime_agent.errors import AgentError, BundleError
from runtime_agent.keyring import load_keyring, rotate, sign_rotation
from runtime_agent.signing import key_id, load_private_key, write_keypair
from tests.agent.test_bundle import MODEL, manifest
from toolchain.deploy.rotation import add_rotation, read_log
from toolchain.errors import ToolchainError

CREATED = "2026-12-05T00:00:00+00:00"
KEYS = [Ed25519PrivateKey.from_private_bytes(bytes([n]) * 32) for n in range(1, 5)]  # fixed: deterministic ids
IDS = [key_id(k.public_key()) for k in KEYS]


def chain() -> list[dict[str, str]]:
    """Key 0 adds key 1 and is revoked; key 1 adds key 2; key 2 adds key 3 and revokes key 1."""
    return [sign_rotation(KEYS[0], 1, [KEYS[1].public_key()], {IDS[0]: "leaked"}, CREATED),
            sign_rotation(KEYS[1], 2, [KEYS[2].public_key()], {}, CREATED),
            sign_rotation(KEYS[2], 3, [KEYS[3].public_key()], {IDS[1]: "retired"}, CREATED)]


@pytest.fixture()
def device(tmp_path: Path) -> Path:
    """A device folder as before keyrings: one trusted.pub (key 0)."""
    from cryptography.hazmat.primitives import serialization

    (tmp_path / "trusted.pub").write_bytes(KEYS[0].public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return tmp_path


def bundle(path: Path, key: Ed25519PrivateKey) -> Path:
    return write_bundle(path, manifest(), {"model.onnx": MODEL, "samples.npz": b"samples"}, key)


def test_the_single_key_file_is_a_keyring_of_one(device: Path) -> None:
    keyring = load_keyring(device / "trusted", device / "trusted.pub")
    assert list(keyring.trusted) == [IDS[0]] and keyring.seq == 0
    read_bundle(bundle(device / "a.bundle", KEYS[0]), keyring)
    with pytest.raises(BundleError, match=f"signed by key {IDS[1]} but the trusted public key is {IDS[0]}"):
        read_bundle(bundle(device / "b.bundle", KEYS[1]), keyring)


def test_a_revoked_key_is_refused_with_the_reason_though_installed_bundles_still_load(device: Path) -> None:
    before = bundle(device / "old.bundle", KEYS[0])
    read_bundle(before, load_keyring(device / "trusted", device / "trusted.pub"))  # valid before the rotation
    keyring, applied, answer = rotate(device / "trusted", device / "trusted.pub", chain()[:1], "cmd-1")
    assert applied == [1] and answer and list(keyring.trusted) == [IDS[1]]
    with pytest.raises(BundleError, match=rf"signed by key {IDS[0]}, which was revoked \(rotation 1: leaked\)"):
        read_bundle(before, keyring)
    assert read_bundle(before, keyring, installed=True).version == 3  # already on the device's disk
    read_bundle(bundle(device / "new.bundle", KEYS[1]), keyring)
    assert sorted(p.name for p in (device / "trusted").iterdir()) == [f"{IDS[1]}.pub", "state.json"]


def test_rotations_apply_in_order_once_and_a_replay_is_not_answered_again(device: Path) -> None:
    with pytest.raises(AgentError, match="rotation 2 cannot apply: this device is at rotation 0 and needs 1 first"):
        rotate(device / "trusted", device / "trusted.pub", chain()[1:2], "cmd-1")
    keyring, applied, answer = rotate(device / "trusted", device / "trusted.pub", chain(), "cmd-2")
    assert applied == [1, 2, 3] and answer and sorted(keyring.trusted) == sorted(IDS[2:])
    assert rotate(device / "trusted", device / "trusted.pub", chain(), "cmd-2")[1:] == ([], False)  # retained replay
    assert rotate(device / "trusted", device / "trusted.pub", chain(), "cmd-3")[1:] == ([], True)  # a new command


@pytest.mark.parametrize(("record", "reason"), [
    (sign_rotation(KEYS[1], 1, [KEYS[2].public_key()], {}, CREATED), f"rotation 1: signature check failed: signed by key {IDS[1]}"),
    (sign_rotation(KEYS[0], 1, [KEYS[1].public_key()], {IDS[1]: "x"}, CREATED), "both adds and revokes key"),
    (sign_rotation(KEYS[0], 1, [], {IDS[0]: "x"}, CREATED), "would leave this device no trusted key"),
    (dict(sign_rotation(KEYS[0], 1, [KEYS[1].public_key()], {}, CREATED), signature="AAAA"), "the rotation was altered"),
    ({"body": "{}", "signature": ""}, "rotation 'schema' must be 'key-rotation/1'"),
    ({"body": 1}, "a rotation must be"),
])
def test_a_bad_rotation_is_refused_and_changes_nothing(device: Path, record: dict, reason: str) -> None:
    with pytest.raises(AgentError, match=reason):
        rotate(device / "trusted", device / "trusted.pub", [record], "cmd-1")
    assert load_keyring(device / "trusted", device / "trusted.pub").seq == 0


def test_a_chain_from_another_log_is_refused(device: Path) -> None:
    rotate(device / "trusted", device / "trusted.pub", chain()[:1], "cmd-1")
    other = sign_rotation(KEYS[0], 1, [KEYS[3].public_key()], {}, CREATED)
    with pytest.raises(AgentError, match="rotation 1 is not the rotation 1 this device applied"):
        rotate(device / "trusted", device / "trusted.pub", [other], "cmd-2")


@settings(max_examples=40, derandomize=True, database=None, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(deliveries=st.lists(st.lists(st.sampled_from([0, 1, 2]), max_size=4), max_size=6))
def test_any_delivery_of_the_chain_never_goes_backwards_and_the_whole_chain_converges(device: Path,
                                                                                      deliveries: list[list[int]]) -> None:
    """Whatever parts of the chain arrive, in whatever order and how often (reconnects, retained replays,
    a lost message), the device is always at a prefix of the chain, and the whole chain ends at its end."""
    folder = device / f"trusted-{len(list(device.iterdir()))}"
    seq = 0
    for n, delivery in enumerate([*deliveries, [0, 1, 2]]):
        try:
            keyring = rotate(folder, device / "trusted.pub", [chain()[i] for i in delivery], f"cmd-{n}")[0]
        except AgentError as exc:
            assert "cannot apply" in str(exc) or "non-empty list" in str(exc)
            keyring = load_keyring(folder, device / "trusted.pub")
        assert keyring.seq >= seq
        seq = keyring.seq
    assert seq == 3 and sorted(keyring.trusted) == sorted(IDS[2:])


def test_the_rotation_log_is_a_chain(tmp_path: Path) -> None:
    private, _ = write_keypair(tmp_path / "keys")
    log = tmp_path / "keys" / "rotations.json"
    with pytest.raises(ToolchainError, match="adds at least one key"):
        add_rotation(log, load_private_key(private), [], {})
    add_rotation(log, load_private_key(private), [KEYS[1].public_key()], {})
    assert [json.loads(r["body"])["seq"] for r in add_rotation(log, load_private_key(private), [KEYS[2].public_key()], {})] == [1, 2]
    log.write_text(json.dumps(read_log(log)[1:]))
    with pytest.raises(ToolchainError, match="is not a chain of rotations 1..N"):
        read_log(log)

"""The bundle refuses any tampered byte, truncation, stray file or wrong key, each with its reason."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from runtime_agent.bundle import manifest_bytes, read_bundle, write_bundle
from runtime_agent.errors import BundleError
from runtime_agent.signing import key_id, load_private_key, load_public_key, write_keypair
from tests.conftest import run_cli

MODEL = bytes(range(256)) * 40  # any bytes: the bundle layer does not parse models


def manifest() -> dict:
    return {"name": "m", "version": 3, "target": "raspberry-pi-5", "created": "2026-01-01T00:00:00+00:00",
            "artifacts": [{"path": "model.onnx", "format": "onnx", "precision": "int8", "runtime": "onnxruntime", "role": "model"},
                          {"path": "samples.npz", "format": "npz", "precision": None, "runtime": None, "role": "samples"}],
            "input": {"name": "input", "shape": [4], "dtype": "float32"}, "labels": ["a", "b"],
            "metrics": {}, "reference": {}, "provenance": {}}


@pytest.fixture()
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return write_keypair(tmp_path / "keys")


@pytest.fixture()
def bundle(tmp_path: Path, keys: tuple[Path, Path]) -> Path:
    return write_bundle(tmp_path / "m-3-raspberry-pi-5.bundle", manifest(),
                        {"model.onnx": MODEL, "samples.npz": b"samples"}, load_private_key(keys[0]))


def test_round_trip_fills_hashes_and_key_id(bundle: Path, keys: tuple[Path, Path]) -> None:
    verified = read_bundle(bundle, load_public_key(keys[1]))
    assert verified.model_bytes == MODEL and verified.version == 3
    assert verified.manifest["key_id"] == key_id(load_public_key(keys[1]))
    assert verified.model_artifact["bytes"] == len(MODEL) and len(verified.model_artifact["sha256"]) == 64
    assert not list(bundle.parent.glob(".*tmp*"))


def test_writing_is_deterministic_apart_from_the_signature(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    files = {"model.onnx": MODEL, "samples.npz": b"s"}
    a = write_bundle(tmp_path / "a.bundle", manifest(), files, load_private_key(keys[0])).read_bytes()
    b = write_bundle(tmp_path / "b.bundle", manifest(), files, load_private_key(keys[0])).read_bytes()
    assert a == b  # ed25519 signatures are deterministic too


def test_every_tampered_byte_is_refused(bundle: Path, keys: tuple[Path, Path], tmp_path: Path) -> None:
    original = bundle.read_bytes()
    public = load_public_key(keys[1])
    positions = sorted(set(range(0, len(original), 37)) | set(range(0, 2048)) | {len(original) - 1})
    reasons = set()
    for position in positions:
        tampered = bytearray(original)
        tampered[position] ^= 0x01
        target = tmp_path / "t.bundle"
        target.write_bytes(bytes(tampered))
        with pytest.raises(BundleError) as error:
            read_bundle(target, public)
        reasons.add(str(error.value).split(": ", 1)[-1].split(" (")[0])
    assert len(positions) > 500
    assert any("signature check failed" in r for r in reasons)
    assert any("sha256 does not match" in r for r in reasons)


@pytest.mark.parametrize("cut", [1, 512, 1024, 5000])
def test_truncated_bundle_is_refused(bundle: Path, keys: tuple[Path, Path], cut: int, tmp_path: Path) -> None:
    target = tmp_path / "cut.bundle"
    target.write_bytes(bundle.read_bytes()[:-cut])
    with pytest.raises(BundleError, match="truncated|not a valid tar|missing|unexpected"):
        read_bundle(target, load_public_key(keys[1]))


def test_wrong_public_key_names_both_key_ids(bundle: Path, tmp_path: Path) -> None:
    _, other_public = write_keypair(tmp_path / "other")
    with pytest.raises(BundleError, match=r"signed by key [0-9a-f]{16} but the trusted public key is [0-9a-f]{16}"):
        read_bundle(bundle, load_public_key(other_public))


def _retar(members: dict[str, bytes], path: Path) -> Path:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _members(bundle: Path) -> dict[str, bytes]:
    with tarfile.open(bundle) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_a_file_not_in_the_manifest_is_refused(bundle: Path, keys: tuple[Path, Path], tmp_path: Path) -> None:
    members = _members(bundle) | {"extra.sh": b"rm -rf /"}
    with pytest.raises(BundleError, match=r"files not listed in the manifest: \['extra.sh'\]"):
        read_bundle(_retar(members, tmp_path / "x.bundle"), load_public_key(keys[1]))


def test_a_path_traversal_entry_is_refused(bundle: Path, keys: tuple[Path, Path], tmp_path: Path) -> None:
    members = _members(bundle) | {"../evil": b"x"}
    with pytest.raises(BundleError, match="unexpected entry '../evil'"):
        read_bundle(_retar(members, tmp_path / "x.bundle"), load_public_key(keys[1]))


def test_a_resigned_manifest_with_a_wrong_hash_is_refused(bundle: Path, keys: tuple[Path, Path], tmp_path: Path) -> None:
    members = _members(bundle)
    altered = json.loads(members["manifest.json"])
    altered["artifacts"][0]["sha256"] = "0" * 64
    body = manifest_bytes(altered)
    members.update({"manifest.json": body, "manifest.sig": load_private_key(keys[0]).sign(body)})
    with pytest.raises(BundleError, match="model.onnx sha256 does not match the manifest"):
        read_bundle(_retar(members, tmp_path / "x.bundle"), load_public_key(keys[1]))


def test_unsupported_format_is_refused(tmp_path: Path, keys: tuple[Path, Path], bundle: Path) -> None:
    members = _members(bundle)
    altered = json.loads(members["manifest.json"]) | {"format": 2}
    body = manifest_bytes(altered)
    members.update({"manifest.json": body, "manifest.sig": load_private_key(keys[0]).sign(body)})
    with pytest.raises(BundleError, match="bundle format 2 is not supported"):
        read_bundle(_retar(members, tmp_path / "x.bundle"), load_public_key(keys[1]))


def test_verify_cli_reports_tampering_in_one_line(bundle: Path, keys: tuple[Path, Path], tmp_path: Path) -> None:
    data = bytearray(bundle.read_bytes())
    data[-(len(data) // 3)] ^= 0xFF
    target = tmp_path / "tampered.bundle"
    target.write_bytes(bytes(data))
    ok = run_cli("toolchain", "verify", str(bundle), "--pubkey", str(keys[1]))
    bad = run_cli("toolchain", "verify", str(target), "--pubkey", str(keys[1]))
    assert ok.returncode == 0 and ok.stdout.startswith("OK ")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert bad.stderr.startswith(f"error: bundle {target}")


def test_keys_generate_refuses_to_overwrite(tmp_path: Path) -> None:
    first = run_cli("toolchain", "keys", "generate", "--out", str(tmp_path / "k"))
    again = run_cli("toolchain", "keys", "generate", "--out", str(tmp_path / "k"))
    assert first.returncode == 0 and (tmp_path / "k" / "signing.key").stat().st_mode & 0o777 == 0o600
    assert again.returncode == 2 and "already exists; use --force" in again.stderr

"""The bundle: one signed tar that carries a model from the host to a device (docs/bundle.md, a contract).

Layout: `manifest.json`, `manifest.sig` (ed25519 over the manifest's exact bytes), then the files the
manifest lists with their sha256. Verification covers every byte of the archive: tar headers by their
checksum, member contents by the signed hashes, the manifest by the signature, and the padding and
end-of-archive blocks must be zero and each header byte-identical to its canonical form, so a flipped byte anywhere is refused with the reason.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from runtime_agent import durable
from runtime_agent.errors import BundleError
from runtime_agent.keyring import Keyring
from runtime_agent.signing import key_id

FORMAT = 1
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
BLOCK = 512
MAX_BUNDLE_BYTES = 4 << 30
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_REQUIRED = {"format": int, "name": str, "version": int, "target": str, "created": str, "artifacts": list,
             "input": dict, "labels": list, "metrics": dict, "reference": dict, "provenance": dict}
_ARTIFACT_REQUIRED = {"path": str, "sha256": str, "bytes": int, "format": str, "role": str}


@dataclass(frozen=True)
class Bundle:
    """A bundle whose signature and hashes have been checked; only this type carries model bytes."""

    path: Path
    manifest: dict[str, Any]
    files: dict[str, bytes]

    @property
    def model_artifact(self) -> dict[str, Any]:
        return next(a for a in self.manifest["artifacts"] if a["role"] == "model")

    @property
    def model_bytes(self) -> bytes:
        return self.files[self.model_artifact["path"]]

    @property
    def version(self) -> int:
        return int(self.manifest["version"])


def bundle_filename(name: str, version: int, target: str) -> str:
    return f"{name}-{version}-{target}.bundle"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    """Canonical JSON so the same manifest always signs to the same bytes."""
    return (json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()


def write_bundle(path: Path, manifest: dict[str, Any], files: dict[str, bytes], private_key: Ed25519PrivateKey) -> Path:
    """Fill in each artifact's sha256/bytes, sign, and write the tar atomically (temp file, rename)."""
    manifest = dict(manifest, format=FORMAT, key_id=key_id(private_key.public_key()))
    listed = {a["path"] for a in manifest["artifacts"]}
    if listed != set(files):
        raise BundleError(f"manifest artifacts {sorted(listed)} do not match the files {sorted(files)}")
    manifest["artifacts"] = [dict(a, sha256=sha256_hex(files[a["path"]]), bytes=len(files[a["path"]]))
                             for a in manifest["artifacts"]]
    _check_manifest(manifest)
    return write_signed(path, manifest, files, private_key)


def write_signed(path: Path, manifest: dict[str, Any], files: dict[str, bytes], private_key: Ed25519PrivateKey) -> Path:
    """The signed archive itself (a bundle, or a benchmark job): the manifest, its signature, the files."""
    body = manifest_bytes(manifest)
    members = {MANIFEST: body, SIGNATURE: private_key.sign(body), **files}
    path = Path(path)
    with durable.replace_atomically(path) as handle, tarfile.open(fileobj=handle, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    return path


def read_bundle(path: Path, trusted: Ed25519PublicKey | Keyring, *, installed: bool = False) -> Bundle:
    """Verify and load a bundle: structure, signature, format, then every artifact's hash. `trusted`: one
    key or a device's keyring; `installed`: the bundle is already on this device's disk, verified when it
    came in, so a key revoked since still verifies it (a revocation must not leave a device without a model)."""
    manifest, members = read_signed(path, trusted, installed=installed)
    _check_manifest(manifest)
    check_artifacts(manifest, members, path)
    return Bundle(path=path, manifest=manifest, files=members)


def read_signed(path: Path, trusted: Ed25519PublicKey | Keyring, *, installed: bool = False) -> tuple[Any, dict[str, bytes]]:
    """A signed archive's verified manifest (parsed JSON, not yet checked) and its other members: every
    byte of the tar checked and the manifest's signature by a trusted key; the caller checks the rest."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_BUNDLE_BYTES:
            raise BundleError(f"bundle {path} is {size} bytes, over the {MAX_BUNDLE_BYTES}-byte limit")
        data = path.read_bytes()
    except FileNotFoundError:
        raise BundleError(f"bundle {path} does not exist") from None
    except IsADirectoryError:
        raise BundleError(f"bundle {path} is a directory, expected a .bundle file") from None
    members = _read_members(data, path)
    for required in (MANIFEST, SIGNATURE):
        if required not in members:
            raise BundleError(f"bundle {path} has no {required}; it was not made by `toolchain build`")
    body, signature = members.pop(MANIFEST), members.pop(SIGNATURE)
    keyring = trusted if isinstance(trusted, Keyring) else Keyring.of(trusted)
    if keyring.signer_of(signature, body, installed=installed) is None:
        raise BundleError(f"bundle {path}: {keyring.refusal(_claimed_signer(body))}")
    try:
        manifest = json.loads(body)
    except (ValueError, RecursionError) as exc:  # signed, yet not JSON: a broken build or a misused key
        raise BundleError(f"bundle {path}: the signed manifest is not JSON ({type(exc).__name__})") from None
    return manifest, members


def _claimed_signer(body: bytes) -> Any:
    """The key id an unverified manifest names (only to word the refusal)."""
    try:
        return json.loads(body).get("key_id")
    except (ValueError, AttributeError, RecursionError):
        return None


def _read_members(data: bytes, path: Path) -> dict[str, bytes]:
    """Parse the tar strictly: regular files with safe unique names, and no unchecked bytes."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            infos = tar.getmembers()
    except tarfile.TarError as exc:
        raise BundleError(f"bundle {path} is not a valid tar archive ({exc}); the file is corrupt or truncated") from None
    members: dict[str, bytes] = {}
    position = 0
    for info in infos:
        if not info.isreg() or not _SAFE_NAME.match(info.name) or info.name in members:
            raise BundleError(f"bundle {path} contains an unexpected entry {info.name!r}; refusing it")
        if info.offset != position or info.offset_data != info.offset + BLOCK:
            raise BundleError(f"bundle {path} has unexpected bytes before {info.name!r}; it was modified")
        if data[info.offset:info.offset_data] != info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict"):
            raise BundleError(f"bundle {path}: the tar header of {info.name!r} was modified")  # even unparsed bytes count
        end = info.offset_data + info.size
        if end > len(data):
            raise BundleError(f"bundle {path} is truncated inside {info.name!r}")
        members[info.name] = data[info.offset_data:end]
        position = -(-end // BLOCK) * BLOCK
        if any(data[end:position]):
            raise BundleError(f"bundle {path} has non-zero padding after {info.name!r}; it was modified")
    expected = -(-(position + 2 * BLOCK) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE
    if len(data) != expected:
        change = "truncated" if len(data) < expected else "longer than its contents"
        raise BundleError(f"bundle {path} is {change} ({len(data)} bytes, the archive needs exactly {expected})")
    if any(data[position:]):
        raise BundleError(f"bundle {path} has unexpected data at byte {position}; it was modified or is corrupt")
    return members


def _check_manifest(manifest: Any) -> None:
    if not isinstance(manifest, dict):
        raise BundleError("manifest is not a JSON object")
    for key, kind in _REQUIRED.items():
        if not isinstance(manifest.get(key), kind):
            raise BundleError(f"manifest field '{key}' is missing or not a {kind.__name__}")
    if manifest["format"] != FORMAT:
        raise BundleError(f"bundle format {manifest['format']} is not supported (this agent reads format {FORMAT}); upgrade the agent")
    for artifact in manifest["artifacts"]:
        for key, kind in _ARTIFACT_REQUIRED.items():
            if not isinstance(artifact.get(key), kind):
                raise BundleError(f"manifest artifact {artifact.get('path')!r}: field '{key}' is missing or not a {kind.__name__}")
    if sum(a["role"] == "model" for a in manifest["artifacts"]) != 1:
        raise BundleError("manifest must list exactly one artifact with role 'model'")


def check_artifacts(manifest: dict[str, Any], members: dict[str, bytes], path: Path) -> None:
    """Every file the manifest lists is there, with its size and sha256, and nothing else is."""
    listed = {a["path"]: a for a in manifest["artifacts"]}
    if extra := sorted(set(members) - set(listed)):
        raise BundleError(f"bundle {path} contains files not listed in the manifest: {extra}")
    for name, artifact in listed.items():
        if name not in members:
            raise BundleError(f"bundle {path} is missing {name} listed in the manifest")
        content = members[name]
        if len(content) != artifact["bytes"]:
            raise BundleError(f"bundle {path}: {name} is {len(content)} bytes, manifest says {artifact['bytes']}")
        if sha256_hex(content) != artifact["sha256"]:
            raise BundleError(f"bundle {path}: {name} sha256 does not match the manifest; it was modified")

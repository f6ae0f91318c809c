"""The bundle to push: verified with the operator's trusted key before anything touches the network,
with the exact bytes that will be sent and the deterministic transfer id derived from them."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from runtime_agent.errors import AgentError
from toolchain.errors import ToolchainError


@dataclass(frozen=True)
class PushBundle:
    """A bundle verified with the operator's trusted key, with the exact bytes that will be sent."""

    path: Path
    data: bytes
    sha256: str
    name: str
    version: int
    target: str
    job: str | None = None  # "bench": a benchmark job (toolchain.deploy.device_bench), timed and never installed

    @property
    def transfer(self) -> str:
        """Deterministic transfer id (protocol §Transfer id): the same bundle always resumes the same transfer."""
        return self.sha256[:16]

    @property
    def size(self) -> int:
        return len(self.data)

    def chunk_count(self, chunk_bytes: int) -> int:
        return -(-len(self.data) // chunk_bytes)


def load_push_bundle(path: Path, pubkey: Path | Ed25519PublicKey) -> PushBundle:
    """Read and verify a bundle with the trusted public key; refuse (ToolchainError) anything that does not verify."""
    from runtime_agent.bundle import read_bundle
    from runtime_agent.signing import load_public_key

    path = Path(path)
    try:
        key = pubkey if isinstance(pubkey, Ed25519PublicKey) else load_public_key(Path(pubkey))
    except AgentError as exc:
        raise ToolchainError(f"cannot push {path}: {exc}") from None
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ToolchainError(f"bundle {path} does not exist") from None
    except IsADirectoryError:
        raise ToolchainError(f"bundle {path} is a directory, expected a .bundle file") from None
    try:
        manifest = read_bundle(path, key).manifest
    except AgentError as exc:
        raise ToolchainError(f"refusing to push {path}: it does not verify with the trusted key ({exc})") from None
    digest = hashlib.sha256(data).hexdigest()
    if hashlib.sha256(path.read_bytes()).hexdigest() != digest:
        raise ToolchainError(f"bundle {path} changed while it was being read; try again")
    return PushBundle(path=path, data=data, sha256=digest, name=manifest["name"], version=int(manifest["version"]),
                      target=manifest["target"])


def verified_bundle(bundle: Path | PushBundle, pubkey: Path | Ed25519PublicKey | None) -> PushBundle:
    """`bundle` as a PushBundle, loaded and verified when it is a path (default key: the operator's own)."""
    if isinstance(bundle, PushBundle):
        return bundle
    if pubkey is None:
        from runtime_agent.signing import PUBLIC_KEY_NAME, default_key_dir
        pubkey = default_key_dir() / PUBLIC_KEY_NAME
    return load_push_bundle(Path(bundle), pubkey)

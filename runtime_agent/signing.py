"""Ed25519 keys for bundle signatures.

The host signs, devices verify; both sides load keys through here so the file formats (PEM PKCS#8
private key, PEM SubjectPublicKeyInfo public key) and the key id stay in one place. The key id is
only a label that makes "wrong public key" errors readable; trust comes from the key itself.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from runtime_agent import durable
from runtime_agent.errors import BundleError

PRIVATE_KEY_NAME = "signing.key"
PUBLIC_KEY_NAME = "signing.pub"


def default_key_dir() -> Path:
    """`$EDGE_TOOLCHAIN_KEYS`, else `$XDG_CONFIG_HOME/edge-toolchain/keys` (~/.config by default)."""
    if env := os.environ.get("EDGE_TOOLCHAIN_KEYS"):
        return Path(env).expanduser()
    config_home = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return config_home / "edge-toolchain" / "keys"


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _load_key(path: Path, what: str, load, key_type: type, missing_hint: str):
    try:
        key = load(Path(path).read_bytes())
    except FileNotFoundError:
        raise BundleError(f"{what} {path} does not exist; {missing_hint}") from None
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise BundleError(f"{what} {path} is not a readable PEM key ({exc})") from None
    if not isinstance(key, key_type):
        raise BundleError(f"{what} {path} is not an Ed25519 key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    return _load_key(path, "public key", serialization.load_pem_public_key, Ed25519PublicKey,
                     "pass --pubkey with the key that signed the bundle")


def load_private_key(path: Path) -> Ed25519PrivateKey:
    return _load_key(path, "signing key", lambda data: serialization.load_pem_private_key(data, password=None),
                     Ed25519PrivateKey, "create one with `toolchain keys generate --out DIR`")


def verify_signature(public_key: Ed25519PublicKey, signature: bytes, data: bytes) -> bool:
    try:
        public_key.verify(signature, data)
    except InvalidSignature:
        return False
    return True


def write_keypair(directory: Path, overwrite: bool = False) -> tuple[Path, Path]:
    """Create a key pair; the private key is written 0600 and never replaced unless asked."""
    directory = Path(directory)
    private_path, public_path = directory / PRIVATE_KEY_NAME, directory / PUBLIC_KEY_NAME
    if private_path.exists() and not overwrite:
        raise BundleError(f"{private_path} already exists; use --force to replace it (bundles signed with it will no longer verify)")
    directory.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    durable.write_bytes(private_path, private_pem, mode=0o600)
    durable.write_bytes(public_path, public_pem, mode=0o644)
    return private_path, public_path

"""The keys a device trusts to sign bundles: a keyring folder, changed only by signed, numbered rotations.

A device folder's `trusted/` holds one PEM public key per file (`KEYID.pub`) and `state.json`: the last
rotation applied (`seq`), the revoked key ids with the reason, the sha256 of each rotation applied (a
chain from another log is refused) and the id of the last rotation command answered. The single `trusted.pub` of device folders made before keyrings is read too: alone it is a
keyring of one, and a rotation can add keys beside it and revoke it like any other.

A rotation (docs/bundle.md "Key rotation") is a JSON body signed by a key the device trusts *before* it:
it adds keys and revokes keys, and carries a sequence number. Rotations apply strictly in order (the
device refuses N+2 until it has N+1) and at most once (an old one is skipped), so the whole chain can be
re-sent at any time: the operator publishes it retained on each device's `cmd` topic and a device that
was offline catches up when it reconnects. After a revocation a bundle signed by that key is refused,
with the reason, however valid it was before; only the bundles already installed on the device's disk
(verified when they came in) keep loading, so a revocation never leaves a device without a model.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from runtime_agent import durable
from runtime_agent.errors import AgentError, BundleError
from runtime_agent.signing import key_id, load_public_key, verify_signature

ROTATION_SCHEMA = "key-rotation/1"
STATE = "state.json"
MAX_REASON = 256


@dataclass(frozen=True)
class Keyring:
    """Every key the device has (`keys`, by id), which of them are revoked and why, and the rotation seq."""

    keys: dict[str, Ed25519PublicKey]
    revoked: dict[str, str] = field(default_factory=dict)
    seq: int = 0
    answered: str = ""  # the last rotation command answered (a retained replay of it is not answered again)
    chain: tuple[str, ...] = ()  # sha256 of each rotation applied, in order: a different chain is refused

    @classmethod
    def of(cls, key: Ed25519PublicKey) -> "Keyring":
        return cls({key_id(key): key})

    @property
    def trusted(self) -> dict[str, Ed25519PublicKey]:
        return {kid: key for kid, key in self.keys.items() if kid not in self.revoked}

    def signer_of(self, signature: bytes, body: bytes, *, installed: bool = False) -> str | None:
        """The id of the trusted key that made `signature` over `body`, or None. `installed`: revoked keys
        count too (a bundle already on the device's disk was verified when it came in)."""
        candidates = self.keys if installed else self.trusted
        return next((kid for kid, key in candidates.items() if verify_signature(key, signature, body)), None)

    def refusal(self, signer: Any, what: str = "manifest") -> str:
        """Why a signature over `what` by the key `signer` (the id the signed body names, if any) does not verify."""
        trusted = ", ".join(sorted(self.trusted)) or "none"
        if isinstance(signer, str) and signer in self.revoked:
            return f"signed by key {signer}, which was revoked ({self.revoked[signer]}); sign it with a trusted key ({trusted})"
        if isinstance(signer, str) and signer not in self.trusted:
            which = "the trusted public key is" if len(self.trusted) == 1 else "the trusted keys are"
            return f"signature check failed: signed by key {signer} but {which} {trusted} (wrong --pubkey, or the {what} was altered)"
        return f"signature check failed: the {what} was altered after signing (or the signature is corrupt)"


# -- the keyring on disk ------------------------------------------------------------------------------
def load_keyring(folder: Path, legacy: Path | None = None) -> Keyring:
    """`folder`'s keys and state, plus the single `legacy` key file when it exists; refuses an empty ring."""
    folder = Path(folder)
    keys = {}
    sources = sorted(folder.glob("*.pub")) if folder.is_dir() else []
    if legacy is not None and Path(legacy).is_file():
        sources.insert(0, Path(legacy))
    if not sources:
        named = legacy if legacy is not None else folder / "KEYID.pub"
        raise BundleError(f"public key {named} does not exist; copy the build host's signing.pub there "
                          f"(or one KEYID.pub per trusted key into {folder}/)")
    for path in sources:
        key = load_public_key(path)
        keys[key_id(key)] = key
    state = _read_state(folder)
    keyring = Keyring(keys, state["revoked"], state["seq"], state["answered"], state["chain"])
    if not keyring.trusted:
        where = f"{folder}/*.pub" + (f" or {legacy}" if legacy is not None else "")
        raise BundleError(f"no trusted signing key: {where} holds none that is not revoked; "
                          "copy the build host's signing.pub there")
    return keyring


def _read_state(folder: Path) -> dict[str, Any]:
    try:
        raw = json.loads((folder / STATE).read_text())
    except FileNotFoundError:
        return {"seq": 0, "revoked": {}, "answered": "", "chain": ()}
    except (OSError, ValueError) as exc:
        raise BundleError(f"keyring state {folder / STATE} is unreadable ({exc}); restore it from the fleet's rotation log") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("seq"), int) or not isinstance(raw.get("revoked"), dict):
        raise BundleError(f"keyring state {folder / STATE} is not {{seq, revoked}}; restore it from the fleet's rotation log")
    return {"seq": raw["seq"], "revoked": dict(raw["revoked"]), "answered": str(raw.get("answered", "")),
            "chain": tuple(raw.get("chain", ()))}


def _save(folder: Path, keyring: Keyring, new_keys: dict[str, Ed25519PublicKey]) -> None:
    """New key files first, then the state that commits the rotation (a crash between them leaves a key
    file whose rotation the re-sent chain commits again)."""
    folder.mkdir(parents=True, exist_ok=True)
    for kid, key in new_keys.items():
        durable.write_bytes(folder / f"{kid}.pub", _pem(key))
    state = {"seq": keyring.seq, "revoked": keyring.revoked, "answered": keyring.answered, "chain": list(keyring.chain)}
    durable.write_bytes(folder / STATE, json.dumps(state, indent=2, sort_keys=True).encode())


def _pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


# -- rotations ---------------------------------------------------------------------------------------
def sign_rotation(private_key: Ed25519PrivateKey, seq: int, add: list[Ed25519PublicKey], revoke: dict[str, str],
                  created: str) -> dict[str, str]:
    """One rotation record as it travels: the exact signed body (JSON text) and its base64 signature."""
    body = json.dumps({"schema": ROTATION_SCHEMA, "seq": seq, "signer": key_id(private_key.public_key()),
                       "add": {key_id(key): _pem(key).decode() for key in add}, "revoke": revoke, "created": created},
                      sort_keys=True)
    return {"body": body, "signature": base64.b64encode(private_key.sign(body.encode())).decode()}


@dataclass(frozen=True)
class Rotation:
    seq: int
    signer: str
    add: dict[str, Ed25519PublicKey]
    revoke: dict[str, str]
    body: bytes
    signature: bytes

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.body).hexdigest()


def parse_rotation(record: Any) -> Rotation:
    """A rotation record's fields, each checked (not yet its signature: that needs the keyring)."""
    if not isinstance(record, dict) or not isinstance(record.get("body"), str) or not isinstance(record.get("signature"), str):
        raise AgentError("a rotation must be {\"body\": JSON text, \"signature\": base64}")
    try:
        signature = base64.b64decode(record["signature"], validate=True)
        body = json.loads(record["body"])
    except (binascii.Error, ValueError, RecursionError) as exc:
        raise AgentError(f"rotation is not base64 and JSON ({type(exc).__name__})") from None
    if not isinstance(body, dict) or body.get("schema") != ROTATION_SCHEMA:
        raise AgentError(f"rotation 'schema' must be {ROTATION_SCHEMA!r}")
    seq, signer, add, revoke = body.get("seq"), body.get("signer"), body.get("add"), body.get("revoke")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        raise AgentError(f"rotation 'seq' must be an integer >= 1, got {seq!r:.40}")
    if not isinstance(signer, str) or not isinstance(add, dict) or not isinstance(revoke, dict):
        raise AgentError(f"rotation {seq} needs 'signer' (a key id), 'add' {{key id: PEM}} and 'revoke' {{key id: reason}}")
    keys = {}
    for kid, pem in add.items():
        try:
            key = serialization.load_pem_public_key(pem.encode()) if isinstance(pem, str) else None
        except (ValueError, TypeError, UnsupportedAlgorithm):
            key = None
        if not isinstance(key, Ed25519PublicKey) or key_id(key) != kid:
            raise AgentError(f"rotation {seq} adds key {kid!r:.40}, which is not the Ed25519 PEM key of that id")
        keys[kid] = key
    if bad := [kid for kid, why in revoke.items() if not isinstance(why, str) or len(why) > MAX_REASON]:
        raise AgentError(f"rotation {seq} revokes {bad[0]!r:.40} without a reason of at most {MAX_REASON} characters")
    if both := sorted(set(keys) & set(revoke)):
        raise AgentError(f"rotation {seq} both adds and revokes key {both[0]}")
    return Rotation(seq, signer, keys, dict(revoke), record["body"].encode(), signature)


def apply_rotation(keyring: Keyring, rotation: Rotation) -> Keyring:
    """The keyring after `rotation`, which must be the next in order and signed by a key trusted now."""
    if rotation.seq != keyring.seq + 1:
        raise AgentError(f"rotation {rotation.seq} cannot apply: this device is at rotation {keyring.seq} "
                         f"and needs {keyring.seq + 1} first (send the whole chain)")
    if keyring.signer_of(rotation.signature, rotation.body) != rotation.signer:
        raise AgentError(f"rotation {rotation.seq}: {keyring.refusal(rotation.signer, 'rotation')}")
    revoked = {**keyring.revoked, **{kid: f"rotation {rotation.seq}: {why or 'revoked'}" for kid, why in rotation.revoke.items()}}
    rotated = Keyring({**keyring.keys, **rotation.add}, revoked, rotation.seq, keyring.answered,
                      (*keyring.chain, rotation.digest))
    if not rotated.trusted:
        raise AgentError(f"rotation {rotation.seq} would leave this device no trusted key; add one in the same rotation")
    return rotated


def rotate(folder: Path, legacy: Path | None, records: Any, command_id: str) -> tuple[Keyring, list[int], bool]:
    """Apply, in order, the rotations of `records` (a chain) that `folder` has not applied yet; save the
    keyring. Returns it, the sequence numbers applied, and whether this command still needs an answer
    (not when it is a replay, e.g. the retained chain on a reconnect, that changed nothing)."""
    if not isinstance(records, list) or not records:
        raise AgentError("rotate_keys needs 'rotations': a non-empty list of signed rotations")
    keyring = load_keyring(folder, legacy)
    first, applied, added, error = keyring, [], {}, None
    for rotation in sorted((parse_rotation(r) for r in records), key=lambda r: r.seq):
        if rotation.seq <= keyring.seq:
            if rotation.seq <= len(keyring.chain) and keyring.chain[rotation.seq - 1] != rotation.digest:
                raise AgentError(f"rotation {rotation.seq} is not the rotation {rotation.seq} this device applied: "
                                 "the chain comes from another rotation log")
            continue  # applied before: a rotation applies once
        try:
            keyring = apply_rotation(keyring, rotation)
        except AgentError as exc:
            error = exc  # keep what applied before it
            break
        applied.append(rotation.seq)
        added.update(rotation.add)
    answer = bool(applied) or command_id != first.answered
    if error is None:
        keyring = replace(keyring, answered=command_id)
    if applied or keyring.answered != first.answered:
        _save(Path(folder), keyring, added)
    if error is not None:
        raise error
    return keyring, applied, answer

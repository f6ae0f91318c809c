"""Key rotation for a fleet: the signed rotation log, and sending it so that every device ends up applying it.

The log (`rotations.json` in the key folder by default) is the chain of every rotation made, in order; a new
rotation takes the next sequence number and is signed by the current signing key, which devices trust
before it (`runtime_agent.keyring` checks that, and applies each rotation once, in order).

A device keeps no MQTT session, so a command sent while it is offline would be lost. The whole chain
therefore goes to each device's `cmd` topic as a *retained* `rotate_keys` command: a device online now
applies it and answers; one that is offline finds it when it next subscribes, and applies the rotations
it missed, in order. Re-sending the chain is harmless (a device skips what it has), so the retained
command can stay; each `keys rotate` replaces it with the longer chain.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from runtime_agent.errors import AgentError
from runtime_agent.keyring import parse_rotation, sign_rotation
from runtime_agent.protocol import MAX_COMMAND_BYTES
from toolchain.deploy.control import CommandResult, send_command
from toolchain.deploy.push.client import PushClient
from toolchain.errors import ToolchainError

def read_log(path: Path) -> list[dict[str, str]]:
    """The chain of signed rotations so far (empty when none was made)."""
    try:
        chain = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise ToolchainError(f"rotation log {path} is unreadable ({exc}); restore it from a backup") from None
    try:
        seqs = [parse_rotation(record).seq for record in chain] if isinstance(chain, list) else None
    except AgentError as exc:
        raise ToolchainError(f"rotation log {path}: {exc}") from None
    if seqs != list(range(1, len(chain) + 1)):
        raise ToolchainError(f"rotation log {path} is not a chain of rotations 1..N; restore it from a backup")
    return chain


def add_rotation(path: Path, signing_key: Ed25519PrivateKey, add: list[Ed25519PublicKey],
                 revoke: dict[str, str]) -> list[dict[str, str]]:
    """Sign the next rotation with `signing_key`, append it to the log at `path` (atomically), return the chain."""
    if not add:
        raise ToolchainError("a rotation adds at least one key (--new-pubkey): devices must keep a trusted key")
    chain = read_log(path)
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    chain.append(sign_rotation(signing_key, len(chain) + 1, add, revoke, created))
    size = len(json.dumps({"rotations": chain}))
    if size > MAX_COMMAND_BYTES - 1024:
        raise ToolchainError(f"the rotation chain would be {size} bytes, over what one command carries "
                             f"({MAX_COMMAND_BYTES} bytes, about 150 rotations)")
    tmp = Path(path).with_name(f".{Path(path).name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(chain, indent=1) + "\n")
    os.replace(tmp, path)
    return chain


def send_chain(client: PushClient, fleet: str, devices: list[str], chain: list[dict[str, str]],
               timeout_s: float) -> list[CommandResult]:
    """Publish the chain retained to each device's `cmd` and wait for the answers of those online."""
    return send_command(client, fleet, devices, "rotate_keys", {"rotations": chain}, timeout_s, retain=True)

"""`toolchain keys generate|rotate` and `toolchain verify`: the ed25519 key that signs bundles, rotating
the keys a fleet trusts, and checking a bundle the way a device does (signature, format, every file's
hash, no unaccounted byte)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from runtime_agent.signing import PRIVATE_KEY_NAME, default_key_dir
from toolchain.commands.options import (DEFAULT_PUBKEY, BrokerOption, CaFileOption, ClientCertOption, PasswordFileOption, UsernameOption,
                                        broker_login)
from toolchain.errors import ToolchainError

app = typer.Typer(help="Manage the ed25519 keys that sign bundles and that devices trust.", no_args_is_help=True)


@app.command("generate")
def keys_generate(
    out: Annotated[Path, typer.Option(help="folder for signing.key (private, 0600) and signing.pub")] = default_key_dir(),
    force: Annotated[bool, typer.Option(help="replace an existing key")] = False,
) -> None:
    """Create a signing key pair."""
    from runtime_agent.signing import write_keypair

    try:
        private, public = write_keypair(out, overwrite=force)
    except OSError as exc:  # a file where the folder should be, a folder this user cannot write
        raise ToolchainError(f"--out {out}: cannot write the key pair there ({exc.strerror or exc}); pass a folder you can write to") from exc
    print(f"private key: {private}\npublic key: {public}")


@app.command("rotate")
def keys_rotate(
    broker: BrokerOption,
    fleet: Annotated[str, typer.Option(help="the fleet whose devices (every one with a retained status) get the rotation")],
    new_pubkey: Annotated[list[Path], typer.Option(help="public key devices trust from now on (repeatable), e.g. the "
                                                        "signing.pub of `toolchain keys generate --out DIR`")],
    revoke: Annotated[Optional[list[str]], typer.Option(help="key id (or .pub file) devices stop trusting (repeatable); "
                                                              "bundles it signed are refused from then on")] = None,
    reason: Annotated[str, typer.Option(help="why the keys are revoked (devices report it when they refuse a bundle)")] = "key rotated",
    key: Annotated[Path, typer.Option(help="a signing key the devices trust now: it signs the rotation")] = default_key_dir() / PRIVATE_KEY_NAME,
    log: Annotated[Path, typer.Option(help="the rotation log: every rotation so far, in order (keep it with the keys)")] = default_key_dir() / "rotations.json",
    username: UsernameOption = None,
    password_file: PasswordFileOption = None,
    ca_file: CaFileOption = None,
    client_cert: ClientCertOption = None,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the online devices' answers")] = 30.0,
) -> None:
    """Add trusted keys (and revoke old ones) on every device of a fleet; offline devices catch up when they reconnect."""
    from runtime_agent.protocol import ONLINE
    from runtime_agent.signing import key_id, load_private_key, load_public_key
    from toolchain.deploy.push import PushClient, device_statuses
    from toolchain.deploy.rotation import add_rotation, send_chain

    if timeout <= 0:
        raise ToolchainError(f"--timeout must be more than 0 seconds, got {timeout}")
    signing_key = load_private_key(key)
    added = [load_public_key(path) for path in new_pubkey]
    revoked = {key_id(load_public_key(Path(r))) if r.endswith(".pub") else r: reason for r in revoke or []}
    login = broker_login(broker, username, password_file, ca_file, client_cert)
    with PushClient(login) as client:
        statuses = device_statuses(client, fleet)
        if not statuses:
            raise ToolchainError(f"no device of fleet {fleet!r} on {broker} (none has a retained status)")
        chain = add_rotation(log, signing_key, added, revoked)
        online = [name for name, status in statuses.items() if status.get("state") == ONLINE]
        offline = [name for name in statuses if name not in online]
        results = send_chain(client, fleet, online, chain, timeout) + send_chain(client, fleet, offline, chain, 0.0)
    typer.echo(f"rotation {len(chain)}: adds {', '.join(map(key_id, added))}"
               + (f", revokes {', '.join(revoked)}" if revoked else "") + f"; signed by {key_id(signing_key.public_key())}")
    for result in results:
        pending = result.device in offline and result.state == "timeout"
        detail = "offline: applies the chain when it reconnects (retained)" if pending else f"{result.state}: {result.detail}"
        typer.echo(f"{result.fleet}/{result.device}: {detail}")
    if failed := [r.device for r in results if not r.ok and not (r.device in offline and r.state == "timeout")]:
        typer.echo(f"rotation {len(chain)} failed on {len(failed)} device(s): {', '.join(failed)}", err=True)
        raise typer.Exit(1)


def verify(
    bundle: Annotated[Path, typer.Argument(help="a .bundle file")],
    pubkey: Annotated[Path, typer.Option(help="trusted public key, or a device's keyring folder (trusted/: "
                                              "revoked keys are refused)")] = DEFAULT_PUBKEY,
) -> None:
    """Check a bundle's signature, format and every file's hash."""
    from runtime_agent.bundle import read_bundle
    from runtime_agent.keyring import load_keyring
    from runtime_agent.signing import load_public_key

    verified = read_bundle(bundle, load_keyring(pubkey) if pubkey.is_dir() else load_public_key(pubkey))
    manifest = verified.manifest
    print(f"OK {bundle}: {manifest['name']} v{manifest['version']} for {manifest['target']}, "
          f"{len(manifest['artifacts'])} files verified, signed by key {manifest['key_id']}")

"""`toolchain keys generate` and `toolchain verify`: the ed25519 key that signs bundles, and checking a
bundle the way a device does (signature, format, every file's hash, no unaccounted byte)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from runtime_agent.signing import default_key_dir
from toolchain.commands.options import DEFAULT_PUBKEY

app = typer.Typer(help="Manage the ed25519 key that signs bundles.", no_args_is_help=True)


@app.command("generate")
def keys_generate(
    out: Annotated[Path, typer.Option(help="folder for signing.key (private, 0600) and signing.pub")] = default_key_dir(),
    force: Annotated[bool, typer.Option(help="replace an existing key")] = False,
) -> None:
    """Create a signing key pair."""
    from runtime_agent.signing import write_keypair

    private, public = write_keypair(out, overwrite=force)
    print(f"private key: {private}\npublic key: {public}")


def verify(
    bundle: Annotated[Path, typer.Argument(help="a .bundle file")],
    pubkey: Annotated[Path, typer.Option(help="trusted public key")] = DEFAULT_PUBKEY,
) -> None:
    """Check a bundle's signature, format and every file's hash."""
    from runtime_agent.bundle import read_bundle
    from runtime_agent.signing import load_public_key

    verified = read_bundle(bundle, load_public_key(pubkey))
    manifest = verified.manifest
    print(f"OK {bundle}: {manifest['name']} v{manifest['version']} for {manifest['target']}, "
          f"{len(manifest['artifacts'])} files verified, signed by key {manifest['key_id']}")

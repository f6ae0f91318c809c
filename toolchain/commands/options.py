"""Options shared by several commands: the target profile, the trusted key, the fleet operator's password."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from runtime_agent.signing import PUBLIC_KEY_NAME, default_key_dir
from toolchain.errors import ToolchainError

if TYPE_CHECKING:
    from toolchain.deploy.mqtt import BrokerLogin

TargetOption = Annotated[str, typer.Option("--target", "-t", help="profile id, alias (e.g. jetson) or path to a profile .toml")]
DEFAULT_PUBKEY = default_key_dir() / PUBLIC_KEY_NAME


def read_password(password_file: Optional[Path], username: Optional[str]) -> Optional[str]:
    """The operator's password from a file (never on the command line, where `ps` shows it)."""
    if password_file is None:
        return None
    if not username:
        raise ToolchainError("--password-file needs --username (the fleet operator account of the broker)")
    try:
        return password_file.read_text().strip()
    except OSError as exc:
        raise ToolchainError(f"cannot read --password-file {password_file}: {exc.strerror}") from None


# How an operator command logs in to the broker (`fleet rollback`, `fleet config`).
BrokerOption = Annotated[str, typer.Option(help="MQTT broker, mqtt://HOST:PORT or mqtts://HOST:PORT")]
UsernameOption = Annotated[Optional[str], typer.Option(help="broker user (the fleet operator account)")]
PasswordFileOption = Annotated[Optional[Path], typer.Option(help="file holding the broker password")]
CaFileOption = Annotated[Optional[Path], typer.Option(help="CA certificate that signed the broker's (mqtts://)")]
ClientCertOption = Annotated[Optional[Path], typer.Option(
    help="client certificate and key, one PEM (mqtts:// brokers that require one: DIR/operator.pem of `toolchain broker start`)")]


def broker_login(broker: str, username: Optional[str], password_file: Optional[Path], ca_file: Optional[Path],
                 client_cert: Optional[Path]) -> BrokerLogin:
    """The broker login of the options above, the password read from its file (`read_password`). The MQTT
    layer is imported only here: most commands never reach the broker."""
    from toolchain.deploy.mqtt import BrokerLogin

    return BrokerLogin(broker, username, read_password(password_file, username), ca_file, client_cert)

"""When the device's TLS credentials expire: its client certificate and the CA it trusts.

Why the device reports it: a certificate that expires in the field takes the device off the fleet at a
moment nobody chose (the broker refuses the handshake, nothing can reach the device to fix it), and
only the device knows which files it actually uses. So the agent reads both `notAfter`s from its own
folder and puts them in its retained status (`certificates`), and `toolchain fleet status` shows the
days left and marks those under 30 days or past. Read with `cryptography` (the agent's TLS stack,
OpenSSL through paho, does not expose it); a file that does not parse is left out, never fatal: the
TLS handshake is what decides whether the device connects.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from runtime_agent.config import AgentConfig

log = logging.getLogger(__name__)


def not_after(path: Path) -> float | None:
    """The first certificate's expiry in `path` (PEM; a certificate + key file is fine), Unix seconds."""
    from cryptography import x509

    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes()).not_valid_after_utc.timestamp()
    except (OSError, ValueError) as exc:
        log.warning("cannot read the certificate in %s: %s", path, exc)
        return None


def expiry(config: AgentConfig) -> dict[str, Any]:
    """``{"certificates": {"client_not_after": ..., "ca_not_after": ...}}`` for a status message, each
    only when the device has that file; ``{}`` for a device without TLS files."""
    found = {key: when for key, path in (("client_not_after", config.client_cert), ("ca_not_after", config.ca_file))
             if path is not None and (when := not_after(path)) is not None}
    return {"certificates": found} if found else {}

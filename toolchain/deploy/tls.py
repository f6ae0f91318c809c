"""A private certificate authority, server certificates and client certificates for `mqtts://` brokers.

Why a private CA rather than a self-signed server certificate: devices are provisioned with the CA
certificate (`[mqtt] ca_file` in agent.toml) and verify the broker with full chain *and* host-name
checking, exactly as they would against a public CA. The broker's certificate can then be renewed or
re-issued for a new address without touching a single device, because the trust anchor stays the same.

The certificates are built so that OpenSSL (and so Python's `ssl`, paho-mqtt and mosquitto) accepts them
under strict verification:
- the CA has `BasicConstraints(ca=True, path_length=0)` (critical): it may sign server certificates
  but no intermediate CAs, and `KeyUsage` keyCertSign + cRLSign only (critical);
- the server certificate has `BasicConstraints(ca=False)` (critical), `KeyUsage` digitalSignature
  (ECDHE-ECDSA key exchange signs the handshake; no keyEncipherment, which EC keys cannot do),
  `ExtendedKeyUsage` serverAuth, and every host name / IP address in `SubjectAlternativeName`: modern
  TLS clients ignore the subject's common name for host-name checking, and match an IP address only
  against an `IPAddress` SAN (never a DNS one), so `127.0.0.1` and `localhost` are both listed;
- a client certificate (mutual TLS: devices, the operator, site bridges) is the same leaf with
  `ExtendedKeyUsage` clientAuth, the client's name as common name, and no SAN;
- all carry Subject/Authority Key Identifiers, which OpenSSL's strict mode (X509_STRICT, the default
  in newer Pythons) requires to build the chain.

Keys are ECDSA P-256: small, fast on device CPUs, and accepted by every TLS 1.2/1.3 stack. Private keys
are written 0600, every file atomically (temporary file in the same folder, fsync, rename), so a crash
never leaves a half-written key that a broker would refuse at its next start.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path
from typing import Iterable

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from runtime_agent import durable

DEFAULT_HOSTS = ("127.0.0.1", "localhost")
CA_DAYS = 3650  # the trust anchor lives on devices: long-lived, so server certificates can rotate under it
SERVER_DAYS = 365
CLIENT_DAYS = 365  # a device re-flashed (or its certificate renewed) within a year; `fleet status` shows what is left
RENEW_BEFORE = dt.timedelta(days=30)  # a reused server certificate closer than this to expiry is re-issued
_BACKDATE = dt.timedelta(minutes=5)  # tolerate small clock differences between host and device


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write `data` to `path` with `mode`, durably and whole (`runtime_agent.durable`), making its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    durable.write_bytes(path, data, mode)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _san(hosts: Iterable[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(h.strip() for h in hosts if h and h.strip()):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def make_ca(directory: Path, name: str = "edge-toolchain local CA", days: int = CA_DAYS) -> tuple[Path, Path]:
    """Create a new CA in `directory`: returns `(ca.pem, ca.key)`. Always a fresh key (callers decide reuse).

    The CA certificate is what devices trust (`[mqtt] ca_file`); the key stays with whoever issues
    broker certificates and is written 0600.
    """
    directory = Path(directory)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edge-toolchain")])
    now = _now()
    public = key.public_key()
    cert = (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject).public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "ca.pem", directory / "ca.key"
    _write_atomic(key_path, _key_pem(key), 0o600)
    _write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert_path, key_path


def _issue(ca: tuple[Path, Path], common_name: str, usage: x509.ObjectIdentifier, days: int,
           san: list[x509.GeneralName] | None = None) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A leaf certificate (fresh P-256 key) signed by `ca` for `usage` (serverAuth or clientAuth).

    Never valid past the CA (a chain cannot outlive its anchor); `digitalSignature` only, since
    ECDHE-ECDSA signs the handshake on both sides and an EC key cannot encipher."""
    ca_cert = x509.load_pem_x509_certificate(Path(ca[0]).read_bytes())
    ca_key = serialization.load_pem_private_key(Path(ca[1]).read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key()
    now = _now()
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64])]))
               .issuer_name(ca_cert.subject).public_key(public)
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - _BACKDATE).not_valid_after(not_after)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                            crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()), critical=False))
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def make_server_cert(directory: Path, ca: tuple[Path, Path], hosts: Iterable[str] = DEFAULT_HOSTS,
                     name: str = "server", days: int = SERVER_DAYS) -> tuple[Path, Path]:
    """Issue a server certificate signed by `ca` (= `make_ca`'s result) for `hosts` plus 127.0.0.1 and
    localhost: returns `(NAME.pem, NAME.key)` in `directory`.

    `hosts` are DNS names or IP addresses; each becomes a SAN of the right kind, since clients check the
    host they dialled against these (an IP only against IP SANs). The first host is also the common name
    (informational only). The key is fresh and written 0600.
    """
    directory = Path(directory)
    names = _san([*hosts, *DEFAULT_HOSTS])
    cert, key = _issue(ca, str(names[0].value), ExtendedKeyUsageOID.SERVER_AUTH, days, names)
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    # Key first: a reader that sees the new certificate also finds its key (a crash in between leaves
    # a mismatched pair, which `server_cert_usable` rejects, so the next start re-issues both).
    _write_atomic(key_path, _key_pem(key), 0o600)
    _write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert_path, key_path


def make_client_cert(path: Path, ca: tuple[Path, Path], common_name: str, days: int = CLIENT_DAYS) -> Path:
    """Issue a client certificate (clientAuth, CN = `common_name`: a device id, the operator or a bridge)
    signed by `ca`, written with its private key in ONE PEM file at `path`, 0600.

    Why one file: it is one credential that travels as a unit (a device folder, `--client-cert FILE`);
    Python's `ssl.load_cert_chain(certfile)`, paho's `tls_set(certfile=...)` and mosquitto's
    `bridge_certfile`/`bridge_keyfile` all read the certificate and the key from the same PEM. The key is
    generated here, on the host that holds the CA, and never leaves `path`.
    """
    cert, key = _issue(ca, common_name, ExtendedKeyUsageOID.CLIENT_AUTH, days)
    _write_atomic(Path(path), cert.public_bytes(serialization.Encoding.PEM) + _key_pem(key), 0o600)
    return Path(path)


def client_cert_usable(path: Path, ca_cert_path: Path) -> bool:
    """True when the client certificate file at `path` can be reused: it holds a certificate and its key,
    was signed by this CA, and is not within `RENEW_BEFORE` of expiry."""
    try:
        data = Path(path).read_bytes()
        cert = x509.load_pem_x509_certificate(data)
        key = serialization.load_pem_private_key(data[data.index(b"-----BEGIN PRIVATE KEY-----"):], password=None)
        cert.verify_directly_issued_by(x509.load_pem_x509_certificate(Path(ca_cert_path).read_bytes()))
    except (OSError, ValueError, TypeError, InvalidSignature):
        return False
    return cert.public_key().public_numbers() == key.public_key().public_numbers() and _current(cert)


def _current(cert: x509.Certificate) -> bool:
    now = _now()
    return cert.not_valid_before_utc <= now and now + RENEW_BEFORE < cert.not_valid_after_utc


def ca_usable(ca: tuple[Path, Path]) -> bool:
    """True when the CA files exist, parse, belong together, and the CA is valid now for a while yet."""
    try:
        cert = x509.load_pem_x509_certificate(Path(ca[0]).read_bytes())
        key = serialization.load_pem_private_key(Path(ca[1]).read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return False
    return cert.public_key().public_numbers() == key.public_key().public_numbers() and _current(cert)


def server_cert_usable(server: tuple[Path, Path], ca_cert_path: Path, hosts: Iterable[str] = DEFAULT_HOSTS) -> bool:
    """True when an existing server certificate can be reused: its key matches, it was signed by this CA,
    it covers every host in `hosts` (plus the defaults), and it is not within `RENEW_BEFORE` of expiry."""
    try:
        cert = x509.load_pem_x509_certificate(Path(server[0]).read_bytes())
        key = serialization.load_pem_private_key(Path(server[1]).read_bytes(), password=None)
        ca_cert = x509.load_pem_x509_certificate(Path(ca_cert_path).read_bytes())
        cert.verify_directly_issued_by(ca_cert)
        present = set(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except (OSError, ValueError, TypeError, x509.ExtensionNotFound, InvalidSignature):
        return False
    if cert.public_key().public_numbers() != key.public_key().public_numbers():
        return False
    return set(_san([*hosts, *DEFAULT_HOSTS])) <= present and _current(cert)

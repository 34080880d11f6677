"""TLS contexts, and the self-signed development certificate used when none is configured."""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

DEV_CERT_NAME = "dev-cert.pem"
DEV_KEY_NAME = "dev-key.pem"
_DEV_VALIDITY = dt.timedelta(days=365)
# Renew a little before expiry so that a long-running server does not cross it unnoticed.
_RENEW_BEFORE = dt.timedelta(days=7)


@dataclass(frozen=True, slots=True)
class Certificate:
    """A certificate and key on disk, with the SHA-256 fingerprint people compare."""

    cert_path: Path
    key_path: Path
    fingerprint_sha256: str
    created: bool = False


def server_context(cert_path: Path, key_path: Path) -> ssl.SSLContext:
    """A server context: TLS 1.2 or newer, the library's secure defaults otherwise."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_path, key_path)
    return context


def client_context(cafile: Path | None = None) -> ssl.SSLContext:
    """A client context that verifies the server against the system CAs and ``cafile``."""
    context = ssl.create_default_context()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cafile is not None:
        context.load_verify_locations(cafile=cafile)
    return context


def fingerprint(cert_path: Path) -> str:
    """SHA-256 of the DER certificate as colon-separated hex, as browsers and openssl show it."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    digest = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def ensure_dev_certificate(state_dir: Path, *, hostnames: tuple[str, ...] = ()) -> Certificate:
    """Reuse the development certificate under ``state_dir``, or make one valid for a year.

    It names ``localhost``, 127.0.0.1, ::1, this machine's hostname and ``hostnames``; the key
    file is readable by its owner only.
    """
    cert_path, key_path = state_dir / DEV_CERT_NAME, state_dir / DEV_KEY_NAME
    if cert_path.exists() and key_path.exists():
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        if cert.not_valid_after_utc - _RENEW_BEFORE > dt.datetime.now(dt.UTC):
            return Certificate(cert_path, key_path, fingerprint(cert_path))
    state_dir.mkdir(parents=True, exist_ok=True)
    names = ("localhost", socket.gethostname(), *hostnames)
    write_self_signed(cert_path, key_path, dns_names=names, ips=("127.0.0.1", "::1"))
    return Certificate(cert_path, key_path, fingerprint(cert_path), created=True)


def write_self_signed(
    cert_path: Path,
    key_path: Path,
    *,
    dns_names: tuple[str, ...] = ("localhost",),
    ips: tuple[str, ...] = ("127.0.0.1", "::1"),
    validity: dt.timedelta = _DEV_VALIDITY,
) -> None:
    """Write a self-signed P-256 certificate that clients can trust directly as a CA file."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "receiver development")])
    now = dt.datetime.now(dt.UTC)
    unique_dns = list(dict.fromkeys(n for n in dns_names if n))
    san: list[x509.GeneralName] = [x509.DNSName(n) for n in unique_dns]
    san += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + validity)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_bytes)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))

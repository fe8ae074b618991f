"""Test certificates made at test time (the `cryptography` package): a CA, a server and a client certificate."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID = datetime.timedelta(days=1)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.with_suffix(".key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                           serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))
    path.with_suffix(".key").chmod(0o600)
    return path.with_suffix(".crt"), path.with_suffix(".key")


@dataclass(frozen=True)
class Authority:
    """A self-signed CA that signs leaf certificates."""

    name: str
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    cert_path: Path

    @classmethod
    def create(cls, folder: Path, name: str) -> Authority:
        key, subject = _key(), x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - VALID).not_valid_after(now + VALID)
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(key, hashes.SHA256()))
        cert_path, _ = _write(folder / name, cert, key)
        return cls(name, cert, key, cert_path)

    def issue(self, folder: Path, name: str, *, server: bool) -> tuple[Path, Path]:
        """A leaf certificate (server: for 127.0.0.1 and localhost; else a client certificate); (crt, key) paths."""
        key = _key()
        now = datetime.datetime.now(datetime.UTC)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                   .issuer_name(self.cert.subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - VALID)
                   .not_valid_after(now + VALID)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        return _write(folder / name, builder.sign(self.key, hashes.SHA256()), key)


@dataclass(frozen=True)
class PKI:
    """What the security tests use: one CA with a server and a client certificate, and a rogue CA's client."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_ca: Path
    rogue_client_cert: Path
    rogue_client_key: Path


def make_pki(folder: Path) -> PKI:
    ca, rogue = Authority.create(folder, "test-ca"), Authority.create(folder, "rogue-ca")
    server = ca.issue(folder, "server", server=True)
    client = ca.issue(folder, "client", server=False)
    rogue_client = rogue.issue(folder, "rogue-client", server=False)
    return PKI(ca.cert_path, *server, *client, rogue.cert_path, *rogue_client)

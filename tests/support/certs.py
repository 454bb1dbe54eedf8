"""Certificates for tests: a CA that issues leaf certificates (EC P-256, valid for a day).

    ca = CertificateAuthority("cluster-ca")
    ca.write(root / "ca.pem")
    ca.issue("cluster", ip_addresses=["127.0.0.1"]).write(root / "c.pem", root / "c-key.pem")
    ca.issue("images.test", dns_names=["images.test"], server_auth=True).write(root / "s.pem")

The extensions are the ones strict verifiers insist on (key identifiers, a critical
BasicConstraints, the CA's KeyUsage), so every TLS stack in the tests accepts the chain.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PEM = serialization.Encoding.PEM


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_pem(key) -> bytes:
    return key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def write(self, cert_path: Path, key_path: Path | None = None) -> tuple[Path, Path]:
        """PEM files: the certificate, and the key beside it (`key_path`) or after it in the
        same file (no `key_path`); returns (certificate file, key file)."""
        if key_path is None:
            Path(cert_path).write_bytes(self.cert.public_bytes(PEM) + _key_pem(self.key))
            return Path(cert_path), Path(cert_path)
        Path(cert_path).write_bytes(self.cert.public_bytes(PEM))
        Path(key_path).write_bytes(_key_pem(self.key))
        return Path(cert_path), Path(key_path)


class CertificateAuthority:
    """A self-signed CA named `common_name`."""

    def __init__(self, common_name: str):
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = _name(common_name)
        self.cert = self._sign(
            self.name,
            self.key.public_key(),
            [
                (x509.BasicConstraints(ca=True, path_length=None), True),
                (
                    x509.KeyUsage(
                        digital_signature=False,
                        content_commitment=False,
                        key_encipherment=False,
                        data_encipherment=False,
                        key_agreement=False,
                        key_cert_sign=True,
                        crl_sign=True,
                        encipher_only=False,
                        decipher_only=False,
                    ),
                    True,
                ),
            ],
        )

    def _sign(self, subject: x509.Name, public_key, extensions) -> x509.Certificate:
        now = datetime.now(UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(self.key, hashes.SHA256())

    def write(self, path: Path) -> Path:
        """The CA certificate as a PEM file (what --tls-ca-file / ca_certs take)."""
        Path(path).write_bytes(self.cert.public_bytes(PEM))
        return Path(path)

    def issue(
        self, common_name: str, *, dns_names=(), ip_addresses=(), server_auth: bool = False
    ) -> Issued:
        """A leaf certificate for `common_name`, its subjectAltName the names and addresses
        given; `server_auth` restricts it to TLS servers (extendedKeyUsage serverAuth)."""
        key = ec.generate_private_key(ec.SECP256R1())
        extensions = [(x509.BasicConstraints(ca=False, path_length=None), True)]
        alt_names = [x509.DNSName(name) for name in dns_names] + [
            x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses
        ]
        if alt_names:
            extensions.append((x509.SubjectAlternativeName(alt_names), False))
        if server_auth:
            extensions.append((x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False))
        return Issued(self._sign(_name(common_name), key.public_key(), extensions), key)

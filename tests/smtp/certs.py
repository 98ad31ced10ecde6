"""Test certificates: a throw-away CA and server certificates it signs (``cryptography``).

Generated per test (EC P-256: milliseconds), written as PEM files for the
code under test to load, with a client ``ssl.SSLContext`` that trusts only
this CA.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from pathlib import Path

from attrs import frozen
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

__all__ = ["ServerFiles", "TestCA", "peer_serial"]


@frozen
class ServerFiles:
    certificate: Path
    key: Path
    #: The certificate's serial number: tells two certificates apart from the client side.
    serial: int


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class TestCA:
    """A CA in ``directory``; :meth:`issue` writes server certificates signed by it."""

    __test__ = False  # not a pytest class

    def __init__(self, directory: Path, name: str = "duravip test CA") -> None:
        self.directory = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.ca_file = directory / "ca.pem"
        self.ca_file.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(
        self, stem: str, hostname: str = "localhost", ip: str = "127.0.0.1", *more_ips: str
    ) -> ServerFiles:
        """``<stem>.crt`` and ``<stem>.key`` (mode 0600) for ``hostname`` and the IPs."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        serial = x509.random_serial_number()
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(hostname))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName(hostname),
                        *(x509.IPAddress(ipaddress.ip_address(a)) for a in (ip, *more_ips)),
                    ]
                ),
                critical=False,
            )
            .add_extension(
                x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )
        crt = self.directory / f"{stem}.crt"
        keyfile = self.directory / f"{stem}.key"
        crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        keyfile.touch(mode=0o600)
        keyfile.chmod(0o600)
        keyfile.write_bytes(_key_pem(key))
        return ServerFiles(certificate=crt, key=keyfile, serial=serial)

    def client_context(self) -> ssl.SSLContext:
        """Trusts this CA only, verifies the server name, TLS 1.2 at least."""
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx


def peer_serial(sock: ssl.SSLSocket | ssl.SSLObject) -> int:
    """The serial number of the certificate the server presented."""
    der = sock.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number

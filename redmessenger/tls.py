"""Trust for TLS connections RedMessenger makes: to a ``rediss://`` Redis
(``?ca=``) and, from ``redmessenger status --url https://... --ca``, to a
RedMessenger behind a private CA."""

from __future__ import annotations

import re


def trust_root(ca_file: str | None):
    """The certificates of a PEM file (a bundle may hold several), or the
    system's roots without one."""
    from twisted.internet.ssl import Certificate, platformTrust, trustRootFromCertificates

    if not ca_file:
        return platformTrust()
    with open(ca_file, "rb") as pem:
        blocks = re.findall(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----",
                            pem.read(), re.S)
    if not blocks:
        raise ValueError(f"no PEM certificate in {ca_file}")
    return trustRootFromCertificates([Certificate.loadPEM(block) for block in blocks])


def tls_error(error: BaseException) -> str | None:
    """What an OpenSSL error says, in one line (``certificate verify
    failed``), or ``None`` if ``error`` is not one."""
    from OpenSSL import SSL

    if not isinstance(error, SSL.Error):
        return None
    details = error.args[0] if error.args and isinstance(error.args[0], list) else []
    return "; ".join(item[-1] for item in details if isinstance(item, tuple) and item[-1]) \
        or str(error) or "TLS error"

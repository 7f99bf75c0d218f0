"""What the TLS of an FTP server shows: protocol, certificate expiry, trust, name, self-signed.

Python's ssl does the handshake and the verification; a certificate that
fails verification is looked at again without it, so the report can say why
(expired, self-signed, another name) and when it expires.
"""

from __future__ import annotations

import ipaddress
import ssl
import tempfile
from datetime import UTC, datetime
from typing import Any

from .checks import TlsSeen
from .wire import Control, WireError, dial, text


def sni(host: str) -> str | None:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host
    return None


def tls_context(*, verify: bool, ca: str | None = None) -> ssl.SSLContext:
    """A client context: verifying (the system's CAs, or ``ca``), or taking any certificate."""
    if verify:
        context = ssl.create_default_context(cafile=ca)
    else:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def inspect_tls(
    host: str, dialed: str, port: int, *, implicit: bool, timeout: float, ca: str | None = None
) -> tuple[TlsSeen | None, str | None]:
    """Handshake on a connection of its own: the version, and the certificate's
    expiry, trust, name and whether it signed itself (Python's ssl).

    Resource handling: each connection it makes is closed before it returns.
    Error handling: what goes wrong is the second item of the result.
    """
    by_address = sni(host) is None
    verifying = tls_context(verify=True, ca=ca)
    verifying.check_hostname = not by_address
    try:
        sock = _tls_connect(host, dialed, port, implicit, timeout, verifying)
    except ssl.SSLCertVerificationError as error:
        verify_error = str(error.verify_message or error.reason or error)
        code = error.verify_code
    except (ssl.SSLError, OSError, WireError) as error:
        return None, str(error)
    else:
        with sock:
            version = sock.version() or "?"
            certificate = sock.getpeercert() or {}
        days = days_left(certificate.get("notAfter"))
        self_signed = certificate.get("subject") == certificate.get("issuer")
        # By address, ssl checks no name: the certificate's IP entries are compared here.
        name_matches = names_match(certificate, host) if by_address else True
        return TlsSeen(version, days, True, name_matches, self_signed), None
    # Not trusted: look again without verifying, for the facts.
    try:
        sock = _tls_connect(host, dialed, port, implicit, timeout, tls_context(verify=False))
    except (ssl.SSLError, OSError, WireError) as error:
        return None, str(error)
    with sock:
        version = sock.version() or "?"
        der = sock.getpeercert(binary_form=True)
    decoded = decode_der(der) if der else {}
    self_signed = code in (18, 19) or (bool(decoded) and decoded.get("subject") == decoded.get("issuer"))
    name_matches = (code != 62 and names_match(decoded, host)) if decoded else None
    seen = TlsSeen(version, days_left(decoded.get("notAfter")), False, name_matches, self_signed, verify_error)
    return seen, None


def _tls_connect(
    host: str, dialed: str, port: int, implicit: bool, timeout: float, context: ssl.SSLContext
) -> ssl.SSLSocket:
    outcome, sock, _, _ = dial(dialed, port, timeout)
    if sock is None:
        raise OSError(f"connect {outcome.said}")
    try:
        if implicit:
            return context.wrap_socket(sock, server_hostname=sni(host))
        control = Control(sock, timeout)
        control.reply()
        code, lines = control.command("AUTH TLS")
        if code != 234:
            raise WireError(f"AUTH TLS answered {text(lines)}")
        return context.wrap_socket(sock, server_hostname=sni(host))
    except BaseException:
        sock.close()
        raise


def days_left(not_after: object) -> int | None:
    if not isinstance(not_after, str):
        return None
    try:
        expires = datetime.fromtimestamp(ssl.cert_time_to_seconds(not_after), UTC)
    except ValueError:
        return None
    return (expires - datetime.now(UTC)).days


def decode_der(der: bytes) -> dict[str, Any]:
    """A DER certificate as ``getpeercert()`` would give it."""
    return decode_pem(ssl.DER_cert_to_PEM_cert(der))


def decode_pem(pem: str) -> dict[str, Any]:
    """A PEM certificate as ``getpeercert()`` would give it, through CPython's own
    decoder (``ssl._ssl._test_decode_cert``: the standard library has no public
    one, and ftpfix takes no dependency for this); {} when it cannot be read."""
    decoder = getattr(ssl._ssl, "_test_decode_cert", None)  # type: ignore[attr-defined]
    if decoder is None:
        return {}
    with tempfile.NamedTemporaryFile("w", suffix=".pem") as file:
        file.write(pem)
        file.flush()
        try:
            return decoder(file.name)
        except (ssl.SSLError, ValueError):
            return {}


def names_match(certificate: dict[str, Any], host: str) -> bool:
    """The certificate names ``host``: a DNS entry (one leftmost wildcard label), or an IP entry."""
    if sni(host) is None:  # an address: only an IP entry names it
        try:
            wanted = ipaddress.ip_address(host)
            return any(
                kind == "IP Address" and ipaddress.ip_address(value.strip()) == wanted
                for kind, value in certificate.get("subjectAltName", ())
            )
        except ValueError:
            return False
    names = [value for kind, value in certificate.get("subjectAltName", ()) if kind == "DNS"]
    host = host.lower().rstrip(".")
    for name in names:
        name = name.lower()
        if name == host:
            return True
        if name.startswith("*.") and "." in host and host.split(".", 1)[1] == name[2:]:
            return True
    return False

"""FTPS test parts: certificates made at test time, and ftplib clients that do
or do not resume the control connection's TLS session on data connections."""

from __future__ import annotations

import ftplib
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme


@dataclass(frozen=True)
class Certificates:
    certificate: Path  # the server's chain, PEM
    key: Path
    ca: Path  # what clients trust

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca))
        context.check_hostname = False  # the tests dial 127.0.0.1 by address
        return context


def make_certificates(folder: Path, name: str = "ftpfix.test", addresses: tuple[str, ...] = ()) -> Certificates:
    """A throwaway CA and a server certificate for ``name``, 127.0.0.1 and
    ``addresses`` (the NAT lab's public address); never committed."""
    folder.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    server = ca.issue_cert(name, "127.0.0.1", *addresses)
    certificate, key, trusted = folder / "fullchain.pem", folder / "privkey.pem", folder / "ca.pem"
    server.private_key_pem.write_to_path(str(key))
    with certificate.open("wb") as out:
        for blob in server.cert_chain_pems:
            out.write(blob.bytes())
    ca.cert_pem.write_to_path(str(trusted))
    return Certificates(certificate, key, trusted)


def tls_section(certs: Certificates, *, mode: str = "optional", reuse: bool = True, implicit_port: int = 0) -> str:
    return f"""
[tls]
mode = "{mode}"
certificate = "{certs.certificate}"
key = "{certs.key}"
require_session_reuse = {"true" if reuse else "false"}
implicit_port = {implicit_port}
"""


class ReusingFTP_TLS(ftplib.FTP_TLS):
    """ftplib's FTP_TLS, but each data connection resumes the control
    connection's TLS session, as curl, FileZilla and lftp do (ftplib does not)."""

    #: When set, data connections resume this session instead: another
    #: control connection's, as a thief's client would present.
    foreign_session: ssl.SSLSession | None = None

    #: False: behave as stock ftplib, which never resumes.
    reuse = True

    def ntransfercmd(self, cmd, rest=None):  # type: ignore[no-untyped-def]
        conn, size = ftplib.FTP.ntransfercmd(self, cmd, rest)
        if self._prot_p:
            session = self.foreign_session or (self.sock.session if self.reuse else None)
            conn = self.context.wrap_socket(conn, server_hostname=self.host, session=session)
        return conn, size


class ImplicitFTP_TLS(ReusingFTP_TLS):
    """Implicit FTPS (port 990 style): TLS from the first byte, before the
    greeting, and data connections protected without PBSZ or PROT, as curl's
    ``ftps://`` and lftp's do. ftplib has no such mode of its own."""

    def connect(self, host="", port=0, timeout=-999, source_address=None):  # type: ignore[no-untyped-def]
        if host:
            self.host = host
        if port:
            self.port = port
        if timeout != -999:
            self.timeout = timeout
        raw = socket.create_connection((self.host, self.port), self.timeout, source_address=source_address)
        self.af = raw.family
        self.sock = self.context.wrap_socket(raw, server_hostname=self.host)
        self.file = self.sock.makefile("r", encoding=self.encoding)
        self.welcome = self.getresp()
        self._prot_p = True
        return self.welcome

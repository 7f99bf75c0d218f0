"""FTPS (RFC 4217) through ftpfix: ftpfix terminates TLS, the backend stays plain.

Real servers behind ftpfix, real clients with TLS on (ftplib's FTP_TLS,
curl --ssl-reqd, lftp), certificates made at test time with trustme. Every
transfer moves 16 MiB and compares sha256.
"""

from __future__ import annotations

import ftplib
import io
import socket
import ssl
import subprocess
from pathlib import Path

import pytest

from tests.conftest import require_programs
from tests.harness import legacy
from tests.harness.clients import sha256
from tests.harness.ftps import Certificates, ReusingFTP_TLS, make_certificates, tls_section
from tests.harness.proxy import Ftpfix, config_text, start_ftpfix

pytestmark = [pytest.mark.servers, pytest.mark.root]

PASSIVE_PORTS = "20140-20159"


@pytest.fixture
def certs(tmp_path: Path) -> Certificates:
    return make_certificates(tmp_path / "certs")


def run_proxy(backend: legacy.LegacyServer, tmp_path: Path, certs: Certificates, **tls: object) -> Ftpfix:
    return start_ftpfix(
        tmp_path / "ftpfix",
        config_text(
            listen=("127.0.0.1", 0),
            backend=(backend.host, backend.port),
            public_address="127.0.0.1",
            ports=PASSIVE_PORTS,
            extra=tls_section(certs, **tls),  # type: ignore[arg-type]
        ),
    )


@pytest.fixture
def proxy(backend: legacy.LegacyServer, tmp_path: Path, certs: Certificates):
    ftpfix = run_proxy(backend, tmp_path, certs)
    try:
        yield ftpfix
    finally:
        ftpfix.stop()


def login(proxy: Ftpfix, backend: legacy.LegacyServer, certs: Certificates, cls=ReusingFTP_TLS) -> ftplib.FTP_TLS:
    ftp = cls(context=certs.client_context(), timeout=30)
    ftp.trust_server_pasv_ipv4_address = True
    ftp.connect(proxy.host, proxy.port)
    ftp.auth()
    ftp.login(backend.user, backend.password)
    ftp.prot_p()
    return ftp


def test_ftplib_retr_and_stor_protected(proxy, backend, certs, big_file: Path, tmp_path: Path) -> None:
    """AUTH TLS, PBSZ 0, PROT P, then 16 MiB each way over TLS data connections
    that resume the control session (required by default)."""
    legacy.put_file(backend, "download.bin", big_file.read_bytes())
    ftp = login(proxy, backend, certs)
    got = io.BytesIO()
    ftp.retrbinary("RETR download.bin", got.write)
    downloaded = tmp_path / "downloaded.bin"
    downloaded.write_bytes(got.getvalue())
    assert sha256(downloaded) == sha256(big_file)
    with big_file.open("rb") as source:
        ftp.storbinary("STOR uploaded.bin", source)
    assert sha256(backend.files / "uploaded.bin") == sha256(big_file)
    ftp.quit()
    closed = proxy.wait_for("session closed")
    assert closed[0]["tls_version"] in ("TLSv1.2", "TLSv1.3")
    assert closed[0]["bytes_down"] >= big_file.stat().st_size
    assert closed[0]["bytes_up"] >= big_file.stat().st_size
    assert backend.password not in proxy.log.read_text()

"""Implicit FTPS through ftpfix: a second listener that speaks TLS from the
first byte (port 990 by convention), then the same session as on the control
port, with data connections protected from the start.

Real clients (curl ``ftps://``, lftp ``ftps://``, ftplib made implicit),
a real vsftpd behind, 16 MiB each way, sha256-checked.
"""

from __future__ import annotations

import ftplib
import io
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_programs
from tests.harness import legacy
from tests.harness.clients import sha256
from tests.harness.ftps import Certificates, ImplicitFTP_TLS, make_certificates, tls_section
from tests.harness.proxy import Ftpfix, config_text, start_ftpfix

pytestmark = [pytest.mark.servers, pytest.mark.root]

PASSIVE_PORTS = "20160-20179"


@pytest.fixture
def certs(tmp_path: Path) -> Certificates:
    return make_certificates(tmp_path / "certs")


def run_proxy(backend: legacy.LegacyServer, tmp_path: Path, certs: Certificates, limits: str = "") -> Ftpfix:
    port = legacy.free_port()
    ftpfix = start_ftpfix(
        tmp_path / "ftpfix",
        config_text(
            listen=("127.0.0.1", 0),
            backend=(backend.host, backend.port),
            public_address="127.0.0.1",
            ports=PASSIVE_PORTS,
            extra=tls_section(certs, implicit_port=port) + limits,
        ),
    )
    ftpfix.implicit_port = port  # type: ignore[attr-defined]
    assert ftpfix.events("listening")[0]["implicit_tls"] == [f"127.0.0.1:{port}"]
    return ftpfix


@pytest.fixture
def proxy(vsftpd: legacy.LegacyServer, tmp_path: Path, certs: Certificates) -> Iterator[Ftpfix]:
    ftpfix = run_proxy(vsftpd, tmp_path, certs)
    try:
        yield ftpfix
    finally:
        ftpfix.stop()


def implicit_login(proxy: Ftpfix, backend: legacy.LegacyServer, certs: Certificates) -> ImplicitFTP_TLS:
    ftp = ImplicitFTP_TLS(context=certs.client_context(), timeout=30)
    ftp.trust_server_pasv_ipv4_address = True
    ftp.connect(proxy.host, proxy.implicit_port)  # type: ignore[attr-defined]
    ftp.login(backend.user, backend.password)
    return ftp


@pytest.mark.parametrize("passive", [True, False], ids=["pasv", "port"])
def test_ftplib_implicit_protected_by_default(
    proxy, vsftpd, certs, big_file: Path, tmp_path: Path, passive: bool
) -> None:
    """No AUTH, no PBSZ, no PROT: the data connections are TLS all the same
    (a plaintext data connection would fail the handshake ftplib does), in
    passive and in active mode."""
    legacy.put_file(vsftpd, "download.bin", big_file.read_bytes())
    ftp = implicit_login(proxy, vsftpd, certs)
    ftp.set_pasv(passive)
    got = io.BytesIO()
    ftp.retrbinary("RETR download.bin", got.write)
    downloaded = tmp_path / "downloaded.bin"
    downloaded.write_bytes(got.getvalue())
    assert sha256(downloaded) == sha256(big_file)
    with big_file.open("rb") as source:
        ftp.storbinary("STOR uploaded.bin", source)
    assert sha256(vsftpd.files / "uploaded.bin") == sha256(big_file)
    # AUTH on a connection that is TLS already: RFC 4217 section 4's 503.
    with pytest.raises(ftplib.error_perm, match="^503"):
        ftp.sendcmd("AUTH TLS")
    # PBSZ and PROT are still accepted, as clients send them anyway.
    assert ftp.sendcmd("PBSZ 0").startswith("200")
    assert ftp.sendcmd("PROT P").startswith("200")
    ftp.quit()
    closed = proxy.wait_for("session closed")
    assert closed[0]["implicit_tls"] is True
    assert closed[0]["tls_version"] in ("TLSv1.2", "TLSv1.3")
    mode = "passive_tls" if passive else "active_tls"
    assert [(event["verb"], event["mode"], event["code"]) for event in proxy.events("transfer")] == [
        ("RETR", mode, 226),
        ("STOR", mode, 226),
    ]
    assert vsftpd.password not in proxy.log.read_text()


def test_curl_ftps_url(proxy, vsftpd, certs, big_file: Path, tmp_path: Path) -> None:
    """curl ``ftps://`` (implicit) trusting the test CA, PASV and EPSV, 16 MiB each way."""
    require_programs("curl")
    legacy.put_file(vsftpd, "download.bin", big_file.read_bytes())
    base = f"ftps://{proxy.host}:{proxy.implicit_port}"
    common = ["curl", "-sS", "--cacert", str(certs.ca), "--user", f"{vsftpd.user}:{vsftpd.password}"]
    common += ["--no-ftp-skip-pasv-ip", "--max-time", "120"]
    for mode, flag in (("pasv", "--disable-epsv"), ("epsv", "--ftp-pasv")):
        got = tmp_path / f"downloaded-{mode}.bin"
        run = subprocess.run(
            [*common, flag, "-o", str(got), f"{base}/download.bin"], capture_output=True, text=True, check=False
        )
        assert run.returncode == 0, run.stderr
        assert sha256(got) == sha256(big_file)
        run = subprocess.run(
            [*common, flag, "-T", str(big_file), f"{base}/up-{mode}.bin"], capture_output=True, text=True, check=False
        )
        assert run.returncode == 0, run.stderr
        assert sha256(vsftpd.files / f"up-{mode}.bin") == sha256(big_file)
    # -k and --ssl-reqd, as the README shows against a self-signed certificate.
    run = subprocess.run(
        ["curl", "-sS", "-k", "--ssl-reqd", "--user", f"{vsftpd.user}:{vsftpd.password}", "--max-time", "60"]
        + ["--no-ftp-skip-pasv-ip", "-o", str(tmp_path / "again.bin"), f"{base}/download.bin"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert sha256(tmp_path / "again.bin") == sha256(big_file)
    assert not proxy.events("data connection refused: it did not resume the control session's TLS session")


@pytest.mark.parametrize("passive", [True, False], ids=["pasv", "port"])
def test_lftp_ftps_url(proxy, vsftpd, certs, big_file: Path, tmp_path: Path, passive: bool) -> None:
    """lftp ``ftps://`` (implicit, GnuTLS), passive and active, 16 MiB each way."""
    require_programs("lftp")
    legacy.put_file(vsftpd, "download.bin", big_file.read_bytes())
    got = tmp_path / "downloaded.bin"
    script = (
        f"set ftp:passive-mode {'yes' if passive else 'no'}; set ftp:ssl-protect-data yes; "
        f"set ssl:ca-file {certs.ca}; set ssl:check-hostname no; "
        "set ftp:fix-pasv-address no; set ftp:prefer-epsv no; set net:max-retries 1; set net:timeout 30; "
        f"open -u {vsftpd.user},{vsftpd.password} ftps://{proxy.host}:{proxy.implicit_port}; "
        f"get download.bin -o {got}; put {big_file} -o uploaded.bin; bye"
    )
    run = subprocess.run(["lftp", "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    assert sha256(got) == sha256(big_file)
    assert sha256(vsftpd.files / "uploaded.bin") == sha256(big_file)
    mode = "passive_tls" if passive else "active_tls"
    assert {event["mode"] for event in proxy.events("transfer") if event["verb"] in ("RETR", "STOR")} == {mode}


def test_implicit_sessions_count_against_the_limits(vsftpd, certs, tmp_path: Path) -> None:
    """The implicit listener admits as the control port does: over
    max_sessions, the 421 comes over TLS, readable; explicit and implicit
    sessions share the count."""
    ftpfix = run_proxy(vsftpd, tmp_path, certs, limits="\n[limits]\nmax_sessions = 1\n")
    try:
        first = ftplib.FTP(timeout=10)
        first.connect(ftpfix.host, ftpfix.port)
        refused = ImplicitFTP_TLS(context=certs.client_context(), timeout=10)
        with pytest.raises(ftplib.error_temp, match="^421"):
            refused.connect(ftpfix.host, ftpfix.implicit_port)  # type: ignore[attr-defined]
        first.quit()
        ftpfix.wait_for("session closed")
        again = implicit_login(ftpfix, vsftpd, certs)
        assert again.sendcmd("NOOP").startswith("200")
        again.quit()
    finally:
        ftpfix.stop()


def test_plain_client_on_the_implicit_port(proxy, vsftpd, certs) -> None:
    """A plain FTP client on the implicit port waits for a greeting that
    never comes in plain text; its first command is not a ClientHello, so
    the handshake fails and the connection closes, logged. The control port
    is unaffected."""
    with socket.create_connection((proxy.host, proxy.implicit_port), timeout=10) as raw:
        raw.sendall(b"USER anonymous\r\n")
        raw.settimeout(15)
        said = b""
        while chunk := raw.recv(100):
            said += chunk
        # A TLS alert (content type 21) at most, then the end; never an FTP reply.
        assert said == b"" or said[0] == 21, said
    [failed] = proxy.wait_for("TLS handshake failed")
    assert failed["implicit"] is True and failed["side"] == "client"
    ftp = ftplib.FTP_TLS(context=certs.client_context(), timeout=10)
    ftp.connect(proxy.host, proxy.port)
    ftp.auth()
    ftp.login(vsftpd.user, vsftpd.password)
    assert ftp.sendcmd("NOOP").startswith("200")
    ftp.quit()

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


def login(
    proxy: Ftpfix, backend: legacy.LegacyServer, certs: Certificates, context: ssl.SSLContext | None = None
) -> ReusingFTP_TLS:
    ftp = ReusingFTP_TLS(context=context or certs.client_context(), timeout=30)
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
    assert [(event["verb"], event["mode"], event["code"]) for event in proxy.events("transfer")] == [
        ("RETR", "passive_tls", 226),
        ("STOR", "passive_tls", 226),
    ]
    assert backend.password not in proxy.log.read_text()


def test_data_connection_without_session_reuse_is_refused(proxy, backend, certs) -> None:
    """Stock ftplib never resumes: with reuse required, its data connection is
    refused and the transfer gets a 425 that says why; the session goes on."""
    legacy.put_file(backend, "small.txt", b"hello\n")
    ftp = login(proxy, backend, certs)
    ftp.reuse = False
    with pytest.raises((ssl.SSLError, OSError, EOFError)):
        ftp.retrbinary("RETR small.txt", lambda _: None)
    with pytest.raises(ftplib.error_temp, match="^425 .*must resume the TLS session of its control connection"):
        ftp.getresp()
    assert ftp.sendcmd("NOOP").startswith("200")
    proxy.wait_for("data connection refused: it did not resume the control session's TLS session")


def test_another_sessions_ticket_is_refused(proxy, backend, certs) -> None:
    """A thief with a TLS session of its own (another control connection to the
    same ftpfix) presents it on the victim's data port: refused, 425."""
    legacy.put_file(backend, "small.txt", b"hello\n")
    # One client context for both, as one program would have: Python refuses
    # a session from another context before anything is sent.
    context = certs.client_context()
    thief = login(proxy, backend, certs, context)
    thief.sendcmd("NOOP")  # TLS 1.3 tickets arrive after the handshake; read them
    assert thief.sock.session is not None
    victim = login(proxy, backend, certs, context)
    victim.foreign_session = thief.sock.session
    with pytest.raises((ssl.SSLError, OSError, EOFError)):
        victim.retrbinary("RETR small.txt", lambda _: None)
    with pytest.raises(ftplib.error_temp, match="^425 .*must resume the TLS session"):
        victim.getresp()
    # Its own session still works, after the refusal.
    victim.foreign_session = None
    got = io.BytesIO()
    victim.retrbinary("RETR small.txt", got.write)
    assert got.getvalue() == b"hello\n"
    thief.quit()
    victim.quit()


def test_curl_ssl_reqd_passive(proxy, backend, certs, big_file: Path, tmp_path: Path) -> None:
    """curl --ssl-reqd (AUTH TLS, PROT P, session reuse) in PASV and EPSV, 16 MiB each way."""
    require_programs("curl")
    legacy.put_file(backend, "download.bin", big_file.read_bytes())
    base = f"ftp://{proxy.host}:{proxy.port}"
    common = ["curl", "-sS", "--ssl-reqd", "--cacert", str(certs.ca), "--user", f"{backend.user}:{backend.password}"]
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
        assert sha256(backend.files / f"up-{mode}.bin") == sha256(big_file)
    assert not proxy.events("data connection refused: it did not resume the control session's TLS session")


def read_reply(sock: socket.socket) -> bytes:
    """One whole reply, multi-line or not, read one byte at a time."""
    text = b""
    while True:
        line = b""
        while not line.endswith(b"\n"):
            line += sock.recv(1)
        text += line
        if line[3:4] == b" " and line[:3] == text[:3]:
            return text


def test_plaintext_pipelined_after_auth_is_never_read(proxy, backend, certs) -> None:
    """STARTTLS command injection (CVE-2011-0411 class): commands sent in
    plain text right behind AUTH TLS, in the same segment, must not be run
    as if they had come through TLS."""
    raw = socket.create_connection((proxy.host, proxy.port), timeout=10)
    assert read_reply(raw).startswith(b"220")
    raw.sendall(b"AUTH TLS\r\nUSER " + backend.user.encode() + b"\r\nMKD injected\r\n")
    # Byte by byte, so that nothing of the TLS handshake is read here.
    assert (reply := read_reply(raw)).startswith(b"234"), reply
    tls = certs.client_context().wrap_socket(raw, server_hostname="127.0.0.1")
    tls.sendall(b"PASS " + backend.password.encode() + b"\r\n")
    answer = tls.recv(4096)
    # The USER was thrown away, so PASS has no user to go with.
    assert answer.startswith((b"503", b"530")), answer
    # The session goes on, inside TLS, from a clean slate.
    tls.sendall(b"USER " + backend.user.encode() + b"\r\n")
    assert tls.recv(4096).startswith(b"331")
    tls.sendall(b"PASS " + backend.password.encode() + b"\r\n")
    assert tls.recv(4096).startswith(b"230")
    tls.close()
    assert not (backend.files / "injected").exists()
    proxy.wait_for("plaintext after AUTH TLS thrown away")


def test_required_mode(backend, certs, tmp_path: Path) -> None:
    """mode = "required": USER before AUTH gets 530 saying why; a transfer with PROT C gets 521."""
    ftpfix = run_proxy(backend, tmp_path, certs, mode="required")
    try:
        plain = ftplib.FTP(timeout=10)
        plain.connect(ftpfix.host, ftpfix.port)
        with pytest.raises(ftplib.error_perm, match="^530 TLS is required"):
            plain.login(backend.user, backend.password)
        plain.close()

        ftp = ReusingFTP_TLS(context=certs.client_context(), timeout=10)
        ftp.trust_server_pasv_ipv4_address = True
        ftp.connect(ftpfix.host, ftpfix.port)
        ftp.auth()
        ftp.login(backend.user, backend.password)
        features = ftp.sendcmd("FEAT")
        assert " AUTH TLS" in features and " PBSZ" in features and " PROT" in features
        ftp.sendcmd("PBSZ 0")
        ftp.sendcmd("PROT C")
        with pytest.raises(ftplib.error_perm, match="^521"):
            ftp.retrlines("LIST", lambda _: None)
        with pytest.raises(ftplib.error_perm, match="^502"):
            ftp.sendcmd("CCC")
        ftp.prot_p()
        lines: list[str] = []
        ftp.retrlines("LIST", lines.append)
        ftp.quit()
    finally:
        ftpfix.stop()


def test_lftp_ssl_force_protect_data(proxy, backend, certs, big_file: Path, tmp_path: Path) -> None:
    """lftp (GnuTLS) with ftp:ssl-force and ftp:ssl-protect-data, PASV, reuse required: 16 MiB each way."""
    require_programs("lftp")
    legacy.put_file(backend, "download.bin", big_file.read_bytes())
    got = tmp_path / "downloaded.bin"
    script = (
        "set ftp:ssl-force yes; set ftp:ssl-protect-data yes; set ssl:verify-certificate no; "
        "set ftp:fix-pasv-address no; set ftp:prefer-epsv no; set net:max-retries 1; set net:timeout 30; "
        f"open -u {backend.user},{backend.password} -p {proxy.port} {proxy.host}; "
        f"get download.bin -o {got}; put {big_file} -o uploaded.bin; bye"
    )
    run = subprocess.run(["lftp", "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    assert sha256(got) == sha256(big_file)
    assert sha256(backend.files / "uploaded.bin") == sha256(big_file)
    assert not proxy.events("data connection refused: it did not resume the control session's TLS session")
    assert proxy.events("tls started")


def test_ftplib_active_mode_protected(proxy, backend, certs, big_file: Path, tmp_path: Path) -> None:
    """PORT with PROT P: ftpfix dials the client's port and is the TLS server
    on that connection (RFC 4217: the FTP server's role, whichever end
    dials); ftplib's data connections resume the control session. 16 MiB each way."""
    legacy.put_file(backend, "download.bin", big_file.read_bytes())
    ftp = login(proxy, backend, certs)
    ftp.set_pasv(False)
    got = io.BytesIO()
    ftp.retrbinary("RETR download.bin", got.write)
    downloaded = tmp_path / "downloaded.bin"
    downloaded.write_bytes(got.getvalue())
    assert sha256(downloaded) == sha256(big_file)
    with big_file.open("rb") as source:
        ftp.storbinary("STOR uploaded.bin", source)
    assert sha256(backend.files / "uploaded.bin") == sha256(big_file)
    ftp.quit()
    assert [(event["verb"], event["mode"], event["code"]) for event in proxy.events("transfer")] == [
        ("RETR", "active_tls", 226),
        ("STOR", "active_tls", 226),
    ]


def test_lftp_active_mode_protected(proxy, backend, certs, big_file: Path, tmp_path: Path) -> None:
    """lftp with ftp:ssl-force, ftp:ssl-protect-data and ftp:passive-mode no:
    PORT and PROT P through ftpfix (curl 7.88 hangs here, curl #10666). 16 MiB each way."""
    require_programs("lftp")
    legacy.put_file(backend, "download.bin", big_file.read_bytes())
    got = tmp_path / "downloaded.bin"
    script = (
        "set ftp:ssl-force yes; set ftp:ssl-protect-data yes; set ftp:passive-mode no; "
        f"set ssl:ca-file {certs.ca}; set ssl:check-hostname no; set net:max-retries 1; set net:timeout 30; "
        f"open -u {backend.user},{backend.password} -p {proxy.port} {proxy.host}; "
        f"get download.bin -o {got}; put {big_file} -o uploaded.bin; bye"
    )
    run = subprocess.run(["lftp", "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    assert sha256(got) == sha256(big_file)
    assert sha256(backend.files / "uploaded.bin") == sha256(big_file)
    assert {event["mode"] for event in proxy.events("transfer") if event["verb"] in ("RETR", "STOR")} == {"active_tls"}
    assert not proxy.events("data connection refused: it did not resume the control session's TLS session")

"""TLS to the backend: ftpfix as the FTPS client of real FTPS servers.

vsftpd as Debian runs it with FTPS (``require_ssl_reuse=YES``, TLS forced
for logins and data: the setting mod_proxy fails against), explicit and
implicit, and pure-ftpd with ``-Y 2``; certificates made by trustme at test
time. Every combination of the client's side and the backend's side is
crossed with passive, EPSV and active mode, each moving 16 MiB both ways,
sha256-checked:

- plain clients (curl, lftp, ftplib) with a TLS backend;
- TLS clients (ftplib FTP_TLS with PROT P, explicit and implicit; curl
  ``--ssl-reqd`` and ``ftps://`` in PASV/EPSV; lftp, which also covers
  active mode, as Debian 12's curl 7.88 hangs on FTPS active mode, curl
  issue #10666) with a TLS backend.

TLS clients with plain backends are ``test_ftps.py`` and
``test_ftps_implicit.py``; plain with plain is everything else.
"""

from __future__ import annotations

import ftplib
import io
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tests.conftest import require_programs, require_servers
from tests.harness import legacy
from tests.harness.clients import Endpoint, sha256, transfer
from tests.harness.ftps import Certificates, ImplicitFTP_TLS, ReusingFTP_TLS, make_certificates, tls_section
from tests.harness.proxy import Ftpfix, config_text, start_ftpfix

pytestmark = [pytest.mark.servers, pytest.mark.root]

PASSIVE_PORTS = "20180-20199"

#: The TLS backends: (server, implicit).
BACKENDS = {
    "vsftpd-explicit": ("vsftpd", False),
    "vsftpd-implicit": ("vsftpd", True),
    "pure-ftpd-explicit": ("pure-ftpd", False),
}

#: Plain clients and the modes each can be made to use over IPv4.
PLAIN_CELLS = [
    ("curl", "pasv"),
    ("curl", "epsv"),
    ("curl", "port"),
    ("lftp", "pasv"),
    ("lftp", "epsv"),
    ("lftp", "port"),
    ("ftplib", "pasv"),
    ("ftplib", "port"),
]


@pytest.fixture
def certs(tmp_path: Path) -> Certificates:
    return make_certificates(tmp_path / "certs")


@pytest.fixture(params=BACKENDS)
def tls_backend(request: pytest.FixtureRequest, server_dir: Path, certs: Certificates) -> Iterator[legacy.LegacyServer]:
    kind, implicit = BACKENDS[request.param]
    require_servers(kind)
    server = legacy.start(
        kind, server_dir / kind, tls=legacy.ServerTls(certs.certificate, certs.key, implicit=implicit)
    )
    try:
        yield server
    finally:
        server.stop()


def backend_keys(server: legacy.LegacyServer, *, ca: Path | None, verify: bool = True) -> str:
    assert server.tls is not None
    mode = "implicit" if server.tls.implicit else "explicit"
    return f'tls = "{mode}"\ntls_verify = {"true" if verify else "false"}\ntls_ca = "{ca or ""}"\n'


def run_proxy(
    backend: legacy.LegacyServer, tmp_path: Path, certs: Certificates, *, ca: Path | None, verify: bool = True
) -> Ftpfix:
    implicit_port = legacy.free_port()
    text = config_text(
        listen=("127.0.0.1", 0),
        backend=(backend.host, backend.port),
        public_address="127.0.0.1",
        ports=PASSIVE_PORTS,
        extra=tls_section(certs, implicit_port=implicit_port),
    )
    # The [backend] keys go into its own table.
    text = text.replace("\n[passive]", backend_keys(backend, ca=ca, verify=verify) + "\n[passive]", 1)
    ftpfix = start_ftpfix(tmp_path / "ftpfix", text)
    ftpfix.implicit_port = implicit_port  # type: ignore[attr-defined]
    return ftpfix


@pytest.fixture
def proxy(tls_backend: legacy.LegacyServer, tmp_path: Path, certs: Certificates) -> Iterator[Ftpfix]:
    ftpfix = run_proxy(tls_backend, tmp_path, certs, ca=certs.ca)
    try:
        yield ftpfix
    finally:
        ftpfix.stop()


def assert_backend_protected(proxy: Ftpfix) -> None:
    """Every session secured its backend side; no data connection failed."""
    assert proxy.events("backend tls started")
    assert not proxy.events("backend TLS failed")
    assert not proxy.events("TLS handshake failed")
    for closed in proxy.events("session closed"):
        if "user" in closed:  # a session that reached the relay
            assert closed["backend_tls_version"] in ("TLSv1.2", "TLSv1.3")


@pytest.mark.parametrize(("client", "mode"), PLAIN_CELLS, ids=[f"{c}-{m}" for c, m in PLAIN_CELLS])
def test_plain_client_tls_backend(proxy, tls_backend, big_file: Path, tmp_path: Path, client: str, mode: str) -> None:
    """A client that speaks no TLS at all, a backend that demands it for
    logins and data: ftpfix is the TLS client towards the backend."""
    if client != "ftplib":
        require_programs(client)
    legacy.put_file(tls_backend, "download.bin", big_file.read_bytes())
    endpoint = Endpoint(proxy.host, proxy.port, tls_backend.user, tls_backend.password)
    got = tmp_path / "downloaded.bin"
    result = transfer(client, "get", endpoint, "download.bin", got, mode=mode)
    assert result.returncode == 0, result.stderr + proxy.log.read_text()[-3000:]
    assert sha256(got) == sha256(big_file)
    result = transfer(client, "put", endpoint, "uploaded.bin", big_file, mode=mode)
    assert result.returncode == 0, result.stderr + proxy.log.read_text()[-3000:]
    assert sha256(tls_backend.files / "uploaded.bin") == sha256(big_file)
    assert_backend_protected(proxy)
    modes = {event["mode"] for event in proxy.events("transfer") if event["verb"] in ("RETR", "STOR")}
    assert modes == {"active" if mode == "port" else "passive"}


@pytest.mark.parametrize("passive", [True, False], ids=["pasv", "port"])
@pytest.mark.parametrize("implicit", [False, True], ids=["explicit-client", "implicit-client"])
def test_ftplib_tls_client_tls_backend(
    proxy, tls_backend, certs, big_file: Path, tmp_path: Path, passive: bool, implicit: bool
) -> None:
    """FTPS on both sides: ftpfix terminates the client's TLS (PROT P,
    session reuse required) and opens its own to the backend, whose data
    connections resume ftpfix's backend session."""
    legacy.put_file(tls_backend, "download.bin", big_file.read_bytes())
    if implicit:
        ftp: ReusingFTP_TLS = ImplicitFTP_TLS(context=certs.client_context(), timeout=30)
        ftp.connect(proxy.host, proxy.implicit_port)
        ftp.login(tls_backend.user, tls_backend.password)
    else:
        ftp = ReusingFTP_TLS(context=certs.client_context(), timeout=30)
        ftp.connect(proxy.host, proxy.port)
        ftp.auth()
        ftp.login(tls_backend.user, tls_backend.password)
        ftp.prot_p()
    ftp.trust_server_pasv_ipv4_address = True
    ftp.set_pasv(passive)
    got = io.BytesIO()
    ftp.retrbinary("RETR download.bin", got.write)
    downloaded = tmp_path / "downloaded.bin"
    downloaded.write_bytes(got.getvalue())
    assert sha256(downloaded) == sha256(big_file)
    with big_file.open("rb") as source:
        ftp.storbinary("STOR uploaded.bin", source)
    assert sha256(tls_backend.files / "uploaded.bin") == sha256(big_file)
    # The client's PROT C changes its own side only; the backend's stays protected
    # (vsftpd with force_anon_data_ssl would refuse a clear data connection).
    ftp.sendcmd("PROT C")
    ftp._prot_p = False
    lines: list[str] = []
    ftp.retrlines("LIST", lines.append)
    assert any("download.bin" in line for line in lines)
    with pytest.raises(ftplib.error_perm, match="^502"):
        ftp.sendcmd("CCC")
    ftp.quit()
    assert_backend_protected(proxy)
    mode = "passive" if passive else "active"
    assert [(event["verb"], event["mode"], event["code"]) for event in proxy.events("transfer")] == [
        ("RETR", f"{mode}_tls", 226),
        ("STOR", f"{mode}_tls", 226),
        ("LIST", mode, 226),
    ]
    assert tls_backend.password not in proxy.log.read_text()


def test_curl_tls_client_tls_backend(proxy, tls_backend, certs, big_file: Path, tmp_path: Path) -> None:
    """curl --ssl-reqd (explicit) in PASV and EPSV, and ftps:// (implicit), 16 MiB each way."""
    require_programs("curl")
    legacy.put_file(tls_backend, "download.bin", big_file.read_bytes())
    common = ["curl", "-sS", "--cacert", str(certs.ca), "--user", f"{tls_backend.user}:{tls_backend.password}"]
    common += ["--no-ftp-skip-pasv-ip", "--max-time", "120"]
    runs = [
        ("pasv", ["--ssl-reqd", "--disable-epsv"], f"ftp://{proxy.host}:{proxy.port}"),
        ("epsv", ["--ssl-reqd", "--ftp-pasv"], f"ftp://{proxy.host}:{proxy.port}"),
        ("implicit", ["--ftp-pasv"], f"ftps://{proxy.host}:{proxy.implicit_port}"),
    ]
    for name, flags, base in runs:
        got = tmp_path / f"downloaded-{name}.bin"
        run = subprocess.run(
            [*common, *flags, "-o", str(got), f"{base}/download.bin"], capture_output=True, text=True, check=False
        )
        assert run.returncode == 0, run.stderr
        assert sha256(got) == sha256(big_file)
        run = subprocess.run(
            [*common, *flags, "-T", str(big_file), f"{base}/up-{name}.bin"], capture_output=True, text=True, check=False
        )
        assert run.returncode == 0, run.stderr
        assert sha256(tls_backend.files / f"up-{name}.bin") == sha256(big_file)
    assert_backend_protected(proxy)


@pytest.mark.parametrize("passive", [True, False], ids=["pasv", "port"])
def test_lftp_tls_client_tls_backend(proxy, tls_backend, certs, big_file: Path, tmp_path: Path, passive: bool) -> None:
    """lftp (GnuTLS) with ftp:ssl-force and ftp:ssl-protect-data, passive and
    active: the active case is the one curl 7.88 cannot do."""
    require_programs("lftp")
    legacy.put_file(tls_backend, "download.bin", big_file.read_bytes())
    got = tmp_path / "downloaded.bin"
    script = (
        "set ftp:ssl-force yes; set ftp:ssl-protect-data yes; "
        f"set ssl:ca-file {certs.ca}; set ssl:check-hostname no; "
        f"set ftp:passive-mode {'yes' if passive else 'no'}; "
        "set ftp:fix-pasv-address no; set ftp:prefer-epsv no; set net:max-retries 1; set net:timeout 30; "
        f"open -u {tls_backend.user},{tls_backend.password} -p {proxy.port} {proxy.host}; "
        f"get download.bin -o {got}; put {big_file} -o uploaded.bin; bye"
    )
    run = subprocess.run(["lftp", "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    assert sha256(got) == sha256(big_file)
    assert sha256(tls_backend.files / "uploaded.bin") == sha256(big_file)
    assert_backend_protected(proxy)
    mode = "passive_tls" if passive else "active_tls"
    assert {event["mode"] for event in proxy.events("transfer") if event["verb"] in ("RETR", "STOR")} == {mode}


# -- verification -----------------------------------------------------------


@pytest.fixture
def vsftpd_tls(server_dir: Path, certs: Certificates) -> Iterator[legacy.LegacyServer]:
    require_servers("vsftpd")
    server = legacy.start("vsftpd", server_dir / "vsftpd", tls=legacy.ServerTls(certs.certificate, certs.key))
    try:
        yield server
    finally:
        server.stop()


def test_untrusted_backend_certificate_is_refused_clearly(vsftpd_tls, certs, tmp_path: Path) -> None:
    """tls_verify = true (the default) against a certificate the system's
    store does not trust: the client gets a 421 that says why, and the log
    names the backend and the verification error. With tls_ca naming the
    test CA, the same backend passes; with tls_verify = false too."""
    ftpfix = run_proxy(vsftpd_tls, tmp_path / "system-store", certs, ca=None)
    try:
        ftp = ftplib.FTP(timeout=10)
        with pytest.raises(ftplib.error_temp, match="^421 .*certificate failed verification.*unable to get local"):
            ftp.connect(ftpfix.host, ftpfix.port)
        [failed] = ftpfix.wait_for("backend TLS failed")
        assert failed["backend"] == f"{vsftpd_tls.host}:{vsftpd_tls.port}"
        assert "certificate verify failed" in failed["error"] or "unable to get local issuer" in failed["error"]
    finally:
        ftpfix.stop()
    for where, ca, verify in (("with-ca", certs.ca, True), ("unverified", None, False)):
        ftpfix = run_proxy(vsftpd_tls, tmp_path / where, certs, ca=ca, verify=verify)
        try:
            ftp = ftplib.FTP(timeout=10)
            ftp.connect(ftpfix.host, ftpfix.port)
            ftp.login(vsftpd_tls.user, vsftpd_tls.password)
            assert ftp.nlst() == []
            ftp.quit()
        finally:
            ftpfix.stop()


def test_backend_certificate_for_another_name_is_refused(server_dir: Path, certs: Certificates, tmp_path) -> None:
    """A certificate from the trusted CA, but for another host: the name
    check fails (the backend is dialed as 127.0.0.1), 421, logged."""
    require_servers("vsftpd")
    ca = trustme.CA()
    wrong = ca.issue_cert("elsewhere.test")
    folder = tmp_path / "wrong"
    folder.mkdir()
    wrong.private_key_pem.write_to_path(str(folder / "key.pem"))
    wrong.cert_chain_pems[0].write_to_path(str(folder / "cert.pem"))
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    server = legacy.start("vsftpd", server_dir / "wrong", tls=legacy.ServerTls(folder / "cert.pem", folder / "key.pem"))
    try:
        ftpfix = run_proxy(server, tmp_path / "proxy", certs, ca=folder / "ca.pem")
        try:
            ftp = ftplib.FTP(timeout=10)
            with pytest.raises(ftplib.error_temp, match="^421 .*certificate failed verification.*IP address mismatch"):
                ftp.connect(ftpfix.host, ftpfix.port)
            [failed] = ftpfix.wait_for("backend TLS failed")
            assert "IP address mismatch" in failed["error"]
        finally:
            ftpfix.stop()
    finally:
        server.stop()


@pytest.mark.parametrize("client_tls", [False, True], ids=["plain-client", "tls-client"])
def test_abor_with_a_tls_backend(proxy, tls_backend, certs, big_file: Path, client_tls: bool) -> None:
    """ABOR mid-download: ftpfix resets both data connections; the backend
    (whose data connection is TLS) answers at once, and the session goes on
    with a whole transfer."""
    legacy.put_file(tls_backend, "download.bin", big_file.read_bytes())
    if client_tls:
        ftp: ftplib.FTP = ReusingFTP_TLS(context=certs.client_context(), timeout=30)
        ftp.connect(proxy.host, proxy.port)
        ftp.auth()  # type: ignore[attr-defined]
        ftp.login(tls_backend.user, tls_backend.password)
        ftp.prot_p()  # type: ignore[attr-defined]
    else:
        ftp = ftplib.FTP(timeout=30)
        ftp.connect(proxy.host, proxy.port)
        ftp.login(tls_backend.user, tls_backend.password)
    ftp.trust_server_pasv_ipv4_address = True
    ftp.voidcmd("TYPE I")
    conn = ftp.transfercmd("RETR download.bin")
    assert conn.recv(65536)
    assert ftp.abort()[:3] in ("426", "226")
    conn.close()
    assert ftp.getresp()[:3] in ("225", "226")
    got = io.BytesIO()
    ftp.retrbinary("RETR download.bin", got.write)
    assert got.getvalue() == big_file.read_bytes()
    ftp.quit()
    assert_backend_protected(proxy)


def test_readiness_reads_an_implicit_backends_greeting_inside_tls(server_dir: Path, certs: Certificates) -> None:
    """/readyz's backend check greets an implicit FTPS backend through TLS,
    and fails, saying why, when its certificate would fail every session."""
    import trio

    from ftpfix.config import parse_config
    from ftpfix.net.readiness import greets

    require_servers("vsftpd")
    server = legacy.start(
        "vsftpd", server_dir / "implicit", tls=legacy.ServerTls(certs.certificate, certs.key, implicit=True)
    )
    try:
        verdicts = []
        for ca in (str(certs.ca), ""):
            document = {
                "backend": {"address": server.host, "port": server.port, "tls": "implicit", "tls_ca": ca},
                "passive": {"public_address": "127.0.0.1"},
            }
            verdicts.append(trio.run(greets, parse_config(document).backend))
        assert verdicts[0] is None
        assert "certificate verify failed" in verdicts[1]
    finally:
        server.stop()


def test_many_data_connections_in_one_session_all_resume(proxy, tls_backend) -> None:
    """25 listings in one session, passive and active in turn: every backend
    data connection resumes the same control session (vsftpd with
    require_ssl_reuse refuses the first one that does not)."""
    ftp = ftplib.FTP(timeout=20)
    ftp.connect(proxy.host, proxy.port)
    ftp.login(tls_backend.user, tls_backend.password)
    ftp.trust_server_pasv_ipv4_address = True
    for turn in range(25):
        ftp.set_pasv(turn % 2 == 0)
        ftp.retrlines("LIST", lambda _: None)
    ftp.quit()
    assert_backend_protected(proxy)
    assert [event["code"] for event in proxy.events("transfer")] == [226] * 25
